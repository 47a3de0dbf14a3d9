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
//! - a failed primary is replaced only by a *safe* survivor: a member that synced with
//!   its leader during its current membership (`synced_epoch >= joined_epoch`), so it
//!   holds every committed entry; among those, the longest log wins;
//! - with no safe survivor the RM waits rather than promote a replica that may lack
//!   acknowledged writes.

use std::collections::BTreeMap;

use tandem_replica::pb::{self, Mode};

/// How long a replica whose LFD vanished may stay silent before it counts as failed
/// (its LFD is restarted in the meantime; a dead replica is reported much sooner by
/// its LFD or by its process exiting).
pub const DETECTOR_GRACE_MS: u64 = 2_000;
/// A replica the GFD reports dead whose process still runs (hung, paused) is killed and
/// replaced after this long.
pub const REPLACE_HUNG_AFTER_MS: u64 = 15_000;
/// A joiner is added once its log is this close to the primary's.
pub const JOIN_LAG: u64 = 1_000;
/// Restart back-off: first delay, cap, and how many consecutive restarts before the RM
/// gives up on an instance.
pub const RESTART_BACKOFF_MS: u64 = 100;
pub const RESTART_BACKOFF_MAX_MS: u64 = 5_000;
pub const MAX_RESTARTS: u32 = 10;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub replicas: u32,
    pub mode: Mode,
    pub heartbeat_interval_ms: u64,
    pub failure_threshold: u32,
    pub checkpoint_interval_ms: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            replicas: 3,
            mode: Mode::Passive,
            heartbeat_interval_ms: 100,
            failure_threshold: 3,
            checkpoint_interval_ms: 2_000,
        }
    }
}

impl Spec {
    /// A spec the schema allows but that cannot work, explained.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.replicas == 0 {
            problems.push("replicas must be at least 1".into());
        }
        if !matches!(self.mode, Mode::Passive | Mode::Active) {
            problems.push("mode must be passive or active".into());
        }
        if self.heartbeat_interval_ms == 0 {
            problems.push("heartbeat interval must be at least 1 ms".into());
        }
        if self.failure_threshold == 0 {
            problems.push("failure threshold must be at least 1".into());
        }
        if self.checkpoint_interval_ms != 0 && self.checkpoint_interval_ms < self.heartbeat_interval_ms {
            problems.push(format!(
                "checkpoint interval ({} ms) is shorter than the heartbeat interval ({} ms): checkpoints would crowd out requests",
                self.checkpoint_interval_ms, self.heartbeat_interval_ms
            ));
        }
        problems
    }
}

/// The platform's view of one replica instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instance {
    /// Started, or running.
    Running,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    pub epoch: u64,
    pub last_seq: u64,
    pub synced_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub address: String,
    pub instance: Instance,
    pub liveness: Liveness,
    pub facts: Option<Facts>,
}

/// The RM's own record. On Kubernetes it lives in the resource's status; locally, in
/// memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub config: Option<pb::Configuration>,
    /// Since which epoch each member has been one without a break.
    pub joined_epoch: BTreeMap<String, u64>,
    pub failovers: u64,
    pub restarts: BTreeMap<String, Restarts>,
    /// Since when the GFD has reported each running instance dead (hung replicas).
    pub dead_since: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restarts {
    pub count: u32,
    pub not_before: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record this configuration (the next epoch), then push it to every replica.
    Install { config: pb::Configuration, reason: String },
    /// Start an instance of replica `id` (a new group member when `bootstrap`).
    Start { id: String, bootstrap: bool, attempt: u32 },
    /// Stop the instance of replica `id`.
    Stop { id: String, reason: String },
    /// Something the user should know: the RM cannot do what the spec asks.
    Warn(String),
}

/// Replica ids are r1, r2, ...; their order is their number's.
pub fn replica_id(n: u32) -> String {
    format!("r{n}")
}

fn id_number(id: &str) -> u32 {
    id.trim_start_matches('r').parse().unwrap_or(u32::MAX)
}

/// One reconciliation: what to do now. `membership_known`: the GFD's view is current
/// and settled (else only instances that are gone count as failed).
pub fn reconcile(
    spec: &Spec,
    record: &mut Record,
    observed: &[Observed],
    membership_known: bool,
    now: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let by_id: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
    track_dead_since(record, observed, membership_known, now);

    match record.config.clone() {
        None => bootstrap(spec, record, &by_id, membership_known, &mut actions),
        Some(config) => {
            if let Some(next) =
                next_configuration(spec, record, &config, &by_id, membership_known, now, &mut actions)
            {
                install(record, next, &mut actions);
            }
            replace_instances(spec, record, &by_id, now, &mut actions);
        }
    }
    actions
}

