//! kvq-cli's integration tests: the real `kvq` binary against real stacks
//! (redis-server processes, the `kvq-api` and `kvq-worker` binaries), its
//! output and exit codes checked as a user's shell would see them.

#![allow(clippy::unwrap_used)]

mod errors;
mod help;
mod jobs;
mod kv;
mod transfer;

use std::process::Stdio;

use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// What a run of `kvq` showed.
#[derive(Debug)]
pub struct Run {
    /// The exit code.
    pub code: i32,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Run {
    /// Stdout's lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Fails unless the run exited 0.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "kvq failed: {self:?}");
        self
    }
}

/// Runs `kvq ARGS` against `stack` (`KVQ_URL` set to it, no token).
pub async fn kvq(stack: &Stack, args: &[&str]) -> Run {
    kvq_with(&[("KVQ_URL", stack.base())], args, None).await
}

/// Runs `kvq ARGS` with `env` on top of an environment without any
/// `KVQ_*` variable, feeding it `stdin` if given.
pub async fn kvq_with(env: &[(&str, &str)], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvq"));
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("KVQ_") {
            command.env_remove(key);
        }
    }
    command
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("kvq starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("a stdin pipe");
        pipe.write_all(input).await.expect("kvq reads its stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        child.wait_with_output(),
    )
    .await
    .expect("kvq finishes within 3 minutes")
    .expect("kvq runs");
    Run {
        code: output
            .status
            .code()
            .expect("kvq exits, not killed by a signal"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Writes `keys` (each with the value `i`) through the batch API and
/// waits until they are applied.
pub async fn seed(stack: &Stack, keys: &[String]) {
    for chunk in keys.chunks(1_000) {
        let writes: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, key)| json!({"op": "upsert", "key": key, "value": i}))
            .collect();
        let response = stack
            .request(Method::POST, "/v1/batch")
            .header("Prefer", "wait=30")
            .json(&json!({ "writes": writes }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the seed batch was applied");
    }
}
