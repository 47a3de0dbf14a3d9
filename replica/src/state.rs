//! The replicated state machine: a key-value map plus a session table (each client's
//! last request id and reply), so that a retried request is answered from the table and
//! never executed twice. Pure and deterministic: every replica that applies the same
//! entries in the same order reaches the same state and the same digest.
//!
//! Sessions expire: each entry carries the leader's clock (its stamp) and expiry
//! window, and applying it first forgets the sessions last used more than that window
//! before the stamp. The group's clock is the log's, never a replica's own, so every
//! replica forgets the same sessions at the same entry. See `opens_session` for how a
//! late retry of a forgotten session is told from a new client.

use bytes::Bytes;
use imbl::ordmap::DiffItem;
use imbl::{OrdMap, OrdSet};
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::pb::{self, op_result, operation};

/// Largest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest accepted value, in bytes (1 MiB). Bigger values are refused as invalid.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest accepted client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 256;

/// How long an idle client session is remembered by default (10 min): far above any
/// client's retry deadline (15 s in the client library), far below the time it takes
/// one-shot clients to fill memory.
pub const DEFAULT_SESSION_EXPIRY_MS: u64 = 10 * 60 * 1000;
/// Shortest accepted session expiry window (1 s; useful for benchmarks only: a window
/// below a client's retry deadline turns its late retries into `SessionExpired`).
pub const MIN_SESSION_EXPIRY_MS: u64 = 1000;
/// Longest accepted session expiry window (7 days).
pub const MAX_SESSION_EXPIRY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Checks a session expiry window against its bounds.
pub fn check_session_expiry(window_ms: u64) -> Result<(), Invalid> {
    if (MIN_SESSION_EXPIRY_MS..=MAX_SESSION_EXPIRY_MS).contains(&window_ms) {
        return Ok(());
    }
    Err(Invalid {
        field: "session_expiry_ms",
        reason: format!(
            "{window_ms} ms is outside {MIN_SESSION_EXPIRY_MS}..={MAX_SESSION_EXPIRY_MS} (1 s to 7 days)"
        ),
    })
}

/// Whether a request of a session the table does not know may open it, rather than
/// being refused as a late retry of a session that expired. Deterministic: it depends on
/// the entry (request id, stamp, window) and the group clock only.
///
/// A request opens a session when its id is 1 (clients that count from 1), or when its
/// id, read as the client's wall clock in microseconds when the session started (what
/// the client library sends), is within half a window of the group clock. Why that is
/// sound: request ids of a session never run ahead of the client's clock (one request
/// at a time, fewer than one per microsecond), so a request of a session last used at
/// `S` has an id of at most `S + skew`; the session expires only once the clock is past
/// `S + window`, when the bound `clock - window / 2` is past `S + window / 2`. So a late
/// retry is refused, and a new session accepted, as long as client clocks are within
/// half a window of the leader's (5 min by default). The one gap: a retry of request 1
/// of a session that counts from 1, arriving after its session expired, runs again;
/// the client library's ids come from the clock, so its sessions have no such gap.
pub fn opens_session(request_id: u64, clock_ms: u64, window_ms: u64) -> bool {
    window_ms == 0 || request_id == 1 || request_id / 1000 >= clock_ms.saturating_sub(window_ms / 2)
}

/// When the leader ordered an entry (its clock, unix ms) and the session expiry window
/// it had then (0: sessions never expire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub at_ms: u64,
    pub session_expiry_ms: u64,
}

impl Stamp {
    pub fn of(entry: &pb::Entry) -> Self {
        Self { at_ms: entry.stamp_ms, session_expiry_ms: entry.session_expiry_ms }
    }
}

/// What a client's session remembers: enough to answer a retry of its last request,
/// and to tell a retry from another request that reuses its id.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub last_request_id: u64,
    pub last_reply: pb::OpResult,
    pub last_seq: u64,
    /// `op_digest` of the last request's operation.
    pub last_op_digest: u64,
    /// Group clock when the session last executed a request: it expires from there.
    pub last_used_ms: u64,
}

/// A fingerprint of an operation: equal for a retry, different (but for a 2^-64 chance)
/// for another operation. Deterministic across replicas and versions: SHA-256 of the
/// protobuf encoding, which prost writes in field order.
pub fn op_digest(op: &pb::Operation) -> u64 {
    let hash = Sha256::digest(op.encode_to_vec());
    u64::from_le_bytes(hash[..8].try_into().expect("a SHA-256 hash has 32 bytes"))
}

