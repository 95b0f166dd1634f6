//! The contract every backend must meet, as reusable async checks. Each
//! backend's tests call [`run_all`] against a real instance; names carry a
//! random prefix so a shared server can run the suite repeatedly.
//!
//! These functions panic on a broken contract (they are test code shipped
//! in the library so that every backend, in any crate, runs the same suite).

use std::collections::HashMap;
use std::sync::Arc;

use crate::{
    AccountStore, ConnRef, FriendState, Group, GroupStore, Message, MessageStore, NewMessage, RequestOutcome, Role,
    RouteTable, Session, SocialStore, User,
};

/// Runs this test binary's test `name` alone in a child process with `env` set to `dir`, its
/// stdout piped (for the tests that kill a store's process with SIGKILL mid-work).
#[cfg(test)]
pub(crate) fn spawn_test_child(name: &str, env: &str, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A unique name prefix for one run of the suite.
pub fn prefix() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

/// A text message to append.
pub fn text(conv: &str, from: &str, cmid: &str, body: &str) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: from.into(),
        cmid: cmid.into(),
        kind: "text".into(),
        body: serde_json::Value::String(body.into()),
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// Runs every check of the message, account, social and group contracts.
pub async fn run_all(
    accounts: &dyn AccountStore,
    social: &dyn SocialStore,
    messages: &dyn MessageStore,
    groups: &dyn GroupStore,
) {
    accounts_contract(accounts).await;
    devices_contract(accounts).await;
    social_contract(social).await;
    groups_contract(groups).await;
    messages_contract(messages).await;
    concurrent_appends(messages).await;
    let (p, conv) = search_contract(messages).await;
    search_final_state(messages, &p, &conv).await;
}

/// An event or message with `body` of type `kind`.
fn of_kind(conv: &str, from: &str, cmid: &str, kind: &str, body: serde_json::Value) -> NewMessage {
    NewMessage { kind: kind.into(), body, ..text(conv, from, cmid, "") }
}

/// A search of `q` in `convs`, as (seq, text) newest first.
async fn found(s: &dyn MessageStore, convs: &[&str], q: &str, from: Option<&str>) -> Vec<(u64, String)> {
    let query = crate::search::SearchQuery {
        convs: convs.iter().map(|c| c.to_string()).collect(),
        terms: crate::search::query_terms(q),
        from: from.map(str::to_owned),
        before_ts: None,
        limit: 10,
    };
    s.search(&query).await.unwrap().into_iter().map(|f| (f.msg.seq, f.text)).collect()
}

/// Replies keep their quote, mentions raise the mentioned users' marks, and search finds
/// messages by their current text (words and CJK characters, every term needed, in the given
/// conversations only, by sender), an edit's text once edited and nothing once recalled.
/// Returns the prefix and conversation for [`search_final_state`].
pub async fn search_contract(s: &dyn MessageStore) -> (String, String) {
    let setup = search_contract_appends(s).await;
    search_contract_changes(s, &setup).await;
    (setup.p, setup.conv)
}

/// What [`search_contract_appends`] stored, for [`search_contract_changes`].
pub struct SearchSetup {
    pub p: String,
    pub conv: String,
    m1: Message,
    m3: Message,
}

/// The appends and reads of [`search_contract`].
pub async fn search_contract_appends(s: &dyn MessageStore) -> SearchSetup {
    let p = prefix();
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let conv = format!("g:{p}g");
    let other = format!("g:{p}h");
    let m1 = s.append(text(&conv, &a, "c1", "Meeting at NOON tomorrow"), &[]).await.unwrap().msg;
    // a later millisecond for what follows (the `before` filter below)
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let quote = crate::Quote {
        mid: m1.mid.clone(),
        seq: m1.seq,
        from: a.clone(),
        kind: "text".into(),
        preview: "Meeting".into(),
    };
    let reply = NewMessage {
        reply_to: Some(Box::new(quote.clone())),
        mentions: vec![a.clone()],
        ..text(&conv, &b, "c2", "我们明天见 at noon")
    };
    let m2 = s.append(reply, &[]).await.unwrap().msg;
    assert_eq!(m2.reply_to.as_deref(), Some(&quote));
    let file =
        serde_json::json!({"url": "/v1/files/x", "name": "noon-report.pdf", "size": 3, "mime": "application/pdf"});
    let m3 = s.append(of_kind(&conv, &b, "c3", "file", file), &[]).await.unwrap().msg;
    s.append(text(&other, &a, "c1", "noon elsewhere"), &[]).await.unwrap();
    let custom = of_kind(&conv, &a, "c4", "custom", serde_json::json!({"text": "noon"}));
    s.append(custom, &[]).await.unwrap();
    // read back: the reply and its mentions, by every read
    let back = s.find_mid(&conv, &m2.mid).await.unwrap().unwrap();
    assert_eq!((back.reply_to.as_deref(), back.mentions.clone()), (Some(&quote), vec![a.clone()]));
    assert_eq!(s.range(&conv, m1.seq, 1).await.unwrap()[0], m2);
    assert_eq!(s.mentions(&a).await.unwrap().get(&conv), Some(&m2.seq));
    assert!(!s.mentions(&b).await.unwrap().contains_key(&conv));

    assert_eq!(
        found(s, &[&conv], "noon", None).await,
        vec![
            (m3.seq, "noon-report.pdf".into()),
            (m2.seq, "我们明天见 at noon".into()),
            (m1.seq, "Meeting at NOON tomorrow".into())
        ]
    );
    assert_eq!(found(s, &[&conv], "明天", None).await.len(), 1);
    assert_eq!(found(s, &[&conv], "明", None).await.len(), 1);
    assert!(found(s, &[&conv], "明后", None).await.is_empty(), "every pair of a CJK run is needed");
    assert_eq!(found(s, &[&conv], "noon tomorrow", None).await, vec![(m1.seq, "Meeting at NOON tomorrow".into())]);
    assert_eq!(found(s, &[&conv], "noon", Some(&a)).await.len(), 1, "by sender");
    assert_eq!(found(s, &[&conv, &other], "noon", None).await.len(), 4, "both conversations");
    // the newest two over both conversations
    let q = |limit| crate::search::SearchQuery {
        convs: vec![conv.clone(), other.clone()],
        terms: crate::search::query_terms("noon"),
        from: None,
        before_ts: None,
        limit,
    };
    let all = s.search(&q(10)).await.unwrap();
    let two = s.search(&q(2)).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].msg.ts >= w[1].msg.ts), "newest first");
    assert_eq!(two, all[..2].to_vec());
    assert!(found(s, &[&other], "tomorrow", None).await.is_empty(), "only the conversations asked");
    let before = crate::search::SearchQuery {
        convs: vec![conv.clone()],
        terms: crate::search::query_terms("noon"),
        from: None,
        before_ts: Some(m2.ts),
        limit: 10,
    };
    let older: Vec<u64> = s.search(&before).await.unwrap().iter().map(|f| f.msg.seq).collect();
    assert_eq!(older, vec![m1.seq], "only what was sent before");

    SearchSetup { p, conv, m1, m3 }
}

