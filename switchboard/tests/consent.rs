//! Consent: strangers cannot reach a user through a direct conversation's side channels or by
//! adding them to groups, and a repeated friend request does not notify again.

mod common;

use std::time::Duration;

use common::{blocking, register, start, temp_dir, Client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_push_to_a_user() {
    let dir = temp_dir("consent");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        for u in ["kay", "lee", "max"] {
            register(http_addr, u);
        }
        let mut kay = Client::login(http_addr, ws, "kay", "k1");
        let mut lee = Client::login(http_addr, ws, "lee", "l1");
        let mut max = Client::login(http_addr, ws, "max", "m1");

        // a stranger's typing is refused, a stranger's read mark is kept but not pushed
        lee.err("typing", json!({"conv": "d:kay:lee"}), "not_friends");
        lee.ok("read", json!({"conv": "d:kay:lee", "seq": 0}));
        // nor can a stranger put kay in a group
        lee.err("group.create", json!({"name": "spam", "members": ["kay"]}), "not_friends");
        assert_eq!(kay.read_within(Duration::from_millis(300)), None, "kay heard nothing from a stranger");

        // asking twice notifies once
        lee.ok("friend.request", json!({"to": "kay", "note": "hi"}));
        lee.ok("friend.request", json!({"to": "kay", "note": "hi again"}));
        let r = kay.push("friend.request");
        assert_eq!((r["from"].as_str(), r["note"].as_str()), (Some("lee"), Some("hi")));
        assert_eq!(kay.read_within(Duration::from_millis(300)), None, "the repeated request notified again");

        // friends: typing and receipts flow, and groups may include each other
        kay.ok("friend.accept", json!({"from": "lee"}));
        assert_eq!(lee.push("friend.accepted")["user"], "kay");
        lee.ok("typing", json!({"conv": "d:kay:lee"}));
        assert_eq!(kay.push("typing")["user"], "lee");
        let sent = kay.ok("send", json!({"to": "lee", "cmid": "c1", "type": "text", "body": "hello"}));
        assert_eq!(lee.push("msg")["msg"]["seq"], sent["seq"]);
        lee.ok("read", json!({"conv": "d:kay:lee", "seq": sent["seq"]}));
        assert_eq!(kay.push("read")["user"], "lee");
        let g = lee.ok("group.create", json!({"name": "pair", "members": ["kay"]}));
        assert_eq!(kay.push("group.joined")["group"], g["group"]);
        // max is still a stranger to both
        max.err("group.create", json!({"name": "x", "members": ["kay", "lee"]}), "not_friends");

        // unfriended: back to strangers
        kay.ok("friend.delete", json!({"user": "lee"}));
        lee.err("typing", json!({"conv": "d:kay:lee"}), "not_friends");
        lee.ok("read", json!({"conv": "d:kay:lee", "seq": sent["seq"]}));
        assert_eq!(kay.read_within(Duration::from_millis(300)), None);
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
