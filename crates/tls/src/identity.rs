//! SPIFFE-style identities carried in certificate URI SANs, and why a peer was refused.

use std::fmt;
use std::path::Path;

use num_bigint::BigUint;
use time::OffsetDateTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::TlsError;

const SCHEME: &str = "spiffe://";

/// Who is on the other end of a connection, as named by its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The federation broker: `spiffe://<trust-domain>/broker`.
    Broker,
    /// A member agency: `spiffe://<trust-domain>/member/<member-id>`.
    Member(String),
}

impl Identity {
    /// The URI SAN naming this identity in `trust_domain`.
    pub fn spiffe_uri(&self, trust_domain: &str) -> String {
        match self {
            Identity::Broker => format!("{SCHEME}{trust_domain}/broker"),
            Identity::Member(id) => format!("{SCHEME}{trust_domain}/member/{id}"),
        }
    }

    /// Parses a SPIFFE URI and requires it to belong to `trust_domain`.
    pub fn from_spiffe_uri(uri: &str, trust_domain: &str) -> Result<Identity, AuthError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| AuthError::BadIdentity(format!("{uri:?} is not a spiffe:// URI")))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain != trust_domain {
            return Err(AuthError::WrongTrustDomain {
                found: domain.to_owned(),
                expected: trust_domain.to_owned(),
            });
        }
        if path == "broker" {
            return Ok(Identity::Broker);
        }
        match path.strip_prefix("member/") {
            Some(id) if is_valid_member_id(id) => Ok(Identity::Member(id.to_owned())),
            _ => Err(AuthError::BadIdentity(format!(
                "{uri:?} names neither the broker nor a valid member"
            ))),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Broker => f.write_str("broker"),
            Identity::Member(id) => write!(f, "member {id}"),
        }
    }
}

/// Why a peer's certificate does not establish an identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client sent no certificate.
    #[error("no client certificate presented; connect with the member certificate issued by the federation CA")]
    NoCertificate,
    /// The certificate does not chain to the federation CA.
    #[error("client certificate is not issued by this federation's CA")]
    UnknownIssuer,
    /// The certificate has expired.
    #[error("client certificate expired at {not_after}")]
    Expired {
        /// RFC 3339 expiry time.
        not_after: String,
    },
    /// The certificate's validity period has not started.
    #[error("client certificate is not valid yet; check the clocks of client and server")]
    NotYetValid,
    /// The certificate is malformed or unusable for client authentication.
    #[error("client certificate is invalid: {0}")]
    BadCertificate(String),
    /// The certificate carries no `spiffe://` URI SAN.
    #[error("client certificate carries no spiffe:// identity (URI subject alternative name)")]
    NoSpiffeId,
    /// The identity belongs to another federation.
    #[error("client certificate belongs to trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// The trust domain in the certificate.
        found: String,
        /// This federation's trust domain.
        expected: String,
    },
    /// The identity is not a broker or member identity.
    #[error("client certificate identity is unusable: {0}")]
    BadIdentity(String),
}

/// Whether `id` is a member id as lienthong-core accepts it: `[a-z0-9][a-z0-9-]{1,62}`.
///
/// Kept in step with `lienthong_core::MemberId` so no certificate names an id the
/// registry could never hold, and so ids cannot smuggle `/`, `?` or `#` into a URI.
pub(crate) fn is_valid_member_id(id: &str) -> bool {
    (2..=63).contains(&id.len())
        && id
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'))
}

/// Whether `td` is a SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
pub fn is_valid_trust_domain(td: &str) -> bool {
    (1..=255).contains(&td.len())
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// The certificate's single `spiffe://` URI SAN, if any.
pub(crate) fn spiffe_uri<'a>(cert: &X509Certificate<'a>) -> Result<&'a str, AuthError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| AuthError::BadCertificate(format!("unreadable subject alternative name: {e}")))?;
    let mut uris = san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(AuthError::NoSpiffeId)?;
    // The SPIFFE X.509-SVID spec allows exactly one; two would make the identity ambiguous.
    if uris.next().is_some() {
        return Err(AuthError::BadIdentity(
            "certificate carries more than one spiffe:// URI".to_owned(),
        ));
    }
    Ok(first)
}

/// What a certificate says about itself, read without checking who signed it.
#[derive(Clone, Debug)]
pub struct CertificateSummary {
    /// The identity its SPIFFE ID names in the trust domain asked for.
    pub identity: Result<Identity, AuthError>,
    /// Its expiry.
    pub not_after: OffsetDateTime,
    /// SHA-256 of its DER encoding.
    pub sha256: [u8; 32],
    /// The fingerprints of every encoding of it a verifier accepts.
    pub fingerprints: CertificateFingerprints,
}

