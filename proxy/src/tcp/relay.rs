//! The byte relay of one proxied TCP connection: both directions and the drain signal, driven by
//! one hand-written future ([`relay`]) on the connection's task.
//!
//! Each direction is a [`Half`]: a small state machine that reads from one socket and writes to
//! the other. Small messages (requests, responses, handshakes) move through a per-thread scratch
//! buffer: a read is written out in the same poll, so a connection owns no buffer unless a write
//! blocks (then only the unwritten rest is kept, in the `Half`). A read that fills the whole buffer
//! means bulk data: with `zero_copy` the direction switches to `splice(2)` through a pipe (Linux,
//! HAProxy's `splice-auto` idea), which moves pages without copying them through user space.
//!
//! Why a hand-written future and not `try_join!` over two `async fn`s: a direction waits with
//! `poll_read_ready` (one waker slot per socket and direction), where `ready().await` links and
//! unlinks a waiter under the socket's lock on every wait; the drain token is only asked
//! `is_cancelled` once registered, not re-registered on every wake-up; and `recv`/`send` are direct
//! system calls (rustix), without libc's cancellation-point bookkeeping. In the node benchmark that
//! took the proxy's user-space share of CPU samples from 5.2 % to 4.3 % and keep-alive CPU per
//! request from 1.06-1.09x nginx's to 0.98x (benches/README.md, node-compare).
//!
//! Invariants:
//! - A direction ends at EOF from its source, after everything read was written; then the
//!   destination is half-closed (`shutdown(Write)`), except after the second EOF, where the
//!   caller's `close` sends the FIN. The relay ends when both directions ended.
//! - When the source's FIN is already known as its last data is read (a response followed by the
//!   server's close: epoll reported `EPOLLRDHUP` before the read, and the read did not fill the
//!   buffer), that data is sent with `MSG_MORE` and the direction ends at once: the FIN leaves in
//!   the same segment, as HAProxy's does, and the read that would only return EOF is skipped. A
//!   source that was reset (epoll's `HUP` on its still-open write side) takes the usual path, so
//!   the reset is reported, not turned into a FIN.
//! - The first read or write error ends the relay with that error, naming the failed side.
//! - A pipe goes back to the thread's cache only when it is known to be empty.
//! - What the client sent before the upstream connection existed ([`Early`]) is written upstream
//!   before anything else the client sends: [`send_early`] reads it (unless an earlier connect
//!   attempt already holds some) and sends it as soon as `connect(2)` returns; what that send did
//!   not take is the first thing the relay writes.

use std::{
    future::{Future as _, poll_fn},
    io,
    pin::pin,
    task::{Context, Poll, Waker, ready},
};

use rustix::net::SendFlags;
use socket2::SockRef;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;

use super::Stream;
use crate::error::Error;

/// How a relay ended.
pub(super) enum Outcome {
    /// Both directions reached EOF; bytes (from client, to client).
    Closed(u64, u64),
    /// A read or write failed; the error names the side.
    Failed(Error),
    /// The drain token was cancelled first.
    Drained,
}

impl Outcome {
    /// Arms the resets the sockets' close must send: after a failure, to the side that is still
    /// alive (the failure propagates); after a drain, to both. After [`Outcome::Closed`] the close
    /// is a FIN.
    pub(super) fn arm_resets(&self, client: &Stream, server: &Stream) {
        match self {
            Outcome::Closed(..) => {}
            Outcome::Failed(Error::Client(_)) => reset(server),
            Outcome::Failed(_) => reset(client),
            Outcome::Drained => {
                reset(client);
                reset(server);
            }
        }
    }
}

