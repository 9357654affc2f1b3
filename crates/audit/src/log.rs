//! The log writer: group commit of audit entries, the periodic tree-head
//! signer, and proofs served from stored leaf hashes.
//!
//! Appenders send their prepared entries to one writer task over a bounded
//! queue. The writer takes whatever is queued (up to `max_batch` entries),
//! numbers it densely and writes it with ONE `append_entries` call, so a burst
//! of N lookups costs one transaction and one fsync instead of N. Only after
//! the store acknowledged the commit does the in-memory tree advance and does
//! any appender get its receipt: callers release data only with a receipt, so
//! an entry that may not be durable never lets data out.

use crate::keys::LogKeys;
use crate::merkle::{self, Frontier, Hash, Subtree};
use crate::pin::{self, LogState, Pinned};
use crate::sth::{SignedTreeHead, verify_tree_head};
use lienthong_core::audit::AuditEvent;
use lienthong_store::{LogInfo, Store, StoreError, StoredEntry, StoredTreeHead, TreeNode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Leaf hashes read from the store per query when rebuilding or proving.
const HASH_CHUNK: u64 = 65_536;
/// Entries the history check reads at a time. It holds them, leaves of about
/// a kilobyte included, while it checks them: 1.5 MiB or so. Twice as many
/// checked 300,000 entries a few per cent faster for 2 MiB more peak RSS.
const ENTRY_CHUNK: u64 = 1_024;
/// A check of the whole stored history starts again no sooner than this many
/// times the last one took, so that however large the log, rechecking it
/// takes at most a fiftieth of a core (about 20 s a million entries).
pub const RECHECK_DUTY: u32 = 50;
/// Entries the history check hashes and parses between two yields to the
/// runtime, so that lookups on the same worker thread wait a millisecond or
/// two, not a whole chunk's work.
const ENTRIES_PER_YIELD: u64 = 256;

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log cannot be written: callers answer UNAVAILABLE and release nothing.
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// Key files are missing, unreadable, too open or malformed.
    #[error("audit keys: {0}")]
    Keys(String),
    /// The store failed outside the append path.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log, entry, tree size or tree head asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed (sizes out of order, event not serialisable).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tree size past the log's end: it may exist once the log has grown.
    #[error("{0}")]
    OutOfRange(String),
    /// Stored data contradicts the signed history: entries were altered or lost.
    #[error("audit log is corrupt: {0}")]
    Corrupt(String),
    /// The database's history does not contain the newest head this broker
    /// signed (pinned beside its key): it was rolled back or rewritten.
    #[error("the audit log's database was rolled back or rewritten: {0}")]
    RolledBack(String),
    /// The database holds entries past the head this broker closed its log
    /// with (pinned beside its key): they were appended while it was stopped.
    #[error("the audit log's database holds entries appended behind the broker's back: {0}")]
    AppendedWhileClosed(String),
    /// The file pinning the newest signed head is unreadable, malformed or
    /// not signed by the log's key, or cannot be written.
    #[error("pinned audit head: {0}")]
    Pin(String),
    /// The log is shutting down and accepts no more entries.
    #[error("audit log is shutting down")]
    ShuttingDown,
}

/// Tuning of the writer and signer.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// How often a new tree head is signed when the tree grew.
    pub sign_interval: Duration,
    /// Most entries written in one transaction.
    pub max_batch: usize,
    /// Appends waiting for the writer before appenders are held back.
    pub queue: usize,
    /// Longest an appender waits for its entry to be durable. Past it the
    /// append fails (`Unavailable`), so nothing is released, and the caller's
    /// task ends instead of piling up behind a database that hangs; the
    /// entry may still be committed later (the log then records an access
    /// that released nothing, never the reverse).
    pub commit_timeout: Duration,
    /// Least time between the end of one check of the whole stored history
    /// and the start of the next: the database can be altered while the
    /// broker runs, not only while it is stopped. A check is also never
    /// started sooner than [`RECHECK_DUTY`] times the last one took.
    pub recheck_interval: Duration,
    /// Longest a shutdown waits for the check of the entries found past the
    /// newest signed head at the opening (what a crash leaves), so that its
    /// final head covers them. Past it the log is left open (no final head,
    /// `audit-head.json` says "open"), with a warning: the next start checks
    /// them again, as after a crash.
    pub shutdown_check_wait: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sign_interval: Duration::from_secs(1),
            max_batch: 512,
            queue: 16_384,
            commit_timeout: Duration::from_secs(10),
            recheck_interval: Duration::from_secs(3600),
            // Such entries are a sign interval's worth of traffic, checked
            // in well under a second; this leaves the rest of the
            // orchestrator's grace to the drain before it.
            shutdown_check_wait: Duration::from_secs(5),
        }
    }
}

/// Proof that an entry was durably logged: the consumer keeps it to later
/// obtain an inclusion proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Log the entry is in.
    pub log_id: String,
    /// Its position.
    pub sequence: u64,
    /// Its RFC 9162 leaf hash.
    pub leaf_hash: Hash,
}

/// Writer counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Entries in the last attempted batch.
    pub last_batch_size: u64,
    /// Batches committed.
    pub total_batches: u64,
    /// Entries committed.
    pub total_entries: u64,
    /// Batches the store refused or failed.
    pub failed_batches: u64,
    /// Duration of the last `append_entries` call.
    pub last_commit: Duration,
}

/// How far the check of a log's stored history against its signed root
/// has come.
///
/// A log opens from its stored tree nodes, having checked them against the
/// latest signed root, and checks every stored entry behind the opening (its
/// leaf against its leaf hash, its columns against its leaf, and the leaf
/// hashes against the tree nodes and the signed root): too long to keep a
/// broker from serving. Entries appended meanwhile are as durable as ever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryCheck {
    /// Still reading the stored entries.
    Running,
    /// Every stored entry and tree node hashes to the signed root, and every
    /// entry's columns are those of its leaf.
    Passed,
    /// The stored history was altered or lost: the log refuses new entries,
    /// so no data is released on top of it.
    Failed(String),
}

#[derive(Default)]
struct Counters {
    last_batch_size: AtomicU64,
    total_batches: AtomicU64,
    total_entries: AtomicU64,
    failed_batches: AtomicU64,
    last_commit_micros: AtomicU64,
}

/// State shared by the handle, the writer task and the signer task.
struct Shared {
    /// The committed tree; `size` mirrors its size for lock-free reads.
    frontier: Mutex<Frontier>,
    size: AtomicU64,
    counters: Counters,
    /// The check of the stored history against the signed root.
    history: watch::Sender<HistoryCheck>,
    /// Entries found at the opening past the newest signed head (committed
    /// before a broker stopped without closing the log), which no head may
    /// cover before the history check has read them; `None` when there were
    /// none, or once they are checked. A watch, so that a shutdown can wait
    /// for their check.
    unchecked_tail: watch::Sender<Option<(u64, u64)>>,
    /// The newest head signed, which the history is checked against.
    last_signed: Mutex<Option<SignedTreeHead>>,
}

impl Shared {
    fn frontier(&self) -> MutexGuard<'_, Frontier> {
        // The frontier is only mutated by whole pushes; a panic elsewhere while
        // holding the lock cannot leave it half-updated.
        self.frontier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why no tree head may be signed now; `None` when one may.
    fn signing_refused(&self) -> Option<SigningRefused> {
        if let HistoryCheck::Failed(why) = &*self.history.borrow() {
            return Some(SigningRefused::Altered(why.clone()));
        }
        self.unchecked_tail
            .borrow()
            .map(|(from, to)| SigningRefused::Unchecked { from, to })
    }
}

/// Why the log signs no tree head.
enum SigningRefused {
    /// Its stored history was found altered: a head signed now would vouch
    /// for it, and for entries appended on top of it.
    Altered(String),
    /// Entries committed before the broker last stopped without closing the
    /// log, past its newest head, are not checked yet.
    Unchecked { from: u64, to: u64 },
}

impl SigningRefused {
    fn into_error(self) -> AuditError {
        match self {
            SigningRefused::Altered(why) => {
                AuditError::Corrupt(format!("no tree head is signed over a log found altered: {why}"))
            }
            SigningRefused::Unchecked { from, to } => AuditError::Unavailable(format!(
                "entries {from}..{to}, committed after the newest signed head before the broker last stopped \
                 without closing the log, are still being checked; no head is signed until they are"
            )),
        }
    }
}

/// One appender's entries, numbered by the writer.
struct Request {
    entries: Vec<StoredEntry>,
    reply: oneshot::Sender<Result<Vec<Receipt>, AuditError>>,
}

