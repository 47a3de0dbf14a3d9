//! The Local Fault Detector's decision: from the answers of its heartbeats to the
//! replica and the passing of time, is the replica alive, ready, or dead? Pure: the
//! runner (service.rs) probes with grpc.health.v1 every heartbeat interval and feeds
//! answers and ticks in, with the time (unix milliseconds).
//!
//! A refused connection or a failed call means dead at once. A hang means dead once no
//! heartbeat has been answered for `failure_threshold` intervals. A gap between ticks
//! longer than two intervals means the LFD itself did not run (paused, starved of CPU):
//! it could not have heard an answer then, so the window starts afresh instead of
//! blaming the replica for the detector's own stall.

use std::time::Duration;

use super::limits;

/// LFD settings; both can change while it runs (pushed by the GFD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LfdSettings {
    /// How often the replica is probed (default 100 ms).
    pub heartbeat_interval: Duration,
    /// Intervals without an answer before the replica counts as dead (default 3).
    pub failure_threshold: u32,
}

impl Default for LfdSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(limits::DEFAULT_HEARTBEAT_INTERVAL_MS),
            failure_threshold: limits::DEFAULT_FAILURE_THRESHOLD,
        }
    }
}

impl LfdSettings {
    /// How long without an answer means dead.
    pub fn detection_window_ms(&self) -> u64 {
        self.heartbeat_interval.as_millis() as u64 * u64::from(self.failure_threshold.max(1))
    }
}

/// The answer to one heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Answered SERVING.
    Serving,
    /// Answered, but not SERVING: alive, not ready.
    NotServing,
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
    /// When a heartbeat was last answered (or the window last started afresh).
    last_answer_ms: Option<u64>,
    last_tick_ms: Option<u64>,
    last: Option<Verdict>,
}

impl LfdCore {
    /// A heartbeat's answer arrived at `now`. Returns a verdict when it differs from
    /// the last one reported (the first answer is always reported).
    pub fn observe(&mut self, probe: Probe, now: u64) -> Option<Verdict> {
        let verdict = match probe {
            Probe::Serving => {
                self.last_answer_ms = Some(now);
                Verdict { alive: true, ready: true, reason: "heartbeat answered SERVING".into() }
            }
            Probe::NotServing => {
                self.last_answer_ms = Some(now);
                Verdict { alive: true, ready: false, reason: "heartbeat answered NOT_SERVING".into() }
            }
            Probe::Failed(error) => {
                Verdict { alive: false, ready: false, reason: format!("heartbeat failed: {error}") }
            }
        };
        self.report(verdict)
    }

    /// Time passes. Returns the death verdict once no heartbeat has been answered for
    /// the detection window (and this LFD ran all along).
    pub fn tick(&mut self, now: u64, settings: &LfdSettings) -> Option<Verdict> {
        let interval = settings.heartbeat_interval.as_millis() as u64;
        let stalled = self.last_tick_ms.is_some_and(|last| now.saturating_sub(last) > 2 * interval.max(1));
        self.last_tick_ms = Some(now);
        let last_answer = self.last_answer_ms?;
        if stalled {
            // This detector did not run for a while: it heard nothing, proves nothing.
            self.last_answer_ms = Some(now.max(last_answer));
            return None;
        }
        let silent = now.saturating_sub(last_answer);
        if silent < settings.detection_window_ms() {
            return None;
        }
        self.report(Verdict {
            alive: false,
            ready: false,
            reason: format!(
                "no heartbeat answered for {silent} ms ({} intervals)",
                settings.failure_threshold
            ),
        })
    }

