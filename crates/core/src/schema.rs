//! Record types: their JSON Schemas (query and record), validation on
//! registration, compatibility between versions, and compiled validators.
//!
//! The broker never fetches anything while handling a schema: only local
//! references (`#...`) are accepted, and every validator is built with a
//! retriever that refuses every URI.

use crate::filter::FieldSelection;
use crate::member::MemberId;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError, Validator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use time::OffsetDateTime;

/// How a new version must relate to the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    /// No removed or retyped record property, no record property no longer
    /// required or with other constraints (its `enum` and `const` too), no
    /// new required query parameter, no narrowed query enum, no query
    /// constraint tightened.
    Backward,
    /// No check (admins only); recorded on the version.
    None,
}

/// What an integrator submits, parsed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordTypeDefinition {
    /// `[a-z0-9_]+(\.[a-z0-9_]+)+`.
    pub name: String,
    /// What the record is.
    pub description: String,
    /// Owning provider member.
    pub owner: MemberId,
    /// JSON Schema of the query.
    pub query_schema: Value,
    /// JSON Schema of the record.
    pub record_schema: Value,
    /// Query property naming the subject.
    pub subject_key: String,
}

/// A registered version of a record type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordTypeVersion {
    /// The definition.
    pub definition: RecordTypeDefinition,
    /// 1, 2, 3, ...
    pub version: u32,
    /// True once deprecated.
    pub deprecated: bool,
    /// Why deprecated.
    pub deprecation_note: String,
    /// When registered.
    #[serde(with = "time::serde::rfc3339")]
    pub registered_at: OffsetDateTime,
    /// Who registered it.
    pub registered_by: MemberId,
    /// Mode it was registered under.
    pub compatibility: Compatibility,
    /// Every record field a grant can name, as JSON Pointers.
    pub field_pointers: Vec<String>,
    /// Hex SHA-256 of the canonical schemas and subject key.
    pub digest: String,
}

/// The version of a record type that a request for `version` means, among
/// `versions` (ascending): that number, or for 0 the newest version not
/// deprecated, else the newest.
pub fn select_version<T>(versions: &[T], version: u32, record: impl Fn(&T) -> &RecordTypeVersion) -> Option<&T> {
    if version == 0 {
        versions
            .iter()
            .rev()
            .find(|v| !record(v).deprecated)
            .or_else(|| versions.last())
    } else {
        versions
            .binary_search_by_key(&version, |v| record(v).version)
            .ok()
            .and_then(|i| versions.get(i))
    }
}

impl RecordTypeVersion {
    /// A fresh, non-deprecated version of `definition`, with its field pointers
    /// and digest computed from the definition.
    pub fn new(
        definition: RecordTypeDefinition,
        version: u32,
        registered_at: OffsetDateTime,
        registered_by: MemberId,
        compatibility: Compatibility,
    ) -> Self {
        let field_pointers = definition.field_pointers();
        let digest = definition.digest();
        RecordTypeVersion {
            definition,
            version,
            deprecated: false,
            deprecation_note: String::new(),
            registered_at,
            registered_by,
            compatibility,
            field_pointers,
            digest,
        }
    }
}

/// Name of the query schema in errors.
pub const QUERY_SCHEMA: &str = "query_schema";
/// Name of the record schema in errors.
pub const RECORD_SCHEMA: &str = "record_schema";
/// Most properties (nested ones included) a schema may declare; bounds the work
/// of expanding `$ref`s into field pointers.
pub const MAX_FIELDS: usize = 4096;
/// Longest record type name.
pub const MAX_NAME_LEN: usize = 128;
/// Most regular expressions (`pattern`s and `patternProperties` keys) one
/// schema may hold: with [`PATTERNS_SIZE_BUDGET`], bounds the memory and
/// time compiling a schema takes.
pub const MAX_PATTERNS: usize = 64;
/// Largest compiled form of one regular expression of a new registration,
/// in bytes. The regex default, 10 MiB, lets a short pattern such as
/// `\p{L}{240}` cost 50 ms and 10 MiB; but a name or address pattern that
/// repeats a group of Unicode classes a bounded number of times needs far
/// more than a few KiB (measured: `^\p{L}+( \p{L}+){0,5}$` 251 KiB,
/// `^\p{Lu}\p{Ll}*( \p{Lu}\p{Ll}*){0,10}$` 582 KiB,
/// `^\p{L}+([ '\-]\p{L}+){0,20}$` 882 KiB, an address pattern repeating
/// its group 30 times 1.4 MiB): 2 MiB admits those, about 40 repetitions.
pub const PATTERN_SIZE_LIMIT: usize = 2 * MIB;
/// Most the compiled forms of one schema's regular expressions may take
/// together, in bytes, each counted as the smallest of 64 KiB, 128 KiB,
/// 256 KiB ... [`PATTERN_SIZE_LIMIT`] it compiles within: eight patterns
/// at the per-pattern limit, or all [`MAX_PATTERNS`] small ones.
pub const PATTERNS_SIZE_BUDGET: usize = 16 * MIB;

const MIB: usize = 1 << 20;
/// The least a pattern is counted against [`PATTERNS_SIZE_BUDGET`], and the
/// first size it is tried within.
const PATTERN_SIZE_STEP: usize = 64 * 1024;

/// How many `$ref` hops are followed before a schema is taken as it is.
const MAX_REF_HOPS: usize = 16;
/// How many levels of nested properties and array items are expanded.
const MAX_FIELD_LEVELS: usize = 64;

/// Size and nesting limits applied to submitted schemas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaLimits {
    /// Largest schema document, in bytes.
    pub max_schema_bytes: usize,
    /// Deepest JSON nesting of a schema document (`{}` is 1).
    pub max_depth: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        SchemaLimits {
            max_schema_bytes: 256 * 1024,
            max_depth: 32,
        }
    }
}

/// What is wrong with the subject key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectKeyProblem {
    /// Not a property of the query schema.
    NotAProperty,
    /// Not listed in the query schema's `required`.
    NotRequired,
    /// Not declared `"type": "string"`.
    NotAString,
}

impl fmt::Display for SubjectKeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubjectKeyProblem::NotAProperty => "is not a property of the query schema",
            SubjectKeyProblem::NotRequired => "is not listed in the query schema's \"required\"",
            SubjectKeyProblem::NotAString => "is not declared with \"type\": \"string\"",
        })
    }
}

/// Why a record type definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The name does not match `[a-z0-9_]+(\.[a-z0-9_]+)+` or is too long.
    #[error(
        "record type name {:?} is invalid: use two or more dot-separated segments of a-z, 0-9 and '_' (for example \"civil.birth\"), at most 128 characters",
        crate::member::shown(name)
    )]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// The description is blank.
    #[error("description is empty: say what the record type holds")]
    EmptyDescription,
    /// A text field holds a NUL character, which no database column stores.
    #[error("{field} holds a NUL character; remove it")]
    NulCharacter {
        /// `description` or `subject_key`.
        field: &'static str,
    },
    /// A schema is not parseable JSON.
    #[error("{schema} is not valid JSON at line {line}, column {column}: {message}")]
    MalformedJson {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// A schema document is larger than allowed.
    #[error("{schema} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A schema document nests deeper than allowed.
    #[error("{schema} nests {depth} levels deep, more than the limit of {limit}")]
    TooDeep {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// Depth reached (counting stops just past the limit).
        depth: usize,
        /// The limit.
        limit: usize,
    },
    /// `$schema` names a draft other than 2020-12 or draft-07.
    #[error(
        "{schema} at /$schema declares unsupported meta-schema {uri}: use \"https://json-schema.org/draft/2020-12/schema\" or \"http://json-schema.org/draft-07/schema#\""
    )]
    UnsupportedDraft {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// The declared value, as JSON.
        uri: String,
    },
    /// A schema violates its meta-schema.
    #[error("{schema} at {} does not conform to the JSON Schema meta-schema: {message}", show_pointer(.pointer))]
    MetaSchema {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer into the schema of the offending part.
        pointer: String,
        /// What the meta-schema requires.
        message: String,
    },
    /// A `$ref` (or `$dynamicRef`, `$recursiveRef`) points outside the document.
    #[error(
        "{schema} at {} references {reference:?}: only local references starting with '#' are allowed, the broker never fetches schemas",
        show_pointer(.pointer)
    )]
    RemoteRef {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer of the reference keyword.
        pointer: String,
        /// The reference.
        reference: String,
    },
    /// A `$id` below the root: it would make the references under it
    /// resolve within it, while the broker reads every `#/...` reference
    /// from the root (comparing versions, listing fields).
    #[error(
        "{schema} at {} sets $id below the root: the references under it would resolve against it, and the \
         broker reads every reference from the schema's root; remove it (a $defs entry needs no $id)",
        show_pointer(.pointer)
    )]
    NestedId {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer of the `$id` keyword.
        pointer: String,
    },
    /// A `$dynamicRef`: the validator follows it, the broker does not.
    #[error(
        "{schema} at {} uses $dynamicRef, which the broker does not follow (comparing versions, listing \
         fields): use $ref",
        show_pointer(.pointer)
    )]
    DynamicRef {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer of the `$dynamicRef` keyword.
        pointer: String,
    },
    /// The schema is not `{"type": "object", "properties": {...}}`.
    #[error(
        "{schema} at {} must be an object schema (\"type\": \"object\" with \"properties\"): {problem}",
        show_pointer(.pointer)
    )]
    NotAnObjectSchema {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer of the offending part.
        pointer: String,
        /// What is missing.
        problem: &'static str,
    },
    /// The subject key is missing from the query schema or is not a required string.
    #[error("subject key {key:?} {problem} (query_schema at {})", show_pointer(.pointer))]
    SubjectKey {
        /// The subject key property name.
        key: String,
        /// JSON Pointer into the query schema where the property is (or should be).
        pointer: String,
        /// What is wrong.
        problem: SubjectKeyProblem,
    },
    /// The schema declares too many (nested) properties.
    #[error("{schema} declares more than {limit} fields: flatten it or split the record type")]
    TooManyFields {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A record field whose own fields the broker cannot list, so that it
    /// could not cut a record down to what the schema declares inside it.
    #[error("{schema} at {}: field {field} {problem}", show_pointer(.pointer))]
    UnlistedFields {
        /// Always `record_schema`.
        schema: &'static str,
        /// JSON Pointer into the schema where listing stopped (a `$ref`, or the
        /// schema of the field nested too deep).
        pointer: String,
        /// Instance JSON Pointer of the field.
        field: String,
        /// Why its fields cannot be listed.
        problem: FieldCut,
    },
    /// The schema holds more regular expressions than allowed.
    #[error(
        "{schema} at {} holds regular expression number {}, more than the limit of {limit}: a schema may hold at most {} patterns (pattern and patternProperties together), or as many as it keeps unchanged from the version it follows",
        show_pointer(.pointer), .limit + 1, MAX_PATTERNS
    )]
    TooManyPatterns {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer of the first pattern past the limit that the version
        /// it follows does not hold.
        pointer: String,
        /// The limit: [`MAX_PATTERNS`], or how many the schema keeps
        /// unchanged from the version it follows if more.
        limit: usize,
    },
    /// The schema passed the meta-schema but could not be compiled (bad regex,
    /// unresolvable local reference, ...).
    #[error("{schema} at {} cannot be compiled: {message}", show_pointer(.pointer))]
    Compile {
        /// `query_schema` or `record_schema`.
        schema: &'static str,
        /// JSON Pointer into the schema, when known.
        pointer: String,
        /// What failed.
        message: String,
    },
}

fn show_pointer(pointer: &str) -> &str {
    if pointer.is_empty() { "the root" } else { pointer }
}

impl SchemaError {
    /// JSON Pointer into the offending schema, when the error has one.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            SchemaError::MetaSchema { pointer, .. }
            | SchemaError::RemoteRef { pointer, .. }
            | SchemaError::NestedId { pointer, .. }
            | SchemaError::DynamicRef { pointer, .. }
            | SchemaError::NotAnObjectSchema { pointer, .. }
            | SchemaError::SubjectKey { pointer, .. }
            | SchemaError::UnlistedFields { pointer, .. }
            | SchemaError::TooManyPatterns { pointer, .. }
            | SchemaError::Compile { pointer, .. } => Some(pointer),
            SchemaError::UnsupportedDraft { .. } => Some("/$schema"),
            _ => None,
        }
    }

    /// Which schema (`query_schema` / `record_schema`) is at fault, when one is.
    pub fn schema(&self) -> Option<&'static str> {
        match self {
            SchemaError::MalformedJson { schema, .. }
            | SchemaError::TooLarge { schema, .. }
            | SchemaError::TooDeep { schema, .. }
            | SchemaError::UnsupportedDraft { schema, .. }
            | SchemaError::MetaSchema { schema, .. }
            | SchemaError::RemoteRef { schema, .. }
            | SchemaError::NestedId { schema, .. }
            | SchemaError::DynamicRef { schema, .. }
            | SchemaError::NotAnObjectSchema { schema, .. }
            | SchemaError::TooManyFields { schema, .. }
            | SchemaError::UnlistedFields { schema, .. }
            | SchemaError::TooManyPatterns { schema, .. }
            | SchemaError::Compile { schema, .. } => Some(schema),
            SchemaError::SubjectKey { .. } => Some(QUERY_SCHEMA),
            SchemaError::InvalidName { .. } | SchemaError::EmptyDescription | SchemaError::NulCharacter { .. } => None,
        }
    }
}

/// Checks a record type name: `[a-z0-9_]+(\.[a-z0-9_]+)+`, at most 128 characters.
pub fn validate_record_type_name(name: &str) -> Result<(), SchemaError> {
    let segments_ok = name.split('.').all(|seg| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    });
    if name.len() <= MAX_NAME_LEN && name.contains('.') && segments_ok {
        Ok(())
    } else {
        Err(SchemaError::InvalidName { name: name.to_owned() })
    }
}

