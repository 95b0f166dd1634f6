//! Registry heartbeats: every second a logic instance or gateway publishes
//! its address and load (entries expire after 3 s without one), and a
//! gateway refreshes its pool of logic instances from the registry.

use std::sync::Arc;
use std::time::Duration;

use switchboard_gateway::Gateway;
use switchboard_logic::metrics::LogicMetrics;
use switchboard_storage::redis::RedisStore;
use switchboard_storage::{Member, Registry};

use crate::Task;

const PERIOD: Duration = Duration::from_secs(1);
const TTL_SECS: u64 = 3;

pub(crate) struct Heartbeat {
    task: Task,
    redis: RedisStore,
    kind: &'static str,
    id: String,
}

impl Heartbeat {
    pub(crate) fn logic(redis: RedisStore, id: String, rpc: String, metrics: Arc<LogicMetrics>) -> Self {
        let (r, me) = (redis.clone(), id.clone());
        let task = Task::spawn(|mut stopped| async move {
            loop {
                let m = Member {
                    id: me.clone(),
                    rpc: rpc.clone(),
                    ws: String::new(),
                    tcp: String::new(),
                    load: metrics.load(),
                    connections: 0,
                };
                if let Err(e) = r.register("logic", &m, TTL_SECS).await {
                    tracing::warn!(error = %e, "registry heartbeat failed");
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(PERIOD) => {}
                }
            }
        });
        Self { task, redis, kind: "logic", id }
    }

    pub(crate) async fn gateway(redis: RedisStore, id: String, gw: &Gateway, ws: String, tcp: String) -> Self {
        let (r, me) = (redis.clone(), id.clone());
        let (metrics, pool, rpc) = (gw.metrics(), gw.logic_pool(), gw.advertise().to_owned());
        let reannouncer = gw.reannouncer();
        let task = Task::spawn(|mut stopped| async move {
            let mut run_id: Option<String> = None;
            let mut registered = false;
            loop {
                // A restarted Redis lost every route of this gateway's connections (their
                // sockets are still open): announce them again so pushes find them.
                let mut announced = false;
                match r.server_run_id().await {
                    Ok(id) => {
                        if run_id.as_ref().is_some_and(|seen| *seen != id) {
                            tracing::warn!("Redis restarted; re-announcing every connection");
                            reannouncer.reannounce();
                            announced = true;
                        }
                        run_id = Some(id);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the Redis run id failed"),
                }
                let m = Member {
                    id: me.clone(),
                    rpc: rpc.clone(),
                    ws: ws.clone(),
                    tcp: tcp.clone(),
                    load: metrics.cpu_load(),
                    connections: metrics.connections(),
                };
                match r.register("gateway", &m, TTL_SECS).await {
                    // This gateway's entry lapsed (a starved or cut-off heartbeat): logic
                    // instances dropped the routes of its connections meanwhile, so announce them.
                    Ok(true) if registered && !announced => {
                        tracing::warn!("registry entry had lapsed; re-announcing every connection");
                        reannouncer.reannounce();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "registry heartbeat failed"),
                }
                registered = true;
                if let Some(pool) = &pool {
                    match r.members("logic").await {
                        Ok(list) => pool.update(list.into_iter().map(|l| (l.rpc, l.load)).collect()),
                        Err(e) => tracing::warn!(error = %e, "reading logic instances failed"),
                    }
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(PERIOD) => {}
                }
            }
        });
        Self { task, redis, kind: "gateway", id }
    }

    /// Stops beating and leaves the registry at once.
    pub(crate) async fn stop(self) {
        self.task.stop().await;
        if let Err(e) = self.redis.deregister(self.kind, &self.id).await {
            tracing::warn!(error = %e, "leaving the registry failed");
        }
    }
}
