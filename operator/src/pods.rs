//! What the operator creates for a `ReplicatedService`, as pure functions of the resource
//! and the operator's settings: one Pod per replica (replica container + LFD sidecar), the
//! client Service, the headless peer Service, and the PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    KeyToPath, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tandem_replica::pb::Mode;

use crate::crd::{AntiAffinity, Defaults, ReplicatedService};
use crate::rm::Spec;

/// The gRPC port of every replica for clients (pods have their own IPs, so one port fits
/// all), and its internal one (peers, the RM, the detectors; mutual TLS).
pub const REPLICA_PORT: u16 = 7000;
pub const INTERNAL_PORT: u16 = REPLICA_PORT + tandem_replica::wire::INTERNAL_PORT_OFFSET;
pub const SERVICE_LABEL: &str = "tandem.dev/service";
pub const REPLICA_LABEL: &str = "tandem.dev/replica";
pub const ROLE_LABEL: &str = "tandem.dev/role";
pub const MEMBER_LABEL: &str = "tandem.dev/member";
pub const MANAGED_BY: &str = "tandem-operator";
/// When the certificates of a replica pod expire (unix seconds): set by the operator on
/// the pod it creates, from the certificates it issued it; certificate rotation reads it.
pub const CERTIFICATE_NOT_AFTER_ANNOTATION: &str = "tandem.dev/certificate-not-after";

/// Where the replica pods find the GFD, and how they log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub gfd_address: String,
    pub log_level: String,
    /// Mount each pod's certificates (`tls_secret`) and speak mutual TLS internally.
    pub tls: bool,
    /// Serve the client port over TLS (needs `tls`): clients verify it with the CA in
    /// the service's `<service>-client` Secret.
    pub client_tls: bool,
    /// Require the token in the service's `<service>-client` Secret on the client port.
    pub client_token: bool,
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

/// `selector_labels` as a label selector string (the status' `selector`, which the scale
/// subresource shows): exactly the service's replica pods in its namespace.
pub fn pod_selector(service: &str) -> String {
    selector_labels(service).iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",")
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
            // Pod Security "restricted": non-root, seccomp RuntimeDefault (plus each
            // container's own context below). The image has no user of its own.
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65534),
                run_as_group: Some(65534),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                // The certificate files are the group's (0440), readable by this user.
                fs_group: Some(65534),
                ..PodSecurityContext::default()
            }),
            // The replicas never call the Kubernetes API: an account with no bindings
            // and no token in the pod, so a compromised replica holds no credential.
            service_account_name: Some(replica_service_account_name(&rsvc.name_any())),
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(5),
            affinity: anti_affinity(overrides.anti_affinity.unwrap_or_default(), &rsvc.name_any()),
            node_selector: overrides.node_selector,
            tolerations: overrides.tolerations,
            priority_class_name: overrides.priority_class_name,
            volumes: Some(volumes(settings, rsvc, spec, &name)),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Keeps the service's replica pods off one node (`kubernetes.io/hostname`), so that one
/// node's loss or drain costs one replica: as a preference by default, as a rule when
/// the spec says `required`.
fn anti_affinity(kind: AntiAffinity, service: &str) -> Option<Affinity> {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(service)),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    let anti = match kind {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity { pod_anti_affinity: Some(anti), ..Affinity::default() })
}

/// The only writable place in the pod (the root filesystem is read-only): the replica's
/// start marker.
const RUN_VOLUME: &str = "run";
const RUN_DIR: &str = "/var/run/tandem";
/// The replica's data (`spec.storage`): a PersistentVolumeClaim per replica id, which
/// outlives its pods, so a recreated pod recovers the replica's data.
const DATA_VOLUME: &str = "data";
const DATA_DIR: &str = "/var/lib/tandem";

/// The claim of the replica in pod `pod` (the same for every pod of that replica id).
pub fn data_claim_name(pod: &str) -> String {
    format!("{pod}-data")
}

