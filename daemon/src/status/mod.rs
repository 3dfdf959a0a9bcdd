//! `kwire status` and `kwire graph`: the root-only local socket the agent serves the node's
//! [`StatusReport`] on ([`server`]), and the commands that fetch and print it (text, JSON,
//! Graphviz). The report itself is [`crate::node_state`]'s.

pub mod graph;
pub mod server;

use crate::node_state::StatusReport;
use serde::Deserialize;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The status socket's file name inside the run directory.
pub const STATUS_SOCKET: &str = "status.sock";
/// Default run directory of the agent (`--run-dir`).
pub const DEFAULT_RUN_DIR: &str = "/run/kwire";
/// How long `kwire status` waits for the agent's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest status document the client reads (a node with thousands of pods fits).
pub const MAX_REPORT_BYTES: u64 = 16 << 20;

/// Why `kwire status` could not get a report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no kwire agent at {path}: is the DaemonSet running on this node? (or pass --run-dir)"
    )]
    NoAgent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on {path}: kwire status must run as root (sudo kwire status)")]
    Permission {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the status from {path}: {source} (is the agent overloaded? try again)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} answered: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("the agent at {path} sent a status this kwire cannot read ({source}); is the agent a different version?")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Asks the agent whose run directory is `run_dir` for its report.
pub fn fetch(run_dir: &Path) -> Result<StatusReport, StatusError> {
    let path = run_dir.join(STATUS_SOCKET);
    let s = UnixStream::connect(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => StatusError::Permission {
            path: path.clone(),
            source,
        },
        _ => StatusError::NoAgent {
            path: path.clone(),
            source,
        },
    })?;
    let read = |source| StatusError::Read {
        path: path.clone(),
        source,
    };
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(read)?;
    let mut body = Vec::new();
    s.take(MAX_REPORT_BYTES)
        .read_to_end(&mut body)
        .map_err(read)?;
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    if let Ok(r) = serde_json::from_slice::<Refusal>(&body) {
        return Err(StatusError::Refused {
            path,
            message: r.error,
        });
    }
    serde_json::from_slice(&body).map_err(|source| StatusError::Decode { path, source })
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The agent's run directory (where it serves status.sock).
    #[arg(long, env = "KWIRE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Colour: auto (when stdout is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub color: String,
}

/// `kwire status`.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let r = fetch(&args.run_dir)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out)?;
    } else {
        let colour = match args.color.as_str() {
            "always" => true,
            "never" => false,
            _ => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        };
        out.write_all(render(&r, colour).as_bytes())?;
    }
    Ok(())
}

/// Bytes as `wg show` prints them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `1 minute, 5 seconds ago`, shortened: `1m 5s ago`.
pub fn human_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s ago"),
        (0, _) => format!("{m}m {s}s ago"),
        _ => format!("{h}h {m}m {s}s ago"),
    }
}

