//! Kafka adapters (rdkafka with its bundled librdkafka): the idempotent
//! `acks=all` producer of the message topic, topic creation at start-up,
//! and the consumer the persist worker reads with (partitions assigned by
//! hand, no consumer group), over plain TCP or TLS ([`Brokers`]).

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::{Result, StorageError};

impl From<KafkaError> for StorageError {
    fn from(e: KafkaError) -> Self {
        StorageError::Kafka(crate::error::driver_error(crate::error::Backend::Kafka, &e), Some(Box::new(e)))
    }
}

/// Where the Kafka cluster is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct Brokers {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub servers: String,
    /// TLS (`security.protocol=ssl`, host names verified), trusting this CA file
    /// besides the system's roots when one is given.
    pub tls: Option<Option<PathBuf>>,
}

impl Brokers {
    /// Plain TCP to `servers`.
    pub fn plain(servers: &str) -> Self {
        Self { servers: servers.to_owned(), tls: None }
    }

    /// TLS to `servers`, verified against `ca` (a PEM file) or the system's roots.
    pub fn tls(servers: &str, ca: Option<PathBuf>) -> Self {
        Self { servers: servers.to_owned(), tls: Some(ca) }
    }

    /// A librdkafka configuration reaching these brokers.
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers);
        if let Some(ca) = &self.tls {
            c.set("security.protocol", "ssl").set("ssl.endpoint.identification.algorithm", "https");
            if let Some(ca) = ca {
                c.set("ssl.ca.location", ca.to_string_lossy());
            }
        }
        c
    }
}

impl From<&str> for Brokers {
    fn from(servers: &str) -> Self {
        Self::plain(servers)
    }
}

impl From<&String> for Brokers {
    fn from(servers: &String) -> Self {
        Self::plain(servers)
    }
}

impl From<&Brokers> for Brokers {
    fn from(b: &Brokers) -> Self {
        b.clone()
    }
}

/// Topic names and sizes of one deployment.
#[derive(Debug, Clone)]
pub struct Topics {
    pub messages: String,
    pub dead_letter: String,
    pub partitions: i32,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self { messages: format!("{prefix}messages"), dead_letter: format!("{prefix}dead-letter"), partitions: 3 }
    }
}

/// Creates the topics if missing (the broker does not auto-create them).
pub async fn ensure_topics(brokers: impl Into<Brokers>, topics: &Topics) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = brokers.into().config().create()?;
    let new: Vec<NewTopic> = [&topics.messages, &topics.dead_letter]
        .into_iter()
        .map(|t| NewTopic::new(t, topics.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&new, &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(StorageError::kafka(format!("creating topic {t}: {code}"))),
        }
    }
    Ok(())
}

/// The producer of one topic: idempotent, `acks=all`; `send` returns only
/// once the broker acknowledged the record.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    timeout: Duration,
    /// How long a [`crate::record_batch::RecordBatcher`] on this producer gathers sends into
    /// one record (zero: what is already waiting).
    batch_linger: Duration,
}

/// How long the producer waits for more records to share a produce request with one
/// (`linger.ms`) unless told otherwise.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

impl Producer {
    /// A producer with [`DEFAULT_LINGER`].
    pub fn new(brokers: impl Into<Brokers>, timeout: Duration) -> Result<Self> {
        Self::with_linger(brokers, timeout, DEFAULT_LINGER)
    }

    /// A producer whose records wait up to `linger` for others to share their produce request:
    /// fewer, larger requests for the broker, at up to `linger` more latency per send (a send
    /// still returns only once the broker acknowledged its record).
    pub fn with_linger(brokers: impl Into<Brokers>, timeout: Duration, linger: Duration) -> Result<Self> {
        let inner: FutureProducer = brokers
            .into()
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger.as_millis().to_string())
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()?;
        Ok(Self { inner, timeout, batch_linger: Duration::ZERO })
    }

    /// A producer for a [`crate::record_batch::RecordBatcher`]: the batcher gathers sends for
    /// up to `linger` into one record, and librdkafka sends that record without lingering again.
    pub fn batching(brokers: impl Into<Brokers>, timeout: Duration, linger: Duration) -> Result<Self> {
        let mut p = Self::with_linger(brokers, timeout, Duration::ZERO)?;
        p.batch_linger = linger;
        Ok(p)
    }

    pub(crate) fn inner(&self) -> &FutureProducer {
        &self.inner
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn batch_linger(&self) -> Duration {
        self.batch_linger
    }

    /// How many partitions `topic` has, by the broker's metadata.
    pub async fn partition_count(&self, topic: &str) -> Result<i32> {
        use rdkafka::producer::Producer as _;
        let (inner, topic, timeout) = (self.inner.clone(), topic.to_owned(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let meta = inner.client().fetch_metadata(Some(&topic), timeout)?;
            match meta.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len()) {
                Some(n) if n > 0 => Ok(n as i32),
                _ => Err(StorageError::Busy(format!("no partitions of {topic} in the broker's metadata"))),
            }
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// The high watermark (the offset the next record will get) of every partition of `topic`.
    pub async fn high_watermarks(&self, topic: &str) -> Result<Vec<(i32, i64)>> {
        use rdkafka::producer::Producer as _;
        let (inner, topic, timeout) = (self.inner.clone(), topic.to_owned(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let client = inner.client();
            let meta = client.fetch_metadata(Some(&topic), timeout)?;
            let parts: Vec<i32> = meta
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if parts.is_empty() {
                return Err(StorageError::Busy(format!("no partitions of {topic} in the broker's metadata")));
            }
            parts
                .into_iter()
                .map(|p| Ok((p, client.fetch_watermarks(&topic, p, timeout)?.1)))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// Sends one record keyed by `key` (records with one key stay in order).
    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        self.inner.send(record, Timeout::After(self.timeout)).await.map_err(|(e, _)| StorageError::from(e))?;
        Ok(())
    }
}

/// A consumer for partitions assigned by hand ([`rdkafka::consumer::Consumer::assign`]) at
/// offsets kept elsewhere: it never subscribes, so it never joins a consumer
/// group, and it commits nothing to the broker. `group_id` only satisfies
/// librdkafka, which accepts `assign` only from a consumer that has one.
pub fn assigning_consumer(brokers: &Brokers, group_id: &str) -> Result<StreamConsumer> {
    let c: StreamConsumer = brokers
        .config()
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Where a stored offset is no longer in the log (retention).
        .set("auto.offset.reset", "earliest")
        .create()?;
    Ok(c)
}
