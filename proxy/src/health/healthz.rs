//! The node health server (`--healthz-bind-address`, default `0.0.0.0:10256`): `/healthz` and
//! `/livez`, byte-compatible with kube-proxy's `ProxyHealthServer` (only `Date` and the times differ).
//!
//! - `/healthz`: 200 iff the proxy is healthy ([`ProxyHealth`]) AND the node is eligible; the body
//!   carries `nodeEligible`.
//! - `/livez`: 200 iff the proxy is healthy; no `nodeEligible`.
//! - On 200 `lastUpdated` is replaced by the current time (kube-proxy's backward compatibility).
//! - Any other path: Go's `404 page not found`.
//!
//! Counts answers in `kubeproxy_proxy_healthz_total{code}` / `kubeproxy_proxy_livez_total{code}`;
//! the counter handles are created once, in [`HealthzServer::new`].

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics::Counter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    http::{go_response, json_headers, not_found, serve},
    metrics::{PROXY_HEALTHZ_TOTAL, PROXY_LIVEZ_TOTAL},
    proxy::ProxyHealth,
};

/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 10256);

/// The `/healthz` + `/livez` server.
#[derive(Debug)]
pub struct HealthzServer {
    health: Arc<ProxyHealth>,
    healthz: [Counter; 2],
    livez: [Counter; 2],
}

// === impl HealthzServer ===

impl HealthzServer {
    /// A server reporting `health`; registers its counters with the installed recorder.
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        Self {
            health,
            healthz: [
                metrics::counter!(PROXY_HEALTHZ_TOTAL, "code" => "200"),
                metrics::counter!(PROXY_HEALTHZ_TOTAL, "code" => "503"),
            ],
            livez: [
                metrics::counter!(PROXY_LIVEZ_TOTAL, "code" => "200"),
                metrics::counter!(PROXY_LIVEZ_TOTAL, "code" => "503"),
            ],
        }
    }

    /// Serves requests on `listener` until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let this = Arc::new(self);
        serve(listener, Arc::new(move |req: &Request<Incoming>, _| this.answer(req)), shutdown).await;
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let clock = self.health.clock();
        let (counters, eligible) = match req.uri().path() {
            "/healthz" => (&self.healthz, Some(self.health.node_eligible())),
            "/livez" => (&self.livez, None),
            _ => return not_found(clock),
        };
        let mut report = self.health.report();
        let ok = report.healthy && eligible.unwrap_or(true);
        let status = if ok {
            counters[0].increment(1);
            report.last_updated = Some(clock.now());
            StatusCode::OK
        } else {
            counters[1].increment(1);
            StatusCode::SERVICE_UNAVAILABLE
        };
        go_response(status, &json_headers(), report.to_json(eligible), clock)
    }
}
