//! Hot-path benchmarks: the authorization decision, record validation and
//! field filtering.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use lienthong_core::filter::FieldSelection;
use lienthong_core::policy::AccessRequest;
use lienthong_core::schema::{CompiledRecordType, SchemaLimits, parse_definition};
use lienthong_core::snapshot::Snapshot;
use lienthong_core::{
    Compatibility, Grant, GrantFields, Member, MemberId, RecordTypeVersion, Role, filter_record, parse_unique_keys,
};
use serde_json::{Value, json};
use std::hint::black_box;
use std::sync::Arc;
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2025-06-01 12:00 UTC);

fn member(id: &str) -> Member {
    Member {
        id: MemberId::new(id).unwrap(),
        display_name: id.to_owned(),
        roles: vec![Role::Consumer],
        enabled: true,
        disabled_reason: String::new(),
        created_at: datetime!(2024-01-01 0:00 UTC),
        updated_at: datetime!(2024-01-01 0:00 UTC),
    }
}

/// 10,000 grants: 500 consumers x 20 record types, one grant each.
fn snapshot() -> Snapshot {
    let consumers: Vec<String> = (0..500).map(|i| format!("agency-{i:03}")).collect();
    let members = consumers.iter().map(|c| member(c)).collect();
    let mut grants = Vec::new();
    for (ci, consumer) in consumers.iter().enumerate() {
        for t in 0..20 {
            grants.push(Grant {
                id: format!("g-{ci}-{t}"),
                consumer: MemberId::new(consumer.clone()).unwrap(),
                record_type: format!("civil.type{t}"),
                fields: GrantFields::Pointers(vec!["/birth_date".into(), "/father".into(), "/full_name".into()]),
                purposes: vec!["marriage-registration".into(), "social-benefit".into()],
                valid_from: datetime!(2024-01-01 0:00 UTC),
                valid_until: Some(datetime!(2030-01-01 0:00 UTC)),
                rate_limit_per_minute: 600,
                revoked_at: None,
                revoked_reason: String::new(),
                created_by: MemberId::new("admin").unwrap(),
                created_at: datetime!(2024-01-01 0:00 UTC),
                reviewed_version: None,
            });
        }
    }
    assert_eq!(grants.len(), 10_000);
    Snapshot::build(1, NOW, members, grants, Vec::new(), Vec::new())
}

fn twenty_field_schema() -> (String, Value) {
    let mut props = serde_json::Map::new();
    let mut record = serde_json::Map::new();
    for i in 0..17 {
        props.insert(format!("field_{i:02}"), json!({"type": "string", "maxLength": 200}));
        record.insert(format!("field_{i:02}"), json!(format!("value number {i}")));
    }
    props.insert(
        "national_id".into(),
        json!({"type": "string", "pattern": "^[0-9]{12}$"}),
    );
    record.insert("national_id".into(), json!("001099012345"));
    props.insert(
        "sex".into(),
        json!({"type": "string", "enum": ["female", "male", "unknown"]}),
    );
    record.insert("sex".into(), json!("female"));
    props.insert(
        "father".into(),
        json!({"type": "object", "properties": {"full_name": {"type": "string"}, "national_id": {"type": "string"}}}),
    );
    record.insert(
        "father".into(),
        json!({"full_name": "Nguyen Van B", "national_id": "001060000001"}),
    );
    let schema = json!({
        "type": "object",
        "properties": props,
        "required": ["national_id", "sex"],
        "additionalProperties": false
    });
    (schema.to_string(), Value::Object(record))
}

