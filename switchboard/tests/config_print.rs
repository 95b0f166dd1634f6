//! `switchboard config --print`: the configuration flags, `SB_*` variables and the file give,
//! secrets and URL passwords masked, the options left to their defaults named; a file with an
//! unknown key is refused with the key's name.

mod common;

use std::process::Command;

/// The binary with no `SB_*` variable of the environment the test runs in.
fn switchboard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SB_")) {
        c.env_remove(k);
    }
    c.env("RUST_BACKTRACE", "0");
    c
}

#[test]
fn config_print_merges_every_source_and_masks_secrets() {
    let dir = common::temp_dir("config-print");
    let file = dir.join("switchboard.toml");
    std::fs::write(&file, "ack_flush_ms = 20\nshards = 9\n").unwrap();
    let out = switchboard()
        .args(["--config", file.to_str().unwrap(), "config", "--print", "--shards", "3"])
        .args(["--cluster-secret", "a-cluster-secret-of-more-than-32-bytes"])
        .args(["--redis-url", "redis://:hunter2@127.0.0.1:6379", "--public-ws", "ws://a.example/ws"])
        .env("SB_MAX_FRAME_BYTES", "1000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "shards = 3\n",               // the flag wins over the file
        "ack_flush_ms = 20\n",        // from the file
        "max_frame_bytes = 1000\n",   // from the environment
        "cluster_secret = \"***\"\n", // masked
        "redis_url = \"redis://:***@127.0.0.1:6379\"\n",
        "public_ws = [\"ws://a.example/ws\"]\n",
        "# data_dir\n", // left to its default
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("hunter2") && !text.contains("a-cluster-secret"), "{text}");
    // What it prints is a configuration file the binary reads back.
    std::fs::write(&file, text.replace("\"***\"", "\"another-cluster-secret-of-32-bytes-at-least\"")).unwrap();
    let again = switchboard().args(["--config", file.to_str().unwrap(), "config"]).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));

    std::fs::write(&file, "shards = 2\nbogus_key = 1\n").unwrap();
    let bad = switchboard().args(["--config", file.to_str().unwrap(), "config", "--print"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown field `bogus_key`"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
