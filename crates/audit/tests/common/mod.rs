//! Shared test support: an in-memory `Store` holding only the audit tables,
//! which can be told to fail (before or after "committing") and to be slow.
#![allow(clippy::unwrap_used, dead_code)]

use async_trait::async_trait;
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_core::{Endpoint, Grant, Member, RecordTypeVersion, RevokedCertificate};
use lienthong_store::{
    Backend, EntryQuery, GrantQuery, GrantRevocation, HistoryCursor, LogInfo, RateTake, Result, Store, StoreError,
    StoredEntry, StoredTreeHead, TreeNode,
};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Default)]
struct Tables {
    logs: Vec<LogInfo>,
    entries: BTreeMap<String, Vec<StoredEntry>>,
    heads: BTreeMap<String, Vec<StoredTreeHead>>,
    /// Tree nodes by log, keyed by `(level, index)`.
    nodes: BTreeMap<String, BTreeMap<(u32, u64), [u8; 32]>>,
    subject_key: Option<String>,
}

/// In-memory audit store with fault injection.
#[derive(Default)]
pub struct FakeStore {
    tables: Mutex<Tables>,
    /// Every call fails `Unavailable` without writing.
    pub fail: AtomicBool,
    /// `append_entries` writes, then reports failure (a connection lost after COMMIT).
    pub fail_after_commit: AtomicBool,
    /// Every call answers that stored data cannot be decoded, without writing.
    pub corrupt: AtomicBool,
    /// `append_entries` hangs instead of writing, and its batch lands at the
    /// start of the next `append_entries` call: a commit the writer gave up
    /// that the database carried out later.
    pub land_late: AtomicBool,
    late: Mutex<Vec<(Vec<StoredEntry>, Vec<TreeNode>)>>,
    delay: Mutex<Duration>,
    batches: Mutex<Vec<usize>>,
    /// The next this many `entries_in_range` calls fail `Corrupt`, as
    /// PostgreSQL's errors outside the connection and resource classes (a
    /// lock timeout, a snapshot too old) come back.
    pub corrupt_reads: std::sync::atomic::AtomicU64,
    /// While true, `entries_in_range` calls wait (a database slow to read).
    reads_held: tokio::sync::watch::Sender<bool>,
    /// `entries_in_range` calls waiting for `reads_held` to be lifted.
    reads_waiting: std::sync::atomic::AtomicU64,
    /// Leaf hashes handed out by `leaf_hashes` and `entries_in_range`, in all.
    pub leaf_hashes_read: std::sync::atomic::AtomicU64,
}

impl FakeStore {
    pub fn new() -> Self {
        FakeStore::default()
    }

    /// Each `append_entries` takes this long, as an fsync would.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Holds `entries_in_range` calls until called with `false`.
    pub fn hold_reads(&self, held: bool) {
        self.reads_held.send_replace(held);
    }

