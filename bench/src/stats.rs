//! Latency percentiles: over raw samples (sorted once at the end of a run), or from a
//! log-linear histogram ([`Hist`]) with bounded memory that worker processes can merge.

use serde::{Deserialize, Serialize};

/// Percentiles of a latency sample set, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Computes percentiles of `samples` (nanoseconds); sorts them in place.
pub fn percentiles(samples: &mut [u64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let at = |q: f64| {
        let idx = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        ms(samples[idx])
    };
    let sum: u128 = samples.iter().map(|&s| s as u128).sum();
    Percentiles {
        samples: samples.len(),
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: ms(samples[samples.len() - 1]),
        mean_ms: sum as f64 / samples.len() as f64 / 1e6,
    }
}

/// Sub-buckets per power of two: values are kept to within 1/128 (0.8 %).
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;

/// A log-linear histogram of nanosecond values (HDR-style): exact below 128 ns, then 128
/// buckets per power of two. Fixed size, O(1) record, mergeable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hist {
    #[serde(with = "sparse")]
    counts: Vec<u64>,
    pub count: u64,
    /// Sum of the values in ns (saturating; 1.8e19 ns is 584 years).
    pub sum: u64,
    pub max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Self { counts: vec![0; (64 - SUB_BITS as usize + 1) * SUB], count: 0, sum: 0, max: 0 }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let mantissa = (v >> shift) as usize; // in [SUB, 2 SUB)
    ((shift as usize + 1) << SUB_BITS) + (mantissa - SUB)
}

/// The middle of bucket `i`'s value range.
fn bucket_value(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i >> SUB_BITS) - 1;
    let mantissa = (i & (SUB - 1)) + SUB;
    ((mantissa as u64) << shift) + ((1u64 << shift) >> 1)
}

impl Hist {
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), in ns (bucket middle, capped at the maximum seen).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i).min(self.max);
            }
        }
        self.max
    }

    pub fn percentiles(&self) -> Percentiles {
        let ms = |ns: u64| ns as f64 / 1e6;
        Percentiles {
            samples: self.count as usize,
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max),
            mean_ms: if self.count == 0 { 0.0 } else { self.sum as f64 / self.count as f64 / 1e6 },
        }
    }
}

/// Serialises the bucket counts as `[[index, count], ...]` for the non-empty buckets.
mod sparse {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(counts: &[u64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (i as u32, c)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let pairs: Vec<(u32, u64)> = Vec::deserialize(d)?;
        let mut counts = super::Hist::default().counts;
        for (i, c) in pairs {
            let slot = counts.get_mut(i as usize).ok_or_else(|| serde::de::Error::custom("bucket out of range"))?;
            *slot += c;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_matches_exact_percentiles_within_one_percent() {
        let mut h = Hist::default();
        let mut raw = Vec::new();
        let mut x = 12345u64;
        for _ in 0..100_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = 1_000 + (x >> 40) % 50_000_000;
            h.record(v);
            raw.push(v);
        }
        let exact = percentiles(&mut raw);
        let approx = h.percentiles();
        for (a, e) in [(approx.p50_ms, exact.p50_ms), (approx.p99_ms, exact.p99_ms), (approx.p999_ms, exact.p999_ms)] {
            assert!((a - e).abs() / e < 0.01, "{a} vs {e}");
        }
        assert_eq!(approx.max_ms, exact.max_ms);
        assert_eq!(approx.samples, 100_000);
    }

    #[test]
    fn hist_buckets_are_monotonic_and_cover_u64() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last);
            last = b;
            assert!(b < Hist::default().counts.len());
        }
        for i in 0..SUB * 4 {
            assert_eq!(bucket(bucket_value(i)), i);
        }
    }

    #[test]
    fn hist_serde_and_merge() {
        let mut a = Hist::default();
        let mut b = Hist::default();
        for v in [5u64, 500, 5_000_000] {
            a.record(v);
            b.record(v * 2);
        }
        let json = serde_json::to_string(&b).unwrap();
        let b2: Hist = serde_json::from_str(&json).unwrap();
        a.merge(&b2);
        assert_eq!(a.count, 6);
        assert_eq!(a.max, 10_000_000);
        assert_eq!(a.quantile(0.0001), 5);
    }

    #[test]
    fn percentiles_of_one_to_thousand() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        let p = percentiles(&mut v);
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p90_ms, 900.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.p999_ms, 999.0);
        assert_eq!(p.max_ms, 1000.0);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(percentiles(&mut []).samples, 0);
    }
}
