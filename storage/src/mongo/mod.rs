//! The MongoDB backend: every store trait (and the cluster's [`DurableLog`])
//! over one MongoDB database, through the official driver. Semantics mirror
//! the PostgreSQL and embedded backends.
//!
//! Collections (`_id` is the natural key; compound keys join their parts
//! with a NUL byte, which no name contains):
//!
//! - `users`: `_id` username; nickname, password_hash, created_ms, banned
//!   (missing reads as false).
//! - `sessions`: `_id` session id; user, device, refresh_hash, revoked,
//!   created_ms, refresh_expires_ms.
//! - `refresh_tokens`: `_id` token hash (every hash ever issued);
//!   session_id. Index `{session_id: 1}`.
//! - `friends`: `_id` `user\0other`; user, other, state, note. Index
//!   `{user: 1, other: 1}`.
//! - `messages`: `_id` ObjectId; conv, seq, mid, from, cmid, type, body
//!   (JSON text), ts. Unique indexes `{conv: 1, seq: 1}` and
//!   `{conv: 1, from: 1, cmid: 1}`; index `{conv: 1, mid: 1}`.
//! - `conv_seq`: `_id` conv; last_seq, last_ts (the highest seq and ts
//!   allocated or stored).
//! - `user_convs`: `_id` `user\0conv`; user, conv. Index `{user: 1, conv: 1}`.
//! - `acks`: `_id` `user\0device\0conv`; user, device, conv, seq. Index
//!   `{user: 1, device: 1}`.
//! - `reads`: `_id` `user\0conv`; user, conv, seq. Index `{user: 1}`.
//! - `groups`: `_id` group id; name, owner, created_ms.
//! - `group_members`: `_id` `group\0user`; group, user, role. Indexes
//!   `{group: 1, user: 1}` and `{user: 1, group: 1}`.
//! - `mentions`: `_id` `user\0conv`; user, conv, seq (the highest seq mentioning the user).
//!   Index `{user: 1}`.
//! - messages also carry `refs` (JSON text: reply quote and mentions, when any) and the search
//!   fields `stext`, `stext_seq` and `terms` (see [`crate::search`]); index `{terms: 1}`.
//! - `push_tokens`: `_id` `user\0device`; user, device, platform, token, updated_ms. Unique
//!   index `{token: 1}`, index `{user: 1}`.
//! - `mutes`: `_id` `user\0conv`; user, conv, until_ms. Index `{user: 1}`.
//! - `persist_offsets`: `_id` `topic\0partition`; topic, part, next_offset
//!   (how far the persist worker got in each partition of the message topic).
//! - `persist_locks`: `_id` `topic\0partition`; topic, part, owner, expires: the persist
//!   workers' leases on partitions ([`locks`]).
//! - `files` and `file_chunks`: uploaded files ([`files`]). Index `{file: 1, n: 1}` on chunks.
//!
//! Bodies are stored as JSON text (as in PostgreSQL) so they round-trip
//! exactly. Unsigned numbers are stored as Int64; values above `i64::MAX`
//! (never produced by the stores themselves) are clamped to it. String order
//! is MongoDB's default binary comparison, i.e. byte order, as in redb.
//!
//! # Transactions
//!
//! Writes that touch several documents (an append: cmid check, seq
//! allocation, message, member index; a friend pair; a session and its
//! refresh token) run in a multi-document transaction, retried on
//! `TransientTransactionError` (write conflicts between racing appends of
//! one conversation) and with the commit retried on
//! `UnknownTransactionCommitResult`. MongoDB transactions require a replica
//! set (or a sharded cluster); the production deployment runs one.
//! `SB_MONGODB_TRANSACTIONS=0` turns them off, `=1` forces them on; unset,
//! they are used when the server reports a replica set or mongos.
//!
//! Without transactions (a standalone server, e.g. for development) every
//! single-document step is still atomic and seqs stay unique (allocation is
//! one `$inc`), but a multi-document step can be seen half done, a crash can
//! leave a seq gap, and two appends racing on one cmid leave a gap (the
//! loser returns the winner's message, as always).
//!
//! [`DurableLog::upsert_records`] never uses a transaction: it is idempotent
//! by design (counters with `$max`, unordered inserts whose duplicate-key
//! failures mean "already stored", member index by insert-if-missing), so
//! a redelivered batch repairs whatever a crash left half done. Its
//! partition offsets are written after the records, so a crash between the
//! two only redelivers records that are already stored.

mod files;
pub mod locks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{ClientOptions, IndexOptions, ReadConcern, ReturnDocument, WriteConcern};
use mongodb::results::UpdateResult;
use mongodb::{Client, ClientSession, Collection, Cursor, Database, IndexModel};

use crate::{
    now_ms, AccountStore, Appended, DurableLog, FriendState, Group, GroupStore, Message, MessageStore, NewMessage,
    PartitionOffset, RequestOutcome, Result, Role, SequencedRecord, Session, SocialStore, StorageError, User,
};

/// MongoDB's error code for a unique index violation.
const DUPLICATE_KEY: i32 = 11000;
/// The collection already exists (racing start-ups).
const NAMESPACE_EXISTS: i32 = 48;
/// An index with this name or these keys exists with other options: a real
/// schema conflict, not a race.
const INDEX_CONFLICTS: [i32; 2] = [85, 86];
/// How long one transactional operation keeps retrying transient failures
/// (the driver's own convenient API uses 120 s).
const TX_RETRY_LIMIT: Duration = Duration::from_secs(60);
/// How often an append starts over after a duplicate-key failure that was
/// not its own cmid (its seq taken by an upserted record).
const APPEND_ATTEMPTS: u32 = 16;

const USERS: &str = "users";
const SESSIONS: &str = "sessions";
const REFRESH_TOKENS: &str = "refresh_tokens";
const FRIENDS: &str = "friends";
const MESSAGES: &str = "messages";
const CONV_SEQ: &str = "conv_seq";
const USER_CONVS: &str = "user_convs";
const ACKS: &str = "acks";
const READS: &str = "reads";
const GROUPS: &str = "groups";
const GROUP_MEMBERS: &str = "group_members";
const PERSIST_OFFSETS: &str = "persist_offsets";
const BLOCKS: &str = "blocks";
const MENTIONS: &str = "mentions";
const PUSH_TOKENS: &str = "push_tokens";
const MUTES: &str = "mutes";
const PERSIST_LOCKS: &str = "persist_locks";
const FILES: &str = "files";
const FILE_CHUNKS: &str = "file_chunks";
const COLLECTIONS: [&str; 19] = [
    USERS,
    SESSIONS,
    REFRESH_TOKENS,
    FRIENDS,
    MESSAGES,
    CONV_SEQ,
    USER_CONVS,
    ACKS,
    READS,
    GROUPS,
    GROUP_MEMBERS,
    PERSIST_OFFSETS,
    BLOCKS,
    MENTIONS,
    PUSH_TOKENS,
    MUTES,
    PERSIST_LOCKS,
    FILES,
    FILE_CHUNKS,
];

impl From<mongodb::error::Error> for StorageError {
    fn from(e: mongodb::error::Error) -> Self {
        StorageError::Mongo(crate::error::driver_error(crate::error::Backend::Mongo, &e), Some(Box::new(e)))
    }
}

/// A failure inside this module, keeping the driver's error whole (its
/// labels and codes decide retries) until it leaves through a trait method.
#[derive(Debug)]
enum Fail {
    Mongo(mongodb::error::Error),
    Store(StorageError),
}

impl From<mongodb::error::Error> for Fail {
    fn from(e: mongodb::error::Error) -> Self {
        Fail::Mongo(e)
    }
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Self {
        Fail::Store(e)
    }
}

impl From<serde_json::Error> for Fail {
    fn from(e: serde_json::Error) -> Self {
        Fail::Store(e.into())
    }
}

impl From<Fail> for StorageError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Mongo(e) => e.into(),
            Fail::Store(e) => e,
        }
    }
}

