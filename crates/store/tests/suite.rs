//! One behaviour suite run against both backends: every `check_*` function is
//! instantiated as `sqlite::*` (fresh file in a temp dir) and `postgres::*`
//! (fresh database on a cluster shared by this test binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_core::audit::{EntryKind, Outcome};
use lienthong_core::{
    Compatibility, Endpoint, Fingerprint, Grant, GrantFields, Member, MemberId, RecordTypeDefinition,
    RecordTypeVersion, RevokedCertificate, Role,
};
use lienthong_store::testing::PgCluster;
use lienthong_store::{
    Backend, EntryQuery, GrantQuery, GrantRevocation, HistoryCursor, LogInfo, RateTake, Store, StoreError,
    StoreOptions, StoredEntry, StoredTreeHead, TreeNode, open,
};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::macros::datetime;

fn options(url: &str) -> StoreOptions {
    StoreOptions {
        url: url.to_owned(),
        max_connections: 5,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    }
}

async fn sqlite_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    // A nested path also proves that missing parent directories are created.
    let url = format!("sqlite://{}/nested/dir/lienthong.db", dir.path().display());
    let store = open(&options(&url)).await.unwrap();
    (dir, store)
}

async fn postgres_url() -> String {
    let cluster = PgCluster::shared().expect("PostgreSQL test cluster");
    cluster.create_database().await.expect("create a test database")
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests running `check_NAME`.
macro_rules! on_both_backends {
    ($($name:ident => $check:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_dir, store) = super::sqlite_store().await;
                assert_eq!(store.backend(), super::Backend::Sqlite);
                super::$check(store).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let url = super::postgres_url().await;
                let store = super::open(&super::options(&url)).await.unwrap();
                assert_eq!(store.backend(), super::Backend::Postgres);
                super::$check(store).await;
            })*
        }
    };
}

on_both_backends! {
    members => check_members,
    revoked_certificates => check_revoked_certificates,
    endpoints => check_endpoints,
    grants => check_grants,
    record_types => check_record_types,
    change_feed => check_change_feed,
    registry_changes_move_the_counter => check_registry_changes_move_the_counter,
    logs => check_logs,
    append_is_dense_and_atomic => check_append_is_dense_and_atomic,
    appends_batches_of_every_size_exactly => check_appends_batches_of_every_size_exactly,
    leaf_hashes => check_leaf_hashes,
    entries_in_range => check_entries_in_range,
    tree_nodes => check_tree_nodes,
    query_entries => check_query_entries,
    subject_entries => check_subject_entries,
    tree_heads => check_tree_heads,
    subject_key_claim => check_subject_key_claim,
    rate_buckets => check_rate_buckets,
    ping => check_ping,
}

// === fixtures ===

fn id(s: &str) -> MemberId {
    MemberId::new(s).unwrap()
}

fn at(minute: u8) -> OffsetDateTime {
    // Microsecond precision, which both backends store exactly.
    datetime!(2025-03-01 10:00:00.123456 UTC)
        .replace_minute(minute)
        .unwrap()
}

fn member(name: &str, roles: Vec<Role>) -> Member {
    Member {
        id: id(name),
        display_name: format!("Agency {name}"),
        roles,
        enabled: true,
        disabled_reason: String::new(),
        created_at: at(1),
        updated_at: at(1),
    }
}

fn grant(gid: &str, consumer: &str, record_type: &str, created: u8) -> Grant {
    Grant {
        id: gid.into(),
        consumer: id(consumer),
        record_type: record_type.into(),
        fields: GrantFields::Pointers(vec!["/full_name".into(), "/children/full_name".into()]),
        purposes: vec!["social-benefit".into(), "tax".into()],
        valid_from: at(0),
        valid_until: Some(datetime!(9999-12-31 23:59:59.999999 UTC)),
        rate_limit_per_minute: 60,
        revoked_at: None,
        revoked_reason: String::new(),
        created_by: id("admin"),
        created_at: at(created),
        reviewed_version: Some(1),
    }
}

fn record_type(name: &str, version: u32) -> RecordTypeVersion {
    RecordTypeVersion {
        definition: RecordTypeDefinition {
            name: name.into(),
            description: "A person's civil status".into(),
            owner: id("civil-status"),
            // Key order is kept, so a digest over the stored text stays valid.
            query_schema: json!({"type": "object", "properties": {"national_id": {"type": "string"}}, "required": ["national_id"]}),
            record_schema: json!({"type": "object", "properties": {"full_name": {"type": "string"}, "age": {"type": "integer"}}}),
            subject_key: "national_id".into(),
        },
        version,
        deprecated: false,
        deprecation_note: String::new(),
        registered_at: at(2),
        registered_by: id("integrator"),
        compatibility: if version == 1 {
            Compatibility::Backward
        } else {
            Compatibility::None
        },
        field_pointers: vec!["/age".into(), "/full_name".into()],
        digest: format!("{version:064x}"),
    }
}

fn log_info(log_id: &str) -> LogInfo {
    LogInfo {
        log_id: log_id.into(),
        public_key: vec![7; 32],
        created_at: at(0),
    }
}

fn entry(log_id: &str, sequence: u64) -> StoredEntry {
    let n = sequence as usize;
    StoredEntry {
        log_id: log_id.into(),
        sequence,
        leaf_hash: [sequence as u8; 32],
        leaf: format!("{{\"n\":{sequence}}}"),
        time: at((sequence % 60) as u8),
        kind: [EntryKind::Access, EntryKind::Admin, EntryKind::Authentication][n % 3],
        actor: ["tax-office", "police"][n % 2].into(),
        provider: "civil-status".into(),
        record_type: ["ee.civil.person", "ee.civil.marriage"][n % 2].into(),
        purpose: ["tax", "crime"][n / 2 % 2].into(),
        outcome: [Outcome::Allowed, Outcome::Denied, Outcome::Failed, Outcome::Invalid][n % 4],
        subject_hash: String::new(),
    }
}

fn entries(log_id: &str, range: std::ops::Range<u64>) -> Vec<StoredEntry> {
    range.map(|s| entry(log_id, s)).collect()
}

fn sequences(entries: &[StoredEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.sequence).collect()
}

