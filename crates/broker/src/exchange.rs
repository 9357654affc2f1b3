//! `Exchange`: Lookup and Collect, the relay path of the data flow in
//! DESIGN.md: identify, authorize, validate the query, rate limit, fetch,
//! validate the record, filter, audit (durably), reply with a receipt.

use crate::error::BrokerError;
use crate::metrics::{CallOutcome, Rpc, UNKNOWN};
use crate::relay::RelayError;
use crate::state::{Broker, Caller};
use crate::telemetry;
use lienthong::provider::v1::FetchRequest;
use lienthong::v1::exchange_server::Exchange;
use lienthong::v1::{
    CollectRequest, CollectResponse, CollectResult, ItemError, LookupRequest, LookupResponse, Receipt, collect_result,
};
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome, escape_unprintable, first_unprintable};
use lienthong_core::policy::{AccessRequest, Allowed, Decision, DenyReason, GrantState, fields_cover, grant_state};
use lienthong_core::ratelimit::{Held, lease_size};
use lienthong_core::schema::{CompiledRecordType, MAX_FIELDS};
use lienthong_core::{Fingerprint, GrantFields, JsonError, Role};
use lienthong_store::{Backend, RateTake};
use opentelemetry::trace::SpanContext;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field::Empty};

/// The Exchange service.
pub struct ExchangeService {
    broker: Arc<Broker>,
}

impl ExchangeService {
    /// Wraps the shared state.
    pub fn new(broker: Arc<Broker>) -> Self {
        ExchangeService { broker }
    }
}

/// Per-request context shared by the items of a Collect.
struct CallContext {
    rpc: Rpc,
    deadline: Option<Instant>,
    /// The consumer's trace (`traceparent`), invalid when it sent none.
    caller_trace: SpanContext,
    trace_id: String,
    /// The request id, its unprintable characters escaped.
    request_id: String,
    /// The first unprintable character of the request id the caller sent,
    /// for which its lookups are refused.
    request_id_unprintable: Option<char>,
    /// The caller's connection, whose certificate a lookup checks again
    /// once its register answered.
    peer: Option<Arc<lienthong_tls::PeerInfo>>,
}

impl CallContext {
    /// Built inside the RPC span, whose trace id the audit entries carry.
    fn of<T>(request: &Request<T>, request_id: RequestId, rpc: Rpc, caller_trace: SpanContext) -> CallContext {
        let trace_id = telemetry::trace_id(&Span::current(), &caller_trace);
        CallContext {
            rpc,
            deadline: crate::protocol::deadline_of(request),
            caller_trace,
            trace_id,
            request_id: request_id.text,
            request_id_unprintable: request_id.unprintable,
            peer: lienthong_tls::peer_info(request),
        }
    }
}

/// Longest request id, record type and purpose a request may carry. Each is
/// copied into the permanent audit log; no registered record type name and no
/// granted purpose is longer, and the `x-request-id` header has the same bound.
const MAX_NAME_BYTES: usize = 128;
/// Longest field pointer a request may name; longer ones are refused (and
/// audited clipped) before they are echoed in a message.
const MAX_FIELD_BYTES: usize = 1024;

pub(crate) use lienthong_core::clip;

/// A request's id as spans, logs and the audit log carry it.
struct RequestId {
    /// The id, its unprintable characters escaped, clipped.
    text: String,
    /// The first unprintable character the caller's id holds, if any.
    unprintable: Option<char>,
}

/// The caller's request id, clipped to [`MAX_NAME_BYTES`], or a new one.
/// Escaped: a request id with a newline or an escape character would forge
/// lines in the broker's log and the log's rows where they are printed;
/// the request is refused for it ([`check_printable`]), and its span and
/// entry show it escaped.
fn request_id_or_new(given: &str) -> RequestId {
    if given.is_empty() {
        return RequestId {
            text: uuid::Uuid::now_v7().to_string(),
            unprintable: None,
        };
    }
    RequestId {
        text: loggable(given),
        unprintable: first_unprintable(given),
    }
}

/// A client's name or id as the log and spans keep it: clipped to
/// [`MAX_NAME_BYTES`], its unprintable characters escaped.
fn loggable(text: &str) -> String {
    clip(&escape_unprintable(clip(text, MAX_NAME_BYTES)), MAX_NAME_BYTES).to_string()
}

/// Refuses a request whose request id, record type, purpose or a field
/// pointer holds an unprintable character (a newline, an escape, a
/// bidirectional override): each is written to the log and shown to
/// auditors and operators, where it would forge rows or drive their
/// terminal. No registered name, granted purpose or schema field holds
/// one. The message names the character, never the text.
fn check_printable<'a>(
    request_id: Option<char>,
    named: impl IntoIterator<Item = (&'static str, &'a str)>,
) -> Result<(), BrokerError> {
    let refuse = |what: &str, c: char| {
        BrokerError::InvalidArgument(format!(
            "{what} holds the unprintable character U+{:04X}; request ids, record types, purposes and field \
             pointers must be printable text: send it without control characters",
            c as u32
        ))
    };
    if let Some(c) = request_id {
        return Err(refuse("request_id", c));
    }
    for (what, text) in named {
        if let Some(c) = first_unprintable(text) {
            return Err(refuse(what, c));
        }
    }
    Ok(())
}

/// The texts of one lookup [`check_printable`] checks, named as in the request.
fn item_texts<'a>(item: &Item<'a>) -> impl Iterator<Item = (&'static str, &'a str)> {
    [("record_type", item.record_type), ("purpose", item.purpose)]
        .into_iter()
        .chain(item.fields.iter().map(|f| ("a field pointer", f.as_str())))
}

/// Refuses a lookup on a replica whose snapshot is too far behind.
fn snapshot_stale() -> Failure {
    fail(
        Outcome::Failed,
        "snapshot_stale",
        BrokerError::Unavailable(
            "this broker replica cannot load the federation's current grants, members and certificates \
             from its database, so it serves no lookups; no data was released; retry on another replica; \
             its operator finds why under `snapshot reload failed` in the broker log"
                .into(),
        ),
    )
}

/// Whether grant `grant_id` of `snapshot` is live at `now` and still covers
/// `access`'s purpose, its fields and the fields `released`; if not, why.
fn grant_still_covers(
    snapshot: &lienthong_core::snapshot::Snapshot,
    grant_id: &str,
    access: &AccessRequest<'_>,
    released: &[String],
    now: OffsetDateTime,
) -> Result<(), DenyReason> {
    let Some(grant) = snapshot.grant(grant_id) else {
        return Err(DenyReason::GrantRevoked { reason: String::new() });
    };
    match grant_state(grant, now) {
        GrantState::Live => {}
        GrantState::Revoked => {
            return Err(DenyReason::GrantRevoked {
                reason: grant.revoked_reason.clone(),
            });
        }
        GrantState::Expired => {
            return Err(DenyReason::GrantExpired {
                valid_until: grant.valid_until.unwrap_or(grant.valid_from),
            });
        }
        GrantState::NotYetValid => {
            return Err(DenyReason::GrantNotYetValid {
                valid_from: grant.valid_from,
            });
        }
    }
    if !grant.purposes.iter().any(|p| p == access.purpose) {
        return Err(DenyReason::PurposeNotGranted {
            purpose: access.purpose.to_owned(),
        });
    }
    if let Some(field) = access
        .fields
        .iter()
        .chain(released)
        .find(|f| !fields_cover(&grant.fields, f))
    {
        return Err(DenyReason::FieldNotGranted { field: field.clone() });
    }
    Ok(())
}

