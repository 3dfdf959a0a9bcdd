//! Peer health: once a second (less often above 2,000 peers, see [`look_interval`]), compare
//! each peer's handshake time, counters and endpoint with the last look; count handshakes, log
//! state changes (endpoint roamed, first handshake), decide when a peer is unreachable
//! ([`assess`], pure), record `PeerUnreachable` / `PeerRecovered` Events on the peer's Node,
//! and keep this Node's `KwireReady` condition.
//!
//! Events are written by a few witnesses per peer, not by every agent that sees it: when M
//! Nodes die in a cluster of N, N agents each seeing M dead peers would otherwise write N × M
//! Events (and as many Node reads). For each peer, the [`EVENT_WITNESSES`] agents that rank
//! highest for it ([`is_witness`]: rendezvous hashing over the Node names, so every agent
//! computes the same ranking without talking to the others) record its Events; an agent skips
//! the Nodes it sees unreachable itself when it ranks, so a dead witness is replaced by the
//! next one, and so are the Nodes it never handshaked with (no sign of life: a lone agent
//! among dead peers reports them all). Every agent still logs the change and exports it
//! (`kwire_peer_up`, `kwire status`).

use crate::node_state::{NodeState, PeerHealthReport};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};

/// How often peers are looked at (handshakes, roaming, reachability), below 2,000 peers; see
/// [`look_interval`].
pub const HEALTH_TICK: Duration = Duration::from_secs(1);
/// Peers per second of the interval between two looks: a look reads every peer's state, a
/// cache miss or two each (~0.75 µs per peer measured at 5,000 peers), so from twice this many
/// the interval grows with the peers, and looks cost ~0.75 ms of CPU a second at any size up
/// to [`MAX_LOOK_INTERVAL`]'s.
pub const PEERS_PER_LOOK_SECOND: usize = 1000;
/// The interval between two looks, at most.
pub const MAX_LOOK_INTERVAL: Duration = Duration::from_secs(10);
/// Default of `--peer-unreachable-after`.
pub const DEFAULT_PEER_UNREACHABLE_AFTER: Duration = Duration::from_secs(120);
/// A handshake time that moved by more than this is a new handshake (the time is derived from
/// boringtun's coarse timers, so it jitters by a few milliseconds between looks).
pub const HANDSHAKE_JITTER: Duration = Duration::from_millis(500);
/// The Node condition this agent owns.
pub const CONDITION_TYPE: &str = "KwireReady";
/// How often a failed condition patch is retried.
const CONDITION_RETRY: Duration = Duration::from_secs(5);
/// Agents that record a peer's `PeerUnreachable` / `PeerRecovered` Events (see [`is_witness`]).
pub const EVENT_WITNESSES: usize = 3;
/// Event writes (a Node read and an Event write each) one agent has in flight, at most; the
/// rest wait their turn. When thousands of peers go unreachable in one look (a zone lost, or
/// the synthetic peers of the scale bench), each one's write at once meant thousands of
/// concurrent requests and of Node objects parsed side by side.
pub const EVENT_WRITES_IN_FLIGHT: usize = 8;

/// A candidate's rank for `subject`: the first 8 bytes of SHA-256(subject, 0, candidate). Any
/// agent computes the same for the same names (a fixed hash, not std's).
fn witness_score(subject: &str, candidate: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(subject.as_bytes());
    ctx.update(&[0]);
    ctx.update(candidate.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// Whether `me` is one of the `k` witnesses of `subject` among `candidates` (the Nodes this
/// agent does not see unreachable; `me` counts whether listed or not, `subject` never does):
/// the `k` candidates with the highest [`witness_score`] for `subject`, ties broken by name.
/// Agents that see the same Nodes pick the same witnesses, so `k` Events are written per peer
/// whatever the cluster's size.
pub fn is_witness<'a>(
    me: &str,
    subject: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    k: usize,
) -> bool {
    if me == subject {
        return false;
    }
    let mine = (witness_score(subject, me), me);
    let above = candidates
        .into_iter()
        .filter(|c| *c != subject && *c != me)
        .filter(|c| (witness_score(subject, c), *c) > mine)
        .count();
    above < k
}

/// Parses `120`, `120s`, `2m`, `500ms`, `1h` (for `--peer-unreachable-after`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 120s, 2m or 500ms"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// One look at a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSample {
    pub handshake_at: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub endpoint: Option<SocketAddr>,
}

