//! Tests of the file source: initial sync, hot reload, broken reloads, ConfigMap swaps, explicit
//! reloads and name resolution. Every wait is bounded by `WAIT`.

use std::{net::SocketAddr, time::Duration};

use ferry_model::{ServiceKey, Snapshot};
use tokio::task::JoinHandle;

use super::*;
use crate::{publish, publish::Snapshots, test_util::TempDir};

const WAIT: Duration = Duration::from_secs(10);

fn listener(name: &str, address: &str, backends: &[&str]) -> String {
    format!(
        "apiVersion: ferry.ethercluster.io/v1alpha1\nkind: Listener\nmetadata: {{name: {name}}}\n\
         spec:\n  address: {address:?}\n  backends: {backends:?}\n"
    )
}

struct Running {
    snapshots: Snapshots,
    handle: ReloadHandle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

async fn start(dir: &Path, options: FileSourceOptions) -> Running {
    let (source, handle) = FileSource::new(dir, options);
    let (publisher, snapshots) = publish::publisher();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(publisher, shutdown.clone()));
    tokio::time::timeout(WAIT, snapshots.wait_ready()).await.expect("ready in time");
    Running { snapshots, handle, shutdown, task }
}

fn quick() -> FileSourceOptions {
    FileSourceOptions { debounce: Duration::from_millis(50), ..FileSourceOptions::default() }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task).await.expect("stops in time").expect("join");
        result.expect("source ran cleanly");
    }

    /// Waits for the load counters to satisfy `f`.
    async fn status(&self, f: impl Fn(&ReloadStatus) -> bool) -> ReloadStatus {
        let mut rx = self.handle.status();
        let s =
            tokio::time::timeout(WAIT, rx.wait_for(|s| f(s))).await.expect("status in time").expect("open");
        s.clone()
    }
}

async fn next(rx: &mut watch::Receiver<Arc<Snapshot>>) -> Arc<Snapshot> {
    tokio::time::timeout(WAIT, rx.changed()).await.expect("snapshot in time").expect("open");
    rx.borrow_and_update().clone()
}

fn backends(s: &Arc<Snapshot>, name: &str) -> Vec<SocketAddr> {
    let svc = s.service(&ServiceKey::new("", name)).expect("service");
    svc.ports[0].endpoints.all.iter().map(|e| e.addr).collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[tokio::test]
async fn hot_reload_keeps_last_good_snapshot() {
    let dir = TempDir::new();
    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.1:80"]));
    let r = start(dir.path(), quick()).await;
    let mut rx = r.snapshots.subscribe();
    let first = r.snapshots.current();
    assert_eq!(backends(&first, "web"), [addr("10.0.0.1:80")]);

    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.2:80"]));
    let second = next(&mut rx).await;
    assert!(second.version > first.version);
    assert_eq!(backends(&second, "web"), [addr("10.0.0.2:80")]);
    assert_eq!(r.snapshots.current().version, second.version, "ArcSwap stored before the send");

    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.3:99999"]));
    let status = r.status(|s| s.failures >= 1).await;
    let err = status.last_error.expect("the problems are kept");
    assert_eq!(err.problems[0].field.as_deref(), Some("spec.backends[0]"));
    assert!(!rx.has_changed().expect("open"), "a broken reload publishes nothing");
    assert_eq!(r.snapshots.current().version, second.version);

    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.4:80"]));
    let third = next(&mut rx).await;
    assert_eq!(backends(&third, "web"), [addr("10.0.0.4:80")]);
    assert!(r.handle.status().borrow().last_error.is_none());

    std::fs::remove_file(dir.path().join("web.yaml")).expect("remove");
    let fourth = next(&mut rx).await;
    assert!(fourth.services.is_empty(), "a removed file deletes its objects");
    r.stop().await;
}

#[tokio::test]
async fn configmap_data_swap_triggers_a_reload() {
    let dir = TempDir::new();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).expect("mkdir");
    std::fs::write(d.join("..v1/web.yaml"), listener("web", "127.0.0.1:8080", &["10.0.0.1:80"]))
        .expect("write");
    std::os::unix::fs::symlink("..v1", d.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/web.yaml", d.join("web.yaml")).expect("symlink");
    let r = start(d, quick()).await;
    let mut rx = r.snapshots.subscribe();
    assert_eq!(backends(&r.snapshots.current(), "web"), [addr("10.0.0.1:80")]);

    // What the kubelet does: write a new timestamped dir, point a temp link at it, rename over `..data`.
    std::fs::create_dir(d.join("..v2")).expect("mkdir");
    std::fs::write(d.join("..v2/web.yaml"), listener("web", "127.0.0.1:8080", &["10.0.0.2:80"]))
        .expect("write");
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).expect("symlink");
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("rename");
    std::fs::remove_dir_all(d.join("..v1")).expect("rm old");
    let next = next(&mut rx).await;
    assert_eq!(backends(&next, "web"), [addr("10.0.0.2:80")]);
    r.stop().await;
}

