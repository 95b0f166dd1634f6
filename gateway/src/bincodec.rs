//! Conversion between the binary client frame (protobuf [`Frame`], subprotocol
//! `sb.bin.v1` and raw TCP) and the canonical JSON form that logic speaks.
//!
//! Mapping rules (also written in `proto/proto/frame.proto`):
//! - every JSON field maps to the proto field of the same name;
//! - empty strings, unset optionals and empty repeated fields / maps are omitted from the JSON,
//!   so `{"op":"ping","rid":1}` round-trips exactly; a JSON `null` counts as absent;
//! - `body` is `Body{text}` when the JSON body is a string and `Body{json}` (the value as JSON
//!   text) for any other JSON value; a `Body{json}` that is not valid JSON, or is `null`, is dropped;
//! - `msg`, `msgs[]` and `convs[].last` are `Message`; `since` is the map;
//! - JSON `members` is `repeated string members` when it is an array of strings
//!   (`group.create`) and `member_list` when it is an array of `{user, role}` objects
//!   (`group.members` reply); when both are set, `member_list` wins;
//! - JSON `online` is `online_map` when it is an object (`presence` reply) and the optional
//!   `online` bool otherwise (`presence` push); friend entries carry `Friend.online`;
//! - `friends`, `pending`, `groups`, `convs` map to `Friend`, `Pending`, `GroupInfo`,
//!   `ConvSummary`;
//! - inside nested messages, empty strings are omitted but numbers and bools are always
//!   written (`seq`, `ts`, `unread`, `read_seq`, `online`, `invite_only`): proto3 cannot tell 0
//!   from unset;
//! - a JSON field without a proto counterpart is dropped; a known field of the wrong JSON type
//!   is a [`CodecError`].

use std::collections::HashMap;

use serde_json::{Map, Value};
use switchboard_proto::v1::{
    body::Kind, Body, ConvSummary, Frame, Friend, GroupInfo, Member, Message, Pending, Quote, SearchResult, Span,
};

/// Why a JSON frame cannot be expressed as a protobuf `Frame`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The JSON value (or a nested one that must be an object) is not an object.
    #[error("`{0}` is not a JSON object")]
    NotObject(&'static str),
    /// A known field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    Field { field: &'static str, expected: &'static str },
}

fn bad(field: &'static str, expected: &'static str) -> CodecError {
    CodecError::Field { field, expected }
}

// ---------------------------------------------------------------- proto -> JSON

fn put_str(m: &mut Map<String, Value>, k: &str, v: &str) {
    if !v.is_empty() {
        m.insert(k.into(), Value::String(v.to_string()));
    }
}

fn put_opt<T: Into<Value> + Copy>(m: &mut Map<String, Value>, k: &str, v: Option<T>) {
    if let Some(v) = v {
        m.insert(k.into(), v.into());
    }
}

fn body_to_json(b: &Body) -> Option<Value> {
    match &b.kind {
        Some(Kind::Text(t)) => Some(Value::String(t.clone())),
        // `null` is no body, as in the other direction: canonical JSON has no `"body":null`
        Some(Kind::Json(j)) => serde_json::from_str(j).ok().filter(|v: &Value| !v.is_null()),
        None => None,
    }
}

fn message_to_json(msg: &Message) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "conv", &msg.conv);
    put_str(&mut m, "mid", &msg.mid);
    m.insert("seq".into(), msg.seq.into());
    put_str(&mut m, "from", &msg.from);
    put_str(&mut m, "cmid", &msg.cmid);
    put_str(&mut m, "type", &msg.r#type);
    if let Some(b) = msg.body.as_ref().and_then(body_to_json) {
        m.insert("body".into(), b);
    }
    m.insert("ts".into(), msg.ts.into());
    put_opt(&mut m, "edited_ts", msg.edited_ts);
    if !msg.reactions.is_empty() {
        let counts: Map<String, Value> = msg.reactions.iter().map(|(e, n)| (e.clone(), (*n).into())).collect();
        m.insert("reactions".into(), Value::Object(counts));
    }
    list(&mut m, "reacted", &msg.reacted, |e| Value::String(e.clone()));
    put_opt(&mut m, "pinned", msg.pinned);
    if let Some(q) = &msg.reply_to {
        let mut quote = Map::new();
        put_str(&mut quote, "mid", &q.mid);
        quote.insert("seq".into(), q.seq.into());
        put_str(&mut quote, "from", &q.from);
        put_str(&mut quote, "type", &q.r#type);
        put_str(&mut quote, "preview", &q.preview);
        m.insert("reply_to".into(), Value::Object(quote));
    }
    list(&mut m, "mentions", &msg.mentions, |u| Value::String(u.clone()));
    Value::Object(m)
}

fn list<T>(m: &mut Map<String, Value>, k: &str, items: &[T], f: impl Fn(&T) -> Value) {
    if !items.is_empty() {
        m.insert(k.into(), Value::Array(items.iter().map(f).collect()));
    }
}

fn obj(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        if !matches!(&v, Value::String(s) if s.is_empty()) {
            m.insert(k.into(), v);
        }
    }
    Value::Object(m)
}

