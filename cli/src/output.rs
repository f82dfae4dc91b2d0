//! Writing results to stdout, and progress to stderr: a bar on a terminal,
//! plain lines at most once a second otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::CliError;

/// Writes `text` and a newline to stdout.
pub fn line(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(b"\n"))
        .map_err(|e| CliError::io("stdout", e))
}

/// How often a plain progress line may be printed.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// Progress of a long command (import, export) on stderr.
pub enum Progress {
    /// An `indicatif` bar (stderr is a terminal).
    Bar(ProgressBar),
    /// Plain lines, at most one per [`PLAIN_EVERY`].
    Plain {
        /// The command's name, starting each line.
        name: &'static str,
        /// When the last line was printed.
        last: Option<Instant>,
    },
}

impl Progress {
    /// Progress for command `name`: a bar when stderr is a terminal, over
    /// `total` bytes when known (else a spinner), else plain lines.
    pub fn new(name: &'static str, total_bytes: Option<u64>) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Plain { name, last: None };
        }
        let bar = match total_bytes {
            Some(total) => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            }
            None => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{prefix} {spinner} [{elapsed_precise}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            }
        };
        bar.set_prefix(name);
        Progress::Bar(bar)
    }

    /// Reports `message`, and `position` bytes done (for a bar over bytes).
    pub fn update(&mut self, position: u64, message: &str) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(position);
                bar.set_message(message.to_owned());
            }
            Progress::Plain { name, last } => {
                if last.is_some_and(|at| at.elapsed() < PLAIN_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                eprintln!("kvq {name}: {message}");
            }
        }
    }

    /// Prints `message` on stderr above the bar (or as a line).
    pub fn note(&self, message: &str) {
        match self {
            Progress::Bar(bar) => bar.suspend(|| eprintln!("{message}")),
            Progress::Plain { .. } => eprintln!("{message}"),
        }
    }

    /// Ends the bar (plain progress leaves the summary to the caller).
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
