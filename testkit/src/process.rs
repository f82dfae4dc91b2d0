//! A running `kvq-api` or `kvq-worker` binary.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::eventually;

/// Where the kvq binaries are: `$KVQ_BIN_DIR`, else beside the running
/// executable or one folder up (a test binary lives in `target/<profile>/deps`;
/// `cargo test --workspace` builds both binaries into `target/<profile>`).
pub fn bin_path(name: &str) -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("KVQ_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().skip(1).take(2).map(PathBuf::from).collect()
        }
    };
    candidates
        .iter()
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not in {candidates:?}: run `cargo build --workspace --bins` (or set KVQ_BIN_DIR)"
            )
        })
}

/// Captured lines, and whether the stream has ended.
#[derive(Clone, Default)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    ended: Arc<AtomicBool>,
}

impl Lines {
    fn get(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// A kvq process with its stdout and stderr lines captured; killed on drop.
pub struct KvqProcess {
    child: Option<Child>,
    name: String,
    stdout: Lines,
    stderr: Lines,
}

fn capture(stream: impl Read + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lines.lock().unwrap().push(line);
        }
        sink.ended.store(true, Ordering::SeqCst);
    });
    lines
}

impl KvqProcess {
    /// Starts binary `name` (`kvq-api` or `kvq-worker`) with `env` on top of
    /// a clean environment (no inherited `KVQ_*`), logging JSON.
    pub fn spawn(name: &str, env: &[(String, String)]) -> Self {
        Self::spawn_with_args(name, &[], env)
    }

    /// Like [`KvqProcess::spawn`], with command-line arguments.
    pub fn spawn_with_args(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        let mut cmd = Command::new(bin_path(name));
        cmd.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KVQ_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.env("KVQ_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = capture(child.stdout.take().unwrap());
        let stderr = capture(child.stderr.take().unwrap());
        Self {
            child: Some(child),
            name: name.to_owned(),
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap()
    }

    /// Every stdout line so far.
    pub fn logs(&self) -> Vec<String> {
        self.stdout.get()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.get()
    }

    /// Waits for a stdout line containing `needle` and returns it parsed as
    /// JSON.
    pub async fn wait_for_log(&self, needle: &str, deadline: Duration) -> serde_json::Value {
        let what = format!("{} to log {needle:?}", self.name);
        eventually(deadline, &what, || async {
            self.logs()
                .iter()
                .find(|line| line.contains(needle))
                .and_then(|line| serde_json::from_str(line).ok())
        })
        .await
    }

    /// Sends a signal: `"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`.
    pub fn signal(&self, signal: &str) {
        crate::signal(self.pid(), signal);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits for the process to exit and for its output to be read to the
    /// end, panicking after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        let child = self.child.as_mut().unwrap();
        let status = eventually(deadline, &what, || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
        let (out, err) = (self.stdout.ended.clone(), self.stderr.ended.clone());
        eventually(deadline, "the output to be read", || {
            let ended = out.load(Ordering::SeqCst) && err.load(Ordering::SeqCst);
            async move { ended.then_some(()) }
        })
        .await;
        status
    }
}

impl Drop for KvqProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let out = self.logs();
            let err = self.stderr();
            eprintln!("---- last log lines of {} ----", self.name);
            for line in out.iter().rev().take(40).rev().chain(err.iter()) {
                eprintln!("{line}");
            }
        }
    }
}
