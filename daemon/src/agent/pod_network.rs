//! The agent's pods: once this node's pod CIDRs are known, serve the CNI socket and plug each
//! pod's tun into the packet loop; make the host forward and masquerade what pods send to the
//! outside world.

use crate::cni::{CniServer, CniServerConfig, PodAttachment, PodDataPlane};
use crate::dataplane::ports::Pods;
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
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
        match self.pods.attach(pod.ips.clone(), pod.tun) {
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

/// Waits for the pod CIDRs, then serves CNI until the task is aborted.
pub async fn serve(
    mut cidrs: CidrWatch,
    pods: Arc<Pods>,
    run_dir: PathBuf,
    state_dir: PathBuf,
    ifname: String,
) {
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
    if let Err(e) = host_forwarding(&ifname, &own) {
        warn!(error = %e, "pods cannot reach the outside world until forwarding and masquerading work");
    }
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

/// Turns a forwarding sysctl on, unless it is on already. In a pod `/proc/sys` is read-only, so
/// forwarding is a node prerequisite (kubeadm's preflight checks `net.ipv4.ip_forward` too);
/// the error says which sysctl to set.
fn forwarding_on(path: &str, sysctl: &str) -> std::io::Result<()> {
    let current = std::fs::read_to_string(path)?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{sysctl} is 0 and {path} cannot be written here ({e}): set `sysctl -w {sysctl}=1` on the node (a prerequisite, see README)"),
        )
    })
}

/// Pods reach the node and the outside world through the host tun: the kernel forwards and
/// masquerades what leaves any other interface with a pod source address.
fn host_forwarding(ifname: &str, own: &[IpNetwork]) -> std::io::Result<()> {
    forwarding_on("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward")?;
    if own.iter().any(IpNetwork::is_ipv6) {
        forwarding_on(
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        )?;
    }
    let mut rules = String::new();
    for c in own {
        let fam = if c.is_ipv4() { "ip" } else { "ip6" };
        rules.push_str(&format!(
            "    {fam} saddr {c} oifname != \"{ifname}\" masquerade\n"
        ));
        // Hairpin: a pod's connection that the kernel DNATed (a hostPort) back to a pod on
        // this node. Without this the answer would go pod to pod inside the packet loop, past
        // the kernel's conntrack, and never be un-NATed; from the node's gateway address it
        // comes back through the kernel.
        rules.push_str(&format!(
            "    {fam} saddr {c} oifname \"{ifname}\" ct status dnat masquerade\n"
        ));
    }
    // Recreated whole, so a restart or a CIDR change leaves no stale rule.
    let script = format!(
        "add table inet kwire\ndelete table inet kwire\ntable inet kwire {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    info!(pod_cidrs = ?own, "forwarding on, pods masqueraded to the node's address when leaving the node");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
