//! The value every option takes when it is not set: read from the library types that apply
//! them (`LogicConfig::new`, `GatewayConfig::default`, `PersistConfig::default`, ...) and from
//! the constants below for the roles' own, so each default is written once.
//! `switchboard config --print` shows them as the effective values of the options left unset.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use switchboard_gateway::GatewayConfig;
use switchboard_logic::notify::NotifyConfig;
use switchboard_logic::LogicConfig;
use switchboard_storage::embedded::CheckpointPolicy;
use switchboard_storage::persist::PersistConfig;

use crate::http_serve::HttpLimits;
use crate::settings::Settings;
use crate::storage_settings::StorageSettings;

/// Where the embedded store and the generated token key live.
pub const DATA_DIR: &str = "./data";
/// The HTTP API's address.
pub const HTTP_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Logic's gRPC address (gateways' default logic URL is `http://` this).
pub const LOGIC_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100));
/// Milliseconds a reserved seq stays pending before it is voided (cluster).
pub const VOID_AFTER_MS: u64 = 30_000;
/// Milliseconds a gateway reports unready before it drains.
pub const DRAIN_GRACE_MS: u64 = 0;
/// Prefix of every Redis key.
pub const KEY_PREFIX: &str = "sb:";
/// Prefix of the Kafka topics.
pub const TOPIC_PREFIX: &str = "sb.";
/// The store when no cluster URL is set.
pub const BACKEND: &str = "embedded";

