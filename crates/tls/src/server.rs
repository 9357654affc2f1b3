//! Server side: TLS with deferred client verification, and a concurrent TLS accept stream.
//!
//! The TLS handshake asks for a client certificate but accepts any (or none), checking
//! only that the client holds the private key of what it presents. Right after the
//! handshake, [`ServerTls::verify_peer`] checks the chain against the federation CA and
//! reads the SPIFFE identity; the outcome travels with the connection as [`PeerInfo`]
//! so handlers can answer `UNAUTHENTICATED` with a precise reason and audit the attempt.
//! Handlers must therefore refuse every request whose [`PeerInfo::identity_now`] is an
//! `Err` (the identity, checked again when the CAs were replaced since).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::{
    AuthError, CertificateFingerprints, Identity, claimed_spiffe_id, identity_of, is_valid_trust_domain,
};
use crate::{Coalesced, TlsError, TlsMaterial, provider};

/// What the server learned about a connected client.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's TCP address.
    pub remote_addr: Option<SocketAddr>,
    /// The verified identity, or why there is none.
    pub identity: Result<Identity, AuthError>,
    /// Expiry of the presented certificate, when one could be parsed.
    pub not_after: Option<OffsetDateTime>,
    /// The fingerprints of the presented end-entity certificate, to check
    /// revocations against (all of them: see [`CertificateFingerprints`]);
    /// `None` when none was presented.
    pub fingerprints: Option<CertificateFingerprints>,
    /// The SPIFFE ID the presented certificate names, read whether or not it
    /// verified: what a refused certificate claimed to be, for the record.
    /// Unverified: never an identity (that is [`PeerInfo::identity`]).
    pub claimed: Option<String>,
    /// What [`PeerInfo::identity_now`] checks the certificate against again
    /// once the server's CAs were replaced; `None` when none was presented.
    pub revalidation: Option<Revalidation>,
}

/// The certificate a connection was accepted with, and the server's CAs as
/// they are now: a CA taken out of the bundle while the connection is open
/// vouches for it no more ([`PeerInfo::identity_now`]).
#[derive(Clone)]
pub struct Revalidation {
    current: Arc<ArcSwap<Loaded>>,
    trust_domain: Arc<str>,
    certificate: CertificateDer<'static>,
    /// The generation of the CAs the certificate last passed under.
    checked: Arc<AtomicU64>,
}

impl std::fmt::Debug for Revalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revalidation").finish_non_exhaustive()
    }
}

impl PeerInfo {
    /// [`PeerInfo::identity`] under the server's CAs as they are now: when
    /// they were replaced since the certificate was last checked, it is
    /// checked again (once per replacement while it passes), so that a
    /// connection opened under a CA since taken out of the bundle is refused
    /// at its next request rather than served for as long as it stays open.
    pub fn identity_now(&self) -> Result<Identity, AuthError> {
        let (Some(again), Ok(identity)) = (&self.revalidation, &self.identity) else {
            return self.identity.clone();
        };
        let loaded = again.current.load();
        if loaded.generation == again.checked.load(Ordering::Acquire) {
            return Ok(identity.clone());
        }
        match verify_with(
            &loaded,
            &again.trust_domain,
            Some(std::slice::from_ref(&again.certificate)),
        )
        .0
        {
            Ok(now) if now == *identity => {
                again.checked.store(loaded.generation, Ordering::Release);
                Ok(now)
            }
            Ok(_) => Err(AuthError::BadCertificate(
                "the certificate names another identity than when the connection was opened".into(),
            )),
            Err(e) => Err(e),
        }
    }
}

/// The peer of the connection a tonic request arrived on (set by [`incoming`]).
///
/// tonic copies the `Connected::ConnectInfo` of [`MtlsStream`] (an `Arc<PeerInfo>`) into
/// every request's extensions, so this is `req.extensions().get::<Arc<PeerInfo>>()`.
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<Arc<PeerInfo>> {
    req.extensions().get::<Arc<PeerInfo>>().cloned()
}

