//! TCP proxying: the accept loop ([`serve`]) and one task per connection.
//!
//! Per connection: TCP_NODELAY on both sockets, pick an endpoint, connect with the
//! port's connect timeout, retry other endpoints up to `connect_attempts` (a fixed array of tried
//! addresses, no allocation), then relay both directions until both have ended.
//!
//! Early send (HAProxy's speculative I/O): a client that speaks first has usually sent its first
//! bytes before the accept. Unless the port writes a PROXY header, they are read right after the
//! upstream `connect(2)` returns and sent at once; to an endpoint on the same host the handshake is
//! done by then, so the request leaves one event-loop round trip sooner and the backend finds it
//! queued with the connection (it need not sleep between its accept and its read). Endpoints whose
//! connects do not complete at once are tried only now and then
//! ([`ferry_lb::EndpointState::send_early`]). With an early send the client is registered with
//! the reactor only afterwards, so epoll reports nothing for the bytes already read; without one it
//! is registered before the connect, so its readiness is known when the connect completes.
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
//! The bytes themselves move in [`relay`] (copy for small messages, `splice(2)` for bulk); the
//! sockets are std sockets registered with the reactor ([`stream`]).

mod relay;
mod stream;

use relay::Outcome;
pub use stream::{Listener, Stream, listener};

use std::{
    future::poll_fn,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
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
pub async fn serve(listener: Listener, state: Arc<ListenerState>, stop: CancellationToken) {
    let local = listener
        .get_ref()
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    tracing::debug!(listener = %state.name(), %local, "accepting");
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = poll_fn(|cx| stream::poll_accept(&listener, cx)) => r,
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

/// An accepted client: registered with the reactor before the upstream connect, unless its first
/// bytes are to be sent early (see the module docs); then once its upstream connection exists.
enum Client {
    Accepted(std::net::TcpStream),
    Registered(Stream),
}

impl Client {
    fn socket(&self) -> &std::net::TcpStream {
        match self {
            Self::Accepted(s) => s,
            Self::Registered(s) => s.get_ref(),
        }
    }

    fn register(self) -> io::Result<Stream> {
        match self {
            Self::Accepted(s) => crate::sys::register(s),
            Self::Registered(s) => Ok(s),
        }
    }
}

async fn handle(client: std::net::TcpStream, peer: SocketAddr, state: Arc<ListenerState>) {
    state.opened();
    let _active = Active(&state);
    // TCP_NODELAY is inherited from the listening socket (see `manager::bind`).

    let upstreams = state.upstreams();
    let (mut client, upstreams) = if matches!(upstreams.route(peer.ip()), Route::Pool(_)) {
        (Client::Accepted(client), upstreams)
    } else {
        drop(upstreams);
        let Some(client) = registered(Client::Accepted(client), peer, &state) else { return };
        let Some(upstreams) = held(&client, peer, &state).await else { return };
        (Client::Registered(client), upstreams)
    };
    // This very routing was checked above (or by `held`); `Drop` cannot come back.
    let Route::Pool(pool) = upstreams.route(peer.ip()) else { return };
    let timeouts = pool.port().timeouts;
    let zero_copy = pool.port().zero_copy;
    let proxy_protocol = pool.port().proxy_protocol;
    let source = upstreams.transparent_for(pool).then_some(peer);
    let attempts = (timeouts.connect_attempts as usize).clamp(1, MAX_CONNECT_ATTEMPTS);
    let mut tried = [SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0); MAX_CONNECT_ATTEMPTS];
    let mut n = 0;
    let mut early = relay::Early::default();
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
        let send_early = !proxy_protocol && lease.endpoint().send_early();
        if !send_early && matches!(client, Client::Accepted(_)) {
            // Register now, so the client's readiness is known by the time the connect is.
            let Some(registered) = registered(client, peer, &state) else { return };
            client = Client::Registered(registered);
        }
        let early = send_early.then_some((client.socket(), &mut early));
        let error = match tokio::time::timeout(timeouts.connect, connect(addr, source, &state, early)).await {
            Ok(Ok((server, sent))) => {
                if let Some(complete) = sent {
                    lease.endpoint().report_early_send(complete);
                }
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
        relay::reset(client.socket());
        return;
    };
    if let Some(error) = early.client_failed() {
        tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "reset");
        relay::reset(&server);
        return;
    }
    let Some(client) = registered(client, peer, &state) else {
        relay::reset(&server);
        return;
    };
    let drain = upstreams.drain_token(lease.addr()).unwrap_or(state.drain_token()).clone();
    // Do not keep the whole pool alive for the connection's lifetime.
    drop(upstreams);
    tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), "connected");

    if proxy_protocol && let Err(error) = send_proxy_header(&client, peer, &server).await {
        tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "PROXY header not sent");
        relay::reset(&client);
        return;
    }

    let outcome =
        relay::relay(&client, &server, &state.metrics.rx, &state.metrics.tx, zero_copy, &drain, early).await;
    outcome.arm_resets(&client, &server);
    match outcome {
        Outcome::Closed(rx, tx) => {
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), rx, tx, "closed");
        }
        Outcome::Failed(error) => {
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), %error, "reset");
        }
        Outcome::Drained => {
            tracing::debug!(listener = %state.name(), client = %peer, endpoint = %lease.addr(), "drained");
        }
    }
}

