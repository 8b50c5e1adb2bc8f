//! `ferry node` behaviour over loopback: every 127.0.0.0/8 address is local, so `127.77.T.10`
//! stands in for a ClusterIP and `127.77.T.20` for a node address (T: one number per test, so
//! tests running in parallel never share an address). Snapshots are built from real
//! `Service` / `EndpointSlice` objects through `ferry_model::Index`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_model::{FrontendKey, Index, NodeInfo, Protocol, Snapshot};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
};

use super::*;
use crate::{
    Manager, ProxyConfig,
    tests::{DEADLINE, collect_backend, udp_backend},
};

const NODE: &str = "node-a";
const OTHER: &str = "node-b";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A Service in `default` from the `spec` given (plus optional `status` and annotations).
#[allow(clippy::needless_pass_by_value)] // `json!` values read best inline
fn service(name: &str, spec: Value, status: Value, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name, "annotations": annotations},
        "spec": spec,
        "status": status,
    }))
    .expect("service")
}

/// One EndpointSlice per endpoint `(addr, node, ready)`, so every endpoint can have its own port
/// (backends bind ephemeral ports). `port_name` and `protocol` match the service port.
fn slices(
    svc: &str,
    port_name: &str,
    protocol: &str,
    eps: &[(SocketAddr, &str, bool)],
) -> Vec<EndpointSlice> {
    eps.iter()
        .enumerate()
        .map(|(i, (addr, node, ready))| {
            serde_json::from_value(json!({
                "metadata": {"namespace": "default", "name": format!("{svc}-{port_name}-{i}"),
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": ready},
                               "nodeName": node}],
                "ports": [{"name": port_name, "port": addr.port(), "protocol": protocol}],
            }))
            .expect("slice")
        })
        .collect()
}

struct Node {
    index: Index,
    mgr: Manager,
}

impl Node {
    fn new(config: NodeConfig) -> Self {
        Self::with_filter(NodeFrontends::new(config))
    }

    fn with_filter(filter: NodeFrontends) -> Self {
        Self {
            index: Index::new(Some(NodeInfo { name: NODE.into(), zone: None })),
            mgr: Manager::new(ProxyConfig {
                drain_timeout: DEADLINE,
                filter: Arc::new(filter),
                ..ProxyConfig::default()
            }),
        }
    }

    /// Replaces the service's slices by `slices` (deleting `stale` old slice names first).
    fn apply(&mut self, svc: &Service, slices: &[EndpointSlice], stale: &[&str]) -> Arc<Snapshot> {
        self.index.apply_service(svc);
        for name in stale {
            self.index.delete_endpoint_slice("default", name);
        }
        for s in slices {
            self.index.apply_endpoint_slice(s);
        }
        let snap = self.index.build();
        let errors = self.mgr.apply(&snap);
        assert!(errors.is_empty(), "{errors:?}");
        snap
    }

    fn bound(&self) -> Vec<SocketAddr> {
        self.mgr.bound().into_iter().map(|(_, a)| a).collect()
    }
}

/// A TCP connection to `to` from the address `from` (port chosen by the kernel).
async fn connect_from(from: &str, to: SocketAddr) -> io::Result<TcpStream> {
    let s = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.bind(SocketAddr::new(ip(from), 0))?;
    tokio::time::timeout(DEADLINE, s.connect(to)).await.map_err(|_| io::ErrorKind::TimedOut)?
}

/// Sends `payload`, half-closes, reads the reply to EOF (see `collect_backend`: `[id] ++ data`).
async fn request_from(from: &str, to: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect_from(from, to).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await.map_err(|_| io::ErrorKind::TimedOut)??;
    Ok(out)
}

/// The backend id that served one request from `from`.
async fn served_by(from: &str, to: SocketAddr) -> u8 {
    let out = request_from(from, to, b"x").await.expect("request served");
    assert_eq!(&out[1..], b"x");
    out[0]
}

