//! SQLite audit appends: group commit (batches of 500 in one transaction, one
//! fsync per batch) against one transaction (and fsync) per entry.
//!
//! `cargo bench -p lienthong-store --bench append` prints criterion's
//! throughput for both and a one-shot summary with the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput};
use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_store::{LogInfo, Store, StoreOptions, StoredEntry, open};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

const ENTRIES: u64 = 10_000;
const BATCH: usize = 500;
/// Per-entry commits are slow (one fsync each): fewer per sample keeps the bench short.
const SINGLE_ENTRIES: u64 = 1_000;

struct Log {
    store: Arc<dyn Store>,
    next: u64,
    _dir: tempfile::TempDir,
}

impl Log {
    fn open(rt: &tokio::runtime::Runtime) -> Log {
        // On the target disk, not a tmpfs, so fsync costs what it costs in production.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let url = format!("sqlite://{}/bench.db", dir.path().display());
        let options = StoreOptions {
            url,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        };
        let store = rt.block_on(open(&options)).unwrap();
        let log = LogInfo {
            log_id: "bench".into(),
            public_key: vec![1; 32],
            created_at: OffsetDateTime::now_utc(),
        };
        rt.block_on(store.ensure_log(&log)).unwrap();
        Log {
            store,
            next: 0,
            _dir: dir,
        }
    }

    fn next_entries(&mut self, n: u64) -> Vec<StoredEntry> {
        let first = self.next;
        self.next += n;
        (first..first + n).map(entry).collect()
    }

    /// Appends `n` entries in batches of `batch`, returning the time taken.
    fn append(&mut self, rt: &tokio::runtime::Runtime, n: u64, batch: usize) -> Duration {
        let entries = self.next_entries(n);
        let started = Instant::now();
        rt.block_on(async {
            for chunk in entries.chunks(batch) {
                self.store.append_entries(chunk).await.unwrap();
            }
        });
        started.elapsed()
    }
}

fn entry(sequence: u64) -> StoredEntry {
    let mut leaf_hash = [0u8; 32];
    leaf_hash[..8].copy_from_slice(&sequence.to_be_bytes());
    StoredEntry {
        log_id: "bench".into(),
        sequence,
        leaf_hash,
        // About the size of a real access event.
        leaf: format!(
            "{{\"time\":\"2025-03-01T10:00:00.123456Z\",\"kind\":\"access\",\"request_id\":\"req-{sequence:016}\",\
             \"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"actor\":\"tax-office\",\"provider\":\"civil-status\",\
             \"record_type\":\"ee.civil.person\",\"schema_version\":2,\"purpose\":\"tax\",\
             \"subject_hash\":\"{sequence:064x}\",\"fields_released\":[\"/full_name\",\"/birth_date\"],\
             \"outcome\":\"allowed\",\"reason\":\"\",\"payload_digest\":\"{:064x}\",\"latency_us\":1234,\"action\":\"\",\"target\":\"\"}}",
            sequence.wrapping_mul(31)
        ),
        time: OffsetDateTime::now_utc(),
        kind: EntryKind::Access,
        actor: "tax-office".into(),
        provider: "civil-status".into(),
        record_type: "ee.civil.person".into(),
        purpose: "tax".into(),
        outcome: Outcome::Allowed,
        subject_hash: format!("{sequence:064x}"),
    }
}

fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn bench_append(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("sqlite_append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));

    let mut log = Log::open(rt);
    group.throughput(Throughput::Elements(ENTRIES));
    group.bench_function("group_commit_10000_in_batches_of_500", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| log.append(rt, ENTRIES, BATCH)).sum())
    });

    let mut log = Log::open(rt);
    group.throughput(Throughput::Elements(SINGLE_ENTRIES));
    group.bench_function("one_transaction_per_entry", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| log.append(rt, SINGLE_ENTRIES, 1)).sum())
    });
    group.finish();
}

/// One timed run of 10,000 entries each way, with the ratio.
fn summary(rt: &tokio::runtime::Runtime) {
    let grouped = per_second(ENTRIES, Log::open(rt).append(rt, ENTRIES, BATCH));
    let single = per_second(ENTRIES, Log::open(rt).append(rt, ENTRIES, 1));
    println!(
        "sqlite append of {ENTRIES} entries: group commit (batches of {BATCH}) {grouped:.0} entries/s; \
         one transaction per entry {single:.0} entries/s; ratio {:.1}x",
        grouped / single
    );
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Criterion::default().configure_from_args();
    bench_append(&mut c, &rt);
    c.final_summary();
    summary(&rt);
}
