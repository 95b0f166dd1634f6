//! The real `switchboard` binary: configured by a TOML file plus flags,
//! serves the HTTP API and WebSocket, logs JSON lines to stderr when asked,
//! and exits cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

#[test]
fn all_in_one_binary_serves_and_drains() {
    let dir = temp_dir("bin");
    let config = dir.join("switchboard.toml");
    std::fs::write(
        &config,
        "http_addr = \"127.0.0.1:0\"\ntcp_addr = \"127.0.0.1:0\"\nlogic_addr = \"127.0.0.1:0\"\npush_addr = \"127.0.0.1:0\"\nargon2_memory_kib = 1024\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", config.to_str().unwrap(), "all-in-one", "--ws-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .env("SB_LOG", "info")
        .env("SB_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let logs = BufReader::new(child.stderr.take().unwrap());
    let logs = std::thread::spawn(move || logs.lines().map_while(Result::ok).collect::<Vec<String>>());
    // stdout holds the address line only: logs go to stderr
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("switchboard all-in-one: "), "{line}");
    // "switchboard all-in-one: http://127.0.0.1:P  ws://127.0.0.1:Q/ws"
    let http_addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).expect(&line);
    let ws_addr = line.split("ws://").nth(1).and_then(|s| s.split("/ws").next()).expect(&line);
    let (http_addr, ws_addr) = (http_addr.parse().unwrap(), ws_addr.parse().unwrap());

    register(http_addr, "gina");
    let mut c = Client::login(http_addr, ws_addr, "gina", "g1");
    c.ok("ping", json!({}));

    let pid = child.id() as i32;
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc_kill(pid, 15) };
    let drain = c.read();
    assert_eq!(drain.map(|d| d["op"].clone()), Some(json!("drain")), "clients are told to reconnect elsewhere");
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(dir.join("data").join("switchboard.redb").exists());
    let logs = logs.join().unwrap();
    let entries: Vec<serde_json::Value> =
        logs.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"))).collect();
    assert!(
        entries.iter().any(|e| e["level"] == "INFO" && e["fields"]["message"] == "logic serving"),
        "JSON log lines with their fields: {logs:?}"
    );
    // an unknown log format is refused at start
    let bad =
        Command::new(env!("CARGO_BIN_EXE_switchboard")).arg("--help").env("SB_LOG_FORMAT", "yaml").output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("SB_LOG_FORMAT"));
    std::fs::remove_dir_all(&dir).ok();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn token_subcommand_mints_working_tokens() {
    let dir = temp_dir("token");
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "loadtest", "--device", "bench", "--count", "3", "--ttl", "600", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let tokens: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(tokens.len(), 3);
    // --users U: the same devices for users NAME-0 .. NAME-(U-1)
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "many", "--users", "2", "--device", "d", "--count", "2", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let many: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(many.len(), 4);

    // a server on the same data dir accepts them, one device each
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = rt.block_on(switchboard::AllInOne::start(&settings(&data))).unwrap();
    let ws = node.ws_addr();
    for t in &tokens {
        let mut c = Client::connect(ws);
        let r = c.ok("auth", json!({ "token": t }));
        assert_eq!(r["user"], "loadtest");
        c.ok("ping", json!({}));
    }
    let users: Vec<String> = many
        .iter()
        .map(|t| Client::connect(ws).ok("auth", json!({ "token": t }))["user"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users, ["many-0", "many-0", "many-1", "many-1"]);
    let mut c = Client::connect(ws);
    c.err("auth", json!({"token": format!("{}x", tokens[0])}), "bad_token");
    rt.block_on(node.stop());
    std::fs::remove_dir_all(&dir).ok();
}
