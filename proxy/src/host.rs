//! Node programming: the addresses of Service frontends on a local device (rtnetlink) and the
//! sysctls that keep the node from answering ARP for them elsewhere. Not built yet.
