//! The mutable [`Index`]: every input object, and the last built snapshot.
//!
//! Sources call `apply_*` / `delete_*` as objects change and [`Index::build`] when they want to
//! publish. Objects are translated into compact inputs when applied (see [`crate::kube`]);
//! applying an object whose translation equals the stored one is a no-op and marks nothing dirty.
//!
//! Per service key the index holds: the Kubernetes Service input (if any), its EndpointSlices by
//! slice name (kept even before the Service arrives), and a Ferry listener (if any). A change marks
//! the key dirty; [`Index::build`] rebuilds only dirty keys and patches the persistent maps of the
//! previous snapshot. A rebuilt service or port equal to the previous one keeps its old `Arc`, so
//! `Arc::ptr_eq` between two snapshots tells readers exactly what changed, and the version only
//! increases when something did.
//!
//! Conflicts (deterministic, and equal to what a from-scratch build gives):
//! - Two services claiming one [`FrontendKey`]: the smallest [`ServiceKey`] wins; every other
//!   claimant is listed as `(frontend, loser)`. Within one service the first port claiming a key
//!   wins silently.
//! - A Kubernetes Service and a listener with the same key: the Service wins; every frontend of the
//!   listener is listed as `(frontend, key)`.
//!
//! `conflicts` is sorted by `(frontend, loser)`.
//!
//! Owned by one task (the publisher); never shared.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use serde::Serialize;

use crate::{
    dns::{DnsEndpoint, DnsKind, DnsPort, DnsService},
    endpoint::Endpoint,
    kube::{self, Interner, ServiceInput, ServiceKind, SliceInput},
    listener::ValidListener,
    service::{
        Frontend, FrontendKey, IpFamily, Origin, PassiveHealth, Service, ServiceKey, ServicePort, Timeouts,
    },
    snapshot::Snapshot,
    topology,
};

/// The node a snapshot is built for: its name and zone decide the local set and topology.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// `metadata.name` of the Node.
    pub name: Arc<str>,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<Arc<str>>,
}

/// The parts of this node's `Node` object that do not affect endpoint categorisation.
///
/// Changing it publishes a new snapshot without rebuilding any service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// kube-proxy's "node eligible" rule: not being deleted (`metadata.deletionTimestamp` unset)
    /// and not tainted `ToBeDeletedByClusterAutoscaler`. Reported by `/healthz` on :10256.
    pub eligible: bool,
    /// `status.addresses` of type `InternalIP`, then `ExternalIP`, in order (the node's primary
    /// addresses for `--nodeport-addresses primary`).
    pub addresses: Vec<IpAddr>,
}

/// `(namespace, name)` of an EndpointSlice.
type SliceId = (Arc<str>, Arc<str>);

