//! `tandem bench throughput`: steady-state throughput and latency of a local group, in
//! each mode, at each client count: C clients of Tandem's client library, each with
//! one request in flight, putting unique keys (and with `--read-percent`, reading keys
//! they wrote) for a fixed time. Per run: ops/s, latency p50/p99/p999 (an HDR
//! histogram), errors, and the CPU and memory of every process (`tandem up` = the RM,
//! the GFD, each replica and LFD, the bench's own clients); Tandem's throughput as a
//! fraction of the ceiling (noop.rs) at the same client count. `key=value` lines on
//! stdout, progress on stderr.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tandem_replica::pb::Mode;
use tandem_replica::storage::Durability;

use super::load::{Load, Run, Shape, Target, tandem_clients};
use super::noop::NoopServer;
use super::resources::{self, Component, Role, Sampler, Usage};
use super::up::{Up, UpOptions};

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// Replication mode(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: Modes,
    /// Concurrent clients, one run per count.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub clients: Vec<u32>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Durability of the group (fsync: every member syncs before the acknowledgement).
    #[arg(long, default_value = "memory")]
    pub durability: Durability,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port: the passive group on PORT, the active one on PORT+50, the no-op
    /// server on PORT+90.
    #[arg(long, default_value_t = 7800)]
    pub port: u16,
    /// Skip the ceiling (the no-op gRPC server).
    #[arg(long)]
    pub no_ceiling: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Modes {
    Passive,
    Active,
    Both,
}

impl Modes {
    pub fn modes(self) -> Vec<Mode> {
        match self {
            Self::Passive => vec![Mode::Passive],
            Self::Active => vec![Mode::Active],
            Self::Both => vec![Mode::Passive, Mode::Active],
        }
    }
}

/// What each client sends, and for how long (shared with `tandem bench compare`).
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// How long each run lasts, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Share of reads (of keys the client wrote), percent; the rest are unique-key puts.
    #[arg(long, default_value_t = 0)]
    pub read_percent: u32,
    /// Bytes of each value written.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
}

impl LoadArgs {
    pub fn check(&self, clients: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!((1..=600).contains(&self.seconds), "--seconds between 1 and 600");
        anyhow::ensure!(self.read_percent <= 100, "--read-percent between 0 and 100");
        anyhow::ensure!((1..=1 << 20).contains(&self.value_bytes), "--value-bytes between 1 and 1048576");
        anyhow::ensure!(
            !clients.is_empty() && clients.iter().all(|c| (1..=1024).contains(c)),
            "--clients: counts between 1 and 1024"
        );
        Ok(())
    }

    fn shape(&self, clients: u32, progress: String) -> Shape {
        Shape {
            read_percent: self.read_percent,
            progress: Some(progress),
            ..Shape::writes(Bytes::from(vec![b'v'; self.value_bytes]), format!("bench/c{clients}"))
        }
    }
}

/// Ops/s at each client count.
pub type Rates = BTreeMap<u32, f64>;

/// One run of a system at one client count.
pub struct Point {
    pub clients: u32,
    pub run: Run,
    pub usages: Vec<Usage>,
}

impl Point {
    /// CPU time the system's processes (all but the clients) spent per acknowledged
    /// request, µs.
    pub fn server_cpu_us_per_op(&self) -> f64 {
        let cores: f64 =
            self.usages.iter().filter(|u| u.component.role != Role::Client).map(|u| u.cpu_pct / 100.0).sum();
        cores * self.run.elapsed.as_secs_f64() * 1e6 / self.run.ops().max(1) as f64
    }
}

pub async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    args.load.check(&args.clients)?;
    anyhow::ensure!((1..=7).contains(&args.replicas), "--replicas between 1 and 7");
    let ceiling = if args.no_ceiling {
        Rates::new()
    } else {
        ceiling(&args.load, &args.clients, args.port + 90).await?
    };
    let dir = bench_dir("throughput")?;
    for mode in args.modes() {
        // The same port for a mode whatever else runs (as --help says).
        let offset = if mode == Mode::Active { 50 } else { 0 };
        let options = UpOptions {
            replicas: args.replicas,
            port: args.port + offset,
            mode,
            durability: args.durability,
        };
        let points = tandem(dir.path(), options, &args.load, &args.clients, &ceiling).await?;
        summarize(&format!("tandem_{mode}"), &points);
    }
    Ok(())
}

