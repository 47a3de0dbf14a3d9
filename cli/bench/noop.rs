//! The ceiling: a gRPC service that answers Tandem's own `Replica.Execute` at once,
//! executing nothing, served by the same tonic server setup as a replica's client port
//! (`tandem bench noop-server`, a process of its own so that its CPU is apart from the
//! clients'). Driven by the load driver at the same concurrency, it is what one machine
//! can do with unary gRPC calls of this size and no replication at all.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use tandem_replica::pb::{self, op_result, operation};
use tandem_replica::wire::{self, MAX_MESSAGE_BYTES, Plane, dial, serve_until_shutdown, within};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::load::Target;
use super::resources::{Component, Role};

#[derive(Debug, Args)]
pub struct NoopServerArgs {
    /// Where to serve.
    #[arg(long, default_value = "127.0.0.1:7890")]
    pub listen: String,
    /// Size of the value a Get answers with.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn serve(args: NoopServerArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let service =
        pb::replica_server::ReplicaServer::new(Noop { value: Bytes::from(vec![b'v'; args.value_bytes]) })
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let router = wire::server(Plane::Client).context("cannot set up the server")?.add_service(service);
    let stop = CancellationToken::new();
    tokio::spawn(crate::replica::stop_on_signal(stop.clone()));
    serve_until_shutdown(router, listener, stop).await.context("the no-op server failed")
}

#[derive(Clone)]
struct Noop {
    value: Bytes,
}

impl Noop {
    /// The answer to `request`, at once.
    fn answer(&self, request: pb::ExecuteRequest) -> Result<pb::ExecuteReply, Status> {
        let kind = match request.op.and_then(|op| op.kind) {
            Some(operation::Kind::Get(_)) => {
                op_result::Kind::Get(pb::GetResult { value: Some(self.value.clone()) })
            }
            Some(operation::Kind::Put(_)) => op_result::Kind::Put(pb::PutResult {}),
            _ => return Err(Status::unimplemented("the no-op server answers Get and Put only")),
        };
        Ok(pb::ExecuteReply {
            result: Some(pb::OpResult { kind: Some(kind) }),
            replica_id: "noop".into(),
            epoch: 1,
            seq: 0,
        })
    }
}

#[tonic::async_trait]
impl pb::replica_server::Replica for Noop {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteReply>, Status> {
        self.answer(request.into_inner()).map(Response::new)
    }

    type ExecuteStreamStream = futures::stream::BoxStream<'static, Result<pb::ExecuteResults, Status>>;

    /// Each batch answered at once, request for request.
    async fn execute_stream(
        &self,
        request: Request<tonic::Streaming<pb::ExecuteBatch>>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let noop = self.clone();
        let answers = request.into_inner().map(move |batch| {
            let results = batch?
                .requests
                .into_iter()
                .map(|tagged| pb::ExecuteResult {
                    tag: tagged.tag,
                    outcome: Some(match noop.answer(tagged.request.unwrap_or_default()) {
                        Ok(reply) => pb::execute_result::Outcome::Reply(reply),
                        Err(status) => pb::execute_result::Outcome::Error(pb::CallError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                            details: Bytes::new(),
                        }),
                    }),
                })
                .collect();
            Ok(pb::ExecuteResults { results })
        });
        Ok(Response::new(answers.boxed()))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::ReplicaStatus>, Status> {
        Err(Status::unimplemented("the no-op server has no status"))
    }

    async fn digest(&self, _: Request<pb::DigestRequest>) -> Result<Response<pb::DigestReply>, Status> {
        Err(Status::unimplemented("the no-op server has no state"))
    }
}

/// The no-op server as a child process, killed on drop.
pub struct NoopServer {
    child: tokio::process::Child,
    pub address: String,
}

impl NoopServer {
    /// Starts `tandem bench noop-server` on `port` and waits until it answers.
    pub async fn start(port: u16, value_bytes: usize) -> anyhow::Result<Self> {
        let address = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(std::env::current_exe().context("cannot find tandem")?)
            .args(["bench", "noop-server", "--listen", &address, "--value-bytes", &value_bytes.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tandem bench noop-server")?;
        let mut probe = NoopClient::new(&address)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if probe.put("probe".into(), Bytes::new()).await.is_ok() {
                return Ok(Self { child, address });
            }
            if let Some(exit) = child.try_wait()? {
                anyhow::bail!("the no-op server exited ({exit}); is port {port} taken? try another --port");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the no-op server did not answer on {address} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn components(&self) -> Vec<Component> {
        self.child.id().map(|pid| Component::new("noop", Role::Noop, pid)).into_iter().collect()
    }

    pub fn clients(&self, clients: u32) -> anyhow::Result<Vec<NoopClient>> {
        (0..clients).map(|_| NoopClient::new(&self.address)).collect()
    }
}

/// A client of the no-op server: one connection, one Execute per request, as Tandem's
/// client sends to one replica.
pub struct NoopClient {
    replica: pb::replica_client::ReplicaClient<Channel>,
    client_id: String,
    request_id: u64,
}

/// A no-op answer takes no time; one that takes this long means trouble.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

impl NoopClient {
    pub fn new(address: &str) -> anyhow::Result<Self> {
        let replica = pb::replica_client::ReplicaClient::new(dial(address, None)?);
        let client_id = tandem_replica::client::random_client_id();
        Ok(Self { replica, client_id, request_id: 0 })
    }

    async fn execute(&mut self, kind: operation::Kind) -> anyhow::Result<pb::ExecuteReply> {
        self.request_id += 1;
        let request = pb::ExecuteRequest {
            client_id: self.client_id.clone(),
            request_id: self.request_id,
            op: Some(pb::Operation { kind: Some(kind) }),
            epoch: 0,
        };
        Ok(within(ATTEMPT_TIMEOUT, self.replica.execute(request)).await?.into_inner())
    }
}

impl Target for NoopClient {
    async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<()> {
        self.execute(operation::Kind::Put(pb::Put { key, value })).await.map(drop)
    }

    async fn get(&mut self, key: String) -> anyhow::Result<Option<Bytes>> {
        let reply = self.execute(operation::Kind::Get(pb::Get { key })).await?;
        match reply.result.and_then(|r| r.kind) {
            Some(op_result::Kind::Get(get)) => Ok(get.value),
            other => anyhow::bail!("the no-op server answered a Get with {other:?}"),
        }
    }
}
