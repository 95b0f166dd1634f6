//! The in-process links of `all-in-one`: the gateway calls logic directly ([`InProcessLink`])
//! and logic pushes straight into the gateway's shards ([`InProcessPush`]). The same interfaces
//! as the gRPC links, with no loopback HTTP/2: frames stay `Bytes` from logic to the socket.

use std::sync::{Arc, OnceLock};

use switchboard_gateway::{LinkFuture, LocalPush, LogicLink};
use switchboard_logic::push::{GatewaySink, GrpcPush, PushFuture, PushTransport};
use switchboard_logic::Logic;
use switchboard_proto::internal::{AuthConnect, AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};

/// [`LogicLink`] into a [`Logic`] of this process, bound once logic is up (calls before that
/// fail as `unavailable`, which clients retry).
#[derive(Default)]
pub struct InProcessLink {
    logic: OnceLock<Arc<Logic>>,
}

impl InProcessLink {
    /// Binds the link to its logic instance (once).
    pub fn bind(&self, logic: Arc<Logic>) {
        let _ = self.logic.set(logic);
    }

    fn logic(&self) -> Result<Arc<Logic>, String> {
        self.logic.get().cloned().ok_or_else(|| "logic is starting".to_string())
    }
}

impl LogicLink for InProcessLink {
    fn auth_connect(&self, token: String, gateway: Arc<str>, conn_id: u64) -> LinkFuture<AuthReply> {
        let logic = self.logic();
        Box::pin(async move {
            let a = AuthConnect { token, gateway: gateway.to_string(), conn_id };
            logic?.auth_connect(&a).await.map_err(|s| s.message().to_string())
        })
    }

    fn connected(&self, ev: ConnEvent) -> LinkFuture<()> {
        let logic = self.logic();
        Box::pin(async move { logic?.conn_opened(&ev).await.map_err(|e| e.to_string()) })
    }

    fn disconnected_many(&self, evs: Vec<ConnEvent>) -> LinkFuture<()> {
        let logic = self.logic();
        Box::pin(
            async move { logic?.rpc_disconnected_many(&evs).await.map(|_| ()).map_err(|s| s.message().to_string()) },
        )
    }

    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply> {
        let logic = self.logic();
        Box::pin(async move { logic?.handle_request(req).await.map_err(|e| e.to_string()) })
    }
}

/// [`PushTransport`] that hands deliveries for the gateway of this process (named by its
/// advertised push address, as routes name it) straight to its shards, and reaches any other
/// gateway over gRPC.
pub struct InProcessPush {
    name: String,
    local: LocalPush,
    grpc: GrpcPush,
}

impl InProcessPush {
    pub fn new(name: String, local: LocalPush, grpc: GrpcPush) -> Self {
        Self { name, local, grpc }
    }
}

struct LocalSink(LocalPush);

impl GatewaySink for LocalSink {
    fn push(&self, deliveries: Vec<Delivery>) -> PushFuture {
        let local = self.0.clone();
        // Shards cannot fail to take a delivery (a gone connection is reported as such).
        Box::pin(async move { Ok(local.push(deliveries).await) })
    }
}

impl PushTransport for InProcessPush {
    fn connect(&self, gateway: &str) -> Result<Arc<dyn GatewaySink>, String> {
        if gateway == self.name {
            return Ok(Arc::new(LocalSink(self.local.clone())));
        }
        self.grpc.connect(gateway)
    }
}
