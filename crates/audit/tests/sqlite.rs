//! The writer against the real embedded SQLite store: durability across a
//! restart, group commit, proofs and an offline-verified export.
#![allow(clippy::unwrap_used)]

mod common;

use common::event;
use lienthong_audit::merkle;
use lienthong_audit::{
    AuditConfig, AuditError, AuditLog, ExportLine, HistoryCheck, LogKeys, verify_export, verify_tree_head,
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

/// A row deleted below the signed head is not an outage to wait out: the
/// check ends failed (the broker reports it and stops releasing data)
/// instead of retrying the read for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_ends_the_history_check_failed_and_the_log_refuses_entries() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    // Far from the right edge, which the opening itself reads.
    assert_eq!(
        alter(dir.path(), "DELETE FROM audit_entries WHERE sequence = 1234").await,
        1
    );
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 1234, "not found").await;
}

/// A leaf rewritten under its old leaf hash still hashes to the signed root
/// through that hash: the check hashes the leaf itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_altered_under_its_stored_hash_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET leaf = replace(leaf, 'income-tax-assessment', 'criminal-investigation') \
               WHERE sequence = 777";
    assert_eq!(alter(dir.path(), sql).await, 1);
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 777, "does not hash to its stored leaf hash").await;
}

/// The purpose an auditor filters on and sees is the one of the leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_purpose_column_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET purpose = 'statistics' WHERE sequence = 2001";
    assert_eq!(alter(dir.path(), sql).await, 1);
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 2001, "purpose is \"statistics\"").await;
}

/// A subject hash rewritten (here to another citizen's) would hide the
/// access from its citizen's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_subject_hash_column_fails_the_history_check() {
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 3000).await;
    let sql = "UPDATE audit_entries SET subject_hash = (SELECT subject_hash FROM audit_entries WHERE sequence = 9) \
               WHERE sequence = 10";
    assert_eq!(alter(dir.path(), sql).await, 1);
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 10, "subject_hash").await;
    // Set to nothing, which hides it from every history query.
    let dir = tempfile::tempdir().unwrap();
    closed_sqlite_log(dir.path(), 600).await;
    assert_eq!(
        alter(
            dir.path(),
            "UPDATE audit_entries SET subject_hash = NULL WHERE sequence = 300"
        )
        .await,
        1
    );
    let (log, check) = reopen_and_check(dir.path()).await;
    assert_failed_naming(&log, check, 300, "subject_hash").await;
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
