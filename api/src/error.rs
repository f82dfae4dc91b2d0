//! The API's errors, each rendered as RFC 9457 `application/problem+json`
//! with a stable machine `code`.
//!
//! Internal causes (Redis errors) are logged with their whole chain and never
//! put in a response.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use kvq_shared::StoreError;
use kvq_shared::error::chain;
use serde::Serialize;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The key is empty, too long, not UTF-8 or has control characters.
    #[error("{0}")]
    InvalidKey(String),
    /// The body is not JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// The body is JSON but not the expected shape or out of range.
    #[error("{0}")]
    InvalidBody(String),
    /// A query parameter or header is malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is not declared as JSON.
    #[error("send the body as JSON with Content-Type: application/json")]
    UnsupportedMediaType,
    /// The body is compressed (`Content-Encoding` other than `identity`).
    #[error("send the body uncompressed: no Content-Encoding (or identity)")]
    UnsupportedEncoding,
    /// A job waited for with `Prefer: wait` ended `dead`: the write was
    /// queued, its retries ran out, and it is a dead letter.
    #[error(
        "{message}; the job {job_id} is a dead letter: POST /v1/jobs/{job_id}/retry queues it again"
    )]
    JobDead {
        /// The job.
        job_id: String,
        /// The job's error message.
        message: String,
    },
    /// The value (or the whole body) is larger than allowed.
    #[error("{0}")]
    ValueTooLarge(String),
    /// No such key, job or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method.
    #[error("method not allowed on this path")]
    MethodNotAllowed {
        /// The methods the path answers (`GET, PUT`), for the `Allow` header.
        allow: String,
    },
    /// No valid bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the role the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// A job waited for with `Prefer: wait` ended without applying.
    #[error("{message}")]
    JobFailed {
        /// 404, 409, 412 or 503.
        status: StatusCode,
        /// The job's error code.
        code: kvq_shared::jobs::ErrorCode,
        /// The job's error message.
        message: String,
    },
    /// The request's headers are larger than allowed.
    #[error("the request carries {0} bytes of headers; the limit is {limit}", limit = crate::limits::MAX_HEADER_BYTES)]
    HeadersTooLarge(usize),
    /// The client did not send the request body within the client timeout.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// `POST /v1/jobs/{id}/retry` of a job that is not dead.
    #[error("{0}")]
    NotDead(String),
    /// The client's rate limit is used up; retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// The `Idempotency-Key` was used before, by this caller on this route,
    /// for a different request.
    #[error(
        "this Idempotency-Key was used for a different request; use a new key for a new request"
    )]
    IdempotencyKeyReused,
    /// The queue Redis did not answer in time, and kvq could not learn
    /// whether the write was queued; or it queued the write but fewer
    /// replicas than `KVQ_QUEUE_REDIS_WAIT_REPLICAS` confirmed it.
    #[error(
        "the queue did not answer in time, or did not confirm the write on enough replicas: the write may or may not apply; retry with the same Idempotency-Key to complete it exactly once"
    )]
    OutcomeUnknown(#[source] StoreError),
    /// The process holds as many request bodies as
    /// `KVQ_MAX_BODY_BYTES_IN_FLIGHT` allows; nothing was read or queued.
    #[error("{0}")]
    Overloaded(String),
    /// A Redis the request needs did not answer.
    #[error("a backend is unavailable, retry later")]
    BackendUnavailable(#[source] StoreError),
    /// One part of a batch's body is bad (`POST /v1/batch`): the error it
    /// would get on its own, and where it is, as a JSON Pointer into the
    /// body (`/writes/17/key`), which the problem's `pointer` member and
    /// its `detail` carry.
    #[error("{pointer}: {error}")]
    InBatch {
        /// Where in the body, e.g. `/writes/17/key`.
        pointer: String,
        /// What is wrong there.
        error: Box<ApiError>,
    },
}

impl ApiError {
    /// The stable machine code.
    pub fn code(&self) -> &str {
        match self {
            ApiError::InBatch { error, .. } => error.code(),
            ApiError::JobFailed { code, .. } => code.as_str(),
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidKey(_) => "invalid_key",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding => {
                "unsupported_media_type"
            }
            ApiError::ValueTooLarge(_) => "value_too_large",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::NotDead(_) => "job_not_dead",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::BackendUnavailable(_) => "backend_unavailable",
            ApiError::OutcomeUnknown(_) => "outcome_unknown",
            ApiError::JobDead { .. } => "job_dead",
        }
    }

    fn title(&self) -> &str {
        match self {
            ApiError::InBatch { error, .. } => error.title(),
            ApiError::InvalidKey(_) => "Invalid key",
            ApiError::MalformedJson(_) => "Malformed JSON",
            ApiError::InvalidBody(_) => "Invalid request body",
            ApiError::InvalidRequest(_) => "Invalid request",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding => {
                "Unsupported media type"
            }
            ApiError::ValueTooLarge(_) => "Value too large",
            ApiError::NotFound(_) => "Not found",
            ApiError::MethodNotAllowed { .. } => "Method not allowed",
            ApiError::IdempotencyKeyReused => "Idempotency-Key reused",
            ApiError::NotDead(_) => "Job not dead",
            ApiError::RequestTimeout => "Request timeout",
            ApiError::HeadersTooLarge(_) => "Request headers too large",
            ApiError::RateLimited(_) => "Too many requests",
            ApiError::Unauthorized(_) => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::JobFailed { code, .. } => job_error_title(*code),
            ApiError::Overloaded(_) => "Overloaded",
            ApiError::BackendUnavailable(_) => "Backend unavailable",
            ApiError::OutcomeUnknown(_) => "Outcome unknown",
            ApiError::JobDead { .. } => "Job dead",
        }
    }
}

/// The title of a job's error code: the same as the title of the problem
/// type of that code answered directly (one title per problem type).
fn job_error_title(code: kvq_shared::jobs::ErrorCode) -> &'static str {
    use kvq_shared::jobs::ErrorCode;
    match code {
        ErrorCode::AlreadyExists => "Already exists",
        ErrorCode::NotFound => "Not found",
        ErrorCode::VersionMismatch => "Version mismatch",
        ErrorCode::BackendUnavailable => "Backend unavailable",
    }
}