/// The changes of [`search_contract`]: an edit replaces the text searched; a later edit wins;
/// a recall removes the message.
pub async fn search_contract_changes(s: &dyn MessageStore, setup: &SearchSetup) {
    let (conv, a) = (&setup.conv, format!("{}a", setup.p));
    let edit = |cmid: &str, text: &str| {
        of_kind(conv, &a, cmid, "edit", serde_json::json!({"mid": setup.m1.mid, "text": text}))
    };
    s.append(edit("e1", "lunch at one"), &[]).await.unwrap();
    s.append(edit("e2", "lunch at two instead"), &[]).await.unwrap();
    s.recall(conv, setup.m3.seq).await.unwrap();
}

/// What [`search_contract`] leaves (checked again after a restart).
pub async fn search_final_state(s: &dyn MessageStore, p: &str, conv: &str) {
    let a = format!("{p}a");
    assert_eq!(found(s, &[conv], "noon", None).await.len(), 1, "only the reply still says noon");
    let lunch = found(s, &[conv], "lunch", None).await;
    assert_eq!(lunch.len(), 1);
    assert_eq!(lunch[0].1, "lunch at two instead");
    assert!(found(s, &[conv], "one", None).await.is_empty(), "the earlier edit's text is gone");
    assert_eq!(found(s, &[conv], "明天", None).await.len(), 1);
    assert!(s.mentions(&a).await.unwrap().contains_key(conv));
    let m1 = s.range(conv, 0, 1).await.unwrap().remove(0);
    assert_eq!(m1.body, serde_json::json!("Meeting at NOON tomorrow"), "the message itself is unchanged");
}

/// Push tokens: one per device, replaced by the device's next, moved when another device
/// registers it; mutes per conversation with their time, removed by unmute.
pub async fn devices_contract(s: &dyn AccountStore) {
    let p = prefix();
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let token = |user: &str, device: &str, token: &str| crate::PushToken {
        user: user.into(),
        device: device.into(),
        platform: "fcm".into(),
        token: format!("{p}{token}"),
        updated_ms: 7,
    };
    assert!(s.push_tokens(&a).await.unwrap().is_empty());
    s.put_push_token(&token(&a, "phone", "t1")).await.unwrap();
    s.put_push_token(&token(&a, "tablet", "t2")).await.unwrap();
    s.put_push_token(&token(&a, "phone", "t3")).await.unwrap();
    assert_eq!(s.push_tokens(&a).await.unwrap(), vec![token(&a, "phone", "t3"), token(&a, "tablet", "t2")]);
    // t1 is free again: another user's device may take it; t2 moves to b's device
    s.put_push_token(&token(&b, "laptop", "t1")).await.unwrap();
    s.put_push_token(&token(&b, "web", "t2")).await.unwrap();
    assert_eq!(s.push_tokens(&a).await.unwrap(), vec![token(&a, "phone", "t3")]);
    assert_eq!(s.push_tokens(&b).await.unwrap(), vec![token(&b, "laptop", "t1"), token(&b, "web", "t2")]);
    assert!(s.remove_push_token(&a, "phone").await.unwrap());
    assert!(!s.remove_push_token(&a, "phone").await.unwrap());
    assert!(s.push_tokens(&a).await.unwrap().is_empty());
    s.put_push_token(&token(&a, "phone", "t3")).await.unwrap();
    assert_eq!(s.push_tokens(&a).await.unwrap().len(), 1, "a removed token can come back");

    let conv = format!("g:{p}g");
    assert!(s.mutes(&a).await.unwrap().is_empty());
    s.set_mute(&a, &conv, Some(1000)).await.unwrap();
    s.set_mute(&a, "d:x:y", Some(u64::MAX)).await.unwrap();
    assert_eq!(s.mutes(&a).await.unwrap().get("d:x:y"), Some(&u64::MAX), "for good reads back as such");
    s.set_mute(&a, "d:x:y", Some(5)).await.unwrap();
    let mutes = s.mutes(&a).await.unwrap();
    assert_eq!((mutes.get(&conv), mutes.get("d:x:y"), mutes.len()), (Some(&1000), Some(&5), 2));
    s.set_mute(&a, &conv, None).await.unwrap();
    s.set_mute(&a, &conv, None).await.unwrap();
    assert_eq!(s.mutes(&a).await.unwrap().len(), 1);
    assert!(s.mutes(&b).await.unwrap().is_empty());
}

