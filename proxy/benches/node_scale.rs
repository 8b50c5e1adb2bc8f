//! `ferry node` at scale: 10,000 ClusterIP Services with 10 endpoints each (100,000 endpoints).
//!
//! Runs in a fresh network namespace of its own thread (needs root), with the real VIP device and
//! real listening sockets, and prints a Markdown table: full sync time, time from "EndpointSlice
//! applied to the index" to "new pool swapped into the listener" over many single-endpoint
//! changes, Service additions, resident memory and the kernel objects created.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench -p ferry-proxy --bench node_scale
//! SERVICES=2000 CHANGES=200 cargo bench -p ferry-proxy --bench node_scale   # smaller run
//! ```
//!
//! A sync here is exactly the data-path part of `ferry node`'s sync (`src/node.rs`):
//! `host::frontend_address_changes` + `VipDevice::update`, then `Manager::apply_changes`. The
//! Prometheus recorder is installed, so per-listener metric series count in the memory figure.
//! The manager registers its sockets with a [`Handoff`], as the DaemonSet runs it
//! (`--handoff-socket`); at the end a second manager takes them all over, as a restart does.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_model::{FrontendKey, Index, NodeInfo, Protocol, Snapshot};
use ferry_proxy::{
    Handoff, Manager, NodeConfig, NodeFrontends, ProxyConfig,
    health::metrics::no_local_endpoints,
    host::{self, VipDevice},
};
use futures::TryStreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NODE: &str = "node-a";
const DEVICE: &str = "ferry0";
const ENDPOINTS_PER_SERVICE: usize = 10;
/// File descriptors kept free beyond those per Service (runtime, netlink, stdio).
const FD_MARGIN: u64 = 256;
/// Descriptors per Service in the handoff run: its socket and the handoff's duplicate, twice over
/// while a second manager in this process takes them over (in a real restart, two per process).
const HANDOFF_FDS_PER_SERVICE: u64 = 4;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument (a filter) is ignored.
    let mut services = env("SERVICES", 10_000);
    let changes = env("CHANGES", 500);
    let additions = env("ADDITIONS", 50);

    let (soft, hard) = sys::raise_nofile(services as u64 * HANDOFF_FDS_PER_SERVICE + FD_MARGIN);
    let fit = hard.saturating_sub(FD_MARGIN + additions as u64) as usize;
    let mut note = format!("RLIMIT_NOFILE soft {soft} -> {hard}");
    if fit < services {
        note.push_str(&format!("; scaled down from {services} to {fit} Services to fit"));
        services = fit;
    }
    let thread = std::thread::spawn(move || {
        sys::unshare_net();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(services, changes, additions, note));
        let fit = (hard.saturating_sub(FD_MARGIN) / HANDOFF_FDS_PER_SERVICE) as usize;
        rt.block_on(handoff(services.min(fit), hard));
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// `10.96.0.0/16` (the first 65,024 addresses that avoid .0 and .255), or `10.97.0.0/16` for
/// additions.
fn cluster_ip(second: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, second, (i / 254) as u8, (i % 254 + 1) as u8))
}

/// The `j`-th endpoint address: 10.128.0.0/9 and up.
fn endpoint_ip(j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 128 + (j >> 16) as u8, (j >> 8) as u8, j as u8))
}

fn service(name: &str, ip: IpAddr) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .expect("service")
}

fn slice(svc: &str, ips: &[IpAddr]) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "nodeName": if k % 2 == 0 { NODE } else { "node-b" }})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("{svc}-abcde"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("slice")
}

/// xorshift64*: deterministic, dependency-free choice of which Service changes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// The data-path part of one `ferry node` sync (see the module docs).
struct Node {
    device: VipDevice,
    manager: Manager,
    last: Arc<Snapshot>,
}

impl Node {
    async fn sync(&mut self, snapshot: Arc<Snapshot>) {
        let changes = host::frontend_address_changes(&self.last, &snapshot);
        self.device.update(&changes.add, &changes.remove).await.expect("VIP update");
        let errors = self.manager.apply_changes(&snapshot);
        assert!(errors.is_empty(), "{errors:?}");
        self.last = snapshot;
    }

    /// The pre-incremental sync: re-read every device address, visit every frontend.
    async fn full_sync(&mut self, snapshot: Arc<Snapshot>) {
        self.device.sync(&host::frontend_addresses(&snapshot)).await.expect("VIP sync");
        let errors = self.manager.apply(&snapshot);
        assert!(errors.is_empty(), "{errors:?}");
        self.last = snapshot;
    }
}

