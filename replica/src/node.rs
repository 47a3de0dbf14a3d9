//! The replica's shell: the replication core under one lock, the clients waiting for
//! their requests, and what the background tasks watch (a change counter, readiness,
//! the epoch). Every event reaches the core through `Node::apply`, which then always
//! does what follows: answers the clients whose requests executed and publishes what
//! changed. No call site has to remember it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::checkpoint::Checkpoint;
use crate::error::ReplicaError;
use crate::pb::{self, Mode};
use crate::replication::{ConfigChange, Core, Executed};
use crate::state::Applied;
use crate::storage::{Durability, Storage, StorageError};
use crate::wire::Channels;

/// One replica's settings; the CLI fills them from flags and TANDEM_* variables.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Unique replica id within the group, e.g. `r1`.
    pub id: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address peers and clients use to reach this replica (default: `listen`).
    pub advertise: String,
    /// Start a new group: the empty state is the group's state (else: join, and wait
    /// for a checkpoint before becoming ready).
    pub bootstrap: bool,
    /// Replicas to ask for the current configuration when starting without one.
    pub seeds: Vec<String>,
    /// Passive mode: how often the primary checkpoints its backups (0: never).
    pub checkpoint_interval: Duration,
    /// Timeout of one call to a peer.
    pub peer_timeout: Duration,
    /// How long a client request may wait to execute before the client is told to retry.
    pub request_timeout: Duration,
    /// The GFD address for this replica's LFD (reported in Status; changeable).
    pub gfd_address: String,
    /// The group's name in peers' certificates (`namespace/service` on Kubernetes; ""
    /// locally): a peer's certificate must name `group/id` for the id it claims.
    pub group: String,
    /// How long an idle client session is remembered (`state::check_session_expiry`
    /// bounds it; changeable). The leader's setting is the group's: it stamps it on the
    /// entries it orders.
    pub session_expiry: Duration,
    /// Serve the client port over TLS (with this process's certificate).
    pub client_tls: bool,
    /// Calls on the client port must carry this token (`authorization: Bearer …`).
    pub client_token: Option<String>,
    /// Where the replica keeps its data (with durability other than `memory`).
    pub data_dir: Option<std::path::PathBuf>,
    pub durability: Durability,
}

impl ReplicaSettings {
    pub fn new(id: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            id: id.into(),
            listen,
            advertise: listen.to_string(),
            bootstrap: false,
            seeds: Vec::new(),
            checkpoint_interval: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            gfd_address: String::new(),
            group: String::new(),
            session_expiry: Duration::from_millis(crate::state::DEFAULT_SESSION_EXPIRY_MS),
            client_tls: false,
            client_token: None,
            data_dir: None,
            durability: Durability::Memory,
        }
    }

    /// The source address of calls to peers: the listen address when it is a specific
    /// loopback one (local mode can give each replica its own), else the system's choice.
    fn dial_from(&self) -> Option<IpAddr> {
        let ip = self.listen.ip();
        (ip.is_loopback() && ip != IpAddr::from([127, 0, 0, 1])).then_some(ip)
    }
}

/// `<client_id, replica_id, request_id>`: how every log line names a request.
pub struct RequestTag<'a>(pub &'a str, pub &'a str, pub u64);

impl fmt::Display for RequestTag<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}, {}, {}>", self.0, self.1, self.2)
    }
}

type Answer = Result<pb::ExecuteReply, ReplicaError>;

/// A client waiting for its request to execute here, with the fingerprint of the
/// operation it sent (another request under the same id must not answer it).
struct Waiter {
    op_digest: u64,
    sender: oneshot::Sender<Answer>,
}

/// What the lock protects: the core, and the clients waiting for requests to execute
/// here (keyed by client id and request id, so a retry joins the original).
pub(crate) struct Inner {
    pub(crate) core: Core,
    waiters: HashMap<(String, u64), Vec<Waiter>>,
    /// A snapshot handed out by the core, to write before anything relies on it.
    snapshot_due: Option<(Checkpoint, u64)>,
    /// The write-ahead log's hand-over after which the core's log was last rewritten:
    /// a sync reported for an earlier one says nothing of the rewritten entries.
    rewritten_at_lsn: u64,
}

