use std::{net::Ipv4Addr, time::Duration};

use ferry_model::{Balancing, Endpoints, PassiveHealth, Protocol, ServiceKey, Timeouts, TrafficPolicy};

use super::*;

pub(crate) fn port(balancing: Balancing, session_affinity: SessionAffinity) -> Arc<ServicePort> {
    Arc::new(ServicePort {
        service: ServiceKey::new("default", "web"),
        name: "".into(),
        protocol: Protocol::Tcp,
        port: 80,
        frontends: Vec::new(),
        endpoints: Endpoints::default(),
        balancing,
        session_affinity,
        health_check: None,
        passive_health: PassiveHealth::default(),
        timeouts: Timeouts::default(),
        zero_copy: false,
        proxy_protocol: false,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        load_balancer_source_ranges: Vec::new(),
    })
}

fn eps(ports: impl IntoIterator<Item = u16>) -> Vec<Endpoint> {
    ports.into_iter().map(|p| Endpoint::ready(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p))).collect()
}

fn addr(p: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p)
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i))
}

const AFFINITY: SessionAffinity = SessionAffinity::ClientIp { timeout: Duration::from_secs(60) };

#[test]
fn empty_pool_picks_nothing() {
    let pool = Pool::new(port(Balancing::Random, SessionAffinity::None), &[], None);
    assert!(pool.pick(client(1), &[]).is_none());
}

#[test]
fn lease_counts_active_connections() {
    let pool = Pool::new(port(Balancing::Random, SessionAffinity::None), &eps([1]), None);
    let a = pool.pick(client(1), &[]).expect("pick");
    let b = pool.pick(client(1), &[]).expect("pick");
    assert_eq!((a.addr(), a.endpoint().addr()), (addr(1), addr(1)));
    assert_eq!(pool.endpoints()[0].active_connections(), 2);
    drop(a);
    assert_eq!(b.endpoint().active_connections(), 1);
    drop(b);
    assert_eq!(pool.endpoints()[0].health().active_connections, 0);
}

#[test]
fn tried_endpoints_are_skipped() {
    for b in [Balancing::Random, Balancing::RoundRobin, Balancing::LeastConnections] {
        let pool = Pool::new(port(b, SessionAffinity::None), &eps([1, 2, 3]), None);
        let mut tried = Vec::new();
        for _ in 0..3 {
            let l = pool.pick(client(1), &tried).expect("untried endpoint left");
            assert!(!tried.contains(&l.addr()), "{b:?}");
            tried.push(l.addr());
        }
        assert!(pool.pick(client(1), &tried).is_none(), "{b:?}: all tried");
    }
}

#[test]
fn unavailable_endpoints_are_skipped() {
    let pool = Pool::new(port(Balancing::Random, SessionAffinity::None), &eps([1, 2, 3]), None);
    pool.endpoints()[0].set_healthy(false);
    let t0 = Instant::now();
    let ejections: Vec<bool> = (0..3).map(|_| pool.endpoints()[1].report_connect_failure_at(t0)).collect();
    assert_eq!(ejections, [false, false, true]);
    for _ in 0..100 {
        assert_eq!(pool.pick_at(client(1), &[], t0).expect("one available").addr(), addr(3));
    }
    // Tried the only available one: no panic mode, nothing left.
    assert!(pool.pick_at(client(1), &[addr(3)], t0).is_none());
    // Ejection over: endpoint 2 comes back.
    let later = t0 + PassiveHealth::default().ejection;
    assert_eq!(pool.pick_at(client(1), &[addr(3)], later).expect("back").addr(), addr(2));
}