pub async fn accounts_contract(s: &dyn AccountStore) {
    let p = prefix();
    let user = User {
        username: format!("{p}ann"),
        nickname: "Ann".into(),
        password_hash: "$argon2id$fake".into(),
        created_ms: 1,
        banned: false,
    };
    assert!(s.create_user(&user).await.unwrap());
    assert!(!s.create_user(&user).await.unwrap(), "a taken username is refused");
    assert_eq!(s.get_user(&user.username).await.unwrap(), Some(user.clone()));
    assert_eq!(s.get_user(&format!("{p}nobody")).await.unwrap(), None);

    let session = Session {
        id: format!("{p}s1"),
        user: user.username.clone(),
        device: "phone".into(),
        refresh_hash: format!("{p}h1"),
        revoked: false,
        created_ms: 1,
        refresh_expires_ms: 10,
    };
    s.put_session(&session).await.unwrap();
    assert_eq!(s.get_session(&session.id).await.unwrap(), Some(session.clone()));
    assert_eq!(s.session_by_refresh(&session.refresh_hash).await.unwrap(), Some(session.clone()));

    assert!(s.rotate_refresh(&session.id, &format!("{p}h1"), &format!("{p}h2"), 20).await.unwrap());
    assert!(
        !s.rotate_refresh(&session.id, &format!("{p}h1"), &format!("{p}h3"), 30).await.unwrap(),
        "a rotated-out token cannot rotate again"
    );
    let old = s.session_by_refresh(&format!("{p}h1")).await.unwrap().unwrap();
    assert_eq!(old.refresh_hash, format!("{p}h2"), "old hashes still find the session (reuse detection)");
    assert_eq!(old.refresh_expires_ms, 20);

    s.revoke_session(&session.id).await.unwrap();
    assert!(s.get_session(&session.id).await.unwrap().unwrap().revoked);
    assert!(!s.rotate_refresh(&session.id, &format!("{p}h2"), &format!("{p}h4"), 40).await.unwrap());

    assert!(s.set_banned(&user.username, true).await.unwrap());
    let banned = s.get_user(&user.username).await.unwrap().unwrap();
    assert_eq!(banned, User { banned: true, ..user.clone() }, "a ban changes nothing else");
    assert!(s.set_banned(&user.username, true).await.unwrap(), "banning twice is fine");
    assert!(s.set_banned(&user.username, false).await.unwrap());
    assert_eq!(s.get_user(&user.username).await.unwrap(), Some(user.clone()));
    assert!(!s.set_banned(&format!("{p}nobody"), true).await.unwrap(), "no such user");
    assert_eq!(s.get_user(&format!("{p}nobody")).await.unwrap(), None, "a ban creates no user");

    // Pruning takes sessions whose refresh token expired (revoked or not) with every token hash
    // issued for them; live sessions stay. (Expiries below 10 belong to this check alone.)
    let session = |id: &str, hash: &str, expires: u64| Session {
        id: format!("{p}{id}"),
        user: user.username.clone(),
        device: id.into(),
        refresh_hash: format!("{p}{hash}"),
        revoked: false,
        created_ms: 1,
        refresh_expires_ms: expires,
    };
    let (dead, live) = (session("dead", "d1", 3), session("live", "l1", u64::MAX / 4));
    s.put_session(&dead).await.unwrap();
    s.put_session(&live).await.unwrap();
    assert!(s.rotate_refresh(&dead.id, &dead.refresh_hash, &format!("{p}d2"), 4).await.unwrap());
    assert!(s.prune_sessions(5).await.unwrap() >= 1);
    assert_eq!(s.get_session(&dead.id).await.unwrap(), None);
    for h in ["d1", "d2"] {
        assert_eq!(s.session_by_refresh(&format!("{p}{h}")).await.unwrap(), None, "token {h} pruned");
    }
    assert_eq!(s.get_session(&live.id).await.unwrap(), Some(live.clone()));
    assert_eq!(s.session_by_refresh(&live.refresh_hash).await.unwrap(), Some(live));
    assert_eq!(
        s.get_session(&format!("{p}s1")).await.unwrap().map(|x| x.refresh_expires_ms),
        Some(20),
        "expiry 20 is after 5"
    );

    let born_banned = User { username: format!("{p}bob"), banned: true, ..user.clone() };
    assert!(s.create_user(&born_banned).await.unwrap());
    assert_eq!(s.get_user(&born_banned.username).await.unwrap(), Some(born_banned));
}

