use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::{
    listener::Backend,
    service::{Balancing, Protocol, SessionAffinity},
};

fn svc(v: serde_json::Value) -> KubeService {
    serde_json::from_value(v).expect("valid Service")
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("valid EndpointSlice")
}

fn cluster_ip_svc(name: &str, ip: &str) -> KubeService {
    svc(json!({
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
    }))
}

fn web_slice(name: &str, service: &str, ips: &[&str], port: u16) -> EndpointSlice {
    slice(json!({
        "metadata": {"namespace": "ns", "name": name, "labels": {kube::SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "nodeName": "n1"})).collect::<Vec<_>>()
    }))
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("ns", name)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn listener(ns: &str, name: &str, address: &str) -> ValidListener {
    ValidListener {
        key: ServiceKey::new(ns, name),
        address: sa(address),
        protocol: Protocol::Tcp,
        backends: vec![Backend::Addr(sa("127.0.0.1:9000"))],
        balancing: Balancing::RoundRobin,
        session_affinity: SessionAffinity::None,
        health_check: None,
        passive_health: PassiveHealth::default(),
        timeouts: Timeouts::default(),
        zero_copy: false,
    }
}

fn endpoint_addrs(p: &ServicePort) -> Vec<SocketAddr> {
    p.endpoints.all.iter().map(|e| e.addr).collect()
}

#[test]
fn slice_before_service() {
    let mut index = Index::new(None);
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1", "10.0.0.2"], 8080));
    let s = index.build();
    assert!(s.services.is_empty());
    assert_eq!(s.version, 0, "a slice without its service changes nothing");
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    let s = index.build();
    assert_eq!(s.version, 1);
    let port = s.lookup(&FrontendKey::Addr(Protocol::Tcp, sa("10.96.0.1:80"))).expect("frontend");
    assert_eq!(endpoint_addrs(port), [sa("10.0.0.1:8080"), sa("10.0.0.2:8080")]);
    assert_eq!(port.endpoints.cluster.len(), 2);
    assert_eq!(index.endpoint_slice_keys().collect::<Vec<_>>(), [("ns", "web-1")]);
    assert_eq!(index.service_keys().cloned().collect::<Vec<_>>(), [key("web")]);
}

#[test]
fn udp_responses_annotation_reaches_the_ports_timeouts() {
    let mut index = Index::new(None);
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "dns",
                     "annotations": {kube::UDP_RESPONSES_ANNOTATION: "1"}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
    })));
    let s = index.build();
    let port = s.lookup(&FrontendKey::Addr(Protocol::Udp, sa("10.96.0.10:53"))).expect("frontend");
    assert_eq!(port.timeouts.udp_responses, Some(1));
    assert_eq!(port.timeouts.udp_idle, Timeouts::default().udp_idle, "the idle timeout is unchanged");
}

#[test]
fn identical_apply_is_not_dirty_and_keeps_version() {
    let mut index = Index::new(None);
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    let first = index.build();
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    assert!(!index.is_dirty());
    let second = index.build();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(second.version, 1);
}

#[test]
fn untouched_service_shares_arc_across_builds() {
    let mut index = Index::new(None);
    for (name, ip) in [("a", "10.96.0.1"), ("b", "10.96.0.2")] {
        index.apply_service(&cluster_ip_svc(name, ip));
        index.apply_endpoint_slice(&web_slice(&format!("{name}-1"), name, &["10.0.0.1"], 8080));
    }
    let s1 = index.build();
    index.apply_endpoint_slice(&web_slice("b-1", "b", &["10.0.0.1", "10.0.0.2"], 8080));
    let s2 = index.build();
    assert_eq!(s2.version, s1.version + 1);
    assert!(Arc::ptr_eq(&s1.services[&key("a")], &s2.services[&key("a")]));
    assert!(!Arc::ptr_eq(&s1.services[&key("b")], &s2.services[&key("b")]));
    let fa = FrontendKey::Addr(Protocol::Tcp, sa("10.96.0.1:80"));
    assert!(Arc::ptr_eq(&s1.frontends[&fa], &s2.frontends[&fa]));
}

