//! Merkle costs of the audit log: appending to the in-memory frontier (paid per
//! entry by the writer), producing plus checking an inclusion proof in a
//! 100k-entry tree in memory, serving one from a log on SQLite (paid per
//! `GetInclusionProof` call) and opening that log (paid at every start): from
//! the tree nodes the writer stores, against the earlier way, hashing every
//! stored leaf hash. Last, the check of a 300k-entry log's stored history
//! that runs behind every opening, on entries the size of the broker's.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lienthong_audit::merkle::{self, Frontier, Hash};
use lienthong_audit::{AuditConfig, AuditLog, HistoryCheck, LogKeys};
use lienthong_core::audit::{AuditEvent, EntryKind};
use lienthong_store::{Store, StoreOptions};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

const LOG_SIZE: u64 = 100_000;

fn leaves(n: u64) -> Vec<Hash> {
    (0..n)
        .map(|i| merkle::leaf_hash(format!("{{\"request_id\":\"req-{i}\"}}").as_bytes()))
        .collect()
}

fn frontier_push(c: &mut Criterion) {
    let tree = leaves(LOG_SIZE);
    let next = merkle::leaf_hash(b"next entry");
    let mut group = c.benchmark_group("frontier");
    group.bench_function("push onto 100k", |b| {
        b.iter_batched_ref(
            || Frontier::from_leaves(&tree),
            |frontier| frontier.push(black_box(next)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("push + root onto 100k", |b| {
        b.iter_batched_ref(
            || Frontier::from_leaves(&tree),
            |frontier| {
                frontier.push(black_box(next));
                black_box(frontier.root())
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn inclusion(c: &mut Criterion) {
    let tree = leaves(LOG_SIZE);
    let root = merkle::root(&tree);
    let index = LOG_SIZE * 3 / 7;
    let proof = merkle::inclusion_proof(index, &tree);
    let mut group = c.benchmark_group("inclusion 100k");
    group.sample_size(20);
    group.bench_function("generate", |b| {
        b.iter(|| merkle::inclusion_proof(black_box(index), &tree))
    });
    group.bench_function("verify", |b| {
        b.iter(|| merkle::verify_inclusion(black_box(index), LOG_SIZE, &tree[index as usize], &proof, &root))
    });
    group.bench_function("generate + verify", |b| {
        b.iter(|| {
            let proof = merkle::inclusion_proof(black_box(index), &tree);
            assert!(merkle::verify_inclusion(
                index,
                LOG_SIZE,
                &tree[index as usize],
                &proof,
                &root
            ));
        })
    });
    group.finish();
}

/// Entries of the log proofs are served from: past a power of two, so the
/// proof has a partial right edge as a live log's does.
const SERVED_LOG_SIZE: u64 = 300_000;

fn event(i: u64) -> AuditEvent {
    let time = OffsetDateTime::from_unix_timestamp(1_750_000_000 + i as i64).expect("a valid time");
    let mut e = AuditEvent::new(EntryKind::Access, time);
    e.request_id = format!("req-{i}");
    e.actor = "tax-board".into();
    e.provider = "civil-registry".into();
    e.record_type = "person".into();
    e.purpose = "income-tax-assessment".into();
    e.subject_hash = format!("{:064x}", i % 10_000);
    e
}

fn served(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = LogKeys::generate().unwrap();
    let (store, log) = runtime.block_on(async {
        let store = lienthong_store::open(&StoreOptions {
            url: format!("sqlite://{}", dir.path().join("lienthong.db").display()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        })
        .await
        .unwrap();
        let log = AuditLog::open(store.clone(), keys.clone(), quiet()).await.unwrap();
        let mut next = 0;
        while next < SERVED_LOG_SIZE {
            let to = SERVED_LOG_SIZE.min(next + 512);
            log.append_many((next..to).map(event).collect()).await.unwrap();
            next = to;
        }
        // Proofs are served up to the newest signed head.
        log.sign_now().await.unwrap();
        (store, log)
    });
    let log_id = log.log_id().to_owned();
    let index = SERVED_LOG_SIZE * 3 / 7;
    let mut group = c.benchmark_group("inclusion proof served from a 300k-entry log on SQLite");
    group.sample_size(10);
    group.bench_function("from stored tree nodes", |b| {
        b.iter(|| {
            runtime
                .block_on(log.inclusion_proof(&log_id, black_box(index), SERVED_LOG_SIZE))
                .unwrap()
        })
    });
    group.bench_function("from every leaf hash (before the sixteenth round)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut leaves = Vec::with_capacity(SERVED_LOG_SIZE as usize);
                let mut from = 0;
                while from < SERVED_LOG_SIZE {
                    let to = SERVED_LOG_SIZE.min(from + 65_536);
                    leaves.extend(store.leaf_hashes(&log_id, from, to).await.unwrap());
                    from = to;
                }
                merkle::inclusion_proof(black_box(index), &leaves)
            })
        })
    });
    group.finish();
    runtime.block_on(log.shutdown()).unwrap();
    drop(log);

    let mut group = c.benchmark_group("opening a 300k-entry log on SQLite");
    group.sample_size(10);
    group.bench_function("from stored tree nodes, history checked behind", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let log = AuditLog::open(store.clone(), keys.clone(), quiet()).await.unwrap();
                log.shutdown().await.unwrap();
            })
        })
    });
    group.bench_function("rehashing every leaf hash first (before the sixteenth round)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut frontier = Frontier::new();
                let mut from = 0;
                while from < SERVED_LOG_SIZE {
                    let to = SERVED_LOG_SIZE.min(from + 65_536);
                    frontier.extend(&store.leaf_hashes(&log_id, from, to).await.unwrap());
                    from = to;
                }
                black_box(frontier.root())
            })
        })
    });
    group.finish();
    drop::<Arc<dyn Store>>(store);
}

