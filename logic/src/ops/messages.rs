//! send / ack / sync / history: the message path.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_proto::internal::HeldAck;
use switchboard_storage::{Appended, FriendState, Message, NewMessage};

use super::groups::{require_role, valid_group_id};
use super::{fields, require_user, Caller, Fields};
use crate::error::ApiError;
use crate::push::MsgRef;
use crate::Logic;

/// The direct conversation id of two users: `d:<min>:<max>`.
pub fn direct_conv(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    // Written piece by piece: `format!` was a measurable share of a send in `perf`.
    let mut conv = String::with_capacity(3 + first.len() + second.len());
    for piece in ["d:", first, ":", second] {
        conv.push_str(piece);
    }
    conv
}

/// The users of a direct conversation id, if it is one and is canonical.
fn direct_members(conv: &str) -> Option<(&str, &str)> {
    let rest = conv.strip_prefix("d:")?;
    let (a, b) = rest.split_once(':')?;
    (a < b && !b.contains(':')).then_some((a, b))
}

/// Fails with `forbidden` unless `user` belongs to `conv`.
pub async fn require_member(logic: &Logic, conv: &str, user: &str) -> Result<(), ApiError> {
    let forbidden = || ApiError::forbidden(format!("not a member of `{conv}`"));
    if let Some(id) = conv.strip_prefix("g:") {
        if !valid_group_id(id) {
            return Err(forbidden());
        }
        return match logic.stores.groups.role(id, user).await? {
            Some(_) => Ok(()),
            None => Err(forbidden()),
        };
    }
    match direct_members(conv) {
        Some((a, b)) if a == user || b == user => Ok(()),
        _ => Err(forbidden()),
    }
}

/// Whether `user` and `other` are friends.
pub async fn are_friends(logic: &Logic, user: &str, other: &str) -> Result<bool, ApiError> {
    Ok(logic.stores.social.friend_state(user, other).await? == Some(FriendState::Friends))
}

/// In a direct conversation of `user`: the other member, unless that is a friend of `user`
/// (`None` for groups and for friends). Pushes that reach the other side of a direct
/// conversation (`typing`, read receipts) go to friends only.
pub async fn stranger_in(logic: &Logic, conv: &str, user: &str) -> Result<Option<String>, ApiError> {
    let Some((a, b)) = direct_members(conv) else { return Ok(None) };
    let other = if a == user { b } else { a };
    Ok((!are_friends(logic, user, other).await?).then(|| other.to_owned()))
}

/// The members of `conv`, or `forbidden` unless `user` is one of them.
pub async fn conv_members(logic: &Logic, conv: &str, user: &str) -> Result<Vec<String>, ApiError> {
    require_member(logic, conv, user).await?;
    match conv.strip_prefix("g:") {
        Some(id) => Ok(logic.stores.groups.members(id).await?.into_iter().map(|(u, _)| u).collect()),
        None => Ok(direct_members(conv).map(|(a, b)| vec![a.to_owned(), b.to_owned()]).unwrap_or_default()),
    }
}

/// Pushes `frame` (serialised once) to every member of `conv` but `skip` (a connection).
async fn to_members(logic: &Logic, members: &[String], frame: &Value, at: Option<MsgRef<'_>>, skip: (&str, u64)) {
    let bytes = Bytes::from(serde_json::to_vec(frame).expect("JSON values always serialize"));
    logic.pusher.to_users(members, bytes, at, Some(skip)).await;
}

/// The `msg` push, serialised straight from the stored message.
#[derive(Serialize)]
struct MsgPush<'a> {
    op: &'static str,
    msg: &'a Message,
}

/// The `msg` push around a message's stored encoding (the same bytes [`MsgPush`] writes, with
/// no second serialisation).
fn msg_push_around(json: &[u8]) -> Bytes {
    const HEAD: &[u8] = br#"{"op":"msg","msg":"#;
    let mut b = Vec::with_capacity(HEAD.len() + json.len() + 1);
    b.extend_from_slice(HEAD);
    b.extend_from_slice(json);
    b.push(b'}');
    Bytes::from(b)
}

