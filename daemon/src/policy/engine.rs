//! The compiled PolicySet: an immutable snapshot with per-pod rule tables, the per-new-flow
//! verdicts, and the slow `explain`.
//!
//! A snapshot is made by [`super::PolicyIndex`] (incrementally) or [`PolicySet::compile`] (all
//! at once, through the same index). What it holds:
//! - `pods`: every pod address of the cluster (host-network pods excepted) with the pod's
//!   identity (its namespace and label set, shared by every pod with the same labels) and its
//!   named container ports; sharded and copied on write ([`IpMap`]).
//! - `tables`: the rule tables of the pods this snapshot enforces for (those of one node in the
//!   agent, all in `kwire policy trace`), by address; only pods some policy selects have one.
//! - `selectors`: for each distinct pod selector of an enforced rule (with its namespace
//!   scope), the sorted identities it matches. A rule refers to selectors by id, so a pod label
//!   change elsewhere in the cluster touches one identity set, never a table.
//! - `policies`: the policies the tables refer to, for names in `explain`.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::networking::v1 as netv1;

use super::ipmap::IpMap;
use super::ipset::IpRangeSet;
use super::model::{ContainerPort, ModelError, Namespace, ObjectRef, Pod};
use super::spec::{Peer, Policy, PolicyError, PortMatch, PortSpec};
use super::{AllowReason, DenyReason, Direction, Protocol, RuleRef, Verdict};

/// A pod as the snapshot (and the index) keeps it: what names it, what policy reads of it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PodRecord {
    pub key: PodKey,
    /// `None` for host-network pods (neither selected nor matched by pod selectors).
    pub identity: Option<u32>,
    /// The container ports that have a name (the only ones a policy can refer to by name).
    pub ports: Arc<[ContainerPort]>,
    pub ips: Box<[IpAddr]>,
    pub node: Arc<str>,
}

impl PodRecord {
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            namespace: self.key.namespace.to_string(),
            name: self.key.name.to_string(),
        }
    }
}

/// The identities one selector matches, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct IdSet(Vec<u32>);

impl IdSet {
    pub fn from_unsorted(mut ids: Vec<u32>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        IdSet(ids)
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.binary_search(&id).is_ok()
    }

    /// True if it was not there.
    pub fn insert(&mut self, id: u32) -> bool {
        match self.0.binary_search(&id) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, id);
                true
            }
        }
    }

    /// True if it was there.
    pub fn remove(&mut self, id: u32) -> bool {
        match self.0.binary_search(&id) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// The selector sets of a snapshot, by selector id (freed ids are `None`).
pub(super) type SelectorSets = Vec<Option<Arc<IdSet>>>;

/// The addresses one rule admits: compiled once per rule of an enforced policy and shared by
/// the tables of every pod that policy selects.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RulePeers {
    /// `from`/`to` missing or empty: any address.
    pub any: bool,
    /// The ipBlock peers, merged (pod addresses included: ipBlocks match them too).
    pub blocks: IpRangeSet,
    /// Selector ids of the pod peers, without repeats.
    pub selectors: Box<[u32]>,
    /// Per entry of the rule's `from`/`to`, its selector id (pod peers), for `explain`.
    pub per_peer: Box<[Option<u32>]>,
}

impl RulePeers {
    fn matches(
        &self,
        remote: IpAddr,
        identity: &mut impl FnMut() -> Option<u32>,
        sets: &SelectorSets,
    ) -> bool {
        if self.any || self.blocks.contains(remote) {
            return true;
        }
        if self.selectors.is_empty() {
            return false;
        }
        let Some(id) = identity() else {
            return false;
        };
        self.selectors.iter().any(|&s| set_contains(sets, s, id))
    }
}

