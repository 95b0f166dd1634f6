//! Hashed timing wheel: O(1) insert, cancel and per-slot tick, one per shard.
//!
//! Entries live in a slab and are chained into per-slot doubly linked lists.
//! A deadline further away than one revolution stays in its slot and is
//! skipped until the wheel's tick counter reaches it.

use std::time::{Duration, Instant};

use slab::Slab;

/// Handle to a scheduled timer; stale handles (fired or cancelled) are harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    key: u32,
    gen: u32,
}

/// "No entry" in the intrusive lists (indices are u32 to keep entries small).
const NIL: u32 = u32::MAX;

struct Entry<T> {
    tick: u64,
    gen: u32,
    prev: u32,
    next: u32,
    value: T,
}

/// A hashed timing wheel carrying values of type `T`.
pub struct Wheel<T> {
    start: Instant,
    tick: Duration,
    /// Last tick already processed.
    current: u64,
    heads: Vec<u32>,
    entries: Slab<Entry<T>>,
    next_gen: u32,
}

impl<T> Wheel<T> {
    /// A wheel with `slots` slots of `tick` each, whose tick 0 is `start`.
    pub fn new(tick: Duration, slots: usize, start: Instant) -> Self {
        let tick = if tick.is_zero() { Duration::from_millis(1) } else { tick };
        Wheel { start, tick, current: 0, heads: vec![NIL; slots.max(1)], entries: Slab::new(), next_gen: 0 }
    }

    /// Tick granularity.
    pub fn tick_duration(&self) -> Duration {
        self.tick
    }

    /// Number of scheduled timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no timer is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.start);
        (d.as_nanos() / self.tick.as_nanos()) as u64
    }

    /// Schedules `value` to fire at `at` (rounded up to the next tick, never in the past).
    pub fn insert(&mut self, at: Instant, value: T) -> TimerId {
        let d = at.saturating_duration_since(self.start);
        let t = d.as_nanos().div_ceil(self.tick.as_nanos()) as u64;
        let tick = t.max(self.current + 1);
        let slot = (tick % self.heads.len() as u64) as usize;
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let head = self.heads[slot];
        let key = self.entries.insert(Entry { tick, gen, prev: NIL, next: head, value });
        assert!(key < NIL as usize, "timer wheel full");
        let key = key as u32;
        if head != NIL {
            self.entries[head as usize].prev = key;
        }
        self.heads[slot] = key;
        TimerId { key, gen }
    }

    /// Cancels a timer; returns its value if it was still scheduled.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        match self.entries.get(id.key as usize) {
            Some(e) if e.gen == id.gen => Some(self.unlink(id.key)),
            _ => None,
        }
    }

    fn unlink(&mut self, key: u32) -> T {
        let e = self.entries.remove(key as usize);
        if e.prev == NIL {
            let slot = (e.tick % self.heads.len() as u64) as usize;
            self.heads[slot] = e.next;
        } else {
            self.entries[e.prev as usize].next = e.next;
        }
        if e.next != NIL {
            self.entries[e.next as usize].prev = e.prev;
        }
        e.value
    }

    /// Advances to `now`, appending every expired value to `out`.
    pub fn advance(&mut self, now: Instant, out: &mut Vec<T>) {
        let target = self.tick_of(now);
        while self.current < target {
            self.current += 1;
            let slot = (self.current % self.heads.len() as u64) as usize;
            let mut cur = self.heads[slot];
            while cur != NIL {
                let k = cur;
                let e = &self.entries[k as usize];
                cur = e.next;
                if e.tick <= self.current {
                    out.push(self.unlink(k));
                }
            }
            if self.entries.is_empty() {
                // Nothing scheduled: jump straight to the target.
                self.current = target;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn fired_at(w: &mut Wheel<u32>, start: Instant, max_ticks: u64) -> Vec<(u32, u64)> {
        let mut res = Vec::new();
        let mut out = Vec::new();
        for t in 1..=max_ticks {
            w.advance(start + TICK * t as u32, &mut out);
            for v in out.drain(..) {
                res.push((v, t));
            }
        }
        res
    }

    #[test]
    fn expires_within_one_tick_of_deadline() {
        let start = Instant::now();
        let mut w = Wheel::new(TICK, 16, start);
        w.insert(start + Duration::from_millis(250), 1);
        w.insert(start + Duration::from_millis(300), 2);
        w.insert(start + Duration::from_millis(1), 3);
        let fired = fired_at(&mut w, start, 10);
        // 250 ms -> tick 3 (300 ms), 300 ms -> tick 3, 1 ms -> tick 1
        assert_eq!(fired.len(), 3);
        for (v, t) in fired {
            let deadline_ms = match v {
                1 => 250,
                2 => 300,
                _ => 1,
            };
            let fire_ms = t * 100;
            assert!(fire_ms >= deadline_ms, "{v} fired early");
            assert!(fire_ms < deadline_ms + 100, "{v} fired late");
        }
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadline_fires_on_next_tick() {
        let start = Instant::now();
        let mut w = Wheel::new(TICK, 8, start);
        let mut out = Vec::new();
        w.advance(start + TICK * 5, &mut out);
        w.insert(start, 7);
        w.advance(start + TICK * 5, &mut out);
        assert!(out.is_empty());
        w.advance(start + TICK * 6, &mut out);
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn cancel_removes_timer() {
        let start = Instant::now();
        let mut w = Wheel::new(TICK, 8, start);
        let a = w.insert(start + TICK * 2, 1);
        let b = w.insert(start + TICK * 2, 2);
        let c = w.insert(start + TICK * 2, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.cancel(b), None);
        let fired = fired_at(&mut w, start, 4);
        let mut vals: Vec<u32> = fired.iter().map(|f| f.0).collect();
        vals.sort();
        assert_eq!(vals, vec![1, 3]);
        // stale handles after firing do nothing, even when slab keys are reused
        let d = w.insert(start + TICK * 10, 4);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.cancel(c), None);
        assert_eq!(w.len(), 1);
        assert_eq!(w.cancel(d), Some(4));
    }

    #[test]
    fn wraps_beyond_one_revolution() {
        let start = Instant::now();
        let mut w = Wheel::new(TICK, 4, start);
        // slot 1 of a 4-slot wheel, but 2 and 3 revolutions later
        w.insert(start + TICK * 9, 9);
        w.insert(start + TICK * 13, 13);
        w.insert(start + TICK, 1);
        let fired = fired_at(&mut w, start, 20);
        assert_eq!(fired, vec![(1, 1), (9, 9), (13, 13)]);
    }

    #[test]
    fn large_jump_fires_everything_due() {
        let start = Instant::now();
        let mut w = Wheel::new(TICK, 4, start);
        for i in 1..=10u32 {
            w.insert(start + TICK * i, i);
        }
        let mut out = Vec::new();
        w.advance(start + TICK * 7, &mut out);
        out.sort();
        assert_eq!(out, (1..=7).collect::<Vec<_>>());
        out.clear();
        w.advance(start + TICK * 100, &mut out);
        out.sort();
        assert_eq!(out, vec![8, 9, 10]);
    }
}
