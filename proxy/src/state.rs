//! [`ListenerState`]: what one frontend socket shares with the manager.
//!
//! The accept/recv loop reads the current [`Upstreams`] with one `ArcSwap` load per connection or
//! datagram (no lock). The manager replaces it with [`ListenerState::set_routes`] (or
//! [`ListenerState::set_pool`]) when the snapshot changes the port; only that call takes the
//! (uncontended) drain-bookkeeping mutex.
//!
//! Routing ([`Upstreams::route`]), per client, allocation-free (linear scans of a few CIDRs):
//! 1. `allowed_sources` set (`loadBalancerSourceRanges`) and the client outside it: **drop**.
//! 2. `internal` set and the client inside its sources (pod CIDRs, node addresses): the internal
//!    pool (`externalTrafficPolicy: Local` short-circuit to the cluster set); else the main pool.
//! 3. `drop_when_empty` and the chosen pool is empty (a Local policy without local endpoints while
//!    the service has endpoints elsewhere): **drop**. Otherwise an empty pool refuses the client
//!    (TCP reset, UDP datagram discarded): `ferry lb`'s behaviour.
//!
//! A dropped UDP datagram is discarded. A dropped TCP connection has already completed its
//! handshake (the kernel did it), so "drop" is emulated by *holding* it: nothing is read or sent
//! until the client gives up, the routes change so that it can be served, or [`Hold::timeout`]
//! passes; then it is closed with FIN (never RST). At most [`Hold::max_held`] connections are
//! held per listener; beyond that a dropped connection is closed (FIN) at once.
//!
//! Drain: every endpoint of a listener has a [`CancellationToken`] (a child of the listener's
//! `drain` token, itself a child of the process-wide force token). A TCP connection waits on the
//! token of its endpoint. When an endpoint leaves the pool a timer cancels its token after the
//! drain timeout, unless the endpoint comes back first, in which case the same token is reused.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use ferry_lb::Pool;
use ferry_model::Endpoint;
use ipnet::IpNet;
use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Bounds on holding dropped TCP connections (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// How long a dropped connection is held before it is closed with FIN.
    pub timeout: Duration,
    /// Connections held at once per listener; more are closed (FIN) at once.
    pub max_held: usize,
}

impl Default for Hold {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(60), max_held: 1024 }
    }
}

/// A listener's pools and the per-client rules choosing among them (see the module docs).
#[derive(Debug)]
pub struct Routes {
    /// The pool for clients no other rule applies to.
    pub pool: Pool,
    /// Clients whose address is in the sources use the second pool.
    pub internal: Option<(Arc<[IpNet]>, Pool)>,
    /// When set, clients outside these ranges are dropped.
    pub allowed_sources: Option<Arc<[IpNet]>>,
    /// An empty chosen pool drops the client instead of refusing it.
    pub drop_when_empty: bool,
    /// TCP connections to the main pool's endpoints are made from the client's address
    /// (`IP_TRANSPARENT`), so those endpoints see the client's IP.
    pub transparent: bool,
}

impl Routes {
    /// One pool for every client; an empty pool refuses (`ferry lb`).
    pub fn single(pool: Pool) -> Self {
        Self { pool, internal: None, allowed_sources: None, drop_when_empty: false, transparent: false }
    }
}

/// What [`Upstreams::route`] decided for one client.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// Pick from this pool (it may be empty: then the client is refused).
    Pool(&'a Pool),
    /// Drop silently: hold a TCP connection, discard a datagram.
    Drop,
}

