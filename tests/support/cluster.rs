//! A group of real `tandem replica` processes on loopback ports, driven the way the RM
//! drives one: start, kill -9, restart, install configurations. Logs go to one file per
//! replica; a failing test prints their tails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_replica::pb::{self, Mode};
use tokio::time::{Instant, sleep};
use tonic::transport::Channel;

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// A free loopback port for a replica's clients whose internal port (+10000) is free
/// too.
pub fn free_port() -> u16 {
    super::spare_ports(1)
}

pub struct Replica {
    pub id: String,
    pub address: String,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Replica {
    pub fn new(id: &str, address: String) -> Self {
        Self { id: id.into(), address, child: None, log: PathBuf::new(), starts: 0 }
    }
}

pub struct Group {
    pub replicas: BTreeMap<String, Replica>,
    pub config: pb::Configuration,
    dir: tempfile::TempDir,
    /// Extra flags for every replica started from now on.
    pub replica_args: Vec<String>,
}

pub fn channel(address: &str) -> Channel {
    tandem_replica::wire::dial(address, None).expect("a valid address")
}

/// A channel to the internal port of the replica whose client address is `address`
/// (plaintext: these replicas run without --tls-dir).
pub fn internal_channel(address: &str) -> Channel {
    let internal = tandem_replica::wire::internal_address(address).expect("a valid address");
    tandem_replica::wire::dial(&internal, None).expect("a valid address")
}

pub fn replica_client(address: &str) -> pb::replica_client::ReplicaClient<Channel> {
    pb::replica_client::ReplicaClient::new(channel(address))
}

impl Group {
    /// Starts `n` bootstrapping replicas r1..rn, installs epoch 1 (primary r1) and waits
    /// until all are ready.
    pub async fn start(n: usize, mode: Mode) -> Self {
        Self::start_with(n, mode, &[]).await
    }

    pub async fn start_with(n: usize, mode: Mode, replica_args: &[&str]) -> Self {
        let mut group = Self {
            replicas: BTreeMap::new(),
            config: pb::Configuration::default(),
            dir: tempfile::tempdir().expect("a temp dir"),
            replica_args: replica_args.iter().map(|s| s.to_string()).collect(),
        };
        let ids: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
        for id in &ids {
            let address = format!("127.0.0.1:{}", free_port());
            group.replicas.insert(id.clone(), Replica::new(id, address));
            group.spawn(id, true);
        }
        let members: Vec<&str> = ids.iter().map(String::as_str).collect();
        group.config =
            pb::Configuration { epoch: 0, mode: mode.into(), primary: String::new(), members: Vec::new() };
        group.reconfigure("r1", &members).await;
        for id in &ids {
            group.wait_ready(id, Duration::from_secs(10)).await;
        }
        group
    }

    pub fn address(&self, id: &str) -> String {
        self.replicas[id].address.clone()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.replicas.values().map(|r| r.address.clone()).collect()
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts (or restarts) replica `id` on its address, with the others as seeds.
    /// `bootstrap`: a new group.
    pub fn spawn(&mut self, id: &str, bootstrap: bool) {
        let others: Vec<String> =
            self.replicas.values().filter(|r| r.id != id).map(|r| r.address.clone()).collect();
        self.spawn_with_seeds(id, bootstrap, &others);
    }

    /// Starts replica `id` knowing no other replica: it waits for a configuration.
    pub fn spawn_unconfigured(&mut self, id: &str) {
        self.spawn_with_seeds(id, false, &[]);
    }

    fn spawn_with_seeds(&mut self, id: &str, bootstrap: bool, seeds: &[String]) {
        let extra = self.replica_args.clone();
        let replica = self.replicas.get_mut(id).expect("known replica");
        replica.starts += 1;
        replica.log = self.dir.path().join(format!("{id}.{}.log", replica.starts));
        let log = std::fs::File::create(&replica.log).expect("log file");
        let mut command = Command::new(TANDEM);
        command
            .args([
                "replica",
                "--id",
                id,
                "--listen",
                &replica.address,
                "--log-level",
                "info,tandem_replica=debug",
            ])
            .args(["--peers", &seeds.join(",")])
            // These groups are about replication: a restarted replica starts empty and
            // rejoins (durability has its own tests, tests/durability.rs).
            .args(["--durability", "memory"])
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if bootstrap {
            command.arg("--bootstrap");
        }
        replica.child = Some(command.spawn().expect("start tandem replica"));
    }

    /// kill -9, and reap the process.
    pub fn kill(&mut self, id: &str) {
        let replica = self.replicas.get_mut(id).expect("known replica");
        if let Some(mut child) = replica.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    pub fn pid(&self, id: &str) -> u32 {
        self.replicas[id].child.as_ref().expect("running").id()
    }

    /// Installs the next configuration (epoch + 1) with `primary` and `members`, on
    /// every running replica (members and not). Fails the test if a member refuses.
    pub async fn reconfigure(&mut self, primary: &str, members: &[&str]) -> pb::Configuration {
        let config = pb::Configuration {
            epoch: self.config.epoch + 1,
            mode: self.config.mode,
            primary: primary.into(),
            members: members
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: self.address(id) })
                .collect(),
        };
        self.install(&config, &self.running()).await;
        self.config = config.clone();
        config
    }

