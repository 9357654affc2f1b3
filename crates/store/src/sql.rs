//! The one [`Store`] implementation, over either an SQLite or a PostgreSQL
//! pool. Both dialects accept `$N` placeholders, so almost every statement is
//! written once and [`on_pool!`] instantiates it for each driver.

use crate::rows::{
    EndpointRow, EntryRow, GrantRow, LogRow, MemberRow, RecordTypeRow, RevokedCertificateRow, TreeHeadRow,
    compatibility_text, decode_or_skip, from_us, roles_text, to_i64, to_json, to_u64, to_us,
};
use crate::subjects;
use crate::{
    Backend, EntryQuery, GrantQuery, GrantRevocation, HistoryCursor, LogClaim, LogInfo, RateTake, Result, Store,
    StoreError, StoreOptions, StoredEntry, StoredTreeHead, TreeNode,
};
use async_trait::async_trait;
use futures::TryStreamExt;
use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_core::{Endpoint, Grant, Member, RecordTypeVersion, RevokedCertificate};
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgListener, PgPool, PgPoolOptions, Postgres};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub(crate) static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// PostgreSQL channel the change counter is announced on.
const CHANGES_CHANNEL: &str = "lienthong_changes";
/// Rows per multi-row INSERT, a power of two (see [`push_entry_insert`]): 12
/// binds each stays far below SQLite's 32766 and PostgreSQL's 65535 parameters.
const ENTRY_ROWS_PER_INSERT: usize = 1024;

/// Audit entries read per statement by [`Store::entries_in_range`], all
/// their rows held until the statement is done.
///
/// Not streamed: on SQLite every value of a streamed row is freed on the
/// reading thread while the connection's thread allocates the next rows',
/// both under SQLite's global allocator lock. With a row's twelve values
/// that contention made reading 300,000 entries take 3.4 to 5.8 s instead
/// of 1.8 s. 256 rows of about 1.3 KB hold a few hundred KiB.
const ENTRY_ROWS_PER_READ: i64 = 256;

/// Tree nodes read or written per statement (four parameters each when written).
const TREE_NODES_PER_QUERY: usize = 512;
/// Stands for "no limit" in `LIMIT $n` on both backends.
const NO_LIMIT: i64 = i64::MAX;

const MEMBER_COLUMNS: &str = "id, display_name, roles, enabled, disabled_reason, created_at_us, updated_at_us";
const ENDPOINT_COLUMNS: &str = "id, provider, url, created_at_us";
const REVOKED_CERTIFICATE_COLUMNS: &str = "fingerprint, member_id, reason, not_after_us, revoked_at_us, revoked_by";
const GRANT_COLUMNS: &str = "id, consumer, record_type, fields, purposes, valid_from_us, valid_until_us, \
     rate_limit_per_minute, revoked_at_us, revoked_reason, created_by, created_at_us, reviewed_version";
const RECORD_TYPE_COLUMNS: &str = "name, version, description, owner, query_schema, record_schema, subject_key, \
     deprecated, deprecation_note, registered_at_us, registered_by, compatibility, field_pointers, digest";
/// Stored columns of `audit_entries`, in insert order.
const ENTRY_COLUMNS: &str =
    "log_no, sequence, leaf_hash, leaf, time_us, kind, actor, provider, record_type, purpose, outcome, subject_hash";
/// Entries read back as [`EntryRow`]s, with their log's id for its number.
const ENTRY_SELECT: &str = "SELECT l.log_id, e.sequence, e.leaf_hash, e.leaf, e.time_us, e.kind, e.actor, e.provider, \
     e.record_type, e.purpose, e.outcome, e.subject_hash FROM audit_entries e JOIN audit_logs l ON l.log_no = e.log_no";
const TREE_HEAD_COLUMNS: &str = "log_id, tree_size, root_hash, timestamp_ms, signature";

/// Runs `$body` with `$p` bound to the concrete pool; the body is compiled once
/// per driver, so it must evaluate to the same type in both arms.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// `on_pool!` on the connection(s) that write the audit log.
macro_rules! on_audit_writer {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.audit_writer {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// How each dialect opens a transaction that will write.
trait Dialect: sqlx::Database {
    /// SQLite must take the write lock up front: a deferred transaction that
    /// reads first fails with SQLITE_BUSY when it later tries to write.
    const BEGIN_WRITE: &'static str;
}

impl Dialect for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
}

impl Dialect for Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";
}

async fn begin_write<DB: Dialect>(pool: &sqlx::Pool<DB>) -> Result<Transaction<'static, DB>> {
    pool.begin_with(DB::BEGIN_WRITE).await.map_err(db_err)
}

/// The audit query of `q` for either backend, binds included.
fn entry_query<'a, DB>(q: &'a EntryQuery, log_no: i64, from: i64, limit: i64) -> QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("{ENTRY_SELECT} WHERE e.log_no = "));
    qb.push_bind(log_no).push(" AND e.sequence >= ").push_bind(from);
    for (column, value) in [
        ("actor", &q.actor),
        ("provider", &q.provider),
        ("record_type", &q.record_type),
        ("purpose", &q.purpose),
    ] {
        if let Some(value) = value {
            qb.push(format!(" AND e.{column} = ")).push_bind(value.as_str());
        }
    }
    if let Some(outcome) = q.outcome {
        qb.push(" AND e.outcome = ").push_bind(outcome.as_str());
        // Spelled out so the planners can prove the partial index applies.
        if outcome != Outcome::Allowed {
            qb.push(" AND e.outcome <> 'allowed'");
        }
    }
    if let Some(kind) = q.kind {
        qb.push(" AND e.kind = ").push_bind(kind.as_str());
        if kind != EntryKind::Access {
            qb.push(" AND e.kind <> 'access'");
        }
    }
    if let Some(since) = q.since {
        qb.push(" AND e.time_us >= ").push_bind(to_us(since));
    }
    if let Some(until) = q.until {
        qb.push(" AND e.time_us < ").push_bind(to_us(until));
    }
    qb.push(" ORDER BY e.sequence LIMIT ").push_bind(limit);
    qb
}

pub(crate) struct SqlStore {
    pool: Pool,
    /// Audit appends and tree heads: one dedicated connection on SQLite, the
    /// shared pool on PostgreSQL.
    audit_writer: Pool,
    changes: broadcast::Sender<u64>,
    /// PostgreSQL's change listener; SQLite's checkpointer and subject runs.
    background: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Wakes SQLite's subject-run maintenance as entries are appended.
    subject_runs: Option<Arc<subjects::Waker>>,
    /// Each log's number, which its entries carry (a log's number never changes).
    log_nos: std::sync::RwLock<std::collections::HashMap<String, i64>>,
    /// SQLite's database file and WAL as opened; `None` in memory and on PostgreSQL.
    files: Option<OpenedFiles>,
}

impl SqlStore {
    /// Stops the background work (subject runs, checkpoints) and leaves the
    /// connections open, for tests that drive it step by step themselves.
    #[cfg(test)]
    pub(crate) fn stop_background(&self) {
        let tasks = match self.background.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }

    /// The pooled readers and the audit writer of an SQLite store (tests).
    #[cfg(test)]
    pub(crate) fn sqlite_pools(&self) -> Option<(SqlitePool, SqlitePool)> {
        match (&self.pool, &self.audit_writer) {
            (Pool::Sqlite(p), Pool::Sqlite(w)) => Some((p.clone(), w.clone())),
            _ => None,
        }
    }

    /// `Unavailable` when SQLite's database file or WAL is no longer where it
    /// was opened (see [`OpenedFiles`]).
    fn files_in_place(&self) -> Result<()> {
        self.files.as_ref().map_or(Ok(()), OpenedFiles::check)
    }

    /// Tells SQLite's subject-run maintenance that `n` entries were appended.
    fn appended_subjects(&self, n: usize) {
        if let Some(waker) = &self.subject_runs {
            waker.appended(n);
        }
    }
}

impl Drop for SqlStore {
    fn drop(&mut self) {
        if let Ok(tasks) = self.background.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

/// Creates the database file readable by its owner alone, when it does not
/// exist: it holds the access log. SQLite gives its WAL and shared-memory
/// files the database file's permissions.
fn create_owner_only(file: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::Config(format!(
                "cannot create the database file {}: {e}",
                file.display()
            ))),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(())
    }
}

pub(crate) async fn open_sqlite(path: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(sqlite_store(path, options).await?))
}

pub(crate) async fn sqlite_store(path: &str, options: &StoreOptions) -> Result<SqlStore> {
    let (connect, pool) = if path == ":memory:" {
        // Every connection would get its own empty database: keep exactly one forever.
        let connect = SqliteConnectOptions::from_str("sqlite::memory:").map_err(db_err)?;
        (
            connect,
            SqlitePoolOptions::new()
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None),
        )
    } else {
        let file = std::path::Path::new(path);
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                StoreError::Config(format!("cannot create the database directory {}: {e}", dir.display()))
            })?;
        }
        let dir = dir.unwrap_or(std::path::Path::new("."));
        if let Some(fs) = crate::file_system(dir).filter(|fs| fs.volatile()) {
            // Allowed (benchmarks and demos use it), but every audit entry
            // synced here is lost when the machine restarts.
            tracing::warn!(
                target: crate::VOLATILE_LOG_TARGET,
                directory = %dir.display(),
                file_system = %fs,
                "the database, audit log included, is on a memory-backed file system: \
                 its entries are lost when the machine restarts; put the data directory on a disk"
            );
        }
        create_owner_only(file)?;
        let connect = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an appended audit entry survives power loss once committed.
            .synchronous(SqliteSynchronous::Full)
            // A multi-row audit batch keeps a statement journal; on disk that is a
            // temporary file created, written and unlinked for every large batch.
            .pragma("temp_store", "memory")
            // The checkpoint normally runs in the background (`checkpoint_wal`);
            // this is only the bound on the WAL should it fall behind.
            .pragma("wal_autocheckpoint", WAL_MAX_PAGES);
        (
            connect,
            SqlitePoolOptions::new()
                .max_connections(options.max_connections.max(1))
                // A file connection does not go stale like a socket; pinging it
                // before every use cost each audit commit another round trip to
                // the connection's worker thread.
                .test_before_acquire(false),
        )
    };
    let connect = connect.foreign_keys(true).busy_timeout(options.acquire_timeout);
    let readers = if path == ":memory:" {
        connect.clone()
    } else {
        connect.clone().pragma("cache_size", READER_CACHE)
    };
    let pool = pool
        .acquire_timeout(options.acquire_timeout)
        .connect_with(readers)
        .await
        .map_err(db_err)?;
    SQLITE_MIGRATOR.run(&pool).await.map_err(migrate_err)?;
    // The audit log's writes go through one connection of their own. SQLite has
    // one writer at a time anyway; on a pool, each commit landed on whichever
    // connection was free, whose page cache the previous commit (made on another
    // connection) had invalidated, so every commit re-read the B-tree pages it
    // was about to change.
    let writer = if path == ":memory:" {
        pool.clone()
    } else {
        SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(db_err)?
    };
    let waker = Arc::new(subjects::Waker::default());
    let mut background = vec![tokio::spawn(subjects::maintain(writer.clone(), waker.clone()))];
    if path != ":memory:" {
        background.push(tokio::spawn(checkpoint_wal(pool.clone())));
    }
    let (changes, _) = broadcast::channel(64);
    Ok(SqlStore {
        pool: Pool::Sqlite(pool),
        audit_writer: Pool::Sqlite(writer),
        changes,
        background: std::sync::Mutex::new(background),
        subject_runs: Some(waker),
        log_nos: Default::default(),
        files: (path != ":memory:")
            .then(|| OpenedFiles::record(std::path::Path::new(path)))
            .flatten(),
    })
}

