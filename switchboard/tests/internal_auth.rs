//! Internal links are authenticated: a gateway and a logic instance started as separate roles
//! (real gRPC between them) serve clients when they share the cluster secret; a call to either
//! gRPC service without it, or with another one, is refused; a cluster role without its secrets
//! does not start.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;
use switchboard::{GatewayRole, LogicRole, Settings};
use switchboard_proto::cluster_auth;
use switchboard_proto::internal::gateway_client::GatewayClient;
use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::logic_client::LogicClient;
use switchboard_proto::internal::{AuthRequest, Delivery, LinkCall, LinkUp, PushRequest, Target};
use tonic::Code;

const SECRET: &str = "internal-link-secret-0123456789abcdef";

fn split_settings(dir: &std::path::Path) -> Settings {
    Settings { cluster_secret: Some(SECRET.into()), ..settings(dir) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_calls_need_the_cluster_secret() {
    let dir = temp_dir("internal-auth");
    let s = split_settings(&dir);
    let logic = LogicRole::start(&s, Vec::new(), Vec::new()).await.expect("logic starts");
    let logic_url = format!("http://{}", logic.grpc_addr);
    let gw = GatewayRole::start(&Settings { logic_url: Some(logic_url.clone()), ..s.clone() }).await.unwrap();
    let (http_addr, ws_addr) = (logic.http_addr, gw.gateway.ws_addr());

    // The authenticated link carries a real client session end to end.
    blocking(move || {
        register(http_addr, "ivy");
        let mut c = Client::login(http_addr, ws_addr, "ivy", "i1");
        c.ok("ping", json!({}));
        assert_eq!(c.ok("friend.list", json!({}))["op"], "friend.list.ok");
    })
    .await;

    // Logic refuses calls without the secret, or with another one.
    let mut client = LogicClient::connect(logic_url.clone()).await.unwrap();
    let bare = client.authenticate(AuthRequest { token: "x".into() }).await.unwrap_err();
    assert_eq!(bare.code(), Code::Unauthenticated);
    let wrong = cluster_auth::value("another-secret-of-enough-length-0123456789").unwrap();
    let req = cluster_auth::attach(tonic::Request::new(AuthRequest { token: "x".into() }), Some(&wrong));
    assert_eq!(client.authenticate(req).await.unwrap_err().code(), Code::Unauthenticated);
    let right = cluster_auth::value(SECRET).unwrap();
    let req = cluster_auth::attach(tonic::Request::new(AuthRequest { token: "x".into() }), Some(&right));
    assert!(!client.authenticate(req).await.unwrap().into_inner().ok, "answered (bad token), not refused");
    // The same for the long-lived link the gateways use.
    let call = || LinkUp {
        calls: vec![LinkCall { id: 7, call: Some(Call::Authenticate(AuthRequest { token: "x".into() })) }],
    };
    let link = |up: LinkUp| tokio_stream::iter(vec![up]);
    let bare = client.link(link(call())).await.unwrap_err();
    assert_eq!(bare.code(), Code::Unauthenticated);
    let req = cluster_auth::attach(tonic::Request::new(link(call())), Some(&wrong));
    assert_eq!(client.link(req).await.unwrap_err().code(), Code::Unauthenticated);
    let req = cluster_auth::attach(tonic::Request::new(link(call())), Some(&right));
    let mut down = client.link(req).await.unwrap().into_inner();
    let result = down.message().await.unwrap().unwrap().results.remove(0);
    assert_eq!(result.id, 7);
    assert!(matches!(result.result, Some(Outcome::Auth(a)) if !a.ok), "answered (bad token), not refused");

    // The gateway's push service refuses pushes without the secret: no frame injection.
    let mut push = GatewayClient::connect(gw.gateway.advertise().to_owned()).await.unwrap();
    let d = Delivery {
        targets: vec![Target { conn_id: 1, user: "ivy".into() }],
        frame: bytes::Bytes::from_static(br#"{"op":"kick"}"#),
        ..Default::default()
    };
    let refused = push.push(PushRequest { deliveries: vec![d.clone()] }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let req = cluster_auth::attach(tonic::Request::new(PushRequest { deliveries: vec![d] }), Some(&right));
    assert_eq!(push.push(req).await.unwrap().into_inner().gone, vec![1], "accepted with the secret");

    // A gateway holding another secret cannot use logic: its clients get `unavailable`.
    let other = Settings {
        logic_url: Some(logic_url),
        cluster_secret: Some("another-secret-of-enough-length-0123456789".into()),
        ..settings(&dir)
    };
    let gw2 = GatewayRole::start(&other).await.unwrap();
    let ws2 = gw2.gateway.ws_addr();
    blocking(move || {
        let token = login(http_addr, "ivy", "i2")["access_token"].as_str().unwrap().to_owned();
        let mut c = Client::connect(ws2);
        c.err("auth", json!({"token": token}), "unavailable");
    })
    .await;
    gw2.stop().await;
    gw.stop().await;
    logic.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cluster_roles_refuse_to_start_without_secrets() {
    let logic = [
        "--redis-url",
        "redis://127.0.0.1:1",
        "--postgres-url",
        "postgres://127.0.0.1:1/x",
        "--kafka-brokers",
        "127.0.0.1:1",
    ];
    for (role, engines) in [("logic", &logic[..]), ("gateway", &logic[..2])] {
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg(role)
            .args(engines)
            .env("SB_LOG", "warn")
            .output()
            .expect("binary runs");
        assert!(!out.status.success(), "{role} started without secrets");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--cluster-secret"), "{role}: {err}");
    }
}
