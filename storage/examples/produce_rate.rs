//! The broker's own produce rate, as the ceiling of the cluster message path: the same producer
//! logic uses (idempotent, `acks=all`, `--linger-ms`, default `kafka::DEFAULT_LINGER`), records of `--bytes` keyed over `--keys`
//! conversations, `--inflight` sends outstanding, for `--secs`. Prints one JSON line.
//!
//!     cargo run --release -p switchboard-storage --example produce_rate -- \
//!         --brokers 127.0.0.1:19092 --secs 10 --inflight 256 --bytes 300

use std::time::{Duration, Instant};

use switchboard_storage::kafka::{ensure_topics, Producer, Topics};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = arg("--brokers", "127.0.0.1:19092");
    let secs: u64 = arg("--secs", "10").parse()?;
    let inflight: usize = arg("--inflight", "256").parse()?;
    let bytes: usize = arg("--bytes", "300").parse()?;
    let keys: usize = arg("--keys", "100").parse()?;
    let topics = Topics::with_prefix(&format!("producerate{:08x}.", rand::random::<u32>()));
    ensure_topics(&brokers, &topics).await?;
    let linger = match arg("--linger-ms", "") {
        ms if ms.is_empty() => switchboard_storage::kafka::DEFAULT_LINGER,
        ms => Duration::from_millis(ms.parse()?),
    };
    let producer = std::sync::Arc::new(Producer::with_linger(&brokers, Duration::from_secs(10), linger)?);
    let payload = vec![b'x'; bytes];
    let end = Instant::now() + Duration::from_secs(secs.clamp(1, 120));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..inflight.clamp(1, 4096) {
        let (producer, topic, payload) = (producer.clone(), topics.messages.clone(), payload.clone());
        tasks.spawn(async move {
            let (mut n, mut lat) = (0u64, Vec::new());
            let mut i = w;
            while Instant::now() < end {
                let t = Instant::now();
                producer.send(&topic, &format!("k{}", i % keys), &payload).await.expect("produce");
                lat.push(t.elapsed().as_micros() as u64);
                n += 1;
                i += inflight;
            }
            (n, lat)
        });
    }
    let (mut total, mut lat) = (0u64, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (n, l) = r?;
        total += n;
        lat.extend(l);
    }
    lat.sort_unstable();
    let q = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "{{\"records_per_sec\":{:.0},\"records\":{total},\"p50_us\":{},\"p99_us\":{},\"inflight\":{inflight},\"bytes\":{bytes}}}",
        total as f64 / secs as f64,
        q(0.5),
        q(0.99)
    );
    Ok(())
}
