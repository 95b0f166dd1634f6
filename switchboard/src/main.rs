//! `switchboard`: the command line of every role.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use switchboard::roles::Role;
use switchboard::{AllInOne, GatewayRole, LogicRole, PersistRole, Settings};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "High-performance instant messaging")]
struct Cli {
    /// TOML file with any of the options below (flags and SB_* variables win).
    #[arg(long, env = "SB_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    role: RoleCmd,
}

#[derive(Subcommand)]
enum RoleCmd {
    /// Gateway and logic in one process on embedded storage in --data-dir.
    AllInOne(Settings),
    /// The logic role alone (gRPC for gateways + the HTTP API).
    Logic(Settings),
    /// The gateway role alone (client sockets), relaying to --logic-url.
    Gateway(Settings),
    /// The persist worker: Kafka message topic -> the durable store (PostgreSQL or MongoDB).
    Persist(Settings),
    /// Checks the configuration that these flags, the SB_* variables and --config give (a file
    /// with an unknown key is refused, naming it); with --print, prints it as TOML: every option
    /// set, secrets masked, then those left to their defaults (as comments).
    Config(ConfigArgs),
    /// Prints access tokens signed with the deployment's key (from
    /// --data-dir or --jwt-secret), one per line, for load tests and operators.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct ConfigArgs {
    #[command(flatten)]
    settings: Settings,
    /// Print the configuration (secrets masked).
    #[arg(long)]
    print: bool,
    /// Check (and print) the configuration as this role reads it: another role's option, as a
    /// flag or a key of the file, is refused.
    #[arg(long, value_enum)]
    role: Option<Role>,
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(flatten)]
    settings: Settings,
    /// User the tokens are for; with --users U, users NAME-0 .. NAME-(U-1).
    #[arg(long)]
    user: String,
    /// How many users (each gets the --device / --count tokens).
    #[arg(long)]
    users: Option<usize>,
    /// Device id; with --count N, devices ID-0 .. ID-(N-1).
    #[arg(long, default_value = "cli")]
    device: String,
    /// How many tokens (one per device).
    #[arg(long)]
    count: Option<usize>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

fn main() -> anyhow::Result<()> {
    // Logs and traces: see switchboard::telemetry (set up once the runtime runs). A bad log
    // format is refused before anything else.
    if let Ok(f) = std::env::var("SB_LOG_FORMAT") {
        anyhow::ensure!(matches!(f.as_str(), "text" | "json"), "SB_LOG_FORMAT={f:?}: expected text or json");
    }
    // Each role's --help lists its own options; another role's flag is refused.
    let matches = switchboard::roles::restrict_help(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some((name, sub)) = matches.subcommand() {
        let role = match name {
            "config" => sub.get_one::<Role>("role").copied(),
            other => Role::of_subcommand(other),
        };
        if let Some(role) = role {
            switchboard::roles::check_flags(role, sub)?;
        }
    }
    let name = matches.subcommand_name().unwrap_or("switchboard").to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        // Flushes exported spans when the role has stopped.
        let _telemetry = switchboard::telemetry::init(&name, Role::of_subcommand(&name).is_some())?;
        run(cli).await
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.role {
        RoleCmd::AllInOne(s) => {
            let s = s.with_role_file(Role::AllInOne, config)?;
            let node = AllInOne::start(&s).await?;
            let tcp = node.gateway.tcp_addr().map(|a| format!("  tcp://{a}")).unwrap_or_default();
            println!("switchboard all-in-one: http://{}  ws://{}/ws{tcp}", node.http_addr(), node.ws_addr());
            shutdown_signal().await;
            node.stop().await;
        }
        RoleCmd::Logic(s) => {
            let s = s.with_role_file(Role::Logic, config)?;
            s.require_cluster_secrets("logic")?;
            let public = vec![switchboard_logic::GatewayInfo {
                ws: format!("ws://{}/ws", s.ws_addr()),
                tcp: s.tcp_addr()?.map(|a| a.to_string()),
            }];
            let node = LogicRole::start(&s, public, Vec::new()).await?;
            println!("switchboard logic: grpc {}  http://{}", node.grpc_addr, node.http_addr);
            shutdown_signal().await;
            node.stop().await;
        }
        RoleCmd::Gateway(s) => {
            let s = s.with_role_file(Role::Gateway, config)?;
            s.require_cluster_secrets("gateway")?;
            let gw = GatewayRole::start(&s).await?;
            let tcp = gw.gateway.tcp_addr().map(|a| format!("  tcp://{a}")).unwrap_or_default();
            let health = gw.health_addr().map(|a| format!("  health http://{a}")).unwrap_or_default();
            println!(
                "switchboard gateway: ws://{}/ws  push {}{tcp}{health}",
                gw.gateway.ws_addr(),
                gw.gateway.push_addr()
            );
            shutdown_signal().await;
            gw.stop().await;
        }
        RoleCmd::Token(t) => {
            let s = t.settings.with_file(config)?;
            let key = switchboard_logic::auth::TokenKey::new(s.jwt_secret()?);
            let devices: Vec<String> = match t.count {
                None => vec![t.device.clone()],
                Some(n) => (0..n).map(|i| format!("{}-{i}", t.device)).collect(),
            };
            let users: Vec<String> = match t.users {
                None => vec![t.user.clone()],
                Some(n) => (0..n).map(|i| format!("{}-{i}", t.user)).collect(),
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for u in &users {
                for d in &devices {
                    use std::io::Write;
                    writeln!(out, "{}", switchboard_logic::auth::mint(&key, u, d, t.ttl))?;
                }
            }
        }
        RoleCmd::Config(c) => {
            let s = match c.role {
                Some(role) => c.settings.with_role_file(role, config)?,
                None => c.settings.with_file(config)?,
            };
            s.storage.check().context("[storage]")?;
            if c.print {
                print!("{}", s.describe(c.role)?);
            }
        }
        RoleCmd::Persist(s) => {
            let s = s.with_role_file(Role::Persist, config)?;
            let worker = PersistRole::start(&s).await?;
            println!("switchboard persist: running");
            worker.run_until(shutdown_signal()).await?;
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
