//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one write is one trace,
//! from the API's request through enqueue to the worker's run of the job,
//! its apply script and its completion record, joined to the caller's `traceparent`; the JSON log
//! lines of the request and of the job carry its `trace_id`. The receiver
//! is a real OTLP/HTTP endpoint on loopback, decoding what kvq exports with
//! the `opentelemetry-proto` types.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use kvq_testkit::{KvqProcess, Stack, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use reqwest::Method;
use serde_json::{Value, json};

/// A span as received: the exporting service, and the span.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP trace receiver on 127.0.0.1: every span posted to
/// `/v1/traces` is decoded and kept.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
    server: actix_web::dev::ServerHandle,
}

impl Receiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let server = HttpServer::new(move || {
            let kept = kept.clone();
            App::new()
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .route(
                    "/v1/traces",
                    web::post().to(move |body: web::Bytes| {
                        let kept = kept.clone();
                        async move {
                            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                                return HttpResponse::BadRequest().finish();
                            };
                            let mut kept = kept.lock().expect("the spans' lock");
                            for resource in request.resource_spans {
                                let service = resource
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|kv| kv.key == "service.name")
                                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                                    .map(|v| match v {
                                        AnyValue::StringValue(s) => s.clone(),
                                        other => format!("{other:?}"),
                                    })
                                    .unwrap_or_default();
                                for scope in resource.scope_spans {
                                    for span in scope.spans {
                                        kept.push(Received {
                                            service: service.clone(),
                                            name: span.name,
                                            trace_id: hex(&span.trace_id),
                                            span_id: hex(&span.span_id),
                                            parent_span_id: hex(&span.parent_span_id),
                                        });
                                    }
                                }
                            }
                            HttpResponse::Ok()
                                .content_type("application/x-protobuf")
                                .body(Vec::new())
                        }
                    }),
                )
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url,
            spans,
            server: handle,
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("the spans' lock").clone()
    }

    /// Waits until trace `trace_id` has a span of each of `names`, and
    /// returns the trace's spans.
    async fn trace_with(&self, trace_id: &str, names: &[&str]) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans();
            let trace: Vec<Received> = spans
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if names
                .iter()
                .all(|name| trace.iter().any(|s| s.name == *name))
            {
                return trace;
            }
            assert!(
                Instant::now() < deadline,
                "no spans {names:?} of trace {trace_id} within 30 s; received {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

/// The one span of `trace` named `name`.
fn only<'a>(trace: &'a [Received], name: &str) -> &'a Received {
    let found: Vec<&Received> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {trace:#?}");
    found[0]
}

/// A stack exporting its spans to `receiver`, quickly.
async fn traced_stack(receiver: &Receiver) -> Stack {
    Stack::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
}

/// The JSON log lines of `process` that mention `needle`.
fn lines_with(process: &KvqProcess, needle: &str) -> Vec<Value> {
    process
        .logs()
        .iter()
        .filter(|line| line.contains(needle))
        .map(|line| serde_json::from_str(line).expect("a JSON log line"))
        .collect()
}

/// A new random trace id and parent span id, as hex.
fn new_ids() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = trace_id[..16].chars().rev().collect();
    (trace_id, span_id)
}

