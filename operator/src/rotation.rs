//! When replica pods are replaced (Kubernetes), one at a time, for either of two reasons:
//! their certificates are due for renewal (a process loads its certificates once, at
//! start), or their pod template is not the spec's any more (a new image, resources,
//! scheduling overrides: a rolling update). The operator deletes the pod, and the
//! ordinary recreate path gives the new pod new certificates and the current template.
//! Decided here as a pure function: one pod at a time, only while the group is whole,
//! backups first; the primary last, and then by a planned switchover to a backup that is
//! done (switchover.rs), so that it leaves as a backup and nobody fails over.
//!
//! One exception keeps a group from being stuck for good: a member whose certificates
//! are about to expire is replaced even while the group is not whole (a member with
//! expired certificates keeps its open connections but can open none, so a primary
//! whose certificates expired can never take a new member, and the group would stay
//! short forever). Only when another member can take over, so it is at worst a failover.

use crate::crd::{Defaults, ReplicatedServiceSpec};
use crate::rm::{self, Action, Instance, Observed, Record, Spec};

/// On each replica pod: a hash of the pod template it was created from
/// (`template_hash`); a pod whose hash differs from the spec's is replaced.
pub const TEMPLATE_HASH_ANNOTATION: &str = "tandem.dev/template-hash";

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

    /// When waiting for a whole group is over: the last twentieth of the validity
    /// (4.5 days of 90; 15 s of a 300 s test certificate).
    pub fn urgent_at(&self) -> i64 {
        self.not_after - (self.not_after - self.issued_at).max(0) / 20
    }
}

/// Two thirds of the way from `issued_at` to `not_after` (the operator's own
/// certificate follows the same rule).
pub fn renew_at(issued_at: i64, not_after: i64) -> i64 {
    issued_at + (not_after - issued_at).max(0) * 2 / 3
}

/// Why a pod is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Its certificates are due: they expire at `not_after`, due since `due_since`.
    Certificate { not_after: i64, due_since: i64 },
    /// Its pod template is not the spec's (a rolling update).
    Template,
    /// Its certificates expire at `not_after`, soon or already, and the group is not
    /// whole: it is replaced without waiting, by a failover if it is the primary.
    Expiring { not_after: i64 },
}

/// A pod to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub id: String,
    /// It is the primary (or active order-keeper): its replacement is a failover. Only
    /// when no other member can take over by a switchover (a group of one).
    pub primary: bool,
    pub why: Why,
}

/// What to do next for the pods that are due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Replace(Rotation),
    /// Only the primary is due: hand its role to `to` (a member that is not due) first;
    /// it is then a backup, replaced in a later round.
    SwitchOver {
        from: String,
        to: String,
        why: Why,
    },
}

