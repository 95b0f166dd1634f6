//! send / ack / sync / history: the message path.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_storage::{FriendState, Message, NewMessage};

use super::{fields, require_user, Caller, Fields};
use crate::error::ApiError;
use crate::push::MsgRef;
use crate::Logic;

/// The direct conversation id of two users: `d:<min>:<max>`.
pub fn direct_conv(a: &str, b: &str) -> String {
    if a <= b {
        format!("d:{a}:{b}")
    } else {
        format!("d:{b}:{a}")
    }
}

/// The users of a direct conversation id, if it is one and is canonical.
fn direct_members(conv: &str) -> Option<(&str, &str)> {
    let rest = conv.strip_prefix("d:")?;
    let (a, b) = rest.split_once(':')?;
    (a < b && !b.contains(':')).then_some((a, b))
}

/// Fails with `forbidden` unless `user` belongs to `conv`.
fn require_member(conv: &str, user: &str) -> Result<(), ApiError> {
    conv_members(conv, user).map(|_| ())
}

/// The members of `conv`, or `forbidden` unless `user` is one of them.
pub fn conv_members(conv: &str, user: &str) -> Result<Vec<String>, ApiError> {
    match direct_members(conv) {
        Some((a, b)) if a == user || b == user => Ok(vec![a.to_owned(), b.to_owned()]),
        _ => Err(ApiError::forbidden(format!("not a member of `{conv}`"))),
    }
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

pub async fn send(logic: &Logic, caller: &Caller, req: Send) -> Result<Fields, ApiError> {
    if req.cmid.is_empty() || req.cmid.chars().count() > 64 {
        return Err(ApiError::bad_request("cmid must be 1-64 chars"));
    }
    validate_body(&req.kind, &req.body)?;
    let to = match (req.to, req.group) {
        (Some(to), None) => to,
        (None, Some(group)) => return Err(ApiError::new("no_such_group", format!("no group `{group}`"))),
        _ => return Err(ApiError::bad_request("give exactly one of `to` and `group`")),
    };
    if to == caller.user {
        return Err(ApiError::new("not_friends", "cannot message yourself"));
    }
    if logic.stores.social.friend_state(&caller.user, &to).await? != Some(FriendState::Friends) {
        require_user(logic, &to).await?;
        return Err(ApiError::new("not_friends", format!("`{to}` is not your friend")));
    }
    let conv = direct_conv(&caller.user, &to);
    let members = [caller.user.clone(), to.clone()];
    let new =
        NewMessage { conv: conv.clone(), from: caller.user.clone(), cmid: req.cmid, kind: req.kind, body: req.body };

    let _order = logic.conv_lock(&conv).lock().await;
    let appended = logic.stores.messages.append(new, &members).await?;
    let m = &appended.msg;
    if !appended.duplicate {
        crate::metrics::inc(&logic.metrics.sends);
        let push = json!({"op": "msg", "msg": m});
        let at = Some(MsgRef { conv: &m.conv, seq: m.seq });
        logic.pusher.to_user(&to, &push, at, None).await;
        logic.pusher.to_user(&caller.user, &push, at, Some((&caller.gateway, caller.conn_id))).await;
    }
    Ok(fields(json!({"conv": m.conv, "mid": m.mid, "seq": m.seq, "ts": m.ts})))
}

#[derive(Deserialize)]
pub struct Ack {
    conv: String,
    seq: u64,
}

pub async fn ack(logic: &Logic, caller: &Caller, req: Ack) -> Result<Fields, ApiError> {
    require_member(&req.conv, &caller.user)?;
    logic.stores.messages.set_ack(&caller.user, &caller.device, &req.conv, req.seq).await?;
    Ok(Fields::new())
}

#[derive(Deserialize)]
pub struct Sync {
    #[serde(default)]
    since: HashMap<String, u64>,
    limit: Option<usize>,
}

pub async fn sync(logic: &Logic, caller: &Caller, req: Sync) -> Result<Fields, ApiError> {
    let limit = req.limit.unwrap_or(logic.config.sync_max).clamp(1, logic.config.sync_max);
    let store = &logic.stores.messages;
    let acked = store.acks(&caller.user, &caller.device).await?;
    let mut msgs: Vec<Message> = Vec::new();
    for (conv, last) in store.user_convs(&caller.user).await? {
        // The client's own view wins; for conversations it did not name,
        // resume after what this device acked.
        let from = req.since.get(&conv).or_else(|| acked.get(&conv)).copied().unwrap_or(0);
        if last > from {
            msgs.extend(store.range(&conv, from, limit + 1).await?);
        }
    }
    // ts never decreases within a conversation and the sort is stable, so
    // the cut below keeps a gap-free prefix of every conversation.
    msgs.sort_by_key(|m| m.ts);
    let more = msgs.len() > limit;
    msgs.truncate(limit);
    Ok(fields(json!({"msgs": msgs, "more": more})))
}

#[derive(Deserialize)]
pub struct History {
    conv: String,
    before_seq: Option<u64>,
    limit: Option<usize>,
}

pub async fn history(logic: &Logic, caller: &Caller, req: History) -> Result<Fields, ApiError> {
    require_member(&req.conv, &caller.user)?;
    let limit = req.limit.unwrap_or(50).clamp(1, 200);
    let msgs = logic.stores.messages.history(&req.conv, req.before_seq, limit).await?;
    Ok(fields(json!({"msgs": msgs})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_ids_are_canonical() {
        assert_eq!(direct_conv("bob", "alice"), "d:alice:bob");
        assert_eq!(direct_conv("alice", "bob"), "d:alice:bob");
        assert_eq!(direct_members("d:alice:bob"), Some(("alice", "bob")));
        assert_eq!(direct_members("d:bob:alice"), None);
        assert_eq!(direct_members("d:alice"), None);
        assert_eq!(direct_members("g:abc"), None);
        assert!(require_member("d:alice:bob", "bob").is_ok());
        assert_eq!(require_member("d:alice:bob", "carol").unwrap_err().code, "forbidden");
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
