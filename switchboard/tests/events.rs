//! Edits, reactions and pins as events in the conversation's sequence, end to end through real
//! sockets: pushed to online devices, synced by an offline one in order, folded by `history`,
//! idempotent by cmid, and refused with the protocol's codes when they must be.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The next `msg` push of `c`, acked (quietly) so it is not pushed again.
fn take_msg(c: &mut Client) -> Value {
    let m = c.push("msg")["msg"].clone();
    c.send_text(&json!({"op": "ack", "conv": m["conv"], "seq": m["seq"], "quiet": true}).to_string());
    m
}

/// Per message: its body, the users per emoji, whether it is pinned.
type Folded = (Value, BTreeMap<String, Vec<String>>, bool);

/// What a client makes of a conversation's messages and events (in seq order): per content
/// message, its current text, reaction counts and pin.
fn client_fold(msgs: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Folded> = BTreeMap::new();
    let mut senders = BTreeMap::new();
    let mut recalled = Vec::new();
    for m in msgs {
        let (kind, mid) = (m["type"].as_str().unwrap(), m["mid"].as_str().unwrap().to_string());
        let target = m["body"]["mid"].as_str().unwrap_or_default().to_string();
        match kind {
            "edit" => {
                if senders.get(&target) == Some(&m["from"]) {
                    out.get_mut(&target).unwrap().0 = m["body"]["text"].clone();
                }
            }
            "reaction" => {
                let users =
                    out.get_mut(&target).unwrap().1.entry(m["body"]["emoji"].as_str().unwrap().into()).or_default();
                let who = m["from"].as_str().unwrap().to_string();
                users.retain(|u| *u != who);
                if m["body"]["on"] == true {
                    users.push(who);
                }
            }
            "pin" => out.get_mut(&target).unwrap().2 = m["body"]["on"] == true,
            _ => {
                senders.insert(mid.clone(), m["from"].clone());
                if kind == "recalled" {
                    recalled.push(mid.clone());
                }
                out.insert(mid, (m["body"].clone(), BTreeMap::new(), false));
            }
        }
    }
    out.into_iter()
        .map(|(mid, (body, reactions, pinned))| {
            if recalled.contains(&mid) {
                return (mid, json!({"body": body, "reactions": {}, "pinned": false}));
            }
            let counts: BTreeMap<String, usize> =
                reactions.into_iter().filter(|(_, u)| !u.is_empty()).map(|(e, u)| (e, u.len())).collect();
            (mid, json!({"body": body, "reactions": counts, "pinned": pinned}))
        })
        .collect()
}

