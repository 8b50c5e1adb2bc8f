//! Translation of Kubernetes `Service` and `EndpointSlice` objects into compact inputs.
//!
//! The [`Index`](crate::index::Index) never keeps whole Kubernetes objects: at 100,000 endpoints the
//! managed fields, owner references and label maps of the originals would dominate memory. Each
//! object is translated once, when it is applied, into a [`ServiceInput`] or [`SliceInput`] holding
//! only what the snapshot needs. Node names and zones are interned (one `Arc<str>` per distinct
//! string), because 100,000 endpoints typically name only a few hundred nodes.
//!
//! Rules (kube-proxy parity, see `/work/shared/reference/kubeproxy.md` §1 and §5):
//! - [`is_proxied_by`]: `service.kubernetes.io/service-proxy-name` and `service.kubernetes.io/headless`
//!   label selectors. The index applies the proxy-name rule to Services and EndpointSlices, and the
//!   headless label rule to Services only, so headless endpoints stay available for DNS.
//! - `type: ExternalName` and headless (`clusterIP: None`, or no parseable cluster IP) services are
//!   recorded (for DNS) but get no frontends: ExternalName has no ports, headless has ports with
//!   endpoints and an empty `frontends` list. Neither ever appears in `Snapshot::frontends`.
//! - Frontends: `ClusterIp` for every `spec.clusterIPs` (fallback `spec.clusterIP`), `NodePort` when
//!   `nodePort` is set, `LoadBalancer` for `status.loadBalancer.ingress[].ip` with `ipMode` nil or
//!   `VIP` (`Proxy` is skipped, KEP-1860), `ExternalIp` for `spec.externalIPs`. Unparseable IPs are
//!   ignored, as kube-proxy logs and ignores them.
//! - `loadBalancerSourceRanges` are whitespace-trimmed and parsed as CIDRs; invalid ones are ignored.
//! - `sessionAffinity: ClientIP` with `timeoutSeconds` defaulting to 10800 and capped at 86400.
//! - Annotation [`BALANCING_ANNOTATION`] (`Random` default, `RoundRobin`, `LeastConnections`;
//!   anything else means `Random`).
//! - EndpointSlices belong to the service named by their [`SERVICE_NAME_LABEL`]; slices without it
//!   and `addressType: FQDN` slices are ignored. Only `addresses[0]` of an endpoint is used. Slice
//!   ports with a nil name or a nil/zero port are ignored (kube-proxy `endpointslicecache.go`);
//!   endpoint ports are matched to service ports by name and protocol, which resolves named
//!   `targetPort`s. Conditions: `ready = nil || true`, `serving = nil || true`,
//!   `terminating = non-nil && true`.
//!
//! **Address families.** kube-proxy runs one proxier per family, so an IPv4 ClusterIP only ever
//! uses IPv4 endpoints. Ferry splits each `spec.ports` entry of a dual-stack service into one
//! [`ServicePort`](crate::service::ServicePort) per family (in `spec.clusterIPs` order), each with the
//! frontends and endpoints of that family only, so the data plane never filters. Both family ports
//! carry the NodePort; its frontend key includes the family, so each is served on the node
//! addresses of its own family. Single-stack services get exactly one `ServicePort` per
//! `spec.ports` entry.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service as KubeService},
    discovery::v1::EndpointSlice,
};

use crate::{
    endpoint::EndpointHints,
    index::{NodeInfo, NodeStatus},
    service::{self, Balancing, Protocol, SessionAffinity, TrafficPolicy},
};

/// Label naming the proxy that should handle a Service (absent: the default proxy).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless Services and their EndpointSlices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label holding the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Service annotation choosing the [`Balancing`] of all its ports.
pub const BALANCING_ANNOTATION: &str = "ferry.ethercluster.io/balancing";
/// Annotation that makes Ferry send a PROXY protocol header to endpoints (`"v2"`).
pub const PROXY_PROTOCOL_ANNOTATION: &str = "ferry.ethercluster.io/proxy-protocol";
/// Annotation that turns off `splice(2)` for bulk TCP data (`"false"`; on by default).
pub const ZERO_COPY_ANNOTATION: &str = "ferry.ethercluster.io/zero-copy";
/// Annotation giving the replies an endpoint sends per client datagram (`"1"` for DNS): UDP flows
/// end once answered ([`Timeouts::udp_responses`](crate::Timeouts::udp_responses)).
pub const UDP_RESPONSES_ANNOTATION: &str = "ferry.ethercluster.io/udp-responses";