/// Offers client authentication but defers the chain check to [`ServerTls::verify_peer`].
///
/// Handshake signatures are still verified, so a client cannot present a certificate
/// without holding its private key.
#[derive(Debug)]
struct DeferredClientVerifier {
    root_hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deliberately deferred: see the module documentation.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl DeferredClientVerifier {
    fn new(roots: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root.clone())?;
        }
        Ok(DeferredClientVerifier {
            root_hints: store.subjects(),
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

/// Server TLS configuration plus the post-handshake client check.
///
/// The certificate, key and trusted CAs can be replaced while serving
/// ([`ServerTls::replace`]): connections accepted afterwards use the new ones;
/// those already open keep their TLS session, but their client's certificate
/// is checked against the new CAs at its next request
/// ([`PeerInfo::identity_now`]).
pub struct ServerTls {
    trust_domain: String,
    current: Arc<ArcSwap<Loaded>>,
}

/// What one set of TLS material makes of a server: its config, the CA check
/// of clients, and the certificate it presents.
#[derive(Clone)]
struct Loaded {
    config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    served: CertificateDer<'static>,
    /// How many times the material was replaced before this one.
    generation: u64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    fn new(material: &TlsMaterial) -> Result<Self, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for root in &material.roots {
            roots.add(root.clone())?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let deferred = DeferredClientVerifier::new(&material.roots)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(deferred))
            .with_single_cert(material.chain.clone(), material.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let served = material
            .chain
            .first()
            .cloned()
            .ok_or_else(|| TlsError::InvalidRequest("the certificate chain is empty".into()))?;
        Ok(Loaded {
            config: Arc::new(config),
            verifier,
            served,
            generation: 0,
        })
    }
}

impl ServerTls {
    /// Builds the server config (ALPN `h2`) from own chain/key, trusting `material.roots`
    /// for clients of `trust_domain`.
    pub fn new(material: &TlsMaterial, trust_domain: &str) -> Result<Self, TlsError> {
        if !is_valid_trust_domain(trust_domain) {
            return Err(TlsError::InvalidRequest(format!(
                "trust domain {trust_domain:?} is invalid"
            )));
        }
        Ok(ServerTls {
            trust_domain: trust_domain.to_owned(),
            current: Arc::new(ArcSwap::from_pointee(Loaded::new(material)?)),
        })
    }

    /// Serves what `newer` serves (own chain and key, trusted CAs) from the
    /// next connection on. The trust domain stays this one's.
    pub fn replace(&self, newer: ServerTls) {
        let newer = newer.current.load_full();
        self.current.rcu(|current| Loaded {
            generation: current.generation + 1,
            ..Loaded::clone(&newer)
        });
    }

    /// The end-entity certificate this server presents.
    pub fn served_certificate(&self) -> CertificateDer<'static> {
        self.current.load().served.clone()
    }

    /// The rustls config, for callers driving their own acceptor.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load().config.clone()
    }

    /// The trust domain clients must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Verifies a client's presented certificate (the first of `certs`) against the CA,
    /// now, and extracts its identity. Also returns the certificate's expiry when it
    /// is readable.
    ///
    /// Only a certificate a configured CA signed itself is accepted: whatever else the
    /// client sends is ignored. The federation CA signs leaves and nothing else, and
    /// webpki does not enforce a trust anchor's own path length, so a CA:TRUE
    /// certificate it once signed (by mistake, or an operator's own sub-CA) could
    /// otherwise mint any member's identity.
    pub fn verify_peer(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> (Result<Identity, AuthError>, Option<OffsetDateTime>) {
        verify_with(&self.current.load(), &self.trust_domain, certs)
    }

    fn peer_info(&self, stream: &tokio_rustls::server::TlsStream<TcpStream>) -> PeerInfo {
        let (tcp, conn) = stream.get_ref();
        let presented = conn.peer_certificates();
        let loaded = self.current.load_full();
        let (identity, not_after) = verify_with(&loaded, &self.trust_domain, presented);
        let end_entity = presented.and_then(|c| c.first());
        PeerInfo {
            remote_addr: tcp.peer_addr().ok(),
            identity,
            not_after,
            fingerprints: end_entity.map(|der| CertificateFingerprints::of(der)),
            claimed: end_entity.and_then(|der| claimed_spiffe_id(der)),
            revalidation: end_entity.map(|der| Revalidation {
                current: self.current.clone(),
                trust_domain: Arc::from(self.trust_domain.as_str()),
                certificate: der.clone().into_owned(),
                checked: Arc::new(AtomicU64::new(loaded.generation)),
            }),
        }
    }
}

/// [`ServerTls::verify_peer`] against one set of material.
fn verify_with(
    loaded: &Loaded,
    trust_domain: &str,
    certs: Option<&[CertificateDer<'_>]>,
) -> (Result<Identity, AuthError>, Option<OffsetDateTime>) {
    let Some(end_entity) = certs.and_then(|c| c.first()) else {
        return (Err(AuthError::NoCertificate), None);
    };
    let parsed = match x509_parser::parse_x509_certificate(end_entity) {
        Ok((_, parsed)) => parsed,
        Err(e) => return (Err(AuthError::BadCertificate(format!("unparsable: {e}"))), None),
    };
    let not_after = parsed.validity().not_after.to_datetime();
    let verified = loaded.verifier.verify_client_cert(end_entity, &[], UnixTime::now());
    let identity = match verified {
        Ok(_) => identity_of(&parsed, trust_domain),
        Err(e) => Err(auth_error(e, not_after)),
    };
    (identity, Some(not_after))
}

/// A server config that serves `chain`/`key` and *requires* a client certificate
/// chaining to `client_roots`, checked in the handshake: a client without one, or with
/// one from another CA (or expired), fails the handshake and never reaches the
/// application. Unlike [`ServerTls`] it asks for no SPIFFE identity, so the roots may be
/// a CA outside the federation (a monitoring CA). ALPN offers `alpn`.
pub fn client_auth_required_config(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    client_roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for root in client_roots {
        roots.add(root.clone())?;
    }
    // Mandatory unless `allow_unauthenticated()` is called, which it is not.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn auth_error(error: rustls::Error, not_after: OffsetDateTime) -> AuthError {
    let rustls::Error::InvalidCertificate(cert_error) = error else {
        return AuthError::BadCertificate(error.to_string());
    };
    match cert_error {
        // A bad signature on the certificate itself means it only pretends to be ours.
        CertificateError::UnknownIssuer | CertificateError::BadSignature => AuthError::UnknownIssuer,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => AuthError::Expired {
            not_after: not_after.format(&Rfc3339).unwrap_or_else(|_| not_after.to_string()),
        },
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => AuthError::NotYetValid,
        other => AuthError::BadCertificate(rustls::Error::InvalidCertificate(other).to_string()),
    }
}

/// Limits on TLS handshakes in progress.
#[derive(Clone, Copy, Debug)]
pub struct AcceptOptions {
    /// Handshakes running at once; further connections wait in the listen backlog.
    pub max_concurrent_handshakes: usize,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes running at once from one IP address; a connection past it
    /// is closed at once, so one host of silent connections cannot hold
    /// every slot for `handshake_timeout`.
    pub max_handshakes_per_address: usize,
    /// Bounds on connections whose client presented no certificate this
    /// server accepts (health probes, reflection); `None`: unbounded.
    pub unauthenticated: Option<UnauthenticatedLimits>,
}

/// How many connections without an accepted certificate may be open at
/// once, and for how long each. Without them, anyone who can reach the
/// port could hold connections of 1,024 streams each without end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnauthenticatedLimits {
    /// Open at once; a connection past it is closed after its handshake.
    pub max_connections: usize,
    /// Each is closed this long after its handshake: time enough for a
    /// health check or a reflection listing.
    pub lifetime: Duration,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        AcceptOptions {
            max_concurrent_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes_per_address: 32,
            unauthenticated: None,
        }
    }
}

/// Handshakes in progress by client address.
type AddressCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One handshake's place in its address's count, given back on drop.
struct AddressSlot {
    counts: AddressCounts,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    /// A slot for `ip`, or `None` when it already runs `max` handshakes.
    fn claim(counts: &AddressCounts, ip: std::net::IpAddr, max: usize) -> Option<AddressSlot> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let running = map.entry(ip).or_insert(0);
        if *running >= max {
            return None;
        }
        *running += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = map.get_mut(&self.ip) {
            *running -= 1;
            if *running == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A client connection whose TLS handshake completed; carries its [`PeerInfo`].
pub struct MtlsStream {
    inner: Coalesced<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: Arc<PeerInfo>,
    /// For a client without an accepted certificate: its place among such
    /// connections, and when the connection ends.
    unauthenticated: Option<Unauthenticated>,
}

/// A connection without an accepted certificate's bounds.
struct Unauthenticated {
    _place: tokio::sync::OwnedSemaphorePermit,
    ends: Pin<Box<tokio::time::Sleep>>,
}

impl MtlsStream {
    /// An error once an unauthenticated connection's time is up: its reads
    /// and writes fail, and the HTTP/2 server closes it.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        use std::future::Future;
        let bounds = self.unauthenticated.as_mut()?;
        bounds.ends.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "a connection without a client certificate is closed after its allotted time",
            )
        })
    }
}

