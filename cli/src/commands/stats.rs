//! `stats`: `GET /v1/stats`, printed as tables (`--json`: as answered).

use serde::Deserialize;

use crate::args::StatsArgs;
use crate::client::Client;
use crate::error::CliError;
use crate::output::line;

/// `GET /v1/stats`'s 200 body. Every member may be missing or `null` (the
/// API leaves out what it cannot have cheaply).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// When the API read the numbers (RFC 3339).
    pub at: Option<String>,
    /// One row per queue partition.
    pub partitions: Vec<Partition>,
    /// Jobs by status.
    pub jobs: Jobs,
    /// The live workers.
    pub workers: Vec<Worker>,
    /// Writes per second.
    pub rates: Rates,
}

/// One queue partition.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Partition {
    /// Its number.
    pub partition: Option<u64>,
    /// Jobs not yet final.
    pub depth: Option<u64>,
    /// Age of the oldest of them, in seconds.
    pub lag_seconds: Option<f64>,
    /// The worker that applies it.
    pub owner: Option<String>,
    /// Its last seq.
    pub accepted_total: Option<u64>,
    /// Its committed position.
    pub done_total: Option<u64>,
}

/// Jobs by status.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Jobs {
    /// Queued, not final.
    pub waiting: Option<u64>,
    /// Being run.
    pub running: Option<u64>,
    /// Dead letters.
    pub dead: Option<u64>,
    /// Succeeded since the queue began.
    pub succeeded_total: Option<u64>,
    /// Failed since the queue began.
    pub failed_total: Option<u64>,
}

/// A live worker.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Worker {
    /// Its unique name.
    pub id: Option<String>,
    /// RFC 3339.
    pub last_heartbeat: Option<String>,
    /// The partitions it owns.
    pub partitions: Vec<u64>,
}

/// Writes per second.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Rates {
    /// Writes accepted.
    pub accepted_per_second: Option<f64>,
    /// Writes applied.
    pub applied_per_second: Option<f64>,
}

/// `kvq stats`.
pub async fn stats(client: &Client, args: StatsArgs) -> Result<(), CliError> {
    let (stats, raw): (Stats, String) = client.get_json("/v1/stats").await?;
    if args.json {
        return line(raw.trim_end());
    }
    for text in render(&stats) {
        line(&text)?;
    }
    Ok(())
}

/// `n`, or `-` when unknown.
fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// `x` with two decimals, or `-` when unknown.
fn decimal(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
}

/// The stats as lines of text.
pub fn render(stats: &Stats) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(at) = &stats.at {
        out.push(format!("at          {at}"));
    }
    let jobs = &stats.jobs;
    out.push(format!(
        "jobs        waiting {}, running {}, dead {}; in all succeeded {}, failed {}",
        count(jobs.waiting),
        count(jobs.running),
        count(jobs.dead),
        count(jobs.succeeded_total),
        count(jobs.failed_total),
    ));
    out.push(format!(
        "rates       accepted {}/s, applied {}/s",
        decimal(stats.rates.accepted_per_second),
        decimal(stats.rates.applied_per_second),
    ));
    let lag = stats
        .partitions
        .iter()
        .filter_map(|p| p.lag_seconds)
        .fold(None, |max: Option<f64>, lag| {
            Some(max.map_or(lag, |m| m.max(lag)))
        });
    let depth: Option<u64> = stats.partitions.iter().map(|p| p.depth).sum();
    out.push(format!(
        "partitions  {}: depth {} in all, largest lag {} s",
        stats.partitions.len(),
        count(depth),
        decimal(lag)
    ));
    if !stats.partitions.is_empty() {
        let rows = stats
            .partitions
            .iter()
            .map(|p| {
                vec![
                    count(p.partition),
                    count(p.depth),
                    decimal(p.lag_seconds),
                    count(p.accepted_total),
                    count(p.done_total),
                    p.owner.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.extend(table(
            &["PARTITION", "DEPTH", "LAG_S", "ACCEPTED", "DONE", "OWNER"],
            rows,
        ));
    }
    out.push(format!("workers     {}", stats.workers.len()));
    if !stats.workers.is_empty() {
        let rows = stats
            .workers
            .iter()
            .map(|w| {
                let partitions: Vec<String> = w.partitions.iter().map(u64::to_string).collect();
                vec![
                    w.id.clone().unwrap_or_else(|| "-".into()),
                    w.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
                    partitions.join(","),
                ]
            })
            .collect();
        out.extend(table(&["WORKER", "LAST_HEARTBEAT", "PARTITIONS"], rows));
    }
    out
}

/// Rows under a header, each column as wide as its widest cell, indented
/// by two spaces.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let format_row = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("  {}", padded.join("  ").trim_end())
    };
    let mut lines = vec![format_row(header.iter().map(|h| (*h).to_owned()).collect())];
    lines.extend(rows.into_iter().map(format_row));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the stats contract the API is built to.
    const EXAMPLE: &str = r#"{
      "at": "2026-12-02T15:00:00.000Z",
      "partitions": [
        {"partition": 0, "depth": 12, "lag_seconds": 1.52,
         "oldest_enqueued_at": "2026-12-02T14:59:58.480Z",
         "owner": "worker-a", "accepted_total": 1234, "done_total": 1222},
        {"partition": 1, "depth": 0, "lag_seconds": 0,
         "oldest_enqueued_at": null,
         "owner": null, "accepted_total": 10, "done_total": 10}
      ],
      "jobs": {"waiting": 12, "running": 3, "dead": 1, "succeeded_total": 1200, "failed_total": 10},
      "workers": [{"id": "worker-a", "last_heartbeat": "2026-12-02T14:59:59.900Z", "partitions": [0, 3, 7]}],
      "rates": {"accepted_per_second": 812.5, "applied_per_second": null}
    }"#;

    #[test]
    fn the_contracts_example_reads_as_tables() {
        let stats: Stats = serde_json::from_str(EXAMPLE).expect("the example parses");
        let text = render(&stats).join("\n");
        let expected = "\
at          2026-12-02T15:00:00.000Z
jobs        waiting 12, running 3, dead 1; in all succeeded 1200, failed 10
rates       accepted 812.50/s, applied -/s
partitions  2: depth 12 in all, largest lag 1.52 s
  PARTITION  DEPTH  LAG_S  ACCEPTED  DONE  OWNER
  0          12     1.52   1234      1222  worker-a
  1          0      0.00   10        10    -
workers     1
  WORKER    LAST_HEARTBEAT            PARTITIONS
  worker-a  2026-12-02T14:59:59.900Z  0,3,7";
        assert_eq!(text, expected);
    }

    #[test]
    fn missing_members_read_as_unknown() {
        let stats: Stats = serde_json::from_str("{}").expect("an empty object parses");
        let text = render(&stats).join("\n");
        assert!(text.contains("waiting -, running -"), "{text}");
        assert!(text.contains("partitions  0: depth 0 in all"), "{text}");
    }
}