/// Asserts that `s` gets neither bytes nor EOF nor reset within `wait`.
async fn assert_silent(s: &mut TcpStream, wait: Duration) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("a dropped connection must stay silent, got {r:?}"),
    }
}

/// Polls (bounded) until a TCP connect to `to` is refused.
async fn wait_refused(to: SocketAddr) {
    let start = Instant::now();
    loop {
        match TcpStream::connect(to).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            _ => assert!(start.elapsed() < DEADLINE, "{to} still accepting"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn cluster_ip_service(name: &str, cluster_ip: &str, port: u16, extra: Value) -> Service {
    let mut spec = json!({
        "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
        "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
    });
    merge(&mut spec, extra);
    service(name, spec, json!({}), json!({}))
}

fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, extra) {
        a.extend(b);
    }
}

// === bindings (no sockets) ===

#[test]
fn bindings_follow_traffic_policies() {
    let mut index = Index::new(Some(NodeInfo { name: NODE.into(), zone: None }));
    let local = sa("10.0.0.1:8080");
    let remote = sa("10.0.1.1:8080");
    let svc = service(
        "web",
        json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
            "externalIPs": ["192.0.2.7"], "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["198.51.100.0/24"],
        }),
        json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}),
        json!({}),
    );
    index.apply_service(&svc);
    for s in slices("web", "http", "TCP", &[(local, NODE, true), (remote, OTHER, true)]) {
        index.apply_endpoint_slice(&s);
    }
    let snap = index.build();
    let filter = NodeFrontends::new(NodeConfig {
        node_port_addresses: vec![ip("198.51.100.20"), ip("172.16.0.20"), ip("fd00::20")],
        local_sources: vec!["10.0.0.0/24".parse().expect("net"), "198.51.100.20/32".parse().expect("net")],
    });
    let mut all = Vec::new();
    for (key, port) in snap.frontends.iter() {
        let mut out = Vec::new();
        filter.bindings(key, port, &mut out);
        all.extend(out.into_iter().map(|b| (*key, b)));
    }
    let addrs = |eps: &[ferry_model::Endpoint]| eps.iter().map(|e| e.addr).collect::<Vec<_>>();
    let find = |a: &str| all.iter().find(|(_, b)| b.addr == sa(a)).map(|(_, b)| b).expect(a);
    assert_eq!(all.len(), 5, "ClusterIP, externalIP, LB IP, NodePort on two v4 addresses: {all:#?}");

    let cip = find("10.96.0.10:80");
    assert_eq!(addrs(&cip.endpoints), [local], "iTP=Local: local set");
    assert!(cip.internal.is_none() && cip.allowed_sources.is_none());
    assert!(cip.drop_when_empty && cip.freebind);

    for a in ["192.0.2.7:80", "198.51.100.20:30080", "172.16.0.20:30080", "203.0.113.9:80"] {
        let b = find(a);
        assert_eq!(addrs(&b.endpoints), [local], "{a}: eTP=Local: local set for external clients");
        let (sources, cluster) = b.internal.as_ref().expect("short-circuit");
        assert_eq!(addrs(cluster), [local, remote], "{a}: in-cluster clients get the cluster set");
        // The configured local sources, plus the frontend's own address (the node's own
        // connections to a local VIP come from it) unless it is one of them already.
        let own = ipnet::IpNet::from(a.parse::<std::net::SocketAddr>().expect("addr").ip());
        assert!(sources.contains(&own), "{a}: {sources:?}");
        assert!(sources.len() == 2 || sources.len() == 3, "{a}: {sources:?}");
    }
    assert!(find("192.0.2.7:80").allowed_sources.is_none(), "source ranges: LB IPs only");
    assert!(find("198.51.100.20:30080").allowed_sources.is_none(), "source ranges: LB IPs only");
    let ranges = find("203.0.113.9:80").allowed_sources.clone().expect("source ranges");
    // The node address 198.51.100.20 is inside a range: the LB IP itself is allowed too.
    assert_eq!(
        &ranges[..],
        &["198.51.100.0/24".parse().expect("net"), "203.0.113.9/32".parse().expect("net")]
    );
}