/// Bytes of `v` as JSON, without keeping them.
pub(super) fn json_len<T: Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Keeps the longest prefix of `msgs` within `max_bytes` (at least one message). Returns
/// whether anything was cut.
pub(super) fn cut_to_bytes<T: Serialize>(msgs: &mut Vec<T>, max_bytes: usize) -> bool {
    let mut total = 0;
    for (i, m) in msgs.iter().enumerate() {
        total += json_len(m) + 1;
        if i > 0 && total > max_bytes {
            msgs.truncate(i);
            return true;
        }
    }
    false
}

#[derive(Deserialize)]
pub struct Send {
    to: Option<String>,
    group: Option<String>,
    cmid: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    body: Value,
    /// The mid of the message of the same conversation this one answers.
    reply_to: Option<String>,
    /// Members this message mentions.
    #[serde(default)]
    mentions: Vec<String>,
}

fn validate_body(kind: &str, body: &Value) -> Result<(), ApiError> {
    match kind {
        "text" => match body {
            Value::String(s) if !s.is_empty() => Ok(()),
            _ => Err(ApiError::bad_request("a text message needs a non-empty string body")),
        },
        "image" | "file" | "audio" | "video" => {
            let ok = body.get("url").and_then(Value::as_str).is_some_and(|u| !u.is_empty())
                && body.get("name").is_some_and(Value::is_string)
                && body.get("size").is_some_and(Value::is_u64)
                && body.get("mime").and_then(Value::as_str).is_some_and(|m| m.contains('/'));
            if ok {
                Ok(())
            } else {
                Err(ApiError::bad_request(format!("a {kind} body is {{url, name, size, mime}}")))
            }
        }
        "custom" if !body.is_null() => Ok(()),
        "custom" => Err(ApiError::bad_request("a custom message needs a body")),
        other => Err(ApiError::bad_request(format!("unknown message type `{other}`"))),
    }
}

pub async fn send(logic: &Logic, caller: &Caller, mut req: Send) -> Result<Sent, ApiError> {
    if req.cmid.is_empty() || req.cmid.chars().count() > 64 {
        return Err(ApiError::bad_request("cmid must be 1-64 chars"));
    }
    validate_body(&req.kind, &req.body)?;
    let (conv, members, index) = match (req.to.take(), req.group.take()) {
        (Some(to), None) => {
            if to == caller.user {
                return Err(ApiError::new("not_friends", "cannot message yourself"));
            }
            if logic.stores.social.friend_state(&caller.user, &to).await? != Some(FriendState::Friends) {
                require_user(logic, &to).await?;
                return Err(ApiError::new("not_friends", format!("`{to}` is not your friend")));
            }
            let members = vec![caller.user.clone(), to.clone()];
            // Direct chats are indexed for both users.
            (direct_conv(&caller.user, &to), members.clone(), members)
        }
        (None, Some(group)) => {
            require_role(logic, &group, &caller.user).await?;
            let members: Vec<String> = logic.stores.groups.members(&group).await?.into_iter().map(|(u, _)| u).collect();
            // One stored copy; members read it by seq (no per-member index).
            (format!("g:{group}"), members, Vec::new())
        }
        _ => return Err(ApiError::bad_request("give exactly one of `to` and `group`")),
    };
    crate::files::attach(logic, &caller.user, &conv, &req.kind, &req.body).await?;
    let (reply_to, mentions) =
        match super::refs::check(logic, caller, &conv, &members, req.reply_to, req.mentions).await {
            Ok(refs) => refs,
            Err(e) => return stored_retry(logic, &conv, &caller.user, &req.cmid).await?.ok_or(e),
        };
    let new = NewMessage {
        conv,
        from: caller.user.clone(),
        cmid: req.cmid,
        kind: req.kind,
        body: req.body,
        reply_to,
        mentions,
    };
    store_and_push(logic, caller, new, &index, &members).await
}

