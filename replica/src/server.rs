//! The replica's gRPC server: a thin shell around the replication core. It holds the
//! core under one lock together with the clients waiting for their requests, turns RPCs
//! into core events, and runs the background tasks the core asks for (replicating to
//! followers in peers.rs, forwarding active-mode requests, joining, checkpoint timer).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tracing::{Instrument, debug, info, warn};

use crate::checkpoint::{Assembler, Checkpoint};
use crate::error::ReplicaError;
use crate::pb::{self, Mode};
use crate::peers::{self, PeerClients};
use crate::replication::{ConfigChange, Core, Executed, Route};

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
        }
    }
}

/// `<client_id, replica_id, request_id>`: how every log line names a request.
pub struct RequestTag<'a>(pub &'a str, pub &'a str, pub u64);

impl fmt::Display for RequestTag<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}, {}, {}>", self.0, self.1, self.2)
    }
}

type Waiter = oneshot::Sender<Result<pb::ExecuteReply, ReplicaError>>;

/// What the lock protects: the core, and the clients waiting for requests to execute
/// here (keyed by client id and request id, so a retry joins the original).
pub(crate) struct Inner {
    pub(crate) core: Core,
    waiters: HashMap<(String, u64), Vec<Waiter>>,
}

impl Inner {
    /// Answers the clients waiting for requests that just executed.
    pub(crate) fn resolve(&mut self, executed: Vec<Executed>) {
        let epoch = self.core.epoch();
        for done in executed {
            let tag = RequestTag(&done.client_id, self.core.id(), done.request_id);
            debug!(req = %tag, seq = done.seq, "executed");
            let Some(waiters) = self.waiters.remove(&(done.client_id.clone(), done.request_id)) else {
                continue;
            };
            let answer = match &done.outcome {
                Ok(result) => Ok(pb::ExecuteReply {
                    result: Some(result.clone()),
                    replica_id: self.core.id().to_owned(),
                    epoch,
                    seq: done.seq,
                }),
                Err(last_request_id) => Err(ReplicaError::StaleRequest {
                    client_id: done.client_id.clone(),
                    request_id: done.request_id,
                    last_request_id: *last_request_id,
                }),
            };
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }

    /// Sends every waiting client away with `error` (e.g. this primary was deposed).
    fn fail_all(&mut self, error: &ReplicaError) {
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }
}

/// A running replica.
pub struct Node {
    pub(crate) settings: ReplicaSettings,
    inner: Mutex<Inner>,
    /// Bumped whenever the core changed in a way followers' senders care about.
    pub(crate) changed: watch::Sender<u64>,
    /// The current epoch, for tasks that wait for a new configuration.
    pub(crate) epoch: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    checkpoint_interval: watch::Sender<Duration>,
    gfd_address: watch::Sender<String>,
    pub(crate) peers: PeerClients,
    peer_tasks: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    pub(crate) shutdown: CancellationToken,
}

impl Node {
    pub fn new(settings: ReplicaSettings, shutdown: CancellationToken) -> Arc<Self> {
        let core = Core::new(settings.id.clone(), settings.bootstrap);
        Arc::new(Self {
            peers: PeerClients::new(settings.peer_timeout),
            checkpoint_interval: watch::Sender::new(settings.checkpoint_interval),
            gfd_address: watch::Sender::new(settings.gfd_address.clone()),
            inner: Mutex::new(Inner { core, waiters: HashMap::new() }),
            changed: watch::Sender::new(0),
            epoch: watch::Sender::new(0),
            ready: watch::Sender::new(false),
            peer_tasks: Mutex::new(HashMap::new()),
            settings,
            shutdown,
        })
    }

    pub fn id(&self) -> &str {
        &self.settings.id
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already crashed a task; the
        // state is still the last consistent one, so keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The span this replica's background tasks run in.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "replica", id = %self.settings.id)
    }