#[test]
fn no_endpoints_binds_nothing_and_listeners_are_not_node_frontends() {
    let mut index = Index::new(Some(NodeInfo { name: NODE.into(), zone: None }));
    index.apply_service(&cluster_ip_service("empty", "10.96.0.11", 80, json!({})));
    index.apply_listener(
        ferry_model::Listener {
            api_version: ferry_model::listener::API_VERSION.into(),
            kind: ferry_model::listener::KIND.into(),
            metadata: serde_json::from_value(json!({"name": "l"})).expect("meta"),
            spec: serde_json::from_value(json!({"address": "127.0.0.1:9", "backends": ["127.0.0.1:10"]}))
                .expect("spec"),
        }
        .validate()
        .expect("valid"),
    );
    let snap = index.build();
    assert_eq!(snap.frontends.len(), 2);
    let filter = NodeFrontends::new(NodeConfig::default());
    let mut out = Vec::new();
    for (key, port) in snap.frontends.iter() {
        filter.bindings(key, port, &mut out);
    }
    assert!(out.is_empty(), "{out:#?}");
}

// === loopback behaviour ===

#[tokio::test]
async fn cluster_ip_tcp_and_udp() {
    let (tcp_backend, _t) = collect_backend(1).await;
    let (udp_be, _u) = udp_backend(2).await;
    let mut node = Node::new(NodeConfig::default());
    let svc = service(
        "dns",
        json!({
            "type": "ClusterIP", "clusterIP": "127.77.1.10", "clusterIPs": ["127.77.1.10"],
            "ports": [{"name": "tcp", "port": 18053, "protocol": "TCP"},
                      {"name": "udp", "port": 18053, "protocol": "UDP"}],
        }),
        json!({}),
        json!({}),
    );
    let mut all = slices("dns", "tcp", "TCP", &[(tcp_backend, OTHER, true)]);
    all.extend(slices("dns", "udp", "UDP", &[(udp_be, OTHER, true)]));
    node.apply(&svc, &all, &[]);
    let frontend = sa("127.77.1.10:18053");
    assert_eq!(served_by("127.0.0.1", frontend).await, 1);

    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.send_to(b"ping", frontend).await.expect("send");
    let mut buf = [0u8; 64];
    let (n, from) =
        tokio::time::timeout(DEADLINE, c.recv_from(&mut buf)).await.expect("reply in time").expect("recv");
    assert_eq!((&buf[..n], from), (&b"\x02ping"[..], frontend));
}

#[tokio::test]
async fn node_port_on_every_node_address_of_the_family() {
    let (backend, _t) = collect_backend(1).await;
    let mut node = Node::new(NodeConfig {
        node_port_addresses: vec![ip("127.77.2.20"), ip("127.77.2.21"), ip("::1")],
        local_sources: Vec::new(),
    });
    let svc = service(
        "np",
        json!({
            "type": "NodePort", "clusterIP": "127.77.2.10", "clusterIPs": ["127.77.2.10"],
            "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP", "nodePort": 31801}],
        }),
        json!({}),
        json!({}),
    );
    node.apply(&svc, &slices("np", "tcp", "TCP", &[(backend, OTHER, true)]), &[]);
    let mut bound = node.bound();
    bound.sort_unstable();
    assert_eq!(bound, [sa("127.77.2.10:18080"), sa("127.77.2.20:31801"), sa("127.77.2.21:31801")]);
    for to in ["127.77.2.20:31801", "127.77.2.21:31801", "127.77.2.10:18080"] {
        assert_eq!(served_by("127.0.0.1", sa(to)).await, 1, "{to}");
    }
}

