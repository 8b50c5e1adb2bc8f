//! One health probe: a TCP connect, or an HTTP/1.1 `GET` whose status must be expected.
//!
//! The HTTP client is deliberately tiny: it writes one request with `Host` and
//! `Connection: close`, reads at most [`MAX_STATUS_LINE`] bytes until the first line ends, parses
//! `HTTP/1.x NNN ...` and closes the connection. Headers and body are never read. The whole probe
//! (connect included) runs under the check's `timeout`.

use std::{io, net::SocketAddr, time::Duration};

use ferry_model::{HealthCheck, HealthCheckKind};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The most bytes read while looking for the status line.
pub const MAX_STATUS_LINE: usize = 4096;

/// Accepted statuses when a check lists none.
const DEFAULT_STATUSES: &[(u16, u16)] = &[(200, 399)];

/// Why a probe failed. Every failure is the endpoint's side (or the path to it) except
/// [`ProbeError::InvalidRequest`], a configuration error; probes are retried every interval
/// regardless, which is always safe (they are idempotent `GET`s or bare connects).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The TCP connect to the endpoint failed (refused, unreachable).
    #[error("connect to endpoint failed: {0}")]
    Connect(#[source] io::Error),
    /// The probe did not complete within the check's timeout.
    #[error("endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// Reading from or writing to the endpoint failed after connecting.
    #[error("I/O with endpoint failed: {0}")]
    Io(#[source] io::Error),
    /// The endpoint closed the connection before a complete status line.
    #[error("endpoint closed the connection before sending a status line")]
    Closed,
    /// The endpoint's first line is not an HTTP/1.x status line, or is too long.
    #[error("endpoint sent a malformed HTTP status line")]
    BadStatusLine,
    /// The endpoint answered with a status outside the expected ranges.
    #[error("endpoint answered HTTP status {0}, not an expected one")]
    UnexpectedStatus(u16),
    /// The configured path or host cannot be sent (whitespace or control characters).
    #[error("health check configuration cannot form a request: {0}")]
    InvalidRequest(&'static str),
}

/// Probes `addr` once according to `check`.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    tokio::time::timeout(check.timeout, probe_untimed(addr, &check.kind))
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

async fn probe_untimed(addr: SocketAddr, kind: &HealthCheckKind) -> Result<(), ProbeError> {
    let request = match kind {
        HealthCheckKind::Tcp => None,
        HealthCheckKind::Http { path, host, .. } => Some(request(addr, path, host.as_deref())?),
    };
    let mut stream = TcpStream::connect(addr).await.map_err(ProbeError::Connect)?;
    let (Some(request), HealthCheckKind::Http { expected_statuses, .. }) = (request, kind) else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    stream.write_all(request.as_bytes()).await.map_err(ProbeError::Io)?;
    let status = read_status(&mut stream).await?;
    let expected = if expected_statuses.is_empty() { DEFAULT_STATUSES } else { expected_statuses };
    if expected.iter().any(|&(lo, hi)| (lo..=hi).contains(&status)) {
        Ok(())
    } else {
        Err(ProbeError::UnexpectedStatus(status))
    }
}

/// The request text for an HTTP probe.
fn request(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<String, ProbeError> {
    let bad = |s: &str| s.bytes().any(|b| b <= b' ' || b == 0x7f);
    let path = if path.is_empty() { "/" } else { path };
    if bad(path) {
        return Err(ProbeError::InvalidRequest("path contains whitespace or control characters"));
    }
    let host = host.map_or_else(|| addr.to_string(), str::to_owned);
    if host.is_empty() || bad(&host) {
        return Err(ProbeError::InvalidRequest("host is empty or contains whitespace or control characters"));
    }
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: ferry-health-check\r\n\
         Accept: */*\r\n\r\n"
    ))
}

/// Reads up to the end of the first line (at most [`MAX_STATUS_LINE`] bytes) and parses it.
async fn read_status(stream: &mut TcpStream) -> Result<u16, ProbeError> {
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(ProbeError::BadStatusLine);
        }
        let n = stream.read(&mut buf[len..]).await.map_err(ProbeError::Io)?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        let scanned = len;
        len += n;
        if let Some(end) = buf[scanned..len].iter().position(|&b| b == b'\n') {
            return parse_status_line(&buf[..scanned + end]).ok_or(ProbeError::BadStatusLine);
        }
    }
}

/// Parses `HTTP/1.<d> <3 digits>[ reason][\r]` into the status code.
pub fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    if !minor.is_ascii_digit() {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let (code, reason) = rest.split_at_checked(3)?;
    if !code.iter().all(u8::is_ascii_digit) || !(reason.is_empty() || reason[0] == b' ') {
        return None;
    }
    let status = code.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    (100..=999).contains(&status).then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 "), Some(204));
        for bad in [
            &b""[..],
            b"HTTP/2 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20a OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.x 200 OK",
            b"HTTP/1.1 099 OK",
            b"SSH-2.0-OpenSSH",
        ] {
            assert_eq!(parse_status_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn builds_requests() {
        let addr: SocketAddr = "[::1]:8080".parse().expect("addr");
        let r = request(addr, "", None).expect("valid");
        assert!(r.starts_with("GET / HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"));
        let r = request(addr, "/healthz?x=1", Some("web.local")).expect("valid");
        assert!(r.starts_with("GET /healthz?x=1 HTTP/1.1\r\nHost: web.local\r\n"), "{r}");
        assert!(matches!(request(addr, "/a b", None), Err(ProbeError::InvalidRequest(_))));
        assert!(matches!(request(addr, "/\r\nX: y", None), Err(ProbeError::InvalidRequest(_))));
        assert!(matches!(request(addr, "/", Some("")), Err(ProbeError::InvalidRequest(_))));
    }
}
