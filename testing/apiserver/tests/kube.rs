//! The test API server against the real kube-rs client and kube-runtime watcher, through a
//! kubeconfig, over real loopback sockets.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    io::{Read, Write},
    net::TcpStream,
    pin::pin,
    time::Duration,
};

use ferry_test_apiserver::{ApiServer, ResourceId};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ListParams, VersionMatch, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

const WAIT: Duration = Duration::from_secs(20);

async fn client(server: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client builds")
}

fn svc(name: &str, port: u16, labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

fn services() -> ResourceId {
    ResourceId::core("services")
}

/// name -> resourceVersion of everything the server stores for a resource.
fn server_state(server: &ApiServer, api_version: &str, plural: &str) -> BTreeMap<String, String> {
    server
        .list(api_version, plural)
        .into_iter()
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
            let name = o["metadata"]["name"].as_str().expect("name").to_owned();
            (
                format!("{ns}/{name}"),
                o["metadata"]["resourceVersion"].as_str().expect("resourceVersion").to_owned(),
            )
        })
        .collect()
}

/// A retry backoff short enough for tests.
struct Fast;

impl Iterator for Fast {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl Backoff for Fast {
    fn reset(&mut self) {}
}

/// What a watcher has seen: its current view (ns/name -> resourceVersion), number of completed
/// initial lists, and errors.
#[derive(Clone, Debug, Default)]
struct View {
    objects: BTreeMap<String, String>,
    inits: u32,
    errors: Vec<String>,
    applies: u64,
}

/// Runs a kube-runtime watcher and folds its events into a [`View`].
struct Mirror {
    rx: watch::Receiver<View>,
    task: JoinHandle<()>,
}

impl Mirror {
    fn start<K>(api: Api<K>, config: watcher::Config) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let (tx, rx) = watch::channel(View::default());
        let task = tokio::spawn(async move {
            let mut stream = pin!(watcher::watcher(api, config).backoff(Fast));
            let mut view = View::default();
            let mut buffer = BTreeMap::new();
            let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(Event::Init) => buffer.clear(),
                    Ok(Event::InitApply(o)) => {
                        buffer.insert(key(&o), o.resource_version().expect("resourceVersion"));
                    }
                    Ok(Event::InitDone) => {
                        view.objects = std::mem::take(&mut buffer);
                        view.inits += 1;
                    }
                    Ok(Event::Apply(o)) => {
                        view.applies += 1;
                        view.objects.insert(key(&o), o.resource_version().expect("resourceVersion"));
                    }
                    Ok(Event::Delete(o)) => {
                        view.objects.remove(&key(&o));
                    }
                    Err(e) => view.errors.push(e.to_string()),
                }
                tx.send_replace(view.clone());
            }
        });
        Self { rx, task }
    }

    /// Waits (bounded) until the view satisfies `pred`; panics with the last view otherwise.
    async fn wait(&mut self, what: &str, mut pred: impl FnMut(&View) -> bool) -> View {
        let res =
            tokio::time::timeout(WAIT, self.rx.wait_for(|v| pred(v))).await.map(|r| r.map(|v| v.clone()));
        match res {
            Ok(Ok(v)) => v,
            _ => panic!("timed out waiting for {what}; view: {:?}", *self.rx.borrow()),
        }
    }

    async fn converge(&mut self, server: &ApiServer, api_version: &str, plural: &str) -> View {
        let expected = server_state(server, api_version, plural);
        self.wait(&format!("convergence to {expected:?}"), |v| v.objects == expected).await
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn initial_sync_changes_and_deletes() {
    let server = ApiServer::start();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        server.apply(svc(name, 80 + i as u16, &json!({}))).expect("apply object");
    }
    let client = client(&server).await;
    let mut mirror = Mirror::start(Api::<Service>::all(client.clone()), watcher::Config::default());
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.objects.len(), 3);
    assert_eq!(view.inits, 1);
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 1).await);

    server.apply(svc("a", 8080, &json!({}))).expect("apply object");
    server.apply(svc("d", 80, &json!({}))).expect("apply object");
    server.delete("v1", "services", Some("default"), "b").expect("delete object");
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.objects.keys().collect::<Vec<_>>(), ["default/a", "default/c", "default/d"]);
    assert_eq!(view.inits, 1, "changes arrive over the watch, no relist");
    let stats = server.stats(&services());
    assert_eq!((stats.lists, stats.watches), (1, 1));

    // Typed access: get, metadata filled in by the server.
    let api = Api::<Service>::namespaced(client, "default");
    let a = api.get("a").await.expect("get");
    assert_eq!(a.spec.expect("spec").ports.expect("ports")[0].port, 8080);
    assert_eq!(a.metadata.generation, Some(2));
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    let err = api.get("b").await.expect_err("b was deleted");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err:?}");
}

