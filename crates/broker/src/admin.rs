//! `Admin`: members, provider endpoints and grants. Every change is validated
//! in full before it is written, recorded in the audit log, published to the
//! other replicas, and visible to this broker's next request.

use crate::convert;
use crate::error::{BrokerError, Result};
use crate::state::{Broker, Caller};
use lienthong::v1 as pb;
use lienthong::v1::admin_server::Admin;
use lienthong_core::{Endpoint, Fingerprint, Grant, GrantFields, Member, MemberId, RevokedCertificate, Role};
use lienthong_store::{GrantQuery, GrantRevocation};
use lienthong_tls::CertificateFingerprints;
use std::future::Future;
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::{Request, Response, Status};

/// The Admin service.
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    /// Wraps the shared state.
    pub fn new(broker: Arc<Broker>) -> Self {
        AdminService { broker }
    }

    /// Authenticates an admin caller; a refusal is audited.
    async fn admin<T>(&self, request: &Request<T>, rpc: &str) -> std::result::Result<Caller, Status> {
        let caller = self.broker.authenticate(request, rpc).await?;
        if let Err(e) = caller.require(&[Role::Admin], "administer the federation") {
            self.broker.admin_refused(caller.id(), rpc, "", &e).await;
            return Err(e.into());
        }
        Ok(caller)
    }

    /// Runs one change; a failure is audited with the action and target.
    async fn change<T>(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        f: impl Future<Output = Result<T>>,
    ) -> std::result::Result<Response<T>, Status> {
        match f.await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                self.broker.admin_refused(caller.id(), action, target, &e).await;
                Err(e.into())
            }
        }
    }
}

/// `value` trimmed, when it is one line of 1 to `max` characters: a control
/// character would break the log lines it is shown in, and PostgreSQL's text
/// columns refuse NUL.
pub(crate) fn one_line<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > max {
        return Err(BrokerError::InvalidArgument(format!(
            "{field} is required (at most {max} characters)"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(BrokerError::InvalidArgument(format!(
            "{field} must be one line of text, without control characters"
        )));
    }
    Ok(value)
}

fn member_id(id: &str) -> Result<MemberId> {
    MemberId::new(id).map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}

fn roles(numbers: &[i32]) -> Result<Vec<Role>> {
    if numbers.is_empty() {
        return Err(BrokerError::InvalidArgument(
            "a member needs at least one role: admin, provider, consumer, integrator, auditor or subject-portal".into(),
        ));
    }
    let mut roles = Vec::with_capacity(numbers.len());
    for n in numbers {
        roles.push(
            convert::role_from_pb(*n)
                .ok_or_else(|| BrokerError::InvalidArgument(format!("role number {n} is not a valid role")))?,
        );
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// A legal-basis code such as `decree-47-2020/art-12`.
fn check_purpose(p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && p.len() <= 128
        && p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidArgument(format!(
            "purpose {:?} is not a legal-basis code: use lowercase letters, digits and . _ : / - (e.g. decree-47-2020/art-12)",
            crate::exchange::clip(p, 128)
        )))
    }
}

/// An endpoint URL the relay can dial: `https://host:port`, the host a DNS
/// name or an IP address (IPv6 in brackets), no user, path or query.
fn check_endpoint_url(url: &str) -> Result<()> {
    // A user name and password, or a token in a query or fragment, would be
    // a secret: the refusal goes back to the caller and into the permanent
    // audit log, so it does not repeat such a URL at all.
    if url.contains(['@', '?', '#']) {
        return Err(BrokerError::InvalidArgument(
            "endpoint url must be https://host:port, without a user name, password, query or fragment (the url \
             is not repeated here, as it may hold a secret: remove it from wherever it is kept); providers are \
             authenticated by their certificates"
                .into(),
        ));
    }
    let refuse = |why: &str| {
        Err(BrokerError::InvalidArgument(format!(
            "endpoint url {:?} {why}",
            crate::exchange::clip(url, 128)
        )))
    };
    if url.len() > 255 {
        return refuse("is longer than 255 characters");
    }
    if !url.starts_with("https://") {
        return refuse("must start with https:// (providers are called over mutual TLS)");
    }
    // The relay's own parse: what is accepted here is what it can dial.
    let Ok(uri) = lienthong_tls::https_origin(url) else {
        return refuse("must look like https://host:port");
    };
    let Some(authority) = uri.authority() else {
        return refuse("must look like https://host:port");
    };
    let host = authority.host();
    // An address no connection can go to (`0.0.0.0`, `::`), or a name no
    // resolver answers (an all-digit last label that is no IPv4 address, a
    // label with a leading or trailing hyphen), would only fail at the first
    // lookup routed to it.
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok_and(|a| !a.is_unspecified()),
        None if host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) =>
        {
            host.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| !a.is_unspecified() && !a.is_broadcast())
        }
        None => {
            !host.is_empty()
                && host.split('.').all(|label| {
                    (1..=63).contains(&label.len())
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
    };
    if !host_ok || authority.port_u16().is_none_or(|p| p == 0) {
        return refuse("must look like https://host:port (a DNS name or an IP address, an IPv6 one in brackets)");
    }
    Ok(())
}

/// The furthest ahead a grant may start.
const MAX_START_AHEAD: time::Duration = time::Duration::days(3653);

/// `t` as RFC 3339, as grants are shown.
fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A grant id as `CreateGrant` makes them: `g-` and 32 lowercase hex digits.
/// Anything else names no grant, and is not echoed whole.
fn check_grant_id(id: &str) -> Result<()> {
    let ok = id
        .strip_prefix("g-")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidArgument(format!(
            "id {:?} is not a grant id: grant ids are g- and 32 hex digits (`lienthong grant list` shows them)",
            crate::exchange::clip(id, 64)
        )))
    }
}

