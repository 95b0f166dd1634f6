//! Multi-device kick, presence (query and pushes), typing, and rate limits,
//! through real sockets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_presence_and_typing() {
    let dir = temp_dir("presence");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        for u in ["hana", "ivan", "joe"] {
            register(http_addr, u);
        }
        let mut hana = Client::login(http_addr, ws, "hana", "phone");
        let mut ivan = Client::login(http_addr, ws, "ivan", "desk");
        befriend(&mut hana, &mut ivan, "ivan", "hana");

        // presence query: friends are disclosed, strangers read offline
        let mut jo = Client::login(http_addr, ws, "joe", "joe1");
        let p = hana.ok("presence", json!({"users": ["ivan", "joe", "hana", "nobody"]}));
        assert_eq!(p["online"], json!({"ivan": true, "joe": false, "hana": true, "nobody": false}));
        hana.err("presence", json!({"users": "ivan"}), "bad_request");

        // typing reaches the other member only, and outsiders are refused
        hana.ok("typing", json!({"conv": "d:hana:ivan"}));
        let t = ivan.push("typing");
        assert_eq!((t["conv"].as_str(), t["user"].as_str()), (Some("d:hana:ivan"), Some("hana")));
        jo.err("typing", json!({"conv": "d:hana:ivan"}), "forbidden");

        // ivan's last connection goes: hana is told; he comes back: told again
        ivan.close();
        let p = hana.presence_push();
        assert_eq!((p["user"].as_str(), p["online"].as_bool()), (Some("ivan"), Some(false)));
        let mut ivan = Client::login(http_addr, ws, "ivan", "desk");
        let p = hana.presence_push();
        assert_eq!((p["user"].as_str(), p["online"].as_bool()), (Some("ivan"), Some(true)));
        assert!(jo.presence.is_empty(), "strangers get no presence pushes");

        // a second device is not a new presence; the same device again kicks the older
        let mut ivan_phone = Client::login(http_addr, ws, "ivan", "phone");
        let mut ivan_again = Client::login(http_addr, ws, "ivan", "desk");
        let k = ivan.read().expect("kick before close");
        assert_eq!(k["op"], "kick");
        assert!(k["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(ivan.read().is_none(), "kicked connection is closed");
        hana.quiet(Duration::from_millis(500));
        assert!(hana.presence.is_empty(), "ivan stayed online throughout: {:?}", hana.presence);

        // pushes go to the live devices only
        hana.ok("send", json!({"to": "ivan", "cmid": "k1", "type": "text", "body": "still there?"}));
        assert_eq!(ivan_again.push("msg")["msg"]["cmid"], "k1");
        assert_eq!(ivan_phone.push("msg")["msg"]["cmid"], "k1");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_rate_limited() {
    let dir = temp_dir("limits");
    let mut s = settings(&dir);
    s.user_rate = Some(1.0);
    s.user_burst = Some(3.0);
    s.auth_rate = Some(0.5);
    s.auth_burst = Some(3.0);
    let node = switchboard::AllInOne::start(&s).await.unwrap();
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        register(http_addr, "kim");
        let mut kim = Client::login(http_addr, ws, "kim", "k1");
        for _ in 0..3 {
            kim.ok("friend.list", json!({}));
        }
        let e = kim.err("friend.list", json!({}), "rate_limited");
        let wait = e["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1..=1000).contains(&wait), "{e}");
        kim.ok("ping", json!({}));
        std::thread::sleep(Duration::from_millis(wait + 50));
        kim.ok("friend.list", json!({}));

        // HTTP auth endpoints, per client IP: burst 3 used by register + login + this one
        let body = json!({"username": "kim", "password": "password123"});
        assert_eq!(http(http_addr, "POST", "/v1/auth/login", Some(body.clone()), None).0, 200);
        let (st, e) = http(http_addr, "POST", "/v1/auth/login", Some(body), None);
        assert_eq!((st, e["code"].as_str()), (429, Some("rate_limited")), "{e}");
        assert!(e["retry_after_ms"].as_u64().is_some());
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
