//! `tandem bench failover`: starts its own local system (or uses a running one), keeps C
//! clients writing, kills the primary K times — waiting for full recovery in between —
//! and prints per kill the detection time (kill -> GFD membership change), the
//! client-observed unavailability (kill -> first write acknowledged by the new
//! configuration) and the recovery time (kill -> replacement ready), then a summary line.
//! At the end every acknowledged write is read back: `lost_acked` counts those missing.
//!
//! `tandem bench switchover` (switchover.rs): planned switchovers under load, the time
//! no write is acknowledged across each.
//!
//! `tandem bench sessions` (sessions.rs): a replica's memory with many client sessions,
//! before and after they expire, and with many idle connections.
//!
//! `tandem bench durability` (durability.rs): write throughput and latency with fsync
//! and in-memory durability, and the time a durable group takes to come back after
//! every process was killed.
//!
//! `tandem bench throughput` (throughput.rs): steady-state throughput, latency, CPU and
//! memory per component, against the ceiling of a no-op gRPC server (noop.rs).
//!
//! `tandem bench compare` (compare.rs): Tandem against etcd (etcd.rs) on one machine,
//! throughput, latency and leader kill -9, as figures, ratios and plots (plots.rs).
//!
//! What several of them share: a `tandem up` child process (up.rs), the load driver
//! (load.rs), each process's CPU and memory (resources.rs).

mod compare;
mod durability;
mod etcd;
mod load;
mod noop;
mod plots;
mod resources;
mod sessions;
mod switchover;
mod throughput;
mod up;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tandem_operator::local::{self, LocalSettings, Security, StateFile};
use tandem_operator::rm::Spec;
use tandem_replica::client::{Client, ClientSettings};
use tandem_replica::pb::{self, MembershipChange, operation};
use tandem_replica::wire::{dial_internal, unix_ms, within};

use crate::endpoints::manager_tls;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chaos::{kill_primary, pause_primary};
use tandem_replica::pb::Mode;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Kill (or hang) the primary K times under load; measure detection, failover and
    /// recovery.
    Failover(FailoverArgs),
    /// Create N one-shot client sessions; measure a replica's RSS and checkpoint time
    /// before and after they expire, and its RSS with C idle connections.
    Sessions(sessions::SessionsArgs),
    /// What mutual TLS on the internal plane costs: the failover bench twice, with and
    /// without it (each in a process of its own), side by side.
    Tls(FailoverArgs),
    /// What fsync durability costs (throughput, latency, against memory) and how long a
    /// group with ~100 MB takes to come back after kill -9 of every process.
    Durability(durability::DurabilityArgs),
    /// Hand the primary over N times under load (`tandem switchover`); measure how long
    /// no write is acknowledged across each, and count lost and failed requests.
    Switchover(switchover::SwitchoverArgs),
    /// Steady-state throughput and latency (p50/p99/p999) at each client count, in
    /// each mode, with the CPU and memory of every process, against a no-op gRPC
    /// server's (the ceiling).
    Throughput(throughput::ThroughputArgs),
    /// Tandem against etcd 3.4 on this machine: throughput, latency and leader kill -9
    /// with one load driver; a figure per line, ratios, optional SVG plots.
    Compare(compare::CompareArgs),
    /// The ceiling's server: answers Tandem's Execute at once, executing nothing.
    #[command(hide = true)]
    NoopServer(noop::NoopServerArgs),
}

/// What happens to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrimaryFault {
    /// kill -9: the process is gone (its LFD sees the health stream break at once).
    Kill,
    /// SIGSTOP for `--pause-ms`: it hangs (found after heartbeat interval x threshold),
    /// then resumes, is fenced by the new epoch and rejoins.
    Pause,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Replication mode: passive or active.
    #[arg(long, default_value = "passive")]
    pub mode: Mode,
    /// What to do to the primary.
    #[arg(long, value_enum, default_value = "kill")]
    pub fault: PrimaryFault,
    /// How long a paused primary stays paused, in milliseconds.
    #[arg(long, default_value_t = 1_500)]
    pub pause_ms: u64,
    /// How many times to fault the primary.
    #[arg(long, default_value_t = 5)]
    pub kills: u32,
    /// Concurrent writing clients.
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port of the system the bench starts.
    #[arg(long, default_value_t = 7300)]
    pub port: u16,
    /// Use the `tandem up` running with state in this directory instead of starting one.
    #[arg(long)]
    pub use_running: Option<PathBuf>,
    /// Print the system's own lines (membership changes, failovers) too.
    #[arg(long)]
    pub verbose: bool,
    /// Run the internal plane in plaintext (to measure what TLS costs).
    #[arg(long)]
    pub no_tls: bool,
}