/// Whether a proxy named `proxy_name` handles an object with these labels.
///
/// kube-proxy's informer selectors: an object with the `service.kubernetes.io/headless` label is
/// skipped. A proxy without a name (kube-proxy, and Ferry by default) handles exactly the objects
/// without `service.kubernetes.io/service-proxy-name`; a named proxy handles exactly the objects
/// labelled with its name (as Cilium's `serviceProxyName`), so the two can share a node.
pub fn is_proxied_by(labels: Option<&BTreeMap<String, String>>, proxy_name: Option<&str>) -> bool {
    !labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) && matches_proxy_name(labels, proxy_name)
}

/// The `service-proxy-name` half of [`is_proxied_by`].
pub(crate) fn matches_proxy_name(
    labels: Option<&BTreeMap<String, String>>,
    proxy_name: Option<&str>,
) -> bool {
    match (labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)), proxy_name) {
        (None, None) => true,
        (Some(value), Some(ours)) => value == ours,
        (None, Some(_)) | (Some(_), None) => false,
    }
}

// === impl NodeInfo ===

impl NodeInfo {
    /// The node's name and its `topology.kubernetes.io/zone` label.
    pub fn from_node(node: &Node) -> Self {
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| !z.is_empty());
        Self {
            name: node.metadata.name.as_deref().unwrap_or_default().into(),
            zone: zone.map(|z| z.as_str().into()),
        }
    }
}

/// The taint the cluster autoscaler puts on nodes it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeStatus {
    /// Eligibility and addresses of `node`, as kube-proxy's health server reads them.
    pub fn from_node(node: &Node) -> Self {
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        let eligible = node.metadata.deletion_timestamp.is_none() && !tainted;
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        let mut addresses = Vec::new();
        for kind in ["InternalIP", "ExternalIP"] {
            for a in listed.into_iter().flatten().filter(|a| a.type_ == kind) {
                if let Ok(ip) = a.address.trim().parse::<IpAddr>()
                    && !addresses.contains(&ip)
                {
                    addresses.push(ip);
                }
            }
        }
        Self { eligible, addresses }
    }
}

/// Deduplicates the strings many endpoints repeat (node names, zones, hint names).
///
/// Entries nobody else references are dropped by [`Interner::prune`].
#[derive(Debug, Default)]
pub(crate) struct Interner(HashSet<Arc<str>>);

impl Interner {
    pub(crate) fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.0.insert(a.clone());
        a
    }

    /// Forgets strings no input refers to any more.
    pub(crate) fn prune(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// What kind of Kubernetes service this is, for the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServiceKind {
    /// Has at least one cluster IP: proxied.
    Proxied,
    /// `clusterIP: None` (or no usable cluster IP): endpoints only, no frontends.
    Headless,
    /// `type: ExternalName`: no ports at all.
    ExternalName,
}

/// One `spec.ports` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInput {
    pub(crate) name: Arc<str>,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
    pub(crate) node_port: Option<u16>,
}

/// The parts of a Kubernetes `Service` the snapshot needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceInput {
    pub(crate) service_type: Arc<str>,
    pub(crate) kind: ServiceKind,
    /// Parsed `spec.clusterIPs` (fallback `spec.clusterIP`), in order; the first is the primary.
    pub(crate) cluster_ips: Vec<IpAddr>,
    pub(crate) ports: Vec<PortInput>,
    pub(crate) external_ips: Vec<IpAddr>,
    /// VIP-mode load-balancer ingress IPs.
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    pub(crate) source_ranges: Vec<IpNet>,
    pub(crate) session_affinity: SessionAffinity,
    pub(crate) internal_traffic_policy: TrafficPolicy,
    pub(crate) external_traffic_policy: TrafficPolicy,
    pub(crate) health_check_node_port: Option<u16>,
    pub(crate) balancing: Balancing,
    pub(crate) zero_copy: bool,
    pub(crate) proxy_protocol: bool,
    /// [`UDP_RESPONSES_ANNOTATION`]: a positive count, else `None`.
    pub(crate) udp_responses: Option<u32>,
    /// `spec.externalName` of an ExternalName Service, without a trailing dot.
    pub(crate) external_name: Option<Arc<str>>,
    /// `spec.publishNotReadyAddresses`.
    pub(crate) publish_not_ready_addresses: bool,
    /// Whether this proxy handles the Service ([`is_proxied_by`]; set by the index). Services of
    /// other proxies are kept for cluster DNS but get no frontends.
    pub(crate) handled: bool,
}

