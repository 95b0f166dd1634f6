//! Socket ops: one module per area, each op one function taking the caller
//! and its request fields, returning the reply fields or an [`ApiError`].

mod calls;
mod convs;
mod devices;
pub(crate) use devices::muted;
mod events;
mod friends;
mod groups;
mod messages;
mod refs;
pub(crate) use messages::{held_ack, require_member};
pub mod presence;

use serde::de::DeserializeOwned;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::Logic;

/// Who sent a request, as established by `auth` on the gateway.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub device: String,
    /// The client's IP address as the gateway saw it.
    pub ip: String,
    pub gateway: String,
    pub conn_id: u64,
}

/// Reply fields (merged into `{"op": "<op>.ok", "rid": ..}`).
pub type Fields = Map<String, Value>;

/// What an op answers besides `op` and `rid`.
pub enum Reply {
    /// Any op's fields.
    Fields(Fields),
    /// Where a sent message was stored (`send.ok`), written without a map built per reply.
    Sent(messages::Sent),
    /// `sync.ok`'s messages, written as they are.
    Synced(messages::Synced),
    /// `convs.ok`'s conversations, written as they are.
    Convs(convs::ConvList),
}

/// Deserialises the frame straight into the op's request type (the one parse of the frame in
/// logic; `op` and `rid` come from the gateway).
fn parse<T: DeserializeOwned>(frame: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(frame).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The op and rid of a frame whose sender did not pass them along.
#[derive(serde::Deserialize)]
struct Head {
    op: Option<String>,
    rid: Option<Value>,
}

/// Runs one request frame and returns the reply frame, serialised. `op` and `rid` are the
/// frame's, as read by the gateway; with `op` empty they are read from the frame here.
pub async fn handle(logic: &Logic, caller: &Caller, op: &str, rid: Option<u64>, frame: &[u8]) -> (Vec<u8>, bool) {
    let (op, rid) = if op.is_empty() {
        match serde_json::from_slice::<Head>(frame) {
            Ok(Head { op: Some(op), rid }) => (std::borrow::Cow::Owned(op), rid.as_ref().and_then(Value::as_u64)),
            Ok(Head { op: None, rid }) => {
                let rid = rid.as_ref().and_then(Value::as_u64);
                return (error_frame(&ApiError::bad_request("missing field `op`"), rid), false);
            }
            Err(e) => return (error_frame(&ApiError::bad_request(format!("malformed frame: {e}")), None), false),
        }
    } else {
        (std::borrow::Cow::Borrowed(op), rid)
    };
    let op = op.as_ref();
    if let Err(e) = logic.limit_request(&caller.user, &caller.ip) {
        crate::metrics::inc(&logic.metrics.errors);
        return (error_frame(&e, rid), false);
    }
    // One span per request: the gateway and connection it came through and its rid identify it
    // in both processes' logs; a stored message adds its conv and seq.
    let span = tracing::debug_span!(
        "request",
        op,
        rid,
        user = %caller.user,
        gateway = %caller.gateway,
        conn = caller.conn_id,
        conv = tracing::field::Empty,
        seq = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let result = tracing::Instrument::instrument(dispatch(logic, caller, op, frame), span.clone()).await;
    let elapsed = started.elapsed();
    logic.metrics.latency.request(op, elapsed.as_secs_f64());
    tracing::debug!(parent: &span, micros = elapsed.as_micros() as u64, error = result.as_ref().err().map(|e| e.code), "request done");
    match result {
        Ok(fields) => {
            let reply = OkReply { op, rid, reply: &fields };
            let frame = serde_json::to_vec(&reply)
                .unwrap_or_else(|e| error_frame(&ApiError::new("internal", e.to_string()), rid));
            (frame, false)
        }
        Err(e) => {
            crate::metrics::inc(&logic.metrics.errors);
            (error_frame(&e, rid), false)
        }
    }
}

fn error_frame(e: &ApiError, rid: Option<u64>) -> Vec<u8> {
    e.to_frame(rid).to_string().into_bytes()
}

/// `{"op": "<op>.ok", "rid": .., ..fields}`, written straight from the op's fields (no map
/// built and dropped per reply). `op` and `rid` are the reply's own: fields of those names are
/// left out.
struct OkReply<'a> {
    op: &'a str,
    rid: Option<u64>,
    reply: &'a Reply,
}

impl Serialize for OkReply<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match op_index(self.op) {
            Some(i) => m.serialize_entry("op", OK_OPS[i].as_str())?,
            None => m.serialize_entry("op", &format_args!("{}.ok", self.op))?,
        }
        if let Some(rid) = self.rid {
            m.serialize_entry("rid", &rid)?;
        }
        match self.reply {
            Reply::Fields(fields) => {
                for (k, v) in fields.iter().filter(|(k, _)| *k != "op" && *k != "rid") {
                    m.serialize_entry(k, v)?;
                }
            }
            Reply::Sent(sent) => sent.serialize_entries(&mut m)?,
            Reply::Synced(synced) => synced.serialize_entries(&mut m)?,
            Reply::Convs(convs) => convs.serialize_entries(&mut m)?,
        }
        m.end()
    }
}

