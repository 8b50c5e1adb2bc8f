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
    for b in [Balancing::Random, Balancing::RoundRobin, Balancing::LeastConnections, Balancing::Maglev] {
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

fn maglev_pool(endpoints: &[Endpoint], previous: Option<&Pool>) -> Pool {
    Pool::new(port(Balancing::Maglev, SessionAffinity::None), endpoints, previous)
}

fn picked(pool: &Pool, c: u32, tried: &[SocketAddr], now: Instant) -> SocketAddr {
    pool.pick_at(client(c), tried, now).expect("pick").addr()
}

#[test]
fn maglev_same_client_same_endpoint_across_pools() {
    let t0 = Instant::now();
    let p1 = maglev_pool(&eps(1..=20), None);
    // Another node: same endpoints in another order, fresh state.
    let p2 = maglev_pool(&eps((1..=20).rev()), None);
    // A rebuild for an unrelated change shares the table.
    let p3 = maglev_pool(&eps(1..=20), Some(&p1));
    assert!(std::ptr::eq(p1.maglev().expect("table"), p3.maglev().expect("table")));
    assert!(!std::ptr::eq(p1.maglev().expect("table"), p2.maglev().expect("table")));
    assert_eq!(p1.maglev().expect("table").size(), maglev::POOL_MIN_TABLE_SIZE);
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for c in 0..2_000 {
        let a = picked(&p1, c, &[], t0);
        assert_eq!(picked(&p1, c, &[], t0), a, "client {c}: stable");
        assert_eq!(picked(&p2, c, &[], t0), a, "client {c}: same on another pool");
        assert_eq!(picked(&p3, c, &[], t0), a, "client {c}: same after a rebuild");
        *counts.entry(a).or_default() += 1;
    }
    assert_eq!(counts.len(), 20);
    assert!(counts.values().all(|&k| (60..140).contains(&k)), "{counts:?}");
}

#[test]
fn maglev_removing_an_endpoint_keeps_other_clients() {
    let t0 = Instant::now();
    let p1 = maglev_pool(&eps(1..=10), None);
    let p2 = maglev_pool(&eps(2..=10), Some(&p1));
    assert!(!std::ptr::eq(p1.maglev().expect("table"), p2.maglev().expect("table")), "rebuilt");
    let (mut kept, mut others) = (0, 0);
    for c in 0..5_000 {
        let before = picked(&p1, c, &[], t0);
        let after = picked(&p2, c, &[], t0);
        assert_ne!(after, addr(1));
        if before != addr(1) {
            others += 1;
            kept += usize::from(before == after);
        }
    }
    assert!(kept * 100 >= others * 98, "{kept} of {others} clients kept their endpoint");
}

#[test]
fn maglev_ejected_endpoint_falls_back_deterministically_and_returns() {
    let t0 = Instant::now();
    let endpoints = eps(1..=10);
    let (p1, p2) = (maglev_pool(&endpoints, None), maglev_pool(&endpoints, None));
    let own = picked(&p1, 7, &[], t0);
    for pool in [&p1, &p2] {
        let e = pool.get(own).expect("in pool");
        let ejected: Vec<bool> = (0..3).map(|_| e.report_connect_failure_at(t0)).collect();
        assert_eq!(ejected, [false, false, true]);
    }
    let fallback = picked(&p1, 7, &[], t0);
    assert_ne!(fallback, own);
    for _ in 0..10 {
        assert_eq!(picked(&p1, 7, &[], t0), fallback);
        assert_eq!(picked(&p2, 7, &[], t0), fallback, "every node falls back alike");
    }
    // A connect retry after the fallback failed: the next deterministic choice.
    let retry = picked(&p1, 7, &[fallback], t0);
    assert!(retry != own && retry != fallback);
    assert_eq!(picked(&p2, 7, &[fallback], t0), retry);
    // Ejection over: back to its own endpoint.
    let later = t0 + PassiveHealth::default().ejection;
    assert_eq!(picked(&p1, 7, &[], later), own);
    assert_eq!(picked(&p2, 7, &[], later), own);
}

#[test]
fn maglev_panic_mode_keeps_the_clients_endpoint() {
    let t0 = Instant::now();
    let pool = maglev_pool(&eps(1..=10), None);
    let own: Vec<SocketAddr> = (0..20).map(|c| picked(&pool, c, &[], t0)).collect();
    for e in pool.endpoints() {
        e.set_healthy(false);
    }
    for (c, &a) in (0..20).zip(&own) {
        assert_eq!(picked(&pool, c, &[], t0), a, "panic mode hashes over all endpoints");
    }
}

#[test]
fn maglev_affinity_takes_precedence() {
    let t0 = Instant::now();
    let pool = Pool::new(port(Balancing::Maglev, AFFINITY), &eps(1..=10), None);
    let own = picked(&pool, 3, &[], t0);
    // Its endpoint refused the connection: the retry's endpoint becomes sticky.
    let retry = picked(&pool, 3, &[own], t0);
    assert_ne!(retry, own);
    for k in 1..5 {
        assert_eq!(picked(&pool, 3, &[], t0 + Duration::from_secs(k)), retry);
    }
    // Expired: Maglev's choice again.
    assert_eq!(picked(&pool, 3, &[], t0 + Duration::from_secs(4 + 60)), own);
}

#[test]
fn maglev_table_only_for_maglev_and_empty_pools() {
    assert!(Pool::new(port(Balancing::Random, SessionAffinity::None), &eps(1..=3), None).maglev().is_none());
    let empty = maglev_pool(&[], None);
    assert!(empty.maglev().expect("table").is_empty());
    assert!(empty.pick(client(1), &[]).is_none());
    let one = maglev_pool(&eps([9]), None);
    assert_eq!(one.pick(client(1), &[]).expect("pick").addr(), addr(9));
    assert!(one.pick(client(1), &[addr(9)]).is_none());
}