/// The PersistentVolumeClaim of replica `id`, when the service asks for storage. Owned
/// by the service only when its retention policy deletes the data with it.
pub fn data_claim(rsvc: &ReplicatedService, id: &str) -> Option<PersistentVolumeClaim> {
    let storage = rsvc.spec.storage.as_ref()?;
    let pod = pod_name(&rsvc.name_any(), id);
    let mut metadata = owned_metadata(rsvc, &data_claim_name(&pod));
    metadata.labels.get_or_insert_default().insert(REPLICA_LABEL.into(), id.into());
    if !storage.retention_policy.as_ref().is_some_and(|p| p.delete_when_deleted()) {
        metadata.owner_references = None;
    }
    let size = storage.size.clone().unwrap_or_else(|| "1Gi".into());
    Some(PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity(size),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// The pod's certificates: `replica/` for the replica, `lfd/` for its LFD.
const TLS_VOLUME: &str = "tls";
const TLS_DIR: &str = "/etc/tandem/tls";

/// The Secret holding the certificates of the replica in pod `pod`.
pub fn tls_secret_name(pod: &str) -> String {
    format!("{pod}-tls")
}

/// The certificates of replica `id` (its identity `namespace/service/id`) and of its LFD
/// (`detector_id`), issued for one pod: a recreated pod gets new keys. Owned by the
/// service; labelled like its pod, so the RM can delete it with the pod.
pub fn tls_secret(
    rsvc: &ReplicatedService,
    id: &str,
    replica: &tandem_replica::tls::Material,
    lfd: &tandem_replica::tls::Material,
) -> Secret {
    let name = pod_name(&rsvc.name_any(), id);
    let mut metadata = owned_metadata(rsvc, &tls_secret_name(&name));
    metadata.labels.get_or_insert_default().insert(REPLICA_LABEL.into(), id.into());
    let data = [
        ("ca.crt", &replica.ca),
        ("replica.crt", &replica.cert),
        ("replica.key", &replica.key),
        ("lfd.crt", &lfd.cert),
        ("lfd.key", &lfd.key),
    ];
    Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(key, text)| (key.to_owned(), ByteString(text.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The Secret a service's clients read: `ca.crt` (to verify the client port's TLS) and,
/// when the group asks for one, `token`.
pub fn client_secret_name(service: &str) -> String {
    format!("{service}-client")
}

pub fn client_secret(rsvc: &ReplicatedService, ca: &str, token: Option<&str>) -> Secret {
    let mut data = BTreeMap::from([("ca.crt".to_owned(), ByteString(ca.as_bytes().to_vec()))]);
    if let Some(token) = token {
        data.insert("token".into(), ByteString(token.as_bytes().to_vec()));
    }
    Secret {
        metadata: owned_metadata(rsvc, &client_secret_name(&rsvc.name_any())),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Records on `pod` when its certificates expire (unix seconds).
pub fn set_certificate_not_after(pod: &mut Pod, not_after: i64) {
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(CERTIFICATE_NOT_AFTER_ANNOTATION.into(), not_after.to_string());
}

/// The certificates of a replica pod: issued when the pod was created, expiring when its
/// annotation says. A pod created before the operator recorded that holds certificates
/// of the default validity (they were all issued so). None: not a replica pod, or not
/// created yet.
pub fn pod_certificate(pod: &Pod) -> Option<crate::rotation::PodCertificate> {
    let id = pod.labels().get(REPLICA_LABEL)?.clone();
    let issued_at = pod.metadata.creation_timestamp.as_ref()?.0.as_second();
    let not_after = pod
        .annotations()
        .get(CERTIFICATE_NOT_AFTER_ANNOTATION)
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(issued_at + tandem_replica::tls::VALIDITY.as_secs() as i64);
    Some(crate::rotation::PodCertificate { id, issued_at, not_after })
}

/// The identity the group's members carry in their certificates: `namespace/service`.
pub fn group_name(rsvc: &ReplicatedService) -> String {
    format!("{}/{}", rsvc.namespace().unwrap_or_default(), rsvc.name_any())
}

const CLIENT_VOLUME: &str = "client";
const CLIENT_DIR: &str = "/etc/tandem/client";

fn volumes(settings: &PodSettings, rsvc: &ReplicatedService, spec: &Spec, pod: &str) -> Vec<Volume> {
    let service = &rsvc.name_any();
    let mut volumes = vec![Volume {
        name: RUN_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if spec.durability.on_disk() && rsvc.spec.storage.is_some() {
        volumes.push(Volume {
            name: DATA_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: data_claim_name(pod),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    if settings.tls {
        let item =
            |key: &str, path: &str| KeyToPath { key: key.into(), path: path.into(), ..KeyToPath::default() };
        volumes.push(Volume {
            name: TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls_secret_name(pod)),
                default_mode: Some(0o440),
                items: Some(vec![
                    item("ca.crt", "replica/ca.crt"),
                    item("replica.crt", "replica/tls.crt"),
                    item("replica.key", "replica/tls.key"),
                    item("ca.crt", "lfd/ca.crt"),
                    item("lfd.crt", "lfd/tls.crt"),
                    item("lfd.key", "lfd/tls.key"),
                ]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if settings.client_token {
        volumes.push(Volume {
            name: CLIENT_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(client_secret_name(service)),
                default_mode: Some(0o440),
                items: Some(vec![KeyToPath {
                    key: "token".into(),
                    path: "token".into(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    volumes
}

/// `TANDEM_TLS_DIR` and the read-only mount of the pod's certificates, for `holder`
/// (`replica` or `lfd`), when the operator issues them.
fn tls_env_and_mount(settings: &PodSettings, holder: &str) -> (Vec<EnvVar>, Vec<VolumeMount>) {
    if !settings.tls {
        return (Vec::new(), Vec::new());
    }
    let mount = VolumeMount {
        name: TLS_VOLUME.into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (vec![env("TANDEM_TLS_DIR", format!("{TLS_DIR}/{holder}"))], vec![mount])
}

/// A container's context under Pod Security "restricted", plus a read-only root
/// filesystem: nothing to escalate to, no capability, nothing written outside volumes.
fn restricted_container_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..SecurityContext::default()
    }
}

pub fn replica_service_account_name(service: &str) -> String {
    format!("{service}-replica")
}

/// The replicas' ServiceAccount: bound to no role, its token never mounted. Its own
/// (not the namespace's `default`, which others may bind roles to), owned by the service.
pub fn replica_service_account(rsvc: &ReplicatedService) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_metadata(rsvc, &replica_service_account_name(&rsvc.name_any())),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

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
        env("TANDEM_GROUP", group_name(rsvc)),
        env("TANDEM_SESSION_EXPIRY_MS", settings.session_expiry_ms.to_string()),
        env("TANDEM_DURABILITY", spec.durability.as_str()),
    ];
    let mut data_mounts = Vec::new();
    if spec.durability.on_disk() && rsvc.spec.storage.is_some() {
        replica_env.push(env("TANDEM_DATA_DIR", format!("{DATA_DIR}/data")));
        data_mounts.push(VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        });
    }
    let (tls_env, mut tls_mounts) = tls_env_and_mount(settings, "replica");
    replica_env.extend(tls_env);
    if settings.client_tls && settings.tls {
        replica_env.push(env("TANDEM_CLIENT_TLS", "true"));
    }
    if settings.client_token {
        replica_env.push(env("TANDEM_CLIENT_TOKEN_FILE", format!("{CLIENT_DIR}/token")));
        tls_mounts.push(VolumeMount {
            name: CLIENT_VOLUME.into(),
            mount_path: CLIENT_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
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
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: i32::from(REPLICA_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            // The chart's NetworkPolicy admits only the group and the operator here.
            ContainerPort {
                name: Some("internal".into()),
                container_port: i32::from(INTERNAL_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(readiness_probe()),
        resources: rsvc.spec.resources.clone(),
        security_context: Some(restricted_container_context()),
        volume_mounts: Some(
            [VolumeMount { name: RUN_VOLUME.into(), mount_path: RUN_DIR.into(), ..VolumeMount::default() }]
                .into_iter()
                .chain(tls_mounts)
                .chain(data_mounts)
                .collect(),
        ),
        ..Container::default()
    }
}

/// `tandem health` in the pod. An exec probe starts a process in the pod: not every
/// second, or a small node spends its time starting them; and on a loaded node starting
/// one can take over a second, which must not take a healthy primary out of its Service
/// (or let a budget count it as down). Failover never waits for it (the LFD does).
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
        timeout_seconds: Some(3),
        failure_threshold: Some(2),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

/// The LFD: heartbeats the replica over loopback, reports to the GFD as `detector_id`.
fn lfd_container(image: &str, settings: &PodSettings, spec: &Spec, detector_id: &str) -> Container {
    let quantity = |q: &str| k8s_openapi::apimachinery::pkg::api::resource::Quantity(q.into());
    let (tls_env, tls_mounts) = tls_env_and_mount(settings, "lfd");
    Container {
        name: "lfd".into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["lfd".into()]),
        env: Some(
            vec![
                env("TANDEM_REPLICA_ID", detector_id),
                env("TANDEM_REPLICA_ADDRESS", format!("127.0.0.1:{REPLICA_PORT}")),
                env("TANDEM_GFD", settings.gfd_address.clone()),
                env("TANDEM_HEARTBEAT_INTERVAL_MS", spec.heartbeat_interval_ms.to_string()),
                env("TANDEM_FAILURE_THRESHOLD", spec.failure_threshold.to_string()),
                env("TANDEM_LOG", settings.log_level.clone()),
            ]
            .into_iter()
            .chain(tls_env)
            .collect(),
        ),
        volume_mounts: (!tls_mounts.is_empty()).then_some(tls_mounts),
        resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), quantity("10m")),
                ("memory".into(), quantity("16Mi")),
            ])),
            ..Default::default()
        }),
        security_context: Some(restricted_container_context()),
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

/// At most one member voluntarily disrupted at a time (policy/v1), `replicas` being the
/// effective count.
///
/// It selects the members' pods only (`tandem.dev/member=true`): a pod counts as healthy
/// when it is Ready, and a replica is ready (grpc.health SERVING) as soon as it holds a
/// state, before the RM adds it; a recreated replica must not count until it is a
/// member again. `maxUnavailable: 1` takes the expected count from the pods' controller,
/// the ReplicatedService's scale subresource, so `kubectl scale` counts at once. A
/// resource stored under an older CRD may lack `spec.replicas`, which the scale
/// subresource refuses to read: its budget names the count (`minAvailable`) instead.
pub fn disruption_budget(rsvc: &ReplicatedService, replicas: u32) -> PodDisruptionBudget {
    let service = rsvc.name_any();
    let mut members = selector_labels(&service);
    members.insert(MEMBER_LABEL.into(), "true".into());
    let (max_unavailable, min_available) = match rsvc.spec.replicas {
        Some(_) => (Some(IntOrString::Int(1)), None),
        None => (None, Some(IntOrString::Int(replicas.saturating_sub(1) as i32))),
    };
    PodDisruptionBudget {
        metadata: owned_metadata(rsvc, &service),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable,
            min_available,
            selector: Some(LabelSelector { match_labels: Some(members), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The same budget as policy/v1beta1, for API servers older than 1.21.
pub fn disruption_budget_v1beta1(rsvc: &ReplicatedService, replicas: u32) -> serde_json::Value {
    let budget = disruption_budget(rsvc, replicas);
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
            tls: true,
            client_tls: true,
            client_token: true,
            session_expiry_ms: 60_000,
        }
    }

    fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
        container.env.as_ref()?.iter().find(|e| e.name == name)?.value.as_deref()
    }

    #[test]
    fn a_pods_certificate_expiry_is_its_annotation_or_else_the_default_validity() {
        let mut pod = replica_pod(&rsvc(), &defaults(), &settings(), &Spec::default(), "r2", false, &[]);
        assert_eq!(pod_certificate(&pod), None, "not created yet");
        let created: k8s_openapi::jiff::Timestamp = "2030-01-01T00:00:00Z".parse().expect("a time");
        pod.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
        let issued_at = created.as_second();
        // A pod from before the annotation: its certificates had the default validity.
        let default = tandem_replica::tls::VALIDITY.as_secs() as i64;
        let before = pod_certificate(&pod).expect("a replica pod");
        assert_eq!(
            (before.id.as_str(), before.issued_at, before.not_after),
            ("r2", issued_at, issued_at + default)
        );
        set_certificate_not_after(&mut pod, issued_at + 90);
        assert_eq!(pod_certificate(&pod).expect("a replica pod").not_after, issued_at + 90);
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
    fn replica_pods_run_restricted_with_an_account_that_holds_no_token() {
        let pod = replica_pod(&rsvc(), &defaults(), &settings(), &Spec::default(), "r1", true, &[]);
        let spec = pod.spec.expect("spec");
        let pod_context = spec.security_context.expect("pod security context");
        assert_eq!(pod_context.run_as_non_root, Some(true));
        assert_ne!(pod_context.run_as_user, Some(0));
        assert_eq!(pod_context.seccomp_profile.map(|p| p.type_).as_deref(), Some("RuntimeDefault"));
        assert_eq!(spec.service_account_name.as_deref(), Some("demo-replica"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(spec.host_network.is_none() && spec.host_pid.is_none() && spec.host_ipc.is_none());
        for container in &spec.containers {
            let context = container.security_context.clone().expect("container security context");
            assert_eq!(context.allow_privilege_escalation, Some(false), "{}", container.name);
            assert_eq!(context.read_only_root_filesystem, Some(true), "{}", container.name);
            assert_eq!(context.privileged, None, "{}", container.name);
            let capabilities = context.capabilities.expect("capabilities");
            assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]), "{}", container.name);
            assert_eq!(capabilities.add, None, "{}", container.name);
            assert!(container.ports.iter().flatten().all(|p| p.host_port.is_none()), "{}", container.name);
        }
        let volumes = spec.volumes.expect("volumes");
        assert!(volumes.iter().all(|v| v.host_path.is_none()), "no hostPath: {volumes:?}");
        let account = replica_service_account(&rsvc());
        assert_eq!(account.metadata.name.as_deref(), Some("demo-replica"));
        assert_eq!(account.automount_service_account_token, Some(false));
        assert_eq!(account.metadata.owner_references.expect("owner")[0].controller, Some(true));
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
    fn budget_allows_one_member_down_and_counts_members_only_in_both_api_versions() {
        let mut resource = rsvc();
        resource.spec.replicas = Some(5);
        let v1 = disruption_budget(&resource, 5).spec.expect("spec");
        // The expected count comes from the scale subresource (kubectl scale counts at once).
        assert_eq!((v1.max_unavailable, v1.min_available), (Some(IntOrString::Int(1)), None));
        let selected = v1.selector.and_then(|s| s.match_labels).expect("match labels");
        assert_eq!(
            selected,
            BTreeMap::from([
                (SERVICE_LABEL.to_owned(), "demo".to_owned()),
                (MEMBER_LABEL.to_owned(), "true".to_owned())
            ]),
            "a ready replica that is not (yet) a member must not count as available"
        );
        let v1beta1 = disruption_budget_v1beta1(&resource, 5);
        assert_eq!(v1beta1["apiVersion"], "policy/v1beta1");
        assert_eq!(v1beta1["spec"]["maxUnavailable"], 1);
        assert_eq!(v1beta1["spec"]["selector"]["matchLabels"][SERVICE_LABEL], "demo");
        assert_eq!(v1beta1["spec"]["selector"]["matchLabels"][MEMBER_LABEL], "true");
        assert!(v1beta1["spec"].get("minAvailable").is_none(), "{v1beta1}");
    }

    #[test]
    fn a_spec_without_replicas_gets_a_budget_that_names_the_count() {
        // Stored under an older CRD (no schema default): the scale subresource refuses to
        // read an unset count, so the budget cannot lean on it.
        let budget = disruption_budget(&rsvc(), 3).spec.expect("spec");
        assert_eq!((budget.max_unavailable, budget.min_available), (None, Some(IntOrString::Int(2))));
        let lone = disruption_budget(&rsvc(), 1).spec.expect("spec");
        assert_eq!(lone.min_available, Some(IntOrString::Int(0)));
    }

    #[test]
    fn replica_pods_prefer_separate_nodes_unless_told_to_require_it_or_not_to_care() {
        let affinity = |kind: Option<AntiAffinity>| {
            let mut resource = rsvc();
            resource.spec.pod_template =
                Some(crate::crd::PodOverrides { anti_affinity: kind, ..Default::default() });
            let pod = replica_pod(&resource, &defaults(), &settings(), &Spec::default(), "r1", true, &[]);
            pod.spec.expect("spec").affinity.and_then(|a| a.pod_anti_affinity)
        };
        let demo = Some(BTreeMap::from([(SERVICE_LABEL.to_owned(), "demo".to_owned())]));

        let preferred = affinity(None).expect("preferred by default");
        assert_eq!(preferred, affinity(Some(AntiAffinity::Preferred)).expect("preferred"));
        assert!(preferred.required_during_scheduling_ignored_during_execution.is_none());
        let terms = preferred.preferred_during_scheduling_ignored_during_execution.expect("a preference");
        assert_eq!(terms.len(), 1);
        assert_eq!(terms[0].pod_affinity_term.topology_key, "kubernetes.io/hostname");
        assert_eq!(
            terms[0].pod_affinity_term.label_selector.as_ref().and_then(|s| s.match_labels.clone()),
            demo
        );

        let required = affinity(Some(AntiAffinity::Required)).expect("required");
        assert!(required.preferred_during_scheduling_ignored_during_execution.is_none());
        let terms = required.required_during_scheduling_ignored_during_execution.expect("a rule");
        assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(terms[0].label_selector.as_ref().and_then(|s| s.match_labels.clone()), demo);

        assert_eq!(affinity(Some(AntiAffinity::None)), None);
    }

    #[test]
    fn the_anti_affinity_setting_reads_as_documented() {
        for (text, kind) in [
            ("preferred", AntiAffinity::Preferred),
            ("required", AntiAffinity::Required),
            ("none", AntiAffinity::None),
        ] {
            let overrides: crate::crd::PodOverrides =
                serde_json::from_value(json!({ "antiAffinity": text })).expect("a valid setting");
            assert_eq!(overrides.anti_affinity, Some(kind));
        }
        assert!(
            serde_json::from_value::<crate::crd::PodOverrides>(json!({ "antiAffinity": "sometimes" }))
                .is_err()
        );
    }

    #[test]
    fn the_pod_selector_is_the_service_label() {
        assert_eq!(pod_selector("demo"), "tandem.dev/service=demo");
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
