//! A gateway whose registry entry lapses (a starved heartbeat) while its clients stay connected:
//! logic drops the routes of its connections as those of a dead gateway, and the gateway, seeing
//! at its next beat that its entry was gone, announces them again, so pushes reach its clients
//! without a reconnect. Gateway and logic run as processes on the engines of scripts/services.sh.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchboard_storage::contract::TestEngines;

/// Deletes `key` on the Redis server at `url` (redis://host:port/), speaking RESP directly.
fn redis_del(url: &str, key: &str) {
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "*2\r\n$3\r\nDEL\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut reply = [0u8; 16];
    let n = std::io::Read::read(&mut s, &mut reply).unwrap();
    assert!(reply[..n].starts_with(b":"), "DEL answered {:?}", String::from_utf8_lossy(&reply[..n]));
}

#[test]
fn a_lapsed_gateway_announces_its_connections_again() {
    let Some(e) = TestEngines::from_env("registry lapse test") else { return };
    let prefix = format!("rl{:08x}", rand::random::<u32>());
    let logic = Proc::spawn("logic", &e, &prefix, &[]);
    let (http_addr, grpc) = (logic.addr("http://"), logic.addr("grpc "));
    let node = format!("{prefix}-gw");
    let gw = Proc::spawn("gateway", &e, &prefix, &["--logic-url", &format!("http://{grpc}"), "--node-id", &node]);
    let ws_addr = gw.addr("ws://");

    let (alice, bob) = (format!("{prefix}a"), format!("{prefix}b"));
    let (mut a, mut b) = friends(http_addr, ws_addr, &alice, &bob);
    let conv = if alice < bob { format!("d:{alice}:{bob}") } else { format!("d:{bob}:{alice}") };

    // The entry vanishes as if its TTL ran out, and a send right then finds bob's gateway dead:
    // logic drops bob's route (that message is left to `sync`).
    redis_del(&e.redis, &format!("{prefix}:gateway:{node}"));
    a.ok("send", json!({"to": bob, "cmid": "lapsed", "type": "text", "body": "lapsed"}));

    // Within a few beats bob's connection is announced again: a later send reaches his socket.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    loop {
        i += 1;
        let cmid = format!("after{i}");
        a.ok("send", json!({"to": bob, "cmid": cmid, "type": "text", "body": cmid}));
        let mut got = false;
        while let Some(f) = b.read_within(Duration::from_millis(400)) {
            if f["op"] == "msg" {
                b.ok("ack", json!({"conv": conv, "seq": f["msg"]["seq"]}));
                if f["msg"]["cmid"] == cmid.as_str() {
                    got = true;
                }
            }
        }
        if got {
            break;
        }
        assert!(Instant::now() < deadline, "pushes never reached bob's open socket again");
    }
    drop((gw, logic));
}
