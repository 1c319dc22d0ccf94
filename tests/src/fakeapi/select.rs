//! Field and label selectors with the apiserver's syntax, and JSON merge patch (RFC 7386).

use serde_json::{Map, Value};

use super::errors::ApiError;

/// One `field=value` / `field!=value` term.
#[derive(Debug, Clone)]
pub(crate) struct FieldTerm {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed `fieldSelector` (terms are ANDed).
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    /// Parses `a=b,c!=d,e==f`; `supported` lists the fields the resource can be selected by.
    pub fn parse(text: &str, supported: &[&str]) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = raw.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = raw.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = raw.split_once('=') {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{raw}'"
                )));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(ApiError::bad_request(format!("field label not supported: {field}")));
            }
            terms.push(FieldTerm { field: field.to_owned(), value: value.trim().to_owned(), equal });
        }
        Ok(FieldSelector(terms))
    }

    /// Whether `obj` satisfies every term; a missing field reads as the empty string.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|t| (field_value(obj, &t.field) == t.value) == t.equal)
    }

    /// The value an `=`/`==` term requires of `field`, if there is one.
    pub fn required(&self, field: &str) -> Option<&str> {
        self.0.iter().find(|t| t.equal && t.field == field).map(|t| t.value.as_str())
    }
}

/// The string value of a dotted field path (`spec.nodeName`), as field selectors see it.
pub(crate) fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[derive(Debug, Clone)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

/// A parsed `labelSelector` (requirements are ANDed).
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelSelector(Vec<(String, LabelOp)>);

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, `k>1`, `k<1`.
    pub fn parse(text: &str) -> Result<LabelSelector, ApiError> {
        let bad = |why: &str| ApiError::bad_request(format!("unable to parse requirement: {why}"));
        let mut reqs = Vec::new();
        for raw in split_top_level(text) {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let set = |rest: &str| -> Result<Vec<String>, ApiError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(&format!("expected a parenthesised set in '{raw}'")))?;
                Ok(inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect())
            };
            let (key, op) = if let Some(k) = raw.strip_prefix('!') {
                (k.trim(), LabelOp::DoesNotExist)
            } else if let Some((k, v)) = raw.split_once("!=") {
                (k.trim(), LabelOp::NotEq(v.trim().to_owned()))
            } else if let Some((k, v)) = raw.split_once("==") {
                (k.trim(), LabelOp::Eq(v.trim().to_owned()))
            } else if let Some((k, v)) = raw.split_once('=') {
                (k.trim(), LabelOp::Eq(v.trim().to_owned()))
            } else if let Some((k, rest)) = raw.split_once(" notin ") {
                (k.trim(), LabelOp::NotIn(set(rest)?))
            } else if let Some((k, rest)) = raw.split_once(" in ") {
                (k.trim(), LabelOp::In(set(rest)?))
            } else if let Some((k, v)) = raw.split_once('>') {
                (
                    k.trim(),
                    LabelOp::Gt(v.trim().parse().map_err(|_| bad(&format!("'{v}' is not an integer")))?),
                )
            } else if let Some((k, v)) = raw.split_once('<') {
                (
                    k.trim(),
                    LabelOp::Lt(v.trim().parse().map_err(|_| bad(&format!("'{v}' is not an integer")))?),
                )
            } else {
                (raw, LabelOp::Exists)
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(bad(&format!("invalid label key in '{raw}'")));
            }
            reqs.push((key.to_owned(), op));
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => get(k) == Some(v.as_str()),
            LabelOp::NotEq(v) => get(k) != Some(v.as_str()),
            LabelOp::In(vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelOp::NotIn(vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelOp::Exists => get(k).is_some(),
            LabelOp::DoesNotExist => get(k).is_none(),
            LabelOp::Gt(n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            LabelOp::Lt(n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// Applies an RFC 7386 merge patch: objects merge key by key, `null` deletes, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
    }

    #[test]
    fn label_selectors_cover_every_operator() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front", "n": "5"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("missing notin (a)", true),
            ("n>4,n<6", true),
            ("app in (web),tier notin (back)", true),
            ("", true),
        ] {
            assert_eq!(LabelSelector::parse(sel).expect(sel).matches(&obj), want, "{sel}");
        }
        assert!(LabelSelector::parse("app in web").is_err());
    }

    #[test]
    fn field_selectors_read_missing_fields_as_empty() {
        let f = ["metadata.name", "spec.nodeName"];
        let obj = json!({"metadata": {"name": "p"}, "spec": {}});
        assert!(FieldSelector::parse("spec.nodeName=", &f).expect("parse").matches(&obj));
        assert!(FieldSelector::parse("metadata.name==p,spec.nodeName!=n1", &f).expect("parse").matches(&obj));
        assert!(!FieldSelector::parse("metadata.name!=p", &f).expect("parse").matches(&obj));
        let err = FieldSelector::parse("spec.other=x", &f).expect_err("unsupported");
        assert_eq!(err.code, 400);
    }
}
