//! `kwire peer config NAME`: the wg-quick configuration for the far side of a `Peer` (an
//! operator's laptop, an edge box), from the cluster: its own addresses, and every node as a
//! WireGuard peer with the node's public key, endpoint and pod CIDRs. kwire never holds the
//! peer's private key: the `PrivateKey` line is a placeholder for the user to fill in (and the
//! `PresharedKey` line, when the Peer names a Secret).
//!
//! The Service ranges go to exactly one node, the peer's **entry node**: a WireGuard peer
//! routes each prefix to one of its peers, and the node that receives a Peer's packet for a
//! ClusterIP is the one that translates it (masqueraded to its own pod-network address, so
//! that the backend's replies come back through it; `datapath::service::from_peer`). It is
//! `--entry-node`, else the first node by name that is not behind NAT and publishes the
//! ranges it serves (`kwire.dev/service-cidr`), else the first by name that publishes them.

use crate::agent::external::{self, PeerObject};
use crate::agent::peers::NodeInfo;
use crate::wg::allowed_ips::canonical;
use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, ListParams};
use kwire_proto::key::PublicKey;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The WireGuard port a Node without `kwire.dev/endpoint` listens on (the agent's default).
pub const DEFAULT_PORT: u16 = 51820;
/// What the `PrivateKey` line says until the user fills it in.
pub const PRIVATE_KEY_PLACEHOLDER: &str =
    "<fill in: the private key whose `wg pubkey` is this Peer's spec.publicKey>";

#[derive(Subcommand)]
pub enum PeerCommand {
    /// Print the wg-quick configuration for a Peer's side: its address, and every node as a
    /// WireGuard peer (public key, endpoint, pod CIDRs). Fill in the PrivateKey line, then
    /// `wg-quick up ./kwire.conf`.
    Config(ConfigArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The wg-quick configuration file.
    Conf,
    /// The same as a QR code in the terminal (for the WireGuard mobile apps); fill in the
    /// private key in the app afterwards.
    Qr,
}

#[derive(Args)]
pub struct ConfigArgs {
    /// The Peer's name (`kubectl get peers`).
    pub name: String,
    /// Kubeconfig to use; default: in-cluster, else $KUBECONFIG, else ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value = "conf")]
    pub output: Output,
    /// The node whose [Peer] section carries the Service ranges (the ClusterIPs): the
    /// peer's Service flows enter the cluster there. Default: the first node by name that
    /// is not behind NAT and serves them (`kwire.dev/service-cidr`).
    #[arg(long, value_name = "NODE")]
    pub entry_node: Option<String>,
}

/// A node as the far side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePeer {
    pub name: String,
    pub public_key: String,
    pub endpoint: SocketAddr,
    pub pod_cidrs: Vec<IpNetwork>,
}

/// The node as a peer, or why it cannot be one (a comment in the configuration).
pub fn node_peer(n: &NodeInfo) -> Result<NodePeer, String> {
    let key = n
        .public_key
        .as_deref()
        .ok_or("no kwire.dev/public-key yet (is its agent running?)")?;
    PublicKey::from_base64(key).map_err(|_| "kwire.dev/public-key is not a valid key")?;
    let endpoint = match n.endpoint.as_deref() {
        Some(e) => e
            .parse::<SocketAddr>()
            .map_err(|_| format!("kwire.dev/endpoint {e:?} is not IP:port"))?,
        None => SocketAddr::new(
            *n.internal_ips
                .first()
                .ok_or("no endpoint and no InternalIP")?,
            DEFAULT_PORT,
        ),
    };
    let pod_cidrs = n.parsed_pod_cidrs();
    if pod_cidrs.is_empty() {
        return Err("no podCIDRs yet".into());
    }
    Ok(NodePeer {
        name: n.name.clone(),
        public_key: key.to_string(),
        endpoint,
        pod_cidrs,
    })
}

/// The Service ranges a node serves to external peers (`kwire.dev/service-cidr`; invalid
/// entries left out).
fn service_ranges(n: &NodeInfo) -> Vec<IpNetwork> {
    n.service_cidr
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .map(canonical)
        .collect()
}

/// The peer's entry node (see the module's comment): `wanted` if it can be one, else the
/// first by name not behind NAT that serves Service ranges, else the first that serves
/// them; `Ok(None)`: no node serves them (the configuration leaves them out).
pub fn entry_node<'a>(
    nodes: &'a [NodeInfo],
    wanted: Option<&str>,
) -> anyhow::Result<Option<&'a NodeInfo>> {
    let serving = |n: &&NodeInfo| node_peer(n).is_ok() && !service_ranges(n).is_empty();
    if let Some(name) = wanted {
        let n = nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow::anyhow!("--entry-node {name}: no such Node"))?;
        if let Err(why) = node_peer(n) {
            anyhow::bail!("--entry-node {name} cannot be a peer: {why}");
        }
        anyhow::ensure!(
            serving(&n),
            "--entry-node {name} publishes no kwire.dev/service-cidr (its agent runs without --service-cidr, or predates Services for Peers): pick another node"
        );
        return Ok(Some(n));
    }
    let mut sorted: Vec<&NodeInfo> = nodes.iter().filter(serving).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(sorted
        .iter()
        .find(|n| !n.behind_nat)
        .or(sorted.first())
        .copied())
}

