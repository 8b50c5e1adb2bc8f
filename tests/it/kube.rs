//! `ferry node --kubeconfig`: the node proxy fed by a Kubernetes API server.
//!
//! The API server is `ferry-test-apiserver`, which speaks the real list/watch protocol (pagination,
//! watch events, bookmarks, `410 Gone`, cut streams, restarts) on the node namespace's loopback;
//! Ferry reaches it through a kubeconfig, exactly as it would reach a real one. After every
//! disruption the live snapshot must equal what a fresh start on the same objects builds (a second
//! `ferry node` started from a directory holding the API server's objects), and a connection
//! opened before the disruptions must keep working.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ferry_test_apiserver::{ApiServer, ResourceId};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    harness::*,
    netns::Netns,
    node::{Cluster, NODE, hello, names, node_yaml, sa, service_yaml, set, slice_yaml, spawn_node},
};

const WEB: &str = "10.96.0.10:80";
const SECOND: &str = "10.96.0.11:80";

/// A test API server and its kubeconfig (shared with the DNS tests).
pub struct Api {
    pub server: ApiServer,
    kubeconfig: ConfigDir,
}

impl Api {
    /// An API server on the loopback of the node namespace, where `ferry node` runs.
    pub fn start(c: &Cluster) -> Self {
        // Threads inherit the namespace of the thread that spawns them: the server's runtime lives
        // in the node namespace.
        Self::with(c.node.enter(ApiServer::start))
    }

    /// An API server on this namespace's loopback.
    pub fn start_here() -> Self {
        Self::with(ApiServer::start())
    }

    fn with(server: ApiServer) -> Self {
        let kubeconfig = ConfigDir::new();
        kubeconfig.write("kubeconfig", &server.kubeconfig());
        Self { server, kubeconfig }
    }

    /// The kubeconfig's path.
    pub fn path(&self) -> String {
        self.kubeconfig.path().join("kubeconfig").to_str().expect("utf-8").to_owned()
    }

