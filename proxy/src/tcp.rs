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
//! Bytes first move through a per-thread scratch buffer (cheapest for small messages); a direction
//! whose read fills the buffer carries bulk data and switches to `splice(2)` through a pipe (Linux,
//! see [`crate::sys`]). Both are driven by tokio readiness (`readable()`/`writable()` + `try_io`),
//! so the two directions share one task and a connection owns no buffer of its own.

use std::{
    io::{self, Read as _},
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

    // `biased`: poll the relay first and skip select's per-poll random number; the drain token
    // is only a backstop.
    let outcome = tokio::select! {
        biased;
        r = relay(&client, &server, &state, zero_copy) => Some(r),
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
    half_close(client);
}

/// Writes the PROXY protocol v2 header for `client` (from `peer`) to `server`.
async fn send_proxy_header(client: &TcpStream, peer: SocketAddr, server: &TcpStream) -> io::Result<()> {
    let local = client.local_addr()?;
    let mut buf = [0u8; proxy_protocol::MAX_LEN];
    let n = proxy_protocol::encode_v2(peer, local, &mut buf);
    write_all(server, &buf[..n]).await.map_err(|(Fail::Read(e) | Fail::Write(e))| e)
}

/// TCP_NODELAY (small writes go out at once, as the client sent them); failure only costs latency.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

/// Arranges for the socket to be closed with RST when it is dropped.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn half_close(s: &TcpStream) {
    let _ = SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// Relays both directions until both ended; returns bytes (from client, to client).
async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    state: &ListenerState,
    zero_copy: bool,
) -> Result<(u64, u64), Error> {
    let (rx, tx) = (&state.metrics.rx, &state.metrics.tx);
    tokio::try_join!(
        async { one_way(client, server, rx, zero_copy).await.map_err(|f| side_error(f, true)) },
        async { one_way(server, client, tx, zero_copy).await.map_err(|f| side_error(f, false)) },
    )
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

/// Size of the per-thread copy buffer; a read that fills it switches the direction to splice.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// One copy buffer per worker thread. It is only borrowed between a read and the write that
    /// immediately follows it, never across an `.await`, so the tasks of a thread can share it.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// Moves bytes `from` -> `to` until EOF, then half-closes `to`. Returns the bytes moved.
///
/// Small messages (requests, responses, handshakes) are copied through the thread's scratch
/// buffer: a read is written out at once in the same poll, so no per-connection buffer exists
/// unless a write blocks (then only the unwritten rest is kept). Once a read fills the whole
/// buffer the direction is carrying bulk data and switches to `splice(2)` (Linux), which moves
/// pages without copying them through user space. This is HAProxy's `splice-auto` idea.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &metrics::Counter,
    zero_copy: bool,
) -> Result<u64, Fail> {
    let mut total = 0u64;
    let mut rest: Vec<u8> = Vec::new();
    loop {
        let ready = from.ready(Interest::READABLE).await.map_err(Fail::Read)?;
        // A read shorter than the buffer almost always drained the socket. Telling tokio so
        // (the closure reports WouldBlock after keeping the bytes) saves the read that would
        // only return EAGAIN: one system call per message. Not when the peer's FIN is already
        // known (`read_closed`), because then no further readiness event would wake us for EOF.
        // A race with newly arrived data is safe: tokio only clears readiness if no new event
        // arrived since `ready` was observed.
        let read_closed = ready.is_read_closed();
        let mut got = 0;
        let read = SCRATCH.with_borrow_mut(|buf| {
            from.try_io(Interest::READABLE, || {
                got = (&*SockRef::from(from)).read(buf)?;
                if got > 0 && got < buf.len() && !read_closed {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(got)
                }
            })
        });
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if transient(&e) && got > 0 => got,
            Err(e) if transient(&e) => continue,
            Err(e) => return Err(Fail::Read(e)),
        };
        let written = match SCRATCH.with_borrow(|buf| to.try_write(&buf[..n])) {
            Ok(m) => m,
            Err(e) if transient(&e) => 0,
            Err(e) => return Err(Fail::Write(e)),
        };
        if written < n {
            SCRATCH.with_borrow(|buf| rest.extend_from_slice(&buf[written..n]));
            write_all(to, &rest).await?;
            rest.clear();
        }
        total += n as u64;
        bytes.increment(n as u64);
        #[cfg(target_os = "linux")]
        if zero_copy
            && n == SCRATCH_LEN
            && let Ok(pipe) = crate::sys::Pipe::take()
        {
            return splice::rest(from, to, pipe, total, bytes).await;
        }
    }
    half_close(to);
    Ok(total)
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> Result<(), Fail> {
    while !buf.is_empty() {
        to.writable().await.map_err(Fail::Write)?;
        match to.try_write(buf) {
            Ok(m) => buf = &buf[m..],
            Err(e) if transient(&e) => {}
            Err(e) => return Err(Fail::Write(e)),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod splice {
    //! Zero-copy relay of one direction: socket -> pipe -> socket with `splice(2)`.

    use std::os::fd::AsRawFd;

    use super::*;
    use crate::sys::Pipe;

    /// Continues [`one_way`](super::one_way) with `splice`, from `total` bytes moved so far.
    pub(super) async fn rest(
        from: &TcpStream,
        to: &TcpStream,
        pipe: Pipe,
        mut total: u64,
        bytes: &metrics::Counter,
    ) -> Result<u64, Fail> {
        let cap = pipe.capacity();
        let (rfd, wfd) = (from.as_raw_fd(), to.as_raw_fd());
        let mut in_pipe = 0;
        let mut eof = false;
        let result = async {
            loop {
                let mut progress = false;
                // Read while the pipe has room, even while the writer is blocked, so both
                // sockets keep moving (a pipeline, not ping-pong).
                if !eof && in_pipe < cap {
                    // With an empty pipe, EAGAIN can only mean "socket drained": let tokio
                    // clear the read readiness. With data in the pipe, EAGAIN may mean "pipe
                    // full" instead, so the readiness must be left alone.
                    let filled = if in_pipe == 0 {
                        from.try_io(Interest::READABLE, || pipe.fill_from(rfd, cap.min(1 << 16)))
                    } else {
                        pipe.fill_from(rfd, (cap - in_pipe).min(1 << 16))
                    };
                    match filled {
                        Ok(0) => eof = true,
                        Ok(n) => {
                            in_pipe += n;
                            progress = true;
                        }
                        Err(e) if transient(&e) => {}
                        Err(e) => return Err(Fail::Read(e)),
                    }
                }
                if in_pipe > 0 {
                    match to.try_io(Interest::WRITABLE, || pipe.drain_to(wfd, in_pipe)) {
                        Ok(m) => {
                            in_pipe -= m;
                            total += m as u64;
                            bytes.increment(m as u64);
                            progress = true;
                        }
                        Err(e) if transient(&e) => {}
                        Err(e) => return Err(Fail::Write(e)),
                    }
                }
                if eof && in_pipe == 0 {
                    break;
                }
                if !progress {
                    if in_pipe == 0 {
                        from.readable().await.map_err(Fail::Read)?;
                    } else {
                        to.writable().await.map_err(Fail::Write)?;
                    }
                }
            }
            half_close(to);
            Ok(total)
        }
        .await;
        // A pipe that may still hold bytes is closed, never reused.
        if in_pipe == 0 {
            pipe.give_back();
        }
        result
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

    async fn exchange(size: usize, zero_copy: bool) {
        let (mut client, pc, ps, mut server) = pairs().await;
        let rx = metrics::Counter::noop();
        let tx = metrics::Counter::noop();
        let relay = async {
            tokio::try_join!(
                async { one_way(&pc, &ps, &rx, zero_copy).await.map_err(|f| side_error(f, true)) },
                async { one_way(&ps, &pc, &tx, zero_copy).await.map_err(|f| side_error(f, false)) },
            )
        };
        let payload: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
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

    /// Small transfers stay on the copy path.
    #[tokio::test]
    async fn small_transfer_half_close() {
        exchange(100, false).await;
        exchange(100, true).await;
    }

    /// Bulk transfers through the copy path.
    #[tokio::test]
    async fn bulk_transfer_half_close() {
        exchange(3_000_000, false).await;
    }

    /// With zero copy, bulk transfers switch to splice mid-stream; nothing is lost or reordered.
    #[tokio::test]
    async fn bulk_transfer_with_splice_half_close() {
        exchange(3_000_000, true).await;
    }
}
