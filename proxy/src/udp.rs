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
//!   runs inside the recv loop. With `udp_responses` (request/response protocols such as DNS),
//!   the sweep also drops a flow that owes its client no reply: every datagram the client sent
//!   has had that many replies. So a client that uses a new source port per query (glibc's
//!   resolver does) holds a socket for at most one sweep period (1 s), not for `udp_idle`.
//! - A flow whose endpoint left the pool is re-picked on its next datagram (the pool the client is
//!   routed to now: see [`Upstreams::route`]).
//! - A client the routes drop (source ranges, Local policy without local endpoints) gets no flow;
//!   its datagrams are discarded and counted (`ferry_listener_dropped_total`).
//! - The table holds at most `max_flows`; when full, idle flows go first, then the oldest eighth.
//! - When the listener stops (removed, shutdown, or handed to a successor process), no datagram
//!   is read any more, but a flow still owed a reply (fewer replies relayed than datagrams sent,
//!   times `udp_responses` when set) keeps its reply task until they have gone out, for at most
//!   [`REPLY_WAIT`] (or the port's idle timeout if shorter, or until the drain ends): a query in
//!   flight at a restart is answered. Every other flow is dropped at once.
//! - I/O is batched (`recvmmsg`/`sendmmsg`, see `sys::mmsg`): the recv loop takes up to 32
//!   queued datagrams per system call and sends each flow's share of them in one call; a reply
//!   task moves up to 32 queued replies per pair of calls. Datagrams of one client keep their
//!   order in both directions.
//! - The recv loop and the reply tasks read into one per-thread batch buffer, borrowed only
//!   between a receive and the sends that follow it, never across an `.await`. So a flow costs
//!   two sockets' worth of kernel state, one small allocation and one task, never a datagram
//!   buffer of its own.
//!
//! Source address of replies: when the frontend socket is bound to an unspecified address
//! (`0.0.0.0`/`::`), Linux reports each datagram's destination (`IP_PKTINFO`/`IPV6_RECVPKTINFO`)
//! and the flow's replies are sent from exactly that address (a pktinfo control message). Elsewhere
//! the kernel picks the source by route.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_lb::Lease;
use ferry_model::Timeouts;
use tokio::{io::Interest, net::UdpSocket, task::AbortHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    state::{ListenerState, Route, Upstreams},
    sys::mmsg::{self, BATCH, RecvBatch},
};

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
    /// The batch buffer of this thread's recv loops and reply tasks (2 MiB of address space; only
    /// the pages datagrams touch become resident).
    static DATAGRAMS: RefCell<RecvBatch> = RefCell::new(RecvBatch::new(BUFFER));
}

struct FlowShared {
    upstream: UdpSocket,
    /// Milliseconds since the listener's epoch of the last datagram in either direction.
    last: AtomicU64,
    /// Replies still owed to the client: each datagram it sent adds the port's `udp_responses` (1
    /// when unset), each reply relayed takes one off, never below 0. The drain waits for flows
    /// that are owed a reply; with `udp_responses` set, the sweep ends flows that are owed none.
    owed: AtomicU64,
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
    let fd = socket.as_raw_fd();
    let max_flows = max_flows.max(1);
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
                let timeouts = state.upstreams().pool().port().timeouts;
                expire(&mut flows, now_ms(epoch), &timeouts);
                sweep.as_mut().reset(tokio::time::Instant::now() + sweep_period(timeouts.udp_idle));
            }
            r = socket.async_io(Interest::READABLE, || DATAGRAMS.with_borrow_mut(|b| b.recv(fd, pktinfo))) => match r {
                // Same poll as the receive: no other task has used the buffer since.
                Ok(_) => DATAGRAMS.with_borrow(|batch| {
                    on_batch(batch, &socket, &state, &mut flows, max_flows, epoch);
                }),
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
            f.shared.owed.load(Ordering::Relaxed) > 0
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
        return match mmsg::enable_pktinfo(socket.as_raw_fd(), local.is_ipv6()) {
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

/// Drops idle flows, and with `udp_responses` the flows that owe no reply.
fn expire(flows: &mut HashMap<SocketAddr, Flow>, now: u64, timeouts: &Timeouts) {
    let idle = u64::try_from(timeouts.udp_idle.as_millis()).unwrap_or(u64::MAX);
    let answered_end = timeouts.udp_responses.is_some();
    flows.retain(|_, f| {
        now.saturating_sub(f.shared.last.load(Ordering::Relaxed)) < idle
            && !(answered_end && f.shared.owed.load(Ordering::Relaxed) == 0)
    });
}

/// Makes room for one more flow: idle (or answered) flows first, then the least recently active
/// eighth.
fn make_room(flows: &mut HashMap<SocketAddr, Flow>, max_flows: usize, now: u64, timeouts: &Timeouts) {
    expire(flows, now, timeouts);
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

/// Relays one received batch: groups its datagrams by client (keeping each client's order) and
/// sends each group to its flow's endpoint.
fn on_batch(
    batch: &RecvBatch,
    frontend: &Arc<UdpSocket>,
    state: &Arc<ListenerState>,
    flows: &mut HashMap<SocketAddr, Flow>,
    max_flows: usize,
    epoch: Instant,
) {
    // Clients of this batch, each with a bit per datagram of theirs (BATCH <= 32).
    let mut clients = [(SocketAddr::from(([0, 0, 0, 0], 0)), 0u32); BATCH];
    let mut groups = 0;
    for i in 0..BATCH {
        let Some((_, from, _)) = batch.get(i) else { break };
        let Some(from) = from else { continue };
        match clients[..groups].iter_mut().find(|(c, _)| *c == from) {
            Some((_, bits)) => *bits |= 1 << i,
            None => {
                clients[groups] = (from, 1 << i);
                groups += 1;
            }
        }
    }
    let owed_per_datagram = u64::from(state.upstreams().pool().port().timeouts.udp_responses.unwrap_or(1));
    let mut data: [&[u8]; BATCH] = [&[]; BATCH];
    for &(client, bits) in &clients[..groups] {
        let mut n = 0;
        let mut local = None;
        for i in (0..BATCH).filter(|i| bits & (1 << i) != 0) {
            let Some((bytes, _, to)) = batch.get(i) else { continue };
            data[n] = bytes;
            local = local.or(to);
            n += 1;
        }
        if let Some(flow) = flow_for(client, local, frontend, state, flows, max_flows, epoch) {
            send_upstream(flow, &data[..n], owed_per_datagram, client, state, epoch);
        }
    }
}

/// The flow of `client`: the current one if its endpoint is still in the client's pool, else a
/// new one (making room when the table is full). `None` when the client gets no flow.
fn flow_for<'a>(
    client: SocketAddr,
    local: Option<IpAddr>,
    frontend: &Arc<UdpSocket>,
    state: &Arc<ListenerState>,
    flows: &'a mut HashMap<SocketAddr, Flow>,
    max_flows: usize,
    epoch: Instant,
) -> Option<&'a Flow> {
    let upstreams = state.load();
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
            make_room(flows, max_flows, now_ms(epoch), &upstreams.pool().port().timeouts);
        }
        let flow = new_flow(client, local, frontend, state, &upstreams, epoch)?;
        flows.insert(client, flow);
    }
    flows.get(&client)
}