/// The RFC 9457 body of every error (`application/problem+json`).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "type": "urn:kvq:problem:not_found",
    "title": "Not found",
    "status": 404,
    "detail": "no key \"users/42/name\"",
    "code": "not_found"
}))]
pub struct Problem<'a> {
    /// `urn:kvq:problem:<code>`.
    pub r#type: String,
    /// A short summary of the kind of problem.
    pub title: &'a str,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The stable machine code: `invalid_key`, `not_found`, ...
    pub code: &'a str,
    /// Where in the request body the problem is, as a JSON Pointer
    /// (RFC 6901), for a batch's bad write: `/writes/17/key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "/writes/17/key")]
    pub pointer: Option<&'a str>,
}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u64 = 1;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InBatch { error, .. } => error.status_code(),
            ApiError::InvalidKey(_) | ApiError::MalformedJson(_) | ApiError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::InvalidBody(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::ValueTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotDead(_) => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::JobFailed { status, .. } => *status,
            ApiError::Overloaded(_)
            | ApiError::BackendUnavailable(_)
            | ApiError::OutcomeUnknown(_)
            | ApiError::JobDead { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::BackendUnavailable(cause) | ApiError::OutcomeUnknown(cause) = self {
            tracing::error!(error = %chain(cause), "backend unavailable");
        }
        let problem = Problem {
            r#type: format!("urn:kvq:problem:{}", self.code()),
            title: self.title(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: self.code(),
            pointer: match self {
                ApiError::InBatch { pointer, .. } => Some(pointer),
                _ => None,
            },
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if matches!(self, ApiError::RequestTimeout) {
            // The rest of the body may still be on its way: start afresh.
            response.force_close();
        }
        if let ApiError::MethodNotAllowed { allow } = self
            && let Ok(value) = HeaderValue::from_str(allow)
        {
            response.insert_header((header::ALLOW, value));
        }
        if matches!(self, ApiError::UnsupportedEncoding) {
            // RFC 7694: the encodings the server takes.
            response.insert_header((header::ACCEPT_ENCODING, "identity"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        let retry_after = match self {
            ApiError::RateLimited(seconds) => Some(*seconds),
            // Repeating the request would not help: the job is a dead letter.
            ApiError::JobDead { .. } => None,
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        response.json(problem)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use kvq_shared::jobs::ErrorCode;

    use super::*;

    /// One of every variant (and every job error code).
    fn every_error() -> Vec<ApiError> {
        let text = || "x".to_owned();
        let mut all = vec![
            ApiError::InvalidKey(text()),
            ApiError::MalformedJson(text()),
            ApiError::InvalidBody(text()),
            ApiError::InvalidRequest(text()),
            ApiError::UnsupportedMediaType,
            ApiError::UnsupportedEncoding,
            ApiError::JobDead {
                job_id: text(),
                message: text(),
            },
            ApiError::ValueTooLarge(text()),
            ApiError::NotFound(text()),
            ApiError::MethodNotAllowed { allow: text() },
            ApiError::Unauthorized(text()),
            ApiError::Forbidden(text()),
            ApiError::HeadersTooLarge(1),
            ApiError::RequestTimeout,
            ApiError::NotDead(text()),
            ApiError::IdempotencyKeyReused,
            ApiError::RateLimited(1),
            ApiError::Overloaded(text()),
            ApiError::BackendUnavailable(StoreError::Timeout(Duration::from_secs(1))),
            ApiError::OutcomeUnknown(StoreError::Timeout(Duration::from_secs(1))),
        ];
        for (code, status) in [
            (ErrorCode::AlreadyExists, StatusCode::CONFLICT),
            (ErrorCode::NotFound, StatusCode::NOT_FOUND),
            (ErrorCode::VersionMismatch, StatusCode::PRECONDITION_FAILED),
            (
                ErrorCode::BackendUnavailable,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ] {
            all.push(ApiError::JobFailed {
                status,
                code,
                message: text(),
            });
        }
        all
    }

    #[test]
    fn each_problem_type_has_one_title() {
        let mut titles: HashMap<String, &str> = HashMap::new();
        let errors = every_error();
        for error in &errors {
            let (code, title) = (error.code().to_owned(), error.title());
            if let Some(seen) = titles.insert(code.clone(), title) {
                assert_eq!(seen, title, "the problem type {code} has two titles");
            }
        }
        assert_eq!(titles["not_found"], "Not found");
    }
}
