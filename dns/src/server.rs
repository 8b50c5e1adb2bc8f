//! The UDP and TCP loops: receive a message, answer it from the current [`Zone`] or forward it,
//! send the response.
//!
//! Invariants:
//! - UDP is served by blocking threads with batched I/O ([`udp_loop`]), TCP by async tasks.
//! - Cluster-zone answers are computed synchronously from one `Arc<Zone>` loaded from an
//!   `ArcSwapOption` (no lock, no allocation beyond the per-task response buffer).
//! - Before the first Snapshot ([`Shared::zone`] is `None`) every cluster-zone query is SERVFAIL.
//! - Forwarded queries run in their own tasks, at most [`MAX_INFLIGHT_FORWARDS`] at once (more are
//!   answered SERVFAIL), so a slow upstream cannot grow memory without bound. TCP connections are
//!   bounded by [`MAX_TCP_CONNECTIONS`] and closed after [`TCP_IDLE`] without a query.
//! - Messages that cannot be parsed far enough to carry an ID are dropped; others get FORMERR,
//!   NOTIMP or BADVERS. UDP datagrams longer than [`MAX_UDP_QUERY`] are dropped.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

use crate::{
    forward::{Forwarded, Forwarder},
    metrics::Metrics,
    mmsg::{self, RecvBatch},
    wire::{self, Query, Rcode, Reject, Writer},
    zone::{Outcome, Zone},
};

/// Forwarded queries in flight across all sockets.
pub(crate) const MAX_INFLIGHT_FORWARDS: usize = 4096;
/// Open TCP connections across all listeners.
pub(crate) const MAX_TCP_CONNECTIONS: usize = 512;
/// A TCP connection without a complete query for this long is closed.
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(10);
/// Larger UDP queries are dropped (a query is a header, a name and an OPT record).
pub(crate) const MAX_UDP_QUERY: usize = 4096;

/// What every loop shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The current zone; `None` until the first Snapshot.
    pub(crate) zone: ArcSwapOption<Zone>,
    /// The cluster domain, lowercased wire form (to SERVFAIL it before the first Snapshot).
    pub(crate) origin_key: Box<[u8]>,
    pub(crate) forwarder: Option<Forwarder>,
    pub(crate) metrics: Metrics,
    pub(crate) forwards: Semaphore,
    pub(crate) tcp_connections: Arc<Semaphore>,
}

/// What to do after the synchronous part of handling a message.
enum Next {
    /// `buf` holds the response.
    Reply(Rcode),
    /// Nothing to send.
    Drop,
    /// Resolve upstream, then respond (the query name, or a CNAME target when `chase`).
    Forward { name: String, chase: bool },
}

impl Shared {
    /// The synchronous path: answer from the zone, or say what to forward.
    fn handle(&self, msg: &[u8], buf: &mut Vec<u8>, udp: bool) -> (Next, Option<Query>) {
        let q = match wire::parse(msg) {
            Ok(q) => q,
            Err((Reject::Drop, _)) => {
                self.metrics.dropped.increment(1);
                return (Next::Drop, None);
            }
            Err((Reject::Code(rcode), end)) => {
                Writer::error_only(buf, msg, rcode, end);
                return (Next::Reply(rcode), None);
            }
            Err((Reject::BadVers, end)) => {
                wire::badvers(buf, msg, end);
                return (Next::Reply(Rcode::NoError), None);
            }
        };
        let limit = if udp { q.udp_limit() } else { usize::from(u16::MAX) };
        let zone = self.zone.load();
        let outcome = match zone.as_deref() {
            Some(zone) => zone.answer(msg, &q, buf, limit, None),
            None if q.labels_before(&self.origin_key).is_some() || is_reverse(&q) => {
                Writer::start(buf, msg, &q, Rcode::ServFail, false).finish(&q, limit);
                Outcome::Answered(Rcode::ServFail)
            }
            None => Outcome::NotInZone,
        };
        match outcome {
            Outcome::Answered(rcode) => (Next::Reply(rcode), Some(q)),
            Outcome::NotInZone if self.forwarder.is_some() => {
                (Next::Forward { name: wire::DisplayName(q.key()).to_string(), chase: false }, Some(q))
            }
            Outcome::NotInZone => {
                // Without an upstream, a reverse name nobody has does not exist (kubeadm's
                // `fallthrough in-addr.arpa ip6.arpa` would have forwarded it); others are refused.
                let rcode = if is_reverse(&q) { Rcode::NxDomain } else { Rcode::Refused };
                Writer::start(buf, msg, &q, rcode, false).finish(&q, limit);
                (Next::Reply(rcode), Some(q))
            }
            Outcome::Chase { target } if self.forwarder.is_some() => {
                (Next::Forward { name: target.into(), chase: true }, Some(q))
            }
            Outcome::Chase { .. } => {
                // No upstream: the CNAME alone.
                let empty = Forwarded::empty(Rcode::NoError);
                let zone = zone.as_deref().expect("a chase comes from a zone");
                zone.answer(msg, &q, buf, limit, Some(&empty));
                (Next::Reply(Rcode::NoError), Some(q))
            }
        }
    }

    /// The asynchronous path: forward, then write the response into `buf`.
    async fn forward(
        &self,
        msg: &[u8],
        q: &Query,
        name: &str,
        chase: bool,
        buf: &mut Vec<u8>,
        udp: bool,
    ) -> Rcode {
        let limit = if udp { q.udp_limit() } else { usize::from(u16::MAX) };
        let Some(forwarder) = &self.forwarder else { return Rcode::Refused };
        let f = forwarder.resolve(name, q.qtype).await;
        if chase {
            let zone = self.zone.load_full();
            if let Some(zone) = zone
                && let Outcome::Answered(rcode) = zone.answer(msg, q, buf, limit, Some(&f))
            {
                return rcode;
            }
            Writer::start(buf, msg, q, Rcode::ServFail, false).finish(q, limit);
            return Rcode::ServFail;
        }
        let mut w = Writer::start(buf, msg, q, f.rcode, false);
        w.raw_answers(&f.answers, f.answer_count);
        if f.authority_count > 0 {
            w.authority(&f.authorities);
        }
        w.finish(q, limit);
        f.rcode
    }
}

