//! The register's own certificate, checked before it serves: one the broker
//! would refuse (another federation's, another member's, a client-only one,
//! an expired one) would otherwise have the register report serving while
//! every fetch fails at the broker's handshake.

use lienthong_tls::{Identity, ServerTls};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

/// Checks that `tls` serves a certificate the broker accepts from a register:
/// a member identity of `trust_domain` (`member`'s, when given), valid now,
/// for server authentication, naming the hosts it serves on. The error says
/// what is wrong and how to issue the right one.
pub(crate) fn check(tls: &ServerTls, trust_domain: &str, member: Option<&str>) -> Result<(), String> {
    judge(
        &tls.served_certificate(),
        trust_domain,
        member,
        OffsetDateTime::now_utc(),
    )
}

/// What a certificate lacks to serve as `member`'s register in `trust_domain` at `now`.
fn judge(der: &[u8], trust_domain: &str, member: Option<&str>, now: OffsetDateTime) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the register's certificate cannot be read: {e}"))?;
    let mut spiffe = None;
    let mut hosts = 0;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") && spiffe.is_none() => spiffe = Some(*uri),
                GeneralName::DNSName(_) | GeneralName::IPAddress(_) => hosts += 1,
                _ => {}
            }
        }
    }
    let issue = |id: &str| {
        format!(
            "issue the register's certificate with `lienthong certs issue --member {id} --host <the name the broker connects to>`"
        )
    };
    let Some(uri) = spiffe else {
        let wanted = member.unwrap_or("<member>");
        return Err(format!(
            "the register's certificate names no SPIFFE ID (spiffe://{trust_domain}/member/{wanted}); {}",
            issue(wanted)
        ));
    };
    // For the advice: the member it was meant for, if it names one.
    let named = uri.rsplit_once("/member/").map(|(_, id)| id);
    let wanted = member.or(named).unwrap_or("<member>");
    let id = match Identity::from_spiffe_uri(uri, trust_domain) {
        Ok(Identity::Member(id)) => id,
        Ok(Identity::Broker) => {
            return Err(format!(
                "the register's certificate is the broker's ({uri}), not a member's; {}",
                issue(wanted)
            ));
        }
        Err(lienthong_tls::AuthError::WrongTrustDomain { found, .. }) => {
            return Err(format!(
                "the register's certificate {uri} is of trust domain {found}, not {trust_domain}, the one this \
                 register is configured for: check the trust domain, or {}",
                issue(wanted)
            ));
        }
        Err(e) => {
            return Err(format!(
                "the register's certificate {uri} is not a member of trust domain {trust_domain}: {e}; {}",
                issue(wanted)
            ));
        }
    };
    if let Some(member) = member
        && member != id
    {
        return Err(format!(
            "the register's certificate is member {id}'s ({uri}), not {member}'s, whose register this is; {}",
            issue(member)
        ));
    }
    let server_auth = match cert.extended_key_usage() {
        Ok(Some(eku)) => eku.value.server_auth || eku.value.any,
        // No such extension: any use.
        Ok(None) => true,
        Err(_) => false,
    };
    if !server_auth || hosts == 0 {
        return Err(format!(
            "the register's certificate ({uri}) is a client certificate only (no host name{}), which the broker \
             refuses from a register; {}",
            if server_auth { "" } else { ", no serverAuth key usage" },
            issue(&id)
        ));
    }
    let validity = cert.validity();
    let (not_before, not_after) = (validity.not_before.to_datetime(), validity.not_after.to_datetime());
    if now < not_before {
        return Err(format!(
            "the register's certificate ({uri}) is valid only from {not_before}; check this machine's clock, or {}",
            issue(&id)
        ));
    }
    if now >= not_after {
        return Err(format!(
            "the register's certificate ({uri}) expired at {not_after}; {}",
            issue(&id)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lienthong_tls::{CertificateAuthority, IssueSpec, TlsMaterial};

    const TD: &str = "gov.test";

    fn served(ca: &CertificateAuthority, spec: &IssueSpec) -> ServerTls {
        let issued = ca.issue(spec).unwrap();
        let material = TlsMaterial::from_pem(&ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        ServerTls::new(&material, TD).unwrap()
    }

    #[test]
    fn a_register_certificate_the_broker_accepts_passes() {
        let ca = CertificateAuthority::generate(TD).unwrap();
        let tls = served(&ca, &IssueSpec::member("civil-status"));
        check(&tls, TD, None).unwrap();
        check(&tls, TD, Some("civil-status")).unwrap();
    }

    #[test]
    fn certificates_the_broker_would_refuse_are_refused_saying_how_to_issue_the_right_one() {
        let ca = CertificateAuthority::generate(TD).unwrap();
        let other = CertificateAuthority::generate("other.test").unwrap();
        let now = OffsetDateTime::now_utc();
        let expired = IssueSpec {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
            ..IssueSpec::member("civil-status")
        };
        for (tls, member, expect) in [
            (
                served(&ca, &IssueSpec::client("civil-status")),
                None,
                "client certificate only",
            ),
            (
                served(&other, &IssueSpec::member("civil-status")),
                None,
                "of trust domain other.test, not gov.test",
            ),
            (served(&ca, &IssueSpec::broker()), None, "the broker's"),
            (
                served(&ca, &IssueSpec::member("civil-status")),
                Some("land-registry"),
                "not land-registry's",
            ),
            (served(&ca, &expired), None, "expired"),
        ] {
            let error = check(&tls, TD, member).unwrap_err();
            assert!(error.contains(expect), "{expect}: {error}");
            let wanted = member.unwrap_or("civil-status");
            let fix = if expect == "the broker's" {
                "--member <member> --host".to_owned()
            } else {
                format!("--member {wanted} --host")
            };
            assert!(error.contains(&format!("lienthong certs issue {fix}")), "{error}");
        }
    }
}
