//! `ferry dns` end to end, with real clients: dig (UDP) and kdig (TCP) from Debian, and
//! hickory-resolver, against the running binary on loopback.
//!
//! The record and rcode rows are those of `/work/shared/reference/ingress-dns.md` §1.2 and §1.4;
//! each row is asked over UDP with dig and over TCP with kdig, and both must agree exactly.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use crate::harness::{ConfigDir, DEADLINE, Ferry, free_udp_port, msg};

const ZONE_YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10", "fd00::10"]
  ports: [{name: http, port: 80, protocol: TCP}, {port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["10.1.1.1"]
---
apiVersion: v1
kind: Service
metadata: {name: v4only, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: ["10.1.0.1"]
  hostname: db-0
- addresses: ["10.1.0.2"]
- addresses: ["10.1.0.3"]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nobody-1, namespace: default, labels: {kubernetes.io/service-name: nobody}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: ["10.1.2.1"]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: pnr, namespace: default}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pnr-1, namespace: default, labels: {kubernetes.io/service-name: pnr}}
addressType: IPv4
endpoints:
- addresses: ["10.1.3.1"]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.cluster.local}
---
apiVersion: v1
kind: Service
metadata: {name: extip, namespace: default}
spec: {type: ExternalName, externalName: 1.2.3.4}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: other}
spec:
  clusterIP: 10.96.1.1
  ports: [{port: 443}]
"#;

/// One parsed response.
#[derive(Debug, Default, PartialEq)]
struct Reply {
    status: String,
    flags: Vec<String>,
    /// `(owner, type, rdata)` in order.
    answers: Vec<(String, String, String)>,
    authority: Vec<(String, String, String)>,
    additional: Vec<(String, String, String)>,
}

impl Reply {
    fn has_soa(&self) -> bool {
        self.authority.iter().any(|(_, t, _)| t == "SOA")
    }

    fn rdata_sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self.answers.iter().map(|(_, _, r)| r.clone()).collect();
        v.sort();
        v
    }
}

/// Parses dig's or kdig's default output.
fn parse(out: &str) -> Reply {
    let mut r = Reply::default();
    let mut section = "";
    for line in out.lines() {
        if let Some(i) = line.find("status: ") {
            let rest = &line[i + 8..];
            r.status = rest.split([',', ';']).next().unwrap_or_default().trim().to_owned();
        }
        if let Some(i) = line.to_ascii_lowercase().find("flags: ") {
            let rest = &line[i + 7..];
            r.flags =
                rest.split(';').next().unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
            continue;
        }
        if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
            continue;
        }
        if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
            continue;
        }
        if line.starts_with(';') || line.trim().is_empty() {
            if line.trim().is_empty() {
                section = "";
            }
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        let rec = (fields[0].to_owned(), fields[3].to_owned(), fields[4..].join(" "));
        match section {
            "answer" => r.answers.push(rec),
            "authority" => r.authority.push(rec),
            "additional" => r.additional.push(rec),
            _ => {}
        }
    }
    r
}

