//! The Replication Manager's decisions, as a pure function of what it wants (the spec),
//! what it recorded (the configuration and its bookkeeping) and what it observes (each
//! replica instance: process or pod, the GFD's membership, the replica's own status).
//! It returns actions: install a new configuration, start or stop an instance. The
//! platform adapters (local processes, Kubernetes pods) observe and act; they decide
//! nothing.
//!
//! The rules that keep acknowledged writes safe:
//! - every new configuration has the next epoch and exactly one primary among its
//!   members;
//! - a member is the instance that joined: a restarted instance (a new incarnation) is
//!   a new replica with none of the member's state, and must join through a checkpoint
//!   before it counts;
//! - a failed primary is replaced only by a *safe* survivor: a member that synced with
//!   its leader during its current membership (`synced_epoch >= joined_epoch`), so it
//!   holds every committed entry; among those, the longest log wins;
//! - with no safe survivor the RM waits rather than promote a replica that may lack
//!   acknowledged writes, and says so (`Trouble`).
//!
//! The rules that bring the group back to full strength (DESIGN.md invariant 5):
//! - failures are counted per instance that failed, never per reconciliation; restarts
//!   back off up to a cap and never stop; a replica that became ready starts afresh;
//! - an instance that is being stopped (a pod terminating) is waited for a while, then
//!   replaced under a new id rather than waited for forever;
//! - a member that cannot be replicated to, or a leader that can replicate to none of
//!   its followers, is failed like a dead one, so a partition is not an outage;
//! - a replica whose detector comes back, or that resumes from a pause, rejoins.

use std::collections::BTreeMap;
use std::fmt;

use tandem_replica::detector::limits;
use tandem_replica::pb::{self, Mode};
pub use tandem_replica::storage::Durability;

/// How long a replica whose LFD vanished may stay silent before it counts as failed
/// (its LFD is restarted in the meantime; a dead replica is reported much sooner by
/// its LFD or by its process exiting).
pub const DETECTOR_GRACE_MS: u64 = 2_000;
/// A replica the GFD reports dead whose process still runs (hung, paused) is killed and
/// replaced after this long (it is out of the configuration already; this bounds how
/// long the group runs short).
pub const REPLACE_HUNG_AFTER_MS: u64 = 5_000;
/// A joiner is added once its log is this close to the primary's.
pub const JOIN_LAG: u64 = 1_000;
/// Restart back-off: first delay and cap. Restarts never stop: a replica that keeps
/// failing is reported (`Trouble::CrashLooping`) and retried at the cap.
pub const RESTART_BACKOFF_MS: u64 = 100;
pub const RESTART_BACKOFF_MAX_MS: u64 = 10_000;
/// Restarts in a row, without the replica becoming ready, that count as a crash loop.
pub const CRASH_LOOP_RESTARTS: u32 = 5;
/// How long an instance being stopped is waited for before its replacement starts
/// under a new id. A stopped process exits within a second; a deleted pod takes the
/// kubelet several (7 s seen on a 1.20 node), or forever with a finalizer: the group
/// does not wait for that, its replacement gets a new name.
pub const TERMINATING_PATIENCE_MS: u64 = 2_000;
/// The same, for a replica whose data is on its volume: its replacement under the same
/// id re-attaches the volume and recovers the data, under a new id it starts empty and
/// needs a whole checkpoint. A pod normally terminates well within this.
pub const DURABLE_TERMINATING_PATIENCE_MS: u64 = 30_000;
/// A follower the leader could not replicate to for this long (at least; longer when
/// the detection window is) fails like a dead member: three keepalives.
pub const UNREACHABLE_MS: u64 = 3 * tandem_replica::peers::KEEPALIVE.as_millis() as u64;
/// After every member of a durable group stopped at once, how long the RM waits for all
/// of them to come back from their disks before it resumes with those that did. Any
/// member that synced holds every acknowledged write (fsync durability); waiting for
/// all also covers one whose disk lost a tail that no checksum can show (a file cut at
/// a frame boundary), since the longest log is chosen.
pub const RECOVERY_PATIENCE_MS: u64 = 60_000;

pub use tandem_replica::limits::MAX_REPLICAS;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub replicas: u32,
    pub mode: Mode,
    pub heartbeat_interval_ms: u64,
    pub failure_threshold: u32,
    pub checkpoint_interval_ms: u64,
    /// The user accepts that the group of this epoch is lost (every replica's state
    /// gone at once) and asks for a new, empty group in its place.
    pub recreate_lost_epoch: Option<u64>,
    /// Whether replicas keep their data on disk: then an instance that stopped has not
    /// lost its state, and a group whose every member stopped resumes from their disks.
    pub durability: Durability,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            replicas: 3,
            mode: Mode::Passive,
            heartbeat_interval_ms: limits::DEFAULT_HEARTBEAT_INTERVAL_MS,
            failure_threshold: limits::DEFAULT_FAILURE_THRESHOLD,
            checkpoint_interval_ms: limits::DEFAULT_CHECKPOINT_INTERVAL_MS,
            recreate_lost_epoch: None,
            durability: Durability::default(),
        }
    }
}

