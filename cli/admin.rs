//! Administration by hand: `status` (the group at a glance), `configure` (install a
//! configuration, which the RM does in normal operation) and `digest`.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::future::join_all;
use tandem_replica::pb::{self, Mode};
use tandem_replica::wire::{Plane, dial, dial_internal, internal_address, within};

use crate::endpoints::EndpointArgs;

const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the admin commands read replicas' Status and Digest: the internal port as the
/// group's manager when this process has its certificate (it needs no client token
/// there), else the client port.
fn admin_plane() -> Plane {
    if tandem_replica::tls::installed().is_some() { Plane::Internal } else { Plane::Client }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, Args)]
pub struct DigestArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// The new epoch; must be higher than every replica's current one.
    #[arg(long)]
    pub epoch: u64,
    /// Replication mode: passive or active.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Id of the primary (passive) or order-keeper (active).
    #[arg(long)]
    pub primary: String,
    /// Members as id=host:port, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub members: Vec<String>,
    /// Also send the configuration to these replicas (host:port), e.g. one that joins.
    #[arg(long, value_delimiter = ',')]
    pub also: Vec<String>,
    /// Where the group's manager certificate is (DIR/tls/manager), unless --tls-dir.
    #[command(flatten)]
    pub target: EndpointArgs,
    /// Install even though a `tandem up` manages the group in DIR (its RM does not
    /// learn of a configuration installed by hand, and may fail to fail over after it).
    #[arg(long)]
    pub force: bool,
}

/// Asks every address at once; each answer, or why there is none, beside its address.
/// `plane`: the replicas' client ports, or their internal ones (client port + 10000).
async fn ask_each<T, Answer>(
    plane: Plane,
    addresses: Vec<String>,
    ask: impl Fn(tonic::transport::Channel) -> Answer,
) -> Vec<(String, anyhow::Result<T>)>
where
    Answer: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    join_all(addresses.into_iter().map(|address| {
        let dialled = match plane {
            Plane::Client => dial(&address, None),
            Plane::Internal => internal_address(&address).and_then(|internal| dial_internal(&internal, None)),
        };
        let call = dialled.map(|channel| within(CALL_TIMEOUT, ask(channel)));
        async move {
            let answer = match call {
                Ok(call) => call.await.map(tonic::Response::into_inner).map_err(anyhow::Error::from),
                Err(bad) => Err(bad.into()),
            };
            (address, answer)
        }
    }))
    .await
}

async fn statuses_of(addresses: Vec<String>) -> Vec<(String, anyhow::Result<pb::ReplicaStatus>)> {
    ask_each(admin_plane(), addresses, |channel| async move {
        pb::replica_client::ReplicaClient::new(channel).status(pb::StatusRequest {}).await
    })
    .await
}

/// The given endpoints plus every member their configurations name.
async fn all_statuses(endpoints: Vec<String>) -> Vec<(String, anyhow::Result<pb::ReplicaStatus>)> {
    let mut statuses = statuses_of(endpoints).await;
    let known: Vec<String> = statuses.iter().map(|(a, _)| a.clone()).collect();
    let mut more: Vec<String> = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok()?.configuration.clone())
        .flat_map(|c| c.members.into_iter().map(|m| m.address))
        .filter(|a| !known.contains(a))
        .collect();
    more.sort();
    more.dedup();
    statuses.extend(statuses_of(more).await);
    statuses
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role).unwrap_or_default() {
        pb::Role::Primary => "primary",
        pb::Role::Backup => "backup",
        pb::Role::Joining => "joining",
        pb::Role::Standby => "standby",
        pb::Role::Unconfigured => "unconfigured",
        pb::Role::Unspecified => "?",
    }
}

