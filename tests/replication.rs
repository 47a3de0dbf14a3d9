//! End-to-end replication with real `tandem replica` processes on loopback, real kill -9,
//! and the test acting as the Replication Manager (installing configurations by hand).
//! Every run ends with the three checks that matter: no acknowledged write lost, a
//! linearizable history, equal digests on every live replica.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::cluster::{Group, channel, internal_channel, replica_client};
use support::verdict;
use support::workload::{self, Recorder, Workload};
use tandem_replica::client::{Client, ClientSettings};
use tandem_replica::error::error_detail;
use tandem_replica::pb::{self, Mode, error_detail::Kind as Detail};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(20);

/// Stops the writers, then checks durability, linearizability and convergence.
async fn stop_and_verify(
    group: &Group,
    recorder: &Arc<Recorder>,
    stop: CancellationToken,
    writers: tokio::task::JoinSet<()>,
    live: &[&str],
) {
    let addresses: Vec<String> = live.iter().map(|id| group.address(id)).collect();
    if let Err(failure) = verdict::stop_and_verify(&addresses, recorder, stop, writers).await {
        group.dump_logs();
        panic!("{failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passive_primary_killed_no_acked_write_lost() {
    let mut group = Group::start(3, Mode::Passive).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), group.endpoints(), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_secs(1)).await;

    group.kill("r1");
    let primary = group.longest_log(&["r2", "r3"]).await;
    group.reconfigure(&primary, &["r2", "r3"]).await;
    sleep(Duration::from_millis(1500)).await;

    stop_and_verify(&group, &recorder, stop, writers, &["r2", "r3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_member_then_order_keeper_killed_no_acked_write_lost() {
    let mut group = Group::start(3, Mode::Active).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), group.endpoints(), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_millis(800)).await;

    // A member that is not the order-keeper dies; it comes back and rejoins.
    group.kill("r3");
    group.reconfigure("r1", &["r1", "r2"]).await;
    sleep(Duration::from_millis(500)).await;
    group.spawn("r3", false);
    group.wait_ready("r3", Duration::from_secs(15)).await;
    group.reconfigure("r1", &["r1", "r2", "r3"]).await;
    sleep(Duration::from_millis(500)).await;

    // Then the order-keeper dies.
    group.kill("r1");
    let keeper = group.longest_log(&["r2", "r3"]).await;
    group.reconfigure(&keeper, &["r2", "r3"]).await;
    sleep(Duration::from_millis(1000)).await;

    stop_and_verify(&group, &recorder, stop, writers, &["r2", "r3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_restarted_into_10mb_group_catches_up_from_streamed_checkpoint() {
    let mut group = Group::start(3, Mode::Passive).await;
    // 2600 values of 4 KiB: over 10 MB of state, written by 8 clients at once.
    let value = vec![b'v'; 4096];
    let mut loaders = tokio::task::JoinSet::new();
    for c in 0..8 {
        let mut settings = ClientSettings::new(group.endpoints());
        settings.client_id = Some(format!("loader{c}"));
        let mut client = Client::new(settings).expect("client");
        let value = value.clone();
        loaders.spawn(async move {
            for i in (c..2600).step_by(8) {
                client.put(&format!("bulk/{i:05}"), value.clone()).await.expect("bulk put");
            }
        });
    }
    while let Some(done) = loaders.join_next().await {
        done.expect("loader panicked");
    }

    // r3 dies and is taken out; writes go on while it restarts and fetches the state.
    group.kill("r3");
    group.reconfigure("r1", &["r1", "r2"]).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), group.endpoints(), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_millis(300)).await;
    group.spawn("r3", false);
    let joined = group.wait_ready("r3", Duration::from_secs(60)).await;
    assert!(joined.checkpoint_seq >= 2600, "r3 became ready without the checkpoint: {joined:?}");
    assert!(joined.keys >= 2600, "r3 has {} keys", joined.keys);
    group.reconfigure("r1", &["r1", "r2", "r3"]).await;
    sleep(Duration::from_millis(700)).await;

    stop_and_verify(&group, &recorder, stop, writers, &["r1", "r2", "r3"]).await;
    let digest = group.digest("r3").await.expect("r3 digest");
    assert!(digest.keys >= 2600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joiner_is_not_serving_until_its_checkpoint_is_installed() {
    let mut group = Group::start(2, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    for i in 0..50 {
        client.put(&format!("k{i}"), format!("{i}")).await.expect("put");
    }
    // A third replica, started without seeds or configuration: not ready.
    group.replicas.insert(
        "r3".into(),
        support::cluster::Replica::new("r3", format!("127.0.0.1:{}", support::cluster::free_port())),
    );
    group.spawn_unconfigured("r3");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&group.address("r3")));
    let serving = |health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            let answer = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            answer.ok().map(|r| {
                r.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving
            })
        }
    };
    let mut first = None;
    for _ in 0..100 {
        first = serving(&mut health).await;
        if first.is_some() {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first, Some(false), "a replica without configuration or state must not be SERVING");
    let status = group.status("r3").await.expect("r3 status");
    assert!(!status.ready && !status.not_ready_reason.is_empty(), "{status:?}");

    // Told the configuration, it joins the primary, gets a checkpoint, turns ready.
    group.install(&group.config.clone(), &["r3".into()]).await;
    let ready = group.wait_ready("r3", Duration::from_secs(15)).await;
    assert_eq!(ready.role(), pb::Role::Standby);
    assert_eq!(serving(&mut health).await, Some(true));
    group.reconfigure("r1", &["r1", "r2", "r3"]).await;
    client.put("after", "join").await.expect("put after join");
    group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_epoch_primary_cannot_complete_a_write() {
    let group = Group::start(3, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    client.put("before", "1").await.expect("put");
    let before = group.wait_converged(&["r2", "r3"], CONVERGE).await;

    // The RM deposes r1, but r1 never hears of it (as if it were cut off or paused).
    let epoch2 = pb::Configuration {
        epoch: 2,
        mode: Mode::Passive.into(),
        primary: "r2".into(),
        members: ["r2", "r3"]
            .iter()
            .map(|id| pb::Member { id: (*id).into(), address: group.address(id) })
            .collect(),
    };
    group.install(&epoch2, &["r2".into(), "r3".into()]).await;
    // Usually r1 still believes it leads here; its next keepalive (every 200 ms) may
    // already have taught it otherwise. Either way, the write below must be refused.
    let believes_it_leads = group.status("r1").await.expect("r1").role() == pb::Role::Primary;
    eprintln!("r1 still believes it leads: {believes_it_leads}");

    // A client that still talks to r1 cannot get a write through.
    let request = pb::ExecuteRequest {
        client_id: "stale-client".into(),
        request_id: 1,
        op: Some(pb::Operation {
            kind: Some(pb::operation::Kind::Put(pb::Put { key: "fenced".into(), value: "x".into() })),
        }),
        epoch: 0,
    };
    let refused = replica_client(&group.address("r1"))
        .execute(request)
        .await
        .expect_err("a deposed primary completed a write");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    match error_detail(&refused) {
        Some(Detail::NotPrimary(hint)) => {
            assert_eq!((hint.epoch, hint.primary_id.as_str()), (2, "r2"))
        }
        other => panic!("expected NotPrimary naming r2, got {other:?} ({})", refused.message()),
    }
    // r1 learned the new epoch from the backups' refusal and stepped down.
    let r1 = group.status("r1").await.expect("r1");
    assert_eq!((r1.configuration.as_ref().map(|c| c.epoch), r1.role()), (Some(2), pb::Role::Standby));
    // Nothing of it reached the group's state.
    let after = group.wait_converged(&["r2", "r3"], CONVERGE).await;
    assert_eq!((after.digest, after.seq), (before.digest, before.seq));
    assert_eq!(client.get("fenced").await.expect("get"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_from_an_older_epoch_is_refused_and_changes_nothing() {
    let mut group = Group::start(3, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    client.put("k", "v").await.expect("put");
    group.reconfigure("r1", &["r1", "r2", "r3"]).await;
    let before = group.status("r2").await.expect("r2");
    let stale = pb::AppendRequest {
        epoch: 1,
        leader_id: "r1".into(),
        prev_seq: before.last_seq,
        prev_epoch: 1,
        entries: vec![pb::Entry {
            seq: before.last_seq + 1,
            epoch: 1,
            client_id: "ghost".into(),
            request_id: 1,
            op: None,
            ..pb::Entry::default()
        }],
        commit_seq: before.last_seq + 1,
        epoch_start_seq: 0,
    };
    let mut peer = pb::peer_client::PeerClient::new(internal_channel(&group.address("r2")));
    let refused = peer.append(stale).await.expect_err("stale append accepted");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let Some(Detail::WrongEpoch(wrong)) = error_detail(&refused) else {
        panic!("no WrongEpoch detail: {refused:?}")
    };
    assert_eq!((wrong.got, wrong.current), (1, 2));
    assert_eq!(
        wrong.configuration.map(|c| c.epoch),
        Some(2),
        "the refusal tells the sender the newer configuration"
    );
    let after = group.status("r2").await.expect("r2");
    assert_eq!((after.last_seq, after.commit_seq), (before.last_seq, before.commit_seq));

    // A configuration older than the current one, or different for the same epoch: refused.
    let mut control = pb::control_client::ControlClient::new(internal_channel(&group.address("r2")));
    let mut older = group.config.clone();
    older.epoch = 1;
    assert_eq!(
        control.install_configuration(older).await.expect_err("older epoch").code(),
        Code::FailedPrecondition
    );
    let mut conflicting = group.config.clone();
    conflicting.primary = "r2".into();
    let refused =
        control.install_configuration(conflicting).await.expect_err("conflicting configuration accepted");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(group.status("r2").await.expect("r2").configuration, Some(group.config.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_get_typed_errors_and_change_nothing() {
    let group = Group::start(3, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    client.put("k", "v").await.expect("put");
    let before = group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
    let mut primary = replica_client(&group.address("r1")).max_encoding_message_size(8 << 20);
    let request = |op: Option<pb::operation::Kind>, epoch: u64| pb::ExecuteRequest {
        client_id: "bad-client".into(),
        request_id: 1,
        op: Some(pb::Operation { kind: op }),
        epoch,
    };
    let put = |key: &str, bytes: usize| {
        Some(pb::operation::Kind::Put(pb::Put { key: key.into(), value: vec![b'x'; bytes].into() }))
    };
    let cases = [
        ("unknown op", request(None, 0), Code::InvalidArgument, "op"),
        (
            "oversize value",
            request(put("k", tandem_replica::state::MAX_VALUE_BYTES + 1), 0),
            Code::InvalidArgument,
            "op.value",
        ),
        ("empty key", request(put("", 1), 0), Code::InvalidArgument, "op.key"),
        ("oversize key", request(put(&"k".repeat(2000), 1), 0), Code::InvalidArgument, "op.key"),
    ];
    for (what, request, code, field) in cases {
        let refused = primary.execute(request).await.expect_err(what);
        assert_eq!(refused.code(), code, "{what}: {refused:?}");
        match error_detail(&refused) {
            Some(Detail::InvalidRequest(invalid)) => assert_eq!(invalid.field, field, "{what}"),
            other => panic!("{what}: expected InvalidRequest, got {other:?}"),
        }
    }
    let refused = primary.execute(request(put("k", 1), 7)).await.expect_err("wrong epoch accepted");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        matches!(error_detail(&refused), Some(Detail::WrongEpoch(w)) if w.got == 7 && w.current == 1),
        "{refused:?}"
    );

    // Garbage on the port: the connection is dropped, the replica keeps serving.
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(group.address("r1")).await.expect("connect");
    socket.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage \x16\x03\x01").await.expect("write garbage");
    drop(socket);

    let after = group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
    assert_eq!((after.digest, after.seq), (before.digest, before.seq), "a refused request changed the state");
    assert_eq!(client.get("k").await.expect("get").as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoint_interval_changes_at_run_time() {
    let group = Group::start_with(3, Mode::Passive, &["--checkpoint-interval-ms", "0"]).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    for i in 0..20 {
        client.put(&format!("k{i}"), "v").await.expect("put");
    }
    sleep(Duration::from_millis(300)).await;
    assert_eq!(group.status("r2").await.expect("r2").checkpoint_seq, 0, "checkpoints are off");

    let mut control = pb::control_client::ControlClient::new(internal_channel(&group.address("r1")));
    let settings = control
        .update_settings(pb::Settings { checkpoint_interval_ms: Some(100), ..pb::Settings::default() })
        .await
        .expect("update");
    assert_eq!(settings.into_inner().checkpoint_interval_ms, Some(100));
    let commit = group.status("r1").await.expect("r1").commit_seq;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r2 = group.status("r2").await.expect("r2");
        if r2.checkpoint_seq >= commit {
            assert_eq!(r2.applied_seq, r2.checkpoint_seq, "a passive backup's state is its last checkpoint");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint reached r2: {r2:?}");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(group.status("r1").await.expect("r1").checkpoint_interval_ms, 100);
    group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
}

/// Issue 9: idle sessions expire (a 1 s window here), on every replica alike. A late
/// retry of a forgotten session is refused with SESSION_EXPIRED and does not run again;
/// a library client that idled past the window carries on (its session is renewed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_expired_session_refuses_a_late_retry_and_an_idle_client_carries_on() {
    let group = Group::start_with(3, Mode::Active, &["--session-expiry-ms", "1000"]).await;
    let mut idle = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    assert_eq!(idle.increment("n", 1).await.expect("increment"), 1);
    let mut primary = replica_client(&group.address("r1"));
    let late = pb::ExecuteRequest {
        client_id: "late".into(),
        request_id: tandem_replica::wire::unix_micros(),
        op: Some(pb::Operation {
            kind: Some(pb::operation::Kind::Increment(pb::Increment { key: "m".into(), delta: 1 })),
        }),
        epoch: 0,
    };
    primary.execute(late.clone()).await.expect("first attempt");
    // Real time must pass the window; then any write makes every replica forget both.
    sleep(Duration::from_millis(1100)).await;
    let mut other = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    other.put("trigger", "1").await.expect("put");
    assert_eq!(group.status("r1").await.expect("r1").sessions, 1, "only the new session is left");

    let refused = primary.execute(late).await.expect_err("a late retry ran again");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        matches!(error_detail(&refused), Some(Detail::SessionExpired(e)) if e.client_id == "late"),
        "{refused:?}"
    );
    assert_eq!(other.get("m").await.expect("get").as_deref(), Some(&b"1"[..]), "ran once");
    assert_eq!(idle.increment("n", 1).await.expect("the idle client carries on"), 2);
    group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
}

/// Issue 7, seen 6: a request id reused for another operation was answered with the
/// earlier request's reply, so the write "succeeded" and never happened. Both modes: the
/// reuse is refused with a typed error, while a true retry is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_reused_for_another_operation_is_refused_in_both_modes() {
    for mode in [Mode::Passive, Mode::Active] {
        let group = Group::start(3, mode).await;
        let request = |value: &str| pb::ExecuteRequest {
            client_id: "reuser".into(),
            request_id: 1,
            op: Some(pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put {
                    key: "a".into(),
                    value: value.to_owned().into(),
                })),
            }),
            epoch: 0,
        };
        let mut leader = replica_client(&group.address("r1"));
        leader.execute(request("1")).await.expect("the first request executes");
        let retry = leader.execute(request("1")).await.expect("a true retry is answered");
        assert!(retry.get_ref().result.is_some());
        let refused = leader.execute(request("2")).await.expect_err("a reused id was answered");
        assert_eq!(refused.code(), Code::AlreadyExists, "{mode:?}: {refused:?}");
        assert!(
            matches!(error_detail(&refused), Some(Detail::RequestIdReused(r)) if r.request_id == 1),
            "{refused:?}"
        );
        let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
        assert_eq!(
            client.get("a").await.expect("get").as_deref(),
            Some(&b"1"[..]),
            "{mode:?}: nothing changed"
        );
        group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
    }
}

/// Active mode: a request that reaches only a member (the client cannot reach the
/// order-keeper) is handed to the order-keeper by that member, executes once
/// everywhere, and is answered; one sent over the stream the client library uses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_member_forwards_a_request_the_order_keeper_never_got() {
    let group = Group::start(3, Mode::Active).await;
    let put = |request_id: u64, key: &str| pb::ExecuteRequest {
        client_id: "only-r2".into(),
        request_id,
        op: Some(pb::Operation {
            kind: Some(pb::operation::Kind::Put(pb::Put { key: key.into(), value: "v".into() })),
        }),
        epoch: 0,
    };
    let mut member = replica_client(&group.address("r2"));
    let reply = tokio::time::timeout(Duration::from_secs(10), member.execute(put(1, "unary")))
        .await
        .expect("answered within 10 s")
        .expect("executed");
    assert_eq!(reply.get_ref().replica_id, "r2");
    let batch =
        pb::ExecuteBatch { requests: vec![pb::TaggedRequest { tag: 7, request: Some(put(2, "streamed")) }] };
    let mut answers = member
        .execute_stream(futures::stream::iter(vec![batch]))
        .await
        .expect("the stream opens")
        .into_inner();
    let answered = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("answered within 10 s")
        .expect("a message")
        .expect("not the end of the stream");
    assert_eq!(answered.results.len(), 1);
    assert_eq!(answered.results[0].tag, 7, "the answer carries the request's tag");
    assert!(
        matches!(answered.results[0].outcome, Some(pb::execute_result::Outcome::Reply(_))),
        "{answered:?}"
    );
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    for key in ["unary", "streamed"] {
        assert_eq!(client.get(key).await.expect("get").as_deref(), Some(&b"v"[..]), "{key}");
    }
    let status = replica_client(&group.address("r1")).status(pb::StatusRequest {}).await.expect("status");
    group.wait_converged(&["r1", "r2", "r3"], CONVERGE).await;
    assert!(status.get_ref().last_seq >= 2, "the order-keeper ordered both: {:?}", status.get_ref());
}

/// A follower that answers every call, with numbers no correct follower could send:
/// matches and checkpoints beyond anything its leader holds. Its first answer asks for a
/// checkpoint (no state), so both kinds of answer reach the leader. It has no append
/// stream (as a follower of an older version): the leader must fall back to unary
/// appends, or this follower would never hear from it.
#[derive(Clone, Default)]
struct FaultyFollower {
    appends: Arc<std::sync::atomic::AtomicU64>,
    checkpoints: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for FaultyFollower {
    async fn append(
        &self,
        _: tonic::Request<pb::AppendRequest>,
    ) -> Result<tonic::Response<pb::AppendReply>, tonic::Status> {
        let n = self.appends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reply = match if n == 0 { 0 } else { 1 + n % 3 } {
            0 => pb::AppendReply { matched: false, has_state: false, ..Default::default() },
            1 => pb::AppendReply {
                matched: true,
                match_seq: u64::MAX,
                last_seq: u64::MAX,
                has_state: true,
                base_seq: 0,
            },
            2 => pb::AppendReply {
                matched: false,
                match_seq: 0,
                last_seq: u64::MAX,
                has_state: true,
                base_seq: u64::MAX,
            },
            _ => pb::AppendReply {
                matched: true,
                match_seq: 1 << 40,
                last_seq: 1 << 40,
                has_state: true,
                base_seq: 1 << 40,
            },
        };
        Ok(tonic::Response::new(reply))
    }

    type AppendStreamStream = futures::stream::Empty<Result<pb::AppendReply, tonic::Status>>;

    async fn append_stream(
        &self,
        _: tonic::Request<tonic::Streaming<pb::AppendRequest>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("this follower predates the append stream"))
    }

    async fn order(
        &self,
        _: tonic::Request<pb::OrderRequest>,
    ) -> Result<tonic::Response<pb::OrderReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::OrderReply { seq: u64::MAX }))
    }

    async fn install_checkpoint(
        &self,
        request: tonic::Request<tonic::Streaming<pb::CheckpointChunk>>,
    ) -> Result<tonic::Response<pb::InstallCheckpointReply>, tonic::Status> {
        let mut chunks = request.into_inner();
        while let Ok(Some(_)) = chunks.message().await {}
        let n = self.checkpoints.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let installed_seq = if n.is_multiple_of(2) { u64::MAX } else { 1 << 40 };
        Ok(tonic::Response::new(pb::InstallCheckpointReply {
            installed_seq,
            last_seq: installed_seq,
            takes_changes: true,
        }))
    }

    async fn join(
        &self,
        _: tonic::Request<pb::JoinRequest>,
    ) -> Result<tonic::Response<pb::JoinReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::JoinReply { epoch: u64::MAX }))
    }
}

