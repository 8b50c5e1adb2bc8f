//! [`ListenerState`]: what one frontend socket shares with the manager.
//!
//! The accept/recv loop reads the current [`Upstreams`] with one `ArcSwap` load per connection or
//! datagram (no lock). The manager replaces it with [`ListenerState::set_pool`] when the snapshot
//! changes the port; only that call takes the (uncontended) drain-bookkeeping mutex.
//!
//! Drain: every endpoint of a listener has a [`CancellationToken`] (a child of the listener's
//! `drain` token, itself a child of the process-wide force token). A TCP connection waits on the
//! token of its endpoint. When an endpoint leaves the pool a timer cancels its token after the
//! drain timeout, unless the endpoint comes back first, in which case the same token is reused.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use ferry_lb::Pool;
use ferry_model::Endpoint;
use metrics::{Counter, Gauge};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The pool of a listener plus a drain token per endpoint address. Immutable once published.
#[derive(Debug)]
pub struct Upstreams {
    pool: Pool,
    drains: HashMap<SocketAddr, CancellationToken>,
    generation: u64,
}

impl Upstreams {
    /// The pool to pick from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether `addr` is one of this pool's endpoints.
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
        let name = name.into();
        let mut entries = HashMap::with_capacity(endpoints.len());
        let drains = endpoints
            .iter()
            .map(|e| {
                let token = drain.child_token();
                entries.insert(e.addr, DrainEntry { token: token.clone(), pending: None });
                (e.addr, token)
            })
            .collect();
        Arc::new(Self {
            metrics: ListenerMetrics::new(&name),
            name,
            upstreams: ArcSwap::from_pointee(Upstreams { pool, drains, generation: 0 }),
            drain,
            tasks: TaskTracker::new(),
            drain_timeout,
            entries: Mutex::new(entries),
            generation: AtomicU64::new(0),
            active: AtomicU64::new(0),
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

    /// Publishes a new pool built over `endpoints`. Endpoints that left get their connections
    /// closed after the drain timeout unless they come back before it passes.
    pub fn set_pool(&self, pool: Pool, endpoints: &[Endpoint]) {
        let present: HashSet<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
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
        self.upstreams.store(Arc::new(Upstreams { pool, drains, generation }));
    }
}
