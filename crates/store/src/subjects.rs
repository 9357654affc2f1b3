//! Who accessed a citizen's data, on SQLite: sorted runs of postings
//! (subject hash, time, entry), written and merged behind the audit commits.
//!
//! An ordinary index on the entries' subject hashes puts each entry on a
//! random page of that index, because the hashes are random: every audit
//! commit then writes one page of it per entry, and the database file's sync
//! flushes them all again. Runs turn that into ordered writes, as a
//! log-structured merge tree does: entries past a log's `subject_indexed`
//! mark are the *tail*, read directly by a history query; every
//! [`RUN_ENTRIES`] entries of the tail become one run, written in key order;
//! [`FANOUT`] runs of a log and a level are merged into one of the next, up
//! to [`TOP_LEVEL`]. A posting is written three times, and a history is one
//! index search per live run (about 400 at 10^8 entries) plus the tail.
//! Each run indexes a contiguous range of one log's entries, and no run
//! holds more than 262,144, so [`verify`] can compare a run with its entries
//! in two megabytes.
//!
//! Every change is one short transaction on the audit writer's connection
//! (a few milliseconds: at most [`CHUNK_POSTINGS`] postings copied or
//! deleted), so commits wait behind at most one of them. Each posting is in
//! exactly one live run at every commit: a merge's target becomes live in
//! the transaction that retires its sources. PostgreSQL keeps an ordinary
//! index: there its writes are the database server's, not the broker's.

use crate::sql::db_err;
use crate::{Result, StoreError};
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Tail entries of a log that make a new run.
#[cfg(not(test))]
pub(crate) const RUN_ENTRIES: i64 = 4096;
/// Runs of this level are not merged: with 4,096 entries a run and eight
/// runs a merge, they hold 262,144 entries.
pub(crate) const TOP_LEVEL: i64 = 2;
/// Live runs of one level merged into one run of the next.
#[cfg(not(test))]
pub(crate) const FANOUT: i64 = 8;
/// Postings copied or deleted per transaction (a few milliseconds).
#[cfg(not(test))]
pub(crate) const CHUNK_POSTINGS: i64 = 4096;
// Small enough for tests to run through merges of merges and many chunks.
#[cfg(test)]
pub(crate) const RUN_ENTRIES: i64 = 6;
#[cfg(test)]
pub(crate) const FANOUT: i64 = 3;
#[cfg(test)]
pub(crate) const CHUNK_POSTINGS: i64 = 4;
/// How often the maintenance looks for work nobody woke it for.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// A citizen's history on SQLite: `$1` the subject HMAC's bytes, `$2` the
/// earliest time, `$3` the limit. The entries' own subject hash is checked
/// again, so a posting that names another entry shows nothing. The CROSS
/// JOINs fix the order SQLite, which has no statistics here, would otherwise
/// get wrong: the few runs and logs first, each searched by its key.
pub(crate) fn history_query() -> String {
    format!(
        "SELECT l.log_id, e.sequence, e.leaf_hash, e.leaf, e.time_us, e.kind, e.actor, e.provider, \
         e.record_type, e.purpose, e.outcome, e.subject_hash FROM ( \
             SELECT p.log_no, p.sequence FROM audit_subject_runs r \
             CROSS JOIN audit_subject_postings p ON p.run = r.run AND p.subject_hash = $1 \
                 AND p.time_us >= $2 AND p.time_us <= $4 \
             WHERE r.state = 'live' \
             UNION \
             SELECT t.log_no, t.sequence FROM audit_logs g \
             CROSS JOIN audit_entries t ON t.log_no = g.log_no AND t.sequence >= g.subject_indexed \
             WHERE t.subject_hash = $1 \
         ) AS hit \
         CROSS JOIN audit_entries e ON e.log_no = hit.log_no AND e.sequence = hit.sequence \
         JOIN audit_logs l ON l.log_no = e.log_no \
         WHERE e.subject_hash = $1 AND e.time_us >= $2 AND e.kind = 'access' AND {} \
         ORDER BY e.time_us DESC, l.log_id, e.sequence DESC LIMIT $3",
        crate::sql::HISTORY_AFTER
    )
}

/// Wakes the maintenance once enough entries were appended to make a run.
#[derive(Default)]
pub(crate) struct Waker {
    appended: AtomicU64,
    notify: Notify,
}

