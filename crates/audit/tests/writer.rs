//! The group-commit writer against an in-memory store with fault injection.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeStore, event};
use lienthong_audit::merkle::{self, Hash};
use lienthong_audit::{AuditConfig, AuditError, AuditLog, HistoryCheck, LogKeys, verify_tree_head};
use lienthong_store::Store;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn quiet() -> AuditConfig {
    // The periodic signer stays out of the way unless a test wants it.
    AuditConfig {
        sign_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    }
}

async fn open(store: &Arc<FakeStore>, keys: LogKeys) -> Arc<AuditLog> {
    AuditLog::open(store.clone() as Arc<dyn Store>, keys, quiet())
        .await
        .unwrap()
}

fn stored_hashes(store: &FakeStore, log_id: &str) -> Vec<Hash> {
    store.entries(log_id).iter().map(|e| e.leaf_hash).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_dense_sequences_and_share_commits() {
    let store = Arc::new(FakeStore::new());
    store.set_delay(Duration::from_millis(2));
    let log = open(&store, LogKeys::generate().unwrap()).await;

    let tasks: Vec<_> = (0..1000u64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { (i, log.append(event(i)).await.unwrap()) })
        })
        .collect();
    let mut receipts = Vec::new();
    for task in tasks {
        receipts.push(task.await.unwrap());
    }

    let sequences: BTreeSet<u64> = receipts.iter().map(|(_, r)| r.sequence).collect();
    assert_eq!(sequences, (0..1000).collect(), "sequences are dense and unique");
    assert_eq!(log.size(), 1000);

    let batches = store.batches();
    assert_eq!(batches.iter().sum::<usize>(), 1000);
    assert!(
        batches.len() < 1000,
        "appends must share commits, got {} commits",
        batches.len()
    );
    assert!(batches.iter().any(|&b| b > 1));
    assert!(batches.iter().all(|&b| b <= quiet().max_batch));
    let stats = log.stats();
    assert_eq!(stats.total_entries, 1000);
    assert_eq!(stats.total_batches, batches.len() as u64);
    assert_eq!(log.total_batches(), batches.len() as u64);
    assert_eq!(stats.failed_batches, 0);
    assert!(log.last_commit_duration() >= Duration::from_millis(2));

    // Each receipt names the row that holds its own event.
    let entries = store.entries(log.log_id());
    for (i, receipt) in &receipts {
        let row = &entries[receipt.sequence as usize];
        assert_eq!(row.leaf, event(*i).to_leaf().unwrap());
        assert_eq!(row.leaf_hash, receipt.leaf_hash);
        assert_eq!(receipt.leaf_hash, merkle::leaf_hash(row.leaf.as_bytes()));
        assert_eq!(receipt.log_id, log.log_id());
        assert_eq!(row.subject_hash, event(*i).subject_hash);
    }

    // And is provably in the signed tree.
    let sth = log.sign_now().await.unwrap();
    assert_eq!(sth.tree_size, 1000);
    verify_tree_head(&sth, &log.keys().public_key()).unwrap();
    for (_, receipt) in receipts.iter().step_by(97) {
        let (leaf, proof) = log
            .inclusion_proof(log.log_id(), receipt.sequence, sth.tree_size)
            .await
            .unwrap();
        assert_eq!(leaf, receipt.leaf_hash);
        assert!(merkle::verify_inclusion(
            receipt.sequence,
            sth.tree_size,
            &leaf,
            &proof,
            &sth.root_hash
        ));
    }
}

#[tokio::test]
async fn append_many_is_one_commit_with_consecutive_receipts() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    log.append(event(0)).await.unwrap();
    let receipts = log.append_many((1..=5).map(event).collect()).await.unwrap();
    assert_eq!(
        receipts.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(store.batches(), vec![1, 5]);
    assert!(log.append_many(Vec::new()).await.unwrap().is_empty());
    assert_eq!(store.batches().len(), 2, "an empty collect writes nothing");
}

#[tokio::test]
async fn failing_store_fails_closed_and_resumes_at_the_right_sequence() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    for i in 0..3 {
        assert_eq!(log.append(event(i)).await.unwrap().sequence, i);
    }
    let before = log.sign_now().await.unwrap();

    store.set_failing(true);
    let err = log.append(event(3)).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
    let err = log.append_many(vec![event(4), event(5)]).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
    assert_eq!(log.size(), 3, "nothing advanced");
    assert_eq!(log.stats().failed_batches, 2);

    store.set_failing(false);
    assert_eq!(store.entries(log.log_id()).len(), 3, "nothing was written");
    assert_eq!(log.append(event(6)).await.unwrap().sequence, 3);
    let after = log.sign_now().await.unwrap();
    assert_eq!(after.tree_size, 4);
    assert_eq!(after.root_hash, merkle::root(&stored_hashes(&store, log.log_id())));
    let proof = log
        .consistency_proof(log.log_id(), before.tree_size, after.tree_size)
        .await
        .unwrap();
    assert!(merkle::verify_consistency(
        before.tree_size,
        after.tree_size,
        &before.root_hash,
        &after.root_hash,
        &proof
    ));
}

