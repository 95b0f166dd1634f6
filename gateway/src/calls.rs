//! Ringing calls of one connection: the `call.offer`s it sent that are still unanswered,
//! each with a ring timer on the shard's timing wheel.
//!
//! A connection holds this structure boxed and only while it has ringing calls, so an
//! idle connection pays one null pointer for it.

use std::time::Instant;

use crate::wheel::{TimerId, Wheel};

/// Concurrent ringing calls tracked per connection; a further offer drops the oldest
/// from tracking (its timer is cancelled; it is not an error).
pub(crate) const MAX_RINGING: usize = 8;

/// One ringing call.
#[derive(Debug)]
pub(crate) struct Ringing {
    /// Identifies the call's wheel entry (call ids are client-chosen strings).
    pub token: u32,
    pub call_id: String,
    /// The callee, the offer's `to`.
    pub to: String,
    timer: TimerId,
}

/// The ringing calls of one connection, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    ringing: Vec<Ringing>,
    next_token: u32,
    /// Token of the offer whose `Logic.Handle` reply is awaited (a rejected offer is not ringing).
    pub inflight_offer: Option<u32>,
}

impl Calls {
    /// Starts ringing `call_id` until `at`; the wheel carries `value(token)`. Re-offering a
    /// ringing call id restarts its timer. Returns the token.
    pub fn arm<T>(
        &mut self,
        wheel: &mut Wheel<T>,
        at: Instant,
        call_id: &str,
        to: &str,
        value: impl FnOnce(u32) -> T,
    ) -> u32 {
        self.cancel(wheel, call_id);
        if self.ringing.len() >= MAX_RINGING {
            let oldest = self.ringing.remove(0);
            wheel.cancel(oldest.timer);
        }
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let timer = wheel.insert(at, value(token));
        self.ringing.push(Ringing { token, call_id: call_id.to_string(), to: to.to_string(), timer });
        token
    }

    /// Stops ringing `call_id`; true if it was ringing.
    pub fn cancel<T>(&mut self, wheel: &mut Wheel<T>, call_id: &str) -> bool {
        match self.ringing.iter().position(|r| r.call_id == call_id) {
            Some(i) => {
                let r = self.ringing.remove(i);
                wheel.cancel(r.timer);
                true
            }
            None => false,
        }
    }

    /// Stops ringing the call of `token`; true if it was ringing.
    pub fn cancel_token<T>(&mut self, wheel: &mut Wheel<T>, token: u32) -> bool {
        match self.ringing.iter().position(|r| r.token == token) {
            Some(i) => {
                let r = self.ringing.remove(i);
                wheel.cancel(r.timer);
                true
            }
            None => false,
        }
    }

    /// The ring timer of `token` fired (the wheel already dropped it): the call leaves
    /// tracking and is returned, if it was still tracked.
    pub fn expired(&mut self, token: u32) -> Option<Ringing> {
        let i = self.ringing.iter().position(|r| r.token == token)?;
        if self.inflight_offer == Some(token) {
            self.inflight_offer = None;
        }
        Some(self.ringing.remove(i))
    }

    /// Cancels every ring timer; returns the calls that were ringing.
    pub fn cancel_all<T>(&mut self, wheel: &mut Wheel<T>) -> Vec<Ringing> {
        let ringing: Vec<Ringing> = self.ringing.drain(..).collect();
        for r in &ringing {
            wheel.cancel(r.timer);
        }
        self.inflight_offer = None;
        ringing
    }

    /// True when no call is ringing and no offer reply is awaited.
    pub fn is_idle(&self) -> bool {
        self.ringing.is_empty() && self.inflight_offer.is_none()
    }

    /// Number of ringing calls.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ringing.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn arm_cancel_and_expire() {
        let start = Instant::now();
        let mut w: Wheel<u32> = Wheel::new(TICK, 64, start);
        let mut c = Calls::default();
        let a = c.arm(&mut w, start + TICK * 3, "c1", "bob", |t| t);
        let b = c.arm(&mut w, start + TICK * 3, "c2", "carol", |t| t);
        assert_ne!(a, b);
        assert_eq!(w.len(), 2);
        assert!(c.cancel(&mut w, "c1"));
        assert!(!c.cancel(&mut w, "c1"));
        assert_eq!(w.len(), 1);
        let mut out = Vec::new();
        w.advance(start + TICK * 3, &mut out);
        assert_eq!(out, vec![b]);
        let r = c.expired(b).unwrap();
        assert_eq!((r.call_id.as_str(), r.to.as_str()), ("c2", "carol"));
        assert!(c.expired(b).is_none());
        assert!(c.is_idle());
    }

    #[test]
    fn reoffer_restarts_and_oldest_is_dropped_when_full() {
        let start = Instant::now();
        let mut w: Wheel<u32> = Wheel::new(TICK, 64, start);
        let mut c = Calls::default();
        let first = c.arm(&mut w, start + TICK, "c0", "bob", |t| t);
        let again = c.arm(&mut w, start + TICK * 5, "c0", "bob", |t| t);
        assert_ne!(first, again);
        assert_eq!((c.len(), w.len()), (1, 1));
        for i in 1..MAX_RINGING + 3 {
            c.arm(&mut w, start + TICK * 5, &format!("c{i}"), "bob", |t| t);
        }
        assert_eq!(c.len(), MAX_RINGING);
        assert_eq!(w.len(), MAX_RINGING);
        // the oldest ones (c0, c1, c2) left tracking
        assert!(!c.cancel(&mut w, "c0"));
        assert!(!c.cancel(&mut w, "c2"));
        assert!(c.cancel(&mut w, "c3"));
        c.inflight_offer = Some(99);
        c.cancel_all(&mut w);
        assert!(w.is_empty());
        assert!(c.is_idle());
    }

    #[test]
    fn cancel_by_token() {
        let start = Instant::now();
        let mut w: Wheel<u32> = Wheel::new(TICK, 64, start);
        let mut c = Calls::default();
        let t = c.arm(&mut w, start + TICK, "c1", "bob", |t| t);
        c.inflight_offer = Some(t);
        assert!(!c.is_idle());
        assert!(c.cancel_token(&mut w, t));
        assert!(!c.cancel_token(&mut w, t));
        c.inflight_offer = None;
        assert!(c.is_idle());
        assert!(w.is_empty());
    }
}
