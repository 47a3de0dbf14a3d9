//! `tandem bench durability`: what `--durability fsync` costs, and how fast a durable
//! group comes back after every process was killed at once. For each mode (passive,
//! active) and durability (fsync, memory) it starts a `tandem up`, writes unique keys
//! through the client library for a fixed time at each client count, and prints
//! throughput and latency, then the fsync/memory throughput ratio. Then it fills a fsync
//! group with about 100 MB, kills -9 every process (`tandem up`, the GFD, every replica
//! and LFD), starts `tandem up` again on the same directory and prints the time until
//! the group is whole and a write is acknowledged, and each replica's own recovery time
//! (Status `recovery`). `key=value` lines on stdout, progress on stderr.
//!
//! Every group runs as a `tandem up` child process (kill -9 needs the RM in a process of
//! its own), one after the other in the same directory: a process has one identity on
//! the internal plane, so the bench keeps the directory's CA (`tls/`) across groups and
//! removes the rest in between.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tandem_replica::client::{Client, ClientSettings};
use tandem_replica::pb::Mode;
use tandem_replica::storage::Durability;
use tokio::time::Instant;

use super::load::{Load, Shape, tandem_clients};
use super::up::{Up, UpOptions};
use super::wait_until_healthy;

#[derive(Debug, Args)]
pub struct DurabilityArgs {
    /// How long each throughput run writes, seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent writing clients of the throughput runs, one run per count.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub clients: Vec<u32>,
    /// Bytes of each value the throughput runs write.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Keys written before the restart (the state a restart recovers).
    #[arg(long, default_value_t = 100_000)]
    pub fill_keys: u64,
    /// Bytes of each value written before the restart.
    #[arg(long, default_value_t = 1024)]
    pub fill_value_bytes: usize,
    /// Replication mode of the group that is filled and restarted.
    #[arg(long, default_value = "passive")]
    pub restart_mode: Mode,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port of the groups the bench starts (each throughput group 50 further on).
    #[arg(long, default_value_t = 7500)]
    pub port: u16,
    /// Only the throughput runs, or only the restart.
    #[arg(long, value_enum)]
    pub only: Option<Part>,
    /// Keep the last group's directory (its logs: where a restart spent its time).
    #[arg(long)]
    pub keep_dir: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Throughput,
    Restart,
}

/// Clients the restart's fill uses.
const FILL_CLIENTS: u32 = 32;