fn track_dead_since(record: &mut Record, observed: &[Observed], membership_known: bool, now: u64) {
    for o in observed {
        let dead =
            membership_known && o.instance == Instance::Running && matches!(o.liveness, Liveness::Failed);
        if dead {
            record.dead_since.entry(o.id.clone()).or_insert(now);
        } else {
            record.dead_since.remove(&o.id);
        }
    }
}

/// A new group: start `replicas` fresh instances; once all are alive, epoch 1.
fn bootstrap(
    spec: &Spec,
    record: &mut Record,
    by_id: &BTreeMap<&str, &Observed>,
    membership_known: bool,
    actions: &mut Vec<Action>,
) {
    let ids: Vec<String> = (1..=spec.replicas).map(replica_id).collect();
    for id in &ids {
        if by_id.get(id.as_str()).is_none_or(|o| o.instance == Instance::Gone) {
            actions.push(Action::Start { id: id.clone(), bootstrap: true, attempt: 0 });
        }
    }
    let all_alive = ids
        .iter()
        .all(|id| by_id.get(id.as_str()).is_some_and(|o| matches!(o.liveness, Liveness::Alive { .. })));
    if membership_known && all_alive {
        let members = ids
            .iter()
            .map(|id| pb::Member { id: id.clone(), address: by_id[id.as_str()].address.clone() })
            .collect();
        let config = pb::Configuration { epoch: 1, mode: spec.mode.into(), primary: ids[0].clone(), members };
        install(record, (config, "new group".into()), actions);
    }
}

fn install(record: &mut Record, (config, reason): (pb::Configuration, String), actions: &mut Vec<Action>) {
    let previous_primary = record.config.as_ref().map(|c| c.primary.clone());
    if previous_primary.is_some_and(|p| p != config.primary) {
        record.failovers += 1;
    }
    record.joined_epoch.retain(|id, _| config.members.iter().any(|m| &m.id == id));
    for member in &config.members {
        record.joined_epoch.entry(member.id.clone()).or_insert(config.epoch);
    }
    record.config = Some(config.clone());
    actions.push(Action::Install { config, reason });
}

/// Why a member is failed, if it is.
fn failure(observed: Option<&&Observed>, membership_known: bool, now: u64) -> Option<String> {
    let Some(o) = observed else { return Some("no instance".into()) };
    if o.instance == Instance::Gone {
        return Some("instance gone".into());
    }
    if !membership_known {
        return None;
    }
    match o.liveness {
        Liveness::Failed => Some("reported dead by its LFD".into()),
        Liveness::DetectorLost { since } if now.saturating_sub(since) >= DETECTOR_GRACE_MS => {
            Some(format!("its LFD has been silent for {} ms", now.saturating_sub(since)))
        }
        _ => None,
    }
}

fn safe_to_lead(record: &Record, o: &Observed) -> bool {
    let joined = record.joined_epoch.get(&o.id).copied().unwrap_or(u64::MAX);
    o.facts.is_some_and(|f| f.synced_epoch >= joined) && matches!(o.liveness, Liveness::Alive { ready: true })
}

