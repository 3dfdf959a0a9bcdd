//! Incremental peer selection: keeps what selection reads of every Node ([`NodeInfo`]), drops
//! updates that change none of it, and turns a changed Node into a change of that Node's peer
//! (or refusal) alone, not a reselection of all of them.
//!
//! [`peers::select`] decides with cross-Node rules: the older of two Nodes with one public key
//! or overlapping podCIDRs wins, and no podCIDR may contain a Node's address. A changed Node
//! whose old and new claims (key, podCIDRs, addresses) meet no other Node's is decided alone,
//! exactly as the full selection would decide it (it meets no one, so no one's order matters);
//! one that meets another Node's claims reruns the full selection (O(N log N), rare: a
//! duplicate key or an overlap is a misconfiguration). This Node's own changes (its podCIDRs
//! are everyone's constraint) rerun it too. The claims are indexed so that the check costs a
//! few tree lookups.

use super::peers::{self, DesiredPeer, NodeInfo, Rejection, Settings};
use ipnetwork::IpNetwork;
use kwire_proto::key::PublicKey;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What one Node claims, parsed: what other Nodes' acceptance can depend on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Claims {
    key: Option<PublicKey>,
    cidrs: Vec<IpNetwork>,
    addresses: Vec<IpAddr>,
}

impl Claims {
    fn of(n: &NodeInfo) -> Claims {
        Claims {
            key: n
                .public_key
                .as_deref()
                .and_then(|k| PublicKey::from_base64(k).ok()),
            cidrs: n
                .pod_cidrs
                .iter()
                .filter_map(|c| c.parse().ok())
                .map(crate::wg::allowed_ips::canonical)
                .collect(),
            addresses: {
                // Every address selection reserves: status.addresses of any type.
                let mut a: Vec<IpAddr> =
                    n.addresses.iter().chain(&n.internal_ips).copied().collect();
                a.sort_unstable();
                a.dedup();
                a
            },
        }
    }
}

/// (is IPv6, address as a number).
fn num(ip: &IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(*a))),
        IpAddr::V6(a) => (true, u128::from(*a)),
    }
}

/// (is IPv6, first address, last address).
fn span(c: &IpNetwork) -> (bool, u128, u128) {
    let (v6, start) = num(&c.network());
    let width = if v6 { 128 } else { 32 };
    let host = width - u32::from(c.prefix());
    let end = if host >= 128 {
        u128::MAX
    } else {
        start | ((1u128 << host) - 1)
    };
    (v6, start, end)
}

/// Who claims what, for "does this claim meet another Node's".
#[derive(Debug, Default)]
struct ClaimIndex {
    keys: BTreeMap<PublicKey, BTreeSet<String>>,
    /// (is IPv6, first address, prefix) → owners.
    cidrs: BTreeMap<(bool, u128, u8), BTreeSet<String>>,
    /// (is IPv6, prefix) → how many claimed ranges have it.
    prefixes: BTreeMap<(bool, u8), usize>,
    addresses: BTreeMap<(bool, u128), BTreeSet<String>>,
}

impl ClaimIndex {
    fn add(&mut self, name: &str, c: &Claims) {
        if let Some(k) = c.key {
            self.keys.entry(k).or_default().insert(name.to_string());
        }
        for n in &c.cidrs {
            let (v6, start, _) = span(n);
            self.cidrs
                .entry((v6, start, n.prefix()))
                .or_default()
                .insert(name.to_string());
            *self.prefixes.entry((v6, n.prefix())).or_default() += 1;
        }
        for a in &c.addresses {
            self.addresses
                .entry(num(a))
                .or_default()
                .insert(name.to_string());
        }
    }