/// Every entry of `log_id`, in order.
async fn every_entry(store: &Arc<dyn Store>, log_id: &str) -> Vec<StoredEntry> {
    store
        .query_entries(&EntryQuery {
            log_id: log_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn with_log(store: &Arc<dyn Store>, log_id: &str, size: u64) {
    store.ensure_log(&log_info(log_id)).await.unwrap();
    if size > 0 {
        store.append_entries(&entries(log_id, 0..size)).await.unwrap();
    }
}

// === checks ===

async fn check_members(store: Arc<dyn Store>) {
    let portal = member("portal", vec![Role::Auditor, Role::SubjectPortal]);
    let admin = member("admin", vec![Role::Admin]);
    let none = member("no-roles", vec![]);
    for m in [&portal, &admin, &none] {
        store.insert_member(m).await.unwrap();
    }
    assert_eq!(store.get_member("portal").await.unwrap().as_ref(), Some(&portal));
    assert_eq!(store.get_member("nobody").await.unwrap(), None);

    let mut dup = member("admin", vec![Role::Consumer]);
    dup.display_name = "Impostor".into();
    match store.insert_member(&dup).await {
        Err(StoreError::AlreadyExists { what }) => assert!(what.contains("admin"), "{what}"),
        other => panic!("duplicate member: {other:?}"),
    }
    assert_eq!(
        store.get_member("admin").await.unwrap().unwrap().display_name,
        "Agency admin"
    );

    let mut changed = portal.clone();
    changed.display_name = "Citizen portal".into();
    changed.roles = vec![Role::SubjectPortal];
    changed.enabled = false;
    changed.disabled_reason = "contract ended".into();
    changed.updated_at = at(30);
    changed.created_at = at(59); // immutable: must not be written
    store.update_member(&changed).await.unwrap();
    let stored = store.get_member("portal").await.unwrap().unwrap();
    assert_eq!(
        stored,
        Member {
            created_at: portal.created_at,
            ..changed
        }
    );

    assert!(matches!(
        store.update_member(&member("ghost", vec![])).await,
        Err(StoreError::NotFound { .. })
    ));
    let ids: Vec<String> = store
        .list_members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, ["admin", "no-roles", "portal"]);
}

fn revoked(byte: u8, member: &str, minute: u8) -> RevokedCertificate {
    RevokedCertificate {
        fingerprint: Fingerprint([byte; 32]),
        member: id(member),
        reason: format!("key of {member} leaked"),
        not_after: byte.is_multiple_of(2).then(|| at(59)),
        revoked_at: at(minute),
        revoked_by: id("admin"),
    }
}

async fn check_revoked_certificates(store: Arc<dyn Store>) {
    assert_eq!(store.list_revoked_certificates().await.unwrap(), []);
    let (a, b, c) = (
        revoked(0xab, "tax-office", 5),
        revoked(0x01, "police", 3),
        revoked(0x02, "tax-office", 4),
    );
    for r in [&a, &b, &c] {
        store.insert_revoked_certificate(r).await.unwrap();
    }
    // Oldest first; the expiry is kept when known and left out when not.
    assert_eq!(
        store.list_revoked_certificates().await.unwrap(),
        [b.clone(), c.clone(), a.clone()]
    );

    // The first revocation of a certificate stands.
    let again = RevokedCertificate {
        reason: "typo".into(),
        ..revoked(0xab, "police", 9)
    };
    match store.insert_revoked_certificate(&again).await {
        Err(StoreError::AlreadyExists { what }) => assert!(what.contains(&a.fingerprint.to_string()), "{what}"),
        other => panic!("a second revocation of one certificate: {other:?}"),
    }
    assert_eq!(store.list_revoked_certificates().await.unwrap(), [b, c, a]);
}

async fn check_endpoints(store: Arc<dyn Store>) {
    let ep = |eid: &str, provider: &str, url: &str| Endpoint {
        id: eid.into(),
        provider: id(provider),
        url: url.into(),
        created_at: at(3),
    };
    let a2 = ep("e-2", "civil-status", "https://a2:443");
    let a1 = ep("e-1", "civil-status", "https://a1:443");
    let b = ep("e-0", "business", "https://a1:443"); // same URL, other provider: allowed
    for e in [&a2, &a1, &b] {
        store.insert_endpoint(e).await.unwrap();
    }
    // Named by its URL and provider: the id made for the attempt is no endpoint's.
    match store
        .insert_endpoint(&ep("e-3", "civil-status", "https://a1:443"))
        .await
    {
        Err(StoreError::AlreadyExists { what }) => {
            assert!(what.contains("https://a1:443") && !what.contains("e-3"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.insert_endpoint(&ep("e-1", "other", "https://x:1")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(
        store.list_endpoints().await.unwrap(),
        [b.clone(), a1.clone(), a2.clone()]
    );

    assert_eq!(store.delete_endpoint("e-1").await.unwrap(), a1);
    assert!(matches!(
        store.delete_endpoint("e-1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_endpoints().await.unwrap(), [b, a2]);
}

async fn check_grants(store: Arc<dyn Store>) {
    let g1 = grant("g-1", "tax-office", "ee.civil.person", 1);
    let mut g2 = grant("g-2", "police", "ee.civil.person", 2);
    g2.fields = GrantFields::All;
    g2.valid_until = None;
    g2.rate_limit_per_minute = 0;
    let g3 = grant("g-3", "tax-office", "ee.civil.marriage", 3);
    for g in [&g1, &g2, &g3] {
        store.insert_grant(g).await.unwrap();
    }
    assert!(matches!(
        store.insert_grant(&g1).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.get_grant("g-2").await.unwrap().as_ref(), Some(&g2));
    assert_eq!(store.get_grant("g-9").await.unwrap(), None);

    let ids = |gs: Vec<Grant>| gs.into_iter().map(|g| g.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_grants(&GrantQuery::default()).await.unwrap()),
        ["g-3", "g-2", "g-1"]
    );
    let by_consumer = GrantQuery {
        consumer: Some("tax-office".into()),
        record_type: None,
    };
    assert_eq!(ids(store.list_grants(&by_consumer).await.unwrap()), ["g-3", "g-1"]);
    let by_type = GrantQuery {
        consumer: None,
        record_type: Some("ee.civil.person".into()),
    };
    assert_eq!(ids(store.list_grants(&by_type).await.unwrap()), ["g-2", "g-1"]);
    let both = GrantQuery {
        consumer: Some("tax-office".into()),
        record_type: Some("ee.civil.person".into()),
    };
    assert_eq!(store.list_grants(&both).await.unwrap(), std::slice::from_ref(&g1));

    let revoked = Grant {
        revoked_at: Some(at(40)),
        revoked_reason: "court order".into(),
        ..g1.clone()
    };
    assert_eq!(
        store.revoke_grant("g-1", "court order", at(40)).await.unwrap(),
        GrantRevocation::Revoked(revoked.clone())
    );
    // First revocation wins, and a second one says so.
    let again = store.revoke_grant("g-1", "second thoughts", at(50)).await.unwrap();
    assert_eq!(again, GrantRevocation::AlreadyRevoked(revoked.clone()));
    // Never deleted.
    assert_eq!(store.list_grants(&both).await.unwrap(), [revoked]);
    assert!(matches!(
        store.revoke_grant("g-9", "x", at(1)).await,
        Err(StoreError::NotFound { .. })
    ));

    // g-3 is live: made again under another id, to the nanosecond, it is found.
    let now = at(59);
    let repeat = Grant {
        id: "g-4".into(),
        created_at: now,
        valid_until: Some(datetime!(9999-12-31 23:59:59.999999999 UTC)),
        ..g3.clone()
    };
    assert_eq!(
        store.insert_grant_unless_repeated(&repeat, now).await.unwrap(),
        Some(g3.clone())
    );
    assert_eq!(store.get_grant("g-4").await.unwrap(), None);
    // g-1 is revoked: made again, it is a new grant.
    let renewed = Grant {
        id: "g-5".into(),
        revoked_at: None,
        revoked_reason: String::new(),
        ..g1.clone()
    };
    assert_eq!(store.insert_grant_unless_repeated(&renewed, now).await.unwrap(), None);
    assert_eq!(store.get_grant("g-5").await.unwrap(), Some(renewed));
}

async fn check_record_types(store: Arc<dyn Store>) {
    let v1 = record_type("ee.civil.person", 1);
    let v2 = record_type("ee.civil.person", 2);
    let other = record_type("ee.business.company", 1);
    for v in [&v2, &other, &v1] {
        store.insert_record_type_version(v).await.unwrap();
    }
    let mut racing = record_type("ee.civil.person", 2);
    racing.digest = "f".repeat(64);
    match store.insert_record_type_version(&racing).await {
        Err(StoreError::AlreadyExists { what }) => assert!(what.contains("version 2"), "{what}"),
        other => panic!("duplicate version: {other:?}"),
    }
    assert_eq!(
        store.list_record_type_versions().await.unwrap(),
        [other.clone(), v1.clone(), v2.clone()]
    );
    // Schemas come back as the same JSON text, key order included.
    let listed = store.list_record_type_versions().await.unwrap();
    assert_eq!(
        listed[1].definition.query_schema.to_string(),
        v1.definition.query_schema.to_string()
    );

    let deprecated = store
        .deprecate_record_type_version("ee.civil.person", 1, "use version 2")
        .await
        .unwrap();
    assert_eq!(
        deprecated,
        RecordTypeVersion {
            deprecated: true,
            deprecation_note: "use version 2".into(),
            ..v1
        }
    );
    assert_eq!(store.list_record_type_versions().await.unwrap()[1], deprecated);
    assert!(matches!(
        store.deprecate_record_type_version("ee.civil.person", 3, "x").await,
        Err(StoreError::NotFound { .. })
    ));
}

/// Waits up to `within` for `want` on `rx`, skipping older values.
async fn receive(rx: &mut tokio::sync::broadcast::Receiver<u64>, want: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(v)) if v >= want => return assert_eq!(v, want),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("change feed closed: {e}"),
            Err(_) => panic!("change {want} not received within {within:?}"),
        }
    }
}

async fn check_change_feed(store: Arc<dyn Store>) {
    assert_eq!(store.change_counter().await.unwrap(), 0);
    let mut rx = store.subscribe_changes();
    assert_eq!(store.publish_change().await.unwrap(), 1);
    assert_eq!(store.publish_change().await.unwrap(), 2);
    assert_eq!(store.change_counter().await.unwrap(), 2);
    receive(&mut rx, 2, Duration::from_secs(1)).await;
}

async fn check_registry_changes_move_the_counter(store: Arc<dyn Store>) {
    // Each change moves the counter in its own transaction: a broker that
    // fails between a change and its announcement still leaves every replica
    // able to see that something changed.
    let mut rx = store.subscribe_changes();
    let mut last = store.change_counter().await.unwrap();
    let mut moved = async |what: &str| {
        let now = store.change_counter().await.unwrap();
        assert!(now > last, "{what} did not move the change counter ({last} -> {now})");
        last = now;
    };
    let mut m = member("tax-office", vec![Role::Consumer]);
    store.insert_member(&m).await.unwrap();
    moved("insert_member").await;
    m.enabled = false;
    store.update_member(&m).await.unwrap();
    moved("update_member").await;
    store
        .insert_revoked_certificate(&revoked(7, "tax-office", 2))
        .await
        .unwrap();
    moved("insert_revoked_certificate").await;
    let endpoint = Endpoint {
        id: "e-1".into(),
        provider: id("civil-status"),
        url: "https://a:443".into(),
        created_at: at(3),
    };
    store.insert_endpoint(&endpoint).await.unwrap();
    moved("insert_endpoint").await;
    store.delete_endpoint("e-1").await.unwrap();
    moved("delete_endpoint").await;
    store
        .insert_grant(&grant("g-1", "tax-office", "ee.civil.person", 1))
        .await
        .unwrap();
    moved("insert_grant").await;
    store.revoke_grant("g-1", "done", at(3)).await.unwrap();
    moved("revoke_grant").await;
    store
        .insert_record_type_version(&record_type("ee.civil.person", 1))
        .await
        .unwrap();
    moved("insert_record_type_version").await;
    store
        .deprecate_record_type_version("ee.civil.person", 1, "use v2")
        .await
        .unwrap();
    moved("deprecate_record_type_version").await;
    // A refused change moves nothing.
    assert!(
        store
            .insert_grant(&grant("g-1", "tax-office", "ee.civil.person", 1))
            .await
            .is_err()
    );
    assert_eq!(store.change_counter().await.unwrap(), last);
    if store.backend() == Backend::Postgres {
        // Announced to the listening replicas too, without publish_change.
        receive(&mut rx, last, Duration::from_secs(5)).await;
    }
}

async fn check_logs(store: Arc<dyn Store>) {
    let first = store.ensure_log(&log_info("log-b")).await.unwrap();
    assert_eq!(first, log_info("log-b"));
    // Idempotent: a second call returns what is stored, not what was passed.
    let again = store
        .ensure_log(&LogInfo {
            created_at: at(9),
            ..log_info("log-b")
        })
        .await
        .unwrap();
    assert_eq!(again, first);
    store
        .ensure_log(&LogInfo {
            created_at: at(5),
            ..log_info("log-a")
        })
        .await
        .unwrap();
    let ids: Vec<String> = store.list_logs().await.unwrap().into_iter().map(|l| l.log_id).collect();
    assert_eq!(ids, ["log-b", "log-a"]);
    assert_eq!(store.log_size("log-a").await.unwrap(), 0);
    assert!(matches!(
        store.log_size("log-z").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn check_append_is_dense_and_atomic(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    with_log(&store, "log-b", 0).await;
    store.append_entries(&[]).await.unwrap();
    store.append_entries(&entries("log-a", 0..3)).await.unwrap();
    store.append_entries(&entries("log-a", 3..5)).await.unwrap();
    assert_eq!(store.log_size("log-a").await.unwrap(), 5);

    // Overlap with what is stored.
    match store.append_entries(&entries("log-a", 4..7)).await {
        Err(StoreError::AlreadyExists { what }) => assert!(what.contains("entry 4"), "{what}"),
        other => panic!("overlapping batch: {other:?}"),
    }
    // Gap after the end.
    assert!(matches!(
        store.append_entries(&entries("log-a", 6..8)).await,
        Err(StoreError::SequenceGap {
            expected: 5,
            found: 6,
            ..
        })
    ));
    // Gap inside the batch.
    let mut holey = entries("log-a", 5..7);
    holey.push(entry("log-a", 8));
    assert!(matches!(
        store.append_entries(&holey).await,
        Err(StoreError::SequenceGap { .. })
    ));
    // A batch spanning two logs is all or nothing: log-b's part is fine, log-a's is not.
    let mut mixed = entries("log-b", 0..2);
    mixed.extend(entries("log-a", 6..7));
    assert!(matches!(
        store.append_entries(&mixed).await,
        Err(StoreError::SequenceGap { .. })
    ));
    assert!(matches!(
        store.append_entries(&entries("log-z", 0..1)).await,
        Err(StoreError::NotFound { .. })
    ));

    // Nothing of the refused batches was written.
    assert_eq!(store.log_size("log-a").await.unwrap(), 5);
    assert_eq!(store.log_size("log-b").await.unwrap(), 0);
    assert_eq!(every_entry(&store, "log-a").await, entries("log-a", 0..5));

    // Both logs continue in one batch.
    let mut both = entries("log-b", 0..2);
    both.extend(entries("log-a", 5..6));
    store.append_entries(&both).await.unwrap();
    assert_eq!(store.log_size("log-a").await.unwrap(), 6);
    assert_eq!(store.log_size("log-b").await.unwrap(), 2);
}

/// Batch sizes on both sides of the powers of two the insert statements are
/// prepared for, and past one statement's rows: each stores exactly its
/// entries, none twice, and a batch refused at any size writes nothing.
async fn check_appends_batches_of_every_size_exactly(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    with_log(&store, "log-b", 0).await;
    let mut size = 0;
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 255, 257, 1023, 1024, 1025, 2100] {
        store.append_entries(&entries("log-a", size..size + n)).await.unwrap();
        size += n;
        assert_eq!(store.log_size("log-a").await.unwrap(), size, "after a batch of {n}");
    }
    // Two logs in one batch, the larger past one statement's rows.
    let mut both = entries("log-b", 0..1500);
    both.extend(entries("log-a", size..size + 3));
    store.append_entries(&both).await.unwrap();
    size += 3;
    // A large batch overlapping its last entry is refused whole.
    assert!(matches!(
        store.append_entries(&entries("log-a", size - 1..size + 600)).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.log_size("log-a").await.unwrap(), size);
    assert_eq!(every_entry(&store, "log-a").await, entries("log-a", 0..size));
    assert_eq!(store.log_size("log-b").await.unwrap(), 1500);
}

async fn check_leaf_hashes(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 5).await;
    let hashes = |r: std::ops::Range<u64>| r.map(|s| [s as u8; 32]).collect::<Vec<_>>();
    assert_eq!(store.leaf_hashes("log-a", 0, 5).await.unwrap(), hashes(0..5));
    assert_eq!(store.leaf_hashes("log-a", 2, 4).await.unwrap(), hashes(2..4));
    assert!(store.leaf_hashes("log-a", 5, 5).await.unwrap().is_empty());
    assert!(matches!(
        store.leaf_hashes("log-a", 3, 6).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// Entries come back with every stored column, of their log only; a range
/// past the log's end names the first entry missing.
async fn check_entries_in_range(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    let mut written = entries("log-a", 0..6);
    written[4].subject_hash = "ab".repeat(32);
    // Leaves as long as the broker's, with characters JSON escapes.
    written[5].leaf = format!("{{\"reason\":\"{}\u{e9}\\\"\"}}", "x".repeat(1000));
    store.append_entries(&written).await.unwrap();
    with_log(&store, "log-b", 3).await;
    assert_eq!(store.entries_in_range("log-a", 0, 6).await.unwrap(), written);
    assert_eq!(store.entries_in_range("log-a", 2, 5).await.unwrap(), written[2..5]);
    assert_eq!(
        store.entries_in_range("log-b", 0, 3).await.unwrap(),
        entries("log-b", 0..3)
    );
    assert!(store.entries_in_range("log-a", 6, 6).await.unwrap().is_empty());
    // Ranges of several statements' worth of rows.
    with_log(&store, "log-c", 700).await;
    assert_eq!(
        store.entries_in_range("log-c", 0, 700).await.unwrap(),
        entries("log-c", 0..700)
    );
    assert_eq!(
        store.entries_in_range("log-c", 255, 513).await.unwrap(),
        entries("log-c", 255..513)
    );
    match store.entries_in_range("log-a", 3, 8).await {
        Err(StoreError::NotFound { what }) => assert!(what.contains("entry 6 of log log-a"), "{what}"),
        other => panic!("a range past the end: {other:?}"),
    }
    assert!(matches!(
        store.entries_in_range("log-unknown", 0, 1).await,
        Err(StoreError::NotFound { .. })
    ));
}

fn node(level: u32, index: u64, byte: u8) -> TreeNode {
    TreeNode {
        level,
        index,
        hash: [byte; 32],
    }
}

fn sorted(mut nodes: Vec<TreeNode>) -> Vec<TreeNode> {
    nodes.sort_by_key(|n| (n.level, n.index));
    nodes
}

/// Tree nodes go in with the entries that complete them, in the same
/// transaction: a refused batch stores neither. Proofs read back only the
/// nodes they ask for, of their own log.
async fn check_tree_nodes(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    with_log(&store, "log-b", 0).await;
    assert_eq!(store.tree_node_count("log-a").await.unwrap(), 0);
    // A small batch (one statement) and a large one (past a statement's rows).
    store
        .append_entries_and_nodes(&entries("log-a", 0..300), &[node(8, 0, 1)])
        .await
        .unwrap();
    store
        .append_entries_and_nodes(
            &entries("log-a", 300..1400),
            &[node(8, 1, 2), node(9, 0, 3), node(8, 2, 4)],
        )
        .await
        .unwrap();
    store
        .append_entries_and_nodes(&entries("log-b", 0..256), &[node(8, 0, 9)])
        .await
        .unwrap();
    assert_eq!(store.tree_node_count("log-a").await.unwrap(), 4);
    assert_eq!(store.tree_node_count("log-b").await.unwrap(), 1);
    let got = store
        .tree_nodes("log-a", &[(8, 0), (9, 0), (8, 7), (10, 0)])
        .await
        .unwrap();
    assert_eq!(sorted(got), [node(8, 0, 1), node(9, 0, 3)]);
    assert_eq!(store.tree_nodes("log-b", &[(8, 0)]).await.unwrap(), [node(8, 0, 9)]);
    assert!(store.tree_nodes("log-a", &[]).await.unwrap().is_empty());
    assert!(matches!(
        store.tree_nodes("log-z", &[(8, 0)]).await,
        Err(StoreError::NotFound { .. })
    ));

    // Refused batches, small and large, leave no node behind.
    assert!(matches!(
        store
            .append_entries_and_nodes(&entries("log-a", 1399..1500), &[node(8, 5, 5)])
            .await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store
            .append_entries_and_nodes(&entries("log-a", 1401..3000), &[node(8, 6, 6)])
            .await,
        Err(StoreError::SequenceGap { .. })
    ));
    assert_eq!(store.tree_node_count("log-a").await.unwrap(), 4);
    assert_eq!(store.log_size("log-a").await.unwrap(), 1400);
    // Nodes belong to one log's batch.
    let mut mixed = entries("log-a", 1400..1401);
    mixed.extend(entries("log-b", 256..257));
    assert!(matches!(
        store.append_entries_and_nodes(&mixed, &[node(8, 7, 7)]).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.log_size("log-a").await.unwrap(), 1400);

    // Filling in nodes replaces what is at their place and adds the rest.
    store
        .put_tree_nodes("log-a", &[node(8, 0, 11), node(8, 3, 12)])
        .await
        .unwrap();
    let many: Vec<TreeNode> = (0..1200).map(|i| node(20, i, (i % 250) as u8)).collect();
    store.put_tree_nodes("log-a", &many).await.unwrap();
    assert_eq!(store.tree_node_count("log-a").await.unwrap(), 5 + 1200);
    let wanted: Vec<(u32, u64)> = (0..1200).map(|i| (20, i)).chain([(8, 0), (8, 3)]).collect();
    let mut expected = many.clone();
    expected.extend([node(8, 0, 11), node(8, 3, 12)]);
    assert_eq!(
        sorted(store.tree_nodes("log-a", &wanted).await.unwrap()),
        sorted(expected)
    );
}

async fn check_query_entries(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 12).await;
    with_log(&store, "log-b", 3).await;
    let q = || EntryQuery {
        log_id: "log-a".into(),
        ..Default::default()
    };
    let run = |query: EntryQuery| {
        let store = store.clone();
        async move { sequences(&store.query_entries(&query).await.unwrap()) }
    };
    assert_eq!(run(q()).await, (0..12).collect::<Vec<_>>());
    assert_eq!(
        run(EntryQuery {
            actor: Some("police".into()),
            ..q()
        })
        .await,
        [1, 3, 5, 7, 9, 11]
    );
    assert_eq!(
        run(EntryQuery {
            provider: Some("civil-status".into()),
            ..q()
        })
        .await
        .len(),
        12
    );
    assert_eq!(
        run(EntryQuery {
            provider: Some("other".into()),
            ..q()
        })
        .await,
        Vec::<u64>::new()
    );
    assert_eq!(
        run(EntryQuery {
            record_type: Some("ee.civil.person".into()),
            ..q()
        })
        .await,
        [0, 2, 4, 6, 8, 10]
    );
    assert_eq!(
        run(EntryQuery {
            purpose: Some("crime".into()),
            ..q()
        })
        .await,
        [2, 3, 6, 7, 10, 11]
    );
    assert_eq!(
        run(EntryQuery {
            outcome: Some(Outcome::Denied),
            ..q()
        })
        .await,
        [1, 5, 9]
    );
    assert_eq!(
        run(EntryQuery {
            kind: Some(EntryKind::Authentication),
            ..q()
        })
        .await,
        [2, 5, 8, 11]
    );
    assert_eq!(
        run(EntryQuery {
            since: Some(at(4)),
            until: Some(at(7)),
            ..q()
        })
        .await,
        [4, 5, 6]
    );
    let combined = EntryQuery {
        actor: Some("police".into()),
        outcome: Some(Outcome::Denied),
        since: Some(at(2)),
        ..q()
    };
    assert_eq!(run(combined).await, [5, 9]);

    // Paging: from_sequence continues after the last entry seen.
    let mut seen = Vec::new();
    let mut from = 0;
    loop {
        let page = store
            .query_entries(&EntryQuery {
                from_sequence: from,
                limit: 5,
                ..q()
            })
            .await
            .unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        from = last.sequence + 1;
        seen.extend(sequences(&page));
    }
    assert_eq!(seen, (0..12).collect::<Vec<_>>());
    // Every column round-trips.
    assert_eq!(
        store
            .query_entries(&EntryQuery {
                from_sequence: 7,
                limit: 1,
                ..q()
            })
            .await
            .unwrap(),
        [entry("log-a", 7)]
    );
    assert_eq!(
        run(EntryQuery {
            log_id: "log-b".into(),
            ..Default::default()
        })
        .await,
        [0, 1, 2]
    );
    // A log not in the database is not an empty one: an export of it must
    // not look like a log with nothing in it.
    match store
        .query_entries(&EntryQuery {
            log_id: "log-unknown".into(),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::NotFound { what }) => assert_eq!(what, "log log-unknown"),
        other => panic!("an unknown log: {other:?}"),
    }
}

/// The first broker's subject-secret fingerprint is the federation's; a
/// later claim with another is answered with the first, not recorded.
async fn check_subject_key_claim(store: Arc<dyn Store>) {
    let first = "a".repeat(64);
    assert_eq!(store.claim_subject_key(&first).await.unwrap(), first);
    assert_eq!(store.claim_subject_key(&first).await.unwrap(), first, "a restart");
    assert_eq!(store.claim_subject_key(&"b".repeat(64)).await.unwrap(), first);
}

/// A grant's bucket is shared by every replica: concurrent takes never hand
/// out more than the bucket holds plus what it refilled meanwhile. SQLite has
/// none (one broker counts in memory).
async fn check_rate_buckets(store: Arc<dyn Store>) {
    if store.backend() == Backend::Sqlite {
        assert_eq!(store.take_rate_tokens("g-1", 60, 1).await.unwrap(), None);
        return;
    }
    let taken = |t: Option<RateTake>| match t {
        Some(RateTake::Taken(n)) => n,
        other => panic!("expected tokens, got {other:?}"),
    };
    // 6,000 a minute: 100 a second, 6,000 held when first used.
    let started = Instant::now();
    assert_eq!(taken(store.take_rate_tokens("g-1", 6000, 4000).await.unwrap()), 4000);
    let racers: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take_rate_tokens("g-1", 6000, 300).await.unwrap() })
        })
        .collect();
    let mut total = 0;
    for racer in racers {
        if let Some(RateTake::Taken(n)) = racer.await.unwrap() {
            total += u64::from(n);
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * 100.0).ceil() as u64;
    assert!(
        (2000..=2000 + refilled).contains(&total),
        "20 replicas took {total} of 2,000 left (+{refilled} refilled)"
    );
    // Drained: the next token is due within a hundredth of a second.
    let due = loop {
        match store.take_rate_tokens("g-1", 6000, 1000).await.unwrap() {
            Some(RateTake::Empty(due)) => break due,
            Some(RateTake::Taken(_)) => {}
            None => panic!("PostgreSQL keeps buckets"),
        }
    };
    assert!(due > Duration::ZERO && due <= Duration::from_millis(10), "{due:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = taken(store.take_rate_tokens("g-1", 6000, 1000).await.unwrap());
    assert!(
        (5..=100).contains(&later),
        "{later} tokens refilled in 100 ms at 100 a second"
    );
    // Buckets are per grant; a bucket never holds more than its limit.
    assert_eq!(taken(store.take_rate_tokens("g-2", 60, 1000).await.unwrap()), 60);
    assert!(matches!(
        store.take_rate_tokens("g-2", 60, 1).await.unwrap(),
        Some(RateTake::Empty(due)) if due <= Duration::from_secs(1)
    ));
    assert!(matches!(
        store.take_rate_tokens("g-3", 0, 1).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn check_subject_entries(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    with_log(&store, "log-b", 0).await;
    let subject = |mut e: StoredEntry, hash: &str, minute: u8| {
        e.kind = EntryKind::Access;
        e.subject_hash = hash.into();
        e.time = at(minute);
        e
    };
    // Someone reading the subject's history names it too, but did not look
    // its records up.
    let history_read = |e: StoredEntry, hash: &str, minute: u8| StoredEntry {
        kind: EntryKind::AuditRead,
        ..subject(e, hash, minute)
    };
    store
        .append_entries(&[
            subject(entry("log-a", 0), "aa11", 1),
            subject(entry("log-a", 1), "bb22", 2),
            subject(entry("log-a", 2), "aa11", 5),
            entry("log-a", 3),
            history_read(entry("log-a", 4), "aa11", 8),
        ])
        .await
        .unwrap();
    store
        .append_entries(&[
            subject(entry("log-b", 0), "aa11", 3),
            subject(entry("log-b", 1), "aa11", 7),
        ])
        .await
        .unwrap();
    let found = store.subject_entries("aa11", None, None, 0).await.unwrap();
    let keys: Vec<(String, u64)> = found.iter().map(|e| (e.log_id.clone(), e.sequence)).collect();
    assert_eq!(
        keys,
        [
            ("log-b".into(), 1),
            ("log-a".into(), 2),
            ("log-b".into(), 0),
            ("log-a".into(), 0)
        ]
    );
    assert!(found.iter().all(|e| e.subject_hash == "aa11"));
    assert_eq!(
        store.subject_entries("aa11", Some(at(3)), None, 0).await.unwrap().len(),
        3
    );
    assert_eq!(store.subject_entries("aa11", None, None, 2).await.unwrap(), found[..2]);
    assert!(store.subject_entries("cc33", None, None, 0).await.unwrap().is_empty());
    // Entries without a subject are never "the subject ''".
    assert!(store.subject_entries("", None, None, 0).await.unwrap().is_empty());

    // Paging: entries at one time in two logs and twice in one log, so the
    // order's ties decide. Every page size walks the whole history once, in
    // order, without a gap or a repeat.
    store
        .append_entries(&[
            subject(entry("log-a", 5), "dd44", 9),
            subject(entry("log-a", 6), "dd44", 9),
            subject(entry("log-a", 7), "dd44", 4),
        ])
        .await
        .unwrap();
    store
        .append_entries(&[
            subject(entry("log-b", 2), "dd44", 9),
            subject(entry("log-b", 3), "dd44", 1),
        ])
        .await
        .unwrap();
    let whole = store.subject_entries("dd44", None, None, 0).await.unwrap();
    let keys: Vec<(&str, u64)> = whole.iter().map(|e| (e.log_id.as_str(), e.sequence)).collect();
    assert_eq!(
        keys,
        [("log-a", 6), ("log-a", 5), ("log-b", 2), ("log-a", 7), ("log-b", 3)]
    );
    for size in 1..=6 {
        let mut walked = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .subject_entries("dd44", None, cursor.as_ref(), size)
                .await
                .unwrap();
            assert!(page.len() <= size as usize);
            cursor = page.last().map(HistoryCursor::after);
            walked.extend(page);
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(walked, whole, "pages of {size}");
    }
    // A cursor and `since` together: the older side of both.
    let after_first = HistoryCursor::after(&whole[0]);
    let page = store
        .subject_entries("dd44", Some(at(4)), Some(&after_first), 0)
        .await
        .unwrap();
    assert_eq!(page, whole[1..4]);
}

async fn check_tree_heads(store: Arc<dyn Store>) {
    with_log(&store, "log-a", 0).await;
    assert_eq!(store.latest_tree_head("log-a").await.unwrap(), None);
    let head = |size: u64, root: u8, ts: u64| StoredTreeHead {
        log_id: "log-a".into(),
        tree_size: size,
        root_hash: [root; 32],
        timestamp_ms: ts,
        signature: vec![root; 64],
    };
    store.insert_tree_head(&head(5, 1, 1000)).await.unwrap();
    store.insert_tree_head(&head(3, 2, 900)).await.unwrap();
    assert_eq!(store.latest_tree_head("log-a").await.unwrap(), Some(head(5, 1, 1000)));
    // Re-signing the same tree later refreshes the head.
    store.insert_tree_head(&head(5, 1, 2000)).await.unwrap();
    assert_eq!(store.latest_tree_head("log-a").await.unwrap(), Some(head(5, 1, 2000)));
    // An older signature of the same tree is accepted but does not go back in time.
    store.insert_tree_head(&head(5, 1, 1500)).await.unwrap();
    assert_eq!(store.latest_tree_head("log-a").await.unwrap(), Some(head(5, 1, 2000)));
    // Another root for the same size would be a fork.
    assert!(matches!(
        store.insert_tree_head(&head(5, 9, 3000)).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.latest_tree_head("log-a").await.unwrap(), Some(head(5, 1, 2000)));
    let orphan = StoredTreeHead {
        log_id: "log-z".into(),
        ..head(1, 1, 1)
    };
    assert!(matches!(
        store.insert_tree_head(&orphan).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn check_ping(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
}

// === backend-specific ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_appends_20000_entries_in_batches_of_500() {
    let (_dir, store) = sqlite_store().await;
    with_log(&store, "log-a", 0).await;
    let all = entries("log-a", 0..20_000);
    for batch in all.chunks(500) {
        store.append_entries(batch).await.unwrap();
    }
    assert_eq!(store.log_size("log-a").await.unwrap(), 20_000);
    assert_eq!(
        store.leaf_hashes("log-a", 19_998, 20_000).await.unwrap(),
        [[(19_998 % 256) as u8; 32], [(19_999 % 256) as u8; 32]]
    );
}

#[tokio::test]
async fn sqlite_file_is_in_wal_mode_and_reopens_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    for url in [format!("sqlite:{}", path.display()), path.display().to_string()] {
        let store = open(&options(&url)).await.unwrap();
        if store.list_members().await.unwrap().is_empty() {
            store.insert_member(&member("admin", vec![Role::Admin])).await.unwrap();
        } else {
            assert_eq!(
                store.list_members().await.unwrap(),
                [member("admin", vec![Role::Admin])]
            );
        }
    }
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // The access log is for its owner alone, its WAL included.
    use std::os::unix::fs::PermissionsExt;
    for file in [path.clone(), dir.path().join("db.sqlite-wal")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
}

/// A replica left behind by a rolling upgrade is told to upgrade, not that
/// its data is corrupt (which would send an operator to the backups).
#[tokio::test]
async fn a_database_migrated_by_a_newer_version_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let url = format!("sqlite://{}", path.display());
    drop(open(&options(&url)).await.unwrap());
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from the future', 1, x'00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    match open(&options(&url)).await {
        Err(StoreError::Config(m)) => assert!(
            m.contains("newer lienthong") && m.contains("99990101000000") && !m.contains("  "),
            "{m}"
        ),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("opened a database migrated past this binary"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_is_copied_back_in_the_background_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let wal = dir.path().join("db.sqlite-wal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let store = open(&options(&path.display().to_string())).await.unwrap();
    with_log(&store, "log-a", 0).await;
    let db_before = size(&path);
    for batch in entries("log-a", 0..2_000).chunks(100) {
        store.append_entries(batch).await.unwrap();
    }
    let wal_after_first = size(&wal);
    // No commit came near the WAL's bound: only the background checkpoint
    // puts the entries into the database file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while size(&path) < db_before + 100 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL was not copied back within 10 s (database {} bytes, WAL {} bytes)",
            size(&path),
            size(&wal)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the checkpoint finish its last pages, then write a quarter as much
    // again: the WAL starts over from its beginning instead of growing (SQLite
    // overwrites a reused WAL and never shrinks the file).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for batch in entries("log-a", 2_000..2_500).chunks(100) {
        store.append_entries(batch).await.unwrap();
    }
    assert!(
        size(&wal) <= wal_after_first,
        "WAL grew from {wal_after_first} to {} bytes",
        size(&wal)
    );
    assert_eq!(store.log_size("log-a").await.unwrap(), 2_500);
}

/// A closed store leaves its database in one file: a backup copied over it
/// cannot meet an old WAL that SQLite would replay onto it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_close_leaves_an_empty_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let wal = dir.path().join("db.sqlite-wal");
    let store = open(&options(&path.display().to_string())).await.unwrap();
    with_log(&store, "log-a", 0).await;
    for batch in entries("log-a", 0..2_000).chunks(100) {
        store.append_entries(batch).await.unwrap();
        // Readers on the other pool, as the audit service's queries are.
        store.log_size("log-a").await.unwrap();
    }
    store.close().await;
    let left = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(left, 0, "{left} bytes left in the WAL after a clean close");
}

/// An append over a row the log's size does not account for (a damaged
/// database), put there through `$raw`, a connection of the store's backend:
/// the size check passes, the insert then fails on the primary key, and the
/// whole append (size update included) must go. The writer works on after it.
macro_rules! check_append_over_a_stray_row {
    ($store:expr, $raw:expr) => {{
        let (store, raw) = ($store, $raw);
        with_log(&store, "log-a", 0).await;
        sqlx::query(
            "INSERT INTO audit_entries (log_no, sequence, leaf_hash, leaf, time_us, kind, actor, provider, \
             record_type, purpose, outcome, subject_hash) VALUES ((SELECT log_no FROM audit_logs WHERE log_id = 'log-a'), \
             1, $1, '{}', 0, 'access', '', '', '', '', 'allowed', NULL)",
        )
        .bind(vec![0u8])
        .execute(&mut *raw)
        .await
        .unwrap();
        match store.append_entries(&entries("log-a", 0..3)).await {
            Err(StoreError::AlreadyExists { .. }) => {}
            other => panic!("append over a stray row: {other:?}"),
        }
        assert_eq!(store.log_size("log-a").await.unwrap(), 0);
        let zero: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_entries WHERE sequence = 0")
            .fetch_one(&mut *raw)
            .await
            .unwrap();
        assert_eq!(zero, 0, "entry 0 was rolled back with the rest");
        sqlx::query("DELETE FROM audit_entries").execute(&mut *raw).await.unwrap();
        // The writer's connection is not left inside the failed transaction.
        store.append_entries(&entries("log-a", 0..3)).await.unwrap();
        assert_eq!(store.log_size("log-a").await.unwrap(), 3);
    }};
}

/// A SQLite store and a connection of its own to the same file, for
/// changing the database under the store as damage or tampering would.
async fn sqlite_store_with_raw_connection() -> (tempfile::TempDir, Arc<dyn Store>, sqlx::SqliteConnection) {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&options(&path.display().to_string())).await.unwrap();
    let raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    (dir, store, raw)
}

#[tokio::test]
async fn sqlite_append_failing_inside_its_transaction_leaves_nothing_and_the_writer_works_on() {
    let (_dir, store, mut raw) = sqlite_store_with_raw_connection().await;
    check_append_over_a_stray_row!(store, &mut raw);
}

/// A trigger that silently drops some rows (`RAISE(IGNORE)`) must not have
/// the batch acknowledged: its entries would be answered as durable while the
/// log does not hold them. Nothing of the batch is committed.
#[tokio::test]
async fn sqlite_append_whose_rows_a_trigger_drops_is_refused_whole() {
    let (_dir, store, mut raw) = sqlite_store_with_raw_connection().await;
    with_log(&store, "log-a", 0).await;
    sqlx::query(
        "CREATE TRIGGER drop_one BEFORE INSERT ON audit_entries WHEN NEW.sequence = 1 BEGIN SELECT RAISE(IGNORE); END",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    match store.append_entries(&entries("log-a", 0..3)).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("fewer than the 3 entries"), "{m}"),
        other => panic!("append with a row dropped: {other:?}"),
    }
    assert_eq!(store.log_size("log-a").await.unwrap(), 0);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_entries")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(kept, 0, "the rows the trigger let in were rolled back");
    sqlx::query("DROP TRIGGER drop_one").execute(&mut raw).await.unwrap();
    store.append_entries(&entries("log-a", 0..3)).await.unwrap();
    assert_eq!(store.log_size("log-a").await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_append_failing_inside_its_statement_leaves_nothing_and_the_writer_works_on() {
    use sqlx::Connection;
    let url = postgres_url().await;
    let store = open(&options(&url)).await.unwrap();
    let mut raw = sqlx::PgConnection::connect(&url).await.unwrap();
    check_append_over_a_stray_row!(store, &mut raw);
}

/// A row deleted from the middle of a range is named, not skipped, and a
/// column that cannot be decoded names its entry.
macro_rules! check_entries_in_range_after_tampering {
    ($store:expr, $raw:expr) => {{
        let (store, raw) = ($store, $raw);
        with_log(&store, "log-a", 600).await;
        // The last row of one statement's rows, then one in the middle of another's.
        for deleted in [511, 4] {
            sqlx::query(&format!("DELETE FROM audit_entries WHERE sequence = {deleted}"))
                .execute(&mut *raw)
                .await
                .unwrap();
            match store.entries_in_range("log-a", 0, 600).await {
                Err(StoreError::NotFound { what }) => {
                    assert!(what.contains(&format!("entry {deleted} of log log-a")), "{what}")
                }
                other => panic!("deleted row {deleted}: {other:?}"),
            }
        }
        // The leaf hashes a log opens from name the first row missing too,
        // not the whole range asked for.
        match store.leaf_hashes("log-a", 0, 600).await {
            Err(StoreError::NotFound { what }) => {
                assert!(what.contains("entry 4 of log log-a"), "{what}")
            }
            other => panic!("leaf hashes over deleted rows: {other:?}"),
        }
        assert_eq!(
            store.entries_in_range("log-a", 5, 10).await.unwrap(),
            entries("log-a", 5..10)
        );
        sqlx::query("UPDATE audit_entries SET kind = 'forged' WHERE sequence = 7")
            .execute(&mut *raw)
            .await
            .unwrap();
        match store.entries_in_range("log-a", 5, 10).await {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("entry 7") && m.contains("kind"), "{m}"),
            other => panic!("an unknown kind: {other:?}"),
        }
    }};
}

#[tokio::test]
async fn sqlite_entries_in_range_name_a_deleted_or_undecodable_entry() {
    let (_dir, store, mut raw) = sqlite_store_with_raw_connection().await;
    check_entries_in_range_after_tampering!(store, &mut raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_entries_in_range_name_a_deleted_or_undecodable_entry() {
    use sqlx::Connection;
    let url = postgres_url().await;
    let store = open(&options(&url)).await.unwrap();
    let mut raw = sqlx::PgConnection::connect(&url).await.unwrap();
    check_entries_in_range_after_tampering!(store, &mut raw);
}

#[tokio::test]
async fn sqlite_in_memory_store_works() {
    let store = open(&options("sqlite::memory:")).await.unwrap();
    with_log(&store, "log-a", 3).await;
    assert_eq!(store.log_size("log-a").await.unwrap(), 3);
}

#[tokio::test]
async fn unsupported_scheme_is_a_config_error_without_the_password() {
    match open(&options("mysql://root:hunter2@db/lienthong")).await {
        Err(StoreError::Config(m)) => {
            assert!(m.contains("mysql") && !m.contains("hunter2"), "{m}");
        }
        other => panic!("mysql URL accepted: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_change_reaches_another_handle_within_a_second() {
    let url = postgres_url().await;
    let writer = open(&options(&url)).await.unwrap();
    let reader = open(&options(&url)).await.unwrap();
    let mut rx = reader.subscribe_changes();
    // Let the reader's listener connect; a change made before that is caught
    // up anyway (it sends the current counter once listening).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let value = writer.publish_change().await.unwrap();
    receive(&mut rx, value, Duration::from_secs(1)).await;
    let value = writer.publish_change().await.unwrap();
    receive(&mut rx, value, Duration::from_secs(1)).await;
    assert_eq!(reader.change_counter().await.unwrap(), value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_opens_of_a_fresh_database_both_succeed() {
    let url = postgres_url().await;
    let opts = options(&url);
    let (a, b, c) = tokio::join!(open(&opts), open(&opts), open(&opts));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    a.insert_member(&member("admin", vec![Role::Admin])).await.unwrap();
    assert_eq!(b.list_members().await.unwrap().len(), 1);
    // One database, one counter, moved once by the one change.
    assert_eq!(c.change_counter().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_fast_and_the_same_handle_recovers() {
    // A private cluster: stopping the shared one would break concurrent tests.
    let cluster = PgCluster::start().expect("PostgreSQL test cluster");
    let url = cluster.create_database().await.unwrap();
    let acquire_timeout = Duration::from_secs(1);
    let store = open(&StoreOptions {
        acquire_timeout,
        allow_unverified_postgres: false,
        ..options(&url)
    })
    .await
    .unwrap();
    with_log(&store, "log-a", 2).await;
    let mut rx = store.subscribe_changes();
    store.ping().await.unwrap();

    tokio::task::block_in_place(|| cluster.stop()).unwrap();
    let started = Instant::now();
    let ping = store.ping().await;
    assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
    assert!(
        started.elapsed() < acquire_timeout + Duration::from_secs(2),
        "ping took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let append = store.append_entries(&entries("log-a", 2..3)).await;
    assert!(matches!(append, Err(StoreError::Unavailable(_))), "{append:?}");
    assert!(
        started.elapsed() < acquire_timeout + Duration::from_secs(2),
        "append took {:?}",
        started.elapsed()
    );

    tokio::task::block_in_place(|| cluster.restart()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not recover after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.append_entries(&entries("log-a", 2..3)).await.unwrap();
    assert_eq!(store.log_size("log-a").await.unwrap(), 3);
    // The change listener reconnects too.
    let value = store.publish_change().await.unwrap();
    receive(&mut rx, value, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn postgres_unreachable_server_is_unavailable_without_the_password() {
    // Port 1 on loopback refuses connections.
    let url = "postgres://lienthong:pa55word@127.0.0.1:1/lienthong";
    let started = Instant::now();
    let opened = open(&StoreOptions {
        acquire_timeout: Duration::from_millis(500),
        allow_unverified_postgres: false,
        ..options(url)
    })
    .await;
    match opened {
        Err(StoreError::Unavailable(m)) => assert!(!m.contains("pa55word"), "{m}"),
        other => panic!("unreachable server: {:?}", other.map(|_| ())),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

/// A database of the schema before `0003_compact_audit_keys`, with two logs
/// of entries written in the old form, upgraded by opening it: every entry
/// reads back as it was written, subject history finds its entries, and the
/// logs go on from where they were.
async fn check_entries_survive_the_compact_keys_migration(url: &str, dialect: &str) {
    let old = tempfile::tempdir().unwrap();
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dialect);
    for file in std::fs::read_dir(&migrations).unwrap() {
        let file = file.unwrap();
        let name = file.file_name().into_string().unwrap();
        if name.starts_with("0001_") || name.starts_with("0002_") {
            std::fs::copy(file.path(), old.path().join(&name)).unwrap();
        }
    }
    let before = sqlx::migrate::Migrator::new(old.path()).await.unwrap();
    let mut written = Vec::new();
    for (log, count) in [("log-old", 5u64), ("log-other", 2)] {
        let mut entries = entries(log, 0..count);
        entries[0].subject_hash = "aa11".into();
        written.push((log, entries));
    }
    // The old insert, by hand: log ids in every row, subject HMACs as hex.
    macro_rules! write_old {
        ($pool:expr) => {{
            let pool = $pool;
            before.run(&pool).await.unwrap();
            for (log, entries) in &written {
                sqlx::query("INSERT INTO audit_logs (log_id, public_key, created_at_us, size) VALUES ($1, $2, 0, $3)")
                    .bind(*log)
                    .bind(vec![7u8; 32])
                    .bind(entries.len() as i64)
                    .execute(&pool)
                    .await
                    .unwrap();
                for e in entries {
                    sqlx::query(
                        "INSERT INTO audit_entries (log_id, sequence, leaf_hash, leaf, time_us, kind, actor, provider, \
                         record_type, purpose, outcome, subject_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    )
                    .bind(&e.log_id)
                    .bind(e.sequence as i64)
                    .bind(&e.leaf_hash[..])
                    .bind(&e.leaf)
                    .bind((e.time.unix_timestamp_nanos() / 1_000) as i64)
                    .bind(e.kind.as_str())
                    .bind(&e.actor)
                    .bind(&e.provider)
                    .bind(&e.record_type)
                    .bind(&e.purpose)
                    .bind(e.outcome.as_str())
                    .bind(&e.subject_hash)
                    .execute(&pool)
                    .await
                    .unwrap();
                }
            }
            pool.close().await;
        }};
    }
    if dialect == "sqlite" {
        let connect = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        write_old!(sqlx::SqlitePool::connect_with(connect).await.unwrap());
    } else {
        write_old!(sqlx::PgPool::connect(url).await.unwrap());
    }

    let store = open(&options(url)).await.unwrap();
    for (log, entries) in &written {
        let query = EntryQuery {
            log_id: log.to_string(),
            ..EntryQuery::default()
        };
        assert_eq!(&store.query_entries(&query).await.unwrap(), entries, "{log}");
        assert_eq!(store.log_size(log).await.unwrap(), entries.len() as u64);
    }
    let history = store.subject_entries("aa11", None, None, 0).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert!(history.iter().all(|e| e.subject_hash == "aa11" && e.sequence == 0));
    // The logs go on, and a new log gets a number of its own.
    store.append_entries(&entries("log-old", 5..7)).await.unwrap();
    with_log(&store, "log-new", 3).await;
    assert_eq!(store.log_size("log-old").await.unwrap(), 7);
    assert_eq!(store.leaf_hashes("log-new", 0, 3).await.unwrap().len(), 3);
    assert_eq!(store.leaf_hashes("log-other", 0, 2).await.unwrap().len(), 2);
    let other = EntryQuery {
        log_id: "log-other".into(),
        ..EntryQuery::default()
    };
    assert_eq!(store.query_entries(&other).await.unwrap(), written[1].1);
}

#[tokio::test]
async fn sqlite_entries_survive_the_compact_keys_migration() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/old.db", dir.path().display());
    check_entries_survive_the_compact_keys_migration(&url, "sqlite").await;
}

#[tokio::test]
async fn postgres_entries_survive_the_compact_keys_migration() {
    check_entries_survive_the_compact_keys_migration(&postgres_url().await, "postgres").await;
}
