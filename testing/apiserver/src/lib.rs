//! A test Kubernetes API server that speaks the real list/watch HTTP protocol, for Ferry's tests and
//! benchmarks of its Kubernetes source (kube-rs watcher).
//!
//! [`ApiServer::start`] serves plain HTTP on `127.0.0.1:0` from its own thread and tokio runtime, so
//! the control methods are synchronous and callable from sync tests and from inside any tokio
//! runtime. Clients reach it through [`ApiServer::kubeconfig`] (bearer-token user).
//!
//! Wire behaviour follows kube-apiserver:
//! - one global, monotonically increasing resourceVersion across all kinds (like etcd revisions);
//! - LIST with `limit`/`continue` pagination over a consistent snapshot, `resourceVersion` +
//!   `resourceVersionMatch` (unset / `0` / `NotOlderThan` / `Exact`), items without `kind`/`apiVersion`;
//!   a continue token or exact revision older than the compaction point gets 410 `Expired`;
//! - WATCH (`watch=true|1`) as a chunked stream of `{"type":..,"object":..}` lines strictly after the
//!   given resourceVersion; 410 as an `ERROR` event when it is compacted; `BOOKMARK`s when
//!   `allowWatchBookmarks=true` (periodic and on demand); `sendInitialEvents=true` streaming lists;
//!   `timeoutSeconds`; label selectors (set-based) and `metadata.name`/`metadata.namespace` field
//!   selectors, with objects entering or leaving a watch's selector sent as `ADDED`/`DELETED`.
//!
//! Test controls: cut watches ([`ApiServer::disconnect_watches`], [`ApiServer::disconnect_mid_event`]),
//! [`ApiServer::compact`], [`ApiServer::stop`]/[`ApiServer::restart`] on the same port,
//! [`ApiServer::set_unavailable`] (503s), bookmarks, and request counters with bounded waits.
//!
//! ```
//! use std::time::Duration;
//!
//! use ferry_test_apiserver::{ApiServer, ResourceId};
//! use serde_json::json;
//!
//! let server = ApiServer::start();
//! let rv = server
//!     .apply(json!({"apiVersion": "v1", "kind": "Service",
//!                   "metadata": {"name": "web", "namespace": "default"},
//!                   "spec": {"ports": [{"port": 80}]}}))
//!     .expect("a valid object");
//! assert_eq!(rv, server.resource_version());
//! let kubeconfig = server.kubeconfig(); // hand this to kube::Config::from_custom_kubeconfig
//! assert!(kubeconfig.contains(&server.url()));
//! // A client that lists and watches Services shows up in the counters:
//! let services = ResourceId::core("services");
//! assert!(!server.wait_for_open_watches(&services, 1, Duration::from_millis(10)));
//! ```

pub mod fixtures;
mod resource;
mod selector;
mod server;
mod store;
mod watch;

use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

pub use crate::resource::{ResourceId, ResourceType};
use crate::server::{Shared, StopTx};

/// The bearer token the kubeconfig carries and the server requires.
pub const TOKEN: &str = "ferry-test-token";

/// Default interval of periodic watch bookmarks.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Request counters for one resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceStats {
    /// LIST requests served (any outcome after authentication).
    pub lists: u64,
    /// WATCH requests served (any outcome after authentication).
    pub watches: u64,
    /// Watch streams open right now.
    pub open_watches: u64,
    /// GETs of single objects.
    pub gets: u64,
}

/// Why a write from the test was refused. Nothing was written; fix the object and retry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The object did not serialize to a JSON object.
    #[error("object is not a JSON object")]
    NotAnObject,
    /// A required field is missing or empty.
    #[error("object lacks {0}")]
    MissingField(&'static str),
    /// Serializing the object failed.
    #[error("object does not serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    /// No such resource type is registered.
    #[error("unknown resource {api_version} {resource}")]
    UnknownResource {
        /// The apiVersion asked for.
        api_version: String,
        /// The plural or kind asked for.
        resource: String,
    },
    /// The object to delete does not exist.
    #[error("object {0} not found")]
    NotFound(String),
}

/// A running test API server. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    listening: Mutex<Option<StopTx>>,
}

// === impl ApiServer ===

