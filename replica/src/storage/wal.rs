//! The write-ahead log's format: numbered segment files of framed records, each
//! `length (u32 LE) | crc32 of the payload (u32 LE) | payload` (the payload a protobuf
//! `Record`), as etcd's wal frames its records. Reading stops at the first frame that
//! is incomplete or fails its checksum: that is where a crash tore the last write, or
//! where the disk went bad, and nothing after it can be trusted. The caller cuts the
//! file there.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::pb;

/// Bytes of a frame's header (length, checksum).
const FRAME_HEADER: usize = 8;
/// Largest payload a frame may declare: a record holds at most one append's entries
/// (`MAX_MESSAGE_BYTES`) or a log tail at a snapshot. A longer length is garbage.
pub const MAX_RECORD_BYTES: usize = 256 << 20;
/// A new segment starts once the current one is this large.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// One record of the log.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(oneof = "RecordKind", tags = "1, 2")]
    pub kind: Option<RecordKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum RecordKind {
    /// From `from` on, the log is `entries` (a follower replacing a deposed leader's
    /// suffix writes the replacement from its first changed sequence number).
    #[prost(message, tag = "1")]
    Entries(EntriesRecord),
    #[prost(message, tag = "2")]
    Meta(MetaRecord),
}

#[derive(Clone, PartialEq, Message)]
pub struct EntriesRecord {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<pb::Entry>,
}

/// What a replica must remember besides its log: the configuration it holds and the
/// last epoch in which its log provably held every committed entry.
#[derive(Clone, PartialEq, Message)]
pub struct MetaRecord {
    #[prost(message, optional, tag = "1")]
    pub config: Option<pb::Configuration>,
    #[prost(uint64, tag = "2")]
    pub synced_epoch: u64,
}

/// Appends one framed record to `out`.
pub fn frame(record: &Record, out: &mut Vec<u8>) {
    let payload = record.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Why reading a segment stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a frame (a write torn by a crash, or a truncated file).
    Torn,
    /// A frame's checksum, length or payload is wrong.
    Corrupt(String),
}

/// The records of one segment, and where (if anywhere) it stops being readable.
#[derive(Debug)]
pub struct SegmentRead {
    pub records: Vec<Record>,
    /// Bytes of valid frames: where the file must be cut if it is damaged.
    pub valid_bytes: u64,
    pub damage: Option<Damage>,
}

/// Parses a segment's bytes.
pub fn parse(bytes: &[u8]) -> SegmentRead {
    let mut records = Vec::new();
    let mut at = 0;
    let damage = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < FRAME_HEADER {
            break Some(Damage::Torn);
        }
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        // An empty record is never written: zeros are a preallocated or zeroed tail.
        if length == 0 || length > MAX_RECORD_BYTES {
            break Some(Damage::Corrupt(format!("frame at byte {at} declares {length} bytes")));
        }
        let Some(payload) = rest.get(FRAME_HEADER..FRAME_HEADER + length) else {
            break Some(Damage::Torn);
        };
        if crc32fast::hash(payload) != crc {
            break Some(Damage::Corrupt(format!("checksum mismatch in the frame at byte {at}")));
        }
        match Record::decode(payload) {
            Ok(record) => records.push(record),
            Err(error) => break Some(Damage::Corrupt(format!("frame at byte {at}: {error}"))),
        }
        at += FRAME_HEADER + length;
    };
    SegmentRead { records, valid_bytes: at as u64, damage }
}

/// Reads a segment file whole.
pub fn read(path: &Path) -> io::Result<SegmentRead> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(parse(&bytes))
}

/// `dir/<index>.wal`.
pub fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:016x}.wal"))
}

/// The segments in `dir`, by index.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        if let Some(index) = index {
            found.push((index, path));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(from: u64, n: u64) -> Record {
        Record {
            kind: Some(RecordKind::Entries(EntriesRecord {
                from,
                entries: (from..from + n)
                    .map(|seq| pb::Entry { seq, epoch: 1, client_id: "c".into(), ..Default::default() })
                    .collect(),
            })),
        }
    }

    fn framed(records: &[Record]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for record in records {
            frame(record, &mut bytes);
        }
        bytes
    }

    #[test]
    fn records_read_back_as_written() {
        let records = vec![entries(1, 3), entries(4, 1), entries(3, 2)];
        let read = parse(&framed(&records));
        assert_eq!(read.records, records);
        assert_eq!(read.damage, None);
    }

    proptest! {
        /// Whatever is cut off or flipped, reading keeps exactly the frames before the
        /// damage, and says so: never a record that was not written.
        #[test]
        fn a_torn_or_corrupted_tail_is_detected_and_cut(
            n in 1usize..8,
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            corrupt in any::<bool>(),
        ) {
            let records: Vec<Record> = (0..n as u64).map(|i| entries(i * 10 + 1, i + 1)).collect();
            let mut bytes = framed(&records);
            let whole = bytes.len();
            let at = if corrupt {
                let at = flip.index(whole);
                bytes[at] ^= 0x5a;
                at
            } else {
                let at = cut.index(whole);
                bytes.truncate(at);
                at
            };
            let read = parse(&bytes);
            // The frames wholly before the damaged byte survive, and nothing else.
            let mut end = 0;
            let mut intact = 0;
            for record in &records {
                let size = FRAME_HEADER + record.encoded_len();
                if end + size > at { break; }
                end += size;
                intact += 1;
            }
            prop_assert_eq!(&read.records[..], &records[..intact]);
            prop_assert_eq!(read.valid_bytes, end as u64);
            prop_assert!(read.damage.is_some() || (!corrupt && at == end));
        }
    }
}
