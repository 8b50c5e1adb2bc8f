//! TCP through `ferry lb`: spreading, connect retry, half-close, no endpoints.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_round_robin_spreads_evenly_over_backends() {
    let backends = [TcpBackend::start("a").await, TcpBackend::start("b").await, TcpBackend::start("c").await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &addrs, "  balancing: RoundRobin\n"));
    // One worker thread: the current-thread runtime (what the benchmarks run).
    let ferry = Ferry::start(&dir, &["--worker-threads", "1"]);

    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *seen.entry(tcp_hello(front).await.expect("connect through ferry")).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 10), "round robin must be exact: {seen:?}");
    assert_eq!(ferry.metric("ferry_listener_connections_total", &["listener=\"web\""]), 30.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_backend_is_routed_around_without_failed_connections() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr, b.addr], ""));
    let ferry = Ferry::start(&dir, &[]);
    assert!(!tcp_hello(front).await.expect("first").is_empty());

    a.kill();
    // Wait until the backend really refuses (the abort is asynchronous).
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(a.addr).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "backend a still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..40 {
        let name = tcp_hello(front).await.unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert_eq!(name, "b");
    }
    assert!(ferry.metric("ferry_listener_connect_failures_total", &["listener=\"web\""]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_keeps_the_reply_direction_open() {
    let a = TcpBackend::start("a").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let _ferry = Ferry::start(&dir, &[]);

    let mut s = tokio::net::TcpStream::connect(front).await.expect("connect");
    let payload = vec![b'x'; 200_000];
    s.write_all(&payload).await.expect("write");
    s.shutdown().await.expect("shutdown write half");
    let mut reply = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut reply)).await.expect("reply in time").expect("read");
    let mut want = b"a\n".to_vec();
    want.extend_from_slice(&payload);
    want.extend_from_slice(b"bye\n");
    assert_eq!(reply.len(), want.len());
    assert!(reply == want, "reply differs from greeting + echo + bye");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_usable_endpoint_closes_the_client_at_once() {
    let dead = local(free_port()); // nothing listens here
    let front = local(free_port());
    let empty = local(free_port());
    let dir = ConfigDir::new();
    dir.write(
        "web.yaml",
        &listener_yaml("web", front, "TCP", &[dead], "  connectTimeoutMilliseconds: 200\n"),
    );
    dir.write("empty.yaml", &listener_yaml("empty", empty, "TCP", &[], ""));
    let ferry = Ferry::start(&dir, &[]);

    for addr in [front, empty] {
        let start = std::time::Instant::now();
        let err = tcp_hello(addr).await.expect_err("no backend can answer");
        assert!(start.elapsed() < Duration::from_secs(3), "{addr}: took {:?}: {err}", start.elapsed());
    }
    assert!(ferry.metric("ferry_listener_no_endpoint_total", &["listener=\"web\""]) >= 1.0);
    assert!(ferry.metric("ferry_listener_no_endpoint_total", &["listener=\"empty\""]) >= 1.0);
}
