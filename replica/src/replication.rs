//! The replication core: one replica's protocol state, as a deterministic state machine.
//! Events come in as method calls (a client request, a leader's entries, a follower's
//! answer, a configuration, a checkpoint); decisions come out as return values (reply,
//! wait, forward, what to send a peer) and as one queue of effects: the requests that
//! executed, which the shell drains after every event (`take_executed`) to answer whoever
//! waits. No I/O, no clocks: the shell (node.rs, server.rs, peers.rs) does the sending
//! and the waiting.
//!
//! Both modes share one mechanism: the configuration's `primary` (passive primary, or
//! active order-keeper) is the leader; it orders requests into the log and replicates
//! them to every member; an entry is committed once every member of the configuration
//! holds it. Passive: only the primary executes, backups log and install checkpoints.
//! Active: every member executes committed entries and answers its clients.
//!
//! Safety rests on three rules: configurations come only from the RM with a growing
//! epoch; a replica refuses messages of an older epoch; the RM names as leader only a
//! member of the previous configuration (which holds every committed entry, since
//! committing needs every member).

use std::collections::{BTreeMap, HashMap};

use crate::checkpoint::{Base, Checkpoint};
use crate::error::ReplicaError;
use crate::log::{Accepted, Log};
use crate::pb::{self, Mode, Role};
use crate::state::{Applied, StateMachine, op_digest, validate};

/// Most entries one append carries.
pub const MAX_BATCH_ENTRIES: usize = 512;
/// Soft byte limit of one append (a single bigger entry travels alone).
pub const MAX_BATCH_BYTES: usize = 2 << 20;
/// Entries a leader keeps past what it executed, for followers that fall a little
/// behind (further behind, they get a checkpoint instead).
pub const LEADER_LOG_RETENTION: u64 = 4096;

/// Highest sequence number a replica accepts from a peer (a checkpoint's): no group
/// orders 2^62 requests, and staying far below `u64::MAX` keeps `seq + 1` from
/// overflowing anywhere.
pub const MAX_SEQ: u64 = 1 << 62;

/// Epochs grow only by what the RM hands out: one per configuration change. A replica
/// never adopts an epoch from a peer message (Append, Order, checkpoint, Join): a newer
/// one is answered `ConfigurationRequired`, and only a whole configuration (from the RM,
/// relayed by the leader, learned from a refusal or a seed) moves it. Such a
/// configuration may jump ahead of the replica's by at most `MAX_EPOCH_JUMP`: enough for
/// every change a group makes while one replica is away (the RM counts one epoch per
/// change, each a round of pushes; 100,000 is days of back-to-back failovers), never an
/// absurd jump (2^63 was tried) that would make the replica refuse every later
/// configuration of the RM for good. A replica that fell further behind is out of the
/// group already, and the RM replaces it with a fresh instance, which has no
/// configuration and takes the current one whatever its epoch (below `MAX_EPOCH`).
pub const MAX_EPOCH_JUMP: u64 = 100_000;
/// Highest epoch any configuration may have: one change a second for 9,000 years, and far
/// enough below `u64::MAX` that `epoch + 1` never overflows.
pub const MAX_EPOCH: u64 = 1 << 48;

/// A follower's answer that no correct follower could give (it names entries this leader
/// never had). The leader ignores it, as if the follower had not answered, and the shell
/// logs it: one faulty follower must never crash the leader or stall its other peers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("follower {peer} answered {field} = {got}, beyond what it can hold ({limit}): answer ignored")]
pub struct BadReply {
    pub peer: String,
    pub field: &'static str,
    pub got: u64,
    pub limit: u64,
}

/// A request that executed here (or was refused by the session table at its turn), for
/// the shell to answer whoever waits for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub seq: u64,
    pub client_id: String,
    pub request_id: u64,
    /// `op_digest` of the entry's operation: a waiter that sent another operation under
    /// the same request id must not get this reply.
    pub op_digest: u64,
    pub outcome: Applied,
}

/// What the write-ahead log must record, drained by the shell after every event
/// (`take_persist`) and written in this order.
#[derive(Debug, Clone)]
pub enum Persist {
    /// From `from` on, the log is `entries` (appended, or replacing a deposed leader's
    /// suffix).
    Entries { from: u64, entries: Vec<pb::Entry> },
    /// The configuration or the synced epoch changed.
    Meta { config: Option<pb::Configuration>, synced_epoch: u64 },
    /// The state was replaced by a checkpoint that the log on disk cannot lead to: a
    /// snapshot of it must be on disk before this replica says it installed it. The log
    /// after it (`log_after`) starts the next segment.
    Snapshot { checkpoint: Checkpoint, log_after: Vec<pb::Entry> },
}

/// What a replica recovered from its disk.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The last snapshot: the state after every entry up to its seq.
    pub checkpoint: Checkpoint,
    /// The log after the snapshot, contiguous.
    pub entries: Vec<pb::Entry>,
    pub config: Option<pb::Configuration>,
    pub synced_epoch: u64,
}

/// What to do with a client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Answer now (a retry answered from the session table).
    Reply(pb::ExecuteReply),
    /// Refuse with a typed error; nothing changed.
    Refuse(ReplicaError),
    /// Wait until the request executes here. Active mode, on a member that is not the
    /// order-keeper: also hand it to `forward_to` for ordering.
    Wait { forward_to: Option<pb::Member> },
}

/// What a leader should send a follower next.
#[derive(Debug, Clone)]
pub enum PeerWork {
    Append(pb::AppendRequest),
    /// A checkpoint: the whole state, or (with a base the follower installed from this
    /// leader) what changed since it.
    Checkpoint(Checkpoint, Option<Base>),
    /// Nothing to send until something changes.
    Idle,
    /// Not a peer of this leader (any more): the peer's sender should stop.
    Gone,
}

/// A leader's view of one follower (a member, or a joining learner).
#[derive(Debug, Clone)]
struct Progress {
    address: String,
    member: bool,
    /// Next sequence number to send.
    next_seq: u64,
    /// The follower's log agrees with ours up to here.
    match_seq: u64,
    /// Whether the follower has a consistent state (else its log does not count).
    has_state: bool,
    /// The commit sequence number the follower was last told.
    told_commit: u64,
    checkpoint_wanted: bool,
    checkpoint_in_flight: bool,
    checkpoint_seq: u64,
    /// Passive mode: the state of the checkpoint in flight, and of the last one the
    /// follower installed from this leader (the base of the next, which then carries
    /// only what changed). Clones of a persistent map: they cost what changed since.
    checkpoint_sent: Option<Base>,
    installed_base: Option<Base>,
}

impl Progress {
    fn new(address: String, member: bool, next_seq: u64) -> Self {
        Self {
            address,
            member,
            next_seq,
            match_seq: 0,
            has_state: false,
            told_commit: 0,
            checkpoint_wanted: false,
            checkpoint_in_flight: false,
            checkpoint_seq: 0,
            checkpoint_sent: None,
            installed_base: None,
        }
    }
}

/// What changed when a configuration was installed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    pub epoch: u64,
    pub role: Role,
    /// This replica led before and does not lead now: its waiting clients must go.
    pub stepped_down: bool,
    pub became_leader: bool,
}

