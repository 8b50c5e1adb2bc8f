//! Active health checks through the binary: an unhealthy endpoint stops receiving traffic and
//! comes back when it recovers; the state is visible in `ferry_endpoint_healthy`.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use crate::harness::*;

fn wait_metric(ferry: &Ferry, name: &str, labels: &[&str], want: f64) {
    let start = std::time::Instant::now();
    loop {
        let got = ferry.metric(name, labels);
        if got == want {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{name}{labels:?} stayed {got}, want {want}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_health_check_takes_a_failing_endpoint_out_and_back_in() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = ConfigDir::new();
    dir.write(
        "web.yaml",
        &listener_yaml(
            "web",
            front,
            "TCP",
            &[a.addr, b.addr],
            "  healthCheck:\n    http: {path: /health, expectedStatuses: [200]}\n    intervalSeconds: 0.05\n    \
             timeoutSeconds: 0.5\n    healthyThreshold: 2\n    unhealthyThreshold: 2\n",
        ),
    );
    let ferry = Ferry::start(&dir, &[]);
    let a_label = format!("endpoint=\"{}\"", a.addr);
    wait_metric(&ferry, "ferry_endpoint_healthy", &["listener=\"web\"", &a_label], 1.0);

    a.set_status(503);
    wait_metric(&ferry, "ferry_endpoint_healthy", &["listener=\"web\"", &a_label], 0.0);
    for _ in 0..20 {
        assert_eq!(http_body(front).await.expect("request"), "b", "unhealthy a must get no traffic");
    }

    a.set_status(200);
    wait_metric(&ferry, "ferry_endpoint_healthy", &["listener=\"web\"", &a_label], 1.0);
    let mut seen = HashSet::new();
    for _ in 0..10 {
        seen.insert(http_body(front).await.expect("request"));
    }
    assert_eq!(seen.len(), 2, "a must be back in rotation: {seen:?}");
}