fn dig(port: u16, args: &[&str]) -> Reply {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=3", "+norec"])
        .args(args)
        .output()
        .expect("run dig (apt install dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse(&text);
    assert!(!r.status.is_empty(), "dig {args:?} gave no response:\n{text}");
    r
}

fn kdig_tcp(port: u16, args: &[&str]) -> Reply {
    let out = Command::new("kdig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tcp", "+norec", "+retry=0", "+time=3"])
        .args(args)
        .output()
        .expect("run kdig (apt install knot-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse(&text);
    assert!(!r.status.is_empty(), "kdig {args:?} gave no response:\n{text}");
    r
}

/// Starts `ferry dns --config DIR` on a port it picks itself; returns it with the port.
fn start_dns(dir: &ConfigDir, extra: &[&str]) -> (Ferry, u16) {
    let config = dir.path().to_str().expect("utf-8").to_owned();
    start_dns_from(&["--config", &config], extra)
}

/// Starts `ferry dns` with `source` (`--config DIR` or `--kubeconfig FILE`), on a port it picks
/// itself unless `extra` has `--listen`.
fn start_dns_from(source: &[&str], extra: &[&str]) -> (Ferry, u16) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.arg("dns").args(source);
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--admin-address", "127.0.0.1:0", "--log-format", "json"])
        .args(["--reload-debounce", "50ms", "--worker-threads", "2"])
        .args(extra);
    let ferry = Ferry::spawn_command(cmd, None);
    let line = ferry.wait_log(DEADLINE, |l| msg(l) == "dns listening").expect("ferry dns never bound");
    let port = line["address"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
        .expect("address in the log line");
    ferry
        .wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving")
        .expect("ferry dns never became ready");
    (ferry, port)
}

const S: &str = ".default.svc.cluster.local.";

fn n(short: &str) -> String {
    format!("{short}{S}")
}

/// Every row: (name, type, rcode, sorted rdata, SOA in authority).
fn rows() -> Vec<(String, &'static str, &'static str, Vec<String>, bool)> {
    let v = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let web = n("web");
    vec![
        // §2.2 schema version.
        ("dns-version.cluster.local.".into(), "TXT", "NOERROR", v(&["\"1.1.0\""]), false),
        // §2.3.1 ClusterIP, dual-stack from clusterIPs.
        (n("web"), "A", "NOERROR", v(&["10.96.0.10"]), false),
        (n("web"), "AAAA", "NOERROR", v(&["fd00::10"]), false),
        // IPv4-only Service asked AAAA: NODATA. ClusterIP with 0 endpoints still answers.
        (n("v4only"), "AAAA", "NOERROR", v(&[]), true),
        (n("v4only"), "A", "NOERROR", v(&["10.96.0.11"]), false),
        // §2.3.2 SRV on named ports; the bare name lists every port.
        (n("_http._tcp.web"), "SRV", "NOERROR", vec![format!("0 100 80 {web}")], false),
        (n("web"), "SRV", "NOERROR", vec![format!("0 50 53 {web}"), format!("0 50 80 {web}")], false),
        // §2.3.3 PTR for ClusterIPs (IPv6 as 32 nibbles).
        ("10.0.96.10.in-addr.arpa.".into(), "PTR", "NOERROR", vec![web.clone()], false),
        (
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.".into(),
            "PTR",
            "NOERROR",
            vec![web.clone()],
            false,
        ),
        // Endpoints of a ClusterIP Service by dashed IP (CoreDNS).
        (n("10-1-1-1.web"), "A", "NOERROR", v(&["10.1.1.1"]), false),
        // §2.4.1 headless: ready endpoints only; hostname records.
        (n("db"), "A", "NOERROR", v(&["10.1.0.1", "10.1.0.2"]), false),
        (n("db-0.db"), "A", "NOERROR", v(&["10.1.0.1"]), false),
        (n("10-1-0-2.db"), "A", "NOERROR", v(&["10.1.0.2"]), false),
        (n("10-1-0-3.db"), "A", "NXDOMAIN", v(&[]), true),
        // §2.4.2 headless SRV: ready endpoints x named ports.
        (
            n("_pg._tcp.db"),
            "SRV",
            "NOERROR",
            vec![format!("0 50 5432 {}", n("10-1-0-2.db")), format!("0 50 5432 {}", n("db-0.db"))],
            false,
        ),
        // §2.4.3 PTR of an endpoint.
        ("1.0.1.10.in-addr.arpa.".into(), "PTR", "NOERROR", vec![n("db-0.db")], false),
        // Headless without ready endpoints: NXDOMAIN (spec); publishNotReadyAddresses: answered.
        (n("nobody"), "A", "NXDOMAIN", v(&[]), true),
        (n("pnr"), "A", "NOERROR", v(&["10.1.3.1"]), false),
        // §2.5 ExternalName: CNAME first, target chased inside the zone; IP literal: no record.
        (n("ext"), "A", "NOERROR", vec![web.clone(), "10.96.0.10".into()], false),
        (n("ext"), "CNAME", "NOERROR", vec![web.clone()], false),
        (n("ext"), "SRV", "NOERROR", v(&[]), true),
        (n("extip"), "A", "NXDOMAIN", v(&[]), true),
        // §1.3 pod records.
        ("10-1-2-3.default.pod.cluster.local.".into(), "A", "NOERROR", v(&["10.1.2.3"]), false),
        ("10-1-2-3.default.pod.cluster.local.".into(), "AAAA", "NOERROR", v(&[]), true),
        // §1.4 negative answers.
        ("cluster.local.".into(), "A", "NOERROR", v(&[]), true),
        ("svc.cluster.local.".into(), "A", "NOERROR", v(&[]), true),
        ("pod.cluster.local.".into(), "A", "NOERROR", v(&[]), true),
        ("default.svc.cluster.local.".into(), "A", "NOERROR", v(&[]), true),
        ("other.svc.cluster.local.".into(), "A", "NOERROR", v(&[]), true),
        ("missing.svc.cluster.local.".into(), "A", "NXDOMAIN", v(&[]), true),
        ("x.bogus.cluster.local.".into(), "A", "NXDOMAIN", v(&[]), true),
        (n("a.b.c.web"), "A", "NXDOMAIN", v(&[]), true),
        (n("web"), "TXT", "NOERROR", v(&[]), true),
        (n("web"), "MX", "NOERROR", v(&[]), true),
        (n("bogus.db"), "A", "NXDOMAIN", v(&[]), true),
        (n("_tcp.web"), "A", "NXDOMAIN", v(&[]), true),
        ("9.9.9.10.in-addr.arpa.".into(), "PTR", "NXDOMAIN", v(&[]), false),
    ]
}

#[test]
fn every_record_and_rcode_row_over_udp_and_tcp() {
    let dir = ConfigDir::new();
    dir.write("zone.yaml", ZONE_YAML);
    let (ferry, port) = start_dns(&dir, &["--no-forward"]);
    for (name, qtype, rcode, mut rdata, soa) in rows() {
        rdata.sort();
        let udp = dig(port, &[&name, qtype]);
        let tcp = kdig_tcp(port, &[&name, qtype]);
        for (client, r) in [("dig/udp", &udp), ("kdig/tcp", &tcp)] {
            assert_eq!(r.status, rcode, "{client} {name} {qtype}: {r:?}");
            assert_eq!(r.rdata_sorted(), rdata, "{client} {name} {qtype}");
            assert_eq!(r.has_soa(), soa, "{client} {name} {qtype}: SOA in authority? {r:?}");
            if name.ends_with("cluster.local.") {
                assert!(r.flags.iter().any(|f| f == "aa"), "{client} {name} {qtype}: authoritative");
            }
        }
        if name == n("ext") && qtype == "A" {
            assert_eq!(udp.answers[0].1, "CNAME", "CNAME comes first: {udp:?}");
        }
    }
    // SRV answers carry their targets' addresses in the additional section (dig and kdig).
    for r in [dig(port, &[&n("_http._tcp.web"), "SRV"]), kdig_tcp(port, &[&n("_http._tcp.web"), "SRV"])] {
        let mut extra: Vec<String> = r.additional.iter().map(|(o, t, d)| format!("{o} {t} {d}")).collect();
        extra.sort();
        assert_eq!(extra, [format!("{} A 10.96.0.10", n("web")), format!("{} AAAA fd00::10", n("web"))]);
    }
    // The question's case is preserved.
    let r = dig(port, &["WeB.DeFault.svc.Cluster.Local", "A"]);
    assert_eq!(r.answers[0].0, "WeB.DeFault.svc.Cluster.Local.");
    assert_eq!(r.rdata_sorted(), vec!["10.96.0.10".to_owned()]);
    // SOA at the apex, and the SOA's minimum is the TTL.
    let r = dig(port, &["cluster.local", "SOA"]);
    assert_eq!(r.answers.len(), 1);
    assert!(r.answers[0].2.ends_with(" 30"), "{r:?}");
    // Zone transfers are refused.
    let r = raw_udp(port, &query(1, 0, 1, b"\x07cluster\x05local\x00", 252, 1), DEADLINE).expect("axfr");
    assert_eq!(r[3] & 0x0F, 5, "AXFR: REFUSED");
    // Names outside the zone with forwarding off.
    assert_eq!(dig(port, &["example.com", "A"]).status, "REFUSED");
    assert!(ferry.metric("ferry_dns_queries_total", &["qtype=\"A\"", "rcode=\"NOERROR\""]) >= 10.0);
    assert!(ferry.metric("ferry_dns_queries_total", &["qtype=\"A\"", "rcode=\"NXDOMAIN\""]) >= 4.0);
    assert!(ferry.metric("ferry_dns_request_duration_seconds_count", &[]) >= 50.0);
}

#[test]
fn a_and_aaaa_order_is_shuffled() {
    let dir = ConfigDir::new();
    dir.write("zone.yaml", &headless_yaml("many", 8));
    let (_ferry, port) = start_dns(&dir, &["--no-forward"]);
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = dig(port, &[&n("many"), "A"]);
        assert_eq!(r.answers.len(), 8);
        firsts.insert(r.answers[0].2.clone());
    }
    assert!(firsts.len() > 1, "40 answers all started with the same address: {firsts:?}");
}

