//! Two [`Handoff`]s in one process stand for the old and the new process: what crosses between
//! them is the same kernel socket, so a connection queued before the handoff is accepted after it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd as _,
    sync::Arc,
    time::Duration,
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// A temporary directory for the handoff socket, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-handoff-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("handoff.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process's side: its handoff, serving, and the token its successor cancels.
struct Process {
    handoff: Arc<Handoff>,
    handed_over: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<Result<(), HandoffError>>,
}

impl Process {
    /// Starts serving `handoff` and waits until its socket accepts a successor.
    async fn serve(handoff: Arc<Handoff>) -> Self {
        let (handed_over, stop) = (CancellationToken::new(), CancellationToken::new());
        let path = handoff.path.clone().expect("enabled");
        handoff.complete_takeover().await;
        let task = tokio::spawn(handoff.clone().serve(handed_over.clone(), stop.clone()));
        // Readiness: the path accepts (the predecessor closed its listener before confirming).
        tokio::time::timeout(DEADLINE, async {
            while !can_connect(&path) {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("handoff socket listening");
        Self { handoff, handed_over, stop, task }
    }
}

/// Whether something listens on `path` (a probe connection the server then sees as abandoned).
fn can_connect(path: &Path) -> bool {
    let Ok(fd) = seqpacket() else { return false };
    let Ok(addr) = SocketAddrUnix::new(path) else { return false };
    rustix::net::connect(&fd, &addr).is_ok()
}

fn tcp_listener(handoff: &Arc<Handoff>) -> (std::net::TcpListener, Registration, SocketAddr) {
    let (listener, registration) = handoff.tcp_listener(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener.into_std().expect("std listener"), registration, addr)
}

/// Accepts one connection, blocking. `O_NONBLOCK` lives on the open file, which the other
/// process's copy shares, so it is restored before returning.
fn accept(listener: &std::net::TcpListener) -> std::net::TcpStream {
    listener.set_nonblocking(false).expect("blocking");
    let accepted = listener.accept().expect("accept").0;
    listener.set_nonblocking(true).expect("non-blocking again");
    accepted
}

#[tokio::test]
async fn a_successor_takes_the_same_sockets_with_their_queues() {
    let dir = Dir::new("same");
    let old = Handoff::take_over(dir.socket()).await.expect("no predecessor");
    assert_eq!(old.predecessor(), None);
    let (old_tcp, _old_tcp_reg, tcp_addr) = tcp_listener(&old);
    let (old_udp, _old_udp_reg) = old.udp_socket(SocketAddr::from(([127, 0, 0, 1], 0))).expect("udp");
    let udp_addr = old_udp.local_addr().expect("addr");
    let old = Process::serve(old).await;

    // Queued before the handoff: a connection nobody accepted yet, and a datagram nobody read.
    let mut queued = TcpStream::connect(tcp_addr).expect("connect");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
    client.send_to(b"before", udp_addr).expect("send");

    let new = Handoff::take_over(dir.socket()).await.expect("take over");
    assert!(new.predecessor().is_some(), "the old process answered");
    assert_eq!(new.inherited(), 2);
    assert!(new.take(SocketKey::tcp("127.0.0.1:1".parse().expect("addr"))).is_none(), "no such socket");
    let (new_tcp, _new_tcp_reg) = new.tcp_listener(tcp_addr).expect("inherited, not bound");
    let new_tcp = new_tcp.into_std().expect("std listener");
    let (new_udp, _new_udp_reg) = new.udp_socket(udp_addr).expect("inherited, not bound");
    assert_eq!(new.inherited(), 0);

    let mut accepted = accept(&new_tcp);
    queued.write_all(b"hi").expect("write");
    let mut buf = [0u8; 2];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hi", "the connection queued on the old process's socket");
    new_udp.set_nonblocking(false).expect("blocking");
    new_udp.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut dgram = [0u8; 16];
    let n = new_udp.recv(&mut dgram).expect("the datagram queued on the old socket");
    assert_eq!(&dgram[..n], b"before");

    // The new process serves: the old one is told to stop, and has stopped when that returns.
    assert!(!old.handed_over.is_cancelled());
    let new = Process::serve(new).await;
    assert!(old.handed_over.is_cancelled(), "old process handed over");
    tokio::time::timeout(DEADLINE, old.task).await.expect("old serve returns").expect("join").expect("ok");
    assert_eq!(new.handoff.predecessor(), None, "takeover complete");

    // The old process closes its copies: the sockets stay open for the new one.
    drop((old_tcp, old_udp, _old_tcp_reg, _old_udp_reg, old.handoff));
    let _fresh = TcpStream::connect(tcp_addr).expect("still listening");
    drop(accept(&new_tcp));
    new.stop.cancel();
    tokio::time::timeout(DEADLINE, new.task).await.expect("stops").expect("join").expect("ok");
}

#[tokio::test]
async fn sockets_the_successor_does_not_take_close_with_the_predecessor() {
    let dir = Dir::new("unclaimed");
    let old = Handoff::take_over(dir.socket()).await.expect("no predecessor");
    let (old_tcp, old_reg, addr) = tcp_listener(&old);
    let old = Process::serve(old).await;

    let new = Handoff::take_over(dir.socket()).await.expect("take over");
    assert_eq!(new.inherited(), 1);
    // Its configuration has no such listener: it serves without taking it.
    let new = Process::serve(new).await;
    assert_eq!(new.handoff.inherited(), 0, "unclaimed sockets are closed once the successor serves");
    tokio::time::timeout(DEADLINE, old.handed_over.cancelled()).await.expect("handed over");
    drop((old_tcp, old_reg, old.handoff));
    let refused = TcpStream::connect(addr).expect_err("closed with its last holder");
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    new.stop.cancel();
}

#[tokio::test]
async fn a_successor_that_goes_away_leaves_the_predecessor_serving() {
    let dir = Dir::new("abandon");
    let old = Handoff::take_over(dir.socket()).await.expect("no predecessor");
    let (old_tcp, _old_reg, addr) = tcp_listener(&old);
    let old = Process::serve(old).await;

    // A successor receives the sockets, then dies before it serves.
    let gone = Handoff::take_over(dir.socket()).await.expect("take over");
    assert_eq!(gone.inherited(), 1);
    drop(gone);
    let _client = TcpStream::connect(addr).expect("still listening");
    drop(accept(&old_tcp));
    assert!(!old.handed_over.is_cancelled(), "nobody took over");

    // The next successor takes over as usual.
    let next = Handoff::take_over(dir.socket()).await.expect("take over");
    let (_tcp, _reg) = next.tcp_listener(addr).expect("inherited");
    let next = Process::serve(next).await;
    tokio::time::timeout(DEADLINE, old.handed_over.cancelled()).await.expect("handed over");
    next.stop.cancel();
}

#[tokio::test]
async fn more_sockets_than_fit_one_message_cross_in_batches() {
    let dir = Dir::new("batches");
    let old = Handoff::take_over(dir.socket()).await.expect("no predecessor");
    let n = MAX_FDS_PER_MESSAGE + 17;
    let sockets: Vec<_> = (0..n).map(|_| tcp_listener(&old)).collect();
    let old = Process::serve(old).await;
    let new = Handoff::take_over(dir.socket()).await.expect("take over");
    assert_eq!(new.inherited(), n);
    for (_, _, addr) in &sockets {
        let socket = new.take(SocketKey::tcp(*addr)).expect("every socket arrives under its address");
        assert_eq!(SocketKey::of(socket.as_fd()).expect("key"), SocketKey::tcp(*addr));
    }
    old.stop.cancel();
}

#[tokio::test]
async fn a_disabled_handoff_binds_and_registers_nothing() {
    let handoff = Handoff::disabled();
    let (_listener, registration, _) = tcp_listener(&handoff);
    assert!(registration.handoff.is_none());
    assert!(handoff.lock().live.is_empty());
    let (handed_over, stop) = (CancellationToken::new(), CancellationToken::new());
    assert_eq!(handoff.complete_takeover().await, None);
    handoff.serve(handed_over.clone(), stop).await.expect("returns at once");
    assert!(!handed_over.is_cancelled());
}

#[test]
fn socket_keys_round_trip_through_their_text_form() {
    let keys = [
        SocketKey::tcp("10.96.0.10:80".parse().expect("v4")),
        SocketKey::udp("[fd00::a]:53".parse().expect("v6")),
    ];
    let text = keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    assert_eq!(text, "tcp 10.96.0.10:80 udp [fd00::a]:53");
    assert_eq!(parse_keys(text.split(' ')).expect("parses"), keys);
    assert!(parse_keys("sctp 1.2.3.4:5".split(' ')).is_err());
    assert!(parse_keys("tcp".split(' ')).is_err());
}