/// Last heartbeat per replica, from the GFD of a running `tandem up` (if any).
async fn heartbeats(target: &EndpointArgs) -> std::collections::BTreeMap<String, u64> {
    let Ok(state) = target.local_state() else { return Default::default() };
    let Ok(channel) = dial_internal(&state.gfd, None) else { return Default::default() };
    let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(channel);
    match within(CALL_TIMEOUT, gfd.members(pb::MembersRequest {})).await {
        Ok(members) => members
            .into_inner()
            .members
            .into_iter()
            .map(|m| (m.replica_id, m.last_heartbeat_unix_ms))
            .collect(),
        _ => Default::default(),
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let statuses = all_statuses(args.endpoints.resolve()?).await;
    let heartbeats = heartbeats(&args.endpoints).await;
    let now = tandem_replica::wire::unix_ms();
    println!(
        "{:<8} {:<21} {:<12} {:<6} {:>5} {:<8} {:<8} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9}",
        "REPLICA",
        "ADDRESS",
        "ROLE",
        "READY",
        "EPOCH",
        "MODE",
        "PRIMARY",
        "LAST",
        "COMMIT",
        "APPLIED",
        "CHECKPOINT",
        "KEYS",
        "HEARTBEAT"
    );
    let mut reachable = 0;
    let mut durabilities = std::collections::BTreeSet::new();
    for (address, answer) in &statuses {
        match answer {
            Ok(s) => {
                reachable += 1;
                let config = s.configuration.clone().unwrap_or_default();
                let heartbeat = heartbeats
                    .get(&s.replica_id)
                    .map_or_else(|| "-".to_owned(), |at| format!("{} ms", now.saturating_sub(*at)));
                println!(
                    "{:<8} {:<21} {:<12} {:<6} {:>5} {:<8} {:<8} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9}",
                    s.replica_id,
                    address,
                    role_name(s.role),
                    if s.ready { "yes" } else { "no" },
                    config.epoch,
                    if config.epoch == 0 { "-".to_owned() } else { config.mode().to_string() },
                    if config.primary.is_empty() { "-" } else { &config.primary },
                    s.last_seq,
                    s.commit_seq,
                    s.applied_seq,
                    s.checkpoint_seq,
                    s.keys,
                    heartbeat
                );
                if !s.not_ready_reason.is_empty() {
                    println!("         not ready: {}", s.not_ready_reason);
                }
                durabilities.insert(s.durability.clone());
                if !s.recovery.is_empty() {
                    println!("         recovered from disk: {}", s.recovery);
                }
            }
            Err(error) => println!("{:<8} {:<21} unreachable: {error:#}", "?", address),
        }
    }
    if !durabilities.is_empty() {
        let durability: Vec<&str> = durabilities.iter().map(String::as_str).collect();
        println!("durability: {}", durability.join(", "));
    }
    if let Some(trouble) = rm_trouble(&args.endpoints).await {
        println!("RM: {trouble}");
    }
    anyhow::ensure!(reachable > 0, "no replica answered");
    Ok(())
}

/// What the RM of a running `tandem up` cannot fix alone, if anything.
async fn rm_trouble(target: &EndpointArgs) -> Option<String> {
    let state = target.local_state().ok()?;
    let mut manager = pb::manager_client::ManagerClient::new(dial_internal(&state.manager, None).ok()?);
    let description = within(CALL_TIMEOUT, manager.describe(pb::DescribeRequest {})).await.ok()?.into_inner();
    (!description.trouble.is_empty())
        .then(|| format!("{}: {}", description.trouble_reason, description.trouble))
}

pub async fn digest(args: DigestArgs) -> anyhow::Result<()> {
    let addresses: Vec<String> =
        all_statuses(args.endpoints.resolve()?).await.into_iter().map(|(a, _)| a).collect();
    let digests = ask_each(admin_plane(), addresses, |channel| async move {
        pb::replica_client::ReplicaClient::new(channel).digest(pb::DigestRequest {}).await
    })
    .await;
    for (address, answer) in digests {
        match answer {
            Ok(d) => println!(
                "{:<8} {:<21} seq {:>9} keys {:>8} {}",
                d.replica_id, address, d.seq, d.keys, d.digest
            ),
            Err(error) => println!("{:<8} {:<21} unreachable: {error:#}", "?", address),
        }
    }
    Ok(())
}

/// Parses `id=host:port`.
fn parse_member(text: &str) -> anyhow::Result<pb::Member> {
    let (id, address) =
        text.split_once('=').with_context(|| format!("member {text:?} is not id=host:port"))?;
    Ok(pb::Member { id: id.trim().into(), address: address.trim().into() })
}

pub async fn configure(args: ConfigureArgs) -> anyhow::Result<()> {
    let members = args.members.iter().map(|m| parse_member(m)).collect::<anyhow::Result<Vec<_>>>()?;
    let mode = args.mode;
    let config = pb::Configuration { epoch: args.epoch, mode: mode.into(), primary: args.primary, members };
    tandem_replica::replication::check_configuration(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        args.force || tandem_operator::local::StateFile::read(&args.target.dir).is_none(),
        "a `tandem up` manages the group in {}: its RM installs configurations (use `tandem set` to change the group, `tandem chaos` to fault it), and one installed by hand would leave it behind; pass --force to do it anyway",
        args.target.dir.display()
    );
    args.target.use_local_identity()?;
    let mut targets: Vec<String> = config.members.iter().map(|m| m.address.clone()).collect();
    targets.extend(args.also);
    let results = ask_each(Plane::Internal, targets, |channel| {
        let config = config.clone();
        async move { pb::control_client::ControlClient::new(channel).install_configuration(config).await }
    })
    .await;
    let mut failures = 0;
    for (address, answer) in results {
        match answer {
            Ok(reply) => {
                println!("{address}: epoch {} installed, role {}", reply.epoch, role_name(reply.role))
            }
            Err(error) => {
                failures += 1;
                println!("{address}: failed: {error:#}");
            }
        }
    }
    anyhow::ensure!(failures == 0, "{failures} replica(s) did not take the configuration");
    Ok(())
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(subcommand)]
    pub setting: Setting,
    #[command(flatten)]
    pub target: EndpointArgs,
}