/// SQLite's database file and WAL, as the broker opened them.
///
/// SQLite writes through the descriptors it opened, whatever becomes of the
/// paths: a database file (or WAL) deleted, moved or replaced under a
/// running broker takes every commit after it, each one synced, into a file
/// the next start will not open. Those entries vanish when the broker stops,
/// and with them the record of what it released meanwhile.
#[derive(Debug)]
struct OpenedFiles {
    /// The database file and its (device, inode) when opened.
    db: (std::path::PathBuf, (u64, u64)),
    /// The WAL, when there was one at the opening. Only its presence is
    /// checked: SQLite makes a new one (a new inode) when a connection opens
    /// after the last one closed, but never removes it while one is open, as
    /// the audit writer's is whenever it appends.
    wal: Option<std::path::PathBuf>,
}

impl OpenedFiles {
    fn record(db: &std::path::Path) -> Option<OpenedFiles> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        Some(OpenedFiles {
            db: (db.to_path_buf(), file_id(db)?),
            wal: file_id(&wal).is_some().then_some(wal),
        })
    }

    /// `Unavailable` when the database file is no longer the one opened
    /// there, or the WAL is gone.
    fn check(&self) -> Result<()> {
        let (db, opened) = &self.db;
        let moved = if file_id(db) != Some(*opened) {
            Some(db)
        } else {
            self.wal.as_ref().filter(|wal| file_id(wal).is_none())
        };
        match moved {
            None => Ok(()),
            Some(path) => Err(StoreError::Unavailable(format!(
                "the database file {} was deleted, moved or replaced while the broker ran, so what is \
                 written now would be lost when it stops; put that file back (the broker then goes on), \
                 or stop the broker and restore its data directory",
                path.display()
            ))),
        }
    }
}

/// The (device, inode) of the file at `path`, if there is one.
#[cfg(unix)]
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &std::path::Path) -> Option<(u64, u64)> {
    None
}

/// Page cache of each pooled (reading) connection, in KiB when negative;
/// the audit writer keeps SQLite's default of 2,000 KiB.
///
/// A reader's cache rarely outlives one query: in WAL mode SQLite drops a
/// connection's whole cache when it begins a read after another connection
/// committed, and the audit writer commits all the time. But an idle pooled
/// connection keeps whatever its last query read. With a log of millions of
/// entries, the opening's and the history check's reads left six connections
/// holding the default 2 MiB each (about 12 MiB of the broker's RSS, for
/// good), and the pool may hold `database_max_connections` (16) of them.
const READER_CACHE: &str = "-512";

/// WAL pages (4 KiB each) after which a committing connection checkpoints
/// the WAL itself: a bound for when the background checkpointer falls behind.
const WAL_MAX_PAGES: &str = "16000";
/// How often the background checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`], on a
/// pool connection.
///
/// With SQLite's default, the commit that takes the WAL past 1,000 pages runs
/// the checkpoint itself: that audit commit, and every lookup waiting for it,
/// also waits for a few milliseconds of copying and two `fsync`s, and under
/// load the hot B-tree pages are copied again every thousand pages. A passive
/// checkpoint never blocks the writer; the writer restarts the WAL from its
/// start once a checkpoint has caught up, so the file stays bounded.
async fn checkpoint_wal(pool: SqlitePool) {
    let mut ticker = tokio::time::interval(CHECKPOINT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            // Harmless: the next tick, or the writer past WAL_MAX_PAGES, catches up.
            tracing::debug!(error = %db_err(e), "background WAL checkpoint failed");
        }
    }
}

/// Refuses a connection to PostgreSQL on another host that is not verified
/// TLS, unless the operator allowed it: the broker's grants, members,
/// revocations and audit rows would cross the network in clear, and whoever
/// could change them on the way could grant access or lift a revocation.
/// A Unix socket or a loopback address does not leave the host. `sslmode`
/// may come from the URL or from `PGSSLMODE`, as libpq reads them.
fn check_postgres_transport(connect: &PgConnectOptions, allow_unverified: bool) -> Result<()> {
    use sqlx::postgres::PgSslMode;
    let host = connect.get_host();
    let local = connect.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let verified = matches!(connect.get_ssl_mode(), PgSslMode::VerifyCa | PgSslMode::VerifyFull);
    if local || verified || allow_unverified {
        return Ok(());
    }
    let mode = match connect.get_ssl_mode() {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    };
    Err(StoreError::Config(format!(
        "the connection to PostgreSQL at {host} would not be verified TLS (sslmode={mode}): add \
         `?sslmode=verify-full&sslrootcert=/path/to/the-database-ca.pem` to database_url (or set \
         PGSSLMODE and PGSSLROOTCERT), or, only where the network path is protected otherwise (an \
         IPsec tunnel, a sidecar proxy), set allow_unverified_database = true"
    )))
}

pub(crate) async fn open_postgres(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    let connect = PgConnectOptions::from_str(url)
        .map_err(db_err)?
        .application_name("lienthong");
    check_postgres_transport(&connect, options.allow_unverified_postgres)?;
    let pool = match PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect.clone())
        .await
    {
        Ok(pool) => pool,
        Err(sqlx::Error::PoolTimedOut) => return Err(first_connection_failed(&connect, options.acquire_timeout).await),
        Err(e) => return Err(db_err(e)),
    };
    // The migrator holds pg_advisory_lock (keyed on the database name) around
    // the whole run, so replicas starting together apply each migration once.
    POSTGRES_MIGRATOR.run(&pool).await.map_err(migrate_err)?;
    // The listener keeps its connection for good: give it its own pool so it
    // never takes one of `max_connections` from the queries.
    let listener_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.acquire_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(connect);
    let (changes, _) = broadcast::channel(64);
    let listener = tokio::spawn(relay_changes(listener_pool, changes.clone()));
    Ok(Arc::new(SqlStore {
        audit_writer: Pool::Postgres(pool.clone()),
        pool: Pool::Postgres(pool),
        changes,
        background: std::sync::Mutex::new(vec![listener]),
        subject_runs: None,
        log_nos: Default::default(),
        files: None,
    }))
}

/// Why the broker's first connection to PostgreSQL failed. The pool retries
/// until its timeout and then says only that it timed out, which leaves the
/// operator to guess between a wrong host, a server that is down, a refused
/// password and a TLS problem; one more attempt names the server and the cause
/// (never the password, which no driver error carries).
async fn first_connection_failed(connect: &PgConnectOptions, wait: Duration) -> StoreError {
    use sqlx::ConnectOptions;
    let server = match connect.get_socket() {
        Some(socket) => format!("socket {}", socket.display()),
        None => format!("{}:{}", connect.get_host(), connect.get_port()),
    };
    let cause = match tokio::time::timeout(wait, connect.connect()).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(_)) => "it answered only after the connection pool had given up; start again".into(),
        Err(_) => format!("no answer within {} ms", wait.as_millis()),
    };
    StoreError::Unavailable(format!(
        "cannot connect to PostgreSQL at {server} (database {:?}, user {:?}): {cause}",
        connect.get_database().unwrap_or_default(),
        connect.get_username()
    ))
}

/// Re-sends every `lienthong_changes` notification on `changes`, forever,
/// reconnecting with backoff; after each (re)connection it sends the current
/// counter, which covers notifications sent while it was not listening.
async fn relay_changes(pool: PgPool, changes: broadcast::Sender<u64>) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut retry = FIRST_RETRY;
    loop {
        let error = match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(CHANGES_CHANNEL).await {
                Ok(()) => {
                    retry = FIRST_RETRY;
                    relay_until_error(&mut listener, &changes).await
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        tracing::warn!(error = %db_err(error), retry_in_ms = retry.as_millis() as u64, "change listener lost its database connection");
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

async fn relay_until_error(listener: &mut PgListener, changes: &broadcast::Sender<u64>) -> sqlx::Error {
    loop {
        let current = sqlx::query_scalar::<_, i64>("SELECT value FROM change_counter WHERE id = 1")
            .fetch_one(&mut *listener)
            .await;
        match current {
            // No receiver is not an error: subscribers come and go.
            Ok(v) => drop(changes.send(u64::try_from(v).unwrap_or(0))),
            Err(e) => return e,
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) => match note.payload().parse::<u64>() {
                    Ok(v) => drop(changes.send(v)),
                    Err(_) => tracing::warn!("ignoring a malformed change notification"),
                },
                // The connection dropped and the listener reconnected: catch up.
                Ok(None) => break,
                Err(e) => return e,
            }
        }
    }
}

/// One log's part of an appended batch.
struct Run<'a> {
    log_id: &'a str,
    first: u64,
    next: u64,
}

/// Checks that each log's entries in the batch are consecutive.
fn plan_append(entries: &[StoredEntry]) -> Result<Vec<Run<'_>>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    for e in entries {
        let after = e
            .sequence
            .checked_add(1)
            .ok_or_else(|| StoreError::Config(format!("sequence {} is beyond the database's range", e.sequence)))?;
        match runs.iter_mut().find(|r| r.log_id == e.log_id) {
            Some(run) if e.sequence == run.next => run.next = after,
            Some(run) if e.sequence < run.next => {
                return Err(StoreError::AlreadyExists {
                    what: format!("entry {} of log {}", e.sequence, e.log_id),
                });
            }
            Some(run) => {
                return Err(StoreError::SequenceGap {
                    log_id: e.log_id.clone(),
                    expected: run.next,
                    found: e.sequence,
                });
            }
            None => runs.push(Run {
                log_id: &e.log_id,
                first: e.sequence,
                next: after,
            }),
        }
    }
    Ok(runs)
}

/// Tree nodes, bound for an insert: `(level, index, hash)`.
struct NodeInsert {
    level: i64,
    index: i64,
    hash: [u8; 32],
}

