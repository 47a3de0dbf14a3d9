//! What both RM platforms (local processes, Kubernetes pods) do with the replicas
//! themselves: ask each for its Status, turn a Status into the RM's facts, decide which
//! replicas lack the current configuration and push it to them, and word a new
//! configuration for people. One home, so the two platforms cannot drift apart.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use tandem_replica::pb;
use tandem_replica::wire::{Channels, within};
use tracing::{debug, warn};

use crate::rm::{Facts, Reason};

/// How long the RM waits for one replica's answer (Status, a configuration push).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// What the RM learns from a replica's Status.
pub fn facts(status: &pb::ReplicaStatus) -> Facts {
    Facts {
        epoch: status.configuration.as_ref().map_or(0, |c| c.epoch),
        last_seq: status.last_seq,
        synced_epoch: status.synced_epoch,
        has_state: status.has_state,
        incarnation: status.incarnation.clone(),
        data_id: status.data_id.clone(),
        follower_silence: status.followers.iter().map(|f| (f.replica_id.clone(), f.ack_age_ms)).collect(),
    }
}

/// Asks every `(id, address)` for its Status at once; those that answer in time.
pub async fn statuses(
    channels: &Channels,
    targets: &[(String, String)],
) -> BTreeMap<String, pb::ReplicaStatus> {
    let calls = targets.iter().filter_map(|(id, address)| {
        let channel = channels.get(address).ok()?;
        Some(async move {
            let mut client = pb::replica_client::ReplicaClient::new(channel);
            (id.clone(), within(CALL_TIMEOUT, client.status(pb::StatusRequest {})).await)
        })
    });
    join_all(calls)
        .await
        .into_iter()
        .filter_map(|(id, answer)| Some((id, answer.ok()?.into_inner())))
        .collect()
}

/// Whether a replica lacks `config` (or says nothing of itself).
pub fn lacks(status: Option<&pb::ReplicaStatus>, config: &pb::Configuration) -> bool {
    status.is_none_or(|s| s.configuration.as_ref().is_none_or(|c| c.epoch < config.epoch))
}

/// Pushes `config` to each `(id, address)`; a failure is logged (the next
/// reconciliation pushes again) and returned.
pub async fn push_configuration(
    channels: &Channels,
    config: &pb::Configuration,
    targets: &[(String, String)],
) -> Vec<(String, tonic::Status)> {
    let calls = targets.iter().map(|(_, address)| async move {
        let channel = channels.get(address).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut control = pb::control_client::ControlClient::new(channel);
        within(CALL_TIMEOUT, control.install_configuration(config.clone())).await.map(|_| ())
    });
    let results = join_all(calls).await;
    targets
        .iter()
        .zip(results)
        .filter_map(|((id, _), result)| {
            let status = result.err()?;
            debug!(replica = %id, epoch = config.epoch, error = %status.message(), "configuration push failed; retrying later");
            Some((id.clone(), status))
        })
        .collect()
}

/// Pushes settings (checkpoint interval, GFD address) to each `(id, address)`.
pub async fn push_settings(channels: &Channels, settings: &pb::Settings, targets: &[(String, String)]) {
    let calls = targets.iter().map(|(id, address)| async move {
        let Ok(channel) = channels.get(address) else { return };
        let mut control = pb::control_client::ControlClient::new(channel);
        if let Err(status) = within(CALL_TIMEOUT, control.update_settings(settings.clone())).await {
            warn!(replica = %id, error = %status.message(), "could not change the replica's settings; retrying later");
        }
    });
    join_all(calls).await;
}

/// A new configuration in words: `epoch 2 (passive): primary r2, members r2, r3 — r1
/// failed (instance gone); r2 promoted (longest log: 42)`. `name` turns a replica id
/// into what people know it by (the pod's name on Kubernetes).
pub fn describe_configuration(
    config: &pb::Configuration,
    reason: &Reason,
    name: impl Fn(&str) -> String,
) -> String {
    let members: Vec<String> = config.members.iter().map(|m| name(&m.id)).collect();
    format!(
        "epoch {} ({}): primary {}, members {} — {reason}",
        config.epoch,
        config.mode(),
        name(&config.primary),
        members.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rm::Failure;

    #[test]
    fn a_failover_reads_as_one_line_naming_who_failed_and_who_leads() {
        let config = pb::Configuration {
            epoch: 2,
            mode: pb::Mode::Passive.into(),
            primary: "r2".into(),
            members: ["r2", "r3"]
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: String::new() })
                .collect(),
        };
        let reason = Reason {
            failed: vec![("r1".into(), Failure::InstanceGone)],
            promoted: Some(("r2".into(), 42)),
            ..Reason::default()
        };
        assert_eq!(
            describe_configuration(&config, &reason, |id| format!("demo-{id}")),
            "epoch 2 (passive): primary demo-r2, members demo-r2, demo-r3 — r1 failed (instance gone); r2 promoted (longest log: 42)"
        );
    }

    #[test]
    fn a_replica_without_status_or_behind_lacks_the_configuration() {
        let config = pb::Configuration { epoch: 3, ..pb::Configuration::default() };
        let at = |epoch| pb::ReplicaStatus {
            configuration: Some(pb::Configuration { epoch, ..pb::Configuration::default() }),
            ..pb::ReplicaStatus::default()
        };
        assert!(lacks(None, &config));
        assert!(lacks(Some(&pb::ReplicaStatus::default()), &config));
        assert!(lacks(Some(&at(2)), &config));
        assert!(!lacks(Some(&at(3)), &config));
    }
}
