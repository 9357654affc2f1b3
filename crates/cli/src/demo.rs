//! `lienthong demo`: the once-only story, told as a transcript.

use crate::federation::{
    self, ADMIN, CITIZEN_PORTAL, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT,
    TAX_DEPT,
};
use anyhow::{Context, Result};
use lienthong::v1 as pb;
use std::io::Write;

/// Options of the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Federation options.
    pub federation: FederationOptions,
    /// Keep the federation running after the story.
    pub keep_running: bool,
}

/// What the story observed, so the end-to-end test can assert every step.
#[derive(Debug, Default)]
pub struct StoryReport {
    /// National id of the applicant.
    pub subject: String,
    /// The birth record released to the judicial-records office.
    pub birth_record: Option<serde_json::Value>,
    /// Its receipt.
    pub receipt: Option<pb::Receipt>,
    /// Code the tax department got.
    pub no_grant_code: Option<tonic::Code>,
    /// Code the office got asking for an ungranted field.
    pub ungranted_field_code: Option<tonic::Code>,
    /// Per collect item: record type and whether it succeeded.
    pub collect: Vec<(String, bool)>,
    /// Entries in the citizen's access history.
    pub history: Vec<pb::SubjectAccess>,
    /// Whether the receipt's inclusion proof verified against the signed head.
    pub receipt_verified: bool,
}

