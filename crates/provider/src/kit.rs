//! The provider kit: implement [`RecordSource`], call [`serve`], and the register
//! answers the broker's `lienthong.provider.v1.RecordProvider/Fetch` over mutual TLS.
//!
//! The kit takes care of what every register must get right the same way: only
//! the broker may call, the query is parsed once, errors map to the gRPC codes
//! the broker understands, the caller's trace is continued, one log line per
//! fetch that never contains the query (it holds national IDs), and a standard
//! `grpc.health.v1.Health` service.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use futures::FutureExt;
use lienthong::provider::v1::record_provider_server::{RecordProvider, RecordProviderServer};
use lienthong::provider::v1::{FetchRequest, FetchResponse};
use lienthong_tls::{
    AcceptOptions, AuthError, FailureLog, Identity, PeerInfo, ServerTls, TlsFiles, TlsMaterial, incoming, peer_info,
};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::edge::{Connections, EdgeLayer, NonBrokerLimits};

/// One lookup, as the broker asked for it.
///
/// Answer it with the whole record, valid against the registered record
/// schema of `schema_version`, about the subject the query names (the broker
/// refuses a record about another); with [`FetchError::NotFound`] when there
/// is none (an empty object is a record, not "none").
#[derive(Clone, Debug)]
pub struct FetchContext {
    /// Record type name, e.g. `civil_status.birth_record`.
    pub record_type: String,
    /// Version of the registered record schema the answer must be valid
    /// against: honour it, as a new version is served before it is
    /// registered.
    pub schema_version: u32,
    /// The query, already valid against the registered query schema. Holds
    /// subject identifiers: never log it.
    pub query: Value,
    /// The consumer's correlation id (its `x-request-id` or `request_id`),
    /// or a UUID the broker made when it sent none: for correlating logs.
    /// Free text the consumer chose, neither unique nor trustworthy; any
    /// control character in it written as its escape (`\n`, `\u{1b}`), as
    /// the kit logs it.
    pub request_id: String,
    /// Consumer member the lookup is made for.
    pub consumer: String,
    /// Legal basis stated by the consumer.
    pub purpose: String,
    /// JSON Pointers of the fields the consumer will receive: what will be
    /// released, for the register's own log and minimisation decisions.
    /// Return the whole record regardless: the broker validates all of it
    /// against the record schema (a record missing a required property is
    /// refused, and the consumer gets `DATA_LOSS`), then filters it.
    pub fields: Vec<String>,
    /// When the broker stops waiting for the answer (its `grpc-timeout`),
    /// if it set one: size the register's own database timeout to it, as an
    /// answer after it is thrown away. The fetch is dropped at that instant.
    pub deadline: Option<Instant>,
}

/// Why a register cannot answer; each maps to the gRPC code the broker expects.
///
/// Messages go back to the broker, which acts on the code alone and passes no
/// register's words on (not to the consumer, its logs or the audit log); they
/// still cross the wire and reach the register's own log, so never put a
/// national ID or other subject data in them.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No record for this subject (`NOT_FOUND`); only that.
    #[error("{0}")]
    NotFound(String),
    /// The register rejects the query (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidQuery(String),
    /// The register does not serve this record type (`UNIMPLEMENTED`; the
    /// consumer gets `FAILED_PRECONDITION`): not "no such record", which
    /// would tell the consumer the citizen has none.
    #[error("{0}")]
    NotServed(String),
    /// Temporary trouble, e.g. the database is down; the broker may retry
    /// on another endpoint (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the register itself (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

impl FetchError {
    /// Short outcome label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            FetchError::NotFound(_) => "not_found",
            FetchError::InvalidQuery(_) => "invalid_query",
            FetchError::NotServed(_) => "not_served",
            FetchError::Unavailable(_) => "unavailable",
            FetchError::Internal(_) => "internal",
        }
    }
}

impl From<FetchError> for Status {
    fn from(error: FetchError) -> Self {
        match error {
            FetchError::NotFound(m) => Status::not_found(m),
            FetchError::InvalidQuery(m) => Status::invalid_argument(m),
            FetchError::NotServed(m) => Status::unimplemented(m),
            FetchError::Unavailable(m) => Status::unavailable(m),
            FetchError::Internal(m) => Status::internal(m),
        }
    }
}

/// A register's data: what it serves and how to look one record up.
#[async_trait::async_trait]
pub trait RecordSource: Send + Sync + 'static {
    /// Record types served; fetches for any other type get `UNIMPLEMENTED`.
    fn record_types(&self) -> Vec<String>;

    /// Looks up one record. Must be free of side effects: the broker may retry.
    async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError>;
}

