//! The command line: every subcommand, flag and environment variable, with
//! the help text `kvq --help` and `kvq COMMAND --help` print.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The longest `Prefer: wait` the API honours, in seconds.
pub const MAX_SERVER_WAIT_SECONDS: u64 = 30;

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  not found or conflict: 404, 409 (already_exists, job_not_dead),
     412 (version_mismatch), a job that ended failed
  2  usage: bad arguments or input, and requests the API refused as
     invalid (400, 413, 415, 422, 431)
  3  unavailable: no connection, a timeout, 408, 429, 502, 503, 504,
     a job that ended dead, a wait that ran out
  4  not allowed: 401 (no token or a bad one), 403 (a token without the role)
  5  anything else: another status, an answer kvq cannot read";

const ENVIRONMENT: &str = "\
Environment:
  KVQ_URL     the API's base URL (default http://127.0.0.1:8080, where
              ./deploy.sh --local serves); --url wins
  KVQ_TOKEN   the bearer token (./deploy.sh prints one); --token wins
  SSL_CERT_FILE, SSL_CERT_DIR
              CAs trusted for https:// URLs instead of the system's";

/// `kvq --help`'s closing text.
const MAIN_AFTER_HELP: &str = "\
Examples:
  export KVQ_TOKEN=...                      # as ./deploy.sh --local prints it
  kvq put users/42/name '{\"first\":\"Ada\"}' --wait
  kvq put greeting hello --string           # stores the JSON string \"hello\"
  kvq get users/42/name                     # {\"first\":\"Ada\"}
  kvq get users/42/name --json              # key, value, version, updated_at, expires_at
  kvq put users/42/name '\"Ada L.\"' --if-match 1 --wait
  kvq list users/
  kvq delete users/42/name
  kvq export users/ -o users.jsonl && kvq import users.jsonl

Every command is one or more requests to the HTTP API (/v1); `kvq COMMAND
--help` says which. Errors print the problem's title and code on stderr.";

/// kvq's command-line client: reads and writes keys, follows jobs, imports
/// and exports key sets, all through kvq's HTTP API.
#[derive(Debug, Parser)]
#[command(
    name = "kvq",
    version,
    about = "kvq's command-line client: read and write keys, follow jobs, import and export, over kvq's HTTP API",
    after_help = format!("{EXIT_CODES}\n\n{ENVIRONMENT}\n\n{MAIN_AFTER_HELP}"),
    max_term_width = 100
)]
pub struct Cli {
    /// Connection settings, for every command.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command takes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection (every command)")]
pub struct Global {
    /// The API's base URL.
    #[arg(
        long,
        env = "KVQ_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080",
        global = true,
        value_name = "URL"
    )]
    pub url: String,
    /// Bearer token sent with every request (a JWT with the role the
    /// command needs: reader for reads, writer for writes, admin for dead
    /// letters, retry and stats).
    #[arg(
        long,
        env = "KVQ_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// How long one HTTP request may take, in seconds, before kvq gives up
    /// on it (exit 3). Must exceed the 30 s a waited write may be held.
    #[arg(long, default_value_t = 60, global = true, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a key's value.
    #[command(after_help = with_codes(
        "Request: GET /v1/kv/KEY. Exit 1 if the key does not exist.

Examples:
  kvq get users/42/name           # {\"first\":\"Ada\"}
  kvq get greeting --raw          # hello (a string value without its quotes)
  kvq get users/42/name --json    # {\"key\":...,\"value\":...,\"version\":1,\"updated_at\":...,\"expires_at\":null}"
    ))]
    Get(GetArgs),
    /// Write a key (create or update); queued, applied by a worker.
    #[command(after_help = with_codes(
        "Request: PUT /v1/kv/KEY?upsert=true {value, ttl_seconds}; with --create
POST /v1/kv; with --update or --if-match, PUT without upsert. --if-match
sends If-Match, --wait sends Prefer: wait.

Without --wait, kvq prints the job id once the write is queued (exit 0);
`kvq wait ID` follows it. With --wait, kvq prints the outcome
(`created KEY, version N`) once the write is applied, and exits 1 if it
failed (already_exists, not_found, version_mismatch).

Examples:
  kvq put users/42/name '{\"first\":\"Ada\"}'   # prints the job id
  kvq put counter 1 --create --wait            # created counter, version 1
  kvq put counter 2 --if-match 1 --wait        # exit 1 unless counter is at version 1
  kvq put session/9 '\"x\"' --ttl 30m
  kvq put greeting hello --string
  cat doc.json | kvq put docs/1 -"
    ))]
    Put(PutArgs),
    /// Delete a key; queued, applied by a worker.
    #[command(after_help = with_codes(
        "Request: DELETE /v1/kv/KEY (If-Match with --if-match, Prefer: wait with
--wait). Prints the job id, or with --wait the outcome; the job fails
not_found if the key does not exist (exit 1 with --wait).

Examples:
  kvq delete users/42/name
  kvq delete users/42/name --if-match 3 --wait"
    ))]
    Delete(DeleteArgs),
    /// List keys by prefix, one a line, sorted; follows every page.
    #[command(after_help = with_codes(
        "Requests: GET /v1/kv?prefix=PREFIX&limit=N&cursor=..., page after page,