fn say(out: &mut dyn Write, text: impl AsRef<str>) {
    let _ = writeln!(out, "{}", text.as_ref());
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_string())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the story against a set-up federation, printing the transcript.
pub async fn story(fed: &Federation, out: &mut dyn Write) -> Result<StoryReport> {
    let mut report = StoryReport::default();
    let seed = fed.options.seed;
    let citizen = lienthong_provider::demo::citizen(seed, 4217);
    let subject = lienthong_provider::demo::citizen_national_id(seed, 4217);
    report.subject = subject.clone();
    let query = serde_json::json!({ "national_id": subject }).to_string();

    say(out, "");
    say(out, "== 1. An application arrives");
    say(
        out,
        format!(
            "   {} applies to the Ha Noi judicial-records office for a criminal-record certificate.\n   \
             Instead of asking for a certified copy of the birth certificate, the office looks it up.",
            citizen.full_name
        ),
    );

    let office = fed.client(JUDICIAL_OFFICE).await?;
    say(out, "");
    say(
        out,
        format!("== 2. {JUDICIAL_OFFICE} -> Lookup civil_status.birth_record (purpose {PURPOSE_CERTIFICATE})"),
    );
    let birth = office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: "civil_status.birth_record".into(),
            query_json: query.clone(),
            purpose: PURPOSE_CERTIFICATE.into(),
            request_id: "application-2026-000417".into(),
            ..Default::default()
        })
        .await;
    match birth {
        Ok(r) => {
            let r = r.into_inner();
            say(
                out,
                "   ALLOWED. The register answered; the broker checked the record against its schema,",
            );
            say(
                out,
                "   kept only the granted fields and logged the access before releasing it:",
            );
            say(out, indent(&pretty(&r.record_json)));
            say(out, format!("   fields released: {}", r.fields_released.join(", ")));
            if let Some(rc) = &r.receipt {
                say(
                    out,
                    format!(
                        "   receipt: log {}… entry #{} leaf {}…",
                        rc.log_id.get(..12).unwrap_or(&rc.log_id),
                        rc.sequence,
                        hex::encode(rc.leaf_hash.get(..8).unwrap_or(&rc.leaf_hash))
                    ),
                );
            }
            report.birth_record = serde_json::from_str(&r.record_json).ok();
            report.receipt = r.receipt;
        }
        Err(s) => say(out, format!("   UNEXPECTED {:?}: {}", s.code(), s.message())),
    }

    say(out, "");
    say(
        out,
        format!("== 3. {TAX_DEPT} -> Lookup civil_status.birth_record (it holds no grant)"),
    );
    let tax = fed.client(TAX_DEPT).await?;
    match tax
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: "civil_status.birth_record".into(),
            query_json: query.clone(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => say(out, "   UNEXPECTED: data released without a grant"),
        Err(s) => {
            say(out, format!("   REFUSED {:?}: {}", s.code(), s.message()));
            report.no_grant_code = Some(s.code());
        }
    }

    say(out, "");
    say(
        out,
        format!("== 4. {JUDICIAL_OFFICE} -> Lookup asking also for /native_place, outside its grant"),
    );
    match office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: "civil_status.birth_record".into(),
            query_json: query.clone(),
            purpose: PURPOSE_CERTIFICATE.into(),
            fields: vec!["/full_name".into(), "/native_place".into()],
            ..Default::default()
        })
        .await
    {
        Ok(_) => say(out, "   UNEXPECTED: an ungranted field was released"),
        Err(s) => {
            say(out, format!("   WITHHELD {:?}: {}", s.code(), s.message()));
            say(
                out,
                "   (the broker refuses rather than trims, so the office knows what it lacks)",
            );
            report.ungranted_field_code = Some(s.code());
        }
    }

    say(out, "");
    say(
        out,
        format!("== 5. {JUDICIAL_OFFICE} -> Collect birth + marriage + criminal record in one call"),
    );
    let types = [
        "civil_status.birth_record",
        "civil_status.marriage_record",
        "judicial.criminal_record_extract",
    ];
    let collected = office
        .exchange()
        .collect(pb::CollectRequest {
            query_json: query.clone(),
            purpose: PURPOSE_CERTIFICATE.into(),
            items: types
                .iter()
                .map(|t| pb::CollectItem {
                    record_type: t.to_string(),
                    ..Default::default()
                })
                .collect(),
            request_id: "application-2026-000417".into(),
        })
        .await
        .map_err(crate::client::status_error)?
        .into_inner();
    for r in &collected.results {
        match &r.result {
            Some(pb::collect_result::Result::Record(rec)) => {
                say(
                    out,
                    format!("   {:<34} OK   {}", r.record_type, compact(&rec.record_json)),
                );
                report.collect.push((r.record_type.clone(), true));
            }
            Some(pb::collect_result::Result::Error(e)) => {
                say(
                    out,
                    format!(
                        "   {:<34} {}   {}",
                        r.record_type,
                        tonic::Code::from(e.code).description(),
                        e.message
                    ),
                );
                report.collect.push((r.record_type.clone(), false));
            }
            None => report.collect.push((r.record_type.clone(), false)),
        }
    }

    say(out, "");
    say(
        out,
        format!("== 6. {CITIZEN_PORTAL} -> SubjectHistory: who looked at this citizen's data, when and why"),
    );
    let portal = fed.client(CITIZEN_PORTAL).await?;
    // The portal sends the national id over mTLS; the broker hashes it and
    // matches the keyed hashes in the log, which never stores it in clear.
    let history = portal
        .audit()
        .subject_history(pb::SubjectHistoryRequest {
            subject_key: subject.clone(),
            since: None,
            limit: 50,
            page_token: String::new(),
        })
        .await
        .map_err(crate::client::status_error)?
        .into_inner()
        .accesses;
    for a in history.iter().rev() {
        let when = a.time.as_ref().map(crate::commands::format_ts).unwrap_or_default();
        say(
            out,
            format!(
                "   {when}  {:<22} {:<34} {:<8} purpose {}",
                a.consumer,
                a.record_type,
                pb::Outcome::try_from(a.outcome)
                    .map(|o| o.as_str_name().trim_start_matches("OUTCOME_").to_lowercase())
                    .unwrap_or_default(),
                a.purpose
            ),
        );
    }
    report.history = history;

    say(out, "");
    say(
        out,
        format!("== 7. {STATE_AUDIT} checks the office's receipt against the signed log"),
    );
    let auditor = fed.client(STATE_AUDIT).await?;
    if let Some(rc) = &report.receipt {
        let mut proof = None;
        for _ in 0..50 {
            match auditor
                .audit()
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    log_id: rc.log_id.clone(),
                    sequence: rc.sequence,
                    tree_size: 0,
                })
                .await
            {
                Ok(p) => {
                    proof = Some(p.into_inner());
                    break;
                }
                // The next tree head is signed within the signing interval.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        let key = auditor
            .audit()
            .get_public_key(pb::GetPublicKeyRequest {
                log_id: rc.log_id.clone(),
            })
            .await
            .map_err(crate::client::status_error)?
            .into_inner();
        if let Some(p) = proof {
            let ok = crate::commands::verify_inclusion_proof(&p, &key.public_key).is_ok();
            report.receipt_verified = ok;
            say(
                out,
                format!(
                    "   entry #{} is in the tree of size {} signed by log {}…: {}",
                    p.sequence,
                    p.tree_size,
                    p.log_id.get(..12).unwrap_or(&p.log_id),
                    if ok { "VERIFIED" } else { "NOT VERIFIED" }
                ),
            );
        }
    }
    Ok(report)
}

