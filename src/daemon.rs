//! What every long-running command shares: the runtime, the admin server, the source (files or
//! the Kubernetes API) and publisher, and signal handling.
//!
//! [`Daemon::start`] binds the admin server, starts the source and waits for the first snapshot
//! (the initial sync); the command then builds its data plane over [`Daemon::snapshots`] and
//! calls [`Daemon::serving`] once that data plane serves, which is what `/readyz` reports.
//!
//! With `--handoff-socket`, [`Daemon::start`] first takes over the running process's sockets
//! ([`Handoff`]); every server of the command binds through [`Daemon::handoff`]. `serving` then
//! tells that predecessor to stop, and offers this process's sockets to the next one; a successor
//! taking them cancels [`Daemon::shutdown`] (the SIGTERM drain), after which [`Daemon::stop`]
//! waits for the signal.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use ferry_proxy::{Handoff, Workers};
use ferry_watch::{
    ClientConfig, FileSource, FileSourceOptions, KubeSource, KubeSourceOptions, ReloadHandle, Snapshots,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{signal::unix::SignalKind, task::JoinHandle};
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

/// The data-plane threads that serve TCP listeners ([`Workers`]): `--worker-threads` of them (by
/// default one per CPU), or none with one thread, where the current-thread runtime serves
/// everything. They stop when the manager holding them is dropped, after its drain.
pub(crate) fn workers(args: &RunArgs) -> anyhow::Result<Option<Workers>> {
    let n =
        args.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    if n <= 1 {
        return Ok(None);
    }
    Workers::start(n).map(Some).context("starting the data-plane threads")
}

/// Where the desired state comes from.
pub(crate) enum Source {
    /// A directory of manifests (`--config`), watched for changes.
    Files {
        /// The directory.
        dir: PathBuf,
        /// This node's name (`None`: standalone).
        node: Option<String>,
        /// `--service-proxy-name`.
        proxy_name: Option<String>,
    },
    /// The Kubernetes API server (`--kubeconfig`, or in-cluster).
    Kube(KubeSourceOptions),
}

impl Source {
    /// How the source is named in messages: the directory, or the kubeconfig.
    fn describe(&self) -> String {
        match self {
            Self::Files { dir, .. } => dir.display().to_string(),
            Self::Kube(options) => match &options.client {
                ClientConfig::Kubeconfig(path) => format!("the API server of kubeconfig {}", path.display()),
                ClientConfig::InCluster | ClientConfig::Infer => {
                    "the in-cluster API server (neither --kubeconfig nor --config was given)".to_owned()
                }
            },
        }
    }
}

/// A started daemon: admin server, source and signal handling running, first snapshot published.
pub(crate) struct Daemon {
    /// The published snapshots.
    pub(crate) snapshots: Snapshots,
    /// Cancelled by SIGTERM/SIGINT: the data plane drains and returns.
    pub(crate) shutdown: CancellationToken,
    /// The source, for messages (the config directory, or the API server).
    pub(crate) source: String,
    handoff: Arc<Handoff>,
    serving: Arc<AtomicBool>,
    /// Cancelled by the first SIGTERM/SIGINT.
    signalled: CancellationToken,
    /// Cancelled when a successor took over this process's sockets; `shutdown` is its child.
    handed_over: CancellationToken,
    /// Cancelled when this process's predecessor has stopped (never without one).
    taken_over: CancellationToken,
    admin_stop: CancellationToken,
    admin_tasks: Vec<JoinHandle<()>>,
    _registrations: Vec<ferry_proxy::handoff::Registration>,
    source_stop: CancellationToken,
    source_task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Starts the admin server(s), signal handling and the source, and waits for the initial
    /// sync (for the API server: every watched kind listed). `Ok(None)`: a shutdown signal arrived
    /// first. `extra_admin` are further addresses serving the same admin routes (kube-proxy's
    /// `--metrics-bind-address`).
    pub(crate) async fn start(
        source: Source,
        run: &RunArgs,
        metrics: PrometheusHandle,
        extra_admin: &[std::net::SocketAddr],
    ) -> anyhow::Result<Option<Self>> {
        match ferry_proxy::raise_nofile_limit() {
            Ok((old, new)) => tracing::debug!(old, new, "file descriptor limit (RLIMIT_NOFILE)"),
            Err(error) => tracing::warn!(%error, "cannot raise the file descriptor limit"),
        }
        let handoff = match &run.handoff_socket {
            None => Handoff::disabled(),
            Some(path) => match Handoff::take_over(path.clone()).await {
                Ok(handoff) => {
                    if let Some(pid) = handoff.predecessor() {
                        tracing::info!(
                            pid,
                            sockets = handoff.inherited(),
                            "taking over from the running process"
                        );
                    }
                    handoff
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot take over the running process's sockets; binding new ones");
                    Handoff::without_predecessor(Some(path.clone()))
                }
            },
        };
        // A successor taking over starts the drain, at once (see `Handoff::serve`).
        let handed_over = CancellationToken::new();
        let shutdown = handed_over.child_token();
        let signalled = CancellationToken::new();
        let taken_over = CancellationToken::new();
        let (publisher, snapshots) = ferry_watch::publisher();
        let description = source.describe();

        let serving = Arc::new(AtomicBool::new(false));
        let admin_state = AdminState {
            snapshots: snapshots.clone(),
            serving: serving.clone(),
            metrics,
            shutdown: shutdown.clone(),
        };
        let admin_stop = CancellationToken::new();
        let mut admin_tasks = Vec::new();
        let mut registrations = Vec::new();
        for (i, address) in std::iter::once(&run.admin_address).chain(extra_admin).enumerate() {
            let (listener, registration) = handoff
                .tcp_listener(*address)
                .with_context(|| format!("binding the admin address {address}"))?;
            registrations.push(registration);
            let local = listener.local_addr().context("reading the admin address")?;
            if i == 0 {
                tracing::info!(address = %local, "admin server listening");
            } else {
                tracing::info!(address = %local, "metrics server listening");
            }
            admin_tasks.push(tokio::spawn(admin::serve(listener, admin_state.clone(), admin_stop.clone())));
        }

        if let Some(path) = &run.admin_socket {
            // A file left by an earlier process of this pod (the path is per pod).
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("removing the old admin socket {}", path.display()));
                }
                _ => {}
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the admin socket {}", path.display()))?;
            tracing::info!(path = %path.display(), "admin socket listening");
            admin_tasks.push(tokio::spawn(admin::serve_unix(
                listener,
                admin_state.clone(),
                admin_stop.clone(),
            )));
        }

        let source_stop = CancellationToken::new();
        let mut source_task = match source {
            Source::Files { dir, node, proxy_name } => {
                let (files, reload) = FileSource::new(
                    dir,
                    FileSourceOptions {
                        node,
                        debounce: run.reload_debounce,
                        resolve_interval: run.resolve_interval,
                        proxy_name,
                    },
                );
                tokio::spawn(handle_signals(Some(reload), shutdown.clone(), signalled.clone()));
                let stop = source_stop.clone();
                tokio::spawn(async move { Ok(files.run(publisher, stop).await?) })
            }
            Source::Kube(options) => {
                let kube = KubeSource::connect(options)
                    .await
                    .inspect_err(|_| admin_stop.cancel())
                    .with_context(|| format!("connecting to {description}"))?;
                tokio::spawn(handle_signals(None, shutdown.clone(), signalled.clone()));
                let stop = source_stop.clone();
                tokio::spawn(async move {
                    kube.run(publisher, stop).await;
                    Ok(())
                })
            }
        };
        tokio::select! {
            () = snapshots.wait_ready() => {}
            res = &mut source_task => {
                admin_stop.cancel();
                return match res {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(error)) => Err(error).with_context(|| format!("loading {description}")),
                    Err(error) => Err(error).context("the source task failed"),
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
            source: description,
            handoff,
            serving,
            signalled,
            handed_over,
            taken_over,
            admin_stop,
            admin_tasks,
            _registrations: registrations,
            source_stop,
            source_task,
        }))
    }

    /// Marks the data plane as serving: `/readyz` turns 200. With `--handoff-socket`, completes
    /// a takeover (the predecessor stops accepting; then [`Daemon::taken_over`]) and then offers
    /// this process's sockets to a successor; when one takes them and serves, this process
    /// drains as on SIGTERM.
    pub(crate) fn serving(&self) {
        self.serving.store(true, Ordering::Release);
        let (handoff, taken_over) = (self.handoff.clone(), self.taken_over.clone());
        let (handed_over, shutdown) = (self.handed_over.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            if handoff.complete_takeover().await.is_some() {
                taken_over.cancel();
            }
            if let Err(error) = handoff.serve(handed_over.clone(), shutdown).await {
                tracing::warn!(%error, "handoff socket failed; a successor will bind its own sockets");
            }
            if handed_over.is_cancelled() {
                tracing::info!("handed over to a successor: closing listeners and draining connections");
            }
        });
    }

    /// Completes once the predecessor has stopped, so that only this process changes shared
    /// kernel state from then on; never without a predecessor.
    pub(crate) async fn taken_over(&self) {
        self.taken_over.cancelled().await;
    }

    /// Sockets inherited from a predecessor, and the registry a successor takes over from.
    pub(crate) fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Stops the source and the admin servers (after the data plane has drained). A process that
    /// handed over to a successor then waits for SIGTERM: exiting by itself would have its
    /// container restarted, and the restarted process take the sockets back.
    pub(crate) async fn stop(self) {
        self.source_stop.cancel();
        self.admin_stop.cancel();
        for task in self.admin_tasks {
            let _ = task.await;
        }
        if let Ok(Err(error)) = self.source_task.await {
            tracing::warn!(error = format!("{error:#}"), "source stopped with an error");
        }
        if self.handed_over.is_cancelled() && !self.signalled.is_cancelled() {
            tracing::info!("drained after the handoff; waiting for SIGTERM to exit");
            self.signalled.cancelled().await;
        }
    }
}

/// SIGHUP reloads (a file source; the API source is always current); the first SIGTERM/SIGINT
/// starts a graceful drain (or, after a handoff, lets the drained process exit); a second one
/// exits at once.
async fn handle_signals(
    reload: Option<ReloadHandle>,
    shutdown: CancellationToken,
    signalled: CancellationToken,
) {
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
                match &reload {
                    Some(reload) => {
                        tracing::info!("SIGHUP: reloading configuration");
                        reload.reload();
                    }
                    None => tracing::info!("SIGHUP: nothing to reload (the API source is watched)"),
                }
                continue;
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if signalled.is_cancelled() {
            tracing::warn!(signal = name, "second shutdown signal: exiting without draining");
            std::process::exit(1);
        }
        signalled.cancel();
        if shutdown.is_cancelled() {
            tracing::info!(signal = name, "shutting down: already draining after the handoff");
        } else {
            tracing::info!(signal = name, "shutting down: closing listeners and draining connections");
            shutdown.cancel();
        }
    }
}
