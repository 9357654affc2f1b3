//! The relay end to end: the demo story, provider faults caused for real,
//! the circuit breaker, and Collect with a register down.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{
    ADMIN, CITIZEN_PORTAL, CIVIL_STATUS, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE,
};
use lienthong_provider::demo::DemoRegisterKind;
use lienthong_provider::testing::{self, FaultMode, Faulty, RawProvider};
use lienthong_tls::{ServerTls, TlsMaterial};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn the_demo_story_goes_as_told() {
    let (_dir, fed) = federation().await;
    let mut out = Vec::new();
    let report = lienthong_cli::demo::story(&fed, &mut out).await.unwrap();
    let transcript = String::from_utf8(out).unwrap();
    let record = report.birth_record.expect("birth record released");
    let fields: Vec<&String> = record.as_object().unwrap().keys().collect();
    assert!(fields.iter().any(|f| *f == "full_name"));
    assert!(
        !fields.iter().any(|f| *f == "native_place" || *f == "registration"),
        "ungranted fields withheld: {fields:?}"
    );
    assert_eq!(report.no_grant_code, Some(Code::PermissionDenied));
    assert_eq!(report.ungranted_field_code, Some(Code::PermissionDenied));
    assert_eq!(report.collect.len(), 3);
    assert!(
        report
            .collect
            .iter()
            .any(|(t, ok)| t == "judicial.criminal_record_extract" && *ok),
        "{:?}",
        report.collect
    );
    assert!(
        report
            .collect
            .iter()
            .any(|(t, ok)| t == "civil_status.birth_record" && *ok)
    );
    assert!(report.receipt_verified, "receipt verifies against the signed tree head");
    // The citizen's history shows the office's accesses and the tax department's refusal.
    assert!(
        report
            .history
            .iter()
            .any(|a| a.consumer == JUDICIAL_OFFICE && a.outcome == pb::Outcome::Allowed as i32)
    );
    assert!(report.history.iter().any(|a| a.outcome == pb::Outcome::Denied as i32));
    // The national id never appears in the transcript's history section.
    assert!(transcript.contains("SubjectHistory"));
    fed.shutdown().await.unwrap();
}

fn civil_tls(fed: &Federation) -> Arc<ServerTls> {
    let m = TlsMaterial::load(&lienthong_cli::client::member_files(&fed.certs, CIVIL_STATUS)).unwrap();
    Arc::new(ServerTls::new(&m, &fed.options.trust_domain).unwrap())
}

async fn failed_entries(fed: &Federation) -> Vec<pb::AuditEntry> {
    office_entries(fed, pb::Outcome::Failed).await
}

async fn office_entries(fed: &Federation, outcome: pb::Outcome) -> Vec<pb::AuditEntry> {
    let filter = pb::EntryFilter {
        actor: JUDICIAL_OFFICE.into(),
        outcome: outcome as i32,
        ..Default::default()
    };
    logged(fed, filter).await
}

async fn criminal_record_still_served(office: &lienthong_cli::client::Clients, subject: &str) {
    office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: "judicial.criminal_record_extract".into(),
            query_json: serde_json::json!({ "national_id": subject }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
        .expect("the other register keeps being served");
}

/// A federation whose civil-status register is a [`Faulty`] one, the
/// judicial office's client, a citizen, and one healthy lookup done through
/// the faulty register: `(dir, federation, office, subject, faulty, server)`.
async fn with_faulty_register(
    extra_config: &str,
    citizen: u32,
) -> (
    tempfile::TempDir,
    Federation,
    lienthong_cli::client::Clients,
    String,
    Faulty,
    testing::ServerHandle,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.extra_config = extra_config.into();
    let fed = Federation::start(opts).await.unwrap();
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, citizen);
    let faulty = Faulty::new(DemoRegisterKind::CivilStatus.source(fed.options.seed));
    let server = testing::start_faulty_server(faulty.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &server.url()).await;
    look_up_birth(&office, &subject).await.expect("healthy first");
    (dir, fed, office, subject, faulty, server)
}