/// Every op [`dispatch`] serves (the `op` label of the request latency histogram).
pub(crate) const OPS: [&str; 38] = [
    "send",
    "ack",
    "sync",
    "history",
    "friend.request",
    "friend.accept",
    "friend.reject",
    "friend.delete",
    "friend.list",
    "block",
    "unblock",
    "block.list",
    "read",
    "convs",
    "recall",
    "edit",
    "react",
    "unreact",
    "pin",
    "unpin",
    "group.create",
    "group.join",
    "group.leave",
    "group.members",
    "group.list",
    "group.add",
    "group.set",
    "call.offer",
    "call.answer",
    "call.ice",
    "call.hangup",
    "presence",
    "typing",
    "search",
    "push.register",
    "push.unregister",
    "mute",
    "unmute",
];

/// `<op>.ok` of each op of [`OPS`], written once (formatting it costs more than the rest of a
/// `send.ok`'s head).
static OK_OPS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| OPS.iter().map(|op| format!("{op}.ok")).collect());

/// Where `op` is in [`OPS`] (the messaging ops lead the list, so they are found first).
pub(crate) fn op_index(op: &str) -> Option<usize> {
    OPS.iter().position(|o| *o == op)
}

async fn dispatch(logic: &Logic, caller: &Caller, op: &str, req: &[u8]) -> Result<Reply, ApiError> {
    match op {
        "send" => messages::send(logic, caller, parse(req)?).await.map(Reply::Sent),
        "sync" => messages::sync(logic, caller, parse(req)?).await.map(Reply::Synced),
        "convs" => convs::convs(logic, caller, parse(req)?).await.map(Reply::Convs),
        _ => dispatch_fields(logic, caller, op, req).await.map(Reply::Fields),
    }
}