    /// Applies every document of `yaml`.
    pub fn apply(&self, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            let value: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
            self.server.apply(value).expect("apply");
        }
    }

    fn delete(&self, api_version: &str, kind: &str, name: &str) {
        self.server.delete(api_version, kind, Some("default"), name).expect("delete");
    }

    /// Starts `ferry node --kubeconfig` and waits until it serves.
    fn ferry(&self, c: &Cluster) -> Ferry {
        let ferry = c.spawn(&["--kubeconfig", &self.path()], &["--min-sync-period", "50ms"]);
        ferry
            .wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving")
            .expect("ferry node never served");
        ferry
    }

    /// What a fresh `ferry node` builds from the API server's current objects: a second instance,
    /// in a namespace of its own, reading them from a directory.
    fn fresh_snapshot(&self) -> Value {
        let dir = ConfigDir::new();
        for (api_version, kind) in
            [("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"), ("v1", "Node")]
        {
            let docs: Vec<String> = self
                .server
                .list(api_version, kind)
                .into_iter()
                .map(|mut o| {
                    o["apiVersion"] = api_version.into();
                    o["kind"] = kind.into();
                    serde_json::to_string(&o).expect("json")
                })
                .collect();
            dir.write(&format!("{kind}.yaml"), &docs.join("\n---\n"));
        }
        let ns = Netns::new("fresh");
        let fresh = spawn_node(&ns, &["--config", dir.path().to_str().expect("utf-8 path")], &[]);
        fresh
            .wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving")
            .expect("fresh ferry never served");
        unversioned(fresh.snapshot())
    }

    /// Waits until `ferry`'s live snapshot equals a fresh start's.
    fn wait_converged(&self, ferry: &Ferry, after: &str) {
        let want = self.fresh_snapshot();
        let start = Instant::now();
        loop {
            let live = unversioned(ferry.snapshot());
            if live == want {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "after {after}: the live snapshot never matched a fresh start's\nlive:  {live}\nfresh: {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn unversioned(mut snapshot: Value) -> Value {
    snapshot.as_object_mut().expect("snapshot object").remove("version");
    snapshot
}

/// `web` (ClusterIP 10.96.0.10:80) with endpoints on pod-a and, if `with_b`, pod-b.
fn web(with_b: bool) -> String {
    let mut endpoints = vec![("10.244.1.10", NODE, true)];
    if with_b {
        endpoints.push(("10.244.2.10", "node-b", true));
    }
    [
        service_yaml("web", "  clusterIP: 10.96.0.10\n", &[("http", "TCP", 80, 8080, None)]),
        slice_yaml("web-1", "web", "IPv4", &endpoints, &[("http", "TCP", 8080)]),
    ]
    .join("\n---\n")
}

/// `second` (ClusterIP 10.96.0.11:80) with its endpoint on pod-b.
fn second() -> String {
    [
        service_yaml("second", "  clusterIP: 10.96.0.11\n", &[("http", "TCP", 80, 8080, None)]),
        slice_yaml(
            "second-1",
            "second",
            "IPv4",
            &[("10.244.2.10", "node-b", true)],
            &[("http", "TCP", 8080)],
        ),
    ]
    .join("\n---\n")
}

/// Waits until a connection from `ns` to `to` fails (the frontend is gone).
async fn wait_refused(ns: &Netns, to: SocketAddr) {
    let start = Instant::now();
    while hello(ns, to).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "{to} still answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `to` answers from `ns` with one of `want`.
async fn wait_answers(ns: &Netns, to: SocketAddr) -> String {
    let start = Instant::now();
    loop {
        if let Ok(name) = hello(ns, to).await {
            return name;
        }
        assert!(start.elapsed() < DEADLINE, "{to} never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One round trip on a connection opened earlier (the backend echoes).
async fn echo(conn: &mut tokio::net::TcpStream, round: &str) {
    let msg = format!("still here after {round}\n");
    conn.write_all(msg.as_bytes()).await.unwrap_or_else(|e| panic!("write after {round}: {e}"));
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no echo after {round}"))
        .unwrap_or_else(|e| panic!("read after {round}: {e}"));
    assert_eq!(buf, msg.as_bytes(), "echo after {round}");
}

/// Initial sync (readiness waits for it), then a change, an addition and a deletion.
#[tokio::test(flavor = "multi_thread")]
async fn api_source_syncs_then_follows_changes() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let api = Api::start(&c);
    api.apply(&node_yaml());
    api.apply(&web(false));

    // The API server refuses service first: Ferry must not serve (nor be ready) on a partial view.
    api.server.set_unavailable(true);
    let ferry = c.spawn(&["--kubeconfig", &api.path()], &[]);
    let start = Instant::now();
    while api.server.unavailable_responses() < 3 {
        assert!(start.elapsed() < DEADLINE, "ferry never asked the API server");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(ferry.get("/readyz").0, 200, "ready before every kind was listed");
    assert_eq!(ferry.snapshot()["version"], 0, "published before the initial sync");
    api.server.set_unavailable(false);
    ferry.wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving").expect("never served");
    assert_eq!(ferry.get("/readyz").0, 200);
    assert_eq!(hello(&c.pod_b, sa(WEB)).await.expect("web via ClusterIP"), "a");
    api.wait_converged(&ferry, "the initial sync");

    api.apply(&web(true));
    let start = Instant::now();
    while names(&c.pod_b, sa(WEB), 16).await != set(&["a", "b"]) {
        assert!(start.elapsed() < DEADLINE, "the new endpoint never took traffic");
    }
    api.apply(&second());
    assert_eq!(wait_answers(&c.pod_a, sa(SECOND)).await, "b");
    api.delete("v1", "services", "web");
    wait_refused(&c.pod_a, sa(WEB)).await;
    api.wait_converged(&ferry, "changes");
}

/// Cut streams (between and in the middle of events), `410 Gone` and an API server restart:
/// each time Ferry reconnects, converges to a fresh start's state, and the open connection lives.
#[tokio::test(flavor = "multi_thread")]
async fn api_source_survives_disconnects_410_and_restarts() {
    let c = Cluster::new();
    let _a = Cluster::tcp_backend(&c.pod_a, "10.244.1.10", 8080, "a");
    let _b = Cluster::tcp_backend(&c.pod_b, "10.244.2.10", 8080, "b");
    let api = Api::start(&c);
    api.server.set_bookmark_interval(Duration::from_millis(200));
    api.apply(&node_yaml());
    api.apply(&web(false));
    let ferry = api.ferry(&c);
    let mut conn = c.pod_b.tcp_connect(sa(WEB)).expect("connect web");
    assert_eq!(read_greeting(&mut conn).await.expect("greeting"), "a");
    let services = ResourceId::core("services");
    let lists = api.server.stats(&services).lists;

    // 1. Streams cut between events: resumed from the last (bookmarked) version, no relist.
    api.server.disconnect_watches();
    api.apply(&second());
    assert_eq!(wait_answers(&c.pod_a, sa(SECOND)).await, "b");
    api.wait_converged(&ferry, "a cut stream");
    assert_eq!(api.server.stats(&services).lists, lists, "a cut stream must resume, not relist");
    echo(&mut conn, "a cut stream").await;

    // 2. Streams cut in the middle of an event: the half event is dropped, the watch resumes and
    //    the change arrives whole.
    api.server.disconnect_mid_event();
    api.apply(&web(true));
    let start = Instant::now();
    while names(&c.pod_b, sa(WEB), 16).await != set(&["a", "b"]) {
        assert!(start.elapsed() < DEADLINE, "the change cut mid-event never arrived");
    }
    api.wait_converged(&ferry, "a stream cut mid-event");
    echo(&mut conn, "a stream cut mid-event").await;

    // 3. 410 Gone: while the watches are down (503s), a deletion happens and history is compacted
    //    past it. Ferry's resumed watch gets 410, it relists and deletes what the list lacks.
    api.server.set_unavailable(true);
    api.server.disconnect_watches();
    api.delete("v1", "services", "second");
    api.delete("discovery.k8s.io/v1", "endpointslices", "second-1");
    api.server.compact();
    api.server.set_unavailable(false);
    let relisted = api.server.wait_for_async(&services, DEADLINE, |s| s.lists > lists).await;
    assert!(relisted, "410 must relist");
    wait_refused(&c.pod_a, sa(SECOND)).await;
    api.wait_converged(&ferry, "410 Gone");
    echo(&mut conn, "410 Gone").await;

    // 4. API server restart, with changes made while it is down.
    api.server.stop();
    api.apply(&second());
    api.apply(&web(false));
    c.node.enter(|| api.server.restart()).expect("restart the API server on its port");
    assert_eq!(wait_answers(&c.pod_a, sa(SECOND)).await, "b");
    api.wait_converged(&ferry, "an API server restart");
    echo(&mut conn, "an API server restart").await;
    assert!(ferry.metric("ferry_kube_watch_errors_total", &[]) >= 1.0, "the outage is counted");
}

/// A kubeconfig that cannot be used stops `ferry node` at once, with the file named.
#[test]
fn a_broken_kubeconfig_is_named_and_fatal() {
    let dir = ConfigDir::new();
    dir.write("kubeconfig", "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 42}}\n");
    let path = dir.path().join("kubeconfig");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["node", "--node-name", NODE, "--admin-address", "127.0.0.1:0"])
        .args(["--metrics-bind-address", "127.0.0.1:0", "--kubeconfig"])
        .arg(&path)
        .output()
        .expect("run ferry");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*path.to_string_lossy()), "the file is not named: {stderr}");
}
