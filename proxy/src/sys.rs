//! The only `unsafe` in the crate: `pipe2(2)` and `splice(2)` for zero-copy TCP relaying (Linux),
//! batched UDP I/O with `IP_PKTINFO` ([`mmsg`]), the file-descriptor limit, and registering owned
//! sockets with the runtime's reactor ([`register`]).
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

pub(crate) mod mmsg;

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
