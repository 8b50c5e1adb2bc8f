//! Loading a directory of manifests: Kubernetes `Service`, `EndpointSlice` and `Node` objects and
//! Ferry `Listener`s, as YAML (multi-document) or JSON files.
//!
//! [`load_dir`] reads the visible top-level entries of one directory (names not starting with a
//! dot, ending in `.yaml`, `.yml` or `.json`), following symlinks, which is how ConfigMap volumes
//! present their keys (`name.yaml -> ..data/name.yaml`, `..data -> ..2024_01_01_...`). It never
//! recurses. Every problem in every file is collected, each naming the file, the 1-based document
//! (and `List` item), the object and the field, so one run shows everything that needs fixing.
//!
//! Pure apart from reading the files: no Index, no async.

use std::{
    collections::{HashMap, hash_map::Entry},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ferry_model::{
    Protocol, ServiceKey,
    listener::{self, Listener, ValidListener},
};
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where an object was defined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The file, as the directory path joined with the entry name.
    pub file: Arc<Path>,
    /// 1-based index of the (non-empty) YAML document in the file.
    pub document: usize,
    /// 1-based index in the `items` of a `v1 List` document.
    pub item: Option<usize>,
}

/// Every object found in a directory, in file-name then document order.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Ferry listeners, validated.
    pub listeners: Vec<(Origin, ValidListener)>,
    /// Kubernetes Services (`metadata.namespace` defaults to `default`).
    pub services: Vec<(Origin, core::Service)>,
    /// Kubernetes EndpointSlices (`metadata.namespace` defaults to `default`).
    pub endpoint_slices: Vec<(Origin, discovery::EndpointSlice)>,
    /// Kubernetes Nodes.
    pub nodes: Vec<(Origin, core::Node)>,
}

/// One thing wrong with the manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The file (or the directory, when it cannot be read).
    pub file: PathBuf,
    /// 1-based document index, when the problem is inside one document.
    pub document: Option<usize>,
    /// 1-based `List` item index.
    pub item: Option<usize>,
    /// The object, e.g. `Listener "web"`.
    pub object: Option<String>,
    /// Path of the field, e.g. `spec.backends[1]`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// The manifests in a directory are invalid. Nothing was loaded; retrying only helps once the
/// files are fixed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub struct ConfigError {
    /// The directory that was loaded.
    pub dir: PathBuf,
    /// Every problem found, in file order; never empty.
    pub problems: Vec<Problem>,
}

/// Reads every manifest in `dir`, or reports every problem found.
pub fn load_dir(dir: &Path) -> Result<Manifests, ConfigError> {
    let mut loader = Loader::default();
    match files(dir) {
        Ok(files) => {
            for file in files {
                loader.file(file);
            }
        }
        Err(e) => loader.problem(dir.into(), None, None, None, format!("cannot read directory: {e}")),
    }
    loader.cross_check();
    if loader.problems.is_empty() {
        Ok(loader.out)
    } else {
        Err(ConfigError { dir: dir.into(), problems: loader.problems })
    }
}

