//! Property tests: the compiled PolicySet against a direct, naive reading of the NetworkPolicy
//! spec over raw manifests; and the incremental index (random sequences of adds, updates and
//! deletes of Namespaces, Pods and NetworkPolicies, snapshots taken in between) against a full
//! rebuild from the final objects and against the naive reading, in both scopes (all pods, and
//! one node's); and the saved inputs a restarted agent enforces first (saved from a live index,
//! read back into a new one) against the live index.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{json, Value};

use kwire::policy::{
    AllowReason, DenyReason, Namespace, Pod, Policy, PolicyIndex, PolicySet, Protocol, Scope,
    Verdict,
};

const NAMESPACES: [&str; 4] = ["x", "y", "z", "w"]; // "w" is never given as an object
const POD_LABELS: [(&str, &[&str]); 2] = [("app", &["a", "b", "c"]), ("tier", &["f", "b"])];
const NS_LABELS: [(&str, &[&str]); 2] = [("team", &["a", "b"]), ("env", &["p", "q"])];
const EXTERNAL: [&str; 4] = ["10.0.0.0", "10.0.0.200", "192.168.1.1", "10.0.0.5"];
const PORTS: [u16; 6] = [53, 80, 81, 85, 8080, 9090];
const CIDRS: [&str; 5] = [
    "10.0.0.0/24",
    "10.0.0.0/28",
    "10.0.0.4/30",
    "0.0.0.0/0",
    "192.168.0.0/16",
];
const EXCEPTS: [&str; 5] = [
    "10.0.0.1/32",
    "10.0.0.2/31",
    "10.0.0.5/32",
    "10.0.0.0/29",
    "192.168.1.0/24",
];

// ---------- generators (manifests as JSON, the way a user writes them) ----------

