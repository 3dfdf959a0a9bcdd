//! `kwire agent`: the node daemon. Runs the WireGuard data plane on a host tun, publishes this
//! node's key and endpoint on its Node, makes every other valid Node a peer (allowed IPs = its
//! `spec.podCIDRs`), routes the peers' pod ranges into the tun with blackholes behind them,
//! keeps the last peer set in its state directory, and serves `/metrics`.

pub mod cleanup;
pub mod health;
pub mod keyfile;
pub mod peers;
pub mod pod_network;
pub mod policy;
pub mod routes;
pub mod services;
pub mod state;
pub mod sysctl;

use crate::dataplane::uapi_server::{self, UAPI_DIR};
use crate::dataplane::{workers::Network, TunnelDevice};
use crate::node_state::{NodeContext, NodeState};
use crate::wg::uapi::SetRequest;
use crate::wg::Device;
use anyhow::Context;
use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use kwire_proto::annotations;
use kwire_proto::key::PublicKey;
use peers::{DesiredPeer, NodeInfo, RejectReason, Settings};
use routes::HostNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// How often failed work (routes, the Node patch) is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// At most one log line per this interval for repeated watch errors (API down).
pub const WATCH_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Longest pause between two attempts of a failing watch: kube's default grows to 30 s, so a
/// change made while the API was unreachable could wait half a minute after it is back.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First pause of a failing watch.
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(500);

/// Retry pauses of the agent's watches: [`WATCH_BACKOFF_MIN`] doubling up to
/// [`WATCH_BACKOFF_MAX`]; back to the start once a watch works again.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

/// How long one write to the API (the Node patch) may take.
pub const API_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Name this agent reports Kubernetes Events under.
pub const EVENT_CONTROLLER: &str = "kwire-agent";
/// Tun MTU before the underlay is known (1500 - 80).
pub const DEFAULT_TUNNEL_MTU: u32 = 1420;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_doubles_to_its_cap_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let first: Vec<u64> = b.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(first, vec![500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(WATCH_BACKOFF_MIN));
    }

    #[test]
    fn ranges_are_checked() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        assert!(check_ranges(&[], &[])
            .unwrap_err()
            .to_string()
            .contains("--cluster-cidr is required"));
        assert!(check_ranges(
            &[n("10.244.0.0/16"), n("fd00:10:244::/56")],
            &[n("10.96.0.0/12")]
        )
        .is_ok());
        assert!(check_ranges(&[n("10.244.0.5/16")], &[]).is_err());
        assert!(check_ranges(&[n("10.0.0.0/7")], &[]).is_err());
        assert!(check_ranges(&[n("10.244.0.0/16")], &[n("10.244.0.0/20")]).is_err());
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Kubeconfig file; default: in-cluster configuration, else $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as its Node object is named (the DaemonSet sets NODE_NAME from
    /// `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", default_value = "", hide_default_value = true)]
    pub node_name: String,
    /// Directory of the private key and the saved peer set (created 0700).
    #[arg(long, env = "KWIRE_STATE_DIR", default_value = "/var/lib/kwire")]
    pub state_dir: PathBuf,
    /// WireGuard UDP port.
    #[arg(long, env = "KWIRE_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KWIRE_METRICS_ADDR", default_value = "127.0.0.1:9742")]
    pub metrics_addr: SocketAddr,
    /// Directory of the agent's local sockets.
    #[arg(long, env = "KWIRE_RUN_DIR", default_value = "/run/kwire")]
    pub run_dir: PathBuf,
    /// Name of the host tun interface.
    #[arg(long, env = "KWIRE_INTERFACE", default_value = "kwire0")]
    pub interface: String,
    /// Endpoint to advertise (IP:port); default: the Node's InternalIP and --listen-port.
    #[arg(long, env = "KWIRE_ENDPOINT")]
    pub endpoint: Option<SocketAddr>,
    /// Tun MTU; default: the underlay interface's MTU minus 80.
    #[arg(long, env = "KWIRE_MTU")]
    pub mtu: Option<u32>,
    /// Persistent keepalive for every peer, in seconds (0: off); a Node's
    /// `kwire.dev/persistent-keepalive` annotation overrides it for that peer.
    #[arg(long, env = "KWIRE_PERSISTENT_KEEPALIVE", default_value_t = 0)]
    pub persistent_keepalive: u16,
    /// Directory of the WireGuard userspace API socket (`wg show IFNAME` looks here).
    #[arg(long, default_value = UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// Data-plane worker threads; default: one per core.
    #[arg(long)]
    pub workers: Option<usize>,
    /// A peer without a handshake for this long while traffic to it waits is unreachable
    /// (a `PeerUnreachable` Event on its Node, kwire_peer_up 0), e.g. 120s, 2m.
    #[arg(long, env = "KWIRE_PEER_UNREACHABLE_AFTER", default_value = "2m", value_parser = health::parse_duration)]
    pub peer_unreachable_after: Duration,
    /// Remove what kwire put on this node and exit, instead of running: pod tuns, the host tun
    /// and its routes, kwire's blackhole routes, the `inet kwire` nftables table, the CNI
    /// plugin and configuration, the sockets, the state directory's files. For uninstalling,
    /// after `kubectl delete -f deploy/`; run as root on the node.
    #[arg(long)]
    pub cleanup: bool,
    /// With --cleanup: the node's CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// With --cleanup: the node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The cluster's pod range, as kube-controller-manager's --cluster-cidr (repeat it, or
    /// separate with commas, for IPv4 and IPv6). Required: nothing in these ranges ever leaves
    /// the node except through the tunnel (unreachable routes cover them before any other
    /// route), and a Node's podCIDRs are accepted only inside them.
    #[arg(
        long = "cluster-cidr",
        env = "KWIRE_CLUSTER_CIDR",
        value_delimiter = ','
    )]
    pub cluster_cidr: Vec<IpNetwork>,
    /// The cluster's Service range, as kube-apiserver's --service-cluster-ip-range (repeatable):
    /// a packet to it that no Service translated is refused, never routed out of the node.
    #[arg(
        long = "service-cidr",
        env = "KWIRE_SERVICE_CIDR",
        value_delimiter = ','
    )]
    pub service_cidr: Vec<IpNetwork>,
    /// Flows one pod address may hold in the NetworkPolicy connection table; past it that
    /// pod's new flows are dropped (counted as `flow_limit`), other pods' are unaffected.
    #[arg(long, env = "KWIRE_MAX_FLOWS_PER_POD", default_value_t = crate::datapath::conntrack::DEFAULT_MAX_FLOWS_PER_POD)]
    pub max_flows_per_pod: usize,
}

