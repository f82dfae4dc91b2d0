//! Reads retry a failing KV Redis with backoff, answer 503 when the retries
//! run out, and work again as soon as Redis is back; writes, accepted by
//! the queue Redis alone, wait in the queue for it.

use std::time::{Duration, Instant};

use kvq_testkit::{KvqProcess, Stack, TestCa, eventually};
use serde_json::{Value, json};

#[tokio::test]
async fn reads_answer_503_while_the_kv_redis_is_down_writes_are_still_accepted_and_both_recover() {
    let mut stack = Stack::start().await;
    stack
        .finished(stack.create("steady", json!("before")).await)
        .await;

    stack.kv.stop();
    let started = Instant::now();
    let response = stack.get("steady").await;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "backend_unavailable");
    assert!(took < Duration::from_secs(8), "the 503 took {took:?}");
    assert!(stack.api().is_running());

    // Writes are still accepted (accepting one involves the queue Redis
    // only), and wait in the queue for the KV Redis.
    let during = stack
        .put("steady?upsert=true", json!({"value": "during"}))
        .await;
    assert_eq!(
        during.status(),
        202,
        "a write was refused while only the KV Redis is down"
    );
    let during = Stack::job_id(during).await;

    // Persistence is off in tests, so the restarted Redis is empty: the
    // write made during the outage creates the key anew, and reads see it
    // without an API restart.
    stack.kv.restart();
    let job = stack.wait_job(&during).await;
    assert_eq!(
        job["result"],
        json!({"outcome": "created", "version": 1}),
        "{job}"
    );
    let read = eventually(Duration::from_secs(10), "reads to work again", || async {
        let response = stack.get("steady").await;
        (response.status() == 200).then_some(response)
    })
    .await;
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["value"], "during");
    let job = stack
        .finished(stack.create("after", json!("after")).await)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read: Value = stack.get("after").await.json().await.unwrap();
    assert_eq!(read["value"], "after");
}

#[tokio::test]
async fn a_read_retried_through_a_short_outage_succeeds() {
    let stack = Stack::builder()
        .env("KVQ_READ_RETRY_MAX_MS", "8000")
        .start()
        .await;
    stack.finished(stack.create("brief", json!(1)).await).await;
    let pid = stack.kv.pid().unwrap();
    // SIGSTOP: the connection stays open but Redis does not answer.
    kvq_testkit::signal(pid, "STOP");
    let reader = {
        let request = stack.request(reqwest::Method::GET, "/v1/kv/brief");
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kvq_testkit::signal(pid, "CONT");
    let response = reader.await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["value"], 1);
}

