//! kube-proxy semantics of `ferry node` (issue 3, points 2 and 5) that `node.rs` does not cover,
//! each exercised from where a user sees it: a pod, the node itself, an outside client.
//!
//! Same network as [`crate::node`]; tests add what they need on top of it: a route to the
//! load-balancer/external range `192.168.200.0/24` (`fd00:200::/64`) via the node in the client
//! namespace, a second client address `192.168.100.3`, a third endpoint `10.244.2.11` (`c`, on
//! node-b). "Silent" means what kube-proxy's DROP looks like to a TCP client of a userspace
//! proxy: no bytes, no FIN and no RST within [`SILENCE`] (the connect itself may complete).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use crate::{
    harness::*,
    netns::Netns,
    node::{Cluster, docs, ep, hello, names, ready, sa, service, set, slice},
};

/// How long a dropped connection must stay silent.
const SILENCE: Duration = Duration::from_millis(1500);

// --- network and client helpers -----------------------------------------------------------------

/// Routes the LB/external range through the node from the client namespace.
fn route_lb_range(c: &Cluster) {
    c.client.ip(&["route", "add", "192.168.200.0/24", "via", "192.168.100.1"]);
    c.client.ip(&["-6", "route", "add", "fd00:200::/64", "via", "fd00:100::1"]);
}

/// Addresses on the VIP device.
fn vip_addresses(node: &Netns) -> String {
    let out = node.command("ip").args(["-o", "addr", "show", "dev", "ferry0"]).output().expect("ip addr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP connection from `ns`, bound to `src` first.
async fn connect_from(ns: &Netns, src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = ns.enter(|| if to.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() })?;
    sock.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_secs(5), sock.connect(to)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
    }
}

async fn hello_from(ns: &Netns, src: IpAddr, to: SocketAddr) -> std::io::Result<String> {
    read_greeting(&mut connect_from(ns, src, to).await?).await
}

/// Asserts that a connection attempt is dropped: the SYN goes unanswered, or the connection is
/// accepted and then neither sends a byte nor closes (FIN/RST) within [`SILENCE`].
async fn assert_silent(attempt: std::io::Result<TcpStream>, what: &str) {
    let mut s = match attempt {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return,
        Err(e) => panic!("{what}: expected a silent drop, the connect failed: {e}"),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(SILENCE, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{what}: expected a silent drop, got FIN"),
        Ok(Ok(n)) => panic!("{what}: expected a silent drop, got {:?}", String::from_utf8_lossy(&buf[..n])),
        Ok(Err(e)) => panic!("{what}: expected a silent drop, got {e}"),
    }
}

/// A UDP socket in `ns` connected to `to` (from `src`, or the routed source if `None`).
async fn udp_to(ns: &Netns, src: Option<IpAddr>, to: SocketAddr) -> UdpSocket {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0".parse().expect("ip") } else { "::".parse().expect("ip") };
    let sock = ns.udp_socket(SocketAddr::new(src.unwrap_or(any), 0));
    sock.connect(to).await.expect("udp connect");
    sock
}

/// Sends `payload` (retrying lost datagrams) and returns the backend name from the reply.
async fn udp_ask(sock: &UdpSocket, payload: &str) -> String {
    let mut buf = vec![0u8; 1500];
    for _ in 0..5 {
        sock.send(payload.as_bytes()).await.expect("udp send");
        match tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (name, echoed) = reply.split_once(':').expect("name:payload");
                assert_eq!(echoed, payload);
                return name.to_owned();
            }
            Ok(Err(e)) => panic!("udp reply to {payload:?}: {e}"),
            Err(_) => {}
        }
    }
    panic!("no UDP reply to {payload:?} from {:?}", sock.peer_addr());
}

/// Asserts that a datagram gets neither a reply nor an ICMP error within [`SILENCE`].
async fn assert_udp_silent(sock: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 1500];
    sock.send(b"hello?").await.expect("udp send");
    match tokio::time::timeout(SILENCE, sock.recv(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(n)) => panic!("{what}: expected a silent drop, got {:?}", String::from_utf8_lossy(&buf[..n])),
        Ok(Err(e)) => panic!("{what}: expected a silent drop, got {e}"),
    }
}

/// Polls `f` until it returns `Some`, at most [`DEADLINE`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn version(ferry: &Ferry) -> u64 {
    ferry.snapshot()["version"].as_u64().expect("version")
}