#[test]
fn unchanged_port_keeps_its_arc_when_another_port_changes() {
    let mut index = Index::new(None);
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}]}
    })));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    let s1 = index.build();
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.2"], 8080));
    let s2 = index.build();
    let (p1, p2) = (&s1.services[&key("web")].ports, &s2.services[&key("web")].ports);
    assert!(!Arc::ptr_eq(&p1[0], &p2[0]));
    assert!(Arc::ptr_eq(&p1[1], &p2[1]), "the admin port has no endpoints either way");
}

#[test]
fn named_target_port_with_different_numbers() {
    let mut index = Index::new(None);
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    index.apply_endpoint_slice(&web_slice("web-2", "web", &["10.0.0.2"], 9090));
    index.apply_endpoint_slice(&slice(json!({
        "metadata": {"namespace": "ns", "name": "web-3", "labels": {kube::SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "other", "port": 7070}, {"name": "http", "port": 7000, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.0.0.3"]}]
    })));
    let s = index.build();
    let port = &s.services[&key("web")].ports[0];
    assert_eq!(endpoint_addrs(port), [sa("10.0.0.1:8080"), sa("10.0.0.2:9090")]);
}

#[test]
fn duplicates_across_slices_prefer_non_terminating() {
    let mut index = Index::new(None);
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    let terminating = |name: &str| {
        slice(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {kube::SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false, "terminating": true}}]
        }))
    };
    // The terminating copy sorts first by slice name; the ready one must still win.
    index.apply_endpoint_slice(&terminating("a-slice"));
    index.apply_endpoint_slice(&web_slice("b-slice", "web", &["10.0.0.1"], 8080));
    let s = index.build();
    let eps = &s.services[&key("web")].ports[0].endpoints;
    assert_eq!(eps.all.len(), 1);
    assert!(eps.all[0].ready && !eps.all[0].terminating);
}

#[test]
fn dual_stack_splits_ports_per_family() {
    let mut index = Index::new(None);
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {
            "type": "LoadBalancer", "clusterIPs": ["fd00::1", "10.96.0.1"],
            "externalIPs": ["192.0.2.1", "2001:db8::1"],
            "loadBalancerSourceRanges": ["10.0.0.0/8", "2001:db8::/32"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    })));
    index.apply_endpoint_slice(&web_slice("web-v4", "web", &["10.0.0.1"], 8080));
    index.apply_endpoint_slice(&slice(json!({
        "metadata": {"namespace": "ns", "name": "web-v6", "labels": {kube::SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv6",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["fd01::1"]}]
    })));
    let s = index.build();
    let ports = &s.services[&key("web")].ports;
    assert_eq!(ports.len(), 2);
    let (v6, v4) = (&ports[0], &ports[1]);
    assert_eq!(
        v6.frontends,
        [
            Frontend::ClusterIp(sa("[fd00::1]:80")),
            Frontend::NodePort(30080),
            Frontend::ExternalIp(sa("[2001:db8::1]:80"))
        ]
    );
    assert_eq!(
        v4.frontends,
        [
            Frontend::ClusterIp(sa("10.96.0.1:80")),
            Frontend::NodePort(30080),
            Frontend::LoadBalancer(sa("198.51.100.1:80")),
            Frontend::ExternalIp(sa("192.0.2.1:80"))
        ]
    );
    assert_eq!(endpoint_addrs(v6), [sa("[fd01::1]:8080")]);
    assert_eq!(endpoint_addrs(v4), [sa("10.0.0.1:8080")]);
    assert_eq!(v4.load_balancer_source_ranges, ["10.0.0.0/8".parse::<ipnet::IpNet>().expect("net")]);
    // Each family port owns the NodePort on its family's node addresses.
    assert!(Arc::ptr_eq(&s.frontends[&FrontendKey::NodePort(Protocol::Tcp, 30080, IpFamily::V6)], v6));
    assert!(Arc::ptr_eq(&s.frontends[&FrontendKey::NodePort(Protocol::Tcp, 30080, IpFamily::V4)], v4));
    assert_eq!(s.frontends.len(), 7);
}

#[test]
fn headless_and_external_name_have_no_frontends() {
    let mut index = Index::new(None);
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "h"},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}
    })));
    index.apply_endpoint_slice(&web_slice("h-1", "h", &["10.0.0.1"], 8080));
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "e"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}
    })));
    let s = index.build();
    assert!(s.frontends.is_empty());
    let h = &s.services[&key("h")];
    assert!(h.ports[0].frontends.is_empty());
    assert_eq!(endpoint_addrs(&h.ports[0]), [sa("10.0.0.1:8080")], "endpoints kept for DNS");
    let e = &s.services[&key("e")];
    assert!(e.ports.is_empty());
    assert_eq!(e.origin, Origin::Kubernetes { service_type: "ExternalName".into() });
}

