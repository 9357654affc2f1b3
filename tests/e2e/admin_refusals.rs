//! Admin and registry requests refused, and what the CLI shows of what
//! members typed: every refusal is audited without the secrets it carried,
//! says what to change, and no member's text can forge or hide a row on an
//! auditor's terminal.

use crate::harness::*;
use lienthong_cli::federation::{CITIZEN_PORTAL, JUDICIAL_OFFICE, STATE_AUDIT};

/// An escape sequence (erase the line, back to its start) and a line that
/// reads like another entry of `audit query`.
const FORGED: &str = "\u{1b}[2K\r\n#999    2026-01-01T00:00:00Z federation-admin grant.revoke allowed forged";

#[tokio::test]
async fn member_text_cannot_forge_or_hide_rows_in_the_cli() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 3);
    let mut lookup = birth_lookup(&subject, &format!("law-28-2009-qh12/art-45{FORGED}"));
    lookup.request_id = format!("req{FORGED}");
    office.exchange().lookup(lookup).await.unwrap_err();

    let (ok, out) = cli_as(&fed, STATE_AUDIT, &["audit", "query", "--actor", JUDICIAL_OFFICE]).await;
    assert!(ok, "{out}");
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
    assert!(
        out.lines().all(|l| !l.starts_with("#999")),
        "a member's purpose started a row: {out}"
    );
    assert!(out.contains("\\u{1b}[2K\\r\\n#999"), "shown escaped: {out}");

    // A citizen's history shows the attempt, on one line.
    let (ok, out) = cli_as(&fed, CITIZEN_PORTAL, &["audit", "history", "--subject", &subject]).await;
    assert!(ok, "{out}");
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
    assert!(out.lines().all(|l| !l.starts_with("#999")), "{out}");

    // `--json` keeps the entries as they are, in JSON's own escapes.
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["--json", "audit", "query", "--actor", JUDICIAL_OFFICE],
    )
    .await;
    assert!(ok, "{out}");
    let purposes: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["purpose"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(purposes.iter().any(|p| p.ends_with(FORGED)), "{purposes:?}");
    fed.shutdown().await.unwrap();
}