/// What is remembered of a peer between looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerWatch {
    pub sample: PeerSample,
    /// When the peer was first seen (stands in for the handshake before the first one).
    pub first_seen: Instant,
    /// Since when traffic has waited for an answer: tx (or tx_dropped) grew, rx did not.
    pub pending_since: Option<Instant>,
    pub unreachable: bool,
    pub handshakes: u64,
}

/// A change worth a log line, a metric or an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A handshake completed since the last look (`first`: the peer's first one).
    Handshake { first: bool },
    EndpointRoamed {
        from: Option<SocketAddr>,
        to: Option<SocketAddr>,
    },
    /// No handshake for longer than the threshold while traffic waits.
    Unreachable { quiet_for: Duration },
    /// Received again, or a new handshake, after being unreachable.
    Recovered,
}

/// Folds one look into the peer's state. Pure: `now` and `wall_now` are the caller's clock.
pub fn assess(
    prev: Option<&PeerWatch>,
    s: &PeerSample,
    now: Instant,
    wall_now: SystemTime,
    threshold: Duration,
) -> (PeerWatch, Vec<Change>) {
    let mut changes = Vec::new();
    let Some(prev) = prev else {
        let mut w = PeerWatch {
            sample: s.clone(),
            first_seen: now,
            pending_since: None,
            unreachable: false,
            handshakes: 0,
        };
        if s.handshake_at.is_some() {
            w.handshakes = 1;
            changes.push(Change::Handshake { first: true });
        }
        return (w, changes);
    };
    let p = &prev.sample;
    let new_handshake = match (p.handshake_at, s.handshake_at) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => b.duration_since(a).is_ok_and(|d| d > HANDSHAKE_JITTER),
        _ => false,
    };
    if new_handshake {
        changes.push(Change::Handshake {
            first: prev.handshakes == 0,
        });
    }
    if p.endpoint != s.endpoint {
        changes.push(Change::EndpointRoamed {
            from: p.endpoint,
            to: s.endpoint,
        });
    }
    let rx_grew = s.rx_bytes > p.rx_bytes;
    let tx_grew = s.tx_bytes > p.tx_bytes || s.tx_dropped > p.tx_dropped;
    let pending_since = if rx_grew || new_handshake {
        None
    } else if tx_grew {
        prev.pending_since.or(Some(now))
    } else {
        prev.pending_since
    };
    let quiet_for = match s.handshake_at {
        Some(t) => wall_now.duration_since(t).unwrap_or_default(),
        None => now.duration_since(prev.first_seen),
    };
    let waiting = pending_since.is_some_and(|t| now.duration_since(t) >= threshold);
    let unreachable = if prev.unreachable {
        !(rx_grew || new_handshake)
    } else {
        waiting && quiet_for >= threshold
    };
    match (prev.unreachable, unreachable) {
        (false, true) => changes.push(Change::Unreachable { quiet_for }),
        (true, false) => changes.push(Change::Recovered),
        _ => {}
    }
    let w = PeerWatch {
        sample: s.clone(),
        first_seen: prev.first_seen,
        pending_since,
        unreachable,
        handshakes: prev.handshakes + u64::from(new_handshake),
    };
    (w, changes)
}

/// What is remembered of every peer, kept in place from one look to the next: a look reads
/// each peer's counters (atomic loads) and updates its entry; it allocates only for a peer
/// that is new, and the per-peer report (`kwire_peer_up`, `kwire status`) is rebuilt only when
/// a peer came, went or changed reachability, not every second.
#[derive(Debug, Default)]
pub struct Looks {
    /// By Node name; hashed, not ordered: a look finds each of thousands of peers by name.
    peers: std::collections::HashMap<String, Looked>,
    pass: u64,
}

