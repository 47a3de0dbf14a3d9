//! The trust boundary, tried as an attacker would: the forged messages that used to
//! rewrite a group (a wiping checkpoint, a forged Append, a configuration naming only
//! the primary, an epoch of 2^63, a Join by an outsider, forged detector reports, a
//! Manager call shrinking the group), sent to a real `tandem up` under a writing
//! workload from three places: without any certificate, with a certificate of another
//! CA, and with a real member's certificate claiming to be someone else. Every one must
//! be refused; the group must go on serving, whole, with nothing acknowledged lost.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::stream;
use support::local::LocalSystem;
use support::workload::{self, Recorder, Workload};
use tandem_replica::client::{Client, ClientError, ClientSettings};
use tandem_replica::pb::{self, Mode, checkpoint_chunk, lfd_message, operation};
use tandem_replica::tls::{Authority, Identity, Material};
use tandem_replica::wire::{ClientCredentials, dial_with, internal_address, within};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const HEAL: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(3);

/// Where the forged messages go: the group's internal endpoints.
struct Targets {
    primary_id: String,
    primary: String,
    backup: String,
    gfd: String,
    manager: String,
    epoch: u64,
}

impl Targets {
    async fn of(system: &LocalSystem) -> Self {
        let config = system.configuration().await;
        let internal = |id: &str| {
            let member = config.members.iter().find(|m| m.id == id).expect("a member");
            internal_address(&member.address).expect("an internal address")
        };
        let backup = config.members.iter().find(|m| m.id != config.primary).expect("a backup").id.clone();
        let state = system.state();
        Self {
            primary: internal(&config.primary),
            backup: internal(&backup),
            primary_id: config.primary.clone(),
            gfd: state.gfd,
            manager: state.manager,
            epoch: config.epoch,
        }
    }
}

fn forged_put(seq: u64) -> pb::Entry {
    pb::Entry {
        seq,
        epoch: 1,
        client_id: "forger".into(),
        request_id: seq,
        op: Some(pb::Operation {
            kind: Some(operation::Kind::Put(pb::Put { key: "forged".into(), value: b"x".to_vec().into() })),
        }),
        ..Default::default()
    }
}

/// Sends every forged message through channels from `dial`; each call's outcome, named.
async fn attack(
    targets: &Targets,
    dial: impl Fn(&str) -> Channel,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let mut outcomes = Vec::new();

    let header = pb::CheckpointHeader {
        epoch: targets.epoch,
        leader_id: targets.primary_id.clone(),
        seq: 1 << 40,
        seq_epoch: targets.epoch,
        keys: 0,
        sessions: 0,
        ..Default::default()
    };
    let chunks = vec![
        pb::CheckpointChunk { part: Some(checkpoint_chunk::Part::Header(header)) },
        pb::CheckpointChunk { part: Some(checkpoint_chunk::Part::Trailer(pb::CheckpointTrailer::default())) },
    ];
    let mut peer = pb::peer_client::PeerClient::new(dial(&targets.backup));
    outcomes.push((
        "a header-only checkpoint that would wipe a backup",
        within(CALL, async { peer.install_checkpoint(stream::iter(chunks)).await.map(drop) }).await,
    ));
    let append = pb::AppendRequest {
        epoch: targets.epoch,
        leader_id: targets.primary_id.clone(),
        prev_seq: 0,
        prev_epoch: 0,
        entries: vec![forged_put(1)],
        commit_seq: 1 << 40,
        epoch_start_seq: 0,
    };
    outcomes.push((
        "an Append in the primary's name",
        within(CALL, async { peer.append(append.clone()).await.map(drop) }).await,
    ));
    outcomes.push((
        "an append stream in the primary's name",
        within(CALL, async {
            let mut replies = peer.append_stream(stream::iter([append])).await?.into_inner();
            // A refused append ends the stream with the refusal.
            replies.message().await?.map(drop).ok_or_else(|| tonic::Status::cancelled("no reply"))
        })
        .await,
    ));
    let join = pb::JoinRequest { replica_id: "intruder".into(), address: "127.0.0.1:1".into() };
    let mut to_primary = pb::peer_client::PeerClient::new(dial(&targets.primary));
    outcomes
        .push(("a Join by an outsider", within(CALL, async { to_primary.join(join).await.map(drop) }).await));

    let only_primary = pb::Configuration {
        epoch: targets.epoch + 1,
        mode: Mode::Passive.into(),
        primary: targets.primary_id.clone(),
        members: vec![pb::Member { id: targets.primary_id.clone(), address: "127.0.0.1:1".into() }],
    };
    let mut control = pb::control_client::ControlClient::new(dial(&targets.primary));
    outcomes.push((
        "a configuration naming only the primary",
        within(CALL, async { control.install_configuration(only_primary).await.map(drop) }).await,
    ));
    let huge_epoch = pb::Configuration { epoch: 1 << 63, ..Default::default() };
    let mut control_backup = pb::control_client::ControlClient::new(dial(&targets.backup));
    outcomes.push((
        "a configuration at epoch 2^63",
        within(CALL, async { control_backup.install_configuration(huge_epoch).await.map(drop) }).await,
    ));
    let settings = pb::Settings {
        checkpoint_interval_ms: Some(0),
        gfd_address: Some("127.0.0.1:1".into()),
        ..Default::default()
    };
    outcomes.push((
        "settings moving the GFD away",
        within(CALL, async { control.update_settings(settings).await.map(drop) }).await,
    ));

    let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(dial(&targets.gfd));
    let fake_lfd = (0..50).map(|n| pb::LfdMessage {
        kind: Some(lfd_message::Kind::Hello(pb::LfdHello {
            replica_id: format!("fake-{n}"),
            replica_address: "127.0.0.1:1".into(),
        })),
    });
    outcomes.push((
        "forged LFD reports",
        within(CALL, async {
            let mut answers = gfd.attach(stream::iter(fake_lfd)).await?.into_inner();
            // The GFD sends its settings to an LFD it accepted; a refused one's stream ends.
            loop {
                match tokio::time::timeout(Duration::from_secs(1), answers.message()).await {
                    Ok(Ok(Some(pb::GfdMessage { kind: Some(pb::gfd_message::Kind::Settings(_)) }))) => {
                        return Ok(());
                    }
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => return Err(tonic::Status::cancelled("the GFD closed the stream")),
                    Ok(Err(status)) => return Err(status),
                    Err(_) => return Err(tonic::Status::deadline_exceeded("the GFD kept the link open")),
                }
            }
        })
        .await,
    ));
    let detector_settings = pb::DetectorSettings { failure_threshold: Some(1), ..Default::default() };
    outcomes.push((
        "detector settings",
        within(CALL, async { gfd.update_detector_settings(detector_settings).await.map(drop) }).await,
    ));

    let mut manager = pb::manager_client::ManagerClient::new(dial(&targets.manager));
    let shrink = pb::SpecUpdate { replicas: Some(1), ..Default::default() };
    outcomes.push((
        "Manager.UpdateSpec(replicas=1)",
        within(CALL, async { manager.update_spec(shrink).await.map(drop) }).await,
    ));
    outcomes.push((
        "Manager.Switchover(any)",
        within(CALL, async { manager.switchover(pb::SwitchoverRequest::default()).await.map(drop) }).await,
    ));
    outcomes
}

