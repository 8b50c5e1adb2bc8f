//! Injectable wall clock and the two time formats kube-proxy's health servers emit.
//!
//! - [`rfc3339_nano`]: Go's `time.Time` JSON encoding (`time.RFC3339Nano`, trailing zeros of the
//!   fraction dropped), in UTC, as kube-proxy prints it when its `TZ` is UTC.
//! - [`http_date`]: the `Date` header Go's `net/http` adds (`Mon, 02 Jan 2006 15:04:05 GMT`).
//!
//! Times before the Unix epoch are clamped to it; a clock never returns them in practice.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A source of wall-clock time; tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    nanos: AtomicU64,
}

// === impl ManualClock ===

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { nanos: AtomicU64::new(unix_nanos(start)) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(by, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}

/// Nanoseconds since the Unix epoch (0 for earlier times, saturating far in the future).
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Go's JSON encoding of the zero `time.Time`.
pub(crate) const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `t` as Go's `time.RFC3339Nano` in UTC: `2024-05-01T10:20:30.5Z` (jiff's timestamp display has
/// the same shape: fraction only when non-zero, trailing zeros trimmed).
pub fn rfc3339_nano(t: SystemTime) -> String {
    timestamp(t).to_string()
}

/// `t` as an HTTP date (RFC 7231 IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    jiff::fmt::strtime::format("%a, %d %b %Y %H:%M:%S GMT", timestamp(t)).unwrap_or_default()
}

/// `t` as a jiff timestamp; times before 1970 or beyond jiff's range (never produced by a clock
/// in practice) become the epoch.
fn timestamp(t: SystemTime) -> jiff::Timestamp {
    jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_go() {
        // 2006-01-02T15:04:05Z, Go's reference time in UTC.
        let t = UNIX_EPOCH + Duration::from_secs(1_136_214_245);
        assert_eq!(rfc3339_nano(t), "2006-01-02T15:04:05Z");
        assert_eq!(http_date(t), "Mon, 02 Jan 2006 15:04:05 GMT");
        assert_eq!(rfc3339_nano(t + Duration::from_nanos(500_000_000)), "2006-01-02T15:04:05.5Z");
        assert_eq!(rfc3339_nano(t + Duration::from_nanos(123_456_789)), "2006-01-02T15:04:05.123456789Z");
        assert_eq!(rfc3339_nano(t + Duration::from_nanos(1_000)), "2006-01-02T15:04:05.000001Z");
        // RFC 7231's example and a leap day.
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(rfc3339_nano(UNIX_EPOCH + Duration::from_secs(1_709_164_800)), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now(), start + Duration::from_millis(1_500));
    }
}