fn labels(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = BTreeMap<String, String>> {
    let per_key: Vec<_> = keys
        .iter()
        .map(|(k, vals)| {
            proptest::option::of(proptest::sample::select(*vals))
                .prop_map(move |v| v.map(|v| (k.to_string(), v.to_string())))
        })
        .collect();
    per_key.prop_map(|pairs| pairs.into_iter().flatten().collect())
}

fn selector(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = Value> {
    let key = proptest::sample::select(
        keys.iter()
            .map(|(k, _)| *k)
            .chain(["kubernetes.io/metadata.name"])
            .collect::<Vec<_>>(),
    );
    let value = proptest::sample::select(vec!["a", "b", "c", "f", "p", "q", "x", "y", "w"]);
    let expr = (
        key.clone(),
        0..4usize,
        proptest::collection::vec(value.clone(), 1..3),
    )
        .prop_map(|(k, op, vals)| match op {
            0 => json!({"key": k, "operator": "In", "values": vals}),
            1 => json!({"key": k, "operator": "NotIn", "values": vals}),
            2 => json!({"key": k, "operator": "Exists"}),
            _ => json!({"key": k, "operator": "DoesNotExist"}),
        });
    (
        proptest::collection::btree_map(key, value, 0..2),
        proptest::collection::vec(expr, 0..2),
        any::<bool>(),
    )
        .prop_map(|(ml, exprs, with_exprs)| {
            let mut s = json!({});
            if !ml.is_empty() {
                s["matchLabels"] = json!(ml);
            }
            if with_exprs && !exprs.is_empty() {
                s["matchExpressions"] = json!(exprs);
            }
            s
        })
}

fn cidr_contains(outer: &str, inner: &str) -> bool {
    let parse = |s: &str| {
        let (a, p) = s.split_once('/').unwrap();
        (
            u32::from(a.parse::<std::net::Ipv4Addr>().unwrap()),
            p.parse::<u32>().unwrap(),
        )
    };
    let (oa, op) = parse(outer);
    let (ia, ip) = parse(inner);
    let mask = if op == 0 { 0 } else { u32::MAX << (32 - op) };
    ip >= op && (ia & mask) == (oa & mask)
}

fn peer() -> impl Strategy<Value = Value> {
    let pods = || selector(&POD_LABELS);
    let nss = || selector(&NS_LABELS);
    prop_oneof![
        pods().prop_map(|p| json!({"podSelector": p})),
        nss().prop_map(|n| json!({"namespaceSelector": n})),
        (pods(), nss()).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        (
            proptest::sample::select(CIDRS.to_vec()),
            proptest::sample::subsequence(EXCEPTS.to_vec(), 0..3)
        )
            .prop_map(|(c, ex)| {
                let ex: Vec<&str> = ex.into_iter().filter(|e| cidr_contains(c, e)).collect();
                if ex.is_empty() {
                    json!({"ipBlock": {"cidr": c}})
                } else {
                    json!({"ipBlock": {"cidr": c, "except": ex}})
                }
            }),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let proto = proptest::option::of(proptest::sample::select(vec!["TCP", "UDP", "SCTP"]));
    let number = (
        proptest::sample::select(PORTS.to_vec()),
        proptest::option::of(proptest::sample::select(vec![0u16, 1, 10])),
    )
        .prop_map(|(p, end)| match end {
            None => json!({"port": p}),
            Some(d) => json!({"port": p, "endPort": p + d}),
        });
    let name = proptest::sample::select(vec!["http", "dns", "metrics", "nope"])
        .prop_map(|n| json!({"port": n}));
    (proto, prop_oneof![Just(json!({})), number, name]).prop_map(|(proto, mut p)| {
        if let Some(proto) = proto {
            p["protocol"] = json!(proto);
        }
        p
    })
}

fn rule(peers_key: &'static str) -> impl Strategy<Value = Value> {
    (
        proptest::option::of(proptest::collection::vec(peer(), 0..3)),
        proptest::option::of(proptest::collection::vec(port(), 0..3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = json!({});
            if let Some(p) = peers {
                r[peers_key] = json!(p);
            }
            if let Some(p) = ports {
                r["ports"] = json!(p);
            }
            r
        })
}

fn policy() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(NAMESPACES.to_vec()),
        selector(&POD_LABELS),
        proptest::option::of(proptest::sample::subsequence(vec!["Ingress", "Egress"], 0..=2)),
        proptest::option::of(proptest::collection::vec(rule("from"), 0..3)),
        proptest::option::of(proptest::collection::vec(rule("to"), 0..3)),
    )
        .prop_map(|(ns, sel, types, ingress, egress)| {
            let mut spec = json!({"podSelector": sel});
            if let Some(t) = types {
                spec["policyTypes"] = json!(t);
            }
            if let Some(i) = ingress {
                spec["ingress"] = json!(i);
            }
            if let Some(e) = egress {
                spec["egress"] = json!(e);
            }
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"namespace": ns}, "spec": spec})
        })
}

fn pod() -> impl Strategy<Value = Value> {
    let http = proptest::sample::select(vec![80u16, 8080]);
    (
        proptest::sample::select(NAMESPACES.to_vec()),
        labels(&POD_LABELS),
        http,
        proptest::sample::subsequence(vec![0usize, 1, 2, 3], 0..4),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(ns, labels, http_port, ports, host_network)| {
            let all = [
                json!({"name": "http", "containerPort": http_port}),
                json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}),
                json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
                json!({"containerPort": 81}),
            ];
            let ports: Vec<Value> = ports.into_iter().map(|i| all[i].clone()).collect();
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "labels": labels},
                   "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "ports": ports}]}})
        })
}

#[derive(Debug, Clone)]
struct Cluster {
    namespaces: Vec<Value>,
    pods: Vec<Value>,
    policies: Vec<Value>,
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        proptest::collection::vec(labels(&NS_LABELS), 3),
        proptest::collection::vec(pod(), 0..8),
        proptest::collection::vec(policy(), 0..5),
    )
        .prop_map(|(ns_labels, mut pods, mut policies)| {
            let namespaces = ["x", "y", "z"]
                .iter()
                .zip(ns_labels)
                .map(|(n, l)| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": l}}))
                .collect();
            for (i, p) in pods.iter_mut().enumerate() {
                p["metadata"]["name"] = json!(format!("p{i}"));
                p["status"] = json!({"podIP": format!("10.0.0.{}", i + 1)});
            }
            for (i, p) in policies.iter_mut().enumerate() {
                p["metadata"]["name"] = json!(format!("np{i}"));
            }
            Cluster { namespaces, pods, policies }
        })
}