#[test]
fn service_proxy_name_label() {
    let labelled = |name: &str, proxy: &str| {
        svc(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {kube::SERVICE_PROXY_NAME_LABEL: proxy}},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}
        }))
    };
    let services = |s: &Snapshot| s.services.keys().cloned().collect::<Vec<_>>();
    let mut index = Index::new(None);
    index.apply_service(&labelled("x", "ferry"));
    let s = index.build();
    assert!(s.services.is_empty() && s.frontends.is_empty(), "another proxy's Service is not proxied");
    assert!(s.dns.contains_key(&key("x")), "but it is in cluster DNS");

    let mut index = Index::new(None);
    index.set_proxy_name(Some("ferry"));
    index.apply_service(&labelled("x", "ferry"));
    index.apply_service(&labelled("y", "other"));
    let s = index.build();
    assert_eq!(services(&s), [key("x")]);
    assert_eq!(s.frontends.len(), 1);
    assert!(s.dns.contains_key(&key("x")) && s.dns.contains_key(&key("y")));
    // Relabelled to another proxy: its frontends go as with a delete; its name stays.
    index.apply_service(&labelled("x", "other"));
    let s = index.build();
    assert!(s.services.is_empty() && s.frontends.is_empty());
    assert!(s.dns.contains_key(&key("x")));
}

#[test]
fn frontend_conflict_smallest_key_wins() {
    let mut index = Index::new(None);
    index.apply_service(&cluster_ip_svc("b", "10.96.0.1"));
    let s = index.build();
    let fk = FrontendKey::Addr(Protocol::Tcp, sa("10.96.0.1:80"));
    assert_eq!(s.frontends[&fk].service, key("b"));
    index.apply_service(&cluster_ip_svc("a", "10.96.0.1"));
    index.apply_service(&cluster_ip_svc("c", "10.96.0.1"));
    let s = index.build();
    assert_eq!(s.frontends[&fk].service, key("a"));
    assert_eq!(s.conflicts.iter().cloned().collect::<Vec<_>>(), [(fk, key("b")), (fk, key("c"))]);
    index.delete_service("ns", "a");
    let s = index.build();
    assert_eq!(s.frontends[&fk].service, key("b"));
    assert_eq!(s.conflicts.iter().cloned().collect::<Vec<_>>(), [(fk, key("c"))]);
    index.delete_service("ns", "c");
    let s = index.build();
    assert!(s.conflicts.is_empty());
    assert_eq!(s.services.len(), 1);
}

#[test]
fn kubernetes_service_shadows_listener_with_same_key() {
    let mut index = Index::new(None);
    index.apply_listener(listener("ns", "web", "127.0.0.1:8080"));
    let s = index.build();
    let lk = FrontendKey::Addr(Protocol::Tcp, sa("127.0.0.1:8080"));
    assert_eq!(s.services[&key("web")].origin, Origin::Listener);
    assert!(s.frontends.contains_key(&lk));
    index.apply_service(&cluster_ip_svc("web", "10.96.0.1"));
    let s = index.build();
    assert!(matches!(s.services[&key("web")].origin, Origin::Kubernetes { .. }));
    assert!(!s.frontends.contains_key(&lk));
    assert_eq!(s.conflicts.iter().cloned().collect::<Vec<_>>(), [(lk, key("web"))]);
    index.delete_service("ns", "web");
    let s = index.build();
    assert_eq!(s.services[&key("web")].origin, Origin::Listener);
    assert!(s.conflicts.is_empty());
}

#[test]
fn set_node_recategorises_local_endpoints() {
    let mut index = Index::new(None);
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "10.96.0.1", "internalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80}]}
    })));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    let s = index.build();
    assert!(s.services[&key("web")].ports[0].endpoints.local.is_empty());
    index.set_node(Some(NodeInfo { name: "n1".into(), zone: None }));
    assert!(index.is_dirty());
    let s = index.build();
    assert_eq!(s.node.as_ref().map(|n| &*n.name), Some("n1"));
    assert_eq!(s.services[&key("web")].ports[0].endpoints.local.len(), 1);
    index.set_node(Some(NodeInfo { name: "n1".into(), zone: None }));
    assert!(!index.is_dirty());
}

