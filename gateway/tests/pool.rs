//! Logic pool end to end: two fake Logic servers, one is stopped; requests keep succeeding
//! through the retry and the dead instance's breaker opens and keeps it out.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::{
    logic_server::{Logic, LogicServer},
    AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Empty,
};
use tonic::{Request, Response, Status};
use tungstenite::{Message, WebSocket};

#[derive(Default, Clone)]
struct CountingLogic {
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Logic for CountingLogic {
    async fn authenticate(&self, _: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(AuthReply {
            ok: true,
            user: "alice".into(),
            session: "s1".into(),
            device: "d1".into(),
            ..Default::default()
        }))
    }

    async fn connected(&self, _: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, _: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, r: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let v: Value = serde_json::from_slice(&r.into_inner().frame).map_err(|e| Status::internal(e.to_string()))?;
        let reply = serde_json::json!({"op": format!("{}.ok", v["op"].as_str().unwrap_or("?")), "rid": v["rid"]});
        Ok(Response::new(ClientReply { frame: reply.to_string().into_bytes(), close: false }))
    }
}

struct FakeServer {
    logic: CountingLogic,
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_fake() -> FakeServer {
    let logic = CountingLogic::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let svc = LogicServer::new(logic.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
    });
    FakeServer { logic, url: format!("http://{addr}"), stop, task }
}

type Ws = WebSocket<TcpStream>;

fn connect_and_auth(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).unwrap();
    ws.send(Message::text(r#"{"op":"auth","rid":1,"token":"good"}"#)).unwrap();
    let r = read(&mut ws);
    assert_eq!(r["op"], "auth.ok", "{r}");
    ws
}

fn read(ws: &mut Ws) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            _ => continue,
        }
    }
}

/// Sends `n` forwarded requests one by one; every one must succeed.
fn requests(ws: &mut Ws, first_rid: u64, n: u64) {
    for rid in first_rid..first_rid + n {
        ws.send(Message::text(format!(r#"{{"op":"history","rid":{rid},"conv":"d:a:b"}}"#))).unwrap();
        let r = read(ws);
        assert_eq!(r["op"], "history.ok", "request {rid}: {r}");
        assert_eq!(r["rid"], rid);
    }
}

async fn blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(f: F) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_logic_instance_costs_one_retry_then_is_skipped() {
    let a = start_fake().await;
    let b = start_fake().await;
    let gw = Gateway::start(GatewayConfig {
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        tcp_addr: None,
        push_addr: "127.0.0.1:0".parse().unwrap(),
        logic_endpoints: vec![a.url.clone(), b.url.clone()],
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(60),
        shards: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = gw.ws_addr();
    let pool = gw.logic_pool();
    assert_eq!(pool.endpoints(), vec![a.url.clone(), b.url.clone()]);

    // Both alive: everything succeeds and both instances get traffic.
    let mut ws = blocking(move || {
        let mut ws = connect_and_auth(addr);
        requests(&mut ws, 10, 40);
        ws
    })
    .await;
    let (a_calls, b_calls) = (a.logic.calls.load(Ordering::SeqCst), b.logic.calls.load(Ordering::SeqCst));
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
    let b_before = b.logic.calls.load(Ordering::SeqCst);
    blocking(move || {
        requests(&mut ws, 200, 30);
        let mut ws2 = connect_and_auth(addr);
        requests(&mut ws2, 300, 10);
    })
    .await;
    let stats = pool.stats();
    let after = stats.iter().find(|s| s.url == a.url).unwrap();
    assert_eq!(after.calls, dead.calls, "dead endpoint was attempted again: {stats:?}");
    assert!(b.logic.calls.load(Ordering::SeqCst) >= b_before + 41);

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
    let load = gw.metrics().cpu_load();
    assert!((0.0..=1.0).contains(&load), "{load}");
    gw.shutdown().await;
    let _ = b.stop.send(());
}
