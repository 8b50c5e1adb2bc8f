//! Endpoint selection algorithms, as pure functions over a slice.
//!
//! Every function takes the candidates, an `eligible` predicate (in the pool: available and not
//! yet tried for this connection) and, where randomness is involved, a [`RandomSource`], so tests
//! run them deterministically with a seeded [`fastrand::Rng`] while the pool uses the
//! thread-local generator ([`ThreadRandom`]). They return the index of the chosen candidate, or
//! `None` when no candidate is eligible. They never allocate.
//!
//! - [`random`]: uniform over the eligible candidates.
//! - [`round_robin`]: each eligible candidate in turn, driven by a shared atomic cursor.
//! - [`least_connections`]: power of two choices: two distinct eligible candidates drawn
//!   uniformly, the one with fewer active connections wins, ties broken at random.
//!
//! Sampling is rejection sampling (draw an index, keep it if eligible) for a few rounds, then an
//! exact count-and-draw over the eligible set. Both are uniform over the eligible candidates, so
//! their mix is too; the fast path makes a pick O(1) when most candidates are eligible.

use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_model::Balancing;

/// Rejection-sampling rounds before falling back to an exact draw.
const SAMPLE_TRIES: usize = 4;

/// A source of uniform random indexes.
pub trait RandomSource {
    /// A uniformly random number in `0..n`; `n` is at least 1.
    fn below(&mut self, n: usize) -> usize;
}

impl RandomSource for fastrand::Rng {
    fn below(&mut self, n: usize) -> usize {
        self.usize(..n)
    }
}

/// The thread-local [`fastrand`] generator.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadRandom;

impl RandomSource for ThreadRandom {
    fn below(&mut self, n: usize) -> usize {
        fastrand::usize(..n)
    }
}

/// Chooses an index of `items` with `balancing`.
///
/// `cursor` is the round-robin position (only used by [`Balancing::RoundRobin`]); `load` is the
/// active connection count (only used by [`Balancing::LeastConnections`]). [`Balancing::Maglev`]
/// needs the client address and a table ([`crate::maglev::Table::pick`]); here it falls back to
/// [`random`].
pub fn select<T>(
    balancing: Balancing,
    items: &[T],
    cursor: &AtomicUsize,
    eligible: impl Fn(&T) -> bool,
    load: impl Fn(&T) -> u32,
    rng: &mut impl RandomSource,
) -> Option<usize> {
    match balancing {
        // Maglev hashes the client, which this function does not see: `Pool` picks from its
        // `maglev::Table` instead of calling here. Other callers get uniform random.
        Balancing::Random | Balancing::Maglev => random(items, eligible, rng),
        Balancing::RoundRobin => round_robin(items, cursor, eligible),
        Balancing::LeastConnections => least_connections(items, eligible, load, rng),
    }
}

/// A uniformly random eligible index.
pub fn random<T>(items: &[T], eligible: impl Fn(&T) -> bool, rng: &mut impl RandomSource) -> Option<usize> {
    sample(items, &eligible, None, rng)
}

/// The next eligible index at or after `cursor`, advancing the cursor past it.
///
/// Single-threaded, successive calls visit the eligible candidates in order, each exactly once per
/// round, whatever is ineligible in between (an ineligible candidate does not hand its turn to its
/// successor). Concurrent callers each get a distinct start position; the skip correction is best
/// effort, so under contention the spread is even only approximately.
pub fn round_robin<T>(items: &[T], cursor: &AtomicUsize, eligible: impl Fn(&T) -> bool) -> Option<usize> {
    let n = items.len();
    if n == 0 {
        return None;
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    for skipped in 0..n {
        let i = start.wrapping_add(skipped) % n;
        if eligible(&items[i]) {
            if skipped > 0 {
                cursor.fetch_add(skipped, Ordering::Relaxed);
            }
            return Some(i);
        }
    }
    None
}

/// Power of two choices: two distinct random eligible candidates, the lower `load` wins, ties
/// at random. With one eligible candidate, that one.
pub fn least_connections<T>(
    items: &[T],
    eligible: impl Fn(&T) -> bool,
    load: impl Fn(&T) -> u32,
    rng: &mut impl RandomSource,
) -> Option<usize> {
    let a = sample(items, &eligible, None, rng)?;
    let Some(b) = sample(items, &eligible, Some(a), rng) else {
        return Some(a);
    };
    let (la, lb) = (load(&items[a]), load(&items[b]));
    Some(match la.cmp(&lb) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal => {
            if rng.below(2) == 0 {
                a
            } else {
                b
            }
        }
    })
}