/// How the kit serves.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// The federation's SPIFFE trust domain, e.g. `gov.example`.
    pub trust_domain: String,
    /// The member whose register this is, e.g. `civil-status`: when set,
    /// [`serve`] refuses to start with a certificate naming another member
    /// (the broker would refuse it at every handshake).
    pub member: Option<String>,
    /// Limits on TLS handshakes.
    pub accept: AcceptOptions,
    /// Broker certificates refused although the federation CA signed them,
    /// by SHA-256 fingerprint: a leaked broker key is shut out here, once the
    /// brokers present their new certificate, without rolling the CA.
    pub refused_certificates: RefusedCertificates,
    /// After the shutdown signal, how long fetches in flight may take to
    /// finish before [`serve`] returns without them: a fetch stuck on the
    /// register's own database must not keep the register from stopping.
    /// A fetch abandoned so goes on in the background until it ends or the
    /// process exits, which closes its connection.
    pub shutdown_grace: Duration,
    /// Calls at once on one connection (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`); the broker queues calls past it.
    pub max_concurrent_streams: u32,
    /// How often the register pings a connection that is quiet, and how long
    /// it waits for the answer before closing it: a broker that vanished
    /// without closing does not hold a connection for ever.
    pub http2_keepalive_interval: Duration,
    /// See [`ProviderConfig::http2_keepalive_interval`].
    pub http2_keepalive_timeout: Duration,
    /// Largest `FetchRequest` accepted, in bytes; a larger one is refused
    /// with `RESOURCE_EXHAUSTED` before it is buffered whole.
    pub max_request_bytes: usize,
    /// Largest answer (`FetchResponse`, encoded) sent, in bytes: the broker
    /// refuses a larger one, so the kit fails such a fetch with `INTERNAL`
    /// and logs why rather than logging it as answered.
    pub max_answer_bytes: usize,
    /// How long a connection of a peer that is not the broker (no
    /// certificate, a member's, a refused one) stays open: long enough for a
    /// health check or to read why it is refused, then it is closed.
    pub non_broker_connection_lifetime: Duration,
    /// Connections of peers that are not the broker open at once; one more
    /// is closed as soon as its handshake ends. The broker's own connections
    /// are not counted, so such peers cannot crowd it out.
    pub max_non_broker_connections: usize,
    /// The files the register's TLS was loaded from, when it should take
    /// their new contents (a renewed certificate, a CA bundle for a CA roll)
    /// without a restart: [`serve`] looks at them every
    /// [`ProviderConfig::tls_reload_every`] and serves new contents that pass
    /// its start-up check from the next connection on; others are logged and
    /// the certificate served before stays.
    pub tls_files: Option<TlsFiles>,
    /// See [`ProviderConfig::tls_files`].
    pub tls_reload_every: Duration,
    /// With [`ProviderConfig::tls_files`]: each notification has [`serve`]
    /// look at the files at once rather than at its next look (as SIGHUP
    /// does for `lienthong demo-provider` and the broker).
    pub tls_reload_now: Option<Arc<tokio::sync::Notify>>,
}

/// [`ProviderConfig::shutdown_grace`] unless set: longer than the broker's
/// default deadline for a register call, so that a healthy drain loses nothing.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// [`ProviderConfig::max_concurrent_streams`] unless set: the broker's
/// default concurrency limit per register (`relay.provider_concurrency`),
/// so that it never waits on this one.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1_024;

/// [`ProviderConfig::max_request_bytes`] unless set. A `FetchRequest` holds a
/// record type, a query valid against its query schema (a national ID, a
/// date), a few ids and the granted fields' JSON Pointers: a few KB. tonic's
/// default of 4 MiB would let every stream hold that much while it is read.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// [`ProviderConfig::max_answer_bytes`] unless set: the largest answer the
/// broker accepts from a register, 4 MiB (its answer to the consumer is
/// bounded by `limits.max_message_bytes`, 4 MiB by default, too).
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

impl ProviderConfig {
    /// Default limits and grace period for `trust_domain`, no certificate
    /// refused.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        ProviderConfig {
            trust_domain: trust_domain.into(),
            member: None,
            accept: AcceptOptions::default(),
            refused_certificates: RefusedCertificates::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            // As the broker's own server does.
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            // A health check or a refusal takes a round trip or two.
            non_broker_connection_lifetime: Duration::from_secs(10),
            tls_files: None,
            tls_reload_every: Duration::from_secs(60),
            tls_reload_now: None,
            // Load balancers' probes and the odd misconfigured client; well
            // under the accept loop's 256 handshakes at once.
            max_non_broker_connections: 64,
        }
    }
}

/// The broker certificates a register refuses, by SHA-256 fingerprint.
///
/// Clones share one list, which may change while the register serves: a
/// change applies to open connections too, from their next fetch.
#[derive(Clone, Debug, Default)]
pub struct RefusedCertificates(Arc<ArcSwap<HashSet<[u8; 32]>>>);

impl RefusedCertificates {
    /// A list holding `fingerprints`.
    pub fn new(fingerprints: HashSet<[u8; 32]>) -> Self {
        RefusedCertificates(Arc::new(ArcSwap::from_pointee(fingerprints)))
    }