until next_cursor is null.

Examples:
  kvq list users/
  kvq list                    # every key
  kvq list users/ --limit 10  # the first ten"
    ))]
    List(ListArgs),
    /// Show a job's status.
    #[command(after_help = with_codes(
        "Request: GET /v1/jobs/ID. Exit 0 whatever the job's status (exit 1 if
there is no such job); `kvq wait ID` exits by the outcome.

Examples:
  kvq job 0199c1d2-...
  kvq job 0199c1d2-... --json"
    ))]
    Job(JobArgs),
    /// Wait until a job is final, print it, exit by its outcome.
    #[command(after_help = with_codes(
        "Requests: GET /v1/jobs/ID until its status is succeeded, failed or dead.
Exit 0 if it succeeded, 1 if it failed, 3 if it is dead or still not
final when --timeout runs out.

Examples:
  id=$(kvq put users/1 '{}') && kvq wait \"$id\""
    ))]
    Wait(WaitArgs),
    /// List the dead letters: jobs whose retries ran out (admin).
    #[command(after_help = with_codes(
        "Requests: GET /v1/jobs?status=dead&limit=1000&cursor=..., page after page.
Prints one job a line: id, op, key, error code, when it died.

Examples:
  kvq dead
  kvq dead --json | jq -r .id | xargs -n1 kvq retry"
    ))]
    Dead(DeadArgs),
    /// Queue a dead job again, under its own id (admin).
    #[command(after_help = with_codes(
        "Request: POST /v1/jobs/ID/retry. Prints the job id (or with --wait the
outcome). Exit 1 if the job does not exist or is not dead (job_not_dead).

Examples:
  kvq retry 0199c1d2-... --wait"
    ))]
    Retry(RetryArgs),
    /// Show the queue: depth and lag per partition, jobs by status, workers,
    /// rates (admin).
    #[command(after_help = with_codes(
        "Request: GET /v1/stats.

Examples:
  kvq stats
  kvq stats --json | jq '.partitions[] | select(.lag_seconds > 1)'"
    ))]
    Stats(StatsArgs),
    /// Write keys from a JSON lines file, through the batch API.
    #[command(after_help = with_codes(
        "Input: one JSON object a line (blank lines are skipped):
  {\"key\": \"users/1\", \"value\": {\"name\": \"Ada\"}}
  {\"key\": \"users/2\", \"value\": 2, \"ttl_seconds\": 3600}
`key` and `value` (any JSON) are required; `ttl_seconds` (1 to 31536000)
is optional. `kvq export` writes this format.

Requests: POST /v1/batch with up to 1,000 writes each (op upsert, or create
with --create), one batch after the other, so a key written twice in the
file ends with its last line. Each batch carries its own Idempotency-Key:
a batch that got no answer or a 503 is sent again with the same key for up
to --retry-for seconds, and applies exactly once. Unless --no-wait, each
batch is sent with Prefer: wait and kvq goes on once its writes are
applied.

A line that is not such an object stops the import there (exit 2); the
lines before it are imported. Writes that fail (already_exists with
--create) are listed on stderr and make the exit code 1.

Progress goes to stderr: a bar on a terminal, otherwise a line at most
every second. The summary goes to stdout.

Examples:
  kvq import users.jsonl
  kvq export users/ | kvq --url https://kvq.example.com import -"
    ))]
    Import(ImportArgs),
    /// Write every key under a prefix as JSON lines.
    #[command(after_help = with_codes(
        "Output: one JSON object a line, sorted by key, in the format `kvq import`
reads:
  {\"key\":\"users/1\",\"value\":{\"name\":\"Ada\"}}
  {\"key\":\"users/2\",\"value\":2,\"ttl_seconds\":3593}
`ttl_seconds` (the time left, rounded up) only for keys that expire.
Values are written as stored, digits and escapes included.

Requests: GET /v1/kv?prefix=... page after page, and GET /v1/kv/KEY for
each key (16 at a time). A key deleted between the two is left out.
Progress goes to stderr: a bar on a terminal, otherwise a line at most
every second.

Examples:
  kvq export users/ > users.jsonl
  kvq export '' -o everything.jsonl"
    ))]
    Export(ExportArgs),
}

/// `after_help` of a subcommand: its own text, then the exit codes.
fn with_codes(text: &str) -> String {
    format!("{text}\n\n{EXIT_CODES}\n\n{ENVIRONMENT}")
}

/// `kvq get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The key (may contain `/` and any UTF-8).
    pub key: String,
    /// Print the whole entry as JSON: key, value, version, updated_at,
    /// expires_at.
    #[arg(long, conflicts_with = "raw")]
    pub json: bool,
    /// Print a string value as its text, without quotes or escapes (other
    /// values print as JSON).
    #[arg(long, short)]
    pub raw: bool,
}

