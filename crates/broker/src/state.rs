//! Shared broker state: the authorization snapshot (swapped atomically), the
//! store, the audit log, the relay and the rate limiter.

use crate::config::Config;
use crate::error::{BrokerError, Result};
use crate::exchange::ExchangeService;
use crate::freshness::Freshness;
use crate::relay::Relay;
use arc_swap::ArcSwap;
use lienthong::v1::exchange_server::ExchangeServer;
use lienthong_audit::AuditLog;
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_core::ratelimit::{Leases, RateLimiter};
use lienthong_core::schema::{CompiledRecordType, SchemaLimits};
use lienthong_core::snapshot::Snapshot;
use lienthong_core::{Fingerprint, Member, Role};
use lienthong_store::Store;
use lienthong_tls::{Identity, PeerInfo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Locks serialising the leases of a grant's shared rate tokens, by grant
/// id: sixteen, so that grants rarely wait for each other.
#[derive(Default)]
pub struct LeaseLocks([tokio::sync::Mutex<()>; 16]);

impl LeaseLocks {
    /// Waits for the lock of `grant_id`'s shard.
    pub async fn lock(&self, grant_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        grant_id.hash(&mut hasher);
        // In range: the remainder of a division by the length.
        self.0[(hasher.finish() % self.0.len() as u64) as usize].lock().await
    }
}

/// Everything the services share.
pub struct Broker {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// The access log.
    pub audit: Arc<AuditLog>,
    /// Calls to providers.
    pub relay: Relay,
    /// Per-grant token buckets, when this broker alone serves its database (SQLite).
    pub rate_limiter: RateLimiter,
    /// Tokens leased from the grants' federation-wide buckets (PostgreSQL).
    pub rate_leases: Leases,
    /// Taken while a grant's tokens are leased, so one lookup at a time asks.
    pub rate_lease_locks: LeaseLocks,
    /// Per-member token buckets of citizens' history reads
    /// (`limits.subject_history_per_minute`), on this replica.
    pub history_limiter: RateLimiter,
    /// Per-address bound on authentication-failure entries.
    pub refusals: crate::refusals::RefusalGate,
    /// Limits applied to registered schemas.
    pub schema_limits: SchemaLimits,
    /// Prometheus metrics of the request path.
    pub metrics: crate::metrics::Metrics,
    /// When each member's certificate, as it last connected, expires.
    pub member_certificates: crate::expiry::MemberCertificates,
    /// Whether the snapshot is behind the database, and lookups refused for it.
    pub freshness: Freshness,
    snapshot: ArcSwap<Snapshot>,
    snapshot_loaded_at: Mutex<Instant>,
    // Compiled validators by (name, version, digest, deprecated, note): a
    // snapshot rebuild reuses them, so validation never recompiles a schema,
    // and a changed deprecation note still reaches every replica.
    compiled: Mutex<HashMap<CompiledKey, Arc<CompiledRecordType>>>,
    reload_lock: tokio::sync::Mutex<()>,
}

/// Identifies one compiled version: (name, version, digest, deprecated,
/// deprecation note).
type CompiledKey = (String, u32, String, bool, String);

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The member, as in the snapshot the request was authenticated against.
    pub member: Member,
    /// The snapshot used for the whole request.
    pub snapshot: Arc<Snapshot>,
}

impl Caller {
    /// The member id.
    pub fn id(&self) -> &str {
        self.member.id.as_str()
    }

    /// Refuses unless the caller holds one of `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<()> {
        if roles.iter().any(|r| self.member.has_role(*r)) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(BrokerError::PermissionDenied(format!(
            "member {} may not {what}: it needs the role {}",
            self.member.id,
            names.join(" or ")
        )))
    }
}

