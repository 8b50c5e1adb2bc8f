//! kube-proxy-compatible health servers and metrics for `ferry node`.
//!
//! - [`service`]: the per-Service `healthCheckNodePort` servers cloud load balancers probe
//!   (LoadBalancer Services with `externalTrafficPolicy: Local`).
//! - [`healthz`]: the node's `/healthz` and `/livez` (`--healthz-bind-address`, default `0.0.0.0:10256`).
//! - [`ProxyHealth`]: the staleness rule both report (unhealthy after 2 × sync period of unapplied
//!   changes) plus node eligibility. The wiring calls [`ProxyHealth::queued`] when a snapshot
//!   arrives and [`ProxyHealth::updated`] once the data plane applied it.
//! - [`metrics`]: kube-proxy's `kubeproxy_*` metrics with their names, help strings and buckets.
//! - [`clock`]: the injectable clock and Go's time formats.
//! - [`http`]: the HTTP/1 accept loop these servers (and the binary's admin server) run on.
//!
//! Everything on the request path is lock-free (atomics); responses are laid out as Go's
//! `net/http` writes them, so only the `Date` header and the times differ from kube-proxy's bytes.

pub mod clock;
pub mod healthz;
pub mod http;
pub mod metrics;
mod proxy;
pub mod service;

pub use self::{
    clock::{Clock, ManualClock, SystemClock},
    healthz::{DEFAULT_HEALTHZ_BIND_ADDRESS, HealthzServer},
    metrics::KubeProxyMetrics,
    proxy::{DEFAULT_SYNC_PERIOD, FamilyHealth, HealthReport, IpFamily, ProxyHealth},
    service::{BindError, ServiceHealth, ServiceHealthServers},
};

#[cfg(test)]
mod tests;
