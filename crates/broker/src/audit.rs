//! `Audit`: queries, export, subject history, tree heads and proofs.

use crate::convert::{from_ts, ts};
use crate::error::{BrokerError, Result};
use crate::state::{Broker, Caller, request_id_of};
use futures::Stream;
use lienthong::v1 as pb;
use lienthong::v1::audit_server::Audit;
use lienthong_audit::SignedTreeHead;
use lienthong_core::Role;
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_store::{EntryQuery, HistoryCursor, StoredEntry};
use std::pin::Pin;
use std::sync::Arc;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

/// The Audit service.
pub struct AuditService {
    broker: Arc<Broker>,
}

impl AuditService {
    /// Wraps the shared state.
    pub fn new(broker: Arc<Broker>) -> Self {
        AuditService { broker }
    }

    /// An audit read entry: who called which RPC, about which subject (an
    /// HMAC, empty when none), and how it ended.
    fn read_event(
        caller: &Caller,
        rpc: &str,
        request_id: String,
        subject_hash: String,
        refused: Option<&BrokerError>,
    ) -> AuditEvent {
        let mut event = AuditEvent::new(EntryKind::AuditRead, OffsetDateTime::now_utc());
        event.actor = caller.id().to_string();
        event.action = rpc.to_string();
        event.request_id = request_id;
        event.subject_hash = subject_hash;
        if let Some(e) = refused {
            event.outcome = match e {
                BrokerError::PermissionDenied(_) | BrokerError::RateLimited { .. } => Outcome::Denied,
                BrokerError::InvalidArgument(_) => Outcome::Invalid,
                _ => Outcome::Failed,
            };
            event.reason = match e {
                // The code lookups refused by their grant's limit are logged with.
                BrokerError::RateLimited { .. } => format!("rate_limited: {e}"),
                _ => e.to_string(),
            };
        }
        event
    }

    /// Audits a refused audit request; the refusal stands even if the log
    /// cannot be written (nothing leaves either way), but it is logged.
    async fn refused(
        &self,
        caller: &Caller,
        rpc: &str,
        request_id: String,
        subject_hash: String,
        error: BrokerError,
    ) -> Status {
        let event = Self::read_event(caller, rpc, request_id, subject_hash, Some(&error));
        if let Err(e) = self.broker.audit.append(event).await {
            tracing::error!(error = %e, rpc = %rpc, "could not audit a refused audit request");
        }
        error.into()
    }

    /// Authenticates the caller of `rpc` and checks its roles; a refusal is audited.
    async fn authorized<T>(
        &self,
        request: &Request<T>,
        rpc: &str,
        roles: &[Role],
        what: &str,
    ) -> std::result::Result<Caller, Status> {
        let caller = self.broker.authenticate(request, rpc).await?;
        match caller.require(roles, what) {
            Ok(()) => Ok(caller),
            Err(e) => Err(self
                .refused(&caller, rpc, request_id_of(request), String::new(), e)
                .await),
        }
    }
}

fn kind_to_pb(k: EntryKind) -> pb::EntryKind {
    match k {
        EntryKind::Access => pb::EntryKind::Access,
        EntryKind::Authentication => pb::EntryKind::Authentication,
        EntryKind::Admin => pb::EntryKind::Admin,
        EntryKind::AuditRead => pb::EntryKind::AuditRead,
    }
}

fn outcome_to_pb(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Allowed => pb::Outcome::Allowed,
        Outcome::Denied => pb::Outcome::Denied,
        Outcome::Failed => pb::Outcome::Failed,
        Outcome::Invalid => pb::Outcome::Invalid,
    }
}

