//! The replicated log: ordered entries past the last checkpoint. Both replication modes
//! keep one. A follower accepts a leader's entries only where they continue what it
//! already holds (the entry before them has the same sequence number and epoch), and
//! replaces a suffix left behind by a deposed leader. Pure data structure, no I/O.

use std::collections::VecDeque;

use prost::Message;

use crate::pb::Entry;

#[derive(Debug, Clone, Default)]
pub struct Log {
    /// Everything up to `base_seq` is covered by the local checkpoint (or is nothing, at 0).
    base_seq: u64,
    base_epoch: u64,
    /// Entries `base_seq + 1 ..= last_seq()`, contiguous.
    entries: VecDeque<Entry>,
    /// The lowest sequence number appended or replaced since `take_written`: what the
    /// write-ahead log must write again from.
    written_from: Option<u64>,
}

/// The outcome of offering a leader's entries to a follower's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Appended (or already present): the log agrees with the leader's up to `through`.
    /// (It may hold older, unmatched entries after that; they are replaced once the
    /// leader sends those sequence numbers.)
    Matched { through: u64 },
    /// The entry before them is missing or from another epoch: the leader must back up.
    Mismatch { last_seq: u64 },
}

impl Log {
    /// An empty log whose checkpoint covers everything up to `seq`.
    pub fn starting_at(seq: u64, seq_epoch: u64) -> Self {
        Self { base_seq: seq, base_epoch: seq_epoch, entries: VecDeque::new(), written_from: None }
    }

    /// A log recovered from disk: `entries` follow `seq`, contiguous.
    pub fn recovered(seq: u64, seq_epoch: u64, entries: Vec<Entry>) -> Self {
        let mut log = Self::starting_at(seq, seq_epoch);
        for entry in entries {
            log.push(entry);
        }
        log.written_from = None;
        log
    }

    /// The lowest sequence number appended or replaced since the last call: from there
    /// to the end, the log differs from what was last written out.
    pub fn take_written(&mut self) -> Option<u64> {
        self.written_from.take()
    }

    /// Whether entries from some sequence number on were not yet taken for writing.
    pub fn unwritten_from(&self) -> Option<u64> {
        self.written_from
    }

    fn mark_written(&mut self, seq: u64) {
        self.written_from = Some(self.written_from.map_or(seq, |from| from.min(seq)));
    }

    pub fn base_seq(&self) -> u64 {
        self.base_seq
    }

    pub fn last_seq(&self) -> u64 {
        self.base_seq + self.entries.len() as u64
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The epoch of the entry at `seq`, when the log still knows it.
    pub fn epoch_at(&self, seq: u64) -> Option<u64> {
        if seq == self.base_seq {
            return Some(self.base_epoch);
        }
        self.get(seq).map(|entry| entry.epoch)
    }

    pub fn get(&self, seq: u64) -> Option<&Entry> {
        let index = seq.checked_sub(self.base_seq + 1)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    /// Entries after `seq` that are not yet executed, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &Entry> {
        let skip = seq.saturating_sub(self.base_seq);
        self.entries.iter().skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// Leader side: appends a newly ordered entry. Its seq must be `last_seq() + 1`.
    pub fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.seq, self.last_seq() + 1, "log entries must be contiguous");
        self.mark_written(entry.seq);
        self.entries.push_back(entry);
    }

    /// Leader side: up to `max_entries` entries (and roughly `max_bytes`) starting at
    /// `from`, or `None` when `from` is already folded into the checkpoint.
    pub fn slice(&self, from: u64, max_entries: usize, max_bytes: usize) -> Option<Vec<Entry>> {
        if from <= self.base_seq {
            return None;
        }
        let mut bytes = 0;
        let batch = self
            .after(from - 1)
            .take(max_entries)
            .take_while(|entry| {
                let fits = bytes == 0 || bytes + entry.encoded_len() <= max_bytes;
                bytes += entry.encoded_len();
                fits
            })
            .cloned()
            .collect();
        Some(batch)
    }

    /// Follower side: accepts `entries` that follow (`prev_seq`, `prev_epoch`) in the
    /// leader's log. Entries already present are kept; a conflicting suffix (another
    /// epoch at the same seq) is dropped and replaced. Anything at or below the base is
    /// covered by the checkpoint, which only ever holds committed entries.
    pub fn accept(&mut self, prev_seq: u64, prev_epoch: u64, entries: &[Entry]) -> Accepted {
        let last_seq = self.last_seq();
        if prev_seq > last_seq {
            return Accepted::Mismatch { last_seq };
        }
        if prev_seq > self.base_seq && self.epoch_at(prev_seq) != Some(prev_epoch) {
            return Accepted::Mismatch { last_seq: prev_seq - 1 };
        }
        let mut through = prev_seq.max(self.base_seq);
        for entry in entries {
            if entry.seq <= self.base_seq {
                continue;
            }
            match self.epoch_at(entry.seq) {
                Some(epoch) if epoch == entry.epoch => {
                    through = entry.seq;
                    continue;
                }
                Some(_) => self.truncate_from(entry.seq),
                None => {}
            }
            if entry.seq != self.last_seq() + 1 {
                // A gap: the leader skipped something we lack. Keep what we have.
                break;
            }
            self.mark_written(entry.seq);
            self.entries.push_back(entry.clone());
            through = entry.seq;
        }
        Accepted::Matched { through }
    }

