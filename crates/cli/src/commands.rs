//! Client subcommands: members, endpoints, grants, schemas, lookups, audit.

use crate::client::{ConnectArgs, shown, status_error};
use crate::federation::definition_from_json;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lienthong::v1 as pb;
use lienthong_audit::SignedTreeHead;
use lienthong_audit::merkle::{Hash, verify_consistency, verify_inclusion};
use lienthong_audit::verify::{ExportLine, VerifierState, VerifyError, VerifyReport, verify_entries};
use std::io::Write;
use std::path::PathBuf;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats a protobuf timestamp as RFC 3339.
pub fn format_ts(t: &prost_types::Timestamp) -> String {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn parse_time(s: &str) -> Result<prost_types::Timestamp> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .with_context(|| format!("{s:?} is not an RFC 3339 time like 2026-12-31T00:00:00Z"))?;
    Ok(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A time for `--json`: RFC 3339, `null` when none.
fn ts_json(t: Option<&prost_types::Timestamp>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| format_ts(t).into())
}

/// Prints `items` as `--json` wants them (one JSON array) or line by line.
fn print_all<T>(items: &[T], json: bool, as_json: impl Fn(&T) -> serde_json::Value, line: impl Fn(&T)) {
    if json {
        print_json(&items.iter().map(as_json).collect::<Vec<_>>());
    } else {
        items.iter().for_each(line);
    }
}

fn role_name(n: i32) -> String {
    pb::Role::try_from(n)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("ROLE_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| n.to_string())
}

fn parse_role(s: &str) -> Result<i32> {
    let r = lienthong_core::Role::parse(s).with_context(|| {
        format!("unknown role {s:?}: use admin, provider, consumer, integrator, auditor or subject-portal")
    })?;
    Ok(crate::convert_role(r) as i32)
}

// === members ===

/// `lienthong member ...`
#[derive(Debug, Subcommand)]
pub enum MemberCmd {
    /// Admit a member agency.
    Add {
        /// Member id (the `<member-id>` of its certificate).
        id: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Role (repeat for several): admin, provider, consumer, integrator, auditor, subject-portal.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Show one member.
    Get {
        /// Member id.
        id: String,
    },
    /// List members.
    List {
        /// Only members with this role.
        #[arg(long)]
        role: Option<String>,
    },
    /// Disable a member: its next request is refused.
    Disable {
        /// Member id.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Enable a disabled member.
    Enable {
        /// Member id.
        id: String,
    },
}

/// A member for `--json`.
fn member_json(m: &pb::Member) -> serde_json::Value {
    serde_json::json!({
        "id": m.id,
        "display_name": m.display_name,
        "roles": m.roles.iter().map(|r| role_name(*r)).collect::<Vec<_>>(),
        "enabled": m.enabled,
        "disabled_reason": m.disabled_reason,
        "created_at": ts_json(m.created_at.as_ref()),
        "updated_at": ts_json(m.updated_at.as_ref()),
    })
}

fn print_member(m: &pb::Member) {
    let roles: Vec<String> = m.roles.iter().map(|r| role_name(*r)).collect();
    let state = if m.enabled {
        "enabled".to_string()
    } else {
        format!("DISABLED ({})", shown(&m.disabled_reason))
    };
    println!(
        "{:<24} {:<16} {:<34} {}",
        shown(&m.id),
        state,
        roles.join(","),
        shown(&m.display_name)
    );
}

/// Runs a member command.
pub async fn member(conn: &ConnectArgs, cmd: MemberCmd, json: bool) -> Result<()> {
    let mut c = conn.connect().await?.admin();
    let print_member = |m: &pb::Member| {
        if json {
            print_json(&member_json(m));
        } else {
            print_member(m);
        }
    };
    match cmd {
        MemberCmd::Add { id, name, roles } => {
            let roles = roles.iter().map(|r| parse_role(r)).collect::<Result<Vec<_>>>()?;
            let m = c
                .add_member(pb::AddMemberRequest {
                    id,
                    display_name: name,
                    roles,
                })
                .await
                .map_err(status_error)?;
            print_member(m.get_ref());
        }
        MemberCmd::Get { id } => print_member(
            c.get_member(pb::GetMemberRequest { id })
                .await
                .map_err(status_error)?
                .get_ref(),
        ),
        MemberCmd::List { role } => {
            let role = role.map(|r| parse_role(&r)).transpose()?.unwrap_or(0);
            let members = c
                .list_members(pb::ListMembersRequest { role })
                .await
                .map_err(status_error)?
                .into_inner()
                .members;
            print_all(&members, json, member_json, self::print_member);
        }
        MemberCmd::Disable { id, reason } => print_member(
            c.disable_member(pb::SetMemberEnabledRequest { id, reason })
                .await
                .map_err(status_error)?
                .get_ref(),
        ),
        MemberCmd::Enable { id } => print_member(
            c.enable_member(pb::SetMemberEnabledRequest {
                id,
                reason: String::new(),
            })
            .await
            .map_err(status_error)?
            .get_ref(),
        ),
    }
    Ok(())
}

// === certificate revocation ===

/// `lienthong certs revoke`: which certificate, and why.
#[derive(Debug, Args)]
pub struct RevokeCertArgs {
    /// The certificate's PEM file (preferred: the broker reads the member and
    /// the expiry from it).
    #[arg(required_unless_present = "fingerprint", conflicts_with = "fingerprint")]
    pub file: Option<PathBuf>,
    /// Or its SHA-256 fingerprint (64 hex digits, colons allowed), with --member.
    #[arg(long, requires = "owner")]
    pub fingerprint: Option<String>,
    /// The member the certificate belongs to (required with --fingerprint).
    // Its own id: `member` is the global `--as`.
    #[arg(long = "member", id = "owner", value_name = "MEMBER")]
    pub member: Option<String>,
    /// Why: shown to whoever presents the certificate, and in the audit log.
    #[arg(long)]
    pub reason: String,
}

/// A revoked certificate for `--json`.
fn revoked_json(r: &pb::RevokedCertificate) -> serde_json::Value {
    serde_json::json!({
        "fingerprint_sha256": r.fingerprint_sha256,
        "member": r.member,
        "revoked_at": ts_json(r.revoked_at.as_ref()),
        "revoked_by": r.revoked_by,
        "not_after": ts_json(r.not_after.as_ref()),
        "reason": r.reason,
    })
}

fn print_revoked(r: &pb::RevokedCertificate) {
    let expires = r.not_after.as_ref().map(format_ts).unwrap_or_else(|| "-".into());
    println!(
        "{}  member {}  revoked {} by {}  expires {}  ({})",
        shown(&r.fingerprint_sha256),
        shown(&r.member),
        r.revoked_at.as_ref().map(format_ts).unwrap_or_default(),
        shown(&r.revoked_by),
        expires,
        shown(&r.reason)
    );
}

/// Revokes a member certificate at the broker.
pub async fn revoke_certificate(conn: &ConnectArgs, args: RevokeCertArgs, json: bool) -> Result<()> {
    let certificate_pem = match &args.file {
        Some(path) => certificate_blocks(path)?,
        None => String::new(),
    };
    let mut c = conn.connect().await?.admin();
    let revoked = c
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem,
            fingerprint_sha256: args.fingerprint.unwrap_or_default(),
            member: args.member.unwrap_or_default(),
            reason: args.reason,
        })
        .await
        .map_err(status_error)?;
    if json {
        print_json(&revoked_json(revoked.get_ref()));
    } else {
        print_revoked(revoked.get_ref());
    }
    Ok(())
}

/// The CERTIFICATE blocks of the PEM file `path`: all the broker is sent. A
/// file holding a private key is refused, the key left unsent and unprinted.
fn certificate_blocks(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut certificates = String::new();
    let mut in_certificate = false;
    for line in text.lines().map(str::trim) {
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            if label.contains("PRIVATE KEY") {
                bail!(
                    "{} holds a private key ({label}), which was not sent; give the certificate file instead \
                     (`<member>.pem`, not `<member>.key`), or --fingerprint with --member",
                    path.display()
                );
            }
            in_certificate = label == "CERTIFICATE";
        }
        if in_certificate {
            certificates.push_str(line);
            certificates.push('\n');
        }
        if line == "-----END CERTIFICATE-----" {
            in_certificate = false;
        }
    }
    if certificates.is_empty() {
        bail!("{} holds no certificate (-----BEGIN CERTIFICATE-----)", path.display());
    }
    // The broker reads the first; checked here so a wrong file fails before connecting.
    lienthong_tls::summarize_pem(&certificates, "").with_context(|| format!("{} is not usable", path.display()))?;
    Ok(certificates)
}

/// Lists revoked certificates, all or one member's.
pub async fn revoked_certificates(conn: &ConnectArgs, member: Option<String>, json: bool) -> Result<()> {
    let mut c = conn.connect().await?.admin();
    let certificates = c
        .list_revoked_certificates(pb::ListRevokedCertificatesRequest {
            member: member.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .certificates;
    print_all(&certificates, json, revoked_json, print_revoked);
    Ok(())
}

/// The SHA-256 fingerprint of a certificate file's first certificate.
pub fn certificate_fingerprint(path: &std::path::Path) -> Result<String> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // The trust domain only matters for the identity, which is not needed here.
    let summary =
        lienthong_tls::summarize_pem(&pem, "").with_context(|| format!("{} is not usable", path.display()))?;
    Ok(lienthong_core::Fingerprint(summary.sha256).to_string())
}

// === endpoints ===

/// `lienthong endpoint ...`
#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Register where a provider serves RecordProvider.
    Add {
        /// Provider member id.
        #[arg(long)]
        provider: String,
        /// `https://host:port`.
        #[arg(long)]
        url: String,
    },
    /// List endpoints.
    List {
        /// Only this provider's.
        #[arg(long, default_value = "")]
        provider: String,
    },
    /// Remove an endpoint.
    Remove {
        /// Endpoint id.
        id: String,
    },
}

/// Runs an endpoint command.
pub async fn endpoint(conn: &ConnectArgs, cmd: EndpointCmd, json: bool) -> Result<()> {
    let mut c = conn.connect().await?.admin();
    let as_json = |e: &pb::Endpoint| {
        serde_json::json!({
            "id": e.id,
            "provider": e.provider,
            "url": e.url,
            "created_at": ts_json(e.created_at.as_ref()),
        })
    };
    let line = |e: &pb::Endpoint| println!("{:<40} {:<20} {}", shown(&e.id), shown(&e.provider), shown(&e.url));
    let show = |e: &pb::Endpoint| {
        if json {
            print_json(&as_json(e));
        } else {
            line(e);
        }
    };
    match cmd {
        EndpointCmd::Add { provider, url } => show(
            c.add_endpoint(pb::AddEndpointRequest { provider, url })
                .await
                .map_err(status_error)?
                .get_ref(),
        ),
        EndpointCmd::List { provider } => {
            let endpoints = c
                .list_endpoints(pb::ListEndpointsRequest { provider })
                .await
                .map_err(status_error)?
                .into_inner()
                .endpoints;
            print_all(&endpoints, json, as_json, line);
        }
        EndpointCmd::Remove { id } => show(
            c.remove_endpoint(pb::RemoveEndpointRequest { id })
                .await
                .map_err(status_error)?
                .get_ref(),
        ),
    }
    Ok(())
}

// === grants ===

/// `lienthong grant ...`
#[derive(Debug, Subcommand)]
pub enum GrantCmd {
    /// Let a consumer read fields of a record type for given purposes.
    Create {
        /// Consumer member id.
        #[arg(long)]
        consumer: String,
        /// Record type, e.g. civil_status.birth_record.
        #[arg(long = "type")]
        record_type: String,
        /// Field as a JSON Pointer (repeat), or `*` for every field; a parent
        /// covers the fields declared under it. Both as the newest version
        /// declares them now: fields a later version adds need a new grant.
        #[arg(long = "field", required = true)]
        fields: Vec<String>,
        /// Legal-basis code (repeat), e.g. decree-47-2020/art-12.
        #[arg(long = "purpose", required = true)]
        purposes: Vec<String>,
        /// Start of validity (RFC 3339); now when omitted.
        #[arg(long)]
        from: Option<String>,
        /// End of validity (RFC 3339); none when omitted.
        #[arg(long)]
        until: Option<String>,
        /// Lookups per minute the consumer may make under this grant. Required,
        /// unless --unlimited says, deliberately, that there is no limit.
        #[arg(long, required_unless_present = "unlimited", conflicts_with = "unlimited", value_parser = per_minute)]
        rate: Option<u32>,
        /// No rate limit at all (recorded in the grant and its audit entry).
        #[arg(long)]
        unlimited: bool,
    },
    /// List grants (revoked and expired included).
    List {
        /// Only this consumer's.
        #[arg(long, default_value = "")]
        consumer: String,
        /// Only on this record type.
        #[arg(long = "type", default_value = "")]
        record_type: String,
    },
    /// Revoke a grant.
    Revoke {
        /// Grant id.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// `--rate`: lookups per minute, at least one.
fn per_minute(text: &str) -> std::result::Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err("0 lookups a minute would allow none; give at least 1, or --unlimited for no limit".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "{text:?} is not a number of lookups per minute (1 to {})",
            u32::MAX
        )),
    }
}

