//! The sockets of proxied TCP connections: std sockets registered with the runtime's reactor
//! through [`AsyncFd`], rather than tokio's `TcpStream`.
//!
//! Why: the guard that `AsyncFd::poll_read_ready` returns carries the readiness bits epoll
//! reported, so the relay learns that the peer's FIN has arrived together with its last data at no
//! cost (tokio's `TcpStream` only exposes that through a readiness future whose drop takes the
//! socket's lock), and a connect is known to have succeeded from its write readiness alone.
//!
//! Each socket costs the system calls tokio's own does, less the `getsockopt(SO_ERROR)` after a
//! successful connect: one `accept4`, or `socket` + `setsockopt(TCP_NODELAY)` + `connect`
//! (non-blocking and close-on-exec from the start), one `epoll_ctl(ADD)`, and on drop one
//! `epoll_ctl(DEL)` and the `close`.

use std::{
    future::poll_fn,
    io,
    net::{IpAddr, SocketAddr},
    task::{Context, Poll, ready},
};

use rustix::net::SocketFlags;
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::relay::{self, Early};
use crate::sys;

/// A connected, non-blocking TCP socket registered for read and write readiness.
pub type Stream = AsyncFd<std::net::TcpStream>;

/// A listening, non-blocking TCP socket registered for readiness.
pub type Listener = AsyncFd<std::net::TcpListener>;

/// Registers a bound, listening, non-blocking `socket` (see `manager::bind`). Must be called on a
/// runtime thread.
pub fn listener(socket: Socket) -> io::Result<Listener> {
    sys::register(socket.into())
}

/// Accepts one connection on `listener`: `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`. The
/// accepted socket inherits the listener's `TCP_NODELAY`. The caller registers it: before the
/// upstream connect, or after an early send has read what the client had sent (so that no
/// readiness event is queued for those bytes; see `tcp`'s module docs).
pub(super) fn poll_accept(
    listener: &Listener,
    cx: &mut Context<'_>,
) -> Poll<io::Result<(std::net::TcpStream, SocketAddr)>> {
    loop {
        let mut guard = ready!(listener.poll_read_ready(cx))?;
        if let Ok(accepted) = guard.try_io(|l| accept(l.get_ref())) {
            return Poll::Ready(accepted);
        }
        // `try_io` cleared the readiness on EAGAIN: wait for the next connection.
    }
}

fn accept(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (fd, peer) = rustix::net::acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let peer = peer
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or_else(|| io::Error::other("accepted a peer without an IP address"))?;
    Ok((fd.into(), peer))
}

/// A new non-blocking TCP socket for `addr`'s family with `TCP_NODELAY`; bound to the IP `from`
/// (`IP_TRANSPARENT`, kernel-chosen port) when given, which must be of `addr`'s family. Binding
/// to a non-local IP fails without `CAP_NET_ADMIN`.
pub(super) fn socket(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = from {
        transparent(&socket, ip)?;
    }
    Ok(socket)
}

/// Connects `socket` (from [`socket`]) to `addr`. With `early` (the client's socket and its
/// [`Early`] bytes), the client's first bytes are sent as soon as `connect(2)` returns (see
/// [`relay::send_early`]); the second value is how that went: `Some(true)` when the send found the
/// handshake done, `Some(false)` when it did not, `None` when nothing was sent.
///
/// Otherwise the connect counts as done when the socket turns writable. Only when epoll also
/// reported a hang-up (refused, unreachable, timed out) is `SO_ERROR` read for the reason, so a
/// successful connect costs no `getsockopt`.
pub(super) async fn connect(
    socket: Socket,
    addr: SocketAddr,
    early: Option<(&std::net::TcpStream, &mut Early)>,
) -> io::Result<(Stream, Option<bool>)> {
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let socket = std::net::TcpStream::from(socket);
    let sent = match early {
        Some((client, early)) => relay::send_early(client, &socket, early)?,
        None => None,
    };
    let stream = sys::register(socket)?;
    if sent == Some(true) {
        return Ok((stream, sent));
    }
    let failed = poll_fn(|cx| stream.poll_write_ready(cx)).await?.ready().is_write_closed();
    if failed {
        // Closed before it was used: the reason, or (none recorded) an abort.
        return Err(stream
            .get_ref()
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionAborted.into()));
    }
    Ok((stream, sent))
}

/// Binds `socket` to the (possibly non-local) `ip` with `IP_TRANSPARENT` and a kernel-chosen port.
fn transparent(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    if ip.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.bind(&SocketAddr::new(ip, 0).into())
}
