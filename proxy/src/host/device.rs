//! [`VipDevice`]: one local link holding every frontend address as a /32 or /128.
//!
//! Owns an rtnetlink connection (its task runs on the caller's tokio runtime and is aborted on
//! drop). [`VipDevice::sync`] reads the device's addresses from the kernel (the kernel is the
//! record, and a restart adopts it) and makes them equal to a wanted set: O(addresses).
//! [`VipDevice::update`] adds and removes given addresses without a dump: O(changes), for
//! single-Service changes at scale. It trusts the set the last successful `sync`/`update` left
//! (kept in the handle); any error forgets that set, so the caller must `sync` again, which
//! re-reads the kernel and repairs whatever drifted.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, stream};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkDummy, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        route::RouteType,
    },
};
use tokio::task::AbortHandle;

use super::{HostError, netlink_errno, sysctl};

/// Address requests in flight at once during a sync (one netlink socket; acks are matched by
/// sequence number). Bounds the kernel's reply backlog.
const CONCURRENCY: usize = 32;

/// How long [`VipDevice::sync`] waits for new IPv6 addresses to become local.
const LOCAL_ROUTE_DEADLINE: Duration = Duration::from_secs(2);

/// The link type of a [`VipDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceKind {
    /// `dummy`: the natural choice, a device that drops what it is sent.
    Dummy,
    /// A `bridge` without ports: for kernels built without `dummy`.
    Bridge,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dummy => "dummy",
            Self::Bridge => "bridge",
        })
    }
}

/// What one [`VipDevice::sync`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Addresses added.
    pub added: usize,
    /// Addresses removed (including wanted addresses held with a shorter prefix, which are
    /// re-added as /32 or /128 and also counted in `added`).
    pub removed: usize,
    /// Wanted addresses that were already there.
    pub unchanged: usize,
}

/// The local device that makes frontend addresses local. See the [module docs](super).
pub struct VipDevice {
    handle: Handle,
    /// The netlink connection's task; aborted when the device handle is dropped.
    _conn: AbortOnDrop,
    name: String,
    index: u32,
    kind: DeviceKind,
    created: bool,
    sysctl_changes: Vec<sysctl::SysctlChange>,
    /// The device's global addresses (all /32 or /128) as of the last successful `sync` or
    /// `update`; `None` before the first and after any error.
    current: Option<BTreeSet<IpAddr>>,
}

impl fmt::Debug for VipDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VipDevice")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("kind", &self.kind)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

// === impl VipDevice ===

impl VipDevice {
    /// Adopts the link `name` if it exists (keeping its addresses), else creates it as `dummy`,
    /// or as a port-less `bridge` when the kernel has no `dummy`; sets it up; raises the ARP
    /// sysctls ([`super::configure_arp`]). Must run inside a tokio runtime, on a thread in the
    /// network namespace to program.
    pub async fn ensure(name: &str) -> Result<Self, HostError> {
        validate_name(name)?;
        let (handle, conn) = connect()?;
        let mut dev = match find_link(&handle, name).await? {
            Some(link) => {
                let kind = owned_kind(&handle, name, &link).await?;
                tracing::info!(device = name, %kind, "adopting existing VIP device");
                Self::new(handle, conn, name, link.header.index, kind, false)
            }
            None => {
                create(&handle, name).await?;
                let Some(link) = find_link(&handle, name).await? else {
                    return Err(HostError::LinkGone { name: name.to_owned() });
                };
                // Asked of the kernel rather than assumed: a concurrent creator may have won.
                let kind = owned_kind(&handle, name, &link).await?;
                Self::new(handle, conn, name, link.header.index, kind, true)
            }
        };
        dev.set_up().await?;
        dev.sysctl_changes = sysctl::configure_arp()?;
        Ok(dev)
    }

    /// Makes the device's addresses exactly `want`: removes every address not in `want` (or held
    /// with a shorter prefix), then adds each missing one as a /32 or /128 (IPv6 with
    /// `IFA_F_NODAD`). Only the difference is touched; a second identical call changes nothing.
    /// IPv6 link-local addresses are ignored. Returns once every added address can be bound and
    /// routes as local (for IPv6 that takes a bounded wait, see `wait_local`), so callers may
    /// bind and serve at once. After an error, part of the difference may be applied; calling
    /// again finishes it.
    ///
    /// Fails with [`HostError::LinkGone`] when the device was deleted behind Ferry's back.
    pub async fn sync(&mut self, want: &BTreeSet<IpAddr>) -> Result<SyncStats, HostError> {
        self.current = None;
        let stats = self.sync_inner(want).await?;
        self.current = Some(want.clone());
        Ok(stats)
    }

