//! `kvq-bench`: kvq against Redis itself, in one run on one machine.
//!
//! Starts its own stack on 127.0.0.1 (two fresh redis-servers, the release
//! `kvq-api`, one then two `kvq-worker`s), runs each measurement for a bounded
//! time (among them the writes accepted with no worker, that backlog drained
//! by 2 workers, bursts end to end and batches through `POST /v1/batch`, each
//! with the CPU every process used per write), then the scaling runs on stacks of their own (1, 2, 4 workers; the
//! data on one server and on a Redis Cluster; `WAIT 1`), stops everything,
//! and prints a markdown table; with `--out DIR` it also writes
//! `DIR/results.md` and `DIR/chart.svg`.
//!
//! ```text
//! cargo build --release --bins && target/release/kvq-bench [--quick] [--out bench/results]
//! ```
//!
//! `--quick` runs every measurement small (about 75–90 s) as a smoke test.
//! `--memory` runs only the API's memory under the worst write bodies;
//! `--scaling` only the scaling runs (workers, Redis Cluster, `WAIT`) and
//! redis-benchmark SET to compare them with. `KVQ_BIN_DIR` points any run
//! at the `kvq-api` and `kvq-worker` of another build, to compare builds
//! (an API without `POST /v1/batch` leaves that measurement out).
//!
//! # Layout
//! - `tools`: `wrk` and `redis-benchmark` runs and their output.
//! - `tools`: also the CPU each process used per write (`/proc`).
//! - `load`: bursts and batches timed until applied, steady-rate
//!   visibility, and the data Redis' CPU per list page.
//! - `scaling`: bursts with 1, 2, 4 workers, on one data server and on a
//!   3-master cluster, with and without `WAIT 1`, and their CPU per write.
//! - `memory`: the API's peak and settled RSS under the worst write bodies.
//! - `report`: the table and the chart.

#![allow(clippy::print_stdout)]

mod load;
mod memory;
mod report;
mod scaling;
mod tools;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use kvq_testkit::{KvqProcess, TestRedis};
use report::{Bar, Row};
use tools::Load;

/// How big each measurement is.
struct Plan {
    /// Length of each wrk run.
    wrk: Duration,
    /// redis-benchmark requests per test.
    redis_requests: u64,
    /// Length of each end-to-end burst.
    burst: Duration,
    /// How long the clients of the batch API send batches.
    batch: Duration,
    /// Length of the steady-rate visibility run.
    visibility: Duration,
    /// Jobs run for the queue-memory measurement.
    memory_jobs: u64,
    /// Keys seeded for the list-cost measurement.
    list_keys: usize,
    /// How long the API's memory may take to settle after a flood of
    /// large bodies.
    settle: Duration,
    /// Worker processes and Redis topologies, and `WAIT`.
    scaling: scaling::Plan,
}

/// List pages of a non-matching prefix whose data-Redis CPU is averaged.
const LIST_PAGES: u32 = 50;

const RETENTION_SECONDS: u64 = 5;

/// How long a measurement's writes may take to be applied.
const APPLY_DEADLINE: Duration = Duration::from_secs(120);

/// Clients posting batches at once, each one batch at a time: enough that
/// the API accepts faster than the workers apply.
const BATCH_CLIENTS: usize = 8;

/// Writes per batch: the most `POST /v1/batch` takes.
const BATCH_SIZE: usize = 1_000;

/// A backlog drained by workers started once it was queued.
struct Drain {
    /// Writes in the backlog.
    writes: u64,
    /// Writes per second applied, from the workers' start to the last
    /// applied.
    applied_per_s: f64,
    /// When the first write was applied, ms after the workers started.
    first_applied_ms: f64,
    /// Whether every write was applied before the deadline.
    complete: bool,
    /// CPU per write while draining.
    cpu: tools::CpuSplit,
    /// CPU per write while the backlog was accepted.
    accept_cpu: tools::CpuSplit,
}

