//! The HTTP API's listener limits, from outside over raw TCP: a client that never finishes its
//! request head is closed (slowloris), so is an idle keep-alive connection; a request whose body
//! never arrives gets `408`; connections beyond the cap are closed at once while the others are
//! served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // Far above the server's timeouts: a read that returns is the server's doing.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until the server closes the connection; what it sent.
fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed() {
    let (node, dir) = common::start_tweaked("http-timeouts", |s| {
        s.http_header_timeout_ms = Some(300);
        s.http_request_timeout_ms = Some(600);
    })
    .await;
    let addr = node.http_addr();
    common::blocking(move || {
        // slowloris: half a request head, then nothing
        let mut s = connect(addr);
        s.write_all(b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\n").unwrap();
        let got = read_to_close(&mut s);
        assert!(!got.contains("200 OK"), "{got}");

        // nothing at all
        let mut s = connect(addr);
        read_to_close(&mut s);

        // idle after one keep-alive request: answered, then closed
        let mut s = connect(addr);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let got = read_to_close(&mut s);
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");

        // a body that never comes: 408
        let mut s = connect(addr);
        s.write_all(b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user")
            .unwrap();
        let got = read_to_close(&mut s);
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");

        // and the API still serves
        let (st, _) = common::http(addr, "GET", "/healthz", None, None);
        assert_eq!(st, 200);
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed() {
    let (node, dir) = common::start_tweaked("http-cap", |s| {
        s.http_max_connections = Some(3);
        s.http_header_timeout_ms = Some(60_000);
    })
    .await;
    let addr = node.http_addr();
    common::blocking(move || {
        let held: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
        // the fourth is accepted by the kernel, then closed without a byte
        let mut extra = connect(addr);
        assert_eq!(read_to_close(&mut extra), "");
        // a slot frees when a connection ends
        drop(held);
        let mut answered = false;
        for _ in 0..100 {
            let mut s = connect(addr);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            if read_to_close(&mut s).starts_with("HTTP/1.1 200") {
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(answered, "no request served after the held connections closed");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
