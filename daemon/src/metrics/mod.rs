//! The agent's HTTP endpoint: `/metrics` (Prometheus text; peers labelled by node name, never
//! by key or address), `/healthz` (the process answers) and `/readyz` (synced with the API or
//! restored from state, and the data plane programmed).

use crate::agent::peers::RejectReason;
use crate::datapath::stats::Counters;
use crate::dataplane::ports::Pods;
use crate::wg::Device;
use arc_swap::ArcSwap;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ipnetwork::IpNetwork;
use kwire_proto::key::PublicKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A peer whose last handshake is older than this is down: WireGuard's REJECT_AFTER_TIME
/// (whitepaper §6.1), after which no session key may be used.
pub const PEER_UP_WITHIN: Duration = Duration::from_secs(180);

/// What the endpoint reports, shared with the agent's control loop.
pub struct AgentStatus {
    pub device: Arc<Device>,
    pub counters: Arc<Counters>,
    /// Node name of each peer the control plane configured, by public key.
    pub peer_names: ArcSwap<BTreeMap<PublicKey, String>>,
    invalid: [AtomicU64; RejectReason::ALL.len()],
    /// Synced with the API at least once, or restored from the state directory.
    pub synced: AtomicBool,
    /// The tun's addresses and routes are programmed.
    pub programmed: AtomicBool,
    /// Which node this is, where its pod records live, its pods (set once at start).
    pub node: OnceLock<NodeContext>,
    /// This node's pod CIDRs, as last programmed.
    pub pod_cidrs: ArcSwap<Vec<IpNetwork>>,
    /// Errors of the Node watch (each failed list/watch attempt).
    pub watch_errors: AtomicU64,
    /// Complete re-lists of the Nodes (the first list included).
    pub watch_resyncs: AtomicU64,
    /// The Node watch delivered its last answer without error.
    pub api_synced: AtomicBool,
    /// What the health monitor knows of each peer, by node name.
    pub peer_health: Mutex<BTreeMap<String, PeerHealthReport>>,
}

/// The node an agent runs for.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub name: String,
    pub interface: String,
    /// Holds `pods.json` (pod names and namespaces).
    pub state_dir: PathBuf,
    pub pods: Arc<Pods>,
}

/// Per peer, what the health monitor derived between ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealthReport {
    /// Completed handshakes seen (a change of the handshake time between ticks).
    pub handshakes: u64,
    /// No handshake for longer than `--peer-unreachable-after` while traffic waits.
    pub unreachable: bool,
}

impl std::fmt::Debug for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStatus")
            .field("synced", &self.synced)
            .field("programmed", &self.programmed)
            .finish_non_exhaustive()
    }
}

impl AgentStatus {
    pub fn new(device: Arc<Device>, counters: Arc<Counters>) -> AgentStatus {
        AgentStatus {
            device,
            counters,
            peer_names: ArcSwap::from_pointee(BTreeMap::new()),
            invalid: Default::default(),
            synced: AtomicBool::new(false),
            programmed: AtomicBool::new(false),
            node: OnceLock::new(),
            pod_cidrs: ArcSwap::from_pointee(Vec::new()),
            watch_errors: AtomicU64::new(0),
            watch_resyncs: AtomicU64::new(0),
            api_synced: AtomicBool::new(false),
            peer_health: Mutex::new(BTreeMap::new()),
        }
    }

