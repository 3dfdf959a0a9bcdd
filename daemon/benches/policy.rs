//! Per-new-flow policy verdict cost with 10 and 10,000 NetworkPolicies in the cluster.
//!
//! The cluster: 100 namespaces x 20 pods. The queried pods live in namespace ns-0 and are
//! selected by the same 10 policies in both configurations; the extra 9,990 policies select
//! pods elsewhere, as in a real cluster where each team's policies select its own pods. The
//! goal is that the extra policies do not slow the verdict (within 1.5x).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kwire::policy::{ContainerPort, Namespace, Pod, Policy, PolicySet, Protocol};
use serde_json::json;

const NAMESPACES: usize = 100;
const PODS_PER_NAMESPACE: usize = 20;
/// Flows asked per iteration, cycling over sources and destinations.
const FLOWS: usize = 64;

fn pod_ip(ns: usize, pod: usize) -> IpAddr {
    IpAddr::from([10, (ns / 200) as u8, (ns % 200) as u8, (pod + 1) as u8])
}

fn cluster() -> (Vec<Namespace>, Vec<Pod>) {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            Namespace::new(
                format!("ns-{i}"),
                BTreeMap::from([("team".to_string(), format!("t{}", i % 10))]),
            )
        })
        .collect();
    let mut pods = Vec::new();
    for n in 0..NAMESPACES {
        for p in 0..PODS_PER_NAMESPACE {
            pods.push(Pod {
                namespace: format!("ns-{n}"),
                name: format!("pod-{p}"),
                labels: BTreeMap::from([("app".to_string(), format!("app{}", p % 10))]),
                ips: vec![pod_ip(n, p)],
                container_ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                node_name: format!("node-{}", n % 3),
                host_network: false,
            });
        }
    }
    (namespaces, pods)
}

fn policy(ns: usize, name: String, spec: serde_json::Value) -> Policy {
    let np = serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": format!("ns-{ns}")}, "spec": spec}),
    )
    .expect("bench policy JSON");
    Policy::from_k8s(&np).expect("bench policy is valid")
}

/// Ten policies in ns-0 selecting app0..app4, with the usual shapes: namespace and pod
/// selectors, ipBlock with except, numbered and named ports, an egress allow-list.
fn core_policies() -> Vec<Policy> {
    let mut v = Vec::new();
    for k in 0..5 {
        v.push(policy(0, format!("ingress-app{k}"), json!({
            "podSelector": {"matchLabels": {"app": format!("app{k}")}},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "t1"}}, "podSelector": {"matchLabels": {"app": "app1"}}}],
                 "ports": [{"port": 80}, {"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                 "ports": [{"port": 443, "endPort": 450}]}
            ]
        })));
        v.push(policy(0, format!("egress-app{k}"), json!({
            "podSelector": {"matchLabels": {"app": format!("app{k}")}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["t2", "t3"]}]}}],
                 "ports": [{"port": "http"}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"port": 53, "protocol": "UDP"}]}
            ]
        })));
    }
    v
}

fn policy_set(total: usize) -> PolicySet {
    let (namespaces, pods) = cluster();
    let mut policies = core_policies();
    for i in policies.len()..total {
        let ns = 1 + i % (NAMESPACES - 1);
        policies.push(policy(ns, format!("np-{i}"), json!({
            "podSelector": {"matchLabels": {"app": format!("app{}", i % 10)}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 10)}}}],
                         "ports": [{"port": 8000 + (i % 100) as i32}]}]
        })));
    }
    PolicySet::compile(namespaces, pods, policies)
}

struct Flow {
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
}

/// Ingress flows into ns-0 app0..app4 pods, and egress flows out of them; a mix of allowed
/// and denied, and of early and late rule matches.
fn flows() -> (Vec<Flow>, Vec<Flow>) {
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for i in 0..FLOWS {
        let local = pod_ip(0, i % 5);
        let remote = pod_ip(1 + (i * 7) % (NAMESPACES - 1), (i * 3) % PODS_PER_NAMESPACE);
        let (port, protocol) = [
            (80, Protocol::Tcp),
            (8080, Protocol::Tcp),
            (443, Protocol::Tcp),
            (53, Protocol::Udp),
        ][i % 4];
        let external: IpAddr = IpAddr::from([192, 168, (i % 4) as u8, 7]);
        let src = if i % 3 == 0 { external } else { remote };
        ingress.push(Flow {
            src,
            dst: local,
            protocol,
            port,
        });
        let dst = if i % 3 == 0 {
            IpAddr::from([8, 8, 8, 8])
        } else {
            remote
        };
        egress.push(Flow {
            src: local,
            dst,
            protocol,
            port,
        });
    }
    (ingress, egress)
}

fn bench(c: &mut Criterion) {
    let (ingress, egress) = flows();
    let mut group = c.benchmark_group("policy_verdict");
    group.throughput(Throughput::Elements(FLOWS as u64));
    for total in [10usize, 10_000] {
        let set = policy_set(total);
        let allowed = ingress
            .iter()
            .filter(|f| {
                set.ingress_verdict(f.src, f.dst, f.protocol, f.port)
                    .is_allowed()
            })
            .count();
        eprintln!("{total} policies: {allowed}/{FLOWS} ingress flows allowed");
        group.bench_with_input(BenchmarkId::new("ingress", total), &set, |b, set| {
            b.iter(|| {
                for f in &ingress {
                    black_box(set.ingress_verdict(
                        black_box(f.src),
                        black_box(f.dst),
                        f.protocol,
                        f.port,
                    ));
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("egress", total), &set, |b, set| {
            b.iter(|| {
                for f in &egress {
                    black_box(set.egress_verdict(
                        black_box(f.src),
                        black_box(f.dst),
                        f.protocol,
                        f.port,
                    ));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
