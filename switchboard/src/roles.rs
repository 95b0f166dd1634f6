//! Which options each role reads. The options are one set ([`Settings`]); each role's view of
//! them is declared here, once: `switchboard <role> --help` lists only that role's options, an
//! option of another role given to it as a flag or a key of its configuration file is refused
//! by name, and `switchboard config --role R --print` prints R's view. `SB_*` variables are
//! not refused (one environment file often serves several roles): a role drops the others'
//! ([`Settings::only_for`]).

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

use crate::settings::Settings;

/// A role of the binary, as far as options go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    AllInOne,
    Gateway,
    Logic,
    Persist,
}

use Role::*;

impl Role {
    /// The role's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AllInOne => "all-in-one",
            Gateway => "gateway",
            Logic => "logic",
            Persist => "persist",
        }
    }

    /// The role of a subcommand, when it is one.
    pub fn of_subcommand(name: &str) -> Option<Role> {
        [AllInOne, Gateway, Logic, Persist].into_iter().find(|r| r.name() == name)
    }

    /// Whether the role reads the option `key` (a field of [`Settings`], or of its `[storage]`
    /// section). All-in-one reads what the gateway and logic read, on embedded storage.
    pub fn reads(self, key: &str) -> bool {
        let roles = roles_of(key);
        match self {
            AllInOne => roles.iter().any(|r| matches!(r, Gateway | Logic)) && !NOT_ALL_IN_ONE.contains(&key),
            r => roles.contains(&r),
        }
    }
}

/// Options of the gateway or logic that all-in-one (embedded, one process, no registry, no
/// health listener of its own) has no use for.
const NOT_ALL_IN_ONE: &[&str] = &[
    "logic_url",
    "advertise_logic",
    "node_id",
    "void_after_ms",
    "health_addr",
    "drain_grace_ms",
    "redis_url",
    "postgres_url",
    "mongodb_url",
    "mongodb_database",
    "kafka_brokers",
    "kafka_tls",
    "kafka_linger_ms",
    "backend_ca_file",
    "key_prefix",
    "topic_prefix",
];

/// The roles that read `key`; none for a key that is no option.
fn roles_of(key: &str) -> &'static [Role] {
    const G: &[Role] = &[Gateway];
    const L: &[Role] = &[Logic];
    const P: &[Role] = &[Persist];
    const GL: &[Role] = &[Gateway, Logic];
    const GP: &[Role] = &[Gateway, Persist];
    const LP: &[Role] = &[Logic, Persist];
    const GLP: &[Role] = &[Gateway, Logic, Persist];
    match key {
        // the store: a gateway reads Redis (its registry) only
        "backend" | "postgres_url" | "mongodb_url" | "mongodb_database" | "kafka_brokers" | "kafka_tls"
        | "topic_prefix" => LP,
        "kafka_linger_ms" | "embedded_checkpoint_ms" | "embedded_checkpoint_bytes" | "embedded_checkpoint_nice"
        | "embedded_log_linger_us" | "embedded_cmid_filter_bytes" => L,
        "redis_url" | "backend_ca_file" => GLP,
        "key_prefix" => GL,
        // every HTTP listener (the API, a gateway's or the persist worker's health listener)
        "http_max_connections" | "http_header_timeout_ms" | "http_request_timeout_ms" => GLP,
        "health_addr" => GP,
        // the links between gateways and logic
        "cluster_secret"
        | "cluster_tls_cert"
        | "cluster_tls_key"
        | "cluster_tls_ca"
        | "node_id"
        | "max_link_message_bytes"
        | "trusted_proxies"
        | "public_ws"
        // a gateway binds them; logic names them in `GET /v1/gateways` when there is no registry
        | "ws_addr"
        | "tcp_addr"
        // logic binds it; a gateway's default logic URL is `http://` it
        | "logic_addr" => GL,
        "push_addr"
        | "logic_url"
        | "advertise_push"
        | "shards"
        | "max_frame_bytes"
        | "max_connections"
        | "max_connections_per_ip"
        | "max_outbound_frames"
        | "max_outbound_bytes"
        | "proxy_protocol"
        | "drain_grace_ms"
        | "auth_timeout_ms"
        | "idle_timeout_ms"
        | "ack_flush_ms"
        | "push_linger_ms"
        | "repush_ms"
        | "ring_timeout_ms" => G,
        "persist_batch" | "persist_give_up_secs" => P,
        "data_dir"
        | "http_addr"
        | "advertise_logic"
        | "admin_addr"
        | "jwt_secret"
        | "admin_token"
        | "access_ttl_secs"
        | "refresh_ttl_secs"
        | "session_check_ms"
        | "session_prune_secs"
        | "argon2_memory_kib"
        | "argon2_iterations"
        | "argon2_concurrency"
        | "login_rate"
        | "login_burst"
        | "user_rate"
        | "user_burst"
        | "ip_rate"
        | "ip_burst"
        | "auth_rate"
        | "auth_burst"
        | "max_connections_per_user"
        | "push_batch_bytes"
        | "reply_max_bytes"
        | "cursor_flush_ms"
        | "void_after_ms"
        | "recall_window_ms"
        | "edit_window_ms"
        | "fold_scan"
        | "search_scan"
        | "max_mentions"
        | "max_push_tokens"
        | "notify_url"
        | "notify_secret"
        | "notify_delay_ms"
        | "notify_attempts"
        | "notify_backoff_ms"
        | "notify_max_pending_bytes"
        | "max_file_bytes"
        | "file_buffer_bytes"
        | "max_group_members" => L,
        _ => &[],
    }
}

