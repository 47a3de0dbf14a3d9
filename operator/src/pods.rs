//! What the operator creates for a `ReplicatedService`, as pure functions of the resource
//! and the operator's settings: one Pod per replica (replica container + LFD sidecar), the
//! client Service, the headless peer Service, and the PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector,
    Pod, PodSecurityContext, PodSpec, Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tandem_replica::pb::Mode;

use crate::crd::{Defaults, ReplicatedService};
use crate::rm::Spec;

/// The gRPC port of every replica (pods have their own IPs, so one port fits all).
pub const REPLICA_PORT: u16 = 7000;
pub const SERVICE_LABEL: &str = "tandem.dev/service";
pub const REPLICA_LABEL: &str = "tandem.dev/replica";
pub const ROLE_LABEL: &str = "tandem.dev/role";
pub const MEMBER_LABEL: &str = "tandem.dev/member";
pub const MANAGED_BY: &str = "tandem-operator";

/// Where the replica pods find the GFD, and how they log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub gfd_address: String,
    pub log_level: String,
    /// How long the replicas remember an idle client session, ms.
    pub session_expiry_ms: u64,
}

pub fn pod_name(service: &str, id: &str) -> String {
    format!("{service}-{id}")
}

/// The GFD knows replicas by `namespace/pod`, unique across services.
pub fn detector_id(namespace: &str, pod: &str) -> String {
    format!("{namespace}/{pod}")
}

/// Metadata of an object the service owns (deleted with it), named `name`.
fn owned_metadata(rsvc: &ReplicatedService, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: rsvc.namespace(),
        labels: Some(common_labels(&rsvc.name_any())),
        owner_references: Some(vec![owner(rsvc)]),
        ..ObjectMeta::default()
    }
}

fn owner(rsvc: &ReplicatedService) -> OwnerReference {
    rsvc.controller_owner_ref(&()).expect("a ReplicatedService read from the API server has a name and uid")
}

pub fn selector_labels(service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(SERVICE_LABEL.to_owned(), service.to_owned())])
}

fn common_labels(service: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(service);
    labels.insert("app.kubernetes.io/name".into(), "tandem".into());
    labels.insert("app.kubernetes.io/instance".into(), service.into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels
}

/// The role label of a replica in a configuration: primary, backup, or joining.
pub fn role_label(config: Option<&tandem_replica::pb::Configuration>, id: &str) -> &'static str {
    match config {
        Some(c) if c.primary == id => "primary",
        Some(c) if c.has_member(id) => "backup",
        _ => "joining",
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The Pod of replica `id`: the replica and its LFD, sharing the `run` volume.
/// `bootstrap`: it is one of the first replicas of a new group. `peers`: addresses of the
/// other replicas, to learn the configuration from at start.
pub fn replica_pod(
    rsvc: &ReplicatedService,
    defaults: &Defaults,
    settings: &PodSettings,
    spec: &Spec,
    id: &str,
    bootstrap: bool,
    peers: &[String],
) -> Pod {
    let name = pod_name(&rsvc.name_any(), id);
    let overrides = rsvc.spec.pod_template.clone().unwrap_or_default();
    let mut metadata = owned_metadata(rsvc, &name);
    let labels = metadata.labels.get_or_insert_default();
    labels.insert(REPLICA_LABEL.into(), id.into());
    labels.insert(ROLE_LABEL.into(), "joining".into());
    labels.insert(MEMBER_LABEL.into(), "false".into());
    labels.extend(overrides.labels.clone().unwrap_or_default());
    let image = rsvc.spec.image(defaults);
    let detector = detector_id(&rsvc.namespace().unwrap_or_default(), &name);
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![
                replica_container(rsvc, image, settings, spec, id, bootstrap, peers),
                lfd_container(image, settings, spec, &detector),
            ],
            // The kubelet restarts a crashed container in place; the replica then rejoins
            // (its marker in the `run` volume stops it from bootstrapping twice). The RM
            // decides when a whole pod is recreated.
            restart_policy: Some("Always".into()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65534),
                run_as_group: Some(65534),
                ..PodSecurityContext::default()
            }),
            termination_grace_period_seconds: Some(5),
            node_selector: overrides.node_selector,
            tolerations: overrides.tolerations,
            priority_class_name: overrides.priority_class_name,
            volumes: Some(vec![Volume {
                name: RUN_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

const RUN_VOLUME: &str = "run";
const RUN_DIR: &str = "/var/run/tandem";

fn replica_container(
    rsvc: &ReplicatedService,
    image: &str,
    settings: &PodSettings,
    spec: &Spec,
    id: &str,
    bootstrap: bool,
    peers: &[String],
) -> Container {
    let mut replica_env = vec![
        env_from_field("POD_IP", "status.podIP"),
        env("TANDEM_REPLICA_ID", id),
        env("TANDEM_LISTEN", format!("0.0.0.0:{REPLICA_PORT}")),
        env("TANDEM_ADVERTISE", format!("$(POD_IP):{REPLICA_PORT}")),
        env("TANDEM_CHECKPOINT_INTERVAL_MS", spec.checkpoint_interval_ms.to_string()),
        env("TANDEM_STATE_DIR", RUN_DIR),
        env("TANDEM_LOG", settings.log_level.clone()),
        env("TANDEM_GFD", settings.gfd_address.clone()),
        env("TANDEM_SESSION_EXPIRY_MS", settings.session_expiry_ms.to_string()),
    ];
    if bootstrap {
        replica_env.push(env("TANDEM_BOOTSTRAP", "true"));
    }
    if !peers.is_empty() {
        replica_env.push(env("TANDEM_PEERS", peers.join(",")));
    }
    Container {
        name: "replica".into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["replica".into()]),
        env: Some(replica_env),
        ports: Some(vec![ContainerPort {
            name: Some("grpc".into()),
            container_port: i32::from(REPLICA_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(readiness_probe()),
        resources: rsvc.spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: RUN_VOLUME.into(),
            mount_path: RUN_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// `tandem health` in the pod. An exec probe starts a process in the pod: not every
/// second, or a small node spends its time starting them. Failover never waits for it
/// (the LFD does).
fn readiness_probe() -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "tandem".into(),
                "health".into(),
                "--address".into(),
                format!("127.0.0.1:{REPLICA_PORT}"),
            ]),
        }),
        period_seconds: Some(3),
        timeout_seconds: Some(1),
        failure_threshold: Some(2),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

/// The LFD: heartbeats the replica over loopback, reports to the GFD as `detector_id`.
fn lfd_container(image: &str, settings: &PodSettings, spec: &Spec, detector_id: &str) -> Container {
    let quantity = |q: &str| k8s_openapi::apimachinery::pkg::api::resource::Quantity(q.into());
    Container {
        name: "lfd".into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["lfd".into()]),
        env: Some(vec![
            env("TANDEM_REPLICA_ID", detector_id),
            env("TANDEM_REPLICA_ADDRESS", format!("127.0.0.1:{REPLICA_PORT}")),
            env("TANDEM_GFD", settings.gfd_address.clone()),
            env("TANDEM_HEARTBEAT_INTERVAL_MS", spec.heartbeat_interval_ms.to_string()),
            env("TANDEM_FAILURE_THRESHOLD", spec.failure_threshold.to_string()),
            env("TANDEM_LOG", settings.log_level.clone()),
        ]),
        resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), quantity("10m")),
                ("memory".into(), quantity("16Mi")),
            ])),
            ..Default::default()
        }),
        ..Container::default()
    }
}