impl Spec {
    /// A spec that cannot work, explained (the CRD's schema and `tandem up`'s flags
    /// check the same rules; a spec reaches the RM only through one of them or through
    /// `tandem set`, which asks this).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(problem) = limits::check_replicas(self.replicas) {
            problems.push(problem.to_string());
        }
        if !matches!(self.mode, Mode::Passive | Mode::Active) {
            problems.push("mode must be passive or active".into());
        }
        if let Err(problem) = limits::check(self.heartbeat_interval_ms, self.failure_threshold) {
            problems.push(problem.to_string());
        }
        if let Err(problem) = limits::check_checkpoint_interval(self.checkpoint_interval_ms) {
            problems.push(problem.to_string());
        }
        if self.checkpoint_interval_ms != 0 && self.checkpoint_interval_ms < self.heartbeat_interval_ms {
            problems.push(format!(
                "checkpoint interval ({} ms) is shorter than the heartbeat interval ({} ms): checkpoints would crowd out requests",
                self.checkpoint_interval_ms, self.heartbeat_interval_ms
            ));
        }
        problems
    }

    /// How long an instance being stopped is waited for before a new id replaces it.
    pub fn terminating_patience_ms(&self) -> u64 {
        if self.durability.on_disk() { DURABLE_TERMINATING_PATIENCE_MS } else { TERMINATING_PATIENCE_MS }
    }

    /// How long a follower may leave its leader unanswered before it counts as cut off.
    pub(crate) fn unreachable_ms(&self) -> u64 {
        UNREACHABLE_MS.max(self.heartbeat_interval_ms * u64::from(self.failure_threshold))
    }
}

/// The platform's view of one replica instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instance {
    /// Started, or running.
    Running,
    /// Being stopped or deleted, but still there (a terminating pod, a process that has
    /// not exited yet).
    Terminating,
    /// Exited, deleted, or never started.
    Gone,
}

/// What the GFD says of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive {
        ready: bool,
    },
    /// Its LFD reported it dead.
    Failed,
    /// Its LFD went silent, since this time (unix ms).
    DetectorLost {
        since: u64,
    },
    /// The GFD has not heard of it (yet).
    Unknown,
}

/// What the replica says of itself (its Status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub epoch: u64,
    pub last_seq: u64,
    pub synced_epoch: u64,
    /// Holds a consistent state (bootstrapped, or joined through a checkpoint).
    pub has_state: bool,
    /// Which start of the replica answered (random per process).
    pub incarnation: String,
    /// Which data it holds on disk (chosen when its data directory was created; empty
    /// in memory): a restarted replica with the member's data id has its data.
    pub data_id: String,
    /// Leader only: each follower (member, or learner joining) and how long it has left
    /// the leader unanswered (ms).
    pub follower_silence: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub address: String,
    pub instance: Instance,
    pub liveness: Liveness,
    /// What the replica just said of itself; `None` when it did not answer the RM
    /// lately (so a stale answer never speaks for a replica that hangs now).
    pub facts: Option<Facts>,
}

/// The RM's own record. On Kubernetes it lives in the resource's status (the parts that
/// must survive the operator's restart); locally, in a file beside the replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub config: Option<pb::Configuration>,
    /// Since which epoch each member has been one without a break.
    pub joined_epoch: BTreeMap<String, u64>,
    /// The instance (incarnation) each member was when it became one.
    pub incarnations: BTreeMap<String, String>,
    /// The data (data id) each member held when it became one.
    pub data_ids: BTreeMap<String, String>,
    /// Since when no member of the configuration has been running (a durable group
    /// waiting for its members to come back from their disks).
    pub outage_since: Option<u64>,
    /// The epoch of a group that was lost and recreated: the new group starts after it.
    pub epoch_floor: u64,
    pub failovers: u64,
    pub restarts: BTreeMap<String, Restarts>,
    /// Since when the GFD has reported each running instance dead (hung replicas).
    pub dead_since: BTreeMap<String, u64>,
    /// Since when each instance has been terminating.
    pub terminating_since: BTreeMap<String, u64>,
    /// What keeps the group from its spec right now, if the RM cannot fix it alone.
    pub trouble: Option<Trouble>,
    /// A planned switchover asked for this round, and its outcome (switchover.rs).
    pub switchover: Option<crate::switchover::Ask>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restarts {
    /// Restarts in a row without the replica becoming ready.
    pub count: u32,
    pub not_before: u64,
}

/// Why a member no longer counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No instance of it exists (never started, or deleted).
    NoInstance,
    /// Its instance exited, or is being deleted.
    InstanceGone,
    /// A new instance runs in its place: it holds none of the member's state.
    Restarted,
    /// A new instance runs in its place with the member's data, recovered from its disk:
    /// it holds what it wrote, but must be synced by a leader again before it counts.
    RestartedFromDisk,
    /// Its LFD reported it dead (crashed, or hung past the detection window).
    ReportedDead,
    /// Its LFD has been silent this long.
    DetectorSilent { ms: u64 },
    /// Its leader could not replicate to it for this long.
    Unreachable { ms: u64 },
    /// As leader, it could replicate to none of its followers for this long.
    Isolated { ms: u64 },
}

