//! Translations between Kubernetes and the RM, all pure: the RM's record from the
//! resource's status, its observations from the pods (plus the GFD's membership and the
//! replicas' own status), and the status to write back — members, printer columns and
//! conditions (SpecValid, Available, Degraded, Progressing).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_replica::pb::{self, Mode};

use crate::crd::{
    ConfigurationStatus, ConfiguredMember, MemberStatus, RECREATE_ANNOTATION, ReplicatedService,
    ReplicatedServiceStatus,
};
use crate::membership::MembershipView;
use crate::pods::{REPLICA_LABEL, REPLICA_PORT, detector_id, pod_name, pod_selector};
use crate::rm::{Instance, Liveness, Observed, Record, Restarts, Spec, Trouble};

/// The RM's record: the configuration, join epochs and incarnations from the status,
/// the back-off state the operator keeps in memory.
pub fn record_from_status(
    status: Option<&ReplicatedServiceStatus>,
    restarts: BTreeMap<String, Restarts>,
) -> Record {
    let Some(status) = status else { return Record { restarts, ..Record::default() } };
    let mut record = record_from_configuration(status.configuration.as_ref());
    record.failovers = status.failovers.max(0) as u64;
    record.restarts = restarts;
    if record.config.is_none() {
        // A lost group being recreated: the new one starts after the epoch shown.
        record.epoch_floor = status.epoch.max(0) as u64;
    }
    record
}

/// The record's durable part from its serialized form (status or local file).
pub fn record_from_configuration(configuration: Option<&ConfigurationStatus>) -> Record {
    let Some(c) = configuration else { return Record::default() };
    let config = pb::Configuration {
        epoch: c.epoch.max(0) as u64,
        // An unknown mode (a status edited by hand) is unspecified, which the RM
        // replaces with the spec's, never taken for passive.
        mode: c.mode.parse().unwrap_or(Mode::Unspecified).into(),
        primary: c.primary.clone(),
        members: c
            .members
            .iter()
            .map(|m| pb::Member { id: m.id.clone(), address: m.address.clone() })
            .collect(),
    };
    Record {
        config: Some(config),
        joined_epoch: c.members.iter().map(|m| (m.id.clone(), m.joined_epoch.max(0) as u64)).collect(),
        incarnations: c
            .members
            .iter()
            .filter(|m| !m.incarnation.is_empty())
            .map(|m| (m.id.clone(), m.incarnation.clone()))
            .collect(),
        data_ids: c
            .members
            .iter()
            .filter(|m| !m.data_id.is_empty())
            .map(|m| (m.id.clone(), m.data_id.clone()))
            .collect(),
        ..Record::default()
    }
}

/// The configuration as the status records it.
pub fn configuration_status(record: &Record) -> Option<ConfigurationStatus> {
    let config = record.config.as_ref()?;
    Some(ConfigurationStatus {
        epoch: config.epoch as i64,
        mode: config.mode().to_string(),
        primary: config.primary.clone(),
        members: config
            .members
            .iter()
            .map(|m| ConfiguredMember {
                id: m.id.clone(),
                address: m.address.clone(),
                joined_epoch: record.joined_epoch.get(&m.id).copied().unwrap_or(config.epoch) as i64,
                incarnation: record.incarnations.get(&m.id).cloned().unwrap_or_default(),
                data_id: record.data_ids.get(&m.id).cloned().unwrap_or_default(),
            })
            .collect(),
    })
}

/// Whether a pod still counts as a running instance of its replica.
pub fn pod_running(pod: &Pod) -> bool {
    pod_instance(pod) == Instance::Running
}

/// What a pod is to the RM: running; or on its way out (being deleted, or finished and
/// to be deleted: its name is taken until it is gone).
pub fn pod_instance(pod: &Pod) -> Instance {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Failed" | "Succeeded")) {
        Instance::Terminating
    } else {
        Instance::Running
    }
}

/// A pod that finished (evicted, failed): it keeps its name until deleted.
pub fn pod_finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && matches!(phase, Some("Failed" | "Succeeded"))
}

pub fn pod_address(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
    Some(format!("{ip}:{REPLICA_PORT}"))
}

