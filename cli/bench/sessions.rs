//! `tandem bench sessions`: what client sessions and idle connections cost a replica.
//! Starts its own local group (passive), creates N one-shot client sessions (one write
//! each, like N `tandem put` processes), then reads the primary's and a backup's RSS
//! (VmRSS in /proc/<pid>/status) and how long a backup took to install a checkpoint;
//! shortens the session expiry window, lets it pass, writes once (expiry runs as entries
//! apply) and reads the same figures again; creates N more sessions under the short
//! window (the table stays bounded); finally holds C idle connections to the primary
//! and reads its RSS. Prints `key=value` lines.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_operator::local::{self, LocalSettings, Security, StateFile};
use tandem_operator::rm::Spec;
use tandem_replica::client::random_client_id;
use tandem_replica::pb::{self, Mode, operation};
use tandem_replica::state::{DEFAULT_SESSION_EXPIRY_MS, check_session_expiry};
use tandem_replica::wire::{dial, dial_internal, internal_address, unix_micros, within};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{wait_for_state, wait_until_healthy};
use crate::chaos::current_configuration;

#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// One-shot client sessions to create (each one write).
    #[arg(long, default_value_t = 100_000)]
    pub sessions: u32,
    /// Idle connections to hold open to the primary.
    #[arg(long, default_value_t = 5_000)]
    pub connections: u32,
    /// Requests in flight while creating sessions.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// The session expiry window set once the sessions exist, ms (they are created
    /// under the default, 10 min).
    #[arg(long, default_value_t = 2_000)]
    pub expiry_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Base port of the system the bench starts.
    #[arg(long, default_value_t = 7400)]
    pub port: u16,
}

pub async fn sessions(args: SessionsArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1_000_000).contains(&args.sessions), "--sessions between 1 and 1000000");
    anyhow::ensure!(args.connections <= 20_000, "--connections at most 20000");
    anyhow::ensure!((1..=512).contains(&args.concurrency), "--concurrency between 1 and 512");
    anyhow::ensure!(args.replicas >= 2, "--replicas at least 2 (a backup installs the checkpoints)");
    check_session_expiry(args.expiry_ms).map_err(|e| anyhow::anyhow!("--expiry-ms: {}", e.reason))?;
    let dir = std::env::temp_dir().join(format!("tandem-bench-sessions-{}", std::process::id()));
    let settings = LocalSettings {
        spec: Spec { replicas: args.replicas, mode: Mode::Passive, ..Spec::default() },
        base_port: args.port,
        dir: dir.clone(),
        binary: std::env::current_exe().context("cannot find the tandem executable")?,
        log_level: "warn".into(),
        loopback_per_replica: false,
        security: Security { tls: true, ..Security::default() },
        session_expiry_ms: DEFAULT_SESSION_EXPIRY_MS,
    };
    let system = CancellationToken::new();
    let stop = system.clone();
    let task = tokio::spawn(async move { local::run(settings, stop).await });
    let outcome = measure(&args, &dir).await;
    system.cancel();
    task.await.context("local system task")?.context("local system")?;
    let _ = std::fs::remove_dir_all(&dir);
    for (key, value) in outcome? {
        println!("{key}={value}");
    }
    Ok(())
}

/// The group's replicas as the bench sees them.
struct Replicas {
    state: StateFile,
    primary: String,
    backup: String,
}

impl Replicas {
    fn address(&self, id: &str) -> &str {
        self.state.replicas.get(id).map_or("", |r| r.address.as_str())
    }

