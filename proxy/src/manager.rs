//! The listener [`Manager`]: turns snapshots into bound sockets and running accept/recv loops.
//!
//! Owned by one task (the one running [`Manager::run`], or a test). For every snapshot it asks
//! the [`FrontendFilter`] which sockets to bind for which frontends and over which endpoints,
//! then diffs that set, keyed by `(FrontendKey, bind address)`, against the running listeners:
//! - new ones are bound (a failure is logged, counted and retried later; others are unaffected);
//! - removed ones stop accepting at once; their connections keep running until they end or the
//!   drain timeout passes;
//! - unchanged ones are untouched (never re-bound). When the port's `Arc<ServicePort>`, an
//!   endpoint set or the routing rules changed, new [`Pool`]s (carrying over endpoint state) are
//!   swapped in.
//!
//! Two entry points: [`Manager::apply`] visits every frontend of the snapshot (the first
//! snapshot, and resyncs); [`Manager::apply_changes`] visits only the frontends that differ from
//! the last applied snapshot (an `imbl` diff, which skips shared subtrees) plus those whose bind
//! failed, so a one-endpoint change costs O(log frontends), not O(frontends). Both give the same
//! listeners and pools (`manager/tests.rs` checks it on random change sequences). Listeners are
//! kept in a `BTreeMap` by `(FrontendKey, bind address)`, so one frontend's listeners are a range.
//!
//! Listeners of one port share one ClientIP affinity table (kube-proxy's scope: one ServicePort,
//! any of its frontends): a new listener builds its pools with `previous` = a current pool of a
//! sibling listener of the same `Arc<ServicePort>`; an updated one from its own previous pools
//! (keeping its round-robin position), or from a sibling's new pool when the affinity
//! configuration changed (which starts a new table). A listener's internal pool starts from its
//! main pool. Endpoint states (connection counts, passive health) are shared where a pool was
//! derived from another that had the endpoint; otherwise an endpoint may have one state per
//! listener (harmless: only least-connections and passive ejection read them).
//!
//! Active health checks ([`Checks`]) follow the running listeners' pools: probes start for new
//! endpoints, stop for removed ones, and restart when a port's check configuration changes.
//!
//! A listener (TCP or UDP) runs on the manager's runtime, or with [`Workers`](crate::Workers) in
//! the config as one socket per worker (one `SO_REUSEPORT` group), each served by its worker.
//! Either way it is one `Running` entry.
//! Before binding, a listener takes the sockets a predecessor process served on the same address
//! ([`Handoff`](crate::Handoff)); its sockets stay registered for a successor while it runs.
//!
//! Token tree: `force` (cancelled at the end of shutdown) -> one `drain` token per listener ->
//! one token per endpoint. A connection waits on its endpoint's token only.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::Arc,
    time::Duration,
};

use ferry_lb::{Checks, EndpointState, Pool};
use ferry_model::{Endpoint, Frontend, FrontendKey, Protocol, ServicePort, Snapshot};
use imbl::ordmap::DiffItem;
use ipnet::IpNet;
use socket2::{Domain, Socket, Type};
use tokio::{net::UdpSocket, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    ProxyConfig,
    error::Error,
    handoff::{Registration, SocketKey},
    state::{Hold, ListenerState, Routes, Upstreams},
    tcp, udp, workers,
};

/// Backlog of TCP frontend sockets.
const BACKLOG: i32 = 1024;
/// Delay before binds that failed are retried when no new snapshot arrives.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// How long force-closed connections get to finish their cleanup at shutdown.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// Sources and the endpoint set they use instead of [`Binding::endpoints`].
pub type InternalRoute = (Arc<[IpNet]>, Arc<[Endpoint]>);

