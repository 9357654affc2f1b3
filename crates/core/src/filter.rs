//! Field filtering (data minimisation): cut a record down to the granted fields.
//!
//! Pointers follow the grant convention: object properties by name, array
//! levels transparent (`/previous_names/family_name` keeps `family_name` in
//! every item of `previous_names`). Selecting a field keeps all of it; the
//! lookup path intersects a grant's selection with the record type's
//! [`FieldSelection::shape`], so that "all of it" is what the schema declares
//! and a register's undeclared keys never pass through: in a shape, an
//! object is cut down to the keys declared for it, at every depth, whatever
//! the value (an object, an array of them, a scalar) and whichever
//! alternative of the schema it matches; only a field its schema marks
//! opaque is released whole.

use crate::grant::GrantFields;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

/// A set of selected pointers as a tree, built once and applied to many records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelection {
    root: Node,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Node {
    /// The whole value at this node is selected.
    whole: bool,
    /// Nothing of the value at this node is selected, whatever else says so:
    /// a field whose schema does not list what it holds.
    withheld: bool,
    /// A scalar value here (or a scalar item of an array here) is kept, though
    /// the node is not whole: a field selected as a whole that a shape cuts
    /// down to its declared keys. A scalar holds no key, so none can be
    /// undeclared.
    scalars: bool,
    /// Selected properties, sorted by name (unescaped) for binary search.
    children: Vec<(String, Node)>,
}

impl Node {
    fn child_mut(&mut self, name: String) -> &mut Node {
        let index = match self.children.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => i,
            Err(i) => {
                self.children.insert(i, (name, Node::default()));
                i
            }
        };
        &mut self.children[index].1
    }

    fn child(&self, name: &str) -> Option<&Node> {
        self.children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.children[i].1)
    }

    /// What both `self` and `other` select.
    fn intersect(&self, other: &Node) -> Node {
        if self.withheld || other.withheld {
            return Node::withheld();
        }
        match (self.whole, other.whole) {
            (true, true) => Node {
                whole: true,
                ..Node::default()
            },
            (true, false) => other.clone(),
            (false, true) => self.clone(),
            (false, false) => Node {
                whole: false,
                withheld: false,
                scalars: self.scalars && other.scalars,
                children: self
                    .children
                    .iter()
                    .filter_map(|(name, mine)| other.child(name).map(|theirs| (name.clone(), mine.intersect(theirs))))
                    .collect(),
            },
        }
    }

    fn withheld() -> Node {
        Node {
            withheld: true,
            ..Node::default()
        }
    }

    /// Marks every node but the withheld ones as keeping scalars: the
    /// declared fields of a shape.
    fn keep_scalars(&mut self) {
        if self.withheld {
            return;
        }
        self.scalars = true;
        for (_, child) in &mut self.children {
            child.keep_scalars();
        }
    }

    /// True when [`Node::apply`] keeps something of `value`: objects and
    /// arrays are kept (possibly emptied), scalars only where selected.
    fn keeps(&self, value: &Value) -> bool {
        !self.withheld && (self.whole || self.scalars || value.is_object() || value.is_array())
    }

    /// True when `value` is kept as it is: the whole value, or a scalar
    /// (which holds no key) where scalars are kept.
    fn writes_as_is(&self, value: &Value) -> bool {
        self.whole || (self.scalars && !matches!(value, Value::Object(_) | Value::Array(_)))
    }

    /// True when an array item is kept: objects and arrays (possibly
    /// emptied), scalars only where selected.
    fn keeps_item(&self, item: &Value) -> bool {
        self.scalars || item.is_object() || item.is_array()
    }

    /// The selected part of `value`, or `None` when nothing of it is selected.
    fn apply(&self, value: &Value) -> Option<Value> {
        if self.withheld {
            return None;
        }
        if self.whole {
            return Some(value.clone());
        }
        match value {
            Value::Object(map) => {
                let mut out = Map::with_capacity(self.children.len().min(map.len()));
                for (key, sub) in map {
                    if let Some(kept) = self.child(key).and_then(|node| node.apply(sub)) {
                        out.insert(key.clone(), kept);
                    }
                }
                Some(Value::Object(out))
            }
            // Array levels are transparent: the same selection applies to every item;
            // scalar items hold none of the selected properties.
            Value::Array(items) => Some(Value::Array(
                items
                    .iter()
                    .filter(|item| self.keeps_item(item))
                    .filter_map(|item| self.apply(item))
                    .collect(),
            )),
            scalar if self.scalars => Some(scalar.clone()),
            _ => None,
        }
    }
}

