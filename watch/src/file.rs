//! [`FileSource`]: a directory of manifests as the source of the desired state.
//!
//! The source owns the [`Index`] and the [`Publisher`]. It loads the directory once (that load must
//! succeed: it is the initial sync), then reloads when the directory changes (an inotify watch on
//! the directory itself, read on the runtime, debounced) or when [`ReloadHandle::reload`] is called
//! (SIGHUP). A reload that finds any problem changes nothing: the index and the published snapshot
//! stay at the last good load. A good reload applies new and changed objects and deletes missing ones; an identical
//! reload publishes nothing.
//!
//! Backend host names of listeners are resolved on the initial load, when a reload adds a name,
//! and every `resolve_interval`; a failed lookup keeps the previous addresses.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use ferry_model::{Index, NodeInfo, NodeStatus, ServiceKey};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use crate::{
    manifest::{self, ConfigError, Manifests},
    publish::Publisher,
};

/// Upper bound on one name lookup.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on how long a constant stream of events can delay a reload.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// Options of a [`FileSource`].
#[derive(Clone, Debug)]
pub struct FileSourceOptions {
    /// This node's name: picks the `Node` manifest whose zone drives topology. `None`: standalone.
    pub node: Option<String>,
    /// Quiet time after a file event before reloading (a constant stream reloads at least every
    /// `max(debounce, 1s)`).
    pub debounce: Duration,
    /// How often backend host names are re-resolved.
    pub resolve_interval: Duration,
    /// This proxy's `service.kubernetes.io/service-proxy-name`: `None` handles Services without
    /// the label (kube-proxy's default); a name handles only Services labelled with it.
    pub proxy_name: Option<String>,
}

/// Loads, watches and reloads a manifest directory. Consumed by [`FileSource::run`].
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    options: FileSourceOptions,
    reload: Arc<Notify>,
    status: watch::Sender<ReloadStatus>,
}

/// Asks a running [`FileSource`] to reload, and reports how loads went.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    reload: Arc<Notify>,
    status: watch::Receiver<ReloadStatus>,
}

/// Counts of loads, updated after every attempt.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ReloadStatus {
    /// Successful loads, the initial one included.
    pub loads: u64,
    /// Failed loads, the initial one included.
    pub failures: u64,
    /// The problems of the last load, if it failed.
    pub last_error: Option<Arc<ConfigError>>,
}

/// Why a [`FileSource`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The initial load failed; nothing was published. Retrying only helps once the files are fixed.
    #[error("initial load of manifests failed: {0}")]
    InitialLoad(#[from] ConfigError),
}

// === impl FileSourceOptions ===

impl Default for FileSourceOptions {
    fn default() -> Self {
        Self {
            node: None,
            debounce: Duration::from_millis(200),
            resolve_interval: Duration::from_secs(30),
            proxy_name: None,
        }
    }
}

// === impl ReloadHandle ===

impl ReloadHandle {
    /// Requests a reload. Requests made while a reload is pending coalesce into one.
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// The load counters; changes after every load attempt.
    pub fn status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.clone()
    }
}

// === impl FileSource ===

impl FileSource {
    /// A source for the manifests in `dir`, and the handle that triggers its reloads.
    pub fn new(dir: impl Into<PathBuf>, options: FileSourceOptions) -> (Self, ReloadHandle) {
        let reload = Arc::new(Notify::new());
        let (status, status_rx) = watch::channel(ReloadStatus::default());
        let handle = ReloadHandle { reload: reload.clone(), status: status_rx };
        (Self { dir: dir.into(), options, reload, status }, handle)
    }

