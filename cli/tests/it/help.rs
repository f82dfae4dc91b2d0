//! `kvq --help` and `kvq COMMAND --help`: complete, without a stack.

use crate::kvq_with;

const COMMANDS: [&str; 11] = [
    "get", "put", "delete", "list", "job", "wait", "dead", "retry", "stats", "import", "export",
];

#[tokio::test]
async fn the_main_help_names_every_command_the_environment_and_the_exit_codes() {
    let help = kvq_with(&[], &["--help"], None).await;
    help.ok();
    for command in COMMANDS {
        assert!(
            help.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(command)),
            "{command} missing: {}",
            help.stdout
        );
    }
    for text in [
        "KVQ_URL",
        "KVQ_TOKEN",
        "http://127.0.0.1:8080",
        "Exit codes:",
        "  0  done",
        "  1  not found or conflict",
        "  2  usage",
        "  3  unavailable",
        "  4  not allowed",
        "  5  anything else",
        "Examples:",
        "--token",
        "--url",
    ] {
        assert!(
            help.stdout.contains(text),
            "{text:?} missing: {}",
            help.stdout
        );
    }
    let version = kvq_with(&[], &["--version"], None).await;
    version.ok();
    assert_eq!(
        version.stdout,
        format!("kvq {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn every_command_has_its_own_complete_help() {
    for command in COMMANDS {
        let help = kvq_with(&[], &[command, "--help"], None).await;
        help.ok();
        for text in [
            format!("Usage: kvq {command}"),
            "Exit codes:".to_owned(),
            "KVQ_URL".to_owned(),
            "KVQ_TOKEN".to_owned(),
            "Examples:".to_owned(),
        ] {
            assert!(
                help.stdout.contains(&text),
                "kvq {command} --help lacks {text:?}: {}",
                help.stdout
            );
        }
    }
    // The flags the issue names.
    let put = kvq_with(&[], &["put", "--help"], None).await;
    for flag in [
        "--create",
        "--if-match",
        "--ttl",
        "--wait",
        "--json",
        "--string",
    ] {
        assert!(put.stdout.contains(flag), "put --help lacks {flag}");
    }
    let get = kvq_with(&[], &["get", "--help"], None).await;
    assert!(get.stdout.contains("--json"), "get --help lacks --json");
    // The import line format.
    let import = kvq_with(&[], &["import", "--help"], None).await;
    assert!(
        import
            .stdout
            .contains(r#"{"key": "users/2", "value": 2, "ttl_seconds": 3600}"#),
        "{}",
        import.stdout
    );
    // A token given in the environment is never shown.
    let secret = kvq_with(&[("KVQ_TOKEN", "s3cr3t-token")], &["get", "--help"], None).await;
    assert!(!secret.stdout.contains("s3cr3t-token"), "{}", secret.stdout);
}
