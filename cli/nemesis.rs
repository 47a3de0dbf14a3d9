//! `tandem nemesis`: a seeded, replayable fault campaign against a real local system.
//! It starts `tandem up` (a real process, so that it can be killed and restarted too),
//! keeps recording clients running, and injects faults one after another, chosen at
//! random from the seed: kill -9 and SIGSTOP (shorter and longer than the detection
//! window) of replicas, LFDs, the GFD and `tandem up` itself; two at once; rapid
//! repeated kills; CPU starvation; links cut between replicas, or between a replica and
//! its detectors (firewall rules on loopback addresses, always removed). After each
//! fault it waits, within a bound, for the group to be whole again; at the end it checks
//! the run: linearizable, no acknowledged write lost, no request executed twice, equal
//! digests. One line sums it up; the exit status says whether everything held.

mod fault;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tandem_check::verdict;
use tandem_check::workload::{self, Recorder, Workload};
use tandem_operator::local::StateFile;
use tandem_replica::pb;
use tandem_replica::wire::{dial_internal, within};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fault::Plan;
use tandem_check::firewall::Firewall;
use tandem_replica::pb::Mode;

#[derive(Debug, Args)]
pub struct NemesisArgs {
    /// Replication mode: passive or active.
    #[arg(long, default_value = "passive")]
    pub mode: Mode,
    /// Chooses the faults, their targets and durations: the same seed, the same plan.
    #[arg(long, env = "TANDEM_NEMESIS_SEED", default_value_t = 1)]
    pub seed: u64,
    /// How many faults to inject.
    #[arg(long, default_value_t = 100)]
    pub faults: u32,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port of the system the nemesis starts (GFD, RM, then the replicas).
    #[arg(long, default_value_t = 7500)]
    pub port: u16,
    /// After each fault, how long the group may take to be whole again (every member of
    /// the spec's count ready and synced), in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub heal_bound_ms: u64,
    /// Stop injecting after this many seconds, whatever the count.
    #[arg(long, default_value_t = 1_800)]
    pub max_duration_s: u64,
    /// Leave out partitions (they need root and iptables).
    #[arg(long)]
    pub no_partitions: bool,
    /// Where the system keeps its state and logs (default: a new temporary directory,
    /// removed after a run that passed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the system's own output too.
    #[arg(long)]
    pub verbose: bool,
}

/// How long the group must stay whole to count as healed.
const STABLE: Duration = Duration::from_millis(500);

/// The `tandem up` under test.
struct System {
    dir: PathBuf,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl System {
    fn start(dir: &Path, args: Vec<String>) -> anyhow::Result<Self> {
        let system = Self { dir: dir.to_owned(), args, child: Mutex::new(None), log: dir.join("up.out") };
        system.spawn()?;
        Ok(system)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start tandem up")?;
        *self.child() = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<Pid> {
        self.child().as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// kill -9 `tandem up` alone: its replicas, LFDs and GFD keep running.
    fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, signal);
        }
    }

    fn state(&self) -> Option<StateFile> {
        StateFile::read(&self.dir)
    }

    async fn describe(&self) -> Option<pb::ServiceDescription> {
        let state = self.state()?;
        crate::endpoints::use_identity(&crate::endpoints::manager_tls(&self.dir), false).ok()?;
        let mut manager = pb::manager_client::ManagerClient::new(dial_internal(&state.manager, None).ok()?);
        within(Duration::from_millis(500), manager.describe(pb::DescribeRequest {}))
            .await
            .ok()
            .map(|d| d.into_inner())
    }

