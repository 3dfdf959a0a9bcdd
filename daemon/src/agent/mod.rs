//! `kwire agent`: the node daemon. Runs the WireGuard data plane on a host tun, publishes this
//! node's key and endpoint on its Node, makes every other valid Node a peer (allowed IPs = its
//! `spec.podCIDRs`), routes the peers' pod ranges into the tun with blackholes behind them,
//! keeps the last peer set in its state directory, and serves `/metrics`.

pub mod cleanup;
pub mod external;
pub mod flow_state;
pub mod health;
pub mod keyctl;
pub mod keyfile;
pub mod lister;
pub mod objects;
pub mod peer_index;
pub mod peers;
pub mod persist;
pub mod pod_network;
pub mod policy;
pub mod policy_state;
pub mod relay;
pub mod rotation;
pub mod routes;
pub mod service_health;
pub mod service_state;
pub mod services;
pub mod state;
pub mod sysctl;
pub mod watches;

use crate::dataplane::uapi_server::{self, UAPI_DIR};
use crate::dataplane::workers::{Network, TunIo};
use crate::dataplane::{TunnelDevice, TunnelOptions};
use crate::node_state::{NodeContext, NodeState};
use crate::wg::uapi::SetRequest;
use crate::wg::Device;
use anyhow::Context;
use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use kwire_proto::annotations;
use kwire_proto::key::PublicKey;
use objects::NodeView;
use peer_index::{Choice, PeerIndex};
use peers::{DesiredPeer, NodeInfo, RejectReason, Settings};
use routes::HostNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, error, info, warn};

/// How often failed work (routes, the Node patch) is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// At most one log line per this interval for repeated watch errors (API down).
pub const WATCH_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// The state file is written at most this often (when what it holds changed): it only
/// serves a restart before the API answers, so a few seconds of lag cost nothing, while a
/// write per Node event would cost a core at 5,000 Nodes.
pub const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping agent may take to write its state file.
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Watch events folded before a reconcile, at most.
pub const MAX_NODE_BATCH: usize = 1024;
/// Longest pause between two attempts of a failing watch: kube's default grows to 30 s, so a
/// change made while the API was unreachable could wait half a minute after it is back.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First pause of a failing watch.
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(500);

/// Retry pauses of the agent's watches: [`WATCH_BACKOFF_MIN`] doubling up to
/// [`WATCH_BACKOFF_MAX`]; back to the start once a watch works again. Each pause is drawn
/// between half the step and the whole step ("equal jitter"), so that the agents of a cluster
/// that lost the API together do not come back in step (a thundering herd of lists).
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

/// A pause between half of `step` and `step`, uniformly.
fn jittered(step: Duration) -> Duration {
    use rand_core::RngCore;
    let half = step / 2;
    let r = rand_core::OsRng.next_u32() as u64;
    half + Duration::from_nanos((half.as_nanos() as u64).saturating_mul(r) >> 32)
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
        let step = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(jittered(step))
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
/// Keepalive interval of a node behind NAT (s): what wg-quick users set; NATs keep UDP
/// mappings for 30 s at least (RFC 4787 REQ-5).
pub const NAT_KEEPALIVE: u16 = 25;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_doubles_to_its_cap_jittered_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let steps = [500, 1000, 2000, 4000, 5000, 5000];
        let mut b = WatchBackoff::default();
        let first: Vec<Duration> = b.by_ref().take(6).collect();
        for (d, step) in first.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *d >= step / 2 && *d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        let again = b.next().unwrap();
        assert!(again >= WATCH_BACKOFF_MIN / 2 && again <= WATCH_BACKOFF_MIN);
        // Jittered: a thousand agents do not all wait the same.
        let pauses: std::collections::BTreeSet<Duration> = (0..1000)
            .map(|_| WatchBackoff::default().next().unwrap())
            .collect();
        assert!(pauses.len() > 500, "only {} distinct pauses", pauses.len());
    }

    #[test]
    fn watch_turn_is_a_duration_up_to_a_second() {
        assert_eq!(parse_watch_turn("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_watch_turn("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_watch_turn("1s"), Ok(MAX_WATCH_TURN));
        assert!(parse_watch_turn("2s").unwrap_err().contains("longer than"));
        assert!(parse_watch_turn("fast").is_err());
        // The flag's default is the turn the pacer was measured with.
        assert_eq!(
            parse_watch_turn(&default_of("watch_turn")),
            Ok(watches::WATCH_TURN)
        );
    }

    /// The default `kwire agent` gives the argument `id`, as written in its definition.
    fn default_of(id: &str) -> String {
        let cmd = <AgentArgs as clap::Args>::augment_args(clap::Command::new("agent"));
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("no argument {id}"));
        arg.get_default_values()[0].to_str().unwrap().to_string()
    }

    #[test]
    fn the_flow_save_interval_defaults_to_the_documented_one() {
        assert_eq!(
            health::parse_duration(&default_of("flow_save_interval")),
            Ok(flow_state::FLOW_SAVE_INTERVAL)
        );
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
    /// This node is behind NAT (its peers cannot reach its underlay address): keep the NAT's
    /// mapping open with a keepalive to every peer every 25 s unless --persistent-keepalive
    /// says otherwise. The Node annotation `kwire.dev/behind-nat: "true"` does the same.
    #[arg(long, env = "KWIRE_BEHIND_NAT")]
    pub behind_nat: bool,
    /// Flag this node behind NAT by itself (publish `kwire.dev/behind-nat: "true"`, kept
    /// until removed) once a peer sees its packets come from another address than its
    /// published endpoint. Off by default: a NAT with a port forward is reachable, and a
    /// flagged node neither relays nor is reached but through a relay by NATed nodes.
    #[arg(long, env = "KWIRE_BEHIND_NAT_DETECT")]
    pub behind_nat_detect: bool,
    /// UDP port on which this node relays for pairs of nodes both behind NAT (their
    /// WireGuard datagrams, forwarded untouched), published as `kwire.dev/relay-endpoint`
    /// unless the node is behind NAT; 0: never relay. Open it like the WireGuard port.
    #[arg(long, env = "KWIRE_RELAY_PORT", default_value_t = relay::DEFAULT_RELAY_PORT)]
    pub relay_port: u16,
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
    /// TCP keepalive on the API connections: probes start after this long without a packet,
    /// and a connection whose probes (3, a sixth of this apart, at least 1 s) or whose sent
    /// data go unanswered is closed, its watches restarted from their last resourceVersion
    /// (the default gives a silently dead connection up after 45 s; 0s: off, the kernel's
    /// defaults, which take hours), e.g. 30s.
    #[arg(long, env = "KWIRE_API_KEEPALIVE", default_value = "30s", value_parser = health::parse_duration)]
    pub api_keepalive: Duration,
    /// After a burst of watch events (Nodes, Pods, Namespaces, NetworkPolicies, Services,
    /// EndpointSlices), the agent reads those watches again only this much later, and then
    /// takes every event that came meanwhile at once: a change waits up to this long more, and
    /// a busy cluster's heartbeats cost the agent a wake-up per turn instead of one per event
    /// (0s: read each event as it comes), e.g. 20ms, 50ms.
    #[arg(long, env = "KWIRE_WATCH_TURN", default_value = "50ms", value_parser = parse_watch_turn)]
    pub watch_turn: Duration,
    /// How often the running agent writes its connection tables (the flows NetworkPolicy
    /// admitted and those translated to a Service's backend) to the state directory, so that
    /// open connections survive a crash or a SIGKILL of the agent, not only a graceful
    /// restart (which writes them at SIGTERM). Longer after a slow write: a thousand times its
    /// time, at most a minute (a million flows take ~0.25 s to write). Flows opened since the
    /// last write are lost in a crash. 0s: only at SIGTERM.
    #[arg(long, env = "KWIRE_FLOW_SAVE_INTERVAL", default_value = "10s", value_parser = health::parse_duration)]
    pub flow_save_interval: Duration,
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
    /// Rotate this node's WireGuard key when it is this old, without dropping a packet
    /// (e.g. 720h; default: off, rotate with `kwire key rotate`).
    #[arg(long, env = "KWIRE_KEY_ROTATION_INTERVAL", value_parser = health::parse_duration)]
    pub key_rotation_interval: Option<Duration>,
    /// How long a rotation waits for the peers that are up to move to the new key before it
    /// promotes it anyway (e.g. 2m).
    #[arg(long, env = "KWIRE_KEY_ROTATION_GRACE", default_value = "2m", value_parser = health::parse_duration)]
    pub key_rotation_grace: Duration,
}

