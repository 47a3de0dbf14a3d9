//! Checkpoints: a snapshot of the state machine at a sequence number, and its wire form,
//! a stream of chunks (header, key-value batches, session batches, trailer with the
//! digest) so a large state never needs one giant message. The sender works from an
//! O(1) clone of the state, so the primary keeps serving while a checkpoint streams.

use prost::Message;

use crate::pb::{self, checkpoint_chunk::Part};
use crate::state::{SessionRecord, StateMachine};

/// Soft size limit of one chunk; a single larger value travels alone in its chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

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
        let header = Part::Header(pb::CheckpointHeader {
            epoch,
            leader_id,
            seq: self.seq,
            seq_epoch: self.seq_epoch,
            keys: self.state.keys() as u64,
            sessions: self.state.session_count() as u64,
            clock_ms: self.state.clock_ms(),
        });
        let digest_source = self.state.clone();
        let (key_values, sessions) = self.state.into_parts();
        let key_values = batches(key_values.into_iter().map(|(key, value)| pb::KeyValue { key, value }))
            .map(|entries| Part::KeyValues(pb::KeyValueBatch { entries }));
        let sessions = batches(sessions.into_iter().map(|(client_id, session)| pb::Session {
            client_id,
            last_request_id: session.last_request_id,
            last_reply: Some(session.last_reply),
            last_seq: session.last_seq,
            last_op_digest: session.last_op_digest,
            last_used_ms: session.last_used_ms,
        }))
        .map(|sessions| Part::Sessions(pb::SessionBatch { sessions }));
        let trailer = std::iter::once_with(move || {
            Part::Trailer(pb::CheckpointTrailer { digest: digest_source.digest() })
        });
        std::iter::once(header)
            .chain(key_values)
            .chain(sessions)
            .chain(trailer)
            .map(|part| pb::CheckpointChunk { part: Some(part) })
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
}

/// Rebuilds a checkpoint from its chunks, checking their order, counts and digest.
#[derive(Debug, Default)]
pub struct Assembler {
    header: Option<pb::CheckpointHeader>,
    state: StateMachine,
    chunks: usize,
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
                Part::Header(header) => {
                    self.state.restore_clock(header.clock_ms);
                    Ok(Some(self.header.insert(header)))
                }
                _ => Err(AssemblyError::MissingHeader { index }),
            };
        };
        match part {
            Part::Header(_) => return Err(AssemblyError::DuplicateHeader { index }),
            Part::KeyValues(batch) => {
                for kv in batch.entries {
                    self.state.restore_key_value(kv.key, kv.value);
                }
            }
            Part::Sessions(batch) => {
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
                let got = self.state.digest();
                if got != trailer.digest {
                    return Err(AssemblyError::DigestMismatch { expected: trailer.digest, got });
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
}