#[test]
fn relabelled_slice_moves_to_other_service() {
    let mut index = Index::new(None);
    index.apply_service(&cluster_ip_svc("a", "10.96.0.1"));
    index.apply_service(&cluster_ip_svc("b", "10.96.0.2"));
    index.apply_endpoint_slice(&web_slice("s", "a", &["10.0.0.1"], 8080));
    let s = index.build();
    assert_eq!(s.services[&key("a")].ports[0].endpoints.all.len(), 1);
    index.apply_endpoint_slice(&web_slice("s", "b", &["10.0.0.1"], 8080));
    let s = index.build();
    assert!(s.services[&key("a")].ports[0].endpoints.all.is_empty());
    assert_eq!(s.services[&key("b")].ports[0].endpoints.all.len(), 1);
    index.delete_endpoint_slice("ns", "s");
    let s = index.build();
    assert!(s.services[&key("b")].ports[0].endpoints.all.is_empty());
    assert_eq!(index.endpoint_slice_keys().count(), 0);
}

#[test]
fn snapshot_serializes_for_debug() {
    let mut index = Index::new(Some(NodeInfo { name: "n1".into(), zone: Some("z1".into()) }));
    index.apply_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.1", "sessionAffinity": "ClientIP",
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
    })));
    index.apply_service(&cluster_ip_svc("web2", "10.96.0.1"));
    index.apply_endpoint_slice(&web_slice("web-1", "web", &["10.0.0.1"], 8080));
    let v = serde_json::to_value(&*index.build()).expect("serializes");
    assert_eq!(v["version"], 1);
    assert_eq!(v["node"]["zone"], "z1");
    let web = &v["services"]["ns/web"];
    assert_eq!(web["ports"][0]["sessionAffinity"]["clientIp"]["timeout"], 10_800);
    assert_eq!(web["ports"][0]["endpoints"]["all"][0]["addr"], "10.0.0.1:8080");
    assert_eq!(v["frontends"]["TCP 10.96.0.1:80"], "ns/web:http");
    assert_eq!(v["frontends"]["TCP nodePort 30080"], "ns/web:http");
    assert_eq!(v["conflicts"][0]["frontend"], "TCP 10.96.0.1:80");
    assert_eq!(v["conflicts"][0]["loser"], "ns/web2");
}

// === property test: incremental == from scratch ===

/// One input event over a small universe, chosen so that frontends collide, slices move between
/// services, and listeners shadow or collide with Kubernetes services.
#[derive(Clone, Debug)]
enum Event {
    ApplyService(usize, u8),
    DeleteService(usize),
    ApplySlice(usize, usize, u8),
    DeleteSlice(usize),
    ApplyListener(usize, u8),
    DeleteListener(usize),
    SetNode(u8),
    Resolve(u8),
    Build,
}

const SERVICES: [&str; 3] = ["a", "b", "c"];
const SLICES: usize = 4;
const LISTENERS: [(&str, &str); 2] = [("ns", "a"), ("", "l")];

