//! The Kubernetes adapter of the RM: a kube-rs `Controller` over `ReplicatedService`s.
//! Each reconciliation observes (pods, the GFD's membership, each replica's Status),
//! asks `rm::reconcile` what to do, records the new configuration in the resource's
//! status with optimistic concurrency (so the API server is the one authority for
//! epochs), and only then acts: pushes the configuration, creates or deletes pods,
//! keeps the Services and the PodDisruptionBudget, and emits events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use tandem_replica::detector::service::unix_ms;
use tandem_replica::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::crd::{Defaults, ReplicatedService};
use crate::membership::{self, MembershipView};
use crate::pods::{self, MEMBER_LABEL, PodSettings, REPLICA_LABEL, ROLE_LABEL, SERVICE_LABEL};
use crate::rm::{self, Action, Restarts};
use crate::status;

pub const FIELD_MANAGER: &str = "tandem-operator";
/// Reconcile this often even without events (statuses, heartbeats, back-off timers).
const RESYNC: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub defaults: Defaults,
    pub pod_settings: PodSettings,
    /// Where this operator reaches its own GFD sidecar.
    pub gfd_local: String,
    pub membership: Arc<Mutex<MembershipView>>,
    /// Restart back-off per service (in memory: an operator restart resets it).
    restarts: Mutex<HashMap<String, BTreeMap<String, Restarts>>>,
    /// Settings last pushed per service, so a change is pushed once.
    pushed: Mutex<HashMap<String, rm::Spec>>,
    /// Whether the API server serves policy/v1 PodDisruptionBudgets (1.21+).
    pdb_v1: bool,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Context {
    pub fn new(
        client: Client,
        defaults: Defaults,
        pod_settings: PodSettings,
        gfd_local: String,
        pdb_v1: bool,
        identity: String,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            pod_settings,
            gfd_local,
            membership: Arc::default(),
            restarts: Mutex::default(),
            pushed: Mutex::default(),
            pdb_v1,
            channels: Mutex::default(),
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Some(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(CALL_TIMEOUT)
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Some(channel)
    }

    async fn event(&self, rsvc: &ReplicatedService, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &rsvc.object_ref(&())).await {
            warn!(%error, reason, "could not record an event");
        }
    }
}

/// Asks each pod's replica for its Status, concurrently.
async fn replica_statuses(ctx: &Context, pods: &[Pod]) -> BTreeMap<String, pb::ReplicaStatus> {
    let calls = pods.iter().filter(|p| status::pod_running(p)).filter_map(|pod| {
        let id = pod.labels().get(REPLICA_LABEL)?.clone();
        let channel = ctx.channel(&status::pod_address(pod)?)?;
        Some(async move {
            let mut client = pb::replica_client::ReplicaClient::new(channel);
            let answer = tokio::time::timeout(CALL_TIMEOUT, client.status(pb::StatusRequest {})).await;
            (id, answer.ok().and_then(Result::ok).map(tonic::Response::into_inner))
        })
    });
    join_all(calls).await.into_iter().filter_map(|(id, status)| Some((id, status?))).collect()
}

