//! Restarts without a gap: a starting process takes over the listening sockets of the process it
//! replaces, so no connection is refused and none queued in a listen backlog is reset.
//!
//! Both processes are started with the same `--handoff-socket PATH` (a Unix `SOCK_SEQPACKET`
//! socket). The exchange, one connection, one text message per packet:
//!
//! ```text
//!  new (successor)                         old (predecessor, listening on PATH)
//!  take <pid>                      ──▶
//!                                  ◀──      sockets tcp 10.96.0.10:80 udp 10.96.0.10:53 ...
//!                                           (the same sockets ride along as SCM_RIGHTS, in order,
//!                                            at most MAX_FDS_PER_MESSAGE per message)
//!                                  ◀──      end <pid> <count>
//!  ... binds: every socket it wants that the old one had is taken, not bound;
//!      both processes accept on the shared sockets meanwhile ...
//!  serving                         ──▶      tells every server to stop accepting, drains
//!                                  ◀──      stopped
//!  (a connection the old one accepted before its accept loops saw the stop is served by it)
//!  listens on PATH for its own successor
//! ```
//!
//! The sockets are the same kernel sockets, not copies: their accept queues, options and bound
//! addresses carry over, and a socket's last process to close it is the one that closes it. So a
//! successor that does not want a socket (its configuration changed) closes its copy once it
//! serves, and the socket closes when the predecessor stops. Options and file status flags
//! (`O_NONBLOCK`) are shared too, so a successor uses an inherited socket as the predecessor set
//! it up and changes nothing on it: every server sets its sockets up the same way in both
//! processes (non-blocking, except DNS UDP, which is blocking with a read timeout).
//!
//! Who reads and writes what:
//! - every server that binds (the listener manager, health and admin servers, DNS) asks
//!   [`Handoff::take`] for an inherited socket before binding, and [`Handoff::register`]s the
//!   socket it serves on; the [`Registration`] holds a duplicate descriptor until dropped, which
//!   the owner does when it stops serving that socket;
//! - once the process serves, [`Handoff::complete_takeover`] closes what nobody took and tells
//!   the predecessor to stop; then [`Handoff::serve`] hands the registered sockets to a successor.
//!
//! A disabled [`Handoff`] (no path) takes nothing and registers nothing.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use socket2::{SockRef, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

/// Descriptors sent per message (the kernel's limit, `SCM_MAX_FD`, is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 200;

/// Longest message: a batch of keys (`udp [ffff:...]:65535 ` is at most 54 bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// How long the predecessor may take to send its sockets, and to confirm it stopped.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which kind of socket a [`SocketKey`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketKind {
    /// A listening TCP socket.
    Tcp,
    /// A bound UDP socket.
    Udp,
}

/// A socket as a successor asks for it: kind and bound address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketKey {
    /// TCP listener or UDP socket.
    pub kind: SocketKind,
    /// The bound address (after binding: port 0 never matches).
    pub addr: SocketAddr,
}

impl SocketKey {
    /// A TCP listener on `addr`.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self { kind: SocketKind::Tcp, addr }
    }

    /// A UDP socket on `addr`.
    pub fn udp(addr: SocketAddr) -> Self {
        Self { kind: SocketKind::Udp, addr }
    }

    /// The key of an open socket: its type and bound address.
    fn of(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let socket = SockRef::from(&fd);
        let kind = match socket.r#type()? {
            Type::STREAM => SocketKind::Tcp,
            Type::DGRAM => SocketKind::Udp,
            _ => return Err(io::Error::other("neither a TCP nor a UDP socket")),
        };
        let addr = socket.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))?;
        Ok(Self { kind, addr })
    }
}

impl fmt::Display for SocketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            SocketKind::Tcp => "tcp",
            SocketKind::Udp => "udp",
        };
        write!(f, "{kind} {}", self.addr)
    }
}

/// A handoff failed: the side that failed, and what happened. The process then binds its own
/// sockets (a retry of the handoff is not attempted).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The handoff socket could not be used.
    #[error("handoff socket {path}: {source}")]
    Socket {
        /// The `--handoff-socket` path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The other process broke off or sent something unexpected.
    #[error("handoff with pid {pid}: {what}")]
    Peer {
        /// The other process (0: not yet known).
        pid: u32,
        /// What went wrong.
        what: String,
    },
}