/// The same view from the server's folded `history`.
fn server_fold(c: &mut Client, conv: &str) -> BTreeMap<String, Value> {
    let h = c.ok("history", json!({"conv": conv, "fold": true}));
    assert!(h["folded_through"].as_u64().unwrap() >= h["next_before"].as_u64().unwrap());
    h["msgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let reactions = m.get("reactions").cloned().unwrap_or(json!({}));
            let pinned = m.get("pinned").is_some_and(|p| p == true);
            (
                m["mid"].as_str().unwrap().to_string(),
                json!({"body": m["body"], "reactions": reactions, "pinned": pinned}),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_reactions_and_pins_ride_the_sequence() {
    with_node(
        "events",
        |s| s.edit_window_ms = Some(60_000),
        |http, ws| {
            let (mut alice, mut bob) = friends(http, ws, "alice", "bob");
            register(http, "carol");
            let mut carol = Client::login(http, ws, "carol", "c1");
            // bob's second device stays away until the end
            let conv = alice.ok("send", json!({"to": "bob", "cmid": "m1", "type": "text", "body": "hello"}))["conv"]
                .as_str()
                .unwrap()
                .to_string();
            let mut seen = vec![take_msg(&mut bob)];
            let m1 = seen[0]["mid"].as_str().unwrap().to_string();

            // an edit is the next seq, pushed like a message; its cmid makes it idempotent
            let e = alice.ok("edit", json!({"conv": conv, "mid": m1, "cmid": "e1", "text": "hello, edited"}));
            assert_eq!(e["seq"], 2);
            let pushed = take_msg(&mut bob);
            assert_eq!(
                (pushed["type"].as_str(), pushed["body"].clone()),
                (Some("edit"), json!({"mid": m1, "text": "hello, edited"}))
            );
            seen.push(pushed);
            let again = alice.ok("edit", json!({"conv": conv, "mid": m1, "cmid": "e1", "text": "hello, edited"}));
            assert_eq!((again["seq"].clone(), again["mid"].clone()), (e["seq"].clone(), e["mid"].clone()));
            bob.err("edit", json!({"conv": conv, "mid": m1, "cmid": "e2", "text": "mine now"}), "forbidden");
            carol.err("edit", json!({"conv": conv, "mid": m1, "cmid": "e3", "text": "x"}), "forbidden");
            alice.err("edit", json!({"conv": conv, "mid": m1, "cmid": "e4", "text": ""}), "bad_request");
            alice.err("edit", json!({"conv": conv, "mid": "nosuchmid", "cmid": "e5", "text": "x"}), "bad_request");
            alice.err("edit", json!({"conv": conv, "mid": e["mid"], "cmid": "e6", "text": "x"}), "bad_request");
            alice.err("recall", json!({"conv": conv, "mid": e["mid"]}), "bad_request");

            // reactions: each user holds an emoji once; events cannot be reacted to
            bob.ok("react", json!({"conv": conv, "mid": m1, "cmid": "r1", "emoji": "👍"}));
            seen.push(take_msg(&mut alice));
            for (cmid, op, emoji) in
                [("r2", "react", "🎉"), ("r3", "react", "👍"), ("r4", "unreact", "🎉"), ("r5", "react", "👍")]
            {
                alice.ok(op, json!({"conv": conv, "mid": m1, "cmid": cmid, "emoji": emoji}));
                seen.push(take_msg(&mut bob));
            }
            alice.err("react", json!({"conv": conv, "mid": m1, "cmid": "r6", "emoji": "two words"}), "bad_request");
            alice.err("react", json!({"conv": conv, "mid": m1, "cmid": "r7", "emoji": ""}), "bad_request");
            alice.err("react", json!({"conv": conv, "mid": e["mid"], "cmid": "r8", "emoji": "👍"}), "bad_request");
            carol.err("react", json!({"conv": conv, "mid": m1, "cmid": "r9", "emoji": "👍"}), "forbidden");

            // pins, and an image that cannot be edited
            let img = json!({"url": "https://files.example/x.png", "name": "x.png", "size": 10, "mime": "image/png"});
            let m2 = alice.ok("send", json!({"to": "bob", "cmid": "m2", "type": "image", "body": img}))["mid"].clone();
            seen.push(take_msg(&mut bob));
            alice.err("edit", json!({"conv": conv, "mid": m2, "cmid": "e7", "text": "x"}), "bad_request");
            alice.ok("pin", json!({"conv": conv, "mid": m2, "cmid": "p1"}));
            seen.push(take_msg(&mut bob));
            bob.ok("pin", json!({"conv": conv, "mid": m1, "cmid": "p2"}));
            seen.push(take_msg(&mut alice));
            bob.ok("unpin", json!({"conv": conv, "mid": m2, "cmid": "p3"}));
            seen.push(take_msg(&mut alice));

            // a recalled message takes no more events, and the fold shows it bare
            let m3 =
                alice.ok("send", json!({"to": "bob", "cmid": "m3", "type": "text", "body": "oops"}))["mid"].clone();
            seen.push(take_msg(&mut bob));
            bob.ok("react", json!({"conv": conv, "mid": m3, "cmid": "r10", "emoji": "😮"}));
            seen.push(take_msg(&mut alice));
            alice.ok("recall", json!({"conv": conv, "mid": m3}));
            bob.push("recall");
            alice.err("edit", json!({"conv": conv, "mid": m3, "cmid": "e8", "text": "x"}), "recalled");
            bob.err("react", json!({"conv": conv, "mid": m3, "cmid": "r11", "emoji": "👍"}), "recalled");

            // the server's fold of the conversation
            let fold = server_fold(&mut bob, &conv);
            assert_eq!(fold.len(), 3, "events are folded away: {fold:?}");
            assert_eq!(fold[&m1], json!({"body": "hello, edited", "reactions": {"👍": 2}, "pinned": true}));
            assert_eq!(fold[m2.as_str().unwrap()], json!({"body": img, "reactions": {}, "pinned": false}));
            assert_eq!(fold[m3.as_str().unwrap()], json!({"body": "", "reactions": {}, "pinned": false}));
            let h = bob.ok("history", json!({"conv": conv, "fold": true}));
            let first = h["msgs"].as_array().unwrap().iter().find(|m| m["mid"] == m1.as_str()).unwrap().clone();
            assert!(first["edited_ts"].as_u64().unwrap() >= first["ts"].as_u64().unwrap());
            assert_eq!(first["reacted"], json!(["👍"]));
            let all = h["msgs"].as_array().unwrap().len();
            let limited = bob.ok("history", json!({"conv": conv, "fold": true, "limit": 2}));
            assert!(limited["msgs"].as_array().unwrap().len() < all);

            // the online device applied what it was pushed (its own sends included, from sync);
            // an offline device syncs every event exactly once, in order, and converges
            let mut bob2 = Client::login(http, ws, "bob", "b2");
            let synced = bob2.ok("sync", json!({}))["msgs"].as_array().unwrap().clone();
            let seqs: Vec<u64> = synced.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gapless, each once");
            let kinds: Vec<&str> = synced.iter().map(|m| m["type"].as_str().unwrap()).collect();
            assert_eq!(
                kinds,
                [
                    "text", "edit", "reaction", "reaction", "reaction", "reaction", "reaction", "image", "pin", "pin",
                    "pin", "recalled", "reaction"
                ]
            );
            assert_eq!(client_fold(&synced), fold, "the offline device converges on the server's fold");
            let mut online: Vec<Value> = seen;
            online.sort_by_key(|m| m["seq"].as_u64());
            let mut online_fold = client_fold(&online);
            // the online device was told of the recall by its push
            online_fold.insert(m3.as_str().unwrap().into(), json!({"body": "", "reactions": {}, "pinned": false}));
            assert_eq!(online_fold, fold, "the online device converges too");

            // in a group only the owner and admins pin
            befriend(&mut alice, &mut carol, "carol", "alice");
            let g = alice.ok("group.create", json!({"name": "pins", "members": ["carol"]}));
            carol.push("group.joined");
            let gconv = g["conv"].as_str().unwrap().to_string();
            let gm = carol.ok("send", json!({"group": g["group"], "cmid": "g1", "type": "text", "body": "hi"}))["mid"]
                .clone();
            take_msg(&mut alice);
            carol.err("pin", json!({"conv": gconv, "mid": gm, "cmid": "gp1"}), "forbidden");
            carol.err("pin", json!({"conv": gconv, "mid": gm, "cmid": ""}), "bad_request");
            alice.ok("pin", json!({"conv": gconv, "mid": gm, "cmid": "gp2"}));
            take_msg(&mut carol);
            carol.ok("react", json!({"conv": gconv, "mid": gm, "cmid": "gr1", "emoji": "👍"}));
            take_msg(&mut alice);
            let gfold = server_fold(&mut carol, &gconv);
            assert_eq!(gfold[gm.as_str().unwrap()], json!({"body": "hi", "reactions": {"👍": 1}, "pinned": true}));
            bob.quiet(Duration::from_millis(300));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_end_with_their_window() {
    with_node(
        "edit-window",
        |s| {
            s.edit_window_ms = Some(1_000);
            s.reply_max_bytes = Some(3_000);
        },
        |http, ws| {
            let (mut alice, mut bob) = friends(http, ws, "ann", "ben");
            let sent = alice.ok("send", json!({"to": "ben", "cmid": "w1", "type": "text", "body": "soon fixed"}));
            take_msg(&mut bob);
            alice.ok("edit", json!({"conv": sent["conv"], "mid": sent["mid"], "cmid": "we1", "text": "fixed"}));
            take_msg(&mut bob);
            // edits that grow messages: the folded page is cut to the reply budget again
            let long = "x".repeat(1_000);
            for cmid in ["w2", "w3", "w4"] {
                let m = alice.ok("send", json!({"to": "ben", "cmid": cmid, "type": "text", "body": "short"}));
                take_msg(&mut bob);
                alice.ok("edit", json!({"conv": m["conv"], "mid": m["mid"], "cmid": format!("e{cmid}"), "text": long}));
                take_msg(&mut bob);
            }
            let folded = alice.ok("history", json!({"conv": sent["conv"], "fold": true}));
            let msgs = folded["msgs"].as_array().unwrap();
            assert!(!msgs.is_empty() && msgs.len() < 3, "{} folded messages in 3,000 bytes", msgs.len());
            assert!(msgs.iter().all(|m| m["body"] == long.as_str()), "the newest, edited");
            std::thread::sleep(Duration::from_millis(1_200));
            alice.err(
                "edit",
                json!({"conv": sent["conv"], "mid": sent["mid"], "cmid": "we2", "text": "again"}),
                "too_late",
            );
        },
    )
    .await;
}
