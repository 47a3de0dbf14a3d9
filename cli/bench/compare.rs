//! `tandem bench compare`: Tandem (both modes) against etcd on the same machine, driven
//! by one load driver at the same concurrency. Starts the ceiling (the no-op gRPC
//! server), a `tandem up` per mode and a 3-member etcd 3.4 cluster (data on tmpfs when
//! Tandem keeps its data in memory, on the same disk as Tandem's when it persists),
//! measures throughput and latency at each client count, then kills the leader (etcd)
//! or the primary (Tandem) with kill -9 under load, K times each, and measures how long
//! no request sent after the kill is acknowledged. Prints one `figure=` line per figure
//! with both values and the ratio (above 1: Tandem does better), and ends with the
//! `compare` line of issue 11. With `--plots DIR`, draws the figures as SVG (plots.rs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tandem_operator::local::StateFile;
use tandem_replica::pb::Mode;
use tandem_replica::storage::Durability;
use tandem_replica::wire::unix_ms;
use tokio::time::Instant;

use super::etcd::{self, Etcd};
use super::load::{Load, Op, Shape, Target, tandem_clients};
use super::plots::{self, Caption, Series};
use super::throughput::{self, LoadArgs, Point, Rates, bench_dir};
use super::up::UpOptions;
use super::{percentile, wait_until_healthy};

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Concurrent clients, one run per count and system.
    #[arg(long, value_delimiter = ',', default_value = "1,32,64")]
    pub clients: Vec<u32>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Tandem's durability: memory puts etcd's data on tmpfs (/dev/shm), anything on
    /// disk puts it in the temporary directory, beside Tandem's.
    #[arg(long, default_value = "memory")]
    pub durability: Durability,
    /// Members of each system.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Leader (primary) kills per system.
    #[arg(long, default_value_t = 3)]
    pub kills: u32,
    /// Clients writing during the kills.
    #[arg(long, default_value_t = 8)]
    pub failover_clients: u32,
    /// The Tandem mode whose primary is killed.
    #[arg(long, default_value = "passive")]
    pub failover_mode: Mode,
    /// The etcd binary (Debian's etcd-server is installed when the default is missing).
    #[arg(long, default_value = etcd::DEBIAN_ETCD)]
    pub etcd: PathBuf,
    /// Base port: Tandem passive on PORT, active on PORT+50, the no-op server on
    /// PORT+90, etcd's members on PORT+100.. (clients) and PORT+110.. (peers).
    #[arg(long, default_value_t = 7800)]
    pub port: u16,
    /// Draw bench-throughput.svg and bench-failover.svg into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
}

/// How long each kill's wait for the system to serve again may take.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long a system may take to come back to full strength after a kill.
const HEAL_LIMIT: Duration = Duration::from_secs(60);
/// Steady load before each kill (the plot's "before").
const BEFORE_KILL: Duration = Duration::from_secs(1);

/// What one system's kills measured.
struct Failover {
    /// kill -> first request sent after it acknowledged, per kill.
    unavailable_ms: Vec<u64>,
    /// Around the first kill: (seconds since the kill, latency ms) of each request.
    around_first: Vec<(f64, f64)>,
}

/// Everything one system measured.
struct Measured {
    points: Vec<Point>,
    failover: Option<Failover>,
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    args.load.check(&args.clients)?;
    anyhow::ensure!((3..=7).contains(&args.replicas), "--replicas between 3 and 7");
    anyhow::ensure!((1..=20).contains(&args.kills), "--kills between 1 and 20");
    anyhow::ensure!((1..=256).contains(&args.failover_clients), "--failover-clients between 1 and 256");
    if let Some(dir) = &args.plots {
        // Found out now, not after minutes of measuring.
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {} (--plots)", dir.display()))?;
    }
    let caption = Caption::of_this_run();
    let etcd_version = etcd::ensure_installed(&args.etcd).await?;
    let dir = bench_dir("compare")?;
    let etcd_parent =
        if args.durability.on_disk() { std::env::temp_dir() } else { PathBuf::from("/dev/shm") };
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    println!(
        "compare setup replicas={} tandem_durability={} tandem_dir={} tandem_fs={} etcd_data={} etcd_fs={} etcd=\"{etcd_version}\" machine=\"{}\"",
        args.replicas,
        args.durability,
        dir.path().display(),
        filesystem_of(&mounts, dir.path()),
        etcd_parent.display(),
        filesystem_of(&mounts, &etcd_parent),
        caption.machine
    );

