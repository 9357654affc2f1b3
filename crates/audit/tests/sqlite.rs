//! The writer against the real embedded SQLite store: durability across a
//! restart, group commit, proofs and an offline-verified export.
#![allow(clippy::unwrap_used)]

mod common;

use common::event;
use lienthong_audit::keys::{PINNED_HEAD_FILE, SIGNING_KEY_FILE, SUBJECT_KEY_FILE};
use lienthong_audit::merkle;
use lienthong_audit::{
    AuditConfig, AuditError, AuditLog, ExportLine, HistoryCheck, LogKeys, SignedTreeHead, verify_export,
    verify_tree_head,
};
use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_store::{EntryQuery, Store, StoreOptions};
use sqlx::SqlitePool;
use sqlx::sqlite::SqlitePoolOptions;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn db_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("lienthong.db").display())
}

async fn open_store(dir: &Path) -> Arc<dyn Store> {
    lienthong_store::open(&StoreOptions {
        url: db_url(dir),
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    })
    .await
    .unwrap()
}

fn config() -> AuditConfig {
    AuditConfig {
        sign_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_survives_restart_and_verifies_offline() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let log = AuditLog::open(store.clone(), LogKeys::load_or_create(dir.path()).unwrap(), config())
        .await
        .unwrap();
    let log_id = log.log_id().to_string();

    let tasks: Vec<_> = (0..300u64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(event(i)).await.unwrap().sequence })
        })
        .collect();
    let mut sequences = BTreeSet::new();
    for task in tasks {
        sequences.insert(task.await.unwrap());
    }
    assert_eq!(sequences, (0..300).collect());
    assert!(
        log.total_batches() < 300,
        "appends share transactions: {} commits",
        log.total_batches()
    );
    let first = log.shutdown().await.unwrap().unwrap();
    assert_eq!(first.tree_size, 300);
    drop(log);
    drop(store);

    // Restart: same key files, same database.
    let store = open_store(dir.path()).await;
    let log = AuditLog::open(store.clone(), LogKeys::load_or_create(dir.path()).unwrap(), config())
        .await
        .unwrap();
    assert_eq!(log.log_id(), log_id);
    assert_eq!(log.size(), 300);
    assert_eq!(log.latest_tree_head(&log_id).await.unwrap(), first);
    let receipts = log.append_many((300..310).map(event).collect()).await.unwrap();
    assert_eq!(receipts.first().unwrap().sequence, 300);
    let second = log.sign_now().await.unwrap();
    verify_tree_head(&second, &log.keys().public_key()).unwrap();

    let (leaf, proof) = log.inclusion_proof(&log_id, 305, second.tree_size).await.unwrap();
    assert_eq!(leaf, receipts[5].leaf_hash);
    assert!(merkle::verify_inclusion(
        305,
        second.tree_size,
        &leaf,
        &proof,
        &second.root_hash
    ));
    let consistency = log
        .consistency_proof(&log_id, first.tree_size, second.tree_size)
        .await
        .unwrap();
    assert!(merkle::verify_consistency(
        300,
        310,
        &first.root_hash,
        &second.root_hash,
        &consistency
    ));

    let rows = store
        .query_entries(&EntryQuery {
            log_id: log_id.clone(),
            ..EntryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 310);
    let report = verify_export(
        rows.iter().map(ExportLine::from_entry),
        &second,
        &log.keys().public_key(),
        Some(&first),
        Some(&consistency),
    )
    .unwrap();
    assert_eq!(report.entries, 310);
    assert_eq!(report.consistent_with_previous, Some(300));

    // A second replica's log in the same database: each replica serves the
    // other's heads and proofs.
    let replica = AuditLog::open(store.clone(), LogKeys::generate().unwrap(), config())
        .await
        .unwrap();
    let other_id = replica.log_id().to_string();
    assert_ne!(other_id, log_id);
    let theirs = replica.append(event(1000)).await.unwrap();
    replica.append(event(1001)).await.unwrap();
    let their_head = replica.shutdown().await.unwrap().unwrap();
    assert_eq!(log.latest_tree_head(&other_id).await.unwrap(), their_head);
    let (leaf, proof) = log.inclusion_proof(&other_id, theirs.sequence, 2).await.unwrap();
    assert!(merkle::verify_inclusion(
        theirs.sequence,
        2,
        &leaf,
        &proof,
        &their_head.root_hash
    ));
    assert_eq!(log.size(), 310, "the other log does not move ours");

    let unknown = "f".repeat(64);
    assert!(matches!(
        log.latest_tree_head(&unknown).await,
        Err(AuditError::NotFound(_))
    ));
    assert!(matches!(
        log.inclusion_proof(&unknown, 0, 1).await,
        Err(AuditError::NotFound(_))
    ));
    log.shutdown().await.unwrap();
}

