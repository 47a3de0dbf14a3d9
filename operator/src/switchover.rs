//! Planned switchover: the RM hands the primary's role (the active order-keeper's) to
//! another member under the next epoch, every member kept. Asked by the user (`tandem
//! switchover`, the `tandem.dev/switchover` annotation) or by a rolling update before it
//! replaces the old primary. Decided here, purely: `rm::reconcile` calls `next` once per
//! round after its own decisions, and the platforms read the outcome from the record.
//!
//! Only a *safe* target: a member that runs, is ready, answers the RM and has synced
//! with its leader in the current epoch (so it holds every committed entry, and every
//! entry committed from now on needs it too). The old primary stays a member: it gets
//! the new configuration, steps down, and its waiting clients get `not_primary` naming
//! the new primary; what it had ordered but not committed is re-sent by its clients.

use std::collections::BTreeMap;
use std::fmt;

use tandem_replica::pb;

use crate::rm::{self, Action, Instance, Liveness, Observed, Reason, Record, Spec};

/// The value of a switchover request that lets the RM choose the target.
pub const ANY: &str = "any";

/// Kubernetes: `kubectl annotate rsvc NAME tandem.dev/switchover-to=r2` (or `=any`, or a
/// pod name). The operator acts on each new value once and shows it in
/// `status.lastSwitchover.request`; removing the annotation lets the same value be used
/// again.
pub const ANNOTATION: &str = "tandem.dev/switchover-to";

/// Whom the user wants as the new primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The best safe backup: the longest log, then the lowest id.
    Any,
    Replica(String),
}

impl Target {
    /// `any` (or empty), or a replica id (`r2`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case(ANY) {
            return Ok(Self::Any);
        }
        rm::id_number(text)
            .map(|_| Self::Replica(text.to_owned()))
            .ok_or_else(|| format!("{text:?} is not a replica id (r1, r2, ...) nor {ANY:?}"))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => write!(f, "{ANY}"),
            Self::Replica(id) => write!(f, "{id}"),
        }
    }
}

/// How long a switchover waits for a member that is only catching up (not yet synced in
/// the current epoch, or not yet at it: milliseconds after any reconfiguration; or not
/// ready or silent for a moment, as on a busy machine) before it is refused for that.
pub const SYNC_PATIENCE_MS: u64 = 2_000;

/// A switchover asked for, and (once the RM decided) what came of it. It lives in
/// `rm::Record::switchover` for one round: the platform puts it there, reads the
/// outcome, and answers the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub target: Target,
    /// When it was first asked (unix ms): a target still catching up is waited for
    /// until `SYNC_PATIENCE_MS` after.
    pub asked_at: u64,
    /// None: not decided yet (the RM had something else to do this round).
    pub outcome: Option<Outcome>,
}

impl Ask {
    pub fn new(target: Target, asked_at: u64) -> Self {
        Self { target, asked_at, outcome: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The configuration of `epoch` names `to` as primary; `from` stepped down.
    Done {
        from: String,
        to: String,
        epoch: u64,
    },
    /// The target leads already: nothing to do.
    AlreadyPrimary {
        id: String,
        epoch: u64,
    },
    Refused(Refusal),
}

/// Why the RM will not switch over now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No group yet (bootstrapping, or recreating a lost one).
    NoGroup,
    /// The RM cannot fix something alone (see `rm::Trouble`); it waits, and so does this.
    Trouble(String),
    NotAMember {
        id: String,
        members: Vec<String>,
    },
    /// The target cannot safely take over.
    Unsafe {
        id: String,
        why: Unsafe,
    },
    /// No member but the primary can safely take over.
    NoSafeTarget {
        why: Vec<(String, Unsafe)>,
    },
}

/// Why a member may not become the primary now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsafe {
    /// Its instance is not running (gone, or being stopped).
    NotRunning,
    /// Its detector does not report it alive and ready.
    NotReady,
    /// It did not answer the RM lately.
    Silent,
    /// It has not installed the current configuration yet.
    BehindEpoch { epoch: u64, current: u64 },
    /// It has not synced with its leader in the current epoch (it may lack entries).
    NotSynced { synced_epoch: u64, current: u64 },
    /// Its leader has not heard from it for this long.
    Unreachable { ms: u64 },
}