    let ceiling = throughput::ceiling(&args.load, &args.clients, args.port + 90).await?;
    let passive = tandem(&args, dir.path(), Mode::Passive, 0, &ceiling).await?;
    let active = tandem(&args, dir.path(), Mode::Active, 50, &ceiling).await?;
    let etcd = etcd(&args, &etcd_parent).await?;

    let reference = reference_clients(&args.clients);
    let report = Report { ceiling: &ceiling, passive: &passive, active: &active, etcd: &etcd, reference };
    for line in report.lines() {
        println!("{line}");
    }
    if let Some(dir) = &args.plots {
        draw(dir, &caption, &report, args.failover_mode)?;
    }
    Ok(())
}

/// One Tandem group: throughput at each client count, then the kills if its mode is the
/// one asked for.
async fn tandem(
    args: &CompareArgs,
    dir: &Path,
    mode: Mode,
    port_offset: u16,
    ceiling: &Rates,
) -> anyhow::Result<Measured> {
    let options = UpOptions {
        replicas: args.replicas,
        port: args.port + port_offset,
        mode,
        durability: args.durability,
    };
    let up = throughput::start_tandem(dir, options).await?;
    let points = throughput::tandem_points(&up, options, &args.load, &args.clients, ceiling).await?;
    let failover = if mode == args.failover_mode {
        let clients = tandem_clients(&up.endpoints, args.failover_clients)?;
        let mut faults = TandemFaults { dir, replicas: args.replicas };
        Some(failover(&format!("tandem_{mode}"), clients, &args.load, args.kills, &mut faults).await?)
    } else {
        None
    };
    up.stop().await?;
    Ok(Measured { points, failover })
}

/// The etcd cluster: throughput at each client count, then the kills.
async fn etcd(args: &CompareArgs, parent: &Path) -> anyhow::Result<Measured> {
    eprintln!("bench: etcd, {} members, data in {}", args.replicas, parent.display());
    let mut etcd = Etcd::start(&args.etcd, args.port + 100, args.replicas as u16, parent).await?;
    let points = throughput::points(
        "system=etcd",
        &args.load,
        &args.clients,
        None,
        |n| etcd.clients(n),
        || etcd.components(),
    )
    .await?;
    let clients = etcd.clients(args.failover_clients)?;
    let failover = failover("etcd", clients, &args.load, args.kills, &mut etcd).await?;
    etcd.stop().await?;
    Ok(Measured { points, failover: Some(failover) })
}

/// A system whose leader can be killed.
trait Faults {
    /// kill -9 of the leader (etcd) or primary (Tandem): its name, and when the signal
    /// was sent.
    async fn kill_leader(&mut self) -> anyhow::Result<(String, Instant)>;
    /// Back to full strength (the killed member restarted and caught up).
    async fn heal(&mut self) -> anyhow::Result<()>;
}

struct TandemFaults<'a> {
    dir: &'a Path,
    replicas: u32,
}

impl Faults for TandemFaults<'_> {
    async fn kill_leader(&mut self) -> anyhow::Result<(String, Instant)> {
        let state = StateFile::read(self.dir).context("the local system's state file vanished")?;
        let (victim, _epoch, killed_at) = crate::chaos::kill_primary(&state).await?;
        let since = Duration::from_millis(unix_ms().saturating_sub(killed_at));
        Ok((victim, Instant::now() - since))
    }

    async fn heal(&mut self) -> anyhow::Result<()> {
        // The RM restarts the killed replica, which rejoins.
        wait_until_healthy(self.dir, self.replicas, HEAL_LIMIT).await
    }
}