/// The canonical JSON object of a protobuf frame. Never panics.
pub fn frame_to_json(f: &Frame) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "op", &f.op);
    put_opt(&mut m, "rid", f.rid);
    put_str(&mut m, "code", &f.code);
    put_str(&mut m, "message", &f.message);
    put_opt(&mut m, "retry_after_ms", f.retry_after_ms);
    put_str(&mut m, "token", &f.token);
    put_str(&mut m, "user", &f.user);
    put_str(&mut m, "session", &f.session);
    put_opt(&mut m, "server_ts", f.server_ts);
    put_str(&mut m, "to", &f.to);
    put_str(&mut m, "group", &f.group);
    put_str(&mut m, "cmid", &f.cmid);
    put_str(&mut m, "type", &f.r#type);
    if let Some(b) = f.body.as_ref().and_then(body_to_json) {
        m.insert("body".into(), b);
    }
    put_str(&mut m, "conv", &f.conv);
    put_str(&mut m, "mid", &f.mid);
    put_opt(&mut m, "seq", f.seq);
    put_opt(&mut m, "ts", f.ts);
    if !f.since.is_empty() {
        let since: Map<String, Value> = f.since.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect();
        m.insert("since".into(), Value::Object(since));
    }
    put_opt(&mut m, "limit", f.limit);
    put_opt(&mut m, "before_seq", f.before_seq);
    list(&mut m, "msgs", &f.msgs, message_to_json);
    put_opt(&mut m, "more", f.more);
    if let Some(msg) = &f.msg {
        m.insert("msg".into(), message_to_json(msg));
    }
    put_str(&mut m, "from", &f.from);
    put_str(&mut m, "note", &f.note);
    list(&mut m, "friends", &f.friends, |x| {
        obj(vec![("user", x.user.clone().into()), ("nickname", x.nickname.clone().into()), ("online", x.online.into())])
    });
    list(&mut m, "pending", &f.pending, |x| {
        obj(vec![("from", x.from.clone().into()), ("note", x.note.clone().into())])
    });
    put_str(&mut m, "name", &f.name);
    if !f.member_list.is_empty() {
        list(&mut m, "members", &f.member_list, |x| {
            obj(vec![("user", x.user.clone().into()), ("role", x.role.clone().into())])
        });
    } else {
        list(&mut m, "members", &f.members, |x| Value::String(x.clone()));
    }
    list(&mut m, "groups", &f.groups, |x| {
        obj(vec![
            ("group", x.group.clone().into()),
            ("name", x.name.clone().into()),
            ("role", x.role.clone().into()),
            ("invite_only", x.invite_only.into()),
        ])
    });
    list(&mut m, "convs", &f.convs, |x| {
        let mut c = Map::new();
        put_str(&mut c, "conv", &x.conv);
        if let Some(last) = &x.last {
            c.insert("last".into(), message_to_json(last));
        }
        c.insert("unread".into(), x.unread.into());
        c.insert("read_seq".into(), x.read_seq.into());
        put_opt(&mut c, "mentioned", x.mentioned);
        put_opt(&mut c, "mention_seq", x.mention_seq);
        put_opt(&mut c, "muted", x.muted);
        put_opt(&mut c, "muted_until", x.muted_until);
        Value::Object(c)
    });
    list(&mut m, "users", &f.users, |x| Value::String(x.clone()));
    if !f.online_map.is_empty() {
        let online: Map<String, Value> = f.online_map.iter().map(|(k, v)| (k.clone(), Value::Bool(*v))).collect();
        m.insert("online".into(), Value::Object(online));
    } else {
        put_opt(&mut m, "online", f.online);
    }
    put_str(&mut m, "by", &f.by);
    put_str(&mut m, "call_id", &f.call_id);
    put_str(&mut m, "sdp", &f.sdp);
    put_str(&mut m, "candidate", &f.candidate);
    put_str(&mut m, "reason", &f.reason);
    put_opt(&mut m, "read_seq", f.read_seq);
    put_opt(&mut m, "invite_only", f.invite_only);
    put_opt(&mut m, "quiet", f.quiet);
    put_str(&mut m, "text", &f.text);
    put_str(&mut m, "emoji", &f.emoji);
    put_opt(&mut m, "fold", f.fold);
    put_opt(&mut m, "next_before", f.next_before);
    put_opt(&mut m, "folded_through", f.folded_through);
    put_str(&mut m, "reply_to", &f.reply_to);
    list(&mut m, "mentions", &f.mentions, |u| Value::String(u.clone()));
    put_str(&mut m, "q", &f.q);
    put_opt(&mut m, "before", f.before);
    put_opt(&mut m, "offset", f.offset);
    list(&mut m, "results", &f.results, |r| {
        let mut hit = Map::new();
        put_str(&mut hit, "conv", &r.conv);
        put_str(&mut hit, "mid", &r.mid);
        hit.insert("seq".into(), r.seq.into());
        put_str(&mut hit, "from", &r.from);
        hit.insert("ts".into(), r.ts.into());
        put_str(&mut hit, "type", &r.r#type);
        put_str(&mut hit, "text", &r.text);
        list(&mut hit, "highlights", &r.highlights, |s| Value::from(vec![s.start, s.end]));
        hit.insert("score".into(), r.score.into());
        Value::Object(hit)
    });
    put_opt(&mut m, "next_offset", f.next_offset);
    put_str(&mut m, "platform", &f.platform);
    put_opt(&mut m, "removed", f.removed);
    put_opt(&mut m, "until", f.until);
    Value::Object(m)
}

// ---------------------------------------------------------------- JSON -> proto

/// Field accessor over one JSON object; `null` counts as absent.
struct Obj<'a>(&'a Map<String, Value>);

