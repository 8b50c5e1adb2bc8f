//! `ferry node` on a real node network: namespaces for the node, pods on this node and on
//! another node, and an external client. Every behaviour is exercised from where a user would
//! see it (a pod, the node itself, an outside client).
//!
//! ```text
//!  client 192.168.100.2 ── 192.168.100.1 [node: ferry node, VIP device ferry0] 10.244.1.1 ── pod-a 10.244.1.10 (node-a)
//!  fd00:100::2              fd00:100::1                                       10.244.2.1 ── pod-b 10.244.2.10 (node-b)
//! ```
//! `pod-b` is routed through this node's namespace but its EndpointSlice entry says `nodeName:
//! node-b`: what matters to the proxy is the endpoint's node, not the wire.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use crate::{
    harness::*,
    netns::{Netns, veth},
};

pub const NODE: &str = "node-a";

/// The network and a config directory for one test.
pub struct Cluster {
    pub node: Netns,
    pub client: Netns,
    pub pod_a: Netns,
    pub pod_b: Netns,
    pub dir: ConfigDir,
}

impl Cluster {
    pub fn new() -> Self {
        let node = Netns::new("node");
        let client = Netns::new("client");
        let pod_a = Netns::new("poda");
        let pod_b = Netns::new("podb");
        veth(&client, "eth0", "192.168.100.2/24", &node, "eth-client", "192.168.100.1/24");
        client.ip(&["-6", "addr", "add", "fd00:100::2/64", "dev", "eth0", "nodad"]);
        node.ip(&["-6", "addr", "add", "fd00:100::1/64", "dev", "eth-client", "nodad"]);
        veth(&pod_a, "eth0", "10.244.1.10/24", &node, "veth-a", "10.244.1.1/24");
        pod_a.ip(&["-6", "addr", "add", "fd00:244:1::10/64", "dev", "eth0", "nodad"]);
        node.ip(&["-6", "addr", "add", "fd00:244:1::1/64", "dev", "veth-a", "nodad"]);
        veth(&pod_b, "eth0", "10.244.2.10/24", &node, "veth-b", "10.244.2.1/24");
        for (ns, gw, gw6) in [
            (&client, "192.168.100.1", "fd00:100::1"),
            (&pod_a, "10.244.1.1", "fd00:244:1::1"),
            (&pod_b, "10.244.2.1", ""),
        ] {
            ns.ip(&["route", "add", "default", "via", gw]);
            if !gw6.is_empty() {
                ns.ip(&["-6", "route", "add", "default", "via", gw6]);
            }
        }
        node.sysctl("net.ipv4.ip_forward", "1");
        let dir = ConfigDir::new();
        dir.write("node.yaml", &node_yaml());
        Self { node, client, pod_a, pod_b, dir }
    }

    /// Starts `ferry node --config DIR` in the node namespace and waits until it serves.
    pub fn start(&self, extra: &[&str]) -> Ferry {
        let dir = self.dir.path().to_str().expect("utf-8 path");
        let ferry = self.spawn(&["--config", dir], extra);
        ferry
            .wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving")
            .expect("ferry node never served");
        ferry
    }

    /// Starts `ferry node` with `source` (`--config DIR` or `--kubeconfig FILE`) in the node
    /// namespace; returns once its admin server listens.
    pub fn spawn(&self, source: &[&str], extra: &[&str]) -> Ferry {
        spawn_node(&self.node, source, extra)
    }

    /// A TCP backend named `name` on `port` in `pod`.
    pub fn tcp_backend(pod: &Netns, ip: &str, port: u16, name: &'static str) -> TcpBackend {
        TcpBackend::serve(pod.tcp_listener(SocketAddr::new(ip.parse().expect("ip"), port)), name)
    }
}

/// Starts `ferry node` with `source` (`--config DIR` or `--kubeconfig FILE`) in `ns`, with the
/// flags of this test network; returns once its admin server listens.
pub fn spawn_node(ns: &Netns, source: &[&str], extra: &[&str]) -> Ferry {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_ferry"));
    cmd.arg("node").args(source).args([
        "--node-name",
        NODE,
        "--nodeport-addresses",
        "192.168.100.0/24,fd00:100::/64",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:244::/48",
        "--vip-device",
        "ferry0",
        "--admin-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--healthz-bind-address",
        "0.0.0.0:10256",
        "--log-format",
        "json",
        "--log-level",
        "info,ferry=debug",
        "--reload-debounce",
        "50ms",
        "--drain-timeout",
        "2s",
    ]);
    cmd.args(extra);
    Ferry::spawn_command(cmd, Some(&ns.name))
}

