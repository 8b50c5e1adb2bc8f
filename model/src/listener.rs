//! Ferry's own kind: a standalone `Listener` (`ferry.ethercluster.io/v1alpha1`).
//!
//! ```yaml
//! apiVersion: ferry.ethercluster.io/v1alpha1
//! kind: Listener
//! metadata: {name: web}
//! spec:
//!   address: 0.0.0.0:8080
//!   protocol: TCP
//!   backends: ["10.0.0.11:8080", "besu-0.example.internal:8080"]
//!   balancing: RoundRobin
//!   sessionAffinity: {clientIP: {timeoutSeconds: 10800}}
//!   healthCheck: {tcp: {}, intervalSeconds: 2, timeoutSeconds: 1, healthyThreshold: 2, unhealthyThreshold: 3}
//! ```
//!
//! Parsing is strict (`deny_unknown_fields`), and [`Listener::validate`] reports the first bad field
//! by its path (`spec.backends[1]`), so a source can name the file, the document and the field.
//! Backend host names are not resolved here: the source resolves them and hands the addresses to
//! the [`Index`](crate::index::Index).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::{
    endpoint::{Endpoint, Endpoints},
    service::{
        self, Balancing, Frontend, HealthCheck, HealthCheckKind, Origin, PassiveHealth, Protocol, Service,
        ServiceKey, ServicePort, SessionAffinity, Timeouts, TrafficPolicy,
    },
};

/// `apiVersion` of Ferry's kinds.
pub const API_VERSION: &str = "ferry.ethercluster.io/v1alpha1";
/// `kind` of a listener.
pub const KIND: &str = "Listener";

/// A standalone listener: an address, a protocol and the backends behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// `name` is required; `namespace` is optional.
    pub metadata: ObjectMeta,
    /// What to serve.
    pub spec: ListenerSpec,
}

/// `spec` of a [`Listener`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    /// Where to listen, `ip:port`.
    pub address: String,
    /// `TCP` (default) or `UDP`.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// `ip:port`, `[ipv6]:port` or `dns-name:port`. Names are re-resolved periodically.
    pub backends: Vec<String>,
    /// `RoundRobin` (default), `Random` or `LeastConnections`.
    #[serde(default)]
    pub balancing: Option<Balancing>,
    /// Optional ClientIP affinity, shaped as a Kubernetes `sessionAffinityConfig`.
    #[serde(default)]
    pub session_affinity: Option<SessionAffinitySpec>,
    /// Optional active health checking.
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// Passive ejection after consecutive connect failures.
    #[serde(default)]
    pub passive_health: Option<PassiveHealthSpec>,
    /// Upper bound on one upstream connect, in milliseconds (default 1000).
    #[serde(default)]
    pub connect_timeout_milliseconds: Option<u64>,
    /// Endpoints tried per TCP connection before giving up (default 3).
    #[serde(default)]
    pub connect_attempts: Option<u32>,
    /// Idle timeout of a UDP flow, in seconds (default 30).
    #[serde(default)]
    pub udp_idle_timeout_seconds: Option<f64>,
    /// Replies per client datagram; a UDP flow ends once answered (default: not counted).
    #[serde(default)]
    pub udp_responses: Option<u32>,
    /// Move bulk TCP data with `splice(2)` (default false).
    #[serde(default)]
    pub zero_copy: Option<bool>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// `sessionAffinity: {clientIP: {timeoutSeconds: N}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinitySpec {
    /// ClientIP affinity.
    #[serde(rename = "clientIP")]
    pub client_ip: ClientIpSpec,
}

/// `clientIP: {timeoutSeconds: N}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIpSpec {
    /// Seconds of inactivity after which a client may be sent elsewhere (default 10800, max 86400).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// `healthCheck`: exactly one of `tcp` or `http`, plus timing and thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// Probe with a TCP connect.
    #[serde(default)]
    pub tcp: Option<TcpProbeSpec>,
    /// Probe with an HTTP GET.
    #[serde(default)]
    pub http: Option<HttpProbeSpec>,
    /// Seconds between probes (default 2; fractions allowed).
    #[serde(default)]
    pub interval_seconds: Option<f64>,
    /// Seconds a probe may take (default 1; fractions allowed).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// Successes to become healthy (default 2).
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Failures to become unhealthy (default 3).
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
}