/// Input objects and the state of the last build.
#[derive(Debug)]
pub struct Index {
    node: Option<NodeInfo>,
    node_changed: bool,
    node_status: Option<NodeStatus>,
    status_changed: bool,
    proxy_name: Option<Arc<str>>,
    services: HashMap<ServiceKey, ServiceInput>,
    /// Slices by owning service, then by slice name (sorted: the dedup order is by slice name).
    /// (A sorted `Vec`, not a `BTreeMap`: most services have one slice, and a B-tree leaf costs
    /// hundreds of bytes.)
    slices: HashMap<ServiceKey, Vec<(Arc<str>, SliceInput)>>,
    /// Owner of every stored slice.
    slice_owner: HashMap<SliceId, ServiceKey>,
    listeners: HashMap<ServiceKey, ValidListener>,
    resolved: HashMap<Arc<str>, Arc<[IpAddr]>>,
    interner: Interner,
    dirty: BTreeSet<ServiceKey>,
    /// Every service claiming a frontend, with the port it would serve there.
    /// Sorted by key; almost always exactly one entry.
    claims: HashMap<FrontendKey, Vec<(ServiceKey, Arc<ServicePort>)>>,
    /// Claimants that lost a frontend to a smaller key.
    lost: BTreeSet<(FrontendKey, ServiceKey)>,
    /// Frontends of listeners shadowed by a Kubernetes Service of the same key.
    shadowed: BTreeMap<ServiceKey, Vec<FrontendKey>>,
    current: Arc<Snapshot>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Index {
    /// An empty index for `node` (`None` in standalone mode).
    pub fn new(node: Option<NodeInfo>) -> Self {
        Self {
            node: node.clone(),
            node_changed: false,
            node_status: None,
            status_changed: false,
            proxy_name: None,
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            listeners: HashMap::new(),
            resolved: HashMap::new(),
            interner: Interner::default(),
            dirty: BTreeSet::new(),
            claims: HashMap::new(),
            lost: BTreeSet::new(),
            shadowed: BTreeMap::new(),
            current: Arc::new(Snapshot { node, ..Snapshot::default() }),
        }
    }

    /// Sets this proxy's `service.kubernetes.io/service-proxy-name` (default `None`: like
    /// kube-proxy, handle only objects without the label). Call it before applying objects:
    /// objects already skipped are not recovered.
    pub fn set_proxy_name(&mut self, name: Option<&str>) {
        self.proxy_name = name.map(Arc::from);
    }

    /// Whether anything changed since the last [`build`](Self::build).
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.node_changed || self.status_changed
    }

    /// Sets what the node's `Node` object says about eligibility and addresses. A change is
    /// published by the next [`build`](Self::build) without re-categorising any service.
    pub fn set_node_status(&mut self, status: Option<NodeStatus>) {
        if status != self.node_status {
            self.node_status = status;
            self.status_changed = true;
        }
    }

    /// Sets the node the snapshot is categorised for; a change re-categorises every Kubernetes
    /// service (kube-proxy does a full resync on node-label changes).
    pub fn set_node(&mut self, node: Option<NodeInfo>) {
        if node == self.node {
            return;
        }
        self.node = node;
        self.node_changed = true;
        self.dirty.extend(self.services.keys().cloned());
    }

    /// Adds or replaces a Kubernetes Service. A Service this proxy does not handle (see
    /// [`kube::is_proxied_by`]) is kept for cluster DNS but gets no frontends.
    pub fn apply_service(&mut self, svc: &KubeService) {
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mut input = ServiceInput::from_service(svc);
        input.handled = kube::is_proxied_by(svc.metadata.labels.as_ref(), self.proxy_name.as_deref());
        let key = ServiceKey::new(namespace, name);
        if self.services.get(&key) == Some(&input) {
            return;
        }
        self.dirty.insert(key.clone());
        self.services.insert(key, input);
    }

