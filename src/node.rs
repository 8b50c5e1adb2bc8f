//! `ferry node`: the node service proxy.
//!
//! Wiring: [`Daemon`] (file source with this node's name, publisher, admin and metrics servers,
//! signals) -> on every snapshot, one *sync*: the VIP device gets exactly the snapshot's
//! ClusterIP/externalIP/LoadBalancer addresses ([`VipDevice::sync`]), then the listener
//! [`Manager`] binds, updates or closes frontends under [`NodeFrontends`] (kube-proxy's traffic
//! policy rules). A sync is what kube-proxy's `sync_proxy_rules` metrics time. A failed sync is
//! retried; established connections are never touched by a sync.
//!
//! Syncs are incremental: the device gets only the addresses that changed since the last
//! snapshot ([`host::frontend_address_changes`], [`VipDevice::update`]) and the manager visits
//! only changed frontends ([`Manager::apply_changes`]), so one endpoint change costs the same at
//! 10 or 10,000 Services. The first sync, the one after a device error, and one every
//! [`FULL_RESYNC`] (at the next change) are full: the device's addresses are re-read from the
//! kernel and every frontend is visited, which repairs anything changed behind Ferry's back.
//! After a takeover (`--handoff-socket`) the device is re-read once more, when the predecessor
//! has stopped: both processes synced it while they overlapped.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ferry_model::Snapshot;
use ferry_proxy::{
    Manager, ProxyConfig,
    health::{
        DEFAULT_SYNC_PERIOD, HealthzServer, IpFamily, KubeProxyMetrics, ProxyHealth, ServiceHealthServers,
    },
    host::{self, VipDevice},
    node::{NodeConfig, NodeFrontends},
};
use ferry_watch::{ClientConfig, KubeSourceOptions};

use crate::{
    cli::NodeArgs,
    daemon::{self, Daemon, Source},
    telemetry,
};

/// Age after which the next sync is a full one (kube-proxy's default `--sync-period`, after
/// which its nftables proxier also rewrites everything).
const FULL_RESYNC: Duration = Duration::from_secs(3600);

/// Runs `ferry node` to completion.
pub(crate) fn run(args: NodeArgs) -> anyhow::Result<()> {
    daemon::runtime(&args.run)?.block_on(serve(args))
}

