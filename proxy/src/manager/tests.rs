//! [`Manager::apply_changes`] against [`Manager::apply`]: random sequences of Kubernetes
//! changes (conflicting ClusterIPs, NodePorts, traffic policies, endpoints coming and going);
//! after each, the incremental manager must run exactly the listeners, over exactly the
//! endpoint sets, that a fresh manager applying the same snapshot runs. The VIP address diff
//! ([`host::frontend_address_changes`]) is checked against [`host::frontend_addresses`] too.
//!
//! Sockets are real (`IP_FREEBIND` on 127.78.0.0/16, ports fixed so that both managers bind the
//! same addresses, which `SO_REUSEPORT` allows).

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use ferry_model::{FrontendKey, Index, NodeInfo, Protocol, Snapshot};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;
use crate::{
    host,
    node::{NodeConfig, NodeFrontends},
};

const NODE: &str = "node-a";

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn manager() -> Manager {
    let filter = NodeFrontends::new(NodeConfig {
        node_port_addresses: vec!["127.78.0.20".parse().expect("ip")],
        local_sources: vec!["127.78.0.20/32".parse().expect("net")],
    });
    Manager::new(ProxyConfig {
        drain_timeout: Duration::from_millis(50),
        filter: Arc::new(filter),
        ..ProxyConfig::default()
    })
}

fn random_service(rng: &mut Rng, name: &str) -> Service {
    // Few addresses and ports, so that services clash on frontends and conflicts move.
    let ip = format!("127.78.1.{}", 1 + rng.below(4));
    let port = *rng.pick(&[80, 81]);
    let protocol = *rng.pick(&["TCP", "UDP"]);
    let mut p = json!({"name": "p", "port": port, "protocol": protocol});
    let ty = *rng.pick(&["ClusterIP", "NodePort"]);
    if ty == "NodePort" {
        p["nodePort"] = json!(30000 + rng.below(3));
    }
    let mut spec = json!({"type": ty, "clusterIP": ip, "clusterIPs": [ip], "ports": [p]});
    if rng.below(3) == 0 {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    if ty == "NodePort" && rng.below(3) == 0 {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if rng.below(4) == 0 {
        spec["externalIPs"] = json!([format!("127.78.2.{}", 1 + rng.below(2))]);
    }
    serde_json::from_value(json!({"metadata": {"namespace": "default", "name": name}, "spec": spec}))
        .expect("service")
}

fn random_slice(rng: &mut Rng, svc: &str) -> EndpointSlice {
    let protocol = *rng.pick(&["TCP", "UDP"]);
    let endpoints: Vec<_> = (0..rng.below(4))
        .map(|i| {
            let node = *rng.pick(&[NODE, "node-b"]);
            json!({"addresses": [format!("127.78.9.{}", 1 + i + rng.below(3))],
                   "conditions": {"ready": rng.below(5) != 0}, "nodeName": node})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": format!("{svc}-1"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
    }))
    .expect("slice")
}

/// Everything that must match: each listener, its local address and its routes.
type Summary = Vec<(ListenerKey, SocketAddr, Vec<SocketAddr>, Option<Vec<SocketAddr>>, bool)>;

fn summary(m: &Manager) -> Summary {
    let addrs = |p: &Pool| p.endpoints().iter().map(|s| s.addr).collect::<Vec<_>>();
    m.listeners
        .iter()
        .map(|(k, r)| {
            let u = r.state.upstreams();
            (*k, r.local, addrs(u.pool()), u.internal_pool().map(addrs), r.binding.drop_when_empty)
        })
        .collect()
}

fn fresh(snapshot: &Snapshot) -> Summary {
    let mut m = manager();
    let errors = m.apply(snapshot);
    assert!(errors.is_empty(), "{errors:?}");
    summary(&m)
}

#[tokio::test]
async fn random_changes_match_a_full_apply() {
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut index = Index::new(Some(NodeInfo { name: NODE.into(), zone: None }));
        let mut inc = manager();
        let mut last: Option<Arc<Snapshot>> = None;
        let mut vips: BTreeSet<std::net::IpAddr> = BTreeSet::new();
        let names = ["a", "b", "c", "d", "e", "f"];
        let mut nonempty = 0;
        for step in 0..60 {
            // One to three changes per snapshot.
            for _ in 0..1 + rng.below(3) {
                let name = *rng.pick(&names);
                match rng.below(6) {
                    0 => index.delete_service("default", name),
                    1 => index.delete_endpoint_slice("default", &format!("{name}-1")),
                    2 | 3 => index.apply_service(&random_service(&mut rng, name)),
                    _ => index.apply_endpoint_slice(&random_slice(&mut rng, name)),
                }
            }
            let snap = index.build();
            let errors = if step == 0 { inc.apply(&snap) } else { inc.apply_changes(&snap) };
            assert!(errors.is_empty(), "{errors:?}");
            let got = summary(&inc);
            assert_eq!(got, fresh(&snap), "seed {seed} step {step}");
            assert_eq!(inc.bound(), got.iter().map(|(k, l, ..)| (k.0, *l)).collect::<Vec<_>>());
            nonempty += usize::from(!got.is_empty());

            let changes = match &last {
                Some(old) => host::frontend_address_changes(old, &snap),
                None => host::AddressChanges { add: host::frontend_addresses(&snap), ..Default::default() },
            };
            assert!(changes.add.is_disjoint(&vips), "seed {seed} step {step}: re-adding");
            assert!(changes.remove.is_subset(&vips), "seed {seed} step {step}: removing unknown");
            vips.extend(&changes.add);
            vips.retain(|ip| !changes.remove.contains(ip));
            assert_eq!(vips, host::frontend_addresses(&snap), "seed {seed} step {step}");
            last = Some(snap);
        }
        // The sequence exercised something.
        assert!(nonempty > 10, "seed {seed}: only {nonempty} steps had listeners");
    }
}