    /// `entries_in_range` calls held now.
    pub fn reads_waiting(&self) -> u64 {
        self.reads_waiting.load(Ordering::SeqCst)
    }

    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Sizes of the successful `append_entries` calls, in order.
    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    pub fn entries(&self, log_id: &str) -> Vec<StoredEntry> {
        self.tables
            .lock()
            .unwrap()
            .entries
            .get(log_id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn heads(&self, log_id: &str) -> Vec<StoredTreeHead> {
        self.tables
            .lock()
            .unwrap()
            .heads
            .get(log_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Rewrites one stored row, as an attacker with database access would.
    pub fn tamper(&self, log_id: &str, sequence: usize, f: impl FnOnce(&mut StoredEntry)) {
        let mut tables = self.tables.lock().unwrap();
        f(&mut tables.entries.get_mut(log_id).unwrap()[sequence]);
    }

    /// The stored tree nodes of a log.
    pub fn nodes(&self, log_id: &str) -> BTreeMap<(u32, u64), [u8; 32]> {
        self.tables
            .lock()
            .unwrap()
            .nodes
            .get(log_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Deletes a log's tree nodes, as a database from before they were stored holds none.
    pub fn forget_nodes(&self, log_id: &str) {
        self.tables.lock().unwrap().nodes.remove(log_id);
    }

    /// Rewrites a stored tree node.
    pub fn tamper_node(&self, log_id: &str, key: (u32, u64), hash: [u8; 32]) {
        self.tables
            .lock()
            .unwrap()
            .nodes
            .entry(log_id.to_owned())
            .or_default()
            .insert(key, hash);
    }

    /// Deletes the newest rows, as a rollback would.
    pub fn truncate(&self, log_id: &str, len: usize) {
        self.tables
            .lock()
            .unwrap()
            .entries
            .get_mut(log_id)
            .unwrap()
            .truncate(len);
    }

    /// Appends a batch if it continues the log, with its nodes.
    fn write(&self, entries: &[StoredEntry], nodes: &[TreeNode]) -> Result<()> {
        let mut tables = self.tables.lock().unwrap();
        for (i, entry) in entries.iter().enumerate() {
            let Some(log) = tables.entries.get(&entry.log_id) else {
                return Err(StoreError::NotFound {
                    what: format!("log {}", entry.log_id),
                });
            };
            let expected = log.len() as u64 + entries[..i].iter().filter(|e| e.log_id == entry.log_id).count() as u64;
            if entry.sequence < expected {
                return Err(StoreError::AlreadyExists {
                    what: format!("entry {}", entry.sequence),
                });
            }
            if entry.sequence > expected {
                return Err(StoreError::SequenceGap {
                    log_id: entry.log_id.clone(),
                    expected,
                    found: entry.sequence,
                });
            }
        }
        for entry in entries {
            tables.entries.get_mut(&entry.log_id).unwrap().push(entry.clone());
        }
        if let Some(first) = entries.first() {
            let stored = tables.nodes.entry(first.log_id.clone()).or_default();
            for n in nodes {
                stored.insert((n.level, n.index), n.hash);
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected fault: disk full".into()));
        }
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt(
                "injected fault: a stored value cannot be decoded".into(),
            ));
        }
        Ok(())
    }

    fn unsupported<T>() -> Result<T> {
        Err(StoreError::Unavailable(
            "the fake store holds only the audit log".into(),
        ))
    }
}

#[async_trait]
impl Store for FakeStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn insert_member(&self, _member: &Member) -> Result<()> {
        Self::unsupported()
    }
    async fn update_member(&self, _member: &Member) -> Result<()> {
        Self::unsupported()
    }
    async fn get_member(&self, _id: &str) -> Result<Option<Member>> {
        Self::unsupported()
    }
    async fn list_members(&self) -> Result<Vec<Member>> {
        Self::unsupported()
    }
    async fn insert_revoked_certificate(&self, _revoked: &RevokedCertificate) -> Result<()> {
        Self::unsupported()
    }
    async fn list_revoked_certificates(&self) -> Result<Vec<RevokedCertificate>> {
        Self::unsupported()
    }
    async fn insert_endpoint(&self, _endpoint: &Endpoint) -> Result<()> {
        Self::unsupported()
    }
    async fn delete_endpoint(&self, _id: &str) -> Result<Endpoint> {
        Self::unsupported()
    }
    async fn list_endpoints(&self) -> Result<Vec<Endpoint>> {
        Self::unsupported()
    }
    async fn insert_grant(&self, _grant: &Grant) -> Result<()> {
        Self::unsupported()
    }
    async fn insert_grant_unless_repeated(&self, _grant: &Grant, _now: OffsetDateTime) -> Result<Option<Grant>> {
        Self::unsupported()
    }
    async fn revoke_grant(&self, _id: &str, _reason: &str, _at: OffsetDateTime) -> Result<GrantRevocation> {
        Self::unsupported()
    }
    async fn get_grant(&self, _id: &str) -> Result<Option<Grant>> {
        Self::unsupported()
    }
    async fn list_grants(&self, _query: &GrantQuery) -> Result<Vec<Grant>> {
        Self::unsupported()
    }
    async fn insert_record_type_version(&self, _version: &RecordTypeVersion) -> Result<()> {
        Self::unsupported()
    }
    async fn deprecate_record_type_version(
        &self,
        _name: &str,
        _version: u32,
        _note: &str,
    ) -> Result<RecordTypeVersion> {
        Self::unsupported()
    }
    async fn list_record_type_versions(&self) -> Result<Vec<RecordTypeVersion>> {
        Self::unsupported()
    }
    async fn change_counter(&self) -> Result<u64> {
        Self::unsupported()
    }
    async fn publish_change(&self) -> Result<u64> {
        Self::unsupported()
    }
    fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<u64> {
        tokio::sync::broadcast::channel(1).1
    }

    async fn ensure_log(&self, log: &LogInfo) -> Result<LogInfo> {
        self.check()?;
        let mut tables = self.tables.lock().unwrap();
        if let Some(existing) = tables.logs.iter().find(|l| l.log_id == log.log_id) {
            return Ok(existing.clone());
        }
        tables.logs.push(log.clone());
        tables.entries.entry(log.log_id.clone()).or_default();
        Ok(log.clone())
    }

    async fn list_logs(&self) -> Result<Vec<LogInfo>> {
        self.check()?;
        Ok(self.tables.lock().unwrap().logs.clone())
    }

    async fn append_entries_and_nodes(&self, entries: &[StoredEntry], nodes: &[TreeNode]) -> Result<()> {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.check()?;
        let late = std::mem::take(&mut *self.late.lock().unwrap());
        for (entries, nodes) in late {
            // Lands if it still fits, as a transaction would.
            let _ = self.write(&entries, &nodes);
        }
        if self.land_late.load(Ordering::SeqCst) {
            self.late.lock().unwrap().push((entries.to_vec(), nodes.to_vec()));
            std::future::pending::<()>().await;
        }
        self.write(entries, nodes)?;
        if self.fail_after_commit.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected fault: connection lost after commit".into(),
            ));
        }
        self.batches.lock().unwrap().push(entries.len());
        Ok(())
    }

    async fn log_size(&self, log_id: &str) -> Result<u64> {
        self.check()?;
        // As the SQL store: a log never opened is not found.
        self.tables
            .lock()
            .unwrap()
            .entries
            .get(log_id)
            .map(|e| e.len() as u64)
            .ok_or_else(|| StoreError::NotFound {
                what: format!("log {log_id}"),
            })
    }

    async fn leaf_hashes(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<[u8; 32]>> {
        self.check()?;
        let tables = self.tables.lock().unwrap();
        let entries = tables.entries.get(log_id).map(Vec::as_slice).unwrap_or_default();
        if (entries.len() as u64) < to || from > to {
            return Err(StoreError::NotFound {
                what: format!("entries {from}..{to} of log {log_id}"),
            });
        }
        self.leaf_hashes_read.fetch_add(to - from, Ordering::SeqCst);
        Ok(entries[from as usize..to as usize]
            .iter()
            .map(|e| e.leaf_hash)
            .collect())
    }

    async fn entries_in_range(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<StoredEntry>> {
        let mut held = self.reads_held.subscribe();
        if *held.borrow_and_update() {
            self.reads_waiting.fetch_add(1, Ordering::SeqCst);
            let _ = held.wait_for(|held| !*held).await;
            self.reads_waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.check()?;
        if self
            .corrupt_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Corrupt(
                "injected fault: postgres 55P03: canceling statement due to lock timeout".into(),
            ));
        }
        let tables = self.tables.lock().unwrap();
        let entries = tables.entries.get(log_id).map(Vec::as_slice).unwrap_or_default();
        if (entries.len() as u64) < to || from > to {
            return Err(StoreError::NotFound {
                what: format!("entry {} of log {log_id}", entries.len()),
            });
        }
        self.leaf_hashes_read.fetch_add(to - from, Ordering::SeqCst);
        Ok(entries[from as usize..to as usize].to_vec())
    }

    async fn tree_nodes(&self, log_id: &str, wanted: &[(u32, u64)]) -> Result<Vec<TreeNode>> {
        self.check()?;
        let tables = self.tables.lock().unwrap();
        let Some(nodes) = tables.nodes.get(log_id) else {
            return Ok(Vec::new());
        };
        Ok(wanted
            .iter()
            .filter_map(|&(level, index)| nodes.get(&(level, index)).map(|&hash| TreeNode { level, index, hash }))
            .collect())
    }

    async fn tree_node_count(&self, log_id: &str) -> Result<u64> {
        self.check()?;
        Ok(self
            .tables
            .lock()
            .unwrap()
            .nodes
            .get(log_id)
            .map_or(0, |n| n.len() as u64))
    }

    async fn put_tree_nodes(&self, log_id: &str, nodes: &[TreeNode]) -> Result<()> {
        self.check()?;
        let mut tables = self.tables.lock().unwrap();
        let stored = tables.nodes.entry(log_id.to_owned()).or_default();
        for n in nodes {
            stored.insert((n.level, n.index), n.hash);
        }
        Ok(())
    }

    async fn query_entries(&self, query: &EntryQuery) -> Result<Vec<StoredEntry>> {
        self.check()?;
        let tables = self.tables.lock().unwrap();
        let entries = tables.entries.get(&query.log_id).cloned().unwrap_or_default();
        // Limit 0 means no limit, as in the real store.
        let limit = if query.limit == 0 {
            usize::MAX
        } else {
            query.limit as usize
        };
        Ok(entries
            .into_iter()
            .filter(|e| e.sequence >= query.from_sequence)
            .take(limit)
            .collect())
    }

    async fn subject_entries(
        &self,
        subject_hash: &str,
        _since: Option<OffsetDateTime>,
        _after: Option<&HistoryCursor>,
        _limit: u32,
    ) -> Result<Vec<StoredEntry>> {
        self.check()?;
        let tables = self.tables.lock().unwrap();
        let mut found: Vec<StoredEntry> = tables
            .entries
            .values()
            .flatten()
            .filter(|e| !subject_hash.is_empty() && e.subject_hash == subject_hash)
            .cloned()
            .collect();
        found.reverse();
        Ok(found)
    }

    async fn close(&self) {
        // Nothing runs behind an in-memory store.
    }

    async fn claim_subject_key(&self, fingerprint: &str) -> Result<String> {
        self.check()?;
        let mut tables = self.tables.lock().unwrap();
        Ok(tables.subject_key.get_or_insert_with(|| fingerprint.to_owned()).clone())
    }

    async fn check_subject_index(&self, _log_id: &str) -> Result<()> {
        // Histories are found by scanning the entries: no index to check.
        self.check()
    }

    async fn insert_tree_head(&self, head: &StoredTreeHead) -> Result<()> {
        self.check()?;
        self.tables
            .lock()
            .unwrap()
            .heads
            .entry(head.log_id.clone())
            .or_default()
            .push(head.clone());
        Ok(())
    }

    async fn latest_tree_head(&self, log_id: &str) -> Result<Option<StoredTreeHead>> {
        self.check()?;
        Ok(self
            .tables
            .lock()
            .unwrap()
            .heads
            .get(log_id)
            .and_then(|h| h.iter().max_by_key(|h| h.tree_size).cloned()))
    }

    async fn take_rate_tokens(&self, _grant_id: &str, _per_minute: u32, _wanted: u32) -> Result<Option<RateTake>> {
        self.check()?;
        Ok(None)
    }

    async fn ping(&self) -> Result<()> {
        self.check()
    }
}

/// An access event numbered `i`, for a made-up subject.
pub fn event(i: u64) -> AuditEvent {
    let time = OffsetDateTime::from_unix_timestamp(1_750_000_000 + i as i64).unwrap();
    let mut e = AuditEvent::new(EntryKind::Access, time);
    e.request_id = format!("req-{i}");
    e.actor = "tax-board".into();
    e.provider = "civil-registry".into();
    e.record_type = "person".into();
    e.schema_version = 1;
    e.purpose = "income-tax-assessment".into();
    e.subject_hash = format!("{i:064x}");
    e.fields_released = vec!["/name".into(), "/birth_date".into()];
    e.outcome = match i % 7 {
        0 => Outcome::Denied,
        _ => Outcome::Allowed,
    };
    e.latency_us = 100 + i;
    e
}
