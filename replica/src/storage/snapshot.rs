//! Snapshot files: a checkpoint written to disk in the same chunk stream a leader sends
//! a joiner (header, key-value batches, session batches, trailer with the state's
//! SHA-256 digest), each chunk length-delimited. Reading goes through the same
//! `Assembler` as a received checkpoint, so a snapshot is verified (counts, bounds,
//! digest) exactly like one: a damaged file is refused, never half-loaded.
//!
//! Written to a temporary name, synced, renamed, and the directory synced: a crash
//! leaves the old snapshot or the new one, never a mix.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::checkpoint::{Assembler, Checkpoint};
use crate::pb;

const MAGIC: &[u8; 12] = b"TANDEMSNAP1\n";

/// `dir/<segment>-<seq>.snap`: replay continues with WAL segment `segment`.
pub fn path(dir: &Path, segment: u64, seq: u64) -> PathBuf {
    dir.join(format!("{segment:016x}-{seq:016x}.snap"))
}

/// The snapshots in `dir` as (segment, seq, path), newest first.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let parsed =
            path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".snap")).and_then(|n| {
                let (segment, seq) = n.split_once('-')?;
                Some((u64::from_str_radix(segment, 16).ok()?, u64::from_str_radix(seq, 16).ok()?))
            });
        if let Some((segment, seq)) = parsed {
            found.push((segment, seq, path));
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

/// Writes `checkpoint` durably to `target`.
pub fn write(target: &Path, checkpoint: Checkpoint) -> io::Result<()> {
    let temporary = target.with_extension("snap.tmp");
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&temporary)?);
    out.write_all(MAGIC)?;
    let mut buffer = Vec::new();
    for chunk in checkpoint.into_chunks(0, String::new()) {
        buffer.clear();
        chunk.encode_length_delimited(&mut buffer).map_err(io::Error::other)?;
        out.write_all(&buffer)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, target)?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Reads and verifies a snapshot.
pub fn read(path: &Path) -> Result<Checkpoint, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; MAGIC.len()];
    input.read_exact(&mut magic).map_err(|e| format!("header: {e}"))?;
    if &magic != MAGIC {
        return Err("not a Tandem snapshot (bad magic)".into());
    }
    let mut assembler = Assembler::default();
    let mut buffer = Vec::new();
    while let Some(length) = read_varint(&mut input)? {
        if length > crate::storage::wal::MAX_RECORD_BYTES as u64 {
            return Err(format!("a chunk declares {length} bytes"));
        }
        buffer.resize(length as usize, 0);
        input.read_exact(&mut buffer).map_err(|e| format!("truncated chunk: {e}"))?;
        let chunk = pb::CheckpointChunk::decode(buffer.as_slice()).map_err(|e| e.to_string())?;
        assembler.push(chunk).map_err(|e| e.to_string())?;
    }
    assembler.finish().map_err(|e| e.to_string())
}

/// A protobuf varint, or `None` at a clean end of file.
fn read_varint(input: &mut impl Read) -> Result<Option<u64>, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        match input.read(&mut byte) {
            Ok(0) if shift == 0 => return Ok(None),
            Ok(0) => return Err("truncated length".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err("length varint too long".into())
}

/// Makes a rename or a deletion in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateMachine;

    fn state(keys: u64) -> StateMachine {
        let mut state = StateMachine::default();
        for i in 0..keys {
            let op = pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put {
                    key: format!("k{i}"),
                    value: bytes::Bytes::from(vec![b'v'; 100]),
                })),
            };
            state.apply(i + 1, "c", i + 1, &op);
        }
        state
    }

    #[test]
    fn a_snapshot_reads_back_equal_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = path(dir.path(), 3, 500);
        let original = state(500);
        write(&target, Checkpoint { seq: 500, seq_epoch: 2, state: original.clone() }).expect("written");
        let read_back = read(&target).expect("a valid snapshot");
        assert_eq!((read_back.seq, read_back.seq_epoch), (500, 2));
        assert_eq!(read_back.state.digest(), original.digest());
        assert_eq!(list(dir.path()).expect("listed"), vec![(3, 500, target.clone())]);

        let mut bytes = std::fs::read(&target).expect("file");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&target, &bytes).expect("rewritten");
        assert!(read(&target).is_err(), "a flipped byte is detected");
        bytes.truncate(middle);
        std::fs::write(&target, &bytes).expect("rewritten");
        assert!(read(&target).is_err(), "a truncated file is detected");
    }
}