impl fmt::Display for Unsafe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRunning => write!(f, "not running"),
            Self::NotReady => write!(f, "not alive and ready"),
            Self::Silent => write!(f, "not answering the RM"),
            Self::BehindEpoch { epoch, current } => {
                write!(f, "at epoch {epoch}, not the current {current}")
            }
            Self::NotSynced { synced_epoch, current } => write!(
                f,
                "not yet synced with its leader in epoch {current} (last synced in epoch {synced_epoch}); it may lack entries"
            ),
            Self::Unreachable { ms } => write!(f, "its leader has not heard from it for {ms} ms"),
        }
    }
}

impl Unsafe {
    /// What passes by itself in a moment unless something is wrong: a member catching
    /// up with the current epoch, or one its detector or the RM missed a heartbeat or a
    /// poll of (a busy machine). A member that is not running does not come back so.
    fn catching_up(&self) -> bool {
        !matches!(self, Self::NotRunning | Self::Unreachable { .. })
    }
}

impl Refusal {
    /// Whether waiting a little may turn it into a switchover.
    fn catching_up(&self) -> bool {
        match self {
            Self::Unsafe { why, .. } => why.catching_up(),
            Self::NoSafeTarget { why } => why.iter().any(|(_, why)| why.catching_up()),
            _ => false,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoGroup => write!(f, "there is no group yet (nothing to switch over)"),
            Self::Trouble(trouble) => {
                write!(f, "the RM is waiting on trouble it cannot fix alone: {trouble}")
            }
            Self::NotAMember { id, members } => {
                write!(f, "{id} is not a member of the configuration (members: {})", members.join(", "))
            }
            Self::Unsafe { id, why } => write!(f, "{id} cannot safely take over: {why}"),
            Self::NoSafeTarget { why } if why.is_empty() => {
                write!(f, "no other member to take over (a group of one)")
            }
            Self::NoSafeTarget { why } => {
                let why: Vec<String> = why.iter().map(|(id, why)| format!("{id} {why}")).collect();
                write!(f, "no member can safely take over: {}", why.join("; "))
            }
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done { from, to, epoch } => write!(f, "switched over from {from} to {to} in epoch {epoch}"),
            Self::AlreadyPrimary { id, epoch } => write!(f, "{id} is the primary already (epoch {epoch})"),
            Self::Refused(refusal) => write!(f, "refused: {refusal}"),
        }
    }
}

/// Decides the switchover asked in `record.switchover`, if any is undecided: records the
/// outcome there and returns the configuration to install (with its reason) when it is
/// done. Undecided while the RM changes the configuration for its own reasons this round
/// (`pending` holds an install), the GFD's view is not current, or the target (or, for
/// `any`, a candidate) is only catching up with the current epoch, for at most
/// `SYNC_PATIENCE_MS`: it is asked again.
pub fn next(
    spec: &Spec,
    record: &mut Record,
    observed: &[Observed],
    membership_known: bool,
    pending: &[Action],
    now: u64,
) -> Option<(pb::Configuration, Reason)> {
    let ask = record.switchover.as_ref().filter(|a| a.outcome.is_none())?;
    if !membership_known || pending.iter().any(|a| matches!(a, Action::Install { .. })) {
        return None;
    }
    let decided = decide(spec, record, observed, &ask.target);
    if let Err(Outcome::Refused(refusal)) = &decided
        && refusal.catching_up()
        && now < ask.asked_at.saturating_add(SYNC_PATIENCE_MS)
    {
        return None;
    }
    let (outcome, next) = match decided {
        Ok(next) => {
            let outcome =
                Outcome::Done { from: next.0.primary.clone(), to: next.1.clone(), epoch: next.0.epoch + 1 };
            (outcome, Some(next))
        }
        Err(outcome) => (outcome, None),
    };
    if let Some(ask) = record.switchover.as_mut() {
        ask.outcome = Some(outcome);
    }
    let (config, to) = next?;
    let reason = Reason {
        switched_over: Some((config.primary.clone(), to.clone())),
        scaled_to: spec.replicas,
        ..Reason::default()
    };
    Some((pb::Configuration { epoch: config.epoch + 1, primary: to, ..config }, reason))
}