/// The one step to take now, if any. Nothing while the RM has anything else to do
/// (`pending`: its actions of this round) or the group is not whole: a pod replaced
/// then would add to a failure, and a replacement under way (its pod gone or rejoining)
/// makes the group not whole, so they come one at a time, each back as a member before
/// the next. Backups go first (certificates by the earliest due, then templates); the
/// primary only when no backup is due, and by a switchover to a backup that is not due
/// (the longest log, then the lowest id) when there is one. The exception: a member
/// whose certificates are about to expire (`expiring`).
#[allow(clippy::too_many_arguments)]
pub fn next(
    spec: &Spec,
    record: &Record,
    observed: &[Observed],
    membership_known: bool,
    pending: &[Action],
    certificates: &[PodCertificate],
    outdated: &[String],
    now_s: i64,
) -> Option<Step> {
    if !pending.is_empty() {
        return None;
    }
    if !rm::whole(spec, record, observed, membership_known) {
        return expiring(record, observed, membership_known, certificates, now_s).map(Step::Replace);
    }
    let config = record.config.as_ref()?;
    let mut due: Vec<(String, Why)> = certificates
        .iter()
        .filter(|c| config.has_member(&c.id) && now_s >= c.renew_at())
        .map(|c| (c.id.clone(), Why::Certificate { not_after: c.not_after, due_since: c.renew_at() }))
        .collect();
    let templates: Vec<(String, Why)> = outdated
        .iter()
        .filter(|id| config.has_member(id) && !due.iter().any(|(d, _)| d == *id))
        .map(|id| (id.clone(), Why::Template))
        .collect();
    due.extend(templates);
    let key = |(id, why): &(String, Why)| {
        let since = match why {
            Why::Certificate { due_since, .. } => *due_since,
            Why::Template | Why::Expiring { .. } => i64::MAX,
        };
        (*id == config.primary, since, rm::id_number(id).unwrap_or(u32::MAX))
    };
    let (id, why) = due.iter().min_by_key(|d| key(d))?.clone();
    if id != config.primary {
        return Some(Step::Replace(Rotation { id, primary: false, why }));
    }
    let last_seq = |id: &str| {
        observed.iter().find(|o| o.id == id).and_then(|o| o.facts.as_ref()).map_or(0, |f| f.last_seq)
    };
    let successor = config
        .members
        .iter()
        .map(|m| m.id.as_str())
        .filter(|m| *m != id && !due.iter().any(|(d, _)| d == m))
        .max_by_key(|m| (last_seq(m), std::cmp::Reverse(rm::id_number(m).unwrap_or(u32::MAX))));
    Some(match successor {
        Some(to) => Step::SwitchOver { from: id, to: to.to_owned(), why },
        None => Step::Replace(Rotation { id, primary: true, why }),
    })
}

/// In a group that is not whole, a running member whose certificates are in their last
/// twentieth (`urgent_at`) or expired, if another member could take over (running,
/// ready, synced since it joined, as a failover asks of a new primary, and not
/// expired). A primary whose certificates expired goes first (no replacement can join
/// it); otherwise backups go first (a backup's replacement joins through the primary
/// while it can still connect), the earliest to expire first. One at a time: nothing
/// while a pod is still terminating.
fn expiring(
    record: &Record,
    observed: &[Observed],
    membership_known: bool,
    certificates: &[PodCertificate],
    now_s: i64,
) -> Option<Rotation> {
    let config = record.config.as_ref()?;
    if !membership_known || observed.iter().any(|o| o.instance == Instance::Terminating) {
        return None;
    }
    let running = |id: &str| observed.iter().find(|o| o.id == id && o.instance == Instance::Running);
    let expired = |id: &str| certificates.iter().any(|c| c.id == id && now_s >= c.not_after);
    let first = certificates
        .iter()
        .filter(|c| config.has_member(&c.id) && now_s >= c.urgent_at() && running(&c.id).is_some())
        .min_by_key(|c| {
            let primary = c.id == config.primary;
            (!(primary && expired(&c.id)), primary, c.not_after, rm::id_number(&c.id).unwrap_or(u32::MAX))
        })?;
    let successor = config
        .members
        .iter()
        .map(|m| m.id.as_str())
        .filter(|id| *id != first.id)
        .any(|id| !expired(id) && running(id).is_some_and(|o| rm::safe_to_lead(record, o)));
    successor.then(|| Rotation {
        id: first.id.clone(),
        primary: first.id == config.primary,
        why: Why::Expiring { not_after: first.not_after },
    })
}