/// Sends `data` (one client's datagrams, in order) on the flow's upstream socket; each datagram
/// sent makes the flow owed `owed_per_datagram` more replies. A datagram the kernel refuses is
/// dropped, with a debug log; UDP promises no delivery.
fn send_upstream(
    flow: &Flow,
    data: &[&[u8]],
    owed_per_datagram: u64,
    client: SocketAddr,
    state: &ListenerState,
    epoch: Instant,
) {
    // A direct send: tokio's `try_send` would report WouldBlock on a socket the reactor has
    // not yet seen writable, dropping the first datagram of every flow.
    let sent = mmsg::send_all(flow.shared.upstream.as_raw_fd(), data, None, None);
    if sent.datagrams > 0 {
        flow.shared.last.store(now_ms(epoch), Ordering::Relaxed);
        flow.shared.owed.fetch_add(sent.datagrams as u64 * owed_per_datagram, Ordering::Relaxed);
        state.metrics.datagrams_rx.increment(sent.datagrams as u64);
        state.metrics.rx.increment(sent.bytes as u64);
    }
    if let Some(error) = sent.error {
        tracing::debug!(listener = %state.name(), %client, endpoint = %flow.lease.addr(), dropped = sent.dropped, %error, "datagrams dropped");
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
    let shared =
        Arc::new(FlowShared { upstream, last: AtomicU64::new(now_ms(epoch)), owed: AtomicU64::new(0) });
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
    let to = mmsg::reply_address(client, local);
    let (upstream, frontend) = (shared.upstream.as_raw_fd(), frontend.as_raw_fd());
    loop {
        if shared.upstream.readable().await.is_err() {
            return;
        }
        DATAGRAMS.with_borrow_mut(|batch| {
            let n = match shared.upstream.try_io(Interest::READABLE, || batch.recv(upstream, false)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    // An ICMP error (the endpoint's port is closed) concerns this flow only.
                    tracing::debug!(listener = %state.name(), %client, %error, "reply dropped");
                    return;
                }
            };
            let mut data: [&[u8]; BATCH] = [&[]; BATCH];
            for (i, d) in data.iter_mut().enumerate().take(n) {
                *d = batch.get(i).map_or(&[], |(bytes, _, _)| bytes);
            }
            let sent = mmsg::send_all(frontend, &data[..n], Some(&to), local);
            if sent.datagrams > 0 {
                shared.last.store(now_ms(epoch), Ordering::Relaxed);
                // Saturating: a reply beyond the count owes nothing back.
                let _ = shared.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |owed| {
                    Some(owed.saturating_sub(sent.datagrams as u64))
                });
                state.metrics.datagrams_tx.increment(sent.datagrams as u64);
                state.metrics.tx.increment(sent.bytes as u64);
            }
            if let Some(error) = sent.error {
                tracing::debug!(listener = %state.name(), %client, dropped = sent.dropped, %error, "replies dropped");
            }
        });
    }
}
