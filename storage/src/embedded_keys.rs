//! The key type of the embedded store's string keys, and the one-time move of a database whose
//! tables were keyed by redb's `&str`.
//!
//! redb compares `&str` keys by decoding both sides as UTF-8 (validating them) on every
//! comparison of every B-tree search: a tenth of a checkpoint's CPU and of the log thread's cmid
//! probe went to that validation. [`Utf8`] is stored exactly as `&str` is (its bytes) and
//! compares the bytes as they are, which is the same order (`str`'s `Ord` is bytewise); it
//! validates only when a key is read out. redb ties a table to its key type's name, so the tables
//! keyed by it have new names, and [`carry_legacy`] moves the rows of the old ones over when a
//! database is opened (one transaction: all or nothing).

use std::cmp::Ordering;

use redb::{Key, ReadableTable, TableDefinition, TableHandle, TypeName, Value, WriteTransaction};

use crate::Result;

/// A UTF-8 string key, compared by its bytes (see the module doc).
#[derive(Debug)]
pub(crate) enum Utf8 {}

impl Value for Utf8 {
    type SelfType<'a>
        = &'a str
    where
        Self: 'a;
    type AsBytes<'a>
        = &'a [u8]
    where
        Self: 'a;

    fn fixed_width() -> Option<usize> {
        None
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a str
    where
        Self: 'a,
    {
        // Every key was written from a `&str`; invalid bytes mean a damaged file, as for redb's
        // own `&str`, which panics the same way.
        std::str::from_utf8(data).expect("embedded store: a string key is not UTF-8 (damaged database file)")
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b str) -> &'a [u8]
    where
        Self: 'b,
    {
        value.as_bytes()
    }

    fn type_name() -> TypeName {
        TypeName::new("switchboard::Utf8")
    }
}

impl Key for Utf8 {
    fn compare(data1: &[u8], data2: &[u8]) -> Ordering {
        data1.cmp(data2)
    }
}

/// Moves the rows of `old` (a table keyed with `&str`) into `new` (the same rows, keyed with
/// [`Utf8`]: the same bytes) and deletes `old`. Nothing to do if `old` does not exist.
fn carry<K: Key + 'static, N: Key + 'static, V: Value + 'static>(
    tx: &WriteTransaction,
    old: TableDefinition<K, V>,
    new: TableDefinition<N, V>,
) -> Result<()> {
    if !tx.list_tables()?.any(|t| t.name() == old.name()) {
        return Ok(());
    }
    {
        let from = tx.open_table(old)?;
        let mut to = tx.open_table(new)?;
        for row in from.iter()? {
            let (k, v) = row?;
            let key = k.value();
            to.insert(N::from_bytes(K::as_bytes(&key).as_ref()), v.value())?;
        }
    }
    tx.delete_table(old)?;
    Ok(())
}

/// The tables as versions before [`Utf8`] keyed them, by their names then.
pub(crate) mod legacy {
    use redb::TableDefinition;

    pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
    pub const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
    pub const REFRESH: TableDefinition<&str, &str> = TableDefinition::new("refresh");
    pub const FRIENDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("friends");
    pub const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
    pub const CONV_SEQ: TableDefinition<&str, u64> = TableDefinition::new("conv_seq");
    pub const CMIDS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("cmids");
    pub const USER_CONVS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_convs");
    pub const ACKS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("acks");
    pub const READS: TableDefinition<(&str, &str), u64> = TableDefinition::new("reads");
    pub const MIDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("mids");
    pub const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
    pub const GROUP_MEMBERS: TableDefinition<(&str, &str), &str> = TableDefinition::new("group_members");
    pub const USER_GROUPS: TableDefinition<(&str, &str), &str> = TableDefinition::new("user_groups");
    pub const PUSH_TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("push_tokens");
    pub const TOKEN_OWNERS: TableDefinition<&str, (&str, &str)> = TableDefinition::new("token_owners");
    pub const MUTES: TableDefinition<(&str, &str), u64> = TableDefinition::new("mutes");
    pub const BLOCKS: TableDefinition<(&str, &str), ()> = TableDefinition::new("blocks");
    pub const MENTIONS: TableDefinition<(&str, &str), u64> = TableDefinition::new("mentions");
    pub const EDITS: TableDefinition<(&str, u64), (u64, &str)> = TableDefinition::new("search_edits");
    pub const TERMS: TableDefinition<(i64, &str, u64), ()> = TableDefinition::new("search_terms");
}