/// One socket to bind for a frontend, and how its clients are routed to endpoints.
///
/// [`Binding::new`] gives `ferry lb`'s behaviour: one endpoint set for every client, a client
/// refused (reset) when it is empty, a strict bind. Node frontends add an internal route, a
/// source filter, "drop" instead of refusing, and `IP_FREEBIND`.
#[derive(Clone, Debug)]
pub struct Binding {
    /// Local address to bind.
    pub addr: SocketAddr,
    /// The endpoint set (one of the port's categorised sets).
    pub endpoints: Arc<[Endpoint]>,
    /// Clients from these sources balance over the second set instead (the
    /// `externalTrafficPolicy: Local` short-circuit for pods and the node itself).
    pub internal: Option<InternalRoute>,
    /// When set, clients outside these ranges are dropped (`loadBalancerSourceRanges`).
    pub allowed_sources: Option<Arc<[IpNet]>>,
    /// An empty chosen set drops the client (TCP: held, see [`Hold`]) instead of refusing it.
    pub drop_when_empty: bool,
    /// Bounds on held TCP connections.
    pub hold: Hold,
    /// Bind with `IP_FREEBIND`, so the address need not be on a local device yet.
    pub freebind: bool,
    /// Connect to `endpoints` (not the internal set) from the client's address with
    /// `IP_TRANSPARENT` (needs `CAP_NET_ADMIN` and policy routing, see [`crate::node`]).
    pub transparent: bool,
}

impl Binding {
    /// A strict bind on `addr` serving every client from `endpoints`, refusing when empty.
    pub fn new(addr: SocketAddr, endpoints: Arc<[Endpoint]>) -> Self {
        Self {
            addr,
            endpoints,
            internal: None,
            allowed_sources: None,
            drop_when_empty: false,
            hold: Hold::default(),
            freebind: false,
            transparent: false,
        }
    }

    /// Whether `other` routes the same way (same endpoint sets by identity, same rules).
    fn same_routes(&self, other: &Self) -> bool {
        let same_internal = match (&self.internal, &other.internal) {
            (None, None) => true,
            (Some((s1, e1)), Some((s2, e2))) => s1 == s2 && Arc::ptr_eq(e1, e2),
            _ => false,
        };
        Arc::ptr_eq(&self.endpoints, &other.endpoints)
            && same_internal
            && self.allowed_sources == other.allowed_sources
            && self.drop_when_empty == other.drop_when_empty
            && self.transparent == other.transparent
    }

    /// Pools for `port` over this binding's sets. The main pool carries state (endpoint states,
    /// round-robin position, affinity table) over from `previous`; the internal pool from
    /// `previous_internal`, else from the new main pool.
    fn routes(
        &self,
        port: &Arc<ServicePort>,
        previous: Option<&Pool>,
        previous_internal: Option<&Pool>,
    ) -> Routes {
        let pool = Pool::new(port.clone(), &self.endpoints, previous);
        let internal = self.internal.as_ref().map(|(sources, endpoints)| {
            (sources.clone(), Pool::new(port.clone(), endpoints, Some(previous_internal.unwrap_or(&pool))))
        });
        Routes {
            pool,
            internal,
            allowed_sources: self.allowed_sources.clone(),
            drop_when_empty: self.drop_when_empty,
            transparent: self.transparent,
        }
    }
}

/// Decides which frontends this process serves, on which sockets, over which endpoints.
///
/// `ferry lb` uses [`ListenerFrontends`]; ClusterIP/NodePort serving plugs in here with a filter
/// that expands `FrontendKey::NodePort` to node addresses and picks `cluster` or `local`
/// endpoints by traffic policy.
pub trait FrontendFilter: fmt::Debug + Send + Sync + 'static {
    /// Appends to `out` the sockets to bind for frontend `key` of `port` (nothing: not served).
    fn bindings(&self, key: &FrontendKey, port: &ServicePort, out: &mut Vec<Binding>);
}

/// Serves Ferry `Listener` frontends on their own address, over the `cluster` endpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenerFrontends;

impl FrontendFilter for ListenerFrontends {
    fn bindings(&self, key: &FrontendKey, port: &ServicePort, out: &mut Vec<Binding>) {
        let FrontendKey::Addr(_, addr) = *key else { return };
        if port.frontends.contains(&Frontend::Listener(addr)) {
            out.push(Binding::new(addr, port.endpoints.cluster.clone()));
        }
    }
}

