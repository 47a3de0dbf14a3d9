//! A `tandem up` child process for the benches that need the RM in a process of its
//! own (kill -9 of every process, the CPU and memory of each component): started in a
//! directory, waited for until the group is whole, stopped with SIGTERM as a user's
//! Ctrl-C would, and killed with everything it started if the bench fails half-way.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use tandem_operator::local::{ProcessId, StateFile};
use tandem_replica::pb::{self, Mode};
use tandem_replica::storage::Durability;
use tandem_replica::wire::{dial, within};
use tokio::time::Instant;

use super::resources::{Component, Role};
use super::{wait_for_state, wait_until_healthy};

/// What `tandem up` is asked to run.
#[derive(Debug, Clone, Copy)]
pub struct UpOptions {
    pub replicas: u32,
    pub port: u16,
    pub mode: Mode,
    pub durability: Durability,
}

impl UpOptions {
    /// The replicas' client addresses: `tandem up` derives them from the port.
    pub fn endpoints(&self) -> Vec<String> {
        (1..=self.replicas).map(|n| format!("127.0.0.1:{}", self.port + 10 + n as u16)).collect()
    }

    /// Every address the group listens on: the GFD, the RM's API, each replica's client
    /// and internal port.
    pub fn addresses(&self) -> Vec<String> {
        let internal = tandem_replica::wire::INTERNAL_PORT_OFFSET;
        let port = self.port;
        let replicas = (1..=self.replicas as u16).flat_map(|n| [port + 10 + n, port + 10 + n + internal]);
        [port, port + 1].into_iter().chain(replicas).map(|p| format!("127.0.0.1:{p}")).collect()
    }
}

/// A `tandem up` child process: the RM, and through it the GFD, replicas and LFDs.
pub struct Up {
    pub child: tokio::process::Child,
    pub dir: PathBuf,
    pub endpoints: Vec<String>,
    /// Whether its processes may still run (killed on drop if so).
    running: bool,
}

impl Up {
    /// Starts a new group in `dir` (keeping only its CA) and waits until it is whole.
    pub async fn start(dir: &Path, options: UpOptions) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name() != "tls" {
                let path = entry.path();
                let removed =
                    if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        let mut up = Self::spawn(dir, options)?;
        tokio::select! {
            whole = async {
                wait_for_state(dir).await?;
                wait_until_healthy(dir, options.replicas, Duration::from_secs(60)).await
            } => whole.context("the group never became whole")?,
            exit = up.child.wait() => anyhow::bail!("{}", up.exited(exit)),
        }
        Ok(up)
    }

    /// `tandem up` on `dir` as it is (a restart recovers what it holds); returns at once,
    /// not waiting for the group.
    pub fn spawn(dir: &Path, options: UpOptions) -> anyhow::Result<Self> {
        let out = dir.join("up.out");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .with_context(|| format!("cannot open {}", out.display()))?;
        let child = tokio::process::Command::new(std::env::current_exe().context("cannot find tandem")?)
            .arg("up")
            .args(["--replicas", &options.replicas.to_string(), "--port", &options.port.to_string()])
            .args(["--mode", &options.mode.to_string(), "--durability", options.durability.as_str()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tandem up")?;
        Ok(Self { child, dir: dir.to_owned(), endpoints: options.endpoints(), running: true })
    }

    /// Why `tandem up` is gone: its exit and the last line it wrote.
    pub fn exited(&self, exit: std::io::Result<std::process::ExitStatus>) -> String {
        let output = std::fs::read_to_string(self.dir.join("up.out")).unwrap_or_default();
        let last = output.lines().last().unwrap_or_default();
        format!("tandem up exited ({exit:?}): {last} (its log: {})", self.dir.join("up.out").display())
    }

    /// Every process of the group now: `tandem up` (the RM), the GFD, each replica and
    /// its LFD.
    pub fn components(&self) -> Vec<Component> {
        let state = StateFile::read(&self.dir).unwrap_or_default();
        let mut components: Vec<Component> =
            self.child.id().map(|pid| Component::new("up", Role::Rm, pid)).into_iter().collect();
        components.extend(state.gfd_process().map(|p| Component::new("gfd", Role::Gfd, p.pid)));
        for (id, entry) in &state.replicas {
            components.extend(entry.process().map(|p| Component::new(id.clone(), Role::Replica, p.pid)));
            components
                .extend(entry.lfd_process().map(|p| Component::new(format!("{id}-lfd"), Role::Lfd, p.pid)));
        }
        components
    }

    /// Every replica's Status, by id (those that answer).
    pub async fn statuses(&self) -> Vec<(String, pb::ReplicaStatus)> {
        let mut found = Vec::new();
        for (id, entry) in StateFile::read(&self.dir).unwrap_or_default().replicas {
            let Ok(channel) = dial(&entry.address, None) else { continue };
            let mut replica = pb::replica_client::ReplicaClient::new(channel);
            if let Ok(status) = within(Duration::from_secs(2), replica.status(pb::StatusRequest {})).await {
                found.push((id, status.into_inner()));
            }
        }
        found
    }

    /// Ctrl-C, as a user would: `tandem up` stops every child, then exits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("tandem up did not stop within 30 s")??;
        self.running = false;
        Ok(())
    }

    /// kill -9 of every process at once (a power cut); returns once none of them runs.
    pub async fn kill_everything(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let processes = self.kill_children();
        let deadline = Instant::now() + Duration::from_secs(10);
        while processes.iter().any(|p| p.alive()) {
            anyhow::ensure!(Instant::now() < deadline, "processes survived kill -9");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.running = false;
        Ok(())
    }

    /// SIGKILL to the GFD, every replica and LFD the state file names.
    fn kill_children(&self) -> Vec<ProcessId> {
        let state = StateFile::read(&self.dir).unwrap_or_default();
        let processes: Vec<_> = state
            .replicas
            .values()
            .flat_map(|r| [r.process(), r.lfd_process()])
            .chain([state.gfd_process()])
            .flatten()
            .collect();
        for process in &processes {
            process.signal(Signal::SIGKILL);
        }
        processes
    }
}

impl Drop for Up {
    /// The bench failed half-way: leave nothing running.
    fn drop(&mut self) {
        if self.running {
            let _ = self.child.start_kill();
            self.kill_children();
        }
    }
}
