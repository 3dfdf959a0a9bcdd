//! The topology `agent_mesh.rs` and `observability_mesh.rs` share: nodes (network namespaces)
//! on one switch, the API stand-in listening on the switch's bridge, and in each node the
//! real agent run as `deploy/kwire.yaml`'s DaemonSet runs it (confined by kwire-lab's
//! container runtime, with deploy/'s RBAC and admission policy and a token bound to its node).
//!
//! The stand-in must be reachable from the node namespaces, so a test's body runs on a thread
//! that entered the switch's namespace (`Netns::run_in`) and starts the stand-in there
//! ([`Cluster::start`]); threads its tokio runtime spawns inherit the namespace, so
//! `stop()`/`resume()` rebind there too. Nothing is added to the root namespace.

use kwire_lab::apiserver::{ApiServer, ApiServerConfig, ResourceKind};
use kwire_lab::cluster::state::NodeSpec;
use kwire_lab::supervisor::daemonset::Standalone;
use kwire_tests::{unique_id, Netns, Proc, Scratch, Switch};
use serde_json::{json, Value};

/// The switch's bridge address, where the stand-in listens.
pub const BRIDGE_ADDR: &str = "192.0.2.254";
/// The agents' WireGuard port (the DaemonSet's default).
pub const PORT: u16 = 51820;
/// The agent's tun in each node (the DaemonSet's default).
pub const TUN: &str = "kwire0";

pub struct Node {
    pub ns: Netns,
    pub name: String,
    pub ip: String,
    /// Set by [`Cluster::start`].
    pub spec: Option<NodeSpec>,
}

impl Node {
    pub fn spec(&self) -> &NodeSpec {
        self.spec
            .as_ref()
            .expect("Cluster::start sets every node's spec")
    }
}

/// A new switch (its bridge at [`BRIDGE_ADDR`]) and `count` nodes on it: network namespace
/// `{prefix}{i}`, underlay address 192.0.2.i, Node name `{prefix}{i}-{unique id}`, forwarding
/// on (the README's node prerequisite).
pub fn nodes(prefix: &str, count: usize) -> (Switch, Vec<Node>) {
    let sw = Switch::new();
    sw.ns.run(&[
        "ip",
        "addr",
        "add",
        &format!("{BRIDGE_ADDR}/24"),
        "dev",
        "br0",
    ]);
    let id = unique_id();
    let nodes = (1..=count)
        .map(|i| {
            let ns = Netns::new(&format!("{prefix}{i}"));
            let ip = format!("192.0.2.{i}");
            sw.attach(&ns, &[&format!("{ip}/24")], 1500);
            ns.run(&[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]);
            Node {
                ns,
                name: format!("{prefix}{i}-{id}"),
                ip,
                spec: None,
            }
        })
        .collect();
    (sw, nodes)
}

/// The stand-in and the DaemonSet of a test, started in the switch's namespace.
pub struct Cluster {
    pub api: ApiServer,
    pub ds: Standalone,
    /// Dropped last (fields drop in order): the stand-in's tasks run on it. A test that only
    /// keeps it alive never reads it.
    #[allow(dead_code)]
    pub rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts the stand-in with `config` (listening on the bridge), sets
    /// up the DaemonSet (deploy/'s objects, the agent with `agent_args` added) in `scratch`,
    /// gives every node its spec and creates its Node object with `status(node)` as status.
    /// Call on a thread in the switch's namespace.
    pub fn start(
        config: ApiServerConfig,
        scratch: &Scratch,
        nodes: &mut [Node],
        agent_args: &[&str],
        status: impl Fn(&Node) -> Value,
    ) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = ApiServerConfig {
            listen: format!("{BRIDGE_ADDR}:0").parse().unwrap(),
            ..config
        };
        let api = rt.block_on(ApiServer::start(config)).unwrap();
        let kwire = kwire_tests::kwire_bin();
        let kwire_cni = kwire.with_file_name("kwire-cni");
        let ds = Standalone::new(
            &api,
            api.addr(),
            (&kwire, &kwire_cni, &kwire_tests::lab::kwire_lab_bin()),
            &scratch.file("ds"),
            agent_args,
        )
        .unwrap();
        for n in nodes.iter_mut() {
            n.spec = Some(ds.node(&n.name, n.ns.name(), n.ip.parse().unwrap()));
        }
        for n in nodes.iter() {
            api.create(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name},
                "status": status(n),
            }))
            .unwrap();
        }
        Cluster { api, ds, rt }
    }

    /// Starts `n`'s agent (the first time, `tag` "1", after the DaemonSet's init container),
    /// its output in `scratch`'s `agent-{node}-{tag}.log`.
    pub fn spawn_agent(&self, n: &Node, scratch: &Scratch, tag: &str) -> Proc {
        let cmd = self.ds.agent(&self.api, n.spec(), tag == "1").unwrap();
        Proc::spawn(
            cmd,
            format!("agent-{}", n.name),
            scratch.file(&format!("agent-{}-{tag}.log", n.name)),
        )
    }
}

/// GET `path` of the agent's metrics server (loopback in the node's namespace): whether it
/// answered 2xx within 2 s, and the body.
pub fn http_get(ns: &Netns, path: &str) -> (bool, String) {
    let out = ns.exec(&[
        "curl",
        "-s",
        "-f",
        "-m",
        "2",
        &format!("http://127.0.0.1:9742{path}"),
    ]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn nodes_kind() -> &'static ResourceKind {
    ApiServer::kind("v1", "Node").unwrap()
}

/// The first address of `cidr` (the node's gateway on its tun).
pub fn gateway(cidr: &str) -> String {
    let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
    match net {
        ipnetwork::IpNetwork::V4(n) => {
            std::net::Ipv4Addr::from(u32::from(n.network()) + 1).to_string()
        }
        ipnetwork::IpNetwork::V6(n) => {
            std::net::Ipv6Addr::from(u128::from(n.network()) + 1).to_string()
        }
    }
}