    /// Adds the addresses of `add` and removes those of `remove` (an address in both is added),
    /// without reading the device: O(changes). Addresses already as wanted are left alone
    /// (counted `unchanged`). Returns, like [`VipDevice::sync`], once added addresses are local.
    ///
    /// Needs the device's address set from a successful [`VipDevice::sync`] or `update`: without
    /// one (none yet, or the last call failed) it fails with [`HostError::Unsynced`] and touches
    /// nothing; call `sync` with the full set then.
    pub async fn update(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
    ) -> Result<SyncStats, HostError> {
        let Some(mut current) = self.current.take() else {
            return Err(HostError::Unsynced { name: self.name.clone() });
        };
        let mut stats = SyncStats::default();
        let stale: Vec<IpAddr> =
            remove.iter().copied().filter(|ip| !add.contains(ip) && current.contains(ip)).collect();
        stats.unchanged += remove.len() - stale.len() - remove.iter().filter(|ip| add.contains(ip)).count();
        let results: Vec<Result<bool, HostError>> = stream::iter(stale.iter().copied())
            .map(|ip| self.del(ip, address_message(self.index, ip)))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for r in results {
            stats.removed += usize::from(r?);
        }
        for ip in &stale {
            current.remove(ip);
        }
        let missing: Vec<IpAddr> = add.iter().copied().filter(|ip| !current.contains(ip)).collect();
        stats.unchanged += add.len() - missing.len();
        let added_v6 = self.add_all(missing.iter().copied(), &mut stats).await?;
        current.extend(missing);
        self.wait_local(added_v6).await?;
        self.current = Some(current);
        Ok(stats)
    }

    /// Whether [`VipDevice::update`] can be used (a successful `sync` or `update` came last).
    pub fn is_synced(&self) -> bool {
        self.current.is_some()
    }

    async fn sync_inner(&mut self, want: &BTreeSet<IpAddr>) -> Result<SyncStats, HostError> {
        let current = self.addresses().await?;
        let mut stats = SyncStats::default();
        let mut present = BTreeSet::new();
        let mut stale = Vec::new();
        for (ip, msg) in current {
            if want.contains(&ip) && msg.header.prefix_len == full_prefix(ip) {
                present.insert(ip);
            } else {
                stale.push((ip, msg));
            }
        }
        stats.unchanged = present.len();

        // Removals first: an IPv6 address held with a wrong prefix must go before its /128 can
        // be added. Wanted addresses with the right prefix are never touched, so no gap.
        let results: Vec<Result<bool, HostError>> = stream::iter(stale)
            .map(|(ip, msg)| self.del(ip, msg))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for r in results {
            stats.removed += usize::from(r?);
        }

        let missing = want.iter().copied().filter(|ip| !present.contains(ip));
        let added_v6 = self.add_all(missing, &mut stats).await?;
        self.wait_local(added_v6).await?;
        if stats.added + stats.removed > 0 {
            tracing::debug!(
                device = %self.name,
                added = stats.added,
                removed = stats.removed,
                unchanged = stats.unchanged,
                "synced VIP addresses"
            );
        }
        Ok(stats)
    }

