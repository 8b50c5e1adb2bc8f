//! Tests of node programming. Each netlink test runs in a fresh network namespace of its own
//! thread ([`in_netns`]), which the kernel destroys with the thread, so nothing leaks even on
//! panic. They need root (CI runs as root) and fail loudly without it.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ferry_model::{Frontend, FrontendKey, Protocol, ServiceKey, Snapshot, listener::ValidListener};
use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        address::{AddressAttribute, AddressScope},
        link::{LinkFlags, LinkMessage},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use super::{DeviceKind, HostError, SyncStats, VipDevice, sysctl};

const DEV: &str = "ferry0";
const DEADLINE: Duration = Duration::from_secs(5);

/// Runs `test` on a new thread in a new, empty network namespace (with `lo` up), on a
/// current-thread runtime (no other threads, so every socket is in that namespace).
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        netns::unshare_net();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            lo_up().await;
            test().await;
        });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

mod netns {
    //! The only unsafe code of these tests: `unshare(2)`.
    #![allow(unsafe_code)]

    /// Moves the calling thread into a new network namespace.
    pub(super) fn unshare_net() {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            panic!("unshare(CLONE_NEWNET) failed: {err}; these tests must run as root (CI does)");
        }
    }
}

/// Brings `lo` up: local traffic, including ICMP errors a host sends itself, needs it.
async fn lo_up() {
    let h = handle();
    let lo = link(&h, "lo").await.expect("lo exists");
    h.link().set(LinkUnspec::new_with_index(lo.header.index).up().build()).execute().await.expect("lo up");
}

/// A netlink handle for the test's own checks (its connection task runs on the test runtime).
fn handle() -> Handle {
    let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
    tokio::spawn(conn);
    handle
}

async fn link(h: &Handle, name: &str) -> Option<LinkMessage> {
    h.link().get().match_name(name.to_owned()).execute().try_next().await.ok().flatten()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().expect("ip")).collect()
}

fn stats(added: usize, removed: usize, unchanged: usize) -> SyncStats {
    SyncStats { added, removed, unchanged }
}

/// Accepts one connection on `addr` (on the device) and echoes what the client sends.
async fn assert_reachable(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&buf).await.expect("write");
        peer
    });
    let mut c = timeout(DEADLINE, TcpStream::connect(addr)).await.expect("connect in time").expect("connect");
    c.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    timeout(DEADLINE, c.read_exact(&mut buf)).await.expect("echo in time").expect("echo");
    assert_eq!(&buf, b"ping");
    let peer = server.await.expect("server");
    // A local address talks to itself: the client's source is picked from the local table.
    assert_eq!(peer.ip().is_ipv4(), addr.is_ipv4());
}

#[test]
fn ensure_creates_device_up_and_is_idempotent() {
    in_netns(|| async {
        let h = handle();
        assert!(link(&h, DEV).await.is_none());
        let dev = VipDevice::ensure(DEV).await.expect("ensure");
        assert!(dev.created());
        assert!(matches!(dev.kind(), DeviceKind::Dummy | DeviceKind::Bridge));
        let l = link(&h, DEV).await.expect("device exists");
        assert_eq!(l.header.index, dev.index());
        assert!(l.header.flags.contains(LinkFlags::Up), "device is up");
        let (index, kind) = (dev.index(), dev.kind());
        drop(dev);

        let again = VipDevice::ensure(DEV).await.expect("ensure again");
        assert!(!again.created(), "second ensure adopts");
        assert_eq!((again.index(), again.kind()), (index, kind));
    });
}

#[test]
fn ensure_sets_a_downed_device_up() {
    in_netns(|| async {
        let h = handle();
        let dev = VipDevice::ensure(DEV).await.expect("ensure");
        h.link().set(LinkUnspec::new_with_index(dev.index()).down().build()).execute().await.expect("down");
        drop(dev);
        let _dev = VipDevice::ensure(DEV).await.expect("ensure");
        let l = link(&h, DEV).await.expect("device exists");
        assert!(l.header.flags.contains(LinkFlags::Up));
    });
}

