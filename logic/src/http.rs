//! The HTTP API: accounts (register, login, refresh, logout), gateway
//! discovery, health and metrics.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use switchboard_storage::{now_ms, Session, User};

use crate::auth::{hash_password, now_secs, random_token, refresh_hash, valid_username, verify_password, Claims};
use crate::error::ApiError;
use crate::metrics::inc;
use crate::{GatewayInfo, Logic};

/// Extra metrics rendered on `/metrics` (e.g. a co-located gateway's).
pub type MetricsHook = Arc<dyn Fn(&mut String) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) logic: Arc<Logic>,
    extra_metrics: Vec<MetricsHook>,
}

/// The HTTP API router, client and operator endpoints together on one listener. Requests need
/// a `ConnectInfo<SocketAddr>` extension (the client's address): auth endpoints are rate-limited
/// per client IP.
pub fn router(logic: Arc<Logic>, extra_metrics: Vec<MetricsHook>) -> Router {
    finish(client_routes().merge(operator_routes()), Http { logic, extra_metrics })
}

/// The client endpoints (with `/healthz`) and the operator endpoints (`/metrics`,
/// `/v1/admin/*`, and `/healthz` too), to serve on two listeners: the second on a private
/// address.
pub fn split_routers(logic: Arc<Logic>, extra_metrics: Vec<MetricsHook>) -> (Router, Router) {
    let h = Http { logic, extra_metrics };
    (finish(client_routes(), h.clone()), finish(operator_routes().route("/healthz", get(healthz)), h))
}

fn client_routes() -> Router<Http> {
    Router::new()
        .route("/v1/auth/register", post(register))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/gateways", get(gateways))
        // The upload handler bounds the body itself (`max_file_bytes`), with the protocol's codes.
        .route("/v1/files", post(crate::files::upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/v1/files/{id}", get(crate::files::download))
        .route("/healthz", get(healthz))
        .merge(crate::web::routes())
}

fn operator_routes() -> Router<Http> {
    Router::new()
        .route("/v1/admin/ban", post(ban))
        .route("/v1/admin/unban", post(unban))
        .route("/metrics", get(metrics))
}

async fn healthz() -> &'static str {
    "ok\n"
}

fn finish(routes: Router<Http>, h: Http) -> Router {
    routes.fallback(|| async { ApiError::new("not_found", "no such endpoint") }).with_state(h)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = ms.into();
        }
        (status, Json(body)).into_response()
    }
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
}

#[derive(Deserialize)]
struct Register {
    username: String,
    password: String,
    nickname: Option<String>,
}

/// The common start of the auth endpoints: count, rate-limit per client
/// IP, parse the JSON body.
fn auth_request<T: for<'de> Deserialize<'de>>(
    h: &Http,
    peer: std::net::SocketAddr,
    bytes: &Bytes,
) -> Result<T, ApiError> {
    inc(&h.logic.metrics.http_requests);
    h.logic.limit_auth(&peer.ip().to_string())?;
    body(bytes)
}

fn valid_password(p: &str) -> bool {
    (8..=128).contains(&p.chars().count())
}

async fn register(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: Register = auth_request(&h, peer, &bytes)?;
    if !valid_username(&req.username) {
        return Err(ApiError::bad_request("username: 3-32 chars of a-z 0-9 _ . -"));
    }
    if !valid_password(&req.password) {
        return Err(ApiError::bad_request("password: 8-128 chars"));
    }
    let nickname = req.nickname.unwrap_or_else(|| req.username.clone());
    if nickname.chars().count() > 64 {
        return Err(ApiError::bad_request("nickname: at most 64 chars"));
    }
    let cost = h.logic.config.hash_cost;
    let password = req.password;
    let password_hash = h.logic.hash_slot(move || hash_password(&password, cost)).await??;
    let user = User { username: req.username.clone(), nickname, password_hash, created_ms: now_ms(), banned: false };
    if !h.logic.stores.accounts.create_user(&user).await? {
        return Err(ApiError::new("user_exists", format!("`{}` is taken", req.username)));
    }
    Ok((StatusCode::CREATED, Json(json!({"username": req.username}))).into_response())
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
    device: Option<String>,
}

/// Issues an access token and a refresh token for a session.
fn issue(logic: &Logic, session: &Session) -> (String, serde_json::Value) {
    let now = now_secs();
    let ttl = logic.config.access_ttl.as_secs();
    let claims = Claims {
        sub: session.user.clone(),
        sid: session.id.clone(),
        dev: session.device.clone(),
        iat: now,
        exp: now + ttl,
        typ: "access".into(),
    };
    let refresh = random_token(32);
    let body = json!({"access_token": logic.key.sign(&claims), "refresh_token": refresh, "expires_in": ttl});
    (refresh, body)
}

async fn login(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: Login = auth_request(&h, peer, &bytes)?;
    let bad = || ApiError::new("bad_credentials", "wrong username or password");
    let device = req.device.unwrap_or_else(|| format!("dev-{}", random_token(6)));
    if device.is_empty() || device.chars().count() > 64 {
        return Err(ApiError::bad_request("device: 1-64 chars"));
    }
    h.logic.limit_login(&req.username)?;
    let user = h.logic.stores.accounts.get_user(&req.username).await?.ok_or_else(bad)?;
    let (password, phc) = (req.password, user.password_hash);
    let ok = h.logic.hash_slot(move || verify_password(&password, &phc)).await?;
    if !ok {
        return Err(bad());
    }
    if user.banned {
        return Err(ApiError::forbidden("this account is banned"));
    }
    let mut session = Session {
        id: random_token(12),
        user: user.username,
        device,
        refresh_hash: String::new(),
        revoked: false,
        created_ms: now_ms(),
        refresh_expires_ms: now_ms() + h.logic.config.refresh_ttl.as_millis() as u64,
    };
    let (refresh, reply) = issue(&h.logic, &session);
    session.refresh_hash = refresh_hash(&refresh);
    h.logic.stores.accounts.put_session(&session).await?;
    Ok(Json(reply).into_response())
}

