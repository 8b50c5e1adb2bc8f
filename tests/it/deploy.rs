//! Deployment artifacts: every YAML document under `deploy/kubernetes/`, and the Helm chart under
//! `deploy/helm/ferry/` rendered by a small renderer for the template subset it uses (documented in
//! `deploy/helm/README.md`; `helm` is not available in CI), parses into its `k8s-openapi` type.
//!
//! `k8s-openapi` ignores unknown fields, so each document is also serialized back and compared with
//! the YAML: a misspelt or misplaced field is dropped by the typed parse and shows up as a difference.
//! Then the objects are checked for what the node proxy needs (host network, capabilities, probes,
//! RBAC) and for consistency with each other and with the `ferry` binary's flags.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The typed objects of one deployment (the plain manifests or one chart rendering).
#[derive(Default)]
struct Objects {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

// === impl Objects ===

impl Objects {
    /// Parses every document of `text` (from `origin`) into its typed object; panics on invalid YAML,
    /// an unknown `apiVersion`/`kind`, a type error or a field the type does not have.
    fn parse(&mut self, origin: &str, text: &str) {
        let docs = serde_saphyr::from_multiple::<Value>(text).unwrap_or_else(|e| panic!("{origin}: {e}"));
        assert!(!docs.is_empty(), "{origin}: no documents");
        for (i, doc) in docs.into_iter().enumerate() {
            let origin = format!("{origin} (document {})", i + 1);
            let field = |key: &str| doc.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
            match (field("apiVersion").as_str(), field("kind").as_str()) {
                ("v1", "ServiceAccount") => self.service_accounts.push(typed(&origin, &doc)),
                ("v1", "ConfigMap") => self.config_maps.push(typed(&origin, &doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    self.cluster_roles.push(typed(&origin, &doc));
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    self.cluster_role_bindings.push(typed(&origin, &doc));
                }
                ("apps/v1", "DaemonSet") => self.daemon_sets.push(typed(&origin, &doc)),
                (api_version, kind) => {
                    panic!("{origin}: unexpected apiVersion {api_version:?} kind {kind:?}")
                }
            }
        }
    }

    fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
        assert_eq!(items.len(), 1, "exactly one {what}");
        &items[0]
    }

    fn config_map(&self, name: &str) -> &ConfigMap {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no ConfigMap {name:?}"))
    }

    fn daemon_set(&self) -> &DaemonSet {
        Self::one(&self.daemon_sets, "DaemonSet")
    }

    fn pod_spec(&self) -> &PodSpec {
        let spec = self.daemon_set().spec.as_ref().expect("DaemonSet spec");
        spec.template.spec.as_ref().expect("pod spec")
    }

    fn ferry_container(&self) -> &Container {
        let pod = self.pod_spec();
        pod.containers.iter().find(|c| c.name == "ferry").expect("a container named ferry")
    }

    /// Everything the node proxy needs, and the references between the objects.
    fn check(&self) {
        let ds = self.daemon_set();
        let namespace = ds.metadata.namespace.as_deref().expect("DaemonSet namespace");
        assert_eq!(namespace, "kube-system");

        // Identity: the DaemonSet's ServiceAccount, bound to the ClusterRole.
        let pod = self.pod_spec();
        let sa = Self::one(&self.service_accounts, "ServiceAccount");
        assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace));
        assert_eq!(pod.service_account_name, sa.metadata.name);
        let role = Self::one(&self.cluster_roles, "ClusterRole");
        let binding = Self::one(&self.cluster_role_bindings, "ClusterRoleBinding");
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
        let subjects = binding.subjects.as_deref().unwrap_or_default();
        assert!(
            subjects.iter().any(|s| s.kind == "ServiceAccount"
                && Some(&s.name) == sa.metadata.name.as_ref()
                && s.namespace.as_deref() == Some(namespace)),
            "binding subjects {subjects:?}"
        );
        check_rules(role);

