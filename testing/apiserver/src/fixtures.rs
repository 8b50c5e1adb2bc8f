//! Generators of realistic objects for tests and benchmarks: Services with EndpointSlices, as the
//! EndpointSlice controller writes them (`kubernetes.io/service-name` label, one slice per Service
//! here since benchmarks stay under the controller's 100-endpoint split).
//!
//! Addresses: Service `i` gets ClusterIP `10.96.0.0 + i + 1`; endpoint `j` of Service `i` gets
//! `10.0.0.0 + i * endpoints_per_service + j + 1`. Everything lives in one namespace.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// The name of the `i`-th generated Service.
pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// A ClusterIP Service with one TCP port named `http`.
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip.to_string(), "clusterIPs": [cluster_ip.to_string()],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]
        }
    })
}

/// An IPv4 EndpointSlice of Service `service` with ready endpoints at `addresses`, port 8080.
pub fn endpoint_slice(namespace: &str, service: &str, name: &str, addresses: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// The endpoint addresses of generated Service `i`.
pub fn endpoint_addresses(i: usize, endpoints_per_service: usize) -> Vec<Ipv4Addr> {
    (0..endpoints_per_service)
        .map(|j| offset(Ipv4Addr::new(10, 0, 0, 0), i * endpoints_per_service + j + 1))
        .collect()
}

/// `services` Services and one EndpointSlice each with `endpoints_per_service` endpoints, in `namespace`.
pub fn cluster(namespace: &str, services: usize, endpoints_per_service: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(services * 2);
    for i in 0..services {
        let name = service_name(i);
        out.push(service(namespace, &name, offset(Ipv4Addr::new(10, 96, 0, 0), i + 1), 80));
        let addrs = endpoint_addresses(i, endpoints_per_service);
        out.push(endpoint_slice(namespace, &name, &format!("{name}-abcde"), &addrs));
    }
    out
}

/// `base + n` (wrapping within IPv4).
pub fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(n as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_objects_parse_as_kubernetes_types() {
        let objs = cluster("default", 3, 10);
        assert_eq!(objs.len(), 6);
        let svc: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(objs[2].clone()).expect("a Service");
        assert_eq!(svc.spec.expect("spec").cluster_ip.as_deref(), Some("10.96.0.2"));
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(objs[3].clone()).expect("an EndpointSlice");
        assert_eq!(slice.endpoints.len(), 10);
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.11"]);
    }
}
