//! The RM's decisions, tested without any I/O: scenarios first (each case of issue 7's
//! "what was seen" that is a decision of the RM), then a simulated world of instances
//! that crash, restart in place, hang, lose their detector, get cut off and come back,
//! driven by proptest.

use super::*;
use proptest::prelude::*;

fn facts(id: &str, epoch: u64, last_seq: u64, synced_epoch: u64) -> Facts {
    Facts {
        epoch,
        last_seq,
        synced_epoch,
        has_state: true,
        incarnation: format!("{id}#1"),
        data_id: String::new(),
        follower_silence: Vec::new(),
    }
}

fn alive(id: &str, last_seq: u64, epoch: u64, synced_epoch: u64) -> Observed {
    Observed {
        id: id.into(),
        address: format!("{id}:1"),
        instance: Instance::Running,
        liveness: Liveness::Alive { ready: true },
        facts: Some(facts(id, epoch, last_seq, synced_epoch)),
    }
}

fn with(mut o: Observed, liveness: Liveness, instance: Instance) -> Observed {
    o.liveness = liveness;
    o.instance = instance;
    o
}

/// The same replica id, a new process: no state yet, a new incarnation.
fn restarted(id: &str, epoch: u64) -> Observed {
    let mut o = alive(id, 0, epoch, 0);
    o.liveness = Liveness::Alive { ready: false };
    o.facts = Some(Facts { has_state: false, incarnation: format!("{id}#2"), ..facts(id, epoch, 0, 0) });
    o
}

/// A leader's facts that say it hears `followers` (they answered it just now).
fn leading(id: &str, epoch: u64, last_seq: u64, followers: &[&str]) -> Facts {
    let follower_silence = followers.iter().map(|f| ((*f).to_owned(), 10)).collect();
    Facts { follower_silence, ..facts(id, epoch, last_seq, epoch) }
}

fn installs(actions: &[Action]) -> Vec<pb::Configuration> {
    actions
        .iter()
        .filter_map(|a| if let Action::Install { config, .. } = a { Some(config.clone()) } else { None })
        .collect()
}

fn starts(actions: &[Action]) -> Vec<(String, bool)> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Start { id, bootstrap, .. } = a { Some((id.clone(), *bootstrap)) } else { None }
        })
        .collect()
}

fn member_ids(config: &pb::Configuration) -> Vec<&str> {
    config.members.iter().map(|m| m.id.as_str()).collect()
}

/// A record as after bootstrapping r1..r3 (epoch 1, primary r1), and the replicas then.
fn booted(spec: &Spec) -> (Record, Vec<Observed>) {
    let mut record = Record::default();
    let observed: Vec<Observed> = ["r1", "r2", "r3"].iter().map(|id| alive(id, 0, 0, 0)).collect();
    let actions = reconcile(spec, &mut record, &observed, true, 0);
    assert_eq!(installs(&actions).len(), 1);
    let observed = observed.into_iter().map(|o| alive(&o.id, 10, 1, 1)).collect();
    (record, observed)
}

#[test]
fn bootstrap_starts_fresh_replicas_and_configures_them_once_all_are_alive() {
    let spec = Spec::default();
    let mut record = Record::default();
    let actions = reconcile(&spec, &mut record, &[], true, 0);
    assert_eq!(
        actions,
        ["r1", "r2", "r3"]
            .iter()
            .map(|id| Action::Start { id: (*id).into(), bootstrap: true, attempt: 0 })
            .collect::<Vec<_>>()
    );
    let mut observed: Vec<Observed> = ["r1", "r2", "r3"].iter().map(|id| alive(id, 0, 0, 0)).collect();
    observed[2].liveness = Liveness::Unknown;
    assert!(installs(&reconcile(&spec, &mut record, &observed, true, 10)).is_empty(), "r3 not alive yet");
    observed[2].liveness = Liveness::Alive { ready: false };
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, false, 10)).is_empty(),
        "membership not settled"
    );
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 20)).pop().expect("epoch 1");
    assert_eq!(
        (config.epoch, config.primary.as_str(), member_ids(&config)),
        (1, "r1", vec!["r1", "r2", "r3"])
    );
    assert_eq!(
        record.incarnations.get("r2").map(String::as_str),
        Some("r2#1"),
        "each member is the instance that joined"
    );
}

#[test]
fn a_founding_replica_that_cannot_start_is_retried_with_back_off_and_reported() {
    let spec = Spec::default();
    let mut record = Record::default();
    // r1 and r2 run; r3 exits at every start (its port taken, say).
    let observed: Vec<Observed> = ["r1", "r2"].iter().map(|id| alive(id, 0, 0, 0)).collect();
    let mut started = Vec::new();
    for now in (0..120_000).step_by(10) {
        let actions = reconcile(&spec, &mut record, &observed, true, now);
        assert!(installs(&actions).is_empty(), "no group without r3");
        if let Some((id, bootstrap)) = starts(&actions).pop() {
            assert_eq!((id.as_str(), bootstrap), ("r3", true));
            started.push(now);
        }
    }
    assert!(started.len() < 30, "it spins: {} starts in 2 minutes", started.len());
    let gaps: Vec<u64> = started.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "back-off never shrinks: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= RESTART_BACKOFF_MAX_MS + 10), "never gives up: {gaps:?}");
    assert!(
        matches!(&record.trouble, Some(Trouble::CrashLooping { id, .. }) if id == "r3"),
        "{:?}",
        record.trouble
    );
    // Once it runs, the group is founded and the count starts afresh.
    let observed: Vec<Observed> = ["r1", "r2", "r3"].iter().map(|id| alive(id, 0, 0, 0)).collect();
    assert_eq!(installs(&reconcile(&spec, &mut record, &observed, true, 130_000)).len(), 1);
    let observed: Vec<Observed> = observed.into_iter().map(|o| alive(&o.id, 1, 1, 1)).collect();
    reconcile(&spec, &mut record, &observed, true, 130_010);
    assert!(record.restarts.is_empty() && record.trouble.is_none(), "{:?}", record.trouble);
}