/// The ids (which are the keys) of the options `A` declares, flattened sections included.
fn ids_of<A: clap::Args>() -> Vec<String> {
    A::augment_args(Command::new("options")).get_arguments().map(|a| a.get_id().to_string()).collect()
}

/// Every option of [`Settings`] (flattened sections included) by its id, which is its key.
pub fn option_ids() -> Vec<String> {
    ids_of::<Settings>().into_iter().filter(|id| id != "storage").collect()
}

/// The options of the `[storage]` section.
pub fn storage_option_ids() -> Vec<String> {
    ids_of::<crate::storage_settings::StorageSettings>()
}

/// The command line with each role subcommand's help restricted to its own options.
pub fn restrict_help(mut cmd: Command) -> Command {
    let ids = option_ids();
    for role in [AllInOne, Gateway, Logic, Persist] {
        cmd = cmd.mut_subcommand(role.name(), |mut sub| {
            for id in ids.iter().filter(|id| !role.reads(id)) {
                sub = sub.mut_arg(id.as_str(), |a| a.hide(true));
            }
            sub
        });
    }
    cmd
}

/// Refuses a flag of another role given on `role`'s command line.
pub fn check_flags(role: Role, matches: &ArgMatches) -> anyhow::Result<()> {
    for id in option_ids() {
        if !role.reads(&id) && matches.value_source(&id) == Some(ValueSource::CommandLine) {
            anyhow::bail!("--{} is not an option of the {} role", id.replace('_', "-"), role.name());
        }
    }
    Ok(())
}

/// Refuses a key of a configuration file (top level or `[storage]`) that `role` does not read.
pub fn check_file_keys(role: Role, file: &toml::Table) -> anyhow::Result<()> {
    for (key, value) in file {
        let keys: Vec<&str> = match (key.as_str(), value) {
            ("storage", toml::Value::Table(section)) => section.keys().map(String::as_str).collect(),
            (k, _) => vec![k],
        };
        if let Some(k) = keys.into_iter().find(|k| !role.reads(k)) {
            anyhow::bail!("`{k}` is not an option of the {} role", role.name());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_belongs_to_a_role() {
        let ids = option_ids();
        assert!(ids.len() > 80, "{ids:?}");
        for id in &ids {
            assert!(!roles_of(id).is_empty(), "option {id} is read by no role: add it to roles_of");
        }
        for key in NOT_ALL_IN_ONE {
            assert!(ids.iter().any(|id| id == key), "{key} is no option");
        }
    }

    /// docs/protocol.md §10 documents every option (by its TOML key, `storage.` for the section).
    #[test]
    fn every_option_is_documented() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
        let storage = storage_option_ids();
        for id in option_ids() {
            let key = if storage.contains(&id) { format!("`storage.{id}`") } else { format!("`{id}`") };
            assert!(doc.contains(&key), "docs/protocol.md §10 does not document {key}");
        }
    }

    #[test]
    fn each_role_reads_its_own() {
        assert!(Gateway.reads("ws_addr") && !Gateway.reads("jwt_secret") && !Gateway.reads("postgres_url"));
        assert!(Gateway.reads("redis_url") && Gateway.reads("health_addr"));
        assert!(Logic.reads("jwt_secret") && Logic.reads("mongodb_url") && !Logic.reads("shards"));
        assert!(Persist.reads("persist_batch") && Persist.reads("postgres_url") && !Persist.reads("ws_addr"));
        assert!(AllInOne.reads("shards") && AllInOne.reads("jwt_secret") && AllInOne.reads("embedded_checkpoint_ms"));
        assert!(!AllInOne.reads("redis_url") && !AllInOne.reads("persist_batch") && !AllInOne.reads("health_addr"));
        // all-in-one still serves logic's gRPC and the gateway's push listeners
        assert!(AllInOne.reads("cluster_secret") && AllInOne.reads("max_link_message_bytes"));
        assert!(Gateway.reads("logic_addr") && !Persist.reads("key_prefix"));
    }
}