fn set_contains(sets: &SelectorSets, selector: u32, identity: u32) -> bool {
    sets.get(selector as usize)
        .and_then(Option::as_ref)
        .is_some_and(|s| s.contains(identity))
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum CompiledPort {
    Range {
        protocol: Protocol,
        lo: u16,
        hi: u16,
    },
    /// Egress only: resolved against the destination pod at verdict time.
    Named { protocol: Protocol, name: Box<str> },
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum PortSet {
    /// `ports` missing or empty: every port of every protocol.
    Any,
    /// Some entry must match; never empty (a rule whose entries can match nothing, e.g. only
    /// named ports the pod does not declare, is left out of the table).
    List(Box<[CompiledPort]>),
}

impl PortSet {
    /// Whether the set admits `port` of `protocol`; `named_port(name)` answers for a named
    /// entry of that protocol.
    #[inline]
    fn admits(
        &self,
        protocol: Protocol,
        port: u16,
        named_port: &mut impl FnMut(&str) -> bool,
    ) -> bool {
        match self {
            PortSet::Any => true,
            PortSet::List(list) => list.iter().any(|p| match p {
                CompiledPort::Range {
                    protocol: pr,
                    lo,
                    hi,
                } => *pr == protocol && (*lo..=*hi).contains(&port),
                CompiledPort::Named { protocol: pr, name } => *pr == protocol && named_port(name),
            }),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct CompiledRule {
    pub at: RuleRef,
    pub peers: Arc<RulePeers>,
    pub ports: PortSet,
}

/// The rules of one direction of one pod, present iff some policy of that direction selects it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct DirectionTable {
    /// Ids of the selecting policies, in (namespace, name) order.
    pub selected_by: Vec<u32>,
    pub rules: Vec<CompiledRule>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PodTable {
    pub ingress: Option<DirectionTable>,
    pub egress: Option<DirectionTable>,
}

impl PodTable {
    fn direction(&self, direction: Direction) -> Option<&DirectionTable> {
        match direction {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// Compiles a rule's `ports` for one selected pod: ingress named ports resolve against the
/// pod itself; egress named ports stay named (they resolve against the destination).
/// `None` when no entry can match.
pub(super) fn compile_ports(
    ports: &[PortSpec],
    direction: Direction,
    pod: &PodRecord,
) -> Option<PortSet> {
    if ports.is_empty() {
        return Some(PortSet::Any);
    }
    let list: Box<[CompiledPort]> = ports
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
    (!list.is_empty()).then_some(PortSet::List(list))
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

/// An immutable, compiled snapshot of the cluster's NetworkPolicies (see the module
/// documentation). Cloning the parts an index shares with it is what makes a new snapshot
/// cheap; nothing in it changes after it is made.
///
/// [`RuleRef::policy`] and [`DenyReason::NoRuleMatched`] carry policy ids of this snapshot
/// (use [`PolicySet::policy`] for the policy).
#[derive(Clone)]
pub struct PolicySet {
    pub(super) pods: IpMap<Arc<PodRecord>>,
    pub(super) tables: Arc<HashMap<IpAddr, Arc<PodTable>>>,
    pub(super) selectors: Arc<SelectorSets>,
    pub(super) policies: Arc<HashMap<u32, Arc<Policy>>>,
    pub(super) has_policies: bool,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("pod_addresses", &self.pods.len())
            .field("tables", &self.tables.len())
            .field("selectors", &self.selectors.iter().flatten().count())
            .field("enforced_policies", &self.policies.len())
            .field("has_policies", &self.has_policies)
            .finish()
    }
}

/// A pod's name, shared by the index's maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
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
    /// Whether any NetworkPolicy exists in the cluster: without one every flow is allowed and
    /// the packet loop skips connection tracking altogether.
    pub fn has_policies(&self) -> bool {
        self.has_policies
    }

    /// Converts k8s-openapi objects and compiles them. Invalid policy parts fail closed (match
    /// nothing, see [`Policy::from_k8s_lenient`]); Pods and Namespaces that cannot be read are
    /// skipped. Everything skipped or degraded is returned, to be logged.
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
        (PolicySet::compile(ns, model_pods, pols), problems)
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
        let table = match self.table(src_pod, Direction::Egress) {
            Ok(t) => t,
            Err(v) => return v,
        };
        // The destination pod is looked up at most once (named ports, selectors).
        let dst_pod = OnceCell::new();
        let lookup = || *dst_pod.get_or_init(|| self.pods.get(&dst).map(|p| &**p));
        self.first_rule(
            table,
            dst,
            protocol,
            dst_port,
            |name| lookup().is_some_and(|pod| pod.named_port(name, protocol) == Some(dst_port)),
            &mut || lookup().and_then(|p| p.identity),
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
        let table = match self.table(dst_pod, Direction::Ingress) {
            Ok(t) => t,
            Err(v) => return v,
        };
        let mut src_identity: Option<Option<u32>> = None;
        // Named ports were resolved against the pod itself when its table was built.
        self.first_rule(table, src, protocol, dst_port, |_| false, &mut || {
            *src_identity.get_or_insert_with(|| self.pods.get(&src).and_then(|p| p.identity))
        })
    }

    /// The verdict of `table` on a new flow with `remote` at its other end: the first rule
    /// whose ports and peers both admit it, or a deny. `named_port` says whether a named port
    /// entry (of the flow's protocol) is the flow's port; `identity` is the remote pod's, asked
    /// for only when a rule's pod selectors need it.
    fn first_rule(
        &self,
        table: &DirectionTable,
        remote: IpAddr,
        protocol: Protocol,
        dst_port: u16,
        mut named_port: impl FnMut(&str) -> bool,
        identity: &mut impl FnMut() -> Option<u32>,
    ) -> Verdict {
        for rule in &table.rules {
            if rule.ports.admits(protocol, dst_port, &mut named_port)
                && rule.peers.matches(remote, identity, &self.selectors)
            {
                return Verdict::Allow(AllowReason::Rule(rule.at));
            }
        }
        Self::deny(table)
    }

    /// The table of `local_pod` in one direction, or the verdict when it has none.
    fn table(&self, local_pod: IpAddr, direction: Direction) -> Result<&DirectionTable, Verdict> {
        match self.tables.get(&local_pod) {
            Some(t) => t
                .direction(direction)
                .ok_or(Verdict::Allow(AllowReason::NotSelected)),
            None if self.pods.contains(&local_pod) => Err(Verdict::Allow(AllowReason::NotSelected)),
            None => Err(Verdict::Allow(AllowReason::NoPod)),
        }
    }

    fn deny(table: &DirectionTable) -> Verdict {
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

    /// The policy a [`RuleRef`] or [`DenyReason`] of this snapshot names.
    pub fn policy(&self, id: u32) -> Option<&Policy> {
        self.policies.get(&id).map(|p| &**p)
    }

    /// The (non-host-network) pod that has `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<ObjectRef> {
        self.pods.get(&ip).map(|p| p.object_ref())
    }

    /// How many pod addresses the snapshot knows (all of the cluster's).
    pub fn pod_addresses(&self) -> usize {
        self.pods.len()
    }

    /// How many addresses have a rule table (pods this snapshot enforces for that a policy
    /// selects).
    pub fn tables(&self) -> usize {
        self.tables.len()
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
        let table = self.tables.get(&own).and_then(|t| t.direction(direction));
        let selected_by = table
            .map(|t| {
                t.selected_by
                    .iter()
                    .filter_map(|&p| self.policy(p))
                    .map(Policy::object_ref)
                    .collect()
            })
            .unwrap_or_default();
        let decided_by = match (verdict, table) {
            (Verdict::Allow(AllowReason::Rule(at)), Some(table)) => {
                let rule = table.rules.iter().find(|r| r.at == at);
                rule.and_then(|r| self.describe_match(direction, r, other, dst, protocol, dst_port))
            }
            _ => None,
        };
        DirectionExplanation {
            direction,
            pod: self.pod_at(own),
            verdict,
            selected_by,
            decided_by,
        }
    }

    fn describe_match(
        &self,
        direction: Direction,
        compiled: &CompiledRule,
        peer_ip: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        dst_port: u16,
    ) -> Option<RuleMatch> {
        let at = compiled.at;
        let policy = self.policy(at.policy)?;
        let rule = policy.rules(direction)?.get(at.rule as usize)?;
        let identity = self.pods.get(&peer_ip).and_then(|p| p.identity);
        let peer = rule.peers.as_ref().and_then(|peers| {
            peers
                .iter()
                .enumerate()
                .position(|(i, p)| match p {
                    Peer::Invalid => false,
                    Peer::IpBlock(b) => {
                        b.cidr.contains(peer_ip) && !b.except.iter().any(|e| e.contains(peer_ip))
                    }
                    Peer::Pods { .. } => {
                        let selector = compiled.peers.per_peer.get(i).copied().flatten();
                        match (selector, identity) {
                            (Some(s), Some(id)) => set_contains(&self.selectors, s, id),
                            _ => false,
                        }
                    }
                })
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
                    .pods
                    .get(&dst)
                    .is_some_and(|p| p.named_port(name, protocol) == Some(dst_port)),
                PortMatch::Invalid => false,
            }
    }
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
    use std::collections::BTreeMap;

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