fn compact(json: &str) -> String {
    let s = json.chars().take(90).collect::<String>();
    if json.chars().count() > 90 {
        format!("{s}…")
    } else {
        s
    }
}

/// `lienthong demo`.
pub async fn run(options: DemoOptions) -> Result<()> {
    let dir = options.federation.dir.clone();
    let mut out = std::io::stdout();
    say(
        &mut out,
        "lienthong demo: a federation of Vietnamese agency registers on one machine",
    );
    say(&mut out, format!("   directory: {}", dir.display()));
    say(
        &mut out,
        "   generating certificates, starting the broker (SQLite) and two registers…",
    );
    let fed = Federation::start(options.federation.clone())
        .await
        .context("starting the demo federation")?;
    say(
        &mut out,
        format!(
            "   broker {} · civil-status register {} · judicial-records register {}",
            fed.broker_url,
            fed.registers[0].url(),
            fed.registers[1].url()
        ),
    );
    say(
        &mut out,
        format!(
            "   members admitted, {} record types registered, grants created",
            lienthong_provider::demo::demo_schemas().len()
        ),
    );
    let report = story(&fed, &mut out).await?;
    let ok = report.birth_record.is_some()
        && report.no_grant_code == Some(tonic::Code::PermissionDenied)
        && report.ungranted_field_code == Some(tonic::Code::PermissionDenied)
        && report.receipt_verified;
    say(&mut out, "");
    if options.keep_running {
        // SIGTERM too: `kill`, systemd and container runtimes stop it so, and
        // the federation must still sign its final tree heads and remove its
        // temporary directory, CA key included.
        let stop = crate::shutdown_signal();
        let certs = fed.certs.display().to_string();
        say(
            &mut out,
            "== The federation keeps running (Ctrl-C or SIGTERM to stop). Try:",
        );
        say(
            &mut out,
            format!("   export LIENTHONG_BROKER={} LIENTHONG_CERTS={certs}", fed.broker_url),
        );
        say(&mut out, format!("   lienthong --as {ADMIN} member list"));
        say(
            &mut out,
            format!("   lienthong --as {ADMIN} grant list --consumer {JUDICIAL_OFFICE}"),
        );
        say(&mut out, "   lienthong --as hanoi-judicial-office schema list");
        say(
            &mut out,
            format!(
                "   lienthong --as {JUDICIAL_OFFICE} lookup --type civil_status.birth_record --query '{{\"national_id\":\"{}\"}}' --purpose {PURPOSE_CERTIFICATE}",
                lienthong_provider::demo::citizen_national_id(fed.options.seed, 7)
            ),
        );
        say(
            &mut out,
            format!("   lienthong --as {STATE_AUDIT} audit query --limit 10"),
        );
        say(
            &mut out,
            format!(
                "   lienthong --as {STATE_AUDIT} audit verify --state {}/verifier-state.json",
                dir.display()
            ),
        );
        if let Some(rc) = &report.receipt {
            say(
                &mut out,
                format!(
                    "   lienthong --as {JUDICIAL_OFFICE} audit receipt --log {} --sequence {} --leaf-hash {}",
                    rc.log_id,
                    rc.sequence,
                    hex::encode(&rc.leaf_hash)
                ),
            );
        }
        // The address bound, not the one asked for: `127.0.0.1:0` picks a port.
        if let Some(m) = fed.broker.metrics_addr {
            say(&mut out, format!("   curl http://{m}/metrics"));
        }
        say(&mut out, format!("   broker config: {}", fed.config_path.display()));
        stop.await;
        say(&mut out, "stopping…");
    }
    fed.shutdown().await?;
    if !ok {
        anyhow::bail!("the demo story did not go as expected; see the transcript above");
    }
    say(
        &mut out,
        "Done: the applicant brought no paper; every access is in the signed log.",
    );
    Ok(())
}

/// The demo's grant list, re-exported for the README and tests.
pub fn grants() -> Vec<pb::CreateGrantRequest> {
    federation::demo_grants()
}
