//! Batched UDP I/O for the UDP relay (`crate::udp`): `recvmmsg(2)` and `sendmmsg(2)`, so a busy
//! listener pays one system call per batch of up to [`BATCH`] datagrams in each direction rather
//! than one per datagram. With `IP_PKTINFO` / `IPV6_PKTINFO` ([`enable_pktinfo`]), each received
//! datagram carries the local address it was sent to, and replies can leave from that address.
//!
//! Invariants the calls rely on:
//! - Every `iovec` points into the [`RecvBatch`]'s own buffer or into a borrowed slice, alive for
//!   the call, with its true length.
//! - Every `msg_name` points to a `SockAddrStorage` on the caller's stack or a `SockAddr` alive
//!   for the call, with its true length; every `msg_control` to an aligned [`Control`] buffer.
//! - Results are read only for the entries the kernel reports as filled.
#![allow(unsafe_code)]

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::RawFd,
    ptr,
};

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams received or sent per system call, at most.
pub(crate) const BATCH: usize = 32;

/// Control buffer, aligned for `cmsghdr`; large enough for one in(6)_pktinfo.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).expect("socket structures are small")
}

/// Asks the kernel to report each datagram's destination address on `fd`.
pub(crate) fn enable_pktinfo(fd: RawFd, v6: bool) -> io::Result<()> {
    let (level, name) =
        if v6 { (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO) } else { (libc::IPPROTO_IP, libc::IP_PKTINFO) };
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int whose size is passed; the kernel copies it.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const one).cast(), socklen::<libc::c_int>()) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Receive buffers for one batch: [`BATCH`] slots of `slot` bytes in one allocation. Only the
/// pages datagrams are written to become resident.
pub(crate) struct RecvBatch {
    bufs: Box<[u8]>,
    slot: usize,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    local: [Option<IpAddr>; BATCH],
    filled: usize,
}

impl RecvBatch {
    /// Buffers for [`BATCH`] datagrams of up to `slot` bytes each.
    pub(crate) fn new(slot: usize) -> Self {
        Self {
            bufs: vec![0; slot * BATCH].into_boxed_slice(),
            slot,
            lens: [0; BATCH],
            from: [None; BATCH],
            local: [None; BATCH],
            filled: 0,
        }
    }

    /// Takes the datagrams queued on the non-blocking socket `fd`, up to [`BATCH`]; `WouldBlock`
    /// when there are none. With `pktinfo`, records each one's destination address too.
    pub(crate) fn recv(&mut self, fd: RawFd, pktinfo: bool) -> io::Result<usize> {
        self.filled = 0;
        let mut names: [SockAddrStorage; BATCH] = std::array::from_fn(|_| SockAddrStorage::zeroed());
        let mut controls = [Control([0; 64]); BATCH];
        // SAFETY: `iovec` and `mmsghdr` are plain old data; all zeroes is valid (null pointers,
        // zero lengths).
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, ((iov, h), (name, control))) in
            iovs.iter_mut().zip(&mut hdrs).zip(names.iter_mut().zip(&mut controls)).enumerate()
        {
            *iov =
                libc::iovec { iov_base: self.bufs[i * self.slot..].as_mut_ptr().cast(), iov_len: self.slot };
            let h = &mut h.msg_hdr;
            h.msg_namelen = name.size_of();
            h.msg_name = ptr::from_mut(name).cast();
            h.msg_iov = ptr::from_mut(iov);
            h.msg_iovlen = 1;
            if pktinfo {
                h.msg_control = control.0.as_mut_ptr().cast();
                h.msg_controllen = control.0.len() as _;
            }
        }
        // SAFETY: `hdrs` holds BATCH headers whose buffers, address slots and control buffers
        // are owned by `self` or this stack frame and outlive the call (module invariants).
        let n = unsafe {
            libc::recvmmsg(fd, hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, ptr::null_mut())
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (i, (h, name)) in hdrs.iter().zip(names).enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(self.slot);
            // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into the zeroed slot.
            self.from[i] = unsafe { SockAddr::new(name, h.msg_hdr.msg_namelen) }.as_socket();
            // SAFETY: `msg_control`/`msg_controllen` describe the control bytes the kernel wrote.
            self.local[i] = if pktinfo { unsafe { destination(&h.msg_hdr) } } else { None };
        }
        self.filled = n;
        Ok(n)
    }

    /// Datagram `i` of the last batch: its bytes, its sender (`None` for a non-IP address) and,
    /// with pktinfo, the local address it was sent to.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], Option<SocketAddr>, Option<IpAddr>)> {
        (i < self.filled).then(|| (&self.bufs[i * self.slot..][..self.lens[i]], self.from[i], self.local[i]))
    }
}

/// The destination address in a received message's `IP_PKTINFO` / `IPV6_PKTINFO`.
///
/// # Safety
/// `msg`'s control pointer and length must describe control bytes the kernel wrote (or be empty).
unsafe fn destination(msg: &libc::msghdr) -> Option<IpAddr> {
    let mut local = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, bounded by
    // `msg_controllen`; each payload is read unaligned at its type's size.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
            } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    local
}