/// Whether `ip` is in any of `nets`.
fn within(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// The routes of a listener plus a drain token per endpoint address. Immutable once published.
#[derive(Debug)]
pub struct Upstreams {
    routes: Routes,
    drains: HashMap<SocketAddr, CancellationToken>,
    generation: u64,
}

impl Upstreams {
    /// The main pool (every client's pool unless the listener has an internal route).
    pub fn pool(&self) -> &Pool {
        &self.routes.pool
    }

    /// The pool for internal clients, when the listener has one.
    pub fn internal_pool(&self) -> Option<&Pool> {
        self.routes.internal.as_ref().map(|(_, p)| p)
    }

    /// Every pool of this listener (the main one first).
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.routes.pool).chain(self.internal_pool())
    }

    /// Where a connection or flow from `client` goes. Lock- and allocation-free.
    pub fn route(&self, client: IpAddr) -> Route<'_> {
        let r = &self.routes;
        if let Some(allowed) = &r.allowed_sources
            && !within(allowed, client)
        {
            return Route::Drop;
        }
        let pool = match &r.internal {
            Some((sources, pool)) if within(sources, client) => pool,
            _ => &r.pool,
        };
        if r.drop_when_empty && pool.endpoints().is_empty() {
            return Route::Drop;
        }
        Route::Pool(pool)
    }

    /// Whether connections to endpoints of `pool` (as returned by [`Self::route`]) are made from
    /// the client's address.
    pub fn transparent_for(&self, pool: &Pool) -> bool {
        self.routes.transparent && std::ptr::eq(pool, &self.routes.pool)
    }

    /// Whether `addr` is one of this listener's endpoints (in any pool).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.drains.contains_key(&addr)
    }

    /// Increases with every [`ListenerState::set_pool`]; lets UDP flows revalidate cheaply.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn drain_token(&self, addr: SocketAddr) -> Option<&CancellationToken> {
        self.drains.get(&addr)
    }
}

/// Metric handles of one listener, created once.
#[derive(Debug, Clone)]
pub(crate) struct ListenerMetrics {
    pub(crate) connections: Counter,
    pub(crate) active: Gauge,
    pub(crate) rx: Counter,
    pub(crate) tx: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) no_endpoint: Counter,
    pub(crate) dropped: Counter,
    pub(crate) datagrams_rx: Counter,
    pub(crate) datagrams_tx: Counter,
}

impl ListenerMetrics {
    fn new(name: &str) -> Self {
        let l = name.to_owned();
        Self {
            connections: metrics::counter!("ferry_listener_connections_total", "listener" => l.clone()),
            active: metrics::gauge!("ferry_listener_active_connections", "listener" => l.clone()),
            rx: metrics::counter!("ferry_listener_bytes_total", "listener" => l.clone(), "direction" => "rx"),
            tx: metrics::counter!("ferry_listener_bytes_total", "listener" => l.clone(), "direction" => "tx"),
            connect_failures: metrics::counter!("ferry_listener_connect_failures_total", "listener" => l.clone()),
            no_endpoint: metrics::counter!("ferry_listener_no_endpoint_total", "listener" => l.clone()),
            dropped: metrics::counter!("ferry_listener_dropped_total", "listener" => l.clone()),
            datagrams_rx: metrics::counter!("ferry_udp_datagrams_total", "listener" => l.clone(), "direction" => "rx"),
            datagrams_tx: metrics::counter!("ferry_udp_datagrams_total", "listener" => l, "direction" => "tx"),
        }
    }
}

#[derive(Debug)]
struct DrainEntry {
    token: CancellationToken,
    /// Set while a removal timer runs; cancelling it keeps the endpoint's connections.
    pending: Option<CancellationToken>,
}

/// State shared between one frontend socket's task and the manager.
#[derive(Debug)]
pub struct ListenerState {
    name: Arc<str>,
    upstreams: ArcSwap<Upstreams>,
    pub(crate) metrics: ListenerMetrics,
    /// Cancelled to force-close every connection of this listener.
    drain: CancellationToken,
    /// Every task of this listener (accept loop, connections, flows).
    pub(crate) tasks: TaskTracker,
    drain_timeout: Duration,
    entries: Mutex<HashMap<SocketAddr, DrainEntry>>,
    generation: AtomicU64,
    active: AtomicU64,
    hold: Hold,
    held: AtomicUsize,
    /// Woken by every route change (held connections re-route).
    changed: Notify,
}

// === impl ListenerState ===

impl ListenerState {
    /// State for a listener named `name` (the `listener` metric label) serving `pool` built over
    /// `endpoints`. `drain` force-closes its connections when cancelled; `drain_timeout` bounds
    /// how long connections to a removed endpoint survive.
    pub fn new(
        name: impl Into<Arc<str>>,
        pool: Pool,
        endpoints: &[Endpoint],
        drain: CancellationToken,
        drain_timeout: Duration,
    ) -> Arc<Self> {
        debug_assert_eq!(pool.endpoints().len(), endpoints.len());
        Self::with_routes(name, Routes::single(pool), drain, drain_timeout, Hold::default())
    }

