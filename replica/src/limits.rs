//! The bounds of every setting a component accepts (RM spec, CRD, GFD, LFD, replica,
//! CLI flags, run-time updates): one rule per setting, so a value the system cannot
//! keep is refused up front with the allowed range, rather than obeyed into a collapse
//! (of the membership, of the group's throughput) or an overflow.

pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Faster heartbeats (5 ms on 9 replicas was tried) starve the detectors' own
/// processes on a small machine, and every member is lost at once.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 20;
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 60_000;
pub const MAX_FAILURE_THRESHOLD: u32 = 100;
/// interval x threshold: below this, scheduling noise alone reads as death.
pub const MIN_DETECTION_WINDOW_MS: u64 = 100;

/// Passive mode's checkpoint period (0: off). Faster, checkpoints crowd out requests;
/// slower than an hour, a backup's log grows for too long between them.
pub const MIN_CHECKPOINT_INTERVAL_MS: u64 = 50;
pub const MAX_CHECKPOINT_INTERVAL_MS: u64 = 3_600_000;
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 2_000;

/// The most replicas a group may have (the CRD's schema says the same): every write waits
/// for every member, and the RM's pushes and the detectors' heartbeats grow with them.
pub const MAX_REPLICAS: u32 = 9;

/// Settings that cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unworkable {
    #[error(
        "heartbeat interval {0} ms is outside {MIN_HEARTBEAT_INTERVAL_MS}..{MAX_HEARTBEAT_INTERVAL_MS} ms"
    )]
    Interval(u64),
    #[error("failure threshold {0} is outside 1..{MAX_FAILURE_THRESHOLD}")]
    Threshold(u32),
    #[error(
        "heartbeat interval x failure threshold is {0} ms; it must be at least {MIN_DETECTION_WINDOW_MS} ms, or a busy machine's scheduling delays read as failures (raise either)"
    )]
    Window(u64),
    #[error(
        "checkpoint interval {0} ms is outside {MIN_CHECKPOINT_INTERVAL_MS}..{MAX_CHECKPOINT_INTERVAL_MS} ms (0 turns checkpoints off)"
    )]
    CheckpointInterval(u64),
    #[error("replicas must be 1..{MAX_REPLICAS}, got {0}")]
    Replicas(u32),
}

/// Whether a checkpoint interval can work (0: off).
pub fn check_checkpoint_interval(ms: u64) -> Result<(), Unworkable> {
    if ms != 0 && !(MIN_CHECKPOINT_INTERVAL_MS..=MAX_CHECKPOINT_INTERVAL_MS).contains(&ms) {
        return Err(Unworkable::CheckpointInterval(ms));
    }
    Ok(())
}

/// Whether a group may have this many replicas.
pub fn check_replicas(replicas: u32) -> Result<(), Unworkable> {
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(Unworkable::Replicas(replicas));
    }
    Ok(())
}

/// Whether a heartbeat interval alone can work (the GFD's, as an LFD learns it).
pub fn check_interval(ms: u64) -> Result<(), Unworkable> {
    if !(MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS).contains(&ms) {
        return Err(Unworkable::Interval(ms));
    }
    Ok(())
}

/// Why a heartbeat interval and failure threshold cannot work, if they cannot.
pub fn check(heartbeat_interval_ms: u64, failure_threshold: u32) -> Result<(), Unworkable> {
    check_interval(heartbeat_interval_ms)?;
    if !(1..=MAX_FAILURE_THRESHOLD).contains(&failure_threshold) {
        return Err(Unworkable::Threshold(failure_threshold));
    }
    let window = heartbeat_interval_ms * u64::from(failure_threshold);
    if window < MIN_DETECTION_WINDOW_MS {
        return Err(Unworkable::Window(window));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_machine_cannot_keep_are_refused_with_the_reason() {
        assert!(check(100, 3).is_ok());
        assert!(check(20, 5).is_ok());
        assert!(check(5, 3).expect_err("5 ms").to_string().contains("outside 20..60000"));
        assert!(check(20, 3).expect_err("60 ms window").to_string().contains("at least 100 ms"));
        assert_eq!(check(100, 0), Err(Unworkable::Threshold(0)));
        assert_eq!(check(100, 101), Err(Unworkable::Threshold(101)));
        assert_eq!(check(60_001, 1), Err(Unworkable::Interval(60_001)));
    }

    #[test]
    fn checkpoint_intervals_and_group_sizes_outside_their_ranges_are_refused() {
        for ok in [0, MIN_CHECKPOINT_INTERVAL_MS, DEFAULT_CHECKPOINT_INTERVAL_MS, MAX_CHECKPOINT_INTERVAL_MS]
        {
            assert_eq!(check_checkpoint_interval(ok), Ok(()));
        }
        for bad in [1, MIN_CHECKPOINT_INTERVAL_MS - 1, MAX_CHECKPOINT_INTERVAL_MS + 1, u64::MAX] {
            let refused = check_checkpoint_interval(bad).expect_err("out of range");
            assert!(refused.to_string().contains("50..3600000"), "{refused}");
        }
        assert!((1..=MAX_REPLICAS).all(|n| check_replicas(n).is_ok()));
        assert!(check_replicas(0).expect_err("0").to_string().contains("1..9"));
        assert_eq!(check_replicas(10), Err(Unworkable::Replicas(10)));
    }
}
