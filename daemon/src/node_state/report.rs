//! One node's view of the mesh as a plain value: what `kwire status --json` prints, what
//! `/metrics` and `kwire graph` render. Built from the [`NodeState`] in memory on every request;
//! peers by node name, never by key alone.

use super::{NodeState, PEER_UP_WITHIN};
use crate::datapath::stats::DropReason;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// One node's view of the mesh: what `kwire status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub version: String,
    pub interface: String,
    pub listen_port: u16,
    /// This node's WireGuard public key (public; never the private key).
    pub public_key: Option<String>,
    pub pod_cidrs: Vec<String>,
    /// Synced with the API once, or restored from the state directory.
    pub synced: bool,
    /// Synced, the tun's addresses and routes programmed, a NetworkPolicy snapshot in the loop
    /// (what /readyz says).
    pub ready: bool,
    /// The Node watch's last answer was not an error.
    pub api_synced: bool,
    pub watch_errors: u64,
    pub watch_resyncs: u64,
    /// Watch items of the filtered kinds (Node, Pod), by what the filter did with them.
    #[serde(default)]
    pub watch_filter: Vec<FilterReport>,
    /// The saved NetworkPolicy inputs could not be restored at start.
    #[serde(default)]
    pub policy_state_errors: u64,
    /// The saved Service inputs could not be restored at start.
    #[serde(default)]
    pub service_state_errors: u64,
    /// Failed writes of each saved-state file (in the state directory) since the start.
    #[serde(default)]
    pub state_write_failures: BTreeMap<String, u64>,
    pub peers_expected: u64,
    pub peers_connected: u64,
    pub peers: Vec<PeerReport>,
    /// Peers outside the cluster (the `Peer` resource), by Peer name in `node`; not counted in
    /// `peers_expected`/`peers_connected` (a laptop is offline as often as not).
    #[serde(default)]
    pub external_peers: Vec<PeerReport>,
    pub pods: Vec<PodReport>,
    pub packets: Packets,
    /// Drops by reason (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    /// Nodes refused as peers (counted once per change), by reason; zeros included.
    #[serde(default)]
    pub invalid_peers: BTreeMap<String, u64>,
    /// The node's service table and translations.
    #[serde(default)]
    pub services: ServicesReport,
    /// The NetworkPolicy connection table's occupancy and limits.
    #[serde(default)]
    pub conntrack: ConntrackReport,
    /// The node's key: age, rotation, revocations.
    #[serde(default)]
    pub key: KeyReport,
    /// The relay this node runs for pairs of nodes both behind NAT.
    #[serde(default)]
    pub relay: RelayReport,
    /// NAT detected: which peer sees this node's packets from which address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_detected: Option<String>,
}

/// The relay this node runs (it forwards NATed pairs' WireGuard datagrams untouched).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReport {
    pub listening: bool,
    /// Nodes behind NAT it forwards for.
    pub serving: Vec<String>,
    pub forwarded: u64,
    pub dropped: u64,
}

/// The node's key and its rotation (public keys only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    /// Seconds since the current key was written.
    pub age_seconds: Option<f64>,
    /// `idle` or `rotating`.
    pub rotation: String,
    /// The key the node rotates to, while it does.
    pub next_public_key: Option<String>,
    /// Seconds since the rotation under way started.
    pub rotation_age_seconds: Option<f64>,
    /// How the last rotation or revocation ended, and why.
    pub last_outcome: Option<String>,
    pub rotations_completed: u64,
    pub rotations_aborted: u64,
    pub revocations: u64,
}

/// The connection table: flows held, and the most it (and one initiating pod) may hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackReport {
    pub flows: u64,
    pub max_flows: u64,
    pub max_flows_per_pod: u64,
}

/// The service table in force on the node and what the loop translated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServicesReport {
    /// Whether a table was compiled (the Service and EndpointSlice watches listed once).
    pub synced: bool,
    /// Services with a ClusterIP.
    pub services: u64,
    /// Frontends (protocol, ClusterIP, port).
    pub frontends: u64,
    /// Backends summed over every frontend (one endpoint behind two ports counts twice).
    #[serde(default)]
    pub backends: u64,
    /// Frontends without a usable endpoint (their flows are refused).
    pub frontends_without_endpoints: u64,
    /// Translated flows the connection table remembers.
    pub flows: u64,
    /// New flows translated to a backend, ever.
    pub translations: u64,
}

