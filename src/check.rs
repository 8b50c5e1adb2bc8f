//! `ferry check`: validates a config directory and prints what would be served.
//!
//! Runs the same loader and index as `ferry lb`, minus the network: backend names are shown as
//! written (they are resolved at run time). Exit status 0 means `ferry lb` would accept the
//! directory; 1 means at least one problem, each printed to stderr with file, document and field.

use std::{fmt::Write as _, process::ExitCode};

use ferry_model::{Frontend, Index, NodeInfo, Snapshot, listener::Backend};
use ferry_watch::{Manifests, load_dir};

use crate::cli::CheckArgs;

/// Runs `ferry check`.
pub(crate) fn run(args: &CheckArgs) -> ExitCode {
    match load_dir(&args.config) {
        Ok(manifests) => {
            print!("{}", render(&manifests, args.node_name.as_deref()));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The human-readable summary printed on success.
fn render(manifests: &Manifests, node: Option<&str>) -> String {
    let own =
        node.and_then(|name| manifests.nodes.iter().find(|(_, n)| n.metadata.name.as_deref() == Some(name)));
    let node_info = node.map(|name| {
        own.map_or_else(|| NodeInfo { name: name.into(), zone: None }, |(_, n)| NodeInfo::from_node(n))
    });
    let categorised = node_info.is_some();
    let mut index = Index::new(node_info);
    for (_, listener) in &manifests.listeners {
        index.apply_listener(listener.clone());
    }
    for (_, service) in &manifests.services {
        index.apply_service(service);
    }
    for (_, slice) in &manifests.endpoint_slices {
        index.apply_endpoint_slice(slice);
    }
    let snapshot = index.build();
    let mut out = String::new();
    for (origin, listener) in &manifests.listeners {
        let _ = writeln!(
            out,
            "Listener {} {} {} ({:?}) from {}",
            listener.key,
            listener.protocol,
            listener.address,
            listener.balancing,
            origin.file.display()
        );
        for backend in &listener.backends {
            match backend {
                Backend::Addr(addr) => {
                    let _ = writeln!(out, "  -> {addr}");
                }
                Backend::Name { host, port } => {
                    let _ = writeln!(out, "  -> {host}:{port} (resolved at run time)");
                }
            }
        }
    }
    render_services(&snapshot, categorised, &mut out);
    let _ = writeln!(
        out,
        "OK: {} listener(s), {} service(s), {} EndpointSlice(s), {} frontend(s)",
        manifests.listeners.len(),
        manifests.services.len(),
        manifests.endpoint_slices.len(),
        snapshot.frontends.len()
    );
    for (frontend, loser) in &snapshot.conflicts {
        let _ = writeln!(out, "warning: {loser} also claims {frontend:?}; it is not served there");
    }
    out
}

fn render_services(snapshot: &Snapshot, categorised: bool, out: &mut String) {
    for service in snapshot.services.values() {
        if service.origin == ferry_model::Origin::Listener {
            continue;
        }
        let _ = writeln!(out, "Service {}", service.key);
        for port in &service.ports {
            let frontends: Vec<String> = port
                .frontends
                .iter()
                .map(|f| match f {
                    Frontend::ClusterIp(a) => format!("ClusterIP {a}"),
                    Frontend::NodePort(p) => format!("NodePort {p}"),
                    Frontend::LoadBalancer(a) => format!("LoadBalancer {a}"),
                    Frontend::ExternalIp(a) => format!("externalIP {a}"),
                    Frontend::Listener(a) => format!("Listener {a}"),
                })
                .collect();
            let _ = writeln!(
                out,
                "  port {} {}: {}",
                if port.name.is_empty() { "(unnamed)" } else { &port.name },
                port.protocol,
                frontends.join(", ")
            );
            let list = |eps: &[ferry_model::Endpoint]| {
                let v: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
                if v.is_empty() { "none".to_owned() } else { v.join(", ") }
            };
            let _ = writeln!(out, "    endpoints: {}", list(&port.endpoints.all));
            if categorised {
                let _ = writeln!(
                    out,
                    "    cluster: {} (topology {:?})\n    local: {}",
                    list(&port.endpoints.cluster),
                    port.endpoints.topology,
                    list(&port.endpoints.local)
                );
            }
        }
    }
}
