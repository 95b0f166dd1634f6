//! The storage layer's error type, and how many errors each backend's driver returned.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The error a driver returned, kept whole as a [`StorageError`]'s source (its codes and labels
/// stay readable through `source()` and downcasting).
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A storage failure. Logic maps every variant to the protocol's `internal`
/// or `unavailable` error; none of them is the client's fault. A backend's variant holds what
/// failed (with the driver's message, so one line in a log says it all) and, when a driver
/// failed, the driver's error itself as the source.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("embedded database: {0}")]
    Embedded(String, #[source] Option<Source>),
    #[error("redis: {0}")]
    Redis(String, #[source] Option<Source>),
    #[error("kafka: {0}")]
    Kafka(String, #[source] Option<Source>),
    #[error("postgres: {0}")]
    Postgres(String, #[source] Option<Source>),
    #[error("tls: {0}")]
    Tls(String, #[source] Option<Source>),
    #[error("mongodb: {0}")]
    Mongo(String, #[source] Option<Source>),
    #[error("file store: {0}")]
    Files(String, #[source] Option<Source>),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A state that settles by itself (another instance's work in flight,
    /// the persist worker behind): the same call may succeed later.
    #[error("not settled yet, retry: {0}")]
    Busy(String),
    #[error("background task failed: {0}")]
    Task(String),
    /// A retried operation kept failing for longer than allowed.
    #[error("{what} kept failing for {secs} s; last error: {last}")]
    GaveUp { what: &'static str, secs: u64, last: Box<StorageError> },
}

/// A backend's failure that no driver error stands behind (what went wrong, in words).
impl StorageError {
    pub fn embedded(what: impl Into<String>) -> Self {
        Self::Embedded(what.into(), None)
    }
    pub fn redis(what: impl Into<String>) -> Self {
        Self::Redis(what.into(), None)
    }
    pub fn kafka(what: impl Into<String>) -> Self {
        Self::Kafka(what.into(), None)
    }
    pub fn postgres(what: impl Into<String>) -> Self {
        Self::Postgres(what.into(), None)
    }
    pub fn tls(what: impl Into<String>) -> Self {
        Self::Tls(what.into(), None)
    }
    pub fn mongo(what: impl Into<String>) -> Self {
        Self::Mongo(what.into(), None)
    }
}

/// A storage backend, as counted by [`DriverErrors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
    Kafka,
    Postgres,
    Mongo,
}

impl Backend {
    const ALL: [Backend; 5] = [Backend::Embedded, Backend::Redis, Backend::Kafka, Backend::Postgres, Backend::Mongo];

    fn label(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Redis => "redis",
            Backend::Kafka => "kafka",
            Backend::Postgres => "postgres",
            Backend::Mongo => "mongodb",
        }
    }
}

/// Errors the drivers of this process returned, per backend (connection failures, timeouts,
/// server errors: whatever a driver call failed with), for `/metrics`.
#[derive(Debug, Default)]
pub struct DriverErrors([AtomicU64; 5]);

/// The process's driver error counts (every [`StorageError`] made from a driver's error counts
/// itself here).
pub static DRIVER_ERRORS: DriverErrors = DriverErrors([const { AtomicU64::new(0) }; 5]);

impl DriverErrors {
    pub fn count(&self, backend: Backend) {
        self.0[backend as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, backend: Backend) -> u64 {
        self.0[backend as usize].load(Ordering::Relaxed)
    }

    /// Appends `switchboard_storage_errors_total{backend}` in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "switchboard_storage_errors_total";
        let _ = writeln!(out, "# HELP {name} Errors returned by each storage backend's driver in this process.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for b in Backend::ALL {
            let _ = writeln!(out, "{name}{{backend=\"{}\"}} {}", b.label(), self.get(b));
        }
    }
}

/// Counts a driver error of `backend` and passes its text on.
pub(crate) fn driver_error(backend: Backend, e: &dyn std::fmt::Display) -> String {
    DRIVER_ERRORS.count(backend);
    e.to_string()
}

macro_rules! embedded_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Embedded(driver_error(Backend::Embedded, &e), Some(Box::new(e)))
            }
        }
    )*};
}
embedded_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for StorageError {
    fn from(e: serde_json::Error) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Task(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver's error becomes a [`StorageError`] that keeps it as its source and counts for
    /// its backend, which shows on `/metrics` with the backend as a label.
    #[test]
    fn driver_errors_are_counted_per_backend() {
        let before = DRIVER_ERRORS.get(Backend::Embedded);
        let e: StorageError = redb::StorageError::Corrupted("torn page".into()).into();
        assert!(e.to_string().contains("torn page"), "{e}");
        // The driver's error itself is the source.
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<redb::StorageError>().is_some(), "{source:?}");
        assert!(DRIVER_ERRORS.get(Backend::Embedded) > before);
        let mut text = String::new();
        DRIVER_ERRORS.render(&mut text);
        assert!(text.contains("# TYPE switchboard_storage_errors_total counter"), "{text}");
        assert!(text.contains("switchboard_storage_errors_total{backend=\"redis\"} "), "{text}");
        assert!(text.contains("switchboard_storage_errors_total{backend=\"postgres\"} "), "{text}");
    }
}