#[tokio::test]
async fn internal_traffic_policy_local_uses_local_endpoints() {
    let (local, _a) = collect_backend(1).await;
    let (remote, _b) = collect_backend(2).await;
    let mut node = Node::new(NodeConfig::default());
    let svc = cluster_ip_service("itp", "127.77.3.10", 18080, json!({"internalTrafficPolicy": "Local"}));
    node.apply(&svc, &slices("itp", "tcp", "TCP", &[(local, NODE, true), (remote, OTHER, true)]), &[]);
    for _ in 0..8 {
        assert_eq!(served_by("127.0.0.1", sa("127.77.3.10:18080")).await, 1);
    }
}

fn etp_local_service(name: &str, t: u8, extra: Value) -> Service {
    let mut spec = json!({
        "type": "NodePort", "clusterIP": format!("127.77.{t}.10"), "clusterIPs": [format!("127.77.{t}.10")],
        "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP", "nodePort": 30000 + u16::from(t) * 10}],
        "externalTrafficPolicy": "Local",
    });
    merge(&mut spec, extra);
    service(name, spec, json!({}), json!({"ferry.ethercluster.io/balancing": "RoundRobin"}))
}

fn node_config(t: u8) -> NodeConfig {
    NodeConfig {
        node_port_addresses: vec![ip(&format!("127.77.{t}.20"))],
        local_sources: vec![format!("127.77.{t}.1/32").parse().expect("net")],
    }
}

#[tokio::test]
async fn external_traffic_policy_local_short_circuits_in_cluster_clients() {
    let (local, _a) = collect_backend(1).await;
    let (remote, _b) = collect_backend(2).await;
    let mut node = Node::new(node_config(4));
    let svc = etp_local_service("etp", 4, json!({}));
    node.apply(&svc, &slices("etp", "tcp", "TCP", &[(local, NODE, true), (remote, OTHER, true)]), &[]);
    let node_port = sa("127.77.4.20:30040");
    let mut in_cluster = Vec::new();
    let mut external = Vec::new();
    for _ in 0..4 {
        in_cluster.push(served_by("127.77.4.1", node_port).await);
        external.push(served_by("127.77.4.99", node_port).await);
    }
    in_cluster.sort_unstable();
    assert_eq!(in_cluster, [1, 1, 2, 2], "in-cluster clients use the cluster set");
    assert_eq!(external, [1, 1, 1, 1], "external clients use local endpoints only");
}

#[tokio::test]
async fn load_balancer_source_ranges() {
    let (backend, _a) = collect_backend(1).await;
    let mut node = Node::new(node_config(5));
    let svc = service(
        "lb",
        json!({
            "type": "LoadBalancer", "clusterIP": "127.77.5.10", "clusterIPs": ["127.77.5.10"],
            "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP", "nodePort": 30050}],
            "loadBalancerSourceRanges": ["127.77.5.0/30"],
        }),
        json!({"loadBalancer": {"ingress": [{"ip": "127.77.5.50"}]}}),
        json!({}),
    );
    node.apply(&svc, &slices("lb", "tcp", "TCP", &[(backend, OTHER, true)]), &[]);
    let lb = sa("127.77.5.50:18080");
    assert_eq!(served_by("127.77.5.2", lb).await, 1, "inside a range");
    // The node address 127.77.5.20 is not in a range: the LB IP as source is not allowed...
    let mut s = connect_from("127.77.5.99", lb).await.expect("handshake completes");
    s.write_all(b"x").await.expect("write");
    assert_silent(&mut s, Duration::from_millis(300)).await;
    let mut s = connect_from("127.77.5.50", lb).await.expect("handshake completes");
    assert_silent(&mut s, Duration::from_millis(100)).await;
    // ...and the ranges do not apply to the NodePort or the ClusterIP.
    assert_eq!(served_by("127.77.5.99", sa("127.77.5.20:30050")).await, 1);
    assert_eq!(served_by("127.77.5.99", sa("127.77.5.10:18080")).await, 1);

    // With the node inside a range, the LB IP itself is an allowed source.
    let mut node = Node::new(NodeConfig { node_port_addresses: vec![ip("127.77.5.1")], ..node_config(5) });
    let svc = service(
        "lb2",
        json!({
            "type": "LoadBalancer", "clusterIP": "127.77.5.11", "clusterIPs": ["127.77.5.11"],
            "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP"}],
            "loadBalancerSourceRanges": ["127.77.5.0/30"],
        }),
        json!({"loadBalancer": {"ingress": [{"ip": "127.77.5.51"}]}}),
        json!({}),
    );
    node.apply(&svc, &slices("lb2", "tcp", "TCP", &[(backend, OTHER, true)]), &[]);
    assert_eq!(served_by("127.77.5.51", sa("127.77.5.51:18080")).await, 1);
}