    fn remove(&mut self, name: &str, c: &Claims) {
        fn drop_owner<K: Ord>(m: &mut BTreeMap<K, BTreeSet<String>>, k: K, name: &str) {
            if let Some(set) = m.get_mut(&k) {
                set.remove(name);
                if set.is_empty() {
                    m.remove(&k);
                }
            }
        }
        if let Some(k) = c.key {
            drop_owner(&mut self.keys, k, name);
        }
        for n in &c.cidrs {
            let (v6, start, _) = span(n);
            drop_owner(&mut self.cidrs, (v6, start, n.prefix()), name);
            if let Some(count) = self.prefixes.get_mut(&(v6, n.prefix())) {
                *count -= 1;
                if *count == 0 {
                    self.prefixes.remove(&(v6, n.prefix()));
                }
            }
        }
        for a in &c.addresses {
            drop_owner(&mut self.addresses, num(a), name);
        }
    }

    /// Whether `c` (claimed by `name`) meets a claim of another Node, or this node's key.
    fn meets_another(&self, name: &str, c: &Claims, self_key: &PublicKey) -> bool {
        let other = |owners: &BTreeSet<String>| owners.iter().any(|o| o != name);
        if let Some(k) = &c.key {
            if k == self_key || self.keys.get(k).is_some_and(other) {
                return true;
            }
        }
        for n in &c.cidrs {
            let (v6, start, end) = span(n);
            // A claimed range containing this one: one exact lookup per prefix in use.
            for (&(_, q), _) in self.prefixes.range((v6, 0)..=(v6, n.prefix())) {
                let width = if v6 { 128 } else { 32 };
                let host = width - u32::from(q);
                let net = if host >= 128 {
                    0
                } else {
                    start >> host << host
                };
                if self.cidrs.get(&(v6, net, q)).is_some_and(other) {
                    return true;
                }
            }
            // A claimed range starting inside this one.
            if self
                .cidrs
                .range((v6, start, 0)..=(v6, end, u8::MAX))
                .any(|(_, o)| other(o))
            {
                return true;
            }
            // Another Node's address inside this range.
            if self
                .addresses
                .range((v6, start)..=(v6, end))
                .any(|(_, o)| other(o))
            {
                return true;
            }
        }
        // This Node's address inside another Node's range.
        for a in &c.addresses {
            let (v6, x) = num(a);
            for (&(_, q), _) in self
                .prefixes
                .range((v6, 0)..=(v6, if v6 { 128 } else { 32 }))
            {
                let width = if v6 { 128 } else { 32 };
                let host = width - u32::from(q);
                let net = if host >= 128 { 0 } else { x >> host << host };
                if self.cidrs.get(&(v6, net, q)).is_some_and(other) {
                    return true;
                }
            }
        }
        false
    }
}

/// The selection's answer for one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Peer(DesiredPeer),
    Refused(Rejection),
}

/// What [`PeerIndex::reselect`] did.
#[derive(Debug, Default)]
pub struct Reselected {
    /// Every Node was reconsidered.
    pub full: bool,
    /// (Node, old outcome, new outcome) where they differ.
    pub changed: Vec<(String, Option<Choice>, Option<Choice>)>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PeerIndex {
    self_name: String,
    self_key: PublicKey,
    infos: BTreeMap<String, NodeInfo>,
    claims: BTreeMap<String, Claims>,
    index: ClaimIndex,
    /// The current answer per Node (absent: not a peer, nothing to report).
    outcomes: BTreeMap<String, Choice>,
    /// Nodes changed since the last [`PeerIndex::reselect`].
    pending: BTreeSet<String>,
    /// The next reselect must be a full one.
    full: bool,
    /// The Nodes that carry a revoked-keys or a NAT-observed annotation: what the agent
    /// reads of those is read from these few, not from every Node on every change.
    revoking: BTreeSet<String>,
    observing: BTreeSet<String>,
    /// Reselects that ran the full selection (for logs and tests).
    pub full_reselects: u64,
}

impl PeerIndex {
    pub fn new(self_name: &str, self_key: PublicKey) -> Self {
        PeerIndex {
            self_name: self_name.to_string(),
            self_key,
            infos: BTreeMap::new(),
            claims: BTreeMap::new(),
            index: ClaimIndex::default(),
            outcomes: BTreeMap::new(),
            pending: BTreeSet::new(),
            full: true,
            revoking: BTreeSet::new(),
            observing: BTreeSet::new(),
            full_reselects: 0,
        }
    }

