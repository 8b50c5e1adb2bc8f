//! The cluster zone: every name Ferry is authoritative for, derived once per [`Snapshot`] version.
//!
//! [`Zone::build`] turns the Snapshot's DNS view into one hash map from lowercased wire names to
//! pre-encoded records; [`Zone::answer`] is then one hash lookup and a few `memcpy`s. A zone is
//! immutable; the server swaps in a new one for every published Snapshot.
//!
//! Records and negative answers follow `/work/shared/reference/ingress-dns.md` §1 (kubernetes/dns
//! specification 1.1.0 plus CoreDNS behaviour):
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA from `clusterIPs`; for headless Services one record per ready
//!   endpoint (no ready endpoint: the name does not exist); ExternalName: a CNAME, chased.
//! - `<host>.<svc>.<ns>.svc.<zone>`: each ready endpoint, by `hostname` or its dashed IP.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports; SRV on the bare service name
//!   for every port. Priority 0, weight ⌊100/N⌋ (at least 1).
//! - PTR for ClusterIPs (they win) and then ready endpoints.
//! - `<a-b-c-d>.<ns>.pod.<zone>` A (and dashed IPv6 AAAA), synthesised from the name (`pods insecure`).
//! - `dns-version.<zone>` TXT `1.1.0`; the apex has SOA and NS.
//! - NODATA (with SOA) for existing names without the type asked: the apex, `svc.<zone>`,
//!   `pod.<zone>`, `<ns>.svc.<zone>` of namespaces with Services, and every name above.
//!   Every other name inside the zone is NXDOMAIN (with SOA).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ferry_model::{DnsKind, Protocol, Snapshot};

use crate::{
    forward::Forwarded,
    wire::{self, Query, Rcode, Writer, rtype},
};

/// CNAME chains followed inside the zone (CoreDNS: 10).
const MAX_CHAIN: usize = 10;
/// SRV targets whose addresses go into the additional section, at most.
const MAX_SRV_ADDITIONALS: usize = 16;
/// TTL of the `dns-version` TXT record (CoreDNS hard-codes it).
const VERSION_TTL: u32 = 28_800;

/// How the zone is built.
#[derive(Clone, Debug)]
pub(crate) struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub(crate) domain: String,
    /// TTL of every record (and the SOA minimum).
    pub(crate) ttl: u32,
}

/// One owner name's records.
#[derive(Debug, Default)]
struct Node {
    /// Records without owner (type..rdata), with their type.
    rrs: Vec<(u16, Box<[u8]>)>,
    /// An ExternalName's CNAME.
    cname: Option<Cname>,
}

#[derive(Debug)]
struct Cname {
    /// The CNAME record without owner.
    rr: Box<[u8]>,
    /// Target in wire form, case as configured.
    target: Box<[u8]>,
    /// Target lowercased.
    target_key: Box<[u8]>,
    /// Target in presentation form (for the forwarder).
    target_text: Box<str>,
}

/// What [`Zone::answer`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A complete response was written.
    Answered(Rcode),
    /// The name is not in the zone (or its reverse zones): forward it.
    NotInZone,
    /// A CNAME chain was written and leads out of the zone: resolve `target` upstream and append.
    Chase {
        /// Target name, presentation form.
        target: Box<str>,
    },
}

/// The immutable cluster zone of one Snapshot version.
#[derive(Debug)]
pub(crate) struct Zone {
    /// The Snapshot version this was built from.
    pub(crate) version: u64,
    origin_key: Box<[u8]>,
    nodes: HashMap<Box<[u8]>, Node>,
    /// The SOA record with its owner (negative answers' authority section).
    soa: Box<[u8]>,
    ttl: u32,
}

const IN_ADDR: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6: &[u8] = b"\x03ip6\x04arpa\x00";

impl Zone {
    /// An empty zone answering nothing (before a configuration is known). Used in tests.
    #[cfg(test)]
    pub(crate) fn empty(config: &ZoneConfig) -> Self {
        Self::build(&Snapshot::default(), config)
    }

