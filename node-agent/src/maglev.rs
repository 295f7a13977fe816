//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! Pure: a table is a function of the backend set alone. Backends are sorted
//! by their key before the table is filled, and each backend's permutation
//! depends only on its key, so every ingress node builds the same table for
//! the same set whatever order the backends arrive in. That is what keeps a
//! flow on its backend when ECMP moves it from one ingress node to another.
//!
//! Weights: on every pass a backend earns `weight` credits and takes one slot
//! per `max_weight` credits it holds, so shares follow weights while equal
//! weights reduce to the paper's round-robin fill.

use std::fmt;

/// Table sizes a service may choose. Prime, as Maglev requires, and at most
/// [`kube_dsr_common::RING_MAX`], the size of one ring row in the kernel.
pub const TABLE_SIZES: [u32; 6] = [251, 1021, 4093, 16381, 32749, 65537];

/// The default table size (Katran's and Envoy's).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// One entry of the set to balance over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<K> {
    /// Stable identity (the backend address bytes): decides the permutation.
    pub key: Vec<u8>,
    /// Relative weight; 0 means the entry gets no slot.
    pub weight: u32,
    /// What the table stores for this entry.
    pub value: K,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaglevError {
    /// The size is not one of [`TABLE_SIZES`].
    UnsupportedSize(u32),
    /// Two entries share a key.
    DuplicateKey(Vec<u8>),
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedSize(m) => {
                write!(f, "Maglev table size {m} is not one of {TABLE_SIZES:?}")
            }
            Self::DuplicateKey(k) => write!(f, "backend {k:02x?} is listed twice"),
        }
    }
}

impl std::error::Error for MaglevError {}

