//! The Global Fault Detector's decision: the membership. It learns each replica's state
//! from that replica's LFD, and counts a replica gone when its LFD goes silent or closes
//! its stream. A silent LFD's stream is closed, so that the LFD, if it lives, reconnects
//! and its replica is re-admitted. A gap between ticks means the GFD itself did not run
//! (paused, starved): it heard nothing then, so it blames no LFD for it. Pure: time
//! comes in as `now` (unix milliseconds); the server (service.rs) owns the streams and
//! the clock.

use std::collections::{BTreeMap, HashMap};

use crate::pb::{self, MembershipChange};

/// One connected LFD stream.
pub type LinkId = u64;

/// A member gone this long, with no stream left, is forgotten (replaced pods get new
/// names: the membership must not grow for good).
pub const FORGET_GONE_AFTER_MS: u64 = 10 * 60 * 1000;

/// Most members the GFD keeps. One GFD may watch every group of a cluster, so this is
/// far above any real use (a hundred groups of up to 9), and it keeps the membership,
/// which goes out whole in every event, well below a gRPC message's size limit (seen: 6,000
/// fake members made every event too large, and the RM's subscription broke for good).
pub const MAX_MEMBERS: usize = 1024;
/// Most LFD streams open at once: a replica may have a second one for a moment (an LFD
/// that reattached before its old stream was noticed closed).
pub const MAX_LINKS: usize = 2 * MAX_MEMBERS;
/// Longest replica id or address an LFD may announce (a Kubernetes namespace/pod name, or
/// a host:port, is far shorter).
pub const MAX_NAME_BYTES: usize = 256;

/// Why the GFD refused an LFD. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "the GFD already keeps {MAX_MEMBERS} members (none gone long enough to forget): {replica_id} is not admitted; remove replicas, or retry once some are gone"
    )]
    TooManyMembers { replica_id: String },
    #[error("the GFD already has {MAX_LINKS} LFD streams open; retry later")]
    TooManyLinks,
    #[error("{field} is {len} bytes, more than the {MAX_NAME_BYTES} a GFD accepts")]
    TooLong { field: &'static str, len: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GfdSettings {
    /// How often the GFD heartbeats each LFD.
    pub heartbeat_interval_ms: u64,
    /// Unanswered GFD heartbeats before an LFD counts as gone.
    pub failure_threshold: u32,
    /// After a (re)start, how long LFDs get to reconnect before a missing replica
    /// counts as gone.
    pub settle_ms: u64,
}

impl Default for GfdSettings {
    fn default() -> Self {
        Self { heartbeat_interval_ms: 100, failure_threshold: 3, settle_ms: 1000 }
    }
}

#[derive(Debug, Clone)]
struct Member {
    address: String,
    alive: bool,
    ready: bool,
    last_heartbeat_ms: u64,
    since_ms: u64,
}

#[derive(Debug, Clone)]
struct Link {
    replica_id: Option<String>,
    last_answer_ms: u64,
}

/// What a tick found: membership changes, and the silent LFDs' streams to close.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    pub changes: Vec<Change>,
    pub close: Vec<LinkId>,
}

/// A change of the membership, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: MembershipChange,
    pub replica_id: String,
    pub reason: String,
}

/// Whether a change of this kind changes who is a member: readiness changes do not.
pub fn changes_members(kind: MembershipChange) -> bool {
    !matches!(kind, MembershipChange::Ready | MembershipChange::NotReady)
}

/// The log line of a membership: `3 members: r1, r2, r3`.
pub fn members_line<S: std::borrow::Borrow<str>>(alive: &[S]) -> String {
    let noun = if alive.len() == 1 { "member" } else { "members" };
    format!("{} {noun}: {}", alive.len(), alive.join(", "))
}

#[derive(Debug, Clone)]
pub struct GfdCore {
    settings: GfdSettings,
    started_ms: u64,
    last_tick_ms: u64,
    settled: bool,
    members: BTreeMap<String, Member>,
    links: HashMap<LinkId, Link>,
    /// How many changes were published: the version of the next snapshot.
    published: u64,
}

impl GfdCore {
    pub fn new(settings: GfdSettings, now: u64) -> Self {
        Self {
            settings,
            started_ms: now,
            last_tick_ms: now,
            settled: false,
            members: BTreeMap::new(),
            links: HashMap::new(),
            published: 0,
        }
    }

