//! Write bodies (`POST /v1/kv`, `PUT /v1/kv/{key}`, and batches,
//! `POST /v1/batch`, within their own larger limit), read within bounds of
//! size and of memory.
//!
//! [`JsonBody`] replaces `web::Json` for the writes. Before it reads a
//! byte it checks the media type (415), the declared `Content-Length`
//! against the body limit (413), and reserves the body's bytes in the
//! process-wide [`BodyBudget`] (`KVQ_MAX_BODY_BYTES_IN_FLIGHT`): when the
//! budget cannot cover it, the answer is 503 `overloaded` with
//! `Retry-After`, rather than more memory. A chunked body
//! is counted and reserved as it arrives, and refused once over the limit.
//!
//! The reservation is held until the handler lets it go: the write
//! pipeline keeps it until the job is queued (or refused), not during a
//! `Prefer: wait`.
//!
//! A body refused before it was read is read and thrown away first (up to
//! [`DRAIN_FACTOR`] times the body limit, within the body deadline), so
//! the client, still sending, is not answered with a reset connection;
//! past that, the answer goes out and the connection is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{FromRequest, HttpMessage, HttpRequest, mime, web};
use futures::future::LocalBoxFuture;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::error::ApiError;

/// A body refused before it was read is read and dropped up to this many
/// times the body limit before the answer goes out.
pub const DRAIN_FACTOR: usize = 4;

/// What a chunked body reserves first; it grows by doubling.
const FIRST_RESERVATION: usize = 64 * 1024;

/// The bytes of request bodies the process holds at once, and the largest
/// body one request may send.
#[derive(Debug)]
pub struct BodyBudget {
    capacity: usize,
    body_limit: usize,
    batch_limit: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `capacity` bytes for bodies of at most `body_limit`
    /// bytes each, and batch bodies ([`BatchBody`]) of at most
    /// `batch_limit`.
    pub fn new(capacity: usize, body_limit: usize, batch_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            body_limit,
            batch_limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget, bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest body one request may send.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// The largest batch body (`POST /v1/batch`).
    pub fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.capacity)
            })
            .is_ok()
    }

    /// Reserves `bytes`, or `None` if the budget cannot cover them.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.take(bytes).then(|| Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Bytes of a [`BodyBudget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    /// Reserves `more` bytes on top; `false` if the budget cannot cover
    /// them (the reservation is then unchanged).
    fn grow(&mut self, more: usize) -> bool {
        let taken = self.budget.take(more);
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A whole JSON request body and its reservation in the [`BodyBudget`].
pub struct JsonBody {
    bytes: Vec<u8>,
    reservation: Reservation,
}

impl JsonBody {
    /// The body as `T`, which may borrow from it (a `&RawValue`): 400
    /// `malformed_json` for a body that is not JSON, 422 `invalid_body` for
    /// JSON of the wrong shape.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.bytes).map_err(|e| {
            if e.is_data() {
                ApiError::InvalidBody(e.to_string())
            } else {
                ApiError::MalformedJson(e.to_string())
            }
        })
    }

    /// Drops the bytes and keeps the reservation, for the memory the rest
    /// of the request (the value's copy, the job) takes in its place.
    pub fn into_reservation(self) -> Reservation {
        self.reservation
    }
}

impl FromRequest for JsonBody {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move { read(&req, payload, BodyBudget::body_limit).await })
    }
}

/// A batch's whole JSON body (`POST /v1/batch`), read as [`JsonBody`] is
/// but within the batch body limit ([`BodyBudget::batch_limit`]).
pub struct BatchBody(pub JsonBody);

impl FromRequest for BatchBody {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move {
            read(&req, payload, BodyBudget::batch_limit)
                .await
                .map(BatchBody)
        })
    }
}