/// The audit log of this broker: one Merkle tree, one key.
pub struct AuditLog {
    store: Arc<dyn Store>,
    keys: LogKeys,
    log_id: String,
    /// Where the newest signed head is pinned; `None` for in-memory keys.
    pin_path: Option<PathBuf>,
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    closing: AtomicBool,
    commit_timeout: Duration,
    shutdown_check_wait: Duration,
    sign_lock: tokio::sync::Mutex<()>,
    stop_signer: watch::Sender<bool>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    signer_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("log_id", &self.log_id)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl AuditLog {
    /// Opens this broker's log: registers it, rebuilds the tree from stored leaf
    /// hashes (checking them against the latest signed head), checks that the
    /// database's history contains the head pinned beside the keys (see
    /// [`LogKeys::pinned_head_path`]), and starts the writer and signer tasks.
    /// Must run inside a Tokio runtime.
    pub async fn open(store: Arc<dyn Store>, keys: LogKeys, config: AuditConfig) -> Result<Arc<AuditLog>, AuditError> {
        if config.max_batch == 0 || config.queue == 0 {
            return Err(AuditError::InvalidArgument(
                "audit max_batch and queue must be at least 1".into(),
            ));
        }
        if config.sign_interval.is_zero() || config.recheck_interval.is_zero() {
            return Err(AuditError::InvalidArgument(
                "audit sign_interval and recheck_interval must be positive".into(),
            ));
        }
        let log_id = keys.log_id();
        let public_key = keys.public_key();
        let info = store
            .ensure_log(&LogInfo {
                log_id: log_id.clone(),
                public_key: public_key.to_vec(),
                created_at: OffsetDateTime::now_utc(),
            })
            .await?;
        if info.public_key != public_key {
            return Err(AuditError::Corrupt(format!(
                "log {log_id} is registered with a different public key"
            )));
        }

        let size = store.log_size(&log_id).await?;
        let latest = store.latest_tree_head(&log_id).await?.map(SignedTreeHead::from);
        if let Some(head) = &latest {
            verify_tree_head(head, &public_key).map_err(|e| {
                AuditError::Corrupt(format!(
                    "latest stored tree head (size {}) does not verify: {e}",
                    head.tree_size
                ))
            })?;
            if head.tree_size > size {
                return Err(AuditError::Corrupt(format!(
                    "log {log_id} holds {size} entries but its signed tree head covers {}: entries were deleted",
                    head.tree_size
                )));
            }
        }
        // With its tree nodes stored, the log opens from the right edge's
        // nodes (checked against the signed root) and the whole history is
        // checked behind the opening. A log written before tree nodes were
        // stored (or whose nodes were lost) is checked first, as it is read,
        // and gets its nodes from those leaf hashes.
        let nodes = store.tree_node_count(&log_id).await?;
        let complete = nodes == merkle::stored_node_count(size);
        // The log's size says these rows exist: one missing was deleted.
        let deleted = |e: AuditError| match e {
            AuditError::NotFound(what) => AuditError::Corrupt(format!(
                "{what}, though the log's size says they exist: entries were deleted"
            )),
            AuditError::Store(StoreError::NotFound { what }) => AuditError::Corrupt(format!(
                "{what} not found, though the log's size says they exist: entries were deleted"
            )),
            other => other,
        };
        let frontier = if complete {
            from_stored_nodes(store.as_ref(), &log_id, size, latest.as_ref())
                .await
                .map_err(deleted)?
        } else {
            tracing::info!(log_id = %log_id, size, stored = nodes, "storing the audit log's Merkle tree nodes");
            rebuild(store.as_ref(), &log_id, size, latest.as_ref(), true)
                .await
                .map_err(deleted)?
        };
        let pin_path = keys.pinned_head_path();
        if let Some(path) = &pin_path {
            check_pinned(store.as_ref(), &public_key, path, latest.as_ref(), &frontier).await?;
        }
        // Entries past the newest head are what a crash leaves (committed,
        // not yet signed), or what someone appended to the database: the
        // first head over them waits for the check of their leaves and
        // columns, so that one found altered is never signed.
        let signed = latest.as_ref().map_or(0, |h| h.tree_size);
        let unchecked_tail = (size > signed).then_some((signed, size));
        if let Some((from, to)) = unchecked_tail {
            tracing::warn!(
                log_id = %log_id,
                from,
                to,
                "the audit log holds entries past its newest signed head (the broker stopped without closing it); \
                 they are checked before a head covers them"
            );
        }
        tracing::info!(log_id = %log_id, size, "audit log opened");
        // Even a log whose leaf hashes were just rehashed is checked: the
        // rebuild read no leaf and no column, and deleting one tree node
        // must not be a way around the check.
        let (history, _) = watch::channel(HistoryCheck::Running);

        let shared = Arc::new(Shared {
            frontier: Mutex::new(frontier),
            size: AtomicU64::new(size),
            counters: Counters::default(),
            history,
            unchecked_tail: watch::Sender::new(unchecked_tail),
            last_signed: Mutex::new(latest),
        });
        let (sender, receiver) = mpsc::channel(config.queue);
        let (stop_signer, stop_rx) = watch::channel(false);
        let log = Arc::new(AuditLog {
            store: Arc::clone(&store),
            keys,
            log_id: log_id.clone(),
            pin_path,
            shared: Arc::clone(&shared),
            sender: Mutex::new(Some(sender)),
            closing: AtomicBool::new(false),
            commit_timeout: config.commit_timeout,
            shutdown_check_wait: config.shutdown_check_wait,
            sign_lock: tokio::sync::Mutex::new(()),
            stop_signer,
            writer_task: Mutex::new(None),
            signer_task: Mutex::new(None),
        });
        let writer = Writer {
            store,
            log_id,
            shared,
            max_batch: config.max_batch,
            commit_timeout: config.commit_timeout,
            needs_resync: false,
            in_doubt: Vec::new(),
        };
        *lock(&log.writer_task) = Some(tokio::spawn(writer.run(receiver)));
        tokio::spawn(check_history(
            Arc::clone(&log.store),
            log.log_id.clone(),
            size,
            Arc::clone(&log.shared),
            config.recheck_interval,
            stop_rx.clone(),
        ));
        *lock(&log.signer_task) = Some(tokio::spawn(run_signer(
            Arc::downgrade(&log),
            config.sign_interval,
            stop_rx,
        )));
        Ok(log)
    }

    /// This log's id (hex SHA-256 of its public key).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The log's keys.
    pub fn keys(&self) -> &LogKeys {
        &self.keys
    }

    /// Pseudonym of a subject key under this log's HMAC secret.
    pub fn subject_hash(&self, subject_key: &str) -> String {
        self.keys.subject_hash(subject_key)
    }

    /// Committed entries.
    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// Where the check of the stored history stands.
    pub fn history_check(&self) -> HistoryCheck {
        self.shared.history.borrow().clone()
    }

    /// Waits for the check of the stored history to end (or the log to shut
    /// down) and returns where it stands.
    pub async fn history_checked(&self) -> HistoryCheck {
        let mut rx = self.shared.history.subscribe();
        let mut stop = self.stop_signer.subscribe();
        tokio::select! {
            _ = rx.wait_for(|h| *h != HistoryCheck::Running) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
        self.history_check()
    }

    /// Waits until the log finds its stored history altered, by the check
    /// behind the opening or later by the writer; `None` when the log shuts
    /// down first.
    pub async fn history_failure(&self) -> Option<String> {
        let mut rx = self.shared.history.subscribe();
        let mut stop = self.stop_signer.subscribe();
        tokio::select! {
            failed = rx.wait_for(|h| matches!(h, HistoryCheck::Failed(_))) => match failed.as_deref() {
                Ok(HistoryCheck::Failed(why)) => Some(why.clone()),
                _ => None,
            },
            _ = stop.wait_for(|stopped| *stopped) => None,
        }
    }

    /// Appends one entry; returns once it is durably committed.
    pub async fn append(&self, event: AuditEvent) -> Result<Receipt, AuditError> {
        let mut receipts = self.submit(vec![event]).await?;
        receipts
            .pop()
            .ok_or_else(|| AuditError::Unavailable("audit writer returned no receipt".into()))
    }

    /// Appends entries in one commit (all or none); receipts in input order.
    pub async fn append_many(&self, events: Vec<AuditEvent>) -> Result<Vec<Receipt>, AuditError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(events).await
    }

    async fn submit(&self, events: Vec<AuditEvent>) -> Result<Vec<Receipt>, AuditError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(AuditError::ShuttingDown);
        }
        if let HistoryCheck::Failed(why) = &*self.shared.history.borrow() {
            return Err(AuditError::Corrupt(why.clone()));
        }
        // Serialising and hashing here rather than in the writer spreads that
        // work over all cores; the leaf does not depend on the sequence number.
        let entries = events
            .into_iter()
            .map(|e| self.prepare(e))
            .collect::<Result<Vec<_>, _>>()?;
        let sender = lock(&self.sender).clone().ok_or(AuditError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.commit_timeout;
        let too_slow = || {
            AuditError::Unavailable(format!(
                "the audit log did not confirm the entry within {:?}: its database is slow or unreachable",
                self.commit_timeout
            ))
        };
        match tokio::time::timeout_at(deadline, sender.send(Request { entries, reply })).await {
            Err(_) => return Err(too_slow()),
            Ok(Err(_)) => {
                // The writer stops early only if it died; outside shutdown that is an outage.
                return Err(if self.closing.load(Ordering::Acquire) {
                    AuditError::ShuttingDown
                } else {
                    AuditError::Unavailable("audit writer is not running".into())
                });
            }
            Ok(Ok(())) => {}
        }
        drop(sender);
        tokio::time::timeout_at(deadline, answer)
            .await
            .map_err(|_| too_slow())?
            .map_err(|_| AuditError::Unavailable("audit writer stopped before answering".into()))?
    }