/// The outcome of applying one ordered request.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Executed now; the state may have changed.
    Executed(pb::OpResult),
    /// The session's last request, executed before: its recorded reply, state unchanged.
    Duplicate(pb::OpResult),
    /// Older than the session's last request: not executed, the client has moved on.
    Stale { last_request_id: u64 },
    /// The session's last request id, but another operation: not executed (a client
    /// reused a request id; answering with the other request's reply would turn this
    /// one into a silent no-op).
    Reused,
    /// The session is unknown and the request cannot open it (`opens_session`): its
    /// session expired. Not executed; the client must not assume either outcome of
    /// earlier attempts.
    SessionExpired { session_expiry_ms: u64 },
}

/// Key-value map and session table. Cloning is O(1) (persistent maps), which is what
/// lets a primary checkpoint while it keeps serving.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateMachine {
    kv: OrdMap<String, Bytes>,
    /// The sum of every key-value's hash, kept as the map changes: the fingerprint of a
    /// state of any size costs no more than its session table.
    kv_sum: KvSum,
    sessions: OrdMap<String, SessionRecord>,
    /// The sessions ordered by last use, oldest first: which to expire. Derived from
    /// `sessions` (rebuilt when a checkpoint is assembled), so not hashed on its own.
    by_last_use: OrdSet<(u64, String)>,
    /// The group clock: the highest entry stamp applied (unix ms).
    clock_ms: u64,
}

/// What changed between two states (`StateMachine::changes_since`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub removed_keys: Vec<String>,
    pub removed_sessions: Vec<String>,
    /// Added or changed.
    pub key_values: Vec<(String, Bytes)>,
    /// Added or changed.
    pub sessions: Vec<(String, SessionRecord)>,
}

/// Why a request is refused before it is ordered: which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

/// Checks a request against the documented limits. Runs before anything is ordered, so a
/// malformed request changes nothing anywhere.
pub fn validate(client_id: &str, request_id: u64, op: Option<&pb::Operation>) -> Result<(), Invalid> {
    let invalid = |field, reason: String| Err(Invalid { field, reason });
    if client_id.is_empty() {
        return invalid("client_id", "must not be empty".into());
    }
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return invalid("client_id", format!("{} bytes, limit {MAX_CLIENT_ID_BYTES}", client_id.len()));
    }
    if request_id == 0 {
        return invalid("request_id", "must be at least 1".into());
    }
    let Some(kind) = op.and_then(|op| op.kind.as_ref()) else {
        return invalid(
            "op",
            "missing or unknown operation (expected get, put, delete, compare_and_swap or increment)".into(),
        );
    };
    let check_key = |key: &str| {
        if key.is_empty() {
            invalid("op.key", "must not be empty".into())
        } else if key.len() > MAX_KEY_BYTES {
            invalid("op.key", format!("{} bytes, limit {MAX_KEY_BYTES}", key.len()))
        } else {
            Ok(())
        }
    };
    let check_value = |field, value: &Bytes| {
        if value.len() > MAX_VALUE_BYTES {
            invalid(field, format!("{} bytes, limit {MAX_VALUE_BYTES}", value.len()))
        } else {
            Ok(())
        }
    };
    match kind {
        operation::Kind::Get(op) => check_key(&op.key),
        operation::Kind::Delete(op) => check_key(&op.key),
        operation::Kind::Increment(op) => check_key(&op.key),
        operation::Kind::Put(op) => check_key(&op.key).and_then(|()| check_value("op.value", &op.value)),
        operation::Kind::CompareAndSwap(op) => {
            check_key(&op.key)?;
            check_value("op.new_value", &op.new_value)?;
            match &op.expected {
                Some(expected) => check_value("op.expected", expected),
                None => Ok(()),
            }
        }
    }
}

impl StateMachine {
    /// Applies one log entry: expires the sessions its stamp says are idle too long,
    /// then applies its request.
    pub fn apply_entry(&mut self, entry: &pb::Entry) -> Applied {
        let unknown = pb::Operation::default();
        let op = entry.op.as_ref().unwrap_or(&unknown);
        self.apply_stamped(entry.seq, Stamp::of(entry), &entry.client_id, entry.request_id, op)
    }

    /// Applies a request without a stamp (sessions never expire): for tests and tools.
    pub fn apply(&mut self, seq: u64, client_id: &str, request_id: u64, op: &pb::Operation) -> Applied {
        self.apply_stamped(seq, Stamp::default(), client_id, request_id, op)
    }