    /// Builds the zone of `snapshot`.
    pub(crate) fn build(snapshot: &Snapshot, config: &ZoneConfig) -> Self {
        let domain = config.domain.trim_end_matches('.');
        let ttl = config.ttl;
        let mut b =
            Builder { nodes: HashMap::new(), ttl, cluster_ips: HashMap::new(), endpoint_ptrs: Vec::new() };
        let origin = wire::encode_name(domain).unwrap_or_else(|| vec![0]);
        let mut origin_key = origin.clone();
        wire::lowercase(&mut origin_key);

        // Apex, SOA, NS, dns-version, the svc and pod subdomains.
        let mname = name(&["ns", "dns", domain]);
        let rname = name(&["hostmaster", domain]);
        let serial = u32::try_from(snapshot.version % u64::from(u32::MAX)).unwrap_or(0);
        let soa_rdata = wire::soa_rdata(&mname, &rname, serial, ttl);
        let soa_rr = wire::rr(rtype::SOA, ttl.min(300), &soa_rdata);
        b.add(&origin, rtype::SOA, soa_rr.clone());
        b.add(&origin, rtype::NS, wire::rr(rtype::NS, ttl, &mname));
        b.add(
            &name(&["dns-version", domain]),
            rtype::TXT,
            wire::rr(rtype::TXT, VERSION_TTL, &wire::txt_rdata("1.1.0")),
        );
        b.exists(&name(&["svc", domain]));
        b.exists(&name(&["pod", domain]));
        let mut soa = origin.clone();
        soa.extend_from_slice(&soa_rr);

        for (key, svc) in &snapshot.dns {
            let (ns, svc_name) = (&*key.namespace, &*key.name);
            b.exists(&name(&[ns, "svc", domain]));
            let fqdn_text = format!("{svc_name}.{ns}.svc.{domain}");
            let Some(fqdn) = wire::encode_name(&fqdn_text) else { continue };
            match &svc.kind {
                DnsKind::ExternalName(target) => {
                    if target.parse::<IpAddr>().is_ok() {
                        continue;
                    }
                    let Some(target_wire) = wire::encode_name(target) else { continue };
                    let mut target_key = target_wire.clone();
                    wire::lowercase(&mut target_key);
                    let node = b.node(&fqdn);
                    node.cname = Some(Cname {
                        rr: wire::rr(rtype::CNAME, ttl, &target_wire).into(),
                        target: target_wire.into(),
                        target_key: target_key.into(),
                        target_text: target.trim_end_matches('.').into(),
                    });
                }
                DnsKind::ClusterIp(ips) => {
                    for ip in ips {
                        b.address(&fqdn, *ip);
                        b.cluster_ips.entry(*ip).or_default().push(fqdn.clone());
                    }
                    let n = svc.ports.len();
                    for p in &svc.ports {
                        b.add(&fqdn, rtype::SRV, srv(ttl, n, p.port, &fqdn));
                        if !p.name.is_empty()
                            && let Some(owner) = srv_owner(&p.name, p.protocol, &fqdn_text)
                        {
                            b.add(&owner, rtype::SRV, srv(ttl, 1, p.port, &fqdn));
                        }
                    }
                    for e in svc.endpoints.iter().filter(|e| e.ready) {
                        if let Some(host) = host_name(e.hostname.as_deref(), e.ip, &fqdn_text) {
                            b.address(&host, e.ip);
                        }
                    }
                }
                DnsKind::Headless => {
                    let ready: Vec<_> = svc.endpoints.iter().filter(|e| e.ready).collect();
                    if ready.is_empty() {
                        continue;
                    }
                    let total: usize = ready.iter().map(|e| e.ports.len()).sum();
                    for e in &ready {
                        b.address(&fqdn, e.ip);
                        let Some(host) = host_name(e.hostname.as_deref(), e.ip, &fqdn_text) else { continue };
                        b.address(&host, e.ip);
                        b.endpoint_ptrs.push((e.ip, host.clone()));
                        for p in e.ports.iter() {
                            b.add(&fqdn, rtype::SRV, srv(ttl, total, p.port, &host));
                            if let Some(owner) = srv_owner(&p.name, p.protocol, &fqdn_text) {
                                let per_port = ready
                                    .iter()
                                    .filter(|o| {
                                        o.ports.iter().any(|q| q.name == p.name && q.protocol == p.protocol)
                                    })
                                    .count();
                                b.add(&owner, rtype::SRV, srv(ttl, per_port, p.port, &host));
                            }
                        }
                    }
                }
            }
            if !matches!(svc.kind, DnsKind::Headless) {
                for e in svc.endpoints.iter().filter(|e| e.ready) {
                    if let Some(host) = host_name(e.hostname.as_deref(), e.ip, &fqdn_text) {
                        b.endpoint_ptrs.push((e.ip, host));
                    }
                }
            }
        }
        b.finish_ptrs();
        for node in b.nodes.values_mut() {
            node.rrs.sort_unstable();
            node.rrs.dedup();
        }
        Self {
            version: snapshot.version,
            origin_key: origin_key.into(),
            nodes: b.nodes,
            soa: soa.into(),
            ttl,
        }
    }

