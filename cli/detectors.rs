//! `tandem lfd` and `tandem gfd`: the fault detectors as processes (local mode starts
//! them for you; on Kubernetes they are sidecars).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_replica::detector::gfd::GfdSettings;

use crate::flags::DetectorFlags;
use tandem_replica::detector::service::{Gfd, LfdConfig, run_lfd, serve_gfd};
use tandem_replica::tls;
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
    /// The GFD sends changes of these at run time (`tandem set heartbeat-interval`).
    #[command(flatten)]
    pub detectors: DetectorFlags,
    /// Local address to dial the replica and the GFD from (default: the system's choice).
    #[arg(long, env = "TANDEM_LFD_DIAL_FROM")]
    pub dial_from: Option<std::net::IpAddr>,
}

#[derive(Debug, Args)]
pub struct GfdArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_GFD_LISTEN", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Towards each LFD, and the LFDs' own towards their replicas.
    #[command(flatten)]
    pub detectors: DetectorFlags,
    /// After a start, how long LFDs get to reconnect before the membership is trusted, ms.
    #[arg(long, env = "TANDEM_GFD_SETTLE_MS", default_value_t = 1000)]
    pub settle_ms: u64,
}

pub async fn lfd(args: LfdArgs) -> anyhow::Result<()> {
    args.detectors.check()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let config = LfdConfig {
        replica_id: args.replica_id,
        replica_address: args.replica,
        gfd_address: args.gfd,
        dial_from: args.dial_from,
        settings: args.detectors.lfd_settings(),
    };
    run_lfd(config, shutdown).await.context("the LFD cannot start")
}

pub async fn gfd(args: GfdArgs, tls_dir: Option<PathBuf>) -> anyhow::Result<()> {
    args.detectors.check()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    if let (Some(dir), Some(loaded)) = (tls_dir, tls::installed()) {
        tokio::spawn(stop_when_replaced(dir.join(tls::KEY_FILE), loaded.key.clone(), shutdown.clone()));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let settings = GfdSettings {
        heartbeat_interval_ms: args.detectors.heartbeat_interval_ms,
        failure_threshold: args.detectors.failure_threshold,
        settle_ms: args.settle_ms,
    };
    serve_gfd(Gfd::new(settings, args.detectors.lfd_settings()), listener, shutdown)
        .await
        .context("GFD server failed")
}

/// Whether `key_file` holds another key than `loaded`. Unreadable for a moment (being
/// replaced) is not a change: the next look decides.
fn key_replaced(key_file: &Path, loaded: &str) -> bool {
    std::fs::read_to_string(key_file).is_ok_and(|key| key != loaded)
}

/// How often the GFD looks at its certificate files.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(5);

/// On Kubernetes the operator writes the GFD's certificates (at each of its starts, so
/// also when it restarts to renew them); the GFD loaded them once, at its own start.
/// When the key on disk is no longer the one it loaded, the GFD stops, and the kubelet
/// restarts it with the new ones. The key is written last (`Material::write`): a new key
/// means a whole new set.
async fn stop_when_replaced(key_file: PathBuf, loaded: String, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(CERTIFICATE_CHECK);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if key_replaced(&key_file, &loaded) {
            tracing::info!(
                file = %key_file.display(),
                "the GFD's certificate was re-issued (the operator restarted): exiting, so that the restart loads the new one"
            );
            shutdown.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gfd_stops_when_its_key_is_re_issued_and_not_before() {
        let dir = tempfile::tempdir().expect("a directory");
        let key = dir.path().join(tls::KEY_FILE);
        assert!(!key_replaced(&key, "old"), "a missing file is no change");
        std::fs::write(&key, "old").expect("write");
        assert!(!key_replaced(&key, "old"));
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(stop_when_replaced(key.clone(), "old".into(), shutdown.clone()));
        std::fs::write(&key, "new").expect("write");
        assert!(key_replaced(&key, "old"));
        let bound = CERTIFICATE_CHECK * 3;
        tokio::time::timeout(bound, shutdown.cancelled()).await.expect("stopped within a few checks");
        watcher.await.expect("the watcher ended");
    }
}
