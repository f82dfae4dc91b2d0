//! HTTP limits beyond actix-web's own (at most 96 headers, a 128 KiB request
//! head, `client_request_timeout` for the head):
//!
//! - a deadline for request bodies: actix-web does not bound the time a
//!   client takes to send one, so a client could trickle a body a byte a
//!   minute and hold its connection and the handler's buffer for ever. Every
//!   body gets `KVQ_HTTP_CLIENT_TIMEOUT_MS` from the moment its head
//!   arrived; past that, reading it fails, and the request gets 408
//!   `request_timeout`;
//! - at most [`MAX_HEADER_BYTES`] of headers (431 `headers_too_large`), room
//!   for any real bearer token with plenty to spare.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::HttpMessage;
use actix_web::ResponseError;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use futures::Stream;

use crate::error::ApiError;

/// The most bytes of header names and values one request may carry.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How long a client may take to send a request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// Refuses oversized headers, and puts the deadline on the body of every
/// request that has one.
pub async fn middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        // An answer, not an error, so that the layers outside (request id,
        // metrics) see it as they see any other.
        let (request, _) = req.into_parts();
        let response = ApiError::HeadersTooLarge(header_bytes).error_response();
        return Ok(ServiceResponse::new(request, response).map_into_right_body());
    }
    if let Some(timeout) = req.app_data::<web::Data<BodyTimeout>>()
        && has_body(&req)
    {
        let deadline = tokio::time::sleep(timeout.0);
        let payload = req.take_payload();
        req.set_payload(Payload::from(Box::pin(Deadline {
            payload,
            deadline: Box::pin(deadline),
        })
            as Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>));
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Whether the request announces a body (GETs, the bulk of the traffic, do
/// not, and pay nothing).
fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// Whether a body read failed because its deadline passed.
pub fn is_timeout(error: &PayloadError) -> bool {
    matches!(error, PayloadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

/// A body stream that fails once its deadline has passed.
struct Deadline {
    payload: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = Pin::new(&mut self.payload).poll_next(cx) {
            return Poll::Ready(item);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive in time",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }
}