    /// Answers `q` (the raw message is `msg`) into `buf` when the name is in the zone.
    ///
    /// `limit` is the largest response allowed (TC is set beyond it). `chased` is the upstream answer
    /// for a CNAME target outside the zone, from an earlier [`Outcome::Chase`].
    pub(crate) fn answer(
        &self,
        msg: &[u8],
        q: &Query,
        buf: &mut Vec<u8>,
        limit: usize,
        chased: Option<&Forwarded>,
    ) -> Outcome {
        let in_zone = q.labels_before(&self.origin_key);
        let reverse = q.labels_before(IN_ADDR).is_some() || q.labels_before(IP6).is_some();
        let Some(depth) = in_zone else {
            if reverse && let Some(node) = self.nodes.get(q.key()) {
                return self.node_answer(msg, q, buf, node, limit, chased);
            }
            return Outcome::NotInZone;
        };
        if matches!(q.qtype, rtype::AXFR | rtype::IXFR) {
            Writer::start(buf, msg, q, Rcode::Refused, true).finish(q, limit);
            return Outcome::Answered(Rcode::Refused);
        }
        if let Some(node) = self.nodes.get(q.key()) {
            return self.node_answer(msg, q, buf, node, limit, chased);
        }
        if depth == 3
            && q.label(2) == Some(b"pod")
            && let Some(ip) = q.label(0).and_then(parse_dashed)
        {
            let t = if ip.is_ipv4() { rtype::A } else { rtype::AAAA };
            let mut w = Writer::start(buf, msg, q, Rcode::NoError, true);
            if q.qtype == t || q.qtype == rtype::ANY {
                w.answer_at_qname(&address_rr(ip, self.ttl));
            } else {
                w.authority(&self.soa);
            }
            w.finish(q, limit);
            return Outcome::Answered(Rcode::NoError);
        }
        self.negative(msg, q, buf, Rcode::NxDomain, limit)
    }

    fn negative(&self, msg: &[u8], q: &Query, buf: &mut Vec<u8>, rcode: Rcode, limit: usize) -> Outcome {
        let mut w = Writer::start(buf, msg, q, rcode, true);
        w.authority(&self.soa);
        w.finish(q, limit);
        Outcome::Answered(rcode)
    }