fn is_reverse(q: &Query) -> bool {
    q.labels_before(b"\x07in-addr\x04arpa\x00").is_some() || q.labels_before(b"\x03ip6\x04arpa\x00").is_some()
}

/// How often a blocking UDP receiver wakes up to check for shutdown when no query arrives.
const UDP_SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// Serves one UDP socket on the calling (blocking) thread until `shutdown`.
///
/// A thin loop: `recvmmsg` (blocking for the first datagram, then whatever is queued), answer
/// each from the zone, `sendmmsg` the replies. Under load that is two system calls per batch, and
/// there are no wake-ups through the async runtime, which keeps latency down. Forwarded queries
/// are handed to the runtime (`rt`); their responses are sent on the same socket (a UDP send does
/// not wait for the peer).
pub(crate) fn udp_loop(
    shared: &Arc<Shared>,
    socket: &Arc<std::net::UdpSocket>,
    rt: &tokio::runtime::Handle,
    shutdown: &CancellationToken,
) {
    // Datagrams longer than the buffer come back flagged as truncated and are dropped.
    let mut batch = RecvBatch::new(MAX_UDP_QUERY);
    let mut out: Vec<Vec<u8>> = (0..mmsg::BATCH).map(|_| Vec::with_capacity(wire::UDP_MAX)).collect();
    let mut replies: Vec<(usize, SocketAddr)> = Vec::with_capacity(mmsg::BATCH);
    let mut answered: Vec<(u16, Rcode)> = Vec::with_capacity(mmsg::BATCH);
    while !shutdown.is_cancelled() {
        let n = match batch.recv(socket) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(error) => {
                // ICMP errors from earlier sends surface here on Linux; keep serving, but never
                // spin on an error that persists.
                tracing::debug!(%error, "udp receive failed");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let start = Instant::now();
        replies.clear();
        answered.clear();
        for (i, buf) in out.iter_mut().enumerate().take(n) {
            let Some((msg, false, Some(peer))) = batch.get(i) else {
                // Longer than MAX_UDP_QUERY, or not from an IP peer.
                shared.metrics.dropped.increment(1);
                continue;
            };
            let (next, q) = shared.handle(msg, buf, true);
            match next {
                Next::Drop => {}
                Next::Reply(rcode) => {
                    replies.push((i, peer));
                    answered.push((q.map_or(0, |q| q.qtype), rcode));
                }
                Next::Forward { name, chase } => {
                    let Some(q) = q else { continue };
                    let Ok(permit) = shared.forwards.try_acquire() else {
                        Writer::start(buf, msg, &q, Rcode::ServFail, false).finish(&q, q.udp_limit());
                        replies.push((i, peer));
                        answered.push((q.qtype, Rcode::ServFail));
                        continue;
                    };
                    permit.forget();
                    let (shared, socket, msg) = (shared.clone(), socket.clone(), msg.to_vec());
                    rt.spawn(async move {
                        let mut buf = Vec::with_capacity(wire::UDP_MAX);
                        let rcode = shared.forward(&msg, &q, &name, chase, &mut buf, true).await;
                        shared.forwards.add_permits(1);
                        mmsg::send_all(&socket, &[(&buf, peer)]);
                        shared.metrics.record(q.qtype, rcode, start);
                    });
                }
            }
        }
        if !replies.is_empty() {
            let refs: Vec<(&[u8], SocketAddr)> =
                replies.iter().map(|(i, p)| (out[*i].as_slice(), *p)).collect();
            mmsg::send_all(socket, &refs);
        }
        for (qtype, rcode) in &answered {
            shared.metrics.record(*qtype, *rcode, start);
        }
    }
}

/// Prepares a socket for [`udp_loop`]: blocking, with a receive timeout for shutdown checks.
pub(crate) fn blocking_udp(socket: std::net::UdpSocket) -> io::Result<std::net::UdpSocket> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(UDP_SHUTDOWN_POLL))?;
    Ok(socket)
}

/// Accepts TCP connections until `shutdown`.
pub(crate) async fn tcp_loop(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = shared.tcp_connections.clone().try_acquire_owned() else {
            shared.metrics.dropped.increment(1);
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = tcp_conn(&shared, stream) => if let Err(error) = r {
                    tracing::debug!(%error, %peer, "tcp connection ended");
                },
                () = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Serves the queries of one TCP connection, in order (RFC 7766 allows pipelining).
async fn tcp_conn(shared: &Shared, mut stream: TcpStream) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut msg = Vec::with_capacity(512);
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let len = usize::from(u16::from_be_bytes(len));
        msg.resize(len, 0);
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let start = Instant::now();
        let (next, q) = shared.handle(&msg, &mut buf, false);
        let rcode = match next {
            Next::Drop => continue,
            Next::Reply(rcode) => rcode,
            Next::Forward { name, chase } => {
                let Some(q) = q else { continue };
                shared.forward(&msg, &q, &name, chase, &mut buf, false).await
            }
        };
        out.clear();
        out.extend_from_slice(&u16::try_from(buf.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&buf);
        stream.write_all(&out).await?;
        shared.metrics.record(q.map_or(0, |q| q.qtype), rcode, start);
    }
}