/// One `EndpointSlice` port that can be matched to a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlicePort {
    pub(crate) name: Arc<str>,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
}

/// One `EndpointSlice` endpoint, without its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceEndpoint {
    pub(crate) ip: IpAddr,
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
    pub(crate) node_name: Option<Arc<str>>,
    pub(crate) zone: Option<Arc<str>>,
    pub(crate) hostname: Option<Arc<str>>,
    pub(crate) hints: Option<Box<EndpointHints>>,
}

/// The parts of an `EndpointSlice` the snapshot needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceInput {
    pub(crate) ports: Vec<SlicePort>,
    pub(crate) endpoints: Vec<SliceEndpoint>,
    /// [`TRIGGER_TIME_ANNOTATION`] in Unix milliseconds, when present and valid.
    pub(crate) trigger_time_ms: Option<u64>,
}

/// The annotation the EndpointSlice controller sets to the time of the change that caused this
/// version of the slice; kube-proxy measures network programming latency from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Parses an RFC 3339 timestamp (as the annotation carries) into Unix milliseconds.
pub fn parse_trigger_time(value: &str) -> Option<u64> {
    let ts: jiff::Timestamp = value.trim().parse().ok()?;
    u64::try_from(ts.as_millisecond()).ok()
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn policy(p: Option<&str>) -> TrafficPolicy {
    if p == Some("Local") { TrafficPolicy::Local } else { TrafficPolicy::Cluster }
}

/// Parses `s`, trimmed; `None` (ignored) when invalid.
fn ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

// === impl ServiceInput ===

impl ServiceInput {
    /// Translates a Service. Label rules are the caller's business (see [`is_proxied_by`]).
    pub(crate) fn from_service(svc: &KubeService) -> Self {
        let spec = svc.spec.as_ref();
        let service_type: Arc<str> = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP").into();
        let cluster_ip_strs: Vec<&str> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.and_then(|s| s.cluster_ip.as_deref()).into_iter().collect(),
        };
        let cluster_ips: Vec<IpAddr> = cluster_ip_strs.iter().filter_map(|s| ip(s)).collect();
        let kind = if &*service_type == "ExternalName" {
            ServiceKind::ExternalName
        } else if cluster_ip_strs.first().is_some_and(|s| *s == "None") || cluster_ips.is_empty() {
            ServiceKind::Headless
        } else {
            ServiceKind::Proxied
        };
        let ports = match kind {
            ServiceKind::ExternalName => Vec::new(),
            ServiceKind::Proxied | ServiceKind::Headless => spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some(PortInput {
                        name: p.name.as_deref().unwrap_or_default().into(),
                        protocol: protocol(p.protocol.as_deref())?,
                        port: port16(p.port)?,
                        node_port: p.node_port.and_then(port16),
                    })
                })
                .collect(),
        };
        let proxied = kind == ServiceKind::Proxied;
        let external_ips = match spec.and_then(|s| s.external_ips.as_ref()) {
            Some(ips) if proxied => ips.iter().filter_map(|s| ip(s)).collect(),
            _ => Vec::new(),
        };
        let load_balancer_ips = match svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()) {
            Some(lb) if proxied => lb
                .ingress
                .iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
                .filter_map(|i| ip(i.ip.as_deref()?))
                .collect(),
            _ => Vec::new(),
        };
        let source_ranges = match spec.and_then(|s| s.load_balancer_source_ranges.as_ref()) {
            Some(ranges) if proxied => ranges.iter().filter_map(|r| r.trim().parse::<IpNet>().ok()).collect(),
            _ => Vec::new(),
        };
        let session_affinity = if spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP") {
            let secs = spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u64::try_from(t).ok())
                .filter(|t| *t > 0)
                .map_or(service::DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs);
            SessionAffinity::ClientIp { timeout: secs.min(service::MAX_AFFINITY_TIMEOUT) }
        } else {
            SessionAffinity::None
        };
        let external_traffic_policy = policy(spec.and_then(|s| s.external_traffic_policy.as_deref()));
        let health_check_node_port = spec
            .and_then(|s| s.health_check_node_port)
            .and_then(port16)
            .filter(|_| &*service_type == "LoadBalancer" && external_traffic_policy == TrafficPolicy::Local);
        let annotation = |name: &str| svc.metadata.annotations.as_ref()?.get(name).map(String::as_str);
        let balancing = match annotation(BALANCING_ANNOTATION) {
            Some("RoundRobin") => Balancing::RoundRobin,
            Some("LeastConnections") => Balancing::LeastConnections,
            Some("Maglev") => Balancing::Maglev,
            _ => Balancing::Random,
        };
        let zero_copy = annotation(ZERO_COPY_ANNOTATION) != Some("false");
        let proxy_protocol =
            annotation(PROXY_PROTOCOL_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("v2"));
        let udp_responses = annotation(UDP_RESPONSES_ANNOTATION)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|n| *n > 0);
        let external_name = match kind {
            ServiceKind::ExternalName => spec
                .and_then(|s| s.external_name.as_deref())
                .map(|n| n.trim().trim_end_matches('.'))
                .filter(|n| !n.is_empty())
                .map(Arc::from),
            ServiceKind::Proxied | ServiceKind::Headless => None,
        };
        let publish_not_ready_addresses = spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false);
        Self {
            service_type,
            kind,
            external_name,
            publish_not_ready_addresses,
            handled: true,
            cluster_ips: if proxied { cluster_ips } else { Vec::new() },
            ports,
            external_ips,
            load_balancer_ips,
            source_ranges,
            session_affinity,
            internal_traffic_policy: policy(spec.and_then(|s| s.internal_traffic_policy.as_deref())),
            external_traffic_policy,
            health_check_node_port,
            balancing,
            zero_copy,
            proxy_protocol,
            udp_responses,
        }
    }
}

