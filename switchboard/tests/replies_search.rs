//! Replies, mentions and search end to end through real sockets on embedded storage: a reply's
//! push quotes its target, a mention flags the mentioned member's `convs` entry until read,
//! and `search` finds English and Chinese words in the caller's conversations only, by
//! current text, ranked, highlighted and paged; bad input gets the protocol's codes.

mod common;

use common::*;
use serde_json::{json, Value};

/// The next `msg` push of `c`, acked quietly.
fn take_msg(c: &mut Client) -> Value {
    let m = c.push("msg")["msg"].clone();
    c.send_text(&json!({"op": "ack", "conv": m["conv"], "seq": m["seq"], "quiet": true}).to_string());
    m
}

/// The (conv, text) of each result of a search.
fn texts(r: &Value) -> Vec<(String, String)> {
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["conv"].as_str().unwrap().to_string(), h["text"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_mentions_and_search() {
    with_node(
        "replies",
        |s| s.max_mentions = Some(1),
        |http, ws| {
            let (mut alice, mut bob) = friends(http, ws, "alice", "bob");
            register(http, "carol");
            let mut carol = Client::login(http, ws, "carol", "c1");
            befriend(&mut alice, &mut carol, "carol", "alice");
            let g = alice.ok("group.create", json!({"name": "team", "members": ["bob", "carol"]}));
            let group = g["group"].as_str().unwrap().to_string();
            let gconv = format!("g:{group}");
            bob.push("group.joined");
            carol.push("group.joined");

            // a reply quotes its target in the push, the stored message and history
            let m1 = alice.ok(
                "send",
                json!({"group": group, "cmid": "m1", "type": "text", "body": "Lunch at noon tomorrow? 我们明天见"}),
            );
            take_msg(&mut bob);
            take_msg(&mut carol);
            let reply = json!({"group": group, "cmid": "m2", "type": "text", "body": "yes, noon works",
                               "reply_to": m1["mid"], "mentions": ["carol", "carol", "bob"]});
            let m2 = bob.ok("send", reply);
            let pushed = take_msg(&mut carol);
            assert_eq!(
                pushed["reply_to"],
                json!({"mid": m1["mid"], "seq": m1["seq"], "from": "alice", "type": "text",
                       "preview": "Lunch at noon tomorrow? 我们明天见"})
            );
            assert_eq!(pushed["mentions"], json!(["carol"]), "once each, the sender left out");
            take_msg(&mut alice);
            let h = carol.ok("history", json!({"conv": gconv, "limit": 1}));
            assert_eq!(h["msgs"][0]["reply_to"]["mid"], m1["mid"]);
            // the mention flags carol's conversation until she reads past it
            let entry = |c: &mut Client| {
                let convs = c.ok("convs", json!({}));
                convs["convs"].as_array().unwrap().iter().find(|e| e["conv"] == gconv.as_str()).unwrap().clone()
            };
            let e = entry(&mut carol);
            assert_eq!((e["mentioned"].clone(), e["mention_seq"].clone()), (json!(true), m2["seq"].clone()));
            assert!(entry(&mut bob).get("mentioned").is_none(), "bob mentioned nobody but himself");
            carol.ok("read", json!({"conv": gconv, "seq": m2["seq"]}));
            alice.push("read");
            bob.push("read");
            assert!(entry(&mut carol).get("mentioned").is_none(), "read past the mention");

            // refused: a reply to nothing, to an event, to a recalled message; a mention of an
            // outsider; more mentions than allowed
            let send = |extra: Value| {
                let mut f = json!({"group": group, "cmid": "bad", "type": "text", "body": "x"});
                f.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
                f
            };
            bob.err("send", send(json!({"reply_to": "nosuchmid"})), "bad_request");
            let ev = alice.ok("react", json!({"conv": gconv, "mid": m1["mid"], "cmid": "r1", "emoji": "👍"}));
            take_msg(&mut bob);
            take_msg(&mut carol);
            bob.err("send", send(json!({"reply_to": ev["mid"]})), "bad_request");
            bob.err("send", send(json!({"mentions": ["mallory"]})), "bad_request");
            register(http, "dave");
            bob.err("send", send(json!({"mentions": ["dave"]})), "bad_request");
            alice.ok("send", json!({"to": "bob", "cmid": "d1", "type": "text", "body": "secret noon plan"}));
            take_msg(&mut bob);
            // a reply names a message of its own conversation
            let elsewhere = json!({"to": "alice", "cmid": "x", "type": "text", "body": "x", "reply_to": m1["mid"]});
            bob.err("send", elsewhere, "bad_request");
            let r =
                alice.ok("send", json!({"group": group, "cmid": "m3", "type": "text", "body": "to be recalled noon"}));
            take_msg(&mut bob);
            take_msg(&mut carol);
            alice.ok("recall", json!({"conv": gconv, "mid": r["mid"]}));
            let _ = bob.push("recall");
            let _ = carol.push("recall");
            bob.err("send", send(json!({"reply_to": r["mid"]})), "recalled");
            // a retry of a reply stored before its target was recalled still gets its send.ok
            let t = alice.ok("send", json!({"group": group, "cmid": "m4", "type": "text", "body": "short-lived"}));
            take_msg(&mut bob);
            take_msg(&mut carol);
            let first = bob.ok("send", send(json!({"cmid": "rt", "reply_to": t["mid"]})));
            take_msg(&mut alice);
            take_msg(&mut carol);
            alice.ok("recall", json!({"conv": gconv, "mid": t["mid"]}));
            let _ = bob.push("recall");
            let _ = carol.push("recall");
            let again = bob.ok("send", send(json!({"cmid": "rt", "reply_to": t["mid"]})));
            assert_eq!((again["seq"].clone(), again["mid"].clone()), (first["seq"].clone(), first["mid"].clone()));
            alice.err("send", send(json!({"mentions": ["bob", "carol"]})), "bad_request");
            let own = carol.ok("send", send(json!({"cmid": "own", "mentions": ["bob", "carol"]})));
            take_msg(&mut alice);
            take_msg(&mut bob);
            let h = carol.ok("history", json!({"conv": gconv, "limit": 1}));
            assert_eq!(h["msgs"][0]["mid"], own["mid"]);
            assert_eq!(h["msgs"][0]["mentions"], json!(["bob"]), "the sender's own mention does not count");

            // search: English and Chinese, only the caller's conversations, ranked, highlighted
            let found = alice.ok("search", json!({"q": "noon"}));
            let got = texts(&found);
            assert_eq!(got.len(), 3, "{found}");
            assert!(got.iter().any(|(c, _)| c.starts_with("d:")), "alice's direct conversation too");
            assert!(!got.iter().any(|(_, t)| t.contains("recalled")), "a recalled message is not found");
            let carols = texts(&carol.ok("search", json!({"q": "noon"})));
            assert_eq!(carols.len(), 2, "never another user's conversation: {carols:?}");
            assert!(carols.iter().all(|(c, _)| *c == gconv));
            let zh = carol.ok("search", json!({"q": "明天"}));
            assert_eq!(texts(&zh).len(), 1);
            let hit = &zh["results"][0];
            assert_eq!(hit["mid"], m1["mid"]);
            assert_eq!(hit["highlights"], json!([[26, 28]]), "char offsets of 明天");
            let ranked = alice.ok("search", json!({"q": "noon tomorrow", "conv": gconv}));
            assert_eq!(texts(&ranked)[0].1, "Lunch at noon tomorrow? 我们明天见", "the phrase ranks first");
            let by = texts(&alice.ok("search", json!({"q": "noon", "from": "bob"})));
            assert_eq!(by, vec![(gconv.clone(), "yes, noon works".to_string())]);
            // an edit is searched by its new text only
            alice.ok("edit", json!({"conv": gconv, "mid": m1["mid"], "cmid": "e1", "text": "Dinner at eight instead"}));
            take_msg(&mut bob);
            take_msg(&mut carol);
            assert!(texts(&carol.ok("search", json!({"q": "明天"}))).is_empty());
            let dinner = texts(&carol.ok("search", json!({"q": "dinner"})));
            assert_eq!(dinner, vec![(gconv.clone(), "Dinner at eight instead".to_string())]);
            // a reply after the edit quotes the current text
            carol
                .ok("send", json!({"group": group, "cmid": "q2", "type": "text", "body": "ok", "reply_to": m1["mid"]}));
            assert_eq!(take_msg(&mut alice)["reply_to"]["preview"], "Dinner at eight instead");
            take_msg(&mut bob);
            // paging
            let p1 = alice.ok("search", json!({"q": "noon", "limit": 1}));
            assert_eq!(texts(&p1).len(), 1);
            let p2 = alice.ok("search", json!({"q": "noon", "limit": 1, "offset": p1["next_offset"]}));
            assert_ne!(texts(&p1), texts(&p2));
            // bad queries
            alice.err("search", json!({"q": " ,. "}), "bad_request");
            alice.err("search", json!({"q": "x".repeat(300)}), "bad_request");
            alice.err("search", json!({"q": "a b c d e f g h i j k l m n o p q"}), "bad_request");
            carol.err("search", json!({"q": "noon", "conv": "d:alice:bob"}), "forbidden");
            alice.err("search", json!({}), "bad_request");
            alice.err("search", json!({"q": "noon", "offset": 200}), "bad_request");
            alice.err("search", json!({"q": "noon", "offset": u64::MAX}), "bad_request");
        },
    )
    .await;
}
