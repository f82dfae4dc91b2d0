//! Memory per request is bounded: the worst write bodies, many at once, are
//! all answered (202, 413, or 503 with `Retry-After`), never with a reset
//! connection, and the API's peak resident memory stays far below its pod
//! limit (256 Mi).

use kvq_testkit::Stack;
use kvq_testkit::flood;

/// The API's peak resident set (`VmHWM`) must stay under this, KiB.
const PEAK_RSS_LIMIT_KIB: u64 = 128 * 1024;

/// Bodies of each shape sent at once.
const CONCURRENT: usize = 50;

/// The default value limit.
const VALUE_LIMIT: usize = 1_048_576;

fn addr(stack: &Stack) -> String {
    stack.base().trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn the_worst_bodies_at_once_are_answered_within_bounded_memory() {
    let mut stack = Stack::builder().workers(0).start().await;
    let addr = addr(&stack);
    let pid = stack.api().pid();
    let mut report = Vec::new();
    for shape in flood::worst_shapes() {
        let answers = flood::flood(&addr, &shape, CONCURRENT, VALUE_LIMIT).await;
        let mut counts = std::collections::BTreeMap::new();
        for answer in &answers {
            let answer = answer
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: a transport error: {e}", shape.name));
            let allowed: &[u16] = if shape.acceptable {
                &[202, 503]
            } else {
                &[413, 503]
            };
            assert!(
                allowed.contains(&answer.status),
                "{}: {} {}",
                shape.name,
                answer.status,
                answer.body
            );
            if answer.status == 503 {
                assert!(answer.header("retry-after").is_some(), "{}", answer.head);
            }
            *counts.entry(answer.status).or_insert(0) += 1;
        }
        let peak = flood::vm_kib(pid, "VmHWM").unwrap_or_default();
        report.push(format!(
            "{}: {counts:?}, peak RSS so far {} MiB",
            shape.name,
            peak / 1024
        ));
    }
    let peak = flood::vm_kib(pid, "VmHWM").unwrap_or_default();
    eprintln!("{}", report.join("\n"));
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "kvq-api peaked at {} MiB:\n{}",
        peak / 1024,
        report.join("\n")
    );
}
