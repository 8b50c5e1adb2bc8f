//! End-to-end tests of the `ferry` binary: one test binary (hickory style), one module per area.
//! Every test runs the real binary on loopback against real backends.

#![allow(unreachable_pub, missing_docs, unsafe_code)]

mod admin;
mod check;
mod deploy;
mod dns;
mod harness;
mod kube;
mod lb_config;
mod lb_health;
mod lb_tcp;
mod lb_udp;
mod lifecycle;
mod netns;
mod node;
mod node_semantics;