impl Failure {
    /// Whether the member's state is certainly gone (not merely out of reach). With
    /// data on disk, a stopped instance keeps it.
    pub fn state_gone(&self, on_disk: bool) -> bool {
        match self {
            Self::NoInstance | Self::InstanceGone => !on_disk,
            Self::Restarted => true,
            _ => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoInstance => write!(f, "no instance"),
            Self::InstanceGone => write!(f, "instance gone"),
            Self::Restarted => write!(f, "restarted: a new instance without its state"),
            Self::RestartedFromDisk => write!(f, "restarted from its disk: to be synced again"),
            Self::ReportedDead => write!(f, "reported dead by its LFD"),
            Self::DetectorSilent { ms } => write!(f, "its LFD has been silent for {ms} ms"),
            Self::Unreachable { ms } => write!(f, "its leader could not replicate to it for {ms} ms"),
            Self::Isolated { ms } => write!(f, "it could replicate to none of its followers for {ms} ms"),
        }
    }
}

/// Why a new configuration: what changed, typed (the platforms word it and pick the
/// event kind from it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason {
    /// The first configuration of a new group.
    pub new_group: bool,
    pub failed: Vec<(String, Failure)>,
    /// The member promoted to primary, and its log's length.
    pub promoted: Option<(String, u64)>,
    pub joined: Vec<String>,
    /// Removed to scale down to this many replicas.
    pub removed: Vec<String>,
    pub scaled_to: u32,
    pub mode_change: Option<(Mode, Mode)>,
    /// Every member had stopped: these came back from their disks and resume.
    pub recovered: Vec<String>,
    /// A planned switchover: (old primary, new primary), both members still.
    pub switched_over: Option<(String, String)>,
}

impl Reason {
    /// A failover: a new primary replaced a failed one.
    pub fn is_failover(&self) -> bool {
        self.promoted.is_some()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.new_group {
            parts.push("new group".into());
        }
        parts.extend(self.failed.iter().map(|(id, why)| format!("{id} failed ({why})")));
        if let Some((id, last_seq)) = &self.promoted {
            parts.push(format!("{id} promoted (longest log: {last_seq})"));
        }
        parts.extend(self.joined.iter().map(|id| format!("{id} joined")));
        parts
            .extend(self.removed.iter().map(|id| format!("{id} removed (scale down to {})", self.scaled_to)));
        if let Some((from, to)) = self.mode_change {
            parts.push(format!("mode {from} -> {to}"));
        }
        if !self.recovered.is_empty() {
            parts.push(format!("recovered from disk: {}", self.recovered.join(", ")));
        }
        if let Some((from, to)) = &self.switched_over {
            parts.push(format!("planned switchover from {from} to {to}"));
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Something the RM cannot fix alone: the platforms show it (a condition and an event
/// on Kubernetes, a line of `tandem up`) with what the user can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    /// The primary failed, and no surviving member is known to hold every acknowledged
    /// write: the RM waits (for the primary to come back, or a member to prove itself).
    NoSafePrimary { epoch: u64, primary: String },
    /// Every member of the configuration lost its state at once (processes gone or
    /// restarted): the data of epoch `epoch`, up to `last_seq`, is gone. Only the user
    /// can accept that and recreate the group (`Spec::recreate_lost_epoch`).
    GroupLost { epoch: u64, members: Vec<String>, last_seq: u64 },
    /// A replica keeps failing soon after it starts.
    CrashLooping { id: String, restarts: u32 },
    /// Every member of a durable group stopped: the RM waits for them to come back from
    /// their disks (`back` are, `waiting` not yet).
    Recovering { epoch: u64, back: Vec<String>, waiting: Vec<String> },
}

impl Trouble {
    /// A short CamelCase name (condition reason, event reason).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSafePrimary { .. } => "NoSafePrimary",
            Self::GroupLost { .. } => "GroupLost",
            Self::CrashLooping { .. } => "CrashLooping",
            Self::Recovering { .. } => "Recovering",
        }
    }
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSafePrimary { epoch, primary } => write!(
                f,
                "primary {primary} of epoch {epoch} failed and no surviving member is known to hold every acknowledged write; waiting for {primary} to come back or a member to catch up"
            ),
            Self::GroupLost { epoch, members, last_seq } => write!(
                f,
                "every replica of epoch {epoch} ({}) lost its state at once; the data they held (requests up to seq {last_seq}) is gone, and the group cannot serve until it is recreated empty",
                members.join(", ")
            ),
            Self::Recovering { epoch, back, waiting } => write!(
                f,
                "every member of epoch {epoch} stopped; waiting for them to come back from their disks (back: {}; waiting for: {}); resuming with those back after {} s at most",
                if back.is_empty() { "none".to_owned() } else { back.join(", ") },
                if waiting.is_empty() { "none".to_owned() } else { waiting.join(", ") },
                RECOVERY_PATIENCE_MS / 1000
            ),
            Self::CrashLooping { id, restarts } => write!(
                f,
                "{id} failed {restarts} times in a row soon after starting; still restarting it every {} s at most (see its log)",
                RESTART_BACKOFF_MAX_MS / 1000
            ),
        }
    }
}

