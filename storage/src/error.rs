//! The storage layer's error type.

/// A storage failure. Logic maps every variant to the protocol's `internal`
/// or `unavailable` error; none of them is the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("embedded database: {0}")]
    Embedded(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("mongodb: {0}")]
    Mongo(String),
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

macro_rules! embedded_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Embedded(e.to_string())
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