impl Faults for Etcd {
    async fn kill_leader(&mut self) -> anyhow::Result<(String, Instant)> {
        let leader = self.leader().await?;
        self.kill(leader).await
    }

    async fn heal(&mut self) -> anyhow::Result<()> {
        self.restart_killed(HEAL_LIMIT).await
    }
}

/// Keeps `clients` writing and kills the leader `kills` times, each after a second of
/// steady load, waiting for full strength in between. Prints a line per kill.
async fn failover<T: Target>(
    system: &str,
    clients: Vec<T>,
    load: &LoadArgs,
    kills: u32,
    faults: &mut impl Faults,
) -> anyhow::Result<Failover> {
    let value = Bytes::from(vec![b'v'; load.value_bytes]);
    let shape = Shape {
        timeline: true,
        progress: Some(format!("{system} failover")),
        ..Shape::writes(value, "failover")
    };
    let running =
        Load::start(clients, shape).await.with_context(|| format!("{system}: the load did not start"))?;
    let origin = running.origin();
    let mut unavailable_ms = Vec::new();
    let mut window = None;
    for kill in 1..=kills {
        tokio::time::sleep(BEFORE_KILL).await;
        let (victim, killed) =
            faults.kill_leader().await.with_context(|| format!("{system}: kill {kill}"))?;
        running.watch_from(Instant::now());
        let resumed = running
            .resumed(FAILOVER_LIMIT)
            .await
            .with_context(|| format!("{system}: nothing acknowledged after kill {kill} of {victim}"))?;
        let ms = resumed.saturating_duration_since(killed).as_millis() as u64;
        println!("failover system={system} kill={kill} victim={victim} unavailable_ms={ms}");
        unavailable_ms.push(ms);
        faults.heal().await.with_context(|| format!("{system}: no full strength after kill {kill}"))?;
        if kill == 1 {
            window = Some((killed, Instant::now()));
        }
    }
    let run = running.stop().await?;
    run.print_errors(&format!("{system} failover"));
    let (killed, healed) = window.expect("at least one kill");
    Ok(Failover { unavailable_ms, around_first: around(&run.timeline, origin, killed, healed) })
}

/// The requests from `BEFORE_KILL` before `killed` to `until`: (seconds since the kill,
/// latency ms).
fn around(timeline: &[Op], origin: Instant, killed: Instant, until: Instant) -> Vec<(f64, f64)> {
    let us = |at: Instant| at.saturating_duration_since(origin).as_micros() as i64;
    let (kill_us, from_us, until_us) = (us(killed), us(killed) - BEFORE_KILL.as_micros() as i64, us(until));
    timeline
        .iter()
        .filter(|op| (from_us..=until_us).contains(&(op.done_us as i64)))
        .map(|op| ((op.done_us as i64 - kill_us) as f64 / 1e6, op.latency_us as f64 / 1e3))
        .collect()
}

/// The client count the summary compares at: 32 when it was run, else the largest.
fn reference_clients(clients: &[u32]) -> u32 {
    if clients.contains(&32) { 32 } else { clients.iter().copied().max().unwrap_or(0) }
}

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// One figure of both systems; `ratio` is above 1 when Tandem does better.
#[derive(Debug, Clone, PartialEq)]
struct Figure {
    name: String,
    tandem: f64,
    etcd: f64,
    better: Better,
}

impl Figure {
    fn ratio(&self) -> f64 {
        match self.better {
            Better::Higher => self.tandem / self.etcd,
            Better::Lower => self.etcd / self.tandem,
        }
    }

    fn line(&self) -> String {
        let value =
            |v: f64| if self.better == Better::Higher { format!("{v:.0}") } else { format!("{v:.2}") };
        format!(
            "figure={} tandem={} etcd={} ratio={:.2}",
            self.name,
            value(self.tandem),
            value(self.etcd),
            self.ratio()
        )
    }
}

