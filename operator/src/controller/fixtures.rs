//! The reconciler against a scripted fake API server (the shape of kube-rs's
//! controller-rs fixtures): each test lists the calls the reconciler must make, in
//! order, with the answers to give; any other call fails the test. The real-cluster
//! suite (tests/kubernetes.rs) stays; this covers controller.rs without a cluster.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{Context, reconcile, replace_pod};
use crate::crd::{Defaults, ReplicatedService, ReplicatedServiceSpec};
use crate::pods::PodSettings;
use crate::rm::Spec;
use crate::rotation::{Rotation, Why};

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One call the reconciler must make: its method, a path it starts with, and the
/// status and body of the answer. `check` looks at the request body.
struct Expect {
    method: Method,
    path: &'static str,
    status: StatusCode,
    answer: Answer,
    check: fn(&Value),
}

enum Answer {
    /// The request's own body (what a create or a replace returns).
    Echo,
    Json(Value),
}

fn conflict() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
           "message": "the object has been modified", "code": 409})
}

fn nothing(_: &Value) {}

/// Answers the calls in `script`, in order; returns what each request carried.
fn serve(mut handle: ApiHandle, script: Vec<Expect>) -> JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        for expect in script {
            let (request, respond) =
                handle.next_request().await.expect("the reconciler stopped calling early");
            let path = request.uri().path().to_owned();
            assert_eq!(
                (request.method(), path.starts_with(expect.path)),
                (&expect.method, true),
                "expected {} {}, got {} {path}",
                expect.method,
                expect.path,
                request.method()
            );
            let bytes = request.into_body().collect_bytes().await.expect("request body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (expect.check)(&body);
            let answer = match expect.answer {
                Answer::Echo => body.clone(),
                Answer::Json(value) => value,
            };
            let response = Response::builder()
                .status(expect.status)
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response");
            respond.send_response(response);
            seen.push(body);
        }
        seen
    })
}

fn context() -> (Arc<Context>, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "test");
    let defaults = Defaults { image: "tandem:test".into(), spec: Spec::default() };
    // Nothing listens there: detector settings pushes fail fast, and are retried later.
    let pod_settings = PodSettings {
        gfd_address: "127.0.0.1:9".into(),
        log_level: "info".into(),
        tls: true,
        // The client Secret's calls (a GET, then an apply) are left out of these
        // scripts; the real-cluster suite covers them.
        client_tls: false,
        client_token: false,
        session_expiry_ms: tandem_replica::state::DEFAULT_SESSION_EXPIRY_MS,
    };
    let authority = tandem_replica::tls::Authority::generate("test").expect("a CA");
    let ctx = Context::new(
        client,
        defaults,
        pod_settings,
        "127.0.0.1:9".into(),
        false,
        "test-operator".into(),
        Some(Arc::new(authority)),
    );
    (Arc::new(ctx), handle)
}

fn service() -> ReplicatedService {
    let mut rsvc = ReplicatedService::new("demo", ReplicatedServiceSpec::default());
    rsvc.meta_mut().namespace = Some("test".into());
    rsvc.meta_mut().uid = Some("0123-4567".into());
    rsvc.meta_mut().resource_version = Some("1".into());
    rsvc
}

const PODS: &str = "/api/v1/namespaces/test/pods";
const STATUS: &str = "/apis/tandem.dev/v1alpha1/namespaces/test/replicatedservices/demo/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/test/events";

fn list_no_pods() -> Expect {
    Expect {
        method: Method::GET,
        path: PODS,
        status: StatusCode::OK,
        answer: Answer::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})),
        check: nothing,
    }
}

#[tokio::test]
async fn a_status_conflict_stops_the_round_before_anything_is_created() {
    let (ctx, handle) = context();
    let script = vec![
        list_no_pods(),
        Expect {
            method: Method::PUT,
            path: STATUS,
            status: StatusCode::CONFLICT,
            answer: Answer::Json(conflict()),
            check: |body| {
                assert_eq!(body["metadata"]["resourceVersion"], "1", "written against what was read");
            },
        },
    ];
    let api = serve(handle, script);
    let requeue = reconcile(Arc::new(service()), Arc::clone(&ctx)).await.expect("a conflict is no error");
    assert_eq!(requeue, kube::runtime::controller::Action::requeue(std::time::Duration::from_millis(50)));
    assert_eq!(api.await.expect("api").len(), 2, "no pod was created after the conflict");
}

