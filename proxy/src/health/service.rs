//! Per-Service `healthCheckNodePort` servers, byte-compatible with kube-proxy's
//! `ServiceHealthServer` (only `Date` differs).
//!
//! Every Service with `health_check_node_port: Some(p)` (LoadBalancer, `externalTrafficPolicy:
//! Local`) gets an HTTP server on port `p` of each configured address (default `[::]`, dual-stack,
//! as Go's listener on `0.0.0.0`). Any path and method answers:
//!
//! - status 200 iff the Service has local Ready endpoints AND [`ProxyHealth`] is healthy, else 503;
//! - headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff`,
//!   `X-Load-Balancing-Endpoint-Weight: <count>`;
//! - kube-proxy's tab-indented body (`service.namespace`, `service.name`, `localEndpoints`,
//!   `serviceProxyHealthy`), without a trailing newline.
//!
//! The count is kube-proxy's `LocalReadyEndpoints`: distinct IPs of Ready endpoints whose
//! `nodeName` is this node, over all ports of the Service. kube-proxy counts per IP family (one
//! proxier per family); Ferry keeps both counts and answers with the family of the address the
//! probe arrived on, or the Service's primary family when it has no ClusterIP of that family (a single-stack Service probed over the other family on a dual-stack socket).
//!
//! [`ServiceHealthServers`] follows snapshots: it opens servers for new Services, closes removed
//! ones (or ones whose port changed) before opening others, so a port moving between Services
//! rebinds cleanly, and updates counts in place through atomics. A server whose port did not
//! change is never restarted. A port that fails to bind is retried on the next sync, as kube-proxy.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use ferry_model::{Frontend, Service, ServiceKey, Snapshot};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use imbl::ordmap::DiffItem;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    http::{go_response, json_headers, serve},
    proxy::{IpFamily, ProxyHealth},
};
use crate::handoff::{Handoff, Registration};

/// What one Service's health server reads on every request. Updated in place by the manager.
#[derive(Debug)]
pub struct ServiceHealth {
    key: ServiceKey,
    /// Local Ready endpoint IPs, per family (IPv4, IPv6).
    counts: [AtomicUsize; 2],
    /// Bit 0: has an IPv4 ClusterIP; bit 1: IPv6; bit 2: the primary family is IPv6.
    families: AtomicU8,
}

/// A failure to open a health check port (the others are still served; retried next sync).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "cannot listen on {addr} for the healthCheckNodePort of {service}: {source} (retried on the next sync)"
)]
pub struct BindError {
    /// The Service.
    pub service: ServiceKey,
    /// The address that failed.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

// === impl ServiceHealth ===

impl ServiceHealth {
    /// State for `key` with no local endpoints.
    pub fn new(key: ServiceKey) -> Self {
        Self { key, counts: Default::default(), families: AtomicU8::new(0b011) }
    }

    /// Recomputes the counts from `service` for `node`.
    pub fn update(&self, service: &Service, node: Option<&str>) {
        let (v4, v6) = local_ready_ips(service, node);
        self.counts[0].store(v4, Ordering::Release);
        self.counts[1].store(v6, Ordering::Release);
        self.families.store(family_bits(service), Ordering::Release);
    }

    /// The count reported to a probe that arrived on `local`.
    pub fn local_endpoints(&self, local: IpAddr) -> usize {
        let bits = self.families.load(Ordering::Acquire);
        let mut family = IpFamily::of(local);
        let has = |f: IpFamily| bits & if f == IpFamily::V4 { 0b001 } else { 0b010 } != 0;
        if !has(family) {
            family = if bits & 0b100 != 0 { IpFamily::V6 } else { IpFamily::V4 };
        }
        self.counts[usize::from(family == IpFamily::V6)].load(Ordering::Acquire)
    }

    /// Serves this Service's health check on `listener` until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        health: Arc<ProxyHealth>,
        stop: CancellationToken,
    ) {
        serve(listener, Arc::new(move |_: &_, local: SocketAddr| self.answer(local.ip(), &health)), stop)
            .await;
    }

