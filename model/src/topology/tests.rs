//! One test per rule of reference §2 (see the module docs of [`super`]).

use std::net::SocketAddr;

use super::*;
use crate::endpoint::EndpointHints;

const CLUSTER: TrafficPolicy = TrafficPolicy::Cluster;
const LOCAL: TrafficPolicy = TrafficPolicy::Local;

fn node(name: &str, zone: Option<&str>) -> NodeInfo {
    NodeInfo { name: name.into(), zone: zone.map(Into::into) }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

/// Endpoint `i` on `node` with conditions `rst` (ready, serving, terminating).
fn ep(i: u8, on: &str, (ready, serving, terminating): (bool, bool, bool)) -> Endpoint {
    Endpoint { node_name: Some(on.into()), ready, serving, terminating, ..Endpoint::ready(addr(i)) }
}

const READY: (bool, bool, bool) = (true, true, false);
const SERVING_TERMINATING: (bool, bool, bool) = (false, true, true);
const TERMINATING_NOT_SERVING: (bool, bool, bool) = (false, false, true);
const NOT_READY: (bool, bool, bool) = (false, false, false);

fn zone_hint(mut e: Endpoint, zones: &[&str]) -> Endpoint {
    let h = e.hints.get_or_insert_with(EndpointHints::default);
    h.for_zones = zones.iter().map(|z| Arc::from(*z)).collect();
    e
}

fn node_hint(mut e: Endpoint, nodes: &[&str]) -> Endpoint {
    let h = e.hints.get_or_insert_with(EndpointHints::default);
    h.for_nodes = nodes.iter().map(|z| Arc::from(*z)).collect();
    e
}

fn addrs(set: &[Endpoint]) -> Vec<SocketAddr> {
    set.iter().map(|e| e.addr).collect()
}

fn cluster(eps: &[Endpoint], n: &NodeInfo) -> Endpoints {
    categorize(eps, Some(n), CLUSTER, CLUSTER, false)
}

#[test]
fn empty_list_gives_nothing() {
    let n = node("a", Some("z1"));
    for (itp, etp, ext) in [(CLUSTER, CLUSTER, false), (LOCAL, LOCAL, true), (LOCAL, CLUSTER, false)] {
        let e = categorize(&[], Some(&n), itp, etp, ext);
        assert!(e.all.is_empty() && e.cluster.is_empty() && e.local.is_empty());
        assert!(!e.has_any);
        assert_eq!(e.topology, TopologyMode::None);
    }
}

#[test]
fn cluster_set_is_ready_endpoints_without_topology() {
    let n = node("a", Some("z1"));
    let eps = [ep(1, "a", READY), ep(2, "b", NOT_READY), ep(3, "c", READY), ep(4, "b", SERVING_TERMINATING)];
    let e = cluster(&eps, &n);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(3)]);
    assert!(e.local.is_empty(), "local set only for policies that use it");
    assert!(e.has_any);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.all), addrs(&eps));
}

#[test]
fn cluster_set_shares_all_when_every_endpoint_is_ready() {
    let n = node("a", None);
    let e = cluster(&[ep(1, "a", READY), ep(2, "b", READY)], &n);
    assert!(Arc::ptr_eq(&e.all, &e.cluster));
}

#[test]
fn prefer_same_zone_when_every_ready_endpoint_has_zone_hints() {
    let n = node("a", Some("z1"));
    let eps = [
        zone_hint(ep(1, "a", READY), &["z1"]),
        zone_hint(ep(2, "b", READY), &["z2"]),
        zone_hint(ep(3, "c", READY), &["z2", "z1"]),
    ];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::PreferSameZone);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(3)]);
}

#[test]
fn prefer_same_node_wins_over_zone_hints() {
    let n = node("a", Some("z1"));
    let eps = [
        node_hint(zone_hint(ep(1, "a", READY), &["z1"]), &["a"]),
        node_hint(zone_hint(ep(2, "b", READY), &["z1"]), &["b"]),
    ];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::PreferSameNode);
    assert_eq!(addrs(&e.cluster), [addr(1)]);
}

