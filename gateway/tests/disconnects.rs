//! Closed connections reach logic, every one of them (handed over in batches), and a gateway
//! that stops returns only once logic heard about every connection its drain closed.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

const N: usize = 200;

fn conn_ids(events: &std::sync::Mutex<Vec<switchboard_proto::internal::ConnEvent>>) -> BTreeSet<u64> {
    events.lock().unwrap().iter().map(|e| e.conn_id).collect()
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_closed_connection_reaches_logic_before_the_gateway_stops() {
    let server = serve(FakeLogic::default()).await;
    let logic = server.logic.clone();
    let gw = start_gateway(config(&[&server.url])).await;
    let addr = gw.ws_addr();
    let mut conns = blocking(move || {
        (0..N)
            .map(|_| {
                let (mut ws, _) = ws_open(addr, None);
                ws_auth(&mut ws);
                ws
            })
            .collect::<Vec<Ws>>()
    })
    .await;
    wait_until("every connection registered", || logic.connected.lock().unwrap().len() == N).await;
    let connected = conn_ids(&logic.connected);
    assert_eq!(connected.len(), N, "connection ids are distinct");

    // Half close at once, from the client side.
    let leaving: Vec<Ws> = conns.drain(..N / 2).collect();
    blocking(move || {
        for mut ws in leaving {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    })
    .await;
    wait_until("logic heard of the closed half", || logic.disconnected.lock().unwrap().len() == N / 2).await;

    // The rest are closed by the gateway's drain: `shutdown` returns after logic heard of them,
    // even when logic takes its time.
    *logic.disconnect_delay.lock().unwrap() = Duration::from_secs(3);
    gw.shutdown().await;
    let told = logic.disconnected.lock().unwrap().len();
    assert_eq!(told, N, "told before shutdown returned");
    assert_eq!(conn_ids(&logic.disconnected), connected, "each connection exactly once");
    drop(conns);
    let _ = server.stop.send(());
}
