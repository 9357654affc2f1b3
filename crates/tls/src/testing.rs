//! For tests of refusals: a certificate re-encoded as someone holding only the
//! certificate can, to check that a refusal still catches it.
//!
//! Written apart from [`CertificateFingerprints`](crate::CertificateFingerprints)
//! (its own DER reading and writing, the P-256 order spelled out) so that a test
//! does not take the code it checks for the attacker's.

use num_bigint::BigUint;
use rustls_pki_types::CertificateDer;

/// A certificate for `spec` signed not by `ca` but by a sub-CA (CA:TRUE, no
/// path length limit) that `ca` signed: what a mistakenly issued or stolen
/// intermediate could mint. The PEM holds the leaf, then the sub-CA.
pub fn through_intermediate(ca: &crate::CertificateAuthority, spec: &crate::IssueSpec) -> crate::IssuedCert {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, SanType,
    };
    let sub_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a key");
    let mut sub = CertificateParams::new(Vec::<String>::new()).expect("params");
    sub.distinguished_name.push(rcgen::DnType::CommonName, "sub-CA");
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    sub.not_before = spec.not_before;
    sub.not_after = spec.not_after;
    let sub_cert = sub.signed_by(&sub_key, ca.issuer()).expect("the sub-CA");
    let sub_issuer = Issuer::new(sub, sub_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a key");
    let mut leaf = CertificateParams::new(spec.hosts.clone()).expect("params");
    leaf.subject_alt_names.push(SanType::URI(
        spec.identity.spiffe_uri(ca.trust_domain()).try_into().expect("a URI"),
    ));
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = spec.not_before;
    leaf.not_after = spec.not_after;
    let leaf_cert = leaf.signed_by(&leaf_key, &sub_issuer).expect("the leaf");
    crate::IssuedCert {
        cert_pem: format!("{}{}", leaf_cert.pem(), sub_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// The order n of P-256, the federation CA's curve.
const P256_ORDER: &str = "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551";

/// `cert`, signed by a P-256 CA, with its signature (r, s) replaced by the
/// equally valid (r, n − s): it chains to the same CA and names the same
/// identity, under another SHA-256 fingerprint. Panics on anything else.
pub fn with_negated_signature(cert: &CertificateDer<'_>) -> CertificateDer<'static> {
    let (certificate, rest) = read_tlv(cert, 0x30);
    assert!(rest.is_empty(), "bytes after the certificate");
    let (_tbs, after_tbs) = read_tlv(certificate, 0x30);
    let (_algorithm, after_algorithm) = read_tlv(after_tbs, 0x30);
    let (bits, rest) = read_tlv(after_algorithm, 0x03);
    assert!(rest.is_empty(), "bytes after the signature");
    let signed = &certificate[..certificate.len() - after_algorithm.len()];
    let (unused, value) = bits.split_first().expect("a BIT STRING");
    assert_eq!(*unused, 0, "unused bits in the signature");
    let (rs, rest) = read_tlv(value, 0x30);
    assert!(rest.is_empty(), "bytes after ECDSA-Sig-Value");
    let (r, rest) = read_tlv(rs, 0x02);
    let (s, rest) = read_tlv(rest, 0x02);
    assert!(rest.is_empty(), "bytes after s");
    let n = BigUint::parse_bytes(P256_ORDER.as_bytes(), 16).expect("the order");
    let negated = n - BigUint::from_bytes_be(s);
    let signature = tlv(0x30, &[tlv(0x02, r), integer(&negated)].concat());
    let bits = tlv(0x03, &[&[0][..], &signature].concat());
    let der = tlv(0x30, &[signed, &bits].concat());
    assert_ne!(der, cert.as_ref());
    CertificateDer::from(der)
}

/// The value of the TLV with tag `tag` at the start of `der`, and what follows it.
fn read_tlv(der: &[u8], tag: u8) -> (&[u8], &[u8]) {
    assert_eq!(der.first(), Some(&tag), "tag");
    let (len, start) = match der[1] {
        short if short < 0x80 => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7F);
            let len = der[2..2 + count].iter().fold(0, |n, b| (n << 8) | usize::from(*b));
            (len, 2 + count)
        }
    };
    (&der[start..start + len], &der[start + len..])
}

/// A DER TLV with the shortest length encoding.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let len = value.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// A positive DER INTEGER: no leading zero byte unless the high bit needs one.
fn integer(n: &BigUint) -> Vec<u8> {
    let mut bytes = n.to_bytes_be();
    if bytes[0] & 0x80 != 0 {
        bytes.insert(0, 0);
    }
    tlv(0x02, &bytes)
}