/// `tcp: {}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbeSpec {}

/// `http: {path: /health, host: example, expectedStatuses: [200, "200-399"]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProbeSpec {
    /// Request path (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `Host` header (default: the endpoint address).
    #[serde(default)]
    pub host: Option<String>,
    /// Accepted statuses: numbers or `"lo-hi"` ranges (default `200-399`).
    #[serde(default)]
    pub expected_statuses: Option<Vec<StatusSpec>>,
}

/// One accepted status: `200` or `"200-299"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    /// A single status code.
    Code(u16),
    /// An inclusive range written `"lo-hi"`.
    Range(String),
}

/// `passiveHealth: {consecutiveFailures: 3, ejectionSeconds: 10}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassiveHealthSpec {
    /// Connect failures in a row that eject an endpoint (default 3; 0 disables).
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    /// Seconds an ejected endpoint is skipped (default 10; fractions allowed).
    #[serde(default)]
    pub ejection_seconds: Option<f64>,
}

/// A listener backend as written: an address or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Backend {
    /// An IP literal and port.
    Addr(SocketAddr),
    /// A DNS name and port, resolved by the source.
    Name {
        /// The host name, lower-cased, without a trailing dot.
        host: Arc<str>,
        /// The port.
        port: u16,
    },
}

impl Backend {
    /// Parses `ip:port`, `[v6]:port` or `name:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?} has an invalid port {port:?}"))?;
        if port == 0 {
            return Err(format!("{s:?} has port 0"));
        }
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            return Err(format!("{s:?}: an IPv6 address must be written [addr]:port"));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !is_dns_name(&host) {
            return Err(format!("{s:?}: {host:?} is neither an IP address nor a valid DNS name"));
        }
        Ok(Self::Name { host: host.into(), port })
    }
}

/// RFC 1123 host name: labels of letters, digits and hyphens, not starting or ending with a hyphen.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A listener field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.backends[1]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

fn seconds(field: &str, value: Option<f64>, default: Duration) -> Result<Duration, FieldError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 && v <= 31_536_000.0 => Ok(Duration::from_secs_f64(v)),
        Some(v) => Err(field_err(field, format!("{v} is not a positive number of seconds"))),
    }
}

/// A listener after validation: everything the index needs, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidListener {
    /// `namespace/name`.
    pub key: ServiceKey,
    /// `spec.address`.
    pub address: SocketAddr,
    /// `spec.protocol`.
    pub protocol: Protocol,
    /// `spec.backends`, parsed.
    pub backends: Vec<Backend>,
    /// Balancing, `RoundRobin` unless set.
    pub balancing: Balancing,
    /// Session affinity.
    pub session_affinity: SessionAffinity,
    /// Active health checking.
    pub health_check: Option<HealthCheck>,
    /// Passive ejection.
    pub passive_health: PassiveHealth,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Splice bulk TCP data.
    pub zero_copy: bool,
}

// === impl Listener ===

