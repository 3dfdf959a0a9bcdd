//! What a request asks for, in the terms the authorizer and admission use: the real server's
//! `RequestInfo` (verb, API group, resource, subresource, namespace, name), derived from the
//! method and path alone, before the stand-in knows whether it serves that resource (so an
//! unserved resource is still authorized first, and a forbidden request learns nothing).

use std::collections::HashMap;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// False for `/version`, `/healthz`, `/api`, discovery and OpenAPI documents.
    pub is_resource_request: bool,
    /// For non-resource requests: the path.
    pub path: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`; for
    /// non-resource requests the lower-case HTTP method (`get`, `post`, ...).
    pub verb: String,
    pub api_group: String,
    pub api_version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

impl RequestInfo {
    /// `nodes`, `nodes/status`.
    pub fn resource_and_subresource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

/// Parses `method` + `path` + query the way kube-apiserver's `RequestInfoFactory` does.
pub fn parse(method: &str, path: &str, query: &HashMap<String, String>) -> RequestInfo {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let non_resource = || RequestInfo {
        is_resource_request: false,
        path: path.to_string(),
        verb: method.to_ascii_lowercase(),
        api_group: String::new(),
        api_version: String::new(),
        namespace: String::new(),
        resource: String::new(),
        subresource: String::new(),
        name: String::new(),
    };
    let (group, version, mut rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => ("", version, rest),
        ["apis", group, version, rest @ ..] if !rest.is_empty() => (group, version, rest),
        _ => return non_resource(),
    };
    let mut info = RequestInfo {
        is_resource_request: true,
        path: path.to_string(),
        verb: String::new(),
        api_group: group.to_string(),
        api_version: version.to_string(),
        namespace: String::new(),
        resource: String::new(),
        subresource: String::new(),
        name: String::new(),
    };
    // `namespaces/NS/RESOURCE...`; `namespaces/NS` alone is the namespace object itself.
    if rest.first() == Some(&"namespaces") {
        if rest.len() >= 3 {
            info.namespace = rest[1].to_string();
            rest = &rest[2..];
        } else if rest.len() == 2 {
            info.name = rest[1].to_string();
            info.resource = "namespaces".into();
            rest = &[];
        }
    }
    if !rest.is_empty() {
        info.resource = rest[0].to_string();
        if let Some(n) = rest.get(1) {
            info.name = n.to_string();
        }
        if rest.len() >= 3 {
            info.subresource = rest[2..].join("/");
        }
    }
    let collection = info.name.is_empty();
    info.verb = match method {
        "GET" | "HEAD" if flag(query, "watch") => "watch".into(),
        "GET" | "HEAD" if collection => "list".into(),
        "GET" | "HEAD" => "get".into(),
        "POST" => "create".into(),
        "PUT" => "update".into(),
        "PATCH" => "patch".into(),
        "DELETE" if collection => "deletecollection".into(),
        "DELETE" => "delete".into(),
        other => other.to_ascii_lowercase(),
    };
    // A list or watch of one object by `fieldSelector=metadata.name=X` is authorized as that
    // object (resourceNames rules apply), as in the real server.
    if collection && (info.verb == "list" || info.verb == "watch") {
        if let Some(sel) = query.get("fieldSelector") {
            if let Some(name) = sel
                .strip_prefix("metadata.name=")
                .or_else(|| sel.strip_prefix("metadata.name=="))
                .filter(|n| !n.contains(','))
            {
                info.name = name.to_string();
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn paths_become_verbs_and_resources() {
        let none = q(&[]);
        let r = parse("PATCH", "/api/v1/nodes/n1/status", &none);
        assert_eq!(
            (
                r.verb.as_str(),
                r.resource.as_str(),
                r.subresource.as_str(),
                r.name.as_str()
            ),
            ("patch", "nodes", "status", "n1")
        );
        assert_eq!(r.resource_and_subresource(), "nodes/status");
        let r = parse("GET", "/api/v1/namespaces/kube-system/secrets", &none);
        assert_eq!(
            (r.verb.as_str(), r.namespace.as_str(), r.resource.as_str()),
            ("list", "kube-system", "secrets")
        );
        let r = parse(
            "GET",
            "/apis/networking.k8s.io/v1/networkpolicies",
            &q(&[("watch", "true")]),
        );
        assert_eq!(
            (r.verb.as_str(), r.api_group.as_str()),
            ("watch", "networking.k8s.io")
        );
        let r = parse("GET", "/api/v1/namespaces/default", &none);
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.name.as_str()),
            ("get", "namespaces", "default")
        );
        let r = parse(
            "GET",
            "/api/v1/nodes",
            &q(&[("fieldSelector", "metadata.name=n1")]),
        );
        assert_eq!((r.verb.as_str(), r.name.as_str()), ("list", "n1"));
        let r = parse("DELETE", "/api/v1/namespaces/default/pods", &none);
        assert_eq!(r.verb, "deletecollection");
        let r = parse("GET", "/apis/discovery.k8s.io/v1", &none);
        assert!(!r.is_resource_request);
        assert_eq!(r.verb, "get");
        assert!(!parse("GET", "/version", &none).is_resource_request);
    }
}