    /// Replaces the list, for every clone.
    pub fn replace(&self, fingerprints: HashSet<[u8; 32]>) {
        self.0.store(Arc::new(fingerprints));
    }

    /// Whether the certificate with this fingerprint is refused.
    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.0.load().contains(fingerprint)
    }

    /// How many certificates are refused.
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    /// Whether no certificate is refused.
    pub fn is_empty(&self) -> bool {
        self.0.load().is_empty()
    }

    /// The list in the file at `path` (see [`read_refused_certificates`]),
    /// read now and again every `every` for as long as a clone is alive, so
    /// that an operator adds a leaked broker certificate without restarting
    /// the register. A file that cannot be read or holds a bad line at start
    /// is an error; later, it is logged and the list read before is kept,
    /// since dropping it would let a refused certificate back in. Needs a
    /// Tokio runtime.
    pub fn watch_file(path: impl Into<PathBuf>, every: Duration) -> Result<Self, ProviderError> {
        let path = path.into();
        let mut last = std::fs::read(&path).map_err(|e| ProviderError::RefusedList {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let list = RefusedCertificates::new(parse_refused_certificates(&path, &last)?);
        let shared = Arc::downgrade(&list.0);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            let mut last_error = None;
            loop {
                ticker.tick().await;
                let Some(current) = shared.upgrade() else { return };
                let read = tokio::fs::read(&path).await.map_err(|e| ProviderError::RefusedList {
                    path: path.clone(),
                    reason: e.to_string(),
                });
                let changed = match read {
                    Ok(bytes) if bytes == last => Ok(None),
                    Ok(bytes) => {
                        let parsed = parse_refused_certificates(&path, &bytes);
                        last = bytes;
                        parsed.map(Some)
                    }
                    Err(e) => Err(e),
                };
                match changed {
                    Ok(None) => last_error = None,
                    Ok(Some(fingerprints)) => {
                        last_error = None;
                        tracing::info!(
                            path = %path.display(),
                            refused = fingerprints.len(),
                            "refused broker certificates reloaded"
                        );
                        current.store(Arc::new(fingerprints));
                    }
                    Err(e) => {
                        let message = e.to_string();
                        // Once per distinct fault, not every tick.
                        if last_error.as_ref() != Some(&message) {
                            tracing::error!(
                                error = %message,
                                kept = current.load().len(),
                                "cannot reload the refused broker certificates; the list read before stays in force"
                            );
                            last_error = Some(message);
                        }
                    }
                }
            }
        });
        Ok(list)
    }
}

