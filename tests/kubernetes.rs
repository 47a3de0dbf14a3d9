//! End-to-end tests on a real Kubernetes: what a user does, with real binaries in real
//! pods. They need the test cluster (tests/cluster/cluster.sh up) and the image
//! `tandem:e2e`; `.ci/run` provides both and runs them with
//! `cargo test --test kubernetes -- --ignored --test-threads=1`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use support::kubernetes::{self as k8s, healthy, kubectl, kubectl_apply, manifest};
use support::pod_security;
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
    let live = k8s::member_target(rsvc).await;
    if let Err(failure) = verdict::stop_and_verify(live, recorder, stop, writers).await {
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
        tandem_replica::client::Client::new(k8s::target(&up).await.client_settings()).expect("client");
    client_lib.put("hello", "kubernetes").await.expect("put");
    assert_eq!(client_lib.get("hello").await.expect("get").as_deref(), Some(&b"kubernetes"[..]));

    // The client ports serve TLS by default: a plaintext client gets nowhere.
    let mut plaintext = tandem_replica::client::ClientSettings::new(k8s::endpoints(&up));
    plaintext.deadline = Duration::from_secs(3);
    let mut plaintext = tandem_replica::client::Client::new(plaintext).expect("client");
    plaintext.put("hello", "plaintext").await.expect_err("the client port asks for TLS");

    // The example client Job, as a user applies it, with the members' pod IPs for the
    // client Service (this cluster has no kube-proxy) and the suite's image.
    let job = std::fs::read_to_string(format!("{}/examples/client.yaml", env!("CARGO_MANIFEST_DIR")))
        .expect("the example client")
        .replace("demo:7000", &k8s::endpoints(&up).join(","))
        .replace("tandem:0.1.0", k8s::IMAGE);
    kubectl_apply(&ns, &job).expect("apply the example client");
    let (done, out, err) = k8s::run(
        "kubectl",
        &["wait", "-n", &ns, "--for=condition=complete", "job/demo-client", "--timeout=120s"],
        None,
    );
    let logs = kubectl(&["logs", "-n", &ns, "job/demo-client", "--all-containers"]);
    assert!(done, "the example client did not complete: {out}{err}\n{logs}");
    assert!(logs.contains("OK") && logs.contains("hello"), "{logs}");
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
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
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
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
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
        if tokio::time::Instant::now() > deadline {
            // Seen once in CI, not understood yet: say what the pods and the operator did.
            k8s::dump(&ns);
            eprintln!(
                "{}",
                kubectl(&[
                    "logs",
                    "-n",
                    k8s::OPERATOR_NAMESPACE,
                    "deploy/tandem-operator",
                    "-c",
                    "operator",
                    "--tail=200"
                ])
            );
            panic!("the removed replicas' pods were not deleted within 60 s");
        }
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
        workload::start(Workload::default(), k8s::target(&after).await, Arc::clone(&recorder), stop.clone());
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
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
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

/// Certificate rotation, with the chart's validity cut to 180 s (renewal at 120 s, which
/// leaves a minute for a round of three): under a writing client, every replica pod is
/// replaced, one at a time, by one with newer certificates (its annotation), the primary
/// last, after a planned switchover to a renewed backup; the operator and its GFD restart
/// for their own. The group is
/// whole again afterwards and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn short_lived_certificates_are_rotated_pod_by_pod_without_losing_a_write() {
    // Renewal starts two thirds in; the last third (100 s) must fit three pod
    // replacements and a switchover on a loaded 2-core CI machine, where one step once
    // took 52 s. Slower than that, the primary goes by a failover in the last twentieth
    // (`CertificateExpiring`), not by the switchover this test asks for.
    const VALIDITY_S: i64 = 300;
    const ROTATED: Duration = Duration::from_secs(540);
    let client = k8s::installed().await;
    let _short = k8s::ChartValues::set(&[&format!("tls.certificateValiditySeconds={VALIDITY_S}")]);
    let ns = k8s::namespace(&client, "e2e-rotate").await;
    kubectl_apply(&ns, &manifest("rot", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "rot", UP, "up", healthy(3, 0)).await;
    let not_after = |pod: &k8s_openapi::api::core::v1::Pod| -> i64 {
        pod.annotations()
            .get("tandem.dev/certificate-not-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} records no certificate expiry", pod.name_any()))
    };
    let first = k8s::pods(&client, &ns).await;
    let first_uids = k8s::pod_uids(&first);
    let first_expiry = first.iter().map(not_after).max().expect("pods");
    let now = tandem_replica::wire::unix_ms() as i64 / 1000;
    assert!(first_expiry <= now + VALIDITY_S, "the chart's validity reached the operator");
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());

    // Done when no first pod is left, every pod holds newer certificates, and the group
    // is whole (the RM rotates one pod at a time, so this is a whole group between two).
    let epoch = up.status.as_ref().map_or(0, |s| s.epoch);
    let deadline = tokio::time::Instant::now() + ROTATED;
    let rotated = loop {
        let pods = k8s::pods(&client, &ns).await;
        let renewed = pods.len() == 3
            && pods.iter().all(|p| {
                p.uid().is_some_and(|uid| !first_uids.contains(&uid))
                    && p.metadata.deletion_timestamp.is_none()
                    && not_after(p) > first_expiry
            });
        let current = k8s::rsvc(&client, &ns, "rot").await;
        if renewed && healthy(3, epoch)(&current) {
            break current;
        }
        if tokio::time::Instant::now() > deadline {
            k8s::dump(&ns);
            panic!("not every pod rotated within {ROTATED:?}: {:#?}", current.status);
        }
        sleep(Duration::from_secs(1)).await;
    };
    let reasons = k8s::event_reasons(&client, &ns, "rot").await;
    let rotations = reasons.iter().filter(|r| *r == "CertificateRotation").count();
    assert!(rotations >= 3, "a CertificateRotation event per pod: {reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "Switchover"),
        "the primary handed over by a planned switchover: {reasons:?}"
    );
    assert_ne!(
        rotated.status.as_ref().and_then(|s| s.primary.clone()),
        up.status.as_ref().and_then(|s| s.primary.clone()),
        "the first primary's pod is gone"
    );
    // The next round is a minute away at least: the replaced pods are fresh.
    verify(&ns, &rotated, &recorder, stop, writers).await;
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
        tandem_replica::client::Client::new(k8s::target(&up).await.client_settings()).expect("client");
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
    let mut client_lib =
        tandem_replica::client::Client::new(k8s::target(&recreated).await.client_settings()).expect("client");
    assert_eq!(client_lib.get("before").await.expect("get"), None, "an empty group, as announced");
    client_lib.put("after", "recreation").await.expect("put");
    assert_eq!(client_lib.get("after").await.expect("get").as_deref(), Some(&b"recreation"[..]));
}