    /// The health monitor's view of each peer.
    pub fn peer_health(&self) -> BTreeMap<String, PeerHealthReport> {
        self.peer_health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pods attached to the packet loop (0 before the node is known).
    pub fn pod_count(&self) -> usize {
        self.node.get().map_or(0, |n| n.pods.table().pods.len())
    }

    pub fn count_invalid(&self, r: RejectReason) {
        self.invalid[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn invalid(&self, r: RejectReason) -> u64 {
        self.invalid[r as usize].load(Ordering::Relaxed)
    }

    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.programmed.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct StatusCollector(Arc<AgentStatus>);

type Labels = Vec<(String, String)>;

fn one(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

fn gauge_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn counter_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = &self.0;
        // The same numbers `kwire status` prints.
        let r = crate::status::report(st);
        let node = |n: &str| one("node", n);
        let peer_gauge =
            |f: &dyn Fn(&crate::status::PeerReport) -> Option<f64>| -> Vec<(Labels, f64)> {
                r.peers
                    .iter()
                    .filter_map(|p| f(p).map(|v| (node(&p.node), v)))
                    .collect()
            };
        let peer_counter = |f: &dyn Fn(&crate::status::PeerReport) -> u64| -> Vec<(Labels, u64)> {
            r.peers.iter().map(|p| (node(&p.node), f(p))).collect()
        };
        gauge_family(
            &mut e,
            "kwire_peer_up",
            "1 if the peer's last handshake is younger than 180 s and it is not judged unreachable",
            &peer_gauge(&|p| Some(if p.up { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            &mut e,
            "kwire_peer_last_handshake_age_seconds",
            "Seconds since the peer's last completed handshake (absent before the first)",
            &peer_gauge(&|p| p.last_handshake_age_seconds),
        )?;
        counter_family(
            &mut e,
            "kwire_peer_rx_bytes",
            "Bytes received from the peer (decrypted WireGuard payload)",
            &peer_counter(&|p| p.rx_bytes),
        )?;
        counter_family(
            &mut e,
            "kwire_peer_tx_bytes",
            "Bytes sent to the peer (WireGuard payload before encryption)",
            &peer_counter(&|p| p.tx_bytes),
        )?;
        let hs: Vec<(Labels, u64)> = r
            .peers
            .iter()
            .map(|p| {
                (
                    vec![
                        ("node".to_string(), p.node.clone()),
                        ("result".to_string(), "success".to_string()),
                    ],
                    p.handshakes,
                )
            })
            .collect();
        counter_family(
            &mut e,
            "kwire_peer_handshakes",
            "Completed handshakes with the peer seen by the agent",
            &hs,
        )?;
        let ep: Vec<(Labels, f64)> = r
            .peers
            .iter()
            .filter_map(|p| {
                let ep = p.endpoint.clone()?;
                Some((
                    vec![
                        ("node".to_string(), p.node.clone()),
                        ("endpoint".to_string(), ep),
                    ],
                    1.0,
                ))
            })
            .collect();
        gauge_family(
            &mut e,
            "kwire_peer_endpoint_info",
            "The peer's current UDP endpoint (ip:port; changes when it roams)",
            &ep,
        )?;
        gauge_family(
            &mut e,
            "kwire_peers_expected",
            "Peers this node should have (valid other Nodes)",
            &[(vec![], r.peers_expected as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_peers_connected",
            "Peers that are up (handshake younger than 180 s, not unreachable)",
            &[(vec![], r.peers_connected as f64)],
        )?;
        let packets: Vec<(Labels, u64)> = [
            ("tx", r.packets.tx),
            ("rx", r.packets.rx),
            ("local", r.packets.local),
        ]
        .into_iter()
        .map(|(d, n)| (one("direction", d), n))
        .collect();
        counter_family(
            &mut e,
            "kwire_packets",
            "Packets of the data plane: tx encrypted to peers, rx decrypted from peers, local delivered on this node",
            &packets,
        )?;
        let drops: Vec<(Labels, u64)> = st
            .counters
            .all_drops()
            .map(|(r, n)| (one("reason", r.metric_label()), n))
            .collect();
        counter_family(
            &mut e,
            "kwire_drops",
            "Packets dropped by the data plane, by reason",
            &drops,
        )?;
        gauge_family(
            &mut e,
            "kwire_pods",
            "Pods attached to this node's packet loop",
            &[(vec![], r.pods.len() as f64)],
        )?;
        let (flows, max_flows, per_pod) = st.node.get().map_or((0, 0, 0), |n| {
            let ct = &n.pods.conntrack;
            (ct.len(), ct.max_flows(), ct.max_flows_per_pod())
        });
        gauge_family(
            &mut e,
            "kwire_conntrack_flows",
            "Flows in the NetworkPolicy connection table (new flows are refused past kwire_conntrack_flows_max, or past kwire_conntrack_flows_per_pod_max for one initiating address)",
            &[(vec![], flows as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_conntrack_flows_max",
            "Most flows the connection table holds",
            &[(vec![], max_flows as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_conntrack_flows_per_pod_max",
            "Most flows one initiating pod address may hold (--max-flows-per-pod)",
            &[(vec![], per_pod as f64)],
        )?;
        let invalid: Vec<(Labels, u64)> = RejectReason::ALL
            .iter()
            .map(|r| (one("reason", r.metric_label()), st.invalid(*r)))
            .collect();
        counter_family(
            &mut e,
            "kwire_invalid_peer",
            "Nodes refused as peers (counted once per change), by reason",
            &invalid,
        )?;
        counter_family(
            &mut e,
            "kwire_watch_errors",
            "Failed attempts of the Node watch (API unreachable, refused, timed out)",
            &[(vec![], r.watch_errors)],
        )?;
        counter_family(
            &mut e,
            "kwire_watch_resyncs",
            "Complete re-lists of the Nodes, the first included",
            &[(vec![], r.watch_resyncs)],
        )?;
        gauge_family(
            &mut e,
            "kwire_api_synced",
            "1 if the Node watch's last answer was not an error",
            &[(vec![], if r.api_synced { 1.0 } else { 0.0 })],
        )?;
        gauge_family(
            &mut e,
            "kwire_ready",
            "1 if synced (or restored) and the tun's addresses and routes are programmed",
            &[(vec![], if r.ready { 1.0 } else { 0.0 })],
        )?;
        gauge_family(
            &mut e,
            "kwire_build_info",
            "Build of this agent",
            &[(one("version", env!("CARGO_PKG_VERSION")), 1.0)],
        )?;
        Ok(())
    }
}

/// The registry with every agent metric.
pub fn registry(status: Arc<AgentStatus>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(StatusCollector(status)));
    r
}

/// Renders `/metrics`.
pub fn render(registry: &Registry) -> String {
    let mut s = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut s, registry)
        .expect("writing to a String cannot fail");
    s
}

struct Http {
    status: Arc<AgentStatus>,
    registry: Registry,
}

async fn metrics(State(h): State<Arc<Http>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&h.registry),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Arc<Http>>) -> impl IntoResponse {
    if h.status.ready() {
        (StatusCode::OK, "ready\n")
    } else if !h.status.synced.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not yet synced with the API and nothing restored\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: tun addresses or routes not programmed\n",
        )
    }
}

/// Binds `addr` now (so a bad address fails the start) and returns the server future.
pub async fn bind(
    addr: SocketAddr,
    status: Arc<AgentStatus>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr} (--metrics-addr)"))?;
    let registry = registry(status.clone());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Http { status, registry }));
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_node_level_metrics_without_keys() {
        let st = Arc::new(AgentStatus::new(
            Arc::new(Device::new()),
            Arc::new(Counters::default()),
        ));
        st.count_invalid(RejectReason::DuplicateKey);
        Counters::drop(&st.counters, crate::datapath::stats::DropReason::NoPeer);
        let mut names = BTreeMap::new();
        names.insert(PublicKey([5; 32]), "node-b".to_string());
        st.peer_names.store(Arc::new(names));
        let text = render(&registry(st.clone()));
        for want in [
            "kwire_invalid_peer_total{reason=\"duplicate_key\"} 1",
            "kwire_drops_total{reason=\"no_peer\"} 1",
            "kwire_peers_expected 1",
            "kwire_peers_connected 0",
            "kwire_build_info{version=",
            "# TYPE kwire_peer_up gauge",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains(&PublicKey([5; 32]).to_base64()));
        assert!(!st.ready());
    }
}
