use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU16, AtomicUsize, Ordering},
    time::Instant,
};

use ferry_model::{Balancing, HealthCheckKind, SessionAffinity};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::pool::tests::port;

const DEADLINE: Duration = Duration::from_secs(10);

fn http_check(path: &str, interval_ms: u64) -> HealthCheck {
    HealthCheck {
        kind: HealthCheckKind::Http {
            path: path.into(),
            host: Some("web.test".into()),
            expected_statuses: vec![(200, 299)],
        },
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(500),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

fn tcp_check(interval_ms: u64) -> HealthCheck {
    HealthCheck {
        kind: HealthCheckKind::Tcp,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    }
}

fn pool_with(check: Option<HealthCheck>, addrs: &[SocketAddr], previous: Option<&Pool>) -> Pool {
    let mut p = (*port(Balancing::RoundRobin, SessionAffinity::None)).clone();
    p.health_check = check;
    let endpoints: Vec<_> = addrs.iter().map(|&a| ferry_model::Endpoint::ready(a)).collect();
    Pool::new(Arc::new(p), &endpoints, previous)
}

/// An HTTP server answering every request with the status in `status`, counting requests and
/// keeping the last request head.
struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicUsize>,
    last: Arc<parking_lot::Mutex<String>>,
}

async fn http_server(status: u16) -> HttpServer {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let status = Arc::new(AtomicU16::new(status));
    let requests = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(parking_lot::Mutex::new(String::new()));
    let (s, r, l) = (status.clone(), requests.clone(), last.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (s, r, l) = (s.clone(), r.clone(), l.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                *l.lock() = String::from_utf8_lossy(&buf[..len]).into_owned();
                r.fetch_add(1, Ordering::SeqCst);
                let code = s.load(Ordering::SeqCst);
                let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    HttpServer { addr, status, requests, last }
}

/// A server that accepts connections, reads the request and writes `reply` (then closes), or
/// writes nothing and holds the connection open when `reply` is `None`.
async fn raw_server(reply: Option<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            match reply {
                Some(bytes) => {
                    // Read the request first: closing with unread data would reset the connection.
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(bytes).await;
                }
                None => held.push(conn),
            }
        }
    });
    addr
}

/// An address nothing listens on (bound, then closed).
async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    listener.local_addr().expect("addr")
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn tcp_probe() {
    let up = raw_server(None).await;
    let down = closed_addr().await;
    probe(up, &tcp_check(10)).await.expect("accepting listener passes");
    assert!(matches!(probe(down, &tcp_check(10)).await, Err(ProbeError::Connect(_))));
}