#[test]
fn sync_touches_exactly_the_difference() {
    in_netns(|| async {
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        let first = ips(&["10.96.0.1", "10.96.0.2", "fd00::1"]);
        assert_eq!(dev.sync(&first).await.expect("sync"), stats(3, 0, 0));
        assert_eq!(dev.current_addresses().await.expect("list"), first);
        assert_eq!(dev.sync(&first).await.expect("sync"), stats(0, 0, 3), "second sync is a no-op");

        let second = ips(&["10.96.0.2", "10.96.0.3", "fd00::1", "fd00::2"]);
        assert_eq!(dev.sync(&second).await.expect("sync"), stats(2, 1, 2));
        assert_eq!(dev.current_addresses().await.expect("list"), second);

        assert_eq!(dev.sync(&BTreeSet::new()).await.expect("sync"), stats(0, 4, 0));
        assert!(dev.current_addresses().await.expect("list").is_empty());
    });
}

#[test]
fn update_applies_only_the_given_changes() {
    in_netns(|| async {
        let h = handle();
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        let err = dev.update(&ips(&["10.96.0.1"]), &BTreeSet::new()).await.expect_err("no sync yet");
        assert!(matches!(err, HostError::Unsynced { .. }), "{err}");
        assert!(!err.is_transient());
        assert!(dev.current_addresses().await.expect("list").is_empty(), "untouched");

        dev.sync(&ips(&["10.96.0.1", "fd00::1"])).await.expect("sync");
        assert!(dev.is_synced());
        let (add, remove) = (ips(&["10.96.0.2", "fd00::2", "10.96.0.1"]), ips(&["fd00::1", "10.96.0.9"]));
        assert_eq!(dev.update(&add, &remove).await.expect("update"), stats(2, 1, 2));
        assert_eq!(dev.current_addresses().await.expect("list"), ips(&["10.96.0.1", "10.96.0.2", "fd00::2"]));
        assert_reachable("[fd00::2]:80".parse().expect("sa")).await;

        // Drift behind Ferry's back: `update` trusts its set (the delete finds nothing and
        // counts it as not removed); a full `sync` repairs it.
        let v4: IpAddr = "10.96.0.2".parse().expect("ip");
        h.address().add(dev.index(), "10.96.0.50".parse().expect("ip"), 32).execute().await.expect("add");
        let msg = h
            .address()
            .get()
            .set_link_index_filter(dev.index())
            .execute()
            .try_filter(|m| std::future::ready(m.attributes.contains(&AddressAttribute::Local(v4))))
            .try_next()
            .await
            .expect("list")
            .expect("10.96.0.2 is there");
        h.address().del(msg).execute().await.expect("delete behind Ferry's back");
        assert_eq!(dev.update(&BTreeSet::new(), &ips(&["10.96.0.2"])).await.expect("update"), stats(0, 0, 0));
        let want = ips(&["10.96.0.1", "fd00::2"]);
        assert_eq!(dev.sync(&want).await.expect("sync"), stats(0, 1, 2));
        assert_eq!(dev.current_addresses().await.expect("list"), want);
    });
}

#[test]
fn sync_replaces_an_address_held_with_a_short_prefix() {
    in_netns(|| async {
        let h = handle();
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        let v4: IpAddr = "10.96.0.7".parse().expect("ip");
        let v6: IpAddr = "fd00::7".parse().expect("ip");
        h.address().add(dev.index(), v4, 24).execute().await.expect("add /24");
        h.address().add(dev.index(), v6, 64).execute().await.expect("add /64");
        let want = BTreeSet::from([v4, v6]);
        assert_eq!(dev.sync(&want).await.expect("sync"), stats(2, 2, 0));
        assert_eq!(dev.sync(&want).await.expect("sync"), stats(0, 0, 2));
        let held: Vec<(u8, AddressScope)> = h
            .address()
            .get()
            .set_link_index_filter(dev.index())
            .execute()
            .map_ok(|m| (m.header.prefix_len, m.header.scope))
            .try_collect()
            .await
            .expect("list");
        let global: Vec<u8> =
            held.iter().filter(|(_, scope)| *scope == AddressScope::Universe).map(|(p, _)| *p).collect();
        assert_eq!(global, [32, 128], "only full-length prefixes remain: {held:?}");
    });
}

#[test]
fn added_addresses_are_usable_at_once() {
    in_netns(|| async {
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        dev.sync(&ips(&["10.96.0.10", "fd00::10"])).await.expect("sync");
        // No wait: IPv6 is added without DAD, so it is not tentative and bind succeeds at once.
        assert_reachable("10.96.0.10:80".parse().expect("addr")).await;
        assert_reachable("[fd00::10]:80".parse().expect("addr")).await;
    });
}