// === impl SliceInput ===

impl SliceInput {
    /// Translates a slice; `None` when it is ignored (`addressType: FQDN`).
    pub(crate) fn from_slice(slice: &EndpointSlice, interner: &mut Interner) -> Option<Self> {
        if slice.address_type == "FQDN" {
            return None;
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SlicePort {
                    name: interner.get(p.name.as_deref()?),
                    protocol: protocol(p.protocol.as_deref())?,
                    port: port16(p.port?)?,
                })
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                let ip = ip(e.addresses.first()?)?;
                let cond = e.conditions.as_ref();
                let hints = e.hints.as_ref().and_then(|h| {
                    let for_zones: Vec<Arc<str>> =
                        h.for_zones.iter().flatten().map(|z| interner.get(&z.name)).collect();
                    let for_nodes: Vec<Arc<str>> =
                        h.for_nodes.iter().flatten().map(|n| interner.get(&n.name)).collect();
                    (!for_zones.is_empty() || !for_nodes.is_empty())
                        .then(|| Box::new(EndpointHints { for_zones, for_nodes }))
                });
                Some(SliceEndpoint {
                    ip,
                    ready: cond.and_then(|c| c.ready).unwrap_or(true),
                    serving: cond.and_then(|c| c.serving).unwrap_or(true),
                    terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                    node_name: e.node_name.as_deref().map(|n| interner.get(n)),
                    zone: e.zone.as_deref().map(|z| interner.get(z)),
                    hostname: e.hostname.as_deref().map(Arc::from),
                    hints,
                })
            })
            .collect();
        let trigger_time_ms = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|v| parse_trigger_time(v));
        Some(Self { ports, endpoints, trigger_time_ms })
    }
}

#[cfg(test)]
mod tests;