#[tokio::test]
async fn unchanged_frontends_are_not_visited() {
    let mut index = Index::new(Some(NodeInfo { name: NODE.into(), zone: None }));
    let mut rng = Rng(7);
    let mut m = manager();
    for name in ["a", "b"] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": if name == "a" { "127.78.3.1" } else { "127.78.3.2" },
                     "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
        }))
        .expect("service");
        index.apply_service(&svc);
        let mut slice = random_slice(&mut rng, name);
        slice.ports = Some(
            serde_json::from_value(json!([{"name": "p", "port": 8080, "protocol": "TCP"}])).expect("ports"),
        );
        slice.endpoints = serde_json::from_value(json!([{"addresses": ["127.78.9.1"]}])).expect("endpoints");
        index.apply_endpoint_slice(&slice);
    }
    let snap = index.build();
    assert!(m.apply(&snap).is_empty());
    assert_eq!(m.len(), 2);
    let key_a = FrontendKey::Addr(Protocol::Tcp, "127.78.3.1:80".parse().expect("sa"));
    let key_b = FrontendKey::Addr(Protocol::Tcp, "127.78.3.2:80".parse().expect("sa"));
    let before_a = m.listener(&key_a).expect("a").upstreams();
    let before_b = m.listener(&key_b).expect("b").upstreams();

    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "b-1", "labels": {"kubernetes.io/service-name": "b"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.78.9.1"]}, {"addresses": ["127.78.9.2"]}],
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("slice");
    index.apply_endpoint_slice(&slice);
    let snap = index.build();
    assert!(m.apply_changes(&snap).is_empty());
    assert!(Arc::ptr_eq(&before_a, &m.listener(&key_a).expect("a").upstreams()), "a untouched");
    let after_b = m.listener(&key_b).expect("b").upstreams();
    assert!(!Arc::ptr_eq(&before_b, &after_b));
    assert_eq!(after_b.pool().endpoints().len(), 2);
}