/// The expiry of a DER-encoded certificate; `None` if it does not parse.
pub fn certificate_not_after(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(parsed.validity().not_after.to_datetime())
}

/// The SHA-256 of a DER-encoded certificate: its fingerprint.
pub fn sha256_fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

/// The SHA-256 fingerprints one certificate can be presented under: the DER
/// as presented, then that of each other encoding a verifier accepts as the
/// same certificate. A refusal naming any of them names the certificate, so
/// check refused, revoked or otherwise shut-out certificates against all of
/// them, never against the presented one alone.
///
/// Why the other encodings are few, and all here. webpki (rustls) reads a
/// certificate as strict DER: minimal lengths, no trailing bytes, a signature
/// algorithm equal byte for byte to the one inside the signed
/// `tbsCertificate`, a BIT STRING with no unused bits. The `tbsCertificate`
/// (identity, key, validity) cannot change without the CA's key. That leaves
/// the signature value:
/// * ECDSA: (r, s) and (r, n − s) both verify (negating s negates the point
///   whose x-coordinate must equal r, and a point and its negation share
///   their x-coordinate), so anyone holding a certificate, with no key at all,
///   can re-encode it under a new fingerprint. ring reads `ECDSA-Sig-Value`
///   as strict DER with minimal INTEGERs and requires 1 ≤ s < n, so those two
///   are the only encodings. The curve is the issuer's, which the certificate
///   does not name: both curves ring verifies on (P-256, P-384) are tried; the
///   wrong one gives an encoding no verifier accepts, which is harmless here.
/// * Ed25519: ring refuses a non-canonical S (S ≥ L, RFC 8032 §5.1.7) and R is
///   fixed bytes: one encoding.
/// * RSA (PKCS#1 v1.5 and PSS): the signature is the integer below the
///   modulus, read as exactly the modulus's length in bytes: one encoding; a
///   different PSS signature needs the private key.
///
/// Operators keep naming a certificate by the fingerprint they know
/// (`openssl x509 -noout -fingerprint -sha256`, `lienthong certs fingerprint`):
/// whichever encoding they hashed, the presented one's fingerprints hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFingerprints {
    presented: [u8; 32],
    equivalent: Vec<[u8; 32]>,
}

impl CertificateFingerprints {
    /// The fingerprints of the DER-encoded certificate `der`. Bytes that are not
    /// an ECDSA-signed certificate have their own fingerprint only.
    pub fn of(der: &[u8]) -> Self {
        CertificateFingerprints {
            presented: sha256_fingerprint(der),
            equivalent: ecdsa_equivalents(der).iter().map(|d| sha256_fingerprint(d)).collect(),
        }
    }

    /// The fingerprint of the DER as presented.
    pub fn presented(&self) -> [u8; 32] {
        self.presented
    }

    /// Every fingerprint, the presented one first.
    pub fn iter(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.presented).chain(&self.equivalent)
    }

    /// Whether `fingerprint` names this certificate.
    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.iter().any(|f| f == fingerprint)
    }

    /// The first of these fingerprints `listed` holds: the one a list names
    /// this certificate by.
    pub fn find(&self, mut listed: impl FnMut(&[u8; 32]) -> bool) -> Option<[u8; 32]> {
        self.iter().find(|f| listed(f)).copied()
    }
}

/// The orders of the curves ring verifies ECDSA signatures on: P-256, P-384.
const ECDSA_ORDERS: [&[u8]; 2] = [
    &[
        0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xBC, 0xE6,
        0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
    ],
    &[
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xC7, 0x63, 0x4D, 0x81, 0xF4, 0x37, 0x2D, 0xDF, 0x58, 0x1A, 0x0D, 0xB2,
        0x48, 0xB0, 0xA7, 0x7A, 0xEC, 0xEC, 0x19, 0x6A, 0xCC, 0xC5, 0x29, 0x73,
    ],
];

