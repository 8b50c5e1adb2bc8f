//! `ferry probe`: one `GET` over the admin Unix socket (`--admin-socket`), exit 0 on `200`.
//!
//! An exec readiness probe for the DaemonSet. The admin TCP port is shared with a successor
//! during a handoff, so an `httpGet` probe may be answered by the other pod's process; the Unix
//! socket is per pod. Plain blocking std I/O: one request, then exit.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    process::ExitCode,
};

use crate::cli::ProbeArgs;

/// Runs `ferry probe`: prints the status line (and the body on failure); exit 0 only on 200.
pub(crate) fn run(args: &ProbeArgs) -> ExitCode {
    match get(args) {
        Ok((status, body)) if status == 200 => {
            println!("{status} {}", body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("ferry probe: {} {}: {status} {}", args.socket.display(), args.path, body.trim_end());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("ferry probe: {} {}: {error}", args.socket.display(), args.path);
            ExitCode::FAILURE
        }
    }
}

/// The status code and body of `GET path`.
fn get(args: &ProbeArgs) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(&args.socket)?;
    stream.set_read_timeout(Some(args.timeout))?;
    stream.set_write_timeout(Some(args.timeout))?;
    write!(stream, "GET {} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n", args.path)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP/1.1 response: {response:.80}")))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
    Ok((status, body))
}