/// Every replica pod the operator created, read back from the API server, meets Pod
/// Security "restricted" field by field (and has a read-only root filesystem), runs under
/// its own ServiceAccount with no token mounted, and still serves. The namespace is
/// labelled to enforce "restricted": API servers with the PodSecurity admission plugin
/// (1.23+) would refuse any pod that breaks it; this 1.20 one has no such plugin, hence
/// the field-by-field check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn replica_pods_meet_the_restricted_pod_security_profile_and_hold_no_api_token() {
    let client = k8s::installed().await;
    let restricted = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/enforce-version", "latest"),
    ];
    let ns = k8s::namespace_labelled(&client, "e2e-restricted", &restricted).await;
    kubectl_apply(&ns, &k8s::example("passive.yaml")).expect("apply the example");
    let up = k8s::wait_for(&client, &ns, "demo", UP, "up", healthy(3, 0)).await;

    let pods = k8s::pods(&client, &ns).await;
    assert_eq!(pods.len(), 3);
    for pod in &pods {
        let json = serde_json::to_value(pod).expect("pod as JSON");
        let violations = pod_security::restricted_violations(&json);
        assert!(violations.is_empty(), "{} breaks restricted: {violations:#?}", pod.name_any());
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("demo-replica"), "{}", pod.name_any());
        assert_eq!(spec.automount_service_account_token, Some(false));
        let token_mounted = spec
            .containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .any(|m| m.mount_path.starts_with("/var/run/secrets/kubernetes.io"));
        assert!(!token_mounted, "{}: no service-account token in a replica pod", pod.name_any());
    }
    let account = kubectl(&["get", "serviceaccount", "demo-replica", "-n", &ns, "-o", "json"]);
    let account: serde_json::Value = serde_json::from_str(&account).expect("service account");
    assert_eq!(account["automountServiceAccountToken"], false, "{account}");
    assert_eq!(account["metadata"]["ownerReferences"][0]["name"], "demo", "deleted with the service");

    // With a read-only root filesystem and no capability, the group still serves.
    let mut client_lib =
        tandem_replica::client::Client::new(k8s::target(&up).await.client_settings()).expect("client");
    client_lib.put("restricted", "still serving").await.expect("put");
    assert_eq!(client_lib.get("restricted").await.expect("get").as_deref(), Some(&b"still serving"[..]));
}

/// The operator pod as the chart makes it: "restricted" in every field but the host
/// network this test cluster needs (no kube-proxy: tests/cluster/README.md), and fully
/// "restricted" with the chart's default `hostNetwork: false`. Host networking (and the
/// host port it implies) is refused even by "baseline": the operator's namespace is
/// therefore not labelled here, only the replicas' (see the chart's values.yaml).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn the_operator_pod_is_restricted_but_for_the_host_network_this_cluster_needs() {
    let client = k8s::installed().await;
    let operators = kubectl(&[
        "get",
        "pods",
        "-n",
        k8s::OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=tandem-operator",
        "-o",
        "json",
    ]);
    let operators: serde_json::Value = serde_json::from_str(&operators).expect("pod list");
    let pods = operators["items"].as_array().expect("items");
    assert!(!pods.is_empty(), "the operator runs");
    for pod in pods {
        let violations = pod_security::restricted_violations(pod);
        let host_network_only =
            violations.iter().all(|v| v == "spec.hostNetwork is true" || v.contains("hostPort"));
        assert!(host_network_only, "only the host network breaks restricted: {violations:#?}");
    }
    drop(client);

    let rendered = k8s::helm_template("{}");
    let deployment = rendered.iter().find(|o| o["kind"] == "Deployment").expect("the operator Deployment");
    let template = &deployment["spec"]["template"];
    assert_eq!(pod_security::restricted_violations(template), Vec::<String>::new(), "chart defaults");
}

