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
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use tandem_replica::pb;
use tandem_replica::tls::{self, Authority};
use tandem_replica::wire::{Channels, unix_ms, within};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::certs;
use crate::crd::{Defaults, RECREATE_ANNOTATION, ReplicatedService, SwitchoverStatus};
use crate::membership::{self, MembershipView};
use crate::pods::{self, MEMBER_LABEL, PodSettings, REPLICA_LABEL, ROLE_LABEL, SERVICE_LABEL};
use crate::replicas::{self, CALL_TIMEOUT};
use crate::rm::{self, Action, Record, Restarts, Trouble};
use crate::rotation::{self, Rotation, Step, TEMPLATE_HASH_ANNOTATION, Why};
use crate::status;
use crate::switchover::{self, Ask, Outcome, Target};

pub const FIELD_MANAGER: &str = "tandem-operator";
/// Reconcile this often even without events (statuses, heartbeats, back-off timers).
const RESYNC: Duration = Duration::from_secs(2);
/// While the group is not whole, reconcile this often: replacements, joins and
/// failovers are paced by it.
const RESYNC_WHILE_HEALING: Duration = Duration::from_millis(500);
/// A switchover asked for and not decided yet (the RM had something else to do) is
/// asked again this soon.
const RESYNC_FOR_SWITCHOVER: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("cannot issue a certificate: {0}")]
    Certificate(#[from] tandem_replica::tls::TlsError),
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
    /// The record's parts that live in memory, per service (an operator restart
    /// starts them afresh): restart back-off, hung and terminating clocks, trouble.
    volatile: Mutex<HashMap<String, Volatile>>,
    /// Settings last pushed per service, so a change is pushed once.
    pushed: Mutex<HashMap<String, rm::Spec>>,
    /// Whether the API server serves policy/v1 PodDisruptionBudgets (1.21+).
    pdb_v1: bool,
    channels: Channels,
    /// Issues each replica pod's certificates (None: a plaintext internal plane).
    authority: Option<Arc<Authority>>,
}

/// The in-memory part of one service's record.
#[derive(Debug, Clone, Default)]
struct Volatile {
    outage_since: Option<u64>,
    restarts: BTreeMap<String, Restarts>,
    dead_since: BTreeMap<String, u64>,
    terminating_since: BTreeMap<String, u64>,
    trouble: Option<Trouble>,
    /// The member a rolling update (or certificate rotation) hands the primary's role
    /// to before it replaces the old primary; asked of the RM in the next round.
    planned_switchover: Option<String>,
    /// The switchover asked and not decided yet, and since when (unix ms): the RM waits
    /// a while for a target that is catching up.
    switchover_asked: Option<(String, u64)>,
}

impl Volatile {
    fn of(
        record: &Record,
        planned_switchover: Option<String>,
        switchover_asked: Option<(String, u64)>,
    ) -> Self {
        Self {
            outage_since: record.outage_since,
            restarts: record.restarts.clone(),
            dead_since: record.dead_since.clone(),
            terminating_since: record.terminating_since.clone(),
            trouble: record.trouble.clone(),
            planned_switchover,
            switchover_asked,
        }
    }

    fn restore(self, record: &mut Record) {
        record.outage_since = self.outage_since;
        record.restarts = self.restarts;
        record.dead_since = self.dead_since;
        record.terminating_since = self.terminating_since;
    }
}

impl Context {
    pub fn new(
        client: Client,
        defaults: Defaults,
        pod_settings: PodSettings,
        gfd_local: String,
        pdb_v1: bool,
        identity: String,
        authority: Option<Arc<Authority>>,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            pod_settings,
            gfd_local,
            membership: Arc::default(),
            volatile: Mutex::default(),
            pushed: Mutex::default(),
            pdb_v1,
            channels: Channels::replicas_internal(None),
            authority,
        }
    }

    /// Records an event about `rsvc`. `action` tells apart events of one reason that are
    /// not repeats (a new epoch, another pod): events with the same reason and action
    /// are counted as a series of the first, keeping its note.
    async fn event(
        &self,
        rsvc: &ReplicatedService,
        type_: EventType,
        reason: &str,
        action: String,
        note: String,
    ) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action, secondary: None };
        if let Err(error) = self.recorder.publish(&event, &rsvc.object_ref(&())).await {
            warn!(%error, reason, "could not record an event");
        }
    }
}

