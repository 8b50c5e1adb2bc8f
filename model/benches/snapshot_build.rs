//! Snapshot build cost at 10,000 services / 100,000 endpoints (10 endpoints per service, one
//! EndpointSlice each), from scratch and for one endpoint change, plus the live heap held by the
//! built index (measured with a counting global allocator and printed once before the groups).
//!
//! Run: `cargo bench -p ferry-model --bench snapshot_build -- --quick`.

use std::{collections::BTreeMap, hint::black_box};

use criterion::Criterion;
use ferry_model::{FrontendKey, Index, NodeInfo, Protocol};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 10;
const NODES: u32 = 500;

mod counting {
    //! A global allocator that counts live heap bytes, delegating to the system allocator.
    #![allow(unsafe_code)]

    use std::{
        alloc::{GlobalAlloc, Layout, System},
        sync::atomic::{AtomicUsize, Ordering},
    };

    pub(crate) struct Counting;

    static LIVE: AtomicUsize = AtomicUsize::new(0);

    /// Bytes currently allocated (requested sizes, not allocator overhead).
    pub(crate) fn live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    // SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
    // `GlobalAlloc` contract is upheld by `System`; the counter has no effect on memory.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded unchanged; `ptr` was allocated by `System` with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: forwarded unchanged; `ptr` was allocated by `System` with `layout`.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
                LIVE.fetch_add(new_size, Ordering::Relaxed);
            }
            p
        }
    }
}

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

fn meta(name: String, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta { namespace: Some("bench".to_owned()), name: Some(name), labels, ..ObjectMeta::default() }
}

fn service(i: u32) -> Service {
    let ip = format!("10.96.{}.{}", i / 256, i % 256);
    Service {
        metadata: meta(format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            type_: Some("ClusterIP".to_owned()),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The slice of service `i`; `generation` changes the readiness of its first endpoint.
fn slice(i: u32, generation: u32) -> EndpointSlice {
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_owned(), format!("svc-{i}"))]);
    let endpoints = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            let n = i * ENDPOINTS_PER_SERVICE + j;
            Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 128 + n / 65_536, (n / 256) % 256, n % 256)],
                conditions: Some(EndpointConditions {
                    ready: Some(!(j == 0 && generation % 2 == 1)),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(format!("node-{}", n % NODES)),
                zone: Some(format!("zone-{}", n % 3)),
                ..Endpoint::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: meta(format!("svc-{i}-abcde"), Some(labels)),
        address_type: "IPv4".to_owned(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

fn node() -> Option<NodeInfo> {
    Some(NodeInfo { name: "node-7".into(), zone: Some("zone-1".into()) })
}

fn build_all(services: &[Service], slices: &[EndpointSlice]) -> Index {
    let mut index = Index::new(node());
    for s in services {
        index.apply_service(s);
    }
    for s in slices {
        index.apply_endpoint_slice(s);
    }
    index.build();
    index
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn report_memory(services: &[Service], slices: &[EndpointSlice], objects_bytes: usize) {
    let before = counting::live();
    let index = build_all(services, slices);
    let after = counting::live();
    let snapshot = index.current().clone();
    let key = FrontendKey::Addr(Protocol::Tcp, "10.96.0.5:80".parse().expect("address"));
    assert_eq!(snapshot.lookup(&key).map(|p| p.endpoints.all.len()), Some(ENDPOINTS_PER_SERVICE as usize));
    let endpoints = (SERVICES * ENDPOINTS_PER_SERVICE) as usize;
    eprintln!(
        "memory: {SERVICES} services / {endpoints} endpoints: built index (inputs + snapshot) holds {:.1} MiB live \
         heap ({} bytes/endpoint); the k8s-openapi objects it was fed hold {:.1} MiB",
        mib(after - before),
        (after - before) / endpoints,
        mib(objects_bytes),
    );
    drop(index);
    drop(snapshot);
}

fn main() {
    let base = counting::live();
    let services: Vec<Service> = (0..SERVICES).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..SERVICES).map(|i| slice(i, 0)).collect();
    report_memory(&services, &slices, counting::live() - base);

    let mut c = Criterion::default().sample_size(10).configure_from_args();
    c.bench_function("build_from_scratch/10k_services_100k_endpoints", |b| {
        b.iter(|| black_box(build_all(&services, &slices)));
    });

    let mut index = build_all(&services, &slices);
    let changed = [slice(SERVICES / 2, 1), slice(SERVICES / 2, 0)];
    let mut generation = 0usize;
    c.bench_function("incremental/one_endpoint_change_at_100k", |b| {
        b.iter(|| {
            generation += 1;
            index.apply_endpoint_slice(&changed[generation % 2]);
            black_box(index.build())
        });
    });
    c.final_summary();
}