/// The address to send to `to` at, from a socket whose datagram arrived at `from`: a v4 peer on
/// a v6 socket is written v4-mapped, and a v4-mapped peer on a v4 socket as plain v4 (frontends
/// are `V6ONLY`, so both are rare).
pub(crate) fn reply_address(to: SocketAddr, from: Option<IpAddr>) -> SockAddr {
    SockAddr::from(match (to, from) {
        (SocketAddr::V4(a), Some(IpAddr::V6(_))) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        (SocketAddr::V6(a), Some(IpAddr::V4(_))) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => SocketAddr::V6(a),
        },
        (to, _) => to,
    })
}

/// Writes a pktinfo control message asking for source address `from` into `control`; returns
/// the control length to pass.
fn write_pktinfo(control: &mut Control, from: IpAddr) -> usize {
    let (level, ty, size) = match from {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, mem::size_of::<libc::in_pktinfo>()),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, mem::size_of::<libc::in6_pktinfo>()),
    };
    let size = libc::c_uint::try_from(size).expect("pktinfo is small");
    // SAFETY: an all-zero msghdr is valid; it only describes `control` for the CMSG_* macros.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(size) } as usize;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is 64 bytes, enough for one CMSG_SPACE(in6_pktinfo) (40 bytes);
    // CMSG_FIRSTHDR is non-null because msg_controllen covers a header; the payload write stays
    // within CMSG_LEN(size) bytes of the header.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(size) as _;
        match from {
            IpAddr::V4(ip) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(ip).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
            IpAddr::V6(ip) => {
                let info =
                    libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: ip.octets() }, ipi6_ifindex: 0 };
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
        }
    }
    space
}

/// What [`send_all`] did.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Datagrams the kernel took.
    pub(crate) datagrams: usize,
    /// Their bytes.
    pub(crate) bytes: usize,
    /// Datagrams dropped: refused one by one, or the rest when the send buffer was full.
    pub(crate) dropped: usize,
    /// The last error, when something was dropped.
    pub(crate) error: Option<io::Error>,
}

/// Sends all of `datagrams`, in order, in as few `sendmmsg` calls as possible (see [`send`]). A
/// datagram the kernel refuses is dropped and the rest still go; a full send buffer drops the rest
/// (UDP promises no delivery, and waiting would hold up every other flow of the thread). A
/// `ECONNREFUSED` reported by a connected socket is a stale ICMP error from an earlier datagram,
/// not a refusal of this one: the send is tried once more.
pub(crate) fn send_all(
    fd: RawFd,
    mut datagrams: &[&[u8]],
    to: Option<&SockAddr>,
    from: Option<IpAddr>,
) -> Sent {
    let mut sent = Sent::default();
    let mut retried = false;
    while !datagrams.is_empty() {
        match send(fd, datagrams, to, from) {
            Ok(n) if n > 0 => {
                sent.datagrams += n;
                sent.bytes += datagrams[..n].iter().map(|d| d.len()).sum::<usize>();
                datagrams = &datagrams[n..];
                retried = false;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !retried => retried = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(_) => {
                sent.dropped += datagrams.len();
                sent.error = Some(io::ErrorKind::WouldBlock.into());
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sent.dropped += datagrams.len();
                sent.error = Some(e);
                break;
            }
            Err(e) => {
                sent.dropped += 1;
                sent.error = Some(e);
                datagrams = &datagrams[1..];
                retried = false;
            }
        }
    }
    sent
}

/// Sends the first [`BATCH`] (at most) of `datagrams` in one `sendmmsg` on `fd`: to `to` when
/// given (else `fd` is connected), from source address `from` when given. Returns how many the
/// kernel took; an error means the first one was refused (and none was sent).
fn send(fd: RawFd, datagrams: &[&[u8]], to: Option<&SockAddr>, from: Option<IpAddr>) -> io::Result<usize> {
    let count = datagrams.len().min(BATCH);
    if count == 0 {
        return Ok(0);
    }
    let mut control = Control([0; 64]);
    let control_len = from.map_or(0, |from| write_pktinfo(&mut control, from));
    // SAFETY: `iovec` and `mmsghdr` are plain old data; all zeroes is valid.
    let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for ((iov, h), d) in iovs.iter_mut().zip(&mut hdrs).zip(&datagrams[..count]) {
        *iov = libc::iovec { iov_base: d.as_ptr().cast_mut().cast(), iov_len: d.len() };
        let h = &mut h.msg_hdr;
        if let Some(to) = to {
            h.msg_name = to.as_ptr().cast_mut().cast();
            h.msg_namelen = to.len();
        }
        h.msg_iov = ptr::from_mut(iov);
        h.msg_iovlen = 1;
        if control_len > 0 {
            // The kernel only reads the control message, so every header can share it.
            h.msg_control = control.0.as_mut_ptr().cast();
            h.msg_controllen = control_len as _;
        }
    }
    // SAFETY: every header points at an iovec over a borrowed datagram, and at `to` and
    // `control`, all alive for the call; the kernel only reads them (module invariants).
    let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count as libc::c_uint, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
