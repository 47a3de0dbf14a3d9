//! When a replica pod's certificates are renewed (Kubernetes). A process loads its
//! certificates once, at start, so renewing them means replacing the pod: the operator
//! deletes it, and the ordinary recreate path issues the new pod new certificates.
//! Decided here as a pure function: one pod at a time, only while the group is whole,
//! backups before the primary (whose replacement is a failover), each pod past two
//! thirds of its certificate's validity. The controller carries it out.

use crate::rm::{self, Action, Observed, Record, Spec};

/// A replica pod's certificates, as the operator recorded them when it issued them
/// (unix seconds). Both of a pod's certificates (replica, LFD) are issued together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCertificate {
    pub id: String,
    pub issued_at: i64,
    pub not_after: i64,
}

impl PodCertificate {
    /// When it is due for renewal: two thirds into its validity, which leaves a third
    /// for the group to become whole and reach this pod.
    pub fn renew_at(&self) -> i64 {
        renew_at(self.issued_at, self.not_after)
    }
}

/// Two thirds of the way from `issued_at` to `not_after` (the operator's own
/// certificate follows the same rule).
pub fn renew_at(issued_at: i64, not_after: i64) -> i64 {
    issued_at + (not_after - issued_at).max(0) * 2 / 3
}

/// A pod to replace for its certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub id: String,
    /// It is the primary (or active order-keeper): its replacement is a failover.
    pub primary: bool,
    pub not_after: i64,
    /// Due since (unix seconds).
    pub due_since: i64,
}

/// The one pod to replace now, if any. Nothing while the RM has anything else to do
/// (`pending`: its actions of this round) or the group is not whole: a pod replaced
/// then would add to a failure, and a rotation under way (its pod gone or rejoining)
/// makes the group not whole, so they come one at a time, each back as a member before
/// the next. Backups go first, the earliest due first; the primary only when no backup
/// is due, so that its failover finds every backup renewed and synced.
pub fn next(
    spec: &Spec,
    record: &Record,
    observed: &[Observed],
    membership_known: bool,
    pending: &[Action],
    certificates: &[PodCertificate],
    now_s: i64,
) -> Option<Rotation> {
    if !pending.is_empty() || !rm::whole(spec, record, observed, membership_known) {
        return None;
    }
    let config = record.config.as_ref()?;
    certificates
        .iter()
        .filter(|c| config.has_member(&c.id) && now_s >= c.renew_at())
        .min_by_key(|c| (c.id == config.primary, c.renew_at(), rm::id_number(&c.id).unwrap_or(u32::MAX)))
        .map(|c| Rotation {
            id: c.id.clone(),
            primary: c.id == config.primary,
            not_after: c.not_after,
            due_since: c.renew_at(),
        })
}

#[cfg(test)]
mod tests {
    use tandem_replica::pb;

    use super::*;
    use crate::rm::{Facts, Instance, Liveness};

    const DAY: i64 = 24 * 3600;
    const VALIDITY: i64 = 90 * DAY;