/// `client` registered with the reactor; `None` (logged, and the client closed) when that fails.
fn registered(client: Client, peer: SocketAddr, state: &ListenerState) -> Option<Stream> {
    client
        .register()
        .inspect_err(
            |error| tracing::warn!(listener = %state.name(), client = %peer, %error, "closing client"),
        )
        .ok()
}

/// Connects to `addr`; from `source`'s IP (`IP_TRANSPARENT`, kernel-chosen port) when given and
/// of the same family. If the transparent socket cannot be set up (no `CAP_NET_ADMIN`), the
/// connection is made from a local address instead and a warning is logged.
async fn connect(
    addr: SocketAddr,
    source: Option<SocketAddr>,
    state: &ListenerState,
    early: Option<(&std::net::TcpStream, &mut relay::Early)>,
) -> io::Result<(Stream, Option<bool>)> {
    let from = source.map(|s| s.ip()).filter(|ip| ip.is_ipv4() == addr.is_ipv4());
    let socket = match (stream::socket(addr, from), source) {
        (Err(error), Some(client)) if from.is_some() => {
            tracing::warn!(listener = %state.name(), %client, %error, "transparent upstream socket failed; connecting from a local address");
            stream::socket(addr, None)?
        }
        (socket, _) => socket?,
    };
    stream::connect(socket, addr, early).await
}

