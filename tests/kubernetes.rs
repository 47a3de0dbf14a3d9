//! End-to-end tests on a real Kubernetes: what a user does, with real binaries in real
//! pods. They need the test cluster (tests/cluster/cluster.sh up) and the image
//! `tandem:e2e`; `.ci/run` provides both and runs them with
//! `cargo test --test kubernetes -- --ignored --test-threads=1`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use support::kubernetes::{self as k8s, healthy, kubectl, kubectl_apply, manifest};
use support::verdict;
use support::workload::{self, Recorder, Workload};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

const UP: Duration = Duration::from_secs(90);
const HEAL: Duration = Duration::from_secs(90);

async fn verify(
    namespace: &str,
    rsvc: &tandem_operator::crd::ReplicatedService,
    recorder: &Arc<Recorder>,
    stop: CancellationToken,
    writers: tokio::task::JoinSet<()>,
) {
    let live = k8s::member_addresses(rsvc);
    if let Err(failure) = verdict::stop_and_verify(&live, recorder, stop, writers).await {
        k8s::dump(namespace);
        panic!("{failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn helm_install_and_a_passive_service_comes_up_with_its_status_and_columns() {
    let client = k8s::installed().await;
    let (lint_ok, lint, lint_err) =
        k8s::run("helm", &["lint", &format!("{}/charts/tandem", env!("CARGO_MANIFEST_DIR"))], None);
    assert!(lint_ok && lint.contains("1 chart(s) linted, 0 failed"), "helm lint: {lint}{lint_err}");
    let ns = k8s::namespace(&client, "e2e-up").await;
    kubectl_apply(&ns, &k8s::example("passive.yaml")).expect("apply the example");
    let up = k8s::wait_for(&client, &ns, "demo", UP, "up", healthy(3, 0)).await;
    let status = up.status.clone().expect("status");
    assert_eq!(
        (status.epoch, status.mode.as_deref(), status.ready.as_deref()),
        (1, Some("passive"), Some("3/3"))
    );
    assert!(status.primary.as_deref().is_some_and(|p| p.starts_with("demo-r")), "{status:?}");
    assert_eq!(status.members.len(), 3);
    assert!(
        status.members.iter().all(|m| m.ready && m.address.is_some() && m.last_heartbeat.is_some()),
        "{:?}",
        status.members
    );
    let available = status.conditions.iter().find(|c| c.type_ == "Available").expect("Available condition");
    assert_eq!(available.status, "True");

    let columns = kubectl(&["get", "rsvc", "-n", &ns]);
    let header: Vec<&str> = columns.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, vec!["NAME", "MODE", "READY", "PRIMARY", "EPOCH", "AGE"], "{columns}");
    let row = columns.lines().nth(1).unwrap_or_default();
    assert!(
        row.contains("passive")
            && row.contains("3/3")
            && row.contains(status.primary.as_deref().unwrap_or("?")),
        "{columns}"
    );
    let short = kubectl(&["get", "rsvc", "demo", "-n", &ns, "-o", "jsonpath={.status.epoch}"]);
    assert_eq!(short, "1");

    // The pods carry the replica and its LFD, labelled by role; the Services exist.
    let pods = k8s::pods(&client, &ns).await;
    assert_eq!(pods.len(), 3);
    let roles: Vec<String> =
        pods.iter().filter_map(|p| p.metadata.labels.as_ref()?.get("tandem.dev/role").cloned()).collect();
    assert_eq!(roles.iter().filter(|r| *r == "primary").count(), 1, "{roles:?}");
    let services = kubectl(&["get", "svc,pdb", "-n", &ns, "-o", "name"]);
    for expected in ["service/demo", "service/demo-peers", "poddisruptionbudget.policy/demo"] {
        assert!(services.contains(expected), "{expected} missing: {services}");
    }
    // And it serves: a client writes and reads through the pod IPs.
    let mut client_lib =
        tandem_replica::client::Client::new(tandem_replica::client::ClientSettings::new(k8s::endpoints(&up)))
            .expect("client");
    client_lib.put("hello", "kubernetes").await.expect("put");
    assert_eq!(client_lib.get("hello").await.expect("get").as_deref(), Some(&b"kubernetes"[..]));
}

/// Deletes `pod` and waits until the group is whole again at a higher epoch, with a new
/// pod in place of the deleted one (under its name if the old pod was gone in time, else
/// under a new one: the group never waits for a pod that takes its time to terminate).
async fn kill_pod_and_heal(
    client: &kube::Client,
    ns: &str,
    name: &str,
    pod: &str,
    replicas: usize,
) -> tandem_operator::crd::ReplicatedService {
    let before = k8s::rsvc(client, ns, name).await;
    let epoch = before.status.as_ref().map_or(0, |s| s.epoch);
    let old_uids = k8s::pod_uids(&k8s::pods(client, ns).await);
    k8s::delete_pod(client, ns, pod).await;
    let healed = k8s::wait_for(
        client,
        ns,
        name,
        HEAL,
        &format!("healed after deleting {pod}"),
        healthy(replicas, epoch),
    )
    .await;
    let pods = k8s::pods(client, ns).await;
    assert!(
        pods.iter().any(|p| p.uid().is_some_and(|uid| !old_uids.contains(&uid))),
        "a new pod was created"
    );
    healed
}

async fn failover_story(mode: &str, ns_name: &str) -> Arc<Recorder> {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, ns_name).await;
    kubectl_apply(&ns, &manifest("svc", mode, 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "svc", UP, "up", healthy(3, 0)).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::endpoints(&up), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    // The primary's pod is deleted: a new primary, a replacement pod that rejoins.
    let primary = up.status.as_ref().and_then(|s| s.primary.clone()).expect("primary");
    let after_primary = kill_pod_and_heal(&client, &ns, "svc", &primary, 3).await;
    let new_primary = after_primary.status.as_ref().and_then(|s| s.primary.clone()).expect("primary");
    assert_ne!(new_primary, primary, "a new primary was elected");
    assert!(
        after_primary.status.as_ref().is_some_and(|s| s.failovers >= 1 && s.last_failover_time.is_some())
    );
    sleep(Duration::from_secs(1)).await;

    // Then a backup's pod.
    let backup = k8s::a_backup(&after_primary);
    let healed = kill_pod_and_heal(&client, &ns, "svc", &backup, 3).await;
    assert_eq!(
        healed.status.as_ref().and_then(|s| s.primary.clone()),
        Some(new_primary),
        "a backup died: the primary stays"
    );
    sleep(Duration::from_secs(1)).await;

    verify(&ns, &healed, &recorder, stop, writers).await;
    let reasons = k8s::event_reasons(&client, &ns, "svc").await;
    for expected in ["Failover", "Recreated", "Reconfigured"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event: {reasons:?}");
    }
    recorder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn deleting_the_primary_then_a_backup_pod_heals_without_losing_a_write() {
    failover_story("passive", "e2e-passive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn active_mode_survives_pod_deletions_with_no_failed_request() {
    let recorder = failover_story("active", "e2e-active").await;
    assert_eq!(recorder.failures(), Vec::<String>::new(), "active mode: no client request may fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn scaling_switching_mode_and_changing_heartbeat_on_a_live_service_lose_nothing() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-live").await;
    kubectl_apply(&ns, &manifest("live", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "live", UP, "up", healthy(3, 0)).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::endpoints(&up), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    let epoch = |r: &tandem_operator::crd::ReplicatedService| r.status.as_ref().map_or(0, |s| s.epoch);
    kubectl_apply(&ns, &manifest("live", "passive", 5, "")).expect("scale to 5");
    let five = k8s::wait_for(&client, &ns, "live", HEAL, "at 5", healthy(5, epoch(&up))).await;
    kubectl_apply(&ns, &manifest("live", "active", 5, "")).expect("switch to active");
    let active = k8s::wait_for(&client, &ns, "live", HEAL, "active", |r| {
        r.status.as_ref().is_some_and(|s| s.mode.as_deref() == Some("active")) && healthy(5, 0)(r)
    })
    .await;
    assert!(epoch(&active) > epoch(&five));
    kubectl_apply(&ns, &manifest("live", "active", 3, "  heartbeatIntervalMs: 200\n"))
        .expect("scale to 3, slower heartbeat");
    let three = k8s::wait_for(&client, &ns, "live", HEAL, "at 3", healthy(3, epoch(&active))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while k8s::pods(&client, &ns).await.len() != 3 {
        assert!(tokio::time::Instant::now() < deadline, "the removed replicas' pods were not deleted");
        sleep(Duration::from_millis(500)).await;
    }
    let gfd = kubectl(&["logs", "-n", k8s::OPERATOR_NAMESPACE, "deploy/tandem-operator", "-c", "gfd"]);
    assert!(
        gfd.contains("heartbeat_interval_ms: Some(200)"),
        "the new heartbeat reached the GFD (and from it the LFDs)"
    );
    verify(&ns, &three, &recorder, stop, writers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn invalid_manifests_are_refused_and_a_wrong_spec_is_a_false_condition() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-invalid").await;
    let refused = kubectl_apply(&ns, &manifest("bad", "passive", -1, "")).expect_err("replicas -1 accepted");
    assert!(refused.contains("spec.replicas"), "{refused}");
    let refused = kubectl_apply(&ns, &manifest("bad", "sideways", 3, "")).expect_err("unknown mode accepted");
    assert!(refused.contains("spec.mode"), "{refused}");
    assert!(kubectl(&["get", "rsvc", "-n", &ns, "-o", "name"]).trim().is_empty(), "nothing was created");

    // Valid for the schema, wrong in substance (checkpoints more often than heartbeats).
    kubectl_apply(
        &ns,
        &manifest("odd", "passive", 3, "  heartbeatIntervalMs: 500\n  checkpointIntervalMs: 100\n"),
    )
    .expect("a 1.20 API server has no CEL: the operator must catch this");
    let reported = k8s::wait_for(&client, &ns, "odd", UP, "reported invalid", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "SpecValid" && c.status == "False"))
    })
    .await;
    let condition = reported
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "SpecValid")
        .expect("condition");
    assert!(condition.message.contains("checkpoint interval"), "{condition:?}");
    assert!(k8s::pods(&client, &ns).await.is_empty(), "no replica started for an invalid spec");
    // Fixing the spec brings the service up.
    kubectl_apply(
        &ns,
        &manifest("odd", "passive", 3, "  heartbeatIntervalMs: 500\n  checkpointIntervalMs: 1000\n"),
    )
    .expect("fix");
    k8s::wait_for(&client, &ns, "odd", UP, "up once fixed", healthy(3, 0)).await;
    let reasons = k8s::event_reasons(&client, &ns, "odd").await;
    assert!(reasons.iter().any(|r| r == "InvalidSpec"), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn operator_restart_disturbs_nothing_and_a_failover_across_it_completes() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-operator").await;
    kubectl_apply(&ns, &manifest("steady", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "steady", UP, "up", healthy(3, 0)).await;
    let epoch = up.status.as_ref().map_or(0, |s| s.epoch);
    let uids = k8s::pod_uids(&k8s::pods(&client, &ns).await);

    // Steady state: the operator pod is deleted and replaced.
    kubectl(&[
        "delete",
        "pod",
        "-n",
        k8s::OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=tandem-operator",
        "--wait=true",
    ]);
    kubectl(&[
        "-n",
        k8s::OPERATOR_NAMESPACE,
        "rollout",
        "status",
        "deploy/tandem-operator",
        "--timeout=120s",
    ]);
    sleep(Duration::from_secs(8)).await;
    let after = k8s::rsvc(&client, &ns, "steady").await;
    assert_eq!(after.status.as_ref().map(|s| s.epoch), Some(epoch), "no epoch wasted");
    assert_eq!(k8s::pod_uids(&k8s::pods(&client, &ns).await), uids, "no replica disturbed");

    // During a failover: the primary's pod and the operator pod go at once, under a
    // writing client.
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::endpoints(&after), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;
    let primary = after.status.as_ref().and_then(|s| s.primary.clone()).expect("primary");
    let deleted_at = recorder.now();
    let started = tokio::time::Instant::now();
    k8s::delete_pod(&client, &ns, &primary).await;
    kubectl(&[
        "delete",
        "pod",
        "-n",
        k8s::OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=tandem-operator",
        "--wait=false",
    ]);
    let healed =
        k8s::wait_for(&client, &ns, "steady", HEAL, "failed over across the restart", healthy(3, epoch + 1))
            .await;
    eprintln!(
        "kubernetes: deleted {primary} and the operator pod at once: first acknowledged write after {:?} ms, whole again after {} ms",
        recorder.first_write_acknowledged_after(deleted_at).map(|d| d.as_millis()),
        started.elapsed().as_millis()
    );
    assert_ne!(healed.status.as_ref().and_then(|s| s.primary.clone()), Some(primary));
    verify(&ns, &healed, &recorder, stop, writers).await;
}

/// The README's walkthrough with the chart's defaults and the example manifest, as a
/// user runs it: deletes the primary's pod, then a backup's, then a pod that cannot
/// finish terminating (a finalizer holds it), each under writing clients. Each heals to
/// full strength; the figures are printed: pod deleted -> first acknowledged write, and
/// -> replacement ready as a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn the_example_service_heals_from_primary_backup_and_stuck_pod_deletions() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-heal").await;
    kubectl_apply(&ns, &k8s::example("passive.yaml")).expect("apply the example");
    let up = k8s::wait_for(&client, &ns, "demo", UP, "up", healthy(3, 0)).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::endpoints(&up), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    let primary = up.status.as_ref().and_then(|s| s.primary.clone()).expect("primary");
    let after_primary = timed_pod_deletion(&client, &ns, "demo", &primary, &recorder, false).await;
    let backup = k8s::a_backup(&after_primary);
    let after_backup = timed_pod_deletion(&client, &ns, "demo", &backup, &recorder, false).await;
    // A pod that takes its time to terminate (here: forever, until its finalizer goes)
    // must not keep the group short: it is replaced under a new name.
    let stuck = k8s::a_backup(&after_backup);
    let healed = timed_pod_deletion(&client, &ns, "demo", &stuck, &recorder, true).await;
    assert!(
        healed.status.as_ref().is_some_and(|s| !s.members.iter().any(|m| m.name == stuck && m.ready)),
        "the stuck pod is not a member"
    );
    kubectl(&[
        "patch",
        "pod",
        &stuck,
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    verify(&ns, &healed, &recorder, stop, writers).await;
}

/// Deletes `pod` (held by a finalizer when `stuck`) under the writing clients; waits for
/// full strength at a higher epoch with a member that was not there before; prints how
/// long clients waited for a write and how long the group ran short.
async fn timed_pod_deletion(
    client: &kube::Client,
    ns: &str,
    name: &str,
    pod: &str,
    recorder: &Arc<Recorder>,
    stuck: bool,
) -> tandem_operator::crd::ReplicatedService {
    let before = k8s::rsvc(client, ns, name).await;
    let epoch = before.status.as_ref().map_or(0, |s| s.epoch);
    if stuck {
        kubectl(&[
            "patch",
            "pod",
            pod,
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":["tandem.dev/test-hold"]}}"#,
        ]);
    }
    let deleted_at = recorder.now();
    let started = tokio::time::Instant::now();
    k8s::delete_pod(client, ns, pod).await;
    let old_uids = k8s::pod_uids(&k8s::pods(client, ns).await);
    let healed = k8s::wait_for(client, ns, name, HEAL, &format!("whole again after deleting {pod}"), |r| {
        healthy(3, epoch)(r)
    })
    .await;
    let whole_ms = started.elapsed().as_millis();
    let first_write = recorder.first_write_acknowledged_after(deleted_at).map(|d| d.as_millis());
    let members: Vec<String> =
        healed.status.iter().flat_map(|s| &s.members).map(|m| m.name.clone()).collect();
    eprintln!(
        "kubernetes: deleted {pod}{}: first acknowledged write after {first_write:?} ms, replacement ready as a member after {whole_ms} ms (members {members:?})",
        if stuck { " (held by a finalizer)" } else { "" }
    );
    let pods = k8s::pods(client, ns).await;
    assert!(
        pods.iter().any(|p| p.uid().is_some_and(|uid| !old_uids.contains(&uid))),
        "a new pod was created"
    );
    healed
}

/// What a node drain on a one-node cluster does: every pod of the service deleted at
/// once. With state in memory, the data is gone; the user is told so (a condition and
/// a Warning event, with the one command that recreates the group), and that command
/// brings an empty group back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn deleting_every_pod_at_once_is_reported_and_the_annotation_recreates_the_group() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-lost").await;
    kubectl_apply(&ns, &k8s::example("passive.yaml")).expect("apply the example");
    let up = k8s::wait_for(&client, &ns, "demo", UP, "up", healthy(3, 0)).await;
    let mut writer =
        tandem_replica::client::Client::new(tandem_replica::client::ClientSettings::new(k8s::endpoints(&up)))
            .expect("client");
    writer.put("before", "the loss").await.expect("put");
    let epoch = up.status.as_ref().map_or(0, |s| s.epoch);

    kubectl(&["delete", "pods", "-n", &ns, "-l", "tandem.dev/service=demo", "--wait=false"]);
    let lost = k8s::wait_for(&client, &ns, "demo", HEAL, "reported lost", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Available" && c.reason == "GroupLost"))
    })
    .await;
    let condition = lost
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Available").cloned())
        .expect("condition");
    let command = condition
        .message
        .split("To start over with an empty group: ")
        .nth(1)
        .expect("the command")
        .to_owned();
    assert!(command.starts_with("kubectl annotate rsvc demo"), "{}", condition.message);
    let lost_epoch = lost.status.as_ref().map_or(0, |s| s.epoch);
    assert!(lost_epoch >= epoch);
    let reasons = k8s::event_reasons(&client, &ns, "demo").await;
    assert!(reasons.iter().any(|r| r == "GroupLost"), "{reasons:?}");
    // Nothing happens by itself: the loss is the user's to accept.
    sleep(Duration::from_secs(5)).await;
    let still = k8s::rsvc(&client, &ns, "demo").await;
    assert_eq!(still.status.as_ref().map(|s| s.epoch), Some(lost_epoch), "no group was made up");

    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    kubectl(&args);
    let recreated = k8s::wait_for(&client, &ns, "demo", HEAL, "recreated", healthy(3, lost_epoch)).await;
    let mut client_lib = tandem_replica::client::Client::new(tandem_replica::client::ClientSettings::new(
        k8s::endpoints(&recreated),
    ))
    .expect("client");
    assert_eq!(client_lib.get("before").await.expect("get"), None, "an empty group, as announced");
    client_lib.put("after", "recreation").await.expect("put");
    assert_eq!(client_lib.get("after").await.expect("get").as_deref(), Some(&b"recreation"[..]));
}
