//! The HTTP/1 plumbing shared by the health servers and the binary's admin server: an accept
//! loop on an already-bound listener ([`serve`], [`serve_unix`]), and responses laid out the way
//! Go's `net/http` writes them.
//!
//! Go writes the handler's headers sorted by name, then `Date`, then `Content-Length`, all in
//! canonical Title-Case. Hyper writes headers in insertion order, so [`go_response`] inserts them in
//! Go's order and the connection is built with `title_case_headers`. Only the `Date` value differs
//! from kube-proxy's bytes.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header::HeaderName};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::clock::{Clock, http_date};

/// Answers one request; `local` is the address the connection arrived on.
pub type Handler = dyn Fn(&Request<Incoming>, SocketAddr) -> Response<Full<Bytes>> + Send + Sync;

/// Serves `handler` on `listener` until `stop` is cancelled. Returns (dropping the listener, so
/// the port is free) as soon as `stop` fires; open connections finish gracefully.
pub async fn serve(listener: TcpListener, handler: Arc<Handler>, stop: CancellationToken) {
    accept_loop(
        || async {
            let (stream, _) = listener.accept().await?;
            let local = stream.local_addr()?;
            Ok((stream, local))
        },
        handler,
        stop,
    )
    .await;
}

/// [`serve`] on a Unix socket; handlers see `0.0.0.0:0` as the local address.
pub async fn serve_unix(listener: UnixListener, handler: Arc<Handler>, stop: CancellationToken) {
    let local = SocketAddr::from(([0, 0, 0, 0], 0));
    accept_loop(|| async { Ok((listener.accept().await?.0, local)) }, handler, stop).await;
}

/// Accepts with `accept` (a connection and the local address handlers see) until `stop`, one
/// task per connection.
async fn accept_loop<S, F>(mut accept: impl FnMut() -> F, handler: Arc<Handler>, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    loop {
        let (stream, local) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(stream, local, handler.clone(), stop.clone()));
    }
}

async fn accept_failed(error: &std::io::Error) {
    tracing::warn!(%error, "HTTP accept failed");
    // EMFILE and friends: back off instead of spinning.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One HTTP/1 connection, closed gracefully (bounded) when `stop` fires.
async fn connection<S>(stream: S, local: SocketAddr, handler: Arc<Handler>, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let resp = handler(&req, local);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => if let Err(error) = res { tracing::debug!(%error, "HTTP connection"); },
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // Bounded: an idle keep-alive peer must not hold the task forever.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// A response with `headers` (already in Go's sorted order), then `Date` and `Content-Length`.
pub(crate) fn go_response(
    status: StatusCode,
    headers: &[(&'static str, HeaderValue)],
    body: String,
    clock: &dyn Clock,
) -> Response<Full<Bytes>> {
    let len = body.len();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let map = resp.headers_mut();
    for (name, value) in headers {
        map.insert(HeaderName::from_static(name), value.clone());
    }
    if let Ok(date) = HeaderValue::from_str(&http_date(clock.now())) {
        map.insert(http::header::DATE, date);
    }
    map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// `Content-Type: application/json` and `X-Content-Type-Options: nosniff`, as kube-proxy sets them.
pub(crate) fn json_headers() -> [(&'static str, HeaderValue); 2] {
    [
        ("content-type", HeaderValue::from_static("application/json")),
        ("x-content-type-options", HeaderValue::from_static("nosniff")),
    ]
}

/// Go's `http.NotFound`: what kube-proxy's mux answers for paths it does not know.
pub(crate) fn not_found(clock: &dyn Clock) -> Response<Full<Bytes>> {
    go_response(
        StatusCode::NOT_FOUND,
        &[
            ("content-type", HeaderValue::from_static("text/plain; charset=utf-8")),
            ("x-content-type-options", HeaderValue::from_static("nosniff")),
        ],
        "404 page not found\n".to_owned(),
        clock,
    )
}
