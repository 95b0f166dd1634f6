//! Offline notifications end to end: a webhook receiver in this test (a small HTTP server) gets
//! exactly one signed, collapsed notification per conversation for messages nobody acked in
//! time, none when a device acked, a retry after a 500, and the dead-letter file keeps what
//! failed every attempt.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "webhook-secret-for-the-test";

/// One request the webhook received: the status it answered, its signature header, its body.
struct Hit {
    status: u16,
    signature: String,
    raw: Vec<u8>,
    body: Value,
}

/// A webhook on a free port: answers 500 to the first request for each user in `fail_once`,
/// 500 always for `fail_always`, 200 otherwise; every request goes to the returned channel.
fn webhook(fail_once: &[&str], fail_always: &[&str]) -> (SocketAddr, mpsc::Receiver<Hit>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut once: Vec<String> = fail_once.iter().map(|s| s.to_string()).collect();
    let always: Vec<String> = fail_always.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = HashMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            let mut raw = vec![0; len];
            reader.read_exact(&mut raw).unwrap();
            let body: Value = serde_json::from_slice(&raw).unwrap();
            let user = body["user"].as_str().unwrap_or_default().to_string();
            let status = if always.contains(&user) {
                500
            } else if let Some(i) = once.iter().position(|u| *u == user) {
                once.remove(i);
                500
            } else {
                200
            };
            let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let signature = headers.get("x-switchboard-signature").cloned().unwrap_or_default();
            if tx.send(Hit { status, signature, raw, body }).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// The signature a receiver expects (the function is checked against RFC 4231 in its unit test).
fn sign(body: &[u8]) -> String {
    switchboard_logic::notify::signature(SECRET.as_bytes(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseen_messages_are_notified_once_per_conversation() {
    let (hook, hits) = webhook(&["dan"], &["finn"]);
    let dir = temp_dir("notify");
    let mut s = settings(&dir);
    s.notify_url = Some(format!("http://{hook}/hooks/switchboard"));
    s.notify_secret = Some(SECRET.into());
    s.notify_delay_ms = Some(700);
    s.notify_backoff_ms = Some(100);
    s.notify_attempts = Some(3);
    s.max_push_tokens = Some(2);
    let node = switchboard::AllInOne::start(&s).await.unwrap();
    let (http, ws) = (node.http_addr(), node.ws_addr());
    let dead_letters = dir.join("notify-dead-letter.jsonl");
    blocking(move || {
        register(http, "alice");
        let mut alice = Client::login(http, ws, "alice", "a1");
        let mut friend = |name: &str| {
            register(http, name);
            let mut c = Client::login(http, ws, name, &format!("{name}1"));
            befriend(&mut alice, &mut c, name, "alice");
            c
        };
        let mut bob = friend("bob");
        let mut carol = friend("carol");
        let dan = friend("dan");
        let erin = friend("erin");
        let finn = friend("finn");
        let gus = friend("gus");
        let mut hana = friend("hana");
        // bob's phone gets notifications through FCM; his second device signs out, and its
        // token with it
        bob.ok("push.register", json!({"platform": "fcm", "token": "fcm-bob-1"}));
        bob.err("push.register", json!({"platform": "pager", "token": "x"}), "bad_request");
        bob.err("push.register", json!({"platform": "fcm", "token": ""}), "bad_request");
        bob.err("push.register", json!({"platform": "apns", "token": "x".repeat(5000)}), "bad_request");
        let b2 = login(http, "bob", "b2")["access_token"].as_str().unwrap().to_string();
        let mut tablet = Client::connect(ws);
        assert_eq!(tablet.call("auth", json!({"token": b2}))["op"], "auth.ok");
        tablet.ok("push.register", json!({"platform": "apns", "token": "apns-bob-2"}));
        tablet.close();
        let (status, _) = common::http(http, "POST", "/v1/auth/logout", None, Some(&b2));
        assert_eq!(status, 204);
        // erin keeps two tokens: a third device's replaces the least recently registered
        for (device, token) in [("e2", "fcm-erin-2"), ("e3", "fcm-erin-3"), ("e4", "fcm-erin-4")] {
            let mut c = Client::login(http, ws, "erin", device);
            c.ok("push.register", json!({"platform": "fcm", "token": token}));
            c.close();
            std::thread::sleep(Duration::from_millis(5));
        }
        // hana muted alice: no notification for her, the conversation shows it
        let conv = "d:alice:hana";
        hana.err("mute", json!({"conv": conv, "until": 1}), "bad_request");
        hana.err("mute", json!({"conv": "d:alice:bob"}), "forbidden");
        hana.ok("mute", json!({"conv": conv}));
        alice.ok("send", json!({"to": "hana", "cmid": "h0", "type": "text", "body": "before"}));
        let m = hana.push("msg")["msg"].clone();
        hana.ok("ack", json!({"conv": m["conv"], "seq": m["seq"]}));
        let entry = hana.ok("convs", json!({}))["convs"][0].clone();
        assert_eq!((entry["muted"].clone(), entry.get("muted_until")), (json!(true), None));
        for c in [bob, dan, erin, finn, gus, hana] {
            c.close();
        }
        alice.ok("send", json!({"to": "hana", "cmid": "h1", "type": "text", "body": "muted away"}));
        // bob is away: two messages, one notification
        for (cmid, text) in [("b1", "are you there?"), ("b2", "call me back")] {
            alice.ok("send", json!({"to": "bob", "cmid": cmid, "type": "text", "body": text}));
        }
        // carol's device acks in time: no notification
        alice.ok("send", json!({"to": "carol", "cmid": "c1", "type": "text", "body": "seen at once"}));
        let m = carol.push("msg")["msg"].clone();
        carol.ok("ack", json!({"conv": m["conv"], "seq": m["seq"]}));
        // dan's first delivery fails (500) and is retried; finn's fails every time
        alice.ok("send", json!({"to": "dan", "cmid": "d1", "type": "text", "body": "for dan"}));
        alice.ok("send", json!({"to": "finn", "cmid": "f1", "type": "text", "body": "for finn"}));
        // a recalled message is not shown by the notification
        let oops = alice.ok("send", json!({"to": "gus", "cmid": "g1", "type": "text", "body": "wrong chat"}));
        alice.ok("recall", json!({"conv": oops["conv"], "mid": oops["mid"]}));
        // erin's comes last
        alice.ok("send", json!({"to": "erin", "cmid": "e1", "type": "text", "body": "for erin"}));

        let mut got: Vec<Hit> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = |got: &[Hit]| {
            let ok = |u: &str| got.iter().any(|h| h.body["user"] == u && h.status == 200);
            ok("bob")
                && ok("dan")
                && ok("erin")
                && ok("gus")
                && got.iter().filter(|h| h.body["user"] == "finn").count() == 3
        };
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            got.push(hits.recv_timeout(left).expect("the notifications arrive"));
        }
        for h in &got {
            assert_eq!(h.signature, sign(&h.raw), "signed with the shared secret");
        }
        let of = |u: &str| got.iter().filter(|h| h.body["user"] == u).collect::<Vec<_>>();
        let bob = of("bob");
        assert_eq!(bob.len(), 1, "one notification for the conversation");
        assert_eq!((bob[0].body["conv"].as_str(), bob[0].body["count"].as_u64()), (Some("d:alice:bob"), Some(2)));
        assert_eq!(
            (bob[0].body["last"]["text"].as_str(), bob[0].body["last"]["from"].as_str()),
            (Some("call me back"), Some("alice"))
        );
        assert_eq!(
            bob[0].body["devices"],
            json!([{"device": "bob1", "platform": "fcm", "token": "fcm-bob-1"}]),
            "the signed-out device's token went with it"
        );
        assert_eq!(of("dan")[0].body["devices"], json!([]), "dan registered no token");
        let erin: Vec<&str> =
            of("erin")[0].body["devices"].as_array().unwrap().iter().map(|d| d["token"].as_str().unwrap()).collect();
        assert_eq!(erin, ["fcm-erin-3", "fcm-erin-4"], "the oldest token made room");
        assert!(of("carol").is_empty(), "carol's device acked in time");
        assert!(of("alice").is_empty(), "a sender is never told of her own messages");
        let gus = &of("gus")[0].body["last"];
        assert_eq!((gus["type"].as_str(), gus["text"].as_str()), (Some("recalled"), Some("")), "{gus}");
        let dan: Vec<u16> = of("dan").iter().map(|h| h.status).collect();
        assert_eq!(dan, vec![500, 200], "retried after the 500");
        assert_eq!(of("dan")[0].raw, of("dan")[1].raw, "the retry is the same notification");

        // what failed every attempt is in the dead-letter file
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(http, "switchboard_notify_dead_letters_total") < 1 {
            assert!(Instant::now() < deadline, "finn's notification was never dead-lettered");
            std::thread::sleep(Duration::from_millis(50));
        }
        let lines: Vec<Value> =
            std::fs::read_to_string(&dead_letters).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0]["user"].as_str(), lines[0]["last"]["text"].as_str()), (Some("finn"), Some("for finn")));
        assert_eq!(metric(http, "switchboard_notify_sent_total"), 4, "bob, dan, erin, gus");
        assert_eq!(metric(http, "switchboard_notify_failed_total"), 4, "dan once, finn three times");
        assert!(metric(http, "switchboard_notify_seen_total") >= 1, "carol's was dropped");
        assert_eq!(metric(http, "switchboard_notify_muted_total"), 1, "hana's was not sent");
        assert!(of("hana").is_empty());
        assert_eq!(metric(http, "switchboard_notify_pending"), 0);
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
