//! `ferry check`: validation without serving.

use std::{net::SocketAddr, process::Command};

use crate::harness::*;

fn check(dir: &ConfigDir) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["check", "--config"])
        .arg(dir.path())
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_what_would_be_served() {
    let dir = ConfigDir::new();
    let front: SocketAddr = "127.0.0.1:18080".parse().expect("addr");
    let b1: SocketAddr = "10.0.0.11:8080".parse().expect("addr");
    dir.write("web.yaml", &listener_yaml("web", front, "TCP", &[b1], ""));
    let (ok, stdout, stderr) = check(&dir);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("web") && stdout.contains("127.0.0.1:18080") && stdout.contains("10.0.0.11:8080"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_problem_with_file_document_and_field() {
    let dir = ConfigDir::new();
    let front: SocketAddr = "127.0.0.1:18080".parse().expect("addr");
    dir.write(
        "a.yaml",
        &format!(
            "{}---\n{}",
            listener_yaml("one", front, "TCP", &[], ""),
            "apiVersion: ferry.ethercluster.io/v1alpha1\nkind: Listener\nmetadata: {name: two}\nspec:\n  address: 127.0.0.1:1\n  backends: [\"host:notaport\"]\n"
        ),
    );
    dir.write("b.yaml", "kind: [unclosed\n");
    let (ok, _, stderr) = check(&dir);
    assert!(!ok);
    assert!(
        stderr.contains("a.yaml") && stderr.contains("document 2") && stderr.contains("spec.backends[0]"),
        "{stderr}"
    );
    assert!(stderr.contains("b.yaml") && stderr.contains("line"), "YAML errors carry a position: {stderr}");
}

/// Every example under deploy/examples validates, so the README's commands keep working.
#[test]
fn shipped_examples_validate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    for (example, node) in [("quickstart", None), ("besu", None), ("node", Some("node-a"))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(["check", "--config"]).arg(root.join(example));
        if let Some(node) = node {
            cmd.args(["--node-name", node]);
        }
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        if node.is_some() {
            // The serving-terminating endpoint is known but not in the cluster set (ready ones exist).
            assert!(
                stdout.contains("cluster: 10.244.1.10:8080, 10.244.2.10:8080 (topology None)"),
                "{stdout}"
            );
            assert!(!stdout.contains("192.0.2.11"), "ipMode: Proxy must not be served: {stdout}");
        }
    }
}
