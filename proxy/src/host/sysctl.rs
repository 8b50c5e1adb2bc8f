//! The ARP sysctls that keep the node from answering for VIPs on its other interfaces.
//!
//! `/proc/sys/net` belongs to the network namespace of the thread that opens it, so these calls
//! configure the caller's namespace. Values are only raised, never lowered: an operator's
//! stricter setting is kept. The kernel uses the maximum of `all` and the per-interface value
//! for both knobs, so setting `all` covers every interface.

use std::fs;

use super::HostError;

/// Answer ARP only for addresses configured on the receiving interface.
const ARP_IGNORE: (&str, u32) = ("/proc/sys/net/ipv4/conf/all/arp_ignore", 1);
/// Use the best local address of the outgoing interface as the source of ARP requests.
const ARP_ANNOUNCE: (&str, u32) = ("/proc/sys/net/ipv4/conf/all/arp_announce", 2);

/// One sysctl [`configure_arp`] raised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlChange {
    /// The file under `/proc/sys`.
    pub path: &'static str,
    /// The value before.
    pub from: u32,
    /// The value written.
    pub to: u32,
}

/// Raises `net.ipv4.conf.all.arp_ignore` to 1 and `net.ipv4.conf.all.arp_announce` to 2 where
/// they are lower (as kube-proxy's IPVS mode does), in the caller's network namespace; returns
/// what changed (empty when nothing had to). Blocking, but only on procfs.
pub fn configure_arp() -> Result<Vec<SysctlChange>, HostError> {
    let mut changes = Vec::new();
    for (path, want) in [ARP_IGNORE, ARP_ANNOUNCE] {
        if let Some(change) = raise(path, want)? {
            tracing::info!(path, from = change.from, to = change.to, "raised ARP sysctl");
            changes.push(change);
        }
    }
    Ok(changes)
}

/// The current value of a numeric sysctl.
pub(super) fn read(path: &'static str) -> Result<u32, HostError> {
    let text = fs::read_to_string(path).map_err(|source| HostError::Sysctl { path, source })?;
    text.trim().parse().map_err(|_| HostError::Sysctl {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a number: {text:?}")),
    })
}

fn raise(path: &'static str, want: u32) -> Result<Option<SysctlChange>, HostError> {
    let from = read(path)?;
    if from >= want {
        return Ok(None);
    }
    fs::write(path, format!("{want}\n")).map_err(|source| HostError::Sysctl { path, source })?;
    Ok(Some(SysctlChange { path, from, to: want }))
}
