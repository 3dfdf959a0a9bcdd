//! The compiled PolicySet: per-pod rule tables with pre-resolved peers, the per-new-flow verdicts, and the slow `explain`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::networking::v1 as netv1;

use super::ipset::IpRangeSet;
use super::model::{ModelError, Namespace, ObjectRef, Pod};
use super::spec::{Peer, Policy, PolicyError, PortMatch, PortSpec};
use super::{AllowReason, DenyReason, Direction, Protocol, RuleRef, Verdict};

/// The addresses a rule admits.
#[derive(Debug)]
enum PeerSet {
    /// `from`/`to` missing or empty: any address.
    Any,
    Ranges(IpRangeSet),
}

impl PeerSet {
    fn contains(&self, ip: IpAddr) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Ranges(r) => r.contains(ip),
        }
    }
}

#[derive(Debug)]
enum CompiledPort {
    Range {
        protocol: Protocol,
        lo: u16,
        hi: u16,
    },
    /// Egress only: resolved against the destination pod at verdict time.
    Named { protocol: Protocol, name: Box<str> },
}

#[derive(Debug)]
enum PortSet {
    /// `ports` missing or empty: every port of every protocol.
    Any,
    /// Some entry must match; an empty list matches nothing (e.g. only named ports the pod
    /// does not declare).
    List(Box<[CompiledPort]>),
}

#[derive(Debug)]
struct CompiledRule {
    at: RuleRef,
    peers: Arc<PeerSet>,
    ports: PortSet,
}

/// The rules of one direction of one pod, present iff some policy of that direction selects it.
#[derive(Debug, Default)]
struct DirectionTable {
    /// Indexes of the selecting policies, ascending.
    selected_by: Vec<u32>,
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Default)]
struct PodTable {
    ingress: Option<DirectionTable>,
    egress: Option<DirectionTable>,
}

/// Both directions of one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub egress: Verdict,
    pub ingress: Verdict,
}

impl FlowVerdict {
    /// A flow passes only if both its source's egress and its destination's ingress allow it.
    pub fn is_allowed(&self) -> bool {
        self.egress.is_allowed() && self.ingress.is_allowed()
    }
}

/// An immutable, compiled snapshot of the cluster's NetworkPolicies.
///
/// Policies are indexed in (namespace, name) order; [`RuleRef::policy`] indexes
/// [`PolicySet::policies`].
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, Namespace>,
    /// Sorted by (namespace, name).
    pods: Vec<Pod>,
    /// Pod IP -> index into `pods` and `tables`. Host-network pods are not in it.
    pod_by_ip: HashMap<IpAddr, u32>,
    tables: Vec<PodTable>,
}

