//! What a command can fail with, and the exit code each failure gives.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | not found or conflict: 404, 409, 412, a job that ended `failed` |
//! | 2 | usage: bad arguments or input, and requests the API refused as invalid (400, 413, 415, 422, 431) |
//! | 3 | unavailable: no connection, a timeout, 408, 429, 502, 503, 504, a job that ended `dead`, a wait that ran out |
//! | 4 | not allowed: 401, 403 |
//! | 5 | anything else: another status, an answer kvq cannot read |

use std::fmt;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

/// Exit codes (see the module's doc).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Not found or conflict.
    pub const NOT_FOUND_OR_CONFLICT: u8 = 1;
    /// Bad arguments or input.
    pub const USAGE: u8 = 2;
    /// The API or its Redis cannot serve now.
    pub const UNAVAILABLE: u8 = 3;
    /// No token, or one without the role.
    pub const NOT_ALLOWED: u8 = 4;
    /// Anything else.
    pub const OTHER: u8 = 5;
}

/// An RFC 9457 problem, as the API answers errors. Every member is
/// optional: a proxy in front of the API may answer anything.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Problem {
    /// A short summary of the problem type ("Not found").
    #[serde(default)]
    pub title: Option<String>,
    /// kvq's stable machine code (`not_found`, `version_mismatch`, ...).
    #[serde(default)]
    pub code: Option<String>,
    /// What went wrong with this request.
    #[serde(default)]
    pub detail: Option<String>,
    /// In a batch: the JSON Pointer of the write at fault
    /// (`/writes/17/key`).
    #[serde(default)]
    pub pointer: Option<String>,
}

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input, found before or without asking the API.
    #[error("{0}")]
    Usage(String),
    /// The API answered an error status.
    #[error("{}", describe(*.status, .problem))]
    Api {
        /// The status.
        status: StatusCode,
        /// The problem it carried (empty when the body was not one).
        problem: Problem,
    },
    /// No answer: the connection failed or the request timed out.
    #[error("cannot reach kvq at {url}: {why}")]
    Unreachable {
        /// The API's base URL.
        url: String,
        /// What failed (`connection refused`, `timed out`, ...).
        why: String,
    },
    /// A job ended `failed` (a business outcome: `already_exists`,
    /// `not_found`, `version_mismatch`).
    #[error("job {id} failed: {}", code_and_message(.code, .message))]
    JobFailed {
        /// The job.
        id: String,
        /// Its error code.
        code: String,
        /// Its error message.
        message: String,
    },
    /// A job ended `dead`: its retries ran out on Redis errors.
    #[error(
        "job {id} is dead: {}; `kvq retry {id}` queues it again",
        code_and_message(.code, .message)
    )]
    JobDead {
        /// The job.
        id: String,
        /// Its error code.
        code: String,
        /// Its error message.
        message: String,
    },
    /// A job was not final when the wait ran out.
    #[error("job {id} is still {status} after {}s", waited.as_secs())]
    WaitRanOut {
        /// The job.
        id: String,
        /// Its last status (`queued`, `running`).
        status: String,
        /// How long kvq waited.
        waited: Duration,
    },
    /// An import whose writes did not all apply (each is listed on stderr).
    #[error("{failed} writes failed and {dead} died (listed above)")]
    Incomplete {
        /// Writes whose job ended `failed`.
        failed: u64,
        /// Writes whose job ended `dead`.
        dead: u64,
    },
    /// An answer kvq cannot read.
    #[error("{0}")]
    Unexpected(String),
    /// Whoever read stdout stopped reading (`kvq list | head`): not an
    /// error, kvq stops quietly.
    #[error("stdout closed")]
    OutputClosed,
    /// A local file or stream failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl CliError {
    /// The process' exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Api { status, .. } => exit_code_of(*status),
            CliError::Unreachable { .. } | CliError::JobDead { .. } => exit::UNAVAILABLE,
            CliError::WaitRanOut { .. } => exit::UNAVAILABLE,
            CliError::JobFailed { .. } => exit::NOT_FOUND_OR_CONFLICT,
            CliError::Incomplete { dead: 0, .. } => exit::NOT_FOUND_OR_CONFLICT,
            CliError::Incomplete { .. } => exit::UNAVAILABLE,
            CliError::Unexpected(_) => exit::OTHER,
            CliError::Io { .. } => exit::OTHER,
            CliError::OutputClosed => exit::OK,
        }
    }

    /// Whether repeating the same request later may succeed: no answer,
    /// or an answer that says "not now".
    pub fn is_transient(&self) -> bool {
        match self {
            CliError::Unreachable { .. } => true,
            CliError::Api { status, .. } => exit_code_of(*status) == exit::UNAVAILABLE,
            _ => false,
        }
    }

    /// A failure to read or write `what`; a closed pipe on the other end
    /// of the output is [`CliError::OutputClosed`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            return CliError::OutputClosed;
        }
        CliError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The exit code of an error status (see the module's doc).
pub fn exit_code_of(status: StatusCode) -> u8 {
    match status.as_u16() {
        404 | 409 | 412 => exit::NOT_FOUND_OR_CONFLICT,
        400 | 413 | 415 | 422 | 431 => exit::USAGE,
        408 | 429 | 502 | 503 | 504 => exit::UNAVAILABLE,
        401 | 403 => exit::NOT_ALLOWED,
        _ => exit::OTHER,
    }
}

/// `Title (code): detail`, or the status where the problem says nothing.
fn describe(status: StatusCode, problem: &Problem) -> String {
    let title = problem
        .title
        .clone()
        .or_else(|| status.canonical_reason().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let mut text = match &problem.code {
        Some(code) => format!("{title} ({code})"),
        None => format!("{title} (HTTP {})", status.as_u16()),
    };
    if let Some(detail) = &problem.detail {
        text.push_str(": ");
        text.push_str(detail);
    }
    if matches!(status.as_u16(), 401 | 403) {
        text.push_str(hint_for(status));
    }
    text
}

/// What to do about a 401 or 403.
fn hint_for(status: StatusCode) -> &'static str {
    if status == StatusCode::UNAUTHORIZED {
        " (set KVQ_TOKEN or pass --token)"
    } else {
        " (this needs a token with another role)"
    }
}

/// `code: message`, or one of them.
fn code_and_message(code: &str, message: &str) -> String {
    match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.to_owned(),
        _ => message.to_owned(),
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.title.as_deref().unwrap_or("error"),
            self.code.as_deref().unwrap_or("no code")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_exit_codes() {
        for (status, code) in [
            (404, 1),
            (409, 1),
            (412, 1),
            (400, 2),
            (422, 2),
            (413, 2),
            (503, 3),
            (429, 3),
            (401, 4),
            (403, 4),
            (500, 5),
        ] {
            let status = StatusCode::from_u16(status).expect("a status");
            assert_eq!(exit_code_of(status), code, "{status}");
        }
    }

    #[test]
    fn an_api_error_shows_title_code_and_detail() {
        let error = CliError::Api {
            status: StatusCode::PRECONDITION_FAILED,
            problem: Problem {
                title: Some("Version mismatch".into()),
                code: Some("version_mismatch".into()),
                detail: Some("the key is at version 2".into()),
                pointer: None,
            },
        };
        assert_eq!(
            error.to_string(),
            "Version mismatch (version_mismatch): the key is at version 2"
        );
        assert_eq!(error.exit_code(), 1);
    }
}
