//! Weighted rendezvous (highest-random-weight) hashing, for Triton sequences: every request of
//! a sequence (`sequence_id`) must reach the node that holds its state, so a key must map to
//! the same node for as long as that node is there.
//!
//! A key goes to the member with the highest score `-capacity / ln(u)`, `u` a uniform draw in
//! (0, 1) hashed from the key and the member's id (Thaler and Ravishankar's rendezvous hashing,
//! weighted as Schindelhauer and Schomaker showed: each member wins a share of keys
//! proportional to its capacity). Only membership moves keys: a member leaving moves only the
//! keys it held, a member joining takes only the keys it wins. Load and control-plane weights
//! play no part. Unlike [`super::ring`], nothing is built ahead (so it serves every model,
//! whatever its balancer), and there is no load bound: the ring's moves keys off a busy node
//! on purpose, which a sequence cannot afford. The cost is one hash per member at each pick,
//! microseconds for the tens of nodes a model has in a region.
//!
//! Written here rather than taken from a crate for the same reason as [`super::ring::hash`]:
//! the mapping must be identical on every router of every version, so it depends on nothing
//! but that stable hash.

use super::ring::hash;

/// A node as sequence routing sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Member {
    /// [`hash`] of the node's id: the same on every router.
    pub id_hash: u64,
    /// Registered capacity: a node's share of sequences. Not positive or not finite counts as
    /// one.
    pub capacity: f64,
    /// Whether the node may take the key now (routable, not ejected, not already tried).
    pub eligible: bool,
}

/// The member `key` goes to: the eligible one with the highest score; `None` when none is
/// eligible. Ties (measure zero) go to the first.
pub fn pick(members: &[Member], key: u64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, m) in members.iter().enumerate() {
        if !m.eligible {
            continue;
        }
        let s = score(key, m);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// `-capacity / ln(u)`: larger for a larger capacity and a larger `u`.
fn score(key: u64, m: &Member) -> f64 {
    let capacity = if m.capacity.is_finite() && m.capacity > 0.0 {
        m.capacity
    } else {
        1.0
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.to_le_bytes());
    bytes[8..].copy_from_slice(&m.id_hash.to_le_bytes());
    // 53 bits, shifted into (0, 1): never 0 (ln 0) nor 1 (ln 1 = 0).
    let u = ((hash(&bytes) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -capacity / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(caps: &[f64]) -> Vec<Member> {
        caps.iter()
            .enumerate()
            .map(|(i, &capacity)| Member {
                id_hash: hash(format!("node-{i}").as_bytes()),
                capacity,
                eligible: true,
            })
            .collect()
    }

    #[test]
    fn shares_follow_capacity() {
        let m = members(&[1.0, 1.0, 2.0]);
        let mut won = [0u32; 3];
        let keys = 30_000u64;
        for k in 0..keys {
            won[pick(&m, hash(&k.to_le_bytes())).unwrap()] += 1;
        }
        // Expected 1/4, 1/4, 1/2; 30,000 keys put three standard deviations within ±1 %.
        let share = |i: usize| f64::from(won[i]) / keys as f64;
        assert!((share(0) - 0.25).abs() < 0.015, "{won:?}");
        assert!((share(1) - 0.25).abs() < 0.015, "{won:?}");
        assert!((share(2) - 0.5).abs() < 0.015, "{won:?}");
    }

    #[test]
    fn nothing_eligible_is_none() {
        let mut m = members(&[1.0, 1.0]);
        for x in &mut m {
            x.eligible = false;
        }
        assert_eq!(pick(&m, 7), None);
        assert_eq!(pick(&[], 7), None);
    }

    proptest! {
        #[test]
        fn picks_an_eligible_member(
            caps in prop::collection::vec(-1.0f64..100.0, 0..12),
            out in prop::collection::vec(any::<bool>(), 12),
            key: u64,
        ) {
            let mut m = members(&caps);
            for (x, o) in m.iter_mut().zip(&out) {
                x.eligible = !o;
            }
            match pick(&m, key) {
                Some(i) => prop_assert!(m[i].eligible),
                None => prop_assert!(m.iter().all(|x| !x.eligible)),
            }
        }

        /// Only membership moves a key: taking out a member the key is not on, or changing the
        /// order the members are listed in, leaves it where it was.
        #[test]
        fn only_membership_moves_a_key(
            caps in prop::collection::vec(0.5f64..100.0, 2..12),
            key: u64,
            drop_at: usize,
            rotate: usize,
        ) {
            let m = members(&caps);
            let chosen = m[pick(&m, key).unwrap()].id_hash;
            let gone = drop_at % m.len();
            if m[gone].id_hash != chosen {
                let mut fewer = m.clone();
                fewer.remove(gone);
                prop_assert_eq!(fewer[pick(&fewer, key).unwrap()].id_hash, chosen);
            }
            let mut turned = m.clone();
            turned.rotate_left(rotate % m.len());
            prop_assert_eq!(turned[pick(&turned, key).unwrap()].id_hash, chosen);
        }

        /// The member a key is on leaving sends it to the member that scores next: the others
        /// keep every key they had.
        #[test]
        fn a_leaving_member_moves_only_its_keys(
            caps in prop::collection::vec(0.5f64..100.0, 2..12),
            keys in prop::collection::vec(any::<u64>(), 1..50),
            leaving: usize,
        ) {
            let m = members(&caps);
            let leaving = leaving % m.len();
            let mut without = m.clone();
            without[leaving].eligible = false;
            for k in keys {
                let before = pick(&m, k).unwrap();
                let after = pick(&without, k).unwrap();
                if before != leaving {
                    prop_assert_eq!(before, after);
                } else {
                    prop_assert_ne!(after, leaving);
                }
            }
        }
    }
}
