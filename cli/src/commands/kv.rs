//! `get`, `put`, `delete` and `list`: keys, through `/v1/kv`.

use std::io::Read;
use std::time::Instant;

use reqwest::header::{CONTENT_LOCATION, ETAG};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::args::{DeleteArgs, GetArgs, ListArgs, MAX_SERVER_WAIT_SECONDS, PutArgs, WaitFlag};
use crate::client::{Client, key_path, query_value};
use crate::commands::jobs::{conclude, poll_until_final};
use crate::error::CliError;
use crate::model::{Accepted, Entry, Job, KeyPage};
use crate::output::line;

/// `kvq get KEY`: the value (as JSON; `--raw`: a string as its text), or
/// with `--json` the whole entry as the API answered it.
pub async fn get(client: &Client, args: GetArgs) -> Result<(), CliError> {
    let path = key_path(&args.key)?;
    let (entry, text): (Entry, String) = client.get_json(&path).await?;
    if args.json {
        return line(text.trim_end());
    }
    if args.raw
        && let Ok(text) = serde_json::from_str::<String>(entry.value.get())
    {
        return line(&text);
    }
    line(entry.value.get())
}

/// `POST /v1/kv`'s body.
#[derive(Serialize)]
struct CreateBody<'a> {
    key: &'a str,
    value: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

/// `PUT /v1/kv/{key}`'s body.
#[derive(Serialize)]
struct UpdateBody<'a> {
    value: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

/// `kvq put KEY [VALUE]`.
pub async fn put(client: &Client, args: PutArgs) -> Result<(), CliError> {
    let path = key_path(&args.key)?;
    let value = value_of(args.value.as_deref(), args.string)?;
    let request = if args.create {
        client.request(Method::POST, "/v1/kv").json(&CreateBody {
            key: &args.key,
            value: &value,
            ttl_seconds: args.ttl,
        })
    } else {
        let path = if args.update || args.if_match.is_some() {
            path
        } else {
            format!("{path}?upsert=true")
        };
        client.request(Method::PUT, &path).json(&UpdateBody {
            value: &value,
            ttl_seconds: args.ttl,
        })
    };
    write(client, request, &args.key, args.if_match, &args.write).await
}

/// `kvq delete KEY`.
pub async fn delete(client: &Client, args: DeleteArgs) -> Result<(), CliError> {
    let path = key_path(&args.key)?;
    let request = client.request(Method::DELETE, &path);
    write(client, request, &args.key, args.if_match, &args.write).await
}

/// Sends a write with its `If-Match`, `Idempotency-Key` and `Prefer: wait`
/// headers, and reports its job (queued) or outcome (waited).
async fn write(
    client: &Client,
    mut request: RequestBuilder,
    key: &str,
    if_match: Option<u64>,
    flags: &WaitFlag,
) -> Result<(), CliError> {
    let started = Instant::now();
    if let Some(version) = if_match {
        request = request.header("If-Match", format!("\"{version}\""));
    }
    if let Some(key) = &flags.idempotency_key {
        request = request.header("Idempotency-Key", key.as_str());
    }
    let wait = flags.duration();
    if let Some(wait) = wait {
        let server_wait = wait.as_secs().min(MAX_SERVER_WAIT_SECONDS);
        request = request.header("Prefer", format!("wait={server_wait}"));
    }
    let response = client.send(request).await?;
    let deadline = wait.map(|wait| started + wait);
    answer(client, response, key, deadline, flags.json).await
}

/// Reports the answer to a write of `key`: a queued job's id (or 202
/// body), or once final, its outcome. `deadline`: wait for the outcome
/// until then.
async fn answer(
    client: &Client,
    response: Response,
    key: &str,
    deadline: Option<Instant>,
    json: bool,
) -> Result<(), CliError> {
    match response.status() {
        StatusCode::ACCEPTED => {
            let (accepted, text): (Accepted, String) = client.body(response).await?;
            match deadline {
                None if json => line(text.trim_end()),
                None => line(&accepted.job_id),
                Some(deadline) => {
                    let (job, raw) = poll_until_final(client, &accepted.job_id, deadline).await?;
                    conclude(&job, &raw, json)
                }
            }
        }
        // A waited write that applied: the job record is the body.
        StatusCode::OK | StatusCode::CREATED => {
            let (job, raw): (Job, String) = client.body(response).await?;
            conclude(&job, &raw, json)
        }
        // A waited delete that applied: no body; the job is named by
        // Content-Location, the new version by the ETag.
        StatusCode::NO_CONTENT => {
            let headers = response.headers();
            let location = headers
                .get(CONTENT_LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let version = headers
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_matches('"').to_owned());
            match (json, location) {
                (true, Some(location)) => {
                    let (job, raw): (Job, String) = client.get_json(&location).await?;
                    conclude(&job, &raw, json)
                }
                _ => line(&format!(
                    "deleted {key}, version {}",
                    version.as_deref().unwrap_or("?")
                )),
            }
        }
        _ => Err(client.problem(response).await),
    }
}

/// The value to write, as JSON text: `text` (or stdin when absent or `-`)
/// checked to be JSON, or with `string` made a JSON string.
fn value_of(text: Option<&str>, string: bool) -> Result<Box<RawValue>, CliError> {
    let text = match text {
        Some(text) if text != "-" => text.to_owned(),
        _ => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|e| CliError::io("reading the value from stdin", e))?;
            if string {
                let trimmed = input
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t));
                if let Some(trimmed) = trimmed {
                    input = trimmed.to_owned();
                }
            }
            input
        }
    };
    if string {
        let json = serde_json::to_string(&text)
            .map_err(|e| CliError::Usage(format!("the value cannot be made JSON: {e}")))?;
        return RawValue::from_string(json)
            .map_err(|e| CliError::Usage(format!("the value cannot be made JSON: {e}")));
    }
    serde_json::from_str::<Box<RawValue>>(text.trim()).map_err(|e| {
        CliError::Usage(format!(
            "the value is not JSON ({e}); to store text as a string, add --string (or quote it: '\"hello\"')"
        ))
    })
}

/// `kvq list [PREFIX]`: every key, page after page.
pub async fn list(client: &Client, args: ListArgs) -> Result<(), CliError> {
    let mut printed: u64 = 0;
    let mut pages = KeyPages::new(&args.prefix, args.page_size);
    while let Some(keys) = pages.next(client).await? {
        for key in keys {
            if args.limit.is_some_and(|limit| printed >= limit) {
                return Ok(());
            }
            line(&key)?;
            printed += 1;
        }
    }
    Ok(())
}

/// The pages of a listing, in order.
pub struct KeyPages {
    prefix: String,
    page_size: u16,
    cursor: Option<String>,
    done: bool,
}

impl KeyPages {
    /// The listing of `prefix`, `page_size` keys a request.
    pub fn new(prefix: &str, page_size: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            page_size,
            cursor: None,
            done: false,
        }
    }

    /// The next page's keys, or `None` once the listing is complete.
    pub async fn next(&mut self, client: &Client) -> Result<Option<Vec<String>>, CliError> {
        if self.done {
            return Ok(None);
        }
        let mut path = format!(
            "/v1/kv?prefix={}&limit={}",
            query_value(&self.prefix),
            self.page_size
        );
        if let Some(cursor) = &self.cursor {
            path.push_str("&cursor=");
            path.push_str(&query_value(cursor));
        }
        let (page, _): (KeyPage, String) = client.get_json(&path).await?;
        match page.next_cursor {
            Some(cursor) => self.cursor = Some(cursor),
            None => self.done = true,
        }
        Ok(Some(page.keys))
    }
}
