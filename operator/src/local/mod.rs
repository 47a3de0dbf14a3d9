//! Local mode (`tandem up`): the Replication Manager with replicas as processes on this
//! machine. The RM runs here; the GFD, the replicas and their LFDs are child processes
//! on loopback ports. This adapter only observes (process exits, the GFD's membership,
//! the replicas' status) and carries out what `rm::reconcile` decides; it restarts the
//! GFD and LFDs whenever they exit.
//!
//! Its own crash is a non-event: the processes outlive it, its record (the
//! configuration, each member's incarnation) is in `rm.json` beside them, written before
//! any replica hears of a new configuration, and a new `tandem up` on the same
//! directory adopts whatever still runs and goes on.

mod manager;
mod state;
mod supervisor;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_replica::detector::gfd;
use tandem_replica::pb::{self, MembershipChange};
use tandem_replica::tls::{self, Authority, Identity, Material};
use tandem_replica::wire::{self, Channels, unix_ms, within};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::membership::{self, MembershipUpdate, MembershipView, alive_members, describe_change};
use crate::replicas::{self, CALL_TIMEOUT};
use crate::rm::{self, Action, Instance, Observed, Record, Spec, Trouble};
pub use manager::ManagerService;
pub use state::{ReplicaEntry, SavedRecord, Security, StateFile};
pub use supervisor::ProcessId;
use supervisor::{Exit, Role, Supervisor};

/// How often the RM reconciles when nothing happens.
const TICK: Duration = Duration::from_millis(50);
/// How often replicas' status is polled, and how old an answer may be to count.
const POLL: Duration = Duration::from_millis(100);
const FRESH: Duration = Duration::from_secs(1);
/// A replica behind the current epoch gets the configuration again this often.
const REPUSH: Duration = Duration::from_millis(300);
/// How long a stopped process gets to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub spec: Spec,
    /// GFD on `base_port`, the RM's API on `base_port + 1`, replica rN on `base_port + 10 + N`.
    pub base_port: u16,
    /// State and logs: `up.json`, `rm.json`, `endpoints`, `logs/`.
    pub dir: PathBuf,
    /// The `tandem` executable the children run.
    pub binary: PathBuf,
    /// Log filter of the children.
    pub log_level: String,
    /// Each replica on its own loopback address (127.0.10.N), its LFD dialling from
    /// 127.0.11.N: links can then be cut one by one with firewall rules (the nemesis).
    pub loopback_per_replica: bool,
    /// Mutual TLS on the internal plane, from a CA kept in `dir/tls` (off: plaintext,
    /// for measuring what TLS costs); TLS and a token (`dir/client-token`) on the client
    /// port.
    pub security: Security,
    /// How long the replicas remember an idle client session, ms (`--session-expiry-ms`).
    pub session_expiry_ms: u64,
}

impl LocalSettings {
    pub fn gfd_address(&self) -> String {
        format!("127.0.0.1:{}", self.base_port)
    }

    pub fn manager_address(&self) -> String {
        format!("127.0.0.1:{}", self.base_port + 1)
    }

    fn replica_number(id: &str) -> u16 {
        rm::id_number(id).and_then(|n| u16::try_from(n).ok()).unwrap_or(0)
    }

    /// The loopback address replica `id` listens on.
    pub fn replica_ip(&self, id: &str) -> IpAddr {
        let n = Self::replica_number(id).min(254) as u8;
        if self.loopback_per_replica { IpAddr::from([127, 0, 10, n]) } else { IpAddr::from([127, 0, 0, 1]) }
    }

    /// The address its LFD dials from, when replicas have addresses of their own.
    pub fn lfd_ip(&self, id: &str) -> Option<IpAddr> {
        let n = Self::replica_number(id).min(254) as u8;
        self.loopback_per_replica.then(|| IpAddr::from([127, 0, 11, n]))
    }

