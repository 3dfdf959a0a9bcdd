//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): a CRD stored in a stand-in makes that
//! stand-in serve its kind like a built-in one (list, watch, get, create, patch, delete, the
//! `status` subresource when the CRD has it; resourceVersions, bookmarks, RBAC and admission as
//! for every kind), and checks each write against the version's `openAPIV3Schema`.
//!
//! What the schema check covers: `type` (object, array, string, integer, number, boolean),
//! `properties`, `required`, `additionalProperties`, `items`, `enum`, `pattern`, `minLength`,
//! `maxLength`, `minItems`, `maxItems`, `minimum`, `maximum`, `nullable`, `format` (date-time,
//! int32, int64), `x-kubernetes-list-type` set/map uniqueness, and
//! `x-kubernetes-preserve-unknown-fields`. A CRD whose schema uses anything else the real
//! server enforces (`x-kubernetes-validations` CEL rules, `oneOf`/`anyOf`/`allOf`/`not`,
//! `default`, other formats, ...) is refused with a 422 saying the stand-in would not enforce
//! it ([`super::validate::validate_crd`]): accepting it unchecked would make the lab kinder
//! than a cluster. No conversion between versions (a CRD with several versions is served
//! with each version's schema; objects are not converted). Where the real server prunes a
//! field the schema does not know, the stand-in refuses the write (422, saying so), which is
//! stricter: a client that writes fields its CRD lacks is caught here too.
//!
//! Kinds are registered per process (a `ResourceKind` must be `'static`; each distinct
//! group/version/plural is leaked once) and served per stand-in: a stand-in serves a custom
//! kind while its own store holds an established CRD for it. Deleting a CRD stops serving the
//! kind; unlike the real server, its objects are not deleted with it (they come back if the CRD
//! is created again).

use serde_json::{json, Value};

use super::error::ApiError;
use super::resources::{self, ResourceKind};
use super::store::{ListOptions, Store};
#[cfg(test)]
use super::validate::validate_crd;
use super::validate::{str_at, FieldError};

fn crd_kind() -> &'static ResourceKind {
    resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("served")
}

/// The status the real server writes once a CRD's names are accepted and it is established.
pub fn established_status(crd: &Value) -> Value {
    let now = super::strategy::rfc3339_now();
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(json!({})),
        "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array).map(|vs| {
            vs.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .map(|v| v["name"].clone()).collect::<Vec<_>>()
        }).unwrap_or_default(),
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
    })
}

/// Registers (once per process) the kinds a valid CRD defines, one per served version.
pub fn register(crd: &Value) -> Result<Vec<&'static ResourceKind>, ApiError> {
    let kind = str_at(crd, "/spec/names/kind");
    let singular = match str_at(crd, "/spec/names/singular") {
        "" => kind.to_ascii_lowercase(),
        s => s.to_string(),
    };
    let short_names: Vec<String> = crd
        .pointer("/spec/names/shortNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for v in crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("served").and_then(Value::as_bool) != Some(false))
    {
        let custom = resources::CustomKind {
            group: str_at(crd, "/spec/group").to_string(),
            version: str_at(v, "/name").to_string(),
            plural: str_at(crd, "/spec/names/plural").to_string(),
            singular: singular.clone(),
            kind: kind.to_string(),
            namespaced: str_at(crd, "/spec/scope") == "Namespaced",
            short_names: short_names.clone(),
            status_subresource: v.pointer("/subresources/status").is_some(),
        };
        out.push(
            resources::register_custom(custom).map_err(|why| ApiError::new(422, "Invalid", why))?,
        );
    }
    Ok(out)
}

/// The CRD object of a custom kind in this store, if the stand-in serves that kind.
fn crd_of(store: &Store, kind: &ResourceKind) -> Option<Value> {
    let crd = store
        .get(crd_kind(), None, &format!("{}.{}", kind.plural, kind.group))
        .ok()?;
    let served = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)?
        .iter()
        .any(|v| {
            str_at(v, "/name") == kind.version
                && v.get("served").and_then(Value::as_bool) != Some(false)
        });
    served.then_some(crd)
}

/// True when this stand-in serves `kind`: built in, or its CRD is in the store.
pub fn served(store: &Store, kind: &ResourceKind) -> bool {
    resources::is_builtin(kind) || crd_of(store, kind).is_some()
}

/// The custom kinds this stand-in serves now, for discovery.
pub fn served_kinds(store: &Store) -> Vec<&'static ResourceKind> {
    let Ok(page) = store.list(crd_kind(), None, &ListOptions::default()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for crd in &page.items {
        let group = str_at(crd, "/spec/group");
        let plural = str_at(crd, "/spec/names/plural");
        for v in crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = resources::find(group, str_at(v, "/name"), plural) {
                if crd_of(store, k).is_some() {
                    out.push(k);
                }
            }
        }
    }
    out
}

