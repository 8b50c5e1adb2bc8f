//! [`ProxyHealth`]: kube-proxy's staleness rule for `/healthz`, `/livez` and the
//! `serviceProxyHealthy` field of every `healthCheckNodePort` answer.
//!
//! Per IP family the tracker keeps the time of the last applied sync (`lastUpdated`) and of the
//! oldest change queued since then. A family is unhealthy while a queued change is older than
//! the health timeout (2 × sync period, as `cmd/kube-proxy` sets it). A family that never synced
//! is left out of the report and counts as healthy (kube-proxy's startup rule); [`ProxyHealth::new`]
//! records the start as a sync, as kube-proxy's runner does before it handles any event.
//!
//! Writers: the wiring calls [`queued`](ProxyHealth::queued) when a new snapshot arrives and
//! [`updated`](ProxyHealth::updated) once the data plane applied it, and
//! [`set_node_eligible`](ProxyHealth::set_node_eligible) from the snapshot's node status. Readers:
//! the health servers, on every request. All state is atomics: no lock on the request path.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferry_model::Snapshot;

use super::clock::{Clock, GO_ZERO_TIME, SystemClock, rfc3339_nano, unix_nanos};

/// kube-proxy's default `--sync-period`; the health timeout is twice this.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// An IP family, spelled as Kubernetes spells `v1.IPFamily` (`IPv4`, `IPv6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// `IPv4`.
    V4,
    /// `IPv6`.
    V6,
}

impl IpFamily {
    /// Both families, in the order kube-proxy's JSON lists them.
    pub const ALL: [Self; 2] = [Self::V4, Self::V6];

    /// `IPv4` or `IPv6`: the JSON key and the `ip_family` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The family of `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn of(ip: std::net::IpAddr) -> Self {
        if ip.to_canonical().is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }
}

/// Sync bookkeeping of one family. 0 means "never" / "nothing queued".
#[derive(Debug, Default)]
struct FamilyState {
    enabled: bool,
    last_updated: AtomicU64,
    oldest_queued: AtomicU64,
}

/// The proxy's own health, shared by the health servers.
pub struct ProxyHealth {
    clock: Arc<dyn Clock>,
    timeout: Duration,
    families: [FamilyState; 2],
    node_eligible: AtomicBool,
}

impl std::fmt::Debug for ProxyHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHealth")
            .field("timeout", &self.timeout)
            .field("families", &self.families)
            .field("node_eligible", &self.node_eligible)
            .finish_non_exhaustive()
    }
}

/// One family's entry of the report (`status.IPv4` in kube-proxy's JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyHealth {
    /// The family.
    pub family: IpFamily,
    /// When its last sync was applied.
    pub last_updated: SystemTime,
    /// Whether no queued change is overdue.
    pub healthy: bool,
}

/// What `/healthz` and `/livez` report (kube-proxy's `ProxyHealth` struct).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// The most recent `last_updated` of any family (`None`: never synced, Go's zero time).
    pub last_updated: Option<SystemTime>,
    /// The time of the report.
    pub current_time: SystemTime,
    /// Whether every family is healthy.
    pub healthy: bool,
    /// Families that synced at least once, IPv4 first.
    pub status: Vec<FamilyHealth>,
}

// === impl ProxyHealth ===

impl ProxyHealth {
    /// A tracker for `families` with health timeout 2 × `sync_period`, on the system clock.
    pub fn new(families: &[IpFamily], sync_period: Duration) -> Self {
        Self::with_clock(families, sync_period, Arc::new(SystemClock))
    }

    /// Like [`new`](Self::new) with an injected clock (tests).
    pub fn with_clock(families: &[IpFamily], sync_period: Duration, clock: Arc<dyn Clock>) -> Self {
        let now = unix_nanos(clock.now()).max(1);
        let mut states: [FamilyState; 2] = Default::default();
        for f in families {
            let state = &mut states[f.index()];
            state.enabled = true;
            *state.last_updated.get_mut() = now;
        }
        Self {
            clock,
            timeout: sync_period.saturating_mul(2),
            families: states,
            node_eligible: AtomicBool::new(false),
        }
    }

