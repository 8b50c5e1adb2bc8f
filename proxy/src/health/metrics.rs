//! kube-proxy's metrics (`pkg/proxy/metrics/metrics.go`): the same names, help strings, labels
//! and histogram buckets, so dashboards and the network-programming-latency SLO keep working.
//!
//! Labels follow current releases: `ip_family` (`IPv4`/`IPv6`) on the sync, timestamp,
//! network-programming and no-local-endpoints series; none on the change counters; `code` on the
//! health counters. Ferry programs both families in one step, so a sync is recorded once per
//! family the node serves.
//!
//! The binary calls [`describe`] once after installing the recorder and passes
//! [`histogram_buckets`] to `PrometheusBuilder::set_buckets_for_metric`. The wiring holds one
//! [`KubeProxyMetrics`] (all handles created up front) and calls its methods.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_model::{Frontend, Origin, Service, ServicePort, Snapshot, TrafficPolicy};
use imbl::ordmap::DiffItem;
use metrics::{Counter, Gauge, Histogram};

use super::proxy::IpFamily;

/// `kubeproxy_sync_proxy_rules_duration_seconds` (histogram, `ip_family`).
pub const SYNC_PROXY_RULES_DURATION_SECONDS: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
/// `kubeproxy_sync_proxy_rules_last_timestamp_seconds` (gauge, `ip_family`).
pub const SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
/// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds` (gauge, `ip_family`).
pub const SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS: &str =
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
/// `kubeproxy_network_programming_duration_seconds` (histogram, `ip_family`).
pub const NETWORK_PROGRAMMING_DURATION_SECONDS: &str = "kubeproxy_network_programming_duration_seconds";
/// `kubeproxy_sync_proxy_rules_endpoint_changes_pending` (gauge).
pub const ENDPOINT_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
/// `kubeproxy_sync_proxy_rules_endpoint_changes_total` (counter).
pub const ENDPOINT_CHANGES_TOTAL: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
/// `kubeproxy_sync_proxy_rules_service_changes_pending` (gauge).
pub const SERVICE_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_service_changes_pending";
/// `kubeproxy_sync_proxy_rules_service_changes_total` (counter).
pub const SERVICE_CHANGES_TOTAL: &str = "kubeproxy_sync_proxy_rules_service_changes_total";
/// `kubeproxy_sync_proxy_rules_no_local_endpoints_total` (a *gauge* despite the name;
/// `ip_family`, `traffic_policy` = `internal` | `external`).
pub const NO_LOCAL_ENDPOINTS_TOTAL: &str = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
/// `kubeproxy_proxy_healthz_total` (counter, `code`).
pub const PROXY_HEALTHZ_TOTAL: &str = "kubeproxy_proxy_healthz_total";
/// `kubeproxy_proxy_livez_total` (counter, `code`).
pub const PROXY_LIVEZ_TOTAL: &str = "kubeproxy_proxy_livez_total";

/// Registers kube-proxy's help strings with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(SYNC_PROXY_RULES_DURATION_SECONDS, "SyncProxyRules latency in seconds");
    describe_gauge!(
        SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS,
        "The last time proxy rules were successfully synced"
    );
    describe_gauge!(
        SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS,
        "The last time a sync of proxy rules was queued"
    );
    describe_histogram!(
        NETWORK_PROGRAMMING_DURATION_SECONDS,
        "In Cluster Network Programming Latency in seconds"
    );
    describe_gauge!(ENDPOINT_CHANGES_PENDING, "Pending proxy rules Endpoint changes");
    describe_counter!(ENDPOINT_CHANGES_TOTAL, "Cumulative proxy rules Endpoint changes");
    describe_gauge!(SERVICE_CHANGES_PENDING, "Pending proxy rules Service changes");
    describe_counter!(SERVICE_CHANGES_TOTAL, "Cumulative proxy rules Service changes");
    describe_gauge!(
        NO_LOCAL_ENDPOINTS_TOTAL,
        "Number of services with a Local traffic policy and no endpoints"
    );
    describe_counter!(PROXY_HEALTHZ_TOTAL, "Cumulative proxy healthz HTTP status");
    describe_counter!(PROXY_LIVEZ_TOTAL, "Cumulative proxy livez HTTP status");
}

/// Each kube-proxy histogram with its exact buckets, for `set_buckets_for_metric`.
pub fn histogram_buckets() -> Vec<(&'static str, Vec<f64>)> {
    vec![
        (SYNC_PROXY_RULES_DURATION_SECONDS, sync_buckets()),
        (NETWORK_PROGRAMMING_DURATION_SECONDS, network_programming_buckets()),
    ]
}

/// `ExponentialBuckets(0.001, 2, 15)`: 1 ms … 16.384 s.
pub fn sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// `MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12),
/// LinearBuckets(120, 30, 7))`. component-base's `MergeBuckets` starts from a zero bucket.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0];
    b.extend(linear_buckets(0.25, 0.25, 2));
    b.extend(linear_buckets(1.0, 1.0, 59));
    b.extend(linear_buckets(60.0, 5.0, 12));
    b.extend(linear_buckets(120.0, 30.0, 7));
    b
}

