//! Role processes of the `switchboard` binary on the real engines, for the
//! tests that kill them: each is spawned with the run's key and topic
//! prefixes, and its first stdout line (which names its addresses) is read.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};

use switchboard_storage::contract::TestEngines;

/// An `all-in-one` process on `data_dir` on free loopback ports (no raw TCP), with cheap
/// password hashing, `extra` arguments and `env` variables: the child, its HTTP and WebSocket
/// addresses (from its start-up line; the rest of its stdout is drained).
pub fn all_in_one(
    data_dir: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> (Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("all-in-one")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--http-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0", "--tcp-addr", "off"])
        .args(["--logic-addr", "127.0.0.1:0", "--push-addr", "127.0.0.1:0"])
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .args(extra)
        .env("SB_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("all-in-one starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let (http, ws) = (addr_in(&line, "http://"), addr_in(&line, "ws://"));
    std::thread::spawn(move || for _ in out.lines().map_while(std::result::Result::ok) {});
    (child, http, ws)
}

/// The address after `marker` in a role's start-up line.
fn addr_in(line: &str, marker: &str) -> SocketAddr {
    let rest = line.split(marker).nth(1).unwrap_or_else(|| panic!("{marker} in {line}"));
    rest.split(|c: char| c.is_whitespace() || c == '/').next().unwrap().parse().unwrap()
}

/// The cluster's durable store in a test.
pub enum TestStore {
    Postgres,
    /// MongoDB at this URL (`SB_TEST_MONGODB_URL`).
    Mongo(String),
}

impl TestStore {
    /// MongoDB when `SB_TEST_MONGODB_URL` is set; otherwise prints a SKIPPED line naming `what`.
    pub fn mongo_from_env(what: &str) -> Option<Self> {
        match std::env::var("SB_TEST_MONGODB_URL") {
            Ok(u) if !u.is_empty() => Some(Self::Mongo(u)),
            _ => {
                println!("SKIPPED: {what} (SB_TEST_MONGODB_URL unset: no MongoDB server installs here)");
                None
            }
        }
    }

    /// The durable store's messages, as the persist worker left them.
    pub async fn messages(&self, e: &TestEngines, prefix: &str) -> Box<dyn switchboard_storage::MessageStore> {
        match self {
            Self::Postgres => Box::new(switchboard_storage::postgres::PgStore::connect(&e.pg, 2).await.unwrap()),
            #[cfg(feature = "mongodb")]
            Self::Mongo(url) => Box::new(switchboard_storage::mongo::MongoStore::connect(url, prefix).await.unwrap()),
            #[cfg(not(feature = "mongodb"))]
            Self::Mongo(_) => panic!("built without the mongodb feature"),
        }
    }
}

/// One role process; its first stdout line names its addresses.
pub struct Proc {
    child: Child,
    line: String,
}

impl Proc {
    /// The command line of `role` on the engines `e` with PostgreSQL as the durable store; see
    /// [`Proc::command_on`].
    pub fn command(role: &str, e: &TestEngines, prefix: &str, extra: &[&str]) -> Command {
        Self::command_on(role, e, &TestStore::Postgres, prefix, extra)
    }

    /// The command line of `role` on the engines `e` and the durable store `store` (keys and
    /// topics under `prefix`), chosen as an operator would: a configuration file whose
    /// `[storage]` section names them. Then the test's addresses, cheap password hashing and
    /// the cluster secrets.
    pub fn command_on(role: &str, e: &TestEngines, store: &TestStore, prefix: &str, extra: &[&str]) -> Command {
        // Each role's file holds only what it reads (another role's key is refused).
        let durable = match store {
            TestStore::Postgres => format!("backend = \"postgres\"\npostgres_url = {:?}\n", e.pg),
            TestStore::Mongo(url) => {
                format!("backend = \"mongodb\"\nmongodb_url = {url:?}\nmongodb_database = {prefix:?}\n")
            }
        };
        let engines = match role {
            "gateway" => String::new(),
            _ => format!("{durable}kafka_brokers = {:?}\ntopic_prefix = \"{prefix}.\"\n", e.brokers),
        };
        let config = std::env::temp_dir().join(format!("sb-{prefix}-{role}-{:08x}.toml", rand::random::<u32>()));
        // (the persist worker keeps no Redis keys)
        let keys = if role == "persist" { String::new() } else { format!("key_prefix = \"{prefix}:\"\n") };
        let toml = format!("[storage]\n{engines}redis_url = {:?}\n{keys}", e.redis);
        std::fs::write(&config, toml).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        c.arg("--config").arg(&config).arg(role);
        match role {
            "gateway" => c
                .args(["--ws-addr", "127.0.0.1:0", "--tcp-addr", "127.0.0.1:0", "--push-addr", "127.0.0.1:0"])
                .args(["--repush-ms", "1000"]),
            "logic" => c.args(["--http-addr", "127.0.0.1:0", "--logic-addr", "127.0.0.1:0"]).args([
                "--argon2-memory-kib",
                "1024",
                "--argon2-iterations",
                "1",
            ]),
            _ => &mut c,
        };
        c.args(extra)
            .env("SB_JWT_SECRET", "cluster-test-jwt-secret-0123456789abcdef")
            .env("SB_CLUSTER_SECRET", "cluster-test-link-secret-0123456789abcdef")
            .env("SB_LOG", "warn");
        c
    }

    pub fn spawn(role: &str, e: &TestEngines, prefix: &str, extra: &[&str]) -> Proc {
        Self::start(Self::command(role, e, prefix, extra), role)
    }

    /// Runs `command` (a role of the binary) and reads its start-up line; its log goes to
    /// stderr tagged `tag`.
    pub fn start(mut command: Command, tag: &str) -> Proc {
        let mut child = command.stdout(Stdio::piped()).spawn().expect("role process starts");
        let role = tag;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "{role} exited before serving");
        // Serving, it has read its configuration file, which would otherwise stay in the temp dir.
        if let Some(file) = config_file(&command) {
            let _ = std::fs::remove_file(file);
        }
        // The rest (its log) goes on to stderr, tagged, so the process
        // never writes into a closed pipe.
        let tag = role.to_owned();
        std::thread::spawn(move || {
            for l in out.lines().map_while(std::result::Result::ok) {
                eprintln!("[{tag}] {l}");
            }
        });
        Proc { child, line }
    }

    /// The address after `marker` in the start-up line.
    pub fn addr(&self, marker: &str) -> SocketAddr {
        addr_in(&self.line, marker)
    }

    /// A stand-in while a role is restarted (owns no process).
    pub fn placeholder() -> Proc {
        let child = Command::new("true").spawn().expect("true runs");
        Proc { child, line: String::new() }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; asserts a clean exit.
    pub fn term(mut self) {
        // SAFETY: a plain syscall on our own child's pid.
        unsafe { kill(self.child.id() as i32, 15) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    }
}

/// The file `command`'s `--config` names, if any.
pub fn config_file(command: &Command) -> Option<std::path::PathBuf> {
    let mut args = command.get_args();
    while let Some(a) = args.next() {
        if a == "--config" {
            return args.next().map(Into::into);
        }
    }
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
