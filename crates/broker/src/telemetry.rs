//! Logs and traces: the process-wide `tracing` subscriber (human-readable or
//! JSON logs, `RUST_LOG`-style filter, optional OTLP/gRPC span export) and
//! the W3C trace-context helpers the Exchange and the relay use to continue a
//! consumer's trace and hand it on to providers.
//!
//! Without an OTLP endpoint no OpenTelemetry layer is installed: spans are
//! plain `tracing` spans feeding the log lines, and a consumer's trace id is
//! still passed on to providers (under a fresh parent id standing for the
//! broker's hop), so logs on both sides of the relay correlate.
//!
//! Spans say which member read which record type, under which purpose and
//! request id: an `https` endpoint is verified against `telemetry.otlp_ca`
//! (optionally presenting `telemetry.otlp_cert`), and a plain `http` one that
//! leaves the host is warned about at start.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lienthong::trace_context::{MetadataExtractor, MetadataInjector};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
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
    /// OTLP/gRPC collector such as `https://collector:4317` or
    /// `http://127.0.0.1:4317`; empty: no export.
    pub otlp_endpoint: String,
    /// CA certificates (PEM) an `https` collector's certificate must chain to.
    pub otlp_ca: PathBuf,
    /// Client certificate chain (PEM) for a collector that requires mutual TLS; empty: none.
    pub otlp_cert: PathBuf,
    /// Private key (PEM) of `otlp_cert`.
    pub otlp_key: PathBuf,
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
            otlp_ca: telemetry.otlp_ca.clone(),
            otlp_cert: telemetry.otlp_cert.clone(),
            otlp_key: telemetry.otlp_key.clone(),
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
    /// An OTLP setting is unusable.
    #[error("otlp: {0}")]
    Setting(#[from] InvalidSetting),
    /// The OTLP exporter could not be built.
    #[error("otlp endpoint {endpoint:?}: {message}")]
    Otlp {
        /// The configured endpoint, without credentials or query.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
}

/// A telemetry setting that cannot be used, named by its configuration key.
#[derive(Debug, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct InvalidSetting {
    /// Dotted configuration key, e.g. `telemetry.otlp_ca`.
    pub key: &'static str,
    /// What is wrong and what to do instead.
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        key,
        message: message.into(),
    }
}

/// How long one export may take, the TLS handshake included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `endpoint` without its userinfo (`user:password@`), query or fragment,
/// for logs and error messages; also for text that does not parse as a URL.
pub fn redact_endpoint(endpoint: &str) -> Cow<'_, str> {
    let start = endpoint.find("://").map_or(0, |i| i + 3);
    let (prefix, rest) = endpoint.split_at(start);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let authority_end = rest.find('/').unwrap_or(rest.len());
    // The last '@' ends the userinfo: a password may itself hold an '@'.
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    if prefix.len() + rest.len() == endpoint.len() {
        Cow::Borrowed(endpoint)
    } else {
        Cow::Owned(format!("{prefix}{rest}"))
    }
}

/// Whether `endpoint` carries userinfo (`user[:password]@`) before its host.
fn has_userinfo(endpoint: &str) -> bool {
    let start = endpoint.find("://").map_or(0, |i| i + 3);
    let rest = &endpoint[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..authority_end].contains('@')
}

/// The endpoint as a URI with a host; `https` tells whether TLS is asked for.
fn parse_endpoint(endpoint: &str) -> Result<(http::Uri, bool), InvalidSetting> {
    const KEY: &str = "telemetry.otlp_endpoint";
    const LIKE: &str = "not a URL like https://collector.example:4317 or http://127.0.0.1:4317";
    // Refused rather than stripped or used: tonic would send
    // `user:password@host` as the `:authority` of every export (h2 copies it
    // whole; no collector authenticates from it), and config files and logs
    // are passed around. Collectors authenticate by a client certificate or a
    // header, both supported, neither written into the address.
    if has_userinfo(endpoint) {
        return Err(invalid(
            KEY,
            format!(
                "{:?} holds credentials (user:password@); put none in the URL: use a client certificate \
                 (telemetry.otlp_cert and telemetry.otlp_key) or a header in the broker's environment \
                 (OTEL_EXPORTER_OTLP_HEADERS=\"authorization=...\") over https",
                redact_endpoint(endpoint)
            ),
        ));
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| invalid(KEY, format!("{:?} is {LIKE} ({e})", redact_endpoint(endpoint))))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(invalid(KEY, format!("{:?} is {LIKE}", redact_endpoint(endpoint)))),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(KEY, format!("{:?} is {LIKE}", redact_endpoint(endpoint))));
    }
    Ok((uri, https))
}

