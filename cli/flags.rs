//! Flags several commands share, defined once: the detectors' heartbeat settings
//! (`up`, `lfd`, `gfd`) and the replication settings of a group (`up`).

use std::time::Duration;

use clap::Args;
use tandem_replica::detector::lfd::LfdSettings;
use tandem_replica::detector::limits;
use tandem_replica::pb::Mode;

/// How failures are detected. Checked against `limits` before anything starts.
#[derive(Debug, Clone, Copy, Args)]
pub struct DetectorFlags {
    /// Heartbeat period, ms (20..60000): LFD -> replica, GFD -> LFD.
    #[arg(long, env = "TANDEM_HEARTBEAT_INTERVAL_MS", default_value_t = limits::DEFAULT_HEARTBEAT_INTERVAL_MS)]
    pub heartbeat_interval_ms: u64,
    /// Heartbeat intervals without an answer before death (1..100; interval x threshold
    /// at least 100 ms).
    #[arg(long, env = "TANDEM_FAILURE_THRESHOLD", default_value_t = limits::DEFAULT_FAILURE_THRESHOLD)]
    pub failure_threshold: u32,
}

impl DetectorFlags {
    pub fn check(&self) -> anyhow::Result<()> {
        Ok(limits::check(self.heartbeat_interval_ms, self.failure_threshold)?)
    }

    pub fn lfd_settings(&self) -> LfdSettings {
        LfdSettings {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            failure_threshold: self.failure_threshold,
        }
    }
}

/// How a group replicates and is watched.
#[derive(Debug, Clone, Copy, Args)]
pub struct GroupFlags {
    /// Replication mode: passive or active.
    #[arg(long, env = "TANDEM_MODE", default_value = "passive")]
    pub mode: Mode,
    #[command(flatten)]
    pub detectors: DetectorFlags,
    /// Passive mode checkpoint period, ms (0: off, else 50..3600000).
    #[arg(long, env = "TANDEM_CHECKPOINT_INTERVAL_MS", default_value_t = 2000)]
    pub checkpoint_interval_ms: u64,
    /// When a write counts as done: fsync (acknowledged once every member has it on
    /// disk; the group survives losing every process at once), interval (synced every
    /// 100 ms: such a loss may take the last 100 ms of writes), or memory (nothing on
    /// disk: such a loss takes everything).
    #[arg(long, env = "TANDEM_DURABILITY", default_value = "fsync")]
    pub durability: tandem_replica::storage::Durability,
}
