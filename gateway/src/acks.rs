//! Acks the gateway answers itself. A client's `ack` for a conversation whose push the
//! connection still holds unacked (so the gateway has seen the connection receive that
//! conversation) is answered `ack.ok` at once, and only its highest seq per connection and
//! conversation is handed to logic, as one request without a reply per `ack_flush`. Logic
//! coalesces cursors in memory anyway (docs/protocol.md §11): this saves a logic round trip for
//! nearly every delivery, which is what an ack per read batch costs under fan-out. A later
//! request of the same connection goes to logic only after that connection's waiting acks (so
//! an ack-based `sync` right after an `ack` sees it).

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use switchboard_proto::internal::{ClientRequest, ConnEvent};

/// One connection's acks waiting for the next flush.
struct Waiting {
    conn: ConnEvent,
    ip: String,
    /// (conversation, highest acked seq); a handful per connection.
    convs: Vec<(String, u64)>,
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
        match w.convs.iter_mut().find(|(c, _)| c == conv) {
            Some((_, s)) => *s = (*s).max(seq),
            None => w.convs.push((conv.to_owned(), seq)),
        }
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
    }

    /// Whether the batch should go to logic now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|d| now >= d)
    }

    /// Empties the batch into one `ack` request per connection and conversation, in the
    /// canonical JSON form logic reads (no `rid`: nobody waits for the reply).
    pub fn take(&mut self) -> Vec<ClientRequest> {
        self.due = None;
        let mut out = Vec::new();
        for (_, w) in self.waiting.drain() {
            w.into_requests(&mut out);
        }
        out
    }

    /// Takes the waiting acks of one connection (its next request must reach logic after them).
    pub fn take_conn(&mut self, conn_id: u64) -> Vec<ClientRequest> {
        let mut out = Vec::new();
        if let Some(w) = self.waiting.remove(&conn_id) {
            w.into_requests(&mut out);
        }
        out
    }
}

impl Waiting {
    fn into_requests(self, out: &mut Vec<ClientRequest>) {
        for (conv, seq) in self.convs {
            let frame = serde_json::json!({"op": "ack", "conv": conv, "seq": seq}).to_string();
            out.push(ClientRequest {
                conn: Some(self.conn.clone()),
                frame: Bytes::from(frame),
                ip: self.ip.clone(),
                op: "ack".into(),
                rid: None,
            });
        }
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
        let mut reqs: Vec<(String, String)> = b
            .take()
            .into_iter()
            .map(|r| (r.conn.unwrap().user, String::from_utf8(r.frame.to_vec()).unwrap()))
            .collect();
        reqs.sort();
        assert_eq!(
            reqs,
            [
                ("ann".to_owned(), r#"{"conv":"d:ann:bob","op":"ack","seq":2}"#.to_owned()),
                ("ann".to_owned(), r#"{"conv":"g:x","op":"ack","seq":9}"#.to_owned()),
                ("bob".to_owned(), r#"{"conv":"g:x","op":"ack","seq":4}"#.to_owned()),
            ]
        );
        assert!(b.take().is_empty() && !b.is_due(t0 + Duration::from_secs(60)));
        b.add(3, who("cy"), "g:x", 1, t0);
        b.add(4, who("di"), "g:x", 1, t0);
        assert_eq!(b.take_conn(3).len(), 1);
        assert!(b.take_conn(3).is_empty(), "taken once");
        assert_eq!(b.take().len(), 1, "the other connection's ack stays for the flush");
    }
}