#[tokio::test]
async fn a_commit_that_landed_despite_an_error_is_resynchronised() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    log.append(event(0)).await.unwrap();

    store.fail_after_commit.store(true, Ordering::SeqCst);
    let err = log.append(event(1)).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
    assert_eq!(log.size(), 1, "an unacknowledged commit is not counted");
    store.fail_after_commit.store(false, Ordering::SeqCst);

    // The row did land: the next entry must continue after it, not collide.
    assert_eq!(log.append(event(2)).await.unwrap().sequence, 2);
    assert_eq!(log.size(), 3);
    let sth = log.sign_now().await.unwrap();
    assert_eq!(sth.root_hash, merkle::root(&stored_hashes(&store, log.log_id())));
}

/// A log on `store` whose commits are given up after 300 ms.
async fn open_giving_up_after_300ms(store: &Arc<FakeStore>) -> Arc<AuditLog> {
    let config = AuditConfig {
        commit_timeout: Duration::from_millis(300),
        ..quiet()
    };
    AuditLog::open(store.clone() as Arc<dyn Store>, LogKeys::generate().unwrap(), config)
        .await
        .unwrap()
}

/// A commit the writer gave up on may land later, while another batch is
/// on its way: the batch that then fails finds it stored, and the writer
/// recognises it as its own, though it is not the last batch it tried.
#[tokio::test]
async fn a_batch_given_up_that_lands_behind_a_later_one_is_recognised() {
    let store = Arc::new(FakeStore::new());
    let log = open_giving_up_after_300ms(&store).await;
    log.append(event(0)).await.unwrap();
    store.land_late.store(true, Ordering::SeqCst);
    assert!(matches!(log.append(event(1)).await, Err(AuditError::Unavailable(_))));
    store.land_late.store(false, Ordering::SeqCst);
    // Entry 1 lands just before this one is written, which fails.
    assert!(matches!(log.append(event(2)).await, Err(AuditError::Unavailable(_))));
    assert_eq!(store.entries(log.log_id()).len(), 2);
    assert_eq!(log.append(event(3)).await.unwrap().sequence, 2);
    assert_eq!(log.history_check(), HistoryCheck::Passed);
    let sth = log.sign_now().await.unwrap();
    assert_eq!(sth.tree_size, 3);
    assert_eq!(sth.root_hash, merkle::root(&stored_hashes(&store, log.log_id())));
}

