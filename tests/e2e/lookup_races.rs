//! A lookup between its decision and its release: a grant revoked or a
//! consumer disabled while the register answers stops the record; the entry
//! names the grant it was allowed under; text that would forge the log is
//! refused; a register's fault uses none of the consumer's rate limit; and
//! an unknown schema version still reaches the citizen's history.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::Clients;
use lienthong_cli::federation::{
    ADMIN, CITIZEN_PORTAL, CIVIL_STATUS, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, TAX_DEPT,
};
use lienthong_provider::demo::DemoRegisterKind;
use lienthong_provider::testing::{self, FaultMode, Faulty};
use lienthong_tls::{ServerTls, TlsMaterial};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const TAX_PURPOSE: &str = "tax-law-38-2019/art-17";

/// The federation's civil-status register replaced by a [`Faulty`] one,
/// healthy until told otherwise.
async fn faulty_civil_register(fed: &Federation) -> (Faulty, testing::ServerHandle) {
    let material = TlsMaterial::load(&lienthong_cli::client::member_files(&fed.certs, CIVIL_STATUS)).unwrap();
    let tls = Arc::new(ServerTls::new(&material, &fed.options.trust_domain).unwrap());
    let faulty = Faulty::new(DemoRegisterKind::CivilStatus.source(fed.options.seed));
    let server = testing::start_faulty_server(faulty.clone(), tls).await.unwrap();
    replace_civil_endpoint(fed, &server.url()).await;
    (faulty, server)
}

/// A federation (on PostgreSQL when `database_url` is given) whose
/// civil-status register is a [`Faulty`] one, its circuit breaker out of
/// the way.
async fn federation_with_faulty_register(
    database_url: Option<String>,
) -> (tempfile::TempDir, Federation, Faulty, testing::ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.extra_config = "\n[relay]\nbreaker_failures = 1000\n".into();
    opts.database_url = database_url;
    let fed = Federation::start(opts).await.unwrap();
    let (faulty, server) = faulty_civil_register(&fed).await;
    (dir, fed, faulty, server)
}

/// Starts `lookup` as `consumer`, and returns once the register has it (and
/// is sleeping on it).
async fn lookup_held_by_the_register(
    consumer: &Clients,
    faulty: &Faulty,
    lookup: pb::LookupRequest,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::LookupResponse>, tonic::Status>> {
    let calls = faulty.calls();
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(3)));
    let consumer = consumer.clone();
    let call = tokio::spawn(async move { consumer.exchange().lookup(lookup).await });
    assert!(
        eventually(Duration::from_secs(10), async || faulty.calls() > calls).await,
        "the lookup reached the register"
    );
    call
}

/// The access entries of `actor`, oldest first.
async fn access_entries(fed: &Federation, actor: &str) -> Vec<pb::AuditEntry> {
    logged(
        fed,
        pb::EntryFilter {
            actor: actor.into(),
            kind: pb::EntryKind::Access as i32,
            ..Default::default()
        },
    )
    .await
}