#[derive(Deserialize)]
struct Refresh {
    refresh_token: String,
}

async fn refresh(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: Refresh = auth_request(&h, peer, &bytes)?;
    let bad = |m: &str| ApiError::new("bad_token", m.to_string());
    let hash = refresh_hash(&req.refresh_token);
    let accounts = &h.logic.stores.accounts;
    let Some(session) = accounts.session_by_refresh(&hash).await? else {
        return Err(bad("unknown refresh token"));
    };
    if session.revoked {
        return Err(bad("session signed out"));
    }
    if accounts.get_user(&session.user).await?.is_none_or(|u| u.banned) {
        return Err(bad("account banned"));
    }
    if session.refresh_hash != hash {
        // An already-rotated token came back: it was stolen or replayed.
        // Revoke the whole session so neither holder can go on.
        tracing::warn!(user = %session.user, session = %session.id, "refresh token reuse; revoking session");
        accounts.revoke_session(&session.id).await?;
        kick(&h.logic, &session.user, Some(&session.id), "session revoked").await?;
        return Err(bad("refresh token reused; session revoked"));
    }
    if session.refresh_expires_ms <= now_ms() {
        return Err(bad("refresh token expired"));
    }
    let (new_refresh, reply) = issue(&h.logic, &session);
    let expires = now_ms() + h.logic.config.refresh_ttl.as_millis() as u64;
    if !accounts.rotate_refresh(&session.id, &hash, &refresh_hash(&new_refresh), expires).await? {
        return Err(bad("refresh token already used"));
    }
    Ok(Json(reply).into_response())
}

async fn logout(State(h): State<Http>, headers: HeaderMap) -> Result<Response, ApiError> {
    inc(&h.logic.metrics.http_requests);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new("unauthorized", "missing Bearer token"))?;
    let claims = h.logic.authenticate(token).await?;
    // A device that signed out gets no more notifications (first: a retry of a failed sign-out
    // finds its session revoked).
    h.logic.stores.accounts.remove_push_token(&claims.sub, &claims.dev).await?;
    h.logic.stores.accounts.revoke_session(&claims.sid).await?;
    // The session's open sockets end with it.
    kick(&h.logic, &claims.sub, Some(&claims.sid), "signed out").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sends `kick` with `reason` to, and closes, every connection of `user` (of session `sid` only,
/// when given).
async fn kick(logic: &Logic, user: &str, sid: Option<&str>, reason: &str) -> Result<(), ApiError> {
    let frame = Bytes::from(serde_json::to_vec(&json!({"op": "kick", "reason": reason})).expect("JSON serializes"));
    for conn in logic.stores.routes.get(user).await?.into_iter().filter(|c| sid.is_none_or(|s| c.session == s)) {
        logic.pusher.to_conn(user, &conn, frame.clone(), None, true).await;
    }
    Ok(())
}

/// Checks the admin Bearer token (constant-time).
fn require_admin(logic: &Logic, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &logic.config.admin_token else {
        return Err(ApiError::forbidden("the admin API is disabled (no admin token configured)"));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new("unauthorized", "missing Bearer token"))?;
    let same = given.len() == expected.len()
        && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return Err(ApiError::new("unauthorized", "wrong admin token"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct BanTarget {
    username: String,
}

async fn set_ban(h: &Http, headers: &HeaderMap, bytes: &Bytes, banned: bool) -> Result<Response, ApiError> {
    inc(&h.logic.metrics.http_requests);
    require_admin(&h.logic, headers)?;
    let req: BanTarget = body(bytes)?;
    if !h.logic.stores.accounts.set_banned(&req.username, banned).await? {
        return Err(ApiError::new("no_such_user", format!("no user `{}`", req.username)));
    }
    if banned {
        tracing::info!(user = %req.username, "banned; closing connections");
        kick(&h.logic, &req.username, None, "account banned").await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn ban(State(h): State<Http>, headers: HeaderMap, bytes: Bytes) -> Result<Response, ApiError> {
    set_ban(&h, &headers, &bytes, true).await
}

async fn unban(State(h): State<Http>, headers: HeaderMap, bytes: Bytes) -> Result<Response, ApiError> {
    set_ban(&h, &headers, &bytes, false).await
}

async fn gateways(State(h): State<Http>) -> Result<Response, ApiError> {
    inc(&h.logic.metrics.http_requests);
    let Some(registry) = &h.logic.stores.registry else {
        return Ok(Json(json!({"gateways": h.logic.config.gateways})).into_response());
    };
    let live = registry.members("gateway").await?;
    let ranked = crate::balance::p2c_order(live, &mut rand::thread_rng());
    let list: Vec<GatewayInfo> =
        ranked.into_iter().map(|m| GatewayInfo { ws: m.ws, tcp: Some(m.tcp).filter(|t| !t.is_empty()) }).collect();
    Ok(Json(json!({"gateways": list})).into_response())
}

async fn metrics(State(h): State<Http>) -> Response {
    let mut out = String::new();
    h.logic.render_metrics(&mut out);
    for hook in &h.extra_metrics {
        hook(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