    fn node_answer(
        &self,
        msg: &[u8],
        q: &Query,
        buf: &mut Vec<u8>,
        node: &Node,
        limit: usize,
        chased: Option<&Forwarded>,
    ) -> Outcome {
        if let Some(cname) = &node.cname {
            if !matches!(q.qtype, rtype::A | rtype::AAAA | rtype::CNAME | rtype::ANY) {
                return self.negative(msg, q, buf, Rcode::NoError, limit);
            }
            let mut w = Writer::start(buf, msg, q, Rcode::NoError, true);
            w.answer_at_qname(&cname.rr);
            if q.qtype == rtype::CNAME {
                w.finish(q, limit);
                return Outcome::Answered(Rcode::NoError);
            }
            let mut current = cname;
            for _ in 0..MAX_CHAIN {
                if !current.target_key.ends_with(&self.origin_key) {
                    let Some(f) = chased else {
                        return Outcome::Chase { target: current.target_text.clone() };
                    };
                    w.raw_answers(&f.answers, f.answer_count);
                    w.finish(q, limit);
                    return Outcome::Answered(Rcode::NoError);
                }
                let Some(next) = self.nodes.get(&current.target_key) else { break };
                match &next.cname {
                    Some(c) if c.target_key != current.target_key => {
                        w.answer(&current.target, &c.rr);
                        current = c;
                    }
                    Some(_) => break,
                    None => {
                        write_rrs(&mut w, next, q.qtype, Some(&current.target));
                        break;
                    }
                }
            }
            w.finish(q, limit);
            return Outcome::Answered(Rcode::NoError);
        }
        let mut w = Writer::start(buf, msg, q, Rcode::NoError, true);
        if write_rrs(&mut w, node, q.qtype, None) == 0 {
            w.authority(&self.soa);
        } else if q.qtype == rtype::SRV {
            self.srv_additionals(&mut w, node);
        }
        w.finish(q, limit);
        Outcome::Answered(Rcode::NoError)
    }

    /// The A/AAAA records of SRV targets, in the additional section (spec §2.3.2: "MAY"; CoreDNS
    /// and Knot add them). At most [`MAX_SRV_ADDITIONALS`] targets; `finish` drops them all if
    /// they do not fit.
    fn srv_additionals(&self, w: &mut Writer<'_>, node: &Node) {
        let mut seen: [&[u8]; MAX_SRV_ADDITIONALS] = [&[]; MAX_SRV_ADDITIONALS];
        let mut count = 0;
        for (_, rr) in node.rrs.iter().filter(|(t, _)| *t == rtype::SRV) {
            // type, class, ttl, rdlength (10) + priority, weight, port (6), then the target.
            let Some(target) = rr.get(16..) else { continue };
            if count == MAX_SRV_ADDITIONALS {
                break;
            }
            if seen[..count].contains(&target) {
                continue;
            }
            seen[count] = target;
            count += 1;
            let mut key = [0u8; wire::MAX_NAME];
            let Some(key) = key.get_mut(..target.len()) else { continue };
            key.copy_from_slice(target);
            wire::lowercase(key);
            if let Some(t) = self.nodes.get(&*key) {
                for (_, a) in t.rrs.iter().filter(|(t, _)| matches!(*t, rtype::A | rtype::AAAA)) {
                    w.additional(target, a);
                }
            }
        }
    }

    /// Whether the lowercased wire name is inside this zone (for the chase limit).
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.nodes.contains_key(key)
    }
}

/// Writes the records of `node` of type `qtype` (all for ANY), A/AAAA rotated by a random offset.
/// Returns how many were written.
fn write_rrs(w: &mut Writer<'_>, node: &Node, qtype: u16, owner: Option<&[u8]>) -> usize {
    let matching = |t: u16| qtype == rtype::ANY || t == qtype;
    let n = node.rrs.iter().filter(|(t, _)| matching(*t)).count();
    if n == 0 {
        return 0;
    }
    let offset = if n > 1 && matches!(qtype, rtype::A | rtype::AAAA) { fastrand::usize(..n) } else { 0 };
    let it = node.rrs.iter().filter(|(t, _)| matching(*t));
    for (_, rr) in it.clone().skip(offset).chain(it.take(offset)) {
        match owner {
            Some(o) => w.answer(o, rr),
            None => w.answer_at_qname(rr),
        }
    }
    n
}

struct Builder {
    nodes: HashMap<Box<[u8]>, Node>,
    ttl: u32,
    cluster_ips: HashMap<IpAddr, Vec<Vec<u8>>>,
    endpoint_ptrs: Vec<(IpAddr, Vec<u8>)>,
}