/// The `send.ok` of a message already stored under this cmid: a retry gets it even when its
/// references no longer pass their checks (the quoted message recalled, a mentioned member
/// gone since the first attempt).
async fn stored_retry(logic: &Logic, conv: &str, from: &str, cmid: &str) -> Result<Option<Sent>, ApiError> {
    let m = logic.stores.messages.find_cmid(conv, from, cmid).await?;
    Ok(m.map(Sent::of))
}

/// Where a message was stored: the fields of `send.ok` (and of the ops that store an event).
#[derive(Debug, PartialEq, Eq)]
pub struct Sent {
    conv: String,
    mid: String,
    seq: u64,
    ts: u64,
}

impl Sent {
    fn of(m: Message) -> Sent {
        Sent { conv: m.conv, mid: m.mid, seq: m.seq, ts: m.ts }
    }

    /// As fields, for the ops that answer with more.
    pub fn into_fields(self) -> Fields {
        fields(json!({"conv": self.conv, "mid": self.mid, "seq": self.seq, "ts": self.ts}))
    }

    /// Writes the fields into a reply's map, in the order [`Sent::into_fields`] has them.
    pub(super) fn serialize_entries<M: serde::ser::SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("conv", &self.conv)?;
        m.serialize_entry("mid", &self.mid)?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("ts", &self.ts)
    }
}

/// Appends a message and pushes it to the conversation's members (all of
/// them but the sending connection), in seq order per conversation.
/// `index` are the users to index the conversation for (direct chats);
/// `members` the push targets.
pub(super) async fn store_and_push(
    logic: &Logic,
    caller: &Caller,
    new: NewMessage,
    index: &[String],
    members: &[String],
) -> Result<Sent, ApiError> {
    let conv = new.conv.clone();
    // Recipients' connections are looked up before the conversation lock, which covers seq
    // allocation, append and enqueue only.
    let targets = logic.pusher.targets(members, Some((&caller.gateway, caller.conn_id))).await;
    let mut tail = logic.conv_lock(&conv).lock().await;
    let store = &logic.stores.messages;
    let appended = match store.place(new, index).await {
        Ok(placed) => {
            // The message's place is fixed (at once on the embedded store, after a round trip
            // to Redis in a cluster): wait for durability without the lock, alongside later
            // sends of the conversation. It becomes visible and its push leaves only after the
            // send before it in the lock's stripe has (`done` is dropped, which signals the next,
            // however this ends), so pushes leave in seq order.
            let mut placed = placed?;
            let (done, next) = tokio::sync::oneshot::channel::<()>();
            let prev = tail.replace(next);
            drop(tail);
            let started = std::time::Instant::now();
            let durable = placed.durable().await;
            logic.metrics.latency.append.observe(started.elapsed().as_secs_f64());
            if let Some(prev) = prev {
                let _ = prev.await;
            }
            let appended = match durable {
                Ok(()) => placed.finish().await,
                Err(e) => Err(e),
            }?;
            if !appended.duplicate {
                enqueue_msg(logic, targets, &appended).await;
            }
            drop(done);
            appended
        }
        Err(new) => append_locked(logic, tail, new, index, targets).await?,
    };
    let m = &appended.msg;
    let span = tracing::Span::current();
    span.record("conv", m.conv.as_str());
    span.record("seq", m.seq);
    if !appended.duplicate {
        crate::metrics::inc(&logic.metrics.sends);
        if !super::events::is_event(&m.kind) {
            logic.notifier.message(m, members);
        }
        // The sender's own read mark needs no order.
        logic.cursors.read(&caller.user, &m.conv, m.seq).await?;
    }
    Ok(Sent::of(appended.msg))
}

/// An append on a store without ordered steps: the conversation lock (`tail`) covers the whole
/// write and the push's hand-off.
async fn append_locked(
    logic: &Logic,
    tail: tokio::sync::MutexGuard<'_, crate::ConvTail>,
    new: NewMessage,
    index: &[String],
    targets: crate::push::Targets,
) -> Result<Appended, ApiError> {
    let started = std::time::Instant::now();
    let appended = logic.stores.messages.append(new, index).await;
    logic.metrics.latency.append.observe(started.elapsed().as_secs_f64());
    let appended = appended?;
    if !appended.duplicate {
        enqueue_msg(logic, targets, &appended).await;
    }
    drop(tail);
    Ok(appended)
}

