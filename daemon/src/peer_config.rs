//! `kwire peer config NAME`: the wg-quick configuration for the far side of a `Peer` (an
//! operator's laptop, an edge box), from the cluster: its own addresses, and every node as a
//! WireGuard peer with the node's public key, endpoint and pod CIDRs. kwire never holds the
//! peer's private key: the `PrivateKey` line is a placeholder for the user to fill in (and the
//! `PresharedKey` line, when the Peer names a Secret).
//!
//! The Service range is not in the allowed IPs: a ClusterIP is translated in the packet loop of
//! the sending pod's node, and packets arriving over WireGuard from an external peer are not
//! translated yet (README.md, "Peers outside the cluster").

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

/// The wg-quick configuration for `peer` with these nodes.
pub fn render(peer: &PeerObject, nodes: &[NodeInfo]) -> anyhow::Result<String> {
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
    if let Some(port) = peer.spec["endpoint"]
        .as_str()
        .and_then(|e| e.parse::<SocketAddr>().ok())
        .map(|e| e.port())
    {
        let _ = writeln!(o, "ListenPort = {port}");
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
                let _ = writeln!(o, "AllowedIPs = {}", join(&p.pod_cidrs));
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
        render(&peer, &infos)
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
        let c = render(&peer, &nodes).unwrap();
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
        assert!(render(&peer, &nodes[2..]).is_err());
    }
}