/// A connection of its own to the database in `dir`, as whoever alters
/// stored rows behind the broker's back would use.
async fn raw(dir: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&db_url(dir))
        .await
        .unwrap()
}

/// Runs one statement through [`raw`]; returns the rows it changed.
async fn alter(dir: &Path, sql: &str) -> u64 {
    let pool = raw(dir).await;
    let changed = sqlx::query(sql).execute(&pool).await.unwrap().rows_affected();
    pool.close().await;
    changed
}

/// A log of `n` entries on SQLite in `dir` (its tree nodes stored as the
/// writer stores them), closed with a signed head covering them all.
async fn closed_sqlite_log(dir: &Path, n: u64) {
    let log = AuditLog::open(open_store(dir).await, LogKeys::load_or_create(dir).unwrap(), config())
        .await
        .unwrap();
    let mut next = 0;
    while next < n {
        let to = n.min(next + 500);
        log.append_many((next..to).map(event).collect()).await.unwrap();
        next = to;
    }
    assert_eq!(log.shutdown().await.unwrap().unwrap().tree_size, n);
}

/// Reopens the log in `dir` on a fresh store and waits for its history
/// check to end: a check that never ends fails the test instead of hanging.
async fn reopen_and_check(dir: &Path) -> (Arc<AuditLog>, HistoryCheck) {
    let log = AuditLog::open(open_store(dir).await, LogKeys::load_or_create(dir).unwrap(), config())
        .await
        .unwrap();
    let check = tokio::time::timeout(Duration::from_secs(30), log.history_checked())
        .await
        .expect("the history check did not end within 30 s");
    (log, check)
}

/// The reason of a failed check, which must name `entry` and mention `what`;
/// the log then refuses new entries.
async fn assert_failed_naming(log: &AuditLog, check: HistoryCheck, entry: u64, what: &str) {
    let HistoryCheck::Failed(why) = check else {
        panic!("the history check passed an altered log: {check:?}");
    };
    assert!(why.contains(&format!("entry {entry}")), "names the entry: {why}");
    assert!(why.contains(what), "says {what:?}: {why}");
    assert!(why.contains(log.log_id()), "names the log: {why}");
    let size = log.size();
    let refused = log.append(event(1_000_000)).await.unwrap_err();
    assert!(matches!(refused, AuditError::Corrupt(_)), "{refused:?}");
    assert_eq!(log.size(), size, "nothing appended on top of the finding");
}

/// Alters one row with `sql`, reopens the log and expects its history check
/// to fail naming `entry` and `what`.
async fn assert_alteration_found(dir: &Path, sql: &str, entry: u64, what: &str) {
    assert_eq!(alter(dir, sql).await, 1, "{sql}");
    let (log, check) = reopen_and_check(dir).await;
    assert_failed_naming(&log, check, entry, what).await;
}

/// A row deleted below the signed head is not an outage to wait out: the
/// check ends failed (the broker reports it and stops releasing data)
/// instead of retrying the read for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_ends_the_history_check_failed_and_the_log_refuses_entries() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    // Far from the right edge, which the opening itself reads.
    assert_alteration_found(
        dir.path(),
        "DELETE FROM audit_entries WHERE sequence = 1234",
        1234,
        "not found",
    )
    .await;
}