    fn answer(&self, local: IpAddr, health: &ProxyHealth) -> Response<Full<Bytes>> {
        let count = self.local_endpoints(local);
        let healthy = health.is_healthy();
        let status = if count != 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let [content_type, nosniff] = json_headers();
        let headers = [content_type, nosniff, ("x-load-balancing-endpoint-weight", HeaderValue::from(count))];
        go_response(status, &headers, self.body(count, healthy), health.clock())
    }

    /// kube-proxy's body: its dedented, tab-indented template with the newlines trimmed.
    fn body(&self, count: usize, healthy: bool) -> String {
        format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            go_quote(&self.key.namespace),
            go_quote(&self.key.name),
        )
    }
}

/// Go's `%q` for the strings a Service name can hold (printable text is kept, `"` and `\` and
/// control characters escaped).
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// kube-proxy's `LocalReadyEndpoints` for `service` on `node`: distinct IPs of Ready endpoints on
/// this node, over all ports, as (IPv4, IPv6). Terminating endpoints are not Ready and do not count.
pub fn local_ready_ips(service: &Service, node: Option<&str>) -> (usize, usize) {
    let Some(node) = node else { return (0, 0) };
    let mut ips = HashSet::new();
    for port in &service.ports {
        for ep in port.endpoints.all.iter() {
            if ep.ready && ep.node_name.as_deref() == Some(node) {
                ips.insert(ep.addr.ip().to_canonical());
            }
        }
    }
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    (v4, ips.len() - v4)
}

fn family_bits(service: &Service) -> u8 {
    let mut bits = 0;
    let mut primary = None;
    for port in &service.ports {
        for f in &port.frontends {
            if let Frontend::ClusterIp(addr) = f {
                let family = IpFamily::of(addr.ip());
                primary.get_or_insert(family);
                bits |= if family == IpFamily::V4 { 0b001 } else { 0b010 };
            }
        }
    }
    if bits == 0 {
        bits = 0b011;
    }
    if primary == Some(IpFamily::V6) {
        bits |= 0b100;
    }
    bits
}

/// One open health check port.
#[derive(Debug)]
struct Instance {
    port: u16,
    state: Arc<ServiceHealth>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    /// Offers the listeners to a successor while they serve.
    _registrations: Vec<Registration>,
}

/// Opens, updates and closes the `healthCheckNodePort` servers as snapshots change.
#[derive(Debug)]
pub struct ServiceHealthServers {
    addresses: Vec<IpAddr>,
    health: Arc<ProxyHealth>,
    servers: BTreeMap<ServiceKey, Instance>,
    /// Services whose port failed to bind: retried at every sync.
    pending: BTreeSet<ServiceKey>,
    /// The snapshot of the last sync (the next one visits only what changed since).
    last: Option<Arc<Snapshot>>,
    shutdown: CancellationToken,
    handoff: Arc<Handoff>,
}

// === impl ServiceHealthServers ===

impl ServiceHealthServers {
    /// kube-proxy's default: one dual-stack socket per port.
    pub const ALL_ADDRESSES: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

    /// A manager binding every health check port on each of `addresses` (the node addresses
    /// `--nodeport-addresses` selects; `[ALL_ADDRESSES]` for all). Servers stop when `shutdown` fires.
    pub fn new(addresses: Vec<IpAddr>, health: Arc<ProxyHealth>, shutdown: CancellationToken) -> Self {
        Self {
            addresses,
            health,
            servers: BTreeMap::new(),
            pending: BTreeSet::new(),
            last: None,
            shutdown,
            handoff: Handoff::disabled(),
        }
    }

    /// Takes inherited listeners from `handoff` before binding, and registers those it serves.
    pub fn with_handoff(mut self, handoff: Arc<Handoff>) -> Self {
        self.handoff = handoff;
        self
    }