pub fn node_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  labels:\n    topology.kubernetes.io/zone: zone-a\n\
         status:\n  addresses:\n  - {{type: InternalIP, address: 192.168.100.1}}\n"
    )
}

/// A Service with free-form metadata/spec/status additions; `ports` are
/// `(name, protocol, port, targetPort, nodePort)`, `targetPort` verbatim (a number or a name).
pub fn service(
    name: &str,
    annotations: &[(&str, &str)],
    spec_extra: &str,
    ports: &[(&str, &str, u16, &str, Option<u16>)],
    status: &str,
) -> String {
    let mut y = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n");
    if !annotations.is_empty() {
        y.push_str("  annotations:\n");
        for (k, v) in annotations {
            y.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    y.push_str(&format!("spec:\n{spec_extra}  ports:\n"));
    for (pname, proto, port, target, node_port) in ports {
        y.push_str(&format!("  - {{name: {pname}, protocol: {proto}, port: {port}, targetPort: {target}"));
        if let Some(np) = node_port {
            y.push_str(&format!(", nodePort: {np}"));
        }
        y.push_str("}\n");
    }
    if !status.is_empty() {
        y.push_str(&format!("status:\n{status}"));
    }
    y
}

/// One EndpointSlice endpoint: `conditions` and `extra` are flow-mapping fragments.
pub fn ep(ip: &str, node: &str, conditions: &str, extra: &str) -> String {
    let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
    format!("{{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{{conditions}}}{extra}}}")
}

/// A Ready endpoint.
pub fn ready(ip: &str, node: &str) -> String {
    ep(ip, node, "ready: true", "")
}

/// An EndpointSlice with endpoints from [`ep`]; `ports` are `(name, protocol, port)`.
pub fn slice(
    name: &str,
    service: &str,
    family: &str,
    endpoints: &[String],
    ports: &[(&str, &str, u16)],
) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nendpoints:\n"
    );
    for e in endpoints {
        y.push_str(&format!("- {e}\n"));
    }
    y.push_str("ports:\n");
    for (pname, proto, port) in ports {
        y.push_str(&format!("- {{name: {pname}, protocol: {proto}, port: {port}}}\n"));
    }
    y
}

pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// The common case of [`service`]: no annotations or status, numeric target ports.
pub fn service_yaml(name: &str, spec_extra: &str, ports: &[(&str, &str, u16, u16, Option<u16>)]) -> String {
    let targets: Vec<String> = ports.iter().map(|p| p.3.to_string()).collect();
    let ports: Vec<_> = ports.iter().zip(&targets).map(|(p, t)| (p.0, p.1, p.2, t.as_str(), p.4)).collect();
    service(name, &[], spec_extra, &ports, "")
}

/// The common case of [`slice`]: endpoints as `(ip, node, ready)`.
pub fn slice_yaml(
    name: &str,
    service: &str,
    family: &str,
    endpoints: &[(&str, &str, bool)],
    ports: &[(&str, &str, u16)],
) -> String {
    let endpoints: Vec<String> =
        endpoints.iter().map(|(ip, node, r)| ep(ip, node, &format!("ready: {r}"), "")).collect();
    slice(name, service, family, &endpoints, ports)
}

pub async fn hello(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    read_greeting(&mut ns.tcp_connect(to)?).await
}

