//! The node's state as the agent knows it, in one owner: the device and its counters, the peers
//! by node name, their health, the pods on the loop, the sync and programming flags, the API
//! watch counters. The control plane writes it ([`crate::agent`]); `/metrics`
//! ([`crate::metrics`]), `kwire status` and `kwire graph` ([`crate::status`]) only read it,
//! through one [`report::StatusReport`] per request, built from memory.

pub mod report;

use crate::datapath::stats::Counters;
use crate::dataplane::ports::Pods;
use crate::wg::Device;
use arc_swap::ArcSwap;
use ipnetwork::IpNetwork;
use kwire_proto::key::PublicKey;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use report::{peer_up, report, Packets, PeerReport, PodReport, ServicesReport, StatusReport};

/// A peer whose last handshake is older than this is down: WireGuard's REJECT_AFTER_TIME
/// (whitepaper §6.1), after which no session key may be used.
pub const PEER_UP_WITHIN: Duration = Duration::from_secs(180);

/// The saved-state files' failed writes, one counter per file: each writer owns its counter
/// and registers it here once at start (`agent`), the renderers read them all.
#[derive(Debug, Default)]
pub struct StateWriteFailures(Mutex<Vec<(&'static str, Arc<AtomicU64>)>>);

impl StateWriteFailures {
    /// Reports `failed` as the count of `file`'s failed writes (a file registered again is
    /// reported by its newest counter).
    pub fn register(&self, file: &'static str, failed: Arc<AtomicU64>) {
        let mut files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|(f, _)| *f != file);
        files.push((file, failed));
    }

    /// Failed writes so far, by file name.
    pub fn get(&self) -> BTreeMap<String, u64> {
        let files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        files
            .iter()
            .map(|(f, n)| (f.to_string(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What a watch filter (`agent::watches`) passed on and dropped, counted where it runs (its
/// watch thread) and read by the renderers.
#[derive(Debug, Default)]
pub struct FilterCounts {
    passed: AtomicU64,
    dropped: AtomicU64,
}

impl FilterCounts {
    /// Counts one item; returns `pass`.
    pub fn add(&self, pass: bool) -> bool {
        let n = if pass { &self.passed } else { &self.dropped };
        n.fetch_add(1, Ordering::Relaxed);
        pass
    }

    /// (passed, dropped) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.passed.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// What the agent knows of its node; shared by its tasks, read by the renderers.
pub struct NodeState {
    pub device: Arc<Device>,
    pub counters: Arc<Counters>,
    /// Node name of each peer the control plane configured, by public key.
    pub peer_names: ArcSwap<BTreeMap<PublicKey, String>>,
    /// Peer name of each external peer (the `Peer` resource) the control plane configured.
    pub external_peer_names: ArcSwap<BTreeMap<PublicKey, String>>,
    /// Nodes refused as peers, by reason (the labels are fixed at construction).
    invalid_peers: Vec<(&'static str, AtomicU64)>,
    /// Synced with the API at least once, or restored from the state directory.
    pub synced: AtomicBool,
    /// The tun's addresses and routes are programmed.
    pub programmed: AtomicBool,
    /// Which node this is, its interface, its pods (set once at start).
    pub node: OnceLock<NodeContext>,
    /// This node's pod CIDRs, as last programmed.
    pub pod_cidrs: ArcSwap<Vec<IpNetwork>>,
    /// Errors of the Node watch (each failed list/watch attempt).
    pub watch_errors: AtomicU64,
    /// Complete re-lists of the Nodes (the first list included).
    pub watch_resyncs: AtomicU64,
    /// Node watch items the Node filter passed to the planner, and dropped.
    pub node_filter: Arc<FilterCounts>,
    /// Pod watch items the Pod filter passed to the policy index, and dropped.
    pub pod_filter: Arc<FilterCounts>,
    /// Service and EndpointSlice watch items their sieves passed to the service loop, and
    /// dropped.
    pub service_filter: Arc<FilterCounts>,
    pub slice_filter: Arc<FilterCounts>,
    /// The saved NetworkPolicy inputs could not be restored at start (unreadable, invalid).
    pub policy_state_errors: AtomicU64,
    /// The saved Service inputs could not be restored at start (unreadable, invalid).
    pub service_state_errors: AtomicU64,
    /// Failed writes of the saved-state files (peers, NetworkPolicy and Service inputs,
    /// connection tables), by file.
    pub state_write_failures: StateWriteFailures,
    /// The Node watch delivered its last answer without error.
    pub api_synced: AtomicBool,
    /// What the health monitor knows of each peer, by node name.
    pub peer_health: Mutex<BTreeMap<String, PeerHealthReport>>,
    /// The node's key: its age, the rotation under way (public keys only).
    pub keys: Mutex<KeyState>,
    /// The relay node of each peer reached through one (both behind NAT), by public key.
    pub peer_relays: ArcSwap<BTreeMap<PublicKey, String>>,
    /// The relay this node runs for NATed pairs, if it does.
    pub relay: RelayState,
    /// Another node sees this one's packets from elsewhere than its published endpoint (NAT
    /// detected), as a sentence.
    pub nat_seen: ArcSwap<Option<String>>,
}

/// The relay this node runs (`kwire.dev/relay-endpoint`): whom it forwards for, what it did.
#[derive(Debug, Default)]
pub struct RelayState {
    /// Listening (relay port open).
    pub listening: AtomicBool,
    /// The nodes behind NAT it forwards for, by name.
    pub serving: ArcSwap<Vec<String>>,
    /// Datagrams forwarded.
    pub forwarded: AtomicU64,
    /// Datagrams not forwarded: not WireGuard, from an address no served node's session
    /// comes from, or for no known session.
    pub dropped: AtomicU64,
}

/// The node's key and its rotation as the agent last set them (no private key here).
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    /// When the current key was written.
    pub written: Option<std::time::SystemTime>,
    /// The key the node rotates to, while it does.
    pub next_public_key: Option<PublicKey>,
    /// When the rotation under way started (or resumed after a restart).
    pub rotation_started: Option<std::time::SystemTime>,
    /// How the last rotation or revocation ended, and why.
    pub last_outcome: Option<String>,
    pub rotations_completed: u64,
    pub rotations_aborted: u64,
    pub revocations: u64,
}

/// The node an agent runs for.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub name: String,
    pub interface: String,
    /// The pods attached to the packet loop (with their names, as the CNI runtime gave them).
    pub pods: Arc<Pods>,
}

/// Per peer, what the health monitor derived between ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealthReport {
    /// No handshake for longer than `--peer-unreachable-after` while traffic waits.
    pub unreachable: bool,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("synced", &self.synced)
            .field("programmed", &self.programmed)
            .finish_non_exhaustive()
    }
}

impl NodeState {
    /// The state of a node whose device is `device`. `invalid_peer_reasons`: every label a
    /// refused Node can be counted under (all are reported, zeros included).
    pub fn new(
        device: Arc<Device>,
        counters: Arc<Counters>,
        invalid_peer_reasons: &[&'static str],
    ) -> NodeState {
        NodeState {
            device,
            counters,
            peer_names: ArcSwap::from_pointee(BTreeMap::new()),
            external_peer_names: ArcSwap::from_pointee(BTreeMap::new()),
            invalid_peers: invalid_peer_reasons
                .iter()
                .map(|r| (*r, AtomicU64::new(0)))
                .collect(),
            synced: AtomicBool::new(false),
            programmed: AtomicBool::new(false),
            node: OnceLock::new(),
            pod_cidrs: ArcSwap::from_pointee(Vec::new()),
            watch_errors: AtomicU64::new(0),
            watch_resyncs: AtomicU64::new(0),
            node_filter: Arc::default(),
            pod_filter: Arc::default(),
            service_filter: Arc::default(),
            slice_filter: Arc::default(),
            policy_state_errors: AtomicU64::new(0),
            service_state_errors: AtomicU64::new(0),
            state_write_failures: StateWriteFailures::default(),
            api_synced: AtomicBool::new(false),
            peer_health: Mutex::new(BTreeMap::new()),
            keys: Mutex::new(KeyState::default()),
            peer_relays: ArcSwap::from_pointee(BTreeMap::new()),
            relay: RelayState::default(),
            nat_seen: ArcSwap::from_pointee(None),
        }
    }

    /// The health monitor's view of each peer.
    pub fn peer_health(&self) -> BTreeMap<String, PeerHealthReport> {
        self.peer_health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a Node refused as a peer for `reason` (one of the labels given to `new`; an
    /// unknown label is a bug and counts nowhere).
    pub fn count_invalid(&self, reason: &str) {
        if let Some((_, n)) = self.invalid_peers.iter().find(|(r, _)| *r == reason) {
            n.fetch_add(1, Ordering::Relaxed);
        } else {
            debug_assert!(false, "invalid-peer reason {reason:?} not registered");
        }
    }

    /// Nodes refused as peers, by reason.
    pub fn invalid_peers(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.invalid_peers
            .iter()
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// The key state, for the report.
    pub fn keys(&self) -> KeyState {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the key state.
    pub fn update_keys(&self, f: impl FnOnce(&mut KeyState)) {
        f(&mut self.keys.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// What `/readyz` answers: ready once the node's peers are known (listed from the API, or
    /// restored from the state file), its tun programmed, a NetworkPolicy snapshot in the
    /// loop (restored from `policy-state.bin` or compiled from the API's lists) and a service
    /// table (restored from `service-state.bin` or compiled from the lists). Until then its
    /// pods' new flows are dropped as `policy_not_synced`, or their flows to ClusterIPs: a DaemonSet rolling update must not move on to the next node while this one's
    /// pods are cut off.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if !self.synced.load(Ordering::Relaxed) {
            Err(NotReady::NotSynced)
        } else if !self.programmed.load(Ordering::Relaxed) {
            Err(NotReady::NotProgrammed)
        } else if self
            .node
            .get()
            .is_some_and(|n| n.pods.table().policy_pending)
        {
            Err(NotReady::NoPolicy)
        } else if self.node.get().is_some_and(|n| n.pods.services_pending()) {
            Err(NotReady::NoServices)
        } else {
            Ok(())
        }
    }

    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

/// Why a node is not ready, the first unmet condition of [`NodeState::readiness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    NotSynced,
    NotProgrammed,
    NoPolicy,
    NoServices,
}

impl NotReady {
    /// The `/readyz` answer.
    pub fn reason(self) -> &'static str {
        match self {
            NotReady::NotSynced => "not ready: not yet synced with the API and nothing restored\n",
            NotReady::NotProgrammed => "not ready: tun addresses or routes not programmed\n",
            NotReady::NoPolicy => "not ready: no NetworkPolicy yet (nothing restored, the API's Pods, Namespaces and NetworkPolicies not yet listed); pods' new flows are dropped as policy_not_synced\n",
            NotReady::NoServices => "not ready: no service table yet (nothing restored, the API's Services and EndpointSlices not yet listed); pods' flows to ClusterIPs are dropped\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    #[test]
    fn ready_waits_for_the_first_policy_snapshot_after_sync_and_programming() {
        let st = NodeState::new(Arc::new(Device::new()), Arc::new(Counters::default()), &[]);
        let pods = Arc::new(Pods::new(1, false).unwrap());
        pods.require_policy();
        let _ = st.node.set(NodeContext {
            name: "n1".into(),
            interface: "kwire0".into(),
            pods: pods.clone(),
        });
        assert_eq!(st.readiness(), Err(NotReady::NotSynced));
        st.synced.store(true, Ordering::Relaxed);
        assert_eq!(st.readiness(), Err(NotReady::NotProgrammed));
        st.programmed.store(true, Ordering::Relaxed);
        assert_eq!(st.readiness(), Err(NotReady::NoPolicy));
        assert!(!st.ready());
        assert!(NotReady::NoPolicy.reason().contains("policy_not_synced"));
        // An empty snapshot (a cluster without policies) is a snapshot.
        pods.set_policy(Arc::new(PolicySet::compile(vec![], vec![], vec![])));
        assert_eq!(st.readiness(), Ok(()));
        // The agent also waits for a service table; an empty one is a table.
        pods.require_services();
        assert_eq!(st.readiness(), Err(NotReady::NoServices));
        assert!(NotReady::NoServices.reason().contains("ClusterIP"));
        pods.set_services(Arc::new(crate::services::ServiceTable::default()));
        assert_eq!(st.readiness(), Ok(()));
    }

    #[test]
    fn a_data_plane_that_needs_no_policy_is_ready_without_one() {
        let st = NodeState::new(Arc::new(Device::new()), Arc::new(Counters::default()), &[]);
        let _ = st.node.set(NodeContext {
            name: "n1".into(),
            interface: "kwire0".into(),
            pods: Arc::new(Pods::new(1, false).unwrap()),
        });
        st.synced.store(true, Ordering::Relaxed);
        st.programmed.store(true, Ordering::Relaxed);
        assert!(st.ready());
    }
}
