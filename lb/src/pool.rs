//! [`Pool`], [`EndpointState`] and [`Lease`].

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
};

use ferry_model::{Endpoint, ServicePort};

/// Runtime state of one endpoint, shared by every pool that contains it.
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    active: AtomicU32,
    healthy: AtomicBool,
}

impl EndpointState {
    /// A fresh, healthy endpoint with no connections.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, active: AtomicU32::new(0), healthy: AtomicBool::new(true) }
    }

    /// Connections currently open to this endpoint through Ferry.
    pub fn active_connections(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the endpoint may be picked now.
    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a successful upstream connect.
    pub fn report_connect_success(&self) {}

    /// Records a failed upstream connect (passive health).
    pub fn report_connect_failure(&self) {}
}

/// The endpoints a frontend balances over, with balancer state.
#[derive(Debug)]
pub struct Pool {
    port: Arc<ServicePort>,
    endpoints: Box<[Arc<EndpointState>]>,
    cursor: AtomicUsize,
}

impl Pool {
    /// Builds a pool for `port` over `endpoints` (one of the port's categorised sets), reusing
    /// the state of endpoints that `previous` already had.
    pub fn new(port: Arc<ServicePort>, endpoints: &[Endpoint], previous: Option<&Pool>) -> Self {
        let endpoints = endpoints
            .iter()
            .map(|e| {
                previous
                    .and_then(|p| p.endpoints.iter().find(|s| s.addr == e.addr).cloned())
                    .unwrap_or_else(|| Arc::new(EndpointState::new(e.addr)))
            })
            .collect();
        Self { port, endpoints, cursor: AtomicUsize::new(0) }
    }

    /// The port this pool serves.
    pub fn port(&self) -> &Arc<ServicePort> {
        &self.port
    }

    /// The pool's endpoints.
    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Picks an endpoint for a new connection from `client`, skipping those in `tried`.
    /// `None` when no endpoint is available.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Lease> {
        let _ = client;
        let n = self.endpoints.len();
        for _ in 0..n {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
            let e = &self.endpoints[i];
            if e.is_available() && !tried.contains(&e.addr) {
                e.active.fetch_add(1, Ordering::Relaxed);
                return Some(Lease { endpoint: e.clone() });
            }
        }
        None
    }
}

/// An endpoint picked for one connection; counts as active until dropped.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<EndpointState>,
}

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
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}