fn headless_yaml(name: &str, endpoints: usize) -> String {
    let eps: Vec<String> =
        (0..endpoints).map(|i| format!("- addresses: [\"10.2.{}.{}\"]", i / 250, i % 250 + 1)).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: None\n  \
         ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: \
         {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:\n{}\n",
        eps.join("\n")
    )
}

#[test]
fn truncation_tcp_fallback_and_edns_buffer_size() {
    let dir = ConfigDir::new();
    dir.write("big.yaml", &headless_yaml("big", 100));
    dir.write("mid.yaml", &headless_yaml("mid", 40));
    let (_ferry, port) = start_dns(&dir, &["--no-forward"]);
    // 100 A records (about 1.7 kB) do not fit any UDP limit: TC set, no answers.
    let r = dig(port, &[&n("big"), "A", "+ignore", "+bufsize=4096"]);
    assert!(r.flags.iter().any(|f| f == "tc"), "{r:?}");
    assert!(r.answers.is_empty());
    // dig retries over TCP after TC and gets all of them.
    let r = dig(port, &[&n("big"), "A"]);
    assert!(!r.flags.iter().any(|f| f == "tc"));
    assert_eq!(r.answers.len(), 100);
    // 40 records (about 700 bytes): truncated at 512 without EDNS, whole with EDNS 1232.
    let r = dig(port, &[&n("mid"), "A", "+ignore", "+noedns"]);
    assert!(r.flags.iter().any(|f| f == "tc"), "{r:?}");
    let r = dig(port, &[&n("mid"), "A", "+ignore", "+bufsize=1232"]);
    assert!(!r.flags.iter().any(|f| f == "tc"), "{r:?}");
    assert_eq!(r.answers.len(), 40);
    // An EDNS size below 512 is treated as 512.
    let r = dig(port, &[&n("mid"), "A", "+ignore", "+bufsize=100"]);
    assert!(r.flags.iter().any(|f| f == "tc"), "{r:?}");
}

