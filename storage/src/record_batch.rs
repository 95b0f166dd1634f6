//! Many messages per Kafka record: the cluster's sends share records of the message topic.
//!
//! A record of the message topic carries one [`crate::SequencedRecord`] as JSON, or several,
//! one per line (JSON never holds a raw newline, so a single record is the one-line case and
//! records written before batching read the same way: [`split`]). Sends go to one task per
//! process ([`RecordBatcher`]) that gathers what arrives within the producer's linger (or what
//! is already waiting, with no linger), groups it by partition in arrival order, and produces
//! one record per partition (cut at [`MAX_RECORD_BYTES`]); each send returns once the broker
//! acknowledged the record holding it. The broker and the persist worker then pay per record
//! what they paid per message. A partition has one record with the broker at a time: sends that
//! arrive meanwhile wait for it and share the next record, so under load records grow (one per
//! broker round trip per partition) instead of the broker's queue, and a lightly loaded
//! partition produces at once.
//!
//! A message goes to the partition its conversation's key would get from librdkafka's default
//! partitioner (CRC-32 of the key modulo the partition count, [`partition_of`]), so the records
//! of one conversation, batched or not, stay in one partition in the order they were sent:
//! the persist worker relies on that order (the first record of a seq wins).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use tokio::sync::{mpsc, oneshot};

use crate::kafka::Producer;
use crate::{Result, StorageError};

/// A batch record stops growing at this many bytes (the broker's default limit is 1 MiB); a
/// single message larger than this goes in a record of its own.
pub const MAX_RECORD_BYTES: usize = 512 * 1024;
/// Sends waiting for the batcher at most; more wait for room.
const QUEUE: usize = 16_384;
/// Bytes of messages waiting for a partition's record in flight at most; beyond it the batcher
/// takes no more sends until the broker acknowledges one.
const MAX_WAITING_BYTES: usize = 64 * 1024 * 1024;
/// How often the topic's partition count is read again.
const METADATA_EVERY: Duration = Duration::from_secs(30);

/// The messages of one Kafka record, split by line (one or more JSON documents).
pub fn split(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    payload.split(|b| *b == b'\n').filter(|line| !line.is_empty())
}

/// The partition librdkafka's default partitioner gives `key` among `partitions`.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    (crc32(key.as_bytes()) % partitions.max(1) as u32) as i32
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 (IEEE, as zlib and librdkafka compute it).
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, b| CRC_TABLE[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8))
}

struct Item {
    key: String,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<()>>,
}

/// The handle sends go through; the task behind it ends when the last handle is dropped.
#[derive(Clone)]
pub struct RecordBatcher {
    tx: mpsc::Sender<Item>,
}

impl RecordBatcher {
    /// Starts the batching task for `topic` (on the current Tokio runtime).
    pub fn start(producer: Producer, topic: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(producer, topic, rx));
        Self { tx }
    }

    /// Sends one message (a JSON document without raw newlines) keyed by `key`; returns once
    /// the broker acknowledged the record that holds it.
    pub async fn send(&self, key: &str, payload: Vec<u8>) -> Result<()> {
        self.submit(key, payload).await?.await
    }

    /// [`RecordBatcher::send`] in two steps: hands the message over (messages handed over one
    /// after another reach their partition in that order) and returns what waits for the
    /// broker's acknowledgement.
    pub async fn submit(&self, key: &str, payload: Vec<u8>) -> Result<Acked> {
        debug_assert!(!payload.contains(&b'\n'), "a batched message is one line");
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Item { key: key.to_owned(), payload, done })
            .await
            .map_err(|_| StorageError::kafka("the record batcher stopped"))?;
        Ok(Acked(answer))
    }
}

/// The broker's acknowledgement of a message handed to [`RecordBatcher::submit`].
pub struct Acked(oneshot::Receiver<Result<()>>);

impl std::future::Future for Acked {
    type Output = Result<()>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|_| Err(StorageError::kafka("the record batcher stopped"))))
    }
}

/// One record being filled: its payload and who waits for it.
#[derive(Default)]
struct Record {
    payload: Vec<u8>,
    waiting: Vec<oneshot::Sender<Result<()>>>,
}

/// The records of one partition waiting for the broker, oldest first, and whether one of its
/// records is with the broker now.
#[derive(Default)]
struct Lane {
    queue: VecDeque<Record>,
    busy: bool,
}

impl Lane {
    /// Adds a message to the newest waiting record, or starts one when it would pass
    /// [`MAX_RECORD_BYTES`].
    fn push(&mut self, item: Item) {
        let fits = self.queue.back().is_some_and(|r| r.payload.len() + 1 + item.payload.len() <= MAX_RECORD_BYTES);
        if !fits {
            self.queue.push_back(Record::default());
        }
        let r = self.queue.back_mut().expect("one record at least");
        if !r.payload.is_empty() {
            r.payload.push(b'\n');
        }
        r.payload.extend_from_slice(&item.payload);
        r.waiting.push(item.done);
    }
}

