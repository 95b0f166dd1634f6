//! `switchboard-bench`: the load generator of Switchboard, as a library so tests can run the
//! modes in-process (the binary in `main.rs` is a thin command line over it).
//!
//! Modes:
//! - `connect`: ramp to N authenticated WebSocket connections at a bounded rate, hold them with
//!   periodic `ping` ops, report connect latency, failures, drops, connect rate and server RSS;
//!   optionally spread over several worker processes (one per fd budget). (rawws client, lean
//!   buffers: a few hundred bytes of client memory per idle connection)
//! - `ping`: pipelined `ping` round trips, k in flight per connection: frames/s, RTT percentiles
//!   and client/server CPU time. (rawws client)
//! - `fanout`: one sender, K receiving connections in one group: deliveries/s, delivery latency,
//!   missing deliveries. (rawws client)
//! - `messaging`: pairs of friends sending direct messages at a fixed rate: delivered msgs/s,
//!   delivery and `send.ok` latency, errors. (rawws client)
//! - `plot`: the PNG of a `messaging` offered-load sweep (delivered and latency against offered).
//! - `fsync`: a write-ahead log's `fdatasync` on this disk, growing file against recycled one.
//! - `baseline-server`: a plain tokio-tungstenite server answering `auth` and `ping`, the baseline.
//!
//! Every target must be on loopback (127.0.0.0/8) and every run is bounded in count and time.

pub mod baseline;
pub mod canvas;
pub mod client;
pub mod connect;
pub mod deliver;
pub mod fanout;
pub mod fsync;
pub mod messaging;
pub mod ping;
pub mod plot;
pub mod procfs;
pub mod rawws;
pub mod scan;
pub mod session;
pub mod stalls;
pub mod stats;
pub mod sync;