/// The current configuration and the target, or what to answer instead.
fn decide(
    spec: &Spec,
    record: &Record,
    observed: &[Observed],
    target: &Target,
) -> Result<(pb::Configuration, String), Outcome> {
    let refused = |refusal| Err(Outcome::Refused(refusal));
    let Some(config) = record.config.clone() else { return refused(Refusal::NoGroup) };
    if let Some(trouble) = &record.trouble {
        return refused(Refusal::Trouble(trouble.to_string()));
    }
    let by_id: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
    let leader = by_id.get(config.primary.as_str()).and_then(|o| o.facts.as_ref());
    let check = |id: &str| unsafe_to_lead(spec, record, &config, by_id.get(id).copied(), leader);
    let last_seq = |id: &str| by_id.get(id).and_then(|o| o.facts.as_ref()).map_or(0, |f| f.last_seq);
    match target {
        Target::Replica(id) if *id == config.primary => {
            Err(Outcome::AlreadyPrimary { id: id.clone(), epoch: config.epoch })
        }
        Target::Replica(id) if !config.has_member(id) => refused(Refusal::NotAMember {
            id: id.clone(),
            members: config.members.iter().map(|m| m.id.clone()).collect(),
        }),
        Target::Replica(id) => match check(id) {
            Some(why) => refused(Refusal::Unsafe { id: id.clone(), why }),
            None => Ok((config.clone(), id.clone())),
        },
        Target::Any => {
            let backups: Vec<&str> =
                config.members.iter().map(|m| m.id.as_str()).filter(|id| *id != config.primary).collect();
            let best = backups
                .iter()
                .filter(|id| check(id).is_none())
                .max_by_key(|id| (last_seq(id), std::cmp::Reverse(rm::id_number(id).unwrap_or(u32::MAX))));
            match best {
                Some(id) => Ok((config.clone(), (*id).to_owned())),
                None => refused(Refusal::NoSafeTarget {
                    why: backups.iter().filter_map(|id| Some(((*id).to_owned(), check(id)?))).collect(),
                }),
            }
        }
    }
}