/// The configuration the group should move to, if it differs from the current one.
fn next_configuration(
    spec: &Spec,
    record: &Record,
    config: &pb::Configuration,
    by_id: &BTreeMap<&str, &Observed>,
    membership_known: bool,
    now: u64,
    actions: &mut Vec<Action>,
) -> Option<(pb::Configuration, String)> {
    let mut reasons = Vec::new();
    let mut members: Vec<pb::Member> = Vec::new();
    for member in &config.members {
        match failure(by_id.get(member.id.as_str()), membership_known, now) {
            Some(why) => reasons.push(format!("{} failed ({why})", member.id)),
            None => members.push(member.clone()),
        }
    }
    let mut primary = config.primary.clone();
    if !members.iter().any(|m| m.id == primary) {
        let candidates =
            members.iter().filter_map(|m| by_id.get(m.id.as_str())).filter(|o| safe_to_lead(record, o));
        let Some(best) = candidates
            .max_by_key(|o| (o.facts.map_or(0, |f| f.last_seq), std::cmp::Reverse(id_number(&o.id))))
        else {
            actions.push(Action::Warn(format!(
                "primary {} failed and no surviving member is known to hold every committed write; waiting for one",
                config.primary
            )));
            return None;
        };
        reasons.push(format!("{} promoted (longest log: {})", best.id, best.facts.map_or(0, |f| f.last_seq)));
        primary = best.id.clone();
    }
    if reasons.is_empty() {
        // Only without failures: grow by ready joiners, shrink to the spec.
        let primary_seq = by_id.get(primary.as_str()).and_then(|o| o.facts).map_or(0, |f| f.last_seq);
        let mut joiners: Vec<&&Observed> = by_id
            .values()
            .filter(|o| !members.iter().any(|m| m.id == o.id))
            .filter(|o| {
                o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { ready: true })
            })
            .filter(|o| {
                o.facts.is_some_and(|f| {
                    f.epoch == config.epoch && primary_seq.saturating_sub(f.last_seq) <= JOIN_LAG
                })
            })
            .collect();
        joiners.sort_by_key(|o| id_number(&o.id));
        let room = (spec.replicas as usize).saturating_sub(members.len());
        for joiner in joiners.into_iter().take(room) {
            reasons.push(format!("{} joined", joiner.id));
            members.push(pb::Member { id: joiner.id.clone(), address: joiner.address.clone() });
        }
        while members.len() > spec.replicas.max(1) as usize {
            let Some(victim) =
                members.iter().filter(|m| m.id != primary).max_by_key(|m| id_number(&m.id)).cloned()
            else {
                break;
            };
            reasons.push(format!("{} removed (scale down to {})", victim.id, spec.replicas));
            members.retain(|m| m.id != victim.id);
        }
        if spec.mode != config.mode() && matches!(spec.mode, Mode::Passive | Mode::Active) {
            reasons.push(format!("mode {} -> {}", mode_name(config.mode()), mode_name(spec.mode)));
        }
    }
    if reasons.is_empty() {
        return None;
    }
    if members.is_empty() {
        actions.push(Action::Warn("no member of the configuration survives; waiting".into()));
        return None;
    }
    members.sort_by_key(|m| id_number(&m.id));
    let mode = if matches!(spec.mode, Mode::Passive | Mode::Active) { spec.mode } else { config.mode() };
    let next = pb::Configuration { epoch: config.epoch + 1, mode: mode.into(), primary, members };
    Some((next, reasons.join("; ")))
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Passive => "passive",
        Mode::Active => "active",
        Mode::Unspecified => "unspecified",
    }
}

/// Keeps `spec.replicas` instances running: restarts the gone ones (with back-off),
/// starts new ids when growing, stops instances that are neither members nor needed,
/// and replaces replicas that hang.
fn replace_instances(
    spec: &Spec,
    record: &mut Record,
    by_id: &BTreeMap<&str, &Observed>,
    now: u64,
    actions: &mut Vec<Action>,
) {
    let config = record.config.clone().unwrap_or_default();
    let is_member = |id: &str| config.members.iter().any(|m| m.id == id);
    let wanted = spec.replicas.max(1) as usize;

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

    let mut running: Vec<&str> =
        by_id.values().filter(|o| o.instance == Instance::Running).map(|o| o.id.as_str()).collect();
    running.sort_by_key(|id| id_number(id));
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
    // Too few: restart the gone ones (lowest ids first), then new ids.
    let mut missing = wanted.saturating_sub(running.len());
    let mut candidates: Vec<String> =
        by_id.values().filter(|o| o.instance == Instance::Gone).map(|o| o.id.clone()).collect();
    candidates.sort_by_key(|id| id_number(id));
    let mut next_new = by_id.keys().map(|id| id_number(id)).filter(|n| *n != u32::MAX).max().unwrap_or(0) + 1;
    while missing > 0 {
        let id = if candidates.is_empty() {
            let id = replica_id(next_new);
            next_new += 1;
            id
        } else {
            candidates.remove(0)
        };
        missing -= 1;
        let restarts = record.restarts.entry(id.clone()).or_default();
        if restarts.count >= MAX_RESTARTS {
            actions.push(Action::Warn(format!(
                "{id} failed {MAX_RESTARTS} restarts in a row; not restarting it"
            )));
            continue;
        }
        if now < restarts.not_before {
            continue;
        }
        let delay = (RESTART_BACKOFF_MS << restarts.count.min(10)).min(RESTART_BACKOFF_MAX_MS);
        restarts.count += 1;
        restarts.not_before = now + delay;
        actions.push(Action::Start { id, bootstrap: false, attempt: restarts.count });
    }
    // A replica that made it back to ready resets its back-off.
    for o in by_id.values() {
        if matches!(o.liveness, Liveness::Alive { ready: true }) && is_member(&o.id) {
            record.restarts.remove(&o.id);
        }
    }
}

#[cfg(test)]
mod tests;