pub async fn names(ns: &Netns, to: SocketAddr, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for i in 0..n {
        seen.insert(
            hello(ns, to).await.unwrap_or_else(|e| panic!("connection {i} to {to} from {}: {e}", ns.name)),
        );
    }
    seen
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

pub fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_ip_node_port_and_vip_device_from_pod_node_and_outside() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    c.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service_yaml(
                "web",
                "  type: NodePort\n  clusterIP: 10.96.0.10\n",
                &[("http", "TCP", 80, 8080, Some(30080))]
            ),
            slice_yaml(
                "web-1",
                "web",
                "IPv4",
                &[("10.244.1.10", "node-a", true), ("10.244.2.10", "node-b", true)],
                &[("http", "TCP", 8080)]
            )
        ),
    );
    let ferry = c.start(&[]);

    // The VIP is on the dedicated device, and the node does not answer ARP for it elsewhere.
    let out = c.node.command("ip").args(["-o", "addr", "show", "dev", "ferry0"]).output().expect("ip addr");
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.96.0.10/32"), "{out:?}");
    assert_eq!(c.node.read_sysctl("net.ipv4.conf.all.arp_ignore"), "1");

    assert_eq!(names(&c.pod_a, sa("10.96.0.10:80"), 20).await, set(&["a", "b"]), "ClusterIP from a pod");
    assert_eq!(names(&c.node, sa("10.96.0.10:80"), 20).await, set(&["a", "b"]), "ClusterIP from the node");
    assert_eq!(
        names(&c.client, sa("192.168.100.1:30080"), 20).await,
        set(&["a", "b"]),
        "NodePort from outside"
    );

    let snap = ferry.snapshot();
    assert!(snap.to_string().contains("10.96.0.10"), "{snap}");
}