    /// Waits until the group is whole (the spec's count of members, each running, ready
    /// and synced in the current epoch, no other replica running, no trouble) and stays
    /// so for `STABLE`: a whole group right after a kill may only mean the RM has not
    /// noticed yet. Returns how long after the call the lasting whole state began.
    async fn wait_whole(&self, replicas: usize, bound: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let mut whole_since: Option<Instant> = None;
        let mut last = None;
        while started.elapsed() < bound + STABLE {
            match self.describe().await {
                Some(description) if whole(&description, replicas) => {
                    let since = *whole_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STABLE {
                        return Ok(since - started);
                    }
                }
                other => {
                    whole_since = None;
                    last = other.or(last);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("not whole within {} ms; the RM said: {last:#?}", bound.as_millis()))
    }

    fn stop(&self) {
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        let child = self.child().take();
        if let Some(mut child) = child {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // Whatever was paused resumes, so that it can stop.
        let state = self.state().unwrap_or_default();
        let replicas = state.replicas.values().flat_map(|r| [r.process(), r.lfd_process()]);
        for process in replicas.chain([state.gfd_process()]).flatten() {
            process.signal(Signal::SIGCONT);
        }
        self.stop();
    }
}

fn whole(description: &pb::ServiceDescription, replicas: usize) -> bool {
    let Some(config) = &description.configuration else { return false };
    let running = description.replicas.iter().filter(|r| r.process == "running").count();
    description.membership_known
        && description.trouble.is_empty()
        && config.members.len() == replicas
        && running == replicas
        && config.members.iter().all(|m| {
            description.replicas.iter().any(|r| {
                r.replica_id == m.id && r.ready && r.process == "running" && r.synced_epoch == config.epoch
            })
        })
}

pub async fn nemesis(args: NemesisArgs) -> anyhow::Result<()> {
    anyhow::ensure!((2..=9).contains(&args.replicas), "--replicas between 2 and 9: faults need a survivor");
    anyhow::ensure!(args.faults <= 10_000, "--faults at most 10000");
    let temporary = args.dir.is_none();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tandem-nemesis-{}", std::process::id())));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let firewall = if args.no_partitions {
        None
    } else {
        match Firewall::new() {
            Ok(firewall) => Some(firewall),
            Err(why) => {
                println!("partitions left out: {why}");
                None
            }
        }
    };
    let mode = args.mode.to_string();
    let up_args: Vec<String> = [
        "up",
        "--replicas",
        &args.replicas.to_string(),
        "--mode",
        &mode,
        "--port",
        &args.port.to_string(),
        "--loopback-per-replica",
        "--child-log-level",
        "info",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(["--dir".into(), dir.display().to_string()])
    .collect();
    println!(
        "nemesis: {mode} mode, {} replicas, seed {}, {} faults; state and logs in {}",
        args.replicas,
        args.seed,
        args.faults,
        dir.display()
    );
    let system = System::start(&dir, up_args)?;
    let outcome = campaign(&args, &system, firewall.as_ref()).await;
    drop(firewall);
    let passed = outcome.as_ref().is_ok_and(|o| o.passed());
    if !passed || args.verbose {
        print_tail(&system.log, if passed { 20 } else { 80 });
    }
    drop(system);
    let outcome = outcome?;
    println!(
        "nemesis mode={mode} seed={} ops={} faults={} violations={} lost_acked={} duplicates={} healed={} heal_ms_max={}",
        args.seed,
        outcome.operations,
        outcome.faults,
        outcome.violations,
        outcome.lost_acked,
        outcome.duplicates,
        if outcome.healed { "yes" } else { "no" },
        outcome.heal_ms_max
    );
    if passed && temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    anyhow::ensure!(passed, "the nemesis found a failure (logs in {})", dir.display());
    Ok(())
}

struct Outcome {
    operations: usize,
    faults: u32,
    violations: usize,
    lost_acked: usize,
    duplicates: usize,
    healed: bool,
    heal_ms_max: u128,
    converged: bool,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.violations == 0 && self.lost_acked == 0 && self.duplicates == 0 && self.healed && self.converged
    }
}

async fn campaign(
    args: &NemesisArgs,
    system: &System,
    firewall: Option<&Firewall>,
) -> anyhow::Result<Outcome> {
    let bound = Duration::from_millis(args.heal_bound_ms);
    let replicas = args.replicas as usize;
    system
        .wait_whole(replicas, Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)
        .context("the system never came up")?;
    let endpoints: Vec<String> =
        system.state().context("no state file")?.replicas.values().map(|r| r.address.clone()).collect();
    let workload =
        Workload { clients: 4, shared_keys: 8, max_ops: usize::MAX, think: Duration::from_millis(5) };
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers = workload::start(workload.clone(), endpoints, Arc::clone(&recorder), stop.clone());

    let mut rng = StdRng::seed_from_u64(args.seed);
    let plan = Plan { partitions: firewall.is_some() };
    let started = Instant::now();
    let (mut injected, mut heal_ms_max, mut healed) = (0, 0u128, true);
    while injected < args.faults && started.elapsed() < Duration::from_secs(args.max_duration_s) {
        let Some(description) = system.describe().await else {
            healed = false;
            println!("the RM does not answer before fault {}", injected + 1);
            break;
        };
        let fault = plan.choose(&mut rng, &description);
        injected += 1;
        println!("fault {injected:>3}: {fault}");
        fault::inject(&fault, system, firewall).await;
        match system.wait_whole(replicas, bound).await {
            Ok(took) => {
                heal_ms_max = heal_ms_max.max(took.as_millis());
                println!("           whole again after {} ms", took.as_millis());
            }
            Err(why) => {
                healed = false;
                println!("fault {injected}: {why}");
                break;
            }
        }
        // Let the clients get some work through between faults.
        tokio::time::sleep(Duration::from_millis(rand::Rng::random_range(&mut rng, 20..200))).await;
    }
    let members: Vec<String> = system
        .describe()
        .await
        .and_then(|d| d.configuration)
        .map(|c| c.members.into_iter().map(|m| m.address).collect())
        .unwrap_or_default();
    let verdict = verdict::judge(&members, &workload, &recorder, stop, writers).await;
    if let Some(violation) = &verdict.violation {
        println!("NOT LINEARIZABLE: {violation}");
    }
    for lost in verdict.lost_acked.iter().take(20) {
        println!("LOST: {lost}");
    }
    for duplicate in &verdict.duplicates {
        println!("EXECUTED TWICE: {duplicate}");
    }
    match &verdict.converged {
        Ok(digest) => {
            println!("digests equal at seq {} ({} keys) on {}", digest.seq, digest.keys, members.join(", "))
        }
        Err(why) => println!("DIGESTS DIFFER: {why}"),
    }
    println!(
        "{} operations, {} acknowledged unique writes, {} requests unanswered",
        verdict.operations, verdict.acknowledged_writes, verdict.unanswered
    );
    Ok(Outcome {
        operations: verdict.operations,
        faults: injected,
        violations: usize::from(verdict.violation.is_some()),
        lost_acked: verdict.lost_acked.len(),
        duplicates: verdict.duplicates.len(),
        healed,
        heal_ms_max,
        converged: verdict.converged.is_ok() && !members.is_empty(),
    })
}

fn print_tail(path: &Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    println!("----- {} (last {lines} lines) -----", path.display());
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("{line}");
    }
}
