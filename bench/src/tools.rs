//! Running `wrk` and `redis-benchmark` and reading their output.

use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use kvq_testkit::TestRedis;

/// Throughput and latency of one load run.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Responses that were not 2xx/3xx.
    pub errors: u64,
    /// Requests completed.
    pub requests: u64,
    /// CPU the server used per request, µs, where it was measured.
    pub server_cpu_us: Option<f64>,
}

/// `redis-benchmark` GET and SET against `server`: 50 clients, no
/// pipelining, 100-byte values. The server's CPU per request is measured
/// over both tests together (a GET and a SET cost Redis about the same).
pub fn redis_benchmark(server: &TestRedis, requests: u64) -> anyhow::Result<(Load, Load)> {
    let port = server.port();
    let cpu_before = server.cpu_seconds();
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-n", &requests.to_string(), "-d", "100"])
        .args(["-t", "get,set", "--csv"])
        .output()
        .context("run redis-benchmark (package redis-tools)")?;
    if !output.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let server_cpu_us =
        Some((server.cpu_seconds() - cpu_before) * 1e6 / (2 * requests.max(1)) as f64);
    let text = String::from_utf8_lossy(&output.stdout);
    let mut get = None;
    let mut set = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        if fields.len() < 7 {
            continue;
        }
        let load = || -> Option<Load> {
            Some(Load {
                rps: fields[1].parse().ok()?,
                p50_ms: fields[4].parse().ok()?,
                p99_ms: fields[6].parse().ok()?,
                errors: 0,
                requests: 0,
                server_cpu_us,
            })
        };
        match fields[0] {
            "GET" => get = load(),
            "SET" => set = load(),
            _ => {}
        }
    }
    match (get, set) {
        (Some(get), Some(set)) => Ok((get, set)),
        _ => bail!("unexpected redis-benchmark output: {text}"),
    }
}

/// `wrk` with 2 threads and `connections` connections for `duration` against
/// `url`, with an optional Lua script.
pub fn wrk(
    url: &str,
    connections: u32,
    duration: Duration,
    script: Option<&str>,
) -> anyhow::Result<Load> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", "2", "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s", "--latency"]);
    let mut _script_file = None;
    if let Some(script) = script {
        let mut file = tempfile::Builder::new()
            .prefix("kvq-bench-")
            .suffix(".lua")
            .tempfile()?;
        file.write_all(script.as_bytes())?;
        cmd.arg("-s").arg(file.path());
        _script_file = Some(file);
    }
    let output = cmd.arg(url).output().context("run wrk (package wrk)")?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

fn parse_wrk(text: &str) -> anyhow::Result<Load> {
    let mut load = Load::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            load.rps = rest.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("50%") {
            load.p50_ms = duration_ms(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            load.p99_ms = duration_ms(rest.trim())?;
        } else if line.contains(" requests in ") {
            load.requests = line.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.errors += rest.trim().parse::<u64>()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            load.errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if load.rps == 0.0 {
        bail!("unexpected wrk output: {text}");
    }
    Ok(load)
}

/// `512.00us`, `2.10ms`, `1.20s` → milliseconds.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .context("no unit")?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        other => bail!("unknown unit {other}"),
    })
}

/// CPU time (user + system) a process has used so far, seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = stat_ticks(&format!("/proc/{pid}/stat"));
    (ticks[11] + ticks[12]) / 100.0
}

/// CPU time (user + system) of this process' children that have ended and
/// been waited for, seconds: the `wrk` and `redis-benchmark` runs so far.
pub fn children_cpu_seconds() -> f64 {
    let ticks = stat_ticks("/proc/self/stat");
    (ticks[13] + ticks[14]) / 100.0
}

/// The first 15 fields of a `/proc/…/stat` after the parenthesised command
/// name (0 is the state, the 3rd field), as numbers: times are in clock
/// ticks (100 per second on Linux); all 0 for a process that is gone.
fn stat_ticks(path: &str) -> [f64; 15] {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // utime, stime, cutime and cstime are the 14th to 17th fields.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = [0.0; 15];
    for (field, text) in fields.iter_mut().zip(after.split_whitespace()) {
        *field = text.parse().unwrap_or(0.0);
    }
    fields
}

/// The CPU each process used over one measurement, per write, µs.
#[derive(Debug, Clone, Default)]
pub struct CpuSplit {
    /// kvq's processes and the Redis servers, by name, in order.
    pub parts: Vec<(String, f64)>,
    /// The load generator: this process (its HTTP clients and polling) and
    /// the `wrk` runs it reaped.
    pub load: f64,
}

impl CpuSplit {
    /// kvq's processes and the Redis servers together, µs per write (the
    /// load generator left out).
    pub fn total(&self) -> f64 {
        self.parts.iter().map(|(_, us)| us).sum()
    }

