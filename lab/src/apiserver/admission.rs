//! Validating admission, as kube-apiserver runs ValidatingAdmissionPolicies
//! (admissionregistration.k8s.io/v1, Kubernetes 1.30+): for every create, update (PUT or
//! PATCH, after the patch is applied) and delete, each policy whose `matchConstraints` cover the
//! request and each binding of it whose `matchResources` do, with all `matchConditions` true,
//! runs its `validations`; the first one that is false denies the request (binding action
//! `Deny`) with the validation's `reason` (default `Invalid`) and its message or
//! `messageExpression`. The CEL expressions are compiled and run by the `cel` crate, with the
//! variables the real server provides: `object`, `oldObject`, `request`, `params` (null),
//! `namespaceObject` and `variables` (`spec.variables`, in order). A compile or runtime error
//! fails the request unless `failurePolicy: Ignore`.
//!
//! Not supported (the request is denied, or the policy skipped with `failurePolicy: Ignore`,
//! with an error that says so): `paramKind`/`paramRef`, the `authorizer` variable, non-empty
//! `namespaceSelector`/`objectSelector`, CEL extensions beyond the standard library (the `cel`
//! crate has no `.?` optional syntax, no Kubernetes list/regex/url libraries). `Warn` and
//! `Audit` actions are logged only.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::authn::UserInfo;
use super::error::ApiError;
use super::resources::ResourceKind;

/// What is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

/// One request to admit.
#[derive(Debug, Clone)]
pub struct AdmissionRequest<'a> {
    pub operation: Operation,
    pub kind: &'a ResourceKind,
    /// `status`, or "".
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub user: &'a UserInfo,
}

/// The ValidatingAdmissionPolicies and their bindings in force (as stored).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub policies: Vec<Value>,
    pub bindings: Vec<Value>,
}

/// The strings of a JSON array (others skipped).
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Whether a `NamedRuleWithOperations` covers the request.
fn rule_matches(rule: &Value, req: &AdmissionRequest<'_>) -> bool {
    let any = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    if !any(strings(&rule["operations"]), req.operation.as_str())
        || !any(strings(&rule["apiGroups"]), req.kind.group)
        || !any(strings(&rule["apiVersions"]), req.kind.version)
    {
        return false;
    }
    let (res, sub) = (req.kind.plural, req.subresource);
    let resource_ok = strings(&rule["resources"]).iter().any(|r| {
        if *r == "*/*" {
            return true;
        }
        match r.split_once('/') {
            None => sub.is_empty() && (*r == "*" || *r == res),
            Some((rr, rs)) => {
                !sub.is_empty() && (rr == "*" || rr == res) && (rs == "*" || rs == sub)
            }
        }
    });
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !req.kind.namespaced,
        "Namespaced" => req.kind.namespaced,
        _ => true,
    };
    let names = strings(&rule["resourceNames"]);
    resource_ok && scope_ok && (names.is_empty() || names.contains(&req.name))
}