// A handful of actions per reconciliation: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record this configuration (the next epoch), then push it to every replica.
    Install { config: pb::Configuration, reason: Reason },
    /// Start an instance of replica `id` (a new group member when `bootstrap`).
    Start { id: String, bootstrap: bool, attempt: u32 },
    /// Stop the instance of replica `id`.
    Stop { id: String, reason: String },
    /// Replica `id` is neither a member nor needed: forget it (its entry, its address).
    Forget { id: String },
}

/// Replica ids are r1, r2, ...; their order is their number's.
pub fn replica_id(n: u32) -> String {
    format!("r{n}")
}

/// The number of a replica id (`r12` -> 12), if it is one.
pub fn id_number(id: &str) -> Option<u32> {
    id.strip_prefix('r')?.parse().ok()
}

fn order(id: &str) -> u32 {
    id_number(id).unwrap_or(u32::MAX)
}

/// One reconciliation: what to do now. `membership_known`: the GFD's view is current
/// and settled (else only what the platform and the replicas report counts).
pub fn reconcile(
    spec: &Spec,
    record: &mut Record,
    observed: &[Observed],
    membership_known: bool,
    now: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let by_id: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
    track_since(record, observed, membership_known, now);
    adopt_incarnations(record, &by_id);
    record.trouble = None;

    match record.config.clone() {
        None => bootstrap(spec, record, &by_id, membership_known, now, &mut actions),
        Some(config) => {
            let failures = failures(spec, record, &config, &by_id, membership_known, now);
            if let Some(lost) = group_lost(spec, &config, &failures, &by_id) {
                if spec.recreate_lost_epoch == Some(config.epoch) {
                    recreate(record, &config);
                    return actions;
                }
                // Nothing to start: a new instance could only join through a checkpoint
                // from a member, and none is left. It waits for the user's word.
                record.trouble = Some(lost);
                return actions;
            } else if let Some(next) = next_configuration(spec, record, &config, &by_id, failures, now) {
                install(record, next, &mut actions);
            }
            if let Some(next) =
                crate::switchover::next(spec, record, observed, membership_known, &actions, now)
            {
                install(record, next, &mut actions);
            }
            replace_instances(spec, record, &by_id, now, &mut actions);
        }
    }
    actions
}

/// Whether the group is whole and settled: the spec's count of members, each running,
/// ready and synced with its leader in the current epoch, no other instance around, the
/// GFD's view current, and no trouble. What disturbs a group on purpose (replacing a
/// pod to renew its certificates) waits for this, so it never adds to a failure.
pub fn whole(spec: &Spec, record: &Record, observed: &[Observed], membership_known: bool) -> bool {
    let Some(config) = &record.config else { return false };
    let settled = |o: &Observed| {
        o.instance == Instance::Running
            && matches!(o.liveness, Liveness::Alive { ready: true })
            && o.facts
                .as_ref()
                .is_some_and(|f| f.has_state && f.epoch == config.epoch && f.synced_epoch == config.epoch)
    };
    membership_known
        && record.trouble.is_none()
        && config.members.len() == spec.replicas as usize
        && config.mode() == spec.mode
        && observed.len() == config.members.len()
        && observed.iter().all(|o| config.has_member(&o.id) && settled(o))
}

fn track_since(record: &mut Record, observed: &[Observed], membership_known: bool, now: u64) {
    for o in observed {
        let dead =
            membership_known && o.instance == Instance::Running && matches!(o.liveness, Liveness::Failed);
        if dead {
            record.dead_since.entry(o.id.clone()).or_insert(now);
        } else {
            record.dead_since.remove(&o.id);
        }
        if o.instance == Instance::Terminating {
            record.terminating_since.entry(o.id.clone()).or_insert(now);
        } else {
            record.terminating_since.remove(&o.id);
        }
    }
}

/// A member recorded without its incarnation (a record from before incarnations, or
/// rebuilt after the RM's restart) adopts the one that serves as a member with state in
/// the configuration's epoch: that instance is the member.
fn adopt_incarnations(record: &mut Record, by_id: &BTreeMap<&str, &Observed>) {
    let Some(config) = record.config.clone() else { return };
    for member in &config.members {
        if record.incarnations.get(&member.id).is_some_and(|i| !i.is_empty()) {
            continue;
        }
        let facts = by_id.get(member.id.as_str()).and_then(|o| o.facts.as_ref());
        if let Some(facts) =
            facts.filter(|f| f.has_state && f.epoch == config.epoch && !f.incarnation.is_empty())
        {
            remember_instance(record, &member.id, facts);
        }
    }
}

/// Records which instance, with which data, member `id` is.
fn remember_instance(record: &mut Record, id: &str, facts: &Facts) {
    record.incarnations.insert(id.to_owned(), facts.incarnation.clone());
    record.data_ids.insert(id.to_owned(), facts.data_id.clone());
}