fn node_inserts(nodes: &[TreeNode]) -> Result<Vec<NodeInsert>> {
    nodes
        .iter()
        .map(|n| {
            Ok(NodeInsert {
                level: i64::from(n.level),
                index: to_i64(n.index, "tree node index")?,
                hash: n.hash,
            })
        })
        .collect()
}

/// `INSERT INTO audit_tree_nodes (...) SELECT ... FROM (VALUES ...) AS v
/// WHERE`: the caller adds the condition.
fn push_node_insert<'a, DB>(qb: &mut QueryBuilder<'a, DB>, log_no: i64, nodes: &'a [NodeInsert])
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    qb.push(
        "INSERT INTO audit_tree_nodes (log_no, level, idx, hash) \
         SELECT v.column1, v.column2, v.column3, v.column4 FROM (",
    );
    qb.push_values(nodes, |mut b, n| {
        b.push_bind(log_no)
            .push_bind(n.level)
            .push_bind(n.index)
            .push_bind(&n.hash[..]);
    });
    qb.push(") AS v WHERE ");
}

/// The values of [`ENTRY_COLUMNS`] as [`push_entry_insert`] selects them
/// from its numbered rows.
const ENTRY_VALUES: &str = "v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, \
     v.column9, v.column10, v.column11, v.column12, v.column13";

/// `INSERT INTO audit_entries (...) SELECT ... FROM (VALUES ...) AS v WHERE
/// v.column1 < n` for the `n` entries of `rows` (one to
/// [`ENTRY_ROWS_PER_INSERT`]); the caller may add `AND` conditions.
///
/// The rows are numbered and padded with copies of the last one up to the next
/// power of two, and the `WHERE` keeps the first `n`. The statement's text then
/// depends only on that power, so every audit commit reuses one of eleven
/// prepared statements: at saturation a commit carries hundreds of entries,
/// and parsing each commit's statement afresh was 9 % of SQLite's CPU.
fn push_entry_insert<'a, DB>(qb: &mut QueryBuilder<'a, DB>, rows: &'a [EntryInsert<'a>])
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a [u8]>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    qb.push(format!(
        "INSERT INTO audit_entries ({ENTRY_COLUMNS}) SELECT {ENTRY_VALUES} FROM ("
    ));
    let padded = rows.len().next_power_of_two();
    let numbered = (0..padded).filter_map(|i| rows.get(i).or(rows.last()).map(|row| (i, row)));
    qb.push_values(numbered, |mut b, (i, row)| {
        let e = row.entry;
        // A literal: the statement's text is the same for every batch of this size.
        b.push(i)
            .push_bind(row.log_no)
            .push_bind(row.sequence)
            .push_bind(&e.leaf_hash[..])
            .push_bind(&e.leaf)
            .push_bind(row.time_us)
            .push_bind(e.kind.as_str())
            .push_bind(&e.actor)
            .push_bind(&e.provider)
            .push_bind(&e.record_type)
            .push_bind(&e.purpose)
            .push_bind(e.outcome.as_str())
            .push_bind(row.subject_hash.as_deref());
    });
    // The count fits: a chunk is at most ENTRY_ROWS_PER_INSERT rows.
    qb.push(") AS v WHERE v.column1 < ").push_bind(rows.len() as i64);
}

