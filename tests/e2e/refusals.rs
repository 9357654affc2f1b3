//! Requests refused for their shape or their caller's roles: each is answered
//! with a status a person can act on and lands in the access log, bounded.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{CITIZEN_PORTAL, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, TAX_DEPT};
use sqlx::sqlite::SqlitePoolOptions;
use std::time::Duration;
use tonic::Code;

fn by(actor: &str, kind: pb::EntryKind) -> pb::EntryFilter {
    pb::EntryFilter {
        actor: actor.into(),
        kind: kind as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn oversized_names_are_refused_and_logged_clipped() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 5);

    let mut long_type = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    long_type.record_type = "civil_status.birth_record".repeat(8_000);
    let err = office.exchange().lookup(long_type).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("record_type is 200000 bytes; at most 128"),
        "{}",
        err.message()
    );

    let mut long_purpose = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    long_purpose.purpose = "p".repeat(100_000);
    let err = office.exchange().lookup(long_purpose).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("purpose is 100000 bytes"), "{}", err.message());

    let mut long_field = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    long_field.fields = vec![format!("/{}", "f".repeat(50_000))];
    let err = office.exchange().lookup(long_field).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().len() < 200,
        "the pointer is not echoed: {} bytes",
        err.message().len()
    );

    // A long request id is clipped, not refused: the answer says which id it got.
    let mut long_id = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    long_id.request_id = "é".repeat(1_000);
    let r = office.exchange().lookup(long_id).await.unwrap().into_inner();
    assert_eq!(r.request_id, "é".repeat(64));

    let logged = logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Access)).await;
    let refused: Vec<_> = logged
        .iter()
        .filter(|e| e.outcome == pb::Outcome::Invalid as i32)
        .collect();
    assert_eq!(refused.len(), 3, "every refusal is logged");
    for e in &refused {
        assert!(e.reason.starts_with("oversized_request: "), "{}", e.reason);
        assert!(
            e.leaf_json.len() < 2_000,
            "a refused request logs {} bytes",
            e.leaf_json.len()
        );
    }
    assert_eq!(refused[0].record_type.len(), 128);
    assert_eq!(refused[1].purpose.len(), 128);
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_malformed_item_query_in_a_collect_is_refused_and_logged() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let err = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": citizen_id(&fed, 6) }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: vec![pb::CollectItem {
                record_type: "civil_status.birth_record".into(),
                query_json: "{".into(),
                ..Default::default()
            }],
            request_id: "collect-with-a-bad-item".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("items[].query_json is not valid JSON"),
        "{}",
        err.message()
    );

    let logged = logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Access)).await;
    let e = logged
        .iter()
        .find(|e| e.request_id == "collect-with-a-bad-item")
        .expect("the refused collect is logged");
    assert_eq!(e.outcome, pb::Outcome::Invalid as i32);
    assert!(e.reason.starts_with("invalid_query: "), "{}", e.reason);
    // The shared query names the citizen: the attempt is in their history.
    let seen = history(&client(&fed, CITIZEN_PORTAL).await, &citizen_id(&fed, 6))
        .await
        .unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].outcome, pb::Outcome::Invalid as i32);
    fed.shutdown().await.unwrap();
}