#[tokio::test]
async fn a_new_service_starts_its_three_bootstrap_pods_and_records_each_with_an_event() {
    let (ctx, handle) = context();
    let pod_created = |secret: &'static str| {
        [
            Expect {
                method: Method::PATCH,
                path: "/api/v1/namespaces/test/serviceaccounts/demo-replica",
                status: StatusCode::OK,
                answer: Answer::Echo,
                check: |body| {
                    assert_eq!(
                        body["automountServiceAccountToken"], false,
                        "the replicas get no token: {body}"
                    );
                },
            },
            Expect {
                method: Method::PATCH,
                path: secret,
                status: StatusCode::OK,
                answer: Answer::Echo,
                check: |body| {
                    let secret: k8s_openapi::api::core::v1::Secret =
                        serde_json::from_value(body.clone()).expect("a secret");
                    let data = secret.data.expect("certificates");
                    for key in ["ca.crt", "replica.crt", "replica.key", "lfd.crt", "lfd.key"] {
                        assert!(data.contains_key(key), "{key} missing: {:?}", data.keys());
                    }
                    let replica = tandem_replica::tls::Material {
                        ca: String::from_utf8(data["ca.crt"].0.clone()).expect("pem"),
                        cert: String::from_utf8(data["replica.crt"].0.clone()).expect("pem"),
                        key: String::from_utf8(data["replica.key"].0.clone()).expect("pem"),
                    };
                    let identity = replica.identity().expect("an identity");
                    let tandem_replica::tls::Identity::Replica(name) = identity else {
                        panic!("not a replica's certificate: {identity}")
                    };
                    assert!(name.starts_with("test/demo/r"), "the name carries the group: {name}");
                },
            },
            Expect {
                method: Method::POST,
                path: PODS,
                status: StatusCode::CREATED,
                answer: Answer::Echo,
                check: |body| {
                    let pod: Pod = serde_json::from_value(body.clone()).expect("a pod");
                    let env = &pod.spec.as_ref().expect("spec").containers[0].env;
                    let bootstrap = env.iter().flatten().any(|e| e.name == "TANDEM_BOOTSTRAP");
                    assert!(bootstrap, "the first replicas found the group: {pod:?}");
                    let spec = pod.spec.as_ref().expect("spec");
                    assert_eq!(spec.service_account_name.as_deref(), Some("demo-replica"));
                    let not_after: i64 = pod.annotations()[crate::pods::CERTIFICATE_NOT_AFTER_ANNOTATION]
                        .parse()
                        .expect("unix seconds");
                    let left = not_after - tandem_replica::wire::unix_ms() as i64 / 1000;
                    assert!(
                        left > 89 * 24 * 3600 && left <= 90 * 24 * 3600,
                        "the certificates' expiry is recorded on the pod: {left} s left"
                    );
                    let tls = spec.volumes.iter().flatten().find(|v| v.name == "tls").expect("a tls volume");
                    let secret = tls.secret.as_ref().and_then(|s| s.secret_name.clone()).expect("a secret");
                    assert!(secret.starts_with("demo-r") && secret.ends_with("-tls"), "{secret}");
                    assert_eq!(
                        pod.metadata.owner_references.as_ref().map(|o| o[0].uid.as_str()),
                        Some("0123-4567"),
                        "owned by the service, deleted with it"
                    );
                },
            },
            Expect {
                method: Method::POST,
                path: EVENTS,
                status: StatusCode::CREATED,
                answer: Answer::Echo,
                check: |body| assert_eq!(body["reason"], "Created", "{body}"),
            },
        ]
    };
    let mut script = vec![
        list_no_pods(),
        Expect {
            method: Method::PUT,
            path: STATUS,
            status: StatusCode::OK,
            answer: Answer::Echo,
            check: |body| {
                let conditions = body["status"]["conditions"].as_array().expect("conditions");
                assert!(conditions.iter().any(|c| c["type"] == "Progressing" && c["status"] == "True"));
            },
        },
    ];
    let secrets =
        ["r1", "r2", "r3"].map(|id| &*format!("/api/v1/namespaces/test/secrets/demo-{id}-tls").leak());
    script.extend(secrets.into_iter().flat_map(pod_created));
    let services = ["/api/v1/namespaces/test/services/demo", "/api/v1/namespaces/test/services/demo-peers"];
    for path in services {
        script.push(Expect {
            method: Method::PATCH,
            path,
            status: StatusCode::OK,
            answer: Answer::Echo,
            check: nothing,
        });
    }
    script.push(Expect {
        method: Method::PATCH,
        path: "/apis/policy/v1beta1/namespaces/test/poddisruptionbudgets/demo",
        status: StatusCode::OK,
        answer: Answer::Echo,
        check: nothing,
    });
    let api = serve(handle, script);
    reconcile(Arc::new(service()), Arc::clone(&ctx)).await.expect("reconciled");
    let seen = api.await.expect("api");
    let names: Vec<&str> =
        seen.iter().filter(|b| b["kind"] == "Pod").filter_map(|b| b["metadata"]["name"].as_str()).collect();
    assert_eq!(names, ["demo-r1", "demo-r2", "demo-r3"]);
}