        // Pod: kube-proxy's placement.
        assert_eq!(pod.host_network, Some(true), "hostNetwork");
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
        let tolerations = pod.tolerations.as_deref().unwrap_or_default();
        for effect in ["NoSchedule", "NoExecute", "PreferNoSchedule"] {
            assert!(
                tolerations.iter().any(|t| t.key.is_none()
                    && t.operator.as_deref() == Some("Exists")
                    && t.effect.as_deref() == Some(effect)),
                "tolerates every {effect} taint: {tolerations:?}"
            );
        }
        let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).expect("updateStrategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        // Restarts without a gap: the new pod starts beside the old one and takes its sockets.
        let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let selector = ds.spec.as_ref().and_then(|s| s.selector.match_labels.clone()).unwrap_or_default();
        let template_labels = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert!(!selector.is_empty());
        for (k, v) in &selector {
            assert_eq!(template_labels.get(k), Some(v), "template carries selector label {k}");
        }

        // The ferry container: unprivileged, exactly two added capabilities.
        let ferry = self.ferry_container();
        let security = ferry.security_context.as_ref().expect("securityContext");
        assert_eq!(security.privileged, Some(false));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let added: BTreeSet<&str> = security
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_deref())
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(added, BTreeSet::from(["NET_ADMIN", "NET_BIND_SERVICE"]));
        assert!(ferry.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some_and(|r| !r.is_empty()));

        // NODE_NAME from the downward API, and every `$(VAR)` in args defined.
        let env = ferry.env.as_deref().unwrap_or_default();
        let node_name = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME env");
        let field_path =
            node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| &f.field_path);
        assert_eq!(field_path.map(String::as_str), Some("spec.nodeName"));
        let config = self.flags_config_map();
        let config_keys: BTreeSet<&str> =
            config.data.as_ref().expect("flags data").keys().map(String::as_str).collect();
        let args = ferry.args.as_deref().unwrap_or_default();
        assert_eq!(args.first().map(String::as_str), Some("node"), "args {args:?}");
        assert!(args.iter().any(|a| a == "--node-name=$(NODE_NAME)"), "args {args:?}");
        for var in args.iter().flat_map(|a| var_refs(a)) {
            assert!(
                var == "NODE_NAME" || config_keys.contains(var.as_str()),
                "$({var}) in args is not defined by env or {:?}",
                config.metadata.name
            );
        }
        check_flags(args, &config_keys);

        // The API server with the pod's service account: no manifest directory, no kubeconfig.
        assert!(
            !args.iter().any(|a| a.starts_with("--config") || a.starts_with("--kubeconfig")),
            "args {args:?}"
        );
        assert_ne!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.service_account_name.as_deref(), self.service_accounts[0].metadata.name.as_deref());

        // Probes: kube-proxy's :10256/livez, and `ferry probe` asking this pod's process for /readyz
        // over its own admin socket (the admin port is shared with a successor during a handoff).
        let live = ferry.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("liveness");
        assert_eq!((live.path.as_deref(), &live.port), (Some("/livez"), &IntOrString::Int(10256)));
        let ready = ferry.readiness_probe.as_ref().and_then(|p| p.exec.as_ref()).expect("exec readiness");
        let command = ready.command.as_deref().unwrap_or_default();
        let admin_socket = args
            .iter()
            .find_map(|a| a.strip_prefix("--admin-socket="))
            .unwrap_or_else(|| panic!("--admin-socket in args {args:?}"));
        assert_eq!(
            command,
            ["/usr/local/bin/ferry", "probe", "--socket", admin_socket, "/readyz"],
            "the probe asks this process's admin socket"
        );
        let volume = socket_volume(ferry, pod, admin_socket);
        assert!(volume.empty_dir.is_some(), "a per-pod emptyDir: {volume:?}");
        assert!(args.iter().any(|a| a == "--admin-address=127.0.0.1:9901"), "args {args:?}");
        assert!(args.iter().any(|a| a == "--healthz-bind-address=0.0.0.0:10256"), "args {args:?}");

        // The handoff socket's directory is the node's, so the surge pod finds the old pod there;
        // and no hostPort (a containerPort with hostNetwork) keeps the surge pod off the node.
        let socket = args
            .iter()
            .find_map(|a| a.strip_prefix("--handoff-socket="))
            .unwrap_or_else(|| panic!("--handoff-socket in args {args:?}"));
        let volume = socket_volume(ferry, pod, socket);
        let dir = Path::new(socket).parent().and_then(Path::to_str);
        assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), dir, "a hostPath volume");
        assert!(ferry.ports.as_deref().unwrap_or_default().is_empty(), "no hostPorts: {:?}", ferry.ports);
    }

    /// The ConfigMap the ferry container takes its environment from.
    fn flags_config_map(&self) -> &ConfigMap {
        let env_from = self.ferry_container().env_from.as_deref().unwrap_or_default();
        let name = env_from
            .iter()
            .find_map(|e| e.config_map_ref.as_ref())
            .map(|r| r.name.as_str())
            .expect("envFrom configMapRef");
        self.config_map(name)
    }
}