impl Inner {
    /// Registers a client that waits for `(client_id, request_id)` to execute.
    pub(crate) fn wait_for(
        &mut self,
        client_id: &str,
        request_id: u64,
        op_digest: u64,
    ) -> oneshot::Receiver<Answer> {
        let (sender, receiver) = oneshot::channel();
        self.waiters
            .entry((client_id.to_owned(), request_id))
            .or_default()
            .push(Waiter { op_digest, sender });
        receiver
    }

    /// Drops the waiters whose clients went away.
    pub(crate) fn forget_abandoned(&mut self, client_id: &str, request_id: u64) {
        let key = (client_id.to_owned(), request_id);
        if let Some(waiters) = self.waiters.get_mut(&key) {
            waiters.retain(|w| !w.sender.is_closed());
            if waiters.is_empty() {
                self.waiters.remove(&key);
            }
        }
    }

    /// Answers the clients waiting for requests that just executed.
    fn resolve(&mut self, executed: Vec<Executed>) {
        let epoch = self.core.epoch();
        for done in executed {
            let tag = RequestTag(&done.client_id, self.core.id(), done.request_id);
            debug!(req = %tag, seq = done.seq, "executed");
            let Some(waiters) = self.waiters.remove(&(done.client_id.clone(), done.request_id)) else {
                continue;
            };
            let reply = |result: &pb::OpResult| pb::ExecuteReply {
                result: Some(result.clone()),
                replica_id: self.core.id().to_owned(),
                epoch,
                seq: done.seq,
            };
            let reused = || ReplicaError::RequestIdReused {
                client_id: done.client_id.clone(),
                request_id: done.request_id,
            };
            for waiter in waiters {
                let answer = match &done.outcome {
                    _ if waiter.op_digest != done.op_digest => Err(reused()),
                    Applied::Executed(result) | Applied::Duplicate(result) => Ok(reply(result)),
                    Applied::Stale { last_request_id } => Err(ReplicaError::StaleRequest {
                        client_id: done.client_id.clone(),
                        request_id: done.request_id,
                        last_request_id: *last_request_id,
                    }),
                    Applied::Reused => Err(reused()),
                    Applied::SessionExpired { session_expiry_ms } => Err(ReplicaError::SessionExpired {
                        client_id: done.client_id.clone(),
                        request_id: done.request_id,
                        session_expiry_ms: *session_expiry_ms,
                    }),
                };
                let _ = waiter.sender.send(answer);
            }
        }
    }

    /// Sends every waiting client away with `error` (e.g. this primary was deposed).
    fn fail_all(&mut self, error: &ReplicaError) {
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.sender.send(Err(error.clone()));
            }
        }
    }
}

/// A running replica.
pub struct Node {
    pub(crate) settings: ReplicaSettings,
    /// Random, chosen at start: tells the RM this is a new instance of the replica.
    incarnation: String,
    inner: Mutex<Inner>,
    /// Bumped whenever the core changed in a way followers' senders care about.
    pub(crate) changed: watch::Sender<u64>,
    /// The current epoch, for tasks that wait for a new configuration.
    pub(crate) epoch: watch::Sender<u64>,
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) checkpoint_interval: watch::Sender<Duration>,
    pub(crate) gfd_address: watch::Sender<String>,
    /// Channels to peers and the RM's targets, dialled from this replica's address.
    pub(crate) channels: Channels,
    /// When this replica began leading, and when each follower last answered it (for
    /// Status: a follower that does not answer cannot be replicated to, and the RM
    /// should know).
    follower_acks: Mutex<(Instant, HashMap<String, Instant>)>,
    /// How long the last checkpoint installed here took (ms), for Status.
    pub(crate) last_checkpoint_install_ms: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// The data directory (durability other than `memory`).
    pub(crate) storage: Option<Storage>,
    /// One snapshot written at a time.
    snapshot_writing: tokio::sync::Mutex<()>,
}

impl Node {
    /// A replica that keeps its state in memory only (`settings.data_dir` is not used).
    pub fn new(settings: ReplicaSettings, shutdown: CancellationToken) -> Arc<Self> {
        let core = Core::new(settings.id.clone(), settings.bootstrap);
        Self::with(settings, core, None, shutdown)
    }