    /// Recovery from the write-ahead log: from `from` on, the log is `entries`. False
    /// when `from` lies beyond the log's end, or the entries are not contiguous (the
    /// records after a snapshot that was never written).
    pub fn replace_from(&mut self, from: u64, entries: Vec<Entry>) -> bool {
        if from > self.last_seq() + 1 {
            return false;
        }
        if from <= self.last_seq() {
            self.truncate_from(from.max(self.base_seq + 1));
        }
        for entry in entries.into_iter().filter(|e| e.seq > self.base_seq) {
            if entry.seq != self.last_seq() + 1 {
                return false;
            }
            self.entries.push_back(entry);
        }
        true
    }

    /// Drops `seq` and everything after it.
    fn truncate_from(&mut self, seq: u64) {
        let keep = seq.saturating_sub(self.base_seq + 1);
        self.mark_written(seq);
        self.entries.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    /// Folds everything up to `seq` into the checkpoint: the log then starts after it.
    /// If the log ends before `seq`, it becomes empty with its base at `seq`.
    pub fn compact_to(&mut self, seq: u64, seq_epoch: u64) {
        if seq <= self.base_seq {
            return;
        }
        if seq >= self.last_seq() {
            self.entries.clear();
        } else {
            let drop = usize::try_from(seq - self.base_seq).unwrap_or(usize::MAX);
            self.entries.drain(..drop);
        }
        self.base_seq = seq;
        self.base_epoch = seq_epoch;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, epoch: u64) -> Entry {
        Entry { seq, epoch, client_id: "c".into(), request_id: seq, op: None, ..Entry::default() }
    }

    fn log_of(epochs: &[u64]) -> Log {
        let mut log = Log::default();
        for (i, epoch) in epochs.iter().enumerate() {
            log.push(entry(i as u64 + 1, *epoch));
        }
        log
    }

    #[test]
    fn follower_refuses_entries_after_a_gap() {
        let mut log = log_of(&[1, 1]);
        assert_eq!(log.accept(5, 1, &[entry(6, 1)]), Accepted::Mismatch { last_seq: 2 });
        assert_eq!(log.last_seq(), 2);
    }

    #[test]
    fn new_leader_replaces_the_suffix_of_a_deposed_one() {
        // Entries 3 and 4 of epoch 1 never committed; epoch 2's leader ordered 3 itself.
        let mut log = log_of(&[1, 1, 1, 1]);
        assert_eq!(log.accept(2, 1, &[entry(3, 2)]), Accepted::Matched { through: 3 });
        assert_eq!(log.epoch_at(3), Some(2));
        assert_eq!(log.get(4), None);
    }

    #[test]
    fn prev_entry_from_another_epoch_is_a_mismatch() {
        let mut log = log_of(&[1, 1, 1]);
        assert_eq!(log.accept(3, 2, &[entry(4, 2)]), Accepted::Mismatch { last_seq: 2 });
    }

    #[test]
    fn compaction_keeps_the_entries_after_the_checkpoint() {
        let mut log = log_of(&[1, 1, 1, 2, 2]);
        log.compact_to(3, 1);
        assert_eq!((log.base_seq(), log.last_seq(), log.len()), (3, 5, 2));
        assert_eq!(log.slice(3, 10, usize::MAX), None, "seq 3 is in the checkpoint");
        assert_eq!(log.slice(4, 10, usize::MAX).map(|s| s.len()), Some(2));
        // Entries the checkpoint covers are skipped, the rest continue the log.
        assert_eq!(
            log.accept(1, 1, &[entry(2, 1), entry(3, 1), entry(4, 2), entry(5, 2), entry(6, 2)]),
            Accepted::Matched { through: 6 }
        );
        log.compact_to(10, 3);
        assert_eq!((log.base_seq(), log.last_seq(), log.epoch_at(10)), (10, 10, Some(3)));
    }

    proptest! {
        /// Whatever the follower held, after accepting a leader's whole log it holds
        /// exactly the leader's log (the log matching property).
        #[test]
        fn follower_converges_to_the_leader(
            leader in prop::collection::vec(prop::sample::select(vec![2u64, 4, 6]), 0..12),
            shared in 0usize..12,
            stale in prop::collection::vec(prop::sample::select(vec![3u64, 5, 7]), 0..8),
        ) {
            // Realistic logs: the follower shares a prefix with the leader, then holds
            // entries of deposed leaders (odd epochs), which the leader never had.
            let mut leader_epochs = leader;
            leader_epochs.sort_unstable();
            let shared = shared.min(leader_epochs.len());
            let floor = shared.checked_sub(1).map_or(0, |i| leader_epochs[i]);
            let mut stale: Vec<u64> = stale.into_iter().filter(|&e| e > floor).collect();
            stale.sort_unstable();
            let follower_epochs: Vec<u64> = leader_epochs[..shared].iter().copied().chain(stale).collect();
            let leader_log = log_of(&leader_epochs);
            let mut log = log_of(&follower_epochs);
            // The leader backs up one entry per mismatch, as the replication loop does.
            let mut next = leader_log.last_seq() + 1;
            loop {
                let prev = next - 1;
                let prev_epoch = leader_log.epoch_at(prev).unwrap_or(0);
                let batch = leader_log.slice(next, usize::MAX, usize::MAX).unwrap_or_default();
                match log.accept(prev, prev_epoch, &batch) {
                    Accepted::Matched { .. } => break,
                    Accepted::Mismatch { last_seq } => next = next.min(last_seq + 1).min(prev).max(1),
                }
            }
            // The leader's entries are all present and in place (a stale suffix beyond
            // the leader's end may remain until the leader reaches those seqs).
            for seq in 1..=leader_log.last_seq() {
                prop_assert_eq!(log.epoch_at(seq), leader_log.epoch_at(seq));
            }
        }
    }
}
