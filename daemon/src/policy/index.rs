//! The incremental policy compiler: keeps what policy needs of the cluster's Namespaces, Pods
//! and NetworkPolicies, and turns each change into the least work that keeps the next
//! [`PolicySet`] snapshot exact.
//!
//! How each change propagates (the costs are per change, not per cluster):
//! - A pod's **identity** is its namespace and label set; pods of one template share one. A pod
//!   whose labels change moves to another identity; a new identity is checked against the
//!   enforced selectors (hundreds per node), a vanished one is taken out of their sets.
//! - A **selector** (a pod peer of an enforced rule, with its namespace scope) has the sorted set
//!   of identities it matches. Selectors are shared by every rule with the same selector, created
//!   when the first enforced rule needs one and computed once then; afterwards only identity and
//!   namespace-label changes touch their sets.
//! - A pod's **address** maps to its record (identity, named ports) in a sharded copy-on-write
//!   map; an IP or port change replaces one entry.
//! - **Enforced** pods (scope: one node's pods in the agent, all in trace) have a rule table,
//!   rebuilt only when the pod itself, or a policy of its namespace, changes. Only the policies
//!   selecting an enforced pod are compiled (their rules hold selector ids, so a selector set
//!   changing does not rebuild any table).
//! - A **namespace label** change re-checks that namespace's identities against the selectors
//!   that have a namespaceSelector.
//! - An update that changes nothing policy reads (a status heartbeat, another annotation) is
//!   recognised by comparing the stripped object with the stored one, and costs nothing more.
//!
//! [`PolicyIndex::snapshot`] settles the pending table work and clones five pointers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::engine::{
    compile_ports, CompiledRule, DirectionTable, IdSet, PodKey, PodRecord, PodTable, PolicySet,
    RulePeers, SelectorSets,
};
use super::ipmap::IpMap;
use super::ipset::IpRangeSet;
use super::model::{ContainerPort, Namespace, Pod};
use super::saved::{read_ref, write_ref, FirstUse, Reader, SavedError, Writer};
use super::selector::LabelSelector;
use super::spec::{Peer, Policy};
use super::{Direction, RuleRef};

type Labels = BTreeMap<String, String>;

/// Which pods a snapshot enforces for (has rule tables for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every pod: `kwire policy trace`, tests.
    All,
    /// The pods whose `spec.nodeName` is this node: the agent, whose packet loop asks only
    /// about its own pods.
    Node(String),
}

/// What the index has done, for logs and for tests that prove work was (not) done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Changes that altered what policy reads.
    pub changes: u64,
    /// Updates that changed nothing policy reads (ignored after one comparison).
    pub unchanged: u64,
    /// Pod rule tables built.
    pub tables_built: u64,
    /// Policies compiled (made enforced).
    pub policies_compiled: u64,
    /// Selector sets computed from scratch.
    pub selectors_computed: u64,
    /// Selector set memberships changed one identity at a time.
    pub selector_updates: u64,
    /// Snapshots made.
    pub snapshots: u64,
}

#[derive(Debug)]
struct NsState {
    /// Whether a Namespace object gives the labels (else only the name label applies).
    given: bool,
    labels: Arc<Labels>,
    identities: BTreeSet<u32>,
    /// Every pod of this namespace, by name.
    pods: HashMap<Arc<str>, Arc<PodRecord>>,
    /// Enforced pods of this namespace.
    enforced: BTreeSet<PodKey>,
    policies: BTreeMap<Arc<str>, PolicyState>,
}