    /// Applies the request of one log entry, at most once per (client, request id).
    pub fn apply_stamped(
        &mut self,
        seq: u64,
        stamp: Stamp,
        client_id: &str,
        request_id: u64,
        op: &pb::Operation,
    ) -> Applied {
        self.clock_ms = self.clock_ms.max(stamp.at_ms);
        self.expire_sessions(stamp.session_expiry_ms);
        let digest = op_digest(op);
        match self.sessions.get(client_id) {
            Some(session) => {
                if request_id == session.last_request_id {
                    if digest != session.last_op_digest {
                        return Applied::Reused;
                    }
                    return Applied::Duplicate(session.last_reply.clone());
                }
                if request_id < session.last_request_id {
                    return Applied::Stale { last_request_id: session.last_request_id };
                }
            }
            None if !opens_session(request_id, self.clock_ms, stamp.session_expiry_ms) => {
                return Applied::SessionExpired { session_expiry_ms: stamp.session_expiry_ms };
            }
            None => {}
        }
        let reply = self.execute(op);
        let record = SessionRecord {
            last_request_id: request_id,
            last_reply: reply.clone(),
            last_seq: seq,
            last_op_digest: digest,
            last_used_ms: self.clock_ms,
        };
        self.restore_session(client_id.to_owned(), record);
        Applied::Executed(reply)
    }

    /// Forgets the sessions last used more than `window_ms` before the group clock (none
    /// when 0). Returns how many. Bounded by the table's size: each pass removes one.
    fn expire_sessions(&mut self, window_ms: u64) -> usize {
        if window_ms == 0 {
            return 0;
        }
        let horizon = self.clock_ms.saturating_sub(window_ms);
        let mut expired = 0;
        while self.by_last_use.get_min().is_some_and(|(used, _)| *used < horizon) {
            let Some((_, client_id)) = self.by_last_use.remove_min() else { break };
            self.sessions.remove(&client_id);
            expired += 1;
        }
        expired
    }

    fn execute(&mut self, op: &pb::Operation) -> pb::OpResult {
        let kind = match &op.kind {
            Some(operation::Kind::Get(get)) => {
                op_result::Kind::Get(pb::GetResult { value: self.kv.get(&get.key).cloned() })
            }
            Some(operation::Kind::Put(put)) => {
                self.set(put.key.clone(), put.value.clone());
                op_result::Kind::Put(pb::PutResult {})
            }
            Some(operation::Kind::Delete(delete)) => {
                op_result::Kind::Delete(pb::DeleteResult { existed: self.remove(&delete.key) })
            }
            Some(operation::Kind::CompareAndSwap(cas)) => {
                let current = self.kv.get(&cas.key).cloned();
                let swapped = current == cas.expected;
                if swapped {
                    self.set(cas.key.clone(), cas.new_value.clone());
                }
                op_result::Kind::CompareAndSwap(pb::CompareAndSwapResult { swapped, current })
            }
            Some(operation::Kind::Increment(incr)) => match self.increment(&incr.key, incr.delta) {
                Ok(value) => op_result::Kind::Increment(pb::IncrementResult { value }),
                Err(reason) => op_result::Kind::Failed(pb::OpFailed { reason }),
            },
            // validate() keeps these out of the log; should one arrive anyway (a newer
            // peer), every replica fails it identically.
            None => op_result::Kind::Failed(pb::OpFailed { reason: "unknown operation".into() }),
        };
        pb::OpResult { kind: Some(kind) }
    }