pub async fn groups_contract(s: &dyn GroupStore) {
    let p = prefix();
    let (o, a, b, c) = (format!("{p}o"), format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let g1 = Group { id: format!("{p}g1"), name: "Hikers".into(), owner: o.clone(), created_ms: 5, invite_only: false };
    assert_eq!(s.group(&g1.id).await.unwrap(), None);
    assert!(s.members(&g1.id).await.unwrap().is_empty());
    assert!(s.create_group(&g1, &[b.clone(), a.clone(), o.clone(), a.clone()]).await.unwrap());
    let taken = Group { name: "Other".into(), owner: c.clone(), ..g1.clone() };
    assert!(!s.create_group(&taken, std::slice::from_ref(&c)).await.unwrap(), "a taken id is refused");
    assert_eq!(s.group(&g1.id).await.unwrap(), Some(g1.clone()));
    assert_eq!(s.role(&g1.id, &c).await.unwrap(), None, "a refused creation adds nobody");
    assert_eq!(
        s.members(&g1.id).await.unwrap(),
        vec![(a.clone(), Role::Member), (b.clone(), Role::Member), (o.clone(), Role::Owner)],
        "owner once, duplicates ignored, ordered by name"
    );
    assert_eq!(s.role(&g1.id, &o).await.unwrap(), Some(Role::Owner));
    assert_eq!(s.role(&g1.id, &a).await.unwrap(), Some(Role::Member));

    assert!(s.add_member(&g1.id, &c, Role::Admin).await.unwrap());
    assert!(!s.add_member(&g1.id, &c, Role::Member).await.unwrap(), "already a member");
    assert_eq!(s.role(&g1.id, &c).await.unwrap(), Some(Role::Admin), "a refused add keeps the role");
    assert!(s.set_role(&g1.id, &a, Role::Admin).await.unwrap());
    assert_eq!(s.role(&g1.id, &a).await.unwrap(), Some(Role::Admin));
    assert!(!s.set_role(&g1.id, &format!("{p}x"), Role::Admin).await.unwrap(), "not a member");
    assert_eq!(s.role(&g1.id, &format!("{p}x")).await.unwrap(), None);
    assert!(s.remove_member(&g1.id, &b).await.unwrap());
    assert!(!s.remove_member(&g1.id, &b).await.unwrap());
    assert_eq!(s.role(&g1.id, &b).await.unwrap(), None);
    assert_eq!(
        s.members(&g1.id).await.unwrap(),
        vec![(a.clone(), Role::Admin), (c.clone(), Role::Admin), (o.clone(), Role::Owner)]
    );

    // a second group, with an id that sorts first
    let g0 = Group { id: format!("{p}g0"), name: "Readers".into(), owner: a.clone(), created_ms: 6, invite_only: true };
    assert!(s.create_group(&g0, std::slice::from_ref(&c)).await.unwrap());
    assert_eq!(s.user_groups(&a).await.unwrap(), vec![(g0.clone(), Role::Owner), (g1.clone(), Role::Admin)]);
    assert_eq!(s.user_groups(&c).await.unwrap(), vec![(g0.clone(), Role::Member), (g1.clone(), Role::Admin)]);
    assert_eq!(s.user_groups(&o).await.unwrap(), vec![(g1.clone(), Role::Owner)]);
    assert!(s.user_groups(&b).await.unwrap().is_empty(), "a removed member loses the group");
    assert!(s.user_groups(&format!("{p}nobody")).await.unwrap().is_empty());
    assert_eq!(s.user_group_ids(&a).await.unwrap(), vec![g0.id.clone(), g1.id.clone()]);
    assert_eq!(s.user_group_ids(&o).await.unwrap(), vec![g1.id.clone()]);
    assert!(s.user_group_ids(&b).await.unwrap().is_empty(), "a removed member loses the group");
    assert!(s.members(&format!("{p}g")).await.unwrap().is_empty(), "no prefix bleed between groups");

    assert!(s.set_invite_only(&g1.id, true).await.unwrap());
    assert!(s.group(&g1.id).await.unwrap().unwrap().invite_only);
    assert!(s.set_invite_only(&g0.id, false).await.unwrap());
    assert_eq!(
        s.user_groups(&c).await.unwrap(),
        vec![
            (Group { invite_only: false, ..g0.clone() }, Role::Member),
            (Group { invite_only: true, ..g1.clone() }, Role::Admin)
        ]
    );
    assert!(!s.set_invite_only(&format!("{p}none"), true).await.unwrap(), "no such group");
}

pub async fn social_contract(s: &dyn SocialStore) {
    let p = prefix();
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    assert_eq!(s.request_friend(&a, &b, "hi").await.unwrap(), RequestOutcome::Pending);
    assert_eq!(s.friend_state(&a, &b).await.unwrap(), Some(FriendState::Outgoing { note: "hi".into() }));
    assert_eq!(s.friend_state(&b, &a).await.unwrap(), Some(FriendState::Incoming { note: "hi".into() }));
    assert!(!s.accept_friend(&a, &b).await.unwrap(), "the asker cannot accept its own request");
    assert!(s.accept_friend(&b, &a).await.unwrap());
    assert_eq!(s.friend_state(&a, &b).await.unwrap(), Some(FriendState::Friends));
    assert_eq!(s.request_friend(&a, &b, "").await.unwrap(), RequestOutcome::AlreadyFriends);

    assert_eq!(s.request_friend(&c, &a, "yo").await.unwrap(), RequestOutcome::Pending);
    let rel = s.relations(&a).await.unwrap();
    assert_eq!(rel, vec![(b.clone(), FriendState::Friends), (c.clone(), FriendState::Incoming { note: "yo".into() })]);
    assert!(s.reject_friend(&a, &c).await.unwrap());
    assert!(!s.reject_friend(&a, &c).await.unwrap());
    assert_eq!(s.friend_state(&c, &a).await.unwrap(), None);

    // crossing requests make friends
    assert_eq!(s.request_friend(&c, &a, "").await.unwrap(), RequestOutcome::Pending);
    assert_eq!(s.request_friend(&a, &c, "").await.unwrap(), RequestOutcome::BecameFriends);
    assert_eq!(s.friend_state(&c, &a).await.unwrap(), Some(FriendState::Friends));

    assert!(s.delete_friend(&a, &b).await.unwrap());
    assert_eq!(s.friend_state(&b, &a).await.unwrap(), None);
    assert!(!s.delete_friend(&a, &b).await.unwrap());

    // Blocking ends the friendship both ways and refuses requests either way until lifted.
    let d = format!("{p}d");
    assert!(!s.blocks(&a, &c).await.unwrap());
    assert!(s.set_block(&a, &c, true).await.unwrap());
    assert!(!s.set_block(&a, &c, true).await.unwrap(), "already blocked");
    assert!(s.blocks(&a, &c).await.unwrap());
    assert!(!s.blocks(&c, &a).await.unwrap(), "blocking is one-way");
    assert_eq!(s.friend_state(&a, &c).await.unwrap(), None, "the friendship ended");
    assert_eq!(s.friend_state(&c, &a).await.unwrap(), None);
    assert_eq!(s.request_friend(&c, &a, "again").await.unwrap(), RequestOutcome::Blocked);
    assert_eq!(s.request_friend(&a, &c, "").await.unwrap(), RequestOutcome::Blocked);
    assert_eq!(s.friend_state(&a, &c).await.unwrap(), None, "a refused request stores nothing");
    assert_eq!(s.request_friend(&d, &a, "").await.unwrap(), RequestOutcome::Pending);
    assert!(s.set_block(&a, &d, true).await.unwrap());
    assert_eq!(s.friend_state(&a, &d).await.unwrap(), None, "a pending request ends too");
    assert_eq!(s.blocked(&a).await.unwrap(), vec![c.clone(), d.clone()]);
    assert!(s.blocked(&c).await.unwrap().is_empty());
    assert!(s.set_block(&a, &c, false).await.unwrap());
    assert!(!s.set_block(&a, &c, false).await.unwrap(), "not blocked any more");
    assert_eq!(s.blocked(&a).await.unwrap(), vec![d.clone()]);
    assert_eq!(s.request_friend(&c, &a, "").await.unwrap(), RequestOutcome::Pending);
}

pub async fn messages_contract(s: &dyn MessageStore) {
    let p = prefix();
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let conv = format!("d:{a}:{b}");
    let members = [a.clone(), b.clone()];
    assert_eq!(s.last_seq(&conv).await.unwrap(), 0);

    let first = s.append(text(&conv, &a, "c1", "one"), &members).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.msg.seq, 1);
    assert_eq!(first.msg.body, serde_json::json!("one"));
    let again = s.append(text(&conv, &a, "c1", "one, resent"), &members).await.unwrap();
    assert!(again.duplicate, "same cmid from the same sender is idempotent");
    assert_eq!(again.msg, first.msg);
    let second = s.append(text(&conv, &b, "c1", "two"), &members).await.unwrap();
    assert_eq!(second.msg.seq, 2, "cmids are per sender");
    assert_ne!(second.msg.mid, first.msg.mid);
    assert!(second.msg.ts >= first.msg.ts);
    for i in 3..=10 {
        let m = s.append(text(&conv, &a, &format!("c{i}"), "x"), &members).await.unwrap();
        assert_eq!(m.msg.seq, i);
    }
    assert_eq!(s.last_seq(&conv).await.unwrap(), 10);
    assert_eq!(s.find_cmid(&conv, &a, "c1").await.unwrap(), Some(first.msg.clone()));
    assert_eq!(s.find_cmid(&conv, &b, "c1").await.unwrap().map(|m| m.seq), Some(2));
    assert_eq!(s.find_cmid(&conv, &a, "nope").await.unwrap(), None);

    let seqs = |v: Vec<crate::Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.range(&conv, 0, 3).await.unwrap()), vec![1, 2, 3]);
    assert_eq!(seqs(s.range(&conv, 8, 50).await.unwrap()), vec![9, 10]);
    assert_eq!(seqs(s.range(&conv, 10, 50).await.unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(s.history(&conv, None, 3).await.unwrap()), vec![10, 9, 8]);
    assert_eq!(seqs(s.history(&conv, Some(3), 50).await.unwrap()), vec![2, 1]);
    assert!(s.range(&format!("{conv}x"), 0, 10).await.unwrap().is_empty(), "no prefix bleed between convs");

    let other = format!("d:{a}:{p}z");
    s.append(text(&other, &a, "c1", "hey"), std::slice::from_ref(&a)).await.unwrap();
    let mut convs = s.user_convs(&a).await.unwrap();
    convs.sort();
    assert_eq!(convs, vec![(conv.clone(), 10), (other.clone(), 1)]);
    assert_eq!(s.user_convs(&b).await.unwrap(), vec![(conv.clone(), 10)]);
    let asked = [other.clone(), format!("{p}none"), conv.clone(), other.clone()];
    assert_eq!(s.last_seqs(&asked).await.unwrap(), vec![1, 0, 10, 1], "in the order asked, 0 when empty");
    assert!(s.last_seqs(&[]).await.unwrap().is_empty());
    let lasts = s.last_messages(&asked).await.unwrap();
    assert_eq!(
        lasts.iter().map(|m| m.as_ref().map(|m| m.seq)).collect::<Vec<_>>(),
        vec![Some(1), None, Some(10), Some(1)]
    );
    assert_eq!(lasts[2], s.history(&conv, None, 1).await.unwrap().pop(), "as history's newest");
    assert!(s.last_messages(&[]).await.unwrap().is_empty());

    s.set_ack(&b, "phone", &conv, 4).await.unwrap();
    s.set_ack(&b, "phone", &conv, 2).await.unwrap();
    s.set_ack(&b, "laptop", &conv, 9).await.unwrap();
    let acks = s.acks(&b, "phone").await.unwrap();
    assert_eq!(acks.get(&conv), Some(&4), "acks never move back and are per device");
    assert_eq!(acks.len(), 1);
    assert_eq!(s.user_acked(&b, &conv).await.unwrap(), 9, "the highest ack of any device");
    assert_eq!(s.user_acked(&b, &other).await.unwrap(), 0);
    assert_eq!(s.user_acked(&a, &conv).await.unwrap(), 0);

    // read positions: per user (not per device), never back
    assert!(s.reads(&b).await.unwrap().is_empty());
    assert_eq!(s.set_read(&b, &conv, 5).await.unwrap(), 5);
    assert_eq!(s.set_read(&b, &conv, 3).await.unwrap(), 5, "reads never move back");
    assert_eq!(s.set_read(&b, &conv, 5).await.unwrap(), 5);
    assert_eq!(s.set_read(&b, &conv, 7).await.unwrap(), 7);
    assert_eq!(s.set_read(&a, &other, 1).await.unwrap(), 1);
    assert_eq!(s.set_read(&a, &conv, 0).await.unwrap(), 0);
    assert_eq!(s.reads(&b).await.unwrap(), HashMap::from([(conv.clone(), 7)]));
    assert_eq!(s.reads(&a).await.unwrap(), HashMap::from([(other.clone(), 1)]), "a read of 0 records nothing");
    assert_eq!(s.set_read(&b, &conv, 0).await.unwrap(), 7, "a read of 0 returns the stored seq");

    // messages by mid
    assert_eq!(s.find_mid(&conv, &first.msg.mid).await.unwrap(), Some(first.msg.clone()));
    assert_eq!(s.find_mid(&conv, &second.msg.mid).await.unwrap(), Some(second.msg.clone()));
    assert_eq!(s.find_mid(&other, &second.msg.mid).await.unwrap(), None, "mids are looked up per conversation");
    assert_eq!(s.find_mid(&conv, "nope").await.unwrap(), None);

    // recall: same identity, kind "recalled", empty string body, everywhere
    let recalled = s.recall(&conv, 2).await.unwrap().expect("seq 2 exists");
    let expected =
        Message { kind: "recalled".into(), body: serde_json::Value::String(String::new()), ..second.msg.clone() };
    assert_eq!(recalled, expected);
    assert_eq!(s.range(&conv, 1, 1).await.unwrap(), vec![expected.clone()]);
    assert_eq!(s.history(&conv, Some(3), 1).await.unwrap(), vec![expected.clone()]);
    assert_eq!(seqs(s.range(&conv, 0, 50).await.unwrap()), (1..=10).collect::<Vec<_>>(), "nothing else moves");
    let kinds: Vec<String> = s.history(&conv, None, 50).await.unwrap().into_iter().map(|m| m.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "recalled").count(), 1, "{kinds:?}");
    assert_eq!(s.range(&conv, 0, 1).await.unwrap(), vec![first.msg.clone()], "other messages are untouched");
    assert_eq!(s.find_mid(&conv, &second.msg.mid).await.unwrap(), Some(expected.clone()));
    assert_eq!(s.find_cmid(&conv, &b, "c1").await.unwrap(), Some(expected.clone()));
    assert_eq!(s.recall(&conv, 2).await.unwrap(), Some(expected.clone()), "recalling again is harmless");
    assert_eq!(s.recall(&conv, 11).await.unwrap(), None, "no message with that seq");
    let tenth = s.recall(&conv, 10).await.unwrap().expect("seq 10 exists");
    assert_eq!(
        s.last_messages(std::slice::from_ref(&conv)).await.unwrap(),
        vec![Some(tenth)],
        "a recalled last message"
    );
    assert_eq!(s.recall(&format!("{conv}x"), 2).await.unwrap(), None);
    assert_eq!(s.last_seq(&conv).await.unwrap(), 10);
    let dup = s.append(text(&conv, &b, "c1", "two, resent"), &members).await.unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.msg, expected, "a resend finds the recalled form");
}