/// The entries of a failed commit found stored are adopted only if they are
/// what the writer wrote: a leaf replaced (with its hash), a column altered
/// or a tree node altered before the read-back fails the log, which then
/// signs nothing over them.
#[tokio::test]
async fn entries_found_after_a_failed_commit_are_checked_before_they_are_adopted() {
    type Alteration = (&'static str, fn(&FakeStore, &str));
    let alterations: [Alteration; 3] = [
        ("not the entries of any batch", |store, log_id| {
            store.tamper(log_id, 255, |e| {
                e.leaf = e.leaf.replace("tax-board", "tax-b0ard");
                e.actor = "tax-b0ard".into();
                e.leaf_hash = merkle::leaf_hash(e.leaf.as_bytes());
            })
        }),
        ("entry 255 has columns that are not its leaf's", |store, log_id| {
            store.tamper(log_id, 255, |e| e.actor = "police".into())
        }),
        ("tree node over entries 0..256", |store, log_id| {
            store.tamper_node(log_id, (8, 0), [0x55; 32])
        }),
    ];
    for (finding, alter) in alterations {
        let store = Arc::new(FakeStore::new());
        let log = open(&store, LogKeys::generate().unwrap()).await;
        let log_id = log.log_id().to_owned();
        log.append_many((0..255).map(event).collect()).await.unwrap();
        let head = log.sign_now().await.unwrap();
        // Entry 255 completes the stored node over 0..256.
        store.fail_after_commit.store(true, Ordering::SeqCst);
        assert!(log.append(event(255)).await.is_err());
        store.fail_after_commit.store(false, Ordering::SeqCst);
        alter(&store, &log_id);

        assert!(log.append(event(256)).await.is_err(), "{finding}");
        let HistoryCheck::Failed(why) = log.history_check() else {
            panic!("{finding}: {:?}", log.history_check());
        };
        assert!(why.contains(finding), "{finding}: {why}");
        assert_eq!(log.size(), 255, "{finding}: nothing adopted");
        assert!(matches!(log.sign_now().await, Err(AuditError::Corrupt(_))), "{finding}");
        assert_eq!(store.heads(&log_id).last(), Some(&(&head).into()), "{finding}");
        assert!(matches!(log.append(event(257)).await, Err(AuditError::Corrupt(_))));
    }
}

/// A database that stops answering (a network black hole) fails the batch
/// after the commit timeout, and the writer is free for the next one as soon
/// as the database answers again, not when the hung call would have ended.
#[tokio::test]
async fn a_commit_that_hangs_is_given_up_and_the_writer_goes_on() {
    let store = Arc::new(FakeStore::new());
    let log = open_giving_up_after_300ms(&store).await;
    log.append(event(0)).await.unwrap();
    store.set_delay(Duration::from_secs(60));
    let err = log.append(event(1)).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
    store.set_delay(Duration::ZERO);
    let next = tokio::time::timeout(Duration::from_secs(5), log.append(event(2)))
        .await
        .expect("the writer was free again")
        .unwrap();
    assert_eq!(next.sequence, 1, "the abandoned batch left nothing behind");
    assert_eq!(log.stats().failed_batches, 1);
    let sth = log.sign_now().await.unwrap();
    assert_eq!(sth.root_hash, merkle::root(&stored_hashes(&store, log.log_id())));
}

#[tokio::test]
async fn resynchronisation_failing_keeps_failing_closed() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    log.append(event(0)).await.unwrap();
    log.append(event(1)).await.unwrap();
    store.set_failing(true);
    assert!(log.append(event(2)).await.is_err());
    store.set_failing(false);
    // Someone deleted committed rows meanwhile: the writer must refuse to go on.
    store.truncate(log.log_id(), 1);
    let err = log.append(event(3)).await.unwrap_err();
    assert!(
        matches!(err, AuditError::Unavailable(ref m) if m.contains("deleted")),
        "{err:?}"
    );
    assert_eq!(store.entries(log.log_id()).len(), 1);
    // Not an outage to retry: the log is failed for good, as when the check
    // behind an opening finds it, so health checks and metrics say so too.
    let HistoryCheck::Failed(why) = log.history_check() else {
        panic!("{:?}", log.history_check());
    };
    assert!(why.contains("entries were deleted"), "{why}");
    assert_eq!(log.history_failure().await, Some(why));
    let err = log.append(event(4)).await.unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err:?}");
    assert_eq!(store.entries(log.log_id()).len(), 1);
}

/// A store that answers the writer's read-back with anything but an outage
/// (here, data it cannot decode) has no history to go on with either.
#[tokio::test]
async fn a_read_back_the_store_cannot_answer_fails_the_log_rather_than_waiting() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    log.append(event(0)).await.unwrap();
    store.corrupt.store(true, Ordering::SeqCst);
    assert!(log.append(event(1)).await.is_err());
    assert!(log.append(event(2)).await.is_err());
    assert!(
        matches!(log.history_check(), HistoryCheck::Failed(ref why) if why.contains("reading it back")),
        "{:?}",
        log.history_check()
    );
    store.corrupt.store(false, Ordering::SeqCst);
    assert!(matches!(log.append(event(3)).await, Err(AuditError::Corrupt(_))));
}

