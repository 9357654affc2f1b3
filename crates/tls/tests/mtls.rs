//! Real mutual-TLS handshakes against a tonic server on 127.0.0.1, using the gRPC health
//! service behind an interceptor that does what the broker does: refuse unauthenticated
//! peers with `UNAUTHENTICATED` and the reason from `PeerInfo`.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lienthong_tls::{
    AcceptOptions, AuthError, CertificateAuthority, Dialer, Identity, IssueSpec, PeerInfo, ServerTls, TlsError,
    TlsMaterial, UnauthenticatedLimits, client_config, connect_channel, incoming, peer_info, pinned_client_config,
};
use rustls::ClientConfig;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::InterceptorLayer;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TD: &str = "gov.test";
const TIMEOUT: Duration = Duration::from_secs(5);

fn material(ca: &CertificateAuthority, spec: &IssueSpec) -> TlsMaterial {
    let issued = ca.issue(spec).unwrap();
    TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

struct TestServer {
    port: u16,
    /// Every `PeerInfo` a request arrived with.
    peers: Arc<Mutex<Vec<Arc<PeerInfo>>>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn start(ca: &CertificateAuthority, server_identity: &str, options: AcceptOptions) -> Self {
        let tls = ServerTls::new(&material(ca, &IssueSpec::member(server_identity)), TD).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let authenticate = move |req: Request<()>| {
            let peer = peer_info(&req).ok_or_else(|| Status::internal("no peer info"))?;
            seen.lock().unwrap().push(peer.clone());
            match &peer.identity {
                Ok(_) => Ok(req),
                Err(reason) => Err(Status::unauthenticated(reason.to_string())),
            }
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(InterceptorLayer::new(authenticate))
                .add_service(health)
                .serve_with_incoming_shutdown(incoming(listener, Arc::new(tls), options), async {
                    let _ = stopped.await;
                }),
        );
        TestServer {
            port,
            peers,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn peers(&self) -> Vec<Arc<PeerInfo>> {
        self.peers.lock().unwrap().clone()
    }

    async fn shutdown(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn check(url: &str, config: Arc<ClientConfig>) -> Result<ServingStatus, Status> {
    let channel = connect_channel(url, config, TIMEOUT)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let response = HealthClient::new(channel).check(HealthCheckRequest::default()).await?;
    Ok(response.into_inner().status())
}

/// A client config pinned to the test server's identity.
fn pinned(material: &TlsMaterial) -> Arc<ClientConfig> {
    client_config(material, Some((TD, Identity::Member("provider".into())))).unwrap()
}

fn roots_only(ca: &CertificateAuthority) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for root in material(ca, &IssueSpec::broker()).roots {
        roots.add(root).unwrap();
    }
    roots
}

#[tokio::test]
async fn member_certificate_identifies_the_member() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server = TestServer::start(&ca, "provider", AcceptOptions::default()).await;
    let client = material(&ca, &IssueSpec::member("alpha"));

    assert_eq!(
        check(&server.url(), pinned(&client)).await.unwrap(),
        ServingStatus::Serving
    );
    // Also over 127.0.0.1 (IP SAN), unpinned.
    let url = format!("https://127.0.0.1:{}", server.port);
    let unpinned = connect_channel(&url, client_config(&client, None).unwrap(), TIMEOUT)
        .await
        .unwrap();
    HealthClient::new(unpinned)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    // The dialer the relay runs its own HTTP/2 connections over checks the
    // same pinned identity.
    let dialled = Dialer::new(&server.url(), pinned(&client), TIMEOUT)
        .unwrap()
        .dial()
        .await;
    assert!(dialled.is_ok(), "{:?}", dialled.err());
    drop(dialled);
    let someone_else = client_config(&client, Some((TD, Identity::Member("other".into())))).unwrap();
    let refused = Dialer::new(&server.url(), someone_else, TIMEOUT).unwrap().dial().await;
    let Err(TlsError::Connect { detail, .. }) = refused else {
        panic!("a server with another identity was accepted");
    };
    assert!(
        detail.contains("server is not spiffe://gov.test/member/other"),
        "{detail}"
    );

    let peers = server.peers();
    assert_eq!(peers.len(), 2);
    for peer in peers {
        assert_eq!(peer.identity, Ok(Identity::Member("alpha".into())));
        assert!(peer.remote_addr.unwrap().ip().is_loopback());
        assert!(peer.not_after.unwrap() > OffsetDateTime::now_utc());
        // The fingerprints revocations are checked against: the presented
        // certificate's, not the CA's or the server's.
        assert_eq!(
            peer.fingerprints,
            Some(lienthong_tls::CertificateFingerprints::of(&client.chain[0]))
        );
        assert_eq!(
            peer.fingerprints.as_ref().map(|f| f.presented()),
            Some(lienthong_tls::sha256_fingerprint(&client.chain[0]))
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn missing_foreign_and_expired_certificates_reach_the_application() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server = TestServer::start(&ca, "provider", AcceptOptions::default()).await;

    // No client certificate at all.
    let mut anonymous = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots_only(&ca))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];

    // A certificate from another CA (same trust domain name), trusting our CA for the server.
    let other_ca = CertificateAuthority::generate(TD).unwrap();
    let mut foreign = material(&other_ca, &IssueSpec::member("alpha"));
    foreign.roots = material(&ca, &IssueSpec::broker()).roots;

    // An expired certificate from our CA.
    let mut spec = IssueSpec::member("alpha");
    spec.not_before = time::macros::datetime!(2024-12-01 00:00:00 UTC);
    spec.not_after = time::macros::datetime!(2025-01-01 00:00:00 UTC);
    let expired = material(&ca, &spec);

    let cases = [
        (Arc::new(anonymous), AuthError::NoCertificate),
        (pinned(&foreign), AuthError::UnknownIssuer),
        (
            pinned(&expired),
            AuthError::Expired {
                not_after: "2025-01-01T00:00:00Z".into(),
            },
        ),
    ];
    for (config, expected) in cases {
        let status = check(&server.url(), config).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(status.message(), expected.to_string());
        assert_eq!(server.peers().last().unwrap().identity, Err(expected));
    }
    assert_eq!(
        AuthError::Expired {
            not_after: "2025-01-01T00:00:00Z".into()
        }
        .to_string(),
        "client certificate expired at 2025-01-01T00:00:00Z"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_certificate_without_its_key_cannot_complete_the_handshake() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server = TestServer::start(&ca, "provider", AcceptOptions::default()).await;
    let victim = material(&ca, &IssueSpec::member("victim"));
    let attacker = material(&ca, &IssueSpec::member("attacker"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let attacker_key = provider.key_provider.load_private_key(attacker.key).unwrap();
    // The victim's (public) certificate, signed for with the attacker's own key.
    let stolen = CertifiedKey::new(victim.chain.clone(), attacker_key);
    assert!(stolen.keys_match().is_err());

    // Both TLS versions: the server delegates both signature checks.
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots_only(&ca))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(stolen.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        let outcome = check(&server.url(), Arc::new(config)).await;
        assert!(outcome.is_err(), "{version:?}: impersonation succeeded");
    }
    assert!(server.peers().is_empty(), "no request may reach the application");

    // Control: the victim with its real key gets through.
    assert!(check(&server.url(), pinned(&victim)).await.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn pinned_client_refuses_a_server_naming_another_member() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server = TestServer::start(&ca, "impostor", AcceptOptions::default()).await;
    let client = material(&ca, &IssueSpec::member("alpha"));

    let err = connect_channel(&server.url(), pinned(&client), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("server is not spiffe://gov.test/member/provider")
            && text.contains("spiffe://gov.test/member/impostor"),
        "{text}"
    );
    assert!(server.peers().is_empty());

    // The same server is fine for a client that expects it, or only checks the chain.
    let right = client_config(&client, Some((TD, Identity::Member("impostor".into())))).unwrap();
    assert!(check(&server.url(), right).await.is_ok());
    assert!(
        check(&server.url(), client_config(&client, None).unwrap())
            .await
            .is_ok()
    );

    // A server from another CA is refused even without pinning.
    let other = TestServer::start(
        &CertificateAuthority::generate(TD).unwrap(),
        "provider",
        AcceptOptions::default(),
    )
    .await;
    assert!(
        connect_channel(&other.url(), client_config(&client, None).unwrap(), TIMEOUT)
            .await
            .is_err()
    );
    other.shutdown().await;
    server.shutdown().await;
}

/// The relay's config refuses a register whose certificate was revoked,
/// naming it, and only that certificate.
#[tokio::test]
async fn a_pinned_client_refuses_a_revoked_server_certificate() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server = TestServer::start(&ca, "provider", AcceptOptions::default()).await;
    let client = material(&ca, &IssueSpec::broker());
    let dial = |revoked: Option<[u8; 32]>, seen: Arc<Mutex<Vec<[u8; 32]>>>| {
        let config = pinned_client_config(
            &client,
            TD,
            Identity::Member("provider".into()),
            Arc::new(move |fingerprint| {
                seen.lock().unwrap().push(*fingerprint);
                revoked == Some(*fingerprint)
            }),
        )
        .unwrap();
        let url = server.url();
        async move { Dialer::new(&url, config, TIMEOUT).unwrap().dial().await }
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    assert!(dial(Some([0; 32]), seen.clone()).await.is_ok());
    let server_fingerprint = seen.lock().unwrap()[0];
    let Err(TlsError::Connect { detail, .. }) = dial(Some(server_fingerprint), Arc::default()).await else {
        panic!("a revoked server certificate was accepted");
    };
    assert!(
        detail.contains("spiffe://gov.test/member/provider") && detail.contains("was revoked"),
        "{detail}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_times_out_without_blocking_others() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    // One handshake at a time: the silent client holds the only slot until its timeout.
    let options = AcceptOptions {
        max_concurrent_handshakes: 1,
        handshake_timeout: Duration::from_millis(300),
        max_handshakes_per_address: 1,
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&ca, "provider", options).await;
    let mut silent = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let client = material(&ca, &IssueSpec::member("alpha"));
    let started = std::time::Instant::now();
    assert!(check(&server.url(), pinned(&client)).await.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(150), "the slot was taken");

    // The server has dropped the silent connection.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(TIMEOUT, silent.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_hold_every_handshake_slot() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let options = AcceptOptions {
        max_concurrent_handshakes: 8,
        handshake_timeout: Duration::from_secs(5),
        max_handshakes_per_address: 2,
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&ca, "provider", options).await;
    let silent: Vec<TcpStream> = futures_silent(server.port, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A third from the same address is closed at once, not left to wait.
    let mut third = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    // Once the silent ones leave, the address is served again.
    drop(silent);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = material(&ca, &IssueSpec::member("alpha"));
    assert!(check(&server.url(), pinned(&client)).await.is_ok());
    server.shutdown().await;
}

/// `n` TCP connections that never start their handshake.
async fn futures_silent(port: u16, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    out
}

/// A TLS connection to the test server presenting no client certificate,
/// handshake done, nothing sent.
async fn anonymous_connection(ca: &CertificateAuthority, port: u16) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots_only(ca))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Whether the server closes `stream` within `within`.
async fn closed_within(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's HTTP/2 settings: read on.
            Ok(Ok(_)) => {}
        }
    }
}

/// Nobody outside the federation can hold the server's connections:
/// connections without a certificate it accepts are bounded in number (one
/// past the bound is closed after its handshake) and in time, while a
/// member's connection is not.
#[tokio::test]
async fn connections_without_a_certificate_are_bounded_in_number_and_time() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let options = AcceptOptions {
        unauthenticated: Some(UnauthenticatedLimits {
            max_connections: 2,
            lifetime: Duration::from_millis(1_500),
        }),
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&ca, "provider", options).await;
    let mut held = vec![
        anonymous_connection(&ca, server.port).await,
        anonymous_connection(&ca, server.port).await,
    ];
    let mut third = anonymous_connection(&ca, server.port).await;
    assert!(
        closed_within(&mut third, Duration::from_millis(700)).await,
        "a third connection without a certificate is closed at once"
    );
    let member = material(&ca, &IssueSpec::member("alpha"));
    assert_eq!(
        check(&server.url(), pinned(&member)).await.unwrap(),
        ServingStatus::Serving
    );
    for stream in &mut held {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "closed after its time"
        );
    }
    // Their places are free again: an anonymous caller is answered (refused by the service).
    let mut anonymous = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots_only(&ca))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let status = check(&server.url(), Arc::new(anonymous)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    server.shutdown().await;
}