// ---------- the naive model: the API reference read literally, over the raw JSON ----------

fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn naive_selects(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel["matchLabels"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    });
    let exprs_ok = sel["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values = str_list(&e["values"]);
            let have = labels.get(key);
            match e["operator"].as_str().unwrap_or_default() {
                "In" => have.is_some_and(|v| values.contains(&v.as_str())),
                "NotIn" => !have.is_some_and(|v| values.contains(&v.as_str())),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

struct Naive<'a> {
    c: &'a Cluster,
}

impl Naive<'_> {
    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = self
            .c
            .namespaces
            .iter()
            .find(|n| n["metadata"]["name"] == ns)
            .and_then(|n| serde_json::from_value(n["metadata"]["labels"].clone()).ok())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    }

    /// The pod that owns `ip`; host-network pods are not pods for policy purposes. Of two
    /// pods claiming one address, the first in (namespace, name) order owns it.
    fn pod(&self, ip: IpAddr) -> Option<&Value> {
        self.c
            .pods
            .iter()
            .filter(|p| {
                p["status"]["podIP"].as_str() == Some(&ip.to_string())
                    && p["spec"]["hostNetwork"] != true
            })
            .min_by_key(|p| {
                (
                    p["metadata"]["namespace"].as_str().unwrap_or_default(),
                    p["metadata"]["name"].as_str().unwrap_or_default(),
                )
            })
    }

    fn pod_labels(p: &Value) -> BTreeMap<String, String> {
        serde_json::from_value(p["metadata"]["labels"].clone()).unwrap_or_default()
    }

    fn policy_types(np: &Value) -> Vec<&str> {
        match np["spec"]["policyTypes"].as_array() {
            Some(_) => str_list(&np["spec"]["policyTypes"]),
            None => {
                let has_egress = np["spec"]["egress"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty());
                if has_egress {
                    vec!["Ingress", "Egress"]
                } else {
                    vec!["Ingress"]
                }
            }
        }
    }

    fn peer_matches(&self, np: &Value, peer: &Value, ip: IpAddr) -> bool {
        if let Some(block) = peer.get("ipBlock") {
            let inside = |c: &str| {
                let (a, p) = c.split_once('/').unwrap();
                let a: std::net::Ipv4Addr = a.parse().unwrap();
                let p: u32 = p.parse().unwrap();
                let IpAddr::V4(ip) = ip else { return false };
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                (u32::from(ip) & mask) == (u32::from(a) & mask)
            };
            return inside(block["cidr"].as_str().unwrap())
                && !str_list(&block["except"]).iter().any(|e| inside(e));
        }
        let Some(pod) = self.pod(ip) else {
            return false;
        };
        let pod_ns = pod["metadata"]["namespace"].as_str().unwrap();
        let ns_ok = match peer.get("namespaceSelector") {
            None => pod_ns == np["metadata"]["namespace"],
            Some(sel) => naive_selects(sel, &self.ns_labels(pod_ns)),
        };
        let pod_ok = peer
            .get("podSelector")
            .is_none_or(|sel| naive_selects(sel, &Self::pod_labels(pod)));
        ns_ok && pod_ok
    }

    fn port_matches(&self, entry: &Value, dst: IpAddr, proto: Protocol, port: u16) -> bool {
        let want = entry["protocol"].as_str().unwrap_or("TCP");
        let proto_ok = matches!(
            (want, proto),
            ("TCP", Protocol::Tcp) | ("UDP", Protocol::Udp) | ("SCTP", Protocol::Sctp)
        );
        if !proto_ok {
            return false;
        }
        match &entry["port"] {
            Value::Null => true,
            Value::Number(n) => {
                let lo = n.as_u64().unwrap();
                let hi = entry["endPort"].as_u64().unwrap_or(lo);
                (lo..=hi).contains(&u64::from(port))
            }
            Value::String(name) => self.pod(dst).is_some_and(|p| {
                p["spec"]["containers"].as_array().unwrap().iter().any(|c| {
                    c["ports"].as_array().into_iter().flatten().any(|cp| {
                        cp["name"].as_str() == Some(name)
                            && cp["containerPort"].as_u64() == Some(u64::from(port))
                            && cp["protocol"].as_str().unwrap_or("TCP") == want
                    })
                })
            }),
            _ => false,
        }
    }

    /// One direction: `own` is the pod whose policies apply, `other` the far end.
    fn direction_allows(
        &self,
        egress: bool,
        src: IpAddr,
        dst: IpAddr,
        proto: Protocol,
        port: u16,
    ) -> bool {
        let own = if egress { src } else { dst };
        let other = if egress { dst } else { src };
        let Some(pod) = self.pod(own) else {
            return true;
        };
        let (type_name, rules_key, peers_key) = if egress {
            ("Egress", "egress", "to")
        } else {
            ("Ingress", "ingress", "from")
        };
        let selecting: Vec<&Value> = self
            .c
            .policies
            .iter()
            .filter(|np| np["metadata"]["namespace"] == pod["metadata"]["namespace"])
            .filter(|np| Self::policy_types(np).contains(&type_name))
            .filter(|np| naive_selects(&np["spec"]["podSelector"], &Self::pod_labels(pod)))
            .collect();
        if selecting.is_empty() {
            return true;
        }
        selecting.iter().any(|np| {
            np["spec"][rules_key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    let peers = rule[peers_key].as_array().filter(|p| !p.is_empty());
                    let peer_ok =
                        peers.is_none_or(|ps| ps.iter().any(|p| self.peer_matches(np, p, other)));
                    let ports = rule["ports"].as_array().filter(|p| !p.is_empty());
                    let port_ok = ports
                        .is_none_or(|ps| ps.iter().any(|p| self.port_matches(p, dst, proto, port)));
                    peer_ok && port_ok
                })
        })
    }

    fn allowed(&self, src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> (bool, bool) {
        (
            self.direction_allows(true, src, dst, proto, port),
            self.direction_allows(false, src, dst, proto, port),
        )
    }
}