pub async fn reconcile(rsvc: Arc<ReplicatedService>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = rsvc.namespace().ok_or_else(|| Error::NoNamespace(rsvc.name_any()))?;
    let name = rsvc.name_any();
    let key = format!("{namespace}/{name}");
    let spec = rsvc.spec.effective(&ctx.defaults);
    let problems = spec.problems();

    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pod_api.list(&ListParams::default().labels(&format!("{SERVICE_LABEL}={name}"))).await?.items;
    let statuses = replica_statuses(&ctx, &pods).await;
    let membership = ctx.membership.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let restarts =
        ctx.restarts.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned().unwrap_or_default();
    let mut record = status::record_from_status(rsvc.status.as_ref(), restarts);
    let observed = status::observe(&rsvc, &pods, &membership, &statuses, &record);

    let actions = if problems.is_empty() {
        rm::reconcile(&spec, &mut record, &observed, membership.known(), unix_ms())
    } else {
        Vec::new()
    };
    ctx.restarts.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), record.restarts.clone());

    // Record first: the status write is the commit point of a new configuration.
    let new_status =
        status::build_status(&rsvc, &spec, &problems, &record, &observed, &statuses, &membership, unix_ms());
    let previous = rsvc.status.clone().unwrap_or_default();
    if status::settled_part(&new_status) != status::settled_part(&previous) {
        let mut updated = (*rsvc).clone();
        updated.status = Some(new_status);
        let api: Api<ReplicatedService> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.replace_status(&name, &PostParams::default(), &updated).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(%key, "status changed under us; reconciling again");
                return Ok(Requeue::requeue(Duration::from_millis(50)));
            }
            Err(error) => return Err(error.into()),
        }
    }
    if !problems.is_empty()
        && previous.conditions.iter().all(|c| c.type_ != "SpecValid" || c.status != "False")
    {
        ctx.event(&rsvc, EventType::Warning, "InvalidSpec", problems.join("; ")).await;
    }

    for action in actions {
        act(&rsvc, &ctx, &spec, &pods, action).await?;
    }
    push_configuration(&ctx, &record, &statuses, &pods).await;
    push_settings(&ctx, &key, &spec, &statuses, &pods).await;
    label_roles(&pod_api, &record, &pods).await;
    ensure_services(&rsvc, &ctx, &namespace, &spec).await?;
    Ok(Requeue::requeue(RESYNC))
}

async fn act(
    rsvc: &ReplicatedService,
    ctx: &Context,
    spec: &rm::Spec,
    pods: &[Pod],
    action: Action,
) -> Result<(), Error> {
    let namespace = rsvc.namespace().unwrap_or_default();
    let name = rsvc.name_any();
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    match action {
        Action::Install { config, reason } => {
            let members: Vec<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
            let note = format!(
                "epoch {} ({}): primary {}, members {} — {reason}",
                config.epoch,
                rm::mode_name(config.mode()),
                pods::pod_name(&name, &config.primary),
                members.join(", ")
            );
            info!(service = %name, "{note}");
            let failover = reason.contains("promoted");
            ctx.event(rsvc, EventType::Normal, if failover { "Failover" } else { "Reconfigured" }, note)
                .await;
        }
        Action::Start { id, bootstrap, attempt } => {
            let pod_name = pods::pod_name(&name, &id);
            if pods.iter().any(|p| p.name_any() == pod_name) {
                // The old pod is still terminating; create the new one once it is gone.
                return Ok(());
            }
            let peers: Vec<String> =
                pods.iter().filter(|p| status::pod_running(p)).filter_map(status::pod_address).collect();
            let pod = pods::replica_pod(rsvc, &ctx.defaults, &ctx.pod_settings, spec, &id, bootstrap, &peers);
            match pod_api
                .create(
                    &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() },
                    &pod,
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => return Ok(()),
                Err(error) => return Err(error.into()),
            }
            let (reason, note) = if attempt > 0 {
                (
                    "Recreated",
                    format!("recreated {pod_name} (attempt {attempt}); it rejoins through a checkpoint"),
                )
            } else {
                (
                    "Created",
                    format!("created {pod_name}{}", if bootstrap { " for the new group" } else { "" }),
                )
            };
            info!(service = %name, "{note}");
            ctx.event(rsvc, EventType::Normal, reason, note).await;
        }
        Action::Stop { id, reason } => {
            let pod_name = pods::pod_name(&name, &id);
            match pod_api.delete(&pod_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error.into()),
            }
            ctx.event(rsvc, EventType::Normal, "Removed", format!("deleted {pod_name}: {reason}")).await;
        }
        Action::Warn(warning) => {
            warn!(service = %name, "{warning}");
            ctx.event(rsvc, EventType::Warning, "Stuck", warning).await;
        }
    }
    Ok(())
}