#[tokio::test]
async fn provider_faults_get_their_documented_status_and_are_audited() {
    let (_dir, fed, office, subject, faulty, server) =
        with_faulty_register("\n[relay]\nbreaker_failures = 1000\n", 77).await;

    // Sleeps past the consumer's deadline.
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(3)));
    let mut req = tonic::Request::new(birth_lookup(&subject, PURPOSE_CERTIFICATE));
    req.set_timeout(Duration::from_millis(800));
    let err = office.exchange().lookup(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    criminal_record_still_served(&office, &subject).await;

    // Answers a record violating the schema: never passed on.
    faulty.set_mode(FaultMode::InvalidRecord);
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("violating") && err.message().contains("nothing was passed on"),
        "{}",
        err.message()
    );

    // Answers UNAVAILABLE: retried within the budget, then UNAVAILABLE.
    faulty.set_mode(FaultMode::Unavailable);
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    server.shutdown().await;

    // Malformed JSON.
    let raw_provider = RawProvider::new("{\"full_name\": ");
    let raw = testing::start_raw_server(raw_provider.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &raw.url()).await;
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("malformed JSON"), "{}", err.message());
    // Not UTF-8 (a register that is not built on the kit can send any bytes).
    raw_provider.set_answer(&b"{\"full_name\": \"Tr\xe1n\"}"[..]);
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("not UTF-8"), "{}", err.message());
    // An answer past the 4 MiB limit is refused, not buffered: the register
    // broke the protocol, as a record breaking its schema does.
    raw_provider.set_answer(format!("\"{}\"", "x".repeat(5 * 1024 * 1024)));
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("larger than") && err.message().contains("nothing was passed on"),
        "{}",
        err.message()
    );
    raw.shutdown().await;

    // Drops the connection mid-call.
    let dropping = testing::start_dropping_server(civil_tls(&fed)).await.unwrap();
    replace_civil_endpoint(&fed, &dropping.url()).await;
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        "provider civil-status failed to answer: the connection to the register closed before it answered"
    );
    dropping.shutdown().await;

    // Not running at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    replace_civil_endpoint(&fed, &url).await;
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    criminal_record_still_served(&office, &subject).await;

    let failed = failed_entries(&fed).await;
    assert_eq!(failed.len(), 8, "every failed attempt is audited: {failed:#?}");
    for reason in [
        "provider_timeout",
        "provider_invalid_record",
        "provider_malformed_record",
        "provider_malformed_answer",
        "provider_unavailable",
    ] {
        assert!(failed.iter().any(|e| e.reason.starts_with(reason)), "{reason} audited");
    }
    fed.shutdown().await.unwrap();
}

/// A record type the relay tests register themselves, owned by civil-status.
const ADOPTION: &str = "civil_status.adoption_record";

/// Registers version `record_schema` of `civil_status.adoption_record` as its owner.
async fn register_adoption(fed: &Federation, record_schema: serde_json::Value) {
    client(fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(pb::RecordTypeDefinition {
                name: ADOPTION.into(),
                description: "Adoption record".into(),
                owner: CIVIL_STATUS.into(),
                query_schema_json: serde_json::json!({
                    "type": "object",
                    "properties": {"national_id": {"type": "string"}},
                    "required": ["national_id"]
                })
                .to_string(),
                record_schema_json: record_schema.to_string(),
                subject_key: "national_id".into(),
            }),
            compatibility: 0,
        })
        .await
        .unwrap();
}

/// Grants the judicial office `fields` of [`ADOPTION`] for certificates.
async fn grant_adoption(fed: &Federation, fields: &[&str]) {
    client(fed, ADMIN)
        .await
        .admin()
        .create_grant(pb::CreateGrantRequest {
            consumer: JUDICIAL_OFFICE.into(),
            record_type: ADOPTION.into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            purposes: vec![PURPOSE_CERTIFICATE.into()],
            valid_from: None,
            valid_until: None,
            rate_limit_per_minute: 0,
        })
        .await
        .unwrap();
}

/// Makes a register answering `record` to every fetch the only endpoint of civil-status.
async fn serve_civil_records(fed: &Federation, record: serde_json::Value) -> testing::ServerHandle {
    let raw = testing::start_raw_server(RawProvider::new(record.to_string()), civil_tls(fed))
        .await
        .unwrap();
    replace_civil_endpoint(fed, &raw.url()).await;
    raw
}

#[tokio::test]
async fn keys_the_schema_does_not_declare_never_leave_even_under_a_granted_parent() {
    let (_dir, fed) = federation().await;
    // An open schema: valid records may carry keys it does not declare.
    let record_schema = serde_json::json!({
        "type": "object",
        "properties": {
            "full_name": {"type": "string"},
            "adoptive_parent": {"type": "object", "properties": {"full_name": {"type": "string"}}}
        }
    });
    register_adoption(&fed, record_schema).await;
    grant_adoption(&fed, &["/adoptive_parent", "/full_name"]).await;
    let raw = serve_civil_records(
        &fed,
        serde_json::json!({
            "full_name": "Pham Van D",
            "adoptive_parent": {"full_name": "Pham Thi E", "national_id": "001070000001"},
            "national_id": citizen_id(&fed, 81)
        }),
    )
    .await;
    let r = client(&fed, JUDICIAL_OFFICE)
        .await
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: ADOPTION.into(),
            query_json: serde_json::json!({ "national_id": citizen_id(&fed, 81) }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.record_json).unwrap(),
        serde_json::json!({"full_name": "Pham Van D", "adoptive_parent": {"full_name": "Pham Thi E"}})
    );
    raw.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// `subject`'s access history, as the citizen portal reads it.
