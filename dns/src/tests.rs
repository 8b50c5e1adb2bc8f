use std::time::Duration;

use ferry_model::Index;
use k8s_openapi::api::core::v1::Service;

use super::*;

async fn ask(socket: &UdpSocket, name: &[u8]) -> Vec<u8> {
    let mut m = vec![0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(name);
    m.extend_from_slice(&[0, 1, 0, 1]);
    socket.send(&m).await.expect("send");
    let mut buf = vec![0; 1500];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("answered in time")
        .expect("recv");
    buf.truncate(n);
    buf
}

const WEB: &[u8] = b"\x03web\x02ns\x03svc\x07cluster\x05local\x00";

#[tokio::test]
async fn servfail_until_the_first_snapshot_then_answers() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = server.local_addr().expect("addr");
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let shutdown = CancellationToken::new();
    let sockets = Sockets { udp: vec![server], tcp: Vec::new() };
    let feed = SnapshotFeed { snapshots: rx, synced: false };
    let task = tokio::spawn(serve(DnsConfig::default(), sockets, feed, shutdown.clone()));

    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.connect(addr).await.expect("connect");
    let r = ask(&client, WEB).await;
    assert_eq!(r[3] & 0x0F, 2, "SERVFAIL before the first snapshot");
    let r = ask(&client, b"\x07example\x03com\x00").await;
    assert_eq!(r[3] & 0x0F, 5, "outside the zone without upstream: REFUSED");

    let mut index = Index::default();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
    }))
    .expect("service");
    index.apply_service(&svc);
    tx.send_replace(index.build());
    // No signal tells when the zone task has swapped the zone in: poll, bounded.
    let mut answered = false;
    for _ in 0..200 {
        let r = ask(&client, WEB).await;
        if r[3] & 0x0F == 0 {
            assert_eq!(&r[6..8], &[0, 1], "one answer");
            assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 1]);
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered, "the first snapshot was never served");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("join").expect("ok");
}
