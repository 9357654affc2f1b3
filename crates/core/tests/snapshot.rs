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