/// The schema objects of `kind` are checked against: None for a built-in kind, 404 when this
/// stand-in does not serve the custom kind. Read before a write (the check itself runs under
/// the store's lock, in [`check_schema`]).
pub fn schema_of(store: &Store, kind: &ResourceKind) -> Result<Option<Value>, ApiError> {
    if resources::is_builtin(kind) {
        return Ok(None);
    }
    let Some(crd) = crd_of(store, kind) else {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    Ok(Some(
        crd.pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|vs| vs.iter().find(|v| str_at(v, "/name") == kind.version))
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
            .cloned()
            .unwrap_or(json!({"type": "object"})),
    ))
}

/// Checks an object about to be stored against its kind's schema ([`schema_of`]); a 422 lists
/// what does not match.
pub fn check_schema(
    kind: &ResourceKind,
    schema: Option<&Value>,
    object: Option<&Value>,
) -> Result<(), ApiError> {
    let (Some(schema), Some(object)) = (schema, object) else {
        return Ok(());
    };
    let mut errors = Vec::new();
    check_root(object, schema, &mut errors);
    if errors.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        kind,
        str_at(object, "/metadata/name"),
        &errors,
    ))
}

/// The root: apiVersion, kind and metadata are the server's, the rest is the schema's.
fn check_root(object: &Value, schema: &Value, errors: &mut Vec<FieldError>) {
    let Some(map) = object.as_object() else {
        errors.push(FieldError::invalid(
            "<root>",
            &object.to_string(),
            "must be of type object",
        ));
        return;
    };
    let mut rest = map.clone();
    for k in ["apiVersion", "kind", "metadata"] {
        rest.remove(k);
    }
    check(&Value::Object(rest), schema, "", errors);
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

fn check(v: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if v.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errors.push(FieldError::invalid(at, "null", "must not be null"));
        }
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(v);
        let fits = actual == t || (t == "number" && actual == "integer");
        if !fits {
            errors.push(FieldError::invalid(
                at,
                &short(v),
                &format!("{at} in body must be of type {t}: {actual:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(short).collect();
            errors.push(FieldError {
                reason: "FieldValueNotSupported",
                field: at.to_string(),
                message: format!(
                    "Unsupported value: {}: supported values: {}",
                    short(v),
                    list.join(", ")
                ),
            });
        }
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !map.contains_key(r) {
                    errors.push(FieldError::required(&join(path, r)));
                }
            }
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                == Some(true);
            for (k, child) in map {
                let sub = join(path, k);
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check(child, s, &sub, errors);
                } else if let Some(add) = schema.get("additionalProperties") {
                    match add {
                        Value::Bool(true) => {}
                        Value::Bool(false) => errors.push(FieldError::forbidden(
                            &sub,
                            "additional properties are not allowed",
                        )),
                        s => check(child, s, &sub, errors),
                    }
                } else if !preserve {
                    errors.push(FieldError::forbidden(
                        &sub,
                        "field not declared in the schema (the real API server silently prunes it; the kwire-lab stand-in refuses it)",
                    ));
                }
            }
        }
        Value::Array(items) => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let identity = |item: &Value| -> Value {
                match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
                    Some("map") => Value::Array(keys.iter().map(|k| item[*k].clone()).collect()),
                    _ => item.clone(),
                }
            };
            if matches!(
                schema.get("x-kubernetes-list-type").and_then(Value::as_str),
                Some("map" | "set")
            ) {
                for (i, item) in items.iter().enumerate() {
                    let id = identity(item);
                    if items[..i].iter().any(|o| identity(o) == id) {
                        errors.push(FieldError {
                            reason: "FieldValueDuplicate",
                            field: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {}", short(&id)),
                        });
                    }
                }
            }
            if let Some(n) = num("maxItems").filter(|n| items.len() as f64 > *n) {
                errors.push(FieldError {
                    reason: "FieldValueTooMany",
                    field: at.to_string(),
                    message: format!("Too many: {}: must have at most {n} items", items.len()),
                });
            }
            if let Some(n) = num("minItems").filter(|n| (items.len() as f64) < *n) {
                errors.push(FieldError::invalid(
                    at,
                    &items.len().to_string(),
                    &format!("{at} in body should have at least {n} items"),
                ));
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item, s, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::String(s) => {
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && super::table::parse_rfc3339(s).is_none()
            {
                errors.push(FieldError::invalid(
                    at,
                    s,
                    &format!("{at} in body must be of type date-time"),
                ));
            }
            let len = s.chars().count() as f64;
            if let Some(n) = num("maxLength").filter(|n| len > *n) {
                errors.push(FieldError {
                    reason: "FieldValueTooLong",
                    field: at.to_string(),
                    message: format!("Too long: may not be more than {n} bytes"),
                });
            }
            if let Some(n) = num("minLength").filter(|n| len < *n) {
                errors.push(FieldError::invalid(
                    at,
                    s,
                    &format!("{at} in body should be at least {n} chars long"),
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if re.is_match(s) => {}
                    Ok(_) => errors.push(FieldError::invalid(
                        at,
                        s,
                        &format!("{at} in body should match '{p}'"),
                    )),
                    Err(_) => errors.push(FieldError::invalid(
                        at,
                        s,
                        &format!("the schema's pattern '{p}' does not compile"),
                    )),
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if schema.get("format").and_then(Value::as_str) == Some("int32")
                && n.as_i64().and_then(|i| i32::try_from(i).ok()).is_none()
            {
                errors.push(FieldError::invalid(
                    at,
                    &n.to_string(),
                    &format!("{at} in body must be of type int32"),
                ));
            }
            if let Some(m) = num("maximum").filter(|m| x > *m) {
                errors.push(FieldError::invalid(
                    at,
                    &n.to_string(),
                    &format!("{at} in body should be less than or equal to {m}"),
                ));
            }
            if let Some(m) = num("minimum").filter(|m| x < *m) {
                errors.push(FieldError::invalid(
                    at,
                    &n.to_string(),
                    &format!("{at} in body should be greater than or equal to {m}"),
                ));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["publicKey"], "properties": {
                "publicKey": {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$"},
                "allowedIPs": {"type": "array", "minItems": 1, "items": {"type": "string", "maxLength": 43}},
                "persistentKeepalive": {"type": "integer", "minimum": 0, "maximum": 65535},
                "mode": {"type": "string", "enum": ["a", "b"]},
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }})
    }

    fn errors(o: Value) -> Vec<String> {
        let mut e = Vec::new();
        check_root(&o, &schema(), &mut e);
        e.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn the_schema_checks_types_bounds_patterns_and_unknown_fields() {
        let key = "A".repeat(43) + "=";
        assert!(errors(
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"publicKey": key, "allowedIPs": ["10.0.0.1/32"], "persistentKeepalive": 25},
            "status": {"anything": [1]}})
        )
        .is_empty());
        let e = errors(
            json!({"spec": {"publicKey": "short", "allowedIPs": "10.0.0.1/32",
            "persistentKeepalive": 70000, "mode": "c", "extra": 1}, "other": true}),
        );
        let all = e.join("\n");
        for want in [
            "spec.publicKey",
            "spec.allowedIPs in body must be of type array",
            "less than or equal to 65535",
            "Unsupported value: \"c\"",
            "spec.extra",
            "other: Forbidden",
        ] {
            assert!(all.contains(want), "{want:?} missing from:\n{all}");
        }
        assert!(errors(json!({"spec": {}}))
            .join("")
            .contains("spec.publicKey: Required"));
        let dup = json!({"type": "object", "properties": {"c": {"type": "array",
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
            "items": {"type": "object", "properties": {"type": {"type": "string"},
                "at": {"type": "string", "format": "date-time"}}}}}});
        let mut e = Vec::new();
        check_root(
            &json!({"c": [{"type": "A", "at": "2026-01-01T00:00:00Z"}, {"type": "A", "at": "yesterday"}]}),
            &dup,
            &mut e,
        );
        let all: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].starts_with("c[1]: Duplicate value"), "{all:?}");
        assert!(
            all[1].contains("c[1].at") && all[1].contains("date-time"),
            "{all:?}"
        );
        assert!(
            errors(json!({"spec": {"publicKey": key, "allowedIPs": []}}))
                .join("")
                .contains("at least 1 items")
        );
    }

    #[test]
    fn a_crd_needs_its_name_group_scope_and_one_storage_version() {
        let good = json!({"metadata": {"name": "peers.kwire.dev"}, "spec": {"group": "kwire.dev",
            "names": {"plural": "peers", "kind": "Peer"}, "scope": "Cluster",
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
        assert_eq!(validate_crd(&good), vec![]);
        let mut bad = good.clone();
        bad["metadata"]["name"] = json!("peer.kwire.dev");
        bad["spec"]["scope"] = json!("Global");
        bad["spec"]["versions"][0]["storage"] = json!(false);
        let e: Vec<String> = validate_crd(&bad).iter().map(|e| e.field.clone()).collect();
        assert_eq!(e, ["metadata.name", "spec.scope", "spec.versions"]);
        // What the stand-in would not enforce is refused, saying so.
        let mut cel = good.clone();
        cel["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = json!({"type": "object",
            "properties": {"spec": {"type": "string", "x-kubernetes-validations": [{"rule": "true"}], "format": "uri"}}});
        let e = validate_crd(&cel);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].field.ends_with("properties.spec.format"), "{e:?}");
        assert!(
            e[1].message
                .contains("not enforced by the kwire-lab API stand-in"),
            "{e:?}"
        );
    }
}