/// Prometheus' `ExponentialBuckets` (computed the same way, by repeated multiplication).
fn exponential_buckets(mut start: f64, factor: f64, count: usize) -> Vec<f64> {
    let mut b = Vec::with_capacity(count);
    for _ in 0..count {
        b.push(start);
        start *= factor;
    }
    b
}

/// Prometheus' `LinearBuckets` (by repeated addition).
fn linear_buckets(mut start: f64, width: f64, count: usize) -> Vec<f64> {
    let mut b = Vec::with_capacity(count);
    for _ in 0..count {
        b.push(start);
        start += width;
    }
    b
}

/// Handles of one family's series.
#[derive(Debug)]
struct FamilyMetrics {
    family: IpFamily,
    sync: Histogram,
    last_sync: Gauge,
    last_queued: Gauge,
    programming: Histogram,
    no_local_internal: Gauge,
    no_local_external: Gauge,
}

/// kube-proxy's metrics for the families this node serves.
#[derive(Debug)]
pub struct KubeProxyMetrics {
    families: Vec<FamilyMetrics>,
    endpoint_changes_total: Counter,
    endpoint_changes_pending: Gauge,
    service_changes_total: Counter,
    service_changes_pending: Gauge,
}

// === impl KubeProxyMetrics ===

impl KubeProxyMetrics {
    /// Registers every series for `families` with the installed recorder.
    pub fn new(families: &[IpFamily]) -> Self {
        let families = families
            .iter()
            .map(|&family| {
                let f = family.as_str();
                FamilyMetrics {
                    family,
                    sync: metrics::histogram!(SYNC_PROXY_RULES_DURATION_SECONDS, "ip_family" => f),
                    last_sync: metrics::gauge!(SYNC_PROXY_RULES_LAST_TIMESTAMP_SECONDS, "ip_family" => f),
                    last_queued: metrics::gauge!(SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP_SECONDS, "ip_family" => f),
                    programming: metrics::histogram!(NETWORK_PROGRAMMING_DURATION_SECONDS, "ip_family" => f),
                    no_local_internal: metrics::gauge!(
                        NO_LOCAL_ENDPOINTS_TOTAL, "ip_family" => f, "traffic_policy" => "internal"
                    ),
                    no_local_external: metrics::gauge!(
                        NO_LOCAL_ENDPOINTS_TOTAL, "ip_family" => f, "traffic_policy" => "external"
                    ),
                }
            })
            .collect();
        Self {
            families,
            endpoint_changes_total: metrics::counter!(ENDPOINT_CHANGES_TOTAL),
            endpoint_changes_pending: metrics::gauge!(ENDPOINT_CHANGES_PENDING),
            service_changes_total: metrics::counter!(SERVICE_CHANGES_TOTAL),
            service_changes_pending: metrics::gauge!(SERVICE_CHANGES_PENDING),
        }
    }

    /// A sync was queued (a new snapshot arrived): sets `…_last_queued_timestamp_seconds`.
    pub fn last_queued_timestamp(&self) {
        let now = unix_seconds(SystemTime::now());
        for f in &self.families {
            f.last_queued.set(now);
        }
    }

    /// A sync of `duration` was applied: observes `…_sync_proxy_rules_duration_seconds`, sets
    /// `…_last_timestamp_seconds` to now and the `_pending` change gauges to 0.
    pub fn record_sync(&self, duration: Duration) {
        let now = unix_seconds(SystemTime::now());
        for f in &self.families {
            f.sync.record(duration.as_secs_f64());
            f.last_sync.set(now);
        }
        self.endpoint_changes_pending.set(0.0);
        self.service_changes_pending.set(0.0);
    }

    /// Time from an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to the
    /// sync that applied it, for a slice of `family`.
    pub fn record_network_programming(&self, family: IpFamily, duration: Duration) {
        if let Some(f) = self.families.iter().find(|f| f.family == family) {
            f.programming.record(duration.as_secs_f64());
        }
    }

    /// `n` EndpointSlice changes seen and not yet applied.
    pub fn endpoint_changes(&self, n: u64) {
        self.endpoint_changes_total.increment(n);
        self.endpoint_changes_pending.increment(n as f64);
    }

    /// `n` Service changes seen and not yet applied.
    pub fn service_changes(&self, n: u64) {
        self.service_changes_total.increment(n);
        self.service_changes_pending.increment(n as f64);
    }

    /// Sets `…_no_local_endpoints_total{ip_family, traffic_policy}` for `family`.
    pub fn no_local_endpoints(&self, family: IpFamily, policy: TrafficPolicyLabel, n: usize) {
        if let Some(f) = self.families.iter().find(|f| f.family == family) {
            let gauge = match policy {
                TrafficPolicyLabel::Internal => &f.no_local_internal,
                TrafficPolicyLabel::External => &f.no_local_external,
            };
            gauge.set(n as f64);
        }
    }

