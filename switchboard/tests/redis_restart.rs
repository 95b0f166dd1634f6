//! A Redis restart (SIGKILL, no persistence) loses every route while client sockets stay open:
//! the gateway notices the new Redis run id and announces its connections again, so pushes reach
//! clients that never reconnected; while Redis is down, logic counts its driver's errors. Gateway,
//! logic and persist run as processes on the broker and PostgreSQL of scripts/services.sh and on
//! a Redis server of this test's own (the shared one is never restarted).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchboard_storage::contract::TestEngines;

/// This test's redis-server, killed when dropped (a failing assertion must not leave it behind).
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server of this test on `port`, without persistence.
fn redis_server(port: u16, dir: &std::path::Path) -> Redis {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (scripts/services.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Redis(child)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn pushes_reach_open_sockets_after_a_redis_restart() {
    let Some(shared) = TestEngines::from_env("redis restart test") else { return };
    let dir = temp_dir("redis-restart");
    let port = free_port();
    let redis = redis_server(port, &dir);
    let e = TestEngines { redis: format!("redis://127.0.0.1:{port}"), pg: shared.pg, brokers: shared.brokers };
    let prefix = format!("rr{:08x}", rand::random::<u32>());
    let logic = Proc::spawn("logic", &e, &prefix, &[]);
    let (http_addr, grpc) = (logic.addr("http://"), logic.addr("grpc "));
    let gw = Proc::spawn("gateway", &e, &prefix, &["--logic-url", &format!("http://{grpc}")]);
    let ws_addr = gw.addr("ws://");
    let _persist = Proc::spawn("persist", &e, &prefix, &[]);

    let (alice, bob) = (format!("{prefix}a"), format!("{prefix}b"));
    let (mut a, mut b) = friends(http_addr, ws_addr, &alice, &bob);
    a.ok("send", json!({"to": bob, "cmid": "before", "type": "text", "body": "before"}));
    assert_eq!(b.push("msg")["msg"]["body"], "before");

    // Redis dies: a send fails as `unavailable` (its seq comes from Redis), and logic counts the
    // driver's error on `/metrics`.
    drop(redis);
    let r = a.call("send", json!({"to": bob, "cmid": "down", "type": "text", "body": "down"}));
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(metric(http_addr, "switchboard_storage_errors_total{backend=\"redis\"}") > 0);

    // It comes back empty: every route is gone, both sockets stay open.
    let _redis = redis_server(port, &dir);

    // Within a few heartbeats the gateway has announced both connections again; until then a
    // send may fail as `unavailable` (logic lost its counters and registry too) and is retried
    // with the same cmid.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let got = loop {
        assert!(Instant::now() < deadline, "bob got no push after the Redis restart");
        n += 1;
        let r = a.call("send", json!({"to": bob, "cmid": format!("after-{n}"), "type": "text", "body": "after"}));
        if r["op"] == "send.ok" {
            // Skip other frames (presence, re-pushes of the unacked first message).
            let until = Instant::now() + Duration::from_millis(1500);
            let mut found = None;
            while let Some(f) = b.read_within(until.saturating_duration_since(Instant::now())) {
                if f["op"] == "msg" && f["msg"]["body"] == "after" {
                    found = Some(f);
                    break;
                }
            }
            if let Some(m) = found {
                break m;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(got["msg"]["body"], "after");
    std::fs::remove_dir_all(&dir).ok();
}