    /// Loads the directory, publishes the first snapshot, then reloads and re-resolves until
    /// `shutdown`. Returns an error only if the initial load fails.
    pub async fn run(self, publisher: Publisher, shutdown: CancellationToken) -> Result<(), SourceError> {
        // Watch before the first load so that no change after it is missed.
        let events = Arc::new(Notify::new());
        let _watcher = watch_dir(&self.dir, events.clone());
        let manifests = manifest::load_dir(&self.dir).inspect_err(|e| self.failed(e))?;

        let mut index = Index::new(None);
        index.set_proxy_name(self.options.proxy_name.as_deref());
        let mut state = State {
            dir: self.dir.clone(),
            node: self.options.node.clone(),
            index,
            publisher,
            status: self.status.clone(),
            keys: Keys::default(),
            names: BTreeSet::new(),
        };
        state.apply(manifests);
        state.resolve_new_names().await;
        let first = state.publisher.synced(&mut state.index);
        state.succeeded();
        tracing::info!(
            dir = %self.dir.display(),
            version = first.map(|s| s.version),
            listeners = state.keys.listeners.len(),
            services = state.keys.services.len(),
            "loaded manifests"
        );

        let interval = self.options.resolve_interval.max(Duration::from_millis(10));
        let mut resolve = tokio::time::interval_at(Instant::now() + interval, interval);
        resolve.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = self.reload.notified() => {
                    tracing::info!(dir = %self.dir.display(), "reload requested");
                    state.reload().await;
                }
                () = events.notified() => {
                    if !debounce(&events, self.options.debounce, &shutdown).await {
                        return Ok(());
                    }
                    state.reload().await;
                }
                _ = resolve.tick() => state.refresh_names().await,
            }
        }
    }

    fn failed(&self, error: &ConfigError) {
        log_failure(error);
        self.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(Arc::new(error.clone()));
        });
    }
}

/// Watches `dir` (not recursively) and signals `events` on every change in it; the returned task
/// reads the watch until it is dropped. Without a watcher (e.g. inotify limits), reloads still
/// happen through [`ReloadHandle::reload`].
///
/// The watch is an inotify descriptor on the runtime's reactor, not a watcher thread: with
/// `--worker-threads 1` the process stays single-threaded, which spares the kernel a file
/// reference count on every system call of the data plane (benches/README.md, node-compare).
#[cfg(target_os = "linux")]
fn watch_dir(dir: &Path, events: Arc<Notify>) -> Option<tokio_util::task::AbortOnDropHandle<()>> {
    use futures::StreamExt as _;
    use inotify::{Inotify, WatchMask};

    // Changes only: creating, writing, renaming, removing or re-permissioning a file, and the
    // directory itself going away. Reads (including our own) raise nothing.
    let mask = WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    let watched = Inotify::init().and_then(|inotify| {
        inotify.watches().add(dir, mask)?;
        inotify.into_event_stream(vec![0u8; 4096])
    });
    let mut stream = match watched {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "cannot watch manifest directory; reload with SIGHUP");
            return None;
        }
    };
    let dir = dir.to_path_buf();
    Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        // Every event is a change (or a queue overflow, which may hide one): reload.
        while let Some(event) = stream.next().await {
            events.notify_one();
            if let Err(error) = event {
                tracing::error!(dir = %dir.display(), %error, "file watch failed; reload with SIGHUP");
                return;
            }
        }
    })))
}

/// No file watch off Linux: reloads happen through [`ReloadHandle::reload`] (SIGHUP).
#[cfg(not(target_os = "linux"))]
fn watch_dir(dir: &Path, _events: Arc<Notify>) -> Option<()> {
    tracing::warn!(dir = %dir.display(), "no file watch on this platform; reload with SIGHUP");
    None
}

/// Waits until `events` has been quiet for `quiet`, or `max(quiet, MAX_DEBOUNCE)` has passed.
/// Returns `false` on shutdown.
async fn debounce(events: &Notify, quiet: Duration, shutdown: &CancellationToken) -> bool {
    let cap = Instant::now() + quiet.max(MAX_DEBOUNCE);
    loop {
        let deadline = (Instant::now() + quiet).min(cap);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep_until(deadline) => return true,
            () = events.notified() => {}
        }
    }
}

fn log_failure(error: &ConfigError) {
    for p in &error.problems {
        tracing::error!(
            file = %p.file.display(),
            document = p.document,
            item = p.item,
            object = p.object.as_deref(),
            field = p.field.as_deref(),
            message = %p.message,
            "invalid manifest"
        );
    }
    tracing::error!(
        dir = %error.dir.display(),
        problems = error.problems.len(),
        "manifests not loaded; keeping the last good configuration"
    );
    metrics::counter!("ferry_config_reload_failures_total").increment(1);
}

/// Keys of the objects applied by the last good load.
#[derive(Debug, Default)]
struct Keys {
    listeners: BTreeSet<ServiceKey>,
    services: BTreeSet<(String, String)>,
    endpoint_slices: BTreeSet<(String, String)>,
}

