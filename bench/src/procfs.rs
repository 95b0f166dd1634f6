//! Reads process figures from `/proc`: resident set size and CPU time.

/// `VmRSS` of `pid` in KiB, or `None` when the process or the field is missing.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds used so far by `pid` (this process when `None`), from
/// `/proc/PID/stat` (fields 14 and 15, in clock ticks).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(tick_secs(ticks))
}

/// Clock ticks (`/proc` counts time in them) as seconds.
fn tick_secs(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Seconds the hypervisor ran something else while this machine's CPUs wanted to run
/// (`steal`, summed over all CPUs, from the first line of `/proc/stat`); `None` where it is
/// not reported.
pub fn steal_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: u64 = stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().nth(7)?.parse().ok()?;
    Some(tick_secs(ticks))
}

/// CPU seconds used by a process over a measured window.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
}

impl CpuMeter {
    /// Starts metering this process.
    pub fn own() -> Self {
        Self { pid: None, start: cpu_secs(None) }
    }

    /// Starts metering the server `pid`; without a pid, [`elapsed`](Self::elapsed) is `None`.
    pub fn server(pid: Option<u32>) -> Self {
        match pid {
            Some(p) => Self { pid: Some(p), start: cpu_secs(Some(p)) },
            None => Self { pid: None, start: None },
        }
    }

    /// CPU seconds since `start` (`None` if the process could not be read).
    pub fn elapsed(&self) -> Option<f64> {
        Some(cpu_secs(self.pid)? - self.start?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let a = super::cpu_secs(None).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = super::cpu_secs(None).unwrap();
        assert!(b >= a, "{a} {b} {x}");
    }

    #[test]
    fn steal_is_read_from_proc_stat() {
        let a = super::steal_secs().expect("Linux reports steal in /proc/stat");
        assert!(super::steal_secs().unwrap() >= a);
    }
}
