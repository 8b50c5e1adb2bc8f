//! TCP proxying: the accept loop ([`serve`]) and one task per connection.
//!
//! Per connection: TCP_NODELAY on both sockets, pick an endpoint, connect with the
//! port's connect timeout, retry other endpoints up to `connect_attempts` (a fixed array of tried
//! addresses, no allocation), then relay both directions until both have ended.
//!
//! Relay semantics:
//! - EOF from one side -> `shutdown(Write)` on the other; the other direction keeps flowing.
//! - A read/write error (e.g. `ECONNRESET`) on one side -> the other side is closed with RST
//!   (`SO_LINGER` 0), and the connection ends.
//! - No endpoint, or every attempt failed -> the client is closed at once with RST.
//! - The routes drop the client ([`Route::Drop`]: outside `loadBalancerSourceRanges`, or a
//!   Local policy without local endpoints) -> the connection is *held*: nothing is read or sent
//!   until the client gives up, the routes change so that it can be served (then it is proxied
//!   as usual, the client's early bytes still queued in the kernel), or the hold timeout passes;
//!   then it is closed with FIN, never RST. This is the userspace equivalent of an iptables
//!   `DROP`: the client sees a completed handshake (the kernel accepted it before Ferry could
//!   decide), then silence, then an orderly close, where `DROP` gives a connect timeout.
//! - The endpoint's drain token cancelled -> both sides are closed with RST.
//! - With `proxy_protocol` on the port, a PROXY protocol v2 header (client address, frontend
//!   address) is written to the endpoint before any client byte.
//!
//! The bytes themselves move in [`relay`] (copy for small messages, `splice(2)` for bulk).

mod relay;

use relay::Outcome;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::SockRef;
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{
    error::Error,
    node::proxy_protocol,
    state::{ListenerState, Route, Upstreams},
};

/// Upper bound on endpoints tried for one connection (the listener kind allows 1..=16).
pub const MAX_CONNECT_ATTEMPTS: usize = 16;

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
    // TCP_NODELAY is inherited from the listening socket (see `manager::bind`).

    let Some(upstreams) = routed(&client, peer, &state).await else { return };
    // `routed` checked this very routing; `Drop` cannot come back.
    let Route::Pool(pool) = upstreams.route(peer.ip()) else { return };
    let timeouts = pool.port().timeouts;
    let zero_copy = pool.port().zero_copy;
    let proxy_protocol = pool.port().proxy_protocol;
    let source = upstreams.transparent_for(pool).then_some(peer);
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
        let error = match tokio::time::timeout(timeouts.connect, connect(addr, source, &state)).await {
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

    if proxy_protocol && let Err(error) = send_proxy_header(&client, peer, &server).await {
        tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "PROXY header not sent");
        reset(&client);
        return;
    }

    match relay::relay(&client, &server, &state.metrics.rx, &state.metrics.tx, zero_copy, &drain).await {
        Outcome::Closed(rx, tx) => {
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), rx, tx, "closed");
        }
        Outcome::Failed(error) => {
            // Propagate the failure as a reset to the side that is still alive.
            match error {
                Error::Client(_) => reset(&server),
                _ => reset(&client),
            }
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "reset");
        }
        Outcome::Drained => {
            reset(&client);
            reset(&server);
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), "drained");
        }
    }
}

/// Connects to `addr`; from `source`'s IP (`IP_TRANSPARENT`, kernel-chosen port) when given and
/// of the same family. If the transparent socket cannot be set up (no `CAP_NET_ADMIN`), the
/// connection is made from a local address instead and a warning is logged.
async fn connect(
    addr: SocketAddr,
    source: Option<SocketAddr>,
    state: &ListenerState,
) -> io::Result<TcpStream> {
    let Some(source) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await;
    };
    match transparent_socket(SocketAddr::new(source.ip(), 0)) {
        Ok(socket) => socket.connect(addr).await,
        Err(error) => {
            tracing::warn!(listener = %state.name(), client = %source, %error, "transparent upstream socket failed; connecting from a local address");
            TcpStream::connect(addr).await
        }
    }
}

/// A TCP socket bound to the (possibly non-local) address `from` with `IP_TRANSPARENT`.
fn transparent_socket(from: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(from), socket2::Type::STREAM, None)?;
    #[cfg(target_os = "linux")]
    if from.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&from.into())?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

/// The current upstreams once they route `peer` to a pool; `None` when the connection was
/// dropped and has been closed (see the module docs: hold, then FIN).
async fn routed(client: &TcpStream, peer: SocketAddr, state: &ListenerState) -> Option<Arc<Upstreams>> {
    let upstreams = state.upstreams();
    if matches!(upstreams.route(peer.ip()), Route::Pool(_)) {
        return Some(upstreams);
    }
    drop(upstreams);
    state.metrics.dropped.increment(1);
    let Some(_slot) = state.try_hold() else {
        tracing::debug!(listener = %state.name(), client = %peer, "dropped; too many held connections, closing");
        close_quietly(client);
        return None;
    };
    tracing::debug!(listener = %state.name(), client = %peer, "dropped; holding the connection");
    let deadline = tokio::time::sleep(state.hold().timeout);
    tokio::pin!(deadline);
    loop {
        let changed = state.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let upstreams = state.upstreams();
        if matches!(upstreams.route(peer.ip()), Route::Pool(_)) {
            tracing::debug!(listener = %state.name(), client = %peer, "routes changed; serving a held connection");
            return Some(upstreams);
        }
        drop(upstreams);
        tokio::select! {
            () = &mut deadline => break,
            () = state.drain_token().cancelled() => break,
            () = changed => {}
            gone = client_gone(client) => if gone { break },
        }
    }
    tracing::debug!(listener = %state.name(), client = %peer, "closing a held connection");
    close_quietly(client);
    None
}

/// Waits for a readiness event on `client` without reading: `true` when the client closed or
/// reset, `false` when it only sent data (which stays queued; readiness is cleared so the next
/// call waits for a new event).
async fn client_gone(client: &TcpStream) -> bool {
    match client.ready(Interest::READABLE).await {
        Ok(r) if r.is_read_closed() || r.is_error() => true,
        Ok(_) => {
            let _ = client.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
            false
        }
        Err(_) => true,
    }
}

/// Closes `client` with FIN, not RST: Linux answers a close with unread data by RST, so the
/// queued bytes are read and discarded first (bounded: at most 64 reads).
fn close_quietly(client: &TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match client.try_read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    relay::half_close(client);
}

/// Writes the PROXY protocol v2 header for `client` (from `peer`) to `server`.
async fn send_proxy_header(client: &TcpStream, peer: SocketAddr, server: &TcpStream) -> io::Result<()> {
    let local = client.local_addr()?;
    let mut buf = [0u8; proxy_protocol::MAX_LEN];
    let n = proxy_protocol::encode_v2(peer, local, &mut buf);
    relay::write_all(server, &buf[..n]).await
}

/// TCP_NODELAY (small writes go out at once, as the client sent them); failure only costs latency.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

/// Arranges for the socket to be closed with RST when it is dropped.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted socket inherits TCP_NODELAY from the listener, so `handle` need not set it.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let socket =
            crate::manager::bind(ferry_model::Protocol::Tcp, "127.0.0.1:0".parse().expect("addr"), false)
                .expect("bind");
        let listener = TcpListener::from_std(socket.into()).expect("listener");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("nodelay"));
    }
}
