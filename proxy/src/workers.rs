//! Data-plane worker threads, one per core: each runs its own current-thread tokio runtime.
//!
//! With workers, the [`Manager`](crate::Manager) binds every TCP listener once per worker, all
//! sockets in one `SO_REUSEPORT` group, and each worker accepts on its own socket and runs the
//! connections it accepted to their end on its own reactor. The kernel spreads new connections
//! over the group by a hash of their addresses. So a connection never changes threads, and no
//! thread wakes another for it: tokio's work-stealing scheduler, by contrast, runs a woken task on
//! whichever thread polled the reactor, and an idle thread steals from a busy one. With 2 threads
//! it made 6-10 % fewer new connections per second than HAProxy and nginx; per-thread runtimes
//! made as many as nginx and 3-10 % more than HAProxy (`benches/README.md`). This is how HAProxy
//! and nginx run their threads and workers.
//!
//! A UDP listener is bound once per worker as well; the kernel hashes each client to one socket of
//! the group, so the client's flow lives in that worker's table and its replies are relayed by
//! that worker.
//!
//! Health checks and the control plane stay on the runtime that drives the manager. Without
//! workers (`--worker-threads 1`) TCP and UDP listeners run there too.
//!
//! Ownership: the binary starts the workers and hands clones to the manager (through
//! [`ProxyConfig`](crate::ProxyConfig)). The threads stop when the last clone is dropped; tasks
//! still running on them are dropped with their runtime, so drop the workers only after the
//! manager has drained.

use std::{fmt, io, sync::Arc, time::Duration};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A set of data-plane threads, each driving one current-thread runtime. Cheap to clone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    /// Cancelled on drop: every thread's `block_on` returns and its runtime shuts down.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` threads (at least one), named `ferry-dp-{i}`, each with a current-thread
    /// runtime (I/O and timers enabled) that runs until the last clone of the result is dropped.
    /// Fails if a thread or runtime cannot be created; the threads started so far then stop.
    pub fn start(n: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.max(1));
        // On an early return, `guard` cancels `stop`, so the threads started so far end.
        let guard = stop.clone().drop_guard();
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            std::thread::Builder::new().name(format!("ferry-dp-{i}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async move {
                    // See `TIMER_TICK`: one idle timer per runtime keeps arming a connect timeout
                    // from waking the driver.
                    let _tick = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(tick()));
                    stop.cancelled().await;
                });
            })?;
            handles.push(rx.recv().map_err(|_| io::Error::other("a worker thread exited at start"))??);
        }
        guard.disarm();
        Ok(Self { inner: Arc::new(Inner { handles, stop }) })
    }

    /// The runtimes, one per thread (at least one).
    pub fn handles(&self) -> &[Handle] {
        &self.inner.handles
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workers").field("threads", &self.handles().len()).finish()
    }
}

/// Period of the idle timer that runs on every runtime serving TCP listeners.
///
/// Tokio wakes its driver through an eventfd whenever a timer is armed to fire before the
/// driver's next planned wake-up. Every proxied TCP connection arms one (its connect timeout,
/// 1 s by default), and with no earlier timer pending each arming costs a `write(2)` and an extra
/// `epoll_wait` return. A timer that fires this often keeps the planned wake-up ahead of those
/// deadlines, for 4 wake-ups a second.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(250);

/// Fires every [`TIMER_TICK`], doing nothing else.
pub(crate) async fn tick() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    loop {
        tick.tick().await;
    }
}
