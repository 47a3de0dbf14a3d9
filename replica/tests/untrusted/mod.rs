//! Drivers for every decoder of untrusted bytes: each takes raw bytes, decodes them the
//! way the gRPC layer does, feeds the messages to the same core calls its handler makes,
//! and asserts after every step that bad input is refused and changed nothing it must
//! not. A broken rule is a panic, which both callers report: the property test
//! (`tests/untrusted_input.rs`, run in CI) and the cargo-fuzz targets (`fuzz/`, which
//! include this file, since cargo-fuzz needs a nightly toolchain CI does not have).
//!
//! A stream of messages (checkpoint chunks, LFD messages, successive calls) is read as
//! length-delimited protobuf frames, the first undecodable frame ending it, as a gRPC
//! stream ends at its first bad message.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use tandem_replica::checkpoint::Assembler;
use tandem_replica::detector::gfd::{FORGET_GONE_AFTER_MS, GfdCore, GfdSettings};
use tandem_replica::error::ReplicaError;
use tandem_replica::pb::{self, Mode, checkpoint_chunk::Part, lfd_message};
use tandem_replica::replication::{Core, Route, check_configuration};
use tandem_replica::state::{Applied, DEFAULT_SESSION_EXPIRY_MS, op_digest, validate};
use tandem_replica::tls::{self, Identity};

/// The group every driver's cores belong to: r1 leads, r2 and r3 follow.
pub const MEMBERS: [&str; 3] = ["r1", "r2", "r3"];

/// A fixed wall clock (unix ms) for the cores, so a run is reproducible.
pub const NOW_MS: u64 = 1_700_000_000_000;

pub fn address(id: &str) -> String {
    format!("127.0.0.1:{}", 7100 + id.len())
}

pub fn configuration(epoch: u64, mode: Mode, primary: &str, members: &[&str]) -> pb::Configuration {
    pb::Configuration {
        epoch,
        mode: mode.into(),
        primary: primary.into(),
        members: members.iter().map(|id| pb::Member { id: (*id).into(), address: address(id) }).collect(),
    }
}

/// A replica `id` of a new group, configured with `config`.
pub fn core(id: &str, bootstrap: bool, config: pb::Configuration) -> Core {
    let mut core = Core::new(id, bootstrap);
    core.set_clock(NOW_MS);
    core.set_session_expiry(DEFAULT_SESSION_EXPIRY_MS);
    core.install_config(config).expect("a well-formed first configuration");
    core
}

/// The messages of a stream, and whether it ended on an undecodable frame.
pub fn frames<M: Message + Default>(mut data: &[u8]) -> (Vec<M>, bool) {
    let mut messages = Vec::new();
    // Each decoded frame consumes at least its length prefix: at most data.len() rounds.
    while !data.is_empty() {
        match M::decode_length_delimited(&mut data) {
            Ok(message) => messages.push(message),
            Err(_) => return (messages, true),
        }
    }
    (messages, false)
}

/// The inverse of `frames`: what the drivers read.
pub fn encode_frames<M: Message>(messages: &[M]) -> Vec<u8> {
    let mut data = Vec::new();
    for message in messages {
        message.encode_length_delimited(&mut data).expect("a Vec grows as needed");
    }
    data
}

/// What a driver saw: how many messages were accepted and how many refused, so a test
/// can tell a valid seed (accepted) from garbage (refused) and know the fuzzer's seeds
/// reach past the decoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: usize,
    pub refused: usize,
}

impl Outcome {
    fn count(&mut self, accepted: bool) {
        if accepted {
            self.accepted += 1;
        } else {
            self.refused += 1;
        }
    }
}

/// Everything observable of a core that a refused message must leave as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    config: Option<pb::Configuration>,
    role: pb::Role,
    ready: bool,
    last_seq: u64,
    commit_seq: u64,
    applied_seq: u64,
    checkpoint_seq: u64,
    synced_epoch: u64,
    log_len: usize,
    sessions: usize,
    digest: String,
    /// Committed entries not yet folded into the state (a passive backup's).
    committed: Vec<pb::Entry>,
}

