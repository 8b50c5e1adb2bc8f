//! [`Pool`] and [`Lease`] (and a re-export of [`EndpointState`]).
//!
//! A pool is immutable once built except for its atomics and its affinity table: the endpoint set
//! changes by building a new pool with [`Pool::new`] and the old one as `previous`, which carries
//! over every surviving endpoint's [`EndpointState`], the round-robin cursor and (when the affinity
//! configuration is unchanged) the ClientIP affinity table.
//!
//! Selection ([`Pool::pick`]):
//! 1. With ClientIP affinity, a live table entry whose endpoint is still in the pool, available
//!    and not in `tried` wins (and is refreshed).
//! 2. Otherwise the port's [`Balancing`] chooses among the available
//!    endpoints not in `tried` (see [`crate::balance`]; for `Maglev`, [`crate::maglev`]: the
//!    client's slot of the pool's table, then the table's deterministic fallback), and the choice
//!    is recorded in the affinity table.
//! 3. **Panic mode** (Envoy's panic threshold, at 0 %): when *no* endpoint of the pool is
//!    available (all unhealthy or ejected), health information is presumed wrong and steps 1-2
//!    run over every endpoint not in `tried`. Refusing every connection would turn a broken
//!    health check into an outage; with panic routing, endpoints that do work still get traffic.
//!    When at least one endpoint is available but all of those were tried, `pick` returns `None`.
//!
//! The Maglev table is built in [`Pool::new`] when the balancing is `Maglev`, and shared with
//! the previous pool when that had a table over the same endpoint list (same addresses, same
//! order), so configuration changes that keep the endpoints cost no rebuild.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use ferry_model::{Balancing, Endpoint, ServicePort, SessionAffinity};

pub use crate::endpoint::{EndpointHealth, EndpointState};
use crate::{
    affinity::AffinityTable,
    balance::{self, ThreadRandom},
    maglev,
};

/// The endpoints a frontend balances over, with balancer state.
#[derive(Debug)]
pub struct Pool {
    port: Arc<ServicePort>,
    endpoints: Box<[Arc<EndpointState>]>,
    /// Address -> position in `endpoints`.
    index: HashMap<SocketAddr, usize>,
    cursor: AtomicUsize,
    affinity: Option<Arc<AffinityTable>>,
    /// The Maglev table over `endpoints`, when the balancing is `Maglev`.
    maglev: Option<Arc<maglev::Table>>,
    panics: metrics::Counter,
}

// === impl Pool ===