#[test]
fn panic_mode_when_nothing_available() {
    let pool = Pool::new(port(Balancing::RoundRobin, SessionAffinity::None), &eps([1, 2, 3]), None);
    for e in pool.endpoints() {
        e.set_healthy(false);
    }
    let mut tried = Vec::new();
    for _ in 0..3 {
        let l = pool.pick(client(1), &tried).expect("panic mode picks an unavailable endpoint");
        tried.push(l.addr());
    }
    tried.sort();
    assert_eq!(tried, vec![addr(1), addr(2), addr(3)]);
    assert!(pool.pick(client(1), &tried).is_none());
    // One endpoint back: panic mode ends, only it is picked.
    pool.endpoints()[1].set_healthy(true);
    for _ in 0..10 {
        assert_eq!(pool.pick(client(1), &[]).expect("available").addr(), addr(2));
    }
}

#[test]
fn round_robin_through_pool_is_even() {
    let pool = Pool::new(port(Balancing::RoundRobin, SessionAffinity::None), &eps([1, 2, 3, 4]), None);
    let mut counts = HashMap::new();
    for _ in 0..400 {
        *counts.entry(pool.pick(client(1), &[]).expect("pick").addr()).or_insert(0) += 1;
    }
    assert!(counts.values().all(|&c| c == 100), "{counts:?}");
}

#[test]
fn least_connections_avoids_busy_endpoints() {
    let pool = Pool::new(port(Balancing::LeastConnections, SessionAffinity::None), &eps([1, 2]), None);
    // Hold 5 leases on endpoint 1 (picked through RR on a sibling pool sharing the state).
    let held: Vec<_> = (0..5)
        .map(|_| {
            let s = pool.get(addr(1)).expect("in pool").clone();
            s.acquire();
            Lease { endpoint: s }
        })
        .collect();
    for _ in 0..50 {
        assert_eq!(pool.pick(client(1), &[]).expect("pick").addr(), addr(2));
    }
    drop(held);
    assert_eq!(pool.get(addr(1)).expect("in pool").active_connections(), 0);
}

#[test]
fn state_carries_over_to_next_pool() {
    let p1 = Pool::new(port(Balancing::Random, SessionAffinity::None), &eps([1, 2]), None);
    let lease = p1.pick(client(1), &[addr(2)]).expect("pick 1");
    p1.get(addr(2)).expect("in pool").set_healthy(false);
    let p2 = Pool::new(port(Balancing::Random, SessionAffinity::None), &eps([2, 3]), Some(&p1));
    assert!(Arc::ptr_eq(p2.get(addr(2)).expect("kept"), p1.get(addr(2)).expect("kept")));
    assert!(!p2.get(addr(2)).expect("kept").is_available());
    assert!(p2.get(addr(1)).is_none());
    assert!(p2.get(addr(3)).expect("new").is_available());
    assert_eq!(lease.endpoint().active_connections(), 1);
}

#[test]
fn passive_config_is_applied() {
    let mut p = (*port(Balancing::Random, SessionAffinity::None)).clone();
    p.passive_health = PassiveHealth { consecutive_failures: 1, ejection: Duration::from_secs(5) };
    let pool = Pool::new(Arc::new(p), &eps([1]), None);
    let t0 = Instant::now();
    assert!(pool.endpoints()[0].report_connect_failure_at(t0));
}

#[test]
fn affinity_sticks_per_client() {
    let pool = Pool::new(port(Balancing::Random, AFFINITY), &eps(1..=10), None);
    let t0 = Instant::now();
    let mut seen = std::collections::HashSet::new();
    for c in 0..50 {
        let first = pool.pick_at(client(c), &[], t0).expect("pick").addr();
        seen.insert(first);
        for k in 1..10 {
            let at = t0 + Duration::from_secs(k);
            assert_eq!(pool.pick_at(client(c), &[], at).expect("pick").addr(), first);
        }
    }
    assert!(seen.len() > 3, "clients spread over endpoints: {seen:?}");
    assert_eq!(pool.affinity().expect("table").len(), 50);
}