#[tokio::test]
async fn shutdown_flushes_the_queue_and_signs_a_final_head() {
    let store = Arc::new(FakeStore::new());
    store.set_delay(Duration::from_millis(1));
    let log = open(&store, LogKeys::generate().unwrap()).await;
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(event(i)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let head = log.shutdown().await.unwrap().unwrap();

    let mut committed = 0u64;
    for task in tasks {
        match task.await.unwrap() {
            Ok(receipt) => {
                committed += 1;
                assert!(receipt.sequence < head.tree_size, "the final head covers every receipt");
            }
            Err(e) => assert!(matches!(e, AuditError::ShuttingDown), "{e:?}"),
        }
    }
    assert_eq!(head.tree_size, committed);
    assert_eq!(head.tree_size, store.entries(log.log_id()).len() as u64);
    assert_eq!(head.root_hash, merkle::root(&stored_hashes(&store, log.log_id())));
    verify_tree_head(&head, &log.keys().public_key()).unwrap();
    assert_eq!(store.heads(log.log_id()).last().unwrap().tree_size, head.tree_size);

    assert!(matches!(log.append(event(999)).await, Err(AuditError::ShuttingDown)));
    assert!(
        log.shutdown().await.unwrap().is_none(),
        "a second shutdown has nothing to do"
    );
}

#[tokio::test]
async fn signer_signs_when_the_tree_grows() {
    let store = Arc::new(FakeStore::new());
    let config = AuditConfig {
        sign_interval: Duration::from_millis(20),
        ..AuditConfig::default()
    };
    let log = AuditLog::open(store.clone() as Arc<dyn Store>, LogKeys::generate().unwrap(), config)
        .await
        .unwrap();
    log.append(event(0)).await.unwrap();
    log.append(event(1)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let signed = log
            .latest_tree_head(log.log_id())
            .await
            .ok()
            .filter(|h| h.tree_size == 2);
        if let Some(head) = signed {
            verify_tree_head(&head, &log.keys().public_key()).unwrap();
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no head of size 2 was signed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Idle: no new heads pile up.
    let count = store.heads(log.log_id()).len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.heads(log.log_id()).len(), count);
}

#[tokio::test]
async fn restart_reloads_keys_and_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeStore::new());
    let first = open(&store, LogKeys::load_or_create(dir.path()).unwrap()).await;
    for i in 0..10 {
        first.append(event(i)).await.unwrap();
    }
    let head = first.shutdown().await.unwrap().unwrap();
    let log_id = first.log_id().to_string();
    drop(first);

    let second = open(&store, LogKeys::load_or_create(dir.path()).unwrap()).await;
    assert_eq!(second.log_id(), log_id, "same key, same log");
    assert_eq!(second.size(), 10);
    assert_eq!(second.latest_signed(), Some(head.clone()));
    assert_eq!(
        second.sign_now().await.unwrap(),
        head,
        "an unchanged tree is not re-signed"
    );
    assert_eq!(second.append(event(10)).await.unwrap().sequence, 10);
    let grown = second.sign_now().await.unwrap();
    assert_eq!(grown.root_hash, merkle::root(&stored_hashes(&store, &log_id)));
    assert!(grown.timestamp_ms >= head.timestamp_ms);
    let proof = second
        .consistency_proof(&log_id, head.tree_size, grown.tree_size)
        .await
        .unwrap();
    assert!(merkle::verify_consistency(
        head.tree_size,
        grown.tree_size,
        &head.root_hash,
        &grown.root_hash,
        &proof
    ));
}

#[tokio::test]
async fn opening_an_altered_log_is_refused() {
    let store = Arc::new(FakeStore::new());
    let keys = LogKeys::generate().unwrap();
    let log = open(&store, keys.clone()).await;
    for i in 0..5 {
        log.append(event(i)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let log_id = log.log_id().to_string();

    // Rewriting a row together with its leaf hash no longer matches the signed root.
    store.tamper(&log_id, 2, |e| {
        e.leaf = e.leaf.replace("tax-board", "tax-b0ard");
        e.leaf_hash = merkle::leaf_hash(e.leaf.as_bytes());
    });
    let err = AuditLog::open(store.clone() as Arc<dyn Store>, keys.clone(), quiet())
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("0..5"), "{err}");

    // Deleting signed rows is refused too.
    store.truncate(&log_id, 3);
    let err = AuditLog::open(store.clone() as Arc<dyn Store>, keys, quiet())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deleted"), "{err}");
}

#[tokio::test]
async fn proofs_and_heads_validate_their_arguments() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    let id = log.log_id().to_string();
    assert!(matches!(log.latest_tree_head(&id).await, Err(AuditError::NotFound(_))));
    for i in 0..6 {
        log.append(event(i)).await.unwrap();
    }
    // No head signed yet: no root anyone holds could check a proof.
    assert!(matches!(
        log.inclusion_proof(&id, 0, 6).await,
        Err(AuditError::OutOfRange(_))
    ));
    assert!(matches!(
        log.consistency_proof(&id, 1, 6).await,
        Err(AuditError::OutOfRange(_))
    ));
    assert_eq!(log.sign_now().await.unwrap().tree_size, 6);
    log.append(event(6)).await.unwrap();
    assert!(matches!(
        log.inclusion_proof(&id, 6, 6).await,
        Err(AuditError::InvalidArgument(_))
    ));
    // Past the newest signed head, though in the log, and past the log's
    // end: may be signed later, so not "not found".
    for size in [7, 8] {
        let err = log.inclusion_proof(&id, 0, size).await.unwrap_err();
        assert!(matches!(err, AuditError::OutOfRange(_)), "{err:?}");
        assert!(err.to_string().contains("newest signed tree head"), "{err}");
    }
    assert!(matches!(
        log.inclusion_proof("other", 0, 1).await,
        Err(AuditError::NotFound(_))
    ));
    assert!(matches!(
        log.consistency_proof(&id, 4, 3).await,
        Err(AuditError::InvalidArgument(_))
    ));
    assert!(matches!(
        log.consistency_proof(&id, 3, 7).await,
        Err(AuditError::OutOfRange(_))
    ));
    assert!(log.consistency_proof(&id, 6, 6).await.unwrap().is_empty());

    // Proofs for every smaller tree, not only the current one.
    let hashes = stored_hashes(&store, &id);
    for size in 1..=6u64 {
        let r = merkle::root(&hashes[..size as usize]);
        for seq in 0..size {
            let (leaf, proof) = log.inclusion_proof(&id, seq, size).await.unwrap();
            assert!(merkle::verify_inclusion(seq, size, &leaf, &proof, &r));
        }
    }

    let bad = AuditConfig {
        max_batch: 0,
        ..AuditConfig::default()
    };
    let err = AuditLog::open(store.clone() as Arc<dyn Store>, LogKeys::generate().unwrap(), bad)
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::InvalidArgument(_)));
}

