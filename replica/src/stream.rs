//! The client side of `Replica.ExecuteStream`: the sessions of a client process that
//! share a `Streams` share one stream to each replica. Requests queued while a batch is
//! on its way leave together in the next one, so under load many requests cost one
//! message (rather than one HTTP/2 stream each), and the replica takes each batch in one
//! pass of its core. A replica that does not know the stream (an older version) is
//! called with unary `Execute` instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use crate::pb;
use crate::wire::{ClientCredentials, MAX_MESSAGE_BYTES, within};

/// The most requests sent in one batch.
const MAX_BATCH: usize = 512;
/// How long opening a stream may take before its requests fail (and are retried).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = oneshot::Sender<Result<pb::ExecuteReply, Status>>;

/// A request on its way, and who waits for its answer.
struct Queued {
    request: pb::ExecuteRequest,
    answer: Answer,
}

type Open = HashMap<String, mpsc::UnboundedSender<Queued>>;

/// One stream per replica address, opened on first use and again after it broke.
/// Clones share the streams; each stream ends once every clone is dropped.
#[derive(Clone, Default)]
pub(crate) struct Streams {
    open: Arc<Mutex<Open>>,
    /// Replicas that answered `Unimplemented`: called with unary `Execute`.
    unary: Arc<Mutex<HashSet<String>>>,
}

impl Streams {
    /// Executes `request` on the replica at `address` (over `channel`), waiting at most
    /// `timeout` for its answer.
    pub(crate) async fn execute(
        &self,
        address: &str,
        channel: Channel,
        credentials: &ClientCredentials,
        request: pb::ExecuteRequest,
        timeout: Duration,
    ) -> Result<pb::ExecuteReply, Status> {
        if self.unary.lock().unwrap_or_else(|p| p.into_inner()).contains(address) {
            return execute_unary(channel, credentials, request, timeout).await;
        }
        let (answer, answered) = oneshot::channel();
        if self.queue(address, channel, credentials).send(Queued { request, answer }).is_err() {
            // It broke just now: the next attempt opens a new one.
            return Err(Status::unavailable(format!("the stream to {address} broke")));
        }
        let answered = async {
            answered
                .await
                .unwrap_or_else(|_| Err(Status::unavailable(format!("the stream to {address} broke"))))
        };
        within(timeout, answered).await
    }

    /// The queue of the stream to `address`, opening one if there is none.
    fn queue(
        &self,
        address: &str,
        channel: Channel,
        credentials: &ClientCredentials,
    ) -> mpsc::UnboundedSender<Queued> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = open.get(address).filter(|q| !q.is_closed()) {
            return queue.clone();
        }
        let (queue, queued) = mpsc::unbounded_channel();
        open.insert(address.to_owned(), queue.clone());
        let stream = Stream {
            address: address.to_owned(),
            open: Arc::downgrade(&self.open),
            unary: Arc::downgrade(&self.unary),
        };
        tokio::spawn(stream.run(channel, credentials.clone(), queued));
        queue
    }
}

/// The task behind one stream: sends what is queued, in batches, and hands each answer
/// to whoever waits for it. It holds its `Streams` weakly: once they are dropped, the
/// queue closes and the stream ends.
struct Stream {
    address: String,
    open: Weak<Mutex<Open>>,
    unary: Weak<Mutex<HashSet<String>>>,
}

impl Stream {
    async fn run(
        self,
        channel: Channel,
        credentials: ClientCredentials,
        mut queued: mpsc::UnboundedReceiver<Queued>,
    ) {
        let (batches, outgoing) = mpsc::unbounded_channel();
        let client_channel = channel.clone();
        let mut client = pb::replica_client::ReplicaClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let call = client.execute_stream(
            credentials.request(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing)),
        );
        let mut replies = match within(OPEN_TIMEOUT, call).await {
            Ok(replies) => replies.into_inner(),
            Err(status) if status.code() == Code::Unimplemented => {
                debug!(address = %self.address, "the replica has no ExecuteStream: calling Execute");
                if let Some(unary) = self.unary.upgrade() {
                    unary.lock().unwrap_or_else(|p| p.into_inner()).insert(self.address.clone());
                }
                // What was queued meanwhile goes the same way (later calls go there directly).
                queued.close();
                while let Ok(Queued { request, answer }) = queued.try_recv() {
                    let (channel, credentials) = (client_channel.clone(), credentials.clone());
                    tokio::spawn(async move {
                        let reply = execute_unary(channel, &credentials, request, UNARY_LIMIT).await;
                        let _ = answer.send(reply);
                    });
                }
                self.close(&mut queued, HashMap::new(), &status);
                return;
            }
            Err(status) => {
                self.close(&mut queued, HashMap::new(), &status);
                return;
            }
        };
        let mut waiting: HashMap<u64, Answer> = HashMap::new();
        let mut next_tag = 0u64;
        let mut taken = Vec::with_capacity(MAX_BATCH);
        let ended = loop {
            tokio::select! {
                count = queued.recv_many(&mut taken, MAX_BATCH) => {
                    if count == 0 {
                        // Every session sharing this stream is gone.
                        return;
                    }
                    let requests = taken
                        .drain(..)
                        .map(|Queued { request, answer }| {
                            next_tag += 1;
                            waiting.insert(next_tag, answer);
                            pb::TaggedRequest { tag: next_tag, request: Some(request) }
                        })
                        .collect();
                    if batches.send(pb::ExecuteBatch { requests }).is_err() {
                        break Status::unavailable("the stream's request side closed");
                    }
                }
                message = replies.next() => match message {
                    Some(Ok(message)) => {
                        for result in message.results {
                            if let Some(answer) = waiting.remove(&result.tag) {
                                let _ = answer.send(outcome(result.outcome));
                            }
                        }
                    }
                    Some(Err(status)) => break status,
                    None => break Status::unavailable("the replica ended the stream"),
                },
            }
        };
        debug!(address = %self.address, error = %ended.message(), "execute stream ended");
        self.close(&mut queued, waiting, &ended);
    }

    /// The stream is over: later calls open a new one; what waits fails with `status`.
    fn close(
        &self,
        queued: &mut mpsc::UnboundedReceiver<Queued>,
        waiting: HashMap<u64, Answer>,
        status: &Status,
    ) {
        queued.close();
        if let Some(open) = self.open.upgrade() {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            if open.get(&self.address).is_some_and(|q| q.is_closed()) {
                open.remove(&self.address);
            }
        }
        // A refused token stays refused; anything else that broke the stream is worth
        // retrying (on a new stream, or unary for a replica without streams).
        let code = match status.code() {
            code @ (Code::Unauthenticated | Code::PermissionDenied | Code::DeadlineExceeded) => code,
            _ => Code::Unavailable,
        };
        let failed = || Err(Status::new(code, format!("{}: {}", self.address, status.message())));
        for answer in waiting.into_values() {
            let _ = answer.send(failed());
        }
        while let Ok(Queued { answer, .. }) = queued.try_recv() {
            let _ = answer.send(failed());
        }
    }
}

