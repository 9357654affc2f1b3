//! SPIFFE-style identities carried in certificate URI SANs, and why a peer was refused.

use std::fmt;
use std::path::Path;

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
pub fn summarize_pem(pem: &str, trust_domain: &str) -> Result<CertificateSummary, TlsError> {
    let path = Path::new("<certificate>");
    let certs = crate::material::certs(pem, path)?;
    let der = certs
        .first()
        .ok_or_else(|| TlsError::NoCertificate { path: path.to_owned() })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadPem {
        path: path.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(CertificateSummary {
        identity: identity_of(&parsed, trust_domain),
        not_after: parsed.validity().not_after.to_datetime(),
        sha256: sha256_fingerprint(der),
    })
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
        assert!(matches!(summarize_pem("", "gov"), Err(TlsError::NoCertificate { .. })));
        assert!(summarize_pem(&issued.key_pem, "gov").is_err());
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
