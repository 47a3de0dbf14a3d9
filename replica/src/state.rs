//! The replicated state machine: a key-value map plus a session table (each client's
//! last request id and reply), so that a retried request is answered from the table and
//! never executed twice. Pure and deterministic: every replica that applies the same
//! entries in the same order reaches the same state and the same digest.

use bytes::Bytes;
use imbl::OrdMap;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::pb::{self, op_result, operation};

/// Largest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest accepted value, in bytes (1 MiB). Bigger values are refused as invalid.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest accepted client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 256;

/// What a client's session remembers: enough to answer a retry of its last request,
/// and to tell a retry from another request that reuses its id.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub last_request_id: u64,
    pub last_reply: pb::OpResult,
    pub last_seq: u64,
    /// `op_digest` of the last request's operation.
    pub last_op_digest: u64,
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
}

/// Key-value map and session table. Cloning is O(1) (persistent maps), which is what
/// lets a primary checkpoint while it keeps serving.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateMachine {
    kv: OrdMap<String, Bytes>,
    sessions: OrdMap<String, SessionRecord>,
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
    /// Applies the request of one log entry, at most once per (client, request id).
    pub fn apply(&mut self, seq: u64, client_id: &str, request_id: u64, op: &pb::Operation) -> Applied {
        let digest = op_digest(op);
        if let Some(session) = self.sessions.get(client_id) {
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
        let reply = self.execute(op);
        self.sessions.insert(
            client_id.to_owned(),
            SessionRecord {
                last_request_id: request_id,
                last_reply: reply.clone(),
                last_seq: seq,
                last_op_digest: digest,
            },
        );
        Applied::Executed(reply)
    }

    fn execute(&mut self, op: &pb::Operation) -> pb::OpResult {
        let kind = match &op.kind {
            Some(operation::Kind::Get(get)) => {
                op_result::Kind::Get(pb::GetResult { value: self.kv.get(&get.key).cloned() })
            }
            Some(operation::Kind::Put(put)) => {
                self.kv.insert(put.key.clone(), put.value.clone());
                op_result::Kind::Put(pb::PutResult {})
            }
            Some(operation::Kind::Delete(delete)) => {
                op_result::Kind::Delete(pb::DeleteResult { existed: self.kv.remove(&delete.key).is_some() })
            }
            Some(operation::Kind::CompareAndSwap(cas)) => {
                let current = self.kv.get(&cas.key).cloned();
                let swapped = current == cas.expected;
                if swapped {
                    self.kv.insert(cas.key.clone(), cas.new_value.clone());
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
        self.kv.insert(key.to_owned(), Bytes::from(value.to_string()));
        Ok(value)
    }

    /// Applies log entries in order (a passive backup's log replayed on its checkpoint).
    pub fn replay(&mut self, entries: &[pb::Entry]) {
        for entry in entries {
            let op = entry.op.clone().unwrap_or_default();
            self.apply(entry.seq, &entry.client_id, entry.request_id, &op);
        }
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
        self.kv.insert(key, value);
    }

    /// Inserts a session while a checkpoint is being assembled.
    pub fn restore_session(&mut self, client_id: String, session: SessionRecord) {
        self.sessions.insert(client_id, session);
    }

    /// Hex SHA-256 over the sorted map and the sorted session table, each field
    /// length-prefixed so that no two different states hash the same input.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        for (key, value) in &self.kv {
            field(key.as_bytes());
            field(value);
        }
        field(b"sessions");
        for (client_id, session) in &self.sessions {
            field(client_id.as_bytes());
            field(&session.last_request_id.to_le_bytes());
            field(&session.last_reply.encode_to_vec());
            field(&session.last_op_digest.to_le_bytes());
        }
        hex::encode(hasher.finalize())
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

    fn arbitrary_op() -> impl Strategy<Value = Operation> {
        let key = prop::sample::select(vec!["a", "b", "c"]);
        prop_oneof![
            key.clone().prop_map(|k| op(operation::Kind::Get(pb::Get { key: k.into() }))),
            (key.clone(), "[a-z0-9]{0,3}").prop_map(|(k, v)| put(k, &v)),
            key.clone().prop_map(|k| op(operation::Kind::Delete(pb::Delete { key: k.into() }))),
            (key.clone(), -3i64..3).prop_map(|(k, d)| incr(k, d)),
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
            let mut c = a.clone();
            c.apply(u64::MAX, "other", 1, &put("zz", "different"));
            prop_assert_ne!(a.digest(), c.digest());
        }
    }
}