fn gen_service(i: usize, v: u8) -> KubeService {
    let ips: &[&str] = match v % 4 {
        0 => &["10.96.0.1"],
        1 => &["10.96.0.2"],
        2 => &["10.96.0.1", "fd00::1"],
        _ => &["fd00::1"],
    };
    let (ty, cluster_ip) = match (v / 4) % 4 {
        0 => ("ClusterIP", json!(ips[0])),
        1 => ("NodePort", json!(ips[0])),
        2 => ("LoadBalancer", json!(ips[0])),
        _ => ("ClusterIP", json!("None")),
    };
    let local = if v & 0x10 != 0 { "Local" } else { "Cluster" };
    let mut ports = vec![
        json!({"name": "http", "port": 80, "nodePort": if ty == "ClusterIP" { json!(null) } else { json!(30080) }}),
    ];
    if v & 0x20 != 0 {
        ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    svc(json!({
        "metadata": {"namespace": "ns", "name": SERVICES[i]},
        "spec": {
            "type": ty, "clusterIP": cluster_ip, "clusterIPs": if (v / 4) % 4 == 3 { json!(["None"]) } else { json!(ips) },
            "internalTrafficPolicy": local, "externalTrafficPolicy": local,
            "externalIPs": if v & 0x40 != 0 { json!(["127.0.0.1"]) } else { json!([]) },
            "ports": ports
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    }))
}

fn gen_slice(i: usize, owner: usize, v: u8) -> EndpointSlice {
    let v6 = v & 1 != 0;
    let ip = |n: u8| {
        if v6 { format!("fd01::{n}") } else { format!("10.0.0.{n}") }
    };
    let conds = |n: u8| match (v / 2 + n) % 3 {
        0 => json!({}),
        1 => json!({"ready": false, "serving": true, "terminating": true}),
        _ => json!({"ready": false}),
    };
    let hints = |n: u8| match (v / 8) % 3 {
        0 => json!(null),
        1 => json!({"forZones": [{"name": if n.is_multiple_of(2) { "z1" } else { "z2" }}]}),
        _ => {
            json!({"forNodes": [{"name": if n.is_multiple_of(2) { "n1" } else { "n2" }}], "forZones": [{"name": "z1"}]})
        }
    };
    let endpoints: Vec<_> = (1..=(v % 3 + 1))
        .map(|n| {
            json!({"addresses": [ip(n)], "conditions": conds(n), "hints": hints(n),
                   "nodeName": if n.is_multiple_of(2) { "n1" } else { "n2" }})
        })
        .collect();
    slice(json!({
        "metadata": {"namespace": "ns", "name": format!("s{i}"), "labels": {kube::SERVICE_NAME_LABEL: SERVICES[owner]}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "http", "port": 8080 + u16::from(v / 64)}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": endpoints
    }))
}

fn gen_listener(i: usize, v: u8) -> ValidListener {
    let mut l = listener(
        LISTENERS[i].0,
        LISTENERS[i].1,
        ["10.96.0.1:80", "127.0.0.1:80", "10.0.0.9:1"][usize::from(v % 3)],
    );
    if v & 4 != 0 {
        l.backends.push(Backend::Name { host: "backend.example".into(), port: 80 });
    }
    l
}

fn gen_node(v: u8) -> Option<NodeInfo> {
    match v % 4 {
        0 => None,
        1 => Some(NodeInfo { name: "n1".into(), zone: Some("z1".into()) }),
        2 => Some(NodeInfo { name: "n2".into(), zone: None }),
        _ => Some(NodeInfo { name: "n1".into(), zone: Some("z2".into()) }),
    }
}

fn gen_resolved(v: u8) -> Option<Arc<[IpAddr]>> {
    (!v.is_multiple_of(3)).then(|| Arc::from([IpAddr::from([10, 1, 0, v % 3])]))
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..SERVICES.len(), any::<u8>()).prop_map(|(i, v)| Event::ApplyService(i, v)),
        1 => (0..SERVICES.len()).prop_map(Event::DeleteService),
        4 => (0..SLICES, 0..SERVICES.len(), any::<u8>()).prop_map(|(i, o, v)| Event::ApplySlice(i, o, v)),
        1 => (0..SLICES).prop_map(Event::DeleteSlice),
        1 => (0..LISTENERS.len(), any::<u8>()).prop_map(|(i, v)| Event::ApplyListener(i, v)),
        1 => (0..LISTENERS.len()).prop_map(Event::DeleteListener),
        1 => any::<u8>().prop_map(Event::SetNode),
        1 => any::<u8>().prop_map(Event::Resolve),
        2 => Just(Event::Build),
    ]
}

/// The final objects after a sequence of events.
#[derive(Default)]
struct Final {
    services: BTreeMap<usize, KubeService>,
    slices: BTreeMap<usize, EndpointSlice>,
    listeners: BTreeMap<usize, ValidListener>,
    node: Option<NodeInfo>,
    resolved: Option<Arc<[IpAddr]>>,
}

