//! Endpoints and their categorisation for one node.
//!
//! An [`Endpoint`] is one `addresses[0]:port` of an `EndpointSlice` endpoint (or one resolved
//! listener backend) with its conditions. [`Endpoints`] holds the raw list plus the sets that
//! kube-proxy's `CategorizeEndpoints` derives from it (see [`crate::topology`]).

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

/// One endpoint address and port with its conditions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `addresses[0]` and the resolved target port.
    pub addr: SocketAddr,
    /// `conditions.ready` (nil means true).
    pub ready: bool,
    /// `conditions.serving` (nil means true).
    pub serving: bool,
    /// `conditions.terminating` (nil means false).
    pub terminating: bool,
    /// `nodeName`.
    pub node_name: Option<Arc<str>>,
    /// `zone`.
    pub zone: Option<Arc<str>>,
    /// `hostname` (headless DNS records).
    pub hostname: Option<Arc<str>>,
    /// `hints`, when the slice carries any.
    pub hints: Option<EndpointHints>,
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint with no topology: what a listener backend is.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            hostname: None,
            hints: None,
        }
    }
}

/// `EndpointSlice` topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    /// `hints.forZones[*].name`.
    pub for_zones: Vec<Arc<str>>,
    /// `hints.forNodes[*].name`.
    pub for_nodes: Vec<Arc<str>>,
}

/// Which topology filter the cluster set was built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopologyMode {
    /// Hints ignored.
    #[default]
    None,
    /// Only endpoints hinted for this node.
    PreferSameNode,
    /// Only endpoints hinted for this node's zone.
    PreferSameZone,
}

/// The endpoints of one service port, categorised for this node.
///
/// `all` is deduplicated by `ip:port` (a non-terminating entry wins). `cluster` and `local` are
/// the sets kube-proxy's `CategorizeEndpoints` returns; they are empty when the service's traffic
/// policies do not use them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Every endpoint, deduplicated, in a stable order (sorted by address).
    pub all: Arc<[Endpoint]>,
    /// Endpoints for cluster-wide traffic (topology-filtered Ready, else Serving+Terminating).
    pub cluster: Arc<[Endpoint]>,
    /// Endpoints on this node (Ready, else Serving+Terminating); topology never applies.
    pub local: Arc<[Endpoint]>,
    /// Whether any usable endpoint exists anywhere (decides REJECT vs DROP).
    pub has_any: bool,
    /// The topology filter applied to `cluster`.
    pub topology: TopologyMode,
}
