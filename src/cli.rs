//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Ferry: a userspace service-networking data plane for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,

    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (e.g. `info,ferry_proxy=debug`).
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG")]
    pub(crate) log_level: String,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the standalone TCP/UDP load balancer from a directory of manifests.
    Lb(LbArgs),
    /// Run the node service proxy (a kube-proxy replacement) for this node.
    Node(Box<NodeArgs>),
    /// Serve cluster DNS from the Kubernetes API (or a directory of manifests), forwarding other
    /// names upstream.
    Dns(crate::dns::DnsArgs),
    /// Validate a directory of manifests and print what would be served; exits non-zero on any error.
    Check(CheckArgs),
    /// GET an admin path over `--admin-socket` and exit 0 on 200 (an exec probe that reaches this
    /// pod's process even while a successor shares its ports).
    Probe(ProbeArgs),
}

/// `ferry probe`.
#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    /// The admin Unix socket (`--admin-socket` of the process to ask).
    #[arg(long)]
    pub(crate) socket: PathBuf,

    /// The admin path.
    #[arg(default_value = "/readyz")]
    pub(crate) path: String,

    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

/// `ferry lb`.
#[derive(Debug, Args)]
pub(crate) struct LbArgs {
    /// Directory of YAML manifests (Listener, Service, EndpointSlice); watched for changes.
    #[arg(long, env = "FERRY_CONFIG")]
    pub(crate) config: PathBuf,

    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// `ferry node`.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    /// Directory of YAML manifests (Service, EndpointSlice, Node) to serve instead of watching the
    /// API server; watched for changes.
    #[arg(long, env = "FERRY_CONFIG", conflicts_with = "kubeconfig")]
    pub(crate) config: Option<PathBuf>,

    /// Watch the API server of this kubeconfig (its current context). Without it and without
    /// `--config`, Ferry uses the pod's in-cluster service account, as kube-proxy does.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// Minimum time between two applied snapshots from the API server: a lone change applies at
    /// once, a burst of changes applies together at most this often (kube-proxy's
    /// `--min-sync-period`; Ferry's updates are incremental, hence the shorter default).
    #[arg(long, default_value = "100ms", value_parser = parse_duration, env = "FERRY_MIN_SYNC_PERIOD")]
    pub(crate) min_sync_period: Duration,

    /// This node's name (matches EndpointSlice `nodeName` and the Node object).
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    pub(crate) node_name: Option<String>,

    /// Node addresses NodePorts listen on: `primary` (the Node's InternalIP/ExternalIP addresses)
    /// or comma-separated CIDRs matched against the node's interface addresses (kube-proxy's
    /// `--nodeport-addresses`).
    #[arg(long, default_value = "primary", value_delimiter = ',')]
    pub(crate) nodeport_addresses: Vec<String>,

    /// Pod CIDRs (comma-separated): traffic from them counts as in-cluster, so external-policy
    /// `Local` frontends short-circuit it to every endpoint, as kube-proxy's `--cluster-cidr`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) cluster_cidr: Vec<ipnet::IpNet>,

    /// The local device that holds ClusterIP, externalIP and LoadBalancer addresses (created as
    /// `dummy`, or `bridge` where the kernel has no dummy; an existing device is adopted).
    #[arg(long, default_value = "ferry0")]
    pub(crate) vip_device: String,

    /// kube-proxy-compatible node health server (`/healthz`, `/livez`).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub(crate) healthz_bind_address: SocketAddr,

    /// Second admin listener for Prometheus, at kube-proxy's metrics address.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub(crate) metrics_bind_address: SocketAddr,

    /// Keep the client's source address towards local endpoints of `externalTrafficPolicy: Local`
    /// frontends, as kube-proxy does: upstream connections are made from the client's IP, and an
    /// nftables `socket transparent` mark plus a policy route bring the replies back to Ferry.
    /// `--preserve-source-ip=false` connects from a node address instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) preserve_source_ip: bool,

    /// Handle only Services labelled `service.kubernetes.io/service-proxy-name: NAME` (kube-proxy
    /// skips those), e.g. to run beside kube-proxy on the same node for a subset of Services.
    /// Without it, Ferry handles the unlabelled Services, as kube-proxy does.
    #[arg(long)]
    pub(crate) service_proxy_name: Option<String>,

    /// Remove everything Ferry added to the node (the VIP device, the source-IP rules) and exit.
    #[arg(long)]
    pub(crate) cleanup: bool,

    /// Serve cluster DNS on this node-local address (UDP and TCP), e.g. `169.254.20.10:53`; the
    /// address is added to the VIP device, as NodeLocal DNSCache does.
    #[arg(long)]
    pub(crate) dns_listen: Option<SocketAddr>,

    /// Also serve cluster DNS on port 53 of this Service's ClusterIPs (`namespace/name`, e.g.
    /// `kube-system/kube-dns`, read from the first snapshot); that Service is then not proxied on
    /// this node, so pods using it get this node's answers.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub(crate) dns_service: Option<String>,

    #[command(flatten)]
    pub(crate) dns: crate::dns::DnsFlags,

    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// Flags shared by every long-running command.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Address of the admin server (/metrics, /healthz, /livez, /readyz, /debug/snapshot).
    /// Port 0 picks a free port; the bound address is logged.
    #[arg(long, default_value = "127.0.0.1:9901", env = "FERRY_ADMIN_ADDRESS")]
    pub(crate) admin_address: SocketAddr,

    /// How long connections may keep running after their listener or endpoint is removed, and after
    /// SIGTERM, before they are closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "FERRY_DRAIN_TIMEOUT")]
    pub(crate) drain_timeout: Duration,

    /// Quiet time after a file change before the configuration is reloaded.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub(crate) reload_debounce: Duration,

    /// How often backend host names are re-resolved.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) resolve_interval: Duration,

    /// Data-plane worker threads (default: one per CPU).
    #[arg(long, env = "FERRY_WORKER_THREADS")]
    pub(crate) worker_threads: Option<usize>,

    /// Unix socket for restarts without a gap: at start, take over every listening socket of the
    /// process serving on this path (both serve them until this one is ready; then the old one
    /// stops accepting, drains, and waits for SIGTERM); once serving, listen here for the next.
    #[arg(long, env = "FERRY_HANDOFF_SOCKET")]
    pub(crate) handoff_socket: Option<PathBuf>,

    /// Also serve the admin routes on this Unix socket. It belongs to this process alone (a
    /// successor taking over the admin port does not take it), so `ferry probe` through it reports
    /// this process's readiness.
    #[arg(long, env = "FERRY_ADMIN_SOCKET")]
    pub(crate) admin_socket: Option<PathBuf>,
}

/// `ferry check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Directory of YAML manifests to validate.
    #[arg(long)]
    pub(crate) config: PathBuf,

    /// Categorise endpoints for this node (as `ferry node --node-name` would) and show the
    /// cluster and local endpoint sets of every Service port.
    #[arg(long)]
    pub(crate) node_name: Option<String>,
}

/// Parses `250ms`, `2s`, `1m`, `1h` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let value: f64 =
        num.trim().parse().map_err(|_| format!("{s:?} is not a duration like 250ms, 2s or 1m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
