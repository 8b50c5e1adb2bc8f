//! Network namespaces for node-proxy tests: a small network per test, removed on drop.
//!
//! Sockets are created inside a namespace by a short-lived thread that `setns(2)`s into it; a
//! socket stays in the namespace it was created in, so the test then uses it from its own
//! runtime. Processes run in a namespace with `ip netns exec`. Names carry the test process id
//! and a sequence number, so parallel tests never collide; `Drop` deletes every namespace and so
//! every veth and address inside it.

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// A network namespace owned by the test.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with `lo` up.
    pub fn new(role: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!("fit{}-{}-{role}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args...`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// A command that runs inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]));
    }

    /// Reads a sysctl inside the namespace.
    pub fn read_sysctl(&self, key: &str) -> String {
        let out = self.command("sysctl").args(["-n", key]).output().expect("sysctl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        enter(&self.name, f)
    }

    /// A listening TCP socket in this namespace, for tokio.
    pub fn tcp_listener(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = self
            .enter(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        l.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpListener::from_std(l).expect("tokio listener")
    }

    /// A TCP connection from this namespace (from `source` if given).
    pub fn tcp_connect(&self, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let s = self.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?;
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    }

    /// A UDP socket in this namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> tokio::net::UdpSocket {
        let s = self
            .enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::UdpSocket::from_std(s).expect("tokio udp")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs `f` on a thread that has entered the namespace `name`.
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd; only this short-lived thread switches.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Connects `a` and `b` with a veth pair: `a_if` with `a_addr` (CIDR) in `a`, `b_if` with `b_addr` in `b`.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    run(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]));
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if addr.contains(':') {
            ns.ip(&["-6", "addr", "add", addr, "dev", ifname, "nodad"]);
        } else {
            ns.ip(&["addr", "add", addr, "dev", ifname]);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