/// Whether the request declares a JSON body: `application/json` or any
/// `+json` type, as actix-web's `Json` accepts.
fn is_json(req: &HttpRequest) -> bool {
    matches!(req.mime_type(), Ok(Some(mime))
        if mime.subtype() == mime::JSON || mime.suffix() == Some(mime::JSON))
}

/// Reads a body of at most `limit(budget)` bytes.
async fn read(
    req: &HttpRequest,
    mut payload: Payload,
    limit: fn(&BodyBudget) -> usize,
) -> Result<JsonBody, ApiError> {
    let Some(budget) = req.app_data::<web::Data<BodyBudget>>() else {
        return Err(ApiError::Overloaded("no body budget is set up".into()));
    };
    let budget = budget.clone().into_inner();
    let limit = limit(&budget);
    let drain_cap = limit.saturating_mul(DRAIN_FACTOR);
    if !is_json(req) {
        drain(&mut payload, drain_cap).await;
        return Err(ApiError::UnsupportedMediaType);
    }
    // A compressed body's length says nothing of what it inflates to, and
    // an inflater hands over whole inflated chunks (a 128 KiB gzip chunk
    // can be 100+ MiB) before any limit sees them: write bodies are taken
    // as sent, uncompressed, only.
    if req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        drain(&mut payload, drain_cap).await;
        return Err(ApiError::UnsupportedEncoding);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(length) = declared
        && length > limit
    {
        if length <= drain_cap {
            drain(&mut payload, drain_cap).await;
        }
        return Err(ApiError::ValueTooLarge(format!(
            "the body is {length} bytes; the limit is {limit}"
        )));
    }
    let first = match declared {
        Some(length) => length,
        None => FIRST_RESERVATION.min(limit),
    };
    let Some(mut reservation) = budget.reserve(first) else {
        drain(&mut payload, drain_cap).await;
        return Err(overloaded());
    };
    let mut bytes: Vec<u8> = Vec::with_capacity(first);
    let mut body = payload;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(payload_error)?;
        let needed = bytes.len() + chunk.len();
        if needed > limit {
            drop(reservation);
            drain(&mut body, drain_cap).await;
            return Err(ApiError::ValueTooLarge(format!(
                "the body is larger than {limit} bytes"
            )));
        }
        if needed > bytes.capacity() {
            let capacity = bytes.capacity().saturating_mul(2).max(needed).min(limit);
            if !reservation.grow(capacity - bytes.capacity()) {
                drop(reservation);
                drain(&mut body, drain_cap).await;
                return Err(overloaded());
            }
            bytes.reserve_exact(capacity - bytes.len());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(JsonBody { bytes, reservation })
}

fn overloaded() -> ApiError {
    ApiError::Overloaded(
        "the API holds as many request bodies as it may at once; retry shortly".into(),
    )
}

fn payload_error(error: PayloadError) -> ApiError {
    match error {
        e if crate::limits::is_timeout(&e) => ApiError::RequestTimeout,
        PayloadError::Overflow => ApiError::ValueTooLarge("the body is too large".into()),
        _ => ApiError::MalformedJson("the body could not be read".into()),
    }
}

/// Reads and drops the rest of a body, up to `cap` bytes, until it ends,
/// fails or its deadline passes.
async fn drain<S>(body: &mut S, cap: usize)
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    let mut read = 0usize;
    while read <= cap {
        match body.next().await {
            Some(Ok(chunk)) => read += chunk.len(),
            Some(Err(_)) | None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_never_overdrawn_and_comes_back_on_drop() {
        let budget = BodyBudget::new(100, 60, 100);
        let first = budget.reserve(60).expect("fits");
        assert!(budget.reserve(41).is_none());
        let mut second = budget.reserve(40).expect("fits");
        assert!(!second.grow(1));
        assert_eq!(budget.in_use(), 100);
        drop(first);
        assert!(second.grow(60));
        assert_eq!(budget.in_use(), 100);
        drop(second);
        assert_eq!(budget.in_use(), 0);
    }
}