    /// A whole group of r1 (primary), r2, r3 at epoch 4.
    fn whole_group() -> (Spec, Record, Vec<Observed>) {
        let ids = ["r1", "r2", "r3"];
        let config = pb::Configuration {
            epoch: 4,
            mode: pb::Mode::Passive.into(),
            primary: "r1".into(),
            members: ids
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: format!("{id}:7000") })
                .collect(),
        };
        let record = Record {
            joined_epoch: ids.iter().map(|id| ((*id).to_owned(), 1)).collect(),
            config: Some(config),
            ..Record::default()
        };
        let observed = ids
            .iter()
            .map(|id| Observed {
                id: (*id).into(),
                address: format!("{id}:7000"),
                instance: Instance::Running,
                liveness: Liveness::Alive { ready: true },
                facts: Some(Facts {
                    epoch: 4,
                    last_seq: 10,
                    synced_epoch: 4,
                    has_state: true,
                    incarnation: format!("{id}-a"),
                    follower_silence: Vec::new(),
                }),
            })
            .collect();
        (Spec::default(), record, observed)
    }

    /// Certificates issued `ages` days ago (r1, r2, r3), valid 90 days.
    fn issued(ages: [i64; 3], now: i64) -> Vec<PodCertificate> {
        ["r1", "r2", "r3"]
            .iter()
            .zip(ages)
            .map(|(id, age)| PodCertificate {
                id: (*id).into(),
                issued_at: now - age * DAY,
                not_after: now - age * DAY + VALIDITY,
            })
            .collect()
    }

    const NOW: i64 = 1_900_000_000;

    fn next_of(observed: &[Observed], record: &Record, certificates: &[PodCertificate]) -> Option<String> {
        next(&Spec::default(), record, observed, true, &[], certificates, NOW).map(|r| r.id)
    }

    #[test]
    fn nothing_to_do_while_every_certificate_is_fresh() {
        let (_, record, observed) = whole_group();
        assert_eq!(next_of(&observed, &record, &issued([59, 30, 0], NOW)), None, "59 of 90 days: not yet");
    }

    #[test]
    fn backups_go_before_the_primary_earliest_due_first() {
        let (_, record, observed) = whole_group();
        // All three past two thirds (60 days); r1, the primary, the most overdue.
        let certificates = issued([80, 61, 70], NOW);
        let rotation =
            next(&Spec::default(), &record, &observed, true, &[], &certificates, NOW).expect("a rotation");
        assert_eq!((rotation.id.as_str(), rotation.primary), ("r3", false), "{rotation:?}");
        assert_eq!(rotation.due_since, NOW - 10 * DAY);
        // r3 renewed: r2 next; then the primary, when no backup is due.
        assert_eq!(next_of(&observed, &record, &issued([80, 61, 0], NOW)).as_deref(), Some("r2"));
        let last = next(&Spec::default(), &record, &observed, true, &[], &issued([80, 0, 0], NOW), NOW)
            .expect("the primary");
        assert_eq!((last.id.as_str(), last.primary), ("r1", true));
    }

    #[test]
    fn the_primary_goes_when_it_alone_is_due() {
        let (_, record, observed) = whole_group();
        assert_eq!(next_of(&observed, &record, &issued([61, 1, 2], NOW)).as_deref(), Some("r1"));
    }

    #[test]
    fn never_while_the_group_is_not_whole() {
        let (spec, record, observed) = whole_group();
        let certificates = issued([80, 80, 80], NOW);
        let broken: [fn(&mut Vec<Observed>, &mut Record); 7] = [
            // A rotation (or a failure) under way: a member's pod is terminating.
            |o, _| o[1].instance = Instance::Terminating,
            // A member not ready.
            |o, _| o[2].liveness = Liveness::Alive { ready: false },
            // A backup not yet synced with its leader in this epoch (just joined).
            |o, _| o[1].facts.as_mut().expect("facts").synced_epoch = 3,
            // A replica that does not answer the RM.
            |o, _| o[0].facts = None,
            // A replacement pod that has not joined yet.
            |o, _| {
                let mut joiner = o[2].clone();
                joiner.id = "r4".into();
                o.push(joiner);
            },
            // A member short.
            |o, r| {
                o.pop();
                if let Some(c) = r.config.as_mut() {
                    c.members.pop();
                }
            },
            // The RM reports trouble.
            |_, r| r.trouble = Some(rm::Trouble::CrashLooping { id: "r2".into(), restarts: 5 }),
        ];
        for (i, break_it) in broken.iter().enumerate() {
            let (mut observed, mut record) = (observed.clone(), record.clone());
            break_it(&mut observed, &mut record);
            assert_eq!(next(&spec, &record, &observed, true, &[], &certificates, NOW), None, "case {i}");
        }
        assert_eq!(next(&spec, &record, &observed, false, &[], &certificates, NOW), None, "GFD view unknown");
        let pending = [Action::Forget { id: "r9".into() }];
        assert_eq!(
            next(&spec, &record, &observed, true, &pending, &certificates, NOW),
            None,
            "the RM has something else to do"
        );
        assert!(
            next(&spec, &record, &observed, true, &[], &certificates, NOW).is_some(),
            "whole: it rotates"
        );
    }

    #[test]
    fn one_at_a_time_a_replaced_pod_must_be_a_member_again_before_the_next() {
        let (spec, record, mut observed) = whole_group();
        let mut certificates = issued([80, 80, 80], NOW);
        let first = next(&spec, &record, &observed, true, &[], &certificates, NOW).expect("first");
        assert_eq!(first.id, "r2");
        // Its pod is being replaced: the new one runs, joining, with new certificates.
        let replaced = observed.iter_mut().find(|o| o.id == "r2").expect("r2");
        replaced.liveness = Liveness::Alive { ready: false };
        replaced.facts = None;
        certificates[1] = PodCertificate { id: "r2".into(), issued_at: NOW, not_after: NOW + VALIDITY };
        assert_eq!(next(&spec, &record, &observed, true, &[], &certificates, NOW), None, "r2 rejoining");
        // Back, ready and synced as a member: the next one.
        let (_, _, fresh) = whole_group();
        assert_eq!(
            next(&spec, &record, &fresh, true, &[], &certificates, NOW).map(|r| r.id).as_deref(),
            Some("r3")
        );
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity_of_any_length() {
        assert_eq!(renew_at(1_000, 1_090), 1_060, "90 s: renewed at 60 s");
        assert_eq!(renew_at(0, VALIDITY), 60 * DAY);
        assert_eq!(renew_at(500, 400), 500, "a certificate that expired before it was issued: due at once");
    }
}
