//! Acks the gateway answers itself. A client's `ack` for a conversation whose push the
//! connection still holds unacked (so the gateway has seen the connection receive that
//! conversation) is answered `ack.ok` at once, and only its highest seq per connection and
//! conversation is handed to logic, as one request without a reply per `ack_flush`. Logic
//! coalesces cursors in memory anyway (docs/protocol.md §11): this saves a logic round trip for
//! nearly every delivery, which is what an ack per read batch costs under fan-out. A
//! connection's waiting acks ride its next request to logic as typed cursors
//! (`ClientRequest::acks`), applied before that request's op (so an ack-based `sync` right
//! after an `ack` sees it); those still waiting at the flush go as one request per connection
//! carrying only them. No JSON is written or parsed for them on either side.

use std::collections::HashMap;
use std::time::Instant;

use switchboard_proto::internal::{ClientRequest, ConnEvent, HeldAck};

/// One connection's acks waiting for the next flush.
struct Waiting {
    conn: ConnEvent,
    ip: String,
    /// The highest acked seq per conversation; a handful per connection.
    convs: Vec<HeldAck>,
}

/// The acks of one shard's connections not yet handed to logic.
#[derive(Default)]
pub(crate) struct AckBatch {
    waiting: HashMap<u64, Waiting>,
    /// When the oldest waiting ack is due at logic.
    due: Option<Instant>,
}

impl AckBatch {
    /// Records that connection `conn_id` acked `conv` up to `seq`; `who` names the connection
    /// (called only for its first ack of a batch). The batch is due at `due` at the latest.
    pub fn add(&mut self, conn_id: u64, who: impl FnOnce() -> (ConnEvent, String), conv: &str, seq: u64, due: Instant) {
        let w = self.waiting.entry(conn_id).or_insert_with(|| {
            let (conn, ip) = who();
            Waiting { conn, ip, convs: Vec::new() }
        });
        match w.convs.iter_mut().find(|a| a.conv == conv) {
            Some(a) => a.seq = a.seq.max(seq),
            None => w.convs.push(HeldAck { conv: conv.to_owned(), seq }),
        }
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
    }

    /// Whether the batch should go to logic now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|d| now >= d)
    }

    /// Empties the batch into one request per connection carrying only its acks (empty
    /// frame, no `rid`: nobody waits for the reply).
    pub fn take(&mut self) -> Vec<ClientRequest> {
        self.due = None;
        self.waiting.drain().map(|(_, w)| w.into_request()).collect()
    }

    /// Takes the waiting acks of one connection, for its next request to carry.
    pub fn take_conn(&mut self, conn_id: u64) -> Vec<HeldAck> {
        self.waiting.remove(&conn_id).map(|w| w.convs).unwrap_or_default()
    }

    /// The waiting acks of a connection that closed, as a request of their own.
    pub fn take_closed(&mut self, conn_id: u64) -> Option<ClientRequest> {
        self.waiting.remove(&conn_id).map(Waiting::into_request)
    }
}

impl Waiting {
    fn into_request(self) -> ClientRequest {
        ClientRequest { conn: Some(self.conn), ip: self.ip, op: "ack".into(), acks: self.convs, ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn who(user: &str) -> impl FnOnce() -> (ConnEvent, String) + '_ {
        move || (ConnEvent { user: user.into(), ..Default::default() }, "127.0.0.1".into())
    }

    #[test]
    fn keeps_the_highest_seq_per_connection_and_conversation() {
        let t0 = Instant::now();
        let mut b = AckBatch::default();
        assert!(!b.is_due(t0 + Duration::from_secs(60)), "an empty batch is never due");
        b.add(1, who("ann"), "g:x", 5, t0 + Duration::from_millis(50));
        b.add(1, || unreachable!("named once per batch"), "g:x", 3, t0 + Duration::from_millis(60));
        b.add(1, || unreachable!(), "g:x", 9, t0 + Duration::from_millis(70));
        b.add(1, || unreachable!(), "d:ann:bob", 2, t0 + Duration::from_millis(70));
        b.add(2, who("bob"), "g:x", 4, t0 + Duration::from_millis(90));
        assert!(!b.is_due(t0 + Duration::from_millis(49)));
        assert!(b.is_due(t0 + Duration::from_millis(50)), "due with its oldest ack");
        let mut reqs: Vec<(String, Vec<(String, u64)>)> = b
            .take()
            .into_iter()
            .map(|r| {
                assert!(r.frame.is_empty() && r.rid.is_none(), "acks only, nobody waits: {r:?}");
                (r.conn.unwrap().user, r.acks.into_iter().map(|a| (a.conv, a.seq)).collect())
            })
            .collect();
        reqs.sort();
        let held = |c: &str, s| (c.to_owned(), s);
        assert_eq!(
            reqs,
            [("ann".to_owned(), vec![held("g:x", 9), held("d:ann:bob", 2)]), ("bob".to_owned(), vec![held("g:x", 4)])]
        );
        assert!(b.take().is_empty() && !b.is_due(t0 + Duration::from_secs(60)));
        b.add(3, who("cy"), "g:x", 1, t0);
        b.add(4, who("di"), "g:x", 1, t0);
        assert_eq!(b.take_conn(3), [HeldAck { conv: "g:x".into(), seq: 1 }]);
        assert!(b.take_conn(3).is_empty(), "taken once");
        b.add(5, who("ed"), "g:y", 7, t0);
        let closed = b.take_closed(5).expect("held");
        assert_eq!((closed.conn.unwrap().user.as_str(), closed.acks.len()), ("ed", 1));
        assert!(b.take_closed(5).is_none());
        assert_eq!(b.take().len(), 1, "the other connection's ack stays for the flush");
    }
}