#[derive(Debug, Clone)]
pub struct Core {
    id: String,
    config: Option<pb::Configuration>,
    state: StateMachine,
    /// Every entry up to here is reflected in `state`.
    applied_seq: u64,
    log: Log,
    commit_seq: u64,
    /// Whether `state` + `log` are a consistent prefix of the group's history. A fresh
    /// replica has none until a checkpoint arrives, unless it bootstraps a new group.
    has_state: bool,
    /// Header of a checkpoint being received, past the end of our log.
    pending_checkpoint: Option<u64>,
    /// The log and `has_state` as they were before that header restarted the log: put
    /// back if the checkpoint's body never arrives, so a stream that stops after its
    /// header (a failed transfer, a faulty sender) changes nothing.
    before_checkpoint: Option<(Log, bool)>,
    /// Last checkpoint installed (follower) or taken for a follower (leader).
    checkpoint_seq: u64,
    /// Leader only: followers.
    peers: BTreeMap<String, Progress>,
    /// Leader only: highest request id per client ordered but not yet executed.
    ordered: HashMap<String, u64>,
    /// Leader only: the log's end when this replica began leading the current epoch.
    epoch_start_seq: u64,
    /// Last epoch in which our log provably held every committed entry (see the RM's
    /// promotion rule: only a member synced during its current membership is safe).
    synced_epoch: u64,
    /// Bootstraps a new group: the first configuration finds it synced (all are empty).
    genesis: bool,
    /// Requests executed since the shell last drained them (`take_executed`).
    executed: Vec<Executed>,
    /// The shell's wall clock (unix ms) at the current event: a leader stamps the
    /// entries it orders with it. Never read by apply: the stamps are.
    now_ms: u64,
    /// This replica's session expiry window; a leader stamps it on what it orders, so
    /// the leader's setting is the group's (0: sessions never expire).
    session_expiry_ms: u64,
    /// Whether a write-ahead log records this replica (`take_persist` has work).
    persistence: bool,
    /// The state must be snapshotted at the next `take_persist` (the log on disk cannot
    /// lead to it).
    snapshot_wanted: bool,
    /// The (epoch, synced epoch) last handed out for writing.
    written_meta: (u64, u64),
    /// The log is on this replica's disk up to here: a leader counts itself as holding
    /// an entry only then (`u64::MAX` when acknowledgements do not wait for the disk).
    durable_seq: u64,
    /// The epoch of the configuration this replica recovered from its disk: it never
    /// leads in that epoch (it may have lost entries it ordered there before the crash,
    /// which followers hold; ordering others at the same sequence numbers would fork
    /// the log), only in a later one the RM hands out.
    recovered_epoch: u64,
}

impl Core {
    /// A replica with no configuration. `bootstrap`: it starts a new group, so its empty
    /// state is the group's state; otherwise it must get a checkpoint before it is ready.
    pub fn new(id: impl Into<String>, bootstrap: bool) -> Self {
        Self {
            id: id.into(),
            config: None,
            state: StateMachine::default(),
            applied_seq: 0,
            log: Log::default(),
            commit_seq: 0,
            has_state: bootstrap,
            pending_checkpoint: None,
            before_checkpoint: None,
            checkpoint_seq: 0,
            peers: BTreeMap::new(),
            ordered: HashMap::new(),
            epoch_start_seq: 0,
            synced_epoch: 0,
            genesis: bootstrap,
            executed: Vec::new(),
            now_ms: 0,
            session_expiry_ms: 0,
            persistence: false,
            snapshot_wanted: false,
            written_meta: (0, 0),
            durable_seq: u64::MAX,
            recovered_epoch: 0,
        }
    }

    /// A replica restarted from its disk: the state of its last snapshot, the log after
    /// it (nothing of which counts as committed until a leader says so), and the
    /// configuration it held, in which it will not lead.
    pub fn recovered(id: impl Into<String>, recovered: Recovered) -> Self {
        let Recovered { checkpoint, entries, config, synced_epoch } = recovered;
        let mut core = Self::new(id, true);
        core.genesis = config.is_none() && checkpoint.seq == 0 && entries.is_empty();
        core.log = Log::recovered(checkpoint.seq, checkpoint.seq_epoch, entries);
        core.state = checkpoint.state;
        core.applied_seq = checkpoint.seq;
        core.commit_seq = checkpoint.seq;
        core.checkpoint_seq = checkpoint.seq;
        core.recovered_epoch = config.as_ref().map_or(0, |c| c.epoch);
        core.written_meta = (core.recovered_epoch, synced_epoch);
        core.config = config;
        core.synced_epoch = synced_epoch;
        core.persistence = true;
        core.durable_seq = core.log.last_seq();
        core
    }

    /// A write-ahead log records this replica from now on. `wait_for_disk`: a leader
    /// counts an entry as its own only once the shell reports it on disk (`set_durable`).
    /// A replica with a state starts with a snapshot of it (the genesis state of a new
    /// group), so the disk always holds a state to replay the log on.
    pub fn enable_persistence(&mut self, wait_for_disk: bool) {
        if self.persistence {
            return;
        }
        self.persistence = true;
        self.durable_seq = if wait_for_disk { self.log.last_seq() } else { u64::MAX };
        self.snapshot_wanted = self.has_state;
    }

    /// The shell wrote the log to disk up to `seq` (fsync durability).
    pub fn set_durable(&mut self, seq: u64) {
        if self.durable_seq != u64::MAX {
            self.durable_seq = seq;
            self.advance();
        }
    }

    /// The log is on disk up to here (`u64::MAX`: not waited for).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The shell's periodic snapshot: one is handed out at the next `take_persist`.
    pub fn request_snapshot(&mut self) {
        self.snapshot_wanted = self.persistence && self.has_state;
    }

    /// The epoch this replica recovered in (0: not recovered), in which it never leads.
    pub fn recovered_epoch(&self) -> u64 {
        self.recovered_epoch
    }

    /// A snapshot of the state now (for the shell's periodic snapshots), with the log
    /// after it, which must start the next WAL segment.
    pub fn snapshot(&self) -> Option<Persist> {
        if !self.has_state || !self.persistence {
            return None;
        }
        // The state is the applied prefix; the log holds everything after it.
        let seq_epoch = self.log.epoch_at(self.applied_seq)?;
        let checkpoint = Checkpoint { seq: self.applied_seq, seq_epoch, state: self.state.clone() };
        Some(Persist::Snapshot { checkpoint, log_after: self.log.after(self.applied_seq).cloned().collect() })
    }

    /// What the write-ahead log must record since the last call, in order. Nothing
    /// without persistence, or without a state (what a replica logs before its first
    /// checkpoint counts for nothing: it starts over from that checkpoint).
    pub fn take_persist(&mut self) -> Vec<Persist> {
        if !self.persistence {
            return Vec::new();
        }
        let written_from = self.log.take_written();
        if !self.has_state {
            self.snapshot_wanted = false;
            return Vec::new();
        }
        let mut persist = Vec::new();
        if std::mem::take(&mut self.snapshot_wanted) {
            // The snapshot's segment starts with the whole log after it: nothing else to
            // write of the log.
            persist.extend(self.snapshot());
        } else if let Some(from) = written_from.filter(|&from| from <= self.log.base_seq()) {
            // Entries never written are no longer in memory (folded into a checkpoint in
            // the same event): the state itself must go to disk.
            let _ = from;
            persist.extend(self.snapshot());
        } else if let Some(from) = written_from {
            if self.durable_seq != u64::MAX {
                self.durable_seq = self.durable_seq.min(from - 1);
            }
            persist.push(Persist::Entries { from, entries: self.log.after(from - 1).cloned().collect() });
        }
        let meta = (self.epoch(), self.synced_epoch);
        if meta != self.written_meta || persist.iter().any(|p| matches!(p, Persist::Snapshot { .. })) {
            self.written_meta = meta;
            persist.push(Persist::Meta { config: self.config.clone(), synced_epoch: self.synced_epoch });
        }
        persist
    }

