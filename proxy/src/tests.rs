//! Behaviour tests over real loopback sockets on ephemeral ports.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_model::{
    Backend, Balancing, FrontendKey, Index, PassiveHealth, Protocol, ServiceKey, SessionAffinity, Snapshot,
    Timeouts, listener::ValidListener,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{Manager, ProxyConfig};

pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

fn listener(name: &str, addr: &str, protocol: Protocol, backends: &[SocketAddr]) -> ValidListener {
    ValidListener {
        key: ServiceKey::new("", name),
        address: addr.parse().expect("address"),
        protocol,
        backends: backends.iter().copied().map(Backend::Addr).collect(),
        balancing: Balancing::RoundRobin,
        session_affinity: SessionAffinity::None,
        health_check: None,
        passive_health: PassiveHealth::default(),
        timeouts: Timeouts {
            connect: Duration::from_millis(500),
            connect_attempts: 3,
            udp_idle: Duration::from_secs(30),
            udp_responses: None,
        },
        zero_copy: true,
    }
}

struct Harness {
    index: Index,
    mgr: Manager,
}

impl Harness {
    fn new(drain: Duration) -> Self {
        Self::with(ProxyConfig { drain_timeout: drain, ..ProxyConfig::default() })
    }

    /// With `n` data-plane workers.
    fn with_workers(n: usize) -> Self {
        let workers = crate::Workers::start(n).expect("workers");
        Self::with(ProxyConfig { drain_timeout: DEADLINE, workers: Some(workers), ..ProxyConfig::default() })
    }

    fn with(config: ProxyConfig) -> Self {
        Self { index: Index::new(None), mgr: Manager::new(config) }
    }

    fn set(&mut self, l: ValidListener) -> Arc<Snapshot> {
        self.index.apply_listener(l);
        self.apply()
    }

    fn apply(&mut self) -> Arc<Snapshot> {
        let snap = self.index.build();
        let errors = self.mgr.apply(&snap);
        assert!(errors.is_empty(), "{errors:?}");
        snap
    }

    fn addr(&self, protocol: Protocol, addr: &str) -> SocketAddr {
        let key = FrontendKey::Addr(protocol, addr.parse().expect("addr"));
        self.mgr.local_addr(&key).expect("listener is bound")
    }
}

/// A TCP backend that reads until EOF, then replies `[id] ++ data` and closes.
pub(crate) async fn collect_backend(id: u8) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut data = vec![id];
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&data).await;
                }
            });
        }
    });
    (addr, task)
}

/// A TCP backend that echoes every read at once and closes after EOF.
async fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn request(proxy: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf)).await.expect("echo in time").expect("echo");
    assert_eq!(buf, msg);
}

