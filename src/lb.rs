//! `ferry lb`: the standalone load balancer.
//!
//! Wiring: [`FileSource`] -> [`Publisher`] -> ([`Snapshots`] for the admin server, a `watch`
//! receiver for the data plane). Signals: SIGHUP reloads, SIGTERM/SIGINT starts a drain (readiness
//! fails at once, listeners close, open connections get `--drain-timeout`), a second signal exits
//! at once.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use ferry_proxy::ProxyConfig;
use ferry_watch::{FileSource, FileSourceOptions, ReloadHandle};
use tokio::{net::TcpListener, signal::unix::SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    cli::{LbArgs, RunArgs},
    telemetry,
};

/// Runs `ferry lb` to completion.
pub(crate) fn run(args: LbArgs) -> anyhow::Result<()> {
    runtime(&args.run)?.block_on(serve(args))
}

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

async fn serve(args: LbArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics()?;
    let shutdown = CancellationToken::new();

    let (publisher, snapshots) = ferry_watch::publisher();
    let (source, reload) = FileSource::new(
        args.config.clone(),
        FileSourceOptions {
            node: None,
            debounce: args.run.reload_debounce,
            resolve_interval: args.run.resolve_interval,
        },
    );

    let admin_listener = TcpListener::bind(args.run.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", args.run.admin_address))?;
    let admin_address = admin_listener.local_addr().context("reading the admin address")?;
    tracing::info!(address = %admin_address, "admin server listening");
    let serving = Arc::new(AtomicBool::new(false));
    let admin_state = AdminState {
        snapshots: snapshots.clone(),
        serving: serving.clone(),
        metrics,
        shutdown: shutdown.clone(),
    };
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, admin_stop.clone()));

    tokio::spawn(handle_signals(reload, shutdown.clone()));

    let source_stop = CancellationToken::new();
    let mut source_task = tokio::spawn(source.run(publisher, source_stop.clone()));
    tokio::select! {
        () = snapshots.wait_ready() => {}
        res = &mut source_task => {
            admin_stop.cancel();
            return match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error).with_context(|| format!("loading {}", args.config.display())),
                Err(error) => Err(error).context("the file source task failed"),
            };
        }
        () = shutdown.cancelled() => {
            source_stop.cancel();
            admin_stop.cancel();
            return Ok(());
        }
    }
    // Bind the first snapshot's listeners before declaring readiness; at startup a frontend that
    // cannot be bound is a configuration error, so exit and say which.
    let mut manager = ferry_proxy::Manager::new(ProxyConfig {
        drain_timeout: args.run.drain_timeout,
        ..ProxyConfig::default()
    });
    let snapshot = snapshots.current();
    let errors = manager.apply(&snapshot);
    if !errors.is_empty() {
        source_stop.cancel();
        admin_stop.cancel();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("cannot serve {}: {}", args.config.display(), messages.join("; "));
    }
    for (frontend, address) in manager.bound() {
        tracing::info!(?frontend, %address, "listening");
    }
    serving.store(true, Ordering::Release);
    tracing::info!(
        version = snapshot.version,
        listeners = snapshot.frontends.len(),
        config = %args.config.display(),
        "configuration loaded; serving"
    );

    let result = manager.run(snapshots.subscribe(), shutdown.clone()).await;
    source_stop.cancel();
    admin_stop.cancel();
    let _ = admin_task.await;
    if let Ok(Err(error)) = source_task.await {
        tracing::warn!(%error, "file source stopped with an error");
    }
    result.context("the data plane failed")?;
    tracing::info!("drained; exiting");
    Ok(())
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