/// An access entry shaped as the broker's own (a UUID request id, a trace
/// id, eighteen released fields, a payload digest): its leaf is 903 bytes.
fn broker_sized_event(i: u64) -> AuditEvent {
    let mut e = event(i);
    e.request_id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i,
        i % 65_536,
        i % 4096,
        i % 4096,
        i
    );
    e.trace_id = format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    e.actor = "hanoi-judicial-office".into();
    e.provider = "civil-status".into();
    e.record_type = "civil_status.birth_record".into();
    e.schema_version = 1;
    e.purpose = "judicial-record-certificate".into();
    e.subject_hash = hex::encode(merkle::leaf_hash(&i.to_le_bytes()));
    e.fields_released = [
        "/full_name",
        "/birth_date",
        "/birth_place/province",
        "/birth_place/district",
        "/sex",
        "/ethnicity",
        "/nationality",
        "/father/full_name",
        "/father/national_id",
        "/mother/full_name",
        "/mother/national_id",
        "/registration/office",
        "/registration/number",
        "/registration/date",
        "/spouse/full_name",
        "/spouse/national_id",
        "/death_date",
        "/residence/province",
    ]
    .map(String::from)
    .to_vec();
    e.payload_digest = hex::encode(merkle::leaf_hash(&(i + 1).to_le_bytes()));
    e.latency_us = 1_000 + i % 4_000;
    e
}

/// The check of the whole stored history against the signed root, which
/// runs behind every opening of a log: opening a 300k-entry log of
/// broker-sized entries and waiting for the check (shutdown included).
fn history(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = LogKeys::generate().unwrap();
    let store = runtime.block_on(async {
        let store = lienthong_store::open(&StoreOptions {
            url: format!("sqlite://{}", dir.path().join("lienthong.db").display()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        })
        .await
        .unwrap();
        let log = AuditLog::open(store.clone(), keys.clone(), quiet()).await.unwrap();
        let mut next = 0;
        while next < SERVED_LOG_SIZE {
            let to = SERVED_LOG_SIZE.min(next + 512);
            log.append_many((next..to).map(broker_sized_event).collect())
                .await
                .unwrap();
            next = to;
        }
        // The subject runs are made behind the appends: let them catch up,
        // so the check below reads them all.
        let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("lienthong.db").display()))
            .await
            .unwrap();
        loop {
            let (tail, pending): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT MAX(size - subject_indexed) FROM audit_logs), \
                        (SELECT COUNT(*) FROM audit_subject_runs WHERE state <> 'live')",
            )
            .fetch_one(&raw)
            .await
            .unwrap();
            if tail < 4096 && pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        raw.close().await;
        let log_id = log.log_id().to_owned();
        log.shutdown().await.unwrap();
        (store, log_id)
    });
    let (store, log_id) = store;
    let mut group = c.benchmark_group("check of a 300k-entry log's subject runs on SQLite");
    group.sample_size(10);
    group.bench_function("every run against its entries", |b| {
        b.iter(|| runtime.block_on(store.check_subject_index(&log_id)).unwrap())
    });
    group.finish();
    let mut group = c.benchmark_group("history check of a 300k-entry log on SQLite");
    group.sample_size(10);
    group.bench_function("open, check the history, shut down", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let log = AuditLog::open(store.clone(), keys.clone(), quiet()).await.unwrap();
                assert_eq!(log.history_checked().await, HistoryCheck::Passed);
                log.shutdown().await.unwrap();
            })
        })
    });
    group.finish();
    drop::<Arc<dyn Store>>(store);
}

fn quiet() -> AuditConfig {
    AuditConfig {
        sign_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    }
}

criterion_group!(benches, frontier_push, inclusion, served, history);
criterion_main!(benches);