/// Serves the contents of `files` from the next connection on whenever they
/// change (looked at every `every`) into a certificate the broker accepts from
/// this register, as [`serve`] checks at start; logs files it refuses, once
/// per change, and goes on serving what it had.
async fn keep_tls_current(
    tls: Arc<ServerTls>,
    files: TlsFiles,
    every: Duration,
    now_asked: Option<Arc<tokio::sync::Notify>>,
    member: Option<String>,
) {
    let read = |files: &TlsFiles| [&files.ca, &files.cert, &files.key].map(|path| std::fs::read(path).ok());
    let mut seen = read(&files);
    let mut refused: Option<String> = None;
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let asked = tokio::select! {
            _ = ticker.tick() => false,
            () = async {
                match &now_asked {
                    Some(asked) => asked.notified().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = read(&files);
        // Refused files are tried again, unchanged too: one not valid yet becomes valid.
        if now == seen && refused.is_none() {
            if asked {
                tracing::info!(cert = %files.cert.display(), "asked to reload the register's TLS files, which have not changed");
            }
            continue;
        }
        seen = now;
        let trust_domain = tls.trust_domain();
        let renewed = TlsMaterial::load(&files)
            .and_then(|material| ServerTls::new(&material, trust_domain))
            .map_err(|e| e.to_string())
            .and_then(|renewed| {
                crate::own_certificate::check(&renewed, trust_domain, member.as_deref()).map(|()| renewed)
            });
        match renewed {
            Ok(renewed) => {
                tls.replace(renewed);
                refused = None;
                tracing::info!(
                    cert = %files.cert.display(),
                    "the register's TLS files changed: new connections use them"
                );
            }
            Err(e) => {
                if refused.as_ref() != Some(&e) {
                    tracing::error!(
                        cert = %files.cert.display(),
                        error = %e,
                        "the register's TLS files changed into ones it refuses; it goes on serving the ones it had"
                    );
                }
                refused = Some(e);
            }
        }
    }
}

/// Reads a list of refused certificates: one SHA-256 fingerprint a line (as
/// `lienthong certs fingerprint` or `openssl x509 -fingerprint -sha256`
/// prints it), blank lines and `#` comments allowed.
pub fn read_refused_certificates(path: &Path) -> Result<HashSet<[u8; 32]>, ProviderError> {
    let bytes = std::fs::read(path).map_err(|e| ProviderError::RefusedList {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    parse_refused_certificates(path, &bytes)
}

/// The fingerprints in `bytes`, read from `path`; nothing from a list with a bad line.
fn parse_refused_certificates(path: &Path, bytes: &[u8]) -> Result<HashSet<[u8; 32]>, ProviderError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ProviderError::RefusedList {
        path: path.to_owned(),
        reason: format!("not UTF-8 text: {e}"),
    })?;
    let mut refused = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fingerprint = lienthong_tls::parse_fingerprint(line).map_err(|e| ProviderError::RefusedList {
            path: path.to_owned(),
            reason: format!("line {}: {e}", n + 1),
        })?;
        refused.insert(fingerprint);
    }
    Ok(refused)
}

/// Why a provider server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The TLS configuration was built for another federation than configured.
    #[error("tls configuration is for trust domain {tls:?} but the provider is configured for {configured:?}")]
    TrustDomainMismatch {
        /// Trust domain of the `ServerTls`.
        tls: String,
        /// Trust domain of the `ProviderConfig`.
        configured: String,
    },
    /// The register's own certificate is one the broker would refuse.
    #[error("{0}")]
    OwnCertificate(String),
    /// The gRPC server failed.
    #[error("provider server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A list of refused certificates cannot be read.
    #[error("cannot read the refused certificates in {}: {reason}", path.display())]
    RefusedList {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The W3C trace id carried by the `traceparent` header, if present and well formed.
///
/// `traceparent` is `version-traceid-parentid-flags`, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`; the all-zero ids and
/// version `ff` are invalid by the specification.
pub fn trace_id_from_metadata(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = value.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let is_hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = is_hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four parts; later versions may append more.
        && (version != "00" || parts.next().is_none())
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && is_hex(flags, 2);
    valid.then(|| trace_id.to_owned())
}

/// The broker's span this fetch continues (`traceparent`, `tracestate`), if
/// the broker sent a valid one.
pub fn remote_parent(metadata: &MetadataMap) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    if !metadata.contains_key("traceparent") {
        return None;
    }
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract_with_context(
        &opentelemetry::Context::new(),
        &lienthong::trace_context::MetadataExtractor(metadata),
    );
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `RecordProvider` service the kit puts in front of a [`RecordSource`].
struct KitService {
    source: Arc<dyn RecordSource>,
    refused: RefusedCertificates,
    trust_domain: String,
    /// Refused calls, shared with the edge.
    refusals: Arc<Refusals>,
    /// See [`ProviderConfig::max_answer_bytes`].
    max_answer_bytes: usize,
    /// Fetches in flight, for the shutdown to wait for and count.
    fetches: TaskTracker,
}

/// The kit's log of refused calls: each at `debug`, a warning at most once a
/// minute per kind with the count since, so that a peer without the broker's
/// certificate cannot flood the register's log (a call costs it a few bytes).
pub(crate) struct Refusals {
    unauthenticated: FailureLog,
    member: FailureLog,
    refused_broker: FailureLog,
    expired_broker: FailureLog,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            unauthenticated: FailureLog::new(
                "fetches refused without a valid certificate (only the broker, with its federation certificate, \
                 may call this register)",
            ),
            member: FailureLog::new(
                "fetches refused from a member (only the broker may call this register; members read through \
                 the broker, which audits it)",
            ),
            refused_broker: FailureLog::new(
                "fetches refused with a broker certificate on this register's refused list (the broker must \
                 present its new certificate)",
            ),
            expired_broker: FailureLog::new(
                "fetches refused with a broker certificate that expired during the connection",
            ),
        }
    }
}