    /// VmRSS of replica `id`, KiB.
    fn rss_kib(&self, id: &str) -> anyhow::Result<u64> {
        let pid =
            self.state.replicas.get(id).and_then(|r| r.pid).with_context(|| format!("no pid for {id}"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status of {id}"))?;
        super::resources::status_kib(&status, "VmRSS:")
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    async fn status(&self, id: &str) -> anyhow::Result<pb::ReplicaStatus> {
        let mut client = pb::replica_client::ReplicaClient::new(dial(self.address(id), None)?);
        Ok(within(Duration::from_secs(2), client.status(pb::StatusRequest {})).await?.into_inner())
    }
}

type Figures = Vec<(String, String)>;

async fn measure(args: &SessionsArgs, dir: &std::path::Path) -> anyhow::Result<Figures> {
    let state = wait_for_state(dir).await?;
    wait_until_healthy(dir, args.replicas, Duration::from_secs(60))
        .await
        .context("the group never became healthy")?;
    let state = StateFile::read(dir).unwrap_or(state);
    let config = current_configuration(&state).await.context("no configuration")?;
    let backup =
        config.members.iter().map(|m| m.id.clone()).find(|id| *id != config.primary).context("no backup")?;
    let replicas = Replicas { primary: config.primary.clone(), backup, state };
    let mut figures: Figures = vec![("sessions_created".into(), args.sessions.to_string())];
    let mut record = |key: &str, value: u64| figures.push((key.into(), value.to_string()));
    record("rss_primary_start_kib", replicas.rss_kib(&replicas.primary)?);

    let started = Instant::now();
    let failed =
        create_sessions(replicas.address(&replicas.primary), args.sessions, args.concurrency).await?;
    record("create_ms", started.elapsed().as_millis() as u64);
    record("create_failed", failed);
    for (key, value) in phase_figures(&replicas, "before_expiry").await? {
        record(&key, value);
    }

    // Every replica gets the short window (the leader's is the one that counts).
    for id in replicas.state.replicas.keys() {
        let internal = internal_address(replicas.address(id))?;
        let mut control = pb::control_client::ControlClient::new(dial_internal(&internal, None)?);
        let update = pb::Settings { session_expiry_ms: Some(args.expiry_ms), ..pb::Settings::default() };
        within(Duration::from_secs(2), control.update_settings(update))
            .await
            .with_context(|| format!("setting the session expiry of {id}"))?;
    }
    // Expiry runs as entries apply: after the window, one write forgets the idle sessions.
    tokio::time::sleep(Duration::from_millis(args.expiry_ms + 100)).await;
    let started = Instant::now();
    let failed = create_sessions(replicas.address(&replicas.primary), 1, 1).await?;
    anyhow::ensure!(failed == 0, "the write after the window failed");
    record("expiry_write_ms", started.elapsed().as_millis() as u64);
    for (key, value) in phase_figures(&replicas, "after_expiry").await? {
        record(&key, value);
    }

    // The same number of one-shot clients again, under the short window: the table holds
    // only the last window's sessions, and the memory freed above is reused.
    let failed =
        create_sessions(replicas.address(&replicas.primary), args.sessions, args.concurrency).await?;
    record("create_again_failed", failed);
    for (key, value) in phase_figures(&replicas, "after_second_round").await? {
        record(&key, value);
    }

    let before = replicas.rss_kib(&replicas.primary)?;
    record("rss_primary_before_connections_kib", before);
    let held = hold_connections(replicas.address(&replicas.primary), args.connections).await?;
    // The connections sit idle through a few keepalive pings.
    tokio::time::sleep(Duration::from_secs(3)).await;
    record("idle_connections", held.len() as u64);
    let with = replicas.rss_kib(&replicas.primary)?;
    record("rss_primary_with_idle_connections_kib", with);
    record(
        "rss_per_idle_connection_bytes",
        (with.saturating_sub(before) * 1024) / (held.len().max(1) as u64),
    );
    drop(held);
    Ok(figures)
}

/// `count` sessions, one write each (`bench/k`, so the key-value map stays one key),
/// `concurrency` at a time over as many connections. Returns how many failed after
/// three attempts.
async fn create_sessions(primary: &str, count: u32, concurrency: u32) -> anyhow::Result<u64> {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let channel = dial(primary, None)?;
        let mine = (worker..count).step_by(concurrency as usize).count();
        workers.spawn(async move {
            let mut failed = 0u64;
            for _ in 0..mine {
                if !one_shot(&channel).await {
                    failed += 1;
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(done) = workers.join_next().await {
        failed += done.context("session worker")?;
    }
    Ok(failed)
}

/// One client session: a fresh id, one request with an id from the clock (what the
/// client library sends), retried twice under the same ids.
async fn one_shot(channel: &Channel) -> bool {
    let request = pb::ExecuteRequest {
        client_id: random_client_id(),
        request_id: unix_micros(),
        op: Some(pb::Operation {
            kind: Some(operation::Kind::Put(pb::Put { key: "bench/k".into(), value: "v".into() })),
        }),
        epoch: 0,
    };
    let mut client = pb::replica_client::ReplicaClient::new(channel.clone());
    for _ in 0..3 {
        if within(Duration::from_secs(10), client.execute(request.clone())).await.is_ok() {
            return true;
        }
    }
    false
}

/// Waits until the backup installed a checkpoint of everything the primary applied;
/// returns the primary's session count and how long that install took (ms).
/// After a phase: the session count and checkpoint install time once the backup is
/// checkpointed, and both replicas' RSS, named `<figure>_<phase>`.
async fn phase_figures(replicas: &Replicas, phase: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let (sessions, install_ms) = settle_checkpoint(replicas).await?;
    Ok(vec![
        (format!("sessions_{phase}"), sessions),
        (format!("checkpoint_install_ms_{phase}"), install_ms),
        (format!("rss_primary_{phase}_kib"), replicas.rss_kib(&replicas.primary)?),
        (format!("rss_backup_{phase}_kib"), replicas.rss_kib(&replicas.backup)?),
    ])
}

async fn settle_checkpoint(replicas: &Replicas) -> anyhow::Result<(u64, u64)> {
    let primary = replicas.status(&replicas.primary).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let backup = replicas.status(&replicas.backup).await?;
        if backup.checkpoint_seq >= primary.applied_seq {
            return Ok((primary.sessions, backup.last_checkpoint_install_ms));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} has no checkpoint of seq {} after 120 s (it has {})",
            replicas.backup,
            primary.applied_seq,
            backup.checkpoint_seq
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens `count` connections to `address`, each with one call so that HTTP/2 is set up,
/// 100 at a time; returns them, to be held open and idle.
async fn hold_connections(address: &str, count: u32) -> anyhow::Result<Vec<Channel>> {
    let mut held = Vec::with_capacity(count as usize);
    let mut remaining = count;
    while remaining > 0 {
        let batch = remaining.min(100);
        remaining -= batch;
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(5));
            opening.spawn(async move {
                let channel = endpoint.connect().await?;
                let mut client = pb::replica_client::ReplicaClient::new(channel.clone());
                within(Duration::from_secs(5), client.status(pb::StatusRequest {})).await?;
                anyhow::Ok(channel)
            });
        }
        while let Some(opened) = opening.join_next().await {
            held.push(opened.context("connection task")?.context("opening an idle connection")?);
        }
    }
    Ok(held)
}
