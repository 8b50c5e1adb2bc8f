use serde_json::json;

use super::*;

fn svc(v: serde_json::Value) -> KubeService {
    serde_json::from_value(v).expect("valid Service")
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("valid EndpointSlice")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn ipv(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn proxy_name_label_rule() {
    assert!(is_proxied_by(None, None));
    assert!(is_proxied_by(Some(&labels(&[("app", "x")])), None));
    let named = labels(&[(SERVICE_PROXY_NAME_LABEL, "ferry")]);
    assert!(!is_proxied_by(Some(&named), None), "a proxy without a name skips every labelled service");
    assert!(is_proxied_by(Some(&named), Some("ferry")));
    assert!(!is_proxied_by(Some(&named), Some("other")));
    assert!(
        !is_proxied_by(Some(&labels(&[])), Some("ferry")),
        "a named proxy leaves unlabelled services to the default proxy, so both can share a node"
    );
    assert!(!is_proxied_by(None, Some("ferry")));
}

#[test]
fn headless_label_rule() {
    let headless = labels(&[(HEADLESS_LABEL, "")]);
    assert!(!is_proxied_by(Some(&headless), None));
    assert!(!is_proxied_by(Some(&headless), Some("ferry")));
    assert!(matches_proxy_name(Some(&headless), None), "the index keeps headless slices for DNS");
}

#[test]
fn node_info_reads_zone_label() {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {ZONE_LABEL: "eu-1a", "other": "x"}}
    }))
    .expect("node");
    assert_eq!(NodeInfo::from_node(&node), NodeInfo { name: "n1".into(), zone: Some("eu-1a".into()) });
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("node");
    assert_eq!(NodeInfo::from_node(&node), NodeInfo { name: "n2".into(), zone: None });
}

#[test]
fn service_translation_full() {
    let s = svc(json!({
        "metadata": {"namespace": "ns", "name": "web", "annotations": {BALANCING_ANNOTATION: "LeastConnections"}},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.1",
            "clusterIPs": ["10.96.0.1", "fd00::1"],
            "externalIPs": ["192.0.2.1", "not-an-ip"],
            "loadBalancerSourceRanges": [" 10.0.0.0/8 ", "bogus", "2001:db8::/32"],
            "sessionAffinity": "ClientIP",
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [
                {"name": "http", "port": 80, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "bad", "port": 54, "protocol": "ICMP"}
            ]
        },
        "status": {"loadBalancer": {"ingress": [
            {"ip": "198.51.100.1"},
            {"ip": "198.51.100.2", "ipMode": "VIP"},
            {"ip": "198.51.100.3", "ipMode": "Proxy"},
            {"hostname": "lb.example"}
        ]}}
    }));
    let i = ServiceInput::from_service(&s);
    assert_eq!(i.kind, ServiceKind::Proxied);
    assert_eq!(&*i.service_type, "LoadBalancer");
    assert_eq!(i.cluster_ips, [ipv("10.96.0.1"), ipv("fd00::1")]);
    assert_eq!(i.external_ips, [ipv("192.0.2.1")]);
    assert_eq!(i.load_balancer_ips, [ipv("198.51.100.1"), ipv("198.51.100.2")], "ipMode Proxy skipped");
    assert_eq!(
        i.source_ranges,
        ["10.0.0.0/8".parse::<IpNet>().expect("net"), "2001:db8::/32".parse().expect("net")]
    );
    assert_eq!(i.session_affinity, SessionAffinity::ClientIp { timeout: Duration::from_secs(10_800) });
    assert_eq!(i.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(i.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(i.health_check_node_port, Some(32000));
    assert_eq!(i.balancing, Balancing::LeastConnections);
    assert_eq!(
        i.ports,
        [
            PortInput { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: Some(30080) },
            PortInput { name: "dns".into(), protocol: Protocol::Udp, port: 53, node_port: None },
        ]
    );
}

#[test]
fn cluster_ip_fallback_and_defaults() {
    let i = ServiceInput::from_service(&svc(json!({
        "metadata": {"namespace": "ns", "name": "a", "annotations": {BALANCING_ANNOTATION: "Bogus"}},
        "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80}], "healthCheckNodePort": 32000}
    })));
    assert_eq!(i.kind, ServiceKind::Proxied);
    assert_eq!(&*i.service_type, "ClusterIP");
    assert_eq!(i.cluster_ips, [ipv("10.96.0.2")]);
    assert_eq!(i.ports[0].protocol, Protocol::Tcp);
    assert_eq!(&*i.ports[0].name, "");
    assert_eq!(i.session_affinity, SessionAffinity::None);
    assert_eq!(i.external_traffic_policy, TrafficPolicy::Cluster);
    assert_eq!(i.health_check_node_port, None, "only LoadBalancer with eTP=Local");
    assert_eq!(i.balancing, Balancing::Random);
    assert!(i.zero_copy, "splice for bulk data unless turned off");
}

#[test]
fn zero_copy_annotation() {
    let with = |v: &str| {
        ServiceInput::from_service(&svc(json!({
            "metadata": {"name": "a", "annotations": {ZERO_COPY_ANNOTATION: v}},
            "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}
        })))
        .zero_copy
    };
    assert!(!with("false"));
    assert!(with("true"));
    assert!(with("bogus"), "anything but \"false\" keeps the default");
}

#[test]
fn udp_responses_annotation() {
    let with = |v: &str| {
        ServiceInput::from_service(&svc(json!({
            "metadata": {"name": "a", "annotations": {UDP_RESPONSES_ANNOTATION: v}},
            "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 53, "protocol": "UDP"}]}
        })))
        .udp_responses
    };
    assert_eq!(with("1"), Some(1));
    assert_eq!(with(" 2 "), Some(2));
    assert_eq!(with("0"), None, "zero would end every flow at once");
    assert_eq!(with("one"), None);
    let plain = ServiceInput::from_service(&svc(json!({
        "metadata": {"name": "a"},
        "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 53, "protocol": "UDP"}]}
    })));
    assert_eq!(plain.udp_responses, None, "replies are not counted by default");
}

#[test]
fn affinity_timeout_explicit_and_capped() {
    let with = |t: i64| {
        ServiceInput::from_service(&svc(json!({
            "metadata": {"name": "a"},
            "spec": {"clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": t}}}
        })))
        .session_affinity
    };
    assert_eq!(with(60), SessionAffinity::ClientIp { timeout: Duration::from_secs(60) });
    assert_eq!(with(1_000_000), SessionAffinity::ClientIp { timeout: Duration::from_secs(86_400) });
    assert_eq!(with(0), SessionAffinity::ClientIp { timeout: Duration::from_secs(10_800) });
}

