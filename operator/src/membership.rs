//! The RM's view of the GFD's membership, shared by both platforms: a subscription that
//! follows the GFD (resubscribing when it restarts), and the liveness it implies for each
//! replica. While the stream is down, or the GFD has not settled after a restart, the
//! view is not `known`, and the RM ignores it (only replicas whose instance is gone count
//! as failed then).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tandem_replica::pb::{self, MembershipChange};
use tandem_replica::wire::{BadAddress, dial_internal};
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
    let channel = dial_internal(gfd, None)?;
    tokio::spawn(async move {
        loop {
            let mut client = tandem_replica::detector::service::subscriber(channel.clone());
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
    /// The version of the last membership taken from the GFD (0: none since the stream
    /// was (re)opened).
    version: u64,
}

impl MembershipView {
    /// Takes one update; returns the event it carried, if any.
    pub fn apply(&mut self, update: MembershipUpdate) -> Option<pb::MembershipEvent> {
        let event = match update {
            MembershipUpdate::Lost(_) => {
                self.known = false;
                self.version = 0;
                return None;
            }
            MembershipUpdate::Event(event) => event,
        };
        let membership = event.membership.clone().unwrap_or_default();
        if self.version > 0 && membership.version <= self.version {
            // Published before what this view already has: a late arrival.
            return Some(event);
        }
        self.version = membership.version;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `change` of `replica`, with the membership after it: (id, alive, ready) each.
    fn event(
        version: u64,
        change: MembershipChange,
        replica: &str,
        members: &[(&str, bool, bool)],
    ) -> MembershipUpdate {
        MembershipUpdate::Event(pb::MembershipEvent {
            change: change.into(),
            replica_id: replica.into(),
            membership: Some(pb::Membership {
                members: members
                    .iter()
                    .map(|(id, alive, ready)| pb::MemberState {
                        replica_id: (*id).into(),
                        alive: *alive,
                        ready: *ready,
                        ..Default::default()
                    })
                    .collect(),
                settled: true,
                version,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Seen on Kubernetes: two changes published at once reached the operator in the
    /// other order, and a ready replica stayed "not ready" for good.
    #[test]
    fn a_late_older_membership_does_not_overwrite_a_newer_one() {
        let mut view = MembershipView::default();
        let ready = Liveness::Alive { ready: true };
        view.apply(event(1, MembershipChange::Snapshot, "", &[("r1", true, false), ("r2", true, false)]));
        view.apply(event(3, MembershipChange::Ready, "r2", &[("r1", true, true), ("r2", true, true)]));
        view.apply(event(2, MembershipChange::Ready, "r1", &[("r1", true, true), ("r2", true, false)]));
        assert_eq!((view.liveness("r1"), view.liveness("r2")), (ready, ready));
        // A late failure report is as old as the rest of its event.
        view.apply(event(3, MembershipChange::Failed, "r2", &[("r1", true, true), ("r2", false, false)]));
        assert_eq!(view.liveness("r2"), ready);

        // A restarted GFD counts from 0 again: after the stream was lost, its first
        // event is taken whatever its version.
        view.apply(MembershipUpdate::Lost("GFD restarted".into()));
        assert!(!view.known());
        view.apply(event(1, MembershipChange::Failed, "r2", &[("r1", true, true), ("r2", false, false)]));
        assert_eq!((view.liveness("r2"), view.known()), (Liveness::Failed, true));
    }
}
