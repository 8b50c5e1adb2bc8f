//! TCP proxying: the accept loop ([`serve`]) and one task per connection.
//!
//! Per connection: TCP_NODELAY and keepalive on both sockets, pick an endpoint, connect with the
//! port's connect timeout, retry other endpoints up to `connect_attempts` (a fixed array of tried
//! addresses, no allocation), then relay both directions until both have ended.
//!
//! Relay semantics:
//! - EOF from one side -> `shutdown(Write)` on the other; the other direction keeps flowing.
//! - A read/write error (e.g. `ECONNRESET`) on one side -> the other side is closed with RST
//!   (`SO_LINGER` 0), and the connection ends.
//! - No endpoint, or every attempt failed -> the client is closed at once with RST.
//! - The endpoint's drain token cancelled -> both sides are closed with RST.
//!
//! On Linux bytes move with `splice(2)` through a pipe per direction (see [`crate::sys`]); if
//! pipes or splice are unavailable the relay falls back to a buffered copy. Both are driven by
//! tokio readiness (`readable()`/`writable()` + `try_io`), so the two directions share one task.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{error::Error, state::ListenerState};

/// Upper bound on endpoints tried for one connection (the listener kind allows 1..=16).
pub const MAX_CONNECT_ATTEMPTS: usize = 16;

const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts clients on `listener` until `stop` is cancelled, proxying each to an endpoint of
/// `state`'s current pool. Connections are spawned on `state.tasks()` and outlive the loop; they
/// end by themselves, or when `state.drain_token()` (or their endpoint's drain) is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<ListenerState>, stop: CancellationToken) {
    let local =
        listener.local_addr().unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    tracing::debug!(listener = %state.name(), %local, "accepting");
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = Duration::from_millis(5);
                state.metrics.connections.increment(1);
                let state2 = state.clone();
                state.tasks.spawn(handle(client, peer, state2));
            }
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(listener = %state.name(), error = %e, "accepted connection failed");
            }
            Err(source) => {
                let error = Error::Accept { addr: local, source };
                tracing::warn!(listener = %state.name(), %error, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::debug!(listener = %state.name(), %local, "stopped accepting");
}

/// Errors that concern one accepted connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}

/// Keeps the active-connection gauge right however a connection ends.
struct Active<'a>(&'a ListenerState);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.closed();
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, state: Arc<ListenerState>) {
    state.opened();
    let _active = Active(&state);
    tune(&client);

    let upstreams = state.upstreams();
    let pool = upstreams.pool();
    let timeouts = pool.port().timeouts;
    let attempts = (timeouts.connect_attempts as usize).clamp(1, MAX_CONNECT_ATTEMPTS);
    let mut tried = [SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0); MAX_CONNECT_ATTEMPTS];
    let mut n = 0;
    let connected = loop {
        if n == attempts {
            break None;
        }
        let Some(lease) = pool.pick(peer.ip(), &tried[..n]) else {
            if n == 0 {
                tracing::warn!(listener = %state.name(), client = %peer, error = %Error::NoEndpoint, "closing client");
            }
            break None;
        };
        let addr = lease.addr();
        tried[n] = addr;
        n += 1;
        let error = match tokio::time::timeout(timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(server)) => {
                lease.endpoint().report_connect_success();
                break Some((server, lease));
            }
            Ok(Err(source)) => Error::Connect { addr, source },
            Err(_) => Error::ConnectTimeout { addr, timeout: timeouts.connect },
        };
        lease.endpoint().report_connect_failure();
        state.metrics.connect_failures.increment(1);
        tracing::warn!(listener = %state.name(), client = %peer, attempt = n, %error, "upstream connect failed");
    };
    let Some((server, lease)) = connected else {
        // Nothing could be reached (none usable, or every attempt failed): reset at once.
        state.metrics.no_endpoint.increment(1);
        reset(&client);
        return;
    };
    let drain = upstreams.drain_token(lease.addr()).unwrap_or(state.drain_token()).clone();
    // Do not keep the whole pool alive for the connection's lifetime.
    drop(upstreams);
    tune(&server);
    tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), "connected");

    let outcome = tokio::select! {
        r = relay(&client, &server, &state) => Some(r),
        () = drain.cancelled() => None,
    };
    match outcome {
        Some(Ok((rx, tx))) => {
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), rx, tx, "closed");
        }
        Some(Err(error)) => {
            // Propagate the failure as a reset to the side that is still alive.
            match error {
                Error::Client(_) => reset(&server),
                _ => reset(&client),
            }
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "reset");
        }
        None => {
            reset(&client);
            reset(&server);
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), "drained");
        }
    }
}

/// TCP_NODELAY and keepalive; failures only cost latency or liveness detection.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = TcpKeepalive::new().with_time(KEEPALIVE_TIME).with_interval(KEEPALIVE_INTERVAL);
    let _ = SockRef::from(s).set_tcp_keepalive(&ka);
}

/// Arranges for the socket to be closed with RST when it is dropped.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn half_close(s: &TcpStream) {
    let _ = SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// Relays both directions until both ended; returns bytes (from client, to client).
