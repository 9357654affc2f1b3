//! Logs and traces: the process-wide `tracing` subscriber (human-readable or
//! JSON logs, `RUST_LOG`-style filter, optional OTLP/gRPC span export) and
//! the W3C trace-context helpers the Exchange and the relay use to continue a
//! consumer's trace and hand it on to providers.
//!
//! Without an OTLP endpoint no OpenTelemetry layer is installed: spans are
//! plain `tracing` spans feeding the log lines, and a consumer's trace id is
//! still passed on to providers (under a fresh parent id standing for the
//! broker's hop), so logs on both sides of the relay correlate.

use lienthong::trace_context::{MetadataExtractor, MetadataInjector};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tonic::metadata::MetadataMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How to set logging and tracing up.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// `text` (human-readable) or `json` (one object per line).
    pub log_format: String,
    /// `RUST_LOG`-style filter used when `RUST_LOG` is not set, e.g. `info,lienthong_broker=debug`.
    pub log_filter: String,
    /// OTLP/gRPC collector such as `http://127.0.0.1:4317`; empty: no export.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl TelemetryOptions {
    /// The telemetry section of a broker configuration.
    pub fn from_config(telemetry: &crate::config::Telemetry) -> TelemetryOptions {
        TelemetryOptions {
            log_format: telemetry.log_format.clone(),
            log_filter: telemetry.log_filter.clone(),
            otlp_endpoint: telemetry.otlp_endpoint.clone(),
            service_name: "lienthong-broker".into(),
        }
    }
}

/// Why logging or tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("{origin} {filter:?} is not a valid log filter: {message}")]
    Filter {
        /// Where it came from: `RUST_LOG` or `telemetry.log_filter`.
        origin: &'static str,
        /// The filter text.
        filter: String,
        /// The parser's message.
        message: String,
    },
    /// The OTLP endpoint is unusable.
    #[error("otlp endpoint {endpoint:?}: {message}")]
    Otlp {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
}

/// Checks an OTLP endpoint the way [`init`] will use it.
pub fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.is_empty() {
        return Ok(());
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("not a URL like http://127.0.0.1:4317 ({e})"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(()),
        Some("https") => Err("https is not supported: export to a collector on this host or network over http".into()),
        _ => Err("not a URL like http://127.0.0.1:4317".into()),
    }
}

/// Checks a `RUST_LOG`-style filter.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Keeps span export running; [`TelemetryGuard::shutdown`] flushes the spans
/// still buffered. Dropping it without calling `shutdown` flushes too, but
/// blocks the dropping thread.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            // The SDK blocks while the batch thread flushes; keep that off the
            // runtime's workers, which drive the exporter's gRPC channel.
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "span exporter did not shut down cleanly");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process-wide subscriber: logs to stderr in `log_format`,
/// filtered by `RUST_LOG` when set, else by `log_filter`; with an OTLP
/// endpoint, spans are also batched to it over gRPC. Must run inside a Tokio
/// runtime when exporting. A second call keeps the first subscriber.
pub fn init(options: &TelemetryOptions) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::builder().parse(&env).map_err(|e| TelemetryError::Filter {
            origin: "RUST_LOG",
            filter: env.clone(),
            message: e.to_string(),
        })?,
        _ => EnvFilter::builder()
            .parse(&options.log_filter)
            .map_err(|e| TelemetryError::Filter {
                origin: "telemetry.log_filter",
                filter: options.log_filter.clone(),
                message: e.to_string(),
            })?,
    };
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal: they garble log files and
    // cost a third of the formatting time of a span.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // The filter applies to the log lines only, so exported traces keep the
    // broker's debug-level steps (authorize, validate, audit commit) whatever
    // the log level; without export those spans are never even created.
    let fmt = if options.log_format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let (otel, provider) = if options.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let provider = otlp_provider(&options.otlp_endpoint, &options.service_name)?;
        let tracer = provider.tracer("lienthong");
        // lienthong's own spans only: the exporter's gRPC client logs through
        // `tracing` too, and exporting those spans would feed it its own traffic.
        let ours = Targets::new().with_target("lienthong", LevelFilter::DEBUG);
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours);
        (Some(layer), Some(provider))
    };
    let installed = tracing_subscriber::registry().with(fmt).with(otel).try_init().is_ok();
    if !installed {
        // Tests and embedders may have their own subscriber: keep it.
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Ok(TelemetryGuard { provider: None });
    }
    if provider.is_some() {
        tracing::info!(endpoint = %options.otlp_endpoint, "exporting spans over otlp/grpc");
    }
    Ok(TelemetryGuard { provider })
}

fn otlp_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let otlp = |message: String| TelemetryError::Otlp {
        endpoint: endpoint.to_string(),
        message,
    };
    check_otlp_endpoint(endpoint).map_err(otlp)?;
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| otlp(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The caller's trace, from its `traceparent` (and `tracestate`) header;
/// invalid or absent headers give an invalid span context.
pub fn remote_parent(metadata: &MetadataMap) -> SpanContext {
    if !metadata.contains_key("traceparent") {
        return SpanContext::empty_context();
    }
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &MetadataExtractor(metadata));
    cx.span().span_context().clone()
}

