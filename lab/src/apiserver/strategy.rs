//! Per-kind behaviour on create and update, after the real server's registry strategies:
//! defaulting, status handling, generation, immutable fields.

use std::time::{SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::resources::ResourceKind;
use super::validate::FieldError;

/// RFC 3339 UTC time with second precision, as `metav1.Time` serialises.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A random (version 4) UUID, as the server gives `metadata.uid`.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A 5-character random suffix for `generateName`, from the alphabet the real server uses.
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    OsRng.fill_bytes(&mut b);
    b.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect()
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("set above")
}

fn default_str(map: &mut Map<String, Value>, key: &str, value: &str) {
    if map
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        map.insert(key.to_string(), json!(value));
    }
}

fn default_port_protocols(ports: Option<&mut Value>) {
    if let Some(Value::Array(ports)) = ports {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default_str(p, "protocol", "TCP");
        }
    }
}

/// Fills the defaults the real server's defaulting functions set, for fields kwire reads.
pub fn apply_defaults(kind: &ResourceKind, object: &mut Value) {
    match kind.plural {
        "pods" if kind.group.is_empty() => {
            let spec = obj_mut(object, "spec");
            default_str(spec, "restartPolicy", "Always");
            default_str(spec, "dnsPolicy", "ClusterFirst");
            default_str(spec, "schedulerName", "default-scheduler");
            spec.entry("terminationGracePeriodSeconds")
                .or_insert(json!(30));
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = spec.get_mut(list) {
                    for c in cs.iter_mut() {
                        default_port_protocols(c.get_mut("ports"));
                    }
                }
            }
        }
        "services" => {
            let spec = obj_mut(object, "spec");
            default_str(spec, "type", "ClusterIP");
            default_str(spec, "sessionAffinity", "None");
            if spec.get("type").and_then(Value::as_str) != Some("ExternalName") {
                default_str(spec, "internalTrafficPolicy", "Cluster");
            }
            if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    default_str(p, "protocol", "TCP");
                    if !p.contains_key("targetPort") {
                        if let Some(port) = p.get("port").cloned() {
                            p.insert("targetPort".into(), port);
                        }
                    }
                }
            }
        }
        "networkpolicies" => {
            let spec = obj_mut(object, "spec");
            if spec
                .get("policyTypes")
                .is_none_or(|v| v.as_array().is_none_or(Vec::is_empty))
            {
                let mut types = vec![json!("Ingress")];
                if spec.get("egress").is_some_and(|e| !e.is_null()) {
                    types.push(json!("Egress"));
                }
                spec.insert("policyTypes".into(), Value::Array(types));
            }
            spec.entry("podSelector").or_insert(json!({}));
            for dir in ["ingress", "egress"] {
                if let Some(Value::Array(rules)) = spec.get_mut(dir) {
                    for r in rules.iter_mut() {
                        default_port_protocols(r.get_mut("ports"));
                    }
                }
            }
        }
        "endpointslices" => default_port_protocols(object.get_mut("ports")),
        "secrets" if kind.group.is_empty() => {
            // `stringData` is write-only: the real server merges it into `data` (base64).
            if let Some(Value::Object(strings)) =
                object.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                use base64::Engine as _;
                let data = obj_mut(object, "data");
                for (k, v) in strings {
                    let text = v.as_str().unwrap_or_default();
                    data.insert(
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(text)),
                    );
                }
            }
        }
        "namespaces" => {
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            // The real server labels every Namespace with its name (NamespaceDefaultLabelName).
            obj_mut(obj_mut_value(object, "metadata"), "labels")
                .insert("kubernetes.io/metadata.name".into(), json!(name));
        }
        _ => {}
    }
}

fn obj_mut_value<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    obj_mut(v, key);
    &mut v[key]
}

/// What the server sets on create besides defaults: status reset, generation.
pub fn prepare_for_create(kind: &ResourceKind, object: &mut Value) {
    match kind.plural {
        "pods" if kind.group.is_empty() => {
            object["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"})
        }
        "services" => object["status"] = json!({"loadBalancer": {}}),
        "namespaces" => {
            object["status"] = json!({"phase": "Active"});
            obj_mut(object, "spec")
                .entry("finalizers")
                .or_insert(json!(["kubernetes"]));
        }
        _ => {}
    }
    if object.get("spec").is_some() {
        object["metadata"]["generation"] = json!(1);
    }
}