async fn history_of(fed: &Federation, subject: &str) -> Vec<pb::SubjectAccess> {
    client(fed, CITIZEN_PORTAL)
        .await
        .audit()
        .subject_history(pb::SubjectHistoryRequest {
            subject_key: subject.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .accesses
}

/// A register answering a schema-valid record about another citizen than
/// the one looked up: nothing leaves, the register is blamed (`DATA_LOSS`),
/// and neither national id is in the answer or the log.
#[tokio::test]
async fn a_record_about_another_citizen_is_not_released() {
    let (_dir, fed) = federation().await;
    let register = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed);
    let (asked, other) = (citizen_id(&fed, 83), citizen_id(&fed, 84));
    let mut record = register.birth_record(83);
    assert_eq!(
        record["national_id"],
        asked.as_str(),
        "the demo record names its citizen"
    );
    let raw = serve_civil_records(&fed, record.clone()).await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    look_up_birth(&office, &asked)
        .await
        .expect("the right citizen's record is released");
    raw.shutdown().await;

    record["national_id"] = other.as_str().into();
    let raw = serve_civil_records(&fed, record).await;
    let mut lookup = birth_lookup(&asked, PURPOSE_CERTIFICATE);
    lookup.request_id = "another-citizen".into();
    let err = office.exchange().lookup(lookup).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("another subject") && err.message().contains("nothing was passed on"),
        "{}",
        err.message()
    );
    // Each item of a Collect is checked alike.
    let collected = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": asked }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: vec![pb::CollectItem {
                record_type: "civil_status.birth_record".into(),
                ..Default::default()
            }],
            request_id: "another-citizen-collected".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::collect_result::Result::Error(item)) = &collected.results[0].result else {
        panic!("the item is refused: {:?}", collected.results[0]);
    };
    assert_eq!(item.code, Code::DataLoss as i32, "{item:?}");
    for text in [err.message(), item.message.as_str()] {
        assert!(!text.contains(&asked) && !text.contains(&other), "{text}");
    }

    let failed = failed_entries(&fed).await;
    for request_id in ["another-citizen", "another-citizen-collected"] {
        let e = failed
            .iter()
            .find(|e| e.request_id == request_id)
            .unwrap_or_else(|| panic!("{request_id} is audited: {failed:#?}"));
        assert!(e.reason.starts_with("provider_subject_mismatch: "), "{}", e.reason);
        assert!(e.fields_released.is_empty() && e.payload_digest.is_empty(), "{e:?}");
        assert!(
            !e.leaf_json.contains(&asked) && !e.leaf_json.contains(&other),
            "{}",
            e.leaf_json
        );
    }
    // The attempts are in the queried citizen's history; the other citizen's
    // history holds nothing, as nothing of theirs was released.
    let failed_for_asked = history_of(&fed, &asked)
        .await
        .iter()
        .filter(|a| a.outcome == pb::Outcome::Failed as i32)
        .count();
    assert_eq!(failed_for_asked, 2);
    assert!(history_of(&fed, &other).await.is_empty());
    raw.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_field_a_later_version_adds_under_a_granted_object_is_not_released() {
    let (_dir, fed) = federation().await;
    let parent = |props: serde_json::Value| {
        serde_json::json!({"type": "object", "properties": {
            "full_name": {"type": "string"},
            "adoptive_parent": {"type": "object", "properties": props, "additionalProperties": false}
        }, "additionalProperties": false})
    };
    register_adoption(&fed, parent(serde_json::json!({"full_name": {"type": "string"}}))).await;
    grant_adoption(&fed, &["/adoptive_parent"]).await;
    // The owner adds the parent's national id: a backward-compatible version.
    register_adoption(
        &fed,
        parent(serde_json::json!({"full_name": {"type": "string"}, "national_id": {"type": "string"}})),
    )
    .await;
    let raw = serve_civil_records(
        &fed,
        serde_json::json!({
            "full_name": "Pham Van D",
            "adoptive_parent": {"full_name": "Pham Thi E", "national_id": "001070000001"}
        }),
    )
    .await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let lookup = |fields: &[&str]| pb::LookupRequest {
        record_type: ADOPTION.into(),
        query_json: serde_json::json!({ "national_id": citizen_id(&fed, 82) }).to_string(),
        purpose: PURPOSE_CERTIFICATE.into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    let r = office.exchange().lookup(lookup(&[])).await.unwrap().into_inner();
    assert_eq!(r.schema_version, 2);
    assert_eq!(r.record_json, r#"{"adoptive_parent":{"full_name":"Pham Thi E"}}"#);
    let err = office
        .exchange()
        .lookup(lookup(&["/adoptive_parent/national_id"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("/adoptive_parent/national_id"),
        "{}",
        err.message()
    );
    raw.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// Starts a lookup, waits until the register is working on it, then hangs
/// up: the consumer's call is dropped mid-flight.
async fn hang_up_once_the_register_has_it(office: &lienthong_cli::client::Clients, faulty: &Faulty, subject: &str) {
    use std::sync::atomic::Ordering;
    let before = faulty.calls.load(Ordering::SeqCst);
    let mut exchange = office.exchange();
    let call = exchange.lookup(birth_lookup(subject, PURPOSE_CERTIFICATE));
    tokio::pin!(call);
    let register_has_it = async {
        while faulty.calls.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        answer = &mut call => panic!("answered before the hang-up: {answer:?}"),
        () = register_has_it => {}
    }
}

#[tokio::test]
async fn a_consumer_hanging_up_mid_call_is_still_audited() {
    let (_dir, fed, office, subject, faulty, server) =
        with_faulty_register("\n[relay]\nprovider_timeout_ms = 1500\n", 79).await;
    let allowed_before = office_entries(&fed, pb::Outcome::Allowed).await.len();

    // The consumer hangs up while the register is working; the register
    // answers afterwards. The record reached the broker, so the access is
    // logged though nobody got it.
    faulty.set_mode(FaultMode::Sleep(Duration::from_millis(700)));
    hang_up_once_the_register_has_it(&office, &faulty, &subject).await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            office_entries(&fed, pb::Outcome::Allowed).await.len() == allowed_before + 1
        })
        .await,
        "the record the register sent after the hang-up is audited"
    );

    // The register never answers: the broker's own deadline ends the call and
    // the timeout is logged, with the consumer long gone.
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(30)));
    hang_up_once_the_register_has_it(&office, &faulty, &subject).await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            failed_entries(&fed)
                .await
                .iter()
                .any(|e| e.reason.starts_with("provider_timeout"))
        })
        .await,
        "the abandoned call's timeout is audited"
    );
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_circuit_breaker_opens_and_closes_again() {
    let (_dir, fed, office, subject, faulty, server) = with_faulty_register(
        "\n[relay]\nbreaker_failures = 3\nbreaker_open_ms = 400\nmax_retries = 0\n",
        78,
    )
    .await;

    faulty.set_mode(FaultMode::Unavailable);
    for _ in 0..3 {
        let err = look_up_birth(&office, &subject).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    let calls = faulty.calls();
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("circuit open"), "{}", err.message());
    assert_eq!(faulty.calls(), calls, "an open circuit does not call the provider");

    faulty.set_mode(FaultMode::Healthy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    look_up_birth(&office, &subject)
        .await
        .expect("probe succeeds, circuit closes");
    look_up_birth(&office, &subject).await.expect("closed circuit");
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn consumers_with_short_deadlines_do_not_open_the_circuit_for_everyone() {
    let (_dir, fed, office, subject, faulty, server) = with_faulty_register(
        "\n[relay]\nbreaker_failures = 3\nbreaker_open_ms = 60000\nmax_retries = 0\nprovider_timeout_ms = 3000\n",
        80,
    )
    .await;
    // Slower than these consumers will wait, well within the provider timeout.
    faulty.set_mode(FaultMode::Sleep(Duration::from_millis(400)));
    for _ in 0..5 {
        let mut req = tonic::Request::new(birth_lookup(&subject, PURPOSE_CERTIFICATE));
        req.set_timeout(Duration::from_millis(100));
        let err = office.exchange().lookup(req).await.unwrap_err();
        // The broker answers 10 ms before the deadline; on a busy machine the
        // client's own timer may fire first.
        assert!(
            matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{err:?}"
        );
    }
    // Patient consumers are still served.
    look_up_birth(&office, &subject)
        .await
        .expect("the circuit stays closed: the register did nothing wrong");
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// A register that says GOAWAY on its connection while a call on it is
/// still under way (a gRPC server past its maximum connection age, or
/// draining for a restart) is called on a new connection: the lookups after
/// the GOAWAY are answered, not refused until the call under way ends.
#[tokio::test]
async fn a_register_saying_goaway_mid_call_is_called_on_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    // Without a breaker to open or retries to spend, each refused call shows.
    opts.extra_config = "\n[relay]\nmax_retries = 0\nbreaker_failures = 1000\n".into();
    let fed = Federation::start(opts).await.unwrap();
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 85);
    let register = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed);
    let raw = RawProvider::new(register.birth_record(85).to_string());
    let going = testing::start_going_away_server(raw.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &going.url()).await;

    let held = {
        let (office, subject) = (office.clone(), subject.clone());
        tokio::spawn(async move {
            let mut req = tonic::Request::new(birth_lookup(&subject, PURPOSE_CERTIFICATE));
            // Ends the held call, and with it the old connection, after the test.
            req.set_timeout(Duration::from_secs(4));
            office.exchange().lookup(req).await
        })
    };
    assert!(
        eventually(Duration::from_secs(30), async || going.requests() == 1).await,
        "the broker read the register's GOAWAY"
    );
    for _ in 0..3 {
        look_up_birth(&office, &subject)
            .await
            .expect("answered on a new connection while the old one drains");
    }
    assert_eq!(raw.calls(), 3);
    let err = held.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    going.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// A register restarted on its address (a redeployment) is called again
/// without restarting the broker, which dials it anew; while it is down,
/// lookups get UNAVAILABLE and are audited.
#[tokio::test]
async fn a_register_back_on_its_address_is_called_again() {
    let (_dir, mut fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 31);
    for _ in 0..4 {
        look_up_birth(&office, &subject)
            .await
            .expect("served before the restart");
    }
    let addr = fed.registers[0].addr;
    fed.registers[0].stop().await; // civil status
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    fed.registers[0] = lienthong_cli::federation::Register::start_at(
        DemoRegisterKind::CivilStatus,
        &fed.certs,
        fed.options.seed,
        &fed.options.trust_domain,
        addr,
    )
    .await
    .unwrap();
    for i in 0..8 {
        let found = look_up_birth(&office, &subject)
            .await
            .unwrap_or_else(|e| panic!("lookup {i} after the restart: {e:?}"))
            .into_inner();
        assert!(!found.record_json.is_empty());
    }
    let failed = failed_entries(&fed).await;
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].reason.starts_with("provider_unavailable"),
        "{:?}",
        failed[0].reason
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn collect_with_one_register_down_returns_the_others() {
    let (_dir, mut fed) = federation().await;
    fed.registers[1].stop().await; // judicial records
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 99);
    let r = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: serde_json::json!({ "national_id": subject }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: ["civil_status.birth_record", "judicial.criminal_record_extract"]
                .iter()
                .map(|t| pb::CollectItem {
                    record_type: t.to_string(),
                    ..Default::default()
                })
                .collect(),
            request_id: "collect-test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 2);
    assert!(
        matches!(r.results[0].result, Some(pb::collect_result::Result::Record(_))),
        "{:?}",
        r.results[0]
    );
    match &r.results[1].result {
        Some(pb::collect_result::Result::Error(e)) => assert_eq!(e.code, Code::Unavailable as i32, "{e:?}"),
        other => panic!("expected an error item, got {other:?}"),
    }
    assert!(r.results.iter().all(|x| x.receipt.is_some()), "both items are audited");
    fed.shutdown().await.unwrap();
}

/// With `limits.max_concurrent_exchanges = 1`, a second lookup waits for the
/// first one's turn to end instead of being refused, while health checks and
/// admin calls on the same broker are answered at once.
#[tokio::test]
async fn exchanges_beyond_the_limit_wait_their_turn_and_health_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.extra_config = "\n[limits]\nmax_concurrent_exchanges = 1\n".into();
    opts.metrics_listen = Some("127.0.0.1:0".into());
    let fed = Federation::start(opts).await.unwrap();
    let metrics = fed.broker.metrics_addr.unwrap();
    let waiting = async || sample(&http_get(metrics, "/metrics").await.1, "lienthong_exchanges_waiting");
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 12);
    let faulty = Faulty::new(DemoRegisterKind::CivilStatus.source(fed.options.seed));
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(3)));
    let server = testing::start_faulty_server(faulty.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &server.url()).await;

    let slow = {
        let office = office.clone();
        let subject = subject.clone();
        tokio::spawn(async move { look_up_birth(&office, &subject).await })
    };
    assert!(
        eventually(Duration::from_secs(10), async || faulty.calls() == 1).await,
        "the first lookup reached the register"
    );

    // The only turn is taken: health and admin still answer right away.
    let mut health = tonic_health::pb::health_client::HealthClient::new(office.channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lienthong.v1.Exchange".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    client(&fed, ADMIN)
        .await
        .admin()
        .list_members(pb::ListMembersRequest::default())
        .await
        .unwrap();
    assert!(!slow.is_finished(), "health and admin answered during the slow lookup");

    // A lookup of the other register waits for the turn (operators see it
    // waiting), then succeeds.
    let waiter = {
        let office = office.clone();
        let subject = subject.clone();
        tokio::spawn(async move { criminal_record_still_served(&office, &subject).await })
    };
    assert!(
        eventually(Duration::from_secs(10), async || waiting().await == 1.0).await,
        "the second lookup is counted as waiting"
    );
    waiter.await.unwrap();
    assert_eq!(waiting().await, 0.0);
    assert!(
        slow.is_finished(),
        "the waiting lookup ran only after the first one ended"
    );
    slow.await.unwrap().expect("the slow lookup succeeds");
    server.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_a_call_whose_consumer_left_and_signs_over_its_entry() {
    use lienthong_core::audit::{EntryKind, Outcome};
    let (_dir, fed, office, subject, faulty, server) = with_faulty_register("", 80).await;
    faulty.set_mode(FaultMode::Sleep(Duration::from_millis(700)));
    hang_up_once_the_register_has_it(&office, &faulty, &subject).await;
    // Shut down at once: the consumer has gone, its call has not ended yet.
    let database = fed.dir.join("broker-data").join("lienthong.db");
    fed.shutdown().await.unwrap();
    server.shutdown().await;

    let store = lienthong_store::open(&lienthong_store::StoreOptions {
        url: format!("sqlite://{}", database.display()),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    })
    .await
    .unwrap();
    let logs = store.list_logs().await.unwrap();
    assert_eq!(logs.len(), 1);
    let log_id = &logs[0].log_id;
    let accesses = store
        .query_entries(&lienthong_store::EntryQuery {
            log_id: log_id.clone(),
            actor: Some(JUDICIAL_OFFICE.into()),
            kind: Some(EntryKind::Access),
            outcome: Some(Outcome::Allowed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        accesses.len(),
        2,
        "the first lookup and the one whose consumer left are logged"
    );
    let head = store
        .latest_tree_head(log_id)
        .await
        .unwrap()
        .expect("a final tree head");
    assert_eq!(
        head.tree_size,
        store.log_size(log_id).await.unwrap(),
        "the final tree head covers every entry"
    );
}

/// A lookup whose register is still working when the broker's shutdown
/// grace period is nearly over is given up, audited as failed and answered
/// UNAVAILABLE before the broker stops, rather than dropped with its
/// connection, unaudited, though the register was asked.
#[tokio::test]
async fn a_lookup_outlasting_the_shutdown_grace_period_is_audited_and_answered() {
    use lienthong_core::audit::{EntryKind, Outcome};
    let (_dir, fed, office, subject, faulty, server) = with_faulty_register(
        "\n[limits]\nshutdown_grace_ms = 1500\n[relay]\nprovider_timeout_ms = 600000\n",
        86,
    )
    .await;
    // Past the grace period; short enough for the test to fail, not hang,
    // should the broker drop the call.
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(20)));
    let asked = faulty.calls();
    let lookup = {
        let (office, subject) = (office.clone(), subject.clone());
        tokio::spawn(async move { look_up_birth(&office, &subject).await })
    };
    assert!(
        eventually(Duration::from_secs(30), async || faulty.calls() > asked).await,
        "the register has the call"
    );
    let database = fed.dir.join("broker-data").join("lienthong.db");
    fed.shutdown().await.unwrap();
    let err = lookup.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("the broker is stopping") && err.message().contains("nothing was released"),
        "{}",
        err.message()
    );
    drop(server);

    let store = lienthong_store::open(&lienthong_store::StoreOptions {
        url: format!("sqlite://{}", database.display()),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    })
    .await
    .unwrap();
    let log_id = store.list_logs().await.unwrap()[0].log_id.clone();
    let failed = store
        .query_entries(&lienthong_store::EntryQuery {
            log_id: log_id.clone(),
            actor: Some(JUDICIAL_OFFICE.into()),
            kind: Some(EntryKind::Access),
            outcome: Some(Outcome::Failed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1, "the given-up lookup is audited");
    let head = store
        .latest_tree_head(&log_id)
        .await
        .unwrap()
        .expect("a final tree head");
    assert_eq!(head.tree_size, store.log_size(&log_id).await.unwrap());
}

/// A record type registered before its register serves it: the consumer is
/// told so (FAILED_PRECONDITION), not that the citizen has no record, and
/// the register's circuit stays closed for the record types it does serve.
#[tokio::test]
async fn a_record_type_the_register_does_not_serve_is_not_a_missing_record() {
    let (_dir, fed) = federation().await;
    // The demo civil-status register does not serve adoption records.
    register_adoption(
        &fed,
        serde_json::json!({"type": "object", "properties": {"full_name": {"type": "string"}}}),
    )
    .await;
    grant_adoption(&fed, &["*"]).await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 4);
    for _ in 0..10 {
        let err = office
            .exchange()
            .lookup(pb::LookupRequest {
                record_type: ADOPTION.into(),
                ..birth_lookup(&subject, PURPOSE_CERTIFICATE)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("does not serve civil_status.adoption_record"),
            "{err:?}"
        );
    }
    // Ten in a row would have opened the circuit (five failures) had they
    // counted against the register.
    look_up_birth(&office, &subject).await.unwrap();
    let failed = logged(
        &fed,
        pb::EntryFilter {
            record_type: ADOPTION.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 10);
    assert!(
        failed.iter().all(|e| e.reason.starts_with("provider_not_serving")),
        "{failed:?}"
    );
    fed.shutdown().await.unwrap();
}

/// Retries are paid from one budget for every register. A register with a
/// single endpoint that is down has no other endpoint to retry on: its
/// failures must not drain the budget that another register's failover
/// relies on.
#[tokio::test]
async fn a_down_register_with_one_endpoint_leaves_the_retry_budget_to_the_others() {
    let (_dir, fed, office, subject, faulty, _server) =
        with_faulty_register("\n[relay]\nbreaker_failures = 100000\n", 78).await;
    faulty.set_mode(FaultMode::Unavailable);
    for _ in 0..100 {
        let err = look_up_birth(&office, &subject).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    // The judicial register gets a second endpoint that refuses every
    // connection: half of its lookups try it first and need a retry.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("https://{}", dead.local_addr().unwrap());
    drop(dead);
    client(&fed, ADMIN)
        .await
        .admin()
        .add_endpoint(pb::AddEndpointRequest {
            provider: lienthong_cli::federation::JUDICIAL_RECORDS.into(),
            url: dead_url,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..12 {
        criminal_record_still_served(&office, &subject).await;
    }
    fed.shutdown().await.unwrap();
}

/// A register whose certificate expires while the broker holds a connection
/// to it: the broker stops using that connection at the expiry, and the new
/// one it dials checks the certificate then (no resumed session skips the
/// check), so the register is not called again until it has a valid one.
#[tokio::test]
async fn a_register_certificate_that_expires_is_not_relied_on_past_its_expiry() {
    let (_dir, fed) = federation().await;
    let mut spec = lienthong_tls::IssueSpec::member(CIVIL_STATUS);
    // Long enough for the first lookup on a slow machine.
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let issued = ca(&fed).issue(&spec).unwrap();
    let ca_pem = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    let material = TlsMaterial::from_pem(&ca_pem, &issued.cert_pem, &issued.key_pem).unwrap();
    let tls = Arc::new(ServerTls::new(&material, &fed.options.trust_domain).unwrap());
    let register = testing::start_server(DemoRegisterKind::CivilStatus.source(fed.options.seed), tls)
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &register.url()).await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 9);
    look_up_birth(&office, &subject)
        .await
        .expect("served while the certificate is valid");
    let served = register.requests();
    // X.509 counts a certificate valid through the second its expiry names.
    let not_after = lienthong_tls::summarize_pem(&issued.cert_pem, &fed.options.trust_domain)
        .unwrap()
        .not_after;
    let past = not_after + time::Duration::milliseconds(1_300) - time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::try_from(past).unwrap_or_default()).await;
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().to_lowercase().contains("expired"), "{err:?}");
    assert_eq!(
        register.requests(),
        served,
        "no lookup reached the register past its expiry"
    );
    fed.shutdown().await.unwrap();
}

/// A lookup's deadline counts from its arrival, its wait for a turn
/// included (as its client's does): one that waited for a slot gets the
/// rest of its time from the register, not its whole `grpc-timeout` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_waited_for_a_turn_counts_against_the_deadline() {
    let (_dir, fed, office, subject, faulty, _server) = with_faulty_register(
        "\n[limits]\nmax_concurrent_exchanges = 1\n[relay]\nbreaker_failures = 1000\n",
        79,
    )
    .await;
    faulty.set_mode(FaultMode::Sleep(Duration::from_millis(1_000)));
    let first = {
        let office = office.clone();
        let subject = subject.clone();
        tokio::spawn(async move { look_up_birth(&office, &subject).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut queued = tonic::Request::new(pb::LookupRequest {
        request_id: "waited-for-a-turn".into(),
        ..birth_lookup(&subject, PURPOSE_CERTIFICATE)
    });
    queued.set_timeout(Duration::from_millis(1_500));
    let err = office.exchange().lookup(queued).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    first.await.unwrap().expect("the first lookup is served");
    // The queued lookup had ~0.6 s left when its turn came: the register's
    // second of work did not fit, so nothing was released for it.
    let entry = eventually(Duration::from_secs(5), async || {
        logged(&fed, pb::EntryFilter::default())
            .await
            .iter()
            .any(|e| e.request_id == "waited-for-a-turn")
    })
    .await;
    assert!(entry, "the queued lookup is audited");
    let entry = logged(&fed, pb::EntryFilter::default())
        .await
        .into_iter()
        .find(|e| e.request_id == "waited-for-a-turn")
        .unwrap();
    assert_eq!(entry.outcome(), pb::Outcome::Failed, "{entry:?}");
    assert!(entry.reason.starts_with("provider_timeout"), "{entry:?}");
    fed.shutdown().await.unwrap();
}

/// A register call counts as `ok` only when its answer is a record the
/// broker can use: one that breaks its schema, or is about another
/// citizen, counts as `malformed`.
#[tokio::test]
async fn register_calls_answering_unusable_records_are_not_counted_ok() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FederationOptions::new(dir.path());
    opts.metrics_listen = Some("127.0.0.1:0".into());
    let fed = Federation::start(opts).await.unwrap();
    let addr = fed.broker.metrics_addr.expect("metrics listener configured");
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 85);
    let faulty = Faulty::new(DemoRegisterKind::CivilStatus.source(fed.options.seed));
    let server = testing::start_faulty_server(faulty.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &server.url()).await;
    let calls = |scrape: &str, outcome: &str| {
        sample(
            scrape,
            &format!(r#"lienthong_provider_calls_total{{provider="civil-status",outcome="{outcome}"}}"#),
        )
    };

    let (_, before) = http_get(addr, "/metrics").await;
    look_up_birth(&office, &subject).await.unwrap();
    faulty.set_mode(FaultMode::InvalidRecord);
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    server.shutdown().await;
    let mut record = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed).birth_record(85);
    record["national_id"] = citizen_id(&fed, 86).into();
    let raw = serve_civil_records(&fed, record).await;
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let (_, after) = http_get(addr, "/metrics").await;

    assert_eq!(calls(&after, "ok") - calls(&before, "ok"), 1.0, "{after}");
    assert_eq!(calls(&after, "malformed") - calls(&before, "malformed"), 2.0, "{after}");
    raw.shutdown().await;
    fed.shutdown().await.unwrap();
}

/// A record or query in which an object names a key twice reads one way to
/// the broker and maybe another to the next reader: refused, whatever value
/// would have been kept, and audited without the values.
#[tokio::test]
async fn a_record_or_query_naming_a_key_twice_is_refused_and_audited() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let index = 31;
    let subject = citizen_id(&fed, index);
    let record = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed).birth_record(index);
    let text = record.to_string();
    let raw_provider = RawProvider::new(text.clone());
    let raw = testing::start_raw_server(raw_provider.clone(), civil_tls(&fed))
        .await
        .unwrap();
    replace_civil_endpoint(&fed, &raw.url()).await;
    look_up_birth(&office, &subject)
        .await
        .expect("the record as the register keeps it is released");

    // The second value of each repeated key is the valid one, as serde_json
    // would keep it: at the top, in a nested object, and the subject itself.
    let ambiguous = [
        text.replacen('{', "{\"full_name\":\"Decoy Name\",", 1),
        text.replacen("\"mother\":{", "\"mother\":{\"birth_year\":1851,", 1),
        text.replacen('{', "{\"national_id\":\"000000000001\",", 1),
    ];
    for answer in ambiguous {
        assert_ne!(answer, text, "the test repeats a key");
        raw_provider.set_answer(answer);
        let err = look_up_birth(&office, &subject).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{err:?}");
        let m = err.message();
        assert!(
            m.contains("ambiguous") && m.contains("twice") && m.contains("nothing was passed on"),
            "{m}"
        );
        assert!(
            !m.contains("Decoy") && !m.contains("1851") && !m.contains("000000000001") && !m.contains(&subject),
            "{m}"
        );
    }
    let failed = failed_entries(&fed).await;
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for e in &failed {
        assert!(
            e.reason.starts_with("provider_invalid_record")
                && e.reason.contains("twice")
                && !e.reason.contains("Decoy"),
            "{}",
            e.reason
        );
    }

    // A consumer's query too, at any depth, before the register is asked.
    let calls = raw_provider.calls();
    for query in [
        format!(r#"{{"national_id":"000000000001","national_id":"{subject}"}}"#),
        format!(r#"{{"national_id":"{subject}","birth_date":"2001-01-01","birth_date":"2001-01-02"}}"#),
    ] {
        let err = office
            .exchange()
            .lookup(pb::LookupRequest {
                query_json: query,
                ..birth_lookup(&subject, PURPOSE_CERTIFICATE)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("query_json is ambiguous") && !err.message().contains(&subject),
            "{}",
            err.message()
        );
    }
    assert_eq!(raw_provider.calls(), calls, "the register was not asked");
    let invalid = office_entries(&fed, pb::Outcome::Invalid).await;
    assert_eq!(
        invalid
            .iter()
            .filter(|e| e.reason.starts_with("invalid_query") && e.reason.contains("twice"))
            .count(),
        2,
        "{invalid:#?}"
    );
    raw.shutdown().await;
    fed.shutdown().await.unwrap();
}