/// The operator may do exactly what operator/src does (the API server's own list of its
/// permissions, in a service's namespace and in its own), checked with `kubectl auth
/// can-i` for each call and for a sample of what it must not do; the replicas'
/// ServiceAccount may do nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn operator_rbac_is_exactly_what_it_uses_and_the_replicas_can_do_nothing() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-rbac").await;
    // Cluster-wide (the ClusterRole): every call of controller.rs and the event recorder,
    // and the Secrets the replicas' certificates live in.
    let uses = [
        "tandem.dev/replicatedservices list",
        "tandem.dev/replicatedservices watch",
        "tandem.dev/replicatedservices/status update",
        "tandem.dev/replicatedservices/finalizers update",
        "/pods list",
        "/pods watch",
        "/pods create",
        "/pods delete",
        "/pods patch",
        "/services create",
        "/services patch",
        "/serviceaccounts create",
        "/serviceaccounts patch",
        "policy/poddisruptionbudgets create",
        "policy/poddisruptionbudgets patch",
        "/secrets get",
        "/secrets list",
        "/secrets watch",
        "/secrets create",
        "/secrets update",
        "/secrets patch",
        "/secrets delete",
        "/persistentvolumeclaims list",
        "/persistentvolumeclaims create",
        "/persistentvolumeclaims delete",
        "events.k8s.io/events create",
        "events.k8s.io/events patch",
    ];
    // Its own namespace only (the Role): leader.rs's lease.
    let leader = [
        "coordination.k8s.io/leases get",
        "coordination.k8s.io/leases create",
        "coordination.k8s.io/leases update",
    ];
    let granted = |namespace: &str| -> Vec<String> {
        k8s::permissions(k8s::OPERATOR_ACCOUNT, namespace)
            .into_iter()
            .filter(|p| !k8s::everyone_may(p))
            .collect()
    };
    let sorted = |items: &[&str]| {
        let mut items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
        items.sort();
        items
    };
    assert_eq!(granted(&ns), sorted(&uses), "in a service's namespace");
    assert_eq!(
        granted(k8s::OPERATOR_NAMESPACE),
        sorted(&[&uses[..], &leader[..]].concat()),
        "in its own namespace"
    );

    for permission in uses {
        let (resource, verb) = permission.split_once(' ').expect("resource verb");
        let (group, resource) = resource.split_once('/').expect("group/resource");
        // kubectl's spelling: resource.group[/subresource].
        let resource = match (group, resource.split_once('/')) {
            ("", _) => resource.to_owned(),
            (group, Some((name, subresource))) => format!("{name}.{group}/{subresource}"),
            (group, None) => format!("{resource}.{group}"),
        };
        assert!(
            k8s::can_i(k8s::OPERATOR_ACCOUNT, verb, &resource, &ns),
            "the operator may {verb} {resource}"
        );
    }
    for (verb, resource) in [("get", "leases.coordination.k8s.io"), ("update", "leases.coordination.k8s.io")]
    {
        assert!(
            k8s::can_i(k8s::OPERATOR_ACCOUNT, verb, resource, k8s::OPERATOR_NAMESPACE),
            "{verb} {resource}"
        );
        assert!(
            !k8s::can_i(k8s::OPERATOR_ACCOUNT, verb, resource, &ns),
            "{verb} {resource}: own namespace only"
        );
    }
    for (verb, resource) in [
        ("get", "replicatedservices.tandem.dev"),
        ("update", "replicatedservices.tandem.dev"),
        ("delete", "replicatedservices.tandem.dev"),
        ("create", "pods/exec"),
        ("get", "pods/log"),
        ("update", "pods"),
        ("delete", "services"),
        ("delete", "serviceaccounts"),
        ("create", "serviceaccounts/token"),
        ("get", "configmaps"),
        ("create", "deployments.apps"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts"),
        ("get", "nodes"),
        ("delete", "namespaces"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ] {
        assert!(
            !k8s::can_i(k8s::OPERATOR_ACCOUNT, verb, resource, &ns),
            "the operator may not {verb} {resource}"
        );
    }

    // The replicas: the account of a real replica pod, read back, may do nothing.
    kubectl_apply(&ns, &manifest("lone", "passive", 1, "")).expect("apply");
    k8s::wait_for(&client, &ns, "lone", UP, "up", healthy(1, 0)).await;
    let pods = k8s::pods(&client, &ns).await;
    let account = pods[0].spec.as_ref().and_then(|s| s.service_account_name.clone()).expect("an account");
    let replica = format!("system:serviceaccount:{ns}:{account}");
    let granted: Vec<String> =
        k8s::permissions(&replica, &ns).into_iter().filter(|p| !k8s::everyone_may(p)).collect();
    assert_eq!(granted, Vec::<String>::new(), "the replicas may do nothing");
    for (verb, resource) in [
        ("get", "pods"),
        ("list", "secrets"),
        ("get", "replicatedservices.tandem.dev"),
        ("update", "replicatedservices.tandem.dev/status"),
        ("create", "events.events.k8s.io"),
        ("get", "leases.coordination.k8s.io"),
        ("list", "configmaps"),
        ("get", "endpoints"),
    ] {
        assert!(!k8s::can_i(&replica, verb, resource, &ns), "a replica may not {verb} {resource}");
    }
}

/// The chart's optional NetworkPolicy: off by default; on, one policy per listed group in
/// the group's namespace, admitting the group's own pods and the operator to the
/// internal port and anyone to the client port. The test cluster's network plugin does
/// not enforce NetworkPolicy, so this checks the policy and has the API server validate
/// it (a server-side dry run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn the_chart_network_policy_admits_only_the_group_and_the_operator_to_the_internal_port() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-netpol").await;
    let policies = |values: &str| -> Vec<serde_json::Value> {
        k8s::helm_template(values).into_iter().filter(|o| o["kind"] == "NetworkPolicy").collect()
    };
    assert!(policies("{}").is_empty(), "off by default");
    let values = format!(
        "networkPolicy:\n  enabled: true\n  groups:\n    - {{namespace: {ns}, service: cart}}\n  operatorCIDRs: [\"10.0.0.5/32\"]\n"
    );
    let rendered = policies(&values);
    assert_eq!(rendered.len(), 1, "{rendered:#?}");
    let policy = &rendered[0];
    assert_eq!(policy["metadata"]["namespace"], ns.to_string());
    let group =
        serde_json::json!({"tandem.dev/service": "cart", "app.kubernetes.io/managed-by": "tandem-operator"});
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], group);
    assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let port_of = |rule: &serde_json::Value| rule["ports"][0]["port"].clone();
    let client_rule = rules.iter().find(|r| port_of(r) == "grpc").expect("a client-port rule");
    assert!(client_rule["from"].is_null(), "clients from anywhere: {client_rule}");
    let internal = rules.iter().find(|r| port_of(r) == "internal").expect("an internal-port rule");
    let from = internal["from"].as_array().expect("peers");
    assert_eq!(from.len(), 3, "{from:#?}");
    assert_eq!(from[0], serde_json::json!({"podSelector": {"matchLabels": group}}), "the group's own pods");
    assert_eq!(
        from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        k8s::OPERATOR_NAMESPACE
    );
    assert_eq!(from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "tandem-operator");
    assert_eq!(from[2], serde_json::json!({"ipBlock": {"cidr": "10.0.0.5/32"}}), "a host-network operator");
    assert_eq!(rules.len(), 2, "nothing else admitted: {rules:#?}");

    let (ok, out, err) =
        k8s::run("kubectl", &["apply", "--dry-run=server", "-f", "-"], Some(&policy.to_string()));
    assert!(ok, "the API server accepts the policy: {out}{err}");
    let (lint_ok, lint, lint_err) = k8s::run(
        "helm",
        &[
            "lint",
            &format!("{}/charts/tandem", env!("CARGO_MANIFEST_DIR")),
            "--set",
            "networkPolicy.enabled=true",
        ],
        None,
    );
    assert!(lint_ok && lint.contains("0 failed"), "helm lint: {lint}{lint_err}");
}