    /// Removes a Kubernetes Service (its slices are kept until they are deleted).
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = ServiceKey::new(namespace, name);
        if self.services.remove(&key).is_some() {
            self.dirty.insert(key);
        }
    }

    /// Adds or replaces an EndpointSlice. Slices without the `kubernetes.io/service-name` label or
    /// of `addressType: FQDN` are treated as deleted. (Whether a slice's endpoints are proxied
    /// follows its Service; see [`apply_service`](Self::apply_service).)
    pub fn apply_endpoint_slice(&mut self, slice: &EndpointSlice) {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        let name = slice.metadata.name.as_deref().unwrap_or_default();
        let labels = slice.metadata.labels.as_ref();
        let service = labels.and_then(|l| l.get(kube::SERVICE_NAME_LABEL)).filter(|s| !s.is_empty());
        let input = service.and_then(|_| SliceInput::from_slice(slice, &mut self.interner));
        let (Some(service), Some(input)) = (service, input) else {
            self.delete_endpoint_slice(namespace, name);
            return;
        };
        let ns = self.interner.get(namespace);
        let owner = ServiceKey::new(ns.clone(), service.as_str());
        let id: SliceId = (ns, name.into());
        if self.slice_owner.get(&id).is_some_and(|old| *old != owner) {
            self.delete_endpoint_slice(namespace, name);
        }
        let by_name = self.slices.entry(owner.clone()).or_default();
        match by_name.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) if by_name[i].1 == input => return,
            Ok(i) => by_name[i].1 = input,
            Err(i) => by_name.insert(i, (id.1.clone(), input)),
        }
        self.slice_owner.insert(id, owner.clone());
        self.dirty.insert(owner);
    }

    /// Removes an EndpointSlice.
    pub fn delete_endpoint_slice(&mut self, namespace: &str, name: &str) {
        let id: SliceId = (namespace.into(), name.into());
        let Some(owner) = self.slice_owner.remove(&id) else {
            return;
        };
        if let Some(by_name) = self.slices.get_mut(&owner) {
            by_name.retain(|(n, _)| **n != *name);
            if by_name.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Keys of every Kubernetes Service held.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// `(namespace, name)` of every EndpointSlice held.
    pub fn endpoint_slice_keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.slice_owner.keys().map(|(ns, name)| (&**ns, &**name))
    }

    /// Adds or replaces a listener.
    pub fn apply_listener(&mut self, listener: ValidListener) {
        if self.listeners.get(&listener.key) == Some(&listener) {
            return;
        }
        self.dirty.insert(listener.key.clone());
        self.listeners.insert(listener.key.clone(), listener);
    }

    /// Removes a listener.
    pub fn delete_listener(&mut self, key: &ServiceKey) {
        if self.listeners.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// Keys of every listener.
    pub fn listener_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.listeners.keys()
    }

    /// Host names that listeners need resolved.
    pub fn names(&self) -> BTreeSet<Arc<str>> {
        self.listeners.values().flat_map(|l| l.names().cloned()).collect()
    }

    /// Records the addresses of a host name (`None`: unknown or unresolvable).
    pub fn set_resolved(&mut self, host: &str, ips: Option<Arc<[IpAddr]>>) {
        let changed = match &ips {
            Some(ips) => self.resolved.get(host).is_none_or(|old| old != ips),
            None => self.resolved.contains_key(host),
        };
        if !changed {
            return;
        }
        match ips {
            Some(ips) => self.resolved.insert(host.into(), ips),
            None => self.resolved.remove(host),
        };
        for (key, l) in &self.listeners {
            if l.names().any(|n| &**n == host) {
                self.dirty.insert(key.clone());
            }
        }
    }

    /// The last built snapshot.
    pub fn current(&self) -> &Arc<Snapshot> {
        &self.current
    }

    /// Rebuilds what changed and returns the new snapshot (the previous one if nothing changed).
    pub fn build(&mut self) -> Arc<Snapshot> {
        if !self.is_dirty() {
            return self.current.clone();
        }
        let mut next = (*self.current).clone();
        let mut changed = std::mem::take(&mut self.node_changed);
        if changed {
            next.node = self.node.clone();
        }
        if std::mem::take(&mut self.status_changed) && next.node_status != self.node_status {
            next.node_status = self.node_status.clone();
            changed = true;
        }
        let mut conflicts_changed = false;
        let mut affected: BTreeSet<FrontendKey> = BTreeSet::new();
        for key in std::mem::take(&mut self.dirty) {
            changed |= self.patch_dns(&key, &mut next);
            let old = next.services.get(&key).cloned();
            let (new, shadowed) = self.build_service(&key, old.as_deref());
            conflicts_changed |= self.set_shadowed(&key, shadowed);
            let new = match (old.as_ref(), new) {
                (Some(old), Some(new)) if **old == new => continue,
                (None, None) => continue,
                (_, new) => new.map(Arc::new),
            };
            changed = true;
            if let Some(old) = &old {
                for port in &old.ports {
                    for fe in &port.frontends {
                        let fk = fe.key(port.protocol, port.family());
                        if let Some(c) = self.claims.get_mut(&fk) {
                            c.retain(|(k, _)| *k != key);
                        }
                        affected.insert(fk);
                    }
                }
            }
            match new {
                Some(new) => {
                    for port in &new.ports {
                        for fe in &port.frontends {
                            let fk = fe.key(port.protocol, port.family());
                            let c = self.claims.entry(fk).or_default();
                            if let Err(i) = c.binary_search_by(|(k, _)| k.cmp(&key)) {
                                c.insert(i, (key.clone(), port.clone()));
                            }
                            affected.insert(fk);
                        }
                    }
                    next.services.insert(key, new);
                }
                None => {
                    next.services.remove(&key);
                }
            }
        }
        for fk in affected {
            conflicts_changed |= self.resolve_frontend(fk, &mut next);
        }
        if conflicts_changed {
            let mut all: Vec<(FrontendKey, ServiceKey)> = self.lost.iter().cloned().collect();
            all.extend(self.shadowed.iter().flat_map(|(k, fks)| fks.iter().map(|fk| (*fk, k.clone()))));
            all.sort_unstable();
            all.dedup();
            let conflicts: imbl::Vector<_> = all.into_iter().collect();
            if conflicts != next.conflicts {
                next.conflicts = conflicts;
                changed = true;
            }
        }
        self.interner.prune();
        if changed {
            next.version += 1;
            self.current = Arc::new(next);
        }
        self.current.clone()
    }

    /// Rebuilds the DNS view of `key` into `next.dns`; returns whether it changed.
    fn patch_dns(&self, key: &ServiceKey, next: &mut Snapshot) -> bool {
        let new = self.services.get(key).map(|input| build_dns(input, self.slices.get(key)));
        match (next.dns.get(key), new) {
            (Some(old), Some(new)) if **old == new => false,
            (None, None) => false,
            (_, Some(new)) => {
                next.dns.insert(key.clone(), Arc::new(new));
                true
            }
            (Some(_), None) => {
                next.dns.remove(key);
                true
            }
        }
    }

    /// Recomputes the winner of `fk` into `next.frontends` and its losers into `self.lost`.
    /// Returns whether the set of losers changed.
    fn resolve_frontend(&mut self, fk: FrontendKey, next: &mut Snapshot) -> bool {
        let claimants = self.claims.get(&fk);
        match claimants.and_then(|c| c.first()) {
            Some((_, winner)) => next.frontends.insert(fk, winner.clone()),
            None => next.frontends.remove(&fk),
        };
        let old_losers: Vec<ServiceKey> = self
            .lost
            .range((fk, ServiceKey::new("", ""))..)
            .take_while(|(k, _)| *k == fk)
            .map(|(_, s)| s.clone())
            .collect();
        let new_losers: Vec<ServiceKey> =
            claimants.map(|c| c.iter().skip(1).map(|(k, _)| k.clone()).collect()).unwrap_or_default();
        if claimants.is_some_and(Vec::is_empty) {
            self.claims.remove(&fk);
        }
        if old_losers == new_losers {
            return false;
        }
        for loser in old_losers {
            self.lost.remove(&(fk, loser));
        }
        for loser in new_losers {
            self.lost.insert((fk, loser));
        }
        true
    }

    /// Records the shadowed-listener frontends of `key`; returns whether they changed.
    fn set_shadowed(&mut self, key: &ServiceKey, fks: Vec<FrontendKey>) -> bool {
        if self.shadowed.get(key).map_or(&[][..], Vec::as_slice) == fks.as_slice() {
            return false;
        }
        if fks.is_empty() {
            self.shadowed.remove(key);
        } else {
            self.shadowed.insert(key.clone(), fks);
        }
        true
    }

    /// The service `key` should be now, and the frontends of a listener it shadows.
    /// Ports equal to a port of `old` at the same position reuse its `Arc`.
    fn build_service(&self, key: &ServiceKey, old: Option<&Service>) -> (Option<Service>, Vec<FrontendKey>) {
        let listener = self.listeners.get(key);
        let Some(input) = self.services.get(key).filter(|input| input.handled) else {
            return (listener.map(|l| l.to_service(|h| self.resolved.get(h).cloned())), Vec::new());
        };
        let shadowed = listener
            .map(|l| vec![Frontend::Listener(l.address).key(l.protocol, IpFamily::of(l.address.ip()))])
            .unwrap_or_default();
        let mut svc = build_kube_service(key, input, self.slices.get(key), self.node.as_ref());
        if let Some(old) = old {
            for (i, port) in svc.ports.iter_mut().enumerate() {
                if let Some(o) = old.ports.get(i).filter(|o| **o == *port) {
                    *port = o.clone();
                }
            }
        }
        (Some(svc), shadowed)
    }
}

