//! The kit's log lines: one per fetch, continuing the caller's W3C trace, never
//! holding the query. In its own test binary because the capturing subscriber is
//! thread-local and tracing caches per-callsite interest process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lienthong::provider::v1::FetchRequest;
use lienthong::provider::v1::record_provider_client::RecordProviderClient;
use lienthong_provider::demo::{BIRTH_RECORD, CivilStatusRegister, DEMO_CITIZENS, citizen, citizen_national_id};
use lienthong_provider::testing::start_server;
use lienthong_tls::{
    CertificateAuthority, Identity, IssueSpec, ServerTls, TlsMaterial, client_config, connect_channel,
};
use serde_json::json;
use tonic::Request;

const TD: &str = "gov.test";
const SEED: u64 = 7;
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn material(ca: &CertificateAuthority, spec: &IssueSpec) -> TlsMaterial {
    let issued = ca.issue(spec).unwrap();
    TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

fn fetch_request(query: serde_json::Value) -> FetchRequest {
    FetchRequest {
        record_type: BIRTH_RECORD.to_owned(),
        schema_version: 1,
        query_json: query.to_string(),
        request_id: "req-42".to_owned(),
        consumer: "tax-office".to_owned(),
        purpose: "tax assessment".to_owned(),
        fields: Vec::new(),
    }
}

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fetches_continue_the_callers_trace_and_never_log_the_query() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // Thread-local, and the current-thread runtime runs the server tasks on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let ca = CertificateAuthority::generate(TD).unwrap();
    let tls = ServerTls::new(&material(&ca, &IssueSpec::member("civil-status")), TD).unwrap();
    let source = Arc::new(CivilStatusRegister::new(SEED));
    let server = start_server(source, Arc::new(tls)).await.unwrap();
    let config = client_config(
        &material(&ca, &IssueSpec::broker()),
        Some((TD, Identity::Member("civil-status".to_owned()))),
    )
    .unwrap();
    let channel = connect_channel(&server.url(), config, Duration::from_secs(5))
        .await
        .unwrap();
    let mut broker = RecordProviderClient::new(channel);
    let subject = citizen(SEED, 9);
    let query = json!({ "national_id": citizen_national_id(SEED, 9) });
    let mut request = Request::new(fetch_request(query));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    broker.fetch(request).await.unwrap();
    let missing = json!({ "national_id": format!("{}{}", &subject.national_id[..6], DEMO_CITIZENS) });
    broker.fetch(fetch_request(missing)).await.unwrap_err();
    drop(broker);
    server.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let fetch_lines: Vec<&str> = logs.lines().filter(|l| l.contains("outcome=")).collect();
    assert_eq!(fetch_lines.len(), 2, "{logs}");
    assert!(fetch_lines[0].contains(&format!("trace_id={TRACE_ID}")), "{logs}");
    assert!(fetch_lines[0].contains("outcome=\"ok\""), "{logs}");
    assert!(fetch_lines[0].contains("latency_ms="), "{logs}");
    assert!(fetch_lines[0].contains(BIRTH_RECORD), "{logs}");
    assert!(fetch_lines[1].contains("outcome=\"not_found\""), "{logs}");
    assert!(!fetch_lines[1].contains("trace_id="), "{logs}");
    // Neither the national ID, nor a name from the record, is logged.
    assert!(!logs.contains(&subject.national_id), "{logs}");
    assert!(!logs.contains(&subject.national_id[6..]), "{logs}");
    assert!(!logs.contains(&subject.full_name), "{logs}");
}