/// Moves every table of an older database (keyed with `&str`) to its [`Utf8`]-keyed successor.
pub(crate) fn carry_legacy(tx: &WriteTransaction) -> Result<()> {
    use crate::embedded::tables as now;
    carry(tx, legacy::USERS, now::USERS)?;
    carry(tx, legacy::SESSIONS, now::SESSIONS)?;
    carry(tx, legacy::REFRESH, now::REFRESH)?;
    carry(tx, legacy::FRIENDS, now::FRIENDS)?;
    carry(tx, legacy::MESSAGES, now::MESSAGES)?;
    carry(tx, legacy::CONV_SEQ, now::CONV_SEQ)?;
    carry(tx, legacy::CMIDS, now::CMIDS)?;
    carry(tx, legacy::USER_CONVS, now::USER_CONVS)?;
    carry(tx, legacy::ACKS, now::ACKS)?;
    carry(tx, legacy::READS, now::READS)?;
    carry(tx, legacy::MIDS, crate::embedded_mids::MIDS)?;
    carry(tx, legacy::GROUPS, now::GROUPS)?;
    carry(tx, legacy::GROUP_MEMBERS, now::GROUP_MEMBERS)?;
    carry(tx, legacy::USER_GROUPS, now::USER_GROUPS)?;
    carry(tx, legacy::PUSH_TOKENS, now::PUSH_TOKENS)?;
    carry(tx, legacy::TOKEN_OWNERS, now::TOKEN_OWNERS)?;
    carry(tx, legacy::MUTES, now::MUTES)?;
    carry(tx, legacy::BLOCKS, now::BLOCKS)?;
    carry(tx, legacy::MENTIONS, crate::embedded_search::MENTIONS)?;
    carry(tx, legacy::EDITS, crate::embedded_search::EDITS)?;
    carry(tx, legacy::TERMS, crate::embedded_search::TERMS)?;
    crate::embedded_search::carry_postings(tx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableTableMetadata};

    use super::*;
    use crate::contract::text;
    use crate::embedded::EmbeddedStore;
    use crate::Message;

    #[test]
    fn utf8_keys_sort_as_str() {
        let mut words = vec!["b", "a", "ab", "", "é", "z", "Z", "日本", "aé", "a\u{0}"];
        let mut by_bytes = words.clone();
        words.sort();
        by_bytes.sort_by(|x, y| Utf8::compare(x.as_bytes(), y.as_bytes()));
        assert_eq!(words, by_bytes);
    }

    /// A database written with `&str` keys (every table, one row or more each) is moved to the
    /// `Utf8`-keyed tables when opened: the old tables are gone, every row is there and read by
    /// the store, and appends go on from the stored seq.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn older_databases_are_carried_over() {
        let dir = std::env::temp_dir().join(format!("sb-keys-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let message = Message {
            // a mid whose first 11 digits are not its timestamp: only the carried index finds it
            mid: format!("{:011x}{:016x}", 1, 2),
            ..text("d:a:b", "a", "c1", "hello").stored_as(1, 1_700_000_000_000)
        };
        let json = serde_json::to_vec(&message).unwrap();
        {
            let db = Database::create(dir.join("switchboard.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            {
                use legacy::*;
                tx.open_table(USERS).unwrap().insert("a", &b"{}"[..]).unwrap();
                tx.open_table(SESSIONS).unwrap().insert("s", &b"{}"[..]).unwrap();
                tx.open_table(REFRESH).unwrap().insert("h", "s").unwrap();
                tx.open_table(FRIENDS).unwrap().insert(("a", "b"), &b"{}"[..]).unwrap();
                tx.open_table(MESSAGES).unwrap().insert(("d:a:b", 1), &json[..]).unwrap();
                tx.open_table(CONV_SEQ).unwrap().insert("d:a:b", 1).unwrap();
                tx.open_table(CMIDS).unwrap().insert(("d:a:b", "a", "c1"), 1).unwrap();
                let mut convs = tx.open_table(USER_CONVS).unwrap();
                convs.insert(("a", "d:a:b"), ()).unwrap();
                convs.insert(("b", "d:a:b"), ()).unwrap();
                drop(convs);
                tx.open_table(ACKS).unwrap().insert(("b", "d", "d:a:b"), 1).unwrap();
                tx.open_table(READS).unwrap().insert(("b", "d:a:b"), 1).unwrap();
                tx.open_table(MIDS).unwrap().insert(("d:a:b", message.mid.as_str()), 1).unwrap();
                tx.open_table(GROUPS).unwrap().insert("g", &b"{}"[..]).unwrap();
                tx.open_table(GROUP_MEMBERS).unwrap().insert(("g", "a"), "owner").unwrap();
                tx.open_table(USER_GROUPS).unwrap().insert(("a", "g"), "owner").unwrap();
                tx.open_table(PUSH_TOKENS).unwrap().insert(("a", "d"), &b"{}"[..]).unwrap();
                tx.open_table(TOKEN_OWNERS).unwrap().insert("t", ("a", "d")).unwrap();
                tx.open_table(MUTES).unwrap().insert(("a", "g:g"), 5).unwrap();
                tx.open_table(BLOCKS).unwrap().insert(("a", "c"), ()).unwrap();
                tx.open_table(MENTIONS).unwrap().insert(("b", "d:a:b"), 1).unwrap();
                tx.open_table(EDITS).unwrap().insert(("d:a:b", 1), (1, "hello")).unwrap();
                tx.open_table(TERMS).unwrap().insert((7, "d:a:b", 1), ()).unwrap();
            }
            tx.commit().unwrap();
        }
        let store = EmbeddedStore::open(&dir).unwrap();
        use crate::MessageStore;
        assert_eq!(store.range("d:a:b", 0, 10).await.unwrap(), vec![message.clone()]);
        assert_eq!(store.find_cmid("d:a:b", "a", "c1").await.unwrap(), Some(message.clone()));
        assert_eq!(store.find_mid("d:a:b", &message.mid).await.unwrap(), Some(message.clone()));
        let new = text("d:a:b", "a", "c2", "again");
        assert_eq!(store.append(new, &["a".into(), "b".into()]).await.unwrap().msg.seq, 2);
        drop(store);
        let db = Database::create(dir.join("switchboard.redb")).unwrap();
        let tx = db.begin_read().unwrap();
        let names: Vec<String> = tx.list_tables().unwrap().map(|t| t.name().to_string()).collect();
        assert!(names.iter().all(|n| n.ends_with(".v2")), "{names:?}");
        use crate::embedded::tables as now;
        let rows = |n: u64, len: u64, what: &str| assert_eq!(len, n, "{what}");
        rows(1, tx.open_table(now::USERS).unwrap().len().unwrap(), "users");
        rows(1, tx.open_table(now::SESSIONS).unwrap().len().unwrap(), "sessions");
        rows(1, tx.open_table(now::REFRESH).unwrap().len().unwrap(), "refresh");
        rows(1, tx.open_table(now::FRIENDS).unwrap().len().unwrap(), "friends");
        rows(2, tx.open_table(now::USER_CONVS).unwrap().len().unwrap(), "user_convs");
        rows(1, tx.open_table(now::ACKS).unwrap().len().unwrap(), "acks");
        rows(1, tx.open_table(now::READS).unwrap().len().unwrap(), "reads");
        rows(1, tx.open_table(now::GROUPS).unwrap().len().unwrap(), "groups");
        rows(1, tx.open_table(now::GROUP_MEMBERS).unwrap().len().unwrap(), "group_members");
        rows(1, tx.open_table(now::USER_GROUPS).unwrap().len().unwrap(), "user_groups");
        rows(1, tx.open_table(now::PUSH_TOKENS).unwrap().len().unwrap(), "push_tokens");
        rows(1, tx.open_table(now::TOKEN_OWNERS).unwrap().len().unwrap(), "token_owners");
        rows(1, tx.open_table(now::MUTES).unwrap().len().unwrap(), "mutes");
        rows(1, tx.open_table(now::BLOCKS).unwrap().len().unwrap(), "blocks");
        rows(1, tx.open_table(crate::embedded_search::MENTIONS).unwrap().len().unwrap(), "mentions");
        rows(1, tx.open_table(crate::embedded_search::EDITS).unwrap().len().unwrap(), "edits");
        // the posting (term 7, d:a:b#1) is bit 1 of the conversation's first block (which also
        // holds the terms of seq 2, appended after the carry)
        let blocks = tx.open_table(crate::embedded_search::TERM_BLOCKS).unwrap();
        let first = blocks.get(("d:a:b", 0)).unwrap().unwrap();
        assert_eq!(crate::embedded_search::bits_of(first.value(), 7), 1 << 1);
        drop(first);
        drop(blocks);
        assert_eq!(tx.open_table(now::ACKS).unwrap().get(("b", "d", "d:a:b")).unwrap().unwrap().value(), 1);
        assert_eq!(tx.open_table(now::TOKEN_OWNERS).unwrap().get("t").unwrap().unwrap().value(), ("a", "d"));
        drop(tx);
        drop(db);
        std::fs::remove_dir_all(&dir).ok();
    }
}
