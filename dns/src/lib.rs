//! Cluster DNS answered from the [`Snapshot`](https://docs.rs/ferry-model): service names,
//! headless services, SRV, PTR and ExternalName CNAMEs.
//!
//! Not built yet (issue 5). This is the only crate that will name hickory types, so the rest of
//! Ferry stays independent of hickory's unstable 0.x API.