/// The client Service: the primary in passive mode, every ready member in active mode.
pub fn client_service(rsvc: &ReplicatedService, mode: Mode) -> Service {
    let service = rsvc.name_any();
    let mut selector = selector_labels(&service);
    match mode {
        Mode::Active => selector.insert(MEMBER_LABEL.into(), "true".into()),
        _ => selector.insert(ROLE_LABEL.into(), "primary".into()),
    };
    Service {
        metadata: owned_metadata(rsvc, &service),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![grpc_port()]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn grpc_port() -> ServicePort {
    ServicePort {
        name: Some("grpc".into()),
        port: i32::from(REPLICA_PORT),
        target_port: Some(IntOrString::Int(i32::from(REPLICA_PORT))),
        // Spelled out: server-side apply on older API servers needs every list key.
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The headless Service over every replica pod, ready or not.
pub fn peer_service(rsvc: &ReplicatedService) -> Service {
    let service = rsvc.name_any();
    Service {
        metadata: owned_metadata(rsvc, &format!("{service}-peers")),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&service)),
            ports: Some(vec![grpc_port()]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// At most one replica voluntarily disrupted at a time (policy/v1).
pub fn disruption_budget(rsvc: &ReplicatedService) -> PodDisruptionBudget {
    let service = rsvc.name_any();
    PodDisruptionBudget {
        metadata: owned_metadata(rsvc, &service),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&service)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The same budget as policy/v1beta1, for API servers older than 1.21.
pub fn disruption_budget_v1beta1(rsvc: &ReplicatedService) -> serde_json::Value {
    let budget = disruption_budget(rsvc);
    json!({
        "apiVersion": "policy/v1beta1",
        "kind": "PodDisruptionBudget",
        "metadata": budget.metadata,
        "spec": budget.spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ReplicatedServiceSpec;

    fn rsvc() -> ReplicatedService {
        let mut rsvc = ReplicatedService::new("demo", ReplicatedServiceSpec::default());
        rsvc.metadata.namespace = Some("shop".into());
        rsvc.metadata.uid = Some("uid-1".into());
        rsvc
    }

    fn defaults() -> Defaults {
        Defaults { image: "tandem:dev".into(), spec: Spec::default() }
    }

    fn settings() -> PodSettings {
        PodSettings {
            gfd_address: "10.0.0.5:7100".into(),
            log_level: "info".into(),
            session_expiry_ms: 60_000,
        }
    }

    fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
        container.env.as_ref()?.iter().find(|e| e.name == name)?.value.as_deref()
    }

    #[test]
    fn replica_pod_has_the_replica_and_its_lfd_owned_by_the_service() {
        let pod = replica_pod(
            &rsvc(),
            &defaults(),
            &settings(),
            &Spec::default(),
            "r2",
            false,
            &["10.1.0.3:7000".into()],
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-r2"));
        let labels = pod.metadata.labels.clone().expect("labels");
        assert_eq!((labels[SERVICE_LABEL].as_str(), labels[REPLICA_LABEL].as_str()), ("demo", "r2"));
        assert_eq!(pod.metadata.owner_references.expect("owner")[0].controller, Some(true));
        let spec = pod.spec.expect("spec");
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["replica", "lfd"]);
        let (replica, lfd) = (&spec.containers[0], &spec.containers[1]);
        assert_eq!(env_value(replica, "TANDEM_BOOTSTRAP"), None, "a replacement joins");
        assert_eq!(env_value(replica, "TANDEM_PEERS"), Some("10.1.0.3:7000"));
        assert_eq!(env_value(replica, "TANDEM_ADVERTISE"), Some("$(POD_IP):7000"));
        assert!(
            replica.readiness_probe.as_ref().and_then(|p| p.exec.as_ref()).is_some(),
            "readiness from grpc.health"
        );
        assert_eq!(env_value(lfd, "TANDEM_REPLICA_ID"), Some("shop/demo-r2"));
        assert_eq!(env_value(lfd, "TANDEM_GFD"), Some("10.0.0.5:7100"));
        assert_eq!(env_value(lfd, "TANDEM_HEARTBEAT_INTERVAL_MS"), Some("100"));
    }

    #[test]
    fn first_replicas_bootstrap_and_the_spec_reaches_the_pod() {
        let mut resource = rsvc();
        resource.spec.image = Some("registry.example/tandem:1.2".into());
        let spec = Spec { heartbeat_interval_ms: 250, checkpoint_interval_ms: 900, ..Spec::default() };
        let pod = replica_pod(&resource, &defaults(), &settings(), &spec, "r1", true, &[]);
        let containers = pod.spec.expect("spec").containers;
        assert_eq!(containers[0].image.as_deref(), Some("registry.example/tandem:1.2"));
        assert_eq!(env_value(&containers[0], "TANDEM_BOOTSTRAP"), Some("true"));
        assert_eq!(env_value(&containers[0], "TANDEM_CHECKPOINT_INTERVAL_MS"), Some("900"));
        assert_eq!(env_value(&containers[0], "TANDEM_SESSION_EXPIRY_MS"), Some("60000"));
        assert_eq!(env_value(&containers[1], "TANDEM_HEARTBEAT_INTERVAL_MS"), Some("250"));
    }

    #[test]
    fn client_service_follows_the_primary_in_passive_and_every_member_in_active_mode() {
        let passive = client_service(&rsvc(), Mode::Passive).spec.and_then(|s| s.selector).expect("selector");
        assert_eq!(passive.get(ROLE_LABEL).map(String::as_str), Some("primary"));
        let active = client_service(&rsvc(), Mode::Active).spec.and_then(|s| s.selector).expect("selector");
        assert_eq!(active.get(MEMBER_LABEL).map(String::as_str), Some("true"));
        assert!(!active.contains_key(ROLE_LABEL));
        let peers = peer_service(&rsvc()).spec.expect("spec");
        assert_eq!(
            (peers.cluster_ip.as_deref(), peers.publish_not_ready_addresses),
            (Some("None"), Some(true))
        );
    }

    #[test]
    fn budget_allows_one_disruption_in_both_api_versions() {
        let v1 = disruption_budget(&rsvc());
        assert_eq!(v1.spec.and_then(|s| s.max_unavailable), Some(IntOrString::Int(1)));
        let v1beta1 = disruption_budget_v1beta1(&rsvc());
        assert_eq!(v1beta1["apiVersion"], "policy/v1beta1");
        assert_eq!(v1beta1["spec"]["maxUnavailable"], 1);
        assert_eq!(v1beta1["spec"]["selector"]["matchLabels"][SERVICE_LABEL], "demo");
    }

    #[test]
    fn role_labels_follow_the_configuration() {
        let config = tandem_replica::pb::Configuration {
            epoch: 2,
            mode: Mode::Passive.into(),
            primary: "r2".into(),
            members: vec![
                tandem_replica::pb::Member { id: "r1".into(), address: "a".into() },
                tandem_replica::pb::Member { id: "r2".into(), address: "b".into() },
            ],
        };
        assert_eq!(role_label(Some(&config), "r2"), "primary");
        assert_eq!(role_label(Some(&config), "r1"), "backup");
        assert_eq!(role_label(Some(&config), "r3"), "joining");
        assert_eq!(role_label(None, "r1"), "joining");
    }
}