/// Gives the configuration to every running replica that lacks it.
async fn push_configuration(
    ctx: &Context,
    record: &rm::Record,
    statuses: &BTreeMap<String, pb::ReplicaStatus>,
    pods: &[Pod],
) {
    let Some(config) = record.config.clone() else { return };
    let calls = pods.iter().filter(|p| status::pod_running(p)).filter_map(|pod| {
        let id = pod.labels().get(REPLICA_LABEL)?;
        let behind =
            statuses.get(id).is_none_or(|s| s.configuration.as_ref().is_none_or(|c| c.epoch < config.epoch));
        if !behind {
            return None;
        }
        let mut control = pb::control_client::ControlClient::new(ctx.channel(&status::pod_address(pod)?)?);
        let config = config.clone();
        Some(async move { tokio::time::timeout(CALL_TIMEOUT, control.install_configuration(config)).await })
    });
    join_all(calls).await;
}

/// Pushes what the spec changed (intervals) and where the GFD is: the LFDs' heartbeat
/// settings through the GFD (scoped to this service's replicas), the checkpoint interval
/// and the GFD address to each replica.
async fn push_settings(
    ctx: &Context,
    key: &str,
    spec: &rm::Spec,
    statuses: &BTreeMap<String, pb::ReplicaStatus>,
    pods: &[Pod],
) {
    let last = ctx.pushed.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
    if last.as_ref().is_none_or(|l| {
        (l.heartbeat_interval_ms, l.failure_threshold) != (spec.heartbeat_interval_ms, spec.failure_threshold)
    }) && let Some(channel) = ctx.channel(&ctx.gfd_local)
    {
        let (namespace, name) = key.split_once('/').unwrap_or_default();
        let settings = pb::DetectorSettings {
            heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
            failure_threshold: Some(spec.failure_threshold),
            gfd_heartbeat_interval_ms: None,
            replica_prefix: format!("{}-", pods::detector_id(namespace, name)),
        };
        let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(channel);
        if let Err(error) = tokio::time::timeout(CALL_TIMEOUT, gfd.update_detector_settings(settings)).await {
            warn!(service = key, %error, "could not push the heartbeat settings to the GFD");
        }
    }
    let checkpoint_changed =
        last.as_ref().is_some_and(|l| l.checkpoint_interval_ms != spec.checkpoint_interval_ms);
    let calls = pods.iter().filter(|p| status::pod_running(p)).filter_map(|pod| {
        let id = pod.labels().get(REPLICA_LABEL)?;
        let replica = statuses.get(id)?;
        let stale_gfd = replica.gfd_address != ctx.pod_settings.gfd_address;
        let stale_interval =
            checkpoint_changed || replica.checkpoint_interval_ms != spec.checkpoint_interval_ms;
        if !stale_gfd && !stale_interval {
            return None;
        }
        let mut control = pb::control_client::ControlClient::new(ctx.channel(&status::pod_address(pod)?)?);
        let update = pb::Settings {
            checkpoint_interval_ms: Some(spec.checkpoint_interval_ms),
            gfd_address: Some(ctx.pod_settings.gfd_address.clone()),
        };
        Some(async move { tokio::time::timeout(CALL_TIMEOUT, control.update_settings(update)).await })
    });
    join_all(calls).await;
    ctx.pushed.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), spec.clone());
}

/// Keeps each pod's role and member labels in line with the configuration (the client
/// Service selects on them).
async fn label_roles(pod_api: &Api<Pod>, record: &rm::Record, pods: &[Pod]) {
    let config = record.config.as_ref();
    for pod in pods.iter().filter(|p| status::pod_running(p)) {
        let Some(id) = pod.labels().get(REPLICA_LABEL) else { continue };
        let role = pods::role_label(config, id);
        let member =
            if config.is_some_and(|c| c.members.iter().any(|m| &m.id == id)) { "true" } else { "false" };
        if pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(role)
            && pod.labels().get(MEMBER_LABEL).map(String::as_str) == Some(member)
        {
            continue;
        }
        let patch =
            serde_json::json!({ "metadata": { "labels": { ROLE_LABEL: role, MEMBER_LABEL: member } } });
        if let Err(error) =
            pod_api.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await
        {
            warn!(pod = %pod.name_any(), %error, "could not label the pod");
        }
    }
}

