//! Ferry's data plane: listeners, L4 TCP and UDP proxying.
//!
//! The data plane never imports kube: it reads `Arc<Snapshot>`s from a `watch` channel.
