//! Checkpoints: a snapshot of the state machine at a sequence number, and its wire form,
//! a stream of chunks (header, key-value batches, session batches, trailer with the
//! digest) so a large state never needs one giant message. The sender works from an
//! O(1) clone of the state, so the primary keeps serving while a checkpoint streams.

use std::time::Duration;

use prost::Message;

use crate::pb::{self, checkpoint_chunk::Part};
use crate::state::{SessionRecord, StateMachine};

/// Soft size limit of one chunk; a single larger value travels alone in its chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Largest checkpoint a replica receives (payload bytes, see `CheckpointHeader.bytes`):
/// a replica holds its whole state in memory, and a group is sized far below this. A
/// header announcing more is refused before anything is received, so a faulty sender
/// cannot grow a replica without bound (seen: an endless stream took one from 11 MiB
/// to 1 GiB).
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

/// How long a checkpoint transfer may take, end to end: the sender gives up after it, and
/// so does the receiver (a stream that stalls must not hold a half-received state). At
/// a modest 50 MB/s, the largest checkpoint still fits.
pub const CHECKPOINT_TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Payload bytes of one key-value, as `CheckpointHeader.bytes` counts them.
fn key_value_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// Payload bytes of one session, as `CheckpointHeader.bytes` counts them.
fn session_bytes(client_id: &str, last_reply: Option<&pb::OpResult>) -> u64 {
    (client_id.len() + last_reply.map_or(0, Message::encoded_len)) as u64
}

/// The state a follower installed from this leader, at `seq`: what a checkpoint of
/// changes starts from.
#[derive(Debug, Clone)]
pub struct Base {
    pub seq: u64,
    pub state: StateMachine,
}

/// The state after executing every entry up to `seq`.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub seq: u64,
    /// Epoch of the entry at `seq` (0 for the empty genesis state).
    pub seq_epoch: u64,
    pub state: StateMachine,
}

impl Checkpoint {
    /// The chunks that carry this checkpoint, produced lazily (a large state is never
    /// encoded all at once). The digest is computed from the same immutable snapshot.
    pub fn into_chunks(self, epoch: u64, leader_id: String) -> impl Iterator<Item = pb::CheckpointChunk> {
        let digest_source = self.state.clone();
        let (keys, session_count) = (self.state.keys() as u64, self.state.session_count() as u64);
        let clock_ms = self.state.clock_ms();
        let (key_values, sessions) = self.state.into_parts();
        let bytes = key_values.iter().map(|(key, value)| key_value_bytes(key, value)).sum::<u64>()
            + sessions.iter().map(|(id, s)| session_bytes(id, Some(&s.last_reply))).sum::<u64>();
        let header = Part::Header(pb::CheckpointHeader {
            epoch,
            leader_id,
            seq: self.seq,
            seq_epoch: self.seq_epoch,
            keys,
            sessions: session_count,
            clock_ms,
            bytes,
            base_seq: 0,
        });
        let key_values = batches(key_values.into_iter().map(|(key, value)| pb::KeyValue { key, value }))
            .map(|entries| Part::KeyValues(pb::KeyValueBatch { entries }));
        let sessions =
            batches(sessions.into_iter().map(|(client_id, session)| session_message(client_id, session)))
                .map(|sessions| Part::Sessions(pb::SessionBatch { sessions }));
        let trailer = std::iter::once_with(move || {
            Part::Trailer(pb::CheckpointTrailer {
                digest: digest_source.digest(),
                fingerprint: String::new(),
            })
        });
        std::iter::once(header)
            .chain(key_values)
            .chain(sessions)
            .chain(trailer)
            .map(|part| pb::CheckpointChunk { part: Some(part) })
    }

