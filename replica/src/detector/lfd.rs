//! The Local Fault Detector's decision: from the outcome of each heartbeat to its
//! replica, is the replica alive, ready, or dead? Pure: the runner (service.rs) probes
//! with grpc.health.v1 and feeds the outcomes in.

use std::time::Duration;

/// LFD settings; both can change while it runs (pushed by the GFD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LfdSettings {
    /// How often the replica is probed (default 100 ms).
    pub heartbeat_interval: Duration,
    /// Probes without an answer before the replica counts as dead (default 3).
    pub failure_threshold: u32,
}

impl Default for LfdSettings {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_millis(100), failure_threshold: 3 }
    }
}

/// The outcome of one heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Answered SERVING.
    Serving,
    /// Answered, but not SERVING: alive, not ready.
    NotServing,
    /// No answer within the timeout: slow or hung (a slow replica and a dead one look
    /// alike, so only `failure_threshold` of these in a row mean dead).
    TimedOut,
    /// Connection refused or the call failed: the process is gone; counts at once.
    Failed(String),
}

/// What the LFD reports to the GFD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub alive: bool,
    pub ready: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct LfdCore {
    misses: u32,
    last: Option<Verdict>,
}

impl LfdCore {
    /// Takes one heartbeat outcome; returns a verdict when it differs from the last one
    /// reported (the first success is always reported).
    pub fn observe(&mut self, probe: Probe, failure_threshold: u32) -> Option<Verdict> {
        let verdict = match probe {
            Probe::Serving => {
                self.misses = 0;
                Verdict { alive: true, ready: true, reason: "heartbeat answered SERVING".into() }
            }
            Probe::NotServing => {
                self.misses = 0;
                Verdict { alive: true, ready: false, reason: "heartbeat answered NOT_SERVING".into() }
            }
            Probe::TimedOut => {
                self.misses += 1;
                if self.misses < failure_threshold.max(1) {
                    return None;
                }
                Verdict {
                    alive: false,
                    ready: false,
                    reason: format!("{} heartbeats in a row unanswered", self.misses),
                }
            }
            Probe::Failed(error) => {
                self.misses = failure_threshold;
                Verdict { alive: false, ready: false, reason: format!("heartbeat failed: {error}") }
            }
        };
        let changed =
            self.last.as_ref().is_none_or(|last| (last.alive, last.ready) != (verdict.alive, verdict.ready));
        if !changed {
            return None;
        }
        // Before the first success, a failure has nothing to report: the replica was
        // never seen alive (it may still be starting).
        if self.last.is_none() && !verdict.alive {
            return None;
        }
        self.last = Some(verdict.clone());
        Some(verdict)
    }

    /// The last verdict reported, to repeat after reconnecting to a GFD.
    pub fn last(&self) -> Option<&Verdict> {
        self.last.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_success_reports_alive_then_only_changes_are_reported() {
        let mut lfd = LfdCore::default();
        assert_eq!(lfd.observe(Probe::TimedOut, 3), None, "never seen alive: nothing to report");
        assert_eq!(lfd.observe(Probe::NotServing, 3).map(|v| (v.alive, v.ready)), Some((true, false)));
        assert_eq!(lfd.observe(Probe::NotServing, 3), None);
        assert_eq!(lfd.observe(Probe::Serving, 3).map(|v| (v.alive, v.ready)), Some((true, true)));
        assert_eq!(lfd.observe(Probe::Serving, 3), None);
    }

    #[test]
    fn a_hang_needs_threshold_misses_but_a_refused_connection_counts_at_once() {
        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 3);
        assert_eq!(lfd.observe(Probe::TimedOut, 3), None);
        assert_eq!(lfd.observe(Probe::TimedOut, 3), None);
        let dead = lfd.observe(Probe::TimedOut, 3).expect("third miss is death");
        assert!(!dead.alive && dead.reason.contains("3 heartbeats"), "{dead:?}");

        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 3);
        let dead = lfd.observe(Probe::Failed("connection refused".into()), 3).expect("refused is death");
        assert!(!dead.alive && dead.reason.contains("connection refused"));
    }

    #[test]
    fn an_answer_resets_the_misses() {
        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 3);
        for _ in 0..10 {
            assert_eq!(lfd.observe(Probe::TimedOut, 3), None);
            assert_eq!(lfd.observe(Probe::TimedOut, 3), None);
            assert_eq!(lfd.observe(Probe::Serving, 3), None, "slow is not dead");
        }
    }

    proptest! {
        /// Death is declared exactly when `threshold` timeouts follow each other, or at
        /// a failed call, once the replica was seen alive; and recovery is reported.
        #[test]
        fn verdicts_follow_the_rules(probes in prop::collection::vec(0u8..4, 0..200), threshold in 1u32..6) {
            let mut lfd = LfdCore::default();
            let (mut seen, mut alive, mut run) = (false, false, 0u32);
            for p in probes {
                let probe = match p { 0 => Probe::Serving, 1 => Probe::NotServing, 2 => Probe::TimedOut, _ => Probe::Failed("x".into()) };
                let expected_alive = match probe {
                    Probe::Serving | Probe::NotServing => { run = 0; true }
                    Probe::TimedOut => { run += 1; if run >= threshold { false } else { alive } }
                    Probe::Failed(_) => { run = threshold; false }
                };
                let verdict = lfd.observe(probe.clone(), threshold);
                if !seen && !expected_alive {
                    prop_assert_eq!(verdict, None);
                    continue;
                }
                if let Some(v) = &verdict {
                    prop_assert_eq!(v.alive, expected_alive);
                }
                if seen && expected_alive != alive {
                    prop_assert!(verdict.is_some(), "a change went unreported");
                }
                seen = true;
                alive = lfd.last().is_some_and(|v| v.alive);
                prop_assert_eq!(alive, expected_alive);
            }
        }
    }
}