/// What a grant allows at `now`, as the broker decides a lookup under it:
/// (a word for `--json`, the words for a person). A grant whose consumer
/// is disabled allows nothing, however valid it is: the consumer's calls
/// are refused before any grant is looked at.
fn grant_state(g: &pb::Grant, now: &prost_types::Timestamp, consumer: Option<&pb::Member>) -> (&'static str, String) {
    let before = |a: &prost_types::Timestamp, b: &prost_types::Timestamp| (a.seconds, a.nanos) < (b.seconds, b.nanos);
    if let Some(at) = &g.revoked_at {
        return (
            "revoked",
            format!("REVOKED at {} ({})", format_ts(at), shown(&g.revoked_reason)),
        );
    }
    let (word, text) = if let Some(until) = g.valid_until.as_ref().filter(|u| !before(now, u)) {
        ("expired", format!("EXPIRED (at {})", format_ts(until)))
    } else if let Some(from) = g.valid_from.as_ref().filter(|f| before(now, f)) {
        ("not_yet_valid", format!("NOT YET VALID (from {})", format_ts(from)))
    } else {
        ("active", "active".to_owned())
    };
    match consumer.filter(|m| !m.enabled) {
        Some(m) if word == "active" => (
            "consumer_disabled",
            format!(
                "CONSUMER DISABLED ({}): allows nothing while the member is disabled",
                shown(&m.disabled_reason)
            ),
        ),
        Some(m) => (
            word,
            format!("{text}; consumer disabled ({})", shown(&m.disabled_reason)),
        ),
        None => (word, text),
    }
}

fn print_grant(g: &pb::Grant, consumer: Option<&pb::Member>) {
    let (_, state) = grant_state(g, &prost_types::Timestamp::from(std::time::SystemTime::now()), consumer);
    let from = g.valid_from.as_ref().map(format_ts).unwrap_or_else(|| "-".into());
    let until = g.valid_until.as_ref().map(format_ts).unwrap_or_else(|| "-".into());
    let created = g.created_at.as_ref().map(format_ts).unwrap_or_else(|| "-".into());
    let rate = match g.rate_limit_per_minute {
        0 => "rate unlimited".to_owned(),
        n => format!("rate {n}/min"),
    };
    // The version whose declared fields the grant covers.
    let version = match g.reviewed_version {
        0 => String::new(),
        v => format!(" v{v}"),
    };
    println!(
        "{}  {} -> {}{version}  fields [{}]  purposes [{}]  from {from}  until {until}  {rate}  created {created} by {}  {state}",
        shown(&g.id),
        shown(&g.consumer),
        shown(&g.record_type),
        shown(&g.fields.join(", ")),
        shown(&g.purposes.join(", ")),
        shown(&g.created_by),
    );
}

/// A grant for `--json`: every field, times in RFC 3339 (`null` when none),
/// and what it allows now.
fn grant_json(g: &pb::Grant, consumer: Option<&pb::Member>) -> serde_json::Value {
    let (state, _) = grant_state(g, &prost_types::Timestamp::from(std::time::SystemTime::now()), consumer);
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(format_ts);
    serde_json::json!({
        "id": g.id,
        "consumer": g.consumer,
        "consumer_enabled": consumer.map(|m| m.enabled),
        "record_type": g.record_type,
        "reviewed_version": g.reviewed_version,
        "fields": g.fields,
        "purposes": g.purposes,
        "valid_from": time(&g.valid_from),
        "valid_until": time(&g.valid_until),
        "rate_limit_per_minute": g.rate_limit_per_minute,
        "state": state,
        "revoked_at": time(&g.revoked_at),
        "revoked_reason": g.revoked_reason,
        "created_by": g.created_by,
        "created_at": time(&g.created_at),
    })
}

/// Runs a grant command; `json` prints grants as JSON (a list as an array).
pub async fn grant(conn: &ConnectArgs, cmd: GrantCmd, json: bool) -> Result<()> {
    let mut c = conn.connect().await?.admin();
    let grants = match cmd {
        GrantCmd::Create {
            consumer,
            record_type,
            fields,
            purposes,
            from,
            until,
            rate,
            unlimited: _,
        } => {
            let g = c
                .create_grant(pb::CreateGrantRequest {
                    consumer,
                    record_type,
                    fields,
                    purposes,
                    valid_from: from.as_deref().map(parse_time).transpose()?,
                    valid_until: until.as_deref().map(parse_time).transpose()?,
                    // 0: no limit, which only --unlimited can ask for.
                    rate_limit_per_minute: rate.unwrap_or(0),
                })
                .await
                .map_err(status_error)?;
            vec![g.into_inner()]
        }
        GrantCmd::List { consumer, record_type } => {
            let grants = c
                .list_grants(pb::ListGrantsRequest { consumer, record_type })
                .await
                .map_err(status_error)?
                .into_inner()
                .grants;
            let members = consumers(&mut c).await?;
            if json {
                let list: Vec<_> = grants.iter().map(|g| grant_json(g, members.get(&g.consumer))).collect();
                print_json(&list);
            } else {
                for g in &grants {
                    print_grant(g, members.get(&g.consumer));
                }
            }
            return Ok(());
        }
        GrantCmd::Revoke { id, reason } => vec![
            c.revoke_grant(pb::RevokeGrantRequest { id, reason })
                .await
                .map_err(status_error)?
                .into_inner(),
        ],
    };
    let members = consumers(&mut c).await?;
    for g in &grants {
        if json {
            print_json(&grant_json(g, members.get(&g.consumer)));
        } else {
            print_grant(g, members.get(&g.consumer));
        }
    }
    Ok(())
}