/// The outcome a filter asks for; `None` for any. A value this version does
/// not know is refused: dropping the filter would answer with every entry.
fn outcome_from_pb(n: i32) -> Result<Option<Outcome>> {
    Ok(match pb::Outcome::try_from(n) {
        Ok(pb::Outcome::Unspecified) => None,
        Ok(pb::Outcome::Allowed) => Some(Outcome::Allowed),
        Ok(pb::Outcome::Denied) => Some(Outcome::Denied),
        Ok(pb::Outcome::Failed) => Some(Outcome::Failed),
        Ok(pb::Outcome::Invalid) => Some(Outcome::Invalid),
        Err(_) => {
            return Err(BrokerError::InvalidArgument(format!(
                "filter.outcome {n} is not an outcome: use OUTCOME_ALLOWED (1), OUTCOME_DENIED (2), \
                 OUTCOME_FAILED (3) or OUTCOME_INVALID (4), or leave it 0 for any"
            )));
        }
    })
}

/// The kind a filter asks for; `None` for any. A value this version does not
/// know is refused, as for [`outcome_from_pb`].
fn kind_from_pb(n: i32) -> Result<Option<EntryKind>> {
    Ok(match pb::EntryKind::try_from(n) {
        Ok(pb::EntryKind::Unspecified) => None,
        Ok(pb::EntryKind::Access) => Some(EntryKind::Access),
        Ok(pb::EntryKind::Authentication) => Some(EntryKind::Authentication),
        Ok(pb::EntryKind::Admin) => Some(EntryKind::Admin),
        Ok(pb::EntryKind::AuditRead) => Some(EntryKind::AuditRead),
        Err(_) => {
            return Err(BrokerError::InvalidArgument(format!(
                "filter.kind {n} is not an entry kind: use ENTRY_KIND_ACCESS (1), ENTRY_KIND_AUTHENTICATION (2), \
                 ENTRY_KIND_ADMIN (3) or ENTRY_KIND_AUDIT_READ (4), or leave it 0 for any"
            )));
        }
    })
}

/// Stored entry to wire as exported: the leaf byte for byte, for auditors to
/// re-hash, and beside it the indexed columns as the database holds them
/// (what queries filter on and citizens' histories are read through), which
/// `lienthong audit verify` checks against the leaf; the fields no column
/// holds are decoded from the leaf.
pub fn entry(e: &StoredEntry) -> pb::AuditEntry {
    let mut out = pb::AuditEntry {
        log_id: e.log_id.clone(),
        sequence: e.sequence,
        leaf_hash: e.leaf_hash.to_vec(),
        leaf_json: e.leaf.clone(),
        time: Some(ts(e.time)),
        kind: kind_to_pb(e.kind) as i32,
        actor: e.actor.clone(),
        provider: e.provider.clone(),
        record_type: e.record_type.clone(),
        purpose: e.purpose.clone(),
        subject_hash: e.subject_hash.clone(),
        outcome: outcome_to_pb(e.outcome) as i32,
        ..Default::default()
    };
    if let Ok(ev) = serde_json::from_str::<AuditEvent>(&e.leaf) {
        out.request_id = ev.request_id;
        out.trace_id = ev.trace_id;
        out.schema_version = ev.schema_version;
        out.fields_released = ev.fields_released;
        out.reason = ev.reason;
        out.payload_digest = ev.payload_digest;
        out.latency_us = ev.latency_us;
        out.action = ev.action;
        out.target = ev.target;
        out.grant_id = ev.grant_id;
    }
    out
}

/// The event an entry records, once the entry is checked to be its own
/// leaf's: its leaf hashing to its leaf hash, its columns those of its leaf.
/// Otherwise `DataLoss` naming it: someone altered the database, and what a
/// query found through an altered column is not what was logged.
fn checked_event(e: &StoredEntry) -> Result<AuditEvent> {
    let altered = |why: String| {
        let why = format!("log {}: entry {} {why}", e.log_id, e.sequence);
        tracing::error!(why = %why, "an audit entry read for the audit service is not what was logged");
        BrokerError::DataLoss(format!(
            "{why}. The audit database was altered behind the broker's back, so this answer is refused; \
             tell the broker's operator, and run `lienthong audit verify`"
        ))
    };
    if let Some(why) = lienthong_audit::entry_mismatch(e) {
        return Err(altered(why));
    }
    serde_json::from_str(&e.leaf).map_err(|_| altered("was altered: its stored leaf is not an audit event".into()))
}

