//! A replica's data on disk: a write-ahead log of its log's changes and its
//! configuration (`wal`), periodic snapshots of its state (`snapshot`), and an identity
//! file naming the data. Recovery loads the newest valid snapshot and replays the log
//! after it, cutting a torn or corrupt tail; a replica whose data cannot be verified at
//! all starts empty under a new data id, and rejoins from its peers.
//!
//! Writing happens on one thread that owns the files: the node hands it framed records
//! under its lock (so they are written in the order the core made them), the thread
//! writes whatever has queued up and syncs once for all of it (group commit), then
//! publishes how far the disk holds the log.
//!
//! Layout of `--data-dir`: `identity`, `wal/<segment>.wal`, `snap/<segment>-<seq>.snap`,
//! and `damaged-<unix time>/` for data set aside because it could not be verified.

pub mod snapshot;
pub mod wal;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checkpoint::Checkpoint;
use crate::log::Log;
use crate::replication::{Persist, Recovered};
use wal::{EntriesRecord, MetaRecord, Record, RecordKind};

/// How long `interval` durability lets written records wait for a sync.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Entries per record of the log tail that starts a snapshot's segment: records stay far
/// below `wal::MAX_RECORD_BYTES` (an entry is at most ~1 MiB, most are small).
const TAIL_RECORD_ENTRIES: usize = 128;
/// A new snapshot is taken once this much log was written since the last one: it
/// bounds both the disk the log takes and the time a restart spends replaying it.
pub const SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledged only once every member holds it on disk (synced).
    #[default]
    Fsync,
    /// Written at once, synced every `SYNC_INTERVAL`: a crash of every replica at once
    /// may lose the writes of the last interval.
    Interval,
    /// Nothing on disk: a replica's state lives as long as its process.
    Memory,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Interval => "interval",
            Self::Memory => "memory",
        }
    }

    /// Whether a replica's data outlives its process.
    pub fn on_disk(self) -> bool {
        self != Self::Memory
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fsync" => Ok(Self::Fsync),
            "interval" => Ok(Self::Interval),
            "memory" => Ok(Self::Memory),
            other => Err(format!("durability must be fsync, interval or memory, not {other:?}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data directory {dir}: {source}; check that it exists and is writable by this process")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error(
        "data directory {dir} belongs to replica {owner}, not {id}: give each replica its own --data-dir"
    )]
    OtherReplica { dir: PathBuf, owner: String, id: String },
}

/// How far the disk holds what was handed to the writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Records up to this sequence number of hand-over are on disk.
    pub lsn: u64,
    /// The log's end as of the last of them.
    pub log_end: u64,
}

enum Command {
    /// Append framed records; `log_end`: the log's end after them, if they changed it.
    Append { bytes: Vec<u8>, lsn: u64, log_end: Option<u64> },
    /// Start segment `segment` with these records (a snapshot's log tail).
    Roll { segment: u64, bytes: Vec<u8>, lsn: u64, log_end: u64 },
    /// Snapshot `segment` is on disk: older segments and snapshots are not needed.
    Release { segment: u64 },
}

/// What recovery found, for the log and Status.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub snapshot_seq: u64,
    pub records: usize,
    pub last_seq: u64,
    /// What was cut or set aside, if anything.
    pub damage: Option<String>,
    pub elapsed: Duration,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot at seq {}, {} log records replayed, log up to seq {}, in {} ms",
            self.snapshot_seq,
            self.records,
            self.last_seq,
            self.elapsed.as_millis()
        )?;
        if let Some(damage) = &self.damage {
            write!(f, "; {damage}")?;
        }
        Ok(())
    }
}

/// A replica's open data directory.
pub struct Storage {
    dir: PathBuf,
    durability: Durability,
    data_id: String,
    /// `None` once dropped: the writer then finishes what it has and stops.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Hand-over count (under the node's lock) and the current segment.
    next_lsn: AtomicU64,
    segment: AtomicU64,
    synced: watch::Sender<Synced>,
    bytes_since_snapshot: AtomicU64,
    snapshot_seq: AtomicU64,
    recovery: String,
}