/// Relays `client` <-> `server` until both directions ended, one failed, or `drain` is cancelled.
/// `rx`/`tx` count bytes from and to the client as they move. After [`Outcome::Closed`] the
/// caller must close both sockets: that close is the FIN of the direction that ended last.
pub(super) async fn relay(
    client: &Stream,
    server: &Stream,
    rx: &metrics::Counter,
    tx: &metrics::Counter,
    zero_copy: bool,
    drain: &CancellationToken,
    early: Early,
) -> Outcome {
    let mut up = Half::new(zero_copy);
    if early.read > 0 {
        rx.increment(early.read as u64);
        up.total = early.read as u64;
        up.rest = early.data;
    }
    let mut down = Half::new(zero_copy);
    let mut cancelled = pin!(drain.cancelled());
    // The waker `cancelled` was last polled with: the token wakes that one, so while the task's
    // waker stays the same `is_cancelled` is all a wake-up needs to check.
    let mut registered: Option<Waker> = None;
    poll_fn(|cx| {
        if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            if drain.is_cancelled() {
                return Poll::Ready(Outcome::Drained);
            }
        } else {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Outcome::Drained);
            }
            registered = Some(cx.waker().clone());
        }
        let from_client = up.poll(cx, client, server, rx, down.done);
        if let Poll::Ready(Err(fail)) = from_client {
            return Poll::Ready(Outcome::Failed(fail.error(true)));
        }
        let to_client = down.poll(cx, server, client, tx, up.done);
        if let Poll::Ready(Err(fail)) = to_client {
            return Poll::Ready(Outcome::Failed(fail.error(false)));
        }
        if from_client.is_ready() && to_client.is_ready() {
            Poll::Ready(Outcome::Closed(up.total, down.total))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Which side of one direction failed.
enum Fail {
    Read(io::Error),
    Write(io::Error),
}

impl Fail {
    /// The error of a direction that reads from the client (`from_client`) or from the server.
    fn error(self, from_client: bool) -> Error {
        match (self, from_client) {
            (Fail::Read(e), true) | (Fail::Write(e), false) => Error::Client(e),
            (Fail::Read(e), false) | (Fail::Write(e), true) => Error::Upstream(e),
        }
    }
}

/// Size of the per-thread copy buffer; a read that fills it switches the direction to splice.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// One copy buffer per worker thread. It is only borrowed between a read and the write that
    /// immediately follows it, never across a yield, so the tasks of a thread can share it.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// `recv(2)` without flags, as a direct system call.
pub(super) fn recv(s: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::net::recv(s, buf, rustix::net::RecvFlags::empty()).map(|(n, _)| n).map_err(io::Error::from)
}

/// `send(2)` with `MSG_NOSIGNAL` (a closed peer is an `EPIPE` error, not a signal), and `MSG_MORE`
/// when `more` (hold the bytes for the FIN that follows at once).
fn send(s: &std::net::TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = if more { SendFlags::NOSIGNAL | SendFlags::MORE } else { SendFlags::NOSIGNAL };
    rustix::net::send(s, buf, flags).map_err(io::Error::from)
}

/// Waits until `s` is writable.
fn poll_writable(s: &Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    s.poll_write_ready(cx).map_ok(drop)
}

/// Waits until `s` is readable; `Ready(Ok(true))` when its peer's FIN has arrived as well (or
/// the connection was reset: epoll's `HUP` counts as read-closed too).
fn poll_readable(s: &Stream, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
    s.poll_read_ready(cx).map_ok(|ready| ready.ready().is_read_closed())
}

/// Whether epoll reported `HUP` or an error on `s`, seen from its write side: a reset, when this
/// side was never shut down. Polled with the relay task's own waker, so a `Pending` only stores
/// the waker the other direction would store anyway.
fn hung_up(s: &Stream, cx: &mut Context<'_>) -> bool {
    matches!(s.poll_write_ready(cx), Poll::Ready(Ok(ready)) if ready.ready().is_write_closed())
}

/// Half-closes `s` (FIN after the queued bytes); failure means the peer is gone already.
pub(super) fn half_close(s: &Stream) {
    let _ = SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// Arranges for `s` to be closed with RST when it is dropped (`SO_LINGER` 0).
pub(super) fn reset(s: &impl std::os::fd::AsFd) {
    let _ = SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Passes a direction's EOF on: `shutdown(Write)` on `to`, unless this was the `last` direction.
/// Then the relay is over and both sockets are about to be closed: `close` sends the FIN itself
/// (every byte was read, so it is never an RST), which saves a system call per connection.
fn end(to: &Stream, last: bool) {
    if !last {
        half_close(to);
    }
}

/// One direction of the relay: `from` -> `to`.
struct Half {
    /// Bytes moved so far.
    total: u64,
    /// The unwritten rest of a read whose write blocked, and how much of it is written since.
    rest: Vec<u8>,
    written: usize,
    /// The last read filled the scratch buffer (bulk data).
    bulk: bool,
    /// The source's FIN came right behind the last data read: end once `rest` is written.
    eof: bool,
    zero_copy: bool,
    /// Set once the direction switched to `splice`.
    #[cfg(target_os = "linux")]
    splice: Option<Splice>,
    done: bool,
}

impl Half {
    fn new(zero_copy: bool) -> Self {
        Self {
            total: 0,
            rest: Vec::new(),
            written: 0,
            bulk: false,
            eof: false,
            zero_copy,
            #[cfg(target_os = "linux")]
            splice: None,
            done: false,
        }
    }

    /// Moves what can be moved now; `Ready(Ok)` once the direction has ended (and stays so).
    /// `last`: the other direction has ended, so this one's EOF ends the connection.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &Stream,
        to: &Stream,
        bytes: &metrics::Counter,
        last: bool,
    ) -> Poll<Result<(), Fail>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        #[cfg(target_os = "linux")]
        if let Some(splice) = &mut self.splice {
            ready!(splice.poll(cx, from, to, &mut self.total, bytes))?;
            end(to, last);
            self.done = true;
            return Poll::Ready(Ok(()));
        }
        loop {
            // Finish a blocked write before reading more.
            while self.written < self.rest.len() {
                ready!(poll_writable(to, cx)).map_err(Fail::Write)?;
                match to.try_io(Interest::WRITABLE, |s| send(s, &self.rest[self.written..], false)) {
                    Ok(m) => self.written += m,
                    Err(e) if transient(&e) => {}
                    Err(e) => return Poll::Ready(Err(Fail::Write(e))),
                }
            }
            if !self.rest.is_empty() {
                self.rest.clear();
                self.written = 0;
            }
            if self.eof {
                end(to, last);
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            #[cfg(target_os = "linux")]
            if self.bulk && self.zero_copy {
                match crate::sys::Pipe::take() {
                    Ok(pipe) => {
                        self.splice = Some(Splice { pipe, in_pipe: 0, eof: false });
                        return self.poll(cx, from, to, bytes, last);
                    }
                    // No pipe (descriptor limit): stay on the copy path.
                    Err(_) => self.zero_copy = false,
                }
            }

            let closed = ready!(poll_readable(from, cx)).map_err(Fail::Read)?;
            // A read shorter than the buffer almost always drained the socket. Telling tokio so
            // (the closure reports WouldBlock after keeping the bytes) saves the read that would
            // only return EAGAIN: one system call per message. If the peer's FIN came with the
            // data, tokio keeps the read-closed state through the clear, so the next
            // `poll_read_ready` is ready at once and the read sees EOF. A race with newly arrived
            // data is safe too: tokio only clears readiness if no new event arrived since.
            let mut got = 0;
            let read = SCRATCH.with_borrow_mut(|buf| {
                from.try_io(Interest::READABLE, |s| {
                    got = recv(s, buf)?;
                    if got > 0 && got < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(got) }
                })
            });
            let n = match read {
                Ok(0) => {
                    end(to, last);
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => n,
                Err(e) if transient(&e) && got > 0 => got,
                Err(e) if transient(&e) => continue,
                Err(e) => return Poll::Ready(Err(Fail::Read(e))),
            };
            // A short read after the peer's FIN drained the last data: skip the EOF read, and let
            // `MSG_MORE` hold the data for the FIN that `end` sends next, so both leave in one
            // segment (one packet and one ACK less per connection). Not while the other direction
            // is still open and the source was reset instead (see the module docs); once it has
            // ended, `from` is shut down for writing and the usual EOF read decides.
            self.eof = closed && n < SCRATCH_LEN && !last && !hung_up(from, cx);
            let written = match SCRATCH
                .with_borrow(|buf| to.try_io(Interest::WRITABLE, |s| send(s, &buf[..n], self.eof)))
            {
                Ok(m) => m,
                Err(e) if transient(&e) => 0,
                Err(e) => return Poll::Ready(Err(Fail::Write(e))),
            };
            if written < n {
                SCRATCH.with_borrow(|buf| self.rest.extend_from_slice(&buf[written..n]));
            }
            self.total += n as u64;
            bytes.increment(n as u64);
            self.bulk = n == SCRATCH_LEN;
        }
    }
}

/// A direction in zero-copy mode: socket -> pipe -> socket with `splice(2)`.
#[cfg(target_os = "linux")]
struct Splice {
    pipe: crate::sys::Pipe,
    /// Bytes in the pipe, not yet written to the destination.
    in_pipe: usize,
    /// The source reached EOF.
    eof: bool,
}

#[cfg(target_os = "linux")]
impl Splice {
    /// Moves bytes until EOF, or until neither side can make progress.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &Stream,
        to: &Stream,
        total: &mut u64,
        bytes: &metrics::Counter,
    ) -> Poll<Result<(), Fail>> {
        use std::os::fd::AsRawFd;

        let cap = self.pipe.capacity();
        let (rfd, wfd) = (from.as_raw_fd(), to.as_raw_fd());
        loop {
            let mut progress = false;
            // Read while the pipe has room, even while the writer is blocked, so both sockets
            // keep moving (a pipeline, not ping-pong).
            if !self.eof && self.in_pipe < cap {
                // With an empty pipe, EAGAIN can only mean "socket drained": let tokio clear the
                // read readiness. With data in the pipe, EAGAIN may mean "pipe full" instead, so
                // the readiness must be left alone.
                let len = (cap - self.in_pipe).min(1 << 16);
                let filled = if self.in_pipe == 0 {
                    from.try_io(Interest::READABLE, |_| self.pipe.fill_from(rfd, len))
                } else {
                    self.pipe.fill_from(rfd, len)
                };
                match filled {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.in_pipe += n;
                        progress = true;
                    }
                    Err(e) if transient(&e) => {}
                    Err(e) => return Poll::Ready(Err(Fail::Read(e))),
                }
            }
            if self.in_pipe > 0 {
                match to.try_io(Interest::WRITABLE, |_| self.pipe.drain_to(wfd, self.in_pipe)) {
                    Ok(m) => {
                        self.in_pipe -= m;
                        *total += m as u64;
                        bytes.increment(m as u64);
                        progress = true;
                    }
                    Err(e) if transient(&e) => {}
                    Err(e) => return Poll::Ready(Err(Fail::Write(e))),
                }
            }
            if self.eof && self.in_pipe == 0 {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                if self.in_pipe == 0 {
                    ready!(poll_readable(from, cx)).map_err(Fail::Read)?;
                } else {
                    ready!(poll_writable(to, cx)).map_err(Fail::Write)?;
                }
            }
        }
    }
}