impl Broker {
    async fn add_member(&self, caller: &Caller, r: pb::AddMemberRequest) -> Result<pb::Member> {
        let id = member_id(&r.id)?;
        let name = one_line("display_name", &r.display_name, 200)?;
        let now = OffsetDateTime::now_utc();
        let m = Member {
            id,
            display_name: name.to_string(),
            roles: roles(&r.roles)?,
            enabled: true,
            disabled_reason: String::new(),
            created_at: now,
            updated_at: now,
        };
        self.store.insert_member(&m).await?;
        let roles: Vec<&str> = m.roles.iter().map(|r| r.as_str()).collect();
        self.applied(
            caller,
            "member.add",
            m.id.as_str(),
            Some(format!("roles={}", roles.join(","))),
        )
        .await?;
        Ok(convert::member(&m))
    }

    async fn set_enabled(&self, caller: &Caller, r: pb::SetMemberEnabledRequest, enabled: bool) -> Result<pb::Member> {
        let mut m = self
            .store
            .get_member(&r.id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("member {:?} is not registered", r.id)))?;
        if !enabled {
            one_line("the reason to disable a member", &r.reason, 500)?;
            if m.id.as_str() == caller.id() {
                return Err(BrokerError::FailedPrecondition(
                    "an admin cannot disable itself; ask another admin".into(),
                ));
            }
        }
        if m.enabled != enabled {
            m.enabled = enabled;
            m.disabled_reason = if enabled {
                String::new()
            } else {
                r.reason.trim().to_string()
            };
            m.updated_at = OffsetDateTime::now_utc();
            self.store.update_member(&m).await?;
            let action = if enabled { "member.enable" } else { "member.disable" };
            self.applied(
                caller,
                action,
                m.id.as_str(),
                (!enabled).then(|| m.disabled_reason.clone()),
            )
            .await?;
        }
        Ok(convert::member(&m))
    }

    /// Revokes a member certificate. `presented` holds the fingerprints of
    /// the certificate the call came with: an admin revoking it would lock
    /// itself out mid-way, so it is refused.
    async fn revoke_certificate(
        &self,
        caller: &Caller,
        r: pb::RevokeCertificateRequest,
        presented: Option<CertificateFingerprints>,
    ) -> Result<pb::RevokedCertificate> {
        let reason = one_line("the reason to revoke a certificate", &r.reason, 500)?;
        let given = (!r.fingerprint_sha256.trim().is_empty())
            .then(|| lienthong_tls::parse_fingerprint(&r.fingerprint_sha256).map(Fingerprint))
            .transpose()
            .map_err(|e| BrokerError::InvalidArgument(format!("fingerprint_sha256: {e}")))?;
        let named = (!r.member.is_empty()).then(|| member_id(&r.member)).transpose()?;
        let (fingerprint, member, not_after) = if r.certificate_pem.trim().is_empty() {
            let (Some(fingerprint), Some(member)) = (given, named) else {
                return Err(BrokerError::InvalidArgument(
                    "name the certificate: give certificate_pem, or fingerprint_sha256 with member".into(),
                ));
            };
            // The broker's own certificate and the CAs it trusts are never
            // checked as a member's: a revocation filed for them would be
            // reported done and refuse nothing (incident response would
            // believe a leaked broker key shut out). Any encoding counts.
            for (path, is_ca_file) in [(&self.config.tls.cert, false), (&self.config.tls.ca, true)] {
                let certificates = match lienthong_tls::read_certificates(path) {
                    Ok(certificates) => certificates,
                    Err(e) => {
                        // Revoking must not wait for a file moved since start.
                        tracing::warn!(error = %e, "cannot check a revocation against the broker's own certificates");
                        continue;
                    }
                };
                let Some(index) = certificates
                    .iter()
                    .position(|der| CertificateFingerprints::of(der).contains(&fingerprint.0))
                else {
                    continue;
                };
                return Err(BrokerError::FailedPrecondition(if is_ca_file || index > 0 {
                    format!(
                        "fingerprint_sha256 names a CA certificate ({}), which the broker does not check as a \
                         member's: to stop trusting a CA, remove it from tls.ca on every broker and register and \
                         restart them (see the deploy guide, \"Rotate certificates\")",
                        path.display()
                    )
                } else {
                    "fingerprint_sha256 names the broker's certificate, which the broker does not check: once the \
                     brokers present a new one, give its fingerprint (`lienthong certs fingerprint`) to every \
                     register to refuse (see the deploy guide, \"Rotate certificates\")"
                        .into()
                }));
            }
            // A typo in the member would file the revocation under nobody.
            if self.store.get_member(member.as_str()).await?.is_none() {
                return Err(BrokerError::NotFound(format!(
                    "member {member} is not registered; check the member id, or revoke by the certificate's PEM"
                )));
            }
            (fingerprint, member, None)
        } else {
            let cert = lienthong_tls::summarize_pem(&r.certificate_pem, &self.config.trust_domain)
                .map_err(|e| BrokerError::InvalidArgument(format!("certificate_pem: {e}")))?;
            let member = match cert.identity {
                Ok(lienthong_tls::Identity::Member(id)) => member_id(&id)?,
                Ok(lienthong_tls::Identity::Broker) => {
                    return Err(BrokerError::FailedPrecondition(
                        "certificate_pem is the broker's certificate, which the broker does not check: once \
                         the brokers present a new one, give its fingerprint (`lienthong certs fingerprint`) to \
                         every register to refuse (see the deploy guide, \"Rotate certificates\")"
                            .into(),
                    ));
                }
                Err(e) => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "certificate_pem does not name a member of this federation: {e}"
                    )));
                }
            };
            let fingerprint = Fingerprint(cert.sha256);
            if given.is_some_and(|g| g != fingerprint) {
                return Err(BrokerError::InvalidArgument(format!(
                    "fingerprint_sha256 is not the fingerprint of certificate_pem ({fingerprint}); give one of them"
                )));
            }
            if named.as_ref().is_some_and(|n| *n != member) {
                return Err(BrokerError::InvalidArgument(format!(
                    "certificate_pem belongs to member {member}, not {}",
                    r.member
                )));
            }
            // Revoked before under another encoding of the same certificate
            // (see `CertificateFingerprints`): already refused, so say so
            // rather than file it twice.
            let snapshot = self.snapshot();
            if let Some(first) = cert
                .fingerprints
                .iter()
                .find_map(|f| snapshot.revoked_certificate(&Fingerprint(*f)))
            {
                let alias = if first.fingerprint == fingerprint {
                    String::new()
                } else {
                    format!(
                        " under the fingerprint of another encoding of it, {}",
                        first.fingerprint
                    )
                };
                return Err(BrokerError::AlreadyExists(format!(
                    "certificate {fingerprint} of member {} was revoked already{alias}, by {}: {}",
                    first.member, first.revoked_by, first.reason
                )));
            }
            (fingerprint, member, Some(cert.not_after))
        };
        if presented.is_some_and(|p| p.contains(&fingerprint.0)) {
            return Err(BrokerError::FailedPrecondition(
                "this is the certificate this call was made with; revoke it from another admin certificate \
                 (`lienthong certs issue` makes one) so that you are not locked out"
                    .into(),
            ));
        }
        let revoked = RevokedCertificate {
            fingerprint,
            member,
            reason: reason.to_string(),
            not_after,
            revoked_at: OffsetDateTime::now_utc(),
            revoked_by: caller.member.id.clone(),
        };
        if let Err(e) = self.store.insert_revoked_certificate(&revoked).await {
            if let lienthong_store::StoreError::AlreadyExists { .. } = e
                && let Some(first) = self.snapshot().revoked_certificate(&fingerprint)
            {
                return Err(BrokerError::AlreadyExists(format!(
                    "certificate {fingerprint} of member {} was revoked already, by {}: {}",
                    first.member, first.revoked_by, first.reason
                )));
            }
            return Err(e.into());
        }
        self.applied(
            caller,
            "certificate.revoke",
            revoked.member.as_str(),
            Some(format!("sha256={fingerprint} reason={}", revoked.reason)),
        )
        .await?;
        Ok(convert::revoked_certificate(&revoked))
    }

    async fn add_endpoint(&self, caller: &Caller, r: pb::AddEndpointRequest) -> Result<pb::Endpoint> {
        let provider = member_id(&r.provider)?;
        match self.store.get_member(provider.as_str()).await? {
            None => return Err(BrokerError::NotFound(format!("member {provider} is not registered"))),
            Some(m) if !m.has_role(Role::Provider) => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "member {provider} does not hold the provider role"
                )));
            }
            Some(_) => {}
        }
        check_endpoint_url(&r.url)?;
        let e = Endpoint {
            id: format!("ep-{}", uuid::Uuid::new_v4().simple()),
            provider,
            url: r.url.trim_end_matches('/').to_string(),
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.insert_endpoint(&e).await?;
        self.applied(
            caller,
            "endpoint.add",
            &e.id,
            Some(format!("provider={} url={}", e.provider, e.url)),
        )
        .await?;
        Ok(convert::endpoint(&e))
    }

    async fn remove_endpoint(&self, caller: &Caller, r: pb::RemoveEndpointRequest) -> Result<pb::Endpoint> {
        let e = self.store.delete_endpoint(&r.id).await?;
        self.applied(
            caller,
            "endpoint.remove",
            &e.id,
            Some(format!("provider={} url={}", e.provider, e.url)),
        )
        .await?;
        Ok(convert::endpoint(&e))
    }

    async fn create_grant(&self, caller: &Caller, r: pb::CreateGrantRequest) -> Result<pb::Grant> {
        let consumer = member_id(&r.consumer)?;
        match self.store.get_member(consumer.as_str()).await? {
            None => {
                return Err(BrokerError::NotFound(format!(
                    "consumer {consumer} is not a registered member"
                )));
            }
            Some(m) if !m.has_role(Role::Consumer) => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "member {consumer} does not hold the consumer role; add it before granting access"
                )));
            }
            Some(_) => {}
        }
        let snapshot = self.snapshot();
        let rt = snapshot.record_type(&r.record_type, 0).ok_or_else(|| {
            BrokerError::NotFound(format!(
                "record type {:?} is not registered; register its schema first",
                r.record_type
            ))
        })?;
        let fields = if r.fields.iter().any(|f| f == "*") {
            if r.fields.len() > 1 {
                return Err(BrokerError::InvalidArgument(
                    "fields: `*` (every field) cannot be combined with other fields".into(),
                ));
            }
            GrantFields::All
        } else {
            if r.fields.is_empty() {
                return Err(BrokerError::InvalidArgument(
                    "fields: name at least one field as a JSON Pointer, or `*` for every field".into(),
                ));
            }
            for f in &r.fields {
                if !rt.has_field(f) {
                    return Err(BrokerError::InvalidArgument(format!(
                        "fields: record type {} v{} has no field {f:?}; its fields are {}",
                        rt.name(),
                        rt.version_number(),
                        rt.version.field_pointers.join(", ")
                    )));
                }
            }
            let mut p = r.fields.clone();
            p.sort();
            p.dedup();
            GrantFields::Pointers(p)
        };
        if r.purposes.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "purposes: name at least one legal basis (e.g. decree-47-2020/art-12); access is purpose-bound".into(),
            ));
        }
        for p in &r.purposes {
            check_purpose(p)?;
        }
        let mut purposes = r.purposes.clone();
        purposes.sort();
        purposes.dedup();
        let now = OffsetDateTime::now_utc();
        let valid_from = match &r.valid_from {
            Some(t) => convert::time_field("valid_from", t)?,
            None => now,
        };
        let valid_until = r
            .valid_until
            .as_ref()
            .map(|t| convert::time_field("valid_until", t))
            .transpose()?;
        // A grant born expired would list as a grant and allow nothing: a
        // typo in the year, most likely. Said before the order of the two
        // ends, which a grant without valid_from (now) would otherwise get.
        if let Some(until) = valid_until
            && until <= now
        {
            return Err(BrokerError::InvalidArgument(format!(
                "valid_until {} is already past; a grant must end in the future",
                rfc3339(until)
            )));
        }
        if let Some(until) = valid_until
            && until <= valid_from
        {
            return Err(BrokerError::InvalidArgument(format!(
                "valid_until {} must be after valid_from {}",
                rfc3339(until),
                rfc3339(valid_from)
            )));
        }
        // Nor does a grant that starts in centuries: the start is a typo,
        // and the grant would sit in every list allowing nothing.
        if valid_from > now + MAX_START_AHEAD {
            return Err(BrokerError::InvalidArgument(format!(
                "valid_from {} is more than 10 years ahead; check the year (a grant that is not due yet is \
                 better created nearer its start)",
                rfc3339(valid_from)
            )));
        }
        let g = Grant {
            id: format!("g-{}", uuid::Uuid::new_v4().simple()),
            consumer,
            record_type: rt.name().to_string(),
            fields,
            purposes,
            valid_from,
            valid_until,
            rate_limit_per_minute: r.rate_limit_per_minute,
            revoked_at: None,
            revoked_reason: String::new(),
            created_by: caller.member.id.clone(),
            created_at: now,
            reviewed_version: Some(rt.version_number()),
        };
        // A second grant allowing the same would have to be found and
        // revoked too to end the access: the first is named instead.
        if let Some(existing) = self.store.insert_grant_unless_repeated(&g, now).await? {
            return Err(BrokerError::AlreadyExists(format!(
                "grant {} already allows {} exactly this on {} (same fields, purposes, window, rate and reviewed \
                 version {}); nothing was created. Revoke {} first to replace it, or change what the new grant allows",
                existing.id,
                g.consumer,
                g.record_type,
                rt.version_number(),
                existing.id
            )));
        }
        let pb = convert::grant(&g);
        // Everything that decides what the grant allows, the window and the
        // version whose fields were reviewed included.
        let detail = format!(
            "consumer={} record_type={} reviewed_version={} fields={} purposes={} valid_from={} valid_until={} \
             rate_limit_per_minute={}",
            g.consumer,
            g.record_type,
            rt.version_number(),
            pb.fields.join(","),
            g.purposes.join(","),
            rfc3339(g.valid_from),
            g.valid_until.map_or_else(|| "unbounded".to_owned(), rfc3339),
            g.rate_limit_per_minute
        );
        self.applied(caller, "grant.create", &g.id, Some(detail)).await?;
        Ok(pb)
    }

    async fn revoke_grant(&self, caller: &Caller, r: pb::RevokeGrantRequest) -> Result<pb::Grant> {
        check_grant_id(&r.id)?;
        let reason = one_line("the reason to revoke a grant", &r.reason, 500)?;
        let g = match self
            .store
            .revoke_grant(&r.id, reason, OffsetDateTime::now_utc())
            .await?
        {
            GrantRevocation::Revoked(g) => g,
            GrantRevocation::AlreadyRevoked(g) => {
                let when = g.revoked_at.and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default();
                return Err(BrokerError::FailedPrecondition(format!(
                    "grant {} was already revoked at {when} ({}); nothing changed",
                    g.id, g.revoked_reason
                )));
            }
        };
        self.applied(caller, "grant.revoke", &g.id, Some(g.revoked_reason.clone()))
            .await?;
        Ok(convert::grant(&g))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> std::result::Result<Response<pb::Member>, Status> {
        let caller = self.admin(&request, "Admin.AddMember").await?;
        let r = request.into_inner();
        let target = r.id.clone();
        self.change(&caller, "member.add", &target, self.broker.add_member(&caller, r))
            .await
    }

    async fn get_member(
        &self,
        request: Request<pb::GetMemberRequest>,
    ) -> std::result::Result<Response<pb::Member>, Status> {
        self.admin(&request, "Admin.GetMember").await?;
        let id = &request.get_ref().id;
        // No such member can exist, and some such ids (a NUL) are not even
        // text PostgreSQL accepts: answered without asking the database.
        if lienthong_core::MemberId::new(id.as_str()).is_err() {
            return Err(BrokerError::NotFound(format!(
                "member {:?} is not registered (not a valid member id)",
                crate::exchange::clip(id, 128)
            ))
            .into());
        }
        // From the database, as every Admin read: this replica's snapshot may
        // be behind it (the admin is often checking that a change took).
        let m = self
            .broker
            .store
            .read_member(id)
            .await
            .map_err(BrokerError::from)?
            .ok_or_else(|| {
                BrokerError::NotFound(format!("member {:?} is not registered", crate::exchange::clip(id, 128)))
            })?;
        Ok(Response::new(convert::member(&m)))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> std::result::Result<Response<pb::ListMembersResponse>, Status> {
        self.admin(&request, "Admin.ListMembers").await?;
        // 0 lists every member; a number that is no role is a mistake, not
        // a filter matching nothing or everything.
        let number = request.get_ref().role;
        let role = convert::role_from_pb(number);
        if number != 0 && role.is_none() {
            return Err(BrokerError::InvalidArgument(format!("role number {number} is not a valid role")).into());
        }
        // In byte order of id, from the database (see GetMember).
        let members = self
            .broker
            .store
            .list_members()
            .await
            .map_err(BrokerError::from)?
            .iter()
            .filter(|m| role.is_none_or(|r| m.has_role(r)))
            .map(convert::member)
            .collect();
        Ok(Response::new(pb::ListMembersResponse { members }))
    }

    async fn disable_member(
        &self,
        request: Request<pb::SetMemberEnabledRequest>,
    ) -> std::result::Result<Response<pb::Member>, Status> {
        let caller = self.admin(&request, "Admin.DisableMember").await?;
        let r = request.into_inner();
        let target = r.id.clone();
        self.change(
            &caller,
            "member.disable",
            &target,
            self.broker.set_enabled(&caller, r, false),
        )
        .await
    }

    async fn enable_member(
        &self,
        request: Request<pb::SetMemberEnabledRequest>,
    ) -> std::result::Result<Response<pb::Member>, Status> {
        let caller = self.admin(&request, "Admin.EnableMember").await?;
        let r = request.into_inner();
        let target = r.id.clone();
        self.change(
            &caller,
            "member.enable",
            &target,
            self.broker.set_enabled(&caller, r, true),
        )
        .await
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> std::result::Result<Response<pb::RevokedCertificate>, Status> {
        let caller = self.admin(&request, "Admin.RevokeCertificate").await?;
        let presented = lienthong_tls::peer_info(&request).and_then(|p| p.fingerprints.clone());
        let r = request.into_inner();
        let target = [&r.member, &r.fingerprint_sha256]
            .into_iter()
            .find(|t| !t.is_empty())
            .map_or_else(|| "certificate_pem".to_string(), |t| t.clone());
        self.change(
            &caller,
            "certificate.revoke",
            &target,
            self.broker.revoke_certificate(&caller, r, presented),
        )
        .await
    }

    async fn list_revoked_certificates(
        &self,
        request: Request<pb::ListRevokedCertificatesRequest>,
    ) -> std::result::Result<Response<pb::ListRevokedCertificatesResponse>, Status> {
        self.admin(&request, "Admin.ListRevokedCertificates").await?;
        let member = &request.get_ref().member;
        let certificates = self
            .broker
            .store
            .list_revoked_certificates()
            .await
            .map_err(BrokerError::from)?
            .iter()
            .filter(|r| member.is_empty() || r.member.as_str() == member)
            .map(convert::revoked_certificate)
            .collect();
        Ok(Response::new(pb::ListRevokedCertificatesResponse { certificates }))
    }

    async fn add_endpoint(
        &self,
        request: Request<pb::AddEndpointRequest>,
    ) -> std::result::Result<Response<pb::Endpoint>, Status> {
        let caller = self.admin(&request, "Admin.AddEndpoint").await?;
        let r = request.into_inner();
        let target = r.provider.clone();
        self.change(&caller, "endpoint.add", &target, self.broker.add_endpoint(&caller, r))
            .await
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> std::result::Result<Response<pb::ListEndpointsResponse>, Status> {
        self.admin(&request, "Admin.ListEndpoints").await?;
        let provider = &request.get_ref().provider;
        let endpoints = self
            .broker
            .store
            .list_endpoints()
            .await
            .map_err(BrokerError::from)?
            .iter()
            .filter(|e| provider.is_empty() || e.provider.as_str() == provider)
            .map(convert::endpoint)
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn remove_endpoint(
        &self,
        request: Request<pb::RemoveEndpointRequest>,
    ) -> std::result::Result<Response<pb::Endpoint>, Status> {
        let caller = self.admin(&request, "Admin.RemoveEndpoint").await?;
        let r = request.into_inner();
        let target = r.id.clone();
        self.change(
            &caller,
            "endpoint.remove",
            &target,
            self.broker.remove_endpoint(&caller, r),
        )
        .await
    }

    async fn create_grant(
        &self,
        request: Request<pb::CreateGrantRequest>,
    ) -> std::result::Result<Response<pb::Grant>, Status> {
        let caller = self.admin(&request, "Admin.CreateGrant").await?;
        let r = request.into_inner();
        let target = format!("{}/{}", r.consumer, r.record_type);
        self.change(&caller, "grant.create", &target, self.broker.create_grant(&caller, r))
            .await
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> std::result::Result<Response<pb::ListGrantsResponse>, Status> {
        self.admin(&request, "Admin.ListGrants").await?;
        let r = request.into_inner();
        // A filter on no member would list nothing, which reads as "no
        // grants" rather than as the typo it is.
        if !r.consumer.is_empty() {
            let known = match MemberId::new(r.consumer.as_str()) {
                Ok(id) => self
                    .broker
                    .store
                    .read_member(id.as_str())
                    .await
                    .map_err(BrokerError::from)?
                    .is_some(),
                Err(_) => false,
            };
            if !known {
                return Err(BrokerError::NotFound(format!(
                    "consumer {:?} is not a registered member; `lienthong member list --role consumer` lists them",
                    crate::exchange::clip(&r.consumer, 64)
                ))
                .into());
            }
        }
        let query = GrantQuery {
            consumer: (!r.consumer.is_empty()).then_some(r.consumer),
            record_type: (!r.record_type.is_empty()).then_some(r.record_type),
        };
        let grants = self.broker.store.list_grants(&query).await.map_err(BrokerError::from)?;
        Ok(Response::new(pb::ListGrantsResponse {
            grants: grants.iter().map(convert::grant).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<pb::RevokeGrantRequest>,
    ) -> std::result::Result<Response<pb::Grant>, Status> {
        let caller = self.admin(&request, "Admin.RevokeGrant").await?;
        let r = request.into_inner();
        let target = r.id.clone();
        self.change(&caller, "grant.revoke", &target, self.broker.revoke_grant(&caller, r))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn purposes_and_urls() {
        assert!(check_purpose("decree-47-2020/art-12").is_ok());
        assert!(check_purpose("").is_err());
        assert!(check_purpose("Decree 47").is_err());
        assert!(check_endpoint_url("https://127.0.0.1:9001").is_ok());
        assert!(check_endpoint_url("http://127.0.0.1:9001").is_err());
        assert!(check_endpoint_url("https://host").is_err());
        assert!(check_endpoint_url("https://host:0").is_err());
        assert!(check_endpoint_url("https://[::1]:9001").is_ok());
        assert!(check_endpoint_url("https://civil.registry.gov.vn:443/").is_ok());
        assert!(check_endpoint_url("https://register-2.civil.gov.vn:443").is_ok());
        assert!(check_endpoint_url("https://10.0.0.7:9101").is_ok());
        for bad in [
            "https://::1:443",
            "https://a b:443",
            "https://u:p@h:443",
            "https://h:443/path",
            "https://h..x:443",
            "https://0.0.0.0:1",
            "https://[::]:1",
            "https://999.1.1.1:1",
            "https://1.2.3.4.5:1",
            "https://255.255.255.255:1",
            "https://-bad-:1",
            "https://civil.-registry.gov.vn:443",
        ] {
            assert!(check_endpoint_url(bad).is_err(), "{bad}");
        }
        // A password or token is never repeated, wherever the URL breaks the rules.
        for secret in [
            "https://user:Pa55word@127.0.0.1:7496",
            "https://127.0.0.1:7496?token=Pa55word",
            "https://127.0.0.1:7496/#Pa55word",
            "http://user:Pa55word@host:1",
            "user:Pa55word@host",
            "https://127.0.0.1:7496/x?password=Pa55word",
        ] {
            let err = check_endpoint_url(secret).unwrap_err().to_string();
            assert!(!err.contains("Pa55word"), "{err}");
            assert!(
                err.contains("without a user name, password, query or fragment"),
                "{err}"
            );
        }
        let long = format!("https://{}:443", "a".repeat(3000));
        let err = check_endpoint_url(&long).unwrap_err().to_string();
        assert!(err.contains("255") && err.len() < 400, "{err}");
    }

    #[test]
    fn grant_ids_are_checked_for_form_and_not_echoed_whole() {
        assert!(check_grant_id("g-0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "g-",
            "g-0123456789ABCDEF0123456789ABCDEF",
            "g-0123456789abcdef0123456789abcde",
            "x-0123456789abcdef0123456789abcdef",
            "g-0123456789abcdef0123456789abcdef\n",
        ] {
            assert!(check_grant_id(bad).is_err(), "{bad:?}");
        }
        let err = check_grant_id(&"g".repeat(5000)).unwrap_err().to_string();
        assert!(err.len() < 300 && err.contains("is not a grant id"), "{err}");
    }
}
