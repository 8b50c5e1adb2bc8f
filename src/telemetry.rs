//! Logging (`tracing`) and metrics (Prometheus recorder) setup.

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::LogFormat;

/// Installs the global tracing subscriber writing to stderr.
pub(crate) fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("invalid --log-level {filter:?}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr),
            )
            .try_init(),
    }
    .context("installing the log subscriber")
}

/// Histogram buckets (seconds) for snapshot build and programming durations.
const DURATION_BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Installs the global Prometheus recorder and returns the handle the admin server renders.
pub(crate) fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let mut builder =
        PrometheusBuilder::new().set_buckets(DURATION_BUCKETS).context("configuring histogram buckets")?;
    // kube-proxy's histograms keep kube-proxy's buckets, so existing dashboards and SLOs still apply.
    for (name, buckets) in ferry_proxy::health::metrics::histogram_buckets() {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), &buckets)
            .with_context(|| format!("configuring the buckets of {name}"))?;
    }
    let handle = builder.install_recorder().context("installing the metrics recorder")?;
    ferry_proxy::health::metrics::describe();
    metrics::describe_counter!(
        "ferry_listener_connections_total",
        "Connections (TCP) or flows (UDP) accepted"
    );
    metrics::describe_gauge!(
        "ferry_listener_active_connections",
        "Connections (TCP) or flows (UDP) open now"
    );
    metrics::describe_counter!("ferry_listener_bytes_total", "Bytes proxied; rx from clients, tx to clients");
    metrics::describe_counter!("ferry_listener_connect_failures_total", "Failed upstream connect attempts");
    metrics::describe_counter!(
        "ferry_listener_no_endpoint_total",
        "Connections or datagrams refused because no endpoint was usable"
    );
    metrics::describe_gauge!("ferry_endpoint_healthy", "1 if the endpoint passes its active health check");
    metrics::describe_counter!(
        "ferry_listener_bind_failures_total",
        "Frontend sockets that could not be bound"
    );
    metrics::describe_counter!("ferry_udp_datagrams_total", "UDP datagrams; rx from clients, tx to clients");
    metrics::describe_counter!(
        "ferry_pool_panic_picks_total",
        "Endpoints picked while none was healthy (all endpoints are tried rather than none)"
    );
    metrics::describe_gauge!("ferry_snapshot_version", "Version of the live snapshot");
    metrics::describe_histogram!("ferry_snapshot_build_duration_seconds", "Time to build a snapshot");
    metrics::describe_counter!("ferry_config_reload_failures_total", "Configuration reloads rejected");
    metrics::describe_counter!("ferry_config_reloads_total", "Configuration reloads applied");
    metrics::gauge!("ferry_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
