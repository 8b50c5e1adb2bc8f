//! Node programming for `ferry node`: the addresses of Service frontends on a dedicated local
//! device, and the sysctls that keep the node from answering ARP for them on other interfaces.
//!
//! Interception works by making every ClusterIP, externalIP and VIP-mode LoadBalancer IP a local
//! address: [`VipDevice`] holds each as a /32 or /128 on one device (`dummy`, or a port-less
//! `bridge` on kernels without `dummy`), and the listener manager binds one socket per frontend.
//!
//! - [`frontend_addresses`] turns a [`Snapshot`] into the set of addresses the device must hold
//!   (pure; the node reconciler calls it per snapshot).
//! - [`VipDevice::ensure`] adopts or creates the device and applies [`configure_arp`];
//!   [`VipDevice::sync`] makes the device's addresses equal to a wanted set, touching only the
//!   difference; [`frontend_address_changes`] and [`VipDevice::update`] do the same for one
//!   snapshot change in time proportional to the change; [`VipDevice::cleanup`] removes the
//!   device (`ferry node --cleanup`).
//!
//! Invariants:
//! - The device is Ferry's alone: every global address on it is either wanted or removed by the
//!   next `sync`. IPv6 link-local addresses the kernel generates are left alone. `ensure` and
//!   `cleanup` refuse a link that is not a `dummy` or a port-less `bridge`, so a mistyped
//!   device name cannot strip a real interface.
//! - Every operation is idempotent, so retrying after any [`HostError`] is safe;
//!   [`HostError::is_transient`] says whether a retry can be expected to help.
//! - A restart adopts the existing device and its addresses: no address disappears between the old
//!   process exiting and the new one's first `sync`.
//!
//! ARP and NDP: with the weak host model Linux answers ARP on any interface for any local
//! address, so [`configure_arp`] sets `net.ipv4.conf.all.arp_ignore=1` (answer only for addresses
//! on the receiving interface) and `arp_announce=2` (never use a VIP as the source of ARP
//! requests), as kube-proxy's IPVS mode does. IPv6 needs nothing: the kernel's neighbour
//! discovery answers a solicitation only for an address configured on the receiving interface
//! (`ndisc_recv_ns` looks the target up with the receiving device), which the tests check.

mod device;
pub mod source_ip;
mod sysctl;

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr},
};

use ferry_model::{Frontend, FrontendKey, Protocol, ServicePort, Snapshot};
use imbl::ordmap::DiffItem;

pub use self::{
    device::{DeviceKind, SyncStats, VipDevice, local_addresses},
    sysctl::{SysctlChange, configure_arp},
};

/// Every ClusterIP, externalIP and LoadBalancer address that `snapshot` serves: what the
/// [`VipDevice`] must hold. Listener frontends (bound on addresses the operator owns) and
/// NodePorts (served on node addresses) are not included.
///
/// Only frontends that won their key count: an address whose only frontend lost to a Listener
/// at the same socket address is not added.
pub fn frontend_addresses(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for (key, port) in &snapshot.frontends {
        if let FrontendKey::Addr(_, addr) = *key
            && serves(key, port)
        {
            out.insert(addr.ip());
        }
    }
    out
}

/// Addresses to add to and remove from the [`VipDevice`] between two snapshots
/// ([`VipDevice::update`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressChanges {
    /// Addresses `new` serves and `old` did not.
    pub add: BTreeSet<IpAddr>,
    /// Addresses `old` served and `new` does not.
    pub remove: BTreeSet<IpAddr>,
}