/// Appends one log's run of entries on PostgreSQL in one statement, so in
/// one round trip where `BEGIN`, the size update, the insert and `COMMIT`
/// took four. The update and the insert run in the statement's implicit
/// transaction; the insert takes its rows only if the update moved the log's
/// size from where the run starts.
async fn append_postgres_in_one_statement(
    pool: &PgPool,
    run: &Run<'_>,
    (first, count): (i64, i64),
    rows: &[EntryInsert<'_>],
    (log_no, nodes): (i64, &[NodeInsert]),
) -> Result<()> {
    let mut qb = QueryBuilder::<Postgres>::new("WITH moved AS (UPDATE audit_logs SET size = size + ");
    qb.push_bind(count)
        .push(" WHERE log_id = ")
        .push_bind(run.log_id)
        .push(" AND size = ")
        .push_bind(first)
        .push(" RETURNING size) ");
    if !nodes.is_empty() {
        // PostgreSQL runs a data-modifying WITH whether or not it is referenced.
        qb.push(", nodes AS (");
        push_node_insert(&mut qb, log_no, nodes);
        qb.push("EXISTS (SELECT 1 FROM moved)) ");
    }
    push_entry_insert(&mut qb, rows);
    qb.push(" AND EXISTS (SELECT 1 FROM moved)");
    // As on SQLite: statements carrying tree nodes are not kept prepared.
    let inserted = qb
        .build()
        .persistent(nodes.is_empty())
        .execute(pool)
        .await
        .map_err(unique(|| "an entry of this batch".to_owned()))?
        .rows_affected();
    if usize::try_from(inserted).is_ok_and(|n| n == rows.len()) {
        return Ok(());
    }
    let size = sqlx::query_scalar::<_, i64>("SELECT size FROM audit_logs WHERE log_id = $1")
        .bind(run.log_id)
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    Err(append_refused(run, size)?)
}

/// Appends one log's run of entries on SQLite in a single call to the
/// connection's worker thread.
///
/// Every lookup waits for its entry's commit, and at moderate rates a commit
/// carries one or two entries: `BEGIN`, the size update, the insert and
/// `COMMIT` as four calls cost four wake-ups of the worker thread and four of
/// the appender. As one script it is one of each. The rows go in only if the
/// log's size is where the run starts (the `WHERE` of each insert), and the
/// size moves only then, so a refused run commits an empty transaction.
async fn append_sqlite_in_one_call(
    writer: &SqlitePool,
    run: &Run<'_>,
    (first, count): (i64, i64),
    rows: &[EntryInsert<'_>],
    (log_no, nodes): (i64, &[NodeInsert]),
) -> Result<()> {
    let mut qb = QueryBuilder::<Sqlite>::new("BEGIN IMMEDIATE;");
    for chunk in rows.chunks(ENTRY_ROWS_PER_INSERT) {
        qb.push(" ");
        push_entry_insert(&mut qb, chunk);
        qb.push(" AND (SELECT size FROM audit_logs WHERE log_id = ")
            .push_bind(run.log_id)
            .push(") = ")
            .push_bind(first)
            .push(";");
    }
    if !nodes.is_empty() {
        // Under the same condition as the entries, before the size moves.
        qb.push(" ");
        push_node_insert(&mut qb, log_no, nodes);
        qb.push("(SELECT size FROM audit_logs WHERE log_id = ")
            .push_bind(run.log_id)
            .push(") = ")
            .push_bind(first)
            .push(";");
    }
    // Every row must be in before the size moves over it: a trigger that
    // drops rows (`RAISE(IGNORE)`) would otherwise have entries acknowledged
    // that the log does not hold. A short count sets the size to NULL, which
    // its NOT NULL refuses, so the script stops inside its transaction and is
    // rolled back below (SQLite has no RAISE outside triggers).
    qb.push(" UPDATE audit_logs SET size = NULL WHERE log_id = ")
        .push_bind(run.log_id)
        .push(" AND size = ")
        .push_bind(first)
        .push(" AND (SELECT count(*) FROM audit_entries WHERE log_no = ")
        .push_bind(log_no)
        .push(" AND sequence >= ")
        .push_bind(first)
        .push(") <> ")
        .push_bind(count)
        .push(";");
    qb.push(" UPDATE audit_logs SET size = size + ")
        .push_bind(count)
        .push(" WHERE log_id = ")
        .push_bind(run.log_id)
        .push(" AND size = ")
        .push_bind(first)
        .push(" RETURNING size; COMMIT;");
    let mut conn = writer.acquire().await.map_err(db_err)?;
    // One chunk's script has one text per power of two (see
    // `push_entry_insert`); batches of several chunks are rare and vary, and
    // so do scripts carrying tree nodes (one commit in 256 entries' worth):
    // cached, each of those would hold another copy of the large prepared
    // insert (7-8 MiB more at 1,000 lookups in flight).
    let moved = qb
        .build_query_scalar::<i64>()
        .persistent(rows.len() <= ENTRY_ROWS_PER_INSERT && nodes.is_empty())
        .fetch_all(&mut *conn)
        .await;
    match moved {
        Ok(moved) if !moved.is_empty() => Ok(()),
        Ok(_) => {
            let size = sqlx::query_scalar::<_, i64>("SELECT size FROM audit_logs WHERE log_id = $1")
                .bind(run.log_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
            Err(append_refused(run, size)?)
        }
        Err(e) => {
            // The script stopped at the failing statement, possibly inside its
            // transaction: end it, or retire the connection rather than hand
            // back one with a transaction open.
            if let Err(rollback) = sqlx::query("ROLLBACK").execute(&mut *conn).await
                && !rollback.to_string().contains("no transaction is active")
            {
                tracing::warn!(error = %db_err(rollback), "audit writer connection retired after a failed rollback");
                conn.close_on_drop();
            }
            if e.to_string().contains("NOT NULL constraint failed: audit_logs.size") {
                return Err(StoreError::Corrupt(format!(
                    "the database kept fewer than the {count} entries of log {} given to it from sequence {first} \
                     (a trigger or rule on audit_entries drops rows); none was committed",
                    run.log_id
                )));
            }
            Err(unique(|| "an entry of this batch".to_owned())(e))
        }
    }
}

/// Why `UPDATE audit_logs ... WHERE size = first` matched nothing.
fn append_refused(run: &Run<'_>, size: Option<i64>) -> Result<StoreError> {
    let Some(size) = size else {
        return Ok(StoreError::NotFound {
            what: format!("log {}", run.log_id),
        });
    };
    let size = to_u64(size, "audit_logs.size")?;
    Ok(if run.first < size {
        StoreError::AlreadyExists {
            what: format!("entry {} of log {}", run.first, run.log_id),
        }
    } else {
        StoreError::SequenceGap {
            log_id: run.log_id.to_owned(),
            expected: size,
            found: run.first,
        }
    })
}

/// A subject's entries across every log, newest first: `$1` the subject
/// HMAC's bytes, `$2` the earliest time, `$3` the limit.
fn subject_query() -> String {
    format!(
        "{ENTRY_SELECT} WHERE e.subject_hash = $1 AND e.time_us >= $2 AND e.kind = 'access' AND {HISTORY_AFTER} \
         ORDER BY e.time_us DESC, l.log_id, e.sequence DESC LIMIT $3"
    )
}

/// The entries after the cursor `($4, $5, $6)` = (time, log id, sequence)
/// in a history's order: newest first, then by log id, then newest sequence.
pub(crate) const HISTORY_AFTER: &str = "(e.time_us < $4 OR (e.time_us = $4 AND \
     (l.log_id > $5 OR (l.log_id = $5 AND e.sequence < $6))))";

/// One audit entry as its row is inserted.
struct EntryInsert<'a> {
    entry: &'a StoredEntry,
    log_no: i64,
    sequence: i64,
    time_us: i64,
    /// The subject HMAC's bytes, `None` when the entry has no subject.
    subject_hash: Option<Vec<u8>>,
}

impl<'a> EntryInsert<'a> {
    fn new(entry: &'a StoredEntry, log_no: i64) -> Result<EntryInsert<'a>> {
        let subject_hash = match entry.subject_hash.as_str() {
            "" => None,
            hash => Some(hex::decode(hash).map_err(|_| {
                StoreError::Invalid(format!(
                    "entry {} of log {}: the subject hash is not hexadecimal",
                    entry.sequence, entry.log_id
                ))
            })?),
        };
        Ok(EntryInsert {
            entry,
            log_no,
            sequence: to_i64(entry.sequence, "sequence")?,
            time_us: to_us(entry.time),
            subject_hash,
        })
    }
}

impl SqlStore {
    /// The number `log_id`'s entries carry, `None` for an unknown log.
    async fn log_no(&self, log_id: &str) -> Result<Option<i64>> {
        if let Some(n) = self.log_nos.read().ok().and_then(|m| m.get(log_id).copied()) {
            return Ok(Some(n));
        }
        let sql = "SELECT log_no FROM audit_logs WHERE log_id = $1";
        let found = on_pool!(self, p => sqlx::query_scalar::<_, Option<i64>>(sql).bind(log_id).fetch_optional(p).await)
            .map_err(db_err)?
            .flatten();
        if let (Some(n), Ok(mut known)) = (found, self.log_nos.write()) {
            known.insert(log_id.to_owned(), n);
        }
        Ok(found)
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    async fn insert_member(&self, m: &Member) -> Result<()> {
        let roles = roles_text(&m.roles);
        on_pool!(self, p => sqlx::query(
            "INSERT INTO members (id, display_name, roles, enabled, disabled_reason, created_at_us, updated_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(m.id.as_str()).bind(&m.display_name).bind(&roles).bind(m.enabled).bind(&m.disabled_reason)
            .bind(to_us(m.created_at)).bind(to_us(m.updated_at))
            .execute(p).await.map(|_| ()))
        .map_err(unique(|| format!("member {:?}", m.id.as_str())))
    }

    async fn update_member(&self, m: &Member) -> Result<()> {
        let roles = roles_text(&m.roles);
        let changed = on_pool!(self, p => sqlx::query(
            "UPDATE members SET display_name = $2, roles = $3, enabled = $4, disabled_reason = $5, updated_at_us = $6 \
             WHERE id = $1")
            .bind(m.id.as_str()).bind(&m.display_name).bind(&roles).bind(m.enabled).bind(&m.disabled_reason)
            .bind(to_us(m.updated_at))
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(db_err)?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: format!("member {:?}", m.id.as_str()),
            });
        }
        Ok(())
    }

    async fn get_member(&self, id: &str) -> Result<Option<Member>> {
        let sql = format!("SELECT {MEMBER_COLUMNS} FROM members WHERE id = $1");
        let row = on_pool!(self, p => sqlx::query_as::<_, MemberRow>(&sql).bind(id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.map(MemberRow::into_member).transpose()
    }

    async fn read_member(&self, id: &str) -> Result<Option<Member>> {
        let sql = format!("SELECT {MEMBER_COLUMNS} FROM members WHERE id = $1");
        let row = on_pool!(self, p => sqlx::query_as::<_, MemberRow>(&sql).bind(id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.map(MemberRow::into_member_known_roles).transpose()
    }

    async fn list_members(&self) -> Result<Vec<Member>> {
        let sql = format!("SELECT {MEMBER_COLUMNS} FROM members ORDER BY id");
        let rows = on_pool!(self, p => sqlx::query_as::<_, MemberRow>(&sql).fetch_all(p).await).map_err(db_err)?;
        // Read to be used, never written back: unknown roles are dropped
        // and an undecodable member is left out (see `decode_or_skip`).
        let mut members = decode_or_skip(rows, "members", MemberRow::key, MemberRow::into_member_known_roles);
        // PostgreSQL orders text by its locale ('-' ignored under en_US);
        // both backends list in byte order, as SQLite does.
        members.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Ok(members)
    }

    async fn insert_revoked_certificate(&self, r: &RevokedCertificate) -> Result<()> {
        let sql =
            format!("INSERT INTO revoked_certificates ({REVOKED_CERTIFICATE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)");
        on_pool!(self, p => sqlx::query(&sql)
            .bind(r.fingerprint.to_string()).bind(r.member.as_str()).bind(&r.reason)
            .bind(r.not_after.map(to_us)).bind(to_us(r.revoked_at)).bind(r.revoked_by.as_str())
            .execute(p).await.map(|_| ()))
        .map_err(unique(|| format!("the revocation of certificate {}", r.fingerprint)))
    }

    async fn list_revoked_certificates(&self) -> Result<Vec<RevokedCertificate>> {
        let sql = format!(
            "SELECT {REVOKED_CERTIFICATE_COLUMNS} FROM revoked_certificates ORDER BY revoked_at_us, fingerprint"
        );
        let rows =
            on_pool!(self, p => sqlx::query_as::<_, RevokedCertificateRow>(&sql).fetch_all(p).await).map_err(db_err)?;
        // All or nothing: a revocation left out would let its certificate in
        // again. A row that cannot be decoded fails the snapshot's reload,
        // which refuses lookups past `limits.max_snapshot_lag_ms`.
        rows.into_iter().map(RevokedCertificateRow::into_revoked).collect()
    }

    async fn insert_endpoint(&self, e: &Endpoint) -> Result<()> {
        on_pool!(self, p => sqlx::query("INSERT INTO endpoints (id, provider, url, created_at_us) VALUES ($1, $2, $3, $4)")
            .bind(&e.id).bind(e.provider.as_str()).bind(&e.url).bind(to_us(e.created_at))
            .execute(p).await.map(|_| ()))
        // Named by what the caller gave: the id made for this attempt is no
        // endpoint's (`lienthong endpoint list` shows the existing one's).
        .map_err(unique(|| format!("endpoint {} of provider {:?}", e.url, e.provider.as_str())))
    }

    async fn delete_endpoint(&self, id: &str) -> Result<Endpoint> {
        let sql = format!("DELETE FROM endpoints WHERE id = $1 RETURNING {ENDPOINT_COLUMNS}");
        let row = on_pool!(self, p => sqlx::query_as::<_, EndpointRow>(&sql).bind(id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.ok_or_else(|| StoreError::NotFound {
            what: format!("endpoint {id:?}"),
        })?
        .into_endpoint()
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY provider, id");
        let rows = on_pool!(self, p => sqlx::query_as::<_, EndpointRow>(&sql).fetch_all(p).await).map_err(db_err)?;
        // An endpoint left out is only one place fewer to call.
        let mut endpoints = decode_or_skip(rows, "endpoints", EndpointRow::key, EndpointRow::into_endpoint);
        // Byte order on both backends (see `list_members`).
        endpoints.sort_by(|a, b| (a.provider.as_str(), &a.id).cmp(&(b.provider.as_str(), &b.id)));
        Ok(endpoints)
    }

    async fn insert_grant(&self, g: &Grant) -> Result<()> {
        let fields = to_json(&g.fields, "grant fields")?;
        let purposes = to_json(&g.purposes, "grant purposes")?;
        let sql = format!(
            "INSERT INTO grants ({GRANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        on_pool!(self, p => sqlx::query(&sql)
            .bind(&g.id).bind(g.consumer.as_str()).bind(&g.record_type).bind(&fields).bind(&purposes)
            .bind(to_us(g.valid_from)).bind(g.valid_until.map(to_us)).bind(i64::from(g.rate_limit_per_minute))
            .bind(g.revoked_at.map(to_us)).bind(&g.revoked_reason).bind(g.created_by.as_str()).bind(to_us(g.created_at))
            .bind(g.reviewed_version.map(i64::from))
            .execute(p).await.map(|_| ()))
        .map_err(unique(|| format!("grant {:?}", g.id)))
    }

    async fn insert_grant_unless_repeated(&self, g: &Grant, now: OffsetDateTime) -> Result<Option<Grant>> {
        let fields = to_json(&g.fields, "grant fields")?;
        let purposes = to_json(&g.purposes, "grant purposes")?;
        // Compared as it will read back: a time the request gave in
        // nanoseconds is kept in microseconds.
        let mut stored = g.clone();
        stored.valid_from = from_us(to_us(g.valid_from), "valid_from")?;
        stored.valid_until = g.valid_until.map(|t| from_us(to_us(t), "valid_until")).transpose()?;
        // One consumer's grants are made one at a time, so that two equal
        // grants made at once cannot both find no other: SQLite's write
        // transaction holds the whole database, and on PostgreSQL the
        // consumer's row is locked until the grant is in.
        let lock = match self.pool {
            Pool::Sqlite(_) => "SELECT id FROM members WHERE id = $1",
            Pool::Postgres(_) => "SELECT id FROM members WHERE id = $1 FOR UPDATE",
        };
        let live = format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE consumer = $1 AND record_type = $2 AND revoked_at_us IS NULL \
             ORDER BY created_at_us, id"
        );
        let insert = format!(
            "INSERT INTO grants ({GRANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        on_pool!(self, p => {
            let mut tx = begin_write(p).await?;
            sqlx::query(lock).bind(g.consumer.as_str()).fetch_optional(&mut *tx).await.map_err(db_err)?;
            let rows = sqlx::query_as::<_, GrantRow>(&live)
                .bind(g.consumer.as_str()).bind(&g.record_type)
                .fetch_all(&mut *tx).await.map_err(db_err)?;
            // A row that cannot be decoded allows nothing (see `list_grants`),
            // so it repeats nothing either.
            let repeated = decode_or_skip(rows, "grants", GrantRow::key, GrantRow::into_grant)
                .into_iter()
                .find(|e| e.is_live(now) && e.same_effect_as(&stored, now));
            if repeated.is_some() {
                // Dropping `tx` rolls back.
                return Ok(repeated);
            }
            sqlx::query(&insert)
                .bind(&g.id).bind(g.consumer.as_str()).bind(&g.record_type).bind(&fields).bind(&purposes)
                .bind(to_us(g.valid_from)).bind(g.valid_until.map(to_us)).bind(i64::from(g.rate_limit_per_minute))
                .bind(g.revoked_at.map(to_us)).bind(&g.revoked_reason).bind(g.created_by.as_str())
                .bind(to_us(g.created_at)).bind(g.reviewed_version.map(i64::from))
                .execute(&mut *tx).await.map_err(unique(|| format!("grant {:?}", g.id)))?;
            tx.commit().await.map_err(db_err)?;
        });
        Ok(None)
    }

    async fn revoke_grant(&self, id: &str, reason: &str, at: OffsetDateTime) -> Result<GrantRevocation> {
        // The `IS NULL` guard makes the first revocation win; grants are never deleted.
        let changed = on_pool!(self, p => sqlx::query(
            "UPDATE grants SET revoked_at_us = $2, revoked_reason = $3 WHERE id = $1 AND revoked_at_us IS NULL")
            .bind(id).bind(to_us(at)).bind(reason)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(db_err)?;
        let grant = self.get_grant(id).await?.ok_or_else(|| StoreError::NotFound {
            what: format!("grant {id:?}"),
        })?;
        Ok(if changed > 0 {
            GrantRevocation::Revoked(grant)
        } else {
            GrantRevocation::AlreadyRevoked(grant)
        })
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>> {
        let sql = format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = $1");
        let row = on_pool!(self, p => sqlx::query_as::<_, GrantRow>(&sql).bind(id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.map(GrantRow::into_grant).transpose()
    }

    async fn list_grants(&self, q: &GrantQuery) -> Result<Vec<Grant>> {
        let rows = on_pool!(self, p => {
            let mut qb = QueryBuilder::new(format!("SELECT {GRANT_COLUMNS} FROM grants WHERE 1 = 1"));
            if let Some(consumer) = &q.consumer {
                qb.push(" AND consumer = ").push_bind(consumer);
            }
            if let Some(record_type) = &q.record_type {
                qb.push(" AND record_type = ").push_bind(record_type);
            }
            qb.push(" ORDER BY created_at_us DESC, id DESC");
            qb.build_query_as::<GrantRow>().fetch_all(p).await
        })
        .map_err(db_err)?;
        // A grant left out denies what it allowed (access is denied by
        // default; a revocation is a column of its own row).
        Ok(decode_or_skip(rows, "grants", GrantRow::key, GrantRow::into_grant))
    }

    async fn insert_record_type_version(&self, v: &RecordTypeVersion) -> Result<()> {
        let d = &v.definition;
        let query_schema = to_json(&d.query_schema, "query schema")?;
        let record_schema = to_json(&d.record_schema, "record schema")?;
        let field_pointers = to_json(&v.field_pointers, "field pointers")?;
        let compatibility = compatibility_text(v.compatibility)?;
        let sql = format!(
            "INSERT INTO record_type_versions ({RECORD_TYPE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        );
        on_pool!(self, p => sqlx::query(&sql)
            .bind(&d.name).bind(i64::from(v.version)).bind(&d.description).bind(d.owner.as_str())
            .bind(&query_schema).bind(&record_schema).bind(&d.subject_key).bind(v.deprecated)
            .bind(&v.deprecation_note).bind(to_us(v.registered_at)).bind(v.registered_by.as_str())
            .bind(&compatibility).bind(&field_pointers).bind(&v.digest)
            .execute(p).await.map(|_| ()))
        .map_err(unique(|| format!("record type {:?} version {}", d.name, v.version)))
    }

    async fn deprecate_record_type_version(&self, name: &str, version: u32, note: &str) -> Result<RecordTypeVersion> {
        let sql = format!(
            "UPDATE record_type_versions SET deprecated = $3, deprecation_note = $4 \
             WHERE name = $1 AND version = $2 RETURNING {RECORD_TYPE_COLUMNS}"
        );
        let row = on_pool!(self, p => sqlx::query_as::<_, RecordTypeRow>(&sql)
            .bind(name).bind(i64::from(version)).bind(true).bind(note)
            .fetch_optional(p).await)
        .map_err(db_err)?;
        row.ok_or_else(|| StoreError::NotFound {
            what: format!("record type {name:?} version {version}"),
        })?
        .into_version()
    }

    async fn list_record_type_versions(&self) -> Result<Vec<RecordTypeVersion>> {
        let sql = format!("SELECT {RECORD_TYPE_COLUMNS} FROM record_type_versions ORDER BY name, version");
        let rows = on_pool!(self, p => sqlx::query_as::<_, RecordTypeRow>(&sql).fetch_all(p).await).map_err(db_err)?;
        // All or nothing: with a version left out, a lookup naming no version
        // would get an older one, its schema and fields, as the latest.
        let mut versions = rows
            .into_iter()
            .map(RecordTypeRow::into_version)
            .collect::<Result<Vec<_>>>()?;
        // Byte order on both backends (see `list_members`).
        versions.sort_by(|a, b| (&a.definition.name, a.version).cmp(&(&b.definition.name, b.version)));
        Ok(versions)
    }

    async fn change_counter(&self) -> Result<u64> {
        let sql = "SELECT value FROM change_counter WHERE id = 1";
        let v = on_pool!(self, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await).map_err(db_err)?;
        to_u64(v, "change_counter.value")
    }

    async fn publish_change(&self) -> Result<u64> {
        let bump = "UPDATE change_counter SET value = value + 1 WHERE id = 1 RETURNING value";
        let value = match &self.pool {
            Pool::Sqlite(p) => {
                let mut tx = begin_write(p).await?;
                let v: i64 = sqlx::query_scalar(bump).fetch_one(&mut *tx).await.map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                v
            }
            Pool::Postgres(p) => {
                let mut tx = begin_write(p).await?;
                let v: i64 = sqlx::query_scalar(bump).fetch_one(&mut *tx).await.map_err(db_err)?;
                // Delivered at commit, so listeners never see an uncommitted counter.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANGES_CHANNEL)
                    .bind(v.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                v
            }
        };
        let value = to_u64(value, "change_counter.value")?;
        if matches!(self.pool, Pool::Sqlite(_)) {
            // No receiver is not an error.
            drop(self.changes.send(value));
        }
        Ok(value)
    }

    fn subscribe_changes(&self) -> broadcast::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn claim_log(&self, log_id: &str) -> Result<Option<LogClaim>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut path = p.connect_options().get_filename().as_os_str().to_owned();
                path.push("-broker.lock");
                let path = std::path::PathBuf::from(path);
                let mut options = std::fs::OpenOptions::new();
                options.create(true).truncate(false).write(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let file = options
                    .open(&path)
                    .map_err(|e| StoreError::Config(format!("cannot open {}: {e}", path.display())))?;
                match file.try_lock() {
                    Ok(()) => Ok(Some(LogClaim {
                        held: crate::Held::File(file),
                    })),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => {
                        Err(StoreError::Config(format!("cannot lock {}: {e}", path.display())))
                    }
                }
            }
            Pool::Postgres(p) => {
                let claim = PgClaim {
                    pool: p.clone(),
                    key: log_lock_key(log_id),
                    session: None,
                };
                claim.take().await
            }
        }
    }
    async fn ensure_log(&self, log: &LogInfo) -> Result<LogInfo> {
        // PostgreSQL numbers a log from a sequence; SQLite, whose writes are
        // serialized, from the largest number so far.
        let sql = match self.pool {
            Pool::Sqlite(_) => {
                "INSERT INTO audit_logs (log_id, public_key, created_at_us, size, log_no) \
                 VALUES ($1, $2, $3, 0, (SELECT COALESCE(MAX(log_no), 0) + 1 FROM audit_logs)) \
                 ON CONFLICT (log_id) DO NOTHING"
            }
            Pool::Postgres(_) => {
                "INSERT INTO audit_logs (log_id, public_key, created_at_us, size) VALUES ($1, $2, $3, 0) \
                 ON CONFLICT (log_id) DO NOTHING"
            }
        };
        on_pool!(self, p => sqlx::query(sql)
            .bind(&log.log_id).bind(&log.public_key).bind(to_us(log.created_at))
            .execute(p).await.map(|_| ()))
        .map_err(db_err)?;
        let sql = "SELECT log_id, public_key, created_at_us FROM audit_logs WHERE log_id = $1";
        let row = on_pool!(self, p => sqlx::query_as::<_, LogRow>(sql).bind(&log.log_id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.ok_or_else(|| StoreError::NotFound {
            what: format!("log {}", log.log_id),
        })?
        .into_log()
    }

    async fn list_logs(&self) -> Result<Vec<LogInfo>> {
        let sql = "SELECT log_id, public_key, created_at_us FROM audit_logs ORDER BY created_at_us, log_id";
        let rows = on_pool!(self, p => sqlx::query_as::<_, LogRow>(sql).fetch_all(p).await).map_err(db_err)?;
        rows.into_iter().map(LogRow::into_log).collect()
    }

    async fn append_entries_and_nodes(&self, entries: &[StoredEntry], nodes: &[TreeNode]) -> Result<()> {
        let runs = plan_append(entries)?;
        if !nodes.is_empty() && runs.len() != 1 {
            return Err(StoreError::Invalid(
                "tree nodes can only be appended with entries of one log".into(),
            ));
        }
        let nodes = node_inserts(nodes)?;
        let mut bounds = Vec::with_capacity(runs.len());
        for run in &runs {
            bounds.push((
                to_i64(run.first, "sequence")?,
                to_i64(run.next - run.first, "batch size")?,
            ));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut numbers = Vec::with_capacity(runs.len());
        for run in &runs {
            let number = self.log_no(run.log_id).await?.ok_or_else(|| StoreError::NotFound {
                what: format!("log {}", run.log_id),
            })?;
            numbers.push((run.log_id, number));
        }
        let rows = entries
            .iter()
            .map(|e| {
                // Every entry's log is one of the runs, numbered just above.
                let (_, log_no) = numbers.iter().find(|(id, _)| *id == e.log_id).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "entry {} names log {}, outside the batch's runs",
                        e.sequence, e.log_id
                    ))
                })?;
                EntryInsert::new(e, *log_no)
            })
            .collect::<Result<Vec<_>>>()?;
        // With nodes there is one run, numbered above.
        let node_log_no = numbers.first().map_or(0, |(_, n)| *n);
        match (&self.audit_writer, runs.as_slice()) {
            (Pool::Sqlite(writer), [run]) => {
                append_sqlite_in_one_call(writer, run, bounds[0], &rows, (node_log_no, &nodes)).await?;
                self.appended_subjects(rows.len());
                // After the commit: a file gone before it was synced fails the
                // batch (nothing is released), and the log's writer reads the
                // store back before its next one, as after any failed commit.
                return self.files_in_place();
            }
            (Pool::Postgres(pool), [run]) if rows.len() <= ENTRY_ROWS_PER_INSERT => {
                return append_postgres_in_one_statement(pool, run, bounds[0], &rows, (node_log_no, &nodes)).await;
            }
            _ => {}
        }
        on_audit_writer!(self, p => {
            let mut tx = begin_write(p).await?;
            // The log's size moves in the same transaction as its rows, and only if
            // the batch starts exactly at it: concurrent writers cannot interleave.
            for (run, (first, count)) in runs.iter().zip(&bounds) {
                let moved = sqlx::query_scalar::<_, i64>(
                    "UPDATE audit_logs SET size = size + $3 WHERE log_id = $1 AND size = $2 RETURNING size")
                    .bind(run.log_id).bind(first).bind(count)
                    .fetch_optional(&mut *tx).await.map_err(db_err)?;
                if moved.is_none() {
                    let size = sqlx::query_scalar::<_, i64>("SELECT size FROM audit_logs WHERE log_id = $1")
                        .bind(run.log_id)
                        .fetch_optional(&mut *tx).await.map_err(db_err)?;
                    // Dropping `tx` rolls back.
                    return Err(append_refused(run, size)?);
                }
            }
            for chunk in rows.chunks(ENTRY_ROWS_PER_INSERT) {
                let mut qb = QueryBuilder::new("");
                push_entry_insert(&mut qb, chunk);
                qb.build().execute(&mut *tx).await.map_err(unique(|| "an entry of this batch".to_owned()))?;
            }
            if !nodes.is_empty() {
                let mut qb = QueryBuilder::new("");
                push_node_insert(&mut qb, node_log_no, &nodes);
                qb.push("TRUE");
                qb.build().execute(&mut *tx).await.map_err(unique(|| "a tree node of this batch".to_owned()))?;
            }
            tx.commit().await.map_err(db_err)
        })?;
        self.appended_subjects(rows.len());
        self.files_in_place()
    }

    async fn log_size(&self, log_id: &str) -> Result<u64> {
        let sql = "SELECT size FROM audit_logs WHERE log_id = $1";
        let size = on_pool!(self, p => sqlx::query_scalar::<_, i64>(sql).bind(log_id).fetch_optional(p).await)
            .map_err(db_err)?;
        to_u64(
            size.ok_or_else(|| StoreError::NotFound {
                what: format!("log {log_id}"),
            })?,
            "audit_logs.size",
        )
    }

    async fn leaf_hashes(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<[u8; 32]>> {
        if to <= from {
            return Ok(Vec::new());
        }
        let (lo, hi) = (to_i64(from, "sequence")?, to_i64(to, "sequence")?);
        let missing = || StoreError::NotFound {
            what: format!("entries {from}..{to} of log {log_id}"),
        };
        let log_no = self.log_no(log_id).await?.ok_or_else(missing)?;
        let sql = "SELECT leaf_hash FROM audit_entries WHERE log_no = $1 AND sequence >= $2 AND sequence < $3 ORDER BY sequence";
        // Streamed: the log's opening and its history check read 65,536 at a
        // time, and collecting the rows first held about five times the hashes'
        // size in row buffers (11 MiB more RSS while a large log was checked).
        let mut hashes = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0).min(1 << 20));
        let mut push = |h: Vec<u8>| {
            let hash = <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
                StoreError::Corrupt(format!("audit_entries.leaf_hash holds {} bytes, expected 32", h.len()))
            })?;
            hashes.push(hash);
            Ok::<_, StoreError>(())
        };
        on_pool!(self, p => {
            let mut rows = sqlx::query_scalar::<_, Vec<u8>>(sql).bind(log_no).bind(lo).bind(hi).fetch(p);
            while let Some(h) = rows.try_next().await.map_err(db_err)? {
                push(h)?;
            }
        });
        if hashes.len() as u64 != to - from {
            // Rare (rows deleted behind the broker's back): a second read
            // names the first missing entry, so the operator knows where.
            let sql = "SELECT sequence FROM audit_entries WHERE log_no = $1 AND sequence >= $2 AND sequence < $3 ORDER BY sequence";
            let present: Vec<i64> = on_pool!(self, p => {
                sqlx::query_scalar::<_, i64>(sql).bind(log_no).bind(lo).bind(hi).fetch_all(p).await.map_err(db_err)?
            });
            let mut expected = lo;
            for sequence in present {
                if sequence != expected {
                    break;
                }
                expected += 1;
            }
            return Err(StoreError::NotFound {
                what: format!("entry {expected} of log {log_id}"),
            });
        }
        Ok(hashes)
    }

    async fn entries_in_range(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<StoredEntry>> {
        if to <= from {
            return Ok(Vec::new());
        }
        let (lo, hi) = (to_i64(from, "sequence")?, to_i64(to, "sequence")?);
        let missing = |sequence: i64| StoreError::NotFound {
            what: format!("entry {sequence} of log {log_id}"),
        };
        let log_no = self.log_no(log_id).await?.ok_or_else(|| StoreError::NotFound {
            what: format!("log {log_id}"),
        })?;
        let sql =
            format!("{ENTRY_SELECT} WHERE e.log_no = $1 AND e.sequence >= $2 AND e.sequence < $3 ORDER BY e.sequence");
        let mut entries = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0).min(1 << 16));
        // The next sequence due: rows come in sequence order, one per
        // sequence, so the first one past it shows which entry is missing.
        let mut expected = lo;
        while expected < hi {
            let end = hi.min(expected + ENTRY_ROWS_PER_READ);
            let rows = on_pool!(self, p => {
                let rows = sqlx::query(&sql).bind(log_no).bind(expected).bind(end).fetch_all(p).await.map_err(db_err)?;
                rows.iter()
                    .map(|row| <EntryRow as sqlx::FromRow<_>>::from_row(row).map_err(db_err))
                    .collect::<Result<Vec<EntryRow>>>()?
            });
            for row in rows {
                if row.sequence() != expected {
                    return Err(missing(expected));
                }
                expected += 1;
                entries.push(row.into_named_entry()?);
            }
            if expected != end {
                return Err(missing(expected));
            }
        }
        Ok(entries)
    }

    async fn tree_nodes(&self, log_id: &str, wanted: &[(u32, u64)]) -> Result<Vec<TreeNode>> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let Some(log_no) = self.log_no(log_id).await? else {
            return Err(StoreError::NotFound {
                what: format!("log {log_id}"),
            });
        };
        let keys = wanted
            .iter()
            .map(|&(level, index)| Ok((i64::from(level), to_i64(index, "tree node index")?)))
            .collect::<Result<Vec<_>>>()?;
        let mut found = Vec::with_capacity(keys.len());
        // A proof asks for a few dozen nodes; the bound keeps any one statement small.
        for chunk in keys.chunks(TREE_NODES_PER_QUERY) {
            // A join from the wanted keys, so each is one primary-key lookup:
            // as `level = ? AND idx = ? OR ...`, SQLite without statistics
            // scanned every node of the log (5 times slower at 3 million
            // entries than at 300,000).
            let rows = on_pool!(self, p => {
                let mut qb = QueryBuilder::new("WITH w (level, idx) AS (");
                qb.push_values(chunk, |mut b, (level, index)| {
                    b.push_bind(*level).push_bind(*index);
                });
                qb.push(
                    ") SELECT CAST(n.level AS BIGINT), n.idx, n.hash FROM w \
                     JOIN audit_tree_nodes n ON n.log_no = ",
                )
                .push_bind(log_no)
                .push(" AND n.level = w.level AND n.idx = w.idx");
                qb.build_query_as::<(i64, i64, Vec<u8>)>().fetch_all(p).await
            })
            .map_err(db_err)?;
            for (level, index, hash) in rows {
                found.push(TreeNode {
                    level: u32::try_from(level)
                        .map_err(|_| StoreError::Corrupt(format!("audit_tree_nodes.level {level} out of range")))?,
                    index: to_u64(index, "audit_tree_nodes.idx")?,
                    hash: hash.try_into().map_err(|h: Vec<u8>| {
                        StoreError::Corrupt(format!("audit_tree_nodes.hash has {} bytes, not 32", h.len()))
                    })?,
                });
            }
        }
        Ok(found)
    }

    async fn tree_node_count(&self, log_id: &str) -> Result<u64> {
        let Some(log_no) = self.log_no(log_id).await? else {
            return Err(StoreError::NotFound {
                what: format!("log {log_id}"),
            });
        };
        let sql = "SELECT COUNT(*) FROM audit_tree_nodes WHERE log_no = $1";
        let count =
            on_pool!(self, p => sqlx::query_scalar::<_, i64>(sql).bind(log_no).fetch_one(p).await).map_err(db_err)?;
        to_u64(count, "tree node count")
    }

    async fn put_tree_nodes(&self, log_id: &str, nodes: &[TreeNode]) -> Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let Some(log_no) = self.log_no(log_id).await? else {
            return Err(StoreError::NotFound {
                what: format!("log {log_id}"),
            });
        };
        let nodes = node_inserts(nodes)?;
        on_audit_writer!(self, p => {
            let mut tx = begin_write(p).await?;
            for chunk in nodes.chunks(TREE_NODES_PER_QUERY) {
                let mut qb = QueryBuilder::new("");
                push_node_insert(&mut qb, log_no, chunk);
                qb.push("TRUE ON CONFLICT (log_no, level, idx) DO UPDATE SET hash = excluded.hash");
                qb.build().execute(&mut *tx).await.map_err(db_err)?;
            }
            tx.commit().await.map_err(db_err)
        })
    }

    async fn query_entries(&self, q: &EntryQuery) -> Result<Vec<StoredEntry>> {
        let from = to_i64(q.from_sequence, "sequence")?;
        let limit = if q.limit == 0 { NO_LIMIT } else { i64::from(q.limit) };
        let Some(log_no) = self.log_no(&q.log_id).await? else {
            return Err(StoreError::NotFound {
                what: format!("log {}", q.log_id),
            });
        };
        let rows = on_pool!(self, p => {
            let mut qb = entry_query(q, log_no, from, limit);
            qb.build_query_as::<EntryRow>().fetch_all(p).await
        })
        .map_err(db_err)?;
        rows.into_iter().map(EntryRow::into_entry).collect()
    }

    async fn subject_entries(
        &self,
        subject_hash: &str,
        since: Option<OffsetDateTime>,
        after: Option<&HistoryCursor>,
        limit: u32,
    ) -> Result<Vec<StoredEntry>> {
        // Stored as bytes: a value that is not a hash matches nothing.
        let Ok(subject_hash) = hex::decode(subject_hash) else {
            return Ok(Vec::new());
        };
        if subject_hash.is_empty() {
            return Ok(Vec::new());
        }
        let sql = match self.pool {
            Pool::Sqlite(_) => subjects::history_query(),
            Pool::Postgres(_) => subject_query(),
        };
        let since = since.map_or(i64::MIN, to_us);
        let limit = if limit == 0 { NO_LIMIT } else { i64::from(limit) };
        // Without a cursor, one past every entry: no time reaches i64::MAX µs.
        let (after_us, after_log, after_sequence) = match after {
            Some(c) => (to_us(c.time), c.log_id.as_str(), to_i64(c.sequence, "history cursor")?),
            None => (i64::MAX, "", i64::MAX),
        };
        let rows = on_pool!(self, p => sqlx::query_as::<_, EntryRow>(&sql)
            .bind(subject_hash).bind(since).bind(limit).bind(after_us).bind(after_log).bind(after_sequence)
            .fetch_all(p).await)
        .map_err(db_err)?;
        rows.into_iter().map(EntryRow::into_entry).collect()
    }

    async fn close(&self) {
        let tasks = match self.background.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for task in tasks {
            task.abort();
            // Aborted is what is expected; a panic has been reported already.
            let _ = task.await;
        }
        // Readers first, so that none holds the WAL while it is copied back.
        on_pool!(self, p => p.close().await);
        if let Pool::Sqlite(writer) = &self.audit_writer {
            // The last connection to close copies the WAL back into the
            // database, holding its lock, possibly after close() returned:
            // do it here, where the caller waits for it, and empty the WAL, so
            // that a stopped broker's database is its one file (a backup
            // copied over it cannot meet an old WAL).
            match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(writer)
                .await
            {
                Ok((0, _, _)) => {}
                Ok((_, frames, copied)) => tracing::warn!(
                    frames,
                    copied,
                    "the WAL could not be emptied before closing the database (a reader held it); \
                     it is copied back at the next start"
                ),
                Err(e) => {
                    tracing::warn!(error = %db_err(e), "the WAL could not be copied back before closing the database")
                }
            }
        }
        on_audit_writer!(self, p => p.close().await);
    }

    async fn claim_subject_key(&self, fingerprint: &str) -> Result<String> {
        let claim = "INSERT INTO federation_settings (name, value) VALUES ('subject_key_fingerprint', $1) \
                     ON CONFLICT (name) DO NOTHING";
        let read = "SELECT value FROM federation_settings WHERE name = 'subject_key_fingerprint'";
        on_pool!(self, p => {
            sqlx::query(claim).bind(fingerprint).execute(p).await.map_err(db_err)?;
            sqlx::query_scalar::<_, String>(read).fetch_one(p).await.map_err(db_err)
        })
    }

    async fn check_subject_index(&self, log_id: &str) -> Result<()> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Ok(());
        };
        let log_no = self.log_no(log_id).await?.ok_or_else(|| StoreError::NotFound {
            what: format!("log {log_id}"),
        })?;
        subjects::verify(pool, log_no, log_id).await
    }

    async fn insert_tree_head(&self, h: &StoredTreeHead) -> Result<()> {
        let size = to_i64(h.tree_size, "tree size")?;
        let timestamp = to_i64(h.timestamp_ms, "tree head timestamp")?;
        let sql = format!(
            "INSERT INTO tree_heads ({TREE_HEAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (log_id, tree_size) DO UPDATE SET timestamp_ms = excluded.timestamp_ms, signature = excluded.signature \
             WHERE tree_heads.root_hash = excluded.root_hash AND tree_heads.timestamp_ms < excluded.timestamp_ms"
        );
        let changed = on_audit_writer!(self, p => sqlx::query(&sql)
            .bind(&h.log_id).bind(size).bind(&h.root_hash[..]).bind(timestamp).bind(&h.signature)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(|e| match db_err(e) {
            StoreError::NotFound { .. } => StoreError::NotFound {
                what: format!("log {}", h.log_id),
            },
            other => other,
        })?;
        if changed > 0 {
            // A head in a file the next start will not open is not pinned either.
            return self.files_in_place();
        }
        let sql = "SELECT root_hash FROM tree_heads WHERE log_id = $1 AND tree_size = $2";
        let root = on_pool!(self, p => sqlx::query_scalar::<_, Vec<u8>>(sql).bind(&h.log_id).bind(size).fetch_optional(p).await)
            .map_err(db_err)?;
        match root {
            // Same root, not newer than the stored head: nothing to do.
            Some(root) if root == h.root_hash => Ok(()),
            _ => Err(StoreError::AlreadyExists {
                what: format!(
                    "a tree head of size {} with a different root for log {}",
                    h.tree_size, h.log_id
                ),
            }),
        }
    }

    async fn latest_tree_head(&self, log_id: &str) -> Result<Option<StoredTreeHead>> {
        let sql =
            format!("SELECT {TREE_HEAD_COLUMNS} FROM tree_heads WHERE log_id = $1 ORDER BY tree_size DESC LIMIT 1");
        let row = on_pool!(self, p => sqlx::query_as::<_, TreeHeadRow>(&sql).bind(log_id).fetch_optional(p).await)
            .map_err(db_err)?;
        row.map(TreeHeadRow::into_head).transpose()
    }

    async fn take_rate_tokens(&self, grant_id: &str, per_minute: u32, wanted: u32) -> Result<Option<RateTake>> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        if per_minute == 0 || wanted == 0 {
            return Err(StoreError::Invalid(format!(
                "a take of {wanted} tokens from a bucket of {per_minute} per minute"
            )));
        }
        let (per_minute, wanted) = (i64::from(per_minute), i64::from(wanted));
        let take = || {
            sqlx::query_as::<_, (i64, i64)>(TAKE_RATE_TOKENS)
                .bind(grant_id)
                .bind(per_minute)
                .bind(wanted)
                .fetch_optional(pool)
        };
        let mut taken = take().await.map_err(db_err)?;
        if taken.is_none() {
            // First use, here or on any replica: the bucket starts full.
            sqlx::query(
                "INSERT INTO grant_rate_buckets (grant_id, units, updated_us) \
                 VALUES ($1, $2 * 60000000, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) \
                 ON CONFLICT (grant_id) DO NOTHING",
            )
            .bind(grant_id)
            .bind(per_minute)
            .execute(pool)
            .await
            .map_err(db_err)?;
            taken = take().await.map_err(db_err)?;
        }
        let (took, left) = taken.ok_or_else(|| StoreError::NotFound {
            what: format!("the rate bucket of grant {grant_id}"),
        })?;
        if took > 0 {
            return Ok(Some(RateTake::Taken(u32::try_from(took).unwrap_or(u32::MAX))));
        }
        let missing = (RATE_UNITS_PER_TOKEN - left).max(1);
        let micros = (missing + per_minute - 1) / per_minute;
        Ok(Some(RateTake::Empty(Duration::from_micros(
            u64::try_from(micros).unwrap_or(1),
        ))))
    }

    async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ())).map_err(db_err)
    }
}

