//! etcd, the system `tandem bench compare` measures Tandem against: a cluster of etcd
//! members (Debian's `etcd-server`, 3.4) as child processes on loopback, each with its
//! own data directory, and a client of it for the load driver. Only what the bench
//! needs: start, find the leader, kill -9 it, restart it, wait until the cluster is
//! whole, put and get one key.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tandem_replica::wire::{dial, within};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::load::Target;
use super::resources::{Component, Role};

/// etcd's v3 API: the few calls the bench makes (cli/bench/etcd.proto).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("etcdserverpb");
}

use proto::kv_client::KvClient;
use proto::maintenance_client::MaintenanceClient;

/// Where Debian's `etcd-server` puts etcd.
pub const DEBIAN_ETCD: &str = "/usr/bin/etcd";

/// Makes sure `binary` exists: installs Debian's `etcd-server` when the default path is
/// missing; returns its version line.
pub async fn ensure_installed(binary: &Path) -> anyhow::Result<String> {
    if !binary.exists() {
        anyhow::ensure!(
            binary == Path::new(DEBIAN_ETCD),
            "no etcd at {}: pass the path of an etcd 3.4 binary with --etcd",
            binary.display()
        );
        eprintln!("compare: {DEBIAN_ETCD} is missing; installing Debian's etcd-server");
        install_etcd_server().await.context(
            "etcd is not installed and installing it failed; install etcd 3.4 yourself (Debian: `apt-get install etcd-server`) or pass --etcd PATH",
        )?;
    }
    let output = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("cannot run {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let version = text.lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(output.status.success() && !version.is_empty(), "{} --version failed", binary.display());
    if !version.contains(" 3.4.") {
        eprintln!("compare: warning: {version}; the comparison was designed against etcd 3.4");
    }
    Ok(version)
}

/// `apt-get install -y etcd-server` (after `apt-get update` if the first try fails),
/// through sudo unless root.
async fn install_etcd_server() -> anyhow::Result<()> {
    let root = nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| {
        let mut command = tokio::process::Command::new(if root { "apt-get" } else { "sudo" });
        if !root {
            command.args(["-n", "apt-get"]);
        }
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive").stdin(Stdio::null());
        command
    };
    let install = ["install", "-y", "-q", "etcd-server"];
    if apt(&install).status().await.context("cannot run apt-get")?.success() {
        return Ok(());
    }
    let updated = apt(&["update", "-q"]).status().await.context("cannot run apt-get update")?;
    anyhow::ensure!(updated.success(), "apt-get update failed ({updated})");
    let installed = apt(&install).status().await.context("cannot run apt-get install")?;
    anyhow::ensure!(installed.success(), "apt-get install etcd-server failed ({installed})");
    Ok(())
}

/// One member: its ports and, while it runs, its process.
struct Member {
    name: String,
    client_port: u16,
    child: Option<tokio::process::Child>,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

/// A cluster of etcd members on loopback: member i serves clients on `port + i` and
/// peers on `port + 10 + i`; its data lives in `<data>/<name>`.
pub struct Etcd {
    binary: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    /// Removed on drop, after the members were killed.
    data: tempfile::TempDir,
}

/// A member's answer slower than this counts as no answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

impl Etcd {
    /// Starts `members` members with their data under a new directory in `parent`
    /// (tmpfs or disk: the caller chooses) and waits until they have a leader.
    pub async fn start(binary: &Path, port: u16, members: u16, parent: &Path) -> anyhow::Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("tandem-bench-etcd-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot make etcd's data directory in {}", parent.display()))?;
        let peer_url = |i: u16| format!("http://127.0.0.1:{}", port + 10 + i);
        let initial_cluster =
            (0..members).map(|i| format!("m{i}={}", peer_url(i))).collect::<Vec<_>>().join(",");
        let members = (0..members)
            .map(|i| Member { name: format!("m{i}"), client_port: port + i, child: None })
            .collect();
        let mut etcd = Self { binary: binary.to_owned(), members, initial_cluster, data };
        for i in 0..etcd.members.len() {
            etcd.spawn(i)?;
        }
        etcd.wait_until_whole(Duration::from_secs(60)).await.context("the etcd cluster never formed")?;
        Ok(etcd)
    }

    /// Starts member `i` (again, on its existing data after a kill).
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", member.client_port + 10);
        let client = format!("http://{}", member.endpoint());
        let log_path = self.data.path().join(format!("{}.log", member.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let child = tokio::process::Command::new(&self.binary)
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.data.path().join(&member.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tandem-bench", "--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Every running member.
    pub fn components(&self) -> Vec<Component> {
        self.members
            .iter()
            .filter_map(|m| {
                Some(Component::new(format!("etcd-{}", m.name), Role::Etcd, m.child.as_ref()?.id()?))
            })
            .collect()
    }

    /// `clients` clients, spread over the members (client c starts at member c mod n).
    pub fn clients(&self, clients: u32) -> anyhow::Result<Vec<EtcdClient>> {
        let endpoints = self.endpoints();
        (0..clients as usize).map(|c| EtcdClient::new(&endpoints, c % endpoints.len())).collect()
    }

    /// Every member's Status, or why not.
    async fn statuses(&self) -> Vec<anyhow::Result<proto::StatusResponse>> {
        let asks = self.members.iter().map(|member| async move {
            let mut maintenance = MaintenanceClient::new(dial(&member.endpoint(), None)?);
            let status = within(STATUS_TIMEOUT, maintenance.status(proto::StatusRequest {}))
                .await
                .with_context(|| format!("etcd member {} ({})", member.name, member.endpoint()))?;
            Ok(status.into_inner())
        });
        futures::future::join_all(asks).await
    }

    /// The index of the leader, as the members report it.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let statuses = self.statuses().await;
        let leader = statuses
            .iter()
            .flatten()
            .map(|s| s.leader)
            .find(|&leader| leader != 0)
            .context("no etcd member knows a leader")?;
        statuses
            .iter()
            .position(|s| s.as_ref().is_ok_and(|s| s.header.as_ref().is_some_and(|h| h.member_id == leader)))
            .with_context(|| format!("the etcd leader {leader:x} did not answer"))
    }

    /// kill -9 of member `i`; returns its name and when the signal was sent, once the
    /// process is gone.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<(String, Instant)> {
        let member = &mut self.members[i];
        let child =
            member.child.as_mut().with_context(|| format!("etcd member {} is not running", member.name))?;
        let killed = Instant::now();
        child.start_kill().with_context(|| format!("cannot kill etcd member {}", member.name))?;
        child.wait().await.with_context(|| format!("etcd member {}", member.name))?;
        member.child = None;
        Ok((member.name.clone(), killed))
    }

    /// Starts again every member not running, then waits until the cluster is whole.
    pub async fn restart_killed(&mut self, limit: Duration) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        self.wait_until_whole(limit).await
    }

    /// Waits until every member answers, all name the same leader, and each has
    /// applied what the leader had when the wait began.
    async fn wait_until_whole(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut caught_up_to = None;
        loop {
            for member in &mut self.members {
                if let Some(child) = &mut member.child
                    && let Some(exit) = child.try_wait()?
                {
                    let log = self.data.path().join(format!("{}.log", member.name));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    anyhow::bail!(
                        "etcd member {} exited ({exit}); is port {} taken? try another --port. Its last lines: {last}",
                        member.name,
                        member.client_port
                    );
                }
            }
            let statuses = self.statuses().await;
            let answered: Vec<&proto::StatusResponse> = statuses.iter().flatten().collect();
            let leader = answered.first().map_or(0, |s| s.leader);
            let target =
                *caught_up_to.get_or_insert(answered.iter().map(|s| s.raft_index).max().unwrap_or(0));
            let whole = answered.len() == self.members.len()
                && leader != 0
                && answered.iter().all(|s| s.leader == leader && s.raft_applied_index >= target);
            if whole {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why: Vec<String> =
                    statuses.iter().filter_map(|s| s.as_ref().err()).map(|e| format!("{e:#}")).collect();
                anyhow::bail!("etcd not whole within {limit:?} (leader {leader:x}; {})", why.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills every member and waits for them, then removes their data.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for member in &mut self.members {
            if let Some(child) = &mut member.child {
                let _ = child.start_kill();
                child.wait().await.with_context(|| format!("etcd member {}", member.name))?;
            }
            member.child = None;
        }
        Ok(())
    }
}

/// A client of an etcd cluster: one member at a time; a request that fails or takes
/// longer than `ATTEMPT_TIMEOUT` is sent again to the next member, until `DEADLINE`
/// (puts of unique keys may be repeated safely).
pub struct EtcdClient {
    kvs: Vec<KvClient<Channel>>,
    current: usize,
}

/// One attempt against one member. Far above etcd's latency under load here (tens of
/// ms), well below its own request timeout (7 s), so that a request forwarded to a dead
/// leader moves on soon after a new one is elected.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);

/// One request, retries included (as Tandem's client's deadline).
const DEADLINE: Duration = Duration::from_secs(15);

/// Between a refusal and the next attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

impl EtcdClient {
    pub fn new(endpoints: &[String], first: usize) -> anyhow::Result<Self> {
        let kvs = endpoints
            .iter()
            .map(|e| Ok(KvClient::new(dial(e, None)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!kvs.is_empty(), "no etcd endpoint");
        Ok(Self { current: first % kvs.len(), kvs })
    }

    async fn call<R, F, Attempt>(&mut self, what: &str, mut call: F) -> anyhow::Result<R>
    where
        F: FnMut(KvClient<Channel>) -> Attempt,
        Attempt: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = match within(ATTEMPT_TIMEOUT, call(self.kvs[self.current].clone())).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd {what}: no answer within {DEADLINE:?}; last: {status}"
            );
            self.current = (self.current + 1) % self.kvs.len();
            if status.code() != tonic::Code::DeadlineExceeded {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

impl Target for EtcdClient {
    async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<()> {
        let request = proto::PutRequest { key: Bytes::from(key), value };
        self.call("put", |mut kv| {
            let request = request.clone();
            async move { kv.put(request).await }
        })
        .await
        .map(drop)
    }

    async fn get(&mut self, key: String) -> anyhow::Result<Option<Bytes>> {
        let request = proto::RangeRequest { key: Bytes::from(key), ..Default::default() };
        let reply = self
            .call("get", |mut kv| {
                let request = request.clone();
                async move { kv.range(request).await }
            })
            .await?;
        Ok(reply.kvs.into_iter().next().map(|kv| kv.value))
    }
}
