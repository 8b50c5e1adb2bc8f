//! `ferry node`'s frontends: which Service frontends this node serves, on which sockets, over
//! which endpoints — kube-proxy's traffic-policy rules (reference `kubeproxy.md` §2, "How the
//! proxiers consume it").
//!
//! [`NodeFrontends`] is the [`FrontendFilter`] of `ferry node`. For every frontend of a port:
//!
//! | frontend | sockets | endpoints |
//! |---|---|---|
//! | ClusterIP | its address | `iTP=Cluster`: cluster set; `iTP=Local`: local set |
//! | NodePort | every node-port address of the port's family | external rules below |
//! | externalIP | its address | external rules below |
//! | LoadBalancer (VIP mode) | its address | source ranges, then external rules below |
//! | Ferry `Listener` | none (served by `ferry lb`) | |
//!
//! External rules: `eTP=Cluster` -> cluster set. `eTP=Local` -> clients whose address is in
//! [`NodeConfig::local_sources`] (pod CIDRs and the node's own addresses: kube-proxy's
//! detect-local plus `--src-type LOCAL`), or whose address is the frontend's own (the node's own
//! connection to a local VIP comes from the VIP), get the cluster set (the "short-circuit");
//! everyone else gets the local set.
//!
//! `loadBalancerSourceRanges` apply to LoadBalancer frontends only (as kube-proxy). A client
//! outside every range is dropped. When a node address (a [`NodeConfig::node_port_addresses`]
//! entry, or a single-address entry of [`NodeConfig::local_sources`]) is inside a range, the LB IP
//! itself is allowed as a source too (the node's own traffic to a local VIP comes from the VIP).
//!
//! No endpoints at all (`!has_any`): the frontend is **not bound**, so the kernel refuses at once
//! (TCP RST, UDP ICMP port unreachable), like kube-proxy's REJECT. The manager closes the socket
//! when the last endpoint goes and binds it again when one comes back. A chosen set that is empty
//! while `has_any` (a Local policy without local endpoints) **drops**: UDP datagrams are
//! discarded, TCP connections are held silently and closed with FIN (see [`crate::tcp`]).
//!
//! Every socket is bound with `IP_FREEBIND`, so binding does not wait for the host programming
//! to put the address on the device.
//!
//! Source-IP preservation ([`NodeFrontends::with_transparent`], off by default): for
//! `externalTrafficPolicy: Local`, an external client's connection to a *local* endpoint is made
//! from the client's IP (`IP_TRANSPARENT` socket bound to `client-ip:0`), as kube-proxy's DNAT
//! without SNAT preserves it. Ferry needs `CAP_NET_ADMIN` for this (without it: a warning, and the
//! connection comes from a node address), and the node needs policy routing so that the
//! endpoint's replies to the client's address come back to Ferry's socket instead of being routed
//! out to the client, which Ferry does not program:
//!
//! ```text
//! # replies from local pods to non-local addresses are delivered locally
//! iptables -t mangle -A PREROUTING -i <pod-bridge/veth+> -p tcp -m socket --transparent -j MARK --set-mark 0x1
//! ip rule add fwmark 0x1 lookup 100
//! ip route add local 0.0.0.0/0 dev lo table 100      # and the same with -6 for IPv6
//! ```
//!
//! The client's source *port* is not kept (the kernel picks one), and the PROXY protocol (when
//! enabled) still carries the full client address. Short-circuited (in-cluster) clients and
//! `externalTrafficPolicy: Cluster` connect from a node address, as kube-proxy masquerades them.
//!
//! NodePort family: a NodePort frontend key carries the family of its `ServicePort` (that of its
//! ClusterIPs; a dual-stack Service has one port per family, see `ferry_model::kube`), and is
//! bound on the node-port addresses of that family only, as kube-proxy's per-family proxiers do.

pub mod proxy_protocol;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use ferry_model::{Endpoint, Frontend, FrontendKey, ServicePort, TrafficPolicy};
use ipnet::IpNet;

use crate::{
    manager::{Binding, FrontendFilter},
    state::Hold,
};

/// What `ferry node` needs to know about the node to choose bindings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Addresses NodePorts are served on (`--nodeport-addresses`, resolved to addresses).
    pub node_port_addresses: Vec<IpAddr>,
    /// Sources treated as in-cluster for the `externalTrafficPolicy: Local` short-circuit: the
    /// pod CIDRs and the node's own addresses.
    pub local_sources: Vec<IpNet>,
}

/// The [`FrontendFilter`] of `ferry node` (see the module docs).
#[derive(Clone, Debug)]
pub struct NodeFrontends {
    node_port_addresses: Arc<[IpAddr]>,
    local_sources: Arc<[IpNet]>,
    /// Node addresses, for the LB-IP-as-source rule of source ranges.
    node_addresses: Arc<[IpAddr]>,
    hold: Hold,
    freebind: bool,
    /// Shared with the node loop, which turns it on once the host is programmed for it.
    transparent: Arc<AtomicBool>,
}

// === impl NodeFrontends ===