/// Builds one Kubernetes service from its input and slices (see [`crate::kube`] for the rules).
fn build_kube_service(
    key: &ServiceKey,
    input: &ServiceInput,
    slices: Option<&Vec<(Arc<str>, SliceInput)>>,
    node: Option<&NodeInfo>,
) -> Service {
    let mut ports = Vec::new();
    // Address families in `spec.clusterIPs` order (`true` = IPv4): the primary, then the other if any.
    let families: Vec<bool> = match input.cluster_ips.first() {
        None => Vec::new(),
        Some(primary) => {
            let v4 = primary.is_ipv4();
            let dual = input.cluster_ips.iter().any(|ip| ip.is_ipv4() != v4);
            if dual { vec![v4, !v4] } else { vec![v4] }
        }
    };
    for p in &input.ports {
        let endpoints = port_endpoints(p, slices);
        match input.kind {
            ServiceKind::ExternalName => {}
            ServiceKind::Headless => {
                ports.push(make_port(key, input, p, Vec::new(), Vec::new(), endpoints, node, false));
            }
            ServiceKind::Proxied => {
                for &v4 in &families {
                    let fam = |ip: &IpAddr| ip.is_ipv4() == v4;
                    let sock = |ip: &IpAddr| SocketAddr::new(*ip, p.port);
                    let mut frontends: Vec<Frontend> = input
                        .cluster_ips
                        .iter()
                        .filter(|ip| fam(ip))
                        .map(|ip| Frontend::ClusterIp(sock(ip)))
                        .collect();
                    // Both family ports of a dual-stack Service carry the NodePort: it is served on
                    // the node addresses of each family (keys differ by family).
                    frontends.extend(p.node_port.map(Frontend::NodePort));
                    let lb = input.load_balancer_ips.iter().filter(|ip| fam(ip));
                    frontends.extend(lb.map(|ip| Frontend::LoadBalancer(sock(ip))));
                    let ext = input.external_ips.iter().filter(|ip| fam(ip));
                    frontends.extend(ext.map(|ip| Frontend::ExternalIp(sock(ip))));
                    let externally_accessible = p.node_port.is_some()
                        || frontends
                            .iter()
                            .any(|f| matches!(f, Frontend::LoadBalancer(_) | Frontend::ExternalIp(_)));
                    let ranges = input.source_ranges.iter().filter(|r| fam(&r.addr())).copied().collect();
                    let eps = endpoints.iter().filter(|e| fam(&e.addr.ip())).cloned().collect();
                    ports.push(make_port(key, input, p, frontends, ranges, eps, node, externally_accessible));
                }
            }
        }
    }
    Service {
        key: key.clone(),
        origin: Origin::Kubernetes { service_type: input.service_type.to_string() },
        ports,
        health_check_node_port: input.health_check_node_port,
        last_change_trigger_time_ms: slices
            .into_iter()
            .flatten()
            .filter_map(|(_, s)| s.trigger_time_ms)
            .max(),
    }
}

