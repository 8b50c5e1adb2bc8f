//! Forwarding names outside the cluster zone to upstream resolvers, through hickory-resolver.
//!
//! hickory-resolver keeps the cache (TTLs respected, negative answers cached for the SOA's
//! negative TTL, at most `cache_size` entries) and fails over between name servers. Cluster-zone
//! names never reach it, so a Snapshot change can never be hidden by a cached answer.
//!
//! The resolver is used as a stub: no search list, `ndots` 0, no hosts file, so the name asked is
//! the name forwarded.

use std::{net::SocketAddr, path::PathBuf, time::Instant};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{Name, Record, RecordType},
        serialize::binary::{BinEncodable, BinEncoder, NameEncoding},
    },
};

use crate::wire::Rcode;

/// Where forwarded queries go.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Upstreams {
    /// Do not forward: names outside the zone are REFUSED.
    #[default]
    None,
    /// The `nameserver` lines of a resolv.conf file (normally `/etc/resolv.conf`).
    ResolvConf(PathBuf),
    /// These servers, in order of preference.
    Servers(Vec<SocketAddr>),
}

/// Why the forwarder could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The resolv.conf file could not be read or parsed (a configuration problem: retrying
    /// does not help until the file is fixed).
    #[error("reading upstream servers from {path}: {message}")]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The list of upstream servers is empty.
    #[error("no upstream name servers configured")]
    NoServers,
}

/// A forwarded answer, ready to be written.
#[derive(Debug)]
pub(crate) struct Forwarded {
    pub(crate) rcode: Rcode,
    /// Answer records in wire form (uncompressed owners), TTLs counted down from the cache.
    pub(crate) answers: Vec<u8>,
    pub(crate) answer_count: u16,
    /// Authority records (the SOA of a negative answer).
    pub(crate) authorities: Vec<u8>,
    pub(crate) authority_count: u16,
}

impl Forwarded {
    /// No records.
    pub(crate) fn empty(rcode: Rcode) -> Self {
        Self { rcode, answers: Vec::new(), answer_count: 0, authorities: Vec::new(), authority_count: 0 }
    }
}

/// The forwarding resolver.
pub(crate) struct Forwarder {
    resolver: TokioResolver,
    upstream_errors: metrics::Counter,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Builds a forwarder, `None` for [`Upstreams::None`].
    pub(crate) fn new(upstreams: &Upstreams, cache_size: u64) -> Result<Option<Self>, ForwardError> {
        let config = match upstreams {
            Upstreams::None => return Ok(None),
            Upstreams::ResolvConf(path) => {
                let data = std::fs::read(path)
                    .map_err(|e| ForwardError::ResolvConf { path: path.clone(), message: e.to_string() })?;
                let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(data)
                    .map_err(|e| ForwardError::ResolvConf { path: path.clone(), message: e.to_string() })?;
                let (_, _, servers) = config.into_parts();
                ResolverConfig::from_name_servers(servers)
            }
            Upstreams::Servers(addrs) => ResolverConfig::from_name_servers(
                addrs
                    .iter()
                    .map(|a| {
                        let conn = |mut c: ConnectionConfig| {
                            c.port = a.port();
                            c
                        };
                        NameServerConfig::new(
                            a.ip(),
                            true,
                            vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                        )
                    })
                    .collect(),
            ),
        };
        if config.name_servers().is_empty() {
            return Err(ForwardError::NoServers);
        }
        let mut opts = ResolverOpts::default();
        opts.ndots = 0;
        opts.cache_size = cache_size;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.attempts = 2;
        opts.timeout = std::time::Duration::from_secs(2);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|_| ForwardError::NoServers)?;
        Ok(Some(Self { resolver, upstream_errors: metrics::counter!("ferry_dns_upstream_errors_total") }))
    }

    /// Resolves `name` (presentation form, fully qualified) for `qtype`.
    pub(crate) async fn resolve(&self, name: &str, qtype: u16) -> Forwarded {
        let mut out = Forwarded::empty(Rcode::ServFail);
        let Ok(mut fqdn) = Name::from_ascii(name) else {
            out.rcode = Rcode::FormErr;
            return out;
        };
        fqdn.set_fqdn(true);
        let now = Instant::now();
        match self.resolver.lookup(fqdn, RecordType::from(qtype)).await {
            Ok(lookup) => {
                let left = u32::try_from(lookup.valid_until().saturating_duration_since(now).as_secs())
                    .unwrap_or(u32::MAX);
                out.rcode = Rcode::NoError;
                for r in lookup.answers() {
                    if encode(r, left, &mut out.answers) {
                        out.answer_count += 1;
                    }
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
                out.rcode = match no.response_code {
                    ResponseCode::NXDomain => Rcode::NxDomain,
                    ResponseCode::NoError => Rcode::NoError,
                    ResponseCode::Refused => Rcode::Refused,
                    _ => Rcode::ServFail,
                };
                if let Some(soa) = no.soa {
                    let soa: Record = soa.into_record_of_rdata();
                    if encode(&soa, no.negative_ttl.unwrap_or(u32::MAX), &mut out.authorities) {
                        out.authority_count = 1;
                    }
                }
            }
            Err(error) => {
                self.upstream_errors.increment(1);
                tracing::debug!(%error, name, qtype, "upstream lookup failed");
            }
        }
        out
    }
}

/// Appends `r` in wire form (no compression) with its TTL capped at `max_ttl`.
fn encode(r: &Record, max_ttl: u32, out: &mut Vec<u8>) -> bool {
    let mut r = r.clone();
    r.ttl = r.ttl.min(max_ttl);
    let mark = out.len();
    let mut enc = BinEncoder::with_offset(out, u32::try_from(mark).unwrap_or(u32::MAX));
    enc.set_name_encoding(NameEncoding::Uncompressed);
    let ok = r.emit(&mut enc).is_ok();
    if !ok {
        out.truncate(mark);
    }
    ok
}