async fn run(producer: Producer, topic: String, mut rx: mpsc::Receiver<Item>) {
    let mut partitions: Option<(i32, Instant)> = None;
    // A partition has one record with the broker at a time: what arrives meanwhile waits and
    // goes in the next record, so records grow with the load instead of the broker's queue.
    let mut lanes: HashMap<i32, Lane> = HashMap::new();
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<i32>();
    let mut waiting_bytes = 0usize;
    loop {
        tokio::select! {
            biased;
            Some(partition) = acked_rx.recv() => {
                if let Some(lane) = lanes.get_mut(&partition) {
                    lane.busy = false;
                }
            }
            first = rx.recv(), if waiting_bytes < MAX_WAITING_BYTES => {
                let Some(first) = first else { break };
                let count = match partitions {
                    Some((n, at)) if at.elapsed() < METADATA_EVERY => n,
                    _ => match producer.partition_count(&topic).await {
                        Ok(n) => {
                            partitions = Some((n, Instant::now()));
                            n
                        }
                        // The last count still holds; without one, nothing can be placed.
                        Err(e) => match partitions {
                            Some((n, _)) => n,
                            None => {
                                let _ = first.done.send(Err(e));
                                continue;
                            }
                        },
                    },
                };
                let mut items = vec![first];
                let mut bytes = items[0].payload.len();
                let deadline = tokio::time::Instant::now() + producer.batch_linger();
                while bytes < MAX_RECORD_BYTES * count as usize {
                    let next = match rx.try_recv() {
                        Ok(item) => Some(item),
                        Err(_) if producer.batch_linger().is_zero() => None,
                        Err(_) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
                    };
                    let Some(item) = next else { break };
                    bytes += item.payload.len();
                    items.push(item);
                }
                waiting_bytes += bytes;
                for item in items {
                    lanes.entry(partition_of(&item.key, count)).or_default().push(item);
                }
            }
        }
        for (&partition, lane) in lanes.iter_mut() {
            if lane.busy {
                continue;
            }
            if let Some(r) = lane.queue.pop_front() {
                lane.busy = true;
                // the payload less its separators (one fewer than its messages)
                waiting_bytes -= r.payload.len() + 1 - r.waiting.len();
                produce(&producer, &topic, partition, r, acked_tx.clone()).await;
            }
        }
    }
    // Every handle is gone: what still waits goes to the broker now (its senders may still wait).
    for (partition, lane) in lanes {
        for r in lane.queue {
            produce(&producer, &topic, partition, r, acked_tx.clone()).await;
        }
    }
}

/// Hands one record to librdkafka (in order: records of one partition keep the order they are
/// handed over in) and answers its senders once the broker acknowledged it, without waiting;
/// then reports its partition on `acked`.
async fn produce(producer: &Producer, topic: &str, partition: i32, r: Record, acked: mpsc::UnboundedSender<i32>) {
    let handed = Instant::now();
    let give_up = handed + producer.timeout();
    let delivery = loop {
        let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).partition(partition).payload(&r.payload);
        match producer.inner().send_result(record) {
            Ok(delivery) => break Ok(delivery),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _))
                if Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => break Err(e),
        }
    };
    let answer = |result: std::result::Result<(), String>, waiting: Vec<oneshot::Sender<Result<()>>>| {
        for w in waiting {
            let _ = w.send(result.clone().map_err(StorageError::kafka));
        }
    };
    match delivery {
        Err(e) => {
            answer(Err(e.to_string()), r.waiting);
            let _ = acked.send(partition);
        }
        Ok(delivery) => {
            // librdkafka reports every record within its `message.timeout.ms`.
            tokio::spawn(async move {
                let result = match delivery.await {
                    Ok(Ok(_)) => {
                        crate::metrics::KAFKA_PRODUCE.observe(handed.elapsed().as_secs_f64());
                        Ok(())
                    }
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer was dropped".to_owned()),
                };
                answer(result, r.waiting);
                let _ = acked.send(partition);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_ieee() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn lines_split_single_and_batched_records() {
        assert_eq!(split(br#"{"a":1}"#).collect::<Vec<_>>(), vec![&br#"{"a":1}"#[..]]);
        assert_eq!(split(b"{\"a\":1}\n{\"b\":\"x\\ny\"}").count(), 2);
        assert_eq!(split(b"").count(), 0);
    }

    #[test]
    fn partitions_spread_and_stay_put() {
        let p: Vec<i32> = (0..30).map(|i| partition_of(&format!("d:u{i}:v{i}"), 3)).collect();
        assert!(p.iter().all(|p| (0..3).contains(p)));
        assert!((0..3).all(|n| p.contains(&n)));
        assert_eq!(partition_of("d:a:b", 3), partition_of("d:a:b", 3));
    }
}
