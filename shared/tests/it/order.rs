//! One worker: each key's jobs run one at a time in accept order; a failing
//! job holds back its own key only; deferrals do not count as attempts;
//! a job out of attempts is dropped and its key goes on; final jobs are
//! committed and trimmed out of the streams.

use std::time::Duration;

use tokio::sync::watch;

use crate::{DEADLINE, Ended, Plan, Queue, Queued, assert_exactly_once_in_order, jitter, wait_for};

/// A lease no test here outlives: ownership never moves by expiry, so
/// every job runs exactly once.
const LONG_LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn each_keys_jobs_run_once_in_order_one_at_a_time_under_concurrency() {
    let q = Queue::start(8);
    let keys = q.keys("order", 40);
    // Accepted before the worker starts, so that it meets a backlog; more
    // are accepted while it runs.
    let mut jobs = q
        .enqueue_rounds(&keys, 10, |round, i| Plan {
            sleep: Duration::from_millis(jitter(round * 1000 + i, 4)),
            ..Plan::default()
        })
        .await;
    let worker = q.worker("worker-a", q.config(LONG_LEASE), 16);
    jobs.extend(
        q.enqueue_rounds(&keys, 15, |round, i| Plan {
            sleep: Duration::from_millis(jitter(round * 1000 + i + 7, 4)),
            ..Plan::default()
        })
        .await,
    );
    q.wait_succeeded(&jobs).await;
    q.wait_committed().await;
    worker.stop().await;
    assert_eq!(jobs.len(), 1000);
    assert_exactly_once_in_order(&q.log, &jobs);
}

#[tokio::test]
async fn a_failing_job_holds_back_only_its_own_key() {
    let q = Queue::start(8);
    let a = q.keys_in("held", 0, 1).remove(0);
    // Keys beside A in its own partition, and in the others.
    let mut others = q.keys_in("free", 0, 4);
    others.extend(q.keys("free-elsewhere", 24));
    let (open, gate) = watch::channel(false);
    // A's first job fails twice, then its third run waits until every
    // other key's jobs have run: it succeeds only once they all did.
    let a1 = q
        .enqueue(
            &a,
            Plan {
                fail: 2,
                gate: Some(gate),
                ..Plan::default()
            },
        )
        .await;
    let mut a_later = Vec::new();
    let mut b_jobs = Vec::new();
    for round in 0..5 {
        a_later.push(q.enqueue(&a, Plan::default()).await);
        for (i, key) in others.iter().enumerate() {
            let plan = Plan {
                sleep: Duration::from_millis(jitter(round * 100 + i, 3)),
                ..Plan::default()
            };
            b_jobs.push(q.enqueue(key, plan).await);
        }
    }
    let mut config = q.config(LONG_LEASE);
    config.max_attempts = 5;
    let worker = q.worker("worker-a", config, 8);

    q.wait_succeeded(&b_jobs).await;
    // Every other key is done while A's first job is still not: A's later
    // jobs have not run.
    let a1_runs = q.log.runs_of(&a1.id);
    assert!(
        a1_runs.iter().all(|r| r.ended != Some(Ended::Ok)),
        "A's first job succeeded before the other keys ran: {a1_runs:?}"
    );
    for job in &a_later {
        assert_eq!(q.log.runs_of(&job.id).len(), 0, "A's later job ran early");
    }

    open.send(true).unwrap();
    let mut all = vec![a1.clone()];
    all.extend(a_later.iter().cloned());
    q.wait_succeeded(&all).await;
    q.wait_committed().await;
    worker.stop().await;

    assert_eq!(q.log.gate_timeouts(), Vec::<String>::new());
    let ended: Vec<Option<Ended>> = q.log.runs_of(&a1.id).iter().map(|r| r.ended).collect();
    assert_eq!(
        ended,
        [Some(Ended::Failed), Some(Ended::Failed), Some(Ended::Ok)],
        "A's first job: two failures, retried in place, then success"
    );
    // A's later jobs in order after it, and once each; the others too.
    all.extend(b_jobs);
    assert_order_with_retries(&q, &all);
}

#[tokio::test]
async fn deferrals_do_not_count_as_attempts() {
    let q = Queue::start(4);
    let key = "deferred";
    // Five deferrals and one failure, with two attempts allowed: only the
    // failure counts, so the third kind of run (success) still comes.
    let first = q
        .enqueue(
            key,
            Plan {
                defer: 5,
                fail: 1,
                ..Plan::default()
            },
        )
        .await;
    let second = q.enqueue(key, Plan::default()).await;
    let mut config = q.config(LONG_LEASE);
    config.max_attempts = 2;
    let worker = q.worker("worker-a", config, 4);
    q.wait_succeeded(&[first.clone(), second.clone()]).await;
    q.wait_committed().await;
    worker.stop().await;

    let ended: Vec<Ended> = q
        .log
        .runs_of(&first.id)
        .iter()
        .map(|r| r.ended.unwrap())
        .collect();
    let mut expected = vec![Ended::Deferred; 5];
    expected.extend([Ended::Failed, Ended::Ok]);
    assert_eq!(ended, expected);
    assert_order_with_retries(&q, &[first, second]);
}