    pub fn replica_address(&self, id: &str) -> String {
        format!("{}:{}", self.replica_ip(id), self.base_port + 10 + Self::replica_number(id))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot use the state directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("cannot listen on {address} for the RM's API: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("another `tandem up` runs with state in {0} (its API answers); stop it, or use another --dir")]
    AlreadyRunning(PathBuf),
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("cannot read {path}: {source} (move it away to start a new group)")]
    BadRecord { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Address(#[from] wire::BadAddress),
    #[error(
        "the group recorded in this directory runs with {recorded}, not {asked}: start `tandem up` with the same {what} to adopt it, or stop it first (Ctrl-C on its `tandem up`, or kill its processes) and remove the directory"
    )]
    Mismatch { what: String, recorded: String, asked: String },
    #[error("TLS material in {dir}: {source}")]
    Tls { dir: PathBuf, source: tandem_replica::tls::TlsError },
    #[error(
        "{address} is in use by a process this tandem up does not know (another system, or one left from an earlier run): stop it, or choose other ports with --port"
    )]
    PortInUse { address: String },
}

/// The tracing target of `tandem up`'s own lines (the course-style trace: membership
/// changes, failovers, restarts). The CLI prints them on stdout, as text or JSON.
pub const EVENTS: &str = "tandem::events";

/// How long a port held at start may take to be released before it counts as taken.
const PORT_RELEASE_PATIENCE: Duration = Duration::from_secs(5);

fn say(line: impl AsRef<str>) {
    tracing::info!(target: EVENTS, "{}", line.as_ref());
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
    /// A switchover asked through the API, until the RM decides it (manager.rs).
    pub switchover: Option<crate::switchover::Ask>,
}

