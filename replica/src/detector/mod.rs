//! Fault detection: the Local Fault Detector beside each replica and the Global Fault
//! Detector that keeps the membership. `lfd` and `gfd` decide; `service` does the I/O;
//! `limits` says which heartbeat settings can work at all.

pub mod gfd;
pub mod lfd;
pub mod service;

/// The heartbeat settings every component accepts (RM spec, CRD, GFD, LFD, CLI): one
/// rule, so a setting the machine cannot keep is refused up front with the reason,
/// rather than obeyed into a collapse of the membership.
pub mod limits {
    pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
    /// Faster heartbeats (5 ms on 9 replicas was tried) starve the detectors' own
    /// processes on a small machine, and every member is lost at once.
    pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 20;
    pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 60_000;
    pub const MAX_FAILURE_THRESHOLD: u32 = 100;
    /// interval x threshold: below this, scheduling noise alone reads as death.
    pub const MIN_DETECTION_WINDOW_MS: u64 = 100;

    /// Heartbeat settings that cannot work, and why.
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
    }

    /// Why a heartbeat interval and failure threshold cannot work, if they cannot.
    pub fn check(heartbeat_interval_ms: u64, failure_threshold: u32) -> Result<(), Unworkable> {
        if !(MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS).contains(&heartbeat_interval_ms) {
            return Err(Unworkable::Interval(heartbeat_interval_ms));
        }
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
    }
}