impl Waker {
    /// Counts `n` appended entries.
    pub(crate) fn appended(&self, n: usize) {
        let n = n as u64;
        let before = self.appended.fetch_add(n, Ordering::Relaxed);
        // Several logs share the count, so it only says when to look.
        if before + n >= RUN_ENTRIES.unsigned_abs() {
            self.appended.store(0, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }
}

/// Keeps the runs up to date for as long as the store lives: at start (a
/// tail left by the last run of the broker), when woken, and every
/// [`IDLE_CHECK`].
pub(crate) async fn maintain(writer: SqlitePool, waker: Arc<Waker>) {
    loop {
        loop {
            match step(&writer).await {
                // Commits queued meanwhile go first: the pool hands its one
                // connection out in the order it was asked for.
                Ok(true) => tokio::task::yield_now().await,
                Ok(false) => break,
                Err(e) => {
                    // History queries stay complete: the tail is read as it is.
                    tracing::warn!(error = %e, "the subject index could not be brought up to date; retrying later");
                    break;
                }
            }
        }
        tokio::select! {
            () = waker.notify.notified() => {}
            () = tokio::time::sleep(IDLE_CHECK) => {}
        }
    }
}

/// Does one transaction's worth of work; `false` when there was none.
pub(crate) async fn step(writer: &SqlitePool) -> Result<bool> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    // A long tail slows every history query down, so it goes first.
    let done = new_run(&mut tx).await? || merge_chunk(&mut tx).await? || plan_merge(&mut tx).await? || {
        delete_chunk(&mut tx).await?
    };
    if done {
        tx.commit().await.map_err(db_err)?;
    }
    Ok(done)
}

/// Turns the oldest [`RUN_ENTRIES`] tail entries of a log into a live run.
async fn new_run(tx: &mut Transaction<'static, Sqlite>) -> Result<bool> {
    let tail: Option<(i64, i64)> = sqlx::query_as(
        "SELECT log_no, subject_indexed FROM audit_logs WHERE size - subject_indexed >= $1 ORDER BY log_no LIMIT 1",
    )
    .bind(RUN_ENTRIES)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    let Some((log_no, from)) = tail else {
        return Ok(false);
    };
    let run: i64 = sqlx::query_scalar(
        "INSERT INTO audit_subject_runs (log_no, first_seq, end_seq, level, state, postings) \
         VALUES ($1, $2, $2 + $3, 0, 'live', 0) RETURNING run",
    )
    .bind(log_no)
    .bind(from)
    .bind(RUN_ENTRIES)
    .fetch_one(&mut **tx)
    .await
    .map_err(db_err)?;
    let postings = sqlx::query(
        "INSERT INTO audit_subject_postings (run, subject_hash, time_us, log_no, sequence) \
         SELECT $1, subject_hash, time_us, log_no, sequence FROM audit_entries \
         WHERE log_no = $2 AND sequence >= $3 AND sequence < $4 AND subject_hash IS NOT NULL AND kind = 'access' \
         ORDER BY subject_hash, time_us, log_no, sequence",
    )
    .bind(run)
    .bind(log_no)
    .bind(from)
    .bind(from + RUN_ENTRIES)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?
    .rows_affected();
    // A run without postings (administrative entries name nobody) is kept:
    // the runs must cover the log below its mark without a gap.
    sqlx::query("UPDATE audit_subject_runs SET postings = $2 WHERE run = $1")
        .bind(run)
        .bind(i64::try_from(postings).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    sqlx::query("UPDATE audit_logs SET subject_indexed = subject_indexed + $2 WHERE log_no = $1")
        .bind(log_no)
        .bind(RUN_ENTRIES)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(true)
}

/// The oldest run in `state` and the bounds of its next chunk.
async fn next_chunk(tx: &mut Transaction<'static, Sqlite>, state: &str) -> Result<Option<(i64, Chunk)>> {
    let run: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT run, postings, next_chunk FROM audit_subject_runs WHERE state = $1 ORDER BY run LIMIT 1",
    )
    .bind(state)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(run.map(|(run, postings, chunk)| (run, chunk_bounds(chunk, chunks(postings)))))
}

/// Above every subject hash (32 bytes; shorter ones in tests): the last
/// chunk's upper bound. A bound on both sides lets SQLite stop its range
/// scan at the chunk's end, where an optional one made it read every run to
/// its end for each chunk.
const PAST_EVERY_HASH: [u8; 64] = [0xff; 64];

/// Copies a chunk of a merge's sources into its target `$1`.
const MERGE_CHUNK: &str = "INSERT INTO audit_subject_postings (run, subject_hash, time_us, log_no, sequence) \
     SELECT $1, subject_hash, time_us, log_no, sequence FROM audit_subject_postings \
     WHERE run IN (SELECT run FROM audit_subject_runs WHERE merging_into = $1) \
     AND subject_hash >= $2 AND subject_hash < $3 \
     ORDER BY subject_hash, time_us, log_no, sequence";

/// Deletes a chunk of dead run `$1`'s postings.
const DELETE_CHUNK: &str =
    "DELETE FROM audit_subject_postings WHERE run = $1 AND subject_hash >= $2 AND subject_hash < $3";

/// Runs `sql` over one chunk: `$1` the run, `$2` and `$3` the chunk's bounds.
async fn on_chunk(tx: &mut Transaction<'static, Sqlite>, sql: &str, run: i64, (from, to): &Chunk) -> Result<()> {
    sqlx::query(sql)
        .bind(run)
        .bind(from.as_slice())
        .bind(to.as_ref().map_or(&PAST_EVERY_HASH[..], |t| t.as_slice()))
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Moves a run on to its next chunk.
async fn advance(tx: &mut Transaction<'static, Sqlite>, run: i64) -> Result<()> {
    sqlx::query("UPDATE audit_subject_runs SET next_chunk = next_chunk + 1 WHERE run = $1")
        .bind(run)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Copies the next chunk of a merge's sources into its target; the last
/// chunk makes the target live and its sources dead.
async fn merge_chunk(tx: &mut Transaction<'static, Sqlite>) -> Result<bool> {
    let Some((target, chunk)) = next_chunk(tx, "building").await? else {
        return Ok(false);
    };
    on_chunk(tx, MERGE_CHUNK, target, &chunk).await?;
    if chunk.1.is_some() {
        advance(tx, target).await?;
        return Ok(true);
    }
    // In one transaction, so each posting stays in exactly one live run.
    sqlx::query(
        "UPDATE audit_subject_runs SET state = 'dead', next_chunk = 0, merging_into = NULL WHERE merging_into = $1",
    )
    .bind(target)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    sqlx::query("UPDATE audit_subject_runs SET state = 'live', next_chunk = 0 WHERE run = $1")
        .bind(target)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(true)
}

/// Starts merging the oldest [`FANOUT`] live runs of a log and a level below
/// [`TOP_LEVEL`], the lowest level first. A level's runs are made in the
/// order of the entries they index, so the oldest are contiguous.
async fn plan_merge(tx: &mut Transaction<'static, Sqlite>) -> Result<bool> {
    let crowded: Option<(i64, i64)> = sqlx::query_as(
        "SELECT log_no, level FROM audit_subject_runs WHERE state = 'live' AND merging_into IS NULL AND level < $2 \
         GROUP BY log_no, level HAVING COUNT(*) >= $1 ORDER BY level, log_no LIMIT 1",
    )
    .bind(FANOUT)
    .bind(TOP_LEVEL)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    let Some((log_no, level)) = crowded else {
        return Ok(false);
    };
    let target: i64 = sqlx::query_scalar(
        "INSERT INTO audit_subject_runs (log_no, first_seq, end_seq, level, state, postings) \
         SELECT $1, MIN(first_seq), MAX(end_seq), $2 + 1, 'building', SUM(postings) FROM ( \
             SELECT first_seq, end_seq, postings FROM audit_subject_runs \
             WHERE state = 'live' AND merging_into IS NULL AND log_no = $1 AND level = $2 \
             ORDER BY run LIMIT $3) \
         RETURNING run",
    )
    .bind(log_no)
    .bind(level)
    .bind(FANOUT)
    .fetch_one(&mut **tx)
    .await
    .map_err(db_err)?;
    sqlx::query(
        "UPDATE audit_subject_runs SET merging_into = $1 WHERE run IN ( \
             SELECT run FROM audit_subject_runs \
             WHERE state = 'live' AND merging_into IS NULL AND log_no = $2 AND level = $3 \
             ORDER BY run LIMIT $4)",
    )
    .bind(target)
    .bind(log_no)
    .bind(level)
    .bind(FANOUT)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(true)
}

/// Deletes the next chunk of a dead run's postings, and the run once none
/// are left.
async fn delete_chunk(tx: &mut Transaction<'static, Sqlite>) -> Result<bool> {
    let Some((run, chunk)) = next_chunk(tx, "dead").await? else {
        return Ok(false);
    };
    on_chunk(tx, DELETE_CHUNK, run, &chunk).await?;
    if chunk.1.is_some() {
        advance(tx, run).await?;
    } else {
        sqlx::query("DELETE FROM audit_subject_runs WHERE run = $1")
            .bind(run)
            .execute(&mut **tx)
            .await
            .map_err(db_err)?;
    }
    Ok(true)
}

/// A chunk's subject-hash bounds: from, and to (none for the last chunk).
type Chunk = ([u8; 4], Option<[u8; 4]>);

/// Chunks a run of `postings` is copied or deleted in, by subject-hash
/// range: hashes are uniform, so each holds about [`CHUNK_POSTINGS`].
fn chunks(postings: i64) -> u64 {
    let n = postings.max(0).unsigned_abs().div_ceil(CHUNK_POSTINGS.unsigned_abs());
    n.clamp(1, 1 << 32)
}

/// Subject-hash range of chunk `k` of `n`: from a 4-byte prefix (a 32-byte
/// hash compares at or above it when its first bytes do) to the next chunk's,
/// or to the end for the last chunk.
fn chunk_bounds(k: i64, n: u64) -> Chunk {
    let k = k.max(0).unsigned_abs().min(n - 1);
    let prefix = |i: u64| {
        u32::try_from((u128::from(i) << 32) / u128::from(n))
            .unwrap_or(u32::MAX)
            .to_be_bytes()
    };
    (prefix(k), (k + 1 < n).then(|| prefix(k + 1)))
}

/// Postings read per statement by [`verify`].
const VERIFY_PAGE: i64 = 8192;

/// Checks a log's subject runs against its entries: the live runs cover
/// its entries below the mark without gap or overlap, and each holds exactly
/// one posting, with the entry's own subject hash and time, for each access
/// entry naming a subject in its range. A posting deleted or altered with
/// plain SQL would hide an access from the citizen's history, which the
/// entries' own check (their leaves and the signed root) cannot see.
///
/// Each run is read in one snapshot. A run merged away meanwhile is checked
/// through the live runs that now hold its entries.
pub(crate) async fn verify(pool: &SqlitePool, log_no: i64, log_id: &str) -> Result<()> {
    let runs = live_runs(pool, log_no, log_id).await?;
    verify_listed(pool, log_no, log_id, runs).await
}

/// A run as [`verify`] lists it: its id and the range of entries it indexes.
type Listed = (i64, i64, i64);

fn corrupt(log_id: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("the citizens' history index of log {log_id}: {why}"))
}

/// The log's live runs, in one snapshot, once they are found to tile its
/// indexed entries.
async fn live_runs(pool: &SqlitePool, log_no: i64, log_id: &str) -> Result<Vec<Listed>> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let mark: i64 = sqlx::query_scalar("SELECT subject_indexed FROM audit_logs WHERE log_no = $1")
        .bind(log_no)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    let runs: Vec<Listed> = sqlx::query_as(
        "SELECT run, first_seq, end_seq FROM audit_subject_runs WHERE log_no = $1 AND state = 'live' ORDER BY first_seq",
    )
    .bind(log_no)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    let mut covered = 0;
    for &(run, first, end) in &runs {
        if first != covered || end <= first || end - first > RUN_ENTRIES * FANOUT.pow(TOP_LEVEL.unsigned_abs() as u32) {
            return Err(corrupt(
                log_id,
                format!("run {run} indexes entries {first}..{end} where entries from {covered} were due"),
            ));
        }
        covered = end;
    }
    if covered != mark {
        return Err(corrupt(
            log_id,
            format!("its runs index entries 0..{covered}, its mark says 0..{mark}"),
        ));
    }
    Ok(runs)
}

/// Checks the listed runs. The entries of one merged away since it was
/// listed are in a run of a higher level, live in the merge's transaction:
/// those runs are listed again and checked, until every range was checked
/// in some run. Runs of [`TOP_LEVEL`] are never merged, so a range is
/// listed again at most that many times.
async fn verify_listed(pool: &SqlitePool, log_no: i64, log_id: &str, mut runs: Vec<Listed>) -> Result<()> {
    let mut relisted = 0;
    loop {
        let mut gone = Vec::new();
        for (run, first, end) in runs {
            let checked = verify_run(pool, log_no, (run, first, end)).await.map_err(|e| match e {
                StoreError::Corrupt(why) => corrupt(log_id, why),
                other => other,
            })?;
            if !checked {
                gone.push((first, end));
            }
        }
        let Some(&(first, end)) = gone.first() else {
            return Ok(());
        };
        if relisted >= TOP_LEVEL {
            return Err(corrupt(
                log_id,
                format!("the runs holding entries {first}..{end} left the live runs without a merge"),
            ));
        }
        runs = live_runs(pool, log_no, log_id)
            .await?
            .into_iter()
            .filter(|&(_, f, e)| gone.iter().any(|&(gf, ge)| f < ge && gf < e))
            .collect();
        relisted += 1;
    }
}

/// An entry's fingerprint as its posting must repeat it; never 0.
fn fingerprint(subject_hash: &[u8], time_us: i64, sequence: i64) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(subject_hash);
    h.update(time_us.to_be_bytes());
    h.update(sequence.to_be_bytes());
    let d = h.finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) | 1
}

