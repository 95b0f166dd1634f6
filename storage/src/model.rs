//! Records kept by the stores, independent of any backend.

use serde::{Deserialize, Serialize};

/// A registered account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    pub nickname: String,
    /// argon2id PHC string.
    pub password_hash: String,
    pub created_ms: u64,
    /// A banned user cannot sign in or keep connections.
    #[serde(default)]
    pub banned: bool,
}

/// One signed-in device session: the unit that logout and refresh-token
/// rotation act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub user: String,
    pub device: String,
    /// SHA-256 (hex) of the refresh token currently valid for this session.
    pub refresh_hash: String,
    pub revoked: bool,
    pub created_ms: u64,
    /// When the current refresh token expires.
    pub refresh_expires_ms: u64,
}

/// A device's token at a push service (APNs, FCM, Web Push, …), for offline notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushToken {
    pub user: String,
    pub device: String,
    /// `apns`, `fcm`, `webpush` or `other`.
    pub platform: String,
    pub token: String,
    pub updated_ms: u64,
}

/// The relation of one user to another, as seen from the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum FriendState {
    Friends,
    /// This user asked the other.
    Outgoing {
        note: String,
    },
    /// The other user asked this one.
    Incoming {
        note: String,
    },
}

impl FriendState {
    /// The state's name and note, as the SQL and document backends store
    /// them (the note is empty for friends).
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            FriendState::Friends => ("friends", ""),
            FriendState::Outgoing { note } => ("outgoing", note),
            FriendState::Incoming { note } => ("incoming", note),
        }
    }

    /// The state from its stored name and note (see [`FriendState::parts`]).
    pub fn from_parts(state: &str, note: String) -> crate::Result<FriendState> {
        match state {
            "friends" => Ok(FriendState::Friends),
            "outgoing" => Ok(FriendState::Outgoing { note }),
            "incoming" => Ok(FriendState::Incoming { note }),
            other => Err(crate::StorageError::Corrupt(format!("unknown friend state {other:?}"))),
        }
    }
}

/// What a friend request turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A new pending request (or a refreshed note on an existing one).
    Pending,
    /// The other user had already asked: both are friends now.
    BecameFriends,
    AlreadyFriends,
    /// One of the two blocks the other: nothing was stored.
    Blocked,
}

/// A stored message. `body` is a JSON string for text, an object otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub conv: String,
    pub mid: String,
    pub seq: u64,
    pub from: String,
    pub cmid: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub body: serde_json::Value,
    pub ts: u64,
    /// The message this one replies to, quoted as it was when the reply was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Box<Quote>>,
    /// The users this message mentions (members of its conversation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
}

/// A quoted message: what a reply carries of the message it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub mid: String,
    pub seq: u64,
    pub from: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The start of a text message's body (empty for other types).
    pub preview: String,
}

/// What a message refers to besides its body, as the SQL and document backends store it (one
/// JSON column, absent when the message refers to nothing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Refs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Box<Quote>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
}

impl Message {
    /// The message's references as one JSON text, or `None` when it has none.
    pub fn refs_json(&self) -> crate::Result<Option<String>> {
        if self.reply_to.is_none() && self.mentions.is_empty() {
            return Ok(None);
        }
        let refs = Refs { reply_to: self.reply_to.clone(), mentions: self.mentions.clone() };
        Ok(Some(serde_json::to_string(&refs)?))
    }

    /// Sets the references stored as [`Message::refs_json`].
    pub fn set_refs_json(&mut self, refs: Option<&str>) -> crate::Result<()> {
        if let Some(text) = refs {
            let refs: Refs = serde_json::from_str(text)?;
            self.reply_to = refs.reply_to;
            self.mentions = refs.mentions;
        }
        Ok(())
    }
}

/// A message to append; the store assigns `mid`, `seq` and `ts`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub conv: String,
    pub from: String,
    pub cmid: String,
    pub kind: String,
    pub body: serde_json::Value,
    pub reply_to: Option<Box<Quote>>,
    pub mentions: Vec<String>,
}

