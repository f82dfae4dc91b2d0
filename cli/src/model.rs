//! The API's answers as kvq reads them: only the members it uses, so an
//! API that adds members keeps working with an older `kvq`.

use serde::Deserialize;
use serde_json::value::RawValue;

/// `GET /v1/kv/{key}`'s 200 body.
#[derive(Debug, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, as stored.
    pub value: Box<RawValue>,
    /// The key's version (its ETag).
    pub version: u64,
    /// RFC 3339, or `null` without a TTL.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// `GET /v1/kv`'s 200 body.
#[derive(Debug, Deserialize)]
pub struct KeyPage {
    /// Keys, sorted.
    pub keys: Vec<String>,
    /// The next page's cursor; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A write's 202 body.
#[derive(Debug, Deserialize)]
pub struct Accepted {
    /// The job's id.
    pub job_id: String,
}

/// `POST /v1/batch`'s 202 body.
#[derive(Debug, Deserialize)]
pub struct BatchAccepted {
    /// One job per write, in order.
    pub jobs: Vec<Accepted>,
}

/// `POST /v1/batch`'s 200 body, with `Prefer: wait`.
#[derive(Debug, Deserialize)]
pub struct BatchOutcome {
    /// One final job per write, in order.
    pub jobs: Vec<Job>,
}

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// Being retried.
    Running,
    /// Applied.
    Succeeded,
    /// Ended by a business outcome (`already_exists`, `not_found`,
    /// `version_mismatch`).
    Failed,
    /// Its retries ran out: a dead letter.
    Dead,
    /// A status this `kvq` does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// Whether the job will not change any more (until a retry).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Dead)
    }

    /// The API's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Unknown => "unknown",
        }
    }
}

/// `GET /v1/jobs/{id}`'s 200 body.
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    /// The job id.
    pub id: String,
    /// `create`, `update`, `upsert` or `delete`.
    pub op: String,
    /// The key.
    pub key: String,
    /// The write's place in its key's order.
    #[serde(default)]
    pub seq: Option<u64>,
    /// Where it is.
    pub status: JobStatus,
    /// How many times a worker started it.
    #[serde(default)]
    pub attempts: Option<u64>,
    /// Once succeeded.
    #[serde(default)]
    pub result: Option<JobResult>,
    /// Once failed or dead.
    #[serde(default)]
    pub error: Option<JobError>,
    /// RFC 3339.
    #[serde(default)]
    pub enqueued_at: Option<String>,
    /// RFC 3339, once started.
    #[serde(default)]
    pub started_at: Option<String>,
    /// RFC 3339, once final.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// The request that queued it.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// A succeeded job's result.
#[derive(Debug, Clone, Deserialize)]
pub struct JobResult {
    /// `created`, `updated` or `deleted`.
    pub outcome: String,
    /// The key's version after the write.
    pub version: u64,
}

/// A failed or dead job's error.
#[derive(Debug, Clone, Deserialize)]
pub struct JobError {
    /// `already_exists`, `not_found`, `version_mismatch`,
    /// `backend_unavailable`.
    pub code: String,
    /// What happened.
    #[serde(default)]
    pub message: String,
}

/// `GET /v1/jobs?status=dead`'s 200 body.
#[derive(Debug, Deserialize)]
pub struct JobPage {
    /// Dead jobs, oldest first.
    pub jobs: Vec<Box<RawValue>>,
    /// The next page's cursor; `null` on the last page.
    pub next_cursor: Option<String>,
}
