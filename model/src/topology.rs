//! kube-proxy's `CategorizeEndpoints`.