/// Stored entry to wire as shown to people: every field decoded from the
/// leaf the tree hashes, once [`checked_event`] found the entry intact.
fn displayed_entry(e: &StoredEntry) -> Result<pb::AuditEntry> {
    let ev = checked_event(e)?;
    Ok(pb::AuditEntry {
        log_id: e.log_id.clone(),
        sequence: e.sequence,
        leaf_hash: e.leaf_hash.to_vec(),
        leaf_json: e.leaf.clone(),
        time: Some(ts(ev.time)),
        kind: kind_to_pb(ev.kind) as i32,
        request_id: ev.request_id,
        trace_id: ev.trace_id,
        actor: ev.actor,
        provider: ev.provider,
        record_type: ev.record_type,
        schema_version: ev.schema_version,
        purpose: ev.purpose,
        subject_hash: ev.subject_hash,
        fields_released: ev.fields_released,
        outcome: outcome_to_pb(ev.outcome) as i32,
        reason: ev.reason,
        payload_digest: ev.payload_digest,
        latency_us: ev.latency_us,
        action: ev.action,
        target: ev.target,
        grant_id: ev.grant_id,
    })
}

/// Tree head to wire.
pub fn sth(h: &SignedTreeHead) -> pb::SignedTreeHead {
    pb::SignedTreeHead {
        log_id: h.log_id.clone(),
        tree_size: h.tree_size,
        root_hash: h.root_hash.to_vec(),
        timestamp_ms: h.timestamp_ms,
        signature: h.signature.clone(),
    }
}

/// Whether `text` is a log id: the hex SHA-256 of a log's key, lowercase.
fn is_log_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A page token of a citizen's history: where the page ended, as
/// `<microseconds since the epoch>.<sequence>.<log id>`. It names entries,
/// never the citizen.
fn history_token(cursor: &HistoryCursor) -> String {
    let micros = cursor.time.unix_timestamp_nanos() / 1_000;
    format!("{micros}.{}.{}", cursor.sequence, cursor.log_id)
}

/// The cursor a [`history_token`] holds; `None` for anything else.
fn parse_history_token(token: &str) -> Option<HistoryCursor> {
    let mut parts = token.splitn(3, '.');
    let micros: i64 = parts.next()?.parse().ok()?;
    let sequence: u64 = parts.next()?.parse().ok()?;
    let log_id = parts.next()?;
    if !is_log_id(log_id) || i64::try_from(sequence).is_err() {
        return None;
    }
    Some(HistoryCursor {
        time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).ok()?,
        log_id: log_id.to_owned(),
        sequence,
    })
}

impl Broker {
    /// The log asked for, or this broker's own when none is named.
    fn log_or_own<'a>(&'a self, log_id: &'a str) -> Result<&'a str> {
        if log_id.is_empty() {
            return Ok(self.audit.log_id());
        }
        if !is_log_id(log_id) {
            return Err(BrokerError::InvalidArgument(
                "log_id is not a log id: give 64 lowercase hex digits, as receipts and ListLogs name logs, \
                 or leave it empty for this broker's own log"
                    .into(),
            ));
        }
        Ok(log_id)
    }

    fn entry_query(&self, f: Option<pb::EntryFilter>) -> Result<EntryQuery> {
        let f = f.unwrap_or_default();
        for (key, text) in [
            ("actor", &f.actor),
            ("provider", &f.provider),
            ("record_type", &f.record_type),
            ("purpose", &f.purpose),
        ] {
            // Stored entries hold none (`AuditEvent::storable`), and
            // PostgreSQL refuses one in a query as an error of its own.
            if text.contains('\0') {
                return Err(BrokerError::InvalidArgument(format!(
                    "filter.{key} holds a NUL character, which no entry holds"
                )));
            }
        }
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let time = |t: Option<prost_types::Timestamp>, key: &str| -> Result<_> {
            t.map(|t| from_ts(&t).ok_or_else(|| BrokerError::InvalidArgument(format!("filter.{key} is out of range"))))
                .transpose()
        };
        Ok(EntryQuery {
            log_id: self.log_or_own(&f.log_id)?.to_string(),
            actor: opt(f.actor),
            provider: opt(f.provider),
            record_type: opt(f.record_type),
            purpose: opt(f.purpose),
            outcome: outcome_from_pb(f.outcome)?,
            kind: kind_from_pb(f.kind)?,
            since: time(f.since, "since")?,
            until: time(f.until, "until")?,
            from_sequence: 0,
            limit: 100,
        })
    }

