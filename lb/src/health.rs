//! Active health checking: [`Checks`] runs one probe task per checked [`EndpointState`].
//!
//! Owner: the listener manager. After building pools it calls [`Checks::sync`] for each pool (or
//! [`Checks::sync_all`] with every pool, which also stops probes for states in none of them).
//! For a pool whose port has `health_check: Some(..)`, every endpoint state gets a probe task;
//! a changed `HealthCheck` restarts the task; a port without a check stops its states' tasks and
//! marks them healthy again.
//!
//! A probe task probes its endpoint every `interval` (the first probe right away), feeds the
//! result to a [`HealthMachine`] and writes the machine's state into the shared
//! [`EndpointState`]. Transitions are logged (fields `listener`, `endpoint`, `from`, `to`) and
//! exported as the gauge `ferry_endpoint_healthy{listener,endpoint}` (1 healthy, 0 not).
//!
//! Initial state: a new endpoint starts **healthy** (HAProxy's behaviour; Envoy starts unhealthy
//! until the first pass), so a reload or scale-up never blackholes traffic while the first
//! probes run. A restarted task (changed check) starts from the state's current health.
//!
//! Ownership of the health flag: each task claims a generation from the endpoint state when it
//! starts; a newer claim (restart) or a release (check removed) fences off every older task's
//! writes, so a task that is being stopped can never overwrite its successor's result.
//!
//! Tasks hold only a `Weak` to their state and stop when it is gone; they also stop when their
//! entry is removed, when [`Checks`] is dropped (cancellation token plus `abort`), or on
//! [`Checks::shutdown`]. Call `sync` from within a Tokio runtime (tasks are `tokio::spawn`ed).

mod machine;
mod probe;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Weak},
    time::Duration,
};

use ferry_model::HealthCheck;
use tokio::{task::JoinHandle, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub use self::{
    machine::HealthMachine,
    probe::{MAX_STATUS_LINE, ProbeError, parse_status_line, probe},
};
use crate::{EndpointState, Pool};

/// Smallest probe interval; shorter configured intervals are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The active health checks of every synced pool.
#[derive(Debug, Default)]
pub struct Checks {
    /// Keyed by the address of the `EndpointState` (`Arc::as_ptr`).
    probes: HashMap<usize, Probe>,
    /// Parent of every task's token.
    root: CancellationToken,
}

/// One running probe task.
#[derive(Debug)]
struct Probe {
    state: Weak<EndpointState>,
    check: HealthCheck,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

fn key(state: &Arc<EndpointState>) -> usize {
    Arc::as_ptr(state) as usize
}

// === impl Checks ===

impl Checks {
    /// No checks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of running probe tasks.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Whether no probe task runs.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Whether `state` has a running probe task.
    pub fn is_checked(&self, state: &Arc<EndpointState>) -> bool {
        self.probes.get(&key(state)).is_some_and(|p| p.state.ptr_eq(&Arc::downgrade(state)))
    }

    /// Brings `pool`'s states in line with its port's `health_check`: starts probes for new
    /// states, restarts those whose check changed, stops (and marks healthy) those of a port
    /// without a check. Also stops probes whose state no longer exists.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, when a probe must be started.
    pub fn sync(&mut self, pool: &Pool) {
        self.probes.retain(|_, p| p.state.strong_count() > 0);
        let check = pool.port().health_check.as_ref();
        let mut listener: Option<Arc<str>> = None;
        for state in pool.endpoints() {
            let k = key(state);
            let current = self.probes.get(&k).filter(|p| p.state.ptr_eq(&Arc::downgrade(state)));
            match (check, current) {
                (None, None) => {}
                (None, Some(_)) => {
                    if let Some(p) = self.probes.remove(&k) {
                        p.stop();
                    }
                }
                (Some(c), Some(p)) if p.check == *c => {}
                (Some(c), _) => {
                    // Dropping the old probe cancels it; the new claim fences its writes.
                    self.probes.remove(&k);
                    let listener = listener.get_or_insert_with(|| pool.port().display_name().into()).clone();
                    let probe = self.start(state, c, listener);
                    self.probes.insert(k, probe);
                }
            }
        }
    }

    /// [`Self::sync`] for every pool, then stops (and marks healthy) every probe whose state is in
    /// none of `pools`.
    pub fn sync_all<'a>(&mut self, pools: impl IntoIterator<Item = &'a Pool>) {
        let mut live = HashSet::new();
        for pool in pools {
            self.sync(pool);
            if pool.port().health_check.is_some() {
                live.extend(pool.endpoints().iter().map(key));
            }
        }
        let stale: Vec<usize> = self.probes.keys().filter(|k| !live.contains(k)).copied().collect();
        for k in stale {
            if let Some(p) = self.probes.remove(&k) {
                p.stop();
            }
        }
    }

    /// Stops every probe task and waits for them to finish. States keep their last health.
    pub async fn shutdown(&mut self) {
        self.root.cancel();
        let tasks: Vec<_> = self.probes.drain().filter_map(|(_, mut p)| p.task.take()).collect();
        for task in tasks {
            // A cancelled task returns promptly; a panicked one has nothing left to clean up.
            let _ = task.await;
        }
    }

    fn start(&self, state: &Arc<EndpointState>, check: &HealthCheck, listener: Arc<str>) -> Probe {
        let cancel = self.root.child_token();
        let generation = state.claim_check();
        let task = tokio::spawn(run(
            Arc::downgrade(state),
            state.addr,
            generation,
            check.clone(),
            listener,
            cancel.clone(),
        ));
        Probe { state: Arc::downgrade(state), check: check.clone(), cancel, task: Some(task) }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

// === impl Probe ===

impl Probe {
    /// Stops the task and marks the endpoint healthy (its check is gone).
    fn stop(self) {
        if let Some(state) = self.state.upgrade() {
            state.release_check();
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The probe loop of one endpoint.
async fn run(
    state: Weak<EndpointState>,
    addr: SocketAddr,
    generation: u64,
    check: HealthCheck,
    listener: Arc<str>,
    cancel: CancellationToken,
) {
    let Some(initial) = state.upgrade().map(|s| s.is_healthy()) else {
        return;
    };
    let endpoint = addr.to_string();
    let gauge =
        metrics::gauge!("ferry_endpoint_healthy", "listener" => listener.to_string(), "endpoint" => endpoint);
    gauge.set(if initial { 1.0 } else { 0.0 });
    let mut machine = HealthMachine::new(&check, initial);
    let mut ticker = tokio::time::interval(check.interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            r = probe(addr, &check) => r,
        };
        let Some(state) = state.upgrade() else {
            return;
        };
        if let Err(error) = &result {
            tracing::debug!(listener = %listener, endpoint = %addr, %error, "health probe failed");
        }
        let transition = machine.observe(result.is_ok());
        if !state.set_healthy_as(generation, machine.is_healthy()) {
            // Superseded by a restart or a release.
            return;
        }
        if let Some(healthy) = transition {
            gauge.set(if healthy { 1.0 } else { 0.0 });
            let (from, to) = if healthy { ("unhealthy", "healthy") } else { ("healthy", "unhealthy") };
            match result {
                Ok(()) => tracing::info!(
                    listener = %listener, endpoint = %addr, from, to, "endpoint health changed"
                ),
                Err(error) => tracing::warn!(
                    listener = %listener, endpoint = %addr, from, to, %error, "endpoint health changed"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests;
