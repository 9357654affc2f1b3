//! Admin and registry requests refused, and what the CLI shows of what
//! members typed: every refusal is audited without the secrets it carried,
//! says what to change, and no member's text can forge or hide a row on an
//! auditor's terminal.

use crate::harness::*;
use bytes::{Buf, BufMut};
use lienthong::v1 as pb;
use lienthong_cli::federation::{ADMIN, CITIZEN_PORTAL, CIVIL_STATUS, JUDICIAL_OFFICE, STATE_AUDIT, TAX_DEPT};
use tonic::Code;

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
    // The broker stores the refused text escaped, and the CLI escapes what
    // it prints again (a backslash included): readable, and inert.
    assert!(out.contains("u{1b}[2K") && out.contains("#999"), "shown escaped: {out}");

    // A citizen's history shows the attempt, on one line.
    let (ok, out) = cli_as(&fed, CITIZEN_PORTAL, &["audit", "history", "--subject", &subject]).await;
    assert!(ok, "{out}");
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
    assert!(out.lines().all(|l| !l.starts_with("#999")), "{out}");

    // `--json` keeps the entries as they are stored (the broker stored the
    // refused text escaped), in JSON's own escapes.
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
    let stored: String = FORGED.chars().flat_map(char::escape_default).collect();
    assert!(purposes.iter().any(|p| p.ends_with(&stored)), "{purposes:?}");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_endpoint_url_with_a_secret_is_refused_without_repeating_it() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    for url in [
        "https://user:Pa55word@127.0.0.1:7496",
        "https://127.0.0.1:7496?token=Pa55word",
        "http://user:Pa55word@127.0.0.1:7496",
    ] {
        let err = admin
            .admin()
            .add_endpoint(pb::AddEndpointRequest {
                provider: CIVIL_STATUS.into(),
                url: url.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
        assert!(!err.message().contains("Pa55word"), "{}", err.message());
        assert!(err.message().contains("https://host:port"), "{}", err.message());
    }
    let refused: Vec<_> = admin_entries(&fed)
        .await
        .into_iter()
        .filter(|e| e.action == "endpoint.add" && e.outcome == pb::Outcome::Invalid as i32)
        .collect();
    assert_eq!(refused.len(), 3, "each refusal is audited");
    for e in &refused {
        assert!(!e.leaf_json.contains("Pa55word"), "{}", e.leaf_json);
    }
    fed.shutdown().await.unwrap();
}

fn adoption(owner: &str) -> pb::RecordTypeDefinition {
    pb::RecordTypeDefinition {
        name: "civil_status.adoption_record".into(),
        description: "Adoption record".into(),
        owner: owner.into(),
        query_schema_json: serde_json::json!({"type":"object","properties":{"national_id":{"type":"string"}},"required":["national_id"]}).to_string(),
        record_schema_json: serde_json::json!({"type":"object","properties":{"full_name":{"type":"string"}}}).to_string(),
        subject_key: "national_id".into(),
    }
}

#[tokio::test]
async fn refused_compatibility_checks_are_audited_and_a_missing_owner_is_named() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let err = office
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest {
            definition: Some(adoption(CIVIL_STATUS)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = office
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest { definition: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // No owner (or no name) is a mistake to correct, not an attempt on
    // another member's record types.
    for (what, d) in [
        ("definition.owner is required", adoption("")),
        (
            "definition.name is required",
            pb::RecordTypeDefinition {
                name: String::new(),
                ..adoption(CIVIL_STATUS)
            },
        ),
    ] {
        let err = office
            .schemas()
            .check_compatibility(pb::CheckCompatibilityRequest {
                definition: Some(d.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{}", err.message());
        let err = office
            .schemas()
            .register(pb::RegisterRequest {
                definition: Some(d),
                compatibility: pb::Compatibility::Backward as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{}", err.message());
    }

    let checks: Vec<_> = admin_entries(&fed)
        .await
        .into_iter()
        .filter(|e| e.actor == JUDICIAL_OFFICE && e.action == "schema.check")
        .collect();
    let outcomes: Vec<i32> = checks.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [
            pb::Outcome::Denied as i32,
            pb::Outcome::Invalid as i32,
            pb::Outcome::Invalid as i32,
            pb::Outcome::Invalid as i32
        ],
        "{checks:?}"
    );
    assert_eq!(checks[0].target, "civil_status.adoption_record");
    assert!(
        checks[2].reason.contains("definition.owner is required"),
        "{:?}",
        checks[2]
    );
    fed.shutdown().await.unwrap();
}

fn at(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    }
}

#[tokio::test]
async fn a_grants_window_and_id_are_refused_in_words_that_say_what_is_wrong() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let now = time::OffsetDateTime::now_utc();
    let refused = |change: Box<dyn FnOnce(&mut pb::CreateGrantRequest)>| {
        let admin = admin.clone();
        async move {
            let mut g = birth_grant(TAX_DEPT, &["/full_name"], 0);
            change(&mut g);
            let err = admin.admin().create_grant(g).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            err.message().to_owned()
        }
    };

    let past = at(time::macros::datetime!(2020-01-01 00:00:00 UTC));
    let m = refused(Box::new(move |g| g.valid_until = Some(past))).await;
    assert!(m.contains("valid_until 2020-01-01T00:00:00Z is already past"), "{m}");

    let far = at(time::macros::datetime!(9999-12-31 00:00:00 UTC));
    let m = refused(Box::new(move |g| g.valid_from = Some(far))).await;
    assert!(
        m.contains("valid_from 9999-12-31T00:00:00Z is more than 10 years ahead"),
        "{m}"
    );

    // Carried into the seconds, these nanos would be another time.
    let soon = now + time::Duration::days(1);
    let m = refused(Box::new(move |g| {
        g.valid_from = Some(prost_types::Timestamp {
            nanos: 2_000_000_000,
            ..at(soon)
        })
    }))
    .await;
    assert!(m.contains("valid_from.nanos is 2000000000"), "{m}");
    let m = refused(Box::new(move |g| {
        g.valid_until = Some(prost_types::Timestamp { nanos: -1, ..at(soon) })
    }))
    .await;
    assert!(m.contains("valid_until.nanos is -1"), "{m}");

    let err = admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: "g".repeat(5_000),
            reason: "typo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("is not a grant id") && err.message().len() < 300,
        "{} bytes: {}",
        err.message().len(),
        err.message()
    );
    // A well-formed id of no grant is still NOT_FOUND.
    let err = admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: format!("g-{}", "0".repeat(32)),
            reason: "typo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_grants_audit_entry_holds_its_window_and_reviewed_version() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let now = time::OffsetDateTime::now_utc();
    let mut old = birth_grant(TAX_DEPT, &["/full_name"], 0);
    old.valid_from = Some(at(time::macros::datetime!(2001-02-03 04:05:06 UTC)));
    let old = admin.admin().create_grant(old).await.unwrap().into_inner();
    let mut later = birth_grant(TAX_DEPT, &["/full_name"], 0);
    later.valid_from = Some(at(now + time::Duration::days(365)));
    later.valid_until = Some(at(now + time::Duration::days(730)));
    let later = admin.admin().create_grant(later).await.unwrap().into_inner();

    let entries = admin_entries(&fed).await;
    let detail = |id: &str| {
        entries
            .iter()
            .find(|e| e.action == "grant.create" && e.target == id)
            .map(|e| e.reason.clone())
            .unwrap()
    };
    let old = detail(&old.id);
    assert!(
        old.contains("valid_from=2001-02-03T04:05:06Z")
            && old.contains("valid_until=unbounded")
            && old.contains("reviewed_version=1"),
        "{old}"
    );
    let later = detail(&later.id);
    assert!(
        !later.contains("unbounded") && later.contains("valid_until="),
        "{later}"
    );
    assert_ne!(
        old.replace("2001-02-03T04:05:06Z", ""),
        later,
        "the entries tell the grants apart"
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn grant_list_says_what_each_grant_allows_and_who_made_it() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let kept = granted(&admin, birth_grant(TAX_DEPT, &["/full_name"], 0)).await;
    let revoked = granted(&admin, birth_grant(TAX_DEPT, &["/birth_date"], 0)).await;
    revoke(&admin, &revoked.id, "inspection closed").await;
    admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: TAX_DEPT.into(),
            reason: "certificate compromised".into(),
        })
        .await
        .unwrap();

    let (ok, out) = cli_as(&fed, ADMIN, &["grant", "list", "--consumer", TAX_DEPT]).await;
    assert!(ok, "{out}");
    let line = |id: &str| out.lines().find(|l| l.starts_with(id)).unwrap().to_owned();
    let kept_line = line(&kept.id);
    assert!(
        kept_line.contains("CONSUMER DISABLED (certificate compromised)") && !kept_line.contains(" active"),
        "{kept_line}"
    );
    assert!(kept_line.contains(&format!("by {ADMIN}")), "{kept_line}");
    assert!(kept_line.contains("created 20"), "{kept_line}");
    let revoked_line = line(&revoked.id);
    assert!(
        revoked_line.contains("REVOKED at 20") && revoked_line.contains("(inspection closed)"),
        "{revoked_line}"
    );

    let (ok, out) = cli_as(&fed, ADMIN, &["--json", "grant", "list", "--consumer", TAX_DEPT]).await;
    assert!(ok, "{out}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2, "{out}");
    let kept_json = list.iter().find(|g| g["id"] == kept.id.as_str()).unwrap();
    assert_eq!(kept_json["state"], "consumer_disabled");
    assert_eq!(kept_json["consumer_enabled"], false);
    assert_eq!(kept_json["created_by"], ADMIN);
    assert!(kept_json["valid_until"].is_null());
    let revoked_json = list.iter().find(|g| g["id"] == revoked.id.as_str()).unwrap();
    assert_eq!(revoked_json["state"], "revoked");
    assert!(revoked_json["revoked_at"].as_str().unwrap().starts_with("20"));

    // A consumer that is no member is a typo, not a consumer without grants.
    let (ok, out) = cli_as(&fed, ADMIN, &["grant", "list", "--consumer", "nobody"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("NotFound") && out.contains("\"nobody\" is not a registered member"),
        "{out}"
    );
    fed.shutdown().await.unwrap();
}

/// Sends and receives message bytes as they are.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

#[tokio::test]
async fn an_unknown_method_is_named_with_where_to_find_the_others() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    for path in ["/lienthong.v1.Exchange/Nope", "/foo.Bar/Baz"] {
        let mut grpc = tonic::client::Grpc::new(office.channel.clone());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(Vec::new()),
                http::uri::PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
        assert!(
            err.message().contains(&format!("{path:?}")) && err.message().contains("reflection"),
            "{path}: {}",
            err.message()
        );
    }
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_grant_repeating_a_live_one_is_refused_naming_it_and_audited() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let first = granted(&admin, birth_grant(TAX_DEPT, &["/full_name", "/birth_date"], 60)).await;
    // The same in effect: fields and purposes in another order, no start.
    let mut again = birth_grant(TAX_DEPT, &["/birth_date", "/full_name", "/full_name"], 60);
    again.purposes.push(again.purposes[0].clone());
    let err = admin.admin().create_grant(again.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&first.id), "{}", err.message());
    let refusal = admin_entries(&fed)
        .await
        .into_iter()
        .find(|e| e.action == "grant.create" && e.outcome == pb::Outcome::Invalid as i32)
        .expect("the refusal is audited");
    assert!(refusal.reason.contains(&first.id), "{}", refusal.reason);
    let listed = |grants: Vec<pb::Grant>| grants.into_iter().filter(|g| g.consumer == TAX_DEPT).count();
    let list = || async {
        admin
            .admin()
            .list_grants(pb::ListGrantsRequest {
                consumer: TAX_DEPT.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .grants
    };
    assert_eq!(listed(list().await), 1);

    // The CLI says the same.
    let (ok, out) = cli_as(
        &fed,
        ADMIN,
        &[
            "grant",
            "create",
            "--consumer",
            TAX_DEPT,
            "--type",
            "civil_status.birth_record",
            "--field",
            "/full_name",
            "--field",
            "/birth_date",
            "--purpose",
            "tax-law-38-2019/art-17",
            "--rate",
            "60",
        ],
    )
    .await;
    assert!(!ok && out.contains(&first.id), "{out}");

    // Anything that changes what it allows is another grant.
    granted(&admin, birth_grant(TAX_DEPT, &["/full_name", "/birth_date"], 61)).await;
    // And once the first is revoked, it may be made again.
    revoke(&admin, &first.id, "replaced").await;
    granted(&admin, again).await;
    assert_eq!(listed(list().await), 3);
    fed.shutdown().await.unwrap();
}

/// A federation started again in its directory (`lienthong demo --dir D`
/// twice) finds its grants made, and does not make them twice.
#[tokio::test]
async fn a_federation_started_again_in_its_directory_keeps_one_copy_of_each_grant() {
    let (dir, fed) = federation().await;
    fed.shutdown().await.unwrap();
    let fed =
        lienthong_cli::federation::Federation::start(lienthong_cli::federation::FederationOptions::new(dir.path()))
            .await
            .expect("starts again in its directory");
    let grants = client(&fed, ADMIN)
        .await
        .admin()
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(
        grants.len(),
        lienthong_cli::federation::demo_grants().len(),
        "{grants:#?}"
    );
    fed.shutdown().await.unwrap();
}