#[test]
fn the_restricted_checker_passes_a_compliant_pod_and_names_each_broken_field() {
    let compliant = serde_json::json!({
        "metadata": {},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "run", "emptyDir": {}}],
            "containers": [{
                "name": "c",
                "ports": [{"containerPort": 7000}],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                }
            }]
        }
    });
    assert_eq!(pod_security::restricted_violations(&compliant), Vec::<String>::new());
    let breaks: [fn(&mut serde_json::Value); 10] = [
        |p| p["spec"]["hostNetwork"] = true.into(),
        |p| p["spec"]["volumes"][0] = serde_json::json!({"name": "h", "hostPath": {"path": "/"}}),
        |p| p["spec"]["securityContext"]["runAsUser"] = 0.into(),
        |p| p["spec"]["securityContext"]["runAsNonRoot"] = false.into(),
        |p| p["spec"]["securityContext"]["seccompProfile"]["type"] = "Unconfined".into(),
        |p| p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = true.into(),
        |p| {
            p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                serde_json::json!(["NET_ADMIN"])
        },
        |p| p["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] = serde_json::json!([]),
        |p| p["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = false.into(),
        |p| p["spec"]["containers"][0]["ports"][0]["hostPort"] = 7000.into(),
    ];
    for (i, change) in breaks.iter().enumerate() {
        let mut pod = compliant.clone();
        change(&mut pod);
        let violations = pod_security::restricted_violations(&pod);
        assert_eq!(violations.len(), 1, "change {i}: {violations:?}");
    }
}

/// The user's CA instead of the operator's own (chart `tls.caSecret`): a
/// `kubernetes.io/tls` Secret holding a CA, as cert-manager writes for a Certificate
/// with `isCA: true` from the user's issuer (this cluster has no cert-manager; the Secret
/// is what the operator reads). The operator signs the pods' certificates with it and
/// hands it to clients, and the group serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn a_ca_given_in_a_cert_manager_secret_signs_every_certificate_of_the_group() {
    let client = k8s::installed().await;
    let ca = tandem_replica::tls::Authority::generate("the user's issuer").expect("a CA");
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: tandem-ca-from-issuer\ntype: kubernetes.io/tls\nstringData:\n  ca.crt: the issuer's own certificate, not this CA\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
        indent(ca.ca_pem()),
        indent(ca.key_pem())
    );
    kubectl_apply(k8s::OPERATOR_NAMESPACE, &secret).expect("the CA Secret");
    let given = k8s::ChartValues::set(&["tls.caSecret=tandem-ca-from-issuer"]);
    let ns = k8s::namespace(&client, "e2e-ca").await;
    kubectl_apply(&ns, &manifest("byo", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "byo", UP, "up", healthy(3, 0)).await;

    let target = k8s::target(&up).await;
    assert_eq!(target.credentials.ca.as_deref(), Some(ca.ca_pem()), "clients are given the user's CA");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), &ns);
    for pod in k8s::pods(&client, &ns).await {
        let secret = secrets.get(&format!("{}-tls", pod.name_any())).await.expect("the pod's certificates");
        let data = secret.data.expect("data");
        assert_eq!(data["ca.crt"].0, ca.ca_pem().as_bytes(), "{} trusts the user's CA", pod.name_any());
    }
    let mut client_lib = tandem_replica::client::Client::new(target.client_settings()).expect("client");
    client_lib.put("signed", "by the user's CA").await.expect("put");
    assert_eq!(client_lib.get("signed").await.expect("get").as_deref(), Some(&b"by the user's CA"[..]));
    drop(given);
    kubectl(&["delete", "secret", "-n", k8s::OPERATOR_NAMESPACE, "tandem-ca-from-issuer"]);
}

/// hostPath PersistentVolumes of a storage class of their own (the test cluster has no
/// provisioner; its one node is this machine), deleted with the value.
struct LocalVolumes {
    class: String,
    names: Vec<String>,
    root: tempfile::TempDir,
}

impl LocalVolumes {
    fn create(namespace: &str, count: usize) -> Self {
        let root = tempfile::tempdir().expect("a directory for the volumes");
        let class = format!("{namespace}-local");
        let mut names = Vec::new();
        for n in 0..count {
            let path = root.path().join(format!("v{n}"));
            std::fs::create_dir_all(&path).expect("volume dir");
            // The replicas run as nobody; hostPath volumes get no fsGroup ownership.
            let writable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777);
            std::fs::set_permissions(&path, writable).expect("chmod");
            let name = format!("{namespace}-v{n}");
            let pv = format!(
                "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  capacity:\n    storage: 256Mi\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: {class}\n  hostPath:\n    path: {}\n",
                path.display()
            );
            kubectl_apply("default", &pv).expect("create a PersistentVolume");
            names.push(name);
        }
        Self { class, names, root }
    }
}

impl Drop for LocalVolumes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ =
                std::process::Command::new("kubectl").args(["delete", "pv", name, "--wait=false"]).output();
        }
        let _ = &self.root;
    }
}

