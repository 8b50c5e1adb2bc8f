//! `ferry dns`: standalone cluster DNS over a directory of manifests, and the DNS flags shared
//! with `ferry node`.
//!
//! Wiring: [`Daemon`] (file or API source, publisher, admin server, signals) -> [`ferry_dns::serve`] on
//! UDP and TCP sockets bound here (one port per `--listen` address, TCP on the UDP socket's port).
//!
//! `ferry node` serves the same DNS on `--dns-listen` (added to the VIP device) and on the
//! ClusterIPs of `--dns-service`, whose frontends [`WithoutService`] then keeps from the proxy.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Args;
use ferry_dns::{DnsConfig, SnapshotFeed, Sockets, Upstreams};
use ferry_model::{DnsKind, FrontendKey, ServiceKey, ServicePort, Snapshot};
use ferry_proxy::{Binding, FrontendFilter, Handoff, handoff::Registration};
use ferry_watch::{ClientConfig, KubeSourceOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    cli::RunArgs,
    daemon::{self, Daemon, Source},
    telemetry,
};

/// `ferry dns`.
#[derive(Debug, Args)]
pub(crate) struct DnsArgs {
    /// Directory of YAML manifests (Service, EndpointSlice) to serve instead of watching the API
    /// server; watched for changes.
    #[arg(long, env = "FERRY_CONFIG", conflicts_with = "kubeconfig")]
    pub(crate) config: Option<PathBuf>,

    /// Watch the API server of this kubeconfig (its current context) for every Service and
    /// EndpointSlice. Without it and without `--config`, the in-cluster service account is used.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// Addresses to serve DNS on, UDP and TCP (port 0 picks a free port; the bound address is
    /// logged).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:53")]
    pub(crate) listen: Vec<SocketAddr>,

    #[command(flatten)]
    pub(crate) dns: DnsFlags,

    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// What the DNS server answers and where it forwards (shared by `ferry dns` and `ferry node`).
#[derive(Debug, Args)]
pub(crate) struct DnsFlags {
    /// The cluster domain served authoritatively.
    #[arg(long, default_value = ferry_dns::DEFAULT_DOMAIN)]
    pub(crate) cluster_domain: String,

    /// TTL (seconds) of cluster-zone records and of negative answers.
    #[arg(long, default_value_t = ferry_dns::DEFAULT_TTL, value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub(crate) dns_ttl: u32,

    /// Upstream resolvers for names outside the cluster domain (comma-separated `IP:PORT`);
    /// without it, the `nameserver` lines of `--resolv-conf` are used.
    #[arg(long, value_delimiter = ',')]
    pub(crate) upstream: Vec<SocketAddr>,

    /// resolv.conf to read upstream resolvers from when `--upstream` is not given.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub(crate) resolv_conf: PathBuf,

    /// Do not forward: names outside the cluster domain are answered REFUSED.
    #[arg(long)]
    pub(crate) no_forward: bool,

    /// Forwarded answers cached at most (positive and negative).
    #[arg(long, default_value_t = ferry_dns::DEFAULT_CACHE_SIZE)]
    pub(crate) dns_cache_size: u64,
}

impl DnsFlags {
    /// The server configuration these flags describe.
    pub(crate) fn config(&self) -> DnsConfig {
        let upstreams = if self.no_forward {
            Upstreams::None
        } else if !self.upstream.is_empty() {
            Upstreams::Servers(self.upstream.clone())
        } else {
            Upstreams::ResolvConf(self.resolv_conf.clone())
        };
        let mut config = DnsConfig::default();
        config.domain.clone_from(&self.cluster_domain);
        config.ttl = self.dns_ttl;
        config.upstreams = upstreams;
        config.cache_size = self.dns_cache_size;
        config
    }
}

/// Binds UDP and TCP on each address (TCP on the port the UDP socket got), taking the sockets a
/// predecessor served on them (`handoff`); the registrations offer them to a successor.
pub(crate) fn bind(
    handoff: &Arc<Handoff>,
    addresses: &[SocketAddr],
) -> anyhow::Result<(Sockets, Vec<Registration>)> {
    let mut sockets = Sockets::default();
    let mut registrations = Vec::new();
    for address in addresses {
        // With port 0 the UDP socket picks the port and TCP must get the same one; another
        // process may hold it for TCP, so try a few ports.
        let attempts = if address.port() == 0 { 10 } else { 1 };
        for attempt in 1..=attempts {
            let (udp, udp_registration) =
                handoff.udp_socket(*address).with_context(|| format!("binding DNS UDP {address}"))?;
            let bound = udp.local_addr().context("reading the DNS address")?;
            let (tcp, tcp_registration) = match handoff.tcp_listener(bound) {
                Ok(tcp) => tcp,
                Err(e) if attempt < attempts && e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e).with_context(|| format!("binding DNS TCP {bound}")),
            };
            tracing::info!(address = %bound, "dns listening");
            sockets.udp.push(udp);
            sockets.tcp.push(tcp);
            registrations.extend([udp_registration, tcp_registration]);
            break;
        }
    }
    Ok((sockets, registrations))
}