#[test]
fn snapshot_change_is_visible_in_the_next_answer() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n");
    let (ferry, port) = start_dns(&dir, &["--no-forward"]);
    assert_eq!(dig(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.10".to_owned()]);
    assert_eq!(dig(port, &[&n("new"), "A"]).status, "NXDOMAIN");
    let version = ferry.snapshot()["version"].as_u64().expect("version");
    dir.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{port: 80}]\n");
    // The zone follows the published Snapshot: wait for the zone-version gauge, then ask once.
    let start = Instant::now();
    while ferry.metric("ferry_dns_zone_version", &[]) < (version + 1) as f64 {
        assert!(start.elapsed() < DEADLINE, "zone never rebuilt");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dig(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.20".to_owned()]);
    assert_eq!(dig(port, &[&n("new"), "A"]).rdata_sorted(), vec!["10.96.0.30".to_owned()]);
}

#[test]
fn forwarding_cache_negative_answers_chase_and_failover() {
    // The "upstream" is a second ferry serving example.org.
    let up_dir = ConfigDir::new();
    up_dir.write(
        "up.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: www, namespace: default}\nspec:\n  clusterIP: 10.96.9.9\n  ports: [{port: 80}]\n",
    );
    let (up, up_port) = start_dns(&up_dir, &["--no-forward", "--cluster-domain", "example.org"]);
    let dir = ConfigDir::new();
    dir.write(
        "ext.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: out, namespace: default}\nspec: {type: ExternalName, externalName: www.default.svc.example.org}\n",
    );
    // A dead upstream first: the resolver fails over to the live one.
    let dead = free_udp_port();
    let upstreams = format!("127.0.0.1:{dead},127.0.0.1:{up_port}");
    let (ferry, port) = start_dns(&dir, &["--upstream", &upstreams]);
    let www = "www.default.svc.example.org.";
    for _ in 0..3 {
        let r = dig(port, &[www, "A", "+rec"]);
        assert_eq!(r.status, "NOERROR", "{r:?}");
        assert_eq!(r.rdata_sorted(), vec!["10.96.9.9".to_owned()]);
        assert!(!r.flags.iter().any(|f| f == "aa"), "forwarded answers are not authoritative");
    }
    assert!(
        ferry.metric("hickory_resolver_cache_hit_total", &[]) >= 2.0,
        "repeated queries come from the cache"
    );
    // Negative answers keep their rcode and SOA.
    let r = dig(port, &["nope.svc.example.org.", "A", "+rec"]);
    assert_eq!(r.status, "NXDOMAIN");
    assert!(r.has_soa(), "{r:?}");
    let r = kdig_tcp(port, &[www, "TXT"]);
    assert_eq!(r.status, "NOERROR");
    assert!(r.answers.is_empty() && r.has_soa(), "{r:?}");
    // Negative answers are cached: a name the upstream then creates stays NXDOMAIN through the
    // forwarder (for the SOA minimum, 30 s) while the upstream itself already answers it.
    let late = "late.default.svc.example.org.";
    assert_eq!(dig(port, &[late, "A", "+rec"]).status, "NXDOMAIN");
    let up_version = up.metric("ferry_dns_zone_version", &[]);
    up_dir.write(
        "late.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: default}\nspec:\n  clusterIP: 10.96.9.10\n  ports: [{port: 80}]\n",
    );
    let start = Instant::now();
    while up.metric("ferry_dns_zone_version", &[]) <= up_version {
        assert!(start.elapsed() < DEADLINE, "upstream zone never rebuilt");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dig(up_port, &[late, "A"]).status, "NOERROR");
    assert_eq!(dig(port, &[late, "A", "+rec"]).status, "NXDOMAIN", "served from the negative cache");
    // ExternalName pointing outside the zone: CNAME, then the upstream's A.
    let r = dig(port, &[&n("out"), "A"]);
    assert_eq!(r.status, "NOERROR");
    assert_eq!(r.answers.len(), 2, "{r:?}");
    assert_eq!(r.answers[0].1, "CNAME");
    assert_eq!(r.answers[0].2, www);
    assert_eq!(r.answers[1], (www.to_owned(), "A".to_owned(), "10.96.9.9".to_owned()));
}

#[test]
fn unreachable_upstream_is_servfail_and_counted() {
    let dir = ConfigDir::new();
    dir.write("empty.yaml", "");
    let dead = free_udp_port();
    let (ferry, port) = start_dns(&dir, &["--upstream", &format!("127.0.0.1:{dead}")]);
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=10", "example.com", "A"])
        .output()
        .expect("dig");
    let r = parse(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(r.status, "SERVFAIL", "{r:?}");
    assert!(ferry.metric("ferry_dns_upstream_errors_total", &[]) >= 1.0);
    // The cluster zone is unaffected.
    assert_eq!(dig(port, &["cluster.local", "SOA"]).status, "NOERROR");
}

/// Sends one raw datagram; returns the response, if any within `wait`.
fn raw_udp(port: u16, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(wait)).expect("timeout");
    sock.send_to(msg, SocketAddr::from(([127, 0, 0, 1], port))).expect("send");
    let mut buf = [0u8; 2048];
    sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn query(id: u16, flags: u16, qd: u16, name: &[u8], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&qd.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&qclass.to_be_bytes());
    m
}

const WEB: &[u8] = b"\x03web\x07default\x03svc\x07cluster\x05local\x00";

#[test]
fn bad_input_gets_formerr_notimp_or_is_dropped() {
    let dir = ConfigDir::new();
    dir.write("zone.yaml", ZONE_YAML);
    let (ferry, port) = start_dns(&dir, &["--no-forward"]);
    let short = Duration::from_millis(300);
    let rcode = |r: &[u8]| r[3] & 0x0F;
    // Too short for a header, and responses: dropped.
    assert!(raw_udp(port, &[1, 2, 3], short).is_none());
    assert!(raw_udp(port, &query(7, 0x8000, 1, WEB, 1, 1), short).is_none());
    // Oversized datagram: dropped.
    assert!(raw_udp(port, &vec![0u8; 6000], short).is_none());
    // Two questions: FORMERR. Opcode 2 (STATUS): NOTIMP. Class CHAOS: NOTIMP.
    let r = raw_udp(port, &query(8, 0, 2, WEB, 1, 1), DEADLINE).expect("formerr");
    assert_eq!((r[0], r[1], rcode(&r)), (0, 8, 1));
    let r = raw_udp(port, &query(9, 2 << 11, 1, WEB, 1, 1), DEADLINE).expect("notimp");
    assert_eq!(rcode(&r), 4);
    let r = raw_udp(port, &query(10, 0, 1, WEB, 1, 3), DEADLINE).expect("chaos");
    assert_eq!(rcode(&r), 4);
    // A truncated name, a compression pointer in the question, a label past the end: FORMERR.
    let r = raw_udp(port, &query(11, 0, 1, b"\x03web\x07def", 1, 1)[..20], DEADLINE).expect("cut");
    assert_eq!(rcode(&r), 1);
    let r = raw_udp(port, &query(12, 0, 1, b"\xC0\x0C", 1, 1), DEADLINE).expect("pointer");
    assert_eq!(rcode(&r), 1);
    // EDNS version 1: BADVERS (extended rcode 16 = OPT TTL high byte 1).
    let mut m = query(13, 0, 1, WEB, 1, 1);
    m[11] = 1;
    m.extend_from_slice(&[0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0]);
    let r = raw_udp(port, &m, DEADLINE).expect("badvers");
    assert_eq!(rcode(&r), 0);
    assert_eq!(r[r.len() - 6], 1, "extended rcode BADVERS: {r:?}");
    // An unknown type on an existing name: NODATA.
    let r = raw_udp(port, &query(14, 0, 1, WEB, 65280, 1), DEADLINE).expect("unknown type");
    assert_eq!(rcode(&r), 0);
    assert_eq!(&r[6..8], &[0, 0]);
    // Random garbage never crashes the server: it still answers afterwards.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..300u32 {
        let len = (i as usize * 7) % 300 + 3;
        let mut g: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        g[2] &= 0x7F;
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.send_to(&g, SocketAddr::from(([127, 0, 0, 1], port))).expect("send");
    }
    // Garbage over TCP: a zero-length message, then a bogus one; then the connection closes.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5]).expect("write");
    }
    let r = dig(port, &[&n("web"), "A"]);
    assert_eq!(r.rdata_sorted(), vec!["10.96.0.10".to_owned()]);
    assert!(ferry.metric("ferry_dns_dropped_total", &[]) >= 3.0);
}

