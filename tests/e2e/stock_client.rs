//! A stock gRPC client in another language (Python's grpcio, with message
//! types from the broker's reflection service, no generated code) looks a
//! record up, meets the refusals, and verifies its receipt as an outside
//! auditor would. The Python side is `stock_client.py`.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{ADMIN, CITIZEN_PORTAL, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT, TAX_DEPT};

use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/stock_client.py");

/// Fails naming the fix when the stock packages are missing, rather than
/// passing without having run.
fn require_python_packages() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, grpc_health, cryptography"])
        .output();
    let ok = probe.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the stock-client test needs Python 3 with the packages in tests/e2e/requirements.txt: \
         run ./scripts/test.sh, or python3 -m pip install -r tests/e2e/requirements.txt ({probe:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_python_client_looks_up_meets_refusals_and_verifies_its_receipt() {
    require_python_packages();
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    admin
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 1))
        .await
        .unwrap();
    let subject = citizen_id(&fed, 11);
    let settings = serde_json::json!({
        "target": fed.broker_url.trim_start_matches("https://"),
        "certs": fed.certs,
        "consumer": JUDICIAL_OFFICE,
        "purpose": PURPOSE_CERTIFICATE,
        "limited": TAX_DEPT,
        "limited_purpose": "tax-law-38-2019/art-17",
        "auditor": STATE_AUDIT,
        "portal": CITIZEN_PORTAL,
        "subject": subject,
    });
    let (summary, stderr) = run_python(SCRIPT, settings).await;
    let checks = summary["checks"].as_array().unwrap();
    assert!(checks.len() >= 30, "{summary}");

    // What the Python client saw is what the log holds: every attempt, the
    // refused ones too, under the request ids it sent.
    let outcomes: std::collections::BTreeMap<String, i64> =
        serde_json::from_value(summary["outcomes"].clone()).unwrap();
    let want = [
        ("stock-client-1", pb::Outcome::Allowed),
        ("stock-client-2", pb::Outcome::Denied),
        ("stock-client-3", pb::Outcome::Invalid),
        ("stock-client-4", pb::Outcome::Allowed),
        ("stock-client-5", pb::Outcome::Denied),
    ];
    let logged = logged(&fed, pb::EntryFilter::default()).await;
    for (request_id, outcome) in want {
        assert_eq!(
            outcomes.get(request_id),
            Some(&(outcome as i64)),
            "{request_id}: {summary}"
        );
        let entry = logged.iter().find(|e| e.request_id == request_id).unwrap();
        assert_eq!(entry.outcome(), outcome, "{request_id}");
    }
    let first = logged.iter().find(|e| e.request_id == "stock-client-1").unwrap();
    assert_eq!(summary["sequence"], first.sequence);
    assert!(!stderr.contains(&subject));
    fed.shutdown().await.unwrap();
}
