//! Prometheus metrics: the counters and histograms the request path updates,
//! the values read at scrape time (audit log, snapshot, provider endpoints),
//! and the `/metrics` listener (plain HTTP, or HTTPS requiring client
//! certificates).
//!
//! Label values are bounded: RPC names and outcomes are fixed words, record
//! types and member ids come from the registry (a record type a client made
//! up is counted as `unknown`), endpoint ids from the endpoint table. No
//! subject key, query or free text is ever a label.
//!
//! The request path finds its series in a copy-on-write cache keyed by
//! (record type, consumer): after the first request of a pair, counting is
//! lock-free apart from the histogram's own per-series mutex, and allocates
//! nothing.

use crate::relay::BreakerState;
use crate::state::Broker;
use arc_swap::ArcSwap;
use lienthong_audit::HistoryCheck;
use lienthong_core::audit::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;

/// Label value of a record type or member the registry does not know.
pub const UNKNOWN: &str = "unknown";

/// Most (record type, consumer) pairs kept in the lock-free cache; beyond it
/// series are still counted, through the families' own map.
const CACHE_LIMIT: usize = 4096;

/// The Exchange RPCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `Exchange.Lookup`.
    Lookup,
    /// `Exchange.Collect` (counted per item).
    Collect,
}

impl Rpc {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::Lookup => "lookup",
            Rpc::Collect => "collect",
        }
    }

    fn index(self) -> usize {
        match self {
            Rpc::Lookup => 0,
            Rpc::Collect => 1,
        }
    }
}

/// How a provider call ended, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// A record came back.
    Ok,
    /// The register holds no such record.
    NotFound,
    /// The register could not use the query.
    Rejected,
    /// The register does not serve the record type.
    NotServed,
    /// Down, refusing, overloaded or circuit open.
    Unavailable,
    /// No answer in time.
    Timeout,
    /// An answer outside the gRPC protocol (compressed, truncated, oversized).
    Malformed,
}

