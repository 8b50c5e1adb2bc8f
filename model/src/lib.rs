//! Ferry's desired state.
//!
//! Sources (the Kubernetes API watch, manifest files) feed Kubernetes objects and Ferry's own
//! [`Listener`](listener::Listener) kind into one mutable [`Index`](index::Index). The index turns
//! them into an immutable [`Snapshot`](snapshot::Snapshot): every Service, its ports, frontends and
//! categorised endpoints, with all lookup indexes built together, so a reader can never see two
//! indexes from different versions.
//!
//! Invariants:
//! - This crate is pure: no IO, no clocks, no async runtime. Every function is deterministic in
//!   its inputs, which is what lets the property tests compare incremental and from-scratch builds.
//! - A [`Snapshot`](snapshot::Snapshot) is never mutated after it is built. Unchanged services are
//!   shared (`Arc`) with the previous snapshot; persistent maps make a one-object change cost
//!   O(log n), not O(n).
//! - Endpoint categorisation follows kube-proxy's `CategorizeEndpoints` exactly (see [`topology`]).

pub mod dns;
pub mod endpoint;
pub mod index;
pub mod kube;
pub mod listener;
pub mod service;
pub mod snapshot;
pub mod topology;

pub use dns::{DnsEndpoint, DnsKind, DnsPort, DnsService};
pub use endpoint::{Endpoint, EndpointHints, Endpoints, TopologyMode};
pub use index::{Index, NodeInfo, NodeStatus};
pub use listener::{Backend, Listener, ListenerSpec};
pub use service::{
    Balancing, Frontend, FrontendKey, HealthCheck, HealthCheckKind, IpFamily, Origin, PassiveHealth,
    Protocol, Service, ServiceKey, ServicePort, SessionAffinity, Timeouts, TrafficPolicy,
};
pub use snapshot::Snapshot;