/// The wg-quick configuration for `peer` with these nodes, the Service ranges on `entry`
/// (see [`entry_node`]).
pub fn render(
    peer: &PeerObject,
    nodes: &[NodeInfo],
    entry: Option<&NodeInfo>,
) -> anyhow::Result<String> {
    let addresses: Vec<IpNetwork> = peer.spec["allowedIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .map(canonical)
        .collect();
    anyhow::ensure!(
        !addresses.is_empty(),
        "Peer {} has no usable spec.allowedIPs: set its own address, e.g. 10.250.0.2/32",
        peer.name
    );
    let keepalive = peer.spec["persistentKeepalive"].as_u64().unwrap_or(0);
    let join = |v: &[IpNetwork]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# kwire: the far side of Peer {} (kwire peer config {})",
        peer.name, peer.name
    );
    o.push_str("[Interface]\n");
    let _ = writeln!(o, "Address = {}", join(&addresses));
    let _ = writeln!(o, "PrivateKey = {PRIVATE_KEY_PLACEHOLDER}");
    if let Some(port) = peer.spec["endpoint"].as_str().and_then(|e| {
        e.parse::<SocketAddr>()
            .ok()
            .map(|a| a.port())
            .or_else(|| external::host_port(e).map(|(_, p)| p))
    }) {
        let _ = writeln!(o, "ListenPort = {port}");
    }
    match entry {
        Some(e) => {
            let _ = writeln!(
                o,
                "# Services (ClusterIPs) through node {}: it translates them for this peer",
                e.name
            );
        }
        None => o.push_str(
            "# Services left out: no node publishes kwire.dev/service-cidr (agents without --service-cidr)\n",
        ),
    }
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut count = 0;
    for n in sorted {
        match node_peer(n) {
            Ok(p) => {
                count += 1;
                let _ = writeln!(o, "\n# node {}", p.name);
                o.push_str("[Peer]\n");
                let _ = writeln!(o, "PublicKey = {}", p.public_key);
                if let Some(secret) = peer.psk_secret() {
                    let _ = writeln!(
                        o,
                        "PresharedKey = <fill in: Secret {}/{secret}, key {}>",
                        external::PSK_NAMESPACE,
                        external::PSK_DATA_KEY
                    );
                }
                let _ = writeln!(o, "Endpoint = {}", p.endpoint);
                let mut allowed = p.pod_cidrs.clone();
                if entry.is_some_and(|e| e.name == n.name) {
                    allowed.extend(service_ranges(n));
                }
                let _ = writeln!(o, "AllowedIPs = {}", join(&allowed));
                if keepalive > 0 {
                    let _ = writeln!(o, "PersistentKeepalive = {keepalive}");
                }
            }
            Err(why) => {
                let _ = writeln!(o, "\n# node {} left out: {why}", n.name);
            }
        }
    }
    anyhow::ensure!(
        count > 0,
        "no node is ready to be a peer (none has a kwire.dev/public-key and podCIDRs): is kwire running in this cluster?"
    );
    Ok(o)
}

/// The configuration as a QR code of Unicode half blocks (two modules per character cell).
pub fn qr(text: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).context(
        "the configuration is too long for a QR code (too many nodes?): use --output conf",
    )?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

