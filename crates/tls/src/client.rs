//! Client side: rustls config with optional server identity pinning, and tonic channels.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::identity::{CertificateFingerprints, Identity, fingerprint_hex, identity_of, is_valid_trust_domain};
use crate::{TlsError, TlsMaterial, provider};

/// HTTP/2 keep-alive ping interval of client connections: a dead peer is noticed
/// without waiting for TCP to give up.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keep-alive ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client config presenting `material`'s certificate and trusting `material.roots`.
///
/// The server's chain and host name are always verified. With `expected_server =
/// Some((trust_domain, identity))` the server certificate must also carry exactly that
/// SPIFFE identity, so e.g. the broker only ever sends a lookup to the member that owns
/// the register, never to another member's server at the same address.
pub fn client_config(
    material: &TlsMaterial,
    expected_server: Option<(&str, Identity)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(material, expected_server, None)
}

/// Tells whether a certificate, named by the SHA-256 of its DER encoding, was
/// revoked. It is asked about every fingerprint of the server's certificate
/// (see [`CertificateFingerprints`]), so a re-encoded copy is refused too.
pub type RevocationCheck = Arc<dyn Fn(&[u8; 32]) -> bool + Send + Sync>;

/// [`client_config`] pinned to `expected` in `trust_domain`, also refusing a
/// server certificate that `is_revoked` names. A session resumed with this
/// config skips the check, so build a new config when revocations change.
pub fn pinned_client_config(
    material: &TlsMaterial,
    trust_domain: &str,
    expected: Identity,
    is_revoked: RevocationCheck,
) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(material, Some((trust_domain, expected)), Some(is_revoked))
}

fn build_client_config(
    material: &TlsMaterial,
    expected_server: Option<(&str, Identity)>,
    is_revoked: Option<RevocationCheck>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let pinned_register = is_revoked.is_some();
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for root in &material.roots {
        roots.add(root.clone())?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let pin = match expected_server {
        None => None,
        Some((trust_domain, expected)) => {
            if !is_valid_trust_domain(trust_domain) {
                return Err(TlsError::InvalidRequest(format!(
                    "trust domain {trust_domain:?} is invalid"
                )));
            }
            Some(ServerPin {
                trust_domain: trust_domain.to_owned(),
                expected,
                is_revoked: is_revoked.map(Revocations),
            })
        }
    };
    // Not actually dangerous: the verifier runs the full webpki check first.
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FederationServerVerifier { inner: webpki, pin }));
    let mut config = builder.with_client_auth_cert(material.chain.clone(), material.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    if pinned_register {
        // The relay's connections to registers: every one is verified in
        // full. A resumed session skips the certificate check, so it would
        // miss a revocation or an expiry since the session began; the relay
        // holds a few long-lived connections, so resuming saves nothing.
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// WebPKI server verification of a certificate the CA signed itself, plus,
/// when pinned, an exact SPIFFE identity match.
#[derive(Debug)]
struct FederationServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pin: Option<ServerPin>,
}

/// The one identity a server must have, and the certificates refused to it.
#[derive(Debug)]
struct ServerPin {
    trust_domain: String,
    expected: Identity,
    is_revoked: Option<Revocations>,
}

/// A [`RevocationCheck`] that `ServerPin` can derive `Debug` with.
struct Revocations(RevocationCheck);

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revocations")
    }
}

/// The server's certificate names the expected identity but was revoked.
#[derive(thiserror::Error)]
#[error("the certificate of {server} (sha256 {fingerprint}) was revoked by the federation admin")]
struct RevokedServer {
    server: String,
    fingerprint: String,
}

impl std::fmt::Debug for RevokedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The server's certificate is valid but names someone else.
#[derive(thiserror::Error)]
#[error("server is not {expected}: {found}")]
struct WrongServerIdentity {
    expected: String,
    found: String,
}

