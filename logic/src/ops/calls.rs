//! call.offer / answer / ice / hangup: WebRTC signaling relayed to the
//! callee's devices. The 30 s ring timeout runs on the caller's gateway
//! (its timing wheel), which sends the timeout hangup through here.

use serde::Deserialize;
use serde_json::{Map, Value};
use switchboard_storage::FriendState;

use super::{require_user, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

/// Largest SDP or ICE candidate relayed.
const MAX_SIGNAL: usize = 16 * 1024;

#[derive(Deserialize)]
pub struct Signal {
    to: String,
    call_id: String,
    sdp: Option<String>,
    candidate: Option<String>,
    reason: Option<String>,
}

pub async fn relay(logic: &Logic, caller: &Caller, op: &str, req: Signal) -> Result<Fields, ApiError> {
    if req.call_id.is_empty() || req.call_id.chars().count() > 64 {
        return Err(ApiError::bad_request("call_id must be 1-64 chars"));
    }
    let needs = match op {
        "call.offer" | "call.answer" => Some(("sdp", &req.sdp)),
        "call.ice" => Some(("candidate", &req.candidate)),
        _ => None,
    };
    if let Some((name, value)) = needs {
        match value {
            Some(v) if !v.is_empty() && v.len() <= MAX_SIGNAL => {}
            _ => return Err(ApiError::bad_request(format!("{op} needs `{name}` (1-{MAX_SIGNAL} bytes)"))),
        }
    }
    if logic.stores.social.friend_state(&caller.user, &req.to).await? != Some(FriendState::Friends) {
        require_user(logic, &req.to).await?;
        return Err(ApiError::new("not_friends", format!("`{}` is not your friend", req.to)));
    }
    let mut push = Map::new();
    push.insert("op".into(), op.into());
    push.insert("from".into(), caller.user.clone().into());
    push.insert("call_id".into(), req.call_id.into());
    for (k, v) in [("sdp", req.sdp), ("candidate", req.candidate), ("reason", req.reason)] {
        if let Some(v) = v {
            push.insert(k.into(), v.into());
        }
    }
    let push = Value::Object(push);
    logic.pusher.to_user(&req.to, &push, None, None).await;
    if op == "call.answer" || op == "call.hangup" {
        // the caller's other devices stop ringing / showing the call
        let mut mine = push.clone();
        mine["to"] = req.to.into();
        logic.pusher.to_user(&caller.user, &mine, None, Some((&caller.gateway, caller.conn_id))).await;
    }
    Ok(Fields::new())
}
