//! edit / react / unreact / pin / unpin, and the folded view of `history`.
//!
//! Each of these is an **event**: a message of the conversation with the next seq, of type
//! `edit`, `reaction` or `pin`, whose body names the message it changes (`mid`). Events are
//! stored, pushed, synced and paged like any message, idempotent by `cmid` like `send`, so a
//! device that was offline applies them exactly once and in order. `history` with `fold`
//! applies them for the client: each message with its current text, edit time, reactions and
//! pin, and no events.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_storage::{now_ms, Message, NewMessage, Role};

use super::groups::require_role;
use super::messages::{conv_members, store_and_push, stranger_in};
use super::{Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

/// The type of an edit event: body `{mid, text}`.
pub const EDIT: &str = "edit";
/// The type of a reaction event: body `{mid, emoji, on}`.
pub const REACTION: &str = "reaction";
/// The type of a pin event: body `{mid, on}`.
pub const PIN: &str = "pin";
/// Longest reaction, in bytes (an emoji with modifiers and joiners fits many times over).
const MAX_EMOJI_BYTES: usize = 64;

/// Whether messages of this type are events (or a void: a seq that holds nothing), not content.
pub fn is_event(kind: &str) -> bool {
    matches!(kind, EDIT | REACTION | PIN | "void")
}

#[derive(Deserialize)]
pub struct Edit {
    conv: String,
    mid: String,
    cmid: String,
    text: String,
}

#[derive(Deserialize)]
pub struct React {
    conv: String,
    mid: String,
    cmid: String,
    emoji: String,
}

#[derive(Deserialize)]
pub struct Pin {
    conv: String,
    mid: String,
    cmid: String,
}

/// What an event needs before it is appended: the conversation's members (its push targets)
/// and the message it names, which must be content that was not recalled.
fn check_cmid(cmid: &str) -> Result<(), ApiError> {
    if cmid.is_empty() || cmid.chars().count() > 64 {
        return Err(ApiError::bad_request("cmid must be 1-64 chars"));
    }
    Ok(())
}

async fn target(
    logic: &Logic,
    caller: &Caller,
    conv: &str,
    mid: &str,
    cmid: &str,
) -> Result<(Vec<String>, Message), ApiError> {
    check_cmid(cmid)?;
    let members = conv_members(logic, conv, &caller.user).await?;
    if let Some(other) = stranger_in(logic, conv, &caller.user).await? {
        return Err(ApiError::new("not_friends", format!("`{other}` is not your friend")));
    }
    let Some(m) = logic.stores.messages.find_mid(conv, mid).await? else {
        return Err(ApiError::bad_request(format!("no message `{mid}` in `{conv}`")));
    };
    if is_event(&m.kind) {
        return Err(ApiError::bad_request(format!("`{mid}` is an event, not a message")));
    }
    if m.kind == "recalled" {
        return Err(ApiError::new("recalled", format!("message `{mid}` was recalled")));
    }
    Ok((members, m))
}

/// Appends the event and pushes it to every member (as `msg`, like any message).
async fn append(
    logic: &Logic,
    caller: &Caller,
    conv: &str,
    cmid: String,
    kind: &str,
    body: Value,
    members: &[String],
) -> Result<Fields, ApiError> {
    let new = NewMessage {
        conv: conv.to_owned(),
        from: caller.user.clone(),
        cmid,
        kind: kind.to_owned(),
        body,
        reply_to: None,
        mentions: Vec::new(),
    };
    // Direct conversations are indexed for both users, as `send` does; groups by membership.
    let index: &[String] = if conv.starts_with("d:") { members } else { &[] };
    store_and_push(logic, caller, new, index, members).await.map(super::messages::Sent::into_fields)
}

pub async fn edit(logic: &Logic, caller: &Caller, req: Edit) -> Result<Fields, ApiError> {
    if req.text.is_empty() {
        return Err(ApiError::bad_request("text must not be empty"));
    }
    let (members, m) = target(logic, caller, &req.conv, &req.mid, &req.cmid).await?;
    if m.from != caller.user {
        return Err(ApiError::forbidden("only the sender may edit a message"));
    }
    if m.kind != "text" {
        return Err(ApiError::bad_request(format!("a {} message cannot be edited", m.kind)));
    }
    let window = logic.config.edit_window.as_millis() as u64;
    if now_ms().saturating_sub(m.ts) > window {
        return Err(ApiError::new("too_late", format!("messages can be edited within {} s", window / 1000)));
    }
    let body = json!({"mid": req.mid, "text": req.text});
    append(logic, caller, &req.conv, req.cmid, EDIT, body, &members).await
}

fn valid_emoji(e: &str) -> bool {
    !e.is_empty() && e.len() <= MAX_EMOJI_BYTES && !e.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `react` (`on`) and `unreact`: each user holds each emoji on a message at most once.
pub async fn react(logic: &Logic, caller: &Caller, req: React, on: bool) -> Result<Fields, ApiError> {
    if !valid_emoji(&req.emoji) {
        return Err(ApiError::bad_request(format!("emoji: 1-{MAX_EMOJI_BYTES} bytes, no spaces")));
    }
    let (members, _) = target(logic, caller, &req.conv, &req.mid, &req.cmid).await?;
    let body = json!({"mid": req.mid, "emoji": req.emoji, "on": on});
    append(logic, caller, &req.conv, req.cmid, REACTION, body, &members).await
}

/// `pin` (`on`) and `unpin`: any member of a direct conversation, a group's owner or admins.
pub async fn pin(logic: &Logic, caller: &Caller, req: Pin, on: bool) -> Result<Fields, ApiError> {
    check_cmid(&req.cmid)?;
    if let Some(group) = req.conv.strip_prefix("g:") {
        if require_role(logic, group, &caller.user).await? == Role::Member {
            return Err(ApiError::forbidden("only the group's owner and admins may pin"));
        }
    }
    let (members, _) = target(logic, caller, &req.conv, &req.mid, &req.cmid).await?;
    let body = json!({"mid": req.mid, "on": on});
    append(logic, caller, &req.conv, req.cmid, PIN, body, &members).await
}

/// What the events say of one message.
#[derive(Default)]
struct Folded {
    /// The message's sender: only their edits count.
    from: String,
    text: Option<(String, u64)>,
    reactions: BTreeMap<String, BTreeSet<String>>,
    pinned: bool,
}

/// The folded view of a page of `history` (newest first): its messages without the events,
/// each with what the events of the conversation since the page's oldest seq say of it
/// (current `body` and `edited_ts`, `reactions` as counts, `reacted` by the caller, `pinned`).
/// Reads at most `fold_scan` messages after the page's oldest; returns the page and the last
/// seq it read (events after it are not applied).
pub async fn fold(logic: &Logic, user: &str, conv: &str, page: Vec<Message>) -> Result<(Vec<Value>, u64), ApiError> {
    let Some(oldest) = page.iter().map(|m| m.seq).min() else { return Ok((Vec::new(), 0)) };
    let mut state: HashMap<String, Folded> = page
        .iter()
        .filter(|m| !is_event(&m.kind))
        .map(|m| (m.mid.clone(), Folded { from: m.from.clone(), ..Folded::default() }))
        .collect();
    let (mut after, mut read) = (oldest.saturating_sub(1), 0usize);
    let chunk = 500.min(logic.config.fold_scan.max(1));
    while read < logic.config.fold_scan {
        let run = logic.stores.messages.range(conv, after, chunk.min(logic.config.fold_scan - read)).await?;
        let Some(last) = run.last() else { break };
        after = last.seq;
        read += run.len();
        for e in &run {
            let Some(f) = e.body.get("mid").and_then(Value::as_str).and_then(|mid| state.get_mut(mid)) else {
                continue;
            };
            let on = e.body.get("on").and_then(Value::as_bool).unwrap_or(false);
            match e.kind.as_str() {
                EDIT => {
                    if let (true, Some(text)) = (f.from == e.from, e.body.get("text").and_then(Value::as_str)) {
                        f.text = Some((text.to_owned(), e.ts));
                    }
                }
                REACTION => {
                    if let Some(emoji) = e.body.get("emoji").and_then(Value::as_str) {
                        let users = f.reactions.entry(emoji.to_owned()).or_default();
                        if on {
                            users.insert(e.from.clone());
                        } else {
                            users.remove(&e.from);
                        }
                    }
                }
                PIN => f.pinned = on,
                _ => {}
            }
        }
    }
    let mut out = Vec::with_capacity(page.len());
    for m in page {
        let Some(f) = state.remove(&m.mid) else { continue };
        let recalled = m.kind == "recalled";
        let mut v = serde_json::to_value(&m).expect("messages serialize");
        if let (false, Some((text, ts))) = (recalled, f.text) {
            v["body"] = Value::String(text);
            v["edited_ts"] = ts.into();
        }
        let reactions: serde_json::Map<String, Value> = f
            .reactions
            .iter()
            .filter(|(_, users)| !recalled && !users.is_empty())
            .map(|(emoji, users)| (emoji.clone(), users.len().into()))
            .collect();
        let mine: Vec<&String> =
            f.reactions.iter().filter(|(_, u)| !recalled && u.contains(user)).map(|(e, _)| e).collect();
        if !reactions.is_empty() {
            v["reactions"] = Value::Object(reactions);
        }
        if !mine.is_empty() {
            v["reacted"] = json!(mine);
        }
        if f.pinned && !recalled {
            v["pinned"] = true.into();
        }
        out.push(v);
    }
    Ok((out, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emojis_are_checked() {
        assert!(valid_emoji("👍"));
        assert!(valid_emoji("👩‍👩‍👧"));
        assert!(valid_emoji(":+1:"));
        assert!(!valid_emoji(""));
        assert!(!valid_emoji("a b"));
        assert!(!valid_emoji("\u{7}"));
        assert!(!valid_emoji(&"x".repeat(MAX_EMOJI_BYTES + 1)));
    }

    #[test]
    fn events_are_not_content() {
        for k in [EDIT, REACTION, PIN, "void"] {
            assert!(is_event(k));
        }
        for k in ["text", "image", "custom", "recalled"] {
            assert!(!is_event(k));
        }
    }
}