/// Parses and checks what an integrator submits: name, description, both
/// schemas (size, depth, JSON, draft, local references only, meta-schema,
/// object shape, compilability) and the subject key.
pub fn parse_definition(
    name: &str,
    description: &str,
    owner: MemberId,
    query_schema_json: &str,
    record_schema_json: &str,
    subject_key: &str,
    limits: &SchemaLimits,
) -> Result<RecordTypeDefinition, SchemaError> {
    parse_next_definition(
        None,
        name,
        description,
        owner,
        query_schema_json,
        record_schema_json,
        subject_key,
        limits,
    )
}

/// [`parse_definition`] for the next version of a record type, `previous`
/// being the version it is compared with (the current one; `None` for a
/// first version). A `pattern`, `patternProperties` key or `format` kept
/// unchanged from `previous` (the same string at the same JSON Pointer) is
/// admitted under the rules `previous` loads under: a version stored before
/// a rule came in answers under the old rules already, and its integrator
/// must be able to register a backward compatible next version without an
/// admin. Kept patterns may make the schema hold more patterns, or larger
/// ones together, than the limits allow, but then it adds none: a version
/// never holds more than the limits or what the previous one kept, so
/// versions registered one after another cannot pile patterns up.
// The arguments are those of `parse_definition` and the previous version.
#[allow(clippy::too_many_arguments)]
pub fn parse_next_definition(
    previous: Option<&RecordTypeDefinition>,
    name: &str,
    description: &str,
    owner: MemberId,
    query_schema_json: &str,
    record_schema_json: &str,
    subject_key: &str,
    limits: &SchemaLimits,
) -> Result<RecordTypeDefinition, SchemaError> {
    validate_record_type_name(name)?;
    if description.trim().is_empty() {
        return Err(SchemaError::EmptyDescription);
    }
    for (field, text) in [("description", description), ("subject_key", subject_key)] {
        if text.contains('\0') {
            return Err(SchemaError::NulCharacter { field });
        }
    }
    let query_schema = parse_schema(
        QUERY_SCHEMA,
        query_schema_json,
        limits,
        previous.map(|p| &p.query_schema),
    )?;
    let record_schema = parse_schema(
        RECORD_SCHEMA,
        record_schema_json,
        limits,
        previous.map(|p| &p.record_schema),
    )?;
    check_subject_key(&query_schema, subject_key)?;
    Ok(RecordTypeDefinition {
        name: name.to_owned(),
        description: description.to_owned(),
        owner,
        query_schema,
        record_schema,
        subject_key: subject_key.to_owned(),
    })
}

/// Every check of one schema document, in the order cheapest-first;
/// `previous` is the same schema of the version it follows, if any.
fn parse_schema(
    which: &'static str,
    text: &str,
    limits: &SchemaLimits,
    previous: Option<&Value>,
) -> Result<Value, SchemaError> {
    if text.len() > limits.max_schema_bytes {
        return Err(SchemaError::TooLarge {
            schema: which,
            size: text.len(),
            limit: limits.max_schema_bytes,
        });
    }
    // Scanned on the text so a document too deep for the JSON parser still gets
    // the right error.
    if let Some(depth) = text_depth_exceeding(text, limits.max_depth) {
        return Err(SchemaError::TooDeep {
            schema: which,
            depth,
            limit: limits.max_depth,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| malformed(which, &e))?;
    check_schema_value(which, &value)?;
    find_nested_id(which, &value)?;
    find_dynamic_ref(which, &value)?;
    let largest_pattern = check_patterns(which, &value, previous)?;
    build_validator(
        which,
        &without_kept_formats(&value, previous),
        Admission::New { largest_pattern },
    )?;
    if which == RECORD_SCHEMA {
        check_record_fields(which, &value)?;
    }
    Ok(value)
}

fn malformed(which: &'static str, e: &serde_json::Error) -> SchemaError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    SchemaError::MalformedJson {
        schema: which,
        line: e.line(),
        column: e.column(),
        message,
    }
}

/// Nesting depth of a JSON text if it exceeds `limit` (counting stops at `limit + 1`).
fn text_depth_exceeding(text: &str, limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Some(depth);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Checks of a parsed schema shared by registration and compilation: only
/// rules every stored version met when it was registered belong here.
fn check_schema_value(which: &'static str, value: &Value) -> Result<(), SchemaError> {
    let draft = draft_of(which, value)?;
    find_remote_ref(which, value, &mut String::new())?;
    let meta = match draft {
        Draft::Draft7 => jsonschema::draft7::meta::validate(value),
        _ => jsonschema::draft202012::meta::validate(value),
    };
    if let Err(e) = meta {
        return Err(SchemaError::MetaSchema {
            schema: which,
            pointer: e.instance_path().as_str().to_owned(),
            message: truncate(e.to_string(), 300),
        });
    }
    check_object_schema(which, value)?;
    let mut walk = Walk::new(value, MAX_FIELDS);
    if walk.run().is_err() {
        return Err(SchemaError::TooManyFields {
            schema: which,
            limit: MAX_FIELDS,
        });
    }
    Ok(())
}

/// Refuses a schema being registered whose regular expressions are more
/// than [`MAX_PATTERNS`], or one of which compiles to more than
/// [`PATTERN_SIZE_LIMIT`], or which together take more than
/// [`PATTERNS_SIZE_BUDGET`]; those kept unchanged from `previous` are
/// measured as stored versions compile them, and bound the schema only
/// where they alone pass a limit (see [`parse_next_definition`]). Not part
/// of [`check_schema_value`]: these limits came after versions beyond them
/// were stored, and those must still load. Returns the largest size limit
/// one pattern needed.
fn check_patterns(which: &'static str, value: &Value, previous: Option<&Value>) -> Result<usize, SchemaError> {
    let before = previous.map(patterns_of).unwrap_or_default();
    let before: HashSet<(&str, &str)> = before
        .iter()
        .map(|b| (b.pointer.as_str(), b.pattern.as_str()))
        .collect();
    let (kept, added): (Vec<PatternAt>, Vec<PatternAt>) = patterns_of(value)
        .into_iter()
        .partition(|at| before.contains(&(at.pointer.as_str(), at.pattern.as_str())));
    let count_limit = MAX_PATTERNS.max(kept.len());
    if let Some(past) = added.get(count_limit - kept.len()) {
        return Err(SchemaError::TooManyPatterns {
            schema: which,
            pointer: past.pointer.clone(),
            limit: count_limit,
        });
    }
    let refuse = |at: &PatternAt, message| SchemaError::Compile {
        schema: which,
        pointer: at.pointer.clone(),
        message,
    };
    let mut largest = PATTERN_SIZE_STEP;
    let mut total = 0;
    for at in &kept {
        // It compiled when `previous` was stored, within the regex default.
        let size = compiled_size_bound(at, STORED_PATTERN_SIZE_LIMIT)
            .ok_or_else(|| refuse(at, pattern_problem(&at.pattern)))?;
        largest = largest.max(size);
        total += size;
    }
    let budget = PATTERNS_SIZE_BUDGET.max(total);
    for at in &added {
        let size =
            compiled_size_bound(at, PATTERN_SIZE_LIMIT).ok_or_else(|| refuse(at, pattern_problem(&at.pattern)))?;
        largest = largest.max(size);
        total += size;
        if total > budget {
            let limit = if budget > PATTERNS_SIZE_BUDGET {
                format!(
                    "what those kept unchanged from the version it follows take (the limit is {})",
                    show_size(PATTERNS_SIZE_BUDGET)
                )
            } else {
                "the limit".to_owned()
            };
            return Err(refuse(
                at,
                format!(
                    "the schema's patterns compile to more than {} together, {limit}, with this one: {SHRINK_PATTERN}",
                    show_size(budget)
                ),
            ));
        }
    }
    Ok(largest)
}

/// `schema` without the `format`s kept unchanged from `previous` (the same
/// name at the same JSON Pointer), for the check of a new schema: they are
/// admitted as `previous` was, an unknown one ignored, while a format added
/// or changed must be one the broker checks. Only object members go, so
/// every other JSON Pointer stays the same.
fn without_kept_formats<'a>(schema: &'a Value, previous: Option<&Value>) -> std::borrow::Cow<'a, Value> {
    let Some(previous) = previous else {
        return std::borrow::Cow::Borrowed(schema);
    };
    let before: HashSet<(String, String)> = formats_of(previous).into_iter().collect();
    let kept: Vec<(String, String)> = formats_of(schema)
        .into_iter()
        .filter(|format| before.contains(format))
        .collect();
    if kept.is_empty() {
        return std::borrow::Cow::Borrowed(schema);
    }
    let mut checked = schema.clone();
    for (pointer, _) in &kept {
        let parent = parent_pointer(pointer);
        if let Some(keywords) = checked.pointer_mut(parent).and_then(Value::as_object_mut) {
            keywords.remove("format");
        }
    }
    std::borrow::Cow::Owned(checked)
}

/// Every `format` of a schema: its JSON Pointer and name, outside the
/// keywords whose values are data.
fn formats_of(value: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    first_in_schema(value, &mut String::new(), &mut |key, sub, at| {
        if key == "format"
            && let Some(name) = sub.as_str()
        {
            out.push((at.to_owned(), name.to_owned()));
        }
        None
    });
    out
}

/// A regular expression of a schema and where it is.
struct PatternAt {
    /// JSON Pointer of the `pattern` keyword or `patternProperties` key.
    pointer: String,
    /// The expression.
    pattern: String,
    /// A `patternProperties` key (else a `pattern` value).
    key: bool,
}

/// Every regular expression of a schema in document order: each `pattern`
/// string and `patternProperties` key outside the keywords whose values
/// are data.
fn patterns_of(value: &Value) -> Vec<PatternAt> {
    let mut out = Vec::new();
    first_in_schema(value, &mut String::new(), &mut |key, sub, at| {
        if key == "pattern"
            && let Some(pattern) = sub.as_str()
        {
            out.push(PatternAt {
                pointer: at.to_owned(),
                pattern: pattern.to_owned(),
                key: false,
            });
        }
        if key == "patternProperties" {
            for name in sub.as_object().into_iter().flat_map(|p| p.keys()) {
                let mut pointer = at.to_owned();
                push_segment(&mut pointer, name);
                out.push(PatternAt {
                    pointer,
                    pattern: name.clone(),
                    key: true,
                });
            }
        }
        None
    });
    out
}

/// The smallest of [`PATTERN_SIZE_STEP`], doubled again and again up to
/// `limit`, that the pattern compiles within (as the validator compiles it,
/// after translating it from ECMA 262 syntax and taking its shortcuts): a
/// bound on its compiled size, at most twice it, as the regex crate reports
/// none. An attempt that fails stops once it passes its bound, so measuring
/// costs about one more compile. `None` if it does not compile within
/// `limit`.
fn compiled_size_bound(at: &PatternAt, limit: usize) -> Option<usize> {
    let schema = if at.key {
        let mut keyed = Map::new();
        keyed.insert(at.pattern.clone(), Value::Bool(true));
        let mut schema = Map::new();
        schema.insert("patternProperties".to_owned(), Value::Object(keyed));
        Value::Object(schema)
    } else {
        let mut schema = Map::new();
        schema.insert("pattern".to_owned(), Value::String(at.pattern.clone()));
        Value::Object(schema)
    };
    let mut size = PATTERN_SIZE_STEP.min(limit);
    loop {
        let compiled = jsonschema::options()
            .with_retriever(RefuseRetrieval)
            .with_pattern_options(
                jsonschema::PatternOptions::regex()
                    .size_limit(size)
                    .dfa_size_limit(REGEX_DFA_SIZE_LIMIT),
            )
            .build(&schema);
        if compiled.is_ok() {
            return Some(size);
        }
        if size >= limit {
            return None;
        }
        size = (size * 2).min(limit);
    }
}