#[tokio::test]
async fn subject_hash_is_the_keys_hmac() {
    let store = Arc::new(FakeStore::new());
    let a = open(&store, LogKeys::from_parts([1; 32], [2; 32]).unwrap()).await;
    let b = open(&store, LogKeys::from_parts([3; 32], [4; 32]).unwrap()).await;
    assert_eq!(a.subject_hash("38001085718"), a.subject_hash("38001085718"));
    assert_ne!(a.subject_hash("38001085718"), b.subject_hash("38001085718"));
    assert_eq!(a.subject_hash("x"), a.keys().subject_hash("x"));
}

/// Every proof the log serves, for each entry and tree size asked, equals
/// the reference computed from all leaf hashes.
async fn assert_proofs_match_the_reference(log: &AuditLog, leaves: &[Hash], sizes: &[u64]) {
    for &n in sizes {
        let all = &leaves[..n as usize];
        for m in [0, 1, 255, 256, 257, n / 2, n.saturating_sub(2), n - 1]
            .into_iter()
            .filter(|&m| m < n)
        {
            let (leaf, proof) = log.inclusion_proof(log.log_id(), m, n).await.unwrap();
            assert_eq!(leaf, all[m as usize], "leaf {m} of {n}");
            assert_eq!(proof, merkle::inclusion_proof(m, all), "inclusion {m} in {n}");
        }
        for m in [1, 255, 256, 257, 1000, n / 3, n - 1, n]
            .into_iter()
            .filter(|&m| m <= n)
        {
            let proof = log.consistency_proof(log.log_id(), m, n).await.unwrap();
            assert_eq!(proof, merkle::consistency_proof(m, all), "consistency {m} -> {n}");
        }
    }
}

/// Proofs come from the tree nodes the writer stored with the entries, not
/// from every leaf: the log stores one node per perfect subtree of 256
/// leaves and up, and the proofs equal the reference ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_stores_tree_nodes_and_proofs_use_them() {
    let store = Arc::new(FakeStore::new());
    let log = open(&store, LogKeys::generate().unwrap()).await;
    // Batches of odd sizes, so nodes are completed in the middle of batches.
    let mut next = 0;
    for size in [1, 300, 77, 512, 1, 1000, 333, 2900] {
        log.append_many((next..next + size).map(event).collect()).await.unwrap();
        next += size;
    }
    assert_eq!(next, 5124);
    let nodes = store.nodes(log.log_id());
    assert_eq!(nodes.len() as u64, merkle::stored_node_count(next));
    let leaves = stored_hashes(&store, log.log_id());
    for (&(level, index), hash) in &nodes {
        let (from, to) = ((index << level) as usize, ((index + 1) << level) as usize);
        assert_eq!(*hash, merkle::root(&leaves[from..to]), "node {level}/{index}");
    }
    log.sign_now().await.unwrap();
    assert_proofs_match_the_reference(&log, &leaves, &[1, 2, 256, 257, 1300, 4096, 5000, 5124]).await;

    // A stored node that was altered gives a proof that does not verify
    // against the signed root: tampering is caught by whoever checks.
    let sth = log.sign_now().await.unwrap();
    store.tamper_node(log.log_id(), (12, 0), [0xaa; 32]);
    let (leaf, proof) = log.inclusion_proof(log.log_id(), 5100, sth.tree_size).await.unwrap();
    assert!(!merkle::verify_inclusion(
        5100,
        sth.tree_size,
        &leaf,
        &proof,
        &sth.root_hash
    ));
}