#[tokio::test]
async fn a_write_refused_with_503_never_applies_and_does_not_stall_the_key() {
    let mut stack = Stack::start().await;
    let first = stack.create("gap", json!("v1")).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let job = stack.wait_job(first["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Writes are accepted by the queue Redis: with it down, they are
    // refused. The API's connection was open, so the command may have been
    // sent: the answer is `backend_unavailable` or `outcome_unknown`, and
    // either way nothing holds up the key's later writes.
    stack.queue.stop();
    let refused = stack.put("gap", json!({"value": "refused"})).await;
    assert_eq!(refused.status(), 503);
    let refused: Value = refused.json().await.unwrap();
    assert!(
        ["backend_unavailable", "outcome_unknown"].contains(&refused["code"].as_str().unwrap()),
        "{refused}"
    );
    stack.queue.restart();

    let accepted = eventually(
        Duration::from_secs(10),
        "a write to be accepted",
        || async {
            let response = stack.put("gap", json!({"value": "v2"})).await;
            (response.status() == 202).then_some(response)
        },
    )
    .await;
    let body: Value = accepted.json().await.unwrap();
    assert!(
        body["seq"].as_u64() > first["seq"].as_u64(),
        "the later write's seq is not greater: {first} then {body}"
    );
    let job = stack.wait_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read: Value = stack.get("gap").await.json().await.unwrap();
    assert_eq!(read["value"], "v2");
    assert_eq!(
        read["version"], 2,
        "the refused write must not have applied"
    );
}

#[tokio::test]
async fn password_protected_redis_servers_work_and_the_password_stays_secret() {
    let password = "s3cr3t-redis-pw";
    let mut stack = Stack::builder().redis_password(password).start().await;
    let job = stack
        .finished(stack.create("locked", json!("in")).await)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read: Value = stack.get("locked").await.json().await.unwrap();
    assert_eq!(read["value"], "in");
    let ready = stack
        .request(reqwest::Method::GET, "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // Without the password, the servers refuse: the password is really in use.
    let refused = redis::Client::open(format!("redis://127.0.0.1:{}", stack.kv.port()))
        .unwrap()
        .get_connection()
        .and_then(|mut c| redis::cmd("GET").arg("x").query::<Option<String>>(&mut c));
    assert!(refused.is_err(), "the KV Redis answered without a password");
    stack.assert_no_log_line_shows(password);
}

/// Starts one more API with `env` (later entries win) and returns the status
/// of its `/readyz`: 200 only when it reaches both Redis servers.
async fn readiness_with(env: &[(String, String)]) -> (u16, KvqProcess) {
    let api = KvqProcess::spawn("kvq-api", env);
    let line = api
        .wait_for_log("kvq-api listening", Duration::from_secs(20))
        .await;
    let port = line["port"].as_u64().unwrap();
    let status = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap()
        .status()
        .as_u16();
    (status, api)
}

/// `env` with `overrides` appended (the process sees the last value).
fn env_with(env: Vec<(String, String)>, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = env;
    env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

#[tokio::test]
async fn tls_only_redis_servers_carry_the_whole_flow_with_the_certificate_verified() {
    let stack = Stack::builder().redis_tls().start().await;
    let (kv_port, queue_port) = (stack.kv.port(), stack.queue.port());
    assert_eq!(stack.kv.url(), format!("rediss://127.0.0.1:{kv_port}"));
    assert_eq!(
        stack.queue.url(),
        format!("rediss://127.0.0.1:{queue_port}")
    );

    let id = Stack::job_id(stack.create("sealed", json!({"over": "tls"})).await).await;
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read = stack.get("sealed").await;
    assert_eq!(read.status(), 200);
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["value"], json!({"over": "tls"}));
    assert_eq!(read["version"], 1);
    let ready = stack
        .request(reqwest::Method::GET, "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // The test's own checks reach both servers over TLS as well.
    eventually(
        Duration::from_secs(5),
        "the job to be committed",
        || async { (stack.queue.pending_jobs() == 0).then_some(()) },
    )
    .await;
    assert!(
        stack
            .kv
            .keys()
            .contains(&kvq_shared::keys::value_key("kvq", "sealed"))
    );
    assert!(
        stack
            .queue
            .keys()
            .contains(&kvq_shared::keys::job_key("kvq", &id).unwrap())
    );

    // The servers speak TLS only: a plain redis:// client is not ready.
    let (plain, _api) = readiness_with(&env_with(
        stack.env(),
        &[
            ("KVQ_KV_REDIS_URL", format!("redis://127.0.0.1:{kv_port}")),
            (
                "KVQ_QUEUE_REDIS_URL",
                format!("redis://127.0.0.1:{queue_port}"),
            ),
        ],
    ))
    .await;
    assert_eq!(plain, 503, "plain redis:// reached a TLS-only server");

    // The certificate is verified: trusting another CA, the API is not ready.
    let other_ca = TestCa::new();
    let other_ca_file = other_ca.pem_file().display().to_string();
    let (untrusted, _api) = readiness_with(&env_with(
        stack.env(),
        &[("SSL_CERT_FILE", other_ca_file.clone())],
    ))
    .await;
    assert_eq!(
        untrusted, 503,
        "a certificate from an untrusted CA was accepted"
    );

    // ... unless the URL says #insecure (tests only), which is warned about.
    let (insecure, api) = readiness_with(&env_with(
        stack.env(),
        &[
            ("SSL_CERT_FILE", other_ca_file),
            (
                "KVQ_KV_REDIS_URL",
                format!("rediss://127.0.0.1:{kv_port}/#insecure"),
            ),
            (
                "KVQ_QUEUE_REDIS_URL",
                format!("rediss://127.0.0.1:{queue_port}/#insecure"),
            ),
        ],
    ))
    .await;
    assert_eq!(insecure, 200, "#insecure did not skip verification");
    assert!(
        api.logs()
            .iter()
            .any(|line| line.contains("WARN") && line.contains("#insecure")),
        "no warning about #insecure: {:?}",
        api.logs()
    );

    // The guards still kill the TLS servers.
    let pids = [stack.kv.pid().unwrap(), stack.queue.pid().unwrap()];
    drop(stack);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "redis-server {pid} outlived its guard"
        );
    }
}

#[tokio::test]
async fn tls_and_a_password_together_work() {
    let password = "tls-and-pw";
    let mut stack = Stack::builder()
        .redis_tls()
        .redis_password(password)
        .start()
        .await;
    let kv_port = stack.kv.port();
    assert_eq!(
        stack.kv.url(),
        format!("rediss://:{password}@127.0.0.1:{kv_port}")
    );
    let job = stack
        .finished(stack.create("both", json!("locks")).await)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read: Value = stack.get("both").await.json().await.unwrap();
    assert_eq!(read["value"], "locks");
    // Over TLS but without the password, the KV Redis refuses.
    let (refused, _api) = readiness_with(&env_with(
        stack.env(),
        &[("KVQ_KV_REDIS_URL", format!("rediss://127.0.0.1:{kv_port}"))],
    ))
    .await;
    assert_eq!(refused, 503, "the KV Redis answered without a password");
    stack.assert_no_log_line_shows(password);
}