/// A peer, by node name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last completed handshake; None before the first.
    pub last_handshake_age_seconds: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets for this peer that no session could carry.
    pub tx_dropped: u64,
    /// Completed handshakes (either side initiating).
    pub handshakes: u64,
    /// Initiations of ours never answered (retried after 5 s, or given up after 90 s).
    #[serde(default)]
    pub handshakes_timeout: u64,
    /// Handshake messages of or for this peer that were refused (bad timestamp, MAC, keys).
    #[serde(default)]
    pub handshakes_rejected: u64,
    /// Handshakes started at once because the peer sent data for a session this node does
    /// not know (after a restart of this node).
    #[serde(default)]
    pub handshakes_triggered: u64,
    pub up: bool,
    /// No handshake for longer than `--peer-unreachable-after` while traffic waits.
    pub unreachable: bool,
    /// Which of this node's keys the session we send on was made with: `current`, `next`
    /// (while this node rotates), `none` (no key yet).
    #[serde(default)]
    pub session_local_key: String,
    /// Which of the peer's keys that session was made with: `current`, or `next` (the peer
    /// rotates and this node moved to its next key).
    #[serde(default)]
    pub session_peer_key: String,
    /// The node this peer is reached through (both behind NAT), if it is relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

/// A pod attached to this node's packet loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub ips: Vec<IpAddr>,
}

/// Packets of the loop, by direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packets {
    pub tx: u64,
    pub rx: u64,
    pub local: u64,
}

/// Up: a handshake younger than [`PEER_UP_WITHIN`], and not judged unreachable.
pub fn peer_up(handshake_age: Option<Duration>, unreachable: bool) -> bool {
    handshake_age.is_some_and(|a| a < PEER_UP_WITHIN) && !unreachable
}

/// What one watch filter did (`agent::watches`): items passed on (they change something kwire
/// reads, or must be seen: lists, deletes) and items dropped (status heartbeats and the like).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterReport {
    pub kind: String,
    pub passed: u64,
    pub dropped: u64,
}