impl BenchArgs {
    /// Whether the system's own lines are printed (`--verbose`).
    pub fn prints_events(&self) -> bool {
        match &self.bench {
            Bench::Failover(args) => args.verbose,
            Bench::Switchover(args) => args.verbose,
            Bench::Sessions(_)
            | Bench::Tls(_)
            | Bench::Durability(_)
            | Bench::Throughput(_)
            | Bench::Compare(_)
            | Bench::NoopServer(_) => false,
        }
    }
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    match args.bench {
        Bench::Failover(args) => failover(args).await,
        Bench::Sessions(args) => sessions::sessions(args).await,
        Bench::Tls(args) => tls_cost(args).await,
        Bench::Durability(args) => durability::durability(args).await,
        Bench::Switchover(args) => switchover::switchover(args).await,
        Bench::Throughput(args) => until_stopped(throughput::throughput(args)).await,
        Bench::Compare(args) => until_stopped(compare::compare(args)).await,
        Bench::NoopServer(args) => noop::serve(args).await,
    }
}

/// Runs `bench` unless Ctrl-C or SIGTERM comes first; then drops it, so that the child
/// processes it started are killed and its temporary directories removed.
async fn until_stopped(bench: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let signals = tokio::spawn(crate::replica::stop_on_signal(stop.clone()));
    let outcome = tokio::select! {
        outcome = bench => outcome,
        () = stop.cancelled() => Err(anyhow::anyhow!("interrupted; every process the bench started was stopped")),
    };
    signals.abort();
    outcome
}

/// Runs `tandem bench failover` with these settings twice, TLS on then off, in child
/// processes (a process has one identity on the internal plane), and compares.
async fn tls_cost(args: FailoverArgs) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the tandem executable")?;
    let mut results = Vec::new();
    for (label, no_tls, port) in [("tls", false, args.port), ("plaintext", true, args.port + 100)] {
        let mut command = tokio::process::Command::new(&binary);
        command.args(["bench", "failover", "--mode", &args.mode.to_string()]);
        command.args(["--kills", &args.kills.to_string(), "--clients", &args.clients.to_string()]);
        command.args(["--replicas", &args.replicas.to_string(), "--port", &port.to_string()]);
        if no_tls {
            command.arg("--no-tls");
        }
        println!("== {label}");
        let output = command.output().await.context("cannot run the failover bench")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        print!("{text}");
        anyhow::ensure!(
            output.status.success(),
            "the {label} run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let value = |key: &str| {
            text.split_whitespace()
                .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        results.push((value("p99"), value("writes_per_s")));
    }
    let ((tls_p99, tls_rate), (plain_p99, plain_rate)) = (results[0], results[1]);
    println!(
        "tls_cost failover_p99_ms tls={tls_p99} plaintext={plain_p99} writes_per_s tls={tls_rate:.0} plaintext={plain_rate:.0} throughput_ratio={:.2}",
        tls_rate / plain_rate
    );
    Ok(())
}

/// One acknowledged write.
#[derive(Debug, Clone)]
struct Ack {
    at: u64,
    epoch: u64,
    key: String,
    value: String,
}

#[derive(Default)]
struct Load {
    acks: Mutex<Vec<Ack>>,
    failures: Mutex<Vec<String>>,
}

struct Measured {
    victim: String,
    epoch: u64,
    detect_ms: u64,
    failover_ms: u64,
    recover_ms: u64,
}