/// The volume mounted on the directory of `socket` in `ferry`.
fn socket_volume<'a>(ferry: &Container, pod: &'a PodSpec, socket: &str) -> &'a Volume {
    let dir = Path::new(socket).parent().and_then(Path::to_str).expect("socket directory");
    let mounts = ferry.volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts.iter().find(|m| m.mount_path == dir).unwrap_or_else(|| panic!("{dir} mounted"));
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    volumes.iter().find(|v| v.name == mount.name).unwrap_or_else(|| panic!("volume {} of {dir}", mount.name))
}

/// Parses `doc` as `T`, then checks that serializing it back gives `doc` again.
fn typed<T: DeserializeOwned + Serialize>(origin: &str, doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let back = serde_json::to_value(&object).expect("serialize");
    if let Some(difference) = difference(doc, &back, "") {
        panic!("{origin}: not a valid field (dropped or changed by the typed parse): {difference}");
    }
    object
}

/// The first path at which `yaml` and `typed` differ.
fn difference(yaml: &Value, typed: &Value, path: &str) -> Option<String> {
    match (yaml, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => difference(x, y, &format!("{path}.{k}")),
                (Some(x), None) => Some(format!("{path}.{k} = {x}")),
                (None, _) => Some(format!("{path}.{k} appeared")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| difference(x, y, &format!("{path}[{i}]")))
        }
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

/// `$(VAR)` references in a container argument.
fn var_refs(arg: &str) -> Vec<String> {
    arg.split("$(").skip(1).filter_map(|rest| rest.split_once(')')).map(|(var, _)| var.to_owned()).collect()
}

/// list/watch exactly on Services, EndpointSlices and Nodes; get on Nodes; Events created.
fn check_rules(role: &ClusterRole) {
    let rules = role.rules.as_deref().unwrap_or_default();
    let mut verbs: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none(), "{rule:?}");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                let entry = verbs.entry((group.as_str(), resource.as_str())).or_default();
                entry.extend(rule.verbs.iter().map(String::as_str));
            }
        }
    }
    let reads: BTreeSet<(&str, &str)> = verbs
        .iter()
        .filter(|(_, v)| v.contains("list") || v.contains("watch") || v.contains("get"))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(
        reads,
        BTreeSet::from([("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "nodes")]),
        "read access {verbs:?}"
    );
    for key in &reads {
        assert!(verbs[key].contains("list") && verbs[key].contains("watch"), "list+watch {key:?}");
    }
    assert_eq!(verbs[&("", "services")], BTreeSet::from(["list", "watch"]));
    assert_eq!(verbs[&("discovery.k8s.io", "endpointslices")], BTreeSet::from(["list", "watch"]));
    assert_eq!(verbs[&("", "nodes")], BTreeSet::from(["get", "list", "watch"]));
    assert!(verbs.get(&("", "events")).is_some_and(|v| v.contains("create")), "events: {verbs:?}");
    let writes = ["create", "update", "patch", "delete", "deletecollection", "*"];
    for ((group, resource), v) in &verbs {
        if *resource != "events" {
            assert!(!writes.iter().any(|w| v.contains(w)), "no writes on {group}/{resource}: {v:?}");
        }
    }
}

/// Every flag in `args` and every ConfigMap key is one `ferry node` knows: a key is either
/// referenced as `$(KEY)` in args or is an environment variable `ferry node --help` lists.
fn check_flags(args: &[String], config_keys: &BTreeSet<&str>) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(["node", "--help"]).output().expect("run ferry");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for arg in &args[1..] {
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        assert!(help.contains(&format!("{flag} ")), "`ferry node` has no flag {flag}:\n{help}");
    }
    let referenced: BTreeSet<String> = args.iter().flat_map(|a| var_refs(a)).collect();
    for key in config_keys {
        assert!(
            referenced.contains(*key) || help.contains(&format!("[env: {key}=")),
            "ConfigMap key {key} is neither used in args nor read by `ferry node`:\n{help}"
        );
    }
}

fn kubernetes_objects() -> Objects {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut objects = Objects::default();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read manifest");
        objects.parse(&file.display().to_string(), &text);
    }
    objects
}

