//! Errors of the logic layer, each carrying its protocol error code.

use switchboard_storage::StorageError;

/// A failed request, as the client will see it: a protocol error code
/// (docs/protocol.md) and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new("bad_request", message)
    }
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self { code: "rate_limited", message: "slow down".into(), retry_after_ms: Some(retry_after_ms.max(1)) }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new("forbidden", message)
    }

    /// HTTP status for this error on the HTTP API.
    pub fn http_status(&self) -> u16 {
        match self.code {
            "bad_request" | "too_large" => 400,
            "unauthorized" | "bad_token" | "bad_credentials" => 401,
            "forbidden" | "not_friends" | "not_member" => 403,
            "no_such_user" | "no_such_group" | "not_found" => 404,
            "user_exists" | "already_friends" => 409,
            "rate_limited" | "too_many_connections" => 429,
            "unavailable" => 503,
            _ => 500,
        }
    }

    /// The JSON error frame of the socket protocol.
    pub fn to_frame(&self, rid: Option<u64>) -> serde_json::Value {
        let mut f = serde_json::json!({"op": "error", "code": self.code, "message": self.message});
        if let Some(rid) = rid {
            f["rid"] = rid.into();
        }
        if let Some(ms) = self.retry_after_ms {
            f["retry_after_ms"] = ms.into();
        }
        f
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage failure");
        ApiError { code: "unavailable", message: "storage unavailable, retry".into(), retry_after_ms: Some(1000) }
    }
}