#[test]
fn node_hints_for_other_nodes_fall_back_to_zone_hints() {
    let n = node("a", Some("z1"));
    let eps = [
        node_hint(zone_hint(ep(1, "b", READY), &["z1"]), &["b"]),
        node_hint(zone_hint(ep(2, "c", READY), &["z2"]), &["c"]),
    ];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::PreferSameZone);
    assert_eq!(addrs(&e.cluster), [addr(1)]);
}

#[test]
fn one_endpoint_without_node_hint_disables_same_node() {
    let n = node("a", None);
    let eps = [node_hint(ep(1, "a", READY), &["a"]), ep(2, "b", READY)];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)]);
}

#[test]
fn one_unhinted_endpoint_disables_topology() {
    let n = node("a", Some("z1"));
    let eps =
        [zone_hint(ep(1, "a", READY), &["z1"]), zone_hint(ep(2, "b", READY), &["z2"]), ep(3, "c", READY)];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2), addr(3)]);
}

#[test]
fn hints_of_not_ready_endpoints_are_ignored() {
    // The unhinted endpoint is not Ready, so it does not disable topology.
    let n = node("a", Some("z1"));
    let eps =
        [zone_hint(ep(1, "a", READY), &["z1"]), zone_hint(ep(2, "b", READY), &["z2"]), ep(3, "c", NOT_READY)];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::PreferSameZone);
    assert_eq!(addrs(&e.cluster), [addr(1)]);
}

#[test]
fn no_hint_for_this_zone_disables_topology() {
    let n = node("a", Some("z3"));
    let eps = [zone_hint(ep(1, "a", READY), &["z1"]), zone_hint(ep(2, "b", READY), &["z2"])];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)]);
}

#[test]
fn node_without_zone_label_never_matches_zone_hints() {
    let n = node("a", None);
    let eps = [zone_hint(ep(1, "a", READY), &["z1"]), zone_hint(ep(2, "b", READY), &[""])];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)]);
}

#[test]
fn standalone_without_node_uses_no_topology_and_no_local_set() {
    let eps = [zone_hint(ep(1, "a", READY), &["z1"])];
    let e = categorize(&eps, None, LOCAL, LOCAL, true);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1)]);
    assert!(e.local.is_empty());
    assert!(e.has_any);
}

#[test]
fn topology_ignored_when_no_ready_endpoints() {
    // Every endpoint carries hints for this zone, but none is Ready: no topology, and the
    // serving-terminating fallback takes all of them regardless of hints.
    let n = node("a", Some("z1"));
    let eps = [
        zone_hint(ep(1, "a", SERVING_TERMINATING), &["z1"]),
        zone_hint(ep(2, "b", SERVING_TERMINATING), &["z2"]),
    ];
    let e = cluster(&eps, &n);
    assert_eq!(e.topology, TopologyMode::None);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)]);
    assert!(e.has_any);
}

#[test]
fn cluster_falls_back_to_serving_terminating() {
    let n = node("a", None);
    let eps = [ep(1, "a", NOT_READY), ep(2, "b", SERVING_TERMINATING), ep(3, "c", TERMINATING_NOT_SERVING)];
    let e = cluster(&eps, &n);
    assert_eq!(addrs(&e.cluster), [addr(2)]);
    assert!(e.has_any);
}

#[test]
fn serving_terminating_not_used_while_any_endpoint_is_ready() {
    let n = node("a", None);
    let eps = [ep(1, "a", READY), ep(2, "b", SERVING_TERMINATING)];
    assert_eq!(addrs(&cluster(&eps, &n).cluster), [addr(1)]);
}

#[test]
fn terminating_not_serving_is_never_used() {
    let n = node("a", None);
    let eps = [ep(1, "a", TERMINATING_NOT_SERVING), ep(2, "a", NOT_READY)];
    for (itp, etp, ext) in [(CLUSTER, CLUSTER, false), (LOCAL, LOCAL, true)] {
        let e = categorize(&eps, Some(&n), itp, etp, ext);
        assert!(e.cluster.is_empty() && e.local.is_empty());
        assert!(!e.has_any);
    }
}