/// "2 MiB", "128 KiB".
fn show_size(bytes: usize) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// The first `Some` that `found` gives for a member of `value`, in document
/// order, depth first: it sees each member's key, value and pointer, across
/// every object and array of the schema but the keywords whose values are
/// data.
fn first_in_schema(
    value: &Value,
    pointer: &mut String,
    found: &mut dyn FnMut(&str, &Value, &str) -> Option<String>,
) -> Option<String> {
    let mut visit = |segment: &str, sub: &Value, pointer: &mut String| {
        let len = pointer.len();
        push_segment(pointer, segment);
        let hit = found(segment, sub, pointer).or_else(|| first_in_schema(sub, pointer, found));
        pointer.truncate(len);
        hit
    };
    match value {
        Value::Object(map) => map
            .iter()
            .filter(|(key, _)| !DATA_KEYWORDS.contains(&key.as_str()))
            .find_map(|(key, sub)| visit(key, sub, pointer)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, sub)| visit(&i.to_string(), sub, pointer)),
        _ => None,
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let end = crate::clip(&s, max).len();
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// Accepted `$schema` values, without scheme and trailing `#`.
const DRAFT_2020_12: &str = "json-schema.org/draft/2020-12/schema";
const DRAFT_07: &str = "json-schema.org/draft-07/schema";

/// The draft named by `$schema`: 2020-12 when absent; draft-07 accepted too.
fn draft_of(which: &'static str, value: &Value) -> Result<Draft, SchemaError> {
    let Some(declared) = value.get("$schema") else {
        return Ok(Draft::Draft202012);
    };
    let normalized = declared
        .as_str()
        .map(|s| s.strip_suffix('#').unwrap_or(s))
        .and_then(|s| s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")));
    match normalized {
        Some(DRAFT_2020_12) => Ok(Draft::Draft202012),
        Some(DRAFT_07) => Ok(Draft::Draft7),
        _ => Err(SchemaError::UnsupportedDraft {
            schema: which,
            uri: truncate(declared.to_string(), 200),
        }),
    }
}

/// Keywords whose values are data, not schemas: a `$ref` inside them is never resolved.
const DATA_KEYWORDS: [&str; 4] = ["enum", "const", "examples", "default"];
const REF_KEYWORDS: [&str; 3] = ["$ref", "$dynamicRef", "$recursiveRef"];

fn find_remote_ref(which: &'static str, value: &Value, pointer: &mut String) -> Result<(), SchemaError> {
    let mut reference = String::new();
    let found = first_in_schema(value, pointer, &mut |key, sub, at| {
        let remote = sub
            .as_str()
            .filter(|r| REF_KEYWORDS.contains(&key) && !r.starts_with('#'))?;
        reference = truncate(remote.to_owned(), 200);
        Some(at.to_owned())
    });
    match found {
        None => Ok(()),
        Some(pointer) => Err(SchemaError::RemoteRef {
            schema: which,
            pointer,
            reference,
        }),
    }
}

/// Refuses a `$id` anywhere but at the root of a schema being registered.
/// Below it, `$id` starts a resource of its own, against which the
/// validator resolves the `#/...` references under it, whereas the
/// comparison of versions and the field walk resolve every one from the
/// root: a next version could then retype a field, or hide one, unseen.
fn find_nested_id(which: &'static str, value: &Value) -> Result<(), SchemaError> {
    let found = first_in_schema(value, &mut String::new(), &mut |key, sub, at| {
        (key == "$id" && sub.is_string() && at != "/$id").then(|| at.to_owned())
    });
    match found {
        None => Ok(()),
        Some(pointer) => Err(SchemaError::NestedId { schema: which, pointer }),
    }
}

/// Refuses a `$dynamicRef` in a schema being registered. The validator
/// follows one (to a JSON Pointer, as a `$ref`), whereas the comparison of
/// versions compares it as written: a next version could change what it
/// points to unseen.
fn find_dynamic_ref(which: &'static str, value: &Value) -> Result<(), SchemaError> {
    let found = first_in_schema(value, &mut String::new(), &mut |key, sub, at| {
        (key == "$dynamicRef" && sub.is_string()).then(|| at.to_owned())
    });
    match found {
        None => Ok(()),
        Some(pointer) => Err(SchemaError::DynamicRef { schema: which, pointer }),
    }
}

fn check_object_schema(which: &'static str, value: &Value) -> Result<(), SchemaError> {
    let not_object = |pointer: &str, problem| SchemaError::NotAnObjectSchema {
        schema: which,
        pointer: pointer.to_owned(),
        problem,
    };
    let Some(obj) = value.as_object() else {
        return Err(not_object("", "the schema is not a JSON object"));
    };
    let is_object_type = match obj.get("type") {
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) => ts.len() == 1 && ts[0] == "object",
        _ => false,
    };
    if !is_object_type {
        return Err(not_object("/type", "\"type\" must be \"object\""));
    }
    match obj.get("properties").and_then(Value::as_object) {
        Some(props) if !props.is_empty() => Ok(()),
        Some(_) => Err(not_object("/properties", "\"properties\" declares no property")),
        None => Err(not_object("/properties", "\"properties\" is missing")),
    }
}

fn check_subject_key(query_schema: &Value, key: &str) -> Result<(), SchemaError> {
    let mut pointer = String::from("/properties");
    push_segment(&mut pointer, key);
    let fail = |pointer: String, problem| SchemaError::SubjectKey {
        key: key.to_owned(),
        pointer,
        problem,
    };
    let Some(prop) = query_schema.get("properties").and_then(|p| p.get(key)) else {
        return Err(fail(pointer, SubjectKeyProblem::NotAProperty));
    };
    let required = query_schema
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|v| v.as_str() == Some(key)));
    if !required {
        return Err(fail("/required".to_owned(), SubjectKeyProblem::NotRequired));
    }
    let resolved = follow_refs(query_schema, prop);
    let is_string = match resolved.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.len() == 1 && ts[0] == "string",
        _ => false,
    };
    if !is_string {
        return Err(fail(pointer, SubjectKeyProblem::NotAString));
    }
    Ok(())
}

/// Appends one RFC 6901-escaped segment.
fn push_segment(pointer: &mut String, segment: &str) {
    pointer.push('/');
    for c in segment.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// Retriever that refuses every URI: schemas are self-contained by rule.
struct RefuseRetrieval;

impl jsonschema::Retrieve for RefuseRetrieval {
    fn retrieve(&self, _uri: &jsonschema::Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err("the broker does not fetch schemas; use local references only".into())
    }
}

/// Whose schema a validator is built for: rules added since a version was
/// registered apply to new schemas, never to stored versions, so that an
/// upgrade cannot take a record type that answered before out of service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// A schema being registered: an unknown `format` is refused (a typo,
    /// `"dat"`, would let any value pass unchecked), and each pattern must
    /// compile within `largest_pattern`, the most [`check_patterns`] found
    /// one needs.
    New {
        /// Size limit of each pattern's compiled form.
        largest_pattern: usize,
    },
    /// A stored version: an unknown `format` is ignored and a pattern may be
    /// as large as [`STORED_PATTERN_SIZE_LIMIT`], as when it was registered.
    Stored,
}

/// Largest compiled form of one regular expression of a stored version: the
/// regex crate's default, which applied before [`PATTERN_SIZE_LIMIT`] did.
const STORED_PATTERN_SIZE_LIMIT: usize = 10 * MIB;
/// Capacity of each regular expression's matching cache (its lazy DFA): the
/// regex crate's default, which applied before any limit here did.
const REGEX_DFA_SIZE_LIMIT: usize = 2 * MIB;

/// The compiled size and matching cache each regular expression may take.
/// The validators that answer lookups are always built as
/// [`Admission::Stored`] (registration compiles the new version so too):
/// a new schema's build only checks it, its patterns measured beforehand.
fn pattern_limits(admission: Admission) -> (usize, usize) {
    match admission {
        Admission::New { largest_pattern } => (largest_pattern, REGEX_DFA_SIZE_LIMIT),
        Admission::Stored => (STORED_PATTERN_SIZE_LIMIT, REGEX_DFA_SIZE_LIMIT),
    }
}

fn build_validator(which: &'static str, schema: &Value, admission: Admission) -> Result<Validator, SchemaError> {
    let draft = draft_of(which, schema)?;
    let (size_limit, dfa_size_limit) = pattern_limits(admission);
    jsonschema::options()
        .with_draft(draft)
        .with_retriever(RefuseRetrieval)
        // Linear-time matching: patterns run on every client query. Bounded
        // size: a short pattern may otherwise compile to megabytes, and any
        // member could make the broker compile many.
        .with_pattern_options(
            jsonschema::PatternOptions::regex()
                .size_limit(size_limit)
                .dfa_size_limit(dfa_size_limit),
        )
        .should_validate_formats(true)
        .should_ignore_unknown_formats(admission == Admission::Stored)
        .build(schema)
        .map_err(|e| {
            let mut pointer = e.instance_path().as_str().to_owned();
            if pointer.is_empty() {
                // Reference errors carry no location; point at the first local
                // reference that does not resolve, if that is the cause.
                if let Some(found) = find_unresolved_ref(schema, schema, &mut String::new()) {
                    pointer = found;
                }
            }
            let at = schema.pointer(&pointer).and_then(Value::as_str);
            let message = match (e.kind(), at) {
                (ValidationErrorKind::Format { format }, Some(pattern)) if format == "regex" => {
                    pattern_problem(pattern)
                }
                (_, Some(format)) if pointer.ends_with("/format") => format!(
                    "format {:?} is not one the broker knows, so values would pass unchecked: use one of {} \
                     (or remove it)",
                    truncate(format.to_owned(), 100),
                    KNOWN_FORMATS.join(", ")
                ),
                _ => truncate(e.to_string(), 300),
            };
            SchemaError::Compile {
                schema: which,
                pointer,
                message,
            }
        })
}

/// The formats checked (in draft 2020-12; draft-07 lacks `duration` and `uuid`).
const KNOWN_FORMATS: [&str; 17] = [
    "date",
    "date-time",
    "time",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "uri-template",
    "iri",
    "iri-reference",
    "uuid",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// How to make a pattern compile smaller. What grows is a bounded
/// repetition: `{m,n}` writes out what it repeats n times, and a Unicode
/// class such as `\p{L}` is hundreds of ranges; `+` and `*` cost one copy.
const SHRINK_PATTERN: &str = "a bounded repetition {m,n} of a group or class holding Unicode classes (such as \
                              ( \\p{L}+){0,50} or [\\p{L}\\p{N} ,.]{0,100}) compiles to n copies of it; lower n, \
                              or repeat it with * or + and bound the length with maxLength instead";

/// Why a pattern the validator refused cannot be used, for a person.
fn pattern_problem(pattern: &str) -> String {
    // Compiled again only to tell the causes apart, and within the same bound.
    let too_big = matches!(
        regex::RegexBuilder::new(pattern).size_limit(PATTERN_SIZE_LIMIT).build(),
        Err(regex::Error::CompiledTooBig(_))
    );
    if too_big {
        format!(
            "the pattern compiles to more than {}, the limit: {SHRINK_PATTERN}",
            show_size(PATTERN_SIZE_LIMIT)
        )
    } else {
        "the pattern is not a regular expression the broker accepts: patterns run in linear time, without \
         look-around or back-references"
            .to_owned()
    }
}

/// Pointer of the first `$ref` to a JSON Pointer fragment absent from the document.
fn find_unresolved_ref(root: &Value, value: &Value, pointer: &mut String) -> Option<String> {
    first_in_schema(value, pointer, &mut |key, sub, at| {
        (key == "$ref"
            && sub
                .as_str()
                .is_some_and(|r| r.starts_with("#/") && local_target(root, r).is_none()))
        .then(|| at.to_owned())
    })
}

/// Resolves a local JSON Pointer reference (`#`, `#/...`) within `root`.
fn local_target<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let fragment = reference.strip_prefix('#')?;
    if fragment.is_empty() {
        return Some(root);
    }
    if !fragment.starts_with('/') {
        // An anchor (`#name`): not followed for field discovery.
        return None;
    }
    if fragment.contains('%') {
        root.pointer(&percent_decode(fragment)?)
    } else {
        root.pointer(fragment)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// True if the schema object declares structure of its own, so that a `$ref`
/// beside it is not where its fields are. A `type` beside a `$ref`
/// (`{"type": "object", "$ref": "#/$defs/person"}`) declares none: the
/// fields are the reference's, and releasing the object whole would pass
/// whatever the register adds inside it.
fn has_own_structure(obj: &Map<String, Value>) -> bool {
    obj.contains_key("properties") || obj.contains_key("items")
}

/// Follows local `$ref`s of bare reference schemas, without cycle tracking
/// (bounded by [`MAX_REF_HOPS`]).
fn follow_refs<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..MAX_REF_HOPS {
        let Some(obj) = schema.as_object() else {
            return schema;
        };
        if has_own_structure(obj) {
            return schema;
        }
        match obj
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| local_target(root, r))
        {
            Some(target) => schema = target,
            None => return schema,
        }
    }
    schema
}

/// One property found in a schema's tree of `properties` (array items transparent).
struct FieldInfo<'a> {
    /// JSON Pointer of the field in instances.
    pointer: String,
    /// JSON Pointer of its declaration in the schema.
    at: String,
    /// Its schema as written where it is declared, before any `$ref` is followed.
    declared: &'a Value,
    /// Its schema, bare `$ref`s followed: where the walk found its fields.
    schema: &'a Value,
    /// Its array items' schema, if it declares one.
    items: Option<&'a Value>,
    /// Listed in the parent's `required`.
    required: bool,
}

/// Why the walk could not list the fields inside a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldCut {
    /// A `$ref` back to a schema that encloses the field.
    Recursive {
        /// The reference, as written.
        reference: String,
    },
    /// More `$ref`s in a row than the walk follows.
    ReferenceChain,
    /// A `$ref` to an anchor (`#name`), which the walk does not resolve.
    Anchor {
        /// The reference, as written.
        reference: String,
    },
    /// Fields nested deeper than the walk expands.
    TooDeep,
    /// A field declaring no fields of its own whose values may be objects
    /// (or hold them as array items): their keys are not declared, so the
    /// broker would release none of them.
    KeysNotDeclared,
    /// Properties declared only under `if`/`then`/`else` or
    /// `dependentSchemas`, which the broker does not list as fields: a
    /// record would have them dropped without a word.
    ConditionalKeys {
        /// The keyword they are declared under.
        keyword: String,
        /// The first property declared there and not beside it.
        key: String,
    },
}

impl fmt::Display for FieldCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldCut::Recursive { reference } => write!(
                f,
                "refers back to {reference:?}, which encloses it: a record schema may not be recursive, \
                 because the broker releases a record field by field and must list every field; declare a fixed \
                 number of levels instead"
            ),
            FieldCut::ReferenceChain => write!(
                f,
                "follows more than {MAX_REF_HOPS} references in a row: reference the definition directly"
            ),
            FieldCut::Anchor { reference } => write!(
                f,
                "references the anchor {reference:?}: reference the definition by its JSON Pointer \
                 (\"#/$defs/...\") so that the broker can list its fields"
            ),
            FieldCut::TooDeep => write!(
                f,
                "nests fields more than {MAX_FIELD_LEVELS} levels deep: flatten the record"
            ),
            FieldCut::ConditionalKeys { keyword, .. } => write!(
                f,
                "is declared under \"{keyword}\" only: the broker lists as fields the \
                 properties declared under \"properties\" (and the alternatives of anyOf, oneOf, allOf), so \
                 it could never be granted and would be dropped from every record; declare it under \
                 \"properties\" too (a condition may still make it required)"
            ),
            FieldCut::KeysNotDeclared => write!(
                f,
                "may hold an object whose keys its schema does not declare (no \"properties\": an object \
                 without them, a map with additionalProperties or patternProperties, an array without \
                 \"items\", or no \"type\" at all): the broker releases only declared keys, so it would \
                 release none. Declare its properties, or mark it \"{OPAQUE}\": true to have a grant on it \
                 release whatever it holds"
            ),
        }
    }
}