    /// A replica with its data in `settings.data_dir` (unless durability is `memory`):
    /// what the directory holds is recovered, and a bootstrapped state is on disk before
    /// this returns.
    pub async fn start(
        settings: ReplicaSettings,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StorageError> {
        let Some(dir) = settings.data_dir.clone().filter(|_| settings.durability.on_disk()) else {
            return Ok(Self::new(settings, shutdown));
        };
        let (storage, recovered) = Storage::open(&dir, &settings.id, settings.durability, shutdown.clone())?;
        let mut core = match recovered {
            Some(recovered) => Core::recovered(settings.id.clone(), recovered),
            // A directory without data: a new replica, bootstrapping only if asked to.
            None => Core::new(settings.id.clone(), settings.bootstrap),
        };
        core.enable_persistence(settings.durability == Durability::Fsync);
        let node = Self::with(settings, core, Some(storage), shutdown);
        node.apply(|_| ());
        node.write_due_snapshot().await.map_err(|source| StorageError::Io { dir, source })?;
        Ok(node)
    }

    fn with(
        settings: ReplicaSettings,
        mut core: Core,
        storage: Option<Storage>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        core.set_session_expiry(settings.session_expiry.as_millis() as u64);
        Arc::new(Self {
            incarnation: format!("{:016x}", rand::random::<u64>()),
            channels: Channels::replicas_internal(settings.dial_from()),
            checkpoint_interval: watch::Sender::new(settings.checkpoint_interval),
            gfd_address: watch::Sender::new(settings.gfd_address.clone()),
            inner: Mutex::new(Inner {
                core,
                waiters: HashMap::new(),
                snapshot_due: None,
                rewritten_at_lsn: 0,
            }),
            changed: watch::Sender::new(0),
            epoch: watch::Sender::new(0),
            ready: watch::Sender::new(false),
            follower_acks: Mutex::new((Instant::now(), HashMap::new())),
            last_checkpoint_install_ms: AtomicU64::new(0),
            settings,
            shutdown,
            storage,
            snapshot_writing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn id(&self) -> &str {
        &self.settings.id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already crashed a task; the
        // state is still the last consistent one, so keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one event to the core (and the waiting clients), then always does what
    /// follows: answers the clients whose requests executed, publishes readiness and
    /// the epoch, and wakes the followers' senders.
    pub(crate) fn apply<T>(&self, event: impl FnOnce(&mut Inner) -> T) -> T {
        let mut inner = self.lock();
        // The clock a leader stamps on what it orders during this event.
        inner.core.set_clock(crate::wire::unix_ms());
        let outcome = event(&mut inner);
        let executed = inner.core.take_executed();
        inner.resolve(executed);
        if let Some(storage) = &self.storage {
            // Handed to the writer under the lock: written in the order they happened.
            let durable_before = inner.core.durable_seq();
            let persist = inner.core.take_persist();
            if !persist.is_empty() {
                let (lsn, snapshot) = storage.write(persist);
                if inner.core.durable_seq() < durable_before {
                    inner.rewritten_at_lsn = lsn;
                }
                if snapshot.is_some() {
                    inner.snapshot_due = snapshot;
                }
            }
        }
        self.changed.send_modify(|version| *version += 1);
        self.ready.send_if_modified(|ready| std::mem::replace(ready, inner.core.is_ready()) != *ready);
        let epoch = inner.core.epoch();
        self.epoch.send_if_modified(|current| std::mem::replace(current, epoch) != *current);
        outcome
    }

    /// Waits until everything this replica handed to its write-ahead log so far is on
    /// disk (with `fsync` durability): a follower answers an append only then, so a
    /// leader counts only entries that survive a crash. False if the replica is
    /// stopping (the writer failed).
    pub(crate) async fn wait_durable(&self) -> bool {
        match &self.storage {
            Some(storage) => storage.wait_synced(storage.handed_over()).await,
            None => true,
        }
    }

    /// Writes the snapshot the core last handed out, if any, and lets the log drop what
    /// it replaces. A replica says it installed a checkpoint only after this.
    pub(crate) async fn write_due_snapshot(&self) -> std::io::Result<()> {
        let Some(storage) = &self.storage else { return Ok(()) };
        let _one_at_a_time = self.snapshot_writing.lock().await;
        let Some((checkpoint, segment)) = self.lock().snapshot_due.take() else { return Ok(()) };
        storage.write_snapshot(checkpoint, segment).await
    }

    /// Keeps the core told how far its log is on disk (a leader commits only that far),
    /// and snapshots the state once enough log was written since the last snapshot.
    pub(crate) async fn keep_durable(self: Arc<Self>) {
        let Some(storage) = &self.storage else { return };
        let mut synced = storage.synced();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = synced.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = *synced.borrow_and_update();
                    self.apply(|inner| {
                        if now.lsn >= inner.rewritten_at_lsn {
                            inner.core.set_durable(now.log_end);
                        }
                    });
                }
                _ = tick.tick() => {
                    if storage.bytes_since_snapshot() >= crate::storage::SNAPSHOT_AFTER_BYTES {
                        self.apply(|inner| inner.core.request_snapshot());
                    }
                    if let Err(error) = self.write_due_snapshot().await {
                        tracing::error!(%error, "cannot write a snapshot: stopping this replica (it recovers from its disk when restarted)");
                        self.shutdown.cancel();
                        return;
                    }
                }
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Reads the core. Not an event: nothing may change (use `apply` for that).
    pub(crate) fn read<T>(&self, query: impl FnOnce(&Core) -> T) -> T {
        query(&self.lock().core)
    }

    /// What a leader's sender for `peer` should do next. Bookkeeping of the sender
    /// itself, not an event: it wakes nobody.
    pub(crate) fn work_for(&self, peer: &str, keepalive: bool) -> crate::replication::PeerWork {
        self.lock().core.next_work(peer, keepalive)
    }

    /// A follower answered this leader.
    pub(crate) fn follower_answered(&self, peer: &str) {
        self.follower_acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .insert(peer.to_owned(), Instant::now());
    }

    /// Applies a configuration (from the RM, or learned from a peer).
    pub(crate) fn install_configuration(
        &self,
        config: pb::Configuration,
    ) -> Result<ConfigChange, ReplicaError> {
        let (change, config) = self.apply(|inner| {
            let change = inner.core.install_config(config)?;
            if change.stepped_down && inner.core.mode() == Mode::Passive {
                let leader = inner.core.leader().cloned().unwrap_or_default();
                inner.fail_all(&ReplicaError::NotPrimary {
                    replica: self.settings.id.clone(),
                    epoch: change.epoch,
                    primary_id: leader.id,
                    primary_address: leader.address,
                });
            } else if !inner.core.is_member() && inner.core.mode() == Mode::Active {
                inner.fail_all(&ReplicaError::NotReady {
                    replica: self.settings.id.clone(),
                    epoch: change.epoch,
                    reason: "no longer a member of the configuration".into(),
                });
            }
            Ok::<_, ReplicaError>((change, inner.core.config().cloned().unwrap_or_default()))
        })?;
        if change.became_leader {
            // Followers of an earlier leadership answer afresh.
            *self.follower_acks.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), HashMap::new());
        }
        let members: Vec<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
        info!(
            epoch = config.epoch,
            mode = config.mode().as_str_name(),
            primary = %config.primary,
            members = ?members,
            role = change.role.as_str_name(),
            "installed configuration"
        );
        Ok(change)
    }

    /// The replica's Status: the core's view, plus what only the shell knows.
    pub(crate) fn status(&self) -> pb::ReplicaStatus {
        let interval = self.checkpoint_interval.borrow().as_millis() as u64;
        let (mut status, followers) =
            self.read(|core| (core.status(&self.settings.advertise, interval), core.followers()));
        status.gfd_address = self.gfd_address.borrow().clone();
        status.incarnation = self.incarnation.clone();
        status.last_checkpoint_install_ms = self.last_checkpoint_install_ms.load(Ordering::Relaxed);
        status.durability = self.settings.durability.to_string();
        if let Some(storage) = &self.storage {
            status.data_id = storage.data_id().to_owned();
            status.recovery = storage.recovery().to_owned();
            status.snapshot_seq = storage.snapshot_seq();
            status.wal_bytes = storage.bytes_since_snapshot();
        } else {
            status.durability = Durability::Memory.to_string();
        }
        let (leading_since, acks) = &*self.follower_acks.lock().unwrap_or_else(|p| p.into_inner());
        status.followers = followers
            .into_iter()
            .map(|(replica_id, member, match_seq)| pb::FollowerState {
                // Never answered since this replica began leading: as old as the leadership.
                ack_age_ms: acks.get(&replica_id).unwrap_or(leading_since).elapsed().as_millis() as u64,
                replica_id,
                member,
                match_seq,
            })
            .collect();
        status
    }

    /// The span this replica's background tasks run in.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "replica", id = %self.settings.id)
    }

    /// The span of one incoming call: the replica and its epoch when the call arrived.
    pub(crate) fn call_span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "replica", id = %self.settings.id, epoch = *self.epoch.borrow())
    }
}