/// Makes `span` a child of the caller's span when the caller sent one and
/// spans are exported; otherwise does nothing.
pub fn continue_trace(span: &Span, remote: &SpanContext) {
    if remote.is_valid() {
        // Fails only without an OpenTelemetry layer, where there is no parent to set.
        let _ = span.set_parent(Context::new().with_remote_span_context(remote.clone()));
    }
}

/// The span context of `span` when spans are exported, else invalid.
pub fn span_context(span: &Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// The trace id to write into the audit log: the broker's span's when spans
/// are exported (it continues the caller's trace, or starts one), else the
/// caller's; empty when there is none.
pub fn trace_id(span: &Span, remote: &SpanContext) -> String {
    let own = span_context(span);
    if own.is_valid() {
        own.trace_id().to_string()
    } else if remote.is_valid() {
        remote.trace_id().to_string()
    } else {
        String::new()
    }
}

/// Writes the trace context a provider call carries: the context of `span`
/// (the broker's provider-call span) when spans are exported; otherwise the
/// caller's trace id under a fresh parent id; nothing when there is no trace.
pub fn inject(span: &Span, remote: &SpanContext, metadata: &mut MetadataMap) {
    let own = span_context(span);
    let context = if own.is_valid() {
        own
    } else if remote.is_valid() {
        SpanContext::new(
            remote.trace_id(),
            RandomIdGenerator::default().new_span_id(),
            remote.trace_flags(),
            false,
            remote.trace_state().clone(),
        )
    } else {
        return;
    };
    TraceContextPropagator::new().inject_context(
        &Context::new().with_remote_span_context(context),
        &mut MetadataInjector(metadata),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_parent(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("traceparent", value.parse().unwrap());
        m
    }

    #[test]
    fn a_consumer_traceparent_is_read() {
        let remote = remote_parent(&with_parent(PARENT));
        assert!(remote.is_valid() && remote.is_remote() && remote.is_sampled());
        assert_eq!(
            remote.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(remote.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(!remote_parent(&with_parent(bad)).is_valid(), "{bad}");
        }
        assert!(!remote_parent(&MetadataMap::new()).is_valid());
    }

    #[test]
    fn without_exported_spans_the_provider_gets_the_consumer_trace_under_a_new_parent() {
        // No OpenTelemetry layer in this test: the span has no context of its own.
        let remote = remote_parent(&with_parent(PARENT));
        let mut out = MetadataMap::new();
        inject(&Span::none(), &remote, &mut out);
        let sent = remote_parent(&out);
        assert!(sent.is_valid());
        assert_eq!(sent.trace_id(), remote.trace_id());
        assert_ne!(sent.span_id(), remote.span_id(), "the broker's hop has its own id");
        assert_eq!(sent.trace_flags(), TraceFlags::SAMPLED);
        assert_eq!(trace_id(&Span::none(), &remote), "4bf92f3577b34da6a3ce929d0e0e4736");

        let mut none = MetadataMap::new();
        inject(&Span::none(), &SpanContext::empty_context(), &mut none);
        assert!(none.is_empty(), "no trace, no header");
        assert_eq!(trace_id(&Span::none(), &SpanContext::empty_context()), "");
    }

    /// An OTLP/gRPC collector that hands every export to the test.
    struct Collector(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_collector() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let provider = otlp_provider(&format!("http://{addr}"), "lienthong-test").unwrap();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let remote = remote_parent(&with_parent(PARENT));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("lookup", consumer = "office", outcome = "allowed");
            continue_trace(&span, &remote);
            let _inner = tracing::info_span!(parent: &span, "authorize").entered();
        });
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .unwrap()
            .unwrap();
        let export = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the collector got an export")
            .unwrap();
        let resource = export.resource_spans[0].resource.as_ref().unwrap();
        assert!(
            resource
                .attributes
                .iter()
                .any(|kv| kv.key == "service.name" && format!("{:?}", kv.value).contains("lienthong-test")),
            "{resource:?}"
        );
        let spans: Vec<_> = export
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        let lookup = spans.iter().find(|s| s.name == "lookup").unwrap();
        assert_eq!(hex_of(&lookup.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex_of(&lookup.parent_span_id), "00f067aa0ba902b7");
        let authorize = spans.iter().find(|s| s.name == "authorize").unwrap();
        assert_eq!(authorize.parent_span_id, lookup.span_id);
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn configuration_values_are_checked() {
        assert!(check_otlp_endpoint("").is_ok());
        assert!(check_otlp_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(
            check_otlp_endpoint("https://collector:4317")
                .unwrap_err()
                .contains("https")
        );
        assert!(check_otlp_endpoint("127.0.0.1:4317").is_err());
        assert!(check_log_filter("info,lienthong_broker=debug").is_ok());
        assert!(check_log_filter("info,lienthong_broker=loud").is_err());
    }
}
