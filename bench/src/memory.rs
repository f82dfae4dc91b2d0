//! The API's memory under the worst write bodies: for each shape of
//! `kvq_testkit::flood::worst_shapes`, a fresh `kvq-api` gets 50 of them at
//! once; its peak resident set (`VmHWM`) and its resident set once the load
//! is over and it has settled are reported.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvq_testkit::TestRedis;
use kvq_testkit::flood;

use crate::load;

/// Bodies of each shape sent at once.
pub const CONCURRENT: usize = 50;

/// The value limit the API runs with (its default).
const VALUE_LIMIT: usize = 1_048_576;

/// The peak the API must stay under, MiB (half the base manifests' 256 Mi).
pub const PEAK_TARGET_MIB: f64 = 128.0;

/// One shape's figures.
pub struct Figures {
    /// The shape.
    pub shape: &'static str,
    /// Answers by status; transport errors under 0.
    pub answers: BTreeMap<u16, usize>,
    /// RSS before the load, MiB.
    pub before: f64,
    /// Peak RSS (VmHWM), MiB.
    pub peak: f64,
    /// RSS once settled after the load (back near `before`, or after the
    /// time given to settle), MiB.
    pub settled: f64,
}

fn mib(pid: u32, field: &str) -> f64 {
    flood::vm_kib(pid, field).map_or(f64::NAN, |kib| kib as f64 / 1024.0)
}

/// Runs every shape against a fresh API with `env` (the Redis URLs, auth
/// off) on top of its defaults.
pub async fn worst_bodies(
    kv: &TestRedis,
    queue: &TestRedis,
    env: &[(String, String)],
    settle_within: Duration,
) -> anyhow::Result<Vec<Figures>> {
    let mut figures = Vec::new();
    for shape in flood::worst_shapes() {
        let port = kvq_testkit::free_port();
        let (api, _) = load::start_api(env, port).await;
        let pid = api.pid();
        let before = mib(pid, "VmRSS");
        let addr = format!("127.0.0.1:{port}");
        let mut answers = BTreeMap::new();
        for answer in flood::flood(&addr, &shape, CONCURRENT, VALUE_LIMIT).await {
            *answers.entry(answer.map_or(0, |a| a.status)).or_insert(0) += 1;
        }
        let peak = mib(pid, "VmHWM");
        let settled = settle(pid, before, settle_within).await;
        println!(
            "   {}: {answers:?}; RSS before {before:.0} MiB, peak {peak:.0} MiB, settled {settled:.0} MiB",
            shape.name
        );
        figures.push(Figures {
            shape: shape.name,
            answers,
            before,
            peak,
            settled,
        });
        drop(api);
        let _: () = kv.cmd(&["FLUSHALL"]);
        let _: () = queue.cmd(&["FLUSHALL"]);
    }
    Ok(figures)
}

/// RSS once it is back within 2 MiB of `before`, or after `within`, MiB
/// (an allocator may give memory back only some seconds after it was freed).
async fn settle(pid: u32, before: f64, within: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let now = mib(pid, "VmRSS");
        if now <= before + 2.0 || started.elapsed() >= within {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
