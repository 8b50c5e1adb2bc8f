//! Tests of manifest loading: every kind, and every class of problem named by file, document and field.

use super::*;
use crate::test_util::TempDir;

const ALL_KINDS: &str = r#"
apiVersion: ferry.ethercluster.io/v1alpha1
kind: Listener
metadata: {name: web}
spec:
  address: 127.0.0.1:8080
  backends: ["10.0.0.11:8080", "backend.example.internal:8080"]
---
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: prod}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: api}
  someFutureField: ignored
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abc
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
endpoints: [{addresses: ["10.1.0.5"], conditions: {ready: true}, nodeName: node-a, zone: z1}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
"#;

fn listener(name: &str, address: &str, backend: &str) -> String {
    format!(
        "apiVersion: ferry.ethercluster.io/v1alpha1\nkind: Listener\nmetadata: {{name: {name}}}\n\
         spec:\n  address: {address:?}\n  backends: [{backend:?}]\n"
    )
}

fn problems(dir: &TempDir) -> Vec<Problem> {
    load_dir(dir.path()).expect_err("must fail").problems
}

#[test]
fn loads_every_kind_from_a_multi_document_file() {
    let dir = TempDir::new();
    dir.write("all.yaml", ALL_KINDS);
    dir.write("more.yml", &listener("udp", "127.0.0.1:5353", "[::1]:53"));
    dir.write(
        "list.json",
        r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {"ports": [{"port": 5432}]}}]}"#,
    );
    dir.write(".hidden.yaml", "not: [valid");
    dir.write("README.md", "not yaml: [");
    let m = load_dir(dir.path()).expect("valid manifests");

    let names: Vec<String> = m.listeners.iter().map(|(_, l)| l.key.to_string()).collect();
    assert_eq!(names, ["web", "udp"]);
    let (origin, web) = &m.listeners[0];
    assert_eq!(origin.to_string(), format!("{}: document 1", dir.path().join("all.yaml").display()));
    assert_eq!(web.backends.len(), 2);
    assert_eq!(m.listeners[1].1.address, "127.0.0.1:5353".parse().expect("addr"));

    let services: Vec<String> = m.services.iter().map(|(_, s)| meta_key(&s.metadata)).collect();
    assert_eq!(services, ["prod/api", "default/db"], "namespace defaults to `default`");
    assert_eq!(m.services[0].0.document, 2, "the empty document is skipped");
    assert_eq!(m.services[1].0.item, Some(1));
    assert_eq!(m.endpoint_slices.len(), 1);
    assert_eq!(m.endpoint_slices[0].1.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(m.nodes[0].0.document, 4);
}

#[test]
fn follows_symlinks_like_a_configmap_mount() {
    let dir = TempDir::new();
    let data = dir.path().join("..2024_01_01");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("web.yaml"), listener("web", "127.0.0.1:80", "10.0.0.1:80")).expect("write");
    std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/web.yaml", dir.path().join("web.yaml")).expect("symlink");
    let m = load_dir(dir.path()).expect("valid");
    assert_eq!(m.listeners.len(), 1, "read once, through the visible symlink only");
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    let dir = TempDir::new();
    let file = dir.write("bad.yaml", "apiVersion: v1\n---\nb: [1, 2\nc: 3\n");
    let p = problems(&dir);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].file, file);
    let text = p[0].to_string();
    assert!(text.contains("bad.yaml: invalid YAML") && text.contains("line 4"), "{text}");
}

#[test]
fn unknown_listener_field_is_named() {
    let dir = TempDir::new();
    dir.write(
        "x.yaml",
        &format!(
            "{}---\n{}  healthCheck: {{tcp: {{}}, bogus: 1}}\n",
            ALL_KINDS,
            listener("b", "127.0.0.1:81", "h:1")
        ),
    );
    let p = problems(&dir);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].document, p[0].field.as_deref()), (Some(5), Some("spec.healthCheck.bogus")));
    assert_eq!(p[0].object.as_deref(), Some("Listener \"b\""));
    assert!(p[0].message.contains("unknown field `bogus`"), "{}", p[0].message);
}

#[test]
fn bad_backend_is_named_by_index() {
    let dir = TempDir::new();
    let file = dir.write(
        "x.yaml",
        &format!(
            "{}---\n{}",
            listener("a", "127.0.0.1:80", "10.0.0.1:80"),
            listener("web", "127.0.0.1:81", "10.0.0.1:99999")
        ),
    );
    let p = problems(&dir);
    assert_eq!(p.len(), 1, "{p:?}");
    let expected = format!(
        "{}: document 2 (Listener \"web\"): spec.backends[0]: \"10.0.0.1:99999\" has an invalid port \"99999\"",
        file.display()
    );
    assert_eq!(p[0].to_string(), expected);
}

#[test]
fn zero_udp_responses_is_named() {
    let dir = TempDir::new();
    dir.write(
        "x.yaml",
        &format!("{}  protocol: UDP\n  udpResponses: 0\n", listener("dns", "127.0.0.1:53", "10.0.0.1:53")),
    );
    let p = problems(&dir);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].field.as_deref(), Some("spec.udpResponses"), "{p:?}");
    assert!(p[0].to_string().contains("must be at least 1"), "{}", p[0]);
}

