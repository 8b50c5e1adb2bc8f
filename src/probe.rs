//! `ferry probe`: one `GET` over the admin Unix socket (`--admin-socket`), exit 0 on `200`.
//!
//! An exec readiness probe for the DaemonSet. The admin TCP port is shared with a successor
//! during a handoff, so an `httpGet` probe may be answered by the other pod's process; the Unix
//! socket is per pod. One HTTP/1.1 request with hyper's client on a single-threaded runtime,
//! bounded as a whole by `--timeout`, then exit.

use std::process::ExitCode;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;

use crate::cli::ProbeArgs;

/// Runs `ferry probe`: prints the status and body (to stderr on failure); exit 0 only on 200.
pub(crate) fn run(args: &ProbeArgs) -> ExitCode {
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| {
            rt.block_on(async { tokio::time::timeout(args.timeout, get(args)).await })
                .map_err(|_| anyhow::anyhow!("no answer within {:?}", args.timeout))?
        });
    match answer {
        Ok((status, body)) if status == StatusCode::OK => {
            println!("{} {}", status.as_u16(), body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "ferry probe: {} {}: {} {}",
                args.socket.display(),
                args.path,
                status.as_u16(),
                body.trim_end()
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("ferry probe: {} {}: {error:#}", args.socket.display(), args.path);
            ExitCode::FAILURE
        }
    }
}

/// The status and body of `GET path`.
async fn get(args: &ProbeArgs) -> anyhow::Result<(StatusCode, String)> {
    let stream = tokio::net::UnixStream::connect(&args.socket).await.context("connecting")?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("starting HTTP/1.1")?;
    let connection = tokio::spawn(connection);
    let request = Request::get(&args.path)
        .header(header::HOST, "ferry")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender.send_request(request).await.context("sending the request")?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the body")?.to_bytes();
    drop(sender);
    connection.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