/// Where a refused call came from, for [`FailureLog::note`].
fn remote_of(peer: &PeerInfo) -> SocketAddr {
    peer.remote_addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Refuses every caller but the broker of `trust_domain`, and a broker
/// certificate in `refused`; each refusal noted in `refusals`.
pub(crate) fn authorize<T>(
    request: &Request<T>,
    refused: &RefusedCertificates,
    trust_domain: &str,
    refusals: &Refusals,
) -> Result<(), Status> {
    let Some(peer) = peer_info(request) else {
        // Only reachable if the server was not started through `incoming`.
        return Err(Status::unauthenticated("connection carries no tls peer information"));
    };
    // Under the register's CAs as they are now (see `PeerInfo::identity_now`).
    match &peer.identity_now() {
        // Checked at the handshake, and again here: a connection outlives
        // the certificate it was made with.
        Ok(Identity::Broker) if peer.not_after.is_some_and(|t| t <= time::OffsetDateTime::now_utc()) => {
            refusals
                .expired_broker
                .note(remote_of(&peer), &"broker certificate expired");
            Err(Status::unauthenticated(
                "the broker's certificate expired during the connection; the broker must reconnect with its renewed certificate",
            ))
        }
        Ok(Identity::Broker) => match peer.fingerprints.as_ref().and_then(|c| c.find(|f| refused.contains(f))) {
            None => Ok(()),
            Some(fingerprint) => {
                let fingerprint = lienthong_tls::fingerprint_hex(&fingerprint);
                refusals.refused_broker.note(
                    remote_of(&peer),
                    &format_args!("broker certificate sha256 {fingerprint}"),
                );
                Err(Status::unauthenticated(format!(
                    "this register refuses the broker certificate sha256 {fingerprint}; the broker must present its new certificate"
                )))
            }
        },
        Ok(Identity::Member(member)) => {
            refusals.member.note(remote_of(&peer), &format_args!("member {member}"));
            Err(Status::permission_denied("only the broker may call this register"))
        }
        Err(reason) => {
            refusals.unauthenticated.note(remote_of(&peer), reason);
            Err(Status::unauthenticated(match reason {
                // The shared words send a caller to its member certificate,
                // which a register refuses too.
                AuthError::NoCertificate => format!(
                    "no client certificate presented; only the broker may call this register, with its \
                     certificate (spiffe://{trust_domain}/broker) issued by the federation CA"
                ),
                other => other.to_string(),
            }))
        }
    }
}

/// How close to its deadline a dropped fetch counts as past it.
const DEADLINE_SLACK: Duration = Duration::from_millis(100);

/// The one log line of a fetch: written when it ends, or when it is dropped
/// unfinished because its deadline passed or the broker cancelled it (the
/// edge answers then, and the fetch's future is dropped mid-way).
struct FetchLog {
    started: Instant,
    deadline: Option<Instant>,
    record_type: String,
    span: tracing::Span,
    logged: bool,
}

impl FetchLog {
    /// Logs the fetch's end.
    fn finished(&mut self, result: &Result<String, FetchError>) {
        self.logged = true;
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let record_type = &self.record_type;
        let outcome = match result {
            Ok(_) => "ok",
            Err(error) => error.outcome(),
        };
        self.span.record("outcome", outcome);
        match result {
            Ok(_) => tracing::info!(%record_type, outcome, latency_ms, "fetch"),
            Err(error) => tracing::info!(%record_type, outcome, latency_ms, reason = %error, "fetch"),
        }
    }
}

impl Drop for FetchLog {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        let _entered = self.span.enter();
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let record_type = &self.record_type;
        // The broker's clock started before the request crossed the network,
        // so its cancel at the deadline may arrive a little before the
        // deadline as the register reckons it.
        let outcome = if self.deadline.is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d) {
            "deadline_exceeded"
        } else {
            "cancelled"
        };
        self.span.record("outcome", outcome);
        tracing::info!(
            %record_type,
            outcome,
            latency_ms,
            "fetch abandoned: the register had not answered when the caller's deadline passed or the caller cancelled"
        );
    }
}