/// What the RM observes: one entry per replica pod, plus a gone entry for each member
/// whose pod no longer exists, each replica being restarted and each whose pod was
/// terminating (so the replacement gets the same id and pod name).
pub fn observe(
    rsvc: &ReplicatedService,
    pods: &[Pod],
    membership: &MembershipView,
    statuses: &BTreeMap<String, pb::ReplicaStatus>,
    record: &Record,
) -> Vec<Observed> {
    let namespace = rsvc.namespace().unwrap_or_default();
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    for pod in pods {
        let Some(id) = pod.labels().get(REPLICA_LABEL).cloned() else { continue };
        let facts = statuses.get(&id).map(crate::replicas::facts);
        let entry = Observed {
            address: pod_address(pod).unwrap_or_default(),
            instance: pod_instance(pod),
            liveness: membership.liveness(&detector_id(&namespace, &pod.name_any())),
            facts,
            id: id.clone(),
        };
        // Of two pods for one id (one terminating), the running one counts.
        if observed.get(&id).is_none_or(|o| o.instance != Instance::Running) {
            observed.insert(id, entry);
        }
    }
    // Members without a pod, replicas waiting to be restarted, and pods that were just
    // terminating keep their ids (so a replacement gets the same id and pod name).
    let members = record.config.iter().flat_map(|c| &c.members).map(|m| (m.id.clone(), m.address.clone()));
    let restarting =
        record.restarts.keys().chain(record.terminating_since.keys()).map(|id| (id.clone(), String::new()));
    for (id, address) in members.chain(restarting) {
        observed.entry(id.clone()).or_insert_with(|| Observed {
            id,
            address,
            instance: Instance::Gone,
            liveness: Liveness::Unknown,
            facts: None,
        });
    }
    observed.into_values().collect()
}

/// What the user reads about a trouble, with what to do about it on Kubernetes.
pub fn trouble_message(trouble: &Trouble, rsvc: &ReplicatedService) -> String {
    match trouble {
        Trouble::GroupLost { epoch, .. } => format!(
            "{trouble}. To start over with an empty group: kubectl annotate rsvc {} -n {} {RECREATE_ANNOTATION}={epoch}",
            rsvc.name_any(),
            rsvc.namespace().unwrap_or_default()
        ),
        _ => trouble.to_string(),
    }
}

/// Everything the status shows after this reconciliation.
#[allow(clippy::too_many_arguments)]
pub fn build_status(
    rsvc: &ReplicatedService,
    spec: &Spec,
    problems: &[String],
    record: &Record,
    observed: &[Observed],
    statuses: &BTreeMap<String, pb::ReplicaStatus>,
    membership: &MembershipView,
    now_ms: u64,
) -> ReplicatedServiceStatus {
    let previous = rsvc.status.clone().unwrap_or_default();
    let namespace = rsvc.namespace().unwrap_or_default();
    let service = rsvc.name_any();
    let config = record.config.as_ref();
    let now = Time(Timestamp::from_millisecond(now_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH));
    let generation = rsvc.metadata.generation;

    let members: Vec<MemberStatus> = observed
        .iter()
        .map(|o| member_status(o, config, statuses.get(&o.id), &service, &namespace, membership))
        .collect();
    let ready_members =
        members.iter().filter(|m| m.ready && config.is_some_and(|c| c.has_member(&m.id))).count();
    let primary_ready = config.is_some_and(|c| members.iter().any(|m| m.id == c.primary && m.ready));
    let running = observed.iter().filter(|o| o.instance == Instance::Running).count();
    let wanted = spec.replicas as usize;
    let member_count = config.map_or(0, |c| c.members.len());

    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let trouble = record.trouble.as_ref().map(|t| (t.reason(), trouble_message(t, rsvc)));
    let members_ready = format!("{ready_members}/{wanted} members ready");
    let mut conditions = vec![
        match problems.is_empty() {
            true => condition("SpecValid", true, "Valid", "the spec is valid".into()),
            false => condition("SpecValid", false, "InvalidSpec", problems.join("; ")),
        },
        match (primary_ready, &trouble) {
            (true, _) => {
                let primary = config.map(|c| pod_name(&service, &c.primary)).unwrap_or_default();
                condition("Available", true, "PrimaryReady", format!("{primary} serves clients"))
            }
            (false, Some((reason, message))) => condition("Available", false, reason, message.clone()),
            (false, None) => {
                condition("Available", false, "NoReadyPrimary", "no ready primary: clients wait".into())
            }
        },
        match &trouble {
            Some((reason, message)) => {
                condition("Degraded", true, reason, format!("{members_ready}; {message}"))
            }
            None if ready_members >= wanted && member_count == wanted => {
                condition("Degraded", false, "AllMembersReady", members_ready)
            }
            None => condition("Degraded", true, "MembersMissing", members_ready),
        },
        if running == wanted && member_count == wanted && config.is_some_and(|c| c.mode() == spec.mode) {
            condition("Progressing", false, "Stable", "the group matches the spec".into())
        } else {
            let message = format!("{running} replicas running, {member_count} members, {wanted} wanted");
            condition("Progressing", true, "Reconciling", message)
        },
    ];
    // A condition keeps its transition time while its status stays the same.
    for condition in &mut conditions {
        if let Some(old) =
            previous.conditions.iter().find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    let failover_happened = record.failovers as i64 > previous.failovers;
    ReplicatedServiceStatus {
        observed_generation: generation,
        epoch: config.map_or(record.epoch_floor as i64, |c| c.epoch as i64),
        mode: config.map(|c| c.mode().to_string()),
        primary: config.map(|c| pod_name(&service, &c.primary)),
        ready: Some(format!("{ready_members}/{wanted}")),
        ready_replicas: ready_members as i32,
        replicas: running as i32,
        selector: Some(pod_selector(&service)),
        members,
        conditions,
        failovers: record.failovers as i64,
        last_failover_time: if failover_happened { Some(now) } else { previous.last_failover_time },
        configuration: configuration_status(record),
        durability: Some(spec.durability.to_string()),
        // Switchovers and rolling updates are the controller's to fill in.
        ..ReplicatedServiceStatus::default()
    }
}

/// One replica's line in the status: its pod, role, readiness and progress.
fn member_status(
    o: &Observed,
    config: Option<&pb::Configuration>,
    status: Option<&pb::ReplicaStatus>,
    service: &str,
    namespace: &str,
    membership: &MembershipView,
) -> MemberStatus {
    let name = pod_name(service, &o.id);
    let member = config.is_some_and(|c| c.has_member(&o.id));
    let role = match (o.instance, config) {
        (Instance::Gone, _) => "gone",
        (Instance::Terminating, _) => "terminating",
        (_, Some(c)) if c.primary == o.id => "primary",
        _ if member => "backup",
        _ if matches!(o.liveness, Liveness::Alive { ready: true }) => "standby",
        _ => "joining",
    };
    let heartbeat = membership
        .heartbeat(&detector_id(namespace, &name))
        .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok().map(|t| t.to_string()));
    MemberStatus {
        name,
        id: o.id.clone(),
        role: role.into(),
        ready: o.instance == Instance::Running && matches!(o.liveness, Liveness::Alive { ready: true }),
        address: (!o.address.is_empty()).then(|| o.address.clone()),
        last_heartbeat: heartbeat,
        checkpoint_seq: status.map_or(0, |s| s.checkpoint_seq as i64),
        last_seq: status.map_or(0, |s| s.last_seq as i64),
    }
}