#[tokio::test]
async fn no_endpoints_refuses_at_once_and_rebinds() {
    let (backend, _a) = collect_backend(1).await;
    let (udp_be, _u) = udp_backend(2).await;
    let mut node = Node::new(NodeConfig::default());
    let svc = service(
        "gone",
        json!({
            "type": "ClusterIP", "clusterIP": "127.77.6.10", "clusterIPs": ["127.77.6.10"],
            "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP"},
                      {"name": "udp", "port": 18080, "protocol": "UDP"}],
        }),
        json!({}),
        json!({}),
    );
    let frontend = sa("127.77.6.10:18080");
    node.apply(&svc, &[], &[]);
    assert!(node.bound().is_empty());
    let start = Instant::now();
    let e = TcpStream::connect(frontend).await.expect_err("refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    assert!(start.elapsed() < Duration::from_secs(1), "refused at once");
    // UDP: ICMP port unreachable reaches a connected socket as ECONNREFUSED.
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.connect(frontend).await.expect("connect");
    c.send(b"x").await.expect("send");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(DEADLINE, c.recv(&mut buf)).await.expect("ICMP in time");
    assert_eq!(r.map_err(|e| e.kind()).expect_err("unreachable"), io::ErrorKind::ConnectionRefused);

    // An endpoint appears: bound and served.
    let mut eps = slices("gone", "tcp", "TCP", &[(backend, OTHER, true)]);
    eps.extend(slices("gone", "udp", "UDP", &[(udp_be, OTHER, true)]));
    node.apply(&svc, &eps, &[]);
    assert_eq!(node.bound().len(), 2);
    assert_eq!(served_by("127.0.0.1", frontend).await, 1);
    c.send(b"y").await.expect("send");
    let n = tokio::time::timeout(DEADLINE, c.recv(&mut buf)).await.expect("reply").expect("recv");
    assert_eq!(&buf[..n], b"\x02y");

    // The last endpoint goes (not ready anywhere): unbound again.
    let mut eps = slices("gone", "tcp", "TCP", &[(backend, OTHER, false)]);
    eps.extend(slices("gone", "udp", "UDP", &[(udp_be, OTHER, false)]));
    node.apply(&svc, &eps, &[]);
    assert!(node.bound().is_empty());
    wait_refused(frontend).await;
}

#[tokio::test]
async fn local_policy_without_local_endpoints_drops() {
    let (remote, _b) = collect_backend(2).await;
    let (local, _a) = collect_backend(1).await;
    let hold = Hold { timeout: Duration::from_millis(600), max_held: 8 };
    let mut node = Node::with_filter(NodeFrontends::new(node_config(7)).with_hold(hold));
    let svc = etp_local_service("drop", 7, json!({}));
    node.apply(&svc, &slices("drop", "tcp", "TCP", &[(remote, OTHER, true)]), &[]);
    let node_port = sa("127.77.7.20:30070");
    let key = FrontendKey::NodePort(Protocol::Tcp, 30070, ferry_model::IpFamily::V4);

    // External client: handshake, then silence (no bytes, no reset), then FIN at the bound.
    let started = Instant::now();
    let mut s = connect_from("127.77.7.99", node_port).await.expect("handshake completes");
    s.write_all(b"hello").await.expect("write");
    assert_silent(&mut s, Duration::from_millis(200)).await;
    assert_eq!(node.mgr.listener(&key).expect("listener").held_connections(), 1);
    // The in-cluster client is served meanwhile (short-circuit to the cluster set).
    assert_eq!(served_by("127.77.7.1", node_port).await, 2);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await.expect("closed in time");
    assert_eq!(r.expect("FIN, not RST"), 0);
    assert!(started.elapsed() >= hold.timeout);

    // A held connection is served once a local endpoint appears (its early bytes kept).
    let mut s = connect_from("127.77.7.99", node_port).await.expect("handshake completes");
    s.write_all(b"early").await.expect("write");
    s.shutdown().await.expect("half-close");
    let eps = slices("drop", "tcp", "TCP", &[(remote, OTHER, true), (local, NODE, true)]);
    node.apply(&svc, &eps, &[]);
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await.expect("served").expect("read");
    assert_eq!(out, b"\x01early");
}

