//! [`KubeSource`] against the test API server (real list/watch over HTTP, in this process).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_model::ServiceKey;
use ferry_test_apiserver::ApiServer;
use serde_json::{Value, json};

use super::*;
use crate::{publish::Snapshots, test_util::TempDir};

const DEADLINE: Duration = Duration::from_secs(15);

#[test]
fn selector_is_kube_proxys() {
    assert_eq!(
        proxy_selector(None),
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
    assert_eq!(
        proxy_selector(Some("ferry")),
        "service.kubernetes.io/service-proxy-name=ferry,!service.kubernetes.io/headless"
    );
}

fn service(name: &str, ip: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

struct Running {
    api: ApiServer,
    snapshots: Snapshots,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

async fn run(api: ApiServer, proxy_name: Option<&str>, min_sync_period: Duration) -> Running {
    let dir = TempDir::new();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let source = KubeSource::connect(KubeSourceOptions {
        client: ClientConfig::Kubeconfig(kubeconfig),
        node: "node-a".to_owned(),
        proxy_name: proxy_name.map(str::to_owned),
        min_sync_period,
        all_services: false,
    })
    .await
    .expect("connect");
    let (publisher, snapshots) = crate::publisher();
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(publisher, stop.clone()));
    Running { api, snapshots, stop, task, _dir: dir }
}

impl Running {
    async fn wait(
        &self,
        what: &str,
        pred: impl Fn(&ferry_model::Snapshot) -> bool,
    ) -> Arc<ferry_model::Snapshot> {
        let start = Instant::now();
        let mut rx = self.snapshots.subscribe();
        loop {
            let current = self.snapshots.current();
            if self.snapshots.ready() && pred(&current) {
                return current;
            }
            let left = DEADLINE.checked_sub(start.elapsed()).unwrap_or_else(|| panic!("never: {what}"));
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("source task");
    }
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

/// kube-proxy's selector is applied at the API server: another proxy's and headless Services are
/// never seen; a named proxy sees exactly its own.
#[tokio::test(flavor = "multi_thread")]
async fn watches_with_kube_proxys_selector() {
    let api = ApiServer::start();
    api.apply(service("mine", "10.96.0.1", &json!({}))).expect("apply");
    api.apply(service("other", "10.96.0.2", &json!({SERVICE_PROXY_NAME: "ferry"}))).expect("apply");
    api.apply(service("headless", "None", &json!({HEADLESS: ""}))).expect("apply");
    let default = run(api, None, Duration::ZERO).await;
    let snap = default.wait("first snapshot", |_| true).await;
    let keys: Vec<_> = snap.services.keys().cloned().collect();
    assert_eq!(keys, [key("mine")]);
    let api = {
        default.stop.cancel();
        default.task.await.expect("task");
        default.api
    };
    let named = run(api, Some("ferry"), Duration::ZERO).await;
    let snap = named.wait("first snapshot", |_| true).await;
    let keys: Vec<_> = snap.services.keys().cloned().collect();
    assert_eq!(keys, [key("other")]);
    named.stop().await;
}

/// A burst inside `min_sync_period` is one publish; a lone change after a quiet period is not
/// held back by the period.
#[tokio::test(flavor = "multi_thread")]
async fn bursts_coalesce_and_lone_changes_apply_at_once() {
    let period = Duration::from_secs(3);
    let api = ApiServer::start();
    api.apply(service("first", "10.96.0.1", &json!({}))).expect("apply");
    let r = run(api, None, period).await;
    let first = r.wait("first snapshot", |s| s.services.len() == 1).await;

    // Right after the first publish: 20 Services, written one by one.
    for i in 0..20 {
        r.api
            .apply(service(&format!("burst-{i}"), &format!("10.96.1.{}", i + 1), &json!({})))
            .expect("apply");
    }
    let burst = r.wait("the burst", |s| s.version > first.version).await;
    assert_eq!(burst.version, first.version + 1, "the burst was published more than once");
    assert_eq!(burst.services.len(), 21, "the burst was split");

    // Quiet for longer than the period, then one change: published without waiting for it.
    tokio::time::sleep(period + Duration::from_millis(200)).await;
    let start = Instant::now();
    r.api.apply(service("lone", "10.96.2.1", &json!({}))).expect("apply");
    r.wait("the lone change", |s| s.services.contains_key(&key("lone"))).await;
    assert!(start.elapsed() < period / 2, "a lone change waited {:?}", start.elapsed());
    r.stop().await;
}

/// A relist after 410 deletes what was removed while the watch was down, and the first snapshot
/// waits for every kind.
#[tokio::test(flavor = "multi_thread")]
async fn relist_after_410_deletes_what_is_gone() {
    let api = ApiServer::start();
    api.apply(service("stays", "10.96.0.1", &json!({}))).expect("apply");
    api.apply(service("goes", "10.96.0.2", &json!({}))).expect("apply");
    let r = run(api, None, Duration::ZERO).await;
    let first = r.wait("first snapshot", |s| s.services.len() == 2).await;
    assert!(first.node.as_ref().is_some_and(|n| &*n.name == "node-a"));

    r.api.set_unavailable(true);
    r.api.disconnect_watches();
    r.api.delete("v1", "services", Some("default"), "goes").expect("delete");
    r.api.compact();
    r.api.set_unavailable(false);
    let after = r.wait("the relist", |s| s.services.len() == 1).await;
    assert!(after.services.contains_key(&key("stays")));
    let services = ferry_test_apiserver::ResourceId::core("services");
    assert_eq!(r.api.stats(&services).lists, 2, "one initial list and one relist after 410");
    r.stop().await;
}
