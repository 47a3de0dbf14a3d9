//! `tandem bench switchover`: starts its own local system (or uses a running one), keeps
//! C clients writing, asks the RM for N planned switchovers (`Manager.Switchover`, what
//! `tandem switchover` does) — waiting after each until every member has synced in the
//! new epoch — and prints per switchover how long the group acknowledged no write: from
//! the last write acknowledged in the old epoch to the first in the new one. Then the
//! p50/p99/max of that, and every acknowledged write read back (`lost_acked`) and the
//! requests that failed (`failed_requests`; none should).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_operator::rm::Spec;
use tandem_replica::pb::{self, Mode};
use tandem_replica::wire::{dial_internal, within};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Load, count_lost, on_local_system, percentile, start_writers, wait_for_state, wait_until_healthy,
};
use crate::endpoints::{manager_tls, use_identity};

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// Replication mode: passive or active.
    #[arg(long, default_value = "passive")]
    pub mode: Mode,
    /// How many switchovers.
    #[arg(long, default_value_t = 20)]
    pub switchovers: u32,
    /// Concurrent writing clients.
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port of the system the bench starts.
    #[arg(long, default_value_t = 7500)]
    pub port: u16,
    /// Use the `tandem up` running with state in this directory instead of starting one.
    #[arg(long)]
    pub use_running: Option<PathBuf>,
    /// Print the system's own lines (configurations, membership changes) too.
    #[arg(long)]
    pub verbose: bool,
    /// Run the internal plane in plaintext.
    #[arg(long)]
    pub no_tls: bool,
}

/// One switchover, measured.
struct Measured {
    from: String,
    to: String,
    epoch: u64,
    /// Ask -> the RM's answer (the configuration recorded and being pushed).
    decided_ms: u64,
    /// Last write acknowledged in the old epoch -> first in the new one.
    unavailable_ms: u64,
}

pub async fn switchover(args: SwitchoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1000).contains(&args.switchovers), "--switchovers between 1 and 1000");
    anyhow::ensure!((1..=256).contains(&args.clients), "--clients between 1 and 256");
    anyhow::ensure!(args.replicas >= 2, "a switchover needs at least 2 replicas");
    let started = Instant::now();
    let outcome = on_local_system(
        args.use_running.as_ref(),
        "tandem-bench-switchover",
        Spec { replicas: args.replicas, mode: args.mode, ..Spec::default() },
        args.port,
        !args.no_tls,
        async |dir| run_switchovers(&args, dir).await,
    )
    .await?;
    let (measured, lost, failed, acked, load_secs) = outcome?;
    println!(
        "{} mode, {} replicas, {} clients, {} switchovers, {} acknowledged writes, {:.1} s",
        args.mode,
        args.replicas,
        args.clients,
        measured.len(),
        acked,
        started.elapsed().as_secs_f64()
    );
    let unavailable: Vec<u64> = measured.iter().map(|m| m.unavailable_ms).collect();
    let decided: Vec<u64> = measured.iter().map(|m| m.decided_ms).collect();
    println!(
        "switchover_unavailable_ms p50={} p99={} max={} decided_ms p50={} p99={} writes_per_s={:.0} lost_acked={lost} failed_requests={failed}",
        percentile(unavailable.clone(), 0.5),
        percentile(unavailable.clone(), 0.99),
        unavailable.iter().max().copied().unwrap_or_default(),
        percentile(decided.clone(), 0.5),
        percentile(decided, 0.99),
        acked as f64 / load_secs.max(0.001),
    );
    Ok(())
}

/// Switchovers measured, lost and failed writes, acknowledged writes, seconds under load.
type Outcome = (Vec<Measured>, usize, usize, usize, f64);