    /// `72 µs (kvq-api 20, data Redis 15, …; load generator 5 more)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect();
        format!(
            "{:.0} µs ({}; load generator {:.0} more)",
            self.total(),
            parts.join(", "),
            self.load
        )
    }

    /// Two phases of the same writes (their accept, then their apply) added
    /// up process by process.
    pub fn plus(&self, other: &CpuSplit) -> CpuSplit {
        let mut parts = self.parts.clone();
        for (name, us) in &other.parts {
            match parts.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += us,
                None => parts.push((name.clone(), *us)),
            }
        }
        CpuSplit {
            parts,
            load: self.load + other.load,
        }
    }
}

/// CPU times read at the start of a measurement, of named processes and of
/// the load generator.
pub struct CpuMeter {
    processes: Vec<(String, u32, f64)>,
    load: f64,
}

impl CpuMeter {
    /// Reads the CPU time so far of each `(name, pid)` and of the load
    /// generator. No kvq process or Redis server may be reaped before
    /// [`CpuMeter::per_write`]: its CPU would count as the load generator's.
    pub fn start(processes: &[(String, u32)]) -> Self {
        Self {
            processes: processes
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, cpu_seconds(*pid)))
                .collect(),
            load: load_generator_seconds(),
        }
    }

    /// The CPU used since [`CpuMeter::start`], per write of `writes`.
    pub fn per_write(&self, writes: u64) -> CpuSplit {
        let per = |seconds: f64| seconds * 1e6 / writes.max(1) as f64;
        CpuSplit {
            parts: self
                .processes
                .iter()
                .map(|(name, pid, before)| (name.clone(), per(cpu_seconds(*pid) - before)))
                .collect(),
            load: per(load_generator_seconds() - self.load),
        }
    }
}

/// CPU time of this process and of its reaped children, seconds.
fn load_generator_seconds() -> f64 {
    cpu_seconds(std::process::id()) + children_cpu_seconds()
}

/// What the data and queue Redis had processed when a measurement began.
pub struct Commands {
    data: (u64, u64, u64),
    queue: u64,
}

impl Commands {
    /// Reads both servers' counts now.
    pub fn start(data: &TestRedis, queue: &TestRedis) -> Self {
        Self {
            data: (commands(data), script_calls(data).0, script_calls(data).1),
            queue: commands(queue),
        }
    }

    /// Commands per write of `writes` since [`Commands::start`] (a script's
    /// own calls count, as `INFO stats` counts them), and how many writes
    /// one apply script call carried and how long it ran.
    pub fn per_write(&self, data: &TestRedis, queue: &TestRedis, writes: u64) -> String {
        let writes = writes.max(1) as f64;
        let (calls, usec) = script_calls(data);
        let calls = calls.saturating_sub(self.data.1);
        let usec = usec.saturating_sub(self.data.2);
        let scripts = if calls == 0 {
            "no apply script".to_owned()
        } else {
            format!(
                "apply script: {:.1} writes per call, {:.0} µs per call",
                writes / calls as f64,
                usec as f64 / calls as f64
            )
        };
        format!(
            "Redis commands per write (those scripts call included): data Redis {:.1} ({scripts}), queue Redis {:.1}",
            commands(data).saturating_sub(self.data.0) as f64 / writes,
            commands(queue).saturating_sub(self.queue) as f64 / writes
        )
    }
}

/// Commands `server` has processed so far (`INFO stats`).
fn commands(server: &TestRedis) -> u64 {
    let info: String = server.try_cmd(&["INFO", "stats"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `EVALSHA` calls `server` has run so far and the µs spent in them
/// (`INFO commandstats`).
fn script_calls(server: &TestRedis) -> (u64, u64) {
    let info: String = server
        .try_cmd(&["INFO", "commandstats"])
        .unwrap_or_default();
    let Some(line) = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
    else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls="), field("usec="))
}

/// Peak resident set size (VmHWM) of a process, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_splits_add_up_process_by_process() {
        let accept = CpuSplit {
            parts: vec![("kvq-api".into(), 20.0), ("queue Redis".into(), 10.0)],
            load: 5.0,
        };
        let drain = CpuSplit {
            parts: vec![("queue Redis".into(), 8.0), ("kvq-worker 1".into(), 12.0)],
            load: 1.0,
        };
        let both = accept.plus(&drain);
        assert_eq!(both.total(), 50.0);
        assert_eq!(
            both.describe(),
            "50 µs (kvq-api 20, queue Redis 18, kvq-worker 1 12; load generator 6 more)"
        );
    }

    #[test]
    fn reads_wrk_output() {
        let text = "Running 1s test @ http://x\n  Latency Distribution\n     50%  512.00us\n     75%    1.00ms\n     99%    2.10ms\n  1000 requests in 1.00s\nSocket errors: connect 0, read 2, write 0, timeout 1\nNon-2xx or 3xx responses: 4\nRequests/sec:  41152.12\n";
        let load = parse_wrk(text).expect("parses");
        assert_eq!(load.rps, 41152.12);
        assert_eq!(load.p50_ms, 0.512);
        assert_eq!(load.p99_ms, 2.1);
        assert_eq!(load.errors, 7);
    }
}
