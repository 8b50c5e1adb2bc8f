//! What every long-running command shares: the runtime, the admin server, the file source and
//! publisher, and signal handling.
//!
//! [`Daemon::start`] binds the admin server, starts the source and waits for the first snapshot
//! (the initial sync); the command then builds its data plane over [`Daemon::snapshots`] and
//! calls [`Daemon::serving`] once that data plane serves, which is what `/readyz` reports.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use ferry_watch::{FileSource, FileSourceOptions, ReloadHandle, Snapshots, SourceError};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, signal::unix::SignalKind, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    cli::RunArgs,
};

/// Builds the tokio runtime with `--worker-threads`.
pub(crate) fn runtime(args: &RunArgs) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match args.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        // One thread: the current-thread scheduler has no work-stealing or cross-thread wake-up
        // costs, and everything (data plane, admin, reloads) runs on that one thread.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.thread_name("ferry-worker").enable_all().build().context("starting the async runtime")
}

/// A started daemon: admin server, source and signal handling running, first snapshot published.
pub(crate) struct Daemon {
    /// The published snapshots.
    pub(crate) snapshots: Snapshots,
    /// Cancelled by SIGTERM/SIGINT: the data plane drains and returns.
    pub(crate) shutdown: CancellationToken,
    /// The config directory (for messages).
    pub(crate) config: PathBuf,
    serving: Arc<AtomicBool>,
    admin_stop: CancellationToken,
    admin_tasks: Vec<JoinHandle<()>>,
    source_stop: CancellationToken,
    source_task: JoinHandle<Result<(), SourceError>>,
}

impl Daemon {
    /// Starts the admin server(s), signal handling and the file source, and waits for the initial
    /// sync. `Ok(None)`: a shutdown signal arrived first. `extra_admin` are further addresses
    /// serving the same admin routes (kube-proxy's `--metrics-bind-address`).
    pub(crate) async fn start(
        config: PathBuf,
        node: Option<String>,
        proxy_name: Option<String>,
        run: &RunArgs,
        metrics: PrometheusHandle,
        extra_admin: &[std::net::SocketAddr],
    ) -> anyhow::Result<Option<Self>> {
        let shutdown = CancellationToken::new();
        let (publisher, snapshots) = ferry_watch::publisher();
        let (source, reload) = FileSource::new(
            config.clone(),
            FileSourceOptions {
                node,
                debounce: run.reload_debounce,
                resolve_interval: run.resolve_interval,
                proxy_name,
            },
        );

        let serving = Arc::new(AtomicBool::new(false));
        let admin_state = AdminState {
            snapshots: snapshots.clone(),
            serving: serving.clone(),
            metrics,
            shutdown: shutdown.clone(),
        };
        let admin_stop = CancellationToken::new();
        let mut admin_tasks = Vec::new();
        for (i, address) in std::iter::once(&run.admin_address).chain(extra_admin).enumerate() {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the admin address {address}"))?;
            let local = listener.local_addr().context("reading the admin address")?;
            if i == 0 {
                tracing::info!(address = %local, "admin server listening");
            } else {
                tracing::info!(address = %local, "metrics server listening");
            }
            admin_tasks.push(tokio::spawn(admin::serve(listener, admin_state.clone(), admin_stop.clone())));
        }

        tokio::spawn(handle_signals(reload, shutdown.clone()));

        let source_stop = CancellationToken::new();
        let mut source_task = tokio::spawn(source.run(publisher, source_stop.clone()));
        tokio::select! {
            () = snapshots.wait_ready() => {}
            res = &mut source_task => {
                admin_stop.cancel();
                return match res {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(error)) => Err(error).with_context(|| format!("loading {}", config.display())),
                    Err(error) => Err(error).context("the file source task failed"),
                };
            }
            () = shutdown.cancelled() => {
                source_stop.cancel();
                admin_stop.cancel();
                return Ok(None);
            }
        }
        Ok(Some(Self {
            snapshots,
            shutdown,
            config,
            serving,
            admin_stop,
            admin_tasks,
            source_stop,
            source_task,
        }))
    }

    /// Marks the data plane as serving: `/readyz` turns 200.
    pub(crate) fn serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Stops the source and the admin servers (after the data plane has drained).
    pub(crate) async fn stop(self) {
        self.source_stop.cancel();
        self.admin_stop.cancel();
        for task in self.admin_tasks {
            let _ = task.await;
        }
        if let Ok(Err(error)) = self.source_task.await {
            tracing::warn!(%error, "file source stopped with an error");
        }
    }
}

/// SIGHUP reloads; the first SIGTERM/SIGINT starts a graceful drain; a second one exits at once.
async fn handle_signals(reload: ReloadHandle, shutdown: CancellationToken) {
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        tokio::signal::unix::signal(SignalKind::hangup()),
        tokio::signal::unix::signal(SignalKind::terminate()),
        tokio::signal::unix::signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGHUP reload and graceful SIGTERM are unavailable");
        return;
    };
    loop {
        let name = tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                reload.reload();
                continue;
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if shutdown.is_cancelled() {
            tracing::warn!(signal = name, "second shutdown signal: exiting without draining");
            std::process::exit(1);
        }
        tracing::info!(signal = name, "shutting down: closing listeners and draining connections");
        shutdown.cancel();
    }
}
