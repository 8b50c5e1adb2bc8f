//! Maglev consistent hashing: a lookup table from client IP to endpoint.
//!
//! The algorithm is §3.4 of Eisenbud et al., *Maglev: A Fast and Reliable Software Network Load
//! Balancer* (NSDI 2016), as in Cilium's `loadBalancer.algorithm=maglev` and IPVS's `mh`
//! scheduler. Each endpoint gets a permutation of the table's `M` slots, `offset + j·skip mod M`,
//! from two hashes of its address (`offset = h1 mod M`, `skip = h2 mod (M-1) + 1`; `M` prime, so
//! every permutation visits every slot). The endpoints then take turns, in a fixed order, each
//! claiming the next free slot of its own permutation until the table is full. A client's
//! endpoint is the owner of slot `hash(client IP) mod M`.
//!
//! Invariants of [`Table::build`]:
//! - **Deterministic across nodes**: the table depends only on the *set* of endpoint addresses,
//!   not on their order in the input, the process, the host or the Ferry release. The turn order
//!   is the sort order of the canonical address bytes ([`Table::build`]); the hash is specified
//!   here (FNV-1a 64 followed by MurmurHash3's `fmix64` finaliser, fixed seeds, no random
//!   state) and pinned by golden tests. Two Ferry nodes with the same endpoints therefore send a
//!   client to the same endpoint. Duplicate addresses count once (the first occurrence).
//! - **Full**: with at least one endpoint every slot has an owner.
//! - **Balanced**: each round hands every endpoint exactly one slot, so (for `N ≤ M`) every
//!   endpoint owns `⌊M/N⌋` or `⌈M/N⌉` slots.
//! - **Minimal disruption** (approximately): removing one of `N` endpoints reassigns its own
//!   `≈M/N` slots and, because the other endpoints' turns shift, a few more: at most about 4 %
//!   of `M` at the `100·N` sizing (measured worst: 3.8 % at N = 10, 1.5 % at N = 100, 0.6 % at
//!   N = 1000) and 1.5 % with `M = 16381` for up to 30 endpoints (tests pin these bounds). So
//!   the clients of surviving endpoints mostly stay, but not strictly all (Maglev trades this
//!   for balance; the paper's evaluation shows the same). Adding an endpoint is symmetric. A change
//!   of `M` itself remaps almost every client.
//!
//! Table size: [`table_size`] is the smallest of [`PRIMES`] that is at least `100·N` (Maglev's
//! rule of thumb, also Cilium's), capped at [`MAX_TABLE_SIZE`] = 131071, Cilium's largest.
//! [`Table::build_with`] raises it to a minimum: because the `100·N` steps double, going from
//! 10 to 11 endpoints would otherwise change `M` from 1021 to 2039 and remap nearly everyone,
//! so the pool uses [`POOL_MIN_TABLE_SIZE`] (16381, Cilium's default) and `M` stays fixed up to
//! 163 endpoints. Above 1310 endpoints the cap applies: the table stays full and balanced
//! within one slot, but each endpoint owns fewer than 100 slots, so the relative imbalance and
//! the disruption grow; beyond 131071 endpoints some own no slot and are reached only by the
//! fallback. A table costs 4·M bytes (64 KiB at 16381, 512 KiB at the cap).
//!
//! Selection ([`Table::pick`]): the client's slot, and if its endpoint is not eligible (in the
//! pool: unavailable or already tried for this connection) the next slots in table order, up to
//! [`WALK_LIMIT`] of them; the owners of consecutive slots are spread over all endpoints, so an
//! ejected endpoint's clients spread too. If the walk finds nothing, the endpoints are scanned in
//! turn order starting after the client's endpoint. Both steps are deterministic (every node
//! falls back the same way) and allocation-free.
//!
//! Who reads and writes: [`Pool::new`](crate::Pool::new) builds a table when the port's
//! balancing is `Maglev` and the endpoint list changed (otherwise it shares the previous pool's);
//! [`Pool::pick`](crate::Pool::pick) only reads it: no lock, no allocation.

use std::net::{IpAddr, SocketAddr};

/// Table sizes, all prime.
pub const PRIMES: [usize; 10] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071];
/// The largest table size.
pub const MAX_TABLE_SIZE: usize = PRIMES[PRIMES.len() - 1];
/// Slots per endpoint the table size aims for.
pub const SLOTS_PER_ENDPOINT: usize = 100;
/// Minimum table size [`Pool`](crate::Pool) builds with (see the module docs).
pub const POOL_MIN_TABLE_SIZE: usize = 16381;
/// Table slots [`Table::pick`] walks before scanning the endpoints.
pub const WALK_LIMIT: usize = 64;

/// Seeds mixed into the hashes ("maglev-o", "maglev-s", "maglev-c" in ASCII).
const OFFSET_SEED: u64 = 0x6d61_676c_6576_2d6f;
const SKIP_SEED: u64 = 0x6d61_676c_6576_2d73;
const CLIENT_SEED: u64 = 0x6d61_676c_6576_2d63;
/// Marks a free slot while building.
const FREE: u32 = u32::MAX;

/// The table size for `n` endpoints: 0 for none, else the smallest of [`PRIMES`] that is at least
/// `100·n`, at most [`MAX_TABLE_SIZE`].
pub fn table_size(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let want = n.saturating_mul(SLOTS_PER_ENDPOINT);
    PRIMES.into_iter().find(|&p| p >= want).unwrap_or(MAX_TABLE_SIZE)
}

/// [`table_size`], raised to the smallest of [`PRIMES`] at least `min_size` (0 without endpoints).
fn sized(n: usize, min_size: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let floor = PRIMES.into_iter().find(|&p| p >= min_size).unwrap_or(MAX_TABLE_SIZE);
    table_size(n).max(floor)
}

