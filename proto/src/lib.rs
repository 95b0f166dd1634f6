//! Wire definitions shared by every Switchboard role: the client `Frame`
//! (binary form of the protocol) and the internal gateway <-> logic services.

pub mod batch;
pub mod cluster_auth;
pub mod cluster_tls;
pub mod latency;
pub mod net;
pub mod trusted;

/// Client frames (`sb.bin.v1` and raw TCP).
pub mod v1 {
    tonic::include_proto!("switchboard.v1");
}

/// Internal gRPC services between gateway and logic.
pub mod internal {
    tonic::include_proto!("switchboard.internal");
}