#[tokio::test]
async fn hickory_client_resolves_services() {
    use hickory_resolver::{
        Resolver,
        config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
        net::runtime::TokioRuntimeProvider,
        proto::rr::RecordType,
    };
    let dir = ConfigDir::new();
    dir.write("zone.yaml", ZONE_YAML);
    let (_ferry, port) = start_dns(&dir, &["--no-forward"]);
    let mut resolvers = Vec::new();
    for proto in [ConnectionConfig::udp(), ConnectionConfig::tcp()] {
        let mut conn = proto;
        conn.port = port;
        let ns = NameServerConfig::new([127, 0, 0, 1].into(), true, vec![conn]);
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.ndots = 0;
        let r = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .expect("resolver");
        resolvers.push(r);
    }
    for r in &resolvers {
        let ips: Vec<String> = r
            .lookup_ip("web.default.svc.cluster.local.")
            .await
            .expect("web")
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert!(ips.contains(&"10.96.0.10".to_owned()), "{ips:?}");
        let srv = r.lookup("_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV).await.expect("srv");
        assert_eq!(srv.answers().len(), 2);
        let err = r.lookup("missing.svc.cluster.local.", RecordType::A).await.expect_err("nxdomain");
        assert!(
            err.to_string().to_lowercase().contains("nxdomain") || format!("{err:?}").contains("NXDomain"),
            "{err:?}"
        );
        let ptr = r.lookup("10.0.96.10.in-addr.arpa.", RecordType::PTR).await.expect("ptr");
        assert_eq!(ptr.answers()[0].data.to_string(), "web.default.svc.cluster.local.");
    }
}

/// `ferry node` serving DNS NodeLocal-DNSCache style: on a link-local address added to the VIP
/// device, and on the kube-dns Service's ClusterIP, which is then not proxied (its only endpoint
/// has no DNS server, so a proxied query would time out).
#[test]
fn node_serves_dns_on_a_node_local_address_and_the_kube_dns_cluster_ip() {
    let cluster = crate::node::Cluster::new();
    cluster.dir.write(
        "dns.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kube-dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
endpoints:
- {addresses: ["10.244.1.10"], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
"#,
    );
    let _ferry = cluster.start(&[
        "--dns-listen",
        "169.254.20.10:53",
        "--dns-service",
        "kube-system/kube-dns",
        "--no-forward",
    ]);
    for server in ["169.254.20.10", "10.96.0.10"] {
        for transport in ["+notcp", "+tcp"] {
            let out = cluster
                .pod_b
                .command("dig")
                .args([&format!("@{server}"), transport, "+tries=1", "+time=3", &n("web"), "A"])
                .output()
                .expect("dig in pod-b");
            let r = parse(&String::from_utf8_lossy(&out.stdout));
            assert_eq!(r.status, "NOERROR", "{server} {transport}: {r:?}");
            assert_eq!(r.rdata_sorted(), vec!["10.96.0.20".to_owned()], "{server} {transport}");
        }
    }
}

/// `ferry node --kubeconfig --dns-listen`: DNS fed by the API server. The headless Service's
/// EndpointSlice carries `service.kubernetes.io/headless` (as the EndpointSlice controller sets
/// it), which kube-proxy's selector filters out at the API server; with DNS on, Ferry watches
/// every slice, so the headless name resolves to its ready endpoints, and a later change arrives.
#[test]
fn node_dns_from_the_api_server_sees_headless_services() {
    let cluster = crate::node::Cluster::new();
    let api = crate::kube::Api::start(&cluster);
    let apply = |yaml: &str| api.apply(yaml);
    apply(&crate::node::node_yaml());
    apply(&headless_db(&["{addresses: [10.244.1.10], hostname: db-0, nodeName: node-a}"]));
    apply(
        r#"apiVersion: v1
kind: Service
metadata:
  name: other
  namespace: default
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec:
  clusterIP: 10.96.0.77
  ports: [{name: http, port: 80}]
"#,
    );
    let path = api.path();
    let ferry = cluster.spawn(
        &["--kubeconfig", &path],
        &["--min-sync-period", "50ms", "--dns-listen", "169.254.20.10:53", "--no-forward"],
    );
    ferry.wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving").expect("ferry node never served");
    let ask = |name: &str| {
        let out = cluster
            .pod_a
            .command("dig")
            .args(["@169.254.20.10", "+tries=1", "+time=3", name, "A"])
            .output()
            .expect("dig in pod-a");
        parse(&String::from_utf8_lossy(&out.stdout))
    };
    let r = ask(&n("db"));
    assert_eq!(r.status, "NOERROR", "{r:?}");
    assert_eq!(r.rdata_sorted(), vec!["10.244.1.10".to_owned()]);
    assert_eq!(ask(&n("db-0.db")).rdata_sorted(), vec!["10.244.1.10".to_owned()]);
    // Another proxy's Service: in cluster DNS, but not proxied here.
    assert_eq!(ask(&n("other")).rdata_sorted(), vec!["10.96.0.77".to_owned()]);
    assert!(
        ferry.snapshot()["services"].get("default/other").is_none(),
        "another proxy's Service is proxied"
    );

    // A second endpoint through the API: visible once the zone has the new version.
    let version = ferry.metric("ferry_dns_zone_version", &[]);
    apply(&headless_db(&[
        "{addresses: [10.244.1.10], hostname: db-0, nodeName: node-a}",
        "{addresses: [10.244.2.10], hostname: db-1, nodeName: node-b}",
    ]));
    let start = Instant::now();
    while ferry.metric("ferry_dns_zone_version", &[]) <= version {
        assert!(start.elapsed() < DEADLINE, "zone never rebuilt after the API change");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ask(&n("db")).rdata_sorted(), vec!["10.244.1.10".to_owned(), "10.244.2.10".to_owned()]);
}

/// `ferry dns --kubeconfig`: the standalone DNS server fed by the API server, watching every
/// Service and EndpointSlice (headless slices, which kube-proxy's selector drops, included); a
/// Service created later resolves once the zone has the new version.
#[test]
fn dns_from_the_api_server() {
    let api = crate::kube::Api::start_here();
    let apply = |yaml: &str| api.apply(yaml);
    apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#,
    );
    apply(&headless_db(&["{addresses: [10.1.0.1], hostname: db-0}"]));
    let path = api.path();
    let (ferry, port) = start_dns_from(&["--kubeconfig", &path], &["--no-forward"]);
    assert_eq!(dig(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.10".to_owned()]);
    assert_eq!(dig(port, &[&n("db-0.db"), "A"]).rdata_sorted(), vec!["10.1.0.1".to_owned()]);
    assert_eq!(dig(port, &[&n("api"), "A"]).status, "NXDOMAIN");

    let version = ferry.metric("ferry_dns_zone_version", &[]);
    apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{port: 443}]
"#,
    );
    let start = Instant::now();
    while ferry.metric("ferry_dns_zone_version", &[]) <= version {
        assert!(start.elapsed() < DEADLINE, "zone never rebuilt after the API change");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dig(port, &[&n("api"), "A"]).rdata_sorted(), vec!["10.96.0.12".to_owned()]);
}

/// The headless Service `db` (port `pg`) and its EndpointSlice, labelled headless as the
/// EndpointSlice controller labels it; `endpoints` are YAML flow mappings.
fn headless_db(endpoints: &[&str]) -> String {
    let mut y = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: default
  labels: {kubernetes.io/service-name: db, service.kubernetes.io/headless: ""}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
"#,
    );
    for e in endpoints {
        y.push_str(&format!("- {e}\n"));
    }
    y
}

