//! Authorization with RBAC, as kube-apiserver's `--authorization-mode=RBAC` decides: a request
//! is allowed when some ClusterRoleBinding (anywhere) or RoleBinding (in the request's
//! namespace) binds a subject the user matches to a role with a rule covering the request's
//! verb, API group, resource (or `resource/subresource`), name, or non-resource URL. Members of
//! `system:masters` are allowed everything without RBAC, as in the real server. Nothing else
//! grants anything: no ABAC, no Node authorizer, no webhook.
//!
//! The bootstrap roles every cluster has (`cluster-admin`, `system:discovery`,
//! `system:basic-user`, `system:public-info-viewer` and their bindings) are created at start
//! ([`bootstrap_objects`]); everything else comes from what is applied (for a lab:
//! `deploy/kwire.yaml`'s ClusterRole and ClusterRoleBinding).
//!
//! Not supported: `aggregationRule` (an aggregated ClusterRole grants only its own rules, i.e.
//! less than in a real cluster).

use serde_json::{json, Value};

use super::admission::strings;
use super::authn::UserInfo;
use super::request::RequestInfo;

/// The RBAC objects in force (as stored).
#[derive(Debug, Clone, Default)]
pub struct RbacObjects {
    pub cluster_roles: Vec<Value>,
    pub cluster_role_bindings: Vec<Value>,
    pub roles: Vec<Value>,
    pub role_bindings: Vec<Value>,
}

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

fn meta<'a>(o: &'a Value, f: &str) -> &'a str {
    o.pointer(&format!("/metadata/{f}"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn verb_matches(rule: &Value, verb: &str) -> bool {
    strings(&rule["verbs"])
        .iter()
        .any(|v| *v == "*" || *v == verb)
}

fn group_matches(rule: &Value, group: &str) -> bool {
    strings(&rule["apiGroups"])
        .iter()
        .any(|g| *g == "*" || *g == group)
}

fn resource_matches(rule: &Value, info: &RequestInfo) -> bool {
    let combined = info.resource_and_subresource();
    strings(&rule["resources"]).iter().any(|r| {
        *r == "*"
            || *r == combined
            || (!info.subresource.is_empty()
                && r.strip_prefix("*/") == Some(info.subresource.as_str()))
    })
}

fn name_matches(rule: &Value, name: &str) -> bool {
    let names = strings(&rule["resourceNames"]);
    names.is_empty() || names.contains(&name)
}

fn non_resource_matches(rule: &Value, path: &str) -> bool {
    strings(&rule["nonResourceURLs"]).iter().any(|u| {
        *u == "*"
            || *u == path
            || u.strip_suffix('*')
                .is_some_and(|prefix| path.starts_with(prefix))
    })
}

/// Whether one rule of a role covers the request.
pub fn rule_allows(rule: &Value, info: &RequestInfo) -> bool {
    if !verb_matches(rule, &info.verb) {
        return false;
    }
    if info.is_resource_request {
        group_matches(rule, &info.api_group)
            && resource_matches(rule, info)
            && name_matches(rule, &info.name)
    } else {
        non_resource_matches(rule, &info.path)
    }
}

fn subject_matches(subject: &Value, user: &UserInfo, binding_namespace: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or("");
    match subject["kind"].as_str().unwrap_or("") {
        "User" => name == user.username,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = subject["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_namespace);
            !ns.is_empty() && user.service_account_of() == Some((ns, name))
        }
        _ => false,
    }
}

fn binds(binding: &Value, user: &UserInfo, binding_namespace: &str) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| subject_matches(s, user, binding_namespace))
}

impl RbacObjects {
    fn cluster_role(&self, name: &str) -> Option<&Value> {
        self.cluster_roles.iter().find(|r| meta(r, "name") == name)
    }

    fn role(&self, namespace: &str, name: &str) -> Option<&Value> {
        self.roles
            .iter()
            .find(|r| meta(r, "name") == name && meta(r, "namespace") == namespace)
    }

