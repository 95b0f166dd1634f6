//! Latency percentiles over raw samples (sorted once at the end of a run).

use serde::Serialize;

/// Percentiles of a latency sample set, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
