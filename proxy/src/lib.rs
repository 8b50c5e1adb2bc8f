//! Ferry's data plane: listeners, L4 TCP and UDP proxying.
//!
//! The data plane never imports kube: it reads `Arc<Snapshot>`s from a `watch` channel.
//!
//! Layers, top down:
//! - [`serve`]: the entry point of the binary; runs a [`Manager`] until shutdown.
//! - [`Manager`]: binds/updates/closes listeners as snapshots change ([`manager`]).
//! - [`tcp::serve`] / [`udp::serve`]: one already-bound socket and its [`ListenerState`]
//!   (mini-redis style: tests bind `127.0.0.1:0` themselves).
//! - [`Workers`]: optional data-plane threads, one current-thread runtime each, that run the
//!   listeners (one `SO_REUSEPORT` socket per thread), their connections and UDP flows.
//! - [`Handoff`]: sockets inherited from the process this one replaces, and handed to the next.
//! - `sys`: the only unsafe code (`splice(2)`, batched UDP I/O with `IP_PKTINFO`, registering std
//!   sockets with the reactor).

pub mod error;
pub mod handoff;
pub mod health;
pub mod host;
pub mod manager;
pub mod node;
mod state;
#[cfg(target_os = "linux")]
mod sys;
pub mod tcp;
pub mod udp;
mod workers;

use std::{sync::Arc, time::Duration};

use ferry_model::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::{
    error::{Error, Side},
    handoff::Handoff,
    manager::{Binding, FrontendFilter, InternalRoute, ListenerFrontends, Manager},
    node::{NodeConfig, NodeFrontends},
    state::{Hold, ListenerState, Route, Routes, Upstreams},
    workers::Workers,
};

/// Data-plane settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// How long connections survive the removal of their endpoint or listener, and shutdown.
    pub drain_timeout: Duration,
    /// Bound on UDP flows per listener (with workers, each worker's socket holds its share).
    pub max_udp_flows: usize,
    /// Which frontends this process serves.
    pub filter: Arc<dyn FrontendFilter>,
    /// Data-plane threads for the listeners (see [`Workers`]); `None`: they are served on the
    /// runtime that runs the [`Manager`].
    pub workers: Option<Workers>,
    /// Sockets inherited from a predecessor, taken before binding, and the registry of served
    /// sockets a successor takes over ([`Handoff`]; disabled by default).
    pub handoff: Arc<Handoff>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            max_udp_flows: udp::DEFAULT_MAX_FLOWS,
            filter: Arc::new(ListenerFrontends),
            workers: None,
            handoff: Handoff::disabled(),
        }
    }
}

/// Raises the soft file-descriptor limit to the hard limit, as proxies do at startup; returns the
/// (old, new) soft limits. Call it once, before serving.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    sys::raise_nofile_limit()
}

/// Serves every frontend the snapshots on `snapshots` describe (as chosen by
/// `config.filter`) until `shutdown` is cancelled; then closes the listeners, drains
/// connections for up to `config.drain_timeout` and returns.
pub async fn serve(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Manager::new(config).run(snapshots, shutdown).await
}

#[cfg(test)]
mod tests;