/// The DNS view of one Kubernetes service (see [`crate::dns`] for the rules).
fn build_dns(input: &ServiceInput, slices: Option<&Vec<(Arc<str>, SliceInput)>>) -> DnsService {
    let kind = match (input.kind, &input.external_name) {
        (ServiceKind::ExternalName, Some(name)) => DnsKind::ExternalName(name.clone()),
        (ServiceKind::ExternalName, None) | (ServiceKind::Headless, _) => DnsKind::Headless,
        (ServiceKind::Proxied, _) => DnsKind::ClusterIp(input.cluster_ips.clone()),
    };
    let ports = input
        .ports
        .iter()
        .map(|p| DnsPort { name: p.name.clone(), protocol: p.protocol, port: p.port })
        .collect();
    let mut endpoints: BTreeMap<IpAddr, DnsEndpoint> = BTreeMap::new();
    if !matches!(kind, DnsKind::ExternalName(_)) {
        for (_, slice) in slices.into_iter().flatten() {
            let slice_ports: Arc<[DnsPort]> = slice
                .ports
                .iter()
                .map(|p| DnsPort { name: p.name.clone(), protocol: p.protocol, port: p.port })
                .collect();
            for e in &slice.endpoints {
                let ready = e.ready || input.publish_not_ready_addresses;
                endpoints.entry(e.ip).and_modify(|d| d.ready |= ready).or_insert_with(|| DnsEndpoint {
                    ip: e.ip,
                    hostname: e.hostname.clone(),
                    ready,
                    ports: slice_ports.clone(),
                });
            }
        }
    }
    DnsService { kind, ports, endpoints: endpoints.into_values().collect() }
}

