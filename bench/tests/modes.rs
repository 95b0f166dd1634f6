//! Runs `ping`, `fanout` and `messaging` for about a second each, with small counts, against a
//! real all-in-one node started in-process (ephemeral loopback ports, temp data dir), through
//! the same code paths as the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use switchboard::{AllInOne, Settings};
use switchboard_bench::{fanout, messaging, ping};
use switchboard_logic::auth::{mint, TokenKey};

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let d = std::env::temp_dir().join(format!("sb-bench-test-{}-{nanos:08x}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn settings(dir: &Path) -> Settings {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Settings {
        data_dir: Some(dir.to_path_buf()),
        http_addr: Some(any),
        ws_addr: Some(any),
        tcp_addr: Some("off".into()),
        logic_addr: Some(any),
        push_addr: Some(any),
        shards: Some(1),
        argon2_memory_kib: Some(1024),
        argon2_iterations: Some(1),
        auth_rate: Some(0.0),
        user_rate: Some(0.0),
        ip_rate: Some(0.0),
        ..Default::default()
    }
}

/// Writes tokens for `(user, device)` pairs to `path`.
fn tokens(key: &TokenKey, path: &Path, who: &[(String, String)]) -> PathBuf {
    let text: String = who.iter().map(|(u, d)| mint(key, u, d, 600) + "\n").collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[derive(Parser)]
struct P {
    #[command(flatten)]
    a: ping::Args,
}
#[derive(Parser)]
struct F {
    #[command(flatten)]
    a: fanout::Args,
}
#[derive(Parser)]
struct M {
    #[command(flatten)]
    a: messaging::Args,
}

#[test]
fn ping_fanout_and_messaging_deliver_everything() {
    let t0 = Instant::now();
    let dir = temp_dir();
    let s = settings(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let node = rt.block_on(AllInOne::start(&s)).expect("node starts");
    let ws = format!("ws://{}/ws", node.ws_addr());
    let http = format!("http://{}", node.http_addr());
    let key = TokenKey::new(s.jwt_secret().unwrap());

    // ping: 4 connections x 4 in flight.
    let who: Vec<_> = (0..4).map(|i| ("pinger".to_string(), format!("d{i}"))).collect();
    let file = tokens(&key, &dir.join("ping.txt"), &who);
    let args = P::parse_from([
        "p",
        "--url",
        &ws,
        "--tokens",
        file.to_str().unwrap(),
        "--conns",
        "4",
        "--inflight",
        "4",
        "--secs",
        "1",
        "--warmup-secs",
        "0",
    ])
    .a;
    let r = ping::run(&args).expect("ping runs");
    assert!(r.round_trips > 0, "{r:?}");
    assert_eq!((r.errors, r.dropped), (0, 0), "{r:?}");
    assert!(r.rtt.p50_ms > 0.0);

    // fanout: a sender + 3 users x 2 devices.
    let mut who = vec![("fsender".to_string(), "d".to_string())];
    who.extend((0..6).map(|i| (format!("fmember{}", i / 2), format!("d{}", i % 2))));
    let file = tokens(&key, &dir.join("fanout.txt"), &who);
    let args = F::parse_from([
        "f",
        "--url",
        &ws,
        "--tokens",
        file.to_str().unwrap(),
        "--members",
        "6",
        "--rate",
        "40",
        "--secs",
        "1",
        "--warmup-secs",
        "0",
        "--drain-secs",
        "5",
    ])
    .a;
    let r = fanout::run(&args).expect("fanout runs");
    assert_eq!((r.member_connections, r.member_users), (6, 3));
    assert!(r.msgs_sent > 0 && r.deliveries_total > 0, "{r:?}");
    assert_eq!(r.expected_deliveries, r.msgs_sent * 6, "{r:?}");
    assert_eq!((r.missing_deliveries, r.errors, r.dropped), (0, 0, 0), "{r:?}");
    assert!(r.delivery_latency.samples > 0);

    // messaging: 2 pairs of friends (registered over HTTP by the bench), twice, the second time
    // reusing the friendships.
    let who: Vec<_> = (0..4).map(|i| (format!("muser{i}"), "d".to_string())).collect();
    let file = tokens(&key, &dir.join("messaging.txt"), &who);
    for round in 0..2 {
        let args = M::parse_from([
            "m",
            "--url",
            &ws,
            "--http-url",
            &http,
            "--tokens",
            file.to_str().unwrap(),
            "--conns",
            "4",
            "--rate",
            "20",
            "--secs",
            "1",
            "--warmup-secs",
            "0",
            "--drain-secs",
            "5",
        ])
        .a;
        let r = messaging::run(&args).expect("messaging runs");
        assert_eq!(r.friendships_created_now, if round == 0 { 2 } else { 0 });
        assert!(r.msgs_sent > 0 && r.deliveries_total > 0, "{r:?}");
        assert_eq!((r.missing_deliveries, r.errors, r.dropped), (0, 0, 0), "{r:?}");
        assert!(r.delivery_latency.samples > 0 && r.send_ok_latency.samples > 0);
    }

    rt.block_on(node.stop());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}
