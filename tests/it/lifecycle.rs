//! Process lifecycle: SIGTERM drains open connections and exits 0; startup errors exit non-zero.

use std::{net::SocketAddr, process::Command, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_drains_open_connections_and_exits_zero() {
    let a = TcpBackend::start("a").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let mut ferry = Ferry::start(&dir, &[]);

    let mut conn = tokio::net::TcpStream::connect(front).await.expect("connect");
    let mut greeting = [0u8; 2];
    conn.read_exact(&mut greeting).await.expect("greeting");

    let cursor = ferry.log_len();
    ferry.signal(libc::SIGTERM);
    ferry
        .wait_log_after(cursor, DEADLINE, |l| msg(l).starts_with("shutting down"))
        .expect("shutdown is logged");
    // Readiness fails and the listener closes while the open connection keeps working.
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(front).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "listener still accepts after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.write_all(b"during drain").await.expect("write during drain");
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).await.expect("echo during drain");
    assert_eq!(&buf, b"during drain");
    assert_eq!(ferry.wait_exit(Duration::from_millis(300)), None, "must wait for the open connection");

    drop(conn);
    assert_eq!(ferry.wait_exit(DEADLINE), Some(0), "exit code after drain");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_stuck_connection_exits_zero_after_the_drain_deadline() {
    let a = TcpBackend::start("a").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let mut ferry = Ferry::start(&dir, &["--drain-timeout", "1s"]);
    let mut conn = tokio::net::TcpStream::connect(front).await.expect("connect");
    let mut greeting = [0u8; 2];
    conn.read_exact(&mut greeting).await.expect("greeting");

    let start = std::time::Instant::now();
    ferry.signal(libc::SIGTERM);
    assert_eq!(ferry.wait_exit(DEADLINE), Some(0));
    assert!(start.elapsed() >= Duration::from_millis(900), "exited before the drain deadline");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut rest)).await.expect("closed after drain");
}

#[test]
fn a_broken_config_at_startup_exits_non_zero_naming_the_file() {
    let dir = ConfigDir::new();
    dir.write("bad.yaml", "apiVersion: ferry.ethercluster.io/v1alpha1\nkind: Listener\nmetadata: {name: x}\nspec:\n  address: nowhere\n  backends: []\n");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["lb", "--admin-address", "127.0.0.1:0", "--config"])
        .arg(dir.path())
        .output()
        .expect("run ferry");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml") && stderr.contains("spec.address"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn handoff_socket_moves_listeners_to_a_new_process_with_a_new_config() {
    let (a, b) = (TcpBackend::start("a").await, TcpBackend::start("b").await);
    let (web, gone) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let run = ConfigDir::new();
    let socket = run.path().join("handoff.sock");
    let handoff = ["--handoff-socket", socket.to_str().expect("utf-8 path")];

    // Each process's own admin socket: the exec readiness probe of the DaemonSet.
    let (old_admin, new_admin) = (run.path().join("old-admin.sock"), run.path().join("new-admin.sock"));
    let probe = |socket: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["probe", "--socket"])
            .arg(socket)
            .output()
            .expect("run ferry probe");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };

    let old_dir = ConfigDir::new();
    old_dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            listener_yaml("web", web, "TCP", &[a.addr], ""),
            listener_yaml("gone", gone, "TCP", &[a.addr], "")
        ),
    );
    let mut old = Ferry::start(
        &old_dir,
        &[&handoff[..], &["--admin-socket", old_admin.to_str().expect("utf-8")]].concat(),
    );
    assert_eq!(tcp_hello(web).await.expect("old serves web"), "a");
    let (ready, answer) = probe(&old_admin);
    assert!(ready, "the old process is ready: {answer}");
    let mut conn = tokio::net::TcpStream::connect(gone).await.expect("connect");
    let mut greeting = [0u8; 2];
    conn.read_exact(&mut greeting).await.expect("greeting");

    // The new configuration sends web to b and has no `gone` listener.
    let new_dir = ConfigDir::new();
    new_dir.write("web.yaml", &listener_yaml("web", web, "TCP", &[b.addr], ""));
    let new = Ferry::start(
        &new_dir,
        &[&handoff[..], &["--admin-socket", new_admin.to_str().expect("utf-8")]].concat(),
    );
    let took = new
        .wait_log(DEADLINE, |l| msg(l) == "taking over from the running process")
        .expect("the new process took over");
    assert_eq!(took["pid"].as_u64(), Some(u64::from(old.pid())));
    new.wait_log(DEADLINE, |l| msg(l) == "takeover complete: the predecessor stops accepting")
        .expect("takeover complete");
    // Both share the admin port now, but each pod's probe reaches its own process.
    let (ready, answer) = probe(&old_admin);
    assert!(!ready && answer.contains("503"), "the old process is draining: {answer}");
    let (ready, answer) = probe(&new_admin);
    assert!(ready && answer.starts_with("200"), "the new process is ready: {answer}");

    // The old process drains its connection on `gone`, whose listener nobody took: it closes.
    conn.write_all(b"drain").await.expect("write after the handoff");
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await.expect("echo after the handoff");
    assert_eq!(&buf, b"drain");
    drop(conn);
    old.wait_log(DEADLINE, |l| msg(l) == "drained after the handoff; waiting for SIGTERM to exit")
        .expect("drained");
    for _ in 0..20 {
        assert_eq!(tcp_hello(web).await.expect("web"), "b", "only the new process accepts on web");
    }
    let refused = tokio::net::TcpStream::connect(gone).await.expect_err("gone is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(old.wait_exit(Duration::from_millis(200)), None, "waits for SIGTERM");
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit(DEADLINE), Some(0));
    assert_eq!(tcp_hello(web).await.expect("web after the old process exited"), "b");
    let (status, _) = new.get("/readyz");
    assert_eq!(status, 200);
}

#[test]
fn probe_reads_the_answer_and_fails_naming_the_socket_when_nothing_answers_in_time() {
    let dir = ConfigDir::new();
    let probe = |socket: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["probe", "--timeout", "300ms", "--socket"])
            .arg(socket)
            .output()
            .expect("run ferry probe");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An answer with a chunked body (any HTTP/1.1 server may send one): the body, not its framing.
    let chunked = dir.path().join("chunked.sock");
    let listener = std::os::unix::net::UnixListener::bind(&chunked).expect("bind");
    let server = std::thread::spawn(move || {
        use std::io::{BufRead as _, Write as _};
        for answer in [
            "200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n",
            "503 Service Unavailable\r\nContent-Length: 10\r\n\r\nnot ready\n",
        ] {
            let (conn, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(&conn);
            let mut line = String::new();
            while reader.read_line(&mut line).expect("request") > 2 {
                line.clear();
            }
            (&conn).write_all(format!("HTTP/1.1 {answer}").as_bytes()).expect("answer");
        }
    });
    let (ready, out, err) = probe(&chunked);
    assert!(ready && out == "200 ok\n", "{out:?} {err}");
    let (ready, _, err) = probe(&chunked);
    assert!(!ready && err.contains("chunked.sock /readyz: 503 not ready"), "{err}");
    server.join().expect("server");

    let missing = dir.path().join("missing.sock");
    let (ready, _, err) = probe(&missing);
    assert!(!ready && err.contains("missing.sock /readyz: connecting"), "{err}");

    // A socket whose process is stuck: the connection is queued, the request never answered.
    let stuck = dir.path().join("stuck.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&stuck).expect("bind");
    let (ready, _, err) = probe(&stuck);
    assert!(!ready && err.contains("stuck.sock /readyz: no answer within 300ms"), "{err}");
}
