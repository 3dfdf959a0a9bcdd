//! Which Nodes are this node's WireGuard peers: a pure function from Node objects to the
//! desired peer set and the Nodes refused with a reason, and the per-peer device changes
//! that turn one peer set into another. No I/O.

use crate::wg::allowed_ips::canonical;
use crate::wg::uapi::PeerChange;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kwire_proto::annotations;
use kwire_proto::key::{KeyError, PublicKey};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// A podCIDR wider than this (IPv4) would capture unrelated traffic: refused.
/// Per-node ranges are /24 by default (kube-controller-manager `--node-cidr-mask-size-ipv4`).
pub const MIN_POD_CIDR_PREFIX_V4: u8 = 8;
/// The same for IPv6 (per-node ranges are /64 by default).
pub const MIN_POD_CIDR_PREFIX_V6: u8 = 32;

/// What peer selection reads from a Node: nothing else of it matters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `metadata.creationTimestamp` in seconds (None sorts as the newest).
    pub created: Option<i64>,
    pub public_key: Option<String>,
    /// `kwire.dev/next-public-key`: the key the node rotates to.
    pub next_public_key: Option<String>,
    /// `kwire.dev/revoked-keys`, as written.
    pub revoked_keys: Option<String>,
    pub endpoint: Option<String>,
    pub keepalive: Option<String>,
    /// `spec.podCIDRs` (falls back to `spec.podCIDR`), as written.
    pub pod_cidrs: Vec<String>,
    /// `status.addresses` of type InternalIP that parse, in order.
    pub internal_ips: Vec<IpAddr>,
    /// Every address of `status.addresses` that parses (InternalIP, ExternalIP, ...).
    pub addresses: Vec<IpAddr>,
    /// `kwire.dev/behind-nat: "true"`.
    pub behind_nat: bool,
    /// The `kwire.dev/location` label.
    pub location: Option<String>,
    /// `kwire.dev/relay-endpoint`, as written.
    pub relay_endpoint: Option<String>,
    /// `kwire.dev/nat-observed`, as written.
    pub nat_observed: Option<String>,
    /// `kwire.dev/service-cidr`, as written.
    pub service_cidr: Option<String>,
    /// Its `Ready` (kubelet) or `KwireReady` (its agent) condition is `False` or `Unknown`:
    /// the node is down, or its agent says its data plane is not ready. (No condition, as on
    /// a Node just registered, is not this.)
    pub unready: bool,
}

impl NodeInfo {
    /// Whether it publishes a key that parses (not all-zero): a Node without one has no
    /// working agent, so it neither relays nor writes the Peers' conditions.
    pub fn has_valid_key(&self) -> bool {
        self.public_key
            .as_deref()
            .is_some_and(|k| PublicKey::from_base64(k).is_ok())
    }

    pub fn from_node(n: &Node) -> NodeInfo {
        let ann = n.metadata.annotations.as_ref();
        let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
        let spec = n.spec.as_ref();
        let mut pod_cidrs = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
        }
        let status_addresses = n.status.as_ref().and_then(|s| s.addresses.as_ref());
        let parsed = |internal_only: bool| -> Vec<IpAddr> {
            status_addresses
                .map(|a| {
                    a.iter()
                        .filter(|a| !internal_only || a.type_ == "InternalIP")
                        .filter_map(|a| a.address.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        NodeInfo {
            name: n.metadata.name.clone().unwrap_or_default(),
            created: n
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            public_key: get(annotations::PUBLIC_KEY),
            next_public_key: get(annotations::NEXT_PUBLIC_KEY),
            revoked_keys: get(annotations::REVOKED_KEYS),
            endpoint: get(annotations::ENDPOINT),
            keepalive: get(annotations::PERSISTENT_KEEPALIVE),
            pod_cidrs,
            internal_ips: parsed(true),
            addresses: parsed(false),
            behind_nat: get(annotations::BEHIND_NAT).is_some_and(|v| v.trim() == "true"),
            location: n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(annotations::LOCATION))
                .cloned(),
            relay_endpoint: get(annotations::RELAY_ENDPOINT),
            nat_observed: get(annotations::NAT_OBSERVED),
            service_cidr: get(annotations::SERVICE_CIDR),
            unready: n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        matches!(c.type_.as_str(), "Ready" | "KwireReady")
                            && matches!(c.status.as_str(), "False" | "Unknown")
                    })
                }),
        }
    }

    /// The node's podCIDRs, parsed and canonical; invalid entries are left out.
    /// The keys `kwire.dev/revoked-keys` lists; entries that are not keys are left out.
    pub fn parsed_revoked_keys(&self) -> Vec<PublicKey> {
        self.revoked_keys
            .as_deref()
            .unwrap_or("")
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter_map(|k| PublicKey::from_base64(k).ok())
            .collect()
    }

    pub fn parsed_pod_cidrs(&self) -> Vec<IpNetwork> {
        self.pod_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .map(canonical)
            .collect()
    }
}

/// A peer as the control plane wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: String,
    pub public_key: PublicKey,
    /// The key the node rotates to (`kwire.dev/next-public-key`), if it does and it parses.
    pub next_public_key: Option<PublicKey>,
    pub endpoint: SocketAddr,
    /// The Node's `spec.podCIDRs`, canonical.
    pub allowed_ips: Vec<IpNetwork>,
    pub keepalive: u16,
    /// The relay node this peer is reached through (`endpoint` is then the relay's), when
    /// both this node and the peer are behind NAT.
    pub relay: Option<String>,
    /// The Node says it is behind NAT (`kwire.dev/behind-nat`): a relay forwards for it.
    pub behind_nat: bool,
}

/// Why a range given as text cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    NotCidr,
    /// Wider than the prefix length it carries.
    TooWide(u8),
}