#[test]
fn failed_primary_is_replaced_by_the_safe_survivor_with_the_longest_log() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Running);
    observed[1].facts = Some(facts("r2", 1, 40, 1));
    observed[2].facts = Some(facts("r3", 1, 42, 1));
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    let config = installs(&actions).pop().expect("a failover");
    assert_eq!((config.epoch, config.primary.as_str(), member_ids(&config)), (2, "r3", vec!["r2", "r3"]));
    assert_eq!(record.failovers, 1);
    let Some(Action::Install { reason, .. }) = actions.first() else { panic!("{actions:?}") };
    assert!(reason.is_failover());
    assert_eq!(reason.to_string(), "r1 failed (reported dead by its LFD); r3 promoted (longest log: 42)");
}

#[test]
fn a_survivor_that_never_synced_since_joining_is_not_promoted_and_the_wait_is_reported() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    // r3 rejoined at epoch 2 but has not synced yet; r2 is gone too.
    record.config = Some(pb::Configuration { epoch: 2, ..record.config.clone().expect("config") });
    record.joined_epoch.insert("r3".into(), 2);
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Gone);
    observed[1] = with(observed[1].clone(), Liveness::Failed, Instance::Gone);
    observed[2].facts = Some(facts("r3", 2, 99, 1));
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    assert!(installs(&actions).is_empty(), "{actions:?}");
    assert_eq!(record.trouble, Some(Trouble::NoSafePrimary { epoch: 2, primary: "r1".into() }));
    assert_eq!(record.config.as_ref().map(|c| c.epoch), Some(2));
}

/// Issue 7, seen 4: with no safe survivor, the dead primary was restarted and its fresh,
/// empty instance made the sole member, dropping the survivors that held the data.
#[test]
fn a_restarted_instance_never_counts_as_the_member_it_replaces() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    record.config = Some(pb::Configuration { epoch: 2, ..record.config.clone().expect("config") });
    record.joined_epoch.insert("r2".into(), 2);
    record.joined_epoch.insert("r3".into(), 2);
    observed[1].facts = Some(facts("r2", 2, 50, 1));
    observed[2].facts = Some(facts("r3", 2, 50, 1));
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Gone);
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    assert!(installs(&actions).is_empty(), "no safe survivor: wait");
    assert_eq!(starts(&actions), vec![("r1".to_owned(), false)], "the dead primary's slot is refilled");
    // Its new instance comes up, empty; r2 and r3 then lose their detectors.
    observed[0] = restarted("r1", 2);
    observed[1].liveness = Liveness::DetectorLost { since: 0 };
    observed[2].liveness = Liveness::DetectorLost { since: 0 };
    for now in [200, 5_000, 60_000] {
        let actions = reconcile(&spec, &mut record, &observed, true, now);
        for config in installs(&actions) {
            assert!(!member_ids(&config).contains(&"r1"), "the empty r1 was made a member: {config:?}");
        }
        assert!(installs(&actions).is_empty(), "nothing safe to install: {actions:?}");
        assert_eq!(record.config.as_ref().map(member_ids), Some(vec!["r1", "r2", "r3"]));
    }
    assert!(matches!(record.trouble, Some(Trouble::NoSafePrimary { .. })));
}

#[test]
fn a_member_restarted_in_place_is_removed_and_rejoins_as_a_new_replica() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    // The kubelet restarted r3's container: same pod, a new process without state.
    observed[2] = restarted("r3", 1);
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    let config = installs(&actions).pop().expect("r3 removed");
    assert_eq!(member_ids(&config), vec!["r1", "r2"]);
    let Some(Action::Install { reason, .. }) = actions.first() else { panic!() };
    assert_eq!(reason.failed, vec![("r3".to_owned(), Failure::Restarted)]);
    // It joins through a checkpoint, turns ready, and is added back as itself anew.
    observed[0].facts = Some(leading("r1", 2, 20, &["r2", "r3"]));
    observed[2] = alive("r3", 20, 2, 0);
    observed[2].facts.as_mut().expect("facts").incarnation = "r3#2".into();
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 200)).pop().expect("r3 back");
    assert_eq!(member_ids(&config), vec!["r1", "r2", "r3"]);
    assert_eq!(record.incarnations["r3"], "r3#2");
}

#[test]
fn a_lost_detector_gets_a_grace_period_and_unknown_membership_changes_nothing() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[1].liveness = Liveness::DetectorLost { since: 1_000 };
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, true, 1_000 + DETECTOR_GRACE_MS - 1)).is_empty()
    );
    observed[1].liveness = Liveness::Failed;
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, false, 1_500)).is_empty(),
        "GFD not settled: ignore it"
    );
    observed[1].liveness = Liveness::DetectorLost { since: 1_000 };
    let later = 1_000 + DETECTOR_GRACE_MS;
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, true, later)).is_empty(),
        "a lost detector proves nothing while the replica answers the RM itself"
    );
    observed[1].facts = None;
    let config = installs(&reconcile(&spec, &mut record, &observed, true, later)).pop().expect("removal");
    assert_eq!((config.primary.as_str(), member_ids(&config)), ("r1", vec!["r1", "r3"]));
    // Its detector comes back: the replica, still holding its state, is re-admitted.
    observed[0].facts = Some(leading("r1", 2, 10, &["r2", "r3"]));
    observed[1] = alive("r2", 10, 2, 1);
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 4_000)).pop().expect("re-admitted");
    assert_eq!(member_ids(&config), vec!["r1", "r2", "r3"]);
}