    fn report(&mut self, verdict: Verdict) -> Option<Verdict> {
        let changed =
            self.last.as_ref().is_none_or(|last| (last.alive, last.ready) != (verdict.alive, verdict.ready));
        // Before the first answer, a failure has nothing to report: the replica was
        // never seen alive (it may still be starting).
        if !changed || (self.last.is_none() && !verdict.alive) {
            return None;
        }
        if !verdict.alive {
            // Dead until it answers again: a new window starts with that answer.
            self.last_answer_ms = None;
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

    const EVERY_100MS_3: LfdSettings =
        LfdSettings { heartbeat_interval: Duration::from_millis(100), failure_threshold: 3 };

    #[test]
    fn first_answer_reports_alive_then_only_changes_are_reported() {
        let mut lfd = LfdCore::default();
        assert_eq!(lfd.tick(1_000, &EVERY_100MS_3), None, "never seen alive: nothing to report");
        assert_eq!(lfd.observe(Probe::Failed("refused".into()), 1_050), None, "still starting");
        assert_eq!(lfd.observe(Probe::NotServing, 1_100).map(|v| (v.alive, v.ready)), Some((true, false)));
        assert_eq!(lfd.observe(Probe::NotServing, 1_200), None);
        assert_eq!(lfd.observe(Probe::Serving, 1_300).map(|v| (v.alive, v.ready)), Some((true, true)));
        assert_eq!(lfd.observe(Probe::Serving, 1_400), None);
    }

    #[test]
    fn a_hang_is_death_after_the_window_but_a_refused_connection_at_once() {
        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 0);
        for now in [100, 200] {
            assert_eq!(lfd.tick(now, &EVERY_100MS_3), None);
        }
        let dead = lfd.tick(300, &EVERY_100MS_3).expect("300 ms without an answer is death");
        assert!(!dead.alive && dead.reason.contains("300 ms"), "{dead:?}");
        assert_eq!(lfd.tick(400, &EVERY_100MS_3), None, "reported once");
        assert!(lfd.observe(Probe::Serving, 450).is_some_and(|v| v.alive), "back");

        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 0);
        let dead = lfd.observe(Probe::Failed("connection refused".into()), 10).expect("refused is death");
        assert!(!dead.alive && dead.reason.contains("connection refused"));
    }

    #[test]
    fn a_late_answer_is_still_an_answer() {
        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 0);
        for round in 0..10u64 {
            let base = round * 250;
            assert_eq!(lfd.tick(base + 100, &EVERY_100MS_3), None);
            assert_eq!(lfd.tick(base + 200, &EVERY_100MS_3), None);
            assert_eq!(lfd.observe(Probe::Serving, base + 250), None, "slow is not dead");
        }
    }

    #[test]
    fn the_detector_pausing_itself_does_not_kill_its_replica() {
        let mut lfd = LfdCore::default();
        lfd.observe(Probe::Serving, 0);
        lfd.tick(100, &EVERY_100MS_3);
        // SIGSTOP of the LFD for 3 s: the next tick comes late, and nothing was heard.
        assert_eq!(lfd.tick(3_100, &EVERY_100MS_3), None, "the detector's stall is no evidence");
        assert_eq!(lfd.tick(3_200, &EVERY_100MS_3), None);
        assert_eq!(lfd.observe(Probe::Serving, 3_210), None, "still alive, nothing to report");
        // A replica that really hangs is still found after the window.
        assert_eq!(lfd.tick(3_310, &EVERY_100MS_3), None);
        assert_eq!(lfd.tick(3_410, &EVERY_100MS_3), None);
        assert!(lfd.tick(3_510, &EVERY_100MS_3).is_some_and(|v| !v.alive));
    }

    proptest! {
        /// Ticks every interval, answers (or none) in between: death is declared exactly
        /// when the silence since the last answer reaches the window, or at a failed
        /// call, once the replica was seen alive; and recovery is reported.
        #[test]
        fn verdicts_follow_the_rules(answers in prop::collection::vec(0u8..4, 0..200), threshold in 1u32..6) {
            let settings = LfdSettings { heartbeat_interval: Duration::from_millis(100), failure_threshold: threshold };
            let mut lfd = LfdCore::default();
            let (mut seen_alive, mut last_answer, mut alive) = (false, 0u64, false);
            for (step, answer) in answers.into_iter().enumerate() {
                let now = (step as u64 + 1) * 100;
                let heard = match answer {
                    0 => lfd.observe(Probe::Serving, now),
                    1 => lfd.observe(Probe::NotServing, now),
                    2 => lfd.observe(Probe::Failed("x".into()), now),
                    _ => None,
                };
                let ticked = lfd.tick(now, &settings);
                let expected_alive = match answer {
                    0 | 1 => { last_answer = now; true }
                    2 => false,
                    _ => alive && now - last_answer < settings.detection_window_ms(),
                };
                let verdicts: Vec<Verdict> = heard.into_iter().chain(ticked).collect();
                if !seen_alive && !expected_alive {
                    prop_assert!(verdicts.is_empty(), "{verdicts:?} before the replica was ever seen");
                    continue;
                }
                if let Some(v) = verdicts.last() {
                    prop_assert_eq!(v.alive, expected_alive);
                }
                if seen_alive && expected_alive != alive {
                    prop_assert!(!verdicts.is_empty(), "a change went unreported");
                }
                seen_alive = true;
                alive = lfd.last().is_some_and(|v| v.alive);
                prop_assert_eq!(alive, expected_alive);
            }
        }
    }
}
