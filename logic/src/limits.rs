//! Token-bucket rate limits, keyed by user or client IP. Each logic
//! instance keeps its own buckets (a user's requests reach one instance
//! per connection, so per-instance limits bound each connection's cost;
//! the effective cluster-wide limit is at most instances x rate). Also
//! [`Slots`]: a cap on expensive blocking work running at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ApiError;

/// At most `n` jobs of one kind on the blocking pool at once; others wait for a slot, up to
/// `wait`, then fail as `rate_limited`.
pub struct Slots {
    free: Arc<tokio::sync::Semaphore>,
    wait: Duration,
    counts: Arc<SlotCounts>,
}

/// What [`Slots`] saw, for `/metrics`.
#[derive(Debug, Default)]
pub struct SlotCounts {
    running: AtomicUsize,
    /// Most jobs that ever ran at once.
    pub peak: AtomicUsize,
    /// Jobs that found every slot taken and waited.
    pub waited: AtomicU64,
}

impl Slots {
    pub fn new(n: usize, wait: Duration) -> Self {
        Self { free: Arc::new(tokio::sync::Semaphore::new(n.max(1))), wait, counts: Arc::default() }
    }

    /// The counters (shared; they live as long as any holder).
    pub fn counts(&self) -> Arc<SlotCounts> {
        self.counts.clone()
    }

    /// Runs `f` on the blocking pool in a slot.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let slot = match self.free.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.counts.waited.fetch_add(1, Ordering::Relaxed);
                tokio::time::timeout(self.wait, self.free.clone().acquire_owned())
                    .await
                    .map_err(|_| ApiError::rate_limited(self.wait.as_millis() as u64))?
                    .map_err(|e| ApiError::new("internal", e.to_string()))?
            }
        };
        let counts = self.counts.clone();
        tokio::task::spawn_blocking(move || {
            let now = counts.running.fetch_add(1, Ordering::Relaxed) + 1;
            counts.peak.fetch_max(now, Ordering::Relaxed);
            let out = f();
            counts.running.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
            out
        })
        .await
        .map_err(|e| ApiError::new("internal", e.to_string()))
    }
}

/// Bucket parameters: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub const fn new(per_sec: f64, burst: f64) -> Self {
        Self { per_sec, burst }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

const SHARDS: usize = 16;
/// Above this many buckets in a shard, full (idle) buckets are dropped.
const SHARD_SOFT_CAP: usize = 4096;

/// A set of buckets sharing one [`Rate`].
pub struct Limiter {
    rate: Rate,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
    soft_cap: usize,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self::with_cap(rate, SHARD_SOFT_CAP)
    }

    fn with_cap(rate: Rate, soft_cap: usize) -> Self {
        Self { rate, shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), soft_cap }
    }

    /// Whether any request is limited at all (a rate of 0 disables the limiter).
    pub fn enabled(&self) -> bool {
        self.rate.per_sec > 0.0
    }

    /// Takes one token for `key`; `Err(ms)` says how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), u64> {
        if self.rate.per_sec <= 0.0 {
            return Ok(()); // limits disabled
        }
        let h = key.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut shard = self.shards[(h % SHARDS as u64) as usize].lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() > self.soft_cap {
            let (rate, burst) = (self.rate.per_sec, self.rate.burst);
            shard.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        // A known key costs no allocation.
        if !shard.contains_key(key) {
            shard.insert(key.to_owned(), Bucket { tokens: self.rate.burst, at: now });
        }
        let Some(b) = shard.get_mut(key) else { return Ok(()) };
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate.per_sec;
        b.tokens = (b.tokens + refill).min(self.rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / self.rate.per_sec) * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Twelve jobs through two slots: never more than two at once, all of them done; a job that
    /// cannot get a slot in time is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn slots_cap_the_jobs_running_at_once() {
        let slots = Arc::new(Slots::new(2, Duration::from_secs(30)));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..12)
            .map(|i| {
                let (slots, now, most) = (slots.clone(), now.clone(), most.clone());
                tokio::spawn(async move {
                    slots
                        .run(move || {
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(n, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            now.fetch_sub(1, Ordering::SeqCst);
                            i
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut done = Vec::new();
        for j in jobs {
            done.push(j.await.unwrap());
        }
        done.sort_unstable();
        assert_eq!(done, (0..12).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= 2, "never more than two at once");

        // one slot, held until released: the next job waits 50 ms and is refused
        let one = Arc::new(Slots::new(1, Duration::from_millis(50)));
        let (started, running) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let busy = {
            let one = one.clone();
            tokio::spawn(async move {
                one.run(move || {
                    started.send(()).unwrap();
                    released.recv().unwrap();
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || running.recv().unwrap()).await.unwrap();
        let refused = one.run(|| ()).await.unwrap_err();
        assert_eq!(refused.code, "rate_limited");
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        one.run(|| ()).await.unwrap();
    }

    #[test]
    fn burst_then_refill() {
        let l = Limiter::new(Rate::new(10.0, 3.0));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at("u", t0).is_ok());
        }
        let wait = l.check_at("u", t0).unwrap_err();
        assert!((90..=100).contains(&wait), "{wait}");
        assert!(l.check_at("other", t0).is_ok(), "keys are independent");
        assert!(l.check_at("u", t0 + Duration::from_millis(100)).is_ok(), "one token after 100 ms");
        assert!(l.check_at("u", t0 + Duration::from_millis(100)).is_err());
        for _ in 0..3 {
            assert!(l.check_at("u", t0 + Duration::from_secs(10)).is_ok(), "refills only up to the burst");
        }
        assert!(l.check_at("u", t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn zero_rate_disables() {
        let l = Limiter::new(Rate::new(0.0, 0.0));
        for _ in 0..1000 {
            assert!(l.check("u").is_ok());
        }
    }

    #[test]
    fn idle_buckets_are_evicted() {
        let l = Limiter::with_cap(Rate::new(1000.0, 1.0), 8);
        let t0 = Instant::now();
        for i in 0..(SHARDS * 8 * 4) {
            let _ = l.check_at(&format!("k{i}"), t0);
        }
        let busy: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(busy > SHARDS * 8, "buckets still refilling are kept: {busy}");
        // once refilled, the next access to a shard over its cap prunes it
        let later = t0 + Duration::from_secs(5);
        for i in 0..(SHARDS * 8) {
            let _ = l.check_at(&format!("fresh{i}"), later);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= SHARDS * 8 * 2, "{total}");
    }
}