#[derive(Default)]
struct Table(Vec<[String; 3]>);

impl Table {
    fn row(&mut self, what: &str, value: String, note: &str) {
        self.0.push([what.to_owned(), value, note.to_owned()]);
    }

    fn print(&self) {
        println!("| measure | ferry node | notes |\n|---|---|---|");
        for [a, b, c] in &self.0 {
            println!("| {a} | {b} | {c} |");
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// p50 / p99 / max by nearest rank.
fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    format!("{} / {} / {}", ms(rank(0.50)), ms(rank(0.99)), ms(v[v.len() - 1]))
}

async fn run(services: usize, changes: usize, additions: usize, note: String) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::set_global_recorder(recorder).expect("recorder");
    lo_up().await;
    let rss_start = sys::rss_kib();
    let mut table = Table::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Objects through the index, as the Kubernetes source feeds them.
    let t = Instant::now();
    let (mut index, snapshot) = cluster(services);
    let index_time = t.elapsed();
    let rss_index = sys::rss_kib();
    assert_eq!(snapshot.frontends.len(), services);

    // Full sync: every address onto the device, one socket per Service.
    let mut manager = Manager::new(config(Handoff::disabled()));
    let mut device = VipDevice::ensure(DEVICE).await.expect("VIP device");
    let fds_before = sys::open_fds();
    let t = Instant::now();
    let stats = device.sync(&host::frontend_addresses(&snapshot)).await.expect("VIP sync");
    let device_time = t.elapsed();
    let t = Instant::now();
    let errors = manager.apply(&snapshot);
    let manager_time = t.elapsed();
    assert!(errors.is_empty(), "{:?}", errors.first());
    let rss_synced = sys::rss_kib();
    let addresses = device.current_addresses().await.expect("list").len();
    let sockets = manager.len();
    let fds = sys::open_fds() - fds_before;
    let tcp_inuse = sys::tcp_inuse();
    assert_eq!(stats.added, services);
    assert_eq!(sockets, services);

    table.row("Services / endpoints", format!("{services} / {}", services * ENDPOINTS_PER_SERVICE), &note);
    table.row(
        "all objects into the index + first snapshot",
        ms(index_time),
        "k8s objects built from JSON, `Index::apply_*`, `Index::build`",
    );
    table.row(
        "full sync",
        ms(device_time + manager_time),
        &format!(
            "VIP device {} ({} addresses) + listeners {} ({} sockets)",
            ms(device_time),
            addresses,
            ms(manager_time),
            sockets
        ),
    );

    let mut node = Node { device, manager, last: snapshot };

    // Single-endpoint changes: one endpoint of one Service gets a new address.
    let mut current: Vec<Vec<IpAddr>> = (0..services)
        .map(|i| (0..ENDPOINTS_PER_SERVICE).map(|k| endpoint_ip(i * ENDPOINTS_PER_SERVICE + k)).collect())
        .collect();
    let mut fresh = services * ENDPOINTS_PER_SERVICE;
    let mut total = Vec::with_capacity(changes);
    let (mut in_index, mut in_sync) = (Vec::with_capacity(changes), Vec::with_capacity(changes));
    for c in 0..changes {
        let i = rng.below(services);
        let new_ip = endpoint_ip(fresh);
        fresh += 1;
        current[i][c % ENDPOINTS_PER_SERVICE] = new_ip;
        let name = format!("svc-{i}");
        let object = slice(&name, &current[i]);

        let t0 = Instant::now();
        index.apply_endpoint_slice(&object);
        let snap = index.build();
        let t1 = Instant::now();
        node.sync(snap).await;
        let t2 = Instant::now();

        let key = FrontendKey::Addr(Protocol::Tcp, SocketAddr::new(cluster_ip(96, i), 80));
        let upstreams = node.manager.listener(&key).expect("listener").upstreams();
        assert!(upstreams.pool().endpoints().iter().any(|e| e.addr.ip() == new_ip), "change {c} not in pool");
        total.push(t2 - t0);
        in_index.push(t1 - t0);
        in_sync.push(t2 - t1);
        tokio::task::yield_now().await;
    }
    table.row(
        &format!("endpoint change -> pool swapped, p50 / p99 / max ({changes} changes)"),
        percentiles(total),
        &format!(
            "index apply + build {} ; VIP update + `apply_changes` {}",
            percentiles(in_index),
            percentiles(in_sync)
        ),
    );

    // Service additions: a new ClusterIP (address on the device + a new socket) with its slice.
    let mut added = Vec::with_capacity(additions);
    for a in 0..additions {
        let name = format!("new-{a}");
        let ip = cluster_ip(97, a);
        let (svc, object) = (service(&name, ip), slice(&name, &[endpoint_ip(fresh)]));
        fresh += 1;
        let t0 = Instant::now();
        index.apply_endpoint_slice(&object);
        index.apply_service(&svc);
        let snap = index.build();
        node.sync(snap).await;
        added.push(t0.elapsed());
        let key = FrontendKey::Addr(Protocol::Tcp, SocketAddr::new(ip, 80));
        assert!(node.manager.local_addr(&key).is_some(), "addition {a} not bound");
    }
    if additions > 0 {
        table.row(
            &format!("Service added -> address + socket live, p50 / p99 / max ({additions})"),
            percentiles(added),
            "includes the IPv4 address add (netlink round trip)",
        );
    }
    let total_addresses = node.device.current_addresses().await.expect("list").len();
    assert_eq!(total_addresses, services + additions);

    // What one change cost before: re-dump the device and visit every frontend.
    let mut full = Vec::new();
    for _ in 0..20 {
        let i = rng.below(services);
        current[i][0] = endpoint_ip(fresh);
        fresh += 1;
        let object = slice(&format!("svc-{i}"), &current[i]);
        let t0 = Instant::now();
        index.apply_endpoint_slice(&object);
        let snap = index.build();
        node.full_sync(snap).await;
        full.push(t0.elapsed());
    }
    table.row(
        "same change through the full path, p50 / p99 / max (20)",
        percentiles(full),
        "`VipDevice::sync` (address dump) + `Manager::apply` (every frontend): the pre-incremental sync",
    );

    let t = Instant::now();
    let (internal, external) = no_local_endpoints(&node.last, NODE);
    table.row(
        "rest of `ferry node`'s sync (not on the data path)",
        ms(t.elapsed()),
        &format!(
            "kube-proxy metric `no_local_endpoints` still walks every frontend ({internal}/{external}); \
             runs after the pools are swapped"
        ),
    );

    let mib = |kib: u64| format!("{:.0} MiB", kib as f64 / 1024.0);
    table.row(
        "resident memory (VmRSS) after full sync",
        mib(rss_synced),
        &format!(
            "process start {} ; + index and snapshot {} ; + VIP device and listeners {} ; after all changes {}",
            mib(rss_start),
            mib(rss_index.saturating_sub(rss_start)),
            mib(rss_synced.saturating_sub(rss_index)),
            mib(sys::rss_kib())
        ),
    );
    table.row(
        "kernel objects",
        format!("{addresses} addresses, {sockets} listening sockets, 1 link"),
        &format!("{fds} fds; TCP sockets in the namespace {tcp_inuse}; no netfilter rules"),
    );
    table.print();
    node.manager.shutdown().await;
}

/// A restart with `--handoff-socket` at `services` Services (as many as fit the descriptor limit
/// `hard`): one manager binds them and registers them with its handoff, a second one takes them
/// all over. Prints a table of its own.
async fn handoff(services: usize, hard: u64) {
    let (_, snapshot) = cluster(services);
    let mut device = VipDevice::ensure(DEVICE).await.expect("VIP device");
    device.sync(&host::frontend_addresses(&snapshot)).await.expect("VIP sync");

    let run_dir = std::env::temp_dir().join(format!("ferry-node-scale-{}", std::process::id()));
    let path: PathBuf = run_dir.join("handoff.sock");
    let handoff = Handoff::without_predecessor(Some(path.clone()));
    let mut old = Manager::new(config(handoff.clone()));
    let t = Instant::now();
    let errors = old.apply(&snapshot);
    let registered = t.elapsed();
    assert!(errors.is_empty(), "{:?}", errors.first());
    let (handed_over, stop) = (CancellationToken::new(), CancellationToken::new());
    let serving = tokio::spawn(handoff.clone().serve(handed_over.clone(), stop.clone()));
    while !path.exists() {
        tokio::task::yield_now().await;
    }

    let t = Instant::now();
    let successor = Handoff::take_over(path.clone()).await.expect("take over");
    let received = t.elapsed();
    let inherited = successor.inherited();
    assert_eq!(inherited, services, "every socket handed over");
    let mut new = Manager::new(config(successor.clone()));
    let t = Instant::now();
    let errors = new.apply(&snapshot);
    let taken = t.elapsed();
    assert!(errors.is_empty(), "{:?}", errors.first());
    assert_eq!(successor.inherited(), 0, "every inherited socket taken, none bound anew");
    let t = Instant::now();
    successor.complete_takeover().await;
    let stopped = t.elapsed();
    assert!(handed_over.is_cancelled(), "the predecessor was told to stop");
    let _ = serving.await;

    let mut table = Table::default();
    table.row(
        "Services (listening sockets)",
        services.to_string(),
        &format!("as many as fit {hard} descriptors at {HANDOFF_FDS_PER_SERVICE} per Service in one process"),
    );
    table.row(
        "listeners bound and registered",
        ms(registered),
        "`Manager::apply` binding every socket, each registered (one duplicate descriptor each)",
    );
    table.row(
        "restart: sockets received / listeners up / predecessor stopped",
        format!("{} / {} / {}", ms(received), ms(taken), ms(stopped)),
        &format!(
            "{inherited} sockets over the Unix socket; `Manager::apply` on inherited sockets (no bind); \
             `serving` -> `stopped`"
        ),
    );
    table.print();
    stop.cancel();
    old.shutdown().await;
    new.shutdown().await;
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// `services` ClusterIP Services `svc-i` with their EndpointSlices through the index, as the
/// Kubernetes source feeds them, and the index's first snapshot.
fn cluster(services: usize) -> (Index, Arc<Snapshot>) {
    let mut index = Index::new(Some(NodeInfo { name: NODE.into(), zone: None }));
    for i in 0..services {
        let name = format!("svc-{i}");
        index.apply_service(&service(&name, cluster_ip(96, i)));
        let ips: Vec<IpAddr> =
            (0..ENDPOINTS_PER_SERVICE).map(|k| endpoint_ip(i * ENDPOINTS_PER_SERVICE + k)).collect();
        index.apply_endpoint_slice(&slice(&name, &ips));
    }
    let snapshot = index.build();
    (index, snapshot)
}

/// The node proxy's manager, registering its sockets with `handoff`.
fn config(handoff: Arc<Handoff>) -> ProxyConfig {
    let filter = NodeFrontends::new(NodeConfig {
        node_port_addresses: vec![],
        local_sources: vec!["10.128.0.0/9".parse().expect("cidr")],
    });
    ProxyConfig { filter: Arc::new(filter), handoff, ..ProxyConfig::default() }
}

/// Brings `lo` up in the new namespace.
async fn lo_up() {
    let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
    tokio::spawn(conn);
    let mut links = handle.link().get().match_name("lo".to_owned()).execute();
    let lo = links.try_next().await.expect("lo lookup").expect("lo exists");
    let up = rtnetlink::LinkUnspec::new_with_index(lo.header.index).up().build();
    handle.link().set(up).execute().await.expect("lo up");
}

mod sys {
    //! The benchmark's only unsafe code: `unshare(2)` and `setrlimit(2)`; plus /proc readers.
    #![allow(unsafe_code)]

    use std::{fs, io};

    /// Moves the calling thread into a new network namespace.
    pub(super) fn unshare_net() {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            panic!("unshare(CLONE_NEWNET): {}; run as root", io::Error::last_os_error());
        }
    }

    /// Raises RLIMIT_NOFILE to `want` (both limits; raising the hard one needs root), else the
    /// soft limit to the hard one; returns (old soft, new soft).
    pub(super) fn raise_nofile(want: u64) -> (u64, u64) {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
        let soft = lim.rlim_cur;
        if lim.rlim_max < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
            // SAFETY: `raised` is a valid rlimit; on failure nothing changes.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                return (soft, want);
            }
        }
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read above; only the soft limit changed.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
        (soft, lim.rlim_max)
    }

    /// VmRSS of this process, in KiB.
    pub(super) fn rss_kib() -> u64 {
        let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Open file descriptors of this process.
    pub(super) fn open_fds() -> usize {
        fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
    }

    /// `TCP: inuse N` of this thread's network namespace.
    pub(super) fn tcp_inuse() -> u64 {
        let text = fs::read_to_string("/proc/thread-self/net/sockstat").expect("sockstat");
        let line = text.lines().find(|l| l.starts_with("TCP:")).expect("TCP line");
        let mut it = line.split_whitespace();
        it.find(|w| *w == "inuse").and_then(|_| it.next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}