fn compiled(record_schema: &str) -> CompiledRecordType {
    let query = r#"{"type":"object","properties":{"national_id":{"type":"string","pattern":"^[0-9]{12}$"}},"required":["national_id"]}"#;
    let definition = parse_definition(
        "civil.birth",
        "birth record",
        MemberId::new("civil-registry").unwrap(),
        query,
        record_schema,
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap();
    let version = RecordTypeVersion::new(
        definition,
        1,
        NOW,
        MemberId::new("civil-registry").unwrap(),
        Compatibility::Backward,
    );
    CompiledRecordType::compile(version).unwrap()
}

fn benches(c: &mut Criterion) {
    let snap = snapshot();
    let fields = vec!["/full_name".to_string(), "/father/full_name".to_string()];
    let request = AccessRequest {
        record_type: "civil.type7",
        purpose: "social-benefit",
        fields: &fields,
    };
    assert!(snap.decide("agency-250", &request, NOW).is_allowed());
    c.bench_function("decide/10k_grants/allow", |b| {
        b.iter(|| black_box(snap.decide(black_box("agency-250"), black_box(&request), NOW)))
    });
    let wrong_purpose = AccessRequest {
        purpose: "tax-audit",
        ..request
    };
    c.bench_function("decide/10k_grants/deny", |b| {
        b.iter(|| black_box(snap.decide(black_box("agency-250"), black_box(&wrong_purpose), NOW)))
    });

    let (schema, record) = twenty_field_schema();
    let compiled = Arc::new(compiled(&schema));
    assert!(compiled.validate_record(&record).is_ok());
    c.bench_function("validate_record/20_fields", |b| {
        b.iter(|| black_box(compiled.validate_record(black_box(&record))))
    });

    // A register's answer as the broker parses it: serde_json's own Value,
    // against the parse that refuses a repeated key on the way.
    let record_text = record.to_string();
    assert_eq!(parse_unique_keys(&record_text).unwrap(), record);
    c.bench_function("parse_record/20_fields/serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_str::<Value>(black_box(&record_text)).unwrap()))
    });
    c.bench_function("parse_record/20_fields/unique_keys", |b| {
        b.iter(|| black_box(parse_unique_keys(black_box(&record_text)).unwrap()))
    });

    let selected = GrantFields::Pointers(vec![
        "/father/full_name".into(),
        "/field_00".into(),
        "/field_05".into(),
        "/field_10".into(),
        "/sex".into(),
    ]);
    let selection = FieldSelection::from_fields(&selected);
    c.bench_function("filter/20_fields/prebuilt_selection", |b| {
        b.iter(|| black_box(selection.apply(black_box(&record))))
    });
    c.bench_function("filter/20_fields/filter_record", |b| {
        b.iter(|| black_box(filter_record(black_box(&record), black_box(&selected))))
    });
    // What a lookup did before and does now: build the tree, cut a copy, write it;
    // against writing the cut straight from the record with the snapshot's tree.
    c.bench_function("filter/20_fields/build_cut_and_write", |b| {
        b.iter(|| black_box(filter_record(black_box(&record), black_box(&selected)).to_string()))
    });
    c.bench_function("filter/20_fields/write_with_prebuilt_selection", |b| {
        b.iter(|| black_box(selection.to_json(black_box(&record))))
    });
    let everything = FieldSelection::all();
    c.bench_function("filter/20_fields/write_all_fields", |b| {
        b.iter(|| black_box(everything.to_json(black_box(&record))))
    });
    // What a grant of every field writes now: the schema's declared fields only.
    let within_shape = everything.intersect(compiled.shape());
    assert_eq!(
        within_shape.apply(&record),
        record,
        "the record declares every key it has"
    );
    c.bench_function("filter/20_fields/write_all_fields_within_shape", |b| {
        b.iter(|| black_box(within_shape.to_json(black_box(&record))))
    });
    let selected_within_shape = selection.intersect(compiled.shape());
    c.bench_function("filter/20_fields/write_with_prebuilt_selection_within_shape", |b| {
        b.iter(|| black_box(selected_within_shape.to_json(black_box(&record))))
    });
    c.bench_function("filter/20_fields/copy_and_write_all_fields", |b| {
        b.iter(|| black_box(filter_record(black_box(&record), black_box(&GrantFields::All)).to_string()))
    });
}

criterion_group!(core, benches);
criterion_main!(core);
