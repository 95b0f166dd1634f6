//! With `--admin-addr`, the operator endpoints (`/metrics`, `/v1/admin/*`) answer only on that
//! listener; the client-facing one answers `404` for them and serves everything else.

mod common;

use common::{http, register};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_move_to_their_own_address() {
    let (node, dir) = common::start_tweaked("admin-addr", |s| {
        s.admin_addr = Some("127.0.0.1:0".parse().unwrap());
        s.admin_token = Some("operator-token-0123456789".into());
    })
    .await;
    let public = node.http_addr();
    let admin = node.logic.admin_addr.expect("an admin listener");
    assert_ne!(public, admin);
    common::blocking(move || {
        register(public, "zed");
        let bearer = Some("operator-token-0123456789");
        assert_eq!(http(public, "GET", "/metrics", None, None).0, 404);
        let ban = json!({"username": "zed"});
        assert_eq!(http(public, "POST", "/v1/admin/ban", Some(ban.clone()), bearer).0, 404);
        assert_eq!(http(public, "GET", "/healthz", None, None).0, 200);
        assert_eq!(http(public, "GET", "/v1/gateways", None, None).0, 200);

        let (st, body) = http(admin, "GET", "/metrics", None, None);
        assert_eq!(st, 200);
        assert!(body.as_str().unwrap().contains("switchboard_http_requests_total"), "{body}");
        assert_eq!(http(admin, "POST", "/v1/admin/ban", Some(ban), bearer).0, 204);
        assert_eq!(http(admin, "GET", "/healthz", None, None).0, 200);
        assert_eq!(
            http(admin, "POST", "/v1/auth/login", Some(json!({"username": "zed", "password": "x"})), None).0,
            404
        );
        let (st, body) =
            http(public, "POST", "/v1/auth/login", Some(json!({"username": "zed", "password": "password123"})), None);
        assert_eq!((st, body["code"].as_str()), (403, Some("forbidden")), "the ban took effect: {body}");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