/// Parses `text` as a CIDR no wider than /`min_v4` (IPv4) or /`min_v6` (IPv6), canonical.
pub fn parse_range(text: &str, min_v4: u8, min_v6: u8) -> Result<IpNetwork, RangeError> {
    let net: IpNetwork = text.parse().map_err(|_| RangeError::NotCidr)?;
    let min = if net.is_ipv4() { min_v4 } else { min_v6 };
    if net.prefix() < min {
        return Err(RangeError::TooWide(min));
    }
    Ok(canonical(net))
}

/// Why a Node was not made a peer. Its label is bounded (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// `kwire.dev/public-key` is not 44 characters of base64 for 32 bytes.
    MalformedKey,
    /// `kwire.dev/public-key` is the all-zero key.
    ZeroKey,
    /// Another, older Node (or this node) already has this public key.
    DuplicateKey,
    /// The endpoint (annotated or InternalIP) is not a usable unicast address and port.
    BadEndpoint,
    /// No endpoint annotation and no InternalIP.
    NoEndpoint,
    /// `spec.podCIDRs` is empty.
    NoPodCidrs,
    /// A podCIDR that does not parse or is too wide.
    BadPodCidr,
    /// A podCIDR overlaps this node's or an older Node's.
    OverlappingPodCidrs,
    /// `kwire.dev/persistent-keepalive` is not a number of seconds (0 to 65535).
    BadKeepalive,
    /// A podCIDR outside every cluster range (`--cluster-cidr`).
    PodCidrOutsideCluster,
    /// A podCIDR that contains a Node's address or one of this node's own addresses: routing
    /// it into the tunnel would capture that node's traffic.
    PodCidrCoversNode,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::MalformedKey,
        RejectReason::ZeroKey,
        RejectReason::DuplicateKey,
        RejectReason::BadEndpoint,
        RejectReason::NoEndpoint,
        RejectReason::NoPodCidrs,
        RejectReason::BadPodCidr,
        RejectReason::OverlappingPodCidrs,
        RejectReason::BadKeepalive,
        RejectReason::PodCidrOutsideCluster,
        RejectReason::PodCidrCoversNode,
    ];

    /// The `reason` label of `kwire_invalid_peer_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            RejectReason::MalformedKey => "malformed_key",
            RejectReason::ZeroKey => "zero_key",
            RejectReason::DuplicateKey => "duplicate_key",
            RejectReason::BadEndpoint => "bad_endpoint",
            RejectReason::NoEndpoint => "no_endpoint",
            RejectReason::NoPodCidrs => "no_pod_cidrs",
            RejectReason::BadPodCidr => "bad_pod_cidr",
            RejectReason::OverlappingPodCidrs => "overlapping_pod_cidrs",
            RejectReason::BadKeepalive => "bad_keepalive",
            RejectReason::PodCidrOutsideCluster => "pod_cidr_outside_cluster",
            RejectReason::PodCidrCoversNode => "pod_cidr_covers_node",
        }
    }

    /// The Kubernetes Event reason (PascalCase).
    pub fn event_reason(self) -> &'static str {
        match self {
            RejectReason::MalformedKey => "KwireMalformedPublicKey",
            RejectReason::ZeroKey => "KwireZeroPublicKey",
            RejectReason::DuplicateKey => "KwireDuplicatePublicKey",
            RejectReason::BadEndpoint => "KwireBadEndpoint",
            RejectReason::NoEndpoint => "KwireNoEndpoint",
            RejectReason::NoPodCidrs => "KwireNoPodCIDRs",
            RejectReason::BadPodCidr => "KwireBadPodCIDR",
            RejectReason::OverlappingPodCidrs => "KwireOverlappingPodCIDRs",
            RejectReason::BadKeepalive => "KwireBadPersistentKeepalive",
            RejectReason::PodCidrOutsideCluster => "KwirePodCIDROutsideCluster",
            RejectReason::PodCidrCoversNode => "KwirePodCIDRCoversNode",
        }
    }
}

/// A Node that is not a peer, why, and what to do about it (for the log and the Event).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub node: String,
    pub reason: RejectReason,
    pub detail: String,
}

/// Inputs of peer selection that do not come from the Nodes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name: never a peer of itself.
    pub self_name: String,
    /// This node's public key: no other Node may claim it.
    pub self_key: PublicKey,
    /// Port of a peer's endpoint when it has no endpoint annotation.
    pub default_port: u16,
    /// Keepalive for peers without the annotation (0: off).
    pub default_keepalive: u16,
    /// The cluster's pod ranges: every accepted podCIDR lies inside one.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// This node's own addresses (its underlay): no podCIDR may contain one.
    pub host_addresses: Vec<IpAddr>,
}

/// The result of peer selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// By node name.
    pub peers: BTreeMap<String, DesiredPeer>,
    /// Sorted by node name.
    pub rejections: Vec<Rejection>,
}

/// True for an address a peer can be sent to.
pub fn usable_endpoint(a: &SocketAddr) -> bool {
    let ip = a.ip();
    let bad_v4 = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let mapped_loopback = matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback() || v4.is_unspecified()));
    a.port() != 0
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !ip.is_unspecified()
        && !bad_v4
        && !mapped_loopback
}

/// The naive overlap test [`Claimed`] is held against.
#[cfg(test)]
fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Pod ranges claimed so far, in claim order, indexed so that finding the first one a new
/// range overlaps costs a few tree lookups instead of a scan of every range (a scan made
/// selection quadratic: about 30 ms per Node event at 5,000 Nodes).
///
/// Two CIDRs overlap iff one contains the other's network address: either a claimed range
/// of prefix ≤ p holds the new range's network (one exact lookup per prefix length in use),
/// or a claimed range starts inside the new one (a range query).
#[derive(Default)]
struct Claimed<'a> {
    /// (is IPv6, network address, prefix) → (claim order, range as written, owner).
    by_net: BTreeMap<(bool, u128, u8), (usize, IpNetwork, &'a str)>,
    /// (is IPv6, prefix) of every claimed range.
    prefixes: BTreeSet<(bool, u8)>,
    len: usize,
}

