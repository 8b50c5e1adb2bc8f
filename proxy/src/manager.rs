//! The listener [`Manager`]: turns snapshots into bound sockets and running accept/recv loops.
//!
//! Owned by one task (the one running [`Manager::run`], or a test). For every snapshot it asks
//! the [`FrontendFilter`] which sockets to bind for which frontends and over which endpoints,
//! then diffs that set, keyed by `(FrontendKey, bind address)`, against the running listeners:
//! - new ones are bound (a failure is logged, counted and retried later; others are unaffected);
//! - removed ones stop accepting at once; their connections keep running until they end or the
//!   drain timeout passes;
//! - unchanged ones are untouched (never re-bound). When the port's `Arc<ServicePort>` or the
//!   endpoint set changed, a new [`Pool`] (carrying over endpoint state) is swapped in.
//!
//! Active health checks ([`Checks`]) follow the running listeners' pools: probes start for new
//! endpoints, stop for removed ones, and restart when a port's check configuration changes.
//!
//! Token tree: `force` (cancelled at the end of shutdown) -> one `drain` token per listener ->
//! one token per endpoint. A connection waits on its endpoint's token only.

use std::{collections::HashMap, fmt, io, net::SocketAddr, sync::Arc, time::Duration};

use ferry_lb::{Checks, Pool};
use ferry_model::{Endpoint, Frontend, FrontendKey, Protocol, ServicePort, Snapshot};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use crate::{ProxyConfig, error::Error, state::ListenerState, tcp, udp};

/// Backlog of TCP frontend sockets.
const BACKLOG: i32 = 1024;
/// Delay before binds that failed are retried when no new snapshot arrives.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// How long force-closed connections get to finish their cleanup at shutdown.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// One socket to bind for a frontend, and the endpoints it balances over.
#[derive(Clone, Debug)]
pub struct Binding {
    /// Local address to bind.
    pub addr: SocketAddr,
    /// The endpoint set (one of the port's categorised sets).
    pub endpoints: Arc<[Endpoint]>,
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
            out.push(Binding { addr, endpoints: port.endpoints.cluster.clone() });
        }
    }
}

/// What identifies a running listener.
type ListenerKey = (FrontendKey, SocketAddr);

#[derive(Debug)]
struct Running {
    port: Arc<ServicePort>,
    endpoints: Arc<[Endpoint]>,
    state: Arc<ListenerState>,
    stop: CancellationToken,
    local: SocketAddr,
}

/// Binds, updates and closes listeners as snapshots change.
#[derive(Debug)]
pub struct Manager {
    config: ProxyConfig,
    listeners: HashMap<ListenerKey, Running>,
    /// Removed listeners whose connections may still be running.
    retired: Vec<Arc<ListenerState>>,
    force: CancellationToken,
    bound: watch::Sender<Vec<(FrontendKey, SocketAddr)>>,
    failed: usize,
    /// Active health probes of every running listener's endpoints.
    checks: Checks,
}

// === impl Manager ===