    /// The span of one incoming call: the replica and its epoch when the call arrived.
    fn call_span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "replica", id = %self.settings.id, epoch = *self.epoch.borrow())
    }

    /// Publishes what changed after the core handled an event: wakes the followers'
    /// senders, the readiness, the epoch, and starts/stops senders as leadership moved.
    pub(crate) fn after_change(self: &Arc<Self>, inner: &MutexGuard<'_, Inner>) {
        self.changed.send_modify(|version| *version += 1);
        self.ready.send_if_modified(|ready| std::mem::replace(ready, inner.core.is_ready()) != *ready);
        let epoch = inner.core.epoch();
        self.epoch.send_if_modified(|current| std::mem::replace(current, epoch) != *current);
        if inner.core.is_leader() {
            let mut tasks = self.peer_tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.retain(|_, task| !task.is_finished());
            for (peer, address) in inner.core.peer_addresses() {
                if !tasks.contains_key(&peer) {
                    let node = Arc::clone(self);
                    let span = self.span();
                    tasks.insert(
                        peer.clone(),
                        tokio::spawn(peers::replicate_to(node, peer, address).instrument(span)),
                    );
                }
            }
        }
    }

    /// Applies a configuration (from the RM, or learned from a peer).
    pub(crate) fn install_configuration(
        self: &Arc<Self>,
        config: pb::Configuration,
    ) -> Result<ConfigChange, ReplicaError> {
        let mut inner = self.lock();
        let change = inner.core.install_config(config)?;
        inner.resolve(change.executed.clone());
        if change.stepped_down && inner.core.mode() == Mode::Passive {
            let error = ReplicaError::NotPrimary {
                replica: self.settings.id.clone(),
                epoch: change.epoch,
                primary_id: inner.core.leader().map(|m| m.id.clone()).unwrap_or_default(),
                primary_address: inner.core.leader().map(|m| m.address.clone()).unwrap_or_default(),
            };
            inner.fail_all(&error);
        } else if !inner.core.is_member() && inner.core.mode() == Mode::Active {
            let error = ReplicaError::NotReady {
                replica: self.settings.id.clone(),
                epoch: change.epoch,
                reason: "no longer a member of the configuration".into(),
            };
            inner.fail_all(&error);
        }
        self.after_change(&inner);
        let config = inner.core.config().cloned().unwrap_or_default();
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

    /// Runs the background tasks and serves gRPC on `listener` until shutdown.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let span = self.span();
        tokio::spawn(publish_health(Arc::clone(&self), health_reporter).instrument(span.clone()));
        tokio::spawn(checkpoint_timer(Arc::clone(&self)).instrument(span.clone()));
        tokio::spawn(peers::keep_joined(Arc::clone(&self)).instrument(span.clone()));
        info!(listen = %self.settings.listen, advertise = %self.settings.advertise, bootstrap = self.settings.bootstrap, "replica started");
        let node = Arc::clone(&self);
        let shutdown = self.shutdown.clone();
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .trace_fn(move |_| node.call_span())
            .add_service(health_service)
            .add_service(
                pb::replica_server::ReplicaServer::new(Service(Arc::clone(&self)))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::peer_server::PeerServer::new(Service(Arc::clone(&self)))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(pb::control_server::ControlServer::new(Service(Arc::clone(&self))))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    }
}