    fn increment(&mut self, key: &str, delta: i64) -> Result<i64, String> {
        let current = match self.kv.get(key) {
            None => 0,
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| format!("value of {key:?} is not a decimal integer"))?,
        };
        let value = current
            .checked_add(delta)
            .ok_or_else(|| format!("increment of {key:?} by {delta} overflows i64"))?;
        self.set(key.to_owned(), Bytes::from(value.to_string()));
        Ok(value)
    }

    /// Applies log entries in order (a passive backup's log replayed on its checkpoint).
    pub fn replay(&mut self, entries: &[pb::Entry]) {
        for entry in entries {
            self.apply_entry(entry);
        }
    }

    /// The group clock: the highest entry stamp applied (unix ms).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.kv.get(key)
    }

    pub fn session(&self, client_id: &str) -> Option<&SessionRecord> {
        self.sessions.get(client_id)
    }

    pub fn keys(&self) -> usize {
        self.kv.len()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn key_values(&self) -> impl Iterator<Item = (&String, &Bytes)> {
        self.kv.iter()
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&String, &SessionRecord)> {
        self.sessions.iter()
    }

    /// The map and the session table, for streaming a checkpoint without copying.
    pub fn into_parts(self) -> (OrdMap<String, Bytes>, OrdMap<String, SessionRecord>) {
        (self.kv, self.sessions)
    }

    /// Inserts a key-value pair while a checkpoint is being assembled.
    pub fn restore_key_value(&mut self, key: String, value: Bytes) {
        self.set(key, value);
    }

    /// Removes a key while a checkpoint of changes is being assembled.
    pub fn restore_removal(&mut self, key: &str) {
        self.remove(key);
    }

    /// Forgets a session while a checkpoint of changes is being assembled.
    pub fn restore_session_removal(&mut self, client_id: &str) {
        if let Some(previous) = self.sessions.remove(client_id) {
            self.by_last_use.remove(&(previous.last_used_ms, client_id.to_owned()));
        }
    }

    /// What changed from `base` to this state. Costs what changed, not the state's
    /// size: the maps share every node neither touched since `base` was cloned from
    /// this state's lineage.
    pub fn changes_since(&self, base: &StateMachine) -> Changes {
        let mut changes = Changes::default();
        for item in base.kv.diff(&self.kv) {
            match item {
                DiffItem::Remove(key, _) => changes.removed_keys.push(key.clone()),
                DiffItem::Add(key, value) | DiffItem::Update { new: (key, value), .. } => {
                    changes.key_values.push((key.clone(), value.clone()))
                }
            }
        }
        for item in base.sessions.diff(&self.sessions) {
            match item {
                DiffItem::Remove(client_id, _) => changes.removed_sessions.push(client_id.clone()),
                DiffItem::Add(client_id, session) | DiffItem::Update { new: (client_id, session), .. } => {
                    changes.sessions.push((client_id.clone(), session.clone()))
                }
            }
        }
        changes
    }

    fn set(&mut self, key: String, value: Bytes) {
        let added = KvSum::of(&key, &value);
        if let Some(previous) = self.kv.get(&key) {
            self.kv_sum.subtract(KvSum::of(&key, previous));
        }
        self.kv_sum.add(added);
        self.kv.insert(key, value);
    }

    /// Whether the key existed.
    fn remove(&mut self, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(previous) => {
                self.kv_sum.subtract(KvSum::of(key, &previous));
                true
            }
            None => false,
        }
    }

    /// Inserts (or replaces) a session, e.g. while a checkpoint is being assembled.
    pub fn restore_session(&mut self, client_id: String, session: SessionRecord) {
        let last_used_ms = session.last_used_ms;
        if let Some(previous) = self.sessions.insert(client_id.clone(), session) {
            self.by_last_use.remove(&(previous.last_used_ms, client_id.clone()));
        }
        self.by_last_use.insert((last_used_ms, client_id));
    }

    /// Sets the group clock while a checkpoint is being assembled.
    pub fn restore_clock(&mut self, clock_ms: u64) {
        self.clock_ms = clock_ms;
    }

    /// Hex SHA-256 over the sorted map and the sorted session table, each field
    /// length-prefixed so that no two different states hash the same input. Reads the
    /// whole state: for status and whole-state checkpoints.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (key, value) in &self.kv {
            hash_field(&mut hasher, key.as_bytes());
            hash_field(&mut hasher, value);
        }
        self.hash_sessions(&mut hasher);
        hex::encode(hasher.finalize())
    }

    /// Hex SHA-256 over the map's running sum and size and the session table: equal
    /// states have equal fingerprints, and a state that differs in any key-value differs
    /// in its fingerprint but with negligible chance. Costs the session table, not the
    /// map: what checks a checkpoint of changes. Not a defence against a forger (mutual
    /// TLS keeps those out): sums of hashes can be steered by one who picks many entries.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hash_field(&mut hasher, b"kv-sum");
        for limb in self.kv_sum.0 {
            hasher.update(limb.to_le_bytes());
        }
        hasher.update((self.kv.len() as u64).to_le_bytes());
        self.hash_sessions(&mut hasher);
        hex::encode(hasher.finalize())
    }

    fn hash_sessions(&self, hasher: &mut Sha256) {
        hash_field(hasher, b"sessions");
        hash_field(hasher, &self.clock_ms.to_le_bytes());
        for (client_id, session) in &self.sessions {
            hash_field(hasher, client_id.as_bytes());
            hash_field(hasher, &session.last_request_id.to_le_bytes());
            hash_field(hasher, &session.last_reply.encode_to_vec());
            hash_field(hasher, &session.last_op_digest.to_le_bytes());
            hash_field(hasher, &session.last_used_ms.to_le_bytes());
        }
    }
}

/// Length-prefixed, so that no two different sequences of fields hash the same input.
fn hash_field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// A sum, modulo 2^256, of SHA-256 hashes of key-values: adding and subtracting one is
/// what a change of the map costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KvSum([u64; 4]);

impl KvSum {
    fn of(key: &str, value: &[u8]) -> KvSum {
        let mut hasher = Sha256::new();
        hash_field(&mut hasher, key.as_bytes());
        hash_field(&mut hasher, value);
        let hash = hasher.finalize();
        KvSum(std::array::from_fn(|i| {
            u64::from_le_bytes(hash[i * 8..i * 8 + 8].try_into().expect("a SHA-256 hash has 32 bytes"))
        }))
    }