/// A log written before tree nodes were stored gets them when it is opened,
/// and a node missing anyway is hashed from its leaves: proofs stay right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_without_tree_nodes_gets_them_on_open_and_proofs_never_depend_on_them() {
    let store = Arc::new(FakeStore::new());
    let keys = LogKeys::generate().unwrap();
    let log = open(&store, keys.clone()).await;
    log.append_many((0..3000).map(event).collect()).await.unwrap();
    let log_id = log.log_id().to_owned();
    log.shutdown().await.unwrap();
    drop(log);

    store.forget_nodes(&log_id);
    let log = open(&store, keys.clone()).await;
    assert_eq!(store.nodes(&log_id).len() as u64, merkle::stored_node_count(3000));
    let leaves = stored_hashes(&store, &log_id);
    assert_proofs_match_the_reference(&log, &leaves, &[3000, 2048, 700]).await;

    // Lost again while the log runs: proofs hash the leaves instead.
    store.forget_nodes(&log_id);
    assert_proofs_match_the_reference(&log, &leaves, &[3000, 1025]).await;
    // And the writer goes on storing the nodes of new entries.
    log.append_many((3000..3100).map(event).collect()).await.unwrap();
    assert!(store.nodes(&log_id).contains_key(&(8, 11)));
}

/// A log of `n` entries, shut down (so its last head covers them all);
/// returns its keys and id.
async fn closed_log(store: &Arc<FakeStore>, n: u64) -> (LogKeys, String) {
    let keys = LogKeys::generate().unwrap();
    let log = open(store, keys.clone()).await;
    let mut next = 0;
    while next < n {
        let to = n.min(next + 500);
        log.append_many((next..to).map(event).collect()).await.unwrap();
        next = to;
    }
    log.shutdown().await.unwrap();
    (keys, log.log_id().to_owned())
}

/// A log with its tree nodes opens from them without reading its history
/// first, checks that history behind the opening, and works on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_opens_from_its_tree_nodes_and_checks_its_history_behind_the_opening() {
    let store = Arc::new(FakeStore::new());
    let (keys, log_id) = closed_log(&store, 3000).await;
    let log = open(&store, keys).await;
    assert_eq!(log.size(), 3000);
    let appended = log.append(event(3000)).await.unwrap();
    assert_eq!(appended.sequence, 3000);
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);
    let head = log.sign_now().await.unwrap();
    assert_eq!(head.root_hash, merkle::root(&stored_hashes(&store, &log_id)));
    let leaves = stored_hashes(&store, &log_id);
    assert_proofs_match_the_reference(&log, &leaves, &[3001, 3000]).await;
}

/// An old entry rewritten (with its leaf hash) under a log that opens from
/// its tree nodes is found by the check behind the opening; from then on the
/// log refuses new entries, so nothing more is released on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_entry_found_behind_the_opening_makes_the_log_refuse_new_entries() {
    let store = Arc::new(FakeStore::new());
    let (keys, log_id) = closed_log(&store, 3000).await;
    store.tamper(&log_id, 2, |e| {
        e.leaf = e.leaf.replace("tax-board", "tax-b0ard");
        e.leaf_hash = merkle::leaf_hash(e.leaf.as_bytes());
    });
    let log = open(&store, keys).await;
    let HistoryCheck::Failed(why) = log.history_checked().await else {
        panic!("the altered entry went unnoticed");
    };
    assert!(why.contains(&log_id), "{why}");
    let refused = log.append(event(3000)).await.unwrap_err();
    assert!(matches!(refused, AuditError::Corrupt(_)), "{refused:?}");
    assert_eq!(store.entries(&log_id).len(), 3000, "nothing appended after the finding");
}

/// Stored tree nodes are checked too: one on the tree's right edge at the
/// opening (which is refused), any other behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_tree_nodes_are_found_at_or_behind_the_opening() {
    let store = Arc::new(FakeStore::new());
    let (keys, log_id) = closed_log(&store, 3000).await;
    // 3,000 = 2,048 + 512 + 256 + 184: the node over 0..2,048 is on the right edge.
    let honest = store.nodes(&log_id)[&(11, 0)];
    store.tamper_node(&log_id, (11, 0), [0x55; 32]);
    let err = AuditLog::open(store.clone() as Arc<dyn Store>, keys.clone(), quiet())
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("0..3000"), "{err}");

    store.tamper_node(&log_id, (11, 0), honest);
    store.tamper_node(&log_id, (8, 1), [0x66; 32]);
    let log = open(&store, keys).await;
    let HistoryCheck::Failed(why) = log.history_checked().await else {
        panic!("the altered node went unnoticed");
    };
    assert!(why.contains("256..512"), "{why}");
}

