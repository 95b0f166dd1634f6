//! The gateway's side of every push: [`LocalPush`] hands deliveries to the shards that own their
//! target connections, whether they came down a link to logic (`crate::session`), over gRPC (the
//! `Gateway` service here) or from logic in the same process.

use switchboard_proto::internal::{gateway_server::Gateway as GatewayService, PushReply, PushRequest};
use switchboard_proto::internal::{Delivery, Target};
use tonic::{Request, Response, Status};

use crate::bridge::{ShardLink, ShardMsg};
use crate::connid::ConnId;

/// Delivers pushes to this gateway's connections. Cheap to clone.
#[derive(Clone)]
pub struct LocalPush {
    pub(crate) shards: Vec<ShardLink>,
}

impl LocalPush {
    /// Delivers `deliveries` in order (per connection) and returns the ids of target connections
    /// that are gone (closed, unknown, or not the named user's).
    pub async fn push(&self, deliveries: Vec<Delivery>) -> Vec<u64> {
        self.dispatch(deliveries).gone().await
    }

    /// Hands `deliveries` to their shards now (so batches dispatched one after another reach
    /// each connection in that order); the returned [`Dispatched`] resolves to the gone ids once
    /// every shard has handled its part.
    pub(crate) fn dispatch(&self, deliveries: Vec<Delivery>) -> Dispatched {
        let n = self.shards.len();
        let mut gone = Vec::new();
        let mut by_shard: Vec<Vec<Delivery>> = (0..n).map(|_| Vec::new()).collect();
        for d in deliveries {
            let shard_of = |t: &Target| ConnId::decode(t.conn_id).shard;
            let first = d.targets.first().map(shard_of);
            match first {
                None => {}
                Some(s) if d.targets.iter().all(|t| shard_of(t) == s) => {
                    if s < n {
                        by_shard[s].push(d);
                    } else {
                        gone.extend(d.targets.iter().map(|t| t.conn_id));
                    }
                }
                Some(_) => {
                    // Targets on several shards: one delivery per shard sharing the frame.
                    let mut split: Vec<Vec<Target>> = (0..n).map(|_| Vec::new()).collect();
                    for t in &d.targets {
                        match split.get_mut(shard_of(t)) {
                            Some(v) => v.push(t.clone()),
                            None => gone.push(t.conn_id),
                        }
                    }
                    for (s, targets) in split.into_iter().enumerate() {
                        if !targets.is_empty() {
                            by_shard[s].push(Delivery { targets, ..d.clone() });
                        }
                    }
                }
            }
        }
        let mut waits = Vec::with_capacity(n);
        for (shard, deliveries) in by_shard.into_iter().enumerate() {
            if deliveries.is_empty() {
                continue;
            }
            let ids: Vec<u64> = deliveries.iter().flat_map(|d| d.targets.iter().map(|t| t.conn_id)).collect();
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.shards[shard].send(ShardMsg::Push { deliveries, reply: tx }) {
                waits.push((ids, rx));
            } else {
                gone.extend(ids);
            }
        }
        Dispatched { gone, waits }
    }
}

/// A push handed to the shards: the ids already known gone, and the shards' answers to come.
pub(crate) struct Dispatched {
    gone: Vec<u64>,
    waits: Vec<(Vec<u64>, tokio::sync::oneshot::Receiver<Vec<u64>>)>,
}

impl Dispatched {
    /// The ids of target connections that are gone, sorted, each once.
    pub(crate) async fn gone(self) -> Vec<u64> {
        let Dispatched { mut gone, waits } = self;
        for (ids, rx) in waits {
            match rx.await {
                Ok(g) => gone.extend(g),
                // the shard exited before handling the push: all of them are gone
                Err(_) => gone.extend(ids),
            }
        }
        gone.sort_unstable();
        gone.dedup();
        gone
    }
}

/// `Push` over gRPC, answered by [`LocalPush`].
pub(crate) struct PushService {
    pub local: LocalPush,
}

#[tonic::async_trait]
impl GatewayService for PushService {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushReply>, Status> {
        let gone = self.local.push(request.into_inner().deliveries).await;
        Ok(Response::new(PushReply { gone }))
    }
}