    pub fn get(&self, name: &str) -> Option<&NodeInfo> {
        self.infos.get(name)
    }

    /// This node's key changed (rotation, revocation): selection runs again in full.
    pub fn set_self_key(&mut self, key: PublicKey) {
        if self.self_key != key {
            self.self_key = key;
            self.full = true;
        }
    }

    /// Every Node's view, by name.
    pub fn infos(&self) -> impl Iterator<Item = &NodeInfo> {
        self.infos.values()
    }

    /// The Nodes with a revoked-keys annotation, by name.
    pub fn revoking(&self) -> impl Iterator<Item = &NodeInfo> {
        self.revoking.iter().filter_map(|n| self.infos.get(n))
    }

    /// The Nodes with a NAT-observed annotation, by name.
    pub fn observing(&self) -> impl Iterator<Item = &NodeInfo> {
        self.observing.iter().filter_map(|n| self.infos.get(n))
    }

    /// Keeps `revoking` and `observing` in step with Node `name`'s view (`None`: gone).
    fn note_annotations(&mut self, name: &str, info: Option<&NodeInfo>) {
        for (set, has) in [
            (
                &mut self.revoking,
                info.is_some_and(|i| i.revoked_keys.is_some()),
            ),
            (
                &mut self.observing,
                info.is_some_and(|i| i.nat_observed.is_some()),
            ),
        ] {
            if has {
                if !set.contains(name) {
                    set.insert(name.to_string());
                }
            } else {
                set.remove(name);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.infos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(String::as_str)
    }

    /// Whether changes wait for [`PeerIndex::reselect`].
    pub fn is_pending(&self) -> bool {
        self.full || !self.pending.is_empty()
    }

    /// Makes the next reselect a full one (this node's own ranges or settings changed).
    pub fn force_full(&mut self) {
        self.full = true;
    }

    /// Adds or updates a Node; false (nothing else done) when selection reads the same.
    pub fn upsert(&mut self, info: NodeInfo) -> bool {
        if self.infos.get(&info.name) == Some(&info) {
            return false;
        }
        let name = info.name.clone();
        let claims = Claims::of(&info);
        let old = self.claims.remove(&name);
        if let Some(old) = &old {
            self.index.remove(&name, old);
        }
        if name == self.self_name
            || old
                .as_ref()
                .is_some_and(|o| self.index.meets_another(&name, o, &self.self_key))
            || self.index.meets_another(&name, &claims, &self.self_key)
        {
            self.full = true;
        }
        self.index.add(&name, &claims);
        self.claims.insert(name.clone(), claims);
        self.note_annotations(&name, Some(&info));
        self.infos.insert(name.clone(), info);
        self.pending.insert(name);
        true
    }

    /// Removes a Node; false when it was not there.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.infos.remove(name).is_none() {
            return false;
        }
        self.note_annotations(name, None);
        if let Some(old) = self.claims.remove(name) {
            self.index.remove(name, &old);
            if name == self.self_name || self.index.meets_another(name, &old, &self.self_key) {
                self.full = true;
            }
        }
        self.pending.insert(name.to_string());
        true
    }

