//! Test harness: runs the real `ferry` binary on loopback with real backends.
//!
//! Every resource here cleans up on drop (child processes are killed, temp dirs removed), so a
//! failing test leaves nothing behind. Readiness comes from ferry's JSON log lines and its admin
//! server, never from sleeps.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};

/// Upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// A free UDP loopback port.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("bind udp").port()
}

/// A temporary configuration directory, removed on drop.
pub struct ConfigDir {
    path: PathBuf,
}

impl ConfigDir {
    pub fn new() -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ferry-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create config dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` atomically (write to a dotfile, then rename), as editors and ConfigMaps do.
    pub fn write(&self, name: &str, contents: &str) {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write config");
        std::fs::rename(&tmp, self.path.join(name)).expect("rename config");
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// YAML for one Listener.
pub fn listener_yaml(
    name: &str,
    address: SocketAddr,
    protocol: &str,
    backends: &[SocketAddr],
    extra: &str,
) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "apiVersion: ferry.ethercluster.io/v1alpha1\nkind: Listener\nmetadata:\n  name: {name}\nspec:\n  \
         address: \"{address}\"\n  protocol: {protocol}\n  backends: [{}]\n{extra}",
        backends.join(", ")
    )
}

/// A running `ferry` process.
pub struct Ferry {
    child: Child,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The namespace the admin server lives in (`None`: the test's own).
    admin_netns: Option<String>,
}

impl Ferry {
    /// Starts `ferry lb --config dir` and waits until it serves its first snapshot.
    pub fn start(dir: &ConfigDir, extra_args: &[&str]) -> Self {
        let ferry = Self::spawn(dir, extra_args);
        ferry
            .wait_log(DEADLINE, |l| msg(l) == "configuration loaded; serving")
            .expect("ferry never became ready");
        ferry
    }

    /// Starts `ferry lb --config dir` without waiting for readiness (only for the admin address).
    pub fn spawn(dir: &ConfigDir, extra_args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(["lb", "--config"])
            .arg(dir.path())
            .args([
                "--admin-address",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--log-level",
                "info,ferry=debug",
            ])
            .args(defaults(extra_args))
            .args(extra_args);
        Self::spawn_command(cmd, None)
    }

    /// Starts `cmd` (a ferry command line logging JSON with an admin server on port 0) and waits
    /// for its admin server; `admin_netns` is the namespace it runs in, if any.
    pub fn spawn_command(mut cmd: Command, admin_netns: Option<&str>) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ferry] {line}");
                let value = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                sink.lock().expect("log lock").push(value);
            }
        });
        let mut ferry = Self {
            child,
            admin: "0.0.0.0:0".parse().expect("addr"),
            logs,
            admin_netns: admin_netns.map(str::to_owned),
        };
        let line = ferry
            .wait_log(DEADLINE, |l| msg(l) == "admin server listening")
            .expect("ferry did not start its admin server");
        ferry.admin = line["address"].as_str().and_then(|a| a.parse().ok()).expect("admin address in log");
        ferry
    }

    /// Waits for a log line matching `pred`; returns it.
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.wait_log_after(0, timeout, pred)
    }

    /// Number of log lines so far (a cursor for [`Ferry::wait_log_after`]).
    pub fn log_len(&self) -> usize {
        self.logs.lock().expect("log lock").len()
    }

    /// Waits for a log line at index `from` or later matching `pred`.
    pub fn wait_log_after(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(l) = self.logs.lock().expect("log lock").iter().skip(from).find(|l| pred(l)) {
                return Some(l.clone());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// `GET path` on the admin server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        match &self.admin_netns {
            None => http_get(self.admin, path),
            Some(ns) => crate::netns::enter(ns, || http_get(self.admin, path)),
        }
    }

    /// The value of a metric line with all `labels` (e.g. `listener="web"`), summed over matches.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The live snapshot (`/debug/snapshot`).
    pub fn snapshot(&self) -> serde_json::Value {
        let (status, body) = self.get("/debug/snapshot");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("snapshot JSON")
    }

    /// Waits until the snapshot version is at least `version`.
    pub fn wait_version(&self, version: u64) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let snap = self.snapshot();
            if snap["version"].as_u64().unwrap_or(0) >= version {
                return snap;
            }
            assert!(start.elapsed() < DEADLINE, "snapshot version never reached {version}: {snap}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Default flags for tests, minus those a test sets itself.
fn defaults(extra_args: &[&str]) -> Vec<&'static str> {
    [("--reload-debounce", "50ms"), ("--drain-timeout", "5s"), ("--worker-threads", "2")]
        .into_iter()
        .filter(|(flag, _)| !extra_args.contains(flag))
        .flat_map(|(flag, value)| [flag, value])
        .collect()
}

/// The `message` field of a JSON log line.
pub fn msg(line: &serde_json::Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

/// A minimal blocking HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = StdTcpStream::connect_timeout(&addr, DEADLINE).expect("connect admin");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A TCP backend that answers each connection with its name, then echoes what it reads until EOF.
pub struct TcpBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpBackend {
    pub async fn start(name: &'static str) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.expect("bind backend"), name)
    }

    /// Serves on an already-bound listener (e.g. one made inside a network namespace).
    pub fn serve(listener: TcpListener, name: &'static str) -> Self {
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.write_all(b"bye\n").await;
                });
            }
        });
        Self { addr, task }
    }

    /// Stops accepting and closes the listening socket (established connections keep running).
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP backend that replies to each datagram with `name:` followed by the datagram.
pub struct UdpBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpBackend {
    pub async fn start(name: &'static str) -> Self {
        Self::serve(UdpSocket::bind("127.0.0.1:0").await.expect("bind udp backend"), name)
    }

    /// Serves on an already-bound socket (e.g. one made inside a network namespace).
    pub fn serve(sock: UdpSocket, name: &'static str) -> Self {
        let addr = sock.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let mut reply = Vec::with_capacity(n + name.len() + 1);
                reply.extend_from_slice(name.as_bytes());
                reply.push(b':');
                reply.extend_from_slice(&buf[..n]);
                if reply.len() > 65_507 {
                    reply = buf[..n].to_vec();
                }
                let _ = sock.send_to(&reply, peer).await;
            }
        });
        Self { addr, task }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects through ferry and returns the backend name from the greeting line.
pub async fn tcp_hello(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(addr)).await??;
    read_greeting(&mut s).await
}

/// Reads a backend's greeting line (its name), byte by byte so nothing after it is consumed.
pub async fn read_greeting(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut byte)).await??;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before greeting"));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// An HTTP/1.0 backend answering every request with `status` and its name as the body.
/// The status can be changed while it runs (to fail or pass health checks).
pub struct HttpBackend {
    pub addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http backend");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let current = status.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let code = current.load(std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    let resp = format!(
                        "HTTP/1.0 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                        name.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self { addr, status, task }
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.0 request through `front`; returns the response body.
pub async fn http_body(front: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(front)).await??;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut resp = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut resp)).await??;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    resp.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("no HTTP response: {resp:?}"))
    })
}