/// A row deleted at the right edge, which the opening itself reads, stops
/// the opening, saying the history was cut, not only that rows are "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_where_the_opening_reads_is_refused_as_a_deletion() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    assert_eq!(
        alter(dir.path(), "DELETE FROM audit_entries WHERE sequence = 2999").await,
        1
    );
    let err = AuditLog::open(
        open_store(dir.path()).await,
        LogKeys::load_or_create(dir.path()).unwrap(),
        config(),
    )
    .await
    .unwrap_err();
    let AuditError::Corrupt(why) = &err else {
        panic!("{err:?}");
    };
    // The entry itself, not the block of leaves the opening read.
    assert!(why.contains("entry 2999 of log"), "{why}");
    assert!(why.ends_with("entries were deleted"), "{why}");
}

/// A leaf rewritten under its old leaf hash still hashes to the signed root
/// through that hash: the check hashes the leaf itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_altered_under_its_stored_hash_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET leaf = replace(leaf, 'income-tax-assessment', 'criminal-investigation') \
               WHERE sequence = 777";
    assert_alteration_found(dir.path(), sql, 777, "does not hash to its stored leaf hash").await;
}

/// The purpose an auditor filters on and sees is the one of the leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_purpose_column_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET purpose = 'statistics' WHERE sequence = 2001";
    assert_alteration_found(dir.path(), sql, 2001, "purpose is \"statistics\"").await;
}

/// A subject hash rewritten (here to another citizen's) would hide the
/// access from its citizen's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_subject_hash_column_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET subject_hash = (SELECT subject_hash FROM audit_entries WHERE sequence = 9) \
               WHERE sequence = 10";
    assert_alteration_found(dir.path(), sql, 10, "subject_hash").await;
    // Set to nothing, which hides it from every history query.
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 600).await;
    assert_alteration_found(
        dir.path(),
        "UPDATE audit_entries SET subject_hash = NULL WHERE sequence = 300",
        300,
        "subject_hash",
    )
    .await;
}

/// A posting deleted from the runs citizens' histories are read through
/// hides an access as surely as an altered subject column: the check finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posting_deleted_from_the_subject_runs_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 9000).await;
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_eq!(check, HistoryCheck::Passed);
    // The runs are made behind the appends: wait for the two of 4,096 entries.
    let pool = raw(dir.path()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_subject_runs WHERE state = 'live'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if runs >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no subject runs made within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    log.shutdown().await.unwrap();
    assert_alteration_found(
        dir.path(),
        "DELETE FROM audit_subject_postings WHERE sequence = 5000",
        5000,
        "missing from run",
    )
    .await;
}

/// Deleting tree nodes makes the opening rehash the leaf hashes instead:
/// the leaves and columns are checked all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_without_tree_nodes_has_its_leaves_and_columns_checked_too() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    assert_eq!(
        alter(
            dir.path(),
            "UPDATE audit_entries SET actor = 'police' WHERE sequence = 5"
        )
        .await,
        1
    );
    assert!(alter(dir.path(), "DELETE FROM audit_tree_nodes").await > 0);
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 5, "actor is \"police\"").await;
}

/// An untouched log passes, whatever its entries hold: kinds and outcomes
/// of every sort, no subject, times finer than the column's microseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_log_passes_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(
        open_store(dir.path()).await,
        LogKeys::load_or_create(dir.path()).unwrap(),
        config(),
    )
    .await
    .unwrap();
    let events = (0..3000u64).map(|i| {
        let mut e = event(i);
        e.time += Duration::from_nanos(i * 7_919 % 1_000_000_000);
        e.kind = [EntryKind::Access, EntryKind::Admin, EntryKind::Authentication][(i % 3) as usize];
        e.outcome = [Outcome::Allowed, Outcome::Denied, Outcome::Failed, Outcome::Invalid][(i % 4) as usize];
        if i % 5 == 0 {
            e.subject_hash.clear();
        }
        e.reason = "provider.unavailable: \"civil-registry\" timed out \u{e9}".into();
        e
    });
    log.append_many(events.collect()).await.unwrap();
    log.shutdown().await.unwrap();
    drop(log);
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_eq!(check, HistoryCheck::Passed);
    assert_eq!(log.append(event(3000)).await.unwrap().sequence, 3000);
    log.shutdown().await.unwrap();
}

