//! `kvq-api`: kvq's HTTP API.
//!
//! Writes are validated and queued, with their job record, by one script on
//! the queue Redis, which gives each its place in its key's order (`seq`);
//! the answer is `202 Accepted` with the job's location. Reads go straight to the KV Redis, retried with backoff.
//! Every error is RFC 9457 problem JSON with a stable `code`.
//!
//! # Layout
//! - [`startup`]: [`startup::Application`] builds the server (listener bound
//!   first, so tests use port 0) and runs it.
//! - [`state`]: [`state::AppState`], what every handler shares.
//! - [`writes`]: the write pipeline every write route shares: accept,
//!   `Idempotency-Key`, and the answer (`202`, or `Prefer: wait`'s).
//! - [`routes`]: one module per resource: `kv`, `jobs`, `stats`, `health`,
//!   `legacy` (the original service's routes), and `ui` (the web dashboard
//!   at `/ui`, its files in `api/ui/`).
//! - [`stats`]: the queue's figures as `GET /v1/stats` shows them, and the
//!   write rates worked out from them.
//! - [`auth`]: bearer tokens, roles, token minting; it also applies
//!   [`rate_limit`].
//! - [`caller`]: who sent a request (token subject or peer address).
//! - [`limits`]: header size and the deadline for request bodies.
//! - [`body`]: write bodies, read within the body limit and the
//!   process-wide budget of body bytes in flight.
//! - [`value`]: a write's value checked and made compact without a tree.
//! - [`error`]: [`error::ApiError`] and its problem JSON.
//! - [`metrics`]: Prometheus metrics and `GET /metrics`.
//! - [`request_id`]: the request id middleware.
//! - [`openapi`]: the OpenAPI document, served at `/openapi.json`.
//! - [`wait`]: `Prefer: wait`, woken by workers' job notices.
//! - [`refresh`]: readings shared per process and taken at most once per
//!   interval, which keep the open routes' Redis cost bounded.

pub mod auth;
pub mod body;
pub mod caller;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod rate_limit;
pub mod refresh;
pub mod request_id;
pub mod routes;
pub mod startup;
pub mod state;
pub mod stats;
pub mod value;
pub mod wait;
pub mod writes;
