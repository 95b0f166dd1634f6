//! The `[storage]` section of the configuration: which store a role runs on (`backend`:
//! `embedded`, or the cluster's Redis and Kafka with `postgres` or `mongodb` as the durable
//! store), the engines' addresses and their tuning. Its options are flags and `SB_*` variables
//! like every other; in a TOML file they sit under `[storage]`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use switchboard_storage::embedded::CheckpointPolicy;
use switchboard_storage::kafka::Brokers;
use switchboard_storage::tls::BackendTls;

/// The database MongoDB stores go in when neither `mongodb_database` nor the URL names one.
pub const DEFAULT_MONGODB_DATABASE: &str = "switchboard";

/// Every option is optional here; the accessors apply the defaults.
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// The store: `embedded` (one process, redb in --data-dir), `postgres` or `mongodb` (the
    /// cluster: Redis and Kafka, and that durable store). Default: `embedded` unless cluster
    /// URLs are given, then the durable store whose URL is set.
    #[arg(long, env = "SB_BACKEND")]
    pub backend: Option<String>,
    /// Redis URL of the cluster (routes, seq counters, the registry); with --kafka-brokers and a
    /// durable store's URL it selects the cluster backends unless `backend` names one.
    #[arg(long, env = "SB_REDIS_URL")]
    pub redis_url: Option<String>,
    /// PostgreSQL URL of the cluster's durable store (`backend = "postgres"`).
    #[arg(long, env = "SB_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// MongoDB URL of the cluster's durable store (`backend = "mongodb"`), e.g.
    /// `mongodb://host:27017/?replicaSet=rs0` (a replica set: appends use transactions).
    #[arg(long, env = "SB_MONGODB_URL")]
    pub mongodb_url: Option<String>,
    /// MongoDB database of the stores; default: the URL's, else "switchboard".
    #[arg(long, env = "SB_MONGODB_DATABASE")]
    pub mongodb_database: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port] (cluster).
    #[arg(long, env = "SB_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Talk TLS to the Kafka brokers (`security.protocol=ssl`); default false.
    #[arg(long, env = "SB_KAFKA_TLS")]
    pub kafka_tls: Option<bool>,
    /// How long a send waits for other sends to share its Kafka record (one record per
    /// partition holds them all; `send.ok` still waits for the broker's ack); default 1.
    #[arg(long, env = "SB_KAFKA_LINGER_MS")]
    pub kafka_linger_ms: Option<u64>,
    /// PEM bundle of a private certificate authority that TLS connections to Redis
    /// (`rediss://` URLs), PostgreSQL (`sslmode=require`) and Kafka (`--kafka-tls true`) are
    /// verified against, besides the usual roots. MongoDB takes TLS and its CA from its URL
    /// (`tls=true&tlsCAFile=...`).
    #[arg(long, env = "SB_BACKEND_CA_FILE")]
    pub backend_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key (default "sb:").
    #[arg(long, env = "SB_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// Prefix of the Kafka topics and consumer group (default "sb.").
    #[arg(long, env = "SB_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// Embedded store: longest milliseconds appends stay only in its write-ahead log before a
    /// B-tree checkpoint; default 200.
    #[arg(long, env = "SB_EMBEDDED_CHECKPOINT_MS")]
    pub embedded_checkpoint_ms: Option<u64>,
    /// Embedded store: most bytes of appends held in its write-ahead log (and in memory) before a
    /// checkpoint; default 32 MiB.
    #[arg(long, env = "SB_EMBEDDED_CHECKPOINT_BYTES")]
    pub embedded_checkpoint_bytes: Option<usize>,
    /// Embedded store: niceness added to its checkpoint thread, so that on a busy core the
    /// threads answering sends run first (0 to 19); default 10.
    #[arg(long, env = "SB_EMBEDDED_CHECKPOINT_NICE")]
    pub embedded_checkpoint_nice: Option<i32>,
    /// Embedded store: longest microseconds the log waits for more appends before writing a
    /// batch, only under load (fewer fdatasyncs, at most this much more latency; 0 off);
    /// default 1000.
    #[arg(long, env = "SB_EMBEDDED_LOG_LINGER_US")]
    pub embedded_log_linger_us: Option<u64>,
    /// Embedded store: bytes of the in-memory filter of stored cmids that lets a send with a new
    /// cmid skip the index probe (about 10 bits per stored message; 0 off; at most 1 GiB);
    /// default 16 MiB.
    #[arg(long, env = "SB_EMBEDDED_CMID_FILTER_BYTES")]
    pub embedded_cmid_filter_bytes: Option<usize>,
}

/// Largest filter of stored cmids the embedded store allocates (about 850 million messages at
/// 10 bits each).
pub const MAX_CMID_FILTER_BYTES: usize = 1 << 30;

