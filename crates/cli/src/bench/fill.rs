//! `--log-entries`: the broker's audit log filled before the phases, so that
//! lookups are measured against a log the size a deployment reaches, not an
//! empty one.
//!
//! An entry's row goes at the right edge of every index of `audit_entries`
//! but one: the citizens' index is keyed by the subject's HMAC, so each entry
//! lands on a random page of it. Once that index outgrows SQLite's page cache,
//! commits read pages back and write more of them; an empty log never shows it.

use super::Progress;
use crate::federation::CIVIL_STATUS;
use anyhow::{Context, Result, anyhow};
use lienthong::v1 as pb;
use lienthong_audit::{AuditConfig, AuditLog, HistoryCheck, LogKeys};
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_store::StoreOptions;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Events handed to the writer at once: large enough for full group commits.
const CHUNK: u64 = 4_096;
/// On a terminal the progress line is redrawn this often; otherwise a line
/// is printed every [`LOG_EVERY`].
const REDRAW_EVERY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What filling the log took (`log_fill` in the JSON).
#[derive(Debug, Clone, Serialize)]
pub(super) struct FillReport {
    /// Entries the log held before the phases (the fill and the set-up's own).
    pub entries: u64,
    /// Entries the bench appended.
    pub appended: u64,
    pub seconds: f64,
    /// Time the broker took, once restarted, to check the filled history
    /// against its signed root (the phases wait for it).
    pub history_check_s: f64,
}

/// Appends `count` accesses of the bench's consumer, purpose and fields to the
/// audit log of the broker whose config is `config`, each for a subject of its
/// own. The broker must be stopped: the log has one writer.
///
/// The entries go through the audit crate as the broker writes its own (leaf,
/// Merkle tree nodes, group commits, a signed tree head at the end), so the
/// restarted broker opens and checks them like any history.
pub(super) async fn fill(
    config: &Path,
    grant: &pb::CreateGrantRequest,
    count: u64,
    seed: u64,
    progress: &Progress,
) -> Result<(u64, f64)> {
    let config = lienthong_broker::config::Config::load(Some(config), Vec::new())
        .with_context(|| format!("reading the broker's config {}", config.display()))?;
    // As `serve` takes it: appending while a broker runs on the directory
    // would interleave two writers' entries in one log under one key.
    let _data_dir = lienthong_broker::server::lock_data_dir(&config.data_dir)
        .context("the bench fills the audit log of a stopped broker only")?;
    let store = lienthong_store::open(&StoreOptions {
        url: config.database_url(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(30),
        allow_unverified_postgres: false,
    })
    .await
    .context("opening the broker's database")?;
    let keys = LogKeys::load_or_create(&config.data_dir).context("loading the broker's audit keys")?;
    // The log's own claim, as `serve` takes it: a broker on this database
    // from another data directory holds it.
    let _claim = store
        .claim_log(&keys.log_id())
        .await
        .context("claiming the broker's audit log")?
        .ok_or_else(|| {
            anyhow!(
                "another broker is writing this audit log ({}); the bench fills the audit log of a stopped broker only",
                config.database_url()
            )
        })?;
    let log = AuditLog::open(
        store.clone(),
        keys,
        AuditConfig {
            max_batch: CHUNK as usize,
            ..AuditConfig::default()
        },
    )
    .await
    .context("opening the broker's audit log")?;
    // The set-up's own entries are a few dozen: checking them is immediate.
    if let HistoryCheck::Failed(why) = log.history_checked().await {
        return Err(anyhow!("the broker's audit log failed its check before filling: {why}"));
    }
    let purpose = grant
        .purposes
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the bench's grant names no purpose"))?;
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6c69_656e_7468_6f6e);
    let started = Instant::now();
    let (mut shown, mut logged) = (started, started);
    let mut appended = 0;
    progress.line(&format!("bench: filling the broker's audit log with {count} entries"));
    while appended < count {
        let n = CHUNK.min(count - appended);
        let time = time::OffsetDateTime::now_utc();
        let events = (0..n)
            .map(|_| {
                let mut e = AuditEvent::new(EntryKind::Access, time);
                e.request_id = uuid_shaped(rng.r#gen());
                e.actor = grant.consumer.clone();
                e.provider = CIVIL_STATUS.into();
                e.record_type = grant.record_type.clone();
                e.schema_version = 1;
                e.purpose = purpose.clone();
                // A subject key of its own per entry: a country's citizens, not the bench's thousand.
                e.subject_hash = log.subject_hash(&format!("filler-{:016x}", rng.r#gen::<u64>()));
                e.fields_released = grant.fields.clone();
                e.outcome = Outcome::Allowed;
                e.payload_digest = hex::encode(rng.r#gen::<[u8; 32]>());
                e.latency_us = rng.gen_range(500..5_000);
                e
            })
            .collect();
        log.append_many(events)
            .await
            .context("appending to the broker's audit log")?;
        appended += n;
        let now = Instant::now();
        let rate = appended as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let line = format!("bench: filling the broker's audit log: {appended} of {count} entries, {rate:.0}/s");
        if now.duration_since(shown) >= REDRAW_EVERY {
            progress.update(&line);
            shown = now;
        }
        if !progress.is_tty() && now.duration_since(logged) >= LOG_EVERY {
            progress.line(&line);
            logged = now;
        }
    }
    let size = log.size();
    log.shutdown().await.context("closing the broker's audit log")?;
    // The broker is restarted on this database next: nothing of this
    // process may still hold its write lock then (SQLite's subject runs
    // are still being made behind the fill).
    store.close().await;
    Ok((size, started.elapsed().as_secs_f64()))
}

/// A request id shaped as the broker's own (a hyphenated UUID), so that
/// filled entries are as long as real ones.
fn uuid_shaped(bits: u128) -> String {
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// How long the restarted broker may take to check a history of `entries`:
/// about 2 s per million on the development VM, with room for a slow disk.
pub(super) fn check_timeout(entries: u64) -> Duration {
    Duration::from_secs(60 + entries / 50_000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn filled_request_ids_look_like_the_brokers() {
        let id = uuid_shaped(0x0197_a000_0000_7000_8000_0000_0000_002a);
        assert_eq!(id, "0197a000-0000-7000-8000-00000000002a");
        assert_eq!(uuid_shaped(u128::MAX).len(), 36);
    }

    /// The bench's birth-record grant, as it fills the log with.
    fn grant() -> pb::CreateGrantRequest {
        crate::federation::demo_grants().into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn a_data_directory_a_broker_holds_is_not_filled() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let certs = dir.path().join("certs");
        crate::federation::make_certs(&certs, "bench.test").unwrap();
        let config =
            super::super::write_broker_config(dir.path(), "broker.toml", &data, None, &certs, "bench.test").unwrap();
        let held = lienthong_broker::server::lock_data_dir(&data).unwrap();
        let err = fill(&config, &grant(), 10, 1, &Progress::new()).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("stopped broker only") && text.contains("broker.lock"),
            "{text}"
        );
        assert!(!data.join("lienthong.db").exists(), "nothing was written");
        // Once the broker is gone, the same directory is filled.
        drop(held);
        let (size, _) = fill(&config, &grant(), 10, 1, &Progress::new()).await.unwrap();
        assert_eq!(size, 10);
    }
}
