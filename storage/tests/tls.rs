//! TLS to Redis (`rediss://`) and PostgreSQL (`sslmode=require`) against the
//! real servers of scripts/services.sh, which serve TLS with a certificate of
//! a throwaway CA: a connection trusting that CA works (and PostgreSQL reports
//! it encrypted), one that does not trust it is refused. Without the
//! SB_TEST_*_TLS_URL variables every test prints a SKIPPED line and passes.

use std::path::PathBuf;

use switchboard_storage::contract::prefix;
use switchboard_storage::postgres::PgStore;
use switchboard_storage::redis::RedisStore;
use switchboard_storage::tls::BackendTls;
use switchboard_storage::{AccountStore, Member, Registry, User};

fn tls_env(test: &str, url_var: &str) -> Option<(String, PathBuf)> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (get(url_var), get("SB_TEST_CA_FILE")) {
        (Some(url), Some(ca)) => Some((url, PathBuf::from(ca))),
        _ => {
            println!("SKIPPED: {test} ({url_var} / SB_TEST_CA_FILE unset; scripts/test.sh sets them)");
            None
        }
    }
}

#[tokio::test]
async fn redis_over_tls_trusting_the_ca() {
    let Some((url, ca)) = tls_env("redis tls", "SB_TEST_REDIS_TLS_URL") else { return };
    let tls = BackendTls::with_ca_file(&ca).unwrap();
    let store = RedisStore::connect_tls(&url, &format!("tls{}:", prefix()), &tls).await.unwrap();
    let me = Member {
        id: "tls-node".into(),
        rpc: "http://127.0.0.1:1".into(),
        ws: String::new(),
        tcp: String::new(),
        load: 0.0,
        connections: 0,
    };
    assert!(store.register("logic", &me, 30).await.unwrap(), "a first registration");
    assert_eq!(store.members("logic").await.unwrap().iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["tls-node"]);

    // The same server, not trusting its CA: refused.
    let err = match RedisStore::connect(&url, "tls-untrusted:").await {
        Ok(s) => s.members("logic").await.expect_err("an untrusted server is refused"),
        Err(e) => e,
    };
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_trusting_the_ca() {
    let Some((url, ca)) = tls_env("postgres tls", "SB_TEST_POSTGRES_TLS_URL") else { return };
    let app = format!("sbtls{}", prefix());
    let named = format!("{url}&application_name={app}");
    let tls = BackendTls::with_ca_file(&ca).unwrap();
    let store = PgStore::connect_tls(&named, 2, &tls).await.unwrap();
    let user = User {
        username: format!("u{}", prefix()),
        nickname: "tls".into(),
        password_hash: "x".into(),
        created_ms: 1,
        banned: false,
    };
    assert!(store.create_user(&user).await.unwrap());
    assert_eq!(store.get_user(&user.username).await.unwrap().unwrap().username, user.username);

    // The server's view: every connection of the store is encrypted.
    let plain = std::env::var("SB_TEST_POSTGRES_URL").unwrap();
    let (admin, conn) = tokio_postgres::connect(&plain, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 1, "the store's connections are visible");
    assert_eq!(encrypted, all, "every connection of the store uses TLS");

    // Not trusting the CA: refused, never downgraded to plain text.
    let Err(err) = PgStore::connect(&url, 1).await else { panic!("an untrusted server is refused") };
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn a_ca_file_without_certificates_is_refused() {
    let path = std::env::temp_dir().join(format!("sb-empty-ca-{}.pem", prefix()));
    std::fs::write(&path, "not a certificate\n").unwrap();
    let err = BackendTls::with_ca_file(&path).unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
    std::fs::remove_file(&path).unwrap();
    assert!(BackendTls::with_ca_file(&path).is_err(), "a missing file is refused");
}
