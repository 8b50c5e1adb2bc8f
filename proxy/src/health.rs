//! kube-proxy-compatible health servers for `ferry node` (per-Service `healthCheckNodePort` and
//! the node's `:10256` `/healthz` and `/livez`). Not built yet.