/// A field whose own fields the walk could not list: nothing inside it is
/// known to be declared.
struct Cut {
    /// Instance JSON Pointer of the field.
    field: String,
    /// Schema JSON Pointer of the keyword where the walk stopped.
    at: String,
    /// Why it stopped.
    why: FieldCut,
}

/// What following a schema's bare `$ref`s led to.
enum Resolved<'a> {
    /// A schema whose fields can be listed, and its location in the document.
    Expand(&'a Value, String),
    /// The walk stopped at a reference; the schema is the reference itself.
    Stop(&'a Value, String, FieldCut),
}

/// Depth-first walk of `properties`, following local references with cycle detection.
struct Walk<'a> {
    root: &'a Value,
    refs: Vec<&'a str>,
    out: Vec<FieldInfo<'a>>,
    cuts: Vec<Cut>,
    limit: usize,
    /// Also list the fields declared in the alternatives of a schema (see
    /// [`BRANCH_KEYWORDS`]), as the fields of the instance the schema is at.
    branches: bool,
    /// Schemas expanded so far: alternatives referencing the same
    /// definitions twice over would otherwise expand exponentially many.
    visits: usize,
}

/// Keywords whose subschemas describe the same instance as the schema they
/// are in: the fields they declare are the instance's fields, for a grant
/// to name and the filter to keep. The rule, kept simple so that no
/// undeclared key ever leaves: an instance's fields are the union of the
/// names its alternatives declare, each granted by its pointer, and a name
/// declared by several alternatives (alike or not) is one field whose own
/// fields are the union of theirs. The filter does not tell which
/// alternative a value matched: at every field it keeps scalars and cuts
/// objects down to the declared names. So a value matching an alternative
/// that leaves a name free (declares it not, or as a string where another
/// declares an object) releases there at most the keys some alternative
/// declares, and none if none does.
const BRANCH_KEYWORDS: [&str; 3] = ["allOf", "anyOf", "oneOf"];

/// Most schemas one walk expands, alternatives included.
const MAX_VISITS: usize = 8 * MAX_FIELDS;

/// The annotation marking a record field opaque: released whole when
/// granted, though its schema does not declare what it holds.
pub const OPAQUE: &str = "x-lienthong-opaque";

/// The walk found more fields than its limit.
struct TooManyFields;

/// The schema pointer a local JSON Pointer reference (`#`, `#/...`) names.
fn reference_pointer(reference: &str) -> Option<String> {
    let fragment = reference.strip_prefix('#')?;
    if fragment.contains('%') {
        percent_decode(fragment)
    } else {
        Some(fragment.to_owned())
    }
}

impl<'a> Walk<'a> {
    /// Lists the fields of a resolved schema one level below `prefix`, or
    /// notes why they cannot be listed; then forgets the references
    /// followed to reach it.
    fn expand(
        &mut self,
        (resolved, pushed): (Resolved<'a>, usize),
        prefix: &str,
        level: usize,
    ) -> Result<(), TooManyFields> {
        let result = match resolved {
            Resolved::Expand(schema, at) => self.children(schema, prefix, level + 1, &at),
            Resolved::Stop(_, at, why) => {
                self.stopped(prefix, at, why);
                Ok(())
            }
        };
        self.refs.truncate(self.refs.len() - pushed);
        result
    }

    /// Notes that the fields inside `field` could not be listed, and why
    /// (the record itself, `""`, is no field to note).
    fn stopped(&mut self, field: &str, at: String, why: FieldCut) {
        if !field.is_empty() {
            self.cuts.push(Cut {
                field: field.to_owned(),
                at,
                why,
            });
        }
    }

    fn new(root: &'a Value, limit: usize) -> Self {
        Walk {
            root,
            refs: Vec::new(),
            out: Vec::new(),
            cuts: Vec::new(),
            limit,
            branches: false,
            visits: 0,
        }
    }

    /// A walk that lists the fields of alternatives too.
    fn through_branches(mut self) -> Self {
        self.branches = true;
        self
    }

    fn run(&mut self) -> Result<(), TooManyFields> {
        let root = self.root;
        // The root is being expanded: a `"$ref": "#"` below it is a cycle.
        self.refs.push("#");
        let (resolved, pushed) = self.resolve(root, String::new());
        let result = match resolved {
            Resolved::Expand(schema, at) => self.children(schema, "", 0, &at),
            Resolved::Stop(..) => Ok(()),
        };
        self.refs.truncate(self.refs.len() - pushed);
        result
    }

    /// Follows bare `$ref`s from `schema` (at schema pointer `at`); says where
    /// they led and how many references it pushed on the stack.
    fn resolve(&mut self, schema: &'a Value, at: String) -> (Resolved<'a>, usize) {
        self.resolve_from(schema, at, false)
    }

    /// [`Walk::resolve`]; with `beside`, the first `$ref` is followed even
    /// beside `properties` or `items`.
    fn resolve_from(&mut self, mut schema: &'a Value, mut at: String, beside: bool) -> (Resolved<'a>, usize) {
        let mut pushed = 0;
        for hop in 0..=MAX_REF_HOPS {
            let Some(obj) = schema.as_object() else {
                break;
            };
            if has_own_structure(obj) && !(beside && hop == 0) {
                break;
            }
            let Some(reference) = obj.get("$ref").and_then(Value::as_str) else {
                break;
            };
            push_segment(&mut at, "$ref");
            if self.refs.contains(&reference) {
                let why = FieldCut::Recursive {
                    reference: truncate(reference.to_owned(), 200),
                };
                return (Resolved::Stop(schema, at, why), pushed);
            }
            if pushed == MAX_REF_HOPS {
                return (Resolved::Stop(schema, at, FieldCut::ReferenceChain), pushed);
            }
            let target = local_target(self.root, reference);
            let Some((target, pointer)) = target.zip(reference_pointer(reference)) else {
                if reference.starts_with('#') && !reference.starts_with("#/") && reference != "#" {
                    let why = FieldCut::Anchor {
                        reference: truncate(reference.to_owned(), 200),
                    };
                    return (Resolved::Stop(schema, at, why), pushed);
                }
                // Unresolvable: the validator refuses it at registration.
                break;
            };
            self.refs.push(reference);
            pushed += 1;
            schema = target;
            at = pointer;
        }
        (Resolved::Expand(schema, at), pushed)
    }

    fn children(&mut self, schema: &'a Value, prefix: &str, level: usize, at: &str) -> Result<(), TooManyFields> {
        self.visits += 1;
        if self.branches && self.visits > MAX_VISITS {
            return Err(TooManyFields);
        }
        if level >= MAX_FIELD_LEVELS {
            if !prefix.is_empty() && schema.as_object().is_some_and(has_own_structure) {
                self.cuts.push(Cut {
                    field: prefix.to_owned(),
                    at: at.to_owned(),
                    why: FieldCut::TooDeep,
                });
            }
            return Ok(());
        }
        self.properties(schema, prefix, level, at)?;
        if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
            let mut items_at = at.to_owned();
            push_segment(&mut items_at, "items");
            // The items of `prefix` are what could not be listed, if anything.
            let resolved = self.resolve(items, items_at);
            self.expand(resolved, prefix, level)?;
        }
        if self.branches {
            self.alternatives(schema, prefix, level, at)?;
        }
        Ok(())
    }

    /// The fields of `schema`'s alternatives ([`BRANCH_KEYWORDS`], and a
    /// `$ref` beside `properties` or `items`, which applies as `allOf` would),
    /// at the same instance `prefix`.
    fn alternatives(&mut self, schema: &'a Value, prefix: &str, level: usize, at: &str) -> Result<(), TooManyFields> {
        let Some(obj) = schema.as_object() else {
            return Ok(());
        };
        // (schema, where it is, a `$ref` beside own structure to follow)
        let mut branches: Vec<(&'a Value, String, bool)> = Vec::new();
        if has_own_structure(obj) && obj.get("$ref").is_some_and(Value::is_string) {
            branches.push((schema, at.to_owned(), true));
        }
        for keyword in BRANCH_KEYWORDS {
            for (i, branch) in obj
                .get(keyword)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let mut branch_at = at.to_owned();
                push_segment(&mut branch_at, keyword);
                push_segment(&mut branch_at, &i.to_string());
                branches.push((branch, branch_at, false));
            }
        }
        for (branch, branch_at, beside) in branches {
            let (resolved, pushed) = self.resolve_from(branch, branch_at, beside);
            // A reference beside that did not resolve: the validator refuses it.
            if beside && matches!(resolved, Resolved::Expand(target, _) if std::ptr::eq(target, schema)) {
                self.refs.truncate(self.refs.len() - pushed);
                continue;
            }
            self.expand((resolved, pushed), prefix, level)?;
        }
        Ok(())
    }

    fn properties(&mut self, schema: &'a Value, prefix: &str, level: usize, at: &str) -> Result<(), TooManyFields> {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return Ok(());
        };
        let required = schema.get("required").and_then(Value::as_array);
        for (name, sub) in props {
            if self.out.len() >= self.limit {
                return Err(TooManyFields);
            }
            let mut pointer = String::with_capacity(prefix.len() + name.len() + 1);
            pointer.push_str(prefix);
            push_segment(&mut pointer, name);
            let mut sub_at = String::with_capacity(at.len() + name.len() + 12);
            sub_at.push_str(at);
            push_segment(&mut sub_at, "properties");
            push_segment(&mut sub_at, name);
            let sub_at_declared = sub_at.clone();
            let (resolved, pushed) = self.resolve(sub, sub_at);
            let walked = match &resolved {
                Resolved::Expand(schema, _) | Resolved::Stop(schema, _, _) => *schema,
            };
            let items = walked
                .get("items")
                .filter(|i| i.is_object())
                .map(|i| follow_refs(self.root, i));
            let is_required = required.is_some_and(|r| r.iter().any(|v| v.as_str() == Some(name)));
            self.out.push(FieldInfo {
                pointer: pointer.clone(),
                at: sub_at_declared,
                declared: sub,
                schema: walked,
                items,
                required: is_required,
            });
            self.expand((resolved, pushed), &pointer, level)?;
        }
        Ok(())
    }
}

/// Fields of a schema as the compatibility check compares them (those
/// declared in alternatives are not: an alternative changed is a change of
/// the field holding it); on overflow, the fields found up to the limit.
fn collect_fields(schema: &Value) -> Vec<FieldInfo<'_>> {
    let mut walk = Walk::new(schema, MAX_FIELDS);
    // Overflow is refused at registration; a truncated list is the best answer here.
    let _ = walk.run();
    walk.out
}

/// How the broker releases the fields of a record schema.
struct RecordFields<'a> {
    /// Every field declared, alternatives included, as the walk found them
    /// (a field declared in several alternatives is found once for each).
    found: Vec<FieldInfo<'a>>,
    /// Fields whose own fields could not be listed.
    cuts: Vec<Cut>,
    /// The walk stopped at [`MAX_FIELDS`] or [`MAX_VISITS`]: what it found is
    /// a part of the fields.
    overflow: bool,
}

/// Walks a record schema's fields, alternatives included.
fn record_fields(schema: &Value) -> RecordFields<'_> {
    let mut walk = Walk::new(schema, MAX_FIELDS).through_branches();
    let overflow = walk.run().is_err();
    RecordFields {
        found: walk.out,
        cuts: walk.cuts,
        overflow,
    }
}

impl<'a> RecordFields<'a> {
    /// Every field a grant can name, sorted, once each.
    fn pointers(&self) -> Vec<String> {
        let mut pointers: Vec<String> = self.found.iter().map(|f| f.pointer.clone()).collect();
        pointers.sort();
        pointers.dedup();
        pointers
    }

    /// The fields released whole, and those declaring no field of their own
    /// that may hold objects without being marked [`OPAQUE`] (each with the
    /// schema pointer of such a declaration). A field is released whole when
    /// no field is declared below it and every declaration of it (in every
    /// alternative) is marked opaque or holds no object, one at least
    /// marked: an object there is then released as it is, on purpose. Any
    /// other field is cut down to what is declared below it (nothing, if
    /// nothing is), its scalars kept.
    fn opaque_and_undeclared(&self, root: &Value) -> (Vec<String>, Vec<(String, String)>) {
        let parents: HashSet<&str> = self.found.iter().map(|f| parent_pointer(&f.pointer)).collect();
        let mut by_pointer: std::collections::BTreeMap<&str, Vec<&FieldInfo<'a>>> = Default::default();
        for field in self.found.iter().filter(|f| !parents.contains(f.pointer.as_str())) {
            by_pointer.entry(field.pointer.as_str()).or_default().push(field);
        }
        let mut budget = MAX_VISITS;
        let (mut opaque, mut undeclared) = (Vec::new(), Vec::new());
        for (pointer, declarations) in by_pointer {
            let mut marked = false;
            let mut unmarked_object = None;
            for field in declarations {
                if is_marked_opaque(field.declared) || is_marked_opaque(field.schema) {
                    marked = true;
                } else if unmarked_object.is_none() && may_hold_object(root, field.declared, 0, &mut budget) {
                    unmarked_object = Some(field.at.clone());
                }
            }
            match unmarked_object {
                Some(at) => undeclared.push((pointer.to_owned(), at)),
                None if marked => opaque.push(pointer.to_owned()),
                None => {}
            }
        }
        (opaque, undeclared)
    }
}