async fn serve(args: NodeArgs) -> anyhow::Result<()> {
    if args.cleanup {
        host::source_ip::cleanup().context("removing the source-IP rules")?;
        let removed = VipDevice::cleanup(&args.vip_device)
            .await
            .with_context(|| format!("removing the VIP device {}", args.vip_device))?;
        tracing::info!(device = %args.vip_device, removed, "cleanup done");
        return Ok(());
    }
    let Some(node_name) = args.node_name.clone() else {
        anyhow::bail!("--node-name is required");
    };
    let source = match (&args.config, &args.kubeconfig) {
        (Some(dir), _) => Source::Files {
            dir: dir.clone(),
            node: Some(node_name.clone()),
            proxy_name: args.service_proxy_name.clone(),
        },
        (None, kubeconfig) => Source::Kube(KubeSourceOptions {
            client: kubeconfig.clone().map_or(ClientConfig::InCluster, ClientConfig::Kubeconfig),
            node: node_name.clone(),
            proxy_name: args.service_proxy_name.clone(),
            min_sync_period: args.min_sync_period,
            // Cluster DNS needs headless Services' EndpointSlices, which kube-proxy's selector drops.
            all_services: args.dns_listen.is_some() || args.dns_service.is_some(),
        }),
    };
    let workers = daemon::workers(&args.run)?;
    let metrics = telemetry::init_metrics()?;
    let Some(daemon) = Daemon::start(source, &args.run, metrics, &[args.metrics_bind_address]).await? else {
        return Ok(());
    };

    let device = VipDevice::ensure(&args.vip_device)
        .await
        .with_context(|| format!("preparing the VIP device {}", args.vip_device))?;
    let snapshot = daemon.snapshots.current();
    let node_port_addresses =
        node_port_addresses(&args.nodeport_addresses, &snapshot, &args.vip_device).await?;
    let mut local_sources = args.cluster_cidr.clone();
    local_sources.extend(node_port_addresses.iter().map(|ip| ipnet::IpNet::from(*ip)));
    tracing::info!(
        node = %node_name,
        device = %device.name(),
        node_port_addresses = ?node_port_addresses,
        "node proxy starting"
    );
    let filter = NodeFrontends::new(NodeConfig { node_port_addresses, local_sources });
    let source_ip =
        if args.preserve_source_ip { SourceIp::Wanted(filter.transparency()) } else { SourceIp::Off };
    let dns_service = args.dns_service.as_deref().map(crate::dns::parse_service).transpose()?;
    let filter: Arc<dyn ferry_proxy::FrontendFilter> = match &dns_service {
        Some(service) => Arc::new(crate::dns::WithoutService { inner: filter, service: service.clone() }),
        None => Arc::new(filter),
    };
    let manager = Manager::new(ProxyConfig {
        drain_timeout: args.run.drain_timeout,
        filter,
        workers,
        handoff: daemon.handoff(),
        ..ProxyConfig::default()
    });

    // kube-proxy's health surface: the node server on :10256 and one server per healthCheckNodePort.
    let families = [IpFamily::V4, IpFamily::V6];
    let health = Arc::new(ProxyHealth::new(&families, DEFAULT_SYNC_PERIOD));
    let kube_metrics = KubeProxyMetrics::new(&families);
    let (healthz, _healthz_registration) = daemon
        .handoff()
        .tcp_listener(args.healthz_bind_address)
        .with_context(|| format!("binding --healthz-bind-address {}", args.healthz_bind_address))?;
    let health_stop = daemon.shutdown.child_token();
    tokio::spawn(HealthzServer::new(health.clone()).serve(healthz, health_stop.clone()));
    let service_health = ServiceHealthServers::new(
        vec![ServiceHealthServers::ALL_ADDRESSES],
        health.clone(),
        health_stop.clone(),
    )
    .with_handoff(daemon.handoff());

    let mut syncer = Syncer {
        device,
        manager,
        source_ip,
        health,
        metrics: kube_metrics,
        service_health,
        last: None,
        last_full: Instant::now(),
        extra_addresses: args.dns_listen.map(|a| a.ip()).into_iter().collect(),
    };
    // A frontend that cannot be bound yet (or a device error) is retried below, as kube-proxy
    // retries a failed sync; every other frontend is served meanwhile.
    let mut failed = !syncer.sync(&snapshot).await;
    let dns_addresses = crate::dns::node_addresses(args.dns_listen, dns_service.as_ref(), &snapshot);
    let dns = if dns_addresses.is_empty() {
        None
    } else {
        let rx = daemon.snapshots.subscribe();
        Some(
            crate::dns::spawn_node_dns(
                &args.dns,
                args.run.worker_threads,
                &dns_addresses,
                rx,
                daemon.shutdown.clone(),
                &daemon.handoff(),
            )
            .await?,
        )
    };
    daemon.serving();
    tracing::info!(
        version = snapshot.version,
        frontends = snapshot.frontends.len(),
        "configuration loaded; serving"
    );

    let mut updates = daemon.snapshots.subscribe();
    let mut took_over = false;
    loop {
        tokio::select! {
            () = daemon.shutdown.cancelled() => break,
            () = daemon.taken_over(), if !took_over => {
                // The predecessor may have changed the device while both ran.
                took_over = true;
                failed |= !syncer.resync_device().await;
                continue;
            }
            changed = updates.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(std::time::Duration::from_secs(2)), if failed => {}
        }
        let snapshot = updates.borrow_and_update().clone();
        syncer.queued(&snapshot);
        failed = !syncer.sync(&snapshot).await;
    }
    syncer.manager.shutdown().await;
    if let Some(dns) = dns {
        let _ = dns.await;
    }
    daemon.stop().await;
    tracing::info!(
        "drained; exiting (VIP addresses stay for the next start; `ferry node --cleanup` removes them)"
    );
    Ok(())
}

/// Everything one sync touches, owned by the node loop.
struct Syncer {
    device: VipDevice,
    manager: Manager,
    source_ip: SourceIp,
    health: Arc<ProxyHealth>,
    metrics: KubeProxyMetrics,
    service_health: ServiceHealthServers,
    /// The last snapshot synced, to count what changed and to sync only the difference.
    last: Option<Arc<Snapshot>>,
    /// When the last full sync started.
    last_full: Instant,
    /// Addresses the device holds besides the snapshot's (`--dns-listen`).
    extra_addresses: std::collections::BTreeSet<IpAddr>,
}

