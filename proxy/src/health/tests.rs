//! Health servers over real loopback sockets: exact status lines, headers and bodies (only the
//! `Date` value is masked), the manager following snapshots, the staleness and eligibility rules.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use ferry_model::{Index, NodeInfo, NodeStatus, Snapshot};
use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{
    metrics::{histogram_buckets, no_local_endpoints, no_local_endpoints_delta, no_local_endpoints_for},
    service::local_ready_ips,
    *,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// 2023-11-14T22:13:20.25Z.
fn start() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)
}

// --- HTTP client ---

/// Sends one request on `conn` and reads exactly one response: (head with `Date` masked, body).
async fn request(conn: &mut TcpStream, path: &str) -> (String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: kube-probe\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed before the response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("utf-8 head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .trim()
        .parse()
        .expect("length");
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("body in time")
            .expect("read");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(buf.len(), head_end + len, "nothing after the body");
    let body = String::from_utf8(buf[head_end..].to_vec()).expect("utf-8 body");
    (mask_date(&head), body)
}

async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    request(&mut conn, path).await
}

/// Replaces the `Date` value with `<date>` after checking its shape (`Mon, 02 Jan 2006 15:04:05 GMT`).
fn mask_date(head: &str) -> String {
    head.split("\r\n")
        .map(|line| match line.strip_prefix("Date: ") {
            Some(v) => {
                assert_eq!(v.len(), 29, "IMF-fixdate: {v}");
                assert!(v.ends_with(" GMT") && v.as_bytes()[3] == b',', "IMF-fixdate: {v}");
                "Date: <date>".to_owned()
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((LOOPBACK, 0)).expect("bind");
    l.local_addr().expect("addr").port()
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

// --- snapshots ---

fn lb_service(name: &str, hcnp: u16) -> KubeService {
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": hcnp,
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"name": "https", "port": 443, "targetPort": 8443, "nodePort": 30443}
            ]
        }
    }))
    .expect("valid Service")
}

/// `eps`: (ip, node, ready, terminating).
fn slice(service: &str, eps: &[(&str, &str, bool, bool)]) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, node, ready, terminating)| {
            json!({
                "addresses": [ip],
                "nodeName": node,
                "conditions": {"ready": ready, "serving": true, "terminating": terminating}
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": format!("{service}-abc"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
        "endpoints": endpoints
    }))
    .expect("valid EndpointSlice")
}

fn index() -> Index {
    Index::new(Some(NodeInfo { name: "n1".into(), zone: None }))
}

/// Two ports; 10.0.0.1 and 10.0.0.4 are local Ready (2 IPs, 4 ip:ports); .2 is local but
/// terminating; .3 is Ready on another node.
fn typical_endpoints(service: &str) -> EndpointSlice {
    slice(
        service,
        &[
            ("10.0.0.1", "n1", true, false),
            ("10.0.0.2", "n1", false, true),
            ("10.0.0.3", "n2", true, false),
            ("10.0.0.4", "n1", true, false),
        ],
    )
}

fn health_at_start() -> (Arc<ProxyHealth>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(start()));
    let health = Arc::new(ProxyHealth::with_clock(&IpFamily::ALL, DEFAULT_SYNC_PERIOD, clock.clone()));
    (health, clock)
}

fn hc_body(count: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

fn hc_head(status: &str, count: usize, len: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {count}\r\nDate: <date>\r\nContent-Length: {len}\r\n\r\n"
    )
}

// --- healthCheckNodePort ---

#[test]
fn local_ready_ips_counts_distinct_local_ready_ips() {
    let mut idx = index();
    idx.apply_service(&lb_service("web", 32000));
    idx.apply_endpoint_slice(&typical_endpoints("web"));
    let snap = idx.build();
    let svc = snap.services.values().next().expect("service");
    assert_eq!(local_ready_ips(svc, Some("n1")), (2, 0), "two ports of one IP count once; terminating never");
    assert_eq!(local_ready_ips(svc, Some("n2")), (1, 0));
    assert_eq!(local_ready_ips(svc, Some("n3")), (0, 0));
    assert_eq!(local_ready_ips(svc, None), (0, 0), "standalone: nothing is local");
}

