//! Which sessions were confirmed valid lately, shared by the two ways a connection is served:
//! a request on a connection whose session was not confirmed within `session_check` re-reads
//! it first, and a push to such a connection queues a check that closes the connection when
//! its session was revoked or its user banned. So a revoked session stops being served within
//! about `session_check` even when the kick push that should have closed its sockets was lost,
//! whether the socket sends requests or only receives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_storage::ConnRef;
use tokio::sync::mpsc;

/// Most sessions remembered as confirmed (beyond it the memory starts over).
const MAX_SEEN: usize = 200_000;
/// Most pushed-to connections waiting for their session check (more are left to the next push).
const MAX_QUEUED_CHECKS: usize = 4096;

/// Sessions confirmed, and when.
type Seen = HashMap<String, Instant, foldhash::fast::RandomState>;

/// A connection whose session is to be read again: (user, connection).
pub type Check = (String, ConnRef);

/// Sessions confirmed lately, and the queue of checks the push path asks for.
pub struct SessionWatch {
    /// Keyed by session id with foldhash (looked up once per pushed connection).
    seen: Mutex<Seen>,
    ttl: Duration,
    checks: mpsc::Sender<Check>,
}

impl SessionWatch {
    /// A watch trusting a confirmation for `ttl`, and the receiving end of its check queue.
    pub fn new(ttl: Duration) -> (Self, mpsc::Receiver<Check>) {
        let (checks, rx) = mpsc::channel(MAX_QUEUED_CHECKS);
        (Self { seen: Mutex::new(Seen::default()), ttl, checks }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `session` was confirmed within the last `ttl`.
    pub fn fresh(&self, session: &str) -> bool {
        self.lock().get(session).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Records `session` as confirmed now.
    pub fn confirmed(&self, session: &str) {
        let mut seen = self.lock();
        if seen.len() >= MAX_SEEN {
            seen.clear();
        }
        seen.insert(session.to_owned(), Instant::now());
    }

    /// Forgets `session` (found revoked): its next request reads it again.
    pub fn forget(&self, session: &str) {
        self.lock().remove(session);
    }

    /// Called with the connections a push goes to: each one whose session was not confirmed
    /// lately is queued for a check (once per `ttl`: it counts as confirmed until the check
    /// says otherwise). A full queue drops the check; a later push asks again.
    pub fn pushed_to<'a>(&self, conns: impl Iterator<Item = (&'a str, &'a ConnRef)>) {
        let mut due = Vec::new();
        {
            // One clock read for the whole push (a group's may name a thousand connections).
            let now = Instant::now();
            let mut seen = self.lock();
            for (user, conn) in conns {
                let fresh = |at: &Instant| now.saturating_duration_since(*at) < self.ttl;
                if conn.session.is_empty() || seen.get(&conn.session).is_some_and(fresh) {
                    continue;
                }
                if seen.len() >= MAX_SEEN {
                    seen.clear();
                }
                seen.insert(conn.session.clone(), now);
                due.push((user.to_owned(), conn.clone()));
            }
        }
        for check in due {
            if self.checks.try_send(check).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(session: &str) -> ConnRef {
        ConnRef { gateway: "gw".into(), conn_id: 1, device: "d".into(), session: session.into() }
    }

    #[test]
    fn a_push_asks_once_per_ttl_for_sessions_not_confirmed() {
        let (watch, mut rx) = SessionWatch::new(Duration::from_secs(60));
        watch.confirmed("known");
        let (a, b) = (conn("known"), conn("stale"));
        watch.pushed_to([("ann", &a), ("bob", &b)].into_iter());
        watch.pushed_to([("bob", &b)].into_iter());
        assert_eq!(rx.try_recv().unwrap().1.session, "stale");
        assert!(rx.try_recv().is_err(), "one check per session and ttl");
        assert!(watch.fresh("stale"), "counts as confirmed while its check runs");
        watch.forget("stale");
        assert!(!watch.fresh("stale"));
    }
}
