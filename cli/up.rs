//! `tandem up`: the whole system on this machine — RM in this process; GFD, replicas
//! and LFDs as child processes on loopback — printing one line per membership change,
//! failover and recovery until Ctrl-C, which stops every child.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tandem_operator::local::{self, LocalSettings, Security};
use tandem_operator::rm::Spec;
use tokio_util::sync::CancellationToken;

use crate::flags::GroupFlags;
use crate::replica::stop_on_signal;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of replicas.
    #[arg(long, env = "TANDEM_REPLICAS", default_value_t = 3)]
    pub replicas: u32,
    /// GFD on BASE, the RM's API on BASE+1, replica rN on BASE+10+N.
    #[arg(long = "port", env = "TANDEM_PORT", default_value_t = 7100)]
    pub base_port: u16,
    /// Where state (up.json, endpoints) and logs (logs/) go.
    #[arg(long, env = "TANDEM_DIR", default_value = ".tandem")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub group: GroupFlags,
    /// Log filter of the child processes (their logs are in DIR/logs).
    #[arg(long, env = "TANDEM_CHILD_LOG", default_value = "info")]
    pub child_log_level: String,
    /// Give each replica its own loopback address (127.0.10.N; its LFD dials from
    /// 127.0.11.N), so that links between processes can be cut one by one with firewall
    /// rules (what `tandem nemesis` does).
    #[arg(long, env = "TANDEM_LOOPBACK_PER_REPLICA")]
    pub loopback_per_replica: bool,
    /// Plaintext internal plane: no CA, no certificates. Anyone who can reach a
    /// replica's internal port (client port + 10000) can then change the group; for
    /// measuring what TLS costs, not for use.
    #[arg(long, env = "TANDEM_NO_TLS", conflicts_with = "client_tls")]
    pub no_tls: bool,
    /// Serve the replicas' client ports over TLS too (clients verify them with
    /// DIR/tls/ca.crt; the client commands find it there).
    #[arg(long, env = "TANDEM_CLIENT_TLS")]
    pub client_tls: bool,
    /// Require a token on the client ports: `tandem up` makes one in DIR/client-token
    /// (0600); the client commands send it, others pass it with --token-file.
    #[arg(long, env = "TANDEM_CLIENT_TOKEN")]
    pub client_token: bool,
    /// How long the replicas remember an idle client session, ms (1000..604800000).
    #[arg(long, env = "TANDEM_SESSION_EXPIRY_MS", default_value_t = tandem_replica::state::DEFAULT_SESSION_EXPIRY_MS)]
    pub session_expiry_ms: u64,
}

impl UpArgs {
    pub fn settings(&self) -> anyhow::Result<LocalSettings> {
        let spec = Spec {
            replicas: self.replicas,
            mode: self.group.mode,
            heartbeat_interval_ms: self.group.detectors.heartbeat_interval_ms,
            failure_threshold: self.group.detectors.failure_threshold,
            checkpoint_interval_ms: self.group.checkpoint_interval_ms,
            recreate_lost_epoch: None,
            durability: self.group.durability,
        };
        let problems = spec.problems();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        tandem_replica::state::check_session_expiry(self.session_expiry_ms)
            .map_err(|invalid| anyhow::anyhow!("--session-expiry-ms: {}", invalid.reason))?;
        anyhow::ensure!(
            u32::from(self.base_port) + 10 + 4 * tandem_operator::rm::MAX_REPLICAS < 65_535,
            "--port {} leaves no room for the replicas",
            self.base_port
        );
        Ok(LocalSettings {
            spec,
            base_port: self.base_port,
            dir: self.dir.clone(),
            binary: std::env::current_exe().context("cannot find the tandem executable")?,
            log_level: self.child_log_level.clone(),
            loopback_per_replica: self.loopback_per_replica,
            security: Security {
                tls: !self.no_tls,
                client_tls: self.client_tls,
                client_token: self.client_token,
            },
            session_expiry_ms: self.session_expiry_ms,
        })
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let addresses: Vec<String> =
        (1..=settings.spec.replicas).map(|n| settings.replica_address(&format!("r{n}"))).collect();
    // Through the events target, so that with `--log-format json` stdout is JSON only.
    tracing::info!(
        target: local::EVENTS,
        "tandem up: {} replicas, {} mode; state and logs in {}",
        settings.spec.replicas,
        settings.spec.mode,
        settings.dir.display()
    );
    tracing::info!(target: local::EVENTS, "endpoints: {}", addresses.join(","));
    tracing::info!(
        target: local::EVENTS,
        "try: tandem put greeting hello; tandem get greeting; tandem status; tandem chaos kill-primary  (Ctrl-C stops everything)"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let result = local::run(settings, shutdown).await;
    result.context("tandem up failed")
}
