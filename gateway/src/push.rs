//! The tonic `Gateway` service: routes `Push` deliveries to the owning shards.

use std::collections::HashMap;

use switchboard_proto::internal::{gateway_server::Gateway as GatewayService, Delivery, PushReply, PushRequest};
use tonic::{Request, Response, Status};

use crate::bridge::{ShardLink, ShardMsg};
use crate::connid::ConnId;

/// `Push` implementation over the shards' mailboxes.
pub(crate) struct PushService {
    pub shards: Vec<ShardLink>,
}

#[tonic::async_trait]
impl GatewayService for PushService {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushReply>, Status> {
        let deliveries = request.into_inner().deliveries;
        let mut gone = Vec::new();
        // Group by shard, keeping each shard's deliveries in request order.
        let mut by_shard: HashMap<usize, Vec<Delivery>> = HashMap::new();
        for d in deliveries {
            let shard = ConnId::decode(d.conn_id).shard;
            if shard < self.shards.len() {
                by_shard.entry(shard).or_default().push(d);
            } else {
                gone.push(d.conn_id);
            }
        }
        let mut waits = Vec::with_capacity(by_shard.len());
        for (shard, deliveries) in by_shard {
            let ids: Vec<u64> = deliveries.iter().map(|d| d.conn_id).collect();
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.shards[shard].send(ShardMsg::Push { deliveries, reply: tx }) {
                waits.push((ids, rx));
            } else {
                gone.extend(ids);
            }
        }
        for (ids, rx) in waits {
            match rx.await {
                Ok(g) => gone.extend(g),
                // the shard exited before handling the push: all of them are gone
                Err(_) => gone.extend(ids),
            }
        }
        gone.sort_unstable();
        gone.dedup();
        Ok(Response::new(PushReply { gone }))
    }
}