/// The longest `--watch-turn`: a change waits up to a turn, and beyond this the wait is what
/// users would notice, not the CPU it saves.
pub const MAX_WATCH_TURN: Duration = Duration::from_secs(1);

/// `--watch-turn`: a duration of at most [`MAX_WATCH_TURN`].
fn parse_watch_turn(s: &str) -> Result<Duration, String> {
    let d = health::parse_duration(s)?;
    if d > MAX_WATCH_TURN {
        return Err(format!(
            "{s:?} is longer than {MAX_WATCH_TURN:?}: every watched change could wait that long; use e.g. 20ms or 50ms"
        ));
    }
    Ok(d)
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
    // Before any thread: fewer malloc arenas keep the start-up lists' freed memory reusable.
    crate::io::malloc::limit_arenas(crate::io::malloc::AGENT_ARENAS);
    // kube's TLS must use ring: a crate enabling aws-lc-rs would otherwise make it panic.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::kubeapi::set_liveness(crate::kubeapi::Liveness::after(args.api_keepalive));
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
    // A restart during a rotation: the old key a promotion left is wiped; a next key resumes.
    keyfile::wipe_leftovers(&args.state_dir);
    let next_key = keyfile::load_next(&args.state_dir)?;
    let keys = rotation::Keys {
        current: key,
        next: next_key,
        written: keyfile::key_written(&args.state_dir),
        started: None,
    };
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
        keys,
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
    mut keys: rotation::Keys,
    restored: Option<state::State>,
    workers: usize,
    sock_path: &Path,
    host_addresses: Vec<IpAddr>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating --run-dir {}", args.run_dir.display()))?;
    let listener = uapi_server::bind(sock_path)?;
    // Persistent: a restart re-attaches; addresses, routes and blackholes stay (fail closed).
    let opts = TunnelOptions {
        workers,
        offload: true,
        persist: true,
        listen_port: args.listen_port,
        tun_io: TunIo::from_env(),
    };
    let tun = TunnelDevice::start(&args.interface, opts)
        .with_context(|| format!("is --listen-port {} taken?", args.listen_port))?;
    tun.net.pods.set_cluster_ranges(args.cluster_cidr.clone());
    // NetworkPolicy fails closed: the saved policy before pods are re-attached, else no new
    // pod flow until the first lists arrive.
    tun.net.pods.require_policy();
    let (policy_store, policy_state_failed) =
        policy_state::restore(&args.state_dir, &args.node_name, &tun.net.pods);
    tun.net
        .pods
        .conntrack
        .set_max_flows_per_pod(args.max_flows_per_pod);
    // Open connections go on where the last graceful stop left them.
    flow_state::restore_logged(&args.state_dir, &tun.net.pods);
    let own_key = keys.public();
    let mut first = SetRequest {
        private_key: Some(Some(keys.current.clone())),
        listen_port: Some(args.listen_port),
        ..SetRequest::default()
    };
    if let Some(st) = &restored {
        first.peers = peers::add_all(&st.peers);
        first
            .peers
            .extend(external::restore_changes(&st.external, &st.external_psks));
    }
    tun.device.apply(first, &mut tun.net.clone()).map_err(|e| {
        anyhow::anyhow!(
            "configuring {}: {e} (is --listen-port {} taken?)",
            args.interface,
            args.listen_port
        )
    })?;
    if let Some(next) = &keys.next {
        info!(next_public_key = %next.public_key(), "resuming the key rotation under way");
        tun.device.set_next_private_key(Some(next.clone()));
        keys.started = Some(Instant::now());
    }
    let reasons: Vec<&'static str> = RejectReason::ALL
        .map(RejectReason::metric_label)
        .into_iter()
        .chain(external::PeerRejectReason::ALL.map(external::PeerRejectReason::metric_label))
        .collect();
    let status = Arc::new(NodeState::new(
        tun.device.clone(),
        tun.counters.clone(),
        &reasons,
    ));
    status.update_keys(|k| {
        k.written = keys.written;
        k.next_public_key = keys.next_public();
        k.rotation_started = keys.next.as_ref().map(|_| SystemTime::now());
    });
    let _ = status.node.set(NodeContext {
        name: args.node_name.clone(),
        interface: args.interface.clone(),
        pods: tun.net.pods.clone(),
    });
    if policy_state_failed {
        status.policy_state_errors.fetch_add(1, Ordering::Relaxed);
    }
    status
        .state_write_failures
        .register(policy_state::POLICY_STATE_FILE, policy_store.failures());
    let status_sock = crate::status::server::bind(&args.run_dir)?;
    let key_sock = keyctl::bind(&args.run_dir)?;
    let (key_tx, key_rx) = tokio::sync::mpsc::channel(4);
    let run_dir = args.run_dir.clone();
    let mut agent = Agent::new(
        &args,
        keys,
        key_rx,
        tun.device.clone(),
        tun.net.clone(),
        status.clone(),
        host_addresses,
    );
    if args.relay_port != 0 {
        match relay::Forwarder::start(args.relay_port, status.clone()) {
            Ok(f) => agent.relay = Some(f),
            Err(e) => {
                warn!(port = args.relay_port, error = %e, "cannot open the relay port: this node relays for no NATed pair (--relay-port 0 turns the relay off)")
            }
        }
    }
    info!(node = %args.node_name, interface = %args.interface, port = args.listen_port, public_key = %own_key, "kwire agent starting");
    let cidrs = agent.cidrs_tx.subscribe();
    if let Some(st) = restored {
        agent.restore(st);
    } else {
        agent.program_host();
    }
    let firewall = pod_network::Firewall {
        ifname: args.interface.clone(),
        cluster: args.cluster_cidr.clone(),
        services: args.service_cidr.clone(),
        counters: tun.counters.clone(),
        steering: Default::default(),
    };
    // Services too before pods are re-attached: the saved table, else none until the lists.
    tun.net.pods.require_services();
    let (service_store, service_state_failed) =
        service_state::restore(&args.state_dir, &args.node_name, &tun.net.pods, &firewall);
    if service_state_failed {
        status.service_state_errors.fetch_add(1, Ordering::Relaxed);
    }
    status
        .state_write_failures
        .register(service_state::SERVICE_STATE_FILE, service_store.failures());
    let pods = tokio::spawn(pod_network::serve(
        cidrs,
        tun.net.pods.clone(),
        firewall.clone(),
        args.run_dir.clone(),
        args.state_dir.clone(),
    ));
    let metrics = crate::metrics::bind(args.metrics_addr, status.clone()).await?;
    let metrics = tokio::spawn(metrics);
    let status_server = tokio::spawn(crate::status::server::serve(status_sock, status.clone()));
    let key_server = tokio::spawn(keyctl::serve(key_sock, key_tx));
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
    let policy_writer = tokio::spawn(persist::writer(policy_store.clone()));
    let policy_record = policy_store.clone();
    let watch_turn = args.watch_turn;
    let service_writer = tokio::spawn(persist::writer(service_store.clone()));
    let flow_failures = Arc::default();
    status
        .state_write_failures
        .register(flow_state::FLOW_STATE_FILE, Arc::clone(&flow_failures));
    let flow_writer = tokio::spawn(flow_state::writer(
        args.state_dir.clone(),
        tun.net.pods.clone(),
        args.flow_save_interval,
        flow_failures,
    ));
    let service_record = service_store.clone();
    // Tells the control loop to write what the state file still misses, then stop.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut control = tokio::spawn(async move {
        let started = crate::kubeapi::config(args.kubeconfig.as_deref())
            .await
            .and_then(|config| {
                let client = crate::kubeapi::client_for(config.clone())?;
                // The Node watch, the policy loop and the service loop run on threads of
                // their own (see `watches`).
                let nodes = watches::start_nodes(
                    config.clone(),
                    agent.node_name.clone(),
                    watch_turn,
                    agent.status.node_filter.clone(),
                )
                .context("starting the Node watch thread")?;
                let policy = policy::start(
                    config.clone(),
                    loop_pods.clone(),
                    policy_record,
                    watch_turn,
                    agent.status.pod_filter.clone(),
                )
                .context("starting the policy thread")?;
                let tallies = [
                    agent.status.service_filter.clone(),
                    agent.status.slice_filter.clone(),
                ];
                let services = services::start(
                    config,
                    loop_pods,
                    firewall,
                    service_record,
                    watch_turn,
                    tallies,
                )
                .context("starting the service thread")?;
                Ok((client, nodes, (policy, services)))
            });
        match started {
            Ok((client, nodes, loops)) => {
                agent.run(client, nodes, stop_rx).await;
                drop(loops);
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
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, &mut control)
        .await
        .is_err()
    {
        control.abort();
    }
    uapi.abort();
    metrics.abort();
    status_server.abort();
    key_server.abort();
    health.abort();
    let _ = std::fs::remove_file(run_dir.join(crate::status::STATUS_SOCKET));
    let _ = std::fs::remove_file(run_dir.join(keyctl::KEY_SOCKET));
    pods.abort();
    policy_writer.abort();
    policy_store.save_if_dirty();
    service_writer.abort();
    service_store.save_if_dirty();
    flow_writer.abort();
    flow_state::save_logged(&args.state_dir, &tun.net.pods);
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
    /// `--behind-nat`, and the own Node's `kwire.dev/behind-nat` as last seen.
    behind_nat_flag: bool,
    /// `--behind-nat-detect`: a detected NAT flags the node too.
    behind_nat_detect: bool,
    behind_nat_annotation: bool,
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
    /// What the state file holds changed since it was last written.
    state_dirty: bool,
    state_saved_at: Option<Instant>,
    /// Writes the state file off the planner.
    state_writer: state::Writer,
    /// What peer selection reads of every Node, as of the last complete list plus the watch
    /// events since; selects incrementally.
    nodes: PeerIndex,
    /// resourceVersion of this Node as last seen.
    own_rv: Option<String>,
    /// Names seen by a list in progress (between watcher Init and InitDone): the others are
    /// gone at its end.
    relist: Option<BTreeSet<String>>,
    synced: bool,
    /// Work that failed and must be retried (routes, Node patch, state file).
    retry: bool,
    /// resourceVersion of this Node when its annotations were last patched: the same version
    /// seen again means our patch's watch event has not arrived yet, not that it was undone.
    patched_at: Option<String>,
    /// Tells the pod side this node's pod CIDRs and MTU.
    cidrs_tx: tokio::sync::watch::Sender<(Vec<IpNetwork>, u32)>,
    /// This node's private keys (current, next while rotating).
    keys: rotation::Keys,
    /// `kwire key rotate|revoke` commands (taken by `run`).
    key_rx: Option<tokio::sync::mpsc::Receiver<keyctl::KeyRequest>>,
    /// `--key-rotation-interval`, `--key-rotation-grace`.
    rotation_interval: Option<Duration>,
    rotation_grace: Duration,
    /// Every key some Node's `kwire.dev/revoked-keys` listed since the start: refused for good.
    revoked: BTreeSet<PublicKey>,
    /// Keys this node revoked itself: its `kwire.dev/revoked-keys` must list them.
    own_revoked: Vec<PublicKey>,
    /// Events about this node's key waiting to be recorded: (warning, reason, note).
    key_events: Vec<(bool, &'static str, String)>,
    /// Peers outside the cluster (the `Peer` resource).
    external: external::Peers,
    /// `--relay-port`, and the relay running on it (none: the port could not be opened).
    relay_port: u16,
    relay: Option<relay::Forwarder>,
    /// Peers reached through a relay (this node and they are behind NAT), by name.
    relay_plan: BTreeMap<String, relay::Route>,
    /// The NATed nodes the relay forwards for.
    relay_served: BTreeSet<String>,
    /// A Node's `kwire.dev/behind-nat` changed since the relay was last told whom it serves.
    relay_dirty: bool,
    /// Peers whose authenticated packets come from elsewhere than their published endpoint
    /// (`kwire.dev/nat-observed` on this Node).
    nat_observed: BTreeMap<String, SocketAddr>,
    /// Another node sees this one's packets come from elsewhere than its endpoint: (that node,
    /// the address it sees).
    nat_seen: Option<(String, SocketAddr)>,
}

/// What a reconcile asks the async side to do.
#[derive(Default)]
struct Outcome {
    new_rejections: Vec<peers::Rejection>,
    patch: Option<serde_json::Value>,
    /// Status patches of Peers, and the Secrets their preshared keys are to be read from.
    peer_patches: Vec<(String, serde_json::Value)>,
    psk_wanted: Vec<String>,
}

impl Agent {
    fn new(
        args: &AgentArgs,
        keys: rotation::Keys,
        key_rx: tokio::sync::mpsc::Receiver<keyctl::KeyRequest>,
        device: Arc<Device>,
        net: Network,
        status: Arc<NodeState>,
        host_addresses: Vec<IpAddr>,
    ) -> Agent {
        let own_key = keys.public();
        let state_writer = state::Writer::start(&args.state_dir, state::WRITE_RETRY);
        status
            .state_write_failures
            .register(state::STATE_FILE, state_writer.failures());
        Agent {
            node_name: args.node_name.clone(),
            listen_port: args.listen_port,
            endpoint_override: args.endpoint,
            mtu_override: args.mtu,
            default_keepalive: args.persistent_keepalive,
            behind_nat_flag: args.behind_nat,
            behind_nat_detect: args.behind_nat_detect,
            behind_nat_annotation: false,
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
            state_dirty: false,
            state_saved_at: None,
            state_writer,
            nodes: PeerIndex::new(&args.node_name, own_key),
            own_rv: None,
            relist: None,
            synced: false,
            retry: false,
            patched_at: None,
            cidrs_tx: tokio::sync::watch::channel((Vec::new(), 0)).0,
            keys,
            key_rx: Some(key_rx),
            rotation_interval: args.key_rotation_interval,
            rotation_grace: args.key_rotation_grace,
            revoked: BTreeSet::new(),
            own_revoked: Vec::new(),
            key_events: Vec::new(),
            external: external::Peers::default(),
            relay_port: args.relay_port,
            relay: None,
            relay_plan: BTreeMap::new(),
            relay_served: BTreeSet::new(),
            relay_dirty: true,
            nat_observed: BTreeMap::new(),
            nat_seen: None,
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
        self.applied = st.peers;
        if !st.external.is_empty() {
            info!(
                peers = st.external.len(),
                "restored the saved Peers (outside the cluster)"
            );
        }
        self.external.restore(st.external, st.external_psks);
        self.status
            .external_peer_names
            .store(Arc::new(self.external.names()));
        self.publish_names();
        // The relay forwards for the restored NATed peers before the API answers too.
        self.serve_relay();
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
        let relays = self
            .applied
            .values()
            .filter_map(|p| Some((p.public_key, p.relay.clone()?)))
            .collect();
        self.status.peer_relays.store(Arc::new(relays));
    }

    /// Whether this node is behind NAT (`--behind-nat` or its Node's annotation).
    fn behind_nat(&self) -> bool {
        self.behind_nat_flag || self.behind_nat_annotation
    }

    /// Tells the relay which nodes it forwards for: the peers behind NAT (none while this
    /// node is itself behind NAT: it publishes no relay endpoint).
    fn serve_relay(&mut self) {
        let Some(relay) = &self.relay else { return };
        let served: Vec<relay::Served> = if self.behind_nat() {
            Vec::new()
        } else {
            self.applied
                .values()
                .filter(|p| p.behind_nat)
                .map(|p| {
                    let keys = std::iter::once(p.public_key)
                        .chain(p.next_public_key)
                        .collect();
                    relay::Served::new(p.node.clone(), keys)
                })
                .collect()
        };
        self.relay_dirty = false;
        let names: BTreeSet<String> = served.iter().map(|s| s.name.clone()).collect();
        if names != self.relay_served {
            info!(nodes = ?names, "relaying for these nodes behind NAT");
        }
        self.relay_served = names;
        relay.set_served(served);
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
            .chain(self.external.allowed_ips())
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

    /// Plans peers from `nodes` (the Node watch, filtered: see [`watches::NodeFilter`]) until
    /// `stop` or the end of the watch.
    async fn run(
        mut self,
        client: Client,
        mut nodes: tokio::sync::mpsc::Receiver<watches::NodeItem>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let nodes_api: Api<Node> = Api::all(client.clone());
        let recorder = Arc::new(Recorder::new(
            client.clone(),
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(self.node_name.clone()),
            },
        ));
        let peer_api = external::api_resource();
        let peers_api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &peer_api);
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(client.clone(), external::PSK_NAMESPACE);
        let peer_stream = watcher::watcher(peers_api.clone(), watches::watch_config())
            .backoff(WatchBackoff::default());
        let mut peer_stream = std::pin::pin!(peer_stream);
        let mut last_peer_err_log: Option<Instant> = None;
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rotation_tick = tokio::time::interval(rotation::CHECK_INTERVAL);
        rotation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut key_rx = self.key_rx.take();
        let mut last_err_log: Option<Instant> = None;
        loop {
            let mut event = |agent: &mut Agent, ev: Option<watches::NodeItem>| match ev {
                Some(Ok(ev)) => Some(agent.on_event(ev)),
                Some(Err(e)) => {
                    agent.status.watch_errors.fetch_add(1, Ordering::Relaxed);
                    agent.status.api_synced.store(false, Ordering::Relaxed);
                    if last_err_log.is_none_or(|t| t.elapsed() >= WATCH_ERROR_LOG_INTERVAL) {
                        warn!(error = %e, "watching Nodes failed; retrying with backoff, the data plane keeps the last peer set");
                        last_err_log = Some(Instant::now());
                    }
                    Some(false)
                }
                None => {
                    error!("the Node watch ended");
                    None
                }
            };
            let mut work = tokio::select! {
                ev = nodes.recv() => match event(&mut self, ev) {
                    Some(w) => w,
                    None => return,
                },
                ev = peer_stream.next() => match ev {
                    Some(Ok(ev)) => self.external.on_event(ev) && self.synced,
                    Some(Err(e)) => {
                        if last_peer_err_log.is_none_or(|t| t.elapsed() >= WATCH_ERROR_LOG_INTERVAL) {
                            warn!(error = %e, "watching Peers (kwire.dev/v1alpha1) failed; retrying with backoff; Node peers are unaffected (a 404 means deploy/peer-crd.yaml is not applied)");
                            last_peer_err_log = Some(Instant::now());
                        }
                        false
                    }
                    None => {
                        error!("the Peer watch ended");
                        return;
                    }
                },
                _ = tick.tick() => {
                    // The tick is itself the throttle: what waited is written now (a save
                    // skipped as too recent would otherwise wait one more tick, ~10 s).
                    self.state_saved_at = None;
                    self.save_state();
                    let psk_retry = self.external.retry_psks();
                    let observed = self.observe_nat();
                    self.synced && (self.retry || psk_retry || observed)
                }
                _ = rotation_tick.tick() => tokio::task::block_in_place(|| self.rotation_tick()),
                Some(req) = async {
                    match key_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let r = tokio::task::block_in_place(|| self.key_command(req.command));
                    let _ = req.reply.send(r);
                    true
                }
                _ = stop.changed() => {
                    self.state_saved_at = None;
                    self.save_state();
                    tokio::task::block_in_place(|| self.state_writer.finish());
                    return;
                }
            };
            // What else has already arrived joins this reconcile.
            for _ in 1..MAX_NODE_BATCH {
                let ev = match nodes.try_recv() {
                    Ok(ev) => Some(ev),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                };
                match event(&mut self, ev) {
                    Some(w) => work |= w,
                    None => return,
                }
            }
            if !work {
                continue;
            }
            let out = tokio::task::block_in_place(|| self.reconcile());
            for r in out.new_rejections {
                self.record_event(&recorder, r);
            }
            for (warning, reason, note) in std::mem::take(&mut self.key_events) {
                self.key_event(&recorder, warning, reason, note);
            }
            self.write_peer_statuses(&peers_api, out.peer_patches).await;
            if !out.psk_wanted.is_empty() {
                self.read_psks(&secrets, out.psk_wanted).await;
                let again = tokio::task::block_in_place(|| self.reconcile());
                self.write_peer_statuses(&peers_api, again.peer_patches)
                    .await;
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
                        info!(node = %self.node_name, "published kwire.dev annotations (keys, endpoint) on the Node");
                        self.patched_at = self.own_rv.clone();
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

    /// Folds a watch event into the Node view; true when the view is complete and something
    /// peer selection reads changed (a status heartbeat, another annotation: false).
    fn on_event(&mut self, ev: Event<NodeView>) -> bool {
        let read = |agent: &mut Agent, v: NodeView| -> Option<(String, bool)> {
            let name = v.metadata.name.clone()?;
            let mut nat_changed = false;
            if name == agent.node_name {
                agent.own_rv = v.metadata.resource_version.clone();
                let nat = v
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotations::BEHIND_NAT))
                    .is_some_and(|v| v == "true");
                if nat != agent.behind_nat_annotation {
                    info!(
                        behind_nat = nat,
                        "this Node's {} annotation",
                        annotations::BEHIND_NAT
                    );
                    agent.behind_nat_annotation = nat;
                    agent.nodes.force_full();
                    nat_changed = true;
                }
            }
            let info = NodeInfo::from_node(&v.into_k8s());
            // Whom the relay serves depends on it, though peer selection does not.
            if agent
                .nodes
                .get(&name)
                .is_none_or(|o| o.behind_nat != info.behind_nat)
            {
                agent.relay_dirty = true;
            }
            let changed = agent.nodes.upsert(info) || nat_changed;
            Some((name, changed))
        };
        match ev {
            Event::Init => {
                self.status.watch_resyncs.fetch_add(1, Ordering::Relaxed);
                self.relist = Some(BTreeSet::new());
                false
            }
            Event::InitApply(v) => {
                if let Some((name, _)) = read(self, v) {
                    if let Some(seen) = self.relist.as_mut() {
                        seen.insert(name);
                    }
                }
                false
            }
            Event::InitDone => {
                // Only a complete list removes peers: Nodes gone from it are gone.
                if let Some(seen) = self.relist.take() {
                    let gone: Vec<String> = self
                        .nodes
                        .names()
                        .filter(|n| !seen.contains(*n))
                        .map(str::to_string)
                        .collect();
                    for name in gone {
                        self.nodes.remove(&name);
                    }
                }
                if !self.synced {
                    info!(nodes = self.nodes.len(), "synced with the API");
                }
                let first = !self.synced;
                self.synced = true;
                self.status.synced.store(true, Ordering::Relaxed);
                self.status.api_synced.store(true, Ordering::Relaxed);
                first || self.nodes.is_pending()
            }
            Event::Apply(v) => {
                let changed = read(self, v).is_some_and(|(_, c)| c);
                self.status.api_synced.store(self.synced, Ordering::Relaxed);
                self.synced && changed
            }
            Event::Delete(v) => {
                let Some(name) = v.metadata.name.clone() else {
                    return false;
                };
                self.nodes.remove(&name) && self.synced
            }
        }
    }

    fn reconcile(&mut self) -> Outcome {
        let retrying = std::mem::take(&mut self.retry);
        let mut out = Outcome::default();
        let own = self.nodes.get(&self.node_name).cloned();
        let (cidrs_before, mtu_before) = (self.own_cidrs.clone(), self.mtu);
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
                self.nodes.force_full();
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
        }

        // Before the patch and the peers' keepalive, which depend on it.
        if self.detect_nat() {
            self.nodes.force_full();
        }
        self.apply_revocations();
        if let Some(own) = self.nodes.get(&self.node_name).cloned() {
            let rv = self.own_rv.as_ref();
            // A NAT detected since the last patch flags the Node (--behind-nat-detect).
            let flag = self.behind_nat_detect && self.nat_seen.is_some() && !own.behind_nat;
            if rv.is_none() || rv != self.patched_at.as_ref() || flag {
                out.patch = self.annotation_patch(&own);
            }
        }
        let settings = Settings {
            self_name: self.node_name.clone(),
            self_key: self.own_key,
            default_port: self.listen_port,
            default_keepalive: self.effective_keepalive(),
            cluster_cidrs: self.cluster.clone(),
            host_addresses: self.host_addresses.clone(),
        };
        // Which peers go through a relay: when that changes, every peer is reselected (the
        // plan is then applied to all of them).
        let plan = match &own {
            Some(own) => relay::plan(own, self.behind_nat(), self.nodes.infos()),
            None => BTreeMap::new(),
        };
        if plan != self.relay_plan {
            for (name, r) in &plan {
                if self.relay_plan.get(name) != Some(r) {
                    info!(peer = %name, relay = %r.relay, endpoint = %r.endpoint, "both behind NAT: reaching the peer through a relay");
                }
            }
            self.relay_plan = plan;
            self.nodes.force_full();
        }
        // Only the Nodes that changed (all of them when a change touched a conflict).
        let done = self.nodes.reselect(&self.own_cidrs, &settings);
        for (_, was, now) in &done.changed {
            if let Some(Choice::Refused(r)) = was {
                self.rejected.remove(&(r.node.clone(), r.reason));
            }
            if let Some(Choice::Refused(r)) = now {
                if self.rejected.insert((r.node.clone(), r.reason)) {
                    warn!(node = %r.node, reason = r.reason.metric_label(), "Node skipped as a peer: {}", r.detail);
                    self.status.count_invalid(r.reason.metric_label());
                    out.new_rejections.push(r.clone());
                }
            }
        }
        // The device side of it: all peers after a full selection (the device may hold restored
        // peers no Node has any more), else the changed Nodes'.
        let (old, new): (BTreeMap<String, DesiredPeer>, BTreeMap<String, DesiredPeer>) =
            if done.full {
                (
                    self.applied.clone(),
                    self.nodes
                        .peers()
                        .map(|p| (p.node.clone(), p.clone()))
                        .collect(),
                )
            } else {
                let names: BTreeSet<&String> = done.changed.iter().map(|(n, _, _)| n).collect();
                (
                    names
                        .iter()
                        .filter_map(|n| self.applied.get(*n).map(|p| ((*n).clone(), p.clone())))
                        .collect(),
                    done.changed
                        .iter()
                        .filter_map(|(n, _, now)| match now {
                            Some(Choice::Peer(p)) => Some((n.clone(), p.clone())),
                            _ => None,
                        })
                        .collect(),
                )
            };
        let mut new = new;
        for p in new.values_mut() {
            if let Some(r) = self.relay_plan.get(&p.node) {
                p.endpoint = r.endpoint;
                p.relay = Some(r.relay.clone());
            }
        }
        let serving_changed = self.relay.is_some()
            && (done.full
                || self.relay_dirty
                || new.keys().chain(old.keys()).any(|n| {
                    self.relay_served.contains(n) || self.nodes.get(n).is_some_and(|i| i.behind_nat)
                }));
        let mut names_changed = false;
        let mut routes_changed = false;
        let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for name in names {
            match (old.get(name), new.get(name)) {
                (None, Some(p)) => {
                    info!(node = %name, endpoint = %p.endpoint, allowed_ips = %nets(&p.allowed_ips), keepalive = p.keepalive, "peer added");
                    names_changed = true;
                    routes_changed = true;
                }
                (Some(o), Some(p)) if o != p => {
                    info!(
                        node = %name,
                        endpoint = %p.endpoint,
                        allowed_ips = %nets(&p.allowed_ips),
                        keepalive = p.keepalive,
                        key_changed = o.public_key != p.public_key,
                        "peer changed"
                    );
                    // The names and the relays are published together.
                    names_changed |= o.public_key != p.public_key || o.relay != p.relay;
                    routes_changed |= o.allowed_ips != p.allowed_ips;
                }
                (Some(_), None) => {
                    info!(node = %name, "peer removed");
                    names_changed = true;
                    routes_changed = true;
                }
                _ => {}
            }
        }
        let changes = peers::plan(&old, &new);
        if !changes.is_empty() {
            let req = SetRequest {
                peers: changes,
                ..SetRequest::default()
            };
            if let Err(e) = self.device.apply(req, &mut self.net.clone()) {
                error!(error = %e, "applying peer changes to the device");
            }
        }
        // Also what the device does not hold changed (a peer now behind NAT): kept and saved.
        if old != new {
            for name in old.keys() {
                self.applied.remove(name);
            }
            self.applied.extend(new);
            self.state_dirty = true;
            if names_changed {
                self.publish_names();
            }
        }
        if serving_changed {
            self.serve_relay();
        }

        if self.external.pending() {
            let ext = self.reconcile_external();
            routes_changed |= ext.changed;
            out.peer_patches = ext.patches;
            out.psk_wanted = ext.psk_wanted;
        }

        let host_changed = self.own_cidrs != cidrs_before || self.mtu != mtu_before;
        if routes_changed || host_changed || retrying {
            self.program_host();
        }
        self.state_dirty |= host_changed;
        self.save_state();
        if out.patch.is_some() {
            debug!("Node annotations to publish");
        }
        out
    }

    /// Compares every direct peer's roamed endpoint with the one it publishes; true when the
    /// list to publish (`kwire.dev/nat-observed`) changed.
    fn observe_nat(&mut self) -> bool {
        let seen: std::collections::HashMap<PublicKey, SocketAddr> = self
            .device
            .info()
            .peers
            .iter()
            .filter_map(|p| Some((p.public_key, p.endpoint?)))
            .collect();
        let obs = relay::nat_observations(&self.applied, &seen);
        if obs == self.nat_observed {
            return false;
        }
        for (node, at) in &obs {
            if self.nat_observed.get(node) != Some(at) {
                info!(node = %node, seen_at = %at, "a peer's packets come from elsewhere than its published endpoint (behind NAT?)");
            }
        }
        self.nat_observed = obs;
        true
    }

    /// Whether another node sees this one behind NAT; says so (log, status) when it changes.
    /// True when that changes this node's keepalive.
    fn detect_nat(&mut self) -> bool {
        let seen = relay::seen_behind_nat(self.nodes.observing(), &self.node_name);
        if seen == self.nat_seen {
            return false;
        }
        let keepalive_before = self.effective_keepalive();
        match &seen {
            Some((by, at)) if !self.behind_nat() && self.behind_nat_detect => warn!(
                seen_by = %by,
                seen_at = %at,
                "this node is behind NAT: node {by} receives its packets from {at}, not its published endpoint; flagging the Node {}=true (--behind-nat-detect), so that two nodes behind NAT use a relay",
                annotations::BEHIND_NAT
            ),
            Some((by, at)) if !self.behind_nat() => warn!(
                seen_by = %by,
                seen_at = %at,
                "this node looks behind NAT: node {by} receives its packets from {at}, not its published endpoint; keeping mappings open with a {NAT_KEEPALIVE} s keepalive. Set --behind-nat (or annotate the Node {}=true) so that two nodes behind NAT use a relay",
                annotations::BEHIND_NAT
            ),
            Some((by, at)) => {
                info!(seen_by = %by, seen_at = %at, "behind NAT, as flagged: a peer sees this node's packets from another address")
            }
            None => info!("no peer sees this node behind NAT any more"),
        }
        self.status
            .nat_seen
            .store(Arc::new(seen.as_ref().map(|(by, at)| {
                format!("node {by} receives this node's packets from {at}")
            })));
        self.nat_seen = seen;
        self.effective_keepalive() != keepalive_before
    }

    /// The keepalive for peers without their own: behind NAT (flagged or detected), at least
    /// [`NAT_KEEPALIVE`].
    fn effective_keepalive(&self) -> u16 {
        match (
            self.behind_nat() || self.nat_seen.is_some(),
            self.default_keepalive,
        ) {
            (true, 0) => NAT_KEEPALIVE,
            (_, k) => k,
        }
    }

    /// Selects the Peers against the Nodes as applied now and applies the device changes.
    fn reconcile_external(&mut self) -> external::Outcome {
        let mut ctx = external::Context {
            cluster: self.cluster.iter().chain(&self.services).copied().collect(),
            node_addresses: self.host_addresses.iter().copied().collect(),
            node_keys: self.applied.values().map(|p| p.public_key).collect(),
            psks: BTreeMap::new(),
        };
        ctx.node_keys.insert(self.own_key);
        for n in self.nodes.names().filter_map(|n| self.nodes.get(n)) {
            ctx.node_addresses.extend(n.addresses.iter().copied());
            let ep = n
                .endpoint
                .as_deref()
                .and_then(|e| e.parse::<SocketAddr>().ok());
            ctx.node_addresses.extend(ep.map(|e| e.ip()));
        }
        ctx.node_addresses
            .extend(self.applied.values().map(|p| p.endpoint.ip()));
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map_or_else(|_| String::new(), |t| t.to_string());
        let mut out = self.external.reconcile(ctx, &now);
        // One agent writes the Peers' conditions (all judge alike): not one write per node.
        if !self.writes_peer_status() {
            out.patches.clear();
        }
        for (name, reason, message) in &out.refused {
            warn!(peer = %name, reason = reason.metric_label(), "Peer refused: {message}");
            self.status.count_invalid(reason.metric_label());
        }
        if !out.changes.is_empty() {
            self.state_dirty = true;
            for c in &out.changes {
                info!(public_key = %c.public_key, removed = c.remove, allowed_ips = %nets(&c.allowed_ips), "external peer configured");
            }
            let req = SetRequest {
                peers: std::mem::take(&mut out.changes),
                ..SetRequest::default()
            };
            if let Err(e) = self.device.apply(req, &mut self.net.clone()) {
                error!(error = %e, "applying Peer changes to the device");
            }
        }
        if out.changed {
            self.status
                .external_peer_names
                .store(Arc::new(self.external.names()));
        }
        out
    }

    /// Whether this agent writes the Peers' `Accepted` conditions: the one on the oldest Node
    /// (creationTimestamp, then name) that publishes a key, the same rule on every agent. If
    /// that agent is down, conditions wait until it is back or its Node is deleted.
    fn writes_peer_status(&self) -> bool {
        external::status_writer(self.nodes.infos()).is_none_or(|n| n == self.node_name)
    }

    /// Writes Peers' `Accepted` conditions (only [`Agent::writes_peer_status`]; a failure waits for
    /// the next change or the retry tick).
    async fn write_peer_statuses(
        &mut self,
        api: &Api<kube::api::DynamicObject>,
        patches: Vec<(String, serde_json::Value)>,
    ) {
        let pp = PatchParams::default();
        for (name, patch) in patches {
            let r = tokio::time::timeout(
                API_WRITE_TIMEOUT,
                api.patch_status(&name, &pp, &Patch::Merge(&patch)),
            )
            .await;
            match r {
                Ok(Ok(_)) => debug!(peer = %name, "wrote the Peer's Accepted condition"),
                Ok(Err(e)) => {
                    warn!(peer = %name, error = %e, "writing the Peer's Accepted condition failed; retrying");
                    self.retry = true;
                }
                Err(_) => {
                    warn!(peer = %name, "writing the Peer's Accepted condition timed out; retrying");
                    self.retry = true;
                }
            }
        }
    }

    /// Reads Peers' preshared keys from their Secrets (`get` by name in
    /// [`external::PSK_NAMESPACE`]: all deploy/ grants). The key never reaches a log.
    async fn read_psks(
        &mut self,
        api: &Api<k8s_openapi::api::core::v1::Secret>,
        names: Vec<String>,
    ) {
        for name in names {
            let key = match tokio::time::timeout(API_WRITE_TIMEOUT, api.get(&name)).await {
                Ok(Ok(secret)) => {
                    let data = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(external::PSK_DATA_KEY));
                    let key = data.and_then(|b| external::psk_from_secret_data(&b.0));
                    if key.is_none() {
                        warn!(secret = %name, namespace = external::PSK_NAMESPACE, "the Secret holds no valid preshared key under {:?}", external::PSK_DATA_KEY);
                    }
                    key
                }
                Ok(Err(e)) => {
                    warn!(secret = %name, namespace = external::PSK_NAMESPACE, error = %e, "reading a Peer's preshared key Secret failed; retrying");
                    None
                }
                Err(_) => {
                    warn!(secret = %name, "reading a Peer's preshared key Secret timed out; retrying");
                    None
                }
            };
            self.external.psk_read(&name, key);
        }
    }

    /// Hands the state file's contents to its writer if what it holds changed, at most every
    /// [`STATE_SAVE_INTERVAL`] (the retry tick hands over what waited).
    fn save_state(&mut self) {
        if !self.state_dirty
            || self
                .state_saved_at
                .is_some_and(|t| t.elapsed() < STATE_SAVE_INTERVAL)
        {
            return;
        }
        let st = state::State {
            pod_cidrs: self.own_cidrs.clone(),
            mtu: Some(self.mtu),
            peers: self.applied.clone(),
            external: self.external.applied.clone(),
            external_psks: self.external.applied_psks.clone(),
        };
        // Written on the writer's thread (it retries a failed write itself).
        self.state_writer.submit(st);
        self.state_dirty = false;
        self.state_saved_at = Some(Instant::now());
    }

    /// The merge patch that makes this Node's kwire annotations right, if they are not.
    fn annotation_patch(&self, own: &NodeInfo) -> Option<serde_json::Value> {
        let key = self.own_key.to_base64();
        let endpoint = self.endpoint_override.or_else(|| {
            own.internal_ips
                .first()
                .map(|ip| SocketAddr::new(*ip, self.listen_port))
        });
        let mut patch = serde_json::Map::new();
        if own.public_key.as_deref() != Some(key.as_str()) {
            patch.insert(annotations::PUBLIC_KEY.into(), key.into());
        }
        // The next key while rotating; none (a merge patch's null removes it) otherwise.
        let next = self.keys.next_public().map(|k| k.to_base64());
        if own.next_public_key != next {
            patch.insert(
                annotations::NEXT_PUBLIC_KEY.into(),
                next.map_or(serde_json::Value::Null, Into::into),
            );
        }
        let listed = own.parsed_revoked_keys();
        if self.own_revoked.iter().any(|k| !listed.contains(k)) {
            patch.insert(
                annotations::REVOKED_KEYS.into(),
                rotation::revoked_annotation(&listed, &self.own_revoked).into(),
            );
        }
        // The peers this node sees behind NAT: they read it and learn it.
        let observed = relay::nat_annotation(&self.nat_observed);
        if own.nat_observed != observed {
            patch.insert(
                annotations::NAT_OBSERVED.into(),
                observed.map_or(serde_json::Value::Null, Into::into),
            );
        }
        // Its peers must know it is behind NAT (two such nodes go through a relay).
        // Detected, with --behind-nat-detect: flagged for good (withdrawn with the
        // observation, the pair's relay would come and go with the NAT's mappings).
        let detected = self.behind_nat_detect && self.nat_seen.is_some();
        if (self.behind_nat_flag || detected) && !own.behind_nat {
            patch.insert(annotations::BEHIND_NAT.into(), "true".into());
        }
        // The Service ranges it serves to external Peers (their entry node translates).
        let services = (!self.services.is_empty()).then(|| {
            self.services
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        });
        if own.service_cidr != services {
            patch.insert(
                annotations::SERVICE_CIDR.into(),
                services.map_or(serde_json::Value::Null, Into::into),
            );
        }
        // A reachable node with its relay running offers it; any other withdraws it.
        let relay = endpoint
            .filter(|_| self.relay.is_some() && !self.behind_nat())
            .map(|ep| SocketAddr::new(ep.ip(), self.relay_port).to_string());
        if own.relay_endpoint != relay {
            patch.insert(
                annotations::RELAY_ENDPOINT.into(),
                relay.map_or(serde_json::Value::Null, Into::into),
            );
        }
        match endpoint {
            Some(ep) => {
                let ep = ep.to_string();
                if own.endpoint.as_deref() != Some(ep.as_str()) {
                    patch.insert(annotations::ENDPOINT.into(), ep.into());
                }
            }
            None => {
                debug!(node = %self.node_name, "no InternalIP and no --endpoint: no endpoint to publish")
            }
        }
        (!patch.is_empty()).then(|| serde_json::json!({ "metadata": { "annotations": patch } }))
    }

    /// Every peer's session as rotation sees it.
    fn peer_sessions(&self) -> Vec<rotation::PeerSession> {
        let keys = self.device.session_keys();
        let now = SystemTime::now();
        self.device
            .info()
            .peers
            .iter()
            .filter_map(|p| {
                let (pair, rx) = *keys.get(&p.public_key)?;
                Some(rotation::PeerSession {
                    pair,
                    rx,
                    handshake_age: p
                        .last_handshake
                        .map(|t| now.duration_since(t).unwrap_or_default()),
                })
            })
            .collect()
    }

    /// Once per [`rotation::CHECK_INTERVAL`]: starts a rotation `--key-rotation-interval`
    /// calls for, moves one under way on. True when the Node's annotations must change.
    fn rotation_tick(&mut self) -> bool {
        let Some(next) = self.keys.next_public() else {
            if self.synced
                && rotation::due(self.rotation_interval, self.keys.written, SystemTime::now())
            {
                return match self.start_rotation("--key-rotation-interval") {
                    Ok(_) => true,
                    Err(e) => {
                        warn!(error = %e, "starting a key rotation");
                        false
                    }
                };
            }
            return false;
        };
        let published = self
            .nodes
            .get(&self.node_name)
            .and_then(|n| n.next_public_key.as_deref())
            == Some(next.to_base64().as_str());
        let elapsed = self.keys.started.map_or(Duration::ZERO, |t| t.elapsed());
        let sessions = self.peer_sessions();
        match rotation::progress(next, published, elapsed, self.rotation_grace, &sessions) {
            rotation::Progress::Wait => false,
            rotation::Progress::PromoteAllMoved => {
                self.promote("every peer that is up moved to the new key")
            }
            rotation::Progress::PromoteGraceOver { behind } => self.promote(&format!(
                "grace period over with {behind} peer(s) still on the old key (they handshake again to the new one)"
            )),
            rotation::Progress::AbortUnpublished => {
                self.abort_rotation(&format!(
                    "{} could not be published on the Node within {:?}",
                    annotations::NEXT_PUBLIC_KEY,
                    self.rotation_grace
                ));
                true
            }
        }
    }

    /// `kwire key rotate|revoke`.
    fn key_command(&mut self, c: keyctl::KeyCommand) -> Result<String, String> {
        match c {
            keyctl::KeyCommand::Rotate => self.start_rotation("kwire key rotate"),
            keyctl::KeyCommand::Revoke => self.revoke_own("kwire key revoke"),
        }
    }

    /// Starts a make-before-break rotation: the next key on disk, in the device (answering
    /// handshakes to both keys) and, with the next reconcile, on the Node.
    fn start_rotation(&mut self, why: &str) -> Result<String, String> {
        if let Some(next) = self.keys.next_public() {
            return Err(format!(
                "a key rotation is under way already (to {next}); see `kwire status`"
            ));
        }
        let next = keyfile::create_next(&self.state_dir).map_err(|e| e.to_string())?;
        let pk = next.public_key();
        self.device.set_next_private_key(Some(next.clone()));
        self.keys.next = Some(next);
        self.keys.started = Some(Instant::now());
        self.status.update_keys(|k| {
            k.next_public_key = Some(pk);
            k.rotation_started = Some(SystemTime::now());
        });
        self.patched_at = None;
        info!(next_public_key = %pk, trigger = why, "key rotation started");
        self.key_events.push((
            false,
            "KeyRotationStarted",
            format!("rotating to public key {pk} ({why}): this node answers handshakes to both keys until every peer that is up uses the new one"),
        ));
        Ok(format!(
            "key rotation started: next public key {pk}; `kwire status` shows its progress"
        ))
    }

    /// Promotes the next key (disk, device, Node) and wipes the old one. False (retried on
    /// the next tick) when the key file could not be replaced.
    fn promote(&mut self, why: &str) -> bool {
        let Some(next) = self.keys.next.clone() else {
            return false;
        };
        if let Err(e) = keyfile::promote_next(&self.state_dir) {
            warn!(error = %e, "promoting the next key on disk; retrying");
            return false;
        }
        let old = self.keys.public();
        self.device.set_private_key(Some(next.clone()));
        self.keys.current = next;
        self.keys.next = None;
        self.keys.started = None;
        self.keys.written = Some(SystemTime::now());
        let new = self.keys.public();
        self.set_own_key(new);
        self.status.update_keys(|k| {
            k.written = Some(SystemTime::now());
            k.next_public_key = None;
            k.rotation_started = None;
            k.last_outcome = Some(format!("rotation to {new} completed: {why}"));
            k.rotations_completed += 1;
        });
        self.patched_at = None;
        info!(public_key = %new, old_public_key = %old, reason = why, "key rotation completed; the old key is wiped");
        self.key_events.push((
            false,
            "KeyRotationCompleted",
            format!("public key is now {new} (was {old}): {why}; the old private key is wiped"),
        ));
        true
    }

    /// Abandons the rotation under way: the next key is wiped, the current one stays.
    fn abort_rotation(&mut self, why: &str) {
        let Some(next) = self.keys.next_public() else {
            return;
        };
        keyfile::discard_next(&self.state_dir);
        self.device.set_next_private_key(None);
        self.keys.next = None;
        self.keys.started = None;
        self.status.update_keys(|k| {
            k.next_public_key = None;
            k.rotation_started = None;
            k.last_outcome = Some(format!("rotation to {next} aborted: {why}"));
            k.rotations_aborted += 1;
        });
        self.patched_at = None;
        warn!(next_public_key = %next, reason = why, "key rotation aborted");
        self.key_events.push((
            true,
            "KeyRotationAborted",
            format!("rotation to {next} aborted: {why}; the current key stays"),
        ));
    }

    /// Replaces this node's key at once and revokes the old one: a fresh key on disk, in the
    /// device and on the Node, the old key listed in its `kwire.dev/revoked-keys` (every node
    /// drops sessions made with it and refuses it from then on).
    fn revoke_own(&mut self, why: &str) -> Result<String, String> {
        if self.keys.next.is_some() {
            self.abort_rotation("the current key was revoked");
        }
        let old = self.keys.public();
        let fresh = crate::wg::key::PrivateKey::generate();
        keyfile::replace_current(&self.state_dir, &fresh).map_err(|e| e.to_string())?;
        self.device.set_private_key(Some(fresh.clone()));
        self.keys.current = fresh;
        self.keys.written = Some(SystemTime::now());
        let new = self.keys.public();
        self.set_own_key(new);
        if !self.own_revoked.contains(&old) {
            self.own_revoked.push(old);
        }
        self.revoked.insert(old);
        self.status.update_keys(|k| {
            k.written = Some(SystemTime::now());
            k.last_outcome = Some(format!("{old} revoked ({why}); new key {new}"));
            k.revocations += 1;
        });
        self.patched_at = None;
        warn!(revoked = %old, public_key = %new, reason = why, "key revoked; every node refuses the old key");
        self.key_events.push((
            true,
            "KeyRevoked",
            format!("public key {old} revoked ({why}); new public key {new}. Every kwire node drops sessions made with the old key and refuses it from now on"),
        ));
        Ok(format!(
            "key {old} revoked; new public key {new}, being published on the Node"
        ))
    }

    /// Takes in every key the Nodes' `kwire.dev/revoked-keys` list: the device refuses them;
    /// this node's own key among them (an administrator revoked it) is replaced at once.
    fn apply_revocations(&mut self) {
        let mut revoked = self.revoked.clone();
        for n in self.nodes.revoking() {
            revoked.extend(n.parsed_revoked_keys());
        }
        if revoked != self.revoked {
            info!(
                keys = revoked.len(),
                "revoked keys: sessions made with them end, and they are refused"
            );
            self.revoked = revoked;
            self.device.set_revoked(self.revoked.clone());
        }
        if self.revoked.contains(&self.keys.public()) {
            if let Err(e) = self.revoke_own(&format!("listed in {}", annotations::REVOKED_KEYS)) {
                error!(error = %e, "replacing this node's revoked key");
            }
        } else if self
            .keys
            .next_public()
            .is_some_and(|k| self.revoked.contains(&k))
        {
            self.abort_rotation("the next key was revoked");
        }
    }

    /// This node's public key changed (promotion, revocation).
    fn set_own_key(&mut self, key: PublicKey) {
        self.own_key = key;
        self.nodes.set_self_key(key);
    }

    /// Records an Event about this node's key on its Node.
    fn key_event(
        &self,
        recorder: &Arc<Recorder>,
        warning: bool,
        reason: &'static str,
        note: String,
    ) {
        let ty = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        node_event(recorder, &self.node_name, ty, reason, note, "RotateKey");
    }

    fn record_event(&self, recorder: &Arc<Recorder>, r: peers::Rejection) {
        if self.nodes.get(&r.node).is_none() {
            return;
        }
        let note = format!(
            "kwire skips this Node as a WireGuard peer ({}): {}",
            r.reason.metric_label(),
            r.detail
        );
        node_event(
            recorder,
            &r.node,
            EventType::Warning,
            r.reason.event_reason(),
            note,
            "SelectPeers",
        );
    }
}

/// Records an Event on Node `node` (in the background; a failure is logged at debug).
fn node_event(
    recorder: &Arc<Recorder>,
    node: &str,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_string()),
        ..ObjectReference::default()
    };
    let recorder = recorder.clone();
    let node = node.to_string();
    let ev = K8sEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            debug!(node = %node, error = %e, "recording a Kubernetes Event failed");
        }
    });
}
