//! UDP proxying: one recv loop per frontend socket ([`serve`]) with a per-client flow table.
//!
//! A flow maps a client address to a connected upstream socket (bound to an ephemeral port), the
//! endpoint's [`Lease`] and a last-activity stamp. The table is owned by the recv loop alone (no
//! lock); each flow has a reply task that reads the upstream socket and sends from the frontend
//! socket, so the client sees the frontend address as the source.
//!
//! Invariants:
//! - Datagrams pass unchanged: buffers hold 65,536 bytes, more than any UDP payload.
//! - A flow idle (no datagram either way) for the port's `udp_idle` is dropped by a sweep that
//!   runs inside the recv loop.
//! - A flow whose endpoint left the pool is re-picked on its next datagram (the pool the client is
//!   routed to now: see [`Upstreams::route`]).
//! - A client the routes drop (source ranges, Local policy without local endpoints) gets no flow;
//!   its datagrams are discarded and counted (`ferry_listener_dropped_total`).
//! - The table holds at most `max_flows`; when full, idle flows go first, then the oldest eighth.
//! - When the listener stops (removed, shutdown, or handed to a successor process), no datagram
//!   is read any more, but a flow whose last datagram was the client's keeps its reply task until
//!   the endpoint's reply has gone out, for at most [`REPLY_WAIT`] (or the port's idle timeout if
//!   shorter, or until the drain ends): a query in flight at a restart is answered. Every other
//!   flow is dropped at once.
//! - Reply tasks read into one per-thread buffer, so a flow costs two sockets' worth of kernel
//!   state, one small allocation and one task, never a datagram buffer of its own.
//!
//! Source address of replies: when the frontend socket is bound to an unspecified address
//! (`0.0.0.0`/`::`), Linux reports each datagram's destination (`IP_PKTINFO`/`IPV6_RECVPKTINFO`)
//! and the flow's replies are sent from exactly that address (`sendmsg` with a pktinfo control
//! message). Elsewhere the kernel picks the source by route.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_lb::Lease;
use socket2::{SockAddr, SockRef};
use tokio::{net::UdpSocket, task::AbortHandle};
use tokio_util::sync::CancellationToken;

use crate::state::{ListenerState, Route, Upstreams};

/// Largest datagram buffer: every UDP payload (at most 65,527 bytes) fits.
pub const BUFFER: usize = 65_536;
/// Default bound on flows per listener.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;
/// How long a stopped listener waits for the reply to a datagram it already relayed (a DNS
/// client retries after about as long).
pub const REPLY_WAIT: Duration = Duration::from_secs(5);
/// How often a stopped listener checks whether the replies it waits for have gone out.
const REPLY_POLL: Duration = Duration::from_millis(20);

thread_local! {
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; BUFFER].into_boxed_slice());
}

struct FlowShared {
    upstream: UdpSocket,
    /// Milliseconds since the listener's epoch of the last datagram in either direction.
    last: AtomicU64,
    /// Whether the last datagram was the client's: its reply may still come.
    awaits_reply: AtomicBool,
}

struct Flow {
    shared: Arc<FlowShared>,
    lease: Lease,
    generation: u64,
    task: AbortHandle,
    state: Arc<ListenerState>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
        self.state.closed();
    }
}

fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn sweep_period(idle: Duration) -> Duration {
    (idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Relays datagrams received on `socket` to endpoints of `state`'s pool until `stop` is
/// cancelled; then waits for the replies still due (see the module docs) and drops every flow. At
/// most `max_flows` flows exist at once.
pub async fn serve(socket: UdpSocket, state: Arc<ListenerState>, max_flows: usize, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let max_flows = max_flows.max(1);
    let mut buf = vec![0u8; BUFFER].into_boxed_slice();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let epoch = Instant::now();
    let pktinfo = enable_pktinfo(&socket);
    let sweep = tokio::time::sleep(sweep_period(state.upstreams().pool().port().timeouts.udp_idle));
    tokio::pin!(sweep);
    tracing::debug!(listener = %state.name(), local = ?socket.local_addr().ok(), "receiving");
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = &mut sweep => {
                let idle = state.upstreams().pool().port().timeouts.udp_idle;
                expire(&mut flows, now_ms(epoch), idle);
                sweep.as_mut().reset(tokio::time::Instant::now() + sweep_period(idle));
            }
            r = recv(&socket, &mut buf, pktinfo) => match r {
                Ok((n, client, local)) => {
                    on_datagram(&buf[..n], client, local, &socket, &state, &mut flows, max_flows, epoch);
                }
                Err(error) => {
                    // ICMP errors surface here on some systems; they concern one peer only.
                    tracing::debug!(listener = %state.name(), %error, "recv failed");
                    if !matches!(error.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            },
        }
    }
    tracing::debug!(listener = %state.name(), flows = flows.len(), "stopped receiving");
    let wait = state.upstreams().pool().port().timeouts.udp_idle.min(REPLY_WAIT);
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let drain = state.drain_token().clone();
    loop {
        let now = now_ms(epoch);
        flows.retain(|_, f| {
            f.shared.awaits_reply.load(Ordering::Relaxed)
                && now.saturating_sub(f.shared.last.load(Ordering::Relaxed)) < wait_ms
        });
        if flows.is_empty() {
            break;
        }
        tokio::select! {
            () = drain.cancelled() => break,
            () = tokio::time::sleep(REPLY_POLL) => {}
        }
    }
}

/// Turns on destination-address reporting when `socket` is bound to an unspecified address.
fn enable_pktinfo(socket: &UdpSocket) -> bool {
    #[cfg(target_os = "linux")]
    if let Ok(local) = socket.local_addr()
        && local.ip().is_unspecified()
    {
        use std::os::fd::AsRawFd;
        return match crate::sys::pktinfo::enable(socket.as_raw_fd(), local.is_ipv6()) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%local, %error, "IP_PKTINFO unavailable; replies use the routed source address");
                false
            }
        };
    }
    let _ = socket;
    false
}

/// One datagram: length, client, and (with pktinfo) the local address the client targeted.
async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
    pktinfo: bool,
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    #[cfg(target_os = "linux")]
    if pktinfo {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        return socket.async_io(tokio::io::Interest::READABLE, || crate::sys::pktinfo::recv(fd, buf)).await;
    }
    let _ = pktinfo;
    let (n, client) = socket.recv_from(buf).await?;
    Ok((n, client, None))
}

/// Sends a reply to `client` from the frontend socket, from `local` when known.
fn send_reply(
    frontend: &UdpSocket,
    data: &[u8],
    client: &SockAddr,
    local: Option<IpAddr>,
) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    if let (Some(local), Some(to)) = (local, client.as_socket()) {
        use std::os::fd::AsRawFd;
        return crate::sys::pktinfo::send(frontend.as_raw_fd(), data, to, local);
    }
    let _ = local;
    SockRef::from(frontend).send_to(data, client)
}

fn expire(flows: &mut HashMap<SocketAddr, Flow>, now: u64, idle: Duration) {
    let idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    flows.retain(|_, f| now.saturating_sub(f.shared.last.load(Ordering::Relaxed)) < idle);
}

/// Makes room for one more flow: idle flows first, then the least recently active eighth.
fn make_room(flows: &mut HashMap<SocketAddr, Flow>, max_flows: usize, now: u64, idle: Duration) {
    expire(flows, now, idle);
    if flows.len() < max_flows {
        return;
    }
    let mut ages: Vec<(u64, SocketAddr)> =
        flows.iter().map(|(a, f)| (f.shared.last.load(Ordering::Relaxed), *a)).collect();
    let k = (max_flows / 8).max(1).min(ages.len());
    ages.select_nth_unstable(k - 1);
    for (_, addr) in &ages[..k] {
        flows.remove(addr);
    }
}