/// The ops that answer with [`Fields`].
async fn dispatch_fields(logic: &Logic, caller: &Caller, op: &str, req: &[u8]) -> Result<Fields, ApiError> {
    match op {
        "ack" => messages::ack(logic, caller, parse(req)?).await,
        "history" => messages::history(logic, caller, parse(req)?).await,
        "friend.request" => friends::request(logic, caller, parse(req)?).await,
        "friend.accept" => friends::accept(logic, caller, parse(req)?).await,
        "friend.reject" => friends::reject(logic, caller, parse(req)?).await,
        "friend.delete" => friends::delete(logic, caller, parse(req)?).await,
        "friend.list" => friends::list(logic, caller).await,
        "block" => friends::block(logic, caller, parse(req)?, true).await,
        "unblock" => friends::block(logic, caller, parse(req)?, false).await,
        "block.list" => friends::blocked(logic, caller).await,
        "read" => messages::read(logic, caller, parse(req)?).await,
        "recall" => messages::recall(logic, caller, parse(req)?).await,
        "edit" => events::edit(logic, caller, parse(req)?).await,
        "react" => events::react(logic, caller, parse(req)?, true).await,
        "unreact" => events::react(logic, caller, parse(req)?, false).await,
        "pin" => events::pin(logic, caller, parse(req)?, true).await,
        "unpin" => events::pin(logic, caller, parse(req)?, false).await,
        "group.create" => groups::create(logic, caller, parse(req)?).await,
        "group.join" => groups::join(logic, caller, parse(req)?).await,
        "group.leave" => groups::leave(logic, caller, parse(req)?).await,
        "group.members" => groups::members(logic, caller, parse(req)?).await,
        "group.list" => groups::list(logic, caller).await,
        "group.add" => groups::add(logic, caller, parse(req)?).await,
        "group.set" => groups::set(logic, caller, parse(req)?).await,
        "call.offer" | "call.answer" | "call.ice" | "call.hangup" => calls::relay(logic, caller, op, parse(req)?).await,
        "presence" => presence::presence(logic, caller, parse(req)?).await,
        "typing" => presence::typing(logic, caller, parse(req)?).await,
        "search" => refs::search(logic, caller, parse(req)?).await,
        "push.register" => devices::register(logic, caller, parse(req)?).await,
        "push.unregister" => devices::unregister(logic, caller).await,
        "mute" => devices::mute(logic, caller, parse(req)?).await,
        "unmute" => devices::unmute(logic, caller, parse(req)?).await,
        "auth" => Err(ApiError::bad_request("already authenticated")),
        other => Err(ApiError::new("unknown_op", format!("unknown op `{other}`"))),
    }
}

/// Fails with `no_such_user` unless `user` is registered.
async fn require_user(logic: &Logic, user: &str) -> Result<(), ApiError> {
    match logic.stores.accounts.get_user(user).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::new("no_such_user", format!("no user `{user}`"))),
    }
}

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Fields::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{fields, OkReply, Reply};

    #[test]
    fn ok_replies_carry_op_rid_and_every_field_once() {
        let f = Reply::Fields(fields(
            json!({"conv": "d:a:\"b\"", "seq": 7, "msgs": [{"body": "é\n"}], "op": "x", "rid": 1}),
        ));
        let bytes = serde_json::to_vec(&OkReply { op: "send", rid: Some(42), reply: &f }).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, json!({"op": "send.ok", "rid": 42, "conv": "d:a:\"b\"", "seq": 7, "msgs": [{"body": "é\n"}]}));
        assert_eq!(text.matches("\"op\"").count() + text.matches("\"rid\"").count(), 2, "{text}");
        let none =
            serde_json::to_vec(&OkReply { op: "ack", rid: None, reply: &Reply::Fields(Default::default()) }).unwrap();
        assert_eq!(none, br#"{"op":"ack.ok"}"#);
    }

    #[test]
    fn every_op_is_found_and_answers_with_its_own_name() {
        for (i, op) in super::OPS.iter().enumerate() {
            assert_eq!(super::op_index(op), Some(i), "{op}");
            let bytes =
                serde_json::to_vec(&OkReply { op, rid: None, reply: &Reply::Fields(Default::default()) }).unwrap();
            assert_eq!(bytes, format!(r#"{{"op":"{op}.ok"}}"#).into_bytes());
        }
        // An op outside the list (none is answered today) is still named by the reply.
        assert_eq!(super::op_index("nope"), None);
        let bytes =
            serde_json::to_vec(&OkReply { op: "nope", rid: Some(1), reply: &Reply::Fields(Default::default()) })
                .unwrap();
        assert_eq!(bytes, br#"{"op":"nope.ok","rid":1}"#);
    }
}
