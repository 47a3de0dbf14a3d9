//! The RM's decisions, tested without any I/O: scenarios first, then a simulated world
//! of instances that crash, hang, lose their detector and come back, driven by proptest.

use super::*;
use proptest::prelude::*;

fn alive(id: &str, last_seq: u64, epoch: u64, synced_epoch: u64) -> Observed {
    Observed {
        id: id.into(),
        address: format!("{id}:1"),
        instance: Instance::Running,
        liveness: Liveness::Alive { ready: true },
        facts: Some(Facts { epoch, last_seq, synced_epoch }),
    }
}

fn with(mut o: Observed, liveness: Liveness, instance: Instance) -> Observed {
    o.liveness = liveness;
    o.instance = instance;
    o
}

fn installs(actions: &[Action]) -> Vec<pb::Configuration> {
    actions
        .iter()
        .filter_map(|a| if let Action::Install { config, .. } = a { Some(config.clone()) } else { None })
        .collect()
}

fn member_ids(config: &pb::Configuration) -> Vec<&str> {
    config.members.iter().map(|m| m.id.as_str()).collect()
}

/// A record as after bootstrapping r1..r3 (epoch 1, primary r1).
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
}

#[test]
fn failed_primary_is_replaced_by_the_safe_survivor_with_the_longest_log() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Running);
    observed[1].facts = Some(Facts { epoch: 1, last_seq: 40, synced_epoch: 1 });
    observed[2].facts = Some(Facts { epoch: 1, last_seq: 42, synced_epoch: 1 });
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    let config = installs(&actions).pop().expect("a failover");
    assert_eq!((config.epoch, config.primary.as_str(), member_ids(&config)), (2, "r3", vec!["r2", "r3"]));
    assert_eq!(record.failovers, 1);
    let Some(Action::Install { reason, .. }) = actions.first() else { panic!("{actions:?}") };
    assert!(reason.contains("r1 failed") && reason.contains("r3 promoted"), "{reason}");
}

#[test]
fn a_survivor_that_never_synced_since_joining_is_not_promoted() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    // r3 rejoined at epoch 2 but has not synced yet; r2 is gone too.
    record.config = Some(pb::Configuration { epoch: 2, ..record.config.clone().expect("config") });
    record.joined_epoch.insert("r3".into(), 2);
    observed[0] = with(observed[0].clone(), Liveness::Failed, Instance::Gone);
    observed[1] = with(observed[1].clone(), Liveness::Failed, Instance::Gone);
    observed[2].facts = Some(Facts { epoch: 2, last_seq: 99, synced_epoch: 1 });
    let actions = reconcile(&spec, &mut record, &observed, true, 100);
    assert!(installs(&actions).is_empty(), "{actions:?}");
    assert!(
        actions.iter().any(|a| matches!(a, Action::Warn(w) if w.contains("no surviving member"))),
        "{actions:?}"
    );
    assert_eq!(record.config.as_ref().map(|c| c.epoch), Some(2));
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
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 1_000 + DETECTOR_GRACE_MS))
        .pop()
        .expect("removal");
    assert_eq!((config.primary.as_str(), member_ids(&config)), ("r1", vec!["r1", "r3"]));
}

#[test]
fn a_gone_instance_is_restarted_with_growing_back_off_and_then_given_up() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[2] = with(observed[2].clone(), Liveness::Failed, Instance::Gone);
    let mut starts = Vec::new();
    for now in (0..200_000).step_by(50) {
        for action in reconcile(&spec, &mut record, &observed, true, now) {
            if let Action::Start { id, attempt, bootstrap } = action {
                assert!(!bootstrap, "a replacement joins, it never bootstraps");
                assert_eq!(id, "r3");
                starts.push((now, attempt));
            }
        }
    }
    assert_eq!(starts.len(), MAX_RESTARTS as usize, "{starts:?}");
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "back-off never shrinks: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= RESTART_BACKOFF_MAX_MS + 50), "{gaps:?}");
}