/// Runs `ferry dns` to completion.
pub(crate) fn run(args: DnsArgs) -> anyhow::Result<()> {
    daemon::runtime(&args.run)?.block_on(serve(args))
}

async fn serve(args: DnsArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics()?;
    let source = match (&args.config, &args.kubeconfig) {
        (Some(dir), _) => Source::Files { dir: dir.clone(), node: None, proxy_name: None },
        (None, kubeconfig) => Source::Kube(KubeSourceOptions {
            client: kubeconfig.clone().map_or(ClientConfig::InCluster, ClientConfig::Kubeconfig),
            // No node: DNS does not categorise endpoints (the Node watch then lists nothing).
            node: String::new(),
            proxy_name: None,
            min_sync_period: std::time::Duration::from_millis(100),
            all_services: true,
        }),
    };
    let Some(daemon) = Daemon::start(source, &args.run, metrics, &[]).await? else {
        return Ok(());
    };
    let (sockets, _registrations) = match bind(&daemon.handoff(), &args.listen) {
        Ok(s) => s,
        Err(error) => {
            daemon.stop().await;
            return Err(error);
        }
    };
    let feed = SnapshotFeed { snapshots: daemon.snapshots.subscribe(), synced: true };
    let mut config = args.dns.config();
    config.udp_threads = args.run.worker_threads;
    let server = tokio::spawn(ferry_dns::serve(config, sockets, feed, daemon.shutdown.clone()));
    daemon.serving();
    tracing::info!(
        version = daemon.snapshots.current().version,
        config = %daemon.source,
        "configuration loaded; serving"
    );
    let result = server.await;
    daemon.stop().await;
    result.context("the DNS server task failed")?.context("the DNS server failed")?;
    tracing::info!("stopped; exiting");
    Ok(())
}

// === ferry node ===

/// `--dns-service namespace/name`.
pub(crate) fn parse_service(s: &str) -> anyhow::Result<ServiceKey> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ServiceKey::new(ns, name))
        }
        _ => anyhow::bail!("--dns-service {s:?}: expected NAMESPACE/NAME"),
    }
}

/// A [`FrontendFilter`] that serves nothing of one Service (the kube-dns Service whose
/// ClusterIPs this node's DNS server answers on) and defers to `inner` for every other.
#[derive(Debug)]
pub(crate) struct WithoutService<F> {
    pub(crate) inner: F,
    pub(crate) service: ServiceKey,
}

impl<F: FrontendFilter> FrontendFilter for WithoutService<F> {
    fn bindings(&self, key: &FrontendKey, port: &ServicePort, out: &mut Vec<Binding>) {
        if port.service != self.service {
            self.inner.bindings(key, port, out);
        }
    }
}

/// The DNS addresses of `ferry node`: `--dns-listen`, and port 53 of the `--dns-service`
/// ClusterIPs in `snapshot`.
pub(crate) fn node_addresses(
    listen: Option<SocketAddr>,
    service: Option<&ServiceKey>,
    snapshot: &Snapshot,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = listen.into_iter().collect();
    if let Some(key) = service {
        match snapshot.dns.get(key).map(|s| &s.kind) {
            Some(DnsKind::ClusterIp(ips)) => out.extend(ips.iter().map(|ip| SocketAddr::new(*ip, 53))),
            _ => tracing::warn!(service = %key, "--dns-service has no ClusterIP yet; not serving DNS on it"),
        }
    }
    out
}

/// Binds `addresses` and serves DNS on them until `shutdown` (a task; errors are logged).
pub(crate) async fn spawn_node_dns(
    flags: &DnsFlags,
    udp_threads: Option<usize>,
    addresses: &[SocketAddr],
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
    handoff: &Arc<Handoff>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (sockets, registrations) = bind(handoff, addresses)?;
    let mut config = flags.config();
    config.udp_threads = udp_threads;
    let feed = SnapshotFeed { snapshots, synced: true };
    Ok(tokio::spawn(async move {
        if let Err(error) = ferry_dns::serve(config, sockets, feed, shutdown).await {
            tracing::error!(%error, "the DNS server failed");
        }
        drop(registrations);
    }))
}