type MResult<T> = std::result::Result<T, mongodb::error::Error>;
type FResult<T> = std::result::Result<T, Fail>;

/// A compound `_id`: the parts joined with NUL.
fn key(parts: &[&str]) -> String {
    parts.join("\u{0}")
}

/// A u64 as stored (Int64), clamped to `i64::MAX`.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored Int64 as u64 (the stores never write negative values).
fn uint(v: i64) -> u64 {
    v.max(0) as u64
}

/// Every write-error code the driver's error carries (a single write, each
/// failed document of an `insert_many`, or a failed command).
fn error_codes(e: &mongodb::error::Error) -> Vec<i32> {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => vec![w.code],
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => vec![w.code],
        ErrorKind::Command(c) => vec![c.code],
        ErrorKind::InsertMany(m) => {
            let mut codes: Vec<i32> = m.write_errors.iter().flatten().map(|w| w.code).collect();
            codes.extend(m.write_concern_error.iter().map(|w| w.code));
            codes
        }
        _ => Vec::new(),
    }
}

/// Whether the failure is (only) unique index violations.
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    let codes = error_codes(e);
    !codes.is_empty() && codes.iter().all(|&c| c == DUPLICATE_KEY)
}

/// For a failed unordered `insert_many`: how many documents were refused
/// as duplicates, when that is the only kind of failure (the others were
/// inserted). `None` for any other failure.
fn duplicates_only(e: &mongodb::error::Error) -> Option<u64> {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => {
            let errors = m.write_errors.as_deref().unwrap_or_default();
            (!errors.is_empty() && errors.iter().all(|w| w.code == DUPLICATE_KEY)).then_some(errors.len() as u64)
        }
        _ => is_duplicate_key(e).then_some(1),
    }
}

fn is_transient(e: &mongodb::error::Error) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR)
}

/// The upper bound (ms) of the random pause before retry `attempt` of a
/// transaction: doubling from 2 ms, at most 128 ms.
fn backoff_cap_ms(attempt: u32) -> u64 {
    1u64 << attempt.clamp(1, 7)
}

/// Whether to use transactions, from `SB_MONGODB_TRANSACTIONS` and the
/// server's `hello` reply: "0" never, "1" always, otherwise when the server
/// is a replica set member or a mongos.
fn use_transactions(setting: Option<&str>, hello: &Document) -> bool {
    match setting.map(str::trim) {
        Some("0") => false,
        Some("1") => true,
        _ => hello.get_str("setName").is_ok() || hello.get_str("msg").is_ok_and(|m| m == "isdbgrid"),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("mongodb: {what}"))
}

fn text(d: &Document, field: &str) -> Result<String> {
    match d.get(field) {
        Some(Bson::String(s)) => Ok(s.clone()),
        other => Err(corrupt(format_args!("field {field:?} is not a string: {other:?}"))),
    }
}

/// A stored number as u64; a missing field reads as 0.
fn number(d: &Document, field: &str) -> Result<u64> {
    match d.get(field) {
        None | Some(Bson::Null) => Ok(0),
        Some(Bson::Int64(v)) => Ok(uint(*v)),
        Some(Bson::Int32(v)) => Ok(uint(i64::from(*v))),
        Some(Bson::Double(v)) if v.is_finite() => Ok(v.max(0.0) as u64),
        other => Err(corrupt(format_args!("field {field:?} is not a number: {other:?}"))),
    }
}

fn flag(d: &Document, field: &str) -> Result<bool> {
    match d.get(field) {
        Some(Bson::Boolean(b)) => Ok(*b),
        other => Err(corrupt(format_args!("field {field:?} is not a boolean: {other:?}"))),
    }
}

fn message_doc(m: &Message) -> Result<Document> {
    let mut d = doc! {
        "conv": &m.conv,
        "seq": int(m.seq),
        "mid": &m.mid,
        "from": &m.from,
        "cmid": &m.cmid,
        "type": &m.kind,
        "body": serde_json::to_string(&m.body)?,
        "ts": int(m.ts),
    };
    if let Some(refs) = m.refs_json()? {
        d.insert("refs", refs);
    }
    if let crate::search::IndexChange::Add(text) = crate::search::change_of(m) {
        d.insert("terms", crate::search::doc_terms(&text));
        d.insert("stext", text);
        d.insert("stext_seq", int(m.seq));
    }
    Ok(d)
}

/// The fields a recall sets: type "recalled" and an empty string body.
fn recalled_fields() -> Result<Document> {
    Ok(doc! { "type": "recalled", "body": serde_json::to_string(&serde_json::Value::String(String::new()))? })
}

/// The fields a recall removes: references and search fields.
fn recalled_unset() -> Document {
    doc! { "refs": "", "stext": "", "terms": "" }
}

fn role_from_doc(d: &Document) -> Result<Role> {
    let role = text(d, "role")?;
    Role::parse(&role).ok_or_else(|| corrupt(format_args!("unknown group role {role:?}")))
}

fn group_doc(g: &Group) -> Document {
    doc! {
        "_id": &g.id, "name": &g.name, "owner": &g.owner, "created_ms": int(g.created_ms),
        "invite_only": g.invite_only,
    }
}

fn group_from_doc(d: &Document) -> Result<Group> {
    Ok(Group {
        id: text(d, "_id")?,
        name: text(d, "name")?,
        owner: text(d, "owner")?,
        created_ms: number(d, "created_ms")?,
        invite_only: d.get_bool("invite_only").unwrap_or(false),
    })
}

fn member_entry(group: &str, user: &str, role: Role) -> (String, Document) {
    (key(&[group, user]), doc! { "group": group, "user": user, "role": role.as_str() })
}

fn message_from_doc(d: &Document) -> Result<Message> {
    let mut m = Message {
        conv: text(d, "conv")?,
        seq: number(d, "seq")?,
        mid: text(d, "mid")?,
        from: text(d, "from")?,
        cmid: text(d, "cmid")?,
        kind: text(d, "type")?,
        body: serde_json::from_str(&text(d, "body")?)?,
        ts: number(d, "ts")?,
        reply_to: None,
        mentions: Vec::new(),
    };
    m.set_refs_json(d.get_str("refs").ok())?;
    Ok(m)
}

fn session_doc(s: &Session) -> Document {
    doc! {
        "user": &s.user,
        "device": &s.device,
        "refresh_hash": &s.refresh_hash,
        "revoked": s.revoked,
        "created_ms": int(s.created_ms),
        "refresh_expires_ms": int(s.refresh_expires_ms),
    }
}

fn session_from_doc(d: &Document) -> Result<Session> {
    Ok(Session {
        id: text(d, "_id")?,
        user: text(d, "user")?,
        device: text(d, "device")?,
        refresh_hash: text(d, "refresh_hash")?,
        revoked: flag(d, "revoked")?,
        created_ms: number(d, "created_ms")?,
        refresh_expires_ms: number(d, "refresh_expires_ms")?,
    })
}

fn state_from_doc(d: &Document) -> Result<FriendState> {
    let note = match d.get("note") {
        None | Some(Bson::Null) => String::new(),
        Some(_) => text(d, "note")?,
    };
    FriendState::from_parts(&text(d, "state")?, note)
}

async fn collect(mut cursor: Cursor<Document>) -> MResult<Vec<Document>> {
    let mut out = Vec::new();
    while cursor.advance().await? {
        out.push(cursor.deserialize_current()?);
    }
    Ok(out)
}

/// The operations of one transactional step: inside the transaction of
/// `session` when there is one, plain single-document-atomic calls
/// otherwise.
struct Ctx<'s> {
    session: Option<&'s mut ClientSession>,
}

