//! Patches the API server accepts: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).
//!
//! Pure functions on `serde_json::Value`; the HTTP layer picks one by `Content-Type`.

use serde_json::Value;

/// Why a JSON patch could not be applied; the server answers 422 Unprocessable Entity, as the
/// Kubernetes API server does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("the patch is not a JSON array of operations")]
    NotAnArray,
    #[error("operation {index}: {message}")]
    BadOperation { index: usize, message: String },
    #[error("operation {index}: path {path:?} does not exist in the object")]
    MissingPath { index: usize, path: String },
    #[error("operation {index}: test failed: the value at {path:?} is not the one given")]
    TestFailed { index: usize, path: String },
}

impl PatchError {
    /// True when a `test` operation failed (the object is fine, the client's belief is not).
    pub fn is_test_failure(&self) -> bool {
        matches!(self, PatchError::TestFailed { .. })
    }
}

/// Applies a JSON merge patch (RFC 7386) to `target` in place.
///
/// `null` in the patch removes a member; an object merges recursively; anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let target_map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else {
            merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Applies a JSON patch (RFC 6902) and returns the patched document; `target` is not changed
/// when any operation fails (the operations apply atomically, RFC 6902 section 5).
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or(PatchError::NotAnArray)?;
    let mut doc = target.clone();
    for (index, op) in ops.iter().enumerate() {
        apply_op(&mut doc, op, index)?;
    }
    Ok(doc)
}

fn apply_op(doc: &mut Value, op: &Value, index: usize) -> Result<(), PatchError> {
    let bad = |message: &str| PatchError::BadOperation {
        index,
        message: message.to_string(),
    };
    let name = op
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing \"op\""))?;
    let path = op
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing \"path\""))?;
    let pointer = parse_pointer(path).map_err(|m| bad(&m))?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| bad("missing \"value\""))
    };
    let from = || -> Result<Vec<String>, PatchError> {
        let from = op
            .get("from")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing \"from\""))?;
        parse_pointer(from).map_err(|m| bad(&m))
    };
    let missing = |p: &str| PatchError::MissingPath {
        index,
        path: p.to_string(),
    };
    match name {
        "add" => add(doc, &pointer, value()?).map_err(|_| missing(path)),
        "remove" => remove(doc, &pointer).map(drop).ok_or_else(|| missing(path)),
        "replace" => {
            let slot = lookup_mut(doc, &pointer).ok_or_else(|| missing(path))?;
            *slot = value()?;
            Ok(())
        }
        "test" => {
            let found = lookup(doc, &pointer).ok_or_else(|| missing(path))?;
            if *found == value()? {
                Ok(())
            } else {
                Err(PatchError::TestFailed {
                    index,
                    path: path.to_string(),
                })
            }
        }
        "move" => {
            let from_ptr = from()?;
            if pointer.len() > from_ptr.len() && pointer[..from_ptr.len()] == from_ptr[..] {
                return Err(bad("\"from\" is a proper prefix of \"path\": cannot move a value into its own child"));
            }
            let moved =
                remove(doc, &from_ptr).ok_or_else(|| missing(op["from"].as_str().unwrap_or("")))?;
            add(doc, &pointer, moved).map_err(|_| missing(path))
        }
        "copy" => {
            let from_ptr = from()?;
            let copied = lookup(doc, &from_ptr)
                .cloned()
                .ok_or_else(|| missing(op["from"].as_str().unwrap_or("")))?;
            add(doc, &pointer, copied).map_err(|_| missing(path))
        }
        other => Err(bad(&format!("unknown op {other:?}"))),
    }
}

/// Splits a JSON pointer (RFC 6901) into unescaped reference tokens.
fn parse_pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!(
            "path {path:?} is not a JSON pointer (must start with '/')"
        ));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Option<usize> {
    if token == "-" {
        return allow_end.then_some(len);
    }
    if token.is_empty()
        || (token.len() > 1 && token.starts_with('0'))
        || !token.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let i: usize = token.parse().ok()?;
    let limit = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    (i <= limit && (allow_end || len > 0)).then_some(i)
}

fn lookup<'a>(doc: &'a Value, pointer: &[String]) -> Option<&'a Value> {
    pointer.iter().try_fold(doc, |node, token| match node {
        Value::Object(map) => map.get(token),
        Value::Array(items) => items.get(array_index(token, items.len(), false)?),
        _ => None,
    })
}