/// Issue 10: every pod of a service with storage deleted at once, under a writing
/// client (a node drain, a cluster upgrade). The operator recreates each replica under
/// its id, on its volume; they recover from their disks and the group resumes, whole,
/// with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn deleting_every_pod_of_a_durable_service_loses_no_acknowledged_write() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-durable").await;
    let volumes = LocalVolumes::create(&ns, 5);
    let storage = format!("  storage:\n    size: 128Mi\n    storageClassName: {}\n", volumes.class);
    kubectl_apply(&ns, &manifest("keep", "passive", 3, &storage)).expect("apply");
    let up = k8s::wait_for(&client, &ns, "keep", UP, "up", healthy(3, 0)).await;
    let claims = kubectl(&["get", "pvc", "-n", &ns, "-o", "name"]);
    assert_eq!(claims.lines().count(), 3, "one claim per replica: {claims}");
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while recorder.acked().len() < 100 {
        assert!(tokio::time::Instant::now() < deadline, "the workload made no progress");
        sleep(Duration::from_millis(50)).await;
    }
    let epoch = up.status.as_ref().map_or(0, |s| s.epoch);
    kubectl(&["delete", "pods", "-n", &ns, "-l", "tandem.dev/service=keep", "--wait=false"]);
    // The old writers lose their endpoints with the pods: stopped, their history kept.
    stop.cancel();
    let mut writers = writers;
    while writers.join_next().await.is_some() {}
    let back = k8s::wait_for(&client, &ns, "keep", HEAL, "back from the disks", healthy(3, epoch)).await;
    let reasons = k8s::event_reasons(&client, &ns, "keep").await;
    assert!(!reasons.iter().any(|r| r == "GroupLost"), "a durable group is never lost: {reasons:?}");
    let claims_after = kubectl(&["get", "pvc", "-n", &ns, "-o", "name"]);
    assert_eq!(claims_after, claims, "the same claims, re-attached");
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&back).await, Arc::clone(&recorder), stop.clone());
    verify(&ns, &back, &recorder, stop, writers).await;
}