impl Listener {
    /// Checks every field and applies defaults, or names the first field that is wrong.
    pub fn validate(&self) -> Result<ValidListener, FieldError> {
        if self.api_version != API_VERSION {
            return Err(field_err(
                "apiVersion",
                format!("must be {API_VERSION}, got {:?}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(field_err("kind", format!("must be {KIND}, got {:?}", self.kind)));
        }
        let name = self.metadata.name.as_deref().unwrap_or_default();
        if name.is_empty() {
            return Err(field_err("metadata.name", "is required"));
        }
        let namespace = self.metadata.namespace.as_deref().unwrap_or_default();
        let spec = &self.spec;
        let address: SocketAddr = spec
            .address
            .parse()
            .map_err(|_| field_err("spec.address", format!("{:?} is not ip:port", spec.address)))?;
        if spec.protocol == Protocol::Sctp {
            return Err(field_err("spec.protocol", "must be TCP or UDP"));
        }
        let backends = spec
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Backend::parse(b).map_err(|m| field_err(format!("spec.backends[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, b) in backends.iter().enumerate() {
            if backends[..i].contains(b) {
                return Err(field_err(format!("spec.backends[{i}]"), "duplicate backend"));
            }
        }
        let session_affinity = match &spec.session_affinity {
            None => SessionAffinity::None,
            Some(a) => {
                let secs = a.client_ip.timeout_seconds.unwrap_or(service::DEFAULT_AFFINITY_TIMEOUT.as_secs());
                if secs == 0 || secs > service::MAX_AFFINITY_TIMEOUT.as_secs() {
                    return Err(field_err(
                        "spec.sessionAffinity.clientIP.timeoutSeconds",
                        format!("{secs} is not within 1..=86400"),
                    ));
                }
                SessionAffinity::ClientIp { timeout: Duration::from_secs(secs) }
            }
        };
        let health_check = spec.health_check.as_ref().map(|h| h.validate(spec.protocol)).transpose()?;
        let passive_health = match &spec.passive_health {
            None => PassiveHealth::default(),
            Some(p) => PassiveHealth {
                consecutive_failures: p
                    .consecutive_failures
                    .unwrap_or(PassiveHealth::default().consecutive_failures),
                ejection: seconds(
                    "spec.passiveHealth.ejectionSeconds",
                    p.ejection_seconds,
                    PassiveHealth::default().ejection,
                )?,
            },
        };
        let defaults = Timeouts::default();
        let connect = match spec.connect_timeout_milliseconds {
            None => defaults.connect,
            Some(0) => return Err(field_err("spec.connectTimeoutMilliseconds", "must be positive")),
            Some(ms) => Duration::from_millis(ms),
        };
        let connect_attempts = match spec.connect_attempts {
            None => defaults.connect_attempts,
            Some(n @ 1..=16) => n,
            Some(n) => {
                return Err(field_err("spec.connectAttempts", format!("{n} is not within 1..=16")));
            }
        };
        let udp_idle =
            seconds("spec.udpIdleTimeoutSeconds", spec.udp_idle_timeout_seconds, defaults.udp_idle)?;
        let udp_responses = match spec.udp_responses {
            Some(0) => return Err(field_err("spec.udpResponses", "must be at least 1")),
            n => n,
        };
        Ok(ValidListener {
            key: ServiceKey::new(namespace, name),
            address,
            protocol: spec.protocol,
            backends,
            balancing: spec.balancing.unwrap_or(Balancing::RoundRobin),
            session_affinity,
            health_check,
            passive_health,
            timeouts: Timeouts { connect, connect_attempts, udp_idle, udp_responses },
            zero_copy: spec.zero_copy.unwrap_or(false),
        })
    }
}

impl HealthCheckSpec {
    fn validate(&self, protocol: Protocol) -> Result<HealthCheck, FieldError> {
        let kind = match (&self.tcp, &self.http) {
            (Some(_), Some(_)) => return Err(field_err("spec.healthCheck", "set only one of tcp and http")),
            (None, None) => return Err(field_err("spec.healthCheck", "set one of tcp or http")),
            (Some(_), None) => HealthCheckKind::Tcp,
            (None, Some(http)) => {
                let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
                if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    return Err(field_err(
                        "spec.healthCheck.http.path",
                        format!("{path:?} is not an absolute path"),
                    ));
                }
                let expected_statuses = match &http.expected_statuses {
                    None => vec![(200, 399)],
                    Some(list) if list.is_empty() => {
                        return Err(field_err("spec.healthCheck.http.expectedStatuses", "must not be empty"));
                    }
                    Some(list) => list
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            s.range().ok_or_else(|| {
                                field_err(
                                    format!("spec.healthCheck.http.expectedStatuses[{i}]"),
                                    "must be a status code 100-599 or a range \"lo-hi\"",
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?,
                };
                HealthCheckKind::Http { path, host: http.host.clone(), expected_statuses }
            }
        };
        if protocol == Protocol::Udp {
            return Err(field_err("spec.healthCheck", "active health checks need a TCP listener"));
        }
        let interval =
            seconds("spec.healthCheck.intervalSeconds", self.interval_seconds, Duration::from_secs(2))?;
        let timeout =
            seconds("spec.healthCheck.timeoutSeconds", self.timeout_seconds, Duration::from_secs(1))?;
        let healthy_threshold = threshold("spec.healthCheck.healthyThreshold", self.healthy_threshold, 2)?;
        let unhealthy_threshold =
            threshold("spec.healthCheck.unhealthyThreshold", self.unhealthy_threshold, 3)?;
        Ok(HealthCheck { kind, interval, timeout, healthy_threshold, unhealthy_threshold })
    }
}

fn threshold(field: &str, value: Option<u32>, default: u32) -> Result<u32, FieldError> {
    match value.unwrap_or(default) {
        n @ 1..=100 => Ok(n),
        n => Err(field_err(field, format!("{n} is not within 1..=100"))),
    }
}

impl StatusSpec {
    fn range(&self) -> Option<(u16, u16)> {
        let (lo, hi) = match self {
            Self::Code(c) => (*c, *c),
            Self::Range(s) => {
                let (lo, hi) = s.split_once('-').unwrap_or((s, s));
                (lo.trim().parse().ok()?, hi.trim().parse().ok()?)
            }
        };
        ((100..=599).contains(&lo) && (lo..=599).contains(&hi)).then_some((lo, hi))
    }
}

// === impl ValidListener ===

impl ValidListener {
    /// Builds the listener's [`Service`]: one port, one [`Frontend::Listener`], and one ready
    /// endpoint per resolved backend address. `resolve` returns the current addresses of a name
    /// (none yet, or none at all, gives no endpoints for that backend).
    pub fn to_service(&self, resolve: impl Fn(&str) -> Option<Arc<[IpAddr]>>) -> Service {
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(self.backends.len());
        for backend in &self.backends {
            match backend {
                Backend::Addr(a) => addrs.push(*a),
                Backend::Name { host, port } => {
                    if let Some(ips) = resolve(host) {
                        addrs.extend(ips.iter().map(|ip| SocketAddr::new(*ip, *port)));
                    }
                }
            }
        }
        addrs.sort_unstable();
        addrs.dedup();
        let all: Arc<[Endpoint]> = addrs.into_iter().map(Endpoint::ready).collect();
        let endpoints = Endpoints {
            has_any: !all.is_empty(),
            cluster: all.clone(),
            local: Arc::from([]),
            all,
            topology: crate::endpoint::TopologyMode::None,
        };
        let port = ServicePort {
            service: self.key.clone(),
            name: Arc::from(""),
            protocol: self.protocol,
            port: self.address.port(),
            frontends: vec![Frontend::Listener(self.address)],
            endpoints,
            balancing: self.balancing,
            session_affinity: self.session_affinity,
            health_check: self.health_check.clone(),
            passive_health: self.passive_health,
            timeouts: self.timeouts,
            zero_copy: self.zero_copy,
            proxy_protocol: false,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: TrafficPolicy::Cluster,
            load_balancer_source_ranges: Vec::new(),
        };
        Service {
            key: self.key.clone(),
            origin: Origin::Listener,
            ports: vec![Arc::new(port)],
            health_check_node_port: None,
            last_change_trigger_time_ms: None,
        }
    }

    /// The host names this listener needs resolved.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.backends.iter().filter_map(|b| match b {
            Backend::Name { host, .. } => Some(host),
            Backend::Addr(_) => None,
        })
    }
}