    /// The rules that apply to `user` for a request in `namespace` ("" for cluster-scoped and
    /// non-resource requests), each with the binding and role that grant it.
    pub fn rules_for<'a>(
        &'a self,
        user: &UserInfo,
        namespace: &str,
    ) -> Vec<(&'a Value, String, String)> {
        let mut out = Vec::new();
        for b in &self.cluster_role_bindings {
            if b["roleRef"]["kind"].as_str() != Some("ClusterRole") || !binds(b, user, "") {
                continue;
            }
            let role_name = b["roleRef"]["name"].as_str().unwrap_or("");
            if let Some(role) = self.cluster_role(role_name) {
                for rule in role["rules"].as_array().into_iter().flatten() {
                    out.push((
                        rule,
                        format!("ClusterRoleBinding {:?}", meta(b, "name")),
                        format!("ClusterRole {role_name:?}"),
                    ));
                }
            }
        }
        if !namespace.is_empty() {
            for b in &self.role_bindings {
                if meta(b, "namespace") != namespace || !binds(b, user, namespace) {
                    continue;
                }
                let role_name = b["roleRef"]["name"].as_str().unwrap_or("");
                let role = match b["roleRef"]["kind"].as_str() {
                    Some("ClusterRole") => self.cluster_role(role_name),
                    Some("Role") => self.role(namespace, role_name),
                    _ => None,
                };
                for rule in role
                    .and_then(|r| r["rules"].as_array())
                    .into_iter()
                    .flatten()
                {
                    out.push((
                        rule,
                        format!("RoleBinding \"{namespace}/{}\"", meta(b, "name")),
                        format!("role {role_name:?}"),
                    ));
                }
            }
        }
        out
    }

    /// Decides a request.
    pub fn authorize(&self, user: &UserInfo, info: &RequestInfo) -> Decision {
        if user.is_master() {
            return Decision::Allow;
        }
        let allowed = self
            .rules_for(user, &info.namespace)
            .iter()
            .any(|(rule, _, _)| rule_allows(rule, info));
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

/// The message of the 403 the real server sends for a denied request (without the
/// `RESOURCE "NAME" is forbidden: ` prefix that the caller adds for resource requests).
pub fn forbidden_reason(user: &UserInfo, info: &RequestInfo) -> String {
    if !info.is_resource_request {
        return format!(
            "User {:?} cannot {} path {:?}",
            user.username, info.verb, info.path
        );
    }
    let scope = if info.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace {:?}", info.namespace)
    };
    format!(
        "User {:?} cannot {} resource {:?} in API group {:?} {scope}",
        user.username,
        info.verb,
        info.resource_and_subresource(),
        info.api_group
    )
}

