//! Metric handles, created once per server (never per query).
//!
//! - `ferry_dns_queries_total{qtype, rcode}`: answered queries.
//! - `ferry_dns_request_duration_seconds`: receive-to-send latency.
//! - `ferry_dns_dropped_total`: messages dropped unanswered (malformed, oversized, over limits).
//! - `ferry_dns_zone_version`: the Snapshot version the cluster zone was built from, and
//!   `ferry_dns_zone_build_duration_seconds`: how long each rebuild took.
//! - `ferry_dns_upstream_errors_total`: forwarded lookups that failed (timeouts, SERVFAIL, ...).
//! - The forwarder's cache: hickory-resolver's `hickory_resolver_cache_hit_total`,
//!   `hickory_resolver_cache_miss_total` and `hickory_resolver_response_cache_size`.

use std::time::Instant;

use metrics::{Counter, Histogram};

use crate::wire::{Rcode, rtype};

/// Query types with their own label; everything else is `other`.
const QTYPES: [(u16, &str); 10] = [
    (rtype::A, "A"),
    (rtype::AAAA, "AAAA"),
    (rtype::SRV, "SRV"),
    (rtype::PTR, "PTR"),
    (rtype::CNAME, "CNAME"),
    (rtype::TXT, "TXT"),
    (rtype::SOA, "SOA"),
    (rtype::NS, "NS"),
    (rtype::ANY, "ANY"),
    (0, "other"),
];

/// Every handle the server records into.
#[derive(Debug)]
pub(crate) struct Metrics {
    queries: Vec<Counter>,
    duration: Histogram,
    pub(crate) dropped: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut queries = Vec::with_capacity(QTYPES.len() * Rcode::ALL.len());
        for (_, qtype) in QTYPES {
            for rcode in Rcode::ALL {
                queries.push(
                    metrics::counter!("ferry_dns_queries_total", "qtype" => qtype, "rcode" => rcode.as_str()),
                );
            }
        }
        Self {
            queries,
            duration: metrics::histogram!("ferry_dns_request_duration_seconds"),
            dropped: metrics::counter!("ferry_dns_dropped_total"),
        }
    }

    /// Records one answered query (`qtype` 0 when it did not parse).
    pub(crate) fn record(&self, qtype: u16, rcode: Rcode, start: Instant) {
        let t = QTYPES.iter().position(|(t, _)| *t == qtype).unwrap_or(QTYPES.len() - 1);
        let r = Rcode::ALL.iter().position(|r| *r == rcode).unwrap_or(0);
        if let Some(c) = self.queries.get(t * Rcode::ALL.len() + r) {
            c.increment(1);
        }
        self.duration.record(start.elapsed().as_secs_f64());
    }
}