/// Reads until the connection ends; `true` when it ended (EOF or reset) before the deadline.
async fn ends_within(s: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(deadline, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_spreads_over_backends() {
    let (a, _ta) = collect_backend(1).await;
    let (b, _tb) = collect_backend(2).await;
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a, b]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut seen: HashMap<u8, usize> = HashMap::new();
    for _ in 0..10 {
        let out = request(proxy, b"x").await.expect("request");
        assert_eq!(&out[1..], b"x");
        *seen.entry(out[0]).or_default() += 1;
    }
    assert_eq!(seen.get(&1), Some(&5), "{seen:?}");
    assert_eq!(seen.get(&2), Some(&5), "{seen:?}");
}

#[tokio::test]
async fn dead_backend_is_routed_around() {
    let (a, _ta) = collect_backend(1).await;
    let dead = dead_addr();
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[dead, a]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    for _ in 0..6 {
        let out = request(proxy, b"hello").await.expect("no failed connection");
        assert_eq!(out, b"\x01hello");
    }
}

#[tokio::test]
async fn half_close_reply_after_eof() {
    let (a, _ta) = collect_backend(7).await;
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let out =
        tokio::time::timeout(DEADLINE, request(proxy, &payload)).await.expect("in time").expect("request");
    assert_eq!(out.len(), payload.len() + 1);
    assert_eq!(out[0], 7);
    assert!(out[1..] == payload[..]);
}

#[tokio::test]
async fn upstream_reset_reaches_client() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = l.local_addr().expect("addr");
    let _t = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 2];
            let _ = s.read_exact(&mut buf).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[backend]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"hi").await.expect("write");
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(DEADLINE, s.read(&mut buf)).await.expect("in time");
    assert_eq!(r.map_err(|e| e.kind()).expect_err("reset, not EOF"), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn client_reset_reaches_upstream() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _t = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(b"ok").await.expect("write");
        let mut rest = [0u8; 8];
        let _ = tx.send(s.read(&mut rest).await.map_err(|e| e.kind()));
    });
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[backend]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"hi").await.expect("write");
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.expect("ok");
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(s);
    let r = tokio::time::timeout(DEADLINE, rx).await.expect("in time").expect("result");
    assert_eq!(r, Err(io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn no_endpoint_closes_client_at_once() {
    let mut h = Harness::new(DEADLINE);
    h.set(listener("empty", "127.0.0.1:0", Protocol::Tcp, &[]));
    h.set(listener("dead", "127.0.0.2:0", Protocol::Tcp, &[dead_addr(), dead_addr()]));
    for addr in [h.addr(Protocol::Tcp, "127.0.0.1:0"), h.addr(Protocol::Tcp, "127.0.0.2:0")] {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert!(ends_within(&mut s, Duration::from_secs(2)).await, "client not closed");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn snapshot_change_keeps_established_connections() {
    let (a, _ta) = echo_backend().await;
    let (b, _tb) = collect_backend(2).await;
    let mut h = Harness::new(DEADLINE);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;

    // a removed, b added: the established connection keeps working, new ones go to b.
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[b]));
    assert_eq!(h.addr(Protocol::Tcp, "127.0.0.1:0"), proxy, "socket re-bound");
    echo_roundtrip(&mut s, b"two").await;
    assert_eq!(request(proxy, b"x").await.expect("request"), b"\x02x");

    // a back, and b kept: still the same connection.
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a, b]));
    echo_roundtrip(&mut s, b"three").await;
}

/// Frontend sockets on 127.0.0.1 at `port`: listening TCP sockets from `/proc/net/tcp` (state
/// `0A`, LISTEN), or unconnected UDP sockets from `/proc/net/udp` (state `07`).
fn frontend_sockets(protocol: Protocol, port: u16) -> usize {
    let (path, state) = match protocol {
        Protocol::Udp => ("/proc/net/udp", "07"),
        _ => ("/proc/net/tcp", "0A"),
    };
    let table = std::fs::read_to_string(path).expect(path);
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&state)
        })
        .count()
}

/// Waits (bounded) until no frontend socket is left on `port`: each worker closes its own when
/// its loop sees the stop.
async fn frontend_sockets_closed(protocol: Protocol, port: u16) {
    let start = Instant::now();
    while frontend_sockets(protocol, port) > 0 {
        assert!(start.elapsed() < DEADLINE, "every {protocol:?} socket on port {port} closed");
        tokio::task::yield_now().await;
    }
}

/// With two data-plane workers a TCP listener is two sockets on one port (one `SO_REUSEPORT`
/// group), and each worker accepts on its own. The kernel hashes each new connection to one of
/// the two, so if either worker did not accept, about half of these connections would go
/// unanswered. The test's own runtime has one thread and only runs the backend: the
/// connections are served on the workers. Removing the listener closes both sockets, and the
/// open connections keep working on their workers.
#[tokio::test]
async fn workers_each_accept_on_their_own_socket() {
    let (a, _ta) = echo_backend().await;
    let mut h = Harness::with_workers(2);
    let l = listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]);
    let key = l.key.clone();
    h.set(l);
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    assert_eq!(frontend_sockets(Protocol::Tcp, proxy.port()), 2, "one socket per worker");
    let mut open = Vec::new();
    for i in 0..32u8 {
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        echo_roundtrip(&mut s, &[b'a' + i % 26; 3]).await;
        open.push(s);
    }
    h.index.delete_listener(&key);
    h.apply();
    frontend_sockets_closed(Protocol::Tcp, proxy.port()).await;
    assert_eq!(
        TcpStream::connect(proxy).await.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionRefused)
    );
    for s in &mut open {
        echo_roundtrip(s, b"still served").await;
    }
}