impl std::fmt::Debug for MtlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl MtlsStream {
    /// Who the client is (or why that is unknown).
    pub fn peer(&self) -> &Arc<PeerInfo> {
        &self.peer
    }
}

impl tonic::transport::server::Connected for MtlsStream {
    type ConnectInfo = Arc<PeerInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts failures of one kind between warnings, so that a port scanner or
/// a client with the wrong certificate shows in the log without flooding it:
/// each failure is logged at `debug`, and at `warn` at most once a minute,
/// with the count since the last warning.
pub struct FailureLog {
    /// What failed and what to do about it, for the warning.
    what: &'static str,
    /// When the last warning was logged, and the failures since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// [`FailureLog`] warns at most this often.
const FAILURE_WARN_INTERVAL: Duration = Duration::from_secs(60);

impl FailureLog {
    /// A log of failures described as `what` (e.g. "tls handshakes failed").
    pub fn new(what: &'static str) -> FailureLog {
        FailureLog {
            what,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Notes one failure of a connection from `remote`; whether it was
    /// warned of.
    pub fn note(&self, remote: std::net::SocketAddr, error: &dyn std::fmt::Display) -> bool {
        tracing::debug!(%remote, %error, "{}", self.what);
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += 1;
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < FAILURE_WARN_INTERVAL)
        {
            return false;
        }
        tracing::warn!(
            %remote,
            %error,
            failed = state.1,
            "{} since the last such warning; for a minute, further ones are logged at debug only",
            self.what
        );
        *state = (Some(now), 0);
        true
    }
}

/// Accepts TCP connections on `listener` and yields those that complete a TLS handshake.
///
/// Handshakes run concurrently in their own tasks, at most
/// `options.max_concurrent_handshakes` at a time and each bounded by
/// `options.handshake_timeout`, so a slow or silent client cannot stall accepting. A failed
/// handshake is dropped and logged through a [`FailureLog`]. Only errors of the listener itself (e.g. out of file
/// descriptors) are yielded as `Err`; accepting then resumes after a short pause. Dropping
/// the stream stops accepting and closes the listener.
///
/// Must be called within a Tokio runtime. Use with
/// `tonic::transport::Server::builder()...serve_with_incoming_shutdown(incoming(..), signal)`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: AcceptOptions,
) -> impl Stream<Item = Result<MtlsStream, io::Error>> + Send + 'static {
    let max = options.max_concurrent_handshakes.max(1);
    let (tx, rx) = mpsc::channel(max);
    let options = AcceptOptions {
        max_concurrent_handshakes: max,
        max_handshakes_per_address: options.max_handshakes_per_address.max(1),
        ..options
    };
    tokio::spawn(accept_loop(listener, tls, options, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: AcceptOptions,
    tx: mpsc::Sender<Result<MtlsStream, io::Error>>,
) {
    let handshake_timeout = options.handshake_timeout;
    let permits = Arc::new(Semaphore::new(options.max_concurrent_handshakes));
    let unauthenticated = options.unauthenticated.map(|limits| {
        let max = limits.max_connections.max(1);
        (Arc::new(Semaphore::new(max)), limits.lifetime, max)
    });
    let turned_away = Arc::new(FailureLog::new(
        "connections without a client certificate closed: as many as allowed are open",
    ));
    let by_address: AddressCounts = Arc::default();
    let crowded = FailureLog::new("connections closed: too many tls handshakes from one address at once");
    let failed = Arc::new(FailureLog::new("tls handshakes failed or timed out"));
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted.map(|conn| (conn, permit)),
                },
                Err(_closed) => return,
            },
        };
        let ((tcp, remote), permit) = match accepted {
            Ok(conn) => conn,
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "connection failed before accept");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "tls listener cannot accept connections");
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                // Typically descriptor exhaustion: give in-flight connections time to finish.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = AddressSlot::claim(&by_address, remote.ip(), options.max_handshakes_per_address) else {
            crowded.note(
                remote,
                &format_args!("at most {} at once", options.max_handshakes_per_address),
            );
            continue;
        };
        // gRPC is latency-sensitive request/response traffic.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        // Taken per connection: the material may have been replaced since the last.
        let acceptor = TlsAcceptor::from(tls.config());
        let (tls, tx, failed) = (tls.clone(), tx.clone(), failed.clone());
        let (unauthenticated, turned_away) = (unauthenticated.clone(), turned_away.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
            drop(permit);
            drop(slot);
            match handshake {
                Ok(Ok(stream)) => {
                    let peer = Arc::new(tls.peer_info(&stream));
                    let mut bounds = None;
                    match &peer.identity {
                        Ok(identity) => tracing::debug!(%remote, %identity, "tls client connected"),
                        Err(reason) => {
                            tracing::debug!(%remote, %reason, "unauthenticated tls client connected");
                            if let Some((places, lifetime, max)) = unauthenticated {
                                let Ok(place) = places.try_acquire_owned() else {
                                    turned_away.note(remote, &format_args!("at most {max} at once"));
                                    return;
                                };
                                bounds = Some(Unauthenticated {
                                    _place: place,
                                    ends: Box::pin(tokio::time::sleep(lifetime)),
                                });
                            }
                        }
                    }
                    // Err means the server is shutting down; the connection is just dropped.
                    let _ = tx
                        .send(Ok(MtlsStream {
                            inner: Coalesced::new(stream),
                            peer,
                            unauthenticated: bounds,
                        }))
                        .await;
                }
                Ok(Err(e)) => {
                    failed.note(remote, &e);
                }
                Err(_elapsed) => {
                    failed.note(
                        remote,
                        &format_args!("timed out after {} ms", handshake_timeout.as_millis()),
                    );
                }
            }
        });
    }
}

