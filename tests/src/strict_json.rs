//! A JSON parser that refuses an object holding the same key twice. `serde_json` keeps the last of
//! two equal keys without a word, and log shippers keep one or the other; the agent's JSON log
//! must never depend on which (`"fields":{"message":"container ended",…,"message":""}` did).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Parses `text` as one JSON value, failing on any object with a repeated key (at any depth).
pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = de.deserialize_any(StrictVisitor)?;
    de.end()?;
    Ok(value)
}

struct StrictVisitor;

/// One value, parsed by [`StrictVisitor`].
struct Strict(Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value without repeated object keys")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.insert(key.clone(), v).is_some() {
                return Err(de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
        }
        Ok(Value::Object(out.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse(r#"{"a":1,"b":[{"c":"x"}]}"#).expect("valid"),
            serde_json::json!({"a":1,"b":[{"c":"x"}]})
        );
        let e = parse(r#"{"fields":{"message":"container ended","message":""}}"#).expect_err("twice");
        assert!(e.to_string().contains("\"message\" appears twice"), "{e}");
        assert!(parse(r#"[{"a":1,"a":1}]"#).is_err());
        assert!(parse(r#"{"a":1} trailing"#).is_err());
        // serde_json alone takes it, keeping the last.
        let lax: Value = serde_json::from_str(r#"{"m":"a","m":""}"#).expect("lax");
        assert_eq!(lax["m"], "");
    }
}