/// A database that is down while the history is checked is waited out: the
/// check stays running, retries, and passes once the database is back.
#[tokio::test]
async fn the_history_check_waits_out_an_unavailable_database() {
    let store = Arc::new(FakeStore::new());
    let (keys, _) = closed_log(&store, 3000).await;
    // On this single-threaded runtime the check starts only once `open` returned.
    let log = open(&store, keys).await;
    store.set_failing(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log.history_check(), HistoryCheck::Running);
    store.set_failing(false);
    let check = tokio::time::timeout(Duration::from_secs(20), log.history_checked())
        .await
        .expect("the check resumed once the database was back");
    assert_eq!(check, HistoryCheck::Passed);
}

/// Opening a log reads its right edge, not its history: a restart takes
/// about as long at a billion entries as at a thousand.
#[tokio::test]
async fn opening_a_log_reads_at_most_one_block_of_leaf_hashes() {
    let store = Arc::new(FakeStore::new());
    let (keys, _) = closed_log(&store, 70_000).await;
    store.leaf_hashes_read.store(0, Ordering::SeqCst);
    // On this single-threaded runtime the check behind the opening cannot
    // start before `open` returns.
    let log = open(&store, keys).await;
    let read = store.leaf_hashes_read.load(Ordering::SeqCst);
    assert!(read <= 256, "the opening read {read} leaf hashes");
    assert_eq!(log.size(), 70_000);
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);
    assert!(
        store.leaf_hashes_read.load(Ordering::SeqCst) >= 70_000,
        "the check read the whole history"
    );
}

/// Waits (at most 30 s, so that a bug fails the test instead of hanging it)
/// until `done` holds or the log's history check failed.
async fn until_or_failed(log: &AuditLog, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() && !matches!(log.history_check(), HistoryCheck::Failed(_)) {
        assert!(tokio::time::Instant::now() < deadline, "nothing happened within 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A store error while the history is checked again (here `Corrupt`, as
/// PostgreSQL's lock timeouts come back) is no finding about the history:
/// the log goes on and the check is made again. Rows a later check finds
/// missing still fail the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_in_a_repeated_check_is_checked_again_later_not_a_finding() {
    let store = Arc::new(FakeStore::new());
    let config = AuditConfig {
        recheck_interval: Duration::from_millis(20),
        ..quiet()
    };
    let log = AuditLog::open(store.clone() as Arc<dyn Store>, LogKeys::generate().unwrap(), config)
        .await
        .unwrap();
    let log_id = log.log_id().to_owned();
    log.append_many((0..10).map(event).collect()).await.unwrap();
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);

    store.corrupt_reads.store(1, Ordering::SeqCst);
    until_or_failed(&log, || store.corrupt_reads.load(Ordering::SeqCst) == 0).await;
    // A later check reads the entries again.
    let read = store.leaf_hashes_read.load(Ordering::SeqCst);
    until_or_failed(&log, || store.leaf_hashes_read.load(Ordering::SeqCst) > read).await;
    assert_eq!(log.history_check(), HistoryCheck::Passed);
    assert_eq!(log.append(event(10)).await.unwrap().sequence, 10);
    assert_eq!(log.sign_now().await.unwrap().tree_size, 11);

    store.truncate(&log_id, 5);
    let why = tokio::time::timeout(Duration::from_secs(30), log.history_failure())
        .await
        .expect("the repeated check did not find the rows missing within 30 s")
        .expect("the log shut down");
    assert!(why.contains("entry 5") && why.contains("not found"), "{why}");
    assert!(matches!(log.append(event(11)).await, Err(AuditError::Corrupt(_))));
}

/// The check behind the opening still ends failed on such an error: the
/// log has not been found whole yet.
#[tokio::test]
async fn a_store_error_in_the_check_behind_the_opening_fails_the_log() {
    let store = Arc::new(FakeStore::new());
    let (keys, _) = closed_log(&store, 300).await;
    store.corrupt_reads.store(1, Ordering::SeqCst);
    let log = open(&store, keys).await;
    let HistoryCheck::Failed(why) = log.history_checked().await else {
        panic!("{:?}", log.history_check());
    };
    assert!(why.contains("lock timeout"), "{why}");
}

/// A log of 35 entries whose broker stopped without closing it (a crash)
/// after signing a head over the first 30, with its keys (and pin) in `dir`.
async fn crashed_log(store: &Arc<FakeStore>, dir: &std::path::Path) -> LogKeys {
    let keys = LogKeys::load_or_create(dir).unwrap();
    let log = open(store, keys.clone()).await;
    log.append_many((0..30).map(event).collect()).await.unwrap();
    assert_eq!(log.sign_now().await.unwrap().tree_size, 30);
    log.append_many((30..35).map(event).collect()).await.unwrap();
    drop(log);
    keys
}

/// The pin beside the keys in `dir`: its tree size and state.
fn pin(dir: &std::path::Path) -> (u64, String) {
    let pin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(lienthong_audit::keys::PINNED_HEAD_FILE)).unwrap()).unwrap();
    (
        pin["tree_size"].as_u64().unwrap(),
        pin["state"].as_str().unwrap().to_owned(),
    )
}