#[tokio::test]
async fn kube_proxy_label_selector_filters_and_transitions() {
    let server = ApiServer::start();
    server.apply(svc("plain", 80, &json!({"app": "x"}))).expect("apply object");
    server.apply(svc("headless", 80, &json!({"service.kubernetes.io/headless": ""}))).expect("apply object");
    server
        .apply(svc("other-proxy", 80, &json!({"service.kubernetes.io/service-proxy-name": "cilium"})))
        .expect("apply object");
    let client = client(&server).await;
    let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    let mut mirror =
        Mirror::start(Api::<Service>::all(client.clone()), watcher::Config::default().labels(selector));
    mirror.wait("only the plain service", |v| v.objects.keys().eq(["default/plain"])).await;

    // Starts matching -> ADDED; stops matching -> DELETED.
    server.apply(svc("headless", 80, &json!({}))).expect("apply object");
    mirror.wait("headless joins", |v| v.objects.contains_key("default/headless")).await;
    server.apply(svc("plain", 80, &json!({"service.kubernetes.io/headless": ""}))).expect("apply object");
    let view = mirror.wait("plain leaves", |v| !v.objects.contains_key("default/plain")).await;
    assert_eq!(view.objects.keys().collect::<Vec<_>>(), ["default/headless"]);

    // Field selector and `in` set selector through a plain list.
    let api = Api::<Service>::all(client);
    let names = |l: kube::core::ObjectList<Service>| l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>();
    let lp = ListParams::default().fields("metadata.name=other-proxy");
    assert_eq!(names(api.list(&lp).await.expect("list")), ["other-proxy"]);
    let lp = ListParams::default().labels("service.kubernetes.io/service-proxy-name in (cilium,ferry)");
    assert_eq!(names(api.list(&lp).await.expect("list")), ["other-proxy"]);
    let err = api.list(&ListParams::default().labels("a in (b")).await.expect_err("invalid selector");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 400), "{err:?}");
}

#[tokio::test]
async fn pagination_across_continue_pages_is_a_consistent_snapshot() {
    let server = ApiServer::start();
    server.apply_all((0..1200).map(|i| svc(&format!("s{i:04}"), 80, &json!({})))).expect("apply objects");
    let client = client(&server).await;
    let mut mirror = Mirror::start(Api::<Service>::all(client.clone()), watcher::Config::default());
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.objects.len(), 1200);
    assert_eq!(server.stats(&services()).lists, 3, "kube-runtime pages by 500");

    // A continue page shows the snapshot of the first page, not later writes.
    let api = Api::<Service>::all(client);
    let first = api.list(&ListParams::default().limit(1000)).await.expect("list");
    assert_eq!(first.items.len(), 1000);
    assert_eq!(first.metadata.remaining_item_count, Some(200));
    server.delete("v1", "services", Some("default"), "s1100").expect("delete object");
    server.apply(svc("s1199", 81, &json!({}))).expect("apply object");
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = api.list(&ListParams::default().limit(1000).continue_token(&token)).await.expect("list");
    assert_eq!(second.items.len(), 200);
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    assert!(second.metadata.continue_.is_none());
    assert_eq!(
        second.items.last().expect("items").spec.as_ref().expect("spec").ports.as_ref().expect("ports")[0]
            .port,
        80
    );

    // An exact-revision list shows the state at that revision.
    let first_rv = first.metadata.resource_version.clone().expect("list resourceVersion");
    let exact = ListParams::default().at(&first_rv).matching(VersionMatch::Exact);
    let old = api.list(&exact).await.expect("exact list");
    assert_eq!(old.items.len(), 1200);
    assert_eq!(old.metadata.resource_version.as_deref(), Some(first_rv.as_str()));
    assert_eq!(api.list(&ListParams::default()).await.expect("list").items.len(), 1199);

    // After compaction the token (and the exact revision) is too old.
    server.compact();
    let err = api.list(&exact).await.expect_err("compacted revision");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"), "{err:?}");
    let err = api
        .list(&ListParams::default().limit(1000).continue_token(&token))
        .await
        .expect_err("compacted token");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"), "{err:?}");
}

