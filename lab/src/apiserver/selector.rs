//! Label selectors and field selectors, parsed from the `labelSelector` and `fieldSelector`
//! query parameters with the syntax of `k8s.io/apimachinery/pkg/labels` and `.../fields`.

use serde_json::Value;

use super::names::{is_valid_label_key, is_valid_label_value};

/// A selector the client sent that we cannot parse; the server answers 400 BadRequest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement {requirement:?}: {reason}")]
pub struct SelectorError {
    pub requirement: String,
    pub reason: String,
}

fn err(requirement: &str, reason: &str) -> SelectorError {
    SelectorError {
        requirement: requirement.to_string(),
        reason: reason.to_string(),
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelRequirement {
    /// `key=value`, `key==value`, and `key in (a,b)`.
    In(String, Vec<String>),
    /// `key!=value` and `key notin (a,b)`; matches objects without the label too.
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    DoesNotExist(String),
    /// `key>N` / `key<N`: the label's value parsed as an integer.
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed label selector: all requirements must hold (an empty selector matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_label_requirement(part)?);
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Matches against an object's `metadata.labels`.
    pub fn matches_object(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|m| m.get(k)).and_then(Value::as_str);
        self.requirements.iter().all(|r| match r {
            LabelRequirement::In(k, vals) => get(k).is_some_and(|v| vals.iter().any(|x| x == v)),
            LabelRequirement::NotIn(k, vals) => get(k).is_none_or(|v| !vals.iter().any(|x| x == v)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
            LabelRequirement::GreaterThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            LabelRequirement::LessThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_requirement(part: &str) -> Result<LabelRequirement, SelectorError> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(part, key)?;
        return Ok(LabelRequirement::DoesNotExist(key.to_string()));
    }
    // Set-based: `key in (..)` / `key notin (..)`.
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let rest = words[1].trim_start();
        for (op, negate) in [("notin", true), ("in", false)] {
            if let Some(list) = rest.strip_prefix(op) {
                let list = list.trim();
                let inner = list
                    .strip_prefix('(')
                    .and_then(|l| l.strip_suffix(')'))
                    .ok_or_else(|| err(part, "expected a parenthesised list of values"))?;
                let key = words[0];
                check_key(part, key)?;
                let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                for v in &values {
                    check_value(part, v)?;
                }
                return Ok(if negate {
                    LabelRequirement::NotIn(key.to_string(), values)
                } else {
                    LabelRequirement::In(key.to_string(), values)
                });
            }
        }
    }
    for (op, kind) in [("==", 0), ("!=", 1), ("=", 0), (">", 2), ("<", 3)] {
        if let Some((key, value)) = part.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            check_key(part, key)?;
            return match kind {
                0 | 1 => {
                    check_value(part, value)?;
                    let vals = vec![value.to_string()];
                    Ok(if kind == 0 {
                        LabelRequirement::In(key.to_string(), vals)
                    } else {
                        LabelRequirement::NotIn(key.to_string(), vals)
                    })
                }
                _ => {
                    let n: i64 = value.parse().map_err(|_| {
                        err(
                            part,
                            "for 'gt', 'lt' operators, the value must be an integer",
                        )
                    })?;
                    Ok(if kind == 2 {
                        LabelRequirement::GreaterThan(key.to_string(), n)
                    } else {
                        LabelRequirement::LessThan(key.to_string(), n)
                    })
                }
            };
        }
    }
    check_key(part, part)?;
    Ok(LabelRequirement::Exists(part.to_string()))
}

fn check_key(part: &str, key: &str) -> Result<(), SelectorError> {
    if is_valid_label_key(key) {
        Ok(())
    } else {
        Err(err(part, &format!("invalid label key {key:?}")))
    }
}

fn check_value(part: &str, value: &str) -> Result<(), SelectorError> {
    if is_valid_label_value(value) {
        Ok(())
    } else {
        Err(err(part, &format!("invalid label value {value:?}")))
    }
}

/// One requirement of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// The field's dotted path, as Kubernetes spells it (`spec.nodeName`).
    pub field: String,
    pub value: String,
    pub negate: bool,
}

/// A parsed field selector (`=`, `==`, `!=`, comma-separated; all must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(err(
                    part,
                    "expected field=value, field==value or field!=value",
                ));
            };
            requirements.push(FieldRequirement {
                field: field.trim().to_string(),
                value: value.trim().to_string(),
                negate,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The first field this selector uses that is not in `supported`, if any: the real API server
    /// rejects such a selector with 400 ("field label not supported").
    pub fn unsupported_field<'a>(&'a self, supported: &[&str]) -> Option<&'a str> {
        self.requirements
            .iter()
            .map(|r| r.field.as_str())
            .find(|f| !supported.contains(f))
    }

    /// Matches against the object's fields; a missing field reads as "" (an unscheduled pod's
    /// `spec.nodeName`), as in Kubernetes' field sets.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let actual = field_value(object, &r.field);
            (actual == r.value) != r.negate
        })
    }
}

