//! The `Logic` gRPC service the gateways call.

use std::sync::Arc;

use switchboard_proto::cluster_auth;
use switchboard_proto::internal::logic_server::{Logic as LogicRpc, LogicServer};
use switchboard_proto::internal::{
    AuthConnect, AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Empty, LinkUp, PushAnswer,
};
use switchboard_storage::ConnRef;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::now_secs;
use crate::error::ApiError;
use crate::link::{self, Closing, DownStream, LinkLimits};
use crate::link_push::{self, PushStream};
use crate::metrics::inc;
use crate::ops::{self, Caller};
use crate::Logic;

/// gRPC front of one logic instance.
#[derive(Clone)]
pub struct LogicService {
    logic: Arc<Logic>,
    link: LinkLimits,
    closing: Closing,
}

impl LogicService {
    /// The service; its links end when `closing` turns `true` (see [`crate::link`]).
    pub fn new(logic: Arc<Logic>, closing: Closing) -> Self {
        Self { logic, link: LinkLimits::default(), closing }
    }

    /// Bounds of each gateway's `Link` stream.
    pub fn with_link_limits(mut self, link: LinkLimits) -> Self {
        self.link = link;
        self
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
        let acks_only = !req.acks.is_empty() && req.frame.is_empty();
        for held in req.acks {
            // The gateway answered these `ack.ok` already: a refusal has nobody to reach.
            if let Err(e) = ops::held_ack(self, &caller, held).await {
                tracing::debug!(user = %caller.user, code = e.code, error = %e.message, "held ack refused");
            }
        }
        if acks_only {
            return Ok(ClientReply::default());
        }
        self.metrics.inflight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (frame, close) = ops::handle(self, &caller, &req.op, req.rid, &req.frame).await;
        self.metrics.inflight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Ok(ClientReply { frame: frame.into(), close })
    }
}

/// What the internal calls answer, as gRPC statuses: the unary RPCs and the calls of a link
/// ([`crate::link`]) share them.
impl Logic {
    /// `auth` and, when the token is good, `Connected` for the connection: by the time the
    /// client reads `auth.ok`, pushes already find it. A failed registration is `unavailable`
    /// (the client retries).
    pub async fn auth_connect(&self, a: &AuthConnect) -> Result<AuthReply, Status> {
        let reply = self.auth_reply(&a.token).await;
        if reply.ok {
            let ev = ConnEvent {
                gateway: a.gateway.clone(),
                conn_id: a.conn_id,
                user: reply.user.clone(),
                session: reply.session.clone(),
                device: reply.device.clone(),
            };
            self.conn_opened(&ev)
                .await
                .map_err(|e| Status::unavailable(format!("registering the connection: {}", e.message)))?;
        }
        Ok(reply)
    }

    pub(crate) async fn rpc_connected(&self, ev: &ConnEvent) -> Result<Empty, Status> {
        self.conn_opened(ev).await.map_err(|e| Status::unavailable(e.message))?;
        Ok(Empty {})
    }

    pub(crate) async fn rpc_disconnected(&self, ev: &ConnEvent) -> Result<Empty, Status> {
        self.conn_closed(ev).await.map_err(|e| Status::unavailable(e.message))?;
        Ok(Empty {})
    }

    /// Connections that closed, one after the other; every one is tried, the first failure is
    /// reported.
    pub async fn rpc_disconnected_many(&self, evs: &[ConnEvent]) -> Result<Empty, Status> {
        let mut first = None;
        for ev in evs {
            if let Err(e) = self.conn_closed(ev).await {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(Status::unavailable(e.message)),
            None => Ok(Empty {}),
        }
    }

    pub(crate) async fn rpc_handle(&self, req: ClientRequest) -> Result<ClientReply, Status> {
        match self.handle_request(req).await {
            Ok(r) => Ok(r),
            Err(e) if e.code == "bad_request" => Err(Status::invalid_argument(e.message)),
            Err(e) => Err(Status::internal(e.message)),
        }
    }
}

#[tonic::async_trait]
impl LogicRpc for LogicService {
    async fn authenticate(&self, req: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        Ok(Response::new(self.logic.auth_reply(&req.into_inner().token).await))
    }

    async fn connected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.logic.rpc_connected(&req.into_inner()).await.map(Response::new)
    }

    async fn disconnected(&self, req: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.logic.rpc_disconnected(&req.into_inner()).await.map(Response::new)
    }

    async fn handle(&self, req: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        self.logic.rpc_handle(req.into_inner()).await.map(Response::new)
    }

    type LinkStream = DownStream;

    async fn link(&self, req: Request<Streaming<LinkUp>>) -> Result<Response<DownStream>, Status> {
        Ok(Response::new(link::serve(self.logic.clone(), req.into_inner(), self.link, self.closing.clone())))
    }

    type PushesStream = PushStream;

    async fn pushes(&self, req: Request<Streaming<PushAnswer>>) -> Result<Response<PushStream>, Status> {
        let gateway = req.metadata().get(cluster_auth::GATEWAY_HEADER).and_then(|v| v.to_str().ok());
        let gateway = gateway
            .filter(|g| !g.is_empty())
            .ok_or_else(|| Status::invalid_argument("x-sb-gateway must name the gateway's push address"))?
            .to_owned();
        let links = self.logic.pusher.links().clone();
        Ok(Response::new(link_push::serve(links, req.into_inner(), gateway, self.closing.clone())))
    }
}