#[test]
fn removed_address_is_no_longer_bindable() {
    in_netns(|| async {
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        dev.sync(&ips(&["10.96.0.11"])).await.expect("sync");
        drop(TcpListener::bind("10.96.0.11:80").await.expect("bind while present"));
        dev.sync(&BTreeSet::new()).await.expect("sync");
        let err = TcpListener::bind("10.96.0.11:80").await.expect_err("bind after removal");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    });
}

#[test]
fn adopting_keeps_existing_addresses() {
    in_netns(|| async {
        let want = ips(&["10.96.0.20", "fd00::20"]);
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        dev.sync(&want).await.expect("sync");
        drop(dev); // a restart: the old process's state is only in the kernel

        let mut dev = VipDevice::ensure(DEV).await.expect("adopt");
        assert!(!dev.created());
        assert_eq!(dev.current_addresses().await.expect("list"), want, "ensure keeps addresses");
        assert_eq!(dev.sync(&want).await.expect("sync"), stats(0, 0, 2));
    });
}

#[test]
fn cleanup_removes_the_device() {
    in_netns(|| async {
        let h = handle();
        assert!(!VipDevice::cleanup(DEV).await.expect("cleanup absent"));
        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        dev.sync(&ips(&["10.96.0.30"])).await.expect("sync");
        assert!(VipDevice::cleanup(DEV).await.expect("cleanup"));
        assert!(link(&h, DEV).await.is_none());
        assert!(TcpListener::bind("10.96.0.30:80").await.is_err(), "address went with the device");
        assert!(!VipDevice::cleanup(DEV).await.expect("cleanup again"));
        // The old handle now reports the device gone rather than a generic failure.
        let err = dev.sync(&ips(&["10.96.0.31"])).await.expect_err("device is gone");
        assert!(matches!(err, HostError::LinkGone { .. }), "{err}");
    });
}

#[test]
fn foreign_and_invalid_links_are_refused() {
    in_netns(|| async {
        let err = VipDevice::ensure("lo").await.expect_err("lo is not ours");
        assert!(matches!(err, HostError::ForeignLink { .. }), "{err}");
        assert!(!err.is_transient());
        let err = VipDevice::cleanup("lo").await.expect_err("lo is not ours");
        assert!(matches!(err, HostError::ForeignLink { .. }), "{err}");
        for bad in ["", "a-name-longer-than-15", "a/b", "a b"] {
            let err = VipDevice::ensure(bad).await.expect_err("invalid name");
            assert!(matches!(err, HostError::InvalidName { .. }), "{bad:?}: {err}");
        }
    });
}

#[test]
fn ensure_raises_arp_sysctls_but_never_lowers_them() {
    in_netns(|| async {
        let ignore = "/proc/sys/net/ipv4/conf/all/arp_ignore";
        let announce = "/proc/sys/net/ipv4/conf/all/arp_announce";
        // A fresh namespace starts at the kernel defaults.
        std::fs::write(ignore, "0").expect("reset arp_ignore");
        std::fs::write(announce, "0").expect("reset arp_announce");

        let dev = VipDevice::ensure(DEV).await.expect("ensure");
        assert_eq!(sysctl::read(ignore).expect("read"), 1);
        assert_eq!(sysctl::read(announce).expect("read"), 2);
        let changed: Vec<_> = dev.sysctl_changes().iter().map(|c| (c.path, c.from, c.to)).collect();
        assert_eq!(changed, [(ignore, 0, 1), (announce, 0, 2)]);
        drop(dev);

        std::fs::write(ignore, "2").expect("stricter arp_ignore");
        let dev = VipDevice::ensure(DEV).await.expect("ensure again");
        assert!(dev.sysctl_changes().is_empty());
        assert_eq!(sysctl::read(ignore).expect("read"), 2, "a stricter value is kept");
    });
}

/// Messages between the two namespaces of [`vips_get_no_arp_or_ndp_answers_on_other_interfaces`].
#[derive(Debug)]
enum Msg {
    ClientNs(std::fs::File),
    Ready { mac: Vec<u8> },
    ControlDone,
    Continue,
    Done,
}