impl NewMessage {
    /// The message as stored with `seq` and server time `ts` (and a fresh mid).
    pub fn stored_as(self, seq: u64, ts: u64) -> Message {
        Message {
            mid: new_mid(ts),
            seq,
            ts,
            conv: self.conv,
            from: self.from,
            cmid: self.cmid,
            kind: self.kind,
            body: self.body,
            reply_to: self.reply_to,
            mentions: self.mentions,
        }
    }
}

/// The result of an append: the stored message, and whether it already
/// existed (same conv, sender and cmid), in which case nothing was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub msg: Message,
    pub duplicate: bool,
    /// The message's stored JSON encoding (what `msg` serialises to), when the store made it
    /// for its own write (the embedded store): a push can be built around it instead of
    /// serialising the message once more. `None` from the other stores and for duplicates.
    pub json: Option<bytes::Bytes>,
}

/// A group chat. Its conversation id is `g:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Server-assigned, `[A-Za-z0-9]{6,24}`.
    pub id: String,
    pub name: String,
    pub owner: String,
    pub created_ms: u64,
    /// Nobody joins by the group id alone: members are added by its owner or admins.
    #[serde(default)]
    pub invite_only: bool,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// A message that already has its seq, as it travels through the queue to
/// the durable store, with the users to index it for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequencedRecord {
    pub msg: Message,
    pub members: Vec<String>,
    /// The record recalls the stored message with this seq: the store keeps
    /// the seq and replaces type and body (`msg` is the recalled form).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recall: bool,
}

/// How far the persist worker got in one partition of a topic: the offset
/// of the next record to read (every record before it is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// One live client connection: the gateway holding it (its push address)
/// and the connection id inside that gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnRef {
    pub gateway: String,
    pub conn_id: u64,
    pub device: String,
    pub session: String,
}

/// A fresh message id: time-ordered hex, 27 chars, unique with overwhelming
/// probability (64 random bits per millisecond).
pub fn new_mid(ts: u64) -> String {
    mid_of(ts, rand::random::<u64>())
}

/// The message id of `ts` with `tail`: `ts` in 11 hex digits, then `tail` in 16.
pub fn mid_of(ts: u64, tail: u64) -> String {
    let mut mid = String::with_capacity(27);
    push_hex(&mut mid, ts, 11);
    push_hex(&mut mid, tail, 16);
    mid
}

/// `v` in lower-case hex, zero-padded to at least `width` digits: what `{v:0width$x}` writes,
/// without the formatting machinery (this runs for every message stored).
fn push_hex(out: &mut String, v: u64, width: u32) {
    let digits = width.max((u64::BITS - v.leading_zeros()).div_ceil(4));
    for i in (0..digits).rev() {
        let d = v.checked_shr(4 * i).unwrap_or(0) & 0xf;
        out.push(char::from_digit(d as u32, 16).unwrap_or('0'));
    }
}

/// One entry of the registry: a gateway or logic instance and its load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// gRPC address (gateway push service, or logic service).
    pub rpc: String,
    /// Client-facing WebSocket URL (gateways only).
    #[serde(default)]
    pub ws: String,
    /// Client-facing raw TCP address (gateways only).
    #[serde(default)]
    pub tcp: String,
    /// CPU load 0.0..=1.0 as last reported.
    pub load: f32,
    pub connections: u64,
}

/// A device's ack cursor, as flushed in batches: `device` of `user` received `conv` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckCursor {
    pub user: String,
    pub device: String,
    pub conv: String,
    pub seq: u64,
}

/// A user's read mark, as flushed in batches: `user` read `conv` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadCursor {
    pub user: String,
    pub conv: String,
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn mids_are_hex_led_by_their_time() {
        let mid = super::new_mid(0x123_4567_89ab);
        assert_eq!(mid.len(), 27);
        assert!(mid.starts_with("123456789ab"), "{mid}");
        assert!(mid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{mid}");
        assert_ne!(super::new_mid(1), super::new_mid(1));
        assert_eq!(super::mid_of(5, 0xab), format!("{:011x}{:016x}", 5, 0xab));
        let mut s = String::new();
        for v in [0, 1, 0xf, 0x10, 0xdead_beef, 0x1_0000_0000_0000, u64::MAX] {
            for width in [11, 16] {
                s.clear();
                super::push_hex(&mut s, v, width);
                assert_eq!(s, format!("{v:0w$x}", w = width as usize));
            }
        }
    }
}