    /// The health timeout (2 × sync period).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The clock this tracker reads.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// A change arrived for every tracked family that the data plane has not applied yet.
    pub fn queued(&self) {
        for f in IpFamily::ALL {
            self.queued_family(f);
        }
    }

    /// The data plane applied everything queued so far, for every tracked family.
    pub fn updated(&self) {
        for f in IpFamily::ALL {
            self.updated_family(f);
        }
    }

    /// kube-proxy's `QueuedUpdate(family)`: remembers the oldest unapplied change.
    pub fn queued_family(&self, family: IpFamily) {
        let state = &self.families[family.index()];
        if state.enabled {
            let now = self.now_nanos();
            let _ = state.oldest_queued.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// kube-proxy's `Updated(family)`: clears the queue and records the sync time.
    pub fn updated_family(&self, family: IpFamily) {
        let state = &self.families[family.index()];
        if state.enabled {
            state.oldest_queued.store(0, Ordering::Release);
            state.last_updated.store(self.now_nanos(), Ordering::Release);
        }
    }

    /// Sets kube-proxy's "node eligible" (not being deleted, not tainted
    /// `ToBeDeletedByClusterAutoscaler`). Starts `false`, as kube-proxy without a Node object.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Release);
    }

    /// Takes eligibility from `snapshot.node_status` (no status: not eligible).
    pub fn observe_node(&self, snapshot: &Snapshot) {
        self.set_node_eligible(snapshot.node_status.as_ref().is_some_and(|s| s.eligible));
    }

    /// Whether the node is eligible for load-balancer traffic.
    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Acquire)
    }

    /// Whether no family has an overdue change (what `serviceProxyHealthy` reports).
    pub fn is_healthy(&self) -> bool {
        self.report().healthy
    }

    /// The current report (kube-proxy's `Health()`).
    pub fn report(&self) -> HealthReport {
        let now = self.now_nanos();
        let mut report =
            HealthReport { last_updated: None, current_time: at(now), healthy: true, status: Vec::new() };
        let mut latest = 0;
        for f in IpFamily::ALL {
            let state = &self.families[f.index()];
            let last = state.last_updated.load(Ordering::Acquire);
            if !state.enabled || last == 0 {
                continue;
            }
            latest = latest.max(last);
            let queued = state.oldest_queued.load(Ordering::Acquire);
            let overdue = queued != 0 && Duration::from_nanos(now.saturating_sub(queued)) >= self.timeout;
            report.healthy &= !overdue;
            report.status.push(FamilyHealth { family: f, last_updated: at(last), healthy: !overdue });
        }
        report.last_updated = (latest != 0).then(|| at(latest));
        report
    }

    fn now_nanos(&self) -> u64 {
        // 0 is the "never" sentinel; a clock at the epoch itself reads 1 ns later.
        unix_nanos(self.clock.now()).max(1)
    }
}

fn at(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

// === impl HealthReport ===

impl HealthReport {
    /// Go's `json.Marshal` of kube-proxy's `ProxyHealth`: `nodeEligible` only when given
    /// (`/healthz`), `status` omitted when empty.
    pub fn to_json(&self, node_eligible: Option<bool>) -> String {
        let mut out = String::with_capacity(256);
        let last = self.last_updated.map_or_else(|| GO_ZERO_TIME.to_owned(), rfc3339_nano);
        let _ =
            write!(out, r#"{{"lastUpdated":"{last}","currentTime":"{}""#, rfc3339_nano(self.current_time));
        if let Some(eligible) = node_eligible {
            let _ = write!(out, r#","nodeEligible":{eligible}"#);
        }
        let _ = write!(out, r#","healthy":{}"#, self.healthy);
        if !self.status.is_empty() {
            out.push_str(r#","status":{"#);
            for (i, s) in self.status.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(
                    out,
                    r#""{}":{{"lastUpdated":"{}","healthy":{}}}"#,
                    s.family.as_str(),
                    rfc3339_nano(s.last_updated),
                    s.healthy
                );
            }
            out.push('}');
        }
        out.push('}');
        out
    }
}