#[test]
fn bad_kubernetes_field_is_named() {
    let dir = TempDir::new();
    dir.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: http}]}\n",
    );
    let p = problems(&dir);
    assert_eq!(p[0].field.as_deref(), Some("spec.ports[0].port"), "{p:?}");
    assert_eq!(p[0].object.as_deref(), Some("Service \"s\""));
}

#[test]
fn duplicate_listener_name_names_both_files() {
    let dir = TempDir::new();
    dir.write("a.yaml", &listener("web", "127.0.0.1:80", "10.0.0.1:80"));
    dir.write("b.yaml", &listener("web", "127.0.0.1:81", "10.0.0.1:80"));
    let p = problems(&dir);
    assert_eq!(p.len(), 1, "{p:?}");
    let text = p[0].to_string();
    assert!(text.starts_with(&format!("{}: document 1", dir.path().join("b.yaml").display())), "{text}");
    assert!(text.contains("a.yaml: document 1") && text.contains("metadata.name"), "{text}");
}

#[test]
fn clashing_addresses_name_both_listeners() {
    let dir = TempDir::new();
    dir.write("a.yaml", &listener("a", "10.0.0.1:80", "10.0.0.9:80"));
    dir.write("b.yaml", &listener("b", "10.0.0.1:80", "10.0.0.9:80"));
    dir.write("c.yaml", &listener("c", "0.0.0.0:80", "10.0.0.9:80"));
    // Same port, other protocol, and a specific IPv6 address next to an IPv4 wildcard: both fine.
    dir.write("d.yaml", &format!("{}  protocol: UDP\n", listener("d", "10.0.0.1:80", "10.0.0.9:80")));
    dir.write("e.yaml", &listener("e", "[::1]:80", "10.0.0.9:80"));
    let p = problems(&dir);
    let fields: Vec<_> = p.iter().map(|p| (p.object.as_deref(), p.field.as_deref())).collect();
    assert_eq!(
        fields,
        [
            (Some("Listener \"b\""), Some("spec.address")),
            (Some("Listener \"c\""), Some("spec.address")),
            (Some("Listener \"c\""), Some("spec.address")),
        ],
        "{p:#?}"
    );
    assert!(p[0].to_string().contains("a.yaml: document 1"), "{}", p[0]);
    assert!(p[1].message.contains("Listener \"a\"") && p[2].message.contains("Listener \"b\""), "{p:#?}");

    let dir = TempDir::new();
    dir.write("a.yaml", &listener("a", "[::]:53", "10.0.0.9:53"));
    dir.write("b.yaml", &listener("b", "127.0.0.1:53", "10.0.0.9:53"));
    assert_eq!(problems(&dir).len(), 1, "[::] also takes IPv4");
}

#[test]
fn unknown_kind_is_an_error() {
    let dir = TempDir::new();
    dir.write(
        "d.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\nfoo: bar\n---\n- 1\n",
    );
    let p = problems(&dir);
    let got: Vec<_> = p.iter().map(|p| (p.document, p.field.as_deref())).collect();
    assert_eq!(
        got,
        [(Some(1), Some("kind")), (Some(2), Some("apiVersion/kind")), (Some(3), Some("(document)"))]
    );
    assert!(
        p[0].to_string().contains("(Deployment \"d\"): kind: unsupported kind \"Deployment\""),
        "{}",
        p[0]
    );
}

#[test]
fn reports_every_problem_at_once() {
    let dir = TempDir::new();
    dir.write("a.yaml", "x: [");
    dir.write("b.yaml", &listener("b", "nonsense", "10.0.0.1:80"));
    dir.write("c.yaml", "apiVersion: v1\nkind: Pod\n");
    let err = load_dir(dir.path()).expect_err("invalid");
    assert_eq!(err.problems.len(), 3, "{err}");
    let text = err.to_string();
    assert!(text.starts_with("3 problems in manifests in"), "{text}");
    assert!(text.contains("b.yaml: document 1 (Listener \"b\"): spec.address:"), "{text}");
}

#[test]
fn missing_directory_is_an_error() {
    let dir = TempDir::new();
    let missing = dir.path().join("nope");
    let err = load_dir(&missing).expect_err("missing dir");
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].file, missing);
    assert!(err.problems[0].message.starts_with("cannot read directory"), "{err}");
}

#[test]
fn hundreds_of_files_load_quickly() {
    let dir = TempDir::new();
    for i in 0..300 {
        dir.write(
            &format!("l{i}.yaml"),
            &listener(&format!("l{i}"), &format!("127.0.0.1:{}", 10000 + i), "h:1"),
        );
    }
    let start = std::time::Instant::now();
    let m = load_dir(dir.path()).expect("valid");
    assert_eq!(m.listeners.len(), 300);
    // Generous bound for a debug build on a shared machine; release is far faster.
    assert!(start.elapsed() < std::time::Duration::from_secs(2), "{:?}", start.elapsed());
}
