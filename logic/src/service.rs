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

#[tonic::async_trait]
impl LogicRpc for LogicService {
    async fn authenticate(&self, req: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        let reply = match self.logic.authenticate(&req.into_inner().token).await {
            Ok(c) => AuthReply { ok: true, user: c.sub, session: c.sid, device: c.dev, ..Default::default() },
            Err(e) => AuthReply { ok: false, code: e.code.into(), message: e.message, ..Default::default() },
        };
        Ok(Response::new(reply))
    }

    async fn connected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        let c = req.into_inner();
        ops::presence::connected(&self.logic, &c.user, conn_ref(&c))
            .await
            .map_err(|e| Status::unavailable(e.message))?;
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        let c = req.into_inner();
        ops::presence::disconnected(&self.logic, &c.user, &conn_ref(&c))
            .await
            .map_err(|e| Status::unavailable(e.message))?;
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, req: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        let req = req.into_inner();
        let conn = req.conn.ok_or_else(|| Status::invalid_argument("missing conn"))?;
        inc(&self.logic.metrics.requests);
        let caller =
            Caller { user: conn.user, device: conn.device, gateway: conn.gateway, conn_id: conn.conn_id, ip: req.ip };
        self.logic.metrics.inflight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (frame, close) = ops::handle(&self.logic, &caller, &req.frame).await;
        self.logic.metrics.inflight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let frame = serde_json::to_vec(&frame).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ClientReply { frame, close }))
    }
}