#[allow(clippy::too_many_arguments)]
fn on_datagram(
    data: &[u8],
    client: SocketAddr,
    local: Option<IpAddr>,
    frontend: &Arc<UdpSocket>,
    state: &Arc<ListenerState>,
    flows: &mut HashMap<SocketAddr, Flow>,
    max_flows: usize,
    epoch: Instant,
) {
    let upstreams = state.load();
    let now = now_ms(epoch);
    let valid = match flows.get_mut(&client) {
        None => false,
        Some(f) if f.generation == upstreams.generation() => true,
        Some(f) if matches!(upstreams.route(client.ip()), Route::Pool(p) if p.get(f.lease.addr()).is_some()) =>
        {
            f.generation = upstreams.generation();
            true
        }
        Some(f) => {
            tracing::debug!(listener = %state.name(), %client, endpoint = %f.lease.addr(), "endpoint left the client's pool; re-picking");
            flows.remove(&client);
            false
        }
    };
    if !valid {
        if flows.len() >= max_flows {
            make_room(flows, max_flows, now, upstreams.pool().port().timeouts.udp_idle);
        }
        let Some(flow) = new_flow(client, local, frontend, state, &upstreams, epoch) else {
            return;
        };
        flows.insert(client, flow);
    }
    let Some(flow) = flows.get(&client) else { return };
    // A direct send: tokio's `try_send` would report WouldBlock on a socket the reactor has
    // not yet seen writable, dropping the first datagram of every flow.
    let upstream = SockRef::from(&flow.shared.upstream);
    let mut sent = upstream.send(data);
    if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused) {
        // A stale ICMP error from an earlier datagram; this one has not been sent yet.
        sent = upstream.send(data);
    }
    match sent {
        Ok(_) => {
            flow.shared.last.store(now, Ordering::Relaxed);
            flow.shared.awaits_reply.store(true, Ordering::Relaxed);
            state.metrics.datagrams_rx.increment(1);
            state.metrics.rx.increment(data.len() as u64);
        }
        Err(error) => {
            tracing::debug!(listener = %state.name(), %client, endpoint = %flow.lease.addr(), %error, "datagram dropped");
        }
    }
}

fn new_flow(
    client: SocketAddr,
    local: Option<IpAddr>,
    frontend: &Arc<UdpSocket>,
    state: &Arc<ListenerState>,
    upstreams: &Upstreams,
    epoch: Instant,
) -> Option<Flow> {
    let Route::Pool(pool) = upstreams.route(client.ip()) else {
        state.metrics.dropped.increment(1);
        tracing::debug!(listener = %state.name(), %client, "dropped by the listener's routes");
        return None;
    };
    let Some(lease) = pool.pick(client.ip(), &[]) else {
        state.metrics.no_endpoint.increment(1);
        tracing::debug!(listener = %state.name(), %client, "no endpoint; datagram dropped");
        return None;
    };
    let upstream = match connect(lease.addr()) {
        Ok(s) => s,
        Err(error) => {
            state.metrics.connect_failures.increment(1);
            tracing::warn!(listener = %state.name(), %client, endpoint = %lease.addr(), %error, "upstream socket failed");
            return None;
        }
    };
    let shared = Arc::new(FlowShared {
        upstream,
        last: AtomicU64::new(now_ms(epoch)),
        awaits_reply: AtomicBool::new(true),
    });
    let task =
        state.tasks.spawn(reply(shared.clone(), frontend.clone(), client, local, state.clone(), epoch));
    state.metrics.connections.increment(1);
    state.opened();
    tracing::debug!(listener = %state.name(), %client, endpoint = %lease.addr(), "new flow");
    Some(Flow {
        shared,
        lease,
        generation: upstreams.generation(),
        task: task.abort_handle(),
        state: state.clone(),
    })
}

/// A non-blocking UDP socket on an ephemeral port, connected to `addr`.
fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let any = match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

async fn reply(
    shared: Arc<FlowShared>,
    frontend: Arc<UdpSocket>,
    client: SocketAddr,
    local: Option<IpAddr>,
    state: Arc<ListenerState>,
    epoch: Instant,
) {
    let to = SockAddr::from(client);
    loop {
        if shared.upstream.readable().await.is_err() {
            return;
        }
        let r = REPLY_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let n = shared.upstream.try_recv(&mut b[..])?;
            send_reply(&frontend, &b[..n], &to, local).map(|_| n)
        });
        match r {
            Ok(n) => {
                shared.last.store(now_ms(epoch), Ordering::Relaxed);
                shared.awaits_reply.store(false, Ordering::Relaxed);
                state.metrics.datagrams_tx.increment(1);
                state.metrics.tx.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => {
                tracing::debug!(listener = %state.name(), %client, %error, "reply dropped");
            }
        }
    }
}