impl Storage {
    /// Opens (or creates) `dir` for replica `id`, and recovers what it holds. A failed
    /// write later cancels `shutdown`: a replica that cannot write must not acknowledge.
    pub fn open(
        dir: &Path,
        id: &str,
        durability: Durability,
        shutdown: CancellationToken,
    ) -> Result<(Self, Option<Recovered>), StorageError> {
        let io = |source| StorageError::Io { dir: dir.to_owned(), source };
        let started = Instant::now();
        std::fs::create_dir_all(dir.join("wal")).map_err(io)?;
        std::fs::create_dir_all(dir.join("snap")).map_err(io)?;
        let data_id = match read_identity(dir).map_err(io)? {
            Some((owner, _)) if owner != id => {
                return Err(StorageError::OtherReplica { dir: dir.to_owned(), owner, id: id.to_owned() });
            }
            Some((_, data_id)) => data_id,
            None => write_identity(dir, id).map_err(io)?,
        };
        let (recovered, mut report) = match recover(dir).map_err(io)? {
            Recovery::Empty => (None, RecoveryReport::default()),
            Recovery::Found(found) => {
                let (recovered, report) = *found;
                (Some(recovered), report)
            }
            Recovery::Unusable(why) => {
                let aside = dir.join(format!("damaged-{}", crate::wire::unix_ms()));
                std::fs::create_dir_all(&aside).map_err(io)?;
                for part in ["wal", "snap"] {
                    std::fs::rename(dir.join(part), aside.join(part)).map_err(io)?;
                    std::fs::create_dir_all(dir.join(part)).map_err(io)?;
                }
                error!(
                    dir = %dir.display(),
                    aside = %aside.display(),
                    "the data on disk cannot be verified ({why}); set aside, starting empty: this replica rejoins from its peers"
                );
                let report = RecoveryReport {
                    damage: Some(format!("unusable, set aside: {why}")),
                    ..Default::default()
                };
                (None, report)
            }
        };
        let data_id = if report.damage.as_deref().is_some_and(|d| d.starts_with("unusable")) {
            // Not the data it was: a new identity, so nobody counts on what it held.
            write_identity(dir, id).map_err(io)?
        } else {
            data_id
        };
        report.elapsed = started.elapsed();
        let segment = wal::segments(&dir.join("wal")).map_err(io)?.last().map_or(0, |(i, _)| *i) + 1;
        let snapshot_seq = recovered.as_ref().map_or(0, |r| r.checkpoint.seq);
        let log_end = recovered.as_ref().map_or(0, |r| r.checkpoint.seq + r.entries.len() as u64);
        if let Some(damage) = &report.damage {
            warn!(dir = %dir.display(), %damage, "recovered with damage");
        }
        if recovered.is_some() {
            info!(dir = %dir.display(), %durability, %report, "recovered from disk");
        }
        let recovery =
            if recovered.is_some() || report.damage.is_some() { report.to_string() } else { String::new() };
        let synced = watch::Sender::new(Synced { lsn: 0, log_end });
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            wal_dir: dir.join("wal"),
            snap_dir: dir.join("snap"),
            durability,
            file: None,
            synced: synced.clone(),
            last: Synced { lsn: 0, log_end },
            shutdown,
        };
        let path = dir.to_owned();
        let writer = std::thread::Builder::new()
            .name("tandem-wal".into())
            .spawn(move || writer.run(receiver, segment))
            .map_err(|source| StorageError::Io { dir: path, source })?;
        Ok((
            Self {
                dir: dir.to_owned(),
                durability,
                data_id,
                commands: Mutex::new(Some(sender)),
                writer: Mutex::new(Some(writer)),
                next_lsn: AtomicU64::new(0),
                segment: AtomicU64::new(segment),
                synced,
                bytes_since_snapshot: AtomicU64::new(0),
                snapshot_seq: AtomicU64::new(snapshot_seq),
                recovery,
            },
            recovered,
        ))
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn data_id(&self) -> &str {
        &self.data_id
    }