/// (is IPv6, network address as a number, prefix).
fn net_key(n: &IpNetwork) -> (bool, u128, u8) {
    match n {
        IpNetwork::V4(v) => (false, u32::from(v.network()) as u128, v.prefix()),
        IpNetwork::V6(v) => (true, u128::from(v.network()), v.prefix()),
    }
}

/// (is IPv6, first address, last address) of a range, as numbers.
fn span(c: &IpNetwork) -> (bool, u128, u128) {
    let (v6, start, p) = net_key(c);
    let width = if v6 { 128 } else { 32 };
    let host = width - u32::from(p);
    let end = if host >= 128 {
        u128::MAX
    } else {
        start | ((1u128 << host) - 1)
    };
    (v6, start, end)
}

/// `addr` with only its first `prefix` bits kept.
fn mask(v6: bool, addr: u128, prefix: u8) -> u128 {
    let width = if v6 { 128 } else { 32 };
    let host = width - u32::from(prefix);
    if host >= 128 {
        0
    } else {
        addr >> host << host
    }
}

impl<'a> Claimed<'a> {
    fn insert(&mut self, n: IpNetwork, owner: &'a str) {
        let k = net_key(&n);
        self.by_net.entry(k).or_insert((self.len, n, owner));
        self.prefixes.insert((k.0, k.2));
        self.len += 1;
    }

    /// The earliest claimed range that overlaps `c`, with its owner.
    fn first_overlap(&self, c: &IpNetwork) -> Option<(IpNetwork, &'a str)> {
        let (v6, start, end) = span(c);
        let mut best: Option<(usize, IpNetwork, &'a str)> = None;
        let mut consider = |hit: &(usize, IpNetwork, &'a str)| {
            if best.is_none_or(|b| hit.0 < b.0) {
                best = Some(*hit);
            }
        };
        let p = c.prefix();
        for &(_, q) in self.prefixes.range((v6, 0)..=(v6, p)) {
            if let Some(hit) = self.by_net.get(&(v6, mask(v6, start, q), q)) {
                consider(hit);
            }
        }
        for hit in self
            .by_net
            .range((v6, start, 0)..=(v6, end, u8::MAX))
            .map(|(_, v)| v)
        {
            consider(hit);
        }
        best.map(|(_, n, owner)| (n, owner))
    }
}

/// The addresses no podCIDR may contain (every Node's, this host's), sorted per family, so
/// that "does this range contain one" is a binary search (a scan would make selection
/// quadratic in the number of Nodes).
#[derive(Default)]
struct Reserved {
    v4: Vec<u128>,
    v6: Vec<u128>,
}

impl Reserved {
    fn new<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> Reserved {
        let mut r = Reserved::default();
        for ip in ips {
            match ip {
                IpAddr::V4(a) => r.v4.push(u32::from(*a).into()),
                IpAddr::V6(a) => r.v6.push(u128::from(*a)),
            }
        }
        r.v4.sort_unstable();
        r.v6.sort_unstable();
        r
    }

    /// The first reserved address inside `c`.
    fn inside(&self, c: &IpNetwork) -> Option<IpAddr> {
        let (v6, start, end) = span(c);
        let list = if v6 { &self.v6 } else { &self.v4 };
        let i = list.partition_point(|a| *a < start);
        let a = *list.get(i).filter(|a| **a <= end)?;
        Some(if v6 {
            IpAddr::V6(a.into())
        } else {
            IpAddr::V4((a as u32).into())
        })
    }
}

/// Whether `c` lies inside `range` (same family, at least as long a prefix).
pub fn inside(c: &IpNetwork, range: &IpNetwork) -> bool {
    c.is_ipv4() == range.is_ipv4() && range.prefix() <= c.prefix() && range.contains(c.network())
}

/// Chooses the peers among `nodes`. Older Nodes (creationTimestamp, then name) win a
/// contested public key or pod range; this node always wins its own.
pub fn select(nodes: &[NodeInfo], own_pod_cidrs: &[IpNetwork], s: &Settings) -> Selection {
    let reserved = Reserved::new(
        nodes
            .iter()
            .flat_map(|n| n.addresses.iter().chain(&n.internal_ips))
            .chain(&s.host_addresses),
    );
    let mut order: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| n.name != s.self_name && !n.name.is_empty())
        .collect();
    order.sort_by(|a, b| {
        (a.created.unwrap_or(i64::MAX), &a.name).cmp(&(b.created.unwrap_or(i64::MAX), &b.name))
    });
    let mut keys: BTreeMap<PublicKey, &str> = BTreeMap::new();
    let mut claimed = Claimed::default();
    for c in own_pod_cidrs {
        claimed.insert(*c, s.self_name.as_str());
    }
    let mut out = Selection::default();
    for n in order {
        let reject = |reason, detail: String| Rejection {
            node: n.name.clone(),
            reason,
            detail,
        };
        match check_node(n, s, &reserved, &mut keys, &mut claimed) {
            Ok(Some(p)) => {
                out.peers.insert(n.name.clone(), p);
            }
            Ok(None) => {}
            Err((reason, detail)) => out.rejections.push(reject(reason, detail)),
        }
    }
    out.rejections.sort();
    out
}

type Refusal = (RejectReason, String);