impl Ctx<'_> {
    async fn find_one(&mut self, coll: &Collection<Document>, filter: Document) -> MResult<Option<Document>> {
        let op = coll.find_one(filter);
        match self.session.as_deref_mut() {
            Some(s) => op.session(s).await,
            None => op.await,
        }
    }

    async fn find(&mut self, coll: &Collection<Document>, filter: Document) -> MResult<Vec<Document>> {
        match self.session.as_deref_mut() {
            Some(s) => {
                let mut cursor = coll.find(filter).session(&mut *s).await?;
                let mut out = Vec::new();
                while cursor.advance(s).await? {
                    out.push(cursor.deserialize_current()?);
                }
                Ok(out)
            }
            None => collect(coll.find(filter).await?).await,
        }
    }

    async fn insert_one(&mut self, coll: &Collection<Document>, d: Document) -> MResult<()> {
        let op = coll.insert_one(d);
        match self.session.as_deref_mut() {
            Some(s) => op.session(s).await?,
            None => op.await?,
        };
        Ok(())
    }

    async fn update_one(
        &mut self,
        coll: &Collection<Document>,
        filter: Document,
        update: Document,
        upsert: bool,
    ) -> MResult<UpdateResult> {
        let op = coll.update_one(filter, update).upsert(upsert);
        match self.session.as_deref_mut() {
            Some(s) => op.session(s).await,
            None => op.await,
        }
    }

    /// Deletes the document with this `_id`; whether it existed.
    async fn delete_id(&mut self, coll: &Collection<Document>, id: &str) -> MResult<bool> {
        let op = coll.delete_one(doc! { "_id": id });
        let r = match self.session.as_deref_mut() {
            Some(s) => op.session(s).await?,
            None => op.await?,
        };
        Ok(r.deleted_count == 1)
    }

    /// Updates (creating if missing) and returns the document after the update.
    async fn upsert_and_get(
        &mut self,
        coll: &Collection<Document>,
        filter: Document,
        update: Document,
    ) -> MResult<Option<Document>> {
        let op = coll.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After);
        match self.session.as_deref_mut() {
            Some(s) => op.session(s).await,
            None => op.await,
        }
    }

    /// Inserts the documents whose `_id` is not stored yet. Inside a
    /// transaction it looks first (a duplicate key would abort the
    /// transaction); outside, duplicates of an unordered insert are ignored.
    async fn insert_missing(&mut self, coll: &Collection<Document>, docs: Vec<(String, Document)>) -> MResult<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let docs = if self.session.is_some() {
            let ids: Vec<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
            let found = self.find(coll, doc! { "_id": { "$in": ids } }).await?;
            let found: BTreeSet<String> =
                found.iter().filter_map(|d| d.get_str("_id").ok().map(str::to_owned)).collect();
            docs.into_iter().filter(|(id, _)| !found.contains(id)).collect()
        } else {
            docs
        };
        if docs.is_empty() {
            return Ok(());
        }
        let docs = docs.into_iter().map(|(id, mut d)| {
            d.insert("_id", id);
            d
        });
        match self.session.as_deref_mut() {
            Some(s) => coll.insert_many(docs).session(s).await.map(drop),
            None => match coll.insert_many(docs).ordered(false).await {
                Ok(_) => Ok(()),
                Err(e) if duplicates_only(&e).is_some() => Ok(()),
                Err(e) => Err(e),
            },
        }
    }
}

/// Runs `$body` (an expression over `$ctx: &mut Ctx`, returning a future of
/// `FResult<T>`) in a transaction when the store uses them, retrying
/// transient failures; evaluates to a future of `FResult<T>`.
macro_rules! transact {
    ($store:expr, |$ctx:ident| $body:expr) => {
        async {
            let started = Instant::now();
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let mut session = $store.begin().await?;
                let result = {
                    let mut ctx = Ctx { session: session.as_mut() };
                    let $ctx = &mut ctx;
                    $body.await
                };
                if let Some(v) = $store.finish(session, result, attempt, started).await? {
                    break FResult::Ok(v);
                }
            }
        }
    };
}

/// All stores over one MongoDB database. Cheap to clone (shares the
/// driver's connection pool).
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    users: Collection<Document>,
    sessions: Collection<Document>,
    refresh_tokens: Collection<Document>,
    friends: Collection<Document>,
    messages: Collection<Document>,
    conv_seq: Collection<Document>,
    user_convs: Collection<Document>,
    mentions: Collection<Document>,
    acks: Collection<Document>,
    reads: Collection<Document>,
    groups: Collection<Document>,
    group_members: Collection<Document>,
    persist_offsets: Collection<Document>,
    /// `_id` key(user, other): `user` blocks `other`.
    blocks: Collection<Document>,
    push_tokens: Collection<Document>,
    mutes: Collection<Document>,
    persist_locks: Collection<Document>,
    files: Collection<Document>,
    file_chunks: Collection<Document>,
    transactions: bool,
}

