//! Publishing snapshots: one writer, many readers.
//!
//! The task that owns the [`Index`] owns the [`Publisher`]; everyone else holds a [`Snapshots`]
//! handle. A publish builds the index once, stores the new snapshot in an `ArcSwap` (the lock-free
//! hot path: [`Snapshots::current`]) and only then sends it on a `watch` channel (reconcilers:
//! [`Snapshots::subscribe`]), so a reconciler woken by the channel never reads an older
//! `current()` than the one it was woken for.
//!
//! Invariants:
//! - Nothing is published before [`Publisher::synced`] is called: until every source has done its
//!   initial load, readers see the empty version-0 snapshot and [`Snapshots::ready`] is false.
//! - One publish per build, and no publish when the index is unchanged.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use ferry_model::{Index, Snapshot};
use tokio::sync::watch;

/// The write side. Owned by the one task that owns the [`Index`].
#[derive(Debug)]
pub struct Publisher {
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<Snapshot>>,
    synced: bool,
    version: metrics::Gauge,
    services: metrics::Gauge,
    build_duration: metrics::Histogram,
}

/// The read side: cheap to clone, lock-free to read.
#[derive(Clone, Debug)]
pub struct Snapshots {
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Snapshot>>,
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<Snapshot>,
    ready: AtomicBool,
}

/// Creates a connected publisher and reader; readers see an empty snapshot until the first publish.
pub fn publisher() -> (Publisher, Snapshots) {
    let empty = Arc::new(Snapshot::default());
    let shared = Arc::new(Shared { current: ArcSwap::new(empty.clone()), ready: AtomicBool::new(false) });
    let (tx, rx) = watch::channel(empty);
    let publisher = Publisher {
        shared: shared.clone(),
        tx,
        synced: false,
        version: metrics::gauge!("ferry_snapshot_version"),
        services: metrics::gauge!("ferry_snapshot_services"),
        build_duration: metrics::histogram!("ferry_snapshot_build_duration_seconds"),
    };
    (publisher, Snapshots { shared, rx })
}

// === impl Publisher ===

impl Publisher {
    /// Whether [`synced`](Self::synced) has been called.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// A reader for this publisher.
    pub fn snapshots(&self) -> Snapshots {
        Snapshots { shared: self.shared.clone(), rx: self.tx.subscribe() }
    }

    /// Marks the initial sync complete and publishes the first snapshot (even an empty one).
    /// Later calls behave like [`publish`](Self::publish).
    pub fn synced(&mut self, index: &mut Index) -> Option<Arc<Snapshot>> {
        if self.synced {
            return self.publish(index);
        }
        self.synced = true;
        Some(self.build_and_send(index))
    }

    /// Builds and publishes if the index changed since the last build; before the initial sync
    /// this does nothing (the changes stay in the index for the first publish).
    pub fn publish(&mut self, index: &mut Index) -> Option<Arc<Snapshot>> {
        if !self.synced || !index.is_dirty() {
            return None;
        }
        Some(self.build_and_send(index))
    }

    fn build_and_send(&self, index: &mut Index) -> Arc<Snapshot> {
        let start = Instant::now();
        let snapshot = index.build();
        self.build_duration.record(start.elapsed().as_secs_f64());
        self.version.set(snapshot.version as f64);
        self.services.set(snapshot.services.len() as f64);
        self.shared.current.store(snapshot.clone());
        self.shared.ready.store(true, Ordering::Release);
        self.tx.send_replace(snapshot.clone());
        tracing::debug!(version = snapshot.version, services = snapshot.services.len(), "published snapshot");
        snapshot
    }
}

// === impl Snapshots ===

impl Snapshots {
    /// The latest published snapshot (the empty one before the first publish). Lock-free.
    pub fn current(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// A receiver of every later publish: the snapshot current at the time of the call is marked
    /// seen, so `changed()` resolves on the next publish.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// Whether the first snapshot has been published.
    pub fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Waits for the first snapshot.
    ///
    /// If the publisher is dropped before publishing (its source failed), this never returns:
    /// select on the source task as well.
    pub async fn wait_ready(&self) {
        let mut rx = self.subscribe();
        while !self.ready() {
            if rx.changed().await.is_err() && !self.ready() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn publishes_only_after_sync_and_only_when_dirty() {
        let (mut publisher, snapshots) = publisher();
        let mut index = Index::new(None);
        let mut rx = snapshots.subscribe();
        assert!(!snapshots.ready());
        let listener: ferry_model::Listener = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.ethercluster.io/v1alpha1", "kind": "Listener",
            "metadata": {"name": "web"},
            "spec": {"address": "127.0.0.1:8080", "backends": ["127.0.0.1:9000"]},
        }))
        .expect("listener");
        index.apply_listener(listener.validate().expect("valid"));
        assert!(publisher.publish(&mut index).is_none(), "no publish before sync");
        assert!(!rx.has_changed().expect("open"));
        assert_eq!(snapshots.current().version, 0);

        let waiter = tokio::spawn({
            let s = snapshots.clone();
            async move { s.wait_ready().await }
        });
        let first = publisher.synced(&mut index).expect("first publish");
        assert_eq!(first.version, 1);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("ready").expect("join");
        assert!(snapshots.ready());
        assert_eq!(snapshots.current().version, 1);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(rx.borrow_and_update().version, 1);

        assert!(publisher.publish(&mut index).is_none(), "clean index publishes nothing");
        assert!(!rx.has_changed().expect("open"));
        index.delete_listener(&ferry_model::ServiceKey::new("", "web"));
        assert_eq!(publisher.publish(&mut index).expect("publish").version, 2);
        assert_eq!(rx.borrow_and_update().version, 2);
        assert!(snapshots.current().services.is_empty());
    }

    #[tokio::test]
    async fn wait_ready_pends_when_publisher_dropped() {
        let (publisher, snapshots) = publisher();
        drop(publisher);
        let waited = tokio::time::timeout(Duration::from_millis(50), snapshots.wait_ready()).await;
        assert!(waited.is_err(), "not ready, and no busy loop returning early");
    }
}