/// With two workers a UDP listener is two sockets on one port too, each with its own recv loop
/// and flow table. The kernel hashes each client to one socket, so every datagram of a client
/// reaches the same flow (the endpoint sees one source port per client), and if either worker did
/// not serve, about half of these clients would get no reply. Removing the listener closes both.
#[tokio::test]
async fn workers_each_serve_udp_on_their_own_socket() {
    let (backend, _task) = udp_backend(1).await;
    let mut h = Harness::with_workers(2);
    let l = udp_listener(&[backend], Duration::from_secs(30));
    let key = l.key.clone();
    h.set(l);
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    assert_eq!(frontend_sockets(Protocol::Udp, proxy.port()), 2, "one socket per worker");
    let mut clients = Vec::new();
    for _ in 0..16 {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let first = udp_ask(&c, proxy, b"port?").await;
        assert_eq!(udp_ask(&c, proxy, b"port?").await, first, "a client keeps its flow");
        clients.push((c, first));
    }
    let flows: std::collections::HashSet<_> = clients.iter().map(|(_, port)| port.clone()).collect();
    assert_eq!(flows.len(), clients.len(), "one flow per client");
    h.index.delete_listener(&key);
    h.apply();
    frontend_sockets_closed(Protocol::Udp, proxy.port()).await;
}

#[tokio::test]
async fn removed_listener_closes_but_connections_continue() {
    let (a, _ta) = echo_backend().await;
    let mut h = Harness::new(DEADLINE);
    let l = listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]);
    let key = l.key.clone();
    h.set(l);
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;
    h.index.delete_listener(&key);
    h.apply();
    assert!(h.mgr.bound().is_empty());
    let start = Instant::now();
    loop {
        match TcpStream::connect(proxy).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            _ => assert!(start.elapsed() < DEADLINE, "listener still accepting"),
        }
        tokio::task::yield_now().await;
    }
    echo_roundtrip(&mut s, b"two").await;
}

#[tokio::test]
async fn drain_deadline_closes_connections_of_removed_endpoint() {
    let (a, _ta) = echo_backend().await;
    let (b, _tb) = echo_backend().await;
    let drain = Duration::from_millis(300);
    let mut h = Harness::new(drain);
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;
    let removed = Instant::now();
    h.set(listener("web", "127.0.0.1:0", Protocol::Tcp, &[b]));
    echo_roundtrip(&mut s, b"two").await;
    assert!(ends_within(&mut s, DEADLINE).await, "connection outlived the drain timeout");
    let took = removed.elapsed();
    assert!(took >= drain, "closed before the drain timeout: {took:?}");
    // A connection to the remaining endpoint is unaffected.
    let mut t = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut t, b"three").await;
}

#[tokio::test]
async fn drain_deadline_closes_connections_of_removed_listener() {
    let (a, _ta) = echo_backend().await;
    let drain = Duration::from_millis(300);
    let mut h = Harness::new(drain);
    let l = listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]);
    let key = l.key.clone();
    h.set(l);
    let proxy = h.addr(Protocol::Tcp, "127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;
    let removed = Instant::now();
    h.index.delete_listener(&key);
    h.apply();
    assert!(ends_within(&mut s, DEADLINE).await, "connection outlived the drain timeout");
    assert!(removed.elapsed() >= drain);
}

/// A UDP backend replying `[id] ++ data`, or its view of the client port when asked `port?`.
pub(crate) async fn udp_backend(id: u8) -> (SocketAddr, JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let reply = if &buf[..n] == b"port?" {
                format!("{id}:{}", peer.port()).into_bytes()
            } else {
                let mut r = vec![id];
                r.extend_from_slice(&buf[..n]);
                r
            };
            let _ = s.send_to(&reply, peer).await;
        }
    });
    (addr, task)
}

async fn udp_ask(client: &UdpSocket, proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    client.send_to(msg, proxy).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    assert_eq!(from, proxy, "reply must come from the frontend address");
    buf.truncate(n);
    buf
}

fn udp_listener(backends: &[SocketAddr], idle: Duration) -> ValidListener {
    let mut l = listener("dns", "127.0.0.1:0", Protocol::Udp, backends);
    l.timeouts.udp_idle = idle;
    l
}