fn compile(c: &Cluster) -> PolicySet {
    let ns: Vec<_> = c
        .namespaces
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let pods: Vec<_> = c
        .pods
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let nps: Vec<_> = c
        .policies
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let (set, problems) = PolicySet::from_k8s(&ns, &pods, &nps);
    assert!(
        problems.is_empty(),
        "generated manifests must be valid: {problems:?}"
    );
    set
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_naive_spec(c in cluster()) {
        let set = compile(&c);
        let naive = Naive { c: &c };
        let mut ips: Vec<IpAddr> = (1..=c.pods.len()).map(|i| format!("10.0.0.{i}").parse().unwrap()).collect();
        ips.extend(EXTERNAL.iter().map(|s| s.parse::<IpAddr>().unwrap()));
        for &src in &ips {
            for &dst in &ips {
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Other(1)] {
                    for port in PORTS {
                        let port = if matches!(proto, Protocol::Other(_)) { 0 } else { port };
                        let v = set.verdict(src, dst, proto, port);
                        let (eg, ing) = naive.allowed(src, dst, proto, port);
                        prop_assert_eq!(v.egress.is_allowed(), eg, "egress {} -> {} {}/{}\n{:#}", src, dst, port, proto, json!(c.policies));
                        prop_assert_eq!(v.ingress.is_allowed(), ing, "ingress {} -> {} {}/{}\n{:#}", src, dst, port, proto, json!(c.policies));
                        // explain never disagrees with the fast path
                        let e = set.explain(src, dst, proto, port);
                        prop_assert_eq!(e.allowed, eg && ing);
                    }
                }
            }
        }
    }
}

