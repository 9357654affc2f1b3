//! The authorization snapshot's indexes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_core::schema::{CompiledRecordType, SchemaLimits, parse_definition};
use lienthong_core::snapshot::Snapshot;
use lienthong_core::{Compatibility, Endpoint, Grant, GrantFields, Member, MemberId, RecordTypeVersion, Role};
use std::sync::Arc;
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2025-06-01 12:00 UTC);

fn id(s: &str) -> MemberId {
    MemberId::new(s).unwrap()
}

fn member(name: &str) -> Member {
    Member {
        id: id(name),
        display_name: name.to_uppercase(),
        roles: vec![Role::Consumer],
        enabled: true,
        disabled_reason: String::new(),
        created_at: NOW,
        updated_at: NOW,
    }
}

fn grant(gid: &str, consumer: &str, record_type: &str, created_at: OffsetDateTime) -> Grant {
    Grant {
        id: gid.into(),
        consumer: id(consumer),
        record_type: record_type.into(),
        fields: GrantFields::All,
        purposes: vec!["tax".into()],
        valid_from: datetime!(2025-01-01 0:00 UTC),
        valid_until: None,
        rate_limit_per_minute: 0,
        revoked_at: None,
        revoked_reason: String::new(),
        created_by: id("admin"),
        created_at,
        reviewed_version: None,
    }
}

fn record_type(name: &str, version: u32, deprecated: bool) -> Arc<CompiledRecordType> {
    let definition = parse_definition(
        name,
        "a record",
        id("civil-registry"),
        r#"{"type":"object","properties":{"national_id":{"type":"string"}},"required":["national_id"]}"#,
        r#"{"type":"object","properties":{"full_name":{"type":"string"}}}"#,
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap();
    let mut v = RecordTypeVersion::new(definition, version, NOW, id("civil-registry"), Compatibility::Backward);
    v.deprecated = deprecated;
    Arc::new(CompiledRecordType::compile(v).unwrap())
}

fn endpoint(eid: &str, provider: &str, created_at: OffsetDateTime) -> Endpoint {
    Endpoint {
        id: eid.into(),
        provider: id(provider),
        url: format!("https://{eid}.example:8443"),
        created_at,
    }
}

fn snapshot() -> Snapshot {
    Snapshot::build(
        42,
        NOW,
        vec![member("zeta"), member("alpha"), member("mid")],
        vec![
            grant("g-old", "alpha", "civil.birth", datetime!(2025-01-01 0:00 UTC)),
            grant("g-new", "alpha", "civil.birth", datetime!(2025-03-01 0:00 UTC)),
            grant("g-other", "alpha", "civil.marriage", datetime!(2025-02-01 0:00 UTC)),
            grant("g-zeta", "zeta", "civil.birth", datetime!(2025-02-01 0:00 UTC)),
        ],
        vec![
            record_type("civil.birth", 2, false),
            record_type("civil.birth", 1, false),
            record_type("civil.birth", 3, true),
            record_type("civil.marriage", 1, true),
            record_type("civil.marriage", 2, true),
        ],
        vec![
            endpoint("e2", "civil-registry", datetime!(2025-02-01 0:00 UTC)),
            endpoint("e1", "civil-registry", datetime!(2025-01-01 0:00 UTC)),
            endpoint("e3", "judicial", datetime!(2025-01-01 0:00 UTC)),
        ],
    )
}

#[test]
fn members_are_found_by_id_and_listed_in_order() {
    let s = snapshot();
    assert_eq!(s.version, 42);
    assert_eq!(s.member("mid").unwrap().display_name, "MID");
    assert!(s.member("nobody").is_none());
    let ids: Vec<&str> = s.members().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["alpha", "mid", "zeta"]);
}

#[test]
fn grants_are_indexed_by_consumer_and_record_type_newest_first() {
    let s = snapshot();
    let ids: Vec<&str> = s
        .grants_for("alpha", "civil.birth")
        .iter()
        .map(|g| g.id.as_str())
        .collect();
    assert_eq!(ids, vec!["g-new", "g-old"]);
    assert_eq!(s.grants_for("alpha", "civil.marriage").len(), 1);
    assert!(s.grants_for("alpha", "civil.death").is_empty());
    assert!(s.grants_for("nobody", "civil.birth").is_empty());
    assert_eq!(s.grant("g-zeta").unwrap().consumer.as_str(), "zeta");
    assert_eq!(s.grant("g-old").unwrap().created_at, datetime!(2025-01-01 0:00 UTC));
    assert!(s.grant("g-missing").is_none());
    assert_eq!(s.grant_count(), 4);
}