#[allow(clippy::too_many_arguments)]
fn make_port(
    key: &ServiceKey,
    input: &ServiceInput,
    p: &kube::PortInput,
    frontends: Vec<Frontend>,
    load_balancer_source_ranges: Vec<ipnet::IpNet>,
    endpoints: Vec<Endpoint>,
    node: Option<&NodeInfo>,
    externally_accessible: bool,
) -> Arc<ServicePort> {
    let itp = input.internal_traffic_policy;
    let etp = input.external_traffic_policy;
    Arc::new(ServicePort {
        service: key.clone(),
        name: p.name.clone(),
        protocol: p.protocol,
        port: p.port,
        frontends,
        endpoints: topology::categorize_arc(endpoints.into(), node, itp, etp, externally_accessible),
        balancing: input.balancing,
        session_affinity: input.session_affinity,
        health_check: None,
        passive_health: PassiveHealth::default(),
        timeouts: Timeouts { udp_responses: input.udp_responses, ..Timeouts::default() },
        zero_copy: input.zero_copy,
        proxy_protocol: input.proxy_protocol,
        internal_traffic_policy: itp,
        external_traffic_policy: etp,
        load_balancer_source_ranges,
    })
}

/// The endpoints of service port `p` across all slices: matched by port name and protocol,
/// deduplicated by address (a non-terminating entry wins, then the first by slice name), sorted
/// by address.
fn port_endpoints(p: &kube::PortInput, slices: Option<&Vec<(Arc<str>, SliceInput)>>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (_, slice) in slices.into_iter().flatten() {
        for sp in slice.ports.iter().filter(|sp| sp.name == p.name && sp.protocol == p.protocol) {
            out.extend(slice.endpoints.iter().map(|e| Endpoint {
                addr: SocketAddr::new(e.ip, sp.port),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                node_name: e.node_name.clone(),
                zone: e.zone.clone(),
                hostname: e.hostname.clone(),
                hints: e.hints.as_deref().cloned(),
            }));
        }
    }
    // Stable: among equal (addr, terminating) the first slice (by name) wins.
    out.sort_by_key(|e| (e.addr, e.terminating));
    out.dedup_by_key(|e| e.addr);
    out
}

#[cfg(test)]
mod tests;
