//! `kwire-lab status`: each node's addresses and pod CIDRs (from the API stand-in), its agent
//! (from the supervisor) and its WireGuard peers with their handshakes (`wg show IF dump` in
//! the node's namespace), as a table or as JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::Value;

use super::client;
use super::state::{LabDescription, LabPaths, Runtime};
use super::topology;

/// The annotation an agent publishes its WireGuard public key in (DESIGN.md, Control plane).
pub const PUBLIC_KEY_ANNOTATION: &str = "kwire.dev/public-key";
/// The annotation an agent publishes its endpoint in.
pub const ENDPOINT_ANNOTATION: &str = "kwire.dev/endpoint";

#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub underlay_netns: String,
    pub bridge: String,
    pub supervisor_pid: Option<u32>,
    pub supervisor_running: bool,
    pub api_url: Option<String>,
    pub kubeconfig: PathBuf,
    /// Why the API could not be read, if it could not.
    pub api_error: Option<String>,
    pub nodes: Vec<NodeStatus>,
    /// Every Pod in the API, with its node, network namespace and IPs.
    pub pods: Vec<crate::pods::PodStatus>,
    /// Every Service in the API, with its addresses and ready endpoints.
    pub services: Vec<ServiceStatus>,
}

/// A Service as `status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub cluster_ips: Vec<String>,
    /// `PORT/PROTOCOL` of each port.
    pub ports: Vec<String>,
    /// The node ports (NodePort and LoadBalancer Services).
    pub node_ports: Vec<u16>,
    /// Ready endpoints from its EndpointSlices, `ADDRESS:PORT` for the first port.
    pub endpoints: Vec<String>,
}