#[tokio::test]
async fn compaction_gives_410_and_the_watcher_relists() {
    let server = ApiServer::start();
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let client = client(&server).await;

    // A raw watch from a compacted resourceVersion gets one ERROR event with a 410 Status.
    let old_rv = server.resource_version();
    server.apply(svc("b", 80, &json!({}))).expect("apply object");
    server.compact();
    let api = Api::<Service>::all(client.clone());
    let events: Vec<_> =
        api.watch(&WatchParams::default(), &old_rv.to_string()).await.expect("start watch").collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Ok(WatchEvent::Error(s)) if s.code == 410 && s.reason == "Expired"),
        "{events:?}"
    );

    // A watcher without bookmarks keeps the resourceVersion of its last Service event; writes of
    // another kind move the global revision on; compaction + cut -> 410 on rewatch -> relist.
    let mut mirror =
        Mirror::start(Api::<Service>::all(client), watcher::Config::default().disable_bookmarks());
    mirror.converge(&server, "v1", "services").await;
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 1).await);
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))
        .expect("apply object");
    server.compact();
    server.disconnect_watches();
    server.apply(svc("c", 80, &json!({}))).expect("apply object");
    let view = mirror.wait("relist after 410", |v| v.inits == 2).await;
    assert!(view.errors.iter().any(|e| e.contains("too old resource version")), "{view:?}");
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.objects.len(), 3);
}

#[tokio::test]
async fn disconnects_and_mid_event_cuts_resume_without_loss() {
    let server = ApiServer::start();
    server.apply_all((0..5).map(|i| svc(&format!("s{i}"), 80, &json!({})))).expect("apply objects");
    let client = client(&server).await;
    let mut mirror = Mirror::start(Api::<Service>::all(client), watcher::Config::default());
    mirror.converge(&server, "v1", "services").await;
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 1).await);

    // Clean cut, then changes while the client reconnects.
    server.disconnect_watches();
    server.apply(svc("s0", 81, &json!({}))).expect("apply object");
    server.delete("v1", "services", Some("default"), "s1").expect("delete object");
    server.apply(svc("s9", 80, &json!({}))).expect("apply object");
    assert!(server.wait_for_async(&services(), WAIT, |s| s.watches >= 2 && s.open_watches == 1).await);
    mirror.converge(&server, "v1", "services").await;

    // Cut in the middle of an event line, in the middle of a burst of changes.
    server.disconnect_mid_event();
    for i in 0..20 {
        server.apply(svc(&format!("s{}", i % 7), 100 + i, &json!({}))).expect("apply object");
    }
    server.delete("v1", "services", Some("default"), "s2").expect("delete object");
    assert!(server.wait_for_async(&services(), WAIT, |s| s.watches >= 3 && s.open_watches == 1).await);
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.inits, 1, "resumed from its resourceVersion, no relist: {view:?}");
    assert_eq!(server.stats(&services()).lists, 1);
}