/// Waits until the service's PodDisruptionBudget counts `members` ready members out of
/// `members` expected and allows one disruption.
async fn budget_allows_one_of(ns: &str, name: &str, members: i64) {
    k8s::wait_until(ns, HEAL, &format!("a budget of 1 over {members} members"), || {
        let status = k8s::budget_status(ns, name);
        let field = |key: &str| status[key].as_i64().unwrap_or(-1);
        let counts = (field("expectedPods"), field("currentHealthy"), field("desiredHealthy"));
        if counts == (members, members, members - 1) && field("disruptionsAllowed") == 1 {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
}

/// Waits until the workload has acknowledged some operations (so faults hit a live load).
async fn writing(ns: &str, recorder: &Arc<Recorder>) {
    k8s::wait_until(ns, UP, "writing", || match recorder.operations() {
        n if n >= 20 => Ok(()),
        n => Err(format!("{n} operations")),
    })
    .await;
}

/// `kubectl scale`, on a service whose manifest leaves `replicas` out (the API server
/// fills in the default, so the scale subresource has a count): up to 5 and back down to
/// 3 under a writing client, back to full strength each time within a bound, nothing
/// lost; the scale subresource and the PodDisruptionBudget follow the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn kubectl_scale_up_and_down_under_a_writing_client_loses_nothing() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-scale").await;
    let unset = format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: ReplicatedService\nmetadata:\n  name: scaled\nspec:\n  image: {}\n",
        k8s::IMAGE
    );
    kubectl_apply(&ns, &unset).expect("apply");
    let up = k8s::wait_for(&client, &ns, "scaled", UP, "up", healthy(3, 0)).await;
    assert_eq!(up.spec.replicas, Some(3), "the API server fills in the default count");
    let scale = k8s::scale(&ns, "scaled");
    assert_eq!(
        (&scale["spec"]["replicas"], &scale["status"]["replicas"], &scale["status"]["selector"]),
        (&3.into(), &3.into(), &"tandem.dev/service=scaled".into()),
        "{scale}"
    );
    // One node here: the preferred anti-affinity spreads nothing, and blocks nothing.
    for pod in k8s::pods(&client, &ns).await {
        let anti = pod.spec.and_then(|s| s.affinity?.pod_anti_affinity).expect("anti-affinity");
        let terms = anti.preferred_during_scheduling_ignored_during_execution.expect("preferred");
        assert_eq!(terms[0].pod_affinity_term.topology_key, "kubernetes.io/hostname");
    }
    budget_allows_one_of(&ns, "scaled", 3).await;

    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
    writing(&ns, &recorder).await;

    let epoch = |r: &tandem_operator::crd::ReplicatedService| r.status.as_ref().map_or(0, |s| s.epoch);
    let scaled = kubectl(&["scale", "rsvc/scaled", "-n", &ns, "--replicas=5"]);
    assert!(scaled.contains("scaled"), "{scaled}");
    let five = k8s::wait_for(&client, &ns, "scaled", HEAL, "at 5", healthy(5, epoch(&up))).await;
    assert_eq!(five.spec.replicas, Some(5));
    budget_allows_one_of(&ns, "scaled", 5).await;
    k8s::wait_until(&ns, HEAL, "5 replicas in the scale subresource", || {
        let scale = k8s::scale(&ns, "scaled");
        let counts = (scale["spec"]["replicas"].as_i64(), scale["status"]["replicas"].as_i64());
        if counts == (Some(5), Some(5)) { Ok(()) } else { Err(scale.to_string()) }
    })
    .await;

    kubectl(&["scale", "rsvc/scaled", "-n", &ns, "--replicas=3"]);
    let three = k8s::wait_for(&client, &ns, "scaled", HEAL, "at 3", healthy(3, epoch(&five))).await;
    k8s::wait_until(&ns, HEAL, "down to 3 pods, as the scale subresource says", || {
        let scale = k8s::scale(&ns, "scaled");
        let counts = (scale["spec"]["replicas"].as_i64(), scale["status"]["replicas"].as_i64());
        if counts == (Some(3), Some(3)) { Ok(()) } else { Err(scale.to_string()) }
    })
    .await;
    let deadline = tokio::time::Instant::now() + HEAL;
    while k8s::pods(&client, &ns).await.len() != 3 {
        assert!(tokio::time::Instant::now() < deadline, "the removed replicas' pods were not deleted");
        sleep(Duration::from_millis(500)).await;
    }
    budget_allows_one_of(&ns, "scaled", 3).await;
    let (ok, _, refused) = k8s::run("kubectl", &["scale", "rsvc/scaled", "-n", &ns, "--replicas=10"], None);
    assert!(!ok && refused.contains("spec.replicas"), "10 replicas refused by the schema: {refused}");
    verify(&ns, &three, &recorder, stop, writers).await;
}

/// Evictions (the API `kubectl drain` uses) respect the PodDisruptionBudget: with one
/// replica evicted, the eviction of a second is refused (429) until the first one's
/// replacement is back as a ready member (a replica that is merely ready, before the RM
/// adds it, does not count), then allowed; the group heals under a writing client and
/// loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn an_eviction_of_a_second_replica_is_refused_until_the_first_is_back_as_a_ready_member() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-evict").await;
    kubectl_apply(&ns, &manifest("drained", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "drained", UP, "up", healthy(3, 0)).await;
    budget_allows_one_of(&ns, "drained", 3).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
    writing(&ns, &recorder).await;

    let first = k8s::a_backup(&up);
    let second = up.status.as_ref().and_then(|s| s.primary.clone()).expect("a primary");
    let old_uids = k8s::pod_uids(&k8s::pods(&client, &ns).await);
    let history = k8s::PodHistory::watch(&client, &ns);
    // Allowed while the group is whole (under load a member may be briefly unready or
    // re-added, and the budget then rightly refuses: try again within a bound).
    let deadline = tokio::time::Instant::now() + HEAL;
    while let Err(refused) = k8s::evict(&ns, &first).await {
        assert!(
            refused.0 == 429 && tokio::time::Instant::now() < deadline,
            "evicting {first} from a whole group: {refused:?}; budget {}",
            k8s::budget_status(&ns, "drained")
        );
        sleep(Duration::from_millis(250)).await;
    }
    let refused = k8s::evict(&ns, &second).await.expect_err("a second eviction at once");
    assert_eq!(refused.0, 429, "refused by the budget: {refused:?}");

    // Every attempt is refused until the replacement is a ready member; then one passes.
    let replacement_ready = |pods: &[k8s_openapi::api::core::v1::Pod]| {
        pods.iter().any(|p| p.uid().is_some_and(|uid| !old_uids.contains(&uid)) && k8s::ready_member(p))
    };
    let (mut refusals, mut refused_while_replacement_joined) = (1, 0);
    let deadline = tokio::time::Instant::now() + HEAL;
    let (epoch, before, evicted_at) = loop {
        let epoch = k8s::rsvc(&client, &ns, "drained").await.status.map_or(0, |s| s.epoch);
        let before = k8s::pods(&client, &ns).await;
        match k8s::evict(&ns, &second).await {
            Ok(()) => break (epoch, before, history.mark()),
            Err((429, _)) => {
                refusals += 1;
                let joined = before.iter().any(|p| p.uid().is_some_and(|uid| !old_uids.contains(&uid)));
                if joined && !replacement_ready(&before) {
                    refused_while_replacement_joined += 1;
                }
            }
            Err(other) => panic!("evicting {second}: {other:?}"),
        }
        if tokio::time::Instant::now() > deadline {
            k8s::dump(&ns);
            panic!("{second} never became evictable: {}", k8s::budget_status(&ns, "drained"));
        }
        sleep(Duration::from_millis(250)).await;
    };
    // Allowed because the first one's replacement counted by then: seen a ready member
    // before the eviction answered (the budget may count a state that lasted less than a
    // poll, so the watch's history is searched). Or, as Kubernetes documents
    // (`unhealthyPodEvictionPolicy: IfHealthyBudget`), because the evicted pod was itself
    // not Ready while the budget's last count was whole: a loaded node can fail a primary's
    // readiness probe.
    let after = k8s::pods(&client, &ns).await;
    let new_ready_member = |p: &k8s_openapi::api::core::v1::Pod| {
        p.uid().is_some_and(|uid| !old_uids.contains(&uid)) && k8s::ready_member(p)
    };
    let unready_second = |p: &k8s_openapi::api::core::v1::Pod| {
        p.name_any() == second && p.uid().is_some_and(|u| old_uids.contains(&u)) && !k8s::ready(p)
    };
    let seen = history.before(evicted_at);
    let because_replacement = seen.iter().chain(&before).chain(&after).any(new_ready_member);
    // The last state of the evicted pod before it was evicted (not from `after`: the
    // evicted pod stops being Ready as it terminates).
    let because_unready = seen.iter().rev().find(|p| p.name_any() == second).is_some_and(unready_second)
        || before.iter().any(unready_second);
    let new_states: Vec<_> =
        seen.iter().filter(|p| p.uid().is_some_and(|uid| !old_uids.contains(&uid))).cloned().collect();
    // What Tandem decides is which pods count: a replacement that runs, even Ready, counts
    // only once it is a member. Whether the budget's count was current is the disruption
    // controller's: CI once saw an eviction allowed while the first pod still terminated
    // and no replacement existed at all (budget then currentHealthy 1 of 2), which no
    // label of ours can cause. That case is reported; the group must still heal and lose
    // nothing (below).
    let no_replacement_yet = new_states.is_empty()
        && before.iter().chain(&after).all(|p| p.uid().is_some_and(|uid| old_uids.contains(&uid)));
    if !because_replacement && !because_unready && no_replacement_yet {
        eprintln!(
            "WARNING: the budget allowed evicting {second} while {first} still terminated and no replacement \
             existed (a stale count of the disruption controller)\nbefore: {}\nafter: {}\nbudget: {}",
            k8s::describe_pods(&before),
            k8s::describe_pods(&after),
            k8s::budget_status(&ns, "drained")
        );
    } else if !because_replacement && !because_unready {
        k8s::dump(&ns);
        panic!(
            "an eviction of {second} was allowed before the replacement of {first} was a ready member\n\
             before: {}\nafter: {}\nthe new pods' states until then: {}\nbudget: {}",
            k8s::describe_pods(&before),
            k8s::describe_pods(&after),
            k8s::describe_pods(&new_states),
            k8s::budget_status(&ns, "drained")
        );
    }
    if !because_replacement && because_unready {
        eprintln!("{second} was evicted while not Ready (allowed by IfHealthyBudget)");
    }
    eprintln!(
        "{refusals} evictions refused, {refused_while_replacement_joined} of them while the replacement pod ran but was not a ready member yet"
    );

    let healed =
        k8s::wait_for(&client, &ns, "drained", HEAL, "healed after both evictions", healthy(3, epoch)).await;
    budget_allows_one_of(&ns, "drained", 3).await;
    verify(&ns, &healed, &recorder, stop, writers).await;
}

/// `spec.podTemplate.antiAffinity: required` is a rule the scheduler keeps: on this
/// one-node cluster, the second replica pod of a service stays Pending as unschedulable
/// (and the group is never started half-way), while another service's pod still runs
/// on that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn required_anti_affinity_never_puts_two_replicas_of_a_service_on_one_node() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-spread").await;
    kubectl_apply(&ns, &manifest("spread", "passive", 2, "  podTemplate:\n    antiAffinity: required\n"))
        .expect("apply");
    kubectl_apply(&ns, &manifest("other", "passive", 1, "")).expect("apply another service");
    k8s::wait_for(&client, &ns, "other", UP, "up", healthy(1, 0)).await;
    k8s::wait_until(&ns, UP, "one spread pod on the node, one unschedulable", || {
        let pods = kubectl(&["get", "pods", "-n", &ns, "-l", "tandem.dev/service=spread", "-o", "json"]);
        let pods: serde_json::Value = serde_json::from_str(&pods).expect("a pod list");
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let on_node = items.iter().filter(|p| p["spec"]["nodeName"].is_string()).count();
        let unschedulable = items
            .iter()
            .filter(|p| {
                p["status"]["conditions"].as_array().into_iter().flatten().any(|c| {
                    c["type"] == "PodScheduled" && c["status"] == "False" && c["reason"] == "Unschedulable"
                })
            })
            .count();
        if (items.len(), on_node, unschedulable) == (2, 1, 1) {
            Ok(())
        } else {
            Err(format!("{} pods, {on_node} on the node, {unschedulable} unschedulable", items.len()))
        }
    })
    .await;
}

