//! The `Logic` gRPC service the gateways call.

use std::sync::Arc;

use switchboard_proto::internal::logic_server::{Logic as LogicRpc, LogicServer};
use switchboard_proto::internal::{AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Empty};
use switchboard_storage::ConnRef;
use tonic::{Request, Response, Status};

use crate::auth::now_secs;
use crate::error::ApiError;
use crate::metrics::inc;
use crate::ops::{self, Caller};
use crate::Logic;

/// gRPC front of one logic instance.
#[derive(Clone)]
pub struct LogicService {
    logic: Arc<Logic>,
}

impl LogicService {
    pub fn new(logic: Arc<Logic>) -> Self {
        Self { logic }
    }

    pub fn into_server(self) -> LogicServer<Self> {
        LogicServer::new(self)
    }
}

fn conn_ref(c: &ConnEvent) -> ConnRef {
    ConnRef { gateway: c.gateway.clone(), conn_id: c.conn_id, device: c.device.clone(), session: c.session.clone() }
}

impl Logic {
    /// Checks an access token and that its session is still signed in.
    pub async fn authenticate(&self, token: &str) -> Result<crate::auth::Claims, ApiError> {
        let claims = self.key.verify(token, now_secs())?;
        // Tokens minted by `switchboard token` (operators, load tests) have
        // no stored session: holding the deployment key is the authority.
        let minted = claims.sid.starts_with(crate::auth::MINTED_SESSION_PREFIX);
        if !minted {
            match self.stores.accounts.get_session(&claims.sid).await? {
                Some(s) if !s.revoked && s.user == claims.sub => {}
                _ => return Err(ApiError::new("bad_token", "session signed out")),
            }
        }
        match self.stores.accounts.get_user(&claims.sub).await? {
            Some(u) if u.banned => Err(ApiError::new("bad_token", "account banned")),
            Some(_) => Ok(claims),
            None if minted => Ok(claims),
            None => Err(ApiError::new("bad_token", "no such account")),
        }
    }
}

impl Logic {
    /// The reply to an `auth` op's token, as the gateway needs it.
    pub async fn auth_reply(&self, token: &str) -> AuthReply {
        let checked = match self.authenticate(token).await {
            Ok(c) => self.room_for(&c.sub, &c.dev).await.map(|()| c),
            Err(e) => Err(e),
        };
        match checked {
            Ok(c) => AuthReply { ok: true, user: c.sub, session: c.sid, device: c.dev, ..Default::default() },
            Err(e) => AuthReply { ok: false, code: e.code.into(), message: e.message, ..Default::default() },
        }
    }

    /// `too_many_connections` when `user` holds `max_connections_per_user` connections of
    /// devices other than `device` (one of `device` is replaced by the new one, not added).
    /// Checked before the route is added, so connections authenticating at the same moment may
    /// pass it together.
    async fn room_for(&self, user: &str, device: &str) -> Result<(), ApiError> {
        let cap = self.config.max_connections_per_user;
        let held = self.stores.routes.get(user).await?.iter().filter(|c| c.device != device).count();
        if held >= cap {
            return Err(ApiError::new("too_many_connections", format!("at most {cap} connections per user")));
        }
        Ok(())
    }

    /// A connection finished `auth`: route it, kick an older one of the same device, announce.
    pub async fn conn_opened(&self, c: &ConnEvent) -> Result<(), ApiError> {
        ops::presence::connected(self, &c.user, conn_ref(c)).await
    }

    /// An authenticated connection closed.
    pub async fn conn_closed(&self, c: &ConnEvent) -> Result<(), ApiError> {
        ops::presence::disconnected(self, &c.user, &conn_ref(c)).await
    }

    /// Runs one client request relayed by a gateway (whatever link carried it).
    pub async fn handle_request(&self, req: ClientRequest) -> Result<ClientReply, ApiError> {
        let conn = req.conn.ok_or_else(|| ApiError::bad_request("missing conn"))?;
        inc(&self.metrics.requests);
        if let Err(e) = self.confirm_session(&conn.user, &conn.session).await {
            let frame =
                serde_json::to_vec(&e.to_frame(req.rid)).map_err(|e| ApiError::new("internal", e.to_string()))?;
            return Ok(ClientReply { frame: frame.into(), close: e.code == "bad_token" });
        }
        let caller =
            Caller { user: conn.user, device: conn.device, gateway: conn.gateway, conn_id: conn.conn_id, ip: req.ip };
        self.metrics.inflight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (frame, close) = ops::handle(self, &caller, &req.op, req.rid, &req.frame).await;
        self.metrics.inflight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let frame = serde_json::to_vec(&frame).map_err(|e| ApiError::new("internal", e.to_string()))?;
        Ok(ClientReply { frame: frame.into(), close })
    }
}

#[tonic::async_trait]
impl LogicRpc for LogicService {
    async fn authenticate(&self, req: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        Ok(Response::new(self.logic.auth_reply(&req.into_inner().token).await))
    }

    async fn connected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.logic.conn_opened(&req.into_inner()).await.map_err(|e| Status::unavailable(e.message))?;
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.logic.conn_closed(&req.into_inner()).await.map_err(|e| Status::unavailable(e.message))?;
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, req: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        match self.logic.handle_request(req.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) if e.code == "bad_request" => Err(Status::invalid_argument(e.message)),
            Err(e) => Err(Status::internal(e.message)),
        }
    }
}