/// What identifies a running listener.
type ListenerKey = (FrontendKey, SocketAddr);

/// The smallest socket address: `(key, MIN_ADDR)..` ranges over every listener of `key`.
const MIN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

#[derive(Debug)]
struct Running {
    port: Arc<ServicePort>,
    binding: Binding,
    state: Arc<ListenerState>,
    stop: CancellationToken,
    local: SocketAddr,
    /// Offers the sockets to a successor while they are served ([`crate::Handoff`]).
    _registrations: Vec<Registration>,
}

/// Binds, updates and closes listeners as snapshots change.
#[derive(Debug)]
pub struct Manager {
    config: ProxyConfig,
    /// Sorted, so that every listener of one frontend is one range.
    listeners: BTreeMap<ListenerKey, Running>,
    /// Removed listeners whose connections may still be running.
    retired: Vec<Arc<ListenerState>>,
    force: CancellationToken,
    bound: watch::Sender<Vec<(FrontendKey, SocketAddr)>>,
    failed: usize,
    /// Frontends with a bind that failed in the last sync: [`Manager::apply_changes`] retries
    /// them even when they did not change.
    pending: BTreeSet<FrontendKey>,
    /// The frontend map of the last applied snapshot (an O(1) clone sharing its structure).
    last: Option<imbl::OrdMap<FrontendKey, Arc<ServicePort>>>,
    /// Active health probes of every running listener's endpoints.
    checks: Checks,
    /// The idle timer ([`workers::TIMER_TICK`]) of the manager's own runtime, started with the
    /// first TCP listener served there (without workers), aborted on drop.
    tick: std::sync::OnceLock<tokio_util::task::AbortOnDropHandle<()>>,
}

/// A listener the sync wants: its key, the port it serves and how.
type Wanted = (ListenerKey, Arc<ServicePort>, Binding);

// === impl Manager ===

