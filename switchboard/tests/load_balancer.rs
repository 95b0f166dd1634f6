//! Behind a real HAProxy (Debian's, started here on 127.0.0.1): logic on embedded storage and
//! two gateway processes, every client connecting through the proxy from its own 127.0.0.x
//! address. The gateways read the PROXY protocol v2 header HAProxy sends, so their per-address
//! connection caps count each client, not the proxy; the HTTP API reads `X-Forwarded-For`, so
//! its per-address login buckets do too; a gateway's `/readyz` turns 503 when SIGTERM starts its
//! drain, HAProxy takes it out before its clients are closed, and they reconnect through the
//! proxy to the other gateway with nothing lost.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::Proc;
use common::*;
use prost::Message as _;
use serde_json::json;
use switchboard_proto::v1::Frame;

const JWT: &str = "lb-test-jwt-secret-0123456789abcdef0123";
const LINK: &str = "lb-test-link-secret-0123456789abcdef0123";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn role(role: &str, dir: &Path, extra: &[&str]) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    c.arg(role);
    if role == "logic" {
        // (a gateway reads neither: another role's option is refused)
        c.args(["--data-dir", dir.to_str().unwrap(), "--argon2-memory-kib", "1024", "--argon2-iterations", "1"]);
    }
    c.args(extra).env("SB_JWT_SECRET", JWT).env("SB_CLUSTER_SECRET", LINK).env("SB_LOG", "warn");
    Proc::start(c, role)
}

/// HAProxy with `cfg`, until dropped.
struct Haproxy {
    child: std::process::Child,
    stats: std::path::PathBuf,
}