#[tokio::test]
async fn reload_handle_picks_up_changes_without_events() {
    // The visible file links to a file outside the watched directory, so editing it makes no event.
    let outside = TempDir::new();
    let target = outside.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.1:80"]));
    let dir = TempDir::new();
    std::os::unix::fs::symlink(&target, dir.path().join("web.yaml")).expect("symlink");
    let r = start(dir.path(), quick()).await;
    let mut rx = r.snapshots.subscribe();

    outside.write("web.yaml", &listener("web", "127.0.0.1:8080", &["10.0.0.2:80"]));
    r.handle.reload();
    assert_eq!(backends(&next(&mut rx).await, "web"), [addr("10.0.0.2:80")]);

    // An identical reload succeeds and publishes nothing.
    let loads = r.handle.status().borrow().loads;
    r.handle.reload();
    r.status(|s| s.loads > loads).await;
    assert!(!rx.has_changed().expect("open"));
    r.stop().await;
}

#[tokio::test]
async fn backend_names_resolve() {
    let dir = TempDir::new();
    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["localhost:9000", "10.0.0.1:80"]));
    let r = start(dir.path(), quick()).await;
    let got = backends(&r.snapshots.current(), "web");
    assert!(got.contains(&addr("10.0.0.1:80")));
    assert!(
        got.contains(&addr("127.0.0.1:9000")) || got.contains(&addr("[::1]:9000")),
        "localhost resolved in the initial sync: {got:?}"
    );

    // A name added by a reload is resolved before that reload publishes.
    let mut rx = r.snapshots.subscribe();
    dir.write("web.yaml", &listener("web", "127.0.0.1:8080", &["localhost:9001"]));
    let got = backends(&next(&mut rx).await, "web");
    assert!(!got.is_empty() && got.iter().all(|a| a.port() == 9001 && a.ip().is_loopback()), "{got:?}");
    r.stop().await;
}

#[tokio::test]
async fn kubernetes_objects_and_node() {
    let dir = TempDir::new();
    dir.write(
        "k8s.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: api}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    );
    let options = FileSourceOptions { node: Some("node-a".to_owned()), ..quick() };
    let r = start(dir.path(), options).await;
    let s = r.snapshots.current();
    let node = s.node.as_ref().expect("node");
    assert_eq!((&*node.name, node.zone.as_deref()), ("node-a", Some("z1")));
    assert!(s.service(&ServiceKey::new("default", "api")).is_some());

    let mut rx = r.snapshots.subscribe();
    dir.write("k8s.yaml", "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n");
    let s = next(&mut rx).await;
    assert!(s.services.is_empty(), "the Service was deleted");
    let node = s.node.as_ref().expect("node");
    assert_eq!((&*node.name, node.zone.as_deref()), ("node-a", None), "own name, no zone");
    r.stop().await;
}

#[tokio::test]
async fn initial_load_failure_is_returned() {
    let dir = TempDir::new();
    dir.write("web.yaml", "apiVersion: v1\nkind: Pod\n");
    let (source, handle) = FileSource::new(dir.path(), quick());
    let (publisher, snapshots) = publish::publisher();
    let result = tokio::time::timeout(WAIT, source.run(publisher, CancellationToken::new()))
        .await
        .expect("fails fast");
    let err = result.expect_err("initial load fails");
    assert!(err.to_string().contains("web.yaml: document 1 (Pod): kind:"), "{err}");
    assert!(!snapshots.ready());
    assert_eq!(handle.status().borrow().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn debounce_waits_for_quiet_but_is_capped() {
    let events = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let quiet = Duration::from_millis(200);

    // A short burst: done `quiet` after the last event.
    let start = Instant::now();
    let burst = tokio::spawn({
        let events = events.clone();
        async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                events.notify_one();
            }
        }
    });
    assert!(debounce(&events, quiet, &shutdown).await);
    assert_eq!(start.elapsed(), Duration::from_millis(350));
    burst.await.expect("join");

    // A constant stream: done after MAX_DEBOUNCE anyway.
    let start = Instant::now();
    let stream = tokio::spawn({
        let events = events.clone();
        async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                events.notify_one();
            }
        }
    });
    assert!(debounce(&events, quiet, &shutdown).await);
    assert_eq!(start.elapsed(), MAX_DEBOUNCE);
    stream.abort();

    shutdown.cancel();
    assert!(!debounce(&events, quiet, &shutdown).await, "shutdown wins");
}
