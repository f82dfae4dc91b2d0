//! `import` and `export`: key sets as JSON lines, one object a line,
//! `{"key": "...", "value": ..., "ttl_seconds": N}` (`ttl_seconds` only
//! for keys that expire).
//!
//! Import sends the lines through `POST /v1/batch`, one batch after the
//! other (so a key's lines apply in the file's order), each with an
//! `Idempotency-Key` of its own: a batch that got no answer or a 503 is
//! sent again with the same key, and the API applies it exactly once.
//! Export lists the keys page by page and reads them, 16 at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::args::{ExportArgs, ImportArgs, MAX_SERVER_WAIT_SECONDS};
use crate::client::{Client, key_path};
use crate::commands::jobs::poll_until_final;
use crate::commands::kv::KeyPages;
use crate::error::CliError;
use crate::model::{BatchAccepted, BatchOutcome, Entry, Job, JobStatus};
use crate::output::{Progress, line};

/// A batch's body stops short of this many bytes (the API takes 16 MiB,
/// from a budget other writers share).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// How long import waits for one batch's writes to be applied once the
/// API's own wait (30 s) ran out; then it stops (exit 3), the writes
/// still queued.
const APPLY_DEADLINE: Duration = Duration::from_secs(300);

/// The first pause before a batch is sent again; it doubles up to
/// [`MAX_RESEND_NAP`].
const FIRST_RESEND_NAP: Duration = Duration::from_millis(200);

/// The longest pause before a batch is sent again.
const MAX_RESEND_NAP: Duration = Duration::from_secs(5);

/// Failed writes listed one by one; beyond, only counted.
const LISTED_FAILURES: usize = 20;

/// Keys export reads at once.
const EXPORT_READS_IN_FLIGHT: usize = 16;

/// The longest TTL the API takes.
const MAX_TTL_SECONDS: u64 = 31_536_000;

/// One line of an import file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    key: String,
    value: Box<RawValue>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// One write of a batch, as the API reads it.
#[derive(Serialize)]
struct BatchWrite<'a> {
    op: &'static str,
    key: &'a str,
    value: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

/// One line of an export file.
#[derive(Serialize)]
struct ExportLine<'a> {
    key: &'a str,
    value: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

/// Writes gathered for one batch.
#[derive(Default)]
struct Batch {
    /// Each write's JSON.
    writes: Vec<String>,
    /// Each write's line number and key.
    lines: Vec<(u64, String)>,
    /// Bytes of the writes' JSON.
    bytes: usize,
}

impl Batch {
    /// The request body of the first `count` writes.
    fn body(&self, count: usize) -> String {
        let mut body = String::with_capacity(self.bytes + count + 16);
        body.push_str("{\"writes\":[");
        for (i, write) in self.writes[..count].iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(write);
        }
        body.push_str("]}");
        body
    }
}

/// What import has done so far.
#[derive(Default)]
struct Tally {
    lines: u64,
    queued: u64,
    succeeded: u64,
    failed: u64,
    dead: u64,
}

impl Tally {
    fn progress(&self, wait: bool) -> String {
        if wait {
            format!(
                "{} lines read, {} applied, {} failed",
                self.lines,
                self.succeeded,
                self.failed + self.dead
            )
        } else {
            format!("{} lines read, {} queued", self.lines, self.queued)
        }
    }
}