    /// Brings the outcomes up to date; returns whether every Node was reconsidered (the
    /// caller should then compare all of its state, not only the changes), and the Nodes whose
    /// outcome changed, with the old and the new one.
    pub fn reselect(&mut self, own_pod_cidrs: &[IpNetwork], settings: &Settings) -> Reselected {
        let pending = std::mem::take(&mut self.pending);
        let mut changed = Vec::new();
        let full = std::mem::take(&mut self.full);
        if full {
            self.full_reselects += 1;
            let all: Vec<NodeInfo> = self.infos.values().cloned().collect();
            let sel = peers::select(&all, own_pod_cidrs, settings);
            let mut next: BTreeMap<String, Choice> = sel
                .peers
                .into_iter()
                .map(|(n, p)| (n, Choice::Peer(p)))
                .collect();
            for r in sel.rejections {
                next.insert(r.node.clone(), Choice::Refused(r));
            }
            let names: BTreeSet<&String> = self.outcomes.keys().chain(next.keys()).collect();
            for name in names {
                let (o, n) = (self.outcomes.get(name), next.get(name));
                if o != n {
                    changed.push((name.clone(), o.cloned(), n.cloned()));
                }
            }
            self.outcomes = next;
            return Reselected { full, changed };
        }
        for name in pending {
            let new = self.infos.get(&name).and_then(|info| {
                let sel = peers::select(std::slice::from_ref(info), own_pod_cidrs, settings);
                match (
                    sel.peers.into_values().next(),
                    sel.rejections.into_iter().next(),
                ) {
                    (Some(p), _) => Some(Choice::Peer(p)),
                    (None, Some(r)) => Some(Choice::Refused(r)),
                    (None, None) => None,
                }
            });
            let old = match &new {
                Some(o) => self.outcomes.insert(name.clone(), o.clone()),
                None => self.outcomes.remove(&name),
            };
            if old != new {
                changed.push((name, old, new));
            }
        }
        Reselected { full, changed }
    }