/// Sends one raw HTTP/1.1 request and returns everything until the server closes.
fn raw_request(server: &ApiServer, path_and_query: &str, auth: bool) -> String {
    let mut s = TcpStream::connect(server.addr()).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("socket option");
    let auth = if auth {
        format!("Authorization: Bearer {}\r\n", ferry_test_apiserver::TOKEN)
    } else {
        String::new()
    };
    write!(s, "GET {path_and_query} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
        .expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts a raw HTTP/1.1 watch request on a thread; it returns all bytes read until the server
/// closes the connection (or the read timeout).
fn raw_watch(server: &ApiServer, path: &str) -> std::thread::JoinHandle<String> {
    let (addr, path) = (server.addr(), path.to_owned());
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("socket option");
        let token = ferry_test_apiserver::TOKEN;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .expect("write request");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn disconnect_closes_without_the_final_chunk_and_timeout_with_it() {
    let server = ApiServer::start();
    let watcher = raw_watch(&server, "/api/v1/services?watch=1");
    assert!(server.wait_for_open_watches(&services(), 1, WAIT));
    server.disconnect_watches();
    let raw = watcher.join().expect("watcher thread");
    assert!(raw.starts_with("HTTP/1.1 200 OK") && raw.contains("transfer-encoding: chunked"), "{raw}");
    assert!(!raw.ends_with("0\r\n\r\n"), "cut: the connection closes without the final chunk: {raw}");
    assert!(server.wait_for(&services(), WAIT, |s| s.open_watches == 0), "watch closed");

    let watcher = raw_watch(&server, "/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion=1");
    let raw = watcher.join().expect("watcher thread");
    assert!(raw.ends_with("0\r\n\r\n"), "timeoutSeconds ends the stream with the final chunk: {raw}");
}

#[test]
fn mid_event_cut_leaves_a_partial_line_on_the_wire() {
    let server = ApiServer::start();
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let rv = server.resource_version();
    let watcher = raw_watch(&server, &format!("/api/v1/services?watch=true&resourceVersion={rv}"));
    assert!(server.wait_for_open_watches(&services(), 1, WAIT));
    server.disconnect_mid_event();
    server.apply(svc("b", 80, &json!({}))).expect("apply object");
    let raw = watcher.join().expect("watcher thread");
    assert!(raw.starts_with("HTTP/1.1 200 OK"), "{raw}");
    assert!(raw.contains("transfer-encoding: chunked"), "{raw}");
    assert!(raw.contains(r#"{"type":"ADDED","object":{"#), "{raw}");
    let last = raw.trim_end().lines().last().expect("a line");
    assert!(last.starts_with(r#"{"type":"ADDED""#), "the cut event is the last line: {raw}");
    assert!(
        serde_json::from_str::<Value>(last).is_err(),
        "only the first half of the event is written: {raw}"
    );
    assert!(!raw.ends_with("0\r\n\r\n"), "no final chunk: {raw}");
}

#[test]
fn status_errors_and_auth() {
    let server = ApiServer::start();
    assert!(raw_request(&server, "/api/v1/services", false).starts_with("HTTP/1.1 401"));
    let ok = raw_request(&server, "/api/v1/services", true);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(r#""kind":"ServiceList""#) && ok.contains(r#""resourceVersion":"1""#), "{ok}");
    let nf = raw_request(&server, "/apis/example.com/v1/widgets", true);
    assert!(nf.starts_with("HTTP/1.1 404") && nf.contains(r#""reason":"NotFound""#), "{nf}");
    let rv = server.resource_version() + 10;
    let big = raw_request(&server, &format!("/api/v1/services?resourceVersion={rv}"), true);
    assert!(big.starts_with("HTTP/1.1 504"), "{big}");
    // Items of a list carry no kind/apiVersion; GET of one object does.
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let list = raw_request(&server, "/api/v1/namespaces/default/services", true);
    assert_eq!(list.matches(r#""kind":"Service""#).count(), 0, "{list}");
    let one = raw_request(&server, "/api/v1/namespaces/default/services/a", true);
    assert!(one.contains(r#""kind":"Service""#), "{one}");
}

#[tokio::test]
async fn restart_on_the_same_port() {
    let server = ApiServer::start();
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let client = client(&server).await;
    let mut mirror = Mirror::start(Api::<Service>::all(client), watcher::Config::default());
    mirror.converge(&server, "v1", "services").await;

    server.stop();
    assert!(TcpStream::connect(server.addr()).is_err(), "connection refused while stopped");
    server.apply(svc("b", 80, &json!({}))).expect("apply object");
    server.apply(svc("a", 81, &json!({}))).expect("apply object");
    let rv_before = server.resource_version();
    server.restart().expect("restart");
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.objects.len(), 2);
    assert_eq!(
        view.inits, 2,
        "the restarted server's history starts after the client's resourceVersion: 410, relist"
    );
    assert!(server.resource_version() >= rv_before);
    server.apply(svc("c", 80, &json!({}))).expect("apply object");
    mirror.converge(&server, "v1", "services").await;
}

#[tokio::test]
async fn unavailable_period_then_recovery() {
    let server = ApiServer::start();
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let client = client(&server).await;
    let mut mirror = Mirror::start(Api::<Service>::all(client), watcher::Config::default());
    mirror.converge(&server, "v1", "services").await;

    server.set_unavailable(true);
    server.disconnect_watches();
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 0).await);
    server.apply(svc("b", 80, &json!({}))).expect("apply object");
    let deadline = std::time::Instant::now() + WAIT;
    while server.unavailable_responses() < 3 {
        assert!(std::time::Instant::now() < deadline, "client never retried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!mirror.rx.borrow().objects.contains_key("default/b"));
    server.set_unavailable(false);
    // kube-client retries 503s itself, so the watcher may not even see an error.
    mirror.converge(&server, "v1", "services").await;
}

#[tokio::test]
async fn bookmarks_are_delivered() {
    let server = ApiServer::start();
    server.set_bookmark_interval(Duration::from_secs(3600));
    server.apply(svc("a", 80, &json!({}))).expect("apply object");
    let client = client(&server).await;
    let api = Api::<Service>::all(client.clone());
    let rv = server.resource_version();
    let mut stream = pin!(api.watch(&WatchParams::default(), &rv.to_string()).await.expect("start watch"));
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 1).await);
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))
        .expect("apply object");
    server.bookmark_now();
    let ev = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .expect("watch event")
        .expect("watch event")
        .expect("watch event");
    match ev {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, (rv + 1).to_string()),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Periodic bookmarks.
    server.set_bookmark_interval(Duration::from_millis(20));
    for _ in 0..2 {
        let ev = tokio::time::timeout(WAIT, stream.try_next())
            .await
            .expect("watch event")
            .expect("watch event")
            .expect("watch event");
        assert!(matches!(ev, WatchEvent::Bookmark(_)), "{ev:?}");
    }
    // Without allowWatchBookmarks none are sent: the next event is the change.
    let mut plain = pin!(
        api.watch(&WatchParams::default().disable_bookmarks(), &server.resource_version().to_string())
            .await
            .expect("start watch")
    );
    assert!(server.wait_for_async(&services(), WAIT, |s| s.open_watches == 2).await);
    server.bookmark_now();
    server.apply(svc("b", 80, &json!({}))).expect("apply object");
    let ev = tokio::time::timeout(WAIT, plain.try_next())
        .await
        .expect("watch event")
        .expect("watch event")
        .expect("watch event");
    assert!(matches!(&ev, WatchEvent::Added(s) if s.name_any() == "b"), "{ev:?}");
}

#[tokio::test]
async fn streaming_list_and_timeout() {
    let server = ApiServer::start();
    server.apply_all((0..3).map(|i| svc(&format!("s{i}"), 80, &json!({})))).expect("apply objects");
    let client = client(&server).await;
    let mut mirror =
        Mirror::start(Api::<Service>::all(client.clone()), watcher::Config::default().streaming_lists());
    let view = mirror.converge(&server, "v1", "services").await;
    assert_eq!(view.inits, 1);
    assert_eq!(server.stats(&services()).lists, 0, "streaming lists need no LIST");
    server.apply(svc("s9", 80, &json!({}))).expect("apply object");
    mirror.converge(&server, "v1", "services").await;

    // timeoutSeconds ends the stream cleanly.
    let api = Api::<Service>::all(client);
    let wp = WatchParams::default().disable_bookmarks().timeout(1);
    let rv = server.resource_version().to_string();
    let events: Vec<_> =
        tokio::time::timeout(WAIT, api.watch(&wp, &rv).await.expect("start watch").collect::<Vec<_>>())
            .await
            .expect("start watch");
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn endpoint_slices_and_cluster_scoped_kinds() {
    let server = ApiServer::start();
    let slice = |ns: &str, name: &str, ip: &str| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": "a"}},
               "addressType": "IPv4", "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    };
    server.apply(slice("default", "a-1", "10.0.0.1")).expect("apply object");
    server.apply(slice("other", "a-1", "10.0.0.2")).expect("apply object");
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))
        .expect("apply object");
    let client = client(&server).await;
    let mut mirror = Mirror::start(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default(),
    );
    mirror.wait("default slices only", |v| v.objects.keys().eq(["default/a-1"])).await;
    server.apply(slice("default", "a-1", "10.0.0.3")).expect("apply object");
    server.apply(slice("other", "a-1", "10.0.0.4")).expect("apply object");
    let rv =
        server.get("discovery.k8s.io/v1", "EndpointSlice", Some("default"), "a-1").expect("get")["metadata"]
            ["resourceVersion"]
            .as_str()
            .expect("resourceVersion")
            .to_owned();
    mirror.wait("slice update", |v| v.objects.get("default/a-1") == Some(&rv)).await;
    assert!(server.wait_for_async(&ResourceId::endpoint_slices(), WAIT, |s| s.open_watches == 1).await);

    let nodes = Api::<Node>::all(client);
    let list = nodes.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(nodes.get("n1").await.expect("get").metadata.namespace, None);
    // Typed apply and delete.
    let mut node = list.items[0].clone();
    node.metadata.labels = Some([("zone".to_owned(), "a".to_owned())].into());
    server.apply(&node).expect("apply object");
    assert_eq!(nodes.get("n1").await.expect("get").labels()["zone"], "a");
    server.delete_of::<Node>(None, "n1").expect("delete object");
    assert!(nodes.list(&ListParams::default()).await.expect("list").items.is_empty());
}

#[test]
fn unknown_kinds_are_served_generically() {
    let server = ApiServer::start();
    let widget = json!({"apiVersion": "example.com/v1alpha1", "kind": "Widget",
                        "metadata": {"name": "w", "namespace": "ns"}, "spec": {"size": 3}});
    server.apply(&widget).expect("apply a CRD object");
    let list = raw_request(&server, "/apis/example.com/v1alpha1/namespaces/ns/widgets", true);
    assert!(list.starts_with("HTTP/1.1 200") && list.contains(r#""kind":"WidgetList""#), "{list}");
    assert!(list.contains(r#""size":3"#), "{list}");
    let one = raw_request(&server, "/apis/example.com/v1alpha1/namespaces/ns/widgets/w", true);
    assert!(one.contains(r#""uid":"#) && one.contains(r#""generation":1"#), "{one}");
    server.register(ferry_test_apiserver::ResourceType::new(
        "example.com",
        "v1alpha1",
        "gizmos",
        "Gizmo",
        false,
    ));
    let empty = raw_request(&server, "/apis/example.com/v1alpha1/gizmos", true);
    assert!(empty.contains(r#""items":[]"#), "{empty}");
}

#[test]
fn benchmark_binary_serves_and_churns() {
    use std::{
        io::BufRead,
        process::{Command, Stdio},
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-test-apiserver"))
        .args(["--services", "20", "--endpoints-per-service", "3", "--churn-ms", "5", "--churn-count", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let stdout = child.stdout.take().expect("stdout");
    let lines: Vec<String> =
        std::io::BufReader::new(stdout).lines().take(5).map(|l| l.expect("line")).collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines[0].starts_with("listening http://127.0.0.1:"), "{lines:?}");
    assert!(lines[1].starts_with("loaded services=20 endpoints=60 resourceVersion=41"), "{lines:?}");
    assert!(lines[2..].iter().all(|l| l.starts_with("change unix_nanos=")), "{lines:?}");
    assert!(lines[4].ends_with("resourceVersion=44"), "{lines:?}");
}

/// The benchmark's scale: 10,000 Services and 10,000 EndpointSlices (100,000 endpoints) synced by
/// two kube-runtime watchers, then churn. Slow in debug builds: run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale test (about 10 s in a debug build)"]
async fn scale_10k_services_100k_endpoints() {
    let server = ApiServer::start();
    let started = std::time::Instant::now();
    server.apply_all(ferry_test_apiserver::fixtures::cluster("default", 10_000, 10)).expect("load");
    eprintln!("loaded in {:?}", started.elapsed());
    let client = client(&server).await;
    let started = std::time::Instant::now();
    let mut svcs = Mirror::start(Api::<Service>::all(client.clone()), watcher::Config::default());
    let mut slices = Mirror::start(Api::<EndpointSlice>::all(client), watcher::Config::default());
    svcs.wait("10k services", |v| v.objects.len() == 10_000).await;
    slices.wait("10k slices", |v| v.objects.len() == 10_000).await;
    eprintln!("synced in {:?}", started.elapsed());
    assert_eq!(server.stats(&ResourceId::endpoint_slices()).lists, 20);
    let started = std::time::Instant::now();
    for i in 0..100 {
        let name = ferry_test_apiserver::fixtures::service_name(i);
        let mut addrs = ferry_test_apiserver::fixtures::endpoint_addresses(i, 10);
        addrs[0] = std::net::Ipv4Addr::new(10, 200, 0, i as u8);
        let slice = ferry_test_apiserver::fixtures::endpoint_slice(
            "default",
            &name,
            &format!("{name}-abcde"),
            &addrs,
        );
        server.apply(slice).expect("churn");
    }
    slices.converge(&server, "discovery.k8s.io/v1", "endpointslices").await;
    eprintln!("100 changes seen in {:?}", started.elapsed());
}
