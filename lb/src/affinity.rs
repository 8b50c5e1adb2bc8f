//! ClientIP session affinity: a sharded table from client IP to the endpoint it last used.
//!
//! Semantics follow kube-proxy (`-m recent --rcheck --seconds T` then `--set`): an entry is live
//! while less than `timeout` has passed since the client's *last* connection, and every hit
//! refreshes it. Whether a live entry is usable (endpoint still in the pool, available, not yet
//! tried by this connection) is the caller's decision, made under the shard lock through the
//! `accept` closure of [`AffinityTable::lookup`]; on a miss the caller balances and
//! [`AffinityTable::record`]s the choice.
//!
//! One table per [`Pool`](crate::Pool) (the scope of kube-proxy's `recent` lists is one
//! ServicePort); it is shared (`Arc`) with the next pool when the affinity configuration is
//! unchanged.
//!
//! Concurrency: [`SHARDS`] `parking_lot` mutexes keyed by a hash of the client IP, each held
//! only for a hash-map operation, so connections from different clients rarely contend.
//!
//! Memory is bounded: a shard drops its expired entries every [`SWEEP_EVERY`] insertions and
//! whenever it is full; a full shard with no expired entry evicts its least recently used entry.
//! [`AffinityTable::sweep`] lets an owner also sweep periodically, so an idle table shrinks.
//!
//! Time is passed in (`now`), so tests use synthetic instants.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// Number of shards.
pub const SHARDS: usize = 16;
/// Default bound on the number of entries of one table.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// A shard sweeps its expired entries after this many insertions.
pub const SWEEP_EVERY: u32 = 256;

/// Client IP -> (endpoint, last seen), sharded.
#[derive(Debug)]
pub struct AffinityTable {
    timeout: Duration,
    shard_capacity: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<IpAddr, Entry>,
    inserts_since_sweep: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    endpoint: SocketAddr,
    last_seen: Instant,
}

// === impl AffinityTable ===

impl AffinityTable {
    /// An empty table whose entries live for `timeout` after last use, with the default capacity.
    pub fn new(timeout: Duration) -> Self {
        Self::with_capacity(timeout, DEFAULT_CAPACITY)
    }