/// Issue 7, seen 1: the restart budget was spent while the deleted pod was still
/// terminating, and the replacement was never created.
#[test]
fn restarts_count_failed_instances_not_reconciliations_and_never_stop() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[2] = with(observed[2].clone(), Liveness::Failed, Instance::Terminating);
    // A pod that takes its time to terminate: no start under its name meanwhile.
    for now in (0..spec.terminating_patience_ms()).step_by(50) {
        assert!(starts(&reconcile(&spec, &mut record, &observed, true, now)).is_empty(), "at {now}");
    }
    assert!(record.restarts.is_empty(), "nothing was restarted, so nothing counts");
    observed[2] = with(observed[2].clone(), Liveness::Failed, Instance::Gone);
    // Now it crashes at every start; restarts back off, never stop, and are reported.
    let mut started = Vec::new();
    for now in (spec.terminating_patience_ms()..600_000).step_by(50) {
        let actions = reconcile(&spec, &mut record, &observed, true, now);
        if let Some((id, bootstrap)) = starts(&actions).pop() {
            assert_eq!((id.as_str(), bootstrap), ("r3", false), "a replacement joins, it never bootstraps");
            started.push(now);
        }
    }
    assert!(started.len() > 50, "restarts stopped after {}", started.len());
    let gaps: Vec<u64> = started.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "back-off never shrinks: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= RESTART_BACKOFF_MAX_MS + 50), "{gaps:?}");
    assert!(
        matches!(&record.trouble, Some(Trouble::CrashLooping { id, .. }) if id == "r3"),
        "{:?}",
        record.trouble
    );
    // It stays up and turns ready: the count starts afresh, the trouble is over.
    observed[2] = alive("r3", 0, 2, 0);
    reconcile(&spec, &mut record, &observed, true, 700_000);
    assert!(record.restarts.is_empty() && record.trouble.is_none());
}

#[test]
fn a_pod_stuck_terminating_is_replaced_under_a_new_id() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Terminating);
    let actions = reconcile(&spec, &mut record, &observed, true, 1_000);
    let config = installs(&actions).pop().expect("failover");
    assert_eq!(member_ids(&config), vec!["r2", "r3"]);
    assert!(starts(&actions).is_empty(), "patience first");
    let actions = reconcile(&spec, &mut record, &observed, true, 1_000 + spec.terminating_patience_ms());
    assert_eq!(starts(&actions), vec![("r4".to_owned(), false)]);
    // The old pod finally goes: nothing more to start, its id is forgotten.
    observed[0] = with(observed[0].clone(), Liveness::Unknown, Instance::Gone);
    observed.push(alive("r4", 0, 2, 0));
    let actions = reconcile(&spec, &mut record, &observed, true, 20_000);
    assert!(starts(&actions).is_empty(), "{actions:?}");
    assert!(actions.contains(&Action::Forget { id: "r1".into() }), "{actions:?}");
}

/// Issue 7, seen 2: every pod deleted at once left the service at 0/3 for good, with
/// nothing that said what happened or what to do.
#[test]
fn losing_every_member_at_once_is_reported_and_recreated_only_when_the_user_says_so() {
    let mut spec = Spec { durability: Durability::Memory, ..Spec::default() };
    let (mut record, mut observed) = booted(&spec);
    for o in &mut observed {
        *o = restarted(&o.id.clone(), 1);
    }
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    assert!(installs(&actions).is_empty());
    let Some(Trouble::GroupLost { epoch, members, .. }) = record.trouble.clone() else {
        panic!("{:?}", record.trouble)
    };
    assert_eq!((epoch, members.len()), (1, 3));
    assert!(record.trouble.as_ref().is_some_and(|t| t.to_string().contains("is gone")));
    // Seen on Kubernetes: while lost, the RM started new replicas "to rejoin through a
    // checkpoint" that nobody was left to send.
    let (mut record_gone, mut gone) = booted(&spec);
    for o in &mut gone {
        *o = with(o.clone(), Liveness::Unknown, Instance::Gone);
    }
    for now in [100, 3_000, 30_000] {
        let actions = reconcile(&spec, &mut record_gone, &gone, true, now);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(record_gone.trouble.as_ref().map(Trouble::reason), Some("GroupLost"));
    }
    // A stale request (another epoch) changes nothing.
    spec.recreate_lost_epoch = Some(7);
    assert!(installs(&reconcile(&spec, &mut record, &observed, true, 200)).is_empty());
    assert_eq!(record.config.as_ref().map(|c| c.epoch), Some(1));
    // The user accepts the loss of epoch 1: the stateless instances go, fresh ones found
    // a new group after it.
    spec.recreate_lost_epoch = Some(1);
    reconcile(&spec, &mut record, &observed, true, 300);
    assert_eq!(record.config, None);
    let actions = reconcile(&spec, &mut record, &observed, true, 400);
    let stopped: Vec<&str> = actions
        .iter()
        .filter_map(|a| if let Action::Stop { id, .. } = a { Some(id.as_str()) } else { None })
        .collect();
    assert_eq!(stopped, vec!["r1", "r2", "r3"]);
    let observed: Vec<Observed> = ["r1", "r2", "r3"].iter().map(|id| alive(id, 0, 0, 0)).collect();
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 500)).pop().expect("new group");
    assert_eq!((config.epoch, member_ids(&config)), (2, vec!["r1", "r2", "r3"]));
}

