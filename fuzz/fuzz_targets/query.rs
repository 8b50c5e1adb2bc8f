//! Fuzzes Ferry's DNS query path: parse, answer from a cluster zone, write the response.
//! The harness asserts that no response exceeds the UDP limit it was written for.
//!
//! Run: `cargo +nightly fuzz run query -- -max_total_time=60` (see the README's DNS section).

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use ferry_dns::fuzzing::Harness;
use ferry_model::{DnsEndpoint, DnsKind, DnsPort, DnsService, Protocol, ServiceKey, Snapshot};
use libfuzzer_sys::fuzz_target;

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let port = DnsPort { name: "http".into(), protocol: Protocol::Tcp, port: 80 };
        let mut s = Snapshot::default();
        let ip = |s: &str| s.parse().expect("ip");
        let web = DnsService {
            kind: DnsKind::ClusterIp(vec![ip("10.96.0.1"), ip("fd00::1")]),
            ports: vec![port.clone()],
            endpoints: (1..=40)
                .map(|i| DnsEndpoint {
                    ip: ip(&format!("10.1.0.{i}")),
                    hostname: (i % 2 == 0).then(|| format!("w-{i}").into()),
                    ready: i % 5 != 0,
                    ports: Arc::from(vec![port.clone()]),
                })
                .collect(),
        };
        let headless = DnsService { kind: DnsKind::Headless, ..web.clone() };
        let ext = DnsService {
            kind: DnsKind::ExternalName("web.ns.svc.cluster.local".into()),
            ports: Vec::new(),
            endpoints: Vec::new(),
        };
        let out = DnsService { kind: DnsKind::ExternalName("www.example.com".into()), ..ext.clone() };
        s.dns.insert(ServiceKey::new("ns", "web"), Arc::new(web));
        s.dns.insert(ServiceKey::new("ns", "db"), Arc::new(headless));
        s.dns.insert(ServiceKey::new("ns", "ext"), Arc::new(ext));
        s.dns.insert(ServiceKey::new("ns", "out"), Arc::new(out));
        Mutex::new(Harness::new(&s))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut h = harness().lock().expect("not poisoned");
    let _ = h.answer(data);
});