/// The primary and the last switchover, as the status shows them.
fn primary_of(rsvc: &tandem_operator::crd::ReplicatedService) -> String {
    rsvc.status.as_ref().and_then(|s| s.primary.clone()).unwrap_or_default()
}

fn last_switchover(rsvc: &tandem_operator::crd::ReplicatedService) -> tandem_operator::crd::SwitchoverStatus {
    rsvc.status.as_ref().and_then(|s| s.last_switchover.clone()).unwrap_or_default()
}

/// `kubectl annotate rsvc NAME tandem.dev/switchover-to=VALUE --overwrite`, then waits for
/// the operator's answer to that value. A refusal because no member could safely take
/// over at that moment (a busy node's detectors flap) is asked again, a few times: the
/// annotation is removed (so the same value counts as new) and set again.
async fn switch_over_by_annotation(
    client: &kube::Client,
    ns: &str,
    name: &str,
    value: &str,
) -> tandem_operator::crd::ReplicatedService {
    let key = "tandem.dev/switchover-to";
    for attempt in 0..5 {
        kubectl(&["annotate", "--overwrite", "rsvc", name, "-n", ns, &format!("{key}={value}")]);
        let answered = k8s::wait_for(client, ns, name, HEAL, &format!("answered {value}"), |r| {
            let last = last_switchover(r);
            last.request == value && (last.result == "Done" || last.result == "Refused")
        })
        .await;
        let last = last_switchover(&answered);
        if last.result == "Done" || !last.message.contains("safely take over") || attempt == 4 {
            return answered;
        }
        eprintln!("asking again after: {}", last.message);
        kubectl(&["annotate", "rsvc", name, "-n", ns, &format!("{key}-")]);
        k8s::wait_for(client, ns, name, HEAL, "annotation removed", |r| {
            last_switchover(r).request.is_empty()
        })
        .await;
        k8s::wait_for(client, ns, name, HEAL, "whole", healthy(3, 0)).await;
    }
    unreachable!("the loop returns on its last attempt")
}