/// How long to wait for a write's outcome.
#[derive(Debug, Args)]
pub struct WaitFlag {
    /// Wait until the write is applied (at most SECONDS, default 30) and
    /// print its outcome; exit 1 if it failed. Without it, kvq prints the
    /// job id once the write is queued.
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "30",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub wait: Option<u64>,
    /// Print the answer as JSON: the queued job, or with --wait the final
    /// job record.
    #[arg(long)]
    pub json: bool,
    /// Send this Idempotency-Key: repeating the command with the same key
    /// within 24 h queues nothing more and prints the first job.
    #[arg(long, value_name = "TOKEN")]
    pub idempotency_key: Option<String>,
}

impl WaitFlag {
    /// The wait asked for, if any.
    pub fn duration(&self) -> Option<Duration> {
        self.wait.map(Duration::from_secs)
    }
}

/// `kvq put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key (may contain `/` and any UTF-8).
    pub key: String,
    /// The value, as JSON (`42`, `'{"a":1}'`, `'"text"'`); with --string,
    /// any text. `-` or absent: read it from stdin.
    pub value: Option<String>,
    /// Store VALUE as a JSON string, as given (from stdin: less one
    /// trailing newline).
    #[arg(long, short)]
    pub string: bool,
    /// Create only: the write fails already_exists if the key exists.
    #[arg(long, conflicts_with_all = ["update", "if_match"])]
    pub create: bool,
    /// Update only: the write fails not_found if the key does not exist.
    #[arg(long)]
    pub update: bool,
    /// Apply only if the key is at this version (its ETag); else the write
    /// fails version_mismatch.
    #[arg(long, value_name = "VERSION")]
    pub if_match: Option<u64>,
    /// Expire the key after this long: seconds, or 90s, 30m, 12h, 7d (at
    /// most a year). Without it the key does not expire (an update clears
    /// an earlier TTL).
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<u64>,
    /// Waiting, output and idempotency.
    #[command(flatten)]
    pub write: WaitFlag,
}

/// `kvq delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The key.
    pub key: String,
    /// Delete only if the key is at this version; else the write fails
    /// version_mismatch.
    #[arg(long, value_name = "VERSION")]
    pub if_match: Option<u64>,
    /// Waiting, output and idempotency.
    #[command(flatten)]
    pub write: WaitFlag,
}

/// `kvq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys starting with this (empty or absent: every key).
    #[arg(default_value = "")]
    pub prefix: String,
    /// Stop after this many keys.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Keys asked per request (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: u16,
}

/// `kvq job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id (a write's answer, or `kvq put`'s output).
    pub id: String,
    /// Print the job record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kvq wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The job id.
    pub id: String,
    /// Give up after this many seconds (exit 3).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
    /// Print the final job record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kvq dead`.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Print each dead job's record as a JSON line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many jobs.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

/// `kvq retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The dead job's id.
    pub id: String,
    /// Wait until the job is final (at most SECONDS, default 30) and print
    /// it; exit 1 if it failed, 3 if it died again.
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "30",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub wait: Option<u64>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kvq stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print the answer as the API gave it (JSON).
    #[arg(long)]
    pub json: bool,
}

/// `kvq import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The JSON lines file; `-` reads stdin.
    pub file: PathBuf,
    /// Create only: a key that exists makes its write fail already_exists
    /// (listed, exit 1); the others are written.
    #[arg(long)]
    pub create: bool,
    /// Go on as soon as a batch is queued, without waiting for it to be
    /// applied (the summary then counts queued writes only).
    #[arg(long)]
    pub no_wait: bool,
    /// Writes per batch (1 to 1000). A batch also ends before 4 MiB of
    /// body.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
    /// How long to keep sending a batch that got no answer or a 503 (the
    /// same Idempotency-Key each time), in seconds; then exit 3.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub retry_for: u64,
}

/// `kvq export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only keys starting with this (empty or absent: every key).
    #[arg(default_value = "")]
    pub prefix: String,
    /// Where to write; `-` is stdout.
    #[arg(long, short, value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
}

/// A TTL: whole seconds, or a number with `s`, `m`, `h` or `d`; 1 s to
/// a year.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration such as 90, 90s, 30m, 12h or 7d"
            ));
        }
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a duration such as 90, 90s, 30m, 12h or 7d"))?;
    if !(1..=31_536_000).contains(&seconds) {
        return Err(format!(
            "a TTL is 1 second to a year (31536000 s); {text} is {seconds} s"
        ));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ttls_take_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1_800));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("366d").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn wait_takes_an_optional_value_only_after_an_equals_sign() {
        let cli = Cli::try_parse_from(["kvq", "put", "--wait", "k", "1"]).expect("parses");
        let Command::Put(put) = cli.command else {
            panic!("not put")
        };
        assert_eq!(put.write.wait, Some(30));
        assert_eq!(put.key, "k");
        assert_eq!(put.value.as_deref(), Some("1"));
        let cli = Cli::try_parse_from(["kvq", "put", "k", "1", "--wait=5"]).expect("parses");
        let Command::Put(put) = cli.command else {
            panic!("not put")
        };
        assert_eq!(put.write.wait, Some(5));
    }
}
