//! Services, their ports and frontends: the unit the data plane serves.
//!
//! A [`Service`] is either a Kubernetes `Service` (with its `EndpointSlice`s folded in) or a Ferry
//! [`Listener`](crate::listener::Listener) (a standalone frontend with its own backends). Both end up
//! as the same shape: one or more [`ServicePort`]s, each with the frontends that accept traffic for
//! it and the endpoints that traffic may go to. The data plane only ever reads this shape.
//!
//! Written by [`Index`](crate::index::Index) while building a snapshot; read-only afterwards.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoints;

/// Identity of a service: `namespace/name`.
///
/// Listeners use their `metadata.namespace` (empty when not set), so a listener and a Kubernetes
/// Service with the same name in the same namespace collide; the index reports that as a conflict.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// `metadata.namespace`.
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Arc<str>,
}

impl ServiceKey {
    /// Builds a key from namespace and name.
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Transport protocol of a port, named as in Kubernetes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP`: parsed and shown, not proxied.
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    /// IPv4.
    #[serde(rename = "IPv4")]
    V4,
    /// IPv6.
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: std::net::IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

/// Where a [`Service`] came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Origin {
    /// A Kubernetes `Service` of the given `spec.type` (`ClusterIP`, `NodePort`, `LoadBalancer`).
    Kubernetes {
        /// `spec.type`.
        service_type: String,
    },
    /// A Ferry `Listener`.
    Listener,
}

/// `internalTrafficPolicy` / `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the default).
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// How an endpoint is chosen for a new connection or flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Balancing {
    /// Uniformly random (kube-proxy's behaviour, and the default for Kubernetes Services).
    #[default]
    Random,
    /// Each endpoint in turn (the default for listeners).
    RoundRobin,
    /// Power of two choices over active connection counts.
    LeastConnections,
    /// Maglev consistent hashing of the client IP: the same client keeps its endpoint, and an
    /// endpoint change moves only about 1/N of the clients (Kubernetes Services only, by annotation).
    Maglev,
}

/// `sessionAffinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SessionAffinity {
    /// No affinity.
    #[default]
    None,
    /// The same client IP goes to the same endpoint while it keeps sending within `timeout`.
    ClientIp {
        /// `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, at most 86400).
        #[serde(with = "duration_secs")]
        timeout: Duration,
    },
}

/// Default `timeoutSeconds` of ClientIP affinity, as the API server defaults it: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// Largest allowed ClientIP affinity timeout: 1 day.
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Active health checking of endpoints (listeners only; Kubernetes uses readiness instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// What a probe does.
    pub kind: HealthCheckKind,
    /// Time between probes of one endpoint.
    #[serde(with = "duration_millis")]
    pub interval: Duration,
    /// A probe that has not succeeded within this time failed.
    #[serde(with = "duration_millis")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

/// The probe of a [`HealthCheck`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HealthCheckKind {
    /// A TCP connect that completes.
    Tcp,
    /// An HTTP/1.1 `GET` whose response status is in `expected_statuses`.
    Http {
        /// Request path, `/` by default.
        path: String,
        /// `Host` header; the endpoint address when not set.
        host: Option<String>,
        /// Accepted status codes, inclusive ranges; `[(200, 399)]` by default.
        expected_statuses: Vec<(u16, u16)>,
    },
}

/// Passive health: eject an endpoint after consecutive failed connects, let it back after a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PassiveHealth {
    /// Consecutive connect failures that eject an endpoint; 0 disables passive ejection.
    pub consecutive_failures: u32,
    /// How long an ejected endpoint is skipped before it is tried again.
    #[serde(with = "duration_millis")]
    pub ejection: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self { consecutive_failures: 3, ejection: Duration::from_secs(10) }
    }
}

/// Connection timeouts and retry budget of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Upper bound on one upstream TCP connect.
    #[serde(with = "duration_millis")]
    pub connect: Duration,
    /// Endpoints tried for one TCP connection before the client is closed (at least 1).
    pub connect_attempts: u32,
    /// A UDP flow with no datagram in either direction for this long is forgotten.
    #[serde(with = "duration_millis")]
    pub udp_idle: Duration,
    /// Replies the endpoint sends per client datagram, for request/response protocols such as DNS
    /// (nginx's `proxy_responses`). When set, a UDP flow ends once every datagram its client sent
    /// has had this many replies, instead of idling for `udp_idle`; the client's next datagram
    /// starts a new flow. `None`: replies are not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_responses: Option<u32>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            connect_attempts: 3,
            udp_idle: Duration::from_secs(30),
            udp_responses: None,
        }
    }
}

/// An address and protocol that accepts traffic for a [`ServicePort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Frontend {
    /// `spec.clusterIPs[*]:port`.
    ClusterIp(SocketAddr),
    /// `nodePort` on the node addresses chosen by `--nodeport-addresses`.
    NodePort(u16),
    /// `status.loadBalancer.ingress[*].ip:port` whose `ipMode` is unset or `VIP`.
    LoadBalancer(SocketAddr),
    /// `spec.externalIPs[*]:port`.
    ExternalIp(SocketAddr),
    /// A Ferry listener's `spec.address`.
    Listener(SocketAddr),
}

