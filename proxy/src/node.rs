//! `ferry node`'s frontends: which Service frontends this node serves, on which sockets, over
//! which endpoints (kube-proxy's traffic-policy rules). Not built yet.