/// The write path's measurements on the main stack.
struct WritePath {
    /// Writes accepted with no worker running (the drain's backlog).
    accept: Load,
    /// That backlog drained by 2 workers.
    drain: Drain,
    /// End to end with 1, then 2 workers.
    bursts: Vec<load::Burst>,
    /// CPU per write of the last burst (2 workers).
    burst_cpu: tools::CpuSplit,
    /// Batches through `POST /v1/batch` (none if the API has no such route).
    batched: Option<(load::Batched, tools::CpuSplit)>,
    /// Workers running after all of them.
    alive: usize,
}

/// `(name, pid)` of the API, the Redis servers and each worker.
fn processes(servers: &[(String, u32)], workers: &[KvqProcess]) -> Vec<(String, u32)> {
    let mut all = servers.to_vec();
    for (i, worker) in workers.iter().enumerate() {
        all.push((format!("kvq-worker {}", i + 1), worker.pid()));
    }
    all
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let plan = if quick {
        Plan {
            wrk: Duration::from_secs(3),
            redis_requests: 50_000,
            burst: Duration::from_secs(1),
            batch: Duration::from_secs(1),
            visibility: Duration::from_secs(3),
            memory_jobs: 2_000,
            list_keys: 5_000,
            settle: Duration::from_secs(3),
            scaling: scaling::Plan {
                burst: Duration::from_secs(1),
                workers: vec![1, 4],
                wait_workers: 1,
            },
        }
    } else {
        Plan {
            wrk: Duration::from_secs(10),
            redis_requests: 300_000,
            burst: Duration::from_secs(3),
            batch: Duration::from_secs(3),
            visibility: Duration::from_secs(10),
            memory_jobs: 20_000,
            list_keys: 100_000,
            settle: Duration::from_secs(15),
            scaling: scaling::Plan {
                burst: Duration::from_secs(3),
                workers: vec![1, 2, 4],
                wait_workers: 2,
            },
        }
    };
    let started = Instant::now();
    let rows = if args.iter().any(|a| a == "--memory") {
        let (kv, queue) = (TestRedis::start(), TestRedis::start());
        memory_rows(&worst_bodies(&kv, &queue, plan.settle).await?)
    } else if args.iter().any(|a| a == "--scaling") {
        let redis = TestRedis::start();
        step("redis-benchmark GET/SET on a fresh Redis (the yardstick)");
        let (_, redis_set) = tools::redis_benchmark(&redis, plan.redis_requests)?;
        drop(redis);
        let runs = scaling::run(&plan.scaling).await?;
        scaling::rows(&runs, &redis_set)
    } else {
        run(&plan, out.as_ref()).await?
    };
    println!("\n{}", report::table(&rows));
    println!(
        "{} run on {} cores, {:.0} s",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(text: &str) {
    println!("== {text}");
}

async fn run(plan: &Plan, out: Option<&PathBuf>) -> anyhow::Result<Vec<Row>> {
    let kv = TestRedis::start();
    let queue = TestRedis::start();

    step("redis-benchmark GET/SET on the KV Redis (50 clients, no pipelining, 100 B)");
    let (redis_get, redis_set) = tools::redis_benchmark(&kv, plan.redis_requests)?;
    let _: () = kv.cmd(&["FLUSHALL"]);

    // Logs at warn (per-job info lines would cost throughput), so ports are
    // chosen here rather than read from the start-up log line.
    let port = kvq_testkit::free_port();
    let env = vec![
        ("KVQ_KV_REDIS_URL".to_owned(), kv.url()),
        ("KVQ_QUEUE_REDIS_URL".to_owned(), queue.url()),
        ("KVQ_BIND".to_owned(), format!("127.0.0.1:{port}")),
        ("KVQ_AUTH_DISABLED".to_owned(), "true".to_owned()),
        (
            "KVQ_JOB_RETENTION_SECONDS".to_owned(),
            RETENTION_SECONDS.to_string(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    let (api, base) = load::start_api(&env, port).await;
    let kv_conn = load::kv_conn(&env)?;
    let mut workers = vec![load::start_worker(&env).await];

    step("kvq GET of a 100-byte value (wrk, 50 connections)");
    let body = serde_json::json!({"key": "bench/get", "value": load::VALUE_100_BYTES});
    let http = load::client();
    let response = http
        .post(format!("{base}/v1/kv"))
        .json(&body)
        .send()
        .await?;
    if response.status() != 202 {
        bail!("preload answered {}", response.status());
    }
    kvq_testkit::eventually(Duration::from_secs(10), "the preload", || async {
        let r = http
            .get(format!("{base}/v1/kv/bench/get"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let kvq_get = tools::wrk(&format!("{base}/v1/kv/bench/get"), 50, plan.wrk, None)?;

    step(
        "kvq writes accepted (wrk POST of fresh keys, 50 connections, no worker): the backlog drained next",
    );
    for worker in &mut workers {
        worker.signal("TERM");
        worker.wait_exit(Duration::from_secs(30)).await;
    }
    workers.clear();
    let servers = [
        ("kvq-api".to_owned(), api.pid()),
        ("data Redis".to_owned(), kv.pid().unwrap_or(0)),
        ("queue Redis".to_owned(), queue.pid().unwrap_or(0)),
    ];
    let backlog_before = load::indexed(&kv_conn).await?;
    let cpu = tools::CpuMeter::start(&servers);
    let commands = tools::Commands::start(&kv, &queue);
    let kvq_accept = tools::wrk(
        &format!("{base}/v1/kv"),
        50,
        plan.wrk,
        Some(&load::post_script("accept")),
    )?;
    let accept_cpu = cpu.per_write(kvq_accept.requests);
    println!("   CPU per accepted write: {}", accept_cpu.describe());
    println!(
        "   {}",
        commands.per_write(&kv, &queue, kvq_accept.requests)
    );

    step(&format!(
        "drain: the {} writes just accepted, 2 workers started at once, timed until all applied",
        kvq_accept.requests
    ));
    let started = Instant::now();
    for _ in 0..2 {
        workers.push(load::spawn_worker(&env).0);
    }
    let cpu = tools::CpuMeter::start(&processes(&servers, &workers));
    let commands = tools::Commands::start(&kv, &queue);
    let applied = load::applied(
        &kv_conn,
        backlog_before + kvq_accept.requests,
        started,
        APPLY_DEADLINE,
    )
    .await?;
    let drain = Drain {
        writes: kvq_accept.requests,
        applied_per_s: kvq_accept.requests as f64 / applied.all.as_secs_f64(),
        first_applied_ms: applied.first.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        complete: applied.complete,
        cpu: cpu.per_write(kvq_accept.requests),
        accept_cpu,
    };
    println!(
        "   {} writes drained at {:.0}/s (the first applied {:.0} ms after the workers started){}",
        drain.writes,
        drain.applied_per_s,
        drain.first_applied_ms,
        if drain.complete { "" } else { ", NOT all" }
    );
    println!("   CPU per drained write: {}", drain.cpu.describe());
    println!("   {}", commands.per_write(&kv, &queue, drain.writes));
    println!(
        "   CPU per write, its accept and its drain: {}",
        drain.accept_cpu.plus(&drain.cpu).describe()
    );
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        worker.wait_exit(Duration::from_secs(30)).await;
    }
    workers.clear();

    let mut bursts = Vec::new();
    let mut burst_cpu = tools::CpuSplit::default();
    for n in 1..=2 {
        step(&format!(
            "end to end: {} s of writes (wrk), {n} worker(s), timed until all applied",
            plan.burst.as_secs()
        ));
        workers.push(load::start_worker(&env).await);
        scaling::partitions_settled(&queue, n).await;
        let cpu = tools::CpuMeter::start(&processes(&servers, &workers));
        let commands = tools::Commands::start(&kv, &queue);
        let burst = load::burst(
            &base,
            &kv_conn,
            &load::post_script(&format!("burst{n}")),
            plan.burst,
            APPLY_DEADLINE,
        )
        .await?;
        burst_cpu = cpu.per_write(burst.writes);
        println!(
            "   {} writes, applied {:.0}/s; CPU per write: {}",
            burst.writes,
            burst.applied_per_s,
            burst_cpu.describe()
        );
        println!("   {}", commands.per_write(&kv, &queue, burst.writes));
        bursts.push(burst);
    }

    step(&format!(
        "batch API: {BATCH_CLIENTS} clients each posting batches of {BATCH_SIZE} upserts for {} s, 2 workers, timed until all applied",
        plan.batch.as_secs()
    ));
    let cpu = tools::CpuMeter::start(&processes(&servers, &workers));
    let commands = tools::Commands::start(&kv, &queue);
    let batched = load::batches(
        &base,
        &kv_conn,
        BATCH_CLIENTS,
        BATCH_SIZE,
        plan.batch,
        APPLY_DEADLINE,
    )
    .await?
    .map(|batched| {
        let cpu = cpu.per_write(batched.writes);
        println!(
            "   {} writes ({} batches not accepted), applied {:.0}/s, accepted {:.0}/s; CPU per write: {}",
            batched.writes,
            batched.errors,
            batched.applied_per_s,
            batched.accepted_per_s,
            cpu.describe()
        );
        println!("   {}", commands.per_write(&kv, &queue, batched.writes));
        (batched, cpu)
    });
    if batched.is_none() {
        println!("   skipped: this kvq-api has no POST /v1/batch");
    }
    let alive = workers
        .iter_mut()
        .map(|w| w.is_running())
        .filter(|running| *running)
        .count();
    let writes = WritePath {
        accept: kvq_accept,
        drain,
        bursts,
        burst_cpu,
        batched,
        alive,
    };

    step("write-to-visible latency at 1,000 writes/s (2 workers)");
    let visible = load::visibility(&base, 1_000, plan.visibility).await?;

    step("queue Redis memory after retention");
    tokio::time::sleep(Duration::from_secs(RETENTION_SECONDS + 1)).await;
    let baseline = used_memory(&queue);
    let all_applied = load::paced(
        &base,
        &kv_conn,
        "mem",
        plan.memory_jobs,
        1_000,
        Duration::from_secs(180),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(RETENTION_SECONDS + 1)).await;
    let after = used_memory(&queue);
    let per_100k_mib =
        (after as f64 - baseline as f64) / plan.memory_jobs as f64 * 100_000.0 / 1_048_576.0;

    step(&format!(
        "data Redis CPU per list page: a prefix matching none of {} keys",
        plan.list_keys
    ));
    let listing = load::list_cost(&base, &kv, plan.list_keys, LIST_PAGES).await?;

    let api_rss = tools::peak_rss_mib(api.pid()).unwrap_or(f64::NAN);
    let worker_rss = workers
        .iter()
        .filter_map(|w| tools::peak_rss_mib(w.pid()))
        .fold(0.0_f64, f64::max);

    drop(api);
    drop(workers);
    let scaling = scaling::run(&plan.scaling).await?;
    let figures = worst_bodies(&kv, &queue, plan.settle).await?;
    let mut rows = rows(
        &redis_get,
        &redis_set,
        &kvq_get,
        &writes,
        &visible,
        (baseline, after, per_100k_mib, all_applied),
        &listing,
        (api_rss, worker_rss),
    );
    rows.extend(scaling::rows(&scaling, &redis_set));
    rows.extend(memory_rows(&figures));
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.md"), report::table(&rows))?;
        std::fs::write(
            dir.join("chart.svg"),
            chart(
                &redis_get, &redis_set, &kvq_get, &writes, &visible, &scaling,
            ),
        )?;
        println!("wrote {}/results.md and chart.svg", dir.display());
    }
    Ok(rows)
}

/// The API's memory under the worst write bodies, each shape against a
/// fresh API with default limits.
async fn worst_bodies(
    kv: &TestRedis,
    queue: &TestRedis,
    settle: Duration,
) -> anyhow::Result<Vec<memory::Figures>> {
    step(&format!(
        "kvq-api RSS under {} concurrent worst-shape write bodies (a fresh API per shape)",
        memory::CONCURRENT
    ));
    let mut env = vec![
        ("KVQ_KV_REDIS_URL".to_owned(), kv.url()),
        ("KVQ_QUEUE_REDIS_URL".to_owned(), queue.url()),
        ("KVQ_AUTH_DISABLED".to_owned(), "true".to_owned()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    // The budget may be set for the run, to see what it buys.
    let budget = std::env::var("KVQ_MAX_BODY_BYTES_IN_FLIGHT").ok();
    env.extend(budget.map(|b| ("KVQ_MAX_BODY_BYTES_IN_FLIGHT".to_owned(), b)));
    memory::worst_bodies(kv, queue, &env, settle).await
}

fn memory_rows(figures: &[memory::Figures]) -> Vec<Row> {
    figures
        .iter()
        .map(|f| Row {
            what: format!("kvq-api RSS, {} concurrent {}", memory::CONCURRENT, f.shape),
            value: format!(
                "{:.0} MiB before, peak {:.0} MiB, settled {:.0} MiB; answers {:?}",
                f.before, f.peak, f.settled, f.answers
            ),
            target: Some((
                format!("peak < {:.0} MiB", memory::PEAK_TARGET_MIB),
                f.peak < memory::PEAK_TARGET_MIB && !f.answers.contains_key(&0),
            )),
        })
        .collect()
}

fn used_memory(redis: &TestRedis) -> u64 {
    let info: String = redis.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

#[allow(clippy::too_many_arguments)]
fn rows(
    redis_get: &Load,
    redis_set: &Load,
    kvq_get: &Load,
    writes: &WritePath,
    visible: &load::Visibility,
    memory: (u64, u64, f64, bool),
    listing: &load::ListCost,
    rss: (f64, f64),
) -> Vec<Row> {
    let get_ratio = ratio(kvq_get.rps, redis_get.rps);
    let mut rows = vec![
        Row {
            what: "redis-benchmark GET (50 clients)".into(),
            value: format!(
                "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
                redis_get.rps, redis_get.p50_ms, redis_get.p99_ms
            ),
            target: None,
        },
        Row {
            what: "redis-benchmark SET (50 clients)".into(),
            value: format!(
                "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
                redis_set.rps, redis_set.p50_ms, redis_set.p99_ms
            ),
            target: None,
        },
        Row {
            what: "kvq GET /v1/kv/{key} (50 connections)".into(),
            value: format!(
                "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} x redis GET, {} errors",
                kvq_get.rps, kvq_get.p50_ms, kvq_get.p99_ms, get_ratio, kvq_get.errors
            ),
            target: Some((
                "≥ 0.5 x redis GET".into(),
                get_ratio >= 0.5 && kvq_get.errors == 0,
            )),
        },
    ];
    rows.extend(write_rows(redis_set, writes));
    rows.push(Row {
        what: format!(
            "write → visible at {}/s ({} sampled)",
            visible.rate, visible.sampled
        ),
        value: format!(
            "p50 {:.1} ms, p99 {:.1} ms, {} not visible in 10 s",
            visible.p50_ms, visible.p99_ms, visible.lost
        ),
        target: Some((
            "p50 ≤ 5 ms, p99 ≤ 50 ms".into(),
            visible.p50_ms <= 5.0 && visible.p99_ms <= 50.0 && visible.lost == 0,
        )),
    });
    rows.push(Row {
        what: format!(
            "data Redis CPU per list page, prefix matching none of {} keys ({} pages)",
            listing.keys, listing.pages
        ),
        value: format!(
            "{:.2} ms (a full page of 1,000 keys: {:.2} ms; index {:.0} B per key)",
            listing.nomatch_ms, listing.full_page_ms, listing.index_bytes_per_key
        ),
        target: Some(("≤ 2 ms".into(), listing.nomatch_ms <= 2.0)),
    });
    rows.push(Row {
        what: "peak RSS kvq-api / kvq-worker".into(),
        value: format!("{:.1} MiB / {:.1} MiB", rss.0, rss.1),
        target: Some(("≤ 64 MiB each".into(), rss.0 <= 64.0 && rss.1 <= 64.0)),
    });
    let (baseline, after, per_100k, all_applied) = memory;
    rows.push(Row {
        what: format!("queue Redis memory {RETENTION_SECONDS} s after the jobs finished"),
        value: format!(
            "{:.1} MiB → {:.1} MiB: {per_100k:.1} MiB per 100k jobs{}",
            baseline as f64 / 1_048_576.0,
            after as f64 / 1_048_576.0,
            if all_applied {
                ""
            } else {
                " (not all applied)"
            }
        ),
        target: Some((
            "back to baseline (≤ 1 MiB per 100k)".into(),
            per_100k <= 1.0 && all_applied,
        )),
    });
    rows
}

/// The write path's rows: accepted, drained, end to end, the batch API,
/// each as a ratio to redis-benchmark SET, and the CPU per applied write.
fn write_rows(redis_set: &Load, writes: &WritePath) -> Vec<Row> {
    let set = |rate: f64| ratio(rate, redis_set.rps);
    let not_all = |complete: bool| {
        if complete {
            ""
        } else {
            ", NOT all applied within 120 s"
        }
    };
    let accept = &writes.accept;
    let mut rows = vec![Row {
        what: "kvq writes accepted, 202 (50 connections)".into(),
        value: format!(
            "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} x redis SET, {} errors",
            accept.rps,
            accept.p50_ms,
            accept.p99_ms,
            set(accept.rps),
            accept.errors
        ),
        target: Some((
            "≥ 0.25 x redis SET".into(),
            set(accept.rps) >= 0.25 && accept.errors == 0,
        )),
    }];
    let drain = &writes.drain;
    rows.push(Row {
        what: format!(
            "a backlog of {} writes (those accepted) drained by 2 workers started at once",
            drain.writes
        ),
        value: format!(
            "{:.0}/s, {:.2} x redis SET (the first applied after {:.0} ms){}",
            drain.applied_per_s,
            set(drain.applied_per_s),
            drain.first_applied_ms,
            not_all(drain.complete)
        ),
        target: Some((
            "≥ 0.3 x redis SET".into(),
            drain.complete && set(drain.applied_per_s) >= 0.3,
        )),
    });
    for (i, burst) in writes.bursts.iter().enumerate() {
        let workers = i + 1;
        rows.push(Row {
            what: format!(
                "applied writes end to end, {workers} worker(s), burst of {}",
                burst.writes
            ),
            value: format!(
                "{:.0}/s, {:.2} x redis SET (accepted at {:.0}/s){}",
                burst.applied_per_s,
                set(burst.applied_per_s),
                burst.accepted_per_s,
                not_all(burst.complete)
            ),
            target: (workers == 2).then(|| {
                (
                    "≥ 0.25 x redis SET with 2 workers".into(),
                    burst.complete && set(burst.applied_per_s) >= 0.25,
                )
            }),
        });
    }
    match &writes.batched {
        Some((batched, _)) => rows.push(Row {
            what: format!(
                "writes through the batch API, applied, 2 workers ({} clients, batches of {} upserts, {} writes)",
                batched.clients, batched.size, batched.writes
            ),
            value: format!(
                "{:.0}/s, {:.2} x redis SET (accepted at {:.0}/s, {} batches not accepted){}",
                batched.applied_per_s,
                set(batched.applied_per_s),
                batched.accepted_per_s,
                batched.errors,
                not_all(batched.complete)
            ),
            target: Some((
                "≥ 1.0 x redis SET".into(),
                batched.complete && batched.errors == 0 && set(batched.applied_per_s) >= 1.0,
            )),
        }),
        None => rows.push(Row {
            what: "writes through the batch API, applied, 2 workers".into(),
            value: "not measured: this kvq-api has no POST /v1/batch".into(),
            target: None,
        }),
    }
    rows.push(Row {
        what: "workers still running after the bursts".into(),
        value: format!("{} of {}", writes.alive, writes.bursts.len()),
        target: None,
    });
    let cpu = "CPU per applied write, all kvq processes and Redis";
    // The same CPU in units of what one redis-benchmark SET cost Redis in
    // this run (the scaling rows' yardstick), which moves with the machine
    // less than µs do.
    let sets = |split: &tools::CpuSplit| match redis_set.server_cpu_us {
        Some(us) if us > 0.0 => format!(" = {:.1} SETs' worth", split.total() / us),
        _ => String::new(),
    };
    rows.push(Row {
        what: format!("{cpu}: end to end, 2 workers"),
        value: format!("{}{}", writes.burst_cpu.describe(), sets(&writes.burst_cpu)),
        target: Some(("≤ 80 µs".into(), writes.burst_cpu.total() <= 80.0)),
    });
    let with_accept = drain.accept_cpu.plus(&drain.cpu);
    rows.push(Row {
        what: format!("{cpu}: the drain (and with the accept of its backlog)"),
        value: format!(
            "{}{}; with its accept {}{}",
            drain.cpu.describe(),
            sets(&drain.cpu),
            with_accept.describe(),
            sets(&with_accept)
        ),
        target: None,
    });
    if let Some((_, batch_cpu)) = &writes.batched {
        rows.push(Row {
            what: format!("{cpu}: the batch API"),
            value: format!("{}{}", batch_cpu.describe(), sets(batch_cpu)),
            target: None,
        });
    }
    rows
}

fn chart(
    redis_get: &Load,
    redis_set: &Load,
    kvq_get: &Load,
    writes: &WritePath,
    visible: &load::Visibility,
    scaling: &[scaling::Run],
) -> String {
    let per_s = |label: &str, value: f64, reference: bool| Bar {
        label: label.into(),
        value,
        text: format!("{value:.0}/s"),
        reference,
    };
    let ms = |label: &str, value: f64, reference: bool| Bar {
        label: label.into(),
        value,
        text: format!("{value:.2} ms"),
        reference,
    };
    let mut throughput = vec![
        per_s("redis GET", redis_get.rps, true),
        per_s("kvq GET", kvq_get.rps, false),
        per_s("redis SET", redis_set.rps, true),
        per_s("kvq writes accepted", writes.accept.rps, false),
        per_s(
            "kvq backlog drained, 2 w",
            writes.drain.applied_per_s,
            false,
        ),
    ];
    for (i, burst) in writes.bursts.iter().enumerate() {
        throughput.push(per_s(
            &format!("kvq applied, {} worker(s)", i + 1),
            burst.applied_per_s,
            false,
        ));
    }
    if let Some((batched, _)) = &writes.batched {
        throughput.push(per_s(
            "kvq batch API applied, 2 w",
            batched.applied_per_s,
            false,
        ));
    }
    let latency = vec![
        ms("redis GET p50", redis_get.p50_ms, true),
        ms("kvq GET p50", kvq_get.p50_ms, false),
        ms("redis GET p99", redis_get.p99_ms, true),
        ms("kvq GET p99", kvq_get.p99_ms, false),
        ms("kvq accept p99", writes.accept.p99_ms, false),
        ms("write→visible p50", visible.p50_ms, false),
        ms("write→visible p99", visible.p99_ms, false),
    ];
    report::chart(
        "kvq vs redis-benchmark, same machine, one run",
        &[
            ("throughput (higher is better)", throughput),
            ("latency (lower is better)", latency),
            (
                "applied writes/s: workers, Redis Cluster, WAIT",
                scaling::bars(scaling),
            ),
        ],
    )
}