    /// Pushes `config` to the replicas `ids`; panics if one refuses it. A replica that
    /// is still starting (connection refused) is retried for a few seconds.
    pub async fn install(&self, config: &pb::Configuration, ids: &[String]) {
        for id in ids {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut control = pb::control_client::ControlClient::new(internal_channel(&self.address(id)));
                let answer = tokio::time::timeout(
                    Duration::from_secs(5),
                    control.install_configuration(config.clone()),
                )
                .await;
                match answer {
                    Ok(Ok(_)) => break,
                    Ok(Err(status))
                        if status.code() == tonic::Code::Unavailable && Instant::now() < deadline =>
                    {
                        sleep(Duration::from_millis(20)).await;
                    }
                    Ok(Err(status)) => panic!("{id} refused epoch {}: {}", config.epoch, status.message()),
                    Err(_) => panic!("{id} did not answer InstallConfiguration"),
                }
            }
        }
    }

    pub fn running(&self) -> Vec<String> {
        self.replicas.values().filter(|r| r.child.is_some()).map(|r| r.id.clone()).collect()
    }

    pub async fn status(&self, id: &str) -> Option<pb::ReplicaStatus> {
        let mut client = replica_client(&self.address(id));
        let answer = tokio::time::timeout(Duration::from_secs(2), client.status(pb::StatusRequest {})).await;
        answer.ok()?.ok().map(tonic::Response::into_inner)
    }

    pub async fn wait_ready(&self, id: &str, limit: Duration) -> pb::ReplicaStatus {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(id).await;
            if let Some(status) = status.as_ref().filter(|s| s.ready) {
                return status.clone();
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("{id} not ready within {limit:?}: {status:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Among `candidates`, the replica with the longest log: the one the RM promotes.
    pub async fn longest_log(&self, candidates: &[&str]) -> String {
        let mut best = (0, String::new());
        for id in candidates {
            if let Some(status) = self.status(id).await
                && (best.1.is_empty() || status.last_seq > best.0)
            {
                best = (status.last_seq, (*id).to_owned());
            }
        }
        assert!(!best.1.is_empty(), "none of {candidates:?} answered");
        best.1
    }

    pub async fn digest(&self, id: &str) -> Option<pb::DigestReply> {
        digest_of(&self.address(id), &tandem_replica::wire::Channels::default()).await
    }

    /// Waits until every replica in `ids` reports the same digest at the same sequence
    /// number, and returns it; panics with every replica's answer otherwise.
    pub async fn wait_converged(&self, ids: &[&str], limit: Duration) -> pb::DigestReply {
        let addresses: Vec<String> = ids.iter().map(|id| self.address(id)).collect();
        match wait_converged(&addresses.into(), limit).await {
            Ok(digest) => digest,
            Err(digests) => {
                self.dump_logs();
                panic!("replicas {ids:?} did not converge within {limit:?}: {digests:#?}");
            }
        }
    }

    /// Prints the tail of every replica's logs (for a failing test).
    pub fn dump_logs(&self) {
        for replica in self.replicas.values() {
            for start in 1..=replica.starts {
                let path = self.dir.path().join(format!("{}.{start}.log", replica.id));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "===== {} (start {start}), last {} lines =====\n{}",
                    replica.id,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
    }
}

pub use tandem_check::verdict::{digest_of, wait_converged};

impl Drop for Group {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let ids: Vec<String> = self.replicas.keys().cloned().collect();
        for id in ids {
            self.kill(&id);
        }
    }
}