impl Manager {
    /// A manager with no listeners.
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            config,
            listeners: BTreeMap::new(),
            retired: Vec::new(),
            force: CancellationToken::new(),
            bound: watch::Sender::new(Vec::new()),
            failed: 0,
            pending: BTreeSet::new(),
            last: None,
            checks: Checks::new(),
            tick: std::sync::OnceLock::new(),
        }
    }

    /// The bound local address of every running listener (useful with port 0).
    pub fn bound(&self) -> Vec<(FrontendKey, SocketAddr)> {
        let mut v: Vec<_> = self.listeners.iter().map(|(k, r)| (k.0, r.local)).collect();
        v.sort_unstable();
        v
    }

    /// Number of running listeners (bound sockets).
    pub fn len(&self) -> usize {
        self.listeners.len()
    }

    /// Whether no listener runs.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// The bound local address of the listener for `key`, if it runs.
    pub fn local_addr(&self, key: &FrontendKey) -> Option<SocketAddr> {
        self.of(*key).next().map(|(_, r)| r.local)
    }

    /// The state of the listener for `key`, if it runs (connection counts, current pool).
    pub fn listener(&self, key: &FrontendKey) -> Option<&Arc<ListenerState>> {
        self.of(*key).next().map(|(_, r)| &r.state)
    }

    /// A channel that carries [`Manager::bound`] after every sync that changed it.
    pub fn subscribe_bound(&self) -> watch::Receiver<Vec<(FrontendKey, SocketAddr)>> {
        self.bound.subscribe()
    }

    /// Makes the running listeners match `snapshot`, looking at every frontend (O(frontends)).
    /// Returns the bind failures (those listeners are retried on the next call); every other
    /// listener is served regardless. Must be called inside a tokio runtime.
    ///
    /// Use it for the first snapshot and to resynchronise; [`Manager::apply_changes`] gives the
    /// same result in time proportional to what changed.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Vec<Error> {
        let mut keys: BTreeSet<FrontendKey> = snapshot.frontends.keys().copied().collect();
        keys.extend(self.listeners.keys().map(|k| k.0));
        self.sync(snapshot, &keys, true)
    }

    /// Like [`Manager::apply`], but visits only the frontends that differ between the last
    /// applied snapshot and `snapshot` (persistent maps: unchanged subtrees are skipped), plus
    /// the frontends whose bind failed last time. O(changes) rather than O(frontends), so a
    /// one-endpoint change costs the same with 10 or 10,000 Services. Without a previous
    /// snapshot this is [`Manager::apply`].
    ///
    /// A frontend whose `Arc<ServicePort>` was replaced by an equal one is not visited: its
    /// listeners keep the equal old port.
    pub fn apply_changes(&mut self, snapshot: &Snapshot) -> Vec<Error> {
        let Some(last) = self.last.take() else { return self.apply(snapshot) };
        let mut keys = std::mem::take(&mut self.pending);
        for item in last.diff(&snapshot.frontends) {
            let (DiffItem::Add(key, _) | DiffItem::Remove(key, _) | DiffItem::Update { new: (key, _), .. }) =
                item;
            keys.insert(*key);
        }
        self.sync(snapshot, &keys, false)
    }

    /// Running listeners of frontend `key`.
    fn of(&self, key: FrontendKey) -> impl Iterator<Item = (&ListenerKey, &Running)> {
        self.listeners.range((key, MIN_ADDR)..).take_while(move |(k, _)| k.0 == key)
    }

    /// Reconciles the listeners of `keys` (every key a listener may have to change for) with
    /// `snapshot`. `full`: `keys` covers every frontend and listener.
    fn sync(&mut self, snapshot: &Snapshot, keys: &BTreeSet<FrontendKey>, full: bool) -> Vec<Error> {
        if full {
            self.pending.clear();
        }
        let mut want: Vec<Wanted> = Vec::new();
        let mut gone: Vec<ListenerKey> = Vec::new();
        let mut out = Vec::new();
        for fk in keys {
            let first = want.len();
            let (FrontendKey::Addr(protocol, _) | FrontendKey::NodePort(protocol, ..)) = *fk;
            if let Some(port) = snapshot.frontends.get(fk)
                && protocol != Protocol::Sctp
            {
                out.clear();
                self.config.filter.bindings(fk, port, &mut out);
                for b in out.drain(..) {
                    let key = (*fk, b.addr);
                    // A filter naming one address twice: the last binding wins.
                    match want[first..].iter_mut().find(|w| w.0 == key) {
                        Some(w) => *w = (key, port.clone(), b),
                        None => want.push((key, port.clone(), b)),
                    }
                }
            }
            let wanted = &want[first..];
            gone.extend(self.of(*fk).map(|(k, _)| *k).filter(|k| wanted.iter().all(|w| w.0 != *k)));
        }

        // Endpoint states that may lose their probe: those of replaced or removed pools.
        let watch_checks = !full && !self.checks.is_empty();
        let mut maybe_unchecked: Vec<Arc<EndpointState>> = Vec::new();
        let mut changed_set = !gone.is_empty();
        for key in gone {
            if let Some(r) = self.listeners.remove(&key) {
                tracing::info!(listener = %r.state.name(), local = %r.local, "closing listener");
                if watch_checks {
                    collect_checked(&self.checks, &r.state.upstreams(), &mut maybe_unchecked);
                }
                self.retire(r);
            }
        }
        self.retired.retain(|s| !s.tasks.is_empty());

        // Running listeners first, so that new listeners of the same port find a current pool
        // to share state with. Keyed by the port's `Arc` address (alive for this whole call).
        let mut shared: HashMap<usize, Arc<Upstreams>> = HashMap::new();
        let mut new = Vec::new();
        let mut touched: Vec<ListenerKey> = Vec::new();
        for (key, port, binding) in want {
            let Some(r) = self.listeners.get_mut(&key) else {
                new.push((key, port, binding));
                continue;
            };
            let ptr = Arc::as_ptr(&port) as usize;
            if !Arc::ptr_eq(&r.port, &port) || !r.binding.same_routes(&binding) {
                let old = r.state.upstreams();
                // A changed affinity configuration starts a new table: take the sibling's.
                let sibling = shared.get(&ptr).filter(|_| r.port.session_affinity != port.session_affinity);
                let routes = match sibling {
                    Some(s) => binding.routes(&port, Some(s.pool()), s.internal_pool()),
                    None => binding.routes(&port, Some(old.pool()), old.internal_pool()),
                };
                r.state.set_routes(routes);
                tracing::debug!(listener = %r.state.name(), endpoints = binding.endpoints.len(), "pool updated");
                r.port = port;
                r.binding = binding;
                if watch_checks {
                    collect_checked(&self.checks, &old, &mut maybe_unchecked);
                }
                touched.push(key);
            }
            shared.entry(ptr).or_insert_with(|| r.state.upstreams());
        }
        let mut errors = Vec::new();
        for (key, port, binding) in new {
            let ptr = Arc::as_ptr(&port) as usize;
            let sibling = match shared.get(&ptr) {
                Some(s) => Some(s.clone()),
                None if full => None,
                None => self.sibling(&port),
            };
            match self.start(key, port, binding, sibling.as_deref()) {
                Ok(r) => {
                    tracing::info!(listener = %r.state.name(), local = %r.local, "listening");
                    shared.entry(ptr).or_insert_with(|| r.state.upstreams());
                    self.listeners.insert(key, r);
                    touched.push(key);
                    changed_set = true;
                }
                Err((name, error)) => {
                    metrics::counter!("ferry_listener_bind_failures_total", "listener" => name.clone())
                        .increment(1);
                    tracing::warn!(listener = %name, %error, "bind failed; will retry");
                    errors.push(error);
                    self.pending.insert(key.0);
                }
            }
        }
        self.failed = errors.len();
        if full || changed_set {
            self.bound.send_replace(self.bound());
        }
        self.sync_checks(full, &touched, &maybe_unchecked);
        self.last = Some(snapshot.frontends.clone());
        errors
    }

    /// Probes follow the pools: every pool of every listener after a full sync; after a partial
    /// one, the pools of `touched` listeners, plus a full pass when a state that had a probe
    /// (`maybe_unchecked`) is in none of them (it may have left every pool).
    fn sync_checks(&mut self, full: bool, touched: &[ListenerKey], maybe_unchecked: &[Arc<EndpointState>]) {
        if !full {
            let mut live: HashSet<usize> = HashSet::new();
            for key in touched {
                let Some(r) = self.listeners.get(key) else { continue };
                let upstreams = r.state.upstreams();
                for pool in upstreams.pools() {
                    if pool.port().health_check.is_some() || !self.checks.is_empty() {
                        self.checks.sync(pool);
                    }
                    if !maybe_unchecked.is_empty() {
                        live.extend(pool.endpoints().iter().map(|s| Arc::as_ptr(s) as usize));
                    }
                }
            }
            if maybe_unchecked.iter().all(|s| live.contains(&(Arc::as_ptr(s) as usize))) {
                return;
            }
        }
        let upstreams: Vec<_> = self.listeners.values().map(|r| r.state.upstreams()).collect();
        self.checks.sync_all(upstreams.iter().flat_map(|u| u.pools()));
    }

    /// Current upstreams of a running listener of `port` (same `Arc`, or an equal port), found
    /// through the port's own frontends.
    fn sibling(&self, port: &Arc<ServicePort>) -> Option<Arc<Upstreams>> {
        port.frontends.iter().find_map(|f| {
            self.of(f.key(port.protocol, port.family()))
                .find(|(_, r)| Arc::ptr_eq(&r.port, port) || *r.port == **port)
                .map(|(_, r)| r.state.upstreams())
        })
    }

    fn start(
        &self,
        key: ListenerKey,
        port: Arc<ServicePort>,
        binding: Binding,
        sibling: Option<&Upstreams>,
    ) -> Result<Running, (String, Error)> {
        let name = port.display_name();
        let (FrontendKey::Addr(protocol, _) | FrontendKey::NodePort(protocol, ..)) = key.0;
        let addr = key.1;
        let bind_error = |source| (name.clone(), Error::Bind { addr, source });
        let handoff = &self.config.handoff;
        let inherited = handoff.take_all(match protocol {
            Protocol::Udp => SocketKey::udp(addr),
            _ => SocketKey::tcp(addr),
        });
        let sockets = if inherited.is_empty() {
            vec![bind(protocol, addr, binding.freebind).map_err(bind_error)?]
        } else {
            inherited
        };
        let local = sockets[0]
            .local_addr()
            .and_then(|a| a.as_socket().ok_or_else(|| io::Error::other("not an IP socket")))
            .map_err(bind_error)?;
        let routes = match sibling {
            Some(s) => binding.routes(&port, Some(s.pool()), s.internal_pool()),
            None => binding.routes(&port, None, None),
        };
        let state = ListenerState::with_routes(
            name,
            routes,
            self.force.child_token(),
            self.config.drain_timeout,
            binding.hold,
        );
        let stop = CancellationToken::new();
        let spawned = self.serve(protocol, sockets, local, binding.freebind, &state, &stop);
        let registrations = match spawned {
            Ok(registrations) => registrations,
            Err(source) => {
                stop.cancel();
                return Err((state.name().to_string(), Error::Bind { addr, source }));
            }
        };
        Ok(Running { port, binding, state, stop, local, _registrations: registrations })
    }

    /// Serves `protocol` on `sockets` (bound to `local`; one, or those inherited from a
    /// predecessor): on this runtime, or with workers on each of them, binding one more socket per
    /// further worker in the `SO_REUSEPORT` group (bound to `local`, so a port-0 bind gives one
    /// port). Inherited sockets beyond one per runtime are shared out, so none is left without a
    /// loop. All sockets are bound and registered before any loop starts, so a failure leaves
    /// nothing running.
    ///
    /// The kernel picks a group member by a hash of the peer's address and port: a TCP connection
    /// is accepted by one worker, and all datagrams of a UDP client reach the same socket, whose
    /// recv loop keeps that client's flow. Each UDP socket holds at most its share of
    /// `max_udp_flows`.
    fn serve(
        &self,
        protocol: Protocol,
        mut sockets: Vec<Socket>,
        local: SocketAddr,
        freebind: bool,
        state: &Arc<ListenerState>,
        stop: &CancellationToken,
    ) -> io::Result<Vec<Registration>> {
        let current;
        let runtimes = match &self.config.workers {
            Some(workers) => workers.handles(),
            None => {
                // Workers run their own idle timers.
                self.tick
                    .get_or_init(|| tokio_util::task::AbortOnDropHandle::new(tokio::spawn(workers::tick())));
                current = [tokio::runtime::Handle::current()];
                &current[..]
            }
        };
        while sockets.len() < runtimes.len() {
            sockets.push(bind(protocol, local, freebind)?);
        }
        let max_flows = self.config.max_udp_flows.div_ceil(sockets.len());
        let mut registrations = Vec::with_capacity(sockets.len());
        let mut loops = Vec::with_capacity(sockets.len());
        for (socket, runtime) in sockets.into_iter().zip(runtimes.iter().cycle()) {
            registrations.push(self.config.handoff.register(socket.as_fd())?);
            // Registered with the reactor of the runtime that serves it.
            let _entered = runtime.enter();
            let socket = match protocol {
                Protocol::Udp => Bound::Udp(UdpSocket::from_std(socket.into())?),
                _ => Bound::Tcp(tcp::listener(socket)?),
            };
            loops.push((socket, runtime));
        }
        for (socket, runtime) in loops {
            match socket {
                Bound::Tcp(listener) => {
                    state.tasks.spawn_on(tcp::serve(listener, state.clone(), stop.clone()), runtime)
                }
                Bound::Udp(socket) => {
                    state.tasks.spawn_on(udp::serve(socket, state.clone(), max_flows, stop.clone()), runtime)
                }
            };
        }
        Ok(registrations)
    }

    /// Stops accepting on `r`; its connections get the drain timeout to finish.
    fn retire(&mut self, r: Running) {
        r.stop.cancel();
        r.state.tasks.close();
        let state = r.state.clone();
        let timeout = self.config.drain_timeout;
        tokio::spawn(async move {
            tokio::select! {
                () = state.tasks.wait() => {}
                () = tokio::time::sleep(timeout) => {
                    tracing::debug!(listener = %state.name(), "drain timeout passed; closing connections");
                    state.drain_token().cancel();
                }
            }
        });
        self.retired.push(r.state);
    }

    /// Follows `snapshots` until `shutdown` is cancelled, then drains (see [`Manager::shutdown`]).
    pub async fn run(
        mut self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let mut open = true;
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            self.apply_changes(&snapshot);
            let retry = self.failed > 0;
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = snapshots.changed(), if open => {
                    if r.is_err() {
                        // The publisher is gone: keep serving the last snapshot until shutdown.
                        open = false;
                    }
                }
                () = tokio::time::sleep(BIND_RETRY), if retry => {}
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// Closes every listener at once, lets connections finish for up to the drain timeout,
    /// then force-closes the rest.
    pub async fn shutdown(mut self) {
        self.checks.shutdown().await;
        for (_, r) in std::mem::take(&mut self.listeners) {
            r.stop.cancel();
            r.state.tasks.close();
            self.retired.push(r.state);
        }
        self.bound.send_replace(Vec::new());
        let retired = std::mem::take(&mut self.retired);
        let all = async {
            for s in &retired {
                s.tasks.wait().await;
            }
        };
        if tokio::time::timeout(self.config.drain_timeout, all).await.is_err() {
            tracing::info!("drain timeout passed; closing remaining connections");
            self.force.cancel();
            let all = async {
                for s in &retired {
                    s.tasks.wait().await;
                }
            };
            if tokio::time::timeout(FORCE_GRACE, all).await.is_err() {
                tracing::warn!("connections still running after force close");
            }
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        for r in self.listeners.values() {
            r.stop.cancel();
        }
        self.force.cancel();
    }
}

/// Appends the endpoint states of `upstreams` that have a probe in `checks` to `out`.
fn collect_checked(checks: &Checks, upstreams: &Upstreams, out: &mut Vec<Arc<EndpointState>>) {
    for pool in upstreams.pools() {
        out.extend(pool.endpoints().iter().filter(|s| checks.is_checked(s)).cloned());
    }
}

/// A frontend socket registered with its runtime, before its loop starts.
enum Bound {
    Tcp(tcp::Listener),
    Udp(UdpSocket),
}

/// A non-blocking frontend socket: `SO_REUSEADDR`, `SO_REUSEPORT`, `IPV6_V6ONLY` for v6,
/// listening with a backlog of [`BACKLOG`] for TCP. With `freebind` (Linux), `IP_FREEBIND` /
/// `IPV6_FREEBIND` let the bind succeed before the address is on a local device.
pub(crate) fn bind(protocol: Protocol, addr: SocketAddr, freebind: bool) -> io::Result<Socket> {
    let ty = if protocol == Protocol::Udp { Type::DGRAM } else { Type::STREAM };
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if freebind {
        set_freebind(&socket, addr)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if protocol != Protocol::Udp {
        // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt per
        // listener instead of one per connection.
        socket.set_tcp_nodelay(true)?;
        socket.listen(BACKLOG)?;
    }
    Ok(socket)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_freebind(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv6() { socket.set_freebind_v6(true) } else { socket.set_freebind_v4(true) }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_freebind(_: &Socket, _: SocketAddr) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests;