#[tokio::test]
async fn local_policy_without_local_endpoints_drops_udp() {
    let (remote, _b) = udp_backend(2).await;
    let mut node = Node::new(node_config(8));
    let svc = service(
        "udrop",
        json!({
            "type": "NodePort", "clusterIP": "127.77.8.10", "clusterIPs": ["127.77.8.10"],
            "ports": [{"name": "udp", "port": 18053, "protocol": "UDP", "nodePort": 30080}],
            "externalTrafficPolicy": "Local",
        }),
        json!({}),
        json!({}),
    );
    node.apply(&svc, &slices("udrop", "udp", "UDP", &[(remote, OTHER, true)]), &[]);
    let node_port = sa("127.77.8.20:30080");
    let mut buf = [0u8; 64];
    let inside = UdpSocket::bind("127.77.8.1:0").await.expect("bind");
    inside.send_to(b"a", node_port).await.expect("send");
    let (n, _) =
        tokio::time::timeout(DEADLINE, inside.recv_from(&mut buf)).await.expect("reply").expect("recv");
    assert_eq!(&buf[..n], b"\x02a");
    let outside = UdpSocket::bind("127.77.8.99:0").await.expect("bind");
    outside.connect(node_port).await.expect("connect");
    outside.send(b"b").await.expect("send");
    // Dropped: neither a reply nor an ICMP error.
    assert!(tokio::time::timeout(Duration::from_millis(300), outside.recv(&mut buf)).await.is_err());
}

/// The header goes first even when the client's bytes are already queued at the accept, which
/// is when an early send (see `tcp::handle`) would otherwise pass them upstream at once: the test
/// runtime has one thread, so Ferry's accept loop runs only once the blocking connect, write and
/// half-close below are done.
#[tokio::test(flavor = "current_thread")]
async fn proxy_protocol_v2_header_reaches_the_endpoint() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _t = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut header = [0u8; 28];
        s.read_exact(&mut header).await.expect("header");
        let mut data = Vec::new();
        s.read_to_end(&mut data).await.expect("data");
        s.write_all(b"ok").await.expect("reply");
        let _ = tx.send((header, data));
    });
    let mut node = Node::new(NodeConfig::default());
    let mut svc = cluster_ip_service("pp", "127.77.9.10", 18080, json!({}));
    svc.metadata.annotations =
        Some([("ferry.ethercluster.io/proxy-protocol".to_owned(), "v2".to_owned())].into());
    node.apply(&svc, &slices("pp", "tcp", "TCP", &[(backend, OTHER, true)]), &[]);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&sa("127.77.9.3:0").into()).expect("bind");
    s.connect(&sa("127.77.9.10:18080").into()).expect("connect (the kernel completes it)");
    let mut s = std::net::TcpStream::from(s);
    std::io::Write::write_all(&mut s, b"payload").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    s.set_nonblocking(true).expect("non-blocking");
    let mut s = TcpStream::from_std(s).expect("register");
    let client = s.local_addr().expect("addr");
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await.expect("in time").expect("read");
    assert_eq!(out, b"ok");
    let (header, data) = tokio::time::timeout(DEADLINE, rx).await.expect("in time").expect("backend");
    let mut want = [0u8; proxy_protocol::MAX_LEN];
    let n = proxy_protocol::encode_v2(client, sa("127.77.9.10:18080"), &mut want);
    assert_eq!(&header[..], &want[..n]);
    assert_eq!(&header[16..20], &[127, 77, 9, 3], "client address");
    assert_eq!(data, b"payload");
}

