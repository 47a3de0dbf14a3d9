//! What each process of a system under load uses: CPU (utime + stime from
//! /proc/PID/stat, over a run, as a percentage of one core) and memory (VmRSS and VmHWM
//! from /proc/PID/status). The benches name the processes (`Component`), sample them
//! when a run starts and again when it ends.

use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

/// What a process is, in the figures' names (`cpu_<plural>_pct`, `rss_<role>_max_mb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `tandem up`: the RM.
    Rm,
    Gfd,
    Replica,
    Lfd,
    /// An etcd member.
    Etcd,
    /// The no-op gRPC server of the ceiling.
    Noop,
    /// This process: the bench's clients.
    Client,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rm => "rm",
            Self::Gfd => "gfd",
            Self::Replica => "replica",
            Self::Lfd => "lfd",
            Self::Etcd => "etcd",
            Self::Noop => "noop",
            Self::Client => "client",
        }
    }

    /// The sum over every process of the role: `cpu_replicas_pct`, `cpu_rm_pct`.
    fn plural(self) -> &'static str {
        match self {
            Self::Replica => "replicas",
            Self::Lfd => "lfds",
            Self::Etcd => "etcds",
            other => other.name(),
        }
    }
}

/// One process to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub role: Role,
    pub pid: u32,
}

impl Component {
    pub fn new(name: impl Into<String>, role: Role, pid: u32) -> Self {
        Self { name: name.into(), role, pid }
    }

    /// This process (the clients).
    pub fn this_process() -> Self {
        Self::new("client", Role::Client, std::process::id())
    }
}

/// What one process used over a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub component: Component,
    /// CPU time over wall time, % of one core (200 on two busy cores).
    pub cpu_pct: f64,
    pub rss_mb: f64,
    /// The highest RSS since the process started (not only during the run).
    pub hwm_mb: f64,
}

/// CPU ticks of each component when a run started.
pub struct Sampler {
    components: Vec<(Component, u64)>,
    started: Instant,
}

impl Sampler {
    /// Reads every component's CPU time now. One that cannot be read (it just died)
    /// counts from zero.
    pub fn start(components: Vec<Component>) -> Self {
        let components = components
            .into_iter()
            .map(|c| {
                let ticks = cpu_ticks(c.pid).unwrap_or(0);
                (c, ticks)
            })
            .collect();
        Self { components, started: Instant::now() }
    }

    /// What each component used since `start`.
    pub fn finish(self) -> anyhow::Result<Vec<Usage>> {
        let elapsed = self.started.elapsed();
        let per_second = ticks_per_second();
        self.components
            .into_iter()
            .map(|(component, before)| {
                let pid = component.pid;
                let after =
                    cpu_ticks(pid).with_context(|| format!("{} (pid {pid}) is gone", component.name))?;
                let memory =
                    memory(pid).with_context(|| format!("{} (pid {pid}) is gone", component.name))?;
                Ok(Usage {
                    cpu_pct: cpu_percent(after.saturating_sub(before), per_second, elapsed),
                    rss_mb: memory.rss_kib as f64 / 1024.0,
                    hwm_mb: memory.hwm_kib as f64 / 1024.0,
                    component,
                })
            })
            .collect()
    }
}

/// `cpu_<role>_pct=` (summed over the role's processes) and `rss_<role>_max_mb=` (the
/// largest), in the roles' order.
pub fn summary(usages: &[Usage]) -> String {
    let mut roles: Vec<Role> = usages.iter().map(|u| u.component.role).collect();
    roles.sort();
    roles.dedup();
    let mut words = Vec::new();
    for role in roles {
        let of_role = || usages.iter().filter(move |u| u.component.role == role);
        let cpu: f64 = of_role().map(|u| u.cpu_pct).sum();
        let rss = of_role().map(|u| u.rss_mb).fold(0.0, f64::max);
        words.push(format!("cpu_{}_pct={cpu:.0} rss_{}_max_mb={rss:.1}", role.plural(), role.name()));
    }
    words.join(" ")
}

/// One `name=… role=… pid=… cpu_pct=… rss_mb=… hwm_mb=…` text per process.
pub fn component_words(usage: &Usage) -> String {
    let c = &usage.component;
    format!(
        "name={} role={} pid={} cpu_pct={:.1} rss_mb={:.1} hwm_mb={:.1}",
        c.name,
        c.role.name(),
        c.pid,
        usage.cpu_pct,
        usage.rss_mb,
        usage.hwm_mb
    )
}

fn cpu_percent(ticks: u64, per_second: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 || per_second == 0 {
        return 0.0;
    }
    ticks as f64 / per_second as f64 / seconds * 100.0
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("no CPU times in {path}"))
}

/// utime (field 14) + stime (field 15) of a /proc/PID/stat text. The command name
/// (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After ')' the first field is field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_memory(&status).with_context(|| format!("no VmRSS or VmHWM in {path}"))
}

/// VmRSS and VmHWM of a /proc/PID/status text, KiB.
fn parse_memory(status: &str) -> Option<Memory> {
    Some(Memory { rss_kib: status_kib(status, "VmRSS:")?, hwm_kib: status_kib(status, "VmHWM:")? })
}

/// The `NAME:   123 kB` line of a /proc/PID/status text, KiB.
pub fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tandem (r1) x) S 1 4242 4242 0 -1 4194560 2520 0 0 0 1234 567 0 0 20 0 9 0 987654 1000000 3000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis at all"), None);
    }

    #[test]
    fn memory_is_read_from_status() {
        let status =
            "Name:\ttandem\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t9\n";
        assert_eq!(parse_memory(status), Some(Memory { rss_kib: 40960, hwm_kib: 51200 }));
        assert_eq!(parse_memory("Name:\tkernel thread\n"), None, "a kernel thread has no VmRSS");
    }

    #[test]
    fn cpu_is_a_percentage_of_one_core() {
        assert_eq!(cpu_percent(150, 100, Duration::from_secs(1)), 150.0);
        assert_eq!(cpu_percent(50, 100, Duration::from_secs(2)), 25.0);
        assert_eq!(cpu_percent(50, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn the_summary_sums_cpu_and_takes_the_largest_rss_per_role() {
        let usage = |name: &str, role, cpu_pct, rss_mb| Usage {
            component: Component::new(name, role, 1),
            cpu_pct,
            rss_mb,
            hwm_mb: rss_mb,
        };
        let usages = [
            usage("client", Role::Client, 30.0, 20.0),
            usage("r1", Role::Replica, 50.0, 30.0),
            usage("r2", Role::Replica, 40.0, 35.5),
            usage("up", Role::Rm, 2.0, 10.0),
        ];
        assert_eq!(
            summary(&usages),
            "cpu_rm_pct=2 rss_rm_max_mb=10.0 cpu_replicas_pct=90 rss_replica_max_mb=35.5 cpu_client_pct=30 rss_client_max_mb=20.0"
        );
    }
}