/// A new group: start `replicas` fresh instances; once all are alive with their empty
/// state, the first configuration (epoch 1, or the one after a lost group's).
fn bootstrap(
    spec: &Spec,
    record: &mut Record,
    by_id: &BTreeMap<&str, &Observed>,
    membership_known: bool,
    now: u64,
    actions: &mut Vec<Action>,
) {
    let ids: Vec<String> = (1..=spec.replicas).map(replica_id).collect();
    report_crash_loop(record);
    let mut ready = true;
    for id in &ids {
        let observed = by_id.get(id.as_str());
        match observed.map(|o| (o.instance, o.facts.as_ref())) {
            None | Some((Instance::Gone, _)) => {
                start_with_backoff(record, id.clone(), true, now, actions);
                ready = false;
            }
            Some((Instance::Terminating, _)) | Some((Instance::Running, None)) => ready = false,
            // An instance without state (from a lost group) cannot found a new one.
            Some((Instance::Running, Some(facts))) if !facts.has_state => {
                actions.push(Action::Stop {
                    id: id.clone(),
                    reason: "it cannot found a new group (no state of its own)".into(),
                });
                ready = false;
            }
            Some((Instance::Running, Some(_))) => {
                ready &= observed.is_some_and(|o| matches!(o.liveness, Liveness::Alive { .. }));
            }
        }
    }
    // Instances of other ids (left from a lost group) have no place in the new one.
    for o in by_id.values().filter(|o| o.instance == Instance::Running && !ids.contains(&o.id)) {
        actions.push(Action::Stop { id: o.id.clone(), reason: "not one of the new group's replicas".into() });
    }
    if membership_known && ready {
        let members = ids
            .iter()
            .map(|id| pb::Member { id: id.clone(), address: by_id[id.as_str()].address.clone() })
            .collect();
        let epoch = record.epoch_floor + 1;
        let config = pb::Configuration { epoch, mode: spec.mode.into(), primary: ids[0].clone(), members };
        install(record, (config, Reason { new_group: true, ..Reason::default() }), actions);
        for id in &ids {
            if let Some(facts) = &by_id[id.as_str()].facts {
                remember_instance(record, id, facts);
            }
        }
    }
}

/// The user accepted the loss of `config`'s group: start over, empty, after its epoch.
fn recreate(record: &mut Record, config: &pb::Configuration) {
    record.epoch_floor = config.epoch;
    record.config = None;
    record.joined_epoch.clear();
    record.incarnations.clear();
    record.data_ids.clear();
    record.restarts.clear();
}

fn install(record: &mut Record, (config, reason): (pb::Configuration, Reason), actions: &mut Vec<Action>) {
    if reason.is_failover() {
        record.failovers += 1;
    }
    record.joined_epoch.retain(|id, _| config.has_member(id));
    record.incarnations.retain(|id, _| config.has_member(id));
    record.data_ids.retain(|id, _| config.has_member(id));
    for member in &config.members {
        record.joined_epoch.entry(member.id.clone()).or_insert(config.epoch);
    }
    record.config = Some(config.clone());
    actions.push(Action::Install { config, reason });
}

/// Every member that no longer counts, and why.
fn failures(
    spec: &Spec,
    record: &Record,
    config: &pb::Configuration,
    by_id: &BTreeMap<&str, &Observed>,
    membership_known: bool,
    now: u64,
) -> BTreeMap<String, Failure> {
    let mut failed = BTreeMap::new();
    for member in &config.members {
        if let Some(why) = failure(record, by_id.get(member.id.as_str()), membership_known, now) {
            failed.insert(member.id.clone(), why);
        }
    }
    // The leader says whom it cannot replicate to: those followers, or, when it reaches
    // none of several, the leader itself, is cut off.
    let leader = by_id.get(config.primary.as_str()).and_then(|o| o.facts.as_ref());
    if let Some(leader) = leader.filter(|f| f.epoch == config.epoch && !failed.contains_key(&config.primary))
    {
        let limit = spec.unreachable_ms();
        let followers: Vec<&(String, u64)> = leader
            .follower_silence
            .iter()
            .filter(|(id, _)| config.has_member(id) && *id != config.primary)
            .collect();
        let silent: Vec<&(String, u64)> = followers.iter().copied().filter(|(_, ms)| *ms >= limit).collect();
        // A leader cut off from all its followers loses them one by one as each crosses
        // the limit; blaming the first would leave the cut-off leader alone. So a
        // follower is blamed only while the leader still hears another one.
        let hears_another = |id: &str| followers.iter().any(|(other, ms)| other != id && *ms < limit / 2);
        if followers.len() >= 2 && silent.len() == followers.len() {
            let ms = silent.iter().map(|(_, ms)| *ms).min().unwrap_or(limit);
            failed.insert(config.primary.clone(), Failure::Isolated { ms });
        } else {
            for (id, ms) in silent {
                if followers.len() < 2 || hears_another(id) {
                    failed.entry(id.clone()).or_insert(Failure::Unreachable { ms: *ms });
                }
            }
        }
    }
    failed
}

