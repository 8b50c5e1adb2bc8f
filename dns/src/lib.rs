//! Cluster DNS answered from the [`Snapshot`]: service names (ClusterIP, dual-stack, headless,
//! ExternalName CNAMEs), endpoint host names, SRV, PTR, pod records and `dns-version`, with
//! CoreDNS's NXDOMAIN/NODATA rules, over UDP and TCP; other names are forwarded upstream with a
//! bounded cache.
//!
//! Entry point: [`serve`] with already-bound [`Sockets`], a [`SnapshotFeed`] and a shutdown token.
//! The zone is rebuilt for every published Snapshot and swapped in atomically; answering reads it
//! without locks. This is the only crate that names hickory types: hickory-resolver does the
//! forwarding, and the cluster-zone hot path uses Ferry's own wire code (`wire`).
//!
//! Module map: `wire` (parse and write messages), `zone` (the cluster zone and its answers),
//! `forward` (upstream resolution), `server` (UDP/TCP loops), `metrics`.

mod forward;
mod metrics;
mod mmsg;
mod server;
mod wire;
mod zone;

use std::sync::Arc;

use ferry_model::Snapshot;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_util::sync::CancellationToken;

pub use crate::forward::{ForwardError, Upstreams};
use crate::{
    server::Shared,
    zone::{Zone, ZoneConfig},
};

/// Default record TTL (kubeadm's CoreDNS `ttl 30`).
pub const DEFAULT_TTL: u32 = 30;
/// Default cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// Default number of forwarded answers cached.
pub const DEFAULT_CACHE_SIZE: u64 = 9984;

/// How the DNS server behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DnsConfig {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// TTL of cluster-zone records, and the SOA minimum (negative-caching TTL).
    pub ttl: u32,
    /// Where names outside the cluster zone are forwarded.
    pub upstreams: Upstreams,
    /// Forwarded answers cached (positive and negative), at most.
    pub cache_size: u64,
    /// Threads receiving on each UDP socket (default: one per CPU).
    pub udp_threads: Option<usize>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_owned(),
            ttl: DEFAULT_TTL,
            upstreams: Upstreams::None,
            cache_size: DEFAULT_CACHE_SIZE,
            udp_threads: None,
        }
    }
}

/// Already-bound sockets to serve on (UDP and TCP normally share a port).
#[derive(Debug, Default)]
pub struct Sockets {
    /// UDP sockets, not registered with tokio: each is served by blocking threads, so it is
    /// made blocking, with a receive timeout for shutdown checks.
    pub udp: Vec<std::net::UdpSocket>,
    /// TCP listeners.
    pub tcp: Vec<TcpListener>,
}

/// The Snapshots to serve.
#[derive(Debug)]
pub struct SnapshotFeed {
    /// Every published Snapshot.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Whether the receiver's current value is already a synced Snapshot. When `false`, the
    /// cluster zone answers SERVFAIL until the next one is published.
    pub synced: bool,
}

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The upstream configuration is unusable (see [`ForwardError`]; fix it and restart).
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The cluster domain is not a valid DNS name (a configuration error).
    #[error("invalid cluster domain {0:?}")]
    Domain(String),
    /// A UDP socket could not be prepared (cloned or made blocking); retrying will not help.
    #[error("preparing a UDP socket: {0}")]
    Socket(#[source] std::io::Error),
}