#[derive(Debug, Subcommand)]
pub enum Setting {
    /// Number of replicas (the group grows or shrinks without downtime).
    Replicas { value: u32 },
    /// LFD heartbeat period, in milliseconds.
    HeartbeatInterval { ms: u64 },
    /// Missed heartbeats before a replica is declared dead.
    FailureThreshold { value: u32 },
    /// Passive mode checkpoint period, in milliseconds (0: off).
    CheckpointInterval { ms: u64 },
    /// Replication mode (switches the live group).
    Mode { mode: Mode },
}

#[derive(Debug, Args)]
pub struct RecreateArgs {
    /// The epoch of the lost group, as `tandem up` (or `tandem status`) reports it: the
    /// group is recreated only if that very group is lost.
    #[arg(long)]
    pub lost_epoch: u64,
    #[command(flatten)]
    pub target: EndpointArgs,
}

/// `tandem recreate`: after every replica of a group lost its state at once, starts a
/// new, empty group in its place (the data is gone already; this accepts it).
pub async fn recreate(args: RecreateArgs) -> anyhow::Result<()> {
    let state = args.target.local_state()?;
    let update = pb::SpecUpdate { recreate_lost_epoch: Some(args.lost_epoch), ..pb::SpecUpdate::default() };
    update_spec(&state.manager, update).await?;
    println!("recreating: a new, empty group replaces the lost group of epoch {}", args.lost_epoch);
    Ok(())
}

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The replica id of the new primary (or active order-keeper); default: the best
    /// backup that can safely take over (synced in the current epoch, the longest log).
    #[arg(long, env = "TANDEM_SWITCHOVER_TO", default_value = "any")]
    pub to: String,
    #[command(flatten)]
    pub target: EndpointArgs,
}

/// `tandem switchover`: asks the RM of a running `tandem up` to hand the primary's role
/// to another member, and prints what it did (or why it would not).
pub async fn switchover(args: SwitchoverArgs) -> anyhow::Result<()> {
    let state = args.target.local_state()?;
    let mut manager = pb::manager_client::ManagerClient::new(dial_internal(&state.manager, None)?);
    // The RM may wait for a round in which it changes nothing else (its API waits 10 s).
    let request = pb::SwitchoverRequest { to: args.to };
    let reply = within(Duration::from_secs(15), manager.switchover(request))
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    if reply.already_primary {
        println!("{} is the primary already (epoch {}): nothing to do", reply.to, reply.epoch);
    } else {
        println!("switched over: {} -> {} (epoch {})", reply.from, reply.to, reply.epoch);
    }
    Ok(())
}

async fn update_spec(manager: &str, update: pb::SpecUpdate) -> anyhow::Result<pb::ServiceSpec> {
    let mut manager = pb::manager_client::ManagerClient::new(dial_internal(manager, None)?);
    let spec = within(CALL_TIMEOUT, manager.update_spec(update))
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .context("the RM refused")?;
    Ok(spec.into_inner())
}

pub async fn set(args: SetArgs) -> anyhow::Result<()> {
    let state = args.target.local_state()?;
    let mut update = pb::SpecUpdate::default();
    match args.setting {
        Setting::Replicas { value } => update.replicas = Some(value),
        Setting::HeartbeatInterval { ms } => update.heartbeat_interval_ms = Some(ms),
        Setting::FailureThreshold { value } => update.failure_threshold = Some(value),
        Setting::CheckpointInterval { ms } => update.checkpoint_interval_ms = Some(ms),
        Setting::Mode { mode } => update.mode = Some(mode.into()),
    }
    let spec = update_spec(&state.manager, update).await?;
    println!(
        "spec: replicas={} mode={} heartbeat_interval={} ms failure_threshold={} checkpoint_interval={} ms",
        spec.replicas,
        spec.mode(),
        spec.heartbeat_interval_ms,
        spec.failure_threshold,
        spec.checkpoint_interval_ms
    );
    Ok(())
}