// --- LoadBalancer, source ranges, externalIPs ---------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn load_balancer_vip_ingress_is_served_and_proxy_mode_ingress_is_not() {
    let c = Cluster::new();
    route_lb_range(&c);
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    c.dir.write(
        "lb.yaml",
        &docs(&[
            service(
                "lb",
                &[],
                "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n",
                &[("http", "TCP", 80, "8080", Some(30090)), ("dns", "UDP", 53, "5353", Some(30053))],
                "  loadBalancer:\n    ingress:\n    - {ip: 192.168.200.10, ipMode: VIP}\n    \
                 - {ip: 192.168.200.11, ipMode: Proxy}\n    - {ip: 192.168.200.12}\n",
            ),
            slice(
                "lb-1",
                "lb",
                "IPv4",
                &[ready("10.244.1.10", "node-a")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);

    let device = vip_addresses(&c.node);
    assert!(device.contains("192.168.200.10/32"), "VIP-mode ingress on the device: {device}");
    assert!(device.contains("192.168.200.12/32"), "ingress without ipMode is VIP mode: {device}");
    assert!(!device.contains("192.168.200.11"), "Proxy-mode ingress must not be local: {device}");

    for lb in ["192.168.200.10", "192.168.200.12"] {
        let to = SocketAddr::new(lb.parse().expect("ip"), 80);
        assert_eq!(hello(&c.client, to).await.expect("LB IP from outside"), "a", "{lb}");
        assert_eq!(hello(&c.pod_a, to).await.expect("LB IP from a pod"), "a", "{lb}");
        assert_eq!(hello(&c.node, to).await.expect("LB IP from the node"), "a", "{lb}");
        let to = SocketAddr::new(lb.parse().expect("ip"), 53);
        assert_eq!(udp_ask(&udp_to(&c.client, None, to).await, "q-out").await, "a", "UDP {lb} from outside");
        assert_eq!(udp_ask(&udp_to(&c.pod_a, None, to).await, "q-pod").await, "a", "UDP {lb} from a pod");
    }

    // ipMode: Proxy means the load balancer proxies itself: the node must not capture the IP.
    for ns in [&c.client, &c.pod_a] {
        let r = ns.tcp_connect(sa("192.168.200.11:80"));
        assert!(r.is_err(), "Proxy-mode ingress IP served from {}", ns.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn load_balancer_source_ranges_filter_lb_ips_only() {
    let c = Cluster::new();
    route_lb_range(&c);
    c.client.ip(&["addr", "add", "192.168.100.3/24", "dev", "eth0"]);
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    c.dir.write(
        "lb.yaml",
        &docs(&[
            service(
                "lb",
                &[],
                "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  \
                 loadBalancerSourceRanges: [\"192.168.100.2/32\", \" 172.16.0.0/12 \"]\n",
                &[("http", "TCP", 80, "8080", Some(30090)), ("dns", "UDP", 53, "5353", Some(30053))],
                "  loadBalancer:\n    ingress:\n    - {ip: 192.168.200.10}\n",
            ),
            slice(
                "lb-1",
                "lb",
                "IPv4",
                &[ready("10.244.1.10", "node-a")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);
    let (inside, outside): (IpAddr, IpAddr) =
        ("192.168.100.2".parse().expect("ip"), "192.168.100.3".parse().expect("ip"));

    assert_eq!(
        hello_from(&c.client, inside, sa("192.168.200.10:80")).await.expect("in range"),
        "a",
        "a client inside the ranges is served"
    );
    assert_eq!(udp_ask(&udp_to(&c.client, Some(inside), sa("192.168.200.10:53")).await, "in").await, "a");

    assert_silent(connect_from(&c.client, outside, sa("192.168.200.10:80")).await, "outside the ranges")
        .await;
    assert_udp_silent(
        &udp_to(&c.client, Some(outside), sa("192.168.200.10:53")).await,
        "UDP outside the ranges",
    )
    .await;
    // Ranges apply to every source of the LB IP, pods included (kube-proxy's firewall chain).
    assert_silent(c.pod_a.tcp_connect(sa("192.168.200.10:80")), "a pod outside the ranges").await;

    // The NodePort and the ClusterIP of the same Service are not filtered.
    assert_eq!(
        hello_from(&c.client, outside, sa("192.168.100.1:30090"))
            .await
            .expect("NodePort from outside the ranges"),
        "a"
    );
    assert_eq!(
        udp_ask(&udp_to(&c.client, Some(outside), sa("192.168.100.1:30053")).await, "np").await,
        "a",
        "UDP NodePort from outside the ranges"
    );
    assert_eq!(hello(&c.pod_a, sa("10.96.0.20:80")).await.expect("ClusterIP"), "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn external_ips_are_served_from_outside_and_from_pods() {
    let c = Cluster::new();
    route_lb_range(&c);
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    c.dir.write(
        "ext.yaml",
        &docs(&[
            service(
                "ext",
                &[],
                "  clusterIP: 10.96.0.21\n  externalIPs: [\"192.168.200.20\"]\n",
                &[("http", "TCP", 80, "8080", None), ("dns", "UDP", 53, "5353", None)],
                "",
            ),
            slice(
                "ext-1",
                "ext",
                "IPv4",
                &[ready("10.244.1.10", "node-a"), ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);
    assert!(vip_addresses(&c.node).contains("192.168.200.20/32"));

    let to = sa("192.168.200.20:80");
    assert_eq!(names(&c.client, to, 20).await, set(&["a", "b"]), "externalIP from outside");
    assert_eq!(names(&c.pod_a, to, 20).await, set(&["a", "b"]), "externalIP from a pod");
    assert_eq!(names(&c.node, to, 20).await, set(&["a", "b"]), "externalIP from the node");
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        seen.insert(udp_ask(&udp_to(&c.client, None, sa("192.168.200.20:53")).await, &format!("q{i}")).await);
    }
    assert_eq!(seen, set(&["a", "b"]), "UDP externalIP from outside");
    let from_pod = udp_ask(&udp_to(&c.pod_b, None, sa("192.168.200.20:53")).await, "p").await;
    assert!(from_pod == "a" || from_pod == "b", "UDP externalIP from a pod: {from_pod}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_load_balancer_ingress_and_external_ip_from_outside() {
    let c = Cluster::new();
    route_lb_range(&c);
    let _a = Cluster::tcp_backend(&c.pod_a, "fd00:244:1::10", 8080, "a6");
    c.dir.write(
        "lb6.yaml",
        &docs(&[
            service(
                "lb6",
                &[],
                "  type: LoadBalancer\n  ipFamilies: [IPv6]\n  clusterIP: fd00:96::20\n  \
                 clusterIPs: [\"fd00:96::20\"]\n  externalIPs: [\"fd00:200::20\"]\n",
                &[("http", "TCP", 80, "8080", Some(30091))],
                "  loadBalancer:\n    ingress:\n    - {ip: \"fd00:200::10\", ipMode: VIP}\n    \
                 - {ip: \"fd00:200::11\", ipMode: Proxy}\n",
            ),
            slice("lb6-1", "lb6", "IPv6", &[ready("fd00:244:1::10", "node-a")], &[("http", "TCP", 8080)]),
        ]),
    );
    let _ferry = c.start(&[]);
    let device = vip_addresses(&c.node);
    assert!(device.contains("fd00:200::10/128") && device.contains("fd00:200::20/128"), "{device}");
    assert!(!device.contains("fd00:200::11"), "{device}");

    assert_eq!(hello(&c.client, sa("[fd00:200::10]:80")).await.expect("v6 LB IP from outside"), "a6");
    assert_eq!(hello(&c.client, sa("[fd00:200::20]:80")).await.expect("v6 externalIP from outside"), "a6");
    assert_eq!(hello(&c.pod_a, sa("[fd00:200::10]:80")).await.expect("v6 LB IP from a pod"), "a6");
    assert!(c.client.tcp_connect(sa("[fd00:200::11]:80")).is_err(), "v6 Proxy-mode ingress served");
}

// --- session affinity -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn session_affinity_client_ip_sticks_per_client_and_expires_after_timeout() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    let endpoints = [ready("10.244.1.10", "node-a"), ready("10.244.2.10", "node-b")];
    let rr = [("ferry.ethercluster.io/balancing", "RoundRobin")];
    c.dir.write(
        "sticky.yaml",
        &docs(&[
            service(
                "sticky",
                &rr,
                "  clusterIP: 10.96.0.30\n  sessionAffinity: ClientIP\n  \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
                &[("http", "TCP", 80, "8080", None), ("dns", "UDP", 53, "5353", None)],
                "",
            ),
            slice("sticky-1", "sticky", "IPv4", &endpoints, &[("http", "TCP", 8080), ("dns", "UDP", 5353)]),
            service(
                "short",
                &rr,
                "  clusterIP: 10.96.0.31\n  sessionAffinity: ClientIP\n  \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
                &[("http", "TCP", 80, "8080", None)],
                "",
            ),
            slice("short-1", "short", "IPv4", &endpoints, &[("http", "TCP", 8080)]),
            service("plain", &rr, "  clusterIP: 10.96.0.32\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice("plain-1", "plain", "IPv4", &endpoints, &[("http", "TCP", 8080)]),
        ]),
    );
    let _ferry = c.start(&[]);

    // Control: RoundRobin without affinity alternates, so the stickiness below is affinity's doing.
    assert_eq!(names(&c.pod_a, sa("10.96.0.32:80"), 4).await, set(&["a", "b"]));

    // Two clients (a pod, and the node itself) each keep their endpoint; RoundRobin gives the
    // second client's first (balanced) pick the other endpoint.
    let pod = names(&c.pod_a, sa("10.96.0.30:80"), 20).await;
    let node = names(&c.node, sa("10.96.0.30:80"), 20).await;
    assert_eq!(pod.len(), 1, "the pod kept its endpoint: {pod:?}");
    assert_eq!(node.len(), 1, "the node kept its endpoint: {node:?}");
    assert_ne!(pod, node, "a different client is balanced independently");
    assert_eq!(names(&c.pod_a, sa("10.96.0.30:80"), 5).await, pod, "still the pod's endpoint");

    // UDP: every new flow (source port) of one client address goes to the same endpoint.
    let mut udp = std::collections::HashSet::new();
    for i in 0..10 {
        udp.insert(udp_ask(&udp_to(&c.pod_b, None, sa("10.96.0.30:53")).await, &format!("u{i}")).await);
    }
    assert_eq!(udp.len(), 1, "UDP flows of one client stick: {udp:?}");

    // timeoutSeconds: 1. Connections in quick succession stick (each refreshes the entry)...
    let first = hello(&c.pod_a, sa("10.96.0.31:80")).await.expect("short");
    assert_eq!(names(&c.pod_a, sa("10.96.0.31:80"), 5).await, set(&[&first]));
    // ...and once the client has been idle longer than the timeout, it is balanced again: with
    // RoundRobin over two endpoints the next pick is the other endpoint. Idle periods are part of
    // the behaviour under test; the loop is bounded.
    let mut moved = None;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let now = hello(&c.pod_a, sa("10.96.0.31:80")).await.expect("short after idle");
        if now != first {
            moved = Some(now);
            break;
        }
    }
    assert!(moved.is_some(), "the ClientIP binding to {first} never expired");
}

// --- traffic policies ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn internal_traffic_policy_local_uses_local_endpoints_and_drops_without_them() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    c.dir.write(
        "itp.yaml",
        &docs(&[
            service(
                "both",
                &[],
                "  clusterIP: 10.96.0.40\n  internalTrafficPolicy: Local\n",
                &[("http", "TCP", 80, "8080", None)],
                "",
            ),
            slice(
                "both-1",
                "both",
                "IPv4",
                &[ready("10.244.1.10", "node-a"), ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8080)],
            ),
            service(
                "remote",
                &[],
                "  clusterIP: 10.96.0.41\n  internalTrafficPolicy: Local\n",
                &[("http", "TCP", 80, "8080", None), ("dns", "UDP", 53, "5353", None)],
                "",
            ),
            slice(
                "remote-1",
                "remote",
                "IPv4",
                &[ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
            // No endpoints at all: refused at once, the contrast to "no local endpoints".
            service("none", &[], "  clusterIP: 10.96.0.42\n", &[("dns", "UDP", 53, "5353", None)], ""),
        ]),
    );
    let _ferry = c.start(&[]);

    assert_eq!(names(&c.pod_a, sa("10.96.0.40:80"), 20).await, set(&["a"]), "iTP=Local from a pod");
    assert_eq!(names(&c.pod_b, sa("10.96.0.40:80"), 20).await, set(&["a"]), "iTP=Local from pod-b's wire");
    assert_eq!(names(&c.node, sa("10.96.0.40:80"), 20).await, set(&["a"]), "iTP=Local from the node");

    // Endpoints exist, but none on this node: kube-proxy drops (no REJECT).
    let start = Instant::now();
    assert_silent(c.pod_a.tcp_connect(sa("10.96.0.41:80")), "iTP=Local, no local endpoints").await;
    assert!(start.elapsed() >= SILENCE);
    assert_udp_silent(
        &udp_to(&c.pod_a, None, sa("10.96.0.41:53")).await,
        "UDP iTP=Local, no local endpoints",
    )
    .await;

    // No endpoints at all: UDP is refused (ICMP port unreachable) at once.
    let sock = &udp_to(&c.pod_a, None, sa("10.96.0.42:53")).await;
    let refused = eventually("UDP refused without endpoints", || async move {
        let _ = sock.send(b"x").await;
        match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut [0u8; 64])).await {
            Ok(Err(e)) => Some(e.kind()),
            Ok(Ok(_)) => panic!("a reply without endpoints"),
            Err(_) => None,
        }
    })
    .await;
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_without_local_endpoints_drops_outside_and_short_circuits_pods() {
    let c = Cluster::new();
    route_lb_range(&c);
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    c.dir.write(
        "etp.yaml",
        &docs(&[
            service(
                "etp",
                &[],
                "  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  externalTrafficPolicy: Local\n  \
                 healthCheckNodePort: 32001\n",
                &[("http", "TCP", 80, "8080", Some(30100)), ("dns", "UDP", 53, "5353", Some(30101))],
                "  loadBalancer:\n    ingress:\n    - {ip: 192.168.200.50}\n",
            ),
            slice(
                "etp-1",
                "etp",
                "IPv4",
                &[ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);

    for to in [sa("192.168.100.1:30100"), sa("192.168.200.50:80")] {
        assert_silent(c.client.tcp_connect(to), &format!("outside -> {to}, no local endpoints")).await;
    }
    assert_udp_silent(&udp_to(&c.client, None, sa("192.168.100.1:30101")).await, "UDP NodePort from outside")
        .await;
    // In-cluster sources are short-circuited to the cluster endpoints (the node's own traffic to
    // its LB IPs: see the next test).
    for to in [sa("192.168.100.1:30100"), sa("192.168.200.50:80"), sa("10.96.0.50:80")] {
        let pod = hello(&c.pod_a, to).await.unwrap_or_else(|e| panic!("{to} from a pod: {e}"));
        assert_eq!(pod, "b", "{to} from a pod");
    }
    for to in [sa("192.168.100.1:30100"), sa("10.96.0.50:80")] {
        let node = hello(&c.node, to).await.unwrap_or_else(|e| panic!("{to} from the node: {e}"));
        assert_eq!(node, "b", "{to} from the node");
    }
    assert_eq!(udp_ask(&udp_to(&c.pod_a, None, sa("192.168.100.1:30101")).await, "p").await, "b");
    // The health check tells the load balancer to avoid this node.
    let (status, body) = c.client.enter(|| http_get(sa("192.168.100.1:32001"), "/"));
    assert_eq!(status, 503, "{body}");
}

/// kube-proxy short-circuits node-originated traffic (`--src-type LOCAL` / `fib saddr type local`)
/// to an eTP=Local Service's LB IPs and externalIPs. On a Ferry node those addresses are local
/// (on the VIP device), so the kernel picks the VIP itself as the source of such a connection.
#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_short_circuits_the_nodes_own_traffic_to_lb_and_external_ips() {
    let c = Cluster::new();
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    c.dir.write(
        "etp.yaml",
        &docs(&[
            service(
                "etp",
                &[],
                "  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  externalTrafficPolicy: Local\n  \
                 externalIPs: [\"192.168.200.51\"]\n",
                &[("http", "TCP", 80, "8080", Some(30100)), ("dns", "UDP", 53, "5353", Some(30101))],
                "  loadBalancer:\n    ingress:\n    - {ip: 192.168.200.50}\n",
            ),
            slice(
                "etp-1",
                "etp",
                "IPv4",
                &[ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);
    for to in [sa("192.168.200.50:80"), sa("192.168.200.51:80")] {
        let node = hello(&c.node, to).await.unwrap_or_else(|e| panic!("{to} from the node: {e}"));
        assert_eq!(node, "b", "{to} from the node");
    }
    for to in [sa("192.168.200.50:53"), sa("192.168.200.51:53")] {
        assert_eq!(udp_ask(&udp_to(&c.node, None, to).await, "n").await, "b", "UDP {to} from the node");
    }
}

// --- endpoint selection -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let terminating = "ready: false, serving: true, terminating: true";
    c.dir.write(
        "term.yaml",
        &docs(&[
            service("all-term", &[], "  clusterIP: 10.96.0.60\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice(
                "all-term-1",
                "all-term",
                "IPv4",
                &[ep("10.244.1.10", "node-a", terminating, ""), ep("10.244.2.10", "node-b", terminating, "")],
                &[("http", "TCP", 8080)],
            ),
            service("mixed", &[], "  clusterIP: 10.96.0.61\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice(
                "mixed-1",
                "mixed",
                "IPv4",
                &[ready("10.244.2.10", "node-b"), ep("10.244.1.10", "node-a", terminating, "")],
                &[("http", "TCP", 8080)],
            ),
            // Terminating and not serving: never used; the Service has no usable endpoint.
            service("gone", &[], "  clusterIP: 10.96.0.62\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice(
                "gone-1",
                "gone",
                "IPv4",
                &[ep("10.244.1.10", "node-a", "ready: false, serving: false, terminating: true", "")],
                &[("http", "TCP", 8080)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);

    assert_eq!(names(&c.pod_a, sa("10.96.0.60:80"), 20).await, set(&["a", "b"]), "all terminating: fallback");
    assert_eq!(names(&c.pod_a, sa("10.96.0.61:80"), 20).await, set(&["b"]), "ready ones only");
    let err = c.pod_a.tcp_connect(sa("10.96.0.62:80")).expect_err("not serving: no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_hints_for_zones_and_nodes_against_the_node_zone() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let zone = |z: &str| format!("hints: {{forZones: [{{name: {z}}}]}}");
    let node = |n: &str| format!("hints: {{forNodes: [{{name: {n}}}]}}");
    let svc = |name: &str, ip: &str, eps: &[String]| {
        docs(&[
            service(name, &[], &format!("  clusterIP: {ip}\n"), &[("http", "TCP", 80, "8080", None)], ""),
            slice(&format!("{name}-1"), name, "IPv4", eps, &[("http", "TCP", 8080)]),
        ])
    };
    c.dir.write(
        "topo.yaml",
        &docs(&[
            // Hints name this node's zone (zone-a, node.yaml) for `a` only: only `a` is used.
            svc(
                "zones",
                "10.96.0.70",
                &[
                    ep("10.244.1.10", "node-a", "ready: true", &zone("zone-a")),
                    ep("10.244.2.10", "node-b", "ready: true", &zone("zone-b")),
                ],
            ),
            // One Ready endpoint without hints disables topology: all endpoints.
            svc(
                "partial",
                "10.96.0.71",
                &[
                    ep("10.244.1.10", "node-a", "ready: true", &zone("zone-a")),
                    ready("10.244.2.10", "node-b"),
                ],
            ),
            // No hint names this zone: topology is off, all endpoints.
            svc(
                "elsewhere",
                "10.96.0.72",
                &[
                    ep("10.244.1.10", "node-a", "ready: true", &zone("zone-b")),
                    ep("10.244.2.10", "node-b", "ready: true", &zone("zone-c")),
                ],
            ),
            // forNodes naming this node wins.
            svc(
                "nodes",
                "10.96.0.73",
                &[
                    ep("10.244.2.10", "node-b", "ready: true", &node("node-a")),
                    ep("10.244.1.10", "node-a", "ready: true", &node("node-b")),
                ],
            ),
        ]),
    );
    let _ferry = c.start(&[]);

    assert_eq!(names(&c.pod_a, sa("10.96.0.70:80"), 20).await, set(&["a"]), "forZones zone-a");
    assert_eq!(names(&c.node, sa("10.96.0.70:80"), 20).await, set(&["a"]), "forZones zone-a, from the node");
    assert_eq!(
        names(&c.pod_a, sa("10.96.0.71:80"), 20).await,
        set(&["a", "b"]),
        "one endpoint without hints"
    );
    assert_eq!(names(&c.pod_a, sa("10.96.0.72:80"), 20).await, set(&["a", "b"]), "no hint for zone-a");
    assert_eq!(names(&c.pod_a, sa("10.96.0.73:80"), 20).await, set(&["b"]), "forNodes node-a");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_ports_and_named_target_ports_resolved_per_slice() {
    let c = Cluster::new();
    // Pod a serves "http" on 8080, pod b on 8081: a named targetPort resolves per pod, and the
    // EndpointSlice controller writes the number under the Service port's name.
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a-http");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8081, "b-http");
    let _am = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 9090, "a-metrics");
    let _bm = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 9090, "b-metrics");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a-dns");
    c.dir.write(
        "multi.yaml",
        &docs(&[
            service(
                "multi",
                &[],
                "  type: NodePort\n  clusterIP: 10.96.0.80\n",
                &[
                    ("http", "TCP", 80, "http-alt", Some(30180)),
                    ("metrics", "TCP", 9100, "9090", None),
                    ("dns", "UDP", 53, "dns", None),
                ],
                "",
            ),
            slice(
                "multi-a",
                "multi",
                "IPv4",
                &[ready("10.244.1.10", "node-a")],
                &[("http", "TCP", 8080), ("metrics", "TCP", 9090), ("dns", "UDP", 5353)],
            ),
            slice(
                "multi-b",
                "multi",
                "IPv4",
                &[ready("10.244.2.10", "node-b")],
                &[("http", "TCP", 8081), ("metrics", "TCP", 9090)],
            ),
        ]),
    );
    let _ferry = c.start(&[]);

    assert_eq!(
        names(&c.pod_a, sa("10.96.0.80:80"), 20).await,
        set(&["a-http", "b-http"]),
        "named targetPort"
    );
    assert_eq!(
        names(&c.client, sa("192.168.100.1:30180"), 20).await,
        set(&["a-http", "b-http"]),
        "its NodePort"
    );
    assert_eq!(
        names(&c.pod_a, sa("10.96.0.80:9100"), 20).await,
        set(&["a-metrics", "b-metrics"]),
        "second port"
    );
    assert_eq!(udp_ask(&udp_to(&c.pod_b, None, sa("10.96.0.80:53")).await, "q").await, "a-dns", "UDP port");
    // Only declared ports are served.
    let err = c.pod_a.tcp_connect(sa("10.96.0.80:8080")).expect_err("undeclared port");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

// --- beyond kube-proxy ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn udp_flow_is_repicked_when_its_endpoint_goes_away() {
    let c = Cluster::new();
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    let _ub = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    let svc = service("dns", &[], "  clusterIP: 10.96.0.53\n", &[("dns", "UDP", 53, "5353", None)], "");
    let both = [ready("10.244.1.10", "node-a"), ready("10.244.2.10", "node-b")];
    c.dir.write(
        "dns.yaml",
        &docs(&[svc.clone(), slice("dns-1", "dns", "IPv4", &both, &[("dns", "UDP", 5353)])]),
    );
    let ferry = c.start(&[]);

    // One client socket = one flow; it sticks to its endpoint.
    let sock = udp_to(&c.pod_a, None, sa("10.96.0.53:53")).await;
    let first = udp_ask(&sock, "q0").await;
    for i in 1..5 {
        assert_eq!(udp_ask(&sock, &format!("q{i}")).await, first, "a flow keeps its endpoint");
    }

    let (remaining, ip) = if first == "a" { ("b", "10.244.2.10") } else { ("a", "10.244.1.10") };
    let node = if remaining == "a" { "node-a" } else { "node-b" };
    let v = version(&ferry);
    c.dir.write(
        "dns.yaml",
        &docs(&[svc, slice("dns-1", "dns", "IPv4", &[ready(ip, node)], &[("dns", "UDP", 5353)])]),
    );
    ferry.wait_version(v + 1);
    // The same socket (same flow) now reaches the remaining endpoint, no black hole.
    for i in 0..5 {
        assert_eq!(udp_ask(&sock, &format!("r{i}")).await, remaining, "the flow was re-picked");
    }
}

/// The PROXY v2 header a backend must see for a TCP connection from `src` to `dst` (written
/// out here from HAProxy's specification, independently of Ferry's encoder).
fn expected_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.extend_from_slice(&[0x11, 0, 12]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            h.extend_from_slice(&[0x21, 0, 36]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_v2_carries_the_real_client_address() {
    let c = Cluster::new();
    // Each backend records the header and the bytes right after it, then greets.
    let seen = Arc::new(Mutex::new(Vec::<(Vec<u8>, Vec<u8>)>::new()));
    let mut backends = Vec::new();
    for addr in [sa("10.244.1.10:8080"), sa("[fd00:244:1::10]:8080")] {
        let listener = c.pod_a.tcp_listener(addr);
        let sink = seen.clone();
        backends.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut h = vec![0u8; 16];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
                    h.resize(16 + len, 0);
                    let mut data = [0u8; 3];
                    if s.read_exact(&mut h[16..]).await.is_ok() && s.read_exact(&mut data).await.is_ok() {
                        sink.lock().expect("lock").push((h, data.to_vec()));
                        let _ = s.write_all(b"pp\n").await;
                    }
                });
            }
        }));
    }
    let pp = [("ferry.ethercluster.io/proxy-protocol", "v2")];
    c.dir.write(
        "pp.yaml",
        &docs(&[
            service(
                "pp",
                &pp,
                "  type: NodePort\n  clusterIP: 10.96.0.90\n",
                &[("http", "TCP", 80, "8080", Some(30190))],
                "",
            ),
            slice("pp-1", "pp", "IPv4", &[ready("10.244.1.10", "node-a")], &[("http", "TCP", 8080)]),
            service(
                "pp6",
                &pp,
                "  type: NodePort\n  ipFamilies: [IPv6]\n  clusterIP: fd00:96::90\n  clusterIPs: [\"fd00:96::90\"]\n",
                &[("http", "TCP", 80, "8080", Some(30191))],
                "",
            ),
            slice("pp6-1", "pp6", "IPv6", &[ready("fd00:244:1::10", "node-a")], &[("http", "TCP", 8080)]),
        ]),
    );
    let _ferry = c.start(&[]);

    for (ns, to) in [
        (&c.pod_a, sa("10.96.0.90:80")),
        (&c.pod_b, sa("10.96.0.90:80")),
        (&c.client, sa("192.168.100.1:30190")),
        (&c.pod_a, sa("[fd00:96::90]:80")),
        (&c.client, sa("[fd00:100::1]:30191")),
    ] {
        let mut s = ns.tcp_connect(to).unwrap_or_else(|e| panic!("{to} from {}: {e}", ns.name));
        let local = s.local_addr().expect("local addr");
        s.write_all(b"hi\n").await.expect("write");
        assert_eq!(read_greeting(&mut s).await.expect("backend answered after the header"), "pp");
        let (h, data) = seen.lock().expect("lock").pop().expect("a header");
        assert_eq!(h, expected_v2(local, to), "PROXY v2 header for {to} from {} ({local})", ns.name);
        assert_eq!(data, b"hi\n", "the client's bytes follow the header");
    }
    for b in backends {
        b.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn maglev_keeps_each_client_on_its_endpoint_when_another_goes_away() {
    let c = Cluster::new();
    c.pod_b.ip(&["addr", "add", "10.244.2.11/24", "dev", "eth0"]);
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let _c = Cluster::tcp_backend(&c.pod_b, "10.244.2.11", 8080, "c");
    let all =
        [("a", "10.244.1.10", "node-a"), ("b", "10.244.2.10", "node-b"), ("c", "10.244.2.11", "node-b")];
    let write = |keep: &[(&str, &str, &str)]| {
        let eps: Vec<String> = keep.iter().map(|(_, ip, node)| ready(ip, node)).collect();
        c.dir.write(
            "mg.yaml",
            &docs(&[
                service(
                    "mg",
                    &[("ferry.ethercluster.io/balancing", "Maglev")],
                    "  clusterIP: 10.96.0.100\n",
                    &[("http", "TCP", 80, "8080", None)],
                    "",
                ),
                slice("mg-1", "mg", "IPv4", &eps, &[("http", "TCP", 8080)]),
            ]),
        );
    };
    write(&all);
    let ferry = c.start(&[]);

    let to = sa("10.96.0.100:80");
    let pod = names(&c.pod_a, to, 20).await;
    let node = names(&c.node, to, 20).await;
    assert_eq!(pod.len(), 1, "Maglev: one endpoint per client: {pod:?}");
    assert_eq!(node.len(), 1, "Maglev: one endpoint per client: {node:?}");

    let used: Vec<&String> = pod.iter().chain(&node).collect();
    let victim = all.iter().find(|(n, _, _)| !used.iter().any(|u| u == n)).expect("an unused endpoint");
    let keep: Vec<_> = all.iter().copied().filter(|e| e.0 != victim.0).collect();
    let v = version(&ferry);
    write(&keep);
    ferry.wait_version(v + 1);
    assert_eq!(names(&c.pod_a, to, 20).await, pod, "removing {} moved the pod", victim.0);
    assert_eq!(names(&c.node, to, 20).await, node, "removing {} moved the node", victim.0);
}

// --- lifecycle and metrics ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn restart_adopts_the_vip_device_without_a_gap() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    c.dir.write(
        "web.yaml",
        &docs(&[
            service("web", &[], "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice("web-1", "web", "IPv4", &[ready("10.244.1.10", "node-a")], &[("http", "TCP", 8080)]),
        ]),
    );
    let mut first = c.start(&[]);
    let mut conn = c.pod_a.tcp_connect(sa("10.96.0.10:80")).expect("connect");
    assert_eq!(read_greeting(&mut conn).await.expect("greeting"), "a");

    // Watch every address deletion in the node namespace from before the stop until after the
    // second start. A marker address proves the monitor is listening before we go on.
    let mut monitor = c
        .node
        .command("ip")
        .args(["monitor", "address"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ip monitor");
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = events.clone();
    let stdout = monitor.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().expect("lock").push(line);
        }
    });
    // (The monitor subscribes asynchronously: add new markers until one is reported.)
    let (seen, mut marker) = (&events, 0u8);
    eventually("ip monitor saw a marker", || {
        marker += 1;
        c.node.ip(&["addr", "add", &format!("10.255.255.{marker}/32"), "dev", "lo"]);
        async move { seen.lock().expect("lock").iter().any(|l| l.contains("10.255.255.")).then_some(()) }
    })
    .await;

    first.signal(libc::SIGTERM);
    // Established connections drain: this one still works after the stop signal, then ends.
    conn.write_all(b"ping\n").await.expect("write during drain");
    let mut echo = [0u8; 5];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut echo)).await.expect("echo in time").expect("echo");
    assert_eq!(&echo, b"ping\n");
    drop(conn);
    assert_eq!(first.wait_exit(DEADLINE), Some(0), "clean exit on SIGTERM");
    assert!(vip_addresses(&c.node).contains("10.96.0.10/32"), "the VIP stays after the exit");

    let second = c.start(&[]);
    assert_eq!(hello(&c.pod_a, sa("10.96.0.10:80")).await.expect("served by the second process"), "a");
    let synced = second
        .wait_log(DEADLINE, |l| msg(l) == "VIP device synced")
        .expect("the second process synced the device");
    let stats = synced.to_string();
    assert!(stats.contains("added: 0") && stats.contains("removed: 0"), "adopted as is: {stats}");

    let _ = monitor.kill();
    let _ = monitor.wait();
    let events = events.lock().expect("lock");
    let deleted: Vec<&String> =
        events.iter().filter(|l| l.starts_with("Deleted") && l.contains("10.96.0.10")).collect();
    assert!(deleted.is_empty(), "the VIP disappeared during the restart: {deleted:?}");
}

/// Inodes of the TCP sockets listening on `addr` (IPv4) in `ns`, from `/proc/net/tcp`.
fn listening_inodes(ns: &Netns, addr: SocketAddr) -> std::collections::BTreeSet<String> {
    let IpAddr::V4(ip) = addr.ip() else { panic!("IPv4 only") };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), addr.port());
    let out = ns.command("cat").arg("/proc/net/tcp").output().expect("cat /proc/net/tcp");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| f[9].to_owned())
        .collect()
}

/// Connections to `to` from namespace `ns`, one after another on a thread, until `stop` (bounded
/// in time and count): successes counted, failures kept.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    served: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(ns: &Netns, to: SocketAddr) -> Self {
        use std::{
            io::BufRead as _,
            sync::atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let (stop, served, failures) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (name, flag, count, failed) = (ns.name.clone(), stop.clone(), served.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..200_000u64 {
                if flag.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(120) {
                    return;
                }
                let greeting =
                    crate::netns::enter(&name, || std::net::TcpStream::connect_timeout(&to, DEADLINE))
                        .and_then(|s| {
                            s.set_read_timeout(Some(DEADLINE))?;
                            let mut line = String::new();
                            std::io::BufReader::new(s).read_line(&mut line)?;
                            Ok(line)
                        });
                let failure = match greeting {
                    Ok(line) if line == "a\n" => {
                        count.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(line) => format!("connection {i}: greeting {line:?}"),
                    Err(e) => format!("connection {i}: {e}"),
                };
                failed.lock().expect("lock").push(failure);
            }
        });
        Self { stop, served, failures, thread }
    }

    fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more connections than now were served.
    fn wait_more(&self, n: u64, what: &str) {
        let (from, start) = (self.served(), Instant::now());
        while self.served() < from + n {
            assert!(start.elapsed() < DEADLINE, "{what}: only {} connections served", self.served() - from);
            assert!(!self.thread.is_finished(), "{what}: the load stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the load; returns (served, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("load thread");
        let failures = std::mem::take(&mut *self.failures.lock().expect("lock"));
        (self.served.load(std::sync::atomic::Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_with_a_handoff_socket_refuses_no_connection() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _ua = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    c.dir.write(
        "web.yaml",
        &docs(&[
            service(
                "web",
                &[],
                "  clusterIP: 10.96.0.10\n",
                &[("http", "TCP", 80, "8080", None), ("dns", "UDP", 53, "5353", None)],
                "",
            ),
            slice(
                "web-1",
                "web",
                "IPv4",
                &[ready("10.244.1.10", "node-a")],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ]),
    );
    let run = ConfigDir::new();
    let socket = run.path().join("handoff.sock");
    let handoff = ["--handoff-socket", socket.to_str().expect("utf-8 path")];
    let mut old = c.start(&handoff);
    let vip = sa("10.96.0.10:80");
    let mut conn = c.pod_a.tcp_connect(vip).expect("connect");
    assert_eq!(read_greeting(&mut conn).await.expect("greeting"), "a");
    let healthz = || c.client.enter(|| http_get(sa("192.168.100.1:10256"), "/healthz")).0;
    assert_eq!(healthz(), 200);

    // The VIP's listening sockets (one per data-plane thread), by inode.
    let sockets = listening_inodes(&c.node, vip);
    assert_eq!(sockets.len(), 2, "one socket per --worker-threads");

    // Connections arrive all the time while a second process starts and takes over.
    let load = Load::start(&c.pod_a, vip);
    load.wait_more(20, "before the restart");
    let new = c.start(&handoff);
    let took = new
        .wait_log(DEADLINE, |l| msg(l) == "taking over from the running process")
        .expect("the new process found the old one");
    assert!(took["sockets"].as_u64().unwrap_or(0) >= 3, "VIP TCP, VIP UDP and healthz at least: {took}");
    new.wait_log(DEADLINE, |l| msg(l) == "takeover complete: the predecessor stops accepting")
        .expect("the old process confirmed it stopped");
    // Both synced the VIP device while they overlapped: the new one re-reads it once alone.
    let reread = new
        .wait_log(DEADLINE, |l| msg(l) == "VIP device re-read after the takeover")
        .expect("the new process re-read the device");
    assert!(reread.to_string().contains("removed: 0"), "nothing to repair here: {reread}");
    old.wait_log(DEADLINE, |l| msg(l).starts_with("handed over to a successor"))
        .expect("the old process drains after the handoff");
    load.wait_more(50, "after the handoff");

    // The old process's connection keeps working through the drain.
    conn.write_all(b"ping\n").await.expect("write after the handoff");
    let mut echo = [0u8; 5];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut echo)).await.expect("echo in time").expect("echo");
    assert_eq!(&echo, b"ping\n");
    drop(conn);
    // Drained, it waits for its pod's SIGTERM instead of exiting (a restarted container would
    // take the sockets back).
    old.wait_log(DEADLINE, |l| msg(l) == "drained after the handoff; waiting for SIGTERM to exit")
        .expect("the old process drained");
    assert_eq!(old.wait_exit(Duration::from_millis(200)), None, "still running until SIGTERM");
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit(DEADLINE), Some(0), "clean exit on SIGTERM");
    load.wait_more(50, "after the old process exited");

    let (served, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} connections failed: {failures:?}", failures.len(), served);
    // Not a second bind beside the first: the same kernel sockets, with their accept queues.
    assert_eq!(listening_inodes(&c.node, vip), sockets, "the new process serves the old one's sockets");
    assert_eq!(healthz(), 200, "healthz is served by the new process");
    assert_eq!(udp_ask(&udp_to(&c.pod_a, None, sa("10.96.0.10:53")).await, "q").await, "a");
    assert_eq!(hello(&c.pod_a, vip).await.expect("served by the new process"), "a");
    assert!(
        new.wait_log(Duration::from_millis(20), |l| msg(l) == "bind failed; will retry").is_none(),
        "no bind failures"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_proxy_sync_metrics_with_kube_proxy_buckets() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    c.dir.write(
        "web.yaml",
        &docs(&[
            service("web", &[], "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, "8080", None)], ""),
            slice("web-1", "web", "IPv4", &[ready("10.244.1.10", "node-a")], &[("http", "TCP", 8080)]),
        ]),
    );
    let ferry = c.start(&[]);
    assert_eq!(hello(&c.pod_a, sa("10.96.0.10:80")).await.expect("served"), "a");

    let (status, body) = ferry.get("/metrics");
    assert_eq!(status, 200);
    // ExponentialBuckets(0.001, 2, 15), as kube-proxy registers them.
    let mut les: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            le.parse::<f64>().ok()
        })
        .filter(|le| le.is_finite())
        .collect();
    les.sort_by(f64::total_cmp);
    les.dedup();
    let want: Vec<f64> = (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect();
    assert_eq!(les.len(), want.len(), "buckets {les:?}\n{body}");
    for (got, want) in les.iter().zip(&want) {
        assert!((got - want).abs() < 1e-9, "bucket {got} != {want}");
    }
    assert!(ferry.metric("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]) >= 1.0, "{body}");
    let last = body
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some("kubeproxy_sync_proxy_rules_last_timestamp_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!(last > 0.0, "last sync timestamp: {last}\n{body}");
    assert!(last <= now + 1.0 && last > now - 3600.0, "last sync timestamp {last} is not a recent Unix time");
}