impl CallOutcome {
    const ALL: [CallOutcome; 7] = [
        CallOutcome::Ok,
        CallOutcome::NotFound,
        CallOutcome::Rejected,
        CallOutcome::NotServed,
        CallOutcome::Unavailable,
        CallOutcome::Timeout,
        CallOutcome::Malformed,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::NotFound => "not_found",
            CallOutcome::Rejected => "rejected",
            CallOutcome::NotServed => "not_served",
            CallOutcome::Unavailable => "unavailable",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const OUTCOMES: [Outcome; 4] = [Outcome::Allowed, Outcome::Denied, Outcome::Failed, Outcome::Invalid];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Allowed => 0,
        Outcome::Denied => 1,
        Outcome::Failed => 2,
        Outcome::Invalid => 3,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rpc: &'static str,
    consumer: String,
    record_type: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    rpc: &'static str,
    record_type: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderCallLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    consumer: String,
    record_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    provider: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabels {
    member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    provider: String,
    endpoint: String,
    state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 250 µs .. ~8 s: a local register answers in a millisecond, a slow one in seconds.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The series of one (rpc, record type, consumer), by outcome. Counters
/// exist from the first request on (so `rate()` sees every outcome start at
/// zero); a histogram, 19 series, only once its outcome happened.
struct RequestSeries {
    rpc: Rpc,
    record_type: String,
    count: [Counter; 4],
    seconds: [std::sync::OnceLock<Histogram>; 4],
}

/// The series of one provider, by call outcome.
struct ProviderSeries {
    calls: [Counter; CallOutcome::ALL.len()],
    seconds: Histogram,
}

/// Two-level copy-on-write map: readers never lock; writers (first request
/// of a new pair) copy the map.
struct Cache<V> {
    map: ArcSwap<HashMap<String, HashMap<String, Arc<V>>>>,
    len: AtomicU64,
}

impl<V> Cache<V> {
    fn new() -> Self {
        Cache {
            map: ArcSwap::from_pointee(HashMap::new()),
            len: AtomicU64::new(0),
        }
    }

    fn get(&self, a: &str, b: &str, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(v) = self.map.load().get(a).and_then(|m| m.get(b)) {
            return v.clone();
        }
        let made = Arc::new(make());
        if self.len.load(std::sync::atomic::Ordering::Relaxed) >= CACHE_LIMIT as u64 {
            return made;
        }
        let mut result = made.clone();
        self.map.rcu(|old| {
            let mut next: HashMap<String, HashMap<String, Arc<V>>> = (**old).clone();
            let inner = next.entry(a.to_string()).or_default();
            result = inner.entry(b.to_string()).or_insert_with(|| made.clone()).clone();
            next
        });
        self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        result
    }
}

/// Every metric of one broker.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    in_flight: [Gauge; 2],
    /// Exchange calls waiting for a turn (`limits.max_concurrent_exchanges`).
    pub exchanges_waiting: Gauge,
    provider_calls: Family<ProviderCallLabels, Counter>,
    provider_seconds: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    rate_limited: Family<GrantLabels, Counter>,
    unauthenticated: Family<RpcLabels, Counter>,
    audit_append_seconds: Histogram,
    /// When the broker's own certificate (`tls.cert`) expires, Unix seconds.
    pub certificate_expiry: Gauge,
    /// 1 while the TLS files on disk are refused and older ones are served.
    pub tls_files_refused: Gauge,
    request_cache: [Cache<RequestSeries>; 2],
    provider_cache: Cache<ProviderSeries>,
    scrape: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every request-path metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lienthong");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Exchange lookups by rpc, consumer, record type and outcome (allowed, denied, failed, invalid); a collect counts once per item",
            requests.clone(),
        );
        let request_seconds =
            Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from receiving a lookup (or a collect item) to its answer, audit commit included",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let in_flight_family = Family::<RpcLabels, Gauge>::default();
        registry.register(
            "requests_in_flight",
            "Exchange requests being processed",
            in_flight_family.clone(),
        );
        let in_flight = [Rpc::Lookup, Rpc::Collect]
            .map(|rpc| in_flight_family.get_or_create_owned(&RpcLabels { rpc: rpc.as_str() }));
        let exchanges_waiting = Gauge::default();
        registry.register(
            "exchanges_waiting",
            "Lookups and collects waiting for a turn because limits.max_concurrent_exchanges are running",
            exchanges_waiting.clone(),
        );
        let provider_calls = Family::<ProviderCallLabels, Counter>::default();
        registry.register(
            "provider_calls",
            "Calls to registers (retries included in one call) by provider and outcome (ok, not_found, rejected, not_served, unavailable, timeout, malformed)",
            provider_calls.clone(),
        );
        let provider_seconds =
            Family::<ProviderLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "provider_call_duration",
            "Duration of calls to registers, retries included",
            Unit::Seconds,
            provider_seconds.clone(),
        );
        let rate_limited = Family::<GrantLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Lookups refused because the grant's rate limit was reached",
            rate_limited.clone(),
        );
        let unauthenticated = Family::<RpcLabels, Counter>::default();
        registry.register(
            "unauthenticated",
            "Exchange requests refused because the caller is not an enabled member",
            unauthenticated.clone(),
        );
        let audit_append_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register_with_unit(
            "audit_append_duration",
            "Time a lookup waits for its audit entry to be durable (group commit included)",
            Unit::Seconds,
            audit_append_seconds.clone(),
        );
        // No member label: the broker's own certificate only, so an alert
        // (`- time() < 30 * 86400`) fires before every client is refused.
        let certificate_expiry = Gauge::default();
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When the broker's own certificate (tls.cert) expires, as a Unix time",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        let tls_files_refused = Gauge::default();
        registry.register(
            "tls_files_refused",
            "1 while the broker's TLS files (tls.ca, tls.cert, tls.key) have changed into ones it refuses, so it goes on serving the ones it had; the reason is in its log",
            tls_files_refused.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            in_flight,
            exchanges_waiting,
            provider_calls,
            provider_seconds,
            rate_limited,
            unauthenticated,
            audit_append_seconds,
            certificate_expiry,
            tls_files_refused,
            request_cache: [Cache::new(), Cache::new()],
            provider_cache: Cache::new(),
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one request in flight until the guard drops.
    pub fn in_flight(&self, rpc: Rpc) -> InFlight {
        let gauge = self.in_flight[rpc.index()].clone();
        gauge.inc();
        InFlight(gauge)
    }

    /// Counts one finished lookup (or collect item). `record_type` and
    /// `consumer` must be registry names, or [`UNKNOWN`].
    pub fn request(&self, rpc: Rpc, consumer: &str, record_type: &str, outcome: Outcome, elapsed: Duration) {
        let series = self.request_cache[rpc.index()].get(record_type, consumer, || {
            let count = OUTCOMES.map(|o| {
                self.requests.get_or_create_owned(&RequestLabels {
                    rpc: rpc.as_str(),
                    consumer: consumer.to_string(),
                    record_type: record_type.to_string(),
                    outcome: o.as_str(),
                })
            });
            RequestSeries {
                rpc,
                record_type: record_type.to_string(),
                count,
                seconds: Default::default(),
            }
        });
        let i = outcome_index(outcome);
        series.count[i].inc();
        series.seconds[i]
            .get_or_init(|| {
                self.request_seconds.get_or_create_owned(&LatencyLabels {
                    rpc: series.rpc.as_str(),
                    record_type: series.record_type.clone(),
                    outcome: outcome.as_str(),
                })
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one call to a register.
    pub fn provider_call(&self, provider: &str, outcome: CallOutcome, elapsed: Duration) {
        let series = self.provider_cache.get(provider, "", || ProviderSeries {
            calls: CallOutcome::ALL.map(|o| {
                self.provider_calls.get_or_create_owned(&ProviderCallLabels {
                    provider: provider.to_string(),
                    outcome: o.as_str(),
                })
            }),
            seconds: self.provider_seconds.get_or_create_owned(&ProviderLabels {
                provider: provider.to_string(),
            }),
        });
        series.calls[outcome.index()].inc();
        series.seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts a lookup refused by its grant's rate limit.
    pub fn rate_limited(&self, consumer: &str, record_type: &str) {
        self.rate_limited
            .get_or_create(&GrantLabels {
                consumer: consumer.to_string(),
                record_type: record_type.to_string(),
            })
            .inc();
    }

    /// Counts a request from a caller that is not an enabled member.
    pub fn unauthenticated(&self, rpc: Rpc) {
        self.unauthenticated
            .get_or_create(&RpcLabels { rpc: rpc.as_str() })
            .inc();
    }

    /// Records how long an audit append took.
    pub fn audit_append(&self, elapsed: Duration) {
        self.audit_append_seconds.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition: the request-path metrics plus the
    /// state of `broker` read now.
    pub async fn encode(&self, broker: &Broker) -> Result<String, std::fmt::Error> {
        // Scrapes are rare; one at a time keeps their cost bounded.
        let _one = self.scrape.lock().await;
        let mut out = String::with_capacity(16 * 1024);
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &scrape_time(broker))?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Values read from the broker's state at scrape time.
fn scrape_time(broker: &Broker) -> Registry {
    let mut r = Registry::with_prefix("lienthong");
    let stats = broker.audit.stats();
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let seconds = |v: f64| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        g
    };
    r.register(
        "audit_log_entries",
        "Entries committed to this broker's audit log",
        gauge(saturating_i64(broker.audit.size())),
    );
    r.register(
        "audit_batches",
        "Group commits of the audit writer; entries_total / batches_total is the mean batch size",
        ConstCounter::new(stats.total_batches),
    );
    r.register(
        "audit_entries",
        "Entries committed by the audit writer since start",
        ConstCounter::new(stats.total_entries),
    );
    r.register(
        "audit_failed_batches",
        "Group commits the database refused (nothing was released for them)",
        ConstCounter::new(stats.failed_batches),
    );
    r.register(
        "audit_last_batch_size",
        "Entries in the audit writer's last batch",
        gauge(saturating_i64(stats.last_batch_size)),
    );
    r.register_with_unit(
        "audit_last_commit_duration",
        "Duration of the audit writer's last commit",
        Unit::Seconds,
        seconds(stats.last_commit.as_secs_f64()),
    );
    r.register(
        "audit_queued_appends",
        "Append requests waiting for the audit writer",
        gauge(i64::try_from(broker.audit.queued()).unwrap_or(i64::MAX)),
    );
    // An alert on state="failed" names a log whose stored history was altered
    // (the broker then refuses lookups: no data is released on top of it).
    let history = Family::<StateLabels, Gauge>::default();
    let current = broker.audit.history_check();
    for (name, is) in [
        ("running", current == HistoryCheck::Running),
        ("passed", current == HistoryCheck::Passed),
        ("failed", matches!(current, HistoryCheck::Failed(_))),
    ] {
        history.get_or_create(&StateLabels { state: name }).set(i64::from(is));
    }
    r.register(
        "audit_history_check",
        "Check of the audit log's stored history against its signed root, behind the log's opening: 1 for its current state",
        history,
    );
    if let Some(head) = broker.audit.latest_signed() {
        r.register(
            "audit_signed_tree_size",
            "Size of the latest signed tree head",
            gauge(saturating_i64(head.tree_size)),
        );
    }
    let snapshot = broker.snapshot();
    r.register(
        "snapshot_version",
        "Store change counter the authorization snapshot was built from",
        gauge(saturating_i64(snapshot.version)),
    );
    r.register_with_unit(
        "snapshot_age",
        "Time since the authorization snapshot was last rebuilt",
        Unit::Seconds,
        seconds(broker.snapshot_age().as_secs_f64()),
    );
    // An alert on 1 names a replica serving no lookups: a change in the
    // database that it cannot load (the broker log says why).
    r.register(
        "snapshot_stale",
        "1 while lookups are refused because the authorization snapshot is behind the database and cannot be \
         reloaded (past limits.max_snapshot_lag_ms)",
        gauge(i64::from(broker.freshness.refusing())),
    );
    let member_certificates = Family::<MemberLabels, Gauge>::default();
    for (member, not_after) in broker.member_certificates.all() {
        member_certificates
            .get_or_create(&MemberLabels { member })
            .set(not_after.unix_timestamp());
    }
    r.register_with_unit(
        "member_certificate_expiry_timestamp",
        "When the certificate each member last connected with expires, as a Unix time (revoked ones left out)",
        Unit::Seconds,
        member_certificates,
    );
    let outstanding = Family::<EndpointLabels, Gauge>::default();
    let breaker = Family::<BreakerLabels, Gauge>::default();
    let register_certificates = Family::<EndpointLabels, Gauge>::default();
    for (provider, endpoint) in broker.relay.endpoints() {
        let labels = EndpointLabels {
            provider: provider.clone(),
            endpoint: endpoint.id.clone(),
        };
        outstanding
            .get_or_create(&labels)
            .set(saturating_i64(endpoint.outstanding()));
        if let Some(not_after) = endpoint.certificate_not_after() {
            register_certificates
                .get_or_create(&labels)
                .set(not_after.unix_timestamp());
        }
        let current = endpoint.breaker_state();
        for (state, name) in [
            (BreakerState::Closed, "closed"),
            (BreakerState::HalfOpen, "half_open"),
            (BreakerState::Open, "open"),
        ] {
            breaker
                .get_or_create(&BreakerLabels {
                    provider: provider.clone(),
                    endpoint: endpoint.id.clone(),
                    state: name,
                })
                .set(i64::from(current == state));
        }
    }
    r.register(
        "provider_endpoint_in_flight",
        "Calls in flight to each register endpoint",
        outstanding,
    );
    r.register(
        "provider_endpoint_breaker_state",
        "Circuit breaker of each register endpoint: 1 for its current state",
        breaker,
    );
    r.register_with_unit(
        "provider_endpoint_certificate_expiry_timestamp",
        "When the certificate each register endpoint presented at the broker's last connection expires, as a Unix time",
        Unit::Seconds,
        register_certificates,
    );
    r
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct ListenError {
    /// Address asked for.
    pub addr: String,
    /// Cause.
    pub source: std::io::Error,
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr).await.map_err(|source| ListenError {
        addr: addr.to_string(),
        source,
    })
}

/// Most scrapes served at once; more connections wait to be accepted (with
/// TLS: wait after their handshake).
const MAX_CONNECTIONS: usize = 16;

/// TLS handshakes in progress at once, and from one address: a connection
/// past either is closed at once. Handshakes do not hold scrape slots, so
/// connections that never finish theirs (no certificate is needed to open
/// one) cannot keep a scraper from another address out.
const MAX_HANDSHAKES: usize = 16;
const MAX_HANDSHAKES_PER_ADDRESS: usize = 2;

/// A scraper's handshake takes milliseconds; the broker's own handshake
/// timeout (for agencies across the country) is longer than it needs.
const MAX_HANDSHAKE_TIME: Duration = Duration::from_secs(3);

/// TLS of the metrics listener (`telemetry.metrics_client_ca`).
#[derive(Clone)]
pub struct MetricsTls {
    /// Requires a client certificate from the scrapers' CA (see
    /// [`lienthong_tls::client_auth_required_config`]); replaced when the
    /// broker's TLS files change.
    pub config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
    /// A scraper that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for MetricsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// The handshakes in progress, in all and by address.
struct Handshakes {
    total: Arc<tokio::sync::Semaphore>,
    by_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One handshake's place among [`Handshakes`], given back when dropped.
struct HandshakeTurn {
    handshakes: Arc<Handshakes>,
    address: std::net::IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Handshakes {
    fn new() -> Arc<Self> {
        Arc::new(Handshakes {
            total: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            by_address: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn by_address(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        // Counts only, whole at every step: usable after a panic elsewhere.
        self.by_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn for a handshake from `address`, or `None` when the listener or
    /// that address has as many under way as it may.
    fn begin(self: &Arc<Self>, address: std::net::IpAddr) -> Option<HandshakeTurn> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut by_address = self.by_address();
        let under_way = by_address.entry(address).or_insert(0);
        if *under_way >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *under_way += 1;
        Some(HandshakeTurn {
            handshakes: self.clone(),
            address,
            _permit: permit,
        })
    }
}

impl Drop for HandshakeTurn {
    fn drop(&mut self) {
        let mut by_address = self.handshakes.by_address();
        if let Some(under_way) = by_address.get_mut(&self.address) {
            *under_way = under_way.saturating_sub(1);
            if *under_way == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Serves `GET /metrics` over HTTP/1.1 on `listener` until `shutdown`
/// resolves: over TLS with required client certificates when `tls` is given,
/// plain otherwise. Holds the broker weakly, so it never keeps a stopped
/// broker alive.
pub async fn serve(
    listener: TcpListener,
    tls: Option<MetricsTls>,
    broker: std::sync::Weak<Broker>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tls
        .as_ref()
        .map(|t| (t.config.clone(), t.handshake_timeout.min(MAX_HANDSHAKE_TIME)));
    let handshakes = Handshakes::new();
    let failures = Arc::new(lienthong_tls::FailureLog::new(
        "metrics tls handshakes failed (a scraper needs a certificate from telemetry.metrics_client_ca)",
    ));
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Plain HTTP: a slot before accepting, so that connections past the
        // limit wait in the listen queue. TLS: after the handshake.
        let permit = if acceptor.is_none() {
            tokio::select! {
                _ = &mut shutdown => break,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
            }
        } else {
            None
        };
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
        let broker = broker.clone();
        let Some((config, timeout)) = acceptor.as_ref() else {
            connections.spawn(async move {
                let _permit = permit;
                serve_connection(stream, broker).await;
            });
            continue;
        };
        let Some(turn) = handshakes.begin(remote.ip()) else {
            failures.note(remote, &"too many handshakes under way; connection closed");
            continue;
        };
        let (failures, limit, timeout) = (failures.clone(), limit.clone(), *timeout);
        let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
        connections.spawn(async move {
            let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
            drop(turn);
            match handshake {
                Ok(Ok(stream)) => {
                    let Ok(_permit) = limit.acquire_owned().await else {
                        return;
                    };
                    serve_connection(stream, broker).await;
                }
                Ok(Err(e)) => {
                    failures.note(remote, &e);
                }
                Err(_elapsed) => {
                    failures.note(remote, &format_args!("no handshake within {timeout:?}"));
                }
            }
        });
    }
    // Dropping the set aborts scrapes still open (keep-alive connections).
    drop(connections);
}

/// Answers HTTP/1.1 requests on one connection.
async fn serve_connection<S>(stream: S, broker: std::sync::Weak<Broker>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = service_fn(move |req| answer(broker.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "metrics connection ended with an error");
    }
}

async fn answer(
    broker: std::sync::Weak<Broker>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<String>, std::convert::Infallible> {
    let reply = |status: u16, content_type: &'static str, body: String| {
        let mut resp = hyper::Response::new(body);
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        resp
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(404, TEXT, "not found: metrics are at /metrics\n".into()));
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return Ok(reply(405, TEXT, "method not allowed: use GET\n".into()));
    }
    let Some(broker) = broker.upgrade() else {
        return Ok(reply(503, TEXT, "the broker is shutting down\n".into()));
    };
    match broker.metrics.encode(&broker).await {
        Ok(body) => Ok(reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )),
        Err(_) => Ok(reply(500, TEXT, "metrics could not be encoded\n".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        encode_registry(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn requests_are_counted_by_rpc_consumer_record_type_and_outcome() {
        let m = Metrics::new();
        let ms = Duration::from_millis(3);
        m.request(Rpc::Lookup, "office", "civil.birth", Outcome::Allowed, ms);
        m.request(Rpc::Lookup, "office", "civil.birth", Outcome::Allowed, ms);
        m.request(Rpc::Lookup, "office", "civil.birth", Outcome::Denied, ms);
        m.request(Rpc::Collect, "office", UNKNOWN, Outcome::Invalid, ms);
        let t = text(&m);
        assert!(
            t.contains(
                r#"lienthong_requests_total{rpc="lookup",consumer="office",record_type="civil.birth",outcome="allowed"} 2"#
            ),
            "{t}"
        );
        assert!(
            t.contains(
                r#"lienthong_requests_total{rpc="lookup",consumer="office",record_type="civil.birth",outcome="denied"} 1"#
            ),
            "{t}"
        );
        assert!(
            t.contains(
                r#"lienthong_requests_total{rpc="collect",consumer="office",record_type="unknown",outcome="invalid"} 1"#
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"lienthong_request_duration_seconds_count{rpc="lookup",record_type="civil.birth",outcome="allowed"} 2"#),
            "{t}"
        );
        // Counters start at zero for every outcome; histograms appear with their first observation.
        assert!(
            t.contains(
                r#"lienthong_requests_total{rpc="lookup",consumer="office",record_type="civil.birth",outcome="failed"} 0"#
            ),
            "{t}"
        );
        assert!(!t.contains(
            r#"lienthong_request_duration_seconds_count{rpc="lookup",record_type="civil.birth",outcome="failed"}"#
        ));
    }

    #[test]
    fn the_broker_certificate_expiry_is_exported_without_labels() {
        let m = Metrics::new();
        m.certificate_expiry.set(1_800_000_000);
        let t = text(&m);
        assert!(
            t.contains("lienthong_certificate_expiry_timestamp_seconds 1800000000\n"),
            "{t}"
        );
    }

    #[test]
    fn in_flight_goes_back_down_and_provider_calls_are_counted() {
        let m = Metrics::new();
        {
            let _a = m.in_flight(Rpc::Lookup);
            let _b = m.in_flight(Rpc::Lookup);
            assert!(text(&m).contains(r#"lienthong_requests_in_flight{rpc="lookup"} 2"#));
        }
        assert!(text(&m).contains(r#"lienthong_requests_in_flight{rpc="lookup"} 0"#));
        m.provider_call("civil-status", CallOutcome::Timeout, Duration::from_secs(1));
        m.provider_call("civil-status", CallOutcome::Ok, Duration::from_millis(1));
        let t = text(&m);
        assert!(
            t.contains(r#"lienthong_provider_calls_total{provider="civil-status",outcome="timeout"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"lienthong_provider_call_duration_seconds_count{provider="civil-status"} 2"#),
            "{t}"
        );
    }

    #[test]
    fn the_cache_hands_out_one_series_per_pair() {
        let c: Cache<u32> = Cache::new();
        let a = c.get("t", "x", || 1);
        let b = c.get("t", "x", || 2);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*c.get("t", "y", || 3), 3);
    }
}