impl Syncer {
    /// After a takeover: makes the device hold exactly the last synced snapshot's addresses, as
    /// read back from the kernel. Returns false on failure (the next sync is then a full one).
    async fn resync_device(&mut self) -> bool {
        let Some(snapshot) = &self.last else { return true };
        let mut want = host::frontend_addresses(snapshot);
        want.extend(&self.extra_addresses);
        match self.device.sync(&want).await {
            Ok(stats) => {
                tracing::info!(?stats, "VIP device re-read after the takeover");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "VIP device sync failed; will retry");
                false
            }
        }
    }

    /// A new snapshot arrived: counts its changes and starts the staleness clock.
    fn queued(&self, snapshot: &Snapshot) {
        self.health.queued();
        self.metrics.last_queued_timestamp();
        if let Some(last) = &self.last {
            let (services, endpoints) = changes(last, snapshot);
            self.metrics.service_changes(services);
            self.metrics.endpoint_changes(endpoints);
        }
    }

    /// One sync: addresses on the device, then listeners, then health servers. Returns false
    /// if something must be retried.
    async fn sync(&mut self, snapshot: &Arc<Snapshot>) -> bool {
        let start = Instant::now();
        let mut ok = true;
        // Frontends bound before the reply path existed are re-applied: a full sync.
        let reapply = self.source_ip.update(self.last.as_deref(), snapshot);
        let last = self.last.as_ref().filter(|_| !reapply && self.last_full.elapsed() < FULL_RESYNC);
        let device = match last {
            Some(last) if self.device.is_synced() => {
                let mut changes = host::frontend_address_changes(last, snapshot);
                changes.remove.retain(|ip| !self.extra_addresses.contains(ip));
                self.device.update(&changes.add, &changes.remove).await
            }
            _ => {
                let mut want = host::frontend_addresses(snapshot);
                want.extend(&self.extra_addresses);
                self.device.sync(&want).await
            }
        };
        match device {
            Ok(stats) => tracing::debug!(?stats, "VIP device synced"),
            Err(error) => {
                tracing::warn!(%error, "VIP device sync failed; will retry");
                ok = false;
            }
        }
        let errors = match last {
            Some(_) => self.manager.apply_changes(snapshot),
            None => {
                self.last_full = start;
                self.manager.apply(snapshot)
            }
        };
        ok &= errors.is_empty();
        let elapsed = start.elapsed();
        self.metrics.record_sync(elapsed);
        self.metrics.record_no_local_endpoints(self.last.as_deref(), snapshot);
        self.health.observe_node(snapshot);
        if ok {
            self.health.updated();
        }
        let health_errors = self.service_health.sync(snapshot).await;
        for error in &health_errors {
            tracing::warn!(%error, "healthCheckNodePort server could not bind; will retry");
        }
        if ok && let Some(last) = &self.last {
            self.record_programming_latency(last, snapshot);
        }
        self.last = Some(snapshot.clone());
        tracing::debug!(version = snapshot.version, elapsed_us = elapsed.as_micros() as u64, "synced");
        // A health port still held by another process (a predecessor that opened it after the
        // handoff) is retried like the rest, without waiting for the next change.
        ok && health_errors.is_empty()
    }
}

impl Syncer {
    /// `kubeproxy_network_programming_duration_seconds`: for every service whose newest
    /// EndpointSlice trigger time changed since the last sync, the time from that trigger to now
    /// (the moment the data path uses the change), as kube-proxy measures it.
    fn record_programming_latency(&self, old: &Snapshot, new: &Snapshot) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for item in old.services.diff(&new.services) {
            let (before, after) = match item {
                imbl::ordmap::DiffItem::Update { old: (_, a), new: (_, b) } => {
                    (a.last_change_trigger_time_ms, b)
                }
                imbl::ordmap::DiffItem::Add(_, b) => (None, b),
                imbl::ordmap::DiffItem::Remove(..) => continue,
            };
            let Some(trigger) = after.last_change_trigger_time_ms.filter(|t| Some(*t) != before) else {
                continue;
            };
            // A trigger time ahead of this node's clock (skew) is not a latency.
            let Some(elapsed) = now_ms.checked_sub(trigger) else { continue };
            let v6 = after
                .ports
                .first()
                .and_then(|p| p.frontends.iter().find_map(|f| f.socket_addr()))
                .is_some_and(|a| a.is_ipv6());
            let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
            self.metrics.record_network_programming(family, std::time::Duration::from_millis(elapsed));
        }
    }
}