fn lookup_mut<'a>(doc: &'a mut Value, pointer: &[String]) -> Option<&'a mut Value> {
    pointer.iter().try_fold(doc, |node, token| match node {
        Value::Object(map) => map.get_mut(token),
        Value::Array(items) => {
            let i = array_index(token, items.len(), false)?;
            items.get_mut(i)
        }
        _ => None,
    })
}

fn add(doc: &mut Value, pointer: &[String], value: Value) -> Result<(), ()> {
    let Some((last, parent_ptr)) = pointer.split_last() else {
        *doc = value;
        return Ok(());
    };
    match lookup_mut(doc, parent_ptr).ok_or(())? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let i = array_index(last, items.len(), true).ok_or(())?;
            items.insert(i, value);
            Ok(())
        }
        _ => Err(()),
    }
}

fn remove(doc: &mut Value, pointer: &[String]) -> Option<Value> {
    let (last, parent_ptr) = pointer.split_last()?;
    match lookup_mut(doc, parent_ptr)? {
        Value::Object(map) => map.remove(last),
        Value::Array(items) => {
            let i = array_index(last, items.len(), false)?;
            Some(items.remove(i))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(target: Value, patch: Value) -> Value {
        let mut t = target;
        merge_patch(&mut t, &patch);
        t
    }

    /// The examples of RFC 7386 appendix A.
    #[test]
    fn merge_patch_rfc7386_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(
                merged(target.clone(), patch.clone()),
                want,
                "target {target} patch {patch}"
            );
        }
    }

    #[test]
    fn merge_patch_sets_node_condition_style_status() {
        let node = json!({"metadata":{"name":"n1","labels":{"a":"1"}},"status":{"conditions":[{"type":"Ready"}]}});
        let got = merged(
            node,
            json!({"metadata":{"labels":{"b":"2"}},"status":{"conditions":[{"type":"NetworkUnavailable","status":"False"}]}}),
        );
        assert_eq!(got["metadata"]["labels"], json!({"a":"1","b":"2"}));
        assert_eq!(
            got["status"]["conditions"],
            json!([{"type":"NetworkUnavailable","status":"False"}])
        );
    }

    #[test]
    fn json_patch_add_replace_remove() {
        let doc = json!({"foo":"bar","list":[1,2]});
        let out = json_patch(
            &doc,
            &json!([
                {"op":"add","path":"/baz","value":"qux"},
                {"op":"add","path":"/list/1","value":9},
                {"op":"add","path":"/list/-","value":3},
                {"op":"replace","path":"/foo","value":"boo"},
                {"op":"remove","path":"/list/0"}
            ]),
        )
        .unwrap();
        assert_eq!(out, json!({"foo":"boo","baz":"qux","list":[9,2,3]}));
    }

    #[test]
    fn json_patch_move_copy_test_and_escapes() {
        let doc = json!({"metadata":{"annotations":{"kwire.dev/public-key":"k"}},"a":{"b":1}});
        let out = json_patch(
            &doc,
            &json!([
                {"op":"test","path":"/metadata/annotations/kwire.dev~1public-key","value":"k"},
                {"op":"copy","from":"/a","path":"/c"},
                {"op":"move","from":"/a/b","path":"/d"},
                {"op":"add","path":"/e~0f","value":true}
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata":{"annotations":{"kwire.dev/public-key":"k"}},"a":{},"c":{"b":1},"d":1,"e~f":true})
        );
    }

    #[test]
    fn json_patch_failures_are_atomic_and_typed() {
        let doc = json!({"a":1,"l":[0]});
        let err = json_patch(
            &doc,
            &json!([{"op":"replace","path":"/a","value":2},{"op":"test","path":"/a","value":1}]),
        )
        .unwrap_err();
        assert!(err.is_test_failure());
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"remove","path":"/nope"}])),
            Err(PatchError::MissingPath { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"replace","path":"/nope","value":1}])),
            Err(PatchError::MissingPath { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"add","path":"/l/5","value":1}])),
            Err(PatchError::MissingPath { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"add","path":"/l/01","value":1}])),
            Err(PatchError::MissingPath { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"frob","path":"/a"}])),
            Err(PatchError::BadOperation { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op":"move","from":"/l","path":"/l/0"}])),
            Err(PatchError::BadOperation { .. })
        ));
        assert!(matches!(
            json_patch(&doc, &json!({"op":"add"})),
            Err(PatchError::NotAnArray)
        ));
        assert_eq!(
            json_patch(&doc, &json!([{"op":"replace","path":"","value":5}])).unwrap(),
            json!(5)
        );
    }
}
