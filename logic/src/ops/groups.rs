//! group.create / join / add / set / leave / members / list.

use serde::Deserialize;
use serde_json::json;
use switchboard_storage::{now_ms, Group, Role};

use super::{fields, require_user, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

const MAX_NAME: usize = 64;

/// A fresh group id: 12 chars of `[A-Za-z0-9]`.
fn new_group_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..12).map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char).collect()
}

/// A syntactically valid group id (`[A-Za-z0-9]{6,24}`).
pub fn valid_group_id(id: &str) -> bool {
    (6..=24).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The group, or `no_such_group`.
pub async fn require_group(logic: &Logic, id: &str) -> Result<Group, ApiError> {
    let none = || ApiError::new("no_such_group", format!("no group `{id}`"));
    if !valid_group_id(id) {
        return Err(none());
    }
    logic.stores.groups.group(id).await?.ok_or_else(none)
}

/// The caller's role in the group, or `not_member` (`no_such_group` first).
pub async fn require_role(logic: &Logic, id: &str, user: &str) -> Result<Role, ApiError> {
    require_group(logic, id).await?;
    logic.stores.groups.role(id, user).await?.ok_or_else(|| ApiError::new("not_member", format!("not in group `{id}`")))
}

#[derive(Deserialize)]
pub struct Create {
    name: String,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    invite_only: bool,
}

pub async fn create(logic: &Logic, caller: &Caller, req: Create) -> Result<Fields, ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(ApiError::bad_request(format!("name: 1-{MAX_NAME} chars")));
    }
    let mut members: Vec<String> = req.members.into_iter().filter(|m| *m != caller.user).collect();
    members.sort();
    members.dedup();
    if members.len() + 1 > logic.config.max_group_members {
        return Err(ApiError::bad_request(format!("a group has at most {} members", logic.config.max_group_members)));
    }
    for m in &members {
        require_user(logic, m).await?;
    }
    // Consent: the creator adds friends only; anyone else joins by the group id themselves.
    for m in &members {
        if !super::messages::are_friends(logic, &caller.user, m).await? {
            return Err(ApiError::new("not_friends", format!("`{m}` is not your friend: only friends can be added")));
        }
    }
    let group = loop {
        let g = Group {
            id: new_group_id(),
            name: name.to_owned(),
            owner: caller.user.clone(),
            created_ms: now_ms(),
            invite_only: req.invite_only,
        };
        if logic.stores.groups.create_group(&g, &members).await? {
            break g;
        }
    };
    let conv = format!("g:{}", group.id);
    let push = json!({"op": "group.joined", "group": group.id, "conv": conv});
    for m in &members {
        logic.pusher.to_user(m, &push, None, None).await;
    }
    logic.pusher.to_user(&caller.user, &push, None, Some((&caller.gateway, caller.conn_id))).await;
    Ok(fields(json!({"group": group.id, "conv": conv})))
}

#[derive(Deserialize)]
pub struct Target {
    group: String,
}

pub async fn join(logic: &Logic, caller: &Caller, req: Target) -> Result<Fields, ApiError> {
    let group = require_group(logic, &req.group).await?;
    let conv = format!("g:{}", req.group);
    if logic.stores.groups.role(&req.group, &caller.user).await?.is_some() {
        return Ok(fields(json!({ "conv": conv })));
    }
    if group.invite_only {
        return Err(ApiError::new(
            "forbidden",
            format!("group `{}` is invite-only: its owner or an admin adds members", req.group),
        ));
    }
    add_member(logic, &req.group, &caller.user, Some(caller)).await?;
    Ok(fields(json!({ "conv": conv })))
}

/// Adds `user` as a member if the group has room; tells their devices (except the caller's
/// own connection, which gets the reply).
async fn add_member(logic: &Logic, group: &str, user: &str, caller: Option<&Caller>) -> Result<(), ApiError> {
    let count = logic.stores.groups.members(group).await?.len();
    if count >= logic.config.max_group_members {
        return Err(ApiError::bad_request("the group is full"));
    }
    if logic.stores.groups.add_member(group, user, Role::Member).await? {
        let push = json!({"op": "group.joined", "group": group, "conv": format!("g:{group}")});
        let except = caller.map(|c| (c.gateway.as_str(), c.conn_id));
        logic.pusher.to_user(user, &push, None, except).await;
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct Add {
    group: String,
    user: String,
}

/// `group.add {group, user}`: a member adds a friend of theirs (in an invite-only group, only
/// the owner or an admin may).
pub async fn add(logic: &Logic, caller: &Caller, req: Add) -> Result<Fields, ApiError> {
    let role = require_role(logic, &req.group, &caller.user).await?;
    let group = require_group(logic, &req.group).await?;
    if group.invite_only && role == Role::Member {
        return Err(ApiError::new("forbidden", "only the owner or an admin adds members to an invite-only group"));
    }
    require_user(logic, &req.user).await?;
    if !super::messages::are_friends(logic, &caller.user, &req.user).await? {
        return Err(ApiError::new(
            "not_friends",
            format!("`{}` is not your friend: only friends can be added", req.user),
        ));
    }
    add_member(logic, &req.group, &req.user, None).await?;
    Ok(fields(json!({"conv": format!("g:{}", req.group)})))
}

#[derive(Deserialize)]
pub struct Set {
    group: String,
    invite_only: bool,
}

/// `group.set {group, invite_only}`: the owner or an admin changes the group's settings.
pub async fn set(logic: &Logic, caller: &Caller, req: Set) -> Result<Fields, ApiError> {
    if require_role(logic, &req.group, &caller.user).await? == Role::Member {
        return Err(ApiError::new("forbidden", "only the owner or an admin changes a group's settings"));
    }
    logic.stores.groups.set_invite_only(&req.group, req.invite_only).await?;
    Ok(Fields::new())
}

pub async fn leave(logic: &Logic, caller: &Caller, req: Target) -> Result<Fields, ApiError> {
    let role = require_role(logic, &req.group, &caller.user).await?;
    let groups = &logic.stores.groups;
    groups.remove_member(&req.group, &caller.user).await?;
    if role == Role::Owner {
        // Ownership passes to the first admin, else the first member.
        let rest = groups.members(&req.group).await?;
        let heir = rest.iter().find(|(_, r)| *r == Role::Admin).or_else(|| rest.first());
        if let Some((user, _)) = heir {
            groups.set_role(&req.group, user, Role::Owner).await?;
        }
    }
    Ok(Fields::new())
}

pub async fn members(logic: &Logic, caller: &Caller, req: Target) -> Result<Fields, ApiError> {
    require_role(logic, &req.group, &caller.user).await?;
    let list: Vec<_> = logic
        .stores
        .groups
        .members(&req.group)
        .await?
        .into_iter()
        .map(|(user, role)| json!({"user": user, "role": role.as_str()}))
        .collect();
    Ok(fields(json!({ "members": list })))
}

pub async fn list(logic: &Logic, caller: &Caller) -> Result<Fields, ApiError> {
    let list: Vec<_> = logic
        .stores
        .groups
        .user_groups(&caller.user)
        .await?
        .into_iter()
        .map(|(g, role)| json!({"group": g.id, "name": g.name, "role": role.as_str(), "invite_only": g.invite_only}))
        .collect();
    Ok(fields(json!({ "groups": list })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids() {
        for _ in 0..100 {
            assert!(valid_group_id(&new_group_id()));
        }
        assert!(!valid_group_id("abc"));
        assert!(!valid_group_id("abc-def-ghi"));
        assert!(!valid_group_id(&"a".repeat(25)));
    }
}