#[test]
fn record_type_versions_and_the_default_version() {
    let s = snapshot();
    let versions: Vec<u32> = s
        .record_type_versions("civil.birth")
        .iter()
        .map(|v| v.version_number())
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
    // Version 0: newest non-deprecated.
    assert_eq!(s.record_type("civil.birth", 0).unwrap().version_number(), 2);
    // All deprecated: the newest.
    assert_eq!(s.record_type("civil.marriage", 0).unwrap().version_number(), 2);
    assert_eq!(s.record_type("civil.birth", 3).unwrap().version_number(), 3);
    assert!(s.record_type("civil.birth", 4).is_none());
    assert!(s.record_type("civil.death", 0).is_none());
    assert!(s.record_type_versions("civil.death").is_empty());
    let names: Vec<&str> = s.record_type_names().collect();
    assert_eq!(names, vec!["civil.birth", "civil.marriage"]);
}

#[test]
fn endpoints_by_provider_oldest_first() {
    let s = snapshot();
    let ids: Vec<&str> = s.endpoints("civil-registry").iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec!["e1", "e2"]);
    assert_eq!(s.endpoints("judicial").len(), 1);
    assert!(s.endpoints("nobody").is_empty());
}

#[test]
fn duplicates_keep_the_last_given() {
    let mut renamed = member("alpha");
    renamed.display_name = "second".into();
    let mut g2 = grant("g1", "alpha", "civil.birth", NOW);
    g2.purposes = vec!["census".into()];
    let s = Snapshot::build(
        1,
        NOW,
        vec![member("alpha"), renamed],
        vec![grant("g1", "alpha", "civil.birth", NOW), g2],
        vec![
            record_type("civil.birth", 1, false),
            record_type("civil.birth", 1, true),
        ],
        Vec::new(),
    );
    assert_eq!(s.members().count(), 1);
    assert_eq!(s.member("alpha").unwrap().display_name, "second");
    assert_eq!(s.grants_for("alpha", "civil.birth").len(), 1);
    assert_eq!(s.grant("g1").unwrap().purposes, vec!["census".to_string()]);
    assert_eq!(s.record_type_versions("civil.birth").len(), 1);
    assert!(s.record_type("civil.birth", 1).unwrap().deprecated());
}

#[test]
fn empty_snapshot_holds_nothing() {
    let s = Snapshot::empty();
    assert_eq!(s.version, 0);
    assert_eq!(s.members().count(), 0);
    assert_eq!(s.record_type_names().count(), 0);
    assert!(s.grants_for("a", "b").is_empty());
}

#[test]
fn snapshot_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Snapshot>();
}

#[test]
fn each_grant_carries_the_selection_of_its_own_fields_within_each_version() {
    let mut narrow = grant("g-narrow", "alpha", "civil.birth", datetime!(2025-04-01 0:00 UTC));
    narrow.fields = GrantFields::Pointers(vec!["/full_name".into(), "/national_id".into()]);
    let wide = grant("g-wide", "alpha", "civil.birth", datetime!(2025-02-01 0:00 UTC));
    let snap = Snapshot::build(
        1,
        NOW,
        vec![member("alpha")],
        vec![narrow, wide],
        vec![record_type("civil.birth", 1, false)],
        Vec::new(),
    );
    // The schema declares only full_name: whatever the grant says, a key the
    // register adds on its own never leaves.
    let record = serde_json::json!({"full_name": "Le Thi B", "national_id": "001099012345"});
    for id in ["g-narrow", "g-wide"] {
        assert_eq!(
            snap.grant_selection(id, 1).unwrap().to_json(&record).unwrap(),
            r#"{"full_name":"Le Thi B"}"#,
            "{id}"
        );
    }
    assert!(snap.grant_selection("g-wide", 2).is_none(), "no version 2");
    assert!(snap.grant_selection("g-unknown", 1).is_none());
}