/// Each running pod's replica: (id, address).
fn targets(pods: &[Pod]) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| status::pod_running(p))
        .filter_map(|pod| Some((pod.labels().get(REPLICA_LABEL)?.clone(), status::pod_address(pod)?)))
        .collect()
}

/// One reconciliation of one ReplicatedService, in a span named after it.
pub async fn reconcile(rsvc: Arc<ReplicatedService>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = rsvc.namespace().ok_or_else(|| Error::NoNamespace(rsvc.name_any()))?;
    let span = tracing::info_span!("reconcile", service = %format!("{namespace}/{}", rsvc.name_any()));
    reconcile_service(rsvc, ctx, namespace).instrument(span).await
}

async fn reconcile_service(
    rsvc: Arc<ReplicatedService>,
    ctx: Arc<Context>,
    namespace: String,
) -> Result<Requeue, Error> {
    let name = rsvc.name_any();
    let key = format!("{namespace}/{name}");
    let mut spec = rsvc.spec.effective(&ctx.defaults);
    spec.recreate_lost_epoch =
        rsvc.annotations().get(RECREATE_ANNOTATION).and_then(|epoch| epoch.trim().parse().ok());
    let mut problems = spec.problems();
    problems.extend(rsvc.spec.problems());

    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pod_api.list(&ListParams::default().labels(&format!("{SERVICE_LABEL}={name}"))).await?.items;
    let statuses = replicas::statuses(&ctx.channels, &targets(&pods)).await;
    let membership = ctx.membership.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let volatile =
        ctx.volatile.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned().unwrap_or_default();
    let previous_trouble = volatile.trouble.clone();
    let planned = volatile.planned_switchover.clone();
    let earlier_ask = volatile.switchover_asked.clone();
    let mut record = status::record_from_status(rsvc.status.as_ref(), BTreeMap::new());
    volatile.restore(&mut record);
    let observed = status::observe(&rsvc, &pods, &membership, &statuses, &record);

    // A planned switchover: a new value of the annotation, else the one a rolling update
    // asked for last round. The RM decides it with everything else.
    let asked = switchover_request(&rsvc);
    let ask = match &asked {
        Some((value, Ok(target))) => Some((format!("annotation {value}"), target.clone())),
        Some((_, Err(_))) => None,
        None => planned.clone().map(|to| (format!("rolling update to {to}"), Target::Replica(to))),
    };
    let ask = ask.map(|(key, target)| {
        let since = earlier_ask.filter(|(earlier, _)| *earlier == key).map_or_else(unix_ms, |(_, at)| at);
        (key, since, target)
    });
    record.switchover = ask.as_ref().map(|(_, since, target)| Ask::new(target.clone(), *since));
    let actions = if problems.is_empty() {
        rm::reconcile(&spec, &mut record, &observed, membership.known(), unix_ms())
    } else {
        Vec::new()
    };
    let decided = record.switchover.take().and_then(|ask| ask.outcome);
    let undecided = ask.filter(|_| decided.is_none()).map(|(key, since, _)| (key, since));
    // A rolling update's switchover stays asked until the RM decides it.
    let mut planned = if asked.is_none() && decided.is_some() { None } else { planned };

    // Pods to replace one at a time (certificates due, an old pod template), only when
    // the RM has nothing else to do and the group is whole (`rotation::next` checks
    // both), and never under a spec the RM does not act on (nothing would recreate them).
    let template = rotation::template_hash(&rsvc.spec, &ctx.defaults);
    let outdated = outdated_pods(&pods, &template, rsvc.spec.image(&ctx.defaults));
    let step = problems.is_empty().then(|| {
        let certificates: Vec<_> = match &ctx.authority {
            Some(_) => pods.iter().filter_map(pods::pod_certificate).collect(),
            None => Vec::new(),
        };
        let (known, now_s) = (membership.known(), unix_ms() as i64 / 1000);
        rotation::next(&spec, &record, &observed, known, &actions, &certificates, &outdated, now_s)
    });
    let step = step.flatten().filter(|_| decided.is_none() && planned.is_none());
    if let Some(Step::SwitchOver { to, .. }) = &step {
        planned = Some(to.clone());
    }
    ctx.volatile
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), Volatile::of(&record, planned.clone(), undecided));

    // Record first: the status write is the commit point of a new configuration (and of
    // the switchover request it answers: a request is acted on once).
    let mut new_status =
        status::build_status(&rsvc, &spec, &problems, &record, &observed, &statuses, &membership, unix_ms());
    let previous = rsvc.status.clone().unwrap_or_default();
    new_status.last_switchover = switchover_status(&rsvc, &asked, decided.as_ref(), unix_ms());
    show_rollout(&mut new_status, &previous, &pods, &outdated, step.as_ref());
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
        ctx.event(&rsvc, EventType::Warning, "InvalidSpec", "Validate".into(), problems.join("; ")).await;
    }

    if record.trouble != previous_trouble
        && let Some(trouble) = &record.trouble
    {
        warn!(service = %name, "{trouble}");
        let note = status::trouble_message(trouble, &rsvc);
        ctx.event(&rsvc, EventType::Warning, trouble.reason(), "Report".into(), note).await;
    }

    report_switchover(&rsvc, &ctx, &asked, decided.as_ref()).await;
    for action in actions {
        act(&rsvc, &ctx, &spec, &pods, action).await?;
    }
    let rotating = step.is_some();
    match step {
        Some(Step::Replace(rotation)) => replace_pod(&rsvc, &ctx, rotation).await?,
        Some(Step::SwitchOver { from, to, why }) => {
            let name = rsvc.name_any();
            let (from, to) = (pods::pod_name(&name, &from), pods::pod_name(&name, &to));
            let note = format!("{from}, the primary, hands its role to {to} before it is replaced");
            info!(service = %name, "{note}");
            ctx.event(&rsvc, EventType::Normal, why_reason(&why), format!("Switch over from {from}"), note)
                .await;
        }
        None => {}
    }
    delete_finished_pods(&pod_api, &pods).await;
    if problems.is_empty() {
        delete_unused_claims(&rsvc, &ctx, &record, &pods).await;
    }
    if let Some(config) = &record.config {
        let behind: Vec<(String, String)> =
            targets(&pods).into_iter().filter(|(id, _)| replicas::lacks(statuses.get(id), config)).collect();
        replicas::push_configuration(&ctx.channels, config, &behind).await;
    }
    push_settings(&ctx, &key, &spec, &statuses, &pods).await;
    label_roles(&pod_api, &record, &pods).await;
    ensure_services(&rsvc, &ctx, &namespace, &spec).await?;
    // A pod just deleted leaves the group short from now on.
    let whole = !rotating && rm::whole(&spec, &record, &observed, membership.known());
    let waiting = asked.as_ref().is_some_and(|(_, target)| target.is_ok()) && decided.is_none();
    Ok(Requeue::requeue(if problems.is_empty() && (planned.is_some() || waiting) {
        RESYNC_FOR_SWITCHOVER
    } else if whole {
        RESYNC
    } else {
        RESYNC_WHILE_HEALING
    }))
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
            let note = replicas::describe_configuration(&config, &reason, |id| pods::pod_name(&name, id));
            info!(service = %name, "{note}");
            let kind = if reason.is_failover() {
                "Failover"
            } else if reason.switched_over.is_some() {
                "Switchover"
            } else {
                "Reconfigured"
            };
            ctx.event(rsvc, EventType::Normal, kind, format!("Install epoch {}", config.epoch), note).await;
        }
        Action::Start { id, bootstrap, attempt } => {
            let pod_name = pods::pod_name(&name, &id);
            if pods.iter().any(|p| p.name_any() == pod_name) {
                // The old pod is still on its way out; the RM asks again once it is gone.
                return Ok(());
            }
            // Admission refuses a pod whose ServiceAccount does not exist yet, and the
            // kubelet starts none whose Secret does not.
            ensure_replica_account(rsvc, ctx, &namespace).await?;
            ensure_client_secret(rsvc, ctx, &namespace).await?;
            ensure_data_claim(rsvc, ctx, &namespace, &id).await?;
            let not_after = issue_certificates(rsvc, ctx, &namespace, &id).await?;
            let peers: Vec<String> =
                pods.iter().filter(|p| status::pod_running(p)).filter_map(status::pod_address).collect();
            let mut pod =
                pods::replica_pod(rsvc, &ctx.defaults, &ctx.pod_settings, spec, &id, bootstrap, &peers);
            if let Some(not_after) = not_after {
                pods::set_certificate_not_after(&mut pod, not_after);
            }
            let template = rotation::template_hash(&rsvc.spec, &ctx.defaults);
            pod.metadata
                .annotations
                .get_or_insert_default()
                .insert(TEMPLATE_HASH_ANNOTATION.into(), template);
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
                    format!(
                        "recreated {pod_name} (attempt {attempt}); {}",
                        if spec.durability.on_disk() {
                            "it recovers its data from its volume, then catches up"
                        } else {
                            "it rejoins through a checkpoint"
                        }
                    ),
                )
            } else {
                (
                    "Created",
                    format!("created {pod_name}{}", if bootstrap { " for the new group" } else { "" }),
                )
            };
            info!(service = %name, "{note}");
            ctx.event(rsvc, EventType::Normal, reason, format!("Create {pod_name}"), note).await;
        }
        Action::Stop { id, reason } => {
            let pod_name = pods::pod_name(&name, &id);
            delete_pod(ctx, &namespace, &pod_name).await?;
            let note = format!("deleted {pod_name}: {reason}");
            ctx.event(rsvc, EventType::Normal, "Removed", format!("Delete {pod_name}"), note).await;
        }
        Action::Forget { .. } => {}
    }
    Ok(())
}

