//! `fsync`: what a write-ahead log's `fdatasync` costs on this machine's disk when the log file
//! grows with every batch (a new segment) against when the batch is written over blocks the file
//! already has (a recycled segment), optionally while another thread writes and fsyncs a larger
//! file the way a B-tree checkpoint does. Rounds alternate the two ways; each reports latency
//! percentiles and the logging thread's CPU per batch.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{percentiles, Percentiles};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the files (on the disk under test); emptied of them afterwards.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Seconds per round.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Rounds of each way, alternating.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Bytes per logged batch.
    #[arg(long, default_value_t = 3000)]
    pub batch_bytes: usize,
    /// Pause between batches, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub pause_us: u64,
    /// Size of the recycled file, MiB (the growing file starts empty).
    #[arg(long, default_value_t = 64)]
    pub segment_mib: u64,
    /// A second thread writes 200 random 4 KiB pages and 256 KiB at the end of a 256 MiB file,
    /// then fsyncs it, every 50 ms.
    #[arg(long)]
    pub checkpoint_writer: bool,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Serialize)]
struct Round {
    way: &'static str,
    batches: usize,
    fdatasync: Percentiles,
    /// CPU of the logging thread (user + system) per batch, microseconds.
    cpu_us_per_batch: f64,
}

#[derive(Serialize)]
struct Report {
    batch_bytes: usize,
    checkpoint_writer: bool,
    rounds: Vec<Round>,
}

/// The calling thread's CPU time so far.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn round(args: &Args, path: &Path, recycled: bool) -> anyhow::Result<Round> {
    let _ = std::fs::remove_file(path);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    let size = args.segment_mib << 20;
    if recycled {
        let zeros = vec![0u8; 1 << 20];
        for at in (0..size).step_by(zeros.len()) {
            file.write_all_at(&zeros, at)?;
        }
        file.sync_all()?;
    }
    let batch: Vec<u8> = (0..args.batch_bytes).map(|i| (i * 31 % 251) as u8).collect();
    let (mut samples, mut at) = (Vec::new(), 0u64);
    let (start, cpu0) = (Instant::now(), thread_cpu());
    while start.elapsed() < Duration::from_secs(args.secs) {
        file.write_all_at(&batch, at)?;
        let t = Instant::now();
        file.sync_data()?;
        samples.push(t.elapsed().as_nanos() as u64);
        at += batch.len() as u64;
        if recycled && at + batch.len() as u64 > size {
            at = 0;
        }
        std::thread::sleep(Duration::from_micros(args.pause_us));
    }
    let cpu = thread_cpu() - cpu0;
    drop(file);
    std::fs::remove_file(path)?;
    let batches = samples.len();
    Ok(Round {
        way: if recycled { "recycled" } else { "growing" },
        batches,
        fdatasync: percentiles(&mut samples),
        cpu_us_per_batch: cpu.as_secs_f64() * 1e6 / batches.max(1) as f64,
    })
}

/// Random page writes and an fsync every 50 ms into `path` until `stop`.
fn checkpoint_writer(path: PathBuf, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    let (size, page, tail) = (256u64 << 20, vec![7u8; 4096], vec![9u8; 256 << 10]);
    let (mut x, mut end) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            file.write_all_at(&page, (x % (size / 4096)) * 4096)?;
        }
        file.write_all_at(&tail, end % (512 << 20))?;
        end += tail.len() as u64;
        file.sync_all()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(file);
    std::fs::remove_file(&path)
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = args.checkpoint_writer.then(|| {
        let (path, stop) = (args.dir.join("sb-fsync-tree.bin"), stop.clone());
        std::thread::spawn(move || checkpoint_writer(path, stop))
    });
    let path = args.dir.join("sb-fsync-log.wal");
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        for recycled in [false, true] {
            let r = round(&args, &path, recycled)?;
            eprintln!(
                "{:<9} batches {:>6}  fdatasync p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.1} ms  cpu {:.1} µs/batch",
                r.way,
                r.batches,
                r.fdatasync.p50_ms,
                r.fdatasync.p99_ms,
                r.fdatasync.p999_ms,
                r.fdatasync.max_ms,
                r.cpu_us_per_batch
            );
            rounds.push(r);
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = writer {
        w.join().map_err(|_| anyhow::anyhow!("checkpoint writer panicked"))??;
    }
    let report = Report { batch_bytes: args.batch_bytes, checkpoint_writer: args.checkpoint_writer, rounds };
    let json = serde_json::to_string_pretty(&report)?;
    match &args.report {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    Ok(())
}
