//! The nemesis' faults: what they are (a plan drawn from the seed) and how they are
//! injected into the running system. Every fault ends by itself: what is paused
//! resumes, what is cut heals, what burns stops; the RM does the rest.

use std::fmt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use tandem_operator::local::ProcessId;
use tandem_replica::pb;
use tokio::time::Instant;

use super::System;
use tandem_check::firewall::Firewall;

/// Which process of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Replica,
    Lfd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Kill {
        id: String,
        part: Part,
    },
    Pause {
        id: String,
        part: Part,
        ms: u64,
    },
    KillGfd,
    PauseGfd {
        ms: u64,
    },
    /// kill -9 `tandem up`, and start it again after `down_ms`.
    KillRm {
        down_ms: u64,
    },
    PauseRm {
        ms: u64,
    },
    /// Busy processes, more than the machine has cores, for `ms`.
    Starve {
        ms: u64,
        burners: usize,
    },
    /// No packet between two replicas for `ms`.
    CutReplicas {
        a: String,
        b: String,
        ms: u64,
    },
    /// No packet between a replica and any other replica for `ms` (its detectors still
    /// hear it): a primary cut off this way must be replaced while the cut lasts.
    IsolateReplica {
        id: String,
        ms: u64,
    },
    /// No packet between a replica and its detectors for `ms`.
    CutDetectors {
        id: String,
        ms: u64,
    },
    /// kill -9 a replica, again each time it comes back up, `times` in all.
    RapidKills {
        id: String,
        times: u32,
    },
    /// A replica fault and another of something else, at once.
    Both(Box<Fault>, Box<Fault>),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |part: &Part, id: &str| match part {
            Part::Replica => format!("replica {id}"),
            Part::Lfd => format!("the LFD of {id}"),
        };
        match self {
            Self::Kill { id, part: which } => write!(f, "kill -9 {}", part(which, id)),
            Self::Pause { id, part: which, ms } => write!(f, "SIGSTOP {} for {ms} ms", part(which, id)),
            Self::KillGfd => write!(f, "kill -9 the GFD"),
            Self::PauseGfd { ms } => write!(f, "SIGSTOP the GFD for {ms} ms"),
            Self::KillRm { down_ms } => {
                write!(f, "kill -9 tandem up (the RM), restart it after {down_ms} ms")
            }
            Self::PauseRm { ms } => write!(f, "SIGSTOP tandem up (the RM) for {ms} ms"),
            Self::Starve { ms, burners } => {
                write!(f, "starve the CPU with {burners} busy processes for {ms} ms")
            }
            Self::CutReplicas { a, b, ms } => write!(f, "cut the link {a} <-> {b} for {ms} ms"),
            Self::IsolateReplica { id, ms } => write!(f, "cut {id} off every other replica for {ms} ms"),
            Self::CutDetectors { id, ms } => write!(f, "cut {id} off its detectors for {ms} ms"),
            Self::RapidKills { id, times } => {
                write!(f, "kill -9 replica {id} {times} times as soon as it is back")
            }
            Self::Both(a, b) => write!(f, "{a} + {b}"),
        }
    }
}

/// Draws faults from the seed, given the group as the RM describes it.
pub struct Plan {
    pub partitions: bool,
}

/// A pause shorter than the detection window (300 ms at defaults), or longer.
fn pause_ms(rng: &mut StdRng) -> u64 {
    if rng.random_bool(0.4) { rng.random_range(30..250) } else { rng.random_range(400..2_000) }
}

impl Plan {
    pub fn choose(&self, rng: &mut StdRng, group: &pb::ServiceDescription) -> Fault {
        let config = group.configuration.clone().unwrap_or_default();
        let ids: Vec<String> = config.members.iter().map(|m| m.id.clone()).collect();
        let backups: Vec<String> = ids.iter().filter(|id| **id != config.primary).cloned().collect();
        // The primary half the time: it is what failover is about.
        let target = |rng: &mut StdRng| {
            if rng.random_bool(0.5) || backups.is_empty() {
                config.primary.clone()
            } else {
                backups.choose(rng).cloned().unwrap_or_default()
            }
        };
        let other = |rng: &mut StdRng| self.other(rng, &ids);
        match rng.random_range(0..100) {
            0..18 => Fault::Kill { id: target(rng), part: Part::Replica },
            18..34 => Fault::Pause { id: target(rng), part: Part::Replica, ms: pause_ms(rng) },
            34..40 => Fault::RapidKills { id: target(rng), times: rng.random_range(2..4) },
            40..56 => {
                let replica = if rng.random_bool(0.5) {
                    Fault::Kill { id: target(rng), part: Part::Replica }
                } else {
                    Fault::Pause { id: target(rng), part: Part::Replica, ms: pause_ms(rng) }
                };
                Fault::Both(Box::new(replica), Box::new(other(rng)))
            }
            56..70 if self.partitions => {
                let ms = rng.random_range(200..2_000);
                match rng.random_range(0..3) {
                    0 if !backups.is_empty() => {
                        let b = backups.choose(rng).cloned().unwrap_or_default();
                        Fault::CutReplicas { a: config.primary.clone(), b, ms }
                    }
                    1 => Fault::IsolateReplica { id: target(rng), ms },
                    _ => Fault::CutDetectors { id: target(rng), ms },
                }
            }
            _ => other(rng),
        }
    }