// rustls renders `CertificateError::Other` with `Debug`; make that the readable message.
impl std::fmt::Debug for WrongServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ServerCertVerifier for FederationServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // No intermediates, whatever the server sends: the federation CA signs
        // leaves and nothing else, and webpki does not enforce a trust
        // anchor's path length, so a CA:TRUE certificate it once signed could
        // otherwise mint the broker's or any register's identity.
        self.inner
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        let Some(pin) = &self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let found = match identity_of(&parsed, &pin.trust_domain) {
            Ok(identity) if identity == pin.expected => {
                let revoked = pin
                    .is_revoked
                    .as_ref()
                    .and_then(|r| CertificateFingerprints::of(end_entity).find(|f| (r.0)(f)));
                if let Some(fingerprint) = revoked {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(RevokedServer {
                            server: pin.expected.spiffe_uri(&pin.trust_domain),
                            fingerprint: fingerprint_hex(&fingerprint),
                        }),
                    ))));
                }
                return Ok(ServerCertVerified::assertion());
            }
            Ok(identity) => format!("its certificate names {}", identity.spiffe_uri(&pin.trust_domain)),
            Err(reason) => format!("its certificate has no usable identity ({reason})"),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(WrongServerIdentity {
                expected: pin.expected.spiffe_uri(&pin.trust_domain),
                found,
            }),
        ))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Connects a tonic channel to `url` (`https://host:port`) over mutual TLS, eagerly.
///
/// `connect_timeout` bounds TCP connect plus TLS handshake.
pub async fn connect_channel(
    url: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = endpoint(url, config, connect_timeout)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| TlsError::Connect {
            url: url.to_owned(),
            detail: error_chain(&e),
        })
}

/// Checks `url` is `https://host:port` (no path, no query) and parses it.
/// `url` as the origin `https://host:port` requests go to, or why it is not one.
pub fn https_origin(url: &str) -> Result<http::Uri, TlsError> {
    let bad = |reason: &str| TlsError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    if uri.authority().is_none() {
        return Err(bad("a host is required"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("give only https://host:port, without a path"));
    }
    Ok(uri)
}

fn endpoint(
    url: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<(Endpoint, MtlsConnector), TlsError> {
    let uri = https_origin(url)?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    // tonic refuses `https` URIs unless its own TLS is configured, so the endpoint dials
    // `http://` through our TLS connector while `origin` keeps `https` on the requests.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| TlsError::BadUrl {
            url: url.to_owned(),
            reason: error_chain(&e),
        })?
        .origin(uri.clone())
        .connect_timeout(connect_timeout)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    Ok((
        endpoint,
        MtlsConnector {
            tls: tokio_rustls::TlsConnector::from(config),
        },
    ))
}

/// Dials TCP and runs the TLS handshake, verifying the server against the URI host.
#[derive(Clone)]
struct MtlsConnector {
    tls: tokio_rustls::TlsConnector,
}

type MtlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for MtlsConnector {
    type Response = MtlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<MtlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move { Ok(TokioIo::new(dial(&tls, &uri).await?)) })
    }
}

