//! `kvq-api` and `kvq-worker` on the command line: `--help` and `--version`
//! answer and exit (they start nothing), the `token` subcommand takes its
//! flags through the parser, and an unknown flag is a usage error (exit 2),
//! never ignored.

use std::time::Duration;

use kvq_testkit::KvqProcess;

/// Runs `name args…` (no configuration but a JWT secret) until it exits:
/// (exit code, stdout, stderr). A binary that starts serving instead fails
/// here, after the deadline.
async fn run(name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let env = [("KVQ_AUTH_JWT_SECRET".to_owned(), "s".repeat(32))];
    let mut process = KvqProcess::spawn_with_args(name, args, &env);
    let status = process.wait_exit(Duration::from_secs(20)).await;
    (
        status.code(),
        process.logs().join("\n"),
        process.stderr().join("\n"),
    )
}

#[tokio::test]
async fn help_and_version_answer_and_start_nothing() {
    for name in ["kvq-api", "kvq-worker"] {
        let (code, out, _) = run(name, &["--help"]).await;
        assert_eq!(code, Some(0), "{name} --help: {out}");
        assert!(
            out.contains(&format!("Usage: {name}")),
            "{name} --help: {out}"
        );
        assert!(
            out.contains("KVQ_QUEUE_REDIS_URL"),
            "{name} --help names the configuration: {out}"
        );
        assert!(
            out.contains("Exit status"),
            "{name} --help gives the exit codes: {out}"
        );

        let (code, out, _) = run(name, &["--version"]).await;
        assert_eq!(code, Some(0));
        assert_eq!(out.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
    let (code, out, _) = run("kvq-api", &["--help"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("token"),
        "the token subcommand is listed: {out}"
    );
    let (code, out, _) = run("kvq-api", &["token", "--help"]).await;
    assert_eq!(code, Some(0));
    for flag in ["--role", "--ttl", "reader, writer or admin"] {
        assert!(
            out.contains(flag),
            "kvq-api token --help names {flag}: {out}"
        );
    }
}

#[tokio::test]
async fn an_unknown_flag_or_a_bad_value_is_a_usage_error() {
    for (name, args) in [
        ("kvq-api", &["--bind", "0.0.0.0:1"][..]),
        ("kvq-api", &["serve", "--port", "1"][..]),
        ("kvq-worker", &["--concurrency", "4"][..]),
        ("kvq-worker", &["run"][..]),
        ("kvq-api", &["token", "--role", "owner"][..]),
        (
            "kvq-api",
            &["token", "--role", "reader", "--ttl", "soon"][..],
        ),
        ("kvq-api", &["token"][..]),
    ] {
        let (code, out, err) = run(name, args).await;
        assert_eq!(code, Some(2), "{name} {args:?}: {out} {err}");
        assert!(
            err.starts_with("error:") && err.contains("--help"),
            "{name} {args:?} says what is wrong and where help is: {err}"
        );
        assert!(
            out.is_empty(),
            "{name} {args:?} printed nothing on stdout: {out}"
        );
    }
}

#[tokio::test]
async fn the_token_subcommand_still_prints_a_token() {
    let (code, out, err) = run("kvq-api", &["token", "--role", "admin", "--ttl", "5m"]).await;
    assert_eq!(code, Some(0), "{err}");
    let token = out.lines().last().unwrap_or_default();
    assert_eq!(token.split('.').count(), 3, "a JWT: {out}");
}