#[tokio::test]
async fn client_ip_affinity_is_shared_by_all_frontends_of_a_port() {
    let (a, _a) = collect_backend(1).await;
    let (b, _b) = collect_backend(2).await;
    let mut node = Node::new(node_config(11));
    let svc = service(
        "sticky",
        json!({
            "type": "NodePort", "clusterIP": "127.77.11.10", "clusterIPs": ["127.77.11.10"],
            "ports": [{"name": "tcp", "port": 18080, "protocol": "TCP", "nodePort": 30110}],
            "sessionAffinity": "ClientIP",
        }),
        json!({}),
        json!({"ferry.ethercluster.io/balancing": "RoundRobin"}),
    );
    node.apply(&svc, &slices("sticky", "tcp", "TCP", &[(a, OTHER, true), (b, OTHER, true)]), &[]);
    // Both pools start at the same round-robin position. Another client moves the NodePort's
    // cursor, so without a shared table the NodePort would now pick the other endpoint.
    served_by("127.77.11.7", sa("127.77.11.20:30110")).await;
    let first = served_by("127.77.11.5", sa("127.77.11.10:18080")).await;
    for to in ["127.77.11.20:30110", "127.77.11.10:18080", "127.77.11.20:30110"] {
        assert_eq!(served_by("127.77.11.5", sa(to)).await, first, "{to}");
    }
}

#[tokio::test]
async fn freebind_binds_addresses_not_yet_on_a_device() {
    let (backend, _a) = collect_backend(1).await;
    let mut node = Node::new(NodeConfig::default());
    // 192.0.2.0/24 (TEST-NET-1) is on no device of a test machine.
    let svc = cluster_ip_service("fb", "192.0.2.77", 18080, json!({}));
    node.apply(&svc, &slices("fb", "tcp", "TCP", &[(backend, OTHER, true)]), &[]);
    assert_eq!(node.bound(), [sa("192.0.2.77:18080")]);
    // Without IP_FREEBIND the same bind fails.
    let mut strict = Node::with_filter(NodeFrontends::new(NodeConfig::default()).with_freebind(false));
    strict.index.apply_service(&svc);
    for s in slices("fb", "tcp", "TCP", &[(backend, OTHER, true)]) {
        strict.index.apply_endpoint_slice(&s);
    }
    let errors = strict.mgr.apply(&strict.index.build());
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[tokio::test]
async fn transparent_upstream_preserves_the_client_ip_for_local_endpoints() {
    // IP_TRANSPARENT needs CAP_NET_ADMIN; without it this feature only logs and falls back.
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if probe.set_ip_transparent_v4(true).is_err() {
        eprintln!("skipped: no CAP_NET_ADMIN");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = l.local_addr().expect("addr");
    let _t = tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
        }
    });
    let filter = NodeFrontends::new(node_config(12)).with_transparent(true);
    let mut node = Node::with_filter(filter);
    let svc = etp_local_service("tp", 12, json!({}));
    node.apply(&svc, &slices("tp", "tcp", "TCP", &[(backend, NODE, true)]), &[]);
    let seen = |from: &'static str| async move {
        let mut s = connect_from(from, sa("127.77.12.20:30120")).await.expect("connect");
        let mut out = String::new();
        tokio::time::timeout(DEADLINE, s.read_to_string(&mut out)).await.expect("in time").expect("read");
        out
    };
    assert_eq!(seen("127.77.12.99").await, "127.77.12.99", "external client: its own IP");
    // Short-circuited (in-cluster) clients connect from a node address (the kernel's choice).
    assert_eq!(seen("127.77.12.1").await, "127.0.0.1");
}
