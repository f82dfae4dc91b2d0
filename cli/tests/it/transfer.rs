//! `import` and `export`: JSON lines through the batch API and back.

use std::collections::BTreeMap;
use std::io::Write;

use kvq_testkit::Stack;
use serde_json::Value;

use crate::{kvq, kvq_with};

/// Line `i` of a test file: values of many shapes, written compactly (as
/// the API stores them), so an export of them is the same text; every
/// hundredth key has a TTL.
fn line(i: usize) -> String {
    let value = match i % 7 {
        0 => format!("{i}"),
        1 => format!("\"text {i} \\u00e9 \\\" ü\""),
        2 => format!("{{\"n\":{i},\"tags\":[\"a\",\"b\"],\"nested\":{{\"ok\":true}}}}"),
        3 => "123456789012345678901234567890".to_owned(),
        4 => "1.0e2".to_owned(),
        5 => "null".to_owned(),
        _ => format!("[{i},{},\"x\"]", i * 2),
    };
    let ttl = if i.is_multiple_of(100) {
        ",\"ttl_seconds\":3600"
    } else {
        ""
    };
    format!("{{\"key\":\"imp/{i:05}\",\"value\":{value}{ttl}}}")
}

/// Lines of a JSON lines text by key: (the line without `ttl_seconds`,
/// the TTL).
fn by_key(text: &str) -> BTreeMap<String, (String, Option<u64>)> {
    text.lines()
        .map(|line| {
            let parsed: Value = serde_json::from_str(line).expect("a JSON line");
            let key = parsed["key"].as_str().expect("a key").to_owned();
            let ttl = parsed["ttl_seconds"].as_u64();
            let bare = match line.find(",\"ttl_seconds\":") {
                Some(at) => format!("{}}}", &line[..at]),
                None => line.to_owned(),
            };
            (key, (bare, ttl))
        })
        .collect()
}

#[tokio::test]
async fn ten_thousand_lines_imported_export_back_the_same() {
    let stack = Stack::start().await;
    let lines: Vec<String> = (0..10_000).map(line).collect();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in &lines {
        writeln!(file, "{line}").unwrap();
    }
    file.flush().unwrap();
    let path = file.path().to_str().unwrap();

    let import = kvq(&stack, &["import", path]).await;
    import.ok();
    assert_eq!(
        import.stdout,
        "imported 10000 writes from 10000 lines: 10000 succeeded, 0 failed, 0 dead\n"
    );
    // Not a terminal: plain progress lines.
    assert!(
        import.stderr.lines().any(|l| l.starts_with("kvq import: ")),
        "{}",
        import.stderr
    );

    // Applied once import returns: export finds every line.
    let export = kvq(&stack, &["export", "imp/"]).await;
    export.ok();
    assert!(
        export
            .stderr
            .contains("kvq export: 10000 keys written to stdout"),
        "{}",
        export.stderr
    );
    let exported = by_key(&export.stdout);
    let imported = by_key(&lines.join("\n"));
    assert_eq!(exported.len(), 10_000);
    for (key, (line, ttl)) in &imported {
        let (out, out_ttl) = &exported[key];
        assert_eq!(out, line, "{key}");
        match ttl {
            None => assert_eq!(*out_ttl, None, "{key}"),
            // Time left, rounded up: at most the TTL, and not much less.
            Some(ttl) => {
                let left = out_ttl.unwrap_or_else(|| panic!("{key} lost its TTL"));
                assert!(left <= *ttl && left > ttl - 120, "{key}: {left}");
            }
        }
    }
    // Sorted by key, as the listing is.
    let keys: Vec<String> = export
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["key"].to_string())
        .collect();
    assert!(keys.is_sorted(), "export is sorted by key");

    // The export imports back: into an empty stack, through stdin, and
    // exports the same again (TTLs aside).
    let other = Stack::start().await;
    let again = kvq_with(
        &[("KVQ_URL", other.base())],
        &["import", "-"],
        Some(export.stdout.as_bytes()),
    )
    .await;
    again.ok();
    let round = kvq_with(
        &[("KVQ_URL", other.base())],
        &["export", "imp/", "-o", "-"],
        None,
    )
    .await;
    round.ok();
    let round = by_key(&round.stdout);
    assert_eq!(
        round.iter().map(|(k, (l, _))| (k, l)).collect::<Vec<_>>(),
        exported
            .iter()
            .map(|(k, (l, _))| (k, l))
            .collect::<Vec<_>>()
    );

    // --create over existing keys: every write fails already_exists; the
    // first ones are listed, and the exit code is 1.
    let create = kvq(&stack, &["import", path, "--create"]).await;
    assert_eq!(create.code, 1, "{}", create.stderr);
    assert_eq!(
        create.stdout,
        "imported 10000 writes from 10000 lines: 0 succeeded, 10000 failed, 0 dead\n"
    );
    assert!(
        create
            .stderr
            .contains("kvq import: line 1 (key \"imp/00000\"): job"),
        "{}",
        create.stderr
    );
    assert!(
        create.stderr.contains("already_exists"),
        "{}",
        create.stderr
    );
}

#[tokio::test]
async fn a_bad_line_stops_the_import_there() {
    let stack = Stack::start().await;
    let long_key = "k".repeat(600);
    for (bad, code) in [
        // Not an import line: found by kvq.
        (
            r#"{"key": "b/3", "value": 3, "colour": "red"}"#.to_owned(),
            2,
        ),
        ("{\"key\": \"b/3\"".to_owned(), 2),
        // Refused by the API (the key is too long), which names the write.
        (format!(r#"{{"key": "{long_key}", "value": 3}}"#), 2),
    ] {
        let input = format!(
            "{{\"key\": \"b/1\", \"value\": 1}}\n\n{{\"key\": \"b/2\", \"value\": 2}}\n{bad}\n{{\"key\": \"b/5\", \"value\": 5}}\n"
        );
        let run = kvq_with(
            &[("KVQ_URL", stack.base())],
            &["import", "-"],
            Some(input.as_bytes()),
        )
        .await;
        assert_eq!(run.code, code, "{bad}: {run:?}");
        assert!(run.stderr.contains("line 4"), "{bad}: {run:?}");
        assert_eq!(
            kvq(&stack, &["list", "b/"]).await.lines(),
            ["b/1", "b/2"],
            "{bad}: the lines before it are imported, none after"
        );
    }
}

#[tokio::test]
async fn an_import_with_no_wait_queues_everything() {
    let stack = Stack::start().await;
    let input: String = (0..2_500)
        .map(|i| format!("{{\"key\":\"q/{i:04}\",\"value\":{i}}}\n"))
        .collect();
    let run = kvq_with(
        &[("KVQ_URL", stack.base())],
        &["import", "-", "--no-wait", "--batch-size", "300"],
        Some(input.as_bytes()),
    )
    .await;
    run.ok();
    assert_eq!(
        run.stdout,
        "queued 2500 writes from 2500 lines (not waited for)\n"
    );
    kvq_testkit::eventually(
        std::time::Duration::from_secs(30),
        "the queued writes to apply",
        || async {
            let listed = kvq(&stack, &["list", "q/"]).await;
            (listed.lines().len() == 2_500).then_some(())
        },
    )
    .await;
}
