//! What cluster DNS needs from a Service: its kind and addresses, its named ports, and every
//! endpoint with its hostname and readiness, independent of the proxy's per-port, per-family view.
//!
//! Built by [`Index::build`](crate::index::Index::build) together with the rest of the
//! [`Snapshot`](crate::snapshot::Snapshot) (field `dns`), so a DNS reader sees exactly the
//! version the proxy sees. Read by the `ferry-dns` crate, which derives its zone from it.
//!
//! Rules (kubernetes/dns `specification.md` 1.1.0 and CoreDNS):
//! - `type: ExternalName` is [`DnsKind::ExternalName`] with `spec.externalName` verbatim (trimmed of
//!   a trailing dot); headless (`clusterIP: None` or no parseable cluster IP) is
//!   [`DnsKind::Headless`]; anything else is [`DnsKind::ClusterIp`] with `spec.clusterIPs` in order.
//! - Endpoints come from every EndpointSlice of the Service, deduplicated by IP (the first slice
//!   by name wins; an endpoint is ready if any slice says so). `publishNotReadyAddresses: true`
//!   marks every endpoint ready (the EndpointSlice controller does the same).
//! - Each endpoint keeps the named ports of its slice (slice ports without a name are dropped by
//!   the translation), which is what headless SRV records answer with.

use std::{net::IpAddr, sync::Arc};

use crate::service::Protocol;

/// The DNS view of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsService {
    /// ClusterIP, headless or ExternalName.
    pub kind: DnsKind,
    /// `spec.ports` (named or not), in order.
    pub ports: Vec<DnsPort>,
    /// Endpoints of all slices, deduplicated by IP, sorted by IP.
    pub endpoints: Vec<DnsEndpoint>,
}

/// What a Service's own name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsKind {
    /// `spec.clusterIPs` (at least one), primary first.
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: the name resolves to the ready endpoints.
    Headless,
    /// `type: ExternalName`: a CNAME to this name (may be an IP literal, which gives no record).
    ExternalName(Arc<str>),
}

/// One port: a Service port, or an EndpointSlice port (the target port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPort {
    /// The port name (empty when unnamed).
    pub name: Arc<str>,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The port number.
    pub port: u16,
}

/// One endpoint address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsEndpoint {
    /// `addresses[0]`.
    pub ip: IpAddr,
    /// The endpoint's `hostname` field.
    pub hostname: Option<Arc<str>>,
    /// `conditions.ready` (nil = true), or `publishNotReadyAddresses`.
    pub ready: bool,
    /// The named ports of the slice this endpoint came from.
    pub ports: Arc<[DnsPort]>,
}