/// Errors that concern one incoming connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A flood of failed handshakes (a port scanner) is one warning a minute,
    /// not a line each.
    #[test]
    fn failures_are_warned_of_once_a_minute() {
        let log = FailureLog::new("tls handshakes failed");
        let remote = "192.0.2.7:40000".parse().unwrap();
        assert!(log.note(remote, &"first"));
        assert!((0..200).all(|_| !log.note(remote, &"again")));
    }
    use crate::{CertificateAuthority, IssueSpec};

    fn material(ca: &CertificateAuthority, spec: &IssueSpec) -> TlsMaterial {
        let issued = ca.issue(spec).unwrap();
        TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    #[test]
    fn verify_peer_classifies_certificates() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        let server = ServerTls::new(&material(&ca, &IssueSpec::broker()), "gov").unwrap();

        let good = material(&ca, &IssueSpec::member("m1"));
        let (id, not_after) = server.verify_peer(Some(&good.chain));
        assert_eq!(id, Ok(Identity::Member("m1".into())));
        assert!(not_after.unwrap() > OffsetDateTime::now_utc());

        assert_eq!(server.verify_peer(None), (Err(AuthError::NoCertificate), None));
        assert_eq!(server.verify_peer(Some(&[])).0, Err(AuthError::NoCertificate));

        let other_ca = CertificateAuthority::generate("gov").unwrap();
        let foreign = material(&other_ca, &IssueSpec::member("m1"));
        assert_eq!(
            server.verify_peer(Some(&foreign.chain)).0,
            Err(AuthError::UnknownIssuer)
        );

        let mut expired = IssueSpec::member("m1");
        expired.not_before = time::macros::datetime!(2024-12-01 00:00:00 UTC);
        expired.not_after = time::macros::datetime!(2025-01-01 00:00:00 UTC);
        let expired = material(&ca, &expired);
        assert_eq!(
            server.verify_peer(Some(&expired.chain)).0,
            Err(AuthError::Expired {
                not_after: "2025-01-01T00:00:00Z".into()
            })
        );

        let mut future = IssueSpec::member("m1");
        future.not_before = OffsetDateTime::now_utc() + time::Duration::days(1);
        let future = material(&ca, &future);
        assert_eq!(server.verify_peer(Some(&future.chain)).0, Err(AuthError::NotYetValid));

        let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])];
        assert!(matches!(
            server.verify_peer(Some(&garbage)).0,
            Err(AuthError::BadCertificate(_))
        ));
    }

    /// The reviewer's attack: a sub-CA the federation CA signed (CA:TRUE, no
    /// path length) mints the admin's identity. Only leaves the CA signed
    /// itself are accepted, whatever chain comes with them; a CA roll (two CAs
    /// trusted) still accepts both CAs' leaves.
    #[test]
    fn a_certificate_issued_through_an_intermediate_is_refused() {
        let ca = CertificateAuthority::generate("gov").unwrap();
        let server = ServerTls::new(&material(&ca, &IssueSpec::broker()), "gov").unwrap();
        let forged = crate::testing::through_intermediate(&ca, &IssueSpec::member("federation-admin"));
        let forged = TlsMaterial::from_pem(&ca.cert_pem(), &forged.cert_pem, &forged.key_pem).unwrap();
        assert_eq!(forged.chain.len(), 2, "leaf and sub-CA");
        assert_eq!(server.verify_peer(Some(&forged.chain)).0, Err(AuthError::UnknownIssuer));
        // The sub-CA itself, as the leaf, is no member either.
        assert!(server.verify_peer(Some(&forged.chain[1..])).0.is_err());

        let next = CertificateAuthority::generate("gov").unwrap();
        let mut both = material(&ca, &IssueSpec::broker());
        both.roots.extend(material(&next, &IssueSpec::broker()).roots);
        let rolling = ServerTls::new(&both, "gov").unwrap();
        for issuer in [&ca, &next] {
            let member = material(issuer, &IssueSpec::member("m1"));
            assert_eq!(
                rolling.verify_peer(Some(&member.chain)).0,
                Ok(Identity::Member("m1".into()))
            );
        }
    }

    #[test]
    fn verify_peer_requires_the_trust_domain() {
        // Same CA key material, but the server expects another federation's identities.
        let ca = CertificateAuthority::generate("gov").unwrap();
        let server = ServerTls::new(&material(&ca, &IssueSpec::broker()), "other").unwrap();
        let member = material(&ca, &IssueSpec::member("m1"));
        assert_eq!(
            server.verify_peer(Some(&member.chain)).0,
            Err(AuthError::WrongTrustDomain {
                found: "gov".into(),
                expected: "other".into()
            })
        );
    }

    /// Runs a handshake in memory, the server then sending one byte: what each side saw.
    /// TLS 1.3 lets a client finish before the server has judged its certificate, so a
    /// refusal reaches the client as the alert in place of that byte.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Result<(), io::Error>, Result<u8, io::Error>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let serve = async move {
            let mut tls = TlsAcceptor::from(server).accept(a).await?;
            tls.write_all(b"!").await?;
            tls.flush().await
        };
        let dial = async move {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, b).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok(byte[0])
        };
        tokio::join!(serve, dial)
    }

    #[tokio::test]
    async fn a_required_client_certificate_is_checked_in_the_handshake() {
        let federation = CertificateAuthority::generate("gov").unwrap();
        let monitoring = CertificateAuthority::generate("monitoring").unwrap();
        let server_material = material(&federation, &IssueSpec::broker());
        let monitoring_roots = material(&monitoring, &IssueSpec::member("prometheus")).roots;
        let server = client_auth_required_config(
            &server_material.chain,
            &server_material.key,
            &monitoring_roots,
            &[b"http/1.1"],
        )
        .unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);

        // A client trusting the federation CA for the server, showing `identity`.
        let client = |identity: Option<TlsMaterial>| {
            let mut roots = RootCertStore::empty();
            roots.add(server_material.roots[0].clone()).unwrap();
            let builder = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
            Arc::new(match identity {
                Some(m) => builder.with_client_auth_cert(m.chain, m.key).unwrap(),
                None => builder.with_no_client_auth(),
            })
        };
        let scraper = material(&monitoring, &IssueSpec::member("prometheus"));
        let (served, read) = exchange(server.clone(), client(Some(scraper))).await;
        served.unwrap();
        assert_eq!(read.unwrap(), b'!');

        let (served, read) = exchange(server.clone(), client(None)).await;
        let served = served.unwrap_err().to_string();
        assert!(served.contains("peer sent no certificates"), "{served}");
        assert!(read.is_err());
        // A federation member is not a scraper unless the monitoring CA says so.
        let member = material(&federation, &IssueSpec::member("m1"));
        let (served, read) = exchange(server, client(Some(member))).await;
        let served = served.unwrap_err().to_string();
        assert!(served.contains("UnknownIssuer"), "{served}");
        assert!(read.is_err());
    }

    #[test]
    fn deferred_verifier_offers_but_defers_client_auth() {
        // Signature checking is exercised end to end in tests/mtls.rs (impersonation).
        let ca = CertificateAuthority::generate("gov").unwrap();
        let roots = material(&ca, &IssueSpec::broker()).roots;
        let verifier = DeferredClientVerifier::new(&roots).unwrap();
        assert!(verifier.offer_client_auth());
        assert!(!verifier.client_auth_mandatory());
        assert_eq!(verifier.root_hint_subjects().len(), 1);
        assert!(!verifier.supported_verify_schemes().is_empty());
        let other_ca = CertificateAuthority::generate("x").unwrap();
        let foreign = material(&other_ca, &IssueSpec::member("m1"));
        let deferred = verifier.verify_client_cert(&foreign.chain[0], &[], UnixTime::now());
        assert!(deferred.is_ok());
    }
}