/// Runs `run` against a local system: the running one in `use_running`, or one started
/// here (in a temporary directory named after `name`, on `port`) and stopped after it.
async fn on_local_system<T>(
    use_running: Option<&PathBuf>,
    name: &str,
    spec: Spec,
    port: u16,
    tls: bool,
    run: impl AsyncFnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<anyhow::Result<T>> {
    if let Some(dir) = use_running {
        return Ok(run(dir).await);
    }
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let settings = LocalSettings {
        spec,
        base_port: port,
        dir: dir.clone(),
        binary: std::env::current_exe().context("cannot find the tandem executable")?,
        log_level: "info".into(),
        loopback_per_replica: false,
        security: Security { tls, ..Security::default() },
        session_expiry_ms: tandem_replica::state::DEFAULT_SESSION_EXPIRY_MS,
    };
    let stop = CancellationToken::new();
    let system = tokio::spawn(local::run(settings, stop.clone()));
    let outcome = run(&dir).await;
    stop.cancel();
    system.await.context("local system task")?.context("local system")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.kills >= 1 && args.kills <= 100, "--kills between 1 and 100");
    anyhow::ensure!(args.clients >= 1 && args.clients <= 256, "--clients between 1 and 256");
    anyhow::ensure!(args.replicas >= 2, "failover needs at least 2 replicas");
    let started = Instant::now();
    let outcome = on_local_system(
        args.use_running.as_ref(),
        "tandem-bench",
        Spec { replicas: args.replicas, mode: args.mode, ..Spec::default() },
        args.port,
        !args.no_tls,
        async |dir| run_kills(&args, dir).await,
    )
    .await?;
    let (measured, lost, failed, acked, load_secs) = outcome?;
    let failovers: Vec<u64> = measured.iter().map(|m| m.failover_ms).collect();
    let detects: Vec<u64> = measured.iter().map(|m| m.detect_ms).collect();
    let fault = match args.fault {
        PrimaryFault::Kill => "kill".to_owned(),
        PrimaryFault::Pause => format!("pause ({} ms)", args.pause_ms),
    };
    println!(
        "{} mode, {} replicas, {} clients, {} faults of the primary ({fault}), {} acknowledged writes, {:.1} s",
        args.mode,
        args.replicas,
        args.clients,
        measured.len(),
        acked,
        started.elapsed().as_secs_f64()
    );
    let recovers: Vec<u64> = measured.iter().map(|m| m.recover_ms).collect();
    println!(
        "failover_ms p50={} p99={} max={} detect_ms p50={} p99={} recover_ms p50={} max={} writes_per_s={:.0} lost_acked={lost} failed_requests={failed}",
        percentile(failovers.clone(), 0.5),
        percentile(failovers.clone(), 0.99),
        failovers.iter().max().copied().unwrap_or_default(),
        percentile(detects.clone(), 0.5),
        percentile(detects, 0.99),
        percentile(recovers.clone(), 0.5),
        recovers.iter().max().copied().unwrap_or_default(),
        acked as f64 / load_secs.max(0.001),
    );
    Ok(())
}

/// The `p` quantile (0..1, nearest rank) of `values`; 0 when there are none.
fn percentile(mut values: Vec<u64>, p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Faults measured, lost and failed writes, acknowledged writes, seconds under load.
type Outcome = (Vec<Measured>, usize, usize, usize, f64);

/// Every membership event the GFD streamed.
type Events = Arc<Mutex<Vec<pb::MembershipEvent>>>;

async fn run_kills(args: &FailoverArgs, dir: &std::path::Path) -> anyhow::Result<Outcome> {
    let state = wait_for_state(dir).await?;
    let endpoints: Vec<String> = state.replicas.values().map(|r| r.address.clone()).collect();
    wait_until_healthy(dir, args.replicas, Duration::from_secs(60))
        .await
        .context("the system never became healthy")?;

    let events = Events::default();
    let stop = CancellationToken::new();
    tokio::spawn(record_membership(state.gfd.clone(), Arc::clone(&events), stop.clone()));
    let load = Arc::new(Load::default());
    let mut writers = start_writers(args.clients, &endpoints, &load, &stop)?;
    let load_started = Instant::now();
    let mut measured = Vec::new();
    for kill in 1..=args.kills {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let m = fault_the_primary(args, dir, &events, &load).await.with_context(|| format!("kill {kill}"))?;
        println!(
            "kill {kill}: primary {} (epoch {}): detected {} ms, writes resumed {} ms, replacement ready {} ms",
            m.victim, m.epoch, m.detect_ms, m.failover_ms, m.recover_ms
        );
        measured.push(m);
    }
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

/// `clients` sessions, each putting `bench/c<c>/<n>` for n = 1, 2, … until `stop`.
fn start_writers(
    clients: u32,
    endpoints: &[String],
    load: &Arc<Load>,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let mut writers = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut settings = ClientSettings::new(endpoints.to_vec());
        settings.client_id = Some(format!("bench{c}"));
        settings.deadline = Duration::from_secs(20);
        let mut client = Client::new(settings)?;
        let (load, stop) = (Arc::clone(load), stop.clone());
        writers.spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let (key, value) = (format!("bench/c{c}/{n}"), n.to_string());
                let op = operation::Kind::Put(pb::Put { key: key.clone(), value: value.clone().into() });
                match client.execute(op).await {
                    Ok(reply) => load.acks.lock().expect("lock").push(Ack {
                        at: unix_ms(),
                        epoch: reply.epoch,
                        key,
                        value,
                    }),
                    Err(error) => load.failures.lock().expect("lock").push(format!("{key}: {error}")),
                }
            }
        });
    }
    Ok(writers)
}

