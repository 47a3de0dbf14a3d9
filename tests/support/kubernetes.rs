//! Scaffolding for the end-to-end tests on a real Kubernetes (tests/cluster/): the chart
//! installed once per run, a namespace per test, and helpers that do what a user does
//! (`helm`, `kubectl apply`, `kubectl delete pod`) and read what a user reads (the
//! resource's status and events).

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use tandem_check::workload::Target;
use tandem_operator::crd::ReplicatedService;
use tandem_replica::wire::ClientCredentials;
use tokio::time::{Instant, sleep};

/// The image the suite runs, made by .ci/run from the built binary
/// (`tests/cluster/cluster.sh image tandem:e2e target/debug/tandem`).
pub const IMAGE: &str = "tandem:e2e";
pub const OPERATOR_NAMESPACE: &str = "tandem-system";
/// The operator's ServiceAccount, as the chart names it for the release `tandem`.
pub const OPERATOR_ACCOUNT: &str = "system:serviceaccount:tandem-system:tandem-operator";
/// The GFD port on the node (the operator runs on the host network in this cluster).
pub const GFD_PORT: u16 = 7190;

/// Runs a command; returns (success, stdout, stderr).
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is the test cluster's PATH set? eval \"$(tests/cluster/cluster.sh env)\")"));
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn kubectl(args: &[&str]) -> String {
    let (ok, out, err) = run("kubectl", args, None);
    assert!(ok, "kubectl {args:?} failed: {err}");
    out
}

pub fn kubectl_apply(namespace: &str, manifest: &str) -> Result<String, String> {
    let (ok, out, err) = run("kubectl", &["apply", "-n", namespace, "-f", "-"], Some(manifest));
    if ok { Ok(out) } else { Err(err) }
}

fn chart_dir() -> String {
    format!("{}/charts/tandem", env!("CARGO_MANIFEST_DIR"))
}

pub fn helm_install_args() -> Vec<String> {
    [
        "upgrade",
        "--install",
        "tandem",
        &chart_dir(),
        "-n",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        "image.repository=tandem",
        "--set",
        "image.tag=e2e",
        "--set",
        "hostNetwork=true",
        "--set",
        "kubernetesServiceHost=127.0.0.1",
        "--set-string",
        "kubernetesServicePort=6443",
        "--set",
        &format!("gfd.port={GFD_PORT}"),
        "--set",
        "replicaLogLevel=info\\,tandem_replica=debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The chart rendered as the suite installs it, with `values` (YAML) on top: every
/// object, as JSON.
pub fn helm_template(values: &str) -> Vec<serde_json::Value> {
    let file = tempfile::NamedTempFile::new().expect("a values file");
    std::fs::write(file.path(), values).expect("write the values");
    let path = file.path().to_str().expect("a UTF-8 temp path");
    let (ok, out, err) =
        run("helm", &["template", "tandem", &chart_dir(), "-n", OPERATOR_NAMESPACE, "-f", path], None);
    assert!(ok, "helm template failed: {err}");
    out.split("\n---")
        .filter(|document| document.lines().any(|l| !l.trim().is_empty() && !l.starts_with('#')))
        .map(|document| serde_yaml::from_str(document).unwrap_or_else(|e| panic!("{e}: {document}")))
        .collect()
}

/// The chart upgraded with `--set` values (`key=value`) for one test, and put back as
/// `installed()` made it when dropped, passed or not. Each upgrade waits for the
/// operator's rollout (the Deployment's Recreate strategy replaces its pod).
pub struct ChartValues;

impl ChartValues {
    pub fn set(values: &[&str]) -> Self {
        let (ok, out, err) = upgrade_chart(values);
        assert!(ok, "helm upgrade with {values:?} failed: {out}{err}");
        ChartValues
    }
}

impl Drop for ChartValues {
    fn drop(&mut self) {
        // No panic here (it may run while a failed test unwinds): the next test's
        // helm calls would show a broken release anyway.
        let (ok, out, err) = upgrade_chart(&[]);
        if !ok {
            eprintln!("could not put the chart's values back: {out}{err}");
        }
    }
}

fn upgrade_chart(values: &[&str]) -> (bool, String, String) {
    let mut args = helm_install_args();
    for value in values {
        args.extend(["--set".to_owned(), (*value).to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run("helm", &args, None);
    if !ok {
        return (ok, out, err);
    }
    run(
        "kubectl",
        &["-n", OPERATOR_NAMESPACE, "rollout", "status", "deploy/tandem-operator", "--timeout=120s"],
        None,
    )
}

/// `kubectl auth can-i VERB RESOURCE -n NAMESPACE --as USER`; `RESOURCE` may name a
/// subresource (`pods/exec`).
pub fn can_i(user: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", namespace, "--as", user];
    match resource.split_once('/') {
        Some((resource, subresource)) => args.extend([resource, "--subresource", subresource]),
        None => args.push(resource),
    }
    let (_, out, err) = run("kubectl", &args, None);
    match out.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {verb} {resource} --as {user}: {other}{err}"),
    }
}

/// What `user` may do in `namespace` (cluster-wide grants included), as the API server's
/// authorizer lists it (SelfSubjectRulesReview, impersonating `user`): one
/// `group/resource verb` per permission.
pub fn permissions(user: &str, namespace: &str) -> std::collections::BTreeSet<String> {
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    });
    let (ok, out, err) =
        run("kubectl", &["create", "-f", "-", "-o", "json", "--as", user], Some(&review.to_string()));
    assert!(ok, "rules review as {user}: {err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("a rules review");
    assert_eq!(answer["status"]["incomplete"], false, "the authorizer listed every rule: {answer}");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
    };
    let mut permissions = std::collections::BTreeSet::new();
    for rule in answer["status"]["resourceRules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    permissions.insert(format!("{group}/{resource} {verb}"));
                }
            }
        }
    }
    permissions
}