    /// The shell's wall clock at the event about to be applied (unix ms).
    pub fn set_clock(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The session expiry window this replica stamps on entries while it leads (0:
    /// never). Checked by the caller (`state::check_session_expiry`).
    pub fn set_session_expiry(&mut self, window_ms: u64) {
        self.session_expiry_ms = window_ms;
    }

    pub fn session_expiry_ms(&self) -> u64 {
        self.session_expiry_ms
    }

    /// The requests that executed (or were refused at their turn) since the last call:
    /// the shell answers their waiting clients after every event.
    pub fn take_executed(&mut self) -> Vec<Executed> {
        std::mem::take(&mut self.executed)
    }

    // ------------------------------------------------------------ queries

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> Option<&pb::Configuration> {
        self.config.as_ref()
    }

    pub fn epoch(&self) -> u64 {
        self.config.as_ref().map_or(0, |c| c.epoch)
    }

    pub fn mode(&self) -> Mode {
        self.config.as_ref().map_or(Mode::Unspecified, |c| c.mode())
    }

    fn member(&self, id: &str) -> Option<&pb::Member> {
        self.config.as_ref()?.member(id)
    }

    pub fn is_member(&self) -> bool {
        self.member(&self.id).is_some()
    }

    fn named_primary(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.primary == self.id)
    }

    /// Leads (orders requests) in the current configuration.
    pub fn is_leader(&self) -> bool {
        self.has_state && self.named_primary() && self.is_member() && self.epoch() > self.recovered_epoch
    }

    /// Has a configuration and a consistent state: may serve, and may be added.
    pub fn is_ready(&self) -> bool {
        self.config.is_some() && self.has_state
    }

    fn executes(&self) -> bool {
        self.has_state && (self.mode() == Mode::Active || self.is_leader())
    }

    pub fn role(&self) -> Role {
        match &self.config {
            None => Role::Unconfigured,
            Some(_) if !self.has_state => Role::Joining,
            Some(_) if !self.is_member() => Role::Standby,
            Some(_) if self.named_primary() => Role::Primary,
            Some(_) => Role::Backup,
        }
    }

    pub fn not_ready_reason(&self) -> Option<String> {
        if self.config.is_none() {
            Some("no configuration installed yet".into())
        } else if let Some(seq) = self.pending_checkpoint.filter(|_| !self.has_state) {
            Some(format!("receiving checkpoint at seq {seq}"))
        } else if !self.has_state {
            Some("joining: waiting for a checkpoint from the leader".into())
        } else {
            None
        }
    }

    pub fn leader(&self) -> Option<&pb::Member> {
        self.config.as_ref()?.leader()
    }

    pub fn last_seq(&self) -> u64 {
        self.log.last_seq()
    }

    pub fn commit_seq(&self) -> u64 {
        self.commit_seq
    }

    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    pub fn checkpoint_seq(&self) -> u64 {
        self.checkpoint_seq
    }

    pub fn synced_epoch(&self) -> u64 {
        self.synced_epoch
    }

    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    pub fn keys(&self) -> usize {
        self.state.keys()
    }

    /// Client sessions in the local state.
    pub fn sessions(&self) -> usize {
        self.state.session_count()
    }

    /// Leader: each follower, whether it is a member, and how far its log matches.
    pub fn followers(&self) -> Vec<(String, bool, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        self.peers.iter().map(|(id, p)| (id.clone(), p.member, p.match_seq)).collect()
    }

    /// Followers this leader replicates to: (id, address).
    pub fn peer_addresses(&self) -> Vec<(String, String)> {
        self.peers.iter().map(|(id, p)| (id.clone(), p.address.clone())).collect()
    }

    /// The state as of the commit point, and the entries still to replay on it for a
    /// passive backup (whose state is its last checkpoint). Cheap: the digest itself is
    /// computed by the caller, outside any lock.
    pub fn committed_state(&self) -> (StateMachine, Vec<pb::Entry>, u64) {
        let replay = if self.has_state && self.commit_seq > self.applied_seq {
            self.log.after(self.applied_seq).take_while(|e| e.seq <= self.commit_seq).cloned().collect()
        } else {
            Vec::new()
        };
        let seq =
            if self.has_state { self.applied_seq.max(self.commit_seq.min(self.log.last_seq())) } else { 0 };
        (self.state.clone(), replay, seq)
    }

    fn not_ready(&self) -> ReplicaError {
        ReplicaError::NotReady {
            replica: self.id.clone(),
            epoch: self.epoch(),
            reason: self.not_ready_reason().unwrap_or_else(|| "not a member of the configuration".into()),
        }
    }

    fn not_primary(&self) -> ReplicaError {
        let leader = self.leader().cloned().unwrap_or_default();
        ReplicaError::NotPrimary {
            replica: self.id.clone(),
            epoch: self.epoch(),
            primary_id: leader.id,
            primary_address: leader.address,
        }
    }

    /// Checks a peer message's epoch against ours: older is refused with our
    /// configuration (so the sender learns where the group went), newer asks for the
    /// configuration first.
    fn check_epoch(&self, epoch: u64) -> Result<(), ReplicaError> {
        let current = self.epoch();
        if epoch < current {
            Err(ReplicaError::WrongEpoch {
                replica: self.id.clone(),
                got: epoch,
                current,
                configuration: self.config.clone(),
            })
        } else if epoch > current {
            Err(ReplicaError::ConfigurationRequired { replica: self.id.clone(), have: current, want: epoch })
        } else {
            Ok(())
        }
    }

    // ------------------------------------------------------------ configuration

    /// Installs a configuration from the RM (directly, or relayed by a peer).
    pub fn install_config(&mut self, config: pb::Configuration) -> Result<ConfigChange, ReplicaError> {
        check_configuration(&config)?;
        if let Some(current) = &self.config
            && config.epoch > current.epoch.saturating_add(MAX_EPOCH_JUMP)
        {
            return Err(ReplicaError::InvalidRequest {
                field: "configuration.epoch".into(),
                reason: format!(
                    "epoch {} is more than {MAX_EPOCH_JUMP} ahead of this replica's {}: no RM hands out such a jump; refused",
                    config.epoch, current.epoch
                ),
            });
        }
        if let Some(current) = &self.config {
            if config.epoch < current.epoch {
                return Err(ReplicaError::WrongEpoch {
                    replica: self.id.clone(),
                    got: config.epoch,
                    current: current.epoch,
                    configuration: Some(current.clone()),
                });
            }
            if config.epoch == current.epoch {
                if &config == current {
                    return Ok(ConfigChange {
                        epoch: config.epoch,
                        role: self.role(),
                        stepped_down: false,
                        became_leader: false,
                    });
                }
                return Err(ReplicaError::InvalidRequest {
                    field: "configuration".into(),
                    reason: format!(
                        "epoch {} already has a different configuration (primary {}); a new configuration needs a new epoch",
                        current.epoch, current.primary
                    ),
                });
            }
        }
        let was_leader = self.is_leader();
        self.config = Some(config);
        let is_leader = self.is_leader();
        if std::mem::take(&mut self.genesis) && self.has_state && self.log.last_seq() == 0 {
            self.synced_epoch = self.epoch();
        }
        if is_leader {
            // The leader's log defines the group's history from here on.
            self.epoch_start_seq = self.log.last_seq();
            self.synced_epoch = self.epoch();
            if !was_leader {
                self.peers.clear();
                self.ordered = self.unexecuted_requests();
            }
            self.sync_peers();
        } else {
            self.peers.clear();
            self.ordered.clear();
        }
        self.advance();
        Ok(ConfigChange {
            epoch: self.epoch(),
            role: self.role(),
            stepped_down: was_leader && !is_leader,
            became_leader: is_leader && !was_leader,
        })
    }

    /// Highest request id per client among logged, unexecuted entries: what a new
    /// leader must not order a second time.
    fn unexecuted_requests(&self) -> HashMap<String, u64> {
        let mut ordered = HashMap::new();
        for entry in self.log.after(self.applied_seq) {
            let highest = ordered.entry(entry.client_id.clone()).or_insert(0);
            *highest = entry.request_id.max(*highest);
        }
        ordered
    }

    /// Leader: one progress per member (keeping what it knew), learners kept.
    fn sync_peers(&mut self) {
        let next = self.log.last_seq() + 1;
        let members: Vec<pb::Member> = self.config.iter().flat_map(|c| c.members.clone()).collect();
        // Members the RM removed are dropped; learners still joining are kept.
        self.peers.retain(|id, progress| !progress.member || members.iter().any(|m| &m.id == id));
        for progress in self.peers.values_mut() {
            progress.member = false;
        }
        for member in members.into_iter().filter(|m| m.id != self.id) {
            let progress = self
                .peers
                .entry(member.id)
                .or_insert_with(|| Progress::new(member.address.clone(), true, next));
            progress.member = true;
            progress.address = member.address;
        }
    }

    // ------------------------------------------------------------ client requests

    /// Decides what to do with a client request; a leader orders it right away.
    pub fn route(&mut self, request: &pb::ExecuteRequest) -> Route {
        match self.route_checked(request) {
            Ok(route) => route,
            Err(error) => Route::Refuse(error),
        }
    }

    fn route_checked(&mut self, request: &pb::ExecuteRequest) -> Result<Route, ReplicaError> {
        validate(&request.client_id, request.request_id, request.op.as_ref()).map_err(|invalid| {
            ReplicaError::InvalidRequest { field: invalid.field.into(), reason: invalid.reason }
        })?;
        if self.config.is_none() || !self.has_state {
            return Err(self.not_ready());
        }
        if request.epoch != 0 && request.epoch != self.epoch() {
            return Err(ReplicaError::WrongEpoch {
                replica: self.id.clone(),
                got: request.epoch,
                current: self.epoch(),
                configuration: None,
            });
        }
        match self.mode() {
            Mode::Active if !self.is_member() => return Err(self.not_ready()),
            Mode::Active => {}
            _ if !self.is_leader() => return Err(self.not_primary()),
            _ => {}
        }
        if let Some(reply) =
            self.answer_from_session(&request.client_id, request.request_id, request.op.as_ref())?
        {
            return Ok(Route::Reply(reply));
        }
        if self.is_leader() {
            self.order(&request.client_id, request.request_id, request.op.clone());
            return Ok(Route::Wait { forward_to: None });
        }
        Ok(Route::Wait { forward_to: self.leader().cloned() })
    }

    /// A retry of the session's last request is answered from the table; an older one
    /// is stale; the last request id with another operation is a reused id.
    fn answer_from_session(
        &self,
        client_id: &str,
        request_id: u64,
        op: Option<&pb::Operation>,
    ) -> Result<Option<pb::ExecuteReply>, ReplicaError> {
        let Some(session) = self.state.session(client_id) else {
            return Ok(None);
        };
        if request_id == session.last_request_id {
            if op.map(op_digest) != Some(session.last_op_digest) {
                return Err(ReplicaError::RequestIdReused { client_id: client_id.into(), request_id });
            }
            return Ok(Some(pb::ExecuteReply {
                result: Some(session.last_reply.clone()),
                replica_id: self.id.clone(),
                epoch: self.epoch(),
                seq: session.last_seq,
            }));
        }
        if request_id < session.last_request_id {
            return Err(ReplicaError::StaleRequest {
                client_id: client_id.into(),
                request_id,
                last_request_id: session.last_request_id,
            });
        }
        Ok(None)
    }

    /// Whether `(client_id, request_id)` is ordered in this replica's log and not yet
    /// executed (among the first `MAX_BATCH_ENTRIES * 16` unexecuted entries): a member
    /// need not hand the order-keeper a request it already ordered.
    pub fn holds_unexecuted(&self, client_id: &str, request_id: u64) -> bool {
        self.log
            .after(self.applied_seq)
            .take(MAX_BATCH_ENTRIES * 16)
            .any(|entry| entry.request_id == request_id && entry.client_id == client_id)
    }

    /// Active mode: a member hands a client request to this order-keeper.
    pub fn on_order(&mut self, request: &pb::OrderRequest) -> Result<u64, ReplicaError> {
        self.check_epoch(request.epoch)?;
        validate(&request.client_id, request.request_id, request.op.as_ref()).map_err(|invalid| {
            ReplicaError::InvalidRequest { field: invalid.field.into(), reason: invalid.reason }
        })?;
        if !self.is_leader() {
            return Err(self.not_primary());
        }
        if self.answer_from_session(&request.client_id, request.request_id, request.op.as_ref())?.is_some() {
            return Ok(0);
        }
        Ok(self.order(&request.client_id, request.request_id, request.op.clone()))
    }

    /// Appends a request to the leader's log, once per (client, request id). Returns its
    /// sequence number (0: already ordered). The entry carries the leader's clock, never
    /// below an earlier entry's (a new leader's clock may lag the old one's), so that
    /// a session's last use never moves back and it never expires early.
    fn order(&mut self, client_id: &str, request_id: u64, op: Option<pb::Operation>) -> u64 {
        if self.ordered.get(client_id).is_some_and(|&highest| highest >= request_id) {
            return 0;
        }
        let seq = self.log.last_seq() + 1;
        let last_stamp = self.log.get(seq - 1).map_or(0, |e| e.stamp_ms);
        let stamp_ms = self.now_ms.max(last_stamp).max(self.state.clock_ms());
        self.log.push(pb::Entry {
            seq,
            epoch: self.epoch(),
            client_id: client_id.into(),
            request_id,
            op,
            stamp_ms,
            session_expiry_ms: self.session_expiry_ms,
        });
        self.ordered.insert(client_id.into(), request_id);
        seq
    }

    // ------------------------------------------------------------ leader side

    /// Registers a replica that wants to join: it gets a checkpoint, then the log.
    pub fn on_join(&mut self, id: &str, address: &str) -> Result<u64, ReplicaError> {
        if !self.is_leader() {
            return Err(self.not_primary());
        }
        if id == self.id {
            return Err(ReplicaError::InvalidRequest {
                field: "replica_id".into(),
                reason: format!("{id} is this leader's own id"),
            });
        }
        let next = self.log.last_seq() + 1;
        let member = self.member(id).is_some();
        let progress =
            self.peers.entry(id.into()).or_insert_with(|| Progress::new(address.into(), member, next));
        progress.address = address.into();
        Ok(self.epoch())
    }

    /// Forgets a learner that went away (members stay until the RM removes them).
    pub fn forget_learner(&mut self, id: &str) {
        if self.peers.get(id).is_some_and(|p| !p.member) {
            self.peers.remove(id);
        }
    }

    /// Passive mode: marks every follower behind the executed state for a checkpoint.
    pub fn schedule_checkpoints(&mut self) {
        if !self.is_leader() || self.mode() != Mode::Passive {
            return;
        }
        for progress in self.peers.values_mut() {
            if progress.has_state && progress.checkpoint_seq < self.applied_seq {
                progress.checkpoint_wanted = true;
            }
        }
    }

    /// What to send `peer` next. `keepalive`: send even an empty append (so a follower
    /// learns the commit point, or a deposed leader learns it was deposed).
    pub fn next_work(&mut self, peer: &str, keepalive: bool) -> PeerWork {
        if !self.is_leader() {
            return PeerWork::Gone;
        }
        let applied = self.applied_seq;
        let base = self.log.base_seq();
        let last = self.log.last_seq();
        let Some(progress) = self.peers.get_mut(peer) else {
            return PeerWork::Gone;
        };
        // Replies are checked before they move `next_seq`; this only makes sure that no
        // bookkeeping slip can ever point past the log (and panic the sender in a loop).
        progress.next_seq = progress.next_seq.min(last + 1);
        let passive = self.config.as_ref().is_some_and(|c| c.mode() == Mode::Passive);
        if !passive {
            // Only passive mode sends checkpoints of changes: no old state kept for them.
            progress.installed_base = None;
        }
        if progress.next_seq <= base && !progress.checkpoint_in_flight {
            progress.checkpoint_wanted = true;
        }
        if progress.checkpoint_wanted && !progress.checkpoint_in_flight {
            progress.checkpoint_wanted = false;
            progress.checkpoint_in_flight = true;
            progress.next_seq = applied + 1;
            let seq_epoch = self.log.epoch_at(applied).expect("a leader keeps the epoch of what it executed");
            progress.checkpoint_sent = passive.then(|| Base { seq: applied, state: self.state.clone() });
            let base = progress
                .installed_base
                .clone()
                .filter(|base| passive && progress.has_state && base.seq > 0 && base.seq < applied);
            return PeerWork::Checkpoint(
                Checkpoint { seq: applied, seq_epoch, state: self.state.clone() },
                base,
            );
        }
        if progress.next_seq <= base {
            return PeerWork::Idle;
        }
        let entries =
            self.log.slice(progress.next_seq, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES).unwrap_or_default();
        if entries.is_empty() && progress.told_commit >= self.commit_seq && !keepalive {
            return PeerWork::Idle;
        }
        let prev_seq = progress.next_seq - 1;
        let Some(prev_epoch) = self.log.epoch_at(prev_seq) else {
            // Cannot happen (base < next_seq <= last + 1); if it did, a checkpoint heals it.
            progress.checkpoint_wanted = true;
            return PeerWork::Idle;
        };
        let config = self.config.as_ref().expect("a leader has a configuration");
        PeerWork::Append(pb::AppendRequest {
            epoch: config.epoch,
            leader_id: self.id.clone(),
            prev_seq,
            prev_epoch,
            entries,
            commit_seq: self.commit_seq,
            epoch_start_seq: self.epoch_start_seq,
        })
    }

    /// A follower answered an append. An answer no correct follower could give is
    /// refused (`BadReply`) and changes nothing.
    pub fn on_append_reply(
        &mut self,
        peer: &str,
        sent: &pb::AppendRequest,
        reply: &pb::AppendReply,
    ) -> Result<(), BadReply> {
        if sent.epoch != self.epoch() || !self.is_leader() {
            return Ok(());
        }
        check_append_reply(peer, reply, self.log.last_seq())?;
        let Some(progress) = self.peers.get_mut(peer) else {
            return Ok(());
        };
        progress.has_state = reply.has_state;
        // A follower without a state (it restarted) no longer holds its base: the whole
        // state next, without a refused transfer first. (Any other loss of the base is
        // caught by `change_base`, at the cost of one refusal.)
        if !reply.has_state {
            progress.installed_base = None;
        }
        if reply.matched {
            let sent_through = sent.prev_seq + sent.entries.len() as u64;
            let through = reply.match_seq.min(sent_through);
            if reply.has_state {
                // Entries held without a state (while a checkpoint streams in) do not
                // count: if that checkpoint never arrives, the follower puts its old log
                // back, and a match raised now would count entries it no longer has.
                progress.match_seq = progress.match_seq.max(through);
                progress.told_commit = progress.told_commit.max(sent.commit_seq.min(through));
            } else if !progress.checkpoint_in_flight {
                // No state and nothing on its way from us: whatever it waits for (another
                // leader's checkpoint) may never come.
                progress.checkpoint_wanted = true;
            }
            progress.next_seq = progress.next_seq.max(through + 1);
            progress.checkpoint_seq = progress.checkpoint_seq.max(reply.base_seq);
        } else if !progress.checkpoint_in_flight {
            // Back up: one entry, or straight to the follower's end if that is earlier.
            let backed_up = (sent.prev_seq).min(reply.last_seq.saturating_add(1)).max(reply.base_seq + 1);
            progress.next_seq = backed_up.min(progress.next_seq).max(1);
            if !reply.has_state {
                progress.checkpoint_wanted = true;
            }
        }
        self.advance();
        Ok(())
    }

    /// A checkpoint transfer to `peer` ended: the follower's answer, or `None` when the
    /// transfer failed (the shell logged why; it is retried). An answer no correct
    /// follower could give counts as a failed transfer, and comes back as `BadReply`.
    pub fn on_checkpoint_sent(
        &mut self,
        peer: &str,
        seq: u64,
        installed: Option<&pb::InstallCheckpointReply>,
    ) -> Result<(), BadReply> {
        let limit = self.log.last_seq();
        // A follower's checkpoint only ever holds committed entries, all in a leader's log
        // (a replica that does not lead has no follower: a late answer changes nothing).
        let bad = installed.filter(|reply| self.is_leader() && reply.installed_seq > limit).map(|reply| {
            BadReply { peer: peer.to_owned(), field: "installed_seq", got: reply.installed_seq, limit }
        });
        let Some(progress) = self.peers.get_mut(peer) else {
            return bad.map_or(Ok(()), Err);
        };
        progress.checkpoint_in_flight = false;
        let sent = progress.checkpoint_sent.take();
        // The next checkpoint carries only changes if the follower installed exactly
        // this one and takes changes; after anything else (a failure, a refusal, an
        // older follower), the whole state.
        progress.installed_base = match installed {
            Some(reply) if bad.is_none() && reply.takes_changes && reply.installed_seq == seq => {
                sent.filter(|base| base.seq == seq)
            }
            _ => None,
        };
        match installed.filter(|_| bad.is_none()) {
            Some(reply) => {
                progress.checkpoint_seq = progress.checkpoint_seq.max(reply.installed_seq);
                progress.has_state = true;
                progress.match_seq = progress.match_seq.max(reply.installed_seq.min(seq));
                if progress.next_seq <= reply.installed_seq {
                    progress.next_seq = reply.installed_seq + 1;
                }
            }
            None => progress.checkpoint_wanted = true,
        }
        self.checkpoint_seq = self.checkpoint_seq.max(seq);
        bad.map_or(Ok(()), Err)
    }

    /// Leader: the commit point is what every member holds. Everyone: execute what is
    /// committed if this replica executes, then fold executed entries out of the log.
    pub fn advance(&mut self) {
        if self.is_leader() {
            let held_by_all = self
                .peers
                .values()
                .filter(|p| p.member)
                .map(|p| if p.has_state { p.match_seq } else { 0 })
                .fold(self.log.last_seq().min(self.durable_seq), u64::min);
            self.commit_seq = self.commit_seq.max(held_by_all);
        }
        self.apply_committed();
        self.compact();
    }

    fn apply_committed(&mut self) {
        if !self.executes() {
            return;
        }
        while self.applied_seq < self.commit_seq {
            let seq = self.applied_seq + 1;
            let Some(entry) = self.log.get(seq) else {
                break;
            };
            let op = entry.op.clone().unwrap_or_default();
            let outcome = self.state.apply_entry(entry);
            if self.ordered.get(&entry.client_id).is_some_and(|&highest| highest <= entry.request_id) {
                self.ordered.remove(&entry.client_id);
            }
            self.executed.push(Executed {
                seq,
                client_id: entry.client_id.clone(),
                request_id: entry.request_id,
                op_digest: op_digest(&op),
                outcome,
            });
            self.applied_seq = seq;
        }
    }

    /// Drops log entries nobody needs: a follower keeps what it has not folded into its
    /// state; a leader also keeps what its followers still lack (within a bound).
    fn compact(&mut self) {
        let mut upto = self.applied_seq;
        if let Some(from) = self.log.unwritten_from().filter(|_| self.persistence) {
            // Entries not yet handed to the write-ahead log stay until they are.
            upto = upto.min(from - 1);
        }
        if self.is_leader() {
            let slowest = self.peers.values().map(|p| p.match_seq).min().unwrap_or(upto);
            upto = upto.min(slowest.max(upto.saturating_sub(LEADER_LOG_RETENTION)));
        }
        if upto > self.log.base_seq() {
            let epoch = self.log.epoch_at(upto).expect("executed entries are in the log");
            self.log.compact_to(upto, epoch);
        }
    }

    // ------------------------------------------------------------ follower side

    /// A leader's append. Returns the answer (an active member may execute entries).
    pub fn on_append(&mut self, request: &pb::AppendRequest) -> Result<pb::AppendReply, ReplicaError> {
        self.check_epoch(request.epoch)?;
        self.check_leader(&request.leader_id)?;
        self.check_entries(request)?;
        if !self.has_state && self.pending_checkpoint.is_none() {
            return Ok(self.append_reply(false, 0));
        }
        match self.log.accept(request.prev_seq, request.prev_epoch, &request.entries) {
            Accepted::Matched { through } => {
                self.commit_seq = self.commit_seq.max(request.commit_seq.min(through));
                if self.has_state && through >= request.epoch_start_seq {
                    self.synced_epoch = self.synced_epoch.max(request.epoch);
                }
                self.advance();
                Ok(self.append_reply(true, through))
            }
            Accepted::Mismatch { .. } => Ok(self.append_reply(false, 0)),
        }
    }

    fn check_leader(&self, leader_id: &str) -> Result<(), ReplicaError> {
        let primary = self.config.as_ref().map(|c| c.primary.as_str()).unwrap_or_default();
        if leader_id != primary || leader_id == self.id {
            return Err(ReplicaError::InvalidRequest {
                field: "leader_id".into(),
                reason: format!(
                    "{leader_id} is not the leader of epoch {} (the primary is {primary})",
                    self.epoch()
                ),
            });
        }
        Ok(())
    }

    /// Refuses entries no correct leader sends, before the log changes: out of sequence
    /// after `prev_seq`, of an epoch after the leader's, or replacing an entry this
    /// replica knows committed (only an uncommitted suffix of a deposed leader is ever
    /// replaced; a committed one replaced would diverge from the group).
    fn check_entries(&self, request: &pb::AppendRequest) -> Result<(), ReplicaError> {
        let invalid = |reason: String| Err(ReplicaError::InvalidRequest { field: "entries".into(), reason });
        for (i, entry) in request.entries.iter().enumerate() {
            if Some(entry.seq) != request.prev_seq.checked_add(i as u64 + 1) {
                return invalid(format!("entry {i} after seq {} has seq {}", request.prev_seq, entry.seq));
            }
            if entry.epoch > request.epoch {
                return invalid(format!(
                    "entry {} is of epoch {}, after {}",
                    entry.seq, entry.epoch, request.epoch
                ));
            }
            if entry.seq <= self.commit_seq && self.log.epoch_at(entry.seq).is_some_and(|e| e != entry.epoch)
            {
                return invalid(format!("entry {} would replace a committed entry", entry.seq));
            }
        }
        Ok(())
    }

    fn append_reply(&self, matched: bool, match_seq: u64) -> pb::AppendReply {
        pb::AppendReply {
            matched,
            match_seq,
            last_seq: self.log.last_seq(),
            has_state: self.has_state,
            base_seq: self.log.base_seq(),
        }
    }

    /// The header of a checkpoint arrived. If it reaches past our log, the log restarts
    /// at its sequence number (entries after it may arrive while the body streams), and
    /// we have no consistent state until the body is installed. The log as it was is
    /// kept aside until then: `abandon_checkpoint` puts it back.
    pub fn on_checkpoint_header(&mut self, header: &pb::CheckpointHeader) -> Result<(), ReplicaError> {
        self.check_epoch(header.epoch)?;
        self.check_leader(&header.leader_id)?;
        if header.seq > MAX_SEQ {
            return Err(ReplicaError::BadCheckpoint {
                reason: format!("sequence number {} is beyond any group's (at most {MAX_SEQ})", header.seq),
            });
        }
        if header.seq > self.log.last_seq() && header.seq > self.applied_seq {
            let restarted = Log::starting_at(header.seq, header.seq_epoch);
            let before = std::mem::replace(&mut self.log, restarted);
            // A second header while the first streams: go back to the log before the first.
            if self.before_checkpoint.is_none() {
                self.before_checkpoint = Some((before, self.has_state));
            }
            self.has_state = false;
            self.pending_checkpoint = Some(header.seq);
        }
        Ok(())
    }

    /// The checkpoint announced at `seq` will not arrive (its stream broke, timed out, or
    /// was refused): the log and state go back to what they were before its header.
    pub fn abandon_checkpoint(&mut self, seq: u64) {
        if self.pending_checkpoint != Some(seq) {
            return;
        }
        self.pending_checkpoint = None;
        if let Some((log, has_state)) = self.before_checkpoint.take() {
            self.log = log;
            self.has_state = has_state;
        }
        self.advance();
    }

    /// A whole, verified checkpoint arrived: it replaces the state if it is newer; the
    /// logged entries past it are then replayed (active) or kept (passive backup).
    pub fn install_checkpoint(&mut self, checkpoint: Checkpoint) {
        if self.has_state && checkpoint.seq <= self.applied_seq {
            return;
        }
        // The log on disk leads to this state only if it held the entries before it; a
        // header that restarted the log, or a replica without a state, needs a snapshot.
        let log_restarted = self.before_checkpoint.is_some() || !self.has_state;
        self.pending_checkpoint = None;
        self.before_checkpoint = None;
        if checkpoint.seq >= self.log.base_seq() {
            self.log.compact_to(checkpoint.seq, checkpoint.seq_epoch);
        } else {
            // Without a state, a log starting after the checkpoint is of no use: start
            // over from the checkpoint; the leader resends what follows it.
            self.log = Log::starting_at(checkpoint.seq, checkpoint.seq_epoch);
        }
        self.state = checkpoint.state;
        self.applied_seq = checkpoint.seq;
        self.checkpoint_seq = checkpoint.seq;
        self.commit_seq = self.commit_seq.max(checkpoint.seq);
        self.has_state = true;
        self.snapshot_wanted |= self.persistence && log_restarted;
        self.advance();
    }

    /// The follower's answer to a finished checkpoint transfer.
    pub fn checkpoint_reply(&self) -> pb::InstallCheckpointReply {
        // Changes apply to a passive backup's state only, at exactly its checkpoint.
        let holds_checkpoint = self.has_state && self.applied_seq == self.checkpoint_seq;
        pb::InstallCheckpointReply {
            installed_seq: self.checkpoint_seq,
            last_seq: self.log.last_seq(),
            takes_changes: holds_checkpoint && self.mode() == Mode::Passive && !self.is_leader(),
        }
    }

    /// The state a checkpoint of changes (`header.base_seq`) applies to: this replica's,
    /// if it is a passive backup whose state is at exactly that seq (its last checkpoint).
    /// The sender is checked first, as `on_checkpoint_header` checks it: a deposed leader
    /// learns of the newer epoch.
    pub fn change_base(&self, header: &pb::CheckpointHeader) -> Result<StateMachine, ReplicaError> {
        self.check_epoch(header.epoch)?;
        self.check_leader(&header.leader_id)?;
        let base_seq = header.base_seq;
        let passive_backup = self.mode() == Mode::Passive && !self.is_leader();
        if self.has_state && passive_backup && self.applied_seq == base_seq && self.checkpoint_seq == base_seq
        {
            return Ok(self.state.clone());
        }
        Err(ReplicaError::BadCheckpoint {
            reason: format!(
                "a checkpoint of changes since seq {base_seq}, but this replica's state is at seq {} \
                 (its last checkpoint: seq {}; state: {}; passive backup: {passive_backup}); the leader \
                 sends the whole state next",
                self.applied_seq, self.checkpoint_seq, self.has_state
            ),
        })
    }

    pub fn status(&self, address: &str, checkpoint_interval_ms: u64) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            replica_id: self.id.clone(),
            address: address.into(),
            role: self.role().into(),
            ready: self.is_ready(),
            configuration: self.config.clone(),
            last_seq: self.log.last_seq(),
            commit_seq: self.commit_seq,
            applied_seq: self.applied_seq,
            checkpoint_seq: self.checkpoint_seq,
            checkpoint_interval_ms,
            keys: self.state.keys() as u64,
            sessions: self.state.session_count() as u64,
            session_expiry_ms: self.session_expiry_ms,
            not_ready_reason: self.not_ready_reason().unwrap_or_default(),
            synced_epoch: self.synced_epoch,
            has_state: self.has_state,
            recovered_epoch: self.recovered_epoch,
            ..pb::ReplicaStatus::default()
        }
    }
}