#[tokio::test]
async fn a_job_out_of_attempts_is_dropped_and_its_key_goes_on() {
    let q = Queue::start(4);
    let key = "doomed";
    let doomed = q
        .enqueue(
            key,
            Plan {
                fail_always: true,
                ..Plan::default()
            },
        )
        .await;
    let later = vec![
        q.enqueue(key, Plan::default()).await,
        q.enqueue(key, Plan::default()).await,
    ];
    let mut config = q.config(LONG_LEASE);
    config.max_attempts = 3;
    let worker = q.worker("worker-a", config.clone(), 4);
    q.wait_succeeded(&later).await;
    q.wait_committed().await;
    worker.stop().await;

    let runs = q.log.runs_of(&doomed.id);
    assert_eq!(runs.len(), 3, "max_attempts runs, then dropped: {runs:?}");
    assert!(runs.iter().all(|r| r.ended == Some(Ended::Failed)));
    let mut all = vec![doomed.clone()];
    all.extend(later);
    assert_order_with_retries(&q, &all);

    // The drop was committed: another worker never runs the job again.
    let next = q.enqueue(key, Plan::default()).await;
    let worker = q.worker("worker-b", config, 4);
    q.wait_succeeded(std::slice::from_ref(&next)).await;
    q.wait_committed().await;
    worker.stop().await;
    assert_eq!(q.log.runs_of(&doomed.id).len(), 3);
}

#[tokio::test]
async fn final_jobs_are_committed_and_trimmed_out_of_the_streams() {
    let q = Queue::start(8);
    let keys = q.keys("trim", 24);
    let mut jobs = q
        .enqueue_rounds(&keys, 5, |round, i| Plan {
            // Some retries and deferrals among them.
            fail: u32::from(jitter(round * 100 + i, 5) == 0),
            defer: u32::from(jitter(round * 100 + i + 1, 7) == 0),
            ..Plan::default()
        })
        .await;
    let config = q.config(LONG_LEASE);
    let worker = q.worker("worker-a", config.clone(), 8);
    q.wait_succeeded(&jobs).await;
    assert_committed_to_the_last(&q, &jobs).await;

    // A new owner starts after `done`: nothing final runs again.
    worker.stop().await;
    let more = q.enqueue_rounds(&keys, 2, |_, _| Plan::default()).await;
    let worker = q.worker("worker-b", config, 8);
    q.wait_succeeded(&more).await;
    jobs.extend(more);
    assert_committed_to_the_last(&q, &jobs).await;
    worker.stop().await;
    assert_order_with_retries(&q, &jobs);
}

/// Every stream is empty and every partition's `done` is its last job's
/// stream id.
async fn assert_committed_to_the_last(q: &Queue, jobs: &[Queued]) {
    wait_for(DEADLINE, "every stream trimmed to its last job", || {
        (0..q.partitions)
            .all(|p| {
                let last = jobs
                    .iter()
                    .filter(|j| j.partition == p)
                    .map(|j| j.seq)
                    .max();
                q.xlen(p) == 0 && q.done(p) == last.map(|seq| format!("{seq}-0"))
            })
            .then_some(())
    })
    .await;
}

/// Each key's runs in accept order, a job's retries before its key's next
/// job, never two runs of a key at once, and each job's last run ended it
/// (succeeded, or failed on its last attempt); no job ran after it ended.
fn assert_order_with_retries(q: &Queue, jobs: &[Queued]) {
    assert_eq!(q.log.overlaps(), vec![], "a key ran two jobs at once");
    let runs = q.log.runs();
    for (key, queued) in crate::by_key(jobs) {
        let ran: Vec<&str> = runs
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.job.as_str())
            .collect();
        let mut expected: Vec<&str> = Vec::new();
        for job in &queued {
            let n = runs.iter().filter(|r| r.job == job.id).count();
            assert!(n >= 1, "job {} of {key} never ran", job.id);
            expected.extend(std::iter::repeat_n(job.id.as_str(), n));
            let own: Vec<Option<Ended>> = runs
                .iter()
                .filter(|r| r.job == job.id)
                .map(|r| r.ended)
                .collect();
            assert!(
                own[..n - 1]
                    .iter()
                    .all(|e| matches!(e, Some(Ended::Failed | Ended::Deferred))),
                "job {} ran again after it ended: {own:?}",
                job.id
            );
        }
        assert_eq!(ran, expected, "key {key}: runs out of accept order");
    }
}