/// How to set `--cluster-cidr`, for the error that says it is missing.
pub const CLUSTER_CIDR_HELP: &str = "--cluster-cidr is required: pass the cluster's pod range(s), the same as kube-controller-manager's --cluster-cidr, e.g. `--cluster-cidr 10.244.0.0/16 --cluster-cidr fd00:10:244::/56` (or KWIRE_CLUSTER_CIDR=10.244.0.0/16,fd00:10:244::/56 in the DaemonSet's env)";

/// Checks `--cluster-cidr` and `--service-cidr`: present (the cluster ranges), canonical, not
/// absurdly wide, not overlapping one another.
pub fn check_ranges(cluster: &[IpNetwork], services: &[IpNetwork]) -> anyhow::Result<()> {
    anyhow::ensure!(!cluster.is_empty(), "{CLUSTER_CIDR_HELP}");
    let all: Vec<(&str, &IpNetwork)> = cluster
        .iter()
        .map(|c| ("--cluster-cidr", c))
        .chain(services.iter().map(|c| ("--service-cidr", c)))
        .collect();
    for (flag, c) in &all {
        let canonical = crate::wg::allowed_ips::canonical(**c);
        anyhow::ensure!(
            canonical == **c,
            "{flag} {c} has host bits set: did you mean {canonical}?"
        );
        let min = if c.is_ipv4() {
            peers::MIN_POD_CIDR_PREFIX_V4
        } else {
            peers::MIN_POD_CIDR_PREFIX_V6
        };
        anyhow::ensure!(
            c.prefix() >= min,
            "{flag} {c} is wider than /{min}: it would capture traffic that is not the cluster's"
        );
    }
    for (i, (fa, a)) in all.iter().enumerate() {
        for (fb, b) in &all[i + 1..] {
            anyhow::ensure!(
                !(peers::inside(a, b) || peers::inside(b, a)),
                "{fa} {a} and {fb} {b} overlap: pod and Service ranges must be disjoint"
            );
        }
    }
    Ok(())
}