/// Issue 9: an out-of-range checkpoint sequence in a follower's answer made the leader's
/// sender panic in a loop while the primary still reported SERVING, so no failover came.
/// A faulty (but admitted) follower now only gets its answers refused: the leader stays
/// up and says that follower does not answer (what the RM fails a follower for); once
/// the RM drops it, writes go on and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_faulty_follower_sends_out_of_range_replies_and_the_leader_keeps_serving() {
    let mut group = Group::start(2, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    for i in 0..20 {
        client.put(&format!("k{i}"), "v").await.expect("put");
    }

    let faulty = FaultyFollower::default();
    // Peers reach it on its internal port: its client address + 10000.
    let faulty_address = format!("127.0.0.1:{}", support::cluster::free_port());
    let internal = tandem_replica::wire::internal_address(&faulty_address).expect("an internal address");
    let listener = tokio::net::TcpListener::bind(&internal).await.expect("a port for the faulty follower");
    let serving = CancellationToken::new();
    let router =
        tonic::transport::Server::builder().add_service(pb::peer_server::PeerServer::new(faulty.clone()));
    tokio::spawn(tandem_replica::wire::serve_until_shutdown(router, listener, serving.clone()));
    let mut with_faulty = group.config.clone();
    with_faulty.epoch += 1;
    with_faulty.members.push(pb::Member { id: "r3".into(), address: faulty_address });
    group.install(&with_faulty, &group.running()).await;
    group.config = with_faulty;

    // Both kinds of bad answer reach the leader, again and again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    while count(&faulty.appends) < 20 || count(&faulty.checkpoints) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader stopped talking to its follower: {} appends, {} checkpoints",
            count(&faulty.appends),
            count(&faulty.checkpoints)
        );
        sleep(Duration::from_millis(50)).await;
    }
    // The leader is up and tells the RM that this follower has not answered.
    let r1 = group.status("r1").await.expect("the leader answers");
    assert_eq!(r1.role(), pb::Role::Primary, "{r1:?}");
    let r3 = r1.followers.iter().find(|f| f.replica_id == "r3").expect("r3 is a follower");
    assert!(r3.ack_age_ms >= 1_000 && r3.match_seq == 0, "a faulty follower counts as answering: {r3:?}");

    // The RM fails it; the group serves again, and nothing was lost.
    group.reconfigure("r1", &["r1", "r2"]).await;
    serving.cancel();
    for i in 20..30 {
        client.put(&format!("k{i}"), "v").await.expect("put after the faulty follower is gone");
    }
    for i in 0..30 {
        assert_eq!(client.get(&format!("k{i}")).await.expect("get").as_deref(), Some(&b"v"[..]), "k{i}");
    }
    group.wait_converged(&["r1", "r2"], CONVERGE).await;
    let log = std::fs::read_to_string(group.log_dir().join("r1.1.log")).expect("r1's log");
    assert!(!log.contains("panicked"), "the leader panicked:\n{log}");
    assert!(log.contains("refused a follower's answer"), "the refusals are logged");
}

