//! An auditor's verifier in another language, written from the README and
//! the .proto files alone (`independent_verifier.py`), checks a real broker's
//! tree heads, a receipt, every inclusion and consistency proof, and an
//! `audit export` against its head: the documentation is enough to verify
//! the log without lienthong.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT};
use std::process::Command;
use std::time::Duration;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/independent_verifier.py");

#[tokio::test(flavor = "multi_thread")]
async fn a_verifier_written_from_the_docs_alone_checks_heads_proofs_and_an_export() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, cryptography"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the independent verifier needs Python 3 with the packages in tests/e2e/requirements.txt: \
         run ./scripts/test.sh, or python3 -m pip install -r tests/e2e/requirements.txt ({probe:?})"
    );
    let (dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut last = 0;
    for i in 0..3 {
        let answer = look_up_birth(&office, &citizen_id(&fed, i)).await.unwrap().into_inner();
        last = answer.receipt.unwrap().sequence;
    }
    // Heads are signed every `audit.sign_interval_ms`: wait for one over the lookups.
    let auditor = client(&fed, STATE_AUDIT).await;
    let signed = eventually(Duration::from_secs(30), async || {
        let head = auditor
            .audit()
            .get_signed_tree_head(pb::GetSignedTreeHeadRequest::default())
            .await;
        head.is_ok_and(|h| h.into_inner().tree_size > last)
    })
    .await;
    assert!(signed, "no tree head was signed over the lookups");
    // The head first, then the export, as the README says.
    let (ok, sth) = cli_as(&fed, STATE_AUDIT, &["audit", "sth", "--json"]).await;
    assert!(ok, "{sth}");
    let (ok, key) = cli_as(&fed, STATE_AUDIT, &["audit", "key", "--json"]).await;
    assert!(ok, "{key}");
    let export = dir.path().join("log.jsonl");
    let (ok, out) = cli_as(
        &fed,
        STATE_AUDIT,
        &["audit", "export", "--out", export.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    let sth_path = dir.path().join("sth.json");
    let key_path = dir.path().join("key.json");
    std::fs::write(&sth_path, sth).unwrap();
    std::fs::write(&key_path, key).unwrap();

    let settings = serde_json::json!({
        "target": fed.broker_url.trim_start_matches("https://"),
        "certs": fed.certs,
        "consumer": JUDICIAL_OFFICE,
        "auditor": STATE_AUDIT,
        "record_type": "civil_status.birth_record",
        "purpose": PURPOSE_CERTIFICATE,
        "subject": citizen_id(&fed, 4),
        "export": export,
        "sth": sth_path,
        "key": key_path,
    });
    let (summary, _) = run_python(SCRIPT, settings).await;
    let checks: Vec<&str> = summary["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for want in [
        "the receipt is in the signed tree",
        "the newer head extends the first",
        "the newest head extends the first",
        "every inclusion and consistency proof up to the newest head",
        "the export verifies against the head",
        "an altered export fails",
    ] {
        assert!(checks.contains(&want), "{want}: {summary}");
    }
    assert!(summary["proved_up_to"].as_u64().unwrap() > 3, "{summary}");
    fed.shutdown().await.unwrap();
}