    fn prepare(&self, event: AuditEvent) -> Result<StoredEntry, AuditError> {
        let event = event.storable();
        let leaf = event
            .to_leaf()
            .map_err(|e| AuditError::InvalidArgument(format!("audit event cannot be serialised: {e}")))?;
        Ok(StoredEntry {
            log_id: self.log_id.clone(),
            sequence: 0,
            leaf_hash: merkle::leaf_hash(leaf.as_bytes()),
            leaf,
            time: event.time,
            kind: event.kind,
            actor: event.actor,
            provider: event.provider,
            record_type: event.record_type,
            purpose: event.purpose,
            outcome: event.outcome,
            subject_hash: event.subject_hash,
        })
    }

    /// Signs the current tree if it grew since the last head (or there is no
    /// head yet), stores the head and returns it; otherwise returns the last one.
    ///
    /// Refuses (`Corrupt`) once the stored history was found altered, and
    /// (`Unavailable`) while entries found past the newest head at the
    /// opening are not checked yet.
    pub async fn sign_now(&self) -> Result<SignedTreeHead, AuditError> {
        let _one_signer = self.sign_lock.lock().await;
        if let Some(refused) = self.shared.signing_refused() {
            return Err(refused.into_error());
        }
        let (size, root) = {
            let frontier = self.shared.frontier();
            (frontier.size(), frontier.root())
        };
        let last = lock(&self.shared.last_signed).clone();
        let mut timestamp_ms = now_ms();
        if let Some(last) = last {
            if last.tree_size == size {
                return Ok(last);
            }
            if last.tree_size > size {
                return Err(AuditError::Corrupt(format!(
                    "latest signed head covers {} entries but the tree has {size}",
                    last.tree_size
                )));
            }
            // Heads must not go back in time even if the wall clock does.
            timestamp_ms = timestamp_ms.max(last.timestamp_ms);
        }
        let sth = self.keys.sign_tree_head(size, &root, timestamp_ms);
        self.store.insert_tree_head(&StoredTreeHead::from(&sth)).await?;
        // Pinned after the database has the head, never before: a crash in
        // between leaves the pin one head behind the database, which the next
        // open accepts (the database's history contains it) and moves forward.
        // The other order would leave a pin ahead of the database, which is
        // what a rollback looks like, and an ordinary crash would keep the
        // broker from starting. A pin that cannot be written fails the
        // signing, so the signer tries again (same tree, same root) until it
        // is written.
        if let Some(path) = &self.pin_path {
            pin::write_async(path, &sth, LogState::Open).await?;
        }
        tracing::debug!(log_id = %self.log_id, tree_size = size, "signed tree head");
        *lock(&self.shared.last_signed) = Some(sth.clone());
        Ok(sth)
    }

    /// The newest head this log signed, without touching the store.
    pub fn latest_signed(&self) -> Option<SignedTreeHead> {
        lock(&self.shared.last_signed).clone()
    }

    fn needs_signing(&self) -> bool {
        let size = self.size();
        lock(&self.shared.last_signed)
            .as_ref()
            .is_none_or(|last| last.tree_size != size)
    }

    /// The newest signed head of any log in the database (other replicas' too).
    pub async fn latest_tree_head(&self, log_id: &str) -> Result<SignedTreeHead, AuditError> {
        let head = self
            .store
            .latest_tree_head(log_id)
            .await
            .map_err(lookup_error)?
            .map(SignedTreeHead::from);
        match head {
            Some(head) => Ok(head),
            // Which of the two it is tells an auditor whether to wait or to
            // check the log id: only this path pays for the second read.
            None => Err(match self.store.log_size(log_id).await {
                Err(StoreError::NotFound { .. }) => AuditError::NotFound(format!(
                    "log {log_id} is not in this federation's database (`lienthong audit verify` and \
                     Audit.ListLogs name the logs it holds)"
                )),
                _ => AuditError::NotFound(format!(
                    "log {log_id} has no signed tree head yet: one is signed within audit.sign_interval_ms \
                     of its first entry; ask again then"
                )),
            }),
        }
    }

    /// Leaf hash of entry `sequence` and its audit path in the tree of the
    /// first `tree_size` entries of `log_id`; `OutOfRange` past the newest
    /// signed head of that log.
    ///
    /// Reads O(log n) stored tree nodes and the leaf hashes of one or two
    /// blocks of 256 entries, whatever the size of the log.
    pub async fn inclusion_proof(
        &self,
        log_id: &str,
        sequence: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError> {
        if sequence >= tree_size {
            return Err(AuditError::InvalidArgument(format!(
                "sequence {sequence} is not inside a tree of size {tree_size}"
            )));
        }
        self.require_signed(log_id, tree_size).await?;
        let ranges = merkle::inclusion_ranges(sequence, tree_size);
        let mut hashes = SubtreeHashes::new(self.store.as_ref(), log_id, tree_size);
        let leaf = hashes.leaf(sequence).await?;
        let proof = hashes.prove(ranges).await?;
        Ok((leaf, proof))
    }

    /// Consistency proof between the trees of the first `first` and `second`
    /// entries of `log_id`; `OutOfRange` past the newest signed head of that
    /// log.
    pub async fn consistency_proof(&self, log_id: &str, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        if first > second {
            return Err(AuditError::InvalidArgument(format!(
                "first tree size {first} is larger than second tree size {second}"
            )));
        }
        self.require_signed(log_id, second).await?;
        let ranges = merkle::consistency_ranges(first, second);
        SubtreeHashes::new(self.store.as_ref(), log_id, second)
            .prove(ranges)
            .await
    }

    /// Refuses a tree size no signed head of `log_id` reaches: no one can
    /// hold a signed root to check a proof for it against, and entries past
    /// the newest head are not vouched for yet.
    async fn require_signed(&self, log_id: &str, tree_size: u64) -> Result<(), AuditError> {
        if log_id == self.log_id && self.latest_signed().is_some_and(|h| tree_size <= h.tree_size) {
            return Ok(());
        }
        // The database's newest head otherwise, this log's too: a head is
        // served (GetSignedTreeHead reads the database) from when it is
        // stored, a moment before it is pinned and known here as signed, and
        // a proof up to a head a client was just given must not be refused.
        let signed = match self.store.latest_tree_head(log_id).await.map_err(lookup_error)? {
            Some(head) => Some(head.tree_size),
            None => {
                // An unknown log is not found, not merely unsigned.
                self.store.log_size(log_id).await.map_err(lookup_error)?;
                None
            }
        };
        match signed {
            Some(signed) if tree_size <= signed => Ok(()),
            Some(signed) => Err(AuditError::OutOfRange(format!(
                "the newest signed tree head of log {log_id} covers {signed} entries, fewer than the tree size \
                 {tree_size} asked for; ask again after a head covering it is signed"
            ))),
            None => Err(AuditError::OutOfRange(format!(
                "log {log_id} has no signed tree head yet; ask again after its first one is signed"
            ))),
        }
    }

    /// Stops accepting entries (they fail with `ShuttingDown`), commits
    /// everything already queued, stops the signer and signs a final head over
    /// every entry, and pins it with the log closed. `None` if the log was
    /// already shut down, or if the entries found past the newest head at the
    /// opening were still being checked after
    /// [`AuditConfig::shutdown_check_wait`]: the log is then left open, and
    /// the next start checks them again.
    pub async fn shutdown(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        if self.closing.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        // Dropping our sender lets the writer finish once queued requests (and
        // appenders already holding a sender clone) are committed.
        drop(lock(&self.sender).take());
        let writer = lock(&self.writer_task).take();
        if let Some(writer) = writer {
            writer
                .await
                .map_err(|e| AuditError::Unavailable(format!("audit writer task failed: {e}")))?;
        }
        // Stopping the signer stops the history check too: the entries found
        // past the newest head at the opening get a while to be checked first.
        self.tail_checked().await;
        let _ = self.stop_signer.send(true);
        let signer = lock(&self.signer_task).take();
        if let Some(signer) = signer {
            let _ = signer.await;
        }
        if let Some(SigningRefused::Unchecked { from, to }) = self.shared.signing_refused() {
            // Not a failed stop: these entries are what a crash leaves, and
            // a log left open is what the next start expects after one.
            tracing::warn!(
                log_id = %self.log_id,
                from,
                to,
                waited_ms = u64::try_from(self.shutdown_check_wait.as_millis()).unwrap_or(u64::MAX),
                "the audit log's entries past its newest signed head at the opening were still being checked; \
                 it is left open without a final head, and the next start checks them again"
            );
            return Ok(None);
        }
        let sth = self.sign_now().await?;
        // Only now may the next start take entries past this head for
        // appended behind the broker's back: none of its own can follow.
        if let Some(path) = &self.pin_path {
            pin::write_async(path, &sth, LogState::Closed).await?;
        }
        tracing::info!(log_id = %self.log_id, tree_size = sth.tree_size, "audit log closed with a final signed head");
        Ok(Some(sth))
    }

    /// Waits, at most [`AuditConfig::shutdown_check_wait`], for the check
    /// of the entries found past the newest head at the opening to end,
    /// passed or failed.
    async fn tail_checked(&self) {
        if self.shared.unchecked_tail.borrow().is_none() {
            return;
        }
        let mut tail = self.shared.unchecked_tail.subscribe();
        let mut history = self.shared.history.subscribe();
        let ended = async {
            tokio::select! {
                _ = tail.wait_for(Option::is_none) => {}
                _ = history.wait_for(|h| matches!(h, HistoryCheck::Failed(_))) => {}
            }
        };
        // Past the wait the caller finds the tail still unchecked and says so.
        let _ = tokio::time::timeout(self.shutdown_check_wait, ended).await;
    }

    /// Counters of the writer.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            last_batch_size: c.last_batch_size.load(Ordering::Relaxed),
            total_batches: c.total_batches.load(Ordering::Relaxed),
            total_entries: c.total_entries.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            last_commit: Duration::from_micros(c.last_commit_micros.load(Ordering::Relaxed)),
        }
    }

    /// Entries in the last attempted batch.
    pub fn last_batch_size(&self) -> u64 {
        self.shared.counters.last_batch_size.load(Ordering::Relaxed)
    }

    /// Batches committed so far.
    pub fn total_batches(&self) -> u64 {
        self.shared.counters.total_batches.load(Ordering::Relaxed)
    }

    /// Duration of the last commit.
    pub fn last_commit_duration(&self) -> Duration {
        Duration::from_micros(self.shared.counters.last_commit_micros.load(Ordering::Relaxed))
    }

    /// Append requests waiting for the writer.
    pub fn queued(&self) -> usize {
        lock(&self.sender)
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }
}