/// What a client connect to `addr` through the veth ended with.
async fn try_connect(addr: &str) -> Result<(), i32> {
    let addr: SocketAddr = addr.parse().expect("addr");
    match timeout(DEADLINE, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.raw_os_error().unwrap_or(-1)),
        Err(_) => panic!("connect {addr}: no answer within {DEADLINE:?}"),
    }
}

/// The claim of the module docs, checked on a real link: with `configure_arp`, a neighbour on
/// another interface gets no ARP answer for a VIP (and does get one without it); IPv6 neighbour
/// discovery never answers for a VIP on another interface, although the node accepts the
/// traffic once the neighbour knows the MAC address.
#[test]
fn vips_get_no_arp_or_ndp_answers_on_other_interfaces() {
    use std::os::fd::AsRawFd;
    use tokio::sync::mpsc;

    let (to_node, mut node_rx) = mpsc::unbounded_channel::<Msg>();
    let (to_client, mut client_rx) = mpsc::unbounded_channel::<Msg>();

    // The client: a neighbour on the node's veth link.
    let client = std::thread::spawn(move || {
        netns::unshare_net();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            // Also for the ICMP error that turns a failed neighbour into EHOSTUNREACH.
            lo_up().await;
            let ns = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
            to_node.send(Msg::ClientNs(ns)).expect("node listens");
            let Some(Msg::Ready { mac }) = client_rx.recv().await else { panic!("node gave up") };

            let h = handle();
            let veth = link(&h, "veth-c").await.expect("veth-c moved here").header.index;
            h.link().set(LinkUnspec::new_with_index(veth).up().build()).execute().await.expect("up");
            h.address().add(veth, "192.168.77.2".parse().expect("ip"), 24).execute().await.expect("v4");
            let mut v6 = h.address().add(veth, "fd77::2".parse().expect("ip"), 64);
            v6.message_mut().header.flags |= rtnetlink::packet_route::address::AddressHeaderFlags::Nodad;
            v6.execute().await.expect("v6");
            // Give up on unanswered neighbours after ~0.6 s instead of 3 s.
            for family in ["ipv4", "ipv6"] {
                std::fs::write(format!("/proc/sys/net/{family}/neigh/veth-c/retrans_time_ms"), "200")
                    .expect("retrans_time_ms");
            }
            // fd77::51 gets a static neighbour entry: no NDP needed for it.
            h.neighbours()
                .add(veth, "fd77::51".parse().expect("ip"))
                .link_layer_address(&mac)
                .execute()
                .await
                .expect("static neighbour");

            // Control: with arp_ignore=0 the node answers ARP for a VIP on veth-n.
            assert_eq!(try_connect("192.168.77.50:80").await, Ok(()), "control: ARP answered");
            to_node.send(Msg::ControlDone).expect("node listens");
            let Some(Msg::Continue) = client_rx.recv().await else { panic!("node gave up") };

            // With configure_arp's arp_ignore=1: no ARP answer, the neighbour fails.
            assert_eq!(try_connect("192.168.77.51:80").await, Err(libc::EHOSTUNREACH), "ARP not answered");
            // IPv6: no NDP answer for a VIP on another interface...
            assert_eq!(try_connect("[fd77::50]:80").await, Err(libc::EHOSTUNREACH), "NDP not answered");
            // ...although the node accepts the traffic once the MAC is known.
            assert_eq!(try_connect("[fd77::51]:80").await, Ok(()), "static neighbour reaches the VIP");
            to_node.send(Msg::Done).expect("node listens");
        });
    });

    // The node.
    in_netns(move || async move {
        let Some(Msg::ClientNs(client_ns)) = node_rx.recv().await else { panic!("client gave up") };
        let h = handle();
        h.link().add(rtnetlink::LinkVeth::new("veth-n", "veth-c").build()).execute().await.expect("veth");
        let peer = link(&h, "veth-c").await.expect("veth-c").header.index;
        h.link()
            .set(LinkUnspec::new_with_index(peer).setns_by_fd(client_ns.as_raw_fd()).build())
            .execute()
            .await
            .expect("move veth-c");
        let veth = link(&h, "veth-n").await.expect("veth-n");
        let mac = veth
            .attributes
            .iter()
            .find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::Address(m) => Some(m.clone()),
                _ => None,
            })
            .expect("veth-n has a MAC");
        let index = veth.header.index;
        h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.expect("up");
        h.address().add(index, "192.168.77.1".parse().expect("ip"), 24).execute().await.expect("v4");
        let mut v6 = h.address().add(index, "fd77::1".parse().expect("ip"), 64);
        v6.message_mut().header.flags |= rtnetlink::packet_route::address::AddressHeaderFlags::Nodad;
        v6.execute().await.expect("v6");

        let mut dev = VipDevice::ensure(DEV).await.expect("ensure");
        dev.sync(&ips(&["192.168.77.50", "192.168.77.51", "fd77::50", "fd77::51"])).await.expect("sync");
        for addr in ["192.168.77.50:80", "192.168.77.51:80", "[fd77::50]:80", "[fd77::51]:80"] {
            let l = TcpListener::bind(addr).await.expect("bind VIP");
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            });
        }

        let ignore = "/proc/sys/net/ipv4/conf/all/arp_ignore";
        std::fs::write(ignore, "0").expect("control: arp_ignore=0");
        to_client.send(Msg::Ready { mac }).expect("client listens");
        let Some(Msg::ControlDone) = node_rx.recv().await else { panic!("client failed") };
        let changes = super::configure_arp().expect("configure_arp");
        assert_eq!(changes.iter().map(|c| (c.path, c.from, c.to)).collect::<Vec<_>>(), [(ignore, 0, 1)]);
        to_client.send(Msg::Continue).expect("client listens");
        let Some(Msg::Done) = node_rx.recv().await else { panic!("client failed") };
    });
    if let Err(panic) = client.join() {
        std::panic::resume_unwind(panic);
    }
}