pub fn run(cmd: PeerCommand) -> anyhow::Result<()> {
    let PeerCommand::Config(args) = cmd;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(async {
        let client = crate::kubeapi::client(args.kubeconfig.as_deref()).await?;
        let peers: Api<DynamicObject> = Api::all_with(client.clone(), &external::api_resource());
        let object = peers.get(&args.name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 && s.message.contains("could not find the requested resource") => anyhow::anyhow!(
                "this cluster serves no Peers: apply deploy/peer-crd.yaml first"
            ),
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "no Peer {:?} (kubectl get peers lists them)",
                args.name
            ),
            e => anyhow::Error::new(e).context(format!("reading Peer {}", args.name)),
        })?;
        let peer = PeerObject::from_dynamic(&object)
            .ok_or_else(|| anyhow::anyhow!("Peer {} has no name", args.name))?;
        match &peer.accepted {
            Some(c) if c.status == "False" => anyhow::bail!(
                "Peer {} is refused by the kwire agents ({}): {}; fix its spec first",
                peer.name,
                c.reason,
                c.message
            ),
            Some(_) => {}
            None => eprintln!(
                "kwire: Peer {} has no Accepted condition yet (no agent has judged it); the configuration may not work",
                peer.name
            ),
        }
        let nodes: Api<Node> = Api::all(client);
        let list = nodes
            .list(&ListParams::default())
            .await
            .context("listing Nodes")?;
        let infos: Vec<NodeInfo> = list.items.iter().map(NodeInfo::from_node).collect();
        let entry = entry_node(&infos, args.entry_node.as_deref())?;
        render(&peer, &infos, entry)
    })?;
    match args.output {
        Output::Conf => print!("{text}"),
        Output::Qr => print!("{}", qr(&text)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, key: Option<u8>, cidr: &str, ip: &str, ep: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            public_key: key.map(|k| PublicKey([k; 32]).to_base64()),
            endpoint: ep.map(str::to_string),
            pod_cidrs: vec![cidr.into()],
            internal_ips: vec![ip.parse().unwrap()],
            ..NodeInfo::default()
        }
    }

    #[test]
    fn one_peer_section_per_ready_node() {
        let peer = PeerObject {
            name: "laptop".into(),
            spec: json!({"publicKey": PublicKey([7; 32]).to_base64(), "allowedIPs": ["198.51.100.7/32"], "persistentKeepalive": 25}),
            ..PeerObject::default()
        };
        let nodes = [
            node(
                "n2",
                Some(2),
                "10.244.2.0/24",
                "192.0.2.2",
                Some("203.0.113.2:51999"),
            ),
            node("n1", Some(1), "10.244.1.0/24", "192.0.2.1", None),
            node("n3", None, "10.244.3.0/24", "192.0.2.3", None),
        ];
        let c = render(&peer, &nodes, None).unwrap();
        let n1 = c.find("# node n1\n").unwrap();
        let n2 = c.find("# node n2\n").unwrap();
        assert!(n1 < n2, "{c}");
        for want in [
            "[Interface]\nAddress = 198.51.100.7/32\nPrivateKey = <fill in",
            &format!(
                "[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.244.1.0/24\nPersistentKeepalive = 25\n",
                PublicKey([1; 32]).to_base64()
            ),
            "Endpoint = 203.0.113.2:51999\nAllowedIPs = 10.244.2.0/24",
            "# node n3 left out: no kwire.dev/public-key yet",
        ] {
            assert!(c.contains(want), "{want:?} missing from:\n{c}");
        }
        assert_eq!(c.matches("[Peer]").count(), 2);
        assert!(!c.contains("PresharedKey"));
        let q = qr(&c).unwrap();
        assert!(q.lines().count() > 20 && q.contains('█'), "{q}");
        assert!(render(&peer, &nodes[2..], None).is_err());
        assert!(c.contains("# Services left out: no node publishes kwire.dev/service-cidr"));
        assert_eq!(entry_node(&nodes, None).unwrap(), None);
    }

    #[test]
    fn the_service_ranges_go_to_one_entry_node() {
        let peer = PeerObject {
            name: "laptop".into(),
            spec: json!({"publicKey": PublicKey([7; 32]).to_base64(), "allowedIPs": ["198.51.100.7/32"]}),
            ..PeerObject::default()
        };
        let mut nodes = [
            node("n2", Some(2), "10.244.2.0/24", "192.0.2.2", None),
            node("n1", Some(1), "10.244.1.0/24", "192.0.2.1", None),
            node("n3", Some(3), "10.244.3.0/24", "192.0.2.3", None),
            node("n0", None, "10.244.4.0/24", "192.0.2.4", None),
        ];
        for n in &mut nodes {
            n.service_cidr = Some("10.96.0.0/12, fd00:10:96::/108,junk".into());
        }
        // The first by name that can be a peer and is not behind NAT.
        nodes[1].behind_nat = true;
        let e = entry_node(&nodes, None).unwrap().unwrap();
        assert_eq!(e.name, "n2");
        let c = render(&peer, &nodes, Some(e)).unwrap();
        assert!(
            c.contains("Endpoint = 192.0.2.2:51820\nAllowedIPs = 10.244.2.0/24, 10.96.0.0/12, fd00:10:96::/108\n"),
            "{c}"
        );
        assert_eq!(c.matches("10.96.0.0/12").count(), 1, "{c}");
        assert!(c.contains("# Services (ClusterIPs) through node n2"), "{c}");
        // All behind NAT: the first by name all the same.
        for n in &mut nodes {
            n.behind_nat = true;
        }
        assert_eq!(entry_node(&nodes, None).unwrap().unwrap().name, "n1");
        // Chosen by the user; refused when it cannot serve.
        assert_eq!(entry_node(&nodes, Some("n3")).unwrap().unwrap().name, "n3");
        let err = |n: &str, nodes: &[NodeInfo]| entry_node(nodes, Some(n)).unwrap_err().to_string();
        assert!(err("n9", &nodes).contains("no such Node"));
        assert!(err("n0", &nodes).contains("cannot be a peer"));
        nodes[2].service_cidr = None;
        assert!(err("n3", &nodes).contains("publishes no kwire.dev/service-cidr"));
    }
}