/// What every authenticated user may do (system:basic-user): ask what it may do.
pub fn everyone_may(permission: &str) -> bool {
    let (resource, verb) = permission.split_once(' ').unwrap_or_default();
    verb == "create"
        && matches!(
            resource,
            "authorization.k8s.io/selfsubjectaccessreviews"
                | "authorization.k8s.io/selfsubjectrulesreviews"
                | "authentication.k8s.io/selfsubjectreviews"
        )
}

static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// A client, after `helm install` of the chart (once per test binary) has the operator
/// running. (Each test makes its own client: a client lives on its test's runtime.)
pub async fn installed() -> Client {
    tokio::task::spawn_blocking(|| {
        INSTALLED.get_or_init(|| {
            // A clean install, even on a cluster left over from an earlier run.
            let _ = run("helm", &["uninstall", "tandem", "-n", OPERATOR_NAMESPACE, "--wait"], None);
            let args = helm_install_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out, err) = run("helm", &args, None);
            assert!(ok, "helm install failed: {out}{err}");
            assert!(out.contains("kubectl get rsvc"), "NOTES.txt tells the user what to run next: {out}");
            kubectl(&[
                "-n",
                OPERATOR_NAMESPACE,
                "rollout",
                "status",
                "deploy/tandem-operator",
                "--timeout=120s",
            ]);
        });
    })
    .await
    .expect("install task");
    Client::try_default().await.expect("KUBECONFIG points at the test cluster")
}

/// A namespace of one test, deleted (with everything in it) when the test ends, passed
/// or not: the pods of finished tests must not load the one-node cluster for the next.
pub struct TestNamespace(String);

impl std::ops::Deref for TestNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Not waited for: nothing needs the old namespace gone, only its pods stopped.
        let _ = run("kubectl", &["delete", "namespace", &self.0, "--wait=false"], None);
    }
}

/// A fresh namespace for one test (a new name each run: deleting an old namespace can
/// take a while, and nothing needs to wait for it).
pub async fn namespace(client: &Client, prefix: &str) -> TestNamespace {
    namespace_labelled(client, prefix, &[]).await
}

/// A fresh namespace with `labels` (e.g. the Pod Security level it enforces).
pub async fn namespace_labelled(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> TestNamespace {
    let api: Api<Namespace> = Api::all(client.clone());
    let name = format!("{prefix}-{:04x}", rand::random::<u16>());
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())).collect();
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .expect("namespace");
    api.create(&PostParams::default(), &namespace).await.expect("create namespace");
    TestNamespace(name)
}

pub fn manifest(name: &str, mode: &str, replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: ReplicatedService\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  mode: {mode}\n  image: {IMAGE}\n{extra}"
    )
}

