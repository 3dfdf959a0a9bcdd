//! Patches the API server accepts: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! strategic merge patch (Kubernetes: lists with a merge key merge element by element).
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

/// How a list merges in a strategic merge patch: the `patchStrategy`/`patchMergeKey` tags of
/// the Go types. A list without one is replaced whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// Elements are objects merged by this field.
    ByKey(&'static str),
    /// A list of scalars: the patch's values are added (`$deleteFromPrimitiveList` removes).
    Primitives,
}

/// The lists with a merge strategy, by path from the object's root (list elements skipped),
/// for the kinds the stand-in serves (core/v1 types.go tags).
const LIST_STRATEGIES: &[(&str, ListStrategy)] = &[
    ("metadata.finalizers", ListStrategy::Primitives),
    ("metadata.ownerReferences", ListStrategy::ByKey("uid")),
    ("spec.podCIDRs", ListStrategy::Primitives),
    ("status.conditions", ListStrategy::ByKey("type")),
    ("status.addresses", ListStrategy::ByKey("type")),
    ("status.volumesAttached", ListStrategy::ByKey("name")),
    ("status.podIPs", ListStrategy::ByKey("ip")),
    ("status.hostIPs", ListStrategy::ByKey("ip")),
    ("spec.containers", ListStrategy::ByKey("name")),
    ("spec.initContainers", ListStrategy::ByKey("name")),
    ("spec.ephemeralContainers", ListStrategy::ByKey("name")),
    (
        "spec.containers.ports",
        ListStrategy::ByKey("containerPort"),
    ),
    ("spec.containers.env", ListStrategy::ByKey("name")),
    (
        "spec.containers.volumeMounts",
        ListStrategy::ByKey("mountPath"),
    ),
    (
        "spec.containers.volumeDevices",
        ListStrategy::ByKey("devicePath"),
    ),
    (
        "spec.initContainers.ports",
        ListStrategy::ByKey("containerPort"),
    ),
    ("spec.initContainers.env", ListStrategy::ByKey("name")),
    (
        "spec.initContainers.volumeMounts",
        ListStrategy::ByKey("mountPath"),
    ),
    ("spec.volumes", ListStrategy::ByKey("name")),
    ("spec.imagePullSecrets", ListStrategy::ByKey("name")),
    ("spec.hostAliases", ListStrategy::ByKey("ip")),
    ("spec.ports", ListStrategy::ByKey("port")),
];

fn list_strategy(path: &[String]) -> Option<ListStrategy> {
    let p = path.join(".");
    LIST_STRATEGIES
        .iter()
        .find(|(q, _)| *q == p)
        .map(|(_, s)| *s)
}

/// Why a strategic merge patch could not be applied (422, as the API server answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StrategicPatchError(pub String);

/// Applies a strategic merge patch to `target` in place: maps merge as in a merge patch
/// (`null` deletes); a list with a merge strategy merges element by element (by its key, or as
/// a set of scalars); any other list is replaced. Directives: `$patch: replace|delete|merge`
/// (on a map, or as a list element), `$deleteFromPrimitiveList/<field>`,
/// `$setElementOrder/<field>`, `$retainKeys`. Another `$` key is refused, as the API server
/// refuses it.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), StrategicPatchError> {
    if !patch.is_object() {
        return Err(StrategicPatchError(
            "a strategic merge patch must be a JSON object".into(),
        ));
    }
    merge_map(target, patch, &mut Vec::new())
}

fn merge_map(
    target: &mut Value,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<(), StrategicPatchError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = p.clone();
            m.remove("$patch");
            *target = Value::Object(m);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(StrategicPatchError(format!(
                "unknown patch type {other:?} in $patch (replace, delete or merge)"
            )))
        }
    }
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let mut retain: Option<Vec<String>> = None;
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, value) in p {
        if key == "$patch" {
            continue;
        }
        if key == "$retainKeys" {
            retain = Some(
                value
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(str::to_string))
                            .collect()
                    })
                    .ok_or_else(|| {
                        StrategicPatchError("$retainKeys must be a list of field names".into())
                    })?,
            );
            continue;
        }
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            let order = value
                .as_array()
                .cloned()
                .ok_or_else(|| StrategicPatchError(format!("{key} must be a list")))?;
            orders.push((field.to_string(), order));
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = value.as_array().cloned().unwrap_or_default();
            let map = target.as_object_mut().expect("made an object above");
            if let Some(Value::Array(items)) = map.get_mut(field) {
                items.retain(|v| !gone.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            return Err(StrategicPatchError(format!(
                "unknown directive {key:?} in the strategic merge patch"
            )));
        }
        let map = target.as_object_mut().expect("made an object above");
        if value.is_null() {
            map.remove(key);
            continue;
        }
        path.push(key.clone());
        let slot = map.entry(key.clone()).or_insert(Value::Null);
        let r = match (list_strategy(path), value) {
            (Some(strategy), Value::Array(items)) => merge_list(slot, items, strategy, path),
            (None, Value::Object(_)) => merge_map(slot, value, path),
            _ => {
                *slot = value.clone();
                Ok(())
            }
        };
        path.pop();
        r?;
        if map.get(key).is_some_and(Value::is_null)
            && !value.is_null()
            && value.get("$patch").is_some()
        {
            map.remove(key);
        }
    }
    let map = target.as_object_mut().expect("made an object above");
    for (field, order) in orders {
        if let Some(Value::Array(items)) = map.get_mut(&field) {
            let key = list_strategy(&[path.clone(), vec![field.clone()]].concat());
            let rank = |v: &Value| {
                order.iter().position(|o| match key {
                    Some(ListStrategy::ByKey(k)) => o.get(k).is_some() && o.get(k) == v.get(k),
                    _ => o == v,
                })
            };
            // Elements named in the order first, in that order; the rest after, as they were.
            items.sort_by_key(|v| rank(v).unwrap_or(usize::MAX));
        }
    }
    if let Some(keep) = retain {
        map.retain(|k, _| keep.contains(k));
    }
    Ok(())
}