impl ApiServer {
    /// Starts a server on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If the runtime cannot be built or loopback cannot be bound (a broken test host).
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("start the test API server on 127.0.0.1:0")
    }

    /// Starts a server on `addr` (port 0 picks a free one).
    pub fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-test-apiserver")
            .enable_all()
            .build()?;
        let listener = StdTcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(TOKEN.to_owned(), DEFAULT_BOOKMARK_INTERVAL));
        let server = Self { shared, runtime: Some(runtime), addr, listening: Mutex::new(None) };
        server.serve(listener)?;
        tracing::debug!(%addr, "test API server started");
        Ok(server)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn serve(&self, listener: StdTcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = {
            let _guard = self.runtime().enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        self.runtime().spawn(server::accept_loop(listener, self.shared.clone(), stop_rx));
        *self.listening.lock() = Some(stop_tx);
        Ok(())
    }

    /// The bound address (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) for this server: a token user, current-context `ferry-test`, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: ferry-test
  cluster:
    server: {url}
users:
- name: ferry-test
  user:
    token: {TOKEN}
contexts:
- name: ferry-test
  context:
    cluster: ferry-test
    user: ferry-test
    namespace: default
current-context: ferry-test
preferences: {{}}
",
            url = self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Serves an extra resource type (or replaces one with the same id). Unknown kinds are also
    /// learnt on their first [`Self::apply`], with a guessed plural.
    pub fn register(&self, ty: ResourceType) {
        self.shared.store.lock().register(ty);
    }

    /// Creates or replaces an object (a `serde_json::Value` or any k8s-openapi object): emits
    /// `ADDED` or `MODIFIED` (nothing for an identical object). Fills in `metadata.resourceVersion`,
    /// `uid`, `creationTimestamp`, `generation` and, for namespaced kinds, `namespace: default` if
    /// unset. Returns the resourceVersion after the write.
    pub fn apply(&self, obj: impl Serialize) -> Result<u64, ApplyError> {
        let obj = serde_json::to_value(obj)?;
        let rv = self.shared.store.lock().apply(obj)?;
        self.shared.rv_tx.send_replace(rv);
        Ok(rv)
    }

    /// Applies many objects (one resourceVersion each, like separate writes), waking watches once.
    /// Stops at the first refused object; the ones before it stay written.
    pub fn apply_all<T: Serialize>(&self, objs: impl IntoIterator<Item = T>) -> Result<u64, ApplyError> {
        let values = objs.into_iter().map(serde_json::to_value).collect::<Result<Vec<Value>, _>>()?;
        let (result, rv) = {
            let mut store = self.shared.store.lock();
            let result = values.into_iter().try_for_each(|v| store.apply(v).map(drop));
            (result, store.rv())
        };
        // Wake watches even after a refused object: the ones before it are written.
        self.shared.rv_tx.send_replace(rv);
        result.map(|()| rv)
    }

    /// Deletes an object given its apiVersion (`v1`, `discovery.k8s.io/v1`), plural or kind, namespace
    /// (`None` for cluster-scoped) and name; emits `DELETED`. Returns the deletion's resourceVersion.
    pub fn delete(
        &self,
        api_version: &str,
        plural_or_kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<u64, ApplyError> {
        let rv = {
            let mut store = self.shared.store.lock();
            let res = store.registry.find(api_version, plural_or_kind).ok_or_else(|| {
                ApplyError::UnknownResource {
                    api_version: api_version.to_owned(),
                    resource: plural_or_kind.to_owned(),
                }
            })?;
            let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
            store.delete(res, &key).ok_or_else(|| ApplyError::NotFound(format!("{}/{}", key.0, key.1)))?
        };
        self.shared.rv_tx.send_replace(rv);
        Ok(rv)
    }

    /// [`Self::delete`] for a k8s-openapi type.
    pub fn delete_of<K: k8s_openapi::Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<u64, ApplyError> {
        self.delete(K::API_VERSION, K::URL_PATH_SEGMENT, namespace, name)
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        plural_or_kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = self.shared.store.lock();
        let res = store.registry.find(api_version, plural_or_kind)?;
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        store.get(res, &key).map(|o| (*o).clone())
    }

    /// All stored objects of a resource (by apiVersion and plural or kind), in key order.
    pub fn list(&self, api_version: &str, plural_or_kind: &str) -> Vec<Value> {
        let store = self.shared.store.lock();
        let Some(res) = store.registry.find(api_version, plural_or_kind) else { return Vec::new() };
        store.objects(res).map(|m| m.values().map(|o| (**o).clone()).collect()).unwrap_or_default()
    }

    /// The stored object of a k8s-openapi type, if any (and if it deserializes).
    pub fn get_of<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + serde::de::DeserializeOwned,
    {
        let obj = self.get(K::API_VERSION, K::URL_PATH_SEGMENT, namespace, name)?;
        serde_json::from_value(obj).ok()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().rv()
    }

    /// Cuts every open watch stream now: the connection closes without the final chunk, and events
    /// not yet written to a stream are not (the client must resume from its last resourceVersion).
    pub fn disconnect_watches(&self) {
        self.shared.control.send_modify(|c| c.disconnect += 1);
    }

    /// Makes every open watch stream write only the first half of its next object event's JSON line,
    /// then closes its connection.
    pub fn disconnect_mid_event(&self) {
        self.shared.control.send_modify(|c| c.cut += 1);
    }

    /// Forgets all history up to now: a watch from an older resourceVersion gets a 410 `ERROR` event,
    /// older continue tokens and exact-revision lists get 410.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// Sets how many events the history keeps before compacting its oldest half away (default
    /// 100,000), like etcd's periodic compaction bounds memory; watches that fall that far behind
    /// get 410.
    pub fn set_history_limit(&self, events: usize) {
        self.shared.store.lock().set_history_limit(events);
    }

    /// Closes the listener and all connections: clients get "connection refused" until
    /// [`Self::restart`]. Objects are kept. No-op when already stopped.
    pub fn stop(&self) {
        let Some(stop_tx) = self.listening.lock().take() else { return };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if stop_tx.send(done_tx).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
        tracing::debug!(addr = %self.addr, "test API server stopped");
    }

    /// Starts serving again on the same port with the same objects, like an API server restart:
    /// history is compacted (watches from before get 410), the resourceVersion continues. Stops
    /// first if running.
    pub fn restart(&self) -> io::Result<()> {
        self.stop();
        self.compact();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match StdTcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        self.serve(listener)?;
        tracing::debug!(addr = %self.addr, "test API server restarted");
        Ok(())
    }

    /// While `true`, every request is answered with 503 and a `ServiceUnavailable` Status.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Number of requests answered with 503 so far.
    pub fn unavailable_responses(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Sends a bookmark now on every watch that allows bookmarks.
    pub fn bookmark_now(&self) {
        self.shared.control.send_modify(|c| c.bookmark += 1);
    }

    /// Sets the interval of periodic bookmarks (default [`DEFAULT_BOOKMARK_INTERVAL`]).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.control.send_modify(|c| c.bookmark_interval = interval.max(Duration::from_millis(1)));
    }

    /// Request counters of a resource.
    pub fn stats(&self, id: &ResourceId) -> ResourceStats {
        self.shared.stats.lock().get(id).copied().unwrap_or_default()
    }

    /// Blocks until `pred` holds for the counters of `id`, at most `timeout`; returns whether it held.
    /// Blocks the calling thread: from async code use [`Self::wait_for_async`].
    pub fn wait_for(
        &self,
        id: &ResourceId,
        timeout: Duration,
        mut pred: impl FnMut(&ResourceStats) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut stats = self.shared.stats.lock();
        loop {
            if pred(&stats.get(id).copied().unwrap_or_default()) {
                return true;
            }
            if self.shared.stats_cv.wait_until(&mut stats, deadline).timed_out() {
                return pred(&stats.get(id).copied().unwrap_or_default());
            }
        }
    }

    /// Waits until `pred` holds for the counters of `id`, at most `timeout`; returns whether it held.
    pub async fn wait_for_async(
        &self,
        id: &ResourceId,
        timeout: Duration,
        mut pred: impl FnMut(&ResourceStats) -> bool,
    ) -> bool {
        let mut rx = self.shared.stats_tx.subscribe();
        let check = tokio::time::timeout(timeout, async {
            loop {
                rx.borrow_and_update();
                if pred(&self.stats(id)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
        check.await.is_ok()
    }

    /// Waits until at least `n` watches of `id` are open, at most `timeout`.
    pub async fn wait_for_open_watches_async(&self, id: &ResourceId, n: u64, timeout: Duration) -> bool {
        self.wait_for_async(id, timeout, |s| s.open_watches >= n).await
    }

    /// Blocks until at least `n` watches of `id` are open, at most `timeout`.
    pub fn wait_for_open_watches(&self, id: &ResourceId, n: u64, timeout: Duration) -> bool {
        self.wait_for(id, timeout, |s| s.open_watches >= n)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ApiServer>();
    }

    #[test]
    fn typed_get_and_delete() {
        use k8s_openapi::api::core::v1::Node;
        let server = ApiServer::start();
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}});
        let rv = server.apply(&node).expect("apply");
        let got: Node = server.get_of(None, "n1").expect("stored");
        assert_eq!(got.metadata.resource_version, Some(rv.to_string()));
        assert_eq!(server.delete_of::<Node>(None, "n1").expect("delete"), rv + 1);
        assert!(matches!(server.delete_of::<Node>(None, "n1"), Err(ApplyError::NotFound(_))));
        assert!(matches!(
            server.apply(serde_json::json!({"kind": "Node"})),
            Err(ApplyError::MissingField(_))
        ));
    }
}
