//! The writer against the real embedded SQLite store: durability across a
//! restart, group commit, proofs and an offline-verified export.
#![allow(clippy::unwrap_used)]

mod common;

use common::event;
use lienthong_audit::merkle;
use lienthong_audit::{AuditConfig, AuditError, AuditLog, ExportLine, LogKeys, verify_export, verify_tree_head};
use lienthong_store::{EntryQuery, Store, StoreOptions};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

async fn open_store(dir: &Path) -> Arc<dyn Store> {
    lienthong_store::open(&StoreOptions {
        url: format!("sqlite://{}", dir.join("lienthong.db").display()),
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