/// The client Service, the headless peer Service and the PodDisruptionBudget.
async fn ensure_services(
    rsvc: &ReplicatedService,
    ctx: &Context,
    namespace: &str,
    spec: &rm::Spec,
) -> Result<(), Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let mode = rsvc
        .status
        .as_ref()
        .and_then(|s| s.mode.as_deref())
        .map_or(spec.mode, |m| if m == "active" { pb::Mode::Active } else { pb::Mode::Passive });
    for service in [pods::client_service(rsvc, mode), pods::peer_service(rsvc)] {
        services.patch(&service.name_any(), &apply, &Patch::Apply(&service)).await?;
    }
    if ctx.pdb_v1 {
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
        let budget = pods::disruption_budget(rsvc);
        budgets.patch(&budget.name_any(), &apply, &Patch::Apply(&budget)).await?;
    } else {
        let resource =
            ApiResource::from_gvk(&GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"));
        let budgets: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
        budgets
            .patch(&rsvc.name_any(), &apply, &Patch::Apply(&pods::disruption_budget_v1beta1(rsvc)))
            .await?;
    }
    Ok(())
}

pub fn error_policy(rsvc: Arc<ReplicatedService>, error: &Error, _: Arc<Context>) -> Requeue {
    warn!(service = %rsvc.name_any(), %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(1))
}

/// Whether the API server serves policy/v1 PodDisruptionBudgets; older ones (1.20) only
/// serve policy/v1beta1.
pub async fn serves_pdb_v1(client: &Client) -> bool {
    let gvk = GroupVersionKind::gvk("policy", "v1", "PodDisruptionBudget");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}

/// The service a GFD replica id (`namespace/service-rN`) belongs to.
pub fn service_of(detector_id: &str) -> Option<ObjectRef<ReplicatedService>> {
    let (namespace, pod) = detector_id.split_once('/')?;
    let (service, id) = pod.rsplit_once('-')?;
    id.strip_prefix('r')?.parse::<u32>().ok()?;
    Some(ObjectRef::new(service).within(namespace))
}

/// Runs the controller until `shutdown`: reconciles every ReplicatedService on changes
/// to it or its pods, on every membership change the GFD reports, and every RESYNC.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let (updates, mut received) = mpsc::unbounded_channel();
    tokio::spawn(membership::follow(ctx.gfd_local.clone(), updates, shutdown.clone()));
    let (triggers, trigger_stream) = mpsc::unbounded_channel::<ObjectRef<ReplicatedService>>();
    let view = Arc::clone(&ctx.membership);
    tokio::spawn(async move {
        while let Some(update) = received.recv().await {
            let event = view.lock().unwrap_or_else(|p| p.into_inner()).apply(update);
            if let Some(target) = event.as_ref().and_then(|e| service_of(&e.replica_id)) {
                let _ = triggers.send(target);
            }
        }
    });
    let services: Api<ReplicatedService> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={}", pods::MANAGED_BY));
    Controller::new(services, watcher::Config::default())
        .owns(pods, managed)
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(trigger_stream))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "reconcile error");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_ids_map_back_to_their_service() {
        let target = service_of("shop/my-cart-r12").expect("a replica of my-cart");
        assert_eq!((target.name.as_str(), target.namespace.as_deref()), ("my-cart", Some("shop")));
        assert!(service_of("shop/not-a-replica").is_none());
        assert!(service_of("no-namespace-r1").is_none());
    }
}