/// `civil.birth` version `n`, registered at `at`, with `record` as its record schema.
fn birth_version(n: u32, at: OffsetDateTime, record: serde_json::Value) -> Arc<CompiledRecordType> {
    let definition = parse_definition(
        "civil.birth",
        "a birth record",
        id("civil-registry"),
        r#"{"type":"object","properties":{"national_id":{"type":"string"}},"required":["national_id"]}"#,
        &record.to_string(),
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap();
    let v = RecordTypeVersion::new(definition, n, at, id("civil-registry"), Compatibility::Backward);
    Arc::new(CompiledRecordType::compile(v).unwrap())
}

#[test]
fn a_later_version_does_not_widen_a_grant_made_before_it() {
    let v1 = birth_version(
        1,
        datetime!(2025-01-01 0:00 UTC),
        serde_json::json!({"type": "object", "properties": {
            "full_name": {"type": "string"},
            "father": {"type": "object", "properties": {"full_name": {"type": "string"}}}
        }}),
    );
    let v2 = birth_version(
        2,
        datetime!(2025-05-01 0:00 UTC),
        serde_json::json!({"type": "object", "properties": {
            "full_name": {"type": "string"},
            "mother_name": {"type": "string"},
            "father": {"type": "object", "properties": {
                "full_name": {"type": "string"}, "national_id": {"type": "string"}
            }}
        }}),
    );
    let mut father = grant("g-father", "alpha", "civil.birth", datetime!(2025-03-01 0:00 UTC));
    father.fields = GrantFields::Pointers(vec!["/father".into()]);
    let everything = grant("g-all", "beta", "civil.birth", datetime!(2025-03-01 0:00 UTC));
    let mut later = grant("g-later", "gamma", "civil.birth", datetime!(2025-05-02 0:00 UTC));
    later.fields = GrantFields::Pointers(vec!["/father".into()]);
    let snap = Snapshot::build(
        1,
        NOW,
        vec![member("alpha"), member("beta"), member("gamma")],
        vec![father, everything, later],
        vec![v1.clone(), v2.clone()],
        Vec::new(),
    );
    assert_eq!(snap.grant_reviewed("g-father").unwrap().version_number(), 1);
    assert_eq!(snap.grant_reviewed("g-later").unwrap().version_number(), 2);

    let record = serde_json::json!({
        "full_name": "Le Thi B",
        "mother_name": "Tran Thi C",
        "father": {"full_name": "Le Van A", "national_id": "001060000001"}
    });
    let released = |gid: &str| snap.grant_selection(gid, 2).unwrap().to_json(&record).unwrap();
    assert_eq!(released("g-father"), r#"{"father":{"full_name":"Le Van A"}}"#);
    assert_eq!(
        released("g-all"),
        r#"{"full_name":"Le Thi B","father":{"full_name":"Le Van A"}}"#
    );
    assert_eq!(
        released("g-later"),
        r#"{"father":{"full_name":"Le Van A","national_id":"001060000001"}}"#,
        "a grant made against version 2 covers what version 2 declares"
    );

    // Naming the new field is refused; naming the parent gets what it had.
    let ask = |consumer: &str, fields: &[&str]| {
        let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        let request = lienthong_core::policy::AccessRequest {
            record_type: "civil.birth",
            purpose: "tax",
            fields: &fields,
        };
        snap.decide(consumer, &request, NOW)
    };
    match ask("alpha", &["/father/national_id"]) {
        lienthong_core::policy::Decision::Deny(lienthong_core::policy::DenyReason::FieldNotGranted { field }) => {
            assert_eq!(field, "/father/national_id")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !ask("beta", &["/mother_name"]).is_allowed(),
        "a field added after a grant of every field"
    );
    let lienthong_core::policy::Decision::Allow(allowed) = ask("alpha", &["/father"]) else {
        panic!("the parent the grant names is allowed");
    };
    assert_eq!(
        snap.requested_selection("g-father", &v2, &allowed.fields)
            .to_json(&record)
            .unwrap(),
        r#"{"father":{"full_name":"Le Van A"}}"#
    );
    assert!(ask("gamma", &["/father/national_id"]).is_allowed());
}

/// The version a grant was checked against is the one recorded with it:
/// a newer version registered before the grant, but deprecated, or not yet
/// seen by the replica that made it, does not widen it. A grant made
/// before the version was recorded stands in with the newest version then
/// in use, a deprecated one excepted.
#[test]
fn a_grant_covers_the_version_it_was_checked_against_not_a_newer_one() {
    let v1 = birth_version(
        1,
        datetime!(2025-01-01 0:00 UTC),
        serde_json::json!({"type": "object", "properties": {
            "father": {"type": "object", "properties": {"full_name": {"type": "string"}}}
        }}),
    );
    let mut v2 = birth_version(
        2,
        datetime!(2025-02-01 0:00 UTC),
        serde_json::json!({"type": "object", "properties": {
            "father": {"type": "object", "properties": {
                "full_name": {"type": "string"}, "national_id": {"type": "string"}
            }}
        }}),
    )
    .version
    .clone();
    v2.deprecated = true;
    let v2 = Arc::new(CompiledRecordType::compile(v2).unwrap());
    // Made after v2 was registered, checked against v1.
    let mut recorded = grant("g-recorded", "alpha", "civil.birth", datetime!(2025-03-01 0:00 UTC));
    recorded.fields = GrantFields::Pointers(vec!["/father".into()]);
    recorded.reviewed_version = Some(1);
    // The same, from before the version was recorded.
    let mut legacy = grant("g-legacy", "beta", "civil.birth", datetime!(2025-03-01 0:00 UTC));
    legacy.fields = GrantFields::Pointers(vec!["/father".into()]);
    let snap = Snapshot::build(
        1,
        NOW,
        vec![member("alpha"), member("beta")],
        vec![recorded, legacy],
        vec![v1, v2],
        Vec::new(),
    );
    let record = serde_json::json!({"father": {"full_name": "Le Van A", "national_id": "001060000001"}});
    for gid in ["g-recorded", "g-legacy"] {
        assert_eq!(snap.grant_reviewed(gid).unwrap().version_number(), 1, "{gid}");
        assert_eq!(
            snap.grant_selection(gid, 2).unwrap().to_json(&record).unwrap(),
            r#"{"father":{"full_name":"Le Van A"}}"#,
            "{gid}: version 2 asked for by number"
        );
    }
}