    /// The chunks of a checkpoint of what changed since `base` (which the receiver
    /// holds): the removed keys and sessions, the added or changed key-values and
    /// sessions, and the fingerprint. Costs what changed, not the state's size.
    pub fn into_change_chunks(
        self,
        base: Base,
        epoch: u64,
        leader_id: String,
    ) -> impl Iterator<Item = pb::CheckpointChunk> {
        let changes = self.state.changes_since(&base.state);
        drop(base.state);
        let sessions: Vec<pb::Session> =
            changes.sessions.into_iter().map(|(id, session)| session_message(id, session)).collect();
        let bytes = changes
            .removed_keys
            .iter()
            .chain(&changes.removed_sessions)
            .map(|id| id.len() as u64)
            .sum::<u64>()
            + changes.key_values.iter().map(|(key, value)| key_value_bytes(key, value)).sum::<u64>()
            + sessions.iter().map(|s| session_bytes(&s.client_id, s.last_reply.as_ref())).sum::<u64>();
        let header = Part::Header(pb::CheckpointHeader {
            epoch,
            leader_id,
            seq: self.seq,
            seq_epoch: self.seq_epoch,
            keys: self.state.keys() as u64,
            sessions: self.state.session_count() as u64,
            clock_ms: self.state.clock_ms(),
            bytes,
            base_seq: base.seq,
        });
        let fingerprint = self.state.fingerprint();
        let removed_keys = batches(changes.removed_keys.into_iter())
            .map(|keys| pb::Removals { keys, client_ids: Vec::new() });
        let removed_sessions = batches(changes.removed_sessions.into_iter())
            .map(|client_ids| pb::Removals { keys: Vec::new(), client_ids });
        let key_values =
            batches(changes.key_values.into_iter().map(|(key, value)| pb::KeyValue { key, value }))
                .map(|entries| Part::KeyValues(pb::KeyValueBatch { entries }));
        let sessions =
            batches(sessions.into_iter()).map(|sessions| Part::Sessions(pb::SessionBatch { sessions }));
        let trailer = Part::Trailer(pb::CheckpointTrailer { digest: String::new(), fingerprint });
        std::iter::once(header)
            .chain(removed_keys.chain(removed_sessions).map(Part::Removals))
            .chain(key_values)
            .chain(sessions)
            .chain(std::iter::once(trailer))
            .map(|part| pb::CheckpointChunk { part: Some(part) })
    }
}

fn session_message(client_id: String, session: SessionRecord) -> pb::Session {
    pb::Session {
        client_id,
        last_request_id: session.last_request_id,
        last_reply: Some(session.last_reply),
        last_seq: session.last_seq,
        last_op_digest: session.last_op_digest,
        last_used_ms: session.last_used_ms,
    }
}

/// Groups messages into batches of about `CHUNK_BYTES`.
fn batches<T: Message>(items: impl Iterator<Item = T>) -> impl Iterator<Item = Vec<T>> {
    let mut items = items.peekable();
    std::iter::from_fn(move || {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(item) =
            items.next_if(|item| batch.is_empty() || bytes + item.encoded_len() <= CHUNK_BYTES)
        {
            bytes += item.encoded_len();
            batch.push(item);
        }
        (!batch.is_empty()).then_some(batch)
    })
}