/// The replica's data volume claim (`spec.storage`), created before its first pod and
/// kept for its later ones: a recreated pod finds the replica's data there.
async fn ensure_data_claim(
    rsvc: &ReplicatedService,
    ctx: &Context,
    namespace: &str,
    id: &str,
) -> Result<(), Error> {
    let Some(claim) = pods::data_claim(rsvc, id) else { return Ok(()) };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    match claims
        .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }, &claim)
        .await
    {
        Ok(_) => {
            let note = format!("created {} for replica {id}'s data", claim.name_any());
            ctx.event(rsvc, EventType::Normal, "ClaimCreated", format!("Create {}", claim.name_any()), note)
                .await;
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// How old an unused claim must be before it is deleted (pods and claims are listed at
/// different moments; a claim is made just before its pod).
const CLAIM_GRACE_S: i64 = 60;

/// Deletes the data claims of replicas gone for good (neither a member, nor running,
/// nor being restarted), when the retention policy says so (`whenScaled: Delete`, the
/// default): a replica replaced under a new id, or removed by a scale-down, leaves no
/// volume behind. A member's claim is never touched: its data may be all that is left.
async fn delete_unused_claims(rsvc: &ReplicatedService, ctx: &Context, record: &Record, pods: &[Pod]) {
    let Some(storage) = &rsvc.spec.storage else { return };
    // A group being founded has no members yet, and its claims are all needed.
    if record.config.is_none() || !storage.retention_policy.clone().unwrap_or_default().delete_when_scaled() {
        return;
    }
    let namespace = rsvc.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let listed = match claims
        .list(&ListParams::default().labels(&format!("{SERVICE_LABEL}={}", rsvc.name_any())))
        .await
    {
        Ok(listed) => listed.items,
        Err(error) => {
            warn!(service = %rsvc.name_any(), %error, "could not list the data claims; retrying later");
            return;
        }
    };
    let needed = |id: &str| {
        record.config.as_ref().is_some_and(|c| c.has_member(id))
            || record.restarts.contains_key(id)
            || pods.iter().any(|p| p.labels().get(REPLICA_LABEL).is_some_and(|r| r == id))
    };
    for claim in listed {
        let Some(id) = claim.labels().get(REPLICA_LABEL).cloned() else { continue };
        // A claim made for a pod not yet listed (created this round) is young: only a
        // claim unused for a while is gone for good.
        let age_s = claim
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| unix_ms() as i64 / 1000 - t.0.as_second());
        if needed(&id) || claim.metadata.deletion_timestamp.is_some() || age_s < CLAIM_GRACE_S {
            continue;
        }
        match claims.delete(&claim.name_any(), &DeleteParams::default()).await {
            Ok(_) => {
                let note = format!(
                    "deleted {}: replica {id} is gone for good (retentionPolicy.whenScaled: Delete)",
                    claim.name_any()
                );
                info!(service = %rsvc.name_any(), "{note}");
                ctx.event(
                    rsvc,
                    EventType::Normal,
                    "ClaimDeleted",
                    format!("Delete {}", claim.name_any()),
                    note,
                )
                .await;
            }
            Err(error) => {
                warn!(claim = %claim.name_any(), %error, "could not delete a data claim; retrying later")
            }
        }
    }
}

/// Deletes a replica pod and the Secret of its certificates (a new pod gets new ones).
async fn delete_pod(ctx: &Context, namespace: &str, pod_name: &str) -> Result<(), Error> {
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    match pod_api.delete(pod_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    if ctx.authority.is_some() {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        match secrets.delete(&pods::tls_secret_name(pod_name), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// The event reason of a replacement.
fn why_reason(why: &Why) -> &'static str {
    match why {
        Why::Certificate { .. } => "CertificateRotation",
        Why::Template => "RollingUpdate",
        Why::Expiring { .. } => "CertificateExpiring",
    }
}

/// Carries out a replacement (certificates due, or an old pod template): the pod goes,
/// and the RM replaces it as it does any lost member through `Action::Start`, which
/// issues the new pod new certificates and gives it the current template.
async fn replace_pod(rsvc: &ReplicatedService, ctx: &Context, rotation: Rotation) -> Result<(), Error> {
    let namespace = rsvc.namespace().unwrap_or_default();
    let pod_name = pods::pod_name(&rsvc.name_any(), &rotation.id);
    let now = unix_ms() as i64 / 1000;
    let primary = if rotation.primary { ", the primary, after a failover" } else { "" };
    let (note, action) = match &rotation.why {
        Why::Certificate { not_after, due_since } => (
            format!(
                "replacing {pod_name}{primary} to renew its certificates (they expire in {} s; due for renewal since {} s ago)",
                not_after - now,
                now - due_since,
            ),
            format!("Replace {pod_name} for certificates expiring at {not_after}"),
        ),
        Why::Template => (
            format!("replacing {pod_name}{primary}: its pod template is not the spec's (rolling update)"),
            format!("Replace {pod_name} for template {}", rotation::template_hash(&rsvc.spec, &ctx.defaults)),
        ),
        Why::Expiring { not_after } => (
            format!(
                "replacing {pod_name}{primary} without waiting for the group to be whole: its certificates {}, and a member whose certificates expired cannot open connections (the group could not take a new member). Look for why rotation waited: kubectl describe rsvc {}",
                match not_after - now {
                    left if left > 0 => format!("expire in {left} s"),
                    left => format!("expired {} s ago", -left),
                },
                rsvc.name_any(),
            ),
            format!("Replace {pod_name} for certificates expiring at {not_after}"),
        ),
    };
    let urgent = matches!(rotation.why, Why::Expiring { .. });
    if urgent {
        warn!(service = %rsvc.name_any(), "{note}");
    } else {
        info!(service = %rsvc.name_any(), "{note}");
    }
    delete_pod(ctx, &namespace, &pod_name).await?;
    let kind = if urgent { EventType::Warning } else { EventType::Normal };
    ctx.event(rsvc, kind, why_reason(&rotation.why), action, note).await;
    Ok(())
}

/// The ids of running replica pods not on the spec's template: their hash annotation
/// differs, or (pods made before the hash was recorded) their image does.
fn outdated_pods(pods: &[Pod], template: &str, image: &str) -> Vec<String> {
    pods.iter()
        .filter(|p| status::pod_running(p))
        .filter(|pod| match pod.annotations().get(TEMPLATE_HASH_ANNOTATION) {
            Some(hash) => hash != template,
            None => pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.as_deref())
                .is_some_and(|running| running != image),
        })
        .filter_map(|pod| pod.labels().get(REPLICA_LABEL).cloned())
        .collect()
}

/// A switchover asked with the annotation and not acted on yet: its value and target.
fn switchover_request(rsvc: &ReplicatedService) -> Option<(String, Result<Target, String>)> {
    let value = rsvc.annotations().get(switchover::ANNOTATION)?.trim().to_owned();
    let handled = rsvc.status.as_ref().and_then(|s| s.last_switchover.as_ref()).map(|s| s.request.as_str());
    if handled == Some(value.as_str()) {
        return None;
    }
    // A pod name names its replica.
    let id = value.strip_prefix(&format!("{}-", rsvc.name_any())).unwrap_or(&value);
    Some((value.clone(), Target::parse(id)))
}

/// `status.lastSwitchover` after this round: what was decided, and the annotation value
/// acted on (cleared once the annotation is gone, so that value may be used again).
fn switchover_status(
    rsvc: &ReplicatedService,
    asked: &Option<(String, Result<Target, String>)>,
    decided: Option<&Outcome>,
    now_ms: u64,
) -> Option<SwitchoverStatus> {
    let mut last = rsvc.status.as_ref().and_then(|s| s.last_switchover.clone());
    if !rsvc.annotations().contains_key(switchover::ANNOTATION)
        && let Some(last) = last.as_mut()
    {
        last.request.clear();
    }
    let request = match asked {
        Some((value, _)) => value.clone(),
        None => last.as_ref().map(|s| s.request.clone()).unwrap_or_default(),
    };
    let name = |id: &str| pods::pod_name(&rsvc.name_any(), id);
    let time = Some(Time(Timestamp::from_millisecond(now_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH)));
    let new = match (asked, decided) {
        (Some((_, Err(bad))), _) => SwitchoverStatus {
            request,
            result: "Refused".into(),
            message: format!("{}: {bad}", switchover::ANNOTATION),
            time,
            ..SwitchoverStatus::default()
        },
        (_, Some(Outcome::Done { from, to, epoch })) => SwitchoverStatus {
            request,
            result: "Done".into(),
            from: name(from),
            to: name(to),
            epoch: *epoch as i64,
            time,
            message: format!("switched over from {} to {} in epoch {epoch}", name(from), name(to)),
        },
        (_, Some(Outcome::AlreadyPrimary { id, epoch })) => SwitchoverStatus {
            request,
            result: "AlreadyPrimary".into(),
            from: name(id),
            to: name(id),
            epoch: *epoch as i64,
            time,
            message: format!("{} is the primary already", name(id)),
        },
        (_, Some(Outcome::Refused(refusal))) => SwitchoverStatus {
            request,
            result: "Refused".into(),
            time,
            message: refusal.to_string(),
            ..SwitchoverStatus::default()
        },
        (_, None) => return last,
    };
    Some(new)
}

/// Events for a switchover that did not install anything (a done one is announced by
/// its configuration's `Switchover` event).
async fn report_switchover(
    rsvc: &ReplicatedService,
    ctx: &Context,
    asked: &Option<(String, Result<Target, String>)>,
    decided: Option<&Outcome>,
) {
    let what = match asked {
        Some((value, _)) => format!("{}={value}", switchover::ANNOTATION),
        None => "the rolling update's switchover".to_owned(),
    };
    let (type_, reason, note) = match (asked, decided) {
        (Some((_, Err(bad))), _) => (EventType::Warning, "SwitchoverRefused", format!("{what}: {bad}")),
        (_, Some(Outcome::Refused(refusal))) => {
            (EventType::Warning, "SwitchoverRefused", format!("{what} refused: {refusal}"))
        }
        (_, Some(outcome @ Outcome::AlreadyPrimary { .. })) => {
            (EventType::Normal, "Switchover", format!("{what}: {outcome}"))
        }
        _ => return,
    };
    warn!(service = %rsvc.name_any(), "{note}");
    ctx.event(rsvc, type_, reason, format!("Switchover {what}"), note).await;
}

/// `updatedReplicas`, and the Progressing condition while a rolling update runs.
fn show_rollout(
    status: &mut crate::crd::ReplicatedServiceStatus,
    previous: &crate::crd::ReplicatedServiceStatus,
    pods: &[Pod],
    outdated: &[String],
    step: Option<&Step>,
) {
    let running =
        pods.iter().filter(|p| status::pod_running(p) && p.labels().contains_key(REPLICA_LABEL)).count();
    status.updated_replicas = Some(running.saturating_sub(outdated.len()) as i32);
    if outdated.is_empty() {
        return;
    }
    let Some(progressing) = status.conditions.iter_mut().find(|c| c.type_ == "Progressing") else { return };
    let doing = match step {
        Some(Step::Replace(rotation)) => format!("; replacing {}", rotation.id),
        Some(Step::SwitchOver { from, to, .. }) => format!("; switching {from} over to {to}"),
        None => "; waiting for the group to be whole".into(),
    };
    let mut old = outdated.to_vec();
    old.sort();
    progressing.message = format!(
        "rolling update: {} of {running} replica pods on the spec's template (old: {}){doing}",
        running - outdated.len().min(running),
        old.join(", "),
    );
    progressing.reason = "RollingUpdate".into();
    if progressing.status != "True" {
        progressing.status = "True".into();
        if let Some(before) =
            previous.conditions.iter().find(|c| c.type_ == "Progressing" && c.status == "True")
        {
            progressing.last_transition_time = before.last_transition_time.clone();
        }
    }
}

/// Deletes pods that finished (evicted, failed): they hold their name, so the replica
/// cannot be recreated under it until they are gone.
async fn delete_finished_pods(pod_api: &Api<Pod>, pods: &[Pod]) {
    for pod in pods.iter().filter(|p| status::pod_finished(p)) {
        if let Err(error) = pod_api.delete(&pod.name_any(), &DeleteParams::default()).await {
            warn!(pod = %pod.name_any(), %error, "could not delete a finished pod; retrying later");
        }
    }
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
    }) && let Ok(channel) = tandem_replica::wire::dial_internal(&ctx.gfd_local, None)
    {
        let (namespace, name) = key.split_once('/').unwrap_or_default();
        let settings = pb::DetectorSettings {
            heartbeat_interval_ms: Some(spec.heartbeat_interval_ms),
            failure_threshold: Some(spec.failure_threshold),
            gfd_heartbeat_interval_ms: None,
            replica_prefix: format!("{}-", pods::detector_id(namespace, name)),
        };
        let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(channel);
        if let Err(error) = within(CALL_TIMEOUT, gfd.update_detector_settings(settings)).await {
            warn!(service = key, error = %error.message(), "could not push the heartbeat settings to the GFD; retrying");
            // Not recorded as pushed: the next reconciliation tries again.
            return;
        }
    }
    let checkpoint_changed =
        last.as_ref().is_some_and(|l| l.checkpoint_interval_ms != spec.checkpoint_interval_ms);
    let stale: Vec<(String, String)> = targets(pods)
        .into_iter()
        .filter(|(id, _)| {
            statuses.get(id).is_some_and(|replica| {
                replica.gfd_address != ctx.pod_settings.gfd_address
                    || checkpoint_changed
                    || replica.checkpoint_interval_ms != spec.checkpoint_interval_ms
            })
        })
        .collect();
    let update = pb::Settings {
        checkpoint_interval_ms: Some(spec.checkpoint_interval_ms),
        gfd_address: Some(ctx.pod_settings.gfd_address.clone()),
        // Set once, at the pod's start (TANDEM_SESSION_EXPIRY_MS).
        session_expiry_ms: None,
    };
    replicas::push_settings(&ctx.channels, &update, &stale).await;
    ctx.pushed.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), spec.clone());
}