impl NsState {
    fn new(name: &str) -> Self {
        NsState {
            given: false,
            labels: Arc::new(Namespace::new(name, Labels::new()).labels),
            identities: BTreeSet::new(),
            pods: HashMap::new(),
            enforced: BTreeSet::new(),
            policies: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct PolicyState {
    id: u32,
    policy: Arc<Policy>,
    /// Enforced pods this policy selects.
    enforced_refs: u32,
    compiled: Option<CompiledPolicy>,
}

#[derive(Debug)]
struct CompiledPolicy {
    ingress: Vec<Arc<RulePeers>>,
    egress: Vec<Arc<RulePeers>>,
    /// Every selector reference taken (one per pod peer), released when the policy stops
    /// being enforced.
    selectors: Vec<u32>,
}

#[derive(Debug)]
struct Identity {
    namespace: Arc<str>,
    labels: Arc<Labels>,
    pods: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SelectorKey {
    /// A pod selector in one namespace (a peer without namespaceSelector: the policy's own).
    Own {
        namespace: Arc<str>,
        pods: LabelSelector,
    },
    /// A pod selector in every namespace a namespace selector matches.
    Matching {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

#[derive(Debug)]
struct SelectorEntry {
    key: SelectorKey,
    refs: u32,
}

#[derive(Debug, Default)]
struct Enforced {
    /// Ids of the policies selecting the pod, in (namespace, name) order.
    selecting: Vec<u32>,
    /// Addresses whose table entry is this pod's.
    table_ips: Vec<IpAddr>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PolicyIndex {
    scope: Scope,
    namespaces: HashMap<Arc<str>, NsState>,
    pod_count: usize,
    /// Policy id -> (namespace, name).
    policy_ids: HashMap<u32, (Arc<str>, Arc<str>)>,
    next_policy_id: u32,
    policy_count: usize,
    identity_by_key: HashMap<(Arc<str>, Arc<Labels>), u32>,
    identities: Vec<Option<Identity>>,
    free_identities: Vec<u32>,
    selector_by_key: HashMap<SelectorKey, u32>,
    selector_entries: Vec<Option<SelectorEntry>>,
    free_selectors: Vec<u32>,
    /// The winner of each pod address (first in namespace/name order).
    by_ip: IpMap<Arc<PodRecord>>,
    /// Addresses claimed by more than one pod: every claimant.
    conflicts: HashMap<IpAddr, BTreeMap<PodKey, Arc<PodRecord>>>,
    enforced: HashMap<PodKey, Enforced>,
    /// Enforced pods whose table must be rebuilt before the next snapshot.
    dirty: BTreeSet<PodKey>,
    tables: Arc<HashMap<IpAddr, Arc<PodTable>>>,
    selector_sets: Arc<SelectorSets>,
    compiled: Arc<HashMap<u32, Arc<Policy>>>,
    port_lists: HashSet<Arc<[ContainerPort]>>,
    node_names: HashSet<Arc<str>>,
    changed: bool,
    stats: IndexStats,
}

impl PolicyIndex {
    pub fn new(scope: Scope) -> Self {
        PolicyIndex {
            scope,
            namespaces: HashMap::new(),
            pod_count: 0,
            policy_ids: HashMap::new(),
            next_policy_id: 0,
            policy_count: 0,
            identity_by_key: HashMap::new(),
            identities: Vec::new(),
            free_identities: Vec::new(),
            selector_by_key: HashMap::new(),
            selector_entries: Vec::new(),
            free_selectors: Vec::new(),
            by_ip: IpMap::default(),
            conflicts: HashMap::new(),
            enforced: HashMap::new(),
            dirty: BTreeSet::new(),
            tables: Arc::default(),
            selector_sets: Arc::default(),
            compiled: Arc::default(),
            port_lists: HashSet::new(),
            node_names: HashSet::new(),
            changed: true,
            stats: IndexStats::default(),
        }
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// Whether anything changed since the last snapshot (a new one would differ).
    pub fn is_changed(&self) -> bool {
        self.changed || !self.dirty.is_empty()
    }

    pub fn pod_count(&self) -> usize {
        self.pod_count
    }

    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    pub fn identity_count(&self) -> usize {
        self.identity_by_key.len()
    }

    /// Policies compiled because they select an enforced pod.
    pub fn compiled_policy_count(&self) -> usize {
        self.compiled.len()
    }

    pub fn selector_count(&self) -> usize {
        self.selector_by_key.len()
    }

    /// Every pod, as (namespace, name).
    pub fn pod_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.namespaces
            .iter()
            .flat_map(|(ns, s)| s.pods.keys().map(move |n| (&**ns, &**n)))
    }

    /// Every Namespace given as an object.
    pub fn namespace_names(&self) -> impl Iterator<Item = &str> {
        self.namespaces
            .iter()
            .filter(|(_, s)| s.given)
            .map(|(n, _)| &**n)
    }

    /// Every policy, as (namespace, name).
    pub fn policy_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.namespaces
            .iter()
            .flat_map(|(ns, s)| s.policies.keys().map(move |n| (&**ns, &**n)))
    }

    fn ns_key(&mut self, name: &str) -> Arc<str> {
        if let Some((k, _)) = self.namespaces.get_key_value(name) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(name);
        self.namespaces.insert(k.clone(), NsState::new(name));
        k
    }

    fn node_key(&mut self, name: &str) -> Arc<str> {
        if let Some(k) = self.node_names.get(name) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(name);
        self.node_names.insert(k.clone());
        k
    }

    fn port_list(&mut self, ports: &[ContainerPort]) -> Arc<[ContainerPort]> {
        let named: Vec<ContainerPort> =
            ports.iter().filter(|p| p.name.is_some()).cloned().collect();
        if let Some(k) = self.port_lists.get(named.as_slice()) {
            return k.clone();
        }
        let k: Arc<[ContainerPort]> = named.into();
        self.port_lists.insert(k.clone());
        k
    }

    fn is_enforced(&self, rec: &PodRecord) -> bool {
        rec.identity.is_some()
            && match &self.scope {
                Scope::All => true,
                Scope::Node(n) => *rec.node == **n,
            }
    }

    fn labels_of(&self, identity: u32) -> &Labels {
        &self.identities[identity as usize]
            .as_ref()
            .expect("live identity")
            .labels
    }

    // ---------- Namespaces ----------

    /// Adds or updates a Namespace; false when its labels are what the index has.
    pub fn apply_namespace(&mut self, ns: Namespace) -> bool {
        let ns = Namespace::new(ns.name, ns.labels);
        let key = self.ns_key(&ns.name);
        let state = self.namespaces.get_mut(&key).expect("interned");
        if state.given && *state.labels == ns.labels {
            self.stats.unchanged += 1;
            return false;
        }
        state.given = true;
        let relabeled = *state.labels != ns.labels;
        state.labels = Arc::new(ns.labels);
        self.stats.changes += 1;
        if relabeled {
            self.namespace_relabeled(&key);
        }
        true
    }

    /// Removes a Namespace object: its pods and policies (if any are left) see only the name
    /// label. False when the index had no such object.
    pub fn delete_namespace(&mut self, name: &str) -> bool {
        let Some((key, state)) = self.namespaces.get_key_value(name) else {
            return false;
        };
        if !state.given {
            return false;
        }
        let key = key.clone();
        let state = self.namespaces.get_mut(&key).expect("present");
        state.given = false;
        let plain = Namespace::new(name, Labels::new()).labels;
        let relabeled = *state.labels != plain;
        state.labels = Arc::new(plain);
        self.stats.changes += 1;
        if relabeled {
            self.namespace_relabeled(&key);
        }
        true
    }

    fn namespace_relabeled(&mut self, ns: &Arc<str>) {
        let state = &self.namespaces[ns];
        let ids: Vec<u32> = state.identities.iter().copied().collect();
        let ns_labels = state.labels.clone();
        for sid in 0..self.selector_entries.len() {
            let Some(SelectorEntry {
                key: SelectorKey::Matching { namespaces, pods },
                ..
            }) = &self.selector_entries[sid]
            else {
                continue;
            };
            let ns_ok = namespaces.matches(&ns_labels);
            let wanted: Vec<(u32, bool)> = ids
                .iter()
                .map(|&id| (id, ns_ok && pods.matches(self.labels_of(id))))
                .collect();
            for (id, want) in wanted {
                self.set_membership(sid as u32, id, want);
            }
        }
    }

    // ---------- Selectors ----------

    fn set_membership(&mut self, selector: u32, identity: u32, member: bool) {
        let sets = Arc::make_mut(&mut self.selector_sets);
        let Some(Some(set)) = sets.get_mut(selector as usize) else {
            return;
        };
        let has = set.contains(identity);
        if has == member {
            return;
        }
        let set = Arc::make_mut(set);
        if member {
            set.insert(identity);
        } else {
            set.remove(identity);
        }
        self.stats.selector_updates += 1;
        self.changed = true;
    }

    fn selector_matches(&self, key: &SelectorKey, identity: &Identity) -> bool {
        match key {
            SelectorKey::Own { namespace, pods } => {
                *identity.namespace == **namespace && pods.matches(&identity.labels)
            }
            SelectorKey::Matching { namespaces, pods } => {
                let ns_labels = &self.namespaces[&identity.namespace].labels;
                namespaces.matches(ns_labels) && pods.matches(&identity.labels)
            }
        }
    }

    fn acquire_selector(&mut self, key: SelectorKey) -> u32 {
        if let Some(&sid) = self.selector_by_key.get(&key) {
            if let Some(e) = self.selector_entries[sid as usize].as_mut() {
                e.refs += 1;
            }
            return sid;
        }
        let mut ids = Vec::new();
        let mut scan = |state: &NsState| {
            for &id in &state.identities {
                let labels = &self.identities[id as usize].as_ref().expect("live").labels;
                let pods = match &key {
                    SelectorKey::Own { pods, .. } | SelectorKey::Matching { pods, .. } => pods,
                };
                if pods.matches(labels) {
                    ids.push(id);
                }
            }
        };
        match &key {
            SelectorKey::Own { namespace, .. } => {
                if let Some(state) = self.namespaces.get(namespace) {
                    scan(state);
                }
            }
            SelectorKey::Matching { namespaces, .. } => {
                for state in self.namespaces.values() {
                    if namespaces.matches(&state.labels) {
                        scan(state);
                    }
                }
            }
        }
        let set = Arc::new(IdSet::from_unsorted(ids));
        let sid = match self.free_selectors.pop() {
            Some(sid) => sid,
            None => {
                self.selector_entries.push(None);
                self.selector_entries.len() as u32 - 1
            }
        };
        self.selector_entries[sid as usize] = Some(SelectorEntry {
            key: key.clone(),
            refs: 1,
        });
        let sets = Arc::make_mut(&mut self.selector_sets);
        if sets.len() <= sid as usize {
            sets.resize(sid as usize + 1, None);
        }
        sets[sid as usize] = Some(set);
        self.selector_by_key.insert(key, sid);
        self.stats.selectors_computed += 1;
        self.changed = true;
        sid
    }

    fn release_selector(&mut self, sid: u32) {
        let Some(entry) = self.selector_entries[sid as usize].as_mut() else {
            return;
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            return;
        }
        let entry = self.selector_entries[sid as usize].take().expect("present");
        self.selector_by_key.remove(&entry.key);
        Arc::make_mut(&mut self.selector_sets)[sid as usize] = None;
        self.free_selectors.push(sid);
        self.changed = true;
    }

    // ---------- Identities ----------

    fn acquire_identity(&mut self, namespace: &Arc<str>, labels: Labels) -> u32 {
        let key = (namespace.clone(), Arc::new(labels));
        if let Some(&id) = self.identity_by_key.get(&key) {
            if let Some(i) = self.identities[id as usize].as_mut() {
                i.pods += 1;
            }
            return id;
        }
        let id = match self.free_identities.pop() {
            Some(id) => id,
            None => {
                self.identities.push(None);
                self.identities.len() as u32 - 1
            }
        };
        let identity = Identity {
            namespace: namespace.clone(),
            labels: key.1.clone(),
            pods: 1,
        };
        let joins: Vec<u32> = self
            .selector_entries
            .iter()
            .enumerate()
            .filter_map(|(sid, e)| {
                let e = e.as_ref()?;
                self.selector_matches(&e.key, &identity)
                    .then_some(sid as u32)
            })
            .collect();
        self.identities[id as usize] = Some(identity);
        self.identity_by_key.insert(key, id);
        if let Some(state) = self.namespaces.get_mut(namespace) {
            state.identities.insert(id);
        }
        for sid in joins {
            self.set_membership(sid, id, true);
        }
        id
    }

    fn release_identity(&mut self, id: u32) {
        let Some(identity) = self.identities[id as usize].as_mut() else {
            return;
        };
        identity.pods -= 1;
        if identity.pods > 0 {
            return;
        }
        let identity = self.identities[id as usize].take().expect("present");
        self.identity_by_key
            .remove(&(identity.namespace.clone(), identity.labels.clone()));
        if let Some(state) = self.namespaces.get_mut(&identity.namespace) {
            state.identities.remove(&id);
        }
        for sid in 0..self.selector_entries.len() {
            if self.selector_entries[sid].is_some() {
                self.set_membership(sid as u32, id, false);
            }
        }
        self.free_identities.push(id);
    }

    // ---------- Pods ----------

    /// The stored pod `namespace/name`.
    fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<PodRecord>> {
        self.namespaces.get(namespace)?.pods.get(name)
    }

    fn pod_by_key(&self, key: &PodKey) -> Option<&Arc<PodRecord>> {
        self.pod(&key.namespace, &key.name)
    }

    /// Whether `pod` says what `old` says, as far as policy reads: labels, addresses, named
    /// container ports, node, host network. Allocates nothing.
    fn unchanged(&self, old: &PodRecord, pod: &Pod) -> bool {
        let same_labels = match old.identity {
            Some(id) => !pod.host_network && *self.labels_of(id) == pod.labels,
            None => pod.host_network,
        };
        same_labels
            && *old.ips == *pod.ips
            && *old.node == *pod.node_name
            && old
                .ports
                .iter()
                .eq(pod.container_ports.iter().filter(|p| p.name.is_some()))
    }

    /// Adds or updates a pod; false (and nothing else done) when nothing policy reads of it
    /// changed: labels, addresses, named container ports, node, host network.
    pub fn apply_pod(&mut self, pod: Pod) -> bool {
        if let Some(old) = self.pod(&pod.namespace, &pod.name) {
            if self.unchanged(old, &pod) {
                self.stats.unchanged += 1;
                return false;
            }
        }
        let namespace = self.ns_key(&pod.namespace);
        let ports = self.port_list(&pod.container_ports);
        let node = self.node_key(&pod.node_name);
        // Reuse the stored name so that every map shares one allocation.
        let name = match self.namespaces[&namespace]
            .pods
            .get_key_value(pod.name.as_str())
        {
            Some((k, _)) => k.clone(),
            None => Arc::from(pod.name.as_str()),
        };
        let identity = (!pod.host_network).then(|| self.acquire_identity(&namespace, pod.labels));
        self.put_pod(namespace, name, identity, ports, pod.ips, node);
        true
    }

    /// Stores a pod whose namespace, name, node and ports are interned and whose identity
    /// is acquired, and does what follows from it.
    fn put_pod(
        &mut self,
        namespace: Arc<str>,
        name: Arc<str>,
        identity: Option<u32>,
        ports: Arc<[ContainerPort]>,
        ips: Vec<IpAddr>,
        node: Arc<str>,
    ) {
        let key = PodKey {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let rec = Arc::new(PodRecord {
            key: key.clone(),
            identity,
            ports,
            ips: ips.into_boxed_slice(),
            node,
        });
        let old = self
            .namespaces
            .get_mut(&namespace)
            .expect("interned")
            .pods
            .insert(name, rec.clone());
        if old.is_none() {
            self.pod_count += 1;
        }
        // Host-network pods claim no address: theirs is the node's.
        let claims: &[IpAddr] = if rec.identity.is_some() {
            &rec.ips
        } else {
            &[]
        };
        for ip in claims {
            self.claim(*ip, &rec);
        }
        if let Some(old) = &old {
            if old.identity.is_some() {
                for ip in old.ips.iter().filter(|ip| !claims.contains(ip)) {
                    self.release(*ip, &key);
                }
            }
            if let Some(id) = old.identity {
                self.release_identity(id);
            }
        }
        self.update_enforced(&key, old.as_deref(), Some(&rec));
        self.stats.changes += 1;
        self.changed = true;
    }

    /// Removes a pod; false when the index did not have it.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> bool {
        let Some(old) = self
            .namespaces
            .get_mut(namespace)
            .and_then(|s| s.pods.remove(name))
        else {
            return false;
        };
        self.pod_count -= 1;
        let key = old.key.clone();
        if let Some(id) = old.identity {
            for ip in old.ips.iter() {
                self.release(*ip, &key);
            }
            self.release_identity(id);
        }
        self.update_enforced(&key, Some(&old), None);
        self.stats.changes += 1;
        self.changed = true;
        true
    }

    fn update_enforced(&mut self, key: &PodKey, old: Option<&PodRecord>, new: Option<&PodRecord>) {
        let was = old.is_some_and(|r| self.is_enforced(r));
        let is = new.is_some_and(|r| self.is_enforced(r));
        if !was && !is {
            return;
        }
        self.dirty.insert(key.clone());
        if let Some(state) = self.namespaces.get_mut(&key.namespace) {
            if is {
                state.enforced.insert(key.clone());
            } else {
                state.enforced.remove(key);
            }
        }
    }

    /// Marks a pod dirty if it is enforced (its table entries may change).
    fn touch(&mut self, key: &PodKey) {
        if self.enforced.contains_key(key)
            || self.pod_by_key(key).is_some_and(|r| self.is_enforced(r))
        {
            self.dirty.insert(key.clone());
        }
    }

    /// `rec` claims `ip`; the first claimant in (namespace, name) order owns it.
    fn claim(&mut self, ip: IpAddr, rec: &Arc<PodRecord>) {
        let before = self.by_ip.get(&ip).map(|r| r.key.clone());
        let winner = if let Some(all) = self.conflicts.get_mut(&ip) {
            all.insert(rec.key.clone(), rec.clone());
            all.values().next().expect("non-empty").clone()
        } else {
            match self.by_ip.get(&ip) {
                Some(cur) if cur.key != rec.key => {
                    let all = BTreeMap::from([
                        (cur.key.clone(), cur.clone()),
                        (rec.key.clone(), rec.clone()),
                    ]);
                    let first = all.values().next().expect("two").clone();
                    self.conflicts.insert(ip, all);
                    first
                }
                _ => rec.clone(),
            }
        };
        let after = winner.key.clone();
        self.by_ip.insert(ip, winner);
        if before.as_ref() != Some(&after) {
            if let Some(b) = before {
                self.touch(&b);
            }
            self.touch(&after);
        }
    }

    fn release(&mut self, ip: IpAddr, key: &PodKey) {
        let before = self.by_ip.get(&ip).map(|r| r.key.clone());
        if let Some(all) = self.conflicts.get_mut(&ip) {
            all.remove(key);
            let first = all.values().next().expect("one left").clone();
            if all.len() == 1 {
                self.conflicts.remove(&ip);
            }
            let after = first.key.clone();
            self.by_ip.insert(ip, first);
            if before.as_ref() != Some(&after) {
                self.touch(&after);
            }
        } else if before.as_ref() == Some(key) {
            self.by_ip.remove(&ip);
        }
    }

    // ---------- Policies ----------

    /// Adds or updates a policy; false when the index has this exact policy.
    pub fn apply_policy(&mut self, policy: Policy) -> bool {
        let ns = self.ns_key(&policy.namespace);
        let state = self.namespaces.get(&ns).expect("interned");
        if state
            .policies
            .get(policy.name.as_str())
            .is_some_and(|p| *p.policy == policy)
        {
            self.stats.unchanged += 1;
            return false;
        }
        let name: Arc<str> = Arc::from(policy.name.as_str());
        self.remove_policy(&ns, &name);
        let id = self.next_policy_id;
        self.next_policy_id += 1;
        self.policy_ids.insert(id, (ns.clone(), name.clone()));
        self.policy_count += 1;
        let state = self.namespaces.get_mut(&ns).expect("interned");
        state.policies.insert(
            name,
            PolicyState {
                id,
                policy: Arc::new(policy),
                enforced_refs: 0,
                compiled: None,
            },
        );
        let pods: Vec<PodKey> = state.enforced.iter().cloned().collect();
        self.dirty.extend(pods);
        self.stats.changes += 1;
        self.changed = true;
        true
    }

    /// Removes a policy; false when the index did not have it.
    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> bool {
        let Some(ns) = self
            .namespaces
            .get_key_value(namespace)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        let removed = self.remove_policy(&ns, name);
        if removed {
            self.stats.changes += 1;
            self.changed = true;
        }
        removed
    }

    fn remove_policy(&mut self, ns: &Arc<str>, name: &str) -> bool {
        let state = self.namespaces.get_mut(ns).expect("interned");
        let Some(old) = state.policies.remove(name) else {
            return false;
        };
        let pods: Vec<PodKey> = state.enforced.iter().cloned().collect();
        self.dirty.extend(pods);
        self.policy_ids.remove(&old.id);
        self.policy_count -= 1;
        if let Some(c) = old.compiled {
            Arc::make_mut(&mut self.compiled).remove(&old.id);
            for sid in c.selectors {
                self.release_selector(sid);
            }
        }
        true
    }

    fn policy_mut(&mut self, id: u32) -> Option<&mut PolicyState> {
        let (ns, name) = self.policy_ids.get(&id)?;
        self.namespaces.get_mut(ns)?.policies.get_mut(name)
    }

    fn compile_policy(&mut self, policy: &Policy) -> CompiledPolicy {
        let mut selectors = Vec::new();
        let mut compile_rules = |index: &mut Self, direction: Direction| -> Vec<Arc<RulePeers>> {
            let Some(rules) = policy.rules(direction) else {
                return Vec::new();
            };
            rules
                .iter()
                .map(|rule| {
                    let Some(peers) = &rule.peers else {
                        return Arc::new(RulePeers {
                            any: true,
                            blocks: IpRangeSet::new(),
                            selectors: Box::default(),
                            per_peer: Box::default(),
                        });
                    };
                    let mut blocks = IpRangeSet::new();
                    let mut ids = Vec::new();
                    let mut per_peer = Vec::with_capacity(peers.len());
                    for peer in peers {
                        match peer {
                            Peer::Invalid => per_peer.push(None),
                            Peer::IpBlock(b) => {
                                blocks.insert_block(b.cidr, &b.except);
                                per_peer.push(None);
                            }
                            Peer::Pods { namespaces, pods } => {
                                let key = match namespaces {
                                    None => SelectorKey::Own {
                                        namespace: Arc::from(policy.namespace.as_str()),
                                        pods: pods.clone(),
                                    },
                                    Some(sel) => SelectorKey::Matching {
                                        namespaces: sel.clone(),
                                        pods: pods.clone(),
                                    },
                                };
                                let sid = index.acquire_selector(key);
                                selectors.push(sid);
                                if !ids.contains(&sid) {
                                    ids.push(sid);
                                }
                                per_peer.push(Some(sid));
                            }
                        }
                    }
                    blocks.normalize();
                    Arc::new(RulePeers {
                        any: false,
                        blocks,
                        selectors: ids.into(),
                        per_peer: per_peer.into(),
                    })
                })
                .collect()
        };
        let ingress = compile_rules(self, Direction::Ingress);
        let egress = compile_rules(self, Direction::Egress);
        self.stats.policies_compiled += 1;
        CompiledPolicy {
            ingress,
            egress,
            selectors,
        }
    }

    // ---------- Saved inputs (see `saved.rs`) ----------

    /// The stored policy `namespace/name`.
    pub fn policy(&self, namespace: &str, name: &str) -> Option<&Policy> {
        Some(&self.namespaces.get(namespace)?.policies.get(name)?.policy)
    }

    /// Starts a save of the inputs (see [`InputsSave`]): which namespaces it writes.
    pub fn start_save(&self) -> InputsSave {
        let mut names: Vec<Arc<str>> = self
            .namespaces
            .iter()
            .filter(|(_, s)| s.given || !s.pods.is_empty() || !s.policies.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        let mut w = Writer {
            buf: Vec::with_capacity(64 + self.pod_count() * 24),
        };
        w.uint(names.len() as u64);
        InputsSave {
            w,
            names: names.into_iter(),
            local: Vec::new(),
            nodes: FirstUse::default(),
            port_lists: FirstUse::default(),
        }
    }

    /// Writes namespace `name` as this index holds it now (empty if it is gone).
    fn write_namespace(&self, name: &str, save: &mut InputsSave) {
        let w = &mut save.w;
        w.str(name);
        let Some(state) = self.namespaces.get(name) else {
            // Gone since the save started: nothing of it (as if it had never been given).
            w.byte(0);
            w.uint(0);
            w.uint(0);
            w.uint(0);
            return;
        };
        if state.given {
            w.byte(1);
            w.labels(&state.labels);
        } else {
            w.byte(0);
        }
        // Identity id -> its number inside its namespace.
        let local = &mut save.local;
        if local.len() < self.identities.len() {
            local.resize(self.identities.len(), 0);
        }
        w.uint(state.identities.len() as u64);
        for (i, &id) in state.identities.iter().enumerate() {
            local[id as usize] = i as u32;
            w.labels(self.labels_of(id));
        }
        w.uint(state.pods.len() as u64);
        for rec in state.pods.values() {
            w.str(&rec.key.name);
            w.uint(
                rec.identity
                    .map_or(0, |id| 1 + u64::from(local[id as usize])),
            );
            write_ref(w, &mut save.nodes, &rec.node, |w| w.str(&rec.node));
            write_ref(w, &mut save.port_lists, &rec.ports, |w| w.ports(&rec.ports));
            w.uint(rec.ips.len() as u64);
            for ip in rec.ips.iter() {
                w.ip(*ip);
            }
        }
        w.uint(state.policies.len() as u64);
        for p in state.policies.values() {
            w.policy(&p.policy);
        }
    }

    /// Reads what [`PolicyIndex::save_inputs`] wrote into this (empty) index.
    pub(super) fn read_inputs(&mut self, r: &mut Reader<'_>) -> Result<(), SavedError> {
        let (mut nodes, mut port_lists): (Vec<Arc<str>>, Vec<Arc<[ContainerPort]>>) =
            (Vec::new(), Vec::new());
        for _ in 0..r.count()? {
            let name = r.str()?;
            if name.is_empty() || self.namespaces.contains_key(name) {
                return Err(r.err("namespace without a name, or twice"));
            }
            let ns = self.ns_key(name);
            if r.byte()? == 1 {
                let labels = r.labels()?;
                self.apply_namespace(Namespace::new(name, labels));
            }
            // Label sets, acquired as identities when a pod first uses them.
            let n = r.count()?;
            let mut identities: Vec<(Option<Labels>, Option<u32>)> = r.list(n);
            for _ in 0..n {
                identities.push((Some(r.labels()?), None));
            }
            for _ in 0..r.count()? {
                let pod_name = r.str()?;
                if pod_name.is_empty() || self.pod(&ns, pod_name).is_some() {
                    return Err(r.err("pod without a name, or twice"));
                }
                let identity = match r.uint()? {
                    0 => None,
                    n => {
                        let slot = usize::try_from(n - 1)
                            .ok()
                            .and_then(|i| identities.get_mut(i))
                            .ok_or(r.err("reference to an undefined label set"))?;
                        Some(match slot {
                            (_, Some(id)) => {
                                let id = *id;
                                if let Some(i) = self.identities[id as usize].as_mut() {
                                    i.pods += 1;
                                }
                                id
                            }
                            (labels, None) => {
                                let labels = labels.take().expect("taken once");
                                let id = self.acquire_identity(&ns, labels);
                                slot.1 = Some(id);
                                id
                            }
                        })
                    }
                };
                let node = read_ref(r, &mut nodes, |r| Ok(self.node_key(r.str()?)))?;
                let node = nodes[node].clone();
                let ports = read_ref(r, &mut port_lists, |r| Ok(self.port_list(&r.ports()?)))?;
                let ports = port_lists[ports].clone();
                let n = r.count()?;
                let mut ips = r.list(n);
                for _ in 0..n {
                    ips.push(r.ip()?);
                }
                self.put_pod(ns.clone(), Arc::from(pod_name), identity, ports, ips, node);
            }
            // In (namespace, name) order, as written: the policies' ids follow it.
            for _ in 0..r.count()? {
                let p = r.policy(name)?;
                self.apply_policy(p);
            }
        }
        Ok(())
    }

    // ---------- Snapshots ----------

    /// The policies of `key`'s namespace selecting it, in name order.
    fn selecting(&self, rec: &PodRecord) -> Vec<u32> {
        let Some(id) = rec.identity else {
            return Vec::new();
        };
        let labels = self.labels_of(id);
        self.namespaces[&rec.key.namespace]
            .policies
            .values()
            .filter(|p| p.policy.pod_selector.matches(labels))
            .map(|p| p.id)
            .collect()
    }

    fn build_table(&self, rec: &PodRecord, selecting: &[u32]) -> PodTable {
        let mut table = PodTable::default();
        for &pid in selecting {
            let Some((ns, name)) = self.policy_ids.get(&pid) else {
                continue;
            };
            let state = &self.namespaces[ns].policies[name];
            let compiled = state
                .compiled
                .as_ref()
                .expect("selecting policies are compiled");
            for direction in [Direction::Ingress, Direction::Egress] {
                let Some(rules) = state.policy.rules(direction) else {
                    continue;
                };
                let (slot, peers) = match direction {
                    Direction::Ingress => (&mut table.ingress, &compiled.ingress),
                    Direction::Egress => (&mut table.egress, &compiled.egress),
                };
                let dt = slot.get_or_insert_with(DirectionTable::default);
                dt.selected_by.push(pid);
                for (ri, rule) in rules.iter().enumerate() {
                    let Some(ports) = compile_ports(&rule.ports, direction, rec) else {
                        continue; // can match nothing
                    };
                    let peers = &peers[ri];
                    if !peers.any && peers.blocks.is_empty() && peers.selectors.is_empty() {
                        continue; // only invalid peers: matches nothing
                    }
                    dt.rules.push(CompiledRule {
                        at: RuleRef {
                            policy: pid,
                            rule: ri as u32,
                        },
                        peers: peers.clone(),
                        ports,
                    });
                }
            }
        }
        table
    }

    /// Rebuilds the tables of the dirty pods, compiling policies that became enforced and
    /// releasing those that no longer are.
    fn settle(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty: Vec<PodKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        // 1. Forget the old selections and table entries.
        for key in &dirty {
            let Some(old) = self.enforced.remove(key) else {
                continue;
            };
            for id in &old.selecting {
                if let Some(p) = self.policy_mut(*id) {
                    p.enforced_refs -= 1;
                    touched.insert(*id);
                }
            }
            if !old.table_ips.is_empty() {
                let tables = Arc::make_mut(&mut self.tables);
                for ip in &old.table_ips {
                    tables.remove(ip);
                }
            }
        }
        // 2. New selections.
        for key in &dirty {
            let Some(rec) = self.pod_by_key(key).cloned() else {
                continue;
            };
            if !self.is_enforced(&rec) {
                continue;
            }
            let selecting = self.selecting(&rec);
            for id in &selecting {
                if let Some(p) = self.policy_mut(*id) {
                    p.enforced_refs += 1;
                    touched.insert(*id);
                }
            }
            self.enforced.insert(
                key.clone(),
                Enforced {
                    selecting,
                    table_ips: Vec::new(),
                },
            );
        }
        // 3. Compile what became enforced, release what no longer is.
        for id in touched {
            let Some(state) = self.policy_mut(id) else {
                continue;
            };
            match (state.enforced_refs > 0, state.compiled.is_some()) {
                (true, false) => {
                    let policy = state.policy.clone();
                    let compiled = self.compile_policy(&policy);
                    if let Some(state) = self.policy_mut(id) {
                        state.compiled = Some(compiled);
                    }
                    Arc::make_mut(&mut self.compiled).insert(id, policy);
                }
                (false, true) => {
                    let compiled = state.compiled.take().expect("compiled");
                    Arc::make_mut(&mut self.compiled).remove(&id);
                    for sid in compiled.selectors {
                        self.release_selector(sid);
                    }
                }
                _ => {}
            }
        }
        // 4. Tables, under every address the pod owns.
        for key in &dirty {
            let Some(state) = self.enforced.get(key) else {
                continue;
            };
            if state.selecting.is_empty() {
                continue;
            }
            let rec = self.pod_by_key(key).expect("enforced pods exist").clone();
            let table = Arc::new(self.build_table(&rec, &state.selecting));
            self.stats.tables_built += 1;
            let owned: Vec<IpAddr> = rec
                .ips
                .iter()
                .copied()
                .filter(|ip| self.by_ip.get(ip).is_some_and(|w| w.key == *key))
                .collect();
            let tables = Arc::make_mut(&mut self.tables);
            for ip in &owned {
                tables.insert(*ip, table.clone());
            }
            if let Some(state) = self.enforced.get_mut(key) {
                state.table_ips = owned;
            }
        }
        self.changed = true;
    }

    /// The current snapshot: settles pending table work, then shares everything with the
    /// index (copy on write). Cheap when little changed; call it after a batch of changes.
    pub fn snapshot(&mut self) -> PolicySet {
        self.settle();
        self.changed = false;
        self.stats.snapshots += 1;
        PolicySet {
            pods: self.by_ip.clone(),
            tables: self.tables.clone(),
            selectors: self.selector_sets.clone(),
            policies: self.compiled.clone(),
            has_policies: self.policy_count > 0,
        }
    }
}

/// A save of the inputs made in steps, one namespace each ([`PolicyIndex::start_save`], then
/// [`InputsSave::step`] until it says all are written): whoever holds the index behind a lock
/// may take it for each step, so that its owner waits one namespace's encoding at most, not
/// the whole (~30 ms at 150,000 pods). Each namespace is written as it is at its step; one
/// created after the start is left out. What is read back is then the inputs as they were at
/// some moment during the save, namespace by namespace: each namespace's pods, label sets and
/// policies consistent with each other.
pub struct InputsSave {
    w: Writer,
    names: std::vec::IntoIter<Arc<str>>,
    local: Vec<u32>,
    nodes: FirstUse<str>,
    port_lists: FirstUse<[ContainerPort]>,
}

impl InputsSave {
    /// Writes the next namespace as `index` holds it now; false once every one is written.
    pub fn step(&mut self, index: &PolicyIndex) -> bool {
        let Some(name) = self.names.next() else {
            return false;
        };
        index.write_namespace(&name, self);
        true
    }

    /// The bytes (once [`InputsSave::step`] has said every namespace is written).
    pub fn finish(self) -> Vec<u8> {
        self.w.buf
    }
}

impl PolicyIndex {
    /// Every input the index holds (Namespaces given, Pods, Policies), in the compact form of
    /// the module documentation. Takes a few tens of milliseconds at 150,000 pods.
    pub fn save_inputs(&self) -> Vec<u8> {
        let mut save = self.start_save();
        while save.step(self) {}
        save.finish()
    }

    /// A new index of `scope` holding what [`PolicyIndex::save_inputs`] wrote, as if each
    /// object had been applied (policies in (namespace, name) order); take a snapshot to
    /// enforce it.
    pub fn restore_inputs(scope: Scope, bytes: &[u8]) -> Result<PolicyIndex, SavedError> {
        let mut r = Reader::new(bytes);
        let mut index = PolicyIndex::new(scope);
        index.read_inputs(&mut r)?;
        if !r.at_end() {
            return Err(r.err("data after the end"));
        }
        Ok(index)
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicyIndex::new(Scope::All).snapshot()
    }
}

impl PolicySet {
    /// Compiles a snapshot enforcing for every pod (as `kwire policy trace` needs). Never
    /// fails: namespaces that pods or policies refer to but that are not given are assumed to
    /// exist with only the `kubernetes.io/metadata.name` label; the first of two pods (in
    /// namespace/name order) claiming one IP keeps it; of two objects with one name the last
    /// one counts.
    pub fn compile(namespaces: Vec<Namespace>, pods: Vec<Pod>, policies: Vec<Policy>) -> Self {
        let mut index = PolicyIndex::new(Scope::All);
        for ns in namespaces {
            index.apply_namespace(ns);
        }
        for pod in pods {
            index.apply_pod(pod);
        }
        let mut policies = policies;
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for policy in policies {
            index.apply_policy(policy);
        }
        index.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AllowReason, Protocol, Verdict};

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![ip.parse().unwrap()],
            container_ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: crate::policy::Protocol::Tcp,
            }],
            node_name: node.into(),
            host_network: false,
        }
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Policy {
        let np = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )
        .unwrap();
        Policy::from_k8s(&np).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Node n1 runs `x/server` (10.0.1.1); `y/client` (10.0.2.1) runs on n2; only clients
    /// labelled role=client may reach the server.
    fn cluster() -> PolicyIndex {
        let mut ix = PolicyIndex::new(Scope::Node("n1".into()));
        ix.apply_namespace(Namespace::new("x", Labels::new()));
        ix.apply_namespace(Namespace::new(
            "y",
            Labels::from([("team".into(), "a".into())]),
        ));
        ix.apply_pod(pod("x", "server", "10.0.1.1", "n1", &[("app", "server")]));
        ix.apply_pod(pod("y", "client", "10.0.2.1", "n2", &[("role", "client")]));
        ix.apply_policy(policy(
            "x",
            "allow-clients",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                       "podSelector": {"matchLabels": {"role": "client"}}}],
                             "ports": [{"port": "http"}]}]}),
        ));
        // A policy elsewhere that selects no pod of n1.
        ix.apply_policy(policy("y", "other", serde_json::json!({"podSelector": {}})));
        ix
    }

    fn client_allowed(set: &PolicySet) -> bool {
        set.ingress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Tcp, 8080)
            .is_allowed()
    }

    #[test]
    fn only_policies_selecting_this_nodes_pods_are_compiled() {
        let mut ix = cluster();
        let set = ix.snapshot();
        assert!(client_allowed(&set));
        assert_eq!(
            ix.compiled_policy_count(),
            1,
            "y/other selects no pod of n1"
        );
        assert_eq!((set.tables(), set.pod_addresses()), (1, 2));
        // A remote pod has no table here: its own node enforces its policies.
        assert_eq!(
            set.ingress_verdict(ip("10.0.1.1"), ip("10.0.2.1"), Protocol::Tcp, 1),
            Verdict::Allow(AllowReason::NotSelected)
        );
    }

    #[test]
    fn an_update_that_changes_nothing_policy_reads_rebuilds_nothing() {
        let mut ix = cluster();
        let before = ix.snapshot();
        let stats = ix.stats();
        // The same objects again, as a status heartbeat or an annotation change reads.
        assert!(!ix.apply_pod(pod("x", "server", "10.0.1.1", "n1", &[("app", "server")])));
        assert!(!ix.apply_pod(pod("y", "client", "10.0.2.1", "n2", &[("role", "client")])));
        assert!(!ix.apply_namespace(Namespace::new(
            "y",
            Labels::from([("team".into(), "a".into())])
        )));
        assert!(!ix.apply_policy(policy("y", "other", serde_json::json!({"podSelector": {}}))));
        assert!(!ix.is_changed(), "no snapshot is due");
        let after = ix.snapshot();
        let now = ix.stats();
        assert_eq!(now.unchanged, stats.unchanged + 4);
        assert_eq!(
            (
                now.changes,
                now.tables_built,
                now.selectors_computed,
                now.selector_updates,
                now.policies_compiled
            ),
            (
                stats.changes,
                stats.tables_built,
                stats.selectors_computed,
                stats.selector_updates,
                stats.policies_compiled
            )
        );
        assert!(Arc::ptr_eq(&before.tables, &after.tables));
        assert!(Arc::ptr_eq(&before.selectors, &after.selectors));
    }

    #[test]
    fn a_remote_label_change_updates_one_selector_set_and_no_table() {
        let mut ix = cluster();
        let before = ix.snapshot();
        let stats = ix.stats();
        ix.apply_pod(pod("y", "client", "10.0.2.1", "n2", &[("role", "other")]));
        let after = ix.snapshot();
        assert!(client_allowed(&before) && !client_allowed(&after));
        let now = ix.stats();
        assert_eq!(now.tables_built, stats.tables_built, "no table rebuilt");
        assert_eq!(now.selectors_computed, stats.selectors_computed);
        assert_eq!(
            now.selector_updates,
            stats.selector_updates + 1,
            "the old identity left the set"
        );
        assert!(Arc::ptr_eq(&before.tables, &after.tables));
        // Back: the new identity joins.
        ix.apply_pod(pod("y", "client", "10.0.2.1", "n2", &[("role", "client")]));
        assert!(client_allowed(&ix.snapshot()));
        // A namespace relabel re-checks that namespace's identities only.
        ix.apply_namespace(Namespace::new("y", Labels::new()));
        assert!(!client_allowed(&ix.snapshot()));
        assert_eq!(ix.stats().tables_built, stats.tables_built);
    }

    #[test]
    fn a_remote_address_change_replaces_one_entry() {
        let mut ix = cluster();
        ix.snapshot();
        let stats = ix.stats();
        ix.apply_pod(pod("y", "client", "10.0.2.9", "n2", &[("role", "client")]));
        let set = ix.snapshot();
        assert!(!client_allowed(&set));
        assert!(set
            .ingress_verdict(ip("10.0.2.9"), ip("10.0.1.1"), Protocol::Tcp, 8080)
            .is_allowed());
        assert_eq!(ix.stats().tables_built, stats.tables_built);
        assert_eq!(ix.stats().selector_updates, stats.selector_updates);
    }

    #[test]
    fn a_policy_change_recompiles_that_policy_and_its_namespace_tables() {
        let mut ix = cluster();
        ix.apply_pod(pod(
            "z",
            "other-local",
            "10.0.1.2",
            "n1",
            &[("app", "server")],
        ));
        ix.snapshot();
        let stats = ix.stats();
        ix.apply_policy(policy(
            "x",
            "allow-clients",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}),
        ));
        let set = ix.snapshot();
        assert!(set
            .ingress_verdict(ip("10.0.2.1"), ip("10.0.1.1"), Protocol::Udp, 53)
            .is_allowed());
        let now = ix.stats();
        assert_eq!(now.policies_compiled, stats.policies_compiled + 1);
        assert_eq!(
            now.tables_built,
            stats.tables_built + 1,
            "z/other-local untouched"
        );
        // Its old selector went away with it, the new one was computed once.
        assert_eq!(now.selectors_computed, stats.selectors_computed + 1);
        assert_eq!(ix.selector_count(), 1);
        ix.delete_policy("x", "allow-clients");
        let set = ix.snapshot();
        assert_eq!(
            (
                ix.compiled_policy_count(),
                ix.selector_count(),
                set.tables()
            ),
            (0, 0, 0)
        );
        assert!(set.has_policies(), "y/other still exists");
    }

    #[test]
    fn address_conflicts_go_to_the_first_pod_by_name() {
        let mut ix = PolicyIndex::new(Scope::All);
        ix.apply_policy(policy(
            "x",
            "deny",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}}),
        ));
        ix.apply_pod(pod("x", "b", "10.0.0.1", "n1", &[("app", "b")]));
        let set = ix.snapshot();
        assert!(!set
            .ingress_verdict(ip("10.0.0.9"), ip("10.0.0.1"), Protocol::Tcp, 1)
            .is_allowed());
        // x/a claims the same address: it comes first, and is not selected.
        ix.apply_pod(pod("x", "a", "10.0.0.1", "n1", &[("app", "a")]));
        let set = ix.snapshot();
        assert_eq!(set.pod_at(ip("10.0.0.1")).unwrap().name, "a");
        assert!(set
            .ingress_verdict(ip("10.0.0.9"), ip("10.0.0.1"), Protocol::Tcp, 1)
            .is_allowed());
        ix.delete_pod("x", "a");
        let set = ix.snapshot();
        assert_eq!(set.pod_at(ip("10.0.0.1")).unwrap().name, "b");
        assert!(!set
            .ingress_verdict(ip("10.0.0.9"), ip("10.0.0.1"), Protocol::Tcp, 1)
            .is_allowed());
    }
}