/// The federation's consumers by id, for what their grants allow.
async fn consumers(
    c: &mut lienthong::v1::admin_client::AdminClient<tonic::transport::Channel>,
) -> Result<std::collections::HashMap<String, pb::Member>> {
    Ok(c.list_members(pb::ListMembersRequest {
        role: pb::Role::Consumer as i32,
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .members
    .into_iter()
    .map(|m| (m.id.clone(), m))
    .collect())
}

// === schemas ===

/// `lienthong schema ...`
#[derive(Debug, Subcommand)]
pub enum SchemaCmd {
    /// Register a record type (or its next version) from a JSON file with
    /// name, description, owner, subject_key, query_schema and record_schema.
    Register {
        /// The record type file.
        #[arg(long)]
        file: PathBuf,
        /// Skip the backward-compatibility check (admins only; recorded).
        #[arg(long)]
        no_compatibility: bool,
    },
    /// List record types (newest version of each).
    List {
        /// Only this owner's.
        #[arg(long, default_value = "")]
        owner: String,
    },
    /// Show one record type version with its schemas.
    Show {
        /// Record type.
        name: String,
        /// Version; newest active when omitted.
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Check whether a file could be registered as the next version, listing every breaking change.
    Check {
        /// The record type file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Deprecate a version.
    Deprecate {
        /// Record type.
        name: String,
        /// Version.
        #[arg(long)]
        version: u32,
        /// Why and what to use instead.
        #[arg(long)]
        note: String,
    },
}

type SchemaClient = lienthong::v1::schema_registry_client::SchemaRegistryClient<tonic::transport::Channel>;

/// Tells, on standard error, which record properties version `next` of
/// `name` requires that version `previous` did not: compatible for
/// consumers, but from then on every answer of the register must hold them,
/// and lookups that pin no version use the newest at once. Best effort: a
/// failure to fetch the previous version says nothing.
async fn note_newly_required(
    c: &mut SchemaClient,
    name: &str,
    previous: u32,
    record_schema: &str,
    next: u32,
    registered: bool,
) {
    let Ok(before) = c
        .get(pb::GetRecordTypeRequest {
            name: name.to_owned(),
            version: previous,
        })
        .await
    else {
        return;
    };
    let before = before.into_inner().definition.unwrap_or_default();
    let (Ok(before), Ok(after)) = (
        serde_json::from_str::<serde_json::Value>(&before.record_schema_json),
        serde_json::from_str::<serde_json::Value>(record_schema),
    ) else {
        return;
    };
    let added = lienthong_core::schema::newly_required(&before, &after);
    if added.is_empty() {
        return;
    }
    let when = if registered {
        "lookups that pin no version use it from now on"
    } else {
        "lookups that pin no version will use it as soon as it is registered"
    };
    eprintln!(
        "note: version {next} requires {} that version {previous} did not: the register must send them in its \
         answers for version {next} (it is told the version in each request's schema_version); {when}, and a \
         record without them is refused as breaking its schema",
        shown(&added.join(", "))
    );
}

fn read_definition(file: &PathBuf) -> Result<pb::RecordTypeDefinition> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    definition_from_json(&text).with_context(|| format!("in {}", file.display()))
}

/// A record type version for `--json`; with `schemas`, its two schemas as
/// JSON values.
fn version_json(v: &pb::RecordTypeVersion, schemas: bool) -> serde_json::Value {
    let d = v.definition.clone().unwrap_or_default();
    let mut out = serde_json::json!({
        "name": d.name,
        "version": v.version,
        "owner": d.owner,
        "description": d.description,
        "subject_key": d.subject_key,
        "deprecated": v.deprecated,
        "deprecation_note": v.deprecation_note,
        "registered_at": ts_json(v.registered_at.as_ref()),
        "registered_by": v.registered_by,
        "fields": v.field_pointers,
        "digest": v.digest,
    });
    if schemas {
        let value = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
        out["query_schema"] = value(&d.query_schema_json);
        out["record_schema"] = value(&d.record_schema_json);
    }
    out
}

/// Runs a schema command.
pub async fn schema(conn: &ConnectArgs, cmd: SchemaCmd, json: bool) -> Result<()> {
    let mut c = conn.connect().await?.schemas();
    let line = |v: &pb::RecordTypeVersion| {
        if json {
            print_json(&version_json(v, false));
            return;
        }
        let d = v.definition.clone().unwrap_or_default();
        let dep = if v.deprecated {
            format!(" DEPRECATED: {}", shown(&v.deprecation_note))
        } else {
            String::new()
        };
        println!(
            "{:<36} v{:<3} owner {:<18} {}{dep}",
            shown(&d.name),
            v.version,
            shown(&d.owner),
            shown(&d.description)
        );
    };
    match cmd {
        SchemaCmd::Register { file, no_compatibility } => {
            let def = read_definition(&file)?;
            let compatibility = if no_compatibility {
                pb::Compatibility::None
            } else {
                pb::Compatibility::Backward
            } as i32;
            let record_schema = def.record_schema_json.clone();
            let r = c
                .register(pb::RegisterRequest {
                    definition: Some(def),
                    compatibility,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(v) = r.version.as_ref().filter(|v| r.created && v.version > 1) {
                let name = v.definition.as_ref().map(|d| d.name.clone()).unwrap_or_default();
                note_newly_required(&mut c, &name, v.version - 1, &record_schema, v.version, true).await;
            }
            if let Some(v) = &r.version {
                if json {
                    let mut out = version_json(v, false);
                    out["created"] = r.created.into();
                    print_json(&out);
                    return Ok(());
                }
                line(v);
                println!(
                    "{}",
                    if r.created {
                        "registered"
                    } else {
                        "identical to an existing version; nothing changed"
                    }
                );
            }
        }
        SchemaCmd::List { owner } => {
            let versions = c
                .list_record_types(pb::ListRecordTypesRequest { owner })
                .await
                .map_err(status_error)?
                .into_inner()
                .record_types;
            print_all(&versions, json, |v| version_json(v, false), line);
        }
        SchemaCmd::Show { name, version } => {
            let v = c
                .get(pb::GetRecordTypeRequest { name, version })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&version_json(&v, true));
                return Ok(());
            }
            line(&v);
            let d = v.definition.clone().unwrap_or_default();
            println!("subject key: {}", shown(&d.subject_key));
            println!("fields: {}", shown(&v.field_pointers.join(" ")));
            let pretty = |s: &str| {
                serde_json::from_str::<serde_json::Value>(s)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or_default()
            };
            println!("query schema:\n{}", pretty(&d.query_schema_json));
            println!("record schema:\n{}", pretty(&d.record_schema_json));
        }
        SchemaCmd::Check { file } => {
            let def = read_definition(&file)?;
            let (name, record_schema) = (def.name.clone(), def.record_schema_json.clone());
            let r = c
                .check_compatibility(pb::CheckCompatibilityRequest { definition: Some(def) })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.compatible && !r.identical && r.against_version > 0 {
                let next = r.against_version + 1;
                note_newly_required(&mut c, &name, r.against_version, &record_schema, next, false).await;
            }
            if json {
                let changes: Vec<_> = r
                    .changes
                    .iter()
                    .map(|ch| serde_json::json!({ "kind": ch.kind, "pointer": ch.pointer, "message": ch.message }))
                    .collect();
                print_json(&serde_json::json!({
                    "identical": r.identical,
                    "compatible": r.compatible,
                    "against_version": r.against_version,
                    "changes": changes,
                }));
                if !r.identical && r.against_version != 0 && !r.compatible {
                    bail!("{} breaking change(s)", r.changes.len());
                }
                return Ok(());
            }
            if r.identical {
                println!("identical to an existing version");
            } else if r.against_version == 0 {
                println!("new record type: would be version 1");
            } else if r.compatible {
                println!(
                    "compatible with version {}: would be version {}",
                    r.against_version,
                    r.against_version + 1
                );
            } else {
                println!("NOT compatible with version {}:", r.against_version);
                for ch in &r.changes {
                    println!(
                        "  {:<26} {:<30} {}",
                        shown(&ch.kind),
                        shown(&ch.pointer),
                        shown(&ch.message)
                    );
                }
                bail!("{} breaking change(s)", r.changes.len());
            }
        }
        SchemaCmd::Deprecate { name, version, note } => line(
            c.deprecate(pb::DeprecateRequest { name, version, note })
                .await
                .map_err(status_error)?
                .get_ref(),
        ),
    }
    Ok(())
}

// === lookups ===

/// `lienthong lookup`
#[derive(Debug, Args)]
pub struct LookupArgs {
    /// Record type, e.g. civil_status.birth_record.
    #[arg(long = "type")]
    pub record_type: String,
    /// Query as a JSON object, e.g. '{"national_id":"001090004217"}'; `-`
    /// reads it from standard input, which keeps the national ID out of the
    /// shell's history and the process list.
    #[arg(long)]
    pub query: String,
    /// Legal-basis code of this lookup.
    #[arg(long)]
    pub purpose: String,
    /// Field wanted, as a JSON Pointer (repeat); every granted field when omitted.
    #[arg(long = "field")]
    pub fields: Vec<String>,
    /// Schema version; newest active when omitted.
    #[arg(long, default_value_t = 0)]
    pub version: u32,
    /// Your correlation id (e.g. an application number).
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `value`, or for `-` what standard input holds (surrounding whitespace
/// trimmed), so that a national ID need not be typed on a command line.
fn arg_or_stdin(value: String, flag: &str) -> Result<String> {
    if value != "-" {
        return Ok(value);
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .with_context(|| format!("cannot read {flag} from standard input"))?;
    let text = text.trim();
    if text.is_empty() {
        bail!("{flag} -: standard input was empty");
    }
    Ok(text.to_owned())
}

/// Runs a lookup and prints the record and its receipt.
pub async fn lookup(conn: &ConnectArgs, a: LookupArgs) -> Result<()> {
    let mut c = conn.connect().await?.exchange();
    let r = c
        .lookup(pb::LookupRequest {
            record_type: a.record_type,
            query_json: arg_or_stdin(a.query, "--query")?,
            purpose: a.purpose,
            fields: a.fields,
            schema_version: a.version,
            request_id: a.request_id,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let record: serde_json::Value = serde_json::from_str(&r.record_json).unwrap_or(serde_json::Value::Null);
    let receipt = r.receipt.as_ref().map(|rc| {
        serde_json::json!({ "log_id": rc.log_id, "sequence": rc.sequence, "leaf_hash": hex::encode(&rc.leaf_hash) })
    });
    print_json(&serde_json::json!({
        "record_type": r.record_type,
        "schema_version": r.schema_version,
        "record": record,
        "fields_released": r.fields_released,
        "receipt": receipt,
        "deprecation_notice": r.deprecation_notice,
        "request_id": r.request_id,
    }));
    Ok(())
}

// === audit ===

/// `lienthong audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Query entries (auditor role).
    Query {
        /// Only this caller.
        #[arg(long, default_value = "")]
        actor: String,
        /// Only this provider.
        #[arg(long, default_value = "")]
        provider: String,
        /// Only this record type.
        #[arg(long = "type", default_value = "")]
        record_type: String,
        /// Only this purpose.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Only this outcome: allowed, denied, failed, invalid.
        #[arg(long)]
        outcome: Option<String>,
        /// Entries at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Entries before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Log id; this broker's own log when omitted.
        #[arg(long, default_value = "")]
        log: String,
        /// Most entries to show (at least 1).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Who accessed one citizen's data (subject-portal or auditor role).
    History {
        /// The subject key (national id); sent over mTLS and hashed by the
        /// broker. `-` reads it from standard input, which keeps it out of
        /// the shell's history and the process list.
        #[arg(long)]
        subject: String,
        /// Only accesses at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
    },
    /// Export every entry of a log as JSON lines (auditor role).
    Export {
        /// Output file (JSON lines); `-` for standard output.
        #[arg(long)]
        out: PathBuf,
        /// Log id; this broker's own log when omitted.
        #[arg(long, default_value = "")]
        log: String,
    },
    /// The latest signed tree head of a log.
    Sth {
        /// Log id; this broker's own log when omitted.
        #[arg(long, default_value = "")]
        log: String,
    },
    /// The public key of a log (PEM; hex too with --json), to keep and pin
    /// with `verify --public-key`; checked to hash to the log id.
    Key {
        /// Log id; this broker's own log when omitted.
        #[arg(long, default_value = "")]
        log: String,
    },
    /// Verify logs: signatures, the export rebuilding the signed root, every
    /// inclusion, and consistency with the heads seen last time (state file).
    Verify(VerifyArgs),
    /// Check a lookup's receipt (any member): its entry's inclusion proof
    /// against the newest signed tree head, and that head's signature.
    Receipt {
        /// Log id of the receipt (64 hex digits).
        #[arg(long)]
        log: String,
        /// Sequence of the receipt's entry.
        #[arg(long)]
        sequence: u64,
        /// Leaf hash of the receipt (64 hex digits).
        #[arg(long)]
        leaf_hash: String,
        /// Pinned public key (PEM or 64 hex digits) or a file holding it;
        /// without it, the key the broker serves for the log, checked to
        /// hash to the log id.
        #[arg(long, allow_hyphen_values = true)]
        public_key: Option<String>,
    },
}

/// `lienthong audit verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// State file remembering the last verified tree head of each log.
    #[arg(long, default_value = "lienthong-verifier-state.json")]
    pub state: PathBuf,
    /// Pinned public key (PEM or 64 hex digits) or a file holding it. Online,
    /// only the log of that key (the one whose id is its hash) is verified,
    /// as with `--log`: run once per log to pin each. Without it, each log's
    /// key must hash to its log id, and the state file pins the heads
    /// verified before.
    // A PEM given inline begins with dashes: a value, not an option.
    #[arg(long, allow_hyphen_values = true)]
    pub public_key: Option<String>,
    /// Offline: verify this export file (from `audit export`) against `--sth`.
    #[arg(long, requires = "sth")]
    pub export: Option<PathBuf>,
    /// Offline: signed tree head as JSON (from `audit sth --json`), fetched
    /// before the export so that the export holds every entry it signs.
    #[arg(long, requires = "export")]
    pub sth: Option<PathBuf>,
    /// Only this log (default: every log in the federation's database, and
    /// every log the state file names, which must still be there).
    #[arg(long)]
    pub log: Option<String>,
}

fn outcome_from(s: &str) -> Result<i32> {
    Ok(match s {
        "allowed" => pb::Outcome::Allowed,
        "denied" => pb::Outcome::Denied,
        "failed" => pb::Outcome::Failed,
        "invalid" => pb::Outcome::Invalid,
        other => bail!("unknown outcome {other:?}: use allowed, denied, failed or invalid"),
    } as i32)
}

fn outcome_name(n: i32) -> String {
    pb::Outcome::try_from(n)
        .map(|o| o.as_str_name().trim_start_matches("OUTCOME_").to_lowercase())
        .unwrap_or_default()
}

/// Tree head from the wire.
pub fn sth_from_pb(h: &pb::SignedTreeHead) -> Result<SignedTreeHead> {
    Ok(SignedTreeHead {
        log_id: h.log_id.clone(),
        tree_size: h.tree_size,
        root_hash: to_hash(&h.root_hash)?,
        timestamp_ms: h.timestamp_ms,
        signature: h.signature.clone(),
    })
}

fn to_hash(b: &[u8]) -> Result<Hash> {
    b.try_into()
        .map_err(|_| anyhow::anyhow!("hash of {} bytes; expected 32", b.len()))
}

fn key_from(b: &[u8]) -> Result<[u8; 32]> {
    b.try_into()
        .map_err(|_| anyhow::anyhow!("public key of {} bytes; expected 32", b.len()))
}

/// Checks an inclusion proof and the signature of its tree head.
pub fn verify_inclusion_proof(p: &pb::InclusionProof, public_key: &[u8]) -> Result<()> {
    let head = p.tree_head.as_ref().context("the proof carries no signed tree head")?;
    let sth = sth_from_pb(head)?;
    lienthong_audit::sth::verify_tree_head(&sth, &key_from(public_key)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The shape of the path is that of the head's tree: a proof claiming
    // another size could pass an inner node of the signed tree off as a leaf.
    if p.tree_size != sth.tree_size {
        bail!(
            "the proof is against a tree of size {}, but the signed tree head it carries is of size {}",
            p.tree_size,
            sth.tree_size
        );
    }
    let path = p.path.iter().map(|h| to_hash(h)).collect::<Result<Vec<_>>>()?;
    if !verify_inclusion(
        p.sequence,
        sth.tree_size,
        &to_hash(&p.leaf_hash)?,
        &path,
        &sth.root_hash,
    ) {
        bail!(
            "entry {} is not included in the signed tree of size {}",
            p.sequence,
            p.tree_size
        );
    }
    Ok(())
}

/// Runs an audit command.
pub async fn audit(conn: &ConnectArgs, cmd: AuditCmd, json: bool) -> Result<()> {
    if let AuditCmd::Verify(v) = &cmd
        && let Some(export) = &v.export
    {
        return verify_offline(v, export, json);
    }
    let mut c = conn.connect().await?.audit();
    match cmd {
        AuditCmd::Query {
            actor,
            provider,
            record_type,
            purpose,
            outcome,
            since,
            until,
            log,
            limit,
        } => {
            let filter = pb::EntryFilter {
                log_id: log,
                actor,
                provider,
                record_type,
                outcome: outcome.as_deref().map(outcome_from).transpose()?.unwrap_or(0),
                purpose,
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
                kind: 0,
            };
            let mut token = String::new();
            let mut listed = 0u32;
            loop {
                let page = c
                    .query_entries(pb::QueryEntriesRequest {
                        filter: Some(filter.clone()),
                        page_size: (limit - listed).min(1000),
                        page_token: token,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for e in &page.entries {
                    if json {
                        println!("{}", e.leaf_json);
                    } else {
                        let when = e.time.as_ref().map(format_ts).unwrap_or_default();
                        let what = if e.record_type.is_empty() {
                            &e.action
                        } else {
                            &e.record_type
                        };
                        // Purposes and reasons are typed by members: one
                        // entry is one line, whatever they hold.
                        println!(
                            "#{:<6} {when} {:<22} {:<34} {:<8} {} {}",
                            e.sequence,
                            shown(&e.actor),
                            shown(what),
                            outcome_name(e.outcome),
                            shown(&e.purpose),
                            shown(&e.reason)
                        );
                    }
                }
                listed += page.entries.len() as u32;
                if page.next_page_token.is_empty() || listed >= limit {
                    break;
                }
                token = page.next_page_token;
            }
        }
        AuditCmd::History { subject, since } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let subject = arg_or_stdin(subject, "--subject")?;
            // Every page, newest first: a citizen's whole history.
            let mut accesses = Vec::new();
            let mut token = String::new();
            loop {
                let page = c
                    .subject_history(pb::SubjectHistoryRequest {
                        subject_key: subject.clone(),
                        since,
                        limit: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                accesses.extend(page.accesses);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if json {
                let list: Vec<_> = accesses
                    .iter()
                    .map(|a| {
                        let receipt = a.receipt.as_ref().map(|r| {
                            serde_json::json!({
                                "log_id": r.log_id,
                                "sequence": r.sequence,
                                "leaf_hash": hex::encode(&r.leaf_hash),
                            })
                        });
                        serde_json::json!({
                            "time": ts_json(a.time.as_ref()),
                            "consumer": a.consumer,
                            "consumer_name": a.consumer_name,
                            "provider": a.provider,
                            "record_type": a.record_type,
                            "purpose": a.purpose,
                            "fields_released": a.fields_released,
                            "outcome": outcome_name(a.outcome),
                            "receipt": receipt,
                        })
                    })
                    .collect();
                print_json(&list);
                return Ok(());
            }
            for a in accesses {
                let when = a.time.as_ref().map(format_ts).unwrap_or_default();
                // A citizen reads "read" as "has my data": only what was
                // released is said so; a refused or failed attempt is an ask.
                let (verb, end) = if a.outcome == pb::Outcome::Allowed as i32 {
                    ("read", format!("[{}] allowed", shown(&a.fields_released.join(", "))))
                } else {
                    ("asked for", format!("{}, nothing released", outcome_name(a.outcome)))
                };
                println!(
                    "{when} {} ({}) {verb} {} from {} for {} {end}",
                    shown(&a.consumer),
                    shown(&a.consumer_name),
                    shown(&a.record_type),
                    shown(&a.provider),
                    shown(&a.purpose),
                );
            }
        }
        AuditCmd::Export { out, log } => {
            let mut stream = c
                .export_entries(pb::ExportEntriesRequest {
                    filter: Some(pb::EntryFilter {
                        log_id: log,
                        ..Default::default()
                    }),
                    from_sequence: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            // The first entry (or the refusal) before the file: a log that
            // cannot be exported leaves no empty export behind.
            let mut next = stream.message().await.map_err(status_error)?;
            // `--out -` is standard output, as a pipe to another tool wants.
            let to_stdout = out.as_os_str() == "-";
            let sink: Box<dyn Write> = if to_stdout {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::fs::File::create(&out).with_context(|| format!("cannot create {}", out.display()))?)
            };
            let mut w = std::io::BufWriter::new(sink);
            let mut n = 0u64;
            while let Some(e) = next {
                let line = ExportLine {
                    log_id: e.log_id,
                    sequence: e.sequence,
                    leaf_hash: hex::encode(&e.leaf_hash),
                    leaf: e.leaf_json,
                };
                serde_json::to_writer(&mut w, &line)?;
                w.write_all(b"\n")?;
                n += 1;
                if n.is_multiple_of(10_000) {
                    eprint!("\rexported {n} entries");
                }
                next = stream.message().await.map_err(status_error)?;
            }
            w.flush()?;
            let to = if to_stdout {
                "standard output".to_string()
            } else {
                out.display().to_string()
            };
            eprintln!("\rexported {n} entries to {to}");
        }
        AuditCmd::Sth { log } => {
            let h = c
                .get_signed_tree_head(pb::GetSignedTreeHeadRequest { log_id: log })
                .await
                .map_err(status_error)?
                .into_inner();
            let sth = sth_from_pb(&h)?;
            if json {
                print_json(&sth);
            } else {
                let signed = signed_at(sth.timestamp_ms);
                println!(
                    "log {} size {} root {} signed at {signed}",
                    shown(&sth.log_id),
                    sth.tree_size,
                    hex::encode(sth.root_hash),
                );
            }
        }
        AuditCmd::Key { log } => {
            let k = c
                .get_public_key(pb::GetPublicKeyRequest { log_id: log })
                .await
                .map_err(status_error)?
                .into_inner();
            let key = key_from(&k.public_key)?;
            let id = lienthong_audit::keys::log_id_of(&key);
            if id != k.log_id {
                bail!(
                    "the broker gave for log {} a key whose log id is {id}; do not pin it",
                    shown(&k.log_id)
                );
            }
            // What is printed is what an auditor pins: never nothing, and
            // never a PEM of another key than the one checked above. It is
            // made here from that key, so that nothing but the key's own
            // lines reaches the terminal; a broker that sends a PEM (before
            // some sent none) must send one of that key.
            if !k.public_key_pem.trim().is_empty()
                && lienthong_audit::keys::parse_public_key(&k.public_key_pem).ok() != Some(key)
            {
                bail!("the broker gave for log {id} a PEM that is not the log's key; do not pin it");
            }
            let pem = lienthong_audit::keys::public_key_pem_of(&key)
                .map_err(|e| anyhow::anyhow!("the broker gave for log {id} a key that cannot be pinned: {e}"))?;
            if json {
                print_json(&serde_json::json!({
                    "log_id": k.log_id,
                    "public_key_hex": hex::encode(&k.public_key),
                    "public_key_pem": pem,
                }));
            } else {
                print!("{pem}");
            }
        }
        AuditCmd::Verify(v) => verify_online(&mut c, &v, json).await?,
        AuditCmd::Receipt {
            log,
            sequence,
            leaf_hash,
            public_key,
        } => verify_receipt(&mut c, &log, sequence, &leaf_hash, public_key.as_deref(), json).await?,
    }
    Ok(())
}

/// A tree head's signing time (milliseconds since the epoch) as RFC 3339.
fn signed_at(timestamp_ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(timestamp_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{timestamp_ms} ms after 1970"))
}

/// `audit receipt`: proves that a receipt's entry is in the log the newest
/// signed tree head signs, with the log's key pinned or checked to be the
/// log's.
async fn verify_receipt(
    c: &mut AuditClient,
    log: &str,
    sequence: u64,
    leaf_hash: &str,
    public_key: Option<&str>,
    json: bool,
) -> Result<()> {
    check_log_id(log)?;
    let leaf: Hash = hex::decode(leaf_hash.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("--leaf-hash must be 64 hex digits, as the receipt shows it")?;
    let key = match public_key {
        Some(spec) => read_pinned_key(spec)?,
        None => {
            let k = c
                .get_public_key(pb::GetPublicKeyRequest { log_id: log.into() })
                .await
                .map_err(status_error)?
                .into_inner();
            key_from(&k.public_key)?
        }
    };
    let id = lienthong_audit::keys::log_id_of(&key);
    if id != log {
        bail!("the key is that of log {id}, not of the receipt's log {}", shown(log));
    }
    let p = c
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            log_id: log.into(),
            sequence,
            tree_size: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if p.log_id != log || p.sequence != sequence {
        bail!(
            "the broker answered with a proof of entry {} of log {}, not of entry {sequence} of log {log}",
            p.sequence,
            shown(&p.log_id)
        );
    }
    if p.leaf_hash != leaf {
        bail!(
            "entry {sequence} of log {log} has leaf hash {}, not the receipt's {}: the receipt is not this \
             entry's, or the log was altered",
            hex::encode(&p.leaf_hash),
            hex::encode(leaf)
        );
    }
    verify_inclusion_proof(&p, &key).with_context(|| format!("receipt of entry {sequence} of log {log}"))?;
    let head = p.tree_head.as_ref().context("the proof carries no signed tree head")?;
    if json {
        print_json(&serde_json::json!({
            "log_id": log,
            "sequence": sequence,
            "leaf_hash": hex::encode(leaf),
            "tree_size": head.tree_size,
            "root_hash": hex::encode(&head.root_hash),
            "timestamp_ms": head.timestamp_ms,
            "verified": true,
        }));
    } else {
        println!(
            "entry #{sequence} of log {log} is in the tree of size {} signed at {}: VERIFIED",
            head.tree_size,
            signed_at(head.timestamp_ms)
        );
    }
    Ok(())
}

fn read_pinned_key(spec: &str) -> Result<[u8; 32]> {
    let trimmed = spec.trim();
    let inline =
        trimmed.starts_with("-----BEGIN") || (trimmed.len() == 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()));
    // A key given inline is read as such unless a file of that name exists;
    // anything else names a file, and a missing one is said to be missing.
    let text = if !inline || std::path::Path::new(spec).is_file() {
        std::fs::read_to_string(spec).with_context(|| format!("cannot read the public key file {spec}"))?
    } else {
        spec.to_string()
    };
    // PEM (as `GetPublicKey` serves it) or 64 hex digits.
    Ok(lienthong_audit::keys::parse_public_key(&text)?)
}

/// The leaf hashes this verifier already checked, per log, kept beside the
/// state file (32 bytes an entry), as Certificate Transparency monitors keep a
/// copy: a later run names the exact entry that was replaced, rewritten or
/// moved, where the signed roots alone only tell that something changed.
struct Mirror {
    path: PathBuf,
    /// The copy kept from the last run, overwritten entry by entry with this
    /// run's leaf hashes as they stream past.
    hashes: Vec<u8>,
    /// Entries the head being verified signs: only those are kept.
    covered: u64,
    /// Entries seen so far in this run.
    seen: u64,
    /// The first entry whose leaf hash differs from the copy kept.
    first_difference: Option<u64>,
}

impl Mirror {
    fn load(state: &std::path::Path, log_id: &str, covered: u64) -> Result<Mirror> {
        // The id comes from a file that may have been tampered with: only a
        // log id's hex digits may name a file.
        if log_id.len() != 64 || !log_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the log id {log_id:?} is not a log id (64 hex digits): the tree head is not one a broker signed");
        }
        let mut name = state.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".{}.leaves", &log_id[..16]));
        let path = state.with_file_name(name);
        let hashes = match std::fs::read(&path) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if hashes.len() % 32 != 0 {
            bail!(
                "{} is damaged (not a whole number of hashes); delete it to start over",
                path.display()
            );
        }
        Ok(Mirror {
            path,
            hashes,
            covered,
            seen: 0,
            first_difference: None,
        })
    }

    /// Compares the next entry with the copy kept, and keeps it in its place.
    fn observe(&mut self, line: &ExportLine) {
        let position = self.seen;
        self.seen += 1;
        if position >= self.covered {
            return;
        }
        // The stored hash rather than one computed again: the verifier
        // checks it against the leaf before going on, and nothing is saved or
        // compared unless every entry up to the failure passed that check.
        let hash: Hash = hex::decode(&line.leaf_hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .unwrap_or([0; 32]);
        let at = usize::try_from(position).unwrap_or(usize::MAX).saturating_mul(32);
        match self.hashes.get_mut(at..at.saturating_add(32)) {
            Some(kept) => {
                if *kept != hash && self.first_difference.is_none() {
                    self.first_difference = Some(position);
                }
                kept.copy_from_slice(&hash);
            }
            None => self.hashes.extend_from_slice(&hash),
        }
    }

    /// Keeps the hashes of the entries the verified head signs.
    fn save(&mut self) -> Result<()> {
        let covered = usize::try_from(self.covered).unwrap_or(usize::MAX).saturating_mul(32);
        self.hashes.truncate(covered);
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &self.hashes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

/// Verifies one log's entries, as they arrive, against its head and what
/// this verifier saw before. Only the mirror's 32 bytes an entry are kept.
fn verify_log(
    lines: impl Iterator<Item = std::result::Result<ExportLine, VerifyError>>,
    head: &SignedTreeHead,
    key: &[u8; 32],
    previous: Option<&SignedTreeHead>,
    mirror: &mut Mirror,
    proof: Option<&[Hash]>,
) -> Result<VerifyReport> {
    let lines = lines.inspect(|line| {
        if let Ok(line) = line {
            mirror.observe(line);
        }
    });
    match verify_entries(lines, head, key, previous, proof) {
        Ok(report) => Ok(report),
        // Roots only say that something before a size changed, and a short
        // export or a missing or misplaced line where the entries ran out
        // or broke off: the kept copy says which entry changed before that
        // (a line deleted and the rest renumbered reads as a truncation).
        Err(
            e @ (VerifyError::RootMismatch { .. }
            | VerifyError::RootMismatchSince { .. }
            | VerifyError::Inconsistent { .. }
            | VerifyError::Truncated { .. }
            | VerifyError::Gap { .. }
            | VerifyError::OutOfOrder { .. }),
        ) => match mirror.first_difference {
            Some(n) => bail!(
                "entry {n} differs from the copy verified on an earlier run: it was replaced, rewritten or moved ({e})"
            ),
            None => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// What a verification proved, in the same words online and offline:
/// entries past the signed head have intact leaf hashes, but no signature
/// covers them yet.
/// One log's verification for `--json`.
fn verified_json(report: &VerifyReport) -> serde_json::Value {
    serde_json::json!({
        "log_id": report.log_id,
        "result": "verified",
        "entries": report.entries,
        "signed_tree_size": report.tree_head.tree_size,
        "root_hash": hex::encode(report.tree_head.root_hash),
        "unsigned_entries": report.entries.saturating_sub(report.tree_head.tree_size),
        "consistent_with_previous_size": report.consistent_with_previous,
    })
}

fn verified_summary(report: &VerifyReport) -> String {
    let signed = report.tree_head.tree_size;
    let mut line = format!(
        "log {}: OK, {} entries, signed tree head of size {signed} verified",
        shown(&report.log_id),
        report.entries
    );
    let last = report.entries.saturating_sub(1);
    match report.entries.saturating_sub(signed) {
        0 => {}
        1 => line.push_str(&format!(
            "; entry {signed} is past it: its leaf hash is intact, but no signature covers it yet"
        )),
        _ => line.push_str(&format!(
            "; entries {signed} to {last} are past it: their leaf hashes are intact, but no signature covers them yet"
        )),
    }
    line
}

/// An offline failure in words an auditor can act on.
fn offline_failure(e: &anyhow::Error) -> String {
    match e.downcast_ref::<VerifyError>() {
        // Offline, a head newer than the export is the usual cause, not
        // tampering: the export cannot hold what was logged after it.
        Some(VerifyError::Truncated { have, signed }) => format!(
            "the export ends after {have} entries, but the signed tree head covers {signed}: entries {have}..{signed} \
             are not in it. An export made before the head was fetched lacks them: fetch the head first \
             (`audit sth --json`), then export (entries past the head are reported as not yet signed). An export \
             made after the head that lacks them was truncated"
        ),
        _ => crate::error_text(e),
    }
}

fn verify_offline(v: &VerifyArgs, export: &PathBuf, json: bool) -> Result<()> {
    let sth_path = v.sth.as_ref().context("--sth is required with --export")?;
    let sth: SignedTreeHead = serde_json::from_str(
        &std::fs::read_to_string(sth_path).with_context(|| format!("cannot read {}", sth_path.display()))?,
    )
    .with_context(|| format!("{} is not a signed tree head", sth_path.display()))?;
    let key = read_pinned_key(v.public_key.as_deref().context("--public-key is required offline")?)?;
    let mut state = VerifierState::load(&v.state)?;
    let file = std::fs::File::open(export).with_context(|| format!("cannot read {}", export.display()))?;
    let previous = state.previous(&sth.log_id).cloned();
    let report = Mirror::load(&v.state, &sth.log_id, sth.tree_size)
        .and_then(|mut mirror| {
            let lines = lienthong_audit::verify::read_export(std::io::BufReader::new(file));
            let report = verify_log(lines, &sth, &key, previous.as_ref(), &mut mirror, None)?;
            Ok((report, mirror))
        })
        .map_err(|e| anyhow::anyhow!("verification FAILED: {}", offline_failure(&e)));
    let (report, mut mirror) = report?;
    if json {
        print_json(&[verified_json(&report)]);
    } else {
        println!("{}", verified_summary(&report));
    }
    // The result stands whatever happens to the state below: a failure to
    // save it is reported as such, never as a failed verification.
    let kept = mirror.save();
    state.record(report.tree_head);
    let saved = state.save(&v.state);
    match (kept, saved) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), _) => Err(e.context(
            "the log verified, but the copy of its leaf hashes (beside the state file) could not be saved",
        )),
        (_, Err(e)) => Err(anyhow::Error::new(e).context(
            "the log verified, but the verifier state could not be saved: the next run cannot prove the log only grew since",
        )),
    }
}

type AuditClient = lienthong::v1::audit_client::AuditClient<tonic::transport::Channel>;

/// Checks the form of a `--log` id, as receipts and `ListLogs` name logs.
fn check_log_id(id: &str) -> Result<()> {
    if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        bail!("--log {id:?} is not a log id: give 64 lowercase hex digits, as receipts and `audit verify` name logs");
    }
    Ok(())
}

async fn verify_online(c: &mut AuditClient, v: &VerifyArgs, json: bool) -> Result<()> {
    if let Some(id) = &v.log {
        check_log_id(id)?;
    }
    let mut state = VerifierState::load(&v.state)?;
    let logs = c
        .list_logs(pb::ListLogsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .logs;
    let listed = |id: &str| logs.iter().any(|l| l.log_id == id);
    // A pinned key names exactly one log: the one whose id is its hash.
    let only = match v.public_key.as_deref().map(read_pinned_key).transpose()? {
        Some(pin) => {
            let id = lienthong_audit::keys::log_id_of(&pin);
            if v.log.as_ref().is_some_and(|l| *l != id) {
                bail!(
                    "--log {} is not the log of the pinned public key ({id})",
                    v.log.as_deref().unwrap_or_default()
                );
            }
            // One verified before is reported below as missing.
            if !listed(&id) && state.previous(&id).is_none() {
                bail!("the log of the pinned public key ({id}) is not in this federation's database");
            }
            Some(id)
        }
        None => {
            if let Some(id) = v
                .log
                .as_deref()
                .filter(|id| !listed(id) && state.previous(id).is_none())
            {
                bail!(
                    "log {id} is not in this federation's database (`audit verify` without --log verifies every log it holds)"
                );
            }
            v.log.clone()
        }
    };
    let wanted = |id: &str| only.as_deref().is_none_or(|o| o == id);
    let mut failures = 0usize;
    let mut unsaved = 0usize;
    // With --json, one array of every log's result, printed at the end.
    let mut results = Vec::new();
    let mut failed = |log_id: &str, why: String| {
        if json {
            results.push(serde_json::json!({ "log_id": log_id, "result": "failed", "error": why }));
        } else {
            println!("log {}: FAILED: {}", shown(log_id), shown(&why));
        }
    };
    let mut verified = Vec::new();
    for log in logs.iter().filter(|l| wanted(&l.log_id)) {
        let previous = state.previous(&log.log_id).cloned();
        match verify_online_log(c, log, previous.as_ref(), &v.state).await {
            Ok(None) if json => verified.push(serde_json::json!({ "log_id": log.log_id, "result": "unsigned" })),
            Ok(None) => println!("log {}: no signed tree head yet", shown(&log.log_id)),
            Ok(Some((report, mut mirror))) => {
                if json {
                    verified.push(verified_json(&report));
                } else {
                    println!("{}", verified_summary(&report));
                }
                if let Err(e) = mirror.save() {
                    eprintln!(
                        "log {}: verified, but the copy of its leaf hashes could not be saved: {}",
                        shown(&log.log_id),
                        shown(&crate::error_text(&e))
                    );
                    unsaved += 1;
                }
                state.record(report.tree_head);
            }
            // The caller's roles, not the log: nothing was verified, and
            // saying a log FAILED would raise a false alarm of tampering.
            Err(e) if e.downcast_ref::<NotAllowed>().is_some() => {
                bail!("cannot verify the logs: {}", crate::error_text(&e))
            }
            Err(e) => {
                failed(&log.log_id, crate::error_text(&e));
                failures += 1;
            }
        }
    }
    // A log verified before cannot silently drop out of the federation.
    for (id, head) in state.logs.iter().filter(|(id, _)| wanted(id) && !listed(id)) {
        failed(
            id,
            format!(
                "a signed tree head of size {} was verified before, but the log is no longer in this \
                 federation's database: it was deleted",
                head.tree_size
            ),
        );
        failures += 1;
    }
    // A pin names one log: an auditor who pinned one key to check the
    // federation must not take the others for checked.
    if let Some(only) = &only {
        let others: Vec<&str> = logs.iter().map(|l| l.log_id.as_str()).filter(|id| id != only).collect();
        if !others.is_empty() {
            eprintln!(
                "only log {} was verified ({}); {} other log(s) in this federation's database were not: {}. \
                 Verify each with its own --public-key (`lienthong audit key --log ID`), or all of them without \
                 --public-key and --log",
                shown(only),
                if v.public_key.is_some() {
                    "the log of --public-key"
                } else {
                    "--log"
                },
                others.len(),
                others.iter().map(|id| shown(id)).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if json {
        verified.append(&mut results);
        print_json(&verified);
    }
    let saved = state.save(&v.state);
    if let Err(e) = &saved {
        eprintln!(
            "the verifier state could not be saved: {e}; the next run cannot prove the logs only grew since this one"
        );
    }
    if failures > 0 {
        bail!("{failures} log(s) failed verification");
    }
    if saved.is_err() || unsaved > 0 {
        bail!("the logs verified, but what was verified could not all be saved (see above)");
    }
    Ok(())
}

/// The broker refused the caller the export `audit verify` reads: its roles
/// are the matter, not any log.
#[derive(Debug)]
struct NotAllowed(String);

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; `audit verify` online needs a member with the auditor role (or verify an export offline)",
            self.0
        )
    }
}

impl std::error::Error for NotAllowed {}

/// Verifies one log online: `None` when it has no signed head yet (and none
/// was verified before); an error says why it failed.
async fn verify_online_log(
    c: &mut AuditClient,
    log: &pb::LogPublicKey,
    previous: Option<&SignedTreeHead>,
    state_path: &std::path::Path,
) -> Result<Option<(VerifyReport, Mirror)>> {
    let key = key_from(&log.public_key).context("its public key in the database is unusable")?;
    // The log id is the hash of its key: a log cannot change keys unnoticed.
    if lienthong_audit::keys::log_id_of(&key) != log.log_id {
        bail!("its public key does not hash to its log id");
    }
    let head = match c
        .get_signed_tree_head(pb::GetSignedTreeHeadRequest {
            log_id: log.log_id.clone(),
        })
        .await
    {
        Ok(h) => sth_from_pb(&h.into_inner()).context("the broker sent a malformed signed tree head")?,
        Err(s) if s.code() == tonic::Code::NotFound => match previous {
            Some(p) => bail!(
                "it has no signed tree head, but one of size {} was verified before: its signed tree heads were deleted",
                p.tree_size
            ),
            None => return Ok(None),
        },
        Err(s) => return Err(status_error(s).context("cannot fetch its signed tree head")),
    };
    let proof = match previous {
        Some(p) if p.tree_size > 0 && p.tree_size < head.tree_size => {
            let r = c
                .get_consistency_proof(pb::GetConsistencyProofRequest {
                    log_id: log.log_id.clone(),
                    first: p.tree_size,
                    second: head.tree_size,
                })
                .await
                .map_err(status_error)
                .context("cannot fetch a consistency proof")?
                .into_inner();
            let path = r.path.iter().map(|h| to_hash(h)).collect::<Result<Vec<_>>>()?;
            if !verify_consistency(p.tree_size, head.tree_size, &p.root_hash, &head.root_hash, &path) {
                bail!(
                    "the log of size {} does not extend the one verified before (size {}): it was rewritten",
                    head.tree_size,
                    p.tree_size
                );
            }
            Some(path)
        }
        _ => None,
    };
    let mut mirror = Mirror::load(state_path, &log.log_id, head.tree_size)?;
    let mut stream = c
        .export_entries(pb::ExportEntriesRequest {
            filter: Some(pb::EntryFilter {
                log_id: log.log_id.clone(),
                ..Default::default()
            }),
            from_sequence: 0,
        })
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::PermissionDenied {
                anyhow::Error::new(NotAllowed(s.message().to_string()))
            } else {
                status_error(s).context("cannot export its entries")
            }
        })?
        .into_inner();
    // Entries flow through the verifier as they arrive; none is kept.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let verifier = {
        let (head, previous) = (head.clone(), previous.cloned());
        tokio::task::spawn_blocking(move || {
            let lines = std::iter::from_fn(|| rx.blocking_recv());
            let verified = verify_log(lines, &head, &key, previous.as_ref(), &mut mirror, proof.as_deref());
            (verified, mirror)
        })
    };
    let short_id = log.log_id.get(..12).unwrap_or(&log.log_id);
    let mut fetched = 0u64;
    // The first entry whose served fields are not its leaf's. Reported only
    // if the leaves verify: a leaf rewritten under its columns shows as such
    // a difference too, and is better named by what the leaves prove.
    let mut misdisplayed: Option<(u64, String)> = None;
    loop {
        let item = match stream.message().await {
            Ok(Some(e)) => {
                fetched += 1;
                if fetched.is_multiple_of(50_000) {
                    eprint!("\rlog {short_id}: fetched {fetched} entries");
                }
                if misdisplayed.is_none() {
                    misdisplayed = served_fields_mismatch(&e).map(|why| (e.sequence, why));
                }
                Ok(ExportLine {
                    log_id: e.log_id,
                    sequence: e.sequence,
                    leaf_hash: hex::encode(&e.leaf_hash),
                    leaf: e.leaf_json,
                })
            }
            Ok(None) => break,
            Err(s) => Err(unreadable(c, &log.log_id, fetched, s).await),
        };
        let last = item.is_err();
        // A closed channel: the verifier stopped at a bad entry.
        if tx.send(item).await.is_err() || last {
            break;
        }
    }
    drop(tx);
    if fetched >= 50_000 {
        eprintln!();
    }
    let (verified, mirror) = verifier.await.context("the verifier stopped unexpectedly")?;
    let report = verified?;
    if let Some((sequence, why)) = misdisplayed {
        bail!(
            "entry {sequence} is shown differently from what was logged: {why}. Its leaf is intact, but the \
             database's columns that queries and citizens' histories read were altered"
        );
    }
    Ok(Some((report, mirror)))
}

/// Longest served value a finding quotes: it holds what whoever altered the
/// database wrote.
const QUOTED_CHARS: usize = 80;

fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// How the fields the broker served beside an entry's leaf differ from the
/// leaf, which is what the tree hashes and what was logged; `None` when they
/// agree. The broker exports its indexed columns as stored: one that differs
/// was altered in the database, and queries and citizens' histories read it.
fn served_fields_mismatch(e: &pb::AuditEntry) -> Option<String> {
    let Ok(ev) = serde_json::from_str::<lienthong_core::audit::AuditEvent>(&e.leaf_json) else {
        return Some("its leaf is not an audit event".into());
    };
    let mut differ = Vec::new();
    let mut compare = |field: &str, served: &str, leaf: &str| {
        if served != leaf {
            differ.push(format!(
                "{field} is {} but its leaf says {}",
                quoted(served),
                quoted(leaf)
            ));
        }
    };
    let kind = |n: i32| pb::EntryKind::try_from(n).map_or_else(|_| n.to_string(), |k| k.as_str_name().to_string());
    let leaf_kind = match ev.kind {
        lienthong_core::audit::EntryKind::Access => pb::EntryKind::Access,
        lienthong_core::audit::EntryKind::Authentication => pb::EntryKind::Authentication,
        lienthong_core::audit::EntryKind::Admin => pb::EntryKind::Admin,
        lienthong_core::audit::EntryKind::AuditRead => pb::EntryKind::AuditRead,
    };
    compare("kind", &kind(e.kind), &kind(leaf_kind as i32));
    let leaf_outcome = match ev.outcome {
        lienthong_core::audit::Outcome::Allowed => pb::Outcome::Allowed,
        lienthong_core::audit::Outcome::Denied => pb::Outcome::Denied,
        lienthong_core::audit::Outcome::Failed => pb::Outcome::Failed,
        lienthong_core::audit::Outcome::Invalid => pb::Outcome::Invalid,
    };
    compare("outcome", &outcome_name(e.outcome), &outcome_name(leaf_outcome as i32));
    compare("actor", &e.actor, &ev.actor);
    compare("provider", &e.provider, &ev.provider);
    compare("record_type", &e.record_type, &ev.record_type);
    compare("purpose", &e.purpose, &ev.purpose);
    // Stored as bytes, served in lower case.
    if !e.subject_hash.eq_ignore_ascii_case(&ev.subject_hash) {
        compare("subject_hash", &e.subject_hash, &ev.subject_hash);
    }
    compare("request_id", &e.request_id, &ev.request_id);
    compare("trace_id", &e.trace_id, &ev.trace_id);
    compare("reason", &e.reason, &ev.reason);
    compare("payload_digest", &e.payload_digest, &ev.payload_digest);
    compare("action", &e.action, &ev.action);
    compare("target", &e.target, &ev.target);
    compare(
        "schema_version",
        &e.schema_version.to_string(),
        &ev.schema_version.to_string(),
    );
    compare("latency_us", &e.latency_us.to_string(), &ev.latency_us.to_string());
    compare(
        "fields_released",
        &e.fields_released.join(","),
        &ev.fields_released.join(","),
    );
    // The time column keeps microseconds, rounded down.
    let served = e
        .time
        .as_ref()
        .map(|t| i128::from(t.seconds) * 1_000_000 + i128::from(t.nanos).div_euclid(1_000));
    let leaf_time = ev.time.unix_timestamp_nanos().div_euclid(1_000);
    if served != Some(leaf_time) {
        differ.push(format!(
            "time is {} µs but its leaf says {leaf_time} µs",
            served.map_or_else(|| "missing".to_string(), |t| t.to_string())
        ));
    }
    (!differ.is_empty()).then(|| differ.join("; "))
}

/// Why the export broke off at entry `from`. An export reads a page of
/// entries at a time, so a row the broker cannot read (INTERNAL) is looked
/// for one entry at a time to name it.
async fn unreadable(c: &mut AuditClient, log_id: &str, from: u64, status: tonic::Status) -> VerifyError {
    let message = crate::error_text(&status_error(status.clone()));
    let mut sequence = from;
    if status.code() == tonic::Code::Internal {
        for probe in from..from.saturating_add(1000) {
            let page = c
                .query_entries(pb::QueryEntriesRequest {
                    filter: Some(pb::EntryFilter {
                        log_id: log_id.to_string(),
                        ..Default::default()
                    }),
                    page_size: 1,
                    page_token: probe.to_string(),
                })
                .await;
            match page {
                Ok(p) if p.get_ref().entries.is_empty() => break,
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Internal => {
                    sequence = probe;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    VerifyError::Unreadable { sequence, message }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An inclusion proof is checked in the shape of the tree its signed
    /// head signs: a broker cannot prove an inner node of that tree (which
    /// it could have handed out as a receipt's leaf hash) by claiming a
    /// smaller tree, in which the node stands where a leaf would.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn an_inclusion_proof_is_checked_against_its_heads_tree_size() {
        use lienthong_audit::merkle::{inclusion_proof, leaf_hash, node_hash, root};
        let keys = lienthong_audit::keys::LogKeys::generate().unwrap();
        let leaves: Vec<_> = [b"a", b"b", b"c", b"d"].iter().map(|l| leaf_hash(*l)).collect();
        let head = keys.sign_tree_head(4, &root(&leaves), 1_700_000_000_000);
        let tree_head = Some(pb::SignedTreeHead {
            log_id: head.log_id.clone(),
            tree_size: head.tree_size,
            root_hash: head.root_hash.to_vec(),
            timestamp_ms: head.timestamp_ms,
            signature: head.signature.clone(),
        });
        let honest = pb::InclusionProof {
            log_id: keys.log_id(),
            sequence: 2,
            tree_size: 4,
            leaf_hash: leaves[2].to_vec(),
            path: inclusion_proof(2, &leaves).iter().map(|h| h.to_vec()).collect(),
            tree_head: tree_head.clone(),
        };
        verify_inclusion_proof(&honest, &keys.public_key()).unwrap();
        // "Entry 2 of a tree of 3": the node over c and d where a leaf would be.
        let forged = pb::InclusionProof {
            log_id: keys.log_id(),
            sequence: 2,
            tree_size: 3,
            leaf_hash: node_hash(&leaves[2], &leaves[3]).to_vec(),
            path: vec![node_hash(&leaves[0], &leaves[1]).to_vec()],
            tree_head,
        };
        let err = verify_inclusion_proof(&forged, &keys.public_key()).unwrap_err();
        assert!(err.to_string().contains("tree of size 3"), "{err}");
    }

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    /// `grant list` says what a lookup under the grant would meet.
    #[test]
    fn a_grant_is_listed_as_what_it_allows_now() {
        let g = |from: i64, until: Option<i64>, revoked: bool| pb::Grant {
            valid_from: Some(at(from)),
            valid_until: until.map(at),
            revoked_at: revoked.then(|| at(from)),
            revoked_reason: "audit finding".into(),
            ..Default::default()
        };
        let now = at(1_000);
        let text = |g: &pb::Grant, consumer: Option<&pb::Member>| grant_state(g, &now, consumer).1;
        assert_eq!(text(&g(0, None, false), None), "active");
        assert_eq!(text(&g(0, Some(2_000), false), None), "active");
        assert!(text(&g(0, Some(1_000), false), None).starts_with("EXPIRED"));
        assert!(text(&g(2_000, None, false), None).starts_with("NOT YET VALID"));
        assert_eq!(
            text(&g(0, None, true), None),
            "REVOKED at 1970-01-01T00:00:00Z (audit finding)"
        );
        // A disabled consumer's calls are refused before any grant is looked at.
        let enabled = pb::Member {
            enabled: true,
            ..Default::default()
        };
        let disabled = pb::Member {
            enabled: false,
            disabled_reason: "audit\nfinding".into(),
            ..Default::default()
        };
        assert_eq!(grant_state(&g(0, None, false), &now, Some(&enabled)).0, "active");
        let (word, words) = grant_state(&g(0, None, false), &now, Some(&disabled));
        assert_eq!(word, "consumer_disabled");
        assert_eq!(
            words,
            "CONSUMER DISABLED (audit\\nfinding): allows nothing while the member is disabled"
        );
        let (word, words) = grant_state(&g(0, Some(1_000), false), &now, Some(&disabled));
        assert_eq!(word, "expired");
        assert!(words.ends_with("; consumer disabled (audit\\nfinding)"), "{words}");
        assert_eq!(grant_state(&g(0, None, true), &now, Some(&disabled)).0, "revoked");
    }
}
