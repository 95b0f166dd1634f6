//! The binary transports against the real system: a raw TCP client
//! (length-prefixed protobuf frames) and a WebSocket `sb.bin.v1` client chat
//! with each other and with a JSON client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use prost::Message as _;
use serde_json::json;
use switchboard_proto::v1::{body, Body, Frame};
use tungstenite::client::IntoClientRequest;

struct TcpClient {
    s: TcpStream,
}

impl TcpClient {
    fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { s }
    }
    fn send(&mut self, f: &Frame) {
        let bytes = f.encode_to_vec();
        self.s.write_all(&(bytes.len() as u32).to_be_bytes()).unwrap();
        self.s.write_all(&bytes).unwrap();
    }
    fn recv(&mut self) -> Frame {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        self.s.read_exact(&mut buf).unwrap();
        Frame::decode(buf.as_slice()).unwrap()
    }
    /// The next frame that is not a presence push.
    fn next(&mut self) -> Frame {
        loop {
            let f = self.recv();
            if f.op != "presence" {
                return f;
            }
        }
    }
}

fn req(op: &str, rid: u64) -> Frame {
    Frame { op: op.into(), rid: Some(rid), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_binary_websocket_clients_chat() {
    let dir = temp_dir("binary");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    let tcp = node.gateway.tcp_addr().expect("tcp listener on");
    blocking(move || {
        for u in ["lena", "marc", "nora"] {
            register(http_addr, u);
        }
        let (_, g) = http(http_addr, "GET", "/v1/gateways", None, None);
        assert_eq!(g["gateways"][0]["tcp"], tcp.to_string(), "discovery names the TCP port");

        // lena on raw TCP
        let mut lena = TcpClient::connect(tcp);
        let token = login(http_addr, "lena", "l1")["access_token"].as_str().unwrap().to_string();
        lena.send(&Frame { token, ..req("auth", 1) });
        let ok = lena.next();
        assert_eq!((ok.op.as_str(), ok.rid, ok.user.as_str()), ("auth.ok", Some(1), "lena"));

        // marc on JSON WebSocket
        let mut marc = Client::login(http_addr, ws, "marc", "m1");
        lena.send(&Frame { to: "marc".into(), note: "hi".into(), ..req("friend.request", 2) });
        assert_eq!(lena.next().op, "friend.request.ok");
        assert_eq!(marc.push("friend.request")["from"], "lena");
        marc.ok("friend.accept", json!({"from": "lena"}));
        assert_eq!(lena.next().op, "friend.accepted");

        // TCP -> JSON, with a text body
        let body = Some(Body { kind: Some(body::Kind::Text("over tcp".into())) });
        lena.send(&Frame { to: "marc".into(), cmid: "t1".into(), r#type: "text".into(), body, ..req("send", 3) });
        let ok = lena.next();
        assert_eq!((ok.op.as_str(), ok.seq, ok.conv.as_str()), ("send.ok", Some(1), "d:lena:marc"));
        let m = marc.push("msg")["msg"].clone();
        assert_eq!((m["body"].as_str(), m["from"].as_str()), (Some("over tcp"), Some("lena")));

        // JSON -> TCP, with an object body
        let img = json!({"url": "https://x/y.png", "name": "y.png", "size": 5, "mime": "image/png"});
        marc.ok("send", json!({"to": "lena", "cmid": "j1", "type": "image", "body": img}));
        let push = lena.next();
        assert_eq!(push.op, "msg");
        let msg = push.msg.expect("msg");
        assert_eq!((msg.seq, msg.from.as_str(), msg.r#type.as_str()), (2, "marc", "image"));
        match msg.body.and_then(|b| b.kind) {
            Some(body::Kind::Json(j)) => assert_eq!(serde_json::from_str::<serde_json::Value>(&j).unwrap(), img),
            other => panic!("object body arrives as JSON text: {other:?}"),
        }
        lena.send(&Frame { conv: "d:lena:marc".into(), seq: Some(2), ..req("ack", 4) });
        assert_eq!(lena.next().op, "ack.ok");

        // an edit and a reaction over TCP, and the folded history as protobuf
        let (conv, m1) = ("d:lena:marc".to_string(), ok.mid.clone());
        let text = "over tcp, edited".to_string();
        lena.send(&Frame { conv: conv.clone(), mid: m1.clone(), cmid: "e1".into(), text, ..req("edit", 40) });
        assert_eq!(lena.next().op, "edit.ok");
        let edit = marc.push("msg")["msg"].clone();
        assert_eq!(
            (edit["type"].as_str(), edit["body"].clone()),
            (Some("edit"), json!({"mid": m1, "text": "over tcp, edited"}))
        );
        marc.ok("ack", json!({"conv": conv, "seq": edit["seq"]}));
        lena.send(&Frame {
            conv: conv.clone(),
            mid: m1.clone(),
            cmid: "r1".into(),
            emoji: "👍".into(),
            ..req("react", 41)
        });
        assert_eq!(lena.next().op, "react.ok");
        let reaction = marc.push("msg")["msg"].clone();
        marc.ok("ack", json!({"conv": conv, "seq": reaction["seq"]}));
        lena.send(&Frame { conv: conv.clone(), fold: Some(true), ..req("history", 42) });
        let h = lena.next();
        assert_eq!((h.op.as_str(), h.next_before, h.folded_through), ("history.ok", Some(1), Some(4)));
        assert_eq!(h.msgs.len(), 2, "two messages, the events folded in");
        let folded = h.msgs.iter().find(|m| m.mid == m1).expect("the first message");
        assert_eq!(
            folded.body.as_ref().and_then(|b| b.kind.clone()),
            Some(body::Kind::Text("over tcp, edited".into()))
        );
        assert!(folded.edited_ts.is_some_and(|t| t >= folded.ts));
        assert_eq!((folded.reactions.get("👍"), folded.reacted.clone()), (Some(&1), vec!["👍".to_string()]));

        // a reply with a mention over TCP: the JSON side sees the quote; marc's reply to it
        // arrives over TCP with its quote; search answers with results and highlights
        let body = Some(Body { kind: Some(body::Kind::Text("re: tcp".into())) });
        let reply = Frame {
            to: "marc".into(),
            cmid: "t2".into(),
            r#type: "text".into(),
            body,
            reply_to: m1.clone(),
            mentions: vec!["marc".into()],
            ..req("send", 43)
        };
        lena.send(&reply);
        assert_eq!(lena.next().op, "send.ok");
        let r = marc.push("msg")["msg"].clone();
        assert_eq!((r["reply_to"]["mid"].as_str(), r["mentions"].clone()), (Some(m1.as_str()), json!(["marc"])));
        marc.ok("ack", json!({"conv": conv, "seq": r["seq"]}));
        marc.ok("send", json!({"to": "lena", "cmid": "j2", "type": "text", "body": "ok", "reply_to": r["mid"]}));
        let push = lena.next().msg.expect("msg");
        let quote = push.reply_to.expect("a quote");
        assert_eq!(
            (quote.from.as_str(), quote.preview.as_str(), quote.seq),
            ("lena", "re: tcp", r["seq"].as_u64().unwrap())
        );
        lena.send(&Frame { q: "TCP".into(), ..req("search", 44) });
        let found = lena.next();
        assert_eq!(found.op, "search.ok");
        assert!(found.results.len() >= 2, "{found:?}");
        let hit = found.results.iter().find(|h| h.text == "re: tcp").expect("the reply");
        assert_eq!(hit.highlights, vec![switchboard_proto::v1::Span { start: 4, end: 7 }]);

        // errors keep their codes over TCP
        lena.send(&Frame { to: "nora".into(), cmid: "x".into(), r#type: "text".into(), ..req("send", 5) });
        let e = lena.next();
        assert_eq!((e.op.as_str(), e.code.as_str(), e.rid), ("error", "bad_request", Some(5)));
        lena.send(&req("history", 6));
        assert_eq!(lena.next().code, "bad_request");

        // nora on WebSocket sb.bin.v1: history after befriending lena
        let mut request = format!("ws://{ws}/ws").into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "sb.bin.v1".parse().unwrap());
        let (mut nora, resp) = tungstenite::connect(request).unwrap();
        assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "sb.bin.v1");
        let token = login(http_addr, "nora", "n1")["access_token"].as_str().unwrap().to_string();
        let mut call = |f: Frame| -> Frame {
            nora.send(tungstenite::Message::binary(f.encode_to_vec())).unwrap();
            loop {
                match nora.read().unwrap() {
                    tungstenite::Message::Binary(b) => {
                        let f = Frame::decode(b.as_ref()).unwrap();
                        if f.rid.is_some() {
                            return f;
                        }
                    }
                    other => panic!("binary frames only: {other:?}"),
                }
            }
        };
        assert_eq!(call(Frame { token, ..req("auth", 1) }).op, "auth.ok");
        assert_eq!(call(req("ping", 2)).op, "ping.ok");
        let h = call(Frame { conv: "d:lena:marc".into(), ..req("history", 3) });
        assert_eq!((h.op.as_str(), h.code.as_str()), ("error", "forbidden"));
        let list = call(req("friend.list", 4));
        assert_eq!(list.op, "friend.list.ok");
        assert!(list.friends.is_empty());
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
