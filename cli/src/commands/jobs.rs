//! `job`, `wait`, `dead` and `retry`: jobs, through `/v1/jobs`.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::args::{DeadArgs, JobArgs, RetryArgs, WaitArgs};
use crate::client::{Client, query_value};
use crate::error::CliError;
use crate::model::{Accepted, Job, JobPage, JobStatus};
use crate::output::line;

/// The first nap between two polls of a job; it doubles up to
/// [`MAX_POLL_NAP`].
const FIRST_POLL_NAP: Duration = Duration::from_millis(20);

/// The longest nap between two polls of a job.
const MAX_POLL_NAP: Duration = Duration::from_millis(500);

/// Dead letters asked per request.
const DEAD_PAGE: u64 = 1_000;

/// `/v1/jobs/{id}`.
pub fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", query_value(id))
}

/// `kvq job ID`: the job, field by field, or with `--json` as the API
/// answered it. Exit 0 whatever its status.
pub async fn job(client: &Client, args: JobArgs) -> Result<(), CliError> {
    let (job, raw): (Job, String) = client.get_json(&job_path(&args.id)).await?;
    if args.json {
        return line(raw.trim_end());
    }
    for field in describe(&job) {
        line(&field)?;
    }
    Ok(())
}

/// `kvq wait ID`: polls the job until it is final, then reports it as
/// [`conclude`] does.
pub async fn wait(client: &Client, args: WaitArgs) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let (job, raw) = poll_until_final(client, &args.id, deadline).await?;
    conclude(&job, &raw, args.json)
}

/// Polls job `id` until it is final, or fails with
/// [`CliError::WaitRanOut`] at `deadline`. A transient failure (no answer,
/// a 503) is polled through; the last one is returned if the deadline
/// comes first.
pub async fn poll_until_final(
    client: &Client,
    id: &str,
    deadline: Instant,
) -> Result<(Job, String), CliError> {
    let started = Instant::now();
    let path = job_path(id);
    let mut nap = FIRST_POLL_NAP;
    loop {
        // Where the job stands, or the transient failure that hid it.
        let seen = match client.get_json::<Job>(&path).await {
            Ok((job, raw)) if job.status.is_final() => return Ok((job, raw)),
            Ok((job, _)) => Ok(job.status),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => return Err(e),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(match seen {
                Ok(status) => CliError::WaitRanOut {
                    id: id.to_owned(),
                    status: status.as_str().to_owned(),
                    waited: started.elapsed(),
                },
                Err(e) => e,
            });
        }
        tokio::time::sleep(nap.min(left)).await;
        nap = (nap * 2).min(MAX_POLL_NAP);
    }
}

/// Reports a final job: on stdout its outcome (`created KEY, version N`)
/// or with `json` its record; a failed or dead job is an error (exit 1 or
/// 3).
pub fn conclude(job: &Job, raw: &str, json: bool) -> Result<(), CliError> {
    if json {
        line(raw.trim_end())?;
    }
    let (code, message) = job
        .error
        .as_ref()
        .map(|e| (e.code.clone(), e.message.clone()))
        .unwrap_or_default();
    match job.status {
        JobStatus::Failed => Err(CliError::JobFailed {
            id: job.id.clone(),
            code,
            message,
        }),
        JobStatus::Dead => Err(CliError::JobDead {
            id: job.id.clone(),
            code,
            message,
        }),
        _ if json => Ok(()),
        _ => match &job.result {
            Some(result) => line(&format!(
                "{} {}, version {}",
                result.outcome, job.key, result.version
            )),
            None => line(&format!("{} {}", job.status.as_str(), job.key)),
        },
    }
}

/// A job's fields, one a line, for people.
fn describe(job: &Job) -> Vec<String> {
    let mut fields = vec![
        ("id", Some(job.id.clone())),
        ("status", Some(job.status.as_str().to_owned())),
        ("op", Some(job.op.clone())),
        ("key", Some(job.key.clone())),
        ("seq", job.seq.map(|s| s.to_string())),
        ("attempts", job.attempts.map(|a| a.to_string())),
        (
            "result",
            job.result
                .as_ref()
                .map(|r| format!("{}, version {}", r.outcome, r.version)),
        ),
        (
            "error",
            job.error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.message)),
        ),
        ("enqueued", job.enqueued_at.clone()),
        ("started", job.started_at.clone()),
        ("finished", job.finished_at.clone()),
        ("request", job.request_id.clone()),
    ];
    fields.retain(|(_, value)| value.is_some());
    fields
        .into_iter()
        .map(|(name, value)| format!("{name:<10}{}", value.unwrap_or_default()))
        .collect()
}

/// `kvq dead`: every dead letter, oldest first, one a line (`--json`: its
/// record).
pub async fn dead(client: &Client, args: DeadArgs) -> Result<(), CliError> {
    let mut printed: u64 = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/jobs?status=dead&limit={DEAD_PAGE}");
        if let Some(cursor) = &cursor {
            path.push_str("&cursor=");
            path.push_str(&query_value(cursor));
        }
        let (page, _): (JobPage, String) = client.get_json(&path).await?;
        for raw in page.jobs {
            if args.limit.is_some_and(|limit| printed >= limit) {
                return Ok(());
            }
            if args.json {
                line(raw.get())?;
            } else {
                let job: Job = serde_json::from_str(raw.get()).map_err(|e| {
                    CliError::Unexpected(format!("a dead letter is not what kvq expects: {e}"))
                })?;
                let error = job.error.as_ref().map_or("-", |e| e.code.as_str());
                let died = job.finished_at.as_deref().unwrap_or("-");
                line(&format!(
                    "{}\t{}\t{}\t{}\t{}",
                    job.id, job.op, error, died, job.key
                ))?;
            }
            printed += 1;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// `kvq retry ID`: queues a dead job again; prints its id, or with
/// `--wait` its outcome.
pub async fn retry(client: &Client, args: RetryArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let path = format!("{}/retry", job_path(&args.id));
    let response = client.send(client.request(Method::POST, &path)).await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(client.check(response).await.err().unwrap_or_else(|| {
            CliError::Unexpected("the retry was answered without queueing the job".into())
        }));
    }
    let (accepted, text): (Accepted, String) = client.body(response).await?;
    match args.wait {
        None if args.json => line(text.trim_end()),
        None => line(&accepted.job_id),
        Some(wait) => {
            let deadline = started + Duration::from_secs(wait);
            let (job, raw) = poll_until_final(client, &accepted.job_id, deadline).await?;
            conclude(&job, &raw, args.json)
        }
    }
}