/// Kills (or pauses) the primary once and measures, from the fault, when the GFD saw
/// it, when a new configuration acknowledged a write, and when its replacement was ready;
/// then waits for the whole group.
async fn fault_the_primary(
    args: &FailoverArgs,
    dir: &std::path::Path,
    events: &Events,
    load: &Load,
) -> anyhow::Result<Measured> {
    let state = StateFile::read(dir).context("the local system's state file vanished")?;
    let (victim, epoch, faulted_at) = match args.fault {
        PrimaryFault::Kill => kill_primary(&state).await?,
        PrimaryFault::Pause => pause_primary(&state, Duration::from_millis(args.pause_ms)).await?,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let event_of_victim = |wanted: &dyn Fn(MembershipChange) -> bool| {
        let events = events.lock().expect("lock");
        events
            .iter()
            .find(|e| e.at_unix_ms >= faulted_at && e.replica_id == victim && wanted(e.change()))
            .map(|e| e.at_unix_ms)
    };
    let detected = first_seen(deadline, "the GFD never reported the primary gone", || {
        event_of_victim(&|c| matches!(c, MembershipChange::Failed | MembershipChange::DetectorLost))
    })
    .await?;
    let served = first_seen(deadline, "no write acknowledged by a new configuration", || {
        let acks = load.acks.lock().expect("lock");
        acks.iter().filter(|a| a.epoch > epoch && a.at >= faulted_at).map(|a| a.at).min()
    })
    .await?;
    let recovered = first_seen(deadline, "the old primary never came back ready", || {
        event_of_victim(&|c| c == MembershipChange::Ready)
    })
    .await?;
    wait_until_healthy(dir, args.replicas, Duration::from_secs(30)).await.context("no full recovery")?;
    Ok(Measured {
        victim,
        epoch,
        detect_ms: detected.saturating_sub(faulted_at),
        failover_ms: served.saturating_sub(faulted_at),
        recover_ms: recovered.saturating_sub(faulted_at),
    })
}

/// Polls `found` until it finds a time, or fails with `never` at `deadline`.
async fn first_seen(deadline: Instant, never: &str, found: impl Fn() -> Option<u64>) -> anyhow::Result<u64> {
    loop {
        if let Some(at) = found() {
            return Ok(at);
        }
        anyhow::ensure!(Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads every acknowledged write back; counts (and prints) those not there.
async fn count_lost(endpoints: &[String], acks: &[Ack]) -> anyhow::Result<usize> {
    let mut reader = Client::new(ClientSettings::new(endpoints.to_vec()))?;
    let mut lost = 0;
    for ack in acks {
        match reader.get(&ack.key).await {
            Ok(Some(value)) if value == ack.value.as_bytes() => {}
            other => {
                lost += 1;
                eprintln!("lost acknowledged write {}={}: read {other:?}", ack.key, ack.value);
            }
        }
    }
    Ok(lost)
}

async fn wait_for_state(dir: &std::path::Path) -> anyhow::Result<StateFile> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(state) = StateFile::read(dir).filter(|s| !s.replicas.is_empty()) {
            return Ok(state);
        }
        anyhow::ensure!(Instant::now() < deadline, "no local system appeared in {}", dir.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the configuration has `replicas` members, all alive and ready.
async fn wait_until_healthy(dir: &std::path::Path, replicas: u32, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(state) = StateFile::read(dir) {
            crate::endpoints::use_identity(&manager_tls(dir), false)?;
            let mut manager = pb::manager_client::ManagerClient::new(dial_internal(&state.manager, None)?);
            if let Ok(description) =
                within(Duration::from_millis(500), manager.describe(pb::DescribeRequest {})).await
            {
                let description = description.into_inner();
                let members = description.configuration.map(|c| c.members).unwrap_or_default();
                let healthy = members.len() == replicas as usize
                    && members
                        .iter()
                        .all(|m| description.replicas.iter().any(|r| r.replica_id == m.id && r.ready));
                if healthy {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "not healthy within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps every membership event the GFD streams, until `stop`.
async fn record_membership(gfd: String, events: Events, stop: CancellationToken) {
    let (updates, mut received) = tokio::sync::mpsc::unbounded_channel();
    if let Err(error) = tandem_operator::membership::follow(&gfd, updates, stop.clone()) {
        eprintln!("cannot follow the GFD: {error}");
        return;
    }
    while let Some(update) = received.recv().await {
        if let tandem_operator::membership::MembershipUpdate::Event(event) = update {
            events.lock().expect("lock").push(event);
        }
    }
}
