//! Leader election on a coordination.k8s.io Lease, so that two operator replicas never
//! act at once. The decision (take the lease? renew it? wait?) is pure; the loop around
//! it writes the Lease with optimistic concurrency and stops the operator the moment
//! it cannot renew in time. (The status write of every new configuration is also
//! optimistic, so even two leaders could not hand out two configurations for one epoch.)

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews it.
    pub renew_every: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Create,
    Renew,
    /// Take over an expired lease from `from`.
    TakeOver {
        from: String,
    },
    /// Someone else holds it; look again later.
    Wait {
        holder: String,
    },
}

/// What to do with the lease as it stands, at `now` (unix ms).
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now_ms: i64) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    let renewed = spec.renew_time.as_ref().map_or(0, |t| t.0.as_millisecond());
    let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000;
    if holder.is_empty() || renewed + duration_ms < now_ms {
        Decision::TakeOver { from: holder }
    } else {
        Decision::Wait { holder }
    }
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

fn spec_for(settings: &LeaseSettings, previous: Option<&LeaseSpec>, taking_over: bool) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration.as_secs() as i32),
        acquire_time: if taking_over || previous.is_none() {
            Some(now.clone())
        } else {
            previous.and_then(|p| p.acquire_time.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if taking_over { transitions + 1 } else { transitions }),
        ..LeaseSpec::default()
    }
}

/// One attempt to hold the lease. Ok(true): held (created, renewed or taken over).
async fn attempt(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    match decide(current.as_ref().and_then(|l| l.spec.as_ref()), &settings.identity, now_ms()) {
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec_for(settings, None, true)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            }
        }
        decision @ (Decision::Renew | Decision::TakeOver { .. }) => {
            let mut lease = current.expect("a lease to renew or take over exists");
            let taking_over = matches!(decision, Decision::TakeOver { .. });
            if let Decision::TakeOver { from } = &decision {
                info!(previous = %from, "taking over the expired operator lease");
            }
            lease.spec = Some(spec_for(settings, lease.spec.as_ref(), taking_over));
            // Carries the resourceVersion we read: a concurrent writer makes this fail.
            match api.replace(&settings.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            }
        }
        Decision::Wait { .. } => Ok(false),
    }
}

/// Gives the lease up, if this operator holds it, so that a successor need not wait for
/// it to expire (an operator that stops on a signal calls this once it stopped acting).
pub async fn release(client: Client, settings: &LeaseSettings) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let Some(mut lease) = api.get_opt(&settings.name).await? else { return Ok(()) };
    let held =
        lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(settings.identity.as_str());
    if !held {
        return Ok(());
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
    }
    // Carries the resourceVersion read: if someone took it meanwhile, it stays theirs.
    match api.replace(&settings.name, &PostParams::default(), &lease).await {
        Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Waits until this operator holds the lease, then keeps renewing it in the background;
/// `lost` is cancelled if a renewal does not succeed within the lease duration.
pub async fn lead(
    client: Client,
    settings: LeaseSettings,
    lost: CancellationToken,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut announced = false;
    loop {
        match attempt(&api, &settings).await {
            Ok(true) => break,
            Ok(false) => {
                if !announced {
                    info!(lease = %settings.name, "another operator leads; standing by");
                    announced = true;
                }
            }
            Err(error) => warn!(%error, "leader election failed; retrying"),
        }
        // Standing by: a lease given up is taken within a second.
        tokio::time::sleep(settings.renew_every.min(Duration::from_secs(1))).await;
    }
    info!(identity = %settings.identity, lease = %settings.name, "leading");
    tokio::spawn(async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(settings.renew_every) => {}
                // Stopping: the operator gives the lease up itself once it stopped acting.
                () = lost.cancelled() => return,
            }
            match attempt(&api, &settings).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("lost the operator lease to another operator");
                    lost.cancel();
                    return;
                }
                Err(error) => warn!(%error, "could not renew the operator lease"),
            }
            if last_renewal.elapsed() >= settings.duration {
                warn!("could not renew the operator lease in time; stopping");
                lost.cancel();
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed_ms: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_millisecond(renewed_ms).expect("time"))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_given_up_is_taken_at_once() {
        let given_up = LeaseSpec { holder_identity: None, ..held_by("b", 100_000) };
        assert_eq!(decide(Some(&given_up), "a", 100_001), Decision::TakeOver { from: String::new() });
    }

    #[test]
    fn a_missing_lease_is_created_and_our_own_renewed() {
        assert_eq!(decide(None, "a", 0), Decision::Create);
        assert_eq!(decide(Some(&held_by("a", 0)), "a", 1_000_000), Decision::Renew);
    }

    #[test]
    fn another_holders_lease_is_taken_only_once_expired() {
        let lease = held_by("b", 100_000);
        assert_eq!(decide(Some(&lease), "a", 114_999), Decision::Wait { holder: "b".into() });
        assert_eq!(decide(Some(&lease), "a", 115_001), Decision::TakeOver { from: "b".into() });
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", 0), Decision::TakeOver { from: String::new() });
    }
}