/// The hashes a proof is made of, from one log's stored tree nodes and,
/// below [`merkle::STORED_LEVEL`], from blocks of stored leaf hashes.
struct SubtreeHashes<'a> {
    store: &'a dyn Store,
    log_id: &'a str,
    tree_size: u64,
    /// Leaf hashes of the blocks of 256 entries read so far, by block.
    blocks: HashMap<u64, Vec<Hash>>,
}

impl<'a> SubtreeHashes<'a> {
    fn new(store: &'a dyn Store, log_id: &'a str, tree_size: u64) -> Self {
        SubtreeHashes {
            store,
            log_id,
            tree_size,
            blocks: HashMap::new(),
        }
    }

    /// Leaf hashes `[from, to)`, all of them or an error.
    async fn leaves(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        let leaves = self
            .store
            .leaf_hashes(self.log_id, from, to)
            .await
            .map_err(lookup_error)?;
        check_chunk(self.log_id, from, to, leaves.len())?;
        Ok(leaves)
    }

    /// The leaf hashes of the block holding leaf `at` (up to the tree's size).
    async fn block(&mut self, at: u64) -> Result<&[Hash], AuditError> {
        let block = at >> merkle::STORED_LEVEL;
        if !self.blocks.contains_key(&block) {
            let from = block << merkle::STORED_LEVEL;
            let to = self.tree_size.min((block + 1) << merkle::STORED_LEVEL);
            let leaves = self.leaves(from, to).await?;
            self.blocks.insert(block, leaves);
        }
        Ok(self.blocks.get(&block).map(Vec::as_slice).unwrap_or_default())
    }

    async fn leaf(&mut self, sequence: u64) -> Result<Hash, AuditError> {
        let offset = (sequence & ((1 << merkle::STORED_LEVEL) - 1)) as usize;
        let log_id = self.log_id;
        self.block(sequence)
            .await?
            .get(offset)
            .copied()
            .ok_or_else(|| AuditError::Corrupt(format!("log {log_id}: entry {sequence} has no stored leaf hash")))
    }

    /// The hash of each subtree: stored nodes at [`merkle::STORED_LEVEL`] and
    /// up, the rest from leaf hashes.
    async fn hashes(&mut self, subtrees: &[Subtree]) -> Result<Vec<Hash>, AuditError> {
        let wanted: Vec<(u32, u64)> = subtrees
            .iter()
            .filter(|s| s.level >= merkle::STORED_LEVEL)
            .map(|s| (s.level, s.index))
            .collect();
        let mut known: HashMap<Subtree, Hash> = self
            .store
            .tree_nodes(self.log_id, &wanted)
            .await
            .map_err(lookup_error)?
            .into_iter()
            .map(|n| {
                (
                    Subtree {
                        level: n.level,
                        index: n.index,
                    },
                    n.hash,
                )
            })
            .collect();
        let mut hashes = Vec::with_capacity(subtrees.len());
        for &s in subtrees {
            let hash = match known.get(&s) {
                Some(hash) => *hash,
                None => {
                    let hash = self.compute(s).await?;
                    known.insert(s, hash);
                    hash
                }
            };
            hashes.push(hash);
        }
        Ok(hashes)
    }

    /// The tree hash of each range, from its perfect subtrees.
    async fn prove(&mut self, ranges: Vec<std::ops::Range<u64>>) -> Result<Vec<Hash>, AuditError> {
        let split: Vec<Vec<Subtree>> = ranges.into_iter().map(merkle::perfect_subtrees).collect();
        let all: Vec<Subtree> = split.iter().flatten().copied().collect();
        let mut hashes = self.hashes(&all).await?.into_iter();
        let mut proof = Vec::with_capacity(split.len());
        for subtrees in split {
            let parts: Vec<Hash> = hashes.by_ref().take(subtrees.len()).collect();
            let hash = merkle::fold(&parts)
                .ok_or_else(|| AuditError::Corrupt(format!("log {}: an empty range in a proof", self.log_id)))?;
            proof.push(hash);
        }
        Ok(proof)
    }

    /// A subtree's hash from leaf hashes: below the stored level from its
    /// block, above it (a node the store lacks) from all of its leaves.
    async fn compute(&mut self, s: Subtree) -> Result<Hash, AuditError> {
        if s.level < merkle::STORED_LEVEL {
            let base = (s.start() >> merkle::STORED_LEVEL) << merkle::STORED_LEVEL;
            let (from, to) = ((s.start() - base) as usize, (s.end() - base) as usize);
            let log_id = self.log_id;
            let leaves = self.block(s.start()).await?;
            return leaves.get(from..to).map(merkle::root).ok_or_else(|| {
                AuditError::Corrupt(format!("log {log_id}: leaves {from}..{to} of a block are missing"))
            });
        }
        tracing::warn!(
            log_id = %self.log_id,
            level = s.level,
            index = s.index,
            "a Merkle tree node is not stored; hashing its leaves"
        );
        let mut frontier = Frontier::new();
        let mut from = s.start();
        while from < s.end() {
            let to = s.end().min(from + HASH_CHUNK);
            frontier.extend(&self.leaves(from, to).await?);
            from = to;
        }
        Ok(frontier.root())
    }
}

/// Store errors of read-only lookups: an unknown log or range is the caller's
/// `NotFound`, not an outage.
fn lookup_error(e: StoreError) -> AuditError {
    match e {
        StoreError::NotFound { what } => AuditError::NotFound(format!("{what} not found")),
        other => AuditError::Store(other),
    }
}

fn check_chunk(log_id: &str, from: u64, to: u64, got: usize) -> Result<(), AuditError> {
    if u64::try_from(got).ok() != Some(to - from) {
        return Err(AuditError::Corrupt(format!(
            "log {log_id}: asked for leaf hashes {from}..{to}, the store returned {got}"
        )));
    }
    Ok(())
}

