//! The relay: calls providers' `RecordProvider.Fetch` over mutual TLS with
//! pooled HTTP/2 channels, power-of-two-choices load balancing on outstanding
//! requests, a circuit breaker per endpoint, a concurrency limit per provider,
//! deadlines, and bounded retries for `UNAVAILABLE` within a retry budget.

use crate::config::RelayConfig;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lienthong::provider::v1::{FetchRequest, FetchResponse};
use lienthong_core::Endpoint;
use lienthong_tls::{Dialer, Identity, TlsMaterial};
use opentelemetry::trace::SpanContext;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tracing::Instrument;

/// How a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The provider has no record for the query.
    #[error("the register holds no such record")]
    NotFound,
    /// The provider refused the query as unusable.
    #[error("the register could not use the query")]
    Rejected,
    /// Provider down, refusing, overloaded or circuit open.
    #[error("{0}")]
    Unavailable(String),
    /// No answer before the deadline.
    #[error("the register did not answer within {0:?}")]
    Deadline(Duration),
}

/// State of one endpoint's circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; counts consecutive failures.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// One probe call is let through to test recovery.
    HalfOpen,
}

#[derive(Debug)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// HTTP/2 connections kept to each endpoint. One connection funnels every
/// call through one task and one TLS session; a few spread that work over the
/// cores and keep the requests a register holds unread per connection under
/// the small-frame budget h2 enforces (it closes a connection with
/// ENHANCE_YOUR_CALM past about 500 buffered small requests).
const CONNECTIONS_PER_ENDPOINT: usize = 4;

/// `RecordProvider.Fetch` path, as the generated client sends it.
const FETCH_PATH: &str = "/lienthong.provider.v1.RecordProvider/Fetch";

/// The generated client's codec with buffers sized for fetches: tonic's
/// default 8 KiB per call is held for the whole call, which with a thousand
/// lookups in flight is megabytes for requests of a few hundred bytes. The
/// buffers still grow for larger messages.
#[derive(Clone, Copy, Debug, Default)]
struct FetchCodec;

impl Codec for FetchCodec {
    type Encode = FetchRequest;
    type Decode = FetchResponse;
    type Encoder = ProstEncoder<FetchRequest>;
    type Decoder = ProstDecoder<FetchResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(512, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(2048, 32 * 1024))
    }
}

/// One HTTP/2 connection to a register endpoint, dialled on first use and
/// again once it has closed.
///
/// Calls go straight to hyper's connection task. tonic's `Channel` puts a
/// `tower::buffer` worker task in front of it, which costs every call one
/// more hand-off between tasks (and wake-up between threads).
struct Conn {
    dialer: Dialer,
    sender: Mutex<Option<SendRequest<tonic::body::Body>>>,
    /// One dial at a time; callers arriving meanwhile wait for its outcome.
    dialling: tokio::sync::Mutex<()>,
    /// Dials made so far, to tell a caller who waited that a dial was made.
    dials: AtomicU64,
    /// Why the last dial failed; `None` once one succeeded.
    last_error: Mutex<Option<String>>,
}

impl Conn {
    fn new(dialer: Dialer) -> Conn {
        Conn {
            dialer,
            sender: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
            dials: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    fn open(&self) -> Option<SendRequest<tonic::body::Body>> {
        let sender = self.sender.lock().ok()?;
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// A sender on an open connection, dialling one if needed.
    async fn sender(&self) -> Result<SendRequest<tonic::body::Body>, tonic::Status> {
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        let seen = self.dials.load(Ordering::Acquire);
        let _turn = self.dialling.lock().await;
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        if self.dials.load(Ordering::Acquire) != seen
            && let Some(error) = self.last_error.lock().ok().and_then(|e| e.clone())
        {
            // The dial this call waited for failed: one attempt per wave of callers.
            return Err(tonic::Status::unavailable(error));
        }
        let dialled = self.dial().await;
        if let Ok(mut last) = self.last_error.lock() {
            *last = dialled.as_ref().err().cloned();
        }
        self.dials.fetch_add(1, Ordering::Release);
        let sender = dialled.map_err(tonic::Status::unavailable)?;
        if let Ok(mut slot) = self.sender.lock() {
            *slot = Some(sender.clone());
        }
        Ok(sender)
    }

    async fn dial(&self) -> Result<SendRequest<tonic::body::Body>, String> {
        let stream = self.dialer.dial().await.map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(lienthong_tls::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(lienthong_tls::KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {} failed: {e}", self.dialer.origin()))?;
        let origin = self.dialer.origin().clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%origin, error = %e, "connection to a register ended");
            }
        });
        Ok(sender)
    }
}

/// The tower service tonic's client calls: one request on one HTTP/2 connection.
struct Http2(SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        request
            .headers_mut()
            .insert(http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT));
        Box::pin(self.0.send_request(request))
    }
}