#[tonic::async_trait]
impl RecordProvider for KitService {
    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        authorize(&request, &self.refused, &self.trust_domain, &self.refusals)?;
        let started = Instant::now();
        let deadline = lienthong::protocol::grpc_timeout(request.metadata().as_ref()).map(|t| started + t);
        let fetching = self.fetches.token();
        let trace_id = trace_id_from_metadata(request.metadata());
        let parent = remote_parent(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!(
            "fetch",
            otel.name = "lienthong.provider.v1.RecordProvider/Fetch",
            otel.kind = "server",
            record_type = %printable(&req.record_type),
            request_id = %printable(&req.request_id),
            consumer = %printable(&req.consumer),
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let Some(trace_id) = &trace_id {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        if let Some(parent) = parent {
            // Without an OpenTelemetry layer there is no span tree to join;
            // the trace id above still correlates the log lines.
            let _ = span.set_parent(parent);
        }
        let source = self.source.clone();
        let max_answer_bytes = self.max_answer_bytes;
        let mut log = FetchLog {
            started,
            deadline,
            record_type: printable(&req.record_type).into_owned(),
            span: span.clone(),
            logged: false,
        };
        async move {
            let result = fetch_record(source, req, deadline, max_answer_bytes).await;
            log.finished(&result);
            drop(fetching);
            result
                .map(|record_json| Response::new(FetchResponse { record_json }))
                .map_err(Status::from)
        }
        .instrument(span)
        .await
    }
}

/// `text` as the kit's spans and logs carry it: each control character (a
/// newline that would forge a log line, an escape that drives the terminal
/// the log is read on), line separator or bidirectional override written as
/// its escape (`\n`, `\u{1b}`), the rest as it is. The broker refuses
/// lookups whose request id holds one; a register still never writes one
/// raw, whoever sent it.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unprintable = |c: char| {
        c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unprintable) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unprintable(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// Checks the type and query, asks the source, serialises the record.
async fn fetch_record(
    source: Arc<dyn RecordSource>,
    req: FetchRequest,
    deadline: Option<Instant>,
    max_answer_bytes: usize,
) -> Result<String, FetchError> {
    if !source.record_types().contains(&req.record_type) {
        return Err(FetchError::NotServed(format!(
            "record type {} is not served here",
            printable(&req.record_type)
        )));
    }
    // serde_json's error names line and column only, never the offending text.
    let query: Value = serde_json::from_str(&req.query_json)
        .map_err(|e| FetchError::InvalidQuery(format!("query_json is not valid json: {e}")))?;
    let ctx = FetchContext {
        record_type: req.record_type,
        schema_version: req.schema_version,
        query,
        request_id: printable(&req.request_id).into_owned(),
        consumer: req.consumer,
        purpose: req.purpose,
        fields: req.fields,
        deadline,
    };
    // A panicking register fails this one lookup, not the connection it came on.
    let record = AssertUnwindSafe(source.fetch(ctx))
        .catch_unwind()
        .await
        .map_err(|_| FetchError::Internal("the register failed unexpectedly".to_owned()))??;
    let record_json = serde_json::to_string(&record)
        .map_err(|e| FetchError::Internal(format!("cannot serialise the record: {e}")))?;
    // The broker refuses a larger answer: failing it here puts the reason in
    // this register's log, where it can be acted on.
    let size = prost::Message::encoded_len(&FetchResponse {
        record_json: String::new(),
    }) + prost::encoding::string::encoded_len(1, &record_json);
    if size > max_answer_bytes {
        return Err(FetchError::Internal(format!(
            "the answer is {size} bytes, more than the {max_answer_bytes} the broker accepts \
             (ProviderConfig::max_answer_bytes); the record is too large to send"
        )));
    }
    Ok(record_json)
}

/// How long, at shutdown, a peer no call is on has to answer HTTP/2's
/// goodbye (a ping's round trip) and hang up before its connection is closed.
pub const GOODBYE: Duration = Duration::from_secs(1);

/// Serves `source` over mutual TLS on `listener` until `shutdown` resolves.
///
/// Also serves `grpc.health.v1.Health`, reporting the `RecordProvider` service
/// (and the server as a whole) as serving until `shutdown` resolves, then as
/// not serving; its watches then end, as the drain would otherwise wait for
/// watchers (a load balancer's) that never hang up. Every connection is sent
/// HTTP/2's goodbye (GOAWAY), so the broker moves its calls elsewhere rather
/// than seeing a reset; those no call is on and whose peer has not hung up
/// after [`GOODBYE`] are then closed. Fetches in flight get
/// [`ProviderConfig::shutdown_grace`] to finish.
///
/// Refuses to start ([`ProviderError::OwnCertificate`]) when `tls` serves a
/// certificate the broker would refuse from a register: not a member of
/// [`ProviderConfig::trust_domain`] (or not [`ProviderConfig::member`]), not
/// valid now, or a client certificate only (issued without `--host`).
pub async fn serve<F>(
    source: Arc<dyn RecordSource>,
    tls: Arc<ServerTls>,
    config: ProviderConfig,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ProviderError>
where
    F: Future<Output = ()> + Send + 'static,
{
    serve_announced(source, tls, config, listener, shutdown, || {}).await
}

/// [`serve`], calling `announce` once the start-up checks have passed and
/// calls are taken: a "serving on" line printed from it is never followed by
/// a refusal to start.
pub async fn serve_announced<F, A>(
    source: Arc<dyn RecordSource>,
    tls: Arc<ServerTls>,
    config: ProviderConfig,
    listener: TcpListener,
    shutdown: F,
    announce: A,
) -> Result<(), ProviderError>
where
    F: Future<Output = ()> + Send + 'static,
    A: FnOnce() + Send,
{
    if tls.trust_domain() != config.trust_domain {
        return Err(ProviderError::TrustDomainMismatch {
            tls: tls.trust_domain().to_owned(),
            configured: config.trust_domain,
        });
    }
    // Before reporting serving: with a certificate the broker refuses, every
    // fetch would fail at its handshake while the register looked healthy.
    crate::own_certificate::check(&tls, &config.trust_domain, config.member.as_deref())
        .map_err(ProviderError::OwnCertificate)?;
    let _reloads = config.tls_files.clone().map(|files| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keep_tls_current(
            tls.clone(),
            files,
            config.tls_reload_every,
            config.tls_reload_now.clone(),
            config.member.clone(),
        )))
    });
    let connections = Arc::new(Connections::default());
    let health = lienthong::health::HealthReporter::new();
    health.set_serving::<RecordProviderServer<KitService>>();
    let health_service = health.service();
    let (draining, drain) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        health.shut_down();
        let _ = draining.send(());
    };
    let grace = config.shutdown_grace;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            trust_domain = %config.trust_domain,
            record_types = ?source.record_types(),
            "provider listening"
        );
    }
    let fetches = TaskTracker::new();
    let refusals = Arc::new(Refusals::default());
    let service = RecordProviderServer::new(KitService {
        source,
        refused: config.refused_certificates.clone(),
        trust_domain: config.trust_domain.clone(),
        refusals: refusals.clone(),
        max_answer_bytes: config.max_answer_bytes,
        fetches: fetches.clone(),
    })
    .max_decoding_message_size(config.max_request_bytes);
    let limits = NonBrokerLimits {
        lifetime: config.non_broker_connection_lifetime,
        max_connections: config.max_non_broker_connections,
    };
    let refused = config.refused_certificates.clone();
    let admitting = connections.clone();
    let incoming = incoming(listener, tls, config.accept).filter_map(move |accepted| match accepted {
        Ok(stream) => admitting.admit(stream, limits, &refused).map(Ok),
        Err(e) => Some(Err(e)),
    });
    let serving = tonic::transport::Server::builder()
        // The broker multiplexes hundreds of concurrent fetches on a few
        // connections; h2's default 64 KiB window would have it closed with
        // ENHANCE_YOUR_CALM at ~200 small requests queued on one.
        .initial_connection_window_size(Some(1 << 20))
        // Without it tonic lifts hyper's default of 200: any peer, with or
        // without a certificate, could hold any number of streams open.
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .layer(EdgeLayer::new(
            config.refused_certificates,
            config.trust_domain,
            refusals,
        ))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(serving);
    announce();
    // tonic waits for every call in flight, however long, once the signal
    // came: the grace period bounds that wait.
    let served = tokio::select! {
        biased;
        served = &mut serving => Some(served),
        Ok(()) = drain => None,
    };
    match served {
        Some(served) => served?,
        None => match tokio::time::timeout(grace, async {
            let goodbye = GOODBYE.min(grace);
            if let Ok(served) = tokio::time::timeout(goodbye, &mut serving).await {
                return served;
            }
            // A connection that never spoke HTTP/2, or does not answer its
            // goodbye's ping, would hold the drain for the whole grace period.
            let closed = connections.close_idle();
            tracing::debug!(closed, "idle connections closed for the shutdown");
            (&mut serving).await
        })
        .await
        {
            Ok(served) => served?,
            Err(_) => {
                let abandoned = fetches.len();
                // Those whose calls ended since, but whose peer did not say goodbye.
                connections.close_idle();
                if abandoned > 0 {
                    tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        fetches = abandoned,
                        "grace period over; abandoning the fetches still in flight: {abandoned}"
                    );
                } else {
                    tracing::info!(
                        grace_ms = grace.as_millis() as u64,
                        connections = connections.len(),
                        "grace period over; no fetch in flight, connections still open are closed"
                    );
                }
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_traceparent(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", value.parse().unwrap());
        metadata
    }

    #[test]
    fn trace_id_is_read_from_a_valid_traceparent() {
        let metadata = with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            trace_id_from_metadata(&metadata).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // A future version may append fields.
        let future = with_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz");
        assert!(trace_id_from_metadata(&future).is_some());
        assert_eq!(trace_id_from_metadata(&MetadataMap::new()), None);
    }

    #[test]
    fn the_broker_span_is_the_parent() {
        use opentelemetry::trace::TraceContextExt;
        let cx = remote_parent(&with_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .unwrap();
        let parent = cx.span().span_context().clone();
        assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id().to_string(), "00f067aa0ba902b7");
        assert!(parent.is_remote() && parent.is_sampled());
        assert!(remote_parent(&with_traceparent("garbage")).is_none());
        assert!(remote_parent(&MetadataMap::new()).is_none());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(trace_id_from_metadata(&with_traceparent(bad)), None, "{bad}");
        }
    }

    #[test]
    fn fetch_errors_map_to_the_codes_the_broker_expects() {
        let code = |e: FetchError| Status::from(e).code();
        assert_eq!(code(FetchError::NotFound("x".into())), tonic::Code::NotFound);
        assert_eq!(code(FetchError::InvalidQuery("x".into())), tonic::Code::InvalidArgument);
        assert_eq!(code(FetchError::Unavailable("x".into())), tonic::Code::Unavailable);
        assert_eq!(code(FetchError::Internal("x".into())), tonic::Code::Internal);
    }

    /// Everything a fmt subscriber writes, for the tests of what the kit logs.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Captures, at `debug`, what this thread logs while the guard lives.
        pub(crate) fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            (captured, tracing::subscriber::set_default(subscriber))
        }

        pub(crate) fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn from_peer(identity: Result<Identity, AuthError>) -> Request<()> {
        let mut request = Request::new(());
        request.extensions_mut().insert(Arc::new(PeerInfo {
            remote_addr: Some(SocketAddr::from(([192, 0, 2, 7], 40_000))),
            identity,
            not_after: None,
            fingerprints: None,
            claimed: None,
            revalidation: None,
        }));
        request
    }

    #[test]
    fn a_flood_of_refused_fetches_warns_once_a_minute_not_once_a_call() {
        let (captured, _guard) = Captured::start();
        let refusals = Refusals::default();
        let refused = RefusedCertificates::default();
        for _ in 0..300 {
            let status = authorize(
                &from_peer(Err(AuthError::NoCertificate)),
                &refused,
                "gov.test",
                &refusals,
            )
            .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            let member = from_peer(Ok(Identity::Member("tax-office".to_owned())));
            let status = authorize(&member, &refused, "gov.test", &refusals).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
        }
        let lines = captured.lines();
        let warnings: Vec<_> = lines.iter().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warnings.len(), 2, "one warning per kind: {warnings:#?}");
        assert!(
            warnings.iter().any(|l| l.contains("without a valid certificate")),
            "{warnings:#?}"
        );
        assert!(
            warnings
                .iter()
                .any(|l| l.contains("from a member") && l.contains("tax-office")),
            "{warnings:#?}"
        );
        // Every refusal is still there for whoever turns debug on.
        assert_eq!(lines.iter().filter(|l| l.contains("DEBUG")).count(), 600);
    }

    #[tokio::test]
    async fn a_register_whose_certificate_the_broker_would_refuse_does_not_start() {
        use lienthong_tls::{CertificateAuthority, IssueSpec, TlsMaterial};
        let ca = CertificateAuthority::generate("gov.test").unwrap();
        let issued = ca.issue(&IssueSpec::client("civil-status")).unwrap();
        let material = TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        let tls = Arc::new(ServerTls::new(&material, "gov.test").unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let announced = std::sync::atomic::AtomicBool::new(false);
        let served = tokio::time::timeout(
            Duration::from_secs(5),
            serve_announced(
                Arc::new(Panicking),
                tls,
                ProviderConfig::new("gov.test"),
                listener,
                std::future::pending(),
                || announced.store(true, std::sync::atomic::Ordering::Relaxed),
            ),
        )
        .await
        .expect("serve returns at once");
        assert!(
            !announced.load(std::sync::atomic::Ordering::Relaxed),
            "a register that does not start never said it serves"
        );
        match served {
            Err(ProviderError::OwnCertificate(message)) => {
                assert!(message.contains("--member civil-status --host"), "{message}")
            }
            other => panic!("expected OwnCertificate, got {other:?}"),
        }
    }

    /// Answers a record whose one field holds `.0` bytes.
    struct Sized(usize);

    #[async_trait::async_trait]
    impl RecordSource for Sized {
        fn record_types(&self) -> Vec<String> {
            vec!["test.record".to_owned()]
        }

        async fn fetch(&self, _ctx: FetchContext) -> Result<Value, FetchError> {
            Ok(serde_json::json!({ "blob": "x".repeat(self.0) }))
        }
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_broker_accepts_fails_with_internal_saying_why() {
        // `{"blob":"…"}` is 11 bytes around the blob, and the message's field
        // tag and length 1 + 4 more at this size.
        let fits = DEFAULT_MAX_ANSWER_BYTES - 11 - 5;
        let answer = fetch_record(Arc::new(Sized(fits)), request("{}"), None, DEFAULT_MAX_ANSWER_BYTES).await;
        let answer = answer.unwrap();
        assert_eq!(
            prost::Message::encoded_len(&FetchResponse { record_json: answer }),
            DEFAULT_MAX_ANSWER_BYTES
        );
        let result = fetch_record(Arc::new(Sized(fits + 1)), request("{}"), None, DEFAULT_MAX_ANSWER_BYTES).await;
        match result {
            Err(FetchError::Internal(message)) => {
                assert!(
                    message.contains("more than the 4194304 the broker accepts"),
                    "{message}"
                )
            }
            other => panic!("expected Internal, got {:?}", other.map(|r| r.len())),
        }
        // A smaller limit, set by the register, holds too.
        let result = fetch_record(Arc::new(Sized(100)), request("{}"), None, 64).await;
        assert!(matches!(result, Err(FetchError::Internal(_))), "{result:?}");
    }

    struct Panicking;

    #[async_trait::async_trait]
    impl RecordSource for Panicking {
        fn record_types(&self) -> Vec<String> {
            vec!["test.record".to_owned()]
        }

        async fn fetch(&self, _ctx: FetchContext) -> Result<Value, FetchError> {
            panic!("register bug")
        }
    }

    fn request(query_json: &str) -> FetchRequest {
        FetchRequest {
            record_type: "test.record".to_owned(),
            schema_version: 1,
            query_json: query_json.to_owned(),
            ..FetchRequest::default()
        }
    }

    #[tokio::test]
    async fn a_panicking_register_fails_the_lookup_with_internal() {
        let result = fetch_record(Arc::new(Panicking), request("{}"), None, DEFAULT_MAX_ANSWER_BYTES).await;
        assert!(matches!(result, Err(FetchError::Internal(_))), "{result:?}");
    }

    #[tokio::test]
    async fn malformed_query_json_is_an_invalid_query_without_echoing_it() {
        let result = fetch_record(
            Arc::new(Panicking),
            request("{\"national_id\": \"0790"),
            None,
            DEFAULT_MAX_ANSWER_BYTES,
        )
        .await;
        match result {
            Err(FetchError::InvalidQuery(message)) => assert!(!message.contains("0790"), "{message}"),
            other => panic!("expected InvalidQuery, got {other:?}"),
        }
    }
}
