//! A real `tandem up` (the local system: RM, GFD, replicas, LFDs as processes), started
//! in a temporary directory on free loopback ports, for end-to-end tests of local mode.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_operator::local::StateFile;
use tandem_replica::pb;
use tandem_replica::tls::{Identity, Material};
use tokio::time::{Instant, sleep};
use tonic::transport::Channel;

use super::cluster::TANDEM;

pub struct LocalSystem {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub base_port: u16,
    output: PathBuf,
    /// What `tandem up` was started with (after `up`), to start it again.
    args: Vec<String>,
}

/// A base port whose neighbourhood (GFD, RM API, replicas and their internal ports,
/// +10000) is free right now.
pub fn free_base_port(replicas: u16) -> u16 {
    // tandem up: GFD at base, RM API at base + 1, replica n at base + 10 + n.
    super::spare_ports(10 + replicas + 3)
}

impl LocalSystem {
    /// `tandem up` with `args`, waiting until `replicas` members are ready.
    pub async fn start(replicas: u32, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let base_port = free_base_port(replicas as u16 + 3);
        let output = dir.path().join("up.out");
        let mut up_args: Vec<String> =
            ["--replicas", &replicas.to_string(), "--port", &base_port.to_string(), "--dir"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        up_args.push(dir.path().display().to_string());
        up_args.extend(["--child-log-level".to_owned(), "info,tandem_replica=debug".to_owned()]);
        up_args.extend(args.iter().map(|s| s.to_string()));
        let mut system = Self { child: None, dir, base_port, output, args: up_args };
        system.start_up();
        system.wait_healthy(replicas, Duration::from_secs(30)).await;
        system
    }

    /// Starts `tandem up` (again), appending to its output.
    pub fn start_up(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.output).expect("output file");
        let child = Command::new(TANDEM)
            .arg("up")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tandem up");
        self.child = Some(child);
    }

    /// SIGTERM to `tandem up` (what Ctrl-C does): it stops every process it started, then
    /// itself. Returns once it exited.
    pub async fn stop_up(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM to tandem up");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("tandem up's status").is_none() {
            assert!(Instant::now() < deadline, "tandem up did not stop within 30 s of SIGTERM");
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 `tandem up` alone: the processes it started keep running.
    pub fn kill_up(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill tandem up");
            child.wait().expect("reap tandem up");
        }
    }

    /// kill -9 every process at once: `tandem up`, the GFD, every replica and LFD (a
    /// power cut). Returns once none of them runs.
    pub async fn kill_everything(&mut self) {
        let state = self.state();
        self.kill_up();
        let pids: Vec<u32> = state
            .replicas
            .values()
            .flat_map(|r| [r.pid, r.lfd_pid])
            .chain([state.gfd_pid])
            .flatten()
            .collect();
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        // Signal 0 probes: a killed child of `tandem up` is reaped by init once its
        // parent is gone; until then it is a zombie, which holds no port or file.
        while pids.iter().any(|&pid| alive(pid)) {
            assert!(Instant::now() < deadline, "processes survived kill -9: {pids:?}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where replica `id` keeps its data (`tandem up` gives each id one directory).
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("data").join(id)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn state(&self) -> StateFile {
        StateFile::read(self.dir.path()).expect("tandem up wrote its state file")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.state().replicas.values().map(|r| r.address.clone()).collect()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// A channel to `address` (the RM's API, the GFD) as this group's manager: mutual
    /// TLS with the certificate `tandem up` keeps in DIR/tls/manager.
    pub fn manager_channel(&self, address: &str) -> Channel {
        let dir = self.dir.path().join("tls").join(Identity::Manager.file_name());
        let material = Material::load(&dir).ok();
        tandem_replica::wire::dial_with(material.as_ref(), address, None).expect("a valid address")
    }

    pub async fn describe(&self) -> Option<pb::ServiceDescription> {
        let state = StateFile::read(self.dir.path())?;
        let mut manager = pb::manager_client::ManagerClient::new(self.manager_channel(&state.manager));
        let answer =
            tokio::time::timeout(Duration::from_secs(2), manager.describe(pb::DescribeRequest {})).await;
        answer.ok()?.ok().map(tonic::Response::into_inner)
    }

    /// Waits until the configuration has `replicas` members, each running, alive and
    /// ready, and every running replica is a member; returns what the RM describes.
    pub async fn wait_healthy(&self, replicas: u32, limit: Duration) -> pb::ServiceDescription {
        self.wait_for(limit, "healthy", |d| {
            let members = d.configuration.as_ref().map(|c| c.members.clone()).unwrap_or_default();
            members.len() == replicas as usize
                && members.iter().all(|m| {
                    d.replicas.iter().any(|r| r.replica_id == m.id && r.ready && r.process == "running")
                })
                && d.replicas.iter().filter(|r| r.process == "running").count() == replicas as usize
        })
        .await
    }

    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&pb::ServiceDescription) -> bool,
    ) -> pb::ServiceDescription {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(description) = self.describe().await {
                if done(&description) {
                    return description;
                }
                last = Some(description);
            }
            if Instant::now() > deadline {
                self.dump();
                panic!("local system not {what} within {limit:?}; last description: {last:#?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self, id: &str) -> u32 {
        self.state().replicas[id].pid.expect("replica running")
    }

    pub fn signal_replica(&self, id: &str, signal: Signal) {
        kill(Pid::from_raw(self.pid(id) as i32), signal).expect("signal the replica");
    }

    /// The RM's configuration (asked again for a while: a loaded machine may miss one
    /// answer's deadline).
    pub async fn configuration(&self) -> pb::Configuration {
        self.wait_for(Duration::from_secs(30), "configured", |d| d.configuration.is_some())
            .await
            .configuration
            .expect("a configuration")
    }

    /// Stops the writers and checks the run against the current members: nothing
    /// acknowledged lost, linearizable, equal digests. Panics (with the logs) otherwise.
    pub async fn verify(
        &self,
        recorder: &std::sync::Arc<super::workload::Recorder>,
        stop: tokio_util::sync::CancellationToken,
        writers: tokio::task::JoinSet<()>,
    ) {
        let live: Vec<String> = self.configuration().await.members.into_iter().map(|m| m.address).collect();
        if let Err(failure) = super::verdict::stop_and_verify(&live, recorder, stop, writers).await {
            self.dump();
            panic!("{failure}");
        }
    }

    /// Runs a `tandem` command against this system; returns its stdout.
    pub fn tandem(&self, args: &[&str]) -> String {
        let out =
            Command::new(TANDEM).args(args).arg("--dir").arg(self.dir.path()).output().expect("run tandem");
        assert!(out.status.success(), "tandem {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn dump(&self) {
        eprintln!("===== tandem up output =====\n{}", self.output());
        let logs = self.dir.path().join("logs");
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!(
                "===== {} (last {} lines) =====\n{}",
                entry.path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for LocalSystem {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let leftovers = StateFile::read(self.dir.path()).unwrap_or_default();
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever `tandem up` could not stop (it was killed itself): stop it here.
        let pids =
            leftovers.replicas.values().flat_map(|r| [r.pid, r.lfd_pid]).chain([leftovers.gfd_pid]).flatten();
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Whether `pid` is a live process (not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: Z is a zombie.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