#[test]
fn handoff_socket_moves_the_dns_sockets_to_a_new_process() {
    let run = ConfigDir::new();
    let socket = run.path().join("handoff.sock");
    let handoff = ["--handoff-socket", socket.to_str().expect("utf-8 path"), "--no-forward"];
    let service = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    };
    let old_dir = ConfigDir::new();
    old_dir.write("web.yaml", &service("10.96.0.10"));
    let (mut old, port) = start_dns(&old_dir, &handoff);
    assert_eq!(dig(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.10".to_owned()]);

    // The new process asks for the old one's port and gets its sockets (a fresh bind would fail:
    // DNS sockets are not SO_REUSEPORT).
    let new_dir = ConfigDir::new();
    new_dir.write("web.yaml", &service("10.96.0.20"));
    let listen = format!("127.0.0.1:{port}");
    let (new, new_port) = start_dns(&new_dir, &[&handoff[..], &["--listen", &listen]].concat());
    assert_eq!(new_port, port);
    new.wait_log(DEADLINE, |l| msg(l) == "takeover complete: the predecessor stops accepting")
        .expect("takeover complete");
    old.wait_log(DEADLINE, |l| msg(l) == "drained after the handoff; waiting for SIGTERM to exit")
        .expect("the old process drained");
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit(DEADLINE), Some(0));
    // Answers come from the new configuration, over UDP and TCP.
    assert_eq!(dig(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.20".to_owned()]);
    assert_eq!(kdig_tcp(port, &[&n("web"), "A"]).rdata_sorted(), vec!["10.96.0.20".to_owned()]);
}