/// A uniformly random eligible index other than `exclude`.
fn sample<T>(
    items: &[T],
    eligible: &impl Fn(&T) -> bool,
    exclude: Option<usize>,
    rng: &mut impl RandomSource,
) -> Option<usize> {
    let n = items.len();
    if n == 0 {
        return None;
    }
    let ok = |i: usize| Some(i) != exclude && eligible(&items[i]);
    for _ in 0..SAMPLE_TRIES {
        let i = rng.below(n);
        if ok(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|&i| ok(i)).count();
    if count == 0 {
        return None;
    }
    let k = rng.below(count);
    // Eligibility may change concurrently between the passes; fall back to any eligible index.
    (0..n).filter(|&i| ok(i)).nth(k).or_else(|| (0..n).find(|&i| ok(i)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Copy, Debug)]
    struct Item {
        up: bool,
        load: u32,
    }

    fn items(ups: &[bool]) -> Vec<Item> {
        ups.iter().map(|&up| Item { up, load: 0 }).collect()
    }

    fn counts(n: usize, picks: impl Iterator<Item = Option<usize>>) -> Vec<usize> {
        let mut c = vec![0; n];
        for p in picks {
            c[p.expect("something eligible")] += 1;
        }
        c
    }

    #[test]
    fn empty_and_none_eligible() {
        let mut rng = fastrand::Rng::with_seed(1);
        let cursor = AtomicUsize::new(0);
        let none: [Item; 0] = [];
        assert_eq!(random(&none, |_| true, &mut rng), None);
        assert_eq!(round_robin(&none, &cursor, |_| true), None);
        assert_eq!(least_connections(&none, |_| true, |_| 0, &mut rng), None);
        let down = items(&[false, false, false]);
        assert_eq!(random(&down, |i| i.up, &mut rng), None);
        assert_eq!(round_robin(&down, &cursor, |i| i.up), None);
        assert_eq!(least_connections(&down, |i| i.up, |i| i.load, &mut rng), None);
    }

    #[test]
    fn random_is_roughly_uniform_and_skips_ineligible() {
        let mut rng = fastrand::Rng::with_seed(7);
        let it = items(&[true, false, true, true, false]);
        let c = counts(5, (0..30_000).map(|_| random(&it, |i| i.up, &mut rng)));
        assert_eq!((c[1], c[4]), (0, 0));
        for i in [0, 2, 3] {
            assert!((9_000..11_000).contains(&c[i]), "{c:?}");
        }
    }

    #[test]
    fn random_exact_fallback_with_one_eligible_in_many() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut ups = vec![false; 1000];
        ups[617] = true;
        let it = items(&ups);
        for _ in 0..100 {
            assert_eq!(random(&it, |i| i.up, &mut rng), Some(617));
        }
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let cursor = AtomicUsize::new(0);
        let it = items(&[true; 5]);
        let c = counts(5, (0..5_000).map(|_| round_robin(&it, &cursor, |i| i.up)));
        assert_eq!(c, vec![1_000; 5]);
    }

    #[test]
    fn round_robin_skips_ineligible_without_doubling_successor() {
        let cursor = AtomicUsize::new(0);
        let it = items(&[true, false, false, true, true, false]);
        let seq: Vec<_> = (0..6).map(|_| round_robin(&it, &cursor, |i| i.up).expect("eligible")).collect();
        assert_eq!(seq, vec![0, 3, 4, 0, 3, 4]);
        let c = counts(6, (0..3_000).map(|_| round_robin(&it, &cursor, |i| i.up)));
        assert_eq!(c, vec![1_000, 0, 0, 1_000, 1_000, 0]);
    }

    #[test]
    fn round_robin_survives_cursor_wrap() {
        let cursor = AtomicUsize::new(usize::MAX - 2);
        let it = items(&[true; 3]);
        for _ in 0..10 {
            assert!(round_robin(&it, &cursor, |i| i.up).is_some());
        }
    }

    #[test]
    fn p2c_two_eligible_always_takes_lower() {
        let mut rng = fastrand::Rng::with_seed(11);
        let it = [Item { up: true, load: 5 }, Item { up: false, load: 0 }, Item { up: true, load: 2 }];
        for _ in 0..1_000 {
            assert_eq!(least_connections(&it, |i| i.up, |i| i.load, &mut rng), Some(2));
        }
    }

    #[test]
    fn p2c_prefers_idle_endpoint() {
        // The idle one wins whenever it is one of the two candidates: 1 - C(3,2)/C(4,2) = 1/2.
        let mut rng = fastrand::Rng::with_seed(5);
        let it = [
            Item { up: true, load: 10 },
            Item { up: true, load: 0 },
            Item { up: true, load: 10 },
            Item { up: true, load: 10 },
        ];
        let c = counts(4, (0..20_000).map(|_| least_connections(&it, |i| i.up, |i| i.load, &mut rng)));
        assert!((9_000..11_000).contains(&c[1]), "{c:?}");
        for i in [0, 2, 3] {
            assert!((2_800..3_900).contains(&c[i]), "{c:?}");
        }
    }

    #[test]
    fn p2c_ties_are_random() {
        let mut rng = fastrand::Rng::with_seed(9);
        let it = items(&[true, true]);
        let c = counts(2, (0..10_000).map(|_| least_connections(&it, |i| i.up, |i| i.load, &mut rng)));
        assert!((4_500..5_500).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn select_dispatches() {
        let mut rng = fastrand::Rng::with_seed(2);
        let cursor = AtomicUsize::new(1);
        let it = items(&[true, true, true]);
        assert_eq!(select(Balancing::RoundRobin, &it, &cursor, |i| i.up, |i| i.load, &mut rng), Some(1));
        assert_eq!(select(Balancing::RoundRobin, &it, &cursor, |i| i.up, |i| i.load, &mut rng), Some(2));
        assert!(select(Balancing::Random, &it, &cursor, |i| i.up, |i| i.load, &mut rng).is_some());
        assert!(select(Balancing::LeastConnections, &it, &cursor, |i| i.up, |i| i.load, &mut rng).is_some());
    }

    proptest! {
        #[test]
        fn picks_are_eligible_and_some_iff_any(
            cands in proptest::collection::vec((any::<bool>(), 0u32..4), 0..40),
            seed in any::<u64>(),
            start in any::<usize>(),
        ) {
            let it: Vec<Item> = cands.iter().map(|&(up, load)| Item { up, load }).collect();
            let any_up = it.iter().any(|i| i.up);
            let mut rng = fastrand::Rng::with_seed(seed);
            let cursor = AtomicUsize::new(start);
            for b in [Balancing::Random, Balancing::RoundRobin, Balancing::LeastConnections] {
                let p = select(b, &it, &cursor, |i| i.up, |i| i.load, &mut rng);
                prop_assert_eq!(p.is_some(), any_up);
                if let Some(p) = p {
                    prop_assert!(it[p].up);
                }
            }
        }

        #[test]
        fn p2c_never_picks_unique_maximum(
            loads in proptest::collection::vec(0u32..100, 2..30),
            seed in any::<u64>(),
        ) {
            let max = *loads.iter().max().expect("non-empty");
            prop_assume!(loads.iter().filter(|&&l| l == max).count() == 1);
            let it: Vec<Item> = loads.iter().map(|&load| Item { up: true, load }).collect();
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..20 {
                let p = least_connections(&it, |i| i.up, |i| i.load, &mut rng).expect("eligible");
                prop_assert!(it[p].load < max);
            }
        }
    }
}
