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

impl Captured {
    /// Captures this thread's log lines up to `level` while the guard lives:
    /// thread-local, and the current-thread runtime runs the server tasks on
    /// this thread.
    fn start(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }
}

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
    let (captured, _guard) = Captured::start(tracing::Level::DEBUG);

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

/// A request id holding a newline or an escape character is logged escaped:
/// it cannot forge a log line nor drive the terminal the log is read on.
#[tokio::test(flavor = "current_thread")]
async fn a_request_id_with_control_characters_is_logged_escaped() {
    let (captured, _guard) = Captured::start(tracing::Level::INFO);

    let ca = CertificateAuthority::generate(TD).unwrap();
    let tls = ServerTls::new(&material(&ca, &IssueSpec::member("civil-status")), TD).unwrap();
    let server = start_server(Arc::new(CivilStatusRegister::new(SEED)), Arc::new(tls))
        .await
        .unwrap();
    let config = client_config(
        &material(&ca, &IssueSpec::broker()),
        Some((TD, Identity::Member("civil-status".to_owned()))),
    )
    .unwrap();
    let channel = connect_channel(&server.url(), config, Duration::from_secs(5))
        .await
        .unwrap();
    let mut broker = RecordProviderClient::new(channel);
    let mut request = fetch_request(json!({ "national_id": citizen_national_id(SEED, 3) }));
    request.request_id = "req-7\nINFO fetch outcome=\"ok\" forged\u{1b}[2J".to_owned();
    broker.fetch(request).await.unwrap();
    drop(broker);
    server.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let fetch_lines: Vec<&str> = logs.lines().filter(|l| l.contains("outcome=")).collect();
    assert_eq!(fetch_lines.len(), 1, "one line, no forged one: {logs}");
    assert!(
        fetch_lines[0].contains(r#"request_id=req-7\nINFO fetch outcome="ok" forged\u{1b}[2J"#),
        "{logs}"
    );
    assert!(!logs.contains('\u{1b}'), "{logs}");
}

/// The shutdown's warning is given only when fetches really are in flight,
/// and says how many; a silent connection holds neither the shutdown nor
/// brings the warning.
#[tokio::test(flavor = "current_thread")]
async fn the_shutdown_warns_of_abandoned_fetches_only_and_counts_them() {
    use lienthong_provider::testing::{FaultMode, Faulty};
    use lienthong_provider::{ProviderConfig, serve};
    let (captured, _guard) = Captured::start(tracing::Level::INFO);

    let ca = CertificateAuthority::generate(TD).unwrap();
    let tls = Arc::new(ServerTls::new(&material(&ca, &IssueSpec::member("civil-status")), TD).unwrap());
    let broker_config = client_config(
        &material(&ca, &IssueSpec::broker()),
        Some((TD, Identity::Member("civil-status".to_owned()))),
    )
    .unwrap();
    let faulty = Faulty::new(Arc::new(CivilStatusRegister::new(SEED)));
    let start = |grace: Duration| {
        let (tls, faulty) = (tls.clone(), faulty.clone());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("https://{}", listener.local_addr().unwrap());
            let mut config = ProviderConfig::new(TD);
            config.shutdown_grace = grace;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(Arc::new(faulty), tls, config, listener, async move {
                let _ = stopped.await;
            }));
            (url, stop, task)
        }
    };
    let logs = || String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();

    // A silent connection and no fetch: the register stops at once, without the warning.
    let (url, stop, task) = start(Duration::from_secs(600)).await;
    let dialer = lienthong_tls::Dialer::new(&url, broker_config.clone(), Duration::from_secs(5)).unwrap();
    let mut silent = dialer.dial().await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The HTTP/2 preface and SETTINGS, then the server's SETTINGS: the
        // register serves the connection, which then says nothing, not even goodbye.
        silent
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let mut settings = [0u8; 9];
        silent.read_exact(&mut settings).await.unwrap();
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("a silent connection does not hold the shutdown")
        .unwrap()
        .unwrap();
    assert!(!logs().contains("grace period over"), "{}", logs());
    drop(silent);

    // Two fetches that never end: the warning counts them.
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(600)));
    let (url, stop, task) = start(Duration::from_millis(300)).await;
    let channel = connect_channel(&url, broker_config, Duration::from_secs(5))
        .await
        .unwrap();
    let mut hanging = Vec::new();
    for _ in 0..2 {
        let mut broker = RecordProviderClient::new(channel.clone());
        let query = json!({ "national_id": citizen_national_id(SEED, 1) });
        hanging.push(tokio::spawn(async move { broker.fetch(fetch_request(query)).await }));
    }
    while faulty.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the register stops once its grace period is over")
        .unwrap()
        .unwrap();
    let logs = logs();
    let warning: Vec<&str> = logs.lines().filter(|l| l.contains("grace period over")).collect();
    assert_eq!(warning.len(), 1, "{logs}");
    assert!(warning[0].contains("WARN"), "{logs}");
    assert!(warning[0].contains("fetches=2"), "{logs}");
    assert!(warning[0].contains("still in flight: 2"), "{logs}");
    for fetch in hanging {
        fetch.abort();
    }
}

