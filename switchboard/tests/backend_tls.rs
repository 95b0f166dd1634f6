//! A cluster whose every link to its engines is TLS: logic, a gateway and the persist worker
//! run as processes on Redis over `rediss://`, PostgreSQL with `sslmode=require` and a Kafka
//! broker reachable only through TLS (a second tansu that advertises the address of a TLS
//! relay in front of it), all verified against the test CA of scripts/services.sh. Messages
//! travel end to end and land in PostgreSQL over encrypted connections; a logic instance that
//! does not trust the CA refuses to start and says why.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::config_file;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use switchboard_storage::contract::TestEngines;
use switchboard_storage::postgres::PgStore;
use switchboard_storage::MessageStore;

/// The TLS settings of the run: (redis url, postgres url, CA file).
fn tls_env() -> Option<(TestEngines, String, String, PathBuf)> {
    let e = TestEngines::from_env("backend tls test")?;
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (get("SB_TEST_REDIS_TLS_URL"), get("SB_TEST_POSTGRES_TLS_URL"), get("SB_TEST_CA_FILE")) {
        (Some(r), Some(p), Some(ca)) => Some((e, r, p, PathBuf::from(ca))),
        _ => {
            println!(
                "SKIPPED: backend tls test (SB_TEST_*_TLS_URL / SB_TEST_CA_FILE unset; scripts/test.sh sets them)"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tansu broker of its own on `port` in a scratch directory (removed with it), advertising
/// `advertised`.
struct Broker(Child, PathBuf);

impl Broker {
    fn start(port: u16, advertised: &str) -> Broker {
        let bin = std::env::var("SB_TANSU_BIN").expect("SB_TANSU_BIN (scripts/services.sh env)");
        let dir = temp_dir("tls-broker");
        let child = Command::new(bin)
            .current_dir(&dir)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", advertised, "--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the broker listens within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Broker(child, dir)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Terminates TLS (the services' server certificate) on `listen` and relays to `to`; counts
/// the completed handshakes.
fn tls_relay(rt: &tokio::runtime::Runtime, cert_dir: &Path, listen: u16, to: SocketAddr) -> Arc<AtomicUsize> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert_dir.join("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(cert_dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", listen))).unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                counted.fetch_add(1, Ordering::Relaxed);
                let Ok(mut up) = tokio::net::TcpStream::connect(to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    handshakes
}

#[test]
fn a_cluster_talks_tls_to_redis_postgres_and_kafka() {
    let Some((plain, redis_tls, pg_tls, ca)) = tls_env() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let prefix = format!("tls{:08x}", rand::random::<u32>());
    let (broker_port, relay_port) = (free_port(), free_port());
    let _broker = Broker::start(broker_port, &format!("tcp://localhost:{relay_port}"));
    let handshakes = tls_relay(&rt, ca.parent().unwrap(), relay_port, ([127, 0, 0, 1], broker_port).into());

    let app = format!("{prefix}app");
    let e = TestEngines {
        redis: redis_tls,
        pg: format!("{pg_tls}&application_name={app}"),
        brokers: format!("localhost:{relay_port}"),
    };
    let ca_arg = ca.to_str().unwrap();
    let tls_args = ["--kafka-tls", "true", "--backend-ca-file", ca_arg];
    let logic = Proc::spawn("logic", &e, &prefix, &tls_args);
    let (http_addr, grpc) = (logic.addr("http://"), logic.addr("grpc "));
    let logic_url = format!("http://{grpc}");
    // A gateway talks to Redis only (a Kafka option is not one of its own).
    let gw_args = ["--backend-ca-file", ca_arg, "--logic-url", &logic_url];
    let gw = Proc::spawn("gateway", &e, &prefix, &gw_args);
    let _persist = Proc::spawn("persist", &e, &prefix, &tls_args);

    let (alice, bob) = (format!("{prefix}a"), format!("{prefix}b"));
    let (mut a, mut b) = friends(http_addr, gw.addr("ws://"), &alice, &bob);
    let conv = if alice < bob { format!("d:{alice}:{bob}") } else { format!("d:{bob}:{alice}") };
    for i in 0..5 {
        a.ok("send", json!({"to": bob, "cmid": format!("m{i}"), "type": "text", "body": format!("over tls {i}")}));
        let m = b.push("msg");
        assert_eq!(m["msg"]["body"], format!("over tls {i}"));
        b.ok("ack", json!({"conv": conv, "seq": m["msg"]["seq"]}));
    }

    // The persist worker read them from the broker (through the relay) into PostgreSQL.
    let pg = rt.block_on(PgStore::connect(&plain.pg, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = rt.block_on(pg.range(&conv, 0, 100)).unwrap();
        if stored.len() == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "5 messages stored within 30 s, got {}", stored.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(handshakes.load(Ordering::Relaxed) >= 2, "the producer and the worker reached the broker over TLS");

    // The server's view: every connection of the roles is encrypted.
    let (admin, conn) = rt.block_on(tokio_postgres::connect(&plain.pg, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let row = rt
        .block_on(admin.query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        ))
        .unwrap();
    let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 2, "logic's and the worker's connections are visible: {all}");
    assert_eq!(encrypted, all, "every PostgreSQL connection of the roles uses TLS");

    // Without the CA, logic refuses to start, naming the certificate problem.
    let mut refused = Proc::command("logic", &e, &format!("{prefix}x"), &["--kafka-tls", "true"]);
    // It never serves, so its configuration file is not removed for it (see `Proc::start`).
    let config = config_file(&refused);
    let mut refused = refused.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = refused.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = refused.kill();
            panic!("logic without the CA still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(config) = config {
        let _ = std::fs::remove_file(config);
    }
    let mut err = String::new();
    std::io::Read::read_to_string(refused.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "exits non-zero");
    assert!(err.to_lowercase().contains("certificate"), "says why: {err}");
}