/// The head pinned beside the keys in `dir`.
fn pinned(dir: &Path) -> SignedTreeHead {
    serde_json::from_slice(&std::fs::read(dir.join(PINNED_HEAD_FILE)).unwrap()).unwrap()
}

/// The log in `dir`, opened as the broker opens it.
async fn open_dir(dir: &Path) -> Result<Arc<AuditLog>, AuditError> {
    AuditLog::open(open_store(dir).await, LogKeys::load_or_create(dir).unwrap(), config()).await
}

/// Appends entries `from..to` (made from those numbers) in batches.
async fn grow(log: &AuditLog, from: u64, to: u64) {
    let mut next = from;
    while next < to {
        let end = to.min(next + 500);
        log.append_many((next..end).map(event).collect()).await.unwrap();
        next = end;
    }
}

/// A consistent copy of the database in `dir`, taken now into a directory
/// of its own: what `sqlite3 lienthong.db ".backup"` makes.
async fn back_up(dir: &Path) -> tempfile::TempDir {
    let backup = tempfile::tempdir().unwrap();
    let copy = backup.path().join("lienthong.db");
    alter(dir, &format!("VACUUM INTO '{}'", copy.display())).await;
    backup
}

/// A new directory holding a copy of the database in `backup` and the data
/// directory files (keys and pin) of `data_dir`, as when only the database
/// is restored.
fn restore(backup: &Path, data_dir: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(backup.join("lienthong.db"), dir.path().join("lienthong.db")).unwrap();
    for file in [SIGNING_KEY_FILE, SUBJECT_KEY_FILE, PINNED_HEAD_FILE] {
        std::fs::copy(data_dir.join(file), dir.path().join(file)).unwrap();
    }
    dir
}

/// The newest head the database in `dir` holds for `log_id`.
async fn stored_head(dir: &Path, log_id: &str) -> Option<SignedTreeHead> {
    open_store(dir)
        .await
        .latest_tree_head(log_id)
        .await
        .unwrap()
        .map(SignedTreeHead::from)
}

/// The refusal of a rolled back or rewritten database, which must name the
/// log and the pin, say what to do, and say each of `needles`.
fn assert_rolled_back(err: AuditError, log_id: &str, dir: &Path, needles: &[&str]) {
    assert!(matches!(err, AuditError::RolledBack(_)), "{err:?}");
    let err = err.to_string();
    assert!(err.contains(log_id), "names the log: {err}");
    assert!(err.contains("rolled back or rewritten"), "{err}");
    assert!(
        err.contains(&dir.join(PINNED_HEAD_FILE).display().to_string()),
        "names the pin: {err}"
    );
    assert!(err.contains("backup taken at or after that head"), "{err}");
    assert!(err.contains(SIGNING_KEY_FILE) && err.contains("auditors"), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "says {needle:?}: {err}");
    }
}