async fn run_switchovers(args: &SwitchoverArgs, dir: &Path) -> anyhow::Result<Outcome> {
    let state = wait_for_state(dir).await?;
    let endpoints: Vec<String> = state.replicas.values().map(|r| r.address.clone()).collect();
    wait_until_healthy(dir, args.replicas, Duration::from_secs(60))
        .await
        .context("the system never became healthy")?;
    use_identity(&manager_tls(dir), false)?;
    let mut manager = pb::manager_client::ManagerClient::new(dial_internal(&state.manager, None)?);

    let stop = CancellationToken::new();
    let load = Arc::new(Load::default());
    let mut writers = start_writers(args.clients, &endpoints, &load, &stop)?;
    let load_started = Instant::now();
    let mut measured = Vec::new();
    let mut refusals = 0;
    for n in 1..=args.switchovers {
        let (reply, decided_ms) = loop {
            wait_until_synced(&mut manager, args.replicas)
                .await
                .with_context(|| format!("before switchover {n}"))?;
            // Let writes flow in the current epoch first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let asked = Instant::now();
            match within(Duration::from_secs(15), manager.switchover(pb::SwitchoverRequest::default())).await
            {
                Ok(reply) => break (reply.into_inner(), asked.elapsed().as_millis() as u64),
                // The group changed under it (a starved machine's detectors flap): once it
                // is whole again, ask again; a few times at most.
                Err(status) if status.code() == tonic::Code::FailedPrecondition && refusals < 10 => {
                    refusals += 1;
                    println!(
                        "switchover {n}: refused ({}); asking again once the group is whole",
                        status.message()
                    );
                }
                Err(status) => anyhow::bail!("switchover {n} refused: {}", status.message()),
            }
        };
        let old_epoch = reply.epoch - 1;
        // The first write acknowledged in the new epoch (or later).
        let deadline = Instant::now() + Duration::from_secs(30);
        let first_new = loop {
            let first =
                load.acks.lock().expect("lock").iter().filter(|a| a.epoch > old_epoch).map(|a| a.at).min();
            if let Some(at) = first {
                break at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "switchover {n}: no write acknowledged in epoch {}",
                reply.epoch
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let last_old =
            load.acks.lock().expect("lock").iter().filter(|a| a.epoch == old_epoch).map(|a| a.at).max();
        let m = Measured {
            from: reply.from,
            to: reply.to,
            epoch: reply.epoch,
            decided_ms,
            unavailable_ms: last_old.map_or(0, |last| first_new.saturating_sub(last)),
        };
        println!(
            "switchover {n}: {} -> {} (epoch {}): decided {} ms, no write acknowledged for {} ms",
            m.from, m.to, m.epoch, m.decided_ms, m.unavailable_ms
        );
        measured.push(m);
    }
    wait_until_synced(&mut manager, args.replicas).await.context("after the last switchover")?;
    stop.cancel();
    while writers.join_next().await.is_some() {}
    let load_secs = load_started.elapsed().as_secs_f64();
    let acks = load.acks.lock().expect("lock").clone();
    let lost = count_lost(&endpoints, &acks).await?;
    let failures = load.failures.lock().expect("lock").clone();
    for failure in failures.iter().take(5) {
        eprintln!("failed request: {failure}");
    }
    Ok((measured, lost, failures.len(), acks.len(), load_secs))
}

/// Waits until the configuration has `replicas` members, each ready and synced with its
/// leader in the current epoch (so any of them may take over), within 30 s.
async fn wait_until_synced(
    manager: &mut pb::manager_client::ManagerClient<tonic::transport::Channel>,
    replicas: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(description) =
            within(Duration::from_millis(500), manager.describe(pb::DescribeRequest {})).await
        {
            let description = description.into_inner();
            let config = description.configuration.unwrap_or_default();
            let synced = config.members.len() == replicas as usize
                && config.members.iter().all(|m| {
                    description
                        .replicas
                        .iter()
                        .any(|r| r.replica_id == m.id && r.ready && r.synced_epoch == config.epoch)
                });
            if synced {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the group was not whole and synced within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