/// Rebuilds the frontier from the stored leaf hashes, checking that the first
/// `head.tree_size` of them still hash to the head's signed root, and with
/// `backfill` stores every tree node along the way.
async fn rebuild(
    store: &dyn Store,
    log_id: &str,
    size: u64,
    head: Option<&SignedTreeHead>,
    backfill: bool,
) -> Result<Frontier, AuditError> {
    let mut frontier = Frontier::new();
    let altered = |h: &SignedTreeHead| {
        AuditError::Corrupt(format!(
            "log {log_id}: stored entries 0..{} no longer hash to their signed root; the log was altered",
            h.tree_size
        ))
    };
    if let Some(h) = head.filter(|h| h.tree_size == 0 && h.root_hash != merkle::empty_root()) {
        return Err(altered(h));
    }
    let mut from = 0;
    while from < size {
        let to = size.min(from + HASH_CHUNK);
        let chunk = store.leaf_hashes(log_id, from, to).await?;
        check_chunk(log_id, from, to, chunk.len())?;
        let mut completed = Vec::new();
        for leaf in chunk {
            if backfill {
                frontier.push_collecting(leaf, &mut completed);
            } else {
                frontier.push(leaf);
            }
            if let Some(h) = head.filter(|h| h.tree_size == frontier.size() && frontier.root() != h.root_hash) {
                return Err(altered(h));
            }
        }
        let nodes = to_store(completed);
        store.put_tree_nodes(log_id, &nodes).await?;
        from = to;
    }
    Ok(frontier)
}

/// Completed subtrees as the store keeps them.
fn to_store(completed: Vec<(Subtree, Hash)>) -> Vec<TreeNode> {
    completed
        .into_iter()
        .map(|(s, hash)| TreeNode {
            level: s.level,
            index: s.index,
            hash,
        })
        .collect()
}

/// The frontier of the log's `size` entries from its stored tree nodes (and
/// the leaf hashes of its last, partial block), checked against the latest
/// signed root: O(log n) reads.
async fn from_stored_nodes(
    store: &dyn Store,
    log_id: &str,
    size: u64,
    head: Option<&SignedTreeHead>,
) -> Result<Frontier, AuditError> {
    let mut hashes = SubtreeHashes::new(store, log_id, size);
    let parts = hashes.hashes(&merkle::perfect_subtrees(0..size)).await?;
    let frontier = Frontier::from_parts(size, parts)
        .ok_or_else(|| AuditError::Corrupt(format!("log {log_id}: the right edge of its tree is incomplete")))?;
    if let Some(h) = head {
        let signed = match h.tree_size {
            0 => merkle::empty_root(),
            n if n == size => frontier.root(),
            n => {
                let parts = hashes.hashes(&merkle::perfect_subtrees(0..n)).await?;
                merkle::fold(&parts).unwrap_or_else(merkle::empty_root)
            }
        };
        if signed != h.root_hash {
            return Err(AuditError::Corrupt(format!(
                "log {log_id}: the stored tree no longer hashes to the root signed for entries 0..{}; the log was altered",
                h.tree_size
            )));
        }
    }
    Ok(frontier)
}

/// Root of the log's first `n` entries from its stored tree nodes (and leaf
/// hashes below them): O(log n) reads.
async fn stored_root(store: &dyn Store, log_id: &str, n: u64) -> Result<Hash, AuditError> {
    let parts = SubtreeHashes::new(store, log_id, n)
        .hashes(&merkle::perfect_subtrees(0..n))
        .await?;
    Ok(merkle::fold(&parts).unwrap_or_else(merkle::empty_root))
}

/// Checks the database against the head pinned in `path`, then pins the
/// database's newest head, the log open.
///
/// `latest` is the database's newest head of this log, its signature checked,
/// and `frontier` the stored tree, checked against it. The database must hold
/// a head at least as large as the pinned one, and its entries up to the
/// pinned size must hash to the pinned root; the stored tree then extends the
/// pinned head, and the pin may move forward to `latest`. When the broker
/// closed the log with the pinned head and the database holds no newer one,
/// it must hold no entry past it either. Without a pin (a first start, or an
/// upgrade from a version that kept none) the database's newest head is
/// trusted and pinned: there is nothing to check it against.
async fn check_pinned(
    store: &dyn Store,
    public_key: &[u8; 32],
    path: &Path,
    latest: Option<&SignedTreeHead>,
    frontier: &Frontier,
) -> Result<(), AuditError> {
    let (pinned, closed) = match pin::read(path, public_key)? {
        Pinned::Head { head, closed } => (head, closed),
        found => {
            if let Pinned::OtherLog(old) = &found {
                // Logged in full: replacing the file loses the old log's last word.
                tracing::warn!(
                    file = %path.display(),
                    pinned_log_id = %old.log_id,
                    tree_size = old.tree_size,
                    root_hash = %hex::encode(old.root_hash),
                    timestamp_ms = old.timestamp_ms,
                    "the pinned audit head is another log's: the signing key was replaced; pinning the new log's"
                );
            }
            if let Some(head) = latest {
                if matches!(found, Pinned::Missing) {
                    // The database already holds heads of this log, so the
                    // pin was lost or not restored: nothing checks that this
                    // database is not older than heads auditors have seen.
                    tracing::warn!(
                        file = %path.display(),
                        tree_size = head.tree_size,
                        "no pinned audit head beside the signing key although the database holds signed heads of \
                         this log: pinning the database's newest, unchecked (if this data directory or the \
                         database was restored from a backup taken while the broker ran, end this log instead: \
                         see \"Back up\" in deploy/README.md)"
                    );
                }
                tracing::info!(file = %path.display(), tree_size = head.tree_size, "pinning the database's newest audit head");
                pin::write_async(path, head, LogState::Open).await?;
            }
            return Ok(());
        }
    };
    if latest.map_or(0, |h| h.tree_size) < pinned.tree_size {
        return Err(pin::rolled_back(path, &pinned, latest));
    }
    let root = if pinned.tree_size == frontier.size() {
        frontier.root()
    } else {
        stored_root(store, &pinned.log_id, pinned.tree_size).await?
    };
    if root != pinned.root_hash {
        return Err(pin::rewritten(path, &pinned, latest, &root));
    }
    // A newer head in the database is this key's too: the broker ran again
    // after the pin was written (a data directory restored from a backup
    // taken while it was stopped), and the pin's "closed" is stale.
    let newest = latest.unwrap_or(&pinned);
    if closed && newest.tree_size == pinned.tree_size && frontier.size() > pinned.tree_size {
        return Err(pin::appended_while_closed(path, &pinned, frontier.size()));
    }
    // Open from now on: entries this run commits after its last head are
    // what a crash leaves, not an intrusion.
    pin::write_async(path, newest, LogState::Open).await
}

/// Whether the log is shutting down or gone.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Why a read of the history check returned no value.
enum Halt {
    /// The log is shutting down.
    ShuttingDown,
    /// The store answered, and not with the history that was signed (rows
    /// missing, a value that cannot be decoded, ...).
    Refused(StoreError),
}

/// A store read of the history check, retried every few seconds while the
/// database is unavailable.
///
/// Only an outage is worth waiting for here: any other error is handed to
/// the caller, whose [`Pass`] decides whether it ends the check failed or
/// only leaves it to be made again later; retrying it here would leave the
/// check running for ever while the log takes entries on top of that history.
async fn read_retrying<T, F, Fut>(stop: &mut watch::Receiver<bool>, log_id: &str, mut read: F) -> Result<T, Halt>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    loop {
        if stopping(stop) {
            return Err(Halt::ShuttingDown);
        }
        match read().await {
            Ok(value) => return Ok(value),
            // A read cut short by the shutdown is no news.
            Err(_) if stopping(stop) => return Err(Halt::ShuttingDown),
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(log_id = %log_id, error = %e, "checking the audit log's history: the database is unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => return Err(Halt::Refused(e)),
        }
    }
}

/// Why a check of stored entries ended without passing.
enum Unchecked {
    /// The log is shutting down.
    ShuttingDown,
    /// The stored history is not what was logged: why.
    Altered(String),
    /// A check repeated while the log is open could not read the history:
    /// the store answered with an error that says nothing about it.
    Inconclusive(String),
}

/// Which check of the stored history is running.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The check behind the opening (and of the entries found past the
    /// newest head): any answer of the store but an outage ends it failed,
    /// as it did before the log served.
    First,
    /// A check repeated while the log is open, the first having passed. A
    /// store error there is no finding: on PostgreSQL every SQLSTATE outside
    /// the connection and resource classes comes back `Corrupt` (a lock or
    /// statement timeout, a snapshot too old, a privilege revoked by mistake),
    /// and failing the log on it would refuse every lookup until a restart.
    /// Only what the check itself finds fails the log: rows missing, a leaf
    /// that is not its hash's, columns that are not its leaf's, a node or a
    /// signed root the leaf hashes do not make.
    Again,
}

impl Pass {
    /// What the store refusing a read of the check (`what`) says.
    fn refused(self, e: StoreError, what: String) -> Unchecked {
        match (self, e) {
            // Rows the log's size says exist are missing, whichever the pass.
            (_, e @ StoreError::NotFound { .. }) => Unchecked::Altered(format!("{what}: {e}")),
            (Pass::First, e) => Unchecked::Altered(format!("{what}: {e}")),
            (Pass::Again, e) => Unchecked::Inconclusive(format!("{what}: {e}")),
        }
    }
}