/// Every option with a default, set to it; options without one (secrets, URLs, addresses
/// that are off unless given) stay `None`.
pub fn defaults() -> Settings {
    let l = LogicConfig::new(Vec::new());
    let g = GatewayConfig::default();
    let p = PersistConfig::default();
    let h = HttpLimits::default();
    let c = CheckpointPolicy::default();
    let ms = |d: std::time::Duration| Some(d.as_millis() as u64);
    let secs = |d: std::time::Duration| Some(d.as_secs());
    Settings {
        storage: StorageSettings {
            backend: Some(BACKEND.into()),
            kafka_tls: Some(false),
            kafka_linger_ms: ms(switchboard_storage::kafka::DEFAULT_LINGER),
            key_prefix: Some(KEY_PREFIX.into()),
            topic_prefix: Some(TOPIC_PREFIX.into()),
            embedded_checkpoint_ms: ms(c.interval),
            embedded_checkpoint_bytes: Some(c.bytes),
            embedded_checkpoint_nice: Some(c.nice),
            embedded_log_linger_us: Some(c.linger.as_micros() as u64),
            embedded_cmid_filter_bytes: Some(c.cmid_filter_bytes),
            ..Default::default()
        },
        data_dir: Some(PathBuf::from(DATA_DIR)),
        http_addr: Some(HTTP_ADDR),
        ws_addr: Some(g.ws_addr),
        tcp_addr: g.tcp_addr.map(|a| a.to_string()),
        logic_addr: Some(LOGIC_ADDR),
        push_addr: Some(g.push_addr),
        shards: Some(g.shards),
        max_frame_bytes: Some(g.max_frame_bytes),
        max_connections: Some(g.max_connections),
        max_connections_per_ip: Some(g.max_connections_per_ip),
        max_outbound_frames: Some(g.max_outbound_frames),
        max_outbound_bytes: Some(g.max_outbound_bytes),
        max_link_message_bytes: Some(g.max_link_message_bytes),
        push_batch_bytes: Some(l.push.batch_bytes),
        reply_max_bytes: Some(l.reply_max_bytes),
        cursor_flush_ms: ms(l.cursor_flush),
        proxy_protocol: Some(g.proxy_protocol.to_string()),
        drain_grace_ms: Some(DRAIN_GRACE_MS),
        max_connections_per_user: Some(l.max_connections_per_user),
        http_max_connections: Some(h.max_connections),
        http_header_timeout_ms: ms(h.header_timeout),
        http_request_timeout_ms: ms(h.request_timeout),
        auth_timeout_ms: ms(g.auth_timeout),
        idle_timeout_ms: ms(g.idle_timeout),
        ack_flush_ms: ms(g.ack_flush),
        push_linger_ms: ms(g.push_linger),
        repush_ms: ms(g.repush_interval),
        access_ttl_secs: secs(l.access_ttl),
        session_check_ms: ms(l.session_check),
        session_prune_secs: secs(l.session_prune),
        refresh_ttl_secs: secs(l.refresh_ttl),
        argon2_memory_kib: Some(l.hash_cost.memory_kib),
        argon2_iterations: Some(l.hash_cost.iterations),
        argon2_concurrency: Some(l.hash_concurrency),
        login_rate: Some(l.login_rate.per_sec),
        login_burst: Some(l.login_rate.burst),
        user_rate: Some(l.user_rate.per_sec),
        user_burst: Some(l.user_rate.burst),
        ip_rate: Some(l.ip_rate.per_sec),
        ip_burst: Some(l.ip_rate.burst),
        auth_rate: Some(l.auth_rate.per_sec),
        auth_burst: Some(l.auth_rate.burst),
        persist_batch: Some(p.max_batch),
        persist_give_up_secs: secs(p.give_up_after),
        void_after_ms: Some(VOID_AFTER_MS),
        recall_window_ms: ms(l.recall_window),
        edit_window_ms: ms(l.edit_window),
        fold_scan: Some(l.fold_scan),
        search_scan: Some(l.search_scan),
        max_mentions: Some(l.max_mentions),
        max_push_tokens: Some(l.max_push_tokens),
        notify_delay_ms: ms(NotifyConfig::DEFAULT_DELAY),
        notify_attempts: Some(NotifyConfig::DEFAULT_ATTEMPTS),
        notify_backoff_ms: ms(NotifyConfig::DEFAULT_BACKOFF),
        notify_max_pending_bytes: Some(NotifyConfig::DEFAULT_MAX_PENDING_BYTES),
        max_file_bytes: Some(l.max_file_bytes),
        file_buffer_bytes: Some(l.file_buffer_bytes),
        max_group_members: Some(l.max_group_members),
        ring_timeout_ms: ms(g.ring_timeout),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options that have no default: off, generated or required unless given.
    const NONE: &[&str] = &[
        "logic_url",
        "advertise_push",
        "public_ws",
        "jwt_secret",
        "cluster_secret",
        "trusted_proxies",
        "health_addr",
        "admin_addr",
        "cluster_tls_cert",
        "cluster_tls_key",
        "cluster_tls_ca",
        "node_id",
        "advertise_logic",
        "admin_token",
        "notify_url",
        "notify_secret",
        "redis_url",
        "postgres_url",
        "mongodb_url",
        "mongodb_database",
        "kafka_brokers",
        "backend_ca_file",
    ];

    #[test]
    fn every_option_has_a_default_or_is_named_as_having_none() {
        let d = serde_json::to_value(defaults()).unwrap();
        for id in crate::roles::option_ids() {
            let value = d.get(&id).or_else(|| d["storage"].get(&id)).unwrap_or(&serde_json::Value::Null);
            assert_eq!(value.is_null(), NONE.contains(&id.as_str()), "option {id}: default {value}");
        }
    }

    #[test]
    fn defaults_read_back_as_the_same_configuration() {
        // Set as a configuration, the defaults configure what no configuration does.
        let explicit = defaults();
        let implicit = Settings::default();
        assert_eq!(explicit.http_addr(), implicit.http_addr());
        assert_eq!(explicit.tcp_addr().unwrap(), implicit.tcp_addr().unwrap());
        assert_eq!(explicit.storage.checkpoint_policy().interval, implicit.storage.checkpoint_policy().interval);
        let (a, b) = (explicit.gateway_config().unwrap(), implicit.gateway_config().unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let key = Some("k".repeat(32));
        let (a, b) = (
            Settings { jwt_secret: key.clone(), ..explicit }.logic_config(Vec::new()).unwrap(),
            Settings { jwt_secret: key, ..implicit }.logic_config(Vec::new()).unwrap(),
        );
        assert_eq!(format!("{:?}", a.push), format!("{:?}", b.push));
        assert_eq!((a.reply_max_bytes, a.fold_scan, a.access_ttl), (b.reply_max_bytes, b.fold_scan, b.access_ttl));
        assert_eq!((a.user_rate.per_sec, a.login_rate.burst), (b.user_rate.per_sec, b.login_rate.burst));
    }
}
