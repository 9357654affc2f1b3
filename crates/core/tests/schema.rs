//! Record type registration, compatibility between versions and validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_core::schema::{
    CompiledRecordType, FieldCut, MAX_PATTERNS, SchemaError, SchemaLimits, SubjectKeyProblem, check_compatibility,
    parse_definition, parse_next_definition, validate_record_type_name,
};
use lienthong_core::{Compatibility, FieldSelection, MemberId, RecordTypeDefinition, RecordTypeVersion};
use proptest::prelude::*;
use serde_json::{Value, json};
use time::macros::datetime;

fn owner() -> MemberId {
    MemberId::new("civil-registry").unwrap()
}

fn base_query() -> Value {
    json!({
        "type": "object",
        "properties": {
            "national_id": {"type": "string", "pattern": "^[0-9]{12}$"},
            "birth_date": {"type": "string", "format": "date"}
        },
        "required": ["national_id"],
        "additionalProperties": false
    })
}

fn base_record() -> Value {
    json!({
        "type": "object",
        "properties": {
            "full_name": {"type": "string"},
            "sex": {"type": "string", "enum": ["female", "male"]},
            "birth_year": {"type": "integer"},
            "father": {
                "type": "object",
                "properties": {
                    "full_name": {"type": "string"},
                    "national_id": {"type": "string"}
                }
            },
            "previous_names": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "family_name": {"type": "string"},
                        "given_name": {"type": "string"}
                    }
                }
            }
        },
        "required": ["full_name"]
    })
}

fn define(query: &Value, record: &Value, subject: &str) -> Result<RecordTypeDefinition, SchemaError> {
    parse_definition(
        "civil.birth",
        "birth record of a citizen",
        owner(),
        &query.to_string(),
        &record.to_string(),
        subject,
        &SchemaLimits::default(),
    )
}

fn compiled(definition: RecordTypeDefinition) -> CompiledRecordType {
    let version = RecordTypeVersion::new(
        definition,
        1,
        datetime!(2025-01-01 0:00 UTC),
        owner(),
        Compatibility::Backward,
    );
    CompiledRecordType::compile(version).unwrap()
}

fn base() -> CompiledRecordType {
    compiled(define(&base_query(), &base_record(), "national_id").unwrap())
}

// ---------------------------------------------------------------- compatibility

struct Row {
    what: &'static str,
    /// Changes applied to (query, record) of the previous version.
    before: fn(&mut Value, &mut Value),
    /// Changes applied to (query, record) of the next version.
    after: fn(&mut Value, &mut Value, &mut String, &mut MemberId),
    /// Expected (kind, pointer) of every breaking change; empty = compatible.
    expect: &'static [(&'static str, &'static str)],
}

/// Sets (or adds) the value at `pointer`.
fn set(v: &mut Value, pointer: &str, new: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .insert(key.to_owned(), new);
}

fn remove(v: &mut Value, pointer: &str, key: &str) {
    v.pointer_mut(pointer).unwrap().as_object_mut().unwrap().remove(key);
}

fn nothing(_: &mut Value, _: &mut Value) {}

/// A query filter that nests itself twice over: comparing it must not
/// unroll it level after level.
fn recursive_filter(q: &mut Value, _: &mut Value) {
    set(
        q,
        "/$defs",
        json!({"filter": {"type": "object", "properties": {
            "and": {"$ref": "#/$defs/filter"},
            "or": {"$ref": "#/$defs/filter"},
            "equals": {"type": "string", "maxLength": 5}
        }}}),
    );
    set(q, "/properties/filter", json!({"$ref": "#/$defs/filter"}));
}

/// The father as generators write an optional struct: `anyOf` of the
/// object and null.
fn optional_father(_: &mut Value, r: &mut Value) {
    let father = r.pointer("/properties/father").unwrap().clone();
    set(
        r,
        "/properties/father",
        json!({"anyOf": [father, {"type": "null"}], "default": null}),
    );
}