// ---------- incremental compilation: random change sequences ----------

/// Pod slots (names `p0`..); each slot's pod may live in any namespace, so one slot can be
/// several objects over a sequence.
const POD_SLOTS: usize = 6;
const POLICY_SLOTS: usize = 4;
/// Pods draw addresses from a pool smaller than the pods, so two pods sometimes claim one.
const IP_POOL: u8 = 5;
const NODES: [&str; 2] = ["n1", "n2"];

#[derive(Debug, Clone)]
enum Op {
    Namespace(usize, BTreeMap<String, String>),
    DeleteNamespace(usize),
    Pod(usize, Value),
    DeletePod(usize),
    Policy(usize, Value),
    DeletePolicy(usize),
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let placed_pod = (
        pod(),
        proptest::option::of(1..=IP_POOL),
        proptest::sample::select(NODES.to_vec()),
    )
        .prop_map(|(mut p, ip, node)| {
            match ip {
                Some(i) => p["status"] = json!({"podIP": format!("10.0.0.{i}")}),
                None => p["status"] = json!({}),
            }
            p["spec"]["nodeName"] = json!(node);
            p
        });
    prop_oneof![
        1 => (0..3usize, labels(&NS_LABELS)).prop_map(|(i, l)| Op::Namespace(i, l)),
        1 => (0..3usize).prop_map(Op::DeleteNamespace),
        4 => (0..POD_SLOTS, placed_pod).prop_map(|(i, p)| Op::Pod(i, p)),
        2 => (0..POD_SLOTS).prop_map(Op::DeletePod),
        3 => (0..POLICY_SLOTS, policy()).prop_map(|(i, p)| Op::Policy(i, p)),
        1 => (0..POLICY_SLOTS).prop_map(Op::DeletePolicy),
        1 => Just(Op::Snapshot),
    ]
}

/// The objects after a sequence, by slot, as the API server would hold them.
#[derive(Default, Clone)]
struct World {
    namespaces: BTreeMap<usize, Value>,
    pods: BTreeMap<usize, Value>,
    policies: BTreeMap<usize, Value>,
}

impl World {
    fn cluster(&self) -> Cluster {
        Cluster {
            namespaces: self.namespaces.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
        }
    }
}

fn key(v: &Value) -> (String, String) {
    (
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn model_pod(v: &Value) -> Pod {
    Pod::from_k8s(&serde_json::from_value(v.clone()).unwrap()).unwrap()
}

fn model_policy(v: &Value) -> Policy {
    Policy::from_k8s(&serde_json::from_value(v.clone()).unwrap()).unwrap()
}

fn model_namespace(v: &Value) -> Namespace {
    Namespace::from_k8s(&serde_json::from_value(v.clone()).unwrap()).unwrap()
}

/// Applies `op` to the world and to the index, as the agent's watch would deliver it.
fn step(world: &mut World, index: &mut PolicyIndex, op: &Op) {
    let ns_names = ["x", "y", "z"];
    match op {
        Op::Namespace(i, labels) => {
            let v = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns_names[*i], "labels": labels}});
            index.apply_namespace(model_namespace(&v));
            world.namespaces.insert(*i, v);
        }
        Op::DeleteNamespace(i) => {
            index.delete_namespace(ns_names[*i]);
            world.namespaces.remove(i);
        }
        Op::Pod(i, p) => {
            let mut p = p.clone();
            p["metadata"]["name"] = json!(format!("p{i}"));
            // A slot's pod moving namespace is a delete of the old object and a create.
            if let Some(old) = world.pods.get(i).filter(|old| key(old) != key(&p)) {
                let (ns, name) = key(old);
                index.delete_pod(&ns, &name);
            }
            index.apply_pod(model_pod(&p));
            world.pods.insert(*i, p);
        }
        Op::DeletePod(i) => {
            if let Some(old) = world.pods.remove(i) {
                let (ns, name) = key(&old);
                index.delete_pod(&ns, &name);
            }
        }
        Op::Policy(i, p) => {
            let mut p = p.clone();
            p["metadata"]["name"] = json!(format!("np{i}"));
            if let Some(old) = world.policies.get(i).filter(|old| key(old) != key(&p)) {
                let (ns, name) = key(old);
                index.delete_policy(&ns, &name);
            }
            index.apply_policy(model_policy(&p));
            world.policies.insert(*i, p);
        }
        Op::DeletePolicy(i) => {
            if let Some(old) = world.policies.remove(i) {
                let (ns, name) = key(&old);
                index.delete_policy(&ns, &name);
            }
        }
        Op::Snapshot => {
            index.snapshot();
        }
    }
}