fn assert_same(incremental: &Snapshot, scratch: &Snapshot) {
    assert_eq!(incremental.node, scratch.node);
    assert_eq!(incremental.services, scratch.services);
    assert_eq!(incremental.frontends, scratch.frontends);
    assert_eq!(incremental.conflicts, scratch.conflicts);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_build_equals_scratch_build(events in prop::collection::vec(event(), 1..40)) {
        let mut index = Index::new(None);
        let mut fin = Final::default();
        let mut last_version = 0;
        for e in events {
            match e {
                Event::ApplyService(i, v) => {
                    let s = gen_service(i, v);
                    index.apply_service(&s);
                    fin.services.insert(i, s);
                }
                Event::DeleteService(i) => {
                    index.delete_service("ns", SERVICES[i]);
                    fin.services.remove(&i);
                }
                Event::ApplySlice(i, o, v) => {
                    let s = gen_slice(i, o, v);
                    index.apply_endpoint_slice(&s);
                    fin.slices.insert(i, s);
                }
                Event::DeleteSlice(i) => {
                    index.delete_endpoint_slice("ns", &format!("s{i}"));
                    fin.slices.remove(&i);
                }
                Event::ApplyListener(i, v) => {
                    let l = gen_listener(i, v);
                    index.apply_listener(l.clone());
                    fin.listeners.insert(i, l);
                }
                Event::DeleteListener(i) => {
                    index.delete_listener(&ServiceKey::new(LISTENERS[i].0, LISTENERS[i].1));
                    fin.listeners.remove(&i);
                }
                Event::SetNode(v) => {
                    index.set_node(gen_node(v));
                    fin.node = gen_node(v);
                }
                Event::Resolve(v) => {
                    index.set_resolved("backend.example", gen_resolved(v));
                    fin.resolved = gen_resolved(v);
                }
                Event::Build => {
                    let s = index.build();
                    prop_assert!(s.version >= last_version && s.version <= last_version + 1);
                    last_version = s.version;
                }
            }
        }
        let incremental = index.build();
        let mut scratch = Index::new(fin.node.clone());
        // Reverse insertion order: the result must not depend on it.
        for s in fin.slices.values().rev() {
            scratch.apply_endpoint_slice(s);
        }
        for s in fin.services.values().rev() {
            scratch.apply_service(s);
        }
        for l in fin.listeners.values() {
            scratch.apply_listener(l.clone());
        }
        scratch.set_resolved("backend.example", fin.resolved.clone());
        let scratch = scratch.build();
        assert_same(&incremental, &scratch);
        // Building again without changes must keep the same snapshot.
        prop_assert!(Arc::ptr_eq(&incremental, &index.build()));
    }
}

#[test]
fn dns_view_covers_headless_and_external_name() {
    use crate::dns::DnsKind;
    let mut index = Index::default();
    let ext: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "www.example.com."}
    }))
    .expect("service");
    let headless: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": true,
                 "ports": [{"name": "pg", "port": 5432}]}
    }))
    .expect("service");
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 15432}],
        "endpoints": [{"addresses": ["10.0.0.2"], "hostname": "db-0", "conditions": {"ready": false}}]
    }))
    .expect("slice");
    index.apply_service(&ext);
    index.apply_service(&headless);
    index.apply_endpoint_slice(&slice);
    let snap = index.build();
    let ext = snap.dns.get(&ServiceKey::new("default", "ext")).expect("ext in dns view");
    assert_eq!(ext.kind, DnsKind::ExternalName("www.example.com".into()));
    let db = snap.dns.get(&ServiceKey::new("default", "db")).expect("db in dns view");
    assert_eq!(db.kind, DnsKind::Headless);
    assert_eq!(db.endpoints.len(), 1);
    assert!(db.endpoints[0].ready, "publishNotReadyAddresses marks every endpoint ready");
    assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
    assert_eq!(db.endpoints[0].ports[0].port, 15432);

    // Changing only externalName publishes a new version with the new target.
    let v = snap.version;
    let ext2: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "other.example.org"}
    }))
    .expect("service");
    index.apply_service(&ext2);
    let snap = index.build();
    assert!(snap.version > v);
    let ext = snap.dns.get(&ServiceKey::new("default", "ext")).expect("ext");
    assert_eq!(ext.kind, DnsKind::ExternalName("other.example.org".into()));
    index.delete_service("default", "ext");
    assert!(!index.build().dns.contains_key(&ServiceKey::new("default", "ext")));
}