impl Manager {
    /// A manager with no listeners.
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            config,
            listeners: HashMap::new(),
            retired: Vec::new(),
            force: CancellationToken::new(),
            bound: watch::Sender::new(Vec::new()),
            failed: 0,
            checks: Checks::new(),
        }
    }

    /// The bound local address of every running listener (useful with port 0).
    pub fn bound(&self) -> Vec<(FrontendKey, SocketAddr)> {
        let mut v: Vec<_> = self.listeners.iter().map(|(k, r)| (k.0, r.local)).collect();
        v.sort_unstable();
        v
    }

    /// The bound local address of the listener for `key`, if it runs.
    pub fn local_addr(&self, key: &FrontendKey) -> Option<SocketAddr> {
        self.listeners.iter().find(|(k, _)| k.0 == *key).map(|(_, r)| r.local)
    }

    /// The state of the listener for `key`, if it runs (connection counts, current pool).
    pub fn listener(&self, key: &FrontendKey) -> Option<&Arc<ListenerState>> {
        self.listeners.iter().find(|(k, _)| k.0 == *key).map(|(_, r)| &r.state)
    }

    /// A channel that carries [`Manager::bound`] after every [`Manager::apply`].
    pub fn subscribe_bound(&self) -> watch::Receiver<Vec<(FrontendKey, SocketAddr)>> {
        self.bound.subscribe()
    }

    /// Makes the running listeners match `snapshot`. Returns the bind failures (those
    /// listeners are retried on the next call); every other listener is served regardless.
    /// Must be called inside a tokio runtime.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Vec<Error> {
        let mut want: HashMap<ListenerKey, (Arc<ServicePort>, Arc<[Endpoint]>)> = HashMap::new();
        let mut out = Vec::new();
        for (key, port) in snapshot.frontends.iter() {
            let (FrontendKey::Addr(protocol, _) | FrontendKey::NodePort(protocol, _)) = *key;
            if protocol == Protocol::Sctp {
                continue;
            }
            out.clear();
            self.config.filter.bindings(key, port, &mut out);
            for b in out.drain(..) {
                want.insert((*key, b.addr), (port.clone(), b.endpoints));
            }
        }

        let gone: Vec<ListenerKey> =
            self.listeners.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in gone {
            if let Some(r) = self.listeners.remove(&key) {
                tracing::info!(listener = %r.state.name(), local = %r.local, "closing listener");
                self.retire(r);
            }
        }
        self.retired.retain(|s| !s.tasks.is_empty());

        let mut errors = Vec::new();
        for (key, (port, endpoints)) in want {
            if let Some(r) = self.listeners.get_mut(&key) {
                if !Arc::ptr_eq(&r.port, &port) || !Arc::ptr_eq(&r.endpoints, &endpoints) {
                    let old = r.state.upstreams();
                    let pool = Pool::new(port.clone(), &endpoints, Some(old.pool()));
                    r.state.set_pool(pool, &endpoints);
                    tracing::debug!(listener = %r.state.name(), endpoints = endpoints.len(), "pool updated");
                    r.port = port;
                    r.endpoints = endpoints;
                }
                continue;
            }
            match self.start(key, port, endpoints) {
                Ok(r) => {
                    tracing::info!(listener = %r.state.name(), local = %r.local, "listening");
                    self.listeners.insert(key, r);
                }
                Err((name, error)) => {
                    metrics::counter!("ferry_listener_bind_failures_total", "listener" => name.clone())
                        .increment(1);
                    tracing::warn!(listener = %name, %error, "bind failed; will retry");
                    errors.push(error);
                }
            }
        }
        self.failed = errors.len();
        self.bound.send_replace(self.bound());
        let upstreams: Vec<_> = self.listeners.values().map(|r| r.state.upstreams()).collect();
        self.checks.sync_all(upstreams.iter().map(|u| u.pool()));
        errors
    }

    fn start(
        &self,
        key: ListenerKey,
        port: Arc<ServicePort>,
        endpoints: Arc<[Endpoint]>,
    ) -> Result<Running, (String, Error)> {
        let name = port.display_name();
        let (FrontendKey::Addr(protocol, _) | FrontendKey::NodePort(protocol, _)) = key.0;
        let addr = key.1;
        let socket = bind(protocol, addr).map_err(|source| (name.clone(), Error::Bind { addr, source }))?;
        let local = socket
            .local_addr()
            .and_then(|a| a.as_socket().ok_or_else(|| io::Error::other("not an IP socket")))
            .map_err(|source| (name.clone(), Error::Bind { addr, source }))?;
        let pool = Pool::new(port.clone(), &endpoints, None);
        let state =
            ListenerState::new(name, pool, &endpoints, self.force.child_token(), self.config.drain_timeout);
        let stop = CancellationToken::new();
        let spawned = match protocol {
            Protocol::Udp => UdpSocket::from_std(socket.into()).map(|s| {
                state.tasks.spawn(udp::serve(s, state.clone(), self.config.max_udp_flows, stop.clone()))
            }),
            _ => TcpListener::from_std(socket.into())
                .map(|l| state.tasks.spawn(tcp::serve(l, state.clone(), stop.clone()))),
        };
        if let Err(source) = spawned {
            return Err((state.name().to_string(), Error::Bind { addr, source }));
        }
        Ok(Running { port, endpoints, state, stop, local })
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
            self.apply(&snapshot);
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
        for (_, r) in self.listeners.drain() {
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

/// A non-blocking frontend socket: `SO_REUSEADDR`, `SO_REUSEPORT`, `IPV6_V6ONLY` for v6,
/// listening with a backlog of [`BACKLOG`] for TCP.
pub(crate) fn bind(protocol: Protocol, addr: SocketAddr) -> io::Result<Socket> {
    let ty = if protocol == Protocol::Udp { Type::DGRAM } else { Type::STREAM };
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
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