/// Holds a client whose routing said `Drop` (see the module docs): the current upstreams once
/// they route `peer` to a pool; `None` when the hold ended and the client has been closed (FIN).
async fn held(client: &Stream, peer: SocketAddr, state: &ListenerState) -> Option<Arc<Upstreams>> {
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
async fn client_gone(client: &Stream) -> bool {
    match poll_fn(|cx| client.poll_read_ready(cx)).await {
        // A FIN or a reset (epoll's HUP counts as read-closed too).
        Ok(ready) if ready.ready().is_read_closed() => true,
        Ok(mut ready) => {
            ready.clear_ready();
            false
        }
        Err(_) => true,
    }
}

/// Closes `client` with FIN, not RST: Linux answers a close with unread data by RST, so the
/// queued bytes are read and discarded first (bounded: at most 64 reads).
fn close_quietly(client: &Stream) {
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match relay::recv(client.get_ref(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    relay::half_close(client);
}

/// Writes the PROXY protocol v2 header for `client` (from `peer`) to `server`.
async fn send_proxy_header(client: &Stream, peer: SocketAddr, server: &Stream) -> io::Result<()> {
    let local = client.get_ref().local_addr()?;
    let mut buf = [0u8; proxy_protocol::MAX_LEN];
    let n = proxy_protocol::encode_v2(peer, local, &mut buf);
    relay::write_all(server, &buf[..n]).await
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
        let listener = listener(socket).expect("listener");
        let addr = listener.get_ref().local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = poll_fn(|cx| stream::poll_accept(&listener, cx)).await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        assert!(accepted.nodelay().expect("nodelay"));
    }

    /// A connect to a closed port fails with the kernel's reason, read only after the hang-up.
    #[tokio::test]
    async fn connect_reports_refusal() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let socket = stream::socket(addr, None).expect("socket");
        let error = stream::connect(socket, addr, None).await.expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A successful connect gives a writable stream with TCP_NODELAY set.
    #[tokio::test]
    async fn connect_sets_nodelay() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let socket = stream::socket(addr, None).expect("socket");
        let (connected, accepted) = tokio::join!(stream::connect(socket, addr, None), server.accept());
        let (connected, sent) = connected.expect("connected");
        assert_eq!(sent, None, "nothing to send early");
        let (_accepted, peer) = accepted.expect("accepted");
        assert_eq!(connected.get_ref().local_addr().expect("local"), peer);
        assert!(connected.get_ref().nodelay().expect("nodelay"));
    }

    /// A client that has sent `bytes` (queued on the returned accepted socket, not yet read).
    fn spoken(bytes: &[u8]) -> (std::net::TcpStream, std::net::TcpStream) {
        use std::io::Write as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        client.write_all(bytes).expect("client writes");
        let (accepted, _) = l.accept().expect("accept");
        // Readiness signal: a blocking peek returns once the bytes are queued.
        let mut peek = vec![0u8; bytes.len()];
        while !bytes.is_empty() && accepted.peek(&mut peek).expect("peek") < bytes.len() {}
        accepted.set_nonblocking(true).expect("non-blocking");
        (client, accepted)
    }

    async fn read_exactly(server: &tokio::net::TcpListener, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let (mut s, _) = server.accept().await.expect("accept");
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).await.expect("read");
        got
    }

    /// Connects to a new local listener, sending `accepted`'s queued bytes early: the listener,
    /// the upstream stream, how the early send went, and what was kept.
    async fn connect_early(
        accepted: &std::net::TcpStream,
    ) -> (tokio::net::TcpListener, Stream, Option<bool>, relay::Early) {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let mut early = relay::Early::default();
        let socket = stream::socket(addr, None).expect("socket");
        let (up, sent) =
            stream::connect(socket, addr, Some((accepted, &mut early))).await.expect("connected");
        (server, up, sent, early)
    }

    /// The client's first bytes go upstream as `connect(2)` returns: on loopback the handshake is
    /// done by then, so the send is accepted whole and nothing is kept for the relay.
    #[tokio::test]
    async fn early_send_passes_first_bytes_at_once() {
        let (_client, accepted) = spoken(b"GET / HTTP/1.1\r\n\r\n");
        let (server, _up, sent, early) = connect_early(&accepted).await;
        assert_eq!(sent, Some(true), "the handshake was done when connect returned");
        assert!(early.pending().is_empty());
        assert_eq!(read_exactly(&server, 18).await, b"GET / HTTP/1.1\r\n\r\n");
    }

    /// A refused connect keeps the client's bytes for the next endpoint, which gets them once.
    #[tokio::test]
    async fn early_bytes_survive_a_refused_connect() {
        let (_client, accepted) = spoken(b"hello");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = closed.local_addr().expect("addr");
        drop(closed);
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let mut early = relay::Early::default();
        let socket = stream::socket(refused, None).expect("socket");
        let error =
            stream::connect(socket, refused, Some((&accepted, &mut early))).await.expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(early.pending(), b"hello", "kept for the next attempt");
        let socket = stream::socket(addr, None).expect("socket");
        let (_up, sent) =
            stream::connect(socket, addr, Some((&accepted, &mut early))).await.expect("connected");
        assert_eq!(sent, Some(true));
        assert!(early.pending().is_empty());
        assert_eq!(read_exactly(&server, 5).await, b"hello");
    }

    /// When the handshake is not done as `connect(2)` returns (here: the listener's accept queue
    /// is full, so its SYN is dropped and retransmitted a second later), the send finds the
    /// connect in progress and the bytes stay for the relay; the connect still completes.
    #[tokio::test]
    async fn early_bytes_wait_for_a_connect_in_progress() {
        let (_client, accepted) = spoken(b"hello");
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        listener.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into()).expect("bind");
        listener.listen(0).expect("listen");
        let listener = std::net::TcpListener::from(listener);
        let addr = listener.local_addr().expect("addr");
        let _queued = std::net::TcpStream::connect(addr).expect("fills the accept queue");
        let mut early = relay::Early::default();
        let socket = stream::socket(addr, None).expect("socket");
        let connect = stream::connect(socket, addr, Some((&accepted, &mut early)));
        // `join!` polls the connect first: its SYN is dropped before the queue is emptied.
        let (connected, ()) = tokio::join!(connect, async {
            let _ = listener.accept().expect("accept the queued connection");
        });
        let (_up, sent) = connected.expect("connected after the SYN's retransmission");
        assert_eq!(sent, Some(false), "the early send found the connect in progress");
        assert_eq!(early.pending(), b"hello", "the relay writes these first");
    }

    /// A client that reset before its first bytes were read is reported, so `handle` resets the
    /// upstream instead of relaying an EOF.
    #[tokio::test]
    async fn early_read_reports_a_client_reset() {
        let (client, accepted) = spoken(b"");
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(client);
        // Wait for the RST without reading (a read would consume the error).
        let accepted = tokio::net::TcpStream::from_std(accepted).expect("register");
        tokio::time::timeout(Duration::from_secs(5), accepted.readable())
            .await
            .expect("reset in time")
            .expect("readable");
        let accepted = accepted.into_std().expect("deregister");
        let (_server, _up, sent, early) = connect_early(&accepted).await;
        assert_eq!(sent, None, "nothing was sent");
        assert_eq!(early.client_failed().map(io::Error::kind), Some(io::ErrorKind::ConnectionReset));
    }
}