impl Drop for Half {
    fn drop(&mut self) {
        // A pipe that may still hold bytes is closed, never reused.
        #[cfg(target_os = "linux")]
        if let Some(splice) = self.splice.take()
            && splice.in_pipe == 0
        {
            splice.pipe.give_back();
        }
    }
}

/// The client's first bytes, read before its upstream connection was established (see
/// [`send_early`]). Owned by the connection's task; holds a buffer only when a send did not take
/// everything (the connect was still in progress, or failed and the next endpoint gets them).
#[derive(Debug, Default)]
pub(super) struct Early {
    /// Read from the client and not yet written upstream.
    data: Vec<u8>,
    /// Bytes read from the client (0: none yet).
    read: usize,
    /// Reading the client failed (it reset): the connection must end with resets.
    client_failed: Option<io::Error>,
}

impl Early {
    /// The client reset before its first bytes could be passed on.
    pub(super) fn client_failed(&self) -> Option<&io::Error> {
        self.client_failed.as_ref()
    }

    /// Read from the client, not yet written upstream.
    #[cfg(test)]
    pub(super) fn pending(&self) -> &[u8] {
        &self.data
    }
}

/// Passes the client's first bytes to `to`, a socket whose `connect(2)` has just returned: what an
/// earlier attempt kept, or else what `client` has queued (read without waiting, into the scratch
/// buffer, so nothing is allocated when the send takes it all).
///
/// Returns `Some(true)` when the send was accepted (the handshake was done), `Some(false)` when it
/// found the connect still in progress (the bytes stay in `early` for the relay), and `None` when
/// there was nothing to send (the client has not spoken, or already half-closed). An error is the
/// connect's own failure (refused, unreachable); the bytes stay in `early` for the next attempt.
pub(super) fn send_early(
    client: &std::net::TcpStream,
    to: &std::net::TcpStream,
    early: &mut Early,
) -> io::Result<Option<bool>> {
    let sent = |result: io::Result<usize>| match result {
        Ok(n) => Ok((n, Some(true))),
        Err(e) if transient(&e) => Ok((0, Some(false))),
        Err(e) => Err(e),
    };
    if !early.data.is_empty() {
        let (n, complete) = sent(send(to, &early.data, false))?;
        early.data.drain(..n);
        return Ok(complete);
    }
    SCRATCH.with_borrow_mut(|buf| {
        let got = match recv(client, buf) {
            Ok(n) => n,
            // Nothing queued: the relay reads the client's first bytes when they come.
            Err(e) if transient(&e) => 0,
            Err(e) => {
                early.client_failed = Some(e);
                0
            }
        };
        if got == 0 {
            return Ok(None);
        }
        early.read = got;
        let result = sent(send(to, &buf[..got], false));
        let n = result.as_ref().map_or(0, |(n, _)| *n);
        early.data.extend_from_slice(&buf[n..got]);
        result.map(|(_, complete)| complete)
    })
}

