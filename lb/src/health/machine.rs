//! [`HealthMachine`]: consecutive probe results -> healthy/unhealthy, as a pure type.

use ferry_model::HealthCheck;

/// Threshold state machine of one endpoint's active health check.
///
/// Healthy: `unhealthy_threshold` consecutive failures make it unhealthy; a success resets the
/// count. Unhealthy: `healthy_threshold` consecutive successes make it healthy; a failure resets
/// the count. A threshold of 0 counts as 1.
///
/// Initial state: the caller decides. Ferry starts checks *healthy* (HAProxy's "up" start, not
/// Envoy's "unhealthy until the first pass"), so a reload or a new endpoint never blackholes
/// traffic while the first probes run; a dead endpoint is then marked down after
/// `unhealthy_threshold` probes, and passive health covers the gap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthMachine {
    healthy: bool,
    /// Consecutive results contradicting the current state.
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

// === impl HealthMachine ===

impl HealthMachine {
    /// A machine for `check`, starting `healthy` or not.
    pub fn new(check: &HealthCheck, healthy: bool) -> Self {
        Self::with_thresholds(check.healthy_threshold, check.unhealthy_threshold, healthy)
    }

    /// A machine with explicit thresholds.
    pub fn with_thresholds(healthy_threshold: u32, unhealthy_threshold: u32, healthy: bool) -> Self {
        Self {
            healthy,
            streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// The current state.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Feeds one probe result; returns the new state when it changed.
    pub fn observe(&mut self, success: bool) -> Option<bool> {
        if success == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = if self.healthy { self.unhealthy_threshold } else { self.healthy_threshold };
        if self.streak < threshold {
            return None;
        }
        self.healthy = success;
        self.streak = 0;
        Some(self.healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &mut HealthMachine, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&r| m.observe(r)).collect()
    }

    #[test]
    fn goes_down_after_unhealthy_threshold() {
        let mut m = HealthMachine::with_thresholds(2, 3, true);
        assert_eq!(run(&mut m, &[false, false]), [None, None]);
        assert!(m.is_healthy());
        assert_eq!(m.observe(false), Some(false));
        assert!(!m.is_healthy());
        assert_eq!(m.observe(false), None, "no repeated transition");
    }

    #[test]
    fn success_resets_failure_streak() {
        let mut m = HealthMachine::with_thresholds(2, 3, true);
        assert_eq!(run(&mut m, &[false, false, true, false, false]), [None; 5]);
        assert!(m.is_healthy());
    }

    #[test]
    fn comes_back_after_healthy_threshold() {
        let mut m = HealthMachine::with_thresholds(2, 1, true);
        assert_eq!(m.observe(false), Some(false));
        assert_eq!(run(&mut m, &[true, false, true]), [None; 3], "failure resets the success streak");
        assert_eq!(m.observe(true), Some(true));
        assert!(m.is_healthy());
    }

    #[test]
    fn zero_thresholds_count_as_one_and_initial_state_is_kept() {
        let mut m = HealthMachine::with_thresholds(0, 0, false);
        assert!(!m.is_healthy());
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(true), Some(true));
        assert_eq!(m.observe(false), Some(false));
    }
}