    /// The current peers.
    pub fn peers(&self) -> impl Iterator<Item = &DesiredPeer> {
        self.outcomes.values().filter_map(|o| match o {
            Choice::Peer(p) => Some(p),
            Choice::Refused(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SELF: &str = "n0";

    fn settings() -> Settings {
        Settings {
            self_name: SELF.into(),
            self_key: PublicKey([9; 32]),
            default_port: 51820,
            default_keepalive: 0,
            // 192.0.2.0/24 of the pool is outside; 10.0.3.0/24 and 10.0.0.0/16 cover this
            // host's address.
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            host_addresses: vec![IpAddr::from([10, 0, 3, 9])],
        }
    }

    fn key(i: u8) -> String {
        PublicKey([i; 32]).to_base64()
    }

    /// Node `i` with key `k`, podCIDR number `c` of a small pool (so that they collide),
    /// InternalIP `a` and, unless `x` is 0, an ExternalIP `x` inside the pool's ranges (so that
    /// one Node's address can fall in another's podCIDR).
    fn node(i: usize, k: u8, c: usize, a: u8, x: u8, created: i64) -> NodeInfo {
        let cidrs = [
            "10.0.1.0/24",
            "10.0.2.0/24",
            "10.0.0.0/16",
            "10.0.2.128/25",
            "192.0.2.0/24",
            "not-a-cidr",
            "10.0.3.0/24",
        ];
        NodeInfo {
            name: format!("n{i}"),
            created: Some(created),
            public_key: (k > 0).then(|| key(k)),
            next_public_key: None,
            revoked_keys: None,
            endpoint: None,
            keepalive: None,
            pod_cidrs: vec![cidrs[c % cidrs.len()].to_string()],
            internal_ips: vec![IpAddr::from([192, 0, 2, a])],
            addresses: if x == 0 {
                vec![]
            } else {
                vec![IpAddr::from([10, 0, x, 7])]
            },
            ..NodeInfo::default()
        }
    }

    fn full(ix: &PeerIndex, own: &[IpNetwork]) -> BTreeMap<String, Choice> {
        let all: Vec<NodeInfo> = ix.infos.values().cloned().collect();
        let sel = peers::select(&all, own, &settings());
        let mut m: BTreeMap<String, Choice> = sel
            .peers
            .into_iter()
            .map(|(n, p)| (n, Choice::Peer(p)))
            .collect();
        for r in sel.rejections {
            m.insert(r.node.clone(), Choice::Refused(r));
        }
        m
    }

    #[test]
    fn a_heartbeat_changes_nothing_and_one_node_is_decided_alone() {
        let own: Vec<IpNetwork> = vec!["10.0.0.0/24".parse().unwrap()];
        let mut ix = PeerIndex::new(SELF, PublicKey([9; 32]));
        for i in 1..=50 {
            let mut n = node(i, i as u8, 0, i as u8, 0, i as i64);
            n.pod_cidrs = vec![format!("10.1.{i}.0/24")];
            ix.upsert(n);
        }
        assert_eq!(ix.reselect(&own, &settings()).changed.len(), 50);
        assert_eq!(ix.full_reselects, 1);
        // The same Node again (what a status heartbeat reads as): nothing pending.
        let n7 = ix.get("n7").unwrap().clone();
        assert!(!ix.upsert(n7.clone()));
        assert!(!ix.is_pending());
        // A new endpoint: that Node alone, no full selection.
        let mut moved = n7;
        moved.endpoint = Some("198.51.100.7:51820".into());
        assert!(ix.upsert(moved));
        let changed = ix.reselect(&own, &settings()).changed;
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, "n7");
        assert_eq!(ix.full_reselects, 1);
        assert_eq!(ix.outcomes, full(&ix, &own));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(usize, u8, usize, u8, u8),
        Remove(usize),
        Reselect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..8usize, 0..5u8, 0..7usize, 1..6u8, 0..4u8).prop_map(|(i, k, c, a, x)| Op::Upsert(i, k, c, a, x)),
            1 => (0..8usize).prop_map(Op::Remove),
            2 => Just(Op::Reselect),
        ]
    }

    /// The Nodes read for revoked keys and NAT observations follow their annotations
    /// through updates and removals.
    #[test]
    fn annotated_nodes_are_tracked() {
        let mut ix = PeerIndex::new(SELF, PublicKey([9; 32]));
        let names = |it: &mut dyn Iterator<Item = &NodeInfo>| -> Vec<String> {
            it.map(|n| n.name.clone()).collect()
        };
        let mut a = node(1, 1, 0, 1, 0, 1);
        a.revoked_keys = Some(key(7));
        let mut b = node(2, 2, 1, 2, 0, 2);
        b.nat_observed = Some("n0=192.0.2.99:51820".into());
        ix.upsert(a.clone());
        ix.upsert(b.clone());
        ix.upsert(node(3, 3, 6, 3, 0, 3));
        assert_eq!(names(&mut ix.revoking()), ["n1"]);
        assert_eq!(names(&mut ix.observing()), ["n2"]);
        // n1 loses its annotation, n2 gains one, n3 is removed.
        a.revoked_keys = None;
        b.revoked_keys = Some(key(8));
        ix.upsert(a);
        ix.upsert(b);
        ix.remove("n3");
        assert_eq!(names(&mut ix.revoking()), ["n2"]);
        assert_eq!(names(&mut ix.observing()), ["n2"]);
        ix.remove("n2");
        assert!(ix.revoking().next().is_none() && ix.observing().next().is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any sequence of Node changes leaves the same outcomes as a full selection, and the
        /// reported changes replay the old outcomes into the new ones.
        #[test]
        fn incremental_equals_full_selection(ops in proptest::collection::vec(op(), 1..40)) {
            let own: Vec<IpNetwork> = vec!["10.0.0.0/24".parse().unwrap()];
            let mut ix = PeerIndex::new(SELF, PublicKey([9; 32]));
            let mut replay: BTreeMap<String, Choice> = BTreeMap::new();
            for (t, op) in ops.iter().enumerate() {
                match op {
                    // Key 9 is this node's; n0 is this node.
                    Op::Upsert(i, k, c, a, x) => { ix.upsert(node(*i, if *k == 4 { 9 } else { *k }, *c, *a, *x, (*i as i64) % 3)); }
                    Op::Remove(i) => { ix.remove(&format!("n{i}")); }
                    Op::Reselect => {}
                }
                if matches!(op, Op::Reselect) || t + 1 == ops.len() {
                    for (name, old, new) in ix.reselect(&own, &settings()).changed {
                        prop_assert_eq!(replay.get(&name), old.as_ref());
                        match new {
                            Some(o) => { replay.insert(name, o); }
                            None => { replay.remove(&name); }
                        }
                    }
                    let want = full(&ix, &own);
                    prop_assert_eq!(&ix.outcomes, &want);
                    prop_assert_eq!(&replay, &want);
                }
            }
        }
    }
}