/// A Collect refused as a whole is an attempt on every citizen it names:
/// each sees it in their history, and no national id is in the log.
#[tokio::test]
async fn a_collect_refused_as_a_whole_is_in_the_history_of_every_citizen_it_names() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let portal = client(&fed, CITIZEN_PORTAL).await;
    let (first, second) = (citizen_id(&fed, 14), citizen_id(&fed, 15));
    let (birth, marriage) = ("civil_status.birth_record", "civil_status.marriage_record");
    let item = |record_type: &str, query: serde_json::Value| pb::CollectItem {
        record_type: record_type.into(),
        query_json: if query.is_null() {
            String::new()
        } else {
            query.to_string()
        },
        ..Default::default()
    };
    let err = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": first }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: vec![
                item(birth, serde_json::json!({ "national_id": second })),
                item(marriage, serde_json::Value::Null),
            ],
            request_id: "two-citizens".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("items name different subjects"),
        "{}",
        err.message()
    );
    // Refused for its shape (the same type twice), about one citizen.
    let err = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": first }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: vec![
                item(birth, serde_json::Value::Null),
                item(birth, serde_json::Value::Null),
            ],
            request_id: "type-twice".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let logged = logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Access)).await;
    let two: Vec<_> = logged.iter().filter(|e| e.request_id == "two-citizens").collect();
    assert_eq!(two.len(), 2, "one entry for each citizen named: {two:#?}");
    let twice: Vec<_> = logged.iter().filter(|e| e.request_id == "type-twice").collect();
    assert_eq!(twice.len(), 1, "{twice:#?}");
    for e in two.iter().chain(&twice) {
        assert_eq!(e.outcome, pb::Outcome::Invalid as i32);
        assert!(!e.subject_hash.is_empty(), "{e:?}");
        assert!(!e.leaf_json.contains(&first) && !e.leaf_json.contains(&second));
    }
    assert!(two.iter().all(|e| e.reason.starts_with("several_subjects: ")));
    assert!(twice[0].reason.starts_with("invalid_collect: "), "{}", twice[0].reason);
    assert_eq!(twice[0].record_type, birth);

    let first_saw = history(&portal, &first).await.unwrap();
    let second_saw = history(&portal, &second).await.unwrap();
    assert_eq!(first_saw.len(), 2, "{first_saw:#?}");
    assert_eq!(second_saw.len(), 1, "{second_saw:#?}");
    assert_eq!(second_saw[0].record_type, birth, "the item naming the second citizen");
    assert!(first_saw.iter().any(|a| a.record_type == marriage));
    for a in first_saw.iter().chain(&second_saw) {
        assert_eq!(a.outcome, pb::Outcome::Invalid as i32);
        assert_eq!(a.consumer, JUDICIAL_OFFICE);
    }
    fed.shutdown().await.unwrap();
}

/// A lookup sent with a raw `grpc-timeout` header.
async fn lookup_with_timeout(office: &Clients, subject: &str, timeout: &'static str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(birth_lookup(subject, PURPOSE_CERTIFICATE));
    request
        .metadata_mut()
        .insert("grpc-timeout", tonic::metadata::MetadataValue::from_static(timeout));
    office.exchange().lookup(request).await.map(|_| ())
}

#[tokio::test]
async fn a_grpc_timeout_outside_the_spec_is_ignored() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 7);
    // Nineteen digits overflowed the deadline's arithmetic (the handler
    // panicked, unaudited); nine break the spec's bound of eight. Each is no
    // deadline, as tonic treats them.
    for timeout in [
        "9999999999999999999S",
        "99999999999999999999S",
        "999999999H",
        "-5S",
        "+5S",
    ] {
        lookup_with_timeout(&office, &subject, timeout)
            .await
            .unwrap_or_else(|e| panic!("grpc-timeout {timeout}: {e:?}"));
    }
    // The largest the spec allows is a deadline, far away.
    lookup_with_timeout(&office, &subject, "99999999H").await.unwrap();
    fed.shutdown().await.unwrap();
}