/// Builds the report from the node's live state. Reads memory only: the device, the loop's
/// pod table and the counters (no file, no API call).
pub fn report(st: &NodeState) -> StatusReport {
    let names = st.peer_names.load();
    let health = st.peer_health();
    let info = st.device.info();
    let snap = st.device.snapshot();
    let now = SystemTime::now();
    let sessions = st.device.session_keys();
    let (own, own_next) = (st.device.public_key(), st.device.next_public_key());
    let external = st.external_peer_names.load();
    let relays = st.peer_relays.load();
    let mut peers = Vec::new();
    let mut external_peers = Vec::new();
    for p in &info.peers {
        // Peers added by hand through the userspace API have no node: not reported.
        let (node, out) = match (names.get(&p.public_key), external.get(&p.public_key)) {
            (Some(node), _) => (node, &mut peers),
            (None, Some(peer)) => (peer, &mut external_peers),
            (None, None) => continue,
        };
        let h = health.get(node).cloned().unwrap_or_default();
        let age = p
            .last_handshake
            .map(|t| now.duration_since(t).unwrap_or_default());
        // A peer's own key maps to its slot (before any peer's announced next key).
        let live = snap
            .by_key
            .get(&p.public_key.0)
            .map(|s| &snap.peers[*s as usize])
            .filter(|q| q.public_key == p.public_key);
        let count = |f: fn(&crate::wg::Peer) -> &AtomicU64| {
            live.map_or(0, |q| f(q).load(Ordering::Relaxed))
        };
        out.push(PeerReport {
            node: node.clone(),
            public_key: p.public_key.to_base64(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            last_handshake_age_seconds: age.map(|a| a.as_secs_f64()),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            tx_dropped: count(|q| &q.tx_dropped),
            handshakes: count(|q| &q.handshakes.success),
            handshakes_timeout: count(|q| &q.handshakes.timeout),
            handshakes_rejected: count(|q| &q.handshakes.rejected),
            handshakes_triggered: count(|q| &q.handshakes.triggered),
            up: peer_up(age, h.unreachable),
            unreachable: h.unreachable,
            session_local_key: match sessions.get(&p.public_key).map(|s| Some(s.0.local)) {
                Some(k) if k == own => "current",
                Some(k) if k == own_next => "next",
                _ => "none",
            }
            .into(),
            session_peer_key: match sessions.get(&p.public_key) {
                Some(s) if s.0.remote != p.public_key => "next",
                _ => "current",
            }
            .into(),
            relay: relays.get(&p.public_key).cloned(),
        });
    }
    drop(info);
    peers.sort_by(|a, b| a.node.cmp(&b.node));
    external_peers.sort_by(|a, b| a.node.cmp(&b.node));
    let ctx = st.node.get();
    let pods = ctx.map_or_else(Vec::new, |ctx| {
        ctx.pods
            .attached()
            .into_iter()
            .map(|p| PodReport {
                namespace: p.name.namespace,
                name: p.name.name,
                ips: p.ips,
            })
            .collect()
    });
    let conntrack = ctx.map_or_else(ConntrackReport::default, |ctx| {
        let ct = &ctx.pods.conntrack;
        ConntrackReport {
            flows: ct.len() as u64,
            max_flows: ct.max_flows() as u64,
            max_flows_per_pod: ct.max_flows_per_pod() as u64,
        }
    });
    let services = ctx.map_or_else(ServicesReport::default, |ctx| {
        let table = ctx.pods.services();
        ServicesReport {
            synced: table.is_some(),
            services: table.as_ref().map_or(0, |t| t.services() as u64),
            frontends: table.as_ref().map_or(0, |t| t.frontends() as u64),
            backends: table.as_ref().map_or(0, |t| t.backends() as u64),
            frontends_without_endpoints: table.as_ref().map_or(0, |t| t.without_endpoints() as u64),
            flows: ctx.pods.nat.len() as u64,
            translations: ctx.pods.nat.translations.load(Ordering::Relaxed),
        }
    });
    let c = &st.counters;
    StatusReport {
        node: ctx.map(|c| c.name.clone()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        interface: ctx.map(|c| c.interface.clone()).unwrap_or_default(),
        listen_port: st.device.listen_port(),
        public_key: st.device.public_key().map(|k| k.to_base64()),
        pod_cidrs: st
            .pod_cidrs
            .load()
            .iter()
            .map(ToString::to_string)
            .collect(),
        synced: st.synced.load(Ordering::Relaxed),
        ready: st.ready(),
        api_synced: st.api_synced.load(Ordering::Relaxed),
        watch_errors: st.watch_errors.load(Ordering::Relaxed),
        watch_resyncs: st.watch_resyncs.load(Ordering::Relaxed),
        watch_filter: [
            ("Node", &st.node_filter),
            ("Pod", &st.pod_filter),
            ("Service", &st.service_filter),
            ("EndpointSlice", &st.slice_filter),
        ]
        .into_iter()
        .map(|(kind, counts)| {
            let (passed, dropped) = counts.get();
            FilterReport {
                kind: kind.to_string(),
                passed,
                dropped,
            }
        })
        .collect(),
        policy_state_errors: st.policy_state_errors.load(Ordering::Relaxed),
        service_state_errors: st.service_state_errors.load(Ordering::Relaxed),
        state_write_failures: st.state_write_failures.get(),
        peers_expected: names.len() as u64,
        peers_connected: peers.iter().filter(|p| p.up).count() as u64,
        peers,
        external_peers,
        pods,
        packets: Packets {
            tx: c.packets_tx.load(Ordering::Relaxed),
            rx: c.packets_rx.load(Ordering::Relaxed),
            local: c.packets_local.load(Ordering::Relaxed),
        },
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.metric_label().to_string(), c.drops(*r)))
            .collect(),
        invalid_peers: st
            .invalid_peers()
            .map(|(r, n)| (r.to_string(), n))
            .collect(),
        services,
        conntrack,
        key: key_report(st, now),
        relay: RelayReport {
            listening: st.relay.listening.load(Ordering::Relaxed),
            serving: st.relay.serving.load().as_ref().clone(),
            forwarded: st.relay.forwarded.load(Ordering::Relaxed),
            dropped: st.relay.dropped.load(Ordering::Relaxed),
        },
        nat_detected: st.nat_seen.load().as_ref().clone(),
    }
}

fn key_report(st: &NodeState, now: SystemTime) -> KeyReport {
    let k = st.keys();
    let age =
        |t: Option<SystemTime>| t.map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64());
    KeyReport {
        age_seconds: age(k.written),
        rotation: if k.next_public_key.is_some() {
            "rotating"
        } else {
            "idle"
        }
        .into(),
        next_public_key: k.next_public_key.map(|k| k.to_base64()),
        rotation_age_seconds: age(k.rotation_started),
        last_outcome: k.last_outcome,
        rotations_completed: k.rotations_completed,
        rotations_aborted: k.rotations_aborted,
        revocations: k.revocations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_needs_a_recent_handshake_and_no_unreachable_verdict() {
        assert!(peer_up(Some(Duration::from_secs(5)), false));
        assert!(!peer_up(Some(Duration::from_secs(5)), true));
        assert!(!peer_up(Some(PEER_UP_WITHIN), false));
        assert!(!peer_up(None, false));
    }
}
