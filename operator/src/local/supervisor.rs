//! Processes of `tandem up`: the GFD, and one replica plus its LFD per replica id.
//! Starts them with their logs in files, adopts the ones a previous `tandem up` left
//! running (its own crash must be a non-event), reports every exit, and stops them
//! (SIGTERM, then SIGKILL), all of them at shutdown. A process is known by its pid and
//! its start time, so a recycled pid is never mistaken for it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How often an adopted process (not our child: no exit notification) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(50);

/// Which process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Gfd,
    Replica(String),
    Lfd(String),
}

impl Role {
    fn file_name(&self) -> String {
        match self {
            Role::Gfd => "gfd.log".into(),
            Role::Replica(id) => format!("{id}.log"),
            Role::Lfd(id) => format!("{id}-lfd.log"),
        }
    }
}

/// One process, as the state file records it: pid and start time (clock ticks since
/// boot, /proc/PID/stat field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub started: u64,
}

impl ProcessId {
    /// The process with this pid now, if it runs (zombies do not).
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (state, started) = (fields.first()?, fields.get(19)?.parse().ok()?);
        (*state != "Z" && *state != "X").then_some(Self { pid, started })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now.started == self.started)
    }

    /// Sends `signal` if this very process still runs.
    pub fn signal(&self, signal: Signal) -> bool {
        self.alive() && kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }
}

/// A process ended: which one, which start of it, and how.
#[derive(Debug, Clone)]
pub struct Exit {
    pub role: Role,
    pub generation: u64,
    pub status: String,
}

#[derive(Debug, Clone)]
struct Process {
    id: ProcessId,
    generation: u64,
    /// Asked to stop; it counts as terminating until its exit is seen.
    stopping: bool,
}

pub struct Supervisor {
    binary: PathBuf,
    log_dir: PathBuf,
    processes: BTreeMap<Role, Process>,
    generation: u64,
    exits: mpsc::UnboundedSender<Exit>,
}

impl Supervisor {
    pub fn new(binary: PathBuf, log_dir: PathBuf) -> (Self, mpsc::UnboundedReceiver<Exit>) {
        let (exits, receiver) = mpsc::unbounded_channel();
        (Self { binary, log_dir, processes: BTreeMap::new(), generation: 0, exits }, receiver)
    }

    pub fn process(&self, role: &Role) -> Option<ProcessId> {
        self.processes.get(role).map(|p| p.id)
    }

    /// Running and not asked to stop.
    pub fn is_running(&self, role: &Role) -> bool {
        self.processes.get(role).is_some_and(|p| !p.stopping)
    }

    /// Asked to stop, not exited yet.
    pub fn is_stopping(&self, role: &Role) -> bool {
        self.processes.get(role).is_some_and(|p| p.stopping)
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Starts `role` with `args`; its output is appended to its log file.
    pub fn start(&mut self, role: Role, args: &[String]) -> std::io::Result<ProcessId> {
        let path = self.log_dir.join(role.file_name());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut child = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = child.id().unwrap_or_default();
        // Read right away: the child cannot have exited and been reaped yet.
        let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, started: 0 });
        let generation = self.next_generation();
        self.processes.insert(role.clone(), Process { id, generation, stopping: false });
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(error) => format!("wait failed: {error}"),
            };
            let _ = exits.send(Exit { role, generation, status });
        });
        Ok(id)
    }

    /// Takes over a process a previous `tandem up` started, if it still runs. It is not
    /// our child, so its exit is noticed by polling.
    pub fn adopt(&mut self, role: Role, id: ProcessId) -> bool {
        if !id.alive() {
            return false;
        }
        let generation = self.next_generation();
        self.processes.insert(role.clone(), Process { id, generation, stopping: false });
        let exits = self.exits.clone();
        tokio::spawn(async move {
            while id.alive() {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            let _ = exits.send(Exit { role, generation, status: "exited (adopted process)".into() });
        });
        true
    }

    /// Takes note of an exit. Returns false for a stale one (an earlier start of a
    /// process that has been started again since).
    pub fn exited(&mut self, exit: &Exit) -> bool {
        if self.processes.get(&exit.role).is_some_and(|p| p.generation == exit.generation) {
            self.processes.remove(&exit.role);
            return true;
        }
        false
    }

    /// Stops `role`: SIGTERM now (SIGCONT first, should it be paused), SIGKILL if it
    /// still runs after `grace`. It is `stopping` until its exit is seen.
    pub fn stop(&mut self, role: &Role, grace: Duration) {
        let Some(process) = self.processes.get_mut(role).filter(|p| !p.stopping) else { return };
        process.stopping = true;
        let id = process.id;
        id.signal(Signal::SIGCONT);
        id.signal(Signal::SIGTERM);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            id.signal(Signal::SIGKILL);
        });
    }

    /// Stops everything and waits (up to `grace`) for it to be gone.
    pub async fn stop_all(&mut self, grace: Duration) {
        let ids: Vec<ProcessId> = self.processes.values().map(|p| p.id).collect();
        self.processes.clear();
        for id in &ids {
            id.signal(Signal::SIGCONT);
            id.signal(Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && ids.iter().any(ProcessId::alive) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for id in ids {
            id.signal(Signal::SIGKILL);
        }
    }

    /// Every process: role, identity, and whether it was asked to stop.
    pub fn processes(&self) -> impl Iterator<Item = (&Role, ProcessId, bool)> {
        self.processes.iter().map(|(role, p)| (role, p.id, p.stopping))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = ProcessId::of(std::process::id()).expect("this process runs");
        assert!(me.alive());
        assert!(!ProcessId { started: me.started + 1, ..me }.alive(), "same pid, another start: not it");
        assert!(ProcessId::of(u32::MAX).is_none());
    }
}