#[test]
fn has_any_false_when_cluster_set_empty_and_local_unused() {
    let n = node("a", None);
    let e = cluster(&[ep(1, "a", NOT_READY)], &n);
    assert!(!e.has_any);
    assert_eq!(e.all.len(), 1);
}

#[test]
fn uses_cluster_endpoints_false_with_internal_local_not_externally_accessible() {
    let n = node("a", Some("z1"));
    let eps = [ep(1, "a", READY), ep(2, "b", READY)];
    let e = categorize(&eps, Some(&n), LOCAL, CLUSTER, false);
    assert!(e.cluster.is_empty(), "cluster set not computed");
    assert_eq!(addrs(&e.local), [addr(1)]);
    assert!(e.has_any);
}

#[test]
fn uses_cluster_endpoints_true_with_internal_local_when_externally_accessible() {
    let n = node("a", None);
    let eps = [ep(1, "a", READY), ep(2, "b", READY)];
    let e = categorize(&eps, Some(&n), LOCAL, CLUSTER, true);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)]);
    assert_eq!(addrs(&e.local), [addr(1)]);
}

#[test]
fn uses_local_endpoints_for_external_local_only_when_externally_accessible() {
    let n = node("a", None);
    let eps = [ep(1, "a", READY), ep(2, "b", READY)];
    let e = categorize(&eps, Some(&n), CLUSTER, LOCAL, false);
    assert!(e.local.is_empty(), "eTP=Local without external frontends uses no local set");
    let e = categorize(&eps, Some(&n), CLUSTER, LOCAL, true);
    assert_eq!(addrs(&e.local), [addr(1)]);
    assert_eq!(addrs(&e.cluster), [addr(1), addr(2)], "cluster set kept for the short-circuit");
}

#[test]
fn local_set_ignores_topology() {
    let n = node("a", Some("z1"));
    let eps = [
        zone_hint(ep(1, "a", READY), &["z2"]),
        zone_hint(ep(2, "b", READY), &["z1"]),
        zone_hint(ep(3, "a", READY), &["z1"]),
    ];
    let e = categorize(&eps, Some(&n), CLUSTER, LOCAL, true);
    assert_eq!(e.topology, TopologyMode::PreferSameZone);
    assert_eq!(addrs(&e.cluster), [addr(2), addr(3)]);
    assert_eq!(addrs(&e.local), [addr(1), addr(3)]);
}

#[test]
fn local_set_prefers_local_ready() {
    let n = node("a", None);
    let eps = [ep(1, "a", READY), ep(2, "a", SERVING_TERMINATING), ep(3, "b", READY)];
    let e = categorize(&eps, Some(&n), LOCAL, CLUSTER, false);
    assert_eq!(addrs(&e.local), [addr(1)]);
}

#[test]
fn local_serving_terminating_fallback() {
    // No local Ready endpoint, even though a remote one is Ready: local serving-terminating.
    let n = node("a", None);
    let eps = [ep(1, "a", SERVING_TERMINATING), ep(2, "a", TERMINATING_NOT_SERVING), ep(3, "b", READY)];
    let e = categorize(&eps, Some(&n), LOCAL, CLUSTER, false);
    assert_eq!(addrs(&e.local), [addr(1)]);
    assert!(e.has_any);
}

#[test]
fn local_set_empty_but_has_any_from_remote_endpoints() {
    // iTP=Local, not externally accessible: the cluster set is not computed, yet a Ready (or
    // serving-terminating) endpoint elsewhere makes has_any true (DROP, not REJECT).
    let n = node("a", None);
    for cond in [READY, SERVING_TERMINATING] {
        let e = categorize(&[ep(1, "b", cond)], Some(&n), LOCAL, CLUSTER, false);
        assert!(e.local.is_empty() && e.cluster.is_empty());
        assert!(e.has_any);
    }
    let e = categorize(&[ep(1, "b", NOT_READY)], Some(&n), LOCAL, CLUSTER, false);
    assert!(!e.has_any);
}

#[test]
fn endpoint_without_node_name_is_not_local() {
    let n = node("a", None);
    let e = categorize(&[Endpoint::ready(addr(1))], Some(&n), LOCAL, CLUSTER, false);
    assert!(e.local.is_empty());
    assert!(e.has_any);
}