impl MongoStore {
    /// Connects to `url` (e.g. `mongodb://host:27017/?replicaSet=rs0`;
    /// `mongodb+srv://` is not supported: the driver's DNS resolver is not
    /// built in) and uses `database`, creating its collections and indexes
    /// if they are missing. Safe when several processes start at once.
    pub async fn connect(url: &str, database: &str) -> Result<MongoStore> {
        let mut options = ClientOptions::parse(url).await?;
        if options.app_name.is_none() {
            options.app_name = Some("switchboard".into());
        }
        if options.connect_timeout.is_none() {
            options.connect_timeout = Some(Duration::from_secs(10));
        }
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(10));
        }
        let client = Client::with_options(options)?;
        let db = client.database(database);
        let hello = match db.run_command(doc! { "hello": 1 }).await {
            Ok(h) => h,
            // Servers before 4.4.2 only know the legacy name.
            Err(_) => db.run_command(doc! { "isMaster": 1 }).await?,
        };
        let setting = std::env::var("SB_MONGODB_TRANSACTIONS").ok();
        let transactions = use_transactions(setting.as_deref(), &hello);
        let coll = |name: &str| db.collection::<Document>(name);
        let store = MongoStore {
            users: coll(USERS),
            sessions: coll(SESSIONS),
            refresh_tokens: coll(REFRESH_TOKENS),
            friends: coll(FRIENDS),
            messages: coll(MESSAGES),
            conv_seq: coll(CONV_SEQ),
            user_convs: coll(USER_CONVS),
            mentions: coll(MENTIONS),
            acks: coll(ACKS),
            reads: coll(READS),
            groups: coll(GROUPS),
            group_members: coll(GROUP_MEMBERS),
            persist_offsets: coll(PERSIST_OFFSETS),
            blocks: coll(BLOCKS),
            push_tokens: coll(PUSH_TOKENS),
            mutes: coll(MUTES),
            persist_locks: coll(PERSIST_LOCKS),
            files: coll(FILES),
            file_chunks: coll(FILE_CHUNKS),
            client,
            db,
            transactions,
        };
        store.create_schema().await?;
        Ok(store)
    }

    /// Whether multi-document writes run in transactions (see the module docs).
    pub fn uses_transactions(&self) -> bool {
        self.transactions
    }

    /// The database the stores live in (for tooling and tests).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Drops the whole database (test tear-down).
    pub async fn drop_database(&self) -> Result<()> {
        self.db.drop().await?;
        Ok(())
    }

    async fn create_schema(&self) -> Result<()> {
        // Collections first (transactions may not create them implicitly on
        // older servers), then indexes. Both are idempotent; racing
        // start-ups can still collide, hence the retries.
        for name in COLLECTIONS {
            match self.db.create_collection(name).await {
                Ok(()) => {}
                Err(e) if error_codes(&e).contains(&NAMESPACE_EXISTS) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let index = |keys: Document, unique: bool| {
            let options = IndexOptions::builder().unique(unique.then_some(true)).build();
            IndexModel::builder().keys(keys).options(options).build()
        };
        let indexes = [
            (&self.refresh_tokens, vec![index(doc! { "session_id": 1 }, false)]),
            (&self.friends, vec![index(doc! { "user": 1, "other": 1 }, false)]),
            (&self.blocks, vec![index(doc! { "user": 1, "other": 1 }, false)]),
            (
                &self.messages,
                vec![
                    index(doc! { "conv": 1, "seq": 1 }, true),
                    index(doc! { "conv": 1, "from": 1, "cmid": 1 }, true),
                    index(doc! { "conv": 1, "mid": 1 }, false),
                    index(doc! { "terms": 1 }, false),
                ],
            ),
            (&self.mentions, vec![index(doc! { "user": 1 }, false)]),
            (&self.push_tokens, vec![index(doc! { "token": 1 }, true), index(doc! { "user": 1 }, false)]),
            (&self.mutes, vec![index(doc! { "user": 1 }, false)]),
            (&self.file_chunks, vec![index(doc! { "file": 1, "n": 1 }, false)]),
            (&self.user_convs, vec![index(doc! { "user": 1, "conv": 1 }, false)]),
            (&self.acks, vec![index(doc! { "user": 1, "device": 1 }, false)]),
            (&self.reads, vec![index(doc! { "user": 1 }, false)]),
            (
                &self.group_members,
                vec![index(doc! { "group": 1, "user": 1 }, false), index(doc! { "user": 1, "group": 1 }, false)],
            ),
        ];
        for (coll, models) in indexes {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match coll.create_indexes(models.clone()).await {
                    Ok(_) => break,
                    Err(e) if attempt < 5 && !error_codes(&e).iter().any(|c| INDEX_CONFLICTS.contains(c)) => {
                        tracing::debug!("mongodb: creating indexes of {} (attempt {attempt}): {e}", coll.name());
                        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// A session with a started transaction, or `None` without transactions.
    async fn begin(&self) -> FResult<Option<ClientSession>> {
        if !self.transactions {
            return Ok(None);
        }
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .read_concern(ReadConcern::snapshot())
            .write_concern(WriteConcern::majority())
            .await?;
        Ok(Some(session))
    }

    /// Ends one attempt of a transactional step: commits on success;
    /// `Ok(None)` means "run the step again" (a transient failure).
    async fn finish<T>(
        &self,
        session: Option<ClientSession>,
        result: FResult<T>,
        attempt: u32,
        started: Instant,
    ) -> FResult<Option<T>> {
        let Some(mut session) = session else { return result.map(Some) };
        let may_retry = || started.elapsed() < TX_RETRY_LIMIT;
        match result {
            Ok(v) => loop {
                match session.commit_transaction().await {
                    Ok(()) => return Ok(Some(v)),
                    // The commit may or may not have applied: committing
                    // again is safe and tells.
                    Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && may_retry() => continue,
                    Err(e) if is_transient(&e) && may_retry() => {
                        Self::pause(attempt).await;
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            },
            Err(Fail::Mongo(e)) if is_transient(&e) && may_retry() => {
                // The server has usually aborted it already; ignore "no
                // such transaction".
                let _ = session.abort_transaction().await;
                Self::pause(attempt).await;
                Ok(None)
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                Err(e)
            }
        }
    }

    async fn pause(attempt: u32) {
        let ms = rand::random::<u64>() % (backoff_cap_ms(attempt) + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn relation(&self, ctx: &mut Ctx<'_>, a: &str, b: &str) -> FResult<Option<FriendState>> {
        let found = ctx.find_one(&self.friends, doc! { "_id": key(&[a, b]) }).await?;
        Ok(found.as_ref().map(state_from_doc).transpose()?)
    }

    async fn put_relation(&self, ctx: &mut Ctx<'_>, a: &str, b: &str, s: &FriendState) -> FResult<()> {
        let (state, note) = s.parts();
        let set = doc! { "$set": { "user": a, "other": b, "state": state, "note": note } };
        ctx.update_one(&self.friends, doc! { "_id": key(&[a, b]) }, set, true).await?;
        Ok(())
    }

    /// Deletes the relation in both directions; whether `a -> b` existed.
    async fn remove_pair(&self, ctx: &mut Ctx<'_>, a: &str, b: &str) -> FResult<bool> {
        let existed = ctx.delete_id(&self.friends, &key(&[a, b])).await?;
        ctx.delete_id(&self.friends, &key(&[b, a])).await?;
        Ok(existed)
    }

    async fn put_session_in(&self, ctx: &mut Ctx<'_>, s: &Session) -> FResult<()> {
        ctx.update_one(&self.sessions, doc! { "_id": &s.id }, doc! { "$set": session_doc(s) }, true).await?;
        self.put_token(ctx, &s.refresh_hash, &s.id).await
    }

    async fn put_token(&self, ctx: &mut Ctx<'_>, hash: &str, session_id: &str) -> FResult<()> {
        let set = doc! { "$set": { "session_id": session_id } };
        ctx.update_one(&self.refresh_tokens, doc! { "_id": hash }, set, true).await?;
        Ok(())
    }

    async fn rotate_in(&self, ctx: &mut Ctx<'_>, id: &str, old: &str, new: &str, expires_ms: u64) -> FResult<bool> {
        // The conditional update is atomic on its document, so of two
        // racing rotations with the same old hash only one matches.
        let filter = doc! { "_id": id, "refresh_hash": old, "revoked": false };
        let set = doc! { "$set": { "refresh_hash": new, "refresh_expires_ms": int(expires_ms) } };
        if ctx.update_one(&self.sessions, filter, set, false).await?.matched_count != 1 {
            return Ok(false);
        }
        self.put_token(ctx, new, id).await?;
        Ok(true)
    }

    async fn block_in(&self, ctx: &mut Ctx<'_>, user: &str, other: &str, block: bool) -> FResult<bool> {
        let id = key(&[user, other]);
        if !block {
            return Ok(ctx.delete_id(&self.blocks, &id).await?);
        }
        let set = doc! { "$set": { "user": user, "other": other } };
        if ctx.update_one(&self.blocks, doc! { "_id": &id }, set, true).await?.upserted_id.is_none() {
            return Ok(false);
        }
        self.remove_pair(ctx, user, other).await?;
        Ok(true)
    }

    async fn request_in(&self, ctx: &mut Ctx<'_>, from: &str, to: &str, note: &str) -> FResult<RequestOutcome> {
        for id in [key(&[from, to]), key(&[to, from])] {
            if ctx.find_one(&self.blocks, doc! { "_id": id }).await?.is_some() {
                return Ok(RequestOutcome::Blocked);
            }
        }
        Ok(match self.relation(ctx, from, to).await? {
            Some(FriendState::Friends) => RequestOutcome::AlreadyFriends,
            Some(FriendState::Incoming { .. }) => {
                self.put_relation(ctx, from, to, &FriendState::Friends).await?;
                self.put_relation(ctx, to, from, &FriendState::Friends).await?;
                RequestOutcome::BecameFriends
            }
            Some(FriendState::Outgoing { .. }) | None => {
                self.put_relation(ctx, from, to, &FriendState::Outgoing { note: note.to_owned() }).await?;
                self.put_relation(ctx, to, from, &FriendState::Incoming { note: note.to_owned() }).await?;
                RequestOutcome::Pending
            }
        })
    }

    /// `user` accepts (both become friends) or rejects (both relations go)
    /// the pending request of `from`; `false` if there is none.
    async fn answer_in(&self, ctx: &mut Ctx<'_>, user: &str, from: &str, accept: bool) -> FResult<bool> {
        if !matches!(self.relation(ctx, user, from).await?, Some(FriendState::Incoming { .. })) {
            return Ok(false);
        }
        if accept {
            self.put_relation(ctx, user, from, &FriendState::Friends).await?;
            self.put_relation(ctx, from, user, &FriendState::Friends).await?;
        } else {
            self.remove_pair(ctx, user, from).await?;
        }
        Ok(true)
    }

    /// One attempt of an append (see [`MessageStore::append`]).
    async fn append_in(&self, ctx: &mut Ctx<'_>, msg: &NewMessage, members: &[&str]) -> FResult<Appended> {
        let by_cmid = doc! { "conv": &msg.conv, "from": &msg.from, "cmid": &msg.cmid };
        if let Some(d) = ctx.find_one(&self.messages, by_cmid).await? {
            return Ok(Appended { msg: message_from_doc(&d)?, duplicate: true, json: None });
        }
        // The next seq, and a ts that never goes backwards inside the
        // conversation (so seq order and time order agree even if the wall
        // clock steps back). In a transaction this write also serialises
        // racing appends of the conversation (write conflicts, retried).
        let counter = ctx
            .upsert_and_get(
                &self.conv_seq,
                doc! { "_id": &msg.conv },
                doc! { "$inc": { "last_seq": 1i64 }, "$max": { "last_ts": int(now_ms()) } },
            )
            .await?
            .ok_or_else(|| corrupt("conv_seq upsert returned no document"))?;
        let ts = number(&counter, "last_ts")?;
        let stored = msg.clone().stored_as(number(&counter, "last_seq")?, ts);
        ctx.insert_one(&self.messages, message_doc(&stored)?).await?;
        let entries =
            members.iter().map(|u| (key(&[u, &stored.conv]), doc! { "user": *u, "conv": &stored.conv })).collect();
        ctx.insert_missing(&self.user_convs, entries).await?;
        Ok(Appended { msg: stored, duplicate: false, json: None })
    }

    /// One attempt of [`GroupStore::create_group`].
    async fn create_group_in(&self, ctx: &mut Ctx<'_>, group: &Group, members: &[&str]) -> FResult<bool> {
        if ctx.find_one(&self.groups, doc! { "_id": &group.id }).await?.is_some() {
            return Ok(false);
        }
        ctx.insert_one(&self.groups, group_doc(group)).await?;
        let mut entries = vec![member_entry(&group.id, &group.owner, Role::Owner)];
        entries.extend(members.iter().map(|u| member_entry(&group.id, u, Role::Member)));
        ctx.insert_missing(&self.group_members, entries).await?;
        Ok(true)
    }

    async fn find_messages(&self, filter: Document, descending: bool, limit: usize) -> Result<Vec<Message>> {
        if limit == 0 {
            // MongoDB reads a limit of 0 as "no limit".
            return Ok(Vec::new());
        }
        let order = if descending { -1 } else { 1 };
        let cursor = self.messages.find(filter).sort(doc! { "seq": order }).limit(int(limit as u64)).await?;
        collect(cursor).await?.iter().map(message_from_doc).collect()
    }
}

#[async_trait]
impl AccountStore for MongoStore {
    async fn create_user(&self, user: &User) -> Result<bool> {
        let d = doc! {
            "_id": &user.username,
            "nickname": &user.nickname,
            "password_hash": &user.password_hash,
            "created_ms": int(user.created_ms),
            "banned": user.banned,
        };
        match self.users.insert_one(d).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_user(&self, username: &str) -> Result<Option<User>> {
        let Some(d) = self.users.find_one(doc! { "_id": username }).await? else { return Ok(None) };
        Ok(Some(User {
            username: text(&d, "_id")?,
            nickname: text(&d, "nickname")?,
            password_hash: text(&d, "password_hash")?,
            created_ms: number(&d, "created_ms")?,
            banned: match d.get("banned") {
                None | Some(Bson::Null) => false,
                Some(_) => flag(&d, "banned")?,
            },
        }))
    }

    async fn put_session(&self, session: &Session) -> Result<()> {
        Ok(transact!(self, |ctx| self.put_session_in(ctx, session)).await?)
    }

    async fn get_session(&self, id: &str) -> Result<Option<Session>> {
        self.sessions.find_one(doc! { "_id": id }).await?.as_ref().map(session_from_doc).transpose()
    }

    async fn session_by_refresh(&self, refresh_hash: &str) -> Result<Option<Session>> {
        let Some(token) = self.refresh_tokens.find_one(doc! { "_id": refresh_hash }).await? else { return Ok(None) };
        self.get_session(&text(&token, "session_id")?).await
    }

    async fn rotate_refresh(&self, session_id: &str, old_hash: &str, new_hash: &str, expires_ms: u64) -> Result<bool> {
        Ok(transact!(self, |ctx| self.rotate_in(ctx, session_id, old_hash, new_hash, expires_ms)).await?)
    }

    async fn prune_sessions(&self, before_ms: u64) -> Result<usize> {
        let expired = doc! { "refresh_expires_ms": { "$lt": int(before_ms) } };
        let found = collect(self.sessions.find(expired).projection(doc! { "_id": 1 }).await?).await?;
        let ids: Vec<String> = found.iter().map(|d| text(d, "_id")).collect::<Result<_>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        // Tokens first: a crash in between leaves sessions that the next prune finds again.
        self.refresh_tokens.delete_many(doc! { "session_id": { "$in": &ids } }).await?;
        let r = self.sessions.delete_many(doc! { "_id": { "$in": &ids } }).await?;
        Ok(r.deleted_count as usize)
    }

    async fn revoke_session(&self, id: &str) -> Result<()> {
        self.sessions.update_one(doc! { "_id": id }, doc! { "$set": { "revoked": true } }).await?;
        Ok(())
    }

    async fn set_banned(&self, username: &str, banned: bool) -> Result<bool> {
        let r = self.users.update_one(doc! { "_id": username }, doc! { "$set": { "banned": banned } }).await?;
        Ok(r.matched_count == 1)
    }

    async fn put_push_token(&self, t: &crate::PushToken) -> Result<()> {
        let id = key(&[t.user.as_str(), t.device.as_str()]);
        self.push_tokens.delete_many(doc! { "token": &t.token, "_id": { "$ne": &id } }).await?;
        let d = doc! {
            "user": &t.user, "device": &t.device, "platform": &t.platform, "token": &t.token,
            "updated_ms": int(t.updated_ms),
        };
        self.push_tokens.replace_one(doc! { "_id": &id }, d).upsert(true).await?;
        Ok(())
    }

    async fn remove_push_token(&self, user: &str, device: &str) -> Result<bool> {
        Ok(self.push_tokens.delete_one(doc! { "_id": key(&[user, device]) }).await?.deleted_count == 1)
    }

    async fn push_tokens(&self, user: &str) -> Result<Vec<crate::PushToken>> {
        let cursor = self.push_tokens.find(doc! { "user": user }).sort(doc! { "device": 1 }).await?;
        collect(cursor)
            .await?
            .iter()
            .map(|d| {
                Ok(crate::PushToken {
                    user: text(d, "user")?,
                    device: text(d, "device")?,
                    platform: text(d, "platform")?,
                    token: text(d, "token")?,
                    updated_ms: number(d, "updated_ms")?,
                })
            })
            .collect()
    }

    async fn set_mute(&self, user: &str, conv: &str, until_ms: Option<u64>) -> Result<()> {
        let id = key(&[user, conv]);
        match until_ms {
            Some(until) => {
                let d = doc! { "user": user, "conv": conv, "until_ms": int(until) };
                self.mutes.replace_one(doc! { "_id": &id }, d).upsert(true).await?;
            }
            None => {
                self.mutes.delete_one(doc! { "_id": &id }).await?;
            }
        }
        Ok(())
    }

    async fn mutes(&self, user: &str) -> Result<HashMap<String, u64>> {
        let found = collect(self.mutes.find(doc! { "user": user }).await?).await?;
        // `u64::MAX` (for good) is stored as the largest Int64
        let forever = |until: u64| if until >= i64::MAX as u64 { u64::MAX } else { until };
        found.iter().map(|d| Ok((text(d, "conv")?, forever(number(d, "until_ms")?)))).collect()
    }
}

#[async_trait]
impl SocialStore for MongoStore {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        self.friends.find_one(doc! { "_id": key(&[user, other]) }).await?.as_ref().map(state_from_doc).transpose()
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        // Every change of a pair writes the pair's documents, so racing
        // changes of one pair conflict and run one after the other.
        Ok(transact!(self, |ctx| self.request_in(ctx, from, to, note)).await?)
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        Ok(transact!(self, |ctx| self.answer_in(ctx, user, from, true)).await?)
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        Ok(transact!(self, |ctx| self.answer_in(ctx, user, from, false)).await?)
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        Ok(transact!(self, |ctx| self.remove_pair(ctx, user, other)).await?)
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        let cursor = self.friends.find(doc! { "user": user }).sort(doc! { "other": 1 }).await?;
        collect(cursor).await?.iter().map(|d| Ok((text(d, "other")?, state_from_doc(d)?))).collect()
    }

    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool> {
        Ok(transact!(self, |ctx| self.block_in(ctx, user, other, block)).await?)
    }

    async fn blocks(&self, user: &str, other: &str) -> Result<bool> {
        Ok(self.blocks.find_one(doc! { "_id": key(&[user, other]) }).await?.is_some())
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>> {
        let cursor = self.blocks.find(doc! { "user": user }).sort(doc! { "other": 1 }).await?;
        collect(cursor).await?.iter().map(|d| text(d, "other")).collect()
    }
}

#[async_trait]
impl MessageStore for MongoStore {
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        let members: BTreeSet<&str> = members.iter().map(String::as_str).collect();
        let members: Vec<&str> = members.into_iter().collect();
        for _ in 0..APPEND_ATTEMPTS {
            match transact!(self, |ctx| self.append_in(ctx, &msg, &members)).await {
                Ok(appended) => {
                    // also for a duplicate (idempotent): the first attempt may have failed here
                    self.index_stored(&[&appended.msg]).await?;
                    return Ok(appended);
                }
                Err(Fail::Mongo(e)) if is_duplicate_key(&e) => {
                    // Either a racing append with this cmid won (return its
                    // message, as if it had been found first), or the seq
                    // was taken by an upserted record: allocate again.
                    if let Some(m) = self.find_cmid(&msg.conv, &msg.from, &msg.cmid).await? {
                        return Ok(Appended { msg: m, duplicate: true, json: None });
                    }
                    tracing::debug!("mongodb: append to {} hit a taken seq, retrying: {e}", msg.conv);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StorageError::mongo(format!("append to {}: seq still taken after {APPEND_ATTEMPTS} attempts", msg.conv)))
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        let filter = doc! { "conv": conv, "from": from, "cmid": cmid };
        self.messages.find_one(filter).await?.as_ref().map(message_from_doc).transpose()
    }

    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        self.find_messages(doc! { "conv": conv, "seq": { "$gt": int(after_seq) } }, false, limit).await
    }

    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>> {
        let before = int(before_seq.unwrap_or(u64::MAX));
        self.find_messages(doc! { "conv": conv, "seq": { "$lt": before } }, true, limit).await
    }

    async fn last_seq(&self, conv: &str) -> Result<u64> {
        match self.conv_seq.find_one(doc! { "_id": conv }).await? {
            Some(d) => number(&d, "last_seq"),
            None => Ok(0),
        }
    }

    async fn last_seqs(&self, convs: &[String]) -> Result<Vec<u64>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = HashMap::with_capacity(convs.len());
        for d in collect(self.conv_seq.find(doc! { "_id": { "$in": convs } }).await?).await? {
            found.insert(text(&d, "_id")?, number(&d, "last_seq")?);
        }
        Ok(convs.iter().map(|conv| found.get(conv).copied().unwrap_or(0)).collect())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let cursor = self.user_convs.find(doc! { "user": user }).sort(doc! { "conv": 1 }).await?;
        let convs = collect(cursor).await?.iter().map(|d| text(d, "conv")).collect::<Result<Vec<_>>>()?;
        let seqs = self.last_seqs(&convs).await?;
        Ok(convs.into_iter().zip(seqs).collect())
    }

    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()> {
        if seq == 0 {
            // As in the embedded store: an ack of 0 records nothing.
            return Ok(());
        }
        let filter = doc! { "_id": key(&[user, device, conv]) };
        let update = doc! {
            "$max": { "seq": int(seq) },
            "$setOnInsert": { "user": user, "device": device, "conv": conv },
        };
        match self.acks.update_one(filter.clone(), update.clone()).upsert(true).await {
            Ok(_) => Ok(()),
            // Two first acks racing: one upsert inserts, the other must
            // update (the server usually retries this itself).
            Err(e) if is_duplicate_key(&e) => {
                self.acks.update_one(filter, update).upsert(true).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>> {
        let cursor = self.acks.find(doc! { "user": user, "device": device }).await?;
        collect(cursor).await?.iter().map(|d| Ok((text(d, "conv")?, number(d, "seq")?))).collect()
    }

    async fn user_acked(&self, user: &str, conv: &str) -> Result<u64> {
        let cursor = self.acks.find(doc! { "user": user, "conv": conv }).await?;
        collect(cursor).await?.iter().map(|d| number(d, "seq")).try_fold(0, |max, s| s.map(|s| max.max(s)))
    }

    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64> {
        let filter = doc! { "_id": key(&[user, conv]) };
        if seq == 0 {
            // As with acks: a read of 0 records nothing.
            return match self.reads.find_one(filter).await? {
                Some(d) => number(&d, "seq"),
                None => Ok(0),
            };
        }
        let update = doc! {
            "$max": { "seq": int(seq) },
            "$setOnInsert": { "user": user, "conv": conv },
        };
        let upsert = || {
            self.reads
                .find_one_and_update(filter.clone(), update.clone())
                .upsert(true)
                .return_document(ReturnDocument::After)
        };
        let stored = match upsert().await {
            Ok(d) => d,
            // Two first reads racing: one upsert inserts, the other must update.
            Err(e) if is_duplicate_key(&e) => upsert().await?,
            Err(e) => return Err(e.into()),
        };
        let stored = stored.ok_or_else(|| corrupt("reads upsert returned no document"))?;
        number(&stored, "seq")
    }

    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>> {
        let cursor = self.reads.find(doc! { "user": user }).await?;
        collect(cursor).await?.iter().map(|d| Ok((text(d, "conv")?, number(d, "seq")?))).collect()
    }

    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>> {
        self.messages.find_one(doc! { "conv": conv, "mid": mid }).await?.as_ref().map(message_from_doc).transpose()
    }

    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let filter = doc! { "conv": conv, "seq": int(seq) };
        let update = doc! { "$set": recalled_fields()?, "$unset": recalled_unset() };
        let found = self.messages.find_one_and_update(filter, update).return_document(ReturnDocument::After).await?;
        found.as_ref().map(message_from_doc).transpose()
    }

    async fn mentions(&self, user: &str) -> Result<HashMap<String, u64>> {
        let found = collect(self.mentions.find(doc! { "user": user }).await?).await?;
        found.iter().map(|d| Ok((text(d, "conv")?, number(d, "seq")?))).collect()
    }

    async fn search(&self, q: &crate::search::SearchQuery) -> Result<Vec<crate::search::Found>> {
        let mut filter = doc! {
            "conv": { "$in": &q.convs },
            "terms": { "$all": &q.terms },
            "ts": { "$lt": int(q.before_ts.unwrap_or(u64::MAX)) },
        };
        if let Some(from) = &q.from {
            filter.insert("from", from);
        }
        let cursor = self.messages.find(filter).sort(doc! { "ts": -1, "seq": -1 }).limit(int(q.limit as u64)).await?;
        collect(cursor)
            .await?
            .iter()
            .map(|d| Ok(crate::search::Found { msg: message_from_doc(d)?, text: text(d, "stext")? }))
            .collect()
    }
}

impl MongoStore {
    /// Gives the stored message (conv, seq) of `m` the type and body of
    /// `m`; whether there was one.
    async fn recall_stored(&self, m: &Message) -> Result<bool> {
        let filter = doc! { "conv": &m.conv, "seq": int(m.seq) };
        let update = doc! {
            "$set": { "type": &m.kind, "body": serde_json::to_string(&m.body)? },
            "$unset": recalled_unset(),
        };
        Ok(self.messages.update_one(filter, update).await?.matched_count == 1)
    }

    /// The derived indexes of newly stored messages, as in PostgreSQL (idempotent): mention
    /// marks raised, edited targets given the edit's text unless a later edit did.
    async fn index_stored(&self, msgs: &[&Message]) -> Result<()> {
        for m in msgs {
            // only a message that is stored (a void or an earlier record may hold its seq)
            if !m.mentions.is_empty() {
                let stored = self.messages.find_one(doc! { "conv": &m.conv, "seq": int(m.seq) }).await?;
                if stored.as_ref().and_then(|d| d.get_str("mid").ok()) != Some(m.mid.as_str()) {
                    continue;
                }
            }
            for u in &m.mentions {
                let filter = doc! { "_id": key(&[u.as_str(), m.conv.as_str()]) };
                let update = doc! { "$set": { "user": u, "conv": &m.conv }, "$max": { "seq": int(m.seq) } };
                match self.mentions.update_one(filter.clone(), update.clone()).upsert(true).await {
                    Ok(_) => {}
                    Err(e) if is_duplicate_key(&e) => {
                        self.mentions.update_one(filter, update).upsert(true).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if let crate::search::IndexChange::Edit { mid, text } = crate::search::change_of(m) {
                // Only an edit that is stored (a void may have taken its seq).
                let stored = self.messages.find_one(doc! { "conv": &m.conv, "seq": int(m.seq) }).await?;
                if stored.as_ref().and_then(|d| d.get_str("type").ok()) != Some("edit") {
                    continue;
                }
                let filter = doc! {
                    "conv": &m.conv, "mid": &mid, "stext": { "$exists": true }, "stext_seq": { "$lt": int(m.seq) },
                };
                let set = doc! {
                    "stext": &text, "stext_seq": int(m.seq), "terms": crate::search::doc_terms(&text),
                };
                self.messages.update_one(filter, doc! { "$set": set }).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DurableLog for MongoStore {
    async fn upsert_records_at(&self, records: &[SequencedRecord], offsets: &[PartitionOffset]) -> Result<u64> {
        let inserted = self.upsert_records_only(records).await?;
        // After the records (see the module docs); the last offset given
        // for a partition wins.
        for o in offsets {
            let part = o.partition.to_string();
            let filter = doc! { "_id": key(&[o.topic.as_str(), part.as_str()]) };
            let update = doc! { "$set": { "topic": &o.topic, "part": o.partition, "next_offset": o.next_offset } };
            self.persist_offsets.update_one(filter, update).upsert(true).await?;
        }
        Ok(inserted)
    }

    async fn partition_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>> {
        let found = collect(self.persist_offsets.find(doc! { "topic": topic }).await?).await?;
        found
            .iter()
            .map(|d| match (d.get("part"), d.get("next_offset")) {
                (Some(Bson::Int32(p)), Some(Bson::Int64(n))) => Ok((*p, *n)),
                other => Err(corrupt(format_args!("persist offset {d}: {other:?}"))),
            })
            .collect()
    }
}

impl MongoStore {
    /// The record upserts of [`DurableLog::upsert_records`].
    async fn upsert_records_only(&self, records: &[SequencedRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        // Counters first (as in PostgreSQL): an append that starts after
        // this allocates above every record of the batch; one that
        // allocated earlier and collides with a record retries (or the
        // record is skipped if the append stored first).
        let mut tops: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut members: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut docs = Vec::with_capacity(records.len());
        let mut recalls: BTreeMap<(&str, u64), &Message> = BTreeMap::new();
        // Only the first record of a (conv, seq) in the batch, as in the
        // partition (a void and its seq's message may share a batch).
        let mut seen = BTreeSet::new();
        for r in records {
            let m = &r.msg;
            let top = tops.entry(m.conv.as_str()).or_default();
            *top = (top.0.max(m.seq), top.1.max(m.ts));
            members.extend(r.members.iter().map(|u| (u.as_str(), m.conv.as_str())));
            if r.recall {
                recalls.insert((m.conv.as_str(), m.seq), m);
            } else if seen.insert((m.conv.as_str(), m.seq)) {
                docs.push(message_doc(m)?);
            }
        }
        for (conv, (seq, ts)) in tops {
            let filter = doc! { "_id": conv };
            let update = doc! { "$max": { "last_seq": int(seq), "last_ts": int(ts) } };
            match self.conv_seq.update_one(filter.clone(), update.clone()).upsert(true).await {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {
                    self.conv_seq.update_one(filter, update).upsert(true).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // A record whose (conv, seq) is stored, or whose (conv, from, cmid)
        // is already taken, is skipped, not an error.
        let plain = docs.len() as u64;
        let mut inserted = match docs.is_empty() {
            true => 0,
            false => match self.messages.insert_many(docs).ordered(false).await {
                Ok(r) => r.inserted_ids.len() as u64,
                Err(e) => match duplicates_only(&e) {
                    Some(skipped) => plain.saturating_sub(skipped),
                    None => return Err(e.into()),
                },
            },
        };
        // Recalls after the originals of the batch: a stored message takes
        // the recalled type and body; a missing one is stored in its
        // recalled form, so that its original, arriving later, is skipped.
        for m in recalls.into_values() {
            if self.recall_stored(m).await? {
                continue;
            }
            match self.messages.insert_one(message_doc(m)?).await {
                Ok(_) => inserted += 1,
                // The original (or its cmid) was stored meanwhile: recall it.
                Err(e) if is_duplicate_key(&e) => {
                    self.recall_stored(m).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let entries = members.into_iter().map(|(u, c)| (key(&[u, c]), doc! { "user": u, "conv": c })).collect();
        Ctx { session: None }.insert_missing(&self.user_convs, entries).await?;
        let plain: Vec<&Message> = records.iter().filter(|r| !r.recall).map(|r| &r.msg).collect();
        self.index_stored(&plain).await?;
        Ok(inserted)
    }
}

#[async_trait]
impl GroupStore for MongoStore {
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool> {
        let members: BTreeSet<&str> = members.iter().map(String::as_str).filter(|u| *u != group.owner).collect();
        let members: Vec<&str> = members.into_iter().collect();
        match transact!(self, |ctx| self.create_group_in(ctx, group, &members)).await {
            Ok(created) => Ok(created),
            // A racing creation of the same id won.
            Err(Fail::Mongo(e)) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn group(&self, id: &str) -> Result<Option<Group>> {
        self.groups.find_one(doc! { "_id": id }).await?.as_ref().map(group_from_doc).transpose()
    }

    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let (entry_id, mut d) = member_entry(id, user, role);
        d.insert("_id", entry_id);
        match self.group_members.insert_one(d).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_member(&self, id: &str, user: &str) -> Result<bool> {
        Ok(self.group_members.delete_one(doc! { "_id": key(&[id, user]) }).await?.deleted_count == 1)
    }

    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let filter = doc! { "_id": key(&[id, user]) };
        let r = self.group_members.update_one(filter, doc! { "$set": { "role": role.as_str() } }).await?;
        Ok(r.matched_count == 1)
    }

    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>> {
        self.group_members.find_one(doc! { "_id": key(&[id, user]) }).await?.as_ref().map(role_from_doc).transpose()
    }

    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>> {
        let cursor = self.group_members.find(doc! { "group": id }).sort(doc! { "user": 1 }).await?;
        collect(cursor).await?.iter().map(|d| Ok((text(d, "user")?, role_from_doc(d)?))).collect()
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>> {
        let cursor = self.group_members.find(doc! { "user": user }).sort(doc! { "group": 1 }).await?;
        let memberships = collect(cursor).await?;
        if memberships.is_empty() {
            return Ok(Vec::new());
        }
        let ids = memberships.iter().map(|d| text(d, "group")).collect::<Result<Vec<_>>>()?;
        let mut groups = HashMap::with_capacity(ids.len());
        for d in collect(self.groups.find(doc! { "_id": { "$in": &ids } }).await?).await? {
            let g = group_from_doc(&d)?;
            groups.insert(g.id.clone(), g);
        }
        let mut out = Vec::with_capacity(ids.len());
        for (id, d) in ids.iter().zip(&memberships) {
            let g =
                groups.remove(id).ok_or_else(|| corrupt(format_args!("membership of {user} in missing group {id}")))?;
            out.push((g, role_from_doc(d)?));
        }
        Ok(out)
    }

    async fn user_group_ids(&self, user: &str) -> Result<Vec<String>> {
        let cursor = self.group_members.find(doc! { "user": user }).sort(doc! { "group": 1 }).await?;
        collect(cursor).await?.iter().map(|d| text(d, "group")).collect()
    }

    async fn set_invite_only(&self, id: &str, invite_only: bool) -> Result<bool> {
        let r = self.groups.update_one(doc! { "_id": id }, doc! { "$set": { "invite_only": invite_only } }).await?;
        Ok(r.matched_count == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::new_mid;
    use mongodb::bson::deserialize_from_document;
    use mongodb::error::{CommandError, Error, InsertManyError, WriteError};

    fn write_error(code: i32) -> Error {
        let w: WriteError = deserialize_from_document(doc! { "code": code, "errmsg": "E" }).unwrap();
        Error::from(ErrorKind::Write(WriteFailure::WriteError(w)))
    }

    fn insert_many_error(codes: &[i32]) -> Error {
        let errors: Vec<Document> =
            codes.iter().enumerate().map(|(i, c)| doc! { "index": i as i64, "code": *c, "errmsg": "E" }).collect();
        let m: InsertManyError = deserialize_from_document(doc! { "writeErrors": errors }).unwrap();
        Error::from(ErrorKind::InsertMany(m))
    }

    #[test]
    fn keys_join_with_nul() {
        assert_eq!(key(&["ann", "bob"]), "ann\u{0}bob");
        assert_eq!(key(&["u", "phone", "d:a:b"]), "u\u{0}phone\u{0}d:a:b");
        assert_ne!(key(&["ann", "bob"]), key(&["annb", "ob"]));
        assert_ne!(key(&["a", "b\u{0}c"]).len(), 0);
    }

    #[test]
    fn ints_clamp() {
        assert_eq!(int(u64::MAX), i64::MAX);
        assert_eq!(int(7), 7);
        assert_eq!(uint(-1), 0);
        assert_eq!(uint(i64::MAX), i64::MAX as u64);
    }

    #[test]
    fn numbers_read_any_integer_type() {
        let d = doc! { "a": 5i32, "b": 6i64, "c": 7.0, "n": -3i64, "s": "x" };
        assert_eq!(number(&d, "a").unwrap(), 5);
        assert_eq!(number(&d, "b").unwrap(), 6);
        assert_eq!(number(&d, "c").unwrap(), 7);
        assert_eq!(number(&d, "n").unwrap(), 0);
        assert_eq!(number(&d, "missing").unwrap(), 0);
        assert!(number(&d, "s").is_err());
        assert!(text(&d, "a").is_err());
    }

    #[test]
    fn duplicate_keys_are_recognised() {
        assert!(is_duplicate_key(&write_error(DUPLICATE_KEY)));
        assert!(!is_duplicate_key(&write_error(112)));
        let cmd: CommandError = deserialize_from_document(doc! { "code": DUPLICATE_KEY, "errmsg": "E" }).unwrap();
        assert!(is_duplicate_key(&Error::from(ErrorKind::Command(cmd))));
        assert!(!is_duplicate_key(&Error::from(ErrorKind::Shutdown)));
        assert!(is_duplicate_key(&insert_many_error(&[DUPLICATE_KEY, DUPLICATE_KEY])));
        assert!(!is_duplicate_key(&insert_many_error(&[DUPLICATE_KEY, 121])));
    }

    #[test]
    fn unordered_inserts_count_duplicates_only() {
        assert_eq!(duplicates_only(&insert_many_error(&[DUPLICATE_KEY, DUPLICATE_KEY])), Some(2));
        assert_eq!(duplicates_only(&insert_many_error(&[DUPLICATE_KEY, 121])), None);
        assert_eq!(duplicates_only(&insert_many_error(&[])), None);
        assert_eq!(duplicates_only(&write_error(DUPLICATE_KEY)), Some(1));
        assert_eq!(duplicates_only(&write_error(2)), None);
    }

    #[test]
    fn error_codes_cover_namespace_races() {
        let cmd: CommandError = deserialize_from_document(doc! { "code": NAMESPACE_EXISTS, "errmsg": "E" }).unwrap();
        assert_eq!(error_codes(&Error::from(ErrorKind::Command(cmd))), vec![NAMESPACE_EXISTS]);
        assert!(!is_transient(&write_error(112)), "labels come from the server, not the code");
    }

    #[test]
    fn transactions_follow_setting_and_topology() {
        let standalone = doc! { "isWritablePrimary": true };
        let replica = doc! { "isWritablePrimary": true, "setName": "rs0" };
        let mongos = doc! { "isWritablePrimary": true, "msg": "isdbgrid" };
        assert!(!use_transactions(None, &standalone));
        assert!(use_transactions(None, &replica));
        assert!(use_transactions(None, &mongos));
        assert!(!use_transactions(Some("0"), &replica));
        assert!(use_transactions(Some("1"), &standalone));
        assert!(use_transactions(Some(""), &replica));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_cap_ms(1), 2);
        assert_eq!(backoff_cap_ms(3), 8);
        assert_eq!(backoff_cap_ms(50), 128);
        assert_eq!(backoff_cap_ms(0), 2);
    }

    #[test]
    fn messages_round_trip() {
        let m = Message {
            conv: "d:a:b".into(),
            mid: new_mid(5),
            seq: 3,
            from: "a".into(),
            cmid: "c1".into(),
            kind: "text".into(),
            body: serde_json::json!({"n": u64::MAX, "nul": "a\u{0}b", "f": 1.5}),
            ts: 5,
            reply_to: None,
            mentions: Vec::new(),
        };
        let d = message_doc(&m).unwrap();
        assert_eq!(d.get_i64("seq").unwrap(), 3);
        // Through BSON bytes, as the server would store it.
        let mut bytes = Vec::new();
        d.to_writer(&mut bytes).unwrap();
        let back = Document::from_reader(&mut bytes.as_slice()).unwrap();
        assert_eq!(message_from_doc(&back).unwrap(), m);
    }

    #[test]
    fn nul_keys_survive_bson() {
        let d = doc! { "_id": key(&["a", "b"]) };
        let mut bytes = Vec::new();
        d.to_writer(&mut bytes).unwrap();
        let back = Document::from_reader(&mut bytes.as_slice()).unwrap();
        assert_eq!(back.get_str("_id").unwrap(), "a\u{0}b");
    }

    #[test]
    fn sessions_and_states_round_trip() {
        let s = Session {
            id: "s1".into(),
            user: "ann".into(),
            device: "phone".into(),
            refresh_hash: "h".into(),
            revoked: false,
            created_ms: 1,
            refresh_expires_ms: u64::MAX,
        };
        let mut d = session_doc(&s);
        d.insert("_id", "s1");
        let back = session_from_doc(&d).unwrap();
        assert_eq!(back.refresh_expires_ms, i64::MAX as u64, "clamped");
        assert_eq!(Session { refresh_expires_ms: u64::MAX, ..back }, s);
        for st in [
            FriendState::Friends,
            FriendState::Outgoing { note: "hi".into() },
            FriendState::Incoming { note: "".into() },
        ] {
            let (state, note) = st.parts();
            assert_eq!(state_from_doc(&doc! { "state": state, "note": note }).unwrap(), st);
        }
        assert!(state_from_doc(&doc! { "state": "enemies" }).is_err());
    }
}