#[test]
fn headless_and_external_name_are_not_proxied() {
    let headless = ServiceInput::from_service(&svc(json!({
        "metadata": {"name": "h"},
        "spec": {"clusterIP": "None", "externalIPs": ["192.0.2.1"], "ports": [{"name": "x", "port": 80}]}
    })));
    assert_eq!(headless.kind, ServiceKind::Headless);
    assert!(headless.cluster_ips.is_empty() && headless.external_ips.is_empty());
    assert_eq!(headless.ports.len(), 1, "ports kept for DNS");
    let ext = ServiceInput::from_service(&svc(json!({
        "metadata": {"name": "e"},
        "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}
    })));
    assert_eq!(ext.kind, ServiceKind::ExternalName);
    assert!(ext.ports.is_empty());
    let no_ip =
        ServiceInput::from_service(&svc(json!({"metadata": {"name": "n"}, "spec": {"clusterIP": ""}})));
    assert_eq!(no_ip.kind, ServiceKind::Headless);
}

#[test]
fn slice_translation() {
    let mut interner = Interner::default();
    let s = slice(json!({
        "metadata": {"namespace": "ns", "name": "web-1", "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080},
            {"name": "nil-port"},
            {"port": 9090},
            {"name": "zero", "port": 0},
            {"name": "dns", "port": 5353, "protocol": "UDP"}
        ],
        "endpoints": [
            {"addresses": ["10.0.0.1", "10.0.0.99"], "nodeName": "n1", "zone": "z1", "hostname": "web-0",
             "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": true}, "hints": {}},
            {"addresses": []},
            {"addresses": ["not-an-ip"]}
        ]
    }));
    let i = SliceInput::from_slice(&s, &mut interner).expect("not FQDN");
    assert_eq!(
        i.ports,
        [
            SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 },
            SlicePort { name: "dns".into(), protocol: Protocol::Udp, port: 5353 },
        ]
    );
    assert_eq!(i.endpoints.len(), 3);
    let e0 = &i.endpoints[0];
    assert_eq!(e0.ip, ipv("10.0.0.1"), "only addresses[0]");
    assert!(e0.ready && e0.serving && !e0.terminating, "nil conditions");
    assert_eq!(e0.node_name.as_deref(), Some("n1"));
    assert_eq!(e0.zone.as_deref(), Some("z1"));
    assert_eq!(e0.hostname.as_deref(), Some("web-0"));
    let hints = e0.hints.as_deref().expect("hints");
    assert_eq!(hints.for_zones, [Arc::from("z1")]);
    assert_eq!(hints.for_nodes, [Arc::from("n1")]);
    let e1 = &i.endpoints[1];
    assert!(!e1.ready && e1.serving && e1.terminating);
    assert!(i.endpoints[2].hints.is_none(), "empty hints are no hints");
    assert!(
        Arc::ptr_eq(e0.node_name.as_ref().expect("node"), &hints.for_nodes[0]),
        "node names are interned"
    );
}

#[test]
fn fqdn_slices_are_ignored() {
    let s = slice(json!({
        "metadata": {"name": "f", "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "FQDN",
        "endpoints": [{"addresses": ["example.com"]}]
    }));
    assert!(SliceInput::from_slice(&s, &mut Interner::default()).is_none());
}

#[test]
fn interner_prunes_unreferenced() {
    let mut interner = Interner::default();
    let kept = interner.get("a");
    drop(interner.get("b"));
    interner.prune();
    assert_eq!(interner.0.len(), 1);
    assert!(Arc::ptr_eq(&kept, &interner.get("a")));
}

#[test]
fn trigger_time_annotation_parses_rfc3339_into_unix_milliseconds() {
    assert_eq!(super::parse_trigger_time("1970-01-01T00:00:01Z"), Some(1000));
    assert_eq!(super::parse_trigger_time("2026-11-29T04:38:50.25Z"), Some(1_795_927_130_250));
    assert_eq!(super::parse_trigger_time("2026-11-29T05:38:50+01:00"), Some(1_795_927_130_000));
    assert_eq!(super::parse_trigger_time("yesterday"), None);
}