/// The cluster's durable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    Postgres { url: String },
    Mongo { url: String, database: String },
}

/// The stores a logic or persist role runs on, from [`StorageSettings::choice`].
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Embedded,
    Cluster { redis: String, brokers: Brokers, durable: Durable },
}

impl StoreChoice {
    /// The backend's name, as `backend` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            StoreChoice::Embedded => "embedded",
            StoreChoice::Cluster { durable: Durable::Postgres { .. }, .. } => "postgres",
            StoreChoice::Cluster { durable: Durable::Mongo { .. }, .. } => "mongodb",
        }
    }
}

impl StorageSettings {
    /// Which store the settings name, checked: a backend with every URL it needs, no URLs of a
    /// cluster for `embedded`, one durable store when `backend` is left to its default.
    pub fn choice(&self) -> anyhow::Result<StoreChoice> {
        let cluster_urls = [
            ("redis_url", self.redis_url.is_some()),
            ("postgres_url", self.postgres_url.is_some()),
            ("mongodb_url", self.mongodb_url.is_some()),
            ("kafka_brokers", self.kafka_brokers.is_some()),
        ];
        let backend = match self.backend.as_deref() {
            Some(b) => b,
            None if cluster_urls.iter().all(|(_, set)| !set) => crate::defaults::BACKEND,
            None => match (&self.postgres_url, &self.mongodb_url) {
                (Some(_), None) => "postgres",
                (None, Some(_)) => "mongodb",
                (Some(_), Some(_)) => {
                    anyhow::bail!("both postgres_url and mongodb_url are set: name the store with `backend`")
                }
                (None, None) => anyhow::bail!("the cluster needs a durable store: postgres_url or mongodb_url"),
            },
        };
        let need = |name: &str, v: &Option<String>| {
            v.clone().ok_or_else(|| anyhow::anyhow!("backend {backend:?} needs {name} (--{})", name.replace('_', "-")))
        };
        let durable = match backend {
            "embedded" => {
                let set: Vec<&str> = cluster_urls.iter().filter(|(_, set)| *set).map(|(n, _)| *n).collect();
                anyhow::ensure!(
                    set.is_empty(),
                    "backend \"embedded\" takes no cluster engines, but {} {} set",
                    set.join(", "),
                    if set.len() == 1 { "is" } else { "are" }
                );
                return Ok(StoreChoice::Embedded);
            }
            "postgres" => Durable::Postgres { url: need("postgres_url", &self.postgres_url)? },
            "mongodb" => {
                anyhow::ensure!(
                    cfg!(feature = "mongodb"),
                    "backend \"mongodb\": this binary was built without MongoDB (cargo feature `mongodb`)"
                );
                let url = need("mongodb_url", &self.mongodb_url)?;
                let database = match &self.mongodb_database {
                    Some(d) => d.clone(),
                    None => url_database(&url).unwrap_or(DEFAULT_MONGODB_DATABASE).to_owned(),
                };
                Durable::Mongo { url, database }
            }
            other => anyhow::bail!("backend {other:?}: expected embedded, postgres or mongodb"),
        };
        let redis = need("redis_url", &self.redis_url)?;
        let brokers = need("kafka_brokers", &self.kafka_brokers)?;
        let brokers = match self.kafka_tls {
            Some(true) => Brokers::tls(&brokers, self.backend_ca_file.clone()),
            _ => Brokers::plain(&brokers),
        };
        Ok(StoreChoice::Cluster { redis, brokers, durable })
    }

    /// What `switchboard config` checks, whatever role will read the file: [`Self::choice`], but
    /// a gateway's Redis alone (for the registry, no store named) passes too.
    pub fn check(&self) -> anyhow::Result<()> {
        let redis_only = self.backend.is_none()
            && self.redis_url.is_some()
            && self.postgres_url.is_none()
            && self.mongodb_url.is_none()
            && self.kafka_brokers.is_none();
        if !redis_only {
            self.choice()?;
        }
        Ok(())
    }

    /// When the embedded store commits its B-trees (defaults in [`CheckpointPolicy::default`]).
    pub fn checkpoint_policy(&self) -> CheckpointPolicy {
        let mut p = CheckpointPolicy::default();
        if let Some(ms) = self.embedded_checkpoint_ms {
            p.interval = Duration::from_millis(ms.max(1));
        }
        if let Some(b) = self.embedded_checkpoint_bytes {
            p.bytes = b.max(1);
        }
        if let Some(n) = self.embedded_checkpoint_nice {
            p.nice = n.clamp(0, 19);
        }
        if let Some(us) = self.embedded_log_linger_us {
            // Bounded: it adds to the latency of every send under load.
            p.linger = Duration::from_micros(us.min(100_000));
        }
        if let Some(b) = self.embedded_cmid_filter_bytes {
            // Bounded: allocated whole at start (mapped as it fills).
            p.cmid_filter_bytes = b.min(MAX_CMID_FILTER_BYTES);
        }
        p
    }