/// Whether a follower's append answer is one a correct follower could give, with this
/// leader's log ending at `last_seq`: what it matched, and its checkpoint, lie within the
/// leader's log (every committed entry is in it; a follower's checkpoint only ever holds
/// committed ones). Its own log may be longer (a deposed leader's leftovers).
fn check_append_reply(peer: &str, reply: &pb::AppendReply, last_seq: u64) -> Result<(), BadReply> {
    let bad = |field, got, limit| Err(BadReply { peer: peer.to_owned(), field, got, limit });
    if reply.matched && reply.match_seq > last_seq {
        return bad("match_seq", reply.match_seq, last_seq);
    }
    if reply.base_seq > last_seq {
        return bad("base_seq", reply.base_seq, last_seq);
    }
    if reply.base_seq > reply.last_seq {
        return bad("base_seq", reply.base_seq, reply.last_seq);
    }
    Ok(())
}

/// Rejects a configuration that no RM could have meant.
pub fn check_configuration(config: &pb::Configuration) -> Result<(), ReplicaError> {
    let invalid =
        |field: &str, reason: String| Err(ReplicaError::InvalidRequest { field: field.into(), reason });
    if config.epoch == 0 || config.epoch > MAX_EPOCH {
        return invalid("epoch", format!("must be 1..{MAX_EPOCH}, got {}", config.epoch));
    }
    if !matches!(config.mode(), Mode::Passive | Mode::Active) {
        return invalid("mode", format!("must be passive or active, got {}", config.mode));
    }
    if config.members.is_empty() {
        return invalid("members", "must name at least one replica".into());
    }
    let mut seen = std::collections::HashSet::new();
    for member in &config.members {
        if member.id.is_empty() || member.address.is_empty() {
            return invalid("members", format!("member {:?} needs an id and an address", member.id));
        }
        if !seen.insert(member.id.as_str()) {
            return invalid("members", format!("{} is listed twice", member.id));
        }
    }
    if !seen.contains(config.primary.as_str()) {
        return invalid("primary", format!("{:?} is not a member", config.primary));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(epoch: u64, primary: &str, ids: &[&str]) -> pb::Configuration {
        pb::Configuration {
            epoch,
            mode: Mode::Passive.into(),
            primary: primary.into(),
            members: ids
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: format!("{id}:1") })
                .collect(),
        }
    }

    fn put(client: &str, request_id: u64, key: &str) -> pb::ExecuteRequest {
        pb::ExecuteRequest {
            client_id: client.into(),
            request_id,
            op: Some(pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put { key: key.into(), value: "v".into() })),
            }),
            epoch: 0,
        }
    }

    /// A passive group of two at epoch 1: leader r1, backup r2.
    fn pair() -> (Core, Core) {
        let (mut leader, mut backup) = (Core::new("r1", true), Core::new("r2", true));
        leader.install_config(config(1, "r1", &["r1", "r2"])).expect("epoch 1");
        backup.install_config(config(1, "r1", &["r1", "r2"])).expect("epoch 1");
        (leader, backup)
    }

    /// Delivers whatever the leader has for the backup, and the backup's correct
    /// answers, until the leader has nothing more to send (bounded).
    fn exchange(leader: &mut Core, backup: &mut Core) {
        for _ in 0..100 {
            match leader.next_work("r2", false) {
                PeerWork::Append(request) => {
                    let reply = backup.on_append(&request).expect("the backup takes the append");
                    leader.on_append_reply("r2", &request, &reply).expect("a correct answer");
                }
                PeerWork::Checkpoint(checkpoint, base) => {
                    let seq = checkpoint.seq;
                    let installed = deliver(checkpoint, base, leader.epoch(), backup).expect("installed");
                    assert_eq!(installed.seq, seq);
                    let reply = backup.checkpoint_reply();
                    leader.on_checkpoint_sent("r2", seq, Some(&reply)).expect("a correct answer");
                }
                PeerWork::Idle | PeerWork::Gone => return,
            }
        }
        panic!("the leader never ran out of work for its backup");
    }

    /// A checkpoint's chunks, through the assembler and into `backup`, as the server
    /// would: a checkpoint of changes starts from the backup's own state.
    fn deliver(
        checkpoint: Checkpoint,
        base: Option<Base>,
        epoch: u64,
        backup: &mut Core,
    ) -> Result<Checkpoint, String> {
        let mut chunks: Box<dyn Iterator<Item = pb::CheckpointChunk>> = match base {
            Some(base) => Box::new(checkpoint.into_change_chunks(base, epoch, "r1".into())),
            None => Box::new(checkpoint.into_chunks(epoch, "r1".into())),
        };
        let mut assembler = crate::checkpoint::Assembler::default();
        let header = assembler.push(chunks.next().expect("a header")).map_err(|e| e.to_string())?.cloned();
        let header = header.expect("the header first");
        if header.base_seq != 0 {
            assembler.start_from(backup.change_base(&header).map_err(|e| e.to_string())?);
        }
        backup.on_checkpoint_header(&header).map_err(|e| e.to_string())?;
        for chunk in chunks {
            assembler.push(chunk).map_err(|e| e.to_string())?;
        }
        let installed = assembler.finish().map_err(|e| e.to_string())?;
        backup.install_checkpoint(installed.clone());
        Ok(installed)
    }

    /// Passive mode: after a backup installed a whole checkpoint from this leader, the
    /// next ones carry only what changed, and bring it to the leader's state; after a
    /// failed transfer (or a backup that no longer holds the base) the whole state again.
    #[test]
    fn periodic_checkpoints_carry_only_changes_once_the_backup_holds_a_base() {
        let (mut leader, mut backup) = pair();
        write(&mut leader, &mut backup, "c", 3);
        let checkpoint = |leader: &mut Core| {
            leader.schedule_checkpoints();
            match leader.next_work("r2", false) {
                PeerWork::Checkpoint(checkpoint, base) => (checkpoint, base),
                other => panic!("expected a checkpoint, got {other:?}"),
            }
        };
        let (first, base) = checkpoint(&mut leader);
        assert!(base.is_none(), "the first checkpoint is the whole state");
        let seq = first.seq;
        deliver(first, base, 1, &mut backup).expect("installed");
        leader.on_checkpoint_sent("r2", seq, Some(&backup.checkpoint_reply())).expect("a correct answer");

        write(&mut leader, &mut backup, "d", 2);
        let (second, base) = checkpoint(&mut leader);
        assert_eq!(base.as_ref().map(|b| b.seq), Some(seq), "changes since the installed one");
        let seq = second.seq;
        deliver(second, base, 1, &mut backup).expect("changes installed");
        assert_eq!(backup.state.digest(), leader.state.digest());
        leader.on_checkpoint_sent("r2", seq, Some(&backup.checkpoint_reply())).expect("a correct answer");

        // A transfer that failed: the next one is the whole state.
        write(&mut leader, &mut backup, "e", 1);
        let (third, base) = checkpoint(&mut leader);
        assert!(base.is_some());
        leader.on_checkpoint_sent("r2", third.seq, None).expect("no answer to check");
        let (fourth, base) = checkpoint(&mut leader);
        assert!(base.is_none(), "after a failure, the whole state");

        // Changes on a state at another seq: refused, and nothing changes.
        let stale = Base { seq: 1, state: StateMachine::default() };
        let before = (backup.applied_seq, backup.state.digest());
        let refused = deliver(fourth, Some(stale), 1, &mut backup).expect_err("the backup is not at seq 1");
        assert!(refused.contains("the leader sends the whole state next"), "{refused}");
        assert_eq!((backup.applied_seq, backup.state.digest()), before);
    }

    /// Writes `n` keys through the leader and replicates them; returns the leader's
    /// commit point.
    fn write(leader: &mut Core, backup: &mut Core, client: &str, n: u64) -> u64 {
        for request_id in 1..=n {
            let route = leader.route(&put(client, request_id, &format!("{client}{request_id}")));
            assert!(matches!(route, Route::Wait { .. }), "{route:?}");
            exchange(leader, backup);
        }
        leader.commit_seq()
    }

    /// Issue 9: an out-of-range checkpoint sequence in InstallCheckpointReply made the
    /// leader's sender panic at `next_work` in a loop while the primary stayed SERVING.
    /// Every out-of-range answer is refused, changes nothing, and the leader goes on
    /// replicating (and committing) once the follower answers right again.
    #[test]
    fn a_faulty_follower_sends_out_of_range_replies_and_the_leader_keeps_serving() {
        let (mut leader, mut backup) = pair();
        let committed = write(&mut leader, &mut backup, "c", 3);
        assert_eq!(committed, 3);
        let last = leader.last_seq();
        let append = pb::AppendRequest {
            epoch: 1,
            leader_id: "r1".into(),
            prev_seq: last,
            prev_epoch: 1,
            commit_seq: last,
            ..Default::default()
        };
        let faulty_appends = [
            pb::AppendReply {
                matched: true,
                match_seq: u64::MAX,
                last_seq: u64::MAX,
                has_state: true,
                base_seq: 0,
            },
            pb::AppendReply {
                matched: true,
                match_seq: last + 7,
                last_seq: last + 7,
                has_state: true,
                base_seq: 0,
            },
            pb::AppendReply {
                matched: false,
                match_seq: 0,
                last_seq: u64::MAX,
                has_state: true,
                base_seq: u64::MAX,
            },
            pb::AppendReply { matched: false, match_seq: 0, last_seq: 2, has_state: false, base_seq: 9 },
        ];
        for reply in &faulty_appends {
            let refused = leader.on_append_reply("r2", &append, reply).expect_err("an impossible answer");
            assert_eq!(refused.peer, "r2");
            // The sender asks again, and gets work that fits the log, not a panic.
            for keepalive in [false, true] {
                if let PeerWork::Append(request) = leader.next_work("r2", keepalive) {
                    assert!(request.prev_seq <= leader.last_seq(), "{request:?}");
                }
            }
        }
        for installed_seq in [u64::MAX, last + 1, MAX_SEQ] {
            let reply =
                pb::InstallCheckpointReply { installed_seq, last_seq: installed_seq, takes_changes: true };
            let refused = leader.on_checkpoint_sent("r2", last, Some(&reply)).expect_err("an impossible seq");
            assert_eq!((refused.field, refused.got), ("installed_seq", installed_seq));
            for keepalive in [false, true] {
                if let PeerWork::Append(request) = leader.next_work("r2", keepalive) {
                    assert!(request.prev_seq <= leader.last_seq(), "{request:?}");
                }
            }
        }
        assert!(leader.is_leader());

        // The follower answers right again: new writes commit, and both hold them.
        let committed = write(&mut leader, &mut backup, "d", 2);
        assert_eq!(committed, last + 2, "the leader still commits");
        assert_eq!(backup.last_seq(), leader.last_seq());
    }

    /// A stream that stops after its header (a failed transfer, or a faulty sender's
    /// header-only checkpoint) used to leave the backup without a state and its log
    /// wiped, for good. Abandoned, the header changes nothing.
    #[test]
    fn a_checkpoint_that_stops_after_its_header_changes_nothing() {
        let (mut leader, mut backup) = pair();
        write(&mut leader, &mut backup, "c", 5);
        let before = (backup.last_seq(), backup.commit_seq(), backup.is_ready(), backup.role());
        let header = pb::CheckpointHeader {
            epoch: 1,
            leader_id: "r1".into(),
            seq: 1_000,
            seq_epoch: 1,
            ..Default::default()
        };
        backup.on_checkpoint_header(&header).expect("a header from the leader");
        assert!(!backup.is_ready(), "while the body streams, the backup has no consistent state");
        backup.abandon_checkpoint(1_000);
        assert_eq!((backup.last_seq(), backup.commit_seq(), backup.is_ready(), backup.role()), before);
        // And replication goes on from where it was.
        assert_eq!(write(&mut leader, &mut backup, "d", 1), 6);

        let absurd = pb::CheckpointHeader { seq: u64::MAX, ..header };
        let refused = backup.on_checkpoint_header(&absurd).expect_err("an absurd sequence number");
        assert!(matches!(refused, ReplicaError::BadCheckpoint { .. }), "{refused:?}");
        assert_eq!(backup.last_seq(), 6);
    }

    /// Issue 9: a forged configuration at epoch 2^63 made every later configuration of
    /// the RM "older", a permanent outage. Epochs only move by whole configurations, and
    /// those only within what an RM could have handed out.
    #[test]
    fn an_absurd_epoch_is_never_adopted_and_a_replica_that_missed_configurations_catches_up() {
        let (mut leader, mut backup) = pair();
        write(&mut leader, &mut backup, "c", 2);
        let append = match leader.next_work("r2", true) {
            PeerWork::Append(request) => request,
            other => panic!("expected an append, got {other:?}"),
        };
        for epoch in [1 << 63, u64::MAX, 1 + MAX_EPOCH_JUMP + 1] {
            // A peer message from a far epoch is not adopted: it asks for the configuration.
            let refused =
                backup.on_append(&pb::AppendRequest { epoch, ..append.clone() }).expect_err("far epoch");
            assert!(matches!(refused, ReplicaError::ConfigurationRequired { .. }), "{refused:?}");
            let refused = backup.install_config(config(epoch, "r1", &["r1", "r2"])).expect_err("absurd jump");
            assert!(matches!(refused, ReplicaError::InvalidRequest { .. }), "{refused:?}");
            assert_eq!(backup.epoch(), 1, "nothing changed");
        }
        // A fresh replica takes any sane epoch; an insane one never.
        let mut fresh = Core::new("r3", false);
        assert!(fresh.install_config(config(1 << 63, "r1", &["r1", "r2"])).is_err());
        assert!(fresh.install_config(config(5_000_000, "r1", &["r1", "r2"])).is_ok());
        // A backup that missed many configurations still takes the current one.
        let current = 1 + MAX_EPOCH_JUMP;
        backup.install_config(config(current, "r1", &["r1", "r2"])).expect("a replica catches up");
        leader.install_config(config(current, "r1", &["r1", "r2"])).expect("a replica catches up");
        assert_eq!(write(&mut leader, &mut backup, "d", 1), 3, "the group goes on at the new epoch");
    }
}
