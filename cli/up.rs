//! `tandem up`: the whole system on this machine — RM in this process; GFD, replicas
//! and LFDs as child processes on loopback — printing one line per membership change,
//! failover and recovery until Ctrl-C, which stops every child.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tandem_operator::local::{self, LocalSettings};
use tandem_operator::rm::Spec;
use tandem_replica::pb::Mode;
use tokio_util::sync::CancellationToken;

use crate::replica::stop_on_signal;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Passive,
    Active,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Passive => Mode::Passive,
            ModeArg::Active => Mode::Active,
        }
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of replicas.
    #[arg(long, env = "TANDEM_REPLICAS", default_value_t = 3)]
    pub replicas: u32,
    /// Replication mode.
    #[arg(long, env = "TANDEM_MODE", value_enum, default_value = "passive")]
    pub mode: ModeArg,
    /// GFD on BASE, the RM's API on BASE+1, replica rN on BASE+10+N.
    #[arg(long = "port", env = "TANDEM_PORT", default_value_t = 7100)]
    pub base_port: u16,
    /// Where state (up.json, endpoints) and logs (logs/) go.
    #[arg(long, env = "TANDEM_DIR", default_value = ".tandem")]
    pub dir: PathBuf,
    /// LFD heartbeat period, ms.
    #[arg(long, env = "TANDEM_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before a replica is declared dead.
    #[arg(long, env = "TANDEM_FAILURE_THRESHOLD", default_value_t = 3)]
    pub failure_threshold: u32,
    /// Passive mode checkpoint period, ms (0: off).
    #[arg(long, env = "TANDEM_CHECKPOINT_INTERVAL_MS", default_value_t = 2000)]
    pub checkpoint_interval_ms: u64,
    /// Log filter of the child processes (their logs are in DIR/logs).
    #[arg(long, env = "TANDEM_CHILD_LOG", default_value = "info")]
    pub child_log_level: String,
    /// Give each replica its own loopback address (127.0.10.N; its LFD dials from
    /// 127.0.11.N), so that links between processes can be cut one by one with firewall
    /// rules (what `tandem nemesis` does).
    #[arg(long, env = "TANDEM_LOOPBACK_PER_REPLICA")]
    pub loopback_per_replica: bool,
}

impl UpArgs {
    pub fn settings(&self) -> anyhow::Result<LocalSettings> {
        let spec = Spec {
            replicas: self.replicas,
            mode: self.mode.into(),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            failure_threshold: self.failure_threshold,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
            recreate_lost_epoch: None,
        };
        let problems = spec.problems();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
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
        })
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let addresses: Vec<String> =
        (1..=settings.spec.replicas).map(|n| settings.replica_address(&format!("r{n}"))).collect();
    println!(
        "tandem up: {} replicas, {} mode; state and logs in {}",
        settings.spec.replicas,
        crate::admin::mode_name(settings.spec.mode),
        settings.dir.display()
    );
    println!("endpoints: {}", addresses.join(","));
    println!(
        "try: tandem put greeting hello; tandem get greeting; tandem status; tandem chaos kill-primary  (Ctrl-C stops everything)"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let (output, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            println!("{line}");
        }
    });
    let result = local::run(settings, output, shutdown).await;
    let _ = printer.await;
    result.context("tandem up failed")
}
