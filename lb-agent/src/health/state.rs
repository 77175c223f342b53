//! The rise/fall state machine of one target: pure bookkeeping, no I/O.
//!
//! A target starts up. It goes down after `fall` consecutive failures and comes
//! back up after `rise` consecutive successes; a single result of the other kind
//! resets the streak.

use std::time::Duration;

use super::Status;

/// Health state of one target, updated after every completed check.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TargetState {
    /// Current verdict.
    pub up: bool,
    /// Completed checks.
    pub checks: u64,
    /// Completed checks that failed.
    pub failures: u64,
    /// Outcome of the last check ("status 200", "connect refused", ...).
    pub last_reason: String,
    /// Duration of the last check.
    pub last_latency: Duration,
    /// Current streak of successes.
    pub consecutive_ok: u32,
    /// Current streak of failures.
    pub consecutive_fail: u32,
}

impl TargetState {
    /// A target not checked yet: up, so that a serving backend stays in until there
    /// is evidence against it.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            up: true,
            checks: 0,
            failures: 0,
            last_reason: reason.into(),
            last_latency: Duration::ZERO,
            consecutive_ok: 0,
            consecutive_fail: 0,
        }
    }

    /// Records one completed check; returns the new verdict when it changed.
    ///
    /// `rise` and `fall` below 1 count as 1.
    pub fn record(
        &mut self,
        ok: bool,
        reason: String,
        latency: Duration,
        rise: u32,
        fall: u32,
    ) -> Option<bool> {
        self.checks = self.checks.saturating_add(1);
        self.last_reason = reason;
        self.last_latency = latency;
        if ok {
            self.consecutive_ok = self.consecutive_ok.saturating_add(1);
            self.consecutive_fail = 0;
            if !self.up && self.consecutive_ok >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.consecutive_fail = self.consecutive_fail.saturating_add(1);
            self.consecutive_ok = 0;
            if self.up && self.consecutive_fail >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    /// Forgets the current streaks (the check changed), keeping the verdict and totals.
    pub fn reset_streaks(&mut self) {
        self.consecutive_ok = 0;
        self.consecutive_fail = 0;
    }

    /// The public view.
    pub fn status(&self) -> Status {
        Status {
            up: self.up,
            checks: self.checks,
            failures: self.failures,
            last_reason: self.last_reason.clone(),
            last_latency_ms: self.last_latency.as_secs_f64() * 1000.0,
            consecutive_ok: self.consecutive_ok,
            consecutive_fail: self.consecutive_fail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run(state: &mut TargetState, results: &[bool], rise: u32, fall: u32) -> Vec<Option<bool>> {
        results
            .iter()
            .map(|&ok| state.record(ok, String::new(), MS, rise, fall))
            .collect()
    }

    #[test]
    fn starts_up() {
        let s = TargetState::new("");
        assert!(s.up);
        assert_eq!(s.checks, 0);
    }

    #[test]
    fn goes_down_after_fall_failures() {
        let mut s = TargetState::new("");
        assert_eq!(run(&mut s, &[false, false], 2, 3), [None, None]);
        assert!(s.up);
        assert_eq!(run(&mut s, &[false], 2, 3), [Some(false)]);
        assert!(!s.up);
        // Further failures are no new transition.
        assert_eq!(run(&mut s, &[false], 2, 3), [None]);
        assert_eq!((s.checks, s.failures, s.consecutive_fail), (4, 4, 4));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut s = TargetState::new("");
        assert_eq!(
            run(&mut s, &[false, false, true, false, false], 2, 3),
            [None; 5]
        );
        assert!(s.up);
        assert_eq!(s.consecutive_fail, 2);
    }

    #[test]
    fn comes_up_after_rise_successes() {
        let mut s = TargetState::new("");
        run(&mut s, &[false], 2, 1);
        assert!(!s.up);
        assert_eq!(run(&mut s, &[true, false, true], 2, 1), [None; 3]);
        assert_eq!(run(&mut s, &[true], 2, 1), [Some(true)]);
        assert!(s.up);
        assert_eq!(s.status().consecutive_ok, 2);
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let mut s = TargetState::new("");
        assert_eq!(run(&mut s, &[false, true], 0, 0), [Some(false), Some(true)]);
    }

    #[test]
    fn status_reports_the_last_check() {
        let mut s = TargetState::new("");
        s.record(
            false,
            "connect refused".into(),
            Duration::from_micros(1500),
            1,
            5,
        );
        s.reset_streaks();
        let st = s.status();
        assert_eq!(st.last_reason, "connect refused");
        assert!((st.last_latency_ms - 1.5).abs() < 1e-9);
        assert_eq!((st.checks, st.failures, st.consecutive_fail), (1, 1, 0));
    }
}
