//! Connection ids: a u64 packing shard index, slab key and a per-shard generation.
//!
//! Layout (high to low bits): 10 bits shard, 24 bits slab key, 30 bits generation.
//! The generation changes every time a shard accepts a connection, so an id whose
//! slab slot was reused by a newer connection no longer matches.

const SHARD_BITS: u32 = 10;
const KEY_BITS: u32 = 24;
const GEN_BITS: u32 = 30;

/// Most shards an id can address.
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// Most connections (slab keys) one shard can address.
pub const MAX_KEYS: usize = 1 << KEY_BITS;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const KEY_MASK: u64 = (1 << KEY_BITS) - 1;

/// Decoded form of a connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub shard: usize,
    pub key: usize,
    pub gen: u32,
}

impl ConnId {
    /// Packs the parts; `shard` and `key` must be below [`MAX_SHARDS`] / [`MAX_KEYS`]
    /// (higher bits are masked off), `gen` is truncated to 30 bits.
    pub fn encode(self) -> u64 {
        ((self.shard as u64 & ((1 << SHARD_BITS) - 1)) << (KEY_BITS + GEN_BITS))
            | ((self.key as u64 & KEY_MASK) << GEN_BITS)
            | (self.gen as u64 & GEN_MASK)
    }

    /// Unpacks any u64 (every value decodes; validity is checked by the shard).
    pub fn decode(id: u64) -> ConnId {
        ConnId {
            shard: (id >> (KEY_BITS + GEN_BITS)) as usize,
            key: ((id >> GEN_BITS) & KEY_MASK) as usize,
            gen: (id & GEN_MASK) as u32,
        }
    }
}

/// Per-shard generation counter (wraps within 30 bits).
#[derive(Debug, Default)]
pub struct GenCounter(u32);

impl GenCounter {
    /// A counter starting at a random generation, so the ids of a restarted gateway differ from
    /// those of its previous boot (a stale route naming an old id finds no connection).
    pub fn new_boot() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32));
        // splitmix64 finaliser: spread the clock over the 30 bits
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        GenCounter(((z ^ (z >> 31)) & GEN_MASK) as u32)
    }

    /// Returns the next generation.
    pub fn bump(&mut self) -> u32 {
        self.0 = (self.0.wrapping_add(1)) & GEN_MASK as u32;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for &(shard, key, gen) in &[
            (0usize, 0usize, 0u32),
            (1, 2, 3),
            (MAX_SHARDS - 1, MAX_KEYS - 1, (GEN_MASK) as u32),
            (17, 99_999, 123_456_789),
        ] {
            let id = ConnId { shard, key, gen };
            assert_eq!(ConnId::decode(id.encode()), id);
        }
    }

    #[test]
    fn distinct_generations_give_distinct_ids() {
        let mut g = GenCounter::default();
        let a = ConnId { shard: 3, key: 5, gen: g.bump() }.encode();
        let b = ConnId { shard: 3, key: 5, gen: g.bump() }.encode();
        assert_ne!(a, b);
        assert_eq!(ConnId::decode(a).key, ConnId::decode(b).key);
    }

    #[test]
    fn generation_wraps() {
        let mut g = GenCounter(GEN_MASK as u32);
        assert_eq!(g.bump(), 0);
        assert_eq!(g.bump(), 1);
    }

    #[test]
    fn any_u64_decodes() {
        let d = ConnId::decode(u64::MAX);
        assert_eq!(d.shard, MAX_SHARDS - 1);
        assert_eq!(d.key, MAX_KEYS - 1);
    }
}
