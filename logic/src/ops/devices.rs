//! Devices' push tokens (`push.register`, `push.unregister`) and per-conversation mutes
//! (`mute`, `unmute`): what the offline notifications (see [`crate::notify`]) send to, and
//! whom they spare.

use serde::Deserialize;
use serde_json::json;
use switchboard_storage::{now_ms, PushToken};

use super::messages::require_member;
use super::{fields, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

/// Push services a token may belong to.
const PLATFORMS: [&str; 4] = ["apns", "fcm", "webpush", "other"];
/// Longest push token, in bytes (a Web Push subscription as JSON fits).
pub const MAX_TOKEN_BYTES: usize = 4096;

#[derive(Deserialize)]
pub struct Register {
    platform: String,
    token: String,
}

/// Registers the calling device's push token (replacing its earlier one).
pub async fn register(logic: &Logic, caller: &Caller, req: Register) -> Result<Fields, ApiError> {
    if !PLATFORMS.contains(&req.platform.as_str()) {
        return Err(ApiError::bad_request(format!("platform is one of {}", PLATFORMS.join(", "))));
    }
    if req.token.is_empty() || req.token.len() > MAX_TOKEN_BYTES {
        return Err(ApiError::bad_request(format!("a token is 1-{MAX_TOKEN_BYTES} bytes")));
    }
    let token = PushToken {
        user: caller.user.clone(),
        device: caller.device.clone(),
        platform: req.platform,
        token: req.token,
        updated_ms: now_ms(),
    };
    // A user keeps at most `max_push_tokens` (each up to MAX_TOKEN_BYTES): a new device's token
    // replaces the least recently registered ones beyond that.
    let accounts = &logic.stores.accounts;
    let mut held = accounts.push_tokens(&caller.user).await?;
    held.retain(|t| t.device != caller.device);
    held.sort_by_key(|t| t.updated_ms);
    let over = (held.len() + 1).saturating_sub(logic.config.max_push_tokens);
    for old in held.iter().take(over) {
        accounts.remove_push_token(&old.user, &old.device).await?;
    }
    accounts.put_push_token(&token).await?;
    Ok(Fields::new())
}

/// Removes the calling device's push token.
pub async fn unregister(logic: &Logic, caller: &Caller) -> Result<Fields, ApiError> {
    let removed = logic.stores.accounts.remove_push_token(&caller.user, &caller.device).await?;
    Ok(fields(json!({"removed": removed})))
}

#[derive(Deserialize)]
pub struct Mute {
    conv: String,
    /// Until when (ms); absent: until unmuted.
    until: Option<u64>,
}

pub async fn mute(logic: &Logic, caller: &Caller, req: Mute) -> Result<Fields, ApiError> {
    require_member(logic, &req.conv, &caller.user).await?;
    if req.until.is_some_and(|u| u <= now_ms()) {
        return Err(ApiError::bad_request("`until` must be in the future"));
    }
    logic.stores.accounts.set_mute(&caller.user, &req.conv, Some(req.until.unwrap_or(u64::MAX))).await?;
    Ok(Fields::new())
}

#[derive(Deserialize)]
pub struct Unmute {
    conv: String,
}

pub async fn unmute(logic: &Logic, caller: &Caller, req: Unmute) -> Result<Fields, ApiError> {
    require_member(logic, &req.conv, &caller.user).await?;
    logic.stores.accounts.set_mute(&caller.user, &req.conv, None).await?;
    Ok(Fields::new())
}

/// Whether a mute that lasts until `until` (ms) still holds.
pub fn muted(until: u64) -> bool {
    until > now_ms()
}