/// A rate bucket's units per token: microseconds per minute, so that a
/// bucket of N per minute refills N units per microsecond.
const RATE_UNITS_PER_TOKEN: i64 = 60_000_000;

/// Refills a grant's bucket to the database's clock and takes up to `$3`
/// tokens of `$2` per minute, in one statement: the row lock serialises
/// replicas, and a statement that waited for it works on the row as the
/// other left it. Returns the tokens taken and the units left. Elapsed time
/// is capped at a minute (a bucket is full by then), so nothing overflows.
const TAKE_RATE_TOKENS: &str = "\
    WITH t AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_us), \
    b AS ( \
        SELECT g.grant_id, GREATEST(g.updated_us, t.now_us) AS at, \
               LEAST($2 * 60000000, g.units + LEAST(GREATEST(t.now_us - g.updated_us, 0), 60000000) * $2) AS avail \
        FROM grant_rate_buckets g CROSS JOIN t WHERE g.grant_id = $1 FOR UPDATE OF g \
    ), \
    k AS (SELECT grant_id, at, avail, LEAST($3, avail / 60000000) AS took FROM b) \
    UPDATE grant_rate_buckets g SET units = k.avail - k.took * 60000000, updated_us = k.at \
    FROM k WHERE g.grant_id = k.grant_id \
    RETURNING k.took, g.units";