#[tokio::test]
async fn service_health_answers_exactly_like_kube_proxy() {
    let (health, clock) = health_at_start();
    let port = free_port();
    let mut idx = index();
    idx.apply_service(&lb_service("web", port));
    idx.apply_endpoint_slice(&typical_endpoints("web"));
    let shutdown = CancellationToken::new();
    let mut servers = ServiceHealthServers::new(vec![LOOPBACK], health.clone(), shutdown.clone());
    assert!(servers.sync(&idx.build()).await.is_empty());
    let addr = SocketAddr::new(LOOPBACK, port);

    let body = hc_body(2, true);
    assert_eq!(get(addr, "/").await, (hc_head("200 OK", 2, body.len()), body.clone()));
    assert_eq!(body.len(), 111, "2 + 14 + 23 + 16 + 4 + 22 + 29 + 1 bytes");
    // Any path answers the same.
    assert_eq!(get(addr, "/healthz").await.1, body);

    // Proxy overdue: 503 although endpoints exist.
    health.queued();
    clock.advance(Duration::from_secs(60));
    let body = hc_body(2, false);
    assert_eq!(get(addr, "/").await, (hc_head("503 Service Unavailable", 2, body.len()), body));
    health.updated();

    // No local Ready endpoint (only terminating and remote ones): 503, weight 0.
    idx.apply_endpoint_slice(&slice(
        "web",
        &[("10.0.0.2", "n1", false, true), ("10.0.0.3", "n2", true, false)],
    ));
    assert!(servers.sync(&idx.build()).await.is_empty());
    let body = hc_body(0, true);
    assert_eq!(get(addr, "/").await, (hc_head("503 Service Unavailable", 0, body.len()), body));
    shutdown.cancel();
}

#[tokio::test]
async fn manager_opens_updates_and_closes_servers() {
    let (health, _clock) = health_at_start();
    let (p1, p2) = (free_port(), free_port());
    let shutdown = CancellationToken::new();
    let mut servers = ServiceHealthServers::new(vec![LOOPBACK], health, shutdown.clone());
    let mut idx = index();

    // A Service without healthCheckNodePort gets no server.
    let mut plain = lb_service("plain", 1);
    if let Some(spec) = plain.spec.as_mut() {
        spec.external_traffic_policy = Some("Cluster".into());
        spec.health_check_node_port = None;
    }
    idx.apply_service(&plain);
    idx.apply_service(&lb_service("web", p1));
    idx.apply_endpoint_slice(&slice("web", &[("10.0.0.1", "n1", true, false)]));
    assert!(servers.sync(&idx.build()).await.is_empty());
    let open: Vec<_> = servers.servers().map(|(k, p, a)| (k.to_string(), p, a.to_vec())).collect();
    assert_eq!(open, vec![("shop/web".to_owned(), p1, vec![SocketAddr::new(LOOPBACK, p1)])]);

    // A keep-alive connection survives an endpoint change: the server is not restarted, and the
    // count is updated in place.
    let a1 = SocketAddr::new(LOOPBACK, p1);
    let mut conn = TcpStream::connect(a1).await.expect("connect");
    assert!(request(&mut conn, "/").await.1.contains("\"localEndpoints\": 1,"));
    idx.apply_endpoint_slice(&typical_endpoints("web"));
    assert!(servers.sync(&idx.build()).await.is_empty());
    assert!(request(&mut conn, "/").await.1.contains("\"localEndpoints\": 2,"));

    // Port change: the old port closes, the new one answers.
    idx.apply_service(&lb_service("web", p2));
    assert!(servers.sync(&idx.build()).await.is_empty());
    assert!(refused(a1).await, "old port closed");
    assert!(get(SocketAddr::new(LOOPBACK, p2), "/").await.0.starts_with("HTTP/1.1 200 OK\r\n"));

    // Removal closes; another Service can take the freed port in the same sync.
    idx.delete_service("shop", "web");
    idx.apply_service(&lb_service("other", p2));
    assert!(servers.sync(&idx.build()).await.is_empty());
    let (head, body) = get(SocketAddr::new(LOOPBACK, p2), "/").await;
    assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{head}");
    assert!(body.contains("\"name\": \"other\""), "{body}");

    // A port someone else holds is reported and retried on the next sync.
    let squatter = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let busy = squatter.local_addr().expect("addr").port();
    idx.apply_service(&lb_service("busy", busy));
    let errors = servers.sync(&idx.build()).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].addr, SocketAddr::new(LOOPBACK, busy));
    drop(squatter);
    assert!(servers.sync(&idx.build()).await.is_empty(), "retried once the port is free");
    assert!(get(SocketAddr::new(LOOPBACK, busy), "/").await.0.starts_with("HTTP/1.1 503"));

    shutdown.cancel();
}