impl Broker {
    /// Assembles the state and loads the first snapshot.
    pub async fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        relay: Relay,
    ) -> Result<Arc<Broker>> {
        let schema_limits = SchemaLimits {
            max_schema_bytes: config.limits.max_schema_bytes,
            max_depth: config.limits.max_schema_depth,
        };
        let freshness = Freshness::new(Duration::from_millis(config.limits.max_snapshot_lag_ms));
        let broker = Arc::new(Broker {
            config,
            store,
            audit,
            relay,
            rate_limiter: RateLimiter::new(),
            history_limiter: RateLimiter::new(),
            rate_leases: Leases::new(),
            rate_lease_locks: LeaseLocks::default(),
            refusals: Default::default(),
            schema_limits,
            metrics: crate::metrics::Metrics::new(),
            member_certificates: Default::default(),
            freshness,
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            snapshot_loaded_at: Mutex::new(Instant::now()),
            compiled: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
        });
        broker.reload().await?;
        Ok(broker)
    }

    /// The current snapshot; requests use one snapshot from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Age of the current snapshot.
    pub fn snapshot_age(&self) -> Duration {
        self.snapshot_loaded_at.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Rebuilds the snapshot from the store and swaps it in. A failure
    /// leaves the previous snapshot in place and marks it behind the
    /// database, which refuses lookups once it lasts past
    /// `limits.max_snapshot_lag_ms` ([`Freshness`]).
    pub async fn reload(&self) -> Result<()> {
        self.reload_after(false).await
    }

    /// [`Broker::reload`]; with `committed`, after a change known to be
    /// committed, so that a failure refuses lookups at once.
    async fn reload_after(&self, committed: bool) -> Result<()> {
        let _guard = self.reload_lock.lock().await;
        // Marked under the lock, so that a reload that failed cannot mark
        // the snapshot behind after a later one loaded the change.
        let started = Instant::now();
        let loaded = self.load_snapshot().await;
        match &loaded {
            Ok(()) => self.freshness.loaded(started),
            Err(_) => self.freshness.behind(committed),
        }
        loaded
    }

    /// Reads everything the snapshot holds and swaps the new one in; the
    /// caller holds `reload_lock`.
    async fn load_snapshot(&self) -> Result<()> {
        let version = self.store.change_counter().await?;
        let members = self.store.list_members().await?;
        let revoked_certificates = self.store.list_revoked_certificates().await?;
        let revoked_fingerprints = revoked_certificates
            .iter()
            .map(|r| (r.fingerprint.0, r.member.to_string()))
            .collect();
        let grants = self.store.list_grants(&Default::default()).await?;
        let versions = self.store.list_record_type_versions().await?;
        let endpoints = self.store.list_endpoints().await?;
        // Out of the mutex while versions compile: the caller holds
        // `reload_lock`, so no other load touches the cache meanwhile.
        let mut cache = std::mem::take(
            &mut *self
                .compiled
                .lock()
                .map_err(|_| BrokerError::Internal("validator cache poisoned".into()))?,
        );
        // A new version's patterns may take long to compile: not on a
        // thread that serves lookups.
        let (compiled_types, live) = tokio::task::spawn_blocking(move || {
            let mut compiled_types = Vec::with_capacity(versions.len());
            let mut live = HashMap::with_capacity(versions.len());
            for v in versions {
                let key = (
                    v.definition.name.clone(),
                    v.version,
                    v.digest.clone(),
                    v.deprecated,
                    v.deprecation_note.clone(),
                );
                let compiled = match cache.remove(&key) {
                    Some(c) => c,
                    None => match CompiledRecordType::compile(v) {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            // Registration checked it; a stored schema that no longer
                            // compiles is skipped loudly rather than taking the broker down.
                            tracing::error!(error = %e, record_type = %key.0, version = key.1, "stored schema does not compile");
                            continue;
                        }
                    },
                };
                compiled_types.push(compiled.clone());
                live.insert(key, compiled);
            }
            (compiled_types, live)
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("compiling the stored schemas failed: {e}")))?;
        if let Ok(mut cache) = self.compiled.lock() {
            *cache = live;
        }
        let snapshot = Snapshot::build(
            version,
            OffsetDateTime::now_utc(),
            members,
            grants,
            compiled_types,
            endpoints.clone(),
        )
        .with_revoked_certificates(revoked_certificates);
        self.relay.sync(&endpoints, revoked_fingerprints);
        self.snapshot.store(Arc::new(snapshot));
        if let Ok(mut t) = self.snapshot_loaded_at.lock() {
            *t = Instant::now();
        }
        Ok(())
    }

    /// Audits a change to the registry that the store has committed, and makes
    /// it live here before returning, so it applies to this broker's next
    /// request. The change's own transaction moved the change counter, so
    /// every replica picks it up whatever happens here; this one is reloaded
    /// even when the audit entry cannot be written, because the change is in
    /// effect either way (a revocation must never wait for the next change).
    ///
    /// When this replica cannot load the change, the old snapshot would go on
    /// honouring what the change took away (a revoked grant): lookups are
    /// refused here at once, until a reload succeeds, and the admin is told.
    pub async fn applied(&self, caller: &Caller, action: &str, target: &str, detail: Option<String>) -> Result<()> {
        let audited = self.admin_event(caller, action, target, detail).await;
        let loaded = self.reload_after(true).await;
        if let Err(e) = &loaded {
            tracing::error!(error = %e, action = %action, target = %target, "snapshot reload failed after a change that took effect; lookups are refused here until a reload succeeds");
        }
        const NOT_LOADED: &str = "this broker replica cannot load it into its view of the federation and refuses \
                                  lookups until it can";
        match (audited, loaded) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(_)) => Err(BrokerError::AppliedNotLoaded(format!(
                "{action} {target} was applied and audited, but {NOT_LOADED}; do not repeat it: the operator has \
                 the details in the broker log"
            ))),
            (Err(e), loaded) => {
                tracing::error!(error = %e, action = %action, target = %target, "a change took effect but could not be audited");
                let also = if loaded.is_err() {
                    format!("; {NOT_LOADED}")
                } else {
                    String::new()
                };
                Err(BrokerError::AppliedNotAudited(format!(
                    "{action} {target} was applied and is in effect, but the audit log could not record it{also}; \
                     do not repeat it: the operator has the details in the broker log"
                )))
            }
        }
    }

    /// Writes, every `every`, one entry per address whose authentication
    /// failures were past [`crate::refusals::PER_MINUTE`] and so not logged
    /// one by one: how many, from where.
    pub fn spawn_refusal_summaries(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate and finds nothing.
            loop {
                ticker.tick().await;
                let Some(broker) = broker.upgrade() else { return };
                broker.summarize_refusals().await;
            }
        })
    }

    /// Logs the authentication failures counted and not yet logged, one
    /// entry per address; also run at shutdown, so none is lost.
    pub async fn summarize_refusals(&self) {
        for (addr, count) in self.refusals.take(Instant::now()) {
            let mut event = AuditEvent::new(EntryKind::Authentication, OffsetDateTime::now_utc());
            event.outcome = Outcome::Denied;
            event.action = "refusals.summary".into();
            event.target = addr.to_string();
            event.reason = format!(
                "unauthenticated: {count} more refusals from {addr}, past the {} a minute logged one by one",
                crate::refusals::PER_MINUTE
            );
            if let Err(e) = self.audit.append(event).await {
                tracing::error!(error = %e, "could not audit a summary of authentication failures");
            }
        }
    }

    /// Keeps the snapshot fresh: reloads on change notifications from other
    /// replicas, and polls the change counter as a safety net for a dropped
    /// notification connection.
    pub fn spawn_watcher(self: &Arc<Self>, poll: Duration) -> tokio::task::JoinHandle<()> {
        let broker = Arc::downgrade(self);
        let mut changes = self.store.subscribe_changes();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let notified = tokio::select! {
                    r = changes.recv() => !matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)),
                    _ = ticker.tick() => false,
                };
                let Some(broker) = broker.upgrade() else { return };
                let current = broker.snapshot.load().version;
                // A counter that cannot be read is a database that cannot
                // tell whether it holds a change: behind as well, or a replica
                // cut off from it would serve its old snapshot without bound
                // (and again, for a poll, once the database is back).
                let changed = notified
                    || match broker.store.change_counter().await {
                        Ok(v) => v != current,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the database's change counter; the snapshot may be behind");
                            true
                        }
                    };
                if changed {
                    // Behind from now: a reload that hangs counts against the bound.
                    broker.freshness.behind(false);
                }
                // Retried every poll while behind, even with the counter
                // unchanged since (a failed reload after this replica's own change).
                if broker.freshness.is_behind()
                    && let Err(e) = broker.reload().await
                {
                    tracing::warn!(
                        error = %e,
                        behind_ms = broker.freshness.behind_for().as_millis() as u64,
                        max_snapshot_lag_ms = broker.freshness.bound().as_millis() as u64,
                        "snapshot reload failed; keeping the previous snapshot, and refusing lookups once it is \
                         behind for longer than limits.max_snapshot_lag_ms"
                    );
                }
                // Enters the refused state on time even when no lookup comes.
                broker.freshness.refusing();
            }
        })
    }

    /// Keeps the health status of `lienthong.v1.Exchange` in step with what
    /// this replica can serve, so that load balancers send lookups to
    /// another replica: `NOT_SERVING` while its snapshot is too far behind
    /// the database (until a reload succeeds), and for good once its audit
    /// log finds its stored history altered (the log then refuses new
    /// entries, so every lookup would fail; the audit service stays up for
    /// the auditors who look into it). The check behind the log's opening
    /// finds that, or the writer later (rows deleted under it). Aborted at
    /// shutdown, which reports `NOT_SERVING` itself.
    pub fn spawn_exchange_health(
        self: &Arc<Self>,
        reporter: lienthong::health::HealthReporter,
    ) -> tokio::task::JoinHandle<()> {
        let audit = self.audit.clone();
        let mut refusing = self.freshness.subscribe();
        tokio::spawn(async move {
            let history = audit.history_failure();
            tokio::pin!(history);
            // `None` once the log shut down: staleness is still followed.
            let mut history_open = true;
            let mut serving = true;
            loop {
                let refused = *refusing.borrow_and_update();
                if refused == serving {
                    serving = !refused;
                    if serving {
                        reporter.set_serving::<ExchangeServer<ExchangeService>>();
                    } else {
                        reporter.set_not_serving::<ExchangeServer<ExchangeService>>();
                    }
                }
                tokio::select! {
                    failed = &mut history, if history_open => {
                        history_open = false;
                        if failed.is_some() {
                            reporter.set_not_serving::<ExchangeServer<ExchangeService>>();
                            return;
                        }
                    }
                    changed = refusing.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }

    /// Notes the expiry of the certificate a member connected with, for the
    /// expiry metric and warnings, when the broker accepts it. A revoked
    /// certificate (a stolen key still tried, an old client left running
    /// after a rotation) is refused already: its end is no reason to alarm,
    /// and noting it would hide the certificate the member now uses. An id
    /// no member holds is not noted either.
    pub fn note_member_certificate(&self, peer: &PeerInfo) {
        if let Some(not_after) = peer.not_after
            && let Ok(member) = check_peer(Some(peer), &self.snapshot(), &self.config.trust_domain)
        {
            self.member_certificates.note(member.id.as_str(), not_after);
        }
    }

    /// Identifies the caller of a request from its mutual-TLS peer certificate,
    /// against the current snapshot. A failure is audited and answered
    /// `UNAUTHENTICATED`.
    pub async fn authenticate<T>(&self, request: &tonic::Request<T>, rpc: &str) -> Result<Caller> {
        let snapshot = self.snapshot();
        let peer = lienthong_tls::peer_info(request);
        match check_peer(peer.as_deref(), &snapshot, &self.config.trust_domain) {
            Ok(member) => Ok(Caller { member, snapshot }),
            Err((claimed, message)) => {
                let mut event = AuditEvent::new(EntryKind::Authentication, OffsetDateTime::now_utc());
                event.actor = claimed;
                event.outcome = Outcome::Denied;
                event.action = rpc.to_string();
                event.reason = format!("unauthenticated: {message}{}", refused_certificate(peer.as_deref()));
                event.request_id = request_id_of(request);
                let addr = peer.as_ref().and_then(|p| p.remote_addr).map(|a| a.ip());
                // Past its budget, an address's refusals are summed up by
                // `spawn_refusal_summaries` instead of one entry each.
                if self.refusals.admit(addr, Instant::now())
                    && let Err(e) = self.audit.append(event).await
                {
                    tracing::error!(error = %e, "could not audit an authentication failure");
                }
                Err(BrokerError::Unauthenticated(message))
            }
        }
    }

    /// Appends an administrative event (members, endpoints, grants, schemas).
    /// The one place admin events are emitted.
    pub async fn admin_event(&self, caller: &Caller, action: &str, target: &str, detail: Option<String>) -> Result<()> {
        let mut event = AuditEvent::new(EntryKind::Admin, OffsetDateTime::now_utc());
        event.actor = caller.id().to_string();
        event.action = action.to_string();
        event.target = target.to_string();
        event.outcome = Outcome::Allowed;
        if let Some(detail) = detail {
            event.reason = detail;
        }
        self.audit.append(event).await?;
        Ok(())
    }

    /// Audits a refused administrative request.
    pub async fn admin_refused(&self, actor: &str, action: &str, target: &str, error: &BrokerError) {
        if let BrokerError::AppliedNotAudited(_) | BrokerError::AppliedNotLoaded(_) = error {
            // The change is in effect: an entry saying it failed would be
            // false, and `applied` has logged why it is missing or not
            // loaded (a change it could audit is on the record already).
            return;
        }
        let mut event = AuditEvent::new(EntryKind::Admin, OffsetDateTime::now_utc());
        event.actor = actor.to_string();
        event.action = action.to_string();
        event.target = target.to_string();
        event.outcome = match error {
            BrokerError::PermissionDenied(_) | BrokerError::Unauthenticated(_) => Outcome::Denied,
            BrokerError::InvalidArgument(_)
            | BrokerError::NotFound(_)
            | BrokerError::AlreadyExists(_)
            | BrokerError::FailedPrecondition(_)
            | BrokerError::OutOfRange(_) => Outcome::Invalid,
            _ => Outcome::Failed,
        };
        event.reason = error.to_string();
        if let Err(e) = self.audit.append(event).await {
            tracing::error!(error = %e, "could not audit a refused admin request");
        }
    }
}

/// The caller-supplied request id header (`x-request-id`), if any, bounded.
pub fn request_id_of<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| s.len() <= 128)
        .unwrap_or_default()
        .to_string()
}

/// What the audit entry of a refused caller adds to the reason: which
/// certificate was presented, whom it claimed to be when that was not
/// verified, and from where; empty when nothing is known.
///
/// An unverified claim stays out of `actor`: that column is who acted, and
/// an entry there would show in that member's history as the member's own
/// attempt, though anyone can write any name into a certificate of their
/// own CA. In the reason it still lets an investigator search for it.
fn refused_certificate(peer: Option<&PeerInfo>) -> String {
    let Some(peer) = peer else {
        return String::new();
    };
    let mut parts = Vec::new();
    if peer.identity_now().is_err()
        && let Some(claimed) = &peer.claimed
    {
        parts.push(format!("claimed (unverified) {claimed}"));
    }
    if let Some(fingerprints) = &peer.fingerprints {
        parts.push(format!(
            "certificate sha256 {}",
            lienthong_tls::fingerprint_hex(&fingerprints.presented())
        ));
    }
    if let Some(addr) = peer.remote_addr {
        parts.push(format!("from {}", addr.ip()));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" [{}]", parts.join(", "))
    }
}

