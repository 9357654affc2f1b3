//! Field filtering (data minimisation): cut a record down to the granted fields.
//!
//! Pointers follow the grant convention: object properties by name, array
//! levels transparent (`/previous_names/family_name` keeps `family_name` in
//! every item of `previous_names`). Selecting a field keeps all of it.

use crate::grant::GrantFields;
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

    /// The selected part of `value`, or `None` when nothing of it is selected.
    fn apply(&self, value: &Value) -> Option<Value> {
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
                    .filter(|item| item.is_object() || item.is_array())
                    .filter_map(|item| self.apply(item))
                    .collect(),
            )),
            _ => None,
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

    /// A selection keeping everything.
    pub fn all() -> Self {
        FieldSelection {
            root: Node {
                whole: true,
                children: Vec::new(),
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
}