impl<'a> Obj<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn str(&self, k: &'static str) -> Result<String, CodecError> {
        match self.get(k) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(k, "a string")),
        }
    }

    fn u64_opt(&self, k: &'static str) -> Result<Option<u64>, CodecError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(bad(k, "a non-negative integer")),
        }
    }

    fn u64(&self, k: &'static str) -> Result<u64, CodecError> {
        Ok(self.u64_opt(k)?.unwrap_or(0))
    }

    fn bool_opt(&self, k: &'static str) -> Result<Option<bool>, CodecError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or(bad(k, "a boolean")),
        }
    }

    fn array(&self, k: &'static str) -> Result<&'a [Value], CodecError> {
        match self.get(k) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(bad(k, "an array")),
        }
    }

    fn objects<T>(&self, k: &'static str, f: impl Fn(Obj<'_>) -> Result<T, CodecError>) -> Result<Vec<T>, CodecError> {
        self.array(k)?
            .iter()
            .map(|v| match v {
                Value::Object(o) => f(Obj(o)),
                _ => Err(CodecError::NotObject(k)),
            })
            .collect()
    }

    fn strings(&self, k: &'static str) -> Result<Vec<String>, CodecError> {
        self.array(k)?.iter().map(|v| v.as_str().map(str::to_string).ok_or(bad(k, "an array of strings"))).collect()
    }

    fn body(&self) -> Option<Body> {
        let kind = match self.get("body")? {
            Value::String(s) => Kind::Text(s.clone()),
            other => Kind::Json(other.to_string()),
        };
        Some(Body { kind: Some(kind) })
    }

    fn message(&self, k: &'static str) -> Result<Option<Message>, CodecError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(o)) => message_from(Obj(o)).map(Some),
            Some(_) => Err(CodecError::NotObject(k)),
        }
    }
}