/// Runs the whole local system until `shutdown`, then stops every child.
pub async fn run(settings: LocalSettings, shutdown: CancellationToken) -> Result<(), LocalError> {
    let log_dir = settings.dir.join("logs");
    std::fs::create_dir_all(&log_dir)
        .map_err(|source| LocalError::Dir { dir: settings.dir.clone(), source })?;
    let previous = StateFile::read(&settings.dir);
    // A killed `tandem up` leaves its state file: the group it describes may still run,
    // on its ports and with its security, which a restart must match to adopt it.
    if let Some(previous) = &previous {
        if previous.gfd != settings.gfd_address() {
            return Err(LocalError::Mismatch {
                what: "ports".into(),
                recorded: format!("the GFD at {}", previous.gfd),
                asked: format!("the GFD at {}", settings.gfd_address()),
            });
        }
        if previous.security != settings.security {
            return Err(LocalError::Mismatch {
                what: "security".into(),
                recorded: previous.security.to_string(),
                asked: settings.security.to_string(),
            });
        }
    }
    let authority = if settings.security.tls { Some(open_authority(&settings.dir)?) } else { None };
    if settings.security.client_token {
        client_token(&settings.dir)?;
    }
    if let Some(previous) = &previous
        && manager::answers(&previous.manager).await
    {
        return Err(LocalError::AlreadyRunning(settings.dir.clone()));
    }
    let saved = SavedRecord::read(&settings.dir)?;
    if let Some(saved) = &saved
        && saved.durability != settings.spec.durability.to_string()
    {
        return Err(LocalError::Mismatch {
            what: "--durability".into(),
            recorded: format!("--durability {}", saved.durability),
            asked: format!("--durability {}", settings.spec.durability),
        });
    }
    let listener = tokio::net::TcpListener::bind(settings.manager_address())
        .await
        .map_err(|source| LocalError::Bind { address: settings.manager_address(), source })?;

    let (supervisor, exits) = Supervisor::new(settings.binary.clone(), log_dir);
    let mut local = Local {
        spec: settings.spec.clone(),
        record: Record::default(),
        supervisor,
        membership: MembershipView::default(),
        facts: Arc::default(),
        poll_targets: watch::Sender::new(Vec::new()),
        last_push: BTreeMap::new(),
        restarted_at: BTreeMap::new(),
        restarts: BTreeMap::new(),
        last_trouble: None,
        shared: Arc::new(Mutex::new(Shared { gfd_address: settings.gfd_address(), ..Shared::default() })),
        known: BTreeMap::new(),
        written: StateFile::default(),
        saved: None,
        channels: Channels::replicas_internal(None),
        authority,
        settings,
    };
    local.adopt(previous.unwrap_or_default(), saved).await;
    local.check_ports()?;

    let (spec_updates, spec_changes) = watch::channel(local.spec.clone());
    tokio::spawn(manager::serve(listener, Arc::clone(&local.shared), spec_updates, shutdown.clone()));
    let (membership_sender, membership) = mpsc::unbounded_channel();
    membership::follow(&local.settings.gfd_address(), membership_sender, shutdown.clone()).map_err(
        |error| LocalError::Bind { address: error.address.clone(), source: std::io::Error::other(error) },
    )?;
    tokio::spawn(poll_statuses(local.poll_targets.subscribe(), Arc::clone(&local.facts), shutdown.clone()));

    if !local.supervisor.is_running(&Role::Gfd) {
        local.start_gfd()?;
    }
    say(format!(
        "RM: managing {} {} replicas; GFD at {}, RM API at {}",
        local.spec.replicas,
        local.spec.mode,
        local.settings.gfd_address(),
        local.settings.manager_address()
    ));
    local.run(exits, membership, spec_changes, shutdown).await;
    local.supervisor.stop_all(STOP_GRACE).await;
    if local.spec.durability.on_disk() {
        // The group's record stays, as after a crash: the next `tandem up` on this
        // directory resumes the group from the replicas' disks.
        say(format!(
            "RM: stopped every replica, LFD and the GFD; the data stays in {}: `tandem up` on this \
             directory resumes the group (remove the directory to start a new one)",
            local.settings.dir.join("data").display()
        ));
    } else {
        // In memory, nothing outlives the processes: the next `tandem up` starts anew.
        for file in [
            StateFile::path(&local.settings.dir),
            SavedRecord::path(&local.settings.dir),
            local.settings.dir.join("endpoints"),
        ] {
            let _ = std::fs::remove_file(file);
        }
        say("RM: stopped every replica, LFD and the GFD");
    }
    Ok(())
}

/// The group's client token, in `dir/client-token` (0600), made on the first start.
pub fn client_token(dir: &Path) -> Result<PathBuf, LocalError> {
    let path = dir.join(CLIENT_TOKEN_FILE);
    if !path.exists() {
        let token = tls::new_token();
        tls::write_private(&path, &format!("{token}\n"))
            .map_err(|source| LocalError::Tls { dir: dir.to_owned(), source })?;
    }
    Ok(path)
}

/// Where `tandem up` keeps the group's client token.
pub const CLIENT_TOKEN_FILE: &str = "client-token";

/// The group's CA, kept in `dir/tls` (created on the first start), with this process,
/// the RM, installed as the group's manager.
fn open_authority(dir: &Path) -> Result<Authority, LocalError> {
    let tls_dir = dir.join("tls");
    let error = |source| LocalError::Tls { dir: tls_dir.clone(), source };
    let authority = Authority::load_or_generate(&tls_dir, &dir.display().to_string()).map_err(error)?;
    let manager = authority.issue_into(&tls_dir, &Identity::Manager).map_err(error)?;
    tls::install(Material::load(&manager).map_err(error)?).map_err(error)?;
    Ok(authority)
}