impl ThroughputArgs {
    fn modes(&self) -> Vec<Mode> {
        self.mode.modes()
    }
}

/// A temporary directory for a bench's groups, removed when dropped.
pub fn bench_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("tandem-bench-{name}-"))
        .tempdir()
        .context("cannot make a temporary directory")
}

/// The no-op server's throughput at each client count; prints a line per run.
pub async fn ceiling(load: &LoadArgs, clients: &[u32], port: u16) -> anyhow::Result<Rates> {
    let server = NoopServer::start(port, load.value_bytes).await?;
    let points =
        points("system=noop", load, clients, None, |n| server.clients(n), || server.components()).await?;
    Ok(points.iter().map(|p| (p.clients, p.run.ops_per_s())).collect())
}

/// A new group of `options` in `dir`: one run per client count, then stopped.
pub async fn tandem(
    dir: &Path,
    options: UpOptions,
    load: &LoadArgs,
    clients: &[u32],
    ceiling: &Rates,
) -> anyhow::Result<Vec<Point>> {
    let up = start_tandem(dir, options).await?;
    let points = tandem_points(&up, options, load, clients, ceiling).await?;
    up.stop().await?;
    Ok(points)
}

pub async fn start_tandem(dir: &Path, options: UpOptions) -> anyhow::Result<Up> {
    eprintln!(
        "bench: tandem up --mode {} --durability {} --replicas {} --port {}",
        options.mode, options.durability, options.replicas, options.port
    );
    Up::start(dir, options).await
}

/// One run per client count against a running group.
pub async fn tandem_points(
    up: &Up,
    options: UpOptions,
    load: &LoadArgs,
    clients: &[u32],
    ceiling: &Rates,
) -> anyhow::Result<Vec<Point>> {
    let label = format!("system=tandem mode={} durability={}", options.mode, options.durability);
    points(&label, load, clients, Some(ceiling), |n| tandem_clients(&up.endpoints, n), || up.components())
        .await
}

/// A run per client count: `make(C)` makes the C clients; `components` names the
/// system's processes. Prints a `throughput` line and a `component` line per process.
pub async fn points<T: Target>(
    label: &str,
    load: &LoadArgs,
    clients: &[u32],
    ceiling: Option<&Rates>,
    make: impl Fn(u32) -> anyhow::Result<Vec<T>>,
    components: impl Fn() -> Vec<Component>,
) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for &n in clients {
        let progress = format!("{label} clients={n}");
        let running = Load::start(make(n)?, load.shape(n, progress.clone()))
            .await
            .with_context(|| format!("{progress}: the load did not start"))?;
        let mut watched = components();
        watched.push(Component::this_process());
        let sampler = Sampler::start(watched);
        let run = running.run_for(Duration::from_secs(load.seconds)).await?;
        let usages =
            sampler.finish().with_context(|| format!("{progress}: a process died during the run"))?;
        run.print_errors(&progress);
        let fraction = ceiling
            .and_then(|c| c.get(&n))
            .map(|ceiling| format!(" ceiling_fraction={:.2}", run.ops_per_s() / ceiling))
            .unwrap_or_default();
        println!(
            "throughput {label} clients={n} {} read_percent={} value_bytes={}{fraction} {}",
            run.words(),
            load.read_percent,
            load.value_bytes,
            resources::summary(&usages)
        );
        for usage in &usages {
            println!("component {label} clients={n} {}", resources::component_words(usage));
        }
        points.push(Point { clients: n, run, usages });
    }
    Ok(points)
}

/// `summary system=… ops_per_s_<C>=…` over the client counts: the line to compare.
fn summarize(system: &str, points: &[Point]) {
    let rates: Vec<String> =
        points.iter().map(|p| format!("ops_per_s_{}={:.0}", p.clients, p.run.ops_per_s())).collect();
    println!("summary system={system} {}", rates.join(" "));
}
