//! `ferry-test-apiserver`: serves a generated cluster (Services + EndpointSlices) over the Kubernetes
//! list/watch protocol for benchmarks, optionally changing one endpoint every few milliseconds.
//!
//! Prints `listening <url>`, then `loaded ...`, then one `change ...` line per churn change with the
//! wall-clock time of the write (Unix nanoseconds), so a benchmark can measure propagation delay.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use ferry_test_apiserver::{ApiServer, fixtures};

/// Serve a generated cluster over the Kubernetes API.
#[derive(Debug, Parser)]
struct Args {
    /// Number of Services.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints_per_service: usize,
    /// Port on 127.0.0.1 (0 picks one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Namespace of the objects.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Write a kubeconfig for the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Change one endpoint address every this many milliseconds (round-robin over Services).
    #[arg(long)]
    churn_ms: Option<u64>,
    /// Stop churning after this many changes (default: forever).
    #[arg(long)]
    churn_count: Option<u64>,
    /// Periodic watch bookmark interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = ApiServer::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))?;
    server.set_bookmark_interval(Duration::from_millis(args.bookmark_interval_ms));
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    println!("listening {}", server.url());
    let started = Instant::now();
    let rv =
        server.apply_all(fixtures::cluster(&args.namespace, args.services, args.endpoints_per_service))?;
    println!(
        "loaded services={} endpoints={} resourceVersion={rv} in {:?}",
        args.services,
        args.services * args.endpoints_per_service,
        started.elapsed()
    );

    let Some(churn_ms) = args.churn_ms.filter(|_| args.services > 0 && args.endpoints_per_service > 0) else {
        loop {
            std::thread::park();
        }
    };
    let mut next = Instant::now();
    for n in 0..args.churn_count.unwrap_or(u64::MAX) {
        next += Duration::from_millis(churn_ms);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let i = (n as usize) % args.services;
        let name = fixtures::service_name(i);
        let mut addrs = fixtures::endpoint_addresses(i, args.endpoints_per_service);
        // Replace one endpoint with a fresh address from 10.128.0.0/9.
        addrs[0] = fixtures::offset(Ipv4Addr::new(10, 128, 0, 0), n as usize + 1);
        let slice = fixtures::endpoint_slice(&args.namespace, &name, &format!("{name}-abcde"), &addrs);
        let rv = server.apply(slice)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        println!(
            "change unix_nanos={now} slice={}/{name}-abcde address={} resourceVersion={rv}",
            args.namespace, addrs[0]
        );
    }
    loop {
        std::thread::park();
    }
}
