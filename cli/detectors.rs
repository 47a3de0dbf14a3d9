//! `tandem lfd` and `tandem gfd`: the fault detectors as processes (local mode starts
//! them for you; on Kubernetes they are sidecars).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_replica::detector::gfd::GfdSettings;
use tandem_replica::detector::lfd::LfdSettings;
use tandem_replica::detector::limits;
use tandem_replica::detector::service::{Gfd, LfdConfig, run_lfd, serve_gfd};
use tokio_util::sync::CancellationToken;

use crate::replica::stop_on_signal;

#[derive(Debug, Args)]
pub struct LfdArgs {
    /// Id of the replica this LFD watches.
    #[arg(long, env = "TANDEM_REPLICA_ID")]
    pub replica_id: String,
    /// The replica's address (host:port).
    #[arg(long, env = "TANDEM_REPLICA_ADDRESS")]
    pub replica: String,
    /// The GFD's address (host:port).
    #[arg(long, env = "TANDEM_GFD")]
    pub gfd: String,
    /// Heartbeat period towards the replica, in milliseconds. Changeable at run time
    /// (`tandem set heartbeat-interval`).
    #[arg(long, env = "TANDEM_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// Heartbeats without an answer before the replica is reported dead.
    #[arg(long, env = "TANDEM_FAILURE_THRESHOLD", default_value_t = 3)]
    pub failure_threshold: u32,
    /// Local address to dial the replica and the GFD from (default: the system's choice).
    #[arg(long, env = "TANDEM_LFD_DIAL_FROM")]
    pub dial_from: Option<std::net::IpAddr>,
}

#[derive(Debug, Args)]
pub struct GfdArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_GFD_LISTEN", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Heartbeat period towards each LFD (and the LFDs' default towards replicas), ms.
    #[arg(long, env = "TANDEM_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// Unanswered heartbeats before an LFD (and its replica) counts as gone.
    #[arg(long, env = "TANDEM_FAILURE_THRESHOLD", default_value_t = 3)]
    pub failure_threshold: u32,
    /// After a start, how long LFDs get to reconnect before the membership is trusted, ms.
    #[arg(long, env = "TANDEM_GFD_SETTLE_MS", default_value_t = 1000)]
    pub settle_ms: u64,
}

pub async fn lfd(args: LfdArgs) -> anyhow::Result<()> {
    limits::check(args.heartbeat_interval_ms, args.failure_threshold).map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let config = LfdConfig {
        replica_id: args.replica_id,
        replica_address: args.replica,
        gfd_address: args.gfd,
        dial_from: args.dial_from,
        settings: LfdSettings {
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            failure_threshold: args.failure_threshold,
        },
    };
    run_lfd(config, shutdown).await.context("the LFD cannot start")
}

pub async fn gfd(args: GfdArgs) -> anyhow::Result<()> {
    limits::check(args.heartbeat_interval_ms, args.failure_threshold).map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let settings = GfdSettings {
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        failure_threshold: args.failure_threshold,
        settle_ms: args.settle_ms,
    };
    let lfd = LfdSettings {
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        failure_threshold: args.failure_threshold,
    };
    serve_gfd(Gfd::new(settings, lfd), listener, shutdown).await.context("GFD server failed")
}