#[test]
fn kubernetes_manifests_parse_and_fit_the_node_proxy() {
    let objects = kubernetes_objects();
    objects.check();
    assert_eq!(objects.flags_config_map().metadata.name.as_deref(), Some("ferry-config"));
    assert_eq!(objects.service_accounts[0].metadata.name.as_deref(), Some("ferry"));
}

#[test]
fn helm_chart_renders_the_same_node_proxy() {
    let chart = helm::Chart::load(&deploy_dir().join("helm/ferry"));
    let rendered = chart.render("ferry", "kube-system");
    let mut objects = Objects::default();
    for (template, text) in &rendered {
        assert!(!text.contains("{{"), "{template}: unrendered action:\n{text}");
        objects.parse(template, text);
    }
    objects.check();

    // The chart's defaults deploy what deploy/kubernetes/ deploys.
    let plain = kubernetes_objects();
    assert_eq!(json(objects.pod_spec()), json(plain.pod_spec()), "pod spec: chart vs deploy/kubernetes");
    assert_eq!(
        json(&objects.cluster_roles[0].rules),
        json(&plain.cluster_roles[0].rules),
        "ClusterRole rules"
    );
    assert_eq!(objects.flags_config_map().data, plain.flags_config_map().data, "flags");
    let strategy = |o: &Objects| json(&o.daemon_set().spec.as_ref().map(|s| s.update_strategy.clone()));
    assert_eq!(strategy(&objects), strategy(&plain));
}

#[test]
fn helm_renderer_handles_the_subset() {
    let chart = helm::Chart::from_parts(
        serde_json::json!({"a": {"b": "x"}, "list": [1, 2], "empty": [], "tag": ""}),
        &serde_json::json!({"name": "c", "version": "1.0.0", "appVersion": "2.0"}),
        r#"{{- define "h" -}}
n: {{ .Chart.Name }}
{{- end }}"#,
    );
    let out = chart.render_text(
        "t",
        "k:\n  {{- include \"h\" . | nindent 2 }}\nv: {{ .Values.a.b | quote }}\nt: {{ .Values.tag | default .Chart.AppVersion }}\n\
         l: {{- toYaml .Values.list | nindent 2 }}\n{{- if .Values.empty }}\ne: yes\n{{- end }}\n{{- if .Values.list }}\nf: {{ .Release.Namespace }}\n{{- end }}\n",
        "r",
        "ns",
    );
    assert_eq!(out, "k:\n  n: c\nv: \"x\"\nt: 2.0\nl:\n  [1,2]\nf: ns\n");
}

/// The JSON form of a typed part, for comparisons.
fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("serialize")
}