/// Reads a dotted field path as a string ("" when absent; numbers and booleans as JSON prints them).
pub fn field_value(object: &Value, field: &str) -> String {
    let mut node = object;
    for part in field.split('.') {
        match node.get(part) {
            Some(v) => node = v,
            None => return String::new(),
        }
    }
    match node {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns1", "labels": labels}, "spec": {"nodeName": "node-a"}})
    }

    fn sel(text: &str) -> LabelSelector {
        LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn equality_and_inequality() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        assert!(sel("app=web").matches_object(&o));
        assert!(sel("app==web").matches_object(&o));
        assert!(sel("app = web , tier=front").matches_object(&o));
        assert!(!sel("app=db").matches_object(&o));
        assert!(sel("app!=db").matches_object(&o));
        assert!(!sel("app!=web").matches_object(&o));
        // `!=` matches objects that lack the label, as in Kubernetes.
        assert!(sel("missing!=x").matches_object(&o));
    }

    #[test]
    fn set_based_and_existence() {
        let o = obj(json!({"app": "web", "env": "prod"}));
        assert!(sel("app in (web,db)").matches_object(&o));
        assert!(sel("app in (db, web)").matches_object(&o));
        assert!(!sel("app in (db)").matches_object(&o));
        assert!(sel("env notin (dev,test)").matches_object(&o));
        assert!(!sel("env notin (prod)").matches_object(&o));
        assert!(sel("absent notin (prod)").matches_object(&o));
        assert!(sel("app").matches_object(&o));
        assert!(!sel("absent").matches_object(&o));
        assert!(sel("!absent").matches_object(&o));
        assert!(!sel("!app").matches_object(&o));
        assert!(sel("app in (web,db),env,!absent,kwire.dev/role notin (x)").matches_object(&o));
        assert!(sel("").matches_object(&o));
        assert!(sel("").matches_object(&json!({"metadata": {}})));
        assert!(!sel("app").matches_object(&json!({"metadata": {}})));
    }

    #[test]
    fn numeric_comparisons() {
        let o = obj(json!({"n": "5"}));
        assert!(sel("n>3").matches_object(&o));
        assert!(!sel("n<3").matches_object(&o));
        assert!(LabelSelector::parse("n>x").is_err());
    }

    #[test]
    fn rejects_malformed_selectors() {
        for bad in [
            "app in web",
            "-bad=1",
            "app=in valid",
            "app in (a b)",
            "!",
            "a=b=c",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
        assert_eq!(
            sel("kwire.dev/node=a").requirements,
            vec![LabelRequirement::In(
                "kwire.dev/node".into(),
                vec!["a".into()]
            )]
        );
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let f = |t: &str| FieldSelector::parse(t).unwrap();
        assert!(f("spec.nodeName=node-a").matches_object(&o));
        assert!(f("spec.nodeName==node-a,metadata.namespace=ns1").matches_object(&o));
        assert!(!f("spec.nodeName=node-b").matches_object(&o));
        assert!(f("spec.nodeName!=node-b").matches_object(&o));
        assert!(f("metadata.name=p").matches_object(&o));
        assert!(!f("metadata.name!=p").matches_object(&o));
        // An unscheduled pod has spec.nodeName "".
        assert!(f("spec.nodeName=").matches_object(&json!({"spec": {}})));
        assert!(f("").is_empty());
        assert!(FieldSelector::parse("spec.nodeName").is_err());
        assert_eq!(
            f("spec.hostname=x").unsupported_field(&["metadata.name", "spec.nodeName"]),
            Some("spec.hostname")
        );
        assert_eq!(
            f("spec.nodeName=x").unsupported_field(&["metadata.name", "spec.nodeName"]),
            None
        );
    }
}
