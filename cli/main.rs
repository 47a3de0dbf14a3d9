//! `tandem`: the one command of Tandem. Runs a replica (`tandem replica`), talks to a
//! running group as a client (`put`, `get`, `del`, `incr`, `cas`), and administers it
//! (`status`, `configure`, `digest`). Every flag also reads a TANDEM_* variable.

mod admin;
mod bench;
mod chaos;
mod detectors;
mod endpoints;
mod flags;
mod kv;
mod nemesis;
mod operator;
mod replica;
mod telemetry;
mod up;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "A fault-tolerant replicated key-value service",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    telemetry: telemetry::LogArgs,
    /// This process's certificate for the internal plane (mutual TLS): a directory with
    /// ca.crt, tls.crt and tls.key. `tandem up` makes them in DIR/tls and passes them on;
    /// the admin commands take DIR/tls/manager by themselves.
    #[arg(long, env = "TANDEM_TLS_DIR", global = true)]
    tls_dir: Option<std::path::PathBuf>,
    /// Threads of this process's async runtime (default: the CPUs it may use, within
    /// its cgroup's quota). Set as TANDEM_WORKER_THREADS, `tandem up`'s children inherit
    /// it. Fewer than the CPUs can pay when many processes share a small machine.
    #[arg(long, env = "TANDEM_WORKER_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system locally: RM, GFD, replicas and LFDs, until Ctrl-C.
    Up(up::UpArgs),
    /// Run one replica (the server).
    Replica(replica::ReplicaArgs),
    /// Run a Local Fault Detector beside a replica.
    Lfd(detectors::LfdArgs),
    /// Run the Global Fault Detector.
    Gfd(detectors::GfdArgs),
    /// Read a key.
    Get(kv::GetArgs),
    /// Write a key.
    Put(kv::PutArgs),
    /// Delete a key.
    Del(kv::DelArgs),
    /// Add to a key holding a decimal integer (absent counts as 0).
    Incr(kv::IncrArgs),
    /// Compare-and-swap a key.
    Cas(kv::CasArgs),
    /// Show each replica's role, epoch, readiness and sequence numbers.
    Status(admin::StatusArgs),
    /// Install a configuration on replicas by hand (what the RM does for you).
    Configure(admin::ConfigureArgs),
    /// Show each replica's state digest (equal digests at equal seq: equal state).
    Digest(admin::DigestArgs),
    /// Change a running `tandem up` without restarting it.
    Set(admin::SetArgs),
    /// Hand the primary's role to another member (planned: nothing lost, clients follow).
    Switchover(admin::SwitchoverArgs),
    /// After every replica lost its state at once: start a new, empty group in its place.
    Recreate(admin::RecreateArgs),
    /// Inject a fault into a running `tandem up`.
    Chaos(chaos::ChaosArgs),
    /// Measure: failover, switchover, session memory, what TLS and durability cost,
    /// throughput, and Tandem against etcd
    /// (`tandem bench failover|switchover|sessions|tls|durability|throughput|compare`).
    Bench(bench::BenchArgs),
    /// Run a seeded fault campaign against a local system, then check it: linearizable,
    /// nothing acknowledged lost, nothing executed twice, equal digests, healed.
    Nemesis(nemesis::NemesisArgs),
    /// Run the Kubernetes operator (the RM for ReplicatedServices).
    Operator(Box<operator::OperatorArgs>),
    /// Print the ReplicatedService CRD (YAML), as checked in under crds/.
    Crd,
    /// Exit 0 if a replica is ready (grpc.health.v1 SERVING): a readiness probe.
    Health(replica::HealthArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let prints_events = match &cli.command {
        Command::Up(_) => true,
        Command::Bench(args) => args.prints_events(),
        _ => false,
    };
    telemetry::init(&cli.telemetry, prints_events);
    // The GFD sidecar starts beside the operator, which writes its certificate.
    let wait = if matches!(cli.command, Command::Gfd(_)) { Duration::from_secs(120) } else { Duration::ZERO };
    if let Some(dir) = &cli.tls_dir
        && let Err(error) = endpoints::wait_for_identity(dir, wait).await
    {
        eprintln!("error: {error:#}");
        return std::process::ExitCode::FAILURE;
    }
    let outcome = match cli.command {
        Command::Up(args) => up::up(args).await,
        Command::Replica(args) => replica::run(args).await,
        Command::Lfd(args) => detectors::lfd(args).await,
        Command::Gfd(args) => detectors::gfd(args, cli.tls_dir.clone()).await,
        Command::Get(args) => kv::get(args).await,
        Command::Put(args) => kv::put(args).await,
        Command::Del(args) => kv::del(args).await,
        Command::Incr(args) => kv::incr(args).await,
        Command::Cas(args) => kv::cas(args).await,
        Command::Status(args) => admin::status(args).await,
        Command::Configure(args) => admin::configure(args).await,
        Command::Digest(args) => admin::digest(args).await,
        Command::Set(args) => admin::set(args).await,
        Command::Recreate(args) => admin::recreate(args).await,
        Command::Switchover(args) => admin::switchover(args).await,
        Command::Chaos(args) => chaos::chaos(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::Nemesis(args) => nemesis::nemesis(args).await,
        Command::Health(args) => replica::health(args).await,
        Command::Operator(args) => operator::operator(*args).await,
        Command::Crd => {
            print!("{}", tandem_operator::crd::crd_yaml());
            Ok(())
        }
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
