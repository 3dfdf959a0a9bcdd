//! The synthetic cluster: Namespaces, Nodes, Pods and NetworkPolicies shaped like a real
//! cluster's (sizes, label spread, managedFields, status noise), so that what the agent strips
//! and ignores costs what it would cost against a real API server.
//!
//! Label spread: each namespace runs ten Deployments of unequal size (5 to 80 replicas per 300
//! pods), each pod labelled `app`, `app.kubernetes.io/name`, `app.kubernetes.io/part-of`,
//! `tier`, `version`, `team` and `pod-template-hash`: one identity per Deployment version, as
//! in a cluster. Policies: ten shapes per namespace, the usual ones (default deny, same
//! namespace, tier to tier with named ports, monitoring from another namespace, team-wide
//! namespace selectors, DNS egress, ipBlocks with except, port ranges).

use serde_json::{json, Value};

/// Replica counts of a namespace's ten Deployments, per 300 pods.
const REPLICAS: [usize; 10] = [5, 10, 20, 40, 80, 60, 30, 25, 20, 10];
const APPS: [&str; 16] = [
    "web", "api", "cart", "checkout", "search", "catalog", "auth", "billing", "mailer", "queue",
    "worker", "cache", "db", "reports", "gateway", "media",
];
const TIERS: [&str; 5] = ["frontend", "backend", "db", "cache", "worker"];
/// The namespace the monitoring policies admit (`ns-00000` is labelled as it).
pub const MONITORING_NS: &str = "ns-00000";

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:05}")
}

pub fn team(ns: usize) -> String {
    format!("team-{}", ns % 40)
}

fn env(ns: usize) -> &'static str {
    ["prod", "staging", "dev"][ns % 3]
}

pub fn namespace(i: usize) -> Value {
    let mut labels = json!({"team": team(i), "env": env(i)});
    if ns_name(i) == MONITORING_NS {
        labels["purpose"] = json!("monitoring");
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns_name(i), "labels": labels}})
}

/// One Deployment of a namespace: its app name, tier and replica count.
pub struct Deployment {
    pub app: String,
    pub tier: &'static str,
    pub replicas: usize,
}

/// The Deployments of namespace `ns`, scaled so the namespace holds about `pods` pods.
pub fn deployments(ns: usize, pods: usize) -> Vec<Deployment> {
    let total: usize = REPLICAS.iter().sum();
    let mut out: Vec<Deployment> = REPLICAS
        .iter()
        .enumerate()
        .map(|(j, r)| Deployment {
            app: APPS[(ns * 7 + j) % APPS.len()].to_string() + &format!("-{j}"),
            tier: TIERS[j % TIERS.len()],
            replicas: r * pods / total,
        })
        .collect();
    // Rounding: the remainder goes to the largest.
    let placed: usize = out.iter().map(|d| d.replicas).sum();
    out[4].replicas += pods.saturating_sub(placed);
    out
}

/// Labels of a pod of Deployment `d` in namespace `ns` at `version`.
pub fn pod_labels(ns: usize, d: &Deployment, version: usize) -> Value {
    json!({
        "app": d.app,
        "app.kubernetes.io/name": d.app,
        "app.kubernetes.io/part-of": format!("system-{}", ns % 5),
        "tier": d.tier,
        "version": format!("v{version}"),
        "team": team(ns),
        "pod-template-hash": format!("{:08x}", (ns * 131 + d.app.len() * 17 + version) * 2654435761 % (1 << 32)),
    })
}

/// A managedFields list as the API server keeps it for an object written by two managers.
fn managed_fields(manager: &str, status_manager: &str) -> Value {
    json!([
        {"manager": manager, "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}, "f:version": {}},
            "f:ownerReferences": {".": {}, "k:{\"uid\":\"0\"}": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}, "f:resources": {}}}}}},
        {"manager": status_manager, "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:05Z",
         "fieldsType": "FieldsV1", "subresource": "status",
         "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}, "f:podIP": {}, "f:podIPs": {}}}}
    ])
}

/// A Pod as a ReplicaSet creates it (no status: the API server resets it on create).
pub fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    let app = labels["app"].as_str().unwrap_or("app").to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "generateName": format!("{app}-"),
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z", "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-rs"), "uid": "0", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager", "kubelet"),
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "main", "image": format!("registry.example/{app}:1.4.2"),
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "APP", "value": app}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config")}}],
            "serviceAccountName": "default",
        },
    })
}