/// What a store wrote survives dropping it and connecting again (`connect`
/// is called twice and must reach the same data); returns the second store.
pub async fn data_survives_reconnect<S, F>(mut connect: impl FnMut() -> F) -> S
where
    S: MessageStore,
    F: std::future::Future<Output = crate::Result<S>>,
{
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let members = [format!("{p}a"), format!("{p}b")];
    let store = connect().await.unwrap();
    let first = store.append(text(&conv, &members[0], "c1", "x"), &members).await.unwrap();
    store.set_ack(&members[1], "phone", &conv, 1).await.unwrap();
    drop(store);

    // Connecting again re-runs the (idempotent) schema creation.
    let store = connect().await.unwrap();
    assert_eq!(store.range(&conv, 0, 10).await.unwrap(), vec![first.msg.clone()]);
    assert_eq!(store.last_seq(&conv).await.unwrap(), 1);
    assert_eq!(store.user_convs(&members[1]).await.unwrap(), vec![(conv.clone(), 1)]);
    assert_eq!(store.acks(&members[1], "phone").await.unwrap().get(&conv), Some(&1));
    let again = store.append(text(&conv, &members[0], "c1", "x"), &members).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.msg, first.msg);
    assert_eq!(store.append(text(&conv, &members[0], "c2", "x"), &members).await.unwrap().msg.seq, 2);
    store
}