    async fn tree_head(&self, log_id: &str) -> Result<SignedTreeHead> {
        Ok(self.audit.latest_tree_head(self.log_or_own(log_id)?).await?)
    }
}

/// Sends the entries `q` selects to `tx`, a page at a time, until the last
/// or `deadline`: then the export ends `DEADLINE_EXCEEDED`, naming the
/// sequence to resume from. tonic's own timeout ends at a stream's headers.
async fn export_pages(
    store: Arc<dyn lienthong_store::Store>,
    mut q: EntryQuery,
    deadline: Option<std::time::Instant>,
    tx: tokio::sync::mpsc::Sender<std::result::Result<pb::AuditEntry, Status>>,
) {
    // A time no deadline reaches, for a stream without one.
    let until = deadline.map_or_else(
        || tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365 * 30),
        tokio::time::Instant::from_std,
    );
    let past_deadline = |next: u64| {
        Err(Status::deadline_exceeded(format!(
            "the export's deadline (grpc-timeout) passed; export again with from_sequence = {next} to go on"
        )))
    };
    loop {
        // A page ready at once would not meet the timeouts below.
        if tokio::time::Instant::now() >= until {
            let _ = tx.send(past_deadline(q.from_sequence)).await;
            return;
        }
        let page = match tokio::time::timeout_at(until, store.query_entries(&q)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                let _ = tx.send(Err(Status::from(BrokerError::from(e)))).await;
                return;
            }
            Err(_) => {
                let _ = tx.send(past_deadline(q.from_sequence)).await;
                return;
            }
        };
        let full = page.len() as u32 == q.limit;
        for e in &page {
            match tokio::time::timeout_at(until, tx.send(Ok(entry(e)))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                // The client reads slower than its deadline allows. Its
                // status must reach it, or the stream's end would read as the
                // export's; a client that stops reading is cut off by its own
                // deadline, which ends this.
                Err(_) => {
                    let _ = tx.send(past_deadline(e.sequence)).await;
                    return;
                }
            }
        }
        if let Some(last) = page.last() {
            q.from_sequence = last.sequence + 1;
        }
        if !full {
            return;
        }
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::AuditEntry, Status>> + Send>>;

#[tonic::async_trait]
impl Audit for AuditService {
    async fn query_entries(
        &self,
        request: Request<pb::QueryEntriesRequest>,
    ) -> std::result::Result<Response<pb::QueryEntriesResponse>, Status> {
        const RPC: &str = "Audit.QueryEntries";
        self.authorized(&request, RPC, &[Role::Auditor, Role::Admin], "read the audit log")
            .await?;
        let r = request.into_inner();
        let mut q = self.broker.entry_query(r.filter)?;
        q.limit = match r.page_size {
            0 => 100,
            n => n.min(1000),
        };
        if !r.page_token.is_empty() {
            // Sequences are stored as signed 64-bit integers: a larger token
            // was never returned.
            q.from_sequence = r
                .page_token
                .parse()
                .ok()
                .filter(|s| i64::try_from(*s).is_ok())
                .ok_or_else(|| {
                    BrokerError::InvalidArgument("page_token is not a token returned by QueryEntries".into())
                })?;
        }
        let entries = self.broker.store.query_entries(&q).await.map_err(BrokerError::from)?;
        let next_page_token = if entries.len() as u32 == q.limit {
            entries.last().map(|e| (e.sequence + 1).to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::QueryEntriesResponse {
            entries: entries.iter().map(displayed_entry).collect::<Result<_>>()?,
            next_page_token,
        }))
    }

    type ExportEntriesStream = EntryStream;