    /// An empty table holding at most about `capacity` entries (rounded up to a multiple of
    /// [`SHARDS`]).
    pub fn with_capacity(timeout: Duration, capacity: usize) -> Self {
        Self {
            timeout,
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// How long an entry lives after its last use.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Upper bound on [`Self::len`].
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    fn shard(&self, client: &IpAddr) -> &Mutex<Shard> {
        // The high bits: the shard maps hash with their own keys, so this only needs spread.
        let h = self.hasher.hash_one(client);
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) < self.timeout
    }

    /// Looks up `client`'s endpoint. On a live entry whose endpoint `accept` maps to `Some`, the
    /// entry is refreshed (last seen = `now`) and `accept`'s value returned. An expired entry is
    /// removed. `accept` runs under the shard lock: keep it short and lock-free.
    pub fn lookup<R>(
        &self,
        client: IpAddr,
        now: Instant,
        accept: impl FnOnce(SocketAddr) -> Option<R>,
    ) -> Option<R> {
        let mut shard = self.shard(&client).lock();
        let entry = shard.entries.get_mut(&client)?;
        if !self.live(entry, now) {
            shard.entries.remove(&client);
            return None;
        }
        let r = accept(entry.endpoint)?;
        entry.last_seen = now;
        Some(r)
    }

    /// Records that `client` now uses `endpoint` (insert or overwrite), last seen `now`.
    pub fn record(&self, client: IpAddr, endpoint: SocketAddr, now: Instant) {
        let mut shard = self.shard(&client).lock();
        let entry = Entry { endpoint, last_seen: now };
        if let Some(e) = shard.entries.get_mut(&client) {
            *e = entry;
            return;
        }
        shard.inserts_since_sweep += 1;
        if shard.inserts_since_sweep >= SWEEP_EVERY || shard.entries.len() >= self.shard_capacity {
            self.sweep_shard(&mut shard, now);
        }
        if shard.entries.len() >= self.shard_capacity {
            let oldest = shard.entries.iter().min_by_key(|(_, e)| e.last_seen).map(|(ip, _)| *ip);
            if let Some(ip) = oldest {
                shard.entries.remove(&ip);
            }
        }
        shard.entries.insert(client, entry);
    }

    fn sweep_shard(&self, shard: &mut Shard, now: Instant) -> usize {
        let before = shard.entries.len();
        shard.entries.retain(|_, e| self.live(e, now));
        shard.inserts_since_sweep = 0;
        before - shard.entries.len()
    }

    /// Removes every entry expired at `now`; returns how many were removed. Locks one shard at
    /// a time.
    pub fn sweep(&self, now: Instant) -> usize {
        self.shards.iter().map(|s| self.sweep_shard(&mut s.lock(), now)).sum()
    }

    /// Number of entries, live or not yet swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().entries.len()).sum()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    const T: Duration = Duration::from_secs(100);

    #[test]
    fn hit_within_timeout_refreshes() {
        let t = AffinityTable::new(T);
        let t0 = Instant::now();
        assert_eq!(t.lookup(ip(1), t0, Some), None);
        t.record(ip(1), ep(1), t0);
        let t1 = t0 + Duration::from_secs(99);
        assert_eq!(t.lookup(ip(1), t1, Some), Some(ep(1)));
        // Refreshed at t1: still live 99 s after t1, although 198 s after t0.
        let t2 = t1 + Duration::from_secs(99);
        assert_eq!(t.lookup(ip(1), t2, Some), Some(ep(1)));
        // Expired: exactly `timeout` after the last use.
        assert_eq!(t.lookup(ip(1), t2 + T, Some), None);
        assert!(t.is_empty(), "the expired entry was removed on lookup");
    }

    #[test]
    fn rejected_hit_is_not_refreshed() {
        let t = AffinityTable::new(T);
        let t0 = Instant::now();
        t.record(ip(1), ep(1), t0);
        assert_eq!(t.lookup(ip(1), t0 + Duration::from_secs(50), |_| None::<()>), None);
        assert_eq!(t.lookup(ip(1), t0 + T, Some), None, "not refreshed by the rejected hit");
    }

    #[test]
    fn record_overwrites() {
        let t = AffinityTable::new(T);
        let t0 = Instant::now();
        t.record(ip(1), ep(1), t0);
        t.record(ip(1), ep(2), t0);
        assert_eq!(t.lookup(ip(1), t0, Some), Some(ep(2)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn sweep_removes_expired_only() {
        let t = AffinityTable::new(T);
        let t0 = Instant::now();
        for i in 0..100 {
            t.record(ip(i), ep(1), t0);
        }
        for i in 100..150 {
            t.record(ip(i), ep(1), t0 + Duration::from_secs(50));
        }
        assert_eq!(t.sweep(t0 + T), 100);
        assert_eq!(t.len(), 50);
        assert_eq!(t.lookup(ip(120), t0 + T, Some), Some(ep(1)));
    }

    #[test]
    fn hard_cap_evicts_least_recently_used() {
        let cap = SHARDS * 8;
        let t = AffinityTable::with_capacity(T, cap);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            t.record(ip(i), ep(1), t0 + Duration::from_millis(u64::from(i)));
            assert!(t.len() <= cap);
        }
        assert_eq!(t.len(), cap);
        // The most recent client survived.
        let last = t0 + Duration::from_millis(9_999);
        assert_eq!(t.lookup(ip(9_999), last, Some), Some(ep(1)));
        assert_eq!(t.lookup(ip(0), last, Some), None);
    }

    #[test]
    fn amortised_sweep_bounds_expired_entries() {
        let t = AffinityTable::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // Every client connects once, each a second after the previous: all but the newest are
        // expired; the periodic sweep keeps the table far below its capacity.
        for i in 0..20_000u32 {
            t.record(ip(i), ep(1), t0 + Duration::from_secs(u64::from(i)));
        }
        assert!(t.len() <= SHARDS * SWEEP_EVERY as usize, "{}", t.len());
    }
}