/// What the comparison prints, from what it measured.
struct Report<'a> {
    ceiling: &'a Rates,
    passive: &'a Measured,
    active: &'a Measured,
    etcd: &'a Measured,
    reference: u32,
}

impl Report<'_> {
    fn at(measured: &Measured, clients: u32) -> Option<&Point> {
        measured.points.iter().find(|p| p.clients == clients)
    }

    fn figures(&self) -> Vec<Figure> {
        let mut figures = Vec::new();
        for etcd in &self.etcd.points {
            let c = etcd.clients;
            for (mode, tandem) in [("passive", self.passive), ("active", self.active)] {
                let Some(tandem) = Self::at(tandem, c) else { continue };
                figures.push(Figure {
                    name: format!("throughput_{c}_{mode}"),
                    tandem: tandem.run.ops_per_s(),
                    etcd: etcd.run.ops_per_s(),
                    better: Better::Higher,
                });
                if c == self.reference {
                    figures.push(Figure {
                        name: format!("server_cpu_us_per_op_{c}_{mode}"),
                        tandem: tandem.server_cpu_us_per_op(),
                        etcd: etcd.server_cpu_us_per_op(),
                        better: Better::Lower,
                    });
                }
                let (t, e) = (tandem.run.latency(), etcd.run.latency());
                for (name, tandem, etcd) in [("p50_ms", t.p50_ms, e.p50_ms), ("p99_ms", t.p99_ms, e.p99_ms)] {
                    figures.push(Figure {
                        name: format!("{name}_{c}_{mode}"),
                        tandem,
                        etcd,
                        better: Better::Lower,
                    });
                }
            }
        }
        if let (Some(tandem), Some(etcd)) = (self.tandem_failover(), &self.etcd.failover) {
            let (t, e) = (&tandem.unavailable_ms, &etcd.unavailable_ms);
            for (name, of) in [("p50", 0.5), ("max", 1.0)] {
                figures.push(Figure {
                    name: format!("failover_ms_{name}"),
                    tandem: percentile(t.clone(), of) as f64,
                    etcd: percentile(e.clone(), of) as f64,
                    better: Better::Lower,
                });
            }
        }
        figures
    }

    fn tandem_failover(&self) -> Option<&Failover> {
        self.passive.failover.as_ref().or(self.active.failover.as_ref())
    }

    /// The figure lines, the ceiling lines, then the `compare` line.
    fn lines(&self) -> Vec<String> {
        let figures = self.figures();
        let mut lines: Vec<String> = figures.iter().map(Figure::line).collect();
        for (&c, &ceiling) in self.ceiling {
            let fraction = |m: &Measured| Self::at(m, c).map_or(f64::NAN, |p| p.run.ops_per_s() / ceiling);
            lines.push(format!(
                "ceiling clients={c} ops_per_s={ceiling:.0} tandem_passive_fraction={:.2} tandem_active_fraction={:.2} etcd_fraction={:.2}",
                fraction(self.passive),
                fraction(self.active),
                fraction(self.etcd)
            ));
        }
        let r = self.reference;
        if r != 32 {
            lines.push(format!("note: 32 clients were not run; the compare line is at {r} clients"));
        }
        let ratio = |name: &str| figures.iter().find(|f| f.name == name).map_or(f64::NAN, Figure::ratio);
        // p99: the worse of Tandem's two modes against etcd.
        let p99 = ratio(&format!("p99_ms_{r}_passive")).min(ratio(&format!("p99_ms_{r}_active")));
        lines.push(format!(
            "compare failover_ratio={:.2} throughput_ratio_passive={:.2} throughput_ratio_active={:.2} p99_ratio={p99:.2}",
            ratio("failover_ms_p50"),
            ratio(&format!("throughput_{r}_passive")),
            ratio(&format!("throughput_{r}_active")),
        ));
        lines
    }
}

