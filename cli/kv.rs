//! The client commands: one request each, through the client library (so they retry
//! across a failover like any client).

use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tandem_replica::client::{Client, ClientSettings, result};
use tandem_replica::pb::{self, op_result, operation::Kind};

use crate::endpoints::EndpointArgs;

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    /// Session id (default: a random one).
    #[arg(long, env = "TANDEM_CLIENT_ID")]
    pub client_id: Option<String>,
    /// How long the request may take, retries included, in milliseconds.
    #[arg(long, env = "TANDEM_DEADLINE_MS", default_value_t = 15_000)]
    pub deadline_ms: u64,
    /// Also print which replica answered, its epoch and the sequence number.
    #[arg(long, short)]
    pub verbose: bool,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let mut settings = ClientSettings::new(self.endpoints.resolve()?);
        settings.client_id = self.client_id.clone();
        settings.deadline = Duration::from_millis(self.deadline_ms);
        settings.credentials = self.endpoints.credentials()?;
        Ok(Client::new(settings)?)
    }
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub key: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    pub key: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct IncrArgs {
    pub key: String,
    #[arg(default_value_t = 1, allow_negative_numbers = true)]
    pub delta: i64,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("expectation").required(true).args(["expect", "absent"])))]
pub struct CasArgs {
    pub key: String,
    pub new_value: String,
    /// Swap only if the current value is this.
    #[arg(long)]
    pub expect: Option<String>,
    /// Swap only if the key does not exist.
    #[arg(long)]
    pub absent: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Sends one request and prints its result the way a shell user expects.
async fn run(args: &ClientArgs, op: Kind) -> anyhow::Result<()> {
    let mut client = args.client()?;
    let reply = client.execute(op).await?;
    if args.verbose {
        eprintln!(
            "<{}, {}, {}> epoch {} seq {}",
            client.client_id(),
            reply.replica_id,
            client.next_request_id() - 1,
            reply.epoch,
            reply.seq
        );
    }
    let text = |value: &Bytes| String::from_utf8_lossy(value).into_owned();
    match result(reply)? {
        op_result::Kind::Get(get) => match get.value {
            Some(value) => println!("{}", text(&value)),
            None => anyhow::bail!("not found"),
        },
        op_result::Kind::Put(_) => println!("OK"),
        op_result::Kind::Delete(delete) => {
            println!("{}", if delete.existed { "deleted" } else { "not found" })
        }
        op_result::Kind::Increment(incr) => println!("{}", incr.value),
        op_result::Kind::CompareAndSwap(cas) => {
            let current = cas.current.as_ref().map_or_else(|| "(absent)".into(), text);
            if !cas.swapped {
                anyhow::bail!("not swapped: the current value is {current}");
            }
            println!("swapped (was {current})");
        }
        op_result::Kind::Failed(failed) => anyhow::bail!("{}", failed.reason),
    }
    Ok(())
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    run(&args.client, Kind::Get(pb::Get { key: args.key })).await
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    run(&args.client, Kind::Put(pb::Put { key: args.key, value: Bytes::from(args.value) })).await
}

pub async fn del(args: DelArgs) -> anyhow::Result<()> {
    run(&args.client, Kind::Delete(pb::Delete { key: args.key })).await
}

pub async fn incr(args: IncrArgs) -> anyhow::Result<()> {
    run(&args.client, Kind::Increment(pb::Increment { key: args.key, delta: args.delta })).await
}

pub async fn cas(args: CasArgs) -> anyhow::Result<()> {
    let op = pb::CompareAndSwap {
        key: args.key,
        expected: args.expect.map(Bytes::from),
        new_value: Bytes::from(args.new_value),
    };
    run(&args.client, Kind::CompareAndSwap(op)).await
}