    /// What recovery found at start ("" for a new data directory).
    pub fn recovery(&self) -> &str {
        &self.recovery
    }

    pub fn snapshot_seq(&self) -> u64 {
        self.snapshot_seq.load(Ordering::Relaxed)
    }

    pub fn bytes_since_snapshot(&self) -> u64 {
        self.bytes_since_snapshot.load(Ordering::Relaxed)
    }

    /// The last hand-over number given out.
    pub fn handed_over(&self) -> u64 {
        self.next_lsn.load(Ordering::Relaxed)
    }

    pub fn synced(&self) -> watch::Receiver<Synced> {
        self.synced.subscribe()
    }

    fn send(&self, command: Command) {
        // The writer only stops when it failed, and then the replica is shutting down.
        if let Some(commands) = &*self.commands.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = commands.send(command);
        }
    }

    /// Hands the core's records to the writer, in order. Called under the node's lock.
    /// Returns the hand-over number to wait for (`wait_synced`), and a snapshot to write
    /// (`write_snapshot`) if one of them was a snapshot.
    pub fn write(&self, persist: Vec<Persist>) -> (u64, Option<(Checkpoint, u64)>) {
        let mut bytes = Vec::new();
        let mut log_end = None;
        let mut snapshot = None;
        let mut lsn = self.next_lsn.load(Ordering::Relaxed);
        for item in persist {
            match item {
                Persist::Entries { from, entries } => {
                    log_end = Some(from - 1 + entries.len() as u64);
                    wal::frame(
                        &Record { kind: Some(RecordKind::Entries(EntriesRecord { from, entries })) },
                        &mut bytes,
                    );
                }
                Persist::Meta { config, synced_epoch } => {
                    wal::frame(
                        &Record { kind: Some(RecordKind::Meta(MetaRecord { config, synced_epoch })) },
                        &mut bytes,
                    );
                }
                Persist::Snapshot { checkpoint, log_after } => {
                    if !bytes.is_empty() {
                        lsn += 1;
                        self.bytes_since_snapshot.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        self.send(Command::Append {
                            bytes: std::mem::take(&mut bytes),
                            lsn,
                            log_end: log_end.take(),
                        });
                    }
                    let segment = self.segment.fetch_add(1, Ordering::Relaxed) + 1;
                    let end = checkpoint.seq + log_after.len() as u64;
                    // The log after the snapshot, in records of a bounded size (a backup's
                    // log may be long), each continuing the one before.
                    let mut tail = Vec::new();
                    let mut from = checkpoint.seq + 1;
                    for chunk in log_after.chunks(TAIL_RECORD_ENTRIES) {
                        let entries = chunk.to_vec();
                        wal::frame(
                            &Record { kind: Some(RecordKind::Entries(EntriesRecord { from, entries })) },
                            &mut tail,
                        );
                        from += chunk.len() as u64;
                    }
                    lsn += 1;
                    self.bytes_since_snapshot.store(0, Ordering::Relaxed);
                    self.send(Command::Roll { segment, bytes: tail, lsn, log_end: end });
                    snapshot = Some((checkpoint, segment));
                }
            }
        }
        if !bytes.is_empty() {
            lsn += 1;
            self.bytes_since_snapshot.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.send(Command::Append { bytes, lsn, log_end });
        }
        self.next_lsn.store(lsn, Ordering::Relaxed);
        (lsn, snapshot)
    }

    /// Waits until hand-over `lsn` is on disk (with `fsync` durability; at once
    /// otherwise). Returns false if the writer stopped (the replica is shutting down).
    pub async fn wait_synced(&self, lsn: u64) -> bool {
        if self.durability != Durability::Fsync {
            return true;
        }
        let mut synced = self.synced.subscribe();
        synced.wait_for(|s| s.lsn >= lsn).await.is_ok()
    }

    /// Writes a snapshot of segment `segment` (off the async workers), then lets the
    /// writer drop what it replaces.
    pub async fn write_snapshot(&self, checkpoint: Checkpoint, segment: u64) -> std::io::Result<()> {
        let seq = checkpoint.seq;
        let target = snapshot::path(&self.dir.join("snap"), segment, seq);
        let started = Instant::now();
        tokio::task::spawn_blocking(move || snapshot::write(&target, checkpoint))
            .await
            .map_err(std::io::Error::other)??;
        self.snapshot_seq.fetch_max(seq, Ordering::Relaxed);
        info!(seq, segment, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot written");
        self.send(Command::Release { segment });
        Ok(())
    }
}