#[tokio::test]
async fn a_write_is_one_trace_from_the_callers_traceparent_to_the_apply() {
    let receiver = Receiver::start();
    let mut stack = traced_stack(&receiver).await;
    let (trace_id, parent) = new_ids();
    let accepted = stack
        .request(Method::POST, "/v1/kv")
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .header("x-request-id", "traced-write")
        .json(&json!({"key": "traced", "value": 1}))
        .send()
        .await
        .expect("the write");
    assert_eq!(accepted.status(), 202);
    let job = stack.finished(accepted).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let job_id = job["id"].as_str().expect("a job id").to_owned();

    let trace = receiver
        .trace_with(
            &trace_id,
            &["http_request", "enqueue", "job", "apply", "finish"],
        )
        .await;
    let request = only(&trace, "http_request");
    let enqueue = only(&trace, "enqueue");
    let run = only(&trace, "job");
    let apply = only(&trace, "apply");
    let finish = only(&trace, "finish");
    assert_eq!(request.service, "kvq-api");
    assert_eq!(enqueue.service, "kvq-api");
    for span in [run, apply, finish] {
        assert_eq!(span.service, "kvq-worker", "{span:?}");
    }
    // One chain: caller -> request -> enqueue -> the job's run -> its
    // apply script and its completion record.
    assert_eq!(request.parent_span_id, parent);
    assert_eq!(enqueue.parent_span_id, request.span_id);
    assert_eq!(run.parent_span_id, enqueue.span_id);
    assert_eq!(apply.parent_span_id, run.span_id);
    assert_eq!(finish.parent_span_id, run.span_id);

    // The worker's log lines for the job carry the trace id...
    let worker_lines = lines_with(&stack.workers[0], &job_id);
    assert!(
        worker_lines.iter().any(|l| l["message"] == "job finished"),
        "{worker_lines:#?}"
    );
    for line in &worker_lines {
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    }
    // ... and so does the API's for its enqueue.
    let queued: Vec<Value> = lines_with(stack.api(), &job_id)
        .into_iter()
        .filter(|l| l["message"] == "job queued")
        .collect();
    assert_eq!(queued.len(), 1, "{queued:#?}");
    assert_eq!(queued[0]["trace_id"], trace_id.as_str(), "{}", queued[0]);
}

#[tokio::test]
async fn a_write_without_a_traceparent_starts_its_own_trace() {
    let receiver = Receiver::start();
    let stack = traced_stack(&receiver).await;
    let job = stack
        .finished(stack.create("untraced", json!(1)).await)
        .await;
    let job_id = job["id"].as_str().expect("a job id").to_owned();
    let line = stack.workers[0]
        .wait_for_log("job finished", Duration::from_secs(10))
        .await;
    assert_eq!(line["span"]["job_id"], job_id.as_str(), "{line}");
    let trace_id = line["trace_id"].as_str().expect("a trace id").to_owned();
    assert_eq!(trace_id.len(), 32, "{line}");
    let trace = receiver
        .trace_with(&trace_id, &["http_request", "enqueue", "job", "apply"])
        .await;
    assert_eq!(only(&trace, "http_request").parent_span_id, "");
}

#[tokio::test]
async fn without_an_endpoint_logs_carry_an_incoming_trace_id_only() {
    let mut stack = Stack::start().await;
    let (trace_id, parent) = new_ids();
    let traced = stack
        .request(Method::POST, "/v1/kv")
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .json(&json!({"key": "traced", "value": 1}))
        .send()
        .await
        .expect("the write");
    let traced = stack.finished(traced).await["id"]
        .as_str()
        .expect("a job id")
        .to_owned();
    let plain = stack.finished(stack.create("plain", json!(1)).await).await["id"]
        .as_str()
        .expect("a job id")
        .to_owned();
    eventually(
        Duration::from_secs(10),
        "both jobs' end in the logs",
        || {
            let lines = stack.workers[0].logs();
            let done = |id: &str| {
                lines
                    .iter()
                    .any(|l| l.contains(id) && l.contains("job finished"))
            };
            std::future::ready((done(&traced) && done(&plain)).then_some(()))
        },
    )
    .await;
    let api = stack.api().logs();
    let worker = stack.workers[0].logs();
    let of = |id: &str| -> Vec<Value> {
        api.iter()
            .chain(&worker)
            .filter(|line| line.contains(id))
            .map(|line| serde_json::from_str(line).expect("a JSON log line"))
            .collect()
    };
    let traced_lines = of(&traced);
    assert!(
        traced_lines.iter().any(|l| l["message"] == "job queued"),
        "{traced_lines:#?}"
    );
    for line in &traced_lines {
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    }
    let plain_lines = of(&plain);
    assert!(plain_lines.len() >= 2, "{plain_lines:#?}");
    for line in &plain_lines {
        assert!(line.get("trace_id").is_none(), "{line}");
    }
}