/// Everything the running source owns.
struct State {
    dir: PathBuf,
    node: Option<String>,
    index: Index,
    publisher: Publisher,
    status: watch::Sender<ReloadStatus>,
    keys: Keys,
    /// Names looked up at least once, so a reload resolves only new ones.
    names: BTreeSet<Arc<str>>,
}

// === impl State ===

impl State {
    async fn reload(&mut self) {
        let start = std::time::Instant::now();
        let manifests = match manifest::load_dir(&self.dir) {
            Ok(m) => m,
            Err(error) => {
                log_failure(&error);
                self.status.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(Arc::new(error));
                });
                return;
            }
        };
        self.apply(manifests);
        self.resolve_new_names().await;
        let published = self.publisher.publish(&mut self.index);
        self.succeeded();
        tracing::info!(
            dir = %self.dir.display(),
            version = published.map(|s| s.version),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "reloaded manifests"
        );
    }

    fn succeeded(&mut self) {
        metrics::counter!("ferry_config_reloads_total").increment(1);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        metrics::gauge!("ferry_config_last_reload_success_timestamp_seconds").set(now.as_secs_f64());
        self.status.send_modify(|s| {
            s.loads += 1;
            s.last_error = None;
        });
    }

    /// Makes the index hold exactly `m`: applies every object (the index ignores unchanged ones)
    /// and deletes what the previous load had and this one does not.
    fn apply(&mut self, m: Manifests) {
        let own = self
            .node
            .as_deref()
            .and_then(|name| m.nodes.iter().find(|(_, n)| n.metadata.name.as_deref() == Some(name)));
        let node = self.node.as_deref().map(|name| {
            own.map_or_else(|| NodeInfo { name: name.into(), zone: None }, |(_, n)| NodeInfo::from_node(n))
        });
        self.index.set_node(node);
        // Eligibility and addresses come only from a Node object (none: not eligible, as kube-proxy).
        self.index.set_node_status(own.map(|(_, n)| NodeStatus::from_node(n)));

        let mut keys = Keys::default();
        for (_, l) in m.listeners {
            keys.listeners.insert(l.key.clone());
            self.index.apply_listener(l);
        }
        for (_, svc) in &m.services {
            keys.services.insert(name_of(&svc.metadata));
            self.index.apply_service(svc);
        }
        for (_, slice) in &m.endpoint_slices {
            keys.endpoint_slices.insert(name_of(&slice.metadata));
            self.index.apply_endpoint_slice(slice);
        }
        for key in self.keys.listeners.difference(&keys.listeners) {
            self.index.delete_listener(key);
        }
        for (ns, name) in self.keys.services.difference(&keys.services) {
            self.index.delete_service(ns, name);
        }
        for (ns, name) in self.keys.endpoint_slices.difference(&keys.endpoint_slices) {
            self.index.delete_endpoint_slice(ns, name);
        }
        self.keys = keys;
    }

    /// Resolves names the index needs and that were never looked up; forgets names no longer used.
    async fn resolve_new_names(&mut self) {
        let wanted = self.index.names();
        for gone in self.names.difference(&wanted) {
            self.index.set_resolved(gone, None);
        }
        let new: Vec<_> = wanted.difference(&self.names).cloned().collect();
        self.names = wanted;
        self.resolve(new).await;
    }

    /// Re-resolves every name and publishes if any address changed.
    async fn refresh_names(&mut self) {
        let names: Vec<_> = self.names.iter().cloned().collect();
        if names.is_empty() {
            return;
        }
        self.resolve(names).await;
        self.publisher.publish(&mut self.index);
    }

    async fn resolve(&mut self, names: Vec<Arc<str>>) {
        let mut lookups = JoinSet::new();
        for name in names {
            lookups.spawn(async move {
                let host = name.to_string();
                let result =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0))).await;
                let ips = match result {
                    Ok(Ok(addrs)) => {
                        let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                        ips.sort_unstable();
                        ips.dedup();
                        if ips.is_empty() { Err("no addresses".to_owned()) } else { Ok(ips) }
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("timed out after {RESOLVE_TIMEOUT:?}")),
                };
                (name, ips)
            });
        }
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, result)) = joined else { continue };
            match result {
                Ok(ips) => self.index.set_resolved(&name, Some(ips.into())),
                Err(error) => {
                    tracing::warn!(%name, %error, "cannot resolve backend name; keeping its last known addresses");
                }
            }
        }
    }
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests;