/// True if the schema carries `"x-lienthong-opaque": true`.
fn is_marked_opaque(schema: &Value) -> bool {
    schema.get(OPAQUE) == Some(&Value::Bool(true))
}

/// True if a value `schema` admits may be an object, or hold one as an
/// array item at any depth, whose keys the schema does not list: a schema
/// without `type`, one admitting `object`, or `array` without object
/// `items` (a tuple included), unless an `enum` or `const` lists the values,
/// a `$ref` or `allOf` beside excludes it, or every `anyOf`/`oneOf`
/// alternative does. Errs on the side of `true`: past `MAX_FIELD_LEVELS`
/// schemas deep or once `budget` is spent.
fn may_hold_object(root: &Value, schema: &Value, depth: usize, budget: &mut usize) -> bool {
    if depth >= MAX_FIELD_LEVELS || *budget == 0 {
        return true;
    }
    *budget -= 1;
    let obj = match schema {
        Value::Object(obj) => obj,
        Value::Bool(admits) => return *admits,
        _ => return true,
    };
    if obj.contains_key("enum") || obj.contains_key("const") {
        return false;
    }
    let own = match obj.get("type") {
        None => true,
        Some(_) => {
            let types = type_set(schema).unwrap_or_default();
            let mut items = || match obj.get("items") {
                _ if obj.contains_key("prefixItems") => true,
                Some(items @ Value::Object(_)) => may_hold_object(root, items, depth + 1, budget),
                Some(Value::Bool(admits)) => *admits,
                _ => true,
            };
            types.contains("object") || (types.contains("array") && items())
        }
    };
    if !own {
        return false;
    }
    if let Some(target) = obj
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| local_target(root, r))
        && !may_hold_object(root, target, depth + 1, budget)
    {
        return false;
    }
    let branches = |keyword| obj.get(keyword).and_then(Value::as_array);
    if let Some(all) = branches("allOf")
        && all.iter().any(|b| !may_hold_object(root, b, depth + 1, budget))
    {
        return false;
    }
    for keyword in ["anyOf", "oneOf"] {
        if let Some(any) = branches(keyword)
            && !any.iter().any(|b| may_hold_object(root, b, depth + 1, budget))
        {
            return false;
        }
    }
    true
}

/// Refuses a record schema with a field whose own fields cannot be listed
/// (a recursive reference, a chain of references, an anchor, nesting past
/// the limit) or are not declared (an object without `properties`, a map,
/// unless marked [`OPAQUE`]): the filter would have nothing to cut such a
/// field down to. Not part of [`check_schema_value`]: versions stored
/// before these rules load, and release nothing inside such fields.
fn check_record_fields(which: &'static str, schema: &Value) -> Result<(), SchemaError> {
    let mut fields = record_fields(schema);
    if fields.overflow {
        return Err(SchemaError::TooManyFields {
            schema: which,
            limit: MAX_FIELDS,
        });
    }
    if let Some(cut) = std::mem::take(&mut fields.cuts).into_iter().next() {
        return Err(SchemaError::UnlistedFields {
            schema: which,
            pointer: cut.at,
            field: cut.field,
            problem: cut.why,
        });
    }
    if let Some((field, at)) = fields.opaque_and_undeclared(schema).1.into_iter().next() {
        return Err(SchemaError::UnlistedFields {
            schema: which,
            pointer: at,
            field,
            problem: FieldCut::KeysNotDeclared,
        });
    }
    match conditional_keys(schema, &mut String::new()) {
        Some((at, keyword, key)) => Err(SchemaError::UnlistedFields {
            schema: which,
            pointer: at.clone(),
            field: format!("{key:?}"),
            problem: FieldCut::ConditionalKeys { keyword, key },
        }),
        None => Ok(()),
    }
}

/// The first property a schema declares under `if`, `then`, `else` or
/// `dependentSchemas` without declaring it under the `properties` beside
/// them: (schema pointer of the keyword, keyword, property). Searched
/// through the whole schema, `$defs` included.
fn conditional_keys(schema: &Value, at: &mut String) -> Option<(String, String, String)> {
    let len = at.len();
    let found = match schema {
        Value::Object(obj) => {
            let beside = obj.get("properties").and_then(Value::as_object);
            let declared = |key: &str| beside.is_some_and(|p| p.contains_key(key));
            let mut conditions: Vec<(String, &Value)> = ["if", "then", "else"]
                .into_iter()
                .filter_map(|k| obj.get(k).map(|v| (k.to_owned(), v)))
                .collect();
            if let Some(deps) = obj.get("dependentSchemas").and_then(Value::as_object) {
                conditions.extend(deps.iter().map(|(name, v)| (format!("dependentSchemas/{name}"), v)));
            }
            let own = conditions.iter().find_map(|(keyword, condition)| {
                let properties = condition.get("properties").and_then(Value::as_object)?;
                let key = properties.keys().find(|k| !declared(k))?;
                let keyword = keyword.split('/').next().unwrap_or_default().to_owned();
                let mut pointer = at.clone();
                push_segment(&mut pointer, &keyword);
                Some((pointer, keyword, key.clone()))
            });
            own.or_else(|| {
                obj.iter().find_map(|(k, v)| {
                    at.truncate(len);
                    push_segment(at, k);
                    conditional_keys(v, at)
                })
            })
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            at.truncate(len);
            at.push('/');
            at.push_str(&i.to_string());
            conditional_keys(v, at)
        }),
        _ => None,
    };
    at.truncate(len);
    found
}

/// Record properties `next` requires that `previous` did not (instance JSON
/// Pointers), following nested `properties`, those of an optional object
/// written as an alternative with null included. Not a breaking change for
/// consumers, but from the version on, the register must send them: a
/// record without them is refused as breaking its schema.
pub fn newly_required(previous: &Value, next: &Value) -> Vec<String> {
    fn walk(previous: Option<&Value>, next: &Value, at: &mut String, out: &mut Vec<String>) {
        let required = |schema: Option<&Value>| -> Vec<String> {
            schema
                .and_then(|s| s.get("required"))
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let before = required(previous);
        let len = at.len();
        for key in required(Some(next)) {
            // A property new in `next` is required only if its parent exists in
            // `previous`'s records too; a new parent is reported itself.
            if !before.contains(&key) {
                push_segment(at, &key);
                out.push(at.clone());
                at.truncate(len);
            }
        }
        let Some(properties) = next.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (key, schema) in properties {
            let old = previous.and_then(|p| p.get("properties")).and_then(|p| p.get(key));
            if old.is_none() {
                continue;
            }
            push_segment(at, key);
            walk(old, schema, at, out);
            at.truncate(len);
        }
    }
    let mut out = Vec::new();
    // Into optional structs written as alternatives too (see `nullable_as_type`).
    let (previous, next) = (
        nullable_alternatives_as_types(previous),
        nullable_alternatives_as_types(next),
    );
    walk(Some(&previous), &next, &mut String::new(), &mut out);
    out
}

/// Canonical JSON: object keys sorted, no whitespace.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(key, out);
                out.push(':');
                if let Some(v) = map.get(key.as_str()) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push_str(&Value::String(s.to_owned()).to_string());
}

impl RecordTypeDefinition {
    /// Hex SHA-256 of the canonical (sorted-key) JSON array
    /// `[name, subject_key, query_schema, record_schema]`.
    pub fn digest(&self) -> String {
        let mut canonical = String::new();
        canonical.push('[');
        write_json_string(&self.name, &mut canonical);
        canonical.push(',');
        write_json_string(&self.subject_key, &mut canonical);
        canonical.push(',');
        write_canonical(&self.query_schema, &mut canonical);
        canonical.push(',');
        write_canonical(&self.record_schema, &mut canonical);
        canonical.push(']');
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }

    /// Every record field a grant can name, as sorted JSON Pointers: nested
    /// object properties and the properties of array items (array levels
    /// transparent), parents and children alike.
    pub fn field_pointers(&self) -> Vec<String> {
        record_fields(&self.record_schema).pointers()
    }
}

/// One reason a new version breaks consumers of the previous one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakingChange {
    /// `record_property_removed`, `record_property_retyped`,
    /// `record_property_structure_changed`, `record_property_no_longer_required`,
    /// `record_constraint_changed`, `query_parameter_required`,
    /// `query_parameter_removed`, `query_parameter_retyped`, `query_enum_narrowed`,
    /// `query_constraint_changed`, `subject_key_changed`, `owner_changed` or
    /// `comparison_too_large`.
    pub kind: String,
    /// Instance JSON Pointer of the field (`/subject_key`, `/owner` for the definition).
    pub pointer: String,
    /// What changed, for a person.
    pub message: String,
}

impl fmt::Display for BreakingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

fn breaking(kind: &str, pointer: &str, message: String) -> BreakingChange {
    BreakingChange {
        kind: kind.to_owned(),
        pointer: pointer.to_owned(),
        message,
    }
}

/// The `type` of a schema as a set; `None` when it accepts any type.
fn type_set(schema: &Value) -> Option<BTreeSet<&str>> {
    match schema.get("type")? {
        Value::String(t) => Some(BTreeSet::from([t.as_str()])),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

fn show_types(types: &Option<BTreeSet<&str>>) -> String {
    match types {
        None => "any".to_owned(),
        Some(set) => set.iter().copied().collect::<Vec<_>>().join(" or "),
    }
}

/// Every old type still accepted by the new set (`integer` is covered by `number`).
fn types_widened_or_equal(old: &Option<BTreeSet<&str>>, new: &Option<BTreeSet<&str>>) -> bool {
    match (old, new) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(o), Some(n)) => o
            .iter()
            .all(|t| n.contains(t) || (*t == "integer" && n.contains("number"))),
    }
}

/// The allowed values (`enum`, or `const` as one value); `None` when unrestricted.
fn enum_values(schema: &Value) -> Option<Vec<&Value>> {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return Some(values.iter().collect());
    }
    schema.get("const").map(|c| vec![c])
}

/// Some value allowed before is no longer allowed.
fn enum_narrowed(old: Option<Vec<&Value>>, new: Option<Vec<&Value>>) -> bool {
    match (old, new) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(o), Some(n)) => o.iter().any(|v| !n.contains(v)),
    }
}

fn parent_pointer(pointer: &str) -> &str {
    pointer.rfind('/').map_or("", |i| &pointer[..i])
}

/// Keywords that constrain values of one JSON type only, so that admitting
/// `null` as well (a `"null"` added to `type`) leaves them without effect on
/// it, as the `{"type": "null"}` alternative beside them does.
const ONE_TYPE_KEYWORDS: [&str; 29] = [
    "type",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "format",
    "contentEncoding",
    "contentMediaType",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxContains",
    "minContains",
    "contains",
    "items",
    "prefixItems",
    "additionalItems",
    "maxProperties",
    "minProperties",
    "required",
    "dependentRequired",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
];

/// The schema a nullable alternative stands for, when `obj` is one: `anyOf`
/// or `oneOf` of `{"type": "null"}` and one schema (inline, or a local
/// `$ref`) that admits no `null` and constrains its types only, beside
/// annotations alone. This is how generators write an optional struct
/// (pydantic, schemars), and it admits exactly what that schema with
/// `"null"` added to its `type` admits.
fn nullable_as_type(root: &Value, obj: &Map<String, Value>) -> Option<Value> {
    let (keyword, branches) = ["anyOf", "oneOf"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_array).map(|b| (*k, b)))?;
    let asserts_only_type =
        |branch: &Map<String, Value>| branch.iter().all(|(k, v)| k == "type" || asserts_nothing(root, k, v));
    let is_null = |branch: &Value| {
        branch
            .as_object()
            .is_some_and(|b| asserts_only_type(b) && (b.get("type") == Some(&Value::from("null"))))
    };
    let [first, second] = branches.as_slice() else {
        return None;
    };
    let other = match (is_null(first), is_null(second)) {
        (true, false) => second,
        (false, true) => first,
        _ => return None,
    };
    // Beside the alternatives, annotations only: an assertion there would
    // apply to null too.
    if obj.iter().any(|(k, v)| k != keyword && !asserts_nothing(root, k, v)) {
        return None;
    }
    let target = match other.get("$ref") {
        Some(reference) => {
            let wrapper = other.as_object()?;
            if wrapper.iter().any(|(k, v)| k != "$ref" && !asserts_nothing(root, k, v)) {
                return None;
            }
            local_target(root, reference.as_str()?)?
        }
        None => other,
    };
    let target = target.as_object()?;
    if target
        .iter()
        .any(|(k, v)| !ONE_TYPE_KEYWORDS.contains(&k.as_str()) && !asserts_nothing(root, k, v))
    {
        return None;
    }
    let mut types: Vec<Value> = match target.get("type")? {
        Value::String(t) => vec![Value::from(t.as_str())],
        Value::Array(ts) if ts.iter().all(Value::is_string) => ts.clone(),
        _ => return None,
    };
    if types.iter().any(|t| t == "null") {
        return None;
    }
    types.push(Value::from("null"));
    let mut merged = target.clone();
    merged.insert("type".to_owned(), Value::Array(types));
    for (k, v) in obj {
        if k != keyword && !merged.contains_key(k) {
            merged.insert(k.clone(), v.clone());
        }
    }
    Some(Value::Object(merged))
}