/// An example manifest from examples/, as a user applies it (with the suite's image:
/// the cluster has no registry).
pub fn example(file: &str) -> String {
    let text =
        std::fs::read_to_string(format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"))).expect("example");
    text.replace("spec:\n", &format!("spec:\n  image: {IMAGE}\n"))
}

/// A member of the configuration that is not the primary (its pod name).
pub fn a_backup(rsvc: &ReplicatedService) -> String {
    let status = rsvc.status.as_ref().expect("status");
    let primary = status.primary.clone().unwrap_or_default();
    status
        .members
        .iter()
        .find(|m| m.name != primary && m.ready && m.role == "backup")
        .map(|m| m.name.clone())
        .expect("a ready backup")
}

pub async fn rsvc(client: &Client, namespace: &str, name: &str) -> ReplicatedService {
    Api::<ReplicatedService>::namespaced(client.clone(), namespace).get(name).await.expect("get rsvc")
}

/// Waits until `done` holds for the resource; panics with its last status otherwise.
pub async fn wait_for(
    client: &Client,
    namespace: &str,
    name: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&ReplicatedService) -> bool,
) -> ReplicatedService {
    let api: Api<ReplicatedService> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Ok(current) = api.get(name).await {
            if done(&current) {
                return current;
            }
            last = Some(current);
        }
        if Instant::now() > deadline {
            dump(namespace);
            panic!(
                "{namespace}/{name} not {what} within {limit:?}; status: {:#?}",
                last.and_then(|r| r.status)
            );
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Healthy: the configuration has `replicas` members, all ready, at least epoch `after`.
pub fn healthy(replicas: usize, after_epoch: i64) -> impl Fn(&ReplicatedService) -> bool {
    move |r| {
        let Some(status) = &r.status else { return false };
        let members = status.configuration.as_ref().map(|c| c.members.len()).unwrap_or_default();
        status.epoch > after_epoch && members == replicas && status.ready_replicas as usize == replicas
    }
}

/// Client endpoints: the members' pod IPs, as published in the status.
pub fn endpoints(rsvc: &ReplicatedService) -> Vec<String> {
    rsvc.status.iter().flat_map(|s| &s.members).filter_map(|m| m.address.clone()).collect()
}

/// How a client reaches the service, as an application in its namespace would: the
/// members' addresses, and the CA (and token, if any) from the Secret `<service>-client`
/// that the operator makes (the client ports serve TLS by default).
pub async fn target(rsvc: &ReplicatedService) -> Target {
    target_of(rsvc, endpoints(rsvc)).await
}

/// `target` over the configuration's members (what the RM installed).
pub async fn member_target(rsvc: &ReplicatedService) -> Target {
    target_of(rsvc, member_addresses(rsvc)).await
}

async fn target_of(rsvc: &ReplicatedService, endpoints: Vec<String>) -> Target {
    let client = Client::try_default().await.expect("KUBECONFIG points at the test cluster");
    let namespace = rsvc.namespace().expect("a namespaced service");
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let name = format!("{}-client", rsvc.name_any());
    let secret = secrets.get_opt(&name).await.expect("read the client Secret");
    let field = |key: &str| {
        secret
            .as_ref()
            .and_then(|s| s.data.as_ref()?.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    Target { endpoints, credentials: ClientCredentials { ca: field("ca.crt"), token: field("token") } }
}

pub fn member_addresses(rsvc: &ReplicatedService) -> Vec<String> {
    rsvc.status
        .iter()
        .flat_map(|s| s.configuration.iter())
        .flat_map(|c| &c.members)
        .map(|m| m.address.clone())
        .collect()
}

pub async fn pods(client: &Client, namespace: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
}

/// Every state the pods of a namespace passed through, in the order the API server
/// reported them (a watch): a state that lasted less than a poll is still seen.
pub struct PodHistory {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Pod>>>,
    watch: tokio::task::JoinHandle<()>,
}

impl PodHistory {
    pub fn watch(client: &Client, namespace: &str) -> PodHistory {
        use futures::StreamExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = Api::<Pod>::namespaced(client.clone(), namespace);
        let record = std::sync::Arc::clone(&seen);
        let watch = tokio::spawn(async move {
            let mut pods = kube::runtime::watcher(api, kube::runtime::watcher::Config::default()).boxed();
            while let Some(event) = pods.next().await {
                match event {
                    Ok(
                        kube::runtime::watcher::Event::Apply(pod)
                        | kube::runtime::watcher::Event::InitApply(pod),
                    ) => record.lock().expect("pod history").push(pod),
                    Ok(_) => {}
                    Err(error) => eprintln!("pod watch: {error} (the watcher retries)"),
                }
            }
        });
        PodHistory { seen, watch }
    }

    /// How many states were seen so far: a mark to look back from.
    pub fn mark(&self) -> usize {
        self.seen.lock().expect("pod history").len()
    }

    /// The states seen before `mark`, oldest first.
    pub fn before(&self, mark: usize) -> Vec<Pod> {
        self.seen.lock().expect("pod history").iter().take(mark).cloned().collect()
    }
}

impl Drop for PodHistory {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

pub async fn delete_pod(client: &Client, namespace: &str, name: &str) {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete pod");
}

/// Reasons of the events about `name`.
pub async fn event_reasons(client: &Client, namespace: &str, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await.expect("list events").items;
    list.iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .filter_map(|e| e.reason.clone())
        .collect()
}

pub fn pod_uids(pods: &[Pod]) -> Vec<String> {
    let mut uids: Vec<String> = pods.iter().filter_map(|p| p.uid()).collect();
    uids.sort();
    uids
}

/// What a user would look at when something goes wrong.
pub fn dump(namespace: &str) {
    for args in [
        vec!["get", "rsvc,pods", "-n", namespace, "-o", "wide"],
        vec!["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"],
        vec!["logs", "-n", OPERATOR_NAMESPACE, "deploy/tandem-operator", "-c", "operator", "--tail=200"],
        vec!["logs", "-n", OPERATOR_NAMESPACE, "deploy/tandem-operator", "-c", "gfd", "--tail=30"],
    ] {
        let (_, out, err) = run("kubectl", &args, None);
        eprintln!("===== kubectl {} =====\n{out}{err}", args.join(" "));
    }
}

/// Asks the Eviction API (what `kubectl drain` calls) to evict `pod`, once: Ok once it
/// is evicted, else the API server's refusal as (code, message): 429 when a
/// PodDisruptionBudget forbids it. (kube's client retries a 429 by default, for up to 15
/// rounds of back-off, which would turn a refusal into a late success.)
pub async fn evict(namespace: &str, pod: &str) -> Result<(), (u16, String)> {
    let mut config = kube::Config::infer().await.expect("KUBECONFIG points at the test cluster");
    config.default_retry = false;
    let client = Client::try_from(config).expect("a client");
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    match pods.evict(pod, &kube::api::EvictParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message.clone())),
        Err(error) => panic!("evict {namespace}/{pod}: {error}"),
    }
}

/// The status of the PodDisruptionBudget `name` (`expectedPods`, `currentHealthy`,
/// `desiredHealthy`, `disruptionsAllowed`), as `kubectl get pdb` reads it (policy/v1 or
/// v1beta1, whichever the API server serves).
pub fn budget_status(namespace: &str, name: &str) -> serde_json::Value {
    let json = kubectl(&["get", "pdb", name, "-n", namespace, "-o", "json"]);
    let budget: serde_json::Value = serde_json::from_str(&json).expect("a PodDisruptionBudget");
    budget["status"].clone()
}

/// The scale subresource of the ReplicatedService `name` (what `kubectl scale` and an
/// HPA read and write).
pub fn scale(namespace: &str, name: &str) -> serde_json::Value {
    let path = format!("/apis/tandem.dev/v1alpha1/namespaces/{namespace}/replicatedservices/{name}/scale");
    serde_json::from_str(&kubectl(&["get", "--raw", &path])).expect("a Scale")
}

/// Polls `check` until it gives a value; panics (after a dump of `namespace`) with its
/// last word when `limit` runs out.
pub async fn wait_until<T>(
    namespace: &str,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                dump(namespace);
                panic!("{namespace}: not {what} within {limit:?}; last: {last}");
            }
            Err(_) => sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A pod the PodDisruptionBudget counts as healthy: a member (`tandem.dev/member=true`),
/// Ready, and not being deleted.
pub fn ready_member(pod: &Pod) -> bool {
    let member = pod.labels().get("tandem.dev/member").map(String::as_str) == Some("true");
    member && ready(pod) && pod.metadata.deletion_timestamp.is_none()
}

/// The pod's `Ready` condition is true.
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One line per pod: name, uid, member label, Ready, deleting (for a failure message).
pub fn describe_pods(pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "{} uid={} member={} ready={} deleting={}",
                p.name_any(),
                p.uid().unwrap_or_default(),
                p.labels().get("tandem.dev/member").map_or("-", String::as_str),
                ready(p),
                p.metadata.deletion_timestamp.is_some()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
