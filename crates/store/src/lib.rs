//! lienthong persistence: one [`Store`] trait with an embedded SQLite
//! implementation (the default) and a PostgreSQL one (several broker replicas).
//!
//! Only this crate speaks SQL. Migrations are embedded in the binary and applied
//! by [`open`].
//!
//! Times are stored as integer microseconds since the Unix epoch (UTC) on both
//! backends, so a time read back is the time written truncated to the
//! microsecond (PostgreSQL's own precision).
#![forbid(unsafe_code)]

mod disk;
mod rows;
mod sql;
mod subjects;
#[cfg(feature = "testing")]
pub mod testing;

pub use disk::{FileSystem, Journal, file_system};

/// The log target of the warning that a SQLite database is on a
/// memory-backed file system (a throwaway federation may silence it).
pub const VOLATILE_LOG_TARGET: &str = "lienthong_store::volatile";

use async_trait::async_trait;
use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_core::{Endpoint, Grant, Member, RecordTypeVersion, RevokedCertificate};
use std::sync::Arc;
use time::OffsetDateTime;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with this key exists already.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What, e.g. `member "civil-status"`.
        what: String,
    },
    /// The row does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What, e.g. `grant "g-..."`.
        what: String,
    },
    /// The database cannot be reached or refused the operation (full disk,
    /// read-only file, connection lost). Callers fail closed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database URL or file is unusable.
    #[error("database configuration: {0}")]
    Config(String),
    /// A value given to the store cannot be stored as it is. Nothing was written.
    #[error("cannot store {0}")]
    Invalid(String),
    /// Stored data could not be decoded (corruption or a newer schema).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// An appended batch does not start at the log's current size (a gap), or
    /// its sequences are not consecutive. Nothing was written.
    #[error("log {log_id} has {expected} entries but the batch continues at sequence {found}")]
    SequenceGap {
        /// Log id.
        log_id: String,
        /// The sequence the log expects next.
        expected: u64,
        /// The sequence offered.
        found: u64,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A process's claim on an audit log (see [`Store::claim_log`]), released
/// when dropped.
pub struct LogClaim {
    pub(crate) held: Held,
}

/// What holds a [`LogClaim`].
pub(crate) enum Held {
    /// Nothing to hold: the store is this process's alone.
    Nothing,
    /// A lock file beside a SQLite database, locked while open.
    File(#[allow(dead_code)] std::fs::File),
    /// A PostgreSQL session holding an advisory lock.
    Postgres(sql::PgClaim),
}

impl LogClaim {
    /// A claim on a store that holds nothing other processes share.
    pub fn unshared() -> LogClaim {
        LogClaim { held: Held::Nothing }
    }

    /// Whether the claim still holds, taking it again if the session that
    /// held it ended (a database restart, a dropped connection): `Ok(false)`
    /// when another process took it meanwhile, an error when the database
    /// cannot be asked. Check it now and then: a PostgreSQL advisory lock
    /// goes with its session, silently.
    pub async fn still_held(&mut self) -> Result<bool> {
        match &mut self.held {
            Held::Nothing | Held::File(_) => Ok(true),
            Held::Postgres(claim) => claim.still_held().await,
        }
    }
}

/// Which backend a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file (WAL).
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// One log (one broker's tree and key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogInfo {
    /// Hex SHA-256 of the public key.
    pub log_id: String,
    /// Raw Ed25519 public key (32 bytes).
    pub public_key: Vec<u8>,
    /// When the log was created.
    pub created_at: OffsetDateTime,
}

/// One stored log entry: the canonical leaf plus columns to filter on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// Log id.
    pub log_id: String,
    /// Position, 0-based, dense.
    pub sequence: u64,
    /// RFC 9162 leaf hash of `leaf`.
    pub leaf_hash: [u8; 32],
    /// Canonical leaf JSON (an `AuditEvent`).
    pub leaf: String,
    /// Event time (filter column).
    pub time: OffsetDateTime,
    /// Kind (filter column).
    pub kind: EntryKind,
    /// Actor member id (filter column).
    pub actor: String,
    /// Provider member id (filter column).
    pub provider: String,
    /// Record type (filter column).
    pub record_type: String,
    /// Purpose (filter column).
    pub purpose: String,
    /// Outcome (filter column).
    pub outcome: Outcome,
    /// Subject HMAC, hex, empty when none (filter column).
    pub subject_hash: String,
}

/// A stored node of a log's Merkle tree: the RFC 9162 hash of the perfect
/// subtree over leaves `[index << level, (index + 1) << level)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeNode {
    /// Height above the leaves (a node at `level` covers `2^level` leaves).
    pub level: u32,
    /// Position among the nodes of its level, from 0.
    pub index: u64,
    /// The subtree's hash.
    pub hash: [u8; 32],
}

