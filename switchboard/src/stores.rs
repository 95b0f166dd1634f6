//! Opens the stores a role runs on, as the `[storage]` section chooses them
//! ([`StorageSettings::choice`]): the embedded store in the data dir, or the cluster's Redis
//! and Kafka with PostgreSQL or MongoDB as the durable store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_logic::Stores;
use switchboard_storage::cluster::ClusterMessages;
use switchboard_storage::cluster_caches::{CachedGroups, CachedSocial};
use switchboard_storage::embedded::EmbeddedStore;
use switchboard_storage::files::{DirFiles, FileStore};
use switchboard_storage::kafka::{ensure_topics, Brokers, Producer, Topics};
use switchboard_storage::memory_routes::MemoryRoutes;
use switchboard_storage::postgres::PgStore;
use switchboard_storage::redis::RedisStore;
use switchboard_storage::{AccountStore, DurableLog, GroupStore, MessageStore, PartitionLocks, SocialStore};

use crate::settings::Settings;
use crate::storage_settings::{Durable, StorageSettings, StoreChoice};

/// The cluster's handles a logic instance keeps besides its stores.
pub(crate) struct ClusterParts {
    pub redis: RedisStore,
    pub messages: Arc<ClusterMessages>,
}

/// One durable store of the cluster behind every trait the roles use of it.
#[derive(Clone)]
pub(crate) struct DurableStore {
    pub accounts: Arc<dyn AccountStore>,
    pub social: Arc<dyn SocialStore>,
    pub groups: Arc<dyn GroupStore>,
    pub messages: Arc<dyn MessageStore>,
    pub files: Arc<dyn FileStore>,
    pub log: Arc<dyn DurableLog>,
    pub locks: Arc<dyn PartitionLocks>,
}

impl DurableStore {
    fn of<T>(store: T) -> Self
    where
        T: AccountStore + SocialStore + GroupStore + MessageStore + FileStore + DurableLog + PartitionLocks,
        T: Clone + 'static,
    {
        Self {
            accounts: Arc::new(store.clone()),
            social: Arc::new(store.clone()),
            groups: Arc::new(store.clone()),
            messages: Arc::new(store.clone()),
            files: Arc::new(store.clone()),
            log: Arc::new(store.clone()),
            locks: Arc::new(store),
        }
    }

    /// Connects to the durable store (`pool`: connections, where the driver pools them).
    pub async fn connect(durable: &Durable, storage: &StorageSettings, pool: usize) -> anyhow::Result<Self> {
        match durable {
            Durable::Postgres { url } => {
                let pg = PgStore::connect_tls(url, pool, &storage.backend_tls()?)
                    .await
                    .context("connecting to PostgreSQL")?;
                Ok(Self::of(pg))
            }
            #[cfg(feature = "mongodb")]
            Durable::Mongo { url, database } => {
                let mongo = switchboard_storage::mongo::MongoStore::connect(url, database)
                    .await
                    .context("connecting to MongoDB")?;
                Ok(Self::of(mongo))
            }
            #[cfg(not(feature = "mongodb"))]
            Durable::Mongo { .. } => anyhow::bail!("this binary was built without MongoDB (cargo feature `mongodb`)"),
        }
    }
}

/// The cluster engines a role needs: (redis URL, brokers, durable store), or an error naming
/// what is missing for `role`.
pub(crate) fn cluster_of(storage: &StorageSettings, role: &str) -> anyhow::Result<(String, Brokers, Durable)> {
    match storage.choice()? {
        StoreChoice::Cluster { redis, brokers, durable } => Ok((redis, brokers, durable)),
        StoreChoice::Embedded => anyhow::bail!(
            "the {role} role runs on the cluster: set --redis-url, --kafka-brokers and --postgres-url or --mongodb-url"
        ),
    }
}

/// What [`open`] opened besides the stores.
pub(crate) enum Opened {
    /// The embedded store, watched for its close.
    Embedded(switchboard_storage::embedded::ClosedWatch),
    /// The cluster's handles.
    Cluster(Box<ClusterParts>),
}

/// The stores a logic instance runs on, and the cluster's handles when it is one.
pub(crate) async fn open(s: &Settings) -> anyhow::Result<(Stores, Opened)> {
    let storage = &s.storage;
    let StoreChoice::Cluster { redis: redis_url, brokers, durable } = storage.choice()? else {
        let store = EmbeddedStore::open_with(&s.data_dir(), storage.checkpoint_policy())
            .context("opening the embedded store")?;
        let closed = store.closed_watch();
        let stores = Stores {
            accounts: Arc::new(store.clone()),
            social: Arc::new(store.clone()),
            messages: Arc::new(store.clone()),
            groups: Arc::new(store),
            files: Arc::new(DirFiles::open(&s.data_dir().join("files")).context("opening the file store")?),
            routes: Arc::new(MemoryRoutes::default()),
            registry: None,
        };
        return Ok((stores, Opened::Embedded(closed)));
    };
    let store = DurableStore::connect(&durable, storage, 8).await?;
    let redis = RedisStore::connect_tls(&redis_url, &storage.key_prefix(), &storage.backend_tls()?)
        .await
        .context("connecting to Redis")?;
    let topics = Topics::with_prefix(&storage.topic_prefix());
    ensure_topics(&brokers, &topics).await.context("creating Kafka topics")?;
    let producer = Producer::batching(&brokers, Duration::from_secs(10), storage.kafka_linger())
        .context("creating the Kafka producer")?;
    let messages = Arc::new(
        ClusterMessages::new(redis.clone(), producer, topics, store.messages.clone()).with_persisted_log(store.log),
    );
    let stores = Stores {
        accounts: store.accounts,
        social: CachedSocial::new(store.social, redis.clone()),
        files: store.files,
        groups: CachedGroups::new(store.groups, redis.clone()),
        messages: messages.clone(),
        routes: Arc::new(redis.clone()),
        registry: Some(Arc::new(redis.clone())),
    };
    Ok((stores, Opened::Cluster(Box::new(ClusterParts { redis, messages }))))
}