/// Issue 7, seen 10: a primary cut off from its backups acknowledged nothing, and
/// nothing told the RM.
#[test]
fn a_follower_the_leader_cannot_reach_is_removed_and_a_leader_that_reaches_none_is_replaced() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    let silent = |r2: u64, r3: u64| vec![("r2".to_owned(), r2), ("r3".to_owned(), r3)];
    observed[0].facts.as_mut().expect("facts").follower_silence = silent(250, 100);
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, true, 100)).is_empty(),
        "keepalive pace: fine"
    );
    observed[0].facts.as_mut().expect("facts").follower_silence = silent(UNREACHABLE_MS, 100);
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 200)).pop().expect("r2 removed");
    assert_eq!((config.primary.as_str(), member_ids(&config)), ("r1", vec!["r1", "r3"]));

    // Seen in CI: cut off from both, the leader lost r2 first, then r3, and stayed alone.
    let (mut record, mut observed) = booted(&spec);
    observed[0].facts.as_mut().expect("facts").follower_silence =
        silent(UNREACHABLE_MS, UNREACHABLE_MS * 7 / 8);
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, true, 100)).is_empty(),
        "the leader hears neither: no follower is to blame yet"
    );
    observed[0].facts.as_mut().expect("facts").follower_silence = silent(UNREACHABLE_MS + 5, UNREACHABLE_MS);
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    let config = installs(&actions).pop().expect("the isolated primary replaced");
    assert_eq!(member_ids(&config), vec!["r2", "r3"]);
    assert_ne!(config.primary, "r1");
}

#[test]
fn a_ready_caught_up_joiner_is_added_and_a_lagging_one_waits() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[2] = with(observed[2].clone(), Liveness::Failed, Instance::Gone);
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 0)).pop().expect("r3 removed");
    assert_eq!(member_ids(&config), vec!["r1", "r2"]);
    observed[0].facts = Some(leading("r1", 2, 5_000, &["r2", "r3"]));
    observed[2] = alive("r3", 5_000 - JOIN_LAG - 1, 2, 0);
    assert!(installs(&reconcile(&spec, &mut record, &observed, true, 10)).is_empty(), "still catching up");
    observed[2].facts = Some(facts("r3", 2, 4_990, 0));
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 20)).pop().expect("r3 added");
    assert_eq!((config.epoch, member_ids(&config)), (3, vec!["r1", "r2", "r3"]));
    assert_eq!(record.joined_epoch["r3"], 3);
}

/// Seen in CI: a primary replaced for being cut off from its backups looked caught up
/// (same log, same epoch), was added back at once, found unreachable, removed, and so on
/// for as long as the cut lasted, stalling writes each round.
#[test]
fn a_replica_the_leader_does_not_hear_is_not_added_however_caught_up_it_looks() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[0].facts.as_mut().expect("facts").follower_silence =
        vec![("r2".into(), 5_000), ("r3".into(), 5_000)];
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 100)).pop().expect("r1 replaced");
    assert!(!member_ids(&config).contains(&"r1"));
    let leader = config.primary.clone();
    let follower = if leader == "r2" { "r3" } else { "r2" };
    let index = |id: &str| observed.iter().position(|o| o.id == id).expect("observed");
    let (l, f) = (index(&leader), index(follower));
    observed[l].facts = Some(leading(&leader, 2, 10, &[follower]));
    observed[f].facts = Some(facts(follower, 2, 10, 2));
    observed[0].facts = Some(facts("r1", 2, 10, 1));
    for now in [200, 1_000, 5_000] {
        assert!(
            installs(&reconcile(&spec, &mut record, &observed, true, now)).is_empty(),
            "r1 added while cut off"
        );
    }
    // The cut heals: the leader feeds r1 as a learner, and then it is added.
    observed[l].facts = Some(leading(&leader, 2, 10, &[follower, "r1"]));
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 6_000)).pop().expect("r1 back");
    assert_eq!(member_ids(&config), vec!["r1", "r2", "r3"]);
}

#[test]
fn scaling_down_removes_the_highest_backups_then_stops_and_forgets_them() {
    let mut spec = Spec { replicas: 5, ..Spec::default() };
    let mut record = Record::default();
    let mut observed: Vec<Observed> = (1..=5).map(|n| alive(&replica_id(n), 0, 0, 0)).collect();
    reconcile(&spec, &mut record, &observed, true, 0);
    for o in &mut observed {
        o.facts = Some(facts(&o.id, 1, 10, 1));
    }
    spec.replicas = 3;
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 10)).pop().expect("shrink");
    assert_eq!(member_ids(&config), vec!["r1", "r2", "r3"]);
    let stops: Vec<String> = reconcile(&spec, &mut record, &observed, true, 20)
        .into_iter()
        .filter_map(|a| if let Action::Stop { id, .. } = a { Some(id) } else { None })
        .collect();
    assert_eq!(stops, vec!["r5", "r4"]);
    for o in &mut observed[3..] {
        o.instance = Instance::Gone;
    }
    let actions = reconcile(&spec, &mut record, &observed, true, 30);
    assert_eq!(actions, vec![Action::Forget { id: "r4".into() }, Action::Forget { id: "r5".into() }]);
}

#[test]
fn switching_mode_keeps_members_and_primary() {
    let mut spec = Spec::default();
    let (mut record, observed) = booted(&spec);
    spec.mode = Mode::Active;
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 10)).pop().expect("mode switch");
    assert_eq!((config.mode(), config.primary.as_str(), config.epoch), (Mode::Active, "r1", 2));
    assert!(
        installs(&reconcile(&spec, &mut record, &observed, true, 20)).is_empty(),
        "steady after the switch"
    );
}

#[test]
fn a_record_without_incarnations_adopts_the_members_that_serve() {
    let spec = Spec::default();
    let (mut record, observed) = booted(&spec);
    record.incarnations.clear();
    assert!(reconcile(&spec, &mut record, &observed, true, 10).is_empty());
    assert_eq!(record.incarnations.len(), 3);
}