/// Reads entries `[from, to)` of the log a chunk at a time, checking that
/// each is in its place and is its own leaf's (its leaf hashing to its leaf
/// hash, its columns those of its leaf), and with `tree` that their leaf
/// hashes make its stored tree nodes and signed root.
async fn read_checked(
    store: &dyn Store,
    log_id: &str,
    from: u64,
    to: u64,
    stop: &mut watch::Receiver<bool>,
    mut tree: Option<&mut TreeCheck<'_>>,
    pass: Pass,
) -> Result<(), Unchecked> {
    let mut from = from;
    while from < to {
        let end = to.min(from + ENTRY_CHUNK);
        let entries = match read_retrying(stop, log_id, || store.entries_in_range(log_id, from, end)).await {
            Ok(entries) => entries,
            Err(Halt::ShuttingDown) => return Err(Unchecked::ShuttingDown),
            Err(Halt::Refused(e)) => {
                return Err(pass.refused(e, format!("log {log_id}: reading entries {from}..{end} to check them")));
            }
        };
        check_chunk(log_id, from, end, entries.len()).map_err(|e| Unchecked::Altered(e.to_string()))?;
        let mut completed = Vec::new();
        for (at, entry) in (from..).zip(&entries) {
            if entry.sequence != at {
                return Err(Unchecked::Altered(format!(
                    "log {log_id}: entry {at} was read back as entry {}",
                    entry.sequence
                )));
            }
            if let Some(why) = entry_mismatch(entry) {
                return Err(Unchecked::Altered(format!("log {log_id}: entry {at} {why}")));
            }
            if let Some(tree) = tree.as_deref_mut() {
                tree.push(entry.leaf_hash, &mut completed)?;
            }
            if (at + 1) % ENTRIES_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
        }
        // The leaves are checked; only the tree nodes are left to read.
        drop(entries);
        if tree.is_some() {
            check_nodes(store, log_id, stop, (from, end), completed, pass).await?;
        }
        from = end;
    }
    Ok(())
}

/// The tree the checked entries' leaf hashes make, against a signed root.
struct TreeCheck<'a> {
    log_id: &'a str,
    head: Option<&'a SignedTreeHead>,
    frontier: Frontier,
}

