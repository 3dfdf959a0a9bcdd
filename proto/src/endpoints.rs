//! The EndpointSlice controller's pure part (kube-controller-manager's role): for every
//! Service with a selector, the `discovery.k8s.io/v1` EndpointSlices listing the matching pods
//! of its namespace, one per address family and port mapping, with `targetPort` resolved per
//! pod (by number, or by the name of one of the pod's container ports) and the pods'
//! readiness as conditions. The lab's controller writes them; `kwire policy trace` derives a
//! Service's backends from manifests with it, so both agree on what a Service selects.
//!
//! Where it differs from the real controller: slices have fixed names
//! (`<service>-ipv4-<n>`) instead of generated ones, and are never split at 100 endpoints.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// The label on every slice this controller manages (the real controller's value).
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// A Service port with its `targetPort` resolved on one pod: (name, protocol, port).
type Mapping = Vec<(String, String, u16)>;

/// The port mapping of `svc` on `pod`: ports whose named `targetPort` the pod does not
/// declare are left out (as the real controller leaves the pod out of that port).
fn mapping(svc: &Value, pod: &Value) -> Mapping {
    let mut out = Mapping::new();
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = s(p, "/name").to_string();
        let proto = p
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string();
        let port = p.get("port").and_then(Value::as_u64).unwrap_or(0);
        let target = match p.get("targetPort") {
            None | Some(Value::Null) => Some(port),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(t)) => match t.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => pod
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| {
                        c.get("ports")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                    })
                    .find(|cp| {
                        s(cp, "/name") == t
                            && cp.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == proto
                    })
                    .and_then(|cp| cp.get("containerPort").and_then(Value::as_u64)),
            },
            _ => None,
        };
        if let Some(t) = target
            .and_then(|t| u16::try_from(t).ok())
            .filter(|t| *t != 0)
        {
            out.push((name, proto, t));
        }
    }
    out
}

fn selects(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    let labels = pod.pointer("/metadata/labels");
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The slices every Service with a selector should have, by (namespace, name).
pub fn desired(services: &[Value], pods: &[Value]) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object) else {
            continue;
        };
        if selector.is_empty() {
            continue;
        }
        let (ns, name) = (s(svc, "/metadata/namespace"), s(svc, "/metadata/name"));
        // Slices only for the Service's families (`spec.ipFamilies`, which the API server
        // sets; both when it is absent), as the real controller does.
        let families: Vec<&str> = svc
            .pointer("/spec/ipFamilies")
            .and_then(Value::as_array)
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_else(|| vec!["IPv4", "IPv6"]);
        // (family, mapping) -> endpoints
        let mut groups: BTreeMap<(&str, Mapping), Vec<Value>> = BTreeMap::new();
        for pod in pods {
            if s(pod, "/metadata/namespace") != ns || !selects(selector, pod) {
                continue;
            }
            let phase = s(pod, "/status/phase");
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            let ready = pod
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| s(c, "/type") == "Ready" && s(c, "/status") == "True");
            let terminating = pod.pointer("/metadata/deletionTimestamp").is_some();
            let m = mapping(svc, pod);
            if m.is_empty() {
                continue;
            }
            for ip in pod
                .pointer("/status/podIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| s(p, "/ip"))
            {
                let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
                if !families.contains(&family) {
                    continue;
                }
                groups.entry((family, m.clone())).or_default().push(json!({
                    "addresses": [ip],
                    "conditions": {
                        "ready": ready && !terminating,
                        "serving": ready,
                        "terminating": terminating,
                    },
                    "nodeName": s(pod, "/spec/nodeName"),
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": ns,
                        "name": s(pod, "/metadata/name"),
                        "uid": s(pod, "/metadata/uid"),
                    },
                }));
            }
        }
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for ((family, m), endpoints) in groups {
            let i = index.entry(family).or_default();
            let slice = format!("{name}-{}-{i}", family.to_ascii_lowercase());
            *i += 1;
            let ports: Vec<Value> = m
                .iter()
                .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}))
                .collect();
            out.insert(
                (ns.to_string(), slice.clone()),
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "namespace": ns,
                        "name": slice,
                        "labels": {SERVICE_NAME: name, MANAGED_BY: CONTROLLER},
                        "ownerReferences": [{
                            "apiVersion": "v1", "kind": "Service", "name": name,
                            "uid": s(svc, "/metadata/uid"), "controller": true,
                            "blockOwnerDeletion": true,
                        }],
                    },
                    "addressType": family,
                    "endpoints": endpoints,
                    "ports": ports,
                }),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str, ips: &[&str], ready: bool, http_port: u16) -> Value {
        json!({
            "metadata": {"namespace": "shop", "name": name, "uid": format!("uid-{name}"),
                         "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": http_port},
                {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
            "status": {"phase": "Running",
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    }

    #[test]
    fn slices_per_family_and_mapping_with_target_ports_resolved_by_name_and_number() {
        let svc = json!({
            "metadata": {"namespace": "shop", "name": "web", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ]},
        });
        let pods = [
            pod("a", "web", &["10.244.1.5", "fd00:244:1::5"], true, 8080),
            pod("b", "web", &["10.244.2.5"], false, 8080),
            pod("c", "web", &["10.244.2.6"], true, 9090),
            pod("other", "db", &["10.244.1.9"], true, 8080),
        ];
        let d = desired(&[svc], &pods);
        let names: Vec<&str> = d.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["web-ipv4-0", "web-ipv4-1", "web-ipv6-0"]);
        let v4 = &d[&("shop".to_string(), "web-ipv4-0".to_string())];
        assert_eq!(v4["metadata"]["labels"][SERVICE_NAME], "web");
        assert_eq!(
            v4["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 8080},
                   {"name": "dns", "protocol": "UDP", "port": 5353}])
        );
        let eps = v4["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 2, "a and b, not the db pod");
        assert_eq!(eps[1]["conditions"]["ready"], false, "b is not ready");
        let other = &d[&("shop".to_string(), "web-ipv4-1".to_string())];
        assert_eq!(other["ports"][0]["port"], 9090, "c names http as 9090");
        // No selector: the owner writes its slices.
        let manual = json!({"metadata": {"namespace": "shop", "name": "ext"},
                            "spec": {"ports": [{"port": 80}]}});
        assert!(desired(&[manual], &pods).is_empty());
        // A single-stack Service gets slices of its family only.
        let v4only = json!({"metadata": {"namespace": "shop", "name": "web"},
            "spec": {"selector": {"app": "web"}, "ipFamilies": ["IPv4"], "ports": [{"port": 80}]}});
        assert!(desired(&[v4only], &pods)
            .values()
            .all(|s| s["addressType"] == "IPv4"));
    }
}