/// The default roles and bindings of every cluster (the RBAC bootstrap policy).
pub fn bootstrap_objects() -> Vec<Value> {
    let meta = |name: &str| {
        json!({"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
               "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}})
    };
    let role = |name: &str, rules: Value| json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name), "rules": rules});
    let binding = |name: &str, role: &str, groups: &[&str]| {
        let subjects: Vec<Value> = groups
            .iter()
            .map(|g| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}))
            .collect();
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": meta(name),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": subjects})
    };
    let info_urls = json!(["/healthz", "/livez", "/readyz", "/version", "/version/"]);
    vec![
        role(
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        role(
            "system:discovery",
            json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
        ),
        role(
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}]),
        ),
        role(
            "system:public-info-viewer",
            json!([{"nonResourceURLs": info_urls, "verbs": ["get"]}]),
        ),
        binding("cluster-admin", "cluster-admin", &["system:masters"]),
        binding(
            "system:discovery",
            "system:discovery",
            &["system:authenticated"],
        ),
        binding(
            "system:basic-user",
            "system:basic-user",
            &["system:authenticated"],
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &["system:authenticated", "system:unauthenticated"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::request;
    use std::collections::HashMap;

    fn objects() -> RbacObjects {
        let mut o = RbacObjects::default();
        for b in bootstrap_objects() {
            match b["kind"].as_str().unwrap() {
                "ClusterRole" => o.cluster_roles.push(b),
                _ => o.cluster_role_bindings.push(b),
            }
        }
        o.cluster_roles.push(json!({"metadata": {"name": "kwire"}, "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        ]}));
        o.cluster_role_bindings.push(json!({"metadata": {"name": "kwire"},
            "roleRef": {"kind": "ClusterRole", "name": "kwire"},
            "subjects": [{"kind": "ServiceAccount", "name": "kwire", "namespace": "kube-system"}]}));
        o.roles.push(json!({"metadata": {"name": "reader", "namespace": "kube-system"}, "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kwire"], "verbs": ["get"]}]}));
        o.role_bindings.push(
            json!({"metadata": {"name": "reader", "namespace": "kube-system"},
            "roleRef": {"kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "kwire"}]}),
        );
        o
    }

    fn req(method: &str, path: &str) -> RequestInfo {
        request::parse(method, path, &HashMap::new())
    }

    #[test]
    fn the_bound_role_grants_exactly_its_rules() {
        let o = objects();
        let agent = UserInfo::service_account("kube-system", "kwire", Some("n1"));
        let other = UserInfo::service_account("default", "kwire", None);
        let allow = |u: &UserInfo, m: &str, p: &str| o.authorize(u, &req(m, p)) == Decision::Allow;
        assert!(allow(&agent, "GET", "/api/v1/nodes"));
        assert!(allow(&agent, "PATCH", "/api/v1/nodes/n2"));
        assert!(allow(&agent, "PATCH", "/api/v1/nodes/n1/status"));
        assert!(!allow(&agent, "PUT", "/api/v1/nodes/n1/status"));
        assert!(!allow(&agent, "DELETE", "/api/v1/nodes/n1"));
        assert!(!allow(
            &agent,
            "GET",
            "/api/v1/namespaces/kube-system/secrets"
        ));
        assert!(!allow(&other, "GET", "/api/v1/nodes"));
        // Discovery for every authenticated user; version for everyone.
        assert!(allow(&agent, "GET", "/apis/networking.k8s.io/v1"));
        assert!(!allow(&UserInfo::anonymous(), "GET", "/api"));
        assert!(allow(&UserInfo::anonymous(), "GET", "/version"));
        // A RoleBinding works in its namespace only, and resourceNames narrow it.
        assert!(allow(
            &agent,
            "GET",
            "/api/v1/namespaces/kube-system/configmaps/kwire"
        ));
        assert!(!allow(
            &agent,
            "GET",
            "/api/v1/namespaces/kube-system/configmaps/other"
        ));
        assert!(!allow(
            &agent,
            "GET",
            "/api/v1/namespaces/default/configmaps/kwire"
        ));
        assert!(allow(&UserInfo::admin(), "DELETE", "/api/v1/nodes/n1"));
    }

    #[test]
    fn wildcards_and_subresources() {
        let info = req("PATCH", "/api/v1/nodes/n1/status");
        let r = |resources: Value| json!({"apiGroups": [""], "resources": resources, "verbs": ["patch"]});
        assert!(rule_allows(&r(json!(["*"])), &info));
        assert!(rule_allows(&r(json!(["*/status"])), &info));
        assert!(!rule_allows(&r(json!(["nodes"])), &info));
        assert!(!rule_allows(&r(json!(["*/scale"])), &info));
    }

    #[test]
    fn forbidden_messages_read_like_the_real_server() {
        let agent = UserInfo::service_account("kube-system", "kwire", Some("n1"));
        assert_eq!(
            forbidden_reason(&agent, &req("GET", "/api/v1/namespaces/kube-system/secrets")),
            "User \"system:serviceaccount:kube-system:kwire\" cannot list resource \"secrets\" in API group \"\" in the namespace \"kube-system\""
        );
        assert_eq!(
            forbidden_reason(&UserInfo::anonymous(), &req("GET", "/apis")),
            "User \"system:anonymous\" cannot get path \"/apis\""
        );
    }
}