#[tokio::test]
async fn http_probe_statuses_and_request() {
    let server = http_server(200).await;
    probe(server.addr, &http_check("/healthz", 10)).await.expect("200 passes");
    let head = server.last.lock().clone();
    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nHost: web.test\r\n"), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");

    server.status.store(503, Ordering::SeqCst);
    assert!(matches!(probe(server.addr, &http_check("/", 10)).await, Err(ProbeError::UnexpectedStatus(503))));
    server.status.store(301, Ordering::SeqCst);
    assert!(matches!(probe(server.addr, &http_check("/", 10)).await, Err(ProbeError::UnexpectedStatus(301))));
    // No expected statuses: 200-399.
    let mut check = http_check("/", 10);
    if let HealthCheckKind::Http { expected_statuses, host, .. } = &mut check.kind {
        expected_statuses.clear();
        *host = None;
    }
    probe(server.addr, &check).await.expect("301 is in the default range");
    assert!(server.last.lock().contains(&format!("\r\nHost: {}\r\n", server.addr)));
    assert_eq!(server.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn http_probe_failures() {
    let garbage = raw_server(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).await;
    assert!(matches!(probe(garbage, &http_check("/", 10)).await, Err(ProbeError::BadStatusLine)));
    let closes = raw_server(Some(b"HTTP/1.1 200")).await;
    assert!(matches!(probe(closes, &http_check("/", 10)).await, Err(ProbeError::Closed)));
    let long: &'static [u8] = Vec::leak(vec![b'a'; 2 * MAX_STATUS_LINE]);
    let endless = raw_server(Some(long)).await;
    assert!(matches!(probe(endless, &http_check("/", 10)).await, Err(ProbeError::BadStatusLine)));
    let silent = raw_server(None).await;
    let mut check = http_check("/", 10);
    check.timeout = Duration::from_millis(50);
    assert!(matches!(probe(silent, &check).await, Err(ProbeError::Timeout(_))));
    assert!(matches!(probe(closed_addr().await, &check).await, Err(ProbeError::Connect(_))));
}

#[tokio::test]
async fn http_check_goes_down_and_up() {
    let server = http_server(200).await;
    let pool = pool_with(Some(http_check("/", 10)), &[server.addr], None);
    let state = pool.endpoints()[0].clone();
    let mut checks = Checks::new();
    checks.sync(&pool);
    assert_eq!(checks.len(), 1);
    assert!(state.is_healthy(), "starts healthy");
    wait_for("first probes", || server.requests.load(Ordering::SeqCst) >= 2).await;
    assert!(state.is_healthy());

    server.status.store(503, Ordering::SeqCst);
    wait_for("unhealthy", || !state.is_healthy()).await;
    assert!(!state.is_available());
    assert!(!state.health().healthy);
    // Not picked any more, except in panic mode (the only endpoint).
    assert_eq!(pool.pick(Ipv4Addr::LOCALHOST.into(), &[]).expect("panic mode").addr(), server.addr);

    server.status.store(200, Ordering::SeqCst);
    wait_for("healthy again", || state.is_healthy()).await;
    assert!(state.is_available());
    tokio::time::timeout(DEADLINE, checks.shutdown()).await.expect("shutdown completes");
    assert!(checks.is_empty());
}

#[tokio::test]
async fn unhealthy_endpoint_is_skipped_by_pick() {
    let up = raw_server(None).await;
    let down = closed_addr().await;
    let pool = pool_with(Some(tcp_check(10)), &[up, down], None);
    let mut checks = Checks::new();
    checks.sync(&pool);
    let down_state = pool.get(down).expect("in pool").clone();
    wait_for("closed port unhealthy", || !down_state.is_healthy()).await;
    for _ in 0..20 {
        assert_eq!(pool.pick(Ipv4Addr::LOCALHOST.into(), &[]).expect("pick").addr(), up);
    }
    assert!(pool.get(up).expect("in pool").is_healthy());
}

#[tokio::test]
async fn removing_the_check_stops_probes_and_restores_health() {
    let down = closed_addr().await;
    let p1 = pool_with(Some(tcp_check(10)), &[down], None);
    let state = p1.endpoints()[0].clone();
    let mut checks = Checks::new();
    checks.sync(&p1);
    assert!(checks.is_checked(&state));
    wait_for("unhealthy", || !state.is_healthy()).await;

    // Same check in the next pool: the probe keeps running, health is kept.
    let p2 = pool_with(Some(tcp_check(10)), &[down], Some(&p1));
    checks.sync(&p2);
    assert_eq!(checks.len(), 1);
    assert!(!state.is_healthy());

    // Check removed: stopped, healthy again, and it stays so.
    let p3 = pool_with(None, &[down], Some(&p2));
    checks.sync(&p3);
    assert!(checks.is_empty());
    assert!(state.is_healthy());
    assert!(!checks.is_checked(&state));
}

#[tokio::test]
async fn changed_check_restarts_from_current_health() {
    let server = http_server(503).await;
    let p1 = pool_with(Some(http_check("/a", 10)), &[server.addr], None);
    let state = p1.endpoints()[0].clone();
    let mut checks = Checks::new();
    checks.sync(&p1);
    wait_for("unhealthy", || !state.is_healthy()).await;

    let p2 = pool_with(Some(http_check("/b", 10)), &[server.addr], Some(&p1));
    checks.sync(&p2);
    assert_eq!(checks.len(), 1);
    assert!(!state.is_healthy(), "restart keeps the current health");
    wait_for("probes of the new path", || server.last.lock().starts_with("GET /b ")).await;
    server.status.store(200, Ordering::SeqCst);
    wait_for("healthy", || state.is_healthy()).await;
}

#[tokio::test]
async fn sync_all_stops_states_in_no_pool() {
    let a = raw_server(None).await;
    let b = raw_server(None).await;
    let p1 = pool_with(Some(tcp_check(10)), &[a, b], None);
    let mut checks = Checks::new();
    checks.sync_all([&p1]);
    assert_eq!(checks.len(), 2);
    let p2 = pool_with(Some(tcp_check(10)), &[a], Some(&p1));
    checks.sync_all([&p2]);
    assert_eq!(checks.len(), 1);
    assert!(checks.is_checked(p2.get(a).expect("in pool")));
    assert!(!checks.is_checked(p1.get(b).expect("in pool")));
    checks.sync_all([]);
    assert!(checks.is_empty());
}

#[tokio::test]
async fn dropped_states_are_pruned() {
    let a = raw_server(None).await;
    let mut checks = Checks::new();
    let p1 = pool_with(Some(tcp_check(10)), &[a], None);
    checks.sync(&p1);
    assert_eq!(checks.len(), 1);
    drop(p1);
    let p2 = pool_with(Some(tcp_check(10)), &[], None);
    checks.sync(&p2);
    assert!(checks.is_empty());
}
