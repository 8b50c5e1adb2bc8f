//! UDP through `ferry lb`: spreading over flows and large datagrams.

use std::{collections::HashSet, net::SocketAddr};

use tokio::net::UdpSocket;

use crate::harness::*;

async fn roundtrip(front: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    let mut buf = vec![0u8; 65_536];
    // UDP may drop; retry a bounded number of times.
    for _ in 0..5 {
        sock.send_to(payload, front).await.expect("send");
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), sock.recv_from(&mut buf)).await
        {
            return (buf[..n].to_vec(), from);
        }
    }
    panic!("no UDP reply from {front}");
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_flows_spread_and_replies_come_from_the_frontend() {
    let a = UdpBackend::start("a").await;
    let b = UdpBackend::start("b").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let dir = ConfigDir::new();
    dir.write(
        "dns.yaml",
        &listener_yaml("dns", front, "UDP", &[a.addr, b.addr], "  balancing: RoundRobin\n"),
    );
    let ferry = Ferry::start(&dir, &[]);

    let mut names = HashSet::new();
    for i in 0..10 {
        let (reply, from) = roundtrip(front, format!("q{i}").as_bytes()).await;
        assert_eq!(from, front, "reply must come from the frontend address");
        let reply = String::from_utf8(reply).expect("utf8");
        let (name, echoed) = reply.split_once(':').expect("name:payload");
        assert_eq!(echoed, format!("q{i}"));
        names.insert(name.to_owned());
    }
    assert_eq!(names.len(), 2, "ten flows must reach both backends: {names:?}");
    assert!(ferry.metric("ferry_listener_connections_total", &["listener=\"dns\""]) >= 10.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_65000_byte_datagram_passes_intact() {
    let a = UdpBackend::start("a").await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let dir = ConfigDir::new();
    dir.write("big.yaml", &listener_yaml("big", front, "UDP", &[a.addr], ""));
    let _ferry = Ferry::start(&dir, &[]);

    let payload: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    let (reply, _) = roundtrip(front, &payload).await;
    assert_eq!(reply.len(), 65_002, "a:<65000 bytes>");
    assert_eq!(&reply[..2], b"a:");
    assert!(reply[2..] == payload[..], "payload corrupted");
}
