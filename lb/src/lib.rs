//! Endpoint selection for Ferry's data plane.
//!
//! A [`Pool`] is the runtime side of one [`ServicePort`](ferry_model::ServicePort)'s endpoint
//! set: per-endpoint state (active connections, active-check health, passive ejection) and the
//! balancer's own state (round-robin cursor, affinity table). Pools are built by the listener
//! manager whenever a snapshot changes that port, carrying over the state of endpoints that
//! stay, so counters and health survive configuration changes.
//!
//! Modules:
//! - [`balance`]: the selection algorithms, pure functions over a slice.
//! - [`affinity`]: the ClientIP session-affinity table.
//! - [`maglev`]: Maglev consistent hashing (the `Maglev` balancing's lookup table).
//! - [`endpoint`]: [`EndpointState`], including passive health (ejection after connect failures).
//! - [`health`]: active health checking ([`Checks`]), tokio tasks writing into endpoint states.
//! - [`pool`]: [`Pool`] and [`Lease`].
//!
//! An endpoint is *available* when its active check (if any) says healthy and passive health
//! has not ejected it. Hot path: [`Pool::pick`] takes no lock except for ClientIP affinity (a
//! sharded table) and allocates nothing except a new affinity entry.

pub mod affinity;
pub mod balance;
pub mod endpoint;
pub mod health;
pub mod maglev;
pub mod pool;

pub use affinity::AffinityTable;
pub use endpoint::{EndpointHealth, EndpointState};
pub use health::{Checks, HealthMachine, ProbeError};
pub use pool::{Lease, Pool};