/// Queues the `msg` push of a stored message for `targets` (serialised once).
async fn enqueue_msg(logic: &Logic, targets: crate::push::Targets, appended: &Appended) {
    let m = &appended.msg;
    let push = match &appended.json {
        Some(json) => msg_push_around(json),
        None => Bytes::from(serde_json::to_vec(&MsgPush { op: "msg", msg: m }).expect("messages serialize")),
    };
    logic.pusher.enqueue(targets, push, Some(MsgRef { conv: &m.conv, seq: m.seq })).await;
}

#[derive(Deserialize)]
pub struct Ack {
    conv: String,
    seq: u64,
}

pub async fn ack(logic: &Logic, caller: &Caller, req: Ack) -> Result<Fields, ApiError> {
    held_ack(logic, caller, HeldAck { conv: req.conv, seq: req.seq }).await?;
    Ok(Fields::new())
}

/// An `ack` the gateway answered itself, carried by a later request (`ClientRequest::acks`).
pub async fn held_ack(logic: &Logic, caller: &Caller, ack: HeldAck) -> Result<(), ApiError> {
    require_member(logic, &ack.conv, &caller.user).await?;
    logic.cursors.ack(&caller.user, &caller.device, &ack.conv, ack.seq).await?;
    logic.notifier.seen(&caller.user, &ack.conv, ack.seq);
    Ok(())
}

#[derive(Deserialize)]
pub struct Sync {
    #[serde(default)]
    since: HashMap<String, u64>,
    limit: Option<usize>,
}

/// The fields of `sync.ok`, written straight from the messages (no JSON value built per
/// message).
#[derive(Debug)]
pub struct Synced {
    more: bool,
    msgs: Vec<Message>,
}

impl Synced {
    /// Writes the fields into a reply's map.
    pub(super) fn serialize_entries<M: serde::ser::SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("more", &self.more)?;
        m.serialize_entry("msgs", &self.msgs)
    }
}

pub async fn sync(logic: &Logic, caller: &Caller, req: Sync) -> Result<Synced, ApiError> {
    let limit = req.limit.unwrap_or(logic.config.sync_max).clamp(1, logic.config.sync_max);
    let budget = logic.config.reply_max_bytes;
    let store = &logic.stores.messages;
    let acked = logic.cursors.acks(&caller.user, &caller.device).await?;
    let mut msgs: Vec<Message> = Vec::new();
    let (mut count, mut bytes, mut more) = (0usize, 0usize, false);
    for (conv, last) in user_convs(logic, &caller.user).await? {
        // The client's own view wins; for conversations it did not name,
        // resume after what this device acked.
        let from = req.since.get(&conv).or_else(|| acked.get(&conv)).copied().unwrap_or(0);
        if last <= from {
            continue;
        }
        if count >= limit || bytes >= budget {
            more = true;
            continue;
        }
        // One global budget (count and bytes) for the reply: each conversation contributes a
        // gap-free run from `from`, and only what fits is read.
        let want = limit - count;
        let mut run = store.range(&conv, from, want).await?;
        // A full run that stops short of the conversation's last seq leaves more to read.
        let full = run.len() == want && run.last().is_some_and(|m| m.seq < last);
        if !run.is_empty() {
            let room = if count == 0 { budget } else { budget.saturating_sub(bytes) };
            let cut = cut_to_bytes(&mut run, room.max(1));
            if count > 0 && run.len() == 1 && json_len(&run[0]) > room {
                // Only a first message may exceed the budget.
                run.clear();
                more = true;
            }
            more |= cut;
        }
        more |= full;
        count += run.len();
        bytes += run.iter().map(|m| json_len(m) + 1).sum::<usize>();
        msgs.extend(run);
    }
    // ts never decreases within a conversation and the sort is stable, so each
    // conversation's run stays in seq order.
    msgs.sort_by_key(|m| m.ts);
    Ok(Synced { more, msgs })
}

