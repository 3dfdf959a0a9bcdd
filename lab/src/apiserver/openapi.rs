//! A minimal OpenAPI v3 document: no schemas, only each kind's PATCH path with its
//! group-version-kind and the `fieldValidation` parameter. That is what kubectl looks for to
//! decide that the server validates fields itself; without it `kubectl create` fails with
//! "failed to download openapi" (it has no v2 document to fall back to either).

use serde_json::{json, Map, Value};

use super::resources::{GROUPS, KINDS};

/// Changes whenever the documents change (clients cache by it).
const DOC_HASH: &str = "kwire-lab-1";

/// The path prefix of a group/version (`api/v1`, `apis/networking.k8s.io/v1`).
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the index of group-version documents.
pub fn index() -> Value {
    let mut paths = Map::new();
    for (group, version) in std::iter::once(("", "v1")).chain(GROUPS.iter().map(|g| (*g, "v1"))) {
        let p = gv_path(group, version);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={DOC_HASH}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` and friends, or None for a group-version we do not serve.
pub fn group_version_doc(path: &str) -> Option<Value> {
    let mut paths = Map::new();
    let mut found = false;
    for k in KINDS {
        if gv_path(k.group, k.version) != path {
            continue;
        }
        found = true;
        let item = if k.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}/{{name}}", k.plural)
        } else {
            format!("/{path}/{}/{{name}}", k.plural)
        };
        let op = json!({
            "x-kubernetes-group-version-kind": {"group": k.group, "version": k.version, "kind": k.kind},
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(item, json!({"patch": op}));
    }
    found.then(|| {
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes (kwire-lab API stand-in)", "version": "v1.33.0"},
            "paths": paths,
            "components": {"schemas": {}},
        })
    })
}
