//! `kwire-lab apply -f FILE` / `delete -f FILE`: YAML or JSON manifests (several documents,
//! `kind: List` expanded) sent to the lab's API stand-in, for every kind it serves.

use serde::Deserialize as _;
use serde_json::Value;

use crate::apiserver::crd;
use crate::apiserver::resources::{self, ResourceKind};

/// One object of a manifest with where it lives in the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestObject {
    pub object: Value,
    pub kind: &'static ResourceKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ManifestObject {
    /// `/api/v1/namespaces/NS/pods` (the collection this object is created in).
    pub fn collection_path(&self) -> String {
        let prefix = if self.kind.group.is_empty() {
            format!("/api/{}", self.kind.version)
        } else {
            format!("/apis/{}/{}", self.kind.group, self.kind.version)
        };
        match &self.namespace {
            Some(ns) => format!("{prefix}/namespaces/{ns}/{}", self.kind.plural),
            None => format!("{prefix}/{}", self.kind.plural),
        }
    }

    pub fn path(&self) -> String {
        format!("{}/{}", self.collection_path(), self.name)
    }

    /// `pod/default/web`, as `apply` reports it.
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.kind.singular, self.name),
            None => format!("{}/{}", self.kind.singular, self.name),
        }
    }
}

/// Parses every document of `text` (YAML, which JSON also is) into objects.
pub fn parse(text: &str, source: &str) -> Result<Vec<ManifestObject>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .map_err(|e| format!("{source}: document {} is not valid YAML/JSON: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        collect(v, source, &mut out)?;
    }
    Ok(out)
}

fn collect(v: Value, source: &str, out: &mut Vec<ManifestObject>) -> Result<(), String> {
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    if kind == "List" || (kind.ends_with("List") && v["items"].is_array()) {
        for item in v["items"].as_array().cloned().unwrap_or_default() {
            collect(item, source, out)?;
        }
        return Ok(());
    }
    let api_version = v["apiVersion"].as_str().unwrap_or("");
    // Custom kinds: this process learns them from deploy/'s CRDs and from CRDs in the manifest
    // (the stand-in, another process, serves them only once it stores their CRD).
    static DEPLOY_CRDS: std::sync::Once = std::sync::Once::new();
    DEPLOY_CRDS.call_once(|| {
        for crd in crate::manifests::api_objects()
            .unwrap_or_default()
            .iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
        {
            let _ = crd::register(crd);
        }
    });
    if kind == "CustomResourceDefinition" && crate::apiserver::validate::validate_crd(&v).is_empty()
    {
        let _ = crd::register(&v);
    }
    let rk = resources::by_kind(api_version, &kind).ok_or_else(|| {
        format!(
            "{source}: kind {kind:?} of apiVersion {api_version:?} is not served by the lab's API stand-in"
        )
    })?;
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{source}: a {kind} has no metadata.name"))?
        .to_string();
    let namespace = rk.namespaced.then(|| {
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    });
    out.push(ManifestObject {
        object: v,
        kind: rk,
        namespace,
        name,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_json_and_lists() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  containers: [{name: c, image: x, ports: [{containerPort: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {}}
---
{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}]}
"#;
        let objs = parse(text, "m.yaml").unwrap();
        assert_eq!(objs.len(), 3);
        assert_eq!(objs[0].path(), "/api/v1/namespaces/shop/pods/web");
        assert_eq!(
            objs[0].object["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert_eq!(
            objs[1].collection_path(),
            "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
        );
        assert_eq!(objs[2].path(), "/api/v1/namespaces/shop");
        assert_eq!(objs[2].display(), "namespace/shop");
        let json_only = parse(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},"spec":{}}"#,
            "p.json",
        )
        .unwrap();
        assert_eq!(json_only[0].display(), "pod/default/a");
        assert!(parse("apiVersion: v1\nkind: Frob\nmetadata: {name: a}\n", "x").is_err());
        assert!(parse("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "x").is_err());
        assert!(parse("a: [", "x").is_err());
    }
}
