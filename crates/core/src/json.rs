//! JSON parsing that refuses an object naming a key twice.
//!
//! RFC 8259 leaves such an object's meaning to each reader: serde_json keeps
//! the last value, other parsers the first or both. A record or query that
//! reads one way to the broker, which checks it, and another to whoever
//! reads it next is refused instead of guessed at.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Why [`parse_unique_keys`] refused a text.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not one JSON value (serde_json's message names line and column,
    /// never the content).
    #[error("{0}")]
    Malformed(serde_json::Error),
    /// An object, at any depth, names the same key twice.
    #[error("an object names the same key twice (line {line}, column {column})")]
    RepeatedKey {
        /// Line of the second occurrence, from 1.
        line: usize,
        /// Column just past the second occurrence's key, from 1.
        column: usize,
    },
}

/// What the visitor says of a repeated key; told apart from syntax errors by
/// its category, as nothing else building a [`Value`] fails with `Data`.
const REPEATED_KEY: &str = "an object names the same key twice";

/// `text` as one JSON value, in one pass (the same work as
/// `serde_json::from_str::<Value>`), refused if any object in it names a
/// key twice. Keys are compared as decoded (`"a"` and `"\u0061"` are one key).
pub fn parse_unique_keys(text: &str) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = UniqueKeys.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => JsonError::RepeatedKey {
            line: e.line(),
            column: e.column(),
        },
        _ => JsonError::Malformed(e),
    })
}

/// Builds a [`Value`] as serde_json's own visitor does, but fails on a
/// repeated key instead of keeping the last value.
#[derive(Clone, Copy)]
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    #[inline]
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    #[inline]
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    #[inline]
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    #[inline]
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text holds no NaN or infinity; as serde_json does, should one come.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    #[inline]
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    #[inline]
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    #[inline]
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    #[inline]
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    #[inline]
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    #[inline]
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    #[inline]
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // The position serde_json adds to the error is just past the key.
            let value = map.next_value_seed(self)?;
            // One lookup, as serde_json's own insert; the value it replaced
            // is dropped with the error.
            if object.insert(key, value).is_some() {
                return Err(de::Error::custom(REPEATED_KEY));
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn repeated(text: &str) -> bool {
        matches!(parse_unique_keys(text), Err(JsonError::RepeatedKey { .. }))
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        assert!(repeated(r#"{"a": 1, "a": 2}"#));
        assert!(repeated(r#"{"a": 1, "b": {"c": 1, "c": 1}}"#));
        assert!(repeated(r#"{"list": [{"x": 1}, {"y": [{"z": 1, "z": 2}]}]}"#));
        assert!(repeated(r#"[{"k": null, "k": null}]"#));
        // The same key once decoded.
        assert!(repeated(r#"{"a": 1, "\u0061": 2}"#));
        let Err(JsonError::RepeatedKey { line, .. }) = parse_unique_keys("{\n\"a\": 1,\n\"a\": 2}") else {
            panic!("refused");
        };
        assert_eq!(line, 3);
    }

    #[test]
    fn anything_else_reads_as_serde_json_reads_it() {
        for text in [
            r#"{"a": 1, "b": {"a": 1}, "c": [{"a": 1}, {"a": 2}]}"#,
            r#"{"n": -1, "u": 18446744073709551615, "f": 1.5e300, "s": "Tr\u1ea7n", "z": null, "t": true}"#,
            r#"[1, [2, [3]], {}, []]"#,
            r#""just a string""#,
            "  {\"k\": \"v\"}  ",
        ] {
            let ours = parse_unique_keys(text).unwrap();
            let theirs: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
            // Keys keep their order.
            assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
        }
    }

    #[test]
    fn malformed_text_is_told_apart_from_a_repeated_key() {
        for text in [r#"{"a": 1"#, r#"{"a": 1} trailing"#, "", "{\"a\": 01}"] {
            assert!(
                matches!(parse_unique_keys(text), Err(JsonError::Malformed(_))),
                "{text}"
            );
        }
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(matches!(parse_unique_keys(&deep), Err(JsonError::Malformed(_))));
    }
}