const USER_AGENT: &str = concat!("lienthong-broker/", env!("CARGO_PKG_VERSION"));

/// One provider endpoint and its connections.
pub struct EndpointState {
    /// Endpoint id.
    pub id: String,
    /// URL.
    pub url: String,
    conns: Vec<Conn>,
    next_conn: AtomicUsize,
    outstanding: AtomicU64,
    breaker: Mutex<Breaker>,
}

impl EndpointState {
    /// One `Fetch` on the next connection (round robin).
    async fn call(
        &self,
        request: tonic::Request<FetchRequest>,
    ) -> Result<tonic::Response<FetchResponse>, tonic::Status> {
        let i = self.next_conn.fetch_add(1, Ordering::Relaxed) % self.conns.len().max(1);
        let Some(conn) = self.conns.get(i) else {
            return Err(tonic::Status::unavailable("endpoint has no connection"));
        };
        let sender = conn.sender().await?;
        let mut grpc = tonic::client::Grpc::with_origin(Http2(sender), conn.dialer.origin().clone());
        // Not ready means the connection closed before the request left, so
        // the call may go elsewhere.
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("the connection to the register closed: {e}")))?;
        let mut request = request;
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new("lienthong.provider.v1.RecordProvider", "Fetch"));
        grpc.unary(request, http::uri::PathAndQuery::from_static(FETCH_PATH), FetchCodec)
            .await
    }

    /// Requests in flight to this endpoint.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The breaker state.
    pub fn breaker_state(&self) -> BreakerState {
        match self.breaker.lock().map(|b| match *b {
            Breaker::Closed { .. } => BreakerState::Closed,
            Breaker::Open { .. } => BreakerState::Open,
            Breaker::HalfOpen { .. } => BreakerState::HalfOpen,
        }) {
            Ok(s) => s,
            Err(_) => BreakerState::Open,
        }
    }

    /// Whether a call may go to this endpoint now (and claims the half-open probe).
    fn admit(&self, now: Instant) -> bool {
        let Ok(mut b) = self.breaker.lock() else { return false };
        match *b {
            Breaker::Closed { .. } => true,
            Breaker::Open { until } if now >= until => {
                *b = Breaker::HalfOpen { probing: true };
                true
            }
            Breaker::Open { .. } => false,
            Breaker::HalfOpen { probing } => {
                if probing {
                    false
                } else {
                    *b = Breaker::HalfOpen { probing: true };
                    true
                }
            }
        }
    }

    fn peek_admit(&self, now: Instant) -> bool {
        match self.breaker.lock() {
            Ok(b) => match *b {
                Breaker::Closed { .. } => true,
                Breaker::Open { until } => now >= until,
                Breaker::HalfOpen { probing } => !probing,
            },
            Err(_) => false,
        }
    }

    fn record(&self, ok: bool, threshold: u32, open_for: Duration, provider: &str) {
        let Ok(mut b) = self.breaker.lock() else { return };
        let next = match (&*b, ok) {
            (_, true) => Breaker::Closed { failures: 0 },
            (Breaker::Closed { failures }, false) if failures + 1 < threshold => {
                Breaker::Closed { failures: failures + 1 }
            }
            (Breaker::Open { until }, false) => Breaker::Open { until: *until },
            (_, false) => {
                tracing::warn!(provider = %provider, endpoint = %self.id, open_for_ms = open_for.as_millis() as u64, "circuit opened");
                Breaker::Open {
                    until: Instant::now() + open_for,
                }
            }
        };
        if ok && !matches!(*b, Breaker::Closed { .. }) {
            tracing::info!(provider = %provider, endpoint = %self.id, "circuit closed");
        }
        *b = next;
    }
}

struct ProviderPool {
    endpoints: Vec<Arc<EndpointState>>,
    limit: Arc<Semaphore>,
}

/// Calls providers. Endpoints come from the snapshot through [`Relay::sync`].
pub struct Relay {
    material: TlsMaterial,
    trust_domain: String,
    config: RelayConfig,
    pools: RwLock<HashMap<String, Arc<ProviderPool>>>,
    // Retry budget in hundredths of a retry: each call deposits
    // `retry_budget_percent`, each retry withdraws 100.
    budget: AtomicI64,
    rng: AtomicU64,
}