/// The part of a value a node selects, serialized as [`Node::apply`] would build
/// it, so the lookup path writes the released record without copying it first.
struct Selected<'a> {
    node: &'a Node,
    value: &'a Value,
}

impl Serialize for Selected<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.node.writes_as_is(self.value) {
            return self.value.serialize(serializer);
        }
        match self.value {
            Value::Object(map) => {
                let mut out = serializer.serialize_map(None)?;
                for (key, sub) in map {
                    let Some(node) = self.node.child(key) else {
                        continue;
                    };
                    // Written straight, not through a `Selected`: a declared
                    // scalar is what most fields hold.
                    if node.writes_as_is(sub) {
                        out.serialize_key(key)?;
                        out.serialize_value(sub)?;
                    } else if node.keeps(sub) {
                        out.serialize_key(key)?;
                        out.serialize_value(&Selected { node, value: sub })?;
                    }
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(None)?;
                for item in items.iter().filter(|item| self.node.keeps_item(item)) {
                    out.serialize_element(&Selected {
                        node: self.node,
                        value: item,
                    })?;
                }
                out.end()
            }
            // Only a root scalar gets here; `apply` makes it an empty object.
            _ => serializer.serialize_map(Some(0))?.end(),
        }
    }
}

/// Undoes RFC 6901 escaping of one segment.
fn unescape(segment: &str) -> String {
    if segment.contains('~') {
        segment.replace("~1", "/").replace("~0", "~")
    } else {
        segment.to_owned()
    }
}

impl FieldSelection {
    /// Builds the tree of `pointers`; pointers not starting with `/` are ignored,
    /// the empty pointer selects everything.
    pub fn new(pointers: &[String]) -> Self {
        let mut root = Node::default();
        for pointer in pointers {
            if pointer.is_empty() {
                root.whole = true;
                continue;
            }
            let Some(rest) = pointer.strip_prefix('/') else {
                continue;
            };
            let mut node = &mut root;
            for segment in rest.split('/') {
                node = node.child_mut(unescape(segment));
            }
            node.whole = true;
        }
        FieldSelection { root }
    }

    /// The shape of a record type from its declared field pointers (parents
    /// and children alike, as [`crate::schema::RecordTypeDefinition::field_pointers`]
    /// lists them): each declared field keeps its scalars, and its objects
    /// (themselves or as array items, at any depth) cut down to the declared
    /// fields below it; nothing else is kept. So no key the schema does not
    /// declare ever passes, whichever value the register sends.
    pub fn shape(declared: &[String]) -> Self {
        FieldSelection::shape_of(declared, &[], &[])
    }

    /// [`FieldSelection::shape`], with `opaque` fields kept whole (fields
    /// their schema marks opaque: what they hold is released as it is, on
    /// purpose; ignored for a field with declared fields below it) and
    /// `withheld` fields kept nowhere, not even under a granted parent:
    /// fields whose schema does not list what they hold (a recursive
    /// reference), so that whatever the register puts there never leaves.
    pub fn shape_of(declared: &[String], opaque: &[String], withheld: &[String]) -> Self {
        let mut root = Node::default();
        for pointer in declared.iter().chain(withheld) {
            let Some(rest) = pointer.strip_prefix('/') else {
                continue;
            };
            let mut node = &mut root;
            for segment in rest.split('/') {
                node = node.child_mut(unescape(segment));
            }
        }
        // A shape that declares nothing keeps nothing, not everything; a root
        // scalar keeps nothing either.
        for (_, child) in &mut root.children {
            child.keep_scalars();
        }
        for pointer in opaque {
            let Some(rest) = pointer.strip_prefix('/') else {
                continue;
            };
            let mut node = Some(&mut root);
            for segment in rest.split('/') {
                node = node.and_then(|n| {
                    let name = unescape(segment);
                    let index = n.children.binary_search_by(|(c, _)| c.as_str().cmp(&name)).ok()?;
                    Some(&mut n.children[index].1)
                });
            }
            if let Some(node) = node.filter(|n| n.children.is_empty() && !n.withheld) {
                node.whole = true;
            }
        }
        for pointer in withheld {
            let Some(rest) = pointer.strip_prefix('/') else {
                continue;
            };
            let mut node = &mut root;
            for segment in rest.split('/') {
                node = node.child_mut(unescape(segment));
            }
            *node = Node::withheld();
        }
        FieldSelection { root }
    }

    /// What both selections keep.
    pub fn intersect(&self, other: &FieldSelection) -> Self {
        FieldSelection {
            root: self.root.intersect(&other.root),
        }
    }

    /// A selection keeping everything.
    pub fn all() -> Self {
        FieldSelection {
            root: Node {
                whole: true,
                ..Node::default()
            },
        }
    }