/// The manifest files of `dir`: visible names with a manifest extension that are (or point to)
/// regular files, sorted by name.
fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let manifest = name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
        if name.starts_with('.') || !manifest {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks; a dangling link is reported when the file is read.
        if std::fs::metadata(&path).map_or(true, |m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort_unstable();
    Ok(files)
}

// === impl Loader ===

#[derive(Default)]
struct Loader {
    out: Manifests,
    problems: Vec<Problem>,
}

impl Loader {
    fn problem(
        &mut self,
        file: PathBuf,
        origin: Option<&Origin>,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.problems.push(Problem {
            file,
            document: origin.map(|o| o.document),
            item: origin.and_then(|o| o.item),
            object,
            field,
            message,
        });
    }

    fn at(&mut self, origin: &Origin, object: &str, field: impl Into<String>, message: impl Into<String>) {
        self.problem(
            origin.file.to_path_buf(),
            Some(origin),
            Some(object.to_owned()).filter(|o| !o.is_empty()),
            Some(field.into()),
            message.into(),
        );
    }

    fn file(&mut self, path: PathBuf) {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => return self.problem(path, None, None, None, format!("cannot read: {e}")),
        };
        let docs = match serde_saphyr::from_multiple::<Value>(&text) {
            Ok(docs) => docs,
            Err(e) => {
                let message = format!("invalid YAML: {}", e.without_snippet());
                return self.problem(path, None, None, None, message);
            }
        };
        let file: Arc<Path> = path.into();
        for (i, doc) in docs.into_iter().enumerate() {
            self.document(Origin { file: file.clone(), document: i + 1, item: None }, doc);
        }
    }

    fn document(&mut self, origin: Origin, doc: Value) {
        let Value::Object(map) = &doc else {
            return self.at(&origin, "", "(document)", "must be a mapping with apiVersion and kind");
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let name =
            map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
        let object = if name.is_empty() { kind.clone() } else { format!("{kind} {name:?}") };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                if let Some(svc) = self.typed::<core::Service>(&origin, &object, doc) {
                    let svc = defaulted(svc, |s| &mut s.metadata);
                    self.out.services.push((origin, svc));
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(slice) = self.typed::<discovery::EndpointSlice>(&origin, &object, doc) {
                    let slice = defaulted(slice, |s| &mut s.metadata);
                    self.out.endpoint_slices.push((origin, slice));
                }
            }
            ("v1", "Node") => {
                if let Some(node) = self.typed::<core::Node>(&origin, &object, doc) {
                    if node.metadata.name.as_deref().unwrap_or_default().is_empty() {
                        return self.at(&origin, &object, "metadata.name", "is required");
                    }
                    self.out.nodes.push((origin, node));
                }
            }
            (listener::API_VERSION, listener::KIND) => {
                if let Some(l) = self.typed::<Listener>(&origin, &object, doc) {
                    match l.validate() {
                        Ok(valid) => self.out.listeners.push((origin, valid)),
                        Err(e) => self.at(&origin, &object, e.field, e.message),
                    }
                }
            }
            ("v1", "List") if origin.item.is_none() => {
                let Some(Value::Array(items)) = map.get("items").cloned() else {
                    return self.at(&origin, &object, "items", "must be a list of objects");
                };
                for (i, item) in items.into_iter().enumerate() {
                    self.document(Origin { item: Some(i + 1), ..origin.clone() }, item);
                }
            }
            _ => {
                let field =
                    if api_version.is_empty() || kind.is_empty() { "apiVersion/kind" } else { "kind" };
                let message = format!(
                    "unsupported kind {kind:?} of apiVersion {api_version:?}; expected v1 Service, \
                     discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 List or {} {}",
                    listener::API_VERSION,
                    listener::KIND,
                );
                self.at(&origin, &object, field, message);
            }
        }
    }

    fn typed<T: DeserializeOwned>(&mut self, origin: &Origin, object: &str, doc: Value) -> Option<T> {
        match serde_path_to_error::deserialize(doc) {
            Ok(v) => Some(v),
            Err(e) => {
                let field = e.path().to_string();
                self.at(
                    origin,
                    object,
                    if field == "." { "(document)".to_owned() } else { field },
                    e.into_inner().to_string(),
                );
                None
            }
        }
    }

    /// Checks across files: unique names per kind, and listener addresses that can all be bound.
    fn cross_check(&mut self) {
        let mut problems = Vec::new();
        let mut dup = |kind: &str, keys: Vec<(&Origin, String)>| {
            let mut seen: HashMap<String, &Origin> = HashMap::new();
            for (origin, key) in keys {
                match seen.entry(key) {
                    Entry::Vacant(v) => {
                        v.insert(origin);
                    }
                    Entry::Occupied(first) => problems.push((
                        origin.clone(),
                        format!("{kind} {:?}", first.key()),
                        "metadata.name".to_owned(),
                        format!("duplicate {kind} {}, first defined in {}", first.key(), first.get()),
                    )),
                }
            }
        };
        let out = &self.out;
        dup("Listener", out.listeners.iter().map(|(o, l)| (o, l.key.to_string())).collect());
        dup("Service", out.services.iter().map(|(o, s)| (o, meta_key(&s.metadata))).collect());
        dup("EndpointSlice", out.endpoint_slices.iter().map(|(o, s)| (o, meta_key(&s.metadata))).collect());
        dup("Node", out.nodes.iter().map(|(o, n)| (o, meta_key(&n.metadata))).collect());

        let mut by_port: HashMap<(Protocol, u16), Vec<(&Origin, &ValidListener)>> = HashMap::new();
        for (origin, l) in &out.listeners {
            let others = by_port.entry((l.protocol, l.address.port())).or_default();
            for (first, other) in others.iter() {
                if other.key != l.key && clash(other.address, l.address) {
                    problems.push((
                        origin.clone(),
                        format!("Listener {:?}", l.key.to_string()),
                        "spec.address".to_owned(),
                        format!(
                            "{}/{} cannot be bound: Listener {:?} in {first} binds {}/{}",
                            l.address,
                            l.protocol,
                            other.key.to_string(),
                            other.address,
                            other.protocol
                        ),
                    ));
                }
            }
            others.push((origin, l));
        }
        for (origin, object, field, message) in problems {
            self.at(&origin, &object, field, message);
        }
    }
}

/// Whether two addresses on the same port and protocol cannot both be bound. `[::]` also takes
/// IPv4 (Linux's default `net.ipv6.bindv6only=0`), so it clashes with every address.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    let (a, b) = (a.ip(), b.ip());
    let wildcard =
        |w: std::net::IpAddr, o: std::net::IpAddr| w.is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a == b || wildcard(a, b) || wildcard(b, a)
}

fn meta_key(meta: &ObjectMeta) -> String {
    ServiceKey::new(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
        .to_string()
}

/// Applies `kubectl`'s default namespace to a namespaced object.
fn defaulted<T>(mut obj: T, meta: impl Fn(&mut T) -> &mut ObjectMeta) -> T {
    let meta = meta(&mut obj);
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".to_owned());
    }
    obj
}

// === impl Origin ===

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        match self.item {
            Some(item) => write!(f, ", item {item}"),
            None => Ok(()),
        }
    }
}

// === impl Problem ===

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

// === impl ConfigError ===

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{n} problem{} in manifests in {}:", if n == 1 { "" } else { "s" }, self.dir.display())?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