/// Maps a unique violation to `AlreadyExists { what }`, anything else as [`db_err`].
fn unique(what: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match db_err(e) {
        StoreError::AlreadyExists { .. } => StoreError::AlreadyExists { what: what() },
        other => other,
    }
}

/// Classifies a driver error so callers can fail closed on `Unavailable`.
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Database(d) => database_error(d.as_ref()),
        E::Io(e) => StoreError::Unavailable(format!("i/o error talking to the database: {e}")),
        E::Tls(e) => StoreError::Unavailable(format!("tls error talking to the database: {e}")),
        E::Protocol(m) => StoreError::Unavailable(format!("database protocol error: {m}")),
        E::PoolTimedOut => StoreError::Unavailable("no database connection became available in time".into()),
        E::PoolClosed => StoreError::Unavailable("the database connection pool is closed".into()),
        E::WorkerCrashed => StoreError::Unavailable("the sqlite worker thread stopped".into()),
        E::Configuration(e) => StoreError::Config(e.to_string()),
        E::InvalidArgument(m) => StoreError::Config(m),
        E::Encode(e) => StoreError::Config(format!("cannot encode a value for the database: {e}")),
        E::RowNotFound => StoreError::NotFound { what: "row".into() },
        E::Migrate(m) => migrate_err(*m),
        e @ (E::TypeNotFound { .. }
        | E::ColumnIndexOutOfBounds { .. }
        | E::ColumnNotFound(_)
        | E::ColumnDecode { .. }
        | E::Decode(_)) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(format!("database error: {other}")),
    }
}

