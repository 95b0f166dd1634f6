//! SIGKILL of an all-in-one process under traffic: every `send.ok` a client got before the kill
//! names a message that is there after the restart, with the same seq; every conversation is
//! gapless, and the next send takes the next seq (none is handed out twice). The embedded store
//! is set to checkpoint rarely, so the acknowledged sends live in its write-ahead log when the
//! process dies.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{befriend, register, temp_dir, Client};
use serde_json::{json, Value};

/// An all-in-one process on `dir` that checkpoints rarely, with its HTTP and WebSocket addresses.
fn spawn(dir: &Path) -> (Child, SocketAddr, SocketAddr) {
    let extra = ["--user-rate", "0", "--ip-rate", "0", "--embedded-checkpoint-ms", "60000"];
    let extra = [&extra[..], &["--embedded-checkpoint-bytes", "200000"]].concat();
    common::procs::all_in_one(dir, &extra, &[], Stdio::inherit())
}

/// Sends until the connection dies, recording (conv, cmid) -> seq of every `send.ok`.
fn sender(mut c: Client, name: &str, target: Value, acked: Arc<Mutex<HashMap<(String, String), u64>>>) {
    for i in 0.. {
        let cmid = format!("{name}-{i}");
        let mut frame = target.clone();
        frame["op"] = "send".into();
        frame["rid"] = (i + 1).into();
        frame["cmid"] = cmid.clone().into();
        frame["type"] = "text".into();
        frame["body"] = "y".repeat(100 + i % 400).into();
        if c.ws.send(tungstenite::Message::text(frame.to_string())).is_err() {
            return;
        }
        loop {
            let Some(f) = c.read() else { return };
            if f["rid"] == i + 1 {
                assert_eq!(f["op"], "send.ok", "{f}");
                let conv = f["conv"].as_str().unwrap().to_owned();
                acked.lock().unwrap().insert((conv, cmid), f["seq"].as_u64().unwrap());
                break;
            }
        }
    }
}

/// Every message of `conv`, by seq, through `history` pages.
fn all_messages(c: &mut Client, conv: &str) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    let mut before: Option<u64> = None;
    loop {
        let mut req = json!({ "conv": conv });
        if let Some(b) = before {
            req["before_seq"] = b.into();
        }
        let page = c.ok("history", req);
        let msgs = page["msgs"].as_array().unwrap();
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            let seq = m["seq"].as_u64().unwrap();
            before = Some(before.map_or(seq, |b| b.min(seq)));
            assert!(out.insert(seq, m.clone()).is_none(), "seq {seq} of {conv} returned twice");
        }
    }
}

#[test]
fn sends_acknowledged_before_a_sigkill_survive_it() {
    let dir = temp_dir("aio-crash");
    let (mut child, http, ws) = spawn(&dir);
    for u in ["ann", "ben", "cid"] {
        register(http, u);
    }
    let mut ann = Client::login(http, ws, "ann", "a1");
    let mut ben = Client::login(http, ws, "ben", "b1");
    let mut cid = Client::login(http, ws, "cid", "c1");
    befriend(&mut ann, &mut ben, "ben", "ann");
    befriend(&mut ann, &mut cid, "cid", "ann");
    drop(cid);
    let g = ann.ok("group.create", json!({"name": "crash", "members": ["ben", "cid"]}));
    let (group, gconv) = (g["group"].as_str().unwrap().to_owned(), g["conv"].as_str().unwrap().to_owned());
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let senders: Vec<_> =
        [("ann", json!({"to": "ben"})), ("ben", json!({"to": "ann"})), ("cid", json!({"group": group}))]
            .into_iter()
            .map(|(user, target)| {
                let c = Client::login(http, ws, user, "sender");
                let acked = acked.clone();
                std::thread::spawn(move || sender(c, user, target, acked))
            })
            .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 1500 {
        assert!(Instant::now() < deadline, "senders too slow: {}", acked.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Several checkpoints retired log segments before the kill, so the log was writing over
    // recycled segment files (kept as `spare-<n>.wal`, reused as `appends-<n>.wal`): the
    // recovery below reads segments that still hold their earlier lives' records.
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap().file_name().to_str()?.strip_prefix("appends-")?.strip_suffix(".wal")?.parse::<u64>().ok()
        })
        .max();
    assert!(newest >= Some(4), "newest log segment at the kill: {newest:?}");
    for s in senders {
        s.join().unwrap();
    }
    drop((ann, ben));
    let acked = acked.lock().unwrap().clone();

    let (mut child, http, ws) = spawn(&dir);
    let mut ann = Client::login(http, ws, "ann", "a2");
    for conv in ["d:ann:ben", gconv.as_str()] {
        let stored = all_messages(&mut ann, conv);
        let last = stored.keys().next_back().copied().unwrap_or(0);
        assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>(), "{conv} is gapless");
        let by_cmid: HashMap<&str, u64> =
            stored.values().map(|m| (m["cmid"].as_str().unwrap(), m["seq"].as_u64().unwrap())).collect();
        assert_eq!(by_cmid.len(), stored.len(), "one message per cmid in {conv}");
        let mut checked = 0;
        for ((c, cmid), seq) in &acked {
            if c == conv {
                assert_eq!(by_cmid.get(cmid.as_str()), Some(seq), "acknowledged {cmid} kept seq {seq} in {conv}");
                checked += 1;
            }
        }
        assert!(checked > 100, "{conv}: only {checked} acknowledged sends to check");
        let next = if conv == gconv {
            ann.ok("send", json!({"group": group, "cmid": "after", "type": "text", "body": "after"}))
        } else {
            ann.ok("send", json!({"to": "ben", "cmid": "after", "type": "text", "body": "after"}))
        };
        assert_eq!(next["seq"], last + 1, "the next seq of {conv} is new");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