/// Checks the OTLP settings the way [`init`] will use them, files' presence
/// included (their contents are read at start); the error names the key.
pub fn check_otlp(options: &TelemetryOptions) -> Result<(), InvalidSetting> {
    if options.otlp_endpoint.is_empty() {
        return Ok(());
    }
    let (_, https) = parse_endpoint(&options.otlp_endpoint)?;
    let files = [
        ("telemetry.otlp_ca", &options.otlp_ca),
        ("telemetry.otlp_cert", &options.otlp_cert),
        ("telemetry.otlp_key", &options.otlp_key),
    ];
    let set = |path: &PathBuf| !path.as_os_str().is_empty();
    if !https {
        // Someone who names a CA or a client certificate expects encryption:
        // do not let an `http` endpoint quietly send the spans in clear.
        if let Some((key, _)) = files.iter().find(|(_, path)| set(path)) {
            return Err(invalid(
                key,
                format!(
                    "is set but telemetry.otlp_endpoint {:?} is plain http, so spans would not be encrypted: \
                     use an https:// endpoint",
                    redact_endpoint(&options.otlp_endpoint)
                ),
            ));
        }
        return Ok(());
    }
    if !set(&options.otlp_ca) {
        return Err(invalid(
            "telemetry.otlp_ca",
            "an https telemetry.otlp_endpoint needs the PEM file of the CA that signed the collector's certificate",
        ));
    }
    match (set(&options.otlp_cert), set(&options.otlp_key)) {
        (true, false) => {
            return Err(invalid(
                "telemetry.otlp_key",
                "telemetry.otlp_cert is set: give its private key too (PEM)",
            ));
        }
        (false, true) => {
            return Err(invalid(
                "telemetry.otlp_cert",
                "telemetry.otlp_key is set: give its certificate too (PEM)",
            ));
        }
        _ => {}
    }
    for (key, path) in files {
        if set(path) && !path.is_file() {
            return Err(invalid(key, format!("file {} does not exist", path.display())));
        }
    }
    Ok(())
}

/// Whether spans to `endpoint` would cross the network unencrypted: plain
/// `http` to anything but a loopback address or `localhost`.
pub fn exports_in_clear_off_host(endpoint: &str) -> bool {
    let Ok((uri, false)) = parse_endpoint(endpoint) else {
        return false;
    };
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => !ip.is_loopback(),
        Err(_) => {
            let host = host.to_ascii_lowercase();
            host != "localhost" && !host.ends_with(".localhost")
        }
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
        let provider = otlp_provider(options)?;
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
        announce_export(options);
    }
    Ok(TelemetryGuard { provider })
}

/// Says where spans go, warning when they cross the network in clear (as
/// the metrics listener warns when it is reachable from the network).
fn announce_export(options: &TelemetryOptions) {
    // Never the configured text itself: it is where credentials get pasted.
    let endpoint = redact_endpoint(&options.otlp_endpoint);
    if exports_in_clear_off_host(&options.otlp_endpoint) {
        tracing::warn!(
            %endpoint,
            "spans are exported unencrypted over the network; use an https endpoint with telemetry.otlp_ca"
        );
        return;
    }
    let tls = match parse_endpoint(&options.otlp_endpoint) {
        Ok((_, true)) if options.otlp_cert.as_os_str().is_empty() => "server",
        Ok((_, true)) => "mutual",
        _ => "none",
    };
    tracing::info!(%endpoint, tls = %tls, "exporting spans over otlp/grpc");
}