/// The grant an entry's leaf names (`grant_id`), empty when none.
fn grant_of(entry: &pb::AuditEntry) -> String {
    let leaf: serde_json::Value = serde_json::from_str(&entry.leaf_json).unwrap();
    leaf.get("grant_id")
        .and_then(|g| g.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// A grant replaced while a lookup waits for its register (a new grant
/// made, the old one revoked) does not refuse the lookup: the new grant
/// covers it, and the entry names the new grant.
#[tokio::test]
async fn a_lookup_in_progress_is_released_under_the_grant_that_replaced_its_own() {
    let (_dir, fed, faulty, server) = federation_with_faulty_register(None).await;
    let admin = client(&fed, ADMIN).await;
    let old = granted(&admin, birth_grant(TAX_DEPT, &["/full_name"], 0)).await;
    let tax = client(&fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 44);
    let in_progress = lookup_held_by_the_register(&tax, &faulty, birth_lookup(&subject, TAX_PURPOSE)).await;
    // The replacement differs (a grant the same as a live one is refused):
    // here it adds an end.
    let mut replacement = birth_grant(TAX_DEPT, &["/full_name"], 0);
    replacement.valid_until = Some(lienthong_broker::convert::ts(
        time::OffsetDateTime::now_utc() + time::Duration::days(365),
    ));
    let new = granted(&admin, replacement).await;
    revoke(&admin, &old.id, "replaced by a new grant").await;
    in_progress
        .await
        .unwrap()
        .expect("the new grant allows what the old one did");
    let last = access_entries(&fed, TAX_DEPT).await.pop().unwrap();
    assert_eq!(last.outcome, pb::Outcome::Allowed as i32, "{last:?}");
    assert_eq!(
        grant_of(&last),
        new.id,
        "the entry names the grant that allowed the release"
    );
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// An admin told a grant is revoked, or a consumer disabled, can rely on
/// nothing more leaving under it: a lookup the register was answering then
/// is refused once the answer comes, and audited as denied, after the
/// revocation. An allowed lookup's entry names the grant it was allowed under.
#[tokio::test]
async fn a_lookup_in_progress_releases_nothing_once_its_grant_is_revoked_or_its_consumer_disabled() {
    let (_dir, fed, faulty, server) = federation_with_faulty_register(None).await;
    let admin = client(&fed, ADMIN).await;
    let grant = granted(&admin, birth_grant(TAX_DEPT, &["/full_name"], 0)).await;
    let tax = client(&fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 41);
    tax.exchange()
        .lookup(birth_lookup(&subject, TAX_PURPOSE))
        .await
        .expect("allowed before the revocation");
    let allowed = access_entries(&fed, TAX_DEPT).await;
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].outcome, pb::Outcome::Allowed as i32);
    assert_eq!(grant_of(&allowed[0]), grant.id, "the entry names its grant");

    let in_progress = lookup_held_by_the_register(&tax, &faulty, birth_lookup(&subject, TAX_PURPOSE)).await;
    admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: grant.id.clone(),
            reason: "agreement ended".into(),
        })
        .await
        .expect("revoked while the register answers");
    let err = in_progress
        .await
        .unwrap()
        .expect_err("nothing leaves once the grant is revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("revoked") && err.message().contains("nothing was released"),
        "{}",
        err.message()
    );
    let entries = access_entries(&fed, TAX_DEPT).await;
    let last = entries.last().unwrap();
    assert_eq!(last.outcome, pb::Outcome::Denied as i32, "{last:?}");
    assert!(last.reason.starts_with("grant_revoked: "), "{}", last.reason);
    assert!(
        last.payload_digest.is_empty() && last.fields_released.is_empty(),
        "{last:?}"
    );
    assert_eq!(grant_of(last), grant.id);
    let revoked_at = admin_entries(&fed)
        .await
        .iter()
        .find(|e| e.action == "grant.revoke")
        .map(|e| e.sequence)
        .unwrap();
    assert!(
        !entries
            .iter()
            .any(|e| e.sequence > revoked_at && e.outcome == pb::Outcome::Allowed as i32),
        "no access allowed after the revocation: {entries:#?}"
    );

    // A consumer disabled meanwhile: the same.
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let in_progress = lookup_held_by_the_register(&office, &faulty, birth_lookup(&subject, PURPOSE_CERTIFICATE)).await;
    admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: JUDICIAL_OFFICE.into(),
            reason: "certificate leaked".into(),
        })
        .await
        .unwrap();
    let err = in_progress
        .await
        .unwrap()
        .expect_err("nothing leaves to a disabled consumer");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("disabled"), "{}", err.message());
    let last = access_entries(&fed, JUDICIAL_OFFICE).await.pop().unwrap();
    assert_eq!(last.outcome, pb::Outcome::Denied as i32, "{last:?}");
    assert!(last.reason.starts_with("member_disabled: "), "{}", last.reason);
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// A newline or an escape character in a request id, record type, purpose
/// or field pointer would forge rows where the log is printed, or drive the
/// auditor's terminal: refused as INVALID_ARGUMENT, audited as invalid with
/// the text escaped.
#[tokio::test]
async fn text_with_control_characters_is_refused_and_audited_escaped() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 42);
    let lookup = || birth_lookup(&subject, PURPOSE_CERTIFICATE);
    let forged_row = "\n2026-01-01T00:00:00Z access hanoi-tax-dept allowed";
    let mut purpose = lookup();
    purpose.purpose.push_str(forged_row);
    let mut record_type = lookup();
    record_type.record_type.push_str("\u{1b}[2J");
    let mut request_id = lookup();
    request_id.request_id = format!("case-7{forged_row}");
    let mut field = lookup();
    field.fields = vec!["/full_name\r".into()];
    for (what, request, character) in [
        ("purpose", purpose, "U+000A"),
        ("record_type", record_type, "U+001B"),
        ("request_id", request_id, "U+000A"),
        ("a field pointer", field, "U+000D"),
    ] {
        let err = office.exchange().lookup(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with(what) && err.message().contains(character),
            "{what}: {}",
            err.message()
        );
    }
    let err = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": subject }).to_string(),
            purpose: format!("{PURPOSE_CERTIFICATE}{forged_row}"),
            items: vec![pb::CollectItem {
                record_type: "civil_status.birth_record".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let entries = access_entries(&fed, JUDICIAL_OFFICE).await;
    assert_eq!(entries.len(), 5, "every refusal is audited: {entries:#?}");
    for e in &entries {
        assert_eq!(e.outcome, pb::Outcome::Invalid as i32, "{e:?}");
        assert!(e.reason.starts_with("unprintable_text: "), "{}", e.reason);
        let texts = [&e.purpose, &e.record_type, &e.request_id, &e.reason];
        assert!(
            texts.iter().all(|t| !t.contains(char::is_control)),
            "no control character is stored: {e:?}"
        );
    }
    let escaped = format!("{PURPOSE_CERTIFICATE}\\n2026-01-01T00:00:00Z access hanoi-tax-dept allowed");
    assert_eq!(entries[0].purpose, escaped);
    assert_eq!(entries[1].record_type, "civil_status.birth_record\\u{1b}[2J");
    assert!(entries[2].request_id.starts_with("case-7\\n2026"), "{:?}", entries[2]);
    assert_eq!(entries[4].purpose, escaped, "the collect's entry");
    // The refused lookups are in the citizen's history.
    assert!(!entries[0].subject_hash.is_empty() && !entries[4].subject_hash.is_empty());
    fed.shutdown().await.unwrap();
}

/// A lookup the broker could not put to the register (it has no endpoint)
/// gives its token back to the grant's rate limit. A call the register
/// received uses it, whatever the answer (down, a record breaking its
/// schema, no such record): the limit caps the calls one consumer puts to a
/// register, so a query the register chokes on cannot be sent without end.
async fn lookups_never_received_give_their_token_back(database_url: Option<String>) {
    let (_dir, fed, faulty, server) = federation_with_faulty_register(database_url.clone()).await;
    let admin = client(&fed, ADMIN).await;
    admin
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 2))
        .await
        .unwrap();
    let tax = client(&fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 43);
    let look_up = async |subject: &str| tax.exchange().lookup(birth_lookup(subject, TAX_PURPOSE)).await;
    // No endpoint: the register is never asked, and no token is used.
    let endpoints = admin
        .admin()
        .list_endpoints(pb::ListEndpointsRequest {
            provider: CIVIL_STATUS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    for e in &endpoints {
        admin
            .admin()
            .remove_endpoint(pb::RemoveEndpointRequest { id: e.id.clone() })
            .await
            .unwrap();
    }
    // On PostgreSQL a token given back is this replica's to use for a
    // second (see `Leases::give_back`): answers that come at once.
    for _ in 0..3 {
        let err = look_up(&subject).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    for e in &endpoints {
        admin
            .admin()
            .add_endpoint(pb::AddEndpointRequest {
                provider: CIVIL_STATUS.into(),
                url: e.url.clone(),
            })
            .await
            .unwrap();
    }
    faulty.set_mode(FaultMode::Unavailable);
    let err = look_up(&subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "the first of two a minute: {err:?}");
    faulty.set_mode(FaultMode::InvalidRecord);
    let err = look_up(&subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "the second of two a minute: {err:?}");
    faulty.set_mode(FaultMode::Healthy);
    let calls = faulty.calls();
    let err = look_up(&subject).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        faulty.calls(),
        calls,
        "a lookup past the limit never reaches the register"
    );
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_lookups_the_register_never_received_give_their_token_back() {
    lookups_never_received_give_their_token_back(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_lookups_the_register_never_received_give_their_token_back_on_postgresql() {
    let cluster =
        lienthong_store::testing::PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let url = cluster.create_database().await.unwrap();
    lookups_never_received_give_their_token_back(Some(url)).await;
}

/// A lookup asking for a version its record type does not have is refused,
/// and the citizen still sees the attempt: its subject is read with the
/// current version's subject key.
#[tokio::test]
async fn a_lookup_of_an_unknown_schema_version_is_in_the_citizens_history() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 44);
    let mut lookup = birth_lookup(&subject, PURPOSE_CERTIFICATE);
    lookup.schema_version = 99;
    let err = office.exchange().lookup(lookup).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no version 99"), "{}", err.message());
    let history = client(&fed, CITIZEN_PORTAL)
        .await
        .audit()
        .subject_history(pb::SubjectHistoryRequest {
            subject_key: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .accesses;
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(history[0].consumer, JUDICIAL_OFFICE);
    assert_eq!(history[0].outcome, pb::Outcome::Invalid as i32);
    assert_eq!(history[0].provider, CIVIL_STATUS);
    fed.shutdown().await.unwrap();
}