/// A Maglev lookup table over a list of endpoint addresses.
///
/// Slots hold indexes into the address list given to [`Table::build`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Slot -> endpoint index; empty when there are no endpoints.
    slots: Box<[u32]>,
    /// Turn order: endpoint indexes sorted by canonical address, duplicates removed.
    order: Box<[u32]>,
    /// Endpoint index -> position in `order` (0 for duplicates, which own no slot and are not read).
    rank: Box<[u32]>,
}

// === impl Table ===

impl Table {
    /// Builds the table for `addrs`. The result, read as slot -> address, does not depend on the
    /// order of `addrs`. Costs O(M log M) time and O(M + N) memory.
    ///
    /// Addresses beyond the 2³²-1st are ignored (no such pool fits in memory anyway).
    pub fn build(addrs: &[SocketAddr]) -> Self {
        Self::build_with(addrs, 0)
    }

    /// [`Self::build`] with a table of at least `min_size` slots: the smallest of [`PRIMES`] that
    /// is at least both `min_size` and `100·N` (at most [`MAX_TABLE_SIZE`]). A fixed minimum
    /// keeps `M` unchanged while the endpoint count varies below `min_size / 100`; a change of
    /// `M` remaps almost every client.
    pub fn build_with(addrs: &[SocketAddr], min_size: usize) -> Self {
        let addrs = &addrs[..addrs.len().min(FREE as usize)];
        let keys: Vec<Key> = addrs.iter().map(|&a| Key::endpoint(a)).collect();
        let mut order: Vec<u32> = (0..addrs.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (keys[i as usize], i));
        order.dedup_by_key(|i| keys[*i as usize]);
        let mut rank = vec![0u32; addrs.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }

        let n = order.len();
        let m = sized(n, min_size);
        if m == 0 {
            return Self::default();
        }
        // Each endpoint's next candidate slot and step through its permutation.
        let mut next = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        for &i in &order {
            let key = &keys[i as usize];
            next.push((hash(OFFSET_SEED, key.bytes()) % m as u64) as usize);
            skip.push((hash(SKIP_SEED, key.bytes()) % (m as u64 - 1)) as usize + 1);
        }
        let mut slots = vec![FREE; m];
        let mut filled = 0;
        'fill: loop {
            for (r, &i) in order.iter().enumerate() {
                // Terminates: a free slot exists (filled < m) and the permutation visits all.
                let mut c = next[r];
                while slots[c] != FREE {
                    c = step(c, skip[r], m);
                }
                slots[c] = i;
                next[r] = step(c, skip[r], m);
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self { slots: slots.into(), order: order.into(), rank: rank.into() }
    }

    /// Number of slots (`M`); 0 for a table without endpoints.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no endpoints (every lookup is `None`).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slot -> endpoint index.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The slot `client` hashes to.
    pub fn slot_of(&self, client: IpAddr) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some((client_hash(client) % self.slots.len() as u64) as usize)
    }

    /// The index of `client`'s endpoint, regardless of eligibility.
    pub fn lookup(&self, client: IpAddr) -> Option<usize> {
        self.slot_of(client).map(|s| self.slots[s] as usize)
    }

    /// The index of the endpoint for `client` among those `eligible` accepts: the client's own
    /// endpoint if eligible, else the deterministic fallback described in the module docs.
    /// `None` only when no endpoint is eligible. Allocation-free; calls `eligible` at most
    /// [`WALK_LIMIT`] + N times.
    pub fn pick(&self, client: IpAddr, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.slot_of(client)?;
        let m = self.slots.len();
        for k in 0..WALK_LIMIT.min(m) {
            let i = self.slots[step(start, k, m)] as usize;
            if eligible(i) {
                return Some(i);
            }
        }
        let n = self.order.len();
        let first = self.rank[self.slots[start] as usize] as usize;
        (1..=n).map(|k| self.order[(first + k) % n] as usize).find(|&i| eligible(i))
    }
}

/// `(c + by) mod m` for `c, by < m`.
fn step(c: usize, by: usize, m: usize) -> usize {
    let c = c + by;
    if c >= m { c - m } else { c }
}

/// The hash of `client`'s canonical address (IPv4-mapped IPv6 counts as IPv4).
pub fn client_hash(client: IpAddr) -> u64 {
    hash(CLIENT_SEED, Key::ip(client).bytes())
}

/// `fmix64(FNV-1a-64(bytes) ^ seed)`.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    fmix64(fnv1a(bytes) ^ seed)
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output, so
/// residues modulo small primes are well mixed even for addresses differing in one byte.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Canonical bytes of an address: family (4 or 6), IP octets, then the port (big-endian) for
/// endpoints. Orders and hashes addresses independently of Rust's `SocketAddr` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    buf: [u8; 19],
    len: u8,
}

// === impl Key ===

impl Key {
    fn ip(ip: IpAddr) -> Self {
        let mut buf = [0; 19];
        let len = match ip.to_canonical() {
            IpAddr::V4(v4) => {
                buf[0] = 4;
                buf[1..5].copy_from_slice(&v4.octets());
                5
            }
            IpAddr::V6(v6) => {
                buf[0] = 6;
                buf[1..17].copy_from_slice(&v6.octets());
                17
            }
        };
        Self { buf, len }
    }

    fn endpoint(addr: SocketAddr) -> Self {
        let mut key = Self::ip(addr.ip());
        let at = usize::from(key.len);
        key.buf[at..at + 2].copy_from_slice(&addr.port().to_be_bytes());
        key.len += 2;
        key
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

#[cfg(test)]
#[path = "maglev_tests.rs"]
mod tests;
