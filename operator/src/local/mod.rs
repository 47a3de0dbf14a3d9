//! Local mode (`tandem up`): the Replication Manager with replicas as processes on this
//! machine. The RM runs here; the GFD, the replicas and their LFDs are child processes
//! on loopback ports. This adapter only observes (process exits, the GFD's membership,
//! the replicas' status) and carries out what `rm::reconcile` decides; it restarts the
//! GFD and LFDs whenever they exit.

mod manager;
mod supervisor;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tandem_replica::detector::service::unix_ms;
use tandem_replica::pb::{self, MembershipChange};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::membership::{self, MembershipUpdate, MembershipView, alive_members, describe_change};
use crate::rm::{self, Action, Facts, Instance, Observed, Record, Spec};
pub use manager::ManagerService;
use supervisor::{Exit, Role, Supervisor};

/// How often the RM reconciles when nothing happens.
const TICK: Duration = Duration::from_millis(50);
/// How often replicas' status is polled, and the timeout of one poll.
const POLL: Duration = Duration::from_millis(100);
const POLL_TIMEOUT: Duration = Duration::from_millis(250);
/// A replica behind the current epoch gets the configuration again this often.
const REPUSH: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub spec: Spec,
    /// GFD on `base_port`, the RM's API on `base_port + 1`, replica rN on `base_port + 10 + N`.
    pub base_port: u16,
    /// State and logs: `up.json`, `endpoints`, `logs/`.
    pub dir: PathBuf,
    /// The `tandem` executable the children run.
    pub binary: PathBuf,
    /// Log filter of the children.
    pub log_level: String,
}

impl LocalSettings {
    pub fn gfd_address(&self) -> String {
        format!("127.0.0.1:{}", self.base_port)
    }

    pub fn manager_address(&self) -> String {
        format!("127.0.0.1:{}", self.base_port + 1)
    }