#[test]
fn affinity_moves_when_endpoint_unavailable_tried_or_expired() {
    let pool = Pool::new(port(Balancing::RoundRobin, AFFINITY), &eps([1, 2, 3]), None);
    let t0 = Instant::now();
    let first = pool.pick_at(client(1), &[], t0).expect("pick").addr();

    // Tried (connect retry): another endpoint, which becomes the sticky one.
    let second = pool.pick_at(client(1), &[first], t0).expect("pick").addr();
    assert_ne!(second, first);
    assert_eq!(pool.pick_at(client(1), &[], t0).expect("pick").addr(), second);

    // Unavailable: moves again.
    pool.get(second).expect("in pool").set_healthy(false);
    let third = pool.pick_at(client(1), &[], t0).expect("pick").addr();
    assert_ne!(third, second);
    assert_eq!(pool.pick_at(client(1), &[], t0).expect("pick").addr(), third);
}

#[test]
fn affinity_expires_timeout_after_last_use() {
    let pool = Pool::new(port(Balancing::RoundRobin, AFFINITY), &eps([1, 2, 3]), None);
    let t0 = Instant::now();
    let first = pool.pick_at(client(1), &[], t0).expect("pick").addr();
    // Hits do not advance the RR cursor, and refresh the entry.
    let t1 = t0 + Duration::from_secs(59);
    assert_eq!(pool.pick_at(client(1), &[], t1).expect("pick").addr(), first);
    let t2 = t1 + Duration::from_secs(59);
    assert_eq!(pool.pick_at(client(1), &[], t2).expect("pick").addr(), first, "118 s after first use");
    // 60 s after the last use: expired, balanced afresh: RR's next endpoint.
    let t3 = t2 + Duration::from_secs(60);
    let next = pool.pick_at(client(1), &[], t3).expect("pick").addr();
    assert_ne!(next, first);
    assert_eq!(pool.pick_at(client(1), &[], t3).expect("pick").addr(), next);
}

#[test]
fn affinity_table_carries_over_when_config_unchanged() {
    let p1 = Pool::new(port(Balancing::Random, AFFINITY), &eps(1..=10), None);
    let t0 = Instant::now();
    let chosen = p1.pick_at(client(1), &[], t0).expect("pick").addr();
    let p2 = Pool::new(port(Balancing::Random, AFFINITY), &eps(1..=10), Some(&p1));
    assert!(Arc::ptr_eq(p1.affinity().expect("t"), p2.affinity().expect("t")));
    assert_eq!(p2.pick_at(client(1), &[], t0).expect("pick").addr(), chosen);

    // Endpoint gone from the new pool: rebalanced.
    let rest: Vec<u16> = (1..=10).filter(|&p| addr(p) != chosen).collect();
    let p3 = Pool::new(port(Balancing::Random, AFFINITY), &eps(rest), Some(&p2));
    assert_ne!(p3.pick_at(client(1), &[], t0).expect("pick").addr(), chosen);

    // Timeout changed: a fresh table.
    let other = SessionAffinity::ClientIp { timeout: Duration::from_secs(30) };
    let p4 = Pool::new(port(Balancing::Random, other), &eps(1..=10), Some(&p3));
    assert!(!Arc::ptr_eq(p3.affinity().expect("t"), p4.affinity().expect("t")));
    assert!(p4.affinity().expect("t").is_empty());
    // Affinity turned off: no table.
    let p5 = Pool::new(port(Balancing::Random, SessionAffinity::None), &eps(1..=10), Some(&p4));
    assert!(p5.affinity().is_none());
}

#[test]
fn affinity_in_panic_mode_sticks() {
    let pool = Pool::new(port(Balancing::Random, AFFINITY), &eps(1..=5), None);
    for e in pool.endpoints() {
        e.set_healthy(false);
    }
    let t0 = Instant::now();
    let first = pool.pick_at(client(1), &[], t0).expect("panic pick").addr();
    for _ in 0..10 {
        assert_eq!(pool.pick_at(client(1), &[], t0).expect("panic pick").addr(), first);
    }
}
