//! Deterministic simulation of the replication core: three replicas exchanging messages
//! through a network that delays, reorders and drops them, a Replication Manager that
//! crashes, restarts, wrongly suspects and re-admits replicas, and clients that retry.
//! Proptest drives thousands of schedules, in both modes, and checks after every step:
//!
//! - no two replicas ever execute different requests at the same sequence number;
//! - every request executes at most once: each client increments its own counter, so the
//!   reply to its request n must be exactly n;
//! - after the faults stop, every member reaches the same state, which holds every
//!   acknowledged request.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tandem_replica::checkpoint::{Assembler, Base, Checkpoint};
use tandem_replica::error::ReplicaError;
use tandem_replica::pb::{self, Mode, op_result, operation};
use tandem_replica::replication::{Core, Executed, PeerWork, Route};
use tandem_replica::state::Applied;

const IDS: [&str; 3] = ["r1", "r2", "r3"];
const CLIENTS: usize = 3;

fn address(id: &str) -> String {
    format!("{id}:7100")
}

#[derive(Debug, Clone)]
enum Message {
    Config { to: String, config: pb::Configuration },
    Append { to: String, from: String, request: pb::AppendRequest },
    AppendReply { to: String, from: String, request: pb::AppendRequest, reply: pb::AppendReply },
    Checkpoint { to: String, from: String, epoch: u64, checkpoint: Checkpoint, base: Option<Base> },
    CheckpointDone { to: String, from: String, seq: u64, reply: Option<pb::InstallCheckpointReply> },
    Order { to: String, request: pb::OrderRequest },
    Join { to: String, from: String },
}

