//! The `ReplicatedService` custom resource (`tandem.dev/v1alpha1`, short name `rsvc`):
//! what a user asks for (spec) and what the operator reports (status). The CRD YAML in
//! crds/ is generated from these types (`tandem crd`), and a test fails when it is stale.

// Several `printcolumn(type_ = "string", ...)` read as duplicates to this lint.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use tandem_replica::pb::Mode;

use crate::rm::{Durability, Spec};

/// A replicated key-value service: `replicas` replica pods, each with a Local Fault
/// Detector sidecar, kept healthy by the Tandem operator.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "ReplicatedService",
    plural = "replicatedservices",
    shortname = "rsvc",
    category = "tandem",
    namespaced,
    status = "ReplicatedServiceStatus",
    // `kubectl scale rsvc/NAME --replicas=N` (and HPA): the scale subresource. It also
    // lets the disruption controller find the pods' controller and its expected count.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".status.mode",
        description = "replication mode in force"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "ready members / desired replicas"
    ),
    printcolumn(
        name = "Primary",
        type_ = "string",
        json_path = ".status.primary",
        description = "primary (passive) or order-keeper (active)"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.epoch",
        description = "configuration epoch"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "!has(self.checkpointIntervalMs) || self.checkpointIntervalMs == 0 || self.checkpointIntervalMs >= (has(self.heartbeatIntervalMs) ? self.heartbeatIntervalMs : 100)"
).message("checkpointIntervalMs must be 0 (off) or at least heartbeatIntervalMs"))]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedServiceSpec {
    /// Number of replicas (default 3, or the chart's `defaults.replicas`). Also set by
    /// `kubectl scale rsvc/NAME --replicas=N`.
    // The API server fills the default in (the CRD's schema default), so the scale
    // subresource, which refuses to read an unset count, always has one; the operator's
    // own default is left for a resource stored under an older CRD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9), extend("default" = DEFAULT_REPLICAS))]
    pub replicas: Option<i32>,
    /// `passive` (a primary executes and checkpoints its backups) or `active` (every
    /// replica executes every request). Changeable on a live service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<ReplicationMode>,
    /// Image with the `tandem` binary (default: the operator's own image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// How often each LFD heartbeats its replica, in milliseconds (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 60000))]
    pub heartbeat_interval_ms: Option<i64>,
    /// Missed heartbeats before a replica is declared dead (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: Option<i32>,
    /// Passive mode: how often the primary checkpoints its backups, in milliseconds;
    /// 0 turns periodic checkpoints off (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600000))]
    pub checkpoint_interval_ms: Option<i64>,
    /// Resources of the replica container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Overrides of the replica pods' template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
    /// A PersistentVolumeClaim per replica for its data (write-ahead log, snapshots),
    /// re-attached to the replica's recreated pod. Without it the data lives in memory
    /// and a restart of every pod at once loses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// When a write counts as done: `fsync` (acknowledged once every member has it on
    /// disk; the default with `storage`), `interval` (synced every 100 ms), or `memory`
    /// (nothing on disk; the default, and the only choice, without `storage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "durability_schema")]
    pub durability: Option<String>,
}

/// `fsync`, `interval` or `memory`.
fn durability_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "fsync (acknowledged once every member has it on disk; the default with storage), interval (synced every 100 ms), or memory (nothing on disk; the default without storage)",
        "type": "string",
        "enum": ["fsync", "interval", "memory"]
    })
}

/// Each replica's PersistentVolumeClaim (`<pod>-data`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each replica's volume (default 1Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Storage class of the claims (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// What happens to the claims, as StatefulSet's persistentVolumeClaimRetentionPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<RetentionPolicy>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    /// When the ReplicatedService is deleted: `Retain` (default: the data outlives it)
    /// or `Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "retention_schema")]
    pub when_deleted: Option<String>,
    /// When a replica leaves for good (scale-down, or a replica replaced under a new
    /// id): `Delete` (default) or `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "retention_schema")]
    pub when_scaled: Option<String>,
}

fn retention_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["Retain", "Delete"] })
}

impl RetentionPolicy {
    pub fn delete_when_deleted(&self) -> bool {
        self.when_deleted.as_deref() == Some("Delete")
    }

    pub fn delete_when_scaled(&self) -> bool {
        self.when_scaled.as_deref() != Some("Retain")
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    Passive,
    Active,
}

impl From<ReplicationMode> for Mode {
    fn from(mode: ReplicationMode) -> Self {
        match mode {
            ReplicationMode::Passive => Mode::Passive,
            ReplicationMode::Active => Mode::Active,
        }
    }
}

/// `passive` or `active`, and nothing else: an API server refuses any other value.
fn mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "passive (a primary executes and checkpoints its backups) or active (every replica executes every request). Changeable on a live service.",
        "type": "string",
        "enum": ["passive", "active"]
    })
}

/// The replica count the API server fills in for a spec that leaves it out (the CRD's
/// schema default; the chart puts its `defaults.replicas` there).
pub const DEFAULT_REPLICAS: i32 = 3;

/// Scheduling overrides for the replica pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra labels on the replica pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Spreading the replica pods over nodes (`kubernetes.io/hostname`): `preferred`
    /// (default; the scheduler tries, and still places a pod when it cannot), `required`
    /// (never two on one node: a group needs as many schedulable nodes as replicas, or
    /// the extra pods stay Pending), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "anti_affinity_schema")]
    pub anti_affinity: Option<AntiAffinity>,
}

/// `preferred`, `required` or `none`, and nothing else (no `null` in the enum, which
/// older API servers refuse).
fn anti_affinity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["preferred", "required", "none"]
    })
}

