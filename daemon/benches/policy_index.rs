//! What one watch event costs the incremental policy index (issue 17), in-process: an index
//! of 150,000 pods (5,000 nodes x 30, 500 namespaces of ten Deployments, 7 labels each) and
//! 5,000 policies, scoped to one node, then one change at a time followed by the snapshot
//! the agent would swap in:
//! - an update that changes nothing policy reads (a status heartbeat);
//! - a remote pod's labels (a new version: a new identity), and its IP;
//! - a policy of a namespace with pods on this node;
//! - a pod of this node relabelled.
//!
//! Run as a test (`cargo test --bench policy_index`), the cluster is a tenth of the size.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use kwire::policy::{ContainerPort, Namespace, Pod, Policy, PolicyIndex, Protocol, Scope};
use serde_json::json;

const APPS_PER_NAMESPACE: usize = 10;
const PODS_PER_NODE: usize = 30;
const THIS_NODE: &str = "node-0";

struct Size {
    nodes: usize,
    namespaces: usize,
    policies_per_namespace: usize,
}

fn size() -> Size {
    let benching = std::env::args().any(|a| a == "--bench");
    let scale = if benching { 1 } else { 10 };
    Size {
        nodes: 5000 / scale,
        namespaces: 500 / scale,
        policies_per_namespace: 10,
    }
}

fn labels(ns: usize, app: usize, version: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), format!("app-{app}")),
        ("app.kubernetes.io/name".to_string(), format!("app-{app}")),
        (
            "app.kubernetes.io/part-of".to_string(),
            format!("system-{}", ns % 5),
        ),
        (
            "tier".to_string(),
            ["frontend", "backend", "db", "cache", "worker"][app % 5].to_string(),
        ),
        ("version".to_string(), format!("v{version}")),
        ("team".to_string(), format!("team-{}", ns % 40)),
        (
            "pod-template-hash".to_string(),
            format!("{:08x}", ns * 1000 + app * 10 + version),
        ),
    ])
}

fn pod_ip(node: usize, i: usize) -> IpAddr {
    IpAddr::from([10, (node >> 8) as u8, (node & 0xff) as u8, (i + 2) as u8])
}

fn pod(ns: usize, app: usize, version: usize, node: usize, i: usize) -> Pod {
    Pod {
        namespace: format!("ns-{ns}"),
        name: format!("p-{node}-{i}"),
        labels: labels(ns, app, version),
        ips: vec![pod_ip(node, i)],
        container_ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
        ],
        node_name: format!("node-{node}"),
        host_network: false,
    }
}

fn policy(ns: usize, k: usize, port: i32) -> Policy {
    let spec = match k % 5 {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "backend"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}], "ports": [{"port": "http"}]}]}),
        2 => {
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", ns % 40)}}}],
            "ports": [{"port": port}]}]})
        }
        3 => {
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector":
            {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}], "ports": [{"port": 53, "protocol": "UDP"}]}]})
        }
        _ => {
            json!({"podSelector": {"matchLabels": {"tier": "db"}}, "ingress": [{"from": [{"podSelector":
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["backend", "worker"]}]}}], "ports": [{"port": 5432}]}]})
        }
    };
    let np = serde_json::from_value(json!({"metadata": {"name": format!("np-{k}"), "namespace": format!("ns-{ns}")}, "spec": spec}))
        .expect("policy JSON");
    Policy::from_k8s(&np).expect("valid policy")
}

/// The cluster in an index scoped to `node-0`, snapshot taken.
fn index(s: &Size) -> (PolicyIndex, Vec<Pod>) {
    let mut ix = PolicyIndex::new(Scope::Node(THIS_NODE.into()));
    for ns in 0..s.namespaces {
        ix.apply_namespace(Namespace::new(
            format!("ns-{ns}"),
            BTreeMap::from([("team".to_string(), format!("team-{}", ns % 40))]),
        ));
    }
    let mut pods = Vec::new();
    let mut g = 0;
    for node in 0..s.nodes {
        for i in 0..PODS_PER_NODE {
            let ns = g % s.namespaces;
            let p = pod(ns, (g / s.namespaces) % APPS_PER_NAMESPACE, 1, node, i);
            ix.apply_pod(p.clone());
            pods.push(p);
            g += 1;
        }
    }
    for ns in 0..s.namespaces {
        for k in 0..s.policies_per_namespace {
            ix.apply_policy(policy(ns, k, 8080));
        }
    }
    ix.snapshot();
    (ix, pods)
}

/// Resident memory of this process, kB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let s = size();
    let t = std::time::Instant::now();
    let before = rss_kb();
    let (mut ix, pods) = index(&s);
    // The index's share: what it holds beyond the bench's own copy of the pods.
    let with_copy = rss_kb();
    let copy_kb = {
        let again: Vec<Pod> = pods.clone();
        let kb = rss_kb().saturating_sub(with_copy);
        drop(again);
        kb
    };
    let index_kb = with_copy.saturating_sub(before).saturating_sub(copy_kb);
    eprintln!(
        "policy_index: {} pods, {} policies, {} identities; {} compiled for {THIS_NODE}, {} selectors; built in {:?}; index ≈ {} MB ({} bytes per pod)",
        ix.pod_count(),
        ix.policy_count(),
        ix.identity_count(),
        ix.compiled_policy_count(),
        ix.selector_count(),
        t.elapsed(),
        index_kb / 1024,
        index_kb * 1024 / ix.pod_count().max(1) as u64
    );
    let remote = pods[pods.len() / 2].clone();
    let local = pods[0].clone();
    let mut g = c.benchmark_group("policy_index");

    g.bench_function("irrelevant_update", |b| {
        b.iter(|| {
            let changed = ix.apply_pod(black_box(remote.clone()));
            assert!(!changed && !ix.is_changed());
        })
    });

    let mut version = 1;
    g.bench_function("remote_pod_labels", |b| {
        b.iter(|| {
            version = version % 3 + 1;
            let mut p = remote.clone();
            p.labels = labels(7, 3, version);
            ix.apply_pod(p);
            black_box(ix.snapshot());
        })
    });

    let mut host = 0;
    g.bench_function("remote_pod_ip", |b| {
        b.iter(|| {
            host = (host + 1) % 200;
            let mut p = remote.clone();
            p.ips = vec![IpAddr::from([10, 250, 0, host as u8 + 2])];
            ix.apply_pod(p);
            black_box(ix.snapshot());
        })
    });

    let local_ns: usize = local
        .namespace
        .trim_start_matches("ns-")
        .parse()
        .expect("ns-N");
    let mut port = 8000;
    g.bench_function("policy_of_this_nodes_namespace", |b| {
        b.iter(|| {
            port = if port == 8000 { 8001 } else { 8000 };
            ix.apply_policy(policy(local_ns, 2, port));
            black_box(ix.snapshot());
        })
    });

    let mut flip = false;
    g.bench_function("local_pod_labels", |b| {
        b.iter(|| {
            flip = !flip;
            let mut p = local.clone();
            p.labels.insert(
                "tier".into(),
                if flip { "db".into() } else { "frontend".into() },
            );
            ix.apply_pod(p);
            black_box(ix.snapshot());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
