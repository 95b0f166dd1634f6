//! Consent: strangers cannot reach a user through a direct conversation's side channels or by
//! adding them to groups, a repeated friend request does not notify again, a block silences the
//! blocked user, and invite-only groups take members only from their owner or admins.

mod common;

use std::time::Duration;

use common::{befriend, register, with_node, Client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_push_to_a_user() {
    with_node(
        "consent",
        |_| {},
        |http_addr, ws| {
            for u in ["kay", "lee", "max"] {
                register(http_addr, u);
            }
            let mut kay = Client::login(http_addr, ws, "kay", "k1");
            let mut lee = Client::login(http_addr, ws, "lee", "l1");
            let mut max = Client::login(http_addr, ws, "max", "m1");

            // a stranger's typing is refused, a stranger's read mark is kept but not pushed
            lee.err("typing", json!({"conv": "d:kay:lee"}), "not_friends");
            lee.ok("read", json!({"conv": "d:kay:lee", "seq": 0}));
            // nor can a stranger put kay in a group
            lee.err("group.create", json!({"name": "spam", "members": ["kay"]}), "not_friends");
            assert_eq!(kay.read_within(Duration::from_millis(300)), None, "kay heard nothing from a stranger");

            // asking twice notifies once
            lee.ok("friend.request", json!({"to": "kay", "note": "hi"}));
            lee.ok("friend.request", json!({"to": "kay", "note": "hi again"}));
            let r = kay.push("friend.request");
            assert_eq!((r["from"].as_str(), r["note"].as_str()), (Some("lee"), Some("hi")));
            assert_eq!(kay.read_within(Duration::from_millis(300)), None, "the repeated request notified again");

            // friends: typing and receipts flow, and groups may include each other
            kay.ok("friend.accept", json!({"from": "lee"}));
            assert_eq!(lee.push("friend.accepted")["user"], "kay");
            lee.ok("typing", json!({"conv": "d:kay:lee"}));
            assert_eq!(kay.push("typing")["user"], "lee");
            let sent = kay.ok("send", json!({"to": "lee", "cmid": "c1", "type": "text", "body": "hello"}));
            assert_eq!(lee.push("msg")["msg"]["seq"], sent["seq"]);
            lee.ok("read", json!({"conv": "d:kay:lee", "seq": sent["seq"]}));
            assert_eq!(kay.push("read")["user"], "lee");
            let g = lee.ok("group.create", json!({"name": "pair", "members": ["kay"]}));
            assert_eq!(kay.push("group.joined")["group"], g["group"]);
            // max is still a stranger to both
            max.err("group.create", json!({"name": "x", "members": ["kay", "lee"]}), "not_friends");

            // unfriended: back to strangers
            kay.ok("friend.delete", json!({"user": "lee"}));
            lee.err("typing", json!({"conv": "d:kay:lee"}), "not_friends");
            lee.ok("read", json!({"conv": "d:kay:lee", "seq": sent["seq"]}));
            assert_eq!(kay.read_within(Duration::from_millis(300)), None);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_ends_the_friendship_and_silences_the_blocked() {
    with_node(
        "consent-block",
        |_| {},
        |http_addr, ws| {
            for u in ["ada", "ben"] {
                register(http_addr, u);
            }
            let mut ada = Client::login(http_addr, ws, "ada", "a1");
            let mut ben = Client::login(http_addr, ws, "ben", "b1");
            ben.ok("friend.request", json!({"to": "ada"}));
            ada.push("friend.request");
            ada.ok("friend.accept", json!({"from": "ben"}));
            ben.push("friend.accepted");
            ben.ok("send", json!({"to": "ada", "cmid": "before", "type": "text", "body": "hi"}));
            let m = ada.push("msg");
            ada.ok("ack", json!({"conv": "d:ada:ben", "seq": m["msg"]["seq"]}));

            ada.err("block", json!({"user": "ada"}), "bad_request");
            ada.err("block", json!({"user": "nobody"}), "no_such_user");
            ada.ok("block", json!({"user": "ben"}));
            assert_eq!(ada.ok("block.list", json!({}))["users"], json!(["ben"]));
            assert_eq!(ben.ok("block.list", json!({}))["users"], json!([]), "blocking is one-way");
            // Nobody is told; the friendship is gone on both sides.
            assert_eq!(ben.read_within(Duration::from_millis(300)), None, "ben was told of the block");
            assert_eq!(ada.ok("friend.list", json!({}))["friends"], json!([]));
            assert_eq!(ben.ok("friend.list", json!({}))["friends"], json!([]));

            // Ben reaches ada no more: no message, typing, call or group; his request looks sent
            // and is dropped.
            ben.err("send", json!({"to": "ada", "cmid": "after", "type": "text", "body": "hey"}), "not_friends");
            ben.err("typing", json!({"conv": "d:ada:ben"}), "not_friends");
            ben.err("call.offer", json!({"to": "ada", "call_id": "c1", "sdp": "v=0"}), "not_friends");
            ben.err("group.create", json!({"name": "x", "members": ["ada"]}), "not_friends");
            ben.ok("friend.request", json!({"to": "ada", "note": "please"}));
            assert_eq!(ada.read_within(Duration::from_millis(300)), None, "a blocked user reached ada");
            assert_eq!(ada.ok("friend.list", json!({}))["pending"], json!([]), "the request was stored");
            // Ada is told why her own request fails.
            ada.err("friend.request", json!({"to": "ben"}), "forbidden");

            // Lifted: requests flow again.
            ada.ok("unblock", json!({"user": "ben"}));
            assert_eq!(ada.ok("block.list", json!({}))["users"], json!([]));
            ben.ok("friend.request", json!({"to": "ada", "note": "again"}));
            assert_eq!(ada.push("friend.request")["note"], "again");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_only_groups_take_members_from_their_owner_or_admins() {
    with_node(
        "consent-invite",
        |_| {},
        |http_addr, ws| {
            for u in ["oli", "pam", "quin", "rex"] {
                register(http_addr, u);
            }
            let mut oli = Client::login(http_addr, ws, "oli", "o1");
            let mut pam = Client::login(http_addr, ws, "pam", "p1");
            let mut quin = Client::login(http_addr, ws, "quin", "q1");
            let mut rex = Client::login(http_addr, ws, "rex", "r1");
            befriend(&mut oli, &mut pam, "pam", "oli");
            befriend(&mut oli, &mut quin, "quin", "oli");
            befriend(&mut pam, &mut rex, "rex", "pam");

            // An open group: anyone joins by its id, members add their friends.
            let open = oli.ok("group.create", json!({"name": "open", "members": ["pam"]}));
            let gid = open["group"].as_str().unwrap().to_owned();
            pam.push("group.joined");
            rex.ok("group.join", json!({"group": gid}));
            oli.err("group.add", json!({"group": gid, "user": "rex"}), "not_friends");
            quin.err("group.add", json!({"group": gid, "user": "oli"}), "not_member");
            let list = pam.ok("group.list", json!({}));
            assert_eq!(list["groups"][0]["invite_only"], false);

            // Invite-only: nobody joins by the id; a plain member cannot add; the owner can.
            pam.err("group.set", json!({"group": gid, "invite_only": true}), "forbidden");
            oli.ok("group.set", json!({"group": gid, "invite_only": true}));
            assert_eq!(pam.ok("group.list", json!({}))["groups"][0]["invite_only"], true);
            quin.err("group.join", json!({"group": gid}), "forbidden");
            pam.err("group.add", json!({"group": gid, "user": "quin"}), "forbidden");
            rex.ok("group.join", json!({"group": gid}));
            oli.ok("group.add", json!({"group": gid, "user": "quin"}));
            assert_eq!(quin.push("group.joined")["group"], gid.as_str());
            let members = oli.ok("group.members", json!({"group": gid}))["members"].clone();
            let names: Vec<&str> = members.as_array().unwrap().iter().map(|m| m["user"].as_str().unwrap()).collect();
            assert_eq!(names, ["oli", "pam", "quin", "rex"]);

            // Created invite-only from the start.
            let closed = oli.ok("group.create", json!({"name": "closed", "invite_only": true}));
            rex.err("group.join", json!({"group": closed["group"]}), "forbidden");
        },
    )
    .await;
}