/// Source-IP preservation (`--preserve-source-ip`): connections of outside clients to local
/// endpoints of `externalTrafficPolicy: Local` frontends are made from the client's address, which
/// needs a reply path on the host ([`host::source_ip::ensure`]: an nftables socket-lookup mark rule
/// and a policy route). Every packet on the node pays for that path (a socket lookup, and the loss
/// of the kernel's no-policy-rules fast path), so it is installed only when the first Service that
/// needs it appears, and kept after that: removing it would strand the replies of connections
/// already made that way. `ferry node --cleanup` removes it.
enum SourceIp {
    /// Not wanted, or the host cannot be programmed: endpoints see a node address.
    Off,
    /// Wanted, not installed yet; the switch turns transparency on in the frontend filter.
    Wanted(Arc<std::sync::atomic::AtomicBool>),
    /// Installed.
    Installed,
}

impl SourceIp {
    /// Installs the reply path when `snapshot` is the first to need it (only the Services changed
    /// since `last` are looked at). Returns whether it was installed now, in which case frontends
    /// already bound must be applied again.
    fn update(&mut self, last: Option<&Snapshot>, snapshot: &Snapshot) -> bool {
        let Self::Wanted(switch) = self else { return false };
        let needed = match last {
            Some(last) => last.services.diff(&snapshot.services).any(|item| match item {
                imbl::ordmap::DiffItem::Add(_, s) | imbl::ordmap::DiffItem::Update { new: (_, s), .. } => {
                    needs_source_ip(s)
                }
                imbl::ordmap::DiffItem::Remove(..) => false,
            }),
            None => snapshot.services.values().any(|s| needs_source_ip(s)),
        };
        if !needed {
            return false;
        }
        match host::source_ip::ensure() {
            Ok(()) => {
                switch.store(true, std::sync::atomic::Ordering::Release);
                tracing::info!("programmed the source-IP reply path for externalTrafficPolicy: Local");
                *self = Self::Installed;
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot program the source-IP reply path; local endpoints of \
                    externalTrafficPolicy: Local frontends will see a node address");
                *self = Self::Off;
                false
            }
        }
    }
}

/// Whether `service` has an `externalTrafficPolicy: Local` port reachable from outside the cluster.
fn needs_source_ip(service: &ferry_model::Service) -> bool {
    service.ports.iter().any(|p| {
        p.external_traffic_policy == ferry_model::TrafficPolicy::Local
            && p.frontends.iter().any(|f| {
                matches!(
                    f,
                    ferry_model::Frontend::NodePort(_)
                        | ferry_model::Frontend::LoadBalancer(_)
                        | ferry_model::Frontend::ExternalIp(_)
                )
            })
    })
}

/// Services whose ports changed, and services whose endpoints changed, between two snapshots
/// (persistent maps: unchanged subtrees are skipped, so this is O(changes), not O(services)).
fn changes(old: &Snapshot, new: &Snapshot) -> (u64, u64) {
    let (mut services, mut endpoints) = (0, 0);
    for item in old.services.diff(&new.services) {
        match item {
            imbl::ordmap::DiffItem::Update { old: (_, a), new: (_, b) } => {
                let same_shape = a.ports.len() == b.ports.len()
                    && a.ports
                        .iter()
                        .zip(&b.ports)
                        .all(|(p, q)| p.frontends == q.frontends && p.session_affinity == q.session_affinity);
                let same_endpoints = a.ports.len() == b.ports.len()
                    && a.ports.iter().zip(&b.ports).all(|(p, q)| p.endpoints == q.endpoints);
                services += u64::from(!same_shape);
                endpoints += u64::from(!same_endpoints);
            }
            _ => services += 1,
        }
    }
    (services, endpoints)
}

/// Resolves `--nodeport-addresses`: `primary` takes the Node object's addresses; CIDRs select
/// the node's interface addresses inside them.
async fn node_port_addresses(
    spec: &[String],
    snapshot: &Snapshot,
    vip_device: &str,
) -> anyhow::Result<Vec<IpAddr>> {
    if spec.iter().all(|s| s.trim() == "primary") {
        let addresses = snapshot.node_status.as_ref().map(|s| s.addresses.clone()).unwrap_or_default();
        if addresses.is_empty() {
            tracing::warn!(
                "--nodeport-addresses primary: no Node object with status.addresses for this node; NodePorts are not served"
            );
        }
        return Ok(addresses);
    }
    let cidrs = spec
        .iter()
        .map(|s| {
            s.trim()
                .parse::<ipnet::IpNet>()
                .with_context(|| format!("--nodeport-addresses: {s:?} is not a CIDR"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let local = host::local_addresses(Some(vip_device)).await.context("listing the node addresses")?;
    Ok(local.into_iter().filter(|ip| cidrs.iter().any(|c| c.contains(ip))).collect())
}