/// A signed tree head as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTreeHead {
    /// Log id.
    pub log_id: String,
    /// Entries covered.
    pub tree_size: u64,
    /// Root hash.
    pub root_hash: [u8; 32],
    /// Signing time, ms since the epoch.
    pub timestamp_ms: u64,
    /// Ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
}

/// Where a page of a subject's history ended: the next page holds the
/// entries after this one in the history's order (newest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryCursor {
    /// The last entry's time.
    pub time: OffsetDateTime,
    /// Its log.
    pub log_id: String,
    /// Its sequence in that log.
    pub sequence: u64,
}

impl HistoryCursor {
    /// The cursor after `entry`.
    pub fn after(entry: &StoredEntry) -> Self {
        HistoryCursor {
            time: entry.time,
            log_id: entry.log_id.clone(),
            sequence: entry.sequence,
        }
    }
}

/// Filters for reading entries; `None` fields do not filter.
#[derive(Clone, Debug, Default)]
pub struct EntryQuery {
    /// Log id (required).
    pub log_id: String,
    /// Actor.
    pub actor: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Record type.
    pub record_type: Option<String>,
    /// Purpose.
    pub purpose: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Kind.
    pub kind: Option<EntryKind>,
    /// At or after.
    pub since: Option<OffsetDateTime>,
    /// Before.
    pub until: Option<OffsetDateTime>,
    /// Only entries with sequence >= this.
    pub from_sequence: u64,
    /// At most this many, in sequence order; 0 means no limit.
    pub limit: u32,
}

/// Filters for listing grants.
#[derive(Clone, Debug, Default)]
pub struct GrantQuery {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this record type.
    pub record_type: Option<String>,
}

/// What [`Store::revoke_grant`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantRevocation {
    /// This call revoked the grant.
    Revoked(Grant),
    /// The grant was revoked before: as that revocation left it.
    AlreadyRevoked(Grant),
}