/// A lookup whose deadline has passed before the register could be asked
/// is not blamed on the register: it is not called, and the entry says the
/// caller's deadline passed.
#[tokio::test]
async fn a_deadline_passed_before_the_register_was_asked_is_the_callers() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut request = tonic::Request::new(pb::LookupRequest {
        request_id: "no-time-left".into(),
        ..birth_lookup(&citizen_id(&fed, 16), PURPOSE_CERTIFICATE)
    });
    request
        .metadata_mut()
        .insert("grpc-timeout", tonic::metadata::MetadataValue::from_static("0m"));
    let err = office.exchange().lookup(request).await.unwrap_err();
    // tonic's client gives up at once, by its own clock, before the answer.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // The lookup runs to its end behind the answer: its entry comes after.
    let entry = async || {
        logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Access))
            .await
            .into_iter()
            .find(|e| e.request_id == "no-time-left")
    };
    assert!(eventually(Duration::from_secs(10), async || entry().await.is_some()).await);
    let entry = entry().await.unwrap();
    assert_eq!(entry.outcome, pb::Outcome::Failed as i32);
    assert!(
        entry.reason.starts_with("deadline_exceeded: ") && entry.reason.contains("caller's deadline"),
        "{}",
        entry.reason
    );
    assert!(!entry.reason.contains("did not answer"), "{}", entry.reason);
    fed.shutdown().await.unwrap();
}

/// `subject`'s access history, read by `reader`.
async fn history(reader: &Clients, subject: &str) -> Result<Vec<pb::SubjectAccess>, tonic::Status> {
    let r = reader
        .audit()
        .subject_history(pb::SubjectHistoryRequest {
            subject_key: subject.into(),
            since: None,
            limit: 0,
            page_token: String::new(),
        })
        .await?;
    Ok(r.into_inner().accesses)
}

#[tokio::test]
async fn reads_of_a_citizens_history_and_refused_audit_requests_are_logged() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let portal = client(&fed, CITIZEN_PORTAL).await;
    let subject = citizen_id(&fed, 8);
    look_up_birth(&office, &subject).await.unwrap();

    let first = history(&portal, &subject).await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    // Reads of the history are logged but are not accesses to the records.
    assert_eq!(history(&portal, &subject).await.unwrap().len(), 1);

    let reads = logged(&fed, by(CITIZEN_PORTAL, pb::EntryKind::AuditRead)).await;
    assert_eq!(reads.len(), 2, "{reads:?}");
    let lookup = &logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Access)).await[0];
    for r in &reads {
        assert_eq!(r.action, "Audit.SubjectHistory");
        assert_eq!(r.outcome, pb::Outcome::Allowed as i32);
        assert_eq!(
            r.subject_hash, lookup.subject_hash,
            "the read names the citizen by HMAC"
        );
        assert!(!r.leaf_json.contains(&subject), "no national id in clear");
    }

    // A consumer may not read the log; the refusal is on the record.
    let err = office
        .audit()
        .query_entries(pb::QueryEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = history(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let refused = logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::AuditRead)).await;
    let actions: Vec<(&str, i32)> = refused.iter().map(|e| (e.action.as_str(), e.outcome)).collect();
    assert_eq!(
        actions,
        [
            ("Audit.QueryEntries", pb::Outcome::Denied as i32),
            ("Audit.SubjectHistory", pb::Outcome::Denied as i32)
        ]
    );

    // A page token the broker did not give is refused, and on the record.
    for token in ["x", "1.2.not-a-log", &format!("1.{}.{}", u64::MAX, "a".repeat(64))] {
        let err = portal
            .audit()
            .subject_history(pb::SubjectHistoryRequest {
                subject_key: subject.clone(),
                since: None,
                limit: 0,
                page_token: token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}: {err:?}");
    }
    let invalid = logged(&fed, by(CITIZEN_PORTAL, pb::EntryKind::AuditRead))
        .await
        .into_iter()
        .filter(|e| e.outcome == pb::Outcome::Invalid as i32)
        .count();
    assert_eq!(invalid, 3);
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_grant_revoked_in_the_database_alone_stops_lookups_within_seconds() {
    // What a revocation whose audit entry or announcement failed after its
    // commit leaves behind: the change is in the database and nothing else.
    let (_dir, fed) = federation().await;
    let admin = client(&fed, lienthong_cli::federation::ADMIN).await;
    let tax = client(&fed, TAX_DEPT).await;
    let g = granted(&admin, birth_grant(TAX_DEPT, &["/full_name"], 0)).await;
    let lookup = birth_lookup(&citizen_id(&fed, 9), "tax-law-38-2019/art-17");
    tax.exchange().lookup(lookup.clone()).await.unwrap();

    let path = fed.dir.join("broker-data/lienthong.db");
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE grants SET revoked_at_us = 0, revoked_reason = 'revoked in the database' WHERE id = ?")
        .bind(&g.id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    assert!(
        eventually(Duration::from_secs(10), async || {
            matches!(tax.exchange().lookup(lookup.clone()).await, Err(e) if e.code() == Code::PermissionDenied)
        })
        .await,
        "the broker reloads a change it did not make"
    );
    fed.shutdown().await.unwrap();
}

/// A refused request's own text goes into the permanent log and back to the
/// caller bounded: a member cannot write megabytes into either.
#[tokio::test]
async fn a_refused_request_cannot_write_megabytes_into_the_log() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let huge = "y".repeat(1_000_000);
    let err = office
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(pb::RecordTypeDefinition {
                name: huge.clone(),
                owner: huge.clone(),
                ..Default::default()
            }),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    // An owner that is no member id is malformed, whoever sends it.
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{}",
        &err.message()[..200.min(err.message().len())]
    );
    assert!(err.message().len() < 1_000, "{} bytes", err.message().len());
    let err = office
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: huge.clone(),
            version: 1,
            note: "x".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().len() < 1_000, "{} bytes", err.message().len());
    let entries = logged(&fed, by(JUDICIAL_OFFICE, pb::EntryKind::Admin)).await;
    assert_eq!(entries.len(), 2, "both refusals are on the record");
    for e in &entries {
        assert!(e.leaf_json.len() < 4_096, "{} bytes", e.leaf_json.len());
        assert!(e.target.ends_with('…'), "{}", &e.target[..50]);
    }
    fed.shutdown().await.unwrap();
}

