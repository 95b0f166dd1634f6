//! Logic pool end to end: two fake Logic servers, one is stopped; requests keep succeeding
//! through the retry and the dead instance's breaker opens and keeps it out.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use switchboard_gateway::GatewayConfig;

/// Connects without offering a subprotocol (10 s read timeout) and authenticates.
fn connect_and_auth(addr: SocketAddr) -> Ws {
    let (mut ws, _) = ws_open(addr, None);
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws_auth(&mut ws);
    ws
}

/// Sends `n` forwarded requests one by one; every one must succeed.
fn requests(ws: &mut Ws, first_rid: u64, n: u64) {
    for rid in first_rid..first_rid + n {
        ws_send_text(ws, &format!(r#"{{"op":"history","rid":{rid},"conv":"d:a:b"}}"#));
        let r = ws_read_json(ws);
        assert_eq!(r["op"], "history.ok", "request {rid}: {r}");
        assert_eq!(r["rid"], rid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_logic_instance_costs_one_retry_then_is_skipped() {
    let a = serve(FakeLogic::default()).await;
    let b = serve(FakeLogic::default()).await;
    let gw = start_gateway(GatewayConfig {
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(60),
        ..config(&[&a.url, &b.url])
    })
    .await;
    let addr = gw.ws_addr();
    let pool = gw.logic_pool().unwrap();
    assert_eq!(pool.endpoints(), vec![a.url.clone(), b.url.clone()]);

    // Both alive: everything succeeds and both instances get traffic.
    let mut ws = blocking(move || {
        let mut ws = connect_and_auth(addr);
        requests(&mut ws, 10, 40);
        ws
    })
    .await;
    let (a_calls, b_calls) = (a.logic.calls(), b.logic.calls());
    assert!(a_calls > 0 && b_calls > 0, "a={a_calls} b={b_calls}");
    assert!(pool.stats().iter().all(|s| !s.breaker_open && s.failures == 0));

    // Stop instance A.
    let _ = a.stop.send(());
    if tokio::time::timeout(Duration::from_secs(10), a.task).await.is_err() {
        panic!("fake logic A did not stop");
    }

    // Every request still succeeds (a failed attempt on A is retried on B).
    let mut ws = blocking(move || {
        requests(&mut ws, 100, 30);
        ws
    })
    .await;
    let stats = pool.stats();
    let dead = stats.iter().find(|s| s.url == a.url).unwrap().clone();
    assert!(dead.breaker_open, "{stats:?}");
    assert!(dead.failures >= 2, "{stats:?}");

    // Breaker open: A gets no more attempts, B serves everything, new connections work.
    let b_before = b.logic.calls();
    blocking(move || {
        requests(&mut ws, 200, 30);
        let mut ws2 = connect_and_auth(addr);
        requests(&mut ws2, 300, 10);
    })
    .await;
    let stats = pool.stats();
    let after = stats.iter().find(|s| s.url == a.url).unwrap();
    assert_eq!(after.calls, dead.calls, "dead endpoint was attempted again: {stats:?}");
    assert!(b.logic.calls() >= b_before + 41);

    // `/metrics` shows A's breaker open and B's closed.
    let mut text = String::new();
    gw.metrics().render(&mut text);
    for (url, open) in [(&a.url, 1), (&b.url, 0)] {
        let line = format!("switchboard_gateway_logic_breaker_open{{endpoint=\"{url}\"}} {open}\n");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }

    // Registry update: A is gone, B's state is kept.
    let b_stats = stats.iter().find(|s| s.url == b.url).unwrap().clone();
    pool.update(vec![(b.url.clone(), 0.4)]);
    let stats = pool.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].url, b.url);
    assert_eq!(stats[0].load, 0.4);
    assert!(stats[0].calls >= b_stats.calls);

    let mut text = String::new();
    gw.metrics().render(&mut text);
    assert!(text.contains("# TYPE switchboard_gateway_cpu_load gauge"));
    // The pool's state per logic instance (only B is left after the update).
    assert!(text.contains("# TYPE switchboard_gateway_logic_breaker_open gauge"), "{text}");
    assert!(text.contains(&format!("switchboard_gateway_logic_breaker_open{{endpoint=\"{}\"}} 0\n", b.url)), "{text}");
    assert!(text.contains(&format!("switchboard_gateway_logic_load{{endpoint=\"{}\"}} 0.4", b.url)), "{text}");
    let calls = format!("switchboard_gateway_logic_calls_total{{endpoint=\"{}\"}} ", b.url);
    let line = text.lines().find(|l| l.starts_with(&calls)).expect("calls of B");
    assert!(line[calls.len()..].parse::<f64>().unwrap() >= stats[0].calls as f64, "{line}");
    let load = gw.metrics().cpu_load();
    assert!((0.0..=1.0).contains(&load), "{load}");
    gw.shutdown().await;
    let _ = b.stop.send(());
}