/// A database restored from a backup older than the newest signed head,
/// beside the data directory that signed it, is refused: the broker would
/// otherwise sign a second history under the same log id. A backup taken
/// at or after that head opens; so does a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_an_older_backup_is_refused() {
    let live = tempfile::tempdir().unwrap();
    let log = open_dir(live.path()).await.unwrap();
    let log_id = log.log_id().to_string();
    grow(&log, 0, 300).await;
    assert_eq!(log.shutdown().await.unwrap().unwrap().tree_size, 300);
    drop(log);
    let old = back_up(live.path()).await;

    let log = open_dir(live.path()).await.unwrap();
    grow(&log, 300, 350).await;
    let newest = log.shutdown().await.unwrap().unwrap();
    assert_eq!(pinned(live.path()), newest);
    drop(log);

    let restored = restore(old.path(), live.path());
    let err = open_dir(restored.path()).await.unwrap_err();
    assert_rolled_back(
        err,
        &log_id,
        restored.path(),
        &["head of 350 entries", "covers only 300 entries"],
    );
    assert_eq!(
        stored_head(restored.path(), &log_id).await.unwrap().tree_size,
        300,
        "nothing was signed on top of the old copy"
    );
    assert_eq!(pinned(restored.path()), newest, "the pin stays");

    // A backup taken at the newest head: the log opens where it was.
    let current = back_up(live.path()).await;
    let restored = restore(current.path(), live.path());
    let log = open_dir(restored.path()).await.unwrap();
    assert_eq!((log.log_id(), log.size()), (log_id.as_str(), 350));
    log.shutdown().await.unwrap();
    drop(log);

    // No such backup: the key and the pin moved away start a new log.
    let restored = restore(old.path(), live.path());
    let kept = tempfile::tempdir().unwrap();
    for file in [SIGNING_KEY_FILE, PINNED_HEAD_FILE] {
        std::fs::rename(restored.path().join(file), kept.path().join(file)).unwrap();
    }
    let log = open_dir(restored.path()).await.unwrap();
    assert_ne!(log.log_id(), log_id);
    assert_eq!(log.size(), 0);
    log.shutdown().await.unwrap();
}

/// Signed heads deleted down to an older one are refused; so is the history
/// grown again differently on top of it (here by a broker that kept no pin),
/// which holds a head as large as the pinned one, with another root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_heads_and_a_history_grown_again_differently_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    let log_id = log.log_id().to_string();
    grow(&log, 0, 100).await;
    assert_eq!(log.sign_now().await.unwrap().tree_size, 100);
    grow(&log, 100, 200).await;
    let newest = log.shutdown().await.unwrap().unwrap();
    assert_eq!(newest.tree_size, 200);
    drop(log);

    // Heads only: the entries are all still there.
    assert_eq!(
        alter(dir.path(), "DELETE FROM tree_heads WHERE tree_size > 100").await,
        1
    );
    let err = open_dir(dir.path()).await.unwrap_err();
    assert_rolled_back(
        err,
        &log_id,
        dir.path(),
        &["head of 200 entries", "covers only 100 entries"],
    );

    // The entries after it too, the tree nodes over them and the log's size.
    assert_eq!(
        alter(dir.path(), "DELETE FROM audit_entries WHERE sequence >= 100").await,
        100
    );
    alter(dir.path(), "DELETE FROM audit_tree_nodes").await;
    assert_eq!(alter(dir.path(), "UPDATE audit_logs SET size = 100").await, 1);
    let err = open_dir(dir.path()).await.unwrap_err();
    assert_rolled_back(
        err,
        &log_id,
        dir.path(),
        &["head of 200 entries", "covers only 100 entries"],
    );

    // Grown again, differently, past the pinned size.
    let pin = dir.path().join(PINNED_HEAD_FILE);
    let aside = dir.path().join("pin-aside");
    std::fs::rename(&pin, &aside).unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 100);
    grow(&log, 10_000, 10_150).await;
    let other = log.shutdown().await.unwrap().unwrap();
    assert_eq!(other.tree_size, 250);
    drop(log);
    std::fs::rename(&aside, &pin).unwrap();

    let err = open_dir(dir.path()).await.unwrap_err();
    assert_rolled_back(
        err,
        &log_id,
        dir.path(),
        &[
            "entries 0..200 hash to the root",
            &hex::encode(newest.root_hash),
            "newest head covers 250 entries",
        ],
    );
    assert_eq!(pinned(dir.path()), newest, "the pin stays");
}

/// A data directory without a pin (a first start, or an upgrade from a
/// version that kept none) trusts the database and pins its newest head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pin_is_made_from_the_database_and_the_log_opens() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join(PINNED_HEAD_FILE);
    let log = open_dir(dir.path()).await.unwrap();
    assert!(!pin.exists(), "nothing signed, nothing pinned");
    grow(&log, 0, 40).await;
    let head = log.shutdown().await.unwrap().unwrap();
    assert_eq!(pinned(dir.path()), head, "every signed head is pinned");
    drop(log);

    std::fs::remove_file(&pin).unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 40);
    assert_eq!(pinned(dir.path()), head, "pinned again at open");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pin).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "owner only, as the keys");
    }
    grow(&log, 40, 45).await;
    log.shutdown().await.unwrap();
}