/// Stores that started side by side on one fresh database (racing to
/// create its schema) all see what one of them wrote.
pub async fn fresh_stores_share_data(a: &dyn MessageStore, b: &dyn MessageStore, c: &dyn MessageStore) {
    let m = a.append(text("d:x:y", "x", "c1", "x"), &["x".to_string()]).await.unwrap();
    assert_eq!(m.msg.seq, 1);
    assert_eq!(b.last_seq("d:x:y").await.unwrap(), 1);
    assert_eq!(c.user_convs("x").await.unwrap(), vec![("d:x:y".to_string(), 1)]);
}

/// Appends racing on one conversation still get seqs 1..=n, each once.
pub async fn concurrent_appends(s: &dyn MessageStore) {
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let members = [format!("{p}a")];
    let mut seqs: Vec<u64> = Vec::new();
    let futs = (0..20).map(|i| s.append(text(&conv, &members[0], &format!("k{i}"), "x"), &members));
    for r in futures_join(futs).await {
        seqs.push(r.unwrap().msg.seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    // Poll all futures concurrently without extra dependencies.
    let mut pinned: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future completed")).collect()
}

/// Uploaded files: stored whole (over several chunks where a backend cuts them), read back,
/// ids never reused, conversations recorded once each; an unknown or malformed id is nobody's.
pub async fn files_contract(s: &dyn crate::files::FileStore) {
    use crate::files::FileMeta;
    let p = prefix();
    let id = format!("{p}f1");
    assert_eq!(s.file_meta(&id).await.unwrap(), None);
    assert_eq!(s.file_bytes(&id).await.unwrap(), None);
    assert!(s.file_convs(&id).await.unwrap().is_empty());
    let bytes = bytes::Bytes::from((0..600_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
    let meta = FileMeta {
        id: id.clone(),
        owner: format!("{p}ann"),
        name: "photo ü.png".into(),
        mime: "image/png".into(),
        size: bytes.len() as u64,
        ts: 1_718_000_000_000,
    };
    s.put_file(&meta, bytes.clone()).await.unwrap();
    assert_eq!(s.file_meta(&id).await.unwrap(), Some(meta.clone()));
    assert_eq!(s.file_bytes(&id).await.unwrap(), Some(bytes.clone()));
    assert!(s.put_file(&meta, bytes::Bytes::from_static(b"other")).await.is_err(), "an id is never reused");
    assert_eq!(s.file_bytes(&id).await.unwrap(), Some(bytes));
    s.share_file(&id, "d:a:b").await.unwrap();
    s.share_file(&id, "g:G1").await.unwrap();
    s.share_file(&id, "d:a:b").await.unwrap();
    let mut convs = s.file_convs(&id).await.unwrap();
    convs.sort();
    assert_eq!(convs, vec!["d:a:b".to_string(), "g:G1".to_string()]);
    let small = FileMeta { id: format!("{p}f2"), size: 1, ..meta };
    s.put_file(&small, bytes::Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(s.file_bytes(&small.id).await.unwrap().as_deref(), Some(&b"x"[..]));
    assert!(s.file_convs(&small.id).await.unwrap().is_empty());
    assert_eq!(s.file_meta("../../etc/passwd").await.unwrap(), None);
}

/// Route table contract.
pub async fn routes_contract(r: Arc<dyn RouteTable>) {
    let p = prefix();
    let user = format!("{p}u");
    let c1 = ConnRef { gateway: "gw1".into(), conn_id: 1, device: "d1".into(), session: "s1".into() };
    let c2 = ConnRef { gateway: "gw2".into(), conn_id: 1, device: "d2".into(), session: "s2".into() };
    r.add(&user, c1.clone()).await.unwrap();
    r.add(&user, c2.clone()).await.unwrap();
    r.add(&user, c2.clone()).await.unwrap();
    let mut got = r.get(&user).await.unwrap();
    got.sort_by(|a, b| a.gateway.cmp(&b.gateway));
    assert_eq!(got, vec![c1.clone(), c2.clone()]);
    // get_many: each user's connections in the users' order, none for an unknown user
    let other = format!("{p}v");
    let c3 = ConnRef { gateway: "gw1".into(), conn_id: 3, device: "d3".into(), session: "s3".into() };
    r.add(&other, c3.clone()).await.unwrap();
    let nobody = format!("{p}nobody");
    let many = r.get_many(&[other.clone(), nobody.clone(), user.clone()]).await.unwrap();
    assert_eq!(many.len(), 3);
    assert_eq!(&*many[0], std::slice::from_ref(&c3));
    assert!(many[1].is_empty());
    let mut got = many[2].to_vec();
    got.sort_by(|a, b| a.gateway.cmp(&b.gateway));
    assert_eq!(got, vec![c1.clone(), c2.clone()]);
    assert!(r.get_many(&[]).await.unwrap().is_empty());
    r.remove(&user, &c1).await.unwrap();
    assert_eq!(r.get(&user).await.unwrap(), vec![c2.clone()]);
    let many = r.get_many(&[user.clone(), other.clone()]).await.unwrap();
    assert_eq!((&*many[0], &*many[1]), (&[c2.clone()][..], &[c3.clone()][..]), "a removal is seen by the next read");
    r.remove_conn("gw2", 1).await.unwrap();
    r.remove_conn("gw1", 3).await.unwrap();
    assert!(r.get(&user).await.unwrap().is_empty());
    assert!(r.get_many(&[user, other]).await.unwrap().iter().all(|c| c.is_empty()));
}

/// The engines scripts/services.sh starts, as the tests find them.
#[derive(Clone)]
pub struct TestEngines {
    pub redis: String,
    pub pg: String,
    pub brokers: String,
}

impl TestEngines {
    /// Reads `SB_TEST_REDIS_URL`, `SB_TEST_POSTGRES_URL` and
    /// `SB_TEST_KAFKA_BROKERS`; when any is unset, prints a visible SKIPPED
    /// line naming `what` and returns `None`.
    pub fn from_env(what: &str) -> Option<Self> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (get("SB_TEST_REDIS_URL"), get("SB_TEST_POSTGRES_URL"), get("SB_TEST_KAFKA_BROKERS")) {
            (Some(redis), Some(pg), Some(brokers)) => Some(Self { redis, pg, brokers }),
            _ => {
                println!("SKIPPED: {what} (SB_TEST_REDIS_URL / SB_TEST_POSTGRES_URL / SB_TEST_KAFKA_BROKERS unset; scripts/test.sh sets them)");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedStore;
    use crate::memory_routes::MemoryRoutes;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_meets_the_contract() {
        let dir = std::env::temp_dir().join(format!("sb-contract-{}", prefix()));
        let store = EmbeddedStore::open(&dir).unwrap();
        run_all(&store, &store, &store, &store).await;
        drop(store);
        // reopening finds everything (durability across restart)
        let store = EmbeddedStore::open(&dir).unwrap();
        let _ = store.last_seq("d:x:y").await.unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A policy that checkpoints every few milliseconds, and one that never does in a test.
    fn policies() -> (crate::embedded::CheckpointPolicy, crate::embedded::CheckpointPolicy) {
        let every = |interval, bytes| crate::embedded::CheckpointPolicy { interval, bytes, ..Default::default() };
        (every(std::time::Duration::from_millis(5), 1 << 20), every(std::time::Duration::from_secs(3600), 1 << 30))
    }

    /// The search index and mention marks from the B-trees after checkpoints, with edits and a
    /// recall in the tail over checkpointed targets, and after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_search_merges_the_tail_over_checkpoints() {
        let dir = std::env::temp_dir().join(format!("sb-search-{}", prefix()));
        let (fast, slow) = policies();
        let store = EmbeddedStore::open_with(&dir, fast).unwrap();
        let setup = search_contract_appends(&store).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(store);
        // the targets are in the B-trees; the changes stay in the tail
        let store = EmbeddedStore::open_with(&dir, slow).unwrap();
        search_contract_changes(&store, &setup).await;
        search_final_state(&store, &setup.p, &setup.conv).await;
        drop(store);
        let store = EmbeddedStore::open_with(&dir, fast).unwrap();
        search_final_state(&store, &setup.p, &setup.conv).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        search_final_state(&store, &setup.p, &setup.conv).await;
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// After a SIGKILL with nothing checkpointed, the log's replay rebuilds the search index and
    /// the mention marks.
    #[test]
    fn embedded_search_is_replayed_after_a_sigkill() {
        const NAME: &str = "contract::tests::embedded_search_is_replayed_after_a_sigkill";
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        if let Some(dir) = std::env::var_os("SB_SEARCH_CHILD_DIR") {
            rt.block_on(async {
                let store = EmbeddedStore::open_with(std::path::Path::new(&dir), policies().1).unwrap();
                let (p, conv) = search_contract(&store).await;
                println!("ready {p} {conv}");
                std::future::pending::<()>().await;
            });
            return;
        }
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("sb-search-kill-{}", prefix()));
        let mut child = spawn_test_child(NAME, "SB_SEARCH_CHILD_DIR", &dir);
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        // (the test harness may print its own words before ours on the line)
        let ready = out.lines().map(|l| l.unwrap()).find_map(|l| l.split_once("ready ").map(|(_, r)| r.to_owned()));
        child.kill().unwrap();
        child.wait().unwrap();
        let ready = ready.expect("the child stored its messages");
        let (p, conv) = ready.split_once(' ').unwrap();
        rt.block_on(async {
            let store = EmbeddedStore::open(&dir).unwrap();
            search_final_state(&store, p, conv).await;
        });
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn memory_routes_meet_the_contract() {
        routes_contract(Arc::new(MemoryRoutes::default())).await;
    }
}