#[tokio::test]
async fn udp_echo_spreads_and_passes_large_datagrams() {
    let (a, _ta) = udp_backend(1).await;
    let (b, _tb) = udp_backend(2).await;
    let mut h = Harness::new(DEADLINE);
    h.set(udp_listener(&[a, b], Duration::from_secs(30)));
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    let mut seen: HashMap<u8, usize> = HashMap::new();
    // Every client stays open until the end: a closed one's port could be reused by the next
    // client, which would then (rightly) join the old flow.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let r = udp_ask(&c, proxy, b"ping").await;
        assert_eq!(&r[1..], b"ping");
        *seen.entry(r[0]).or_default() += 1;
        // A second datagram from the same client stays on its flow.
        assert_eq!(udp_ask(&c, proxy, b"again").await[0], r[0]);
        clients.push(c);
    }
    assert_eq!(seen.get(&1), Some(&2), "{seen:?}");
    assert_eq!(seen.get(&2), Some(&2), "{seen:?}");

    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let big: Vec<u8> = (0..65_000u32).map(|i| (i % 253) as u8).collect();
    let r = udp_ask(&c, proxy, &big).await;
    assert_eq!(r.len(), big.len() + 1);
    assert!(r[1..] == big[..]);
}

/// Datagrams queued from several clients at once are read in batches that mix the clients; each
/// client's datagrams still reach the endpoint in order, on its own flow, and every reply comes
/// back to its client, in order.
#[tokio::test]
async fn udp_bursts_from_several_clients_keep_each_clients_order() {
    const CLIENTS: usize = 3;
    const EACH: usize = 40;
    let (backend, _task) = udp_backend(7).await;
    let mut h = Harness::new(DEADLINE);
    h.set(udp_listener(&[backend], Duration::from_secs(30)));
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    let senders: Vec<_> =
        (0..CLIENTS).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
    // Interleaved and without yielding, so the frontend finds them all queued.
    for i in 0..EACH {
        for (c, client) in senders.iter().enumerate() {
            client.send_to(format!("{c}:{i}").as_bytes(), proxy).expect("send");
        }
    }
    let clients: Vec<_> = senders
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            UdpSocket::from_std(s).expect("register")
        })
        .collect();
    let mut buf = vec![0u8; 1024];
    for (c, client) in clients.iter().enumerate() {
        for i in 0..EACH {
            let (n, from) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
                .await
                .expect("reply in time")
                .expect("recv");
            assert_eq!(from, proxy);
            assert_eq!(&buf[..n], format!("\u{7}{c}:{i}").as_bytes(), "client {c}, datagram {i}");
        }
    }
}

/// With `udp_responses: 1` (a Service annotated for DNS), a flow that has answered every datagram
/// of its client ends at the next sweep, so its upstream socket closes and the same client's next
/// query opens a new flow (the endpoint sees a new source port). A flow still owed a reply is
/// kept. Without the setting the flow stays for its idle timeout: the ports stay equal.
#[tokio::test]
async fn udp_flows_that_owe_no_reply_end_with_udp_responses() {
    let counted = |backend, responses| {
        let mut h = Harness::new(DEADLINE);
        let mut l = udp_listener(&[backend], Duration::from_secs(30));
        l.timeouts.udp_responses = responses;
        h.set(l);
        let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
        (h, proxy)
    };
    let (backend, _task) = udp_backend(1).await;
    let (_h, proxy) = counted(backend, Some(1));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let first = udp_ask(&client, proxy, b"port?").await;
    // The sweep runs every second here (half the idle timeout, at most 1 s): the flow ends at the
    // first one, which README promises as "within about a second" (the bound leaves CI margin).
    let start = Instant::now();
    loop {
        let again = udp_ask(&client, proxy, b"port?").await;
        if again != first {
            break;
        }
        assert!(start.elapsed() < Duration::from_millis(2500), "the answered flow did not end at a sweep");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A flow whose reply is still due survives the sweeps until the reply has gone out.
    let (slow, mut arrived, _slow_task) = slow_udp_backend(2, Duration::from_millis(1500)).await;
    let (_h, slow_proxy) = counted(slow, Some(1));
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.send_to(b"late", slow_proxy).await.expect("send");
    tokio::time::timeout(DEADLINE, arrived.recv()).await.expect("query reached the backend");
    let mut buf = [0u8; 64];
    let (n, from) =
        tokio::time::timeout(DEADLINE, c.recv_from(&mut buf)).await.expect("reply in time").expect("recv");
    assert_eq!((&buf[..n], from), (&b"\x02late"[..], slow_proxy), "the owed reply was relayed");

    // Without the setting, the flow stays: the same port after more than a sweep period.
    let (plain, _plain_task) = udp_backend(3).await;
    let (_h, plain_proxy) = counted(plain, None);
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let kept = udp_ask(&c, plain_proxy, b"port?").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(udp_ask(&c, plain_proxy, b"port?").await, kept, "the flow idles for udp_idle");
}

/// A UDP backend that answers each datagram with `[id] ++ data` after `delay`, and reports each
/// datagram as it arrives.
async fn slow_udp_backend(
    id: u8,
    delay: Duration,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, JoinHandle<()>) {
    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = s.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let _ = tx.send(buf[..n].to_vec());
            let mut reply = vec![id];
            reply.extend_from_slice(&buf[..n]);
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = s.send_to(&reply, peer).await;
            });
        }
    });
    (addr, rx, task)
}