/// Serves DNS on `sockets` until `shutdown` is cancelled, following `feed`.
///
/// Returns once every loop has stopped. Errors only at startup (configuration).
pub async fn serve(
    config: DnsConfig,
    sockets: Sockets,
    feed: SnapshotFeed,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let domain = config.domain.trim_end_matches('.').to_owned();
    let mut origin_key = wire::encode_name(&domain).ok_or_else(|| DnsError::Domain(config.domain.clone()))?;
    wire::lowercase(&mut origin_key);
    let forwarder = forward::Forwarder::new(&config.upstreams, config.cache_size)?;
    let zone_config = ZoneConfig { domain, ttl: config.ttl };
    let shared = Arc::new(Shared {
        zone: arc_swap::ArcSwapOption::empty(),
        origin_key: origin_key.into(),
        forwarder,
        metrics: metrics::Metrics::new(),
        forwards: Semaphore::new(server::MAX_INFLIGHT_FORWARDS),
        tcp_connections: Arc::new(Semaphore::new(server::MAX_TCP_CONNECTIONS)),
    });
    let SnapshotFeed { snapshots: mut rx, synced } = feed;
    let zone_version = ::metrics::gauge!("ferry_dns_zone_version");
    let build_duration = ::metrics::histogram!("ferry_dns_zone_build_duration_seconds");
    if synced {
        let snapshot = rx.borrow_and_update().clone();
        let start = std::time::Instant::now();
        shared.zone.store(Some(Arc::new(Zone::build(&snapshot, &zone_config))));
        zone_version.set(snapshot.version as f64);
        build_duration.record(start.elapsed().as_secs_f64());
        tracing::info!(
            version = snapshot.version,
            services = snapshot.dns.len(),
            elapsed_us = start.elapsed().as_micros() as u64,
            "cluster zone built"
        );
    }

    let mut tasks = tokio::task::JoinSet::new();
    let threads =
        config.udp_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let rt = tokio::runtime::Handle::current();
    for socket in sockets.udp {
        let socket = Arc::new(server::blocking_udp(socket).map_err(DnsError::Socket)?);
        for _ in 0..threads.max(1) {
            let socket = socket.clone();
            let (shared, rt, shutdown) = (shared.clone(), rt.clone(), shutdown.clone());
            tasks.spawn_blocking(move || server::udp_loop(&shared, &socket, &rt, &shutdown));
        }
    }
    for listener in sockets.tcp {
        tasks.spawn(server::tcp_loop(shared.clone(), listener, shutdown.clone()));
    }
    let follower = shared.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = stop.cancelled() => return,
            }
            let snapshot = rx.borrow_and_update().clone();
            // O(Services + endpoints): off the async workers, which also serve TCP and forwarding.
            // Snapshots published meanwhile coalesce: the next round takes the latest.
            let start = std::time::Instant::now();
            let cfg = zone_config.clone();
            let Ok(zone) = tokio::task::spawn_blocking(move || Zone::build(&snapshot, &cfg)).await else {
                return;
            };
            let version = zone.version;
            follower.zone.store(Some(Arc::new(zone)));
            zone_version.set(version as f64);
            build_duration.record(start.elapsed().as_secs_f64());
            tracing::debug!(version, elapsed_us = start.elapsed().as_micros() as u64, "cluster zone rebuilt");
        }
    });
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests;

/// The query path without sockets, for the fuzz target (`fuzz/`) and its regression tests. Not
/// part of Ferry's API.
#[doc(hidden)]
pub mod fuzzing {
    use ferry_model::Snapshot;

    use crate::{
        forward::Forwarded,
        wire::{self, Rcode, Reject, Writer},
        zone::{Outcome, Zone, ZoneConfig},
    };

    /// A zone and a response buffer.
    #[derive(Debug)]
    pub struct Harness {
        zone: Zone,
        buf: Vec<u8>,
    }

    impl Harness {
        /// The zone of `snapshot` under `cluster.local`.
        pub fn new(snapshot: &Snapshot) -> Self {
            let config = ZoneConfig { domain: crate::DEFAULT_DOMAIN.to_owned(), ttl: crate::DEFAULT_TTL };
            Self { zone: Zone::build(snapshot, &config), buf: Vec::new() }
        }

        /// Handles `msg` as a UDP query would be; returns the response (`None`: dropped).
        ///
        /// # Panics
        /// When a response exceeds the UDP size limit it was written for.
        pub fn answer(&mut self, msg: &[u8]) -> Option<&[u8]> {
            match wire::parse(msg) {
                Ok(q) => {
                    let limit = q.udp_limit();
                    match self.zone.answer(msg, &q, &mut self.buf, limit, None) {
                        Outcome::Answered(_) => {}
                        Outcome::NotInZone => {
                            Writer::start(&mut self.buf, msg, &q, Rcode::Refused, false).finish(&q, limit);
                        }
                        Outcome::Chase { .. } => {
                            let empty = Forwarded::empty(Rcode::NoError);
                            self.zone.answer(msg, &q, &mut self.buf, limit, Some(&empty));
                        }
                    }
                    assert!(
                        self.buf.len() <= limit,
                        "response of {} bytes over the limit {limit}",
                        self.buf.len()
                    );
                }
                Err((Reject::Drop, _)) => return None,
                Err((Reject::Code(rcode), end)) => Writer::error_only(&mut self.buf, msg, rcode, end),
                Err((Reject::BadVers, end)) => wire::badvers(&mut self.buf, msg, end),
            }
            Some(&self.buf)
        }
    }
}