impl NodeFrontends {
    /// A filter for a node described by `config`, holding dropped connections with the default
    /// [`Hold`] bounds and binding with `IP_FREEBIND`.
    pub fn new(config: NodeConfig) -> Self {
        let mut node_addresses = config.node_port_addresses.clone();
        node_addresses.extend(
            config.local_sources.iter().filter(|n| n.prefix_len() == n.max_prefix_len()).map(IpNet::addr),
        );
        node_addresses.sort_unstable();
        node_addresses.dedup();
        Self {
            node_port_addresses: config.node_port_addresses.into(),
            local_sources: config.local_sources.into(),
            node_addresses: node_addresses.into(),
            hold: Hold::default(),
            freebind: true,
            transparent: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the bounds on held (dropped) TCP connections.
    #[must_use]
    pub fn with_hold(mut self, hold: Hold) -> Self {
        self.hold = hold;
        self
    }

    /// Binds without `IP_FREEBIND` when `false` (the addresses must then be local already).
    #[must_use]
    pub fn with_freebind(mut self, freebind: bool) -> Self {
        self.freebind = freebind;
        self
    }

    /// With `true`, connections of external clients to local endpoints (`externalTrafficPolicy:
    /// Local`) come from the client's own address (see the module docs on source-IP preservation).
    #[must_use]
    pub fn with_transparent(self, transparent: bool) -> Self {
        self.transparent.store(transparent, Ordering::Release);
        self
    }

    /// The switch behind [`with_transparent`](Self::with_transparent), for turning source-IP
    /// preservation on later (once the reply path is programmed). Frontends bound before the switch
    /// keep what they had until they are applied again.
    pub fn transparency(&self) -> Arc<AtomicBool> {
        self.transparent.clone()
    }

    fn binding(&self, addr: std::net::SocketAddr, endpoints: Arc<[Endpoint]>) -> Binding {
        let mut b = Binding::new(addr, endpoints);
        b.drop_when_empty = true;
        b.hold = self.hold;
        b.freebind = self.freebind;
        b
    }

    /// A binding on `addr` with the external rules (eTP) of `port`.
    fn external(&self, addr: std::net::SocketAddr, port: &ServicePort) -> Binding {
        let eps = &port.endpoints;
        match port.external_traffic_policy {
            TrafficPolicy::Cluster => self.binding(addr, eps.cluster.clone()),
            TrafficPolicy::Local => {
                let mut b = self.binding(addr, eps.local.clone());
                // Short-circuited to the cluster set: pods, the node's addresses, and the frontend's
                // own address, which is the source the node itself uses for a local VIP (as
                // kube-proxy's `--src-type LOCAL` / `fib saddr type local`).
                let own = IpNet::from(addr.ip());
                let internal: Arc<[IpNet]> = if self.local_sources.contains(&own) {
                    self.local_sources.clone()
                } else {
                    self.local_sources.iter().copied().chain([own]).collect()
                };
                b.internal = Some((internal, eps.cluster.clone()));
                b.transparent = self.transparent.load(Ordering::Acquire);
                b
            }
        }
    }

    /// `loadBalancerSourceRanges` of `port` as allowed sources of its LB IP `lb`, if any.
    fn source_ranges(&self, lb: IpAddr, port: &ServicePort) -> Option<Arc<[IpNet]>> {
        let ranges = &port.load_balancer_source_ranges;
        if ranges.is_empty() {
            return None;
        }
        let mut allowed = ranges.clone();
        if self.node_addresses.iter().any(|a| ranges.iter().any(|r| r.contains(a))) {
            allowed.push(IpNet::from(lb));
        }
        Some(allowed.into())
    }
}

/// The address family of `port`: that of its address-bearing frontends, else of its endpoints.
fn family_is_v4(port: &ServicePort) -> Option<bool> {
    port.frontends
        .iter()
        .find_map(|f| f.socket_addr())
        .map(|a| a.is_ipv4())
        .or_else(|| port.endpoints.all.first().map(|e| e.addr.is_ipv4()))
}

impl FrontendFilter for NodeFrontends {
    fn bindings(&self, key: &FrontendKey, port: &ServicePort, out: &mut Vec<Binding>) {
        if !port.endpoints.has_any {
            // Unbound: the kernel refuses at once (REJECT).
            return;
        }
        match *key {
            FrontendKey::NodePort(_, node_port, _) => {
                if !port.frontends.contains(&Frontend::NodePort(node_port)) {
                    return;
                }
                let v4 = family_is_v4(port);
                for ip in self.node_port_addresses.iter().filter(|ip| v4.is_none_or(|v4| ip.is_ipv4() == v4))
                {
                    out.push(self.external(std::net::SocketAddr::new(*ip, node_port), port));
                }
            }
            FrontendKey::Addr(_, addr) => {
                let has = |f: Frontend| port.frontends.contains(&f);
                if has(Frontend::ClusterIp(addr)) {
                    let endpoints = match port.internal_traffic_policy {
                        TrafficPolicy::Cluster => port.endpoints.cluster.clone(),
                        TrafficPolicy::Local => port.endpoints.local.clone(),
                    };
                    out.push(self.binding(addr, endpoints));
                } else if has(Frontend::ExternalIp(addr)) {
                    out.push(self.external(addr, port));
                } else if has(Frontend::LoadBalancer(addr)) {
                    let mut b = self.external(addr, port);
                    b.allowed_sources = self.source_ranges(addr.ip(), port);
                    out.push(b);
                }
                // Listener frontends are `ferry lb`'s.
            }
        }
    }
}

#[cfg(test)]
mod tests;