#[tokio::test]
async fn run_follows_the_snapshot_channel_and_closes_on_shutdown() {
    let (health, _clock) = health_at_start();
    let port = free_port();
    let mut idx = index();
    let (tx, rx) = tokio::sync::watch::channel(idx.build());
    let shutdown = CancellationToken::new();
    let servers = ServiceHealthServers::new(vec![LOOPBACK], health, shutdown.clone());
    let task = tokio::spawn(servers.run(rx));
    let addr = SocketAddr::new(LOOPBACK, port);

    idx.apply_service(&lb_service("web", port));
    tx.send(idx.build()).expect("send");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "server did not open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("run returns").expect("no panic");
    assert!(refused(addr).await, "closed on shutdown");
}

// --- /healthz and /livez ---

/// Counts counter increments by `name{labels}`; gauges and histograms are no-ops.
#[derive(Default)]
struct CountingRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl CountingRecorder {
    fn get(&self, key: &str) -> u64 {
        let map = self.counters.lock().expect("lock");
        map.get(key).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl ::metrics::Recorder for CountingRecorder {
    fn describe_counter(
        &self,
        _: ::metrics::KeyName,
        _: Option<::metrics::Unit>,
        _: ::metrics::SharedString,
    ) {
    }
    fn describe_gauge(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
    fn describe_histogram(
        &self,
        _: ::metrics::KeyName,
        _: Option<::metrics::Unit>,
        _: ::metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Counter {
        let labels: Vec<_> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut map = self.counters.lock().expect("lock");
        ::metrics::Counter::from_arc(map.entry(name).or_default().clone())
    }
    fn register_gauge(&self, _: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Gauge {
        ::metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Histogram {
        ::metrics::Histogram::noop()
    }
}

fn json_head(status: &str, len: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         Date: <date>\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[tokio::test]
async fn healthz_and_livez_follow_kube_proxy_rules() {
    let (health, clock) = health_at_start();
    let recorder = CountingRecorder::default();
    let server = ::metrics::with_local_recorder(&recorder, || HealthzServer::new(health.clone()));
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let status = |t: &str, healthy: bool| {
        format!(
            r#""status":{{"IPv4":{{"lastUpdated":"{t}","healthy":{healthy}}},"IPv6":{{"lastUpdated":"{t}","healthy":{healthy}}}}}"#
        )
    };
    let t0 = "2023-11-14T22:13:20.25Z";

    // No Node known yet: not eligible, so /healthz is 503 while /livez is 200.
    let body = format!(
        r#"{{"lastUpdated":"{t0}","currentTime":"{t0}","nodeEligible":false,"healthy":true,{}}}"#,
        status(t0, true)
    );
    assert_eq!(get(addr, "/healthz").await, (json_head("503 Service Unavailable", body.len()), body));
    let body =
        format!(r#"{{"lastUpdated":"{t0}","currentTime":"{t0}","healthy":true,{}}}"#, status(t0, true));
    assert_eq!(get(addr, "/livez").await, (json_head("200 OK", body.len()), body));

    // Eligible: 200, and lastUpdated reads "now" on 200 (kube-proxy's back-compat rule).
    health.set_node_eligible(true);
    clock.advance(Duration::from_millis(10_500));
    let t1 = "2023-11-14T22:13:30.75Z";
    let body = format!(
        r#"{{"lastUpdated":"{t1}","currentTime":"{t1}","nodeEligible":true,"healthy":true,{}}}"#,
        status(t0, true)
    );
    assert_eq!(get(addr, "/healthz").await, (json_head("200 OK", body.len()), body));

    // A change queued and not applied for just under 2 × 30 s: still healthy; at 60 s: 503 on both,
    // lastUpdated is the real last sync.
    health.queued();
    clock.advance(Duration::from_secs(30));
    health.queued(); // the oldest queued change counts
    clock.advance(Duration::from_millis(29_999));
    assert!(get(addr, "/healthz").await.0.starts_with("HTTP/1.1 200 OK\r\n"));
    clock.advance(Duration::from_millis(1));
    let t2 = "2023-11-14T22:14:30.75Z";
    let body = format!(
        r#"{{"lastUpdated":"{t0}","currentTime":"{t2}","nodeEligible":true,"healthy":false,{}}}"#,
        status(t0, false)
    );
    assert_eq!(get(addr, "/healthz").await, (json_head("503 Service Unavailable", body.len()), body));
    assert!(get(addr, "/livez").await.0.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    assert!(!health.is_healthy());

    // Applied: healthy again.
    health.updated();
    assert!(get(addr, "/livez").await.0.starts_with("HTTP/1.1 200 OK\r\n"));

    // Unknown paths: Go's NotFound.
    let (head, body) = get(addr, "/healthz/").await;
    assert_eq!(
        head,
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n\
         Date: <date>\r\nContent-Length: 19\r\n\r\n"
    );
    assert_eq!(body, "404 page not found\n");

    assert_eq!(recorder.get("kubeproxy_proxy_healthz_total{code=200}"), 2);
    assert_eq!(recorder.get("kubeproxy_proxy_healthz_total{code=503}"), 2);
    assert_eq!(recorder.get("kubeproxy_proxy_livez_total{code=200}"), 2);
    assert_eq!(recorder.get("kubeproxy_proxy_livez_total{code=503}"), 1);
    shutdown.cancel();
}

#[test]
fn staleness_is_per_family_and_startup_counts_as_synced() {
    let clock = Arc::new(ManualClock::new(start()));
    let health = ProxyHealth::with_clock(&[IpFamily::V4], Duration::from_secs(5), clock.clone());
    assert_eq!(health.timeout(), Duration::from_secs(10));
    let r = health.report();
    assert_eq!(r.status.len(), 1, "only tracked families are reported");
    assert_eq!(r.last_updated, Some(start()));
    // IPv6 is not tracked: its queue is ignored.
    health.queued_family(IpFamily::V6);
    clock.advance(Duration::from_secs(11));
    assert!(health.is_healthy());
    health.queued_family(IpFamily::V4);
    clock.advance(Duration::from_secs(10));
    assert!(!health.is_healthy());
    health.updated_family(IpFamily::V4);
    assert!(health.is_healthy());

    // No family at all: healthy, zero lastUpdated, no status (kube-proxy before its first sync).
    let none = ProxyHealth::with_clock(&[], DEFAULT_SYNC_PERIOD, clock);
    none.queued();
    let r = none.report();
    assert!(r.healthy && r.status.is_empty() && r.last_updated.is_none());
    assert_eq!(
        r.to_json(None),
        r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2023-11-14T22:13:41.25Z","healthy":true}"#
    );
}

#[test]
fn eligibility_comes_from_the_snapshot_node_status() {
    let (health, _clock) = health_at_start();
    let mut idx = index();
    health.observe_node(&idx.build());
    assert!(!health.node_eligible(), "no Node object: not eligible, as kube-proxy");
    idx.set_node_status(Some(NodeStatus { eligible: true, addresses: vec![] }));
    health.observe_node(&idx.build());
    assert!(health.node_eligible());
    idx.set_node_status(Some(NodeStatus { eligible: false, addresses: vec![] }));
    health.observe_node(&idx.build());
    assert!(!health.node_eligible(), "deleting or ToBeDeletedByClusterAutoscaler");
}

// --- metrics ---

#[test]
fn histogram_buckets_are_kube_proxys() {
    let buckets: HashMap<_, _> = histogram_buckets().into_iter().collect();
    let sync = &buckets["kubeproxy_sync_proxy_rules_duration_seconds"];
    assert_eq!(sync.len(), 15);
    assert_eq!(sync[0], 0.001);
    assert_eq!(sync[14], 16.384);
    let np = &buckets["kubeproxy_network_programming_duration_seconds"];
    assert_eq!(np.len(), 1 + 2 + 59 + 12 + 7);
    assert_eq!(&np[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
    assert_eq!(np[61], 59.0);
    assert_eq!(&np[62..64], &[60.0, 65.0]);
    assert_eq!(np[73], 115.0);
    assert_eq!(&np[74..], &[120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]);
    assert!(np.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
}

fn local_policy_service(name: &str, itp: &str, etp: &str, kind: &str, cluster_ips: &[&str]) -> KubeService {
    let node_port = |p: u16| if kind == "ClusterIP" { json!(null) } else { json!(p) };
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "type": kind,
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "internalTrafficPolicy": itp,
            "externalTrafficPolicy": etp,
            "ports": [
                {"name": "a", "port": 80, "nodePort": node_port(30081)},
                {"name": "b", "port": 81, "nodePort": node_port(30082)}
            ]
        }
    }))
    .expect("valid Service")
}

fn single_port_slice(service: &str, ip: &str, node: &str, family: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": format!("{service}-{family}"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": [{"name": "a", "port": 8080}, {"name": "b", "port": 8081}],
        "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}]
    }))
    .expect("valid EndpointSlice")
}

#[test]
fn no_local_endpoints_counts_ports_like_kube_proxy() {
    let mut idx = index();
    // iTP=Local, remote endpoint only: 2 ports count as internal.
    idx.apply_service(&local_policy_service("itp", "Local", "Cluster", "ClusterIP", &["10.96.0.1"]));
    idx.apply_endpoint_slice(&single_port_slice("itp", "10.0.0.1", "n2", "IPv4"));
    // eTP=Local NodePort, remote only: 2 ports count as external.
    idx.apply_service(&local_policy_service("etp", "Cluster", "Local", "NodePort", &["10.96.0.2"]));
    idx.apply_endpoint_slice(&single_port_slice("etp", "10.0.0.2", "n2", "IPv4"));
    // eTP=Local with a local endpoint: nothing.
    idx.apply_service(&local_policy_service("fine", "Cluster", "Local", "NodePort", &["10.96.0.3"]));
    idx.apply_endpoint_slice(&single_port_slice("fine", "10.0.0.3", "n1", "IPv4"));
    // No endpoints anywhere: REJECT, not counted.
    idx.apply_service(&local_policy_service("empty", "Local", "Local", "NodePort", &["10.96.0.4"]));
    // Dual-stack, local IPv4 endpoint but only a remote IPv6 one.
    idx.apply_service(&local_policy_service(
        "dual",
        "Local",
        "Cluster",
        "ClusterIP",
        &["10.96.0.5", "fd00::5"],
    ));
    idx.apply_endpoint_slice(&single_port_slice("dual", "10.0.0.5", "n1", "IPv4"));
    idx.apply_endpoint_slice(&single_port_slice("dual", "fd00::10:5", "n2", "IPv6"));
    let snap: Arc<Snapshot> = idx.build();

    // Ferry keeps one ServicePort per family, so the family-blind count is the sum over families.
    assert_eq!(no_local_endpoints(&snap, "n1"), (4, 2));
    assert_eq!(no_local_endpoints_for(&snap, "n1", Some(IpFamily::V4)), (2, 2));
    assert_eq!(no_local_endpoints_for(&snap, "n1", Some(IpFamily::V6)), (2, 0), "dual has no local IPv6");
    // On n2 everything remote is local; "fine" and "dual"(v4) lack one.
    assert_eq!(no_local_endpoints_for(&snap, "n2", Some(IpFamily::V4)), (2, 2));
}

/// The per-sync update from the changed Services equals a full recount.
#[test]
fn no_local_endpoints_delta_matches_a_recount() {
    let mut idx = index();
    idx.apply_service(&local_policy_service("itp", "Local", "Cluster", "ClusterIP", &["10.96.0.1"]));
    idx.apply_endpoint_slice(&single_port_slice("itp", "10.0.0.1", "n2", "IPv4"));
    idx.apply_service(&local_policy_service("etp", "Cluster", "Local", "NodePort", &["10.96.0.2"]));
    idx.apply_endpoint_slice(&single_port_slice("etp", "10.0.0.2", "n2", "IPv4"));
    idx.apply_service(&local_policy_service(
        "dual",
        "Local",
        "Cluster",
        "ClusterIP",
        &["10.96.0.5", "fd00::5"],
    ));
    idx.apply_endpoint_slice(&single_port_slice("dual", "fd00::10:5", "n2", "IPv6"));
    let before = idx.build();

    // An endpoint turns local, a Service goes away, a new one lacking a local endpoint arrives.
    idx.apply_endpoint_slice(&single_port_slice("itp", "10.0.0.1", "n1", "IPv4"));
    idx.delete_service("shop", "etp");
    idx.apply_service(&local_policy_service("new", "Local", "Cluster", "ClusterIP", &["10.96.0.6"]));
    idx.apply_endpoint_slice(&single_port_slice("new", "10.0.0.6", "n2", "IPv4"));
    let after = idx.build();

    for family in [IpFamily::V4, IpFamily::V6] {
        let (b, a) = (
            no_local_endpoints_for(&before, "n1", Some(family)),
            no_local_endpoints_for(&after, "n1", Some(family)),
        );
        let want = (a.0 as i64 - b.0 as i64, a.1 as i64 - b.1 as i64);
        assert_eq!(no_local_endpoints_delta(&before, &after, "n1", family), want, "{family:?}");
    }
    assert_ne!(no_local_endpoints_delta(&before, &after, "n1", IpFamily::V4), (0, 0), "the changes count");
    assert_eq!(no_local_endpoints_delta(&after, &after, "n1", IpFamily::V4), (0, 0));
}