/// Refuses ranges that contain one of this host's own addresses (other than on the tun): the
/// cluster's unreachable routes would cut the node off.
fn check_host_addresses(ranges: &[IpNetwork], tun: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut nl = crate::io::netlink::Netlink::open().context("opening a netlink socket")?;
    let links = nl.links().context("listing links")?;
    let tun_index = links.iter().find(|l| l.name == tun).map(|l| l.index);
    let mut own = Vec::new();
    for a in nl.addresses().context("listing addresses")? {
        let ip = a.addr.ip();
        if Some(a.index) == tun_index || ip.is_loopback() {
            continue;
        }
        if let Some(r) = ranges.iter().find(|r| r.contains(ip)) {
            let name = links
                .iter()
                .find(|l| l.index == a.index)
                .map_or("?", |l| l.name.as_str());
            anyhow::bail!("{r} (--cluster-cidr or --service-cidr) contains this host's address {ip} on {name}: pod and Service ranges must not contain node addresses");
        }
        own.push(ip);
    }
    Ok(own)
}

/// Runs the agent until SIGTERM or SIGINT; then removes the userspace API socket and exits 0,
/// leaving routes and blackholes in place (fail closed).
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // kube's TLS must use ring: a crate enabling aws-lc-rs would otherwise make it panic.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::io::tun::check_ifname(&args.interface)
        .with_context(|| format!("--interface {:?}", args.interface))?;
    if args.cleanup {
        let done = cleanup::cleanup(&cleanup::CleanupPlan {
            interface: args.interface.clone(),
            state_dir: args.state_dir.clone(),
            run_dir: args.run_dir.clone(),
            uapi_dir: args.uapi_dir.clone(),
            cni_bin_dir: args.cni_bin_dir.clone(),
            cni_conf_dir: args.cni_conf_dir.clone(),
        })?;
        for line in &done {
            println!("{line}");
        }
        println!("kwire cleanup: done ({} removed)", done.len());
        return Ok(());
    }
    anyhow::ensure!(
        !args.node_name.is_empty(),
        "--node-name (or NODE_NAME) is empty: set it to this node's Node name"
    );
    if let Some(e) = args.endpoint {
        anyhow::ensure!(
            peers::usable_endpoint(&e),
            "--endpoint {e}: not a unicast address with a port"
        );
    }
    check_ranges(&args.cluster_cidr, &args.service_cidr)?;
    anyhow::ensure!(
        args.max_flows_per_pod > 0,
        "--max-flows-per-pod must be at least 1"
    );
    let ranges: Vec<IpNetwork> = args
        .cluster_cidr
        .iter()
        .chain(&args.service_cidr)
        .copied()
        .collect();
    let host_addresses = check_host_addresses(&ranges, &args.interface)?;
    let key = keyfile::load_or_create(&args.state_dir)?;
    let restored = match state::load(&args.state_dir) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "ignoring the saved peer set");
            None
        }
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kwire-agent")
        .build()?;
    let sock_path = args.uapi_dir.join(format!("{}.sock", args.interface));
    let r = rt.block_on(agent_main(
        args,
        key,
        restored,
        workers,
        &sock_path,
        host_addresses,
    ));
    let _ = std::fs::remove_file(&sock_path);
    r?;
    // Worker threads are blocked in system calls; exiting is the clean way to end them.
    std::process::exit(0)
}