impl Seen {
    pub fn of(core: &Core) -> Self {
        let (state, committed, _) = core.committed_state();
        Self {
            config: core.config().cloned(),
            role: core.role(),
            ready: core.is_ready(),
            last_seq: core.last_seq(),
            commit_seq: core.commit_seq(),
            applied_seq: core.applied_seq(),
            checkpoint_seq: core.checkpoint_seq(),
            synced_epoch: core.synced_epoch(),
            log_len: core.log_len(),
            sessions: core.sessions(),
            digest: state.digest(),
            committed,
        }
    }

    /// What only moves forward, whatever a peer sends: a replica never forgets that an
    /// entry committed or executed, nor goes back an epoch.
    fn assert_monotone(&self, after: &Seen, what: &str) {
        let epoch = |seen: &Seen| seen.config.as_ref().map_or(0, |c| c.epoch);
        assert!(epoch(after) >= epoch(self), "{what}: epoch went back: {self:?} -> {after:?}");
        assert!(after.commit_seq >= self.commit_seq, "{what}: commit went back: {self:?} -> {after:?}");
        assert!(after.applied_seq >= self.applied_seq, "{what}: applied went back: {self:?} -> {after:?}");
        for entry in self.committed.iter().filter(|e| e.seq > after.applied_seq) {
            assert!(
                after.committed.contains(entry),
                "{what}: committed entry {} changed: {after:?}",
                entry.seq
            );
        }
    }
}

// ------------------------------------------------------------------ client requests

/// `Replica.Execute`: each request routed as the handler does (`Core::route`, then
/// `advance` when it waits) on three replicas: the primary of a one-member passive group
/// (executes at once), the order-keeper of an active group of three (orders, cannot
/// commit alone) and an active member (hands requests to the order-keeper).
pub fn execute_requests(data: &[u8]) -> Outcome {
    let (requests, _) = frames::<pb::ExecuteRequest>(data);
    let mut solo = core("r1", true, configuration(1, Mode::Passive, "r1", &["r1"]));
    let mut keeper = core("r1", true, configuration(1, Mode::Active, "r1", &MEMBERS));
    let mut member = core("r2", true, configuration(1, Mode::Active, "r1", &MEMBERS));
    // What executed on the solo primary, with the fingerprint of its operation.
    let mut executed: HashMap<(String, u64), u64> = HashMap::new();
    let mut outcome = Outcome::default();
    for (step, request) in requests.iter().enumerate() {
        let now = NOW_MS + step as u64;
        let valid = validate(&request.client_id, request.request_id, request.op.as_ref()).is_ok();
        let digest = request.op.as_ref().map(op_digest).unwrap_or_default();
        for (name, core) in [("solo", &mut solo), ("keeper", &mut keeper), ("member", &mut member)] {
            core.set_clock(now);
            let before = Seen::of(core);
            let route = core.route(request);
            if matches!(route, Route::Wait { .. }) {
                core.advance();
            }
            let after = Seen::of(core);
            let done = core.take_executed();
            match &route {
                Route::Refuse(_) | Route::Reply(_) => {
                    assert_eq!(before, after, "{name}: a request answered at once changed the replica")
                }
                Route::Wait { forward_to } => {
                    assert!(valid, "{name}: an invalid request was accepted: {request:?}");
                    let ordered = after.last_seq - before.last_seq;
                    assert!(ordered <= 1, "{name}: one request, {ordered} entries");
                    assert_eq!(forward_to.is_some(), name == "member", "{name}: forwarded {forward_to:?}");
                    before.assert_monotone(&after, name);
                }
            }
            if let Route::Refuse(ReplicaError::InvalidRequest { .. }) = route {
                assert!(!valid, "{name}: a valid request was refused as invalid: {request:?}");
            }
            if !valid {
                assert!(matches!(route, Route::Refuse(_)), "{name}: invalid request routed: {route:?}");
            }
            if name != "solo" {
                assert!(done.is_empty(), "{name}: executed without the group: {done:?}");
                continue;
            }
            outcome.count(!matches!(route, Route::Refuse(_)));
            if let Route::Reply(reply) = &route {
                // A retry is answered with its own result only (invariant 7).
                let key = (request.client_id.clone(), request.request_id);
                assert_eq!(executed.get(&key), Some(&digest), "answered from another request's session");
                assert!(reply.result.is_some());
            }
            for done in done {
                let key = (done.client_id.clone(), done.request_id);
                assert_eq!(key, (request.client_id.clone(), request.request_id), "executed another request");
                if let Applied::Executed(_) = done.outcome {
                    assert!(executed.insert(key, done.op_digest).is_none(), "executed twice: {done:?}");
                }
            }
        }
    }
    outcome
}

