//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)`, so a busy UDP thread pays two system calls
//! per batch of up to [`BATCH`] queries instead of two per query (Knot DNS does the same).
//!
//! The only `unsafe` code of the crate. Invariants the calls rely on:
//! - Every `iovec` points into a buffer owned by [`RecvBatch`] (or a borrowed reply slice) that
//!   outlives the call, with its true length.
//! - Every `msg_name` points to a `SockAddrStorage` (receive) or a `SockAddr` (send) that
//!   outlives the call, with its true length.
//! - Results are read only for the `n` entries the kernel reports as filled.
#![allow(unsafe_code)]

use std::{
    io,
    mem::{self, MaybeUninit},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    ptr,
};

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams received or sent per system call, at most.
pub(crate) const BATCH: usize = 32;

/// Receive buffers for one batch.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    from: [Option<SocketAddr>; BATCH],
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    filled: usize,
}

impl RecvBatch {
    /// Buffers of `size` bytes each.
    pub(crate) fn new(size: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            from: [None; BATCH],
            lens: [0; BATCH],
            truncated: [false; BATCH],
            filled: 0,
        }
    }

    /// Blocks for at least one datagram (subject to the socket's read timeout), then takes every
    /// datagram already queued, up to [`BATCH`]. Returns how many were received.
    pub(crate) fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.filled = 0;
        let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        let mut names: [SockAddrStorage; BATCH] = std::array::from_fn(|_| SockAddrStorage::zeroed());
        let mut hdrs: [libc::mmsghdr; BATCH] =
            // SAFETY: `mmsghdr` is plain old data; all zeroes is valid (null pointers, zero lengths).
            unsafe { mem::zeroed() };
        for i in 0..BATCH {
            let iov = iovs[i].write(libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            });
            let h = &mut hdrs[i].msg_hdr;
            h.msg_namelen = names[i].size_of();
            h.msg_name = ptr::from_mut(&mut names[i]).cast();
            h.msg_iov = ptr::from_mut(iov);
            h.msg_iovlen = 1;
        }
        // SAFETY: `hdrs` holds BATCH valid headers whose buffers and address slots are owned by
        // `self` (or live on this stack frame) and outlive the call; see the module invariants.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (i, (h, name)) in hdrs.iter().zip(names).enumerate().take(n) {
            self.lens[i] = h.msg_len as usize;
            // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into the zeroed slot.
            self.from[i] = unsafe { SockAddr::new(name, h.msg_hdr.msg_namelen) }.as_socket();
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        self.filled = n;
        Ok(n)
    }

    /// Datagram `i` of the last batch: its bytes, whether it was longer than the buffer, and
    /// its sender (`None` for a non-IP address).
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], bool, Option<SocketAddr>)> {
        if i >= self.filled {
            return None;
        }
        Some((&self.bufs[i][..self.lens[i].min(self.bufs[i].len())], self.truncated[i], self.from[i]))
    }
}

/// Sends every `(bytes, peer)` in as few `sendmmsg` calls as possible. A datagram the kernel
/// refuses is skipped (UDP gives no delivery guarantee); returns the number sent.
pub(crate) fn send_all(socket: &UdpSocket, replies: &[(&[u8], SocketAddr)]) -> usize {
    let mut sent = 0;
    let mut start = 0;
    while start < replies.len() {
        let chunk = &replies[start..replies.len().min(start + BATCH)];
        let addrs: Vec<SockAddr> = chunk.iter().map(|(_, a)| SockAddr::from(*a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(b, _)| libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() })
            .collect();
        // SAFETY: `mmsghdr` is plain old data; all zeroes is valid.
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len()).map(|_| unsafe { mem::zeroed() }).collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = addrs[i].as_ptr().cast_mut().cast();
            h.msg_hdr.msg_namelen = addrs[i].len();
            h.msg_hdr.msg_iov = ptr::from_mut(&mut iovs[i]);
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at an address in `addrs` and an iovec in `iovs` over a
        // borrowed reply, all alive for the call; the kernel only reads them (send).
        let n =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), hdrs.len() as libc::c_uint, 0) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => {
                sent += n;
                start += n;
            }
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::debug!(%error, peer = %chunk[0].1, "udp send failed");
                start += 1;
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn receives_and_sends_batches() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        server.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let to = server.local_addr().expect("addr");
        for i in 0..5u8 {
            client.send_to(&[i; 10], to).expect("send");
        }
        client.send_to(&[9; 100], to).expect("send");
        let mut batch = RecvBatch::new(50);
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = batch.recv(&server).expect("recv");
            for i in 0..n {
                let (bytes, truncated, from) = batch.get(i).expect("filled");
                assert_eq!(from, Some(client.local_addr().expect("addr")));
                got.push((bytes.to_vec(), truncated));
            }
        }
        assert_eq!(got[0], (vec![0; 10], false));
        assert_eq!(got[5], (vec![9; 50], true), "longer than the buffer: cut and flagged");
        assert!(batch.get(BATCH).is_none());

        let peer = client.local_addr().expect("addr");
        let replies: Vec<(&[u8], SocketAddr)> = vec![(b"one", peer), (b"two", peer)];
        assert_eq!(send_all(&server, &replies), 2);
        let mut buf = [0u8; 16];
        assert_eq!(client.recv(&mut buf).expect("recv"), 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(client.recv(&mut buf).expect("recv"), 3);
        assert_eq!(&buf[..3], b"two");
    }
}
