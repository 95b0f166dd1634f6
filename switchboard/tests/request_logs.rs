//! Requests can be followed through the logs: with `SB_LOG_FORMAT=json` and debug logging, a
//! `send` shows up as logic's `request` span (op, rid, user, gateway, connection, and the conv and
//! seq of the stored message) on its "request done" line, and as the gateway's "relayed to logic"
//! line naming the same gateway, connection and rid.

mod common;

use std::time::{Duration, Instant};

use common::{befriend, register, temp_dir, Client};
use serde_json::{json, Value};

#[test]
fn a_send_is_followed_through_json_logs() {
    let dir = temp_dir("request-logs");
    let log_path = dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let env = [("SB_LOG", "warn,switchboard_logic=debug,switchboard_gateway::bridge=debug"), ("SB_LOG_FORMAT", "json")];
    let (mut child, http, ws) = common::procs::all_in_one(&dir.join("data"), &[], &env, log.into());

    register(http, "lena");
    register(http, "marc");
    let mut lena = Client::login(http, ws, "lena", "l1");
    let mut marc = Client::login(http, ws, "marc", "m1");
    befriend(&mut lena, &mut marc, "marc", "lena");
    let sent = lena.ok("send", json!({"to": "marc", "cmid": "traced-1", "type": "text", "body": "hi"}));
    let (rid, conv, seq) = (sent["rid"].as_u64().unwrap(), sent["conv"].clone(), sent["seq"].clone());

    // Logic's line for the send and the gateway's for the same request, by gateway, conn and rid.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (request, relayed) = loop {
        let lines: Vec<Value> = std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}")))
            .collect();
        let request = lines
            .iter()
            .find(|l| {
                l["fields"]["message"] == "request done" && l["span"]["name"] == "request" && l["span"]["op"] == "send"
            })
            .cloned();
        let relayed = request.as_ref().and_then(|r| {
            lines
                .iter()
                .find(|l| {
                    l["fields"]["message"] == "relayed to logic"
                        && l["fields"]["rid"] == r["span"]["rid"]
                        && l["fields"]["conn"] == r["span"]["conn"]
                        && l["fields"]["gateway"] == r["span"]["gateway"]
                })
                .cloned()
        });
        if let (Some(request), Some(relayed)) = (request, relayed) {
            break (request, relayed);
        }
        assert!(Instant::now() < deadline, "no matching request / relay lines in the log:\n{}", lines.len());
        std::thread::sleep(Duration::from_millis(50));
    };
    let span = &request["span"];
    assert_eq!(span["rid"], rid);
    assert_eq!(span["user"], "lena");
    assert_eq!(span["conv"], conv);
    assert_eq!(span["seq"], seq);
    assert!(request["fields"]["micros"].as_u64().is_some(), "{request}");
    assert_eq!(relayed["fields"]["ok"], true, "{relayed}");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
}