#[test]
fn a_ready_caught_up_joiner_is_added_and_a_lagging_one_waits() {
    let spec = Spec::default();
    let (mut record, mut observed) = booted(&spec);
    observed[2] = with(observed[2].clone(), Liveness::Failed, Instance::Gone);
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 0)).pop().expect("r3 removed");
    assert_eq!(member_ids(&config), vec!["r1", "r2"]);
    observed[0].facts = Some(Facts { epoch: 2, last_seq: 5_000, synced_epoch: 2 });
    observed[2] = alive("r3", 5_000 - JOIN_LAG - 1, 2, 0);
    assert!(installs(&reconcile(&spec, &mut record, &observed, true, 10)).is_empty(), "still catching up");
    observed[2].facts = Some(Facts { epoch: 2, last_seq: 4_990, synced_epoch: 0 });
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 20)).pop().expect("r3 added");
    assert_eq!((config.epoch, member_ids(&config)), (3, vec!["r1", "r2", "r3"]));
    assert_eq!(record.joined_epoch["r3"], 3);
}

#[test]
fn scaling_down_removes_the_highest_backups_then_stops_them() {
    let mut spec = Spec { replicas: 5, ..Spec::default() };
    let mut record = Record::default();
    let mut observed: Vec<Observed> = (1..=5).map(|n| alive(&replica_id(n), 0, 0, 0)).collect();
    reconcile(&spec, &mut record, &observed, true, 0);
    for o in &mut observed {
        o.facts = Some(Facts { epoch: 1, last_seq: 10, synced_epoch: 1 });
    }
    spec.replicas = 3;
    let config = installs(&reconcile(&spec, &mut record, &observed, true, 10)).pop().expect("shrink");
    assert_eq!(member_ids(&config), vec!["r1", "r2", "r3"]);
    let stops: Vec<String> = reconcile(&spec, &mut record, &observed, true, 20)
        .into_iter()
        .filter_map(|a| if let Action::Stop { id, .. } = a { Some(id) } else { None })
        .collect();
    assert_eq!(stops, vec!["r5", "r4"]);
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
fn nonsensical_specs_are_explained() {
    let spec =
        Spec { replicas: 0, checkpoint_interval_ms: 10, heartbeat_interval_ms: 100, ..Spec::default() };
    let problems = spec.problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(Spec::default().problems().is_empty());
}

// ---------------------------------------------------------------- simulated world

#[derive(Debug, Clone)]
struct World {
    spec: Spec,
    record: Record,
    instances: BTreeMap<String, Observed>,
    now: u64,
    installed: Vec<pb::Configuration>,
}

impl World {
    /// Whether, without `id`, a member that may lead survives. The design promises
    /// nothing when a fault takes the last one, so the generated faults never do.
    fn survivable_without(&self, id: &str) -> bool {
        let Some(config) = &self.record.config else { return false };
        config.members.iter().filter(|m| m.id != id).any(|m| {
            let o = &self.instances[&m.id];
            let joined = self.record.joined_epoch.get(&m.id).copied().unwrap_or(u64::MAX);
            o.instance == Instance::Running
                && matches!(o.liveness, Liveness::Alive { ready: true })
                && o.facts.is_some_and(|f| f.synced_epoch >= joined)
        })
    }

    fn observed(&self) -> Vec<Observed> {
        self.instances.values().cloned().collect()
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
                        let synced = primary.facts.map_or(0, |f| f.synced_epoch);
                        assert!(joined.is_some_and(|j| synced >= j), "an unsynced replica was promoted");
                    }
                    self.installed.push(config.clone());
                    // The platform pushes it; running replicas adopt it, members sync.
                    for o in self.instances.values_mut() {
                        if o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { .. }) {
                            let member = config.members.iter().any(|m| m.id == o.id);
                            let facts = o.facts.get_or_insert_with(Facts::default);
                            facts.epoch = config.epoch;
                            if member {
                                facts.synced_epoch = config.epoch;
                            }
                        }
                    }
                }
                Action::Start { id, .. } => {
                    let address = format!("{id}:1");
                    self.instances.insert(
                        id.clone(),
                        Observed {
                            id,
                            address,
                            instance: Instance::Running,
                            liveness: Liveness::Alive { ready: false },
                            facts: None,
                        },
                    );
                }
                Action::Stop { id, .. } => {
                    if let Some(o) = self.instances.get_mut(&id) {
                        o.instance = Instance::Gone;
                        o.liveness = Liveness::Failed;
                    }
                }
                Action::Warn(_) => {}
            }
        }
        // Started replicas catch up and turn ready; logs grow.
        let epoch = self.record.config.as_ref().map_or(0, |c| c.epoch);
        for o in self.instances.values_mut() {
            if o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { .. }) {
                o.liveness = Liveness::Alive { ready: true };
                let facts = o.facts.get_or_insert_with(Facts::default);
                facts.epoch = epoch;
                facts.last_seq += 1;
            }
        }
        self.now += 50;
    }
}

