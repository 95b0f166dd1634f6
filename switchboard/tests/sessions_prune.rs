//! Sessions whose refresh token expired are deleted with their token hashes: after the pruner
//! ran, the old refresh token is unknown (not merely expired) and the store does not keep it.

mod common;

use std::time::{Duration, Instant};

use common::{http, login, register, temp_dir};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_pruned() {
    let dir = temp_dir("prune");
    let mut s = common::settings(&dir);
    s.refresh_ttl_secs = Some(1);
    s.session_prune_secs = Some(1);
    let node = switchboard::AllInOne::start(&s).await.expect("node starts");
    let addr = node.http_addr();
    common::blocking(move || {
        register(addr, "pru");
        let refresh = login(addr, "pru", "p1")["refresh_token"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let (st, body) = http(addr, "POST", "/v1/auth/refresh", Some(json!({"refresh_token": refresh})), None);
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            if seen.last() != Some(&message) {
                seen.push(message.clone());
            }
            if message == "unknown refresh token" {
                assert_eq!((st, body["code"].as_str()), (401, Some("bad_token")));
                break;
            }
            assert!(Instant::now() < deadline, "never pruned; answers were {seen:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // a fresh login still works
        assert!(login(addr, "pru", "p2")["refresh_token"].is_string());
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