/// Waits for ever, noting when it was told the broker stops waiting.
struct Stuck(Arc<Mutex<Vec<Option<std::time::Instant>>>>);

#[async_trait::async_trait]
impl lienthong_provider::RecordSource for Stuck {
    fn record_types(&self) -> Vec<String> {
        vec![BIRTH_RECORD.to_owned()]
    }

    async fn fetch(
        &self,
        ctx: lienthong_provider::FetchContext,
    ) -> Result<serde_json::Value, lienthong_provider::FetchError> {
        self.0.lock().unwrap().push(ctx.deadline);
        std::future::pending().await
    }
}

/// A fetch the register had not answered when the broker's deadline passed,
/// or that the broker cancelled, still leaves its line, saying which; the
/// register was told the deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_fetch_past_its_deadline_or_cancelled_is_logged() {
    let (captured, _guard) = Captured::start(tracing::Level::INFO);

    let ca = CertificateAuthority::generate(TD).unwrap();
    let tls = Arc::new(ServerTls::new(&material(&ca, &IssueSpec::member("civil-status")), TD).unwrap());
    let deadlines = Arc::new(Mutex::new(Vec::new()));
    let server = start_server(Arc::new(Stuck(deadlines.clone())), tls).await.unwrap();
    let config = client_config(
        &material(&ca, &IssueSpec::broker()),
        Some((TD, Identity::Member("civil-status".to_owned()))),
    )
    .unwrap();
    let channel = connect_channel(&server.url(), config, Duration::from_secs(5))
        .await
        .unwrap();
    let mut broker = RecordProviderClient::new(channel);
    let query = json!({ "national_id": citizen_national_id(SEED, 1) });

    let mut request = Request::new(fetch_request(query.clone()));
    request.set_timeout(Duration::from_millis(300));
    let asked = std::time::Instant::now();
    // The client's own timer may answer before the register's.
    broker.fetch(request).await.unwrap_err();
    let told = deadlines.lock().unwrap()[0].expect("the register is told the deadline");
    // 300 ms from when the call reached the register.
    let after = told.duration_since(asked);
    assert!(
        after >= Duration::from_millis(300) && after < Duration::from_secs(1),
        "{after:?}"
    );

    let mut cancelled = broker.clone();
    let call = tokio::spawn(async move { cancelled.fetch(fetch_request(query)).await });
    while deadlines.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(deadlines.lock().unwrap()[1], None, "no deadline sent, none told");
    call.abort();
    let logs = || String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for _ in 0..200 {
        if logs().contains("outcome=\"cancelled\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(broker);
    server.shutdown().await;

    let logs = logs();
    let fetch_lines: Vec<&str> = logs.lines().filter(|l| l.contains("outcome=")).collect();
    assert_eq!(fetch_lines.len(), 2, "{logs}");
    assert!(fetch_lines[0].contains("outcome=\"deadline_exceeded\""), "{logs}");
    assert!(fetch_lines[0].contains("latency_ms="), "{logs}");
    assert!(fetch_lines[0].contains(BIRTH_RECORD), "{logs}");
    assert!(fetch_lines[0].contains("request_id=req-42"), "{logs}");
    assert!(fetch_lines[1].contains("outcome=\"cancelled\""), "{logs}");
}