/// An ordinary restart opens, and the pin follows every signed head,
/// including one the database got but the pin did not (a crash between the
/// two), which the next open catches up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_open_and_the_pin_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    let log_id = log.log_id().to_string();
    grow(&log, 0, 10).await;
    let first = log.sign_now().await.unwrap();
    assert_eq!(pinned(dir.path()), first);
    grow(&log, 10, 30).await;
    let second = log.sign_now().await.unwrap();
    assert_eq!(pinned(dir.path()), second);
    assert_eq!(log.shutdown().await.unwrap().unwrap(), second);
    drop(log);

    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 30);
    grow(&log, 30, 70).await;
    let third = log.shutdown().await.unwrap().unwrap();
    assert_eq!(third.tree_size, 70);
    assert_eq!(pinned(dir.path()), third);
    drop(log);

    // The pin one head behind the database, as a crash leaves it.
    let pin = dir.path().join(PINNED_HEAD_FILE);
    std::fs::write(&pin, serde_json::to_vec(&second).unwrap()).unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 70);
    assert_eq!(pinned(dir.path()), third, "moved forward at open");
    assert_eq!(stored_head(dir.path(), &log_id).await, Some(third));
    log.shutdown().await.unwrap();
}

/// A pin that cannot be read as this log's signed head is refused, naming
/// the file: a damaged file is not a rollback, and is not replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_pin_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    grow(&log, 0, 20).await;
    let head = log.shutdown().await.unwrap().unwrap();
    drop(log);
    let pin = dir.path().join(PINNED_HEAD_FILE);

    let mut forged = head.clone();
    forged.tree_size = 5;
    let damaged = [
        b"{\"log_id\": ".to_vec(),
        Vec::new(),
        b"not json at all".to_vec(),
        serde_json::to_vec(&forged).unwrap(),
    ];
    for contents in damaged {
        std::fs::write(&pin, &contents).unwrap();
        let err = open_dir(dir.path()).await.unwrap_err();
        assert!(matches!(err, AuditError::Pin(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains(&pin.display().to_string()), "names the file: {err}");
        assert!(err.contains("backup"), "{err}");
        assert_eq!(std::fs::read(&pin).unwrap(), contents, "left as it was");
    }

    std::fs::write(&pin, serde_json::to_vec(&head).unwrap()).unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 20);
    log.shutdown().await.unwrap();
}