/// Fills a table of `size` slots. Returns `None` when no entry has a
/// positive weight (the service has nowhere to send new flows).
pub fn build<K: Copy>(size: u32, entries: &[Entry<K>]) -> Result<Option<Vec<K>>, MaglevError> {
    if !TABLE_SIZES.contains(&size) {
        return Err(MaglevError::UnsupportedSize(size));
    }
    let mut sorted: Vec<&Entry<K>> = entries.iter().filter(|e| e.weight > 0).collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(w) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(MaglevError::DuplicateKey(w[0].key.clone()));
    }
    if sorted.is_empty() {
        return Ok(None);
    }

    let m = u64::from(size);
    let max_weight = sorted.iter().map(|e| u64::from(e.weight)).max().unwrap_or(1);
    struct Walk {
        offset: u64,
        skip: u64,
        next: u64,
        credit: u64,
    }
    let mut walks: Vec<Walk> = sorted
        .iter()
        .map(|e| Walk {
            offset: hash(&e.key, 0x6b64_7372_6f66_6673) % m,
            skip: hash(&e.key, 0x6b64_7372_736b_6970) % (m - 1) + 1,
            next: 0,
            credit: 0,
        })
        .collect();

    let mut table: Vec<Option<K>> = vec![None; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, walk) in walks.iter_mut().enumerate() {
            walk.credit += u64::from(sorted[i].weight);
            while walk.credit >= max_weight {
                walk.credit -= max_weight;
                // The backend's next preferred slot that is still free.
                let slot = loop {
                    let c = (walk.offset + walk.next * walk.skip) % m;
                    walk.next += 1;
                    if table[c as usize].is_none() {
                        break c;
                    }
                };
                table[slot as usize] = Some(sorted[i].value);
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    Ok(Some(table.into_iter().map(|v| v.expect("every slot is filled")).collect()))
}

/// A fixed, portable 64-bit hash (FNV-1a, then a SplitMix64 finaliser).
/// Part of the table's contract: changing it moves flows between backends.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u32) -> Vec<Entry<u32>> {
        (0..n)
            .map(|i| Entry { key: [10, 1, (i >> 8) as u8, i as u8].to_vec(), weight: 1, value: i })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &v in table {
            c[v as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_give_floor_or_ceil_of_m_over_n() {
        for &(m, n) in &[(65537u32, 100u32), (65537, 3), (251, 7), (4093, 64), (16381, 1000)] {
            let t = build(m, &entries(n)).unwrap().unwrap();
            let (lo, hi) = ((m / n) as usize, m.div_ceil(n) as usize);
            for (i, c) in counts(&t, n as usize).into_iter().enumerate() {
                assert!(c == lo || c == hi, "M={m} N={n}: backend {i} has {c} slots");
            }
        }
    }

    #[test]
    fn order_of_arrival_does_not_matter() {
        let a = entries(50);
        let mut b = a.clone();
        b.reverse();
        b.swap(3, 17);
        assert_eq!(build(65537, &a).unwrap(), build(65537, &b).unwrap());
    }

    #[test]
    fn removing_one_of_100_backends_moves_at_most_2_percent() {
        let all = entries(100);
        let before = build(65537, &all).unwrap().unwrap();
        for removed in [0usize, 42, 99] {
            let rest: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, e)| e.clone())
                .collect();
            let after = build(65537, &rest).unwrap().unwrap();
            let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let share = changed as f64 / 65537.0;
            assert!(share <= 0.02, "removing {removed} changed {:.3}% of slots", share * 100.0);
            // The removed backend's own slots must all move; nothing may
            // still point at it.
            assert!(after.iter().all(|&v| v != removed as u32));
        }
    }

    #[test]
    fn adding_a_backend_only_takes_slots() {
        let all = entries(100);
        let before = build(65537, &all[..99]).unwrap().unwrap();
        let after = build(65537, &all).unwrap().unwrap();
        let moved_elsewhere =
            before.iter().zip(&after).filter(|(a, b)| a != b && **b != 99).count();
        assert!(moved_elsewhere as f64 / 65537.0 <= 0.01, "{moved_elsewhere} slots reshuffled");
    }

    #[test]
    fn weights_are_honoured_within_one_percent_of_share() {
        for weights in [vec![1u32, 2, 3, 4], vec![1, 1, 10], vec![5, 7, 11, 13, 100]] {
            let es: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Entry { key: vec![i as u8, 9], weight: w, value: i as u32 })
                .collect();
            let t = build(65537, &es).unwrap().unwrap();
            let total: u32 = weights.iter().sum();
            for (i, c) in counts(&t, weights.len()).into_iter().enumerate() {
                let want = 65537.0 * f64::from(weights[i]) / f64::from(total);
                let err = (c as f64 - want).abs() / want;
                assert!(err <= 0.01, "weights {weights:?}: backend {i} got {c}, want {want:.0}");
            }
        }
    }

    #[test]
    fn zero_weight_gets_no_slot_and_all_zero_means_no_table() {
        let mut es = entries(3);
        es[1].weight = 0;
        let t = build(251, &es).unwrap().unwrap();
        assert!(!t.contains(&1));
        for e in &mut es {
            e.weight = 0;
        }
        assert_eq!(build(251, &es).unwrap(), None);
    }

    #[test]
    fn bad_sizes_and_duplicates_are_refused() {
        assert_eq!(build(1000, &entries(2)), Err(MaglevError::UnsupportedSize(1000)));
        let mut es = entries(2);
        es[1].key = es[0].key.clone();
        assert!(matches!(build(251, &es), Err(MaglevError::DuplicateKey(_))));
    }

    #[test]
    fn the_api_offers_exactly_the_sizes_the_dataplane_supports() {
        assert_eq!(TABLE_SIZES, kube_dsr_crds::dsrservice::TABLE_SIZES);
        assert_eq!(DEFAULT_TABLE_SIZE, 65537);
    }

    #[test]
    fn every_listed_size_is_prime_and_fits_a_ring_row() {
        for m in TABLE_SIZES {
            assert!(m <= kube_dsr_common::RING_MAX);
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m} is not prime");
        }
    }
}