#[derive(Debug)]
struct Looked {
    watch: PeerWatch,
    /// The last look that saw the peer (the others are gone).
    pass: u64,
}

/// What one look found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Look {
    /// Every change, by Node name, in the order seen.
    pub changes: Vec<(String, Change)>,
    /// A peer came, went or changed reachability: the report is due.
    pub report_due: bool,
}

impl Looks {
    /// Folds one look at every peer, `(node, sample)`, into the remembered state.
    pub fn look<'a>(
        &mut self,
        samples: impl IntoIterator<Item = (&'a str, PeerSample)>,
        now: Instant,
        wall_now: SystemTime,
        threshold: Duration,
    ) -> Look {
        self.pass += 1;
        let pass = self.pass;
        let mut out = Look::default();
        for (node, s) in samples {
            let entry = self.peers.get_mut(node);
            let (watch, changes) = assess(
                entry.as_deref().map(|e| &e.watch),
                &s,
                now,
                wall_now,
                threshold,
            );
            match entry {
                Some(e) => {
                    out.report_due |= watch.unreachable != e.watch.unreachable;
                    *e = Looked { watch, pass };
                }
                None => {
                    self.peers.insert(node.to_string(), Looked { watch, pass });
                    out.report_due = true;
                }
            }
            out.changes
                .extend(changes.into_iter().map(|c| (node.to_string(), c)));
        }
        let before = self.peers.len();
        self.peers.retain(|_, e| e.pass == pass);
        out.report_due |= self.peers.len() != before;
        out
    }

    /// Peers looked at in the last look (for the monitor's interval).
    fn len(&self) -> usize {
        self.peers.len()
    }

    /// A peer's endpoint as last seen.
    pub fn endpoint(&self, node: &str) -> Option<SocketAddr> {
        self.peers.get(node)?.watch.sample.endpoint
    }

    /// Every peer's remembered state, by Node name.
    pub fn watches(&self) -> impl Iterator<Item = (&str, &PeerWatch)> {
        self.peers.iter().map(|(n, e)| (n.as_str(), &e.watch))
    }

    /// The per-peer report.
    pub fn report(&self) -> BTreeMap<String, PeerHealthReport> {
        self.watches()
            .map(|(n, w)| {
                (
                    n.to_string(),
                    PeerHealthReport {
                        unreachable: w.unreachable,
                    },
                )
            })
            .collect()
    }
}

/// The `KwireReady` condition: (status, reason, message).
pub fn readiness(
    synced: bool,
    programmed: bool,
    has_key: bool,
) -> (&'static str, &'static str, String) {
    match (has_key, synced, programmed) {
        (false, _, _) => ("False", "NoKey", "the WireGuard device has no private key".into()),
        (_, false, _) => ("False", "NotSynced", "not yet synced with the API and nothing restored from the state directory".into()),
        (_, _, false) => ("False", "RoutesNotProgrammed", "the tun's addresses or routes are not programmed (no podCIDRs yet, or `ip` failed: see the agent's log)".into()),
        _ => ("True", "DataPlaneReady", "kwire data plane up, synced, routes programmed".into()),
    }
}

/// The strategic merge patch that sets our condition and nothing else: `status.conditions`
/// merges by `type` (its patch strategy), so the kubelet's conditions, however fresh, are never
/// written back. `current` is our condition as last seen (its `lastTransitionTime` is kept
/// unless the status changes).
pub fn condition_patch(
    current: Option<&serde_json::Value>,
    status: &str,
    reason: &str,
    message: &str,
    now_rfc3339: &str,
) -> serde_json::Value {
    let transition = match current {
        Some(o) if o.get("status").and_then(|s| s.as_str()) == Some(status) => o
            .get("lastTransitionTime")
            .cloned()
            .unwrap_or_else(|| now_rfc3339.into()),
        _ => now_rfc3339.into(),
    };
    serde_json::json!({ "status": { "conditions": [{
        "type": CONDITION_TYPE,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now_rfc3339,
        "lastTransitionTime": transition,
    }] } })
}

fn rfc3339_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        .to_string()
}

/// Settings of the monitor.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub unreachable_after: Duration,
}

