//! The replica's gRPC services: thin handlers that turn each RPC into an event for the
//! node (node.rs) and its answer into a reply, plus `serve`, which starts the background
//! tasks (follower senders and joining in peers.rs, health, checkpoint timer).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tracing::{Instrument, debug, info, warn};

use crate::checkpoint::{Assembler, AssemblyError, CHECKPOINT_TRANSFER_LIMIT, Checkpoint};
use crate::error::ReplicaError;
use crate::node::{Node, RequestTag};
use crate::pb;
use crate::peers;
use crate::replication::Route;
use crate::state::{check_session_expiry, op_digest};
use crate::tls::{self, Identity};
use crate::wire::{self, MAX_MESSAGE_BYTES, Plane, serve_until_shutdown};

/// Runs the background tasks and serves gRPC until shutdown: clients on `listener`
/// (Execute, Status, Digest, health), and peers, the RM and the detectors on `internal`
/// (those too, plus Peer and Control; mutual TLS when this process has an identity).
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    internal: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let span = node.span();
    tokio::spawn(publish_health(Arc::clone(&node), health_reporter).instrument(span.clone()));
    tokio::spawn(checkpoint_timer(Arc::clone(&node)).instrument(span.clone()));
    tokio::spawn(peers::keep_joined(Arc::clone(&node)).instrument(span.clone()));
    tokio::spawn(Arc::clone(&node).keep_durable().instrument(span.clone()));
    info!(
        listen = %node.settings.listen,
        internal = %internal.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        tls = crate::tls::installed().is_some(),
        advertise = %node.settings.advertise,
        bootstrap = node.settings.bootstrap,
        "replica started"
    );
    tokio::spawn(peers::run_senders(Arc::clone(&node)).instrument(span.clone()));
    let replica = || {
        pb::replica_server::ReplicaServer::new(Service(Arc::clone(&node)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    };
    let spans = Arc::clone(&node);
    let mut clients = wire::server(Plane::Client)?;
    if node.settings.client_tls {
        // The CLI refuses --client-tls without --tls-dir; a library user gets plaintext
        // and this error in the log rather than a replica that cannot start.
        match tls::installed() {
            Some(material) => clients = clients.tls_config(material.server_config_for_clients())?,
            None => tracing::error!(
                "client TLS asked for without a certificate (--tls-dir): serving clients in plaintext"
            ),
        }
    }
    let token = node.settings.client_token.clone();
    let clients = clients
        .trace_fn(move |_| spans.call_span())
        .add_service(health_service.clone())
        .add_service(tonic::service::interceptor::InterceptedService::new(replica(), move |request| {
            require_token(token.as_deref(), request)
        }));
    let spans = Arc::clone(&node);
    let internals = wire::server(Plane::Internal)?
        .trace_fn(move |_| spans.call_span())
        .add_service(health_service)
        .add_service(replica())
        .add_service(
            pb::peer_server::PeerServer::new(Service(Arc::clone(&node)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(pb::control_server::ControlServer::new(Service(Arc::clone(&node))));
    let shutdown = node.shutdown.clone();
    let (served, served_internal) = tokio::join!(
        serve_until_shutdown(clients, listener, shutdown.clone()),
        serve_until_shutdown(internals, internal, shutdown),
    );
    served.and(served_internal)
}

/// On the client port of a group with a token: every call carries it. (The internal
/// plane's callers are authenticated by their certificates instead.)
fn require_token(token: Option<&str>, request: Request<()>) -> Result<Request<()>, Status> {
    match token {
        Some(token) if !wire::carries_token(&request, token) => Err(Status::unauthenticated(
            "this group requires a client token: pass it with --token-file (TANDEM_TOKEN_FILE), or set ClientCredentials::token",
        )),
        _ => Ok(request),
    }
}

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
                    node.apply(|inner| inner.core.schedule_checkpoints());
                }
            }
            _ = interval.changed() => {}
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// A client request taken in: answered right away, or waiting to execute here.
enum Admitted {
    Answered(Result<pb::ExecuteReply, ReplicaError>),
    Waiting {
        answer: tokio::sync::oneshot::Receiver<Result<pb::ExecuteReply, ReplicaError>>,
        /// Active mode, on a member that is not the order-keeper.
        forward: bool,
    },
}

/// Routes one client request (under the node's lock): a leader orders it, a retry is
/// answered from the session table, anything else waits to execute here.
fn admit(node: &Node, inner: &mut crate::node::Inner, request: &pb::ExecuteRequest) -> Admitted {
    let tag = RequestTag(&request.client_id, node.id(), request.request_id);
    match inner.core.route(request) {
        Route::Reply(reply) => {
            debug!(req = %tag, "answered from the session table");
            Admitted::Answered(Ok(reply))
        }
        Route::Refuse(error) => {
            debug!(req = %tag, %error, "refused");
            Admitted::Answered(Err(error))
        }
        Route::Wait { forward_to } => {
            debug!(req = %tag, op = %describe(request.op.as_ref()), "received");
            let digest = request.op.as_ref().map(op_digest).unwrap_or_default();
            let answer = inner.wait_for(&request.client_id, request.request_id, digest);
            inner.core.advance();
            Admitted::Waiting { answer, forward: forward_to.is_some() }
        }
    }
}

/// Waits for an admitted request to execute (at most the request timeout), handing it
/// to the order-keeper meanwhile if it must be.
async fn finish(
    node: &Arc<Node>,
    request: &pb::ExecuteRequest,
    admitted: Admitted,
) -> Result<pb::ExecuteReply, Status> {
    let (answer, forward) = match admitted {
        Admitted::Answered(answer) => return answer.map_err(Status::from),
        Admitted::Waiting { answer, forward } => (answer, forward),
    };
    let tag = RequestTag(&request.client_id, node.id(), request.request_id);
    let waited = node.settings.request_timeout;
    let deadline = tokio::time::Instant::now() + waited;
    let mut answer = answer;
    let answered = match tokio::time::timeout(peers::FORWARD_AFTER, &mut answer).await {
        Ok(answered) => Ok(answered),
        Err(_) if forward => {
            // Not executed yet: from now on a forwarder makes sure the order-keeper has
            // it, until it is answered or abandoned.
            let done = node.shutdown.child_token();
            let forwarder = peers::forward_to_leader(Arc::clone(node), request.clone(), done.clone());
            tokio::spawn(forwarder.instrument(node.span()));
            let _stop_forwarding = done.drop_guard();
            tokio::time::timeout_at(deadline, &mut answer).await
        }
        Err(_) => tokio::time::timeout_at(deadline, &mut answer).await,
    };
    match answered {
        Ok(Ok(Ok(reply))) => {
            debug!(req = %tag, seq = reply.seq, "replied");
            Ok(reply)
        }
        Ok(Ok(Err(error))) => Err(error.into()),
        Ok(Err(_)) | Err(_) => {
            let epoch = node.apply(|inner| {
                inner.forget_abandoned(&request.client_id, request.request_id);
                inner.core.epoch()
            });
            warn!(req = %tag, "not executed in time");
            Err(ReplicaError::NotExecuted {
                client_id: request.client_id.clone(),
                replica: node.id().to_owned(),
                request_id: request.request_id,
                epoch,
                waited_ms: waited.as_millis() as u64,
            }
            .into())
        }
    }
}

/// The most requests one stream may have waiting at once; more are refused (the
/// client library never sends more than its sessions' one request each).
const MAX_OPEN_PER_STREAM: usize = 100_000;

type AppendReplies = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::AppendReply, Status>> + Send>>;

/// A leader's append, from `caller` (unary or on the append stream). What it answers it
/// holds on disk (fsync durability).
async fn take_append(
    node: &Node,
    caller: &tls::Caller,
    request: pb::AppendRequest,
) -> Result<pb::AppendReply, Status> {
    caller.must_be_replica(&node.settings.group, &request.leader_id, "append entries")?;
    match node.apply(|inner| inner.core.on_append(&request)) {
        Ok(reply) if node.wait_durable().await => Ok(reply),
        Ok(_) => Err(Status::unavailable("this replica's write-ahead log failed; it is stopping")),
        Err(error) => {
            debug!(leader = %request.leader_id, epoch = request.epoch, %error, "append refused");
            Err(error.into())
        }
    }
}

type ResultStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ExecuteResults, Status>> + Send>>;

/// The answers of one stream, each message carrying every answer ready when it is sent.
fn result_stream(answers: tokio::sync::mpsc::UnboundedReceiver<pb::ExecuteResult>) -> ResultStream {
    Box::pin(futures::stream::unfold(answers, |mut answers| async move {
        let mut results = Vec::new();
        answers.recv_many(&mut results, 1024).await;
        (!results.is_empty()).then(|| (Ok(pb::ExecuteResults { results }), answers))
    }))
}

/// Takes an ExecuteStream's batches, each in one pass of the core, and answers every
/// request on `results` once it is done (the waits of one stream in this one task).
/// After the client closed or broke the stream, what it still waits for runs to its end
/// (an answer, or the request timeout), so nothing is left registered as waiting.
async fn take_batches(
    node: Arc<Node>,
    mut batches: Streaming<pb::ExecuteBatch>,
    results: tokio::sync::mpsc::UnboundedSender<pb::ExecuteResult>,
) {
    let mut waiting = futures::stream::FuturesUnordered::new();
    let mut taking = true;
    loop {
        tokio::select! {
            batch = batches.next(), if taking => match batch {
                Some(Ok(batch)) => {
                    let room = MAX_OPEN_PER_STREAM.saturating_sub(waiting.len());
                    let admitted = node.apply(|inner| {
                        batch
                            .requests
                            .into_iter()
                            .enumerate()
                            .map(|(i, tagged)| {
                                let request = tagged.request.unwrap_or_default();
                                let admitted = if i < room {
                                    admit(&node, inner, &request)
                                } else {
                                    Admitted::Answered(Err(too_many_open()))
                                };
                                (tagged.tag, request, admitted)
                            })
                            .collect::<Vec<_>>()
                    });
                    for (tag, request, admitted) in admitted {
                        if let Admitted::Answered(answer) = admitted {
                            let _ = results.send(execute_result(tag, answer.map_err(Status::from)));
                            continue;
                        }
                        let node = Arc::clone(&node);
                        waiting.push(async move { (tag, finish(&node, &request, admitted).await) });
                    }
                }
                Some(Err(status)) => {
                    debug!(error = %status.message(), "execute stream broke");
                    taking = false;
                }
                None => taking = false,
            },
            Some((tag, answer)) = waiting.next(), if !waiting.is_empty() => {
                // The client may be gone: then the answer has nowhere to go.
                let _ = results.send(execute_result(tag, answer));
            }
            else => return,
        }
    }
}

fn too_many_open() -> ReplicaError {
    ReplicaError::InvalidRequest {
        field: "requests".into(),
        reason: format!(
            "more than {MAX_OPEN_PER_STREAM} requests waiting on one stream; wait for answers before sending more"
        ),
    }
}

fn execute_result(tag: u64, answer: Result<pb::ExecuteReply, Status>) -> pb::ExecuteResult {
    let outcome = match answer {
        Ok(reply) => pb::execute_result::Outcome::Reply(reply),
        Err(status) => pb::execute_result::Outcome::Error(pb::CallError {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec().into(),
        }),
    };
    pb::ExecuteResult { tag, outcome: Some(outcome) }
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
        let admitted = node.apply(|inner| admit(node, inner, &request));
        finish(node, &request, admitted).await.map(Response::new)
    }

    type ExecuteStreamStream = ResultStream;

    async fn execute_stream(
        &self,
        requests: Request<Streaming<pb::ExecuteBatch>>,
    ) -> Result<Response<ResultStream>, Status> {
        let (results, answers) = tokio::sync::mpsc::unbounded_channel();
        let node = Arc::clone(&self.0);
        let stream = requests.into_inner();
        tokio::spawn(take_batches(node, stream, results).instrument(self.0.span()));
        Ok(Response::new(result_stream(answers)))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::ReplicaStatus>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn digest(&self, _: Request<pb::DigestRequest>) -> Result<Response<pb::DigestReply>, Status> {
        let (mut state, replay, seq) = self.0.read(|core| core.committed_state());
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
        let caller = tls::caller(&request);
        take_append(&self.0, &caller, request.into_inner()).await.map(Response::new)
    }

    type AppendStreamStream = AppendReplies;

    async fn append_stream(
        &self,
        requests: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<AppendReplies>, Status> {
        let caller = tls::caller(&requests);
        let open = (requests.into_inner(), Arc::clone(&self.0), caller);
        // Each append is taken when the reply stream is polled for its answer: one at a
        // time, in order, in the call's own task. After a refusal the stream ends.
        let replies = futures::stream::unfold(Some(open), |open| async move {
            let (mut requests, node, caller) = open?;
            let reply = match requests.message().await.transpose()? {
                Ok(request) => take_append(&node, &caller, request).await,
                Err(status) => Err(status),
            };
            let more = reply.is_ok().then_some((requests, node, caller));
            Some((reply, more))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn order(&self, request: Request<pb::OrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        tls::caller(&request).must_be_replica(
            &self.0.settings.group,
            &request.get_ref().from_replica,
            "forward a request",
        )?;
        let node = &self.0;
        let request = request.into_inner();
        let seq = node.apply(|inner| {
            let seq = inner.core.on_order(&request);
            inner.core.advance();
            seq
        })?;
        if seq > 0 {
            let tag = RequestTag(&request.client_id, node.id(), request.request_id);
            debug!(req = %tag, seq, from = %request.from_replica, "ordered");
        }
        Ok(Response::new(pb::OrderReply { seq }))
    }

    async fn install_checkpoint(
        &self,
        request: Request<Streaming<pb::CheckpointChunk>>,
    ) -> Result<Response<pb::InstallCheckpointReply>, Status> {
        let node = &self.0;
        let started = tokio::time::Instant::now();
        let mut announced = None;
        let received = tokio::time::timeout(
            CHECKPOINT_TRANSFER_LIMIT,
            receive_checkpoint(node, tls::caller(&request), request.into_inner(), &mut announced),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ReplicaError::BadCheckpoint {
                reason: format!(
                    "the stream did not end within {} s; the sender may retry",
                    CHECKPOINT_TRANSFER_LIMIT.as_secs()
                ),
            }
            .into())
        });
        let (checkpoint, epoch, changes) = match received {
            Ok(received) => received,
            Err(status) => {
                // Whatever its header started is undone: a broken or refused stream
                // changes nothing.
                if let Some(seq) = announced {
                    node.apply(|inner| inner.core.abandon_checkpoint(seq));
                }
                warn!(seq = ?announced, error = %status.message(), "checkpoint not installed");
                return Err(status);
            }
        };
        let (seq, keys) = (checkpoint.seq, checkpoint.state.keys());
        let (reply, replayed, current) = node.apply(|inner| {
            let before = inner.core.applied_seq();
            inner.core.install_checkpoint(checkpoint);
            let replayed = inner.core.applied_seq().saturating_sub(before.max(seq));
            (inner.core.checkpoint_reply(), replayed, inner.core.epoch())
        });
        if epoch < current {
            debug!(seq, epoch, "checkpoint from an older epoch, still a committed prefix");
        }
        // Installed means on disk too: the leader counts what this replica says it holds.
        if let Err(error) = node.write_due_snapshot().await {
            node.shutdown.cancel();
            return Err(Status::unavailable(format!(
                "cannot write the checkpoint to disk ({error}); this replica is stopping"
            )));
        }
        if !node.wait_durable().await {
            return Err(Status::unavailable("this replica's write-ahead log failed; it is stopping"));
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        node.last_checkpoint_install_ms.store(elapsed_ms, std::sync::atomic::Ordering::Relaxed);
        // Periodic checkpoints of changes are routine: logged at debug.
        if changes {
            debug!(seq, keys, replayed, elapsed_ms, "installed the changes since the last checkpoint");
        } else {
            info!(seq, keys, replayed, elapsed_ms, "installed checkpoint");
        }
        Ok(Response::new(reply))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        tls::caller(&request).must_be_replica(
            &self.0.settings.group,
            &request.get_ref().replica_id,
            "join",
        )?;
        let request = request.into_inner();
        let epoch = self.0.apply(|inner| inner.core.on_join(&request.replica_id, &request.address))?;
        Ok(Response::new(pb::JoinReply { epoch }))
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for Service {
    async fn install_configuration(
        &self,
        request: Request<pb::Configuration>,
    ) -> Result<Response<pb::InstallConfigurationReply>, Status> {
        // Only the RM changes the group: no member, not even the primary, may.
        tls::authorize(&request, "install a configuration", |caller| *caller == Identity::Manager)?;
        let change = self.0.install_configuration(request.into_inner())?;
        Ok(Response::new(pb::InstallConfigurationReply { epoch: change.epoch, role: change.role.into() }))
    }

    async fn update_settings(
        &self,
        request: Request<pb::Settings>,
    ) -> Result<Response<pb::Settings>, Status> {
        tls::authorize(&request, "change a replica's settings", |caller| *caller == Identity::Manager)?;
        let node = &self.0;
        let update = request.into_inner();
        // Checked before anything changes: a refused update changes nothing.
        if let Some(ms) = update.checkpoint_interval_ms {
            crate::limits::check_checkpoint_interval(ms).map_err(|problem| ReplicaError::InvalidRequest {
                field: "checkpoint_interval_ms".into(),
                reason: problem.to_string(),
            })?;
        }
        if let Some(ms) = update.checkpoint_interval_ms {
            node.checkpoint_interval.send_replace(Duration::from_millis(ms));
            info!(checkpoint_interval_ms = ms, "settings changed");
        }
        if let Some(ms) = update.session_expiry_ms {
            check_session_expiry(ms).map_err(|invalid| ReplicaError::InvalidRequest {
                field: invalid.field.into(),
                reason: invalid.reason,
            })?;
            node.apply(|inner| inner.core.set_session_expiry(ms));
            info!(session_expiry_ms = ms, "settings changed");
        }
        if let Some(address) = update.gfd_address
            && node.gfd_address.send_replace(address.clone()) != address
        {
            info!(gfd = %address, "GFD address changed");
        }
        Ok(Response::new(pb::Settings {
            checkpoint_interval_ms: Some(node.checkpoint_interval.borrow().as_millis() as u64),
            gfd_address: Some(node.gfd_address.borrow().clone()),
            session_expiry_ms: Some(node.read(|core| core.session_expiry_ms())),
        }))
    }
}

/// Receives a checkpoint's chunks, checking each as it comes, and applies its header to
/// the core as soon as it arrives (`announced`: the header's seq, for the caller to undo
/// if the rest never comes). Returns the checkpoint, the epoch it was sent in, and
/// whether it carried only changes.
async fn receive_checkpoint(
    node: &Node,
    caller: tls::Caller,
    mut chunks: Streaming<pb::CheckpointChunk>,
    announced: &mut Option<u64>,
) -> Result<(Checkpoint, u64, bool), Status> {
    let refused = |e: AssemblyError| ReplicaError::BadCheckpoint { reason: e.to_string() };
    let mut assembler = Assembler::default();
    while let Some(chunk) = chunks.next().await {
        let header = assembler.push(chunk?).map_err(refused)?.cloned();
        if let Some(header) = header {
            caller.must_be_replica(&node.settings.group, &header.leader_id, "send a checkpoint")?;
            let base = node.apply(|inner| {
                // The base is taken before the header may restart the log.
                let base = (header.base_seq != 0).then(|| inner.core.change_base(&header)).transpose()?;
                inner.core.on_checkpoint_header(&header)?;
                Ok::<_, ReplicaError>(base)
            })?;
            *announced = Some(header.seq);
            match base {
                Some(base) => {
                    assembler.start_from(base);
                    debug!(seq = header.seq, base_seq = header.base_seq, bytes = header.bytes, leader = %header.leader_id, "receiving the changes since the last checkpoint");
                }
                None => {
                    info!(seq = header.seq, keys = header.keys, bytes = header.bytes, leader = %header.leader_id, "receiving checkpoint")
                }
            }
        }
    }
    let epoch = assembler.header().map_or(0, |h| h.epoch);
    let changes = assembler.header().is_some_and(|h| h.base_seq != 0);
    Ok((assembler.finish().map_err(refused)?, epoch, changes))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::ReplicaSettings;

    /// Issue 9: settings are bounded everywhere. An out-of-range checkpoint interval is
    /// INVALID_ARGUMENT naming the allowed range, and changes nothing.
    #[tokio::test]
    async fn an_out_of_range_checkpoint_interval_is_refused_and_changes_nothing() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let address = listener.local_addr().expect("address");
        let node = Node::new(ReplicaSettings::new("r1", address), shutdown.clone());
        let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let internal_address = internal.local_addr().expect("address").to_string();
        tokio::spawn(serve(Arc::clone(&node), listener, internal));
        let channel = crate::wire::dial(&internal_address, None).expect("address");
        let mut control = pb::control_client::ControlClient::new(channel);
        for ms in [1, 49, 3_600_001, u64::MAX] {
            let update = pb::Settings {
                checkpoint_interval_ms: Some(ms),
                gfd_address: Some("moved:1".into()),
                ..Default::default()
            };
            let refused = crate::wire::within(Duration::from_secs(10), control.update_settings(update))
                .await
                .expect_err("an out-of-range interval");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{ms}: {refused:?}");
            assert!(refused.message().contains("50..3600000"), "{}", refused.message());
        }
        assert_eq!(*node.checkpoint_interval.borrow(), Duration::from_secs(2), "nothing changed");
        assert_eq!(*node.gfd_address.borrow(), "", "nothing changed");
        let update = pb::Settings { checkpoint_interval_ms: Some(0), ..Default::default() };
        control.update_settings(update).await.expect("0 turns checkpoints off");
        assert_eq!(*node.checkpoint_interval.borrow(), Duration::ZERO);
        shutdown.cancel();
    }
}