async fn relay(client: &TcpStream, server: &TcpStream, state: &ListenerState) -> Result<(u64, u64), Error> {
    #[cfg(target_os = "linux")]
    if let Some(r) = splice::relay(client, server, &state.metrics.rx, &state.metrics.tx).await {
        return r;
    }
    copy::relay(client, server, &state.metrics.rx, &state.metrics.tx).await
}

/// Which side a one-direction copy failed on.
enum Fail {
    Read(io::Error),
    Write(io::Error),
}

fn side_error(fail: Fail, from_client: bool) -> Error {
    match (fail, from_client) {
        (Fail::Read(e), true) | (Fail::Write(e), false) => Error::Client(e),
        (Fail::Read(e), false) | (Fail::Write(e), true) => Error::Upstream(e),
    }
}

#[cfg(target_os = "linux")]
mod splice {
    //! Zero-copy relay: socket -> pipe -> socket with `splice(2)`.

    use std::os::fd::AsRawFd;

    use super::*;
    use crate::sys::Pipe;

    /// Bytes moved per splice call (the default pipe capacity).
    const CHUNK: usize = 1 << 16;

    /// `None` when pipes are unavailable (the caller falls back to copying).
    pub(super) async fn relay(
        client: &TcpStream,
        server: &TcpStream,
        rx: &metrics::Counter,
        tx: &metrics::Counter,
    ) -> Option<Result<(u64, u64), Error>> {
        let up = Pipe::take().ok()?;
        let Ok(down) = Pipe::take() else {
            up.give_back();
            return None;
        };
        let mut up_left = 0;
        let mut down_left = 0;
        let r = tokio::try_join!(
            async { one_way(client, server, &up, &mut up_left, rx).await.map_err(|f| side_error(f, true)) },
            async {
                one_way(server, client, &down, &mut down_left, tx).await.map_err(|f| side_error(f, false))
            },
        );
        // A pipe that may still hold bytes is closed, never reused.
        if up_left == 0 {
            up.give_back();
        }
        if down_left == 0 {
            down.give_back();
        }
        Some(r)
    }

    async fn one_way(
        from: &TcpStream,
        to: &TcpStream,
        pipe: &Pipe,
        in_pipe: &mut usize,
        bytes: &metrics::Counter,
    ) -> Result<u64, Fail> {
        let mut total = 0u64;
        loop {
            from.readable().await.map_err(Fail::Read)?;
            let n = match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_raw_fd(), CHUNK)) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Read(e)),
            };
            *in_pipe += n;
            while *in_pipe > 0 {
                to.writable().await.map_err(Fail::Write)?;
                match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_raw_fd(), *in_pipe)) {
                    Ok(m) => {
                        *in_pipe -= m;
                        total += m as u64;
                        bytes.increment(m as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Fail::Write(e)),
                }
            }
        }
        half_close(to);
        Ok(total)
    }
}

mod copy {
    //! Buffered relay for systems without splice.

    use super::*;

    const BUF: usize = 16 * 1024;

    pub(super) async fn relay(
        client: &TcpStream,
        server: &TcpStream,
        rx: &metrics::Counter,
        tx: &metrics::Counter,
    ) -> Result<(u64, u64), Error> {
        tokio::try_join!(
            async { one_way(client, server, rx).await.map_err(|f| side_error(f, true)) },
            async { one_way(server, client, tx).await.map_err(|f| side_error(f, false)) },
        )
    }

    async fn one_way(from: &TcpStream, to: &TcpStream, bytes: &metrics::Counter) -> Result<u64, Fail> {
        let mut buf = vec![0u8; BUF];
        let mut total = 0u64;
        loop {
            from.readable().await.map_err(Fail::Read)?;
            let n = match from.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Read(e)),
            };
            let mut off = 0;
            while off < n {
                to.writable().await.map_err(Fail::Write)?;
                match to.try_write(&buf[off..n]) {
                    Ok(m) => {
                        off += m;
                        total += m as u64;
                        bytes.increment(m as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Fail::Write(e)),
                }
            }
        }
        half_close(to);
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Two connected pairs: (client, proxy's client side) and (proxy's server side, server).
    async fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (pc, _) = l.accept().await.expect("accept");
        let ps = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        (client, pc, ps, server)
    }

    async fn exchange(splice: bool) {
        let (mut client, pc, ps, mut server) = pairs().await;
        let rx = metrics::Counter::noop();
        let tx = metrics::Counter::noop();
        let relay = async {
            #[cfg(target_os = "linux")]
            if splice {
                return splice::relay(&pc, &ps, &rx, &tx).await.expect("pipes");
            }
            let _ = splice;
            copy::relay(&pc, &ps, &rx, &tx).await
        };
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let ends = async {
            client.write_all(&payload).await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("server reads to EOF");
            server.write_all(b"reply after EOF").await.expect("reply");
            server.shutdown().await.expect("close");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("client reads reply");
            (got, back)
        };
        let (r, (got, back)) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(relay, ends) })
                .await
                .expect("in time");
        assert_eq!(r.expect("relay"), (payload.len() as u64, 15));
        assert!(got == payload);
        assert_eq!(back, b"reply after EOF");
    }

    #[tokio::test]
    async fn copy_relay_half_close() {
        exchange(false).await;
    }

    #[tokio::test]
    async fn splice_relay_half_close() {
        exchange(true).await;
    }
}