/// `der` re-encoded (strict DER) with its ECDSA signature (r, s) replaced by
/// (r, n − s), for the order n of each curve s is below; nothing unless `der`
/// is a certificate signed with ECDSA.
fn ecdsa_equivalents(der: &[u8]) -> Vec<Vec<u8>> {
    let parts = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_der()?;
            let algorithm = r.next().read_der()?;
            let signature = r.next().read_bitvec_bytes()?;
            Ok((tbs, algorithm, signature))
        })
    });
    let Ok((tbs, algorithm, (signature, bits))) = parts else {
        return Vec::new();
    };
    // ecdsa-with-SHA224/256/384/512 (RFC 5758), parameters absent.
    let ecdsa = yasna::parse_der(&algorithm, |r| r.read_sequence(|r| r.next().read_oid()))
        .is_ok_and(|oid| matches!(oid.components().as_slice(), [1, 2, 840, 10045, 4, 3, 1..=4]));
    if !ecdsa || bits != 8 * signature.len() {
        return Vec::new();
    }
    let rs = yasna::parse_der(&signature, |r| {
        r.read_sequence(|r| Ok((r.next().read_bigint_bytes()?, r.next().read_bigint_bytes()?)))
    });
    let Ok(((r, true), (s, true))) = rs else {
        return Vec::new();
    };
    let s = BigUint::from_bytes_be(&s);
    ECDSA_ORDERS
        .iter()
        .map(|n| BigUint::from_bytes_be(n))
        .filter(|n| s > BigUint::ZERO && s < *n)
        .map(|n| {
            let negated = (n - &s).to_bytes_be();
            let signature = yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next().write_bigint_bytes(&r, true);
                    w.next().write_bigint_bytes(&negated, true);
                })
            });
            yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next().write_der(&tbs);
                    w.next().write_der(&algorithm);
                    w.next().write_bitvec_bytes(&signature, 8 * signature.len());
                })
            })
        })
        .collect()
}

/// A fingerprint as 64 lowercase hex digits, as `lienthong` prints it.
pub fn fingerprint_hex(fingerprint: &[u8; 32]) -> String {
    hex::encode(fingerprint)
}

/// Why a text is not a certificate fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a SHA-256 certificate fingerprint: give 64 hex digits, with or without colons \
     (`lienthong certs fingerprint CERT.pem` or `openssl x509 -noout -fingerprint -sha256 -in CERT.pem` prints it)"
)]
pub struct InvalidFingerprint(pub String);

/// Reads a SHA-256 certificate fingerprint: 64 hex digits in either case, as
/// `lienthong` prints them or, with colons between the bytes and an optional
/// `sha256 Fingerprint=` prefix, as OpenSSL does.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], InvalidFingerprint> {
    let trimmed = text.trim();
    let body = trimmed
        .rsplit_once('=')
        .map_or(trimmed, |(_, b)| b)
        .trim_start_matches("sha256:");
    let digits: String = body.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    match hex::decode_to_slice(&digits, &mut out) {
        Ok(()) => Ok(out),
        Err(_) => Err(InvalidFingerprint(text.chars().take(100).collect())),
    }
}

