//! Connection lifecycle (routes, device kick, presence pushes) and the
//! ephemeral ops: `presence` and `typing`.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchboard_storage::{ConnRef, FriendState};

use super::messages::{conv_members, stranger_in};
use super::{fields, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

/// Most users one `presence` query may name.
const MAX_PRESENCE_USERS: usize = 500;

async fn friends_of(logic: &Logic, user: &str) -> Result<Vec<String>, ApiError> {
    Ok(logic
        .stores
        .social
        .relations(user)
        .await?
        .into_iter()
        .filter(|(_, s)| *s == FriendState::Friends)
        .map(|(u, _)| u)
        .collect())
}

async fn announce(logic: &Logic, user: &str, online: bool) -> Result<(), ApiError> {
    tracing::debug!(user, online, "presence change");
    let push = json!({"op": "presence", "user": user, "online": online});
    for f in friends_of(logic, user).await? {
        logic.pusher.to_user(&f, &push, None, None).await;
    }
    Ok(())
}

/// A connection finished `auth`: route it, kick an older connection of the
/// same device, and tell friends when the user comes online.
pub async fn connected(logic: &Logic, user: &str, conn: ConnRef) -> Result<(), ApiError> {
    let routes = &logic.stores.routes;
    let mut before = routes.get(user).await?;
    before.retain(|c| !(c.gateway == conn.gateway && c.conn_id == conn.conn_id));
    for old in before.iter().filter(|c| c.device == conn.device) {
        let kick = json!({"op": "kick", "reason": "signed in again on this device"});
        let bytes = serde_json::to_vec(&kick).expect("JSON values always serialize");
        logic.pusher.to_conn(user, old, bytes.into(), None, true).await;
        routes.remove(user, old).await?;
    }
    routes.add(user, conn).await?;
    if before.is_empty() {
        announce(logic, user, true).await?;
    }
    Ok(())
}

/// A connection closed: unroute it and tell friends when it was the last.
pub async fn disconnected(logic: &Logic, user: &str, conn: &ConnRef) -> Result<(), ApiError> {
    let routes = &logic.stores.routes;
    routes.remove(user, conn).await?;
    let left = routes.get(user).await?.len();
    tracing::debug!(user, conn = conn.conn_id, left, "disconnected");
    if left == 0 {
        announce(logic, user, false).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct Presence {
    users: Vec<String>,
}

/// Online state of the named users. Only friends' (and one's own) state is
/// disclosed; anyone else reads as offline.
pub async fn presence(logic: &Logic, caller: &Caller, req: Presence) -> Result<Fields, ApiError> {
    if req.users.len() > MAX_PRESENCE_USERS {
        return Err(ApiError::bad_request(format!("at most {MAX_PRESENCE_USERS} users per query")));
    }
    let friends = friends_of(logic, &caller.user).await?;
    let mut online = Map::new();
    for u in req.users {
        let visible = u == caller.user || friends.contains(&u);
        let on = visible && !logic.stores.routes.get(&u).await?.is_empty();
        online.insert(u, Value::Bool(on));
    }
    Ok(fields(json!({ "online": online })))
}

#[derive(Deserialize)]
pub struct Typing {
    conv: String,
}

/// Relays `typing` to the conversation's other members; nothing is stored.
pub async fn typing(logic: &Logic, caller: &Caller, req: Typing) -> Result<Fields, ApiError> {
    let members = conv_members(logic, &req.conv, &caller.user).await?;
    if let Some(other) = stranger_in(logic, &req.conv, &caller.user).await? {
        return Err(ApiError::new("not_friends", format!("`{other}` is not your friend")));
    }
    let push = json!({"op": "typing", "conv": req.conv, "user": caller.user});
    for m in members.iter().filter(|m| **m != caller.user) {
        logic.pusher.to_user(m, &push, None, None).await;
    }
    Ok(Fields::new())
}
