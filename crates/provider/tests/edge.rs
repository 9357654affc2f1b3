//! What a peer meets at the kit's edge, over real mutual TLS: bounded HTTP/2
//! resources for whoever connects, refusals before a message is read for
//! anyone but the broker, the gRPC spec's answers where tonic's own differ,
//! and a shutdown that idle connections do not hold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lienthong::provider::v1::FetchRequest;
use lienthong::provider::v1::record_provider_client::RecordProviderClient;
use lienthong_provider::demo::{BIRTH_RECORD, CivilStatusRegister, citizen_national_id};
use lienthong_provider::testing::{FaultMode, Faulty};
use lienthong_provider::{ProviderConfig, serve};
use lienthong_tls::{
    CertificateAuthority, Dialer, Identity, IssueSpec, ServerTls, TlsMaterial, client_config, connect_channel,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

const TD: &str = "gov.test";
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

    /// A client config trusting the federation CA, presenting `spec`'s
    /// certificate, or none.
    fn client_config(&self, spec: Option<&IssueSpec>) -> Arc<rustls::ClientConfig> {
        match spec {
            Some(spec) => {
                client_config(&self.material(spec), Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap()
            }
            None => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(self.material(&IssueSpec::broker()).roots[0].clone()).unwrap();
                let mut config =
                    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                Arc::new(config)
            }
        }
    }

    async fn channel(&self, spec: Option<&IssueSpec>, url: &str) -> Channel {
        connect_channel(url, self.client_config(spec), Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// A TLS connection that has done its handshake and nothing else.
    async fn dial(
        &self,
        spec: Option<&IssueSpec>,
        url: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        Dialer::new(url, self.client_config(spec), Duration::from_secs(5))
            .unwrap()
            .dial()
            .await
            .unwrap()
    }
}

/// A register serving `faulty` with `config` until its handle says stop.
struct Register {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), lienthong_provider::ProviderError>>,
}

impl Register {
    async fn start(fed: &Federation, faulty: Faulty, config: ProviderConfig) -> Register {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let tls = Arc::new(ServerTls::new(&fed.material(&IssueSpec::member(PROVIDER)), TD).unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(Arc::new(faulty), tls, config, listener, async move {
            let _ = stopped.await;
        }));
        Register {
            url,
            stop: Some(stop),
            task,
        }
    }

    /// Signals the shutdown and waits for `serve` to return, at most `within`.
    async fn stop(mut self, within: Duration) {
        let _ = self.stop.take().unwrap().send(());
        let served = tokio::time::timeout(within, self.task)
            .await
            .expect("the register stops in time")
            .unwrap();
        assert!(served.is_ok(), "{served:?}");
    }
}

fn faulty() -> Faulty {
    Faulty::new(Arc::new(CivilStatusRegister::new(7)))
}

fn fetch_request(query_json: String) -> FetchRequest {
    FetchRequest {
        record_type: BIRTH_RECORD.to_owned(),
        schema_version: 1,
        query_json,
        request_id: "req-42".to_owned(),
        consumer: "tax-office".to_owned(),
        purpose: "tax assessment".to_owned(),
        fields: vec!["/full_name".to_owned()],
    }
}

fn birth_query() -> String {
    serde_json::json!({ "national_id": citizen_national_id(7, 3) }).to_string()
}

/// Runs the HTTP/2 client handshake on `tls`, keeping its connection driven;
/// the stream reads as the server's settings said.
async fn h2_client(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> h2::client::SendRequest<Bytes> {
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// A gRPC health check sent over `send`, to its answer's status code.
async fn h2_health_check(send: &mut h2::client::SendRequest<Bytes>, url: &str) -> http::StatusCode {
    let request = http::Request::post(format!("{url}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, mut body) = ready.send_request(request, false).unwrap();
    // An empty HealthCheckRequest: one uncompressed message of no bytes.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    answer.await.unwrap().status()
}

/// Whether the server ends `tls` (end of stream or an error) before `within`.
async fn closed_by_server(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(within, tls.read(&mut byte)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's HTTP/2 settings and the like.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_peer_without_a_certificate_is_told_only_the_brokers_certificate_is_accepted() {
    let fed = Federation::new();
    let register = Register::start(&fed, faulty(), ProviderConfig::new(TD)).await;
    let mut client = RecordProviderClient::new(fed.channel(None, &register.url).await);
    let status = client.fetch(fetch_request(birth_query())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("spiffe://gov.test/broker"),
        "{}",
        status.message()
    );
    // Not the shared advice to bring a member certificate, which a register refuses too.
    assert!(!status.message().contains("member certificate"), "{}", status.message());
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_peer_that_is_not_the_broker_is_refused_before_its_message_is_read() {
    let fed = Federation::new();
    let faulty = faulty();
    let register = Register::start(&fed, faulty.clone(), ProviderConfig::new(TD)).await;
    // Larger than tonic's own limit of 4 MiB: had it been read, it would be refused for its size.
    let huge = fetch_request("x".repeat(5 * 1024 * 1024));
    let mut anonymous =
        RecordProviderClient::new(fed.channel(None, &register.url).await).max_encoding_message_size(usize::MAX);
    let status = anonymous.fetch(huge.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let member = fed.channel(Some(&IssueSpec::member("tax-office")), &register.url).await;
    let mut member = RecordProviderClient::new(member).max_encoding_message_size(usize::MAX);
    let status = member.fetch(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "only the broker may call this register");
    assert_eq!(faulty.calls(), 0);
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_resource_exhausted_and_others_are_served() {
    let fed = Federation::new();
    let register = Register::start(&fed, faulty(), ProviderConfig::new(TD)).await;
    let mut broker = RecordProviderClient::new(fed.channel(Some(&IssueSpec::broker()), &register.url).await);
    broker.fetch(fetch_request(birth_query())).await.unwrap();
    let big = serde_json::json!({ "national_id": "x".repeat(100 * 1024) }).to_string();
    let status = broker.fetch(fetch_request(big)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("larger than this register accepts"),
        "{}",
        status.message()
    );
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn every_connection_is_told_how_many_streams_it_may_open() {
    let fed = Federation::new();
    let mut config = ProviderConfig::new(TD);
    config.max_concurrent_streams = 8;
    let register = Register::start(&fed, faulty(), config).await;
    for spec in [None, Some(IssueSpec::broker())] {
        let mut send = h2_client(fed.dial(spec.as_ref(), &register.url).await).await;
        // Answered, so the server's settings have arrived.
        assert_eq!(h2_health_check(&mut send, &register.url).await, http::StatusCode::OK);
        assert_eq!(send.current_max_send_streams(), 8, "{spec:?}");
    }
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_silent_connection_of_a_peer_that_is_not_the_broker_is_closed() {
    let fed = Federation::new();
    let mut config = ProviderConfig::new(TD);
    config.non_broker_connection_lifetime = Duration::from_millis(200);
    let register = Register::start(&fed, faulty(), config).await;
    for spec in [None, Some(IssueSpec::member("tax-office"))] {
        let mut silent = fed.dial(spec.as_ref(), &register.url).await;
        assert!(closed_by_server(&mut silent, Duration::from_secs(20)).await, "{spec:?}");
    }
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn connections_of_peers_that_are_not_the_broker_are_bounded_and_the_broker_still_gets_in() {
    let fed = Federation::new();
    let mut config = ProviderConfig::new(TD);
    config.max_non_broker_connections = 2;
    let register = Register::start(&fed, faulty(), config).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut send = h2_client(fed.dial(None, &register.url).await).await;
        // Served, so admitted.
        assert_eq!(h2_health_check(&mut send, &register.url).await, http::StatusCode::OK);
        held.push(send);
    }
    let mut third = fed.dial(None, &register.url).await;
    assert!(closed_by_server(&mut third, Duration::from_secs(20)).await);
    let mut broker = RecordProviderClient::new(fed.channel(Some(&IssueSpec::broker()), &register.url).await);
    broker.fetch(fetch_request(birth_query())).await.unwrap();
    register.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn requests_that_are_not_grpc_get_the_http_status_the_spec_names() {
    use tower::ServiceExt;
    let fed = Federation::new();
    let register = Register::start(&fed, faulty(), ProviderConfig::new(TD)).await;
    let channel = fed.channel(None, &register.url).await;
    let send = |method: http::Method, content_type: &'static str| {
        let channel = channel.clone();
        let uri = format!("{}/grpc.health.v1.Health/Check", register.url);
        async move {
            let request = http::Request::builder()
                .method(method)
                .uri(uri)
                .header(http::header::CONTENT_TYPE, content_type)
                .header("te", "trailers")
                .body(tonic::body::Body::empty())
                .unwrap();
            channel.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(
        send(http::Method::POST, "text/plain").await,
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        send(http::Method::GET, "application/grpc").await,
        http::StatusCode::METHOD_NOT_ALLOWED
    );
    register.stop(Duration::from_secs(30)).await;
}

/// Sent over raw HTTP/2: tonic's client would give up at the deadline itself.
#[tokio::test]
async fn a_fetch_whose_deadline_passes_is_deadline_exceeded() {
    use prost::Message;
    let fed = Federation::new();
    let faulty = faulty();
    faulty.set_mode(FaultMode::Sleep(Duration::from_secs(600)));
    let mut config = ProviderConfig::new(TD);
    config.shutdown_grace = Duration::from_millis(100);
    let register = Register::start(&fed, faulty.clone(), config).await;
    let send = h2_client(fed.dial(Some(&IssueSpec::broker()), &register.url).await).await;
    let request = http::Request::post(format!("{}/lienthong.provider.v1.RecordProvider/Fetch", register.url))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    let mut ready = send.ready().await.unwrap();
    let (answer, mut body) = ready.send_request(request, false).unwrap();
    let message = fetch_request(birth_query()).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(Bytes::from(frame), true).unwrap();
    let answer = answer.await.unwrap();
    // A trailers-only answer: the status is in the headers.
    let status = tonic::Status::from_header_map(answer.headers()).expect("a grpc-status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(faulty.calls(), 1);
    register.stop(Duration::from_secs(30)).await;
}

/// A connection that did the HTTP/2 handshake (so the register serves it)
/// and then reads and says nothing, not even goodbye; and one that never
/// spoke HTTP/2 at all.
#[tokio::test]
async fn idle_connections_do_not_hold_the_shutdown() {
    let fed = Federation::new();
    let mut config = ProviderConfig::new(TD);
    config.shutdown_grace = Duration::from_secs(600);
    let register = Register::start(&fed, faulty(), config).await;
    let mut never_spoke = fed.dial(Some(&IssueSpec::broker()), &register.url).await;
    let mut mute = fed.dial(Some(&IssueSpec::broker()), &register.url).await;
    // The client preface and empty SETTINGS frame.
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    mute.flush().await.unwrap();
    // The server's SETTINGS frame: tonic serves the connection.
    let mut header = [0u8; 9];
    mute.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 0x4, "a SETTINGS frame");
    register.stop(Duration::from_secs(30)).await;
    assert!(closed_by_server(&mut mute, Duration::from_secs(5)).await);
    assert!(closed_by_server(&mut never_spoke, Duration::from_secs(5)).await);
}

/// At shutdown every connection is told goodbye (HTTP/2 GOAWAY) before it
/// is closed, so the broker moves its calls elsewhere rather than seeing a
/// reset; a silent peer does not hold the shutdown for the grace period.
#[tokio::test]
async fn idle_connections_are_told_goodbye_before_they_are_closed() {
    let fed = Federation::new();
    let mut config = ProviderConfig::new(TD);
    config.shutdown_grace = Duration::from_secs(600);
    let register = Register::start(&fed, faulty(), config).await;
    let broker = fed.material(&IssueSpec::broker());
    let pinned = client_config(&broker, Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap();
    let mut mute = Dialer::new(&register.url, pinned, Duration::from_secs(5))
        .unwrap()
        .dial()
        .await
        .unwrap();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    mute.flush().await.unwrap();
    let mut answering = RecordProviderClient::new(fed.channel(Some(&IssueSpec::broker()), &register.url).await);
    answering.fetch(fetch_request(birth_query())).await.unwrap();
    // Within 30 s, where the grace period is 600 s.
    let stopping = tokio::spawn(register.stop(Duration::from_secs(30)));
    let frames = frames_until_closed(&mut mute, Duration::from_secs(5)).await;
    assert!(
        frames.contains(&GOAWAY),
        "no GOAWAY before the close: frame types {frames:?}"
    );
    stopping.await.unwrap();
}

/// HTTP/2's GOAWAY frame type.
const GOAWAY: u8 = 0x7;

/// The types of the HTTP/2 frames the server sends on `tls` until it closes
/// the connection (or `within` passes without a byte).
async fn frames_until_closed(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Vec<u8> {
    let mut types = Vec::new();
    let mut header = [0u8; 9];
    loop {
        match tokio::time::timeout(within, tls.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            _ => return types,
        }
        types.push(header[3]);
        let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        if !matches!(
            tokio::time::timeout(within, tls.read_exact(&mut payload)).await,
            Ok(Ok(_))
        ) {
            return types;
        }
    }
}

/// A refused broker certificate, re-encoded by whoever holds it (its ECDSA
/// signature (r, s) as the equally valid (r, n − s), another fingerprint),
/// gets what any peer that is not the broker gets: its silent connection is
/// closed.
#[tokio::test]
async fn a_refused_broker_certificate_re_encoded_is_not_the_broker() {
    let fed = Federation::new();
    let mut leaked = fed.material(&IssueSpec::broker());
    let listed = lienthong_tls::sha256_fingerprint(&leaked.chain[0]);
    leaked.chain[0] = lienthong_tls::testing::with_negated_signature(&leaked.chain[0]);
    let mut config = ProviderConfig::new(TD);
    config.non_broker_connection_lifetime = Duration::from_millis(200);
    config.refused_certificates = lienthong_provider::RefusedCertificates::new([listed].into());
    let register = Register::start(&fed, faulty(), config).await;
    let pinned = client_config(&leaked, Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap();
    let mut silent = Dialer::new(&register.url, pinned, Duration::from_secs(5))
        .unwrap()
        .dial()
        .await
        .unwrap();
    assert!(closed_by_server(&mut silent, Duration::from_secs(20)).await);
    register.stop(Duration::from_secs(30)).await;
}

/// A gRPC health check over `send`: its HTTP status, or `None` when the
/// connection is gone.
async fn try_health_check(send: &h2::client::SendRequest<Bytes>, url: &str) -> Option<http::StatusCode> {
    let request = http::Request::post(format!("{url}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.ok()?;
    let (answer, mut body) = ready.send_request(request, false).ok()?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).ok()?;
    Some(
        tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .ok()?
            .ok()?
            .status(),
    )
}

/// Health checks over `send` every 100 ms, for at most three seconds, until
/// one finds the connection closed (`None`); their answers.
async fn health_checks_until_closed(send: &h2::client::SendRequest<Bytes>, url: &str) -> Vec<Option<http::StatusCode>> {
    let mut answers = Vec::new();
    for _ in 0..30 {
        let answer = try_health_check(send, url).await;
        answers.push(answer);
        if answer.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answers
}

/// Whoever holds a leaked broker key and connected before its certificate
/// was refused keeps no connection exempt from the limits strangers meet.
#[tokio::test]
async fn the_brokers_connection_ends_once_its_certificate_is_refused() {
    let fed = Federation::new();
    let broker = fed.material(&IssueSpec::broker());
    let refused = lienthong_provider::RefusedCertificates::default();
    let mut config = ProviderConfig::new(TD);
    config.refused_certificates = refused.clone();
    config.non_broker_connection_lifetime = Duration::from_millis(300);
    let register = Register::start(&fed, faulty(), config).await;
    let pinned = client_config(&broker, Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap();
    let dialer = Dialer::new(&register.url, pinned, Duration::from_secs(5)).unwrap();
    let send = h2_client(dialer.dial().await.unwrap()).await;
    // Longer than a stranger's lifetime: the broker's connection has none.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(try_health_check(&send, &register.url).await, Some(http::StatusCode::OK));
    refused.replace([lienthong_tls::sha256_fingerprint(&broker.chain[0])].into());
    // Its calls are refused, saying why, until a stranger's lifetime is over.
    let answers = health_checks_until_closed(&send, &register.url).await;
    assert_eq!(answers.last(), Some(&None), "the connection still answers: {answers:?}");
    assert!(answers.len() > 1, "closed before a stranger's lifetime: {answers:?}");
    register.stop(Duration::from_secs(30)).await;
}

/// A broker certificate that expires while its connection is open leaves
/// that connection a stranger's limits, as a refused one does.
#[tokio::test]
async fn the_brokers_connection_ends_once_its_certificate_expires() {
    let fed = Federation::new();
    let mut spec = IssueSpec::broker();
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1_500);
    let broker = fed.material(&spec);
    let mut config = ProviderConfig::new(TD);
    config.non_broker_connection_lifetime = Duration::from_millis(300);
    let register = Register::start(&fed, faulty(), config).await;
    let pinned = client_config(&broker, Some((TD, Identity::Member(PROVIDER.to_owned())))).unwrap();
    let dialer = Dialer::new(&register.url, pinned, Duration::from_secs(5)).unwrap();
    let send = h2_client(dialer.dial().await.unwrap()).await;
    // Longer than a stranger's lifetime: the broker's connection has none.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(try_health_check(&send, &register.url).await, Some(http::StatusCode::OK));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let answers = health_checks_until_closed(&send, &register.url).await;
    assert_eq!(answers.last(), Some(&None), "the connection still answers: {answers:?}");
    register.stop(Duration::from_secs(30)).await;
}
