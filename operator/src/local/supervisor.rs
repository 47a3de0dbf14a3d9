//! Child processes of `tandem up`: the GFD, and one replica plus its LFD per replica id.
//! Starts them with their logs in files, reports every exit, and stops them (SIGTERM,
//! then SIGKILL) — including all of them at shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;

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

/// A process ended: which one, which start of it, and how.
#[derive(Debug, Clone)]
pub struct Exit {
    pub role: Role,
    pub generation: u64,
    pub status: String,
}

#[derive(Debug, Clone)]
struct Process {
    pid: u32,
    generation: u64,
}

pub struct Supervisor {
    binary: PathBuf,
    log_dir: PathBuf,
    running: BTreeMap<Role, Process>,
    generation: u64,
    exits: mpsc::UnboundedSender<Exit>,
}

impl Supervisor {
    pub fn new(binary: PathBuf, log_dir: PathBuf) -> (Self, mpsc::UnboundedReceiver<Exit>) {
        let (exits, receiver) = mpsc::unbounded_channel();
        (Self { binary, log_dir, running: BTreeMap::new(), generation: 0, exits }, receiver)
    }

    pub fn pid(&self, role: &Role) -> Option<u32> {
        self.running.get(role).map(|p| p.pid)
    }

    pub fn is_running(&self, role: &Role) -> bool {
        self.running.contains_key(role)
    }

    /// Starts `role` with `args`; its output is appended to its log file.
    pub fn start(&mut self, role: Role, args: &[String]) -> std::io::Result<u32> {
        let path = self.log_dir.join(role.file_name());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut child = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or_default();
        self.generation += 1;
        let generation = self.generation;
        self.running.insert(role.clone(), Process { pid, generation });
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(error) => format!("wait failed: {error}"),
            };
            let _ = exits.send(Exit { role, generation, status });
        });
        Ok(pid)
    }

    /// Takes note of an exit. Returns false for a stale one (an earlier start of a
    /// process that has been started again since).
    pub fn exited(&mut self, exit: &Exit) -> bool {
        if self.running.get(&exit.role).is_some_and(|p| p.generation == exit.generation) {
            self.running.remove(&exit.role);
            return true;
        }
        false
    }

    /// Stops `role`: SIGTERM now, SIGKILL if it still runs after `grace`.
    pub fn stop(&mut self, role: &Role, grace: Duration) {
        let Some(process) = self.running.remove(role) else { return };
        let pid = Pid::from_raw(process.pid as i32);
        let _ = kill(pid, Signal::SIGCONT);
        let _ = kill(pid, Signal::SIGTERM);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = kill(pid, Signal::SIGKILL);
        });
    }

    /// Stops everything and waits (up to `grace`) for it to be gone.
    pub async fn stop_all(&mut self, grace: Duration) {
        let pids: Vec<Pid> = self.running.values().map(|p| Pid::from_raw(p.pid as i32)).collect();
        self.running.clear();
        for pid in &pids {
            let _ = kill(*pid, Signal::SIGCONT);
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && pids.iter().any(|pid| kill(*pid, None).is_ok()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// Every running process: role and pid.
    pub fn processes(&self) -> impl Iterator<Item = (&Role, u32)> {
        self.running.iter().map(|(role, p)| (role, p.pid))
    }
}
