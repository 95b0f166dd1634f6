//! `sync` mode: the cost of catching up after being offline, for a user in many conversations of
//! which few changed. The reader (first token) creates `--convs` groups and posts one message in
//! each, acks them all (its device's cursors), then the writer (second token) joins `--changed`
//! of them and posts one message in each. The reader then asks `sync` (no `since`: the server
//! resumes from the device's acks) `--rounds` times, one at a time, and the report gives the
//! round-trip percentiles (loopback, so nearly all of it is server time) and checks every reply
//! holds exactly the changed conversations' messages. Then the whole `convs` list (each
//! conversation with its last message and unread count, in as many pages as the server's reply
//! budget makes) `--convs-rounds` times, checked the same way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{CommonArgs, Target};
use crate::session;
use crate::stats::{percentiles, Percentiles};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Tokens, one per line: the reader, then the writer (two distinct users).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Conversations (groups) the reader belongs to.
    #[arg(long, default_value_t = 1000)]
    pub convs: usize,
    /// Conversations that get a new message while the reader is "offline".
    #[arg(long, default_value_t = 10)]
    pub changed: usize,
    /// `sync` requests measured (one at a time).
    #[arg(long, default_value_t = 200)]
    pub rounds: usize,
    /// `convs` requests measured after the `sync`s (one at a time; 0: none).
    #[arg(long, default_value_t = 50)]
    pub convs_rounds: usize,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub mode: &'static str,
    pub label: String,
    pub url: String,
    pub started_unix: u64,
    pub convs: usize,
    pub changed: usize,
    pub rounds: usize,
    /// Messages in every `sync` reply (all replies must agree and equal `changed`).
    pub msgs_per_sync: usize,
    pub sync_rtt: Percentiles,
    pub convs_rounds: usize,
    /// Pages (replies) the whole `convs` list took.
    pub convs_pages: usize,
    /// Time to list every conversation with `convs`, all pages (together they list all `convs`
    /// conversations, the `changed` ones with the writer's message last).
    pub convs_rtt: Percentiles,
}

/// Entry point of `sync`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let report = run(&args)?;
    session::emit(&report, args.common.report.as_deref())
}

/// [`session::call_all`] in slices the gateway's request queue (64 per connection) takes whole.
fn call_chunked(client: &mut crate::rawws::Client, reqs: &[(usize, Value)]) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::with_capacity(reqs.len());
    for chunk in reqs.chunks(48) {
        out.extend(session::call_all(client, chunk, Duration::from_secs(60))?);
    }
    Ok(out)
}

fn ok(r: &Value, op: &str) -> anyhow::Result<()> {
    if r["op"] != format!("{op}.ok").as_str() {
        bail!("{op} failed: {r}");
    }
    Ok(())
}

