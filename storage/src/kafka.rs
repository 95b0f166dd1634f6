//! Kafka adapters (rdkafka with its bundled librdkafka): the idempotent
//! `acks=all` producer of the message topic, topic creation at start-up,
//! and the consumer the persist worker reads with (partitions assigned by
//! hand, no consumer group).

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
        StorageError::Kafka(e.to_string())
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
pub async fn ensure_topics(brokers: &str, topics: &Topics) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic> = [&topics.messages, &topics.dead_letter]
        .into_iter()
        .map(|t| NewTopic::new(t, topics.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&new, &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(StorageError::Kafka(format!("creating topic {t}: {code}"))),
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
}

impl Producer {
    pub fn new(brokers: &str, timeout: Duration) -> Result<Self> {
        let inner: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()?;
        Ok(Self { inner, timeout })
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
pub fn assigning_consumer(brokers: &str, group_id: &str) -> Result<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Where a stored offset is no longer in the log (retention).
        .set("auto.offset.reset", "earliest")
        .create()?;
    Ok(c)
}