/// A renderer for the subset of Helm's template language the chart uses (listed in
/// `deploy/helm/README.md`). Stricter than Helm where it matters for CI: a missing value printed
/// outside `if`/`default` panics instead of rendering `<no value>`.
mod helm {
    use std::{collections::BTreeMap, path::Path};

    use serde_json::{Value, json};

    #[derive(Debug, Clone)]
    enum Token {
        Text(String),
        Action(String),
    }

    pub(super) struct Chart {
        values: Value,
        chart: Value,
        defines: BTreeMap<String, Vec<Token>>,
        templates: BTreeMap<String, String>,
    }

    // === impl Chart ===

    impl Chart {
        pub(super) fn load(dir: &Path) -> Self {
            let read =
                |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let yaml = |p: &Path| -> Value {
                serde_saphyr::from_str(&read(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            let mut helpers = String::new();
            let mut templates = BTreeMap::new();
            for entry in std::fs::read_dir(dir.join("templates")).expect("templates/") {
                let path = entry.expect("dir entry").path();
                let name = path.file_name().expect("file name").to_string_lossy().into_owned();
                if name.starts_with('_') {
                    helpers.push_str(&read(&path));
                } else if name.ends_with(".yaml") {
                    templates.insert(format!("templates/{name}"), read(&path));
                }
            }
            let mut chart =
                Self::from_parts(yaml(&dir.join("values.yaml")), &yaml(&dir.join("Chart.yaml")), &helpers);
            chart.templates = templates;
            chart
        }

        pub(super) fn from_parts(values: Value, chart_yaml: &Value, helpers: &str) -> Self {
            let field = |k: &str| chart_yaml.get(k).cloned().unwrap_or(Value::Null);
            let chart = json!({"Name": field("name"), "Version": field("version"), "AppVersion": field("appVersion")});
            let mut defines = BTreeMap::new();
            let mut tokens = tokenize(helpers).into_iter();
            while let Some(token) = tokens.next() {
                let Token::Action(action) = token else { continue };
                let Some(name) = action.strip_prefix("define ") else {
                    assert!(action.starts_with("/*"), "helpers: only define blocks, got {action:?}");
                    continue;
                };
                let (mut body, mut depth) = (Vec::new(), 0);
                for token in tokens.by_ref() {
                    if let Token::Action(a) = &token {
                        if a.starts_with("if ") || a.starts_with("define ") {
                            depth += 1;
                        } else if a == "end" {
                            if depth == 0 {
                                break;
                            }
                            depth -= 1;
                        }
                    }
                    body.push(token);
                }
                defines.insert(unquote(name.trim()), body);
            }
            Self { values, chart, defines, templates: BTreeMap::new() }
        }

        /// Every template rendered as `helm template <release> --namespace <namespace>` would.
        pub(super) fn render(&self, release: &str, namespace: &str) -> Vec<(String, String)> {
            self.templates
                .iter()
                .map(|(name, text)| (name.clone(), self.render_text(name, text, release, namespace)))
                .collect()
        }

        pub(super) fn render_text(&self, name: &str, text: &str, release: &str, namespace: &str) -> String {
            let scope = json!({
                "Values": self.values,
                "Chart": self.chart,
                "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            });
            let mut out = String::new();
            self.run(name, &tokenize(text), &scope, &mut out);
            out
        }

        fn run(&self, name: &str, tokens: &[Token], scope: &Value, out: &mut String) {
            let mut active: Vec<bool> = Vec::new();
            for token in tokens {
                let on = active.iter().all(|a| *a);
                match token {
                    Token::Text(text) if on => out.push_str(text),
                    Token::Text(_) => {}
                    Token::Action(a) if a.starts_with("/*") => {}
                    Token::Action(a) if a == "end" => {
                        active.pop().unwrap_or_else(|| panic!("{name}: unmatched end"));
                    }
                    Token::Action(a) if a.starts_with("if ") => {
                        active.push(on && truthy(&self.pipeline(name, &a[3..], scope)));
                    }
                    Token::Action(a) if on => {
                        let value = self.pipeline(name, a, scope);
                        out.push_str(&text_of(name, a, &value));
                    }
                    Token::Action(_) => {}
                }
            }
            assert!(active.is_empty(), "{name}: unclosed if");
        }

        fn pipeline(&self, name: &str, action: &str, scope: &Value) -> Value {
            let mut value: Option<Value> = None;
            for command in action.split('|') {
                let words: Vec<&str> = command.split_whitespace().collect();
                let arg = |i: usize| self.operand(name, words.get(i).copied(), scope);
                let piped = value.take();
                let last = |i: usize| piped.clone().unwrap_or_else(|| arg(i));
                value = Some(match words.as_slice() {
                    ["include", define, "."] => {
                        let body = self
                            .defines
                            .get(&unquote(define))
                            .unwrap_or_else(|| panic!("{name}: no define {define}"));
                        let mut out = String::new();
                        self.run(name, body, scope, &mut out);
                        Value::String(out)
                    }
                    ["toYaml", ..] => Value::String(serde_json::to_string(&last(1)).expect("json")),
                    ["quote", ..] => {
                        Value::String(serde_json::to_string(&text_of(name, action, &last(1))).expect("json"))
                    }
                    ["default", ..] => {
                        let given = last(2);
                        if truthy(&given) { given } else { arg(1) }
                    }
                    ["nindent" | "indent", n, ..] => {
                        let n: usize = n.parse().unwrap_or_else(|_| panic!("{name}: indent {n:?}"));
                        let pad = " ".repeat(n);
                        let text = text_of(name, action, &last(2));
                        let body = text.lines().map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n");
                        Value::String(if words[0] == "nindent" { format!("\n{body}") } else { body })
                    }
                    [path] if piped.is_none() => self.operand(name, Some(path), scope),
                    _ => {
                        panic!("{name}: unsupported template command {command:?} (see deploy/helm/README.md)")
                    }
                });
            }
            value.unwrap_or(Value::Null)
        }

        /// A `.A.b.c` path (Null when missing) or a quoted string.
        fn operand(&self, name: &str, word: Option<&str>, scope: &Value) -> Value {
            let word = word.unwrap_or_else(|| panic!("{name}: missing operand"));
            if word.starts_with('"') {
                return Value::String(unquote(word));
            }
            let path =
                word.strip_prefix('.').unwrap_or_else(|| panic!("{name}: unsupported operand {word:?}"));
            path.split('.').try_fold(scope, |v, key| v.get(key)).cloned().unwrap_or(Value::Null)
        }
    }

    /// Splits a template into text and actions, applying `{{-` and `-}}` whitespace trimming.
    fn tokenize(text: &str) -> Vec<Token> {
        let mut tokens = Vec::new();
        let mut rest = text;
        let mut trim_next = false;
        while let Some(start) = rest.find("{{") {
            let (before, after) = rest.split_at(start);
            let end = after.find("}}").expect("unclosed {{");
            let inner = &after[2..end];
            let mut before = if trim_next { before.trim_start() } else { before };
            let mut action = inner;
            if let Some(a) = action.strip_prefix('-') {
                before = before.trim_end();
                action = a;
            }
            trim_next = false;
            if let Some(a) = action.strip_suffix('-') {
                trim_next = true;
                action = a;
            }
            tokens.push(Token::Text(before.to_owned()));
            tokens.push(Token::Action(action.trim().to_owned()));
            rest = &after[end + 2..];
        }
        tokens.push(Token::Text(if trim_next { rest.trim_start() } else { rest }.to_owned()));
        tokens
    }

    fn unquote(s: &str) -> String {
        s.trim_matches('"').to_owned()
    }

    /// Helm's truthiness: empty and zero values are false.
    fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }

    fn text_of(name: &str, action: &str, value: &Value) -> String {
        match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => panic!("{name}: {{{{ {action} }}}} has no value"),
            other => panic!("{name}: {{{{ {action} }}}} is not a scalar (use toYaml): {other}"),
        }
    }
}
