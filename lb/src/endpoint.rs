//! [`EndpointState`]: the runtime state of one endpoint, and passive health.
//!
//! Writers:
//! - the data plane, through [`Lease`](crate::Lease) (active connection count) and
//!   [`EndpointState::report_connect_success`] / [`EndpointState::report_connect_failure`]
//!   (passive health);
//! - the data plane, through [`EndpointState::send_early`] / [`EndpointState::report_early_send`]
//!   (whether connects complete at once);
//! - the active health checker ([`crate::health`]), through [`EndpointState::set_healthy`];
//! - [`Pool::new`](crate::Pool::new), which writes the passive-health configuration.
//!
//! Readers: [`Pool::pick`](crate::Pool::pick) (hot path) and the admin dump ([`EndpointState::health`]).
//!
//! Everything is a relaxed atomic: no lock, no allocation. The fields are independent counters and
//! flags; a reader may see a slightly stale combination, which only ever means one connection goes
//! to an endpoint that was ejected a moment ago (and its failure is reported again).
//!
//! Passive health (outlier detection): every failed upstream connect increments a consecutive
//! failure count; a successful connect resets it. When the count reaches
//! [`PassiveHealth::consecutive_failures`] the endpoint is ejected (not picked) for
//! [`PassiveHealth::ejection`]. After that it is picked again *half-open*: the count is still at
//! the threshold, so one more failure ejects it again right away, while one success resets it.
//! A threshold of 0 disables ejection.
//!
//! Connects that complete at once: to an endpoint on the same host, `connect(2)` usually returns
//! with the handshake already done, so the proxy can send the client's first bytes right away
//! instead of waiting for the writable event (one event-loop round trip less, and the backend
//! sees its new connection and the request together). To a remote endpoint that send would only
//! fail with `EAGAIN`, so each endpoint remembers how its last such send went, and after a failure
//! tries again only every [`EARLY_SEND_PROBE`]th connect.
//!
//! Time is injectable: every time-dependent method has an `_at(now: Instant)` variant that tests
//! drive with synthetic instants. Instants are stored as nanoseconds since a process-wide epoch
//! that is fixed no later than the first [`EndpointState::new`], so an `Instant` taken after any
//! endpoint state was created maps exactly.