    /// Adds every address of `ips` (counting into `stats`); returns the IPv6 ones added.
    async fn add_all(
        &self,
        ips: impl Iterator<Item = IpAddr>,
        stats: &mut SyncStats,
    ) -> Result<Vec<IpAddr>, HostError> {
        let results: Vec<Result<(IpAddr, bool), HostError>> = stream::iter(ips)
            .map(|ip| async move { Ok((ip, self.add(ip).await?)) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut added_v6 = Vec::new();
        for r in results {
            match r? {
                (ip, true) => {
                    stats.added += 1;
                    if ip.is_ipv6() {
                        added_v6.push(ip);
                    }
                }
                (_, false) => stats.unchanged += 1,
            }
        }
        Ok(added_v6)
    }

    /// Deletes the link `name` (`ferry node --cleanup`); `Ok(false)` if there is none. Refuses a
    /// link that is not a `dummy` or a port-less `bridge`. Leaves the ARP sysctls as they are
    /// (kube-proxy does not restore them either).
    pub async fn cleanup(name: &str) -> Result<bool, HostError> {
        validate_name(name)?;
        let (handle, _conn) = connect()?;
        let Some(link) = find_link(&handle, name).await? else { return Ok(false) };
        let kind = owned_kind(&handle, name, &link).await?;
        match handle.link().del(link.header.index).execute().await {
            Ok(()) => {
                tracing::info!(device = name, %kind, "deleted VIP device");
                Ok(true)
            }
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(source) => {
                Err(HostError::Netlink { op: "link delete".into(), name: name.to_owned(), source })
            }
        }
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device's link type.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Whether `ensure` created the device (false: it adopted an existing one).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The ARP sysctls `ensure` raised (empty when they already had the wanted values).
    pub fn sysctl_changes(&self) -> &[sysctl::SysctlChange] {
        &self.sysctl_changes
    }

    /// The device's current addresses (any prefix length), except IPv6 link-local ones.
    pub async fn current_addresses(&self) -> Result<BTreeSet<IpAddr>, HostError> {
        Ok(self.addresses().await?.into_iter().map(|(ip, _)| ip).collect())
    }

    fn new(
        handle: Handle,
        conn: AbortOnDrop,
        name: &str,
        index: u32,
        kind: DeviceKind,
        created: bool,
    ) -> Self {
        Self {
            handle,
            _conn: conn,
            name: name.to_owned(),
            index,
            kind,
            created,
            sysctl_changes: Vec::new(),
            current: None,
        }
    }

    async fn set_up(&self) -> Result<(), HostError> {
        let msg = LinkUnspec::new_with_index(self.index).up().build();
        self.handle.link().set(msg).execute().await.map_err(|e| self.err("link set up", e))
    }

    async fn addresses(&self) -> Result<Vec<(IpAddr, AddressMessage)>, HostError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("address list", e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| address_of(&m).map(|ip| (ip, m)))
            .filter(|(ip, _)| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect())
    }

    /// Adds `ip` as a full-length prefix; false if it was there already (a concurrent writer).
    async fn add(&self, ip: IpAddr) -> Result<bool, HostError> {
        let prefix = full_prefix(ip);
        let mut req = self.handle.address().add(self.index, ip, prefix);
        if ip.is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(self.err(&format!("address add of {ip}/{prefix}"), e)),
        }
    }

    /// Waits (bounded by [`LOCAL_ROUTE_DEADLINE`]) until each of `pending` routes as local.
    ///
    /// The kernel acknowledges an IPv6 address before it installs its local route: even without
    /// DAD that happens in the addrconf work queue, while the /128 prefix route is already in
    /// place. A connection opened in that window is sent to neighbour discovery on the device
    /// and fails after ~3 s. IPv4 local routes are installed before the ack, so only IPv6 waits.
    /// On timeout this logs and returns: the address is there and will become local.
    async fn wait_local(&self, mut pending: Vec<IpAddr>) -> Result<(), HostError> {
        let deadline = tokio::time::Instant::now() + LOCAL_ROUTE_DEADLINE;
        while !pending.is_empty() {
            let checks: Vec<Result<Option<IpAddr>, HostError>> = stream::iter(pending)
                .map(|ip| async move { Ok((!self.routes_local(ip).await?).then_some(ip)) })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            pending = checks.into_iter().filter_map(Result::transpose).collect::<Result<_, _>>()?;
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(device = %self.name, pending = pending.len(), "IPv6 addresses not local yet");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Whether the kernel routes `ip` as a local address (`ip route get`).
    async fn routes_local(&self, ip: IpAddr) -> Result<bool, HostError> {
        let query = match ip {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(v4, 32).build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(v6, 128).build(),
        };
        let mut routes = self.handle.route().get(query).execute();
        match routes.try_next().await {
            Ok(route) => Ok(route.is_some_and(|r| r.header.kind == RouteType::Local)),
            // No route at all yet (or unreachable): not local.
            Err(e) if matches!(netlink_errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(false),
            Err(e) => Err(self.err(&format!("route lookup of {ip}"), e)),
        }
    }

    /// Deletes one address; false if it was gone already.
    async fn del(&self, ip: IpAddr, msg: AddressMessage) -> Result<bool, HostError> {
        let prefix = msg.header.prefix_len;
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(self.err(&format!("address delete of {ip}/{prefix}"), e)),
        }
    }

    fn err(&self, op: &str, source: rtnetlink::Error) -> HostError {
        if netlink_errno(&source) == Some(libc::ENODEV) {
            return HostError::LinkGone { name: self.name.clone() };
        }
        HostError::Netlink { op: op.to_owned(), name: self.name.clone(), source }
    }
}

/// Aborts a netlink connection task when dropped (also on early error returns).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn validate_name(name: &str) -> Result<(), HostError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 15 {
        "longer than 15 bytes"
    } else if name == "." || name == ".." {
        "reserved"
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        "contains '/', ':' or whitespace"
    } else {
        return Ok(());
    };
    Err(HostError::InvalidName { name: name.to_owned(), reason })
}

fn connect() -> Result<(Handle, AbortOnDrop), HostError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(HostError::Connect)?;
    let task = tokio::spawn(conn);
    Ok((handle, AbortOnDrop(task.abort_handle())))
}