#[derive(Deserialize)]
pub struct History {
    conv: String,
    before_seq: Option<u64>,
    limit: Option<usize>,
    /// The folded view: messages with the events applied, no events ([`super::events::fold`]).
    #[serde(default)]
    fold: bool,
}

pub async fn history(logic: &Logic, caller: &Caller, req: History) -> Result<Fields, ApiError> {
    require_member(logic, &req.conv, &caller.user).await?;
    let limit = req.limit.unwrap_or(50).clamp(1, 200);
    let mut msgs = logic.stores.messages.history(&req.conv, req.before_seq, limit).await?;
    // Newest first: the cut keeps the newest that fit; the client pages on with `before_seq`.
    cut_to_bytes(&mut msgs, logic.config.reply_max_bytes);
    if !req.fold {
        return Ok(fields(json!({"msgs": msgs})));
    }
    // The page's oldest seq, to page on from (the folded page leaves the events out).
    let next_before = msgs.iter().map(|m| m.seq).min();
    let (mut msgs, folded_through) = super::events::fold(logic, &caller.user, &req.conv, msgs).await?;
    // Edits change sizes: the folded page is cut again (the newest that fit, at least one).
    cut_to_bytes(&mut msgs, logic.config.reply_max_bytes);
    Ok(fields(json!({"msgs": msgs, "next_before": next_before, "folded_through": folded_through})))
}

/// Every conversation of `user` with its last seq: direct chats from the
/// message index, groups from membership (their last seqs read in one batch).
pub(super) async fn user_convs(logic: &Logic, user: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let mut convs = logic.stores.messages.user_convs(user).await?;
    let groups: Vec<String> =
        logic.stores.groups.user_group_ids(user).await?.into_iter().map(|id| format!("g:{id}")).collect();
    let lasts = logic.stores.messages.last_seqs(&groups).await?;
    convs.extend(groups.into_iter().zip(lasts));
    Ok(convs)
}

#[derive(Deserialize)]
pub struct Read {
    conv: String,
    seq: u64,
}

/// Marks `conv` read up to `seq` for the user and tells the other members.
pub async fn read(logic: &Logic, caller: &Caller, req: Read) -> Result<Fields, ApiError> {
    let members = conv_members(logic, &req.conv, &caller.user).await?;
    let last = logic.stores.messages.last_seq(&req.conv).await?;
    let seq = logic.cursors.read(&caller.user, &req.conv, req.seq.min(last)).await?;
    logic.notifier.seen(&caller.user, &req.conv, seq);
    // The read mark is the caller's own; the receipt goes to a direct conversation's other side
    // only while they are friends.
    if stranger_in(logic, &req.conv, &caller.user).await?.is_some() {
        return Ok(Fields::new());
    }
    let push = json!({"op": "read", "conv": req.conv, "user": caller.user, "seq": seq});
    let others: Vec<String> = members.into_iter().filter(|m| *m != caller.user).collect();
    to_members(logic, &others, &push, None, (&caller.gateway, caller.conn_id)).await;
    Ok(Fields::new())
}

#[derive(Deserialize)]
pub struct Recall {
    conv: String,
    mid: String,
}

