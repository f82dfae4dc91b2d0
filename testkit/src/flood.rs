//! Floods of large write bodies over raw HTTP/1.1, and a process's memory
//! from `/proc`: what the memory tests and the benchmark share.
//!
//! Requests are written by hand on their own connection (`Connection:
//! close`), so a test chooses the framing (`Content-Length` or chunked) and
//! sees any transport error (a reset connection, a write cut off) as an
//! error, not as a status.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: <the body's length>`.
    Length,
    /// `Transfer-Encoding: chunked`, 64 KiB chunks.
    Chunked,
}

/// A complete answer, read until the server closed the connection cleanly.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// The head: status line and headers, lower-cased.
    pub head: String,
    /// The body.
    pub body: String,
}

impl RawAnswer {
    /// A header's value, if sent (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// How long one raw request may take before it counts as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(90);

/// Sends `method path` with `body` (as `application/json`) to `addr`
/// (`127.0.0.1:PORT`) on a new connection and reads the answer until the
/// server closes. `Err` describes a transport failure: a refused or reset
/// connection, a write cut off, no complete answer.
pub async fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    framing: Framing,
) -> Result<RawAnswer, String> {
    tokio::time::timeout(
        REQUEST_DEADLINE,
        exchange(addr, method, path, body, framing),
    )
    .await
    .map_err(|_| format!("no answer within {REQUEST_DEADLINE:?}"))?
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    framing: Framing,
) -> Result<RawAnswer, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let framing_header = match framing {
        Framing::Length => format!("content-length: {}", body.len()),
        Framing::Chunked => "transfer-encoding: chunked".to_owned(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: kvq\r\nconnection: close\r\ncontent-type: application/json\r\n{framing_header}\r\n\r\n"
    );
    let write = async {
        writer.write_all(head.as_bytes()).await?;
        match framing {
            Framing::Length => writer.write_all(body).await?,
            Framing::Chunked => {
                for chunk in body.chunks(64 * 1024) {
                    writer
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await?;
                    writer.write_all(chunk).await?;
                    writer.write_all(b"\r\n").await?;
                }
                writer.write_all(b"0\r\n\r\n").await?;
            }
        }
        writer.flush().await
    };
    let read = async {
        let mut answer = Vec::new();
        reader.read_to_end(&mut answer).await.map(|_| answer)
    };
    let (written, answer) = tokio::join!(write, read);
    let answer = answer.map_err(|e| format!("read: {e}"))?;
    written.map_err(|e| format!("write: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok(RawAnswer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

/// One kind of hostile write body.
pub struct Shape {
    /// What it is, for reports.
    pub name: &'static str,
    /// How it is framed.
    pub framing: Framing,
    /// `POST /v1/kv` body for request `i`.
    pub body: fn(usize, usize) -> Vec<u8>,
    /// Whether the API may accept it (else it must be refused 413 or 503).
    pub acceptable: bool,
}

/// `{"key":"<prefix>/<i>","value":<value>}`.
fn create_body(prefix: &str, i: usize, value: &[u8]) -> Vec<u8> {
    let mut body = format!("{{\"key\":\"{prefix}/{i}\",\"value\":").into_bytes();
    body.extend_from_slice(value);
    body.push(b'}');
    body
}

/// `{"0":0,"1":0,…}` of at most `bytes` bytes: the most object members a
/// value of that size can hold.
pub fn object_value(bytes: usize) -> Vec<u8> {
    let mut value = b"{".to_vec();
    let mut n = 0usize;
    loop {
        let member = format!("\"{n}\":0");
        // room for the comma before and the closing brace
        if value.len() + member.len() + 2 > bytes {
            break;
        }
        if n > 0 {
            value.push(b',');
        }
        value.extend_from_slice(member.as_bytes());
        n += 1;
    }
    value.push(b'}');
    value
}

/// `[[],[],…]` of at most `bytes` bytes.
pub fn arrays_value(bytes: usize) -> Vec<u8> {
    let count = bytes.saturating_sub(1) / 3;
    let mut value = Vec::with_capacity(bytes);
    value.push(b'[');
    for n in 0..count {
        if n > 0 {
            value.push(b',');
        }
        value.extend_from_slice(b"[]");
    }
    value.push(b']');
    value
}

/// The worst bodies known for a value limit of `limit` bytes (the API's
/// body limit is `limit` + 64 KiB): values just under the limit with the
/// most elements (objects, arrays), a value over the limit in a body under
/// the body limit, and bodies over the body limit, with and without
/// `Content-Length`.
pub fn worst_shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "{\"0\":0,…} just under the value limit",
            framing: Framing::Length,
            body: |i, limit| create_body("obj", i, &object_value(limit)),
            acceptable: true,
        },
        Shape {
            name: "[[],[],…] just under the value limit",
            framing: Framing::Length,
            body: |i, limit| create_body("arr", i, &arrays_value(limit)),
            acceptable: true,
        },
        Shape {
            name: "{\"0\":0,…} over the value limit, body under the body limit",
            framing: Framing::Length,
            body: |i, limit| create_body("over", i, &object_value(limit + 32 * 1024)),
            acceptable: false,
        },
        Shape {
            name: "[[],[],…] over the body limit, Content-Length",
            framing: Framing::Length,
            body: |i, limit| create_body("big", i, &arrays_value(limit + 128 * 1024)),
            acceptable: false,
        },
        Shape {
            name: "[[],[],…] over the body limit, chunked",
            framing: Framing::Chunked,
            body: |i, limit| create_body("chunked", i, &arrays_value(limit + 128 * 1024)),
            acceptable: false,
        },
    ]
}

/// Sends `n` bodies of `shape` at once as `POST /v1/kv` to `addr`, for a
/// value limit of `limit`; the answers in order.
pub async fn flood(
    addr: &str,
    shape: &Shape,
    n: usize,
    limit: usize,
) -> Vec<Result<RawAnswer, String>> {
    let bodies: Vec<Arc<Vec<u8>>> = (0..n).map(|i| Arc::new((shape.body)(i, limit))).collect();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let addr = addr.to_owned();
            let framing = shape.framing;
            tokio::spawn(async move { raw_request(&addr, "POST", "/v1/kv", &body, framing).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    answers
}

/// A `Vm*` field of `/proc/<pid>/status` (`"VmHWM"`: peak resident set,
/// `"VmRSS"`: resident set now), in KiB.
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