use std::{
    net::SocketAddr,
    sync::{
        OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_model::PassiveHealth;

/// Process-wide reference point for instants stored in atomics.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// `now` as nanoseconds since [`EPOCH`], at least 1 (0 means "not set"), saturating.
fn to_nanos(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Bit 0 of [`EndpointState::health`]: healthy.
const HEALTHY_BIT: u64 = 1;
/// One step of the generation in the upper bits of [`EndpointState::health`].
const GENERATION_ONE: u64 = 2;

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Runtime state of one endpoint, shared by every pool that contains it.
///
/// A [`Pool`](crate::Pool) built with a `previous` pool reuses the previous state of endpoints
/// that stay, so counters, health and ejections survive configuration changes.
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// Connections currently open through Ferry (leases alive).
    active: AtomicU32,
    /// Result of active health checking (bit 0, set when healthy or unchecked) and the
    /// generation of the probe allowed to write it (the other bits); see [`Self::claim_check`].
    health: AtomicU64,
    /// Consecutive failed connects since the last success.
    failures: AtomicU32,
    /// Ejected until this instant ([`to_nanos`]); 0 when never ejected.
    ejected_until: AtomicU64,
    /// Times this endpoint was ejected.
    ejections: AtomicU64,
    /// [`PassiveHealth::consecutive_failures`].
    eject_after: AtomicU32,
    /// [`PassiveHealth::ejection`] in nanoseconds.
    ejection_nanos: AtomicU64,
    /// 0 while connects complete at once (see the module docs); else connects since the last
    /// early send that found the handshake unfinished.
    slow_connects: AtomicU32,
}

/// After an early send found the handshake unfinished, every how many connects to try again.
pub const EARLY_SEND_PROBE: u32 = 64;

/// A point-in-time view of an endpoint's health, for the admin dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// Result of active health checking (`true` when no check is configured).
    pub healthy: bool,
    /// Whether passive health has ejected the endpoint right now.
    pub ejected: bool,
    /// Connections currently open through Ferry.
    pub active_connections: u32,
    /// Consecutive failed connects since the last success.
    pub consecutive_failures: u32,
    /// How often the endpoint was ejected since its state was created.
    pub ejections: u64,
}

impl EndpointHealth {
    /// Whether the endpoint may be picked: healthy and not ejected.
    pub fn is_available(&self) -> bool {
        self.healthy && !self.ejected
    }
}

// === impl EndpointState ===

impl EndpointState {
    /// A fresh, healthy endpoint with no connections, with the default passive-health settings.
    pub fn new(addr: SocketAddr) -> Self {
        let _ = epoch();
        let passive = PassiveHealth::default();
        Self {
            addr,
            active: AtomicU32::new(0),
            health: AtomicU64::new(HEALTHY_BIT),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            eject_after: AtomicU32::new(passive.consecutive_failures),
            ejection_nanos: AtomicU64::new(duration_nanos(passive.ejection)),
            slow_connects: AtomicU32::new(0),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections currently open to this endpoint through Ferry.
    pub fn active_connections(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the endpoint may be picked now: healthy (active checks) and not ejected (passive).
    pub fn is_available(&self) -> bool {
        if !self.is_healthy() {
            return false;
        }
        // Fast path: never ejected, no clock read.
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= to_nanos(Instant::now())
    }

    /// [`Self::is_available`] at `now`.
    pub fn is_available_at(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_ejected_at(now)
    }

    /// Whether passive health has ejected the endpoint at `now`.
    pub fn is_ejected_at(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > to_nanos(now)
    }

    /// Result of active health checking (`true` when no check is configured).
    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::Relaxed) & HEALTHY_BIT != 0
    }

    /// Sets the active-check result, whoever owns the check. Normally written by the health
    /// checker only (with generation fencing); this is for tests and manual overrides.
    pub fn set_healthy(&self, healthy: bool) {
        let bit = if healthy { HEALTHY_BIT } else { 0 };
        let _ =
            self.health.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w & !HEALTHY_BIT | bit));
    }

    /// Makes the caller the only active-check writer: returns a generation that
    /// [`Self::set_healthy_as`] needs; every earlier generation's writes are refused from now on.
    /// Keeps the current health.
    pub(crate) fn claim_check(&self) -> u64 {
        let old = self
            .health
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w.wrapping_add(GENERATION_ONE)))
            .unwrap_or_else(|w| w);
        (old.wrapping_add(GENERATION_ONE)) & !HEALTHY_BIT
    }

    /// Sets the active-check result if `generation` (from [`Self::claim_check`]) still owns the
    /// check. Returns `false` when a newer claim superseded it (the write is dropped), so a probe
    /// task that is being replaced can never overwrite its successor's or a reset's result.
    pub(crate) fn set_healthy_as(&self, generation: u64, healthy: bool) -> bool {
        let bit = if healthy { HEALTHY_BIT } else { 0 };
        self.health
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                (w & !HEALTHY_BIT == generation).then_some(generation | bit)
            })
            .is_ok()
    }

    /// Ends active checking: supersedes every probe's generation and marks the endpoint healthy
    /// (unchecked endpoints are healthy).
    pub(crate) fn release_check(&self) {
        let _ = self.health.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some((w & !HEALTHY_BIT).wrapping_add(GENERATION_ONE) | HEALTHY_BIT)
        });
    }

    /// Sets the passive-health configuration (written by [`Pool::new`](crate::Pool::new)).
    pub fn configure_passive(&self, passive: PassiveHealth) {
        self.eject_after.store(passive.consecutive_failures, Ordering::Relaxed);
        self.ejection_nanos.store(duration_nanos(passive.ejection), Ordering::Relaxed);
    }

    /// Whether to send the client's first bytes as soon as `connect(2)` returns (see the module
    /// docs): yes while connects to this endpoint complete at once, and on every
    /// [`EARLY_SEND_PROBE`]th connect after one did not.
    pub fn send_early(&self) -> bool {
        // No write on the common path: a local endpoint stays at 0.
        self.slow_connects.load(Ordering::Relaxed) == 0
            || self.slow_connects.fetch_add(1, Ordering::Relaxed).is_multiple_of(EARLY_SEND_PROBE)
    }

    /// Records how an early send went: `complete` when the handshake was done (the send was
    /// accepted), not when it found the connect still in progress.
    pub fn report_early_send(&self, complete: bool) {
        let slow = self.slow_connects.load(Ordering::Relaxed);
        if complete && slow != 0 {
            self.slow_connects.store(0, Ordering::Relaxed);
        } else if !complete && slow == 0 {
            self.slow_connects.store(1, Ordering::Relaxed);
        }
    }

    /// Records a successful upstream connect: resets the consecutive-failure count (and so ends
    /// a half-open period).
    pub fn report_connect_success(&self) {
        // Avoid dirtying the cache line on the common all-good path.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed upstream connect (passive health); may eject the endpoint.
    pub fn report_connect_failure(&self) {
        if self.report_connect_failure_at(Instant::now()) {
            tracing::warn!(
                endpoint = %self.addr,
                failures = self.failures.load(Ordering::Relaxed),
                "endpoint ejected after consecutive connect failures"
            );
        }
    }

    /// [`Self::report_connect_failure`] at `now`. Returns whether this failure ejected the
    /// endpoint (it was not ejected before).
    pub fn report_connect_failure_at(&self, now: Instant) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let threshold = self.eject_after.load(Ordering::Relaxed);
        if threshold == 0 || failures < threshold {
            return false;
        }
        let now = to_nanos(now);
        let until = now.saturating_add(self.ejection_nanos.load(Ordering::Relaxed));
        let current = self.ejected_until.load(Ordering::Relaxed);
        if current != 0 && current > now {
            // Already ejected: failures of connects started before the ejection do not extend it.
            return false;
        }
        // Only one of several concurrent failures wins the ejection.
        let ejected =
            self.ejected_until.compare_exchange(current, until, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        if ejected {
            self.ejections.fetch_add(1, Ordering::Relaxed);
        }
        ejected
    }

    /// A point-in-time view for the admin dump.
    pub fn health(&self) -> EndpointHealth {
        self.health_at(Instant::now())
    }

    /// [`Self::health`] at `now`.
    pub fn health_at(&self, now: Instant) -> EndpointHealth {
        EndpointHealth {
            healthy: self.is_healthy(),
            ejected: self.is_ejected_at(now),
            active_connections: self.active_connections(),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
        }
    }

    /// Counts one more active connection (a new [`Lease`](crate::Lease)).
    pub(crate) fn acquire(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one fewer active connection (a dropped [`Lease`](crate::Lease)).
    pub(crate) fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(threshold: u32, ejection: Duration) -> EndpointState {
        let s = EndpointState::new("127.0.0.1:80".parse().expect("addr"));
        s.configure_passive(PassiveHealth { consecutive_failures: threshold, ejection });
        s
    }

    /// Early sends go on while connects complete at once; after one that did not, only every
    /// `EARLY_SEND_PROBE`th connect tries, and a probe that finds the connect complete restores
    /// them all.
    #[test]
    fn early_send_backs_off_and_probes() {
        let s = state(3, Duration::from_secs(10));
        assert!((0..10).all(|_| s.send_early()), "a new endpoint is assumed local");
        s.report_early_send(true);
        assert!(s.send_early());
        s.report_early_send(false);
        let tries: Vec<usize> = (0..3 * EARLY_SEND_PROBE as usize).filter(|_| s.send_early()).collect();
        assert_eq!(tries.len(), 3, "one probe per {EARLY_SEND_PROBE} connects: {tries:?}");
        s.report_early_send(false);
        assert!(!s.send_early(), "a failed probe keeps backing off");
        s.report_early_send(true);
        assert!((0..10).all(|_| s.send_early()), "a probe that succeeded restores early sends");
    }

    #[test]
    fn ejects_after_consecutive_failures_then_half_open() {
        let s = state(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!s.report_connect_failure_at(t0));
        assert!(!s.report_connect_failure_at(t0));
        assert!(s.is_available_at(t0));
        assert!(s.report_connect_failure_at(t0), "third failure ejects");
        assert!(!s.is_available_at(t0));
        assert!(!s.is_available_at(t0 + Duration::from_millis(9_999)));
        let h = s.health_at(t0 + Duration::from_secs(5));
        assert!(h.ejected && h.healthy && !h.is_available());
        assert_eq!((h.consecutive_failures, h.ejections), (3, 1));

        // Ejection over: available again, half-open.
        let t1 = t0 + Duration::from_secs(10);
        assert!(s.is_available_at(t1));
        // One failure re-ejects.
        assert!(s.report_connect_failure_at(t1));
        assert!(!s.is_available_at(t1 + Duration::from_secs(1)));
        assert_eq!(s.health_at(t1).ejections, 2);

        // After the second ejection, one success resets: two more failures do not eject.
        let t2 = t1 + Duration::from_secs(10);
        assert!(s.is_available_at(t2));
        s.report_connect_success();
        assert_eq!(s.health_at(t2).consecutive_failures, 0);
        assert!(!s.report_connect_failure_at(t2));
        assert!(!s.report_connect_failure_at(t2));
        assert!(s.is_available_at(t2));
    }

    #[test]
    fn failures_while_ejected_do_not_extend() {
        let s = state(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(s.report_connect_failure_at(t0));
        assert!(!s.report_connect_failure_at(t0 + Duration::from_secs(5)));
        assert!(s.is_available_at(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn success_resets_count() {
        let s = state(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!s.report_connect_failure_at(t0));
        s.report_connect_success();
        assert!(!s.report_connect_failure_at(t0));
        assert!(s.is_available_at(t0));
    }

    #[test]
    fn zero_threshold_disables_ejection() {
        let s = state(0, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(!s.report_connect_failure_at(t0));
        }
        assert!(s.is_available_at(t0));
        assert_eq!(s.health_at(t0).consecutive_failures, 100);
    }

    #[test]
    fn available_needs_healthy_and_not_ejected() {
        let s = state(1, Duration::from_secs(60));
        assert!(s.is_available());
        s.set_healthy(false);
        assert!(!s.is_available());
        s.set_healthy(true);
        assert!(s.is_available());
        s.report_connect_failure();
        assert!(!s.is_available(), "ejected for a minute");
        assert!(s.health().ejected);
    }

    #[test]
    fn check_generations_fence_stale_writers() {
        let s = state(3, Duration::from_secs(1));
        let g1 = s.claim_check();
        assert!(s.set_healthy_as(g1, false));
        assert!(!s.is_healthy());
        let g2 = s.claim_check();
        assert!(!s.is_healthy(), "a claim keeps the current health");
        assert!(!s.set_healthy_as(g1, true), "superseded");
        assert!(!s.is_healthy());
        assert!(s.set_healthy_as(g2, true));
        assert!(s.set_healthy_as(g2, false));
        s.release_check();
        assert!(s.is_healthy(), "released: unchecked endpoints are healthy");
        assert!(!s.set_healthy_as(g2, false));
        assert!(s.is_healthy());
    }

    #[test]
    fn default_passive_is_three_failures() {
        let s = EndpointState::new("127.0.0.1:80".parse().expect("addr"));
        let t0 = Instant::now();
        assert!(!s.report_connect_failure_at(t0));
        assert!(!s.report_connect_failure_at(t0));
        assert!(s.report_connect_failure_at(t0));
    }
}