    pub fn key_prefix(&self) -> String {
        self.key_prefix.clone().unwrap_or_else(|| crate::defaults::KEY_PREFIX.into())
    }

    pub fn topic_prefix(&self) -> String {
        self.topic_prefix.clone().unwrap_or_else(|| crate::defaults::TOPIC_PREFIX.into())
    }

    /// The roots TLS connections to the cluster's engines trust.
    pub fn backend_tls(&self) -> anyhow::Result<BackendTls> {
        match &self.backend_ca_file {
            Some(path) => Ok(BackendTls::with_ca_file(path)?),
            None => Ok(BackendTls::system()),
        }
    }

    /// How long a send waits for others to share its Kafka record.
    pub fn kafka_linger(&self) -> Duration {
        self.kafka_linger_ms.map_or(switchboard_storage::kafka::DEFAULT_LINGER, Duration::from_millis)
    }
}

/// The database a `mongodb://` URL names (`mongodb://host/db?options`), if any.
fn url_database(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let path = rest.split_once('/')?.1;
    let db = path.split('?').next().unwrap_or_default();
    (!db.is_empty()).then_some(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmid_filter_is_bounded_and_can_be_turned_off() {
        let policy =
            |b| StorageSettings { embedded_cmid_filter_bytes: Some(b), ..Default::default() }.checkpoint_policy();
        assert_eq!(policy(1 << 20).cmid_filter_bytes, 1 << 20);
        assert_eq!(policy(0).cmid_filter_bytes, 0);
        assert_eq!(policy(usize::MAX).cmid_filter_bytes, MAX_CMID_FILTER_BYTES);
    }

    fn cluster(pg: bool, mongo: bool) -> StorageSettings {
        StorageSettings {
            redis_url: Some("redis://r".into()),
            kafka_brokers: Some("k:9092".into()),
            postgres_url: pg.then(|| "postgres://p/db".into()),
            mongodb_url: mongo.then(|| "mongodb://m:27017/chat?replicaSet=rs0".into()),
            ..Default::default()
        }
    }

    fn durable(s: &StorageSettings) -> Durable {
        match s.choice().unwrap() {
            StoreChoice::Cluster { durable, .. } => durable,
            StoreChoice::Embedded => panic!("embedded"),
        }
    }

    #[test]
    fn the_backend_follows_the_urls_unless_named() {
        assert!(matches!(StorageSettings::default().choice().unwrap(), StoreChoice::Embedded));
        assert_eq!(durable(&cluster(true, false)), Durable::Postgres { url: "postgres://p/db".into() });
        assert_eq!(
            durable(&cluster(false, true)),
            Durable::Mongo { url: "mongodb://m:27017/chat?replicaSet=rs0".into(), database: "chat".into() }
        );
        let both = cluster(true, true);
        let err = both.choice().unwrap_err().to_string();
        assert!(err.contains("name the store with `backend`"), "{err}");
        let named = StorageSettings { backend: Some("mongodb".into()), mongodb_database: Some("x".into()), ..both };
        assert!(matches!(durable(&named), Durable::Mongo { database, .. } if database == "x"));
    }

    #[test]
    fn a_named_backend_needs_its_urls() {
        let s = StorageSettings { backend: Some("mongodb".into()), ..cluster(true, false) };
        let err = s.choice().unwrap_err().to_string();
        assert!(err.contains("needs mongodb_url (--mongodb-url)"), "{err}");
        let s = StorageSettings { backend: Some("postgres".into()), redis_url: None, ..cluster(true, false) };
        assert!(s.choice().unwrap_err().to_string().contains("redis_url"));
        let s = StorageSettings { backend: Some("embedded".into()), ..cluster(true, false) };
        let err = s.choice().unwrap_err().to_string();
        assert!(err.contains("redis_url, postgres_url, kafka_brokers"), "{err}");
        let s = StorageSettings { backend: Some("cassandra".into()), ..Default::default() };
        assert!(s.choice().unwrap_err().to_string().contains("expected embedded, postgres or mongodb"));
        let s = StorageSettings { redis_url: Some("redis://r".into()), ..Default::default() };
        assert!(s.choice().unwrap_err().to_string().contains("needs a durable store"));
    }

    #[test]
    fn mongodb_urls_name_their_database() {
        assert_eq!(url_database("mongodb://h:1/db?replicaSet=rs0"), Some("db"));
        assert_eq!(url_database("mongodb://u:p@h1,h2/db"), Some("db"));
        assert_eq!(url_database("mongodb://h:1/?replicaSet=rs0"), None);
        assert_eq!(url_database("mongodb://h:1"), None);
    }
}
