//! The admin server's endpoints.

use std::net::SocketAddr;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_report_health_metrics_and_the_live_snapshot() {
    let a = TcpBackend::start("a").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = ConfigDir::new();
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[a.addr], ""));
    let ferry = Ferry::start(&dir, &[]);

    assert_eq!(ferry.get("/livez").0, 200);
    assert_eq!(ferry.get("/readyz").0, 200);
    let (status, body) = ferry.get("/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(ferry.get("/nope").0, 404);

    tcp_hello(front).await.expect("traffic");
    let (_, metrics) = ferry.get("/metrics");
    for name in [
        "ferry_listener_connections_total",
        "ferry_listener_bytes_total",
        "ferry_snapshot_version",
        "ferry_snapshot_build_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    assert!(ferry.metric("ferry_snapshot_version", &[]) >= 1.0);

    let snap = ferry.snapshot();
    let text = snap.to_string();
    assert!(text.contains(&front.to_string()) && text.contains(&a.addr.to_string()), "{text}");
}