/// A k8s object that [`PolicySet::from_k8s`] skipped or read leniently.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("skipped: {0}")]
    Object(#[from] ModelError),
    #[error("read fail-closed: {0}")]
    Policy(#[from] PolicyError),
}

impl PolicySet {
    /// Whether any NetworkPolicy exists: without one every flow is allowed and the packet
    /// loop skips connection tracking altogether.
    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// Compiles a snapshot. Never fails: namespaces that pods or policies refer to but that are
    /// not given are assumed to exist with only the `kubernetes.io/metadata.name` label; the
    /// first of two pods (in namespace/name order) claiming one IP keeps it.
    pub fn compile(namespaces: Vec<Namespace>, pods: Vec<Pod>, policies: Vec<Policy>) -> Self {
        let mut ns_map: BTreeMap<String, Namespace> = BTreeMap::new();
        for ns in namespaces {
            // Re-applied in case the caller built the struct by hand.
            let ns = Namespace::new(ns.name, ns.labels);
            ns_map.entry(ns.name.clone()).or_insert(ns);
        }
        let mut pods = pods;
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut policies = policies;
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for name in pods
            .iter()
            .map(|p| &p.namespace)
            .chain(policies.iter().map(|p| &p.namespace))
        {
            if !ns_map.contains_key(name) {
                ns_map.insert(name.clone(), Namespace::new(name.clone(), BTreeMap::new()));
            }
        }

        let mut pod_by_ip = HashMap::new();
        let mut pods_by_ns: HashMap<&str, Vec<u32>> = HashMap::new();
        for (i, pod) in pods.iter().enumerate() {
            if pod.host_network {
                continue;
            }
            let i = i as u32;
            pods_by_ns
                .entry(pod.namespace.as_str())
                .or_default()
                .push(i);
            for ip in &pod.ips {
                pod_by_ip.entry(*ip).or_insert(i);
            }
        }

        let mut tables: Vec<PodTable> = (0..pods.len()).map(|_| PodTable::default()).collect();
        let no_pods = Vec::new();
        for (pi, policy) in policies.iter().enumerate() {
            let pi = pi as u32;
            let selected: Vec<u32> = pods_by_ns
                .get(policy.namespace.as_str())
                .unwrap_or(&no_pods)
                .iter()
                .copied()
                .filter(|&i| policy.pod_selector.matches(&pods[i as usize].labels))
                .collect();
            if selected.is_empty() {
                continue;
            }
            for direction in [Direction::Ingress, Direction::Egress] {
                let Some(rules) = policy.rules(direction) else {
                    continue;
                };
                let compiled_peers: Vec<Arc<PeerSet>> = rules
                    .iter()
                    .map(|rule| {
                        Arc::new(match &rule.peers {
                            None => PeerSet::Any,
                            Some(peers) => {
                                let mut set = IpRangeSet::new();
                                for peer in peers {
                                    add_peer(&mut set, peer, policy, &ns_map, &pods, &pods_by_ns);
                                }
                                set.normalize();
                                PeerSet::Ranges(set)
                            }
                        })
                    })
                    .collect();
                for &podi in &selected {
                    let pod = &pods[podi as usize];
                    let table = &mut tables[podi as usize];
                    let slot = match direction {
                        Direction::Ingress => &mut table.ingress,
                        Direction::Egress => &mut table.egress,
                    };
                    let dt = slot.get_or_insert_with(DirectionTable::default);
                    dt.selected_by.push(pi);
                    for (ri, rule) in rules.iter().enumerate() {
                        let ports = compile_ports(&rule.ports, direction, pod);
                        if matches!(&ports, PortSet::List(l) if l.is_empty()) {
                            continue; // can match nothing
                        }
                        if matches!(&*compiled_peers[ri], PeerSet::Ranges(r) if r.is_empty()) {
                            continue;
                        }
                        dt.rules.push(CompiledRule {
                            at: RuleRef {
                                policy: pi,
                                rule: ri as u32,
                            },
                            peers: Arc::clone(&compiled_peers[ri]),
                            ports,
                        });
                    }
                }
            }
        }

        PolicySet {
            policies,
            namespaces: ns_map,
            pods,
            pod_by_ip,
            tables,
        }
    }

    /// Converts k8s-openapi objects and compiles them, for the control plane. Invalid policy
    /// parts fail closed (match nothing, see [`Policy::from_k8s_lenient`]); Pods and Namespaces
    /// that cannot be read are skipped. Everything skipped or degraded is returned, to be logged.
    pub fn from_k8s(
        namespaces: &[corev1::Namespace],
        pods: &[corev1::Pod],
        policies: &[netv1::NetworkPolicy],
    ) -> (Self, Vec<InputError>) {
        let mut problems = Vec::new();
        let mut ns = Vec::new();
        for n in namespaces {
            match Namespace::from_k8s(n) {
                Ok(n) => ns.push(n),
                Err(e) => problems.push(e.into()),
            }
        }
        let mut model_pods = Vec::new();
        for p in pods {
            match Pod::from_k8s(p) {
                Ok(p) => model_pods.push(p),
                Err(e) => problems.push(e.into()),
            }
        }
        let pods = model_pods;
        let mut pols = Vec::new();
        for np in policies {
            match Policy::from_k8s_lenient(np) {
                Ok((p, errs)) => {
                    pols.push(p);
                    problems.extend(errs.into_iter().map(InputError::from));
                }
                Err(e) => problems.push(e.into()),
            }
        }
        (PolicySet::compile(ns, pods, pols), problems)
    }

    /// Egress of a new flow leaving `src_pod`: the loop asks this for flows its local pods send.
    /// No allocation; cost depends on the rules of the policies selecting `src_pod` only.
    pub fn egress_verdict(
        &self,
        src_pod: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> Verdict {
        // A named port resolves against the destination pod, looked up at most once.
        let mut dst_pod: Option<Option<&Pod>> = None;
        self.direction_verdict(
            src_pod,
            |t| t.egress.as_ref(),
            dst,
            protocol,
            dst_port,
            |name| {
                dst_pod
                    .get_or_insert_with(|| self.pod_at(dst))
                    .is_some_and(|pod| pod.named_port(name, protocol) == Some(dst_port))
            },
        )
    }

    /// Ingress of a new flow entering `dst_pod`: the loop asks this for flows to its local pods.
    /// No allocation; cost depends on the rules of the policies selecting `dst_pod` only.
    pub fn ingress_verdict(
        &self,
        src: IpAddr,
        dst_pod: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> Verdict {
        // Named ports were resolved per pod at compile time for ingress; none are left.
        self.direction_verdict(
            dst_pod,
            |t| t.ingress.as_ref(),
            src,
            protocol,
            dst_port,
            |_| false,
        )
    }

    /// The rule scan both directions share: the rules selecting `local_pod` in one direction,
    /// the first whose ports and peers match `remote` decides.
    fn direction_verdict<'a>(
        &'a self,
        local_pod: IpAddr,
        direction: impl Fn(&'a PodTable) -> Option<&'a DirectionTable>,
        remote: IpAddr,
        protocol: Protocol,
        dst_port: u16,
        mut named_port_matches: impl FnMut(&str) -> bool,
    ) -> Verdict {
        let Some(&podi) = self.pod_by_ip.get(&local_pod) else {
            return Verdict::Allow(AllowReason::NoPod);
        };
        let Some(table) = self.tables.get(podi as usize).and_then(direction) else {
            return Verdict::Allow(AllowReason::NotSelected);
        };
        for rule in &table.rules {
            let ports_ok = match &rule.ports {
                PortSet::Any => true,
                PortSet::List(list) => list.iter().any(|p| match p {
                    CompiledPort::Range {
                        protocol: pr,
                        lo,
                        hi,
                    } => *pr == protocol && (*lo..=*hi).contains(&dst_port),
                    CompiledPort::Named { protocol: pr, name } => {
                        *pr == protocol && named_port_matches(name)
                    }
                }),
            };
            if ports_ok && rule.peers.contains(remote) {
                return Verdict::Allow(AllowReason::Rule(rule.at));
            }
        }
        Verdict::Deny(DenyReason::NoRuleMatched {
            first_policy: table.selected_by.first().copied().unwrap_or(0),
        })
    }

    /// Both directions, for a flow whose two ends this node owns (and for trace).
    pub fn verdict(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> FlowVerdict {
        FlowVerdict {
            egress: self.egress_verdict(src, dst, protocol, dst_port),
            ingress: self.ingress_verdict(src, dst, protocol, dst_port),
        }
    }

    /// The policies, in index order (sorted by namespace, name).
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The pods, sorted by namespace, name.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Every namespace known, given or implied by a pod or policy.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// The (non-host-network) pod that has `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pod_by_ip
            .get(&ip)
            .and_then(|&i| self.pods.get(i as usize))
    }

    pub fn find_pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .and_then(|i| self.pods.get(i))
    }

    /// The slow path for `kwire policy trace`: the verdicts with names. Takes the verdicts from
    /// the compiled engine and annotates them; it does not decide anything itself.
    pub fn explain(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> Explanation {
        let v = self.verdict(src, dst, protocol, dst_port);
        Explanation {
            egress: self.explain_direction(
                Direction::Egress,
                src,
                dst,
                protocol,
                dst_port,
                v.egress,
            ),
            ingress: self.explain_direction(
                Direction::Ingress,
                src,
                dst,
                protocol,
                dst_port,
                v.ingress,
            ),
            allowed: v.is_allowed(),
        }
    }

    fn explain_direction(
        &self,
        direction: Direction,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
        verdict: Verdict,
    ) -> DirectionExplanation {
        let (own, other) = match direction {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let podi = self.pod_by_ip.get(&own).copied();
        let pod = podi.and_then(|i| self.pods.get(i as usize));
        let selected_by = podi
            .and_then(|i| self.tables.get(i as usize))
            .and_then(|t| match direction {
                Direction::Ingress => t.ingress.as_ref(),
                Direction::Egress => t.egress.as_ref(),
            })
            .map(|t| {
                t.selected_by
                    .iter()
                    .filter_map(|&p| self.policies.get(p as usize))
                    .map(Policy::object_ref)
                    .collect()
            })
            .unwrap_or_default();
        let decided_by = match verdict {
            Verdict::Allow(AllowReason::Rule(at)) => {
                self.describe_match(direction, at, other, dst, protocol, dst_port)
            }
            _ => None,
        };
        DirectionExplanation {
            direction,
            pod: pod.map(Pod::object_ref),
            verdict,
            selected_by,
            decided_by,
        }
    }

    fn describe_match(
        &self,
        direction: Direction,
        at: RuleRef,
        peer_ip: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> Option<RuleMatch> {
        let policy = self.policies.get(at.policy as usize)?;
        let rule = policy.rules(direction)?.get(at.rule as usize)?;
        let peer = rule.peers.as_ref().and_then(|peers| {
            peers
                .iter()
                .position(|p| self.peer_matches(policy, p, peer_ip))
                .map(|i| (i, peers[i].to_string()))
        });
        let port = rule.ports.iter().enumerate().find_map(|(i, spec)| {
            self.port_matches(spec, dst, protocol, dst_port)
                .then(|| (i, spec.to_string()))
        });
        Some(RuleMatch {
            policy: policy.object_ref(),
            direction,
            rule: at.rule as usize,
            peer: peer.as_ref().map(|p| p.0),
            peer_text: peer.map(|p| p.1).unwrap_or_else(|| match direction {
                Direction::Ingress => "all sources (no from)".to_string(),
                Direction::Egress => "all destinations (no to)".to_string(),
            }),
            port: port.as_ref().map(|p| p.0),
            port_text: port
                .map(|p| p.1)
                .unwrap_or_else(|| "all ports (no ports)".to_string()),
        })
    }

    /// Slow, direct reading of one peer, for explain.
    fn peer_matches(&self, policy: &Policy, peer: &Peer, ip: IpAddr) -> bool {
        match peer {
            Peer::Invalid => false,
            Peer::IpBlock(b) => b.cidr.contains(ip) && !b.except.iter().any(|e| e.contains(ip)),
            Peer::Pods { namespaces, pods } => {
                let Some(pod) = self.pod_at(ip) else {
                    return false;
                };
                let ns_ok = match namespaces {
                    None => pod.namespace == policy.namespace,
                    Some(sel) => self
                        .namespaces
                        .get(&pod.namespace)
                        .is_some_and(|ns| sel.matches(&ns.labels)),
                };
                ns_ok && pods.matches(&pod.labels)
            }
        }
    }

    fn port_matches(
        &self,
        spec: &PortSpec,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> bool {
        spec.protocol == protocol
            && match &spec.port {
                PortMatch::All => true,
                PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&dst_port),
                PortMatch::Named(name) => self
                    .pod_at(dst)
                    .is_some_and(|p| p.named_port(name, protocol) == Some(dst_port)),
                PortMatch::Invalid => false,
            }
    }
}

fn add_peer(
    set: &mut IpRangeSet,
    peer: &Peer,
    policy: &Policy,
    namespaces: &BTreeMap<String, Namespace>,
    pods: &[Pod],
    pods_by_ns: &HashMap<&str, Vec<u32>>,
) {
    match peer {
        Peer::Invalid => {}
        Peer::IpBlock(b) => set.insert_block(b.cidr, &b.except),
        Peer::Pods {
            namespaces: ns_sel,
            pods: pod_sel,
        } => {
            let mut add_ns = |ns: &str| {
                for &i in pods_by_ns.get(ns).into_iter().flatten() {
                    let pod = &pods[i as usize];
                    if pod_sel.matches(&pod.labels) {
                        pod.ips.iter().for_each(|ip| set.insert_ip(*ip));
                    }
                }
            };
            match ns_sel {
                None => add_ns(&policy.namespace),
                Some(sel) => namespaces
                    .values()
                    .filter(|ns| sel.matches(&ns.labels))
                    .for_each(|ns| add_ns(&ns.name)),
            }
        }
    }
}

fn compile_ports(ports: &[PortSpec], direction: Direction, pod: &Pod) -> PortSet {
    if ports.is_empty() {
        return PortSet::Any;
    }
    let list = ports
        .iter()
        .filter_map(|spec| {
            let protocol = spec.protocol;
            match &spec.port {
                PortMatch::All => Some(CompiledPort::Range {
                    protocol,
                    lo: 0,
                    hi: u16::MAX,
                }),
                PortMatch::Range(lo, hi) => Some(CompiledPort::Range {
                    protocol,
                    lo: *lo,
                    hi: *hi,
                }),
                // Ingress: the destination is the selected pod itself, resolve now.
                PortMatch::Named(name) if direction == Direction::Ingress => {
                    pod.named_port(name, protocol).map(|p| CompiledPort::Range {
                        protocol,
                        lo: p,
                        hi: p,
                    })
                }
                PortMatch::Named(name) => Some(CompiledPort::Named {
                    protocol,
                    name: name.as_str().into(),
                }),
                PortMatch::Invalid => None,
            }
        })
        .collect();
    PortSet::List(list)
}

/// Names behind both verdicts of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub egress: DirectionExplanation,
    pub ingress: DirectionExplanation,
    pub allowed: bool,
}

/// Names behind one direction's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionExplanation {
    pub direction: Direction,
    /// The pod whose policies apply (source for egress, destination for ingress), if any.
    pub pod: Option<ObjectRef>,
    pub verdict: Verdict,
    /// Policies with this direction that select the pod (empty: not isolated).
    pub selected_by: Vec<ObjectRef>,
    /// The first rule that allows the flow (in policy then rule order), if one does.
    pub decided_by: Option<RuleMatch>,
}

/// The rule (and the peer and port entries in it) that allowed a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    pub policy: ObjectRef,
    pub direction: Direction,
    /// 0-based index into the policy's `ingress` or `egress` list.
    pub rule: usize,
    /// 0-based index into the rule's `from`/`to`; `None` when the rule has none (all peers).
    pub peer: Option<usize>,
    pub peer_text: String,
    /// 0-based index into the rule's `ports`; `None` when the rule has none (all ports).
    pub port: Option<usize>,
    pub port_text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ContainerPort, Namespace};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(ns: &str, name: &str, addr: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![ip(addr)],
            container_ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            node_name: "n1".into(),
            host_network: false,
        }
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Policy {
        let np: netv1::NetworkPolicy = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )
        .unwrap();
        Policy::from_k8s(&np).unwrap()
    }

    fn set(policies: Vec<Policy>) -> PolicySet {
        PolicySet::compile(
            vec![Namespace::new(
                "x",
                BTreeMap::from([("ns".into(), "x".into())]),
            )],
            vec![
                pod("x", "a", "10.0.1.1", &[("pod", "a")]),
                pod("x", "b", "10.0.1.2", &[("pod", "b")]),
                pod("y", "a", "10.0.2.1", &[("pod", "a")]),
            ],
            policies,
        )
    }

    #[test]
    fn open_without_policies() {
        let s = set(vec![]);
        let v = s.verdict(ip("10.0.1.1"), ip("10.0.1.2"), Protocol::Tcp, 80);
        assert_eq!(v.egress, Verdict::Allow(AllowReason::NotSelected));
        assert_eq!(v.ingress, Verdict::Allow(AllowReason::NotSelected));
        let v = s.verdict(ip("192.0.2.1"), ip("198.51.100.1"), Protocol::Udp, 53);
        assert_eq!(v.egress, Verdict::Allow(AllowReason::NoPod));
    }

    #[test]
    fn deny_and_allow_with_reasons() {
        let s = set(vec![
            policy("x", "deny", serde_json::json!({"podSelector": {}})),
            policy(
                "x",
                "allow-b",
                serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "http"}]}]}),
            ),
        ]);
        // Policies sorted by name: allow-b = 0, deny = 1.
        let v = s.ingress_verdict(ip("10.0.1.2"), ip("10.0.1.1"), Protocol::Tcp, 8080);
        assert_eq!(
            v,
            Verdict::Allow(AllowReason::Rule(RuleRef { policy: 0, rule: 0 }))
        );
        let v = s.ingress_verdict(ip("10.0.1.2"), ip("10.0.1.1"), Protocol::Tcp, 80);
        assert_eq!(
            v,
            Verdict::Deny(DenyReason::NoRuleMatched { first_policy: 0 })
        );
        let v = s.ingress_verdict(ip("10.0.2.1"), ip("10.0.1.2"), Protocol::Tcp, 8080);
        assert_eq!(
            v,
            Verdict::Deny(DenyReason::NoRuleMatched { first_policy: 1 })
        );
        let e = s.explain(ip("10.0.1.2"), ip("10.0.1.1"), Protocol::Tcp, 8080);
        let m = e.ingress.decided_by.unwrap();
        assert_eq!(m.policy.to_string(), "x/allow-b");
        assert_eq!((m.rule, m.peer, m.port), (0, Some(0), Some(0)));
        assert_eq!(e.ingress.selected_by.len(), 2);
        assert!(e.egress.selected_by.is_empty());
    }

    #[test]
    fn egress_named_port_resolves_on_destination() {
        let s = set(vec![policy(
            "y",
            "eg",
            serde_json::json!({"podSelector": {},
            "egress": [{"ports": [{"port": "http"}]}]}),
        )]);
        assert!(s
            .egress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Tcp, 8080)
            .is_allowed());
        assert!(!s
            .egress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Tcp, 80)
            .is_allowed());
        assert!(!s
            .egress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Udp, 8080)
            .is_allowed());
        // Not a pod: a named port cannot match.
        assert!(!s
            .egress_verdict(ip("10.0.2.1"), ip("192.0.2.1"), Protocol::Tcp, 8080)
            .is_allowed());
    }

    #[test]
    fn peer_namespace_and_ipblock() {
        let s = set(vec![policy(
            "x",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}},
                {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}
            ]}]}),
        )]);
        assert!(s
            .ingress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Tcp, 1)
            .is_allowed());
        assert!(!s
            .ingress_verdict(ip("10.0.1.2"), ip("10.0.1.1"), Protocol::Tcp, 1)
            .is_allowed());
        assert!(s
            .ingress_verdict(ip("192.0.2.1"), ip("10.0.1.1"), Protocol::Other(1), 0)
            .is_allowed());
        assert!(!s
            .ingress_verdict(ip("192.0.2.200"), ip("10.0.1.1"), Protocol::Tcp, 1)
            .is_allowed());
        let e = s.explain(ip("192.0.2.1"), ip("10.0.1.1"), Protocol::Tcp, 1);
        assert_eq!(e.ingress.decided_by.unwrap().peer, Some(1));
    }

    #[test]
    fn host_network_pods_are_not_policed() {
        let mut hn = pod("x", "hn", "10.9.9.9", &[("pod", "a")]);
        hn.host_network = true;
        let s = PolicySet::compile(
            vec![],
            vec![hn],
            vec![policy("x", "deny", serde_json::json!({"podSelector": {}}))],
        );
        assert_eq!(
            s.ingress_verdict(ip("10.0.0.1"), ip("10.9.9.9"), Protocol::Tcp, 80),
            Verdict::Allow(AllowReason::NoPod)
        );
    }
}