    pub fn settings(&self) -> &GfdSettings {
        &self.settings
    }

    /// Changes the heartbeat settings (already checked against `limits`).
    pub fn set_heartbeat(&mut self, interval_ms: Option<u64>, threshold: Option<u32>) {
        if let Some(interval) = interval_ms {
            self.settings.heartbeat_interval_ms = interval.max(1);
        }
        if let Some(threshold) = threshold {
            self.settings.failure_threshold = threshold.max(1);
        }
    }

    pub fn link_opened(&mut self, link: LinkId, now: u64) -> Result<(), Refused> {
        if self.links.len() >= MAX_LINKS {
            return Err(Refused::TooManyLinks);
        }
        self.links.insert(link, Link { replica_id: None, last_answer_ms: now });
        Ok(())
    }

    /// An LFD introduced itself: its replica is a candidate member (alive once the LFD
    /// reports so). A replica may have several streams open for a moment (an LFD that
    /// reattached while its old stream was still being noticed closed): any of them
    /// speaks for it, and it is lost only once none is left.
    /// Beyond `MAX_MEMBERS`, a new replica takes the place of the member gone longest
    /// (not alive, no stream), or is refused if there is none.
    pub fn hello(&mut self, link: LinkId, replica_id: &str, address: &str, now: u64) -> Result<(), Refused> {
        for (field, name) in [("replica_id", replica_id), ("replica_address", address)] {
            if name.len() > MAX_NAME_BYTES {
                return Err(Refused::TooLong { field, len: name.len() });
            }
        }
        if !self.links.contains_key(&link) {
            return Ok(());
        }
        if !self.members.contains_key(replica_id) && self.members.len() >= MAX_MEMBERS {
            let linked: std::collections::HashSet<&str> =
                self.links.values().filter_map(|l| l.replica_id.as_deref()).collect();
            let gone_longest = self
                .members
                .iter()
                .filter(|(id, m)| !m.alive && !linked.contains(id.as_str()))
                .min_by_key(|(_, m)| m.since_ms)
                .map(|(id, _)| id.clone());
            let Some(forgotten) = gone_longest else {
                return Err(Refused::TooManyMembers { replica_id: replica_id.to_owned() });
            };
            self.members.remove(&forgotten);
        }
        let Some(state) = self.links.get_mut(&link) else { return Ok(()) };
        // A stream speaks for one replica (its LFD's certificate names one): were a
        // second hello to rename it, the first replica would stay alive with no stream
        // left whose loss could ever report it gone.
        if state.replica_id.as_deref().is_some_and(|speaks_for| speaks_for != replica_id) {
            return Ok(());
        }
        state.replica_id = Some(replica_id.to_owned());
        state.last_answer_ms = now;
        let member = self.members.entry(replica_id.to_owned()).or_insert_with(|| Member {
            address: address.to_owned(),
            alive: false,
            ready: false,
            last_heartbeat_ms: now,
            since_ms: now,
        });
        member.address = address.to_owned();
        member.last_heartbeat_ms = now;
        Ok(())
    }

    /// Whether a stream other than `except` speaks for `replica_id`.
    fn has_other_link(&self, replica_id: &str, except: LinkId) -> bool {
        self.links.iter().any(|(id, l)| *id != except && l.replica_id.as_deref() == Some(replica_id))
    }

    /// An LFD reported its replica's state.
    pub fn report(&mut self, link: LinkId, report: &pb::ReplicaReport, now: u64) -> Vec<Change> {
        let Some(replica_id) = self.links.get_mut(&link).and_then(|l| {
            l.last_answer_ms = now;
            l.replica_id.clone()
        }) else {
            return Vec::new();
        };
        let Some(member) = self.members.get_mut(&replica_id) else {
            return Vec::new();
        };
        member.last_heartbeat_ms = now;
        let mut changes = Vec::new();
        let change =
            |kind, reason: &str| Change { kind, replica_id: replica_id.clone(), reason: reason.to_owned() };
        if report.alive != member.alive {
            member.alive = report.alive;
            member.since_ms = now;
            let kind = if report.alive { MembershipChange::Joined } else { MembershipChange::Failed };
            changes.push(change(kind, &report.reason));
        }
        let ready = report.alive && report.ready;
        if ready != member.ready {
            member.ready = ready;
            if report.alive {
                let kind = if ready { MembershipChange::Ready } else { MembershipChange::NotReady };
                changes.push(change(kind, &report.reason));
            }
        }
        changes
    }

