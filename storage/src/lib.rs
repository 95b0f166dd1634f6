//! Storage of Switchboard: the traits the logic layer talks to (accounts,
//! social graph, messages, routes) and their backends. Every backend
//! implements the same traits and passes the same contract suite
//! (`contract` module), so a deployment chooses one by configuration.

mod caches;
pub mod cluster;
pub mod cluster_caches;
mod cmid_filter;
pub mod contract;
pub mod contract_durable;
pub mod embedded;
mod embedded_keys;
mod embedded_mids;
mod embedded_search;
mod error;
pub mod files;
mod group_commit;
pub mod kafka;
pub mod memory_routes;
pub mod metrics;
pub mod model;
#[cfg(feature = "mongodb")]
pub mod mongo;
pub mod persist;
pub mod postgres;
pub mod record_batch;
pub mod redis;
pub mod redis_batch;
pub mod search;
mod tail;
pub mod tls;
mod traits;
mod wal;

pub use error::{Backend, DriverErrors, StorageError, DRIVER_ERRORS};
pub use model::*;
pub use traits::*;

/// Result type of every storage call.
pub type Result<T> = std::result::Result<T, StorageError>;

/// Milliseconds since the Unix epoch (server time used in messages).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The recalled form of a stored message: same conv, seq, mid, sender,
/// cmid and ts; kind "recalled" and an empty string body.
pub(crate) fn recalled_form(m: Message) -> Message {
    // A recalled message quotes nothing and mentions nobody any more.
    Message {
        kind: "recalled".into(),
        body: serde_json::Value::String(String::new()),
        reply_to: None,
        mentions: Vec::new(),
        ..m
    }
}