fn database_error(d: &dyn DatabaseError) -> StoreError {
    match d.kind() {
        ErrorKind::UniqueViolation => {
            return StoreError::AlreadyExists {
                what: "a row with this key".into(),
            };
        }
        ErrorKind::ForeignKeyViolation => {
            return StoreError::NotFound {
                what: "the referenced row".into(),
            };
        }
        _ => {}
    }
    let message = d.message();
    if let Some(e) = d.try_downcast_ref::<SqliteError>() {
        let code = e.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(1);
        // Primary result codes (the low byte of the extended code).
        return match code & 0xff {
            // PERM, BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, FULL, CANTOPEN, PROTOCOL
            3 | 5 | 6 | 7 | 8 | 9 | 10 | 13 | 14 | 15 => StoreError::Unavailable(format!("sqlite: {message}")),
            _ => StoreError::Corrupt(format!("sqlite: {message}")),
        };
    }
    let state = d
        .try_downcast_ref::<PgDatabaseError>()
        .map(|e| e.code().to_owned())
        .unwrap_or_default();
    match state.get(..2).unwrap_or_default() {
        // connection exception, insufficient resources (disk full, too many
        // connections), operator intervention (shutdown), system error (i/o),
        // transaction rollback (serialization, deadlock): retryable.
        "08" | "53" | "57" | "58" | "40" => StoreError::Unavailable(format!("postgres {state}: {message}")),
        _ if state == "25006" => StoreError::Unavailable(format!("postgres {state}: {message}")),
        // authorization, unknown database or role
        "28" | "3D" => StoreError::Config(format!("postgres {state}: {message}")),
        _ => StoreError::Corrupt(format!("postgres {state}: {message}")),
    }
}

