//! A broker that cannot load the federation's current state from its
//! database (a row it cannot decode) refuses lookups, audited, rather than
//! go on honouring what a change took away; admin and audit calls go on so
//! that the fault can be repaired, and lookups are served again after.

use crate::harness::{citizen_id, client, eventually, exchange_health, http_get, logged, look_up_birth, sample};
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{
    ADMIN, CIVIL_STATUS, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, TAX_DEPT,
};
use sqlx::sqlite::SqlitePoolOptions;
use std::time::Duration;
use tonic::Code;

const CRIMINAL: &str = "judicial.criminal_record_extract";
const MARRIAGE: &str = "civil_status.marriage_record";

/// A revocation this version cannot decode: leaving it out would let a
/// certificate in again, so it fails every reload of the snapshot.
const BAD_REVOCATION: &str = "INSERT INTO revoked_certificates \
     (fingerprint, member_id, reason, not_after_us, revoked_at_us, revoked_by) \
     VALUES ('written-by-a-newer-version', 'hanoi-tax-dept', 'odd', NULL, 0, 'federation-admin')";
const REPAIR: &str = "DELETE FROM revoked_certificates WHERE fingerprint = 'written-by-a-newer-version'";

async fn criminal_lookup(office: &Clients, subject: &str) -> Result<pb::LookupResponse, tonic::Status> {
    office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: CRIMINAL.into(),
            query_json: serde_json::json!({ "national_id": subject }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn is_stale_refusal(e: &tonic::Status) -> bool {
    e.code() == Code::Unavailable
        && e.message().contains("cannot load")
        && e.message().contains("no data was released")
        && e.message().contains("snapshot reload failed")
}

async fn stale_metric(fed: &Federation) -> f64 {
    let addr = fed.broker.metrics_addr.unwrap();
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    sample(&body, "lienthong_snapshot_stale")
}

async fn exchange_serving(fed: &Federation) -> bool {
    exchange_health(&fed.broker_url, &fed.certs.join("ca.pem")).await.0
}

#[tokio::test]
async fn a_broker_that_cannot_load_a_change_refuses_lookups_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.metrics_listen = Some("127.0.0.1:0".into());
    opts.extra_config = "\n[limits]\nmax_snapshot_lag_ms = 300\n".into();
    let fed = Federation::start(opts).await.unwrap();
    let admin = client(&fed, ADMIN).await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 3);
    look_up_birth(&office, &subject).await.unwrap();
    assert!(exchange_serving(&fed).await);
    assert_eq!(stale_metric(&fed).await, 0.0);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "sqlite://{}",
            fed.dir.join("broker-data/lienthong.db").display()
        ))
        .await
        .unwrap();

    // 1. A revocation through this broker, which cannot load it: the admin
    // is told, and lookups are refused at once, not served from the
    // snapshot that still holds the grant.
    sqlx::query(BAD_REVOCATION).execute(&pool).await.unwrap();
    let grant = admin
        .admin()
        .list_grants(pb::ListGrantsRequest {
            consumer: JUDICIAL_OFFICE.into(),
            record_type: "civil_status.birth_record".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grants
        .remove(0);
    let err = admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: grant.id.clone(),
            reason: "end of the agreement".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    for needle in [
        "was applied and audited",
        "cannot load it",
        "refuses lookups",
        "do not repeat it",
    ] {
        assert!(err.message().contains(needle), "{needle:?} in {err:?}");
    }
    let refused = look_up_birth(&office, &subject).await.unwrap_err();
    assert!(is_stale_refusal(&refused), "{refused:?}");
    let collected = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": subject }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: ["civil_status.birth_record", CRIMINAL]
                .iter()
                .map(|t| pb::CollectItem {
                    record_type: t.to_string(),
                    ..Default::default()
                })
                .collect(),
            request_id: "collect-while-stale".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for item in &collected.results {
        match &item.result {
            Some(pb::collect_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::Unavailable as i32, "{e:?}");
                assert!(e.message.contains("no data was released"), "{e:?}");
            }
            other => panic!("{} released while stale: {other:?}", item.record_type),
        }
        assert!(item.receipt.is_some(), "{} is audited", item.record_type);
    }

    // Audited as failures with their reason; the change itself as made.
    let failed = logged(
        &fed,
        pb::EntryFilter {
            actor: JUDICIAL_OFFICE.into(),
            outcome: pb::Outcome::Failed as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 3, "one lookup and two collect items: {failed:?}");
    assert!(
        failed.iter().all(|e| e.reason.starts_with("snapshot_stale: ")),
        "{failed:?}"
    );
    let revocations: Vec<i32> = logged(
        &fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Admin as i32,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|e| e.action == "grant.revoke")
    .map(|e| e.outcome)
    .collect();
    assert_eq!(
        revocations,
        [pb::Outcome::Allowed as i32],
        "no entry claims the revocation failed"
    );

    // Health checks send lookups elsewhere; the state is exported.
    assert!(eventually(Duration::from_secs(30), async || !exchange_serving(&fed).await).await);
    assert_eq!(stale_metric(&fed).await, 1.0);
    // Admin calls go on, for the repair, and report the database, not the
    // snapshot this replica is stuck on: a member disabled now reads
    // disabled, although lookups here cannot take it into account yet.
    let disabled = admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: TAX_DEPT.into(),
            reason: "certificate lost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(disabled.code(), Code::Internal, "{disabled:?}");
    let read = admin
        .admin()
        .get_member(pb::GetMemberRequest { id: TAX_DEPT.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!read.enabled, "{read:?}");
    let members = admin
        .admin()
        .list_members(pb::ListMembersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.iter().any(|m| m.id == JUDICIAL_OFFICE));
    let listed = members.iter().find(|m| m.id == TAX_DEPT).unwrap();
    assert!(!listed.enabled, "{listed:?}");
    // The schema registry likewise: a version deprecated now reads deprecated.
    let integrator = client(&fed, CIVIL_STATUS).await;
    let deprecated = integrator
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: MARRIAGE.into(),
            version: 1,
            note: "superseded by the 2026 register".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(deprecated.code(), Code::Internal, "{deprecated:?}");
    let read = integrator
        .schemas()
        .get(pb::GetRecordTypeRequest {
            name: MARRIAGE.into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.deprecated, "{read:?}");
    let listed = integrator
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .record_types;
    let names: Vec<&str> = listed
        .iter()
        .map(|v| v.definition.as_ref().unwrap().name.as_str())
        .collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    let marriage = listed
        .iter()
        .find(|v| v.definition.as_ref().unwrap().name == MARRIAGE)
        .unwrap();
    assert!(marriage.deprecated, "{marriage:?}");
    // A record type row this version cannot read (a newer replica's) keeps
    // the registry answering, from the snapshot, rather than failing.
    let compatibility: String = sqlx::query_scalar("SELECT compatibility FROM record_type_versions WHERE name = ?")
        .bind(CRIMINAL)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE record_type_versions SET compatibility = 'from-a-newer-version' WHERE name = ?")
        .bind(CRIMINAL)
        .execute(&pool)
        .await
        .unwrap();
    let answered = integrator
        .schemas()
        .get(pb::GetRecordTypeRequest {
            name: MARRIAGE.into(),
            version: 1,
        })
        .await;
    assert!(answered.is_ok(), "{answered:?}");
    sqlx::query("UPDATE record_type_versions SET compatibility = ? WHERE name = ?")
        .bind(compatibility)
        .bind(CRIMINAL)
        .execute(&pool)
        .await
        .unwrap();

    // Repaired: the revocation is loaded at last, and other lookups are served.
    sqlx::query(REPAIR).execute(&pool).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || {
            criminal_lookup(&office, &subject).await.is_ok()
        })
        .await,
        "lookups are served again once the row is repaired"
    );
    let denied = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Code::PermissionDenied,
        "the revocation is in effect: {denied:?}"
    );
    assert!(eventually(Duration::from_secs(30), async || exchange_serving(&fed).await).await);
    assert_eq!(stale_metric(&fed).await, 0.0);

    // 2. A change this broker did not make (another replica's, the row
    // itself here): the snapshot is behind, and past the bound lookups are
    // refused, until the row is repaired.
    sqlx::query(BAD_REVOCATION).execute(&pool).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || {
            matches!(criminal_lookup(&office, &subject).await, Err(e) if is_stale_refusal(&e))
        })
        .await,
        "a snapshot that cannot be reloaded is not served past limits.max_snapshot_lag_ms"
    );
    assert!(eventually(Duration::from_secs(30), async || !exchange_serving(&fed).await).await);
    sqlx::query(REPAIR).execute(&pool).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || {
            criminal_lookup(&office, &subject).await.is_ok()
        })
        .await
    );
    assert!(eventually(Duration::from_secs(30), async || exchange_serving(&fed).await).await);
    pool.close().await;
    fed.shutdown().await.unwrap();
}

/// A replica that cannot read its database at all (cut off from it) cannot
/// tell whether a change it lacks was made: past the bound its lookups are
/// refused and its health says so, until it reads the database again.
#[tokio::test]
async fn a_broker_that_cannot_read_its_database_refuses_lookups_past_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.extra_config = "\n[limits]\nmax_snapshot_lag_ms = 300\n".into();
    let fed = Federation::start(opts).await.unwrap();
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 4);
    look_up_birth(&office, &subject).await.unwrap();
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "sqlite://{}",
            fed.dir.join("broker-data/lienthong.db").display()
        ))
        .await
        .unwrap();
    // What the broker polls, and reloads from, gone: as a database out of reach.
    sqlx::query("ALTER TABLE change_counter RENAME TO change_counter_away")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || !exchange_serving(&fed).await).await,
        "still serving while it cannot read its database"
    );
    let refused = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("no data was released"), "{refused:?}");

    sqlx::query("ALTER TABLE change_counter_away RENAME TO change_counter")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || exchange_serving(&fed).await).await,
        "not serving again once it reads its database"
    );
    look_up_birth(&office, &subject).await.unwrap();
    fed.shutdown().await.unwrap();
}