/// Bulk data through a ClusterIP, both ways at once, then a half-close: a Service splices it by
/// default and copies it with `ferry.ethercluster.io/zero-copy: "false"`; either way every byte
/// arrives in order and the reply direction stays open after the client's FIN.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_transfers_through_a_cluster_ip_arrive_intact_spliced_or_copied() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let c = Cluster::new();
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let slice = |name: &str, svc: &str| {
        slice_yaml(name, svc, "IPv4", &[("10.244.2.10", "node-b", true)], &[("http", "TCP", 8080)])
    };
    let port = [("http", "TCP", 80, "8080", None)];
    c.dir.write(
        "bulk.yaml",
        &docs(&[
            service("spliced", &[], "  clusterIP: 10.96.0.30\n", &port, ""),
            slice("spliced-1", "spliced"),
            service(
                "copied",
                &[("ferry.ethercluster.io/zero-copy", "false")],
                "  clusterIP: 10.96.0.31\n",
                &port,
                "",
            ),
            slice("copied-1", "copied"),
        ]),
    );
    let _ferry = c.start(&[]);

    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for vip in ["10.96.0.30:80", "10.96.0.31:80"] {
        let mut s = c.pod_a.tcp_connect(sa(vip)).expect("connect from a pod");
        assert_eq!(read_greeting(&mut s).await.expect("greeting"), "b");
        let (mut r, mut w) = s.into_split();
        let send = async {
            w.write_all(&payload).await.expect("write");
            w.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut echoed = Vec::with_capacity(payload.len() + 4);
            r.read_to_end(&mut echoed).await.expect("read to EOF");
            echoed
        };
        let ((), echoed) = tokio::time::timeout(DEADLINE, async { tokio::join!(send, receive) })
            .await
            .unwrap_or_else(|_| panic!("{vip}: transfer did not finish in time"));
        assert_eq!(echoed.len(), payload.len() + 4, "{vip}: echo + bye");
        assert!(echoed[..payload.len()] == payload[..], "{vip}: echoed bytes differ");
        assert_eq!(&echoed[payload.len()..], b"bye\n", "{vip}: the reply after the client's FIN");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_ip_over_udp_reaches_pods() {
    let c = Cluster::new();
    let _a = UdpBackend::serve(c.pod_a.udp_socket(sa("10.244.1.10:5353")), "a");
    let _b = UdpBackend::serve(c.pod_b.udp_socket(sa("10.244.2.10:5353")), "b");
    c.dir.write(
        "dns.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("dns", "  clusterIP: 10.96.0.53\n", &[("dns", "UDP", 53, 5353, None)]),
            slice_yaml(
                "dns-1",
                "dns",
                "IPv4",
                &[("10.244.1.10", "node-a", true), ("10.244.2.10", "node-b", true)],
                &[("dns", "UDP", 5353)]
            )
        ),
    );
    let _ferry = c.start(&[]);

    let mut seen = HashSet::new();
    for i in 0..10 {
        let sock = c.pod_a.udp_socket(sa("0.0.0.0:0"));
        let mut buf = vec![0u8; 1500];
        let mut got = None;
        for _ in 0..5 {
            sock.send_to(format!("q{i}").as_bytes(), sa("10.96.0.53:53")).await.expect("send");
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await
            {
                got = Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
                break;
            }
        }
        let (reply, from) = got.expect("UDP reply through the ClusterIP");
        assert_eq!(from, sa("10.96.0.53:53"), "replies come from the ClusterIP");
        let (name, q) = reply.split_once(':').expect("name:payload");
        assert_eq!(q, format!("q{i}"));
        seen.insert(name.to_owned());
    }
    assert_eq!(seen, set(&["a", "b"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_serves_outside_clients_from_local_endpoints_only() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    c.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service_yaml(
                "web",
                "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n",
                &[("http", "TCP", 80, 8080, Some(30080))]
            ),
            slice_yaml(
                "web-1",
                "web",
                "IPv4",
                &[("10.244.1.10", "node-a", true), ("10.244.2.10", "node-b", true)],
                &[("http", "TCP", 8080)]
            )
        ),
    );
    let _ferry = c.start(&[]);

    assert_eq!(
        names(&c.client, sa("192.168.100.1:30080"), 12).await,
        set(&["a"]),
        "outside: local endpoints only"
    );
    // Pod-originated traffic to the NodePort is short-circuited to every endpoint, as kube-proxy does.
    assert_eq!(
        names(&c.pod_b, sa("192.168.100.1:30080"), 20).await,
        set(&["a", "b"]),
        "from a pod: all endpoints"
    );
    assert_eq!(
        names(&c.pod_a, sa("10.96.0.10:80"), 20).await,
        set(&["a", "b"]),
        "ClusterIP is unaffected by eTP"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_without_endpoints_refuses_at_once_and_serves_when_one_appears() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    c.dir.write(
        "web.yaml",
        &service_yaml("web", "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, 8080, None)]),
    );
    let ferry = c.start(&[]);
    let version = ferry.snapshot()["version"].as_u64().expect("version");

    let start = std::time::Instant::now();
    let err = c.pod_a.tcp_connect(sa("10.96.0.10:80")).expect_err("no endpoints: refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(start.elapsed() < Duration::from_secs(1));

    c.dir.write(
        "slice.yaml",
        &slice_yaml("web-1", "web", "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)]),
    );
    ferry.wait_version(version + 1);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        match hello(&c.pod_a, sa("10.96.0.10:80")).await {
            Ok(name) => {
                assert_eq!(name, "a");
                break;
            }
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never served after the endpoint appeared: {e}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_cluster_ip_and_node_port() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "fd00:244:1::10", 8080, "a6");
    c.dir.write(
        "web6.yaml",
        &format!(
            "{}---\n{}",
            service_yaml(
                "web6",
                "  type: NodePort\n  ipFamilies: [IPv6]\n  clusterIP: fd00:96::10\n  clusterIPs: [\"fd00:96::10\"]\n",
                &[("http", "TCP", 80, 8080, Some(30081))]
            ),
            slice_yaml("web6-1", "web6", "IPv6", &[("fd00:244:1::10", "node-a", true)], &[("http", "TCP", 8080)])
        ),
    );
    let _ferry = c.start(&[]);
    assert_eq!(hello(&c.pod_a, sa("[fd00:96::10]:80")).await.expect("v6 ClusterIP"), "a6");
    assert_eq!(hello(&c.client, sa("[fd00:100::1]:30081")).await.expect("v6 NodePort"), "a6");
}

/// LoadBalancer Service `lb` (ClusterIP 10.96.0.20, NodePort 30090, `externalTrafficPolicy: Local`,
/// healthCheckNodePort 32000) with `endpoints` (ip, node, ready) on port 8080.
fn health_checked_lb_yaml(endpoints: &[(&str, &str, bool)]) -> String {
    format!(
        "{}---\n{}",
        service_yaml(
            "lb",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            &[("http", "TCP", 80, 8080, Some(30090))]
        ),
        slice_yaml("lb-1", "lb", "IPv4", endpoints, &[("http", "TCP", 8080)])
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn health_check_node_port_and_proxy_healthz_answer_like_kube_proxy() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    c.dir.write(
        "lb.yaml",
        &health_checked_lb_yaml(&[("10.244.1.10", "node-a", true), ("10.244.2.10", "node-b", true)]),
    );
    let _ferry = c.start(&[]);

    let (status, body) = c.client.enter(|| http_get(sa("192.168.100.1:32000"), "/"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "lb");
    assert_eq!(v["localEndpoints"], 1);

    let (status, body) = c.client.enter(|| http_get(sa("192.168.100.1:10256"), "/healthz"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["nodeEligible"], true, "{body}");
    let (status, _) = c.client.enter(|| http_get(sa("192.168.100.1:10256"), "/livez"));
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_health_check_node_port_held_by_another_process_is_retried_until_free() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    c.dir.write("lb.yaml", &health_checked_lb_yaml(&[("10.244.1.10", "node-a", true)]));
    // Another process holds the port (a predecessor that opened it after a handoff, say).
    let holder = c.node.tcp_listener(sa("0.0.0.0:32000"));
    let ferry = c.start(&[]);
    ferry
        .wait_log(DEADLINE, |l| msg(l) == "failed to start healthcheck")
        .expect("the bind failure is logged");
    drop(holder);

    // Retried without any change to the configuration.
    let start = std::time::Instant::now();
    while c.client.enter(|| std::net::TcpStream::connect(sa("192.168.100.1:32000"))).is_err() {
        assert!(start.elapsed() < DEADLINE, "the health check port was never bound");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = c.client.enter(|| http_get(sa("192.168.100.1:32000"), "/"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["localEndpoints"], 1, "{body}");
}

#[test]
fn cleanup_removes_the_vip_device() {
    let node = Netns::new("cleanup");
    node.ip(&["link", "add", "ferry0", "type", "bridge"]);
    // What a previous `ferry node` left for source-IP preservation.
    node.ip(&["rule", "add", "fwmark", "0xf3", "lookup", "243"]);
    let nft = node.command("nft").args(["add", "table", "inet", "ferry"]).status().expect("nft");
    assert!(nft.success());
    let out = node
        .command(env!("CARGO_BIN_EXE_ferry"))
        .args(["node", "--cleanup", "--vip-device", "ferry0"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = node.command("ip").args(["link", "show", "ferry0"]).output().expect("ip link");
    assert!(!link.status.success(), "ferry0 still exists");
    let rules = node.command("ip").args(["rule", "show"]).output().expect("ip rule");
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("lookup 243"), "policy rule left behind");
    let tables = node.command("nft").args(["list", "tables"]).output().expect("nft");
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("ferry"), "nft table left behind");
}

/// Answers each connection with the client address it sees, then closes.
fn peer_echo(pod: &Netns, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = pod.tcp_listener(addr);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else { return };
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes()).await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_preserves_the_client_address_for_local_endpoints() {
    let c = Cluster::new();
    let backend = peer_echo(&c.pod_a, sa("10.244.1.10:8080"));
    let nft_tables = || {
        let out = c.node.command("nft").args(["list", "tables"]).output().expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // No Service needs the reply path yet: the node's packets pay nothing for it.
    c.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("web", "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, 8080, None)]),
            slice_yaml("web-1", "web", "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)])
        ),
    );
    let ferry = c.start(&[]);
    assert!(!nft_tables().contains("ferry"), "reply path installed with no Service needing it");
    let version = ferry.snapshot()["version"].as_u64().expect("version");

    c.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service_yaml(
                "web",
                "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n",
                &[("http", "TCP", 80, 8080, Some(30080))]
            ),
            slice_yaml("web-1", "web", "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)])
        ),
    );
    ferry
        .wait_log(DEADLINE, |l| msg(l) == "synced" && l["version"].as_u64() == Some(version + 1))
        .expect("the NodePort Service was never synced");
    assert!(nft_tables().contains("table inet ferry"), "reply path not installed");

    // Outside client: the pod sees the client's own address (no SNAT), as with kube-proxy.
    assert_eq!(
        hello(&c.client, sa("192.168.100.1:30080")).await.expect("through the NodePort"),
        "192.168.100.2"
    );
    // In-cluster traffic is short-circuited and comes from the node, as kube-proxy masquerades it.
    let from_pod = hello(&c.pod_a, sa("10.96.0.10:80")).await.expect("through the ClusterIP");
    assert_eq!(from_pod, "10.244.1.1", "the node's address on the pod's link");
    backend.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn network_programming_latency_is_measured_from_the_slice_trigger_time() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    c.dir.write(
        "web.yaml",
        &service_yaml("web", "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, 8080, None)]),
    );
    c.dir.write(
        "slice.yaml",
        &slice_yaml("web-1", "web", "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)]),
    );
    let ferry = c.start(&[]);
    let version = ferry.snapshot()["version"].as_u64().expect("version");

    // The EndpointSlice controller stamps the change 2 s before ferry sees it.
    let stamp = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 2).expect("timestamp");
    let slice = slice_yaml(
        "web-1",
        "web",
        "IPv4",
        &[("10.244.1.10", "node-a", true), ("10.244.2.10", "node-b", true)],
        &[("http", "TCP", 8080)],
    )
    .replace(
        "  labels: {kubernetes.io/service-name: web}\n",
        &format!(
            "  labels: {{kubernetes.io/service-name: web}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{stamp}\"}}\n"
        ),
    );
    c.dir.write("slice.yaml", &slice);
    ferry.wait_version(version + 1);
    assert_eq!(names(&c.pod_a, sa("10.96.0.10:80"), 12).await, set(&["a", "b"]));

    let count = ferry.metric("kubeproxy_network_programming_duration_seconds_count", &[]);
    let sum = ferry.metric("kubeproxy_network_programming_duration_seconds_sum", &[]);
    assert!(count >= 1.0, "no network programming latency recorded");
    assert!((2.0..30.0).contains(&sum), "latency {sum}s should be about 2 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_service_serves_its_node_port_on_both_families() {
    let c = Cluster::new();
    let _a4 = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a4");
    let _a6 = Cluster::tcp_backend(&c.pod_a, "fd00:244:1::10", 8080, "a6");
    c.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service_yaml(
                "web",
                "  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
                 clusterIP: 10.96.0.10\n  clusterIPs: [\"10.96.0.10\", \"fd00:96::10\"]\n",
                &[("http", "TCP", 80, 8080, Some(30082))]
            ),
            slice_yaml("web-v4", "web", "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)]),
            slice_yaml(
                "web-v6",
                "web",
                "IPv6",
                &[("fd00:244:1::10", "node-a", true)],
                &[("http", "TCP", 8080)]
            )
        ),
    );
    let _ferry = c.start(&[]);
    // Each family's node address reaches that family's endpoints, as kube-proxy's per-family proxiers.
    assert_eq!(hello(&c.client, sa("192.168.100.1:30082")).await.expect("IPv4 NodePort"), "a4");
    assert_eq!(hello(&c.client, sa("[fd00:100::1]:30082")).await.expect("IPv6 NodePort"), "a6");
    assert_eq!(hello(&c.pod_a, sa("10.96.0.10:80")).await.expect("IPv4 ClusterIP"), "a4");
    assert_eq!(hello(&c.pod_a, sa("[fd00:96::10]:80")).await.expect("IPv6 ClusterIP"), "a6");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_proxy_name_selects_which_services_this_proxy_handles() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let slice = |name: &str, svc: &str| {
        slice_yaml(name, svc, "IPv4", &[("10.244.1.10", "node-a", true)], &[("http", "TCP", 8080)])
    };
    let labelled = service_yaml("mine", "  clusterIP: 10.96.0.31\n", &[("http", "TCP", 80, 8080, None)])
        .replace(
            "  namespace: default\n",
            "  namespace: default\n  labels: {service.kubernetes.io/service-proxy-name: ferry}\n",
        );
    // The EndpointSlice controller copies the Service's labels onto its slices.
    let labelled_slice = slice("mine-1", "mine").replace(
        "labels: {kubernetes.io/service-name: mine}",
        "labels: {kubernetes.io/service-name: mine, service.kubernetes.io/service-proxy-name: ferry}",
    );
    c.dir.write("mine.yaml", &format!("{labelled}---\n{labelled_slice}"));
    c.dir.write(
        "theirs.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("theirs", "  clusterIP: 10.96.0.32\n", &[("http", "TCP", 80, 8080, None)]),
            slice("theirs-1", "theirs")
        ),
    );
    let _ferry = c.start(&["--service-proxy-name", "ferry"]);

    assert_eq!(hello(&c.pod_a, sa("10.96.0.31:80")).await.expect("the labelled Service"), "a");
    // The unlabelled Service is left to kube-proxy: not on the device, not bound.
    let out = c.node.command("ip").args(["-o", "addr", "show", "dev", "ferry0"]).output().expect("ip addr");
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains("10.96.0.31/32") && !addrs.contains("10.96.0.32"), "{addrs}");
}
