//! Pushes ride the gateway's own link to logic: a gateway and a logic instance started as
//! separate roles (real gRPC between them), the gateway advertising a push address where nothing
//! listens, so the `Gateway.Push` service cannot carry a single push. Messages, friend requests
//! and the rest still reach the clients, also after logic restarts (the gateway's link opens
//! again and names the gateway again), and logic counts its push batches as sent down the link.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::{GatewayRole, LogicRole, Settings};

const SECRET: &str = "link-pushes-secret-0123456789abcdefgh";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_ride_the_link_when_the_push_service_is_unreachable() {
    let dir = temp_dir("link-pushes");
    let s = Settings { cluster_secret: Some(SECRET.into()), ..settings(&dir) };
    let logic = LogicRole::start(&s, Vec::new(), Vec::new()).await.expect("logic starts");
    let (http_addr, grpc_addr) = (logic.http_addr, logic.grpc_addr);
    // Port 1: nothing listens there, so only the link can carry pushes.
    let dead = "http://127.0.0.1:1".to_string();
    let gw = GatewayRole::start(&Settings {
        logic_url: Some(format!("http://{grpc_addr}")),
        advertise_push: Some(dead),
        ..s.clone()
    })
    .await
    .expect("gateway starts");
    let ws_addr = gw.gateway.ws_addr();

    blocking(move || {
        // befriending pushes `friend.request` and `friend.accepted`
        let (mut a, mut b) = friends(http_addr, ws_addr, "lina", "lars");
        for i in 0..20 {
            let ok =
                a.ok("send", json!({"to": "lars", "cmid": format!("m{i}"), "type": "text", "body": format!("hi {i}")}));
            let m = b.push("msg");
            assert_eq!(m["msg"]["seq"], ok["seq"], "{m} {ok}");
            assert_eq!(m["msg"]["body"], format!("hi {i}"));
            b.ok("ack", json!({"conv": m["msg"]["conv"], "seq": m["msg"]["seq"]}));
        }
    })
    .await;
    assert!(metric(http_addr, "switchboard_logic_link_push_batches_total") >= 22);
    assert_eq!(metric(http_addr, "switchboard_logic_push_failures_total"), 0);

    // A new logic instance at the same address (the embedded store keeps accounts, not routes:
    // the devices connect again); the gateway's next call opens a new link.
    logic.stop().await;
    let s2 = Settings { logic_addr: Some(grpc_addr), http_addr: Some(http_addr), ..s.clone() };
    let logic = LogicRole::start(&s2, Vec::new(), Vec::new()).await.expect("logic starts again");
    blocking(move || {
        let mut a = Client::login(http_addr, ws_addr, "lina", "a2");
        let mut b = Client::login(http_addr, ws_addr, "lars", "b2");
        let ok = send_retrying(&mut a, "lars", "after-restart", Duration::from_secs(10));
        let m = b.push("msg");
        assert_eq!(m["msg"]["seq"], ok["seq"], "{m}");
        b.ok("send", json!({"to": "lina", "cmid": "back", "type": "text", "body": "hello again"}));
        assert_eq!(a.push("msg")["msg"]["body"], "hello again");
    })
    .await;
    assert!(metric(http_addr, "switchboard_logic_link_push_batches_total") >= 2);
    gw.stop().await;
    logic.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