impl Frontend {
    /// The address to listen on, or `None` for a NodePort (whose addresses depend on the node).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match *self {
            Self::ClusterIp(a) | Self::LoadBalancer(a) | Self::ExternalIp(a) | Self::Listener(a) => Some(a),
            Self::NodePort(_) => None,
        }
    }

    /// The frontend-index key of this frontend on a port of `protocol` and `family` (a NodePort
    /// is served per family: a dual-stack Service's two family ports each own one key).
    pub fn key(&self, protocol: Protocol, family: IpFamily) -> FrontendKey {
        match *self {
            Self::NodePort(port) => FrontendKey::NodePort(protocol, port, family),
            Self::ClusterIp(a) | Self::LoadBalancer(a) | Self::ExternalIp(a) | Self::Listener(a) => {
                FrontendKey::Addr(protocol, a)
            }
        }
    }
}

/// Lookup key of the frontend index: what a listening socket is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FrontendKey {
    /// An address-bearing frontend (ClusterIP, LoadBalancer, externalIP, listener).
    Addr(Protocol, SocketAddr),
    /// A NodePort, served on the node addresses of one family.
    NodePort(Protocol, u16, IpFamily),
}

impl fmt::Display for FrontendKey {
    /// `TCP 10.96.0.1:80`, `UDP [fd00::1]:53`, `TCP nodePort 30080`, `TCP nodePort 30080/IPv6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(protocol, addr) => write!(f, "{protocol} {addr}"),
            Self::NodePort(protocol, port, IpFamily::V4) => write!(f, "{protocol} nodePort {port}"),
            Self::NodePort(protocol, port, IpFamily::V6) => write!(f, "{protocol} nodePort {port}/IPv6"),
        }
    }
}

/// One port of a service, with its frontends and categorised endpoints.
///
/// This is what a listener serves. It is immutable; a change to the service or its endpoints
/// produces a new `Arc<ServicePort>`, so `Arc::ptr_eq` tells a reader whether anything changed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The owning service.
    pub service: ServiceKey,
    /// `ports[*].name` (empty for a single unnamed port, and for listeners).
    pub name: Arc<str>,
    /// `ports[*].protocol`.
    pub protocol: Protocol,
    /// `ports[*].port` (the listener's port for listeners).
    pub port: u16,
    /// Every frontend that accepts traffic for this port.
    pub frontends: Vec<Frontend>,
    /// Endpoints, categorised for this node.
    pub endpoints: Endpoints,
    /// Endpoint choice for new connections.
    pub balancing: Balancing,
    /// Session affinity.
    pub session_affinity: SessionAffinity,
    /// Active health checking (listeners only).
    pub health_check: Option<HealthCheck>,
    /// Passive ejection after connect failures.
    pub passive_health: PassiveHealth,
    /// Connect and flow timeouts.
    pub timeouts: Timeouts,
    /// Move bulk TCP data with `splice(2)` once a direction carries more than small messages.
    /// On by default for Services (off with `ferry.ethercluster.io/zero-copy: "false"`): between
    /// network namespaces it halves the CPU per GB (benches/README.md, node-compare). Standalone
    /// listeners keep `zeroCopy: false` by default: on loopback copying measured faster.
    pub zero_copy: bool,
    /// Send a PROXY protocol v2 header to the endpoint before the client's bytes (annotation
    /// `ferry.ethercluster.io/proxy-protocol: v2`), so it learns the client's address.
    pub proxy_protocol: bool,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.loadBalancerSourceRanges` (applies to LoadBalancer frontends only, as kube-proxy).
    pub load_balancer_source_ranges: Vec<IpNet>,
}

impl ServicePort {
    /// The port's address family: that of its frontends' addresses (a Service gets one port per
    /// family), else of its endpoints; IPv4 when it has neither.
    pub fn family(&self) -> IpFamily {
        self.frontends
            .iter()
            .find_map(Frontend::socket_addr)
            .map(|a| a.ip())
            .or_else(|| self.endpoints.all.first().map(|e| e.addr.ip()))
            .map_or(IpFamily::V4, IpFamily::of)
    }

    /// A display name for logs and metric labels: the listener's name for a listener, else
    /// `ns/name:port-name`, or `ns/name:port` for an unnamed port.
    pub fn display_name(&self) -> String {
        if self.frontends.iter().any(|f| matches!(f, Frontend::Listener(_))) {
            self.service.to_string()
        } else if self.name.is_empty() {
            format!("{}:{}", self.service, self.port)
        } else {
            format!("{}:{}", self.service, self.name)
        }
    }
}

/// A service: its origin, ports and service-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// `namespace/name`.
    pub key: ServiceKey,
    /// Kubernetes Service or Ferry listener.
    pub origin: Origin,
    /// Ports, in the order of `spec.ports`.
    pub ports: Vec<Arc<ServicePort>>,
    /// `spec.healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
    /// The newest `endpoints.kubernetes.io/last-change-trigger-time` of the service's
    /// EndpointSlices, in Unix milliseconds: when the change this version reflects was triggered.
    /// The node proxy measures network programming latency from it.
    pub last_change_trigger_time_ms: Option<u64>,
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