impl TreeCheck<'_> {
    /// Adds a leaf hash, collecting the nodes it completes; fails where the
    /// tree reaches the signed size with another root.
    fn push(&mut self, leaf_hash: Hash, completed: &mut Vec<(Subtree, Hash)>) -> Result<(), Unchecked> {
        self.frontier.push_collecting(leaf_hash, completed);
        match self.head {
            Some(h) if h.tree_size == self.frontier.size() && self.frontier.root() != h.root_hash => {
                Err(Unchecked::Altered(format!(
                    "log {}: stored entries 0..{} no longer hash to their signed root",
                    self.log_id, h.tree_size
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Compares the nodes the entries `[from, to)` completed with the stored ones.
async fn check_nodes(
    store: &dyn Store,
    log_id: &str,
    stop: &mut watch::Receiver<bool>,
    (from, to): (u64, u64),
    completed: Vec<(Subtree, Hash)>,
    pass: Pass,
) -> Result<(), Unchecked> {
    let wanted: Vec<(u32, u64)> = completed.iter().map(|(s, _)| (s.level, s.index)).collect();
    let stored = match read_retrying(stop, log_id, || store.tree_nodes(log_id, &wanted)).await {
        Ok(stored) => stored,
        Err(Halt::ShuttingDown) => return Err(Unchecked::ShuttingDown),
        Err(Halt::Refused(e)) => {
            return Err(pass.refused(
                e,
                format!("log {log_id}: reading the tree nodes over entries {from}..{to}"),
            ));
        }
    };
    let stored: HashMap<(u32, u64), Hash> = stored.into_iter().map(|n| ((n.level, n.index), n.hash)).collect();
    for (s, hash) in completed {
        if stored.get(&(s.level, s.index)) != Some(&hash) {
            return Err(Unchecked::Altered(format!(
                "log {log_id}: the stored tree node over entries {}..{} does not hash from them",
                s.start(),
                s.end()
            )));
        }
    }
    Ok(())
}

/// Checks the log's first `size` stored entries: every entry's leaf must
/// hash to its stored leaf hash and carry its indexed columns, every node
/// must hash from its entries, and the entries to `head`'s signed root;
/// then the index citizens' histories are read through must hold each.
async fn check_stored(
    store: &dyn Store,
    log_id: &str,
    size: u64,
    head: Option<&SignedTreeHead>,
    stop: &mut watch::Receiver<bool>,
    pass: Pass,
) -> Result<(), Unchecked> {
    let mut tree = TreeCheck {
        log_id,
        head,
        frontier: Frontier::new(),
    };
    read_checked(store, log_id, 0, size, stop, Some(&mut tree), pass).await?;
    match read_retrying(stop, log_id, || store.check_subject_index(log_id)).await {
        Ok(()) => Ok(()),
        Err(Halt::ShuttingDown) => Err(Unchecked::ShuttingDown),
        // `Corrupt` is the store's finding: the index does not hold the
        // entries (PostgreSQL's check reads nothing and never answers so).
        Err(Halt::Refused(e @ StoreError::Corrupt(_))) => Err(Unchecked::Altered(format!("log {log_id}: {e}"))),
        Err(Halt::Refused(e)) => Err(pass.refused(e, format!("log {log_id}: checking the citizens' history index"))),
    }
}

/// Checks the stored history behind an opening from the stored tree nodes:
/// first the entries found past the newest signed head, which the signer
/// waits for, then the whole log up to the opening's `size` against the
/// newest head ([`check_stored`]); then, while the log is open, the whole
/// log again every `recheck_interval` (or [`RECHECK_DUTY`] times as long as
/// the last check took), for an alteration made while the broker runs. On a
/// difference, or entries missing (or, before the first check passed,
/// unreadable), the log refuses new entries and signs no head; a repeated
/// check the store answers with an error is logged and made again later
/// (see [`Pass::Again`]).
async fn check_history(
    store: Arc<dyn Store>,
    log_id: String,
    size: u64,
    shared: Arc<Shared>,
    recheck_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let began = Instant::now();
    let altered = |why: String| {
        tracing::error!(log_id = %log_id, why = %why, "the audit log's stored history was altered; it refuses new entries and signs no tree head");
        shared.history.send_replace(HistoryCheck::Failed(why));
    };
    let tail = *shared.unchecked_tail.borrow();
    if let Some((from, to)) = tail {
        match read_checked(store.as_ref(), &log_id, from, to, &mut stop, None, Pass::First).await {
            Ok(()) => {
                tracing::info!(log_id = %log_id, from, to, "the audit log's entries past its newest signed head are checked; signing them");
                shared.unchecked_tail.send_replace(None);
            }
            Err(Unchecked::ShuttingDown) => return,
            // The first pass finds no store error inconclusive.
            Err(Unchecked::Altered(why) | Unchecked::Inconclusive(why)) => return altered(why),
        }
    }
    // Nothing is signed before the tail is checked: the newest head is still
    // the one the log opened with, which `size` extends.
    let head = lock(&shared.last_signed).clone();
    match check_stored(store.as_ref(), &log_id, size, head.as_ref(), &mut stop, Pass::First).await {
        Ok(()) => {}
        Err(Unchecked::ShuttingDown) => return,
        // The first pass finds no store error inconclusive.
        Err(Unchecked::Altered(why) | Unchecked::Inconclusive(why)) => return altered(why),
    }
    let mut took = began.elapsed();
    tracing::info!(
        log_id = %log_id,
        entries = size,
        seconds = took.as_secs_f64(),
        "audit log history checked against its signed root"
    );
    shared.history.send_replace(HistoryCheck::Passed);
    loop {
        let pause = recheck_interval.max(took.saturating_mul(RECHECK_DUTY));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        // The writer may have found the log altered meanwhile.
        if stopping(&stop) || matches!(*shared.history.borrow(), HistoryCheck::Failed(_)) {
            return;
        }
        // The head first: every head signed covers at most the entries
        // committed by then.
        let head = lock(&shared.last_signed).clone();
        let size = shared.size.load(Ordering::Acquire);
        let began = Instant::now();
        match check_stored(store.as_ref(), &log_id, size, head.as_ref(), &mut stop, Pass::Again).await {
            Ok(()) => {}
            Err(Unchecked::ShuttingDown) => return,
            Err(Unchecked::Altered(why)) => return altered(why),
            Err(Unchecked::Inconclusive(why)) => {
                // Checked again at the next turn; `took` stays the last
                // complete check's.
                tracing::error!(
                    log_id = %log_id,
                    why = %why,
                    "the audit log's history could not be checked again: the database answered with an error, \
                     which is no finding about the stored history; the log goes on and is checked again later"
                );
                continue;
            }
        }
        took = began.elapsed();
        tracing::info!(
            log_id = %log_id,
            entries = size,
            seconds = took.as_secs_f64(),
            "audit log history checked again against its signed root"
        );
    }
}

/// Longest stored value a finding quotes: a column holds what whoever
/// altered it wrote, and a log line need not carry all of it.
const QUOTED_CHARS: usize = 80;

/// `value` in quotes, escaped, cut at [`QUOTED_CHARS`] characters.
fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// Why a stored entry is not what the writer stored: its leaf does not hash
/// to its stored leaf hash, is not an audit event, or its indexed columns
/// (which the Audit service filters on, the citizens' history included) are
/// not its leaf's; `None` when it is consistent. Worded to follow "entry N".
///
/// The leaf hash is checked against the signed root elsewhere; this binds the
/// leaf and the columns to it. The leaf never holds a subject key in clear,
/// so quoting stored values cannot print one.
pub fn entry_mismatch(entry: &StoredEntry) -> Option<String> {
    if merkle::leaf_hash(entry.leaf.as_bytes()) != entry.leaf_hash {
        return Some("was altered: its stored leaf does not hash to its stored leaf hash".into());
    }
    let event: AuditEvent = match serde_json::from_str(&entry.leaf) {
        Ok(event) => event,
        Err(e) => {
            // The error's own text may quote the leaf; its position is enough.
            return Some(format!(
                "was altered: its stored leaf is not an audit event ({:?} error at column {})",
                e.classify(),
                e.column()
            ));
        }
    };
    let mut differ = Vec::new();
    let mut compare = |column: &str, stored: &str, leaf: &str| {
        if stored != leaf {
            differ.push(format!(
                "{column} is {} but its leaf says {}",
                quoted(stored),
                quoted(leaf)
            ));
        }
    };
    compare("kind", entry.kind.as_str(), event.kind.as_str());
    compare("actor", &entry.actor, &event.actor);
    compare("provider", &entry.provider, &event.provider);
    compare("record_type", &entry.record_type, &event.record_type);
    compare("purpose", &entry.purpose, &event.purpose);
    compare("outcome", entry.outcome.as_str(), event.outcome.as_str());
    // The store keeps the subject HMAC as bytes and gives it back in lower case.
    if !entry.subject_hash.eq_ignore_ascii_case(&event.subject_hash) {
        compare("subject_hash", &entry.subject_hash, &event.subject_hash);
    }
    // The column keeps microseconds, rounded down.
    let micros = |t: OffsetDateTime| t.unix_timestamp_nanos().div_euclid(1_000);
    if micros(entry.time) != micros(event.time) {
        differ.push(format!(
            "time_us is {} but its leaf says {}",
            micros(entry.time),
            micros(event.time)
        ));
    }
    (!differ.is_empty()).then(|| format!("has columns that are not its leaf's: {}", differ.join("; ")))
}

/// The group-commit writer task.
struct Writer {
    store: Arc<dyn Store>,
    log_id: String,
    shared: Arc<Shared>,
    max_batch: usize,
    /// Longest a commit (or a resynchronisation) may take before the writer
    /// gives it up, so that a database behind a network black hole fails
    /// batches rather than holding the writer until TCP gives up.
    commit_timeout: Duration,
    /// A commit failed: the store may hold more (or, if corrupt, fewer) entries
    /// than the frontier; re-read its size before the next commit.
    needs_resync: bool,
    /// The failed batches that may yet be found stored at the frontier, oldest
    /// first (at most [`MAX_IN_DOUBT`]): the only entries a resynchronisation
    /// may adopt. All start at the frontier, which moves only when one of
    /// them, or a new batch, is known stored; that clears them.
    in_doubt: Vec<InDoubt>,
}

/// Failed batches kept for a resynchronisation to recognise. A batch whose
/// call answered is settled by the next read-back; only batches given up
/// after `commit_timeout` (one per timeout at most) pile up here, while
/// the database hangs. One older than these that lands after all is
/// taken for foreign entries: the log fails closed.
const MAX_IN_DOUBT: usize = 16;

/// A batch whose commit failed, which may have landed all the same.
struct InDoubt {
    /// Its entries' leaf hashes, in order: 32 bytes an entry is all it takes
    /// to recognise them, with each stored leaf checked against its hash.
    leaf_hashes: Vec<Hash>,
    /// The store answered (with an error); `false` when the writer gave the
    /// call up after `commit_timeout`, and the transaction may still commit.
    answered: bool,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<Request>) {
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match receiver.recv().await {
                    Some(request) => request,
                    None => break,
                },
            };
            let mut count = first.entries.len();
            let mut batch = vec![first];
            while count < self.max_batch {
                match receiver.try_recv() {
                    Ok(request) if count + request.entries.len() > self.max_batch => {
                        carried = Some(request);
                        break;
                    }
                    Ok(request) => {
                        count += request.entries.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch, count).await;
        }
        tracing::debug!(log_id = %self.log_id, "audit writer stopped");
    }

    async fn commit(&mut self, batch: Vec<Request>, count: usize) {
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters;
        counters.last_batch_size.store(count as u64, Ordering::Relaxed);
        if self.needs_resync {
            let resynced = match tokio::time::timeout(self.commit_timeout, self.resync()).await {
                Ok(resynced) => resynced,
                Err(_) => Err(AuditError::Unavailable(format!(
                    "the database did not answer within {:?}",
                    self.commit_timeout
                ))),
            };
            match resynced {
                Ok(()) => self.needs_resync = false,
                Err(AuditError::Corrupt(why)) => {
                    // Not an outage to wait out: the log refuses entries from
                    // now on, as when the check behind the opening finds it.
                    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(log_id = %self.log_id, why = %why, "the audit log's stored history was altered; it refuses new entries");
                    self.shared.history.send_replace(HistoryCheck::Failed(why.clone()));
                    fail_all(batch, &why);
                    return;
                }
                Err(e) => {
                    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(log_id = %self.log_id, error = %e, "audit log cannot resynchronise with the store");
                    let message = match e {
                        AuditError::Unavailable(message) => message,
                        other => other.to_string(),
                    };
                    fail_all(batch, &message);
                    return;
                }
            }
        }

        // Only this task advances the tree, so the size cannot move under us.
        let start = self.shared.size.load(Ordering::Acquire);
        let mut entries = Vec::with_capacity(count);
        let mut waiters = Vec::with_capacity(batch.len());
        let mut next = start;
        for request in batch {
            let first = next;
            for mut entry in request.entries {
                entry.sequence = next;
                next += 1;
                entries.push(entry);
            }
            waiters.push((request.reply, first, next));
        }

        // The tree as it will be once the batch is in, and the nodes the batch
        // completes, stored in the same transaction as the entries.
        let mut grown = self.shared.frontier().clone();
        let mut completed = Vec::new();
        for entry in &entries {
            grown.push_collecting(entry.leaf_hash, &mut completed);
        }
        let nodes = to_store(completed);

        let began = Instant::now();
        // A commit given up may still land: the resynchronisation before the
        // next batch finds it, as after any failed commit.
        let append = self.store.append_entries_and_nodes(&entries, &nodes);
        let (result, answered) = match tokio::time::timeout(self.commit_timeout, append).await {
            Ok(result) => (result, true),
            Err(_) => (
                Err(StoreError::Unavailable(format!(
                    "the database did not confirm the commit within {:?}",
                    self.commit_timeout
                ))),
                false,
            ),
        };
        counters.last_commit_micros.store(
            u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );

        if let Err(e) = result {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            // The transaction may still have committed (connection lost after
            // COMMIT): never guess, re-read the store before the next batch,
            // and keep what it tried to write to tell it from foreign rows.
            self.needs_resync = true;
            if self.in_doubt.len() >= MAX_IN_DOUBT {
                self.in_doubt.remove(0);
            }
            self.in_doubt.push(InDoubt {
                leaf_hashes: entries.iter().map(|e| e.leaf_hash).collect(),
                answered,
            });
            tracing::error!(log_id = %self.log_id, entries = count, error = %e, "audit commit failed; nothing released");
            for (reply, _, _) in waiters {
                let _ = reply.send(Err(AuditError::Unavailable(format!(
                    "audit entry could not be committed: {e}"
                ))));
            }
            return;
        }

        {
            let mut frontier = self.shared.frontier();
            *frontier = grown;
            self.shared.size.store(frontier.size(), Ordering::Release);
        }
        // Stored where every failed batch would have gone: none of them can land now.
        self.in_doubt.clear();
        counters.total_batches.fetch_add(1, Ordering::Relaxed);
        counters.total_entries.fetch_add(count as u64, Ordering::Relaxed);

        for (reply, first, end) in waiters {
            let receipts = entries[(first - start) as usize..(end - start) as usize]
                .iter()
                .map(|e| Receipt {
                    log_id: self.log_id.clone(),
                    sequence: e.sequence,
                    leaf_hash: e.leaf_hash,
                })
                .collect();
            // An appender that gave up waiting is fine: its entry is logged anyway.
            let _ = reply.send(Ok(receipts));
        }
    }

    /// Brings the frontier in line with what the store really holds. Only
    /// an outage is `Unavailable`: any other answer of the store is about the
    /// stored log, and `Corrupt`.
    ///
    /// Entries found past the frontier are adopted only when they are one of
    /// the failed batches this writer holds, landed after all: each stored
    /// leaf hashing to its leaf hash and carrying its columns, the leaf
    /// hashes those of the batch, and the tree nodes the batch completes
    /// those stored. They are checked before the frontier moves, so no head
    /// is ever signed over them unchecked. Anything else (more entries, other
    /// leaves, one altered) was written by someone else: another process
    /// holding the database, or whoever raised `audit_logs.size` and inserted
    /// rows, which is what made the commit fail. Adopting it would have the
    /// broker sign for accesses it never logged: the log fails instead.
    async fn resync(&mut self) -> Result<(), AuditError> {
        let log_id = self.log_id.clone();
        let read_error = |e: StoreError| match e {
            StoreError::Unavailable(m) => AuditError::Unavailable(m),
            other => AuditError::Corrupt(format!("log {log_id}: reading it back after a failed commit: {other}")),
        };
        let stored = self.store.log_size(&log_id).await.map_err(read_error)?;
        let have = self.shared.size.load(Ordering::Acquire);
        if stored < have {
            return Err(AuditError::Corrupt(format!(
                "log {log_id} holds {stored} entries but {have} were committed; entries were deleted"
            )));
        }
        if stored == have {
            // None landed. A batch whose call answered never will; one given
            // up may still be on its way.
            self.in_doubt.retain(|b| !b.answered);
            return Ok(());
        }
        let landed = stored - have;
        let foreign = |why: &str| {
            AuditError::Corrupt(format!(
                "log {log_id}: entries {have}..{stored}, found stored after a failed commit, {why}: \
                 they were not written by this broker, which signs no head over them"
            ))
        };
        if !self.in_doubt.iter().any(|b| b.leaf_hashes.len() as u64 == landed) {
            return Err(foreign(
                "are not as many as any batch this broker failed to commit there",
            ));
        }
        let entries = self
            .store
            .entries_in_range(&log_id, have, stored)
            .await
            .map_err(read_error)?;
        check_chunk(&log_id, have, stored, entries.len())?;
        let mut hashes = Vec::with_capacity(entries.len());
        for (at, entry) in (have..).zip(&entries) {
            if entry.sequence != at {
                return Err(AuditError::Corrupt(format!(
                    "log {log_id}: entry {at} was read back as entry {}",
                    entry.sequence
                )));
            }
            if let Some(why) = entry_mismatch(entry) {
                return Err(AuditError::Corrupt(format!("log {log_id}: entry {at} {why}")));
            }
            hashes.push(entry.leaf_hash);
        }
        // Each stored leaf hashes to its stored hash and that hash is the
        // batch's: the leaf is, byte for byte, the one the writer hashed, and
        // its columns (just checked against it) are the batch's.
        if !self.in_doubt.iter().any(|b| b.leaf_hashes == hashes) {
            return Err(foreign(
                "are not the entries of any batch this broker failed to commit there",
            ));
        }
        let mut grown = self.shared.frontier().clone();
        let mut completed = Vec::new();
        for hash in &hashes {
            grown.push_collecting(*hash, &mut completed);
        }
        // The failed commit stored its nodes in the same transaction.
        let wanted: Vec<(u32, u64)> = completed.iter().map(|(s, _)| (s.level, s.index)).collect();
        let nodes: HashMap<(u32, u64), Hash> = self
            .store
            .tree_nodes(&log_id, &wanted)
            .await
            .map_err(read_error)?
            .into_iter()
            .map(|n| ((n.level, n.index), n.hash))
            .collect();
        for (s, hash) in &completed {
            if nodes.get(&(s.level, s.index)) != Some(hash) {
                return Err(AuditError::Corrupt(format!(
                    "log {log_id}: the stored tree node over entries {}..{} does not hash from them",
                    s.start(),
                    s.end()
                )));
            }
        }
        {
            let mut frontier = self.shared.frontier();
            *frontier = grown;
            self.shared.size.store(frontier.size(), Ordering::Release);
        }
        self.in_doubt.clear();
        tracing::warn!(
            log_id = %log_id,
            recovered = landed,
            "a failed audit commit had been written after all; its entries are checked and the tree resynchronised"
        );
        Ok(())
    }
}

fn fail_all(batch: Vec<Request>, message: &str) {
    for request in batch {
        let _ = request.reply.send(Err(AuditError::Unavailable(message.to_string())));
    }
}

/// Signs a head every `interval` when the tree grew. Holds only a weak
/// reference, so a dropped log stops its signer.
async fn run_signer(log: Weak<AuditLog>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        let Some(log) = log.upgrade() else { break };
        if !log.needs_signing() {
            continue;
        }
        match log.shared.signing_refused() {
            Some(SigningRefused::Altered(why)) => {
                tracing::error!(log_id = %log.log_id, why = %why, "the audit log's stored history was altered; no tree head will be signed over it");
                break;
            }
            // Signed once the check has read them.
            Some(SigningRefused::Unchecked { .. }) => continue,
            None => {}
        }
        if let Err(e) = log.sign_now().await {
            tracing::warn!(log_id = %log.log_id, error = %e, "signing the audit tree head failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use lienthong_core::audit::{EntryKind, Outcome};

    /// An entry as the writer stores it, at a time finer than a microsecond.
    fn stored() -> StoredEntry {
        let time = OffsetDateTime::from_unix_timestamp_nanos(1_750_000_000_123_456_789).unwrap();
        let mut event = AuditEvent::new(EntryKind::Access, time);
        event.actor = "tax-board".into();
        event.provider = "civil-registry".into();
        event.record_type = "person".into();
        event.purpose = "income-tax-assessment".into();
        event.subject_hash = "AB".repeat(32);
        let leaf = event.to_leaf().unwrap();
        StoredEntry {
            log_id: "log".into(),
            sequence: 0,
            leaf_hash: merkle::leaf_hash(leaf.as_bytes()),
            leaf,
            // The store keeps microseconds and gives the subject hash back in lower case.
            time: OffsetDateTime::from_unix_timestamp_nanos(1_750_000_000_123_456_000).unwrap(),
            kind: event.kind,
            actor: event.actor,
            provider: event.provider,
            record_type: event.record_type,
            purpose: event.purpose,
            outcome: event.outcome,
            subject_hash: "ab".repeat(32),
        }
    }

    #[test]
    fn an_entry_as_stored_is_consistent() {
        assert_eq!(entry_mismatch(&stored()), None);
    }

    /// A column and a way of altering it.
    type Alteration = (&'static str, fn(&mut StoredEntry));

    #[test]
    fn every_indexed_column_is_checked_against_the_leaf() {
        let alterations: [Alteration; 8] = [
            ("kind", |e| e.kind = EntryKind::Admin),
            ("actor", |e| e.actor = "police".into()),
            ("provider", |e| e.provider = "other".into()),
            ("record_type", |e| e.record_type = "vehicle".into()),
            ("purpose", |e| e.purpose = "statistics".into()),
            ("outcome", |e| e.outcome = Outcome::Denied),
            ("time_us", |e| e.time += Duration::from_micros(1)),
            ("subject_hash", |e| e.subject_hash.clear()),
        ];
        for (column, alter) in alterations {
            let mut entry = stored();
            alter(&mut entry);
            let why = entry_mismatch(&entry).unwrap_or_else(|| panic!("{column} altered unnoticed"));
            assert!(why.contains(&format!("{column} is ")), "{column}: {why}");
        }
    }

    #[test]
    fn a_leaf_must_hash_to_its_leaf_hash_and_be_an_audit_event() {
        let mut entry = stored();
        entry.leaf = entry.leaf.replace("tax-board", "tax-b0ard");
        let why = entry_mismatch(&entry).unwrap();
        assert!(why.contains("does not hash to its stored leaf hash"), "{why}");

        entry.leaf = "{\"national_id\":\"38001085718\"}".into();
        entry.leaf_hash = merkle::leaf_hash(entry.leaf.as_bytes());
        let why = entry_mismatch(&entry).unwrap();
        assert!(why.contains("not an audit event"), "{why}");
        assert!(!why.contains("38001085718"), "the leaf is not quoted: {why}");
    }

    #[test]
    fn quoted_values_are_escaped_and_cut() {
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
        let long = "é".repeat(200);
        assert_eq!(quoted(&long), format!("{:?}...", "é".repeat(QUOTED_CHARS)));
    }
}
