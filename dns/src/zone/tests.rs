use std::sync::Arc;

use ferry_model::Index;
use hickory_resolver::proto::{
    op::{Message, ResponseCode},
    rr::RData,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;

fn snapshot(objects: &[serde_json::Value]) -> Arc<Snapshot> {
    let mut index = Index::default();
    for o in objects {
        if o["kind"] == "EndpointSlice" {
            let s: EndpointSlice = serde_json::from_value(o.clone()).expect("slice");
            index.apply_endpoint_slice(&s);
        } else {
            let s: Service = serde_json::from_value(o.clone()).expect("service");
            index.apply_service(&s);
        }
    }
    index.build()
}

fn config() -> ZoneConfig {
    ZoneConfig { domain: "cluster.local".into(), ttl: 30 }
}

fn ask(zone: &Zone, name: &str, qtype: u16) -> (Outcome, Option<Message>) {
    let wire_name = wire::encode_name(name).expect("name");
    let mut m = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&wire_name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    let q = wire::parse(&m).expect("query parses");
    let mut buf = Vec::new();
    let outcome = zone.answer(&m, &q, &mut buf, 65535, None);
    let msg =
        matches!(outcome, Outcome::Answered(_)).then(|| Message::from_vec(&buf).expect("valid response"));
    (outcome, msg)
}

#[allow(clippy::needless_pass_by_value)]
fn svc(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

#[test]
fn cname_chains_and_loops_inside_the_zone() {
    let snap = snapshot(&[
        svc("a", json!({"type": "ExternalName", "externalName": "b.ns.svc.cluster.local"})),
        svc("b", json!({"type": "ExternalName", "externalName": "c.ns.svc.cluster.local."})),
        svc("c", json!({"clusterIP": "10.96.0.3", "ports": [{"port": 80}]})),
        svc("x", json!({"type": "ExternalName", "externalName": "y.ns.svc.cluster.local"})),
        svc("y", json!({"type": "ExternalName", "externalName": "x.ns.svc.cluster.local"})),
        svc("self", json!({"type": "ExternalName", "externalName": "self.ns.svc.cluster.local"})),
        svc("out", json!({"type": "ExternalName", "externalName": "www.example.com"})),
    ]);
    let zone = Zone::build(&snap, &config());
    let (_, m) = ask(&zone, "a.ns.svc.cluster.local", rtype::A);
    let m = m.expect("answered");
    let types: Vec<String> = m.answers.iter().map(|r| r.record_type().to_string()).collect();
    assert_eq!(types, ["CNAME", "CNAME", "A"]);
    for name in ["x.ns.svc.cluster.local", "self.ns.svc.cluster.local"] {
        let (outcome, m) = ask(&zone, name, rtype::A);
        assert_eq!(outcome, Outcome::Answered(Rcode::NoError), "{name}");
        assert!(m.expect("answered").answers.len() <= MAX_CHAIN + 1, "{name}: loops stop");
    }
    let (outcome, _) = ask(&zone, "out.ns.svc.cluster.local", rtype::AAAA);
    assert_eq!(outcome, Outcome::Chase { target: "www.example.com".into() });
    // Without an upstream answer the CNAME alone is given.
    let empty = Forwarded::empty(Rcode::NoError);
    let m = {
        let wire_name = wire::encode_name("out.ns.svc.cluster.local").expect("name");
        let mut msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&wire_name);
        msg.extend_from_slice(&[0, 1, 0, 1]);
        let q = wire::parse(&msg).expect("parses");
        let mut buf = Vec::new();
        zone.answer(&msg, &q, &mut buf, 512, Some(&empty));
        Message::from_vec(&buf).expect("valid")
    };
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn srv_weights_ipv6_and_dashed_names() {
    let snap = snapshot(&[
        svc("h", json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]})),
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": "h-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "h"}},
            "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["fd00::1"]}, {"addresses": ["fd00::2"]}, {"addresses": ["fd00::3"]}]}),
    ]);
    let zone = Zone::build(&snap, &config());
    let (_, m) = ask(&zone, "_http._tcp.h.ns.svc.cluster.local", rtype::SRV);
    let m = m.expect("answered");
    assert_eq!(m.answers.len(), 3);
    for r in &m.answers {
        let RData::SRV(srv) = &r.data else { panic!("SRV expected: {r:?}") };
        assert_eq!((srv.priority, srv.weight, srv.port), (0, 33, 8080));
    }
    assert_eq!(m.additionals.len(), 3, "each target's AAAA in the additional section");
    let (_, m) = ask(&zone, "fd00--1.h.ns.svc.cluster.local", rtype::AAAA);
    assert_eq!(m.expect("answered").answers.len(), 1);
    let (_, m) = ask(&zone, "fd00--1.h.ns.svc.cluster.local", rtype::A);
    let m = m.expect("answered");
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1, "NODATA carries the SOA");
    let (_, m) = ask(&zone, "fd00--5.ns.pod.cluster.local", rtype::AAAA);
    assert_eq!(m.expect("answered").answers.len(), 1);
    let (_, m) = ask(&zone, "not-an-ip.ns.pod.cluster.local", rtype::A);
    assert_eq!(m.expect("answered").response_code, ResponseCode::NXDomain);
    assert!(zone.contains(&reverse_name("fd00::2".parse().expect("ip"))));
    // Outside the zone and the reverse zones: not ours.
    assert_eq!(ask(&zone, "example.com", rtype::A).0, Outcome::NotInZone);
    assert_eq!(ask(&zone, "9.9.9.9.in-addr.arpa", rtype::PTR).0, Outcome::NotInZone);
}

#[test]
fn empty_snapshot_still_has_the_apex() {
    let zone = Zone::empty(&config());
    let (_, m) = ask(&zone, "cluster.local", rtype::NS);
    assert_eq!(m.expect("answered").answers.len(), 1);
    let (_, m) = ask(&zone, "dns-version.cluster.local", rtype::TXT);
    assert_eq!(m.expect("answered").answers[0].ttl, VERSION_TTL);
}

#[test]
fn dashed_names() {
    assert_eq!(dashed("10.1.2.3".parse().expect("ip")), "10-1-2-3");
    assert_eq!(dashed("fd00::".parse().expect("ip")), "fd00--0");
    assert_eq!(dashed("::1".parse().expect("ip")), "0--1");
    assert_eq!(parse_dashed(b"fd00--0"), Some("fd00::".parse().expect("ip")));
    assert_eq!(parse_dashed(b"10-1-2-3"), Some("10.1.2.3".parse().expect("ip")));
    assert_eq!(parse_dashed(b"10-1-2"), None);
}
