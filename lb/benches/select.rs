//! Cost of [`Pool::pick`] (including dropping the lease) per algorithm, pool size and affinity.
//!
//! With affinity, picks cycle through 1024 client IPs over a warmed table, so most picks are
//! affinity hits (the steady state of a busy service). Maglev picks hash each client's IP into
//! the pool's table. `maglev/build` is the cost of building a table (done in `Pool::new` when the
//! endpoints change), at the pool's minimum size and at the plain `100·N` sizing.

#![allow(missing_docs)]

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ferry_lb::{Pool, maglev};
use ferry_model::{
    Balancing, Endpoint, Endpoints, PassiveHealth, Protocol, ServiceKey, ServicePort, SessionAffinity,
    Timeouts, TrafficPolicy,
};

const CLIENTS: u32 = 1024;

fn pool(balancing: Balancing, session_affinity: SessionAffinity, n: u16) -> Pool {
    let port = Arc::new(ServicePort {
        service: ServiceKey::new("default", "bench"),
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
    });
    let endpoints: Vec<_> = addrs(n).into_iter().map(Endpoint::ready).collect();
    Pool::new(port, &endpoints, None)
}

fn addrs(n: u16) -> Vec<SocketAddr> {
    (0..n).map(|i| SocketAddr::new(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8).into(), 8080)).collect()
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i % CLIENTS))
}

fn bench_pick(c: &mut Criterion) {
    let affinity = SessionAffinity::ClientIp { timeout: Duration::from_secs(10_800) };
    for (aff_name, aff) in [("none", SessionAffinity::None), ("client_ip", affinity)] {
        let mut group = c.benchmark_group(format!("pick/{aff_name}"));
        for balancing in
            [Balancing::Random, Balancing::RoundRobin, Balancing::LeastConnections, Balancing::Maglev]
        {
            for n in [10u16, 100, 1000] {
                let pool = pool(balancing, aff, n);
                for i in 0..CLIENTS {
                    drop(pool.pick(client(i), &[]));
                }
                let mut i = 0u32;
                group.bench_with_input(BenchmarkId::new(format!("{balancing:?}"), n), &pool, |b, pool| {
                    b.iter(|| {
                        i = i.wrapping_add(1);
                        black_box(pool.pick(black_box(client(i)), &[]))
                    });
                });
            }
        }
        group.finish();
    }
}

fn bench_maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev/build");
    for n in [10u16, 100, 1000] {
        let addrs = addrs(n);
        group.bench_with_input(BenchmarkId::new("pool_min", n), &addrs, |b, addrs| {
            b.iter(|| black_box(maglev::Table::build_with(addrs, maglev::POOL_MIN_TABLE_SIZE)));
        });
        group.bench_with_input(BenchmarkId::new("100n", n), &addrs, |b, addrs| {
            b.iter(|| black_box(maglev::Table::build(addrs)));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pick, bench_maglev_build);
criterion_main!(benches);