#[tokio::test]
async fn failed_bind_is_retried_without_a_change() {
    // A socket without SO_REUSEPORT on the frontend address makes the manager's bind fail.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("blocker");
    let addr = blocker.local_addr().expect("addr");
    let mut index = Index::new(None);
    index.apply_listener(ferry_model::listener::ValidListener {
        key: ferry_model::ServiceKey::new("", "l"),
        address: addr,
        protocol: Protocol::Tcp,
        backends: vec![ferry_model::Backend::Addr("127.0.0.1:9".parse().expect("sa"))],
        balancing: ferry_model::Balancing::RoundRobin,
        session_affinity: ferry_model::SessionAffinity::None,
        health_check: None,
        passive_health: ferry_model::PassiveHealth::default(),
        timeouts: ferry_model::Timeouts::default(),
        zero_copy: false,
    });
    let snap = index.build();
    let mut m = Manager::new(ProxyConfig::default());
    assert_eq!(m.apply(&snap).len(), 1);
    assert!(m.is_empty());
    // Nothing changed and the address is still taken: still failing, still pending.
    assert_eq!(m.apply_changes(&snap).len(), 1);
    drop(blocker);
    assert!(m.apply_changes(&snap).is_empty());
    assert_eq!(m.local_addr(&FrontendKey::Addr(Protocol::Tcp, addr)), Some(addr));
    // And once bound, an unchanged snapshot visits nothing.
    assert!(m.pending.is_empty());
    assert!(m.apply_changes(&snap).is_empty());
    assert_eq!(m.len(), 1);
}

/// A Ferry listener on `addr` over `backends`, with a TCP health check when `checked`.
fn checked_listener(
    name: &str,
    addr: SocketAddr,
    backends: &[&str],
    checked: bool,
) -> ferry_model::listener::ValidListener {
    ferry_model::listener::ValidListener {
        key: ferry_model::ServiceKey::new("", name),
        address: addr,
        protocol: Protocol::Tcp,
        backends: backends.iter().map(|b| ferry_model::Backend::Addr(b.parse().expect("sa"))).collect(),
        balancing: ferry_model::Balancing::RoundRobin,
        session_affinity: ferry_model::SessionAffinity::None,
        health_check: checked.then(|| ferry_model::HealthCheck {
            kind: ferry_model::HealthCheckKind::Tcp,
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }),
        passive_health: ferry_model::PassiveHealth::default(),
        timeouts: ferry_model::Timeouts::default(),
        zero_copy: false,
    }
}

#[tokio::test]
async fn probes_follow_incremental_changes() {
    let (a, b) = ("127.78.4.1:80".parse().expect("sa"), "127.78.4.2:80".parse().expect("sa"));
    let mut index = Index::new(None);
    let mut m = Manager::new(ProxyConfig::default());
    let step = |index: &mut Index, m: &mut Manager| {
        let snap = index.build();
        assert!(m.apply_changes(&snap).is_empty());
        m.checks.len()
    };
    index.apply_listener(checked_listener("a", a, &["127.78.9.1:1", "127.78.9.2:1"], true));
    index.apply_listener(checked_listener("b", b, &["127.78.9.3:1"], true));
    assert_eq!(step(&mut index, &mut m), 3);
    // An endpoint leaves one listener: its probe stops, the others keep running.
    index.apply_listener(checked_listener("a", a, &["127.78.9.1:1"], true));
    assert_eq!(step(&mut index, &mut m), 2);
    // The check is removed from one listener.
    index.apply_listener(checked_listener("b", b, &["127.78.9.3:1"], false));
    assert_eq!(step(&mut index, &mut m), 1);
    // A listener with a probed endpoint goes away.
    index.delete_listener(&ferry_model::ServiceKey::new("", "a"));
    assert_eq!(step(&mut index, &mut m), 0);
    assert_eq!(m.len(), 1);
}