/// Appends to the log in `dir`, behind the broker's back, a copy of entry
/// `of` made to read as another agency's access (a new request id, its leaf
/// hash recomputed, its columns those of its leaf), with `time_shift_us`
/// added to its time column only, and raises the log's size to cover it.
async fn fabricate_after(dir: &Path, log_id: &str, of: i64, time_shift_us: i64) -> u64 {
    use sqlx::Row;
    let pool = raw(dir).await;
    let row = sqlx::query(
        "SELECT e.leaf, l.size FROM audit_entries e JOIN audit_logs l ON l.log_no = e.log_no \
         WHERE l.log_id = ? AND e.sequence = ?",
    )
    .bind(log_id)
    .bind(of)
    .fetch_one(&pool)
    .await
    .unwrap();
    let (leaf, size): (String, i64) = (row.get(0), row.get(1));
    let mut forged: lienthong_core::audit::AuditEvent = serde_json::from_str(&leaf).unwrap();
    forged.actor = "hanoi-tax-dept".into();
    forged.request_id = "fabricated-0001".into();
    let leaf = forged.to_leaf().unwrap();
    sqlx::query(
        "INSERT INTO audit_entries (log_no, sequence, leaf_hash, leaf, time_us, kind, actor, provider, record_type, \
         purpose, outcome, subject_hash) VALUES ((SELECT log_no FROM audit_logs WHERE log_id = ?), ?, ?, ?, ?, ?, ?, \
         ?, ?, ?, ?, ?)",
    )
    .bind(log_id)
    .bind(size)
    .bind(merkle::leaf_hash(leaf.as_bytes()).to_vec())
    .bind(&leaf)
    .bind((forged.time.unix_timestamp_nanos() / 1_000) as i64 + time_shift_us)
    .bind(forged.kind.as_str())
    .bind(&forged.actor)
    .bind(&forged.provider)
    .bind(&forged.record_type)
    .bind(&forged.purpose)
    .bind(forged.outcome.as_str())
    .bind((!forged.subject_hash.is_empty()).then(|| hex::decode(&forged.subject_hash).unwrap()))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE audit_logs SET size = size + 1 WHERE log_id = ?")
        .bind(log_id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    size as u64
}

/// An entry appended to the database of a log its broker closed cleanly,
/// however well made, is refused at start naming both sizes: signing it
/// would let whoever holds the database frame an agency with a receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_appended_behind_a_closed_log_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    let log_id = log.log_id().to_string();
    grow(&log, 0, 40).await;
    let closed = log.shutdown().await.unwrap().unwrap();
    drop(log);

    let fabricated = fabricate_after(dir.path(), &log_id, 16, 0).await;
    assert_eq!(fabricated, 40);
    let err = open_dir(dir.path()).await.unwrap_err();
    assert!(matches!(err, AuditError::AppendedWhileClosed(_)), "{err:?}");
    let err = err.to_string();
    for needle in [
        log_id.as_str(),
        "head of 40 entries",
        "holds 41 entries",
        "entries 40..41",
        &dir.path().join(PINNED_HEAD_FILE).display().to_string(),
    ] {
        assert!(err.contains(needle), "says {needle:?}: {err}");
    }
    assert_eq!(
        stored_head(dir.path(), &log_id).await,
        Some(closed.clone()),
        "nothing signed"
    );
    // Refused again, however often it is started.
    assert!(matches!(
        open_dir(dir.path()).await.unwrap_err(),
        AuditError::AppendedWhileClosed(_)
    ));

    // The entry removed and the size set back, the log opens where it was.
    alter(dir.path(), "DELETE FROM audit_entries WHERE sequence = 40").await;
    alter(dir.path(), "UPDATE audit_logs SET size = 40").await;
    let log = open_dir(dir.path()).await.unwrap();
    assert_eq!(log.size(), 40);
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);
    log.shutdown().await.unwrap();
}

/// A log left open (a crash) may hold committed entries past its newest
/// head: they are signed once checked, and one whose columns are not its
/// leaf's is never signed, by the signer or at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_the_head_after_a_crash_are_signed_only_once_checked() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_dir(dir.path()).await.unwrap();
    let log_id = log.log_id().to_string();
    grow(&log, 0, 30).await;
    let signed = log.sign_now().await.unwrap();
    assert_eq!(signed.tree_size, 30);
    grow(&log, 30, 35).await;
    // A crash: the log is never closed.
    drop(log);

    let (log, check) = reopen_and_check(dir.path()).await;
    assert_eq!(check, HistoryCheck::Passed);
    assert_eq!(
        log.sign_now().await.unwrap().tree_size,
        35,
        "its own entries are signed"
    );
    grow(&log, 35, 40).await;
    let head = log.sign_now().await.unwrap();
    assert_eq!(head.tree_size, 40);
    drop(log);

    // Left open again, with an entry appended behind its back whose time
    // column is not its leaf's.
    let fabricated = fabricate_after(dir.path(), &log_id, 16, 1).await;
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, fabricated, "time_us is").await;
    let err = log.sign_now().await.unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains(&format!("entry {fabricated}")), "{err}");
    let err = log.shutdown().await.unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err:?}");
    assert_eq!(
        stored_head(dir.path(), &log_id).await,
        Some(head.clone()),
        "nothing signed over it"
    );
    assert_eq!(pinned(dir.path()), head);
}