/// Runs the benchmark and returns the report.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.common.url)?;
    if args.convs == 0
        || args.convs > 20_000
        || args.changed > args.convs
        || args.rounds == 0
        || args.rounds > 100_000
        || args.convs_rounds > 100_000
    {
        bail!("need 1 <= --changed <= --convs <= 20000, 1 <= --rounds <= 100000 and --convs-rounds <= 100000");
    }
    let tokens = session::read_tokens(&args.tokens)?;
    if tokens.len() < 2 || tokens[0].user == tokens[1].user {
        bail!("need two tokens of two distinct users (reader, writer)");
    }
    let started_unix = session::unix_now();
    let mut client = session::new_client(&target)?;
    let raw = [tokens[0].raw.as_str(), tokens[1].raw.as_str()];
    let ids = session::connect_all(&mut client, &raw, args.common.src_ips, 0, Duration::from_secs(30))?;
    let (reader, writer) = (ids[0], ids[1]);
    let run = session::run_id();

    let creates: Vec<_> = (0..args.convs)
        .map(|i| (reader, json!({"op": "group.create", "name": format!("sync bench {run} {i}"), "members": []})))
        .collect();
    let mut groups = Vec::with_capacity(args.convs);
    for r in call_chunked(&mut client, &creates)? {
        ok(&r, "group.create")?;
        groups.push(r["group"].as_str().context("group id")?.to_owned());
    }
    eprintln!("[sync] {} groups created", groups.len());
    let sends: Vec<_> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            (reader, json!({"op": "send", "group": g, "cmid": format!("{run}-r{i}"), "type": "text", "body": "x"}))
        })
        .collect();
    let mut acks = Vec::with_capacity(args.convs);
    for r in call_chunked(&mut client, &sends)? {
        ok(&r, "send")?;
        acks.push((reader, json!({"op": "ack", "conv": r["conv"], "seq": r["seq"]})));
    }
    for r in call_chunked(&mut client, &acks)? {
        ok(&r, "ack")?;
    }
    let joins: Vec<_> =
        groups[..args.changed].iter().map(|g| (writer, json!({"op": "group.join", "group": g}))).collect();
    for r in call_chunked(&mut client, &joins)? {
        ok(&r, "group.join")?;
    }
    let posts: Vec<_> = groups[..args.changed]
        .iter()
        .enumerate()
        .map(|(i, g)| {
            (writer, json!({"op": "send", "group": g, "cmid": format!("{run}-w{i}"), "type": "text", "body": "y"}))
        })
        .collect();
    for r in call_chunked(&mut client, &posts)? {
        ok(&r, "send")?;
    }
    eprintln!("[sync] {} of {} conversations changed; measuring", args.changed, args.convs);

    let mut samples = Vec::with_capacity(args.rounds);
    let mut msgs_per_sync = None;
    for _ in 0..args.rounds {
        let t = Instant::now();
        let r = session::call_all(&mut client, &[(reader, json!({"op": "sync"}))], Duration::from_secs(30))?;
        samples.push(t.elapsed().as_nanos() as u64);
        ok(&r[0], "sync")?;
        let n = r[0]["msgs"].as_array().map_or(0, Vec::len);
        if n != args.changed || *msgs_per_sync.get_or_insert(n) != n {
            bail!("sync returned {n} messages, expected the {} changed ones: {}", args.changed, r[0]);
        }
    }
    let mut convs_samples = Vec::with_capacity(args.convs_rounds);
    let mut convs_pages = 0;
    for _ in 0..args.convs_rounds {
        // the whole list, page after page (`more`, `next_before`)
        let t = Instant::now();
        let (mut listed, mut changed, mut pages) = (0, 0, 0);
        let mut req = json!({"op": "convs"});
        loop {
            let r = session::call_all(&mut client, &[(reader, req.clone())], Duration::from_secs(30))?;
            ok(&r[0], "convs")?;
            pages += 1;
            let list = r[0]["convs"].as_array().map_or(&[][..], Vec::as_slice);
            listed += list.len();
            changed += list.iter().filter(|c| c["last"]["from"] == tokens[1].user.as_str()).count();
            if r[0]["more"] != true || pages > args.convs {
                break;
            }
            req = json!({"op": "convs", "before": r[0]["next_before"]});
        }
        convs_samples.push(t.elapsed().as_nanos() as u64);
        convs_pages = pages;
        if listed != args.convs || changed != args.changed {
            bail!(
                "convs listed {listed} conversations, {changed} changed; expected {} and {}",
                args.convs,
                args.changed
            );
        }
    }
    Ok(Report {
        mode: "sync",
        label: args.common.label.clone(),
        url: args.common.url.clone(),
        started_unix,
        convs: args.convs,
        changed: args.changed,
        rounds: args.rounds,
        msgs_per_sync: msgs_per_sync.unwrap_or(0),
        sync_rtt: percentiles(&mut samples),
        convs_rounds: args.convs_rounds,
        convs_pages,
        convs_rtt: percentiles(&mut convs_samples),
    })
}