    /// Sets the gauges to kube-proxy's end-of-sync count of ports without local endpoints in
    /// `snapshot` (for its node). With the previously recorded snapshot `last` (same node), only
    /// the Services that changed since are recounted, so a sync costs O(changes), not O(Services).
    pub fn record_no_local_endpoints(&self, last: Option<&Snapshot>, snapshot: &Snapshot) {
        let node = snapshot.node.as_ref().map_or("", |n| &*n.name);
        match last.filter(|l| l.node == snapshot.node) {
            Some(last) => {
                for f in &self.families {
                    let (internal, external) = no_local_endpoints_delta(last, snapshot, node, f.family);
                    f.no_local_internal.increment(internal as f64);
                    f.no_local_external.increment(external as f64);
                }
            }
            None => {
                for f in &self.families {
                    let (internal, external) = no_local_endpoints_for(snapshot, node, Some(f.family));
                    f.no_local_internal.set(internal as f64);
                    f.no_local_external.set(external as f64);
                }
            }
        }
    }
}

/// The `traffic_policy` label of `…_no_local_endpoints_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicyLabel {
    /// `internal`: `internalTrafficPolicy: Local`.
    Internal,
    /// `external`: `externalTrafficPolicy: Local`.
    External,
}

/// Service ports whose Local policy has no local endpoint while some endpoint exists elsewhere,
/// as (internal, external), over both families.
pub fn no_local_endpoints(snapshot: &Snapshot, node: &str) -> (usize, usize) {
    no_local_endpoints_for(snapshot, node, None)
}

/// kube-proxy's per-sync count, for the proxier of `family` (`None`: both families summed; the
/// model keeps one [`ServicePort`] per family of a dual-stack Service, as kube-proxy's proxiers do).
///
/// Per Kubernetes service port (kube-proxy counts ports, not Services) that has a ClusterIP of the
/// family: skipped when it has no usable endpoint at all (REJECT, not DROP); else `internal` when
/// `internalTrafficPolicy: Local` and no local endpoint, `external` when `externalTrafficPolicy:
/// Local`, the port is externally accessible (NodePort, LoadBalancer IP or externalIP) and no
/// local endpoint. Usable = Ready, or Serving and Terminating; local = `nodeName` is `node`.
pub fn no_local_endpoints_for(snapshot: &Snapshot, node: &str, family: Option<IpFamily>) -> (usize, usize) {
    snapshot
        .services
        .values()
        .map(|s| service_lacks_local(s, node, family))
        .fold((0, 0), |(i, e), (a, b)| (i + a, e + b))
}

/// How [`no_local_endpoints_for`]`(new, node, Some(family))` differs from the same count on
/// `old`, computed from the Services that differ between the two: O(changed Services).
pub fn no_local_endpoints_delta(old: &Snapshot, new: &Snapshot, node: &str, family: IpFamily) -> (i64, i64) {
    let count = |s: &Service| {
        let (i, e) = service_lacks_local(s, node, Some(family));
        (i as i64, e as i64)
    };
    let (mut internal, mut external) = (0, 0);
    for item in old.services.diff(&new.services) {
        let (before, after) = match item {
            DiffItem::Add(_, s) => ((0, 0), count(s)),
            DiffItem::Remove(_, s) => (count(s), (0, 0)),
            DiffItem::Update { old: (_, a), new: (_, b) } => (count(a), count(b)),
        };
        internal += after.0 - before.0;
        external += after.1 - before.1;
    }
    (internal, external)
}

/// One Service's contribution: its ports that lack a local endpoint, as (internal, external).
fn service_lacks_local(service: &Service, node: &str, family: Option<IpFamily>) -> (usize, usize) {
    if !matches!(service.origin, Origin::Kubernetes { .. }) {
        return (0, 0);
    }
    service
        .ports
        .iter()
        .map(|p| port_lacks_local(p, node, family))
        .fold((0, 0), |(i, e), (a, b)| (i + usize::from(a), e + usize::from(b)))
}

fn port_lacks_local(port: &ServicePort, node: &str, family: Option<IpFamily>) -> (bool, bool) {
    let in_family = |ip: std::net::IpAddr| family.is_none_or(|f| IpFamily::of(ip) == f);
    let has_cluster_ip =
        port.frontends.iter().any(|f| matches!(f, Frontend::ClusterIp(a) if in_family(a.ip())));
    if !has_cluster_ip {
        return (false, false);
    }
    let externally_accessible = port
        .frontends
        .iter()
        .any(|f| matches!(f, Frontend::NodePort(_) | Frontend::LoadBalancer(_) | Frontend::ExternalIp(_)));
    let itp_local = port.internal_traffic_policy == TrafficPolicy::Local;
    let etp_local = port.external_traffic_policy == TrafficPolicy::Local && externally_accessible;
    if !itp_local && !etp_local {
        return (false, false);
    }
    let usable = port
        .endpoints
        .all
        .iter()
        .filter(|ep| in_family(ep.addr.ip()) && (ep.ready || (ep.serving && ep.terminating)));
    let mut any = false;
    let mut local = false;
    for ep in usable {
        any = true;
        local |= ep.node_name.as_deref() == Some(node);
    }
    if !any || local {
        return (false, false);
    }
    (itp_local, etp_local)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