#[test]
fn nonsensical_specs_are_explained() {
    let spec =
        Spec { replicas: 0, checkpoint_interval_ms: 10, heartbeat_interval_ms: 100, ..Spec::default() };
    assert_eq!(spec.problems().len(), 3, "{:?}", spec.problems());
    let spec = Spec { replicas: 100, heartbeat_interval_ms: 5, ..Spec::default() };
    let problems = spec.problems().join("; ");
    assert!(problems.contains("1..9") && problems.contains("20..60000"), "{problems}");
    let spec = Spec { checkpoint_interval_ms: u64::MAX, ..Spec::default() };
    assert!(spec.problems().join("; ").contains("50..3600000"), "{:?}", spec.problems());
    assert!(Spec::default().problems().is_empty());
}

// ---------------------------------------------------------------- simulated world

#[derive(Debug, Clone)]
struct World {
    spec: Spec,
    record: Record,
    instances: BTreeMap<String, Observed>,
    starts: u64,
    now: u64,
    /// A follower the leader cannot reach, and until when.
    cut: Option<(String, u64)>,
    /// A durable world: what each replica id holds on its disk (its facts as last
    /// written), which a restart of that id recovers.
    disks: Option<BTreeMap<String, Facts>>,
}

impl World {
    /// Whether, without `id`, a member that may lead survives. The design promises
    /// nothing when a fault takes the last one, so the generated faults never do.
    fn survivable_without(&self, id: &str) -> bool {
        let Some(config) = &self.record.config else { return false };
        config.members.iter().filter(|m| m.id != id).any(|m| {
            let o = &self.instances[&m.id];
            o.instance == Instance::Running && safe_to_lead(&self.record, o)
        })
    }

    fn observed(&self) -> Vec<Observed> {
        let mut observed: Vec<Observed> = self.instances.values().cloned().collect();
        // The leader hears every running follower with a state, but the one cut off.
        let Some(config) = &self.record.config else { return observed };
        let cut = self.cut.as_ref().filter(|(_, until)| self.now < *until).map(|(id, _)| id.clone());
        let heard: Vec<(String, u64)> = observed
            .iter()
            .filter(|o| o.id != config.primary && o.instance == Instance::Running)
            .filter(|o| o.facts.as_ref().is_some_and(|f| f.has_state))
            .map(|o| (o.id.clone(), if Some(&o.id) == cut.as_ref() { 10_000 } else { 10 }))
            .collect();
        if let Some(leader) = observed.iter_mut().find(|o| o.id == config.primary)
            && let Some(facts) = leader.facts.as_mut()
        {
            facts.follower_silence = heard;
        }
        observed
    }

    /// Runs the RM once and applies its actions the way a platform would.
    fn step(&mut self) {
        let observed = self.observed();
        let before = self.record.config.clone();
        let actions = reconcile(&self.spec, &mut self.record, &observed, true, self.now);
        for action in actions {
            match action {
                Action::Install { config, .. } => {
                    // Invariants of every new configuration.
                    let previous_epoch = before.as_ref().map_or(0, |c| c.epoch);
                    assert_eq!(config.epoch, previous_epoch + 1, "epochs grow by one");
                    assert!(config.members.iter().any(|m| m.id == config.primary), "primary is a member");
                    for member in &config.members {
                        let o = &self.instances[&member.id];
                        assert!(
                            o.facts.as_ref().is_some_and(|f| f.has_state),
                            "a member without state: {member:?} {o:?}"
                        );
                    }
                    let primary = &self.instances[&config.primary];
                    let changed_primary = before.as_ref().is_some_and(|b| b.primary != config.primary);
                    if changed_primary {
                        assert!(
                            matches!(primary.liveness, Liveness::Alive { ready: true })
                                && primary.instance == Instance::Running,
                            "a dead replica was made primary: {primary:?}"
                        );
                        let joined = before
                            .as_ref()
                            .and_then(|_| self.record.joined_epoch.get(&config.primary))
                            .copied();
                        let synced = primary.facts.as_ref().map_or(0, |f| f.synced_epoch);
                        assert!(joined.is_some_and(|j| synced >= j), "an unsynced replica was promoted");
                    }
                    // The platform pushes it; running replicas adopt it, members sync.
                    for o in self.instances.values_mut() {
                        if o.instance == Instance::Running
                            && matches!(o.liveness, Liveness::Alive { .. })
                            && let Some(facts) = o.facts.as_mut()
                        {
                            facts.epoch = config.epoch;
                            if config.members.iter().any(|m| m.id == o.id) {
                                facts.synced_epoch = config.epoch;
                            }
                        }
                    }
                }
                Action::Start { id, bootstrap, .. } => {
                    self.starts += 1;
                    let address = format!("{id}:1");
                    let incarnation = format!("{id}#{}", self.starts);
                    let on_disk = self.disks.as_ref().and_then(|disks| disks.get(&id)).cloned();
                    let facts = match on_disk {
                        // Recovered from its disk: its data, its data id, a new process.
                        Some(disk) => Facts { incarnation, follower_silence: Vec::new(), ..disk },
                        None => Facts {
                            has_state: bootstrap,
                            incarnation,
                            data_id: if self.disks.is_some() { format!("{id}-disk") } else { String::new() },
                            ..Facts::default()
                        },
                    };
                    self.instances.insert(
                        id.clone(),
                        Observed {
                            id,
                            address,
                            instance: Instance::Running,
                            liveness: Liveness::Alive { ready: false },
                            facts: Some(facts),
                        },
                    );
                }
                Action::Stop { id, .. } => {
                    if let Some(o) = self.instances.get_mut(&id) {
                        o.instance = Instance::Gone;
                        o.liveness = Liveness::Failed;
                    }
                }
                Action::Forget { id } => {
                    self.instances.remove(&id);
                }
            }
        }
        // Started replicas catch up from a live leader and turn ready; logs grow.
        let config = self.record.config.clone();
        let leader_serves = config.as_ref().is_some_and(|c| {
            self.instances.get(&c.primary).is_some_and(|o| {
                o.instance == Instance::Running && o.facts.as_ref().is_some_and(|f| f.has_state)
            })
        });
        let epoch = config.as_ref().map_or(0, |c| c.epoch);
        for o in self.instances.values_mut() {
            if o.instance == Instance::Running
                && matches!(o.liveness, Liveness::Alive { .. })
                && let Some(facts) = o.facts.as_mut()
            {
                facts.has_state |= leader_serves;
                if facts.has_state {
                    o.liveness = Liveness::Alive { ready: true };
                    facts.epoch = epoch;
                    facts.last_seq += 1;
                }
            }
        }
        // What the running replicas hold is on their disks.
        if let Some(disks) = self.disks.as_mut() {
            for o in self.instances.values().filter(|o| o.instance == Instance::Running) {
                if let Some(facts) = o.facts.as_ref().filter(|f| f.has_state) {
                    disks.insert(o.id.clone(), facts.clone());
                }
            }
        }
        self.now += 50;
    }
}