fn message_from(o: Obj<'_>) -> Result<Message, CodecError> {
    Ok(Message {
        conv: o.str("conv")?,
        mid: o.str("mid")?,
        seq: o.u64("seq")?,
        from: o.str("from")?,
        cmid: o.str("cmid")?,
        r#type: o.str("type")?,
        body: o.body(),
        ts: o.u64("ts")?,
        edited_ts: o.u64_opt("edited_ts")?,
        reactions: match o.get("reactions") {
            None => Default::default(),
            Some(Value::Object(r)) => r
                .iter()
                .map(|(e, n)| n.as_u64().map(|n| (e.clone(), n)).ok_or(bad("reactions", "an object of counts")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(CodecError::NotObject("reactions")),
        },
        reacted: o.strings("reacted")?,
        pinned: o.bool_opt("pinned")?,
        reply_to: match o.get("reply_to") {
            None => None,
            Some(Value::Object(q)) => {
                let q = Obj(q);
                Some(Quote {
                    mid: q.str("mid")?,
                    seq: q.u64("seq")?,
                    from: q.str("from")?,
                    r#type: q.str("type")?,
                    preview: q.str("preview")?,
                })
            }
            Some(_) => return Err(CodecError::NotObject("reply_to")),
        },
        mentions: o.strings("mentions")?,
    })
}

fn search_result_from(o: Obj<'_>) -> Result<SearchResult, CodecError> {
    let mut highlights = Vec::new();
    for span in o.array("highlights")? {
        let pair = span.as_array().filter(|p| p.len() == 2).and_then(|p| Some((p[0].as_u64()?, p[1].as_u64()?)));
        let (start, end) = pair.ok_or(bad("highlights", "an array of [start, end] pairs"))?;
        highlights.push(Span { start, end });
    }
    Ok(SearchResult {
        conv: o.str("conv")?,
        mid: o.str("mid")?,
        seq: o.u64("seq")?,
        from: o.str("from")?,
        ts: o.u64("ts")?,
        r#type: o.str("type")?,
        text: o.str("text")?,
        highlights,
        score: o.u64("score")?,
    })
}

/// The protobuf frame of a canonical JSON object (see the module doc for the rules).
pub fn json_to_frame(v: &Value) -> Result<Frame, CodecError> {
    let Value::Object(map) = v else {
        return Err(CodecError::NotObject("frame"));
    };
    let o = Obj(map);
    let mut f = Frame {
        op: o.str("op")?,
        rid: o.u64_opt("rid")?,
        code: o.str("code")?,
        message: o.str("message")?,
        retry_after_ms: o.u64_opt("retry_after_ms")?,
        token: o.str("token")?,
        user: o.str("user")?,
        session: o.str("session")?,
        server_ts: o.u64_opt("server_ts")?,
        to: o.str("to")?,
        group: o.str("group")?,
        cmid: o.str("cmid")?,
        r#type: o.str("type")?,
        body: o.body(),
        conv: o.str("conv")?,
        mid: o.str("mid")?,
        seq: o.u64_opt("seq")?,
        ts: o.u64_opt("ts")?,
        before_seq: o.u64_opt("before_seq")?,
        msgs: o.objects("msgs", message_from)?,
        more: o.bool_opt("more")?,
        msg: o.message("msg")?,
        from: o.str("from")?,
        note: o.str("note")?,
        friends: o.objects("friends", |x| {
            Ok(Friend {
                user: x.str("user")?,
                nickname: x.str("nickname")?,
                online: x.bool_opt("online")? == Some(true),
            })
        })?,
        pending: o.objects("pending", |x| Ok(Pending { from: x.str("from")?, note: x.str("note")? }))?,
        name: o.str("name")?,
        groups: o.objects("groups", |x| {
            Ok(GroupInfo {
                group: x.str("group")?,
                name: x.str("name")?,
                role: x.str("role")?,
                invite_only: x.bool_opt("invite_only")? == Some(true),
            })
        })?,
        convs: o.objects("convs", |x| {
            Ok(ConvSummary {
                conv: x.str("conv")?,
                last: x.message("last")?,
                unread: x.u64("unread")?,
                read_seq: x.u64("read_seq")?,
                mentioned: x.bool_opt("mentioned")?,
                mention_seq: x.u64_opt("mention_seq")?,
                muted: x.bool_opt("muted")?,
                muted_until: x.u64_opt("muted_until")?,
            })
        })?,
        users: o.strings("users")?,
        by: o.str("by")?,
        call_id: o.str("call_id")?,
        sdp: o.str("sdp")?,
        candidate: o.str("candidate")?,
        reason: o.str("reason")?,
        read_seq: o.u64_opt("read_seq")?,
        invite_only: o.bool_opt("invite_only")?,
        quiet: o.bool_opt("quiet")?,
        text: o.str("text")?,
        emoji: o.str("emoji")?,
        fold: o.bool_opt("fold")?,
        next_before: o.u64_opt("next_before")?,
        folded_through: o.u64_opt("folded_through")?,
        q: o.str("q")?,
        before: o.u64_opt("before")?,
        offset: o.u64_opt("offset")?,
        results: o.objects("results", search_result_from)?,
        next_offset: o.u64_opt("next_offset")?,
        platform: o.str("platform")?,
        removed: o.bool_opt("removed")?,
        until: o.u64_opt("until")?,
        ..Default::default()
    };
    // `reply_to` is a mid in a request and a quote only inside messages
    f.reply_to = o.str("reply_to")?;
    f.mentions = o.strings("mentions")?;
    f.limit = match o.u64_opt("limit")? {
        None => None,
        Some(n) => Some(u32::try_from(n).map_err(|_| bad("limit", "an integer below 2^32"))?),
    };
    if let Some(since) = o.get("since") {
        let Value::Object(s) = since else {
            return Err(CodecError::NotObject("since"));
        };
        let mut map = HashMap::with_capacity(s.len());
        for (k, v) in s {
            map.insert(k.clone(), v.as_u64().ok_or(bad("since", "an object of non-negative integers"))?);
        }
        f.since = map;
    }
    let members = o.array("members")?;
    if members.iter().all(Value::is_string) {
        f.members = o.strings("members")?;
    } else {
        f.member_list = o.objects("members", |x| Ok(Member { user: x.str("user")?, role: x.str("role")? }))?;
    }
    match o.get("online") {
        None => {}
        Some(Value::Bool(b)) => f.online = Some(*b),
        Some(Value::Object(m)) => {
            let mut map = HashMap::with_capacity(m.len());
            for (k, v) in m {
                map.insert(k.clone(), v.as_bool().ok_or(bad("online", "an object of booleans"))?);
            }
            f.online_map = map;
        }
        Some(_) => return Err(bad("online", "a boolean or an object")),
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use serde_json::json;

    fn roundtrip(v: Value) {
        let f = json_to_frame(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
        let bytes = f.encode_to_vec();
        let back = Frame::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, f);
        assert_eq!(frame_to_json(&back), v, "round trip of {v}");
    }

    fn message(seq: u64, body: Value) -> Value {
        json!({"conv": "d:alice:bob", "mid": format!("m{seq}"), "seq": seq, "from": "alice", "cmid": format!("c{seq}"),
               "type": if body.is_string() { "text" } else { "image" }, "body": body, "ts": 1_718_000_000_000u64})
    }

    #[test]
    fn ping_round_trips_exactly() {
        let v = json!({"op": "ping", "rid": 1});
        let f = json_to_frame(&v).unwrap();
        assert_eq!(f, Frame { op: "ping".into(), rid: Some(1), ..Default::default() });
        roundtrip(v);
        roundtrip(json!({"op": "ping", "rid": 0}));
    }

    #[test]
    fn requests_round_trip() {
        let media = json!({"url": "https://x/y.png", "name": "y.png", "size": 12, "mime": "image/png"});
        for v in [
            json!({"op": "auth", "rid": 1, "token": "t0k"}),
            json!({"op": "send", "rid": 2, "to": "bob", "cmid": "c1", "type": "text", "body": "hi"}),
            json!({"op": "send", "rid": 3, "group": "G123456", "cmid": "c2", "type": "image", "body": media}),
            json!({"op": "send", "rid": 4, "to": "bob", "cmid": "c3", "type": "custom", "body": [1, "two", {"x": null}]}),
            json!({"op": "send", "rid": 4, "to": "bob", "cmid": "c3", "type": "custom", "body": 42}),
            json!({"op": "ack", "rid": 5, "conv": "d:alice:bob", "seq": 9}),
            json!({"op": "sync", "rid": 6, "since": {"d:alice:bob": 3, "g:G1": 0}, "limit": 100}),
            json!({"op": "sync", "rid": 6}),
            json!({"op": "history", "rid": 7, "conv": "d:alice:bob", "before_seq": 20, "limit": 50}),
            json!({"op": "read", "rid": 8, "conv": "d:alice:bob", "seq": 4}),
            json!({"op": "recall", "rid": 9, "conv": "d:alice:bob", "mid": "m4"}),
            json!({"op": "convs", "rid": 10}),
            json!({"op": "typing", "rid": 11, "conv": "d:alice:bob"}),
            json!({"op": "presence", "rid": 12, "users": ["bob", "carol"]}),
            json!({"op": "friend.request", "rid": 13, "to": "bob", "note": "hi!"}),
            json!({"op": "friend.accept", "rid": 14, "from": "bob"}),
            json!({"op": "friend.reject", "rid": 15, "from": "bob"}),
            json!({"op": "friend.delete", "rid": 16, "user": "bob"}),
            json!({"op": "friend.list", "rid": 17}),
            json!({"op": "group.create", "rid": 18, "name": "team", "members": ["bob", "carol"]}),
            json!({"op": "group.join", "rid": 19, "group": "G1"}),
            json!({"op": "group.leave", "rid": 20, "group": "G1"}),
            json!({"op": "group.members", "rid": 21, "group": "G1"}),
            json!({"op": "group.list", "rid": 22}),
            json!({"op": "call.offer", "rid": 23, "to": "bob", "call_id": "k1", "sdp": "v=0..."}),
            json!({"op": "call.answer", "rid": 24, "to": "alice", "call_id": "k1", "sdp": "v=0..."}),
            json!({"op": "call.ice", "rid": 25, "to": "bob", "call_id": "k1", "candidate": "candidate:1"}),
            json!({"op": "call.hangup", "rid": 26, "to": "bob", "call_id": "k1"}),
            json!({"op": "edit", "rid": 27, "conv": "d:alice:bob", "mid": "m1", "cmid": "e1", "text": "fixed"}),
            json!({"op": "react", "rid": 28, "conv": "g:G1", "mid": "m1", "cmid": "r1", "emoji": "👍"}),
            json!({"op": "unpin", "rid": 29, "conv": "g:G1", "mid": "m1", "cmid": "p1"}),
            json!({"op": "history", "rid": 30, "conv": "d:alice:bob", "fold": true}),
        ] {
            roundtrip(v);
        }
    }

    #[test]
    fn replies_round_trip() {
        for v in [
            json!({"op": "auth.ok", "rid": 1, "user": "alice", "session": "s1", "server_ts": 1_718_000_000_000u64}),
            json!({"op": "ping.ok", "rid": 2}),
            json!({"op": "send.ok", "rid": 3, "conv": "d:alice:bob", "mid": "m1", "seq": 1, "ts": 5}),
            json!({"op": "ack.ok", "rid": 4}),
            json!({"op": "sync.ok", "rid": 5, "msgs": [message(1, json!("hi")), message(2, json!({"url": "u"}))], "more": false}),
            json!({"op": "history.ok", "rid": 6, "msgs": [message(2, json!("b")), message(1, json!("a"))]}),
            json!({"op": "history.ok", "rid": 6, "next_before": 1, "folded_through": 7, "msgs": [
                {"conv": "d:alice:bob", "mid": "m1", "seq": 1, "from": "alice", "cmid": "c1", "type": "text",
                 "body": "edited", "ts": 5, "edited_ts": 9, "reactions": {"👍": 2, "🎉": 1}, "reacted": ["👍"], "pinned": true}]}),
            json!({"op": "send", "rid": 11, "group": "G1", "cmid": "c9", "type": "text", "body": "yes",
                   "reply_to": "m1", "mentions": ["bob", "carol"]}),
            json!({"op": "msg", "msg": {"conv": "g:G1", "mid": "m2", "seq": 2, "from": "bob", "cmid": "c9", "type": "text",
                   "body": "yes", "ts": 5, "reply_to": {"mid": "m1", "seq": 1, "from": "alice", "type": "text", "preview": "lunch?"},
                   "mentions": ["carol"]}}),
            json!({"op": "push.register", "rid": 13, "platform": "fcm", "token": "tok"}),
            json!({"op": "push.unregister.ok", "rid": 14, "removed": true}),
            json!({"op": "mute", "rid": 15, "conv": "g:G1", "until": 1_900_000_000_000u64}),
            json!({"op": "search", "rid": 12, "q": "noon 明天", "conv": "g:G1", "from": "bob", "before": 9, "limit": 5, "offset": 10}),
            json!({"op": "search.ok", "rid": 12, "next_offset": 15, "results": [
                {"conv": "g:G1", "mid": "m1", "seq": 1, "from": "alice", "ts": 5, "type": "text", "text": "noon 明天",
                 "highlights": [[0, 4], [5, 7]], "score": 12}]}),
            json!({"op": "convs.ok", "rid": 7, "convs": [
                {"conv": "d:alice:bob", "last": message(3, json!("x")), "unread": 2, "read_seq": 1, "mentioned": true, "mention_seq": 3,
                 "muted": true, "muted_until": 99},
                {"conv": "g:G1", "unread": 0, "read_seq": 0}]}),
            json!({"op": "presence.ok", "rid": 8, "online": {"bob": true, "carol": false}}),
            json!({"op": "friend.list.ok", "rid": 9,
                   "friends": [{"user": "bob", "nickname": "Bob", "online": true}, {"user": "carol", "online": false}],
                   "pending": [{"from": "dave", "note": "hey"}, {"from": "erin"}]}),
            json!({"op": "group.create.ok", "rid": 10, "group": "G1", "conv": "g:G1"}),
            json!({"op": "group.members.ok", "rid": 11, "members": [{"user": "alice", "role": "owner"}, {"user": "bob", "role": "member"}]}),
            json!({"op": "group.list.ok", "rid": 12, "groups": [{"group": "G1", "name": "team", "role": "owner", "invite_only": false}]}),
            json!({"op": "group.set", "rid": 13, "group": "G1", "invite_only": true}),
            json!({"op": "ack", "rid": 14, "conv": "g:G1", "seq": 3, "quiet": true}),
            json!({"op": "error", "rid": 13, "code": "bad_request", "message": "missing field `cmid`"}),
            json!({"op": "error", "rid": 14, "code": "rate_limited", "message": "slow down", "retry_after_ms": 1000}),
            json!({"op": "error", "code": "auth_timeout", "message": "no auth"}),
        ] {
            roundtrip(v);
        }
    }

    #[test]
    fn pushes_round_trip() {
        for v in [
            json!({"op": "msg", "msg": message(7, json!("hello"))}),
            json!({"op": "msg", "msg": {"conv": "d:a:b", "mid": "m", "seq": 3, "from": "a", "cmid": "c", "type": "recalled", "body": "", "ts": 9}}),
            json!({"op": "read", "conv": "d:alice:bob", "user": "bob", "seq": 7}),
            json!({"op": "recall", "conv": "d:alice:bob", "mid": "m7", "by": "alice"}),
            json!({"op": "typing", "conv": "d:alice:bob", "user": "bob"}),
            json!({"op": "friend.request", "from": "bob", "note": "hi"}),
            json!({"op": "friend.accepted", "user": "bob"}),
            json!({"op": "group.joined", "group": "G1", "conv": "g:G1"}),
            json!({"op": "presence", "user": "bob", "online": true}),
            json!({"op": "presence", "user": "bob", "online": false}),
            json!({"op": "call.offer", "from": "bob", "call_id": "k1", "sdp": "v=0"}),
            json!({"op": "call.hangup", "from": "bob", "call_id": "k1", "reason": "timeout"}),
            json!({"op": "kick", "reason": "signed in elsewhere"}),
            json!({"op": "drain", "retry_after_ms": 1000}),
        ] {
            roundtrip(v);
        }
    }

    #[test]
    fn omissions_and_drops() {
        // empty strings, empty arrays/maps, nulls and unknown fields disappear
        let v = json!({"op": "x", "rid": 1, "note": "", "users": [], "since": {}, "to": null, "device": "d1"});
        assert_eq!(frame_to_json(&json_to_frame(&v).unwrap()), json!({"op": "x", "rid": 1}));
        // body null is a JSON body
        let f = json_to_frame(&json!({"op": "x", "body": {"a": 1}})).unwrap();
        assert_eq!(f.body.unwrap().kind, Some(Kind::Json(r#"{"a":1}"#.into())));
        // an invalid Body.json is dropped
        let f =
            Frame { op: "x".into(), body: Some(Body { kind: Some(Kind::Json("{nope".into())) }), ..Default::default() };
        assert_eq!(frame_to_json(&f), json!({"op": "x"}));
        // a Body.json of `null` is no body (fuzz target bin_decode: it was `"body":null`, which
        // the JSON -> proto direction reads as absent, so the JSON was not canonical)
        let null = Some(Body { kind: Some(Kind::Json("null".into())) });
        let msg = Message { conv: "c".into(), body: null.clone(), ..Default::default() };
        let f = Frame { op: "x".into(), body: null, msg: Some(msg), ..Default::default() };
        let v = frame_to_json(&f);
        assert_eq!(v, json!({"op": "x", "msg": {"conv": "c", "seq": 0, "ts": 0}}));
        assert_eq!(frame_to_json(&json_to_frame(&v).unwrap()), v);
        let bytes = Frame::decode(&b"\x0a\x01x\x72\x06\x12\x04null"[..]).unwrap();
        assert_eq!(frame_to_json(&bytes), json!({"op": "x"}));
    }

    #[test]
    fn json_numbers_survive_every_pass() {
        // fuzz targets bin_decode and bin_encode: without serde_json's `float_roundtrip`, a
        // number parsed, printed and parsed again lost its last digits at every pass (client ->
        // gateway -> logic -> gateway -> client)
        for n in ["222222111100167776649", "555555555555550000000000015907416563667319012", "1.3555555555555556e53"] {
            let f = Frame {
                op: "x".into(),
                body: Some(Body { kind: Some(Kind::Json(format!(r#"{{"n":{n}}}"#))) }),
                ..Default::default()
            };
            let v = frame_to_json(&f);
            let f2 = json_to_frame(&v).unwrap();
            assert_eq!(frame_to_json(&f2), v, "{n}");
            assert_eq!(json_to_frame(&frame_to_json(&f2)).unwrap(), f2, "{n}");
            let exact: f64 = n.parse().unwrap();
            assert_eq!(v["body"]["n"].as_f64(), Some(exact), "{n} is not parsed to the nearest f64");
        }
    }

    #[test]
    fn wrong_types_are_errors() {
        assert_eq!(json_to_frame(&json!([1])), Err(CodecError::NotObject("frame")));
        assert!(json_to_frame(&json!({"op": 1})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "rid": -1})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "seq": "1"})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "limit": 5_000_000_000u64})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "since": {"c": "1"}})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "online": 1})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "members": ["a", 1]})).is_err());
        assert!(json_to_frame(&json!({"op": "x", "msg": "m"})).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut s: u64 = 0xD1B5_4A32_D192_ED03;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        // a valid encoding to mutate, so that many inputs decode to something
        let seed = json_to_frame(&json!({"op": "sync.ok", "rid": 5, "msgs": [message(1, json!({"a": [1, 2]}))],
            "online": {"bob": true}, "members": [{"user": "a", "role": "owner"}], "since": {"c": 1}}))
        .unwrap()
        .encode_to_vec();
        let mut decoded = 0;
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = (next() % 96) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut b = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            if let Ok(f) = Frame::decode(bytes.as_slice()) {
                decoded += 1;
                let v = frame_to_json(&f);
                assert!(v.is_object());
            }
        }
        assert!(decoded > 0);
    }
}