/// `Peer.Order`: an active member hands a client request to the order-keeper
/// (`Core::on_order`, then `advance`). A member that does not keep the order refuses.
pub fn order_requests(data: &[u8]) -> Outcome {
    let (requests, _) = frames::<pb::OrderRequest>(data);
    let mut keeper = core("r1", true, configuration(1, Mode::Active, "r1", &MEMBERS));
    let mut member = core("r2", true, configuration(1, Mode::Active, "r1", &MEMBERS));
    let mut outcome = Outcome::default();
    for request in &requests {
        let valid = validate(&request.client_id, request.request_id, request.op.as_ref()).is_ok();
        for (name, core) in [("keeper", &mut keeper), ("member", &mut member)] {
            let before = Seen::of(core);
            let ordered = core.on_order(request);
            if ordered.is_ok() {
                core.advance();
            }
            let after = Seen::of(core);
            match ordered {
                Ok(seq) => {
                    assert!(valid && name == "keeper", "{name}: ordered {request:?}");
                    // 0: ordered before, nothing new; else the one new entry's seq.
                    assert_eq!(after.last_seq, before.last_seq + u64::from(seq > 0), "{name}: seq {seq}");
                    assert!(seq == 0 || seq == after.last_seq, "{name}: seq {seq} is not the new entry");
                    before.assert_monotone(&after, name);
                }
                Err(_) => assert_eq!(before, after, "{name}: a refused order changed the replica"),
            }
            if name == "keeper" {
                outcome.count(ordered.is_ok());
            }
        }
    }
    outcome
}

// ------------------------------------------------------------------ replication

/// What a leader sends: `count` entries of `epoch` from `from_seq`, each an increment.
pub fn leader_entries(epoch: u64, from_seq: u64, count: u64) -> Vec<pb::Entry> {
    (from_seq..from_seq + count)
        .map(|seq| pb::Entry {
            seq,
            epoch,
            client_id: format!("c{}", seq % 2),
            request_id: seq,
            op: Some(pb::Operation {
                kind: Some(pb::operation::Kind::Increment(pb::Increment { key: "n".into(), delta: 1 })),
            }),
            stamp_ms: NOW_MS,
            session_expiry_ms: DEFAULT_SESSION_EXPIRY_MS,
        })
        .collect()
}

/// A follower that holds three entries of epoch 1, two of them committed.
fn primed_follower(mode: Mode) -> Core {
    let mut follower = core("r2", true, configuration(1, mode, "r1", &MEMBERS));
    let append = pb::AppendRequest {
        epoch: 1,
        leader_id: "r1".into(),
        prev_seq: 0,
        prev_epoch: 0,
        entries: leader_entries(1, 1, 3),
        commit_seq: 2,
        epoch_start_seq: 0,
    };
    let reply = follower.on_append(&append).expect("a valid append");
    assert!(reply.matched);
    follower
}