/// A short, stable hash of what shapes a replica pod: the spec without the settings the
/// RM applies live (replicas, mode, intervals), with the image the pod would run (the
/// operator's default when the spec names none). Keys are hashed in sorted order, so
/// the same spec always gives the same hash, whatever the operator's version.
pub fn template_hash(spec: &ReplicatedServiceSpec, defaults: &Defaults) -> String {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for live in ["replicas", "mode", "heartbeatIntervalMs", "failureThreshold", "checkpointIntervalMs"] {
            fields.remove(live);
        }
        fields.insert("image".into(), spec.image(defaults).into());
    }
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    // FNV-1a, 64 bits: stable across Rust releases (std's hasher is not).
    let hash = canonical.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// JSON with every object's keys in sorted order.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&fields[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
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
                    data_id: String::new(),
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

    fn step(
        observed: &[Observed],
        record: &Record,
        certificates: &[PodCertificate],
        outdated: &[&str],
    ) -> Option<Step> {
        let outdated: Vec<String> = outdated.iter().map(|id| (*id).to_owned()).collect();
        next(&Spec::default(), record, observed, true, &[], certificates, &outdated, NOW)
    }

    fn next_of(observed: &[Observed], record: &Record, certificates: &[PodCertificate]) -> Option<String> {
        match step(observed, record, certificates, &[])? {
            Step::Replace(rotation) => Some(rotation.id),
            Step::SwitchOver { from, .. } => Some(format!("switch over from {from}")),
        }
    }

    fn switch_over(from: &str, to: &str, why: Why) -> Option<Step> {
        Some(Step::SwitchOver { from: from.into(), to: to.into(), why })
    }

    #[test]
    fn nothing_to_do_while_every_certificate_is_fresh() {
        let (_, record, observed) = whole_group();
        assert_eq!(next_of(&observed, &record, &issued([59, 30, 0], NOW)), None, "59 of 90 days: not yet");
    }

    #[test]
    fn backups_go_before_the_primary_earliest_due_first_then_a_switchover() {
        let (_, record, observed) = whole_group();
        // All three past two thirds (60 days); r1, the primary, the most overdue.
        let certificates = issued([80, 61, 70], NOW);
        let first = step(&observed, &record, &certificates, &[]);
        let due_since = NOW - 10 * DAY;
        let expected = Rotation {
            id: "r3".into(),
            primary: false,
            why: Why::Certificate { not_after: NOW - 70 * DAY + VALIDITY, due_since },
        };
        assert_eq!(first, Some(Step::Replace(expected)));
        // r3 renewed: r2 next; then the primary hands over to a renewed backup first.
        assert_eq!(next_of(&observed, &record, &issued([80, 61, 0], NOW)).as_deref(), Some("r2"));
        let certificates = issued([80, 0, 0], NOW);
        let why = Why::Certificate { not_after: NOW - 80 * DAY + VALIDITY, due_since: NOW - 20 * DAY };
        assert_eq!(step(&observed, &record, &certificates, &[]), switch_over("r1", "r2", why));
    }

    #[test]
    fn the_primary_hands_over_to_the_longest_log_when_it_alone_is_due() {
        let (_, record, mut observed) = whole_group();
        observed[2].facts.as_mut().expect("facts").last_seq = 11;
        let certificates = issued([61, 1, 2], NOW);
        let why = Why::Certificate { not_after: NOW - 61 * DAY + VALIDITY, due_since: NOW - DAY };
        assert_eq!(step(&observed, &record, &certificates, &[]), switch_over("r1", "r3", why));
    }

    #[test]
    fn a_group_of_one_replaces_its_primary() {
        let (_, mut record, mut observed) = whole_group();
        observed.truncate(1);
        if let Some(config) = record.config.as_mut() {
            config.members.truncate(1);
        }
        let spec = Spec { replicas: 1, ..Spec::default() };
        let rolled = next(&spec, &record, &observed, true, &[], &issued([1, 1, 1], NOW), &["r1".into()], NOW);
        assert_eq!(
            rolled,
            Some(Step::Replace(Rotation { id: "r1".into(), primary: true, why: Why::Template }))
        );
    }

    #[test]
    fn a_rolling_update_replaces_backups_then_switches_over_then_replaces_the_old_primary() {
        let (_, mut record, observed) = whole_group();
        let fresh = issued([1, 1, 1], NOW);
        let replace =
            |id: &str| Some(Step::Replace(Rotation { id: id.into(), primary: false, why: Why::Template }));
        // Every pod on the old template: the lowest backup first.
        assert_eq!(step(&observed, &record, &fresh, &["r1", "r2", "r3"]), replace("r2"));
        assert_eq!(step(&observed, &record, &fresh, &["r1", "r3"]), replace("r3"));
        // Only the primary left: it hands over to an updated backup.
        assert_eq!(step(&observed, &record, &fresh, &["r1"]), switch_over("r1", "r2", Why::Template));
        // After the switchover r1 is a backup: it is replaced, no failover.
        if let Some(config) = record.config.as_mut() {
            config.primary = "r2".into();
        }
        assert_eq!(step(&observed, &record, &fresh, &["r1"]), replace("r1"));
        assert_eq!(step(&observed, &record, &fresh, &[]), None, "done");
        // A backup due for its certificates goes before one on an old template.
        record.config.as_mut().expect("config").primary = "r1".into();
        assert_eq!(next_of(&observed, &record, &issued([1, 1, 70], NOW)).as_deref(), Some("r3"));
        let due_r3 = step(&observed, &record, &issued([1, 1, 70], NOW), &["r2"]);
        assert!(matches!(due_r3, Some(Step::Replace(Rotation { ref id, .. })) if id == "r3"), "{due_r3:?}");
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
            assert_eq!(next(&spec, &record, &observed, true, &[], &certificates, &[], NOW), None, "case {i}");
        }
        assert_eq!(
            next(&spec, &record, &observed, false, &[], &certificates, &[], NOW),
            None,
            "GFD view unknown"
        );
        let pending = [Action::Forget { id: "r9".into() }];
        assert_eq!(
            next(&spec, &record, &observed, true, &pending, &certificates, &[], NOW),
            None,
            "the RM has something else to do"
        );
        assert!(
            next(&spec, &record, &observed, true, &[], &certificates, &[], NOW).is_some(),
            "whole: it rotates"
        );
    }

    #[test]
    fn an_expiring_member_is_replaced_even_while_the_group_is_not_whole() {
        let (spec, record, observed) = whole_group();
        // Not whole: a replacement pod that cannot join (its primary's certificates
        // are expiring, so the primary cannot connect to it).
        let mut stuck = observed.clone();
        let mut joiner = stuck[2].clone();
        joiner.id = "r4".into();
        joiner.liveness = Liveness::Alive { ready: false };
        joiner.facts = None;
        stuck.push(joiner);
        let replace = |id: &str, primary: bool, age: i64| {
            let why = Why::Expiring { not_after: NOW - age * DAY + VALIDITY };
            Some(Step::Replace(Rotation { id: id.into(), primary, why }))
        };
        let at = |certificates: &[PodCertificate], observed: &[Observed], record: &Record| {
            next(&spec, record, observed, true, &[], certificates, &[], NOW)
        };
        // 85 of 90 days: rotation still waits for a whole group.
        assert_eq!(at(&issued([85, 0, 0], NOW), &stuck, &record), None);
        // In the last twentieth (86 days), or expired: the primary goes, by a failover.
        assert_eq!(at(&issued([86, 0, 0], NOW), &stuck, &record), replace("r1", true, 86));
        assert_eq!(at(&issued([95, 0, 0], NOW), &stuck, &record), replace("r1", true, 95));
        // Backups before the primary (their replacements join through it while it can
        // still connect), the first to expire first, though the others expire too.
        assert_eq!(at(&issued([87, 0, 88], NOW), &stuck, &record), replace("r3", false, 88));
        assert_eq!(at(&issued([89, 88, 87], NOW), &stuck, &record), replace("r2", false, 88));
        // A primary whose certificates expired goes first: nobody can join it, and a
        // member that has not expired yet takes over.
        assert_eq!(at(&issued([91, 88, 87], NOW), &stuck, &record), replace("r1", true, 91));
        // Never when nobody could take over: the others expired, not ready, or not
        // synced since they joined.
        assert_eq!(at(&issued([92, 91, 91], NOW), &stuck, &record), None, "all expired");
        let mut unready = stuck.clone();
        unready[1].liveness = Liveness::Failed;
        unready[2].facts.as_mut().expect("facts").synced_epoch = 0;
        assert_eq!(at(&issued([88, 0, 0], NOW), &unready, &record), None, "no safe successor");
        // Nor while a pod is still terminating (one at a time), the RM has anything
        // else to do, or the GFD's view is unknown.
        let mut terminating = stuck.clone();
        terminating[3].instance = Instance::Terminating;
        assert_eq!(at(&issued([88, 0, 0], NOW), &terminating, &record), None, "terminating");
        let pending = [Action::Forget { id: "r9".into() }];
        let certificates = issued([88, 0, 0], NOW);
        assert_eq!(next(&spec, &record, &stuck, true, &pending, &certificates, &[], NOW), None);
        assert_eq!(next(&spec, &record, &stuck, false, &[], &certificates, &[], NOW), None);
        // Trouble elsewhere (the replacement crash-looping) does not stop it: waiting
        // would only add an expired primary to it.
        let mut troubled = record.clone();
        troubled.trouble = Some(rm::Trouble::CrashLooping { id: "r4".into(), restarts: 5 });
        assert_eq!(at(&certificates, &stuck, &troubled), replace("r1", true, 88));
        // A whole group rotates as before: a switchover, not a failover.
        let why = Why::Certificate { not_after: NOW - 88 * DAY + VALIDITY, due_since: NOW - 28 * DAY };
        assert_eq!(at(&certificates, &observed, &record), switch_over("r1", "r2", why));
    }

    #[test]
    fn one_at_a_time_a_replaced_pod_must_be_a_member_again_before_the_next() {
        let (spec, record, mut observed) = whole_group();
        let _ = &spec;
        let mut certificates = issued([80, 80, 80], NOW);
        let first = next_of(&observed, &record, &certificates).expect("first");
        assert_eq!(first, "r2");
        // Its pod is being replaced: the new one runs, joining, with new certificates.
        let replaced = observed.iter_mut().find(|o| o.id == "r2").expect("r2");
        replaced.liveness = Liveness::Alive { ready: false };
        replaced.facts = None;
        certificates[1] = PodCertificate { id: "r2".into(), issued_at: NOW, not_after: NOW + VALIDITY };
        assert_eq!(next(&spec, &record, &observed, true, &[], &certificates, &[], NOW), None, "r2 rejoining");
        // Back, ready and synced as a member: the next one.
        let (_, _, fresh) = whole_group();
        assert_eq!(next_of(&fresh, &record, &certificates).as_deref(), Some("r3"));
    }

    #[test]
    fn the_template_hash_follows_what_shapes_a_pod_and_nothing_else() {
        let defaults = Defaults { image: "tandem:1".into(), spec: Spec::default() };
        let base = ReplicatedServiceSpec::default();
        let hash = template_hash(&base, &defaults);
        assert_eq!(hash, template_hash(&base.clone(), &defaults), "stable");
        assert_eq!(hash.len(), 16);
        let live =
            ReplicatedServiceSpec { replicas: Some(5), heartbeat_interval_ms: Some(200), ..base.clone() };
        assert_eq!(template_hash(&live, &defaults), hash, "settings the RM applies live roll nothing");
        let same_image = ReplicatedServiceSpec { image: Some("tandem:1".into()), ..base.clone() };
        assert_eq!(template_hash(&same_image, &defaults), hash, "the default image, named");
        let new_image = ReplicatedServiceSpec { image: Some("tandem:2".into()), ..base.clone() };
        assert_ne!(template_hash(&new_image, &defaults), hash);
        let new_default = Defaults { image: "tandem:2".into(), ..defaults.clone() };
        assert_eq!(
            template_hash(&base, &new_default),
            template_hash(&new_image, &defaults),
            "the operator's default"
        );
        let overrides =
            crate::crd::PodOverrides { priority_class_name: Some("high".into()), ..Default::default() };
        let scheduled = ReplicatedServiceSpec { pod_template: Some(overrides), ..base.clone() };
        assert_ne!(template_hash(&scheduled, &defaults), hash);
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity_of_any_length() {
        assert_eq!(renew_at(1_000, 1_090), 1_060, "90 s: renewed at 60 s");
        assert_eq!(renew_at(0, VALIDITY), 60 * DAY);
        assert_eq!(renew_at(500, 400), 500, "a certificate that expired before it was issued: due at once");
    }
}