pub async fn recall(logic: &Logic, caller: &Caller, req: Recall) -> Result<Fields, ApiError> {
    let members = conv_members(logic, &req.conv, &caller.user).await?;
    let store = &logic.stores.messages;
    let Some(m) = store.find_mid(&req.conv, &req.mid).await? else {
        return Err(ApiError::bad_request(format!("no message `{}` in `{}`", req.mid, req.conv)));
    };
    if super::events::is_event(&m.kind) {
        return Err(ApiError::bad_request(format!("`{}` is an event, not a message", req.mid)));
    }
    if m.from != caller.user {
        return Err(ApiError::forbidden("only the sender may recall a message"));
    }
    if m.kind != "recalled" {
        let window = logic.config.recall_window.as_millis() as u64;
        if switchboard_storage::now_ms().saturating_sub(m.ts) > window {
            return Err(ApiError::new("too_late", format!("messages can be recalled within {} s", window / 1000)));
        }
        let _order = logic.conv_lock(&req.conv).lock().await;
        store.recall(&req.conv, m.seq).await?;
        logic.notifier.recalled(&req.conv, &req.mid);
    }
    let push = json!({"op": "recall", "conv": req.conv, "mid": req.mid, "by": caller.user});
    to_members(logic, &members, &push, None, (&caller.gateway, caller.conn_id)).await;
    Ok(Fields::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `send.ok` written from [`Sent`] is byte for byte the one written from its fields.
    #[test]
    fn a_typed_send_ok_is_the_one_written_from_fields() {
        let sent = || Sent { conv: "d:a:\"b\"\u{e9}".into(), mid: "m\n1".into(), seq: 7, ts: 1_700_000_000_123 };
        for rid in [Some(3), None] {
            let typed = serde_json::to_vec(&super::super::OkReply {
                op: "send",
                rid,
                reply: &super::super::Reply::Sent(sent()),
            })
            .unwrap();
            let from_fields = serde_json::to_vec(&super::super::OkReply {
                op: "send",
                rid,
                reply: &super::super::Reply::Fields(sent().into_fields()),
            })
            .unwrap();
            assert_eq!(String::from_utf8(typed).unwrap(), String::from_utf8(from_fields).unwrap());
        }
    }

    /// The push built around a stored encoding is byte for byte the one serialised from the
    /// message, for text, object bodies, quotes, mentions and characters JSON escapes.
    #[test]
    fn a_push_around_the_stored_encoding_is_the_serialised_push() {
        let quote = switchboard_storage::Quote {
            mid: "m0".into(),
            seq: 1,
            from: "bob".into(),
            kind: "text".into(),
            preview: "h\u{e9} \"x\"".into(),
        };
        let bodies =
            [json!("é \"quoted\" \n\u{1}"), json!({"url": "https://x/y", "name": "a b", "size": 3, "mime": "a/b"})];
        for (i, body) in bodies.into_iter().enumerate() {
            let m = Message {
                conv: "d:alice:bob".into(),
                mid: format!("mid{i}"),
                seq: 7 + i as u64,
                from: "alice".into(),
                cmid: "c\"1".into(),
                kind: if i == 0 { "text".into() } else { "file".into() },
                body,
                ts: 1_700_000_000_000,
                reply_to: (i == 0).then(|| Box::new(quote.clone())),
                mentions: if i == 0 { vec!["bob".into()] } else { Vec::new() },
            };
            let stored = serde_json::to_vec(&m).unwrap();
            let direct = serde_json::to_vec(&MsgPush { op: "msg", msg: &m }).unwrap();
            assert_eq!(msg_push_around(&stored), direct);
        }
    }

    #[test]
    fn conv_ids_are_canonical() {
        assert_eq!(direct_conv("bob", "alice"), "d:alice:bob");
        assert_eq!(direct_conv("alice", "bob"), "d:alice:bob");
        assert_eq!(direct_members("d:alice:bob"), Some(("alice", "bob")));
        assert_eq!(direct_members("d:bob:alice"), None);
        assert_eq!(direct_members("d:alice"), None);
        assert_eq!(direct_members("g:abc"), None);
    }

    #[test]
    fn bodies_are_validated() {
        assert!(validate_body("text", &json!("hi")).is_ok());
        assert!(validate_body("text", &json!("")).is_err());
        assert!(validate_body("text", &json!({"a": 1})).is_err());
        let img = json!({"url": "https://x/y.png", "name": "y.png", "size": 10, "mime": "image/png"});
        assert!(validate_body("image", &img).is_ok());
        assert!(validate_body("video", &json!({"url": "u", "name": "n", "size": -1, "mime": "v/x"})).is_err());
        assert!(validate_body("custom", &json!([1, 2])).is_ok());
        assert!(validate_body("custom", &Value::Null).is_err());
        assert!(validate_body("sticker", &json!("x")).is_err());
    }
}