/// Why the member may not lead now (None: it may). Stricter than a failover's rule: it
/// must have synced in the current epoch, not merely since it joined, and its leader
/// must hear it.
fn unsafe_to_lead(
    spec: &Spec,
    record: &Record,
    config: &pb::Configuration,
    observed: Option<&Observed>,
    leader: Option<&rm::Facts>,
) -> Option<Unsafe> {
    let Some(o) = observed.filter(|o| o.instance == Instance::Running) else {
        return Some(Unsafe::NotRunning);
    };
    if !matches!(o.liveness, Liveness::Alive { ready: true }) {
        return Some(Unsafe::NotReady);
    }
    let Some(facts) = o.facts.as_ref().filter(|f| f.has_state) else { return Some(Unsafe::Silent) };
    if facts.epoch != config.epoch {
        return Some(Unsafe::BehindEpoch { epoch: facts.epoch, current: config.epoch });
    }
    let joined = record.joined_epoch.get(&o.id).copied().unwrap_or(u64::MAX);
    if facts.synced_epoch != config.epoch || facts.synced_epoch < joined {
        return Some(Unsafe::NotSynced { synced_epoch: facts.synced_epoch, current: config.epoch });
    }
    let limit = spec.unreachable_ms();
    let silence =
        leader.and_then(|l| l.follower_silence.iter().find(|(id, _)| *id == o.id)).map(|(_, ms)| *ms);
    match silence {
        Some(ms) if ms >= limit => Some(Unsafe::Unreachable { ms }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rm::{Facts, Trouble};

    /// A whole group of r1 (primary), r2, r3 at epoch 4; r3's log is the longest backup's.
    fn whole_group(mode: pb::Mode) -> (Spec, Record, Vec<Observed>) {
        let ids = ["r1", "r2", "r3"];
        let config = pb::Configuration {
            epoch: 4,
            mode: mode.into(),
            primary: "r1".into(),
            members: ids
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: format!("{id}:7000") })
                .collect(),
        };
        let record = Record {
            joined_epoch: ids.iter().map(|id| ((*id).to_owned(), 1)).collect(),
            incarnations: ids.iter().map(|id| ((*id).to_owned(), format!("{id}-a"))).collect(),
            config: Some(config),
            ..Record::default()
        };
        let observed = ids
            .iter()
            .zip([12, 11, 12])
            .map(|(id, last_seq)| Observed {
                id: (*id).into(),
                address: format!("{id}:7000"),
                instance: Instance::Running,
                liveness: Liveness::Alive { ready: true },
                facts: Some(Facts {
                    epoch: 4,
                    last_seq,
                    synced_epoch: 4,
                    has_state: true,
                    incarnation: format!("{id}-a"),
                    data_id: String::new(),
                    follower_silence: if *id == "r1" {
                        vec![("r2".into(), 5), ("r3".into(), 5)]
                    } else {
                        Vec::new()
                    },
                }),
            })
            .collect();
        let spec = Spec { mode, ..Spec::default() };
        (spec, record, observed)
    }

    /// Past the patience for members catching up (asked at 0).
    const LATER: u64 = SYNC_PATIENCE_MS;

    fn ask(record: &mut Record, target: &str) {
        record.switchover = Some(Ask::new(Target::parse(target).expect("a target"), 0));
    }

    fn outcome(record: &Record) -> Option<Outcome> {
        record.switchover.as_ref().and_then(|a| a.outcome.clone())
    }

    #[test]
    fn switchover_to_a_named_backup_installs_the_next_epoch_with_every_member() {
        for mode in [pb::Mode::Passive, pb::Mode::Active] {
            let (spec, mut record, observed) = whole_group(mode);
            ask(&mut record, "r2");
            let (config, reason) =
                next(&spec, &mut record, &observed, true, &[], LATER).expect("a switchover");
            assert_eq!((config.epoch, config.primary.as_str(), config.mode()), (5, "r2", mode));
            assert_eq!(config.members, record.config.as_ref().expect("config").members, "nobody removed");
            assert_eq!(reason.switched_over, Some(("r1".into(), "r2".into())));
            assert!(!reason.is_failover(), "a switchover is not a failover");
            assert_eq!(
                outcome(&record),
                Some(Outcome::Done { from: "r1".into(), to: "r2".into(), epoch: 5 })
            );
        }
    }

    #[test]
    fn through_reconcile_the_configuration_is_recorded_and_pushed_like_any_other() {
        let (spec, mut record, observed) = whole_group(pb::Mode::Passive);
        ask(&mut record, "any");
        let actions = rm::reconcile(&spec, &mut record, &observed, true, 1_000);
        let installed: Vec<&pb::Configuration> = actions
            .iter()
            .filter_map(|a| if let Action::Install { config, .. } = a { Some(config) } else { None })
            .collect();
        assert_eq!(installed.len(), 1, "{actions:?}");
        assert_eq!((installed[0].epoch, installed[0].primary.as_str()), (5, "r3"), "r3: the longest log");
        assert_eq!(record.config.as_ref().map(|c| c.epoch), Some(5));
        assert_eq!(record.joined_epoch.get("r3"), Some(&1), "members keep their join epoch");
        assert_eq!(record.failovers, 0);
        // Asked again (say, the annotation was not cleared yet): the outcome stays.
        let again = rm::reconcile(&spec, &mut record, &observed, true, 1_100);
        assert!(again.iter().all(|a| !matches!(a, Action::Install { .. })), "{again:?}");
    }

    #[test]
    fn any_picks_the_longest_log_then_the_lowest_id() {
        let (spec, mut record, mut observed) = whole_group(pb::Mode::Passive);
        ask(&mut record, "any");
        assert_eq!(
            next(&spec, &mut record, &observed, true, &[], LATER).map(|(c, _)| c.primary).as_deref(),
            Some("r3")
        );
        observed[1].facts.as_mut().expect("facts").last_seq = 12;
        ask(&mut record, "any");
        assert_eq!(
            next(&spec, &mut record, &observed, true, &[], LATER).map(|(c, _)| c.primary).as_deref(),
            Some("r2")
        );
    }

    #[test]
    fn an_unsafe_target_is_refused_with_the_reason() {
        type Break = fn(&mut Observed);
        let cases: [(Break, Unsafe); 5] = [
            (|o| o.instance = Instance::Terminating, Unsafe::NotRunning),
            (|o| o.liveness = Liveness::Alive { ready: false }, Unsafe::NotReady),
            (|o| o.facts = None, Unsafe::Silent),
            (|o| o.facts.as_mut().expect("facts").epoch = 3, Unsafe::BehindEpoch { epoch: 3, current: 4 }),
            (
                |o| o.facts.as_mut().expect("facts").synced_epoch = 3,
                Unsafe::NotSynced { synced_epoch: 3, current: 4 },
            ),
        ];
        for (break_it, why) in cases {
            let (spec, mut record, mut observed) = whole_group(pb::Mode::Passive);
            break_it(&mut observed[1]);
            ask(&mut record, "r2");
            assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
            assert_eq!(
                outcome(&record),
                Some(Outcome::Refused(Refusal::Unsafe { id: "r2".into(), why: why.clone() })),
                "{why}"
            );
        }
        // Its leader cannot reach it.
        let (spec, mut record, mut observed) = whole_group(pb::Mode::Passive);
        observed[0].facts.as_mut().expect("facts").follower_silence[0].1 = 5_000;
        ask(&mut record, "r2");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        assert!(matches!(
            outcome(&record),
            Some(Outcome::Refused(Refusal::Unsafe { why: Unsafe::Unreachable { ms: 5_000 }, .. }))
        ));
    }

    #[test]
    fn any_falls_back_to_the_other_backup_and_refuses_when_none_is_safe() {
        let (spec, mut record, mut observed) = whole_group(pb::Mode::Passive);
        observed[2].liveness = Liveness::Alive { ready: false };
        ask(&mut record, "any");
        assert_eq!(
            next(&spec, &mut record, &observed, true, &[], LATER).map(|(c, _)| c.primary).as_deref(),
            Some("r2")
        );
        observed[1].facts.as_mut().expect("facts").synced_epoch = 2;
        ask(&mut record, "any");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        let Some(Outcome::Refused(refusal @ Refusal::NoSafeTarget { .. })) = outcome(&record) else {
            panic!("{:?}", outcome(&record))
        };
        let text = refusal.to_string();
        assert!(text.contains("r2 not yet synced") && text.contains("r3 not alive and ready"), "{text}");
    }

    #[test]
    fn a_member_catching_up_is_waited_for_a_while_then_refused() {
        let (spec, mut record, mut observed) = whole_group(pb::Mode::Active);
        // Just after a reconfiguration: the backups have not synced in epoch 4 yet.
        for o in &mut observed[1..] {
            o.facts.as_mut().expect("facts").synced_epoch = 3;
        }
        ask(&mut record, "any");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], 1_999), None);
        assert_eq!(outcome(&record), None, "waits");
        // Synced a moment later: done.
        let (_, _, synced) = whole_group(pb::Mode::Active);
        assert!(next(&spec, &mut record, &synced, true, &[], 1_999).is_some());
        // Never synced: refused once the patience is spent.
        let (_, mut record, _) = whole_group(pb::Mode::Active);
        ask(&mut record, "r2");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], 1_000), None);
        assert_eq!(outcome(&record), None);
        assert_eq!(next(&spec, &mut record, &observed, true, &[], 2_000), None);
        assert!(matches!(outcome(&record), Some(Outcome::Refused(Refusal::Unsafe { .. }))));
        // What waiting cannot fix is refused at once.
        let (_, mut record, mut observed) = whole_group(pb::Mode::Active);
        observed[1].instance = Instance::Terminating;
        ask(&mut record, "r2");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], 0), None);
        assert!(outcome(&record).is_some(), "being stopped: refused without waiting");
    }

    #[test]
    fn a_stranger_or_the_primary_itself_is_not_switched_to() {
        let (spec, mut record, observed) = whole_group(pb::Mode::Passive);
        ask(&mut record, "r7");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        assert!(matches!(outcome(&record), Some(Outcome::Refused(Refusal::NotAMember { .. }))));
        ask(&mut record, "r1");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        assert_eq!(outcome(&record), Some(Outcome::AlreadyPrimary { id: "r1".into(), epoch: 4 }));
        assert!(Target::parse("primary").is_err());
        assert_eq!(Target::parse(" ANY "), Ok(Target::Any));
    }

    #[test]
    fn it_waits_while_the_rm_changes_the_group_and_refuses_in_trouble_or_without_a_group() {
        let (spec, mut record, observed) = whole_group(pb::Mode::Passive);
        ask(&mut record, "r2");
        let install = Action::Install { config: pb::Configuration::default(), reason: Reason::default() };
        assert_eq!(next(&spec, &mut record, &observed, true, &[install], LATER), None);
        assert_eq!(next(&spec, &mut record, &observed, false, &[], LATER), None, "GFD view not current");
        assert_eq!(outcome(&record), None, "undecided: asked again next round");
        record.trouble = Some(Trouble::CrashLooping { id: "r9".into(), restarts: 5 });
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        assert!(matches!(outcome(&record), Some(Outcome::Refused(Refusal::Trouble(_)))));
        let mut empty = Record::default();
        ask(&mut empty, "any");
        assert_eq!(next(&spec, &mut empty, &observed, true, &[], LATER), None);
        assert_eq!(outcome(&empty), Some(Outcome::Refused(Refusal::NoGroup)));
    }

    #[test]
    fn a_group_of_one_has_nobody_to_switch_to() {
        let (spec, mut record, mut observed) = whole_group(pb::Mode::Passive);
        if let Some(config) = record.config.as_mut() {
            config.members.truncate(1);
        }
        observed.truncate(1);
        ask(&mut record, "any");
        assert_eq!(next(&spec, &mut record, &observed, true, &[], LATER), None);
        assert_eq!(outcome(&record), Some(Outcome::Refused(Refusal::NoSafeTarget { why: Vec::new() })));
    }
}