fn assert_all_refused(who: &str, outcomes: &[(&str, Result<(), tonic::Status>)], codes: &[Code]) {
    for (name, outcome) in outcomes {
        match outcome {
            Ok(()) => panic!("{who}: {name} was accepted"),
            Err(status) => assert!(
                codes.contains(&status.code()),
                "{who}: {name} refused with {:?} ({}), expected one of {codes:?}",
                status.code(),
                status.message()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passive_forged_messages_from_outside_or_from_a_member_change_nothing() {
    forged_messages_change_nothing("passive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_forged_messages_from_outside_or_from_a_member_change_nothing() {
    forged_messages_change_nothing("active").await;
}

async fn forged_messages_change_nothing(mode: &str) {
    let system = LocalSystem::start(3, &["--mode", mode]).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), system.endpoints(), Arc::clone(&recorder), stop.clone());
    sleep(Duration::from_millis(700)).await;
    let targets = Targets::of(&system).await;

    // No certificate at all: plaintext to a TLS port, the handshake never happens.
    let plaintext = attack(&targets, |address| dial_with(None, address, None).expect("address")).await;
    assert_all_refused(
        "without a certificate",
        &plaintext,
        &[Code::Unavailable, Code::Unknown, Code::Internal, Code::DeadlineExceeded, Code::Cancelled],
    );

    // A certificate of another CA, even one naming the manager: the handshake fails.
    let evil = Authority::generate("evil").expect("CA");
    let forged_manager = evil.issue(&Identity::Manager).expect("issue");
    let outsider =
        attack(&targets, |address| dial_with(Some(&forged_manager), address, None).expect("address")).await;
    assert_all_refused(
        "with another CA's certificate",
        &outsider,
        &[Code::Unavailable, Code::Unknown, Code::DeadlineExceeded, Code::Cancelled],
    );

    // A real member's certificate (a backup's), claiming to be the primary, the RM, an
    // LFD: authenticated, and refused for what it claims.
    let backup_id = system
        .configuration()
        .await
        .members
        .into_iter()
        .find(|m| m.id != targets.primary_id)
        .expect("backup")
        .id;
    let member_dir = system.dir().join("tls").join(Identity::Replica(backup_id.clone()).file_name());
    let member = Material::load(&member_dir).expect("the backup's certificate");
    let impostor =
        attack(&targets, |address| dial_with(Some(&member), address, None).expect("address")).await;
    assert_all_refused(
        &format!("with {backup_id}'s certificate"),
        &impostor,
        &[Code::PermissionDenied, Code::Cancelled],
    );
    // The LFD of one replica may not speak for another.
    let lfd = Material::load(&system.dir().join("tls").join(Identity::Lfd(backup_id.clone()).file_name()))
        .expect("LFD certificate");
    let lfd_outcomes =
        attack(&targets, |address| dial_with(Some(&lfd), address, None).expect("address")).await;
    assert_all_refused(
        &format!("with the LFD of {backup_id}'s certificate"),
        &lfd_outcomes,
        &[Code::PermissionDenied, Code::Cancelled],
    );

    // Nothing changed: same epoch, same members, same spec, still whole and serving.
    let description = system.wait_healthy(3, HEAL).await;
    let config = description.configuration.clone().expect("configuration");
    assert_eq!(config.epoch, targets.epoch, "no configuration was installed by a forger: {description:#?}");
    assert_eq!(description.spec.as_ref().map(|s| s.replicas), Some(3), "the spec is unchanged");
    let mut gfd = pb::fault_detector_client::FaultDetectorClient::new(system.manager_channel(&targets.gfd));
    let members = gfd.members(pb::MembersRequest {}).await.expect("GFD members").into_inner();
    let ids: Vec<&str> = members.members.iter().map(|m| m.replica_id.as_str()).collect();
    assert!(ids.iter().all(|id| !id.starts_with("fake-") && *id != "intruder"), "forged members: {ids:?}");
    let output = system.output();
    assert!(!output.contains("fake-"), "the RM heard of a forged member:\n{output}");
    sleep(Duration::from_millis(500)).await;
    system.verify(&recorder, stop, writers).await;
    let mut client = Client::new(ClientSettings::new(system.endpoints())).expect("client");
    assert_eq!(client.get("forged").await.expect("read"), None, "a forged write is visible");
}

/// The client port with `--client-tls --client-token`: a client with the group's CA and
/// token is served; without the token, with a wrong one, or with another CA it is
/// refused at once (not after retrying until its deadline), and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_port_asks_for_tls_and_the_token_when_told_to() {
    let system = LocalSystem::start(3, &["--client-tls", "--client-token"]).await;
    let dir = system.dir();
    let ca = std::fs::read_to_string(dir.join("tls").join("ca.crt")).expect("the group's CA");
    let token = std::fs::read_to_string(dir.join("client-token")).expect("the token").trim().to_owned();
    let client_with = |credentials: ClientCredentials| {
        let mut settings = ClientSettings::new(system.endpoints());
        settings.credentials = credentials;
        settings.deadline = Duration::from_secs(5);
        Client::new(settings).expect("client")
    };

    let mut good = client_with(ClientCredentials { ca: Some(ca.clone()), token: Some(token.clone()) });
    good.put("k", "v").await.expect("a client with the CA and the token is served");
    assert_eq!(good.get("k").await.expect("read").as_deref(), Some(&b"v"[..]));

    let refusals = [
        ("no token", ClientCredentials { ca: Some(ca.clone()), token: None }),
        ("a wrong token", ClientCredentials { ca: Some(ca.clone()), token: Some(format!("{token}x")) }),
    ];
    for (what, credentials) in refusals {
        let started = std::time::Instant::now();
        let error = client_with(credentials).put("k", "forged").await.expect_err(what);
        assert!(matches!(error, ClientError::Refused(_)), "{what}: {error}");
        assert!(started.elapsed() < Duration::from_secs(3), "{what}: refused only after retrying");
    }
    let evil = Authority::generate("evil").expect("CA");
    for (what, credentials) in [
        ("plaintext", ClientCredentials { ca: None, token: Some(token.clone()) }),
        ("another CA", ClientCredentials { ca: Some(evil.ca_pem().to_owned()), token: Some(token.clone()) }),
    ] {
        client_with(credentials).put("k", "forged").await.expect_err(what);
    }
    assert_eq!(good.get("k").await.expect("read").as_deref(), Some(&b"v"[..]), "nothing was overwritten");
    // The admin commands read the replicas as the group's manager (internal port).
    let status = system.tandem(&["status"]);
    assert_eq!(status.lines().filter(|l| l.contains(" yes ")).count(), 3, "{status}");
    let read = system.tandem(&["get", "k"]);
    assert_eq!(read.trim(), "v", "the CLI finds the CA and the token in the directory");
}

/// A `tandem up` killed and started again adopts its group only with the same ports
/// and security: a restart with `--no-tls` (or another `--port`) would speak plaintext
/// to TLS replicas (or look for them elsewhere) and leave the group unable to fail
/// over. It is refused, with what to do, and the group goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_with_other_security_or_ports_is_refused_and_the_group_goes_on() {
    let mut system = LocalSystem::start(3, &[]).await;
    system.kill_up();
    let dir = system.dir();
    let base = system.base_port.to_string();
    let other = (system.base_port + 1000).to_string();
    for (what, extra) in
        [("--no-tls", vec!["--port", base.as_str(), "--no-tls"]), ("--port", vec!["--port", other.as_str()])]
    {
        let out = std::process::Command::new(support::cluster::TANDEM)
            .arg("up")
            .args(&extra)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run tandem up");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: adopted a group it cannot speak to");
        assert!(stderr.contains("start `tandem up` with the same"), "{what}: {stderr}");
    }
    system.start_up();
    system.wait_healthy(3, Duration::from_secs(30)).await;
    let mut client = Client::new(ClientSettings::new(system.endpoints())).expect("client");
    client.put("after", "restart").await.expect("the group serves after the refusals");
}
