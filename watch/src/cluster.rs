//! [`KubeSource`]: the Kubernetes API server as the source of the desired state.
//!
//! One kube-runtime watcher per kind (Services, EndpointSlices, this node's `Node`) feeds one task
//! that owns the [`Index`] and the [`Publisher`]:
//!
//! ```text
//! watcher(Service) ──┐
//! watcher(Slice)  ───┼─ select_all ─> apply / relist ─> Index ─(min-sync-period)─> Publisher
//! watcher(Node)   ───┘
//! ```
//!
//! Invariants:
//! - Nothing is published until every kind has listed once (`InitDone`): a partial first sync would
//!   black-hole traffic to the kinds not listed yet. Until then `/readyz` stays false.
//! - A relist (after `410 Gone`, or whenever kube-runtime restarts a watch from scratch) is applied
//!   atomically: its objects are buffered until `InitDone`, then applied, and every object of that
//!   kind the relist did not return is deleted. After any disconnect the index therefore holds
//!   exactly what a fresh start would list, and an unchanged object changes nothing (the index
//!   ignores identical re-applies), so reconnecting never touches listeners or connections.
//! - Errors (API server unreachable, a cut stream, 5xx) are logged and retried by the watcher with
//!   kube's default backoff (0.8 s doubling to 30 s, jittered); the last snapshot keeps serving.
//! - Publishing is coalesced: a change arriving `min_sync_period` or more after the last publish is
//!   published at once; changes inside that window are published together at its end (kube-proxy's
//!   `--min-sync-period`). Events already buffered are drained before a publish.
//!
//! Adding a kind is one [`Watched`] impl and one [`watch`] call in [`KubeSource::run`].

use std::{collections::BTreeSet, fmt, path::PathBuf, pin::Pin, time::Duration};

use ferry_model::{Index, NodeInfo, NodeStatus};
use futures::{FutureExt as _, Stream, StreamExt as _, stream::SelectAll};
use k8s_openapi::{
    Resource as _,
    api::{core::v1 as core, discovery::v1 as discovery},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::publish::Publisher;

/// kube-proxy's label selector parts (`pkg/proxy/apis`): Services of another proxy, and headless
/// Services (and their EndpointSlices, which carry the same label), are not watched.
const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS: &str = "service.kubernetes.io/headless";

/// At most this many already-received events are applied before a publish is considered.
const MAX_BATCH: usize = 4096;

/// How the API client is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientConfig {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// In-cluster if available, else `$KUBECONFIG` or `~/.kube/config`.
    Infer,
}

/// Options of a [`KubeSource`].
#[derive(Clone, Debug)]
pub struct KubeSourceOptions {
    /// Where the API server is and how to authenticate.
    pub client: ClientConfig,
    /// This node's name: its `Node` object is watched, and endpoints are categorised for it.
    pub node: String,
    /// This proxy's `service.kubernetes.io/service-proxy-name`: `None` handles Services without
    /// the label (kube-proxy's default); a name handles only Services labelled with it.
    pub proxy_name: Option<String>,
    /// Minimum time between two publishes; changes inside it are coalesced.
    pub min_sync_period: Duration,
    /// Watch every Service and EndpointSlice instead of applying kube-proxy's label selector at
    /// the API server: cluster DNS needs headless Services and those of other proxies. The index
    /// still proxies only what [`proxy_name`](Self::proxy_name) selects.
    pub all_services: bool,
}

/// Why a [`KubeSource`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeSourceError {
    /// The kubeconfig could not be read or used. Retrying only helps once the file is fixed.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No in-cluster configuration (not running in a pod, or no service account mounted).
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    /// Neither in-cluster configuration nor a kubeconfig was found.
    #[error("no Kubernetes configuration found (in-cluster or kubeconfig): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from a valid configuration (e.g. a bad TLS setting).
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Watches the API server and publishes snapshots. Consumed by [`KubeSource::run`].
pub struct KubeSource {
    client: Client,
    options: KubeSourceOptions,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource").field("options", &self.options).finish_non_exhaustive()
    }
}

// === impl KubeSource ===

impl KubeSource {
    /// Builds the API client. Nothing is contacted yet: an unreachable API server is retried by
    /// [`run`](Self::run), while a broken configuration fails here.
    pub async fn connect(options: KubeSourceOptions) -> Result<Self, KubeSourceError> {
        let config = match &options.client {
            ClientConfig::Kubeconfig(path) => {
                let wrap = |source| KubeSourceError::Kubeconfig { path: path.clone(), source };
                let kubeconfig = Kubeconfig::read_from(path).map_err(wrap)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(wrap)?
            }
            ClientConfig::InCluster => kube::Config::incluster()?,
            ClientConfig::Infer => kube::Config::infer().await?,
        };
        tracing::info!(server = %config.cluster_url, node = %options.node, "Kubernetes API source configured");
        Ok(Self { client: Client::try_from(config)?, options })
    }