/// Reads the end-entity certificate of a PEM text (its first certificate).
///
/// Its errors name no file: the caller, who knows where the text came from, does.
pub fn summarize_pem(pem: &str, trust_domain: &str) -> Result<CertificateSummary, TlsError> {
    let path = Path::new("<certificate>");
    let certs = match crate::material::certs(pem, path) {
        Ok(certs) => certs,
        Err(TlsError::NoCertificate { .. }) if pem.contains("PRIVATE KEY-----") => {
            return Err(TlsError::NotACertificate(
                "it holds a private key, not a certificate (-----BEGIN CERTIFICATE-----): give the certificate \
                 (.pem) file, not the key"
                    .into(),
            ));
        }
        Err(TlsError::NoCertificate { .. }) => {
            return Err(TlsError::NotACertificate(
                "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        Err(TlsError::BadPem { reason, .. }) => return Err(TlsError::NotACertificate(reason)),
        Err(e) => return Err(e),
    };
    let der = certs
        .first()
        .ok_or_else(|| TlsError::NotACertificate("it holds no PEM certificate".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::NotACertificate(format!("not an X.509 certificate: {e}")))?;
    Ok(CertificateSummary {
        identity: identity_of(&parsed, trust_domain),
        not_after: parsed.validity().not_after.to_datetime(),
        sha256: sha256_fingerprint(der),
        fingerprints: CertificateFingerprints::of(der),
    })
}

/// The SPIFFE ID a certificate names, read without checking who signed it:
/// for the record of a refused certificate only, never as an identity. Only
/// a well-formed broker or member ID (of any trust domain) is returned, so
/// that the text is short and plain whatever the certificate holds.
pub(crate) fn claimed_spiffe_id(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    let uri = spiffe_uri(&parsed).ok()?;
    let domain = uri.strip_prefix(SCHEME)?.split('/').next()?;
    (is_valid_trust_domain(domain) && Identity::from_spiffe_uri(uri, domain).is_ok()).then(|| uri.to_owned())
}

/// The identity named by a certificate, required to be in `trust_domain`.
pub(crate) fn identity_of(cert: &X509Certificate<'_>, trust_domain: &str) -> Result<Identity, AuthError> {
    Identity::from_spiffe_uri(spiffe_uri(cert)?, trust_domain)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spiffe_uri_round_trips() {
        for id in [Identity::Broker, Identity::Member("tax-office".into())] {
            let uri = id.spiffe_uri("gov.example");
            assert_eq!(Identity::from_spiffe_uri(&uri, "gov.example"), Ok(id));
        }
        assert_eq!(Identity::Member("a1".into()).spiffe_uri("td"), "spiffe://td/member/a1");
    }

    #[test]
    fn refuses_foreign_or_malformed_uris() {
        assert_eq!(
            Identity::from_spiffe_uri("spiffe://other/member/abc", "gov"),
            Err(AuthError::WrongTrustDomain {
                found: "other".into(),
                expected: "gov".into()
            })
        );
        for bad in [
            "https://gov/member/abc",
            "spiffe://gov",
            "spiffe://gov/",
            "spiffe://gov/member/",
            "spiffe://gov/member/abc/def",
            "spiffe://gov/member/ABC",
            "spiffe://gov/member/-abc",
            "spiffe://gov/brokers",
            "spiffe://gov/admin",
        ] {
            assert!(
                matches!(Identity::from_spiffe_uri(bad, "gov"), Err(AuthError::BadIdentity(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn fingerprints_parse_as_openssl_and_lienthong_print_them() {
        let fp: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let plain = hex::encode(fp);
        let openssl = format!(
            "sha256 Fingerprint={}",
            fp.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
        );
        for text in [
            plain.clone(),
            plain.to_uppercase(),
            openssl,
            format!("sha256:{plain}"),
            format!(" {plain}\n"),
        ] {
            assert_eq!(parse_fingerprint(&text), Ok(fp), "{text}");
        }
        for bad in [
            "",
            "abc",
            &plain[..62],
            &format!("{plain}00"),
            &format!("g{}", &plain[1..]),
        ] {
            assert!(parse_fingerprint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summarizes_a_pem_certificate() {
        let ca = crate::CertificateAuthority::generate("gov").unwrap();
        let issued = ca.issue(&crate::IssueSpec::member("tax-office")).unwrap();
        let der = crate::TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
            .unwrap()
            .chain
            .remove(0);
        let summary = summarize_pem(&issued.cert_pem, "gov").unwrap();
        assert_eq!(summary.identity, Ok(Identity::Member("tax-office".into())));
        assert_eq!(summary.sha256, sha256_fingerprint(&der));
        assert!(summary.not_after > OffsetDateTime::now_utc());
        assert!(matches!(
            summarize_pem(&issued.cert_pem, "other").unwrap().identity,
            Err(AuthError::WrongTrustDomain { .. })
        ));
        assert!(matches!(summarize_pem("", "gov"), Err(TlsError::NotACertificate(_))));
        // `certs fingerprint m1.key` names the file itself; the text names none.
        let err = summarize_pem(&issued.key_pem, "gov").unwrap_err().to_string();
        assert!(err.contains("private key, not a certificate"), "{err}");
        assert!(!err.contains("<certificate>"), "{err}");
    }

    /// A CA of `trust_domain` signing with `alg`, loaded as an operator's own
    /// CA would be, and a server checking client certificates against it.
    fn ca_signing_with(
        alg: &'static rcgen::SignatureAlgorithm,
        dir: &Path,
    ) -> (crate::CertificateAuthority, crate::ServerTls) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://gov".try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        crate::keyfile::set_mode(&dir.join("ca.key"), 0o600);
        let ca = crate::CertificateAuthority::load(&dir.join("ca.pem"), &dir.join("ca.key"), "gov").unwrap();
        let server = ca.issue(&crate::IssueSpec::broker()).unwrap();
        let material = crate::TlsMaterial::from_pem(&ca.cert_pem(), &server.cert_pem, &server.key_pem).unwrap();
        let tls = crate::ServerTls::new(&material, "gov").unwrap();
        (ca, tls)
    }

    /// A member certificate `ca` issues, as DER.
    fn member_der(ca: &crate::CertificateAuthority) -> crate::CertificateDer<'static> {
        let issued = ca.issue(&crate::IssueSpec::member("tax-office")).unwrap();
        crate::material::certs(&issued.cert_pem, Path::new("<cert>"))
            .unwrap()
            .remove(0)
    }

    /// Whether the server takes `der` for member tax-office.
    fn accepted(tls: &crate::ServerTls, der: crate::CertificateDer<'static>) -> bool {
        tls.verify_peer(Some(&[der])).0 == Ok(Identity::Member("tax-office".into()))
    }

    /// The reviewer's attack: a refused certificate re-encoded with (r, n − s)
    /// under a new fingerprint still verifies as the member, and a refusal of
    /// the original still names it (and the other way round). Over many
    /// certificates, so that s and n − s of every length are met.
    #[test]
    fn a_certificate_with_its_signature_negated_keeps_its_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, tls) = ca_signing_with(&rcgen::PKCS_ECDSA_P256_SHA256, dir.path());
        for _ in 0..32 {
            let original = member_der(&ca);
            let malleated = crate::testing::with_negated_signature(&original);
            assert!(accepted(&tls, malleated.clone()), "the re-encoded certificate verifies");
            let (refused, presented) = (sha256_fingerprint(&original), sha256_fingerprint(&malleated));
            assert_ne!(refused, presented);
            let fingerprints = CertificateFingerprints::of(&malleated);
            assert_eq!(fingerprints.presented(), presented);
            assert!(fingerprints.contains(&refused));
            assert_eq!(fingerprints.find(|f| *f == refused), Some(refused));
            assert!(CertificateFingerprints::of(&original).contains(&presented));
        }
    }

    /// Whatever curve the CA signs on (an operator may bring a P-384 CA),
    /// the fingerprints hold exactly the encodings that verify: the
    /// presented one and one other.
    #[test]
    fn the_fingerprints_hold_every_encoding_that_verifies() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let dir = tempfile::tempdir().unwrap();
            let (ca, tls) = ca_signing_with(alg, dir.path());
            let der = member_der(&ca);
            let others = ecdsa_equivalents(&der);
            assert!(!others.is_empty() && others.len() <= 2, "{alg:?}");
            let verifying: Vec<_> = others
                .iter()
                .filter(|other| accepted(&tls, crate::CertificateDer::from(other.to_vec())))
                .collect();
            assert_eq!(verifying.len(), 1, "{alg:?}");
            assert_ne!(verifying[0], &der.to_vec());
            let fingerprints = CertificateFingerprints::of(verifying[0]);
            assert!(fingerprints.contains(&sha256_fingerprint(&der)), "{alg:?}");
        }
    }

    /// Ed25519 signatures have one encoding, and bytes that are no ECDSA
    /// certificate only their own fingerprint.
    #[test]
    fn other_certificates_have_their_own_fingerprint_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, tls) = ca_signing_with(&rcgen::PKCS_ED25519, dir.path());
        let der = member_der(&ca);
        assert!(accepted(&tls, der.clone()));
        let p256 = member_der(&crate::CertificateAuthority::generate("gov").unwrap());
        for bytes in [&der[..], &p256[..p256.len() - 1], b"", b"\x30\x03\x02\x01\x01"] {
            let fingerprints = CertificateFingerprints::of(bytes);
            assert_eq!(fingerprints.iter().collect::<Vec<_>>(), [&sha256_fingerprint(bytes)]);
        }
    }

    /// What a refused certificate claimed is read without its chain, and
    /// only as a well-formed SPIFFE ID.
    #[test]
    fn a_certificate_claim_is_read_without_trusting_it() {
        let foreign = crate::CertificateAuthority::generate("other.gov").unwrap();
        let der = member_der(&foreign);
        assert_eq!(
            claimed_spiffe_id(&der).as_deref(),
            Some("spiffe://other.gov/member/tax-office")
        );
        assert_eq!(claimed_spiffe_id(b"\x30\x03\x02\x01\x01"), None);
    }

    #[test]
    fn validates_names() {
        assert!(is_valid_member_id("tax-office-2"));
        assert!(!is_valid_member_id("x"));
        assert!(!is_valid_member_id("a/b"));
        assert!(is_valid_trust_domain("gov.example_1-x"));
        assert!(!is_valid_trust_domain(""));
        assert!(!is_valid_trust_domain("Gov"));
        assert!(!is_valid_trust_domain("gov/x"));
    }
}
