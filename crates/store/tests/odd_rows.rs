//! Rows this version cannot decode (written by a newer replica on the same
//! database, or damaged): each table fails closed on its own terms, and one
//! odd row does not stop the whole federation from loading where leaving it
//! out only takes something away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_core::{Fingerprint, Member, MemberId, RevokedCertificate, Role};
use lienthong_store::{GrantQuery, Store, StoreError, StoreOptions, open};
use sqlx::Connection;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

async fn store_and_raw(dir: &std::path::Path) -> (Arc<dyn Store>, sqlx::SqliteConnection) {
    let path = dir.join("db.sqlite");
    let store = open(&StoreOptions {
        url: format!("sqlite://{}", path.display()),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    })
    .await
    .unwrap();
    let raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    (store, raw)
}

fn member(id: &str, roles: Vec<Role>) -> Member {
    let now = OffsetDateTime::now_utc();
    Member {
        id: MemberId::new(id.to_string()).unwrap(),
        display_name: id.to_string(),
        roles,
        enabled: true,
        disabled_reason: String::new(),
        created_at: now,
        updated_at: now,
    }
}

#[tokio::test]
async fn a_member_keeps_its_known_roles_and_loses_only_the_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut raw) = store_and_raw(dir.path()).await;
    store
        .insert_member(&member("tax-dept", vec![Role::Consumer]))
        .await
        .unwrap();
    // A role of a newer version, and a member this version cannot name.
    sqlx::query(
        "INSERT INTO members (id, display_name, roles, enabled, disabled_reason, created_at_us, updated_at_us) \
         VALUES ('notary-office', 'Notary', 'consumer,notary', 1, '', 0, 0), \
                ('Not An Id!', 'Odd', 'consumer', 1, '', 0, 0)",
    )
    .execute(&mut raw)
    .await
    .unwrap();

    let members = store.list_members().await.unwrap();
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["notary-office", "tax-dept"], "the undecodable member is left out");
    assert_eq!(members[0].roles, [Role::Consumer], "only the unknown role is dropped");
    // Read to be changed and written back, it is refused rather than
    // stripped of its role for good.
    match store.get_member("notary-office").await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("notary"), "{m}"),
        other => panic!("a member with an unknown role read for a change: {other:?}"),
    }
}

#[tokio::test]
async fn an_undecodable_grant_or_endpoint_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut raw) = store_and_raw(dir.path()).await;
    sqlx::query(
        "INSERT INTO grants (id, consumer, record_type, fields, purposes, valid_from_us, valid_until_us, \
         rate_limit_per_minute, revoked_at_us, revoked_reason, created_by, created_at_us, reviewed_version) VALUES \
         ('good', 'tax-dept', 'civil_status.birth_record', '\"all\"', '[\"tax\"]', 0, NULL, 0, NULL, '', 'admin', 1, 1), \
         ('odd', 'tax-dept', 'civil_status.birth_record', '{\"newer\": 1}', '[\"tax\"]', 0, NULL, 0, NULL, '', 'admin', 2, 1)",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let grants = store.list_grants(&GrantQuery::default()).await.unwrap();
    let ids: Vec<&str> = grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["good"]);

    sqlx::query(
        "INSERT INTO endpoints (id, provider, url, created_at_us) VALUES \
         ('ep-good', 'civil-status', 'https://127.0.0.1:1', 0), ('ep-odd', 'Not An Id!', 'https://127.0.0.1:2', 0)",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let endpoints = store.list_endpoints().await.unwrap();
    let ids: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["ep-good"]);
}

/// Leaving a revocation out would let its certificate in again: the list
/// fails whole, and so does the broker's reload, which then refuses lookups.
#[tokio::test]
async fn an_undecodable_revocation_fails_the_whole_list() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut raw) = store_and_raw(dir.path()).await;
    store
        .insert_revoked_certificate(&RevokedCertificate {
            fingerprint: Fingerprint([7; 32]),
            member: MemberId::new("tax-dept".to_string()).unwrap(),
            reason: "key leaked".into(),
            not_after: None,
            revoked_at: OffsetDateTime::now_utc(),
            revoked_by: MemberId::new("admin".to_string()).unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(store.list_revoked_certificates().await.unwrap().len(), 1);
    sqlx::query(
        "INSERT INTO revoked_certificates (fingerprint, member_id, reason, not_after_us, revoked_at_us, revoked_by) \
         VALUES ('not-a-fingerprint', 'tax-dept', 'odd', NULL, 0, 'admin')",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    match store.list_revoked_certificates().await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("fingerprint"), "{m}"),
        other => panic!("an undecodable revocation: {other:?}"),
    }
}