const BUDGET_CAP: i64 = 100 * 100;

impl Relay {
    /// A relay authenticating to providers with `material` (the broker's certificate).
    pub fn new(material: TlsMaterial, trust_domain: String, config: RelayConfig) -> Relay {
        Relay {
            material,
            trust_domain,
            config,
            pools: RwLock::new(HashMap::new()),
            budget: AtomicI64::new(10 * 100),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Brings the pools in line with the registered endpoints, keeping the
    /// channels (and breakers) of endpoints that did not change.
    pub fn sync(&self, endpoints: &[Endpoint]) {
        let Ok(mut pools) = self.pools.write() else { return };
        let mut by_provider: HashMap<&str, Vec<&Endpoint>> = HashMap::new();
        for e in endpoints {
            by_provider.entry(e.provider.as_str()).or_default().push(e);
        }
        let mut next = HashMap::with_capacity(by_provider.len());
        for (provider, eps) in by_provider {
            let old = pools.get(provider);
            let mut states = Vec::with_capacity(eps.len());
            for e in eps {
                let existing = old.and_then(|p| p.endpoints.iter().find(|s| s.id == e.id && s.url == e.url).cloned());
                let state = match existing {
                    Some(s) => s,
                    None => match self.dialer(provider, &e.url) {
                        Ok(dialer) => Arc::new(EndpointState {
                            id: e.id.clone(),
                            url: e.url.clone(),
                            conns: (0..CONNECTIONS_PER_ENDPOINT)
                                .map(|_| Conn::new(dialer.clone()))
                                .collect(),
                            next_conn: AtomicUsize::new(0),
                            outstanding: AtomicU64::new(0),
                            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
                        }),
                        Err(err) => {
                            tracing::error!(provider = %provider, endpoint = %e.id, error = %err, "cannot build a channel to a provider endpoint");
                            continue;
                        }
                    },
                };
                states.push(state);
            }
            let limit = old
                .map(|p| p.limit.clone())
                .unwrap_or_else(|| Arc::new(Semaphore::new(self.config.provider_concurrency)));
            next.insert(
                provider.to_string(),
                Arc::new(ProviderPool {
                    endpoints: states,
                    limit,
                }),
            );
        }
        *pools = next;
    }

    fn dialer(&self, provider: &str, url: &str) -> Result<Dialer, lienthong_tls::TlsError> {
        let tls = lienthong_tls::client_config(
            &self.material,
            Some((&self.trust_domain, Identity::Member(provider.to_string()))),
        )?;
        Dialer::new(url, tls, Duration::from_millis(self.config.connect_timeout_ms))
    }

    /// Every endpoint of every provider, for metrics.
    pub fn endpoints(&self) -> Vec<(String, Arc<EndpointState>)> {
        let Ok(pools) = self.pools.read() else {
            return Vec::new();
        };
        pools
            .iter()
            .flat_map(|(p, pool)| pool.endpoints.iter().map(move |e| (p.clone(), e.clone())))
            .collect()
    }

    fn next_random(&self) -> u64 {
        // xorshift64*: cheap, lock-free, good enough to pick two endpoints.
        let mut x = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Power of two choices among admissible endpoints not tried yet.
    fn pick(&self, pool: &ProviderPool, tried: &[usize], now: Instant) -> Option<usize> {
        let candidates: Vec<usize> = (0..pool.endpoints.len())
            .filter(|i| !tried.contains(i) && pool.endpoints[*i].peek_admit(now))
            .collect();
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let r = self.next_random();
                let a = candidates[(r % n as u64) as usize];
                let mut b = candidates[((r >> 32) % n as u64) as usize];
                if a == b {
                    b = candidates[(candidates.iter().position(|c| *c == a).unwrap_or(0) + 1) % n];
                }
                if pool.endpoints[a].outstanding() <= pool.endpoints[b].outstanding() {
                    a
                } else {
                    b
                }
            }
        };
        pool.endpoints[chosen].admit(now).then_some(chosen)
    }

    /// Fetches one record, returning the provider's record JSON text.
    ///
    /// Runs in a `provider_call` span; every attempt carries that span's trace
    /// context to the provider (`traceparent`), so the register's span is its
    /// child. `caller_trace` is the consumer's trace, handed on instead when
    /// spans are not exported.
    pub async fn fetch(
        &self,
        provider: &str,
        request: FetchRequest,
        deadline: Instant,
        caller_trace: &SpanContext,
    ) -> Result<String, RelayError> {
        let span = tracing::info_span!(
            "provider_call",
            otel.name = "lienthong.provider.v1.RecordProvider/Fetch",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            provider = %provider,
            record_type = %request.record_type,
            endpoint = tracing::field::Empty,
            attempts = 1u32,
            outcome = tracing::field::Empty,
        );
        let result = self
            .fetch_in(provider, request, deadline, caller_trace, &span)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RelayError::NotFound) => "not_found",
            Err(RelayError::Rejected) => "rejected",
            Err(RelayError::Unavailable(_)) => "unavailable",
            Err(RelayError::Deadline(_)) => "timeout",
        };
        span.record("outcome", outcome);
        if matches!(result, Err(RelayError::Unavailable(_) | RelayError::Deadline(_))) {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn fetch_in(
        &self,
        provider: &str,
        request: FetchRequest,
        deadline: Instant,
        caller_trace: &SpanContext,
        span: &tracing::Span,
    ) -> Result<String, RelayError> {
        let pool = self
            .pools
            .read()
            .ok()
            .and_then(|p| p.get(provider).cloned())
            .ok_or_else(|| RelayError::Unavailable(format!("provider {provider} has no registered endpoint")))?;
        if pool.endpoints.is_empty() {
            return Err(RelayError::Unavailable(format!(
                "provider {provider} has no usable endpoint"
            )));
        }
        let total = deadline.saturating_duration_since(Instant::now());
        let _permit = match tokio::time::timeout_at(deadline.into(), pool.limit.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(RelayError::Unavailable(format!(
                    "provider {provider} is at its concurrency limit of {} calls",
                    self.config.provider_concurrency
                )));
            }
        };
        let pct = i64::from(self.config.retry_budget_percent);
        let _ = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some((b + pct).min(BUDGET_CAP))
        });
        let mut tried: Vec<usize> = Vec::new();
        let mut retries = 0;
        loop {
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(RelayError::Deadline(total));
            }
            let Some(i) = self.pick(&pool, &tried, now) else {
                return Err(RelayError::Unavailable(if tried.is_empty() {
                    format!("circuit open for every endpoint of provider {provider}; retry later")
                } else {
                    format!("every endpoint of provider {provider} failed")
                }));
            };
            let ep = &pool.endpoints[i];
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(remaining);
            span.record("endpoint", ep.id.as_str());
            if retries > 0 {
                span.record("attempts", retries + 1);
            }
            crate::telemetry::inject(span, caller_trace, req.metadata_mut());
            ep.outstanding.fetch_add(1, Ordering::Relaxed);
            let result = tokio::time::timeout(remaining, ep.call(req)).await;
            ep.outstanding.fetch_sub(1, Ordering::Relaxed);
            let (threshold, open_for) = (
                self.config.breaker_failures,
                Duration::from_millis(self.config.breaker_open_ms),
            );
            let status = match result {
                Ok(Ok(resp)) => {
                    ep.record(true, threshold, open_for, provider);
                    return Ok(resp.into_inner().record_json);
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    ep.record(false, threshold, open_for, provider);
                    return Err(RelayError::Deadline(total));
                }
            };
            match status.code() {
                Code::NotFound => {
                    ep.record(true, threshold, open_for, provider);
                    return Err(RelayError::NotFound);
                }
                Code::InvalidArgument => {
                    ep.record(true, threshold, open_for, provider);
                    return Err(RelayError::Rejected);
                }
                Code::DeadlineExceeded | Code::Cancelled if Instant::now() >= deadline => {
                    ep.record(false, threshold, open_for, provider);
                    return Err(RelayError::Deadline(total));
                }
                Code::Unavailable => {
                    ep.record(false, threshold, open_for, provider);
                    tracing::debug!(provider = %provider, endpoint = %ep.id, "provider unavailable");
                    tried.push(i);
                    let budget_ok = self
                        .budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| (b >= 100).then_some(b - 100))
                        .is_ok();
                    if retries < self.config.max_retries && budget_ok {
                        retries += 1;
                        continue;
                    }
                    return Err(RelayError::Unavailable(format!("provider {provider} is unavailable")));
                }
                code => {
                    // A dropped connection, a refused certificate or a crash in the
                    // register: the answer may be half-made, so no retry.
                    ep.record(false, threshold, open_for, provider);
                    tracing::warn!(provider = %provider, endpoint = %ep.id, code = ?code, "provider call failed");
                    return Err(RelayError::Unavailable(format!(
                        "provider {provider} failed to answer ({code:?})"
                    )));
                }
            }
        }
    }
}