    pub fn replica_address(&self, id: &str) -> String {
        let n: u16 = id.trim_start_matches('r').parse().unwrap_or(0);
        format!("127.0.0.1:{}", self.base_port + 10 + n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot use the state directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("cannot listen on {address} for the RM's API: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("another `tandem up` seems to run with state in {0} (its API answers); stop it or use --dir")]
    AlreadyRunning(PathBuf),
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
}

/// What `tandem status`, `set` and `chaos` read to find a running local system.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub manager: String,
    pub gfd: String,
    pub gfd_pid: Option<u32>,
    pub replicas: BTreeMap<String, ReplicaEntry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaEntry {
    pub address: String,
    pub pid: Option<u32>,
    pub lfd_pid: Option<u32>,
}

impl StateFile {
    pub fn path(dir: &std::path::Path) -> PathBuf {
        dir.join("up.json")
    }

    pub fn read(dir: &std::path::Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(Self::path(dir)).ok()?).ok()
    }
}

/// One line of `tandem up`'s output (the course-style trace), already formatted.
pub type Output = mpsc::UnboundedSender<String>;

fn say(output: &Output, line: impl AsRef<str>) {
    let now = chrono_like_now();
    let _ = output.send(format!("{now}  {}", line.as_ref()));
}

/// `HH:MM:SS.mmm` (UTC), without a date-time dependency.
fn chrono_like_now() -> String {
    let ms = unix_ms();
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("{:02}:{:02}:{:02}.{ms:03}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// What the RM shares with its API (Describe) and takes from it (UpdateSpec).
#[derive(Debug, Default)]
pub struct Shared {
    pub spec: Spec,
    pub record: Record,
    pub observed: Vec<Observed>,
    pub heartbeats: BTreeMap<String, u64>,
    pub checkpoint_seqs: BTreeMap<String, u64>,
    pub restarts: BTreeMap<String, u32>,
    pub membership_known: bool,
    pub gfd_address: String,
}

/// Runs the whole local system until `shutdown`, then stops every child.
pub async fn run(
    settings: LocalSettings,
    output: Output,
    shutdown: CancellationToken,
) -> Result<(), LocalError> {
    let log_dir = settings.dir.join("logs");
    std::fs::create_dir_all(&log_dir)
        .map_err(|source| LocalError::Dir { dir: settings.dir.clone(), source })?;
    if let Some(previous) = StateFile::read(&settings.dir) {
        if manager::answers(&previous.manager).await {
            return Err(LocalError::AlreadyRunning(settings.dir.clone()));
        }
        stop_orphans(&previous, &output);
    }
    let listener = tokio::net::TcpListener::bind(settings.manager_address())
        .await
        .map_err(|source| LocalError::Bind { address: settings.manager_address(), source })?;

    let (spec_updates, spec_changes) = watch::channel(settings.spec.clone());
    let shared = Arc::new(Mutex::new(Shared {
        spec: settings.spec.clone(),
        gfd_address: settings.gfd_address(),
        ..Shared::default()
    }));
    tokio::spawn(manager::serve(listener, Arc::clone(&shared), spec_updates, shutdown.clone()));

    let (supervisor, exits) = Supervisor::new(settings.binary.clone(), log_dir);
    let (membership_sender, membership) = mpsc::unbounded_channel();
    tokio::spawn(membership::follow(settings.gfd_address(), membership_sender, shutdown.clone()));
    let facts = Arc::new(Mutex::new(BTreeMap::new()));
    let poll_targets = watch::Sender::new(BTreeMap::new());
    tokio::spawn(poll_statuses(poll_targets.subscribe(), Arc::clone(&facts), shutdown.clone()));

    let mut local = Local {
        spec: settings.spec.clone(),
        settings,
        record: Record::default(),
        supervisor,
        membership: MembershipView::default(),
        facts,
        poll_targets,
        last_push: BTreeMap::new(),
        restarted_at: BTreeMap::new(),
        restarts: BTreeMap::new(),
        output,
        last_warning: None,
        shared,
        state_file: StateFile::default(),
        channels: BTreeMap::new(),
    };
    local.start_gfd()?;
    say(
        &local.output,
        format!(
            "RM: managing {} {} replicas; GFD at {}, RM API at {}",
            local.spec.replicas,
            rm::mode_name(local.spec.mode),
            local.settings.gfd_address(),
            local.settings.manager_address()
        ),
    );
    local.run(exits, membership, spec_changes, shutdown).await;
    local.supervisor.stop_all(Duration::from_secs(2)).await;
    let _ = std::fs::remove_file(StateFile::path(&local.settings.dir));
    let _ = std::fs::remove_file(local.settings.dir.join("endpoints"));
    say(&local.output, "RM: stopped every replica, LFD and the GFD");
    Ok(())
}

/// Kills what a previous `tandem up` that died without cleaning up (kill -9) left
/// running, so its ports are free again. Only processes that still run `tandem`.
fn stop_orphans(previous: &StateFile, output: &Output) {
    let pids =
        previous.replicas.values().flat_map(|r| [r.pid, r.lfd_pid]).chain([previous.gfd_pid]).flatten();
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("tandem") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            say(output, format!("RM: stopped pid {pid}, left running by a previous tandem up"));
        }
    }
}

/// Polls each replica's Status, so the RM knows epochs, logs and sync points.
async fn poll_statuses(
    mut targets: watch::Receiver<BTreeMap<String, String>>,
    facts: Arc<Mutex<BTreeMap<String, pb::ReplicaStatus>>>,
    shutdown: CancellationToken,
) {
    let mut channels: BTreeMap<String, Channel> = BTreeMap::new();
    loop {
        let current = targets.borrow_and_update().clone();
        let calls = current.iter().filter_map(|(id, address)| {
            let channel = match channels.get(address) {
                Some(channel) => channel.clone(),
                None => {
                    let channel = Endpoint::from_shared(format!("http://{address}"))
                        .ok()?
                        .connect_timeout(POLL_TIMEOUT)
                        .connect_lazy();
                    channels.insert(address.clone(), channel.clone());
                    channel
                }
            };
            let id = id.clone();
            Some(async move {
                let mut client = pb::replica_client::ReplicaClient::new(channel);
                let answer = tokio::time::timeout(POLL_TIMEOUT, client.status(pb::StatusRequest {})).await;
                (id, answer.ok().and_then(Result::ok).map(tonic::Response::into_inner))
            })
        });
        let answers = join_all(calls).await;
        {
            let mut facts = facts.lock().unwrap_or_else(|p| p.into_inner());
            facts.retain(|id, _| current.contains_key(id));
            for (id, status) in answers {
                if let Some(status) = status {
                    facts.insert(id, status);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

struct Local {
    settings: LocalSettings,
    spec: Spec,
    record: Record,
    supervisor: Supervisor,
    membership: MembershipView,
    facts: Arc<Mutex<BTreeMap<String, pb::ReplicaStatus>>>,
    poll_targets: watch::Sender<BTreeMap<String, String>>,
    last_push: BTreeMap<String, Instant>,
    restarted_at: BTreeMap<String, Instant>,
    restarts: BTreeMap<String, u32>,
    output: Output,
    last_warning: Option<String>,
    shared: Arc<Mutex<Shared>>,
    state_file: StateFile,
    channels: BTreeMap<String, Channel>,
}

impl Local {
    async fn run(
        &mut self,
        mut exits: mpsc::UnboundedReceiver<Exit>,
        mut membership: mpsc::UnboundedReceiver<MembershipUpdate>,
        mut spec_changes: watch::Receiver<Spec>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(exit) = exits.recv() => self.on_exit(exit),
                Some(update) = membership.recv() => self.on_membership(update),
                Ok(()) = spec_changes.changed() => {
                    let spec = spec_changes.borrow_and_update().clone();
                    self.on_spec(spec).await;
                }
                () = shutdown.cancelled() => return,
            }
            self.reconcile();
        }
    }

    fn start_gfd(&mut self) -> Result<(), LocalError> {
        let args = vec![
            "gfd".into(),
            "--listen".into(),
            self.settings.gfd_address(),
            "--heartbeat-interval-ms".into(),
            self.spec.heartbeat_interval_ms.to_string(),
            "--failure-threshold".into(),
            self.spec.failure_threshold.to_string(),
            "--log-level".into(),
            self.settings.log_level.clone(),
        ];
        self.supervisor
            .start(Role::Gfd, &args)
            .map_err(|source| LocalError::Spawn { what: "the GFD".into(), source })?;
        Ok(())
    }

    fn start_lfd(&mut self, id: &str) {
        let args = vec![
            "lfd".into(),
            "--replica-id".into(),
            id.into(),
            "--replica".into(),
            self.settings.replica_address(id),
            "--gfd".into(),
            self.settings.gfd_address(),
            "--heartbeat-interval-ms".into(),
            self.spec.heartbeat_interval_ms.to_string(),
            "--failure-threshold".into(),
            self.spec.failure_threshold.to_string(),
            "--log-level".into(),
            self.settings.log_level.clone(),
        ];
        if let Err(error) = self.supervisor.start(Role::Lfd(id.into()), &args) {
            say(&self.output, format!("RM: cannot start the LFD of {id}: {error}"));
        }
    }

    fn start_replica(&mut self, id: &str, bootstrap: bool) {
        let peers: Vec<String> = self
            .instance_ids()
            .into_iter()
            .filter(|other| other != id)
            .map(|other| self.settings.replica_address(&other))
            .collect();
        let mut args = vec![
            "replica".into(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            self.settings.replica_address(id),
            "--checkpoint-interval-ms".into(),
            self.spec.checkpoint_interval_ms.to_string(),
            "--log-level".into(),
            self.settings.log_level.clone(),
        ];
        if !peers.is_empty() {
            args.push("--peers".into());
            args.push(peers.join(","));
        }
        if bootstrap {
            args.push("--bootstrap".into());
        }
        if let Err(error) = self.supervisor.start(Role::Replica(id.into()), &args) {
            say(&self.output, format!("RM: cannot start {id}: {error}"));
            return;
        }
        if !self.supervisor.is_running(&Role::Lfd(id.into())) {
            self.start_lfd(id);
        }
    }

    /// Every replica id the RM knows of (running or not).
    fn instance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state_file.replicas.keys().cloned().collect();
        if let Some(config) = &self.record.config {
            ids.extend(config.members.iter().map(|m| m.id.clone()));
        }
        ids.sort();
        ids.dedup();
        ids
    }

    fn on_exit(&mut self, exit: Exit) {
        if !self.supervisor.exited(&exit) {
            return;
        }
        match &exit.role {
            Role::Gfd => {
                say(&self.output, format!("RM: the GFD exited ({}); restarting it", exit.status));
                if let Err(error) = self.start_gfd() {
                    say(&self.output, format!("RM: {error}"));
                }
            }
            Role::Lfd(id) => {
                say(&self.output, format!("RM: the LFD of {id} exited ({}); restarting it", exit.status));
                let id = id.clone();
                if self.supervisor.is_running(&Role::Replica(id.clone())) {
                    self.start_lfd(&id);
                }
            }
            Role::Replica(id) => say(&self.output, format!("RM: replica {id} exited ({})", exit.status)),
        }
    }

    fn on_membership(&mut self, update: MembershipUpdate) {
        let was_known = self.membership.known();
        let lost = match &update {
            MembershipUpdate::Lost(reason) => Some(reason.clone()),
            MembershipUpdate::Event(_) => None,
        };
        let event = self.membership.apply(update);
        if let (Some(reason), true) = (lost, was_known) {
            say(
                &self.output,
                format!(
                    "RM: lost the GFD's membership stream ({reason}); ignoring membership until it is back"
                ),
            );
        }
        let Some(event) = event else { return };
        let change = event.change();
        if change != MembershipChange::Snapshot {
            say(
                &self.output,
                format!("GFD: {} {} ({})", event.replica_id, describe_change(change), event.reason),
            );
            let alive = alive_members(&event);
            say(&self.output, format!("GFD: {} members: {}", alive.len(), alive.join(", ")));
        }
        if change == MembershipChange::Ready
            && let Some(started) = self.restarted_at.remove(&event.replica_id)
        {
            let elapsed = started.elapsed().as_millis();
            say(
                &self.output,
                format!("RM: {} recovered: ready {elapsed} ms after its restart", event.replica_id),
            );
        }
        if self.membership.known() && !was_known {
            say(&self.output, "RM: following the GFD's membership");
        }
    }

    async fn on_spec(&mut self, spec: Spec) {
        let old = std::mem::replace(&mut self.spec, spec.clone());
        say(
            &self.output,
            format!(
                "RM: spec now replicas={} mode={} heartbeat_interval={} ms failure_threshold={} checkpoint_interval={} ms",
                spec.replicas,
                rm::mode_name(spec.mode),
                spec.heartbeat_interval_ms,
                spec.failure_threshold,
                spec.checkpoint_interval_ms
            ),
        );
        if (old.heartbeat_interval_ms, old.failure_threshold)
            != (spec.heartbeat_interval_ms, spec.failure_threshold)
        {
            let settings = pb::DetectorSettings {
                heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
                failure_threshold: Some(spec.failure_threshold),
                gfd_heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
                replica_prefix: String::new(),
            };
            let channel = self.channel(&self.settings.gfd_address());
            let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(channel);
            if let Err(status) =
                tokio::time::timeout(POLL_TIMEOUT * 4, gfd.update_detector_settings(settings))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("timed out")))
            {
                say(
                    &self.output,
                    format!("RM: could not change the detector settings: {}", status.message()),
                );
            }
        }
        if old.checkpoint_interval_ms != spec.checkpoint_interval_ms {
            let update =
                pb::Settings { checkpoint_interval_ms: Some(spec.checkpoint_interval_ms), gfd_address: None };
            let calls: Vec<_> =
                self.running_replicas()
                    .into_iter()
                    .map(|id| {
                        let mut control = pb::control_client::ControlClient::new(
                            self.channel(&self.settings.replica_address(&id)),
                        );
                        let update = update.clone();
                        async move {
                            tokio::time::timeout(POLL_TIMEOUT * 4, control.update_settings(update)).await
                        }
                    })
                    .collect();
            join_all(calls).await;
        }
    }

    fn channel(&mut self, address: &str) -> Channel {
        self.channels
            .entry(address.to_owned())
            .or_insert_with(|| {
                Endpoint::from_shared(format!("http://{address}"))
                    .expect("loopback addresses are valid URIs")
                    .connect_timeout(POLL_TIMEOUT)
                    .connect_lazy()
            })
            .clone()
    }

    fn running_replicas(&self) -> Vec<String> {
        self.supervisor
            .processes()
            .filter_map(|(role, _)| if let Role::Replica(id) = role { Some(id.clone()) } else { None })
            .collect()
    }

    fn observe(&self) -> Vec<Observed> {
        let facts = self.facts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.instance_ids()
            .into_iter()
            .map(|id| {
                let running = self.supervisor.is_running(&Role::Replica(id.clone()));
                Observed {
                    address: self.settings.replica_address(&id),
                    instance: if running { Instance::Running } else { Instance::Gone },
                    liveness: self.membership.liveness(&id),
                    facts: facts.get(&id).map(|s| Facts {
                        epoch: s.configuration.as_ref().map_or(0, |c| c.epoch),
                        last_seq: s.last_seq,
                        synced_epoch: s.synced_epoch,
                    }),
                    id,
                }
            })
            .collect()
    }

    /// Observe, decide, act.
    fn reconcile(&mut self) {
        let observed = self.observe();
        let actions =
            rm::reconcile(&self.spec, &mut self.record, &observed, self.membership.known(), unix_ms());
        for action in actions {
            self.act(action);
        }
        self.push_configuration();
        self.publish(observed);
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Install { config, reason } => {
                let members: Vec<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
                say(
                    &self.output,
                    format!(
                        "RM: epoch {} ({}): primary {}, members {} — {reason}",
                        config.epoch,
                        rm::mode_name(config.mode()),
                        config.primary,
                        members.join(", ")
                    ),
                );
                self.last_push.clear();
                self.push_configuration();
            }
            Action::Start { id, bootstrap, attempt } => {
                if attempt > 0 {
                    say(
                        &self.output,
                        format!(
                            "RM: restarting {id} (attempt {attempt}); it will rejoin through a checkpoint"
                        ),
                    );
                    self.restarted_at.insert(id.clone(), Instant::now());
                    *self.restarts.entry(id.clone()).or_default() += 1;
                } else {
                    say(&self.output, format!("RM: starting {id} at {}", self.settings.replica_address(&id)));
                }
                self.membership.forget(&id);
                self.state_file.replicas.entry(id.clone()).or_default();
                self.start_replica(&id, bootstrap);
            }
            Action::Stop { id, reason } => {
                say(&self.output, format!("RM: stopping {id}: {reason}"));
                self.supervisor.stop(&Role::Replica(id.clone()), Duration::from_secs(2));
                self.supervisor.stop(&Role::Lfd(id.clone()), Duration::from_secs(2));
                self.state_file.replicas.remove(&id);
            }
            Action::Warn(warning) => {
                if self.last_warning.as_ref() != Some(&warning) {
                    say(&self.output, format!("RM: WARNING: {warning}"));
                    self.last_warning = Some(warning);
                }
            }
        }
    }

    /// Gives the current configuration to every running replica that lacks it.
    fn push_configuration(&mut self) {
        let Some(config) = self.record.config.clone() else { return };
        let facts = self.facts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for id in self.running_replicas() {
            let behind = facts
                .get(&id)
                .is_none_or(|s| s.configuration.as_ref().is_none_or(|c| c.epoch < config.epoch));
            let recently = self.last_push.get(&id).is_some_and(|at| at.elapsed() < REPUSH);
            if !behind || recently {
                continue;
            }
            self.last_push.insert(id.clone(), Instant::now());
            let mut control =
                pb::control_client::ControlClient::new(self.channel(&self.settings.replica_address(&id)));
            let config = config.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(POLL_TIMEOUT * 4, control.install_configuration(config)).await;
            });
        }
    }

