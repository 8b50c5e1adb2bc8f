//! The admin server: `/metrics`, `/healthz`, `/livez`, `/readyz` and `/debug/snapshot`.
//!
//! `/readyz` is 200 only while the data plane serves a snapshot: after the first snapshot's
//! listeners are bound and until shutdown starts.
//!
//! A bare hyper HTTP/1 service (the surface is five GET routes; a router framework would cost more
//! than it saves). It reads the live snapshot through [`Snapshots`] and never blocks the data plane.
//! [`serve`] takes an already-bound listener and a shutdown token, so tests bind `127.0.0.1:0`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use ::http::{Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use ferry_proxy::health::http::{self, Handler};
use ferry_watch::Snapshots;
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

/// What the admin routes read.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// The live snapshot.
    pub(crate) snapshots: Snapshots,
    /// Set once the data plane serves the first snapshot: what `/readyz` reports.
    pub(crate) serving: Arc<AtomicBool>,
    /// Renders the Prometheus text exposition.
    pub(crate) metrics: PrometheusHandle,
    /// Cancelled when Ferry starts shutting down: `/readyz` turns 503 at once.
    pub(crate) shutdown: CancellationToken,
}

/// Serves admin requests on `listener` until `shutdown` is cancelled (the health servers' HTTP/1
/// loop, [`ferry_proxy::health::http::serve`]).
pub(crate) async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let handler: Arc<Handler> = Arc::new(move |req, _local| route(&state, req));
    http::serve(listener, handler, shutdown).await;
}

/// [`serve`] on a Unix socket (`--admin-socket`): unlike a TCP port, which a successor shares
/// during a handoff, it reaches this process only, so an exec probe (`ferry probe`) reports this
/// process's readiness.
pub(crate) async fn serve_unix(listener: UnixListener, state: AdminState, shutdown: CancellationToken) {
    let handler: Arc<Handler> = Arc::new(move |req, _local| route(&state, req));
    http::serve_unix(listener, handler, shutdown).await;
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are supported\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.shutdown.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if state.serving.load(Ordering::Acquire) {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "waiting for the first snapshot\n")
            }
        }
        "/healthz" => {
            let snapshot = state.snapshots.current();
            let ready = state.serving.load(Ordering::Acquire) && !state.shutdown.is_cancelled();
            let body = serde_json::json!({
                "status": if ready { "ok" } else { "unavailable" },
                "ready": ready,
                "snapshotVersion": snapshot.version,
                "services": snapshot.services.len(),
                "frontends": snapshot.frontends.len(),
            });
            json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
        }
        "/debug/snapshot" => {
            let snapshot = state.snapshots.current();
            json(StatusCode::OK, &*snapshot)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz, /livez, /readyz or /debug/snapshot\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            resp
        }
        Err(error) => {
            tracing::error!(%error, "serialising admin response");
            text(StatusCode::INTERNAL_SERVER_ERROR, "serialisation failed\n")
        }
    }
}
