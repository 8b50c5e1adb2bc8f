//! The mutable [`Index`]: every input object, and the last built snapshot.
//!
//! Sources call `apply_*` / `delete_*` as objects change and [`Index::build`] when they want to
//! publish. Applying an object equal to the stored one is a no-op. Only services whose inputs
//! changed since the last build are rebuilt; every other `Arc<Service>` is reused, so
//! `Arc::ptr_eq` between two snapshots tells readers exactly what changed.
//!
//! Owned by one task (the publisher); never shared.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;

use crate::{
    listener::ValidListener,
    service::ServiceKey,
    snapshot::Snapshot,
};

/// The node a snapshot is built for: its name and zone decide the local set and topology.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// `metadata.name` of the Node.
    pub name: Arc<str>,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<Arc<str>>,
}

/// Input objects and the state of the last build.
#[derive(Debug, Default)]
pub struct Index {
    node: Option<NodeInfo>,
    listeners: HashMap<ServiceKey, ValidListener>,
    resolved: HashMap<Arc<str>, Arc<[IpAddr]>>,
    dirty: BTreeSet<ServiceKey>,
    current: Snapshot,
}

impl Index {
    /// An empty index for `node` (`None` in standalone mode).
    pub fn new(node: Option<NodeInfo>) -> Self {
        Self { node: node.clone(), current: Snapshot { node, ..Snapshot::default() }, ..Self::default() }
    }

    /// Whether anything changed since the last [`build`](Self::build).
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Adds or replaces a listener.
    pub fn apply_listener(&mut self, listener: ValidListener) {
        if self.listeners.get(&listener.key) == Some(&listener) {
            return;
        }
        self.dirty.insert(listener.key.clone());
        self.listeners.insert(listener.key.clone(), listener);
    }

    /// Removes a listener.
    pub fn delete_listener(&mut self, key: &ServiceKey) {
        if self.listeners.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// Keys of every listener.
    pub fn listener_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.listeners.keys()
    }

    /// Host names that listeners need resolved.
    pub fn names(&self) -> BTreeSet<Arc<str>> {
        self.listeners.values().flat_map(|l| l.names().cloned()).collect()
    }

    /// Records the addresses of a host name (`None`: unknown or unresolvable).
    pub fn set_resolved(&mut self, host: &str, ips: Option<Arc<[IpAddr]>>) {
        let changed = match &ips {
            Some(ips) => self.resolved.get(host).is_none_or(|old| old != ips),
            None => self.resolved.contains_key(host),
        };
        if !changed {
            return;
        }
        match ips {
            Some(ips) => self.resolved.insert(host.into(), ips),
            None => self.resolved.remove(host),
        };
        for (key, l) in &self.listeners {
            if l.names().any(|n| &**n == host) {
                self.dirty.insert(key.clone());
            }
        }
    }

    /// Rebuilds what changed and returns the new snapshot (the previous one if nothing changed).
    pub fn build(&mut self) -> Arc<Snapshot> {
        if self.dirty.is_empty() {
            return Arc::new(self.current.clone());
        }
        let mut next = self.current.clone();
        for key in std::mem::take(&mut self.dirty) {
            if let Some(old) = next.services.remove(&key) {
                for port in &old.ports {
                    for fe in &port.frontends {
                        next.frontends.remove(&fe.key(port.protocol));
                    }
                }
            }
            if let Some(l) = self.listeners.get(&key) {
                let svc = Arc::new(l.to_service(|h| self.resolved.get(h).cloned()));
                for port in &svc.ports {
                    for fe in &port.frontends {
                        next.frontends.insert(fe.key(port.protocol), port.clone());
                    }
                }
                next.services.insert(key, svc);
            }
        }
        next.version += 1;
        self.current = next;
        Arc::new(self.current.clone())
    }
}
