//! The agent's HTTP endpoint: `/metrics` (Prometheus text; peers labelled by node name, external
//! peers (the `Peer` resource) by Peer name (label `peer`), never by key or address), `/healthz` (the
//! process answers) and `/readyz` (synced with the API or
//! restored from state, and the data plane programmed). Renders the node's
//! [`StatusReport`](crate::node_state::StatusReport), so `/metrics` and `kwire status` show the
//! same numbers by construction.

use crate::node_state::{report, NodeState, PeerReport};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug)]
struct StatusCollector(Arc<NodeState>);

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
        // The same numbers `kwire status` prints.
        let r = report(&self.0);
        // Node peers labelled `node`, external peers (the `Peer` resource) `peer`.
        let all: Vec<(Labels, &PeerReport)> = r
            .peers
            .iter()
            .map(|p| (one("node", &p.node), p))
            .chain(r.external_peers.iter().map(|p| (one("peer", &p.node), p)))
            .collect();
        let peer_gauge = |f: &dyn Fn(&PeerReport) -> Option<f64>| -> Vec<(Labels, f64)> {
            all.iter()
                .filter_map(|(l, p)| f(p).map(|v| (l.clone(), v)))
                .collect()
        };
        let peer_counter = |f: &dyn Fn(&PeerReport) -> u64| -> Vec<(Labels, u64)> {
            all.iter().map(|(l, p)| (l.clone(), f(p))).collect()
        };
        gauge_family(
            &mut e,
            "kwire_peer_up",
            "1 if the peer's last handshake is younger than 180 s and it is not judged unreachable",
            &peer_gauge(&|p| Some(if p.up { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            &mut e,
            "kwire_peer_relayed",
            "1 if the peer is reached through a relay node (both behind NAT)",
            &peer_gauge(&|p| Some(if p.relay.is_some() { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            &mut e,
            "kwire_nat_detected",
            "1 if a peer sees this node's packets come from elsewhere than its published endpoint",
            &[(
                Labels::new(),
                if r.nat_detected.is_some() { 1.0 } else { 0.0 },
            )],
        )?;
        counter_family(
            &mut e,
            "kwire_relay_forwarded",
            "WireGuard datagrams this node forwarded as the relay of nodes both behind NAT",
            &[(Labels::new(), r.relay.forwarded)],
        )?;
        counter_family(
            &mut e,
            "kwire_relay_dropped",
            "Datagrams to this node's relay port it did not forward (not WireGuard, unknown sender or session)",
            &[(Labels::new(), r.relay.dropped)],
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
        let with = |l: &Labels, k: &str, v: String| -> Labels {
            let mut l = l.clone();
            l.push((k.to_string(), v));
            l
        };
        let hs: Vec<(Labels, u64)> = all
            .iter()
            .flat_map(|(l, p)| {
                [
                    ("success", p.handshakes),
                    ("timeout", p.handshakes_timeout),
                    ("rejected", p.handshakes_rejected),
                ]
                .map(|(result, n)| (with(l, "result", result.to_string()), n))
            })
            .collect();
        counter_family(
            &mut e,
            "kwire_peer_handshakes",
            "Handshake attempts with the peer by result: success (completed, either side \
             initiating), timeout (our initiation never answered), rejected (refused)",
            &hs,
        )?;
        counter_family(
            &mut e,
            "kwire_peer_handshakes_triggered",
            "Handshakes started at once because the peer sent data for a session this node \
             does not know (after this node restarted)",
            &peer_counter(&|p| p.handshakes_triggered),
        )?;
        let ep: Vec<(Labels, f64)> = all
            .iter()
            .filter_map(|(l, p)| Some((with(l, "endpoint", p.endpoint.clone()?), 1.0)))
            .collect();
        gauge_family(
            &mut e,
            "kwire_peer_endpoint_info",
            "The peer's current UDP endpoint (ip:port; changes when it roams)",
            &ep,
        )?;
        let session_keys: Vec<(Labels, f64)> = r
            .peers
            .iter()
            .map(|p| {
                (
                    vec![
                        ("node".to_string(), p.node.clone()),
                        ("local".to_string(), p.session_local_key.clone()),
                        ("peer".to_string(), p.session_peer_key.clone()),
                    ],
                    1.0,
                )
            })
            .collect();
        gauge_family(
            &mut e,
            "kwire_peer_session_key_info",
            "Which keys the session the node sends on was made with: local (this node's: current, next while it rotates) and peer (the peer's: current, next while it rotates)",
            &session_keys,
        )?;
        gauge_family(
            &mut e,
            "kwire_key_age_seconds",
            "Seconds since this node's current private key was written",
            &r.key
                .age_seconds
                .map(|a| (vec![], a))
                .into_iter()
                .collect::<Vec<_>>(),
        )?;
        gauge_family(
            &mut e,
            "kwire_key_rotation_in_progress",
            "1 while this node rotates its key (it answers handshakes to both keys)",
            &[(
                vec![],
                if r.key.next_public_key.is_some() {
                    1.0
                } else {
                    0.0
                },
            )],
        )?;
        counter_family(
            &mut e,
            "kwire_key_rotations",
            "Key rotations of this node by result: completed, aborted; and revocations of its key",
            &[
                (one("result", "completed"), r.key.rotations_completed),
                (one("result", "aborted"), r.key.rotations_aborted),
                (one("result", "revoked"), r.key.revocations),
            ],
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
        let by_reason = |m: &BTreeMap<String, u64>| -> Vec<(Labels, u64)> {
            m.iter().map(|(r, n)| (one("reason", r), *n)).collect()
        };
        let drops = by_reason(&r.drops);
        counter_family(
            &mut e,
            "kwire_drops",
            "Packets dropped by the data plane, by reason",
            &drops,
        )?;
        counter_family(
            &mut e,
            "kwire_service_translations",
            "New flows to a Service's ClusterIP translated to a backend",
            &[(vec![], r.services.translations)],
        )?;
        counter_family(
            &mut e,
            "kwire_service_no_endpoint",
            "New flows to a Service without a usable endpoint, refused (TCP reset, ICMP port unreachable); also in kwire_drops_total{reason=\"service_no_endpoint\"}",
            &[(vec![], r.drops.get("service_no_endpoint").copied().unwrap_or(0))],
        )?;
        gauge_family(
            &mut e,
            "kwire_service_frontends",
            "Frontends (protocol, ClusterIP, port) in the node's service table",
            &[(vec![], r.services.frontends as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_pods",
            "Pods attached to this node's packet loop",
            &[(vec![], r.pods.len() as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_conntrack_flows",
            "Flows in the NetworkPolicy connection table (new flows are refused past kwire_conntrack_flows_max, or past kwire_conntrack_flows_per_pod_max for one initiating address)",
            &[(vec![], r.conntrack.flows as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_conntrack_flows_max",
            "Most flows the connection table holds",
            &[(vec![], r.conntrack.max_flows as f64)],
        )?;
        gauge_family(
            &mut e,
            "kwire_conntrack_flows_per_pod_max",
            "Most flows one initiating pod address may hold (--max-flows-per-pod)",
            &[(vec![], r.conntrack.max_flows_per_pod as f64)],
        )?;
        let invalid = by_reason(&r.invalid_peers);
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
        let filtered: Vec<(Labels, u64)> = r
            .watch_filter
            .iter()
            .flat_map(|f| {
                [("passed", f.passed), ("dropped", f.dropped)].map(|(outcome, n)| {
                    (
                        vec![
                            ("kind".to_string(), f.kind.clone()),
                            ("outcome".to_string(), outcome.to_string()),
                        ],
                        n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut e,
            "kwire_watch_items",
            "Node, Pod, Service and EndpointSlice watch items by what the agent's filter did: passed on (they change what kwire reads, or are lists and deletes) or dropped (heartbeats, fields kwire does not read)",
            &filtered,
        )?;
        counter_family(
            &mut e,
            "kwire_policy_state_errors",
            "Saved NetworkPolicy inputs that could not be restored at start (pods' new flows wait for the API lists)",
            &[(vec![], r.policy_state_errors)],
        )?;
        counter_family(
            &mut e,
            "kwire_service_state_errors",
            "Saved Service inputs that could not be restored at start (flows to ClusterIPs wait for the API lists)",
            &[(vec![], r.service_state_errors)],
        )?;
        let failed: Vec<(Labels, u64)> = r
            .state_write_failures
            .iter()
            .map(|(file, n)| (one("file", file), *n))
            .collect();
        counter_family(
            &mut e,
            "kwire_state_write_failures",
            "Failed writes of a saved-state file in the state directory (retried; a restart meanwhile starts from the last one written)",
            &failed,
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
pub fn registry(status: Arc<NodeState>) -> Registry {
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
    status: Arc<NodeState>,
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
    match h.status.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.reason()),
    }
}

/// Binds `addr` now (so a bad address fails the start) and returns the server future.
pub async fn bind(
    addr: SocketAddr,
    status: Arc<NodeState>,
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
    use crate::datapath::stats::{Counters, DropReason};
    use crate::wg::Device;
    use kwire_proto::key::PublicKey;

    #[test]
    fn renders_node_level_metrics_without_keys() {
        let st = Arc::new(NodeState::new(
            Arc::new(Device::new()),
            Arc::new(Counters::default()),
            &["duplicate_key", "no_key"],
        ));
        st.count_invalid("duplicate_key");
        Counters::drop(&st.counters, DropReason::NoPeer);
        st.pod_filter.add(false);
        st.pod_filter.add(false);
        st.pod_filter.add(true);
        let peers_failed = Arc::new(std::sync::atomic::AtomicU64::new(2));
        st.state_write_failures.register("peers.json", peers_failed);
        st.state_write_failures
            .register("flow-state.bin", Arc::default());
        let mut names = BTreeMap::new();
        names.insert(PublicKey([5; 32]), "node-b".to_string());
        st.peer_names.store(Arc::new(names));
        let text = render(&registry(st.clone()));
        for want in [
            "kwire_invalid_peer_total{reason=\"duplicate_key\"} 1",
            "kwire_invalid_peer_total{reason=\"no_key\"} 0",
            "kwire_drops_total{reason=\"no_peer\"} 1",
            "kwire_drops_total{reason=\"mtu\"} 0",
            "kwire_watch_items_total{kind=\"Pod\",outcome=\"dropped\"} 2",
            "kwire_watch_items_total{kind=\"Pod\",outcome=\"passed\"} 1",
            "kwire_watch_items_total{kind=\"Node\",outcome=\"dropped\"} 0",
            "kwire_state_write_failures_total{file=\"peers.json\"} 2",
            "kwire_state_write_failures_total{file=\"flow-state.bin\"} 0",
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
