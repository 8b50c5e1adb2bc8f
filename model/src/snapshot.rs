//! The immutable [`Snapshot`]: what every reader (listeners, pools, DNS, kernel reconcilers) sees.
//!
//! Built only by [`Index::build`](crate::index::Index::build). All lookup indexes are built in the
//! same call, so a reader holding one `Arc<Snapshot>` sees one consistent version. The maps are
//! persistent (`imbl`): cloning a snapshot is O(1) and a one-service change shares every other
//! entry with the previous version.

use std::sync::Arc;

use serde::Serialize;

use crate::{
    index::NodeInfo,
    service::{FrontendKey, Service, ServiceKey, ServicePort},
};

/// One consistent version of the desired state.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Increases by one with every build that changed something; 0 is the empty snapshot.
    pub version: u64,
    /// The node this snapshot was categorised for (`None` in standalone mode).
    pub node: Option<NodeInfo>,
    /// Every service, by key.
    pub services: imbl::OrdMap<ServiceKey, Arc<Service>>,
    /// Every frontend, to the port it serves. When two services claim one frontend, the
    /// smallest [`ServiceKey`] wins and the clash is listed in `conflicts`.
    pub frontends: imbl::OrdMap<FrontendKey, Arc<ServicePort>>,
    /// Frontends claimed by more than one service: `(frontend, loser)`.
    pub conflicts: imbl::Vector<(FrontendKey, ServiceKey)>,
}

impl Snapshot {
    /// The port served on `key`, if any.
    pub fn lookup(&self, key: &FrontendKey) -> Option<&Arc<ServicePort>> {
        self.frontends.get(key)
    }

    /// The service named `key`, if any.
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }
}