/// The same as pydantic writes it: a `$ref` to `$defs` beside null.
fn optional_father_by_ref(_: &mut Value, r: &mut Value) {
    let father = r.pointer("/properties/father").unwrap().clone();
    set(r, "/$defs", json!({"Person": father}));
    set(
        r,
        "/properties/father",
        json!({"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}], "title": "Father"}),
    );
}

const TABLE: &[Row] = &[
    Row {
        what: "add an optional record property",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/death_date", json!({"type": "string"})),
        expect: &[],
    },
    Row {
        what: "add an optional query parameter",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/district", json!({"type": "string"})),
        expect: &[],
    },
    Row {
        what: "reorder a record enum",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/sex/enum", json!(["male", "female"])),
        expect: &[],
    },
    Row {
        what: "change descriptions",
        before: nothing,
        after: |q, r, _, _| {
            set(q, "/properties/national_id/description", json!("12-digit citizen id"));
            set(r, "/description", json!("a birth record"));
        },
        expect: &[],
    },
    Row {
        what: "widen a query parameter's type",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/birth_date/type", json!(["string", "null"])),
        expect: &[],
    },
    Row {
        what: "add an optional nested record property",
        before: nothing,
        after: |_, r, _, _| {
            set(
                r,
                "/properties/father/properties/birth_year",
                json!({"type": "integer"}),
            )
        },
        expect: &[],
    },
    Row {
        what: "make a record property required",
        before: nothing,
        after: |_, r, _, _| set(r, "/required", json!(["full_name", "sex"])),
        expect: &[],
    },
    Row {
        what: "add an optional query object with a required child",
        before: nothing,
        after: |q, _, _, _| {
            set(
                q,
                "/properties/address",
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            )
        },
        expect: &[],
    },
    Row {
        what: "widen a query enum",
        before: |q, _| set(q, "/properties/birth_date/enum", json!(["2000-01-01"])),
        after: |q, _, _, _| set(q, "/properties/birth_date/enum", json!(["2000-01-01", "2000-01-02"])),
        expect: &[],
    },
    Row {
        what: "remove a record property",
        before: nothing,
        after: |_, r, _, _| {
            remove(r, "/properties", "birth_year");
        },
        expect: &[("record_property_removed", "/birth_year")],
    },
    Row {
        what: "remove a nested record property",
        before: nothing,
        after: |_, r, _, _| remove(r, "/properties/father/properties", "national_id"),
        expect: &[("record_property_removed", "/father/national_id")],
    },
    Row {
        what: "remove a property of array items",
        before: nothing,
        after: |_, r, _, _| remove(r, "/properties/previous_names/items/properties", "given_name"),
        expect: &[("record_property_removed", "/previous_names/given_name")],
    },
    Row {
        what: "remove an object property removes its children too",
        before: nothing,
        after: |_, r, _, _| remove(r, "/properties", "father"),
        expect: &[
            ("record_property_removed", "/father"),
            ("record_property_removed", "/father/full_name"),
            ("record_property_removed", "/father/national_id"),
        ],
    },
    Row {
        what: "retype a record property",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/birth_year/type", json!("string")),
        expect: &[("record_property_retyped", "/birth_year")],
    },
    Row {
        what: "retype a property of array items",
        before: nothing,
        after: |_, r, _, _| {
            set(
                r,
                "/properties/previous_names/items/properties/family_name/type",
                json!("integer"),
            )
        },
        expect: &[("record_property_retyped", "/previous_names/family_name")],
    },
    Row {
        what: "widen the fields of an object declared through allOf",
        before: |_, r| {
            set(
                r,
                "/properties/guardian",
                json!({"allOf": [{"type": "object", "properties": {"full_name": {"type": "string"}}}]}),
            )
        },
        after: |_, r, _, _| {
            set(
                r,
                "/properties/guardian/allOf/0/properties/national_id",
                json!({"type": "string"}),
            )
        },
        expect: &[("record_property_structure_changed", "/guardian")],
    },
    Row {
        what: "let an array of strings hold anything",
        before: |_, r| {
            set(
                r,
                "/properties/aliases",
                json!({"type": "array", "items": {"type": "string"}}),
            )
        },
        // Marked opaque, as a new registration must mark a field holding anything.
        after: |_, r, _, _| {
            set(
                r,
                "/properties/aliases",
                json!({"type": "array", "x-lienthong-opaque": true}),
            )
        },
        expect: &[("record_property_structure_changed", "/aliases")],
    },
    Row {
        what: "change only what describes a scalar field",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/birth_year/description", json!("year of birth")),
        expect: &[],
    },
    Row {
        what: "narrow a record type union",
        before: |_, r| set(r, "/properties/full_name/type", json!(["string", "null"])),
        after: |_, r, _, _| set(r, "/properties/full_name/type", json!("string")),
        expect: &[("record_property_retyped", "/full_name")],
    },
    Row {
        what: "narrow a record enum",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/sex/enum", json!(["female"])),
        expect: &[("record_constraint_changed", "/sex")],
    },
    Row {
        what: "add an enum to an unrestricted record property",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/full_name/enum", json!(["A", "B"])),
        expect: &[("record_constraint_changed", "/full_name")],
    },
    // The register may now send a value consumers of the previous version
    // never saw, as with a raised maxLength.
    Row {
        what: "widen a record enum",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/sex/enum", json!(["female", "male", "unknown"])),
        expect: &[("record_constraint_changed", "/sex")],
    },
    Row {
        what: "drop a record enum altogether",
        before: nothing,
        after: |_, r, _, _| remove(r, "/properties/sex", "enum"),
        expect: &[("record_constraint_changed", "/sex")],
    },
    Row {
        what: "widen the enum of a property of array items",
        before: |_, r| {
            set(
                r,
                "/properties/previous_names/items/properties/family_name/enum",
                json!(["Le", "Tran"]),
            )
        },
        after: |_, r, _, _| {
            set(
                r,
                "/properties/previous_names/items/properties/family_name/enum",
                json!(["Le", "Tran", "Vo"]),
            )
        },
        expect: &[("record_constraint_changed", "/previous_names/family_name")],
    },
    Row {
        what: "change a record const",
        before: |_, r| set(r, "/properties/birth_year/const", json!(2000)),
        after: |_, r, _, _| set(r, "/properties/birth_year/const", json!(2001)),
        expect: &[("record_constraint_changed", "/birth_year")],
    },
    Row {
        what: "drop a record const",
        before: |_, r| set(r, "/properties/birth_year/const", json!(2000)),
        after: |_, r, _, _| remove(r, "/properties/birth_year", "const"),
        expect: &[("record_constraint_changed", "/birth_year")],
    },
    Row {
        what: "widen a record enum behind a reference",
        before: |_, r| {
            set(
                r,
                "/$defs",
                json!({"sex": {"type": "string", "enum": ["female", "male"]}}),
            );
            set(r, "/properties/sex", json!({"$ref": "#/$defs/sex"}));
        },
        after: |_, r, _, _| set(r, "/$defs/sex/enum", json!(["female", "male", "unknown"])),
        expect: &[("record_constraint_changed", "/sex")],
    },
    Row {
        what: "make an optional query parameter required",
        before: nothing,
        after: |q, _, _, _| set(q, "/required", json!(["national_id", "birth_date"])),
        expect: &[("query_parameter_required", "/birth_date")],
    },
    Row {
        what: "add a new required query parameter",
        before: nothing,
        after: |q, _, _, _| {
            set(q, "/properties/district", json!({"type": "string"}));
            set(q, "/required", json!(["national_id", "district"]));
        },
        expect: &[("query_parameter_required", "/district")],
    },
    Row {
        what: "remove a query parameter",
        before: nothing,
        after: |q, _, _, _| remove(q, "/properties", "birth_date"),
        expect: &[("query_parameter_removed", "/birth_date")],
    },
    Row {
        what: "retype a query parameter",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/birth_date/type", json!("integer")),
        expect: &[("query_parameter_retyped", "/birth_date")],
    },
    Row {
        what: "narrow a query type union",
        before: |q, _| set(q, "/properties/birth_date/type", json!(["string", "null"])),
        after: |q, _, _, _| set(q, "/properties/birth_date/type", json!("string")),
        expect: &[("query_parameter_retyped", "/birth_date")],
    },
    Row {
        what: "add an enum to a query parameter",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/birth_date/enum", json!(["2000-01-01"])),
        expect: &[("query_enum_narrowed", "/birth_date")],
    },
    Row {
        what: "change the subject key",
        before: nothing,
        after: |q, _, subject, _| {
            set(q, "/properties/citizen_id", json!({"type": "string"}));
            set(q, "/required", json!(["national_id", "citizen_id"]));
            *subject = "citizen_id".to_owned();
        },
        expect: &[
            ("subject_key_changed", "/subject_key"),
            ("query_parameter_required", "/citizen_id"),
        ],
    },
    Row {
        what: "no longer require a record property",
        before: nothing,
        after: |_, r, _, _| set(r, "/required", json!([])),
        expect: &[("record_property_no_longer_required", "/full_name")],
    },
    Row {
        what: "no longer require a nested record property",
        before: |_, r| set(r, "/properties/father/required", json!(["full_name"])),
        after: |_, r, _, _| remove(r, "/properties/father", "required"),
        expect: &[("record_property_no_longer_required", "/father/full_name")],
    },
    Row {
        what: "no longer require a property of array items",
        before: |_, r| set(r, "/properties/previous_names/items/required", json!(["family_name"])),
        after: |_, r, _, _| set(r, "/properties/previous_names/items/required", json!([])),
        expect: &[("record_property_no_longer_required", "/previous_names/family_name")],
    },
    Row {
        what: "give a record property a format",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/full_name/format", json!("email")),
        expect: &[("record_constraint_changed", "/full_name")],
    },
    Row {
        what: "loosen a record property's length",
        before: |_, r| set(r, "/properties/full_name/maxLength", json!(100)),
        after: |_, r, _, _| set(r, "/properties/full_name/maxLength", json!(200)),
        expect: &[("record_constraint_changed", "/full_name")],
    },
    Row {
        what: "tighten the pattern of a property of array items",
        before: nothing,
        after: |_, r, _, _| {
            set(
                r,
                "/properties/previous_names/items/properties/family_name/pattern",
                json!("^\\p{Lu}"),
            )
        },
        expect: &[("record_constraint_changed", "/previous_names/family_name")],
    },
    Row {
        what: "bound the items of a record array",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/previous_names/maxItems", json!(3)),
        expect: &[("record_constraint_changed", "/previous_names")],
    },
    Row {
        what: "close a nested record object",
        before: nothing,
        after: |_, r, _, _| set(r, "/properties/father/additionalProperties", json!(false)),
        expect: &[("record_constraint_changed", "/father")],
    },
    Row {
        what: "change the record schema's root constraints",
        before: nothing,
        after: |_, r, _, _| set(r, "/minProperties", json!(2)),
        expect: &[("record_constraint_changed", "")],
    },
    Row {
        what: "annotate record properties",
        before: nothing,
        after: |_, r, _, _| {
            set(r, "/properties/full_name/title", json!("Full name"));
            set(r, "/properties/father/examples", json!([{"full_name": "A"}]));
        },
        expect: &[],
    },
    // Keywords the validator does not assert change no answer: custom
    // annotations (x-...), the standard ones and those it does not know.
    Row {
        what: "add custom annotations to record properties",
        before: nothing,
        after: |_, r, _, _| {
            set(r, "/properties/full_name/x-pii", json!(true));
            set(r, "/properties/father/x-pii", json!({"category": "family"}));
            set(r, "/properties/previous_names/items/x-source", json!("register"));
            set(r, "/x-owner-unit", json!("civil status office"));
        },
        expect: &[],
    },
    Row {
        what: "change and remove custom annotations of record properties",
        before: |_, r| {
            set(r, "/properties/full_name/x-pii", json!(true));
            set(r, "/properties/sex/x-display", json!("Sex"));
        },
        after: |_, r, _, _| {
            set(r, "/properties/full_name/x-pii", json!(false));
            remove(r, "/properties/sex", "x-display");
        },
        expect: &[],
    },
    Row {
        what: "annotate a record property whose structure allOf gives",
        before: |_, r| {
            set(
                r,
                "/properties/guardian",
                json!({"allOf": [{"type": "object", "properties": {"full_name": {"type": "string"}}}]}),
            )
        },
        after: |_, r, _, _| {
            set(r, "/properties/guardian/x-pii", json!(true));
            set(
                r,
                "/properties/guardian/allOf/0/properties/full_name/x-pii",
                json!(true),
            );
            set(
                r,
                "/properties/guardian/allOf/0/$comment",
                json!("as in the civil code"),
            );
        },
        expect: &[],
    },
    Row {
        what: "annotate record properties with every standard annotation",
        before: |_, r| set(r, "/properties/birth_year/title", json!("Year")),
        after: |_, r, _, _| {
            let year = json!({
                "type": "integer",
                "title": "Year of birth",
                "description": "as registered",
                "$comment": "reviewed",
                "examples": [1990],
                "deprecated": true,
                "readOnly": true,
                "writeOnly": false,
                "units": "year"
            });
            set(r, "/properties/birth_year", year);
        },
        expect: &[],
    },
    Row {
        what: "add, change and remove custom annotations of query parameters",
        before: |q, _| set(q, "/properties/birth_date/x-display", json!("Date of birth")),
        after: |q, _, _, _| {
            set(q, "/properties/national_id/x-display", json!("Citizen id"));
            set(q, "/properties/national_id/deprecated", json!(true));
            set(q, "/properties/national_id/readOnly", json!(true));
            remove(q, "/properties/birth_date", "x-display");
            set(q, "/x-form", json!({"layout": "single"}));
        },
        expect: &[],
    },
    Row {
        what: "tighten a query parameter's pattern",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/national_id/pattern", json!("^[0-9]{13}$")),
        expect: &[("query_constraint_changed", "/national_id")],
    },
    Row {
        what: "forbid undeclared query parameters",
        before: |q, _| remove(q, "", "additionalProperties"),
        after: |q, _, _, _| set(q, "/additionalProperties", json!(false)),
        expect: &[("query_constraint_changed", "")],
    },
    Row {
        what: "add a format to a query parameter",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/national_id/format", json!("date")),
        expect: &[("query_constraint_changed", "/national_id")],
    },
    Row {
        what: "cap a query parameter's length",
        before: nothing,
        after: |q, _, _, _| set(q, "/properties/birth_date/maxLength", json!(0)),
        expect: &[("query_constraint_changed", "/birth_date")],
    },
    Row {
        what: "ask queries for more properties",
        before: nothing,
        after: |q, _, _, _| set(q, "/minProperties", json!(2)),
        expect: &[("query_constraint_changed", "")],
    },
    Row {
        what: "make one query parameter depend on another",
        before: nothing,
        after: |q, _, _, _| set(q, "/dependentRequired", json!({"national_id": ["birth_date"]})),
        expect: &[("query_constraint_changed", "")],
    },
    Row {
        what: "tighten a query parameter's definition behind a reference",
        before: |q, _| {
            set(q, "/$defs", json!({"id": {"type": "string", "pattern": "^[0-9]{12}$"}}));
            set(
                q,
                "/properties/national_id",
                json!({"$ref": "#/$defs/id", "maxLength": 12}),
            );
        },
        after: |q, _, _, _| {
            set(q, "/$defs/id/pattern", json!("^[0-9]{13}$"));
            set(q, "/properties/national_id/maxLength", json!(11));
        },
        expect: &[("query_constraint_changed", "/national_id")],
    },
    Row {
        what: "loosen query constraints",
        before: |q, _| {
            set(q, "/properties/birth_date/minLength", json!(10));
            set(q, "/properties/birth_date/maxLength", json!(10));
            set(q, "/properties/national_id/multipleOf", json!(4));
            set(q, "/minProperties", json!(1));
        },
        after: |q, _, _, _| {
            remove(q, "/properties/birth_date", "format");
            remove(q, "/properties/national_id", "pattern");
            set(q, "/properties/birth_date/minLength", json!(8));
            set(q, "/properties/birth_date/maxLength", json!(12));
            set(q, "/properties/national_id/multipleOf", json!(2));
            remove(q, "", "additionalProperties");
            remove(q, "", "minProperties");
        },
        expect: &[],
    },
    Row {
        what: "annotate query parameters",
        before: nothing,
        after: |q, _, _, _| {
            set(q, "/properties/national_id/examples", json!(["001099012345"]));
            set(q, "/properties/national_id/title", json!("Citizen id"));
            set(q, "/$comment", json!("reviewed"));
        },
        expect: &[],
    },
    Row {
        what: "describe a recursive query filter",
        before: recursive_filter,
        after: |q, _, _, _| set(q, "/$defs/filter/description", json!("and, or, equals")),
        expect: &[],
    },
    Row {
        what: "tighten a recursive query filter",
        before: recursive_filter,
        after: |q, _, _, _| set(q, "/$defs/filter/properties/equals/maxLength", json!(3)),
        expect: &[
            ("query_constraint_changed", "/filter/and"),
            ("query_constraint_changed", "/filter/equals"),
            ("query_constraint_changed", "/filter/or"),
        ],
    },
    Row {
        what: "change the owner",
        before: nothing,
        after: |_, _, _, owner| *owner = MemberId::new("judicial-records").unwrap(),
        expect: &[("owner_changed", "/owner")],
    },
    Row {
        what: "add an optional property inside an optional object written as anyOf with null",
        before: optional_father,
        after: |_, r, _, _| {
            set(
                r,
                "/properties/father/anyOf/0/properties/birth_year",
                json!({"type": "integer"}),
            )
        },
        expect: &[],
    },
    Row {
        what: "add an optional property inside an optional object referenced beside null",
        before: optional_father_by_ref,
        after: |_, r, _, _| set(r, "/$defs/Person/properties/birth_year", json!({"type": "integer"})),
        expect: &[],
    },
    Row {
        what: "remove a property inside an optional object written as anyOf with null",
        before: optional_father,
        after: |_, r, _, _| remove(r, "/properties/father/anyOf/0/properties", "national_id"),
        expect: &[("record_property_removed", "/father/national_id")],
    },
    Row {
        what: "retype a property inside an optional object referenced beside null",
        before: optional_father_by_ref,
        after: |_, r, _, _| set(r, "/$defs/Person/properties/full_name", json!({"type": "integer"})),
        expect: &[("record_property_retyped", "/father/full_name")],
    },
    Row {
        what: "write an optional object's anyOf with null as a type admitting null",
        before: optional_father,
        after: |_, r, _, _| {
            let father = r.pointer("/properties/father/anyOf/0").unwrap().clone();
            set(r, "/properties/father", father);
            set(r, "/properties/father/type", json!(["object", "null"]));
        },
        expect: &[],
    },
    Row {
        what: "make an optional object written as anyOf with null required to be an object",
        before: optional_father,
        after: |_, r, _, _| {
            let father = r.pointer("/properties/father/anyOf/0").unwrap().clone();
            set(r, "/properties/father", father);
        },
        expect: &[("record_property_retyped", "/father")],
    },
    Row {
        what: "constrain an optional object written as anyOf with null beside its alternatives",
        before: optional_father,
        after: |_, r, _, _| set(r, "/properties/father/minProperties", json!(1)),
        // Not a nullable alternative any more: compared as a whole, as before.
        expect: &[
            ("record_property_retyped", "/father"),
            ("record_property_structure_changed", "/father"),
            ("record_property_removed", "/father/full_name"),
            ("record_property_removed", "/father/national_id"),
        ],
    },
];

#[test]
fn compatibility_table() {
    assert!(TABLE.len() >= 12);
    for row in TABLE {
        let (mut q0, mut r0) = (base_query(), base_record());
        (row.before)(&mut q0, &mut r0);
        let previous = define(&q0, &r0, "national_id").unwrap_or_else(|e| panic!("{}: {e}", row.what));
        let (mut q1, mut r1, mut subject, mut new_owner) = (q0.clone(), r0.clone(), "national_id".to_owned(), owner());
        (row.after)(&mut q1, &mut r1, &mut subject, &mut new_owner);
        let mut next = define(&q1, &r1, &subject).unwrap_or_else(|e| panic!("{}: {e}", row.what));
        next.owner = new_owner;
        if row.what == "change descriptions" {
            next.description = "a different description".to_owned();
        }
        let changes = check_compatibility(&previous, &next);
        let got: Vec<(&str, &str)> = changes.iter().map(|c| (c.kind.as_str(), c.pointer.as_str())).collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        let mut want: Vec<(&str, &str)> = row.expect.to_vec();
        want.sort();
        assert_eq!(got_sorted, want, "{}: got {changes:#?}", row.what);
        for change in &changes {
            assert!(
                change.message.contains(&change.pointer)
                    || change.pointer.starts_with("/subject")
                    || change.pointer == "/owner",
                "{}: message {:?} does not name {}",
                row.what,
                change.message,
                change.pointer
            );
        }
    }
}

/// A `$ref` beside a `type` is where the object's fields are: they are
/// released field by field, not the object whole, so a key the register
/// adds inside it never leaves, and a later version adding one there is a
/// new field a grant made before does not cover.
#[test]
fn a_reference_beside_a_type_declares_the_fields() {
    let mut record = base_record();
    set(
        &mut record,
        "/properties/father",
        json!({"type": "object", "$ref": "#/$defs/person"}),
    );
    set(
        &mut record,
        "/$defs",
        json!({"person": {"type": "object", "properties": {"full_name": {"type": "string"}}}}),
    );
    let v1 = define(&base_query(), &record, "national_id").unwrap();
    let pointers = v1.field_pointers();
    assert!(pointers.iter().any(|p| p == "/father/full_name"), "{pointers:?}");
    let released = compiled(v1.clone())
        .shape()
        .to_json(&json!({"full_name": "A", "father": {"full_name": "B", "national_id": "001060000001"}}))
        .unwrap();
    assert_eq!(released, r#"{"full_name":"A","father":{"full_name":"B"}}"#);
}

#[test]
fn identical_versions_are_compatible() {
    let def = define(&base_query(), &base_record(), "national_id").unwrap();
    assert!(check_compatibility(&def, &def.clone()).is_empty());
}

// ---------------------------------------------------------------- registration

fn record_error(record_text: &str) -> SchemaError {
    parse_definition(
        "civil.birth",
        "birth record",
        owner(),
        &base_query().to_string(),
        record_text,
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap_err()
}

#[test]
fn malformed_json_is_refused_with_its_position() {
    let err = record_error("{\n  \"type\": \"object\",\n  \"properties\": {\n}");
    match &err {
        SchemaError::MalformedJson { schema, line, .. } => {
            assert_eq!(*schema, "record_schema");
            assert_eq!(*line, 4);
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("record_schema") && text.contains("line 4"), "{text}");

    let err = parse_definition(
        "civil.birth",
        "d",
        owner(),
        "{",
        &base_record().to_string(),
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SchemaError::MalformedJson {
                schema: "query_schema",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn meta_schema_failure_names_the_pointer() {
    let err = record_error(r#"{"type": 12}"#);
    assert!(matches!(err, SchemaError::MetaSchema { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/type"));
    assert!(
        err.to_string().contains("/type") && err.to_string().contains("meta-schema"),
        "{err}"
    );

    let err = record_error(r#"{"type":"object","properties":{"a":{"type":"string","minLength":-1}}}"#);
    assert_eq!(err.pointer(), Some("/properties/a/minLength"), "{err}");
}

#[test]
fn remote_references_are_refused() {
    for (reference, pointer) in [
        ("https://schemas.example.org/person.json", "/properties/father/$ref"),
        ("http://127.0.0.1:9/x#/a", "/properties/father/$ref"),
        ("person.json#/$defs/person", "/properties/father/$ref"),
        ("file:///etc/passwd", "/properties/father/$ref"),
    ] {
        let schema = json!({"type": "object", "properties": {"father": {"$ref": reference}}});
        let err = record_error(&schema.to_string());
        match &err {
            SchemaError::RemoteRef { reference: r, .. } => assert_eq!(r, reference),
            other => panic!("{reference}: unexpected {other:?}"),
        }
        assert_eq!(err.pointer(), Some(pointer));
        let text = err.to_string();
        assert!(text.contains("only local references"), "{text}");
    }
    let nested = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {}, "allOf": [{"$dynamicRef": "https://x.example/meta"}]}}});
    assert!(matches!(
        record_error(&nested.to_string()),
        SchemaError::RemoteRef { .. }
    ));
}

#[test]
fn unknown_meta_schemas_are_refused() {
    let schema = json!({"$schema": "https://schemas.example.org/my-meta", "type": "object", "properties": {"a": {}}});
    let err = record_error(&schema.to_string());
    assert!(matches!(err, SchemaError::UnsupportedDraft { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/$schema"));
}

#[test]
fn local_references_and_draft_07_are_accepted() {
    let record = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "definitions": {
            "parent": {"type": "object", "properties": {"full_name": {"type": "string"}}},
            "person": {"type": "object", "properties": {"full_name": {"type": "string"}, "father": {"$ref": "#/definitions/parent"}}}
        },
        "properties": {"father": {"$ref": "#/definitions/person"}}
    });
    let def = define(&base_query(), &record, "national_id").unwrap();
    let fields = def.field_pointers();
    assert_eq!(
        fields,
        vec![
            "/father",
            "/father/father",
            "/father/father/full_name",
            "/father/full_name"
        ]
    );
    let c = compiled(def);
    assert!(
        c.validate_record(&json!({"father": {"full_name": "A", "father": {"full_name": "B"}}}))
            .is_ok()
    );
    let err = c
        .validate_record(&json!({"father": {"father": {"full_name": 1}}}))
        .unwrap_err();
    assert_eq!(err.pointer, "/father/father/full_name");
}

/// A record schema whose fields refer back to an enclosing schema.
fn recursive_record() -> Value {
    json!({
        "type": "object",
        "properties": {
            "full_name": {"type": "string"},
            "guardian": {"$ref": "#/$defs/person"}
        },
        "$defs": {
            "person": {
                "type": "object",
                "properties": {
                    "full_name": {"type": "string"},
                    "guardian": {"$ref": "#/$defs/person"}
                }
            }
        }
    })
}

/// The broker releases a record field by field: a field whose fields it
/// cannot list would be released whole, with whatever the register puts in
/// it. Registration refuses such a record schema, naming where.
#[test]
fn record_schemas_whose_fields_cannot_be_listed_are_refused() {
    let err = record_error(&recursive_record().to_string());
    match &err {
        SchemaError::UnlistedFields {
            schema, field, problem, ..
        } => {
            assert_eq!((*schema, field.as_str()), ("record_schema", "/guardian/guardian"));
            assert!(matches!(problem, FieldCut::Recursive { reference } if reference == "#/$defs/person"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.pointer(), Some("/$defs/person/properties/guardian/$ref"));
    let text = err.to_string();
    assert!(
        text.contains("/guardian/guardian") && text.contains("may not be recursive"),
        "{text}"
    );

    // The whole record again, and array items of the same person.
    let itself = json!({"type": "object", "properties": {"a": {"type": "string"}, "self": {"$ref": "#"}}});
    assert_eq!(
        record_error(&itself.to_string()).pointer(),
        Some("/properties/self/$ref")
    );
    let mut children = recursive_record();
    children["$defs"]["person"]["properties"]["children"] =
        json!({"type": "array", "items": {"$ref": "#/$defs/person"}});
    children["$defs"]["person"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("guardian");
    let err = record_error(&children.to_string());
    assert!(
        matches!(&err, SchemaError::UnlistedFields { field, .. } if field == "/guardian/children"),
        "{err:?}"
    );
    assert_eq!(err.pointer(), Some("/$defs/person/properties/children/items/$ref"));

    // More references in a row than are followed.
    let mut defs = serde_json::Map::new();
    for i in 0..20 {
        defs.insert(format!("d{i}"), json!({"$ref": format!("#/$defs/d{}", i + 1)}));
    }
    defs.insert(
        "d20".into(),
        json!({"type": "object", "properties": {"a": {"type": "string"}}}),
    );
    let chain = json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs});
    let err = record_error(&chain.to_string());
    assert!(
        matches!(&err, SchemaError::UnlistedFields { problem: FieldCut::ReferenceChain, field, .. } if field == "/x"),
        "{err:?}"
    );

    // An anchor, which the validator resolves and the field listing does not.
    let anchor = json!({
        "type": "object",
        "properties": {"guardian": {"$ref": "#person"}},
        "$defs": {"person": {"$anchor": "person", "type": "object", "properties": {"full_name": {"type": "string"}}}}
    });
    let err = record_error(&anchor.to_string());
    assert!(
        matches!(
            &err,
            SchemaError::UnlistedFields {
                problem: FieldCut::Anchor { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.pointer(), Some("/properties/guardian/$ref"));

    // Nested deeper than fields are listed, through shallow definitions.
    let mut defs = serde_json::Map::new();
    for i in 0..70 {
        defs.insert(
            format!("l{i}"),
            json!({"type": "object", "properties": {"x": {"$ref": format!("#/$defs/l{}", i + 1)}}}),
        );
    }
    defs.insert("l70".into(), json!({"type": "string"}));
    let deep = json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/l0"}}, "$defs": defs});
    let err = record_error(&deep.to_string());
    assert!(
        matches!(
            &err,
            SchemaError::UnlistedFields {
                problem: FieldCut::TooDeep,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("levels deep"), "{err}");

    // A query schema is not cut down field by field: it may be recursive.
    let query = json!({
        "type": "object",
        "properties": {"national_id": {"type": "string"}, "filter": {"$ref": "#/$defs/f"}},
        "required": ["national_id"],
        "$defs": {"f": {"type": "object", "properties": {"and": {"$ref": "#/$defs/f"}}}}
    });
    assert!(define(&query, &base_record(), "national_id").is_ok());
}

/// A recursive version registered before such schemas were refused still
/// loads, and releases nothing inside the field where the listing stopped,
/// whatever a grant names.
#[test]
fn a_stored_recursive_version_releases_only_declared_fields() {
    let mut def = define(&base_query(), &base_record(), "national_id").unwrap();
    def.record_schema = recursive_record();
    let version = RecordTypeVersion::new(def, 1, datetime!(2025-01-01 0:00 UTC), owner(), Compatibility::Backward);
    assert!(version.field_pointers.contains(&"/guardian/guardian".to_owned()));
    let c = CompiledRecordType::compile(version).unwrap();
    let record = json!({
        "full_name": "A",
        "guardian": {
            "full_name": "B",
            "guardian": {"full_name": "C", "national_id": "001060000001", "undeclared_secret": "s"},
            "national_id": "001060000002"
        }
    });
    assert!(c.validate_record(&record).is_ok());
    let released = |fields: &[&str]| {
        let grant = FieldSelection::new(&fields.iter().map(|f| f.to_string()).collect::<Vec<_>>());
        grant.intersect(c.shape()).to_json(&record).unwrap()
    };
    let expected = r#"{"guardian":{"full_name":"B"}}"#;
    assert_eq!(released(&["/guardian"]), expected);
    assert_eq!(released(&["/guardian", "/guardian/guardian"]), expected);
    assert_eq!(released(&["/guardian/guardian"]), r#"{"guardian":{}}"#);
    assert_eq!(
        FieldSelection::all().intersect(c.shape()).to_json(&record).unwrap(),
        r#"{"full_name":"A","guardian":{"full_name":"B"}}"#
    );
    assert_eq!(
        c.shape().apply(&record),
        json!({"full_name": "A", "guardian": {"full_name": "B"}})
    );
    assert!(c.has_field("/guardian/full_name"));
    assert!(!c.has_field("/guardian/guardian"), "nothing is released there");
}

#[test]
fn oversize_schemas_are_refused() {
    let limits = SchemaLimits {
        max_schema_bytes: 64,
        max_depth: 32,
    };
    let err = parse_definition(
        "civil.birth",
        "d",
        owner(),
        &base_query().to_string(),
        &base_record().to_string(),
        "national_id",
        &limits,
    )
    .unwrap_err();
    match &err {
        SchemaError::TooLarge { schema, limit, size } => {
            assert_eq!((*schema, *limit), ("query_schema", 64));
            assert_eq!(*size, base_query().to_string().len());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("more than the limit of 64 bytes"), "{err}");
    assert_eq!(SchemaLimits::default().max_schema_bytes, 256 * 1024);
}

fn nested_schema(levels: usize) -> String {
    let mut s = json!({"type": "string"});
    for _ in 0..levels {
        s = json!({"type": "object", "properties": {"a": s}});
    }
    s.to_string()
}

#[test]
fn too_deep_schemas_are_refused() {
    // Each level adds two objects (the schema and its "properties").
    let err = record_error(&nested_schema(20));
    match &err {
        SchemaError::TooDeep { schema, depth, limit } => {
            assert_eq!((*schema, *limit), ("record_schema", 32));
            assert!(*depth > 32);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("levels deep"), "{err}");
    // Deeper than the JSON parser's own recursion limit: still reported as too deep.
    let text = format!("{}{}", "[".repeat(500), "]".repeat(500));
    assert!(matches!(record_error(&text), SchemaError::TooDeep { .. }));
    // Brackets inside strings do not count.
    let stringy = json!({"type": "object", "properties": {"a": {"type": "string", "description": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}}});
    assert!(define(&base_query(), &stringy, "national_id").is_ok());
    assert!(
        define(
            &base_query(),
            &serde_json::from_str(&nested_schema(15)).unwrap(),
            "national_id"
        )
        .is_ok()
    );
}

#[test]
fn bad_names_are_refused() {
    for name in [
        "Civil.Birth",
        "nodot",
        "a..b",
        ".a",
        "a.",
        "civil.birth-record",
        "civil birth.x",
        "",
    ] {
        let err = validate_record_type_name(name).unwrap_err();
        assert!(matches!(err, SchemaError::InvalidName { .. }), "{name}");
        assert!(err.to_string().contains("record type name"), "{err}");
    }
    let long = format!("a.{}", "b".repeat(127));
    assert!(validate_record_type_name(&long).is_err());
    for name in [
        "civil.birth",
        "civil_status.birth_v2.extract",
        "a.b",
        &format!("a.{}", "b".repeat(126)),
    ] {
        assert!(validate_record_type_name(name).is_ok(), "{name}");
    }
    let err = parse_definition("nodot", "d", owner(), "{}", "{}", "x", &SchemaLimits::default()).unwrap_err();
    assert!(matches!(err, SchemaError::InvalidName { .. }));
}

#[test]
fn subject_key_must_be_a_required_string_property() {
    let err = define(&base_query(), &base_record(), "citizen_id").unwrap_err();
    match &err {
        SchemaError::SubjectKey { key, problem, pointer } => {
            assert_eq!(key, "citizen_id");
            assert_eq!(*problem, SubjectKeyProblem::NotAProperty);
            assert_eq!(pointer, "/properties/citizen_id");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string().contains("is not a property of the query schema"),
        "{err}"
    );

    let err = define(&base_query(), &base_record(), "birth_date").unwrap_err();
    assert!(
        matches!(
            err,
            SchemaError::SubjectKey {
                problem: SubjectKeyProblem::NotRequired,
                ..
            }
        ),
        "{err:?}"
    );

    let mut q = base_query();
    set(&mut q, "/properties/national_id", json!({"type": "integer"}));
    let err = define(&q, &base_record(), "national_id").unwrap_err();
    assert!(
        matches!(
            err,
            SchemaError::SubjectKey {
                problem: SubjectKeyProblem::NotAString,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn schemas_must_be_objects_with_properties() {
    for (schema, pointer) in [
        (json!({"type": "string"}), "/type"),
        (json!({"properties": {"a": {}}}), "/type"),
        (json!({"type": "object"}), "/properties"),
        (json!({"type": "object", "properties": {}}), "/properties"),
        (json!(true), ""),
    ] {
        let err = record_error(&schema.to_string());
        assert!(
            matches!(err, SchemaError::NotAnObjectSchema { .. }),
            "{schema}: {err:?}"
        );
        assert_eq!(err.pointer(), Some(pointer), "{schema}");
        assert!(err.to_string().contains("object schema"), "{err}");
    }
}

#[test]
fn empty_description_is_refused() {
    let err = parse_definition(
        "civil.birth",
        "  ",
        owner(),
        &base_query().to_string(),
        &base_record().to_string(),
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, SchemaError::EmptyDescription));
    assert!(err.to_string().contains("description is empty"));
}

/// PostgreSQL's text columns refuse NUL: refused here, with the field named,
/// rather than failing in the database as an internal error.
#[test]
fn a_nul_character_in_stored_text_is_refused() {
    let parse = |description: &str, subject_key: &str| {
        parse_definition(
            "civil.birth",
            description,
            owner(),
            &base_query().to_string(),
            &base_record().to_string(),
            subject_key,
            &SchemaLimits::default(),
        )
    };
    let err = parse("Birth records\0", "national_id").unwrap_err();
    assert!(
        matches!(err, SchemaError::NulCharacter { field: "description" }),
        "{err:?}"
    );
    assert!(err.to_string().contains("description holds a NUL character"), "{err}");
    let err = parse("Birth records", "national_id\0").unwrap_err();
    assert!(
        matches!(err, SchemaError::NulCharacter { field: "subject_key" }),
        "{err:?}"
    );
    assert!(parse("Birth records", "national_id").is_ok());
}

#[test]
fn uncompilable_patterns_are_refused() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}});
    let err = record_error(&schema.to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/a/pattern"));
    assert!(err.to_string().contains("cannot be compiled"), "{err}");
    // Look-around needs a backtracking engine; patterns run in linear time here.
    let schema = json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}});
    assert!(matches!(record_error(&schema.to_string()), SchemaError::Compile { .. }));
}

/// A short pattern can compile to megabytes (`\p{L}{240}` nearly reaches
/// the regex default of 10 MiB): each is bounded, and so is their number.
/// A version registered before the pattern limit still loads, and still
/// checks its pattern: an upgrade takes no record type out of service.
#[test]
fn a_stored_version_with_a_pattern_over_the_new_limit_still_compiles() {
    let mut definition = define(&base_query(), &base_record(), "national_id").unwrap();
    definition.record_schema["properties"]["full_name"]["pattern"] = json!("\\p{L}{240}0");
    let c = compiled(definition);
    assert!(
        c.validate_record(&json!({"full_name": format!("{}0", "A".repeat(240))}))
            .is_ok()
    );
    assert!(c.validate_record(&json!({"full_name": "A1"})).is_err());
}

/// The pattern count limit came after versions with more patterns were
/// stored: such a version still loads, and still checks every pattern.
#[test]
fn a_stored_version_with_more_patterns_than_the_new_limit_still_compiles() {
    let mut definition = define(&base_query(), &base_record(), "national_id").unwrap();
    let props = definition.record_schema["properties"].as_object_mut().unwrap();
    for i in 0..=MAX_PATTERNS {
        props.insert(format!("p{i}"), json!({"type": "string", "pattern": format!("^{i}$")}));
    }
    let c = compiled(definition);
    let last = format!("p{MAX_PATTERNS}");
    assert!(
        c.validate_record(&json!({"full_name": "A", last.clone(): MAX_PATTERNS.to_string()}))
            .is_ok()
    );
    let err = c
        .validate_record(&json!({"full_name": "A", last.clone(): "x"}))
        .unwrap_err();
    assert_eq!(err.pointer, format!("/{last}"));
}

#[test]
fn patterns_are_bounded_in_size_and_number() {
    let big = json!({"type": "object", "properties": {
        "a": {"type": "string"},
        "b": {"type": "string", "pattern": "\\p{L}{240}0"}
    }});
    let err = record_error(&big.to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/b/pattern"));
    // The advice names what grows, a bounded repetition, not + or *.
    assert!(
        err.to_string()
            .contains("more than 2 MiB, the limit: a bounded repetition {m,n} of a group or class"),
        "{err}"
    );
    let keyed = json!({"type": "object", "properties": {"a": {}}, "patternProperties": {"x\\p{L}{240}0": {}}});
    let err = record_error(&keyed.to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/patternProperties/x\\p{L}{240}0"));

    // Patterns an agency writes for names, addresses, ids and dates stay
    // within, those repeating a group of Unicode classes a bounded number of
    // times too (they need 250 KiB to 1.7 MiB).
    for pattern in [
        "^[0-9]{12}$",
        "^\\p{L}{1,100}$",
        "^\\p{L}{1,255}$",
        "^[\\p{L}\\p{M} '\\-.]{1,200}$",
        "^\\p{Lu}\\p{Ll}+( \\p{Lu}\\p{Ll}+)*$",
        "^\\p{L}+( \\p{L}+){0,5}$",
        "^\\p{Lu}\\p{Ll}*( \\p{Lu}\\p{Ll}*){0,10}$",
        "^(\\p{L}+\\s?){1,10}$",
        "^\\p{L}+([ '\\-]\\p{L}+){0,20}$",
        "^[\\p{L}\\p{N}]+([ ,./'#\\-]+[\\p{L}\\p{N}]+){0,30}$",
        "^(\\p{L}+[ '\\-]?){1,40}$",
        "^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$",
        "^\\d{4}-\\d{2}-\\d{2}$",
    ] {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string", "pattern": pattern}}});
        assert!(define(&base_query(), &schema, "national_id").is_ok(), "{pattern}");
    }

    let many = |n: usize| {
        let mut props = serde_json::Map::new();
        for i in 0..n {
            props.insert(format!("p{i}"), json!({"type": "string", "pattern": format!("^{i}$")}));
        }
        json!({"type": "object", "properties": props})
    };
    assert!(define(&base_query(), &many(MAX_PATTERNS - 1), "national_id").is_ok());
    let err = record_error(&many(MAX_PATTERNS + 5).to_string());
    assert!(matches!(err, SchemaError::TooManyPatterns { limit: 64, .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/p64/pattern"));
    assert!(err.to_string().contains("at most 64 patterns"), "{err}");
    // Patterns in the query count against the query schema, and the values of
    // data keywords are not patterns.
    let mut query = base_query();
    query["properties"]["national_id"]["examples"] = json!([{"pattern": "x"}]);
    assert!(define(&query, &many(MAX_PATTERNS - 1), "national_id").is_ok());
}

/// Each pattern may take up to 2 MiB, but not every one of 64: a schema's
/// patterns take at most 16 MiB together, each counted as the least power
/// of two from 64 KiB it compiles within (2 MiB for this one, 1.7 MiB).
#[test]
fn a_schema_s_patterns_are_bounded_together() {
    let large = |n: usize| {
        let mut props = serde_json::Map::new();
        for i in 0..n {
            let pattern = format!("^{i}(\\p{{L}}+[ '\\-]?){{1,40}}$");
            props.insert(format!("p{i}"), json!({"type": "string", "pattern": pattern}));
        }
        json!({"type": "object", "properties": props})
    };
    assert!(define(&base_query(), &large(8), "national_id").is_ok());
    let err = record_error(&large(9).to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/p8/pattern"));
    assert!(
        err.to_string()
            .contains("the schema's patterns compile to more than 16 MiB together, the limit, with this one"),
        "{err}"
    );
}

/// A format the validator does not know is not checked: a typo would let
/// any value through. Registration refuses it; a version stored before
/// still loads.
#[test]
fn unknown_formats_are_refused_at_registration() {
    let record = json!({"type": "object", "properties": {"born": {"type": "string", "format": "dat"}}});
    let err = record_error(&record.to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/born/format"));
    let text = err.to_string();
    assert!(text.contains("\"dat\"") && text.contains("date-time"), "{text}");
    let mut query = base_query();
    query["properties"]["birth_date"]["format"] = json!("idn-date");
    let err = define(&query, &base_record(), "national_id").unwrap_err();
    assert_eq!(
        (err.schema(), err.pointer()),
        (Some("query_schema"), Some("/properties/birth_date/format"))
    );
    for format in ["date", "date-time", "email", "uuid", "ipv4", "uri"] {
        let record = json!({"type": "object", "properties": {"a": {"type": "string", "format": format}}});
        assert!(define(&base_query(), &record, "national_id").is_ok(), "{format}");
    }

    let mut def = define(&base_query(), &base_record(), "national_id").unwrap();
    def.record_schema["properties"]["full_name"]["format"] = json!("dat");
    let stored = RecordTypeVersion::new(def, 1, datetime!(2025-01-01 0:00 UTC), owner(), Compatibility::Backward);
    let c = CompiledRecordType::compile(stored).unwrap();
    assert!(c.validate_record(&json!({"full_name": "A"})).is_ok());
}

/// The next version of `previous`, as its integrator submits it.
fn define_after(
    previous: &RecordTypeDefinition,
    query: &Value,
    record: &Value,
) -> Result<RecordTypeDefinition, SchemaError> {
    parse_next_definition(
        Some(previous),
        "civil.birth",
        "birth record of a citizen",
        owner(),
        &query.to_string(),
        &record.to_string(),
        "national_id",
        &SchemaLimits::default(),
    )
}

/// A version stored before unknown formats were refused: its next version
/// may keep the format (the same name at the same place), or drop it, which
/// changes no answer since the broker never checked it; a format added,
/// changed or moved must be one the broker checks.
#[test]
fn a_format_kept_from_the_previous_version_is_admitted_as_it_was() {
    let mut v1 = define(&base_query(), &base_record(), "national_id").unwrap();
    v1.record_schema["properties"]["full_name"]["format"] = json!("person-name");
    v1.query_schema["properties"]["national_id"]["format"] = json!("int64");
    let (query, record) = (v1.query_schema.clone(), v1.record_schema.clone());
    assert!(define(&query, &base_record(), "national_id").is_err());
    assert!(define(&base_query(), &record, "national_id").is_err());

    let kept = define_after(&v1, &query, &record).unwrap();
    assert_eq!(check_compatibility(&v1, &kept), vec![]);
    let c = compiled(kept);
    assert!(c.validate_record(&json!({"full_name": "A"})).is_ok());
    assert!(c.validate_query(&json!({"national_id": "001099012345"})).is_ok());

    let (mut q, mut r) = (query.clone(), record.clone());
    remove(&mut q, "/properties/national_id", "format");
    remove(&mut r, "/properties/full_name", "format");
    let dropped = define_after(&v1, &q, &r).unwrap();
    assert_eq!(check_compatibility(&v1, &dropped), vec![]);

    // Changed, or moved elsewhere: a format the broker does not check, refused.
    let mut changed = record.clone();
    set(&mut changed, "/properties/full_name/format", json!("person-names"));
    let err = define_after(&v1, &query, &changed).unwrap_err();
    assert_eq!(err.pointer(), Some("/properties/full_name/format"), "{err}");
    let mut moved = record.clone();
    set(
        &mut moved,
        "/properties/father/properties/full_name/format",
        json!("person-name"),
    );
    let err = define_after(&v1, &query, &moved).unwrap_err();
    assert_eq!(
        err.pointer(),
        Some("/properties/father/properties/full_name/format"),
        "{err}"
    );
    // Replaced by one the broker checks: the register's values are now
    // checked, a record constraint changed.
    let mut checked = record.clone();
    set(&mut checked, "/properties/full_name/format", json!("email"));
    let next = define_after(&v1, &query, &checked).unwrap();
    let kinds: Vec<_> = check_compatibility(&v1, &next).into_iter().map(|c| c.kind).collect();
    assert_eq!(kinds, ["record_constraint_changed"]);
}

/// A version stored with a pattern over today's limit, or more patterns
/// than it: its next version may keep them (the same string at the same
/// place), but not add to what it keeps past a limit.
#[test]
fn patterns_kept_from_the_previous_version_are_admitted_as_they_were() {
    let big = "\\p{L}{240}0";
    let mut v1 = define(&base_query(), &base_record(), "national_id").unwrap();
    v1.record_schema["properties"]["full_name"]["pattern"] = json!(big);
    let record = v1.record_schema.clone();
    let kept = define_after(&v1, &base_query(), &record).unwrap();
    assert_eq!(check_compatibility(&v1, &kept), vec![]);
    let mut moved = record.clone();
    set(
        &mut moved,
        "/properties/father/properties/full_name/pattern",
        json!(big),
    );
    let err = define_after(&v1, &base_query(), &moved).unwrap_err();
    assert_eq!(
        err.pointer(),
        Some("/properties/father/properties/full_name/pattern"),
        "{err}"
    );
    assert!(err.to_string().contains("more than 2 MiB"), "{err}");

    // 65 patterns kept: as many stay, none may be added.
    let mut many = define(&base_query(), &base_record(), "national_id").unwrap();
    let props = many.record_schema["properties"].as_object_mut().unwrap();
    for i in 0..=MAX_PATTERNS {
        props.insert(format!("p{i}"), json!({"type": "string", "pattern": format!("^{i}$")}));
    }
    let record = many.record_schema.clone();
    assert!(define_after(&many, &base_query(), &record).is_ok());
    let mut more = record.clone();
    set(&mut more, "/properties/full_name/pattern", json!("^A"));
    let err = define_after(&many, &base_query(), &more).unwrap_err();
    assert!(matches!(err, SchemaError::TooManyPatterns { limit: 65, .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/full_name/pattern"));

    // Two kept that take 20 MiB together, more than 16: they stay, and
    // nothing is added.
    let mut huge = define(&base_query(), &base_record(), "national_id").unwrap();
    huge.record_schema["properties"]["full_name"]["pattern"] = json!(big);
    huge.record_schema["properties"]["father"]["properties"]["full_name"]["pattern"] = json!(big);
    let record = huge.record_schema.clone();
    assert!(define_after(&huge, &base_query(), &record).is_ok());
    let mut more = record.clone();
    set(&mut more, "/properties/birth_year/pattern", json!("^1"));
    let err = define_after(&huge, &base_query(), &more).unwrap_err();
    assert_eq!(err.pointer(), Some("/properties/birth_year/pattern"), "{err}");
    assert!(err.to_string().contains("more than 20 MiB together"), "{err}");
}

#[test]
fn unresolvable_local_references_are_refused_at_their_pointer() {
    let schema = json!({"type": "object", "$defs": {"person": {"type": "object"}}, "properties": {"a": {"$ref": "#/$defs/persn"}}});
    let err = record_error(&schema.to_string());
    assert!(matches!(err, SchemaError::Compile { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/a/$ref"), "{err}");
}

#[test]
fn compile_refuses_a_stored_version_with_a_remote_reference() {
    let mut def = define(&base_query(), &base_record(), "national_id").unwrap();
    set(
        &mut def.record_schema,
        "/properties/father",
        json!({"$ref": "https://example.org/person.json"}),
    );
    let version = RecordTypeVersion::new(def, 1, datetime!(2025-01-01 0:00 UTC), owner(), Compatibility::None);
    assert!(matches!(
        CompiledRecordType::compile(version),
        Err(SchemaError::RemoteRef { .. })
    ));
}

// ---------------------------------------------------------------- fields and digest

#[test]
fn field_pointers_cover_nested_objects_and_array_items() {
    let def = define(&base_query(), &base_record(), "national_id").unwrap();
    assert_eq!(
        def.field_pointers(),
        vec![
            "/birth_year",
            "/father",
            "/father/full_name",
            "/father/national_id",
            "/full_name",
            "/previous_names",
            "/previous_names/family_name",
            "/previous_names/given_name",
            "/sex",
        ]
    );
    let c = compiled(def);
    assert!(c.has_field("/father/full_name"));
    assert!(c.has_field("/previous_names"));
    assert!(!c.has_field("/mother"));
    assert!(!c.has_field("father"));
}

#[test]
fn field_pointers_are_escaped() {
    let record =
        json!({"type": "object", "properties": {"a/b": {"type": "object", "properties": {"c~d": {"type": "string"}}}}});
    let def = define(&base_query(), &record, "national_id").unwrap();
    assert_eq!(def.field_pointers(), vec!["/a~1b", "/a~1b/c~0d"]);
}

#[test]
fn digest_is_canonical() {
    let a = define(&base_query(), &base_record(), "national_id").unwrap();
    // Same schemas with keys in another order and whitespace.
    let reordered = r#"{ "required": ["national_id"], "additionalProperties": false,
        "properties": { "birth_date": {"format": "date", "type": "string"},
                        "national_id": {"pattern": "^[0-9]{12}$", "type": "string"} },
        "type": "object" }"#;
    let b = parse_definition(
        "civil.birth",
        "another description",
        owner(),
        reordered,
        &base_record().to_string(),
        "national_id",
        &SchemaLimits::default(),
    )
    .unwrap();
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.digest().len(), 64);
    let mut c = a.clone();
    c.name = "civil.birth2".into();
    assert_ne!(a.digest(), c.digest());
    let mut d = a.clone();
    set(&mut d.record_schema, "/properties/full_name/type", json!("integer"));
    assert_ne!(a.digest(), d.digest());
}

#[test]
fn version_constructor_fills_fields_and_digest() {
    let def = define(&base_query(), &base_record(), "national_id").unwrap();
    let v = RecordTypeVersion::new(
        def.clone(),
        3,
        datetime!(2025-01-01 0:00 UTC),
        owner(),
        Compatibility::Backward,
    );
    assert_eq!(v.field_pointers, def.field_pointers());
    assert_eq!(v.digest, def.digest());
    assert!(!v.deprecated);
    let c = CompiledRecordType::compile(v).unwrap();
    assert_eq!(
        (c.name(), c.version_number(), c.owner(), c.deprecated()),
        ("civil.birth", 3, &owner(), false)
    );
}

// ---------------------------------------------------------------- validation

const NATIONAL_ID: &str = "0010990123456";

/// A record's keys are the register's words: a failure names the keys its
/// schema declares and array indexes, never a key the register made up.
#[test]
fn record_validation_never_names_an_undeclared_key() {
    let mut record = base_record();
    set(
        &mut record,
        "/properties/aliases",
        json!({"type": "object", "additionalProperties": {"type": "string"}, "x-lienthong-opaque": true}),
    );
    let c = compiled(define(&base_query(), &record, "national_id").unwrap());
    let err = c
        .validate_record(&json!({"full_name": "A", "aliases": {NATIONAL_ID: 7}}))
        .unwrap_err();
    assert_eq!(err.pointer, "/aliases/<undeclared key>");
    assert_eq!(err.message, "expected type string");
    let err = c
        .validate_record(&json!({"full_name": "A", "previous_names": [{"given_name": "B"}, {"given_name": 1}]}))
        .unwrap_err();
    assert_eq!(err.pointer, "/previous_names/1/given_name");
    let long = "K".repeat(100_000);
    let err = c
        .validate_record(&json!({"full_name": "A", "aliases": {long.as_str(): 7}}))
        .unwrap_err();
    assert!(!err.to_string().contains("KKKK"), "{err}");
}

#[test]
fn query_validation_names_the_field_and_constraint_never_the_value() {
    let c = base();
    assert!(c.validate_query(&json!({"national_id": "001099012345"})).is_ok());
    assert_eq!(c.subject(&json!({"national_id": "001099012345"})), Some("001099012345"));
    assert_eq!(c.subject(&json!({"national_id": 1})), None);

    let missing = c.validate_query(&json!({"birth_date": "2000-01-01"})).unwrap_err();
    assert_eq!(missing.pointer, "/national_id");
    assert_eq!(missing.message, "is required");
    assert_eq!(missing.to_string(), "at /national_id: is required");

    let pattern = c.validate_query(&json!({"national_id": NATIONAL_ID})).unwrap_err();
    assert_eq!(pattern.pointer, "/national_id");
    assert_eq!(pattern.message, "does not match pattern ^[0-9]{12}$");
    assert!(!pattern.to_string().contains(NATIONAL_ID));
    assert!(!format!("{pattern:?}").contains(NATIONAL_ID));

    let typed = c
        .validate_query(&json!({"national_id": 1234567890123_u64}))
        .unwrap_err();
    assert_eq!(typed.message, "expected type string");
    assert!(!typed.to_string().contains("1234567890123"));

    let extra = c
        .validate_query(&json!({"national_id": "001099012345", "nickname": NATIONAL_ID}))
        .unwrap_err();
    assert_eq!(extra.pointer, "");
    assert_eq!(
        extra.message,
        "has a property the schema does not declare (additionalProperties)"
    );
    assert!(!extra.to_string().contains(NATIONAL_ID));

    // An undeclared key is the caller's text, not the schema's: it may be a
    // national ID, or a megabyte.
    let keyed = c
        .validate_query(&json!({"national_id": "001099012345", NATIONAL_ID: 1, "x": 2}))
        .unwrap_err();
    assert!(
        keyed
            .message
            .contains("the schema does not declare (additionalProperties)"),
        "{keyed}"
    );
    assert!(!keyed.to_string().contains(NATIONAL_ID), "{keyed}");

    let date = c
        .validate_query(&json!({"national_id": "001099012345", "birth_date": "2000-13-45"}))
        .unwrap_err();
    assert_eq!(date.pointer, "/birth_date");
    assert_eq!(date.message, "is not a valid date");
    assert!(!date.to_string().contains("2000-13-45"));
}

#[test]
fn record_validation_names_the_field_and_constraint_never_the_value() {
    let c = base();
    let good = json!({"full_name": "Nguyen Van A", "sex": "female", "father": {"full_name": "B"}, "previous_names": [{"family_name": "Tran"}]});
    assert!(c.validate_record(&good).is_ok());

    let enum_err = c
        .validate_record(&json!({"full_name": "A", "sex": "Nguyen-secret"}))
        .unwrap_err();
    assert_eq!(enum_err.pointer, "/sex");
    assert_eq!(enum_err.message, "must be one of the allowed values");
    assert!(!enum_err.to_string().contains("Nguyen-secret"));

    let nested = c
        .validate_record(&json!({"full_name": "A", "father": {"full_name": NATIONAL_ID.parse::<u64>().unwrap()}}))
        .unwrap_err();
    assert_eq!(nested.pointer, "/father/full_name");
    assert!(!nested.to_string().contains(NATIONAL_ID.trim_start_matches('0')));

    let item = c
        .validate_record(&json!({"full_name": "A", "previous_names": [{"family_name": "x"}, {"family_name": false}]}))
        .unwrap_err();
    assert_eq!(item.pointer, "/previous_names/1/family_name");

    let whole = c.validate_record(&json!(NATIONAL_ID)).unwrap_err();
    assert_eq!(whole.message, "expected type object");
    assert!(!whole.to_string().contains(NATIONAL_ID));
}

#[test]
fn the_first_error_is_deterministic() {
    let c = base();
    let bad = json!({"sex": 3, "birth_year": "x", "father": 1});
    let first = c.validate_record(&bad).unwrap_err();
    for _ in 0..20 {
        assert_eq!(c.validate_record(&bad).unwrap_err(), first);
    }
}

#[test]
fn compiled_record_types_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledRecordType>();
}

// ---------------------------------------------------------------- property: later compatible versions accept old records

fn family() -> Vec<RecordTypeDefinition> {
    let v1 = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0},
            "status": {"type": "string", "enum": ["active", "inactive"]},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "aliases": {"type": "array", "items": {"type": "object", "properties": {"alias": {"type": "string"}}}}
        },
        "required": ["name"]
    });
    let mut v2 = v1.clone();
    set(&mut v2, "/properties/email", json!({"type": "string"}));
    let mut v3 = v2.clone();
    set(
        &mut v3,
        "/properties/tags",
        json!({"type": "array", "items": {"type": "string"}}),
    );
    let mut v4 = v3.clone();
    set(
        &mut v4,
        "/properties/address/properties/district",
        json!({"type": "string"}),
    );
    set(
        &mut v4,
        "/properties/aliases/items/properties/since",
        json!({"type": "integer"}),
    );
    [v1, v2, v3, v4]
        .iter()
        .map(|r| define(&base_query(), r, "national_id").unwrap())
        .collect()
}

fn v1_record() -> impl Strategy<Value = Value> {
    (
        "[a-zA-Z ]{0,40}",
        proptest::option::of(0u32..150),
        proptest::option::of(prop_oneof![Just("active"), Just("inactive")]),
        proptest::option::of("[a-z]{1,10}"),
        proptest::option::of(proptest::collection::vec(proptest::option::of("[a-z]{0,8}"), 0..4)),
    )
        .prop_map(|(name, age, status, city, aliases)| {
            let mut record = serde_json::Map::new();
            record.insert("name".into(), json!(name));
            if let Some(age) = age {
                record.insert("age".into(), json!(age));
            }
            if let Some(status) = status {
                record.insert("status".into(), json!(status));
            }
            if let Some(city) = city {
                record.insert("address".into(), json!({"city": city}));
            }
            if let Some(aliases) = aliases {
                let items: Vec<Value> = aliases
                    .into_iter()
                    .map(|a| a.map_or_else(|| json!({}), |a| json!({"alias": a})))
                    .collect();
                record.insert("aliases".into(), Value::Array(items));
            }
            Value::Object(record)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn records_of_a_version_validate_under_every_later_compatible_version(record in v1_record()) {
        let versions: Vec<CompiledRecordType> = family().into_iter().map(compiled).collect();
        prop_assert!(versions[0].validate_record(&record).is_ok());
        for later in &versions[1..] {
            prop_assert!(later.validate_record(&record).is_ok(), "{:?}", later.validate_record(&record));
        }
    }

    #[test]
    fn validation_messages_never_contain_the_value(id in "[0-9]{13,20}", name in "[A-Z][a-z]{3,12} [A-Z][a-z]{3,12}") {
        let c = base();
        let err = c.validate_query(&json!({"national_id": id.clone()})).unwrap_err();
        prop_assert!(!err.to_string().contains(&id));
        let err = c.validate_record(&json!({"full_name": name.clone(), "sex": name.clone()})).unwrap_err();
        prop_assert!(!err.to_string().contains(&name));
        let err = c.validate_record(&json!({"full_name": 5, "father": {"national_id": id.clone()}, "x": [id.clone()]})).unwrap_err();
        prop_assert!(!err.to_string().contains(&id));
    }
}

/// Constraints of a string property, each present or not.
fn string_constraints() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(0u64..5),
        proptest::option::of(2u64..8),
        proptest::option::of(prop_oneof![
            Just("^[0-9]*$"),
            Just("^[0-9]{2,}$"),
            Just("^[a-z0-9]*$"),
            Just("[0-9]")
        ]),
        proptest::option::of(Just(json!({"type": "string", "maxLength": 6}))),
        proptest::option::of(prop_oneof![
            Just(json!(["12", "abc"])),
            Just(json!(["12", "abc", "x"])),
            Just(json!(["abc", "12"]))
        ]),
    )
        .prop_map(|(min, max, pattern, all_of, one_of)| {
            let mut schema = json!({"type": "string"});
            if let Some(min) = min {
                schema["minLength"] = json!(min);
            }
            if let Some(max) = max {
                schema["maxLength"] = json!(max);
            }
            if let Some(pattern) = pattern {
                schema["pattern"] = json!(pattern);
            }
            if let Some(all_of) = all_of {
                schema["allOf"] = json!([all_of]);
            }
            if let Some(values) = one_of {
                schema["enum"] = values;
            }
            schema
        })
}

/// A query schema whose `code` parameter and root vary.
fn varied_query() -> impl Strategy<Value = Value> {
    (string_constraints(), any::<bool>(), proptest::option::of(1u64..3)).prop_map(|(code, closed, min_props)| {
        let mut query = json!({
            "type": "object",
            "properties": {"national_id": {"type": "string"}, "code": code},
            "required": ["national_id"]
        });
        if closed {
            query["additionalProperties"] = json!(false);
        }
        if let Some(n) = min_props {
            query["minProperties"] = json!(n);
        }
        query
    })
}

fn sample_query() -> impl Strategy<Value = Value> {
    let code = prop_oneof![
        "[0-9a-z]{0,9}",
        Just("12".to_owned()),
        Just("abc".to_owned()),
        Just("x".to_owned())
    ];
    (proptest::option::of(code), any::<bool>()).prop_map(|(code, extra)| {
        let mut query = json!({"national_id": "001099012345"});
        if let Some(code) = code {
            query["code"] = json!(code);
        }
        if extra {
            query["district"] = json!("x");
        }
        query
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What BACKWARD promises consumers: a query the previous version
    /// accepted, the next compatible one accepts too.
    #[test]
    fn queries_of_a_version_stay_valid_under_a_later_compatible_one(
        old in varied_query(),
        new in varied_query(),
        queries in proptest::collection::vec(sample_query(), 1..8),
    ) {
        let old_def = define(&old, &base_record(), "national_id").unwrap();
        let new_def = define(&new, &base_record(), "national_id").unwrap();
        if check_compatibility(&old_def, &new_def).is_empty() {
            let (before, after) = (compiled(old_def), compiled(new_def));
            for query in queries.iter().filter(|q| before.validate_query(q).is_ok()) {
                prop_assert!(after.validate_query(query).is_ok(), "{query} refused by {new} after {old}");
            }
        }
    }
}

/// A record schema whose `code` property varies, required or not.
fn varied_record() -> impl Strategy<Value = Value> {
    (string_constraints(), any::<bool>()).prop_map(|(code, required)| {
        let required = if required {
            json!(["name", "code"])
        } else {
            json!(["name"])
        };
        json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "code": code},
            "required": required
        })
    })
}

fn sample_record() -> impl Strategy<Value = Value> {
    let code = prop_oneof![
        "[0-9a-z]{0,9}",
        Just("12".to_owned()),
        Just("abc".to_owned()),
        Just("x".to_owned())
    ];
    proptest::option::of(code).prop_map(|code| match code {
        Some(code) => json!({"name": "A", "code": code}),
        None => json!({"name": "A"}),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What consumers of the previous version rely on: a record a later
    /// compatible version admits, the previous one admitted.
    #[test]
    fn a_later_compatible_version_admits_no_record_the_previous_refused(
        old in varied_record(),
        new in varied_record(),
        records in proptest::collection::vec(sample_record(), 1..8),
    ) {
        let old_def = define(&base_query(), &old, "national_id").unwrap();
        let new_def = define(&base_query(), &new, "national_id").unwrap();
        if check_compatibility(&old_def, &new_def).is_empty() {
            let (before, after) = (compiled(old_def), compiled(new_def));
            for record in records.iter().filter(|r| after.validate_record(r).is_ok()) {
                prop_assert!(before.validate_record(record).is_ok(), "{} under {} then {}", record, old, new);
            }
        }
    }
}

/// A record schema whose `code` property may be held to a set of values
/// (`enum`, or `const` for one), on the property or its items.
fn enum_record() -> impl Strategy<Value = Value> {
    let values = proptest::sample::subsequence(vec!["12", "abc", "x"], 1..=3);
    (proptest::option::of(values), any::<bool>(), any::<bool>()).prop_map(|(values, as_const, items)| {
        let mut code = json!({"type": "string"});
        match values {
            Some(values) if as_const => code["const"] = json!(values[0]),
            Some(values) => code["enum"] = json!(values),
            None => {}
        }
        if items {
            code = json!({"type": "object", "properties": {"value": code}});
        }
        json!({"type": "object", "properties": {"name": {"type": "string"}, "code": code}, "required": ["name"]})
    })
}

fn enum_sample_record() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("12"), Just("abc"), Just("x"), Just("y")],
        any::<bool>(),
    )
        .prop_map(|(code, items)| {
            if items {
                json!({"name": "A", "code": {"value": code}})
            } else {
                json!({"name": "A", "code": code})
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A record's `enum` and `const` may neither narrow nor widen: a value a
    /// later compatible version admits, the previous one admitted.
    #[test]
    fn a_later_compatible_version_admits_no_value_outside_the_previous_enum(
        old in enum_record(),
        new in enum_record(),
        records in proptest::collection::vec(enum_sample_record(), 1..6),
    ) {
        let old_def = define(&base_query(), &old, "national_id").unwrap();
        let new_def = define(&base_query(), &new, "national_id").unwrap();
        if check_compatibility(&old_def, &new_def).is_empty() {
            let (before, after) = (compiled(old_def), compiled(new_def));
            for record in &records {
                prop_assert_eq!(
                    before.validate_record(record).is_ok(),
                    after.validate_record(record).is_ok(),
                    "{} under {} then {}", record, old, new
                );
            }
        }
    }
}

#[test]
fn query_constraint_changes_name_the_parameter_and_the_keywords() {
    let previous = define(&base_query(), &base_record(), "national_id").unwrap();
    let mut query = base_query();
    set(&mut query, "/properties/national_id/pattern", json!("^[0-9]{13}$"));
    set(&mut query, "/properties/national_id/minLength", json!(13));
    let changes = check_compatibility(&previous, &define(&query, &base_record(), "national_id").unwrap());
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        changes[0].message,
        "query parameter /national_id: pattern changed, minLength added; queries the previous version accepted \
         may be refused (only removing a constraint, lowering a minimum or raising a maximum keeps them valid)"
    );
}

#[test]
fn the_version_family_is_backward_compatible_step_by_step() {
    let defs = family();
    for i in 0..defs.len() {
        for j in i + 1..defs.len() {
            let changes = check_compatibility(&defs[i], &defs[j]);
            assert!(changes.is_empty(), "v{} -> v{}: {changes:?}", i + 1, j + 1);
        }
    }
}

// ------------------------------------------- fields declared in alternatives

/// What a grant of `fields` releases of `record` under `c`, as the lookup
/// path writes it.
fn released(c: &CompiledRecordType, fields: &[&str], record: &Value) -> String {
    let grant = FieldSelection::new(&fields.iter().map(|f| f.to_string()).collect::<Vec<_>>());
    grant.intersect(c.shape()).to_json(record).unwrap()
}

fn with_father(father: Value) -> Value {
    let mut record = base_record();
    set(&mut record, "/properties/father", father);
    record
}

/// The nullable object schemars and most generators emit for an optional
/// struct: its fields are fields a grant names one by one, and a grant of
/// the father's name releases neither his national ID nor a key the schema
/// does not declare.
#[test]
fn a_nullable_object_declared_through_any_of_is_granted_field_by_field() {
    let person =
        json!({"type": "object", "properties": {"full_name": {"type": "string"}, "national_id": {"type": "string"}}});
    let forms = [
        json!({"anyOf": [{"type": "null"}, person.clone()]}),
        json!({"oneOf": [{"$ref": "#/$defs/person"}, {"type": "null"}]}),
        json!({"anyOf": [{"allOf": [{"$ref": "#/$defs/person"}]}, {"type": "null"}], "description": "the father"}),
        json!({"type": ["object", "null"], "properties": person["properties"].clone()}),
    ];
    for father in forms {
        let mut schema = with_father(father.clone());
        set(&mut schema, "/$defs", json!({"person": person}));
        let c = compiled(define(&base_query(), &schema, "national_id").unwrap());
        assert!(c.has_field("/father/full_name"), "{father}");
        assert!(c.has_field("/father/national_id"), "{father}");
        assert!(c.version.field_pointers.contains(&"/father/full_name".to_owned()));
        let record = json!({
            "full_name": "A",
            "father": {"full_name": "B", "national_id": "001060000001", "undeclared": "MY-SECRET"}
        });
        assert!(c.validate_record(&record).is_ok());
        assert_eq!(
            released(&c, &["/father/full_name"], &record),
            r#"{"father":{"full_name":"B"}}"#
        );
        assert_eq!(
            released(&c, &["/father"], &record),
            r#"{"father":{"full_name":"B","national_id":"001060000001"}}"#,
            "{father}"
        );
        // No father: a grant of the father says so; a grant of his name alone does not.
        let orphan = json!({"full_name": "A", "father": null});
        assert_eq!(released(&c, &["/father"], &orphan), r#"{"father":null}"#);
        assert_eq!(released(&c, &["/father/full_name"], &orphan), "{}");
    }
}

/// A version stored before the fields of alternatives were listed kept the
/// pointers of that day; compiled, it lists what can be granted now, as
/// `schema show` and a refused grant's message show them.
#[test]
fn a_stored_version_lists_the_fields_of_its_alternatives() {
    let person =
        json!({"type": "object", "properties": {"full_name": {"type": "string"}, "national_id": {"type": "string"}}});
    let schema = with_father(json!({"anyOf": [{"type": "null"}, person]}));
    let mut version = RecordTypeVersion::new(
        define(&base_query(), &schema, "national_id").unwrap(),
        1,
        datetime!(2025-01-01 0:00 UTC),
        owner(),
        Compatibility::Backward,
    );
    version.field_pointers = vec!["/full_name".into(), "/father".into()];
    let c = CompiledRecordType::compile(version).unwrap();
    assert!(
        c.version.field_pointers.contains(&"/father/full_name".to_owned()),
        "{:?}",
        c.version.field_pointers
    );
    assert!(c.version.field_pointers.contains(&"/father".to_owned()));
}

/// A field that is a string or an object releases the string, or the
/// object's declared keys: never one the schema does not declare.
#[test]
fn a_scalar_or_object_field_releases_only_declared_keys() {
    let mut schema = base_record();
    set(
        &mut schema,
        "/properties/mixed",
        json!({"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": "integer"}}}]}),
    );
    let c = compiled(define(&base_query(), &schema, "national_id").unwrap());
    let record = json!({"full_name": "A", "mixed": {"x": 1, "y": "MY-SECRET"}});
    assert!(c.validate_record(&record).is_ok());
    assert_eq!(released(&c, &["/mixed"], &record), r#"{"mixed":{"x":1}}"#);
    assert_eq!(released(&c, &[""], &record), r#"{"full_name":"A","mixed":{"x":1}}"#);
    let text = json!({"full_name": "A", "mixed": "plain"});
    assert_eq!(released(&c, &["/mixed"], &text), r#"{"mixed":"plain"}"#);
    assert_eq!(released(&c, &["/mixed/x"], &text), "{}");
}

/// Alternatives declaring different names: each name is a field. A value
/// matching one alternative may hold, under a name only another declares,
/// anything at all (that alternative leaves it free); the filter still
/// releases no key that no alternative declares there.
#[test]
fn alternatives_declaring_different_names_release_no_undeclared_key() {
    let mut schema = base_record();
    set(
        &mut schema,
        "/properties/doc",
        json!({"anyOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "object", "properties": {"c": {"type": "string"}}}}}
        ]}),
    );
    let c = compiled(define(&base_query(), &schema, "national_id").unwrap());
    for pointer in ["/doc", "/doc/a", "/doc/a/c", "/doc/b"] {
        assert!(c.has_field(pointer), "{pointer}");
    }
    let record = json!({"full_name": "A", "doc": {"a": {"c": "C", "national_id": "001060000001"}, "b": "B"}});
    assert!(c.validate_record(&record).is_ok());
    assert_eq!(released(&c, &["/doc"], &record), r#"{"doc":{"a":{"c":"C"},"b":"B"}}"#);
    let string = json!({"full_name": "A", "doc": {"a": "A"}});
    assert_eq!(released(&c, &["/doc/a"], &string), r#"{"doc":{"a":"A"}}"#);
}

/// A property declared only under `if`/`then`/`else` or `dependentSchemas`
/// could never be granted and would be dropped from every record: refused
/// at registration, naming it and where. A condition that only makes a
/// declared property required is fine.
#[test]
fn a_property_declared_only_under_a_condition_is_refused() {
    let object = |extra: Value| {
        let mut n = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        for (k, v) in extra.as_object().unwrap() {
            n[k] = v.clone();
        }
        n
    };
    for (n, keyword) in [
        (
            object(
                json!({"if": {"required": ["a"]}, "then": {"properties": {"b": {"type": "string"}}, "required": ["b"]}}),
            ),
            "then",
        ),
        (
            object(json!({"if": {"required": ["a"]}, "else": {"properties": {"b": {"type": "string"}}}})),
            "else",
        ),
        (
            object(json!({"dependentSchemas": {"a": {"properties": {"b": {"type": "string"}}}}})),
            "dependentSchemas",
        ),
    ] {
        let mut schema = base_record();
        set(&mut schema, "/properties/n", n.clone());
        let err = define(&base_query(), &schema, "national_id").unwrap_err();
        assert!(
            matches!(&err, SchemaError::UnlistedFields { problem: FieldCut::ConditionalKeys { keyword: k, key }, .. }
                if k == keyword && key == "b"),
            "{n}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("/properties/n/{keyword}")) && message.contains("\"b\""),
            "{message}"
        );
    }
    // Declared beside the condition, and only required by it: fine.
    let mut schema = base_record();
    set(
        &mut schema,
        "/properties/n",
        json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
               "if": {"required": ["a"]}, "then": {"properties": {"b": {"minLength": 1}}, "required": ["b"]}}),
    );
    define(&base_query(), &schema, "national_id").expect("a condition on declared properties");
}

/// An object field whose keys its schema does not declare is refused at
/// registration, naming it and the fix, unless marked opaque: then a grant
/// on it releases it whole, as its owner declared.
#[test]
fn an_object_field_without_declared_keys_must_be_marked_opaque() {
    for (field, at) in [
        (json!({"type": "object"}), "/properties/extra"),
        (
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            "/properties/extra",
        ),
        (
            json!({"type": "object", "patternProperties": {"^x": {"type": "string"}}}),
            "/properties/extra",
        ),
        (json!({"type": "array"}), "/properties/extra"),
        (
            json!({"type": "array", "items": {"type": "object"}}),
            "/properties/extra",
        ),
        (json!({"description": "anything"}), "/properties/extra"),
        (
            json!({"anyOf": [{"type": "null"}, {"type": "object"}]}),
            "/properties/extra",
        ),
    ] {
        let mut schema = base_record();
        set(&mut schema, "/properties/extra", field.clone());
        let err = define(&base_query(), &schema, "national_id").unwrap_err();
        assert!(
            matches!(&err, SchemaError::UnlistedFields { problem: FieldCut::KeysNotDeclared, field, pointer, .. }
                if field == "/extra" && pointer == at),
            "{field}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("/extra") && message.contains("\"x-lienthong-opaque\": true"),
            "{message}"
        );
    }
    // Fields that hold no object need no mark.
    for field in [
        json!({"type": "array", "items": {"type": "string"}}),
        json!({"type": ["string", "null"]}),
        json!({"enum": ["a", {"b": 1}]}),
        json!({"anyOf": [{"type": "null"}, {"type": "integer"}]}),
        json!({"allOf": [{"type": "string"}, {"minLength": 2}]}),
    ] {
        let mut schema = base_record();
        set(&mut schema, "/properties/extra", field.clone());
        assert!(define(&base_query(), &schema, "national_id").is_ok(), "{field}");
    }
    let mut schema = base_record();
    set(
        &mut schema,
        "/properties/extra",
        json!({"type": "object", "x-lienthong-opaque": true}),
    );
    let c = compiled(define(&base_query(), &schema, "national_id").unwrap());
    let record = json!({"full_name": "A", "extra": {"anything": {"at": "all"}}});
    assert_eq!(
        released(&c, &["/extra"], &record),
        r#"{"extra":{"anything":{"at":"all"}}}"#
    );
}

/// A version stored before such fields were refused still loads; an object
/// there is released without any of its keys, since none is declared.
#[test]
fn a_stored_object_field_without_declared_keys_releases_none_of_them() {
    let mut def = define(&base_query(), &base_record(), "national_id").unwrap();
    set(&mut def.record_schema, "/properties/extra", json!({"type": "object"}));
    set(&mut def.record_schema, "/properties/anything", json!({}));
    let version = RecordTypeVersion::new(def, 1, datetime!(2025-01-01 0:00 UTC), owner(), Compatibility::Backward);
    let c = CompiledRecordType::compile(version).unwrap();
    let record = json!({
        "full_name": "A",
        "extra": {"national_id": "001060000001"},
        "anything": [{"national_id": "001060000002"}, "text"]
    });
    assert!(c.validate_record(&record).is_ok());
    assert_eq!(
        released(&c, &["/extra", "/anything"], &record),
        r#"{"extra":{},"anything":[{},"text"]}"#
    );
    assert_eq!(released(&c, &["/extra/national_id"], &record), r#"{"extra":{}}"#);
    // Its integrator marks the field in the next version, without an admin.
    let stored = c.version.definition.clone();
    let mut marked = stored.record_schema.clone();
    for field in ["/properties/extra", "/properties/anything"] {
        set(&mut marked, &format!("{field}/x-lienthong-opaque"), json!(true));
    }
    let next = define(&base_query(), &marked, "national_id").unwrap();
    assert_eq!(check_compatibility(&stored, &next), vec![]);
    assert!(define(&base_query(), &stored.record_schema, "national_id").is_err());
}

/// A record schema may not recurse through an alternative either: the
/// broker could not list the fields inside.
#[test]
fn a_recursive_alternative_is_refused() {
    let mut schema = base_record();
    set(&mut schema, "/properties/guardian", json!({"$ref": "#/$defs/person"}));
    set(
        &mut schema,
        "/$defs",
        json!({"person": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "full_name": {"type": "string"}, "guardian": {"$ref": "#/$defs/person"}}}]}}),
    );
    let err = define(&base_query(), &schema, "national_id").unwrap_err();
    assert!(
        matches!(&err, SchemaError::UnlistedFields { problem: FieldCut::Recursive { .. }, field, .. } if field == "/guardian/guardian"),
        "{err:?}"
    );
}

/// Alternatives referencing the same definitions over and over are refused
/// as too many fields, before they cost exponential work.
#[test]
fn alternatives_fanning_out_are_bounded() {
    let mut defs = serde_json::Map::new();
    for i in 0..30 {
        defs.insert(
            format!("d{i}"),
            json!({"anyOf": [{"$ref": format!("#/$defs/d{}", i + 1)}, {"$ref": format!("#/$defs/d{}", i + 1)}]}),
        );
    }
    defs.insert(
        "d30".into(),
        json!({"type": "object", "properties": {"x": {"type": "string"}}}),
    );
    let mut schema = base_record();
    set(&mut schema, "/properties/deep", json!({"$ref": "#/$defs/d0"}));
    set(&mut schema, "/$defs", Value::Object(defs));
    let err = define(&base_query(), &schema, "national_id").unwrap_err();
    assert!(matches!(err, SchemaError::TooManyFields { .. }), "{err:?}");
}

/// Key names the generated schemas declare, and those they never do.
const DECLARED_NAMES: [&str; 3] = ["a", "b", "c"];

/// A record field's schema: scalars, objects declaring some of
/// [`DECLARED_NAMES`], arrays, and objects declared every way a generator
/// may: `anyOf`/`oneOf` with `null` or another alternative, `allOf`,
/// `type: ["object", "null"]`, and `$ref` (an object to move to `$defs`,
/// under `x-hoist`).
fn field_schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "integer"})),
        Just(json!({"type": ["string", "null"]})),
        Just(json!({"type": "array", "items": {"type": "string"}})),
    ];
    leaf.prop_recursive(4, 32, 3, |inner| {
        let name = prop::sample::select(DECLARED_NAMES.to_vec());
        let object = prop::collection::btree_map(name, inner.clone(), 1..3)
            .prop_map(|props| json!({"type": "object", "properties": props}));
        prop_oneof![
            object.clone(),
            object.clone().prop_map(|o| json!({"anyOf": [{"type": "null"}, o]})),
            (object.clone(), inner.clone()).prop_map(|(o, other)| json!({"oneOf": [other, o]})),
            (object.clone(), object.clone()).prop_map(|(a, b)| json!({"anyOf": [a, b]})),
            (object.clone(), object.clone()).prop_map(|(a, b)| json!({"allOf": [a, {"allOf": [b]}]})),
            object.clone().prop_map(|mut o| {
                o["type"] = json!(["object", "null"]);
                o
            }),
            inner.clone().prop_map(|i| json!({"type": "array", "items": i})),
            object.prop_map(|o| json!({"x-hoist": o})),
        ]
    })
}

/// Moves every `{"x-hoist": schema}` to `$defs`, leaving a `$ref` to it.
fn hoist(schema: &mut Value, defs: &mut serde_json::Map<String, Value>) {
    if let Some(target) = schema.get_mut("x-hoist").map(Value::take) {
        let name = format!("d{}", defs.len());
        *schema = json!({"$ref": format!("#/$defs/{name}")});
        // Taken before the definitions it holds are named.
        defs.insert(name.clone(), Value::Null);
        let mut target = target;
        hoist(&mut target, defs);
        defs.insert(name, target);
        return;
    }
    match schema {
        Value::Object(map) => map.values_mut().for_each(|v| hoist(v, defs)),
        Value::Array(items) => items.iter_mut().for_each(|v| hoist(v, defs)),
        _ => {}
    }
}

fn record_schema() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(prop::sample::select(DECLARED_NAMES.to_vec()), field_schema(), 1..4).prop_map(|props| {
        let mut schema = json!({"type": "object", "properties": props});
        let mut defs = serde_json::Map::new();
        hoist(&mut schema, &mut defs);
        schema["$defs"] = Value::Object(defs);
        schema
    })
}

/// Records that fit the schemas often, and carry keys no schema declares
/// at every depth.
fn random_record() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec!["a", "b", "c", "national_id", "zz"]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z]{0,4}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..5)
                .prop_map(|kvs| Value::Object(kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// Every key path of `value`'s objects (array levels transparent) is a
/// declared field pointer.
fn only_declared_keys(value: &Value, prefix: &str, declared: &[String]) -> Result<(), String> {
    match value {
        Value::Object(map) => map.iter().try_for_each(|(key, sub)| {
            let pointer = format!("{prefix}/{key}");
            if !declared.contains(&pointer) {
                return Err(pointer);
            }
            only_declared_keys(sub, &pointer, declared)
        }),
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| only_declared_keys(item, prefix, declared)),
        _ => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the register sends (valid or not), under whatever grant, the
    /// released record holds only keys its schema declares, however the
    /// schema declares them.
    #[test]
    fn no_undeclared_key_is_ever_released(
        schema in record_schema(),
        fields in random_record(),
        grant in prop::collection::vec(
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "national_id"]), 0..4)
                .prop_map(|s| if s.is_empty() { String::new() } else { format!("/{}", s.join("/")) }),
            0..4,
        ),
    ) {
        let mut record = json!({"a": "x", "national_id": "001060000001"});
        if let (Some(extra), Some(map)) = (fields.as_object(), record.as_object_mut()) {
            map.extend(extra.clone());
        }
        let def = define(&base_query(), &schema, "national_id").unwrap_or_else(|e| panic!("{schema}: {e}"));
        let declared = def.field_pointers();
        let c = compiled(def);
        for selection in [FieldSelection::all(), FieldSelection::new(&grant)] {
            let within = selection.intersect(c.shape());
            let written = within.to_json(&record).unwrap();
            let applied = within.apply(&record);
            prop_assert_eq!(serde_json::from_str::<Value>(&written).unwrap(), applied.clone());
            if let Err(pointer) = only_declared_keys(&applied, "", &declared) {
                prop_assert!(false, "{} released under {}: {}", pointer, schema, written);
            }
        }
    }
}

/// What a next version newly requires of the register's records, nested
/// ones included: a property required before, or new with its new parent,
/// is not listed again.
#[test]
fn newly_required_record_properties_are_listed() {
    let before = json!({
        "type": "object",
        "properties": {
            "full_name": {"type": "string"},
            "father": {"type": "object", "properties": {"full_name": {"type": "string"}}}
        },
        "required": ["full_name"]
    });
    let after = json!({
        "type": "object",
        "properties": {
            "full_name": {"type": "string"},
            "birth_place": {"type": "string"},
            "father": {
                "type": "object",
                "properties": {"full_name": {"type": "string"}, "national_id": {"type": "string"}},
                "required": ["national_id"]
            },
            "mother": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
        },
        "required": ["full_name", "birth_place"]
    });
    assert_eq!(
        lienthong_core::schema::newly_required(&before, &after),
        vec!["/birth_place".to_owned(), "/father/national_id".to_owned()]
    );
    assert!(lienthong_core::schema::newly_required(&after, &after).is_empty());

    // The same inside an optional father written as generators write him.
    let optional = |father: &Value| {
        let mut schema = after.clone();
        set(&mut schema, "/$defs", json!({"Person": father}));
        set(
            &mut schema,
            "/properties/father",
            json!({"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]}),
        );
        schema
    };
    let mut father_before = after["properties"]["father"].clone();
    remove(&mut father_before, "", "required");
    assert_eq!(
        lienthong_core::schema::newly_required(&optional(&father_before), &optional(&after["properties"]["father"])),
        vec!["/father/national_id".to_owned()]
    );
}

/// A reference to `$defs` beside a nullable alternative reaches them, not
/// the `$defs` of the object the alternative stands for: comparing the
/// alternative as that object with null would follow it to the wrong
/// place and let a retyped property pass as compatible.
#[test]
fn a_reference_beside_a_nullable_alternative_is_followed_where_the_validator_follows_it() {
    let mut r0 = base_record();
    set(
        &mut r0,
        "/properties/extra",
        json!({"anyOf": [
            {"type": "object", "properties": {"g": {"type": "integer"}}},
            {"type": "null"}
        ]}),
    );
    let mut r1 = base_record();
    set(
        &mut r1,
        "/properties/extra",
        json!({
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"g": {"$ref": "#/properties/extra/$defs/X"}},
                    "$defs": {"X": {"type": "integer"}}
                },
                {"type": "null"}
            ],
            "$defs": {"X": {"type": "string"}}
        }),
    );
    // The next version's `g` is a string to the validator.
    let validator = jsonschema::validator_for(&r1).unwrap();
    assert!(validator.is_valid(&json!({"full_name": "A", "extra": {"g": "text"}})));
    assert!(!validator.is_valid(&json!({"full_name": "A", "extra": {"g": 3}})));
    let previous = define(&base_query(), &r0, "national_id").unwrap();
    let next = define(&base_query(), &r1, "national_id").unwrap();
    let changes = check_compatibility(&previous, &next);
    assert!(
        changes.iter().any(|c| c.pointer.starts_with("/extra")),
        "a property retyped from integer to string passed: {changes:#?}"
    );
}

/// A `$id` below the root rebases the references under it for the
/// validator, not for the comparison of versions: registered, it would let
/// a next version retype a field through `$defs` of its own unseen.
#[test]
fn a_nested_id_is_refused_at_registration() {
    let mut record = base_record();
    set(&mut record, "/properties/extra", json!({"$ref": "#/$defs/P"}));
    set(
        &mut record,
        "/$defs",
        json!({
            "X": {"type": "integer"},
            "P": {
                "$id": "https://example.com/p",
                "type": "object",
                "properties": {"g": {"$ref": "#/$defs/X"}},
                "$defs": {"X": {"type": "string"}}
            }
        }),
    );
    // To the validator, `g` is the string of P's own `$defs`.
    let validator = jsonschema::validator_for(&record).unwrap();
    assert!(validator.is_valid(&json!({"full_name": "A", "extra": {"g": "text"}})));
    let err = define(&base_query(), &record, "national_id").unwrap_err();
    assert!(matches!(err, SchemaError::NestedId { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/$defs/P/$id"));
    assert!(
        err.to_string()
            .contains("record_schema at /$defs/P/$id sets $id below the root"),
        "{err}"
    );

    // At the root it rebases nothing, and a property named `$id` is no keyword.
    let mut record = base_record();
    set(&mut record, "/$id", json!("https://example.com/birth"));
    set(&mut record, "/properties/$id", json!({"type": "string"}));
    define(&base_query(), &record, "national_id").unwrap();
}

/// The same, with the reference deeper than the rewriting looks for
/// references (a broker may allow schemas deeper than the default 32).
#[test]
fn a_deep_reference_beside_a_nullable_alternative_is_followed_where_the_validator_follows_it() {
    let limits = SchemaLimits {
        max_depth: 128,
        ..SchemaLimits::default()
    };
    let nest = |leaf: Value| (0..35).fold(leaf, |inner, _| json!({"type": "object", "properties": {"n": inner}}));
    let record = |extra: Value| {
        let mut r = base_record();
        set(&mut r, "/properties/extra", extra);
        r
    };
    let r0 = record(json!({"anyOf": [nest(json!({"type": "integer"})), {"type": "null"}]}));
    let mut inner = nest(json!({"$ref": "#/properties/extra/$defs/X"}));
    set(&mut inner, "/$defs", json!({"X": {"type": "integer"}}));
    let r1 = record(json!({"anyOf": [inner, {"type": "null"}], "$defs": {"X": {"type": "string"}}}));
    let parse = |r: &Value| {
        lienthong_core::schema::parse_definition(
            "civil.birth",
            "birth record of a citizen",
            owner(),
            &base_query().to_string(),
            &r.to_string(),
            "national_id",
            &limits,
        )
        .unwrap()
    };
    let changes = check_compatibility(&parse(&r0), &parse(&r1));
    assert!(
        changes.iter().any(|c| c.pointer.starts_with("/extra")),
        "a property retyped from integer to string passed: {changes:#?}"
    );
}

/// `$dynamicRef` to a JSON Pointer is a `$ref` to the validator, but the
/// comparison of versions does not follow it: registered, a next version
/// could change what it points to unseen.
#[test]
fn a_dynamic_reference_is_refused_at_registration() {
    let mut record = base_record();
    set(
        &mut record,
        "/properties/extra",
        json!({"$dynamicRef": "#/$defs/X", "type": ["integer", "string"]}),
    );
    set(&mut record, "/$defs", json!({"X": {"type": "string"}}));
    let validator = jsonschema::validator_for(&record).unwrap();
    assert!(
        !validator.is_valid(&json!({"full_name": "A", "extra": 3})),
        "followed as a $ref"
    );
    let err = define(&base_query(), &record, "national_id").unwrap_err();
    assert!(matches!(err, SchemaError::DynamicRef { .. }), "{err:?}");
    assert_eq!(err.pointer(), Some("/properties/extra/$dynamicRef"));
    assert!(err.to_string().contains("use $ref"), "{err}");
}
