//! NetworkPolicy: compiled per-pod verdict tables, the same engine for the packet loop and
//! `kwire policy trace`.
//!
//! Flow of data, all without I/O:
//! - [`Namespace`], [`Pod`] (plain types, convertible from k8s-openapi objects) and
//!   [`Policy`] (parsed from `networking.k8s.io/v1` `NetworkPolicy`) go, one change at a time,
//!   into a [`PolicyIndex`], which keeps only what policy reads and turns each change into the
//!   least work (see `index.rs`: identities, shared selector sets, a sharded address map);
//!   [`PolicyIndex::snapshot`] yields an immutable [`PolicySet`] that shares everything
//!   unchanged with the previous one. [`PolicySet::compile`] is the same index filled at once.
//! - A snapshot enforces for a [`Scope`]: the agent's has rule tables only for its own node's
//!   pods (the only ones its packet loop asks about) and compiles only the policies selecting
//!   them, while every pod address of the cluster stays known for matching peers.
//! - The packet loop asks, once per new flow, only the direction it owns:
//!   [`PolicySet::egress_verdict`] for a flow leaving a local pod, [`PolicySet::ingress_verdict`]
//!   for a flow entering one. Both hash the local pod's IP and scan only the rules of the
//!   policies that select that pod (a pod peer is one more hash lookup for the remote address's
//!   identity and a binary search in the selector's set); they never allocate. The answer is a
//!   `Copy` [`Verdict`].
//! - [`PolicySet::explain`] is the slow path with names, for `kwire policy trace` ([`trace`]).
//!
//! Semantics follow the `networking.k8s.io/v1` API reference and the upstream e2e suite
//! (`test/e2e/network/netpol`); the decisions the spec leaves open are documented where they
//! are taken:
//! - ipBlock peers match by IP address only, and DO match cluster pod IPs (the upstream tests
//!   "should allow egress access to server in CIDR block" and "should enforce except clause ..."
//!   rely on this).
//! - A named port resolves against the destination pod's container ports (name AND protocol must
//!   match); a destination that is not a known pod, or that does not declare the name, does not
//!   match that port entry.
//! - Pods with `hostNetwork: true` are neither selected nor matched by pod selectors (their IP is
//!   the node's); ipBlocks still match their addresses.
//! - An address that belongs to no pod (a node, the outside world) is never isolated: its side
//!   of the verdict is [`AllowReason::NoPod`].

mod engine;
mod index;
mod ipmap;
mod ipset;
pub mod matrix;
mod model;
mod saved;
#[cfg(test)]
mod saved_tests;
mod selector;
pub mod service_trace;
mod spec;
pub mod trace;

pub use engine::{
    DirectionExplanation, Explanation, FlowVerdict, InputError, PodKey, PolicySet, RuleMatch,
};
pub use index::{IndexStats, InputsSave, PolicyIndex, Scope};
pub use ipset::{Cidr, CidrError, IpRangeSet};
pub use model::{ContainerPort, ModelError, Namespace, ObjectRef, Pod, NAMESPACE_NAME_LABEL};
pub use saved::SavedError;
pub use selector::{LabelSelector, Requirement, SelectorError};
pub use spec::{IpBlock, Peer, Policy, PolicyError, PortMatch, PortSpec, Problem, Rule};

/// An IP transport protocol, as the packet loop sees it.
///
/// NetworkPolicy ports can only name TCP, UDP and SCTP; any other protocol (ICMP, ...) is
/// matched only by rules whose `ports` list is empty (all ports, all protocols).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Any other IP protocol number.
    Other(u8),
}

impl Protocol {
    /// IANA protocol number of TCP.
    pub const IPPROTO_TCP: u8 = 6;
    /// IANA protocol number of UDP.
    pub const IPPROTO_UDP: u8 = 17;
    /// IANA protocol number of SCTP.
    pub const IPPROTO_SCTP: u8 = 132;

    /// From the IPv4 `protocol` / IPv6 `next header` field.
    pub fn from_ip_protocol(number: u8) -> Self {
        match number {
            Self::IPPROTO_TCP => Protocol::Tcp,
            Self::IPPROTO_UDP => Protocol::Udp,
            Self::IPPROTO_SCTP => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }

    /// Parses a Kubernetes protocol name (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API
    /// server validates it).
    pub fn from_k8s(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`), or `IP/<number>` for other protocols.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Protocol::Tcp => "TCP".into(),
            Protocol::Udp => "UDP".into(),
            Protocol::Sctp => "SCTP".into(),
            Protocol::Other(n) => format!("IP/{n}").into(),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Which side of a flow a verdict is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Leaving the source pod (policies with policyTypes `Egress` that select the source).
    Egress,
    /// Entering the destination pod (policies with policyTypes `Ingress` that select it).
    Ingress,
}

impl Direction {
    /// `Egress` / `Ingress`, as policyTypes spells them.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Egress => "Egress",
            Direction::Ingress => "Ingress",
        }
    }
}

/// A rule of a compiled [`PolicySet`]: indexes into [`PolicySet::policies`] and into that
/// policy's ingress or egress rule list (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: u32,
    pub rule: u32,
}

/// Why one direction of a flow is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllowReason {
    /// The address is no pod of the snapshot (node, host-network pod, outside world).
    NoPod,
    /// No policy with this direction in its policyTypes selects the pod.
    NotSelected,
    /// This rule allows the flow.
    Rule(RuleRef),
}

/// Why one direction of a flow is denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The pod is isolated in this direction (selected by at least one policy, `first_policy`
    /// being the lowest index) and no rule of those policies allows the flow.
    NoRuleMatched { first_policy: u32 },
}

/// The answer for one direction of a new flow. `Copy` and data-light, for the packet loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow(AllowReason),
    Deny(DenyReason),
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    /// A bounded metric label: `allow` or `deny`.
    pub fn metric_label(self) -> &'static str {
        if self.is_allowed() {
            "allow"
        } else {
            "deny"
        }
    }
}