/// Checks one run against its entries; `false` when it is no longer live.
async fn verify_run(pool: &SqlitePool, log_no: i64, (run, first, end): Listed) -> Result<bool> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let still: Option<i64> = sqlx::query_scalar("SELECT run FROM audit_subject_runs WHERE run = $1 AND state = 'live'")
        .bind(run)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
    if still.is_none() {
        return Ok(false);
    }
    // Slot i: the fingerprint entry first + i's posting must carry, 0 when
    // none is due (or it was seen).
    let len = usize::try_from(end - first).map_err(|_| StoreError::Corrupt(format!("run {run} is empty")))?;
    let mut due = vec![0u64; len];
    let mut from = first;
    while from < end {
        let to = end.min(from + VERIFY_PAGE);
        let rows: Vec<(i64, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT sequence, subject_hash, time_us FROM audit_entries \
             WHERE log_no = $1 AND sequence >= $2 AND sequence < $3 AND subject_hash IS NOT NULL AND kind = 'access'",
        )
        .bind(log_no)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        for (sequence, subject, time) in rows {
            if let Some(slot) = usize::try_from(sequence - first).ok().and_then(|i| due.get_mut(i)) {
                *slot = fingerprint(&subject, time, sequence);
            }
        }
        from = to;
    }
    let mut after: Option<(Vec<u8>, i64, i64, i64)> = None;
    loop {
        let page: Vec<(Vec<u8>, i64, i64, i64)> = match &after {
            None => sqlx::query_as(
                "SELECT subject_hash, time_us, log_no, sequence FROM audit_subject_postings WHERE run = $1 \
                 ORDER BY subject_hash, time_us, log_no, sequence LIMIT $2",
            )
            .bind(run)
            .bind(VERIFY_PAGE),
            Some((subject, time, log, sequence)) => sqlx::query_as(
                "SELECT subject_hash, time_us, log_no, sequence FROM audit_subject_postings WHERE run = $1 \
                 AND (subject_hash, time_us, log_no, sequence) > ($3, $4, $5, $6) \
                 ORDER BY subject_hash, time_us, log_no, sequence LIMIT $2",
            )
            .bind(run)
            .bind(VERIFY_PAGE)
            .bind(subject.clone())
            .bind(*time)
            .bind(*log)
            .bind(*sequence),
        }
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let full = page.len() as i64 == VERIFY_PAGE;
        for (subject, time, log, sequence) in &page {
            let slot = (*log == log_no)
                .then(|| usize::try_from(sequence - first).ok())
                .flatten()
                .and_then(|i| due.get_mut(i));
            match slot {
                Some(slot) if *slot == fingerprint(subject, *time, *sequence) => *slot = 0,
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "run {run} holds a posting for entry {sequence} of log number {log} that no entry of its range matches"
                    )));
                }
            }
        }
        after = page.into_iter().last();
        if !full {
            break;
        }
    }
    if let Some(i) = due.iter().position(|&d| d != 0) {
        return Err(StoreError::Corrupt(format!(
            "entry {} is missing from run {run}",
            first + i as i64
        )));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sql::{SqlStore, sqlite_store};
    use crate::{LogInfo, Store, StoreOptions, StoredEntry};
    use lienthong_core::audit::{EntryKind, Outcome};
    use proptest::prelude::*;
    use time::OffsetDateTime;

    const SUBJECTS: [&str; 4] = ["00aa", "7f01", "80ff", "ffee"];
    const LOGS: [&str; 2] = ["log-a", "log-b"];

    /// Every live posting against every entry below its log's mark, in one
    /// snapshot: each must be in exactly one live run.
    async fn assert_invariant(pool: &SqlitePool) {
        let mut tx = pool.begin().await.unwrap();
        let mut live: Vec<(Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT p.subject_hash, p.log_no, p.sequence FROM audit_subject_runs r \
             JOIN audit_subject_postings p ON p.run = r.run WHERE r.state = 'live'",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let mut expected: Vec<(Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT e.subject_hash, e.log_no, e.sequence FROM audit_entries e \
             JOIN audit_logs g ON g.log_no = e.log_no \
             WHERE e.sequence < g.subject_indexed AND e.subject_hash IS NOT NULL AND e.kind = 'access'",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        live.sort();
        expected.sort();
        assert_eq!(live, expected, "live postings against indexed entries");
    }

    fn entry(log: &str, sequence: u64, subject: Option<usize>, kind: EntryKind) -> StoredEntry {
        StoredEntry {
            log_id: log.into(),
            sequence,
            leaf_hash: [0; 32],
            leaf: "{}".into(),
            // Several entries share a time: the history breaks ties by log and sequence.
            time: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds((sequence / 2) as i64),
            kind,
            actor: "tax-office".into(),
            provider: "civil-status".into(),
            record_type: "ee.civil.person".into(),
            purpose: "tax".into(),
            outcome: Outcome::Allowed,
            subject_hash: subject.map_or_else(String::new, |s| SUBJECTS[s].into()),
        }
    }

    async fn store() -> (tempfile::TempDir, SqlStore, SqlitePool, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            url: String::new(),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        };
        let store = sqlite_store(dir.path().join("l.db").to_str().unwrap(), &options)
            .await
            .unwrap();
        // The tests take the steps themselves: a background step between
        // theirs (woken by their appends) would merge runs under them.
        store.stop_background();
        for log in LOGS {
            store
                .ensure_log(&LogInfo {
                    log_id: log.into(),
                    public_key: vec![log.len() as u8; 32],
                    created_at: OffsetDateTime::UNIX_EPOCH,
                })
                .await
                .unwrap();
        }
        let (pool, writer) = store.sqlite_pools().unwrap();
        (dir, store, pool, writer)
    }

    /// What a history must be: every access entry of the subject, newest
    /// first, ties by log and then by sequence, newest first.
    fn brute_force(appended: &[StoredEntry], subject: &str, since: i64) -> Vec<(String, u64)> {
        let mut hits: Vec<&StoredEntry> = appended
            .iter()
            .filter(|e| e.subject_hash == subject && e.kind == EntryKind::Access)
            .filter(|e| e.time.unix_timestamp() >= since)
            .collect();
        hits.sort_by(|a, b| {
            b.time
                .cmp(&a.time)
                .then_with(|| a.log_id.cmp(&b.log_id))
                .then_with(|| b.sequence.cmp(&a.sequence))
        });
        hits.into_iter().map(|e| (e.log_id.clone(), e.sequence)).collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append entries to a log: each a subject (or none) and whether it is an access.
        Append(usize, Vec<(Option<usize>, bool)>),
        /// Run this many maintenance steps.
        Steps(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0..LOGS.len(),
                prop::collection::vec((prop::option::of(0..SUBJECTS.len()), any::<bool>()), 1..20)
            )
                .prop_map(|(log, entries)| Op::Append(log, entries)),
            (0usize..12).prop_map(Op::Steps),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the appends and however far the maintenance got, each
        /// history is exactly the subject's access entries, and each indexed
        /// entry is in exactly one live run.
        #[test]
        fn histories_are_complete_at_every_step(ops in prop::collection::vec(op(), 1..14), since in 0i64..6) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (_dir, store, pool, writer) = store().await;
                let mut appended = Vec::new();
                let mut sizes = [0u64; 2];
                for op in ops {
                    match op {
                        Op::Append(log, batch) => {
                            let entries: Vec<StoredEntry> = batch
                                .into_iter()
                                .enumerate()
                                .map(|(i, (subject, access))| {
                                    let kind = if access { EntryKind::Access } else { EntryKind::AuditRead };
                                    entry(LOGS[log], sizes[log] + i as u64, subject, kind)
                                })
                                .collect();
                            sizes[log] += entries.len() as u64;
                            store.append_entries(&entries).await.unwrap();
                            appended.extend(entries);
                        }
                        Op::Steps(n) => {
                            for _ in 0..n {
                                step(&writer).await.unwrap();
                            }
                        }
                    }
                    assert_invariant(&pool).await;
                    for (log_no, log) in [(1, LOGS[0]), (2, LOGS[1])] {
                        verify(&pool, log_no, log).await.unwrap();
                    }
                    for subject in SUBJECTS {
                        let since_time = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(since);
                        let found: Vec<(String, u64)> = store
                            .subject_entries(subject, Some(since_time), None, 0)
                            .await
                            .unwrap()
                            .into_iter()
                            .map(|e| (e.log_id, e.sequence))
                            .collect();
                        prop_assert_eq!(found, brute_force(&appended, subject, since));
                    }
                }
                // Left alone, the maintenance finishes: no tail of a full run,
                // nothing building or dead, fewer than FANOUT runs per level.
                while step(&writer).await.unwrap() {}
                assert_invariant(&pool).await;
                let left: (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM audit_subject_runs WHERE state <> 'live'), \
                            (SELECT COUNT(*) FROM audit_logs WHERE size - subject_indexed >= $1)",
                )
                .bind(RUN_ENTRIES)
                .fetch_one(&pool)
                .await
                .unwrap();
                prop_assert_eq!(left, (0, 0));
                let crowded: Option<i64> = sqlx::query_scalar(
                    "SELECT level FROM audit_subject_runs WHERE level < $2 \
                     GROUP BY log_no, level HAVING COUNT(*) >= $1",
                )
                .bind(FANOUT)
                .bind(TOP_LEVEL)
                .fetch_optional(&pool)
                .await
                .unwrap();
                prop_assert_eq!(crowded, None);
                let orphans: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM audit_subject_postings WHERE run NOT IN (SELECT run FROM audit_subject_runs)",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                prop_assert_eq!(orphans, 0);
                Ok(())
            })?;
        }
    }

    /// Enough entries for merges of merges: they happen, and the histories
    /// read through them.
    #[tokio::test]
    async fn runs_are_merged_level_by_level() {
        let (_dir, store, pool, writer) = store().await;
        let entries: Vec<StoredEntry> = (0..120)
            .map(|i| entry(LOGS[0], i, Some((i % 4) as usize), EntryKind::Access))
            .collect();
        for batch in entries.chunks(7) {
            store.append_entries(batch).await.unwrap();
        }
        while step(&writer).await.unwrap() {}
        let levels: Vec<(i64, i64)> =
            sqlx::query_as("SELECT level, COUNT(*) FROM audit_subject_runs GROUP BY level ORDER BY level")
                .fetch_all(&pool)
                .await
                .unwrap();
        // 120 entries: 20 runs of 6, merged by threes into 6 of 18, then 2 of 54.
        assert_eq!(levels, [(0, 2), (2, 2)]);
        assert_invariant(&pool).await;
        for subject in SUBJECTS {
            let found = store.subject_entries(subject, None, None, 0).await.unwrap();
            assert_eq!(found.len(), 30, "{subject}");
        }
    }

    /// A database written before runs existed: its entries are indexed
    /// in the background, and histories find them before and after.
    #[tokio::test]
    async fn a_log_from_before_runs_is_indexed_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let pool = SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
            let all = &crate::sql::SQLITE_MIGRATOR;
            let before = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(all.migrations[..5].to_vec()),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            before.run(&pool).await.unwrap();
            sqlx::query(
                "INSERT INTO audit_logs (log_id, public_key, created_at_us, size, log_no) VALUES ('log-a', x'01', 0, 5, 1)",
            )
            .execute(&pool)
            .await
            .unwrap();
            for (sequence, kind, subject) in [
                (0, "access", Some("00aa")),
                (1, "admin", None),
                (2, "access", Some("7f01")),
                (3, "audit_read", Some("00aa")),
                (4, "access", Some("00aa")),
            ] {
                sqlx::query(
                    "INSERT INTO audit_entries VALUES (1, $1, zeroblob(32), '{}', $1, $2, 'a', 'p', 'r', 'u', 'allowed', unhex($3))",
                )
                .bind(sequence)
                .bind(kind)
                .bind(subject)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let options = StoreOptions {
            url: String::new(),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
            allow_unverified_postgres: false,
        };
        let store = sqlite_store(path.to_str().unwrap(), &options).await.unwrap();
        let (pool, writer) = store.sqlite_pools().unwrap();
        let history = || async {
            let found = store.subject_entries("00aa", None, None, 0).await.unwrap();
            found.into_iter().map(|e| e.sequence).collect::<Vec<u64>>()
        };
        assert_eq!(history().await, [4, 0], "read from the entries");
        store
            .append_entries(&[entry("log-a", 5, Some(0), EntryKind::Access)])
            .await
            .unwrap();
        while step(&writer).await.unwrap() {}
        let runs: Vec<(i64, i64, i64)> = sqlx::query_as("SELECT first_seq, end_seq, postings FROM audit_subject_runs")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(runs, [(0, 6, 4)]);
        assert_eq!(history().await, [5, 4, 0], "read from the run");
        verify(&pool, 1, "log-a").await.unwrap();
        let index: Option<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE name = 'audit_entries_by_subject'")
                .fetch_optional(&pool)
                .await
                .unwrap();
        assert_eq!(index, None, "the index on the entries is gone");
    }

    /// Plain SQL that would hide an access from a citizen's history, or show
    /// one that did not happen, is found.
    #[tokio::test]
    async fn altered_runs_are_found() {
        let tampering = [
            (
                "DELETE FROM audit_subject_postings WHERE sequence = 7",
                "entry 7 is missing",
            ),
            (
                "UPDATE audit_subject_postings SET subject_hash = x'7f01' WHERE sequence = 8 AND subject_hash <> x'7f01'",
                "posting for entry 8",
            ),
            (
                "UPDATE audit_subject_postings SET time_us = time_us + 1 WHERE sequence = 9",
                "posting for entry 9",
            ),
            (
                "INSERT INTO audit_subject_postings SELECT run, x'00aa', 0, 1, 3 FROM audit_subject_runs LIMIT 1",
                "posting for entry 3",
            ),
            ("DELETE FROM audit_subject_runs WHERE first_seq = 18", "run"),
            (
                "UPDATE audit_logs SET subject_indexed = 6 WHERE log_no = 1",
                "mark says 0..6",
            ),
        ];
        for (sql, expected) in tampering {
            let (_dir, store, pool, writer) = store().await;
            let entries: Vec<StoredEntry> = (0..30)
                .map(|i| entry(LOGS[0], i, Some((i % 4) as usize), EntryKind::Access))
                .collect();
            store.append_entries(&entries).await.unwrap();
            while step(&writer).await.unwrap() {}
            verify(&pool, 1, LOGS[0]).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            let found = verify(&pool, 1, LOGS[0]).await.map_err(|e| e.to_string());
            let Err(found) = found else { panic!("{sql}: not found") };
            assert!(found.contains(expected) && found.contains("log-a"), "{sql}: {found}");
        }
    }

    /// Runs `sql` (when given), then checks the runs of log-a listed before it.
    async fn alter_and_check(
        pool: &SqlitePool,
        listed: Vec<Listed>,
        sql: Option<&str>,
    ) -> std::result::Result<(), String> {
        if let Some(sql) = sql {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        verify_listed(pool, 1, LOGS[0], listed).await.map_err(|e| e.to_string())
    }

    /// A run merged away between the check's listing and its turn is checked
    /// through the merge's run: a posting deleted from that run is found.
    #[tokio::test]
    async fn a_run_merged_during_the_check_is_checked_in_its_merge() {
        for tamper in [false, true] {
            let (_dir, store, pool, writer) = store().await;
            // Three runs of level 0, then their merge into one of level 1.
            let entries: Vec<StoredEntry> = (0..18)
                .map(|i| entry(LOGS[0], i, Some((i % 4) as usize), EntryKind::Access))
                .collect();
            store.append_entries(&entries).await.unwrap();
            for _ in 0..3 {
                assert!(step(&writer).await.unwrap());
            }
            let listed = live_runs(&pool, 1, LOGS[0]).await.unwrap();
            assert_eq!(listed.len(), 3, "{listed:?}");
            while step(&writer).await.unwrap() {}
            let merged: Vec<(i64, i64)> =
                sqlx::query_as("SELECT level, end_seq FROM audit_subject_runs WHERE state = 'live'")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            assert_eq!(merged, [(1, 18)]);
            let deleted = tamper.then_some("DELETE FROM audit_subject_postings WHERE sequence = 7");
            let found = alter_and_check(&pool, listed, deleted).await;
            if tamper {
                let Err(found) = found else {
                    panic!("the posting deleted from the merge was not found")
                };
                assert!(found.contains("entry 7 is missing"), "{found}");
            } else {
                found.unwrap();
            }
        }
    }

    /// A run that leaves the live runs without a merge is a gap, found when
    /// the runs are listed again.
    #[tokio::test]
    async fn a_run_retired_during_the_check_without_a_merge_is_found() {
        let (_dir, store, pool, writer) = store().await;
        let entries: Vec<StoredEntry> = (0..12)
            .map(|i| entry(LOGS[0], i, Some((i % 4) as usize), EntryKind::Access))
            .collect();
        store.append_entries(&entries).await.unwrap();
        while step(&writer).await.unwrap() {}
        let listed = live_runs(&pool, 1, LOGS[0]).await.unwrap();
        let retired = "UPDATE audit_subject_runs SET state = 'dead' WHERE first_seq = 6";
        let found = alter_and_check(&pool, listed, Some(retired)).await;
        let Err(found) = found else {
            panic!("a retired run was not found")
        };
        assert!(found.contains("mark says 0..12") && found.contains("log-a"), "{found}");
    }

    /// A chunk reads its range of each run and no more: a chunk that read
    /// every run to its end made merging a run of 262,144 entries quadratic.
    #[tokio::test]
    async fn chunks_are_searched_between_both_bounds() {
        let (_dir, _store, pool, _) = store().await;
        for sql in [MERGE_CHUNK, DELETE_CHUNK] {
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&pool)
                .await
                .unwrap();
            let plan = plan.into_iter().map(|(_, _, _, d)| d).collect::<Vec<_>>().join("; ");
            assert!(
                plan.contains(
                    "SEARCH audit_subject_postings USING PRIMARY KEY (run=? AND subject_hash>? AND subject_hash<?)"
                ),
                "{sql}: {plan}"
            );
        }
    }

    /// Chunks cover every hash exactly once, whatever their number.
    #[test]
    fn chunks_partition_the_hashes() {
        for n in [1u64, 2, 3, 7, 1000, 1 << 32] {
            let (first, _) = chunk_bounds(0, n);
            assert_eq!(first, [0; 4]);
            let (_, last) = chunk_bounds(i64::try_from(n - 1).unwrap(), n);
            assert_eq!(last, None);
            for k in 0..n.min(50) {
                let (_, to) = chunk_bounds(k as i64, n);
                if let Some(to) = to {
                    assert_eq!(chunk_bounds(k as i64 + 1, n).0, to);
                    assert!(chunk_bounds(k as i64, n).0 < to);
                }
            }
        }
        assert_eq!(chunks(0), 1);
        assert_eq!(chunks(CHUNK_POSTINGS + 1), 2);
    }
}
