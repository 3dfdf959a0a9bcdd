//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size `M`
//! in which every backend owns close to `M/N` entries, filled from per-backend permutations
//! so that adding or removing one backend moves few entries of the others. A flow's hash
//! indexes the table; the entry names its backend.
//!
//! Everything here is deterministic across nodes, processes and releases: the hash is our own
//! (never `std`'s `RandomState` or `DefaultHasher`), backends are sorted by their bytes
//! before the table is filled, and the table size depends only on the number of backends.
//! Every node therefore picks the same backend for a flow, and so does a restarted agent.

/// Table sizes (primes), smallest first; a table gets the first one with at least 100 entries
/// per backend (the paper's `M >> N`), the last one for more than 655 backends. Few sizes on
/// purpose: a size change remaps every flow, so the size must not follow each endpoint that
/// comes or goes. Up to 40 endpoints a frontend keeps 4093 entries (4 KiB: one byte each up
/// to 256 backends, built at the first flow); crossing 40 or 655 endpoints remaps flows once.
pub const SIZES: [usize; 3] = [4093, 65521, 131071];

/// The table size for `n` backends.
pub fn table_size(n: usize) -> usize {
    SIZES
        .iter()
        .copied()
        .find(|m| *m >= n.saturating_mul(100))
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// A 64-bit hash of `bytes` under `seed`: FNV-1a, then the SplitMix64 finaliser (FNV alone
/// mixes its last bytes poorly). Fixed forever: tables and flow choices depend on it.
#[inline]
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

const SEED_OFFSET: u64 = 0x6b77_6972_652d_6f66; // "kwire-of"
const SEED_SKIP: u64 = 0x6b77_6972_652d_736b; // "kwire-sk"

/// Fills the lookup table for `backends` (each named by its bytes; the caller sorts them so
/// that the table does not depend on input order) with `m` entries, each an index into
/// `backends`. Empty without backends. `m` must be prime and larger than the backend count.
pub fn build<B: AsRef<[u8]>>(backends: &[B], m: usize) -> Vec<u16> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    assert!(
        n < m && n <= u16::MAX as usize,
        "{n} backends for {m} entries"
    );
    // Each backend's permutation is offset, offset + skip, ... (mod m): walked by addition,
    // `pos` being the next candidate slot of each backend.
    let mut pos: Vec<usize> = Vec::with_capacity(n);
    let mut skips: Vec<usize> = Vec::with_capacity(n);
    for b in backends {
        pos.push((hash(SEED_OFFSET, b.as_ref()) % m as u64) as usize);
        skips.push((hash(SEED_SKIP, b.as_ref()) % (m as u64 - 1)) as usize + 1);
    }
    let mut table = vec![u16::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (skip, c) = (skips[i], &mut pos[i]);
            while table[*c] != u16::MAX {
                *c += skip;
                if *c >= m {
                    *c -= m;
                }
            }
            table[*c] = i as u16;
            *c += skip;
            if *c >= m {
                *c -= m;
            }
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut b = vec![10, 244, (i / 250) as u8, (i % 250) as u8 + 2];
                b.extend_from_slice(&8080u16.to_be_bytes());
                b
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn sizes_are_prime_and_large_enough() {
        for m in SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
        assert_eq!(table_size(1), 4093);
        assert_eq!(table_size(40), 4093);
        assert_eq!(table_size(41), 65521);
        assert_eq!(table_size(100_000), 131071);
    }

    /// The paper's population, written the obvious way: `build` must fill exactly this.
    fn reference<B: AsRef<[u8]>>(backends: &[B], m: usize) -> Vec<u16> {
        let perm: Vec<(usize, usize)> = backends
            .iter()
            .map(|b| {
                let offset = (hash(SEED_OFFSET, b.as_ref()) % m as u64) as usize;
                let skip = (hash(SEED_SKIP, b.as_ref()) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; backends.len()];
        let mut table = vec![u16::MAX; m];
        let mut filled = 0;
        while filled < m {
            for (i, (offset, skip)) in perm.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break;
                }
            }
        }
        table
    }

    #[test]
    fn fills_what_the_paper_describes() {
        for n in [1, 2, 7, 40] {
            let b = names(n);
            assert_eq!(build(&b, 4093), reference(&b, 4093), "{n} backends");
        }
        let b = names(100);
        assert_eq!(build(&b, 65521), reference(&b, 65521));
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let b = names(7);
        let m = table_size(b.len());
        let t = build(&b, m);
        for i in 0..b.len() {
            let share = t.iter().filter(|e| **e as usize == i).count();
            // Maglev's bound: each share is within a few percent of M/N.
            let fair = m / b.len();
            assert!(
                share.abs_diff(fair) <= fair / 10 + 1,
                "backend {i}: {share} of {m}"
            );
        }
        assert!(build::<Vec<u8>>(&[], 251).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Every node builds the same table from the same backends, whatever order its watch
        /// delivered them in (the caller sorts; the table is a function of the set).
        #[test]
        fn same_table_regardless_of_input_order(n in 1usize..40, seed in any::<u64>()) {
            let sorted = names(n);
            let mut shuffled = sorted.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            shuffled.sort();
            let m = table_size(n);
            prop_assert_eq!(build(&sorted, m), build(&shuffled, m));
        }

        /// Removing one of N backends moves the flows it had, close to 1/N of all, and few
        /// others (Maglev's disruption is small, not zero: the paper measures a few percent).
        #[test]
        fn removing_one_backend_moves_about_one_nth(n in 2usize..=40, gone in any::<prop::sample::Index>()) {
            let before = names(n);
            let gone = gone.index(n);
            let after: Vec<Vec<u8>> = before.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, b)| b.clone()).collect();
            // The sizes the service table would choose (equal up to 40 backends).
            let m = table_size(n);
            prop_assert_eq!(m, table_size(n - 1));
            let (t0, t1) = (build(&before, m), build(&after, m));
            let flows = 20_000u64;
            let (mut lost, mut moved_other) = (0u64, 0u64);
            for f in 0..flows {
                let h = hash(0, &f.to_be_bytes());
                let b0 = &before[t0[(h % m as u64) as usize] as usize];
                let b1 = &after[t1[(h % m as u64) as usize] as usize];
                if *b0 == before[gone] {
                    lost += 1;
                } else if b0 != b1 {
                    moved_other += 1;
                }
            }
            // The removed backend's flows (they must move) are close to 1/N of all...
            let share = lost as f64 / flows as f64;
            let expect = 1.0 / n as f64;
            prop_assert!((share - expect).abs() < expect * 0.2, "removed backend had {share:.4}, 1/N = {expect:.4}");
            // ...and few flows of the kept backends move (Maglev trades a little disruption for
            // balance: the paper measures a few percent at M ~ 100 N).
            let other = moved_other as f64 / flows as f64;
            prop_assert!(other < 0.03, "{other:.4} of the flows of kept backends moved");
        }
    }
}