/// The Services and their ready endpoints, from the API.
fn api_services(runtime: Option<&Runtime>) -> Result<Vec<ServiceStatus>, String> {
    let url = runtime
        .map(|r| r.api_url.as_str())
        .ok_or("the supervisor has not published the API address yet")?;
    let addr = client::addr_of_url(url).ok_or_else(|| format!("bad API url {url:?}"))?;
    let services = client::get(addr, "/api/v1/services").map_err(|e| e.to_string())?;
    let slices =
        client::get(addr, "/apis/discovery.k8s.io/v1/endpointslices").map_err(|e| e.to_string())?;
    let text = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut out = Vec::new();
    for svc in services["items"].as_array().into_iter().flatten() {
        let (ns, name) = (
            text(svc, "/metadata/namespace"),
            text(svc, "/metadata/name"),
        );
        let ports: Vec<&Value> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        let mut endpoints = Vec::new();
        for sl in slices["items"].as_array().into_iter().flatten() {
            if text(sl, "/metadata/namespace") != ns
                || sl.pointer("/metadata/labels/kubernetes.io~1service-name")
                    != Some(&Value::String(name.clone()))
            {
                continue;
            }
            let port = sl.pointer("/ports/0/port").and_then(Value::as_u64);
            for ep in sl["endpoints"].as_array().into_iter().flatten() {
                if ep.pointer("/conditions/ready") == Some(&Value::Bool(false)) {
                    continue;
                }
                for a in ep["addresses"].as_array().into_iter().flatten() {
                    let a = a.as_str().unwrap_or_default();
                    endpoints.push(match (port, a.contains(':')) {
                        (Some(p), true) => format!("[{a}]:{p}"),
                        (Some(p), false) => format!("{a}:{p}"),
                        (None, _) => a.to_string(),
                    });
                }
            }
        }
        endpoints.sort();
        out.push(ServiceStatus {
            namespace: ns,
            name,
            type_: svc
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_string(),
            cluster_ips: svc
                .pointer("/spec/clusterIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            ports: ports
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.get("port").and_then(Value::as_u64).unwrap_or(0),
                        p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                    )
                })
                .collect(),
            node_ports: ports
                .iter()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                .filter_map(|p| u16::try_from(p).ok())
                .collect(),
            endpoints,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    pub underlay_ipv6: String,
    pub interface: String,
    pub pod_cidrs: Vec<String>,
    pub gateway_ips: Vec<String>,
    pub metrics_url: String,
    /// Where the node's agent serves the CNI plugin (`<run dir>/cni.sock`).
    pub cni_socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// In the API (false: deleted from it, or not registered yet).
    pub registered: bool,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub agent_pid: Option<u32>,
    pub agent_restarts: u32,
    pub agent_last_exit: Option<String>,
    /// Why `wg show` failed, if it did (agent not up, no such interface).
    pub wg_error: Option<String>,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// The Node whose published key this peer has (None: a key no Node publishes).
    pub node: Option<String>,
    pub public_key: Option<String>,
    /// The peer is configured on this node's interface.
    pub configured: bool,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub handshake: bool,
    pub latest_handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One peer line of `wg show IF dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds, 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Parses `wg show IF dump`: the interface line (private key, public key, port, fwmark), then
/// per peer: public key, preshared key, endpoint, allowed ips, latest handshake, rx, tx,
/// keepalive. Returns the interface's public key and the peers.
pub fn parse_wg_dump(text: &str) -> Result<(Option<String>, Vec<DumpPeer>), String> {
    let none = |s: &str| (s != "(none)" && s != "off" && !s.is_empty()).then(|| s.to_string());
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or("empty `wg show dump` output")?;
    let f: Vec<&str> = first.split('\t').collect();
    if f.len() != 4 {
        return Err(format!("interface line has {} fields, want 4", f.len()));
    }
    let mut peers = Vec::new();
    for line in lines {
        let p: Vec<&str> = line.split('\t').collect();
        if p.len() != 8 {
            return Err(format!(
                "peer line has {} fields, want 8: {line:?}",
                p.len()
            ));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
        peers.push(DumpPeer {
            public_key: p[0].to_string(),
            endpoint: none(p[2]),
            allowed_ips: none(p[3])
                .map(|a| a.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
            latest_handshake: num(p[4])?,
            rx_bytes: num(p[5])?,
            tx_bytes: num(p[6])?,
        });
    }
    Ok((none(f[1]), peers))
}

/// The first address of each CIDR: the node's gateway in its pod range.
pub fn gateway_ips(pod_cidrs: &[String]) -> Vec<String> {
    pod_cidrs
        .iter()
        .filter_map(|c| c.parse::<IpNetwork>().ok())
        .map(|n| match n.network() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()).to_string(),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()).to_string(),
        })
        .collect()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the API says about one Node.
struct ApiNode {
    pod_cidrs: Vec<String>,
    public_key: Option<String>,
    endpoint: Option<String>,
}

fn api_nodes(runtime: Option<&Runtime>) -> Result<BTreeMap<String, ApiNode>, String> {
    let url = runtime
        .map(|r| r.api_url.as_str())
        .ok_or("the supervisor has not published the API address yet")?;
    let addr = client::addr_of_url(url).ok_or_else(|| format!("bad API url {url:?}"))?;
    let list = client::get(addr, "/api/v1/nodes").map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let Some(name) = item.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let annotation = |k: &str| {
            item.pointer("/metadata/annotations")
                .and_then(|a| a.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        out.insert(
            name.to_string(),
            ApiNode {
                pod_cidrs: strings(item.pointer("/spec/podCIDRs")),
                public_key: annotation(PUBLIC_KEY_ANNOTATION),
                endpoint: annotation(ENDPOINT_ANNOTATION),
            },
        );
    }
    Ok(out)
}

/// Gathers the status of a lab.
pub fn collect(lab: &LabDescription, runtime: Option<&Runtime>) -> LabStatus {
    let paths = LabPaths::new(&lab.name);
    let supervisor_running = runtime.is_some_and(|r| topology::pid_alive(r.supervisor_pid));
    let (api, api_error) = match api_nodes(runtime) {
        Ok(a) => (a, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    let by_key: BTreeMap<&str, &str> = api
        .iter()
        .filter_map(|(n, a)| Some((a.public_key.as_deref()?, n.as_str())))
        .collect();
    let now = now_unix();
    let nodes = lab
        .nodes
        .iter()
        .map(|node| {
            let from_api = api.get(&node.name);
            let pod_cidrs = from_api.map(|a| a.pod_cidrs.clone()).unwrap_or_default();
            let agent = runtime.and_then(|r| r.agents.get(&node.name));
            let dump = topology::run(&[
                "ip",
                "netns",
                "exec",
                &node.netns,
                "wg",
                "show",
                &node.tun_if,
                "dump",
            ])
            .map_err(|e| e.to_string())
            .and_then(|t| parse_wg_dump(&t));
            let (wg_error, dump_peers) = match dump {
                Ok((_, peers)) => (None, peers),
                Err(e) => (Some(e), Vec::new()),
            };
            let mut peers: Vec<PeerStatus> = dump_peers
                .iter()
                .map(|p| PeerStatus {
                    node: by_key.get(p.public_key.as_str()).map(|n| n.to_string()),
                    public_key: Some(p.public_key.clone()),
                    configured: true,
                    endpoint: p.endpoint.clone(),
                    allowed_ips: p.allowed_ips.clone(),
                    handshake: p.latest_handshake != 0,
                    latest_handshake_age_secs: (p.latest_handshake != 0)
                        .then(|| now.saturating_sub(p.latest_handshake)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect();
            // Nodes in the API that this node should peer with but does not (yet).
            for (other, a) in &api {
                if *other == node.name || peers.iter().any(|p| p.node.as_deref() == Some(other)) {
                    continue;
                }
                peers.push(PeerStatus {
                    node: Some(other.clone()),
                    public_key: a.public_key.clone(),
                    configured: false,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    handshake: false,
                    latest_handshake_age_secs: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            peers.sort_by(|a, b| a.node.cmp(&b.node));
            NodeStatus {
                name: node.name.clone(),
                netns: node.netns.clone(),
                underlay_ip: node.underlay_ipv4.to_string(),
                underlay_ipv6: node.underlay_ipv6.to_string(),
                interface: node.tun_if.clone(),
                gateway_ips: gateway_ips(&pod_cidrs),
                pod_cidrs,
                metrics_url: node.metrics_url.clone(),
                cni_socket: crate::pods::kubelet::cni_socket(node),
                state_dir: node.state_dir.clone(),
                log: node.log.clone(),
                registered: from_api.is_some(),
                public_key: from_api.and_then(|a| a.public_key.clone()),
                endpoint: from_api.and_then(|a| a.endpoint.clone()),
                agent_pid: agent.and_then(|a| a.pid),
                agent_restarts: agent.map(|a| a.restarts).unwrap_or(0),
                agent_last_exit: agent.and_then(|a| a.last_exit.clone()),
                wg_error,
                peers,
            }
        })
        .collect();
    let pods = match super::naming::LabNames::new(&lab.name) {
        Ok(names) if api_error.is_none() => {
            crate::pods::list_pods(&names, runtime).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let services = if api_error.is_none() {
        api_services(runtime).unwrap_or_default()
    } else {
        Vec::new()
    };
    LabStatus {
        pods,
        services,
        name: lab.name.clone(),
        underlay_netns: lab.underlay_netns.clone(),
        bridge: lab.bridge.clone(),
        supervisor_pid: runtime.map(|r| r.supervisor_pid),
        supervisor_running,
        api_url: runtime.map(|r| r.api_url.clone()),
        kubeconfig: paths.kubeconfig(),
        api_error,
        nodes,
    }
}

impl LabStatus {
    /// (handshakes, wanted): each registered node with each other registered node.
    pub fn handshakes(&self) -> (usize, usize) {
        let registered: Vec<&NodeStatus> = self.nodes.iter().filter(|n| n.registered).collect();
        let wanted = registered.len() * registered.len().saturating_sub(1);
        let done = registered
            .iter()
            .map(|n| {
                n.peers
                    .iter()
                    .filter(|p| {
                        p.handshake
                            && p.node.as_deref().is_some_and(|o| {
                                o != n.name && registered.iter().any(|r| r.name == o)
                            })
                    })
                    .count()
            })
            .sum();
        (done, wanted)
    }

    /// The table `kwire-lab status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let sup = match (self.supervisor_pid, self.supervisor_running) {
            (Some(p), true) => format!("supervisor pid {p}"),
            (Some(p), false) => format!(
                "supervisor pid {p} NOT RUNNING (run `kwire-lab down --name {}`)",
                self.name
            ),
            (None, _) => "supervisor not running".to_string(),
        };
        out.push_str(&format!(
            "lab {}: {} nodes, {sup}, API {}\n",
            self.name,
            self.nodes.len(),
            self.api_url.as_deref().unwrap_or("-")
        ));
        if let Some(e) = &self.api_error {
            out.push_str(&format!("API not readable: {e}\n"));
        }
        let (done, wanted) = self.handshakes();
        out.push_str(&format!("mesh: {done}/{wanted} handshakes\n\n"));
        out.push_str(&format!(
            "{:<16} {:<12} {:<34} {:<8} {}\n",
            "NODE", "UNDERLAY", "POD CIDRS", "AGENT", "PEERS (handshake age)"
        ));
        for n in &self.nodes {
            let agent = match n.agent_pid {
                Some(p) if n.agent_restarts > 0 => format!("{p}(r{})", n.agent_restarts),
                Some(p) => p.to_string(),
                None => "down".to_string(),
            };
            let peers = if n.peers.is_empty() {
                n.wg_error
                    .as_ref()
                    .map(|_| "(no wg interface)".to_string())
                    .unwrap_or_else(|| "-".to_string())
            } else {
                n.peers
                    .iter()
                    .map(|p| {
                        let who = p.node.clone().unwrap_or_else(|| {
                            p.public_key
                                .clone()
                                .unwrap_or_default()
                                .chars()
                                .take(8)
                                .collect()
                        });
                        match p.latest_handshake_age_secs {
                            Some(age) if p.handshake => format!("{who}:yes({age}s)"),
                            _ => format!("{who}:no"),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let name = if n.registered {
                n.name.clone()
            } else {
                format!("{}*", n.name)
            };
            out.push_str(&format!(
                "{:<16} {:<12} {:<34} {:<8} {}\n",
                name,
                n.underlay_ip,
                n.pod_cidrs.join(","),
                agent,
                peers
            ));
        }
        if self.nodes.iter().any(|n| !n.registered) {
            out.push_str("* not in the API\n");
        }
        if !self.pods.is_empty() {
            out.push_str(&format!(
                "\n{:<28} {:<16} {:<10} {:<20} {}\n",
                "POD", "NODE", "PHASE", "NETNS", "IPS"
            ));
            for p in &self.pods {
                out.push_str(&format!(
                    "{:<28} {:<16} {:<10} {:<20} {}\n",
                    p.key(),
                    p.node.as_deref().unwrap_or("-"),
                    p.phase.as_deref().unwrap_or("-"),
                    p.netns.as_deref().unwrap_or("-"),
                    if p.ips.is_empty() {
                        p.message.clone().unwrap_or_default()
                    } else {
                        p.ips.join(",")
                    }
                ));
            }
        }
        if !self.services.is_empty() {
            out.push_str(&format!(
                "\n{:<28} {:<10} {:<16} {:<16} {}\n",
                "SERVICE", "TYPE", "CLUSTER-IPS", "PORTS", "ENDPOINTS"
            ));
            for s in &self.services {
                out.push_str(&format!(
                    "{:<28} {:<10} {:<16} {:<16} {}\n",
                    format!("{}/{}", s.namespace, s.name),
                    s.type_,
                    s.cluster_ips.join(","),
                    s.ports.join(","),
                    if s.endpoints.is_empty() {
                        "(none ready)".to_string()
                    } else {
                        s.endpoints.join(",")
                    }
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wg_dump() {
        let text = "cHJpdg==\tcHVi\t51820\toff\n\
                    a2V5MQ==\t(none)\t192.0.2.2:51820\t10.244.1.0/24,fd00:10:244:1::/64\t1700000000\t100\t200\toff\n\
                    a2V5Mg==\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let (key, peers) = parse_wg_dump(text).unwrap();
        assert_eq!(key.as_deref(), Some("cHVi"));
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
        assert_eq!(peers[0].latest_handshake, 1_700_000_000);
        assert_eq!(peers[1].endpoint, None);
        assert!(peers[1].allowed_ips.is_empty());
        assert!(parse_wg_dump("").is_err());
        assert!(parse_wg_dump("a\tb\n").is_err());
    }

    #[test]
    fn gateways_are_first_addresses() {
        let g = gateway_ips(&["10.244.3.0/24".into(), "fd00:10:244:3::/64".into()]);
        assert_eq!(g, vec!["10.244.3.1", "fd00:10:244:3::1"]);
    }
}