impl Haproxy {
    fn start(bin: &str, dir: &Path, cfg: &str) -> Haproxy {
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, cfg).unwrap();
        let check = Command::new(bin).args(["-c", "-q", "-f"]).arg(&file).status().unwrap();
        assert!(check.success(), "haproxy -c accepts the test's configuration");
        let child = Command::new(bin).args(["-db", "-f"]).arg(&file).stdout(Stdio::null()).spawn().unwrap();
        Haproxy { child, stats: dir.join("haproxy.sock") }
    }

    /// `show stat` over the admin socket: the status ("UP", "DOWN", ...) of `backend/server`.
    fn status(&self, backend: &str, server: &str) -> String {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.stats) else { return "no socket".into() };
        s.write_all(b"show stat\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > 17 && f[0] == backend && f[1] == server)
            .map_or_else(|| "missing".into(), |f| f[17].to_owned())
    }

    fn wait_status(&self, backend: &str, server: &str, want: &str, within: Duration) {
        let t0 = Instant::now();
        loop {
            let now = self.status(backend, server);
            if now.starts_with(want) {
                return;
            }
            assert!(t0.elapsed() < within, "{backend}/{server} is {now}, not {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raw TCP client frames (length-prefixed protobuf).
fn tcp_send(s: &mut TcpStream, f: &Frame) {
    let bytes = f.encode_to_vec();
    s.write_all(&(bytes.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&bytes).unwrap();
}

fn tcp_recv(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(Frame::decode(buf.as_slice()).unwrap())
}

fn from(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

/// A TCP connection to `to` from the local address `src`.
fn tcp_from(src: &str, to: SocketAddr) -> TcpStream {
    common::tcp_from(from(src), to).unwrap()
}

/// A backend of both gateways (`mode` http or tcp): the PROXY v2 header on every connection,
/// each gateway checked on its own `/readyz` every 100 ms.
fn gateways_backend(name: &str, mode: &str, servers: [(SocketAddr, SocketAddr); 2]) -> String {
    let mut out = format!(
        "backend {name}
    mode {mode}
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 100 fall 2 rise 2 send-proxy-v2
"
    );
    for (i, (addr, health)) in servers.iter().enumerate() {
        out += &format!("    server g{} {addr} check port {}\n", i + 1, health.port());
    }
    out
}

/// A login through the proxy from `src` (HTTP, with the client's own source address).
fn login_from(api: SocketAddr, src: &str, user: &str, password: &str) -> u16 {
    let mut s = tcp_from(src, api);
    let body = json!({"username": user, "password": password, "device": "d"}).to_string();
    write!(
        s,
        "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn clients_behind_haproxy_keep_their_addresses_and_survive_a_drain() {
    let Some(bin) = std::env::var("SB_HAPROXY_BIN").ok().filter(|b| Path::new(b).exists()) else {
        println!("SKIPPED: HAProxy test (SB_HAPROXY_BIN unset; scripts/test.sh installs HAProxy and sets it)");
        return;
    };
    // the example in tuning/ is valid for the HAProxy installed here
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/haproxy.cfg");
    let check = Command::new(&bin).args(["-c", "-q", "-f"]).arg(&example).status().unwrap();
    assert!(check.success(), "haproxy -c -f tuning/haproxy.cfg");
    let dir = temp_dir("haproxy");
    let trust = ["--trusted-proxies", "127.0.0.1"];
    let logic = role(
        "logic",
        &dir.join("logic"),
        &[
            &["--logic-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--auth-rate", "0.001", "--auth-burst", "4"]
                [..],
            &trust[..],
        ]
        .concat(),
    );
    let grpc = logic.addr("grpc ");
    let http = logic.addr("http://");
    let logic_url = format!("http://{grpc}");
    let gateway = |name: &str, grace: &str| {
        role(
            "gateway",
            &dir.join(name),
            &[
                &["--ws-addr", "127.0.0.1:0", "--tcp-addr", "127.0.0.1:0", "--push-addr", "127.0.0.1:0"][..],
                &["--health-addr", "127.0.0.1:0", "--logic-url", &logic_url, "--proxy-protocol", "required"],
                &["--max-connections-per-ip", "1", "--drain-grace-ms", grace, "--repush-ms", "500"],
                &trust[..],
            ]
            .concat(),
        )
    };
    let g1 = gateway("g1", "3000");
    let g2 = gateway("g2", "0");
    let (ws1, tcp1, health1) = (g1.addr("ws://"), g1.addr("tcp://"), g1.addr("health http://"));
    let (ws2, tcp2, health2) = (g2.addr("ws://"), g2.addr("tcp://"), g2.addr("health http://"));

    let (ws_front, tcp_front, api_front) = (free_port(), free_port(), free_port());
    let sock = dir.join("haproxy.sock");
    let cfg = format!(
        "global
    maxconn 2000
    stats socket {sock} level admin
defaults
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
frontend api
    mode http
    bind 127.0.0.1:{api_front}
    option forwardfor
    default_backend logic
backend logic
    mode http
    server l1 {http}
frontend ws
    mode http
    bind 127.0.0.1:{ws_front}
    default_backend gateways_ws
frontend tcp
    mode tcp
    bind 127.0.0.1:{tcp_front}
    default_backend gateways_tcp
{ws_backend}{tcp_backend}",
        sock = sock.display(),
        ws_backend = gateways_backend("gateways_ws", "http", [(ws1, health1), (ws2, health2)]),
        tcp_backend = gateways_backend("gateways_tcp", "tcp", [(tcp1, health1), (tcp2, health2)]),
    );
    let proxy = Haproxy::start(&bin, &dir, &cfg);
    for (b, s) in [("gateways_ws", "g1"), ("gateways_ws", "g2"), ("gateways_tcp", "g1"), ("gateways_tcp", "g2")] {
        proxy.wait_status(b, s, "UP", Duration::from_secs(10));
    }
    let ws = SocketAddr::from(([127, 0, 0, 1], ws_front));
    let api = SocketAddr::from(([127, 0, 0, 1], api_front));

    // HTTP: login buckets are per client behind the proxy (X-Forwarded-For from a trusted
    // proxy), and a client's own X-Forwarded-For is not believed.
    register(http, "ana");
    register(http, "ben");
    for _ in 0..4 {
        assert_eq!(login_from(api, "127.0.0.5", "ana", "wrong password"), 401);
    }
    assert_eq!(login_from(api, "127.0.0.5", "ana", "wrong password"), 429, "127.0.0.5's bucket is empty");
    assert_eq!(login_from(api, "127.0.0.6", "ana", "wrong password"), 401, "127.0.0.6 has its own bucket");

    // WebSocket: one connection per client address on each gateway. Four clients from four
    // addresses all get in (the gateways see 127.0.0.2..5, not the proxy's 127.0.0.1, which
    // would have allowed two in all).
    // tokens minted with the cluster's key: logins from here would drain 127.0.0.1's bucket
    let token = |user: &str, device: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["token", "--user", user, "--device", device, "--ttl", "600"])
            .env("SB_JWT_SECRET", JWT)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let mut clients = Vec::new();
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"].iter().enumerate() {
        let mut c = Client::connect_from(ws, from(ip)).unwrap_or_else(|e| panic!("client from {ip}: {e}"));
        let r = c.call("auth", json!({ "token": token("ben", &format!("d{i}")) }));
        assert_eq!(r["op"], "auth.ok", "{r}");
        clients.push(c);
    }
    // 127.0.0.2 holds one connection on one gateway: more get in only on the other, once
    let more: Vec<_> = (0..3).map(|_| Client::connect_from(ws, from("127.0.0.2"))).collect();
    assert_eq!(more.iter().filter(|c| c.is_ok()).count(), 1, "one more from 127.0.0.2, on the other gateway");
    drop((clients, more));

    // Straight to a gateway, past the proxy: a PROXY header from an address that is not a
    // trusted proxy is refused, and so is a trusted proxy's connection without one.
    let refused = |src: &str, first: &[u8]| {
        let mut s = tcp_from(src, ws2);
        s.write_all(first).unwrap();
        let mut buf = [0u8; 256];
        // closed without an answer (EOF, or a reset for the unread bytes)
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    };
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let spoofed = [b"PROXY TCP4 10.9.9.9 127.0.0.1 1234 80\r\n".as_slice(), upgrade].concat();
    assert!(refused("127.0.0.3", &spoofed), "a header from a client");
    assert!(refused("127.0.0.1", upgrade), "the trusted proxy without a header");
    // 127.0.0.3's connection through the proxy (dropped above) may still count against its cap
    // on this gateway until the proxy has passed the close on: served once that is through.
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused("127.0.0.3", upgrade) {
        assert!(Instant::now() < deadline, "a client without one is served");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Raw TCP through the proxy too.
    let mut tcp = tcp_from("127.0.0.7", SocketAddr::from(([127, 0, 0, 1], tcp_front)));
    let auth = Frame { op: "auth".into(), rid: Some(1), token: token("ben", "tcp"), ..Default::default() };
    tcp_send(&mut tcp, &auth);
    let ok = tcp_recv(&mut tcp).expect("auth answered through the proxy");
    assert_eq!((ok.op.as_str(), ok.user.as_str()), ("auth.ok", "ben"));

    // A drain: ana listens through the proxy while ben sends (one of them on each gateway:
    // they connect one after the other); g1 gets SIGTERM. HAProxy sees
    // g1's /readyz turn 503 and takes it out while g1 still runs (3 s of grace), then g1
    // closes its clients, which come back through the proxy to g2; ana's `sync` fills the gap.
    let mut ana = Client::connect_from(ws, from("127.0.0.8")).unwrap();
    assert_eq!(ana.call("auth", json!({ "token": token("ana", "phone") }))["op"], "auth.ok");
    let mut ben = Client::connect_from(ws, from("127.0.0.9")).unwrap();
    assert_eq!(ben.call("auth", json!({ "token": token("ben", "laptop") }))["op"], "auth.ok");
    befriend(&mut ben, &mut ana, "ana", "ben");
    let term = std::thread::spawn(move || g1.term());
    proxy.wait_status("gateways_ws", "g1", "DOWN", Duration::from_secs(2));
    proxy.wait_status("gateways_tcp", "g1", "DOWN", Duration::from_secs(2));
    assert_eq!(proxy.status("gateways_ws", "g2"), "UP");
    assert!(!term.is_finished(), "HAProxy marked g1 down during its grace, before it closed anything");
    let mut sent = Vec::new();
    let reconnects = std::cell::Cell::new(0);
    let reconnect = |c: &mut Client, ip: &str, user: &str, device: &str| {
        *c = Client::connect_from(ws, from(ip)).expect("reconnects through the proxy");
        assert_eq!(c.call("auth", json!({ "token": token(user, device) }))["op"], "auth.ok");
        reconnects.set(reconnects.get() + 1);
    };
    for i in 0..30 {
        let r = loop {
            let rid = 1000 + i;
            let frame =
                json!({"op": "send", "rid": rid, "to": "ana", "cmid": format!("lb-{i}"), "type": "text", "body": "hi"});
            ben.send_text(&frame.to_string());
            match ben.read_within(Duration::from_secs(5)) {
                Some(r) if r["op"] == "send.ok" => break r,
                _ => reconnect(&mut ben, "127.0.0.9", "ben", "laptop"),
            }
        };
        sent.push(r["seq"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    term.join().unwrap();
    // ana's socket was on g1 or on g2: either way she reads on through the proxy
    let dead = (0..3).any(|_| ana.read_within(Duration::from_millis(300)).is_some_and(|m| m["op"] == "drain"));
    if dead || ana.call("ping", json!({}))["op"] != "ping.ok" {
        reconnect(&mut ana, "127.0.0.8", "ana", "phone");
    }
    // ana and ben connected one after the other, so round robin put one of them on g1
    assert!(reconnects.get() >= 1, "a client of g1 was drained and came back");
    let r = ana.ok("sync", json!({"since": {"d:ana:ben": 0}, "limit": 100}));
    let got: Vec<u64> = r["msgs"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    for seq in &sent {
        assert!(got.contains(seq), "ana's sync holds #{seq}: {r}");
    }
    drop(proxy);
    drop(g2);
    drop(logic);
    std::fs::remove_dir_all(&dir).ok();
}
