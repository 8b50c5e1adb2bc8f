//! Resource types the server serves: `(group, version, plural)` plus kind and scope.
//!
//! The [`Registry`] is owned by the store (under its lock). It is pre-filled with the kinds Ferry
//! watches today and tomorrow (core Services, Endpoints, Nodes, Secrets, Namespaces, Pods, ConfigMaps;
//! EndpointSlices; Ingress/IngressClass; Gateway API), and learns unknown kinds on their first `apply`
//! (plural guessed the way `kubectl` does), so new kinds need no new code.

use std::fmt;

/// Identifies a served resource: API group (`""` for core), version and plural, as in the URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Plural resource name as in the URL, e.g. `services`.
    pub plural: String,
}

/// A served resource type: its id, kind and whether it is namespaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// Group, version and plural.
    pub id: ResourceId,
    /// Kind, e.g. `Service`.
    pub kind: String,
    /// Whether objects live in namespaces (`/namespaces/{ns}/...` paths).
    pub namespaced: bool,
}

/// All resource types the server knows; index positions are stable for the server's lifetime.
#[derive(Debug)]
pub(crate) struct Registry {
    types: Vec<ResourceType>,
}

// === impl ResourceId ===

impl ResourceId {
    /// A resource of API group `group` (empty for core), version and plural.
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self { group: group.to_owned(), version: version.to_owned(), plural: plural.to_owned() }
    }

    /// A core (`/api/v1`) resource, e.g. `ResourceId::core("services")`.
    pub fn core(plural: &str) -> Self {
        Self::new("", "v1", plural)
    }

    /// `discovery.k8s.io/v1` `endpointslices`.
    pub fn endpoint_slices() -> Self {
        Self::new("discovery.k8s.io", "v1", "endpointslices")
    }

    /// The id of a k8s-openapi resource type, e.g. `ResourceId::of::<Service>()`.
    pub fn of<K: k8s_openapi::Resource>() -> Self {
        Self::new(K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
    }

    /// `apiVersion` as written in objects: `v1` for core, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        api_version(&self.group, &self.version)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.plural)
    }
}

// === impl ResourceType ===

impl ResourceType {
    /// A resource type from its parts.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self { id: ResourceId::new(group, version, plural), kind: kind.to_owned(), namespaced }
    }

    /// The resource type of a k8s-openapi type.
    pub fn of<K: k8s_openapi::Resource>() -> Self {
        let namespaced = std::any::type_name::<K::Scope>().ends_with("::NamespaceResourceScope");
        Self { id: ResourceId::of::<K>(), kind: K::KIND.to_owned(), namespaced }
    }
}

// === impl Registry ===

impl Registry {
    /// A registry with the well-known kinds.
    pub(crate) fn with_defaults() -> Self {
        let core =
            |plural: &str, kind: &str, namespaced| ResourceType::new("", "v1", plural, kind, namespaced);
        let types = vec![
            core("services", "Service", true),
            core("endpoints", "Endpoints", true),
            core("nodes", "Node", false),
            core("secrets", "Secret", true),
            core("namespaces", "Namespace", false),
            core("pods", "Pod", true),
            core("configmaps", "ConfigMap", true),
            ResourceType::new("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true),
            ResourceType::new("networking.k8s.io", "v1", "ingresses", "Ingress", true),
            ResourceType::new("networking.k8s.io", "v1", "ingressclasses", "IngressClass", false),
            ResourceType::new("gateway.networking.k8s.io", "v1", "gateways", "Gateway", true),
            ResourceType::new("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass", false),
            ResourceType::new("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", true),
            ResourceType::new("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute", true),
            ResourceType::new(
                "gateway.networking.k8s.io",
                "v1beta1",
                "referencegrants",
                "ReferenceGrant",
                true,
            ),
            ResourceType::new("gateway.networking.k8s.io", "v1alpha2", "tcproutes", "TCPRoute", true),
            ResourceType::new("gateway.networking.k8s.io", "v1alpha2", "udproutes", "UDPRoute", true),
            ResourceType::new("gateway.networking.k8s.io", "v1alpha2", "tlsroutes", "TLSRoute", true),
        ];
        Self { types }
    }

    /// Adds (or replaces, by id) a resource type; returns its index.
    pub(crate) fn register(&mut self, ty: ResourceType) -> usize {
        if let Some(i) = self.types.iter().position(|t| t.id == ty.id) {
            self.types[i] = ty;
            return i;
        }
        self.types.push(ty);
        self.types.len() - 1
    }

    pub(crate) fn get(&self, idx: usize) -> &ResourceType {
        &self.types[idx]
    }

    pub(crate) fn index_of(&self, id: &ResourceId) -> Option<usize> {
        self.types.iter().position(|t| &t.id == id)
    }

    /// Finds a type by `apiVersion` and plural or kind (case-insensitive).
    pub(crate) fn find(&self, api_version: &str, plural_or_kind: &str) -> Option<usize> {
        let (group, version) = split_api_version(api_version);
        self.types.iter().position(|t| {
            t.id.group == group
                && t.id.version == version
                && (t.id.plural == plural_or_kind || t.kind.eq_ignore_ascii_case(plural_or_kind))
        })
    }

    /// Finds a type by `apiVersion` and kind, registering a guessed one if unknown.
    pub(crate) fn find_or_guess(&mut self, api_version: &str, kind: &str, namespaced_hint: bool) -> usize {
        if let Some(i) = self.find(api_version, kind) {
            return i;
        }
        let (group, version) = split_api_version(api_version);
        self.register(ResourceType::new(group, version, &guess_plural(kind), kind, namespaced_hint))
    }
}

/// Splits `apiVersion` into `(group, version)`; core `v1` has an empty group.
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

pub(crate) fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") }
}

/// The plural `kubectl`'s RESTMapper guesses for a kind.
fn guess_plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('s') || lower.ends_with("ch") || lower.ends_with("sh") || lower.ends_with('x') {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y')
        && !stem.ends_with(['a', 'e', 'i', 'o', 'u'])
    {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_and_api_versions() {
        assert_eq!(guess_plural("Ingress"), "ingresses");
        assert_eq!(guess_plural("Policy"), "policies");
        assert_eq!(guess_plural("Gateway"), "gateways");
        assert_eq!(split_api_version("v1"), ("", "v1"));
        assert_eq!(split_api_version("discovery.k8s.io/v1"), ("discovery.k8s.io", "v1"));
        let t = ResourceType::of::<k8s_openapi::api::core::v1::Node>();
        assert_eq!(t, ResourceType::new("", "v1", "nodes", "Node", false));
        let t = ResourceType::of::<k8s_openapi::api::discovery::v1::EndpointSlice>();
        assert_eq!(t, ResourceType::new("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true));
    }
}