/// Writes all of `buf` to `to` (used before the relay starts, e.g. for a PROXY protocol header).
pub(super) async fn write_all(to: &Stream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        poll_fn(|cx| poll_writable(to, cx)).await?;
        match to.try_io(Interest::WRITABLE, |s| send(s, buf, false)) {
            Ok(m) => buf = &buf[m..],
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Two connected pairs: (client, proxy's client side) and (proxy's server side, server).
    async fn pairs() -> (TcpStream, Stream, Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (pc, _) = l.accept().await.expect("accept");
        let ps = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        let register = |s: TcpStream| crate::sys::register(s.into_std().expect("std")).expect("register");
        (client, register(pc), register(ps), server)
    }

    fn payload(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i % 241) as u8).collect()
    }

    /// Runs the relay between the proxy's two sockets next to `ends` (what the client and the
    /// server do), then closes the sockets as `handle` does: with the resets the outcome arms.
    /// `early` holds bytes already read from the client and not yet sent (usually none).
    async fn relayed<T>(
        early: Early,
        pc: Stream,
        ps: Stream,
        zero_copy: bool,
        drain: &CancellationToken,
        ends: impl Future<Output = T>,
    ) -> (Outcome, T) {
        let relay = async move {
            let (rx, tx) = (metrics::Counter::noop(), metrics::Counter::noop());
            let outcome = relay(&pc, &ps, &rx, &tx, zero_copy, drain, early).await;
            outcome.arm_resets(&pc, &ps);
            drop((pc, ps));
            outcome
        };
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(relay, ends) })
            .await
            .expect("in time")
    }

    /// Reads `s` to its end: the bytes, and how it ended (EOF or the error).
    async fn read_all(s: &mut TcpStream) -> (Vec<u8>, io::Result<usize>) {
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got).await;
        (got, end)
    }

    /// The client sends `size` bytes and half-closes; the server reads to EOF, answers and closes.
    async fn exchange(size: usize, zero_copy: bool) {
        let (mut client, pc, ps, mut server) = pairs().await;
        let payload = payload(size);
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
        let (outcome, (got, back)) =
            relayed(Early::default(), pc, ps, zero_copy, &CancellationToken::new(), ends).await;
        let Outcome::Closed(from_client, to_client) = outcome else { panic!("relay did not close cleanly") };
        assert_eq!((from_client, to_client), (payload.len() as u64, 15));
        assert!(got == payload);
        assert_eq!(back, b"reply after EOF");
    }

    /// Bytes read before the upstream connect finished reach the server before anything the
    /// client sends later, and count as bytes from the client.
    #[tokio::test]
    async fn early_bytes_go_first() {
        let (mut client, pc, ps, mut server) = pairs().await;
        let early = Early { data: b"early ".to_vec(), read: 6, client_failed: None };
        let ends = async {
            client.write_all(b"late").await.expect("write");
            client.shutdown().await.expect("half-close");
            let (got, end) = read_all(&mut server).await;
            end.expect("server reads to EOF");
            server.shutdown().await.expect("close");
            got
        };
        let (outcome, got) = relayed(early, pc, ps, false, &CancellationToken::new(), ends).await;
        assert_eq!(got, b"early late");
        assert!(matches!(outcome, Outcome::Closed(10, 0)), "6 early bytes and 4 later ones from the client");
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

    /// Keep-alive traffic: many request/response rounds on one connection, each answered only
    /// after the whole request arrived, so every round needs both directions to wake up again.
    #[tokio::test]
    async fn request_response_rounds() {
        let (mut client, pc, ps, mut server) = pairs().await;
        let rounds = async {
            for round in 0..500u32 {
                let request = payload(50 + (round as usize * 37) % 3000);
                client.write_all(&request).await.expect("request");
                let mut got = vec![0; request.len()];
                server.read_exact(&mut got).await.expect("server reads the request");
                assert!(got == request, "request {round} arrived intact");
                let response = round.to_be_bytes().repeat(1 + round as usize % 700);
                server.write_all(&response).await.expect("response");
                let mut back = vec![0; response.len()];
                client.read_exact(&mut back).await.expect("client reads the response");
                assert!(back == response, "response {round} arrived intact");
            }
            drop(client);
            drop(server);
        };
        let (outcome, ()) = relayed(Early::default(), pc, ps, true, &CancellationToken::new(), rounds).await;
        assert!(matches!(outcome, Outcome::Closed(..)), "both ends closed with FIN");
    }

    /// The server answers and closes while the client's side is still open (a `Connection:
    /// close` response): the client gets the whole answer, then EOF, and can still half-close.
    /// When the FIN arrived with the data, this is the path that sends both in one segment.
    #[tokio::test]
    async fn server_closes_first() {
        for size in [1, 1000, 100_000] {
            let (mut client, pc, ps, mut server) = pairs().await;
            let answer = payload(size);
            let ends = async {
                client.write_all(b"request").await.expect("request");
                let mut got = [0; 7];
                server.read_exact(&mut got).await.expect("server reads the request");
                server.write_all(&answer).await.expect("answer");
                server.shutdown().await.expect("server closes");
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.expect("client reads to EOF");
                client.shutdown().await.expect("client closes");
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.expect("server sees the client's FIN");
                (back, rest)
            };
            let (outcome, (back, rest)) =
                relayed(Early::default(), pc, ps, false, &CancellationToken::new(), ends).await;
            assert!(back == answer, "the answer of {size} bytes arrived intact");
            assert!(rest.is_empty());
            assert!(matches!(outcome, Outcome::Closed(7, n) if n == size as u64));
        }
    }

    /// A server that resets after sending data: the client gets the data and then a reset, never
    /// a clean EOF, even when the reset is already known as the data is read.
    #[tokio::test]
    async fn server_reset_after_data_reaches_the_client_as_a_reset() {
        let (mut client, pc, ps, mut server) = pairs().await;
        server.write_all(b"partial").await.expect("write");
        SockRef::from(&server).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(server);
        let (outcome, (got, end)) =
            relayed(Early::default(), pc, ps, false, &CancellationToken::new(), read_all(&mut client)).await;
        assert!(matches!(outcome, Outcome::Failed(Error::Upstream(_))), "upstream failure");
        assert_eq!(end.expect_err("a reset, not EOF").kind(), io::ErrorKind::ConnectionReset);
        assert!(got.is_empty() || got == b"partial", "no other bytes: {got:?}");
    }

    /// A reset from the server before any answer: an upstream error, passed on as a reset.
    #[tokio::test]
    async fn server_reset_is_an_upstream_error() {
        let (mut client, pc, ps, server) = pairs().await;
        SockRef::from(&server).set_linger(Some(Duration::ZERO)).expect("linger");
        let ends = async {
            client.write_all(b"hello").await.expect("write");
            drop(server);
            read_all(&mut client).await
        };
        let (outcome, (got, end)) =
            relayed(Early::default(), pc, ps, false, &CancellationToken::new(), ends).await;
        assert!(matches!(outcome, Outcome::Failed(Error::Upstream(_))), "upstream failure");
        assert!(got.is_empty());
        assert_eq!(end.expect_err("a reset, not EOF").kind(), io::ErrorKind::ConnectionReset);
    }

    /// Cancelling the drain token ends the relay while both directions are still open, and
    /// resets both sides.
    #[tokio::test]
    async fn drain_ends_the_relay() {
        let (mut client, pc, ps, mut server) = pairs().await;
        let drain = CancellationToken::new();
        let cancel = async {
            client.write_all(b"in flight").await.expect("write");
            tokio::task::yield_now().await;
            drain.cancel();
            (read_all(&mut client).await.1, read_all(&mut server).await.1)
        };
        let (outcome, (client_end, server_end)) =
            relayed(Early::default(), pc, ps, false, &drain, cancel).await;
        assert!(matches!(outcome, Outcome::Drained));
        assert_eq!(client_end.expect_err("client reset").kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(server_end.expect_err("server reset").kind(), io::ErrorKind::ConnectionReset);
    }
}