/// The longest a request queued for a stream, then sent with unary `Execute` after all,
/// may take (its caller's own timeout is shorter; this only bounds the call).
const UNARY_LIMIT: Duration = Duration::from_secs(60);

/// One request with unary `Execute`: for a replica without `ExecuteStream`.
async fn execute_unary(
    channel: Channel,
    credentials: &ClientCredentials,
    request: pb::ExecuteRequest,
    timeout: Duration,
) -> Result<pb::ExecuteReply, Status> {
    let mut client = pb::replica_client::ReplicaClient::new(channel);
    within(timeout, client.execute(credentials.request(request))).await.map(tonic::Response::into_inner)
}

/// An answer as the unary call would have given it.
fn outcome(outcome: Option<pb::execute_result::Outcome>) -> Result<pb::ExecuteReply, Status> {
    match outcome {
        Some(pb::execute_result::Outcome::Reply(reply)) => Ok(reply),
        Some(pb::execute_result::Outcome::Error(error)) => {
            Err(Status::with_details(Code::from(error.code), error.message, error.details))
        }
        None => Err(Status::internal("the replica answered a request without an outcome")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tonic::{Request, Response, Streaming};

    use super::*;

    /// A replica of a version before ExecuteStream: it knows only the unary call.
    #[derive(Default, Clone)]
    struct OldReplica {
        executed: Arc<AtomicU32>,
    }

    type Answers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ExecuteResults, Status>> + Send>>;

    #[tonic::async_trait]
    impl pb::replica_server::Replica for OldReplica {
        async fn execute(
            &self,
            request: Request<pb::ExecuteRequest>,
        ) -> Result<Response<pb::ExecuteReply>, Status> {
            self.executed.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(pb::ExecuteReply {
                replica_id: "old".into(),
                seq: request.get_ref().request_id,
                ..Default::default()
            }))
        }

        type ExecuteStreamStream = Answers;

        async fn execute_stream(
            &self,
            _: Request<Streaming<pb::ExecuteBatch>>,
        ) -> Result<Response<Answers>, Status> {
            Err(Status::unimplemented("unknown method ExecuteStream"))
        }

        async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::ReplicaStatus>, Status> {
            Err(Status::unimplemented("not here"))
        }

        async fn digest(&self, _: Request<pb::DigestRequest>) -> Result<Response<pb::DigestReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    #[tokio::test]
    async fn a_replica_without_the_stream_is_called_with_unary_execute_and_no_request_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let address = listener.local_addr().expect("address").to_string();
        let old = OldReplica::default();
        let server = tonic::transport::Server::builder()
            .add_service(pb::replica_server::ReplicaServer::new(old.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        let streams = Streams::default();
        let credentials = ClientCredentials::default();
        let channel = crate::wire::dial(&address, None).expect("address");
        let request = |id| pb::ExecuteRequest { client_id: "c".into(), request_id: id, ..Default::default() };
        // Several at once while the stream is being opened and refused, then one after.
        let first: Vec<_> = (1..=3)
            .map(|id| {
                streams.execute(&address, channel.clone(), &credentials, request(id), Duration::from_secs(10))
            })
            .collect();
        for (id, answer) in (1..=3).zip(futures::future::join_all(first).await) {
            let reply = answer.expect("answered through unary Execute");
            assert_eq!((reply.replica_id.as_str(), reply.seq), ("old", id));
        }
        let later =
            streams.execute(&address, channel, &credentials, request(4), Duration::from_secs(10)).await;
        assert_eq!(later.expect("answered").seq, 4);
        assert_eq!(old.executed.load(Ordering::SeqCst), 4, "each request executed once");
    }
}
