//! The agent's pods: once this node's pod CIDRs are known, serve the CNI socket and plug each
//! pod's tun into the packet loop; make the host forward and masquerade what pods send to the
//! outside world. From the start, the host firewall ([`Firewall`]) keeps plaintext from other
//! hosts away from the pods and the cluster's ranges off every interface but the tun.

use super::sysctl;
use crate::cni::{CniServer, CniServerConfig, PodAttachment, PodDataPlane};
use crate::datapath::stats::{Counters, DropReason};
use crate::dataplane::ports::{PodName, Pods};
use crate::services::table::Steering;
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// The node's pod CIDRs and tunnel MTU, as the agent learns them.
pub type CidrWatch = watch::Receiver<(Vec<IpNetwork>, u32)>;

/// Connects the CNI server to the packet loop: attachments become loop ports.
struct LoopPods {
    pods: Arc<Pods>,
    ids: Mutex<HashMap<(String, String), u64>>,
}

impl PodDataPlane for LoopPods {
    fn attach(&self, pod: PodAttachment) {
        let key = (pod.container_id.clone(), pod.ifname.clone());
        let name = PodName {
            namespace: pod.pod_namespace.clone(),
            name: pod.pod_name.clone(),
        };
        match self.pods.attach(name, pod.ips.clone(), pod.tun) {
            Ok(id) => {
                info!(container = %pod.container_id, pod = ?pod.pod_name, ips = ?pod.ips, "pod plugged into the packet loop");
                if let Some(old) = self
                    .ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, id)
                {
                    self.pods.detach(old);
                }
            }
            Err(e) => {
                error!(container = %pod.container_id, error = %e, "cannot plug the pod's tun into the packet loop")
            }
        }
    }

    fn detach(&self, container_id: &str, ifname: &str) {
        let id = self
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(container_id.to_string(), ifname.to_string()));
        if let Some(id) = id {
            self.pods.detach(id);
        }
    }
}

/// The node's gateway addresses: the first address of each pod CIDR (on the host tun).
pub fn gateways(cidrs: &[IpNetwork]) -> Vec<IpAddr> {
    cidrs
        .iter()
        .map(|c| super::routes::gateway(c).ip())
        .collect()
}

/// The host firewall kwire owns (`table inet kwire`, recreated whole in one `nft -f -`
/// transaction): what keeps plaintext off the node's pods and the cluster's ranges off every
/// other interface, and the pods' masquerading.
#[derive(Debug, Clone)]
pub struct Firewall {
    /// The host tun (`kwire0`).
    pub ifname: String,
    /// `--cluster-cidr`.
    pub cluster: Vec<IpNetwork>,
    /// `--service-cidr`.
    pub services: Vec<IpNetwork>,
    /// The loop's counters: the firewall's drops are added to them.
    pub counters: Arc<Counters>,
    /// The node ports and ingress IPs the kernel steers into the loop (the Service watch
    /// sets them; the ruleset carries the current ones whenever it is installed).
    pub steering: Arc<Mutex<Steering>>,
}

/// Protocol name in an nftables set element.
fn nft_proto(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        _ => "sctp",
    }
}