#[derive(Debug, Clone)]
enum Fault {
    Crash(u8),
    RestartInPlace(u8),
    Hang(u8),
    Resume(u8),
    LoseDetector(u8),
    Cut(u8),
    Scale(u8),
    SwitchMode,
    Wait(u16),
    /// Every instance at once (a durable world only).
    CrashAll,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any::<u8>().prop_map(Fault::Crash),
        any::<u8>().prop_map(Fault::RestartInPlace),
        any::<u8>().prop_map(Fault::Hang),
        any::<u8>().prop_map(Fault::Resume),
        any::<u8>().prop_map(Fault::LoseDetector),
        any::<u8>().prop_map(Fault::Cut),
        (1u8..6).prop_map(Fault::Scale),
        Just(Fault::SwitchMode),
        any::<u16>().prop_map(Fault::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever happens: epochs grow one by one, every member holds a state, the primary
    /// is always a live, safe member; and once the faults stop, the group returns to the
    /// desired size with every member alive and ready.
    #[test]
    fn the_group_heals_to_the_desired_size_and_never_promotes_the_dead(faults in prop::collection::vec(fault(), 0..40)) {
        // Instances restart empty here.
        let spec = Spec { durability: Durability::Memory, ..Spec::default() };
        heals(World { spec, record: Record::default(), instances: BTreeMap::new(), starts: 0, now: 0, cut: None, disks: None }, faults)?;
    }

    /// The same with data on disk, and faults no memory group survives: every instance
    /// crashing at once, the last safe member crashing. A restarted instance recovers its
    /// data; the group always comes back whole.
    #[test]
    fn a_durable_group_heals_from_any_crash_even_of_every_instance(
        faults in prop::collection::vec(prop_oneof![fault(), Just(Fault::CrashAll)], 0..40)
    ) {
        let world = World {
            spec: Spec::default(), record: Record::default(), instances: BTreeMap::new(), starts: 0, now: 0, cut: None,
            disks: Some(BTreeMap::new()),
        };
        heals(world, faults)?;
    }
}

fn heals(mut world: World, faults: Vec<Fault>) -> Result<(), TestCaseError> {
    let durable = world.disks.is_some();
    {
        for _ in 0..5 {
            world.step();
        }
        for fault in faults {
            let pick = |world: &World, n: u8| {
                let ids: Vec<String> = world.instances.keys().cloned().collect();
                ids[n as usize % ids.len()].clone()
            };
            match fault {
                // Crashes and restarts lose nothing with disks; the others (a hang, a lost
                // detector, a cut) may take the last safe member out of reach for long.
                Fault::Crash(n) | Fault::RestartInPlace(n) if durable && !world.instances.is_empty() => {
                    let _ = n;
                    match fault {
                        Fault::Crash(n) => {
                            let o = world.instances.get_mut(&pick(&world, n)).expect("instance");
                            o.instance = Instance::Gone;
                            o.liveness = Liveness::Failed;
                        }
                        Fault::RestartInPlace(n) => {
                            let id = pick(&world, n);
                            world.starts += 1;
                            let incarnation = format!("{id}#{}", world.starts);
                            let disk = world.disks.as_ref().and_then(|d| d.get(&id)).cloned();
                            let o = world.instances.get_mut(&id).expect("instance");
                            if o.instance == Instance::Running {
                                o.liveness = Liveness::Alive { ready: false };
                                o.facts = Some(match disk {
                                    Some(disk) => Facts { incarnation, follower_silence: Vec::new(), ..disk },
                                    None => Facts { incarnation, ..Facts::default() },
                                });
                            }
                        }
                        _ => unreachable!(),
                    }
                }
                Fault::CrashAll => {
                    for o in world.instances.values_mut() {
                        o.instance = Instance::Gone;
                        o.liveness = Liveness::Failed;
                    }
                }
                Fault::Crash(n)
                | Fault::RestartInPlace(n)
                | Fault::Hang(n)
                | Fault::LoseDetector(n)
                | Fault::Cut(n)
                    if !world.survivable_without(&pick(&world, n)) => {}
                Fault::Crash(n) => {
                    let o = world.instances.get_mut(&pick(&world, n)).expect("instance");
                    o.instance = Instance::Gone;
                    o.liveness = Liveness::Failed;
                }
                Fault::RestartInPlace(n) => {
                    let id = pick(&world, n);
                    world.starts += 1;
                    let incarnation = format!("{id}#{}", world.starts);
                    let o = world.instances.get_mut(&id).expect("instance");
                    if o.instance == Instance::Running {
                        o.liveness = Liveness::Alive { ready: false };
                        o.facts = Some(Facts { incarnation, ..Facts::default() });
                    }
                }
                Fault::Hang(n) => {
                    world.instances.get_mut(&pick(&world, n)).expect("instance").liveness = Liveness::Failed
                }
                Fault::Resume(n) => {
                    let o = world.instances.get_mut(&pick(&world, n)).expect("instance");
                    if o.instance == Instance::Running {
                        o.liveness = Liveness::Alive { ready: true };
                    }
                }
                Fault::LoseDetector(n) => {
                    let now = world.now;
                    let o = world.instances.get_mut(&pick(&world, n)).expect("instance");
                    if matches!(o.liveness, Liveness::Alive { .. }) {
                        o.liveness = Liveness::DetectorLost { since: now };
                    }
                }
                Fault::Cut(n) => world.cut = Some((pick(&world, n), world.now + 3_000)),
                Fault::Scale(n) => world.spec.replicas = u32::from(n),
                Fault::SwitchMode => {
                    world.spec.mode =
                        if world.spec.mode == Mode::Passive { Mode::Active } else { Mode::Passive };
                }
                Fault::Wait(ms) => world.now += u64::from(ms),
            }
            world.step();
        }
        // Faults stop: hung replicas come back (or get replaced), detectors reconnect,
        // links heal.
        world.cut = None;
        for o in world.instances.values_mut() {
            if o.instance == Instance::Running {
                o.liveness = Liveness::Alive { ready: o.facts.as_ref().is_some_and(|f| f.has_state) };
            }
        }
        for _ in 0..2_000 {
            world.step();
        }
        let config = world.record.config.clone().expect("configured");
        prop_assert_eq!(
            config.members.len(),
            world.spec.replicas as usize,
            "members: {:?}",
            member_ids(&config)
        );
        for member in &config.members {
            let o = &world.instances[&member.id];
            prop_assert_eq!(o.instance, Instance::Running);
            prop_assert_eq!(o.liveness, Liveness::Alive { ready: true });
        }
        let running = world.instances.values().filter(|o| o.instance == Instance::Running).count();
        prop_assert_eq!(running, world.spec.replicas as usize);
        prop_assert_eq!(config.mode(), world.spec.mode);
        prop_assert_eq!(world.record.trouble.clone(), None);
    }
    Ok(())
}

// ---------------------------------------------------------------- durable groups

/// A replica with data on disk: its data id is the same for every start of it.
fn on_disk(mut o: Observed) -> Observed {
    if let Some(facts) = o.facts.as_mut() {
        facts.data_id = format!("{}-disk", o.id);
    }
    o
}

/// The same replica id, a new process that recovered its data from disk.
fn back_from_disk(id: &str, last_seq: u64, epoch: u64, synced_epoch: u64) -> Observed {
    let mut o = on_disk(alive(id, last_seq, epoch, synced_epoch));
    if let Some(facts) = o.facts.as_mut() {
        facts.incarnation = format!("{id}#2");
    }
    o
}

/// A durable group bootstrapped as r1..r3, epoch 1, primary r1.
fn booted_on_disk(spec: &Spec) -> (Record, Vec<Observed>) {
    let mut record = Record::default();
    let observed: Vec<Observed> = ["r1", "r2", "r3"].iter().map(|id| on_disk(alive(id, 0, 0, 0))).collect();
    assert_eq!(installs(&reconcile(spec, &mut record, &observed, true, 0)).len(), 1);
    let observed = observed.into_iter().map(|o| on_disk(alive(&o.id, 10, 1, 1))).collect();
    (record, observed)
}

/// Issue 10: every process of a durable group killed at once. The RM restarts every
/// member under its id (so on its disk), waits for all of them, and resumes with the
/// longest log among those that synced: never an empty group, never a shorter log.
#[test]
fn a_durable_group_whose_every_member_stopped_resumes_from_their_disks() {
    let spec = Spec::default();
    assert_eq!(spec.durability, Durability::Fsync, "durable by default");
    let (mut record, observed) = booted_on_disk(&spec);
    assert_eq!(record.data_ids.get("r2").map(String::as_str), Some("r2-disk"));
    let gone: Vec<Observed> =
        observed.iter().map(|o| with(o.clone(), Liveness::Unknown, Instance::Gone)).collect();
    let actions = reconcile(&spec, &mut record, &gone, true, 1_000);
    assert!(installs(&actions).is_empty(), "{actions:?}");
    let mut started: Vec<String> = starts(&actions).into_iter().map(|(id, _)| id).collect();
    started.sort();
    assert_eq!(started, vec!["r1", "r2", "r3"], "restarted under their ids, so on their disks");
    assert_eq!(record.trouble.as_ref().map(Trouble::reason), Some("Recovering"));

    // r2 (one entry short: cut tail) and r3 are back; r1 (longest log) not yet: wait.
    // r1's new process runs but has not answered yet: it has proven nothing.
    let starting = Observed { facts: None, ..with(gone[0].clone(), Liveness::Unknown, Instance::Running) };
    let partly = vec![starting, back_from_disk("r2", 9, 1, 1), back_from_disk("r3", 10, 1, 1)];
    for now in [2_000, 30_000] {
        assert!(installs(&reconcile(&spec, &mut record, &partly, true, now)).is_empty());
        let Some(Trouble::Recovering { waiting, back, .. }) = &record.trouble else {
            panic!("{:?}", record.trouble)
        };
        assert_eq!(
            (waiting.as_slice(), back.as_slice()),
            (&["r1".to_owned()][..], &["r2".to_owned(), "r3".to_owned()][..])
        );
    }
    // All back: r1 has the longest log and synced, so it leads epoch 2; all stay members,
    // joined anew (each must sync with r1 before it may be promoted).
    let all =
        vec![back_from_disk("r1", 11, 1, 1), back_from_disk("r2", 9, 1, 1), back_from_disk("r3", 10, 1, 1)];
    let actions = reconcile(&spec, &mut record, &all, true, 31_000);
    let config = installs(&actions).pop().expect("resumed");
    assert_eq!(
        (config.epoch, config.primary.as_str(), member_ids(&config)),
        (2, "r1", vec!["r1", "r2", "r3"])
    );
    let Some(Action::Install { reason, .. }) = actions.iter().find(|a| matches!(a, Action::Install { .. }))
    else {
        unreachable!()
    };
    assert_eq!(reason.recovered, vec!["r1", "r2", "r3"]);
    // The leader keeps its join epoch (its log is the next epoch's); the others must sync
    // with it again before they may be promoted.
    assert_eq!(record.joined_epoch.get("r1"), Some(&1));
    assert_eq!((record.joined_epoch.get("r2"), record.joined_epoch.get("r3")), (Some(&2), Some(&2)));
    assert_eq!(record.incarnations.get("r3").map(String::as_str), Some("r3#2"));
    assert_eq!(record.trouble, None);
    // The replicas take epoch 2 and sync: nothing more to change.
    let synced: Vec<Observed> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| {
            let mut o = back_from_disk(id, 11, 2, 2);
            o.facts.as_mut().expect("facts").follower_silence =
                if *id == "r1" { vec![("r2".into(), 10), ("r3".into(), 10)] } else { Vec::new() };
            o
        })
        .collect();
    assert!(reconcile(&spec, &mut record, &synced, true, 32_000).is_empty());
    assert!(whole(&spec, &record, &synced, true));
}

