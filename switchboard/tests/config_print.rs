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

/// Runs `c`, which must succeed, and returns what it printed.
fn printed(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn config_print_merges_every_source_and_masks_secrets() {
    let dir = common::temp_dir("config-print");
    let file = dir.join("switchboard.toml");
    std::fs::write(&file, "ack_flush_ms = 20\nshards = 9\n[storage]\nbackend = \"postgres\"\nkey_prefix = \"k:\"\n")
        .unwrap();
    let text = printed(
        switchboard()
            .args(["--config", file.to_str().unwrap(), "config", "--print", "--shards", "3"])
            .args(["--cluster-secret", "a-cluster-secret-of-more-than-32-bytes"])
            .args(["--redis-url", "redis://:hunter2@127.0.0.1:6379", "--public-ws", "ws://a.example/ws"])
            .args(["--postgres-url", "postgres://sb:pw@127.0.0.1/sb", "--kafka-brokers", "127.0.0.1:9092"])
            .env("SB_KEY_PREFIX", "env:")
            .env("SB_MAX_FRAME_BYTES", "1000"),
    );
    for line in [
        "shards = 3\n",               // the flag wins over the file
        "ack_flush_ms = 20\n",        // from the file
        "max_frame_bytes = 1000\n",   // from the environment
        "cluster_secret = \"***\"\n", // masked
        "redis_url = \"redis://:***@127.0.0.1:6379\"\n",
        "public_ws = [\"ws://a.example/ws\"]\n",
        "# data_dir = \"./data\"\n",           // left to its default, which is shown
        "[storage]\nbackend = \"postgres\"\n", // a section of its own, from the file
        "key_prefix = \"env:\"\n",             // the environment wins inside a section too
        "postgres_url = \"postgres://sb:***@127.0.0.1/sb\"\n",
        "# storage.mongodb_url\n", // no default
        "# storage.embedded_checkpoint_ms = 200\n",
        "# reply_max_bytes = 1048576\n",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("hunter2") && !text.contains("a-cluster-secret"), "{text}");
    assert!(
        !text.contains("# max_frame_bytes") && !text.contains("# shards"),
        "a set option is not listed as default: {text}"
    );
    // What it prints is a configuration file the binary reads back.
    std::fs::write(&file, text.replace("\"***\"", "\"another-cluster-secret-of-32-bytes-at-least\"")).unwrap();
    printed(switchboard().args(["--config", file.to_str().unwrap(), "config"]));

    std::fs::write(&file, "shards = 2\nbogus_key = 1\n").unwrap();
    let bad = switchboard().args(["--config", file.to_str().unwrap(), "config", "--print"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown field `bogus_key`"), "{err}");
    std::fs::write(&file, "[storage]\nbogus_store_key = 1\n").unwrap();
    let bad = switchboard().args(["--config", file.to_str().unwrap(), "config"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown field `bogus_store_key`"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The store is chosen by `[storage] backend` (or by which URLs are set); a backend without the
/// engines it needs is refused by name before anything starts.
#[test]
fn the_storage_section_names_a_complete_backend() {
    let dir = common::temp_dir("config-backend");
    let file = dir.join("switchboard.toml");
    let check = |toml: &str, extra: &[&str]| {
        std::fs::write(&file, toml).unwrap();
        let out = switchboard().args(["--config", file.to_str().unwrap(), "config"]).args(extra).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let engines = "redis_url = \"redis://127.0.0.1:1\"\nkafka_brokers = \"127.0.0.1:2\"\n";
    assert!(check("", &[]).0, "embedded by default");
    let (ok, err) = check(&format!("[storage]\nbackend = \"mongodb\"\n{engines}"), &[]);
    assert!(!ok && err.contains("needs mongodb_url (--mongodb-url)"), "{err}");
    assert!(check(&format!("[storage]\nbackend = \"mongodb\"\n{engines}"), &["--mongodb-url", "mongodb://h/db"]).0);
    let (ok, err) =
        check(&format!("[storage]\n{engines}postgres_url = \"postgres://h/db\"\nmongodb_url = \"mongodb://h\"\n"), &[]);
    assert!(!ok && err.contains("name the store with `backend`"), "{err}");
    let (ok, err) = check("[storage]\nbackend = \"embedded\"\n", &["--redis-url", "redis://127.0.0.1:1"]);
    assert!(!ok && err.contains("takes no cluster engines"), "{err}");
    // A role refuses it the same way, before connecting to anything.
    let out = switchboard()
        .args(["--config", file.to_str().unwrap(), "persist"])
        .env("SB_BACKEND", "postgres")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs postgres_url"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Each role has its own options: its `--help` lists them and no other's, another role's flag
/// or file key is refused with its name, and `config --role` prints the role's view.
#[test]
fn each_role_reads_only_its_own_options() {
    let help = |role: &str| {
        let out = switchboard().args([role, "--help"]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let gateway = help("gateway");
    assert!(gateway.contains("--ws-addr") && gateway.contains("--redis-url"), "{gateway}");
    assert!(!gateway.contains("--jwt-secret") && !gateway.contains("--postgres-url"), "{gateway}");
    let logic = help("logic");
    assert!(logic.contains("--jwt-secret") && logic.contains("--mongodb-url"), "{logic}");
    assert!(!logic.contains("--shards") && !logic.contains("--persist-batch"), "{logic}");
    let persist = help("persist");
    assert!(persist.contains("--persist-batch") && !persist.contains("--ws-addr"), "{persist}");
    let all = help("all-in-one");
    assert!(all.contains("--shards") && all.contains("--jwt-secret") && !all.contains("--redis-url"), "{all}");

    // Another role's flag stops the start by name, before anything is bound.
    let out = switchboard().args(["gateway", "--jwt-secret", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--jwt-secret is not an option of the gateway role"), "{err}");

    let dir = common::temp_dir("config-roles");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, "shards = 2\n[storage]\nredis_url = \"redis://127.0.0.1:1\"\n").unwrap();
    let text =
        printed(switchboard().args(["--config", file.to_str().unwrap(), "config", "--role", "gateway", "--print"]));
    assert!(
        text.contains("shards = 2\n")
            && text.contains("redis_url = ")
            && text.contains("# ws_addr = \"127.0.0.1:8090\"\n"),
        "{text}"
    );
    assert!(!text.contains("jwt_secret") && !text.contains("postgres_url"), "{text}");
    // The same file read as logic's names the key logic does not read.
    let out = switchboard().args(["--config", file.to_str().unwrap(), "config", "--role", "logic"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`shards` is not an option of the logic role"), "{err}");
    // Another role's SB_* variable is not refused but dropped: one environment file can serve
    // every role (all-in-one ignores the cluster's engines, the gateway logic's token key).
    let text = printed(
        switchboard()
            .args(["--config", file.to_str().unwrap(), "config", "--role", "gateway", "--print"])
            .env("SB_JWT_SECRET", "a-jwt-secret-of-more-than-32-bytes-0123456789"),
    );
    assert!(!text.contains("jwt_secret"));
    std::fs::write(dir.join("all.toml"), "shards = 1\n").unwrap();
    let text = printed(
        switchboard()
            .args(["--config", dir.join("all.toml").to_str().unwrap(), "config", "--role", "all-in-one", "--print"])
            .env("SB_REDIS_URL", "redis://127.0.0.1:1")
            .env("SB_KAFKA_BROKERS", "127.0.0.1:2"),
    );
    assert!(!text.contains("redis") && text.contains("# storage.backend = \"embedded\""), "{text}");
    // A role started with it refuses it the same way.
    let out = switchboard().args(["--config", file.to_str().unwrap(), "persist"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`shards` is not an option of the persist role"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