/// `schema` with its nullable alternatives (see [`nullable_as_type`]) written
/// as types admitting `null`, which admit the same values; the field-by-field
/// comparison then sees into an optional struct as it sees into a `"type":
/// ["object", "null"]` one. `schema` itself when a local `$ref` that
/// resolved in it would no longer reach the same schema rewritten: one
/// pointing inside an alternative rewritten, or at a key beside the
/// alternatives that the schema they stand for names too (its `$defs`
/// would shadow theirs, and the comparison would follow a reference
/// elsewhere than the validator does), or one too deep to be looked at.
fn nullable_alternatives_as_types(schema: &Value) -> Value {
    let mut budget = REWRITE_BUDGET;
    let Some(rewritten) = rewrite_nullable(schema, schema, 0, &mut budget) else {
        return schema.clone();
    };
    let mut references = Vec::new();
    // A reference not seen could not be checked: the schema as written then.
    if !local_references(schema, &mut references, 0) {
        return schema.clone();
    }
    references.sort_unstable();
    references.dedup();
    let still_reach_the_same =
        references
            .iter()
            .all(|r| match (local_target(schema, r), local_target(&rewritten, r)) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(before), Some(after)) => {
                    rewrite_nullable(schema, before, 0, &mut budget).is_some_and(|before| before == *after)
                }
            });
    if still_reach_the_same {
        rewritten
    } else {
        schema.clone()
    }
}

/// JSON nodes [`nullable_alternatives_as_types`] may write: a reference
/// inlined is copied, and references fanning out (or back) must not make a
/// registration do exponential work. Past it the schema is compared as written.
const REWRITE_BUDGET: usize = 100_000;

fn rewrite_nullable(root: &Value, schema: &Value, level: usize, budget: &mut usize) -> Option<Value> {
    *budget = budget.checked_sub(1)?;
    let Some(obj) = schema.as_object() else {
        return Some(schema.clone());
    };
    if level >= MAX_FIELD_LEVELS {
        return None;
    }
    if let Some(merged) = nullable_as_type(root, obj) {
        return rewrite_nullable(root, &merged, level + 1, budget);
    }
    let mut out = Map::with_capacity(obj.len());
    for (key, value) in obj {
        let schemas_below = SCHEMA_KEYWORDS.contains(&key.as_str());
        let named_schemas_below = SCHEMA_MAP_KEYWORDS.contains(&key.as_str()) || key == "$defs" || key == "definitions";
        let rewritten = match value {
            Value::Array(items) if schemas_below => Value::Array(
                items
                    .iter()
                    .map(|item| rewrite_nullable(root, item, level + 1, budget))
                    .collect::<Option<_>>()?,
            ),
            Value::Object(_) if schemas_below => rewrite_nullable(root, value, level + 1, budget)?,
            Value::Object(map) if named_schemas_below => Value::Object(
                map.iter()
                    .map(|(name, sub)| Some((name.clone(), rewrite_nullable(root, sub, level + 1, budget)?)))
                    .collect::<Option<_>>()?,
            ),
            other => {
                *budget = budget.checked_sub(1)?;
                other.clone()
            }
        };
        out.insert(key.clone(), rewritten);
    }
    Some(Value::Object(out))
}

/// Every `$ref` written in `schema`, as far down as [`MAX_FIELD_LEVELS`]
/// levels of JSON; false when the schema goes deeper, and some may be missed.
fn local_references(schema: &Value, out: &mut Vec<String>, level: usize) -> bool {
    match schema {
        Value::Object(_) | Value::Array(_) if level >= MAX_FIELD_LEVELS => false,
        Value::Object(obj) => obj.iter().all(|(key, value)| match value.as_str() {
            Some(reference) if key == "$ref" => {
                out.push(reference.to_owned());
                true
            }
            _ => local_references(value, out, level + 1),
        }),
        Value::Array(items) => items.iter().all(|item| local_references(item, out, level + 1)),
        _ => true,
    }
}

/// Lists every change from `previous` to `next` that breaks consumers of
/// `previous` (BACKWARD compatibility); empty when compatible.
pub fn check_compatibility(previous: &RecordTypeDefinition, next: &RecordTypeDefinition) -> Vec<BreakingChange> {
    let mut out = Vec::new();
    if previous.subject_key != next.subject_key {
        out.push(breaking(
            "subject_key_changed",
            "/subject_key",
            format!(
                "subject key changed from {:?} to {:?}; consumers name the subject by it",
                previous.subject_key, next.subject_key
            ),
        ));
    }
    if previous.owner != next.owner {
        out.push(breaking(
            "owner_changed",
            "/owner",
            format!(
                "owner changed from {} to {}: lookups of the new version would go to {}'s register. To move the \
                 record type, a federation admin registers this version with compatibility NONE; or register a new \
                 record type",
                previous.owner, next.owner, next.owner
            ),
        ));
    }
    let mut budget = Budget::new();
    compare_record(
        &nullable_alternatives_as_types(&previous.record_schema),
        &nullable_alternatives_as_types(&next.record_schema),
        &mut budget,
        &mut out,
    );
    compare_query(
        &nullable_alternatives_as_types(&previous.query_schema),
        &nullable_alternatives_as_types(&next.query_schema),
        &mut budget,
        &mut out,
    );
    if budget.exhausted {
        out.push(breaking(
            "comparison_too_large",
            "",
            "the schemas reference so much that the broker stopped comparing them; changes it could not compare \
             count as breaking: simplify the references, or have an admin register with compatibility NONE"
                .to_owned(),
        ));
    }
    out
}

fn index<'a, 'b>(fields: &'b [FieldInfo<'a>]) -> HashMap<&'b str, &'b FieldInfo<'a>> {
    fields.iter().map(|f| (f.pointer.as_str(), f)).collect()
}

/// Both ways, as a record's values flow from the register to consumers: a
/// constraint tightened refuses the register's records valid before, one
/// loosened lets through values consumers never saw.
const RECORD_CONSTRAINED: &str = "the register may now send values consumers of the previous version never saw, \
                                  or records valid before may be refused (a record property's constraints may not \
                                  change)";

fn compare_record(old_schema: &Value, new_schema: &Value, budget: &mut Budget, out: &mut Vec<BreakingChange>) {
    let old_fields = collect_fields(old_schema);
    let new_fields = collect_fields(new_schema);
    let new_index = index(&new_fields);
    let root = field_constraint_changes(
        (old_schema, old_schema, old_schema),
        (new_schema, new_schema, new_schema),
        Loosening::Breaking,
        budget,
    );
    out.extend(constrained(
        "record_constraint_changed",
        "",
        "the record schema's root",
        &root,
        RECORD_CONSTRAINED,
    ));
    for old in &old_fields {
        let p = old.pointer.as_str();
        let Some(new) = new_index.get(p) else {
            out.push(breaking(
                "record_property_removed",
                p,
                format!("record property {p} was removed; consumers of the previous version read it"),
            ));
            continue;
        };
        if old.required && !new.required {
            out.push(breaking(
                "record_property_no_longer_required",
                p,
                format!(
                    "record property {p} is no longer required; consumers of the previous version rely on every \
                     record having it"
                ),
            ));
        }
        let (ot, nt) = (type_set(old.schema), type_set(new.schema));
        if ot != nt {
            out.push(breaking(
                "record_property_retyped",
                p,
                format!(
                    "record property {p} changed type from {} to {}",
                    show_types(&ot),
                    show_types(&nt)
                ),
            ));
        }
        let mut changed = || match (
            resolved(old_schema, old.schema, budget),
            resolved(new_schema, new.schema, budget),
        ) {
            (Some(o), Some(n)) => o != n,
            _ => true,
        };
        let structure_changed = is_opaque_leaf(new, &new_fields) && changed();
        if structure_changed {
            out.push(breaking(
                "record_property_structure_changed",
                p,
                format!(
                    "record property {p} holds values whose fields its schema does not declare with \
                     properties and items alone (allOf, anyOf, oneOf, a tuple, a map...), which are not compared \
                     field by field, and that schema changed: consumers of the previous version may receive values \
                     it did not admit. Declare its fields with properties and items, or have an admin register it \
                     with compatibility NONE"
                ),
            ));
        } else {
            let changes = field_constraint_changes(
                (old_schema, old.declared, old.schema),
                (new_schema, new.declared, new.schema),
                Loosening::Breaking,
                budget,
            );
            out.extend(constrained(
                "record_constraint_changed",
                p,
                &format!("record property {p}"),
                &changes,
                RECORD_CONSTRAINED,
            ));
        }
        if let (Some(oi), Some(ni)) = (old.items, new.items) {
            let (ot, nt) = (type_set(oi), type_set(ni));
            if ot != nt {
                out.push(breaking(
                    "record_property_retyped",
                    p,
                    format!(
                        "items of record property {p} changed type from {} to {}",
                        show_types(&ot),
                        show_types(&nt)
                    ),
                ));
            }
        }
    }
}

/// A field released whole (no field of its own below it) whose values may
/// be more than one scalar: its structure, if any, is invisible to the
/// field-by-field filter.
fn is_opaque_leaf(field: &FieldInfo<'_>, fields: &[FieldInfo<'_>]) -> bool {
    const SCALARS: [&str; 5] = ["string", "number", "integer", "boolean", "null"];
    let scalar_only = field.items.is_none()
        && type_set(field.schema).is_some_and(|t| !t.is_empty() && t.iter().all(|t| SCALARS.contains(t)))
        && !["allOf", "anyOf", "oneOf", "if", "then", "else", "not"]
            .iter()
            .any(|k| field.schema.get(*k).is_some());
    let mut below = field.pointer.clone();
    below.push('/');
    !scalar_only && !fields.iter().any(|f| f.pointer.starts_with(&below))
}

/// Work a compatibility check may do inlining references, in JSON nodes:
/// references fanning out must not make a registration do exponential work.
const COMPARE_BUDGET: usize = 1_000_000;

/// What is left of [`COMPARE_BUDGET`] in one compatibility check.
struct Budget {
    left: usize,
    exhausted: bool,
}

impl Budget {
    fn new() -> Self {
        Budget {
            left: COMPARE_BUDGET,
            exhausted: false,
        }
    }

    /// Takes `nodes` from the budget; `None` once it is spent.
    fn spend(&mut self, nodes: usize) -> Option<()> {
        match self.left.checked_sub(nodes) {
            Some(left) => {
                self.left = left;
                Some(())
            }
            None => {
                self.left = 0;
                self.exhausted = true;
                None
            }
        }
    }
}

/// JSON nodes in a value.
fn nodes(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(nodes).sum::<usize>(),
        Value::Array(items) => 1 + items.iter().map(nodes).sum::<usize>(),
        _ => 1,
    }
}

/// Keywords the validator asserts or applies, in draft 2020-12 or draft-07:
/// the only ones compared between versions. Any other says nothing about
/// which values are valid: annotations (`title`, `description`, `examples`,
/// `$comment`, `deprecated`, `readOnly`, ...), definitions (`$defs`, reached
/// only through the references inlined), custom keywords such as `x-pii`,
/// and whatever the validator does not know, which it ignores.
const ASSERTIONS: [&str; 46] = [
    "type",
    "enum",
    "const",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "format",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxContains",
    "minContains",
    "contains",
    "maxProperties",
    "minProperties",
    "required",
    "dependentRequired",
    "dependencies",
    "dependentSchemas",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
    "unevaluatedProperties",
    "items",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "$ref",
    "$dynamicRef",
    "$recursiveRef",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
];

/// True for a keyword whose change cannot change which values are valid:
/// one outside [`ASSERTIONS`], or a `format` the validator does not check.
fn asserts_nothing(root: &Value, key: &str, value: &Value) -> bool {
    !ASSERTIONS.contains(&key) || unchecked_format(root, key, value)
}

/// True for a `format` the validator does not check in `root`'s draft. A
/// version stored with one ignores it (registration refuses it now), so it
/// constrains nothing: a next version dropping it changes no answer.
fn unchecked_format(root: &Value, key: &str, value: &Value) -> bool {
    let Some(format) = value.as_str().filter(|_| key == "format") else {
        return false;
    };
    let draft = draft_of(RECORD_SCHEMA, root).unwrap_or(Draft::Draft202012);
    let mut schema = Map::new();
    schema.insert("format".to_owned(), Value::String(format.to_owned()));
    jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(&Value::Object(schema))
        .is_err()
}

/// Keywords whose value is a schema, or an array of schemas.
const SCHEMA_KEYWORDS: [&str; 16] = [
    "items",
    "additionalItems",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
    "allOf",
    "anyOf",
    "oneOf",
    "prefixItems",
];
/// Keywords whose value maps names to schemas.
const SCHEMA_MAP_KEYWORDS: [&str; 4] = ["properties", "patternProperties", "dependentSchemas", "dependencies"];

/// A subschema with its local `$ref`s inlined and only the keywords that
/// assert kept ([`ASSERTIONS`]): two are equal when they admit the same
/// values. A
/// reference back to a schema being inlined stays as written (its target
/// is inlined once already, changes and all), as does one past
/// [`MAX_REF_HOPS`]. `None` once the budget is spent: it then counts as
/// changed.
fn resolved(root: &Value, schema: &Value, budget: &mut Budget) -> Option<Value> {
    inline_schema(root, schema, &mut Vec::new(), budget)
}

fn inline_schema<'a>(
    root: &'a Value,
    schema: &'a Value,
    inlining: &mut Vec<&'a Value>,
    budget: &mut Budget,
) -> Option<Value> {
    budget.spend(1)?;
    let Some(obj) = schema.as_object() else {
        return Some(schema.clone());
    };
    let mut out = Map::new();
    for (key, value) in obj {
        if asserts_nothing(root, key, value) {
            continue;
        }
        let target = value
            .as_str()
            .filter(|_| key == "$ref" && inlining.len() < MAX_REF_HOPS)
            .and_then(|r| local_target(root, r))
            .filter(|t| !inlining.iter().any(|s| std::ptr::eq(*s, *t)));
        let inlined = match target {
            Some(target) => {
                inlining.push(target);
                let inlined = inline_schema(root, target, inlining, budget);
                inlining.pop();
                inlined?
            }
            None => inline_keyword(root, key, value, inlining, budget)?,
        };
        out.insert(key.clone(), inlined);
    }
    Some(Value::Object(out))
}

