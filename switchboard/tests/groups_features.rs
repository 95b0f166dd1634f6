//! Groups, read receipts, conversations, recall, call signaling,
//! friend.delete and bans, end to end through real sockets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn seqs(msgs: &Value) -> Vec<u64> {
    msgs.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_conversation_of_three() {
    let dir = temp_dir("groups");
    let mut s = settings(&dir);
    s.recall_window_ms = Some(1500);
    let node = switchboard::AllInOne::start(&s).await.unwrap();
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        for u in ["owen", "pia", "quinn", "rex"] {
            register(http_addr, u);
        }
        let mut owen = Client::login(http_addr, ws, "owen", "o1");
        let mut pia = Client::login(http_addr, ws, "pia", "p1");
        let mut quinn = Client::login(http_addr, ws, "quinn", "q1");
        let mut rex = Client::login(http_addr, ws, "rex", "r1");

        owen.err("group.create", json!({"name": "trip", "members": ["pia", "ghost"]}), "no_such_user");
        owen.err("group.create", json!({"name": "", "members": []}), "bad_request");
        // only friends can be added
        owen.err("group.create", json!({"name": "trip", "members": ["pia", "quinn"]}), "not_friends");
        befriend(&mut owen, &mut pia, "pia", "owen");
        befriend(&mut owen, &mut quinn, "quinn", "owen");
        let g = owen.ok("group.create", json!({"name": "trip", "members": ["pia", "quinn", "owen"]}));
        let (group, conv) = (g["group"].as_str().unwrap().to_string(), g["conv"].as_str().unwrap().to_string());
        assert_eq!(conv, format!("g:{group}"));
        assert!(group.len() >= 6 && group.chars().all(|c| c.is_ascii_alphanumeric()));
        for c in [&mut pia, &mut quinn] {
            let j = c.push("group.joined");
            assert_eq!((j["group"].as_str(), j["conv"].as_str()), (Some(group.as_str()), Some(conv.as_str())));
        }
        let m = pia.ok("group.members", json!({ "group": group }));
        assert_eq!(
            m["members"],
            json!([{"user": "owen", "role": "owner"}, {"user": "pia", "role": "member"}, {"user": "quinn", "role": "member"}])
        );
        assert_eq!(quinn.ok("group.list", json!({}))["groups"], json!([{"group": group, "name": "trip", "role": "member", "invite_only": false}]));

        // group send: one seq per group, every other member gets it
        let sent = owen.ok("send", json!({"group": group, "cmid": "g1", "type": "text", "body": "hi all"}));
        assert_eq!((sent["conv"].as_str(), sent["seq"].as_u64()), (Some(conv.as_str()), Some(1)));
        for c in [&mut pia, &mut quinn] {
            let msg = c.push("msg")["msg"].clone();
            assert_eq!((msg["seq"].as_u64(), msg["from"].as_str()), (Some(1), Some("owen")));
        }
        let r = pia.ok("send", json!({"group": group, "cmid": "g1", "type": "text", "body": "hey"}));
        assert_eq!(r["seq"], 2);
        owen.push("msg");
        quinn.push("msg");

        // outsiders: no reading, no writing, until they join
        rex.err("send", json!({"group": group, "cmid": "x", "type": "text", "body": "spam"}), "not_member");
        rex.err("history", json!({ "conv": conv }), "forbidden");
        rex.err("group.members", json!({ "group": group }), "not_member");
        rex.err("read", json!({"conv": conv, "seq": 1}), "forbidden");
        rex.err("send", json!({"group": "NoSuchGroup1", "cmid": "x", "type": "text", "body": "b"}), "no_such_group");
        assert_eq!(rex.ok("sync", json!({}))["msgs"], json!([]));
        rex.ok("group.join", json!({ "group": group }));
        assert_eq!(seqs(&rex.ok("history", json!({ "conv": conv }))["msgs"]), vec![2, 1]);
        rex.ok("group.leave", json!({ "group": group }));
        rex.err("send", json!({"group": group, "cmid": "x", "type": "text", "body": "b"}), "not_member");
        rex.err("group.join", json!({"group": "NoSuchGroup1"}), "no_such_group");

        // read receipts and conversation list
        let c = quinn.ok("convs", json!({}));
        assert_eq!(c["convs"].as_array().unwrap().len(), 1);
        assert_eq!((c["convs"][0]["unread"].as_u64(), c["convs"][0]["read_seq"].as_u64()), (Some(2), Some(0)));
        assert_eq!(c["convs"][0]["last"]["seq"], 2);
        quinn.ok("read", json!({"conv": conv, "seq": 2}));
        for c in [&mut owen, &mut pia] {
            let r = c.push("read");
            assert_eq!((r["user"].as_str(), r["seq"].as_u64(), r["conv"].as_str()), (Some("quinn"), Some(2), Some(conv.as_str())));
        }
        let c = quinn.ok("convs", json!({}));
        assert_eq!((c["convs"][0]["unread"].as_u64(), c["convs"][0]["read_seq"].as_u64()), (Some(0), Some(2)));

        // recall: sender only, within the window, keeps the seq
        pia.err("recall", json!({"conv": conv, "mid": sent["mid"]}), "forbidden");
        pia.err("recall", json!({"conv": conv, "mid": "nope"}), "bad_request");
        owen.ok("recall", json!({"conv": conv, "mid": sent["mid"]}));
        for c in [&mut pia, &mut quinn] {
            let r = c.push("recall");
            assert_eq!((r["mid"].clone(), r["by"].as_str()), (sent["mid"].clone(), Some("owen")));
        }
        let h = quinn.ok("history", json!({ "conv": conv }));
        assert_eq!(seqs(&h["msgs"]), vec![2, 1]);
        assert_eq!((h["msgs"][1]["type"].as_str(), h["msgs"][1]["body"].as_str()), (Some("recalled"), Some("")));
        std::thread::sleep(Duration::from_millis(1600));
        pia.err("recall", json!({"conv": conv, "mid": r["mid"]}), "too_late");

        // offline member catches up on the group by sync
        quinn.close();
        owen.ok("send", json!({"group": group, "cmid": "g3", "type": "text", "body": "where is quinn"}));
        pia.push("msg");
        let mut quinn = Client::login(http_addr, ws, "quinn", "q2");
        let s = quinn.ok("sync", json!({}));
        assert_eq!(seqs(&s["msgs"]), vec![1, 2, 3], "a new device gets the whole group");
        assert_eq!(s["msgs"][0]["type"], "recalled");

        // the owner leaves: ownership passes on
        owen.ok("group.leave", json!({ "group": group }));
        let m = pia.ok("group.members", json!({ "group": group }));
        assert_eq!(m["members"], json!([{"user": "pia", "role": "owner"}, {"user": "quinn", "role": "member"}]));
        owen.err("group.leave", json!({ "group": group }), "not_member");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_friend_delete_and_bans() {
    let dir = temp_dir("calls");
    let mut s = settings(&dir);
    s.ring_timeout_ms = Some(800);
    s.admin_token = Some("admin-secret-123".into());
    let node = switchboard::AllInOne::start(&s).await.unwrap();
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        for u in ["sam", "tia", "uma"] {
            register(http_addr, u);
        }
        let mut sam = Client::login(http_addr, ws, "sam", "s1");
        let mut tia = Client::login(http_addr, ws, "tia", "t1");
        let mut uma = Client::login(http_addr, ws, "uma", "u1");
        befriend(&mut sam, &mut tia, "tia", "sam");

        // signaling relayed both ways
        sam.ok("call.offer", json!({"to": "tia", "call_id": "c1", "sdp": "v=0 offer"}));
        let o = tia.push("call.offer");
        assert_eq!(
            (o["from"].as_str(), o["call_id"].as_str(), o["sdp"].as_str()),
            (Some("sam"), Some("c1"), Some("v=0 offer"))
        );
        tia.ok("call.answer", json!({"to": "sam", "call_id": "c1", "sdp": "v=0 answer"}));
        assert_eq!(sam.push("call.answer")["sdp"], "v=0 answer");
        sam.ok("call.ice", json!({"to": "tia", "call_id": "c1", "candidate": "candidate:1 1 udp"}));
        assert_eq!(tia.push("call.ice")["candidate"], "candidate:1 1 udp");
        sam.ok("call.hangup", json!({"to": "tia", "call_id": "c1"}));
        assert_eq!(tia.push("call.hangup")["call_id"], "c1");
        sam.quiet(Duration::from_millis(1200)); // answered: no timeout
        sam.err("call.offer", json!({"to": "tia", "call_id": "c2"}), "bad_request");
        uma.err("call.offer", json!({"to": "sam", "call_id": "c3", "sdp": "x"}), "not_friends");

        // an unanswered offer rings out on the caller's gateway
        sam.ok("call.offer", json!({"to": "tia", "call_id": "c4", "sdp": "v=0"}));
        tia.push("call.offer");
        let h = sam.push("call.hangup");
        assert_eq!((h["call_id"].as_str(), h["reason"].as_str()), (Some("c4"), Some("timeout")));
        let h = tia.push("call.hangup");
        assert_eq!(
            (h["call_id"].as_str(), h["reason"].as_str(), h["from"].as_str()),
            (Some("c4"), Some("timeout"), Some("sam"))
        );

        // friend.delete: direct sends stop
        sam.ok("friend.delete", json!({"user": "tia"}));
        sam.err("send", json!({"to": "tia", "cmid": "d1", "type": "text", "body": "hi"}), "not_friends");
        tia.err("send", json!({"to": "sam", "cmid": "d1", "type": "text", "body": "hi"}), "not_friends");
        assert_eq!(tia.ok("friend.list", json!({}))["friends"], json!([]));

        // bans: admin only; the banned user is kicked and cannot sign in
        let ban =
            |token: Option<&str>| http(http_addr, "POST", "/v1/admin/ban", Some(json!({"username": "uma"})), token);
        assert_eq!(ban(None).1["code"], "unauthorized");
        assert_eq!(ban(Some("wrong-token-000")).0, 401);
        let uma_token = login(http_addr, "uma", "u2")["access_token"].as_str().unwrap().to_string();
        assert_eq!(ban(Some("admin-secret-123")).0, 204);
        let k = uma.read().expect("kick before close");
        assert_eq!((k["op"].as_str(), k["reason"].as_str()), (Some("kick"), Some("account banned")));
        assert!(uma.read().is_none());
        let (st, e) = http(
            http_addr,
            "POST",
            "/v1/auth/login",
            Some(json!({"username": "uma", "password": "password123"})),
            None,
        );
        assert_eq!((st, e["code"].as_str()), (403, Some("forbidden")));
        let mut again = Client::connect(ws);
        again.err("auth", json!({ "token": uma_token }), "bad_token");
        let (st, _) =
            http(http_addr, "POST", "/v1/admin/ban", Some(json!({"username": "ghost"})), Some("admin-secret-123"));
        assert_eq!(st, 404);
        assert_eq!(
            http(http_addr, "POST", "/v1/admin/unban", Some(json!({"username": "uma"})), Some("admin-secret-123")).0,
            204
        );
        Client::login(http_addr, ws, "uma", "u3").ok("ping", json!({}));
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// `convs` in pages: at most `limit` entries and `reply_max_bytes` of them (one at least), each
/// page continuing after the previous page's `next_before`, every conversation once, newest
/// activity first. With 13 conversations of ~700-byte messages against a 4,000-byte budget the
/// later pages are built from rows whose messages were let go and read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convs_come_in_pages_by_count_and_bytes() {
    let dir = temp_dir("convs-pages");
    let mut s = settings(&dir);
    s.reply_max_bytes = Some(4_000);
    let node = switchboard::AllInOne::start(&s).await.unwrap();
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        register(http_addr, "una");
        let mut una = Client::login(http_addr, ws, "una", "u1");
        let mut groups = Vec::new();
        for i in 0..12 {
            let g = una.ok("group.create", json!({"name": format!("room {i}"), "members": []}));
            let conv = g["conv"].as_str().unwrap().to_string();
            let body = format!("{i:02}{}", "x".repeat(700));
            una.ok("send", json!({"group": g["group"], "cmid": format!("c{i}"), "type": "text", "body": body}));
            groups.push(conv);
            std::thread::sleep(Duration::from_millis(2));
        }
        // the newest conversation's last message alone is over the budget: it still comes, alone
        let g = una.ok("group.create", json!({"name": "big", "members": []}));
        let big = g["conv"].as_str().unwrap().to_string();
        una.ok("send", json!({"group": g["group"], "cmid": "big", "type": "text", "body": "y".repeat(5_000)}));

        let first = una.ok("convs", json!({}));
        let convs = first["convs"].as_array().unwrap();
        assert_eq!(convs.len(), 1, "{first}");
        assert_eq!((convs[0]["conv"].as_str(), first["more"].as_bool()), (Some(big.as_str()), Some(true)));

        let mut seen = vec![big.clone()];
        let mut last_ts = u64::MAX;
        let mut before = first["next_before"].clone();
        let mut pages = 1;
        loop {
            let page = una.ok("convs", json!({ "before": before }));
            let entries = page["convs"].as_array().unwrap();
            assert!(!entries.is_empty() && entries.len() < 12, "pages are cut by bytes: {}", entries.len());
            for e in entries {
                let ts = e["last"]["ts"].as_u64().unwrap();
                assert!(ts <= last_ts, "newest activity first");
                last_ts = ts;
                // her own message: read by sending it
                assert_eq!((e["unread"].as_u64(), e["read_seq"].as_u64()), (Some(0), Some(1)));
                seen.push(e["conv"].as_str().unwrap().to_string());
            }
            pages += 1;
            if !page["more"].as_bool().unwrap() {
                assert!(page.get("next_before").is_none());
                break;
            }
            before = page["next_before"].clone();
        }
        assert!(pages >= 4, "{pages} pages");
        let mut expected: Vec<String> = groups.iter().rev().cloned().collect();
        expected.insert(0, big.clone());
        assert_eq!(seen, expected, "every conversation once, newest first");

        let two = una.ok("convs", json!({"limit": 2, "before": first["next_before"]}));
        let convs: Vec<&str> = two["convs"].as_array().unwrap().iter().map(|e| e["conv"].as_str().unwrap()).collect();
        assert_eq!(convs, [groups[11].as_str(), groups[10].as_str()]);
        assert_eq!(two["more"], true);
        let rest = una.ok("convs", json!({"limit": 2, "before": two["next_before"]}));
        assert_eq!(rest["convs"][0]["conv"], groups[9].as_str());
        una.err("convs", json!({"before": "yesterday"}), "bad_request");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
