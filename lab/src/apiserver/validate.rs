//! Object validation the API server does before storing (answered with 422 Invalid), kept to
//! the checks that catch real client mistakes: names, labels, and a few required fields.

use serde_json::Value;

use super::names::{
    is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_valid_label_key,
    is_valid_label_value,
};
use super::resources::{NameRule, ResourceKind};

/// One field error, reported in the `Status`'s `details.causes` like the real server does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueForbidden`.
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn required(field: &str) -> Self {
        FieldError {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message: "Required value".to_string(),
        }
    }
    pub fn invalid(field: &str, value: &str, why: &str) -> Self {
        FieldError {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }
    /// An invalid number: kube-apiserver prints it bare (`Invalid value: 30001: ...`).
    pub fn invalid_number(field: &str, value: u64, why: &str) -> Self {
        FieldError {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {value}: {why}"),
        }
    }
    pub fn duplicate(field: &str, value: &str) -> Self {
        FieldError {
            reason: "FieldValueDuplicate",
            field: field.to_string(),
            message: format!("Duplicate value: {value}"),
        }
    }
    pub fn forbidden(field: &str, why: &str) -> Self {
        FieldError {
            reason: "FieldValueForbidden",
            field: field.to_string(),
            message: format!("Forbidden: {why}"),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The string at a JSON pointer, or "".
pub(super) fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn name_ok(rule: NameRule, name: &str) -> Result<(), &'static str> {
    let ok = match rule {
        NameRule::Subdomain => is_dns1123_subdomain(name),
        NameRule::Label => is_dns1123_label(name),
        NameRule::Dns1035 => is_dns1035_label(name),
        NameRule::PathSegment => {
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
        }
    };
    if ok {
        return Ok(());
    }
    Err(match rule {
        NameRule::Subdomain => "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        NameRule::Label => "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        NameRule::Dns1035 => "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
        NameRule::PathSegment => "may not contain '/' or '%' and may not be '.' or '..'",
    })
}

/// Checks a CustomResourceDefinition as the real server's validation does for the fields the
/// stand-in uses; the errors are 422 causes.
pub fn validate_crd(crd: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let group = str_at(crd, "/spec/group");
    let plural = str_at(crd, "/spec/names/plural");
    let kind = str_at(crd, "/spec/names/kind");
    if group.is_empty() || !group.contains('.') {
        errors.push(FieldError::invalid(
            "spec.group",
            group,
            "should be a domain with at least one dot",
        ));
    }
    if super::resources::GROUPS.contains(&group) || group.is_empty() {
        errors.push(FieldError::forbidden(
            "spec.group",
            "a built-in API group cannot be extended",
        ));
    }
    if plural.is_empty() || !is_dns1035_label(plural) {
        errors.push(FieldError::invalid(
            "spec.names.plural",
            plural,
            "a lowercase DNS-1035 label is required",
        ));
    }
    if kind.is_empty() {
        errors.push(FieldError::required("spec.names.kind"));
    }
    let name = str_at(crd, "/metadata/name");
    if name != format!("{plural}.{group}") {
        errors.push(FieldError::invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match str_at(crd, "/spec/scope") {
        "Cluster" | "Namespaced" => {}
        s => errors.push(FieldError::invalid(
            "spec.scope",
            s,
            "supported values: \"Cluster\", \"Namespaced\"",
        )),
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push(FieldError::required("spec.versions"));
    }
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage != 1 {
        errors.push(FieldError::invalid(
            "spec.versions",
            &storage.to_string(),
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let vname = str_at(v, "/name");
        if vname.is_empty() || !is_dns1035_label(vname) {
            errors.push(FieldError::invalid(
                &format!("spec.versions[{i}].name"),
                vname,
                "a DNS-1035 label is required",
            ));
        }
        match v.pointer("/schema/openAPIV3Schema") {
            Some(s) if s.get("type").and_then(Value::as_str) == Some("object") => {
                unchecked_keywords(
                    s,
                    &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    &mut errors,
                );
            }
            _ => errors.push(FieldError::required(&format!(
                "spec.versions[{i}].schema.openAPIV3Schema (a structural schema of type object; the stand-in needs one)"
            ))),
        }
    }
    errors
}

/// Schema keywords the stand-in checks ([`super::crd`]) or that change nothing (documentation).
const SCHEMA_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "nullable",
    "format",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "description",
    "title",
    "example",
    "externalDocs",
];

/// Formats the stand-in checks (the real server knows more).
pub const SCHEMA_FORMATS: &[&str] = &["date-time", "int32", "int64"];

/// Refuses what a CRD's schema asks that the stand-in would not enforce (CEL rules, oneOf,
/// defaults, ...): a lab that accepted them unchecked would be kinder than a cluster.
fn unchecked_keywords(schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(map) = schema.as_object() else {
        return;
    };
    for (k, v) in map {
        if !SCHEMA_KEYWORDS.contains(&k.as_str()) {
            errors.push(FieldError::forbidden(
                &format!("{path}.{k}"),
                "not enforced by the kwire-lab API stand-in (the real API server enforces it): leave it out, or teach lab/src/apiserver/crd.rs",
            ));
        }
        if k == "format" && !v.as_str().is_some_and(|f| SCHEMA_FORMATS.contains(&f)) {
            errors.push(FieldError::forbidden(
                &format!("{path}.format"),
                "a format the kwire-lab API stand-in does not check (it checks date-time, int32, int64)",
            ));
        }
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            unchecked_keywords(sub, &format!("{path}.properties.{name}"), errors);
        }
    }
    for k in ["items", "additionalProperties"] {
        if let Some(sub) = map.get(k).filter(|s| s.is_object()) {
            unchecked_keywords(sub, &format!("{path}.{k}"), errors);
        }
    }
}

/// Validates an object about to be stored (after defaulting and name generation).
pub fn validate_object(kind: &ResourceKind, object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        errors.push(FieldError::required("metadata.name"));
    } else if let Err(why) = name_ok(kind.name_rule, name) {
        errors.push(FieldError::invalid("metadata.name", name, why));
    }
    if let Some(labels) = object.pointer("/metadata/labels") {
        match labels.as_object() {
            Some(map) => {
                for (k, v) in map {
                    if !is_valid_label_key(k) {
                        errors.push(FieldError::invalid("metadata.labels", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
                    }
                    match v.as_str() {
                        Some(s) if is_valid_label_value(s) => {}
                        _ => errors.push(FieldError::invalid(&format!("metadata.labels[{k}]"), &v.to_string(), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")),
                    }
                }
            }
            None if labels.is_null() => {}
            None => errors.push(FieldError::invalid(
                "metadata.labels",
                &labels.to_string(),
                "must be a map of strings",
            )),
        }
    }
    if let Some(annotations) = object.pointer("/metadata/annotations") {
        if let Some(map) = annotations.as_object() {
            for (k, v) in map {
                if !v.is_string() {
                    errors.push(FieldError::invalid(
                        &format!("metadata.annotations[{k}]"),
                        &v.to_string(),
                        "must be a string",
                    ));
                }
            }
        }
    }
    match kind.plural {
        "customresourcedefinitions" if kind.group == "apiextensions.k8s.io" => {
            errors.extend(validate_crd(object));
        }
        "pods" => {
            let containers = object.pointer("/spec/containers").and_then(Value::as_array);
            match containers {
                None => errors.push(FieldError::required("spec.containers")),
                Some(list) if list.is_empty() => {
                    errors.push(FieldError::required("spec.containers"))
                }
                Some(list) => {
                    for (i, c) in list.iter().enumerate() {
                        if c.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .is_empty()
                        {
                            errors
                                .push(FieldError::required(&format!("spec.containers[{i}].name")));
                        }
                        if c.get("image")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .is_empty()
                        {
                            errors
                                .push(FieldError::required(&format!("spec.containers[{i}].image")));
                        }
                    }
                }
            }
        }
        "endpointslices" if object.get("addressType").and_then(Value::as_str).is_none() => {
            errors.push(FieldError::required("addressType"));
        }
        "services" => {
            let svc_type = object
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            let headless =
                object.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
            let ports = object
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if ports == 0 && svc_type != "ExternalName" && !headless {
                errors.push(FieldError::required("spec.ports"));
            }
        }
        _ => {}
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns1123_subdomain("node-1.example"));
        assert!(!is_dns1123_subdomain("Node1"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(is_dns1123_label("kube-system"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_dns1035_label("web"));
        assert!(!is_dns1035_label("1web"));
    }
}