/// Whether a lookup never reached the register (no endpoint, its circuit
/// open, the broker's limit on calls to it), so that the consumer's rate
/// limit gets its token back. A call the register received keeps it,
/// whatever its answer: the limit caps how many calls one consumer puts to
/// a register, and refunding failures would let a query the register
/// chokes on be sent without limit, and open its circuit for everyone.
fn never_asked(e: &RelayError) -> bool {
    match e {
        RelayError::NotAsked(_) => true,
        RelayError::NotServed
        | RelayError::Unavailable(_)
        | RelayError::Malformed(_)
        | RelayError::Deadline(_)
        | RelayError::NotFound
        | RelayError::Rejected => false,
    }
}

/// How a lookup was counted against its grant's rate limit.
#[derive(Clone, Copy)]
enum Counted {
    /// In this broker's own buckets.
    InMemory,
    /// A token leased from the grant's shared bucket.
    Leased,
}

/// Refuses a lookup whose names are longer than anything registered, before
/// any of them is echoed in a message or written to the log whole.
fn check_sizes(item: &Item<'_>) -> Result<(), BrokerError> {
    let too_long = |what: &str, len: usize, max: usize| {
        BrokerError::InvalidArgument(format!("{what} is {len} bytes; at most {max} are allowed"))
    };
    if item.record_type.len() > MAX_NAME_BYTES {
        return Err(too_long("record_type", item.record_type.len(), MAX_NAME_BYTES));
    }
    if item.purpose.len() > MAX_NAME_BYTES {
        return Err(too_long("purpose", item.purpose.len(), MAX_NAME_BYTES));
    }
    if item.fields.len() > MAX_FIELDS {
        return Err(BrokerError::InvalidArgument(format!(
            "{} fields are named; no record type has more than {MAX_FIELDS}",
            item.fields.len()
        )));
    }
    if let Some(f) = item.fields.iter().find(|f| f.len() > MAX_FIELD_BYTES) {
        return Err(too_long("a field pointer", f.len(), MAX_FIELD_BYTES));
    }
    Ok(())
}

/// The metric and span label of a record type a client named (the
/// registry's name, or `unknown`), and its provider (empty when unknown).
/// Never the client's text for a type the registry does not know.
fn labels<'a>(caller: &'a Caller, record_type: &'a str) -> (&'a str, &'a str) {
    match caller.snapshot.record_type(record_type, 0) {
        Some(rt) => (record_type, rt.owner().as_str()),
        None => (UNKNOWN, ""),
    }
}

/// The span of one Exchange RPC (and of each item of a Collect). Its fields
/// are registry names, fixed words and ids, never the query. Everything known
/// up front is set at creation: each later `record` costs a log-format pass
/// (a JSON re-encoding with `--log-format json`), so only the purpose and the
/// outcome are recorded later.
fn rpc_span(rpc: Rpc, request_id: &str, consumer: &str, record_type: &str, provider: &str) -> Span {
    match rpc {
        Rpc::Lookup => tracing::info_span!(
            "lookup",
            otel.name = "lienthong.v1.Exchange/Lookup",
            otel.kind = "server",
            otel.status_code = Empty,
            request_id = %request_id,
            consumer = %consumer,
            record_type = %record_type,
            provider = %provider,
            purpose = Empty,
            outcome = Empty,
        ),
        // Record types, providers and outcomes are per item (`collect_item`).
        Rpc::Collect => tracing::info_span!(
            "collect",
            otel.name = "lienthong.v1.Exchange/Collect",
            otel.kind = "server",
            otel.status_code = Empty,
            request_id = %request_id,
            consumer = %consumer,
            outcome = Empty,
        ),
    }
}

/// The span of one item of a Collect, inside the Collect's span.
fn item_span(record_type: &str, provider: &str) -> Span {
    tracing::info_span!(
        "collect_item",
        record_type = %record_type,
        provider = %provider,
        purpose = Empty,
        outcome = Empty,
        otel.status_code = Empty,
    )
}

/// Records how a request or item ended on its span.
fn record_outcome(span: &Span, outcome: Outcome) {
    span.record("outcome", outcome.as_str());
    if outcome == Outcome::Failed {
        span.record("otel.status_code", "ERROR");
    }
}

/// The query of one lookup: text from Lookup, an object from Collect.
enum Query<'a> {
    Text(&'a str),
    Value(Value),
}

/// One lookup's inputs.
struct Item<'a> {
    record_type: &'a str,
    query: Query<'a>,
    purpose: &'a str,
    fields: &'a [String],
    schema_version: u32,
}