    /// A fault of something other than a replica.
    fn other(&self, rng: &mut StdRng, ids: &[String]) -> Fault {
        let id = ids.choose(rng).cloned().unwrap_or_else(|| "r1".into());
        match rng.random_range(0..7) {
            0 => Fault::Kill { id, part: Part::Lfd },
            1 => Fault::Pause { id, part: Part::Lfd, ms: pause_ms(rng) },
            2 => Fault::KillGfd,
            3 => Fault::PauseGfd { ms: rng.random_range(100..3_000) },
            4 => Fault::KillRm { down_ms: rng.random_range(0..1_500) },
            5 => Fault::PauseRm { ms: rng.random_range(100..2_000) },
            _ => Fault::Starve { ms: rng.random_range(300..2_000), burners: 4 },
        }
    }
}

fn process(system: &System, id: &str, part: Part) -> Option<ProcessId> {
    let entry = system.state()?.replicas.get(id)?.clone();
    match part {
        Part::Replica => entry.process(),
        Part::Lfd => entry.lfd_process(),
    }
}

/// Injects `fault`; returns once it is over (paused things resumed, cuts healed).
pub async fn inject(fault: &Fault, system: &System, firewall: Option<&Firewall>) {
    match fault {
        Fault::Both(a, b) => {
            futures::join!(Box::pin(inject(a, system, firewall)), Box::pin(inject(b, system, firewall)));
        }
        Fault::Kill { id, part } => {
            if let Some(process) = process(system, id, *part) {
                process.signal(Signal::SIGKILL);
            }
        }
        Fault::Pause { id, part, ms } => {
            if let Some(process) = process(system, id, *part) {
                process.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                process.signal(Signal::SIGCONT);
            }
        }
        Fault::KillGfd => {
            if let Some(gfd) = system.state().and_then(|s| s.gfd_process()) {
                gfd.signal(Signal::SIGKILL);
            }
        }
        Fault::PauseGfd { ms } => {
            if let Some(gfd) = system.state().and_then(|s| s.gfd_process()) {
                gfd.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                gfd.signal(Signal::SIGCONT);
            }
        }
        Fault::KillRm { down_ms } => {
            system.kill();
            tokio::time::sleep(Duration::from_millis(*down_ms)).await;
            if let Err(error) = system.spawn() {
                println!("           cannot restart tandem up: {error:#}");
            }
        }
        Fault::PauseRm { ms } => {
            system.signal(Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            system.signal(Signal::SIGCONT);
        }
        Fault::Starve { ms, burners } => {
            let mut busy: Vec<std::process::Child> = (0..*burners)
                .filter_map(|_| Command::new("yes").stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok())
                .collect();
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            for child in &mut busy {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Fault::CutReplicas { a, b, ms } => {
            if let (Some(firewall), Some(a), Some(b)) =
                (firewall, address_of(system, a), address_of(system, b))
            {
                report(firewall.cut(&a, &b));
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                report(firewall.heal());
            }
        }
        Fault::IsolateReplica { id, ms } => {
            let others: Vec<String> = system
                .state()
                .map(|state| state.replicas.keys().filter(|other| *other != id).cloned().collect())
                .unwrap_or_default();
            if let (Some(firewall), Some(host)) = (firewall, address_of(system, id)) {
                for other in others.iter().filter_map(|other| address_of(system, other)) {
                    report(firewall.cut(&host, &other));
                }
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                report(firewall.heal());
            }
        }
        Fault::CutDetectors { id, ms } => {
            let lfd = rm_number(id).map(|n| format!("127.0.11.{n}"));
            if let (Some(firewall), Some(lfd)) = (firewall, lfd) {
                report(firewall.isolate(&lfd));
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                report(firewall.heal());
            }
        }
        Fault::RapidKills { id, times } => {
            for round in 0..*times {
                let Some(victim) = process(system, id, Part::Replica) else { return };
                victim.signal(Signal::SIGKILL);
                if round + 1 == *times {
                    return;
                }
                // Wait (bounded) for its replacement to be running, then kill that too.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline
                    && process(system, id, Part::Replica).is_none_or(|p| p == victim || !p.alive())
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// A firewall change that failed: said, and the campaign goes on (the fault is then
/// milder than planned, never harsher).
fn report(result: Result<(), String>) {
    if let Err(error) = result {
        println!("           {error}");
    }
}

fn rm_number(id: &str) -> Option<u32> {
    tandem_operator::rm::id_number(id)
}

/// The loopback address a replica listens on (its host part).
fn address_of(system: &System, id: &str) -> Option<String> {
    let address = system.state()?.replicas.get(id)?.address.clone();
    Some(address.rsplit_once(':')?.0.to_owned())
}
