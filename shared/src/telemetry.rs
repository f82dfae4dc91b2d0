//! Logging and tracing set-up shared by both binaries: `tracing` with JSON
//! lines in production and pretty lines on a terminal, and OpenTelemetry
//! traces when an OTLP endpoint is configured. `RUST_LOG` overrides the
//! level (default `info`).
//!
//! # Traces
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and off otherwise: then no
//! OpenTelemetry layer is installed and spans cost what they did before.
//! Spans go over OTLP/HTTP (protobuf) through a batch processor, which the
//! standard `OTEL_BSP_*` variables tune; `OTEL_SERVICE_NAME` names the
//! service (default `kvq-api` or `kvq-worker`). [`Telemetry::shutdown`]
//! flushes the spans still buffered.
//!
//! A write is one trace: the API's request span joins the trace of an
//! incoming W3C `traceparent` header ([`join`]), the job carries the
//! `traceparent` of its enqueue span ([`traceparent`]), and the worker's
//! span for its run joins that.
//!
//! # `trace_id` in logs
//! Every JSON log line inside a span that [`join`] joined to a trace (a
//! request, a job) carries a top-level `trace_id`. With export off, kvq
//! starts no traces of its own: a line carries `trace_id` only when a
//! `traceparent` came in (the request's header, or the job's field), and
//! that `traceparent` is passed on to the job unchanged.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{FmtSpan, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The W3C trace context header, and the job field of the same name.
pub const TRACEPARENT: &str = "traceparent";

/// The variables that turn export on.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether spans are exported (set once by [`init`]).
static EXPORTING: OnceLock<bool> = OnceLock::new();

/// Whether spans are exported: an OTLP endpoint was configured.
pub fn exporting() -> bool {
    EXPORTING.get().copied().unwrap_or(false)
}

/// What [`init`] set up; flush it with [`Telemetry::shutdown`] before the
/// process exits.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("could not flush the traces: {e}");
        }
    }
}

/// Installs the global subscriber, with trace export when an OTLP endpoint
/// is set; `service` is the default `OTEL_SERVICE_NAME`. Call once, first
/// thing in `main`. A bad exporter set-up is reported and leaves export
/// off.
pub fn init(format: LogFormat, service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (provider, problem) = match tracer_provider(service) {
        Ok(provider) => (provider, None),
        Err(e) => (None, Some(e)),
    };
    let _ = EXPORTING.set(provider.is_some());
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_tracked_inactivity(false)
    });
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_span_events(FmtSpan::NONE)
            .with_writer(std::io::stdout)
            .map_event_format(WithTraceId)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_span_events(FmtSpan::NONE)
            .with_writer(std::io::stdout)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(logs)
        .init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "cannot export traces; going on without");
    }
    Telemetry { provider }
}

/// The tracer provider, if an OTLP endpoint is set.
fn tracer_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.trim().is_empty());
    if !ENDPOINT_VARS.iter().any(|var| set(var)) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| e.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The trace a span was joined to, kept in its extensions.
struct Joined {
    /// 32 lowercase hex digits.
    trace_id: String,
    /// The `traceparent` that came in, passed on as it is while export is
    /// off.
    incoming: Option<String>,
}

/// Runs `f` on the registry's data of `span`, if it is enabled.
fn with_span_data<T>(
    span: &Span,
    f: impl FnOnce(tracing_subscriber::registry::SpanRef<'_, Registry>) -> Option<T>,
) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        f(registry.span(id)?)
    })
    .flatten()
}

/// The remote parent a valid `traceparent` names.
fn extract(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Joins `span` (a request's or a job's, not yet entered) to the trace of
/// `traceparent`, if it is valid; with export on, a span without one starts
/// a new trace. Every log line inside `span` then carries its `trace_id`.
pub fn join(span: &Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let parent = traceparent.and_then(extract);
    let incoming = traceparent.filter(|_| parent.is_some()).map(str::to_owned);
    let trace_id = if exporting() {
        if let Some(parent) = parent {
            let _ = span.set_parent(parent);
        }
        let cx = span.context();
        let id = cx.span().span_context().trace_id();
        (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
    } else {
        parent.map(|cx| cx.span().span_context().trace_id().to_string())
    };
    let Some(trace_id) = trace_id else { return };
    with_span_data(span, |data| {
        data.extensions_mut().insert(Joined { trace_id, incoming });
        Some(())
    });
}

/// The `traceparent` to carry onward from the current span (in a job, say):
/// with export on, the current span's own; with it off, the one that came
/// in to the trace's joined span, if any.
pub fn traceparent() -> Option<String> {
    let current = Span::current();
    if exporting() {
        let cx = current.context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        return carrier.remove(TRACEPARENT);
    }
    with_span_data(&current, |data| {
        data.scope()
            .find_map(|span| {
                span.extensions()
                    .get::<Joined>()
                    .map(|j| j.incoming.clone())
            })
            .flatten()
    })
}

/// The JSON event format with the `trace_id` of the event's trace, if it
/// is in a joined span, put first.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let trace_id = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                span.extensions()
                    .get::<Joined>()
                    .map(|j| j.trace_id.clone())
            })
        });
        let Some(trace_id) = trace_id else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}