/// Builds the object to store for an update of `old` with `new` (main resource, or the
/// `status` subresource), or the 422 the real server would answer.
pub fn prepare_for_update(
    kind: &ResourceKind,
    old: &Value,
    new: Value,
    status_subresource: bool,
) -> Result<Value, Vec<FieldError>> {
    let mut next = if status_subresource {
        // Status writes change only `.status`.
        let mut next = old.clone();
        next["status"] = new.get("status").cloned().unwrap_or(json!({}));
        if let Some(rv) = new.pointer("/metadata/resourceVersion") {
            next["metadata"]["resourceVersion"] = rv.clone();
        }
        next
    } else {
        let mut next = new;
        if kind.status_subresource {
            match old.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        next
    };
    // Fields the server owns.
    for field in ["uid", "creationTimestamp"] {
        match old["metadata"].get(field) {
            Some(v) => next["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = next["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    let generation = old.pointer("/metadata/generation").and_then(Value::as_i64);
    if let Some(g) = generation {
        let bump = old.get("spec") != next.get("spec");
        next["metadata"]["generation"] = json!(if bump { g + 1 } else { g });
    }
    let mut errors = Vec::new();
    match kind.plural {
        "nodes" => {
            let old_cidrs = old
                .pointer("/spec/podCIDRs")
                .cloned()
                .unwrap_or(json!(null));
            let new_cidrs = next
                .pointer("/spec/podCIDRs")
                .cloned()
                .unwrap_or(json!(null));
            let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
            if !empty(&old_cidrs) && old_cidrs != new_cidrs {
                errors.push(FieldError::forbidden(
                    "spec.podCIDRs",
                    "node updates may not change podCIDR except from \"\" to valid",
                ));
            }
            let old_cidr = old
                .pointer("/spec/podCIDR")
                .and_then(Value::as_str)
                .unwrap_or("");
            let new_cidr = next
                .pointer("/spec/podCIDR")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !old_cidr.is_empty() && old_cidr != new_cidr {
                errors.push(FieldError::forbidden(
                    "spec.podCIDR",
                    "node updates may not change podCIDR except from \"\" to valid",
                ));
            }
        }
        "services" => {
            let old_ip = old
                .pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or("");
            let new_ip = next
                .pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or("");
            if new_ip.is_empty() && !old_ip.is_empty() {
                for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                    if let Some(v) = old["spec"].get(f) {
                        next["spec"][f] = v.clone();
                    }
                }
            } else if new_ip != old_ip {
                errors.push(FieldError::invalid(
                    "spec.clusterIPs[0]",
                    new_ip,
                    "may not change once set",
                ));
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(next)
    } else {
        Err(errors)
    }
}

/// The name and namespace a request addresses must agree with the object's own.
pub fn check_identity(
    kind: &ResourceKind,
    object: &Value,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(ns) = namespace {
        match object.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(o) if !o.is_empty() && o != ns => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object does not match the namespace sent on the request ({o} != {ns})"
                )))
            }
            _ => {}
        }
    }
    if let Some(n) = name {
        match object.pointer("/metadata/name").and_then(Value::as_str) {
            Some(o) if o != n => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({o}) does not match the name on the URL ({n})"
                )))
            }
            _ => {}
        }
    }
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let k = object.get("kind").and_then(Value::as_str).unwrap_or("");
    if (!api_version.is_empty() && api_version != kind.api_version())
        || (!k.is_empty() && k != kind.kind)
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({}), or kind {k} is not {}",
            kind.api_version(),
            kind.kind
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    #[test]
    fn formats_time_and_uids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(name_suffix().len(), 5);
    }

    #[test]
    fn secret_string_data_is_merged_into_data() {
        let kind = find("", "v1", "secrets").unwrap();
        let mut s =
            json!({"metadata": {"name": "s"}, "data": {"a": "YQ=="}, "stringData": {"b": "b"}});
        apply_defaults(kind, &mut s);
        assert_eq!(
            s,
            json!({"metadata": {"name": "s"}, "data": {"a": "YQ==", "b": "Yg=="}})
        );
    }

    #[test]
    fn network_policy_types_default_like_kubernetes() {
        let np = find("networking.k8s.io", "v1", "networkpolicies").unwrap();
        let mut a = json!({"spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}});
        apply_defaults(np, &mut a);
        assert_eq!(a["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(a["spec"]["ingress"][0]["ports"][0]["protocol"], "TCP");
        let mut b = json!({"spec": {"egress": []}});
        apply_defaults(np, &mut b);
        assert_eq!(b["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    }

    #[test]
    fn node_pod_cidrs_are_write_once() {
        let nodes = find("", "v1", "nodes").unwrap();
        let old = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]}});
        let changed = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}});
        assert!(prepare_for_update(nodes, &old, changed, false).is_err());
        let fresh = json!({"metadata": {"name": "n"}, "spec": {}});
        assert!(prepare_for_update(nodes, &fresh, old.clone(), false).is_ok());
    }

    #[test]
    fn main_resource_writes_keep_status_and_status_writes_keep_spec() {
        let nodes = find("", "v1", "nodes").unwrap();
        let old = json!({"metadata": {"name": "n", "uid": "u"}, "spec": {"unschedulable": false}, "status": {"phase": "x"}});
        let main = prepare_for_update(
            nodes,
            &old,
            json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}, "status": {}}),
            false,
        )
        .unwrap();
        assert_eq!(main["status"], json!({"phase": "x"}));
        assert_eq!(main["metadata"]["uid"], "u");
        let status = prepare_for_update(nodes, &old, json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}, "status": {"conditions": []}}), true).unwrap();
        assert_eq!(status["spec"], json!({"unschedulable": false}));
        assert_eq!(status["status"], json!({"conditions": []}));
    }
}