fn check_node<'a>(
    n: &'a NodeInfo,
    s: &Settings,
    reserved: &Reserved,
    keys: &mut BTreeMap<PublicKey, &'a str>,
    claimed: &mut Claimed<'a>,
) -> Result<Option<DesiredPeer>, Refusal> {
    let Some(key_text) = &n.public_key else {
        // Not running kwire (yet): not an error, nothing to report.
        return Ok(None);
    };
    let key = PublicKey::from_base64(key_text).map_err(|e| match e {
        KeyError::Zero => (RejectReason::ZeroKey, format!("annotation {} is the all-zero key; the kwire agent on that node publishes its real key, remove the annotation", annotations::PUBLIC_KEY)),
        e => (RejectReason::MalformedKey, format!("annotation {} is not a WireGuard public key ({e}); remove it so the kwire agent on that node publishes its own", annotations::PUBLIC_KEY)),
    })?;
    if key == s.self_key {
        return Err((
            RejectReason::DuplicateKey,
            format!(
                "annotation {} is the public key of node {}; remove it",
                annotations::PUBLIC_KEY,
                s.self_name
            ),
        ));
    }
    if let Some(owner) = keys.get(&key) {
        return Err((RejectReason::DuplicateKey, format!("annotation {} repeats the public key of older node {owner}; remove it or give the node its own key", annotations::PUBLIC_KEY)));
    }
    keys.insert(key, &n.name);

    if n.pod_cidrs.is_empty() {
        return Err((RejectReason::NoPodCidrs, "spec.podCIDRs is empty; the peer is added once the controller manager allocates its pod range".to_string()));
    }
    let mut cidrs = Vec::with_capacity(n.pod_cidrs.len());
    for c in &n.pod_cidrs {
        let net = parse_range(c, MIN_POD_CIDR_PREFIX_V4, MIN_POD_CIDR_PREFIX_V6).map_err(|e| {
            let why = match e {
                RangeError::NotCidr => format!("spec.podCIDRs entry {c:?} is not a CIDR"),
                RangeError::TooWide(min) => format!("spec.podCIDRs entry {c} is wider than /{min}"),
            };
            (RejectReason::BadPodCidr, why)
        })?;
        if !s.cluster_cidrs.iter().any(|r| inside(&net, r)) {
            let ranges: Vec<String> = s.cluster_cidrs.iter().map(ToString::to_string).collect();
            return Err((
                RejectReason::PodCidrOutsideCluster,
                format!(
                    "spec.podCIDRs entry {net} is outside the cluster's pod ranges ({}); the agents' --cluster-cidr must match kube-controller-manager's --cluster-cidr",
                    ranges.join(", ")
                ),
            ));
        }
        cidrs.push(net);
    }
    for c in &cidrs {
        if let Some((other, owner)) = claimed.first_overlap(c) {
            return Err((
                RejectReason::OverlappingPodCidrs,
                format!("spec.podCIDRs entry {c} overlaps {other} of node {owner}"),
            ));
        }
    }
    for c in &cidrs {
        if let Some(ip) = reserved.inside(c) {
            return Err((
                RejectReason::PodCidrCoversNode,
                format!("spec.podCIDRs entry {c} contains node address {ip}: routing it into the tunnel would capture that node's traffic"),
            ));
        }
    }
    for c in &cidrs {
        claimed.insert(*c, n.name.as_str());
    }

    let endpoint = match &n.endpoint {
        Some(text) => {
            let a: SocketAddr = text.trim().parse().map_err(|_| {
                (
                    RejectReason::BadEndpoint,
                    format!(
                        "annotation {} {:?} is not IP:port",
                        annotations::ENDPOINT,
                        truncate(text)
                    ),
                )
            })?;
            if !usable_endpoint(&a) {
                return Err((
                    RejectReason::BadEndpoint,
                    format!(
                        "annotation {} {a} is not a unicast address with a port",
                        annotations::ENDPOINT
                    ),
                ));
            }
            a
        }
        None => {
            let ip = *n.internal_ips.first().ok_or_else(|| {
                (
                    RejectReason::NoEndpoint,
                    format!(
                        "no annotation {} and no InternalIP in status.addresses",
                        annotations::ENDPOINT
                    ),
                )
            })?;
            let a = SocketAddr::new(ip, s.default_port);
            if !usable_endpoint(&a) {
                return Err((
                    RejectReason::BadEndpoint,
                    format!(
                        "InternalIP {ip} is not a unicast address; set annotation {}",
                        annotations::ENDPOINT
                    ),
                ));
            }
            a
        }
    };
    let keepalive = match &n.keepalive {
        Some(t) => t.trim().parse::<u16>().map_err(|_| {
            (
                RejectReason::BadKeepalive,
                format!(
                    "annotation {} {:?} is not a number of seconds (0-65535)",
                    annotations::PERSISTENT_KEEPALIVE,
                    truncate(t)
                ),
            )
        })?,
        None => s.default_keepalive,
    };
    // A next key that does not parse, or is not new, is ignored: the peer keeps its key.
    let next_public_key = n
        .next_public_key
        .as_deref()
        .and_then(|t| PublicKey::from_base64(t).ok())
        .filter(|k| *k != key && *k != s.self_key);
    Ok(Some(DesiredPeer {
        node: n.name.clone(),
        public_key: key,
        next_public_key,
        endpoint,
        allowed_ips: cidrs,
        keepalive,
        relay: None,
        behind_nat: n.behind_nat,
    }))
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The device changes that turn `old` into `new`: removals first (so a key that moves
/// between Nodes is never removed after it was added), then per-peer changes carrying only
/// what changed. Unchanged peers get no change, so their sessions are untouched. A peer whose
/// new key is the next key it announced (it promoted it) is renamed, not replaced: the
/// sessions made with that key carry on.
pub fn plan(
    old: &BTreeMap<String, DesiredPeer>,
    new: &BTreeMap<String, DesiredPeer>,
) -> Vec<PeerChange> {
    let mut removes = Vec::new();
    let mut changes = Vec::new();
    for (name, o) in old {
        match new.get(name) {
            None => removes.push(remove(o.public_key)),
            Some(n) if n.public_key != o.public_key && !promoted(o, n) => {
                removes.push(remove(o.public_key))
            }
            Some(_) => {}
        }
    }
    for (name, n) in new {
        match old.get(name) {
            Some(o) if o.public_key == n.public_key => {
                let mut c = change(n.public_key);
                let mut any = false;
                if o.endpoint != n.endpoint {
                    c.endpoint = Some(n.endpoint);
                    any = true;
                }
                if o.keepalive != n.keepalive {
                    c.persistent_keepalive = Some(n.keepalive);
                    any = true;
                }
                if sorted(&o.allowed_ips) != sorted(&n.allowed_ips) {
                    c.replace_allowed_ips = true;
                    c.allowed_ips = n.allowed_ips.clone();
                    any = true;
                }
                if o.next_public_key != n.next_public_key {
                    c.next_public_key = Some(n.next_public_key);
                    any = true;
                }
                if any {
                    changes.push(c);
                }
            }
            Some(o) if promoted(o, n) => changes.push(PeerChange {
                renamed_from: Some(o.public_key),
                ..add(n)
            }),
            _ => changes.push(add(n)),
        }
    }
    removes.extend(changes);
    removes
}

/// `n` is `o` after it promoted the next key it announced.
fn promoted(o: &DesiredPeer, n: &DesiredPeer) -> bool {
    o.next_public_key == Some(n.public_key)
}

/// The changes that add every peer of `peers` (a restore).
pub fn add_all(peers: &BTreeMap<String, DesiredPeer>) -> Vec<PeerChange> {
    peers.values().map(add).collect()
}

fn sorted(v: &[IpNetwork]) -> BTreeSet<IpNetwork> {
    v.iter().copied().collect()
}

fn change(pk: PublicKey) -> PeerChange {
    PeerChange {
        public_key: pk,
        remove: false,
        update_only: false,
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        replace_allowed_ips: false,
        allowed_ips: Vec::new(),
        next_public_key: None,
        renamed_from: None,
    }
}

fn remove(pk: PublicKey) -> PeerChange {
    PeerChange {
        remove: true,
        ..change(pk)
    }
}

fn add(p: &DesiredPeer) -> PeerChange {
    PeerChange {
        endpoint: Some(p.endpoint),
        persistent_keepalive: Some(p.keepalive),
        replace_allowed_ips: true,
        allowed_ips: p.allowed_ips.clone(),
        next_public_key: Some(p.next_public_key),
        ..change(p.public_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn settings() -> Settings {
        Settings {
            self_name: "self".into(),
            self_key: key(1),
            default_port: 51820,
            default_keepalive: 0,
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            host_addresses: vec!["10.244.200.1".parse().unwrap()],
        }
    }

    fn node(name: &str, created: i64, k: Option<u8>, cidrs: &[&str], ip: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            created: Some(created),
            public_key: k.map(|b| key(b).to_base64()),
            next_public_key: None,
            revoked_keys: None,
            endpoint: None,
            keepalive: None,
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            internal_ips: if ip.is_empty() {
                vec![]
            } else {
                vec![ip.parse().unwrap()]
            },
            addresses: vec![],
            ..NodeInfo::default()
        }
    }

    fn own() -> Vec<IpNetwork> {
        vec!["10.244.0.0/24".parse().unwrap()]
    }

    #[test]
    fn good_nodes_become_peers_with_podcidrs_and_internal_ip() {
        let nodes = vec![
            node("self", 1, Some(1), &["10.244.0.0/24"], "192.0.2.1"),
            node(
                "b",
                2,
                Some(2),
                &["10.244.1.0/24", "fd00:1::/64"],
                "192.0.2.2",
            ),
            node("c", 3, None, &["10.244.2.0/24"], "192.0.2.3"),
        ];
        let sel = select(&nodes, &own(), &settings());
        assert!(sel.rejections.is_empty(), "{:?}", sel.rejections);
        assert_eq!(sel.peers.len(), 1, "c has no key yet, self is not a peer");
        let b = &sel.peers["b"];
        assert_eq!(b.public_key, key(2));
        assert_eq!(b.endpoint, "192.0.2.2:51820".parse().unwrap());
        assert_eq!(
            b.allowed_ips,
            vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(b.keepalive, 0);
    }

    #[test]
    fn annotations_override_endpoint_and_keepalive() {
        let mut b = node("b", 2, Some(2), &["10.244.1.0/24"], "192.0.2.2");
        b.endpoint = Some("[2001:db8::2]:4000".into());
        b.keepalive = Some("25".into());
        let sel = select(&[b], &own(), &settings());
        assert_eq!(
            sel.peers["b"].endpoint,
            "[2001:db8::2]:4000".parse().unwrap()
        );
        assert_eq!(sel.peers["b"].keepalive, 25);
        let s = Settings {
            default_keepalive: 10,
            ..settings()
        };
        let sel = select(
            &[node("b", 2, Some(2), &["10.244.1.0/24"], "192.0.2.2")],
            &own(),
            &s,
        );
        assert_eq!(sel.peers["b"].keepalive, 10);
    }

    /// Every bad input: the offending Node is skipped with its reason, the others stay.
    #[test]
    fn bad_nodes_are_skipped_with_a_reason() {
        type Mutate = fn(&mut NodeInfo);
        let cases: &[(&str, Mutate, RejectReason)] = &[
            (
                "malformed key",
                |n| n.public_key = Some("not-a-key".into()),
                RejectReason::MalformedKey,
            ),
            (
                "bad base64",
                |n| n.public_key = Some("!".repeat(43) + "="),
                RejectReason::MalformedKey,
            ),
            (
                "short key",
                |n| n.public_key = Some("AAAA".into()),
                RejectReason::MalformedKey,
            ),
            (
                "zero key",
                |n| n.public_key = Some(PublicKey([0; 32]).to_base64()),
                RejectReason::ZeroKey,
            ),
            (
                "our own key",
                |n| n.public_key = Some(key(1).to_base64()),
                RejectReason::DuplicateKey,
            ),
            (
                "loopback endpoint",
                |n| n.endpoint = Some("127.0.0.1:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "v6 loopback endpoint",
                |n| n.endpoint = Some("[::1]:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "multicast endpoint",
                |n| n.endpoint = Some("224.0.0.1:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "v6 multicast endpoint",
                |n| n.endpoint = Some("[ff02::1]:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "unspecified endpoint",
                |n| n.endpoint = Some("0.0.0.0:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "v6 unspecified endpoint",
                |n| n.endpoint = Some("[::]:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "broadcast endpoint",
                |n| n.endpoint = Some("255.255.255.255:51820".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "port 0",
                |n| n.endpoint = Some("192.0.2.9:0".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "no port",
                |n| n.endpoint = Some("192.0.2.9".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "garbage endpoint",
                |n| n.endpoint = Some("over-there".into()),
                RejectReason::BadEndpoint,
            ),
            (
                "loopback InternalIP",
                |n| n.internal_ips = vec!["127.0.0.1".parse().unwrap()],
                RejectReason::BadEndpoint,
            ),
            (
                "no InternalIP",
                |n| n.internal_ips.clear(),
                RejectReason::NoEndpoint,
            ),
            (
                "no podCIDRs",
                |n| n.pod_cidrs.clear(),
                RejectReason::NoPodCidrs,
            ),
            (
                "podCIDR garbage",
                |n| n.pod_cidrs = vec!["10.244.9.0/33".into()],
                RejectReason::BadPodCidr,
            ),
            (
                "podCIDR too wide",
                |n| n.pod_cidrs = vec!["0.0.0.0/0".into()],
                RejectReason::BadPodCidr,
            ),
            (
                "v6 podCIDR too wide",
                |n| n.pod_cidrs = vec!["::/0".into()],
                RejectReason::BadPodCidr,
            ),
            (
                "podCIDR overlaps ours",
                |n| n.pod_cidrs = vec!["10.244.0.128/25".into()],
                RejectReason::OverlappingPodCidrs,
            ),
            (
                "podCIDR contains ours",
                |n| n.pod_cidrs = vec!["10.244.0.0/16".into()],
                RejectReason::OverlappingPodCidrs,
            ),
            (
                "podCIDR overlaps older node",
                |n| n.pod_cidrs = vec!["10.244.1.0/24".into()],
                RejectReason::OverlappingPodCidrs,
            ),
            (
                "duplicate key of older node",
                |n| n.public_key = Some(key(2).to_base64()),
                RejectReason::DuplicateKey,
            ),
            (
                "podCIDR outside the cluster ranges",
                |n| n.pod_cidrs = vec!["10.99.5.0/24".into()],
                RejectReason::PodCidrOutsideCluster,
            ),
            (
                "v6 podCIDR outside the cluster ranges",
                |n| n.pod_cidrs = vec!["10.244.5.0/24".into(), "2001:db8::/64".into()],
                RejectReason::PodCidrOutsideCluster,
            ),
            (
                "podCIDR wider than the cluster range",
                |n| n.pod_cidrs = vec!["10.240.0.0/12".into()],
                RejectReason::PodCidrOutsideCluster,
            ),
            (
                "podCIDR covers the node's own InternalIP",
                |n| n.internal_ips = vec!["10.244.5.7".parse().unwrap()],
                RejectReason::PodCidrCoversNode,
            ),
            (
                "podCIDR covers the node's ExternalIP",
                |n| n.addresses = vec!["10.244.5.200".parse().unwrap()],
                RejectReason::PodCidrCoversNode,
            ),
            (
                "podCIDR covers this node's underlay",
                |n| n.pod_cidrs = vec!["10.244.200.0/24".into()],
                RejectReason::PodCidrCoversNode,
            ),
            (
                "keepalive garbage",
                |n| n.keepalive = Some("soon".into()),
                RejectReason::BadKeepalive,
            ),
            (
                "keepalive too big",
                |n| n.keepalive = Some("70000".into()),
                RejectReason::BadKeepalive,
            ),
        ];
        for (what, mutate, reason) in cases {
            let good = node("b", 2, Some(2), &["10.244.1.0/24"], "192.0.2.2");
            let mut bad = node("x", 5, Some(9), &["10.244.5.0/24"], "192.0.2.9");
            mutate(&mut bad);
            let sel = select(&[good.clone(), bad], &own(), &settings());
            assert_eq!(
                sel.peers.keys().collect::<Vec<_>>(),
                vec!["b"],
                "{what}: the good node stays, the bad one goes"
            );
            assert_eq!(sel.rejections.len(), 1, "{what}: {:?}", sel.rejections);
            assert_eq!(sel.rejections[0].node, "x", "{what}");
            assert_eq!(
                sel.rejections[0].reason, *reason,
                "{what}: {}",
                sel.rejections[0].detail
            );
            assert!(!sel.rejections[0].detail.is_empty());
        }
    }

    #[test]
    fn the_oldest_owner_keeps_a_duplicate_key_then_the_name_decides() {
        let older = node("zeta", 1, Some(7), &["10.244.1.0/24"], "192.0.2.2");
        let newer = node("alpha", 2, Some(7), &["10.244.2.0/24"], "192.0.2.3");
        let sel = select(&[newer.clone(), older.clone()], &own(), &settings());
        assert!(sel.peers.contains_key("zeta") && !sel.peers.contains_key("alpha"));
        assert_eq!(sel.rejections[0].reason, RejectReason::DuplicateKey);
        // Same second: the name breaks the tie.
        let same = node("alpha", 1, Some(7), &["10.244.2.0/24"], "192.0.2.3");
        let sel = select(&[older, same], &own(), &settings());
        assert!(sel.peers.contains_key("alpha") && !sel.peers.contains_key("zeta"));
        // A node without creationTimestamp is the newest.
        let mut unknown = node("aaa", 0, Some(8), &["10.244.3.0/24"], "192.0.2.4");
        unknown.created = None;
        let dated = node("zzz", 100, Some(8), &["10.244.4.0/24"], "192.0.2.5");
        let sel = select(&[unknown, dated], &own(), &settings());
        assert!(sel.peers.contains_key("zzz"));
    }

    #[test]
    fn a_rejected_older_node_still_keeps_its_key_and_range() {
        // The older owner has no endpoint yet: a newer node must not take its key meanwhile.
        let older = node("a", 1, Some(7), &["10.244.1.0/24"], "");
        let thief = node("b", 2, Some(7), &["10.244.2.0/24"], "192.0.2.3");
        let sel = select(&[older, thief], &own(), &settings());
        assert!(sel.peers.is_empty());
        let reasons: Vec<_> = sel
            .rejections
            .iter()
            .map(|r| (r.node.as_str(), r.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("a", RejectReason::NoEndpoint),
                ("b", RejectReason::DuplicateKey)
            ]
        );
    }

    #[test]
    fn dual_stack_overlap_is_per_family() {
        let b = node(
            "b",
            2,
            Some(2),
            &["10.244.1.0/24", "fd00::/64"],
            "192.0.2.2",
        );
        let c = node(
            "c",
            3,
            Some(3),
            &["10.244.2.0/24", "fd00:0:0:1::/64"],
            "192.0.2.3",
        );
        let d = node(
            "d",
            4,
            Some(4),
            &["10.244.3.0/24", "fd00::/48"],
            "192.0.2.4",
        );
        let sel = select(&[b, c, d], &own(), &settings());
        assert_eq!(sel.peers.len(), 2);
        assert_eq!(sel.rejections[0].node, "d");
        assert_eq!(sel.rejections[0].reason, RejectReason::OverlappingPodCidrs);
    }

    /// A Node that announces a next key gets it on its peer; once it promotes that key the
    /// peer is renamed (its sessions carry on); a key it never announced replaces the peer.
    #[test]
    fn a_peer_that_promotes_its_next_key_is_renamed_not_replaced() {
        let a = peer("a", 3, "192.0.2.3:51820", &["10.244.3.0/24"]);
        let one = |p: &DesiredPeer| BTreeMap::from([("a".to_string(), p.clone())]);
        let rotating = DesiredPeer {
            next_public_key: Some(key(4)),
            ..a.clone()
        };
        let p = plan(&one(&a), &one(&rotating));
        assert_eq!(p.len(), 1);
        assert!(!p[0].remove && p[0].renamed_from.is_none());
        assert_eq!(p[0].next_public_key, Some(Some(key(4))));
        let promoted = DesiredPeer {
            public_key: key(4),
            next_public_key: None,
            ..a.clone()
        };
        let p = plan(&one(&rotating), &one(&promoted));
        assert_eq!(p.len(), 1);
        assert!(!p[0].remove);
        assert_eq!(p[0].public_key, key(4));
        assert_eq!(p[0].renamed_from, Some(key(3)));
        assert_eq!(p[0].next_public_key, Some(None));
        let replaced = DesiredPeer {
            public_key: key(5),
            ..a.clone()
        };
        let p = plan(&one(&a), &one(&replaced));
        assert_eq!(p.len(), 2);
        assert!(p[0].remove && p[0].public_key == key(3));
        assert!(!p[1].remove && p[1].renamed_from.is_none());
    }

    #[test]
    fn revoked_keys_annotation_parses_commas_and_spaces_and_skips_garbage() {
        let n = NodeInfo {
            revoked_keys: Some(format!(
                "{}, not-a-key\n{}",
                key(3).to_base64(),
                key(4).to_base64()
            )),
            ..NodeInfo::default()
        };
        assert_eq!(n.parsed_revoked_keys(), vec![key(3), key(4)]);
        assert!(NodeInfo::default().parsed_revoked_keys().is_empty());
    }

    fn peer(name: &str, k: u8, ep: &str, cidrs: &[&str]) -> DesiredPeer {
        DesiredPeer {
            node: name.into(),
            public_key: key(k),
            next_public_key: None,
            endpoint: ep.parse().unwrap(),
            allowed_ips: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            keepalive: 0,
            relay: None,
            behind_nat: false,
        }
    }

    fn map(ps: &[DesiredPeer]) -> BTreeMap<String, DesiredPeer> {
        ps.iter().map(|p| (p.node.clone(), p.clone())).collect()
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let a = peer("a", 2, "192.0.2.2:51820", &["10.244.1.0/24"]);
        let b = peer("b", 3, "192.0.2.3:51820", &["10.244.2.0/24"]);
        let old = map(&[a.clone(), b.clone()]);
        assert!(plan(&old, &old).is_empty());

        // Endpoint change of b only.
        let mut b2 = b.clone();
        b2.endpoint = "192.0.2.33:51820".parse().unwrap();
        let p = plan(&old, &map(&[a.clone(), b2.clone()]));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].public_key, key(3));
        assert_eq!(p[0].endpoint, Some(b2.endpoint));
        assert!(!p[0].remove && !p[0].replace_allowed_ips && p[0].persistent_keepalive.is_none());

        // A podCIDR appears: replace_allowed_ips only for that peer.
        let mut b3 = b.clone();
        b3.allowed_ips.push("fd00:2::/64".parse().unwrap());
        let p = plan(&old, &map(&[a.clone(), b3]));
        assert_eq!(p.len(), 1);
        assert!(p[0].replace_allowed_ips && p[0].allowed_ips.len() == 2 && p[0].endpoint.is_none());

        // Key change: remove the old key, add the new one, removes first.
        let b4 = DesiredPeer {
            public_key: key(4),
            ..b.clone()
        };
        let p = plan(&old, &map(&[a.clone(), b4]));
        assert_eq!(p.len(), 2);
        assert!(p[0].remove && p[0].public_key == key(3));
        assert!(
            !p[1].remove
                && p[1].public_key == key(4)
                && p[1].replace_allowed_ips
                && p[1].endpoint.is_some()
        );

        // Removal and addition.
        let c = peer("c", 5, "192.0.2.4:51820", &["10.244.3.0/24"]);
        let p = plan(&old, &map(&[a.clone(), c]));
        assert_eq!(p.len(), 2);
        assert!(p[0].remove && p[0].public_key == key(3));
        assert!(p[1].public_key == key(5) && !p[1].remove);

        // Keys swapped between two nodes: both removes precede both adds.
        let a_sw = DesiredPeer {
            public_key: key(3),
            ..a.clone()
        };
        let b_sw = DesiredPeer {
            public_key: key(2),
            ..b.clone()
        };
        let p = plan(&old, &map(&[a_sw, b_sw]));
        assert_eq!(
            p.iter().map(|c| c.remove).collect::<Vec<_>>(),
            vec![true, true, false, false]
        );
    }

    struct NoNet;
    impl crate::wg::device::NetworkControl for NoNet {
        fn bind(&mut self, port: u16, _: u32) -> std::io::Result<u16> {
            Ok(port)
        }
        fn set_fwmark(&mut self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Applied to a real device, a plan leaves the sessions of unaffected peers alone.
    #[test]
    fn applying_a_plan_keeps_unaffected_sessions() {
        use crate::wg::uapi::SetRequest;
        use crate::wg::Device;
        let dev = Device::new();
        let a = peer("a", 2, "192.0.2.2:51820", &["10.244.1.0/24"]);
        let b = peer("b", 3, "192.0.2.3:51820", &["10.244.2.0/24"]);
        let c = peer("c", 4, "192.0.2.4:51820", &["10.244.3.0/24"]);
        let old = map(&[a.clone(), b.clone(), c.clone()]);
        let first = SetRequest {
            private_key: Some(crate::wg::key::PrivateKey::from_bytes([9; 32])),
            peers: add_all(&old),
            ..SetRequest::default()
        };
        dev.apply(first, &mut NoNet).unwrap();
        let peer_of = |k: u8| {
            dev.snapshot()
                .peers
                .iter()
                .find(|p| p.public_key == key(k))
                .cloned()
        };
        let a_before = peer_of(2).unwrap();
        // b changes key and gains a range, c goes, d comes.
        let b2 = DesiredPeer {
            public_key: key(5),
            allowed_ips: vec![
                "10.244.2.0/24".parse().unwrap(),
                "fd00:2::/64".parse().unwrap(),
            ],
            ..b
        };
        let d = peer("d", 6, "192.0.2.6:51820", &["10.244.4.0/24"]);
        let new = map(&[a.clone(), b2, d]);
        dev.apply(
            SetRequest {
                peers: plan(&old, &new),
                ..SetRequest::default()
            },
            &mut NoNet,
        )
        .unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&a_before, &peer_of(2).unwrap()),
            "a's Peer (and its Tunn) is the same object"
        );
        assert!(
            peer_of(3).is_none() && peer_of(4).is_none(),
            "old key of b and c are gone"
        );
        let snap = dev.snapshot();
        let slot = snap.routes.lookup("fd00:2::9".parse().unwrap()).unwrap();
        assert_eq!(snap.peers[slot as usize].public_key, key(5));
        let slot = snap.routes.lookup("10.244.4.9".parse().unwrap()).unwrap();
        assert_eq!(snap.peers[slot as usize].public_key, key(6));
        assert!(snap.routes.lookup("10.244.3.9".parse().unwrap()).is_none());
    }

    #[test]
    fn claimed_index_finds_what_a_scan_finds() {
        // A small address space so that ranges nest and collide often; both families.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut random_net = || -> IpNetwork {
            let r = next();
            if r % 4 == 0 {
                let p = 44 + (r >> 8) as u8 % 24;
                let a = 0xfd00u128 << 112 | u128::from((r >> 16) as u16) << 64;
                canonical(IpNetwork::new(std::net::Ipv6Addr::from(a).into(), p).unwrap())
            } else {
                let p = 12 + (r >> 8) as u8 % 17;
                let a = 0x0a00_0000u32 | ((r >> 16) as u32 & 0x000f_ff00);
                canonical(IpNetwork::new(std::net::Ipv4Addr::from(a).into(), p).unwrap())
            }
        };
        for _ in 0..20 {
            let mut naive: Vec<(IpNetwork, String)> = Vec::new();
            let owners: Vec<String> = (0..60).map(|i| format!("n{i}")).collect();
            let mut index = Claimed::default();
            for owner in &owners {
                let q = random_net();
                let want = naive
                    .iter()
                    .find(|(o, _)| overlaps(o, &q))
                    .map(|(o, w)| (*o, w.as_str()));
                assert_eq!(index.first_overlap(&q), want, "query {q} after {naive:?}");
                let n = random_net();
                naive.push((n, owner.clone()));
                index.insert(n, owner);
            }
        }
    }
}