/// A failure with its audit outcome and reason code.
type Failure = (Outcome, &'static str, BrokerError);

fn fail(outcome: Outcome, code: &'static str, error: BrokerError) -> Failure {
    (outcome, code, error)
}

impl ExchangeService {
    /// Authenticates the caller of an Exchange RPC; a refusal is counted and
    /// gets a span of its own (the RPC span needs the caller).
    async fn caller<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
        request_id: &str,
        caller_trace: &SpanContext,
    ) -> Result<Caller, Status> {
        let started = Instant::now();
        let name = match rpc {
            Rpc::Lookup => "Exchange.Lookup",
            Rpc::Collect => "Exchange.Collect",
        };
        match self.broker.authenticate(request, name).await {
            Ok(caller) => Ok(caller),
            Err(e) => {
                let metrics = &self.broker.metrics;
                metrics.unauthenticated(rpc);
                metrics.request(rpc, UNKNOWN, UNKNOWN, Outcome::Denied, started.elapsed());
                let span = rpc_span(rpc, request_id, UNKNOWN, UNKNOWN, "");
                telemetry::continue_trace(&span, caller_trace);
                record_outcome(&span, Outcome::Denied);
                Err(e.into())
            }
        }
    }

    async fn lookup_rpc(
        &self,
        request: Request<LookupRequest>,
        caller: Caller,
        request_id: RequestId,
        caller_trace: SpanContext,
    ) -> Result<Response<LookupResponse>, Status> {
        let ctx = CallContext::of(&request, request_id, Rpc::Lookup, caller_trace);
        let r = request.into_inner();
        let item = Item {
            record_type: &r.record_type,
            query: Query::Text(&r.query_json),
            purpose: &r.purpose,
            fields: &r.fields,
            schema_version: r.schema_version,
        };
        let (result, _) = self.broker.lookup_one(&caller, item, &ctx).await;
        Ok(Response::new(result?))
    }

    /// Audits and counts a Collect refused as a whole: one entry for each
    /// subject it names (see [`collect_subjects`]), so that every citizen
    /// named sees the attempt in their history, or one entry without a
    /// subject when none can be read.
    async fn refuse_collect(
        &self,
        caller: &Caller,
        ctx: &CallContext,
        r: &CollectRequest,
        reason: String,
        started: Instant,
    ) {
        let limits = &self.broker.config.limits;
        let named = collect_subjects(caller, r, limits.max_query_bytes, limits.max_collect_items);
        let event = |record_type: Option<&CompiledRecordType>| {
            let mut event = self
                .broker
                .access_event(caller, ctx, record_type.map_or("", |rt| rt.name()), &r.purpose);
            if let Some(rt) = record_type {
                event.provider = rt.owner().to_string();
                event.schema_version = rt.version_number();
            }
            event.outcome = Outcome::Invalid;
            event.reason = reason.clone();
            event
        };
        let events: Vec<AuditEvent> = if named.is_empty() {
            vec![event(None)]
        } else {
            named
                .iter()
                .map(|(subject, record_type)| {
                    let mut e = event(*record_type);
                    e.subject_hash = self.broker.audit.subject_hash(subject);
                    e
                })
                .collect()
        };
        // Appended together: they share a commit.
        futures::future::join_all(events.into_iter().map(|e| self.broker.audit_refusal(e))).await;
        self.broker
            .metrics
            .request(Rpc::Collect, caller.id(), UNKNOWN, Outcome::Invalid, started.elapsed());
        record_outcome(&Span::current(), Outcome::Invalid);
    }

    async fn collect_rpc(
        &self,
        request: Request<CollectRequest>,
        caller: Caller,
        request_id: RequestId,
        caller_trace: SpanContext,
    ) -> Result<Response<CollectResponse>, Status> {
        let started = Instant::now();
        let ctx = CallContext::of(&request, request_id, Rpc::Collect, caller_trace);
        let r = request.into_inner();
        let texts = [("purpose", r.purpose.as_str())]
            .into_iter()
            .chain(r.items.iter().flat_map(|item| {
                [("items[].record_type", item.record_type.as_str())]
                    .into_iter()
                    .chain(item.fields.iter().map(|f| ("a field pointer", f.as_str())))
            }));
        if let Err(e) = check_printable(ctx.request_id_unprintable, texts) {
            self.refuse_collect(&caller, &ctx, &r, format!("unprintable_text: {e}"), started)
                .await;
            return Err(e.into());
        }
        if let Err(e) = check_collect(&r, self.broker.config.limits.max_collect_items) {
            self.refuse_collect(&caller, &ctx, &r, format!("invalid_collect: {e}"), started)
                .await;
            return Err(e.into());
        }
        let shared = match parse_object(&r.query_json, "query_json", self.broker.config.limits.max_query_bytes) {
            Ok(v) => v,
            Err(e) => {
                self.refuse_collect(&caller, &ctx, &r, format!("invalid_query: {e}"), started)
                    .await;
                return Err(e.into());
            }
        };
        let mut queries = Vec::with_capacity(r.items.len());
        for item in &r.items {
            let mut q = shared.clone();
            if !item.query_json.trim().is_empty() {
                match parse_object(
                    &item.query_json,
                    "items[].query_json",
                    self.broker.config.limits.max_query_bytes,
                ) {
                    Ok(Value::Object(extra)) => {
                        if let Value::Object(base) = &mut q {
                            base.extend(extra);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let e = BrokerError::InvalidArgument(format!(
                            "item {}: {e}",
                            clip(&item.record_type, MAX_NAME_BYTES)
                        ));
                        self.refuse_collect(&caller, &ctx, &r, format!("invalid_query: {e}"), started)
                            .await;
                        return Err(e.into());
                    }
                }
            }
            queries.push(q);
        }
        if let Err(e) = self.broker.check_one_subject(&caller, &r, &queries) {
            self.refuse_collect(&caller, &ctx, &r, format!("several_subjects: {e}"), started)
                .await;
            return Err(e.into());
        }
        let futures = r.items.iter().zip(queries).map(|(item, query)| {
            let one = Item {
                record_type: &item.record_type,
                query: Query::Value(query),
                purpose: &r.purpose,
                fields: &item.fields,
                schema_version: item.schema_version,
            };
            let (label, provider) = labels(&caller, &item.record_type);
            self.broker
                .lookup_one(&caller, one, &ctx)
                .instrument(item_span(label, provider))
        });
        let outcomes = futures::future::join_all(futures).await;
        let results = r
            .items
            .iter()
            .zip(outcomes)
            .map(|(item, (result, receipt))| CollectResult {
                record_type: item.record_type.clone(),
                receipt,
                result: Some(match result {
                    Ok(record) => collect_result::Result::Record(record),
                    Err(e) => collect_result::Result::Error(ItemError {
                        code: e.code() as i32,
                        message: e.to_string(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(CollectResponse {
            results,
            request_id: ctx.request_id,
        }))
    }
}

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
        let _in_flight = self.broker.metrics.in_flight(Rpc::Lookup);
        let caller_trace = telemetry::remote_parent(request.metadata());
        let request_id = request_id_or_new(&request.get_ref().request_id);
        let caller = self
            .caller(&request, Rpc::Lookup, &request_id.text, &caller_trace)
            .await?;
        let (label, provider) = labels(&caller, &request.get_ref().record_type);
        let span = rpc_span(Rpc::Lookup, &request_id.text, caller.id(), label, provider);
        telemetry::continue_trace(&span, &caller_trace);
        self.lookup_rpc(request, caller, request_id, caller_trace)
            .instrument(span)
            .await
    }

    async fn collect(&self, request: Request<CollectRequest>) -> Result<Response<CollectResponse>, Status> {
        let _in_flight = self.broker.metrics.in_flight(Rpc::Collect);
        let caller_trace = telemetry::remote_parent(request.metadata());
        let request_id = request_id_or_new(&request.get_ref().request_id);
        let caller = self
            .caller(&request, Rpc::Collect, &request_id.text, &caller_trace)
            .await?;
        let span = rpc_span(Rpc::Collect, &request_id.text, caller.id(), UNKNOWN, "");
        telemetry::continue_trace(&span, &caller_trace);
        self.collect_rpc(request, caller, request_id, caller_trace)
            .instrument(span)
            .await
    }
}

fn check_collect(r: &CollectRequest, max: usize) -> Result<(), BrokerError> {
    if r.items.is_empty() {
        return Err(BrokerError::InvalidArgument("collect needs at least one item".into()));
    }
    if r.items.len() > max {
        return Err(BrokerError::InvalidArgument(format!(
            "collect has {} items; at most {max} are allowed",
            r.items.len()
        )));
    }
    for (i, item) in r.items.iter().enumerate() {
        if r.items[..i].iter().any(|o| o.record_type == item.record_type) {
            return Err(BrokerError::InvalidArgument(format!(
                "record type {} appears twice in the collect",
                clip(&item.record_type, MAX_NAME_BYTES)
            )));
        }
    }
    Ok(())
}

/// The subjects a Collect names, as far as its queries can be read, for the
/// entries of its refusal: the subject key's value in the shared query
/// merged with each item's (an item query that cannot be read adds nothing;
/// an item of a record type the registry does not know names no key), trimmed
/// as subjects are hashed, each once, in the order first named. With each,
/// the record type naming it, or `None` when several do. Only the first
/// `max_items` items are read, as many as a Collect may hold: a refused
/// request cannot make the log write more entries than an accepted one.
fn collect_subjects<'s>(
    caller: &'s Caller,
    r: &CollectRequest,
    max_query_bytes: usize,
    max_items: usize,
) -> Vec<(String, Option<&'s CompiledRecordType>)> {
    let shared = parse_object(&r.query_json, "query_json", max_query_bytes).ok();
    let mut named: Vec<(String, Option<&CompiledRecordType>)> = Vec::new();
    for item in r.items.iter().take(max_items) {
        let Some(rt) = caller.snapshot.record_type(&item.record_type, item.schema_version) else {
            continue;
        };
        let mut query = shared.clone().unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        if let (Value::Object(base), Ok(Value::Object(extra))) = (
            &mut query,
            parse_object(&item.query_json, "items[].query_json", max_query_bytes),
        ) {
            base.extend(extra);
        }
        let Some(subject) = rt.subject(&query).map(str::trim).filter(|s| !s.is_empty()) else {
            continue;
        };
        match named.iter_mut().find(|(s, _)| s == subject) {
            Some((_, record_type)) => {
                if record_type.is_some_and(|named_by| named_by.name() != rt.name()) {
                    *record_type = None;
                }
            }
            None => named.push((subject.to_owned(), Some(rt.as_ref()))),
        }
    }
    named
}

fn parse_object(text: &str, what: &str, max: usize) -> Result<Value, BrokerError> {
    if text.len() > max {
        return Err(BrokerError::InvalidArgument(format!(
            "{what} is {} bytes; at most {max} are allowed",
            text.len()
        )));
    }
    match lienthong_core::parse_unique_keys(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(BrokerError::InvalidArgument(format!("{what} must be a JSON object"))),
        // Which of the two the register would read is anyone's guess, and
        // the query schema would have checked only the last.
        Err(e @ JsonError::RepeatedKey { .. }) => Err(BrokerError::InvalidArgument(format!(
            "{what} is ambiguous: {e}; name each key once"
        ))),
        // serde_json's message names line and column, never the content.
        Err(JsonError::Malformed(e)) => Err(BrokerError::InvalidArgument(format!("{what} is not valid JSON: {e}"))),
    }
}

impl Broker {
    fn access_event(&self, caller: &Caller, ctx: &CallContext, record_type: &str, purpose: &str) -> AuditEvent {
        let mut event = AuditEvent::new(EntryKind::Access, OffsetDateTime::now_utc());
        event.actor = caller.id().to_string();
        event.request_id = ctx.request_id.clone();
        event.trace_id = ctx.trace_id.clone();
        // Clipped: an oversized name is refused, and its entry need not keep
        // it whole. Escaped: one holding a control character is refused, and
        // its entry must not print it.
        event.record_type = loggable(record_type);
        event.purpose = loggable(purpose);
        event
    }

    /// Audits a request that releases nothing; the refusal stands even if the
    /// log cannot be written (nothing leaves either way), but it is logged.
    async fn audit_refusal(&self, event: AuditEvent) -> Option<Receipt> {
        match self.append_access(event).await {
            Ok(r) => Some(receipt(r)),
            Err(e) => {
                tracing::error!(error = %e, "could not audit a refused lookup");
                None
            }
        }
    }

    /// Counts a lookup against its grant's limit: `Err(retry_after)` when
    /// it is reached. One broker on its own database (SQLite) counts in
    /// memory. Replicas count against the grant's bucket in the database,
    /// shared by all of them, through tokens leased a few at a time
    /// ([`lease_size`]), so most lookups do not wait for the database.
    async fn count_against_limit(
        &self,
        grant_id: &str,
        per_minute: u32,
    ) -> Result<Result<Counted, Duration>, lienthong_store::StoreError> {
        let in_memory = |now| {
            self.rate_limiter
                .check(grant_id, per_minute, now)
                .map(|()| Counted::InMemory)
        };
        if per_minute == 0 || self.store.backend() == Backend::Sqlite {
            return Ok(in_memory(Instant::now()));
        }
        if let Some(counted) = self.held_rate_token(grant_id) {
            return Ok(counted);
        }
        // Bounded as the audit commit is: a database that hangs, rather than
        // refuses, fails the lookup in time for the consumer to hear why.
        let limit = Duration::from_millis(self.config.audit.commit_timeout_ms);
        let lease = async {
            // One lease at a time per grant: the lookups that found none wait
            // for it rather than each asking for one of their own (a herd that
            // would queue on the bucket's row lock, its tokens left to lapse).
            let _one_at_a_time = self.rate_lease_locks.lock(grant_id).await;
            if let Some(counted) = self.held_rate_token(grant_id) {
                return Ok(counted);
            }
            let taken = self
                .store
                .take_rate_tokens(grant_id, per_minute, lease_size(per_minute))
                .instrument(tracing::debug_span!("rate_lease"))
                .await?;
            let now = Instant::now();
            Ok(match taken {
                Some(RateTake::Taken(n)) => {
                    self.rate_leases.hold(grant_id, n.saturating_sub(1), now);
                    Ok(Counted::Leased)
                }
                Some(RateTake::Empty(retry_after)) => {
                    self.rate_leases.empty_until(grant_id, now, now + retry_after);
                    Err(retry_after)
                }
                // A backend without shared buckets has one broker.
                None => in_memory(now),
            })
        };
        tokio::time::timeout(limit, lease).await.map_err(|_| {
            lienthong_store::StoreError::Unavailable(format!("no answer within {} ms", limit.as_millis()))
        })?
    }

    /// What this broker holds of a grant's shared bucket: a token, or the
    /// knowledge that it is empty; `None` when it must ask the database.
    fn held_rate_token(&self, grant_id: &str) -> Option<Result<Counted, Duration>> {
        match self.rate_leases.take(grant_id, Instant::now()) {
            Held::Token => Some(Ok(Counted::Leased)),
            Held::Empty(retry_after) => Some(Err(retry_after)),
            Held::Nothing => None,
        }
    }

    /// Gives back the token a lookup took from its grant's rate limit, when
    /// the register made it fail: a consumer is not limited for the
    /// register's outage. A leased token goes back to this broker's lease
    /// (see [`lienthong_core::Leases::give_back`] for why not to the shared
    /// bucket).
    fn give_back_rate_token(&self, allowed: &Allowed, counted: Counted) {
        let now = Instant::now();
        match counted {
            Counted::InMemory => self
                .rate_limiter
                .give_back(&allowed.grant_id, allowed.rate_limit_per_minute, now),
            Counted::Leased => self.rate_leases.give_back(&allowed.grant_id, now),
        }
    }

    /// Decides again, once the register has answered, whether its record
    /// may still leave: the grant may have been revoked or have expired, the
    /// consumer been disabled or its certificate revoked while the register
    /// was asked, and an admin told so relies on nothing more leaving under
    /// them. Decided against this broker's current snapshot, now. When the
    /// snapshot is still the one the lookup was decided with, only time has
    /// moved: the grant's end is all there is to check, without a lock or an
    /// allocation. The entry's commit comes after this: a change loaded
    /// while it is being written no longer stops the record.
    fn still_allowed(
        &self,
        caller: &Caller,
        ctx: &CallContext,
        access: &AccessRequest<'_>,
        allowed: &Allowed,
        released: &[String],
    ) -> Result<Option<String>, Failure> {
        if self.freshness.refusing() {
            return Err(snapshot_stale());
        }
        let denied = |reason: DenyReason| {
            fail(
                Outcome::Denied,
                reason.code(),
                BrokerError::PermissionDenied(format!(
                    "{reason} (this changed while the register was asked for the {} record; nothing was released)",
                    access.record_type
                )),
            )
        };
        let now = OffsetDateTime::now_utc();
        let current = self.snapshot();
        if Arc::ptr_eq(&current, &caller.snapshot) {
            return match caller.snapshot.grant(&allowed.grant_id).and_then(|g| g.valid_until) {
                Some(valid_until) if now >= valid_until => Err(denied(DenyReason::GrantExpired { valid_until })),
                _ => Ok(None),
            };
        }
        match current.member(caller.id()) {
            Some(m) if !m.enabled => return Err(denied(DenyReason::MemberDisabled)),
            Some(m) if m.has_role(Role::Consumer) => {}
            _ => return Err(denied(DenyReason::NotAConsumer)),
        }
        let revoked = ctx
            .peer
            .as_ref()
            .and_then(|p| p.fingerprints.as_ref())
            .and_then(|f| f.iter().find_map(|fp| current.revoked_certificate(&Fingerprint(*fp))));
        if let Some(revoked) = revoked {
            return Err(fail(
                Outcome::Denied,
                "certificate_revoked",
                BrokerError::Unauthenticated(format!(
                    "the certificate of member {} this lookup was made with (sha256 {}) was revoked while the \
                     register was asked; nothing was released; connect with the member's current certificate",
                    caller.id(),
                    revoked.fingerprint
                )),
            ));
        }
        let Err(reason) = grant_still_covers(&current, &allowed.grant_id, access, released, now) else {
            return Ok(None);
        };
        // The grant was replaced meanwhile (a new one made, the old one
        // revoked): a live grant covering everything released allows it,
        // and the entry names that grant.
        if let Decision::Allow(other) = current.decide(caller.id(), access, now)
            && grant_still_covers(&current, &other.grant_id, access, released, now).is_ok()
            && current
                .grant_reviewed(&other.grant_id)
                .is_none_or(|r| released.iter().all(|p| r.has_field(p)))
        {
            return Ok(Some(other.grant_id));
        }
        Err(denied(reason))
    }

    /// Names in a refused lookup's entry the subject its query names by
    /// `rt`'s subject key, when the query can be read: trimmed, as
    /// SubjectHistory trims the key a citizen portal sends.
    fn name_subject(&self, event: &mut AuditEvent, rt: &CompiledRecordType, query: &Query<'_>) {
        let parsed;
        let query = match query {
            Query::Text(text) => {
                parsed = parse_object(text, "query_json", self.config.limits.max_query_bytes).ok();
                parsed.as_ref()
            }
            Query::Value(v) => Some(v),
        };
        if let Some(subject) = query.and_then(|q| rt.subject(q)) {
            event.subject_hash = self.audit.subject_hash(subject.trim());
        }
    }

    /// Appends an access entry in an `audit_commit` span, timing the wait.
    async fn append_access(&self, event: AuditEvent) -> Result<lienthong_audit::Receipt, lienthong_audit::AuditError> {
        let started = Instant::now();
        let span = tracing::debug_span!("audit_commit", sequence = Empty);
        let result = self.audit.append(event).instrument(span.clone()).await;
        self.metrics.audit_append(started.elapsed());
        if let Ok(r) = &result {
            span.record("sequence", r.sequence);
        }
        result
    }

    /// A Collect is about one subject: every item's subject key must agree.
    fn check_one_subject(&self, caller: &Caller, r: &CollectRequest, queries: &[Value]) -> Result<(), BrokerError> {
        let mut subject: Option<&str> = None;
        for (item, q) in r.items.iter().zip(queries) {
            let Some(rt) = caller.snapshot.record_type(&item.record_type, item.schema_version) else {
                continue;
            };
            if let Some(s) = rt.subject(q) {
                match subject {
                    Some(prev) if prev != s => {
                        return Err(BrokerError::InvalidArgument(format!(
                            "items name different subjects (record type {}); a collect is for one subject",
                            clip(&item.record_type, MAX_NAME_BYTES)
                        )));
                    }
                    _ => subject = Some(s),
                }
            }
        }
        Ok(())
    }

    /// One audited lookup. Returns the result and, when the entry was
    /// logged, its receipt.
    async fn lookup_one(
        &self,
        caller: &Caller,
        item: Item<'_>,
        ctx: &CallContext,
    ) -> (Result<LookupResponse, BrokerError>, Option<Receipt>) {
        let started = Instant::now();
        let (label, _) = labels(caller, item.record_type);
        // The RPC span (Lookup) or the item span (Collect), created with the
        // consumer, record type and provider already set.
        let span = Span::current();
        let purpose = item.purpose;
        let mut event = self.access_event(caller, ctx, item.record_type, item.purpose);
        let (outcome, result) = match self.lookup_inner(caller, item, ctx, &mut event).await {
            Ok((mut response, record_json)) => {
                event.latency_us = started.elapsed().as_micros() as u64;
                event.payload_digest = hex::encode(Sha256::digest(record_json.as_bytes()));
                // Fail closed: the record leaves only once its entry is durable.
                match self.append_access(event).await {
                    Ok(r) => {
                        let receipt = receipt(r);
                        response.receipt = Some(receipt.clone());
                        response.record_json = record_json;
                        (Outcome::Allowed, (Ok(response), Some(receipt)))
                    }
                    Err(e) => (Outcome::Failed, (Err(e.into()), None)),
                }
            }
            Err((outcome, code, error)) => {
                event.latency_us = started.elapsed().as_micros() as u64;
                event.outcome = outcome;
                event.fields_released.clear();
                event.reason = format!("{code}: {error}");
                if code == "rate_limited" {
                    self.metrics.rate_limited(caller.id(), label);
                }
                let receipt = self.audit_refusal(event).await;
                (outcome, (Err(error), receipt))
            }
        };
        // A purpose is shown once a grant accepted it: then it is a registered legal basis.
        if matches!(outcome, Outcome::Allowed | Outcome::Failed) {
            span.record("purpose", purpose);
        }
        record_outcome(&span, outcome);
        self.metrics
            .request(ctx.rpc, caller.id(), label, outcome, started.elapsed());
        result
    }

    async fn lookup_inner(
        &self,
        caller: &Caller,
        item: Item<'_>,
        ctx: &CallContext,
        event: &mut AuditEvent,
    ) -> Result<(LookupResponse, String), Failure> {
        let snapshot = &caller.snapshot;
        // First: the message of any later refusal may quote these texts.
        if let Err(e) = check_printable(ctx.request_id_unprintable, item_texts(&item)) {
            // Still in the citizen's history when a known type's query names them.
            if let Some(rt) = snapshot.record_type(item.record_type, 0) {
                self.name_subject(event, rt, &item.query);
            }
            return Err(fail(Outcome::Invalid, "unprintable_text", e));
        }
        // Fail closed: a snapshot this replica knows is behind would still
        // honour revoked grants, disabled members and revoked certificates.
        if self.freshness.refusing() {
            return Err(snapshot_stale());
        }
        let invalid = |code, msg: String| fail(Outcome::Invalid, code, BrokerError::InvalidArgument(msg));
        check_sizes(&item).map_err(|e| fail(Outcome::Invalid, "oversized_request", e))?;
        let Some(rt) = snapshot.record_type(item.record_type, item.schema_version) else {
            // A type the registry knows, in a version it does not: the entry
            // names the subject as the current version's key finds it, so that
            // the attempt is in the citizen's history.
            if let Some(current) = snapshot.record_type(item.record_type, 0) {
                event.provider = current.owner().to_string();
                self.name_subject(event, current, &item.query);
            }
            let msg = if item.schema_version == 0 || snapshot.record_type(item.record_type, 0).is_none() {
                format!(
                    "record type {:?} is not registered; `lienthong schema list` shows the registered types",
                    item.record_type
                )
            } else {
                format!(
                    "record type {} has no version {}",
                    item.record_type, item.schema_version
                )
            };
            return Err(invalid("unknown_record_type", msg));
        };
        event.provider = rt.owner().to_string();
        event.schema_version = rt.version_number();
        let query = match item.query {
            Query::Text(text) => parse_object(text, "query_json", self.config.limits.max_query_bytes)
                .map_err(|e| fail(Outcome::Invalid, "invalid_query", e))?,
            Query::Value(v) => v,
        };
        if let Some(subject) = rt.subject(&query) {
            // Trimmed, as SubjectHistory trims the key a citizen portal sends.
            event.subject_hash = self.audit.subject_hash(subject.trim());
        }
        if item.purpose.trim().is_empty() {
            return Err(invalid(
                "no_purpose",
                "purpose is required: name the legal basis of this lookup, as written in your grant".into(),
            ));
        }
        for f in item.fields {
            if !rt.has_field(f) {
                return Err(invalid(
                    "unknown_field",
                    format!(
                        "record type {} v{} has no field {f:?}; fields are JSON Pointers such as /full_name",
                        rt.name(),
                        rt.version_number()
                    ),
                ));
            }
        }
        let now = OffsetDateTime::now_utc();
        let access = AccessRequest {
            record_type: rt.name(),
            purpose: item.purpose,
            fields: item.fields,
        };
        let decision = tracing::debug_span!("authorize").in_scope(|| snapshot.decide(caller.id(), &access, now));
        let allowed = match decision {
            Decision::Allow(a) => {
                event.grant_id = a.grant_id.clone();
                a
            }
            Decision::Deny(reason) => {
                return Err(fail(
                    Outcome::Denied,
                    reason.code(),
                    BrokerError::PermissionDenied(reason.to_string()),
                ));
            }
        };
        tracing::debug_span!("validate_query").in_scope(|| {
            rt.validate_query(&query).map_err(|f| {
                invalid(
                    "invalid_query",
                    format!(
                        "query does not match the query schema of {} v{} {f}",
                        rt.name(),
                        rt.version_number()
                    ),
                )
            })
        })?;
        // A disabled register (its key leaked, its agency suspended) gets no
        // more queries, as a disabled consumer gets no more answers. Checked
        // before the rate limit: a lookup refused for it uses none of it.
        if !snapshot.member(rt.owner().as_str()).is_some_and(|m| m.enabled) {
            return Err(fail(
                Outcome::Failed,
                "provider_disabled",
                BrokerError::Unavailable(format!(
                    "register {} is disabled in the federation; {} records cannot be looked up until an admin enables it again",
                    rt.owner(),
                    rt.name()
                )),
            ));
        }
        // The caller gave up already (a zero or spent `grpc-timeout`): the
        // register is not asked, nor blamed, and no rate limit is used.
        let too_late = || {
            fail(
                Outcome::Failed,
                "deadline_exceeded",
                BrokerError::DeadlineExceeded(format!(
                    "the caller's deadline (grpc-timeout) passed before register {} was asked for the {} record; \
                     nothing was fetched or released; retry with a longer deadline",
                    rt.owner(),
                    rt.name()
                )),
            )
        };
        if ctx.deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(too_late());
        }
        let within_limit = self
            .count_against_limit(&allowed.grant_id, allowed.rate_limit_per_minute)
            .await
            .map_err(|why| {
                tracing::warn!(error = %why, grant = %allowed.grant_id, "cannot count a lookup against its grant's shared rate limit");
                fail(
                    Outcome::Failed,
                    "rate_limit_unavailable",
                    BrokerError::Unavailable(format!(
                        "the count of grant {}'s rate limit, which all replicas share, is in the broker's database, \
                         which did not answer; no data was released; retry shortly",
                        allowed.grant_id
                    )),
                )
            })?;
        let counted = match within_limit {
            Ok(counted) => counted,
            Err(retry_after) => {
                return Err(fail(
                    Outcome::Denied,
                    "rate_limited",
                    BrokerError::RateLimited {
                        message: format!(
                            "rate limit of {} lookups per minute of grant {} reached; retry in {} s",
                            allowed.rate_limit_per_minute,
                            allowed.grant_id,
                            retry_after.as_secs_f64().ceil()
                        ),
                        retry_after,
                    },
                ));
            }
        };
        // What the audit entry, the register and the consumer are told is
        // released: only fields this version and the grant's reviewed
        // version both declare, as the selection applied to the record.
        let reviewed = snapshot.grant_reviewed(&allowed.grant_id);
        let declared = |p: &String| rt.has_field(p) && reviewed.is_none_or(|r| r.has_field(p));
        let released: Vec<String> = match &allowed.fields {
            // Every top-level field.
            GrantFields::All => rt
                .version
                .field_pointers
                .iter()
                .filter(|p| p.rfind('/') == Some(0) && declared(p))
                .cloned()
                .collect(),
            GrantFields::Pointers(p) => p.iter().filter(|p| declared(p)).cloned().collect(),
        };
        let timeout = self.config.provider_timeout(rt.name());
        let now = Instant::now();
        let deadline = match ctx.deadline {
            // Keep a margin so the consumer hears the broker's DEADLINE_EXCEEDED
            // (audited, with a reason) before its own timer fires.
            Some(d) => {
                let left = d.saturating_duration_since(now);
                let margin = (left / 10).min(Duration::from_millis(50));
                (now + left - margin).min(now + timeout)
            }
            None => now + timeout,
        };
        let deadline_is_callers = deadline < now + timeout;
        let fetch = FetchRequest {
            record_type: rt.name().to_string(),
            schema_version: rt.version_number(),
            query_json: query.to_string(),
            request_id: ctx.request_id.clone(),
            consumer: caller.id().to_string(),
            purpose: item.purpose.to_string(),
            fields: released.clone(),
        };
        let provider = rt.owner().as_str();
        let call_started = Instant::now();
        // Boxed: the provider call's state (tonic client, timers) is the bulk of a
        // lookup's future; inline, every lookup would carry it from its first
        // poll to its last, boxed only while the call runs.
        let fetched = Box::pin(
            self.relay
                .fetch(provider, fetch, deadline, deadline_is_callers, &ctx.caller_trace),
        )
        .await;
        // The relay gives up without calling when it had no time at all: the
        // deadline passed while the rate limit was counted (on the database).
        if deadline_is_callers && matches!(fetched, Err(RelayError::Deadline(d)) if d.is_zero()) {
            // The register was not asked: as before the count, no rate limit is used.
            self.give_back_rate_token(&allowed, counted);
            return Err(too_late());
        }
        if let Err(e) = &fetched
            && never_asked(e)
        {
            self.give_back_rate_token(&allowed, counted);
        }
        let call_elapsed = call_started.elapsed();
        let call_outcome = match &fetched {
            // Counted once the record is checked, below.
            Ok(_) => None,
            Err(RelayError::NotFound) => Some(CallOutcome::NotFound),
            Err(RelayError::Rejected) => Some(CallOutcome::Rejected),
            Err(RelayError::NotServed) => Some(CallOutcome::NotServed),
            Err(RelayError::Unavailable(_) | RelayError::NotAsked(_)) => Some(CallOutcome::Unavailable),
            Err(RelayError::Deadline(_)) => Some(CallOutcome::Timeout),
            Err(RelayError::Malformed(_)) => Some(CallOutcome::Malformed),
        };
        if let Some(outcome) = call_outcome {
            self.metrics.provider_call(provider, outcome, call_elapsed);
        }
        let record_text = fetched.map_err(|e| match e {
            RelayError::NotFound => fail(
                Outcome::Failed,
                "not_found",
                BrokerError::NotFound(format!(
                    "register {provider} holds no {} record for this query",
                    rt.name()
                )),
            ),
            RelayError::Rejected => fail(
                Outcome::Failed,
                "provider_rejected_query",
                BrokerError::InvalidArgument(format!("register {provider} could not use the query for {}", rt.name())),
            ),
            RelayError::NotServed => fail(
                Outcome::Failed,
                "provider_not_serving",
                BrokerError::FailedPrecondition(format!(
                    "register {provider} does not serve {} (yet): its operator must enable it",
                    rt.name()
                )),
            ),
            RelayError::Unavailable(m) | RelayError::NotAsked(m) => {
                fail(Outcome::Failed, "provider_unavailable", BrokerError::Unavailable(m))
            }
            RelayError::Deadline(d) => fail(
                Outcome::Failed,
                "provider_timeout",
                BrokerError::DeadlineExceeded(format!(
                    "register {provider} did not answer within {} ms",
                    d.as_millis()
                )),
            ),
            // The register is at fault, as for a record that breaks its schema.
            RelayError::Malformed(why) => fail(
                Outcome::Failed,
                "provider_malformed_answer",
                BrokerError::InvalidProviderRecord(format!(
                    "register {provider} answered outside the gRPC protocol for {}: {why}; nothing was passed on",
                    rt.name()
                )),
            ),
        })?;
        let bad = |code, msg: String| fail(Outcome::Failed, code, BrokerError::InvalidProviderRecord(msg));
        let checked = tracing::debug_span!("validate_record").in_scope(|| {
            // Checked once, with SIMD: serde_json would check every string of
            // the record on its own, slowly for text that is not ASCII (as names
            // and places in most languages are).
            let record_text = simdutf8::basic::from_utf8(&record_text).map_err(|_| {
                bad(
                    "provider_malformed_record",
                    format!(
                        "register {provider} answered a {} record that is not UTF-8 text; nothing was passed on",
                        rt.name()
                    ),
                )
            })?;
            // Parsed once, refusing a repeated key on the way: the schema
            // would check only the value serde_json kept, and the consumer's
            // reader might keep the other.
            let record = lienthong_core::parse_unique_keys(record_text).map_err(|e| match e {
                JsonError::Malformed(e) => bad(
                    "provider_malformed_record",
                    format!(
                        "register {provider} answered malformed JSON for {} ({e}); nothing was passed on",
                        rt.name()
                    ),
                ),
                JsonError::RepeatedKey { .. } => bad(
                    "provider_invalid_record",
                    format!(
                        "register {provider} answered an ambiguous {} record: {e}; nothing was passed on",
                        rt.name()
                    ),
                ),
            })?;
            rt.validate_record(&record).map_err(|f| {
                bad(
                    "provider_invalid_record",
                    format!(
                        "register {provider} answered a record violating {} v{} {f}; nothing was passed on",
                        rt.name(),
                        rt.version_number()
                    ),
                )
            })?;
            if !about_the_queried_subject(rt, &query, &record) {
                return Err(bad(
                    "provider_subject_mismatch",
                    format!(
                        "register {provider} answered a {} record about another subject than the query names; \
                         nothing was passed on",
                        rt.name()
                    ),
                ));
            }
            // A request naming no fields gets its grant's fields, compiled with
            // the snapshot; either way, only what the schema declares leaves.
            let written = match snapshot.grant_selection(&allowed.grant_id, rt.version_number()) {
                Some(selection) if item.fields.is_empty() => selection.to_json(&record),
                _ => snapshot
                    .requested_selection(&allowed.grant_id, rt, &allowed.fields)
                    .to_json(&record),
            };
            written.map_err(|e| {
                fail(
                    Outcome::Failed,
                    "record_encoding_failed",
                    BrokerError::Internal(format!("the released {} record could not be written: {e}", rt.name())),
                )
            })
        });
        // A record the broker cannot pass on (not UTF-8 or JSON, breaking its
        // schema, about another subject) is as unusable as an answer outside
        // the protocol: the call is not `ok`, whoever looks at the register's
        // error rate. A record the broker fails to write is its own fault.
        let register_at_fault = matches!(&checked, Err((_, _, BrokerError::InvalidProviderRecord(_))));
        let outcome = if register_at_fault {
            CallOutcome::Malformed
        } else {
            CallOutcome::Ok
        };
        self.metrics.provider_call(provider, outcome, call_elapsed);
        let record_json = checked?;
        if let Some(replacement) = self.still_allowed(caller, ctx, &access, &allowed, &released)? {
            event.grant_id = replacement;
        }
        event.fields_released = released.clone();
        event.outcome = Outcome::Allowed;
        let deprecation_notice = if rt.deprecated() {
            format!(
                "{} v{} is deprecated: {}",
                rt.name(),
                rt.version_number(),
                rt.version.deprecation_note
            )
        } else {
            String::new()
        };
        Ok((
            LookupResponse {
                record_json: String::new(),
                record_type: rt.name().to_string(),
                schema_version: rt.version_number(),
                fields_released: released,
                receipt: None,
                deprecation_notice,
                request_id: ctx.request_id.clone(),
            },
            record_json,
        ))
    }
}

/// False when `record` names a subject other than `query`'s: a property at
/// its top level named as the record type's subject key, holding a string,
/// must hold the query's subject. Otherwise a register answering about
/// another citizen would have that citizen's record released, and audited
/// under the queried citizen (whose history would show it, and the other's
/// would not). Compared trimmed, as subjects are hashed for the log. Decided
/// by the value, not by how the schema declares the property (`"type":
/// "string"`, a `$ref`, a type array, `allOf`: a check that depends on the
/// form was skipped by all but the first). A record type whose `id` is a
/// certificate number (an integer) while its query's `id` names the citizen
/// is not checked, nor a record without the property. Neither value is ever
/// put in a message.
fn about_the_queried_subject(rt: &CompiledRecordType, query: &Value, record: &Value) -> bool {
    let key = &rt.version.definition.subject_key;
    let Some(named) = record.get(key).and_then(Value::as_str) else {
        return true;
    };
    matches!(rt.subject(query), Some(asked) if named.trim() == asked.trim())
}

fn receipt(r: lienthong_audit::Receipt) -> Receipt {
    Receipt {
        log_id: r.log_id,
        sequence: r.sequence,
        leaf_hash: r.leaf_hash.to_vec(),
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace.to_ascii_lowercase())
}

/// The gRPC deadline a client sent (`grpc-timeout`), read as the kit reads it.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    lienthong::protocol::grpc_timeout(metadata.as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tonic::metadata::MetadataValue;

    fn record_type(subject_key: &str) -> CompiledRecordType {
        named_record_type("civil_status.test_record", subject_key)
    }

    fn named_record_type(name: &str, subject_key: &str) -> CompiledRecordType {
        let record = serde_json::json!({"type": "object", "properties": {
            subject_key: {"type": "string"},
            "full_name": {"type": "string"}
        }});
        defined_record_type(name, subject_key, &record)
    }

    fn defined_record_type(name: &str, subject_key: &str, record: &Value) -> CompiledRecordType {
        use lienthong_core::MemberId;
        use lienthong_core::schema::{Compatibility, RecordTypeVersion, SchemaLimits, parse_definition};
        let owner = MemberId::new("civil-status").unwrap();
        let query = serde_json::json!({
            "type": "object",
            "properties": {subject_key: {"type": "string"}},
            "required": [subject_key]
        });
        let definition = parse_definition(
            name,
            "a record",
            owner.clone(),
            &query.to_string(),
            &record.to_string(),
            subject_key,
            &SchemaLimits::default(),
        )
        .unwrap();
        let version = RecordTypeVersion::new(definition, 1, OffsetDateTime::now_utc(), owner, Compatibility::Backward);
        CompiledRecordType::compile(version).unwrap()
    }

    #[test]
    fn a_record_naming_another_subject_than_the_query_is_refused() {
        let rt = record_type("national_id");
        let query = serde_json::json!({"national_id": "001084004217"});
        let about = |record: Value| about_the_queried_subject(&rt, &query, &record);
        assert!(about(
            serde_json::json!({"national_id": "001084004217", "full_name": "A"})
        ));
        assert!(
            about(serde_json::json!({"national_id": " 001084004217 "})),
            "compared as hashed: trimmed"
        );
        // A record that does not name its subject at the top level is not checked.
        assert!(about(
            serde_json::json!({"full_name": "A", "father": {"national_id": "999999999999"}})
        ));
        assert!(!about(
            serde_json::json!({"national_id": "999999999999", "full_name": "A"})
        ));
        // No string, no subject: a schema declaring it a string refuses
        // such a record before this check.
        assert!(about(serde_json::json!({"national_id": 1084004217u64})));
        assert!(about(serde_json::json!({"national_id": null})));
        // The property checked is the record type's subject key, whatever it is called.
        let by_passport = record_type("passport_no");
        let query = serde_json::json!({"passport_no": "C1234567"});
        assert!(!about_the_queried_subject(
            &by_passport,
            &query,
            &serde_json::json!({"passport_no": "C7654321", "national_id": "001084004217"})
        ));
        assert!(about_the_queried_subject(
            &by_passport,
            &query,
            &serde_json::json!({"passport_no": "C1234567", "national_id": "999999999999"})
        ));
        // A record property of the same name that is no string (a certificate
        // number where the query's `id` names the citizen) is not the subject.
        let numbered = defined_record_type(
            "judicial.certificate",
            "id",
            &serde_json::json!({"type": "object", "properties": {"id": {"type": "integer"}}}),
        );
        assert!(about_the_queried_subject(
            &numbered,
            &serde_json::json!({"id": "001084004217"}),
            &serde_json::json!({"id": 4711})
        ));
        // However the schema declares the subject's property, a string in
        // it is checked: through a `$ref`, a type array, `allOf`.
        for declared in [
            serde_json::json!({"$ref": "#/$defs/nid"}),
            serde_json::json!({"type": ["string"]}),
            serde_json::json!({"allOf": [{"type": "string"}, {"minLength": 12}]}),
        ] {
            let rt = defined_record_type(
                "land.owner_record",
                "national_id",
                &serde_json::json!({
                    "type": "object",
                    "properties": {"national_id": declared},
                    "$defs": {"nid": {"type": "string", "pattern": "^[0-9]{12}$"}}
                }),
            );
            let query = serde_json::json!({"national_id": "000000000002"});
            assert!(
                !about_the_queried_subject(&rt, &query, &serde_json::json!({"national_id": "001084004217"})),
                "{declared}"
            );
            assert!(about_the_queried_subject(
                &rt,
                &query,
                &serde_json::json!({"national_id": "000000000002"})
            ));
        }
    }

    #[test]
    fn a_refused_collect_names_each_subject_its_queries_name_once() {
        use lienthong::v1::CollectItem;
        use lienthong_core::{Member, MemberId, Role, Snapshot};
        let now = OffsetDateTime::now_utc();
        let types = ["civil_status.birth_record", "civil_status.marriage_record"]
            .map(|name| Arc::new(named_record_type(name, "national_id")));
        let caller = Caller {
            member: Member {
                id: MemberId::new("office").unwrap(),
                display_name: "Office".into(),
                roles: vec![Role::Consumer],
                enabled: true,
                disabled_reason: String::new(),
                created_at: now,
                updated_at: now,
            },
            snapshot: Arc::new(Snapshot::build(
                1,
                now,
                Vec::new(),
                Vec::new(),
                types.to_vec(),
                Vec::new(),
            )),
        };
        let item = |record_type: &str, query: &str| CollectItem {
            record_type: record_type.into(),
            query_json: query.into(),
            ..Default::default()
        };
        let (birth, marriage) = ("civil_status.birth_record", "civil_status.marriage_record");
        let collect = |shared: &str, items: Vec<CollectItem>| CollectRequest {
            query_json: shared.into(),
            items,
            ..Default::default()
        };
        let subjects = |r: &CollectRequest, max_items: usize| -> Vec<(String, Option<String>)> {
            collect_subjects(&caller, r, 1024, max_items)
                .into_iter()
                .map(|(s, rt)| (s, rt.map(|rt| rt.name().to_owned())))
                .collect()
        };
        let a = r#"{"national_id":"001084004217"}"#;
        let b = r#"{"national_id":" 027209000007 "}"#;
        // An item naming another subject than the shared query's: both, each
        // with the record type naming it.
        let several = collect(a, vec![item(birth, b), item(marriage, "")]);
        assert_eq!(
            subjects(&several, 16),
            [
                ("027209000007".to_owned(), Some(birth.to_owned())),
                ("001084004217".to_owned(), Some(marriage.to_owned()))
            ]
        );
        // One subject named by two record types: one entry, no one record type.
        let one = collect(a, vec![item(birth, ""), item(marriage, a)]);
        assert_eq!(subjects(&one, 16), [("001084004217".to_owned(), None)]);
        // A shared query that cannot be read: what the items' queries name;
        // an item query that cannot be read, or of an unknown type, names none.
        let unreadable = collect("{", vec![item(birth, "{"), item(marriage, b), item("made.up", a)]);
        assert_eq!(
            subjects(&unreadable, 16),
            [("027209000007".to_owned(), Some(marriage.to_owned()))]
        );
        let too_big = collect(
            &format!(r#"{{"national_id":"{}"}}"#, "1".repeat(2000)),
            vec![item(birth, "")],
        );
        assert!(subjects(&too_big, 16).is_empty());
        // Items past the most a Collect may hold are not read.
        assert_eq!(subjects(&several, 1).len(), 1);
        assert!(subjects(&collect(a, Vec::new()), 16).is_empty());
    }

    #[test]
    fn parses_grpc_timeout_and_traceparent() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", MetadataValue::from_static("250m"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", MetadataValue::from_static("x"));
        assert_eq!(grpc_timeout(&m), None);
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of("garbage"), None);
    }
}