/// One member never comes back (its node is gone): after the patience, the group
/// resumes with those that did; a member back without its data (a new disk) is not
/// waited for and does not count.
#[test]
fn a_durable_group_resumes_without_a_member_that_does_not_come_back() {
    let spec = Spec::default();
    let (mut record, observed) = booted_on_disk(&spec);
    let gone: Vec<Observed> =
        observed.iter().map(|o| with(o.clone(), Liveness::Unknown, Instance::Gone)).collect();
    reconcile(&spec, &mut record, &gone, true, 1_000);
    let mut wiped = restarted("r3", 0);
    wiped.facts.as_mut().expect("facts").data_id = "r3-new-disk".into();
    let some = vec![gone[0].clone(), back_from_disk("r2", 10, 1, 1), wiped.clone()];
    assert!(installs(&reconcile(&spec, &mut record, &some, true, 2_000)).is_empty());
    let Some(Trouble::Recovering { waiting, .. }) = &record.trouble else { panic!("{:?}", record.trouble) };
    assert_eq!(waiting, &vec!["r1".to_owned()], "r3 came back without its data: not waited for");
    let actions = reconcile(&spec, &mut record, &some, true, 1_000 + RECOVERY_PATIENCE_MS);
    let config = installs(&actions).pop().expect("resumed after the patience");
    assert_eq!((config.primary.as_str(), member_ids(&config)), ("r2", vec!["r2"]));
}