    /// Like [`Self::new`], with per-client `routes` and the bounds on held connections.
    pub fn with_routes(
        name: impl Into<Arc<str>>,
        routes: Routes,
        drain: CancellationToken,
        drain_timeout: Duration,
        hold: Hold,
    ) -> Arc<Self> {
        let name = name.into();
        let mut entries = HashMap::new();
        let mut drains = HashMap::new();
        for addr in endpoint_addrs(&routes) {
            let token = drain.child_token();
            entries.insert(addr, DrainEntry { token: token.clone(), pending: None });
            drains.insert(addr, token);
        }
        Arc::new(Self {
            metrics: ListenerMetrics::new(&name),
            name,
            upstreams: ArcSwap::from_pointee(Upstreams { routes, drains, generation: 0 }),
            drain,
            tasks: TaskTracker::new(),
            drain_timeout,
            entries: Mutex::new(entries),
            generation: AtomicU64::new(0),
            active: AtomicU64::new(0),
            hold,
            held: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    /// The listener's display name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Open TCP connections or live UDP flows of this listener.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.increment(1.0);
    }

    pub(crate) fn closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active.decrement(1.0);
    }

    /// The current upstreams (one lock-free load).
    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.load_full()
    }

    /// The current upstreams, borrowed (cheaper than [`Self::upstreams`]; do not hold across awaits).
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Upstreams>> {
        self.upstreams.load()
    }

    /// The token that force-closes this listener's connections.
    pub fn drain_token(&self) -> &CancellationToken {
        &self.drain
    }

    /// Every task this listener spawned (accept loop, connections, UDP flows).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Publishes a new pool built over `endpoints` (one pool for every client). Endpoints that
    /// left get their connections closed after the drain timeout unless they come back before it
    /// passes.
    pub fn set_pool(&self, pool: Pool, endpoints: &[Endpoint]) {
        debug_assert_eq!(pool.endpoints().len(), endpoints.len());
        self.set_routes(Routes::single(pool));
    }

    /// Publishes new routes. Endpoints (of any pool) that left get their connections closed
    /// after the drain timeout unless they come back before it passes. Held connections re-route.
    pub fn set_routes(&self, routes: Routes) {
        let present: HashSet<SocketAddr> = endpoint_addrs(&routes).collect();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|addr, e| present.contains(addr) || !e.token.is_cancelled());
        for addr in &present {
            let e = entries
                .entry(*addr)
                .or_insert_with(|| DrainEntry { token: self.drain.child_token(), pending: None });
            if let Some(p) = e.pending.take() {
                p.cancel();
            }
            if e.token.is_cancelled() {
                e.token = self.drain.child_token();
            }
        }
        for (addr, e) in entries.iter_mut() {
            if present.contains(addr) || e.pending.is_some() {
                continue;
            }
            let abort = self.drain.child_token();
            e.pending = Some(abort.clone());
            let token = e.token.clone();
            let timeout = self.drain_timeout;
            let addr = *addr;
            let name = self.name.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(timeout) => {
                        tracing::debug!(listener = %name, endpoint = %addr, "drain timeout passed; closing connections");
                        token.cancel();
                    }
                    () = abort.cancelled() => {}
                }
            });
        }
        let drains = present
            .iter()
            .map(|a| {
                (*a, entries.get(a).map(|e| e.token.clone()).unwrap_or_else(|| self.drain.child_token()))
            })
            .collect();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.upstreams.store(Arc::new(Upstreams { routes, drains, generation }));
        drop(entries);
        self.changed.notify_waiters();
    }

    /// The bounds on held (dropped) TCP connections.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// TCP connections currently held because they were dropped.
    pub fn held_connections(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Reserves a hold slot; `None` when [`Hold::max_held`] connections are already held.
    pub(crate) fn try_hold(&self) -> Option<HeldSlot<'_>> {
        let max = self.hold.max_held;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| HeldSlot(self))
    }

    /// Resolves at the next route change (create it *before* reading the routes).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// One held connection; releases its slot when dropped.
pub(crate) struct HeldSlot<'a>(&'a ListenerState);

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint address of every pool of `routes`.
fn endpoint_addrs(routes: &Routes) -> impl Iterator<Item = SocketAddr> + '_ {
    std::iter::once(&routes.pool)
        .chain(routes.internal.as_ref().map(|(_, p)| p))
        .flat_map(|p| p.endpoints().iter().map(|e| e.addr()))
}