/// How the replica pods of one service avoid sharing a node.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    #[default]
    Preferred,
    Required,
    None,
}

/// What the operator reports, and the Replication Manager's record: the configuration in
/// force is written here (with optimistic concurrency) before it is pushed, so the API
/// server is the one authority for epochs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Epoch of the configuration in force.
    #[serde(default)]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Pod name of the primary (passive) or order-keeper (active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// `ready members/desired replicas`, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replica pods running (not being deleted): the scale subresource's current count.
    #[serde(default)]
    pub replicas: i32,
    /// The label selector of the service's replica pods (`tandem.dev/service=NAME`), for
    /// the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// How many times the primary changed.
    #[serde(default)]
    pub failovers: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<Time>,
    /// The configuration in force, as pushed to the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<ConfigurationStatus>,
    /// When a write counts as done (`fsync`, `interval`, `memory`): what the spec asked
    /// for, in force on every replica pod created since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    /// The last planned switchover: asked with the `tandem.dev/switchover-to` annotation,
    /// or made by a rolling update before it replaces the old primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover: Option<SwitchoverStatus>,
    /// Replica pods running the spec's pod template (image, resources, overrides); a
    /// rolling update replaces the others one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverStatus {
    /// The value of the `tandem.dev/switchover-to` annotation last acted on (empty once
    /// the annotation is removed: the same value may then be used again).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request: String,
    /// Done, AlreadyPrimary or Refused.
    pub result: String,
    /// Pod names of the old and the new primary (empty when refused).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to: String,
    /// The epoch of the configuration that names the new primary.
    #[serde(default)]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name.
    pub name: String,
    /// Replica id within the service (r1, r2, ...).
    pub id: String,
    /// primary, backup, joining, standby, or gone.
    pub role: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// When its LFD last answered the GFD (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(default)]
    pub checkpoint_seq: i64,
    #[serde(default)]
    pub last_seq: i64,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationStatus {
    pub epoch: i64,
    pub mode: String,
    /// Replica id of the primary.
    pub primary: String,
    pub members: Vec<ConfiguredMember>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredMember {
    pub id: String,
    pub address: String,
    /// Member without a break since this epoch (the RM promotes only members that
    /// synced with their leader since).
    pub joined_epoch: i64,
    /// The replica instance that is the member (random per start): a restarted replica
    /// is a new instance and must rejoin.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// The data the member held on disk when it became one: a restarted replica with
    /// the same data id recovered the member's data.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_id: String,
}

/// An annotation on a ReplicatedService whose group was lost (every replica's state gone
/// at once): its value, the lost epoch, tells the operator to start over with an empty
/// group. Naming the epoch keeps a stale annotation from wiping a later group.
pub const RECREATE_ANNOTATION: &str = "tandem.dev/recreate-lost-group";

/// Operator-wide defaults for what a spec leaves out (set through the helm chart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub image: String,
    pub spec: Spec,
}

impl ReplicatedServiceSpec {
    /// The RM's spec, with the operator's defaults filled in.
    pub fn effective(&self, defaults: &Defaults) -> Spec {
        let base = &defaults.spec;
        let positive = |value: Option<i64>, default: u64| value.map_or(default, |v| v.max(0) as u64);
        Spec {
            replicas: self.replicas.map_or(base.replicas, |r| r.max(0) as u32),
            mode: self.mode.map_or(base.mode, Mode::from),
            heartbeat_interval_ms: positive(self.heartbeat_interval_ms, base.heartbeat_interval_ms),
            failure_threshold: self.failure_threshold.map_or(base.failure_threshold, |t| t.max(0) as u32),
            checkpoint_interval_ms: positive(self.checkpoint_interval_ms, base.checkpoint_interval_ms),
            recreate_lost_epoch: None,
            durability: self.durability(),
        }
    }

    /// The durability asked for, or the default: on disk with storage, else in memory.
    pub fn durability(&self) -> Durability {
        match (&self.durability, &self.storage) {
            (Some(asked), _) => asked.parse().unwrap_or(Durability::Fsync),
            (None, Some(_)) => Durability::Fsync,
            (None, None) => Durability::Memory,
        }
    }

    /// What in the spec the RM's own checks do not cover.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(asked) = &self.durability
            && let Err(problem) = asked.parse::<Durability>()
        {
            problems.push(problem);
        }
        if self.storage.is_none() && self.durability().on_disk() {
            problems.push(format!(
                "durability {} keeps the data on disk: add spec.storage (a volume per replica), or set durability: memory",
                self.durability()
            ));
        }
        if let Some(size) = self.storage.as_ref().and_then(|s| s.size.as_deref())
            && !valid_quantity(size)
        {
            problems.push(format!("storage.size {size:?} is not a quantity such as 1Gi or 500Mi"));
        }
        problems
    }

    pub fn image<'a>(&'a self, defaults: &'a Defaults) -> &'a str {
        self.image.as_deref().unwrap_or(&defaults.image)
    }
}

/// The CRD as YAML, as checked in under crds/.
pub fn crd_yaml() -> String {
    let crd = ReplicatedService::crd();
    let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!("# Generated by `tandem crd` from operator/src/crd.rs. Do not edit.\n{yaml}")
}

/// A Kubernetes quantity such as `1Gi`, `500M` or `2000000`.
fn valid_quantity(text: &str) -> bool {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    !digits.is_empty()
        && digits.parse::<f64>().is_ok_and(|n| n > 0.0)
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"].contains(&suffix)
}