/// Why a member is failed, by what its platform, its detector and itself report.
fn failure(
    record: &Record,
    observed: Option<&&Observed>,
    membership_known: bool,
    now: u64,
) -> Option<Failure> {
    let Some(o) = observed else { return Some(Failure::NoInstance) };
    if o.instance != Instance::Running {
        return Some(Failure::InstanceGone);
    }
    let recorded = record.incarnations.get(&o.id).filter(|i| !i.is_empty());
    let current = o.facts.as_ref().map(|f| f.incarnation.as_str()).filter(|i| !i.is_empty());
    if let (Some(recorded), Some(current)) = (recorded, current)
        && recorded != current
    {
        let data = record.data_ids.get(&o.id).filter(|d| !d.is_empty());
        let same_data = data.is_some_and(|d| o.facts.as_ref().is_some_and(|f| &f.data_id == d));
        return Some(if same_data { Failure::RestartedFromDisk } else { Failure::Restarted });
    }
    if !membership_known {
        return None;
    }
    match o.liveness {
        Liveness::Failed => Some(Failure::ReportedDead),
        // A lost detector proves nothing while the replica answers the RM itself.
        Liveness::DetectorLost { since }
            if now.saturating_sub(since) >= DETECTOR_GRACE_MS && o.facts.is_none() =>
        {
            Some(Failure::DetectorSilent { ms: now.saturating_sub(since) })
        }
        _ => None,
    }
}

/// The group is lost when every member's state is certainly gone.
fn group_lost(
    spec: &Spec,
    config: &pb::Configuration,
    failures: &BTreeMap<String, Failure>,
    by_id: &BTreeMap<&str, &Observed>,
) -> Option<Trouble> {
    let on_disk = spec.durability.on_disk();
    let all_gone = config.members.iter().all(|m| failures.get(&m.id).is_some_and(|f| f.state_gone(on_disk)));
    if !all_gone {
        return None;
    }
    // What the members last said of their logs (a restarted instance says 0).
    let last_seq = by_id.values().filter_map(|o| o.facts.as_ref()).map(|f| f.last_seq).max().unwrap_or(0);
    Some(Trouble::GroupLost {
        epoch: config.epoch,
        members: config.members.iter().map(|m| m.id.clone()).collect(),
        last_seq,
    })
}

/// Whether `o` may become primary in a failover: ready, and synced with its leader
/// during its current membership, so it holds every committed entry.
pub fn safe_to_lead(record: &Record, o: &Observed) -> bool {
    let joined = record.joined_epoch.get(&o.id).copied().unwrap_or(u64::MAX);
    o.facts.as_ref().is_some_and(|f| f.synced_epoch >= joined && f.has_state)
        && matches!(o.liveness, Liveness::Alive { ready: true })
}

/// The configuration the group should move to, if it differs from the current one.
fn next_configuration(
    spec: &Spec,
    record: &mut Record,
    config: &pb::Configuration,
    by_id: &BTreeMap<&str, &Observed>,
    failures: BTreeMap<String, Failure>,
    now: u64,
) -> Option<(pb::Configuration, Reason)> {
    let mut reason = Reason { scaled_to: spec.replicas, ..Reason::default() };
    let mut members: Vec<pb::Member> =
        config.members.iter().filter(|m| !failures.contains_key(&m.id)).cloned().collect();
    // Members restarted with their data, ready to be synced again by a leader.
    let back_from_disk: Vec<&Observed> = config
        .members
        .iter()
        .filter(|m| failures.get(&m.id) == Some(&Failure::RestartedFromDisk))
        .filter_map(|m| by_id.get(m.id.as_str()).copied())
        .filter(|o| matches!(o.liveness, Liveness::Alive { ready: true }))
        .filter(|o| o.facts.as_ref().is_some_and(|f| f.has_state))
        .collect();
    if record.outage_since.is_some() {
        // While the group recovers, a member counts as surviving only once it answered
        // as the instance it was: a process just started under its id has proven nothing.
        members.retain(|m| {
            let facts = by_id.get(m.id.as_str()).and_then(|o| o.facts.as_ref());
            facts.is_some_and(|f| record.incarnations.get(&m.id) == Some(&f.incarnation))
        });
    }
    if members.is_empty() && spec.durability.on_disk() {
        return recover_from_disks(record, config, &back_from_disk, &failures, now);
    }
    record.outage_since = None;
    reason.failed = failures.into_iter().collect();
    let mut primary = config.primary.clone();
    if !members.iter().any(|m| m.id == primary) {
        // A member back from its disk that synced during its membership holds every
        // acknowledged write as much as a survivor does.
        let candidates = members
            .iter()
            .filter_map(|m| by_id.get(m.id.as_str()).copied())
            .chain(back_from_disk.iter().copied())
            .filter(|o| safe_to_lead(record, o));
        let last_seq = |o: &Observed| o.facts.as_ref().map_or(0, |f| f.last_seq);
        let Some(best) = candidates.max_by_key(|o| (last_seq(o), std::cmp::Reverse(order(&o.id)))) else {
            record.trouble =
                Some(Trouble::NoSafePrimary { epoch: config.epoch, primary: config.primary.clone() });
            return None;
        };
        reason.promoted = Some((best.id.clone(), last_seq(best)));
        primary = best.id.clone();
        if !members.iter().any(|m| m.id == best.id) {
            rejoin_from_disk(record, best, true);
            reason.failed.retain(|(id, _)| id != &best.id);
            reason.recovered.push(best.id.clone());
            members.push(pb::Member { id: best.id.clone(), address: best.address.clone() });
        }
    }
    if reason.failed.is_empty() {
        // Only without failures: grow by ready joiners, shrink to the spec.
        let leader =
            by_id.get(primary.as_str()).and_then(|o| o.facts.as_ref()).filter(|f| f.epoch == config.epoch);
        let primary_seq = leader.map_or(0, |f| f.last_seq);
        // A joiner must be fed by the leader right now: one that merely looks caught up
        // (a primary just replaced for being cut off) would be added, found unreachable,
        // removed, and added again for as long as the cut lasts.
        let limit = spec.unreachable_ms();
        let leader_hears = |id: &str| {
            leader.is_some_and(|f| f.follower_silence.iter().any(|(f_id, ms)| f_id == id && *ms < limit))
        };
        let mut joiners: Vec<&&Observed> = by_id
            .values()
            .filter(|o| !members.iter().any(|m| m.id == o.id))
            .filter(|o| {
                o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { ready: true })
            })
            .filter(|o| {
                o.facts.as_ref().is_some_and(|f| {
                    f.has_state
                        && !f.incarnation.is_empty()
                        && f.epoch == config.epoch
                        && primary_seq.saturating_sub(f.last_seq) <= JOIN_LAG
                })
            })
            .filter(|o| leader_hears(&o.id))
            .collect();
        joiners.sort_by_key(|o| order(&o.id));
        let room = (spec.replicas as usize).saturating_sub(members.len());
        for joiner in joiners.into_iter().take(room) {
            reason.joined.push(joiner.id.clone());
            members.push(pb::Member { id: joiner.id.clone(), address: joiner.address.clone() });
            if let Some(facts) = &joiner.facts {
                remember_instance(record, &joiner.id, facts);
            }
        }
        while members.len() > spec.replicas.max(1) as usize {
            let Some(victim) =
                members.iter().filter(|m| m.id != primary).max_by_key(|m| order(&m.id)).cloned()
            else {
                break;
            };
            reason.removed.push(victim.id.clone());
            members.retain(|m| m.id != victim.id);
        }
        if spec.mode != config.mode() && matches!(spec.mode, Mode::Passive | Mode::Active) {
            reason.mode_change = Some((config.mode(), spec.mode));
        }
    }
    if reason == (Reason { scaled_to: spec.replicas, ..Reason::default() }) {
        return None;
    }
    if members.is_empty() {
        return None;
    }
    members.sort_by_key(|m| order(&m.id));
    let mode = if matches!(spec.mode, Mode::Passive | Mode::Active) { spec.mode } else { config.mode() };
    let next = pb::Configuration { epoch: config.epoch + 1, mode: mode.into(), primary, members };
    Some((next, reason))
}

