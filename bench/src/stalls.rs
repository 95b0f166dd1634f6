//! When in a run the slow deliveries happened: deliveries counted per 100 ms of send time, with
//! how many took longer than a threshold and the slowest, so a report tells a p99 set by a few
//! stalls from one set by a slow path throughout, and a stall can be matched to server-side
//! traces by its `CLOCK_MONOTONIC` time (the clock `perf` stamps events with by default).

use std::time::Instant;

use serde::Serialize;

/// Width of one window.
const WINDOW_NS: u64 = 100_000_000;
/// How many of the slowest windows a report lists.
const LISTED: usize = 8;

/// Per-window counts over the measured span.
#[derive(Debug, Default)]
pub struct Stalls {
    /// `CLOCK_MONOTONIC` seconds at the span's start.
    origin_monotonic_s: f64,
    /// Deliveries slower than this count as slow.
    slow_ns: u64,
    windows: Vec<Window>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    deliveries: u32,
    slow: u32,
    max_ns: u64,
}

/// One listed window in a report.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SlowWindow {
    /// Start of the window, ms after the measured span began (by send time).
    pub at_ms: u64,
    /// The same instant on `CLOCK_MONOTONIC`, in seconds.
    pub monotonic_s: f64,
    pub deliveries: u32,
    /// Deliveries slower than the report's `slow_ms`.
    pub slow: u32,
    pub max_ms: f64,
}

/// What a report says about the span's windows.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct StallSummary {
    pub slow_ms: f64,
    /// Windows with at least one slow delivery, of all windows.
    pub windows_with_slow: usize,
    pub windows: usize,
    /// The windows with the most slow deliveries (at most eight), in time order.
    pub slowest_windows: Vec<SlowWindow>,
}

impl Stalls {
    /// A span that starts at `from` (ahead or past).
    pub fn new(from: Instant, slow_ns: u64) -> Self {
        let now = Instant::now();
        let ahead =
            from.saturating_duration_since(now).as_secs_f64() - now.saturating_duration_since(from).as_secs_f64();
        Self { origin_monotonic_s: monotonic_s() + ahead, slow_ns, windows: Vec::new() }
    }

    /// A delivery of a message sent `sent_ns` after the span began that took `latency_ns`.
    pub fn record(&mut self, sent_ns: u64, latency_ns: u64) {
        let i = (sent_ns / WINDOW_NS) as usize;
        if i >= self.windows.len() {
            self.windows.resize(i + 1, Window::default());
        }
        let w = &mut self.windows[i];
        w.deliveries += 1;
        w.slow += u32::from(latency_ns > self.slow_ns);
        w.max_ns = w.max_ns.max(latency_ns);
    }

    pub fn summary(&self) -> StallSummary {
        let mut slowest: Vec<usize> = (0..self.windows.len()).filter(|&i| self.windows[i].slow > 0).collect();
        let windows_with_slow = slowest.len();
        slowest.sort_by_key(|&i| std::cmp::Reverse((self.windows[i].slow, self.windows[i].max_ns)));
        slowest.truncate(LISTED);
        slowest.sort_unstable();
        StallSummary {
            slow_ms: self.slow_ns as f64 / 1e6,
            windows_with_slow,
            windows: self.windows.len(),
            slowest_windows: slowest
                .into_iter()
                .map(|i| {
                    let w = self.windows[i];
                    let at_ns = i as u64 * WINDOW_NS;
                    SlowWindow {
                        at_ms: at_ns / 1_000_000,
                        monotonic_s: self.origin_monotonic_s + at_ns as f64 / 1e9,
                        deliveries: w.deliveries,
                        slow: w.slow,
                        max_ms: w.max_ns as f64 / 1e6,
                    }
                })
                .collect(),
        }
    }
}

/// `CLOCK_MONOTONIC` now, in seconds.
fn monotonic_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_windows_with_the_most_slow_deliveries_in_time_order() {
        let mut s = Stalls::new(Instant::now(), 10_000_000);
        for w in 0..20u64 {
            // Window w: 10 deliveries, w of them slow (over 10 ms) when w is 3, 7 or 15.
            for k in 0..10u64 {
                let slow = [3, 7, 15].contains(&w) && k < w;
                s.record(w * WINDOW_NS + k, if slow { 20_000_000 + k } else { 1_000_000 });
            }
        }
        let sum = s.summary();
        assert_eq!((sum.windows, sum.windows_with_slow), (20, 3));
        let at: Vec<u64> = sum.slowest_windows.iter().map(|w| w.at_ms).collect();
        assert_eq!(at, [300, 700, 1500]);
        assert_eq!(sum.slowest_windows[1].slow, 7);
        assert_eq!(sum.slowest_windows[2].slow, 10);
        assert!((sum.slowest_windows[1].max_ms - 20.000006).abs() < 1e-9);
        assert!((sum.slowest_windows[2].monotonic_s - sum.slowest_windows[0].monotonic_s - 1.2).abs() < 1e-6);
    }

    #[test]
    fn keeps_at_most_eight_windows() {
        let mut s = Stalls::new(Instant::now(), 1);
        for w in 0..30u64 {
            for _ in 0..=w {
                s.record(w * WINDOW_NS, 2);
            }
        }
        let sum = s.summary();
        assert_eq!(sum.windows_with_slow, 30);
        let at: Vec<u64> = sum.slowest_windows.iter().map(|w| w.at_ms).collect();
        assert_eq!(at, [2200, 2300, 2400, 2500, 2600, 2700, 2800, 2900]);
    }
}
