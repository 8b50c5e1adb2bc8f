//! `ferry lb`: the standalone load balancer.
//!
//! Wiring: [`Daemon`] (file source, publisher, admin server, signals) -> a [`Manager`] serving
//! every `Listener` frontend. Signals: SIGHUP reloads, SIGTERM/SIGINT starts a drain (readiness
//! fails at once, listeners close, open connections get `--drain-timeout`), a second signal exits
//! at once.

use anyhow::Context as _;
use ferry_proxy::{Manager, ProxyConfig};

use crate::{
    cli::LbArgs,
    daemon::{self, Daemon, Source},
    telemetry,
};

/// Runs `ferry lb` to completion.
pub(crate) fn run(args: LbArgs) -> anyhow::Result<()> {
    daemon::runtime(&args.run)?.block_on(serve(args))
}

async fn serve(args: LbArgs) -> anyhow::Result<()> {
    let workers = daemon::workers(&args.run)?;
    let metrics = telemetry::init_metrics()?;
    let Some(daemon) = Daemon::start(
        Source::Files { dir: args.config.clone(), node: None, proxy_name: None },
        &args.run,
        metrics,
        &[],
    )
    .await?
    else {
        return Ok(());
    };

    // Bind the first snapshot's listeners before declaring readiness; at startup a frontend that
    // cannot be bound is a configuration error, so exit and say which.
    let mut manager = Manager::new(ProxyConfig {
        drain_timeout: args.run.drain_timeout,
        workers,
        handoff: daemon.handoff(),
        ..ProxyConfig::default()
    });
    let snapshot = daemon.snapshots.current();
    let errors = manager.apply(&snapshot);
    if !errors.is_empty() {
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let config = daemon.source.clone();
        daemon.stop().await;
        anyhow::bail!("cannot serve {config}: {}", messages.join("; "));
    }
    for (frontend, address) in manager.bound() {
        tracing::info!(?frontend, %address, "listening");
    }
    daemon.serving();
    tracing::info!(
        version = snapshot.version,
        listeners = snapshot.frontends.len(),
        config = %daemon.source,
        "configuration loaded; serving"
    );

    let result = manager.run(daemon.snapshots.subscribe(), daemon.shutdown.clone()).await;
    daemon.stop().await;
    result.context("the data plane failed")?;
    tracing::info!("drained; exiting");
    Ok(())
}