/// Everything the broker persists. Implementations are cheap to share
/// (`Arc<dyn Store>`) and safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend.
    fn backend(&self) -> Backend;

    // === members ===

    /// Inserts a member; `AlreadyExists` if the id is taken.
    async fn insert_member(&self, member: &Member) -> Result<()>;
    /// Replaces a member's mutable fields (name, roles, enabled, reason, updated_at).
    async fn update_member(&self, member: &Member) -> Result<()>;
    /// One member; `Corrupt` when it holds a role this version does not
    /// know (a member read to be changed must not lose it when written back).
    async fn get_member(&self, id: &str) -> Result<Option<Member>>;
    /// All members by id, for reading only: roles this version does not know
    /// are left out, and so is (logged) a member that cannot be decoded.
    async fn list_members(&self) -> Result<Vec<Member>>;
    /// One member, for reading only, as [`Store::list_members`] decodes it.
    async fn read_member(&self, id: &str) -> Result<Option<Member>> {
        Ok(self.list_members().await?.into_iter().find(|m| m.id.as_str() == id))
    }
    /// Records a certificate revocation; `AlreadyExists` if that certificate
    /// is revoked already (the first revocation stands).
    async fn insert_revoked_certificate(&self, revoked: &RevokedCertificate) -> Result<()>;
    /// Every certificate revocation, oldest first; `Corrupt` when any one
    /// cannot be decoded (leaving it out would let its certificate in).
    async fn list_revoked_certificates(&self) -> Result<Vec<RevokedCertificate>>;

    // === endpoints ===

    /// Inserts an endpoint; `AlreadyExists` for the same provider and URL.
    async fn insert_endpoint(&self, endpoint: &Endpoint) -> Result<()>;
    /// Deletes an endpoint and returns it; `NotFound` if absent.
    async fn delete_endpoint(&self, id: &str) -> Result<Endpoint>;
    /// All endpoints by provider, then id; one that cannot be decoded is left out (logged).
    async fn list_endpoints(&self) -> Result<Vec<Endpoint>>;

    // === grants ===

    /// Inserts a grant.
    async fn insert_grant(&self, grant: &Grant) -> Result<()>;
    /// Inserts a grant unless a live grant (not revoked, not ended at `now`)
    /// allows exactly what it allows ([`Grant::same_effect_as`], times as
    /// stored, to the microsecond): then that grant, and nothing is inserted.
    /// Two such calls at once, through any replicas, insert at most one.
    async fn insert_grant_unless_repeated(&self, grant: &Grant, now: OffsetDateTime) -> Result<Option<Grant>>;
    /// Marks a grant revoked; the first revocation wins, and a later one
    /// changes nothing.
    async fn revoke_grant(&self, id: &str, reason: &str, at: OffsetDateTime) -> Result<GrantRevocation>;
    /// One grant.
    async fn get_grant(&self, id: &str) -> Result<Option<Grant>>;
    /// Grants matching the query, newest first; one that cannot be decoded is left out (logged).
    async fn list_grants(&self, query: &GrantQuery) -> Result<Vec<Grant>>;

    // === record types ===

    /// Inserts a version; `AlreadyExists` if (name, version) is taken, which
    /// tells a racing registration to re-read and retry.
    async fn insert_record_type_version(&self, version: &RecordTypeVersion) -> Result<()>;
    /// Sets a version's deprecation and returns it; `NotFound` if absent.
    async fn deprecate_record_type_version(&self, name: &str, version: u32, note: &str) -> Result<RecordTypeVersion>;
    /// Every version of every record type, by name then version.
    async fn list_record_type_versions(&self) -> Result<Vec<RecordTypeVersion>>;

    // === change feed ===

    /// A counter bumped by every change to members, certificate revocations,
    /// endpoints, grants or record types, by any replica. Brokers rebuild their snapshot when it moves.
    async fn change_counter(&self) -> Result<u64>;
    /// Bumps the change counter and tells other replicas (PostgreSQL NOTIFY).
    async fn publish_change(&self) -> Result<u64>;
    /// Receives the new counter whenever a change is published: on PostgreSQL by
    /// any replica (LISTEN/NOTIFY, plus the current counter after each
    /// (re)connection so a notification missed during an outage is caught up);
    /// on SQLite by this process. A receiver may see a value it already knows.
    fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<u64>;

    /// Claims the audit log `log_id` for this process, for as long as the
    /// claim lives; `None` when another process holds it (its data directory,
    /// and so its signing key, was copied or is shared). On PostgreSQL a
    /// session advisory lock on a connection of its own; on SQLite, a lock
    /// file beside the database (`<database>-broker.lock`), since a SQLite
    /// database serves one broker, wherever `database_url` puts it. Stores
    /// that hold nothing other processes share always succeed.
    async fn claim_log(&self, _log_id: &str) -> Result<Option<LogClaim>> {
        Ok(Some(LogClaim::unshared()))
    }

    // === audit log ===

    /// Creates the log if new; returns the stored info (the existing one if it
    /// was there).
    async fn ensure_log(&self, log: &LogInfo) -> Result<LogInfo>;
    /// Every log.
    async fn list_logs(&self) -> Result<Vec<LogInfo>>;
    /// Appends entries in one durable transaction. Sequences must continue the
    /// log densely; a duplicate is refused with `AlreadyExists`, a gap with
    /// `SequenceGap`, an unknown log with `NotFound`, and nothing is written.
    async fn append_entries(&self, entries: &[StoredEntry]) -> Result<()> {
        self.append_entries_and_nodes(entries, &[]).await
    }
    /// [`Store::append_entries`], storing in the same transaction the tree
    /// nodes of the entries' log that the batch completes (written only if
    /// the entries are). Nodes need the batch to be one log's entries.
    async fn append_entries_and_nodes(&self, entries: &[StoredEntry], nodes: &[TreeNode]) -> Result<()>;
    /// The stored tree nodes of a log among those asked for (`(level, index)`
    /// pairs), in no particular order; a node not stored is left out.
    async fn tree_nodes(&self, log_id: &str, wanted: &[(u32, u64)]) -> Result<Vec<TreeNode>>;
    /// How many tree nodes a log has stored.
    async fn tree_node_count(&self, log_id: &str) -> Result<u64>;
    /// Stores tree nodes of a log, replacing any stored at the same place
    /// (filling in nodes for entries written before nodes were stored).
    async fn put_tree_nodes(&self, log_id: &str, nodes: &[TreeNode]) -> Result<()>;
    /// Number of entries in a log.
    async fn log_size(&self, log_id: &str) -> Result<u64>;
    /// Leaf hashes of entries `[from, to)` in order; `NotFound` naming the
    /// first missing entry if the log lacks any of them.
    async fn leaf_hashes(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<[u8; 32]>>;
    /// Entries `[from, to)` of a log in sequence order, each with its leaf,
    /// leaf hash and indexed columns as stored, so that they can be checked
    /// against one another; `NotFound` naming the first missing entry if the
    /// log lacks any of them. The rows are held in memory: read a large log a
    /// few thousand entries at a time.
    async fn entries_in_range(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<StoredEntry>>;
    /// Entries matching a query, in sequence order; `NotFound` for a log the
    /// database does not hold.
    async fn query_entries(&self, query: &EntryQuery) -> Result<Vec<StoredEntry>>;
    /// Access entries of one subject across all logs (its records looked up,
    /// not reads of its history), newest first (then by log id, then newest
    /// sequence), after `after` when given, at most `limit` (0: no limit);
    /// an empty `subject_hash` matches nothing.
    async fn subject_entries(
        &self,
        subject_hash: &str,
        since: Option<OffsetDateTime>,
        after: Option<&HistoryCursor>,
        limit: u32,
    ) -> Result<Vec<StoredEntry>>;
    /// Stops the store's background work (SQLite's checkpoints and subject
    /// runs, PostgreSQL's change listener) and closes its connections once
    /// the statements under way have ended: for a process that hands the
    /// database over to another, as the bench's fill does to the broker.
    async fn close(&self);
    /// Records `fingerprint` as the federation's subject-secret fingerprint
    /// unless one is recorded already, and returns the recorded one.
    async fn claim_subject_key(&self, fingerprint: &str) -> Result<String>;
    /// Checks that a log's citizens' history index holds exactly its access
    /// entries naming a subject, each with its own subject and time (SQLite's
    /// subject runs, which plain SQL could alter without touching an entry;
    /// PostgreSQL's index is the database's own). `Corrupt` when it does not.
    async fn check_subject_index(&self, log_id: &str) -> Result<()>;
    /// Stores a signed tree head. A head for a size already stored replaces it
    /// only if it has the same root and is newer; a different root for the same
    /// size is refused with `AlreadyExists` (it would be a fork).
    async fn insert_tree_head(&self, head: &StoredTreeHead) -> Result<()>;
    /// The newest signed tree head of a log.
    async fn latest_tree_head(&self, log_id: &str) -> Result<Option<StoredTreeHead>>;

    // === rate limits ===

    /// Takes up to `wanted` tokens from a grant's federation-wide bucket of
    /// `per_minute` (full when first used, refilled continuously by the
    /// database's clock), atomically across replicas. `None` on a backend
    /// that one broker alone uses (SQLite): it counts in its own memory.
    async fn take_rate_tokens(&self, grant_id: &str, per_minute: u32, wanted: u32) -> Result<Option<RateTake>>;

    // === health ===

    /// Cheap round trip proving the database answers.
    async fn ping(&self) -> Result<()>;
}

/// What a grant's shared bucket gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateTake {
    /// This many tokens (at least one, at most the number wanted).
    Taken(u32),
    /// None left; the next is due after this long.
    Empty(std::time::Duration),
}

