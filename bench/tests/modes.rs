//! Runs `ping`, `fanout` and `messaging` for about a second each, and `sync` with small counts, against a
//! real all-in-one node started in-process (ephemeral loopback ports, temp data dir), through
//! the same code paths as the command line; and `connect` for a few seconds, in process (one
//! worker) and through the binary with two worker processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use switchboard::{AllInOne, Settings};
use switchboard_bench::{connect, fanout, messaging, ping, plot, sync};
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
struct C {
    #[command(flatten)]
    a: connect::Args,
}
#[derive(Parser)]
struct M {
    #[command(flatten)]
    a: messaging::Args,
}

#[derive(Parser)]
struct S {
    #[command(flatten)]
    a: sync::Args,
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
    assert!(r.msgs_sent > 0 && r.totals.deliveries_total > 0, "{r:?}");
    assert_eq!(r.totals.expected_deliveries, r.msgs_sent * 6, "{r:?}");
    assert_eq!((r.totals.missing_deliveries, r.totals.errors, r.totals.dropped), (0, 0, 0), "{r:?}");
    assert!(r.totals.delivery_latency.samples > 0);

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
        assert!(r.msgs_sent > 0 && r.totals.deliveries_total > 0, "{r:?}");
        assert_eq!((r.totals.missing_deliveries, r.totals.errors, r.totals.dropped), (0, 0, 0), "{r:?}");
        assert!(r.totals.delivery_latency.samples > 0 && r.totals.send_ok_latency.samples > 0);
        std::fs::write(dir.join(format!("messaging-{round}.json")), serde_json::to_vec(&r).unwrap()).unwrap();
    }
    // plot: the two reports as a sweep's PNG
    let png = dir.join("sweep.png");
    let reports = (0..2).map(|i| dir.join(format!("messaging-{i}.json")));
    plot::main(plot::Args { reports: reports.collect(), out: png.clone(), title: "modes".into() }).expect("plot");
    let png = std::fs::read(&png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let plot::Point { offered, delivered, .. } =
        plot::point(&serde_json::from_slice(&std::fs::read(dir.join("messaging-1.json")).unwrap()).unwrap()).unwrap();
    assert_eq!(offered, 80.0);
    assert!(delivered > 0.0);

    // sync: a reader in 30 groups, 4 of them changed; `sync` and `convs` replies checked by the mode.
    let who = [("sreader".to_string(), "d".to_string()), ("swriter".to_string(), "d".to_string())];
    let file = tokens(&key, &dir.join("sync.txt"), &who);
    let args = S::parse_from([
        "s",
        "--url",
        &ws,
        "--tokens",
        file.to_str().unwrap(),
        "--convs",
        "30",
        "--changed",
        "4",
        "--rounds",
        "5",
        "--convs-rounds",
        "3",
    ])
    .a;
    let r = sync::run(&args).expect("sync runs");
    assert_eq!((r.msgs_per_sync, r.sync_rtt.samples, r.convs_rtt.samples), (4, 5, 3), "{r:?}");

    rt.block_on(node.stop());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}

/// Checks a `connect` report of `n` connections: all held, none failed or dropped, pings answered.
fn check_connect(r: &connect::Report, n: u64) {
    assert_eq!((r.attempted, r.connected, r.failed), (n, n, 0), "{r:?}");
    assert_eq!((r.dropped_during_ramp, r.dropped_during_hold, r.still_open_at_end), (0, 0, n), "{r:?}");
    assert!(r.pings_sent > 0 && r.pongs > 0 && r.pongs <= r.pings_sent, "{r:?}");
    assert_eq!(r.connect_latency.samples as u64, n);
    assert!(r.failed_workers.is_empty() && r.workers_reported == r.workers, "{r:?}");
    assert!(r.achieved_connect_rate > 0.0 && r.client_rss_per_connection_bytes.is_some(), "{r:?}");
}

#[test]
fn connect_holds_every_connection() {
    let t0 = Instant::now();
    let dir = temp_dir();
    let s = settings(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let node = rt.block_on(AllInOne::start(&s)).expect("node starts");
    let ws = format!("ws://{}/ws", node.ws_addr());
    let key = TokenKey::new(s.jwt_secret().unwrap());
    // 10 devices per user; one connection per device.
    let who: Vec<_> = (0..250).map(|i| (format!("conn{}", i / 10), format!("d{}", i % 10))).collect();
    let small = tokens(&key, &dir.join("connect-50.txt"), &who[200..]);
    let file = tokens(&key, &dir.join("connect-200.txt"), &who[..200]);
    let file = file.to_str().unwrap();

    // In process, one worker: 50 connections.
    let args = C::parse_from([
        "c",
        "--url",
        &ws,
        "--tokens",
        small.to_str().unwrap(),
        "--conns",
        "50",
        "--rate",
        "500",
        "--hold",
        "2",
        "--ping-secs",
        "1",
    ])
    .a;
    let r = connect::run(&args).expect("connect runs");
    check_connect(&r, 50);

    // The binary, two worker processes: 200 connections.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(["connect", "--url", &ws, "--tokens", file, "--conns", "200", "--rate", "1000"])
        .args(["--hold", "3", "--ping-secs", "1", "--workers", "2", "--label", "test"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("runs the binary");
    assert!(out.status.success(), "{}", out.status);
    let r: connect::Report = serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
    check_connect(&r, 200);
    assert_eq!((r.workers, r.label.as_str()), (2, "test"));

    rt.block_on(node.stop());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}