/// Whether `matchConstraints` / `matchResources` cover the request; Err when they use what
/// the stand-in does not evaluate.
fn match_resources(m: &Value, req: &AdmissionRequest<'_>) -> Result<bool, String> {
    for selector in ["namespaceSelector", "objectSelector"] {
        if m[selector].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(format!(
                "{selector} is not supported by the kwire-lab API stand-in"
            ));
        }
    }
    let included = m["resourceRules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| rule_matches(r, req));
    let excluded = m["excludeResourceRules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| rule_matches(r, req));
    Ok(included && !excluded)
}

/// A JSON value as a CEL value (integers as `int`, as Kubernetes' CEL sees JSON numbers).
pub fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => {
            let map: HashMap<String, cel::Value> =
                o.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// Runs one expression; `Ok(value)` or the error text.
fn eval(source: &str, vars: &[(&str, &cel::Value)]) -> Result<cel::Value, String> {
    let program = cel::Program::compile(source).map_err(|e| format!("compilation failed: {e}"))?;
    if program.references().has_variable("authorizer") {
        return Err(
            "the `authorizer` variable is not supported by the kwire-lab API stand-in".into(),
        );
    }
    let mut ctx = cel::Context::default();
    for (name, value) in vars {
        ctx.add_variable_from_value(*name, (*value).clone());
    }
    program.execute(&ctx).map_err(|e| e.to_string())
}

fn eval_bool(source: &str, vars: &[(&str, &cel::Value)]) -> Result<bool, String> {
    match eval(source, vars)? {
        cel::Value::Bool(b) => Ok(b),
        other => Err(format!("expression returned {other:?}, not a bool")),
    }
}

/// HTTP code of a validation's `reason`.
fn reason_code(reason: &str) -> (u16, &'static str) {
    match reason {
        "Unauthorized" => (401, "Unauthorized"),
        "Forbidden" => (403, "Forbidden"),
        "RequestEntityTooLarge" => (413, "RequestEntityTooLarge"),
        _ => (422, "Invalid"),
    }
}

/// The outcome of one policy for one binding.
enum Verdict {
    Allowed,
    Denied {
        reason: String,
        message: String,
    },
    /// An error evaluating the policy (failurePolicy decides).
    Error(String),
}

fn request_value(req: &AdmissionRequest<'_>) -> Value {
    let user = req.user;
    json!({
        "kind": {"group": req.kind.group, "version": req.kind.version, "kind": req.kind.kind},
        "resource": {"group": req.kind.group, "version": req.kind.version, "resource": req.kind.plural},
        "subResource": req.subresource,
        "requestKind": {"group": req.kind.group, "version": req.kind.version, "kind": req.kind.kind},
        "requestResource": {"group": req.kind.group, "version": req.kind.version, "resource": req.kind.plural},
        "requestSubResource": req.subresource,
        "name": req.name,
        "namespace": req.namespace,
        "operation": req.operation.as_str(),
        "userInfo": {"username": user.username, "uid": user.uid, "groups": user.groups, "extra": user.extra},
        "dryRun": false,
        "options": {},
    })
}

fn run_policy(
    policy: &Value,
    req: &AdmissionRequest<'_>,
    object: &cel::Value,
    old: &cel::Value,
    namespace_object: &cel::Value,
) -> Verdict {
    let spec = &policy["spec"];
    if !spec["paramKind"].is_null() {
        return Verdict::Error("paramKind is not supported by the kwire-lab API stand-in".into());
    }
    let request = to_cel(&request_value(req));
    let null = cel::Value::Null;
    let mut base: Vec<(&str, &cel::Value)> = vec![
        ("object", object),
        ("oldObject", old),
        ("request", &request),
        ("params", &null),
        ("namespaceObject", namespace_object),
    ];
    for cond in spec["matchConditions"].as_array().into_iter().flatten() {
        let expr = cond["expression"].as_str().unwrap_or("");
        match eval_bool(expr, &base) {
            Ok(true) => {}
            Ok(false) => return Verdict::Allowed,
            Err(e) => {
                return Verdict::Error(format!(
                    "matchCondition {:?} resulted in error: {e}",
                    cond["name"].as_str().unwrap_or("")
                ))
            }
        }
    }
    let mut variables: HashMap<String, cel::Value> = HashMap::new();
    for var in spec["variables"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or("");
        let so_far = cel::Value::from(variables.clone());
        let mut vars = base.clone();
        vars.push(("variables", &so_far));
        match eval(var["expression"].as_str().unwrap_or(""), &vars) {
            Ok(v) => {
                variables.insert(name.to_string(), v);
            }
            Err(e) => return Verdict::Error(format!("variable {name:?} resulted in error: {e}")),
        }
    }
    let variables = cel::Value::from(variables);
    base.push(("variables", &variables));
    for v in spec["validations"].as_array().into_iter().flatten() {
        let expr = v["expression"].as_str().unwrap_or("");
        match eval_bool(expr, &base) {
            Ok(true) => {}
            Ok(false) => {
                let message = v["messageExpression"]
                    .as_str()
                    .and_then(|m| match eval(m, &base) {
                        Ok(cel::Value::String(s)) => Some(s.to_string()),
                        _ => None,
                    })
                    .or_else(|| v["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("failed expression: {expr}"));
                return Verdict::Denied {
                    reason: v["reason"].as_str().unwrap_or("Invalid").to_string(),
                    message,
                };
            }
            Err(e) => return Verdict::Error(format!("expression '{expr}' resulted in error: {e}")),
        }
    }
    Verdict::Allowed
}

impl Policies {
    /// Admits or denies a request; `object` is the new object (None for a delete), `old` the
    /// stored one (None for a create).
    pub fn validate(
        &self,
        req: &AdmissionRequest<'_>,
        object: Option<&Value>,
        old: Option<&Value>,
        namespace_object: Option<&Value>,
    ) -> Result<(), ApiError> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let as_cel = |v: Option<&Value>| v.map_or(cel::Value::Null, to_cel);
        let (object, old, ns) = (as_cel(object), as_cel(old), as_cel(namespace_object));
        for policy in &self.policies {
            let policy_name = policy
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let fail_closed = policy
                .pointer("/spec/failurePolicy")
                .and_then(Value::as_str)
                != Some("Ignore");
            let deny = |binding: &str, code: (u16, &'static str), message: String| {
                let verb = if code.1 == "Invalid" {
                    "is invalid"
                } else {
                    "is forbidden"
                };
                let target = if req.name.is_empty() {
                    req.kind.qualified_plural()
                } else {
                    format!("{} \"{}\"", req.kind.qualified_plural(), req.name)
                };
                let mut e = ApiError::new(
                    code.0,
                    code.1,
                    format!("{target} {verb}: ValidatingAdmissionPolicy '{policy_name}' with binding '{binding}' denied request: {message}"),
                );
                e.details = Some(
                    json!({"name": req.name, "kind": req.kind.plural, "group": req.kind.group}),
                );
                e
            };
            match match_resources(&policy["spec"]["matchConstraints"], req) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) if fail_closed => return Err(deny("", (403, "Forbidden"), e)),
                Err(_) => continue,
            }
            for binding in self.bindings.iter().filter(|b| {
                b.pointer("/spec/policyName").and_then(Value::as_str) == Some(policy_name)
            }) {
                let binding_name = binding
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let spec = &binding["spec"];
                if !spec["paramRef"].is_null() {
                    if fail_closed {
                        return Err(deny(
                            binding_name,
                            (403, "Forbidden"),
                            "paramRef is not supported by the kwire-lab API stand-in".into(),
                        ));
                    }
                    continue;
                }
                if spec["matchResources"].is_object() {
                    match match_resources(&spec["matchResources"], req) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) if fail_closed => {
                            return Err(deny(binding_name, (403, "Forbidden"), e))
                        }
                        Err(_) => continue,
                    }
                }
                let enforce = strings(&spec["validationActions"]).contains(&"Deny");
                match run_policy(policy, req, &object, &old, &ns) {
                    Verdict::Allowed => {}
                    Verdict::Denied { reason, message } => {
                        if enforce {
                            return Err(deny(binding_name, reason_code(&reason), message));
                        }
                        tracing::warn!(policy = policy_name, binding = binding_name, %message, "ValidatingAdmissionPolicy would deny (Warn/Audit)");
                    }
                    Verdict::Error(e) => {
                        if fail_closed && enforce {
                            return Err(deny(binding_name, (403, "Forbidden"), e));
                        }
                        tracing::warn!(policy = policy_name, binding = binding_name, error = %e, "ValidatingAdmissionPolicy failed; ignored (failurePolicy Ignore)");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    fn policies() -> Policies {
        Policies {
            policies: vec![json!({"metadata": {"name": "p"}, "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes", "nodes/status"]}]},
                "matchConditions": [{"name": "agent", "expression": "request.userInfo.username == 'system:serviceaccount:kube-system:kwire'"}],
                "variables": [{"name": "node", "expression": "request.userInfo.extra['authentication.kubernetes.io/node-name'][0]"}],
                "validations": [
                    {"expression": "request.name == variables.node", "messageExpression": "'only ' + variables.node", "reason": "Forbidden"},
                    {"expression": "object.spec == oldObject.spec", "message": "spec is not yours"},
                ],
            }})],
            bindings: vec![
                json!({"metadata": {"name": "b"}, "spec": {"policyName": "p", "validationActions": ["Deny"]}}),
            ],
        }
    }

    #[test]
    fn a_policy_denies_with_its_message_and_reason() {
        let p = policies();
        let nodes = find("", "v1", "nodes").unwrap();
        let agent = UserInfo::service_account("kube-system", "kwire", Some("n1"));
        let req = |name, user, sub| AdmissionRequest {
            operation: Operation::Update,
            kind: nodes,
            subresource: sub,
            namespace: "",
            name,
            user,
        };
        let old = json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.0.0.0/24"}});
        let mut new = old.clone();
        new["metadata"]["annotations"] = json!({"kwire.dev/x": "1"});
        assert!(p
            .validate(&req("n1", &agent, ""), Some(&new), Some(&old), None)
            .is_ok());
        let e = p
            .validate(&req("n2", &agent, ""), Some(&new), Some(&old), None)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        assert_eq!(e.message, "nodes \"n2\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: only n1");
        new["spec"]["unschedulable"] = json!(true);
        let e = p
            .validate(&req("n1", &agent, "status"), Some(&new), Some(&old), None)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert!(e.message.ends_with("spec is not yours"), "{}", e.message);
        // Others are not matched by the condition; deletes not by the constraints.
        let admin = UserInfo::admin();
        assert!(p
            .validate(&req("n2", &admin, ""), Some(&new), Some(&old), None)
            .is_ok());
        let mut del = req("n2", &agent, "");
        del.operation = Operation::Delete;
        assert!(p.validate(&del, None, Some(&old), None).is_ok());
    }

    #[test]
    fn errors_fail_closed_unless_ignored() {
        let mut p = policies();
        p.policies[0]["spec"]["validations"] = json!([{"expression": "object.nope == 1"}]);
        let nodes = find("", "v1", "nodes").unwrap();
        let agent = UserInfo::service_account("kube-system", "kwire", Some("n1"));
        let req = AdmissionRequest {
            operation: Operation::Update,
            kind: nodes,
            subresource: "",
            namespace: "",
            name: "n1",
            user: &agent,
        };
        let o = json!({"metadata": {"name": "n1"}});
        let e = p.validate(&req, Some(&o), Some(&o), None).unwrap_err();
        assert!(e.message.contains("resulted in error"), "{}", e.message);
        p.policies[0]["spec"]["failurePolicy"] = json!("Ignore");
        assert!(p.validate(&req, Some(&o), Some(&o), None).is_ok());
    }

    #[test]
    fn resource_rules_follow_the_wildcard_rules() {
        let nodes = find("", "v1", "nodes").unwrap();
        let u = UserInfo::admin();
        let req = |sub| AdmissionRequest {
            operation: Operation::Update,
            kind: nodes,
            subresource: sub,
            namespace: "",
            name: "n",
            user: &u,
        };
        let rule = |r: &str| json!({"apiGroups": ["*"], "apiVersions": ["*"], "operations": ["*"], "resources": [r]});
        assert!(rule_matches(&rule("*"), &req("")));
        assert!(!rule_matches(&rule("*"), &req("status")));
        assert!(rule_matches(&rule("*/*"), &req("status")));
        assert!(rule_matches(&rule("nodes/*"), &req("status")));
        assert!(rule_matches(&rule("*/status"), &req("status")));
        assert!(!rule_matches(&rule("nodes"), &req("status")));
    }
}