/// Every member of a durable group stopped. Once all of them are back from their disks
/// (or `RECOVERY_PATIENCE_MS` passed and some are), the group resumes in a new epoch
/// with those back as members, led by the longest log among those that synced during
/// their membership. Until then it waits, and says for whom.
fn recover_from_disks(
    record: &mut Record,
    config: &pb::Configuration,
    back: &[&Observed],
    failures: &BTreeMap<String, Failure>,
    now: u64,
) -> Option<(pb::Configuration, Reason)> {
    let since = *record.outage_since.get_or_insert(now);
    let is_back = |id: &str| back.iter().any(|o| o.id == id);
    // A member that came back without the member's data will not bring it.
    let waiting: Vec<String> = config
        .members
        .iter()
        .filter(|m| !is_back(&m.id) && failures.get(&m.id) != Some(&Failure::Restarted))
        .map(|m| m.id.clone())
        .collect();
    let patient = now.saturating_sub(since) < RECOVERY_PATIENCE_MS;
    if back.is_empty() || (!waiting.is_empty() && patient) {
        record.trouble = Some(Trouble::Recovering {
            epoch: config.epoch,
            back: back.iter().map(|o| o.id.clone()).collect(),
            waiting,
        });
        return None;
    }
    let last_seq = |o: &Observed| o.facts.as_ref().map_or(0, |f| f.last_seq);
    let Some(best) = back
        .iter()
        .filter(|o| safe_to_lead(record, o))
        .max_by_key(|o| (last_seq(o), std::cmp::Reverse(order(&o.id))))
    else {
        record.trouble =
            Some(Trouble::NoSafePrimary { epoch: config.epoch, primary: config.primary.clone() });
        return None;
    };
    let mut reason = Reason { promoted: Some((best.id.clone(), last_seq(best))), ..Reason::default() };
    reason.failed =
        failures.iter().filter(|(id, _)| !is_back(id)).map(|(id, f)| (id.clone(), f.clone())).collect();
    let mut members = Vec::new();
    for o in back {
        rejoin_from_disk(record, o, o.id == best.id);
        reason.recovered.push(o.id.clone());
        members.push(pb::Member { id: o.id.clone(), address: o.address.clone() });
    }
    members.sort_by_key(|m| order(&m.id));
    record.outage_since = None;
    let next =
        pb::Configuration { epoch: config.epoch + 1, mode: config.mode, primary: best.id.clone(), members };
    Some((next, reason))
}