/// Runs until aborted.
pub async fn run(status: Arc<NodeState>, settings: HealthSettings) {
    let api = match crate::kubeapi::client(settings.kubeconfig.as_deref()).await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "peer health: no API client; no KwireReady condition and no peer Events"
            );
            None
        }
    };
    let mut monitor = Monitor {
        status,
        settings,
        api,
        looks: Looks::default(),
        condition: None,
        written: None,
        condition_failed_at: None,
        recorder: std::sync::OnceLock::new(),
        writes: Arc::new(tokio::sync::Semaphore::new(EVENT_WRITES_IN_FLIGHT)),
    };
    // The condition is kept every tick; the peers are looked at every `look_interval`.
    let mut tick = tokio::time::interval(HEALTH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_look = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= next_look {
            let changes = monitor.look();
            // Half a tick early, so that the look falls on the tick it is due at.
            next_look = now
                + look_interval(monitor.looks.len(), monitor.settings.unreachable_after)
                    .saturating_sub(HEALTH_TICK / 2);
            for (node, c) in changes {
                monitor.event(&node, &c);
            }
        }
        monitor.condition().await;
    }
}

/// The interval between two looks at `peers` peers: a second per [`PEERS_PER_LOOK_SECOND`]
/// peers, rounded down (5 s at 5,000 peers), at most [`MAX_LOOK_INTERVAL`] and a quarter of
/// `unreachable_after` (a peer is found unreachable at most a quarter of it late), never under
/// [`HEALTH_TICK`].
pub fn look_interval(peers: usize, unreachable_after: Duration) -> Duration {
    let by_peers = Duration::from_secs((peers / PEERS_PER_LOOK_SECOND) as u64);
    by_peers
        .min(MAX_LOOK_INTERVAL)
        .min(unreachable_after / 4)
        .max(HEALTH_TICK)
}

struct Monitor {
    status: Arc<NodeState>,
    settings: HealthSettings,
    api: Option<Client>,
    looks: Looks,
    /// The condition last written successfully.
    condition: Option<(&'static str, &'static str)>,
    /// Our condition as last written (its transition time is kept while the status holds).
    written: Option<serde_json::Value>,
    condition_failed_at: Option<Instant>,
    recorder: std::sync::OnceLock<Arc<Recorder>>,
    /// Event writes in flight, at most [`EVENT_WRITES_IN_FLIGHT`].
    writes: Arc<tokio::sync::Semaphore>,
}

impl Monitor {
    /// One look at every peer; returns the changes that deserve an Event.
    fn look(&mut self) -> Vec<(String, Change)> {
        let names = self.status.peer_names.load();
        let snap = self.status.device.snapshot();
        let wall_now = SystemTime::now();
        let samples = snap.peers.iter().filter_map(|p| {
            let node = names.get(&p.public_key)?;
            let (age, endpoint) = p.handshake_age_and_endpoint();
            Some((
                node.as_str(),
                PeerSample {
                    handshake_at: age.and_then(|d| wall_now.checked_sub(d)),
                    rx_bytes: p.rx_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    tx_dropped: p.tx_dropped.load(std::sync::atomic::Ordering::Relaxed),
                    endpoint,
                },
            ))
        });
        let look = self.looks.look(
            samples,
            Instant::now(),
            wall_now,
            self.settings.unreachable_after,
        );
        let mut events = Vec::new();
        for (node, c) in look.changes {
            match &c {
                Change::Handshake { first: true } => {
                    info!(node = %node, endpoint = ?self.looks.endpoint(&node), "peer connected: first handshake")
                }
                Change::Handshake { first: false } => {
                    debug!(node = %node, "handshake completed")
                }
                Change::EndpointRoamed { from, to } => {
                    info!(node = %node, from = ?from, to = ?to, "peer endpoint roamed")
                }
                Change::Unreachable { quiet_for } => {
                    warn!(node = %node, quiet_secs = quiet_for.as_secs(), "peer unreachable: no handshake while traffic waits");
                    events.push((node, c));
                }
                Change::Recovered => {
                    info!(node = %node, "peer recovered");
                    events.push((node, c));
                }
            }
        }
        // Only this peer's witnesses record its Events (the others have logged it above),
        // ranked among the Nodes this agent has seen alive: handshaked with at least once (the
        // greeting handshakes with every peer) and not unreachable now.
        let own = self.settings.node_name.as_str();
        let seen_up = || {
            self.looks
                .watches()
                .filter(|(_, w)| w.handshakes > 0 && !w.unreachable)
                .map(|(n, _)| n)
        };
        events.retain(|(node, _)| is_witness(own, node, seen_up(), EVENT_WITNESSES));
        if look.report_due {
            *self
                .status
                .peer_health
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = self.looks.report();
        }
        events
    }