/// `Peer.Append`: each append given to a follower (`Core::on_append`) of a passive and
/// of an active group. A refused append changes nothing; an accepted one only moves the
/// follower forward, and a passive backup never executes.
pub fn appends(data: &[u8]) -> Outcome {
    let (requests, _) = frames::<pb::AppendRequest>(data);
    let mut backup = primed_follower(Mode::Passive);
    let mut member = primed_follower(Mode::Active);
    let mut outcome = Outcome::default();
    for request in &requests {
        for (name, core) in [("backup", &mut backup), ("member", &mut member)] {
            let before = Seen::of(core);
            let answered = core.on_append(request);
            let after = Seen::of(core);
            core.take_executed();
            match &answered {
                Ok(reply) => {
                    before.assert_monotone(&after, name);
                    assert_eq!(request.epoch, before.config.as_ref().map_or(0, |c| c.epoch));
                    assert_eq!(request.leader_id, "r1", "{name}: accepted an append from a non-leader");
                    assert_eq!((reply.last_seq, reply.has_state), (after.last_seq, after.ready));
                    assert!(reply.match_seq <= after.last_seq, "{name}: matched past its log: {reply:?}");
                    assert!(after.commit_seq <= after.last_seq.max(before.commit_seq));
                    let grown = after.last_seq.saturating_sub(before.last_seq);
                    assert!(grown <= request.entries.len() as u64, "{name}: {grown} entries from fewer");
                    if name == "backup" {
                        assert_eq!(before.digest, after.digest, "a passive backup executed");
                    }
                }
                Err(_) => assert_eq!(before, after, "{name}: a refused append changed the replica"),
            }
            if name == "member" {
                outcome.count(answered.is_ok());
            }
        }
    }
    outcome
}

// ------------------------------------------------------------------ configuration

/// `Control.InstallConfiguration`: each configuration checked (`check_configuration`)
/// and installed (`Core::install_config`) on the primary of a passive group that
/// executed requests, and on a fresh member. A configuration changes who leads, never
/// the data; one that is refused changes nothing.
pub fn configurations(data: &[u8]) -> Outcome {
    let (configs, _) = frames::<pb::Configuration>(data);
    let mut primary = core("r1", true, configuration(1, Mode::Passive, "r1", &["r1"]));
    for request_id in 1..=3 {
        let request = pb::ExecuteRequest {
            client_id: "c".into(),
            request_id,
            op: Some(pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put { key: "k".into(), value: "v".into() })),
            }),
            epoch: 0,
        };
        assert!(matches!(primary.route(&request), Route::Wait { .. }));
        primary.advance();
    }
    assert_eq!(primary.keys(), 1);
    let mut fresh = core("r2", true, configuration(1, Mode::Active, "r1", &MEMBERS));
    let mut outcome = Outcome::default();
    for config in &configs {
        let well_formed = check_configuration(config).is_ok();
        for (name, core) in [("primary", &mut primary), ("fresh", &mut fresh)] {
            let before = Seen::of(core);
            let installed = core.install_config(config.clone());
            let after = Seen::of(core);
            core.take_executed();
            match &installed {
                Ok(change) => {
                    assert!(well_formed, "{name}: installed a malformed configuration {config:?}");
                    assert_eq!((change.epoch, after.config.as_ref()), (config.epoch, Some(config)));
                    before.assert_monotone(&after, name);
                    assert_eq!(before.digest, after.digest, "{name}: a configuration changed the data");
                    assert!(after.last_seq >= before.commit_seq, "{name}: dropped committed entries");
                }
                Err(_) => assert_eq!(before, after, "{name}: a refused configuration changed the replica"),
            }
            if name == "fresh" {
                outcome.count(installed.is_ok());
            }
        }
    }
    outcome
}

// ------------------------------------------------------------------ checkpoints

/// `Peer.InstallCheckpoint`: the chunks of one stream, fed to an `Assembler` as the
/// handler does, the header handed to the core (`change_base` for a checkpoint of
/// changes, then `on_checkpoint_header`), and the verified checkpoint installed
/// (`install_checkpoint`), on a replica joining an active group, on a member that holds
/// committed entries, and on a passive backup. A stream that is refused, broken
/// or truncated installs nothing; after one that is installed, the replica takes its
/// leader's next append.
pub fn checkpoint(data: &[u8]) -> Outcome {
    let (chunks, broken) = frames::<pb::CheckpointChunk>(data);
    let joiner = core("r4", false, configuration(1, Mode::Active, "r1", &MEMBERS));
    let installed = receive_checkpoint(joiner, chunks.clone(), broken);
    receive_checkpoint(primed_follower(Mode::Active), chunks.clone(), broken);
    receive_checkpoint(primed_follower(Mode::Passive), chunks, broken);
    Outcome { accepted: usize::from(installed), refused: usize::from(!installed) }
}

