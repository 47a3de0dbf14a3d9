//! Session expiry through the replication core, in both modes: the leader stamps its
//! clock and window on what it orders, so every replica forgets the same sessions at the
//! same sequence number whatever its own clock says; digests stay equal; a late retry of
//! a forgotten session gets `SessionExpired` and never runs twice; a retry within the
//! window is still answered from the session table.

use std::collections::BTreeMap;

use tandem_replica::pb::{self, Mode, operation};
use tandem_replica::replication::{Core, PeerWork, Route};
use tandem_replica::state::Applied;

const IDS: [&str; 3] = ["r1", "r2", "r3"];
const WINDOW: u64 = 10_000;
const T0: u64 = 1_700_000_000_000;

struct Group {
    cores: BTreeMap<&'static str, Core>,
}

impl Group {
    /// Three bootstrapped replicas under r1; every one has the same window, and its own,
    /// wildly different clock (only the leader's may matter).
    fn new(mode: Mode) -> Self {
        let config = pb::Configuration {
            epoch: 1,
            mode: mode.into(),
            primary: "r1".into(),
            members: IDS
                .iter()
                .map(|id| pb::Member { id: (*id).into(), address: format!("{id}:1") })
                .collect(),
        };
        let mut cores = BTreeMap::new();
        for (n, id) in IDS.into_iter().enumerate() {
            let mut core = Core::new(id, true);
            core.set_session_expiry(WINDOW);
            core.set_clock(n as u64 * 3_600_000);
            core.install_config(config.clone()).expect("valid configuration");
            cores.insert(id, core);
        }
        let mut group = Self { cores };
        group.leader().set_clock(T0);
        group
    }

    fn leader(&mut self) -> &mut Core {
        self.cores.get_mut("r1").expect("r1")
    }

    /// Delivers what the leader has for each follower until nothing is left (bounded:
    /// each round sends at least one batch, and the log is short).
    fn replicate(&mut self) {
        for _ in 0..100 {
            let mut leader = self.cores.remove("r1").expect("r1");
            let mut sent = false;
            for id in ["r2", "r3"] {
                let follower = self.cores.get_mut(id).expect("follower");
                match leader.next_work(id, false) {
                    PeerWork::Append(request) => {
                        let reply = follower.on_append(&request).expect("append accepted");
                        leader.on_append_reply(id, &request, &reply).expect("a valid reply");
                        sent = true;
                    }
                    PeerWork::Checkpoint(checkpoint, _) => {
                        let seq = checkpoint.seq;
                        follower.install_checkpoint(checkpoint);
                        leader
                            .on_checkpoint_sent(id, seq, Some(&follower.checkpoint_reply()))
                            .expect("a valid reply");
                        sent = true;
                    }
                    PeerWork::Idle | PeerWork::Gone => {}
                }
            }
            self.cores.insert("r1", leader);
            if !sent {
                return;
            }
        }
        panic!("replication did not settle");
    }

    /// A client request at the leader (both modes order there); replicates it and
    /// returns the leader's outcome.
    fn execute(&mut self, client: &str, request_id: u64, delta: i64) -> Applied {
        let request = pb::ExecuteRequest {
            client_id: client.into(),
            request_id,
            op: Some(pb::Operation {
                kind: Some(operation::Kind::Increment(pb::Increment { key: format!("n/{client}"), delta })),
            }),
            epoch: 0,
        };
        let route = self.leader().route(&request);
        if let Route::Reply(reply) = route {
            return Applied::Duplicate(reply.result.unwrap_or_default());
        }
        assert!(matches!(route, Route::Wait { forward_to: None }), "{route:?}");
        self.replicate();
        // Followers also learn the commit point.
        self.leader().schedule_checkpoints();
        self.replicate();
        let executed = self.leader().take_executed();
        for core in self.cores.values_mut() {
            core.take_executed();
        }
        let done = executed.into_iter().find(|e| e.client_id == client && e.request_id == request_id);
        done.expect("the request was applied at the leader").outcome
    }

    /// Every replica's digest of its committed state (what `Replica.Digest` reports).
    fn digests(&self) -> Vec<String> {
        self.cores
            .values()
            .map(|core| {
                let (mut state, replay, _) = core.committed_state();
                state.replay(&replay);
                state.digest()
            })
            .collect()
    }

    /// Sessions in every replica's committed state.
    fn sessions(&self) -> Vec<usize> {
        self.cores
            .values()
            .map(|core| {
                let (mut state, replay, _) = core.committed_state();
                state.replay(&replay);
                state.session_count()
            })
            .collect()
    }
}

fn expiry_scenario(mode: Mode) {
    let mut group = Group::new(mode);
    let a_id = T0 * 1000;
    assert!(matches!(group.execute("a", a_id, 1), Applied::Executed(_)));
    assert!(matches!(group.execute("b", T0 * 1000 + 1, 1), Applied::Executed(_)));
    assert_eq!(group.sessions(), vec![2, 2, 2]);

    // Within the window: a retry of a's request is answered, not run again.
    group.leader().set_clock(T0 + WINDOW);
    assert!(matches!(group.execute("a", a_id, 1), Applied::Duplicate(_)));

    // Past it: the next entry (c's) forgets a and b on every replica, at the same seq.
    group.leader().set_clock(T0 + WINDOW + 1);
    let c_id = (T0 + WINDOW + 1) * 1000;
    assert!(matches!(group.execute("c", c_id, 1), Applied::Executed(_)));
    assert_eq!(group.sessions(), vec![1, 1, 1], "{mode}: the same sessions expired everywhere");
    let digests = group.digests();
    assert!(digests.iter().all(|d| d == &digests[0]), "{mode}: digests differ: {digests:?}");

    // a's late retry: refused with SessionExpired, and the counter still says 1.
    let late = group.execute("a", a_id, 1);
    assert_eq!(late, Applied::SessionExpired { session_expiry_ms: WINDOW }, "{mode}");
    let (state, _, _) = group.leader().committed_state();
    assert_eq!(state.get("n/a").map(|v| v.as_ref()), Some(&b"1"[..]), "{mode}: ran once");
    let digests = group.digests();
    assert!(digests.iter().all(|d| d == &digests[0]), "{mode}: digests differ: {digests:?}");
}

#[test]
fn passive_sessions_expire_at_the_same_seq_everywhere_and_a_late_retry_is_refused() {
    expiry_scenario(Mode::Passive);
}

#[test]
fn active_sessions_expire_at_the_same_seq_everywhere_and_a_late_retry_is_refused() {
    expiry_scenario(Mode::Active);
}

#[test]
fn a_new_leader_with_a_slower_clock_never_expires_a_session_early() {
    let mut group = Group::new(Mode::Active);
    let a_id = T0 * 1000;
    assert!(matches!(group.execute("a", a_id, 1), Applied::Executed(_)));
    // The leader's clock jumps back by an hour (another leader, a clock step): its
    // stamps stay at the log's, so a's window is not cut short.
    group.leader().set_clock(T0 - 3_600_000);
    assert!(matches!(group.execute("b", T0 * 1000 + 5, 1), Applied::Executed(_)));
    group.leader().set_clock(T0 + WINDOW);
    assert!(matches!(group.execute("a", a_id, 1), Applied::Duplicate(_)));
}