    async fn export_entries(
        &self,
        request: Request<pb::ExportEntriesRequest>,
    ) -> std::result::Result<Response<Self::ExportEntriesStream>, Status> {
        const RPC: &str = "Audit.ExportEntries";
        self.authorized(&request, RPC, &[Role::Auditor, Role::Admin], "export the audit log")
            .await?;
        let deadline = crate::protocol::deadline_of(&request);
        let r = request.into_inner();
        let mut q = self.broker.entry_query(r.filter)?;
        // No log reaches past i64::MAX entries (sequences are stored signed):
        // a start beyond it is past the end, and streams nothing.
        q.from_sequence = r.from_sequence.min(i64::MAX as u64);
        q.limit = 1000;
        // An unknown log is NOT_FOUND before anything streams, as its tree
        // heads and proofs are: not an empty export that looks like success.
        self.broker.store.log_size(&q.log_id).await.map_err(BrokerError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(export_pages(self.broker.store.clone(), q, deadline, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn subject_history(
        &self,
        request: Request<pb::SubjectHistoryRequest>,
    ) -> std::result::Result<Response<pb::SubjectHistoryResponse>, Status> {
        const RPC: &str = "Audit.SubjectHistory";
        let caller = self
            .authorized(
                &request,
                RPC,
                &[Role::SubjectPortal, Role::Auditor],
                "read a citizen's access history",
            )
            .await?;
        let request_id = request_id_of(&request);
        let r = request.into_inner();
        let per_minute = self.broker.config.limits.subject_history_per_minute;
        if let Err(retry_after) = self
            .broker
            .history_limiter
            .check(caller.id(), per_minute, std::time::Instant::now())
        {
            let hash = match r.subject_key.trim() {
                "" => String::new(),
                key => self.broker.audit.subject_hash(key),
            };
            let e = BrokerError::RateLimited {
                message: format!(
                    "{} may read {per_minute} pages of citizens' histories a minute from this broker \
                     (limits.subject_history_per_minute); retry in {} s",
                    caller.id(),
                    retry_after.as_secs_f64().ceil()
                ),
                retry_after,
            };
            return Err(self.refused(&caller, RPC, request_id, hash, e).await);
        }
        if r.subject_key.trim().is_empty() {
            let e = BrokerError::InvalidArgument("subject_key is required".into());
            return Err(self.refused(&caller, RPC, request_id, String::new(), e).await);
        }
        let hash = self.broker.audit.subject_hash(r.subject_key.trim());
        let since = match r.since.map(|t| from_ts(&t)) {
            Some(None) => {
                let e = BrokerError::InvalidArgument("since is out of range".into());
                return Err(self.refused(&caller, RPC, request_id, hash, e).await);
            }
            Some(Some(t)) => Some(t),
            None => None,
        };
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            match parse_history_token(&r.page_token) {
                Some(cursor) => Some(cursor),
                None => {
                    let e = BrokerError::InvalidArgument(
                        "page_token is not a token returned by SubjectHistory; leave it empty for the newest page"
                            .into(),
                    );
                    return Err(self.refused(&caller, RPC, request_id, hash, e).await);
                }
            }
        };
        let entries = match self
            .broker
            .store
            .subject_entries(&hash, since, after.as_ref(), limit)
            .await
        {
            Ok(entries) => entries,
            Err(e) => return Err(self.refused(&caller, RPC, request_id, hash, e.into()).await),
        };
        // What the citizen is shown is what the tree hashes: an entry put in
        // this history by an altered subject column, or shown through altered
        // columns, refuses the whole page rather than mislead.
        let accesses = match entries
            .iter()
            .map(|e| {
                let ev = checked_event(e)?;
                Ok(pb::SubjectAccess {
                    time: Some(ts(ev.time)),
                    consumer_name: caller
                        .snapshot
                        .member(&ev.actor)
                        .map(|m| m.display_name.clone())
                        .unwrap_or_default(),
                    consumer: ev.actor,
                    provider: ev.provider,
                    record_type: ev.record_type,
                    purpose: ev.purpose,
                    fields_released: ev.fields_released,
                    outcome: outcome_to_pb(ev.outcome) as i32,
                    receipt: Some(pb::Receipt {
                        log_id: e.log_id.clone(),
                        sequence: e.sequence,
                        leaf_hash: e.leaf_hash.to_vec(),
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()
        {
            Ok(accesses) => accesses,
            Err(e) => return Err(self.refused(&caller, RPC, request_id, hash, e).await),
        };
        // Fail closed: who read a citizen's history is itself on the record,
        // and the history leaves only once that entry is durable.
        let event = Self::read_event(&caller, RPC, request_id, hash, None);
        self.broker.audit.append(event).await.map_err(BrokerError::from)?;
        let next_page_token = match entries.last() {
            Some(last) if entries.len() as u32 == limit => history_token(&HistoryCursor::after(last)),
            _ => String::new(),
        };
        Ok(Response::new(pb::SubjectHistoryResponse {
            accesses,
            next_page_token,
        }))
    }

    async fn get_signed_tree_head(
        &self,
        request: Request<pb::GetSignedTreeHeadRequest>,
    ) -> std::result::Result<Response<pb::SignedTreeHead>, Status> {
        self.broker.authenticate(&request, "Audit.GetSignedTreeHead").await?;
        let head = self.broker.tree_head(&request.get_ref().log_id).await?;
        Ok(Response::new(sth(&head)))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> std::result::Result<Response<pb::InclusionProof>, Status> {
        self.broker.authenticate(&request, "Audit.GetInclusionProof").await?;
        let r = request.into_inner();
        let log_id = self.broker.log_or_own(&r.log_id)?.to_string();
        let (tree_size, tree_head) = if r.tree_size == 0 {
            let head = self.broker.tree_head(&log_id).await?;
            (head.tree_size, Some(sth(&head)))
        } else {
            (r.tree_size, None)
        };
        if r.sequence >= tree_size {
            let message = format!("entry {} is not covered by a tree of size {tree_size}", r.sequence);
            return Err(if tree_head.is_some() {
                // A receipt is proved once the next tree head is signed
                // (`audit.sign_interval_ms`): asking again then succeeds.
                BrokerError::OutOfRange(format!("{message}, the newest signed; ask again after the next one"))
            } else {
                BrokerError::InvalidArgument(format!("{message}: the sequence must be below tree_size"))
            }
            .into());
        }
        let (leaf, path) = self
            .broker
            .audit
            .inclusion_proof(&log_id, r.sequence, tree_size)
            .await
            .map_err(BrokerError::from)?;
        Ok(Response::new(pb::InclusionProof {
            log_id,
            sequence: r.sequence,
            tree_size,
            leaf_hash: leaf.to_vec(),
            path: path.iter().map(|h| h.to_vec()).collect(),
            tree_head,
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> std::result::Result<Response<pb::ConsistencyProof>, Status> {
        self.broker.authenticate(&request, "Audit.GetConsistencyProof").await?;
        let r = request.into_inner();
        let log_id = self.broker.log_or_own(&r.log_id)?.to_string();
        // Asked against the newest head, the answer carries it: the head
        // fetched by another call could be a newer one than the proof's.
        let (second, tree_head) = if r.second == 0 {
            let head = self.broker.tree_head(&log_id).await?;
            (head.tree_size, Some(sth(&head)))
        } else {
            (r.second, None)
        };
        if r.first > second {
            return Err(if r.second == 0 {
                BrokerError::OutOfRange(format!(
                    "first ({}) is past the newest signed tree head ({second}); ask again after the next one",
                    r.first
                ))
            } else {
                BrokerError::InvalidArgument(format!("first ({}) must not exceed second ({second})", r.first))
            }
            .into());
        }
        let path = self
            .broker
            .audit
            .consistency_proof(&log_id, r.first, second)
            .await
            .map_err(BrokerError::from)?;
        Ok(Response::new(pb::ConsistencyProof {
            log_id,
            first: r.first,
            second,
            path: path.iter().map(|h| h.to_vec()).collect(),
            tree_head,
        }))
    }

    async fn get_public_key(
        &self,
        request: Request<pb::GetPublicKeyRequest>,
    ) -> std::result::Result<Response<pb::LogPublicKey>, Status> {
        self.broker.authenticate(&request, "Audit.GetPublicKey").await?;
        let log_id = self.broker.log_or_own(&request.get_ref().log_id)?.to_string();
        if log_id == self.broker.audit.log_id() {
            let keys = self.broker.audit.keys();
            return Ok(Response::new(pb::LogPublicKey {
                log_id,
                public_key: keys.public_key().to_vec(),
                public_key_pem: keys.public_key_pem(),
            }));
        }
        let logs = self.broker.store.list_logs().await.map_err(BrokerError::from)?;
        let log = logs
            .into_iter()
            .find(|l| l.log_id == log_id)
            .ok_or_else(|| BrokerError::NotFound(format!("log {log_id} is not in this federation's database")))?;
        let public_key_pem = lienthong_audit::keys::public_key_pem_of(&log.public_key).map_err(|e| {
            BrokerError::DataLoss(format!(
                "log {log_id}'s public key in the database is unusable ({e}): the database was altered; \
                 take the key from the log's broker instead (`lienthong audit key` against it)"
            ))
        })?;
        Ok(Response::new(pb::LogPublicKey {
            log_id: log.log_id,
            public_key: log.public_key,
            public_key_pem,
        }))
    }

    async fn list_logs(
        &self,
        request: Request<pb::ListLogsRequest>,
    ) -> std::result::Result<Response<pb::ListLogsResponse>, Status> {
        self.broker.authenticate(&request, "Audit.ListLogs").await?;
        let logs = self.broker.store.list_logs().await.map_err(BrokerError::from)?;
        Ok(Response::new(pb::ListLogsResponse {
            logs: logs
                .into_iter()
                .map(|l| pb::LogPublicKey {
                    // Empty for a key that is not one: the list still names
                    // every log, and `audit verify` fails that one saying why.
                    public_key_pem: lienthong_audit::keys::public_key_pem_of(&l.public_key).unwrap_or_default(),
                    log_id: l.log_id,
                    public_key: l.public_key,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lienthong_store::{LogInfo, StoreOptions};

    const LOG: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    /// A store holding one log of `size` entries.
    async fn store_with(dir: &std::path::Path, size: u64) -> Arc<dyn lienthong_store::Store> {
        let store = lienthong_store::open(&StoreOptions {
            url: format!("sqlite://{}", dir.join("db.sqlite").display()),
            max_connections: 2,
            acquire_timeout: std::time::Duration::from_secs(5),
            allow_unverified_postgres: false,
        })
        .await
        .unwrap();
        let now = OffsetDateTime::now_utc();
        store
            .ensure_log(&LogInfo {
                log_id: LOG.into(),
                public_key: vec![7; 32],
                created_at: now,
            })
            .await
            .unwrap();
        let entries: Vec<StoredEntry> = (0..size)
            .map(|sequence| StoredEntry {
                log_id: LOG.into(),
                sequence,
                leaf_hash: [sequence as u8; 32],
                leaf: "{}".into(),
                time: now,
                kind: EntryKind::Access,
                actor: "tax-office".into(),
                provider: "civil-status".into(),
                record_type: "vn.civil.birth".into(),
                purpose: "tax".into(),
                outcome: Outcome::Allowed,
                subject_hash: String::new(),
            })
            .collect();
        store.append_entries(&entries).await.unwrap();
        store
    }

    /// Runs an export of the log, a page of `page` entries at a time, and
    /// collects what its client gets.
    async fn export(
        store: Arc<dyn lienthong_store::Store>,
        page: u32,
        deadline: Option<std::time::Instant>,
    ) -> Vec<std::result::Result<u64, Status>> {
        let q = EntryQuery {
            log_id: LOG.into(),
            limit: page,
            ..Default::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(export_pages(store, q, deadline, tx));
        let mut got = Vec::new();
        while let Some(item) = rx.recv().await {
            got.push(item.map(|e| e.sequence));
        }
        got
    }

    /// A filter on an outcome or kind this version does not know is refused
    /// naming the field and the value, not dropped (which would answer with
    /// every entry).
    #[test]
    fn unknown_outcome_and_kind_filters_are_invalid_arguments() {
        assert_eq!(outcome_from_pb(0).unwrap(), None);
        assert_eq!(outcome_from_pb(2).unwrap(), Some(Outcome::Denied));
        assert_eq!(kind_from_pb(0).unwrap(), None);
        assert_eq!(kind_from_pb(4).unwrap(), Some(EntryKind::AuditRead));
        for (status, needle) in [
            (Status::from(outcome_from_pb(7).unwrap_err()), "filter.outcome 7 "),
            (Status::from(outcome_from_pb(-1).unwrap_err()), "filter.outcome -1 "),
            (Status::from(kind_from_pb(5).unwrap_err()), "filter.kind 5 "),
        ] {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(needle), "{status:?}");
        }
    }

    /// Entry 16 of LOG as the writer stores it: columns from its leaf.
    fn intact() -> StoredEntry {
        let time = OffsetDateTime::from_unix_timestamp_nanos(1_750_000_000_123_456_789).unwrap();
        let mut ev = AuditEvent::new(EntryKind::Access, time);
        ev.actor = "tax-office".into();
        ev.provider = "civil-status".into();
        ev.record_type = "vn.civil.birth".into();
        ev.purpose = "tax".into();
        ev.subject_hash = "ab".repeat(32);
        ev.fields_released = vec!["/name".into()];
        ev.request_id = "req-16".into();
        let leaf = ev.to_leaf().unwrap();
        StoredEntry {
            log_id: LOG.into(),
            sequence: 16,
            leaf_hash: lienthong_audit::merkle::leaf_hash(leaf.as_bytes()),
            leaf,
            time: OffsetDateTime::from_unix_timestamp_nanos(1_750_000_000_123_456_000).unwrap(),
            kind: ev.kind,
            actor: ev.actor,
            provider: ev.provider,
            record_type: ev.record_type,
            purpose: ev.purpose,
            outcome: ev.outcome,
            subject_hash: ev.subject_hash,
        }
    }

    /// What a query shows is the leaf the tree hashes, and an entry whose
    /// columns (which the filters and citizens' histories read) are not its
    /// leaf's is DATA_LOSS naming it, never shown as the columns say.
    #[test]
    fn shown_entries_are_their_leaves_and_altered_ones_are_data_loss() {
        let shown = displayed_entry(&intact()).unwrap();
        assert_eq!(
            (
                shown.actor.as_str(),
                shown.request_id.as_str(),
                shown.fields_released.len()
            ),
            ("tax-office", "req-16", 1)
        );
        assert_eq!(shown.time.unwrap().nanos, 123_456_789, "the leaf's own time");

        let alterations: [fn(&mut StoredEntry); 3] = [
            |e| e.actor = "nobody".into(),
            |e| e.subject_hash = "00".repeat(32),
            |e| e.leaf = e.leaf.replace("tax-office", "tax-0ffice"),
        ];
        for alter in alterations {
            let mut altered = intact();
            alter(&mut altered);
            let status = Status::from(displayed_entry(&altered).unwrap_err());
            assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
            assert!(
                status.message().contains(&format!("log {LOG}: entry 16 ")),
                "{status:?}"
            );
            assert!(status.message().contains("audit verify"), "{status:?}");
        }
        let mut altered = intact();
        altered.actor = "nobody".into();
        let status = Status::from(displayed_entry(&altered).unwrap_err());
        assert!(
            status
                .message()
                .contains("actor is \"nobody\" but its leaf says \"tax-office\""),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn an_export_ends_at_its_deadline_naming_where_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), 25).await;

        let whole = export(store.clone(), 10, None).await;
        let sequences: Vec<u64> = whole.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(sequences, (0..25).collect::<Vec<_>>());

        // A deadline already past: no entry, and a status that is not the end.
        let cut = export(store, 10, Some(std::time::Instant::now())).await;
        let [Err(status)] = cut.as_slice() else {
            panic!("a past deadline gives its status alone: {cut:?}");
        };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("from_sequence = 0"), "{}", status.message());
    }
}