fn merge_list(
    slot: &mut Value,
    patch: &[Value],
    strategy: ListStrategy,
    path: &mut Vec<String>,
) -> Result<(), StrategicPatchError> {
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *slot = Value::Array(
            patch
                .iter()
                .filter(|e| e.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let items = slot.as_array_mut().expect("made an array above");
    match strategy {
        ListStrategy::Primitives => {
            for v in patch {
                if !items.contains(v) {
                    items.push(v.clone());
                }
            }
        }
        ListStrategy::ByKey(key) => {
            for e in patch {
                let id = e.get(key).ok_or_else(|| {
                    StrategicPatchError(format!(
                        "an element of {} has no merge key {key:?}",
                        path.join(".")
                    ))
                })?;
                let at = items.iter().position(|i| i.get(key) == Some(id));
                if e.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(i) = at {
                        items.remove(i);
                    }
                    continue;
                }
                match at {
                    Some(i) => merge_map(&mut items[i], e, path)?,
                    None => {
                        let mut fresh = Value::Null;
                        merge_map(&mut fresh, e, path)?;
                        items.push(fresh);
                    }
                }
            }
        }
    }
    Ok(())
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

    fn smp(target: Value, patch: Value) -> Value {
        let mut t = target;
        strategic_merge_patch(&mut t, &patch).unwrap();
        t
    }

    /// A Node's conditions merge by type: a patch with one condition sets that one and leaves
    /// the kubelet's alone (a JSON merge patch would replace the whole list).
    #[test]
    fn strategic_merge_by_type_keeps_the_other_conditions() {
        let node = json!({"metadata":{"name":"n1"},"status":{"conditions":[
            {"type":"Ready","status":"True","lastHeartbeatTime":"t2"},
            {"type":"KwireReady","status":"False","reason":"NotSynced"}]}});
        let got = smp(
            node,
            json!({"status":{"conditions":[{"type":"KwireReady","status":"True","reason":"DataPlaneReady"}]}}),
        );
        assert_eq!(
            got["status"]["conditions"],
            json!([{"type":"Ready","status":"True","lastHeartbeatTime":"t2"},
                   {"type":"KwireReady","status":"True","reason":"DataPlaneReady"}])
        );
        // A new type is appended; a field set to null goes.
        let got = smp(
            got,
            json!({"status":{"conditions":[{"type":"NetworkUnavailable","status":"False"},{"type":"Ready","lastHeartbeatTime":null}]}}),
        );
        assert_eq!(
            got["status"]["conditions"][0],
            json!({"type":"Ready","status":"True"})
        );
        assert_eq!(got["status"]["conditions"][2]["type"], "NetworkUnavailable");
    }

    #[test]
    fn strategic_merge_directives_and_lists_without_strategy() {
        let pod = json!({"metadata":{"finalizers":["a"],"labels":{"x":"1","y":"2"}},
            "spec":{"containers":[{"name":"c","image":"i","ports":[{"containerPort":80,"name":"http"}]}],
                    "tolerations":[{"key":"k"}]}});
        let got = smp(
            pod.clone(),
            json!({"metadata":{"finalizers":["b"]},
                   "spec":{"containers":[{"name":"c","ports":[{"containerPort":81}]}],"tolerations":[{"key":"z"}]}}),
        );
        assert_eq!(
            got["metadata"]["finalizers"],
            json!(["a", "b"]),
            "primitives merge"
        );
        assert_eq!(
            got["spec"]["containers"][0]["ports"],
            json!([{"containerPort":80,"name":"http"},{"containerPort":81}])
        );
        assert_eq!(got["spec"]["containers"][0]["image"], "i");
        assert_eq!(
            got["spec"]["tolerations"],
            json!([{"key":"z"}]),
            "no strategy: replaced"
        );
        // $patch: delete of a keyed element, replace of a list and a map, primitive removal.
        let got = smp(
            got,
            json!({"metadata":{"$deleteFromPrimitiveList/finalizers":["a"],"labels":{"$patch":"replace","z":"3"}},
                   "spec":{"containers":[{"name":"c","ports":[{"containerPort":80,"$patch":"delete"}]}]}}),
        );
        assert_eq!(got["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(got["metadata"]["labels"], json!({"z":"3"}));
        assert_eq!(
            got["spec"]["containers"][0]["ports"],
            json!([{"containerPort":81}])
        );
        let got = smp(
            got,
            json!({"spec":{"containers":[{"$patch":"replace"},{"name":"d","image":"j"}]}}),
        );
        assert_eq!(got["spec"]["containers"], json!([{"name":"d","image":"j"}]));
        let mut t = pod;
        assert!(strategic_merge_patch(&mut t, &json!({"$frob": 1})).is_err());
        assert!(
            strategic_merge_patch(&mut t, &json!({"spec":{"containers":[{"image":"nokey"}]}}))
                .is_err()
        );
        assert!(strategic_merge_patch(&mut t, &json!([1])).is_err());
    }
}
