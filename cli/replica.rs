//! `tandem replica`: runs one replica until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_replica::node::{Node, ReplicaSettings};
use tandem_replica::{server, state};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info};

#[derive(Debug, Args)]
pub struct ReplicaArgs {
    /// Replica id, unique in the group (e.g. r1).
    #[arg(long, env = "TANDEM_REPLICA_ID")]
    pub id: String,
    /// Address to listen on for clients; peers, the RM and the detectors use the
    /// internal port, this port + 10000 (mutual TLS with --tls-dir).
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// Address others use to reach this replica (default: the listen address).
    #[arg(long, env = "TANDEM_ADVERTISE")]
    pub advertise: Option<String>,
    /// Start a new group: this replica's empty state is the group's state. Without it,
    /// the replica joins an existing group and is not ready until a checkpoint arrives.
    #[arg(long, env = "TANDEM_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Replicas (host:port, comma-separated) to ask for the configuration at start.
    #[arg(long, env = "TANDEM_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Passive mode: checkpoint interval in milliseconds (0: off, else 50..3600000).
    /// Changeable at run time.
    #[arg(long, env = "TANDEM_CHECKPOINT_INTERVAL_MS", default_value_t = 2000)]
    pub checkpoint_interval_ms: u64,
    /// Timeout of one call to a peer, in milliseconds.
    #[arg(long, env = "TANDEM_PEER_TIMEOUT_MS", default_value_t = 1000)]
    pub peer_timeout_ms: u64,
    /// How long a client request may wait to execute, in milliseconds.
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// A directory that outlives the process but not its pod (an emptyDir): a restarted
    /// replica finds its marker there and joins instead of bootstrapping a second time.
    #[arg(long, env = "TANDEM_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Where the replica keeps its data (write-ahead log, snapshots), recovered when it
    /// restarts. Needed unless --durability is memory.
    #[arg(long, env = "TANDEM_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// When a write counts as done: fsync (acknowledged once every member has it on
    /// disk), interval (written at once, synced every 100 ms: a crash of every replica
    /// at once may lose the last 100 ms), or memory (nothing on disk).
    #[arg(long, env = "TANDEM_DURABILITY", default_value = "fsync")]
    pub durability: tandem_replica::storage::Durability,
    /// The group's name in its members' certificates (`namespace/service` on Kubernetes,
    /// where one CA serves every group): peers must present `tandem://replica/GROUP/ID`.
    #[arg(long, env = "TANDEM_GROUP", default_value = "")]
    pub group: String,
    /// Serve the client port over TLS too, with this replica's certificate (--tls-dir);
    /// clients verify it with the group's CA (`tandem get --ca-file`).
    #[arg(long, env = "TANDEM_CLIENT_TLS")]
    pub client_tls: bool,
    /// A file holding the group's client token: every call on the client port must
    /// carry it (`authorization: Bearer <token>`; `tandem get --token-file`).
    #[arg(long, env = "TANDEM_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<std::path::PathBuf>,
    /// The GFD address this replica's LFD should use (reported in Status).
    #[arg(long, env = "TANDEM_GFD", default_value = "")]
    pub gfd: String,
    /// How long an idle client session is remembered, in milliseconds (1000..604800000).
    /// A client's retry must come within it to be deduplicated; a later one is refused
    /// with SESSION_EXPIRED. The leader's setting applies to the group. Changeable at
    /// run time.
    #[arg(long, env = "TANDEM_SESSION_EXPIRY_MS", default_value_t = state::DEFAULT_SESSION_EXPIRY_MS)]
    pub session_expiry_ms: u64,
}

/// `--bootstrap` holds only for a replica's first start: its state is gone after a
/// restart, so claiming the group's genesis state again could lose acknowledged writes.
fn first_start(state_dir: Option<&std::path::Path>) -> anyhow::Result<bool> {
    let Some(dir) = state_dir else { return Ok(true) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let marker = dir.join("started");
    if marker.exists() {
        return Ok(false);
    }
    std::fs::write(&marker, std::process::id().to_string())
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(true)
}

pub async fn run(args: ReplicaArgs) -> anyhow::Result<()> {
    state::check_session_expiry(args.session_expiry_ms)
        .map_err(|invalid| anyhow::anyhow!("--session-expiry-ms: {}", invalid.reason))?;
    let mut settings = ReplicaSettings::new(args.id, args.listen);
    settings.advertise = args.advertise.unwrap_or_else(|| args.listen.to_string());
    anyhow::ensure!(
        args.data_dir.is_some() || !args.durability.on_disk(),
        "--durability {} keeps the data on disk: pass --data-dir (or --durability memory)",
        args.durability
    );
    settings.data_dir = args.data_dir.clone();
    settings.durability = args.durability;
    settings.bootstrap =
        args.bootstrap && first_start(args.state_dir.as_deref().or(args.data_dir.as_deref()))?;
    if args.bootstrap && !settings.bootstrap {
        tracing::warn!("restarted: joining the group instead of bootstrapping it again");
    }
    settings.gfd_address = args.gfd;
    settings.group = args.group;
    anyhow::ensure!(
        !args.client_tls || tandem_replica::tls::installed().is_some(),
        "--client-tls serves clients with this replica's certificate: pass --tls-dir too"
    );
    settings.client_tls = args.client_tls;
    settings.client_token = match &args.client_token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    settings.seeds = args.peers.into_iter().filter(|p| !p.trim().is_empty()).collect();
    tandem_replica::limits::check_checkpoint_interval(args.checkpoint_interval_ms)
        .context("--checkpoint-interval-ms")?;
    settings.checkpoint_interval = Duration::from_millis(args.checkpoint_interval_ms);
    settings.peer_timeout = Duration::from_millis(args.peer_timeout_ms);
    settings.request_timeout = Duration::from_millis(args.request_timeout_ms);
    settings.session_expiry = Duration::from_millis(args.session_expiry_ms);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} for clients", settings.listen))?;
    let internal_address = tandem_replica::wire::internal_listen(settings.listen)?;
    let internal = tokio::net::TcpListener::bind(internal_address).await.with_context(|| {
        format!("cannot listen on {internal_address} for peers, the RM and the detectors")
    })?;
    if tandem_replica::tls::installed().is_none() {
        tracing::warn!(%internal_address, "no --tls-dir: the internal port is plaintext and unchecked; anyone who reaches it can change the group");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let node = Node::start(settings, shutdown).await.context("cannot open the data directory")?;
    let span = node.span();
    server::serve(node, listener, internal).instrument(span).await.context("gRPC server failed")?;
    info!("replica stopped");
    Ok(())
}

/// The token in `path`: its first line, which must not be empty.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
    Ok(token)
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The replica to check.
    #[arg(long, default_value = "127.0.0.1:7101")]
    pub address: String,
}

/// `tandem health`: exit 0 if the replica's grpc.health.v1 says SERVING (an exec probe
/// that works on every Kubernetes version).
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = tandem_replica::wire::dial_replica_health(&args.address, None)?;
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await
    .context("no answer within 1 s")?
    .context("health check failed")?;
    let status = answer.into_inner().status();
    anyhow::ensure!(status == ServingStatus::Serving, "{} is {}", args.address, status.as_str_name());
    println!("SERVING");
    Ok(())
}