fn otlp_provider(options: &TelemetryOptions) -> Result<SdkTracerProvider, TelemetryError> {
    check_otlp(options)?;
    let endpoint = &options.otlp_endpoint;
    let otlp = |message: String| TelemetryError::Otlp {
        endpoint: redact_endpoint(endpoint).into_owned(),
        // The exporter's messages may quote the endpoint.
        message: message.replace(endpoint.as_str(), &redact_endpoint(endpoint)),
    };
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT);
    if let Some(tls) = otlp_tls(options)? {
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build().map_err(|e| otlp(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(options.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The TLS settings of an `https` endpoint, `None` for `http`. The files
/// are parsed and tried in a rustls client config here, so that a wrong file
/// stops the start with its key named rather than failing every export
/// (tonic skips a certificate it cannot parse without a word).
fn otlp_tls(options: &TelemetryOptions) -> Result<Option<ClientTlsConfig>, TelemetryError> {
    let (_, https) = parse_endpoint(&options.otlp_endpoint)?;
    if !https {
        return Ok(None);
    }
    // tonic's connector takes the process default; the same `ring` as every
    // other TLS connection of the broker.
    lienthong_tls::install_crypto_provider();
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let ca_pem = read_file("telemetry.otlp_ca", &options.otlp_ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("telemetry.otlp_ca", &options.otlp_ca, &ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| file_error("telemetry.otlp_ca", &options.otlp_ca, e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("telemetry.otlp_ca", &options.otlp_ca, e))?
        .with_root_certificates(roots);
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .timeout(EXPORT_TIMEOUT);
    if !options.otlp_cert.as_os_str().is_empty() {
        let cert_pem = read_file("telemetry.otlp_cert", &options.otlp_cert)?;
        // A private key: refused when others can read it, as the broker's own.
        let key_pem = lienthong_tls::read_private_key(&options.otlp_key, lienthong_tls::GroupAccess::Warn)
            .map(String::into_bytes)
            .map_err(|e| invalid("telemetry.otlp_key", e.to_string()))?;
        let chain = certificates("telemetry.otlp_cert", &options.otlp_cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            file_error(
                "telemetry.otlp_key",
                &options.otlp_key,
                format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        config.with_client_auth_cert(chain, key).map_err(|e| {
            file_error(
                "telemetry.otlp_key",
                &options.otlp_key,
                format!("unusable with telemetry.otlp_cert: {e}"),
            )
        })?;
        tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(Some(tls))
}

fn file_error(key: &'static str, path: &Path, message: impl std::fmt::Display) -> InvalidSetting {
    invalid(key, format!("{}: {message}", path.display()))
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, InvalidSetting> {
    std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot read: {e}")))
}

fn certificates(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, InvalidSetting> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no PEM certificate in it"));
    }
    Ok(certs)
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

    /// One export as the collector got it, with the client certificate
    /// (DER) the exporter presented, if any.
    type Received = (ExportTraceServiceRequest, Option<Vec<u8>>);

    /// An OTLP/gRPC collector that hands every export to the test.
    struct Collector(tokio::sync::mpsc::UnboundedSender<Received>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let peer = request
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
            let _ = self.0.send((request.into_inner(), peer));
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use tonic::transport::ServerTlsConfig;

    /// Serves a collector on a loopback port, over TLS when `tls` is given.
    async fn collector(
        tls: Option<ServerTlsConfig>,
    ) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        tokio::spawn(
            server
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, rx)
    }

    fn options(endpoint: &str) -> TelemetryOptions {
        TelemetryOptions {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: endpoint.into(),
            otlp_ca: PathBuf::new(),
            otlp_cert: PathBuf::new(),
            otlp_key: PathBuf::new(),
            service_name: "lienthong-test".into(),
        }
    }

    /// Records a lookup span (continuing [`PARENT`]) with an `authorize`
    /// child through an exporter built from `options`, then flushes it.
    async fn export_a_lookup(options: &TelemetryOptions) {
        let provider = otlp_provider(options).unwrap();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let remote = remote_parent(&with_parent(PARENT));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("lookup", consumer = "office", outcome = "allowed");
            continue_trace(&span, &remote);
            let _inner = tracing::info_span!(parent: &span, "authorize").entered();
        });
        // A failed export is the collector's business to notice (the tests
        // that expect one check that nothing arrived).
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await.unwrap();
    }

    async fn received(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>) -> Received {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the collector got an export")
            .unwrap()
    }

    fn span_names(export: &ExportTraceServiceRequest) -> Vec<&str> {
        export
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.name.as_str())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_collector() {
        let (addr, mut rx) = collector(None).await;
        export_a_lookup(&options(&format!("http://{addr}"))).await;
        let (export, peer) = received(&mut rx).await;
        assert!(peer.is_none());
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

    /// A CA, a collector certificate for `localhost`/127.0.0.1 and a client
    /// certificate, the client's and the CA's written to `dir`.
    struct Pki {
        ca: lienthong_tls::CertificateAuthority,
        collector: lienthong_tls::IssuedCert,
        client: lienthong_tls::IssuedCert,
        ca_file: PathBuf,
        cert_file: PathBuf,
        key_file: PathBuf,
    }

    fn pki(dir: &Path) -> Pki {
        let ca = lienthong_tls::CertificateAuthority::generate("otlp.test").unwrap();
        let collector = ca.issue(&lienthong_tls::IssueSpec::member("collector")).unwrap();
        let client = ca.issue(&lienthong_tls::IssueSpec::broker()).unwrap();
        let ca_file = dir.join("collector-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let (cert_file, key_file) = client.write(dir, "otlp-client").unwrap();
        Pki {
            ca,
            collector,
            client,
            ca_file,
            cert_file,
            key_file,
        }
    }

    fn server_tls(cert: &lienthong_tls::IssuedCert) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_https_collector_that_requires_a_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        // The collector refuses a connection without a certificate from this CA.
        let tls = server_tls(&pki.collector).client_ca_root(Certificate::from_pem(pki.ca.cert_pem()));
        let (addr, mut rx) = collector(Some(tls)).await;
        let mut options = options(&format!("https://localhost:{}", addr.port()));
        options.otlp_ca = pki.ca_file.clone();
        options.otlp_cert = pki.cert_file.clone();
        options.otlp_key = pki.key_file.clone();
        export_a_lookup(&options).await;
        let (export, peer) = received(&mut rx).await;
        assert_eq!(
            peer,
            Some(der(&pki.client.cert_pem)),
            "the configured client certificate"
        );
        let names = span_names(&export);
        assert!(names.contains(&"lookup") && names.contains(&"authorize"), "{names:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_https_collector_verified_against_the_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let (addr, mut rx) = collector(Some(server_tls(&pki.collector))).await;
        let mut options = options(&format!("https://127.0.0.1:{}", addr.port()));
        options.otlp_ca = pki.ca_file.clone();
        export_a_lookup(&options).await;
        let (export, peer) = received(&mut rx).await;
        assert!(peer.is_none(), "no client certificate configured, none sent");
        assert!(span_names(&export).contains(&"lookup"));
    }

    /// Verification is real: a collector whose certificate another CA
    /// signed, or that names another host, gets nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_https_collector_that_fails_verification_gets_no_spans() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let stranger = lienthong_tls::CertificateAuthority::generate("otlp.test")
            .unwrap()
            .issue(&lienthong_tls::IssueSpec::member("collector"))
            .unwrap();
        let elsewhere = pki
            .ca
            .issue(&lienthong_tls::IssueSpec {
                hosts: vec!["collector.example".into()],
                ..lienthong_tls::IssueSpec::member("collector")
            })
            .unwrap();
        for (case, cert) in [("foreign CA", &stranger), ("other host name", &elsewhere)] {
            let (addr, mut rx) = collector(Some(server_tls(cert))).await;
            let mut options = options(&format!("https://localhost:{}", addr.port()));
            options.otlp_ca = pki.ca_file.clone();
            export_a_lookup(&options).await;
            assert!(rx.try_recv().is_err(), "{case}: spans were sent");
        }
    }

    #[test]
    fn unusable_tls_files_stop_the_start_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        use std::os::unix::fs::PermissionsExt;
        let owner_only = |path: &PathBuf| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        owner_only(&garbage);
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, pki.collector.key_pem.as_str()).unwrap();
        owner_only(&other_key);
        // The right key, but anyone on the host may read it.
        let open_key = dir.path().join("open.key");
        std::fs::write(&open_key, std::fs::read(&pki.key_file).unwrap()).unwrap();
        std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut base = options("https://localhost:4317");
        base.otlp_ca = pki.ca_file.clone();
        base.otlp_cert = pki.cert_file.clone();
        base.otlp_key = pki.key_file.clone();
        assert!(otlp_tls(&base).unwrap().is_some());
        let with = |change: fn(&mut TelemetryOptions, PathBuf), path: &PathBuf| {
            let mut options = base.clone();
            change(&mut options, path.clone());
            options
        };
        for (key, spoiled, why) in [
            (
                "telemetry.otlp_ca",
                with(|o, p| o.otlp_ca = p, &garbage),
                "no PEM certificate",
            ),
            (
                "telemetry.otlp_cert",
                with(|o, p| o.otlp_cert = p, &garbage),
                "no PEM certificate",
            ),
            (
                "telemetry.otlp_key",
                with(|o, p| o.otlp_key = p, &garbage),
                "no PEM private key",
            ),
            (
                "telemetry.otlp_key",
                with(|o, p| o.otlp_key = p, &other_key),
                "unusable with",
            ),
            (
                "telemetry.otlp_key",
                with(|o, p| o.otlp_key = p, &open_key),
                "chmod 600",
            ),
        ] {
            let e = otlp_tls(&spoiled).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{e}");
        }
        assert!(otlp_tls(&options("http://127.0.0.1:4317")).unwrap().is_none());
    }

    #[test]
    fn endpoints_are_logged_without_credentials_or_query() {
        for (given, shown) in [
            ("http://otlpuser:T0kenPW@203.0.113.9:4317", "http://203.0.113.9:4317"),
            (
                "https://u:p@ss@collector:4317/v1?token=abc#x",
                "https://collector:4317/v1",
            ),
            ("otlpuser:T0kenPW@203.0.113.9:4317", "203.0.113.9:4317"),
            ("http://u:p@not a url", "http://not a url"),
            ("http://collector:4317/a@b", "http://collector:4317/a@b"),
            ("http://127.0.0.1:4317", "http://127.0.0.1:4317"),
            ("", ""),
        ] {
            assert_eq!(redact_endpoint(given), shown, "{given}");
        }
        assert!(matches!(redact_endpoint("http://127.0.0.1:4317"), Cow::Borrowed(_)));
    }

    #[test]
    fn credentials_in_the_endpoint_are_refused_without_being_repeated() {
        let e = init(&options("http://otlpuser:T0kenPW@203.0.113.9:4317"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("otlp_cert") && e.contains("OTEL_EXPORTER_OTLP_HEADERS"),
            "{e}"
        );
        assert!(!e.contains("T0kenPW") && !e.contains("otlpuser"), "{e}");
    }

    /// Captures what a `fmt` subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn announced(options: &TelemetryOptions) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || announce_export(options));
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn plain_http_off_this_host_is_warned_about() {
        let log = announced(&options("http://203.0.113.9:4317/?token=abc"));
        assert!(log.contains("WARN") && log.contains("unencrypted"), "{log}");
        assert!(
            log.contains("endpoint=http://203.0.113.9:4317/") && !log.contains("abc"),
            "{log}"
        );
        for quiet in ["http://127.0.0.1:4317", "http://[::1]:4317", "http://localhost:4317"] {
            let log = announced(&options(quiet));
            assert!(log.contains("INFO") && log.contains("tls=none"), "{quiet}: {log}");
        }
        let mut https = options("https://collector.example:4317");
        https.otlp_ca = PathBuf::from("ca.pem");
        let log = announced(&https);
        assert!(log.contains("INFO") && log.contains("tls=server"), "{log}");
        https.otlp_cert = PathBuf::from("client.pem");
        assert!(announced(&https).contains("tls=mutual"));
        for (endpoint, off_host) in [
            ("http://10.1.2.3:4317", true),
            ("http://otel-collector.observability.svc.cluster.local:4317", true),
            ("http://127.0.0.1:4317", false),
            ("http://LOCALHOST:4317", false),
            ("https://203.0.113.9:4317", false),
            ("", false),
        ] {
            assert_eq!(exports_in_clear_off_host(endpoint), off_host, "{endpoint}");
        }
    }

    #[test]
    fn configuration_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let check = |o: &TelemetryOptions| check_otlp(o).map_err(|e| e.to_string());
        assert!(check(&options("")).is_ok());
        assert!(check(&options("http://127.0.0.1:4317")).is_ok());
        assert!(
            check(&options("http://203.0.113.9:4317")).is_ok(),
            "accepted, warned about at start"
        );
        for bad in ["127.0.0.1:4317", "ftp://collector:4317", "http://", "https:///x"] {
            let e = check(&options(bad)).unwrap_err();
            assert!(e.contains("telemetry.otlp_endpoint"), "{bad}: {e}");
        }
        let mut https = options("https://collector:4317");
        assert!(check(&https).unwrap_err().contains("telemetry.otlp_ca"));
        https.otlp_ca = pki.ca_file.clone();
        assert!(check(&https).is_ok());
        https.otlp_cert = pki.cert_file.clone();
        assert!(check(&https).unwrap_err().contains("telemetry.otlp_key"));
        https.otlp_key = pki.key_file.clone();
        assert!(check(&https).is_ok());
        https.otlp_cert = PathBuf::new();
        assert!(check(&https).unwrap_err().contains("telemetry.otlp_cert"));
        let mut clear = options("http://collector:4317");
        clear.otlp_key = pki.key_file.clone();
        let e = check(&clear).unwrap_err();
        assert!(e.contains("telemetry.otlp_key") && e.contains("https://"), "{e}");
        assert!(check_log_filter("info,lienthong_broker=debug").is_ok());
        assert!(check_log_filter("info,lienthong_broker=loud").is_err());
    }
}