/// The status without its volatile parts (heartbeat times), to tell whether a write is
/// worth it.
pub fn settled_part(status: &ReplicatedServiceStatus) -> ReplicatedServiceStatus {
    let mut status = status.clone();
    for member in &mut status.members {
        member.last_heartbeat = None;
        member.last_seq = 0;
        member.checkpoint_seq = 0;
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ReplicatedServiceSpec;
    use k8s_openapi::api::core::v1::PodStatus;
    use kube::api::ObjectMeta;

    fn pod(id: &str, ip: Option<&str>, deleting: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("demo-{id}")),
                labels: Some(BTreeMap::from([(REPLICA_LABEL.to_owned(), id.to_owned())])),
                deletion_timestamp: deleting.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: ip.map(String::from),
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn rsvc() -> ReplicatedService {
        let mut rsvc = ReplicatedService::new("demo", ReplicatedServiceSpec::default());
        rsvc.metadata.namespace = Some("ns".into());
        rsvc.metadata.generation = Some(4);
        rsvc
    }

    fn record() -> Record {
        let config = pb::Configuration {
            epoch: 5,
            mode: Mode::Passive.into(),
            primary: "r1".into(),
            members: ["r1", "r2", "r3"]
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: format!("{id}:7000") })
                .collect(),
        };
        Record {
            config: Some(config),
            joined_epoch: BTreeMap::from([("r1".into(), 1), ("r2".into(), 1), ("r3".into(), 4)]),
            failovers: 2,
            ..Record::default()
        }
    }

    #[test]
    fn the_record_survives_a_round_trip_through_the_status() {
        let record = record();
        let status = ReplicatedServiceStatus {
            configuration: configuration_status(&record),
            failovers: 2,
            ..Default::default()
        };
        assert_eq!(record_from_status(Some(&status), BTreeMap::new()), record);
        assert_eq!(record_from_status(None, BTreeMap::new()), Record::default());
    }

    #[test]
    fn a_deleted_pod_is_terminating_at_once_and_a_member_without_pod_is_gone() {
        let pods = vec![pod("r1", Some("10.0.0.1"), false), pod("r2", Some("10.0.0.2"), true)];
        let observed = observe(&rsvc(), &pods, &MembershipView::default(), &BTreeMap::new(), &record());
        let by_id: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
        assert_eq!(by_id["r1"].instance, Instance::Running);
        assert_eq!(by_id["r1"].address, "10.0.0.1:7000");
        assert_eq!(by_id["r2"].instance, Instance::Terminating, "deletion timestamp: on its way out");
        assert_eq!(by_id["r3"].instance, Instance::Gone, "member without a pod");
        // A removed member whose pod was terminating and is now gone keeps its id, so
        // its replacement gets its name back.
        let mut record = record();
        record.terminating_since.insert("r9".into(), 0);
        let observed = observe(&rsvc(), &pods, &MembershipView::default(), &BTreeMap::new(), &record);
        assert!(observed.iter().any(|o| o.id == "r9" && o.instance == Instance::Gone), "{observed:?}");
    }

    #[test]
    fn status_reports_primary_readiness_and_conditions() {
        let mut record = record();
        record.failovers = 3;
        let observed: Vec<Observed> = ["r1", "r2", "r3"]
            .iter()
            .map(|id| Observed {
                id: (*id).into(),
                address: format!("{id}:7000"),
                instance: Instance::Running,
                liveness: if *id == "r3" {
                    Liveness::Alive { ready: false }
                } else {
                    Liveness::Alive { ready: true }
                },
                facts: None,
            })
            .collect();
        let status = build_status(
            &rsvc(),
            &Spec::default(),
            &[],
            &record,
            &observed,
            &BTreeMap::new(),
            &MembershipView::default(),
            1_000,
        );
        assert_eq!(
            (status.epoch, status.primary.as_deref(), status.ready.as_deref()),
            (5, Some("demo-r1"), Some("2/3"))
        );
        assert_eq!(status.mode.as_deref(), Some("passive"));
        let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).map(|c| c.status.clone());
        assert_eq!(condition("Available").as_deref(), Some("True"));
        assert_eq!(condition("Degraded").as_deref(), Some("True"));
        assert_eq!(condition("SpecValid").as_deref(), Some("True"));
        assert!(status.last_failover_time.is_some(), "a new failover is timestamped");
        assert_eq!(status.members.iter().find(|m| m.id == "r1").map(|m| m.role.as_str()), Some("primary"));
    }

    #[test]
    fn the_scale_subresource_reads_running_replica_pods_and_their_selector() {
        // r1 and r2 run, r3's pod is being deleted, r4 (a member) has no pod at all.
        let mut record = record();
        if let Some(config) = record.config.as_mut() {
            config.members.push(pb::Member { id: "r4".into(), address: "r4:7000".into() });
        }
        let pods = vec![
            pod("r1", Some("10.0.0.1"), false),
            pod("r2", Some("10.0.0.2"), false),
            pod("r3", Some("10.0.0.3"), true),
        ];
        let observed = observe(&rsvc(), &pods, &MembershipView::default(), &BTreeMap::new(), &record);
        let status = build_status(
            &rsvc(),
            &Spec { replicas: 4, ..Spec::default() },
            &[],
            &record,
            &observed,
            &BTreeMap::new(),
            &MembershipView::default(),
            0,
        );
        assert_eq!(status.replicas, 2, "running pods only: {:?}", status.members);
        assert_eq!(status.selector.as_deref(), Some("tandem.dev/service=demo"));
        let json = serde_json::to_value(&status).expect("a status serializes");
        assert_eq!(
            (json["replicas"].as_i64(), json["selector"].as_str()),
            (Some(2), Some("tandem.dev/service=demo"))
        );
    }

    #[test]
    fn an_invalid_spec_is_a_false_condition_with_the_reason() {
        let problems =
            vec!["checkpoint interval (10 ms) is shorter than the heartbeat interval (100 ms)".to_owned()];
        let status = build_status(
            &rsvc(),
            &Spec::default(),
            &problems,
            &Record::default(),
            &[],
            &BTreeMap::new(),
            &MembershipView::default(),
            0,
        );
        let valid = status.conditions.iter().find(|c| c.type_ == "SpecValid").expect("condition");
        assert_eq!((valid.status.as_str(), valid.reason.as_str()), ("False", "InvalidSpec"));
        assert!(valid.message.contains("checkpoint interval"));
    }
}