/// One replica receives one checkpoint stream; whether it was installed.
fn receive_checkpoint(mut receiver: Core, chunks: Vec<pb::CheckpointChunk>, broken: bool) -> bool {
    let before = Seen::of(&receiver);
    let mut assembler = Assembler::default();
    let mut carried = (0u64, 0u64);
    let mut refused = broken;
    let mut announced = None;
    for chunk in chunks {
        match &chunk.part {
            Some(Part::KeyValues(batch)) => carried.0 += batch.entries.len() as u64,
            Some(Part::Sessions(batch)) => carried.1 += batch.sessions.len() as u64,
            _ => {}
        }
        match assembler.push(chunk).map(|header| header.cloned()) {
            Ok(Some(header)) => {
                let base = (header.base_seq != 0).then(|| receiver.change_base(&header)).transpose();
                match base.and_then(|base| receiver.on_checkpoint_header(&header).map(|()| base)) {
                    Ok(base) => {
                        if let Some(base) = base {
                            assembler.start_from(base);
                        }
                        announced = Some(header.seq);
                    }
                    Err(_) => refused = true,
                }
            }
            Ok(None) => {}
            Err(_) => refused = true,
        }
        if refused {
            break;
        }
    }
    let header = assembler.header().cloned();
    let finished = if refused { None } else { assembler.finish().ok() };
    let Some(checkpoint) = finished else {
        // As the handler does: whatever the header started is undone, and nothing of the
        // stream reaches the state.
        if let Some(seq) = announced {
            receiver.abandon_checkpoint(seq);
        }
        let after = Seen::of(&receiver);
        assert_eq!(
            (before.digest, before.applied_seq, before.ready),
            (after.digest, after.applied_seq, after.ready)
        );
        return false;
    };
    let header = header.expect("a finished checkpoint had a header");
    // The assembler keeps no more than the stream carried, and exactly what the header
    // announced: a count mismatch is never installed.
    let (keys, sessions) = (checkpoint.state.keys() as u64, checkpoint.state.session_count() as u64);
    assert_eq!((keys, sessions), (header.keys, header.sessions));
    // (A checkpoint of changes keeps what its base held besides.)
    assert!(header.base_seq != 0 || (keys <= carried.0 && sessions <= carried.1));
    assert_eq!((checkpoint.seq, checkpoint.seq_epoch), (header.seq, header.seq_epoch));
    let digest = checkpoint.state.digest();
    receiver.install_checkpoint(checkpoint);
    receiver.take_executed();
    let after = Seen::of(&receiver);
    assert!(after.ready, "a verified checkpoint left the replica without a state");
    if !before.ready {
        assert_eq!((after.applied_seq, &after.digest), (header.seq, &digest), "installed another state");
    }
    before.assert_monotone(&after, "checkpoint");
    let keepalive = pb::AppendRequest {
        epoch: 1,
        leader_id: "r1".into(),
        prev_seq: header.seq,
        prev_epoch: header.seq_epoch,
        commit_seq: header.seq,
        ..pb::AppendRequest::default()
    };
    let reply = receiver.on_append(&keepalive).expect("the leader's append after its checkpoint");
    assert!(reply.matched, "{reply:?}");
    true
}

// ------------------------------------------------------------------ detectors