/// Maps a peer to an enabled member of the snapshot, or to (claimed identity,
/// message) for the audit log and the caller. The claimed identity is only
/// ever one a certificate of the federation CA names (see
/// [`refused_certificate`] for why an unverified one is not).
fn check_peer(
    peer: Option<&PeerInfo>,
    snapshot: &Snapshot,
    trust_domain: &str,
) -> std::result::Result<Member, (String, String)> {
    let Some(peer) = peer else {
        return Err((
            String::new(),
            "connection is not mutual TLS; connect with a member certificate".into(),
        ));
    };
    // Under the CAs as they are now: one taken out of tls.ca since the
    // connection opened vouches for it no more.
    let identity = peer.identity_now().map_err(|e| (String::new(), e.to_string()))?;
    let id = match &identity {
        Identity::Member(id) => id,
        Identity::Broker => {
            return Err((
                Identity::Broker.spiffe_uri(trust_domain),
                "the broker's own certificate cannot call the broker; use a member certificate".into(),
            ));
        }
    };
    if let Some(revoked) = peer
        .fingerprints
        .as_ref()
        .and_then(|f| f.iter().find_map(|fp| snapshot.revoked_certificate(&Fingerprint(*fp))))
    {
        return Err((
            id.clone(),
            format!(
                "this certificate of member {id} (sha256 {}) was revoked at {}: {}; connect with the member's \
                 current certificate, or ask the federation admin for a new one",
                revoked.fingerprint,
                revoked.revoked_at.format(&Rfc3339).unwrap_or_default(),
                revoked.reason
            ),
        ));
    }
    if let Some(not_after) = peer.not_after
        && not_after <= OffsetDateTime::now_utc()
    {
        return Err((
            id.clone(),
            format!(
                "client certificate of member {id} expired during the connection; reconnect with a renewed certificate"
            ),
        ));
    }
    match snapshot.member(id) {
        None => Err((
            id.clone(),
            format!("member {id} is not registered in this federation; ask the federation admin to add it"),
        )),
        Some(m) if !m.enabled => Err((
            id.clone(),
            if m.disabled_reason.is_empty() {
                format!("member {id} is disabled")
            } else {
                format!("member {id} is disabled: {}", m.disabled_reason)
            },
        )),
        Some(m) => Ok(m.clone()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An expired certificate naming a member: the entry says whom it
    /// claimed to be, which certificate it was and from where, while the
    /// actor stays empty (the claim is unverified).
    #[test]
    fn a_refused_certificate_is_recorded_without_taking_its_claim_for_the_actor() {
        let der = b"certificate bytes";
        let mut peer = PeerInfo {
            remote_addr: Some("192.0.2.7:40000".parse().unwrap()),
            identity: Err(lienthong_tls::AuthError::Expired {
                not_after: "2025-01-01T00:00:00Z".into(),
            }),
            not_after: None,
            fingerprints: Some(lienthong_tls::CertificateFingerprints::of(der)),
            claimed: Some("spiffe://gov/member/hanoi-judicial-office".into()),
            revalidation: None,
        };
        let snapshot = Snapshot::empty();
        let (actor, _) = check_peer(Some(&peer), &snapshot, "gov").unwrap_err();
        assert_eq!(actor, "");
        let sha256 = lienthong_tls::fingerprint_hex(&lienthong_tls::sha256_fingerprint(der));
        assert_eq!(
            refused_certificate(Some(&peer)),
            format!(
                " [claimed (unverified) spiffe://gov/member/hanoi-judicial-office, certificate sha256 {sha256}, \
                 from 192.0.2.7]"
            )
        );
        // A verified identity is the actor; no claim is repeated.
        peer.identity = Ok(Identity::Member("hanoi-judicial-office".into()));
        let (actor, _) = check_peer(Some(&peer), &snapshot, "gov").unwrap_err();
        assert_eq!(actor, "hanoi-judicial-office");
        assert!(!refused_certificate(Some(&peer)).contains("claimed"));
        assert_eq!(refused_certificate(None), "");
    }
}