    /// An LFD answered a heartbeat.
    pub fn answered(&mut self, link: LinkId, now: u64) {
        if let Some(state) = self.links.get_mut(&link) {
            state.last_answer_ms = now;
            if let Some(member) = state.replica_id.as_ref().and_then(|id| self.members.get_mut(id)) {
                member.last_heartbeat_ms = now;
            }
        }
    }

    /// An LFD stream ended.
    pub fn link_closed(&mut self, link: LinkId, now: u64) -> Vec<Change> {
        let Some(state) = self.links.remove(&link) else { return Vec::new() };
        let Some(replica_id) = state.replica_id else { return Vec::new() };
        self.detector_lost(&replica_id, link, now, "its LFD closed the stream")
    }

    /// The stream `link` of `replica_id` is gone (already out of `links`): the replica is
    /// lost if no other stream speaks for it.
    fn detector_lost(&mut self, replica_id: &str, link: LinkId, now: u64, reason: &str) -> Vec<Change> {
        if self.has_other_link(replica_id, link) {
            return Vec::new();
        }
        let Some(member) = self.members.get_mut(replica_id) else {
            return Vec::new();
        };
        let was_alive = member.alive;
        member.alive = false;
        member.ready = false;
        member.since_ms = now;
        if !was_alive {
            return Vec::new();
        }
        vec![Change {
            kind: MembershipChange::DetectorLost,
            replica_id: replica_id.to_owned(),
            reason: reason.to_owned(),
        }]
    }