/// bench-throughput.svg and bench-failover.svg in `dir`.
fn draw(dir: &Path, caption: &Caption, report: &Report, failover_mode: Mode) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rates = |m: &Measured| -> Vec<(f64, f64)> {
        m.points.iter().map(|p| (f64::from(p.clients), p.run.ops_per_s())).collect()
    };
    let ceiling: Vec<(f64, f64)> = report.ceiling.iter().map(|(&c, &r)| (f64::from(c), r)).collect();
    let throughput = [
        Series { name: "Tandem passive".into(), points: rates(report.passive) },
        Series { name: "Tandem active".into(), points: rates(report.active) },
        Series { name: "etcd 3.4".into(), points: rates(report.etcd) },
        Series { name: "no-op gRPC (ceiling)".into(), points: ceiling },
    ];
    let path = dir.join("bench-throughput.svg");
    plots::throughput(&path, caption, &throughput)?;
    eprintln!("compare: wrote {}", path.display());
    if let (Some(tandem), Some(etcd)) = (report.tandem_failover(), &report.etcd.failover) {
        let failover = [
            Series {
                name: format!("Tandem {failover_mode}: kill -9 of the primary"),
                points: tandem.around_first.clone(),
            },
            Series { name: "etcd 3.4: kill -9 of the leader".into(), points: etcd.around_first.clone() },
        ];
        let path = dir.join("bench-failover.svg");
        plots::failover(&path, caption, &failover)?;
        eprintln!("compare: wrote {}", path.display());
    }
    Ok(())
}

/// The type of the filesystem `path` is on, from /proc/mounts (the longest mount point
/// that holds it); "unknown" when none does.
fn filesystem_of(mounts: &str, path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (point, kind) = (fields.nth(1)?, fields.next()?);
            path.starts_with(point).then_some((point.len(), kind))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_owned(), |(_, kind)| kind.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_above_one_means_tandem_does_better() {
        let rate = Figure {
            name: "throughput_32_passive".into(),
            tandem: 30_000.0,
            etcd: 10_000.0,
            better: Better::Higher,
        };
        assert_eq!(rate.ratio(), 3.0);
        assert_eq!(rate.line(), "figure=throughput_32_passive tandem=30000 etcd=10000 ratio=3.00");
        let p99 = Figure { name: "p99_ms_32_active".into(), tandem: 20.0, etcd: 10.0, better: Better::Lower };
        assert_eq!(p99.ratio(), 0.5);
        assert_eq!(p99.line(), "figure=p99_ms_32_active tandem=20.00 etcd=10.00 ratio=0.50");
    }

    #[test]
    fn the_comparison_is_at_32_clients_or_else_the_most() {
        assert_eq!(reference_clients(&[1, 32, 64]), 32);
        assert_eq!(reference_clients(&[1, 8]), 8);
    }

    #[test]
    fn the_filesystem_is_that_of_the_longest_mount_point() {
        let mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(filesystem_of(mounts, Path::new("/dev/shm/x")), "tmpfs");
        assert_eq!(filesystem_of(mounts, Path::new("/tmp/x")), "ext4");
        assert_eq!(filesystem_of("", Path::new("/tmp")), "unknown");
    }

    #[test]
    fn the_window_of_a_failover_is_in_seconds_from_the_kill() {
        let origin = Instant::now();
        let killed = origin + Duration::from_secs(2);
        let timeline = [
            Op { done_us: 500_000, latency_us: 1_000 },
            Op { done_us: 1_500_000, latency_us: 2_000 },
            Op { done_us: 2_300_000, latency_us: 300_000 },
            Op { done_us: 9_000_000, latency_us: 1_000 },
        ];
        let window = around(&timeline, origin, killed, origin + Duration::from_secs(5));
        assert_eq!(window, vec![(-0.5, 2.0), (0.3, 300.0)]);
    }
}