/// Why a received checkpoint stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("chunk {index}: expected a header first")]
    MissingHeader { index: usize },
    #[error("chunk {index}: a second header")]
    DuplicateHeader { index: usize },
    #[error("chunk {index}: empty chunk")]
    EmptyChunk { index: usize },
    #[error("stream ended before the trailer")]
    Truncated,
    #[error("chunk {index} arrived after the trailer")]
    AfterTrailer { index: usize },
    #[error("header announced {expected} {what}, the stream carried {got}")]
    CountMismatch { what: &'static str, expected: u64, got: u64 },
    #[error("digest mismatch: sender {expected}, received state {got}")]
    DigestMismatch { expected: String, got: String },
    #[error("header announces {declared} bytes, more than a replica receives ({MAX_CHECKPOINT_BYTES})")]
    TooLarge { declared: u64 },
    #[error("chunk {index}: the stream carries more {what} than its header announced ({declared})")]
    BeyondHeader { index: usize, what: &'static str, declared: u64 },
    #[error("chunk {index}: removals belong in a checkpoint of changes, before its key-values and sessions")]
    MisplacedRemovals { index: usize },
    #[error("a checkpoint of changes since seq {base_seq}, but no state at that seq to apply them to")]
    NoBase { base_seq: u64 },
    #[error("fingerprint mismatch: sender {expected}, received state {got}")]
    FingerprintMismatch { expected: String, got: String },
}

/// Rebuilds a checkpoint from its chunks, checking their order, counts and digest.
#[derive(Debug, Default)]
pub struct Assembler {
    header: Option<pb::CheckpointHeader>,
    state: StateMachine,
    chunks: usize,
    /// Payload bytes received so far (see `CheckpointHeader.bytes`).
    bytes: u64,
    /// A checkpoint of changes: the state they apply to was given (`start_from`).
    based: bool,
    /// Key-values or sessions arrived (removed keys come before them).
    body_started: bool,
    finished: Option<Checkpoint>,
}

impl Assembler {
    /// Feeds one chunk. Returns the header when this chunk was the header, so the
    /// receiver can start logging entries past it before the body arrives.
    pub fn push(
        &mut self,
        chunk: pb::CheckpointChunk,
    ) -> Result<Option<&pb::CheckpointHeader>, AssemblyError> {
        let index = self.chunks;
        self.chunks += 1;
        if self.finished.is_some() {
            return Err(AssemblyError::AfterTrailer { index });
        }
        let part = chunk.part.ok_or(AssemblyError::EmptyChunk { index })?;
        let Some(header) = &self.header else {
            return match part {
                Part::Header(header) if header.bytes > MAX_CHECKPOINT_BYTES => {
                    Err(AssemblyError::TooLarge { declared: header.bytes })
                }
                Part::Header(header) => {
                    self.state.restore_clock(header.clock_ms);
                    Ok(Some(self.header.insert(header)))
                }
                _ => Err(AssemblyError::MissingHeader { index }),
            };
        };
        // Checked before anything is kept: memory stays within what the header announced.
        let beyond = |what, declared| AssemblyError::BeyondHeader { index, what, declared };
        if header.base_seq != 0 && !self.based && !matches!(part, Part::Header(_)) {
            return Err(AssemblyError::NoBase { base_seq: header.base_seq });
        }
        match part {
            Part::Header(_) => return Err(AssemblyError::DuplicateHeader { index }),
            Part::Removals(removals) => {
                if header.base_seq == 0 || self.body_started {
                    return Err(AssemblyError::MisplacedRemovals { index });
                }
                self.bytes +=
                    removals.keys.iter().chain(&removals.client_ids).map(|id| id.len() as u64).sum::<u64>();
                if self.bytes > header.bytes {
                    return Err(beyond("bytes", header.bytes));
                }
                for key in &removals.keys {
                    self.state.restore_removal(key);
                }
                for client_id in &removals.client_ids {
                    self.state.restore_session_removal(client_id);
                }
            }
            Part::KeyValues(batch) => {
                self.body_started = true;
                self.bytes += batch.entries.iter().map(|kv| key_value_bytes(&kv.key, &kv.value)).sum::<u64>();
                if self.bytes > header.bytes {
                    return Err(beyond("bytes", header.bytes));
                }
                for kv in batch.entries {
                    self.state.restore_key_value(kv.key, kv.value);
                }
                if self.state.keys() as u64 > header.keys {
                    return Err(beyond("keys", header.keys));
                }
            }
            Part::Sessions(batch) => {
                self.body_started = true;
                self.bytes += batch
                    .sessions
                    .iter()
                    .map(|s| session_bytes(&s.client_id, s.last_reply.as_ref()))
                    .sum::<u64>();
                if self.bytes > header.bytes {
                    return Err(beyond("bytes", header.bytes));
                }
                // (A checkpoint of changes may replace sessions the base holds.)
                let added =
                    batch.sessions.iter().filter(|s| self.state.session(&s.client_id).is_none()).count();
                if (self.state.session_count() + added) as u64 > header.sessions {
                    return Err(beyond("sessions", header.sessions));
                }
                for session in batch.sessions {
                    let record = SessionRecord {
                        last_request_id: session.last_request_id,
                        last_reply: session.last_reply.unwrap_or_default(),
                        last_seq: session.last_seq,
                        last_op_digest: session.last_op_digest,
                        last_used_ms: session.last_used_ms,
                    };
                    self.state.restore_session(session.client_id, record);
                }
            }
            Part::Trailer(trailer) => {
                let counts = [
                    ("keys", header.keys, self.state.keys()),
                    ("sessions", header.sessions, self.state.session_count()),
                ];
                for (what, expected, got) in counts {
                    if expected != got as u64 {
                        return Err(AssemblyError::CountMismatch { what, expected, got: got as u64 });
                    }
                }
                if header.base_seq == 0 {
                    let got = self.state.digest();
                    if got != trailer.digest {
                        return Err(AssemblyError::DigestMismatch { expected: trailer.digest, got });
                    }
                } else {
                    let got = self.state.fingerprint();
                    if got != trailer.fingerprint {
                        return Err(AssemblyError::FingerprintMismatch {
                            expected: trailer.fingerprint,
                            got,
                        });
                    }
                }
                self.finished = Some(Checkpoint {
                    seq: header.seq,
                    seq_epoch: header.seq_epoch,
                    state: std::mem::take(&mut self.state),
                });
            }
        }
        Ok(None)
    }

    pub fn header(&self) -> Option<&pb::CheckpointHeader> {
        self.header.as_ref()
    }

    /// A checkpoint of changes: `base` is the receiver's state at the header's
    /// `base_seq`, which the changes apply to.
    pub fn start_from(&mut self, mut base: StateMachine) {
        if let Some(header) = &self.header {
            base.restore_clock(header.clock_ms);
        }
        self.state = base;
        self.based = true;
    }

    /// The checkpoint, once the trailer arrived and verified.
    pub fn finish(self) -> Result<Checkpoint, AssemblyError> {
        self.finished.ok_or(AssemblyError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn state_with(keys: usize, value_bytes: usize) -> StateMachine {
        let mut state = StateMachine::default();
        for i in 0..keys {
            let op = pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put {
                    key: format!("k{i:05}"),
                    value: Bytes::from(vec![b'x'; value_bytes]),
                })),
            };
            state.apply(i as u64 + 1, &format!("c{}", i % 7), i as u64 + 1, &op);
        }
        state
    }

    #[test]
    fn large_state_travels_in_bounded_chunks_and_arrives_equal() {
        let state = state_with(300, 4096);
        let checkpoint = Checkpoint { seq: 300, seq_epoch: 2, state: state.clone() };
        let chunks: Vec<_> = checkpoint.into_chunks(2, "r1".into()).collect();
        assert!(chunks.len() > 4, "1.2 MB in {} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.encoded_len() <= CHUNK_BYTES + 8 * 1024));
        let mut assembler = Assembler::default();
        for chunk in chunks {
            assembler.push(chunk).expect("valid chunk");
        }
        let received = assembler.finish().expect("complete");
        assert_eq!((received.seq, received.seq_epoch), (300, 2));
        assert_eq!(received.state.digest(), state.digest());
    }

    #[test]
    fn a_lost_chunk_is_detected() {
        let checkpoint = Checkpoint { seq: 50, seq_epoch: 1, state: state_with(50, 20_000) };
        let mut chunks: Vec<_> = checkpoint.into_chunks(1, "r1".into()).collect();
        chunks.remove(1);
        let mut assembler = Assembler::default();
        let result = chunks.into_iter().try_for_each(|c| assembler.push(c).map(|_| ()));
        assert!(matches!(result, Err(AssemblyError::CountMismatch { what: "keys", .. })), "{result:?}");
    }

    #[test]
    fn a_tampered_value_fails_the_digest() {
        let checkpoint = Checkpoint { seq: 5, seq_epoch: 1, state: state_with(5, 10) };
        let mut chunks: Vec<_> = checkpoint.into_chunks(1, "r1".into()).collect();
        if let Some(Part::KeyValues(batch)) = chunks[1].part.as_mut() {
            batch.entries[0].value = Bytes::from_static(b"tampered");
        }
        let mut assembler = Assembler::default();
        let result = chunks.into_iter().try_for_each(|c| assembler.push(c).map(|_| ()));
        assert!(matches!(result, Err(AssemblyError::DigestMismatch { .. })), "{result:?}");
    }

    #[test]
    fn a_stream_without_header_or_trailer_is_refused() {
        let mut assembler = Assembler::default();
        let body = pb::CheckpointChunk { part: Some(Part::KeyValues(pb::KeyValueBatch::default())) };
        assert_eq!(assembler.push(body), Err(AssemblyError::MissingHeader { index: 0 }));
        let checkpoint = Checkpoint { seq: 1, seq_epoch: 1, state: state_with(1, 1) };
        let mut assembler = Assembler::default();
        let header = checkpoint.into_chunks(1, "r1".into()).next().expect("header");
        assembler.push(header).expect("header");
        assert_eq!(assembler.finish().err(), Some(AssemblyError::Truncated));
    }

    fn chunk(part: Part) -> pb::CheckpointChunk {
        pb::CheckpointChunk { part: Some(part) }
    }

    fn header(keys: u64, bytes: u64) -> pb::CheckpointChunk {
        chunk(Part::Header(pb::CheckpointHeader {
            epoch: 1,
            leader_id: "r1".into(),
            seq: 9,
            seq_epoch: 1,
            keys,
            sessions: 0,
            bytes,
            ..Default::default()
        }))
    }

    fn key_values(from: usize, n: usize, value_bytes: usize) -> pb::CheckpointChunk {
        let entries = (from..from + n)
            .map(|i| pb::KeyValue { key: format!("k{i:05}"), value: Bytes::from(vec![b'x'; value_bytes]) })
            .collect();
        chunk(Part::KeyValues(pb::KeyValueBatch { entries }))
    }

    /// Issue 9: an endless InstallCheckpoint stream took a backup from 11 MiB to 1 GiB.
    /// The receiver keeps no more than the header announced, and refuses a header that
    /// announces more than any replica receives.
    #[test]
    fn a_stream_carrying_more_than_its_header_announced_is_refused_at_once() {
        let mut assembler = Assembler::default();
        assembler.push(header(1_000_000, 2 * 1024)).expect("header");
        assembler.push(key_values(0, 1, 1000)).expect("within what was announced");
        let refused = (1..100).find_map(|i| assembler.push(key_values(i, 1, 1000)).err());
        assert_eq!(refused, Some(AssemblyError::BeyondHeader { index: 3, what: "bytes", declared: 2048 }));
        assert!(assembler.state.keys() <= 2, "kept only what the header announced");

        // More keys than announced, within the bytes: refused as well.
        let mut assembler = Assembler::default();
        assembler.push(header(2, 1 << 20)).expect("header");
        let refused = assembler.push(key_values(0, 3, 1)).expect_err("3 keys of 2");
        assert!(matches!(refused, AssemblyError::BeyondHeader { what: "keys", .. }), "{refused:?}");

        let mut assembler = Assembler::default();
        let refused = assembler.push(header(1, MAX_CHECKPOINT_BYTES + 1)).expect_err("too large");
        assert_eq!(refused, AssemblyError::TooLarge { declared: MAX_CHECKPOINT_BYTES + 1 });
        assert!(assembler.header().is_none(), "nothing of it is kept");
    }

    /// A checkpoint of changes: small, applies to the right base only, and its parts
    /// must come in their place.
    #[test]
    fn changes_apply_only_to_their_base_and_only_in_order() {
        let base_state = state_with(2_000, 100);
        let mut state = base_state.clone();
        for i in 0..10 {
            let op = pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put {
                    key: format!("new{i}"),
                    value: Bytes::from("v"),
                })),
            };
            state.apply(3_000 + i, "c1", 3_000 + i, &op);
        }
        let delete =
            pb::Operation { kind: Some(pb::operation::Kind::Delete(pb::Delete { key: "k00007".into() })) };
        state.apply(4_000, "c1", 4_000, &delete);
        let checkpoint = Checkpoint { seq: 4_000, seq_epoch: 1, state: state.clone() };
        let changes = || -> Vec<_> {
            checkpoint
                .clone()
                .into_change_chunks(Base { seq: 2_000, state: base_state.clone() }, 1, "r1".into())
                .collect()
        };
        let chunks = changes();
        let Some(Part::Header(header)) = &chunks[0].part else { panic!("no header first") };
        assert_eq!((header.base_seq, header.keys), (2_000, 2_009));
        assert!(header.bytes < 2_000, "only what changed travels: {} bytes", header.bytes);

        let assemble = |base: Option<StateMachine>, chunks: Vec<pb::CheckpointChunk>| {
            let mut assembler = Assembler::default();
            let mut chunks = chunks.into_iter();
            assembler.push(chunks.next().expect("a header"))?;
            if let Some(base) = base {
                assembler.start_from(base);
            }
            chunks.try_for_each(|chunk| assembler.push(chunk).map(|_| ()))?;
            assembler.finish()
        };
        let installed = assemble(Some(base_state.clone()), changes()).expect("applies to its base");
        assert_eq!(installed.state.digest(), state.digest());

        // A base with the same keys, one value differing: the fingerprint tells.
        let mut wrong_base = base_state.clone();
        wrong_base.restore_key_value("k00001".into(), Bytes::from("other"));
        let refused = assemble(Some(wrong_base), changes()).expect_err("another base");
        assert!(matches!(refused, AssemblyError::FingerprintMismatch { .. }), "{refused:?}");
        assert_eq!(assemble(None, changes()).err(), Some(AssemblyError::NoBase { base_seq: 2_000 }));

        // Removed keys after key-values, or in a whole-state checkpoint: refused.
        let mut misplaced = changes();
        let removal = misplaced.remove(1);
        assert!(matches!(removal.part, Some(Part::Removals(_))));
        assert!(matches!(misplaced.remove(1).part, Some(Part::KeyValues(_))));
        assert!(matches!(misplaced[1].part, Some(Part::Sessions(_))));
        misplaced.insert(2, removal);
        let refused = assemble(Some(base_state.clone()), misplaced).expect_err("out of order");
        assert!(matches!(refused, AssemblyError::MisplacedRemovals { .. }), "{refused:?}");
        let mut whole: Vec<_> = checkpoint.clone().into_chunks(1, "r1".into()).collect();
        whole.insert(
            1,
            chunk(Part::Removals(pb::Removals { keys: vec!["k00001".into()], client_ids: Vec::new() })),
        );
        assert_eq!(assemble(None, whole).err(), Some(AssemblyError::MisplacedRemovals { index: 1 }));
    }

    #[test]
    fn the_header_announces_exactly_the_bytes_the_body_carries() {
        let state = state_with(40, 3000);
        let chunks: Vec<_> =
            Checkpoint { seq: 40, seq_epoch: 1, state }.into_chunks(1, "r1".into()).collect();
        let Some(Part::Header(header)) = chunks[0].part.clone() else { panic!("no header first") };
        assert!(header.bytes >= 40 * 3000, "{header:?}");
        let mut assembler = Assembler::default();
        for chunk in chunks {
            assembler.push(chunk).expect("a correct stream");
        }
        assert_eq!(assembler.bytes, header.bytes);
        assembler.finish().expect("complete");
    }
}