/// Largest gRPC message a replica accepts: a maximal value plus its envelope, or one
/// batch of log entries.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Mirrors readiness into grpc.health.v1: SERVING only while the replica is ready.
async fn publish_health(node: Arc<Node>, reporter: tonic_health::server::HealthReporter) {
    let mut ready = node.ready.subscribe();
    loop {
        let serving = *ready.borrow_and_update();
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        reporter.set_service_status("tandem.v1.Replica", status).await;
        info!(ready = serving, "health: {}", if serving { "SERVING" } else { "NOT_SERVING" });
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { return },
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// Passive mode: every checkpoint interval the primary checkpoints its backups. The
/// interval can change at run time (UpdateSettings).
async fn checkpoint_timer(node: Arc<Node>) {
    let mut interval = node.checkpoint_interval.subscribe();
    loop {
        let period = *interval.borrow_and_update();
        let wait = if period.is_zero() { Duration::from_secs(3600) } else { period };
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                if !period.is_zero() {
                    let mut inner = node.lock();
                    inner.core.schedule_checkpoints();
                    node.after_change(&inner);
                }
            }
            _ = interval.changed() => {}
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// The gRPC services, all backed by one node.
#[derive(Clone)]
struct Service(Arc<Node>);

#[tonic::async_trait]
impl pb::replica_server::Replica for Service {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteReply>, Status> {
        let node = &self.0;
        let request = request.into_inner();
        let tag = RequestTag(&request.client_id, node.id(), request.request_id);
        let (waiting, forward_to) = {
            let mut inner = node.lock();
            match inner.core.route(&request) {
                Route::Reply(reply) => {
                    debug!(req = %tag, "answered from the session table");
                    return Ok(Response::new(reply));
                }
                Route::Refuse(error) => {
                    debug!(req = %tag, %error, "refused");
                    return Err(error.into());
                }
                Route::Wait { forward_to } => {
                    debug!(req = %tag, op = %describe(request.op.as_ref()), "received");
                    let (sender, receiver) = oneshot::channel();
                    inner
                        .waiters
                        .entry((request.client_id.clone(), request.request_id))
                        .or_default()
                        .push(sender);
                    let executed = inner.core.advance();
                    inner.resolve(executed);
                    node.after_change(&inner);
                    (receiver, forward_to)
                }
            }
        };
        // Stops the forwarder when this request is answered or abandoned.
        let done = node.shutdown.child_token();
        let _stop_forwarding = done.clone().drop_guard();
        if forward_to.is_some() {
            tokio::spawn(
                peers::forward_to_leader(Arc::clone(node), request.clone(), done).instrument(node.span()),
            );
        }
        let waited = node.settings.request_timeout;
        match tokio::time::timeout(waited, waiting).await {
            Ok(Ok(Ok(reply))) => {
                debug!(req = %tag, seq = reply.seq, "replied");
                Ok(Response::new(reply))
            }
            Ok(Ok(Err(error))) => Err(error.into()),
            Ok(Err(_)) | Err(_) => {
                let mut inner = node.lock();
                if let Some(waiters) = inner.waiters.get_mut(&(request.client_id.clone(), request.request_id))
                {
                    waiters.retain(|w| !w.is_closed());
                }
                let error = ReplicaError::NotExecuted {
                    client_id: request.client_id.clone(),
                    replica: node.id().to_owned(),
                    request_id: request.request_id,
                    epoch: inner.core.epoch(),
                    waited_ms: waited.as_millis() as u64,
                };
                warn!(req = %tag, "not executed in time");
                Err(error.into())
            }
        }
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::ReplicaStatus>, Status> {
        let node = &self.0;
        let interval = node.checkpoint_interval.borrow().as_millis() as u64;
        let mut status = node.lock().core.status(&node.settings.advertise, interval);
        status.gfd_address = node.gfd_address.borrow().clone();
        Ok(Response::new(status))
    }

    async fn digest(&self, _: Request<pb::DigestRequest>) -> Result<Response<pb::DigestReply>, Status> {
        let (mut state, replay, seq) = self.0.lock().core.committed_state();
        let replica_id = self.0.id().to_owned();
        // Hashing a large state takes a while: off the async workers, outside the lock.
        let reply = tokio::task::spawn_blocking(move || {
            state.replay(&replay);
            pb::DigestReply { digest: state.digest(), seq, keys: state.keys() as u64, replica_id }
        })
        .await
        .map_err(|e| Status::internal(format!("digest task failed: {e}")))?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for Service {
    async fn append(&self, request: Request<pb::AppendRequest>) -> Result<Response<pb::AppendReply>, Status> {
        let node = &self.0;
        let request = request.into_inner();
        let mut inner = node.lock();
        match inner.core.on_append(&request) {
            Ok((reply, executed)) => {
                inner.resolve(executed);
                node.after_change(&inner);
                Ok(Response::new(reply))
            }
            Err(error) => {
                debug!(leader = %request.leader_id, epoch = request.epoch, %error, "append refused");
                Err(error.into())
            }
        }
    }

    async fn order(&self, request: Request<pb::OrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let node = &self.0;
        let request = request.into_inner();
        let mut inner = node.lock();
        let seq = inner.core.on_order(&request)?;
        if seq > 0 {
            let tag = RequestTag(&request.client_id, node.id(), request.request_id);
            debug!(req = %tag, seq, from = %request.from_replica, "ordered");
        }
        let executed = inner.core.advance();
        inner.resolve(executed);
        node.after_change(&inner);
        Ok(Response::new(pb::OrderReply { seq }))
    }

    async fn install_checkpoint(
        &self,
        request: Request<Streaming<pb::CheckpointChunk>>,
    ) -> Result<Response<pb::InstallCheckpointReply>, Status> {
        let node = &self.0;
        let mut chunks = request.into_inner();
        let mut assembler = Assembler::default();
        let started = tokio::time::Instant::now();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            let header = assembler
                .push(chunk)
                .map_err(|e| Status::invalid_argument(format!("checkpoint refused: {e}")))?;
            if let Some(header) = header {
                let mut inner = node.lock();
                inner.core.on_checkpoint_header(header)?;
                node.after_change(&inner);
                info!(seq = header.seq, keys = header.keys, leader = %header.leader_id, "receiving checkpoint");
            }
        }
        let epoch = assembler.header().map_or(0, |h| h.epoch);
        let checkpoint =
            assembler.finish().map_err(|e| Status::invalid_argument(format!("checkpoint refused: {e}")))?;
        let (seq, keys) = (checkpoint.seq, checkpoint.state.keys());
        let mut inner = node.lock();
        if epoch < inner.core.epoch() {
            debug!(seq, epoch, "checkpoint from an older epoch, still a committed prefix");
        }
        let executed = inner.core.install_checkpoint(checkpoint);
        let replayed = executed.len();
        inner.resolve(executed);
        node.after_change(&inner);
        info!(seq, keys, replayed, elapsed_ms = started.elapsed().as_millis() as u64, "installed checkpoint");
        Ok(Response::new(inner.core.checkpoint_reply()))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let node = &self.0;
        let request = request.into_inner();
        let mut inner = node.lock();
        let epoch = inner.core.on_join(&request.replica_id, &request.address)?;
        node.after_change(&inner);
        Ok(Response::new(pb::JoinReply { epoch }))
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for Service {
    async fn install_configuration(
        &self,
        request: Request<pb::Configuration>,
    ) -> Result<Response<pb::InstallConfigurationReply>, Status> {
        let change = self.0.install_configuration(request.into_inner())?;
        Ok(Response::new(pb::InstallConfigurationReply { epoch: change.epoch, role: change.role.into() }))
    }

    async fn update_settings(
        &self,
        request: Request<pb::Settings>,
    ) -> Result<Response<pb::Settings>, Status> {
        let node = &self.0;
        let update = request.into_inner();
        if let Some(ms) = update.checkpoint_interval_ms {
            node.checkpoint_interval.send_replace(Duration::from_millis(ms));
            info!(checkpoint_interval_ms = ms, "settings changed");
        }
        if let Some(address) = update.gfd_address
            && node.gfd_address.send_replace(address.clone()) != address
        {
            info!(gfd = %address, "GFD address changed");
        }
        Ok(Response::new(pb::Settings {
            checkpoint_interval_ms: Some(node.checkpoint_interval.borrow().as_millis() as u64),
            gfd_address: Some(node.gfd_address.borrow().clone()),
        }))
    }
}

/// A short description of an operation for the trace, e.g. `put k (3 bytes)`.
pub fn describe(op: Option<&pb::Operation>) -> String {
    use pb::operation::Kind;
    match op.and_then(|op| op.kind.as_ref()) {
        Some(Kind::Get(op)) => format!("get {}", op.key),
        Some(Kind::Put(op)) => format!("put {} ({} bytes)", op.key, op.value.len()),
        Some(Kind::Delete(op)) => format!("delete {}", op.key),
        Some(Kind::CompareAndSwap(op)) => format!("cas {}", op.key),
        Some(Kind::Increment(op)) => format!("incr {} by {}", op.key, op.delta),
        None => "unknown".into(),
    }
}

/// A checkpoint's chunks as a stream for the client-streaming RPC. A producer task
/// encodes them a few at a time (bounded channel: the transfer's pace sets the
/// encoding's, and a large state is never encoded all at once).
pub(crate) fn checkpoint_stream(
    checkpoint: Checkpoint,
    epoch: u64,
    leader_id: String,
) -> tokio_stream::wrappers::ReceiverStream<pb::CheckpointChunk> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        for chunk in checkpoint.into_chunks(epoch, leader_id) {
            if sender.blocking_send(chunk).is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