    /// The one Recorder of this monitor: it remembers what it recorded, so the same Event
    /// again (a peer that flaps) becomes a series count on the first, not a new object.
    fn recorder(&self, client: &Client) -> Arc<Recorder> {
        self.recorder
            .get_or_init(|| {
                Arc::new(Recorder::new(
                    client.clone(),
                    Reporter {
                        controller: super::EVENT_CONTROLLER.into(),
                        instance: Some(self.settings.node_name.clone()),
                    },
                ))
            })
            .clone()
    }

    fn event(&self, node: &str, c: &Change) {
        let Some(client) = self.api.clone() else {
            return;
        };
        let (type_, reason, note) = match c {
            Change::Unreachable { quiet_for } => (
                EventType::Warning,
                "PeerUnreachable",
                format!(
                    "kwire on node {} has had no WireGuard handshake with this node for {} s while traffic waits; check that its kwire agent runs and UDP reaches its endpoint",
                    self.settings.node_name,
                    quiet_for.as_secs()
                ),
            ),
            Change::Recovered => (EventType::Normal, "PeerRecovered", format!("kwire on node {} reaches this node again", self.settings.node_name)),
            _ => return,
        };
        let node = node.to_string();
        let recorder = self.recorder(&client);
        let writes = self.writes.clone();
        tokio::spawn(async move {
            // The semaphore is never closed.
            let Ok(_permit) = writes.acquire_owned().await else {
                return;
            };
            let nodes: Api<Node> = Api::all(client);
            let reference =
                match tokio::time::timeout(super::API_WRITE_TIMEOUT, nodes.get(&node)).await {
                    Ok(Ok(n)) => n.object_ref(&()),
                    _ => k8s_openapi::api::core::v1::ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Node".into()),
                        name: Some(node.clone()),
                        ..Default::default()
                    },
                };
            let ev = K8sEvent {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "CheckPeer".into(),
                secondary: None,
            };
            match tokio::time::timeout(super::API_WRITE_TIMEOUT, recorder.publish(&ev, &reference))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(node = %node, reason, error = %e, "recording a Kubernetes Event failed")
                }
                Err(_) => warn!(node = %node, reason, "recording a Kubernetes Event timed out"),
            }
        });
    }

    /// Writes `KwireReady` on this Node when it changed (or a write failed earlier).
    async fn condition(&mut self) {
        let Some(client) = self.api.clone() else {
            return;
        };
        let st = &self.status;
        let (status, reason, message) = readiness(
            st.synced.load(std::sync::atomic::Ordering::Relaxed),
            st.programmed.load(std::sync::atomic::Ordering::Relaxed),
            st.device.public_key().is_some(),
        );
        if self.condition == Some((status, reason)) {
            return;
        }
        if self
            .condition_failed_at
            .is_some_and(|t| t.elapsed() < CONDITION_RETRY)
        {
            return;
        }
        let nodes: Api<Node> = Api::all(client);
        let name = &self.settings.node_name;
        let known = self.written.clone();
        let r = tokio::time::timeout(super::API_WRITE_TIMEOUT, async {
            // Our condition as the API has it (once, after a start); the patch itself
            // carries only ours.
            let current = match known {
                Some(c) => Some(c),
                None => nodes
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .find(|c| c.type_ == CONDITION_TYPE)
                    .and_then(|c| serde_json::to_value(c).ok()),
            };
            let patch = condition_patch(current.as_ref(), status, reason, &message, &rfc3339_now());
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .map(|_| patch["status"]["conditions"][0].clone())
        })
        .await;
        match r {
            Ok(Ok(ours)) => {
                info!(node = %name, condition = CONDITION_TYPE, status, reason, "Node condition set");
                self.written = Some(ours);
                self.condition = Some((status, reason));
                self.condition_failed_at = None;
            }
            Ok(Err(e)) => {
                if self.condition_failed_at.is_none() {
                    warn!(node = %name, error = %e, "setting the KwireReady condition failed; retrying");
                }
                self.condition_failed_at = Some(Instant::now());
            }
            Err(_) => {
                if self.condition_failed_at.is_none() {
                    warn!(node = %name, "setting the KwireReady condition timed out; retrying");
                }
                self.condition_failed_at = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(120);

    fn sample(hs: Option<u64>, rx: u64, tx: u64, dropped: u64) -> PeerSample {
        PeerSample {
            handshake_at: hs.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)),
            rx_bytes: rx,
            tx_bytes: tx,
            tx_dropped: dropped,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
        }
    }

    fn wall(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    /// Feeds (second, sample) looks; returns the changes of each look.
    fn run(looks: &[(u64, PeerSample)]) -> (PeerWatch, Vec<Vec<Change>>) {
        let t0 = Instant::now();
        let mut w: Option<PeerWatch> = None;
        let mut out = Vec::new();
        for (sec, s) in looks {
            let (n, c) = assess(w.as_ref(), s, t0 + Duration::from_secs(*sec), wall(*sec), T);
            w = Some(n);
            out.push(c);
        }
        (w.unwrap(), out)
    }

    /// The looks kept in place equal the looks rebuilt from scratch every pass (a new map of
    /// the peers seen, as the monitor did before): the same changes and the same state after
    /// any history of peers coming, going, talking and falling silent, and the report is due
    /// exactly when it would differ from the last one.
    #[test]
    fn looks_kept_in_place_equal_looks_rebuilt() {
        let mut rand = crate::testing::xorshift(0x2545_f491_4f6c_dd1d);
        let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
        for _ in 0..100 {
            let t0 = Instant::now();
            let mut kept = Looks::default();
            let mut rebuilt: BTreeMap<String, PeerWatch> = BTreeMap::new();
            let mut counters: BTreeMap<&str, (Option<u64>, u64, u64, u64)> = BTreeMap::new();
            let mut report = BTreeMap::new();
            for sec in 0..400u64 {
                let mut samples = Vec::new();
                for n in &names {
                    if rand(8) == 0 {
                        continue; // not a peer in this look (gone, or not yet there)
                    }
                    let c = counters.entry(n.as_str()).or_insert((None, 0, 0, 0));
                    match rand(6) {
                        0 => c.1 += 100,
                        1 => c.2 += 100,
                        2 => c.3 += 1,
                        3 if rand(10) == 0 => c.0 = Some(sec),
                        _ => {}
                    }
                    samples.push((n.as_str(), sample(c.0, c.1, c.2, c.3)));
                }
                let (now, wall_now) = (t0 + Duration::from_secs(sec), wall(sec));
                let look = kept.look(samples.clone(), now, wall_now, Duration::from_secs(30));
                let mut next = BTreeMap::new();
                let mut changes = Vec::new();
                for (n, s) in &samples {
                    let (w, c) = assess(rebuilt.get(*n), s, now, wall_now, Duration::from_secs(30));
                    changes.extend(c.into_iter().map(|c| (n.to_string(), c)));
                    next.insert(n.to_string(), w);
                }
                rebuilt = next;
                assert_eq!(look.changes, changes);
                // The kept looks are hashed by name: compared in name order.
                let mut a: Vec<(&str, &PeerWatch)> = kept.watches().collect();
                a.sort_unstable_by_key(|(n, _)| *n);
                let b: Vec<(&str, &PeerWatch)> =
                    rebuilt.iter().map(|(n, w)| (n.as_str(), w)).collect();
                assert_eq!(a, b);
                let new_report = kept.report();
                assert_eq!(look.report_due, new_report != report, "second {sec}");
                report = new_report;
            }
        }
    }

    #[test]
    fn table() {
        struct Case {
            what: &'static str,
            looks: Vec<(u64, PeerSample)>,
            unreachable: bool,
            last: Vec<Change>,
        }
        let cases = vec![
            Case {
                what: "idle peer with an old handshake is not unreachable",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (300, sample(Some(0), 10, 10, 0)),
                ],
                unreachable: false,
                last: vec![],
            },
            Case {
                what:
                    "traffic without answer, old handshake: unreachable once the threshold passes",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (129, sample(Some(0), 10, 90, 0)),
                    (131, sample(Some(0), 10, 95, 0)),
                ],
                unreachable: true,
                last: vec![Change::Unreachable {
                    quiet_for: Duration::from_secs(131),
                }],
            },
            Case {
                what: "pending shorter than the threshold: not yet",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (200, sample(Some(0), 10, 20, 0)),
                    (250, sample(Some(0), 10, 30, 0)),
                ],
                unreachable: false,
                last: vec![],
            },
            Case {
                what: "tx_dropped counts as waiting traffic (no session, never a handshake)",
                looks: vec![
                    (0, sample(None, 0, 0, 0)),
                    (5, sample(None, 0, 0, 3)),
                    (130, sample(None, 0, 0, 9)),
                ],
                unreachable: true,
                last: vec![Change::Unreachable {
                    quiet_for: Duration::from_secs(130),
                }],
            },
            Case {
                what: "answers reset the wait",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (100, sample(Some(0), 20, 30, 0)),
                    (200, sample(Some(0), 20, 40, 0)),
                ],
                unreachable: false,
                last: vec![],
            },
            Case {
                what: "a recent handshake keeps a peer reachable",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (125, sample(Some(120), 10, 30, 0)),
                    (200, sample(Some(120), 10, 40, 0)),
                ],
                unreachable: false,
                last: vec![],
            },
            Case {
                what: "recovery on a new handshake",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (140, sample(Some(0), 10, 30, 0)),
                    (150, sample(Some(149), 10, 40, 0)),
                ],
                unreachable: false,
                last: vec![Change::Handshake { first: false }, Change::Recovered],
            },
            Case {
                what: "recovery on received bytes",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (140, sample(Some(0), 10, 30, 0)),
                    (150, sample(Some(0), 11, 30, 0)),
                ],
                unreachable: false,
                last: vec![Change::Recovered],
            },
            Case {
                what: "stays unreachable without an answer (one Event, not one per look)",
                looks: vec![
                    (0, sample(Some(0), 10, 10, 0)),
                    (10, sample(Some(0), 10, 20, 0)),
                    (140, sample(Some(0), 10, 30, 0)),
                    (150, sample(Some(0), 10, 40, 0)),
                ],
                unreachable: true,
                last: vec![],
            },
        ];
        for c in cases {
            let (w, changes) = run(&c.looks);
            assert_eq!(w.unreachable, c.unreachable, "{}", c.what);
            assert_eq!(changes.last().unwrap(), &c.last, "{}", c.what);
        }
    }

    #[test]
    fn counts_handshakes_and_sees_roaming() {
        let mut b = sample(Some(1), 0, 0, 0);
        b.endpoint = Some("198.51.100.7:4000".parse().unwrap());
        let (w, changes) = run(&[
            (0, sample(None, 0, 0, 0)),
            (1, sample(Some(1), 0, 0, 0)),
            (2, sample(Some(1), 0, 0, 0)),
            (3, b),
            (130, sample(Some(129), 0, 0, 0)),
        ]);
        assert_eq!(w.handshakes, 2);
        assert_eq!(changes[1], vec![Change::Handshake { first: true }]);
        assert_eq!(changes[2], vec![]);
        assert_eq!(
            changes[3],
            vec![Change::EndpointRoamed {
                from: Some("192.0.2.2:51820".parse().unwrap()),
                to: Some("198.51.100.7:4000".parse().unwrap())
            }]
        );
        assert!(changes[4].contains(&Change::Handshake { first: false }));
    }

    /// The patch carries our condition only (the kubelet's stay as the API has them), and
    /// keeps our transition time while the status holds.
    #[test]
    fn the_condition_patch_carries_ours_only() {
        let ours = serde_json::json!({"type": "KwireReady", "status": "True", "reason": "DataPlaneReady", "lastTransitionTime": "2020-01-01T00:00:00Z"});
        let same = condition_patch(
            Some(&ours),
            "True",
            "DataPlaneReady",
            "m",
            "2026-01-01T00:00:00Z",
        );
        let list = same["status"]["conditions"].as_array().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["type"], "KwireReady");
        assert_eq!(list[0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(list[0]["lastHeartbeatTime"], "2026-01-01T00:00:00Z");
        let flipped = condition_patch(
            Some(&ours),
            "False",
            "NotSynced",
            "m",
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            flipped["status"]["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(flipped["status"]["conditions"][0]["reason"], "NotSynced");
        let first = condition_patch(None, "True", "DataPlaneReady", "m", "x");
        assert_eq!(first["status"]["conditions"][0]["lastTransitionTime"], "x");
        assert_eq!(first.as_object().unwrap().len(), 1, "status only");
    }

    #[test]
    fn the_look_interval_grows_with_the_peers_within_its_bounds() {
        let default = DEFAULT_PEER_UNREACHABLE_AFTER;
        let secs = |s| Duration::from_secs(s);
        // A second up to 1,999 peers, then one per thousand.
        assert_eq!(look_interval(0, default), HEALTH_TICK);
        assert_eq!(look_interval(1_999, default), secs(1));
        assert_eq!(look_interval(5_000, default), secs(5));
        // At most MAX_LOOK_INTERVAL.
        assert_eq!(look_interval(50_000, default), MAX_LOOK_INTERVAL);
        // A short --peer-unreachable-after: a quarter of it, never under a second.
        assert_eq!(look_interval(5_000, secs(8)), secs(2));
        assert_eq!(look_interval(5_000, secs(2)), HEALTH_TICK);
        assert_eq!(look_interval(0, Duration::ZERO), HEALTH_TICK);
    }

    #[test]
    fn readiness_says_why() {
        assert_eq!(readiness(true, true, true).0, "True");
        assert_eq!(readiness(false, true, true).1, "NotSynced");
        assert_eq!(readiness(true, false, true).1, "RoutesNotProgrammed");
        assert_eq!(readiness(true, true, false).1, "NoKey");
    }

    /// Each dead peer gets `EVENT_WITNESSES` reporters whatever the cluster's size, the same
    /// ones seen from every agent; a witness that is gone itself is replaced by the next.
    #[test]
    fn a_few_witnesses_per_peer_whatever_the_cluster_size() {
        for n in [2usize, 3, 4, 10, 500] {
            let nodes: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let names = || nodes.iter().map(String::as_str);
            for dead in nodes.iter().take(5) {
                let witnesses: Vec<&str> = names()
                    .filter(|me| is_witness(me, dead, names(), EVENT_WITNESSES))
                    .collect();
                assert_eq!(
                    witnesses.len(),
                    EVENT_WITNESSES.min(n - 1),
                    "n={n} dead={dead}"
                );
                assert!(!witnesses.contains(&dead.as_str()));
                // The first witness dies too: the others, not seeing it, pick a third.
                let gone = witnesses[0];
                let alive = || names().filter(move |c| *c != gone);
                let next: Vec<&str> = alive()
                    .filter(|me| is_witness(me, dead, alive(), EVENT_WITNESSES))
                    .collect();
                assert_eq!(next.len(), EVENT_WITNESSES.min(n - 2), "n={n}");
                assert!(witnesses[1..].iter().all(|w| next.contains(w)));
            }
        }
        // An agent that has seen no other Node alive reports everything it sees.
        assert!(is_witness("me", "d", [], EVENT_WITNESSES));
        assert!(!is_witness("d", "d", [], EVENT_WITNESSES));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("2 weeks").is_err());
    }
}
