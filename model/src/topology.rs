//! kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`), reference §2.
//!
//! [`categorize`] is a pure function of one service port's endpoints, this node, and the
//! service's policies. The `PreferSameTrafficDistribution` feature gate is treated as on (GA in
//! 1.35): node hints (`forNodes`) are tried first, then zone hints (`forZones`).
//!
//! Rules, each with a unit test of the same name:
//! 1. No endpoints: everything empty, `has_any = false`.
//! 2. The cluster set is computed only if the port *uses cluster endpoints*
//!    (`iTP != Local` or externally accessible).
//!    a. Topology mode from hints of **Ready** endpoints only: none Ready → no topology; every Ready
//!    endpoint has `forNodes` and one names this node → `PreferSameNode`; else every Ready endpoint
//!    has `forZones` and one names this node's zone → `PreferSameZone`; else no topology. A node
//!    without a zone label (or no node at all) never matches.
//!    b. Cluster set = Ready endpoints passing the topology filter.
//!    c. Empty → all Serving AND Terminating endpoints (topology not re-applied).
//!    d. `has_any = !cluster.is_empty()`.
//! 3. The local set is computed only if the port *uses local endpoints*
//!    (`iTP == Local` or (`eTP == Local` and externally accessible)).
//! 4. Local set: any Ready or Serving+Terminating endpoint anywhere sets `has_any`; local Ready
//!    endpoints if any, else local Serving+Terminating ones, else empty. Topology never applies.
//!
//! `allReachable` (§2.5) is not kept: the data plane picks from `cluster` or `local` directly.
//! When a set equals `all` it shares `all`'s allocation.

use std::sync::Arc;

use crate::{
    endpoint::{Endpoint, Endpoints, TopologyMode},
    index::NodeInfo,
    service::TrafficPolicy,
};

/// Categorises one port's endpoints for `node`, like kube-proxy's `CategorizeEndpoints`.
///
/// `endpoints` must already be deduplicated by address; they are kept in `all` as given.
/// `externally_accessible`: the port has a NodePort, a VIP-mode load-balancer IP or an external IP.
pub fn categorize(
    endpoints: &[Endpoint],
    node: Option<&NodeInfo>,
    internal_traffic_policy: TrafficPolicy,
    external_traffic_policy: TrafficPolicy,
    externally_accessible: bool,
) -> Endpoints {
    categorize_arc(
        Arc::from(endpoints),
        node,
        internal_traffic_policy,
        external_traffic_policy,
        externally_accessible,
    )
}

/// [`categorize`] taking ownership of `all`, so sets equal to it share its allocation.
pub(crate) fn categorize_arc(
    all: Arc<[Endpoint]>,
    node: Option<&NodeInfo>,
    itp: TrafficPolicy,
    etp: TrafficPolicy,
    externally_accessible: bool,
) -> Endpoints {
    let empty: Arc<[Endpoint]> = Arc::from([]);
    if all.is_empty() {
        return Endpoints {
            all,
            cluster: empty.clone(),
            local: empty,
            has_any: false,
            topology: TopologyMode::None,
        };
    }
    let uses_cluster = itp != TrafficPolicy::Local || externally_accessible;
    let uses_local = itp == TrafficPolicy::Local || (etp == TrafficPolicy::Local && externally_accessible);
    let node_name = node.map(|n| &*n.name).filter(|n| !n.is_empty());
    let zone = node.and_then(|n| n.zone.as_deref()).filter(|z| !z.is_empty());

    let mut has_any = false;
    let mut topology = TopologyMode::None;
    let mut cluster = empty.clone();
    if uses_cluster {
        topology = topology_mode(&all, node_name, zone);
        cluster = filter(&all, |ep| ep.ready && available_for_topology(ep, topology, node_name, zone));
        if cluster.is_empty() {
            cluster = filter(&all, |ep| ep.serving && ep.terminating);
        }
        has_any = !cluster.is_empty();
    }

    let mut local = empty;
    if uses_local {
        let is_local = |ep: &Endpoint| node_name.is_some() && ep.node_name.as_deref() == node_name;
        let (mut local_ready, mut local_serving_terminating) = (false, false);
        for ep in all.iter() {
            if ep.ready {
                has_any = true;
                local_ready |= is_local(ep);
            } else if ep.serving && ep.terminating {
                has_any = true;
                local_serving_terminating |= is_local(ep);
            }
        }
        if local_ready {
            local = filter(&all, |ep| is_local(ep) && ep.ready);
        } else if local_serving_terminating {
            local = filter(&all, |ep| is_local(ep) && ep.serving && ep.terminating);
        }
    }
    Endpoints { all, cluster, local, has_any, topology }
}

/// Step 2a: the topology mode, from the hints of Ready endpoints.
fn topology_mode(all: &[Endpoint], node_name: Option<&str>, zone: Option<&str>) -> TopologyMode {
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in all.iter().filter(|ep| ep.ready) {
        let nodes = ep.hints.as_ref().map_or(&[][..], |h| &h.for_nodes[..]);
        let zones = ep.hints.as_ref().map_or(&[][..], |h| &h.for_zones[..]);
        if nodes.is_empty() {
            all_node_hints = false;
        } else if node_name.is_some_and(|n| nodes.iter().any(|h| &**h == n)) {
            for_node = true;
        }
        if zones.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| zones.iter().any(|h| &**h == z)) {
            for_zone = true;
        }
    }
    // With no Ready endpoint, `for_node` and `for_zone` stay false: no topology.
    if all_node_hints && for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(
    ep: &Endpoint,
    mode: TopologyMode,
    node_name: Option<&str>,
    zone: Option<&str>,
) -> bool {
    let hints = ep.hints.as_ref();
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => {
            node_name.is_some_and(|n| hints.is_some_and(|h| h.for_nodes.iter().any(|x| &**x == n)))
        }
        TopologyMode::PreferSameZone => {
            zone.is_some_and(|z| hints.is_some_and(|h| h.for_zones.iter().any(|x| &**x == z)))
        }
    }
}

/// The endpoints of `all` that pass `keep`, sharing `all` when every endpoint passes.
fn filter(all: &Arc<[Endpoint]>, keep: impl Fn(&Endpoint) -> bool) -> Arc<[Endpoint]> {
    if all.iter().all(&keep) {
        return all.clone();
    }
    all.iter().filter(|ep| keep(ep)).cloned().collect()
}

#[cfg(test)]
mod tests;