/// Options for opening a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// `sqlite://path/to/file.db` or `postgres://...`.
    pub url: String,
    /// Maximum pooled connections.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before failing `Unavailable`.
    pub acquire_timeout: std::time::Duration,
    /// Connect to a PostgreSQL server on another host without verified TLS
    /// (`sslmode` other than `verify-full` or `verify-ca`). Off by default:
    /// grants, revocations and audit rows would cross the network in clear,
    /// open to whoever can change them on the way.
    pub allow_unverified_postgres: bool,
}

// By hand, so that a debug print never shows the database password.
impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("allow_unverified_postgres", &self.allow_unverified_postgres)
            .finish()
    }
}

/// Opens the store named by `options.url`, creating the SQLite file if needed,
/// and applies migrations.
///
/// Accepted URLs: `sqlite://PATH`, `sqlite:PATH`, a bare path (SQLite; `:memory:`
/// for a private in-memory database), `postgres://...` or `postgresql://...`.
pub async fn open(options: &StoreOptions) -> Result<Arc<dyn Store>> {
    let url = options.url.trim();
    let opened = match parse_url(url)? {
        Target::Sqlite(path) => sql::open_sqlite(path, options).await,
        Target::Postgres => sql::open_postgres(url, options).await,
    };
    opened.map_err(|e| redact(e, url))
}

enum Target<'a> {
    Sqlite(&'a str),
    Postgres,
}

fn parse_url(url: &str) -> Result<Target<'_>> {
    if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        if path.is_empty() {
            return Err(StoreError::Config(
                "the sqlite URL names no file: use sqlite://PATH".into(),
            ));
        }
        return Ok(Target::Sqlite(path));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres);
    }
    if let Some((scheme, _)) = url.split_once("://") {
        // A scheme cannot hold ':' or '@', so printing it never leaks a password.
        let valid = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        let shown = if valid {
            format!("{scheme:?}")
        } else {
            "(unreadable)".into()
        };
        return Err(StoreError::Config(format!(
            "unsupported database URL scheme {shown}: use sqlite://PATH or postgres://USER@HOST/DB"
        )));
    }
    if url.is_empty() {
        return Err(StoreError::Config(
            "the database URL is empty: use sqlite://PATH or postgres://USER@HOST/DB".into(),
        ));
    }
    Ok(Target::Sqlite(url))
}

