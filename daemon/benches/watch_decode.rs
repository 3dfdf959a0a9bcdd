//! What one watch event costs the agent between the TLS plaintext and the filter's verdict,
//! for the events it drops (issue 17's irrelevant update: a kubelet's status heartbeat):
//! - `pod/scan`: serde_json skipping the whole line (`IgnoredAny`), the floor of any parse;
//! - `pod/view`: the line decoded as kube-rs's watcher decodes it (`WatchEvent<PodView>` from a
//!   `&str`: the view keeps only what NetworkPolicy reads, see `agent::objects`);
//! - `pod/view_and_filter`: that and `PodFilter::pass`, which drops it;
//! - the same three for a Node heartbeat and `NodeFilter`.
//!
//! The objects are shaped as a cluster's are (managedFields, conditions, container statuses,
//! images): the same shapes as `agent_scale`'s synthetic cluster. Each iteration decodes a
//! fresh heartbeat (its time and resourceVersion differ), so the filters compare against a
//! remembered view as in the agent.
//!
//! Run as a test (`cargo test --bench watch_decode`), each case runs once.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use kube::core::WatchEvent;
use kube::runtime::watcher::Event;
use kwire::agent::objects::{NodeView, PodView};
use kwire::agent::watches::{NodeFilter, PodFilter};
use serde::de::IgnoredAny;
use serde_json::json;

fn managed_fields(manager: &str) -> serde_json::Value {
    json!([
        {"manager": manager, "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}, "f:version": {}},
            "f:ownerReferences": {".": {}, "k:{\"uid\":\"0\"}": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}, "f:resources": {}}}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:05Z",
         "fieldsType": "FieldsV1", "subresource": "status",
         "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}, "f:podIP": {}, "f:podIPs": {}}}}
    ])
}

/// A Pod status heartbeat as a watch line: only the probe time, the restart count and the
/// resourceVersion change with `beat`.
fn pod_line(beat: u64) -> String {
    let t = format!("2025-01-01T00:{:02}:{:02}Z", beat / 60 % 60, beat % 60);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-0-7f9c", "namespace": "ns-00001", "generateName": "web-0-",
            "resourceVersion": (1000 + beat).to_string(), "uid": "5b1c2a9e-0000-4000-8000-000000000001",
            "labels": {"app": "web-0", "app.kubernetes.io/name": "web-0", "app.kubernetes.io/part-of": "system-1",
                "tier": "frontend", "version": "v1", "team": "team-1", "pod-template-hash": "5d8f6c7b9"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z", "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-0-rs", "uid": "0", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager"),
        },
        "spec": {
            "nodeName": "node-00001",
            "containers": [{
                "name": "main", "image": "registry.example/web-0:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "APP", "value": "web-0"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": "web-0-config"}}],
            "serviceAccountName": "default",
        },
        "status": {
            "phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}],
            "hostIP": "192.0.2.1", "hostIPs": [{"ip": "192.0.2.1"}],
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
        },
    });
    watch_line(&pod)
}

/// A Node status heartbeat as a watch line (the kubelet's every ten seconds).
fn node_line(beat: u64) -> String {
    let t = format!("2025-01-01T00:{:02}:{:02}Z", beat / 60 % 60, beat % 60);
    let cond = |ty: &str, status: &str, reason: &str| {
        json!({"type": ty, "status": status, "reason": reason, "message": format!("kubelet reports {reason}"),
               "lastHeartbeatTime": t, "lastTransitionTime": "2025-01-01T00:00:00Z"})
    };
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": "node-00001", "uid": "5b1c2a9e-0000-4000-8000-000000000002",
            "resourceVersion": (1000 + beat).to_string(), "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kubernetes.io/hostname": "node-00001", "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "m5.xlarge", "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": "eu-west-1a"},
            "annotations": {"kwire.dev/public-key": "hCrsvDtCH1BHp6m0fYUJcMvnFjeiM1aUEW6sSB62F1c=",
                "kwire.dev/endpoint": "192.0.2.1:51820",
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "managedFields": managed_fields("kubeadm"),
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}, {"type": "Hostname", "address": "node-00001"}],
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
        },
    });
    watch_line(&node)
}

/// A MODIFIED watch line as kube-apiserver writes it: `type` before `object` (a `json!` map
/// would sort `object` first, and serde would buffer the whole object before the tag).
fn watch_line(object: &serde_json::Value) -> String {
    format!("{{\"type\":\"MODIFIED\",\"object\":{object}}}")
}

/// Lines of 64 consecutive heartbeats, cycled through.
fn lines(f: fn(u64) -> String) -> Vec<String> {
    (0..64).map(f).collect()
}

fn object<K>(ev: WatchEvent<K>) -> K {
    match ev {
        WatchEvent::Added(k) | WatchEvent::Modified(k) | WatchEvent::Deleted(k) => k,
        _ => panic!("not an object event"),
    }
}

fn bench(c: &mut Criterion) {
    let pods = lines(pod_line);
    let nodes = lines(node_line);
    println!(
        "watch line: Pod {} bytes, Node {} bytes",
        pods[0].len(),
        nodes[0].len()
    );

    let mut g = c.benchmark_group("pod");
    let mut i = 0;
    let mut next = |ls: &[String]| {
        i = (i + 1) % ls.len();
        ls[i].clone()
    };
    g.bench_function("scan", |b| {
        b.iter_batched(
            || next(&pods),
            |l| black_box(serde_json::from_str::<IgnoredAny>(&l).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("view", |b| {
        b.iter_batched(
            || next(&pods),
            |l| black_box(serde_json::from_str::<WatchEvent<PodView>>(&l).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut filter = PodFilter::new(Arc::default());
    let first = object(serde_json::from_str::<WatchEvent<PodView>>(&pods[0]).unwrap());
    assert!(filter.pass(&Event::Apply(first)));
    g.bench_function("view_and_filter", |b| {
        b.iter_batched(
            || next(&pods),
            |l| {
                let v = object(serde_json::from_str::<WatchEvent<PodView>>(&l).unwrap());
                assert!(!filter.pass(&Event::Apply(v)), "a heartbeat is dropped");
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("node");
    g.bench_function("scan", |b| {
        b.iter_batched(
            || next(&nodes),
            |l| black_box(serde_json::from_str::<IgnoredAny>(&l).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("view", |b| {
        b.iter_batched(
            || next(&nodes),
            |l| black_box(serde_json::from_str::<WatchEvent<NodeView>>(&l).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut filter = NodeFilter::new("another-node", Arc::default());
    let first = object(serde_json::from_str::<WatchEvent<NodeView>>(&nodes[0]).unwrap());
    assert!(filter.pass(&Ok(Event::Apply(first))));
    g.bench_function("view_and_filter", |b| {
        b.iter_batched(
            || next(&nodes),
            |l| {
                let v = object(serde_json::from_str::<WatchEvent<NodeView>>(&l).unwrap());
                assert!(!filter.pass(&Ok(Event::Apply(v))), "a heartbeat is dropped");
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