#[tokio::test]
async fn a_certificate_rotation_deletes_the_pod_and_its_secret_and_says_why() {
    let (ctx, handle) = context();
    let script = vec![
        Expect {
            method: Method::DELETE,
            path: "/api/v1/namespaces/test/pods/demo-r2",
            status: StatusCode::OK,
            answer: Answer::Json(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "demo-r2"}})),
            check: nothing,
        },
        Expect {
            method: Method::DELETE,
            path: "/api/v1/namespaces/test/secrets/demo-r2-tls",
            // Gone already: not an error.
            status: StatusCode::NOT_FOUND,
            answer: Answer::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})),
            check: nothing,
        },
        Expect {
            method: Method::POST,
            path: EVENTS,
            status: StatusCode::CREATED,
            answer: Answer::Echo,
            check: |body| {
                assert_eq!(body["reason"], "CertificateRotation", "{body}");
                let note = body["note"].as_str().expect("a note");
                assert!(note.contains("demo-r2") && note.contains("renew its certificates"), "{note}");
                assert!(!note.contains("primary"), "a backup: {note}");
            },
        },
    ];
    let api = serve(handle, script);
    let now = tandem_replica::wire::unix_ms() as i64 / 1000;
    let why = Why::Certificate { not_after: now + 30, due_since: now - 1 };
    let rotation = Rotation { id: "r2".into(), primary: false, why };
    replace_pod(&service(), &ctx, rotation).await.expect("rotated");
    assert_eq!(api.await.expect("api").len(), 3);
}

#[tokio::test]
async fn a_switchover_annotation_is_answered_in_the_status_write_that_commits_the_round() {
    let (ctx, handle) = context();
    let script = vec![
        list_no_pods(),
        Expect {
            method: Method::PUT,
            path: STATUS,
            // A conflict ends the round: what matters is what the write carried.
            status: StatusCode::CONFLICT,
            answer: Answer::Json(conflict()),
            check: |body| {
                let last = &body["status"]["lastSwitchover"];
                assert_eq!(
                    (&last["request"], &last["result"]),
                    (&json!("the-primary"), &json!("Refused")),
                    "{last}"
                );
                let message = last["message"].as_str().expect("a message");
                assert!(message.contains("not a replica id"), "{message}");
                assert_eq!(body["status"]["updatedReplicas"], 0, "no pods yet");
            },
        },
    ];
    let api = serve(handle, script);
    let mut rsvc = service();
    rsvc.annotations_mut().insert(crate::switchover::ANNOTATION.into(), "the-primary".into());
    reconcile(Arc::new(rsvc), Arc::clone(&ctx)).await.expect("a conflict is no error");
    assert_eq!(api.await.expect("api").len(), 2);
}

#[test]
fn an_annotation_value_is_acted_on_once_and_may_name_a_pod() {
    let mut rsvc = service();
    assert_eq!(super::switchover_request(&rsvc), None, "no annotation");
    rsvc.annotations_mut().insert(crate::switchover::ANNOTATION.into(), "demo-r2".into());
    let (value, target) = super::switchover_request(&rsvc).expect("a request");
    assert_eq!((value.as_str(), target), ("demo-r2", Ok(crate::switchover::Target::Replica("r2".into()))));
    let handled = crate::crd::SwitchoverStatus { request: "demo-r2".into(), ..Default::default() };
    rsvc.status =
        Some(crate::crd::ReplicatedServiceStatus { last_switchover: Some(handled), ..Default::default() });
    assert_eq!(super::switchover_request(&rsvc), None, "handled already");
    rsvc.annotations_mut().insert(crate::switchover::ANNOTATION.into(), "any".into());
    assert_eq!(super::switchover_request(&rsvc).map(|(_, t)| t), Some(Ok(crate::switchover::Target::Any)));
}