/// A member back from its disk stays one, as the instance now running. Unless it leads
/// (its log defines the next epoch's), it counts as joined in the next epoch: it is safe
/// to promote only once a leader synced it again.
fn rejoin_from_disk(record: &mut Record, o: &Observed, leads: bool) {
    if !leads {
        record.joined_epoch.remove(&o.id);
    }
    if let Some(facts) = &o.facts {
        remember_instance(record, &o.id, facts);
    }
}

/// Starts `id` unless its last start was too recent: the pause doubles with every start
/// that did not make it to ready, so a replica that cannot start (its port taken, its
/// disk full) is retried without spinning.
fn start_with_backoff(record: &mut Record, id: String, bootstrap: bool, now: u64, actions: &mut Vec<Action>) {
    let restarts = record.restarts.entry(id.clone()).or_default();
    if now < restarts.not_before {
        return;
    }
    let attempt = restarts.count;
    let delay = (RESTART_BACKOFF_MS << attempt.min(10)).min(RESTART_BACKOFF_MAX_MS);
    restarts.count += 1;
    restarts.not_before = now + delay;
    let attempt = if bootstrap { attempt } else { restarts.count };
    actions.push(Action::Start { id, bootstrap, attempt });
}

fn report_crash_loop(record: &mut Record) {
    if record.trouble.is_none()
        && let Some((id, restarts)) = record.restarts.iter().find(|(_, r)| r.count >= CRASH_LOOP_RESTARTS)
    {
        record.trouble = Some(Trouble::CrashLooping { id: id.clone(), restarts: restarts.count });
    }
}

/// Keeps `spec.replicas` instances running: restarts the gone ones (with back-off),
/// starts new ids when growing or when an old instance takes too long to stop, stops
/// instances that are neither members nor needed, replaces replicas that hang, and
/// forgets replicas that are gone for good.
fn replace_instances(
    spec: &Spec,
    record: &mut Record,
    by_id: &BTreeMap<&str, &Observed>,
    now: u64,
    actions: &mut Vec<Action>,
) {
    let config = record.config.clone().unwrap_or_default();
    let is_member = |id: &str| config.has_member(id);
    let wanted = spec.replicas.max(1) as usize;

    // A replica that made it back to ready starts its restart count afresh.
    for o in by_id.values() {
        if o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { ready: true }) {
            record.restarts.remove(&o.id);
        }
    }
    report_crash_loop(record);

    // Hung: reported dead for long while the process still runs.
    for (id, since) in record.dead_since.clone() {
        if now.saturating_sub(since) >= REPLACE_HUNG_AFTER_MS && !is_member(&id) {
            actions.push(Action::Stop {
                id: id.clone(),
                reason: format!("reported dead for {} ms while still running", now - since),
            });
            record.dead_since.remove(&id);
        }
    }

    let with = |state: Instance| {
        let mut ids: Vec<&str> =
            by_id.values().filter(|o| o.instance == state).map(|o| o.id.as_str()).collect();
        ids.sort_by_key(|id| order(id));
        ids
    };
    let running = with(Instance::Running);
    // Too many: stop non-members, highest ids first.
    let mut excess = running.len().saturating_sub(wanted);
    for id in running.iter().rev() {
        if excess == 0 {
            break;
        }
        if !is_member(id) {
            actions
                .push(Action::Stop { id: (*id).into(), reason: format!("not needed at {wanted} replicas") });
            excess -= 1;
        }
    }
    // Too few: restart the gone ones (lowest ids first), wait a while for the ones still
    // stopping, then take new ids.
    let mut missing = wanted.saturating_sub(running.len());
    let mut gone: std::collections::VecDeque<&str> = with(Instance::Gone).into();
    // While a durable group recovers from an outage, its members' data is on their
    // disks, under their ids: they are waited for however long they take to stop, and
    // restarted under the same ids, never replaced by new ones.
    let outage = record.outage_since.is_some();
    let mut stopping = with(Instance::Terminating)
        .into_iter()
        .filter(|id| {
            outage
                || now.saturating_sub(record.terminating_since.get(*id).copied().unwrap_or(now))
                    < spec.terminating_patience_ms()
        })
        .count();
    if outage {
        // Members first: a gone member is restarted even if another instance runs.
        let mut members_first: Vec<&str> = gone.iter().copied().filter(|id| is_member(id)).collect();
        members_first.extend(gone.iter().copied().filter(|id| !is_member(id)));
        gone = members_first.into();
        missing = missing.max(gone.iter().filter(|id| is_member(id)).count());
    }
    let mut next_new = by_id.keys().filter_map(|id| id_number(id)).max().unwrap_or(0) + 1;
    while missing > 0 {
        missing -= 1;
        let id = match gone.pop_front() {
            Some(id) => id.to_owned(),
            None if stopping > 0 => {
                stopping -= 1;
                continue;
            }
            None => {
                next_new += 1;
                replica_id(next_new - 1)
            }
        };
        start_with_backoff(record, id, false, now, actions);
    }
    // Gone for good: neither a member nor restarting.
    for id in gone {
        if !is_member(id) {
            record.restarts.remove(id);
            actions.push(Action::Forget { id: id.to_owned() });
        }
    }
}

#[cfg(test)]
mod tests;