/// The value of `key` in a schema, inlined as a schema where it is one and
/// copied where it is data (a property named `title` is not an annotation).
fn inline_keyword<'a>(
    root: &'a Value,
    key: &str,
    value: &'a Value,
    inlining: &mut Vec<&'a Value>,
    budget: &mut Budget,
) -> Option<Value> {
    if SCHEMA_KEYWORDS.contains(&key) {
        return match value {
            Value::Array(items) => Some(Value::Array(
                items
                    .iter()
                    .map(|v| inline_schema(root, v, inlining, budget))
                    .collect::<Option<_>>()?,
            )),
            other => inline_schema(root, other, inlining, budget),
        };
    }
    if SCHEMA_MAP_KEYWORDS.contains(&key)
        && let Some(map) = value.as_object()
    {
        let mut out = Map::new();
        for (name, sub) in map {
            let inlined = if sub.is_object() || sub.is_boolean() {
                inline_schema(root, sub, inlining, budget)?
            } else {
                budget.spend(nodes(sub))?;
                sub.clone()
            };
            out.insert(name.clone(), inlined);
        }
        return Some(Value::Object(out));
    }
    budget.spend(nodes(value))?;
    Some(value.clone())
}

/// Keywords compared field by field where the field walk expanded a field,
/// in a query: its `enum` and `const` may widen, so they are compared as
/// sets of values accepted ([`enum_narrowed`]).
const QUERY_FIELD_KEYWORDS: [&str; 6] = ["type", "enum", "const", "properties", "required", "items"];
/// The same in a record. Its `enum` and `const` are constraints like any
/// other: a value added lets the register send one consumers never saw, a
/// value dropped refuses records valid before.
const RECORD_FIELD_KEYWORDS: [&str; 4] = ["type", "properties", "required", "items"];

/// Every constraint keyword of a schema and its values, inlined.
type Constraints = std::collections::BTreeMap<String, Vec<Value>>;

/// The constraints a field's schema puts on its values beyond what is
/// compared field by field (the `field_keywords` of `walked`, the schema the
/// walk expanded): every other keyword that asserts, in the schema as
/// `declared` and in each schema its `$ref`s lead to (a reference and the
/// keywords beside it all apply). An `enum`'s values count as a set, in
/// no order. `None` once the budget is spent.
fn constraints(
    root: &Value,
    (declared, walked): (&Value, &Value),
    field_keywords: &[&str],
    budget: &mut Budget,
) -> Option<Constraints> {
    let mut out = Constraints::new();
    let mut seen: Vec<&Value> = Vec::new();
    let mut next = Some(declared);
    while let Some(schema) = next.take() {
        if seen.iter().any(|s| std::ptr::eq(*s, schema)) {
            break;
        }
        seen.push(schema);
        let Some(obj) = schema.as_object() else {
            out.entry("true/false schema".into()).or_default().push(schema.clone());
            break;
        };
        let expanded = std::ptr::eq(schema, walked);
        for (key, value) in obj {
            let k = key.as_str();
            let compared_elsewhere = expanded && field_keywords.contains(&k) && (k != "items" || value.is_object());
            if k == "$ref" || compared_elsewhere || asserts_nothing(root, k, value) {
                continue;
            }
            let mut inlined = inline_keyword(root, k, value, &mut Vec::new(), budget)?;
            if let (true, Value::Array(values)) = (k == "enum", &mut inlined) {
                as_set(values);
            }
            out.entry(key.clone()).or_default().push(inlined);
        }
        if let Some(reference) = obj.get("$ref").and_then(Value::as_str) {
            match local_target(root, reference).filter(|_| seen.len() <= MAX_REF_HOPS) {
                Some(target) => next = Some(target),
                None => out
                    .entry("$ref".into())
                    .or_default()
                    .push(Value::String(reference.to_owned())),
            }
        }
    }
    Some(out)
}

/// Sorts and dedups `values` (by their canonical JSON), for comparing as sets.
fn as_set(values: &mut Vec<Value>) {
    let mut keyed: Vec<(String, Value)> = values
        .drain(..)
        .map(|v| {
            let mut key = String::new();
            write_canonical(&v, &mut key);
            (key, v)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.dedup_by(|a, b| a.0 == b.0);
    values.extend(keyed.into_iter().map(|(_, v)| v));
}

/// A field's array items: as declared, and with bare references followed.
fn items_of<'a>(root: &'a Value, walked: &'a Value) -> Option<(&'a Value, &'a Value)> {
    let items = walked.get("items").filter(|i| i.is_object())?;
    Some((items, follow_refs(root, items)))
}

/// Constraint keywords whose removal from a query parameter admits more
/// queries, whatever else its schema says.
const REMOVABLE: [&str; 37] = [
    "type",
    "enum",
    "const",
    "required",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "maxContains",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "not",
    "allOf",
    "anyOf",
    "oneOf",
    "if",
    "then",
    "else",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
];
const LOWER_BOUNDS: [&str; 6] = [
    "minLength",
    "minItems",
    "minProperties",
    "minimum",
    "exclusiveMinimum",
    "minContains",
];
const UPPER_BOUNDS: [&str; 6] = [
    "maxLength",
    "maxItems",
    "maxProperties",
    "maximum",
    "exclusiveMaximum",
    "maxContains",
];

/// Whether a change may only ever admit more values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loosening {
    /// Allowed (a query: what was valid stays valid).
    Allowed,
    /// Breaking too (a record: consumers see what they never saw).
    Breaking,
}

/// Whether `key` changing from `old` to `new` (`None`: absent) only admits
/// more: a constraint removed, a lower bound lowered, an upper one raised,
/// a `multipleOf` divided.
fn only_loosens(key: &str, old: &[Value], new: Option<&[Value]>, new_all: &Constraints) -> bool {
    let Some(new) = new else {
        return match key {
            "additionalProperties" => !new_all.contains_key("unevaluatedProperties"),
            "patternProperties" => {
                !new_all.contains_key("additionalProperties") && !new_all.contains_key("unevaluatedProperties")
            }
            _ => REMOVABLE.contains(&key),
        };
    };
    let ([o], [n]) = (old, new) else {
        return false;
    };
    let (Some(o), Some(n)) = (o.as_f64(), n.as_f64()) else {
        return false;
    };
    if LOWER_BOUNDS.contains(&key) {
        n <= o
    } else if UPPER_BOUNDS.contains(&key) {
        n >= o
    } else if key == "multipleOf" {
        n > 0.0 && (o / n).fract() == 0.0
    } else {
        false
    }
}

/// The constraint keywords whose change from `old` to `new` breaks, each as
/// "keyword added", "keyword removed" or "keyword changed".
fn constraint_changes(old: &Constraints, new: &Constraints, loosening: Loosening) -> Vec<String> {
    let mut out = Vec::new();
    for (key, before) in old {
        let after = new.get(key);
        if after == Some(before) {
            continue;
        }
        if loosening == Loosening::Allowed && only_loosens(key, before, after.map(Vec::as_slice), new) {
            continue;
        }
        out.push(format!("{key} {}", if after.is_some() { "changed" } else { "removed" }));
    }
    for key in new.keys().filter(|k| !old.contains_key(*k)) {
        out.push(format!("{key} added"));
    }
    out
}

/// Constraint changes of one field (or the root) and, level by level, of its
/// array items; `None` for "changed" once the budget is spent.
fn field_constraint_changes(
    (old_root, old_declared, old_walked): (&Value, &Value, &Value),
    (new_root, new_declared, new_walked): (&Value, &Value, &Value),
    loosening: Loosening,
    budget: &mut Budget,
) -> Vec<String> {
    let mut out = Vec::new();
    let field_keywords: &[&str] = match loosening {
        Loosening::Allowed => &QUERY_FIELD_KEYWORDS,
        Loosening::Breaking => &RECORD_FIELD_KEYWORDS,
    };
    let (mut old, mut new) = ((old_declared, old_walked), (new_declared, new_walked));
    for level in 0..MAX_FIELD_LEVELS {
        let of = if level == 0 { "" } else { "items: " };
        let compared = constraints(old_root, old, field_keywords, budget)
            .zip(constraints(new_root, new, field_keywords, budget))
            .map(|(o, n)| constraint_changes(&o, &n, loosening));
        match compared {
            Some(changes) => out.extend(changes.into_iter().map(|c| format!("{of}{c}"))),
            None => {
                out.push("too large to compare".to_owned());
                break;
            }
        }
        match (items_of(old_root, old.1), items_of(new_root, new.1)) {
            (Some(o), Some(n)) => (old, new) = (o, n),
            (None, Some(_)) => {
                out.push("items added".to_owned());
                break;
            }
            (Some(_), None) if loosening == Loosening::Breaking => {
                out.push("items removed".to_owned());
                break;
            }
            _ => break,
        }
    }
    out
}

/// A breaking change of constraints, when there is one.
fn constrained(kind: &str, pointer: &str, what: &str, changes: &[String], consequence: &str) -> Option<BreakingChange> {
    (!changes.is_empty()).then(|| breaking(kind, pointer, format!("{what}: {}; {consequence}", changes.join(", "))))
}

const QUERY_CONSTRAINED: &str = "queries the previous version accepted may be refused (only removing a constraint, \
                                 lowering a minimum or raising a maximum keeps them valid)";

fn compare_query(old_schema: &Value, new_schema: &Value, budget: &mut Budget, out: &mut Vec<BreakingChange>) {
    let old_fields = collect_fields(old_schema);
    let new_fields = collect_fields(new_schema);
    let old_index = index(&old_fields);
    let new_index = index(&new_fields);
    let root = field_constraint_changes(
        (old_schema, old_schema, old_schema),
        (new_schema, new_schema, new_schema),
        Loosening::Allowed,
        budget,
    );
    out.extend(constrained(
        "query_constraint_changed",
        "",
        "the query schema's root",
        &root,
        QUERY_CONSTRAINED,
    ));
    for old in &old_fields {
        let p = old.pointer.as_str();
        let Some(new) = new_index.get(p) else {
            out.push(breaking(
                "query_parameter_removed",
                p,
                format!("query parameter {p} was removed; queries of the previous version send it"),
            ));
            continue;
        };
        let changes = field_constraint_changes(
            (old_schema, old.declared, old.schema),
            (new_schema, new.declared, new.schema),
            Loosening::Allowed,
            budget,
        );
        out.extend(constrained(
            "query_constraint_changed",
            p,
            &format!("query parameter {p}"),
            &changes,
            QUERY_CONSTRAINED,
        ));
        let (ot, nt) = (type_set(old.schema), type_set(new.schema));
        if !types_widened_or_equal(&ot, &nt) {
            out.push(breaking(
                "query_parameter_retyped",
                p,
                format!(
                    "query parameter {p} changed type from {} to {}, refusing queries that were valid",
                    show_types(&ot),
                    show_types(&nt)
                ),
            ));
        }
        if enum_narrowed(enum_values(old.schema), enum_values(new.schema)) {
            out.push(breaking(
                "query_enum_narrowed",
                p,
                format!("query parameter {p} no longer accepts every value it accepted (enum narrowed or added)"),
            ));
        }
        if let (Some(oi), Some(ni)) = (old.items, new.items) {
            let (ot, nt) = (type_set(oi), type_set(ni));
            if !types_widened_or_equal(&ot, &nt) {
                out.push(breaking(
                    "query_parameter_retyped",
                    p,
                    format!(
                        "items of query parameter {p} changed type from {} to {}",
                        show_types(&ot),
                        show_types(&nt)
                    ),
                ));
            }
            if enum_narrowed(enum_values(oi), enum_values(ni)) {
                out.push(breaking(
                    "query_enum_narrowed",
                    p,
                    format!("items of query parameter {p} no longer accept every value they accepted"),
                ));
            }
        }
    }
    for new in &new_fields {
        let p = new.pointer.as_str();
        if !new.required {
            continue;
        }
        let old = old_index.get(p);
        if old.is_some_and(|o| o.required) {
            continue;
        }
        // A required child of a new optional object does not affect old queries;
        // a new required object is reported on the object itself.
        let parent = parent_pointer(p);
        if parent.is_empty() || old_index.contains_key(parent) {
            let message = if old.is_some() {
                format!("query parameter {p} is now required; queries of the previous version may omit it")
            } else {
                format!("new query parameter {p} is required; queries of the previous version do not send it")
            };
            out.push(breaking("query_parameter_required", p, message));
        }
    }
}

/// Why an instance (query or record) does not validate. Never holds the
/// instance's values: it names the location and the constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationFailure {
    /// JSON Pointer of the offending instance location.
    pub pointer: String,
    /// The constraint violated.
    pub message: String,
}

impl fmt::Display for ValidationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: {}", show_pointer(&self.pointer), self.message)
    }
}

impl std::error::Error for ValidationFailure {}