/// A shutdown while the entries found past the head after a crash are still
/// being checked waits for the check, then closes the log with a head over
/// them, instead of failing the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_the_check_of_a_crash_tail_waits_for_it_and_closes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeStore::new());
    let keys = crashed_log(&store, dir.path()).await;
    store.hold_reads(true);
    let config = AuditConfig {
        shutdown_check_wait: Duration::from_secs(60),
        ..quiet()
    };
    let log = AuditLog::open(store.clone() as Arc<dyn Store>, keys, config)
        .await
        .unwrap();
    let closing = tokio::spawn({
        let log = log.clone();
        async move { log.shutdown().await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.reads_waiting() == 0 {
        assert!(!closing.is_finished(), "the shutdown did not wait: {:?}", closing.await);
        assert!(tokio::time::Instant::now() < deadline, "the tail's check never read it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Time for a shutdown that does not wait to get past its stop.
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.hold_reads(false);
    let head = closing.await.unwrap().unwrap().expect("a final head");
    assert_eq!(head.tree_size, 35);
    assert_eq!(store.heads(log.log_id()).last().unwrap().tree_size, 35);
    assert_eq!(pin(dir.path()), (35, "closed".to_owned()));
}

/// One whose check cannot end within the wait (a database slow to read)
/// stops cleanly too, leaving the log open with no head over them: the next
/// start checks them again and signs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_the_crash_tail_check_outlasts_leaves_the_log_open_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeStore::new());
    let keys = crashed_log(&store, dir.path()).await;
    store.hold_reads(true);
    let config = AuditConfig {
        shutdown_check_wait: Duration::from_millis(100),
        ..quiet()
    };
    let log = AuditLog::open(store.clone() as Arc<dyn Store>, keys.clone(), config)
        .await
        .unwrap();
    assert_eq!(log.shutdown().await.unwrap(), None);
    assert_eq!(
        store.heads(log.log_id()).last().unwrap().tree_size,
        30,
        "nothing signed"
    );
    assert_eq!(pin(dir.path()), (30, "open".to_owned()));
    store.hold_reads(false);
    drop(log);

    let log = open(&store, keys).await;
    assert_eq!(log.history_checked().await, HistoryCheck::Passed);
    assert_eq!(log.shutdown().await.unwrap().unwrap().tree_size, 35);
    assert_eq!(pin(dir.path()), (35, "closed".to_owned()));
}

/// A head is served (GetSignedTreeHead reads the database) from when it is
/// stored, a moment before the log has pinned it and knows it as signed: a
/// proof up to the head a client was just given is not refused meanwhile.
#[tokio::test]
async fn proofs_reach_a_head_stored_before_it_is_known_as_signed() {
    let store = Arc::new(FakeStore::new());
    let keys = LogKeys::generate().unwrap();
    let log = open(&store, keys.clone()).await;
    let id = log.log_id().to_string();
    for i in 0..4 {
        log.append(event(i)).await.unwrap();
    }
    let first = log.sign_now().await.unwrap();
    for i in 4..6 {
        log.append(event(i)).await.unwrap();
    }
    // The signer between storing the head and pinning it.
    let root = merkle::root(&stored_hashes(&store, &id));
    let second = keys.sign_tree_head(6, &root, first.timestamp_ms + 1);
    store
        .insert_tree_head(&lienthong_store::StoredTreeHead::from(&second))
        .await
        .unwrap();
    assert_eq!(log.latest_tree_head(&id).await.unwrap().tree_size, 6);
    let path = log.consistency_proof(&id, 4, 6).await.unwrap();
    assert!(merkle::verify_consistency(4, 6, &first.root_hash, &root, &path));
    let (leaf, path) = log.inclusion_proof(&id, 5, 6).await.unwrap();
    assert!(merkle::verify_inclusion(5, 6, &leaf, &path, &root));
    // Past it, still refused.
    assert!(matches!(
        log.consistency_proof(&id, 4, 7).await,
        Err(AuditError::OutOfRange(_))
    ));
}