/// A durable primary restarted in place (same disk) while its backups run: it fails
/// over like any restart (it may have lost what it had not yet written), and comes back
/// as a joiner with its data rather than from nothing.
#[test]
fn a_primary_restarted_from_its_disk_fails_over_and_rejoins() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted_on_disk(&spec);
    observed[0] = back_from_disk("r1", 8, 1, 1);
    let actions = reconcile(&spec, &mut record, &observed, true, 1_000);
    let config = installs(&actions).pop().expect("failover");
    assert_eq!((config.primary.as_str(), member_ids(&config)), ("r2", vec!["r2", "r3"]));
    let Some(Action::Install { reason, .. }) = actions.first() else { panic!("{actions:?}") };
    assert_eq!(reason.failed, vec![("r1".to_owned(), Failure::RestartedFromDisk)]);
    assert!(!Failure::RestartedFromDisk.state_gone(true));
}

/// Issue 10 on Kubernetes: every pod of a durable group deleted at once. Their
/// replacements must come under the same ids (their volumes hold the data), however
/// long the old pods take to terminate: a new id would start empty, and leave the
/// members' data unclaimed.
#[test]
fn a_durable_group_waits_for_its_terminating_members_and_restarts_them_under_their_ids() {
    let spec = Spec::default();
    let (mut record, observed) = booted_on_disk(&spec);
    let terminating: Vec<Observed> =
        observed.iter().map(|o| with(o.clone(), Liveness::Failed, Instance::Terminating)).collect();
    for now in [1_000, 1_000 + spec.terminating_patience_ms(), 60_000] {
        let actions = reconcile(&spec, &mut record, &terminating, true, now);
        assert!(starts(&actions).is_empty(), "no new ids while the members terminate: {actions:?}");
        assert_eq!(record.trouble.as_ref().map(Trouble::reason), Some("Recovering"));
    }
    let gone: Vec<Observed> =
        observed.iter().map(|o| with(o.clone(), Liveness::Unknown, Instance::Gone)).collect();
    let actions = reconcile(&spec, &mut record, &gone, true, 61_000);
    let mut started: Vec<String> = starts(&actions).into_iter().map(|(id, _)| id).collect();
    started.sort();
    assert_eq!(started, vec!["r1", "r2", "r3"]);
}
