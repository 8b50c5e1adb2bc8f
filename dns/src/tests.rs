use std::time::Duration;

use ferry_model::Index;
use k8s_openapi::api::core::v1::Service;
use tokio::net::UdpSocket;

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
    let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
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

mod fuzzing {
    use std::sync::Arc;

    use ferry_model::{DnsEndpoint, DnsKind, DnsPort, DnsService, Protocol, ServiceKey, Snapshot};
    use hickory_resolver::proto::op::Message;
    use proptest::prelude::*;

    use crate::fuzzing::Harness;

    fn snapshot() -> Snapshot {
        let port = DnsPort { name: "http".into(), protocol: Protocol::Tcp, port: 80 };
        let mut s = Snapshot::default();
        let web = DnsService {
            kind: DnsKind::ClusterIp(vec!["10.96.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")]),
            ports: vec![port.clone()],
            endpoints: vec![DnsEndpoint {
                ip: "10.1.0.1".parse().expect("ip"),
                hostname: Some("w-0".into()),
                ready: true,
                ports: Arc::from(vec![port]),
            }],
        };
        let ext = DnsService {
            kind: DnsKind::ExternalName("web.ns.svc.cluster.local".into()),
            ports: Vec::new(),
            endpoints: Vec::new(),
        };
        s.dns.insert(ServiceKey::new("ns", "web"), Arc::new(web));
        s.dns.insert(ServiceKey::new("ns", "ext"), Arc::new(ext));
        s
    }

    /// A query for one of a few interesting names, then arbitrary bytes mutated into it.
    fn query(name: usize, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let names: [&[u8]; 5] = [
            b"\x03web\x02ns\x03svc\x07cluster\x05local\x00",
            b"\x03EXT\x02ns\x03svc\x07cluster\x05local\x00",
            b"\x04_http\x04_tcp\x03web\x02ns\x03svc\x07cluster\x05local\x00",
            b"\x011\x010\x0296\x0210\x07in-addr\x04arpa\x00",
            b"\x0810-1-0-1\x02ns\x03pod\x07cluster\x05local\x00",
        ];
        let mut m = vec![0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())];
        m.extend_from_slice(names[name % names.len()]);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    proptest! {
        /// Every response to a well-formed query is a valid DNS message (hickory parses it) with
        /// the query's ID; the harness itself checks the size limit.
        #[test]
        fn responses_are_valid_dns(name in 0usize..5, qtype in prop_oneof![Just(1u16), Just(28), Just(33), Just(12), Just(5), Just(255), any::<u16>()], edns in proptest::option::of(any::<u16>())) {
            let mut h = Harness::new(&snapshot());
            let m = query(name, qtype, edns);
            let r = h.answer(&m).expect("answered").to_vec();
            let parsed = Message::from_vec(&r).expect("valid DNS");
            prop_assert_eq!(parsed.metadata.id, 0xABCD);
        }

        /// Mutated queries never panic, and never produce more than the UDP limit.
        #[test]
        fn mutated_queries_never_panic(name in 0usize..5, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8), cut in any::<usize>()) {
            let mut h = Harness::new(&snapshot());
            let mut m = query(name, 1, Some(1232));
            for (i, b) in flips {
                let n = m.len();
                m[i % n] = b;
            }
            let n = m.len();
            m.truncate(cut % (n + 1));
            let _ = h.answer(&m);
        }
    }
}
