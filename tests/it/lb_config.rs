//! Configuration changes while traffic flows: hot reload, broken files, SIGHUP.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Opens a connection through ferry and reads the backend's greeting.
async fn open(front: SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(front).await.expect("connect");
    let mut greeting = [0u8; 2];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("read");
    (s, String::from_utf8_lossy(&greeting[..1]).into_owned())
}

/// Sends `msg` and expects it echoed back: the connection still works end to end.
async fn assert_echo(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write on open connection");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf)).await.expect("echo in time").expect("echo");
    assert_eq!(buf, msg);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_change_adds_and_removes_backends_without_dropping_open_connections() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let ferry = Ferry::start(&dir, &[]);
    let v1 = ferry.snapshot()["version"].as_u64().expect("version");

    let (mut to_a, name) = open(front).await;
    assert_eq!(name, "a");

    // Replace a by b: the open connection to a keeps working, new ones go to b.
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[b.addr], ""));
    ferry.wait_version(v1 + 1);
    for _ in 0..5 {
        assert_eq!(tcp_hello(front).await.expect("new connection"), "b");
    }
    assert_echo(&mut to_a, b"still here").await;

    // Add a back: both are used again.
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr, b.addr], ""));
    ferry.wait_version(v1 + 2);
    let mut names = std::collections::HashSet::new();
    for _ in 0..6 {
        names.insert(tcp_hello(front).await.expect("new connection"));
    }
    assert_eq!(names.len(), 2, "{names:?}");
    assert_echo(&mut to_a, b"and still").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_config_is_rejected_and_the_last_good_one_keeps_serving() {
    let a = TcpBackend::start("a").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let ferry = Ferry::start(&dir, &[]);
    let version = ferry.snapshot()["version"].as_u64().expect("version");
    let (mut open_conn, _) = open(front).await;

    let cursor = ferry.log_len();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], "  bogusField: 1\n"));
    let line = ferry
        .wait_log_after(cursor, DEADLINE, |l| l["level"] == "ERROR")
        .expect("an error is logged for the broken file");
    let text = line.to_string();
    assert!(text.contains("web.yaml"), "error must name the file: {text}");
    assert!(text.contains("bogusField"), "error must name the field: {text}");

    let start = std::time::Instant::now();
    while ferry.metric("ferry_config_reload_failures_total", &[]) < 1.0 {
        assert!(start.elapsed() < DEADLINE, "reload failure not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ferry.snapshot()["version"].as_u64(), Some(version), "the last good snapshot stays");
    assert_eq!(tcp_hello(front).await.expect("new connections still flow"), "a");
    assert_echo(&mut open_conn, b"unaffected").await;

    // Fixing the file is picked up.
    let b = TcpBackend::start("b").await;
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[b.addr], ""));
    ferry.wait_version(version + 1);
    assert_eq!(tcp_hello(front).await.expect("after fix"), "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_configmap_symlink_swaps_are_followed() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    // ConfigMap layout: ..2026_a/web.yaml, ..data -> ..2026_a, web.yaml -> ..data/web.yaml
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_a")).expect("mkdir");
    std::fs::write(root.join("..2026_a/web.yaml"), listener_yaml("web", front, "TCP", &[a.addr], ""))
        .expect("w");
    std::os::unix::fs::symlink("..2026_a", root.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/web.yaml", root.join("web.yaml")).expect("symlink");
    let ferry = Ferry::start(&dir, &["--reload-debounce", "50ms"]);
    let v1 = ferry.snapshot()["version"].as_u64().expect("version");
    assert_eq!(tcp_hello(front).await.expect("a"), "a");

    // Swap ..data atomically, as the kubelet does.
    std::fs::create_dir(root.join("..2026_b")).expect("mkdir");
    std::fs::write(root.join("..2026_b/web.yaml"), listener_yaml("web", front, "TCP", &[b.addr], ""))
        .expect("w");
    std::os::unix::fs::symlink("..2026_b", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    ferry.wait_version(v1 + 1);
    assert_eq!(tcp_hello(front).await.expect("b"), "b");

    // SIGHUP picks up a change even without a directory event: rewrite the target in place.
    std::fs::write(root.join("..2026_b/web.yaml"), listener_yaml("web", front, "TCP", &[a.addr], ""))
        .expect("w");
    ferry.signal(libc::SIGHUP);
    ferry.wait_version(v1 + 2);
    assert_eq!(tcp_hello(front).await.expect("a again"), "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_to_a_removed_endpoint_is_closed_at_the_drain_deadline() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let front = local(free_port());
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let ferry = Ferry::start(&dir, &["--drain-timeout", "1s"]);
    let v1 = ferry.snapshot()["version"].as_u64().expect("version");
    let (mut to_a, _) = open(front).await;

    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[b.addr], ""));
    ferry.wait_version(v1 + 1);
    let removed_at = std::time::Instant::now();
    assert_echo(&mut to_a, b"within the deadline").await;

    // The connection ends once the drain deadline passes (not before).
    let mut rest = Vec::new();
    let _ =
        tokio::time::timeout(DEADLINE, to_a.read_to_end(&mut rest)).await.expect("closed by the deadline");
    let after = removed_at.elapsed();
    assert!(after >= Duration::from_millis(800), "closed too early: {after:?}");
    assert_eq!(tcp_hello(front).await.expect("new connections go to b"), "b");
}