/// The text `kwire status` prints.
pub fn render(r: &StatusReport, colour: bool) -> String {
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let mut o = String::new();
    o.push_str(&format!(
        "{}: {}\n",
        paint("1;32", "node"),
        paint("1", &r.node)
    ));
    o.push_str(&format!(
        "  interface: {}, listening port: {}\n",
        r.interface, r.listen_port
    ));
    if let Some(k) = &r.public_key {
        let age = r
            .key
            .age_seconds
            .map_or_else(String::new, |a| format!(" (written {})", human_age(a)));
        o.push_str(&format!("  public key: {k}{age}\n"));
    }
    if let Some(next) = &r.key.next_public_key {
        let since = r
            .key
            .rotation_age_seconds
            .map_or_else(String::new, |a| format!(", started {}", human_age(a)));
        o.push_str(&format!("  key rotation: rotating to {next}{since}\n"));
    }
    if let Some(last) = &r.key.last_outcome {
        o.push_str(&format!("  last key change: {last}\n"));
    }
    o.push_str(&format!(
        "  pod CIDRs: {}\n",
        if r.pod_cidrs.is_empty() {
            "(none yet)".into()
        } else {
            r.pod_cidrs.join(", ")
        }
    ));
    let state = if r.ready {
        paint("32", "ready")
    } else {
        paint("31", "not ready")
    };
    let api = if r.api_synced {
        "API watch healthy"
    } else {
        "API watch failing or not started"
    };
    o.push_str(&format!(
        "  state: {state}; {api}; peers connected {}/{}\n",
        r.peers_connected, r.peers_expected
    ));
    o.push_str(&format!(
        "  packets: tx {}, rx {}, local {}\n",
        r.packets.tx, r.packets.rx, r.packets.local
    ));
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| -> String {
        m.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let s = &r.services;
    if s.synced {
        o.push_str(&format!(
            "  services: {} ({} frontends, {} backends, {} without endpoints); {} flows translated, {} remembered\n",
            s.services, s.frontends, s.backends, s.frontends_without_endpoints, s.translations, s.flows
        ));
    } else {
        o.push_str("  services: no table yet (Service and EndpointSlice watches not listed)\n");
    }
    if let Some(nat) = &r.nat_detected {
        o.push_str(&format!("  behind NAT (detected): {nat}\n"));
    }
    if !r.relay.serving.is_empty() {
        o.push_str(&format!(
            "  relay for nodes behind NAT: {} ({} datagrams forwarded, {} dropped)\n",
            r.relay.serving.join(", "),
            r.relay.forwarded,
            r.relay.dropped
        ));
    }
    let drops = nonzero(&r.drops);
    if !drops.is_empty() {
        o.push_str(&format!("  drops: {drops}\n"));
    }
    let failed = nonzero(&r.state_write_failures);
    if !failed.is_empty() {
        o.push_str(&format!(
            "  state files not written (the agent's log says why; a restart may start without them): {failed}\n"
        ));
    }
    let (external, nodes): (std::collections::BTreeMap<String, u64>, _) = r
        .invalid_peers
        .clone()
        .into_iter()
        .partition(|(k, _)| k.starts_with("peer_"));
    let refused = nonzero(&nodes);
    if !refused.is_empty() {
        o.push_str(&format!("  Nodes refused as peers: {refused}\n"));
    }
    let refused = nonzero(&external);
    if !refused.is_empty() {
        o.push_str(&format!(
            "  Peers refused (kubectl get peers shows why): {refused}\n"
        ));
    }
    let all = r
        .peers
        .iter()
        .map(|p| ("peer", "33", p))
        .chain(r.external_peers.iter().map(|p| ("external peer", "35", p)));
    for (what, code, p) in all {
        o.push('\n');
        let state = match (p.up, p.unreachable) {
            (true, _) => paint("32", "up"),
            (false, true) => paint("31", "down (unreachable)"),
            (false, false) => paint("33", "down"),
        };
        o.push_str(&format!(
            "{}: {} ({state})\n",
            paint(code, what),
            paint("1", &p.node)
        ));
        match &p.relay {
            Some(relay) => o.push_str(&format!(
                "  endpoint: {} ({} through relay {relay}: both behind NAT)\n",
                p.endpoint.as_deref().unwrap_or("(none)"),
                paint("35", "relayed"),
            )),
            None => o.push_str(&format!(
                "  endpoint: {}\n",
                p.endpoint.as_deref().unwrap_or("(none)")
            )),
        }
        o.push_str(&format!("  allowed ips: {}\n", p.allowed_ips.join(", ")));
        let hs = p
            .last_handshake_age_seconds
            .map_or_else(|| "never".to_string(), human_age);
        o.push_str(&format!(
            "  latest handshake: {hs} ({} completed, {} timed out, {} rejected)\n",
            p.handshakes, p.handshakes_timeout, p.handshakes_rejected
        ));
        if p.session_local_key == "next" || p.session_peer_key == "next" {
            o.push_str(&format!(
                "  session keys: ours {}, the peer's {}\n",
                p.session_local_key, p.session_peer_key
            ));
        }
        o.push_str(&format!(
            "  transfer: {} received, {} sent",
            human_bytes(p.rx_bytes),
            human_bytes(p.tx_bytes)
        ));
        if p.tx_dropped > 0 {
            o.push_str(&format!(", {} packets waiting or dropped", p.tx_dropped));
        }
        o.push('\n');
    }
    o.push('\n');
    o.push_str(&format!("{} ({})\n", paint("36", "pods"), r.pods.len()));
    for p in &r.pods {
        let name = match (&p.namespace, &p.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => "(unnamed)".to_string(),
        };
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        o.push_str(&format!("  {name}  {}\n", ips.join(", ")));
    }
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::node_state::{Packets, PeerReport, PodReport};

    /// A peer that never handshook.
    fn peer(node: &str, key: &str, allowed: &str) -> PeerReport {
        PeerReport {
            node: node.into(),
            public_key: key.into(),
            endpoint: None,
            allowed_ips: vec![allowed.into()],
            last_handshake_age_seconds: None,
            rx_bytes: 0,
            tx_bytes: 0,
            tx_dropped: 0,
            handshakes: 0,
            handshakes_timeout: 0,
            handshakes_rejected: 0,
            handshakes_triggered: 0,
            up: false,
            unreachable: false,
            session_local_key: "current".into(),
            session_peer_key: "current".into(),
            relay: None,
        }
    }

    pub(crate) fn sample() -> StatusReport {
        StatusReport {
            node: "n1".into(),
            version: "0.1.0".into(),
            interface: "kwire0".into(),
            listen_port: 51820,
            public_key: Some("k1".into()),
            pod_cidrs: vec!["10.244.1.0/24".into()],
            synced: true,
            ready: true,
            api_synced: true,
            watch_errors: 0,
            watch_resyncs: 1,
            watch_filter: Vec::new(),
            policy_state_errors: 0,
            service_state_errors: 0,
            state_write_failures: [("peers.json", 0), ("flow-state.bin", 3)]
                .map(|(f, n)| (f.to_string(), n))
                .into_iter()
                .collect(),
            peers_expected: 2,
            peers_connected: 1,
            peers: vec![
                PeerReport {
                    endpoint: Some("192.0.2.2:51820".into()),
                    last_handshake_age_seconds: Some(65.2),
                    rx_bytes: 2048,
                    tx_bytes: 100,
                    handshakes: 1,
                    up: true,
                    unreachable: false,
                    session_local_key: "next".into(),
                    session_peer_key: "current".into(),
                    ..peer("n2", "k2", "10.244.2.0/24")
                },
                PeerReport {
                    tx_dropped: 3,
                    handshakes_timeout: 4,
                    unreachable: true,
                    session_local_key: "current".into(),
                    session_peer_key: "current".into(),
                    endpoint: Some("192.0.2.9:51821".into()),
                    relay: Some("n9".into()),
                    ..peer("n3", "k3", "10.244.3.0/24")
                },
            ],
            external_peers: vec![PeerReport {
                endpoint: Some("198.51.100.7:40000".into()),
                last_handshake_age_seconds: Some(3.0),
                rx_bytes: 10,
                tx_bytes: 20,
                handshakes: 1,
                up: true,
                ..peer("laptop", "k4", "198.51.100.7/32")
            }],
            pods: vec![PodReport {
                namespace: Some("default".into()),
                name: Some("web".into()),
                ips: vec!["10.244.1.5".parse().unwrap()],
            }],
            packets: Packets {
                tx: 1,
                rx: 2,
                local: 3,
            },
            drops: [("no_peer".to_string(), 4)].into_iter().collect(),
            invalid_peers: [
                ("duplicate_key".to_string(), 1),
                ("peer_overlaps_cluster".to_string(), 2),
            ]
            .into_iter()
            .collect(),
            services: crate::node_state::ServicesReport {
                synced: true,
                services: 2,
                frontends: 3,
                backends: 6,
                frontends_without_endpoints: 1,
                flows: 4,
                translations: 5,
            },
            conntrack: Default::default(),
            key: crate::node_state::report::KeyReport {
                age_seconds: Some(3600.0),
                rotation: "rotating".into(),
                next_public_key: Some("k1next".into()),
                rotation_age_seconds: Some(4.0),
                last_outcome: None,
                rotations_completed: 1,
                rotations_aborted: 0,
                revocations: 0,
            },
            relay: crate::node_state::report::RelayReport {
                listening: true,
                serving: vec!["n5".into(), "n6".into()],
                forwarded: 12,
                dropped: 1,
            },
            nat_detected: Some(
                "node n2 receives this node's packets from 203.0.113.5:40000".into(),
            ),
        }
    }

    #[test]
    fn renders_like_wg_show_by_node_name() {
        let t = render(&sample(), false);
        for want in [
            "node: n1",
            "peer: n2 (up)",
            "latest handshake: 1m 5s ago (1 completed, 0 timed out, 0 rejected)",
            "2.00 KiB received, 100 B sent",
            "peer: n3 (down (unreachable))",
            "latest handshake: never",
            "default/web  10.244.1.5",
            "drops: no_peer 4",
            "state files not written (the agent's log says why; a restart may start without them): flow-state.bin 3\n",
            "Nodes refused as peers: duplicate_key 1\n",
            "Peers refused (kubectl get peers shows why): peer_overlaps_cluster 2",
            "external peer: laptop (up)",
            "allowed ips: 198.51.100.7/32",
            "services: 2 (3 frontends, 6 backends, 1 without endpoints); 5 flows translated, 4 remembered",
            "public key: k1 (written 1h 0m 0s ago)",
            "key rotation: rotating to k1next, started 4s ago",
            "session keys: ours next, the peer's current",
            "endpoint: 192.0.2.9:51821 (relayed through relay n9: both behind NAT)",
            "relay for nodes behind NAT: n5, n6 (12 datagrams forwarded, 1 dropped)",
            "behind NAT (detected): node n2 receives this node's packets from 203.0.113.5:40000",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
        assert!(!t.contains('\x1b'));
        assert!(render(&sample(), true).contains("\x1b[32mup\x1b[0m"));
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = sample();
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_missing_socket_says_what_to_do() {
        let dir = std::env::temp_dir().join(format!("kwire-status-none-{}", std::process::id()));
        let e = fetch(&dir).unwrap_err().to_string();
        assert!(
            e.contains("no kwire agent at") && e.contains("is the DaemonSet running on this node?"),
            "{e}"
        );
    }
}