impl Drop for Storage {
    /// Whatever was handed over is written and synced before the files are let go (a
    /// directory is opened by one `Storage` at a time).
    fn drop(&mut self) {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

/// The thread that owns the files.
struct Writer {
    wal_dir: PathBuf,
    snap_dir: PathBuf,
    durability: Durability,
    file: Option<File>,
    synced: watch::Sender<Synced>,
    last: Synced,
    shutdown: CancellationToken,
}

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<Command>, first_segment: u64) {
        if let Err(error) = self.open_segment(first_segment) {
            return self.fail(&error);
        }
        let mut last_sync = Instant::now();
        let mut unsynced = false;
        loop {
            let wait = if unsynced {
                SYNC_INTERVAL.saturating_sub(last_sync.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            let first = match commands.recv_timeout(wait) {
                Ok(command) => Some(command),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.sync();
                    return;
                }
            };
            // Group commit: everything queued meanwhile goes with one sync.
            let batch: Vec<Command> = first.into_iter().chain(commands.try_iter()).collect();
            let mut pending = self.last;
            for command in batch {
                if let Err(error) = self.apply(command, &mut pending) {
                    return self.fail(&error);
                }
            }
            unsynced |= pending != self.last;
            let due = match self.durability {
                Durability::Fsync => unsynced,
                _ => unsynced && last_sync.elapsed() >= SYNC_INTERVAL,
            };
            if due {
                if let Err(error) = self.sync() {
                    return self.fail(&error);
                }
                last_sync = Instant::now();
                unsynced = false;
            }
            if pending != self.last && (due || self.durability != Durability::Fsync) {
                self.last = pending;
                self.synced.send_replace(pending);
            }
        }
    }

    fn apply(&mut self, command: Command, pending: &mut Synced) -> std::io::Result<()> {
        match command {
            Command::Append { bytes, lsn, log_end } => {
                self.append(&bytes)?;
                pending.lsn = lsn;
                if let Some(end) = log_end {
                    pending.log_end = end;
                }
            }
            Command::Roll { segment, bytes, lsn, log_end } => {
                self.sync()?;
                self.open_segment(segment)?;
                self.append(&bytes)?;
                *pending = Synced { lsn, log_end };
            }
            Command::Release { segment } => {
                // What replaces them must be on disk before they go.
                self.sync()?;
                for (index, path) in wal::segments(&self.wal_dir)? {
                    if index < segment {
                        std::fs::remove_file(path)?;
                    }
                }
                for (snapshot_segment, _, path) in snapshot::list(&self.snap_dir)? {
                    if snapshot_segment < segment {
                        std::fs::remove_file(path)?;
                    }
                }
                snapshot::sync_dir(&self.wal_dir)?;
                snapshot::sync_dir(&self.snap_dir)?;
            }
        }
        Ok(())
    }
}

impl Writer {
    /// Segments only begin at snapshots (`Roll`), so each holds about
    /// `SNAPSHOT_AFTER_BYTES`; a segment is never reopened for writing.
    fn open_segment(&mut self, segment: u64) -> std::io::Result<()> {
        let path = wal::segment_path(&self.wal_dir, segment);
        self.file = Some(OpenOptions::new().create_new(true).append(true).open(&path)?);
        snapshot::sync_dir(&self.wal_dir)
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(bytes),
            None => Err(std::io::Error::other("no open segment")),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// A write or a sync failed: what the disk holds is unknown, so nothing more may be
    /// acknowledged. The replica stops; restarted, it recovers what the disk kept.
    fn fail(&self, error: &std::io::Error) {
        error!(dir = %self.wal_dir.display(), %error, "the write-ahead log failed: stopping this replica (it recovers from its disk when restarted)");
        self.shutdown.cancel();
    }
}

/// `identity`: `replica_id data_id`, one line, written once.
fn read_identity(dir: &Path) -> std::io::Result<Option<(String, String)>> {
    match std::fs::read_to_string(dir.join("identity")) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            match (words.next(), words.next()) {
                (Some(id), Some(data_id)) => Ok(Some((id.to_owned(), data_id.to_owned()))),
                _ => Ok(None),
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn write_identity(dir: &Path, id: &str) -> std::io::Result<String> {
    let data_id = format!("{:016x}", rand::random::<u64>());
    let temporary = dir.join("identity.tmp");
    let mut file = File::create(&temporary)?;
    writeln!(file, "{id} {data_id}")?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join("identity"))?;
    snapshot::sync_dir(dir)?;
    Ok(data_id)
}

enum Recovery {
    /// Nothing was ever written (a new replica, or one that never had a state).
    Empty,
    Found(Box<(Recovered, RecoveryReport)>),
    /// Data is there, but no snapshot can be verified: nothing of it can be trusted.
    Unusable(String),
}

/// Loads the newest valid snapshot and replays the log after it. The replay stops at
/// the first damaged frame (the file is cut there, later segments removed) or at a gap
/// (records after a snapshot that was never written): what follows cannot be trusted.
fn recover(dir: &Path) -> std::io::Result<Recovery> {
    let snapshots = snapshot::list(&dir.join("snap"))?;
    let segments = wal::segments(&dir.join("wal"))?;
    let mut written = false;
    for (_, path) in &segments {
        written |= std::fs::metadata(path)?.len() > 0;
    }
    if snapshots.is_empty() && !written {
        // A replica that never had a state (it stopped before its first checkpoint)
        // leaves only empty segments: nothing to recover, nothing lost.
        for (_, path) in &segments {
            std::fs::remove_file(path)?;
        }
        return Ok(Recovery::Empty);
    }
    let mut refused = Vec::new();
    let mut found = None;
    for (segment, seq, path) in &snapshots {
        match snapshot::read(path) {
            Ok(checkpoint) if checkpoint.seq == *seq => {
                found = Some((*segment, checkpoint));
                break;
            }
            Ok(checkpoint) => {
                refused.push(format!("{}: holds seq {}, named {seq}", path.display(), checkpoint.seq))
            }
            Err(why) => refused.push(format!("{}: {why}", path.display())),
        }
    }
    let Some((first_segment, checkpoint)) = found else {
        if snapshots.is_empty() {
            return Ok(Recovery::Unusable("log segments without any snapshot".into()));
        }
        return Ok(Recovery::Unusable(refused.join("; ")));
    };
    let mut report = RecoveryReport { snapshot_seq: checkpoint.seq, ..Default::default() };
    if !refused.is_empty() {
        report.damage = Some(format!("newer snapshots refused: {}", refused.join("; ")));
    }
    let mut log = Log::recovered(checkpoint.seq, checkpoint.seq_epoch, Vec::new());
    let mut meta = MetaRecord::default();
    let mut stop: Option<String> = None;
    for (index, path) in segments.iter().filter(|(index, _)| *index >= first_segment) {
        if let Some(why) = &stop {
            // Past the damage: nothing here can be trusted.
            warn!(segment = %path.display(), %why, "removing a log segment after the damage");
            std::fs::remove_file(path)?;
            continue;
        }
        let read = wal::read(path)?;
        for record in read.records {
            report.records += 1;
            match record.kind {
                Some(RecordKind::Meta(record)) => meta = record,
                Some(RecordKind::Entries(record)) => {
                    let from = record.from;
                    if !log.replace_from(from, record.entries) {
                        stop = Some(format!(
                            "segment {index}: a gap before seq {from} (a snapshot that was never written)"
                        ));
                        break;
                    }
                }
                None => {}
            }
        }
        if let Some(damage) = read.damage.filter(|_| stop.is_none()) {
            let cut = std::fs::metadata(path)?.len() - read.valid_bytes;
            let what = match damage {
                wal::Damage::Torn => "a torn write".to_owned(),
                wal::Damage::Corrupt(why) => why,
            };
            stop = Some(format!("segment {index}: cut {cut} bytes at byte {} ({what})", read.valid_bytes));
            OpenOptions::new().write(true).open(path)?.set_len(read.valid_bytes)?;
        }
    }
    if let Some(why) = stop {
        report.damage = Some(match report.damage {
            Some(before) => format!("{before}; {why}"),
            None => why,
        });
    }
    log.take_written();
    report.last_seq = log.last_seq();
    let entries = log.after(checkpoint.seq).cloned().collect();
    let recovered = Recovered { checkpoint, entries, config: meta.config, synced_epoch: meta.synced_epoch };
    Ok(Recovery::Found(Box::new((recovered, report))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use crate::replication::Core;

    fn put(seq: u64, key: &str) -> pb::Entry {
        pb::Entry {
            seq,
            epoch: 1,
            client_id: "c".into(),
            request_id: seq,
            op: Some(pb::Operation {
                kind: Some(pb::operation::Kind::Put(pb::Put { key: key.into(), value: "v".into() })),
            }),
            ..Default::default()
        }
    }

    /// A bootstrapped core's data written through `Storage` as the node does it: the
    /// genesis snapshot, then `n` entries, each its own record.
    async fn write_group(dir: &Path, n: u64) {
        let shutdown = CancellationToken::new();
        let (storage, recovered) =
            Storage::open(dir, "r1", Durability::Fsync, shutdown.clone()).expect("open");
        assert!(recovered.is_none());
        let mut core = Core::new("r1", true);
        core.enable_persistence(true);
        let (_, snapshot) = storage.write(core.take_persist());
        let (checkpoint, segment) = snapshot.expect("the genesis snapshot");
        storage.write_snapshot(checkpoint, segment).await.expect("snapshot written");
        let mut lsn = 0;
        for seq in 1..=n {
            lsn = storage
                .write(vec![Persist::Entries { from: seq, entries: vec![put(seq, &format!("k{seq}"))] }])
                .0;
        }
        assert!(storage.wait_synced(lsn).await);
        shutdown.cancel();
    }

    fn open(dir: &Path) -> (Storage, Option<Recovered>) {
        Storage::open(dir, "r1", Durability::Fsync, CancellationToken::new()).expect("open")
    }

    fn last_segment(dir: &Path) -> PathBuf {
        wal::segments(&dir.join("wal")).expect("segments").last().expect("a segment").1.clone()
    }

    /// A joiner that stopped before its first checkpoint wrote nothing: it starts empty,
    /// under the same data id, and no damage is reported.
    #[tokio::test]
    async fn a_replica_that_never_had_a_state_restarts_empty_without_complaint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (storage, recovered) = open(dir.path());
        assert!(recovered.is_none());
        let data_id = storage.data_id().to_owned();
        drop(storage);
        let (storage, recovered) = open(dir.path());
        assert!(recovered.is_none());
        assert_eq!((storage.data_id(), storage.recovery()), (data_id.as_str(), ""));
    }

    #[tokio::test]
    async fn a_replica_recovers_its_log_and_keeps_its_data_id() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_group(dir.path(), 50).await;
        let data_id = read_identity(dir.path()).expect("readable").expect("written").1;
        let (storage, recovered) = open(dir.path());
        let recovered = recovered.expect("recovered");
        assert_eq!(recovered.entries.len(), 50);
        assert_eq!(storage.data_id(), data_id);
        assert!(storage.recovery().contains("log up to seq 50"), "{}", storage.recovery());
        // Another replica's directory is refused, not taken over.
        let other = Storage::open(dir.path(), "r2", Durability::Fsync, CancellationToken::new());
        assert!(matches!(other, Err(StorageError::OtherReplica { .. })));
    }

    /// Issue 10: a torn or corrupt tail is detected by the checksum and cut: the replica
    /// recovers every record before it, and nothing after.
    #[tokio::test]
    async fn a_truncated_or_corrupted_tail_is_cut_and_the_rest_recovered() {
        for corrupt in [false, true] {
            let dir = tempfile::tempdir().expect("temp dir");
            write_group(dir.path(), 50).await;
            let segment = last_segment(dir.path());
            let mut bytes = std::fs::read(&segment).expect("segment");
            let length = bytes.len();
            if corrupt {
                bytes[length - 10] ^= 0xff;
            } else {
                bytes.truncate(length - 10);
            }
            std::fs::write(&segment, &bytes).expect("damaged");
            let (storage, recovered) = open(dir.path());
            let recovered = recovered.expect("recovered");
            assert_eq!(recovered.entries.len(), 49, "every record before the damage, and no more");
            assert!(storage.recovery().contains("cut"), "{}", storage.recovery());
            // The cut is made on disk: the next recovery finds a clean log.
            drop(storage);
            let (storage, recovered) = open(dir.path());
            assert_eq!(recovered.expect("recovered").entries.len(), 49);
            assert!(!storage.recovery().contains("cut"), "{}", storage.recovery());
        }
    }

    /// A directory whose snapshots all fail their digest cannot be trusted at all: set
    /// aside, and the replica starts empty under a new data id (it rejoins from peers).
    #[tokio::test]
    async fn data_that_cannot_be_verified_is_set_aside_under_a_new_data_id() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_group(dir.path(), 5).await;
        let data_id = read_identity(dir.path()).expect("readable").expect("written").1;
        for (_, _, path) in snapshot::list(&dir.path().join("snap")).expect("snapshots") {
            std::fs::write(&path, b"TANDEMSNAP1\ngarbage").expect("damaged");
        }
        let (storage, recovered) = open(dir.path());
        assert!(recovered.is_none());
        assert_ne!(storage.data_id(), data_id, "not the data it was");
        assert!(storage.recovery().contains("unusable"), "{}", storage.recovery());
        let aside = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("damaged-"));
        assert!(aside, "the damaged data is kept aside for a post-mortem");
    }