/// The status a kubelet writes for a running pod; `beat` varies only what kwire ignores.
pub fn pod_status(ip: &str, host_ip: &str, beat: u64) -> Value {
    let t = format!(
        "2025-01-01T{:02}:{:02}:{:02}Z",
        beat / 3600 % 24,
        beat / 60 % 60,
        beat % 60
    );
    json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": "2025-01-01T00:00:00Z", "qosClass": "Burstable",
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2025-01-01T00:00:02Z"},
            {"type": "Initialized", "status": "True", "lastTransitionTime": "2025-01-01T00:00:01Z"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z", "lastProbeTime": t},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "containerStatuses": [{"name": "main", "ready": true, "started": true, "restartCount": beat % 3,
            "image": "registry.example/app:1.4.2", "imageID": "registry.example/app@sha256:0f0f",
            "containerID": "containerd://abcdef", "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}}}],
    }})
}

/// A Node as kubeadm and the kubelet leave it, with kwire's annotations.
pub fn node(name: &str, internal_ip: &str, key: &str, endpoint: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "m5.xlarge", "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": "eu-west-1a"},
            "annotations": {"kwire.dev/public-key": key, "kwire.dev/endpoint": endpoint,
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "managedFields": managed_fields("kubeadm", "kubelet"),
        },
        "status": node_status_body(internal_ip, name, 0)["status"],
    })
}

/// The status a kubelet reports every ten seconds; `beat` varies only what kwire ignores.
pub fn node_status_body(internal_ip: &str, name: &str, beat: u64) -> Value {
    let t = format!(
        "2025-01-01T{:02}:{:02}:{:02}Z",
        beat / 3600 % 24,
        beat / 60 % 60,
        beat % 60
    );
    let cond = |ty: &str, status: &str, reason: &str| {
        json!({"type": ty, "status": status, "reason": reason, "message": format!("kubelet reports {reason}"),
               "lastHeartbeatTime": t, "lastTransitionTime": "2025-01-01T00:00:00Z"})
    };
    json!({"status": {
        "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
        "allocatable": {"cpu": "3800m", "memory": "15Gi", "pods": "110", "ephemeral-storage": "90Gi"},
        "conditions": [cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            cond("Ready", "True", "KubeletReady")],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": "0", "systemUUID": "0", "bootID": "0", "kernelVersion": "6.1.0",
            "osImage": "Debian GNU/Linux 12", "containerRuntimeVersion": "containerd://1.7.24",
            "kubeletVersion": "v1.33.1", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368},
                   {"names": ["registry.example/app:1.4.2"], "sizeBytes": 52428800}],
    }})
}

/// Policy `k` of namespace `ns` (shape `k % 10`).
pub fn policy(ns: usize, k: usize, apps: &[Deployment]) -> Value {
    let name = format!("np-{k:03}");
    let app = &apps[k % apps.len()].app;
    let spec = match k % 10 {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        1 => json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"tier": "backend"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}], "ports": [{"port": "http"}]}]}),
        3 => json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}},
                                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                         "ports": [{"port": "metrics"}]}]}),
        4 => json!({"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": team(ns)}}}], "ports": [{"port": 8080}]}]}),
        5 => json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        6 => json!({"podSelector": {"matchLabels": {"tier": "backend"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.255.0.0/16"]}}], "ports": [{"port": 5432}]}]}),
        7 => json!({"podSelector": {"matchLabels": {"tier": "frontend"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "staging"]}]},
                                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}],
                         "ports": [{"port": 80}, {"port": 443}]}]}),
        8 => json!({"podSelector": {"matchLabels": {"tier": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["backend", "worker"]}]}}],
                         "ports": [{"port": 5432, "endPort": 5440}]}]}),
        _ => {
            json!({"podSelector": {"matchLabels": {"tier": "frontend"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"port": 443}]}]})
        }
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns_name(ns),
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": spec.to_string()}},
        "spec": spec})
}

/// A ClusterIP Service and its EndpointSlice with `endpoints` addresses (`--services`).
pub fn service(ns: usize, i: usize, endpoints: &[String]) -> (Value, Value) {
    let name = format!("svc-{i:05}");
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns_name(ns)},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}});
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abcde"), "namespace": ns_name(ns),
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>()});
    (svc, slice)
}
