//! The cluster secret on internal links: every gRPC call between gateway and logic carries it in
//! the [`HEADER`] metadata, and both services refuse a call without the right one (compared in
//! constant time) as `unauthenticated`, with a log line naming the peer.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// Metadata key carrying the cluster secret.
pub const HEADER: &str = "x-sb-cluster-secret";

/// Metadata key of a gateway's link to logic naming the gateway's push address (as routes name
/// it): logic sends that gateway's pushes down the link.
pub const GATEWAY_HEADER: &str = "x-sb-gateway";

/// The secret as metadata, or `None` when it cannot be sent (not visible ASCII).
pub fn value(secret: &str) -> Option<MetadataValue<Ascii>> {
    secret.parse().ok()
}

/// Adds the secret (if any) to an outgoing request.
pub fn attach<T>(mut req: Request<T>, secret: Option<&MetadataValue<Ascii>>) -> Request<T> {
    if let Some(v) = secret {
        req.metadata_mut().insert(HEADER, v.clone());
    }
    req
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A server interceptor admitting only calls that carry `secret` (every call when `None`).
pub fn checker(secret: Option<String>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(expected) = &secret else {
            return Ok(req);
        };
        let given = req.metadata().get(HEADER).map(|v| v.as_bytes());
        if given.is_some_and(|g| same(g, expected.as_bytes())) {
            return Ok(req);
        }
        tracing::warn!(peer = ?req.remote_addr(), present = given.is_some(), "internal call refused: wrong or missing cluster secret");
        Err(Status::unauthenticated("cluster secret required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secret_passes() {
        let check = checker(Some("s3cret-s3cret-s3cret-s3cret-s3cret".into()));
        assert_eq!(check(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let wrong = attach(Request::new(()), value("nope").as_ref());
        assert!(check(wrong).is_err());
        let right = attach(Request::new(()), value("s3cret-s3cret-s3cret-s3cret-s3cret").as_ref());
        assert!(check(right).is_ok());
        assert!(checker(None)(Request::new(())).is_ok(), "no secret configured: open");
    }
}