/// Keeps each pod's role and member labels in line with the configuration (the client
/// Service selects on them).
async fn label_roles(pod_api: &Api<Pod>, record: &rm::Record, pods: &[Pod]) {
    let config = record.config.as_ref();
    for pod in pods.iter().filter(|p| status::pod_running(p)) {
        let Some(id) = pod.labels().get(REPLICA_LABEL) else { continue };
        let role = pods::role_label(config, id);
        let member = if config.is_some_and(|c| c.has_member(id)) { "true" } else { "false" };
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

/// The replicas' ServiceAccount (no bindings, no token), applied before each pod is
/// created: one call per pod start, and a deleted account comes back with the next pod.
async fn ensure_replica_account(
    rsvc: &ReplicatedService,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let account = pods::replica_service_account(rsvc);
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    accounts.patch(&account.name_any(), &apply, &Patch::Apply(&account)).await?;
    Ok(())
}

/// The Secret the service's clients read (`ca.crt`, and `token` when the group asks
/// for one), made before the first pod that mounts it. An existing token is kept:
/// clients hold it.
async fn ensure_client_secret(rsvc: &ReplicatedService, ctx: &Context, namespace: &str) -> Result<(), Error> {
    let settings = &ctx.pod_settings;
    let Some(authority) = ctx.authority.as_ref().filter(|_| settings.client_tls || settings.client_token)
    else {
        return Ok(());
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = pods::client_secret_name(&rsvc.name_any());
    let existing = secrets.get_opt(&name).await?;
    let data = existing.as_ref().and_then(|s| s.data.clone()).unwrap_or_default();
    let held_token = data.get("token").and_then(|t| String::from_utf8(t.0.clone()).ok());
    let has_ca = data.get("ca.crt").is_some_and(|ca| ca.0 == authority.ca_pem().as_bytes());
    if existing.is_some() && has_ca && (held_token.is_some() || !settings.client_token) {
        return Ok(());
    }
    let token = settings.client_token.then(|| held_token.unwrap_or_else(tandem_replica::tls::new_token));
    let secret = pods::client_secret(rsvc, authority.ca_pem(), token.as_deref());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    secrets.patch(&name, &apply, &Patch::Apply(&secret)).await?;
    Ok(())
}

/// A new pair of certificates (replica and LFD) for the pod of replica `id`, in its
/// Secret, applied before the pod is created: every pod gets keys of its own. Returns
/// when the first of them expires (unix seconds), None without TLS.
async fn issue_certificates(
    rsvc: &ReplicatedService,
    ctx: &Context,
    namespace: &str,
    id: &str,
) -> Result<Option<i64>, Error> {
    let Some(authority) = &ctx.authority else { return Ok(None) };
    let detector = pods::detector_id(namespace, &pods::pod_name(&rsvc.name_any(), id));
    let (replica, lfd) = certs::issue_pod(authority, &pods::group_name(rsvc), id, &detector)?;
    let secret = pods::tls_secret(rsvc, id, &replica, &lfd);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    secrets.patch(&secret.name_any(), &apply, &Patch::Apply(&secret)).await?;
    let not_after = tls::not_after(&replica.cert)?.min(tls::not_after(&lfd.cert)?);
    Ok(Some(not_after))
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
        .and_then(|m| m.parse().ok())
        .unwrap_or(spec.mode);
    for service in [pods::client_service(rsvc, mode), pods::peer_service(rsvc)] {
        services.patch(&service.name_any(), &apply, &Patch::Apply(&service)).await?;
    }
    if ctx.pdb_v1 {
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
        let budget = pods::disruption_budget(rsvc, spec.replicas);
        budgets.patch(&budget.name_any(), &apply, &Patch::Apply(&budget)).await?;
    } else {
        let resource =
            ApiResource::from_gvk(&GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"));
        let budgets: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
        budgets
            .patch(
                &rsvc.name_any(),
                &apply,
                &Patch::Apply(&pods::disruption_budget_v1beta1(rsvc, spec.replicas)),
            )
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
    if let Err(error) = membership::follow(&ctx.gfd_local, updates, shutdown.clone()) {
        // The GFD sidecar's address comes from the operator's own settings.
        warn!(%error, "cannot follow the GFD: membership stays unknown, only pod deletions count as failures");
    }
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
mod fixtures;

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