async fn agent_main(
    args: AgentArgs,
    key: crate::wg::key::PrivateKey,
    restored: Option<state::State>,
    workers: usize,
    sock_path: &Path,
    host_addresses: Vec<IpAddr>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating --run-dir {}", args.run_dir.display()))?;
    let listener = uapi_server::bind(sock_path)?;
    // Persistent: a restart re-attaches; addresses, routes and blackholes stay (fail closed).
    let tun = TunnelDevice::start_with(&args.interface, workers, true, true)?;
    tun.net.pods.set_cluster_ranges(args.cluster_cidr.clone());
    tun.net
        .pods
        .conntrack
        .set_max_flows_per_pod(args.max_flows_per_pod);
    let own_key = key.public_key();
    let mut first = SetRequest {
        private_key: Some(Some(key)),
        listen_port: Some(args.listen_port),
        ..SetRequest::default()
    };
    if let Some(st) = &restored {
        first.peers = peers::add_all(&st.peers);
    }
    tun.device.apply(first, &mut tun.net.clone()).map_err(|e| {
        anyhow::anyhow!(
            "configuring {}: {e} (is --listen-port {} taken?)",
            args.interface,
            args.listen_port
        )
    })?;
    let status = Arc::new(NodeState::new(
        tun.device.clone(),
        tun.counters.clone(),
        &RejectReason::ALL.map(RejectReason::metric_label),
    ));
    let _ = status.node.set(NodeContext {
        name: args.node_name.clone(),
        interface: args.interface.clone(),
        pods: tun.net.pods.clone(),
    });
    let status_sock = crate::status::server::bind(&args.run_dir)?;
    let run_dir = args.run_dir.clone();
    let mut agent = Agent::new(
        &args,
        own_key,
        tun.device.clone(),
        tun.net.clone(),
        status.clone(),
        host_addresses,
    );
    info!(node = %args.node_name, interface = %args.interface, port = args.listen_port, public_key = %own_key, "kwire agent starting");
    let cidrs = agent.cidrs_tx.subscribe();
    if let Some(st) = restored {
        agent.restore(st);
    } else {
        agent.program_host();
    }
    let pods = tokio::spawn(pod_network::serve(
        cidrs,
        tun.net.pods.clone(),
        pod_network::Firewall {
            ifname: args.interface.clone(),
            cluster: args.cluster_cidr.clone(),
            services: args.service_cidr.clone(),
            counters: tun.counters.clone(),
        },
        args.run_dir.clone(),
        args.state_dir.clone(),
    ));
    let metrics = crate::metrics::bind(args.metrics_addr, status.clone()).await?;
    let metrics = tokio::spawn(metrics);
    let status_server = tokio::spawn(crate::status::server::serve(status_sock, status.clone()));
    let health = tokio::spawn(health::run(
        status.clone(),
        health::HealthSettings {
            node_name: args.node_name.clone(),
            kubeconfig: args.kubeconfig.clone(),
            unreachable_after: args.peer_unreachable_after,
        },
    ));
    let uapi = tokio::spawn(uapi_server::serve(
        listener,
        tun.device.clone(),
        tun.net.clone(),
    ));
    let loop_pods = tun.net.pods.clone();
    let control = tokio::spawn(async move {
        match crate::kubeapi::client(args.kubeconfig.as_deref()).await {
            Ok(client) => {
                let policy = tokio::spawn(policy::run(client.clone(), loop_pods.clone()));
                let services = tokio::spawn(services::run(client.clone(), loop_pods));
                agent.run(client).await;
                policy.abort();
                services.abort();
            }
            Err(e) => error!(
                error = format!("{e:#}"),
                "no Kubernetes API client; the data plane keeps the restored peers"
            ),
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down (routes and blackholes stay)"),
        _ = int.recv() => info!("SIGINT: shutting down (routes and blackholes stay)"),
    }
    control.abort();
    uapi.abort();
    metrics.abort();
    status_server.abort();
    health.abort();
    let _ = std::fs::remove_file(run_dir.join(crate::status::STATUS_SOCKET));
    pods.abort();
    Ok(())
}

/// `10.244.1.0/24,fd00::/64` for logs.
fn nets(v: &[IpNetwork]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The control loop's state: the Nodes it knows, what it configured, what it reported.
struct Agent {
    node_name: String,
    listen_port: u16,
    endpoint_override: Option<SocketAddr>,
    mtu_override: Option<u32>,
    default_keepalive: u16,
    state_dir: PathBuf,
    own_key: PublicKey,
    device: Arc<Device>,
    net: Network,
    status: Arc<NodeState>,
    host: HostNetwork,
    own_cidrs: Vec<IpNetwork>,
    /// `--cluster-cidr`.
    cluster: Vec<IpNetwork>,
    /// `--service-cidr`: routed into the tun like the cluster ranges, so that the node's own
    /// packets to a ClusterIP reach the loop's Service stage.
    services: Vec<IpNetwork>,
    /// This host's addresses outside the tun (no podCIDR may contain one).
    host_addresses: Vec<IpAddr>,
    /// Tun MTU and the InternalIP it was derived from.
    mtu: u32,
    mtu_from: Option<IpAddr>,
    applied: BTreeMap<String, DesiredPeer>,
    rejected: BTreeSet<(String, RejectReason)>,
    saved: Option<state::State>,
    /// The Nodes as of the last complete list plus the watch events since.
    nodes: BTreeMap<String, Node>,
    /// Nodes of a list in progress (between watcher Init and InitDone).
    relist: Option<BTreeMap<String, Node>>,
    synced: bool,
    /// Work that failed and must be retried (routes, Node patch, state file).
    retry: bool,
    /// resourceVersion of this Node when its annotations were last patched: the same version
    /// seen again means our patch's watch event has not arrived yet, not that it was undone.
    patched_at: Option<String>,
    /// Tells the pod side this node's pod CIDRs and MTU.
    cidrs_tx: tokio::sync::watch::Sender<(Vec<IpNetwork>, u32)>,
}

/// What a reconcile asks the async side to do.
#[derive(Default)]
struct Outcome {
    new_rejections: Vec<peers::Rejection>,
    patch: Option<serde_json::Value>,
}

impl Agent {
    fn new(
        args: &AgentArgs,
        own_key: PublicKey,
        device: Arc<Device>,
        net: Network,
        status: Arc<NodeState>,
        host_addresses: Vec<IpAddr>,
    ) -> Agent {
        Agent {
            node_name: args.node_name.clone(),
            listen_port: args.listen_port,
            endpoint_override: args.endpoint,
            mtu_override: args.mtu,
            default_keepalive: args.persistent_keepalive,
            state_dir: args.state_dir.clone(),
            own_key,
            device,
            net,
            status,
            host: HostNetwork::new(&args.interface),
            own_cidrs: Vec::new(),
            cluster: args.cluster_cidr.clone(),
            services: args.service_cidr.clone(),
            host_addresses,
            mtu: args.mtu.unwrap_or(DEFAULT_TUNNEL_MTU),
            mtu_from: None,
            applied: BTreeMap::new(),
            rejected: BTreeSet::new(),
            saved: None,
            nodes: BTreeMap::new(),
            relist: None,
            synced: false,
            retry: false,
            patched_at: None,
            cidrs_tx: tokio::sync::watch::channel((Vec::new(), 0)).0,
        }
    }

    /// Takes the saved state as the current one (its peers are already in the device).
    fn restore(&mut self, st: state::State) {
        info!(peers = st.peers.len(), pod_cidrs = %nets(&st.pod_cidrs), "restored the saved peer set; forwarding before the API answers");
        self.own_cidrs = st.pod_cidrs.clone();
        if self.mtu_override.is_none() {
            if let Some(m) = st.mtu {
                self.mtu = m;
            }
        }
        self.applied = st.peers.clone();
        self.saved = Some(st);
        self.publish_names();
        self.status.synced.store(true, Ordering::Relaxed);
        self.program_host();
    }

    fn publish_names(&self) {
        let names = self
            .applied
            .values()
            .map(|p| (p.public_key, p.node.clone()))
            .collect();
        self.status.peer_names.store(Arc::new(names));
    }

    fn program_host(&mut self) {
        let now = (self.own_cidrs.clone(), self.mtu);
        self.cidrs_tx.send_if_modified(|v| {
            if *v != now {
                *v = now;
                true
            } else {
                false
            }
        });
        let peer_cidrs: Vec<IpNetwork> = self
            .applied
            .values()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        self.status
            .pod_cidrs
            .store(Arc::new(self.own_cidrs.clone()));
        let errors = self.host.sync(&routes::Desired {
            mtu: self.mtu,
            own: self.own_cidrs.clone(),
            peers: peer_cidrs,
            cluster: self.cluster.iter().chain(&self.services).copied().collect(),
        });
        for e in &errors {
            warn!(error = %e, interface = %self.host.ifname, "programming the tun's addresses or routes");
        }
        self.retry |= !errors.is_empty();
        self.status.programmed.store(
            errors.is_empty() && !self.own_cidrs.is_empty(),
            Ordering::Relaxed,
        );
    }

    async fn run(mut self, client: Client) {
        let nodes_api: Api<Node> = Api::all(client.clone());
        let recorder = Arc::new(Recorder::new(
            client,
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(self.node_name.clone()),
            },
        ));
        let stream = watcher::watcher(nodes_api.clone(), watcher::Config::default())
            .backoff(WatchBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_err_log: Option<Instant> = None;
        loop {
            let work = tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => self.on_event(ev),
                    Some(Err(e)) => {
                        self.status.watch_errors.fetch_add(1, Ordering::Relaxed);
                        self.status.api_synced.store(false, Ordering::Relaxed);
                        if last_err_log.is_none_or(|t| t.elapsed() >= WATCH_ERROR_LOG_INTERVAL) {
                            warn!(error = %e, "watching Nodes failed; retrying with backoff, the data plane keeps the last peer set");
                            last_err_log = Some(Instant::now());
                        }
                        false
                    }
                    None => {
                        error!("the Node watch ended");
                        return;
                    }
                },
                _ = tick.tick() => self.synced && self.retry,
            };
            if !work {
                continue;
            }
            let out = tokio::task::block_in_place(|| self.reconcile());
            for r in out.new_rejections {
                self.record_event(&recorder, r);
            }
            if let Some(patch) = out.patch {
                let pp = PatchParams::default();
                match tokio::time::timeout(
                    API_WRITE_TIMEOUT,
                    nodes_api.patch(&self.node_name, &pp, &Patch::Merge(&patch)),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        info!(node = %self.node_name, "published public key and endpoint on the Node");
                        self.patched_at = self
                            .nodes
                            .get(&self.node_name)
                            .and_then(|n| n.metadata.resource_version.clone());
                    }
                    Ok(Err(e)) => {
                        warn!(node = %self.node_name, error = %e, "publishing kwire.dev annotations on the Node failed; retrying");
                        self.retry = true;
                    }
                    Err(_) => {
                        warn!(node = %self.node_name, "publishing kwire.dev annotations on the Node timed out; retrying");
                        self.retry = true;
                    }
                }
            }
        }
    }

    /// Folds a watch event into the Node view; true when the view is complete and changed.
    fn on_event(&mut self, ev: Event<Node>) -> bool {
        match ev {
            Event::Init => {
                self.status.watch_resyncs.fetch_add(1, Ordering::Relaxed);
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(n) => {
                if let (Some(buf), Some(name)) = (self.relist.as_mut(), n.metadata.name.clone()) {
                    buf.insert(name, n);
                }
                false
            }
            Event::InitDone => {
                // Only a complete list removes peers: Nodes gone from it are gone.
                if let Some(buf) = self.relist.take() {
                    self.nodes = buf;
                }
                if !self.synced {
                    info!(nodes = self.nodes.len(), "synced with the API");
                }
                self.synced = true;
                self.status.synced.store(true, Ordering::Relaxed);
                self.status.api_synced.store(true, Ordering::Relaxed);
                true
            }
            Event::Apply(n) => {
                let Some(name) = n.metadata.name.clone() else {
                    return false;
                };
                self.nodes.insert(name, n);
                self.status.api_synced.store(self.synced, Ordering::Relaxed);
                self.synced
            }
            Event::Delete(n) => {
                let Some(name) = n.metadata.name.clone() else {
                    return false;
                };
                self.nodes.remove(&name);
                self.synced
            }
        }
    }

    fn reconcile(&mut self) -> Outcome {
        self.retry = false;
        let mut out = Outcome::default();
        let own = self.nodes.get(&self.node_name).map(NodeInfo::from_node);
        if let Some(own) = &own {
            let cidrs = own.parsed_pod_cidrs();
            if !cidrs.is_empty() && cidrs != self.own_cidrs {
                info!(pod_cidrs = %nets(&cidrs), "this node's pod CIDRs");
                for c in cidrs
                    .iter()
                    .filter(|c| !self.cluster.iter().any(|r| peers::inside(c, r)))
                {
                    warn!(pod_cidr = %c, cluster_cidrs = %nets(&self.cluster), "this node's pod CIDR is outside --cluster-cidr: other nodes refuse it; make --cluster-cidr match kube-controller-manager's");
                }
                self.own_cidrs = cidrs;
            }
            if self.mtu_override.is_none() {
                if let Some(ip) = own.internal_ips.first().copied() {
                    if self.mtu_from != Some(ip) {
                        let underlay = routes::underlay_mtu(ip);
                        let mtu =
                            routes::tunnel_mtu(underlay.unwrap_or(routes::DEFAULT_UNDERLAY_MTU));
                        info!(internal_ip = %ip, underlay_mtu = ?underlay, mtu, "tunnel MTU");
                        self.mtu = mtu;
                        self.mtu_from = Some(ip);
                    }
                }
            }
            let node = self.nodes.get(&self.node_name);
            let rv = node.and_then(|n| n.metadata.resource_version.as_ref());
            if rv.is_none() || rv != self.patched_at.as_ref() {
                out.patch = self.annotation_patch(own, node);
            }
        }

        let infos: Vec<NodeInfo> = self.nodes.values().map(NodeInfo::from_node).collect();
        let settings = Settings {
            self_name: self.node_name.clone(),
            self_key: self.own_key,
            default_port: self.listen_port,
            default_keepalive: self.default_keepalive,
            cluster_cidrs: self.cluster.clone(),
            host_addresses: self.host_addresses.clone(),
        };
        let sel = peers::select(&infos, &self.own_cidrs, &settings);

        let now: BTreeSet<(String, RejectReason)> = sel
            .rejections
            .iter()
            .map(|r| (r.node.clone(), r.reason))
            .collect();
        for r in &sel.rejections {
            if !self.rejected.contains(&(r.node.clone(), r.reason)) {
                warn!(node = %r.node, reason = r.reason.metric_label(), "Node skipped as a peer: {}", r.detail);
                self.status.count_invalid(r.reason.metric_label());
                out.new_rejections.push(r.clone());
            }
        }
        self.rejected = now;

        let changes = peers::plan(&self.applied, &sel.peers);
        if !changes.is_empty() {
            for (name, p) in &sel.peers {
                match self.applied.get(name) {
                    None => {
                        info!(node = %name, endpoint = %p.endpoint, allowed_ips = %nets(&p.allowed_ips), keepalive = p.keepalive, "peer added")
                    }
                    Some(o) if o != p => info!(
                        node = %name,
                        endpoint = %p.endpoint,
                        allowed_ips = %nets(&p.allowed_ips),
                        keepalive = p.keepalive,
                        key_changed = o.public_key != p.public_key,
                        "peer changed"
                    ),
                    _ => {}
                }
            }
            for name in self.applied.keys().filter(|n| !sel.peers.contains_key(*n)) {
                info!(node = %name, "peer removed");
            }
            let req = SetRequest {
                peers: changes,
                ..SetRequest::default()
            };
            if let Err(e) = self.device.apply(req, &mut self.net.clone()) {
                error!(error = %e, "applying peer changes to the device");
            }
            self.applied = sel.peers;
            self.publish_names();
        }

        self.program_host();

        let st = state::State {
            pod_cidrs: self.own_cidrs.clone(),
            mtu: Some(self.mtu),
            peers: self.applied.clone(),
        };
        if self.saved.as_ref() != Some(&st) {
            match state::save(&self.state_dir, &st) {
                Ok(()) => self.saved = Some(st),
                Err(e) => {
                    warn!(error = %e, "saving the peer set");
                    self.retry = true;
                }
            }
        }
        if out.patch.is_some() {
            debug!("Node annotations to publish");
        }
        out
    }

    /// The merge patch that makes this Node's kwire annotations right, if they are not.
    fn annotation_patch(&self, own: &NodeInfo, node: Option<&Node>) -> Option<serde_json::Value> {
        let key = self.own_key.to_base64();
        let endpoint = self.endpoint_override.or_else(|| {
            own.internal_ips
                .first()
                .map(|ip| SocketAddr::new(*ip, self.listen_port))
        });
        let ann = node.and_then(|n| n.metadata.annotations.as_ref());
        let cur = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
        let mut patch = serde_json::Map::new();
        if cur(annotations::PUBLIC_KEY) != Some(key.as_str()) {
            patch.insert(annotations::PUBLIC_KEY.into(), key.into());
        }
        match endpoint {
            Some(ep) => {
                let ep = ep.to_string();
                if cur(annotations::ENDPOINT) != Some(ep.as_str()) {
                    patch.insert(annotations::ENDPOINT.into(), ep.into());
                }
            }
            None => {
                debug!(node = %self.node_name, "no InternalIP and no --endpoint: no endpoint to publish")
            }
        }
        (!patch.is_empty()).then(|| serde_json::json!({ "metadata": { "annotations": patch } }))
    }

    fn record_event(&self, recorder: &Arc<Recorder>, r: peers::Rejection) {
        let Some(node) = self.nodes.get(&r.node) else {
            return;
        };
        let reference = node.object_ref(&());
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let ev = K8sEvent {
                type_: EventType::Warning,
                reason: r.reason.event_reason().into(),
                note: Some(format!(
                    "kwire skips this Node as a WireGuard peer ({}): {}",
                    r.reason.metric_label(),
                    r.detail
                )),
                action: "SelectPeers".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                debug!(node = %r.node, error = %e, "recording a Kubernetes Event failed");
            }
        });
    }
}
