//! Talking to other replicas: the leader's per-follower senders (appends and checkpoint
//! transfers), an active member forwarding client requests to the order-keeper, and a
//! non-member keeping itself joined to the leader. Every call has a timeout; every
//! failure backs off and retries with what the core says now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{Instrument, debug, info, warn};

use crate::checkpoint::{Base, CHECKPOINT_TRANSFER_LIMIT, Checkpoint};
use crate::client::newest_configuration;
use crate::error::error_detail;
use crate::node::{Node, RequestTag};
use crate::pb::{self, error_detail::Kind as Detail};
use crate::replication::PeerWork;
use crate::wire::{MAX_MESSAGE_BYTES, within};

/// How often a leader tells an idle follower that it is still there (and where the
/// commit point is); also how soon a deposed leader hears of it.
pub const KEEPALIVE: Duration = Duration::from_millis(200);
/// A learner that cannot be reached for this long is forgotten (it re-joins if alive).
const LEARNER_GIVE_UP: Duration = Duration::from_secs(10);
/// How often a non-member asks the leader to feed it.
const JOIN_RETRY: Duration = Duration::from_millis(200);

impl Node {
    fn peer_client(&self, address: &str) -> Result<pb::peer_client::PeerClient<Channel>, tonic::Status> {
        let channel =
            self.channels.get(address).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        Ok(pb::peer_client::PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Keeps one sender task per follower while this replica leads: starts one for each
/// new follower; a sender ends by itself when the core says the peer is gone.
pub async fn run_senders(node: Arc<Node>) {
    let mut changed = node.changed.subscribe();
    let mut senders: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        senders.retain(|_, task| !task.is_finished());
        for (peer, address) in node.read(|core| core.peer_addresses()) {
            if let std::collections::hash_map::Entry::Vacant(slot) = senders.entry(peer.clone()) {
                let task = replicate_to(Arc::clone(&node), peer, address).instrument(node.span());
                slot.insert(tokio::spawn(task));
            }
        }
        tokio::select! {
            changed = changed.changed() => if changed.is_err() { return },
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// Leader side: keeps one follower up to date until the core says it is no longer ours.
async fn replicate_to(node: Arc<Node>, peer: String, address: String) {
    let mut changed = node.changed.subscribe();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let mut keepalive_due = true;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut backoff = Backoff::default();
    let mut link = AppendLink::default();
    debug!(%peer, %address, "replicating to follower");
    loop {
        let work = node.work_for(&peer, keepalive_due);
        keepalive_due = false;
        let outcome = match work {
            PeerWork::Gone => {
                debug!(%peer, "no longer a follower of this replica");
                return;
            }
            PeerWork::Idle => {
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = keepalive.tick() => keepalive_due = true,
                    () = node.shutdown.cancelled() => return,
                }
                continue;
            }
            PeerWork::Append(request) => send_append(&node, &peer, &address, &mut link, request).await,
            PeerWork::Checkpoint(checkpoint, base) => {
                let node = Arc::clone(&node);
                let (peer, address) = (peer.clone(), address.clone());
                tokio::spawn(async move { send_checkpoint(node, peer, address, checkpoint, base).await });
                continue;
            }
        };
        match outcome {
            Sent::Matched | Sent::Mismatched => {
                failing_since = None;
                backoff.reset();
                if outcome == Sent::Mismatched {
                    // A mismatch while the follower waits for its checkpoint header:
                    // give it a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Sent::Failed => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                let is_learner = !node.read(|core| core.config().is_some_and(|c| c.has_member(&peer)));
                if is_learner && since.elapsed() > LEARNER_GIVE_UP {
                    info!(%peer, "learner unreachable, forgetting it");
                    node.apply(|inner| inner.core.forget_learner(&peer));
                    return;
                }
                tokio::select! {
                    () = backoff.wait() => {}
                    () = node.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// How one append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The follower took the entries.
    Matched,
    /// The follower answered, but its log did not match (the core backs up).
    Mismatched,
    /// No answer, or a refusal (already acted on and logged).
    Failed,
}

/// One append, and what the core makes of the answer.
async fn send_append(
    node: &Arc<Node>,
    peer: &str,
    address: &str,
    link: &mut AppendLink,
    request: pb::AppendRequest,
) -> Sent {
    let client = match node.peer_client(address) {
        Ok(client) => client,
        Err(error) => {
            warn!(%peer, %address, error = %error.message(), "cannot dial the follower");
            return Sent::Failed;
        }
    };
    // Taken out for the exchange and put back after it: a timeout leaves the link
    // closed, so a late reply is never taken for the next append's.
    let exchange = std::mem::take(link).exchange(client, request.clone());
    let answer = within(node.settings.peer_timeout, async {
        let (next, answer) = exchange.await;
        *link = next;
        answer
    });
    match answer.await {
        Ok(reply) => {
            match node.apply(|inner| inner.core.on_append_reply(peer, &request, &reply)) {
                Ok(()) => {
                    node.follower_answered(peer);
                    if reply.matched { Sent::Matched } else { Sent::Mismatched }
                }
                // A faulty follower: as if it had not answered (it is retried with
                // back-off, and the RM fails it if it never answers right).
                Err(bad) => {
                    warn!(%peer, %address, error = %bad, "refused a follower's answer");
                    Sent::Failed
                }
            }
        }
        Err(status) => {
            handle_refusal(node, peer, &status).await;
            Sent::Failed
        }
    }
}

/// How a leader's sender reaches one follower: one long-lived append stream, opened on
/// first use and again after it broke, or unary `Append` calls to a follower too old to
/// have the stream (during a rolling update).
#[derive(Default)]
enum AppendLink {
    #[default]
    Closed,
    Open {
        requests: mpsc::Sender<pb::AppendRequest>,
        replies: Box<tonic::Streaming<pb::AppendReply>>,
    },
    Unary,
}

impl AppendLink {
    /// Sends one append and waits for its answer; returns the link for the next. Any
    /// failure on the stream closes it (the follower ended it with that status).
    async fn exchange(
        self,
        mut client: pb::peer_client::PeerClient<Channel>,
        request: pb::AppendRequest,
    ) -> (Self, Result<pb::AppendReply, Status>) {
        let (requests, mut replies) = match self {
            Self::Unary => return (Self::Unary, unary_append(client, request).await),
            Self::Open { requests, replies } => {
                if requests.send(request).await.is_err() {
                    return (
                        Self::Closed,
                        Err(Status::unavailable("the append stream to the follower ended")),
                    );
                }
                (requests, replies)
            }
            Self::Closed => {
                let (requests, queue) = mpsc::channel(1);
                requests.try_send(request.clone()).expect("a new channel has room for one append");
                match client.append_stream(ReceiverStream::new(queue)).await {
                    Ok(replies) => (requests, Box::new(replies.into_inner())),
                    Err(status) if status.code() == Code::Unimplemented => {
                        debug!("the follower has no append stream (an older version): unary appends");
                        return (Self::Unary, unary_append(client, request).await);
                    }
                    Err(status) => return (Self::Closed, Err(status)),
                }
            }
        };
        match replies.message().await {
            Ok(Some(reply)) => (Self::Open { requests, replies }, Ok(reply)),
            Ok(None) => (Self::Closed, Err(Status::unavailable("the follower ended the append stream"))),
            Err(status) => (Self::Closed, Err(status)),
        }
    }
}

async fn unary_append(
    mut client: pb::peer_client::PeerClient<Channel>,
    request: pb::AppendRequest,
) -> Result<pb::AppendReply, Status> {
    client.append(request).await.map(tonic::Response::into_inner)
}

/// If `status` says the group moved to a newer epoch, installs the configuration it
/// carries (which steps this replica down if it led). Returns whether it did.
pub(crate) fn learn_newer_configuration(node: &Arc<Node>, status: &tonic::Status) -> bool {
    let Some(Detail::WrongEpoch(wrong)) = error_detail(status) else { return false };
    let current = node.read(|core| core.epoch());
    let Some(config) = wrong.configuration.filter(|c| c.epoch > current) else {
        return false;
    };
    info!(newer_epoch = config.epoch, "a peer is at a newer epoch; installing its configuration");
    if let Err(error) = node.install_configuration(config) {
        warn!(%error, "could not install the newer configuration");
        return false;
    }
    true
}

/// Acts on a follower's refusal: learn a newer configuration (and step down). A follower
/// at an older epoch waits for the RM to give it the configuration: only the RM may
/// change the group, so a member never installs one on another.
async fn handle_refusal(node: &Arc<Node>, peer: &str, status: &tonic::Status) {
    if learn_newer_configuration(node, status) {
        return;
    }
    if let Some(Detail::ConfigurationRequired(_)) = error_detail(status) {
        // The follower answered, only from an older epoch.
        node.follower_answered(peer);
        debug!(%peer, "follower lacks the configuration; the RM pushes it");
        return;
    }
    debug!(%peer, code = ?status.code(), error = %status.message(), "append failed");
}

/// Streams a checkpoint to a follower, then tells the core how it went.
/// How long a leader waits before it sends a follower another checkpoint after one
/// failed (the follower is down, or refused it).
const CHECKPOINT_RETRY: Duration = Duration::from_millis(500);

async fn send_checkpoint(
    node: Arc<Node>,
    peer: String,
    address: String,
    checkpoint: Checkpoint,
    base: Option<Base>,
) {
    let (seq, keys) = (checkpoint.seq, checkpoint.state.keys());
    let base_seq = base.as_ref().map(|base| base.seq);
    let (epoch, leader) = (node.read(|core| core.epoch()), node.id().to_owned());
    // Periodic checkpoints of changes are routine: logged at debug.
    match base_seq {
        Some(base_seq) => debug!(%peer, seq, keys, base_seq, "sending the changes since the last checkpoint"),
        None => info!(%peer, seq, keys, "sending checkpoint"),
    }
    let started = tokio::time::Instant::now();
    let result = match node.peer_client(&address) {
        Ok(mut client) => {
            let chunks = checkpoint_stream(checkpoint, base, epoch, leader);
            within(CHECKPOINT_TRANSFER_LIMIT, client.install_checkpoint(tonic::Request::new(chunks))).await
        }
        Err(status) => Err(status),
    };
    let failed = match &result {
        Ok(reply) => {
            match node.apply(|inner| inner.core.on_checkpoint_sent(&peer, seq, Some(reply.get_ref()))) {
                Ok(()) => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    match base_seq {
                        Some(base_seq) => {
                            debug!(%peer, seq, base_seq, elapsed_ms, "changes installed by follower")
                        }
                        None => info!(%peer, seq, elapsed_ms, "checkpoint installed by follower"),
                    }
                    node.follower_answered(&peer);
                    false
                }
                Err(bad) => {
                    warn!(%peer, seq, error = %bad, "refused a follower's answer to a checkpoint");
                    true
                }
            }
        }
        Err(status) if base_seq.is_some() => {
            // Usually the follower no longer holds the base (it restarted): the whole
            // state goes at once; if the follower is down, that one backs off.
            info!(%peer, seq, error = %status.message(), "the follower did not take the changes; sending the whole state");
            // Cannot be refused: there is no answer to check.
            let _ = node.apply(|inner| inner.core.on_checkpoint_sent(&peer, seq, None));
            node.changed.send_modify(|v| *v += 1);
            return;
        }
        Err(status) => {
            warn!(%peer, seq, error = %status.message(), "checkpoint transfer failed; retrying in {} ms", CHECKPOINT_RETRY.as_millis());
            // Still in flight for the core while waiting: it offers no new checkpoint to
            // this follower until then (a dead follower must not be retried in a loop).
            tokio::time::sleep(CHECKPOINT_RETRY).await;
            // Cannot be refused: there is no answer to check.
            let _ = node.apply(|inner| inner.core.on_checkpoint_sent(&peer, seq, None));
            return;
        }
    };
    if failed {
        tokio::time::sleep(CHECKPOINT_RETRY).await;
        node.changed.send_modify(|v| *v += 1);
    }
}

/// A checkpoint's chunks as a stream for the client-streaming RPC. A producer task
/// encodes them a few at a time (bounded channel: the transfer's pace sets the
/// encoding's, and a large state is never encoded all at once).
fn checkpoint_stream(
    checkpoint: Checkpoint,
    base: Option<Base>,
    epoch: u64,
    leader_id: String,
) -> tokio_stream::wrappers::ReceiverStream<pb::CheckpointChunk> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let chunks: Box<dyn Iterator<Item = pb::CheckpointChunk>> = match base {
            Some(base) => Box::new(checkpoint.into_change_chunks(base, epoch, leader_id)),
            None => Box::new(checkpoint.into_chunks(epoch, leader_id)),
        };
        for chunk in chunks {
            if sender.blocking_send(chunk).is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// Active mode: how long a member waits before it hands a client's request to the
/// order-keeper itself. The client sent the request to the order-keeper too, which
/// normally orders it well within this; forwarding every request would double the
/// order-keeper's work for nothing. The member forwards only what is not in its log
/// by then (the client could not reach the order-keeper, or a new one took over).
pub const FORWARD_AFTER: Duration = Duration::from_millis(50);

/// Active mode, on a member that is not the order-keeper, for a request not executed
/// `FORWARD_AFTER` after it arrived: unless the request is ordered in this member's log,
/// hands it to the order-keeper, and again to each new one, until it executed here or
/// the client left.
pub async fn forward_to_leader(node: Arc<Node>, request: pb::ExecuteRequest, done: CancellationToken) {
    let mut epochs = node.epoch.subscribe();
    let mut backoff = Backoff::default();
    let tag = RequestTag(&request.client_id, node.id(), request.request_id);
    let mut wait = Duration::ZERO;
    loop {
        epochs.borrow_and_update();
        tokio::select! {
            () = done.cancelled() => return,
            _ = epochs.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
        let (leader, epoch, ordered) = node.read(|core| {
            (
                core.leader().cloned(),
                core.epoch(),
                core.holds_unexecuted(&request.client_id, request.request_id),
            )
        });
        let order = pb::OrderRequest {
            epoch,
            from_replica: node.id().to_owned(),
            client_id: request.client_id.clone(),
            request_id: request.request_id,
            op: request.op.clone(),
        };
        let delivered = match leader {
            // Ordered already: look again later (or when a new order-keeper takes over,
            // which may not have it).
            _ if ordered => true,
            Some(leader) if leader.id != node.id() => match node.peer_client(&leader.address) {
                Ok(mut client) => match within(node.settings.peer_timeout, client.order(order)).await {
                    Ok(_) => true,
                    Err(status) => {
                        debug!(req = %tag, leader = %leader.id, error = %status.message(), "forwarding failed");
                        learn_newer_configuration(&node, &status);
                        false
                    }
                },
                Err(_) => false,
            },
            // This replica leads now: order the request here.
            Some(_) => node.apply(|inner| {
                let ordered = inner.core.on_order(&order).is_ok();
                inner.core.advance();
                ordered
            }),
            // No leader in the configuration: wait for the next one.
            None => true,
        };
        wait = if delivered { Duration::from_secs(1) } else { backoff.next() };
    }
}

/// A replica that is not (yet) a member, or has no state, keeps asking the leader to
/// feed it; one started without configuration first asks its seeds for it.
pub async fn keep_joined(node: Arc<Node>) {
    let mut seeds_asked = false;
    let mut epochs = node.epoch.subscribe();
    loop {
        let unconfigured = node.read(|core| core.config().is_none());
        if unconfigured && !node.settings.seeds.is_empty() {
            if let Some(found) =
                newest_configuration(&node.channels, &node.settings.seeds, node.settings.peer_timeout).await
            {
                info!(epoch = found.epoch, "learned the configuration from a seed");
                if let Err(error) = node.install_configuration(found) {
                    warn!(%error, "the configuration a seed reported was refused");
                }
            } else if !seeds_asked {
                info!(seeds = ?node.settings.seeds, "waiting for a configuration (none of the seeds has one yet)");
            }
            seeds_asked = true;
        }
        let leader = node.read(|core| {
            let wants_feed =
                core.config().is_some() && (!core.is_member() || !core.is_ready()) && !core.is_leader();
            core.leader().filter(|_| wants_feed).cloned()
        });
        if let Some(leader) = leader.filter(|l| l.id != node.id()) {
            let join = pb::JoinRequest {
                replica_id: node.id().to_owned(),
                address: node.settings.advertise.clone(),
            };
            match node.peer_client(&leader.address) {
                Ok(mut client) => match within(node.settings.peer_timeout, client.join(join)).await {
                    Ok(_) => debug!(leader = %leader.id, "joined the leader's feed"),
                    Err(status) => {
                        debug!(leader = %leader.id, error = %status.message(), "join failed");
                        learn_newer_configuration(&node, &status);
                    }
                },
                Err(status) => warn!(error = %status.message(), "cannot reach the leader"),
            }
        }
        epochs.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(JOIN_RETRY) => {}
            // A new configuration may name a new leader to join: go now.
            _ = epochs.changed() => {}
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// Exponential back-off between failed calls: 20 ms doubling to 500 ms.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(20 << self.failures.min(5)).min(Duration::from_millis(500));
        self.failures += 1;
        delay
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next()).await;
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