fn port_with(frontends: Vec<Frontend>) -> Arc<ferry_model::ServicePort> {
    let listener = ValidListener {
        key: ServiceKey::new("ns", "svc"),
        address: "127.0.0.1:80".parse().expect("addr"),
        protocol: Protocol::Tcp,
        backends: Vec::new(),
        balancing: ferry_model::Balancing::RoundRobin,
        session_affinity: ferry_model::SessionAffinity::None,
        health_check: None,
        passive_health: ferry_model::PassiveHealth::default(),
        timeouts: ferry_model::Timeouts::default(),
        zero_copy: false,
    };
    let mut port = (*listener.to_service(|_| None).ports[0]).clone();
    port.frontends = frontends;
    Arc::new(port)
}

#[test]
fn frontend_addresses_takes_cluster_external_and_lb_ips_only() {
    let sa = |s: &str| -> SocketAddr { s.parse().expect("addr") };
    let svc = port_with(vec![
        Frontend::ClusterIp(sa("10.96.0.1:80")),
        Frontend::ClusterIp(sa("[fd00::1]:80")),
        Frontend::NodePort(30080),
        Frontend::LoadBalancer(sa("192.0.2.10:80")),
        Frontend::ExternalIp(sa("198.51.100.5:80")),
    ]);
    let listener = port_with(vec![Frontend::Listener(sa("203.0.113.1:80"))]);
    // A listener that won the key of a ClusterIP: the address is the listener's, not a VIP.
    let shadowing = port_with(vec![Frontend::Listener(sa("10.96.0.99:80"))]);

    let mut snap = Snapshot::default();
    for fe in &svc.frontends {
        snap.frontends.insert(fe.key(Protocol::Tcp, ferry_model::IpFamily::V4), svc.clone());
    }
    snap.frontends.insert(FrontendKey::Addr(Protocol::Tcp, sa("203.0.113.1:80")), listener);
    snap.frontends.insert(FrontendKey::Addr(Protocol::Tcp, sa("10.96.0.99:80")), shadowing);
    // The same address on another protocol and port is one address.
    snap.frontends.insert(FrontendKey::Addr(Protocol::Udp, sa("10.96.0.1:53")), {
        let mut p = (*port_with(vec![Frontend::ClusterIp(sa("10.96.0.1:53"))])).clone();
        p.protocol = Protocol::Udp;
        Arc::new(p)
    });

    assert_eq!(
        super::frontend_addresses(&snap),
        ips(&["10.96.0.1", "fd00::1", "192.0.2.10", "198.51.100.5"])
    );
    assert!(super::frontend_addresses(&Snapshot::default()).is_empty());
}