impl Builder {
    fn node(&mut self, owner: &[u8]) -> &mut Node {
        let mut key = owner.to_vec();
        wire::lowercase(&mut key);
        self.nodes.entry(key.into()).or_default()
    }

    fn exists(&mut self, owner: &[u8]) {
        self.node(owner);
    }

    fn add(&mut self, owner: &[u8], t: u16, rr: Vec<u8>) {
        let node = self.node(owner);
        node.rrs.push((t, rr.into()));
    }

    fn address(&mut self, owner: &[u8], ip: IpAddr) {
        let t = if ip.is_ipv4() { rtype::A } else { rtype::AAAA };
        self.add(owner, t, address_rr(ip, self.ttl));
    }
}

impl Builder {
    /// PTR records: ClusterIPs win; other IPs get one PTR per (Service, endpoint) holding them.
    fn finish_ptrs(&mut self) {
        let cluster_ips = std::mem::take(&mut self.cluster_ips);
        for (ip, names) in &cluster_ips {
            let owner = reverse_name(*ip);
            for target in names {
                self.add(&owner, rtype::PTR, wire::rr(rtype::PTR, self.ttl, target));
            }
        }
        for (ip, target) in std::mem::take(&mut self.endpoint_ptrs) {
            if !cluster_ips.contains_key(&ip) {
                self.add(&reverse_name(ip), rtype::PTR, wire::rr(rtype::PTR, self.ttl, &target));
            }
        }
    }
}

fn name(parts: &[&str]) -> Vec<u8> {
    wire::encode_name(&parts.join(".")).unwrap_or_else(|| vec![0])
}

fn address_rr(ip: IpAddr, ttl: u32) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => wire::rr(rtype::A, ttl, &v4.octets()),
        IpAddr::V6(v6) => wire::rr(rtype::AAAA, ttl, &v6.octets()),
    }
}

fn srv(ttl: u32, n: usize, port: u16, target: &[u8]) -> Vec<u8> {
    let weight = u16::try_from(100 / n.max(1)).unwrap_or(1).max(1);
    wire::rr(rtype::SRV, ttl, &wire::srv_rdata(0, weight, port, target))
}

fn srv_owner(port_name: &str, protocol: Protocol, fqdn: &str) -> Option<Vec<u8>> {
    if port_name.is_empty() {
        return None;
    }
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    wire::encode_name(&format!("_{port_name}._{proto}.{fqdn}"))
}

/// `<hostname>.<fqdn>`, the hostname defaulting to the dashed IP (CoreDNS `endpointHostname`).
fn host_name(hostname: Option<&str>, ip: IpAddr, fqdn: &str) -> Option<Vec<u8>> {
    let label = match hostname.filter(|h| !h.is_empty()) {
        Some(h) => h.to_owned(),
        None => dashed(ip),
    };
    wire::encode_name(&format!("{label}.{fqdn}"))
}

/// `1-2-3-4`; IPv6 with `:` replaced by `-` (a trailing `-` gets a `0`).
fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => {
            let mut s = v6.to_string().replace(':', "-");
            if s.ends_with('-') {
                s.push('0');
            }
            if s.starts_with('-') {
                s.insert(0, '0');
            }
            s
        }
    }
}

/// Parses a dashed IPv4 (`10-0-0-1`) or IPv6 (`fd00--1`) pod label.
fn parse_dashed(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    let dotted = s.replace('-', ".");
    if let Ok(v4) = dotted.parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    s.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The reverse name of `ip` (`4.3.2.1.in-addr.arpa`, 32 nibbles for IPv6), in wire form.
fn reverse_name(ip: IpAddr) -> Vec<u8> {
    let mut s = String::new();
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let _ = write!(s, "{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(s, "{:x}.{:x}.", byte & 0xF, byte >> 4);
            }
            s.push_str("ip6.arpa");
        }
    }
    wire::encode_name(&s).unwrap_or_else(|| vec![0])
}

#[cfg(test)]
mod tests;
