//! The immutable [`Snapshot`]: what every reader (listeners, pools, DNS, kernel reconcilers) sees.
//!
//! Built only by [`Index::build`](crate::index::Index::build). All lookup indexes are built in the
//! same call, so a reader holding one `Arc<Snapshot>` sees one consistent version. The maps are
//! persistent (`imbl`): cloning a snapshot is O(1) and a one-service change shares every other
//! entry with the previous version.

use std::sync::Arc;

use serde::Serialize;

use crate::{
    dns::DnsService,
    index::{NodeInfo, NodeStatus},
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
    /// What the node's own `Node` object says beyond categorisation: eligibility for load
    /// balancer traffic and its addresses (`None` in standalone mode or when no Node is known).
    pub node_status: Option<NodeStatus>,
    /// Every service, by key. Serialized as a map keyed by `namespace/name`.
    #[serde(serialize_with = "ser::services")]
    pub services: imbl::OrdMap<ServiceKey, Arc<Service>>,
    /// Every frontend, to the port it serves. When two services claim one frontend, the
    /// smallest [`ServiceKey`] wins and the clash is listed in `conflicts`. Serialized as a map from
    /// the frontend (`TCP 10.96.0.1:80`, `UDP nodePort 30053`) to the port's display name.
    #[serde(serialize_with = "ser::frontends")]
    pub frontends: imbl::OrdMap<FrontendKey, Arc<ServicePort>>,
    /// Frontends claimed by more than one service: `(frontend, loser)`, sorted. Serialized as
    /// `[{"frontend": "TCP 10.96.0.1:80", "loser": "ns/name"}]`.
    #[serde(serialize_with = "ser::conflicts")]
    pub conflicts: imbl::Vector<(FrontendKey, ServiceKey)>,
    /// The DNS view of every Kubernetes Service, including headless and ExternalName ones, which
    /// have no frontends (see [`crate::dns`]). Not serialized.
    #[serde(skip)]
    pub dns: imbl::OrdMap<ServiceKey, Arc<DnsService>>,
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

/// `/debug/snapshot` shapes: JSON object keys must be strings, so keys are shown with `Display`.
mod ser {
    use std::sync::Arc;

    use serde::{Serialize, Serializer, ser::SerializeSeq};

    use crate::service::{FrontendKey, Service, ServiceKey, ServicePort};

    pub(super) fn services<S: Serializer>(
        map: &imbl::OrdMap<ServiceKey, Arc<Service>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub(super) fn frontends<S: Serializer>(
        map: &imbl::OrdMap<FrontendKey, Arc<ServicePort>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k.to_string(), v.display_name())))
    }

    #[derive(Serialize)]
    struct Conflict {
        frontend: String,
        loser: String,
    }

    pub(super) fn conflicts<S: Serializer>(
        list: &imbl::Vector<(FrontendKey, ServiceKey)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for (fk, loser) in list {
            seq.serialize_element(&Conflict { frontend: fk.to_string(), loser: loser.to_string() })?;
        }
        seq.end()
    }
}