pub async fn durability(args: DurabilityArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=600).contains(&args.seconds), "--seconds between 1 and 600");
    anyhow::ensure!(
        !args.clients.is_empty() && args.clients.iter().all(|c| (1..=256).contains(c)),
        "--clients: counts between 1 and 256"
    );
    anyhow::ensure!((1..=1 << 20).contains(&args.value_bytes), "--value-bytes between 1 and 1048576");
    anyhow::ensure!(
        (1..=1 << 20).contains(&args.fill_value_bytes),
        "--fill-value-bytes between 1 and 1048576"
    );
    anyhow::ensure!(args.replicas >= 1, "--replicas at least 1");
    let dir = std::env::temp_dir().join(format!("tandem-bench-durability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = run(&args, &dir).await;
    if args.keep_dir {
        eprintln!("durability: the last group's directory is kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

async fn run(args: &DurabilityArgs, dir: &Path) -> anyhow::Result<()> {
    let mut summary = Vec::new();
    if args.only != Some(Part::Restart) {
        let most = *args.clients.iter().max().expect("checked: at least one count");
        let mut port = args.port;
        for mode in [Mode::Passive, Mode::Active] {
            let mut rates = Vec::new();
            for durability in [Durability::Fsync, Durability::Memory] {
                port += 50;
                rates.push(throughput(args, dir, port, mode, durability).await?);
            }
            for (i, clients) in args.clients.iter().enumerate() {
                let ratio = rates[0][i] / rates[1][i];
                println!("mode={mode} clients={clients} fsync_vs_memory={ratio:.2}");
                if *clients == most {
                    summary.push(format!("fsync_vs_memory_{mode}_{clients}={ratio:.2}"));
                }
            }
        }
    }
    if args.only != Some(Part::Throughput) {
        let (ready_ms, state_mb) = restart(args, dir).await?;
        summary.push(format!("restart_to_ready_ms={ready_ms} state_mb={state_mb}"));
    }
    println!("durability {}", summary.join(" "));
    Ok(())
}

/// One group: a run per client count; prints one line each, returns writes per second.
async fn throughput(
    args: &DurabilityArgs,
    dir: &Path,
    port: u16,
    mode: Mode,
    durability: Durability,
) -> anyhow::Result<Vec<f64>> {
    eprintln!("durability: {mode} group, --durability {durability}, port {port}");
    let up = Up::start(dir, args.up(port, mode, durability)).await?;
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    let mut rates = Vec::new();
    for &clients in &args.clients {
        let prefix = format!("bench/{mode}/{durability}/{clients}");
        let run = Load::start(tandem_clients(&up.endpoints, clients)?, Shape::writes(value.clone(), prefix))
            .await?
            .run_for(Duration::from_secs(args.seconds))
            .await?;
        let (rate, latency) = (run.ops_per_s(), run.latency());
        println!(
            "mode={mode} durability={durability} clients={clients} ops_per_s={rate:.0} p50_ms={:.2} p99_ms={:.2} ops={} errors={} seconds={:.1} value_bytes={}",
            latency.p50_ms,
            latency.p99_ms,
            run.ops(),
            run.errors,
            run.elapsed.as_secs_f64(),
            args.value_bytes
        );
        rates.push(rate);
    }
    up.stop().await?;
    Ok(rates)
}

/// Fills a fsync group, kills every process, starts `tandem up` again; prints what it
/// measured and returns restart -> ready (ms) and the state written (MB).
async fn restart(args: &DurabilityArgs, dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mode = args.restart_mode;
    eprintln!(
        "durability: {mode} group, --durability fsync, filling {} keys of {} bytes",
        args.fill_keys, args.fill_value_bytes
    );
    let options = args.up(args.port, mode, Durability::Fsync);
    let up = Up::start(dir, options).await?;
    let value = Bytes::from(vec![b'f'; args.fill_value_bytes]);
    let shape = Shape { writes: Some(args.fill_keys), ..Shape::writes(value, "fill") };
    let fill = Load::start(tandem_clients(&up.endpoints, FILL_CLIENTS)?, shape).await?.finish().await?;
    anyhow::ensure!(fill.errors == 0, "{} writes of the fill failed", fill.errors);
    let state_mb = args.fill_keys * args.fill_value_bytes as u64 / 1_000_000;
    let disk_mb = size_of_dir(&dir.join("data")) / 1_000_000;
    eprintln!(
        "durability: filled in {:.1} s ({disk_mb} MB on disk, all replicas); kill -9 of every process",
        fill.elapsed.as_secs_f64()
    );
    up.kill_everything().await?;
    // `tandem up` refuses to start while one of its ports is held by a process it does
    // not know; the kernel may hold one a while after a kill.
    let killed = Instant::now();
    wait_for_free_ports(&options.addresses()).await?;
    let ports_free = killed.elapsed();

    let restarted = Instant::now();
    let mut up = Up::spawn(dir, options)?;
    // A client keeps trying from the restart on: when does the group serve at all?
    let endpoints = up.endpoints.clone();
    let first_write = tokio::spawn(async move {
        let mut settings = ClientSettings::new(endpoints);
        settings.deadline = Duration::from_secs(120);
        let mut client = Client::new(settings)?;
        client.put("restart/first", "x").await?;
        anyhow::Ok(restarted.elapsed())
    });
    tokio::select! {
        healthy = wait_until_healthy(dir, args.replicas, Duration::from_secs(120)) => {
            healthy.context("the group never became whole after the restart")?;
        }
        exit = up.child.wait() => anyhow::bail!("after the restart: {}", up.exited(exit)),
    }
    let whole = restarted.elapsed();
    let mut client = Client::new(ClientSettings::new(up.endpoints.clone()))?;
    client.put("restart/whole", "x").await.context("no write acknowledged once whole")?;
    let ready = restarted.elapsed();
    let first_write = first_write.await.context("first write task")??;
    println!(
        "restart mode={mode} durability=fsync keys={} value_bytes={} state_mb={state_mb} disk_mb={disk_mb} fill_s={:.1} restart_to_whole_ms={} restart_to_ready_ms={} restart_to_first_write_ms={} ports_free_after_kill_ms={}",
        args.fill_keys,
        args.fill_value_bytes,
        fill.elapsed.as_secs_f64(),
        whole.as_millis(),
        ready.as_millis(),
        first_write.as_millis(),
        ports_free.as_millis(),
    );
    for (id, status) in up.statuses().await {
        println!(
            "restart replica={id} recovery_ms={} snapshot_seq={} log_records_replayed={} last_seq={} recovery=\"{}\"",
            recovery_figure(&status.recovery, "in ", " ms").unwrap_or(0),
            recovery_figure(&status.recovery, "snapshot at seq ", ",").unwrap_or(0),
            recovery_figure(&status.recovery, ", ", " log records replayed").unwrap_or(0),
            status.last_seq,
            status.recovery
        );
    }
    up.stop().await?;
    Ok((ready.as_millis() as u64, state_mb))
}

impl DurabilityArgs {
    fn up(&self, port: u16, mode: Mode, durability: Durability) -> UpOptions {
        UpOptions { replicas: self.replicas, port, mode, durability }
    }
}

/// Waits until every address in `addresses` can be bound (what `tandem up` checks).
async fn wait_for_free_ports(addresses: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held: Vec<&String> =
            addresses.iter().filter(|a| std::net::TcpListener::bind(a.as_str()).is_err()).collect();
        if held.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "ports still held 120 s after the kill: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number between `before` and `after` in a Status `recovery` text ("snapshot at seq
/// S, N log records replayed, log up to seq L, in T ms").
fn recovery_figure(recovery: &str, before: &str, after: &str) -> Option<u64> {
    let end = recovery.find(after)?;
    let start = recovery[..end].rfind(before)? + before.len();
    recovery[start..end].trim().parse().ok()
}

fn size_of_dir(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => size_of_dir(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::recovery_figure;

    #[test]
    fn the_figures_of_a_recovery_text_are_read() {
        let text = "snapshot at seq 59717, 40285 log records replayed, log up to seq 100032, in 386 ms";
        assert_eq!(recovery_figure(text, "in ", " ms"), Some(386));
        assert_eq!(recovery_figure(text, "snapshot at seq ", ","), Some(59717));
        assert_eq!(recovery_figure(text, ", ", " log records replayed"), Some(40285));
        assert_eq!(recovery_figure("", "in ", " ms"), None, "a new replica recovered nothing");
    }
}
