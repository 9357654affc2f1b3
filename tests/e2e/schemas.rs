//! Schema registry end to end: refusals, versions, deprecation, CLI.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{ADMIN, CIVIL_STATUS, JUDICIAL_OFFICE, JUDICIAL_RECORDS, PURPOSE_CERTIFICATE};
use serde_json::json;
use tonic::Code;

fn def(name: &str, query: serde_json::Value, record: serde_json::Value) -> pb::RecordTypeDefinition {
    pb::RecordTypeDefinition {
        name: name.into(),
        description: "Adoption record (Law on Adoption 52/2010/QH12)".into(),
        owner: CIVIL_STATUS.into(),
        query_schema_json: query.to_string(),
        record_schema_json: record.to_string(),
        subject_key: "national_id".into(),
    }
}

fn query_schema() -> serde_json::Value {
    json!({"type":"object","properties":{"national_id":{"type":"string","pattern":"^[0-9]{12}$"}},"required":["national_id"],"additionalProperties":false})
}

fn record_schema(extra: serde_json::Value) -> serde_json::Value {
    let mut props = json!({"full_name":{"type":"string"},"adoption_date":{"type":"string","format":"date"}});
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    json!({"type":"object","properties":props,"required":["full_name"]})
}

#[tokio::test]
async fn bad_registrations_are_refused_and_nothing_is_stored() {
    let (_dir, fed) = federation().await;
    let civil = client(&fed, CIVIL_STATUS).await;
    let register = |d: pb::RecordTypeDefinition| {
        let mut c = civil.schemas();
        async move {
            c.register(pb::RegisterRequest {
                definition: Some(d),
                compatibility: 0,
            })
            .await
        }
    };
    let name = "civil_status.adoption_record";
    let mut malformed = def(name, query_schema(), record_schema(json!({})));
    malformed.record_schema_json = "{\"type\": \"object\", ".into();
    let big = "x".repeat(300 * 1024);
    let cases: Vec<(pb::RecordTypeDefinition, &str)> = vec![
        (malformed, "JSON"),
        (
            def(
                name,
                query_schema(),
                json!({"type":"object","properties":{"full_name":{"type":12}}}),
            ),
            "/properties/full_name/type",
        ),
        (
            def(
                name,
                query_schema(),
                json!({"type":"object","properties":{"father":{"$ref":"https://example.org/person.json"}}}),
            ),
            "https://example.org/person.json",
        ),
        (
            def(
                name,
                query_schema(),
                record_schema(json!({"note":{"type":"string","description": big}})),
            ),
            "limit of 262144 bytes",
        ),
        (
            def("Civil Status.Adoption", query_schema(), record_schema(json!({}))),
            "Civil Status.Adoption",
        ),
        // A guardian who has a guardian, who has...: the broker could not
        // list the fields it may release inside the last one.
        (
            def(
                name,
                query_schema(),
                json!({"type":"object","properties":{"full_name":{"type":"string"},"guardian":{"$ref":"#/$defs/person"}},
                       "$defs":{"person":{"type":"object","properties":{"full_name":{"type":"string"},"guardian":{"$ref":"#/$defs/person"}}}}}),
            ),
            "/$defs/person/properties/guardian/$ref",
        ),
        // Two kilobytes of pattern that would compile to megabytes.
        (
            def(
                name,
                query_schema(),
                record_schema(json!({"nickname":{"type":"string","pattern":"\\p{L}{240}1"}})),
            ),
            "record_schema at /properties/nickname/pattern cannot be compiled: the pattern compiles to more than 2 MiB, the limit: a bounded repetition {m,n}",
        ),
        // A typo would leave the format unchecked.
        (
            def(
                name,
                query_schema(),
                record_schema(json!({"adopted_on":{"type":"string","format":"dat"}})),
            ),
            "record_schema at /properties/adopted_on/format cannot be compiled: format \"dat\"",
        ),
    ];
    for (d, needle) in cases {
        let err = register(d).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(needle),
            "{:?} should name {needle:?}",
            err.message()
        );
    }
    // Another agency's integrator may not register civil-status types.
    let judicial = client(&fed, JUDICIAL_RECORDS).await;
    let err = judicial
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(def(name, query_schema(), record_schema(json!({})))),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains(CIVIL_STATUS), "{}", err.message());

    let err = civil
        .schemas()
        .list_versions(pb::ListVersionsRequest { name: name.into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "nothing was stored");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn versions_compatibility_and_deprecation() {
    let (_dir, fed) = federation().await;
    let civil = client(&fed, CIVIL_STATUS).await;
    let name = "civil_status.adoption_record";
    let v1 = def(name, query_schema(), record_schema(json!({})));
    let r = civil
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(v1.clone()),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    assert_eq!(r.version.as_ref().unwrap().version, 1);
    // Idempotent.
    let again = civil
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(v1),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.version.unwrap().version, 1);
    // A compatible change: a new optional property.
    let v2 = def(name, query_schema(), record_schema(json!({"court":{"type":"string"}})));
    let r = civil
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(v2),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version.unwrap().version, 2);
    // A breaking one: property removed. Check lists it; Register refuses it.
    let broken = def(
        name,
        query_schema(),
        json!({"type":"object","properties":{"full_name":{"type":"string"}}}),
    );
    let check = civil
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest {
            definition: Some(broken.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.compatible);
    assert_eq!(check.against_version, 2);
    assert!(
        check
            .changes
            .iter()
            .any(|c| c.kind == "record_property_removed" && c.pointer.contains("adoption_date")),
        "{:?}",
        check.changes
    );
    let err = civil
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(broken.clone()),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Compatibility NONE is for admins only.
    let none = pb::Compatibility::None as i32;
    let err = civil
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(broken.clone()),
            compatibility: none,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let admin = client(&fed, ADMIN).await;
    let r = admin
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(broken),
            compatibility: none,
        })
        .await
        .unwrap()
        .into_inner();
    let v3 = r.version.unwrap();
    assert_eq!((v3.version, v3.compatibility), (3, none));

    // Deprecating a version: lookups pinned to it carry a notice.
    let birth = "civil_status.birth_record";
    civil
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: birth.into(),
            version: 1,
            note: "use version 2".into(),
        })
        .await
        .unwrap();
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut req = birth_lookup(&citizen_id(&fed, 12), PURPOSE_CERTIFICATE);
    req.schema_version = 1;
    let r = office.exchange().lookup(req).await.unwrap().into_inner();
    assert!(
        r.deprecation_notice.contains("use version 2"),
        "{:?}",
        r.deprecation_notice
    );

    // Version 0 means the current one for lookups; deprecating it must name it.
    let err = client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: birth.into(),
            version: 0,
            note: "use version 3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("version is required"), "{}", err.message());

    // A second deprecation with a new note: the note lookups carry changes.
    client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: birth.into(),
            version: 1,
            note: "use version 3 from January".into(),
        })
        .await
        .unwrap();
    let mut req = birth_lookup(&citizen_id(&fed, 12), PURPOSE_CERTIFICATE);
    req.schema_version = 1;
    let r = office.exchange().lookup(req).await.unwrap().into_inner();
    assert!(
        r.deprecation_notice.contains("use version 3"),
        "{:?}",
        r.deprecation_notice
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn cli_schema_commands_work_as_documented() {
    let (_dir, fed) = bare_federation().await;
    let (ok, out) = cli_as(
        &fed,
        ADMIN,
        &[
            "member",
            "add",
            CIVIL_STATUS,
            "--name",
            "Civil status register",
            "--role",
            "provider",
            "--role",
            "integrator",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../provider/schemas/civil_status.birth_record.json");
    let file = file.to_str().unwrap();
    let (ok, out) = cli_as(&fed, CIVIL_STATUS, &["schema", "check", "--file", file]).await;
    assert!(ok && out.contains("new record type"), "{out}");
    let (ok, out) = cli_as(&fed, CIVIL_STATUS, &["schema", "register", "--file", file]).await;
    assert!(ok && out.contains("registered"), "{out}");
    let (ok, out) = cli_as(&fed, CIVIL_STATUS, &["schema", "list"]).await;
    assert!(ok && out.contains("civil_status.birth_record"), "{out}");
    let (ok, out) = cli_as(
        &fed,
        CIVIL_STATUS,
        &["schema", "show", "civil_status.birth_record", "--version", "1"],
    )
    .await;
    assert!(ok && out.contains("/father/full_name"), "{out}");
    fed.shutdown().await.unwrap();
}

/// Checking a definition compiles its schemas as registering does: only a
/// member that may register it may ask, so that any member cannot make
/// the broker compile patterns at will.
#[tokio::test]
async fn only_those_who_may_register_a_definition_may_check_it() {
    let (_dir, fed) = federation().await;
    let request = || pb::CheckCompatibilityRequest {
        definition: Some(def(
            "civil_status.adoption_record",
            query_schema(),
            record_schema(json!({})),
        )),
    };
    for member in [JUDICIAL_OFFICE, JUDICIAL_RECORDS] {
        let err = client(&fed, member)
            .await
            .schemas()
            .check_compatibility(request())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{member}: {err:?}");
        assert!(err.message().contains(CIVIL_STATUS), "{}", err.message());
    }
    for member in [CIVIL_STATUS, ADMIN] {
        let check = client(&fed, member)
            .await
            .schemas()
            .check_compatibility(request())
            .await
            .unwrap()
            .into_inner();
        assert!(check.compatible && check.against_version == 0, "{member}: {check:?}");
    }
    fed.shutdown().await.unwrap();
}

/// The demo birth record's definition, changed by `change`.
fn birth_record_changed(change: impl FnOnce(&mut serde_json::Value)) -> pb::RecordTypeDefinition {
    let mut definition: serde_json::Value =
        serde_json::from_str(lienthong_provider::demo::demo_schemas()[0].1).unwrap();
    change(&mut definition);
    lienthong_cli::federation::definition_from_json(&definition.to_string()).unwrap()
}

/// Asks whether `definition` is compatible, as the owner's integrator.
async fn checked(
    fed: &lienthong_cli::federation::Federation,
    definition: pb::RecordTypeDefinition,
) -> pb::CheckCompatibilityResponse {
    client(fed, CIVIL_STATUS)
        .await
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest {
            definition: Some(definition),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A query the current version accepts must stay valid: a tightened
/// constraint on a query parameter, or on the query as a whole, would
/// refuse every consumer's lookups once registered.
#[tokio::test]
async fn a_tightened_query_constraint_is_a_breaking_change() {
    let (_dir, fed) = federation().await;
    let thirteen_digits = birth_record_changed(|d| {
        d["query_schema"]["properties"]["national_id"]["pattern"] = json!("^[0-9]{13}$");
    });
    let check = checked(&fed, thirteen_digits.clone()).await;
    assert!(!check.compatible, "{check:?}");
    assert_eq!(check.against_version, 1);
    assert_eq!(check.changes.len(), 1, "{:?}", check.changes);
    assert_eq!(
        (check.changes[0].kind.as_str(), check.changes[0].pointer.as_str()),
        ("query_constraint_changed", "/national_id")
    );
    assert!(
        check.changes[0].message.contains("pattern changed"),
        "{:?}",
        check.changes[0]
    );
    let err = client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(thirteen_digits),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("query_constraint_changed at /national_id"),
        "{}",
        err.message()
    );

    for (pointer, value, at) in [
        ("/properties/birth_date/format", json!("date-time"), "/birth_date"),
        ("/properties/national_id/maxLength", json!(0), "/national_id"),
        ("/minProperties", json!(2), ""),
        ("/dependentRequired", json!({"national_id": ["birth_date"]}), ""),
    ] {
        let changed = birth_record_changed(|d| {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            d["query_schema"].pointer_mut(parent).unwrap()[key] = value;
        });
        let check = checked(&fed, changed).await;
        assert!(
            check
                .changes
                .iter()
                .any(|c| c.kind == "query_constraint_changed" && c.pointer == at),
            "{pointer}: {check:?}"
        );
    }
    // Loosening is compatible: the pattern dropped, a description changed.
    let looser = birth_record_changed(|d| {
        let national_id = &mut d["query_schema"]["properties"]["national_id"];
        national_id.as_object_mut().unwrap().remove("pattern");
        national_id["description"] = json!("citizen identity number");
    });
    let check = checked(&fed, looser).await;
    assert!(check.compatible, "{check:?}");
    fed.shutdown().await.unwrap();
}

/// Consumers rely on what a record always holds and on the values they
/// saw: a version that makes a property optional, at any level, or changes
/// its constraints is a breaking change.
#[tokio::test]
async fn a_record_property_made_optional_or_reconstrained_is_a_breaking_change() {
    let (_dir, fed) = federation().await;
    /// A change to the definition, and the breaking change it is.
    type Case = (fn(&mut serde_json::Value), &'static str, &'static str);
    let cases: [Case; 5] = [
        (
            |d| {
                let required = d["record_schema"]["required"].as_array_mut().unwrap();
                required.retain(|p| p != "full_name");
            },
            "record_property_no_longer_required",
            "/full_name",
        ),
        (
            |d| {
                let father = d["record_schema"]["properties"]["father"].as_object_mut().unwrap();
                father.remove("required");
            },
            "record_property_no_longer_required",
            "/father/full_name",
        ),
        (
            |d| d["record_schema"]["properties"]["native_place"]["format"] = json!("email"),
            "record_constraint_changed",
            "/native_place",
        ),
        // A value consumers never saw, as with a raised maxLength.
        (
            |d| d["record_schema"]["properties"]["gender"]["enum"] = json!(["male", "female", "other"]),
            "record_constraint_changed",
            "/gender",
        ),
        (
            |d| {
                let gender = d["record_schema"]["properties"]["gender"].as_object_mut().unwrap();
                gender.remove("enum");
            },
            "record_constraint_changed",
            "/gender",
        ),
    ];
    for (change, kind, pointer) in cases {
        let definition = birth_record_changed(change);
        let check = checked(&fed, definition.clone()).await;
        assert!(!check.compatible, "{kind} {pointer}: {check:?}");
        assert!(
            check.changes.iter().any(|c| c.kind == kind && c.pointer == pointer),
            "{kind} {pointer}: {:?}",
            check.changes
        );
        let err = client(&fed, CIVIL_STATUS)
            .await
            .schemas()
            .register(pb::RegisterRequest {
                definition: Some(definition),
                compatibility: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    fed.shutdown().await.unwrap();
}

/// What only annotates, a custom `x-...` keyword included, changes no
/// answer: a version adding, changing or removing it is compatible and
/// registers.
#[tokio::test]
async fn annotations_are_not_breaking_changes() {
    let (_dir, fed) = federation().await;
    let annotated = birth_record_changed(|d| {
        let full_name = &mut d["record_schema"]["properties"]["full_name"];
        full_name["x-pii"] = json!(true);
        full_name["title"] = json!("Full name");
        full_name["deprecated"] = json!(false);
        d["record_schema"]["properties"]["place_of_birth"]["x-source"] = json!("civil status book");
        d["query_schema"]["properties"]["national_id"]["x-display"] = json!("Citizen id");
        d["query_schema"]["properties"]["national_id"]["$comment"] = json!("reviewed");
    });
    let check = checked(&fed, annotated.clone()).await;
    assert!(check.compatible, "{check:?}");
    let registered = client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(annotated),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(registered.created);
    assert_eq!(registered.version.unwrap().version, 2);
    fed.shutdown().await.unwrap();
}

/// The same schemas under another owner are a transfer, not a repeat: a
/// member that does not own the record type is refused (and audited), an
/// admin asking for BACKWARD is told how to transfer, and an admin asking
/// for NONE gets a new version under the new owner.
#[tokio::test]
async fn registering_a_record_type_under_another_owner_is_a_transfer_not_a_repeat() {
    let (_dir, fed) = federation().await;
    let birth = "civil_status.birth_record";
    let moved = birth_record_changed(|d| d["owner"] = json!(JUDICIAL_RECORDS));
    let register = |member: &'static str, compatibility: pb::Compatibility| {
        let definition = moved.clone();
        let fed = &fed;
        async move {
            client(fed, member)
                .await
                .schemas()
                .register(pb::RegisterRequest {
                    definition: Some(definition),
                    compatibility: compatibility as i32,
                })
                .await
        }
    };
    let err = register(JUDICIAL_RECORDS, pb::Compatibility::Backward)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(JUDICIAL_RECORDS) && err.message().contains(CIVIL_STATUS),
        "{}",
        err.message()
    );
    let refused = admin_entries(&fed)
        .await
        .into_iter()
        .rev()
        .find(|e| e.action == "schema.register" && e.actor == JUDICIAL_RECORDS)
        .expect("the refusal is audited");
    assert_eq!(refused.outcome, pb::Outcome::Denied as i32, "{refused:?}");
    let check = client(&fed, JUDICIAL_RECORDS)
        .await
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest {
            definition: Some(moved.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(check.code(), Code::PermissionDenied);

    let check = client(&fed, ADMIN)
        .await
        .schemas()
        .check_compatibility(pb::CheckCompatibilityRequest {
            definition: Some(moved.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.identical && !check.compatible, "{check:?}");
    let err = register(ADMIN, pb::Compatibility::Backward).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("owner_changed") && err.message().contains("compatibility NONE"),
        "{}",
        err.message()
    );

    let r = register(ADMIN, pb::Compatibility::None).await.unwrap().into_inner();
    assert!(r.created);
    let v2 = r.version.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.definition.unwrap().owner, JUDICIAL_RECORDS);
    let transfer = admin_entries(&fed)
        .await
        .into_iter()
        .rev()
        .find(|e| e.action == "schema.register" && e.target == format!("{birth}@2"))
        .expect("the transfer is audited");
    assert_eq!(transfer.outcome, pb::Outcome::Allowed as i32, "{transfer:?}");
    // Now it is judicial-records' record type, and civil-status's integrator
    // may not register it back.
    let back = birth_record_changed(|_| {});
    let err = client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(back),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    fed.shutdown().await.unwrap();
}

/// Lookups that pin no version use the newest one not deprecated: a new
/// version is checked against that one, not against a newer version an
/// admin registered without checks and then withdrew.
#[tokio::test]
async fn a_new_version_is_checked_against_the_version_lookups_use_not_a_withdrawn_one() {
    let (_dir, fed) = federation().await;
    let birth = "civil_status.birth_record";
    let without_native_place = |d: &mut serde_json::Value| {
        let record = &mut d["record_schema"];
        record["properties"].as_object_mut().unwrap().remove("native_place");
    };
    let v2 = client(&fed, ADMIN)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(birth_record_changed(without_native_place)),
            compatibility: pb::Compatibility::None as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version.unwrap().version, 2);
    client(&fed, ADMIN)
        .await
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: birth.into(),
            version: 2,
            note: "withdrawn: it dropped native_place".into(),
        })
        .await
        .unwrap();
    // Compatible with version 2, not with version 1, which lookups use.
    let v3 = birth_record_changed(|d| {
        without_native_place(d);
        d["record_schema"]["properties"]["court"] = json!({"type": "string"});
    });
    let check = checked(&fed, v3.clone()).await;
    assert_eq!(check.against_version, 1, "{check:?}");
    assert!(
        check
            .changes
            .iter()
            .any(|c| c.kind == "record_property_removed" && c.pointer == "/native_place"),
        "{check:?}"
    );
    let err = client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(v3),
            compatibility: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("with version 1"), "{}", err.message());
    fed.shutdown().await.unwrap();
}

/// Registers version 2 of the birth record, which declares the father's
/// national id.
async fn register_birth_v2_with_fathers_id(fed: &lienthong_cli::federation::Federation) {
    let mut v2: serde_json::Value = serde_json::from_str(lienthong_provider::demo::demo_schemas()[0].1).unwrap();
    v2["record_schema"]["properties"]["father"]["properties"]["national_id"] = json!({"type": "string"});
    let registered = client(fed, CIVIL_STATUS)
        .await
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(lienthong_cli::federation::definition_from_json(&v2.to_string()).unwrap()),
            compatibility: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.version.unwrap().version, 2);
}

/// A grant of birth-record `fields` to the tax department.
async fn tax_grant(fed: &lienthong_cli::federation::Federation, fields: &[&str]) -> pb::Grant {
    client(fed, ADMIN)
        .await
        .admin()
        .create_grant(pb::CreateGrantRequest {
            fields: fields.iter().map(|f| f.to_string()).collect(),
            ..birth_grant(lienthong_cli::federation::TAX_DEPT, &[], 0)
        })
        .await
        .unwrap()
        .into_inner()
}

/// A grant covers the fields of the version it was checked against. A newer
/// version its provider registered and deprecated before the grant was made
/// (so the admin checked the grant against the older one) does not widen
/// it, even when a consumer asks for that version by number.
#[tokio::test]
async fn a_deprecated_newer_version_does_not_widen_a_grant_checked_against_an_older_one() {
    let (_dir, fed) = federation().await;
    // Version 2 declares the father's national id; its provider deprecates it.
    register_birth_v2_with_fathers_id(&fed).await;
    client(&fed, CIVIL_STATUS)
        .await
        .schemas()
        .deprecate(pb::DeprecateRequest {
            name: "civil_status.birth_record".into(),
            version: 2,
            note: "withdrawn".into(),
        })
        .await
        .unwrap();
    // The admin grants the father's fields, checked against version 1.
    let grant = tax_grant(&fed, &["/father"]).await;
    assert_eq!(grant.reviewed_version, 1);
    // The register answers the father's national id (valid under version 2).
    let register = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed);
    let (index, mut record) = (0..100)
        .map(|i| (i, register.birth_record(i)))
        .find(|(_, r)| r["father"].is_object())
        .unwrap();
    record["father"]["national_id"] = "001060000001".into();
    let civil_material =
        lienthong_tls::TlsMaterial::load(&lienthong_cli::client::member_files(&fed.certs, CIVIL_STATUS)).unwrap();
    let tls = std::sync::Arc::new(lienthong_tls::ServerTls::new(&civil_material, &fed.options.trust_domain).unwrap());
    let raw = lienthong_provider::testing::start_raw_server(
        lienthong_provider::testing::RawProvider::new(record.to_string()),
        tls,
    )
    .await
    .unwrap();
    replace_civil_endpoint(&fed, &raw.url()).await;
    let tax = client(&fed, lienthong_cli::federation::TAX_DEPT).await;
    let lookup = |version: u32, fields: &[&str]| pb::LookupRequest {
        schema_version: version,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        ..birth_lookup(&citizen_id(&fed, index), "tax-law-38-2019/art-17")
    };
    let released = tax.exchange().lookup(lookup(2, &[])).await.unwrap().into_inner();
    let released: serde_json::Value = serde_json::from_str(&released.record_json).unwrap();
    assert!(released["father"]["full_name"].is_string(), "{released}");
    assert!(released["father"].get("national_id").is_none(), "{released}");
    let err = tax
        .exchange()
        .lookup(lookup(2, &["/father/national_id"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    fed.shutdown().await.unwrap();
}

/// What the consumer and the audit entry are told was released is what
/// was: a granted field the version looked up does not declare is not
/// listed as released.
#[tokio::test]
async fn fields_released_lists_only_what_the_version_looked_up_declares() {
    let (_dir, fed) = federation().await;
    register_birth_v2_with_fathers_id(&fed).await;
    let grant = tax_grant(&fed, &["/father/full_name", "/father/national_id"]).await;
    assert_eq!(grant.reviewed_version, 2);
    let register = lienthong_provider::demo::CivilStatusRegister::new(fed.options.seed);
    let index = (0..100)
        .find(|i| register.birth_record(*i)["father"].is_object())
        .unwrap();
    let answer = client(&fed, lienthong_cli::federation::TAX_DEPT)
        .await
        .exchange()
        .lookup(pb::LookupRequest {
            schema_version: 1,
            request_id: "version-one".into(),
            ..birth_lookup(&citizen_id(&fed, index), "tax-law-38-2019/art-17")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.fields_released, ["/father/full_name"]);
    let record: serde_json::Value = serde_json::from_str(&answer.record_json).unwrap();
    assert_eq!(record["father"].as_object().unwrap().len(), 1, "{record}");
    let entry = logged(&fed, pb::EntryFilter::default())
        .await
        .into_iter()
        .find(|e| e.request_id == "version-one")
        .unwrap();
    assert_eq!(entry.fields_released, ["/father/full_name"]);
    fed.shutdown().await.unwrap();
}

/// A version stored before a `format` was refused at registration (here an
/// unknown `int64`, written as an older broker stored it) can still get a
/// BACKWARD next version from its integrator: the format kept unchanged is
/// admitted as it was, and dropping it is no breaking change either.
#[tokio::test]
async fn the_next_version_of_a_type_stored_under_older_rules_may_keep_what_it_had() {
    use sqlx::Connection;
    let (_dir, fed) = federation().await;
    let civil = client(&fed, CIVIL_STATUS).await;
    let name = "civil_status.adoption_record";
    let register = |record: serde_json::Value| {
        let mut c = civil.schemas();
        async move {
            c.register(pb::RegisterRequest {
                definition: Some(def(name, query_schema(), record)),
                compatibility: 0,
            })
            .await
        }
    };
    register(record_schema(json!({"case_no": {"type": "integer"}})))
        .await
        .unwrap();
    let db = fed.dir.join("broker-data/lienthong.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE record_type_versions SET record_schema = \
         json_set(record_schema, '$.properties.case_no.format', 'int64'), digest = 'as an older broker stored it' \
         WHERE name = ?",
    )
    .bind(name)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("UPDATE change_counter SET value = value + 1")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(10), async || {
            civil
                .schemas()
                .get(pb::GetRecordTypeRequest {
                    name: name.into(),
                    version: 1,
                })
                .await
                .is_ok_and(|v| {
                    v.into_inner()
                        .definition
                        .is_some_and(|d| d.record_schema_json.contains("int64"))
                })
        })
        .await,
        "the stored version was not reloaded"
    );
    // The next version keeps the format a new type could not have.
    let kept = register(record_schema(json!({
        "case_no": {"type": "integer", "format": "int64"},
        "court": {"type": "string"}
    })))
    .await
    .unwrap()
    .into_inner();
    assert!(kept.created);
    assert_eq!(kept.version.unwrap().version, 2);
    fed.shutdown().await.unwrap();
}