/// The documented kubectl way: `kubectl annotate rsvc NAME tandem.dev/switchover-to=POD`
/// (or `=any`), under a writing client. Each new value is acted on once: a new epoch
/// with that member as primary, recorded in the status and an event; a target that is
/// not a member is refused with a Warning event and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn switchover_by_annotation_moves_the_primary_and_loses_nothing() {
    let client = k8s::installed().await;
    let ns = k8s::namespace(&client, "e2e-switchover").await;
    kubectl_apply(&ns, &manifest("sw", "passive", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "sw", UP, "up", healthy(3, 0)).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    // To a named backup (by its pod name).
    let backup = k8s::a_backup(&up);
    let before = k8s::wait_for(&client, &ns, "sw", HEAL, "whole", healthy(3, 0)).await;
    let moved = switch_over_by_annotation(&client, &ns, "sw", &backup).await;
    let done = last_switchover(&moved);
    assert_eq!((done.result.as_str(), done.to.as_str()), ("Done", backup.as_str()), "{done:?}");
    assert_eq!(primary_of(&moved), backup);
    assert!(done.epoch > before.status.as_ref().map_or(0, |s| s.epoch), "{done:?}");
    let status = moved.status.clone().expect("status");
    assert_eq!(status.configuration.as_ref().map(|c| c.members.len()), Some(3), "every member kept");
    let moved = k8s::wait_for(&client, &ns, "sw", HEAL, "whole", healthy(3, 0)).await;
    sleep(Duration::from_secs(1)).await;

    // Not a member: refused, said, and nothing changes.
    let refused = switch_over_by_annotation(&client, &ns, "sw", "r9").await;
    let last = last_switchover(&refused);
    assert_eq!(last.result, "Refused");
    assert!(last.message.contains("not a member"), "{last:?}");
    assert!(refused.status.as_ref().is_some_and(|s| s.epoch >= done.epoch));

    // Any: the RM picks a safe backup.
    let primary = primary_of(&moved);
    let again = switch_over_by_annotation(&client, &ns, "sw", "any").await;
    let done_again = last_switchover(&again);
    assert_eq!(done_again.result, "Done", "{done_again:?}");
    assert_eq!(done_again.from, primary, "{done_again:?}");
    assert_ne!(done_again.to, primary, "{done_again:?}");
    // The annotation stays; it is not acted on twice.
    sleep(Duration::from_secs(3)).await;
    let later = k8s::wait_for(&client, &ns, "sw", HEAL, "whole", healthy(3, 0)).await;
    assert_eq!(last_switchover(&later).epoch, done_again.epoch, "acted on once");
    assert_eq!(last_switchover(&later).request, "any");

    verify(&ns, &later, &recorder, stop, writers).await;
    let reasons = k8s::event_reasons(&client, &ns, "sw").await;
    for expected in ["Switchover", "SwitchoverRefused"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event: {reasons:?}");
    }
}

/// The image every container of the pod runs.
fn pod_images(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    pod.spec.iter().flat_map(|s| &s.containers).filter_map(|c| c.image.clone()).collect()
}

/// A rolling upgrade: `spec.image` changes on a live active-mode service under a writing
/// client. The backups' pods are replaced one at a time, then the primary hands over to
/// an upgraded member by a switchover, then its pod is replaced as a backup: every pod on
/// the new image, no failover, no lost write, no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test cluster: see .ci/run"]
async fn an_image_change_rolls_every_pod_with_no_failed_request() {
    const NEW_IMAGE: &str = "tandem:e2e-v2";
    let client = k8s::installed().await;
    // The cluster has no registry: the same binary under a second tag is "a new image".
    let script = format!("{}/tests/cluster/cluster.sh", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = k8s::run(&script, &["image", NEW_IMAGE, support::cluster::TANDEM], None);
    assert!(ok, "cannot load {NEW_IMAGE}: {out}{err}");
    let ns = k8s::namespace(&client, "e2e-roll").await;
    kubectl_apply(&ns, &manifest("roll", "active", 3, "")).expect("apply");
    let up = k8s::wait_for(&client, &ns, "roll", UP, "up", healthy(3, 0)).await;
    let old_pods = k8s::pod_uids(&k8s::pods(&client, &ns).await);
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), k8s::target(&up).await, Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    let upgraded = manifest("roll", "active", 3, "").replace(k8s::IMAGE, NEW_IMAGE);
    kubectl_apply(&ns, &upgraded).expect("change the image");
    let rolling = std::sync::atomic::AtomicBool::new(false);
    let epoch = up.status.as_ref().map_or(0, |s| s.epoch);
    let rolled = k8s::wait_for(&client, &ns, "roll", HEAL * 4, "rolled to the new image", |r| {
        let status = r.status.clone().unwrap_or_default();
        let progressing = status.conditions.iter().find(|c| c.type_ == "Progressing");
        if progressing.is_some_and(|c| c.reason == "RollingUpdate") {
            rolling.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        status.updated_replicas == Some(3)
            && progressing.is_some_and(|c| c.status == "False")
            && healthy(3, epoch)(r)
    })
    .await;
    // The old primary's pod may still be terminating: wait for every old pod to go, and
    // for three pods, none terminating (counting pods alone could take a terminating old
    // one for a member while a new pod is being replaced).
    let deadline = tokio::time::Instant::now() + HEAL;
    let pods = loop {
        let pods = k8s::pods(&client, &ns).await;
        let settled = pods.len() == 3
            && pods.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none() && !p.uid().is_some_and(|uid| old_pods.contains(&uid))
            });
        if settled {
            break pods;
        }
        if tokio::time::Instant::now() > deadline {
            k8s::dump(&ns);
            let seen: Vec<_> = pods
                .iter()
                .map(|p| (p.name_any(), pod_images(p), p.metadata.deletion_timestamp.is_some()))
                .collect();
            panic!("old pods never went (name, images, terminating): {seen:?}");
        }
        sleep(Duration::from_millis(500)).await;
    };
    for pod in &pods {
        assert!(pod_images(pod).iter().all(|i| i == NEW_IMAGE), "{}: {:?}", pod.name_any(), pod_images(pod));
    }
    assert!(rolling.load(std::sync::atomic::Ordering::Relaxed), "Progressing never said RollingUpdate");
    let status = rolled.status.clone().expect("status");
    if status.failovers != 0 {
        k8s::dump(&ns);
    }
    assert_eq!(status.failovers, 0, "the primary left by a switchover, not a failover");
    assert_eq!(last_switchover(&rolled).result, "Done");
    sleep(Duration::from_secs(1)).await;

    verify(&ns, &rolled, &recorder, stop, writers).await;
    assert_eq!(recorder.failures(), Vec::<String>::new(), "active mode: no client request may fail");
    let reasons = k8s::event_reasons(&client, &ns, "roll").await;
    for expected in ["RollingUpdate", "Switchover"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event: {reasons:?}");
    }
}
