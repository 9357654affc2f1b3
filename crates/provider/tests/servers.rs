//! The kit and the faulty providers over real mutual TLS on ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lienthong::provider::v1::record_provider_client::RecordProviderClient;
use lienthong::provider::v1::{FetchRequest, FetchResponse};
use lienthong_provider::demo::{
    BIRTH_RECORD, CRIMINAL_RECORD_EXTRACT, CivilStatusRegister, DEMO_CITIZENS, DemoRegisterKind, JudicialRegister,
    citizen_national_id, demo_schemas, run_demo_register,
};
use lienthong_provider::testing::{
    FaultMode, Faulty, RawProvider, start_dropping_server, start_faulty_server, start_raw_server, start_server,
};
use lienthong_provider::{ProviderConfig, ProviderError, RefusedCertificates, serve};
use lienthong_tls::{
    CertificateAuthority, Identity, IssueSpec, ServerTls, TlsMaterial, client_config, connect_channel,
};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TD: &str = "gov.test";
const SEED: u64 = 7;
const PROVIDER: &str = "civil-status";

struct Federation {
    ca: CertificateAuthority,
}

impl Federation {
    fn new() -> Self {
        Federation {
            ca: CertificateAuthority::generate(TD).unwrap(),
        }
    }

    fn material(&self, spec: &IssueSpec) -> TlsMaterial {
        let issued = self.ca.issue(spec).unwrap();
        TlsMaterial::from_pem(&self.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn provider_tls(&self) -> Arc<ServerTls> {
        Arc::new(ServerTls::new(&self.material(&IssueSpec::member(PROVIDER)), TD).unwrap())
    }

    /// A client pinned to the provider's identity, presenting `material`.
    async fn channel(&self, material: &TlsMaterial, url: &str) -> Channel {
        let config = client_config(material, Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap();
        connect_channel(url, config, Duration::from_secs(5)).await.unwrap()
    }

    async fn client(&self, spec: &IssueSpec, url: &str) -> RecordProviderClient<Channel> {
        RecordProviderClient::new(self.channel(&self.material(spec), url).await)
    }

    /// A broker certificate of its own (as after a rotation), and its fingerprint.
    fn broker_material(&self) -> (TlsMaterial, [u8; 32]) {
        let material = self.material(&IssueSpec::broker());
        let fingerprint = lienthong_tls::sha256_fingerprint(&material.chain[0]);
        (material, fingerprint)
    }

    async fn broker(&self, url: &str) -> RecordProviderClient<Channel> {
        self.client(&IssueSpec::broker(), url).await
    }
}

fn fetch_request(record_type: &str, query_json: &str) -> FetchRequest {
    FetchRequest {
        record_type: record_type.to_owned(),
        schema_version: 1,
        query_json: query_json.to_owned(),
        request_id: "req-42".to_owned(),
        consumer: "tax-office".to_owned(),
        purpose: "tax assessment".to_owned(),
        fields: vec!["/full_name".to_owned()],
    }
}

fn birth_query(index: u32) -> String {
    json!({ "national_id": citizen_national_id(SEED, index) }).to_string()
}

async fn fetch(
    client: &mut RecordProviderClient<Channel>,
    record_type: &str,
    query_json: &str,
) -> Result<FetchResponse, Status> {
    client
        .fetch(fetch_request(record_type, query_json))
        .await
        .map(|r| r.into_inner())
}

fn civil() -> Arc<CivilStatusRegister> {
    Arc::new(CivilStatusRegister::new(SEED))
}

#[tokio::test]
async fn broker_gets_records_and_the_health_service_answers() {
    let fed = Federation::new();
    let server = start_server(civil(), fed.provider_tls()).await.unwrap();
    let mut broker = fed.broker(&server.url()).await;

    let answer = fetch(&mut broker, BIRTH_RECORD, &birth_query(42)).await.unwrap();
    let record: Value = serde_json::from_str(&answer.record_json).unwrap();
    assert_eq!(record, CivilStatusRegister::new(SEED).birth_record(42));
    assert_eq!(record["national_id"], citizen_national_id(SEED, 42).as_str());
    assert_eq!(server.requests(), 1);

    let channel = fed.channel(&fed.material(&IssueSpec::broker()), &server.url()).await;
    let mut health = HealthClient::new(channel);
    for service in ["", "lienthong.provider.v1.RecordProvider"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    // Shutting down completes although the broker's connection is still open.
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("server stops promptly");
}

/// A load balancer watching the register's health: an unknown service is
/// SERVICE_UNKNOWN on a stream that stays open, and a shutdown says
/// NOT_SERVING to every watcher and ends its stream instead of waiting for it.
#[tokio::test]
async fn health_watches_follow_the_standard_and_end_at_shutdown() {
    let fed = Federation::new();
    let server = start_server(civil(), fed.provider_tls()).await.unwrap();
    let channel = fed.channel(&fed.material(&IssueSpec::broker()), &server.url()).await;
    let mut health = HealthClient::new(channel);
    let mut watch = async |service: &str| {
        health
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let mut provider = watch("lienthong.provider.v1.RecordProvider").await;
    let mut unknown = watch("lienthong.provider.v1.Nothing").await;
    let status = async |stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>| {
        tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the watch answers")
            .unwrap()
            .expect("a message")
            .status()
    };
    assert_eq!(status(&mut provider).await, ServingStatus::Serving);
    assert_eq!(status(&mut unknown).await, ServingStatus::ServiceUnknown);
    let quiet = tokio::time::timeout(Duration::from_millis(200), unknown.message()).await;
    assert!(quiet.is_err(), "the watch of an unknown service stays open: {quiet:?}");

    // Without the end of the watches the kit, which has no grace period,
    // would wait for them for ever.
    let stopped = tokio::spawn(tokio::time::timeout(Duration::from_secs(10), server.shutdown()));
    assert_eq!(status(&mut provider).await, ServingStatus::NotServing);
    for stream in [&mut provider, &mut unknown] {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the watch ends")
            .unwrap_err();
        assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
        assert_eq!(ended.message(), "server is shutting down");
    }
    stopped.await.unwrap().expect("the register stops although watched");
}

#[tokio::test]
async fn a_fetch_that_never_ends_holds_the_shutdown_no_longer_than_the_grace_period() {
    let fed = Federation::new();
    let faulty = Faulty::new(civil());
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(600)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let mut config = ProviderConfig::new(TD);
    config.shutdown_grace = Duration::from_millis(300);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let register = tokio::spawn(serve(
        Arc::new(faulty.clone()),
        fed.provider_tls(),
        config,
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut broker = fed.broker(&url).await;
    let hanging = tokio::spawn(async move { fetch(&mut broker, BIRTH_RECORD, &birth_query(5)).await });
    wait_until(|| faulty.calls() == 1).await;

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), register)
        .await
        .expect("the register stops once its grace period is over")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    // The fetch was abandoned, not answered: `serve` returned without it.
    assert!(!hanging.is_finished());
    hanging.abort();
}

#[tokio::test]
async fn only_the_broker_may_call() {
    let fed = Federation::new();
    let server = start_server(civil(), fed.provider_tls()).await.unwrap();

    let mut member = fed.client(&IssueSpec::member("tax-office"), &server.url()).await;
    let status = fetch(&mut member, BIRTH_RECORD, &birth_query(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "only the broker may call this register");

    // A certificate from another CA, even naming the broker, is not the broker.
    let rogue_ca = CertificateAuthority::generate(TD).unwrap();
    let rogue = rogue_ca.issue(&IssueSpec::broker()).unwrap();
    let rogue = TlsMaterial::from_pem(&fed.ca.cert_pem(), &rogue.cert_pem, &rogue.key_pem).unwrap();
    let mut rogue = RecordProviderClient::new(fed.channel(&rogue, &server.url()).await);
    let status = fetch(&mut rogue, BIRTH_RECORD, &birth_query(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Neither refused call reached the register.
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn bad_queries_unknown_types_and_unknown_citizens_are_refused_precisely() {
    let fed = Federation::new();
    let server = start_server(civil(), fed.provider_tls()).await.unwrap();
    let mut broker = fed.broker(&server.url()).await;

    let id = citizen_national_id(SEED, 3);
    let malformed = format!("{{\"national_id\": \"{id}\"");
    let status = fetch(&mut broker, BIRTH_RECORD, &malformed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(!status.message().contains(&id), "{}", status.message());

    // Not "no such record": the consumer must not be told the citizen has none.
    let status = fetch(&mut broker, "land.parcel", &birth_query(3)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(status.message(), "record type land.parcel is not served here");

    let unknown = json!({ "national_id": format!("{}{}", &id[..6], DEMO_CITIZENS + 7) });
    let status = fetch(&mut broker, BIRTH_RECORD, &unknown.to_string())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let wrong_date = json!({ "national_id": id, "birth_date": "1901-01-01" });
    let status = fetch(&mut broker, BIRTH_RECORD, &wrong_date.to_string())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let no_id = json!({ "birth_date": "1901-01-01" });
    let status = fetch(&mut broker, BIRTH_RECORD, &no_id.to_string()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn faulty_provider_switches_modes_at_runtime() {
    let fed = Federation::new();
    let faulty = Faulty::new(civil());
    let server = start_faulty_server(faulty.clone(), fed.provider_tls()).await.unwrap();
    let mut broker = fed.broker(&server.url()).await;
    let query = birth_query(5);

    let healthy = fetch(&mut broker, BIRTH_RECORD, &query).await.unwrap();
    let healthy: Value = serde_json::from_str(&healthy.record_json).unwrap();
    let (_, definition) = demo_schemas()
        .into_iter()
        .find(|(name, _)| *name == BIRTH_RECORD)
        .unwrap();
    let definition: Value = serde_json::from_str(definition).unwrap();
    let validator = jsonschema::validator_for(&definition["record_schema"]).unwrap();
    assert!(validator.is_valid(&healthy));

    faulty.set_mode(FaultMode::Unavailable);
    let status = fetch(&mut broker, BIRTH_RECORD, &query).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    faulty.set_mode(FaultMode::InvalidRecord);
    let invalid = fetch(&mut broker, BIRTH_RECORD, &query).await.unwrap();
    let invalid: Value = serde_json::from_str(&invalid.record_json).unwrap();
    assert!(!validator.is_valid(&invalid));
    assert!(invalid.get("national_id").is_none(), "{invalid}");
    assert!(invalid["full_name"].is_number(), "{invalid}");

    let delay = Duration::from_millis(400);
    faulty.set_mode(FaultMode::Sleep(delay));
    // With a deadline shorter than the delay, no answer comes in time.
    let started = Instant::now();
    let mut request = Request::new(fetch_request(BIRTH_RECORD, &query));
    request.set_timeout(Duration::from_millis(100));
    let status = broker.fetch(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(started.elapsed() < delay, "answered after {:?}", started.elapsed());
    // Without a deadline, the answer is late but correct.
    let started = Instant::now();
    let late = fetch(&mut broker, BIRTH_RECORD, &query).await.unwrap();
    assert!(started.elapsed() >= delay);
    assert_eq!(serde_json::from_str::<Value>(&late.record_json).unwrap(), healthy);

    faulty.set_mode(FaultMode::Healthy);
    let again = fetch(&mut broker, BIRTH_RECORD, &query).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&again.record_json).unwrap(), healthy);
    assert_eq!(faulty.mode(), FaultMode::Healthy);
    assert_eq!(faulty.calls(), 6);
    assert_eq!(server.requests(), 6);
}

#[tokio::test]
async fn raw_provider_answers_any_text() {
    let fed = Federation::new();
    let raw = RawProvider::new("{\"full_name\": ");
    let server = start_raw_server(raw.clone(), fed.provider_tls()).await.unwrap();
    let mut broker = fed.broker(&server.url()).await;

    let answer = fetch(&mut broker, BIRTH_RECORD, &birth_query(1)).await.unwrap();
    assert_eq!(answer.record_json, "{\"full_name\": ");
    assert!(serde_json::from_str::<Value>(&answer.record_json).is_err());

    raw.set_answer("[1, 2, 3]");
    let answer = fetch(&mut broker, BIRTH_RECORD, &birth_query(1)).await.unwrap();
    assert_eq!(answer.record_json, "[1, 2, 3]");
    assert_eq!(raw.calls(), 2);
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn dropping_server_reads_the_request_then_hangs_up() {
    let fed = Federation::new();
    let server = start_dropping_server(fed.provider_tls()).await.unwrap();
    let mut broker = fed.broker(&server.url()).await;

    let started = Instant::now();
    let mut request = Request::new(fetch_request(BIRTH_RECORD, &birth_query(1)));
    request.set_timeout(Duration::from_secs(5));
    let status = broker.fetch(request).await.unwrap_err();
    // Hung up, not timed out.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal),
        "{status:?}"
    );
    assert_eq!(server.requests(), 1, "the whole request was read first");
}

/// A demo register served on an ephemeral port: its URL, a sender that stops
/// it, and its task.
async fn start_demo_register(
    fed: &Federation,
    kind: DemoRegisterKind,
    config: ProviderConfig,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), ProviderError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let register = tokio::spawn(run_demo_register(
        kind,
        SEED,
        fed.provider_tls(),
        config,
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    (url, stop, register)
}

#[tokio::test]
async fn demo_register_serves_until_shut_down() {
    let fed = Federation::new();
    let (url, stop, register) =
        start_demo_register(&fed, DemoRegisterKind::JudicialRecords, ProviderConfig::new(TD)).await;
    let mut broker = fed.broker(&url).await;
    let answer = fetch(&mut broker, CRIMINAL_RECORD_EXTRACT, &birth_query(77))
        .await
        .unwrap();
    let extract: Value = serde_json::from_str(&answer.record_json).unwrap();
    assert_eq!(extract, JudicialRegister::new(SEED).criminal_record_extract(77));
    let status = fetch(&mut broker, BIRTH_RECORD, &birth_query(77)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "civil status is another register");

    drop(broker);
    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), register)
        .await
        .expect("register stops promptly")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn serving_for_another_trust_domain_is_refused() {
    let fed = Federation::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = serve(
        civil(),
        fed.provider_tls(),
        ProviderConfig::new("other.test"),
        listener,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(result, Err(ProviderError::TrustDomainMismatch { .. })),
        "{result:?}"
    );
}

/// After a broker key leaked, a register refuses the old broker certificate
/// (listed by fingerprint, as an operator writes the file) and serves the
/// broker's new one, without a new CA.
#[tokio::test]
async fn a_refused_broker_certificate_is_refused_and_the_new_one_served() {
    let fed = Federation::new();
    let (leaked_material, fingerprint) = fed.broker_material();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("refused.txt");
    std::fs::write(
        &list,
        format!(
            "# broker key leaked on 2026-11-27\n\nsha256 Fingerprint={}  # old broker.pem\n",
            openssl_form(&fingerprint)
        ),
    )
    .unwrap();
    let mut config = ProviderConfig::new(TD);
    config.refused_certificates = RefusedCertificates::watch_file(&list, Duration::from_secs(3600)).unwrap();
    assert_eq!(config.refused_certificates.len(), 1);

    let (url, stop, register) = start_demo_register(&fed, DemoRegisterKind::CivilStatus, config).await;
    let mut old = RecordProviderClient::new(fed.channel(&leaked_material, &url).await);
    let err = fetch(&mut old, BIRTH_RECORD, &birth_query(3)).await.unwrap_err();
    assert_refused(&err, &fingerprint);
    let mut new = fed.broker(&url).await;
    fetch(&mut new, BIRTH_RECORD, &birth_query(3)).await.unwrap();
    let _ = stop.send(());
    register.await.unwrap().unwrap();

    // A bad line is named, and nothing is served from a list half read:
    // neither by the register starting on it nor by one reading it.
    std::fs::write(&list, format!("{}\nnot-a-fingerprint\n", openssl_form(&fingerprint))).unwrap();
    let err = lienthong_provider::read_refused_certificates(&list).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let err = RefusedCertificates::watch_file(&list, Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let missing = RefusedCertificates::watch_file(dir.path().join("absent.txt"), Duration::from_secs(1)).unwrap_err();
    assert!(matches!(missing, ProviderError::RefusedList { .. }), "{missing:?}");
}

/// An operator adds a leaked broker certificate to the list of a register
/// that is serving: the register refuses it from its next fetch, on the
/// connection already open, without a restart. A list broken later keeps
/// the one read before in force, as does a list deleted.
#[tokio::test]
async fn a_changed_refused_list_applies_to_open_connections_without_a_restart() {
    let fed = Federation::new();
    let (first, first_fingerprint) = fed.broker_material();
    let (second, second_fingerprint) = fed.broker_material();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("refused.txt");
    std::fs::write(&list, "# nothing refused yet\n").unwrap();
    let mut config = ProviderConfig::new(TD);
    config.refused_certificates = RefusedCertificates::watch_file(&list, Duration::from_millis(20)).unwrap();
    let refused = config.refused_certificates.clone();
    assert!(refused.is_empty());
    let (url, stop, register) = start_demo_register(&fed, DemoRegisterKind::CivilStatus, config).await;
    let mut first_client = RecordProviderClient::new(fed.channel(&first, &url).await);
    let mut second_client = RecordProviderClient::new(fed.channel(&second, &url).await);
    fetch(&mut first_client, BIRTH_RECORD, &birth_query(5)).await.unwrap();
    fetch(&mut second_client, BIRTH_RECORD, &birth_query(5)).await.unwrap();

    std::fs::write(&list, format!("{}\n", openssl_form(&first_fingerprint))).unwrap();
    wait_until(|| refused.contains(&first_fingerprint)).await;
    let err = fetch(&mut first_client, BIRTH_RECORD, &birth_query(5))
        .await
        .unwrap_err();
    assert_refused(&err, &first_fingerprint);
    fetch(&mut second_client, BIRTH_RECORD, &birth_query(5)).await.unwrap();

    // A half-edited file is not applied: the first stays refused, the
    // second served. Fixing it applies it.
    std::fs::write(&list, format!("{}\nsha256:12", openssl_form(&second_fingerprint))).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refused.len(), 1);
    assert!(refused.contains(&first_fingerprint));
    fetch(&mut second_client, BIRTH_RECORD, &birth_query(5)).await.unwrap();
    std::fs::write(
        &list,
        format!(
            "{}\n{}\n",
            openssl_form(&first_fingerprint),
            openssl_form(&second_fingerprint)
        ),
    )
    .unwrap();
    wait_until(|| refused.len() == 2).await;
    let err = fetch(&mut second_client, BIRTH_RECORD, &birth_query(5))
        .await
        .unwrap_err();
    assert_refused(&err, &second_fingerprint);

    // A deleted file refuses what it listed until it comes back.
    std::fs::remove_file(&list).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refused.len(), 2);
    let err = fetch(&mut first_client, BIRTH_RECORD, &birth_query(5))
        .await
        .unwrap_err();
    assert_refused(&err, &first_fingerprint);
    let _ = stop.send(());
    register.await.unwrap().unwrap();
}

/// The leaked broker certificate re-encoded by whoever holds it and its key:
/// its ECDSA signature (r, s) as the equally valid (r, n − s), under another
/// fingerprint. Served until listed; once the original's fingerprint is
/// listed (as `openssl` prints it), refused as the original is, naming it.
#[tokio::test]
async fn a_refused_broker_certificate_re_encoded_is_still_refused() {
    let fed = Federation::new();
    let (mut leaked, fingerprint) = fed.broker_material();
    leaked.chain[0] = lienthong_tls::testing::with_negated_signature(&leaked.chain[0]);
    assert_ne!(lienthong_tls::sha256_fingerprint(&leaked.chain[0]), fingerprint);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("refused.txt");
    std::fs::write(&list, "# nothing refused yet\n").unwrap();
    let mut config = ProviderConfig::new(TD);
    config.refused_certificates = RefusedCertificates::watch_file(&list, Duration::from_millis(20)).unwrap();
    let refused = config.refused_certificates.clone();
    let (url, stop, register) = start_demo_register(&fed, DemoRegisterKind::CivilStatus, config).await;
    let mut re_encoded = RecordProviderClient::new(fed.channel(&leaked, &url).await);
    fetch(&mut re_encoded, BIRTH_RECORD, &birth_query(9)).await.unwrap();

    std::fs::write(&list, format!("sha256 Fingerprint={}\n", openssl_form(&fingerprint))).unwrap();
    wait_until(|| refused.contains(&fingerprint)).await;
    let err = fetch(&mut re_encoded, BIRTH_RECORD, &birth_query(9)).await.unwrap_err();
    assert_refused(&err, &fingerprint);
    let mut reconnected = RecordProviderClient::new(fed.channel(&leaked, &url).await);
    let err = fetch(&mut reconnected, BIRTH_RECORD, &birth_query(9))
        .await
        .unwrap_err();
    assert_refused(&err, &fingerprint);
    let mut new = fed.broker(&url).await;
    fetch(&mut new, BIRTH_RECORD, &birth_query(9)).await.unwrap();
    let _ = stop.send(());
    register.await.unwrap().unwrap();
}

/// The fingerprint as `openssl x509 -noout -fingerprint -sha256` prints it.
fn openssl_form(fingerprint: &[u8; 32]) -> String {
    fingerprint
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn assert_refused(err: &Status, fingerprint: &[u8; 32]) {
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains(&lienthong_tls::fingerprint_hex(fingerprint)),
        "{err:?}"
    );
}

/// Polls `done` until it holds, for at most ten seconds.
async fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "the refused list was not reloaded within ten seconds"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A register checks the broker certificate's expiry on every fetch, not
/// only at the handshake: a connection outlives the certificate it was
/// made with.
#[tokio::test]
async fn a_broker_certificate_that_expires_during_a_connection_is_refused() {
    let fed = Federation::new();
    let (url, stop, register) = start_demo_register(&fed, DemoRegisterKind::CivilStatus, ProviderConfig::new(TD)).await;
    let mut spec = IssueSpec::broker();
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let short_lived = fed.material(&spec);
    let mut broker = RecordProviderClient::new(fed.channel(&short_lived, &url).await);
    fetch(&mut broker, BIRTH_RECORD, &birth_query(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let err = fetch(&mut broker, BIRTH_RECORD, &birth_query(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired during the connection"), "{err:?}");
    let _ = stop.send(());
    register.await.unwrap().unwrap();
}

/// The SHA-256 of the certificate the register at `url` serves to a new connection.
async fn served_fingerprint(fed: &Federation, url: &str) -> [u8; 32] {
    let config = client_config(
        &fed.material(&IssueSpec::broker()),
        Some((TD, Identity::Member(PROVIDER.to_owned()))),
    )
    .unwrap();
    let stream = lienthong_tls::Dialer::new(url, config, Duration::from_secs(5))
        .unwrap()
        .dial()
        .await
        .unwrap();
    lienthong_tls::sha256_fingerprint(&stream.get_ref().1.peer_certificates().unwrap()[0])
}

/// With `ProviderConfig::tls_files`, a register takes its renewed certificate
/// without a restart, and refuses files it would not start with (another
/// member's certificate), serving the one it had.
#[tokio::test]
async fn a_register_takes_its_renewed_certificate_without_a_restart() {
    let fed = Federation::new();
    let dir = tempfile::tempdir().unwrap();
    let files = lienthong_tls::TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("register.pem"),
        key: dir.path().join("register.key"),
    };
    let write = |spec: &IssueSpec| {
        let issued = fed.ca.issue(spec).unwrap();
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        std::fs::write(&files.key, &issued.key_pem).unwrap();
        std::fs::set_permissions(&files.key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        lienthong_tls::sha256_fingerprint(
            &TlsMaterial::from_pem(&fed.ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
                .unwrap()
                .chain[0],
        )
    };
    std::fs::write(&files.ca, fed.ca.cert_pem()).unwrap();
    let first = write(&IssueSpec::member(PROVIDER));
    let tls = Arc::new(ServerTls::new(&TlsMaterial::load(&files).unwrap(), TD).unwrap());
    let mut config = ProviderConfig::new(TD);
    config.member = Some(PROVIDER.to_owned());
    config.tls_files = Some(files.clone());
    config.tls_reload_every = Duration::from_millis(20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let register = tokio::spawn(serve(civil(), tls, config, listener, async move {
        let _ = stopped.await;
    }));
    assert_eq!(served_fingerprint(&fed, &url).await, first);

    // Another member's certificate: the broker would refuse it from this register.
    write(&IssueSpec::member("land-registry"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        served_fingerprint(&fed, &url).await,
        first,
        "refused files leave the old one served"
    );

    let renewed = write(&IssueSpec::member(PROVIDER));
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_fingerprint(&fed, &url).await != renewed {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within ten seconds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Not valid yet (the issuing host's clock ahead): taken once valid, the files unchanged meanwhile.
    let early = write(&IssueSpec {
        not_before: time::OffsetDateTime::now_utc() + time::Duration::seconds(1),
        ..IssueSpec::member(PROVIDER)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_fingerprint(&fed, &url).await != early {
        assert!(Instant::now() < deadline, "the certificate was not served once valid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut broker = fed.broker(&url).await;
    fetch(&mut broker, BIRTH_RECORD, &birth_query(5)).await.unwrap();
    drop(broker);
    stop.send(()).unwrap();
    register.await.unwrap().unwrap();
}