impl Pool {
    /// Builds a pool for `port` over `endpoints` (one of the port's categorised sets), reusing
    /// the state of endpoints that `previous` already had, its round-robin position, and its
    /// affinity table if `port.session_affinity` is unchanged.
    pub fn new(port: Arc<ServicePort>, endpoints: &[Endpoint], previous: Option<&Pool>) -> Self {
        let endpoints: Box<[Arc<EndpointState>]> = endpoints
            .iter()
            .map(|e| {
                let state = previous
                    .and_then(|p| p.get(e.addr))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointState::new(e.addr)));
                state.configure_passive(port.passive_health);
                state
            })
            .collect();
        let mut index = HashMap::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            index.entry(e.addr).or_insert(i);
        }
        let affinity = match port.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout } => Some(
                previous
                    .filter(|p| p.port.session_affinity == port.session_affinity)
                    .and_then(|p| p.affinity.clone())
                    .unwrap_or_else(|| Arc::new(AffinityTable::new(timeout))),
            ),
        };
        // Start somewhere random so that many pools do not all send their first connection to
        // their first endpoint after a restart.
        let cursor = previous.map_or_else(|| fastrand::usize(..), |p| p.cursor.load(Ordering::Relaxed));
        let maglev = (port.balancing == Balancing::Maglev).then(|| {
            previous
                .filter(|p| p.endpoints.iter().map(|e| e.addr).eq(endpoints.iter().map(|e| e.addr)))
                .and_then(|p| p.maglev.clone())
                .unwrap_or_else(|| {
                    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                    Arc::new(maglev::Table::build_with(&addrs, maglev::POOL_MIN_TABLE_SIZE))
                })
        });
        let panics = metrics::counter!("ferry_pool_panic_picks_total", "listener" => port.display_name());
        Self { port, endpoints, index, cursor: AtomicUsize::new(cursor), affinity, maglev, panics }
    }

    /// The port this pool serves.
    pub fn port(&self) -> &Arc<ServicePort> {
        &self.port
    }

    /// The pool's endpoints.
    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// The state of the endpoint at `addr`, if it is in the pool.
    pub fn get(&self, addr: SocketAddr) -> Option<&Arc<EndpointState>> {
        self.index.get(&addr).map(|&i| &self.endpoints[i])
    }

    /// The ClientIP affinity table, when the port has ClientIP affinity.
    pub fn affinity(&self) -> Option<&Arc<AffinityTable>> {
        self.affinity.as_ref()
    }

    /// The Maglev table (slots index [`Self::endpoints`]), when the balancing is `Maglev`.
    pub fn maglev(&self) -> Option<&maglev::Table> {
        self.maglev.as_deref()
    }

    /// Whether any endpoint is available at `now` (if not, picks run in panic mode).
    pub fn any_available_at(&self, now: Instant) -> bool {
        self.endpoints.iter().any(|e| e.is_available_at(now))
    }

    /// Picks an endpoint for a new connection from `client`, skipping those in `tried`.
    /// `None` when every candidate was tried (see the module docs for panic mode).
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Lease> {
        self.pick_at(client, tried, Instant::now())
    }

    /// [`Self::pick`] at `now`.
    pub fn pick_at(&self, client: IpAddr, tried: &[SocketAddr], now: Instant) -> Option<Lease> {
        let normal = |e: &Arc<EndpointState>| e.is_available_at(now) && !tried.contains(&e.addr);
        if let Some(i) = self.choose(client, now, normal) {
            return Some(self.lease(i));
        }
        if self.endpoints.is_empty() || self.any_available_at(now) {
            return None;
        }
        let i = self.choose(client, now, |e: &Arc<EndpointState>| !tried.contains(&e.addr))?;
        self.panics.increment(1);
        tracing::debug!(
            listener = %self.port.display_name(),
            endpoint = %self.endpoints[i].addr,
            "no endpoint available; panic mode picks among all endpoints"
        );
        Some(self.lease(i))
    }

    /// Affinity, then balancing, over the endpoints `eligible` accepts.
    fn choose(
        &self,
        client: IpAddr,
        now: Instant,
        eligible: impl Fn(&Arc<EndpointState>) -> bool,
    ) -> Option<usize> {
        if let Some(table) = &self.affinity {
            let hit = table.lookup(client, now, |addr| {
                self.index.get(&addr).copied().filter(|&i| eligible(&self.endpoints[i]))
            });
            if hit.is_some() {
                return hit;
            }
        }
        let i = match &self.maglev {
            Some(table) => table.pick(client, |i| eligible(&self.endpoints[i]))?,
            None => balance::select(
                self.port.balancing,
                &self.endpoints,
                &self.cursor,
                &eligible,
                |e| e.active_connections(),
                &mut ThreadRandom,
            )?,
        };
        if let Some(table) = &self.affinity {
            table.record(client, self.endpoints[i].addr, now);
        }
        Some(i)
    }

    fn lease(&self, i: usize) -> Lease {
        let endpoint = self.endpoints[i].clone();
        endpoint.acquire();
        Lease { endpoint }
    }
}

/// An endpoint picked for one connection; counts as active until dropped.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<EndpointState>,
}

// === impl Lease ===

impl Lease {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The endpoint's state.
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.release();
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
pub(crate) mod tests;