/// A PostgreSQL session holding the advisory lock that claims a log.
pub(crate) struct PgClaim {
    pool: PgPool,
    key: i32,
    /// Out of the pool for good, since the lock lives as long as this
    /// session: one connection beyond `database_max_connections`.
    session: Option<sqlx::PgConnection>,
}

impl PgClaim {
    /// Takes the lock on a session of its own: `None` when another holds it.
    async fn take(mut self) -> Result<Option<LogClaim>> {
        let mut session = self.pool.acquire().await.map_err(db_err)?.detach();
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LOG_LOCK_CLASS)
            .bind(self.key)
            .fetch_one(&mut session)
            .await
            .map_err(db_err)?;
        if !taken {
            return Ok(None);
        }
        self.session = Some(session);
        Ok(Some(LogClaim {
            held: crate::Held::Postgres(self),
        }))
    }

    /// See [`LogClaim::still_held`].
    pub(crate) async fn still_held(&mut self) -> Result<bool> {
        // The session answers only while it lives, and the lock with it.
        if let Some(session) = self.session.as_mut()
            && sqlx::query("SELECT 1").execute(&mut *session).await.is_ok()
        {
            return Ok(true);
        }
        self.session = None;
        let again = PgClaim {
            pool: self.pool.clone(),
            key: self.key,
            session: None,
        };
        match again.take().await? {
            Some(LogClaim {
                held: crate::Held::Postgres(taken),
            }) => {
                self.session = taken.session;
                tracing::warn!("the session claiming this broker's audit log ended; the claim was taken again");
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// The first key of the advisory locks claiming audit logs ("LTLG"); the
/// two-key form does not meet the migrator's one-key lock.
const LOG_LOCK_CLASS: i32 = 0x4c54_4c47;

/// The second key of a log's advisory lock: FNV-1a of its id, folded to 32
/// bits (two logs sharing one would only make the second broker's start
/// refused, saying why).
fn log_lock_key(log_id: &str) -> i32 {
    let hash = log_id
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    i32::from_ne_bytes(hash.to_ne_bytes())
}

fn migrate_err(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => db_err(e),
        // Not corruption: a rolling upgrade ran ahead of this replica, and
        // restoring a backup would be the wrong cure.
        MigrateError::VersionMissing(version) => StoreError::Config(format!(
            "this database was migrated by a newer lienthong (migration {version}, which this binary does not \
             have); run that version or a newer one against it"
        )),
        // Applied migrations different from this binary's.
        other => StoreError::Corrupt(format!("database schema: {other}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lienthong_core::audit::{EntryKind, Outcome};

    fn entry(log: &str, sequence: u64) -> StoredEntry {
        StoredEntry {
            log_id: log.into(),
            sequence,
            leaf_hash: [0; 32],
            leaf: String::new(),
            time: OffsetDateTime::UNIX_EPOCH,
            kind: EntryKind::Access,
            actor: String::new(),
            provider: String::new(),
            record_type: String::new(),
            purpose: String::new(),
            outcome: Outcome::Allowed,
            subject_hash: String::new(),
        }
    }

    #[test]
    fn a_batch_must_be_consecutive_per_log() {
        let batch = [entry("a", 3), entry("b", 0), entry("a", 4)];
        let runs = plan_append(&batch).unwrap();
        assert_eq!(
            runs.iter().map(|r| (r.log_id, r.first, r.next)).collect::<Vec<_>>(),
            [("a", 3, 5), ("b", 0, 1)]
        );
        assert!(matches!(
            plan_append(&[entry("a", 3), entry("a", 3)]),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            plan_append(&[entry("a", 3), entry("a", 5)]),
            Err(StoreError::SequenceGap {
                expected: 4,
                found: 5,
                ..
            })
        ));
    }

    #[test]
    fn pool_timeouts_and_io_errors_are_unavailable() {
        assert!(matches!(db_err(sqlx::Error::PoolTimedOut), StoreError::Unavailable(_)));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(db_err(sqlx::Error::Io(io)), StoreError::Unavailable(_)));
        assert!(matches!(
            db_err(sqlx::Error::ColumnNotFound("x".into())),
            StoreError::Corrupt(_)
        ));
    }

    /// The index SQLite picks for the audit query of `q`, on an empty database
    /// with the embedded migrations applied.
    async fn index_used(pool: &SqlitePool, q: &EntryQuery) -> String {
        let qb = entry_query::<Sqlite>(q, 1, 0, 100);
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", qb.sql()))
            .fetch_all(pool)
            .await
            .unwrap();
        plan.into_iter()
            .map(|(_, _, _, detail)| detail)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A PostgreSQL the broker cannot reach at start is named, with the cause,
    /// and without the password of the URL.
    #[tokio::test]
    async fn an_unreachable_postgres_is_named_with_its_cause() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let options = StoreOptions {
            url: format!("postgres://auditor:s3cret-pw@127.0.0.1:{port}/lienthong?sslmode=disable"),
            max_connections: 2,
            acquire_timeout: Duration::from_millis(500),
            allow_unverified_postgres: false,
        };
        let Err(e) = crate::open(&options).await else {
            panic!("nothing listens on port {port}")
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}")) && text.contains("refused"),
            "{text}"
        );
        assert!(!text.contains("s3cret-pw"), "{text}");
    }

    /// A database file or WAL moved or deleted under the store fails every
    /// append after it (the rows go to a file no start will open), and
    /// appends go on once the file is back where it was.
    #[tokio::test]
    async fn appends_fail_while_the_database_file_or_its_wal_is_not_where_it_was_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lienthong.db");
        let options = StoreOptions {
            url: String::new(),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        };
        let store = sqlite_store(path.to_str().unwrap(), &options).await.unwrap();
        let log = LogInfo {
            log_id: "log-a".into(),
            public_key: vec![1; 32],
            created_at: OffsetDateTime::UNIX_EPOCH,
        };
        store.ensure_log(&log).await.unwrap();
        store.append_entries_and_nodes(&[entry("log-a", 0)], &[]).await.unwrap();

        for moved in ["lienthong.db", "lienthong.db-wal"] {
            let (at, away) = (dir.path().join(moved), dir.path().join(format!("{moved}.away")));
            std::fs::rename(&at, &away).unwrap();
            let size = store.log_size("log-a").await.unwrap();
            let Err(StoreError::Unavailable(why)) = store.append_entries_and_nodes(&[entry("log-a", size)], &[]).await
            else {
                panic!("an append into {moved}, moved away, must fail");
            };
            assert!(
                why.contains(&at.display().to_string()) && why.contains("put that file back"),
                "{why}"
            );
            std::fs::rename(&away, &at).unwrap();
            let size = store.log_size("log-a").await.unwrap();
            store
                .append_entries_and_nodes(&[entry("log-a", size)], &[])
                .await
                .expect("the file is back: appends go on");
        }

        // Deleted, with nothing at its path any more: a new start would
        // create an empty database there.
        std::fs::remove_file(&path).unwrap();
        let size = store.log_size("log-a").await.unwrap();
        assert!(matches!(
            store.append_entries_and_nodes(&[entry("log-a", size)], &[]).await,
            Err(StoreError::Unavailable(_))
        ));
        let head = StoredTreeHead {
            log_id: "log-a".into(),
            tree_size: 1,
            root_hash: [0; 32],
            timestamp_ms: 1,
            signature: vec![0; 64],
        };
        assert!(matches!(
            store.insert_tree_head(&head).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// The pooled connections' page caches are bounded tighter than the
    /// audit writer's, which commits into the same pages over and over.
    #[tokio::test]
    async fn pooled_readers_keep_a_small_page_cache_and_the_writer_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lienthong.db");
        let options = StoreOptions {
            url: String::new(),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        };
        let store = sqlite_store(path.to_str().unwrap(), &options).await.unwrap();
        let cache = |pool: &Pool| {
            let Pool::Sqlite(pool) = pool else {
                unreachable!("a SQLite store")
            };
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("PRAGMA cache_size")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(cache(&store.pool).await.to_string(), READER_CACHE);
        assert_eq!(cache(&store.audit_writer).await, -2000, "SQLite's default");
    }

    /// Auditors page through denials, failures and administrative entries of
    /// a log of millions of allowed lookups: those queries must be index
    /// searches, not scans of the log.
    #[tokio::test]
    async fn audit_queries_search_an_index() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::from_str("sqlite::memory:").unwrap())
            .await
            .unwrap();
        SQLITE_MIGRATOR.run(&pool).await.unwrap();
        let log = |f: &dyn Fn(&mut EntryQuery)| {
            let mut q = EntryQuery {
                log_id: "log".into(),
                ..EntryQuery::default()
            };
            f(&mut q);
            q
        };
        let cases: [(EntryQuery, &str); 7] = [
            (log(&|_| {}), "sqlite_autoindex_audit_entries_1"),
            (log(&|q| q.outcome = Some(Outcome::Denied)), "audit_entries_not_allowed"),
            (log(&|q| q.outcome = Some(Outcome::Failed)), "audit_entries_not_allowed"),
            (log(&|q| q.kind = Some(EntryKind::Admin)), "audit_entries_not_access"),
            (
                log(&|q| q.actor = Some("hanoi-judicial-office".into())),
                "audit_entries_by_actor",
            ),
            (
                log(&|q| q.provider = Some("civil-status".into())),
                "audit_entries_by_provider",
            ),
            (
                log(&|q| q.record_type = Some("civil_status.birth_record".into())),
                "audit_entries_by_record_type",
            ),
        ];
        for (q, index) in cases {
            let plan = index_used(&pool, &q).await;
            assert!(
                plan.contains(&format!("SEARCH e USING INDEX {index}"))
                    && !plan.contains("SCAN")
                    && !plan.contains("TEMP B-TREE"),
                "{q:?}: expected a search of {index} in sequence order, planned {plan}"
            );
        }
        // A citizen's history: one search per live run (a time range: a page
        // of it starts at its cursor), the tail of each log
        // by its primary key, and each entry found by its primary key.
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", subjects::history_query()))
                .fetch_all(&pool)
                .await
                .unwrap();
        let plan = plan.into_iter().map(|(_, _, _, d)| d).collect::<Vec<_>>();
        let scans: Vec<&String> = plan
            .iter()
            .filter(|d| d.starts_with("SCAN") && !matches!(d.as_str(), "SCAN r" | "SCAN g" | "SCAN hit"))
            .collect();
        let plan = plan.join("; ");
        assert!(
            scans.is_empty()
                && plan.contains("SEARCH p USING PRIMARY KEY (run=? AND subject_hash=? AND time_us>? AND time_us<?)")
                && plan.contains("SEARCH t USING INDEX sqlite_autoindex_audit_entries_1 (log_no=? AND sequence>?)")
                && plan.contains("SEARCH e USING INDEX sqlite_autoindex_audit_entries_1 (log_no=? AND sequence=?)"),
            "subject history planned {plan}"
        );
    }
}