#[tokio::test]
async fn a_stopped_udp_listener_still_delivers_the_replies_it_owes() {
    let delay = Duration::from_millis(300);
    let (a, mut received, _ta) = slow_udp_backend(1, delay).await;
    let mut h = Harness::new(DEADLINE);
    let l = udp_listener(&[a], Duration::from_secs(30));
    let key = l.key.clone();
    h.set(l);
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    // One client's exchange is complete: its flow owes nothing.
    let done = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(udp_ask(&done, proxy, b"done").await, b"\x01done");
    assert_eq!(received.recv().await.as_deref(), Some(&b"done"[..]));

    // Another's query has reached the endpoint when the listener is removed (or handed over).
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.send_to(b"late", proxy).await.expect("send");
    assert_eq!(received.recv().await.as_deref(), Some(&b"late"[..]));
    h.index.delete_listener(&key);
    h.apply();

    // The answer still comes, from the frontend address; nothing new is read.
    let mut buf = vec![0u8; 1500];
    let (n, from) =
        tokio::time::timeout(DEADLINE, c.recv_from(&mut buf)).await.expect("reply in time").expect("recv");
    assert_eq!((&buf[..n], from), (&b"\x01late"[..], proxy));
    c.send_to(b"after", proxy).await.expect("send");
    assert!(
        tokio::time::timeout(delay * 2, received.recv()).await.is_err(),
        "a datagram after the stop reached the endpoint"
    );
}

#[tokio::test]
async fn udp_flows_expire_after_idle() {
    let (a, _ta) = udp_backend(1).await;
    let idle = Duration::from_millis(200);
    let mut h = Harness::new(DEADLINE);
    h.set(udp_listener(&[a], idle));
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let first = udp_ask(&c, proxy, b"port?").await;
    assert_eq!(udp_ask(&c, proxy, b"port?").await, first, "same flow within the idle timeout");
    // Waiting out the idle timeout is the behaviour under test.
    tokio::time::sleep(idle * 4).await;
    assert_ne!(udp_ask(&c, proxy, b"port?").await, first, "flow should have expired");
}

#[tokio::test]
async fn udp_flow_repicks_after_endpoint_removal() {
    let (a, _ta) = udp_backend(1).await;
    let (b, _tb) = udp_backend(2).await;
    let mut h = Harness::new(DEADLINE);
    h.set(udp_listener(&[a], Duration::from_secs(30)));
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(udp_ask(&c, proxy, b"x").await, b"\x01x");
    h.set(udp_listener(&[b], Duration::from_secs(30)));
    assert_eq!(udp_ask(&c, proxy, b"x").await, b"\x02x");
}

#[tokio::test]
async fn udp_flow_table_is_bounded() {
    let (a, _ta) = udp_backend(1).await;
    let mut index = Index::new(None);
    index.apply_listener(udp_listener(&[a], Duration::from_secs(30)));
    let mut mgr = Manager::new(ProxyConfig { max_udp_flows: 4, ..ProxyConfig::default() });
    assert!(mgr.apply(&index.build()).is_empty());
    let proxy = mgr
        .local_addr(&FrontendKey::Addr(Protocol::Udp, "127.0.0.1:0".parse().expect("addr")))
        .expect("bound");
    let key = FrontendKey::Addr(Protocol::Udp, "127.0.0.1:0".parse().expect("addr"));
    let state = mgr.listener(&key).expect("running").clone();
    let mut clients = Vec::new();
    for _ in 0..9 {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(udp_ask(&c, proxy, b"x").await, b"\x01x", "a new client is served when the table is full");
        assert!(state.active_connections() <= 4, "{} flows", state.active_connections());
        clients.push(c);
    }
    drop(mgr);
}

