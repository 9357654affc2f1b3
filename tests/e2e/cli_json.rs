//! `--json` on every command that prints results: a script gets JSON or an
//! error, never a table it cannot parse; and the audit commands' small
//! promises (standard output for `export --out -`, `--sth` only with
//! `--export`, times in RFC 3339).

use crate::harness::*;
use lienthong_cli::federation::{ADMIN, CITIZEN_PORTAL, CIVIL_STATUS, STATE_AUDIT};

/// Runs the CLI as `member` with `--json` and parses what it printed.
async fn json_of(fed: &lienthong_cli::federation::Federation, member: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out) = cli_as(fed, member, &all).await;
    assert!(ok, "{args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

#[tokio::test]
async fn every_listing_prints_json_when_asked() {
    let (_dir, mut fed) = federation().await;
    let members = json_of(&fed, ADMIN, &["member", "list"]).await;
    let civil = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == CIVIL_STATUS)
        .expect("the register is listed");
    assert_eq!(civil["enabled"], true);
    assert!(
        civil["roles"].as_array().unwrap().iter().any(|r| r == "provider"),
        "{civil}"
    );

    let member = json_of(&fed, ADMIN, &["member", "get", CIVIL_STATUS]).await;
    assert_eq!(member["id"], CIVIL_STATUS);
    assert!(member["created_at"].as_str().unwrap().contains('T'), "{member}");

    let endpoints = json_of(&fed, ADMIN, &["endpoint", "list"]).await;
    assert!(
        endpoints
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["provider"] == CIVIL_STATUS),
        "{endpoints}"
    );

    let types = json_of(&fed, CIVIL_STATUS, &["schema", "list"]).await;
    assert!(
        types
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "civil_status.birth_record"),
        "{types}"
    );
    let shown = json_of(&fed, CIVIL_STATUS, &["schema", "show", "civil_status.birth_record"]).await;
    assert_eq!(shown["record_schema"]["type"], "object", "{shown}");
    assert!(shown["fields"].as_array().unwrap().len() > 1, "{shown}");

    let revoked = json_of(&fed, ADMIN, &["certs", "revoked"]).await;
    assert!(revoked.is_array(), "{revoked}");

    let subject = citizen_id(&fed, 1);
    let history = json_of(&fed, CITIZEN_PORTAL, &["audit", "history", "--subject", &subject]).await;
    assert!(history.is_array(), "{history}");

    let state = fed.dir.join("verifier-state.json");
    let verified = json_of(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--state", state.to_str().unwrap()],
    )
    .await;
    let first = &verified.as_array().unwrap()[0];
    assert!(
        first["result"] == "verified" || first["result"] == "unsigned",
        "{verified}"
    );
    fed.shutdown_registers().await;
}

#[tokio::test]
async fn audit_commands_keep_their_small_promises() {
    let (_dir, mut fed) = federation().await;
    // `--out -` is standard output: JSON lines, not a file named `-`.
    let (ok, out) = cli_as(&fed, STATE_AUDIT, &["audit", "export", "--out", "-"]).await;
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("an exported line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(v["leaf"].is_string(), "{line}");
    assert!(!std::path::Path::new("-").exists());

    // A head to check against needs the export to check.
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "verify", "--sth", "/nonexistent/sth.json"],
    )
    .await;
    assert!(!ok && out.contains("--export"), "{out}");

    // A head's time reads as every other time the CLI prints (the first head
    // is signed within `audit.sign_interval_ms` of the start).
    let mut head = None;
    for _ in 0..50 {
        let (ok, out) = cli_as(&fed, STATE_AUDIT, &["audit", "sth"]).await;
        if ok {
            head = Some(out);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = head.expect("a signed tree head within 10 s");
    let signed = out.split("signed at ").nth(1).unwrap_or_default().trim();
    assert!(
        time::OffsetDateTime::parse(signed, &time::format_description::well_known::Rfc3339).is_ok(),
        "{out}"
    );

    // A grant without a rate limit is asked for in so many words.
    let (ok, out) = cli_as(
        &fed,
        ADMIN,
        &[
            "grant",
            "create",
            "--consumer",
            STATE_AUDIT,
            "--type",
            "civil_status.birth_record",
            "--field",
            "/full_name",
            "--purpose",
            "law-28-2009-qh12/art-45",
        ],
    )
    .await;
    assert!(!ok && out.contains("--rate"), "{out}");
    fed.shutdown_registers().await;
}