    /// A long log after a snapshot is written as several records, and read back whole.
    #[tokio::test]
    async fn a_long_log_after_a_snapshot_is_written_in_bounded_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let (storage, _) =
            Storage::open(dir.path(), "r1", Durability::Fsync, shutdown.clone()).expect("open");
        let log: Vec<pb::Entry> = (1..=3 * TAIL_RECORD_ENTRIES as u64 + 7).map(|seq| put(seq, "k")).collect();
        let checkpoint = Checkpoint { seq: 0, seq_epoch: 0, state: Default::default() };
        let (lsn, due) = storage.write(vec![Persist::Snapshot { checkpoint, log_after: log.clone() }]);
        let (checkpoint, segment) = due.expect("a snapshot");
        storage.write_snapshot(checkpoint, segment).await.expect("snapshot");
        assert!(storage.wait_synced(lsn).await);
        let bytes = std::fs::read(wal::segment_path(&dir.path().join("wal"), segment)).expect("segment");
        assert_eq!(wal::parse(&bytes).records.len(), 4, "three full records and the rest");
        shutdown.cancel();
        drop(storage);
        let (_, recovered) = open(dir.path());
        assert_eq!(recovered.expect("recovered").entries, log);
    }

    /// `interval` durability: acknowledgements do not wait, and what was written is on
    /// disk within the interval.
    #[tokio::test]
    async fn interval_durability_syncs_within_the_interval() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let (storage, _) =
            Storage::open(dir.path(), "r1", Durability::Interval, shutdown.clone()).expect("open");
        let mut core = Core::new("r1", true);
        core.enable_persistence(false);
        assert_eq!(core.durable_seq(), u64::MAX, "a leader does not wait for the disk");
        let (_, snapshot) = storage.write(core.take_persist());
        let (checkpoint, segment) = snapshot.expect("genesis");
        storage.write_snapshot(checkpoint, segment).await.expect("snapshot");
        let lsn = storage.write(vec![Persist::Entries { from: 1, entries: vec![put(1, "k")] }]).0;
        assert!(storage.wait_synced(lsn).await, "returns at once");
        tokio::time::sleep(SYNC_INTERVAL * 3).await;
        shutdown.cancel();
        drop(storage);
        let (_, recovered) = open(dir.path());
        assert_eq!(recovered.expect("recovered").entries.len(), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// Whatever sequence of appends and suffix replacements a follower writes (and
        /// snapshots in between), recovery rebuilds exactly the log it had.
        #[test]
        fn recovery_rebuilds_the_log_that_was_written(
            steps in proptest::collection::vec((0u64..6, 1usize..5, proptest::bool::weighted(0.15)), 1..30)
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let dir = tempfile::tempdir().expect("temp dir");
                let shutdown = CancellationToken::new();
                let (storage, _) = Storage::open(dir.path(), "r1", Durability::Fsync, shutdown.clone()).expect("open");
                let mut core = Core::new("r1", true);
                core.enable_persistence(true);
                let (_, snapshot) = storage.write(core.take_persist());
                let (checkpoint, segment) = snapshot.expect("genesis");
                storage.write_snapshot(checkpoint, segment).await.expect("snapshot");
                // The model: the log as the follower holds it.
                let mut model: Vec<pb::Entry> = Vec::new();
                let mut epoch = 1;
                let mut lsn = 0;
                for (back, count, snapshot) in steps {
                    // Replace the last `back` entries (a new leader's suffix), append `count`.
                    let from = (model.len() as u64).saturating_sub(back) + 1;
                    model.truncate(from as usize - 1);
                    epoch += u64::from(back > 0);
                    let entries: Vec<pb::Entry> = (from..from + count as u64)
                        .map(|seq| pb::Entry { epoch, ..put(seq, &format!("k{seq}")) })
                        .collect();
                    model.extend(entries.clone());
                    lsn = storage.write(vec![Persist::Entries { from, entries }]).0;
                    if snapshot {
                        // The state stays the genesis one (a backup executes nothing): the
                        // segment it starts holds the whole log.
                        let checkpoint = crate::checkpoint::Checkpoint { seq: 0, seq_epoch: 0, state: Default::default() };
                        let (l, due) = storage.write(vec![Persist::Snapshot { checkpoint, log_after: model.clone() }]);
                        lsn = l;
                        let (checkpoint, segment) = due.expect("a snapshot");
                        storage.write_snapshot(checkpoint, segment).await.expect("snapshot");
                    }
                }
                assert!(storage.wait_synced(lsn).await);
                shutdown.cancel();
                drop(storage);
                let (_, recovered) = open(dir.path());
                let recovered = recovered.expect("recovered");
                assert_eq!(recovered.entries, model);
            });
        }
    }
}
