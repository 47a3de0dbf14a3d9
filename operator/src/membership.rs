//! The RM's view of the GFD's membership, shared by both platforms: a subscription that
//! follows the GFD (resubscribing when it restarts), and the liveness it implies for each
//! replica. While the stream is down, or the GFD has not settled after a restart, the
//! view is not `known`, and the RM ignores it (only replicas whose instance is gone count
//! as failed then).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tandem_replica::pb::{self, MembershipChange};
use tandem_replica::wire::{BadAddress, dial};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::rm::Liveness;

pub enum MembershipUpdate {
    Event(pb::MembershipEvent),
    Lost(String),
}

/// Subscribes to the GFD's membership stream, resubscribing whenever it breaks, in a
/// task of its own until `shutdown` (or until nobody listens). Err: the address is not
/// one, and no membership would ever come.
pub fn follow(
    gfd: &str,
    updates: mpsc::UnboundedSender<MembershipUpdate>,
    shutdown: CancellationToken,
) -> Result<(), BadAddress> {
    let channel = dial(gfd, None)?;
    tokio::spawn(async move {
        loop {
            let mut client = pb::fault_detector_client::FaultDetectorClient::new(channel.clone());
            let reason = match client.subscribe(pb::SubscribeRequest {}).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        tokio::select! {
                            event = stream.next() => match event {
                                Some(Ok(event)) => if updates.send(MembershipUpdate::Event(event)).is_err() { return },
                                Some(Err(status)) => break status.message().to_owned(),
                                None => break "stream closed".into(),
                            },
                            () = shutdown.cancelled() => return,
                        }
                    }
                }
                Err(status) => status.message().to_owned(),
            };
            if updates.send(MembershipUpdate::Lost(reason)).is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

/// What the membership says of each replica (by its GFD id).
#[derive(Debug, Clone, Default)]
pub struct MembershipView {
    liveness: BTreeMap<String, Liveness>,
    heartbeats: BTreeMap<String, u64>,
    known: bool,
}

impl MembershipView {
    /// Takes one update; returns the event it carried, if any.
    pub fn apply(&mut self, update: MembershipUpdate) -> Option<pb::MembershipEvent> {
        let event = match update {
            MembershipUpdate::Lost(_) => {
                self.known = false;
                return None;
            }
            MembershipUpdate::Event(event) => event,
        };
        match event.change() {
            MembershipChange::Failed => {
                self.liveness.insert(event.replica_id.clone(), Liveness::Failed);
            }
            MembershipChange::DetectorLost => {
                self.liveness
                    .insert(event.replica_id.clone(), Liveness::DetectorLost { since: event.at_unix_ms });
            }
            _ => {}
        }
        let membership = event.membership.clone().unwrap_or_default();
        for member in &membership.members {
            self.heartbeats.insert(member.replica_id.clone(), member.last_heartbeat_unix_ms);
            if member.alive {
                self.liveness.insert(member.replica_id.clone(), Liveness::Alive { ready: member.ready });
            } else {
                self.liveness
                    .entry(member.replica_id.clone())
                    .or_insert(Liveness::DetectorLost { since: member.since_unix_ms });
            }
        }
        self.known = membership.settled;
        Some(event)
    }

    pub fn liveness(&self, id: &str) -> Liveness {
        self.liveness.get(id).copied().unwrap_or(Liveness::Unknown)
    }

    /// Forgets a replica (its instance was replaced: the old verdict no longer applies).
    pub fn forget(&mut self, id: &str) {
        self.liveness.remove(id);
    }

    pub fn heartbeat(&self, id: &str) -> Option<u64> {
        self.heartbeats.get(id).copied()
    }

    pub fn heartbeats(&self) -> &BTreeMap<String, u64> {
        &self.heartbeats
    }

    pub fn known(&self) -> bool {
        self.known
    }
}

/// The names of the alive members in an event, for the course-style line.
pub fn alive_members(event: &pb::MembershipEvent) -> Vec<&str> {
    event
        .membership
        .iter()
        .flat_map(|m| &m.members)
        .filter(|m| m.alive)
        .map(|m| m.replica_id.as_str())
        .collect()
}

pub fn describe_change(change: MembershipChange) -> &'static str {
    match change {
        MembershipChange::Joined => "joined",
        MembershipChange::Failed => "failed",
        MembershipChange::DetectorLost => "lost its LFD",
        MembershipChange::Ready => "is ready",
        MembershipChange::NotReady => "is not ready",
        MembershipChange::Snapshot | MembershipChange::Unspecified => "changed",
    }
}