/// A full rebuild of the world into a fresh index of `scope`.
fn rebuild(world: &World, scope: &Scope) -> PolicySet {
    let mut index = PolicyIndex::new(scope.clone());
    for v in world.namespaces.values() {
        index.apply_namespace(model_namespace(v));
    }
    for v in world.pods.values() {
        index.apply_pod(model_pod(v));
    }
    for v in world.policies.values() {
        index.apply_policy(model_policy(v));
    }
    index.snapshot()
}

/// A verdict with policy ids replaced by names (ids differ between indexes).
fn named(set: &PolicySet, v: Verdict) -> String {
    let name = |id: u32| {
        set.policy(id)
            .map(|p| p.object_ref().to_string())
            .unwrap_or_else(|| format!("unknown policy id {id}"))
    };
    match v {
        Verdict::Allow(AllowReason::NoPod) => "allow: no pod".into(),
        Verdict::Allow(AllowReason::NotSelected) => "allow: not selected".into(),
        Verdict::Allow(AllowReason::Rule(r)) => {
            format!("allow: {} rule {}", name(r.policy), r.rule)
        }
        Verdict::Deny(DenyReason::NoRuleMatched { first_policy }) => {
            format!("deny: {}", name(first_policy))
        }
    }
}

/// `explain`, with the verdicts named as [`named`] does.
fn explained(set: &PolicySet, src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> String {
    let e = set.explain(src, dst, proto, port);
    let side = |d: &kwire::policy::DirectionExplanation| {
        format!(
            "{:?} {} {:?} {:?}",
            d.pod,
            named(set, d.verdict),
            d.selected_by,
            d.decided_by
        )
    };
    format!("{} | {} | {}", side(&e.egress), side(&e.ingress), e.allowed)
}

fn on_node(c: &Cluster, ip: IpAddr, node: &str) -> bool {
    Naive { c }
        .pod(ip)
        .is_none_or(|p| p["spec"]["nodeName"] == node)
}

/// Every verdict and explanation of `incremental` equals the rebuild's; where the scope
/// enforces, both equal the naive reading.
fn same_answers(
    world: &World,
    incremental: &PolicySet,
    scope: &Scope,
) -> Result<(), TestCaseError> {
    let full = rebuild(world, scope);
    let c = world.cluster();
    let naive = Naive { c: &c };
    let mut ips: Vec<IpAddr> = (1..=IP_POOL + 1)
        .map(|i| format!("10.0.0.{i}").parse().unwrap())
        .collect();
    ips.extend(EXTERNAL.iter().map(|s| s.parse::<IpAddr>().unwrap()));
    for &src in &ips {
        for &dst in &ips {
            for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Other(1)] {
                for port in PORTS {
                    let port = if matches!(proto, Protocol::Other(_)) {
                        0
                    } else {
                        port
                    };
                    let a = incremental.verdict(src, dst, proto, port);
                    let b = full.verdict(src, dst, proto, port);
                    let what = || {
                        format!(
                            "{src} -> {dst} {port}/{proto} in {scope:?}\n{:#}",
                            json!(c.policies)
                        )
                    };
                    prop_assert_eq!(
                        named(incremental, a.egress),
                        named(&full, b.egress),
                        "egress {}",
                        what()
                    );
                    prop_assert_eq!(
                        named(incremental, a.ingress),
                        named(&full, b.ingress),
                        "ingress {}",
                        what()
                    );
                    prop_assert_eq!(
                        explained(incremental, src, dst, proto, port),
                        explained(&full, src, dst, proto, port),
                        "explain {}",
                        what()
                    );
                    let (eg, ing) = naive.allowed(src, dst, proto, port);
                    let enforced = |own| match scope {
                        Scope::All => true,
                        Scope::Node(n) => on_node(&c, own, n),
                    };
                    if enforced(src) {
                        prop_assert_eq!(a.egress.is_allowed(), eg, "naive egress {}", what());
                    }
                    if enforced(dst) {
                        prop_assert_eq!(a.ingress.is_allowed(), ing, "naive ingress {}", what());
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_rebuild(ops in proptest::collection::vec(op(), 1..40)) {
        for scope in [Scope::All, Scope::Node("n1".into())] {
            let mut world = World::default();
            let mut index = PolicyIndex::new(scope.clone());
            let mut taken = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                step(&mut world, &mut index, op);
                if matches!(op, Op::Snapshot) || i + 1 == ops.len() {
                    let snap = index.snapshot();
                    same_answers(&world, &snap, &scope)?;
                    taken.push((snap, world.clone()));
                }
            }
            // Earlier snapshots are untouched by later changes (copy on write).
            for (snap, then) in &taken {
                same_answers(then, snap, &scope)?;
            }
        }
    }
}

// ---------- saved inputs: what a restarted agent enforces first ----------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The inputs saved from a live index after a random history, read back into a new
    /// index, give the live snapshot's verdicts and explanations (by policy name), in both
    /// scopes; and the restored index goes on folding later changes exactly.
    #[test]
    fn saved_then_restored_equals_live(
        namespaces in proptest::collection::vec(labels(&NS_LABELS), 3),
        ops in proptest::collection::vec(op(), 1..40),
        later in proptest::collection::vec(op(), 0..10),
    ) {
        // The namespaces exist with labels first, as in a cluster (the history may relabel or
        // delete them): namespace selectors then depend on saved labels in most cases.
        let given = namespaces.into_iter().enumerate().map(|(i, l)| Op::Namespace(i, l));
        let ops: Vec<Op> = given.chain(ops).collect();
        for scope in [Scope::All, Scope::Node("n1".into())] {
            let mut world = World::default();
            let mut live = PolicyIndex::new(scope.clone());
            for op in &ops {
                step(&mut world, &mut live, op);
            }
            let saved = live.save_inputs();
            let mut restored = PolicyIndex::restore_inputs(scope.clone(), &saved)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(restored.pod_count(), live.pod_count());
            prop_assert_eq!(restored.policy_count(), live.policy_count());
            prop_assert_eq!(restored.identity_count(), live.identity_count());
            same_answers(&world, &live.snapshot(), &scope)?;
            same_answers(&world, &restored.snapshot(), &scope)?;
            // What the API lists after the restart (the same objects) folds as unchanged:
            // every label, address, port, node and policy part came back exactly.
            let names = |ix: &PolicyIndex| {
                let mut v: Vec<String> = ix.namespace_names().map(String::from).collect();
                v.sort();
                v
            };
            prop_assert_eq!(names(&restored), names(&live));
            for v in world.namespaces.values() {
                prop_assert!(!restored.apply_namespace(model_namespace(v)), "{}", v);
            }
            for v in world.pods.values() {
                prop_assert!(!restored.apply_pod(model_pod(v)), "{}", v);
            }
            for v in world.policies.values() {
                prop_assert!(!restored.apply_policy(model_policy(v)), "{}", v);
            }
            prop_assert!(!restored.is_changed());
            // Saved again, the restored index writes as much (the order of pods in a
            // namespace may differ).
            prop_assert_eq!(restored.save_inputs().len(), saved.len());
            for op in &later {
                step(&mut world, &mut restored, op);
            }
            same_answers(&world, &restored.snapshot(), &scope)?;
        }
    }
}