    /// Watches every kind until `shutdown`. The first snapshot is published once every kind has
    /// listed; after that, changes are published as they come (see the module docs). Never fails:
    /// API errors are retried.
    pub async fn run(self, mut publisher: Publisher, shutdown: CancellationToken) {
        let Self { client, options } = self;
        let mut index = Index::new(Some(NodeInfo { name: options.node.as_str().into(), zone: None }));
        index.set_proxy_name(options.proxy_name.as_deref());

        let selected = if options.all_services {
            watcher::Config::default()
        } else {
            watcher::Config::default().labels(&proxy_selector(options.proxy_name.as_deref()))
        };
        let node_field = format!("metadata.name={}", options.node);
        let mut updates = SelectAll::new();
        updates.push(watch::<core::Service>(&client, selected.clone()));
        updates.push(watch::<discovery::EndpointSlice>(&client, selected));
        updates.push(watch::<core::Node>(&client, watcher::Config::default().fields(&node_field)));
        let mut unsynced: BTreeSet<&'static str> =
            [core::Service::KIND, discovery::EndpointSlice::KIND, core::Node::KIND].into();

        let min_sync_period = options.min_sync_period;
        let mut last_publish: Option<Instant> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = sleep_until(deadline) => {
                    deadline = None;
                    if publisher.publish(&mut index).is_some() {
                        last_publish = Some(Instant::now());
                    }
                }
                update = updates.next() => {
                    let Some(update) = update else {
                        tracing::error!("every Kubernetes watch ended; keeping the last snapshot");
                        return shutdown.cancelled().await;
                    };
                    handle(update, &mut index, &mut unsynced);
                    // Take whatever else has already arrived, so a burst is one publish.
                    for _ in 0..MAX_BATCH {
                        match updates.next().now_or_never() {
                            Some(Some(update)) => handle(update, &mut index, &mut unsynced),
                            _ => break,
                        }
                    }
                    if !publisher.is_synced() {
                        if unsynced.is_empty() {
                            let first = publisher.synced(&mut index);
                            last_publish = Some(Instant::now());
                            tracing::info!(
                                version = first.map(|s| s.version),
                                services = index.service_keys().count(),
                                endpoint_slices = index.endpoint_slice_keys().count(),
                                "every kind listed; first snapshot published"
                            );
                        }
                    } else if index.is_dirty() && deadline.is_none() {
                        let now = Instant::now();
                        match last_publish {
                            Some(last) if now < last + min_sync_period => deadline = Some(last + min_sync_period),
                            _ => {
                                publisher.publish(&mut index);
                                last_publish = Some(now);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// kube-proxy's selector: Services (and EndpointSlices) of no other proxy, and not headless.
fn proxy_selector(proxy_name: Option<&str>) -> String {
    match proxy_name {
        None => format!("!{SERVICE_PROXY_NAME},!{HEADLESS}"),
        Some(name) => format!("{SERVICE_PROXY_NAME}={name},!{HEADLESS}"),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A change to the index, from one kind's watcher.
struct Update {
    kind: &'static str,
    change: Change,
}

enum Change {
    /// Apply or delete one object.
    Event(Box<dyn FnOnce(&mut Index) + Send>),
    /// A complete list: replace every object of the kind.
    Relisted { objects: usize, replace: Box<dyn FnOnce(&mut Index) + Send> },
    /// The watcher failed; it retries by itself after a backoff.
    Error(watcher::Error),
}

fn handle(update: Update, index: &mut Index, unsynced: &mut BTreeSet<&'static str>) {
    let kind = update.kind;
    match update.change {
        Change::Event(apply) => apply(index),
        Change::Relisted { objects, replace } => {
            replace(index);
            metrics::counter!("ferry_kube_lists_total", "kind" => kind).increment(1);
            if unsynced.remove(kind) {
                tracing::info!(kind, objects, "listed");
            } else {
                tracing::info!(kind, objects, "relisted; the index now holds exactly the listed objects");
            }
        }
        Change::Error(error) => {
            metrics::counter!("ferry_kube_watch_errors_total", "kind" => kind).increment(1);
            tracing::warn!(kind, %error, "Kubernetes watch failed; retrying with backoff, serving the last snapshot");
        }
    }
}

type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

/// One kind's watcher, as index updates: events are applied one by one, and a list (initial or a
/// relist) is buffered and replaces the kind's objects as a whole at `InitDone`.
fn watch<K: Watched>(client: &Client, config: watcher::Config) -> Updates {
    let api: Api<K> = Api::all(client.clone());
    let mut listing: Option<Vec<K>> = None;
    let stream = watcher(api, config).default_backoff().filter_map(move |event| {
        let change = match event {
            Ok(watcher::Event::Apply(obj)) => {
                metrics::counter!("ferry_kube_watch_events_total", "kind" => K::KIND, "type" => "apply")
                    .increment(1);
                Some(Change::Event(Box::new(move |index: &mut Index| K::apply(index, &obj))))
            }
            Ok(watcher::Event::Delete(obj)) => {
                metrics::counter!("ferry_kube_watch_events_total", "kind" => K::KIND, "type" => "delete")
                    .increment(1);
                Some(Change::Event(Box::new(move |index: &mut Index| K::delete(index, &obj))))
            }
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(obj)) => {
                listing.get_or_insert_with(Vec::new).push(obj);
                None
            }
            Ok(watcher::Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                Some(Change::Relisted {
                    objects: objects.len(),
                    replace: Box::new(move |index: &mut Index| K::replace(index, &objects)),
                })
            }
            Err(error) => Some(Change::Error(error)),
        };
        std::future::ready(change.map(|change| Update { kind: K::KIND, change }))
    });
    Box::pin(stream)
}

/// A kind the source watches: how its objects change the index.
trait Watched:
    Resource<DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + DeserializeOwned
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Applies a new or changed object.
    fn apply(index: &mut Index, obj: &Self);
    /// Removes an object.
    fn delete(index: &mut Index, obj: &Self);
    /// Makes the index hold exactly `objects` of this kind.
    fn replace(index: &mut Index, objects: &[Self]);
}

/// Namespaced name of an object.
fn key(obj: &impl ResourceExt) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Applies `objects` and deletes what `current` has beyond them.
fn replace_all<K: ResourceExt>(
    index: &mut Index,
    objects: &[K],
    current: impl FnOnce(&Index) -> Vec<(String, String)>,
    apply: impl Fn(&mut Index, &K),
    delete: impl Fn(&mut Index, &str, &str),
) {
    let listed: BTreeSet<(String, String)> = objects.iter().map(key).collect();
    for (ns, name) in current(index).into_iter().filter(|k| !listed.contains(k)) {
        delete(index, &ns, &name);
    }
    for obj in objects {
        apply(index, obj);
    }
}

impl Watched for core::Service {
    fn apply(index: &mut Index, obj: &Self) {
        index.apply_service(obj);
    }

    fn delete(index: &mut Index, obj: &Self) {
        let (ns, name) = key(obj);
        index.delete_service(&ns, &name);
    }

    fn replace(index: &mut Index, objects: &[Self]) {
        replace_all(
            index,
            objects,
            |i| i.service_keys().map(|k| (k.namespace.to_string(), k.name.to_string())).collect(),
            Index::apply_service,
            Index::delete_service,
        );
    }
}

impl Watched for discovery::EndpointSlice {
    fn apply(index: &mut Index, obj: &Self) {
        index.apply_endpoint_slice(obj);
    }

    fn delete(index: &mut Index, obj: &Self) {
        let (ns, name) = key(obj);
        index.delete_endpoint_slice(&ns, &name);
    }

    fn replace(index: &mut Index, objects: &[Self]) {
        replace_all(
            index,
            objects,
            |i| i.endpoint_slice_keys().map(|(ns, name)| (ns.to_owned(), name.to_owned())).collect(),
            Index::apply_endpoint_slice,
            Index::delete_endpoint_slice,
        );
    }
}

/// Only this node's own `Node` is watched (a field selector on its name).
impl Watched for core::Node {
    fn apply(index: &mut Index, obj: &Self) {
        index.set_node(Some(NodeInfo::from_node(obj)));
        index.set_node_status(Some(NodeStatus::from_node(obj)));
    }

    fn delete(index: &mut Index, obj: &Self) {
        // No Node: no zone for topology, and not eligible for load balancer traffic (kube-proxy).
        index.set_node(Some(NodeInfo { name: obj.name_any().into(), zone: None }));
        index.set_node_status(None);
    }

    fn replace(index: &mut Index, objects: &[Self]) {
        match objects.first() {
            Some(node) => Self::apply(index, node),
            None => {
                let name = index.current().node.as_ref().map(|n| n.name.clone());
                index.set_node(name.map(|name| NodeInfo { name, zone: None }));
                index.set_node_status(None);
            }
        }
    }
}

#[cfg(test)]
mod tests;
