//! `kvq`, the command-line client of kvq: reads and writes keys, follows
//! jobs, lists dead letters, shows the queue, and imports and exports key
//! sets as JSON lines, all through kvq's HTTP API (`KVQ_URL`, with the
//! bearer token `KVQ_TOKEN`). Every failure maps to a documented exit code
//! (see [`error`]).
//!
//! # Layout
//! - [`args`]: the command line (clap), with every help text.
//! - [`client`]: the HTTP client, key paths, answers turned into bodies or
//!   errors.
//! - [`model`]: the API's answers as kvq reads them.
//! - [`commands`]: one module per group of subcommands: `kv` (get, put,
//!   delete, list), `jobs` (job, wait, dead, retry), `stats`, `transfer`
//!   (import, export).
//! - [`output`]: stdout lines, and progress on stderr.
//! - [`error`]: failures and their exit codes.

pub mod args;
pub mod client;
pub mod commands;
pub mod error;
pub mod model;
pub mod output;

pub use args::Cli;
pub use commands::run;
pub use error::CliError;
