//! End-to-end test: a fake Logic gRPC server, the gateway, and blocking WebSocket clients.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard_gateway::GatewayConfig;
use switchboard_proto::internal::Delivery;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Connects and authenticates a client, then runs `f` on it in a blocking task; returns once the
/// client is authenticated (so the gateway knows its connection).
async fn authed_client<T: Send + 'static>(
    addr: SocketAddr,
    f: impl FnOnce(Ws) -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::task::spawn_blocking(move || {
        let ws = ws_connect_auth(addr);
        ready_tx.send(()).unwrap();
        f(ws)
    });
    ready_rx.await.unwrap();
    client
}

/// Reads text frames as JSON for `window`, handing each to `f` with the socket (to answer).
fn read_json_for(ws: &mut Ws, window: Duration, mut f: impl FnMut(&mut Ws, Value)) {
    let deadline = std::time::Instant::now() + window;
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while std::time::Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => f(ws, serde_json::from_str(t.as_str()).unwrap()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// The WebSocket handshake of `req` (to `addr`) is refused with HTTP `status`.
fn assert_handshake_fails(addr: SocketAddr, req: impl IntoClientRequest, status: u16) {
    let s = TcpStream::connect(addr).unwrap();
    match tungstenite::client(req, s) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => assert_eq!(r.status(), status),
        other => panic!("expected {status}, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_end_to_end() {
    let (logic, logic_url) = start_logic().await;
    let gw =
        start_gateway(GatewayConfig { shards: 2, auth_timeout: Duration::from_millis(300), ..config(&[&logic_url]) })
            .await;
    let addr = gw.ws_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(gw.advertise(), format!("http://{}", gw.push_addr()));

    // Handshake checks: wrong path -> 404, only unsupported subprotocols -> 400.
    blocking(move || {
        assert_handshake_fails(addr, format!("ws://{addr}/nope"), 404);
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.xml.v1".parse().unwrap());
        assert_handshake_fails(addr, req, 400);
        // No subprotocol offered: JSON by default.
        let (mut ws, _) = ws_open(addr, None);
        ws_send_text(&mut ws, r#"{"op":"ping","rid":4}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;

    // Main flow on one connection.
    blocking(move || {
        let mut ws = ws_connect_json(addr);
        // before auth: ping ok, other ops unauthorized, connection stays open
        ws_send_text(&mut ws, r#"{"op":"ping","rid":9}"#);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "ping.ok");
        assert_eq!(r["rid"], 9);
        ws_send_text(&mut ws, r#"{"op":"send","rid":2}"#);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "unauthorized");
        assert_eq!(r["rid"], 2);
        // auth without token -> bad_request
        ws_send_text(&mut ws, r#"{"op":"auth","rid":3}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["code"], "bad_request");
        ws_auth(&mut ws);
        // bad JSON -> bad_request, still open
        ws_send_text(&mut ws, "{not json");
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "error");
        assert_eq!(r["code"], "bad_request");
        ws_send_text(&mut ws, r#"{"rid":77}"#);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "bad_request");
        assert_eq!(r["rid"], 77);
        // binary -> bad_request, still open
        ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
        assert_eq!(ws_recv_json(&mut ws).unwrap()["code"], "bad_request");
        // second auth -> bad_request
        ws_send_text(&mut ws, r#"{"op":"auth","rid":5,"token":"good"}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["code"], "bad_request");
        // forwarded ops, strictly in order
        for rid in 10..20 {
            ws_send_text(&mut ws, &format!(r#"{{"op":"history","rid":{rid},"conv":"d:a:b"}}"#));
        }
        for rid in 10..20 {
            let r = ws_recv_json(&mut ws).unwrap();
            assert_eq!(r["op"], "history.ok");
            assert_eq!(r["rid"], rid);
        }
        ws_send_text(&mut ws, r#"{"op":"ping","rid":21}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;
    assert!(!logic.connected.lock().unwrap().is_empty());

    // Pushes via the Push RPC.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let client_thread = tokio::task::spawn_blocking(move || {
        let mut ws = ws_connect_auth(addr);
        ready_tx.send(()).unwrap();
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "msg");
        assert_eq!(r["msg"]["seq"], 1);
        ws_send_text(&mut ws, r#"{"op":"ack","rid":30,"conv":"d:alice:bob","seq":1}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["op"], "ack.ok");
        rx.recv().unwrap();
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "kick");
        ws_assert_closed(&mut ws);
    });
    ready_rx.await.unwrap();
    // Connected is fire-and-forget: wait for the second connection's event.
    let conn_id = logic.connected_conn_id(1).await;
    let mut push = Pusher::connect(&gw).await;
    let mut gone = push
        .push(vec![
            Delivery {
                targets: to(conn_id),
                frame: br#"{"op":"msg","msg":{"conv":"d:alice:bob","seq":1}}"#.to_vec().into(),
                conv: "d:alice:bob".into(),
                seq: 1,
                close: false,
            },
            Delivery {
                targets: to(conn_id ^ 1), // same slot, other generation
                frame: b"{}".to_vec().into(),
                ..Default::default()
            },
            Delivery {
                targets: to(u64::MAX), // no such shard
                frame: b"{}".to_vec().into(),
                ..Default::default()
            },
        ])
        .await;
    gone.sort();
    let mut expect = vec![conn_id ^ 1, u64::MAX];
    expect.sort();
    assert_eq!(gone, expect);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(()).unwrap();
    let gone = push
        .push(vec![Delivery {
            targets: to(conn_id),
            frame: br#"{"op":"kick","reason":"test"}"#.to_vec().into(),
            close: true,
            ..Default::default()
        }])
        .await;
    assert!(gone.is_empty());
    client_thread.await.unwrap();
    // the kicked connection is gone now
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone =
        push.push(vec![Delivery { targets: to(conn_id), frame: b"{}".to_vec().into(), ..Default::default() }]).await;
    assert_eq!(gone, vec![conn_id]);
    assert!(logic.disconnected.lock().unwrap().iter().any(|e| e.conn_id == conn_id));

    // Bad token -> error + close; oversize -> too_large + close; auth timeout.
    blocking(move || {
        let mut ws = ws_connect_json(addr);
        ws_send_text(&mut ws, r#"{"op":"auth","rid":1,"token":"bad"}"#);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "bad_token");
        assert_eq!(r["rid"], 1);
        ws_assert_closed(&mut ws);

        let mut ws = ws_connect_auth(addr);
        let big = format!(r#"{{"op":"send","rid":2,"body":"{}"}}"#, "x".repeat(70 * 1024));
        ws_send_text(&mut ws, &big);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "too_large");
        ws_assert_closed(&mut ws);

        let mut ws = ws_connect_json(addr);
        let started = std::time::Instant::now();
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "auth_timeout");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(started.elapsed() < Duration::from_secs(3));
        ws_assert_closed(&mut ws);
    })
    .await;

    let mut text = String::new();
    gw.metrics().render(&mut text);
    assert!(text.contains("switchboard_gateway_frames_in_total"));

    // Per shard: open connections (this one at least) and the event loop's time per wake-up.
    let held = blocking(move || ws_connect_auth(addr)).await;
    let mut text = String::new();
    gw.metrics().render(&mut text);
    let total = |prefix: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    assert!(total("switchboard_gateway_shard_connections{shard=") >= 1.0, "{text}");
    assert!(total("switchboard_gateway_loop_seconds_count{shard=") > 0.0, "{text}");
    drop(held);

    // Graceful drain: an open connection gets `drain` and is closed.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let drained = tokio::task::spawn_blocking(move || {
        let mut ws = ws_connect_auth(addr);
        ready_tx.send(()).unwrap();
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "drain");
        assert_eq!(r["retry_after_ms"], 1000);
        ws_assert_closed(&mut ws);
    });
    blocking(move || ready_rx.recv().unwrap()).await;
    let metrics = gw.metrics();
    gw.shutdown().await;
    drained.await.unwrap();
    assert_eq!(metrics.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_pushes_are_repushed_then_dropped_and_logic_down_is_unavailable() {
    let (logic, logic_url) = start_logic().await;
    let gw = start_gateway(GatewayConfig {
        repush_interval: Duration::from_millis(200),
        repush_attempts: 2,
        ..config(&[&logic_url])
    })
    .await;
    let client = authed_client(gw.ws_addr(), |mut ws| {
        // original + 2 re-pushes of seq 1; seq 2 is acked after its first copy
        let mut seq1 = 0;
        let mut seq2 = 0;
        read_json_for(&mut ws, Duration::from_millis(1500), |ws, v| match v["seq"].as_u64() {
            Some(1) => seq1 += 1,
            Some(2) => {
                seq2 += 1;
                ws_send_text(ws, r#"{"op":"ack","rid":8,"conv":"c2","seq":2}"#);
            }
            _ => assert_eq!(v["op"], "ack.ok", "{v}"),
        });
        assert_eq!(seq1, 3, "seq 1 sent once and re-pushed twice");
        assert_eq!(seq2, 1, "acked push is not re-sent");
        ws
    })
    .await;
    let conn_id = logic.connected_conn_id(0).await;
    let gone = Pusher::connect(&gw)
        .await
        .push(vec![
            Delivery {
                targets: to(conn_id),
                frame: br#"{"op":"msg","seq":1}"#.to_vec().into(),
                conv: "c1".into(),
                seq: 1,
                close: false,
            },
            Delivery {
                targets: to(conn_id),
                frame: br#"{"op":"msg","seq":2}"#.to_vec().into(),
                conv: "c2".into(),
                seq: 2,
                close: false,
            },
        ])
        .await;
    assert!(gone.is_empty());
    let mut ws = client.await.unwrap();
    gw.shutdown().await;
    // after shutdown the client sees drain then close
    blocking(move || {
        ws.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ws_recv_json(&mut ws).unwrap()["op"], "drain");
        ws_assert_closed(&mut ws);
    })
    .await;

    // Logic unreachable: forwarded ops get `unavailable` with retry_after_ms.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = start_gateway(config(&[&format!("http://{dead_addr}")])).await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = ws_connect_json(addr);
        ws_send_text(&mut ws, r#"{"op":"auth","rid":1,"token":"good"}"#);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["code"], "unavailable", "{r}");
        assert_eq!(r["retry_after_ms"], 1000);
        ws_send_text(&mut ws, r#"{"op":"ping","rid":2}"#);
        assert_eq!(ws_recv_json(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;
    gw.shutdown().await;
}

/// A push is re-sent once `repush_interval` has passed since it was written, not at the first
/// re-push round after it arrived: a push written just before another push's re-send is due
/// still gets its whole interval to be acked (a client that acks once a second is not sent
/// copies of what it received a moment ago).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_resent_an_interval_after_it_was_written() {
    let (logic, logic_url) = start_logic().await;
    let gw = start_gateway(GatewayConfig {
        repush_interval: Duration::from_millis(1000),
        repush_attempts: 1,
        ..config(&[&logic_url])
    })
    .await;
    let client = authed_client(gw.ws_addr(), |mut ws| {
        // When each copy of seq 1 and seq 2 arrived; nothing is acked.
        let mut copies: [Vec<std::time::Instant>; 2] = Default::default();
        read_json_for(&mut ws, Duration::from_millis(3500), |_, v| match v["seq"].as_u64() {
            Some(n @ (1 | 2)) => copies[n as usize - 1].push(std::time::Instant::now()),
            _ => panic!("unexpected frame {v}"),
        });
        copies
    })
    .await;
    let conn_id = logic.connected_conn_id(0).await;
    let mut pusher = Pusher::connect(&gw).await;
    let push = |seq: u64| Delivery {
        targets: to(conn_id),
        frame: format!(r#"{{"op":"msg","seq":{seq}}}"#).into_bytes().into(),
        conv: format!("c{seq}"),
        seq,
        close: false,
    };
    assert!(pusher.push(vec![push(1)]).await.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(pusher.push(vec![push(2)]).await.is_empty());
    let [seq1, seq2] = client.await.unwrap();
    assert_eq!(seq1.len(), 2, "seq 1 sent once and re-pushed once");
    assert_eq!(seq2.len(), 2, "seq 2 sent once and re-pushed once");
    // Before, seq 2 was re-sent with seq 1, about 400 ms after it arrived.
    let gap = seq2[1] - seq2[0];
    assert!(gap >= Duration::from_millis(800), "seq 2 re-sent {gap:?} after it arrived");
    assert!(seq2[1] > seq1[1], "each push keeps its own interval");
    gw.shutdown().await;
}

/// A connection silent for `idle_timeout` is closed; one whose frames keep arriving stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let (_logic, logic_url) = start_logic().await;
    let gw = start_gateway(GatewayConfig { idle_timeout: Duration::from_millis(1000), ..config(&[&logic_url]) }).await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut silent = ws_connect_auth(addr);
        let mut talker = ws_connect_auth(addr);
        // Half the timeout in, the silent connection is still open.
        silent.get_mut().set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        match silent.read() {
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("closed before its idle timeout: {other:?}"),
        }
        // The talker pings every 100 ms for three timeouts and is answered throughout.
        let start = std::time::Instant::now();
        let mut rid = 1;
        while start.elapsed() < Duration::from_millis(3000) {
            rid += 1;
            ws_send_text(&mut talker, &format!(r#"{{"op":"ping","rid":{rid}}}"#));
            let r = ws_recv_json(&mut talker).expect("a talking connection stays open");
            assert_eq!(r["op"], "ping.ok", "{r}");
            std::thread::sleep(Duration::from_millis(100));
        }
        silent.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ws_assert_closed(&mut silent);
    })
    .await;
    gw.shutdown().await;
}

/// Bursts of pushes to several connections (rounds that carry several pushes per connection, after
/// which the shard lets its next round linger) all arrive, once each and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_bursts_arrive_complete_and_in_order_while_rounds_linger() {
    const CONNS: usize = 3;
    const MSGS: u64 = 200;
    const PER_BATCH: u64 = 5;
    let (logic, logic_url) = start_logic().await;
    let gw = lingering_gateway(&logic_url).await;
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let client = authed_client(gw.ws_addr(), |mut ws| {
            ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            (0..MSGS).map(|_| ws_read_json(&mut ws)["seq"].as_u64().unwrap()).collect::<Vec<_>>()
        });
        clients.push(client.await);
    }
    let mut targets = Vec::new();
    for n in 0..CONNS {
        targets.extend(to(logic.connected_conn_id(n).await));
    }
    push_in_batches(&gw, &targets, MSGS, PER_BATCH).await;
    for client in clients {
        assert_eq!(client.await.unwrap(), (1..=MSGS).collect::<Vec<_>>());
    }
    gw.shutdown().await;
}

/// A gateway whose push rounds linger 50 ms and that re-pushes nothing within a test: only push
/// rounds write its pushes.
async fn lingering_gateway(logic_url: &str) -> switchboard_gateway::Gateway {
    start_gateway(GatewayConfig {
        push_linger: Duration::from_millis(50),
        repush_interval: Duration::from_secs(60),
        ..config(&[logic_url])
    })
    .await
}

/// Pushes `{"op":"msg","seq":n}` for n in 1..=`msgs` to `targets`, `per_batch` deliveries a batch.
async fn push_in_batches(
    gw: &switchboard_gateway::Gateway,
    targets: &[switchboard_proto::internal::Target],
    msgs: u64,
    per_batch: u64,
) {
    let mut pusher = Pusher::connect(gw).await;
    for first in (1..=msgs).step_by(per_batch as usize) {
        let batch = (first..first + per_batch)
            .map(|seq| Delivery {
                targets: targets.to_vec(),
                frame: format!(r#"{{"op":"msg","seq":{seq}}}"#).into_bytes().into(),
                conv: "g".into(),
                seq,
                close: false,
            })
            .collect();
        assert!(pusher.push(batch).await.is_empty());
    }
}

/// Clients that answer every push with a request while fan-out bursts keep coming: a connection
/// with pushes waiting for the push round is written by the round, its replies with them, so
/// every reply still arrives (none is held past the round) and the pushes keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_behind_pushes_waiting_for_their_round_all_arrive() {
    const CONNS: usize = 3;
    const MSGS: u64 = 300;
    const PER_BATCH: u64 = 10;
    let (logic, logic_url) = start_logic().await;
    let gw = lingering_gateway(&logic_url).await;
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let client = authed_client(gw.ws_addr(), |mut ws| {
            ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut seqs, mut answered) = (Vec::new(), Vec::new());
            while seqs.len() < MSGS as usize || answered.len() < MSGS as usize {
                let frame = ws_read_json(&mut ws);
                match frame["op"].as_str() {
                    Some("msg") => {
                        let seq = frame["seq"].as_u64().unwrap();
                        seqs.push(seq);
                        ws_send_text(&mut ws, &format!(r#"{{"op":"ping","rid":{seq}}}"#));
                    }
                    Some("ping.ok") => answered.push(frame["rid"].as_u64().unwrap()),
                    _ => panic!("unexpected frame {frame}"),
                }
            }
            (seqs, answered)
        });
        clients.push(client.await);
    }
    let mut targets = Vec::new();
    for n in 0..CONNS {
        targets.extend(to(logic.connected_conn_id(n).await));
    }
    push_in_batches(&gw, &targets, MSGS, PER_BATCH).await;
    let all: Vec<u64> = (1..=MSGS).collect();
    for client in clients {
        let (seqs, answered) = client.await.unwrap();
        assert_eq!(seqs, all, "every push, once, in order");
        assert_eq!(answered, all, "every ping answered, in order");
    }
    gw.shutdown().await;
}

/// Logic routes a connection before it answers `auth`, so a push can reach the gateway before
/// the answer: it is held and delivered right after `auth.ok`, never reported gone (which would
/// drop the route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_racing_the_auth_answer_arrives_after_auth_ok() {
    let logic = FakeLogic::default();
    *logic.push_on_connect.lock().unwrap() = Some(json!({"op": "presence", "user": "bob", "online": true}));
    let server = serve(logic).await;
    let gw = start_gateway(config(&[&server.url])).await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = ws_connect_auth(addr);
        let r = ws_recv_json(&mut ws).unwrap();
        assert_eq!(r["op"], "presence", "the push that raced the auth answer: {r}");
        assert_eq!(r["user"], "bob");
    })
    .await;
    gw.shutdown().await;
}

/// Logic's pushes come down the push stream the gateway opens beside each link (at start, before
/// any call), and their answers go back up it; a push stream that ends while its link lives is
/// opened again and carries the next pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_come_down_the_push_stream_which_opens_again() {
    let server = serve(FakeLogic::default().serve_push_streams()).await;
    let logic = server.logic.clone();
    let gw = start_gateway(config(&[&server.url])).await;
    let first = logic.take_push_stream(0).await;
    let client = authed_client(gw.ws_addr(), |mut ws| {
        let mut seen = Vec::new();
        read_json_for(&mut ws, Duration::from_secs(4), |_, v| seen.push(v["seq"].as_u64().unwrap_or(0)));
        seen
    })
    .await;
    let conn_id = logic.connected_conn_id(0).await;
    let push = |id: u64, seq: u64| switchboard_proto::internal::LinkPush {
        id,
        deliveries: vec![Delivery {
            targets: [to(conn_id), to(conn_id + 1_000)].concat(),
            frame: format!(r#"{{"op":"notice","seq":{seq}}}"#).into_bytes().into(),
            ..Default::default()
        }],
    };
    first.send(Ok(push(1, 1))).await.unwrap();
    drop(first);
    let second = logic.take_push_stream(1).await;
    second.send(Ok(push(2, 2))).await.unwrap();
    assert_eq!(client.await.unwrap(), vec![1, 2], "both pushes delivered, in order");
    let answers = logic.push_answers.lock().unwrap().clone();
    let answered: Vec<(u64, Vec<u64>)> = answers.into_iter().map(|a| (a.id, a.gone)).collect();
    assert_eq!(answered, vec![(1, vec![conn_id + 1_000]), (2, vec![conn_id + 1_000])], "unknown connection gone");
    gw.shutdown().await;
}