/// The elements of the steering sets and maps, as `nft` spells them (empty: none).
fn steering_elements(st: &Steering) -> [(&'static str, String); 4] {
    let ports = |masq_only: bool| {
        st.node_ports
            .iter()
            .filter(|n| !masq_only || n.masquerade)
            .map(|n| format!("{} . {}", nft_proto(n.proto), n.port))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ingress = |v4: bool| {
        st.ingress
            .iter()
            .filter(|i| i.ip.is_ipv4() == v4)
            .map(|i| {
                format!(
                    "{} . {} . {} : {}",
                    i.ip,
                    nft_proto(i.proto),
                    i.port,
                    i.node_port
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    [
        (SET_NODE_PORTS, ports(false)),
        (SET_MASQUERADE, ports(true)),
        (MAP_INGRESS4, ingress(true)),
        (MAP_INGRESS6, ingress(false)),
    ]
}

/// nftables set of the node ports (`protocol . port`) steered into the loop.
pub const SET_NODE_PORTS: &str = "node_ports";
/// nftables set of the node ports of `externalTrafficPolicy: Cluster` Services: masqueraded
/// to this node's gateway address, so that replies come back through this node.
pub const SET_MASQUERADE: &str = "node_ports_masquerade";
/// nftables maps of LoadBalancer ingress IPs (`address . protocol . port`) to node ports.
pub const MAP_INGRESS4: &str = "ingress4";
pub const MAP_INGRESS6: &str = "ingress6";

/// nftables counter of packets from another interface forwarded toward the tun (plaintext
/// from the underlay aimed at a pod, or at a peer's pods through this node) and dropped.
pub const COUNTER_UNDERLAY: &str = "underlay_plaintext";
/// nftables counter of packets to a cluster or Service range about to leave by an interface
/// other than the tun (a more specific foreign route, or a Service nothing translated), refused.
pub const COUNTER_ESCAPE: &str = "cluster_escape";
/// How often the firewall's counters are added to the loop's drop counters.
pub const FIREWALL_COUNTER_INTERVAL: Duration = Duration::from_secs(5);

impl Firewall {
    /// The whole ruleset for this node's pod CIDRs `own` (none yet: no masquerading).
    pub fn ruleset(&self, own: &[IpNetwork]) -> String {
        self.ruleset_with(own, &self.lock_steering())
    }

    /// [`Self::ruleset`] with the steering sets `steering`.
    fn ruleset_with(&self, own: &[IpNetwork], steering: &Steering) -> String {
        let tun = &self.ifname;
        let ranges: Vec<&IpNetwork> = self.cluster.iter().chain(&self.services).collect();
        let set = |v4: bool| -> Option<String> {
            let e: Vec<String> = ranges
                .iter()
                .filter(|r| r.is_ipv4() == v4)
                .map(ToString::to_string)
                .collect();
            (!e.is_empty()).then(|| e.join(", "))
        };
        let mut guard = String::new();
        for (fam, v4) in [("ip", true), ("ip6", false)] {
            if let Some(elems) = set(v4) {
                guard.push_str(&format!(
                    "    {fam} daddr {{ {elems} }} oifname != {{ \"{tun}\", \"lo\" }} counter name {COUNTER_ESCAPE} reject with icmpx type admin-prohibited\n"
                ));
            }
        }
        let mut nat = String::new();
        for c in own {
            let fam = if c.is_ipv4() { "ip" } else { "ip6" };
            nat.push_str(&format!(
                "    {fam} saddr {c} oifname != \"{tun}\" masquerade\n"
            ));
            // Hairpin: a pod's connection that the kernel DNATed (a hostPort) back to a pod on
            // this node. Without this the answer would go pod to pod inside the packet loop,
            // past the kernel's conntrack, and never be un-NATed; from the node's gateway
            // address it comes back through the kernel.
            nat.push_str(&format!(
                "    {fam} saddr {c} oifname \"{tun}\" ct status dnat masquerade\n"
            ));
        }
        let (sets, dnat, mut masq) = self.node_port_rules(steering);
        masq.insert_str(0, &self.peer_service_rules());
        format!(
            "add table inet kwire
delete table inet kwire
table inet kwire {{
  counter {COUNTER_UNDERLAY} {{ }}
  counter {COUNTER_ESCAPE} {{ }}
{sets}  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dnat}  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    fib daddr type local ip daddr 127.0.0.0/8 return
    fib daddr type local ip6 daddr ::1 return
{dnat}  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    # Into the tun only what came out of it, or what this node translated: a hostPort
    # (DNAT) or the answer to a pod's masqueraded connection. Plaintext from another host,
    # whatever its source address, stops here.
    oifname \"{tun}\" iifname != \"{tun}\" ct status dnat accept
    oifname \"{tun}\" iifname != \"{tun}\" ct direction reply ct status snat accept
    oifname \"{tun}\" iifname != \"{tun}\" ct state related ct status snat accept
    oifname \"{tun}\" iifname != \"{tun}\" counter name {COUNTER_UNDERLAY} drop
{guard}  }}
  chain output {{
    type filter hook output priority filter - 10; policy accept;
{guard}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
{masq}{nat}  }}
}}
"
        )
    }

    fn lock_steering(&self) -> std::sync::MutexGuard<'_, Steering> {
        self.steering.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node-port address per family (the network address of the first `--service-cidr`
    /// of the family, which kube-apiserver never allocates): the loop's key for node ports.
    fn node_port_addrs(&self) -> Vec<IpAddr> {
        crate::services::table::Scope::new("", &self.services).node_port_addrs
    }

    /// Node-port steering: the sets (with `st`'s elements), the DNAT rules (prerouting and
    /// locally generated traffic alike) and the masquerading.
    ///
    /// A packet for any local address on a node port, or for an ingress IP's port, is
    /// DNATed to the node-port address of its family with the node port as port; the route
    /// of the Service range takes it into the tun, where the loop translates it like a
    /// ClusterIP (its frontend is `(protocol, node-port address, nodePort)`). The forward
    /// filter lets it in because it is DNATed (`ct status dnat`), like a hostPort. For
    /// `externalTrafficPolicy: Cluster`, and for the node's own traffic, the source is
    /// masqueraded to the tun's address (this node's gateway), so replies from a backend on
    /// any node come back here and the kernel turns them back; for `Local` the client's
    /// address is kept and the loop picks a local endpoint.
    fn node_port_rules(&self, st: &Steering) -> (String, String, String) {
        let tun = &self.ifname;
        let mut sets = String::new();
        for (name, elems) in steering_elements(st) {
            let ty = match name {
                MAP_INGRESS4 => "map",
                MAP_INGRESS6 => "map",
                _ => "set",
            };
            let key = match name {
                MAP_INGRESS4 => "ipv4_addr . inet_proto . inet_service : inet_service",
                MAP_INGRESS6 => "ipv6_addr . inet_proto . inet_service : inet_service",
                _ => "inet_proto . inet_service",
            };
            let elems = if elems.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {elems} }};")
            };
            sets.push_str(&format!("  {ty} {name} {{ type {key};{elems} }}\n"));
        }
        let (mut dnat, mut masq) = (String::new(), String::new());
        for at in self.node_port_addrs() {
            let (fam, nf, to, map) = match at {
                IpAddr::V4(a) => ("ip", "ipv4", a.to_string(), MAP_INGRESS4),
                IpAddr::V6(a) => ("ip6", "ipv6", format!("[{a}]"), MAP_INGRESS6),
            };
            dnat.push_str(&format!(
                "    fib daddr type local meta nfproto {nf} meta l4proto . th dport @{SET_NODE_PORTS} dnat {fam} to {to}\n"
            ));
            dnat.push_str(&format!(
                "    meta nfproto {nf} meta l4proto {{ tcp, udp, sctp }} {fam} daddr . meta l4proto . th dport @{map} dnat {fam} to {to} : {fam} daddr . meta l4proto . th dport map @{map}\n"
            ));
            masq.push_str(&format!(
                "    oifname \"{tun}\" {fam} daddr {at} meta l4proto . th dport @{SET_MASQUERADE} masquerade\n"
            ));
            masq.push_str(&format!(
                "    oifname \"{tun}\" {fam} daddr {at} fib saddr type local masquerade\n"
            ));
        }
        (sets, dnat, masq)
    }

    /// An external Peer's flows to ClusterIPs, which the loop hands to the host tun on the
    /// Peer's entry node (`datapath::service::from_peer`): in by the tun and back out by it,
    /// to a Service range, masqueraded to the tun's address (this node's gateway) with source
    /// ports the loop tells from the node's own (`service::PEER_MASQUERADE_PORTS`), so that
    /// the backend's replies, on any node, come back here and the kernel turns them back to
    /// the Peer. Nothing else enters by the tun to leave by it again: the loop hands the
    /// host only its own addresses and these.
    fn peer_service_rules(&self) -> String {
        let tun = &self.ifname;
        let ports = crate::datapath::service::PEER_MASQUERADE_PORTS;
        let mut r = String::new();
        for (fam, v4) in [("ip", true), ("ip6", false)] {
            let ranges: Vec<String> = self
                .services
                .iter()
                .filter(|c| c.is_ipv4() == v4)
                .map(ToString::to_string)
                .collect();
            if ranges.is_empty() {
                continue;
            }
            r.push_str(&format!(
                "    iifname \"{tun}\" oifname \"{tun}\" {fam} daddr {{ {} }} meta l4proto {{ tcp, udp, sctp }} masquerade to :{}-{}\n",
                ranges.join(", "),
                ports.start(),
                ports.end()
            ));
        }
        r
    }

    /// Installs the ruleset (one transaction: no moment without the filter).
    /// The steering lock is held until `nft` is done, so that a steering update cannot land
    /// between rendering the ruleset and replacing the table (and be lost with it).
    pub fn install(&self, own: &[IpNetwork]) -> std::io::Result<()> {
        let steering = self.lock_steering();
        nft(&["-f", "-"], Some(&self.ruleset_with(own, &steering))).map(drop)
    }

    /// Keeps `st` for the next install without running `nft`: at start, before the first
    /// install, which carries it (the table may not exist yet after a reboot).
    pub fn keep_steering(&self, st: &Steering) {
        *self.lock_steering() = st.clone();
    }

    /// Steers these node ports and ingress IPs into the loop from now on: the sets and maps
    /// are replaced in one transaction (the rest of the ruleset, and its counters, stay).
    pub fn set_steering(&self, st: &Steering) -> std::io::Result<()> {
        let mut g = self.lock_steering();
        if *g == *st {
            return Ok(());
        }
        // Kept even if `nft` fails: the next install carries it.
        *g = st.clone();
        let mut script = String::new();
        for (name, elems) in steering_elements(st) {
            let ty = if name.starts_with("ingress") {
                "map"
            } else {
                "set"
            };
            script.push_str(&format!("flush {ty} inet kwire {name}\n"));
            if !elems.is_empty() {
                script.push_str(&format!("add element inet kwire {name} {{ {elems} }}\n"));
            }
        }
        nft(&["-f", "-"], Some(&script)).map(drop)
    }

    /// Adds what the firewall dropped since the last look to the loop's drop counters, until
    /// the task is aborted.
    pub async fn count_drops(self) {
        let mut last: HashMap<String, u64> = HashMap::new();
        // The first look one interval after the install (whose counters start at zero), not
        // at once: an `nft` run less while the agent starts.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + FIREWALL_COUNTER_INTERVAL,
            FIREWALL_COUNTER_INTERVAL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            let out = tokio::task::spawn_blocking(|| {
                nft(&["-j", "list", "counters", "table", "inet", "kwire"], None)
            })
            .await;
            let text = match out {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    if !warned {
                        warn!(error = %e, "cannot read the firewall's drop counters");
                        warned = true;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            for (name, now) in parse_counters(&text) {
                let before = last.insert(name.clone(), now).unwrap_or(0);
                // A recreated table starts from zero again.
                let delta = if now >= before { now - before } else { now };
                let reason = match name.as_str() {
                    COUNTER_UNDERLAY => DropReason::UnderlayPlaintext,
                    COUNTER_ESCAPE => DropReason::NoPeer,
                    _ => continue,
                };
                self.counters.drop_n(reason, delta);
            }
        }
    }
}

/// (name, packets) of each counter in `nft -j list counters` output.
pub fn parse_counters(json: &str) -> Vec<(String, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    v["nftables"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    let c = i.get("counter")?;
                    Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `nft ARGS` with `stdin`; its stdout.
fn nft(args: &[&str], stdin: Option<&str>) -> std::io::Result<String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the firewall at once (before any pod exists), waits for the pod CIDRs, then
/// serves CNI until the task is aborted.
///
/// A restarted agent knows its pod CIDRs from the state file: it installs the whole ruleset
/// once, then re-attaches the pods. Each `nft` run costs tens of milliseconds, and more on a
/// loaded node, on the way to forwarding the pods' traffic again (the previous agent's table
/// guards the node meanwhile: it outlives the agent).
pub async fn serve(
    mut cidrs: CidrWatch,
    pods: Arc<Pods>,
    firewall: Firewall,
    run_dir: PathBuf,
    state_dir: PathBuf,
) {
    let mut counting = None;
    if cidrs.borrow().0.is_empty() {
        // A first start: the ranges are guarded until the API gives this node's pod CIDRs.
        if let Err(e) = firewall.install(&[]) {
            error!(error = %e, "cannot install the host firewall (table inet kwire): plaintext from other hosts is not kept from the tun");
        }
        counting = Some(AbortOnDrop(tokio::spawn(firewall.clone().count_drops())));
    }
    let (own, mtu) = loop {
        let v = cidrs.borrow_and_update().clone();
        if !v.0.is_empty() {
            break v;
        }
        if cidrs.changed().await.is_err() {
            return;
        }
    };
    pods.set_gateways(gateways(&own));
    pods.set_mtu(mtu);
    if let Err(e) = host_forwarding(&firewall, &own) {
        warn!(error = %e, "pods cannot reach the outside world until forwarding and masquerading work");
    }
    let _counting =
        counting.unwrap_or_else(|| AbortOnDrop(tokio::spawn(firewall.clone().count_drops())));
    let cfg = CniServerConfig {
        run_dir,
        del_queue_dir: state_dir.join("cni-del-queue"),
        state_dir,
        pod_cidrs: own.clone(),
        mtu,
    };
    let dp = Arc::new(LoopPods {
        pods,
        ids: Mutex::new(HashMap::new()),
    });
    let server = match tokio::task::spawn_blocking(move || CniServer::new(cfg, dp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            error!(error = %e, "the CNI server cannot start: pods on this node get no network");
            return;
        }
        Err(e) => {
            error!(error = %e, "the CNI server cannot start");
            return;
        }
    };
    let listener = match server.listen() {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot listen for CNI requests");
            return;
        }
    };
    server.set_ready(true);
    info!(socket = %server.socket_path().display(), pods = server.pods().len(), "serving CNI");
    server.serve(listener, std::future::pending()).await;
}

/// Turns a forwarding sysctl on, unless it is on already (through the node's `/proc/sys/net`
/// mount in a container, see [`sysctl`]); the error says what to do.
fn forwarding_on(key: &str) -> std::io::Result<()> {
    if sysctl::get(key)? == "1" {
        return Ok(());
    }
    sysctl::set(key, "1")
}

/// Aborts a task when dropped (the counting task ends with the serving one).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pods reach the node and the outside world through the host tun: the kernel forwards and
/// masquerades what leaves any other interface with a pod source address.
fn host_forwarding(firewall: &Firewall, own: &[IpNetwork]) -> std::io::Result<()> {
    // The filter first: forwarding is never on without it (after a restart this is the
    // only install).
    firewall.install(own).map_err(|e| {
        std::io::Error::other(format!(
            "cannot install the host firewall (table inet kwire), plaintext from other hosts is not kept from the tun: {e}"
        ))
    })?;
    forwarding_on("ipv4/ip_forward")?;
    if own.iter().any(IpNetwork::is_ipv6) {
        forwarding_on("ipv6/conf/all/forwarding")?;
    }
    info!(pod_cidrs = ?own, "forwarding on, pods masqueraded to the node's address when leaving the node");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firewall() -> Firewall {
        use crate::services::table::{IngressPort, NodePort};
        let steering = Steering {
            node_ports: [
                NodePort {
                    proto: 6,
                    port: 30080,
                    masquerade: true,
                },
                NodePort {
                    proto: 17,
                    port: 30053,
                    masquerade: false,
                },
            ]
            .into(),
            ingress: [IngressPort {
                ip: "203.0.113.10".parse().unwrap(),
                proto: 6,
                port: 80,
                node_port: 30080,
            }]
            .into(),
        };
        Firewall {
            ifname: "kw0".into(),
            cluster: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
            ],
            services: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:10:96::/108".parse().unwrap(),
            ],
            counters: Arc::new(Counters::default()),
            steering: Arc::new(Mutex::new(steering)),
        }
    }

    #[test]
    fn the_ruleset_filters_forwarding_into_the_tun_and_guards_the_ranges() {
        let r = firewall().ruleset(&["10.244.1.0/24".parse().unwrap()]);
        assert!(
            r.starts_with("add table inet kwire\ndelete table inet kwire\n"),
            "{r}"
        );
        assert!(
            r.contains("oifname \"kw0\" iifname != \"kw0\" counter name underlay_plaintext drop"),
            "{r}"
        );
        assert!(
            r.contains("oifname \"kw0\" iifname != \"kw0\" ct status dnat accept"),
            "{r}"
        );
        assert!(r.contains("ip daddr { 10.244.0.0/16, 10.96.0.0/12 } oifname != { \"kw0\", \"lo\" } counter name cluster_escape reject"), "{r}");
        assert!(
            r.contains("ip6 daddr { fd00:10:244::/56, fd00:10:96::/108 }"),
            "{r}"
        );
        assert!(
            r.contains("ip saddr 10.244.1.0/24 oifname != \"kw0\" masquerade"),
            "{r}"
        );
        // Before the pod CIDRs are known: the filter, no masquerading.
        assert!(!firewall().ruleset(&[]).contains("ip saddr"));
        // Node ports: DNATed to the node-port address (the Service range's network address),
        // from the underlay and from the node itself; Cluster ones masqueraded.
        assert!(r.contains("fib daddr type local meta nfproto ipv4 meta l4proto . th dport @node_ports dnat ip to 10.96.0.0\n"), "{r}");
        assert!(r.contains("oifname \"kw0\" ip daddr 10.96.0.0 meta l4proto . th dport @node_ports_masquerade masquerade"), "{r}");
        assert!(r.contains("chain output_nat"), "{r}");
        // An external Peer's ClusterIP flows, handed to the host by the loop: masqueraded
        // to the gateway with the ports the loop recognises.
        assert!(r.contains("iifname \"kw0\" oifname \"kw0\" ip daddr { 10.96.0.0/12 } meta l4proto { tcp, udp, sctp } masquerade to :61000-65535\n"), "{r}");
        assert!(
            r.contains(
                "iifname \"kw0\" oifname \"kw0\" ip6 daddr { fd00:10:96::/108 } meta l4proto"
            ),
            "{r}"
        );
        assert!(
            r.contains("set node_ports { type inet_proto . inet_service;"),
            "{r}"
        );
        assert!(r.contains("set node_ports { type inet_proto . inet_service; elements = { tcp . 30080, udp . 30053 }; }"), "{r}");
        assert!(r.contains("set node_ports_masquerade { type inet_proto . inet_service; elements = { tcp . 30080 }; }"), "{r}");
        assert!(
            r.contains("elements = { 203.0.113.10 . tcp . 80 : 30080 }"),
            "{r}"
        );
    }

    /// The ruleset is what `nft` accepts (checked, not installed: `nft -c`).
    #[test]
    fn nft_accepts_the_ruleset() {
        if !nix::unistd::geteuid().is_root() {
            crate::testing::skip("nft_accepts_the_ruleset", "`nft -c` needs root");
            return;
        }
        let r = firewall().ruleset(&[
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ]);
        match nft(&["-c", "-f", "-"], Some(&r)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::testing::skip(
                "nft_accepts_the_ruleset",
                "nft not installed (apt install nftables)",
            ),
            Err(e) => panic!("{e}\n{r}"),
        }
    }

    #[test]
    fn reads_nft_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "underlay_plaintext", "table": "kwire", "handle": 1, "packets": 7, "bytes": 420}}, {"counter": {"family": "inet", "name": "cluster_escape", "table": "kwire", "handle": 2, "packets": 0, "bytes": 0}}]}"#;
        assert_eq!(
            parse_counters(json),
            vec![
                ("underlay_plaintext".to_string(), 7),
                ("cluster_escape".to_string(), 0)
            ]
        );
        assert!(parse_counters("garbage").is_empty());
    }

    #[test]
    fn gateways_are_the_first_addresses() {
        let c: Vec<IpNetwork> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        assert_eq!(
            gateways(&c),
            vec![
                "10.244.1.1".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::1".parse().unwrap()
            ]
        );
    }
}
