//! First deliveries leave in seq order although sends of one conversation no longer hold its
//! lock while their writes become durable: four devices send into one conversation at once and a
//! fifth device sees every `msg` push exactly in seq order, with no gap.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_pushed_in_seq_order() {
    let dir = temp_dir("push-order");
    let s = switchboard::Settings { user_rate: Some(0.0), ip_rate: Some(0.0), ..settings(&dir) };
    let node = switchboard::AllInOne::start(&s).await.expect("node starts");
    let (http_addr, ws_addr) = (node.http_addr(), node.ws_addr());
    const PER_SENDER: usize = 60;
    let seqs = blocking(move || {
        register(http_addr, "olga");
        register(http_addr, "pete");
        let mut a = Client::login(http_addr, ws_addr, "olga", "o1");
        let mut b = Client::login(http_addr, ws_addr, "pete", "p1");
        befriend(&mut a, &mut b, "pete", "olga");
        drop((a, b));
        // the watcher: a device of pete's that only receives
        let mut watcher = Client::login(http_addr, ws_addr, "pete", "watch");
        let senders: Vec<_> =
            [("olga", "o1", "pete"), ("olga", "o2", "pete"), ("pete", "p1", "olga"), ("pete", "p2", "olga")]
                .into_iter()
                .map(|(me, dev, to)| {
                    std::thread::spawn(move || {
                        let mut c = Client::login(http_addr, ws_addr, me, dev);
                        for i in 0..PER_SENDER {
                            let r = c.call(
                                "send",
                                json!({"to": to, "cmid": format!("{dev}-{i}"), "type": "text", "body": "x"}),
                            );
                            assert_eq!(r["op"], "send.ok", "{r}");
                        }
                    })
                })
                .collect();
        for s in senders {
            s.join().unwrap();
        }
        let mut seqs = Vec::new();
        while seqs.len() < 4 * PER_SENDER {
            let f = watcher.read_within(Duration::from_secs(10)).expect("every message is pushed to the watcher");
            if f["op"] == "msg" {
                seqs.push(f["msg"]["seq"].as_u64().unwrap());
            }
        }
        seqs
    })
    .await;
    let expected: Vec<u64> = (1..=4 * PER_SENDER as u64).collect();
    assert_eq!(seqs, expected, "first deliveries in seq order, none missing");
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
