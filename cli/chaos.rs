//! `tandem chaos`: the faults people inject to watch a failover, against a running
//! `tandem up` — kill -9 a primary, a backup, a random replica, an LFD or the GFD, or
//! pause a replica (SIGSTOP, then SIGCONT: slow is not dead).

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nix::sys::signal::Signal;
use rand::seq::IndexedRandom;
use tandem_operator::local::{ProcessId, StateFile};
use tandem_replica::client::newest_configuration;
use tandem_replica::pb;
use tandem_replica::wire::Channels;

use crate::endpoints::EndpointArgs;

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub fault: Fault,
    #[command(flatten)]
    pub target: EndpointArgs,
}

#[derive(Debug, Subcommand)]
pub enum Fault {
    /// kill -9 the primary (passive) or order-keeper (active).
    KillPrimary,
    /// kill -9 a member that is not the primary.
    KillBackup,
    /// kill -9 any running replica.
    KillRandom,
    /// kill -9 this replica.
    Kill { replica: String },
    /// kill -9 this replica's LFD.
    KillLfd { replica: String },
    /// kill -9 the GFD.
    KillGfd,
    /// SIGSTOP this replica, then SIGCONT after SECONDS.
    Pause { replica: String, seconds: f64 },
}

/// The current configuration, as the replicas report it (highest epoch wins).
pub async fn current_configuration(state: &StateFile) -> Option<pb::Configuration> {
    let addresses: Vec<String> = state.replicas.values().map(|r| r.address.clone()).collect();
    newest_configuration(&Channels::default(), &addresses, Duration::from_millis(500)).await
}

/// Signals a process the state file names, only if it is still that very process (a
/// pid the system may have given to another since is left alone).
fn send(process: Option<ProcessId>, signal: Signal, what: &str) -> anyhow::Result<()> {
    let process = process.with_context(|| format!("{what} is not running"))?;
    anyhow::ensure!(
        process.signal(signal),
        "{what} (pid {}) is no longer running; the state file is being updated, try again",
        process.pid
    );
    println!("{signal:?} -> {what} (pid {})", process.pid);
    Ok(())
}

/// kill -9 the primary of a running local system; returns its id, the epoch it led and
/// when (unix ms) the signal was sent.
pub async fn kill_primary(state: &StateFile) -> anyhow::Result<(String, u64, u64)> {
    let config = current_configuration(state).await.context("no replica answered with a configuration")?;
    let entry = state
        .replicas
        .get(&config.primary)
        .with_context(|| format!("primary {} is not a local replica", config.primary))?;
    let killed_at = tandem_replica::wire::unix_ms();
    send(entry.process(), Signal::SIGKILL, &format!("primary {}", config.primary))?;
    Ok((config.primary, config.epoch, killed_at))
}

/// SIGSTOP the primary of a running local system, and SIGCONT it after `pause`; returns
/// its id, the epoch it led and when (unix ms) it stopped.
pub async fn pause_primary(state: &StateFile, pause: Duration) -> anyhow::Result<(String, u64, u64)> {
    let config = current_configuration(state).await.context("no replica answered with a configuration")?;
    let process = state
        .replicas
        .get(&config.primary)
        .and_then(|entry| entry.process())
        .with_context(|| format!("primary {} is not a running local replica", config.primary))?;
    let paused_at = tandem_replica::wire::unix_ms();
    send(Some(process), Signal::SIGSTOP, &format!("primary {}", config.primary))?;
    tokio::spawn(async move {
        tokio::time::sleep(pause).await;
        process.signal(Signal::SIGCONT);
    });
    Ok((config.primary, config.epoch, paused_at))
}

pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let state = args.target.local_state()?;
    let replica_pid = |id: &str| state.replicas.get(id).and_then(|r| r.process());
    match args.fault {
        Fault::KillPrimary => {
            kill_primary(&state).await?;
        }
        Fault::KillBackup => {
            let config =
                current_configuration(&state).await.context("no replica answered with a configuration")?;
            let backups: Vec<&str> =
                config.members.iter().map(|m| m.id.as_str()).filter(|id| *id != config.primary).collect();
            let victim = backups.choose(&mut rand::rng()).context("the configuration has no backup")?;
            send(replica_pid(victim), Signal::SIGKILL, &format!("backup {victim}"))?;
        }
        Fault::KillRandom => {
            let running: Vec<&String> =
                state.replicas.iter().filter(|(_, r)| r.process().is_some()).map(|(id, _)| id).collect();
            let victim = running.choose(&mut rand::rng()).context("no replica is running")?;
            send(replica_pid(victim), Signal::SIGKILL, &format!("replica {victim}"))?;
        }
        Fault::Kill { replica } => {
            send(replica_pid(&replica), Signal::SIGKILL, &format!("replica {replica}"))?
        }
        Fault::KillLfd { replica } => {
            let pid = state.replicas.get(&replica).and_then(|r| r.lfd_process());
            send(pid, Signal::SIGKILL, &format!("the LFD of {replica}"))?;
        }
        Fault::KillGfd => send(state.gfd_process(), Signal::SIGKILL, "the GFD")?,
        Fault::Pause { replica, seconds } => {
            anyhow::ensure!(
                seconds > 0.0 && seconds <= 3600.0,
                "a pause lasts more than 0 and at most 3600 seconds"
            );
            send(replica_pid(&replica), Signal::SIGSTOP, &format!("replica {replica}"))?;
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            send(replica_pid(&replica), Signal::SIGCONT, &format!("replica {replica}"))?;
        }
    }
    Ok(())
}