    /// Shares the picture with the API, the status poller and the state files.
    fn publish(&mut self, observed: Vec<Observed>) {
        let targets: BTreeMap<String, String> = self
            .running_replicas()
            .into_iter()
            .map(|id| (id.clone(), self.settings.replica_address(&id)))
            .collect();
        self.poll_targets.send_if_modified(|current| std::mem::replace(current, targets.clone()) != *current);
        let checkpoint_seqs = self
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, s)| (id.clone(), s.checkpoint_seq))
            .collect();
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.spec = self.spec.clone();
            shared.record = self.record.clone();
            shared.observed = observed;
            shared.heartbeats = self.membership.heartbeats().clone();
            shared.checkpoint_seqs = checkpoint_seqs;
            shared.restarts = self.restarts.clone();
            shared.membership_known = self.membership.known();
        }
        let mut state = StateFile {
            manager: self.settings.manager_address(),
            gfd: self.settings.gfd_address(),
            gfd_pid: self.supervisor.pid(&Role::Gfd),
            replicas: self.state_file.replicas.clone(),
        };
        for (id, entry) in &mut state.replicas {
            *entry = ReplicaEntry {
                address: self.settings.replica_address(id),
                pid: self.supervisor.pid(&Role::Replica(id.clone())),
                lfd_pid: self.supervisor.pid(&Role::Lfd(id.clone())),
            };
        }
        if state.replicas != self.state_file.replicas
            || state.gfd_pid != self.state_file.gfd_pid
            || self.state_file.manager.is_empty()
        {
            let dir = &self.settings.dir;
            if let Ok(json) = serde_json::to_string_pretty(&state) {
                let _ = std::fs::write(StateFile::path(dir), json);
            }
            let endpoints: Vec<&str> = state.replicas.values().map(|r| r.address.as_str()).collect();
            let _ = std::fs::write(dir.join("endpoints"), endpoints.join(","));
            self.state_file = state;
        }
    }
}
