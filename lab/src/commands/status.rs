//! `kwire-lab status`: each node's addresses and pod CIDRs (from the API stand-in), its agent
//! (from the supervisor) and its WireGuard peers with their handshakes (the WireGuard
//! userspace API's `get`, on the node's socket, what `wg show IF dump` asks), as a table or as
//! JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::Value;

use crate::cluster::client;
use crate::cluster::state::{LabDescription, LabPaths, Runtime};
use crate::cluster::topology;

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
fn api_services(lab: &str, runtime: Option<&Runtime>) -> Result<Vec<ServiceStatus>, String> {
    let url = runtime
        .map(|r| r.api_url.as_str())
        .ok_or("the supervisor has not published the API address yet")?;
    let api = client::ApiAccess::new(url, &crate::cluster::state::lab_dir(lab))
        .map_err(|e| e.to_string())?;
    let services = client::get(&api, "/api/v1/services").map_err(|e| e.to_string())?;
    let slices =
        client::get(&api, "/apis/discovery.k8s.io/v1/endpointslices").map_err(|e| e.to_string())?;
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
    /// The node's own filesystem (its hostPaths are under it).
    pub root: PathBuf,
    /// The agent's `/var/lib/kwire` and `/run/kwire` (hostPaths).
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The agent's WireGuard userspace API socket (`/var/run/wireguard/IF.sock` on the node).
    pub uapi_socket: PathBuf,
    /// The node's `/opt/cni/bin` (where the DaemonSet's init container put the plugin).
    pub cni_bin_dir: PathBuf,
    /// The configuration list the lab's runtime uses for this node (node paths made host
    /// paths): `NETCONFPATH` for cnitool.
    pub cni_net_d: PathBuf,
    pub log: PathBuf,
    /// In the API (false: deleted from it, or not registered yet).
    pub registered: bool,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub agent_pid: Option<u32>,
    pub agent_restarts: u32,
    pub agent_last_exit: Option<String>,
    /// Why the userspace API could not be read, if it could not (agent not up).
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

/// One peer of the WireGuard userspace API's `get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpPeer {
    /// Base64, as Node annotations and `wg` show it.
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds, 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u64,
}

fn hex_key_to_base64(hex: &str) -> Result<String, String> {
    use base64::Engine as _;
    if hex.len() != 64 {
        return Err(format!("key {hex:?} is not 32 bytes of hex"));
    }
    let bytes: Result<Vec<u8>, _> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect();
    let bytes = bytes.map_err(|e| format!("key {hex:?}: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Parses the answer to the userspace API's `get=1` (the cross-platform protocol wg and
/// wireguard-go speak): `errno=0` last, peers from each `public_key=` on.
pub fn parse_uapi_get(text: &str) -> Result<Vec<DumpPeer>, String> {
    let mut peers: Vec<DumpPeer> = Vec::new();
    let mut errno = None;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("bad line {line:?}"))?;
        let num = || v.parse::<u64>().map_err(|e| format!("{line:?}: {e}"));
        match (k, peers.last_mut()) {
            ("public_key", _) => peers.push(DumpPeer {
                public_key: hex_key_to_base64(v)?,
                endpoint: None,
                allowed_ips: Vec::new(),
                latest_handshake: 0,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: 0,
            }),
            ("persistent_keepalive_interval", Some(p)) => p.persistent_keepalive = num()?,
            ("endpoint", Some(p)) => p.endpoint = Some(v.to_string()),
            ("allowed_ip", Some(p)) => p.allowed_ips.push(v.to_string()),
            ("last_handshake_time_sec", Some(p)) => p.latest_handshake = num()?,
            ("rx_bytes", Some(p)) => p.rx_bytes = num()?,
            ("tx_bytes", Some(p)) => p.tx_bytes = num()?,
            ("errno", _) => errno = Some(num()?),
            _ => {}
        }
    }
    match errno {
        Some(0) => Ok(peers),
        Some(e) => Err(format!("the userspace API answered errno={e}")),
        None => Err("the userspace API's answer has no errno line".into()),
    }
}

/// Asks the userspace API socket at `path` for the device's state.
pub fn uapi_get(path: &std::path::Path) -> Result<Vec<DumpPeer>, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok();
    s.write_all(b"get=1\n\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.ends_with("\n\n") {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    parse_uapi_get(&text)
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

fn api_nodes(lab: &str, runtime: Option<&Runtime>) -> Result<BTreeMap<String, ApiNode>, String> {
    let url = runtime
        .map(|r| r.api_url.as_str())
        .ok_or("the supervisor has not published the API address yet")?;
    let api = client::ApiAccess::new(url, &crate::cluster::state::lab_dir(lab))
        .map_err(|e| e.to_string())?;
    let list = client::get(&api, "/api/v1/nodes").map_err(|e| e.to_string())?;
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
    let (api, api_error) = match api_nodes(&lab.name, runtime) {
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
            let (wg_error, dump_peers) = match uapi_get(&node.uapi_socket()) {
                Ok(peers) => (None, peers),
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
                root: node.root.clone(),
                state_dir: node.state_dir.clone(),
                run_dir: node.run_dir.clone(),
                uapi_socket: node.uapi_socket(),
                cni_bin_dir: crate::pods::kubelet::node_cni_bin(node),
                cni_net_d: paths.node_dir(&node.name).join("net.d"),
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
    let pods = match crate::cluster::naming::LabNames::new(&lab.name) {
        Ok(names) if api_error.is_none() => {
            crate::pods::list_pods(&names, runtime).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let services = if api_error.is_none() {
        api_services(&lab.name, runtime).unwrap_or_default()
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
    fn parses_the_userspace_api_answer() {
        let key = "11".repeat(32);
        let text = format!(
            "private_key={}\nlisten_port=51820\npublic_key={key}\nendpoint=192.0.2.2:51820\nallowed_ip=10.244.1.0/24\nallowed_ip=fd00:10:244:1::/64\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=100\ntx_bytes=200\npersistent_keepalive_interval=0\npublic_key={}\nerrno=0\n\n",
            "22".repeat(32),
            "33".repeat(32)
        );
        let peers = parse_uapi_get(&text).unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(
            peers[0].public_key,
            "ERERERERERERERERERERERERERERERERERERERERERE="
        );
        assert_eq!(peers[0].endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
        assert_eq!(
            (
                peers[0].latest_handshake,
                peers[0].rx_bytes,
                peers[0].tx_bytes
            ),
            (1_700_000_000, 100, 200)
        );
        assert_eq!(peers[1].endpoint, None);
        assert!(parse_uapi_get("errno=2\n\n").is_err());
        assert!(parse_uapi_get("public_key=zz\nerrno=0\n").is_err());
    }

    #[test]
    fn gateways_are_first_addresses() {
        let g = gateway_ips(&["10.244.3.0/24".into(), "fd00:10:244:3::/64".into()]);
        assert_eq!(g, vec!["10.244.3.1", "fd00:10:244:3::1"]);
    }
}