/// What changes in [`frontend_addresses`] from `old` to `new`, in time proportional to the
/// frontends that changed (persistent maps: unchanged subtrees are skipped) rather than to all
/// of them: each address of a changed frontend is looked up in both snapshots by range.
pub fn frontend_address_changes(old: &Snapshot, new: &Snapshot) -> AddressChanges {
    let mut touched = BTreeSet::new();
    for item in old.frontends.diff(&new.frontends) {
        let (DiffItem::Add(key, _) | DiffItem::Remove(key, _) | DiffItem::Update { new: (key, _), .. }) =
            item;
        if let FrontendKey::Addr(_, addr) = *key {
            touched.insert(addr.ip());
        }
    }
    let mut changes = AddressChanges::default();
    for ip in touched {
        match (serves_address(old, ip), serves_address(new, ip)) {
            (false, true) => changes.add.insert(ip),
            (true, false) => changes.remove.insert(ip),
            _ => false,
        };
    }
    changes
}

/// Whether `ip` is in [`frontend_addresses`]`(snapshot)`: O(log frontends + frontends on `ip`).
fn serves_address(snapshot: &Snapshot, ip: IpAddr) -> bool {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].into_iter().any(|protocol| {
        let from = FrontendKey::Addr(protocol, SocketAddr::new(ip, 0));
        let to = FrontendKey::Addr(protocol, SocketAddr::new(ip, u16::MAX));
        snapshot.frontends.range(from..=to).any(|(key, port)| serves(key, port))
    })
}

/// Whether frontend `key` of `port` puts its address on the device.
fn serves(key: &FrontendKey, port: &ServicePort) -> bool {
    let FrontendKey::Addr(_, addr) = *key else { return false };
    port.frontends.iter().any(|f| {
        matches!(*f, Frontend::ClusterIp(a) | Frontend::ExternalIp(a) | Frontend::LoadBalancer(a) if a == addr)
    })
}

/// A failure to program the node. Every operation is idempotent: retrying is always safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The device name is not a valid Linux interface name. Retrying cannot help.
    #[error("invalid device name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Opening the rtnetlink socket failed.
    #[error("netlink connection failed: {0}")]
    Connect(#[source] io::Error),
    /// A link of that name exists but is not one Ferry may own.
    #[error("link {name} is a {kind} device, not a dummy or a port-less bridge; refusing to manage it")]
    ForeignLink {
        /// The device name.
        name: String,
        /// What it is (`kind` from `IFLA_LINKINFO`, or a description).
        kind: String,
    },
    /// [`VipDevice::update`] without a known address set (no successful `sync` yet, or the last
    /// call failed): call [`VipDevice::sync`] with the full set. Retrying `update` cannot help.
    #[error("addresses of {name} not known since the last error; a full sync is needed")]
    Unsynced {
        /// The device name.
        name: String,
    },
    /// The device disappeared (someone deleted it); call [`VipDevice::ensure`] again.
    #[error("link {name} vanished")]
    LinkGone {
        /// The device name.
        name: String,
    },
    /// A netlink request failed.
    #[error("{op} on {name}: {source}")]
    Netlink {
        /// What was attempted (`link lookup`, `link create (dummy)`, `address add of 10.96.0.1/32`...).
        op: String,
        /// The device name.
        name: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// Reading or writing a sysctl under `/proc/sys` failed.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The file.
        path: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A helper program (`nft`, `ip`) failed or could not be run.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output, or why it could not start.
        detail: String,
    },
}

// === impl HostError ===

impl HostError {
    /// The kernel's errno, when the kernel refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Connect(e) | Self::Sysctl { source: e, .. } => e.raw_os_error(),
            Self::InvalidName { .. }
            | Self::ForeignLink { .. }
            | Self::LinkGone { .. }
            | Self::Unsynced { .. }
            | Self::Command { .. } => None,
        }
    }

    /// Whether retrying may succeed: false for configuration errors (bad name, foreign link,
    /// missing privileges, unsupported by the kernel), true otherwise.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::InvalidName { .. } | Self::ForeignLink { .. } | Self::Unsynced { .. } => false,
            _ => !matches!(
                self.errno(),
                Some(libc::EPERM | libc::EACCES | libc::EOPNOTSUPP | libc::EINVAL | libc::EROFS)
            ),
        }
    }
}

/// The positive errno of a netlink error reply.
fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
