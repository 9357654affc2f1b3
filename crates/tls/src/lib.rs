//! Mutual TLS for every lienthong connection.
//!
//! * [`CertificateAuthority`], [`init_dir`], [`issue_member_in_dir`]: the federation PKI
//!   (ECDSA P-256, SPIFFE-style URI SANs `spiffe://<trust-domain>/member/<id>` and
//!   `spiffe://<trust-domain>/broker`).
//! * [`TlsMaterial`]: PEM loading; [`read_private_key`]: the rule every private key file
//!   read from disk meets (no access by other users; see [`GroupAccess`]).
//! * [`ServerTls`], [`incoming`], [`MtlsStream`], [`PeerInfo`]: the server side. Client
//!   certificates are requested but verified *after* the handshake, so a client with no
//!   certificate, a foreign certificate or an expired one still reaches the application,
//!   which answers `UNAUTHENTICATED` with a precise reason and audits the attempt. Handshake
//!   signatures are always checked, so nobody can present a certificate whose key they lack.
//! * [`client_auth_required_config`], [`read_trust_anchors`]: a server that refuses, in the
//!   handshake, any client without a certificate from given CAs (the metrics listener).
//! * [`client_config`], [`connect_channel`], [`Dialer`]: the client side, optionally
//!   pinned to the exact SPIFFE identity of the server.
//! * [`CertificateFingerprints`]: every SHA-256 fingerprint a certificate can be presented
//!   under (its ECDSA signature re-encoded too), for checking refusals and revocations.
//! * [`Coalesced`]: writes held until a flush, so an answer queued in steps leaves as one
//!   TLS record.
//!
//! Everything uses rustls' `ring` provider explicitly; no process-wide default is needed,
//! but [`install_crypto_provider`] is offered for other rustls users in the process.

mod client;
mod coalesce;
mod identity;
mod keyfile;
mod material;
mod pki;
mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::path::PathBuf;

pub use client::{
    Dialer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, RevocationCheck, client_config, connect_channel, https_origin,
    pinned_client_config,
};
pub use coalesce::Coalesced;
pub use identity::{
    AuthError, CertificateFingerprints, CertificateSummary, Identity, InvalidFingerprint, certificate_not_after,
    fingerprint_hex, is_valid_trust_domain, parse_fingerprint, sha256_fingerprint, summarize_pem,
};
pub use keyfile::{GroupAccess, KeyFileError, read_private_key};
pub use material::{TlsFiles, TlsMaterial, read_certificates, read_trust_anchors};
pub use pki::{
    CertificateAuthority, IssueSpec, IssuedCert, IssuedFiles, ReplacedCertificate, init_dir, init_dir_with_hosts,
    issue_broker_in_dir, issue_member_in_dir, trust_domain_from_ca_cert,
};
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use server::{
    AcceptOptions, FailureLog, MtlsStream, PeerInfo, Revalidation, ServerTls, UnauthenticatedLimits,
    client_auth_required_config, incoming, peer_info,
};

/// Installs rustls' `ring` provider as the process default; a no-op if one is installed.
pub fn install_crypto_provider() {
    // Err means some provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider every config in this crate is built with.
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Why certificate material could not be produced, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A private key that is not the key of the certificate beside it.
    #[error(
        "the private key in {} is not the key of the certificate in {}: give the key issued with that \
         certificate (`lienthong certs issue` writes `<member>.key` beside `<member>.pem`)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A certificate file holds no certificate.
    #[error("no PEM certificate found in {}", path.display())]
    NoCertificate {
        /// The file concerned.
        path: PathBuf,
    },
    /// PEM text (of a file its reader names) holds no usable certificate.
    #[error("{0}")]
    NotACertificate(String),
    /// A key file holds no private key.
    #[error("no PEM private key (PKCS#8, PKCS#1 or SEC1) found in {}", path.display())]
    NoKey {
        /// The file concerned.
        path: PathBuf,
    },
    /// A private key file is open to other users, or cannot be read.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// Keys would be written into a directory others may write in.
    #[error(
        "refusing to write keys into {}: its group or other users can write in it (mode {mode:04o}) and so replace \
         the keys or plant links where they are written; run `chmod go-w {}` or choose another directory",
        path.display(),
        path.display()
    )]
    InsecureDirectory {
        /// The directory concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file is not valid PEM, or holds something other than what was expected.
    #[error("{} is not usable: {reason}", path.display())]
    BadPem {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `init` would overwrite an existing CA key.
    #[error(
        "refusing to overwrite existing CA key {}; move it away first if you really want a new federation CA",
        path.display()
    )]
    AlreadyExists {
        /// The existing key file.
        path: PathBuf,
    },
    /// A trust domain, member id, host name or validity period is unacceptable.
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    /// rustls refused the material (e.g. key does not match certificate).
    #[error("tls configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built from the CA roots.
    #[error("cannot build certificate verifier from the CA roots: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rcgen failed to generate or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A URL given to the client is unusable.
    #[error("invalid endpoint url {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection or TLS handshake to a server failed.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL dialled.
        url: String,
        /// The error and its causes, outermost first.
        detail: String,
    },
}
