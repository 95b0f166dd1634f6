//! Mutual TLS on the internal links: logic and a gateway as processes with the node certificate
//! and the cluster CA of scripts/services.sh (`--cluster-tls-*`) serve a chat end to end
//! (requests gateway → logic and pushes logic → gateway both over TLS, each side verifying the
//! other's certificate); a gateway without the certificates cannot reach that logic, so its
//! clients' `auth` answers `unavailable`.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::json;
use switchboard_storage::contract::TestEngines;

#[test]
fn gateway_and_logic_talk_mutual_tls() {
    let Some(e) = TestEngines::from_env("internal mutual TLS test") else { return };
    let Some(ca) = std::env::var("SB_TEST_CA_FILE").ok().filter(|v| !v.is_empty()).map(PathBuf::from) else {
        println!("SKIPPED: internal mutual TLS test (SB_TEST_CA_FILE unset; scripts/test.sh sets it)");
        return;
    };
    let dir = ca.parent().unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let tls = [
        "--cluster-tls-cert",
        cert.to_str().unwrap(),
        "--cluster-tls-key",
        key.to_str().unwrap(),
        "--cluster-tls-ca",
        ca.to_str().unwrap(),
    ];
    let prefix = format!("mt{:08x}", rand::random::<u32>());
    let logic = Proc::spawn("logic", &e, &prefix, &tls);
    let (http_addr, grpc) = (logic.addr("http://"), logic.addr("grpc "));
    let logic_url = format!("https://{grpc}");
    let mut gw_args = tls.to_vec();
    gw_args.extend(["--logic-url", &logic_url]);
    let gw = Proc::spawn("gateway", &e, &prefix, &gw_args);

    let (alice, bob) = (format!("{prefix}a"), format!("{prefix}b"));
    let (mut a, mut b) = friends(http_addr, gw.addr("ws://"), &alice, &bob);
    a.ok("send", json!({"to": bob, "cmid": "m1", "type": "text", "body": "over mutual tls"}));
    assert_eq!(b.push("msg")["msg"]["body"], "over mutual tls");

    // Without the certificates a gateway cannot talk to this logic instance.
    let plain = Proc::spawn("gateway", &e, &format!("{prefix}p"), &["--logic-url", &format!("http://{grpc}")]);
    let token = login(http_addr, &alice, "a2")["access_token"].as_str().unwrap().to_owned();
    let mut c = Client::connect(plain.addr("ws://"));
    c.err("auth", json!({ "token": token }), "unavailable");
}