/// On a frontend bound to 0.0.0.0, replies leave from the address the client targeted.
#[tokio::test]
async fn udp_reply_source_is_the_targeted_address() {
    let (a, _ta) = udp_backend(1).await;
    let mut h = Harness::new(DEADLINE);
    let mut l = udp_listener(&[a], Duration::from_secs(30));
    l.address = "0.0.0.0:0".parse().expect("addr");
    h.set(l);
    let port = h.addr(Protocol::Udp, "0.0.0.0:0").port();
    for target in ["127.0.0.1", "127.0.0.2"] {
        let proxy = SocketAddr::new(target.parse().expect("ip"), port);
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // `udp_ask` asserts the reply's source equals `proxy`.
        assert_eq!(udp_ask(&c, proxy, b"x").await, b"\x01x");
    }
}

#[tokio::test]
async fn udp_no_endpoint_drops() {
    let mut h = Harness::new(DEADLINE);
    h.set(udp_listener(&[], Duration::from_secs(30)));
    let proxy = h.addr(Protocol::Udp, "127.0.0.1:0");
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.send_to(b"x", proxy).await.expect("send");
    let mut buf = [0u8; 16];
    assert!(tokio::time::timeout(Duration::from_millis(200), c.recv_from(&mut buf)).await.is_err());
}

#[tokio::test]
async fn bind_failure_does_not_stop_other_listeners() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let (a, _ta) = collect_backend(1).await;
    let mut index = Index::new(None);
    index.apply_listener(listener("clash", &taken_addr.to_string(), Protocol::Tcp, &[a]));
    index.apply_listener(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let mut mgr = Manager::new(ProxyConfig::default());
    let errors = mgr.apply(&index.build());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(matches!(errors[0], crate::Error::Bind { addr, .. } if addr == taken_addr));
    let proxy = mgr
        .local_addr(&FrontendKey::Addr(Protocol::Tcp, "127.0.0.1:0".parse().expect("addr")))
        .expect("bound");
    assert_eq!(request(proxy, b"x").await.expect("request"), b"\x01x");
    // Retried on the next snapshot once the address is free.
    drop(taken);
    assert!(mgr.apply(&index.build()).is_empty());
    assert_eq!(mgr.bound().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_returns() {
    let (a, _ta) = echo_backend().await;
    let mut index = Index::new(None);
    index.apply_listener(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let (tx, rx) = tokio::sync::watch::channel(index.build());
    let drain = Duration::from_millis(400);
    let mgr = Manager::new(ProxyConfig { drain_timeout: drain, ..ProxyConfig::default() });
    let mut bound = mgr.subscribe_bound();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(mgr.run(rx, shutdown.clone()));
    let proxy = tokio::time::timeout(DEADLINE, bound.wait_for(|b| !b.is_empty()))
        .await
        .expect("bound in time")
        .expect("bound")[0]
        .1;

    // A connection that ends by itself lets shutdown return early.
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;
    let stopped = Instant::now();
    shutdown.cancel();
    echo_roundtrip(&mut s, b"still served while draining").await;
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("eof");
    tokio::time::timeout(DEADLINE, run).await.expect("returns").expect("join").expect("ok");
    assert!(stopped.elapsed() < DEADLINE);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_force_closes_after_drain_timeout() {
    let (a, _ta) = echo_backend().await;
    let mut index = Index::new(None);
    index.apply_listener(listener("web", "127.0.0.1:0", Protocol::Tcp, &[a]));
    let (_tx, rx) = tokio::sync::watch::channel(index.build());
    let drain = Duration::from_millis(300);
    let mgr = Manager::new(ProxyConfig { drain_timeout: drain, ..ProxyConfig::default() });
    let mut bound = mgr.subscribe_bound();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(mgr.run(rx, shutdown.clone()));
    let proxy = tokio::time::timeout(DEADLINE, bound.wait_for(|b| !b.is_empty()))
        .await
        .expect("bound in time")
        .expect("bound")[0]
        .1;
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    echo_roundtrip(&mut s, b"one").await;
    let stopped = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, run).await.expect("returns").expect("join").expect("ok");
    assert!(stopped.elapsed() >= drain);
    assert!(ends_within(&mut s, DEADLINE).await);
    // New connections are refused: the listener is closed.
    assert!(TcpStream::connect(proxy).await.is_err());
}