/// The sockets this process serves on, and those it inherited and has not taken yet.
#[derive(Debug)]
pub struct Handoff {
    /// `None`: disabled.
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Duplicates of the sockets being served, by registration.
    live: BTreeMap<u64, (SocketKey, OwnedFd)>,
    /// Received from the predecessor, not taken yet.
    inherited: HashMap<SocketKey, Vec<OwnedFd>>,
    /// The connection to the predecessor, until it stopped.
    predecessor: Option<Peer>,
}

/// Keeps a served socket in the set a successor takes over; dropping it removes the socket.
#[derive(Debug)]
#[must_use = "the socket is handed over only while its registration lives"]
pub struct Registration {
    handoff: Option<(Arc<Handoff>, u64)>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((handoff, id)) = self.handoff.take() {
            handoff.lock().live.remove(&id);
        }
    }
}

// === impl Handoff ===

impl Handoff {
    /// A handoff that takes and hands over nothing.
    pub fn disabled() -> Arc<Self> {
        Self::without_predecessor(None)
    }

    /// A handoff on `path` with nothing inherited: the process binds its own sockets, and hands
    /// them over once it serves (`None`: disabled).
    pub fn without_predecessor(path: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self { path, inner: Mutex::default() })
    }

    /// Takes over from the process listening on `path`, if any: receives all its sockets (they
    /// are served by both processes until [`Handoff::serve`]). Without such a process (no socket
    /// file, or nobody listening on it), returns an empty handoff for `path`.
    pub async fn take_over(path: PathBuf) -> Result<Arc<Self>, HandoffError> {
        let handoff = Self { path: Some(path.clone()), inner: Mutex::default() };
        let conn = match connect(&path) {
            Ok(conn) => conn,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Ok(Arc::new(handoff));
            }
            Err(source) => return Err(HandoffError::Socket { path, source }),
        };
        let mut peer = Peer { conn, pid: 0 };
        let received = tokio::time::timeout(EXCHANGE_TIMEOUT, peer.receive_sockets())
            .await
            .unwrap_or_else(|_| Err(peer.error("timed out sending its sockets")))?;
        {
            let mut inner = handoff.lock();
            for (key, fd) in received {
                inner.inherited.entry(key).or_default().push(fd);
            }
            inner.predecessor = Some(peer);
        }
        Ok(Arc::new(handoff))
    }

    /// The predecessor's pid, while it has not stopped yet.
    pub fn predecessor(&self) -> Option<u32> {
        self.lock().predecessor.as_ref().map(|p| p.pid)
    }

    /// Inherited sockets not taken yet.
    pub fn inherited(&self) -> usize {
        self.lock().inherited.values().map(Vec::len).sum()
    }

    /// One inherited socket for `key`, if the predecessor had one.
    pub fn take(&self, key: SocketKey) -> Option<Socket> {
        let mut inner = self.lock();
        let fds = inner.inherited.get_mut(&key)?;
        let fd = fds.pop();
        if fds.is_empty() {
            inner.inherited.remove(&key);
        }
        fd.map(Socket::from)
    }

    /// Every inherited socket for `key` (a listener bound once per data-plane thread).
    pub fn take_all(&self, key: SocketKey) -> Vec<Socket> {
        self.lock().inherited.remove(&key).unwrap_or_default().into_iter().map(Socket::from).collect()
    }

    /// Adds `socket` to the set a successor takes over, until the registration is dropped.
    pub fn register(self: &Arc<Self>, socket: BorrowedFd<'_>) -> io::Result<Registration> {
        if self.path.is_none() {
            return Ok(Registration { handoff: None });
        }
        let key = SocketKey::of(socket)?;
        let fd = socket.try_clone_to_owned()?;
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.live.insert(id, (key, fd));
        Ok(Registration { handoff: Some((self.clone(), id)) })
    }

    /// A listening TCP socket on `addr`, registered with the handoff and with the current tokio
    /// runtime (so call it on one): the inherited one as the predecessor left it, or a new
    /// non-blocking one bound as Go's `net.Listen` binds (`SO_REUSEADDR`; dual-stack for `[::]`).
    pub fn tcp_listener(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> io::Result<(tokio::net::TcpListener, Registration)> {
        let socket = match self.take(SocketKey::tcp(addr)) {
            Some(socket) => socket,
            None => {
                let socket = Socket::new(socket2::Domain::for_address(addr), Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                if let SocketAddr::V6(v6) = addr
                    && v6.ip().is_unspecified()
                {
                    socket.set_only_v6(false)?;
                }
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket.listen(1024)?;
                socket
            }
        };
        let registration = self.register(socket.as_fd())?;
        Ok((tokio::net::TcpListener::from_std(socket.into())?, registration))
    }

    /// A UDP socket on `addr`, registered: the inherited one as the predecessor left it, or a
    /// new non-blocking one.
    pub fn udp_socket(self: &Arc<Self>, addr: SocketAddr) -> io::Result<(std::net::UdpSocket, Registration)> {
        let socket = match self.take(SocketKey::udp(addr)) {
            Some(socket) => socket,
            None => {
                let socket = Socket::new(socket2::Domain::for_address(addr), Type::DGRAM, None)?;
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket
            }
        };
        let registration = self.register(socket.as_fd())?;
        Ok((socket.into(), registration))
    }

    /// Call once this process serves: closes the inherited sockets nobody took, tells the
    /// predecessor to stop accepting, and waits (bounded) until it has. Returns its pid; `None`
    /// without a predecessor. Failures are logged: this process serves either way.
    pub async fn complete_takeover(&self) -> Option<u32> {
        let predecessor = {
            let mut inner = self.lock();
            let unclaimed: usize = inner.inherited.drain().map(|(_, fds)| fds.len()).sum();
            if unclaimed > 0 {
                tracing::info!(
                    sockets = unclaimed,
                    "closing inherited sockets this configuration does not serve"
                );
            }
            inner.predecessor.take()
        };
        let peer = predecessor?;
        let pid = peer.pid;
        let stopped = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            peer.send("serving", &[]).await.map_err(|e| peer.error(format!("sending 'serving': {e}")))?;
            peer.expect("stopped").await
        });
        match stopped.await {
            Ok(Ok(())) => tracing::info!(pid, "takeover complete: the predecessor stops accepting"),
            Ok(Err(error)) => tracing::warn!(%error, "predecessor did not confirm it stopped"),
            Err(_) => tracing::warn!(pid, "predecessor did not confirm it stopped in time"),
        }
        Some(pid)
    }

    /// Call after [`Handoff::complete_takeover`]: listens on the path and hands every registered
    /// socket to the first successor that asks; when that successor serves, cancels
    /// `handed_over` and stops listening on the path, then confirms the stop to it, and returns.
    /// Returns at once when disabled, and when `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        handed_over: CancellationToken,
        stop: CancellationToken,
    ) -> Result<(), HandoffError> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        let listener = listen(&path).map_err(|source| HandoffError::Socket { path: path.clone(), source })?;
        tracing::debug!(path = %path.display(), "handoff socket listening");
        loop {
            let conn = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                conn = accept(&listener) => conn.map_err(|source| HandoffError::Socket { path: path.clone(), source })?,
            };
            let mut peer = Peer { conn, pid: 0 };
            let result = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                r = self.hand_over(&mut peer) => r,
            };
            match result {
                Ok(()) => {
                    tracing::info!(pid = peer.pid, "successor serves; stopping to accept");
                    handed_over.cancel();
                    // Closed before the confirmation, so the path is free when the successor binds it.
                    drop(listener);
                    if let Err(error) = peer.send("stopped", &[]).await {
                        tracing::warn!(pid = peer.pid, %error, "could not confirm the stop to the successor");
                    }
                    return Ok(());
                }
                // The successor failed or went away before serving: keep serving, wait for another.
                Err(error) => tracing::warn!(%error, "handoff abandoned; still serving"),
            }
        }
    }

    /// Sends every registered socket to `peer` and waits until it serves.
    async fn hand_over(&self, peer: &mut Peer) -> Result<(), HandoffError> {
        let hello = peer.recv().await.map_err(|e| peer.error(e))?;
        let pid = match hello.text.split_once(' ') {
            Some(("take", pid)) => pid.parse().unwrap_or(0),
            _ => return Err(peer.error(format!("expected 'take <pid>', got {:?}", hello.text))),
        };
        peer.pid = pid;
        // Duplicates of this moment's sockets. The successor binds sockets opened later itself:
        // data-plane ones beside these (SO_REUSEPORT), others (a new healthCheckNodePort) by
        // retrying once this process has closed them.
        let sockets: Vec<(SocketKey, OwnedFd)> = {
            let inner = self.lock();
            inner.live.values().filter_map(|(key, fd)| Some((*key, fd.try_clone().ok()?))).collect()
        };
        tracing::info!(pid, sockets = sockets.len(), "handing sockets to a successor");
        for batch in sockets.chunks(MAX_FDS_PER_MESSAGE) {
            let mut text = String::from("sockets");
            for (key, _) in batch {
                text.push(' ');
                text.push_str(&key.to_string());
            }
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
            peer.send(&text, &fds).await.map_err(|e| peer.error(format!("sending sockets: {e}")))?;
        }
        let end = format!("end {} {}", std::process::id(), sockets.len());
        peer.send(&end, &[]).await.map_err(|e| peer.error(format!("sending 'end': {e}")))?;
        drop(sockets);
        // The successor may take long to serve (its first sync); no timeout.
        peer.expect("serving").await
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One end of a handoff connection.
#[derive(Debug)]
struct Peer {
    conn: AsyncFd<OwnedFd>,
    pid: u32,
}

/// One received message.
struct Message {
    text: String,
    fds: Vec<OwnedFd>,
}

impl Peer {
    fn error(&self, what: impl fmt::Display) -> HandoffError {
        HandoffError::Peer { pid: self.pid, what: what.to_string() }
    }

    async fn send(&self, text: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        self.conn
            .async_io(Interest::WRITABLE, |fd| {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("too many descriptors for one message"));
                }
                let sent = rustix::net::sendmsg(
                    fd,
                    &[IoSlice::new(text.as_bytes())],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?;
                if sent == text.len() { Ok(()) } else { Err(io::Error::other("message truncated")) }
            })
            .await
    }

    async fn recv(&self) -> io::Result<Message> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (len, fds) = self
            .conn
            .async_io(Interest::READABLE, |fd| {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    fd,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                if msg.flags.intersects(rustix::net::ReturnFlags::CTRUNC | rustix::net::ReturnFlags::TRUNC) {
                    return Err(io::Error::other("message truncated"));
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        if len == 0 && fds.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let text =
            String::from_utf8(buf[..len].to_vec()).map_err(|_| io::Error::other("message is not UTF-8"))?;
        Ok(Message { text, fds })
    }

    /// Waits for the message `want` (no arguments).
    async fn expect(&self, want: &str) -> Result<(), HandoffError> {
        let msg = self.recv().await.map_err(|e| self.error(format!("waiting for '{want}': {e}")))?;
        if msg.text == want {
            Ok(())
        } else {
            Err(self.error(format!("expected '{want}', got {:?}", msg.text)))
        }
    }

    /// The successor's side of the exchange: `take`, then `sockets` messages until `end`.
    async fn receive_sockets(&mut self) -> Result<Vec<(SocketKey, OwnedFd)>, HandoffError> {
        self.send(&format!("take {}", std::process::id()), &[])
            .await
            .map_err(|e| self.error(format!("sending 'take': {e}")))?;
        let mut received = Vec::new();
        loop {
            let msg = self.recv().await.map_err(|e| self.error(e))?;
            let mut words = msg.text.split(' ');
            match words.next() {
                Some("sockets") => {
                    let keys = parse_keys(words).map_err(|e| self.error(e))?;
                    if keys.len() != msg.fds.len() {
                        return Err(self.error(format!(
                            "{} sockets named, {} received",
                            keys.len(),
                            msg.fds.len()
                        )));
                    }
                    received.extend(keys.into_iter().zip(msg.fds));
                }
                Some("end") => {
                    let (pid, count) = (words.next(), words.next());
                    self.pid = pid.and_then(|p| p.parse().ok()).unwrap_or(0);
                    if count.and_then(|c| c.parse::<usize>().ok()) != Some(received.len()) {
                        return Err(
                            self.error(format!("'end' says {count:?} sockets, {} received", received.len()))
                        );
                    }
                    return Ok(received);
                }
                _ => return Err(self.error(format!("unexpected message {:?}", msg.text))),
            }
        }
    }
}

/// Parses `tcp ADDR udp ADDR ...`.
fn parse_keys<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<Vec<SocketKey>, String> {
    let mut keys = Vec::new();
    while let Some(kind) = words.next() {
        let kind = match kind {
            "tcp" => SocketKind::Tcp,
            "udp" => SocketKind::Udp,
            other => return Err(format!("unknown socket kind {other:?}")),
        };
        let addr = words.next().ok_or("socket kind without an address")?;
        let addr = SocketAddr::from_str(addr).map_err(|e| format!("address {addr:?}: {e}"))?;
        keys.push(SocketKey { kind, addr });
    }
    Ok(keys)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

fn connect(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    crate::sys::register(fd)
}

/// Listens on `path`, replacing a socket file left there (by this process's predecessor, which
/// no longer accepts on it, or by a process that is gone).
fn listen(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let fd = seqpacket()?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 4)?;
    crate::sys::register(fd)
}

async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = listener
        .async_io(Interest::READABLE, |fd| {
            Ok(rustix::net::accept_with(fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?)
        })
        .await?;
    crate::sys::register(fd)
}

#[cfg(test)]
mod tests;