/// `FaultDetector.Attach`: LFD messages on two streams of one GFD (`GfdCore::hello`,
/// `report`, `answered`, as the service's `read_link`), time passing between them. The
/// membership only ever holds replicas an LFD introduced, a report on a stream that did
/// not say hello changes nothing, and once the streams close everyone is gone, then
/// forgotten: the maps are bounded by the streams.
pub fn lfd_messages(data: &[u8]) -> Outcome {
    let (messages, _) = frames::<pb::LfdMessage>(data);
    let mut gfd = GfdCore::new(GfdSettings::default(), 0);
    let mut links = [1, 2];
    for link in links {
        gfd.link_opened(link, 0).expect("room for two streams");
    }
    let mut introduced = BTreeSet::new();
    let mut outcome = Outcome::default();
    let mut now = 0;
    for (step, message) in messages.iter().enumerate() {
        now += 10;
        let link = links[step % links.len()];
        let speaks_for = gfd.replica_of(link).map(str::to_owned);
        match &message.kind {
            Some(lfd_message::Kind::Hello(hello)) => {
                if gfd.hello(link, &hello.replica_id, &hello.replica_address, now).is_err() {
                    // Refused (a name too long): the stream is as it was.
                    assert_eq!(gfd.replica_of(link).map(str::to_owned), speaks_for);
                    outcome.count(false);
                    continue;
                }
                // A stream keeps speaking for the replica of its first hello.
                let speaks_for = speaks_for.unwrap_or_else(|| hello.replica_id.clone());
                assert_eq!(gfd.replica_of(link), Some(speaks_for.as_str()));
                introduced.insert(speaks_for);
            }
            Some(lfd_message::Kind::Report(report)) => {
                let changes = gfd.report(link, report, now);
                match &speaks_for {
                    None => assert!(changes.is_empty(), "a report before hello changed {changes:?}"),
                    Some(id) => assert!(changes.iter().all(|c| &c.replica_id == id), "{changes:?}"),
                }
                if let Some(id) = &speaks_for {
                    assert_eq!(gfd.alive().contains(id), report.alive, "{id} after {report:?}");
                }
            }
            Some(lfd_message::Kind::Ack(_)) => gfd.answered(link, now),
            None => {}
        }
        outcome.count(message.kind.is_some());
        // A silent LFD's stream is closed; it reconnects on a new one, as the service's.
        for closed in gfd.tick(now).close {
            assert!(gfd.link_closed(closed, now).is_empty(), "link {closed} was closed already");
            let fresh = links.iter().max().expect("two links") + 1;
            links.iter_mut().filter(|l| **l == closed).for_each(|l| *l = fresh);
            gfd.link_opened(fresh, now).expect("room for two streams");
        }
        let members = gfd.snapshot(now).members;
        assert!(members.iter().all(|m| introduced.contains(&m.replica_id)), "{members:?}");
        assert!(members.len() <= introduced.len());
    }
    for link in links {
        gfd.link_closed(link, now);
    }
    assert!(gfd.alive().is_empty(), "alive with no stream: {:?}", gfd.alive());
    let later = now + FORGET_GONE_AFTER_MS + 1;
    gfd.tick(later);
    assert!(gfd.snapshot(later).members.is_empty(), "members outlived their streams");
    outcome
}

// ------------------------------------------------------------------ certificates

/// The identity in a peer's certificate (`tls::identity_of`, what every internal handler
/// asks of the caller's certificate): any bytes parse or are refused without a panic,
/// and an identity found names a holder exactly (its URI reads back the same).
pub fn certificate(data: &[u8]) -> Outcome {
    let Some(identity) = tls::identity_of(data) else {
        return Outcome { accepted: 0, refused: 1 };
    };
    assert_eq!(Identity::from_uri(&identity.uri()).as_ref(), Some(&identity));
    let id_ok = match &identity {
        Identity::Replica(id) | Identity::Lfd(id) => !id.is_empty(),
        Identity::Gfd | Identity::Manager => true,
    };
    assert!(id_ok, "an identity without an id: {identity:?}");
    Outcome { accepted: 1, refused: 0 }
}

/// What every target runs on its input.
pub type Driver = fn(&[u8]) -> Outcome;

/// Every target by name (the fuzz targets' and the corpus directories' names).
pub const TARGETS: [(&str, Driver); 7] = [
    ("checkpoint", checkpoint),
    ("execute_request", execute_requests),
    ("order", order_requests),
    ("append", appends),
    ("configuration", configurations),
    ("lfd_message", lfd_messages),
    ("certificate", certificate),
];