/// A log found altered below its signed head signs no head either, though
/// its tree did not grow: closing it would tell the next start that nothing
/// was appended since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_found_altered_signs_no_head_and_is_not_closed() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 50).await;
    assert_eq!(
        alter(
            dir.path(),
            "UPDATE audit_entries SET actor = 'nobody' WHERE sequence = 16"
        )
        .await,
        1
    );
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 16, "actor is").await;
    assert!(matches!(log.sign_now().await, Err(AuditError::Corrupt(_))));
    assert!(matches!(log.shutdown().await, Err(AuditError::Corrupt(_))));
    let pin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(PINNED_HEAD_FILE)).unwrap()).unwrap();
    assert_eq!(pin["state"], "open", "{pin}");
}

/// Columns altered while the broker runs (a citizen's access hidden from
/// their history, its agency renamed) are found by the check repeated while
/// the log is open, and the log then signs no head and takes no entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_altered_while_the_log_is_open_are_found_by_the_repeated_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        recheck_interval: Duration::from_millis(20),
        ..config()
    };
    let log = AuditLog::open(
        open_store(dir.path()).await,
        LogKeys::load_or_create(dir.path()).unwrap(),
        config,
    )
    .await
    .unwrap();
    grow(&log, 0, 40).await;
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);
    let head = log.sign_now().await.unwrap();

    assert_eq!(
        alter(
            dir.path(),
            "UPDATE audit_entries SET subject_hash = zeroblob(32), actor = 'nobody' WHERE sequence = 16"
        )
        .await,
        1
    );
    let why = tokio::time::timeout(Duration::from_secs(30), log.history_failure())
        .await
        .expect("the repeated check did not find the alteration within 30 s")
        .expect("the log shut down");
    assert!(why.contains("entry 16") && why.contains("actor is \"nobody\""), "{why}");
    assert_failed_naming(&log, log.history_check(), 16, "subject_hash is").await;
    assert!(matches!(log.sign_now().await, Err(AuditError::Corrupt(_))));
    assert_eq!(stored_head(dir.path(), log.log_id()).await, Some(head));
}

/// Rows inserted under the running broker (the log's size raised to cover
/// them, as another process holding the database would) make its next
/// commit fail; the read-back after it finds them, and however well made
/// they are, they are not a batch this broker wrote: the log refuses new
/// entries and never signs a head over them, by the signer or at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_under_the_running_writer_are_never_signed() {
    for forged in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            sign_interval: Duration::from_millis(20),
            ..config()
        };
        let log = AuditLog::open(
            open_store(dir.path()).await,
            LogKeys::load_or_create(dir.path()).unwrap(),
            config,
        )
        .await
        .unwrap();
        let log_id = log.log_id().to_string();
        grow(&log, 0, 20).await;
        let head = log.sign_now().await.unwrap();
        assert_eq!(log.history_checked().await, HistoryCheck::Passed);

        for _ in 0..forged {
            fabricate_after(dir.path(), &log_id, 5, 0).await;
        }
        // One entry, as many as the first forged row: its commit is refused.
        let refused = log.append(event(100)).await.unwrap_err();
        assert!(matches!(refused, AuditError::Unavailable(_)), "{refused:?}");
        let refused = log.append(event(101)).await.unwrap_err();
        assert!(matches!(refused, AuditError::Unavailable(_)), "{refused:?}");
        let HistoryCheck::Failed(why) = log.history_check() else {
            panic!("{forged} forged: {:?}", log.history_check());
        };
        assert!(
            why.contains(&format!("entries 20..{}", 20 + forged)) && why.contains("not written by this broker"),
            "{why}"
        );
        assert_eq!(log.size(), 20, "nothing adopted");
        assert!(matches!(log.append(event(102)).await, Err(AuditError::Corrupt(_))));
        assert!(matches!(log.sign_now().await, Err(AuditError::Corrupt(_))));
        assert!(matches!(log.shutdown().await, Err(AuditError::Corrupt(_))));
        assert_eq!(
            stored_head(dir.path(), &log_id).await,
            Some(head.clone()),
            "nothing signed"
        );
        assert_eq!(pinned(dir.path()), head);
    }
}