#[derive(Debug, Clone)]
enum Fault {
    Crash(u8),
    Hang(u8),
    Resume(u8),
    LoseDetector(u8),
    Scale(u8),
    SwitchMode,
    Wait(u16),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any::<u8>().prop_map(Fault::Crash),
        any::<u8>().prop_map(Fault::Hang),
        any::<u8>().prop_map(Fault::Resume),
        any::<u8>().prop_map(Fault::LoseDetector),
        (1u8..6).prop_map(Fault::Scale),
        Just(Fault::SwitchMode),
        any::<u16>().prop_map(Fault::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever happens: epochs grow one by one, the primary is always a live, safe
    /// member; and once the faults stop, the group returns to the desired size with
    /// every member alive.
    #[test]
    fn the_group_heals_to_the_desired_size_and_never_promotes_the_dead(faults in prop::collection::vec(fault(), 0..40)) {
        let mut world = World { spec: Spec::default(), record: Record::default(), instances: BTreeMap::new(), now: 0, installed: Vec::new() };
        for _ in 0..5 {
            world.step();
        }
        for fault in faults {
            let pick = |world: &World, n: u8| {
                let ids: Vec<String> = world.instances.keys().cloned().collect();
                ids[n as usize % ids.len()].clone()
            };
            match fault {
                Fault::Crash(n) => {
                    let id = pick(&world, n);
                    if !world.survivable_without(&id) {
                        continue;
                    }
                    let o = world.instances.get_mut(&id).expect("instance");
                    o.instance = Instance::Gone;
                    o.liveness = Liveness::Failed;
                }
                Fault::Hang(n) => {
                    let id = pick(&world, n);
                    if !world.survivable_without(&id) {
                        continue;
                    }
                    world.instances.get_mut(&id).expect("instance").liveness = Liveness::Failed;
                }
                Fault::Resume(n) => {
                    let id = pick(&world, n);
                    let o = world.instances.get_mut(&id).expect("instance");
                    if o.instance == Instance::Running {
                        o.liveness = Liveness::Alive { ready: true };
                    }
                }
                Fault::LoseDetector(n) => {
                    let id = pick(&world, n);
                    if !world.survivable_without(&id) {
                        continue;
                    }
                    let now = world.now;
                    let o = world.instances.get_mut(&id).expect("instance");
                    if matches!(o.liveness, Liveness::Alive { .. }) {
                        o.liveness = Liveness::DetectorLost { since: now };
                    }
                }
                Fault::Scale(n) => world.spec.replicas = u32::from(n),
                Fault::SwitchMode => {
                    world.spec.mode = if world.spec.mode == Mode::Passive { Mode::Active } else { Mode::Passive };
                }
                Fault::Wait(ms) => world.now += u64::from(ms),
            }
            world.step();
        }
        // Faults stop: hung replicas come back (or get replaced), detectors reconnect.
        for o in world.instances.values_mut() {
            if o.instance == Instance::Running {
                o.liveness = Liveness::Alive { ready: true };
            }
        }
        for _ in 0..2_000 {
            world.step();
        }
        let config = world.record.config.clone().expect("configured");
        prop_assert_eq!(config.members.len(), world.spec.replicas as usize, "members: {:?}", member_ids(&config));
        for member in &config.members {
            prop_assert_eq!(world.instances[&member.id].instance, Instance::Running);
        }
        let running = world.instances.values().filter(|o| o.instance == Instance::Running).count();
        prop_assert_eq!(running, world.spec.replicas as usize);
        prop_assert_eq!(config.mode(), world.spec.mode);
    }
}