impl Message {
    fn to(&self) -> &str {
        match self {
            Self::Config { to, .. }
            | Self::Append { to, .. }
            | Self::AppendReply { to, .. }
            | Self::Checkpoint { to, .. }
            | Self::CheckpointDone { to, .. }
            | Self::Order { to, .. }
            | Self::Join { to, .. } => to,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ClientState {
    /// Highest request id acknowledged.
    acked: u64,
    /// The request in flight, if any, and the replicas it waits at.
    outstanding: Option<u64>,
    waiting_at: Vec<String>,
}

struct Sim {
    mode: Mode,
    replicas: BTreeMap<String, Option<Core>>,
    config: pb::Configuration,
    /// The RM's record: since which epoch each member has been one without a break.
    joined_epoch: HashMap<String, u64>,
    network: Vec<Message>,
    clients: Vec<ClientState>,
    /// seq -> (client, request id) as executed by anyone, to compare across replicas.
    executed_at: HashMap<u64, (String, u64)>,
    /// Every member that held some committed entries is gone: the RM had no safe
    /// replica to promote, so durability is no longer promised.
    data_lost: bool,
    /// Checkpoints of changes installed, and refused for a base the receiver lacked.
    changes: (u64, u64),
    log: Vec<String>,
}

impl Sim {
    fn new(mode: Mode) -> Self {
        let mut sim = Self {
            mode,
            replicas: IDS.iter().map(|id| (id.to_string(), Some(Core::new(*id, true)))).collect(),
            config: pb::Configuration::default(),
            joined_epoch: HashMap::new(),
            network: Vec::new(),
            clients: vec![ClientState::default(); CLIENTS],
            executed_at: HashMap::new(),
            data_lost: false,
            changes: (0, 0),
            log: Vec::new(),
        };
        sim.reconfigure("r1", &IDS);
        sim
    }

    fn alive(&self) -> Vec<String> {
        self.replicas.iter().filter(|(_, core)| core.is_some()).map(|(id, _)| id.clone()).collect()
    }

    fn members(&self) -> Vec<String> {
        self.config.members.iter().map(|m| m.id.clone()).collect()
    }

    /// The RM: a new configuration, pushed to every live replica (through the network).
    fn reconfigure(&mut self, primary: &str, members: &[&str]) {
        self.config = pb::Configuration {
            epoch: self.config.epoch + 1,
            mode: self.mode.into(),
            primary: primary.into(),
            members: members.iter().map(|id| pb::Member { id: (*id).into(), address: address(id) }).collect(),
        };
        let epoch = self.config.epoch;
        self.joined_epoch.retain(|id, _| members.contains(&id.as_str()));
        for id in members {
            self.joined_epoch.entry((*id).to_owned()).or_insert(epoch);
        }
        self.log.push(format!("RM: epoch {epoch} primary {primary} members {members:?}"));
        for id in self.alive() {
            self.network.push(Message::Config { to: id, config: self.config.clone() });
        }
    }

    fn core(&mut self, id: &str) -> Option<&mut Core> {
        self.replicas.get_mut(id)?.as_mut()
    }

    /// Drains what a replica executed after an event, checks and records it, and
    /// acknowledges the waiting clients (what the node does after every event).
    fn drain(&mut self, at: &str) {
        let answers = self.answers_clients(at);
        let executed = self.core(at).map(Core::take_executed).unwrap_or_default();
        self.executed(at, executed, answers);
    }

    fn executed(&mut self, at: &str, executed: Vec<Executed>, answers_clients: bool) {
        for done in executed {
            let key = (done.client_id.clone(), done.request_id);
            if let Some(previous) = self.executed_at.insert(done.seq, key.clone()) {
                assert_eq!(
                    previous,
                    key,
                    "seq {} executed as {previous:?} and as {key:?} (at {at})\n{}",
                    done.seq,
                    self.log.join("\n")
                );
            }
            if !answers_clients {
                continue;
            }
            let client: usize = done.client_id[1..].parse().expect("client id c<n>");
            let state = &mut self.clients[client];
            if state.outstanding == Some(done.request_id) && state.waiting_at.iter().any(|w| w == at) {
                let value = match &done.outcome {
                    Applied::Executed(pb::OpResult { kind: Some(op_result::Kind::Increment(i)) })
                    | Applied::Duplicate(pb::OpResult { kind: Some(op_result::Kind::Increment(i)) }) => {
                        i.value
                    }
                    other => panic!("unexpected outcome {other:?}"),
                };
                assert_eq!(
                    value as u64, done.request_id,
                    "request {} of {} executed more or less than once",
                    done.request_id, done.client_id
                );
                state.acked = done.request_id;
                state.outstanding = None;
                state.waiting_at.clear();
            }
        }
    }

    fn answers_clients(&mut self, id: &str) -> bool {
        let mode = self.mode;
        self.core(id).is_some_and(|c| c.is_leader() || (mode == Mode::Active && c.is_member()))
    }

    /// A client sends (or resends) its request to replica `to`.
    fn client_send(&mut self, client: usize, to: &str) {
        let state = &mut self.clients[client];
        let request_id = *state.outstanding.get_or_insert(state.acked + 1);
        let request = pb::ExecuteRequest {
            client_id: format!("c{client}"),
            request_id,
            op: Some(pb::Operation {
                kind: Some(operation::Kind::Increment(pb::Increment {
                    key: format!("ctr/c{client}"),
                    delta: 1,
                })),
            }),
            epoch: 0,
        };
        let Some(core) = self.core(to) else { return };
        let route = core.route(&request);
        core.advance();
        match route {
            Route::Reply(reply) => {
                let value = match reply.result.and_then(|r| r.kind) {
                    Some(op_result::Kind::Increment(i)) => i.value,
                    other => panic!("unexpected reply {other:?}"),
                };
                assert_eq!(
                    value as u64, request_id,
                    "session table answered request {request_id} of c{client} wrongly"
                );
                let state = &mut self.clients[client];
                state.acked = request_id;
                state.outstanding = None;
                state.waiting_at.clear();
            }
            Route::Refuse(_) => {}
            Route::Wait { forward_to } => {
                self.clients[client].waiting_at.push(to.to_owned());
                if let Some(leader) = forward_to {
                    let order = pb::OrderRequest {
                        epoch: self.core(to).map_or(0, |c| c.epoch()),
                        from_replica: to.into(),
                        client_id: request.client_id.clone(),
                        request_id,
                        op: request.op.clone(),
                    };
                    self.network.push(Message::Order { to: leader.id, request: order });
                }
            }
        }
        self.drain(to);
    }

    /// Every leader decides what to send each follower.
    fn tick(&mut self) {
        for id in self.alive() {
            let Some(core) = self.core(&id) else { continue };
            if !core.is_leader() {
                // Non-members keep asking the leader to feed them.
                if core.config().is_some()
                    && (!core.is_member() || !core.is_ready())
                    && let Some(leader) = core.leader().cloned()
                {
                    self.network.push(Message::Join { to: leader.id, from: id.clone() });
                }
                continue;
            }
            let peers = core.peer_addresses();
            let epoch = core.epoch();
            let mut outgoing = Vec::new();
            for (peer, _) in peers {
                match core.next_work(&peer, true) {
                    PeerWork::Append(request) => {
                        outgoing.push(Message::Append { to: peer, from: id.clone(), request })
                    }
                    PeerWork::Checkpoint(checkpoint, base) => outgoing.push(Message::Checkpoint {
                        to: peer,
                        from: id.clone(),
                        epoch,
                        checkpoint,
                        base,
                    }),
                    PeerWork::Idle | PeerWork::Gone => {}
                }
            }
            self.network.extend(outgoing);
        }
    }

    /// Acts on a refusal the way peers.rs does.
    fn refused(&mut self, sender: &str, refuser: &str, error: ReplicaError) {
        match error {
            ReplicaError::WrongEpoch { configuration: Some(config), .. } => self.install(sender, config),
            ReplicaError::ConfigurationRequired { .. } => {
                if let Some(config) = self.core(sender).and_then(|c| c.config().cloned()) {
                    self.network.push(Message::Config { to: refuser.into(), config });
                }
            }
            _ => {}
        }
    }

    fn install(&mut self, id: &str, config: pb::Configuration) {
        let Some(core) = self.core(id) else { return };
        if core.install_config(config).is_ok() {
            self.drain(id);
        }
    }

    fn deliver(&mut self, message: Message) {
        if self.core(message.to()).is_none() {
            return; // sent to a crashed replica
        }
        match message {
            Message::Config { to, config } => self.install(&to, config),
            Message::Append { to, from, request } => {
                let core = self.core(&to).expect("alive");
                match core.on_append(&request) {
                    Ok(reply) => {
                        self.drain(&to);
                        self.network.push(Message::AppendReply { to: from, from: to, request, reply });
                    }
                    Err(error) => self.refused(&from, &to, error),
                }
            }
            Message::AppendReply { to, from, request, reply } => {
                let core = self.core(&to).expect("alive");
                core.on_append_reply(&from, &request, &reply).expect("a correct follower's answer");
                self.drain(&to);
            }
            Message::Checkpoint { to, from, epoch, checkpoint, base } => {
                // Through the real chunks and assembler, as the server receives them: a
                // checkpoint of changes applies to the receiver's own state.
                let seq = checkpoint.seq;
                let mut chunks: Box<dyn Iterator<Item = pb::CheckpointChunk>> = match base {
                    Some(base) => Box::new(checkpoint.into_change_chunks(base, epoch, from.clone())),
                    None => Box::new(checkpoint.into_chunks(epoch, from.clone())),
                };
                let mut assembler = Assembler::default();
                let header = assembler
                    .push(chunks.next().expect("a header"))
                    .expect("a leader's header")
                    .cloned()
                    .expect("the header comes first");
                let core = self.core(&to).expect("alive");
                let received = (header.base_seq != 0)
                    .then(|| core.change_base(&header))
                    .transpose()
                    .and_then(|base| core.on_checkpoint_header(&header).map(|()| base));
                let reply = match received {
                    Ok(base) => {
                        let changes = base.is_some();
                        if let Some(base) = base {
                            assembler.start_from(base);
                        }
                        for chunk in chunks {
                            // A base that passed `change_base` yet leads elsewhere would be a
                            // protocol bug: the fingerprint says so here.
                            assembler
                                .push(chunk)
                                .unwrap_or_else(|e| panic!("{from} -> {to} at seq {seq}: {e}"));
                        }
                        core.install_checkpoint(assembler.finish().expect("a whole checkpoint"));
                        let reply = core.checkpoint_reply();
                        self.changes.0 += u64::from(changes);
                        self.drain(&to);
                        Some(reply)
                    }
                    // A base this replica does not hold: refused, the leader sends the whole state.
                    Err(ReplicaError::BadCheckpoint { .. }) => {
                        self.changes.1 += 1;
                        None
                    }
                    Err(error) => {
                        self.refused(&from, &to, error);
                        None
                    }
                };
                self.network.push(Message::CheckpointDone { to: from, from: to, seq, reply });
            }
            Message::CheckpointDone { to, from, seq, reply } => {
                let core = self.core(&to).expect("alive");
                core.on_checkpoint_sent(&from, seq, reply.as_ref()).expect("a correct follower's answer");
            }
            Message::Order { to, request } => {
                let core = self.core(&to).expect("alive");
                let result = core.on_order(&request);
                core.advance();
                self.drain(&to);
                if let Err(error) = result {
                    self.refused(&request.from_replica.clone(), &to, error);
                }
            }
            Message::Join { to, from } => {
                if let Some(core) = self.core(&to) {
                    let _ = core.on_join(&from, &address(&from));
                }
            }
        }
    }

    /// The RM's reaction to a replica it believes failed (crashed, or only suspected):
    /// drop it from the configuration and, if it led, promote a survivor that is safe
    /// (synced during its current membership, so it holds every committed entry) with
    /// the longest log. With no safe survivor the RM must not promote anyone.
    fn remove(&mut self, id: &str) {
        let survivors: Vec<String> =
            self.members().into_iter().filter(|m| m != id && self.replicas[m].is_some()).collect();
        let safe = |sim: &Self, m: &String| {
            sim.replicas[m].as_ref().is_some_and(|c| c.synced_epoch() >= sim.joined_epoch[m])
        };
        let primary = if self.config.primary == id {
            let best = survivors
                .iter()
                .filter(|m| safe(self, m))
                .max_by_key(|m| self.replicas[*m].as_ref().map_or(0, |c| c.last_seq()))
                .cloned();
            match best {
                Some(best) => best,
                None => {
                    self.log.push(format!("RM: no safe survivor to replace {id}; waiting"));
                    self.data_lost |= self.replicas[id].is_none();
                    return;
                }
            }
        } else {
            self.config.primary.clone()
        };
        let members: Vec<&str> = survivors.iter().map(String::as_str).collect();
        if members.is_empty() {
            return;
        }
        self.reconfigure(&primary, &members);
    }

    fn crash(&mut self, id: &str) {
        // Faults hit a group of three, so one safe member normally survives; the rare
        // schedule that still loses every safe member is detected (data_lost).
        if self.replicas[id].is_none() || self.members().len() < 3 {
            return;
        }
        self.log.push(format!("crash {id}"));
        self.replicas.insert(id.into(), None);
        self.remove(id);
    }

    fn suspect(&mut self, id: &str) {
        if self.replicas[id].is_none() || self.members().len() < 3 || !self.members().iter().any(|m| m == id)
        {
            return;
        }
        self.log.push(format!("suspect {id}"));
        self.remove(id);
    }

    fn restart(&mut self, id: &str) {
        if self.replicas[id].is_some() {
            return;
        }
        self.log.push(format!("restart {id}"));
        self.replicas.insert(id.into(), Some(Core::new(id, false)));
        self.network.push(Message::Config { to: id.into(), config: self.config.clone() });
    }

    /// The RM admits a ready replica that is not a member.
    fn admit(&mut self, id: &str) {
        let ready_outsider = self.replicas[id]
            .as_ref()
            .is_some_and(|c| c.is_ready() && c.epoch() == self.config.epoch && !c.is_member());
        if !ready_outsider {
            return;
        }
        let mut members: Vec<String> = self.members();
        members.push(id.into());
        let primary = self.config.primary.clone();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        self.reconfigure(&primary, &members);
    }

    /// Faults stop: the RM re-sends the configuration, messages flow, leaders tick.
    fn heal(&mut self) {
        for id in self.alive() {
            self.network.push(Message::Config { to: id, config: self.config.clone() });
        }
        for _ in 0..60 {
            self.tick();
            while !self.network.is_empty() {
                let message = self.network.remove(0);
                self.deliver(message);
            }
        }
        // Clients finish what they started.
        for client in 0..CLIENTS {
            for _ in 0..5 {
                if self.clients[client].outstanding.is_none() {
                    break;
                }
                let leader = self.config.primary.clone();
                self.client_send(client, &leader);
                for _ in 0..10 {
                    self.tick();
                    while !self.network.is_empty() {
                        let message = self.network.remove(0);
                        self.deliver(message);
                    }
                }
            }
        }
    }

    fn check_converged(&mut self) {
        let members = self.members();
        let mut digests = Vec::new();
        for id in &members {
            let Some(core) = self.core(id) else { continue };
            let (mut state, replay, seq) = core.committed_state();
            state.replay(&replay);
            for (client, expected) in self.clients.iter().enumerate() {
                let counter = state
                    .get(&format!("ctr/c{client}"))
                    .map_or(0, |v| std::str::from_utf8(v).expect("utf8").parse::<u64>().expect("number"));
                assert!(
                    counter >= expected.acked,
                    "{id}: c{client} acknowledged {} but the state counts {counter}\n{}",
                    expected.acked,
                    self.log.join("\n")
                );
            }
            digests.push((id.clone(), seq, state.digest()));
        }
        let first = digests.first().cloned().expect("a live member");
        for digest in &digests {
            assert_eq!(
                (digest.1, &digest.2),
                (first.1, &first.2),
                "members diverged: {digests:?}\n{}",
                self.log.join("\n")
            );
        }
    }
}

fn step(sim: &mut Sim, choice: (u8, u8, u8)) {
    let (action, a, b) = choice;
    let id = IDS[a as usize % IDS.len()];
    match action % 20 {
        0..=7 => {
            if !sim.network.is_empty() {
                let message = sim.network.remove(b as usize % sim.network.len());
                sim.deliver(message);
            }
        }
        8 => {
            if !sim.network.is_empty() {
                let dropped = sim.network.remove(b as usize % sim.network.len());
                sim.log.push(format!("drop {dropped:?}").chars().take(120).collect());
                // A lost checkpoint transfer, or its lost answer, is a failed RPC at the
                // sender: it always learns the call ended.
                match dropped {
                    Message::Checkpoint { to, from, checkpoint, .. } => {
                        sim.network.push(Message::CheckpointDone {
                            to: from,
                            from: to,
                            seq: checkpoint.seq,
                            reply: None,
                        });
                    }
                    Message::CheckpointDone { to, from, seq, .. } => {
                        sim.network.push(Message::CheckpointDone { to, from, seq, reply: None });
                    }
                    _ => {}
                }
            }
        }
        9..=11 => sim.client_send(b as usize % CLIENTS, id),
        12 | 13 => sim.tick(),
        14 => sim.crash(id),
        15 => sim.restart(id),
        16 => sim.suspect(id),
        17 | 18 => sim.admit(id),
        _ => {
            if let Some(core) = sim.core(id) {
                core.schedule_checkpoints();
            }
        }
    }
}

fn run(mode: Mode, choices: Vec<(u8, u8, u8)>) {
    let mut sim = Sim::new(mode);
    for choice in choices {
        step(&mut sim, choice);
    }
    // Bring every live replica back in, then let things settle.
    for id in IDS {
        sim.restart(id);
    }
    sim.heal();
    for id in IDS {
        sim.admit(id);
        sim.heal();
    }
    if !sim.data_lost {
        sim.check_converged();
    }
    if std::env::var_os("SIM_STATS").is_some() {
        let acked: u64 = sim.clients.iter().map(|c| c.acked).sum();
        eprintln!(
            "acked {acked} executed {} epochs {} data_lost {} changes installed {} refused {}",
            sim.executed_at.len(),
            sim.config.epoch,
            sim.data_lost,
            sim.changes.0,
            sim.changes.1
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn passive_replication_survives_any_schedule(choices in prop::collection::vec(any::<(u8, u8, u8)>(), 0..1000)) {
        run(Mode::Passive, choices);
    }

    #[test]
    fn active_replication_survives_any_schedule(choices in prop::collection::vec(any::<(u8, u8, u8)>(), 0..1000)) {
        run(Mode::Active, choices);
    }
}
