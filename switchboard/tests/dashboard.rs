//! The monitoring examples in `tuning/monitoring/` name only metrics the roles export: every
//! `switchboard_*` series of the Grafana dashboard and of the alert rules is declared (`# TYPE`)
//! on a logic instance's `/metrics`, a gateway's `--health-addr` `/metrics` (split deployment,
//! so its logic pool is shown) or a persist worker's. The dashboard is valid JSON with a query
//! per panel.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::{json, Value};
use switchboard::{GatewayRole, LogicRole, Settings};
use switchboard_storage::persist::PersistStats;

/// Every `switchboard_…` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchboard_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        found.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

/// Whether `exported` declares `name`: as itself, or as the histogram it is a series of.
fn declared(exported: &str, name: &str) -> bool {
    let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s));
    exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")).any(|l| {
        let mut parts = l.split(' ');
        let (n, kind) = (parts.next(), parts.next());
        n == Some(name) || (base.is_some() && n == base && kind == Some("histogram"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_examples_name_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/monitoring");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| e.contains("switchboard_"))), "{p}");
    }
    let alerts = std::fs::read_to_string(root.join("alerts.yml")).unwrap();
    let wanted: BTreeSet<String> = names(&dashboard).into_iter().chain(names(&alerts)).collect();
    assert!(wanted.len() >= 15, "{wanted:?}");

    // A logic instance and a gateway as separate roles, one request through them.
    let dir = temp_dir("dashboard");
    let secret = "dashboard-test-secret-0123456789abcdef";
    let s = Settings { cluster_secret: Some(secret.into()), ..settings(&dir) };
    let logic = LogicRole::start(&s, Vec::new(), Vec::new()).await.expect("logic starts");
    let gw_settings = Settings {
        logic_url: Some(format!("http://{}", logic.grpc_addr)),
        health_addr: Some(free_addr()),
        ..s.clone()
    };
    let gw = GatewayRole::start(&gw_settings).await.expect("gateway starts");
    let (http_addr, ws, health) = (logic.http_addr, gw.gateway.ws_addr(), gw.health_addr().unwrap());
    let exported = blocking(move || {
        register(http_addr, "mona");
        let mut c = Client::login(http_addr, ws, "mona", "m1");
        assert_eq!(c.ok("friend.list", json!({}))["op"], "friend.list.ok");
        let mut text = String::new();
        for addr in [http_addr, health] {
            let (st, m) = http(addr, "GET", "/metrics", None, None);
            assert_eq!(st, 200);
            text.push_str(m.as_str().unwrap());
        }
        text
    })
    .await;
    let mut exported = exported;
    PersistStats::default().render(&mut exported);
    // What a cluster logic instance and the persist worker add (their engines are not running
    // here; switchboard/tests/cluster.rs and persist_crash.rs read these from the processes).
    switchboard_storage::metrics::render(switchboard_storage::metrics::Shown::Producer, &mut exported);
    switchboard_storage::metrics::render(switchboard_storage::metrics::Shown::Persist, &mut exported);
    switchboard_storage::metrics::render(switchboard_storage::metrics::Shown::Embedded, &mut exported);

    let missing: Vec<&String> = wanted.iter().filter(|n| !declared(&exported, n)).collect();
    assert!(missing.is_empty(), "named by tuning/monitoring but not exported: {missing:?}\n{exported}");
    gw.stop().await;
    logic.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