/// Issue 9: a checkpoint stream that stopped after its header left a backup without a
/// state for good, and an endless one grew a backup from 11 MiB to 1 GiB. Both are now
/// refused (BadCheckpoint, INVALID_ARGUMENT) and the backup is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_or_oversized_checkpoint_stream_is_refused_and_changes_nothing() {
    use pb::checkpoint_chunk::Part;
    let group = Group::start(2, Mode::Passive).await;
    let mut client = Client::new(ClientSettings::new(group.endpoints())).expect("client");
    for i in 0..10 {
        client.put(&format!("k{i}"), "v").await.expect("put");
    }
    let before = group.wait_converged(&["r1", "r2"], CONVERGE).await;
    let r2_before = group.status("r2").await.expect("r2");
    let header = |seq: u64, bytes: u64| pb::CheckpointChunk {
        part: Some(Part::Header(pb::CheckpointHeader {
            epoch: group.config.epoch,
            leader_id: "r1".into(),
            seq,
            seq_epoch: group.config.epoch,
            keys: 1_000_000,
            sessions: 0,
            bytes,
            ..Default::default()
        })),
    };
    let values = |n: usize| pb::CheckpointChunk {
        part: Some(Part::KeyValues(pb::KeyValueBatch {
            entries: vec![pb::KeyValue { key: format!("flood{n}"), value: vec![b'x'; 64 * 1024].into() }],
        })),
    };
    let streams: Vec<(&str, Vec<pb::CheckpointChunk>, &str)> = vec![
        ("header only", vec![header(r2_before.last_seq + 1_000, 0)], "stream ended before the trailer"),
        (
            "more than announced",
            (0..64).map(values).fold(vec![header(r2_before.last_seq + 1_000, 100_000)], |mut v, c| {
                v.push(c);
                v
            }),
            "more bytes than its header announced",
        ),
        ("too large", vec![header(r2_before.last_seq + 1_000, u64::MAX)], "more than a replica receives"),
        ("no header", vec![values(0)], "expected a header first"),
        (
            "changes to a state r2 does not hold",
            {
                let mut changes = header(r2_before.last_seq + 1_000, 100_000);
                if let Some(Part::Header(header)) = changes.part.as_mut() {
                    header.base_seq = r2_before.checkpoint_seq + 777;
                }
                vec![changes, values(0)]
            },
            "the leader sends the whole state next",
        ),
    ];
    let mut peer = pb::peer_client::PeerClient::new(internal_channel(&group.address("r2")));
    for (what, chunks, reason) in streams {
        let refused = peer.install_checkpoint(futures::stream::iter(chunks)).await.expect_err(what);
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert!(refused.message().contains(reason), "{what}: {}", refused.message());
        let r2 = group.status("r2").await.expect("r2");
        assert!(r2.ready && r2.has_state, "{what} left r2 without its state: {r2:?}");
        assert_eq!(
            (r2.last_seq, r2.checkpoint_seq),
            (r2_before.last_seq, r2_before.checkpoint_seq),
            "{what}"
        );
    }
    client.put("after", "v").await.expect("the group still serves");
    let after = group.wait_converged(&["r1", "r2"], CONVERGE).await;
    assert!(after.seq > before.seq);
}