    /// The selection of a grant's fields.
    pub fn from_fields(fields: &GrantFields) -> Self {
        match fields {
            GrantFields::All => FieldSelection::all(),
            GrantFields::Pointers(pointers) => FieldSelection::new(pointers),
        }
    }

    /// The record cut down to the selected fields (an empty object if none is present).
    pub fn apply(&self, record: &Value) -> Value {
        self.root.apply(record).unwrap_or_else(|| Value::Object(Map::new()))
    }

    /// [`FieldSelection::apply`] as compact JSON text, written straight from
    /// `record` without building the cut-down copy.
    pub fn to_json(&self, record: &Value) -> serde_json::Result<String> {
        serde_json::to_string(&Selected {
            node: &self.root,
            value: record,
        })
    }
}

/// `record` cut down to `fields`; `GrantFields::All` returns it unchanged.
pub fn filter_record(record: &Value, fields: &GrantFields) -> Value {
    match fields {
        GrantFields::All => record.clone(),
        GrantFields::Pointers(pointers) => FieldSelection::new(pointers).apply(record),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "full_name": "Nguyen Van A",
            "national_id": "001099012345",
            "birth_date": "1990-01-02",
            "father": {"full_name": "Nguyen Van B", "national_id": "001060000001"},
            "previous_names": [
                {"family_name": "Tran", "given_name": "Thi C"},
                {"family_name": "Le", "given_name": "Thi D"}
            ],
            "tags": ["x", "y"]
        })
    }

    fn pointers(ps: &[&str]) -> GrantFields {
        GrantFields::Pointers(ps.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn all_returns_the_record_unchanged() {
        assert_eq!(filter_record(&record(), &GrantFields::All), record());
    }

    #[test]
    fn top_level_fields_keep_only_those_selected() {
        let out = filter_record(&record(), &pointers(&["/birth_date", "/full_name"]));
        assert_eq!(out, json!({"full_name": "Nguyen Van A", "birth_date": "1990-01-02"}));
    }

    #[test]
    fn selecting_a_parent_keeps_the_whole_object() {
        let out = filter_record(&record(), &pointers(&["/father"]));
        assert_eq!(
            out,
            json!({"father": {"full_name": "Nguyen Van B", "national_id": "001060000001"}})
        );
    }

    #[test]
    fn selecting_a_nested_field_keeps_only_it() {
        let out = filter_record(&record(), &pointers(&["/father/full_name"]));
        assert_eq!(out, json!({"father": {"full_name": "Nguyen Van B"}}));
        assert!(!out.to_string().contains("001060000001"));
    }

    #[test]
    fn array_levels_are_transparent() {
        let out = filter_record(&record(), &pointers(&["/previous_names/family_name"]));
        assert_eq!(
            out,
            json!({"previous_names": [{"family_name": "Tran"}, {"family_name": "Le"}]})
        );
    }

    #[test]
    fn selecting_an_array_keeps_all_its_items() {
        let out = filter_record(&record(), &pointers(&["/tags"]));
        assert_eq!(out, json!({"tags": ["x", "y"]}));
    }

    #[test]
    fn ungranted_fields_never_appear() {
        let out = filter_record(
            &record(),
            &pointers(&["/full_name", "/father/full_name", "/previous_names/given_name"]),
        );
        let text = out.to_string();
        for secret in ["001099012345", "001060000001", "1990-01-02", "Tran", "\"tags\""] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
    }

    #[test]
    fn absent_and_unknown_fields_are_skipped() {
        let out = filter_record(&record(), &pointers(&["/mother/full_name", "/nope", "bad"]));
        assert_eq!(out, json!({}));
    }

    #[test]
    fn scalar_in_place_of_an_object_is_not_released() {
        let rec = json!({"father": null, "full_name": "A"});
        let out = filter_record(&rec, &pointers(&["/father/full_name"]));
        assert_eq!(out, json!({}));
    }

    #[test]
    fn escaped_pointer_segments_match_raw_keys() {
        let rec = json!({"a/b": 1, "c~d": 2, "e": 3});
        let out = filter_record(&rec, &pointers(&["/a~1b", "/c~0d"]));
        assert_eq!(out, json!({"a/b": 1, "c~d": 2}));
    }

    #[test]
    fn parent_and_child_both_selected_keep_the_parent() {
        let out = filter_record(&record(), &pointers(&["/father", "/father/full_name"]));
        assert_eq!(out["father"], record()["father"]);
    }

    #[test]
    fn a_prebuilt_selection_gives_the_same_answer() {
        let fields = vec!["/father/full_name".to_string(), "/full_name".to_string()];
        let selection = FieldSelection::new(&fields);
        assert_eq!(
            selection.apply(&record()),
            filter_record(&record(), &GrantFields::Pointers(fields))
        );
        assert_eq!(
            FieldSelection::from_fields(&GrantFields::All).apply(&record()),
            record()
        );
    }

    #[test]
    fn written_json_keeps_only_the_selected_fields_in_record_order() {
        let selection = FieldSelection::new(&[
            "/previous_names/given_name".to_string(),
            "/full_name".to_string(),
            "/tags/x".to_string(),
        ]);
        assert_eq!(
            selection.to_json(&record()).unwrap(),
            r#"{"full_name":"Nguyen Van A","previous_names":[{"given_name":"Thi C"},{"given_name":"Thi D"}],"tags":[]}"#
        );
        assert_eq!(FieldSelection::new(&[]).to_json(&json!(7)).unwrap(), "{}");
        assert_eq!(FieldSelection::all().to_json(&json!(7)).unwrap(), "7");
    }

    /// JSON values a few levels deep, keys drawn from a small set so that
    /// pointers built from the same set often hit.
    fn value() -> impl Strategy<Value = Value> {
        let key = prop::sample::select(vec!["a", "b", "c", "d~1", "e/f"]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            "[a-z\\\\\"é]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..5)
                    .prop_map(|kvs| Value::Object(kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    fn pointer_set() -> impl Strategy<Value = Vec<String>> {
        let segment = prop::sample::select(vec!["a", "b", "c", "d~01", "e~1f", "zz"]);
        let pointer = prop_oneof![
            1 => Just(String::new()),
            12 => prop::collection::vec(segment, 1..4).prop_map(|s| format!("/{}", s.join("/"))),
        ];
        prop::collection::vec(pointer, 0..5)
    }

    fn declared() -> FieldSelection {
        FieldSelection::shape(
            &[
                "/birth_date",
                "/father",
                "/father/full_name",
                "/full_name",
                "/previous_names",
                "/previous_names/family_name",
                "/tags",
            ]
            .map(String::from),
        )
    }

    #[test]
    fn a_shape_keeps_declared_leaves_whole_and_drops_undeclared_keys() {
        let mut rec = record();
        rec["father"]["smuggled"] = json!("001060000009");
        rec["undeclared"] = json!({"national_id": "001060000010"});
        assert_eq!(
            declared().apply(&rec),
            json!({
                "full_name": "Nguyen Van A",
                "birth_date": "1990-01-02",
                "father": {"full_name": "Nguyen Van B"},
                "previous_names": [{"family_name": "Tran"}, {"family_name": "Le"}],
                "tags": ["x", "y"]
            })
        );
        assert_eq!(FieldSelection::shape(&[]).apply(&rec), json!({}));
    }

    #[test]
    fn a_parent_grant_within_the_shape_keeps_only_declared_children() {
        let mut rec = record();
        rec["father"]["smuggled"] = json!("001060000009");
        let grant = FieldSelection::new(&["/father".to_string()]);
        let released = grant.intersect(&declared()).to_json(&rec).unwrap();
        assert_eq!(released, r#"{"father":{"full_name":"Nguyen Van B"}}"#);
        let everything = FieldSelection::all().intersect(&declared());
        assert_eq!(everything, declared(), "a grant of every field is the shape");
    }

    /// A field whose schema does not list what it holds (a recursive
    /// reference) releases nothing, even under a granted parent, and does
    /// not make its parent a leaf released whole.
    #[test]
    fn a_withheld_field_releases_nothing_whatever_the_grant() {
        let shape = FieldSelection::shape_of(
            &["/father", "/father/full_name", "/mother"].map(String::from),
            &[],
            &["/father/father", "/mother/mother"].map(String::from),
        );
        let rec = json!({
            "father": {"full_name": "B", "father": {"national_id": "001060000001"}, "extra": 1},
            "mother": {"mother": {"national_id": "001060000002"}, "national_id": "001060000003"}
        });
        assert_eq!(shape.apply(&rec), json!({"father": {"full_name": "B"}, "mother": {}}));
        for grant in [
            vec!["/father", "/mother"],
            vec!["/father/father", "/mother/mother"],
            vec!["/father/father/national_id"],
            vec![""],
        ] {
            let grant = FieldSelection::new(&grant.iter().map(|p| p.to_string()).collect::<Vec<_>>());
            let released = grant.intersect(&shape).to_json(&rec).unwrap();
            assert!(!released.contains("00106000000"), "{released}");
            assert_eq!(
                serde_json::from_str::<Value>(&released).unwrap(),
                grant.intersect(&shape).apply(&rec)
            );
        }
        assert_eq!(
            FieldSelection::shape_of(&["/a".to_string()], &[], &[]),
            FieldSelection::shape(&["/a".to_string()])
        );
    }

    /// A declared field keeps its scalars whatever it is declared as, and
    /// cuts every object in it (itself, or array items at any depth) down to
    /// the fields declared below it: nothing when none is. Only an opaque
    /// field is kept whole.
    #[test]
    fn a_shape_cuts_every_object_to_its_declared_fields() {
        let shape = FieldSelection::shape_of(
            &["/a", "/b", "/b/x", "/meta"].map(String::from),
            &["/meta", "/b"].map(String::from),
            &[],
        );
        let rec = json!({
            "a": [1, "s", null, {"national_id": "001060000001"}, [{"k": 1}, 2]],
            "b": {"x": {"y": 1}, "national_id": "001060000002"},
            "meta": {"any": {"thing": true}}
        });
        let kept = json!({"a": [1, "s", null, {}, [{}, 2]], "b": {"x": {}}, "meta": {"any": {"thing": true}}});
        assert_eq!(shape.apply(&rec), kept, "/b declares /b/x: not opaque");
        assert_eq!(shape.to_json(&rec).unwrap(), kept.to_string());
        let scalars = json!({"a": "plain", "b": null, "meta": 3});
        assert_eq!(shape.apply(&scalars), scalars);
        // A grant of a field below keeps only what is below: not the field's scalar.
        let grant = FieldSelection::new(&["/b/x".to_string()]).intersect(&shape);
        assert_eq!(grant.apply(&scalars), json!({}));
        assert_eq!(grant.to_json(&scalars).unwrap(), "{}");
    }

    /// A grant's selection or a shape, with some fields opaque or withheld.
    fn selection() -> impl Strategy<Value = FieldSelection> {
        prop_oneof![
            pointer_set().prop_map(|p| FieldSelection::new(&p)),
            (pointer_set(), pointer_set(), pointer_set()).prop_map(|(declared, opaque, withheld)| {
                let declared: Vec<String> = declared.into_iter().chain(opaque.iter().cloned()).collect();
                FieldSelection::shape_of(&declared, &opaque, &withheld)
            }),
        ]
    }

    proptest! {
        /// Intersecting is filtering twice, in either order: no field leaves
        /// that either side would have cut.
        #[test]
        fn an_intersection_is_both_filters(record in value(), a in selection(), b in selection()) {
            let both = a.intersect(&b).apply(&record);
            prop_assert_eq!(&both, &a.apply(&b.apply(&record)));
            prop_assert_eq!(&both, &b.apply(&a.apply(&record)));
        }

        /// A shape without opaque fields releases no key it does not declare,
        /// at any depth, whatever the record holds.
        #[test]
        fn a_shape_releases_only_declared_keys(record in value(), declared in pointer_set(), withheld in pointer_set()) {
            let shape = FieldSelection::shape_of(&declared, &[], &withheld);
            // Withheld fields are declared fields (with nothing listed inside).
            let declared: Vec<Vec<String>> = declared
                .iter()
                .chain(&withheld)
                .filter_map(|p| p.strip_prefix('/'))
                .flat_map(|p| {
                    // A field declares its parents too.
                    let segments: Vec<String> = p.split('/').map(unescape).collect();
                    (1..=segments.len()).map(move |n| segments[..n].to_vec())
                })
                .collect();
            fn check(value: &Value, path: &mut Vec<String>, declared: &[Vec<String>]) -> Result<(), String> {
                match value {
                    Value::Object(map) => map.iter().try_for_each(|(key, sub)| {
                        path.push(key.clone());
                        if !declared.contains(path) {
                            return Err(path.join("/"));
                        }
                        let below = check(sub, path, declared);
                        path.pop();
                        below
                    }),
                    Value::Array(items) => items.iter().try_for_each(|item| check(item, path, declared)),
                    _ => Ok(()),
                }
            }
            let released = shape.apply(&record);
            prop_assert!(check(&released, &mut Vec::new(), &declared).is_ok(), "{:?}", check(&released, &mut Vec::new(), &declared));
        }

        /// The lookup path writes `to_json`; auditors and tests reason about
        /// `apply`. They must never release different data.
        #[test]
        fn written_json_is_the_applied_selection(record in value(), selection in selection()) {
            let written = selection.to_json(&record).unwrap();
            prop_assert_eq!(&written, &serde_json::to_string(&selection.apply(&record)).unwrap());
            prop_assert_eq!(serde_json::from_str::<Value>(&written).unwrap(), selection.apply(&record));
        }
    }
}