/// Polls each replica's Status, so the RM knows epochs, logs, sync points, incarnations.
async fn poll_statuses(
    mut targets: watch::Receiver<Vec<(String, String)>>,
    facts: Arc<Mutex<Statuses>>,
    shutdown: CancellationToken,
) {
    let channels = Channels::replicas_internal(None);
    loop {
        let current = targets.borrow_and_update().clone();
        let answers = replicas::statuses(&channels, &current).await;
        {
            let mut facts = facts.lock().unwrap_or_else(|p| p.into_inner());
            facts.retain(|id, _| current.iter().any(|(target, _)| target == id));
            let now = Instant::now();
            facts.extend(answers.into_iter().map(|(id, status)| (id, (now, status))));
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Each replica's last Status, and when it came.
type Statuses = BTreeMap<String, (Instant, pb::ReplicaStatus)>;

struct Local {
    settings: LocalSettings,
    spec: Spec,
    record: Record,
    supervisor: Supervisor,
    membership: MembershipView,
    facts: Arc<Mutex<Statuses>>,
    poll_targets: watch::Sender<Vec<(String, String)>>,
    last_push: BTreeMap<String, Instant>,
    restarted_at: BTreeMap<String, Instant>,
    restarts: BTreeMap<String, u32>,
    last_trouble: Option<Trouble>,
    shared: Arc<Mutex<Shared>>,
    /// Every replica id this RM knows of, and its address.
    known: BTreeMap<String, String>,
    /// What `up.json` says now (rewritten, atomically, whenever it would change).
    written: StateFile,
    /// What `rm.json` says now (rewritten, atomically, before a change is acted on).
    saved: Option<SavedRecord>,
    channels: Channels,
    /// The group's CA (None: plaintext internal plane).
    authority: Option<Authority>,
}

impl Local {
    /// Takes over what a previous `tandem up` on this directory left: the processes
    /// that still run, and its record (or, without one, the newest configuration the
    /// running replicas report).
    async fn adopt(&mut self, previous: StateFile, saved: Option<SavedRecord>) {
        let mut adopted = Vec::new();
        if let Some(gfd) = previous.gfd_process()
            && self.supervisor.adopt(Role::Gfd, gfd)
        {
            adopted.push("the GFD".to_owned());
        }
        for (id, entry) in &previous.replicas {
            self.known.insert(id.clone(), entry.address.clone());
            if let Some(process) = entry.process()
                && self.supervisor.adopt(Role::Replica(id.clone()), process)
            {
                adopted.push(id.clone());
            }
            if let Some(process) = entry.lfd_process()
                && self.supervisor.adopt(Role::Lfd(id.clone()), process)
            {
                adopted.push(format!("{id}'s LFD"));
            }
        }
        if let Some(saved) = saved {
            say(format!(
                "RM: resuming the group recorded in {}",
                SavedRecord::path(&self.settings.dir).display()
            ));
            self.spec = saved.spec(&self.settings.spec);
            self.record = saved.record();
            self.saved = Some(saved);
        }
        // Replicas may know a newer configuration than the file (it was lost or old):
        // the newest one any of them reports is the group's.
        let targets: Vec<(String, String)> =
            self.known.iter().map(|(id, address)| (id.clone(), address.clone())).collect();
        let statuses = replicas::statuses(&self.channels, &targets).await;
        let newest = statuses.values().filter_map(|s| s.configuration.clone()).max_by_key(|c| c.epoch);
        if let Some(config) = newest.filter(|c| self.record.config.as_ref().is_none_or(|r| c.epoch > r.epoch))
        {
            say(format!("RM: adopting epoch {} from the running replicas", config.epoch));
            self.record.joined_epoch = config.members.iter().map(|m| (m.id.clone(), config.epoch)).collect();
            self.record.incarnations.clear();
            self.record.config = Some(config);
        }
        if !adopted.is_empty() {
            say(format!("RM: adopted what a previous tandem up left running: {}", adopted.join(", ")));
        }
        // Replicas and LFDs that did not survive are restarted by the reconciliation; an
        // LFD without its replica has nothing to watch.
        for (id, _) in targets {
            if !self.supervisor.is_running(&Role::Replica(id.clone()))
                && self.supervisor.is_running(&Role::Lfd(id.clone()))
            {
                self.supervisor.stop(&Role::Lfd(id), STOP_GRACE);
            }
        }
        self.save_record();
    }

    /// Every address this system will listen on is free, or held by a process it
    /// adopted: a stranger on one of them would answer in a replica's place.
    fn check_ports(&self) -> Result<(), LocalError> {
        let mut addresses = vec![(Role::Gfd, self.settings.gfd_address())];
        let ids = self.instance_ids().into_iter().chain((1..=self.spec.replicas).map(rm::replica_id));
        for id in ids {
            let address = self.address(&id);
            // Both of its ports: the internal one is the client port + 10000.
            let internal = wire::internal_address(&address)?;
            addresses.extend([(Role::Replica(id.clone()), address), (Role::Replica(id), internal)]);
        }
        for (role, address) in addresses {
            if self.supervisor.process(&role).is_some() {
                continue;
            }
            // A process just killed (a restart after kill -9 of everything) may hold its
            // port a moment longer: a stranger holds it for good.
            let deadline = std::time::Instant::now() + PORT_RELEASE_PATIENCE;
            while std::net::TcpListener::bind(&address).is_err() {
                if std::time::Instant::now() > deadline {
                    return Err(LocalError::PortInUse { address });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

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

    /// What every detector process is started with: its heartbeat settings, its logs.
    fn detector_args(&self) -> [String; 6] {
        [
            "--heartbeat-interval-ms".into(),
            self.spec.heartbeat_interval_ms.to_string(),
            "--failure-threshold".into(),
            self.spec.failure_threshold.to_string(),
            "--log-level".into(),
            self.settings.log_level.clone(),
        ]
    }

    /// `--tls-dir` for a child with `identity`, its certificate issued (or renewed) first.
    fn tls_args(&self, identity: &Identity) -> Result<Vec<String>, LocalError> {
        let Some(authority) = &self.authority else { return Ok(Vec::new()) };
        let tls_dir = self.settings.dir.join("tls");
        let holder = authority
            .issue_into(&tls_dir, identity)
            .map_err(|source| LocalError::Tls { dir: tls_dir.clone(), source })?;
        Ok(vec!["--tls-dir".into(), holder.display().to_string()])
    }

    fn start_gfd(&mut self) -> Result<(), LocalError> {
        let mut args = vec!["gfd".into(), "--listen".into(), self.settings.gfd_address()];
        args.extend(self.detector_args());
        args.extend(self.tls_args(&Identity::Gfd)?);
        self.supervisor
            .start(Role::Gfd, &args)
            .map_err(|source| LocalError::Spawn { what: "the GFD".into(), source })?;
        Ok(())
    }

    fn start_lfd(&mut self, id: &str) {
        let mut args = vec![
            "lfd".into(),
            "--replica-id".into(),
            id.into(),
            "--replica".into(),
            self.address(id),
            "--gfd".into(),
            self.settings.gfd_address(),
        ];
        args.extend(self.detector_args());
        if let Some(ip) = self.settings.lfd_ip(id) {
            args.extend(["--dial-from".into(), ip.to_string()]);
        }
        match self.tls_args(&Identity::Lfd(id.into())) {
            Ok(tls) => args.extend(tls),
            Err(error) => return say(format!("RM: cannot start the LFD of {id}: {error}")),
        }
        if let Err(error) = self.supervisor.start(Role::Lfd(id.into()), &args) {
            say(format!("RM: cannot start the LFD of {id}: {error}"));
        }
    }

    /// Where replica `id` listens: as recorded, else by its number.
    fn address(&self, id: &str) -> String {
        self.known
            .get(id)
            .cloned()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| self.settings.replica_address(id))
    }

    fn start_replica(&mut self, id: &str, bootstrap: bool) {
        let peers: Vec<String> = self
            .instance_ids()
            .into_iter()
            .filter(|other| other != id)
            .map(|other| self.address(&other))
            .collect();
        let address = self.address(id);
        let mut args = vec![
            "replica".into(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            address.clone(),
            "--checkpoint-interval-ms".into(),
            self.spec.checkpoint_interval_ms.to_string(),
            "--session-expiry-ms".into(),
            self.settings.session_expiry_ms.to_string(),
            "--gfd".into(),
            self.settings.gfd_address(),
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
        match self.tls_args(&Identity::Replica(id.into())) {
            Ok(tls) => args.extend(tls),
            Err(error) => return say(format!("RM: cannot start {id}: {error}")),
        }
        if self.settings.security.client_tls {
            args.push("--client-tls".into());
        }
        if self.settings.security.client_token {
            let path = self.settings.dir.join(CLIENT_TOKEN_FILE);
            args.extend(["--client-token-file".into(), path.display().to_string()]);
        }
        args.extend(["--durability".into(), self.spec.durability.to_string()]);
        if self.spec.durability.on_disk() {
            // The same directory for every start of this id: a restart recovers it.
            let data = self.settings.dir.join("data").join(id);
            args.extend(["--data-dir".into(), data.display().to_string()]);
        }
        self.facts.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.known.insert(id.into(), address);
        if let Err(error) = self.supervisor.start(Role::Replica(id.into()), &args) {
            say(format!("RM: cannot start {id}: {error}"));
            return;
        }
        if !self.supervisor.is_running(&Role::Lfd(id.into())) {
            self.start_lfd(id);
        }
    }

    /// Every replica id the RM knows of (running or not).
    fn instance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.known.keys().cloned().collect();
        if let Some(config) = &self.record.config {
            ids.extend(config.members.iter().map(|m| m.id.clone()));
        }
        ids.extend(self.record.restarts.keys().cloned());
        ids.sort_by_key(|id| rm::id_number(id));
        ids.dedup();
        ids
    }

    fn on_exit(&mut self, exit: Exit) {
        let stopped = self.supervisor.is_stopping(&exit.role);
        if !self.supervisor.exited(&exit) {
            return;
        }
        match &exit.role {
            Role::Gfd => {
                say(format!("RM: the GFD exited ({}); restarting it", exit.status));
                if let Err(error) = self.start_gfd() {
                    say(format!("RM: {error}"));
                }
            }
            Role::Lfd(id) => {
                let id = id.clone();
                if self.supervisor.is_running(&Role::Replica(id.clone())) {
                    say(format!("RM: the LFD of {id} exited ({}); restarting it", exit.status));
                    self.start_lfd(&id);
                }
            }
            Role::Replica(id) if stopped => say(format!("RM: replica {id} stopped ({})", exit.status)),
            Role::Replica(id) => {
                say(format!("RM: replica {id} exited ({})", exit.status));
                // Its LFD has nothing left to watch; a restart brings a new one.
                self.supervisor.stop(&Role::Lfd(id.clone()), STOP_GRACE);
            }
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
            say(format!(
                "RM: lost the GFD's membership stream ({reason}); ignoring membership until it is back"
            ));
        }
        let Some(event) = event else { return };
        let change = event.change();
        if change != MembershipChange::Snapshot {
            say(format!("GFD: {} {} ({})", event.replica_id, describe_change(change), event.reason));
            // After a readiness change the member list would only repeat itself.
            if gfd::changes_members(change) {
                say(format!("GFD: {}", gfd::members_line(&alive_members(&event))));
            }
        }
        if change == MembershipChange::Ready
            && let Some(started) = self.restarted_at.remove(&event.replica_id)
        {
            let elapsed = started.elapsed().as_millis();
            say(format!("RM: {} recovered: ready {elapsed} ms after its restart", event.replica_id));
        }
        if self.membership.known() && !was_known {
            say("RM: following the GFD's membership");
        }
    }

    async fn on_spec(&mut self, spec: Spec) {
        let old = std::mem::replace(&mut self.spec, spec.clone());
        say(format!(
            "RM: spec now replicas={} mode={} heartbeat_interval={} ms failure_threshold={} checkpoint_interval={} ms",
            spec.replicas,
            spec.mode,
            spec.heartbeat_interval_ms,
            spec.failure_threshold,
            spec.checkpoint_interval_ms
        ));
        self.save_record();
        if (old.heartbeat_interval_ms, old.failure_threshold)
            != (spec.heartbeat_interval_ms, spec.failure_threshold)
        {
            let settings = pb::DetectorSettings {
                heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
                failure_threshold: Some(spec.failure_threshold),
                gfd_heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
                replica_prefix: String::new(),
            };
            let answer = match tandem_replica::wire::dial_internal(&self.settings.gfd_address(), None) {
                Ok(channel) => {
                    let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(channel);
                    within(CALL_TIMEOUT * 4, gfd.update_detector_settings(settings)).await.map(|_| ())
                }
                Err(error) => Err(tonic::Status::invalid_argument(error.to_string())),
            };
            if let Err(status) = answer {
                say(format!("RM: could not change the detector settings: {}", status.message()));
            }
        }
        if old.checkpoint_interval_ms != spec.checkpoint_interval_ms {
            let update = pb::Settings {
                checkpoint_interval_ms: Some(spec.checkpoint_interval_ms),
                ..pb::Settings::default()
            };
            replicas::push_settings(&self.channels, &update, &self.running_targets()).await;
        }
    }

    fn running_replicas(&self) -> Vec<String> {
        self.supervisor
            .processes()
            .filter_map(|(role, _, stopping)| match role {
                Role::Replica(id) if !stopping => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    fn running_targets(&self) -> Vec<(String, String)> {
        self.running_replicas().into_iter().map(|id| (id.clone(), self.address(&id))).collect()
    }

    fn observe(&self) -> Vec<Observed> {
        let facts = self.facts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.instance_ids()
            .into_iter()
            .map(|id| {
                let role = Role::Replica(id.clone());
                let instance = if self.supervisor.is_running(&role) {
                    Instance::Running
                } else if self.supervisor.is_stopping(&role) {
                    Instance::Terminating
                } else {
                    Instance::Gone
                };
                Observed {
                    address: self.address(&id),
                    instance,
                    liveness: self.membership.liveness(&id),
                    facts: facts
                        .get(&id)
                        .filter(|(at, _)| at.elapsed() <= FRESH)
                        .map(|(_, s)| replicas::facts(s)),
                    id,
                }
            })
            .collect()
    }

    /// Observe, decide, act.
    fn reconcile(&mut self) {
        let observed = self.observe();
        self.record.switchover = manager::pending_switchover(&self.shared);
        let actions =
            rm::reconcile(&self.spec, &mut self.record, &observed, self.membership.known(), unix_ms());
        let switchover = self.record.switchover.take();
        // The record first: a configuration is the group's once it is on disk.
        self.save_record();
        for action in actions {
            self.act(action);
        }
        self.report_trouble();
        self.push_configuration();
        self.publish(observed);
        // Answered once recorded, pushed and described.
        manager::answer_switchover(&self.shared, switchover);
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Install { config, reason } => {
                say(format!("RM: {}", replicas::describe_configuration(&config, &reason, str::to_owned)));
                self.last_push.clear();
            }
            Action::Start { id, bootstrap, attempt } => {
                if attempt > 0 {
                    let how = if self.spec.durability.on_disk() {
                        "it recovers its data from disk, then catches up"
                    } else {
                        "it will rejoin through a checkpoint"
                    };
                    say(format!("RM: restarting {id} (attempt {attempt}); {how}"));
                    self.restarted_at.insert(id.clone(), Instant::now());
                    *self.restarts.entry(id.clone()).or_default() += 1;
                } else {
                    say(format!("RM: starting {id} at {}", self.address(&id)));
                }
                self.membership.forget(&id);
                self.start_replica(&id, bootstrap);
            }
            Action::Stop { id, reason } => {
                say(format!("RM: stopping {id}: {reason}"));
                self.supervisor.stop(&Role::Replica(id.clone()), STOP_GRACE);
                self.supervisor.stop(&Role::Lfd(id), STOP_GRACE);
            }
            Action::Forget { id } => {
                if !self.supervisor.is_stopping(&Role::Lfd(id.clone())) {
                    self.known.remove(&id);
                    self.restarts.remove(&id);
                    self.membership.forget(&id);
                }
            }
        }
    }

    /// Says what the RM cannot fix alone, once per change, with what to do.
    fn report_trouble(&mut self) {
        if self.record.trouble == self.last_trouble {
            return;
        }
        self.last_trouble = self.record.trouble.clone();
        match &self.record.trouble {
            Some(trouble @ Trouble::GroupLost { epoch, .. }) => say(format!(
                "RM: WARNING: {}: {trouble}. To start over with an empty group: tandem recreate --lost-epoch {epoch} --dir {}",
                trouble.reason(),
                self.settings.dir.display()
            )),
            Some(trouble) => say(format!("RM: WARNING: {}: {trouble}", trouble.reason())),
            None => {}
        }
    }

    /// Gives the current configuration to every running replica that lacks it.
    fn push_configuration(&mut self) {
        let Some(config) = self.record.config.clone() else { return };
        let facts = self.facts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let targets: Vec<(String, String)> = self
            .running_targets()
            .into_iter()
            .filter(|(id, _)| replicas::lacks(facts.get(id).map(|(_, s)| s), &config))
            .filter(|(id, _)| self.last_push.get(id).is_none_or(|at| at.elapsed() >= REPUSH))
            .collect();
        if targets.is_empty() {
            return;
        }
        for (id, _) in &targets {
            self.last_push.insert(id.clone(), Instant::now());
        }
        let channels = self.channels.clone();
        tokio::spawn(async move { replicas::push_configuration(&channels, &config, &targets).await });
    }

    /// Writes the RM's record to `rm.json` when it changed (atomically).
    fn save_record(&mut self) {
        let saved = SavedRecord::of(&self.spec, &self.record);
        if self.saved.as_ref() == Some(&saved) {
            return;
        }
        if let Err(error) = saved.write(&self.settings.dir) {
            say(format!(
                "RM: WARNING: cannot save the RM's record: {error}; a restart of tandem up would not find it"
            ));
            return;
        }
        self.saved = Some(saved);
    }

    /// Shares the picture with the API, the status poller and the state files.
    fn publish(&mut self, observed: Vec<Observed>) {
        let targets: Vec<(String, String)> = self
            .instance_ids()
            .into_iter()
            .filter(|id| self.supervisor.process(&Role::Replica(id.clone())).is_some())
            .map(|id| (id.clone(), self.address(&id)))
            .collect();
        self.poll_targets.send_if_modified(|current| std::mem::replace(current, targets.clone()) != *current);
        let checkpoint_seqs = self
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (_, s))| (id.clone(), s.checkpoint_seq))
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
            gfd_pid: None,
            gfd_started: None,
            replicas: BTreeMap::new(),
            security: self.settings.security,
        };
        state.set_gfd(self.supervisor.process(&Role::Gfd));
        for id in self.known.keys() {
            let mut entry = ReplicaEntry { address: self.address(id), ..ReplicaEntry::default() };
            entry.set_process(self.supervisor.process(&Role::Replica(id.clone())));
            entry.set_lfd_process(self.supervisor.process(&Role::Lfd(id.clone())));
            state.replicas.insert(id.clone(), entry);
        }
        if state != self.written {
            if let Err(error) = state.write(&self.settings.dir) {
                say(format!("RM: WARNING: cannot write the state files: {error}"));
                return;
            }
            self.written = state;
        }
    }
}