/// The link called `name`, if any.
async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, HostError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(HostError::Netlink { op: "link lookup".into(), name: name.to_owned(), source }),
    }
}

/// The kind of an existing link, if Ferry may own it: a `dummy`, or a `bridge` without ports.
async fn owned_kind(handle: &Handle, name: &str, link: &LinkMessage) -> Result<DeviceKind, HostError> {
    let info_kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    });
    let foreign = |kind: String| HostError::ForeignLink { name: name.to_owned(), kind };
    match info_kind {
        Some(InfoKind::Dummy) => Ok(DeviceKind::Dummy),
        Some(InfoKind::Bridge) => {
            let index = link.header.index;
            let links: Vec<LinkMessage> =
                handle.link().get().execute().try_collect().await.map_err(|source| HostError::Netlink {
                    op: "link list".into(),
                    name: name.to_owned(),
                    source,
                })?;
            let ports = links
                .iter()
                .filter(|l| {
                    l.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(c) if *c == index))
                })
                .count();
            if ports > 0 {
                return Err(foreign(format!("bridge with {ports} port(s)")));
            }
            Ok(DeviceKind::Bridge)
        }
        Some(other) => Err(foreign(other.to_string())),
        None => Err(foreign("physical or untyped".to_owned())),
    }
}

/// Creates `name` as a `dummy`, or as a `bridge` when the kernel lacks `dummy`.
async fn create(handle: &Handle, name: &str) -> Result<(), HostError> {
    let dummy = LinkDummy::new(name).build();
    match handle.link().add(dummy).execute().await {
        Ok(()) => {
            tracing::info!(device = name, kind = "dummy", "created VIP device");
            return Ok(());
        }
        // Created concurrently: the caller's lookup decides whether it may be adopted.
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => return Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::EOPNOTSUPP) => {
            tracing::info!(device = name, "kernel has no dummy link type; using a port-less bridge");
        }
        Err(source) => {
            return Err(HostError::Netlink {
                op: "link create (dummy)".into(),
                name: name.to_owned(),
                source,
            });
        }
    }
    let bridge = LinkBridge::new(name).build();
    match handle.link().add(bridge).execute().await {
        Ok(()) => {
            tracing::info!(device = name, kind = "bridge", "created VIP device");
            Ok(())
        }
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(source) => {
            Err(HostError::Netlink { op: "link create (bridge)".into(), name: name.to_owned(), source })
        }
    }
}

/// The address an address message is about (`IFA_LOCAL`, else `IFA_ADDRESS`).
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// The message naming `ip` as a full-length address of link `index` (what `del` needs).
fn address_message(index: u32, ip: IpAddr) -> AddressMessage {
    match ip {
        IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new().index(index).address(v4, 32).build(),
        IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new().index(index).address(v6, 128).build(),
    }
}

/// 32 for IPv4, 128 for IPv6.
fn full_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Every global address on the node's interfaces, except those on `exclude` (the VIP device):
/// what `--nodeport-addresses CIDR` selects from.
pub async fn local_addresses(exclude: Option<&str>) -> Result<BTreeSet<IpAddr>, HostError> {
    let (handle, _conn) = connect()?;
    let skip = match exclude {
        Some(name) => {
            let mut links = handle.link().get().match_name(name.to_owned()).execute();
            match links.try_next().await {
                Ok(Some(link)) => Some(link.header.index),
                _ => None,
            }
        }
        None => None,
    };
    let msgs: Vec<AddressMessage> =
        handle.address().get().execute().try_collect().await.map_err(|source| HostError::Netlink {
            op: "address list".to_owned(),
            name: "all links".to_owned(),
            source,
        })?;
    Ok(msgs
        .iter()
        .filter(|m| Some(m.header.index) != skip)
        .filter_map(address_of)
        .filter(|ip| !ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect())
}
