//! The only `unsafe` in the crate: `pipe2(2)` and `splice(2)` for zero-copy TCP relaying (Linux),
//! `IP_PKTINFO` for UDP replies, the file-descriptor limit, and registering owned sockets with the
//! runtime's reactor ([`register`]).
//!
//! A [`Pipe`] is a non-blocking kernel pipe owned by one relay direction at a time. Pipes are
//! reused through a small per-thread cache ([`Pipe::take`] / [`Pipe::give_back`]): a pipe goes back
//! only when it is known to be empty, so a reused pipe never leaks bytes between connections.
#![allow(unsafe_code)]

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// How many idle pipes one thread keeps for reuse.
const CACHE: usize = 64;

/// Capacity asked for each pipe (`F_SETPIPE_SZ`): larger pipes move more per `splice` call, so
/// bulk transfers need fewer system calls and wake-ups. The kernel caps it at
/// `/proc/sys/fs/pipe-max-size` (1 MiB by default); pages are only used while data is in flight.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A non-blocking pipe: bytes spliced into `write` come out of `read`.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pipe from this thread's cache, or a new one.
    pub(crate) fn take() -> io::Result<Self> {
        if let Some(p) = PIPES.with(|c| c.borrow_mut().pop()) {
            return Ok(p);
        }
        Self::new()
    }

    /// Returns an empty pipe to this thread's cache (closes it when the cache is full).
    pub(crate) fn give_back(self) {
        PIPES.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < CACHE {
                c.push(self);
            }
        });
    }

    fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int and returns the new
        // capacity or -1 (then the default capacity stays, which is fine).
        let set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        // SAFETY: as above; F_GETPIPE_SZ takes no argument.
        let got = if set > 0 { set } else { unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) } };
        let capacity = usize::try_from(got).ok().filter(|&c| c > 0).unwrap_or(1 << 16);
        Ok(Self { read, write, capacity })
    }

    /// Bytes the pipe holds when full.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe.
    /// `Ok(0)` is end of stream; `WouldBlock` when the socket has no data (or the pipe is full).
    pub(crate) fn fill_from(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into the socket `to`.
    pub(crate) fn drain_to(&self, to: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice only reads and writes kernel objects named by the descriptors; null offsets
    // mean "use the file position", which is what sockets and pipes require. Invalid descriptors
    // produce EBADF, not undefined behaviour.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).expect("splice returned a non-negative count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_roundtrip_through_cache() {
        let p = Pipe::take().expect("pipe");
        p.give_back();
        let q = Pipe::take().expect("cached pipe");
        // An empty non-blocking pipe has nothing to give.
        let e = q.drain_to(q.write.as_raw_fd(), 16).expect_err("empty pipe");
        assert!(e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::InvalidInput);
    }
}

/// Local-address-aware UDP I/O (`IP_PKTINFO` / `IPV6_PKTINFO`) for frontends bound to an
/// unspecified address, so a reply leaves from the address the client targeted.
pub(crate) mod pktinfo {
    use std::{
        io,
        mem::{self, MaybeUninit},
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
        os::fd::RawFd,
    };

    use socket2::SockAddr;

    /// Control buffer, aligned for `cmsghdr`; large enough for one in(6)_pktinfo.
    #[repr(C, align(8))]
    struct Control([u8; 64]);

    fn setsockopt_on(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int whose size is passed; the kernel copies it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const one).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Asks the kernel to report each datagram's destination address.
    pub(crate) fn enable(fd: RawFd, v6: bool) -> io::Result<()> {
        if v6 {
            setsockopt_on(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
        } else {
            setsockopt_on(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)
        }
    }

    /// Receives one datagram: its length, source, and the local address it was sent to.
    pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut control = Control([0; 64]);
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = name.as_mut_ptr().cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        // SAFETY: every pointer in `msg` refers to a live buffer of the stated length.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(n).expect("recvmsg returned a non-negative count");
        // SAFETY: recvmsg wrote a sockaddr of `msg_namelen` bytes into the zeroed `name`; its
        // family says which sockaddr type it is, and both fit in sockaddr_storage.
        let from = unsafe {
            let name = name.assume_init();
            match libc::c_int::from(name.ss_family) {
                libc::AF_INET => {
                    let a: libc::sockaddr_in = std::ptr::read_unaligned((&raw const name).cast());
                    SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    ))
                }
                libc::AF_INET6 => {
                    let a: libc::sockaddr_in6 = std::ptr::read_unaligned((&raw const name).cast());
                    SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                        a.sin6_flowinfo,
                        a.sin6_scope_id,
                    ))
                }
                _ => return Err(io::Error::other("datagram from a non-IP address")),
            }
        };
        let mut local = None;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, bounded by
        // `msg_controllen`; each payload is read unaligned at its type's size.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
                if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        Ok((n, from, local))
    }

    /// Sends `buf` to `to` with source address `from`.
    pub(crate) fn send(fd: RawFd, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
        let to = SockAddr::from(match (to, from) {
            // A v4 peer on a v6 socket would be v4-mapped; frontends are V6ONLY, so this is rare.
            (SocketAddr::V4(a), IpAddr::V6(_)) => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            (SocketAddr::V6(a), IpAddr::V4(_)) => match a.ip().to_ipv4_mapped() {
                Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
                None => SocketAddr::V6(a),
            },
            (to, _) => to,
        });
        let mut control = Control([0; 64]);
        let mut iov = libc::iovec { iov_base: buf.as_ptr().cast_mut().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = to.as_ptr().cast_mut().cast();
        msg.msg_namelen = to.len();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: the control buffer is 64 bytes, enough for one CMSG_SPACE(in6_pktinfo) (40
        // bytes); CMSG_FIRSTHDR is non-null because msg_controllen covers a header; the
        // payload write stays within CMSG_LEN(size) bytes of the header.
        unsafe {
            let (level, ty, size) = match from {
                IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, mem::size_of::<libc::in_pktinfo>()),
                IpAddr::V6(_) => {
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, mem::size_of::<libc::in6_pktinfo>())
                }
            };
            let size = size as libc::c_uint;
            msg.msg_controllen = libc::CMSG_SPACE(size) as _;
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
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
                IpAddr::V6(ip) => {
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                        ipi6_ifindex: 0,
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
            }
        }
        // SAFETY: every pointer in `msg` refers to a live buffer of the stated length.
        let n = unsafe { libc::sendmsg(fd, &raw const msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).expect("sendmsg returned a non-negative count"))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (every listener, connection and upstream is
/// a descriptor; the usual soft default of 1024 caps a node at about a thousand Services).
/// Returns the (old soft, new soft) limits.
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read above; only the soft limit changed, within the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// Registers `io` (a non-blocking socket that owns its descriptor) with the runtime's reactor, for
/// read and write readiness. Must be called on a runtime thread.
///
/// Ferry's TCP relay uses [`AsyncFd`](tokio::io::unix::AsyncFd) over std sockets rather than
/// tokio's `TcpStream` because its readiness guard shows whether the peer's FIN has arrived
/// without a second poll (see `tcp::relay`).
pub(crate) fn register<T: AsRawFd>(io: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor (a std socket), so it stays open and the same until the
    // `AsyncFd` that owns `io` is dropped, which deregisters it before the descriptor closes.
    unsafe { tokio::io::unix::AsyncFd::register(io) }.map_err(|e| e.into_parts().1)
}