    /// Applies `snapshot`: closes servers of removed Services and changed ports, opens new ones,
    /// and updates the counts of changed Services. Only the Services that differ from the last
    /// synced snapshot are visited (all of them the first time or when the node changed), plus
    /// those whose port failed to bind before, which are retried. Returns the ports that failed to
    /// bind (logged too).
    pub async fn sync(&mut self, snapshot: &Arc<Snapshot>) -> Vec<BindError> {
        let node = snapshot.node.as_ref().map(|n| &*n.name);
        let mut keys: BTreeSet<ServiceKey> = std::mem::take(&mut self.pending);
        match self.last.as_ref().filter(|last| last.node == snapshot.node) {
            Some(last) => keys.extend(last.services.diff(&snapshot.services).map(|item| match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => {
                    k.clone()
                }
            })),
            None => {
                let wanted = snapshot.services.iter().filter(|(_, s)| s.health_check_node_port.is_some());
                keys.extend(wanted.map(|(k, _)| k.clone()));
                keys.extend(self.servers.keys().cloned());
            }
        }
        self.last = Some(snapshot.clone());
        let wanted = |key: &ServiceKey| {
            snapshot.services.get(key).and_then(|s| s.health_check_node_port.map(|p| (p, s)))
        };

        // Close first, so a port that moves between Services in one snapshot can be reopened.
        for key in &keys {
            let stale =
                self.servers.get(key).is_some_and(|inst| wanted(key).is_none_or(|(p, _)| p != inst.port));
            if stale && let Some(inst) = self.servers.remove(key) {
                tracing::info!(service = %key, port = inst.port, "closing healthcheck");
                inst.close().await;
            }
        }

        let mut errors = Vec::new();
        for key in keys {
            let Some((port, service)) = wanted(&key) else { continue };
            if let Some(inst) = self.servers.get(&key) {
                inst.state.update(service, node);
                continue;
            }
            let state = Arc::new(ServiceHealth::new(key.clone()));
            state.update(service, node);
            match self.open(port, &state) {
                Ok(inst) => {
                    tracing::info!(service = %key, port, "opening healthcheck");
                    self.servers.insert(key, inst);
                }
                Err(e) => {
                    tracing::warn!(service = %key, port, error = %e.source, addr = %e.addr, "failed to start healthcheck");
                    self.pending.insert(key);
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// Follows `snapshots` until `shutdown` is cancelled, then closes every server.
    pub async fn run(mut self, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            self.sync(&snapshot).await;
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                changed = snapshots.changed() => if changed.is_err() { break },
            }
        }
        for (_, inst) in std::mem::take(&mut self.servers) {
            inst.close().await;
        }
    }

    /// The open servers: Service, port and the bound addresses.
    pub fn servers(&self) -> impl Iterator<Item = (&ServiceKey, u16, &[SocketAddr])> {
        self.servers.iter().map(|(k, i)| (k, i.port, &*i.local_addrs))
    }

    fn open(&self, port: u16, state: &Arc<ServiceHealth>) -> Result<Instance, BindError> {
        let stop = self.shutdown.child_token();
        let mut listeners = Vec::with_capacity(self.addresses.len());
        let mut registrations = Vec::with_capacity(self.addresses.len());
        for ip in &self.addresses {
            let addr = SocketAddr::new(*ip, port);
            // On failure the listeners bound so far drop here, freeing their ports (kube-proxy's closeAll).
            let (listener, registration) = self.handoff.tcp_listener(addr).map_err(|source| BindError {
                service: state.key.clone(),
                addr,
                source,
            })?;
            listeners.push(listener);
            registrations.push(registration);
        }
        let local_addrs = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(state.clone().serve(l, self.health.clone(), stop.clone())))
            .collect();
        Ok(Instance { port, state: state.clone(), stop, tasks, local_addrs, _registrations: registrations })
    }
}

// === impl Instance ===

impl Instance {
    /// Stops accepting and waits until the listeners are dropped, so the port can be rebound.
    async fn close(self) {
        self.stop.cancel();
        for task in self.tasks {
            // The accept loop returns on the first poll after cancellation; bounded anyway.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}