    /// Time passes: LFDs that stopped answering are gone, and their streams are to be
    /// closed (`Tick::close`) so that a live LFD reconnects; after the settle period the
    /// membership becomes authoritative (announced with a snapshot).
    pub fn tick(&mut self, now: u64) -> Tick {
        let interval = self.settings.heartbeat_interval_ms.max(1);
        let limit = interval * u64::from(self.settings.failure_threshold);
        if now.saturating_sub(self.last_tick_ms) > 2 * interval {
            // This GFD did not run for a while: every LFD gets a fresh window.
            for link in self.links.values_mut() {
                link.last_answer_ms = link.last_answer_ms.max(now);
            }
        }
        self.last_tick_ms = now;
        let silent: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| now.saturating_sub(l.last_answer_ms) > limit)
            .map(|(id, _)| *id)
            .collect();
        let mut changes = Vec::new();
        for link in &silent {
            let Some(state) = self.links.remove(link) else { continue };
            if let Some(replica_id) = state.replica_id {
                let reason = format!("its LFD missed {} heartbeats", self.settings.failure_threshold);
                changes.extend(self.detector_lost(&replica_id, *link, now, &reason));
            }
        }
        let links = &self.links;
        self.members.retain(|id, member| {
            member.alive
                || now.saturating_sub(member.since_ms) < FORGET_GONE_AFTER_MS
                || links.values().any(|l| l.replica_id.as_deref() == Some(id.as_str()))
        });
        if !self.settled && now.saturating_sub(self.started_ms) >= self.settings.settle_ms {
            self.settled = true;
            changes.push(Change {
                kind: MembershipChange::Snapshot,
                replica_id: String::new(),
                reason: "LFDs had time to reconnect: membership settled".into(),
            });
        }
        Tick { changes, close: silent }
    }

    /// The replica an LFD stream speaks for, once it said hello.
    pub fn replica_of(&self, link: LinkId) -> Option<&str> {
        self.links.get(&link)?.replica_id.as_deref()
    }

    /// Links due a heartbeat (all of them; the server paces it).
    pub fn links(&self) -> impl Iterator<Item = LinkId> + '_ {
        self.links.keys().copied()
    }

    pub fn is_settled(&self) -> bool {
        self.settled
    }

    /// Alive members' ids, in order.
    pub fn alive(&self) -> Vec<String> {
        self.members.iter().filter(|(_, m)| m.alive).map(|(id, _)| id.clone()).collect()
    }

    /// Marks a change as published: snapshots from now on carry a higher version.
    pub fn publish(&mut self) {
        self.published += 1;
    }

    pub fn snapshot(&self, now: u64) -> pb::Membership {
        pb::Membership {
            members: self
                .members
                .iter()
                .map(|(id, m)| pb::MemberState {
                    replica_id: id.clone(),
                    replica_address: m.address.clone(),
                    alive: m.alive,
                    ready: m.ready,
                    last_heartbeat_unix_ms: m.last_heartbeat_ms,
                    since_unix_ms: m.since_ms,
                })
                .collect(),
            settled: self.settled,
            at_unix_ms: now,
            version: self.published,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(alive: bool, ready: bool) -> pb::ReplicaReport {
        pb::ReplicaReport { alive, ready, reason: "test".into(), at_unix_ms: 0 }
    }

    #[test]
    fn the_members_line_counts_and_lists_the_members() {
        assert_eq!(members_line(&["r1", "r2", "r3"]), "3 members: r1, r2, r3");
        assert_eq!(members_line(&["r2".to_owned()]), "1 member: r2");
        assert!(changes_members(MembershipChange::Failed));
        assert!(!changes_members(MembershipChange::Ready));
    }

    fn kinds(changes: &[Change]) -> Vec<MembershipChange> {
        changes.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn member_joins_turns_ready_and_fails_as_its_lfd_reports() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(1, 0).expect("admitted");
        gfd.hello(1, "r1", "127.0.0.1:1", 0).expect("admitted");
        assert_eq!(gfd.alive(), Vec::<String>::new(), "hello alone is not alive");
        assert_eq!(kinds(&gfd.report(1, &report(true, false), 10)), vec![MembershipChange::Joined]);
        assert_eq!(kinds(&gfd.report(1, &report(true, true), 20)), vec![MembershipChange::Ready]);
        assert_eq!(gfd.alive(), vec!["r1".to_string()]);
        assert_eq!(kinds(&gfd.report(1, &report(false, false), 30)), vec![MembershipChange::Failed]);
        assert!(gfd.alive().is_empty());
    }

    #[test]
    fn a_silent_lfd_loses_its_member_after_threshold_heartbeats() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(7, 0).expect("admitted");
        gfd.hello(7, "r2", "a", 0).expect("admitted");
        gfd.report(7, &report(true, true), 0);
        for now in [100, 200] {
            assert!(gfd.tick(now).changes.iter().all(|c| c.kind != MembershipChange::DetectorLost));
        }
        gfd.answered(7, 250);
        for now in [300, 400, 500] {
            assert_eq!(gfd.tick(now).close, Vec::<LinkId>::new());
        }
        let tick = gfd.tick(551);
        assert_eq!(kinds(&tick.changes), vec![MembershipChange::DetectorLost]);
        assert!(tick.changes[0].reason.contains("missed 3"), "{tick:?}");
        assert_eq!(tick.close, vec![7], "the silent LFD's stream is closed, so it reconnects");
        assert!(gfd.alive().is_empty());
    }

    #[test]
    fn a_silent_lfd_that_comes_back_on_a_new_stream_is_re_admitted() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(1, 0).expect("admitted");
        gfd.hello(1, "r1", "a", 0).expect("admitted");
        gfd.report(1, &report(true, true), 0);
        for now in (100..=400).step_by(100) {
            gfd.tick(now);
        }
        assert!(gfd.alive().is_empty(), "lost after its LFD stalled");
        // The LFD resumes, finds its stream closed, and attaches again.
        gfd.link_opened(2, 450).expect("admitted");
        gfd.hello(2, "r1", "a", 450).expect("admitted");
        let back = gfd.report(2, &report(true, true), 451);
        assert_eq!(kinds(&back), vec![MembershipChange::Joined, MembershipChange::Ready]);
        assert_eq!(gfd.alive(), vec!["r1".to_string()]);
    }

    #[test]
    fn a_member_gone_for_long_is_forgotten() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(1, 0).expect("admitted");
        gfd.hello(1, "ns/pod-r1", "a", 0).expect("admitted");
        gfd.report(1, &report(true, true), 0);
        gfd.link_closed(1, 10);
        let mut now = 10;
        while now + 100 < 10 + FORGET_GONE_AFTER_MS {
            now += 100;
            gfd.tick(now);
        }
        assert_eq!(gfd.snapshot(now).members.len(), 1, "remembered a while");
        gfd.tick(now + 100);
        assert!(gfd.snapshot(now + 100).members.is_empty(), "then forgotten");
    }

    #[test]
    fn the_gfd_pausing_itself_blames_no_lfd() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(1, 0).expect("admitted");
        gfd.hello(1, "r1", "a", 0).expect("admitted");
        gfd.report(1, &report(true, true), 0);
        gfd.tick(100);
        // SIGSTOP of the GFD for 5 s: its next tick comes late.
        let tick = gfd.tick(5_100);
        assert!(tick.changes.iter().all(|c| c.kind != MembershipChange::DetectorLost), "{tick:?}");
        assert!(tick.close.is_empty());
        gfd.answered(1, 5_150);
        assert!(gfd.tick(5_200).close.is_empty());
        assert_eq!(gfd.alive(), vec!["r1".to_string()]);
    }

    #[test]
    fn a_replacement_stream_takes_over_and_the_old_one_closing_changes_nothing() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        gfd.link_opened(1, 0).expect("admitted");
        gfd.hello(1, "r1", "a", 0).expect("admitted");
        gfd.report(1, &report(true, true), 0);
        // The LFD restarted and reconnected before its old stream was noticed closed.
        gfd.link_opened(2, 5).expect("admitted");
        gfd.hello(2, "r1", "a", 5).expect("admitted");
        assert!(gfd.link_closed(1, 6).is_empty());
        assert_eq!(gfd.alive(), vec!["r1".to_string()]);
        assert_eq!(kinds(&gfd.link_closed(2, 7)), vec![MembershipChange::DetectorLost]);
    }

    /// Seen after a 5 s pause of the GFD: the LFDs had reattached several times; the GFD
    /// took the hellos in any order, and an abandoned stream closing took the live one's
    /// member with it for good.
    #[test]
    fn streams_processed_out_of_order_never_strand_a_live_lfd() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        for link in [3, 1, 2] {
            gfd.link_opened(link, 0).expect("admitted");
            gfd.hello(link, "r1", "a", 0).expect("admitted");
        }
        gfd.report(2, &report(true, true), 1);
        // The LFD abandoned streams 1 and 3; they close. Stream 2 lives.
        assert!(gfd.link_closed(3, 2).is_empty());
        assert!(gfd.link_closed(1, 3).is_empty());
        assert_eq!(gfd.alive(), vec!["r1".to_string()]);
        gfd.report(2, &report(true, false), 4);
        assert!(!gfd.snapshot(4).members[0].ready, "the live stream still speaks for it");
    }

    #[test]
    fn membership_settles_once_after_the_grace_period() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 1000);
        assert!(!gfd.is_settled());
        assert!(gfd.tick(1100).changes.is_empty());
        assert!(gfd.tick(1200).changes.is_empty());
        let settled = (1300..=2000).step_by(100).flat_map(|now| gfd.tick(now).changes).collect::<Vec<_>>();
        assert_eq!(kinds(&settled), vec![MembershipChange::Snapshot]);
        assert!(gfd.tick(2100).changes.is_empty());
        assert!(gfd.snapshot(2100).settled);
    }

    /// At the cap, a newcomer takes the place of the member gone longest; with none gone,
    /// it is refused with the reason and nothing changes.
    #[test]
    fn at_the_cap_a_newcomer_replaces_the_member_gone_longest_or_is_refused() {
        let mut gfd = GfdCore::new(GfdSettings::default(), 0);
        for link in 0..MAX_MEMBERS as u64 {
            gfd.link_opened(link, 0).expect("room");
            gfd.hello(link, &format!("r{link}"), "a", 0).expect("room");
            gfd.report(link, &report(true, true), 0);
        }
        gfd.link_opened(9_000, 1).expect("room for a stream");
        let refused = gfd.hello(9_000, "newcomer", "a", 1).expect_err("full, nobody gone");
        assert_eq!(refused, Refused::TooManyMembers { replica_id: "newcomer".into() });
        assert_eq!(gfd.snapshot(1).members.len(), MAX_MEMBERS);
        gfd.link_closed(5, 2);
        gfd.link_closed(7, 3);
        gfd.hello(9_000, "newcomer", "a", 4).expect("r5 is gone: its place is free");
        let ids: Vec<String> = gfd.snapshot(4).members.into_iter().map(|m| m.replica_id).collect();
        assert!(
            !ids.contains(&"r5".to_string()) && ids.contains(&"r7".to_string()),
            "the one gone longest goes"
        );
        assert!(ids.contains(&"newcomer".to_string()));
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(matches!(gfd.hello(9_000, &long, "a", 5), Err(Refused::TooLong { field: "replica_id", .. })));
    }
}
