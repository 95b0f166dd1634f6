//! friend.request / accept / reject / delete / list, and block / unblock / block.list.

use serde::Deserialize;
use serde_json::json;
use switchboard_storage::{FriendState, RequestOutcome};

use super::{fields, require_user, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

#[derive(Deserialize)]
pub struct Request {
    to: String,
    #[serde(default)]
    note: String,
}

#[derive(Deserialize)]
pub struct From {
    from: String,
}

#[derive(Deserialize)]
pub struct Delete {
    user: String,
}

const MAX_NOTE: usize = 256;

pub async fn request(logic: &Logic, caller: &Caller, req: Request) -> Result<Fields, ApiError> {
    if req.to == caller.user {
        return Err(ApiError::bad_request("cannot befriend yourself"));
    }
    if req.note.chars().count() > MAX_NOTE {
        return Err(ApiError::bad_request(format!("note longer than {MAX_NOTE} chars")));
    }
    require_user(logic, &req.to).await?;
    // Asking again while the request is pending changes nothing and notifies nobody again.
    if let Some(FriendState::Outgoing { .. }) = logic.stores.social.friend_state(&caller.user, &req.to).await? {
        return Ok(Fields::new());
    }
    match logic.stores.social.request_friend(&caller.user, &req.to, &req.note).await? {
        RequestOutcome::AlreadyFriends => {
            Err(ApiError::new("already_friends", format!("already friends with `{}`", req.to)))
        }
        RequestOutcome::Pending => {
            let push = json!({"op": "friend.request", "from": caller.user, "note": req.note});
            logic.pusher.to_user(&req.to, &push, None, None).await;
            Ok(Fields::new())
        }
        // The caller blocks them: say so. They block the caller: the request looks sent, and
        // nothing is stored or delivered (a block is not revealed).
        RequestOutcome::Blocked if logic.stores.social.blocks(&caller.user, &req.to).await? => {
            Err(ApiError::new("forbidden", format!("you block `{}`: unblock them first", req.to)))
        }
        RequestOutcome::Blocked => Ok(Fields::new()),
        RequestOutcome::BecameFriends => {
            // The other side had asked first: this request accepts theirs.
            let push = json!({"op": "friend.accepted", "user": caller.user});
            logic.pusher.to_user(&req.to, &push, None, None).await;
            Ok(Fields::new())
        }
    }
}

pub async fn accept(logic: &Logic, caller: &Caller, req: From) -> Result<Fields, ApiError> {
    if !logic.stores.social.accept_friend(&caller.user, &req.from).await? {
        return Err(no_request(logic, &req.from).await);
    }
    let push = json!({"op": "friend.accepted", "user": caller.user});
    logic.pusher.to_user(&req.from, &push, None, None).await;
    Ok(Fields::new())
}

pub async fn reject(logic: &Logic, caller: &Caller, req: From) -> Result<Fields, ApiError> {
    if !logic.stores.social.reject_friend(&caller.user, &req.from).await? {
        return Err(no_request(logic, &req.from).await);
    }
    Ok(Fields::new())
}

async fn no_request(logic: &Logic, from: &str) -> ApiError {
    match require_user(logic, from).await {
        Err(e) => e,
        Ok(()) => ApiError::bad_request(format!("no pending friend request from `{from}`")),
    }
}

pub async fn delete(logic: &Logic, caller: &Caller, req: Delete) -> Result<Fields, ApiError> {
    if !logic.stores.social.delete_friend(&caller.user, &req.user).await? {
        require_user(logic, &req.user).await?;
        return Err(ApiError::bad_request(format!("`{}` is not a friend", req.user)));
    }
    Ok(Fields::new())
}

/// `block {user}` / `unblock {user}`: a block ends the friendship or pending request both ways
/// (nobody is told) and refuses friend requests either way until it is lifted.
pub async fn block(logic: &Logic, caller: &Caller, req: Delete, block: bool) -> Result<Fields, ApiError> {
    if req.user == caller.user {
        return Err(ApiError::bad_request("cannot block yourself"));
    }
    require_user(logic, &req.user).await?;
    logic.stores.social.set_block(&caller.user, &req.user, block).await?;
    Ok(Fields::new())
}

/// `block.list`: everyone the caller blocks, as `users`.
pub async fn blocked(logic: &Logic, caller: &Caller) -> Result<Fields, ApiError> {
    Ok(fields(json!({"users": logic.stores.social.blocked(&caller.user).await?})))
}

pub async fn list(logic: &Logic, caller: &Caller) -> Result<Fields, ApiError> {
    let mut friends = Vec::new();
    let mut pending = Vec::new();
    for (other, state) in logic.stores.social.relations(&caller.user).await? {
        match state {
            FriendState::Friends => {
                let nickname = logic.stores.accounts.get_user(&other).await?.map(|u| u.nickname).unwrap_or_default();
                let online = !logic.stores.routes.get(&other).await?.is_empty();
                friends.push(json!({"user": other, "nickname": nickname, "online": online}));
            }
            FriendState::Incoming { note } => pending.push(json!({"from": other, "note": note})),
            FriendState::Outgoing { .. } => {}
        }
    }
    Ok(fields(json!({"friends": friends, "pending": pending})))
}