/// `kvq import FILE`.
pub async fn import(client: &Client, args: ImportArgs) -> Result<(), CliError> {
    let name = args.file.display().to_string();
    let (mut reader, total): (Box<dyn BufRead>, Option<u64>) = if args.file == Path::new("-") {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let file =
            File::open(&args.file).map_err(|e| CliError::io(format!("opening {name}"), e))?;
        let total = file.metadata().ok().map(|m| m.len());
        (Box::new(BufReader::new(file)), total)
    };
    let op = if args.create { "create" } else { "upsert" };
    let wait = !args.no_wait;
    let mut importer = Importer {
        client,
        wait,
        retry_for: Duration::from_secs(args.retry_for),
        progress: Progress::new("import", total),
        tally: Tally::default(),
        bytes_read: 0,
    };
    let mut batch = Batch::default();
    let mut text = String::new();
    let outcome: Result<(), CliError> = loop {
        text.clear();
        let read = match reader.read_line(&mut text) {
            Ok(read) => read,
            Err(e) => break Err(CliError::io(format!("reading {name}"), e)),
        };
        if read == 0 {
            break importer.send(&mut batch).await;
        }
        importer.bytes_read += read as u64;
        importer.tally.lines += 1;
        let number = importer.tally.lines;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: ImportLine = match serde_json::from_str(text.trim_end()) {
            Ok(parsed) => parsed,
            Err(e) => {
                let bad = CliError::Usage(format!(
                    "{name} line {number}: {e} (each line is {{\"key\": \"...\", \"value\": ..., \"ttl_seconds\": N}}, the last optional)"
                ));
                break importer.send(&mut batch).await.and(Err(bad));
            }
        };
        let write = serde_json::to_string(&BatchWrite {
            op,
            key: &parsed.key,
            value: &parsed.value,
            ttl_seconds: parsed.ttl_seconds,
        })
        .map_err(|e| CliError::Unexpected(format!("line {number}: {e}")))?;
        if !batch.writes.is_empty()
            && batch.bytes + write.len() + 1 > MAX_BATCH_BYTES
            && let Err(e) = importer.send(&mut batch).await
        {
            break Err(e);
        }
        batch.bytes += write.len() + 1;
        batch.writes.push(write);
        batch.lines.push((number, parsed.key));
        if batch.writes.len() >= usize::from(args.batch_size)
            && let Err(e) = importer.send(&mut batch).await
        {
            break Err(e);
        }
    };
    importer.progress.finish();
    let tally = &importer.tally;
    let summary = if wait {
        format!(
            "imported {} writes from {} lines: {} succeeded, {} failed, {} dead",
            tally.succeeded + tally.failed + tally.dead,
            tally.lines,
            tally.succeeded,
            tally.failed,
            tally.dead
        )
    } else {
        format!(
            "queued {} writes from {} lines (not waited for)",
            tally.queued, tally.lines
        )
    };
    line(&summary)?;
    outcome?;
    if tally.dead > 0 || tally.failed > 0 {
        return Err(CliError::Incomplete {
            failed: tally.failed,
            dead: tally.dead,
        });
    }
    Ok(())
}

/// Sends batches and keeps the tally.
struct Importer<'a> {
    client: &'a Client,
    wait: bool,
    retry_for: Duration,
    progress: Progress,
    tally: Tally,
    bytes_read: u64,
}