async fn dial(
    tls: &tokio_rustls::TlsConnector,
    uri: &http::Uri,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let host = uri
        .host()
        .ok_or_else(|| invalid(format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let server_name =
        ServerName::try_from(host.clone()).map_err(|e| invalid(format!("{host:?} is not a valid server name: {e}")))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    tls.connect(server_name, tcp).await
}

/// Opens mutual-TLS connections to one `https://host:port` origin, for
/// callers that run their own HTTP/2 connection over them.
#[derive(Clone)]
pub struct Dialer {
    origin: http::Uri,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

impl Dialer {
    /// A dialer for `url` (`https://host:port`), presenting and verifying as `config` says.
    pub fn new(url: &str, config: Arc<ClientConfig>, connect_timeout: Duration) -> Result<Dialer, TlsError> {
        Ok(Dialer {
            origin: https_origin(url)?,
            tls: tokio_rustls::TlsConnector::from(config),
            connect_timeout,
        })
    }

    /// The origin requests go to (`https://host:port`).
    pub fn origin(&self) -> &http::Uri {
        &self.origin
    }

    /// TCP connect plus TLS handshake, within the connect timeout.
    pub async fn dial(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
        let failed = |detail: String| TlsError::Connect {
            url: self.origin.to_string(),
            detail,
        };
        match tokio::time::timeout(self.connect_timeout, dial(&self.tls, &self.origin)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(failed(error_chain(&e))),
            Err(_) => Err(failed(format!("no connection within {:?}", self.connect_timeout))),
        }
    }
}

/// An error with its causes, outermost first, skipping causes already quoted;
/// a TLS refusal of the server's certificate in plain words (see [`tls_refusal`]).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = describe(error);
    let mut source = error.source();
    while let Some(cause) = source {
        let message = describe(cause);
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// One error's own words: a rustls error (also inside the `io::Error` that
/// tokio-rustls wraps it in, whose `source` skips it) as [`tls_refusal`] says it.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    });
    match tls {
        Some(e) => tls_refusal(e),
        None => error.to_string(),
    }
}

/// A rustls error as a person reads it: its Display of a refused certificate
/// wraps our own reasons in `Other(OtherError(..))` and names a certificate
/// signed by another CA of the same name only as `BadSignature`.
fn tls_refusal(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            format!("the server's certificate was refused: {}", other.0)
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the server's certificate is not issued by this federation's CA (is the CA file the one the federation \
             uses now? a certificate signed through an intermediate CA is refused too)"
                .to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{CertificateAuthority, IssueSpec};

    /// The server-side verifier of `material`, pinned to `expected` or not.
    fn verifier(material: &TlsMaterial, expected: Option<Identity>) -> FederationServerVerifier {
        let mut roots = RootCertStore::empty();
        for root in &material.roots {
            roots.add(root.clone()).unwrap();
        }
        FederationServerVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
            pin: expected.map(|expected| ServerPin {
                trust_domain: "gov".into(),
                expected,
                is_revoked: None,
            }),
        }
    }

    /// A broker (or register) certificate minted through a sub-CA the
    /// federation CA signed is refused by clients, pinned or not, in words
    /// that say which CA is wrong.
    #[test]
    fn a_server_certificate_issued_through_an_intermediate_is_refused() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        let forged = crate::testing::through_intermediate(&ca, &IssueSpec::broker());
        let forged = TlsMaterial::from_pem(&ca.cert_pem(), &forged.cert_pem, &forged.key_pem).unwrap();
        let genuine = ca.issue(&IssueSpec::broker()).unwrap();
        let genuine = TlsMaterial::from_pem(&ca.cert_pem(), &genuine.cert_pem, &genuine.key_pem).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        for expected in [None, Some(Identity::Broker)] {
            let verifier = verifier(&genuine, expected);
            verifier
                .verify_server_cert(&genuine.chain[0], &[], &name, &[], UnixTime::now())
                .unwrap();
            let err = verifier
                .verify_server_cert(&forged.chain[0], &forged.chain[1..], &name, &[], UnixTime::now())
                .unwrap_err();
            assert_eq!(err, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
            assert!(tls_refusal(&err).contains("not issued by this federation's CA"));
        }
    }

    /// Our own reasons for refusing a server read as words, not as rustls'
    /// `Other(OtherError(..))`, also inside the `io::Error` tokio-rustls gives.
    #[test]
    fn a_refused_server_certificate_reads_plainly() {
        let refused = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(RevokedServer {
            server: "spiffe://gov/member/civil-status".into(),
            fingerprint: "ab".repeat(32),
        }))));
        let text = error_chain(&io::Error::new(io::ErrorKind::InvalidData, refused));
        assert_eq!(
            text,
            format!(
                "the server's certificate was refused: the certificate of spiffe://gov/member/civil-status (sha256 {}) \
                 was revoked by the federation admin",
                "ab".repeat(32)
            )
        );
        let foreign = rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        let text = error_chain(&io::Error::new(io::ErrorKind::InvalidData, foreign));
        assert!(text.contains("not issued by this federation's CA"), "{text}");
    }

    #[test]
    fn endpoint_urls_are_checked() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        let issued = ca.issue(&IssueSpec::member("m1")).unwrap();
        let material = TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        let config = client_config(&material, None).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        for bad in ["http://localhost:1", "localhost:1", "https://", "https://h:1/x", "::"] {
            assert!(
                matches!(
                    endpoint(bad, config.clone(), Duration::from_secs(1)),
                    Err(TlsError::BadUrl { .. })
                ),
                "{bad} should be refused"
            );
            assert!(
                matches!(
                    Dialer::new(bad, config.clone(), Duration::from_secs(1)),
                    Err(TlsError::BadUrl { .. })
                ),
                "{bad} should be refused by the dialer"
            );
        }
    }
}
