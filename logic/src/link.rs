//! The server end of a gateway's long-lived link (`Logic.Link`): batches of calls arrive on one
//! gRPC stream, each call runs as its own task (a slow call never holds up the others), at most
//! [`LinkLimits::inflight`] of them per link (beyond that the link stops reading and HTTP/2 flow
//! control pushes back on the gateway), and results go back as they complete, in batches cut by
//! count and bytes. Each call answers exactly what its unary RPC would have.
//!
//! When the instance stops, every link stops reading, lets its calls in flight finish, sends
//! their results and ends its response stream: the gateway then fails the calls this instance
//! never read as `unavailable`, and its pool retries them on another instance.

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::batch;
use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::{LinkCall, LinkDown, LinkFailure, LinkResult, LinkUp};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::Logic;

/// Bounds of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    /// Calls of one link running at once.
    pub inflight: usize,
    /// Most results in one `LinkDown` batch.
    pub batch: usize,
    /// A batch is cut before it passes this many bytes (a single larger result goes alone).
    pub batch_bytes: usize,
}

impl Default for LinkLimits {
    fn default() -> Self {
        Self { inflight: 4096, batch: 512, batch_bytes: 1 << 20 }
    }
}

/// How long a stopping link waits for the gateway to close its side once every result is sent.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Turns `true` when the instance stops (see [`serve`]).
pub type Closing = watch::Receiver<bool>;

/// Resolves once `closing` turns `true` (never, if it cannot).
pub(crate) async fn closed(closing: &mut Closing) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The results of one link, as the response stream of `Logic.Link`.
pub type DownStream = ReceiverStream<Result<LinkDown, Status>>;

/// Serves one gateway link until the gateway closes it, it breaks, or `closing` turns `true`.
pub fn serve(logic: Arc<Logic>, mut up: Streaming<LinkUp>, limits: LinkLimits, mut closing: Closing) -> DownStream {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<LinkResult>();
    let (down_tx, down_rx) = mpsc::channel(4);
    let inflight = limits.inflight.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let room = Arc::new(Semaphore::new(inflight));
    tokio::spawn(async move {
        let stopping = loop {
            let batch = tokio::select! {
                biased;
                _ = closed(&mut closing) => break true,
                m = up.message() => match m {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break false,
                    Err(e) => {
                        tracing::debug!(error = %e, "gateway link broke");
                        break false;
                    }
                },
            };
            for call in batch.calls {
                let Ok(slot) = room.clone().acquire_owned().await else { return };
                let (logic, done_tx) = (logic.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let _ = done_tx.send(run(&logic, call).await);
                    drop(slot);
                });
            }
        };
        drop(done_tx);
        if stopping {
            // Calls in flight finish and their results go out (the response stream ends
            // after them); the request side stays open until the gateway closes it.
            let _ = room.acquire_many(inflight as u32).await;
            let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Ok(Some(_)) = up.message().await {} }).await;
        }
    });
    tokio::spawn(async move {
        let mut carry: Option<LinkResult> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match done_rx.recv().await {
                    Some(r) => r,
                    None => break,
                },
            };
            let (results, next) = batch::cut(first, || done_rx.try_recv().ok(), limits.batch, limits.batch_bytes);
            carry = next;
            if down_tx.send(Ok(LinkDown { results })).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(down_rx)
}

fn failure(s: Status) -> Outcome {
    Outcome::Failure(LinkFailure { code: s.code() as i32, message: s.message().to_string() })
}

/// Runs one call of a link.
async fn run(logic: &Logic, call: LinkCall) -> LinkResult {
    let outcome = match call.call {
        None => failure(Status::invalid_argument("empty link call")),
        Some(Call::Authenticate(a)) => Outcome::Auth(logic.auth_reply(&a.token).await),
        Some(Call::AuthConnect(a)) => match logic.auth_connect(&a).await {
            Ok(r) => Outcome::Auth(r),
            Err(s) => failure(s),
        },
        Some(Call::Connected(ev)) => logic.rpc_connected(&ev).await.map_or_else(failure, Outcome::Done),
        Some(Call::Disconnected(ev)) => logic.rpc_disconnected(&ev).await.map_or_else(failure, Outcome::Done),
        Some(Call::DisconnectedMany(evs)) => {
            logic.rpc_disconnected_many(&evs.events).await.map_or_else(failure, Outcome::Done)
        }
        Some(Call::Handle(req)) => logic.rpc_handle(req).await.map_or_else(failure, Outcome::Reply),
    };
    LinkResult { id: call.id, result: Some(outcome) }
}