impl Importer<'_> {
    /// Sends `batch` (if it holds any write) and empties it. A write the
    /// API refuses (its `pointer` names it) stops the import: the writes
    /// before it are sent on their own, and the error names its line.
    async fn send(&mut self, batch: &mut Batch) -> Result<(), CliError> {
        if batch.writes.is_empty() {
            return Ok(());
        }
        let taken = std::mem::take(batch);
        let result = match self.send_writes(&taken, taken.writes.len()).await {
            Err(CliError::Api { status, problem }) => {
                let refused = problem
                    .pointer
                    .as_deref()
                    .and_then(|p| p.strip_prefix("/writes/"))
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|index| index.parse::<usize>().ok())
                    .filter(|&index| index < taken.lines.len());
                let error = CliError::Api {
                    status,
                    problem: problem.clone(),
                };
                match refused {
                    Some(index) => {
                        if index > 0 {
                            self.send_writes(&taken, index).await?;
                        }
                        let (number, key) = &taken.lines[index];
                        Err(CliError::Usage(format!(
                            "line {number} (key {key:?}) refused: {error}"
                        )))
                    }
                    None => Err(error),
                }
            }
            other => other,
        };
        self.progress
            .update(self.bytes_read, &self.tally.progress(self.wait));
        result
    }

    /// Sends the first `count` writes of `batch` as one request, again
    /// with the same `Idempotency-Key` while the answer is transient, and
    /// tallies their outcomes.
    async fn send_writes(&mut self, batch: &Batch, count: usize) -> Result<(), CliError> {
        let body = batch.body(count);
        let idempotency_key = uuid::Uuid::new_v4().to_string();
        let give_up = Instant::now() + self.retry_for;
        let mut nap = FIRST_RESEND_NAP;
        loop {
            let mut request = self
                .client
                .request(Method::POST, "/v1/batch")
                .header(CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", idempotency_key.as_str())
                .body(body.clone());
            if self.wait {
                request = request.header("Prefer", format!("wait={MAX_SERVER_WAIT_SECONDS}"));
            }
            let error = match self.client.send(request).await {
                Ok(response) => match response.status() {
                    StatusCode::OK => {
                        let (outcome, _): (BatchOutcome, String) =
                            self.client.body(response).await?;
                        return self.tally_jobs(batch, outcome.jobs);
                    }
                    StatusCode::ACCEPTED => {
                        let (accepted, _): (BatchAccepted, String) =
                            self.client.body(response).await?;
                        self.tally.queued += accepted.jobs.len() as u64;
                        if !self.wait {
                            return Ok(());
                        }
                        let jobs = self.poll_jobs(&accepted).await?;
                        return self.tally_jobs(batch, jobs);
                    }
                    _ => self.client.problem(response).await,
                },
                Err(error) => error,
            };
            if !error.is_transient() || Instant::now() + nap > give_up {
                return Err(error);
            }
            let (first, last) = (&batch.lines[0].0, &batch.lines[count - 1].0);
            self.progress.note(&format!(
                "kvq import: lines {first}-{last}: {error}; sending them again in {} ms (same Idempotency-Key)",
                nap.as_millis()
            ));
            tokio::time::sleep(nap).await;
            nap = (nap * 2).min(MAX_RESEND_NAP);
        }
    }

    /// Waits for each job of a batch the API did not wait for to the end.
    async fn poll_jobs(&self, accepted: &BatchAccepted) -> Result<Vec<Job>, CliError> {
        let deadline = Instant::now() + APPLY_DEADLINE;
        let mut jobs = Vec::with_capacity(accepted.jobs.len());
        for job in &accepted.jobs {
            let (job, _) = poll_until_final(self.client, &job.job_id, deadline).await?;
            jobs.push(job);
        }
        Ok(jobs)
    }

    /// Counts a batch's final jobs, listing the first failures.
    fn tally_jobs(&mut self, batch: &Batch, jobs: Vec<Job>) -> Result<(), CliError> {
        if jobs.len() > batch.lines.len() {
            return Err(CliError::Unexpected(format!(
                "the API answered {} jobs for a batch of {}",
                jobs.len(),
                batch.lines.len()
            )));
        }
        for (job, (number, key)) in jobs.iter().zip(&batch.lines) {
            match job.status {
                JobStatus::Succeeded => self.tally.succeeded += 1,
                JobStatus::Failed | JobStatus::Dead => {
                    let listed = self.tally.failed + self.tally.dead;
                    if job.status == JobStatus::Failed {
                        self.tally.failed += 1;
                    } else {
                        self.tally.dead += 1;
                    }
                    if listed < LISTED_FAILURES as u64 {
                        let (code, message) = job
                            .error
                            .as_ref()
                            .map(|e| (e.code.as_str(), e.message.as_str()))
                            .unwrap_or(("", ""));
                        self.progress.note(&format!(
                            "kvq import: line {number} (key {key:?}): job {} {}: {code}: {message}",
                            job.id,
                            job.status.as_str()
                        ));
                    }
                }
                _ => {
                    return Err(CliError::Unexpected(format!(
                        "line {number}: the API answered job {} as {} after waiting",
                        job.id,
                        job.status.as_str()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `kvq export [PREFIX]`.
pub async fn export(client: &Client, args: ExportArgs) -> Result<(), CliError> {
    let to_stdout = args.output == Path::new("-");
    let name = if to_stdout {
        "stdout".to_owned()
    } else {
        args.output.display().to_string()
    };
    let sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            File::create(&args.output).map_err(|e| CliError::io(format!("creating {name}"), e))?,
        )
    };
    let mut out = BufWriter::new(sink);
    let mut progress = Progress::new("export", None);
    let mut pages = KeyPages::new(&args.prefix, 1_000);
    let (mut written, mut gone) = (0u64, 0u64);
    let result: Result<(), CliError> = async {
        while let Some(keys) = pages.next(client).await? {
            let mut reads = futures::stream::iter(keys)
                .map(|key| read_entry(client, key))
                .buffered(EXPORT_READS_IN_FLIGHT);
            while let Some(read) = reads.next().await {
                let Some(entry) = read? else {
                    gone += 1;
                    continue;
                };
                let ttl_seconds = match ttl_left(entry.expires_at.as_deref()) {
                    Ok(ttl) => ttl,
                    Err(()) => {
                        gone += 1;
                        continue;
                    }
                };
                let text = serde_json::to_string(&ExportLine {
                    key: &entry.key,
                    value: &entry.value,
                    ttl_seconds,
                })
                .map_err(|e| CliError::Unexpected(format!("key {:?}: {e}", entry.key)))?;
                out.write_all(text.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(|e| CliError::io(format!("writing {name}"), e))?;
                written += 1;
            }
            progress.update(0, &format!("{written} keys written"));
        }
        out.flush()
            .map_err(|e| CliError::io(format!("writing {name}"), e))
    }
    .await;
    progress.finish();
    if !matches!(result, Err(CliError::OutputClosed)) {
        let gone = if gone > 0 {
            format!(" ({gone} listed keys were deleted or expired before they were read)")
        } else {
            String::new()
        };
        eprintln!("kvq export: {written} keys written to {name}{gone}");
    }
    result
}

/// Key `key`'s entry, or `None` if it is gone (deleted or expired since
/// it was listed). A key that cannot be named in a path (`.`, `..`) is
/// an error.
async fn read_entry(client: &Client, key: String) -> Result<Option<Entry>, CliError> {
    let path = key_path(&key)?;
    let response = client.send(client.request(Method::GET, &path)).await?;
    if response.status() == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let response = client.check(response).await?;
    let (entry, _): (Entry, String) = client.body(response).await?;
    Ok(Some(entry))
}

/// The whole seconds left until `expires_at` (rounded up), `None` without
/// one, `Err` if it has passed.
fn ttl_left(expires_at: Option<&str>) -> Result<Option<u64>, ()> {
    let Some(text) = expires_at else {
        return Ok(None);
    };
    let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) else {
        return Ok(None);
    };
    let left = (at - OffsetDateTime::now_utc()).whole_milliseconds();
    if left <= 0 {
        return Err(());
    }
    let seconds = u64::try_from((left + 999) / 1_000).unwrap_or(MAX_TTL_SECONDS);
    Ok(Some(seconds.clamp(1, MAX_TTL_SECONDS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_left_rounds_up_and_drops_the_past() {
        let soon = OffsetDateTime::now_utc() + time::Duration::milliseconds(90_500);
        let text = soon.format(&Rfc3339).expect("formats");
        assert_eq!(ttl_left(Some(&text)), Ok(Some(91)));
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        let text = past.format(&Rfc3339).expect("formats");
        assert_eq!(ttl_left(Some(&text)), Err(()));
        assert_eq!(ttl_left(None), Ok(None));
    }

    #[test]
    fn a_batch_body_holds_its_first_writes() {
        let batch = Batch {
            writes: vec!["{\"a\":1}".into(), "{\"b\":2}".into()],
            lines: vec![(1, "a".into()), (2, "b".into())],
            bytes: 16,
        };
        assert_eq!(batch.body(2), "{\"writes\":[{\"a\":1},{\"b\":2}]}");
        assert_eq!(batch.body(1), "{\"writes\":[{\"a\":1}]}");
    }
}