/// The password of a `scheme://user:password@host/...` URL, as written.
/// The secrets a database URL can carry: the password of its user info
/// and a `password` query parameter, which sqlx also reads.
fn url_secrets(url: &str) -> Vec<&str> {
    let mut secrets = Vec::new();
    let Some((_, rest)) = url.split_once("://") else {
        return secrets;
    };
    if let Some(authority) = rest.split(['/', '?', '#']).next()
        && let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        secrets.push(password);
    }
    if let Some((_, query)) = rest.split_once('?') {
        let query = query.split('#').next().unwrap_or_default();
        secrets.extend(
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .filter(|(key, value)| *key == "password" && !value.is_empty())
                .map(|(_, value)| value),
        );
    }
    secrets
}

/// `url` with its passwords replaced by `***`, fit for a log line or a
/// `Debug` print.
pub fn redact_url(url: &str) -> String {
    let mut clean = url.to_owned();
    for secret in url_secrets(url) {
        clean = clean.replace(secret, "***");
    }
    clean
}

/// Belt and braces: drivers do not echo the URL, but an error must never carry
/// the password whatever a future driver version prints.
fn redact(error: StoreError, url: &str) -> StoreError {
    let secrets = url_secrets(url);
    if secrets.is_empty() {
        return error;
    }
    let clean = |mut s: String| {
        for secret in &secrets {
            s = s.replace(secret, "***");
        }
        s
    };
    match error {
        StoreError::AlreadyExists { what } => StoreError::AlreadyExists { what: clean(what) },
        StoreError::NotFound { what } => StoreError::NotFound { what: clean(what) },
        StoreError::Unavailable(m) => StoreError::Unavailable(clean(m)),
        StoreError::Config(m) => StoreError::Config(clean(m)),
        StoreError::Corrupt(m) => StoreError::Corrupt(clean(m)),
        StoreError::Invalid(m) => StoreError::Invalid(clean(m)),
        other @ StoreError::SequenceGap { .. } => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sqlite_urls_and_bare_paths_name_a_file() {
        for (url, path) in [
            ("sqlite://data/x.db", "data/x.db"),
            ("sqlite:///abs/x.db", "/abs/x.db"),
            ("sqlite:x.db", "x.db"),
            ("x.db", "x.db"),
        ] {
            match parse_url(url).unwrap() {
                Target::Sqlite(p) => assert_eq!(p, path),
                Target::Postgres => panic!("{url} is not postgres"),
            }
        }
        assert!(matches!(parse_url("postgresql://h/db").unwrap(), Target::Postgres));
        assert!(matches!(parse_url("sqlite://"), Err(StoreError::Config(_))));
        assert!(matches!(parse_url(""), Err(StoreError::Config(_))));
    }

    #[test]
    fn unknown_scheme_is_named_without_the_password() {
        let Err(StoreError::Config(m)) = parse_url("mysql://root:hunter2@db/x") else {
            panic!("accepted mysql")
        };
        assert!(m.contains("\"mysql\""), "{m}");
        assert!(!m.contains("hunter2"), "{m}");
    }

    #[test]
    fn redaction_removes_the_url_password() {
        let url = "postgres://app:s3cr%40t@db:5432/x";
        assert_eq!(url_secrets(url), ["s3cr%40t"]);
        let e = redact(StoreError::Unavailable("login s3cr%40t failed".into()), url);
        assert_eq!(e.to_string(), "database unavailable: login *** failed");
        assert!(url_secrets("postgres://app@db/x").is_empty());
    }

    #[test]
    fn redacted_urls_and_debug_prints_hold_no_password() {
        let url = "postgres://app:Xy7pw@db:5432/x?sslmode=verify-full&password=Qz9pw#f";
        assert_eq!(
            redact_url(url),
            "postgres://app:***@db:5432/x?sslmode=verify-full&password=***#f"
        );
        let options = StoreOptions {
            url: url.into(),
            max_connections: 4,
            acquire_timeout: std::time::Duration::from_secs(1),
            allow_unverified_postgres: false,
        };
        let printed = format!("{options:?}");
        assert!(!printed.contains("Xy7pw") && !printed.contains("Qz9pw"), "{printed}");
        assert!(
            printed.contains("db:5432") && printed.contains("max_connections: 4"),
            "{printed}"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
