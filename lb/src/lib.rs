//! Endpoint selection for Ferry's data plane.
//!
//! A [`Pool`] is the runtime side of one [`ServicePort`](ferry_model::ServicePort)'s endpoint
//! set: per-endpoint state (active connections, active-check health, passive ejection) and the
//! balancer's own state (round-robin cursor, affinity table). Pools are built by the listener
//! manager whenever a snapshot changes that port, carrying over the state of endpoints that
//! stay, so counters and health survive configuration changes.
//!
//! Hot path: [`Pool::pick`] takes no lock except for ClientIP affinity (a sharded table) and
//! allocates nothing.

pub mod pool;

pub use pool::{EndpointState, Lease, Pool};