    fn add(&mut self, other: KvSum) {
        let mut carry = false;
        for (limb, other) in self.0.iter_mut().zip(other.0) {
            let (sum, overflow_a) = limb.overflowing_add(other);
            let (sum, overflow_b) = sum.overflowing_add(u64::from(carry));
            *limb = sum;
            carry = overflow_a || overflow_b;
        }
    }

    fn subtract(&mut self, other: KvSum) {
        let mut borrow = false;
        for (limb, other) in self.0.iter_mut().zip(other.0) {
            let (difference, underflow_a) = limb.overflowing_sub(other);
            let (difference, underflow_b) = difference.overflowing_sub(u64::from(borrow));
            *limb = difference;
            borrow = underflow_a || underflow_b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Operation;
    use proptest::prelude::*;

    fn op(kind: operation::Kind) -> Operation {
        Operation { kind: Some(kind) }
    }
    fn put(key: &str, value: &str) -> Operation {
        op(operation::Kind::Put(pb::Put { key: key.into(), value: Bytes::from(value.to_owned()) }))
    }
    fn incr(key: &str, delta: i64) -> Operation {
        op(operation::Kind::Increment(pb::Increment { key: key.into(), delta }))
    }

    #[test]
    fn retried_request_is_answered_from_the_session_table_not_executed_again() {
        let mut state = StateMachine::default();
        let first = state.apply(1, "c1", 1, &incr("n", 5));
        let again = state.apply(2, "c1", 1, &incr("n", 5));
        assert_eq!(
            first,
            Applied::Executed(pb::OpResult {
                kind: Some(op_result::Kind::Increment(pb::IncrementResult { value: 5 }))
            })
        );
        assert_eq!(
            again,
            Applied::Duplicate(pb::OpResult {
                kind: Some(op_result::Kind::Increment(pb::IncrementResult { value: 5 }))
            })
        );
        assert_eq!(state.get("n").map(|v| v.as_ref()), Some(&b"5"[..]));
    }

    #[test]
    fn a_request_id_reused_for_another_operation_is_refused_not_answered_with_the_old_reply() {
        let mut state = StateMachine::default();
        state.apply(1, "c1", 1, &put("a", "1"));
        let before = state.digest();
        assert_eq!(state.apply(2, "c1", 1, &put("a", "2")), Applied::Reused);
        assert_eq!(state.get("a").map(|v| v.as_ref()), Some(&b"1"[..]));
        assert_eq!(state.digest(), before, "a refused reuse changes nothing");
        assert!(matches!(state.apply(3, "c1", 1, &put("a", "1")), Applied::Duplicate(_)), "a true retry");
    }

    #[test]
    fn request_older_than_the_session_is_stale_and_changes_nothing() {
        let mut state = StateMachine::default();
        state.apply(1, "c1", 7, &put("k", "a"));
        let before = state.digest();
        assert_eq!(state.apply(2, "c1", 6, &put("k", "b")), Applied::Stale { last_request_id: 7 });
        assert_eq!(state.digest(), before);
    }

    #[test]
    fn increment_of_a_non_number_fails_without_changing_the_value() {
        let mut state = StateMachine::default();
        state.apply(1, "c1", 1, &put("k", "text"));
        let Applied::Executed(reply) = state.apply(2, "c1", 2, &incr("k", 1)) else { panic!("not executed") };
        assert!(matches!(reply.kind, Some(op_result::Kind::Failed(_))));
        assert_eq!(state.get("k").map(|v| v.as_ref()), Some(&b"text"[..]));
    }

    #[test]
    fn compare_and_swap_with_absent_expected_only_creates() {
        let mut state = StateMachine::default();
        let cas = |expected: Option<&str>, new: &str| {
            op(operation::Kind::CompareAndSwap(pb::CompareAndSwap {
                key: "k".into(),
                expected: expected.map(|e| Bytes::from(e.to_owned())),
                new_value: Bytes::from(new.to_owned()),
            }))
        };
        let swapped = |applied: Applied| match applied {
            Applied::Executed(pb::OpResult { kind: Some(op_result::Kind::CompareAndSwap(r)) }) => r.swapped,
            other => panic!("unexpected {other:?}"),
        };
        assert!(swapped(state.apply(1, "c", 1, &cas(None, "a"))));
        assert!(!swapped(state.apply(2, "c", 2, &cas(None, "b"))));
        assert!(swapped(state.apply(3, "c", 3, &cas(Some("a"), "c"))));
        assert_eq!(state.get("k").map(|v| v.as_ref()), Some(&b"c"[..]));
    }

    #[test]
    fn validation_names_the_field_and_the_limit() {
        let big = Bytes::from(vec![0u8; MAX_VALUE_BYTES + 1]);
        let oversize = op(operation::Kind::Put(pb::Put { key: "k".into(), value: big }));
        let err = validate("c", 1, Some(&oversize)).expect_err("oversize value accepted");
        assert_eq!(err.field, "op.value");
        assert!(err.reason.contains(&MAX_VALUE_BYTES.to_string()));
        let unknown = Operation { kind: None };
        assert_eq!(validate("c", 1, Some(&unknown)).expect_err("unknown op accepted").field, "op");
        assert_eq!(validate("c", 1, None).expect_err("missing op accepted").field, "op");
        assert_eq!(validate("", 1, Some(&put("k", "v"))).expect_err("empty client").field, "client_id");
        assert_eq!(validate("c", 0, Some(&put("k", "v"))).expect_err("request 0").field, "request_id");
        assert!(validate("c", 1, Some(&put("k", "v"))).is_ok());
    }

    const WINDOW: u64 = 10_000;
    const T0: u64 = 1_700_000_000_000;

    /// A stamped entry with the leader's clock at `at_ms` and a 10 s window.
    fn at(at_ms: u64) -> Stamp {
        Stamp { at_ms, session_expiry_ms: WINDOW }
    }

    /// A request id the way the client library makes one: its clock in microseconds.
    fn clock_id(at_ms: u64) -> u64 {
        at_ms * 1000
    }

    #[test]
    fn idle_sessions_expire_at_the_same_entry_on_every_replica() {
        let entries: Vec<(u64, Stamp, &str, u64)> = vec![
            (1, at(T0), "a", clock_id(T0)),
            (2, at(T0 + 1), "b", clock_id(T0 + 1)),
            (3, at(T0 + WINDOW), "c", clock_id(T0 + WINDOW)),
            // a's last use is now more than a window ago; b's is exactly a window ago.
            (4, at(T0 + WINDOW + 1), "c", clock_id(T0 + WINDOW) + 1),
            (5, at(T0 + WINDOW + 2), "c", clock_id(T0 + WINDOW) + 2),
        ];
        let mut replicas = [StateMachine::default(), StateMachine::default()];
        let mut counts = [Vec::new(), Vec::new()];
        for (replica, counts) in replicas.iter_mut().zip(counts.iter_mut()) {
            for (seq, stamp, client, request_id) in &entries {
                replica.apply_stamped(*seq, *stamp, client, *request_id, &put("k", client));
                counts.push(replica.session_count());
            }
        }
        assert_eq!(counts[0], vec![1, 2, 3, 2, 1], "a expires at seq 4, b at seq 5");
        assert_eq!(counts[0], counts[1]);
        assert_eq!(replicas[0].digest(), replicas[1].digest());
        assert_eq!(replicas[0].session("a"), None);
        assert_eq!(replicas[0].session("c").map(|s| s.last_used_ms), Some(T0 + WINDOW + 2));
    }

    #[test]
    fn a_late_retry_of_an_expired_session_is_refused_not_executed_again() {
        let mut state = StateMachine::default();
        let id = clock_id(T0);
        assert!(matches!(state.apply_stamped(1, at(T0), "a", id, &incr("n", 1)), Applied::Executed(_)));
        // Another client's request moves the clock past a's window: a is forgotten.
        state.apply_stamped(2, at(T0 + WINDOW + 1), "b", clock_id(T0 + WINDOW + 1), &put("x", "1"));
        assert_eq!(state.session("a"), None);
        let before = state.digest();
        // (Same stamp as the last entry: a later one would move the group clock, which
        // every entry does, refused or not.)
        let late = state.apply_stamped(3, at(T0 + WINDOW + 1), "a", id, &incr("n", 1));
        assert_eq!(late, Applied::SessionExpired { session_expiry_ms: WINDOW });
        assert_eq!(state.get("n").map(|v| v.as_ref()), Some(&b"1"[..]), "executed once");
        assert_eq!(state.digest(), before, "a refusal changes nothing");
        assert_eq!(state.session("a"), None, "and remembers nothing");
    }

    #[test]
    fn a_retry_within_the_window_is_still_answered_from_the_session_table() {
        let mut state = StateMachine::default();
        let id = clock_id(T0);
        state.apply_stamped(1, at(T0), "a", id, &incr("n", 1));
        state.apply_stamped(2, at(T0 + WINDOW), "b", clock_id(T0 + WINDOW), &put("x", "1"));
        let retry = state.apply_stamped(3, at(T0 + WINDOW), "a", id, &incr("n", 1));
        assert!(matches!(retry, Applied::Duplicate(_)), "{retry:?}");
        assert_eq!(state.get("n").map(|v| v.as_ref()), Some(&b"1"[..]));
    }

    #[test]
    fn a_new_session_opens_with_id_1_or_a_recent_clock_id_and_an_old_one_does_not() {
        let mut state = StateMachine::default();
        let now = T0 + 5 * WINDOW;
        state.apply_stamped(1, at(now), "first", 1, &put("k", "1"));
        let recent = clock_id(now - WINDOW / 2);
        assert!(matches!(
            state.apply_stamped(2, at(now), "recent", recent, &put("k", "2")),
            Applied::Executed(_)
        ));
        let old = clock_id(now - WINDOW / 2) - 1;
        assert_eq!(
            state.apply_stamped(3, at(now), "old", old, &put("k", "3")),
            Applied::SessionExpired { session_expiry_ms: WINDOW }
        );
        assert_eq!(
            state.apply_stamped(4, at(now), "second", 2, &put("k", "4")),
            Applied::SessionExpired { session_expiry_ms: WINDOW },
            "counting from 1, request 2 of an unknown session is a late one"
        );
        assert_eq!(state.get("k").map(|v| v.as_ref()), Some(&b"2"[..]));
    }

    #[test]
    fn unstamped_entries_never_expire_anything() {
        let mut state = StateMachine::default();
        state.apply_stamped(1, at(T0), "a", clock_id(T0), &put("k", "1"));
        state.apply(2, "b", 5, &put("k", "2"));
        assert_eq!(state.session_count(), 2);
    }

    #[test]
    fn session_expiry_window_is_bounded() {
        assert!(check_session_expiry(DEFAULT_SESSION_EXPIRY_MS).is_ok());
        assert!(check_session_expiry(MIN_SESSION_EXPIRY_MS).is_ok());
        let error = check_session_expiry(0).expect_err("0 accepted");
        assert!(error.reason.contains("1 s to 7 days"), "{}", error.reason);
        assert!(check_session_expiry(MAX_SESSION_EXPIRY_MS + 1).is_err());
    }

    /// One step of a session workload: which client, whether it retries its last
    /// request or sends a new one, and how far the leader's clock moves first.
    fn session_step() -> impl Strategy<Value = (usize, bool, u64)> {
        (0usize..4, any::<bool>(), prop_oneof![0u64..50, 0u64..(WINDOW * 3 / 2)])
    }

    fn arbitrary_op() -> impl Strategy<Value = Operation> {
        let key = prop::sample::select(vec!["a", "b", "c"]);
        prop_oneof![
            key.clone().prop_map(|k| op(operation::Kind::Get(pb::Get { key: k.into() }))),
            (key.clone(), "[a-z0-9]{0,3}").prop_map(|(k, v)| put(k, &v)),
            key.clone().prop_map(|k| op(operation::Kind::Delete(pb::Delete { key: k.into() }))),
            (key.clone(), -3i64..3).prop_map(|(k, d)| incr(k, d)),
        ]
    }

    /// Keys over many nodes of the map's tree.
    const WIDE_KEYS: u64 = 400;

    fn wide_op() -> impl Strategy<Value = Operation> {
        let key = (0..WIDE_KEYS + 20).prop_map(|i| format!("k{i:03}"));
        prop_oneof![
            (key.clone(), "[a-z0-9]{0,3}").prop_map(|(k, v)| put(&k, &v)),
            key.clone().prop_map(|k| op(operation::Kind::Delete(pb::Delete { key: k }))),
            (key, -3i64..3).prop_map(|(k, d)| incr(&k, d)),
        ]
    }

    proptest! {
        /// Same entries, same order: same state and digest, whatever they are. Different
        /// states: different digests.
        #[test]
        fn replicas_applying_the_same_log_agree(ops in prop::collection::vec((0u8..3, arbitrary_op()), 0..60)) {
            let mut a = StateMachine::default();
            let mut b = StateMachine::default();
            let mut next_id = [0u64; 3];
            for (seq, (client, op)) in ops.iter().enumerate() {
                next_id[*client as usize] += 1;
                let client_id = format!("c{client}");
                let ra = a.apply(seq as u64 + 1, &client_id, next_id[*client as usize], op);
                let rb = b.apply(seq as u64 + 1, &client_id, next_id[*client as usize], op);
                prop_assert_eq!(ra, rb);
            }
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert_eq!(a.fingerprint(), b.fingerprint());
            let mut c = a.clone();
            c.apply(u64::MAX, "other", 1, &put("zz", "different"));
            prop_assert_ne!(a.digest(), c.digest());
            prop_assert_ne!(a.fingerprint(), c.fingerprint());
        }

        /// A checkpoint of changes (`into_change_chunks`) brings a backup holding the
        /// base to exactly the primary's state (keys over many tree nodes, sessions, their
        /// expiry order, the clock, the running sum); and the running sum always equals
        /// one computed from scratch.
        #[test]
        fn a_checkpoint_of_changes_brings_the_base_to_the_state(
            before in prop::collection::vec((0u8..3, wide_op(), 0u64..WINDOW), 0..40),
            after in prop::collection::vec((0u8..3, wide_op(), 0u64..WINDOW), 0..40),
        ) {
            use crate::checkpoint::{Assembler, Base, Checkpoint};
            let mut primary = StateMachine::default();
            for i in 0..WIDE_KEYS {
                primary.apply(0, "fill", i + 1, &put(&format!("k{i:03}"), "v"));
            }
            // Sessions come and go too: the clock moves up to a window per entry.
            let (mut clock, mut last_id) = (T0, [0u64; 3]);
            let mut run = |state: &mut StateMachine, ops: &[(u8, Operation, u64)], from: usize| {
                for (i, (client, op, dt)) in ops.iter().enumerate() {
                    clock += dt;
                    let id = &mut last_id[*client as usize];
                    *id = (*id).max(clock_id(clock)) + 1;
                    state.apply_stamped((from + i) as u64 + 1, at(clock), &format!("c{client}"), *id, op);
                }
            };
            run(&mut primary, &before, 0);
            let base = Base { seq: before.len() as u64 + 1, state: primary.clone() };
            let backup = primary.clone();
            run(&mut primary, &after, before.len() + 1);
            let checkpoint = Checkpoint { seq: base.seq + after.len() as u64 + 1, seq_epoch: 1, state: primary.clone() };
            let mut assembler = Assembler::default();
            let mut chunks = checkpoint.into_change_chunks(base, 1, "r1".into());
            assembler.push(chunks.next().expect("a header")).expect("header");
            assembler.start_from(backup);
            for chunk in chunks {
                assembler.push(chunk).expect("valid chunk");
            }
            let installed = assembler.finish().expect("complete").state;
            prop_assert_eq!(&installed, &primary);
            prop_assert_eq!(installed.digest(), primary.digest());
            prop_assert_eq!(installed.fingerprint(), primary.fingerprint());
            let mut rebuilt = StateMachine::default();
            for (key, value) in primary.key_values() {
                rebuilt.restore_key_value(key.clone(), value.clone());
            }
            prop_assert_eq!(rebuilt.kv_sum, primary.kv_sum);
        }

        /// Sessions that expire, under any timing: replicas agree on every outcome and
        /// digest, also one that installed a checkpoint halfway; a retry within the
        /// window is answered from the table; one after it is refused; nothing runs twice.
        #[test]
        fn expiry_is_deterministic_and_never_executes_twice(steps in prop::collection::vec(session_step(), 1..80)) {
            let mut a = StateMachine::default();
            let mut b = StateMachine::default();
            let mut clock = T0;
            // Per client: its last request id, when that executed, and its counter.
            let mut last: [Option<(u64, u64)>; 4] = [None; 4];
            let mut executed = [0i64; 4];
            for (index, (client, retry, dt)) in steps.iter().enumerate() {
                let seq = index as u64 + 1;
                if index == steps.len() / 2 {
                    let checkpoint = crate::checkpoint::Checkpoint { seq: seq - 1, seq_epoch: 1, state: b.clone() };
                    let mut assembler = crate::checkpoint::Assembler::default();
                    for chunk in checkpoint.into_chunks(1, "r1".into()) {
                        assembler.push(chunk).expect("valid chunk");
                    }
                    b = assembler.finish().expect("complete").state;
                }
                clock += dt;
                let client_id = format!("c{client}");
                let request_id = match (retry, last[*client]) {
                    (true, Some((id, _))) => id,
                    (_, previous) => previous.map_or(0, |(id, _)| id).max(clock_id(clock)) + 1,
                };
                let op = incr(&client_id, 1);
                let outcome = a.apply_stamped(seq, at(clock), &client_id, request_id, &op);
                prop_assert_eq!(&outcome, &b.apply_stamped(seq, at(clock), &client_id, request_id, &op));
                prop_assert_eq!(a.digest(), b.digest());
                match (&outcome, last[*client]) {
                    (Applied::Executed(_), _) => {
                        executed[*client] += 1;
                        last[*client] = Some((request_id, clock));
                    }
                    (Applied::Duplicate(_), Some((id, used))) => {
                        prop_assert_eq!(id, request_id);
                        prop_assert!(clock - used <= WINDOW, "answered after the window");
                    }
                    (Applied::SessionExpired { .. }, Some((id, used))) if id == request_id => {
                        prop_assert!(clock - used > WINDOW, "a retry within the window was refused");
                    }
                    (other, previous) => prop_assert!(false, "unexpected {other:?} after {previous:?}"),
                }
                // The counter says how often the client's requests really ran.
                let value = a.get(&client_id).map(|v| String::from_utf8_lossy(v).parse::<i64>().unwrap_or(-1));
                prop_assert_eq!(value.unwrap_or(0), executed[*client]);
            }
        }
    }
}
