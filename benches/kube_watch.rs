//! `ferry node --kubeconfig` at scale: 10,000 Services and 100,000 endpoints delivered over the
//! Kubernetes watch, then single changes timed from the API write to the data path using them.
//!
//! Everything runs in a fresh network namespace (needs root): the test API server
//! (`ferry-test-apiserver`, the real list/watch protocol with 500-object pages), the `ferry node`
//! binary with its VIP device and one listener per ClusterIP, and two probe backends. It prints a
//! Markdown table:
//! - time from process start to `/readyz` 200 (every kind listed, first snapshot built, every
//!   VIP address added and listener bound);
//! - resident memory after the sync and after the changes;
//! - per-change latency through the whole path: the probe Service's EndpointSlice is switched
//!   between two backends, and the time runs from the API write until a new connection to the
//!   ClusterIP reaches the new backend (API event -> watch -> index -> snapshot -> listener pool).
//!   Changes are paced `PACE_MS` apart, so each is a lone change (`--min-sync-period` does not hold
//!   it back), as in a quiet cluster.
//!
//! ```text
//! cargo bench --bench kube_watch                       # 10,000 Services, 200 changes
//! SERVICES=2000 CHANGES=50 cargo bench --bench kube_watch
//! ```
#![allow(unsafe_code, missing_docs)]

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ferry_test_apiserver::ApiServer;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const PROBE_VIP: &str = "10.97.0.1";
const BACKENDS: [&str; 2] = ["10.244.0.1", "10.244.0.2"];
const DEADLINE: Duration = Duration::from_secs(120);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let services = env("SERVICES", 10_000);
    let per_service = env("ENDPOINTS_PER_SERVICE", 10);
    let changes = env("CHANGES", 200);
    let pace = Duration::from_millis(env("PACE_MS", 150) as u64);

    let ns = format!("fkw{}", std::process::id());
    sh(&["ip", "netns", "add", &ns]);
    let _cleanup = Cleanup(ns.clone());
    enter(&ns);
    sh(&["ip", "link", "set", "lo", "up"]);
    for ip in BACKENDS {
        sh(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    for (i, ip) in BACKENDS.iter().enumerate() {
        let listener = TcpListener::bind((*ip, 8080)).expect("bind probe backend");
        std::thread::spawn(move || {
            for mut s in listener.incoming().map_while(Result::ok) {
                let _ = std::io::Write::write_all(&mut s, format!("{i}\n").as_bytes());
            }
        });
    }

    let api = ApiServer::start();
    let dir = std::env::temp_dir().join(format!("ferry-kube-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");

    let started = Instant::now();
    api.apply(node()).expect("node");
    api.apply_all((0..services).map(service)).expect("services");
    api.apply_all((0..services).map(|i| slice(i, per_service))).expect("slices");
    api.apply(probe_service()).expect("probe service");
    api.apply(probe_slice(0)).expect("probe slice");
    let loaded = started.elapsed();

    let ferry_bin = env!("CARGO_BIN_EXE_ferry");
    let admin = free_port();
    let started = Instant::now();
    let mut ferry = Command::new(ferry_bin)
        .args(["node", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--vip-device", "ferry0", "--nodeport-addresses", "10.244.0.0/24"])
        .args(["--admin-address", &format!("127.0.0.1:{admin}")])
        .args(["--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"])
        .args(["--log-format", "json", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferry");
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    while get(admin, "/readyz").0 != 200 {
        assert!(ferry.try_wait().expect("wait").is_none(), "ferry exited");
        assert!(started.elapsed() < DEADLINE, "ferry never became ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready = started.elapsed();
    let rss_synced = rss_mib(&ferry);
    assert_eq!(hello(), 0, "the probe ClusterIP reaches its first backend");

    let mut latencies = Vec::with_capacity(changes);
    for n in 1..=changes {
        std::thread::sleep(pace);
        let want = n % 2;
        let start = Instant::now();
        api.apply(probe_slice(want)).expect("probe change");
        while hello() != want {
            assert!(start.elapsed() < DEADLINE, "change {n} never reached the data path");
        }
        latencies.push(start.elapsed());
    }
    let rss_after = rss_mib(&ferry);
    let (_, metrics) = get(admin, "/metrics");
    // `+ 0.0`: an empty sum is -0.0.
    let lists = metric(&metrics, "ferry_kube_lists_total") + 0.0;
    let errors = metric(&metrics, "ferry_kube_watch_errors_total") + 0.0;
    let programming = metric(&metrics, "kubeproxy_network_programming_duration_seconds_sum")
        / metric(&metrics, "kubeproxy_network_programming_duration_seconds_count");
    let _ = ferry.kill();
    let _ = ferry.wait();
    let _ = std::fs::remove_dir_all(&dir);

    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!("| metric | value |\n|---|---:|");
    println!("| Services / endpoints in the API server | {services} / {} |", services * per_service);
    println!("| objects written to the API server (setup, not Ferry) | {:.1} s |", loaded.as_secs_f64());
    println!(
        "| process start -> /readyz 200 (listed, built, VIPs added, listeners bound) | {:.2} s |",
        ready.as_secs_f64()
    );
    println!("| resident memory after the sync | {rss_synced:.0} MiB |");
    println!("| resident memory after {changes} changes | {rss_after:.0} MiB |");
    println!("| change latency, API write -> data path, p50 | {:.2} ms |", pct(0.50));
    println!("| change latency p90 | {:.2} ms |", pct(0.90));
    println!("| change latency p99 | {:.2} ms |", pct(0.99));
    println!("| change latency max | {:.2} ms |", pct(1.0));
    println!(
        "| kubeproxy_network_programming_duration_seconds, mean (Ferry's own measure, ms granularity) | {:.2} ms |",
        programming * 1000.0
    );
    println!("| lists (one per kind expected) / watch errors | {lists} / {errors} |");
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.1"}]},
    })
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    })
}

fn slice(i: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            let n = i * endpoints + e;
            json!({"addresses": [format!("10.{}.{}.{}", 100 + n / 62500, n / 250 % 250, n % 250 + 1)],
                   "conditions": {"ready": true}, "nodeName": if e % 2 == 0 { NODE } else { "node-b" }})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

fn probe_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "probe", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": PROBE_VIP, "clusterIPs": [PROBE_VIP],
                 "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    })
}

/// The probe's slice, pointing at backend `which`, stamped with the trigger time kube-proxy reads.
fn probe_slice(which: usize) -> Value {
    let now = jiff::Timestamp::now().to_string();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "probe-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "probe"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [BACKENDS[which]], "conditions": {"ready": true}, "nodeName": NODE}],
        "ports": [{"name": "tcp", "protocol": "TCP", "port": 8080}],
    })
}

/// Which backend a new connection to the probe ClusterIP reaches (`usize::MAX`: none).
fn hello() -> usize {
    let to: SocketAddr = (PROBE_VIP.parse::<std::net::IpAddr>().expect("ip"), 80).into();
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else { return usize::MAX };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    match BufReader::new(&mut s).read_line(&mut line) {
        Ok(_) => line.trim().parse().unwrap_or(usize::MAX),
        Err(_) => usize::MAX,
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n");
    if std::io::Write::write_all(&mut s, req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_mib(child: &Child) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().expect("run");
    assert!(status.success(), "{args:?} failed");
}

/// Moves this (main) thread into the namespace; threads and processes started later follow it.
fn enter(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    // SAFETY: setns(2) on a valid namespace fd, on the main thread before any other thread starts.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