fn describe_types(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or "),
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Stands in a failure's pointer for an object key the schema does not
/// declare: the key is the instance's, not the schema's, and may be anything
/// (a national ID, a megabyte of text).
const UNDECLARED_KEY: &str = "<undeclared key>";

/// Longest pointer (and message) a failure names, in bytes; longer ones are
/// cut, with a mark.
const MAX_POINTER_CHARS: usize = 512;

/// The instance location of `error` in `instance`, naming only object keys
/// the schema declares (those its evaluation went through as
/// `properties/<key>`) and array indexes; any other key is [`UNDECLARED_KEY`].
fn declared_pointer(error: &ValidationError<'_>, instance: &Value) -> String {
    let evaluation = error.evaluation_path();
    let mut segments = evaluation.segments().peekable();
    let mut declared = HashSet::new();
    while let Some(segment) = segments.next() {
        if matches!(&segment, jsonschema::paths::LocationSegment::Property(p) if p == "properties")
            && let Some(jsonschema::paths::LocationSegment::Property(name)) = segments.peek()
        {
            declared.insert(name.to_string());
            segments.next();
        }
    }
    let mut pointer = String::new();
    let mut at = Some(instance);
    // Read off the raw pointer, since a key made of digits parses as an
    // index: only the instance tells an array's index from an object's key.
    for raw in error.instance_path().as_str().split('/').skip(1) {
        let key = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) => {
                at = key.parse::<usize>().ok().and_then(|i| items.get(i));
                pointer.push('/');
                pointer.push_str(raw);
            }
            Some(Value::Object(fields)) if declared.contains(&key) => {
                at = fields.get(&key);
                push_segment(&mut pointer, &key);
            }
            _ => {
                at = at.and_then(|v| v.as_object()).and_then(|f| f.get(&key));
                pointer.push('/');
                pointer.push_str(UNDECLARED_KEY);
            }
        }
        if pointer.len() > MAX_POINTER_CHARS {
            return truncate(pointer, MAX_POINTER_CHARS);
        }
    }
    pointer
}

/// "1 property" or "N properties" the schema does not declare.
fn undeclared(count: usize) -> String {
    if count == 1 {
        "has a property the schema does not declare".to_owned()
    } else {
        format!("has {count} properties the schema does not declare")
    }
}

/// Turns a jsonschema error into a message free of instance values, keys
/// included.
fn failure_from(error: &ValidationError<'_>, instance: &Value) -> ValidationFailure {
    let mut pointer = declared_pointer(error, instance);
    let message = match error.kind() {
        ValidationErrorKind::Required { property } => {
            if let Some(name) = property.as_str() {
                push_segment(&mut pointer, name);
            }
            "is required".to_owned()
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            format!("{} (additionalProperties)", undeclared(unexpected.len()))
        }
        ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            format!("{} (unevaluatedProperties)", undeclared(unexpected.len()))
        }
        ValidationErrorKind::Type { kind } => format!("expected type {}", describe_types(kind)),
        ValidationErrorKind::Pattern { pattern } => format!("does not match pattern {pattern}"),
        ValidationErrorKind::BacktrackLimitExceeded { .. } | ValidationErrorKind::RegexEngineFailure { .. } => {
            "could not be checked against its pattern".to_owned()
        }
        ValidationErrorKind::Enum { .. } => "must be one of the allowed values".to_owned(),
        ValidationErrorKind::Constant { .. } => "must equal the value fixed by the schema (const)".to_owned(),
        ValidationErrorKind::Format { format } => format!("is not a valid {format}"),
        ValidationErrorKind::MinLength { limit } => {
            format!("must be at least {} long", plural(*limit, "character"))
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("must be at most {} long", plural(*limit, "character"))
        }
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        ValidationErrorKind::MultipleOf { multiple_of } => format!("must be a multiple of {multiple_of}"),
        ValidationErrorKind::MinItems { limit } => format!("must have at least {}", plural(*limit, "item")),
        ValidationErrorKind::MaxItems { limit } => format!("must have at most {}", plural(*limit, "item")),
        ValidationErrorKind::AdditionalItems { limit } => {
            format!("must have at most {} (additionalItems)", plural(*limit as u64, "item"))
        }
        ValidationErrorKind::UnevaluatedItems { .. } => "has items that are not allowed (unevaluatedItems)".to_owned(),
        ValidationErrorKind::UniqueItems => "must not contain duplicate items".to_owned(),
        ValidationErrorKind::Contains => "must contain an item matching the schema (contains)".to_owned(),
        ValidationErrorKind::MinProperties { limit } => {
            format!(
                "must have at least {}",
                plural(*limit, "property").replace("propertys", "properties")
            )
        }
        ValidationErrorKind::MaxProperties { limit } => {
            format!(
                "must have at most {}",
                plural(*limit, "property").replace("propertys", "properties")
            )
        }
        ValidationErrorKind::PropertyNames { .. } => {
            "has a property name that is not allowed (propertyNames)".to_owned()
        }
        ValidationErrorKind::AnyOf { .. } => "does not match any of the allowed alternatives (anyOf)".to_owned(),
        ValidationErrorKind::OneOfNotValid { .. } => {
            "does not match any of the allowed alternatives (oneOf)".to_owned()
        }
        ValidationErrorKind::OneOfMultipleValid { .. } => "matches more than one alternative (oneOf)".to_owned(),
        ValidationErrorKind::Not { .. } => "matches a schema it must not match (not)".to_owned(),
        ValidationErrorKind::FalseSchema => "is not allowed".to_owned(),
        ValidationErrorKind::ContentEncoding { content_encoding } => {
            format!("is not valid {content_encoding} content")
        }
        ValidationErrorKind::ContentMediaType { content_media_type } => {
            format!("is not valid {content_media_type} content")
        }
        ValidationErrorKind::FromUtf8 { .. } => "is not valid UTF-8 once decoded".to_owned(),
        ValidationErrorKind::Custom { keyword, .. } => format!("fails the {keyword} constraint"),
        ValidationErrorKind::Referencing(_) => "could not be checked: a schema reference does not resolve".to_owned(),
    };
    ValidationFailure {
        pointer,
        // A pattern may be long: the message rides in a gRPC status header.
        message: truncate(message, MAX_POINTER_CHARS),
    }
}

/// A record type version with its validators compiled once.
pub struct CompiledRecordType {
    /// The version compiled.
    pub version: RecordTypeVersion,
    query_validator: Validator,
    record_validator: Validator,
    fields: HashSet<String>,
    shape: FieldSelection,
}

impl fmt::Debug for CompiledRecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledRecordType")
            .field("name", &self.version.definition.name)
            .field("version", &self.version.version)
            .field("deprecated", &self.version.deprecated)
            .finish_non_exhaustive()
    }
}

impl CompiledRecordType {
    /// Compiles both schemas of `version` (never fetching anything).
    pub fn compile(version: RecordTypeVersion) -> Result<Self, SchemaError> {
        let definition = &version.definition;
        check_schema_value(QUERY_SCHEMA, &definition.query_schema)?;
        check_schema_value(RECORD_SCHEMA, &definition.record_schema)?;
        // A version registered before unknown formats were refused still loads.
        let query_validator = build_validator(QUERY_SCHEMA, &definition.query_schema, Admission::Stored)?;
        let record_validator = build_validator(RECORD_SCHEMA, &definition.record_schema, Admission::Stored)?;
        let fields = record_fields(&definition.record_schema);
        let pointers = fields.pointers();
        // Registration refuses such fields now; a version stored before
        // still loads, and releases nothing inside them (an object without
        // declared fields is released empty).
        let withheld: Vec<String> = fields.cuts.iter().map(|cut| cut.field.clone()).collect();
        let (opaque, _) = fields.opaque_and_undeclared(&definition.record_schema);
        let shape = FieldSelection::shape_of(&pointers, &opaque, &withheld);
        let listed: Vec<String> = pointers.into_iter().filter(|p| !withheld.contains(p)).collect();
        // The pointers stored at registration were listed by the walk of
        // that day: fields declared inside `anyOf`/`oneOf`/`allOf` branches
        // were missing. What a version lists (`schema show`, the fields a
        // refused grant is told of, a `*` grant's release) is what can be
        // granted now.
        let mut version = version;
        version.field_pointers = listed.clone();
        Ok(CompiledRecordType {
            version,
            query_validator,
            record_validator,
            fields: listed.into_iter().collect(),
            shape,
        })
    }

    /// Validates a query; the first error, without the query's values.
    pub fn validate_query(&self, query: &Value) -> Result<(), ValidationFailure> {
        self.query_validator
            .validate(query)
            .map_err(|e| failure_from(&e, query))
    }

    /// Validates a record a provider returned; the first error, without its values.
    pub fn validate_record(&self, record: &Value) -> Result<(), ValidationFailure> {
        self.record_validator
            .validate(record)
            .map_err(|e| failure_from(&e, record))
    }

    /// The subject key's value in `query`, if present and a string.
    pub fn subject<'a>(&self, query: &'a Value) -> Option<&'a str> {
        query.get(&self.version.definition.subject_key)?.as_str()
    }

    /// What a record of this version may release at most: its declared
    /// fields, never a key the schema does not declare.
    pub fn shape(&self) -> &FieldSelection {
        &self.shape
    }

    /// True if `pointer` is one of the record type's field pointers.
    pub fn has_field(&self, pointer: &str) -> bool {
        self.fields.contains(pointer)
    }

    /// Record type name.
    pub fn name(&self) -> &str {
        &self.version.definition.name
    }

    /// Version number.
    pub fn version_number(&self) -> u32 {
        self.version.version
    }

    /// Owning provider.
    pub fn owner(&self) -> &MemberId {
        &self.version.definition.owner
    }

    /// True once deprecated.
    pub fn deprecated(&self) -> bool {
        self.version.deprecated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored version compiles as it did before any limit here: under the
    /// regex crate's defaults, 10 MiB compiled and a 2 MiB matching cache
    /// (a larger cache than before would grow with every thread matching).
    #[test]
    fn stored_versions_compile_under_the_regex_defaults() {
        assert_eq!(pattern_limits(Admission::Stored), (10 * (1 << 20), 2 * (1 << 20)));
    }

    use proptest::prelude::*;
    use serde_json::json;

    /// A value schema: a scalar, an object of two properties (each a value
    /// schema), or either written as a nullable alternative, inline or
    /// through `$defs`, by `anyOf` or `oneOf`, in either order, with
    /// annotations; some with a constraint beside or inside that keeps them
    /// from being rewritten.
    fn value_schema() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(json!({"type": "string"})),
            Just(json!({"type": "string", "minLength": 2})),
            Just(json!({"type": "integer", "minimum": 0})),
            Just(json!({"type": ["string", "integer"]})),
            Just(json!({"type": "string", "enum": ["a", "b"]})),
            Just(json!({"type": ["string", "null"]})),
            Just(json!({"const": null})),
        ];
        leaf.prop_recursive(3, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone(), any::<bool>()).prop_map(|(a, b, required)| {
                    let mut o = json!({"type": "object", "properties": {"a": a, "b": b}});
                    if required {
                        o["required"] = json!(["a"]);
                    }
                    o
                }),
                (inner, any::<bool>(), any::<bool>(), 0..3u8).prop_map(|(s, one_of, null_first, extra)| {
                    let keyword = if one_of { "oneOf" } else { "anyOf" };
                    let nothing = json!({"type": "null"});
                    let branches = if null_first {
                        json!([nothing, s])
                    } else {
                        json!([s, nothing])
                    };
                    let mut o = json!({ keyword: branches });
                    match extra {
                        1 => o["description"] = json!("optional"),
                        2 => o["maxProperties"] = json!(1),
                        _ => {}
                    }
                    o
                }),
            ]
        })
    }

    /// An instance for such schemas: scalars, nulls and small objects.
    fn instance() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            Just(json!("a")),
            Just(json!("x")),
            Just(json!(3)),
            Just(json!(-1)),
            Just(json!(true)),
        ];
        leaf.prop_recursive(3, 16, 2, |inner| {
            prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        })
    }

    /// Moves the `n`-th nullable alternative's schema into `$defs`, as
    /// pydantic writes it, so that the rewriting follows a `$ref` too.
    fn through_defs(schema: &Value) -> Value {
        let mut defs = Map::new();
        let mut rewritten = schema.clone();
        fn walk(v: &mut Value, defs: &mut Map<String, Value>) {
            if let Some(obj) = v.as_object_mut() {
                for keyword in ["anyOf", "oneOf"] {
                    if let Some(Value::Array(branches)) = obj.get_mut(keyword) {
                        for branch in branches.iter_mut() {
                            if branch.get("type") != Some(&json!("null")) {
                                walk(branch, defs);
                                let name = format!("D{}", defs.len());
                                defs.insert(name.clone(), branch.take());
                                *branch = json!({ "$ref": format!("#/$defs/{name}") });
                            }
                        }
                    }
                }
                for value in obj.values_mut() {
                    walk(value, defs);
                }
            }
        }
        walk(&mut rewritten, &mut defs);
        if !defs.is_empty() {
            rewritten["$defs"] = Value::Object(defs);
        }
        rewritten
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The rewriting used by the compatibility check admits exactly the
        /// values the schema as written admits.
        #[test]
        fn nullable_alternatives_rewritten_admit_the_same_values(
            field in value_schema(),
            by_ref in any::<bool>(),
            values in prop::collection::vec(instance(), 1..8),
        ) {
            let written = json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"f": field}});
            let written = if by_ref { through_defs(&written) } else { written };
            let rewritten = nullable_alternatives_as_types(&written);
            let before = jsonschema::validator_for(&written).expect("a valid schema");
            let after = jsonschema::validator_for(&rewritten).expect("still a valid schema");
            for value in values {
                let instance = json!({ "f": value });
                prop_assert_eq!(
                    before.is_valid(&instance),
                    after.is_valid(&instance),
                    "{} against {} rewritten as {}", instance, written, rewritten
                );
            }
        }
    }

    #[test]
    fn a_nullable_alternative_is_rewritten_as_a_type_admitting_null() {
        let written = json!({"type": "object", "properties": {
            "father": {"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}], "default": null},
        }, "$defs": {"P": {"type": "object", "properties": {"n": {"type": "string"}}}}});
        let rewritten = nullable_alternatives_as_types(&written);
        assert_eq!(
            rewritten["properties"]["father"],
            json!({"type": ["object", "null"], "properties": {"n": {"type": "string"}}, "default": null})
        );
    }
}