/// A member reading citizens' histories faster than
/// `limits.subject_history_per_minute` is refused with a wait to honour, and
/// the refusal is on the record; another member keeps its own allowance.
#[tokio::test]
async fn reading_citizens_histories_is_rate_limited_per_member_and_refusals_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = lienthong_cli::federation::FederationOptions::new(dir.path());
    opts.extra_config = "\n[limits]\nsubject_history_per_minute = 2\n".into();
    let fed = lienthong_cli::federation::Federation::start(opts).await.unwrap();
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let portal = client(&fed, CITIZEN_PORTAL).await;
    let auditor = client(&fed, lienthong_cli::federation::STATE_AUDIT).await;
    let subject = citizen_id(&fed, 8);
    look_up_birth(&office, &subject).await.unwrap();

    assert_eq!(history(&portal, &subject).await.unwrap().len(), 1);
    assert_eq!(history(&portal, &citizen_id(&fed, 9)).await.unwrap().len(), 0);
    let err = history(&portal, &citizen_id(&fed, 10)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limits.subject_history_per_minute"), "{err:?}");
    assert!(!err.message().contains(&citizen_id(&fed, 10)), "{err:?}");
    let wait: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    // The limit is the member's: the auditor still reads.
    assert_eq!(history(&auditor, &subject).await.unwrap().len(), 1);

    let reads = logged(&fed, by(CITIZEN_PORTAL, pb::EntryKind::AuditRead)).await;
    let outcomes: Vec<i32> = reads.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [
            pb::Outcome::Allowed as i32,
            pb::Outcome::Allowed as i32,
            pb::Outcome::Denied as i32
        ]
    );
    let refused = &reads[2];
    assert_eq!(refused.action, "Audit.SubjectHistory");
    assert!(refused.reason.starts_with("rate_limited: "), "{}", refused.reason);
    assert!(
        !refused.subject_hash.is_empty(),
        "the refused read names the citizen by HMAC"
    );
    fed.shutdown().await.unwrap();
}
