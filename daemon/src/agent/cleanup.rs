//! `kwire agent --cleanup`: removes what kwire put on a node, for uninstalling (after
//! `kubectl delete -f deploy/`, so that no agent puts it back): every pod's tun (in the pod's
//! network namespace, from the saved pod records), the host tun (its addresses and routes go
//! with it), the blackhole and unreachable routes behind the pod and cluster ranges (kwire's
//! carry routing protocol [`RTPROT_KWIRE`]), the `inet kwire` nftables table, the CNI plugin
//! and configuration list, the local sockets and the state directory's files (the private key
//! included). Each step is tried; the ones that fail are reported together. Links and routes
//! go over netlink, like everything else the agent programs.

use crate::cni::cni_server::{IPAM_FILE, PODS_FILE};
use crate::cni::PodRecord;
use crate::io::netlink::{self, Netlink, Request, Route, RTPROT_KWIRE};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What `--cleanup` removes besides the agent's own directories.
#[derive(Debug, Clone)]
pub struct CleanupPlan {
    pub interface: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub uapi_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
}

/// Files the agent keeps in its state directory.
const STATE_FILES: &[&str] = &[
    super::keyfile::KEY_FILE,
    super::state::STATE_FILE,
    super::policy_state::POLICY_STATE_FILE,
    super::policy_state::LEGACY_POLICY_STATE_FILE,
    super::service_state::SERVICE_STATE_FILE,
    super::flow_state::FLOW_STATE_FILE,
    PODS_FILE,
    IPAM_FILE,
];

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Deletes the link named `name` in the current network namespace; false if there is none.
fn delete_link(name: &str) -> std::io::Result<bool> {
    let mut nl = Netlink::open()?;
    match nl.link_by_name(name)? {
        Some(link) => match nl.run(Request::LinkDel { index: link.index }) {
            Err(e) if netlink::is_gone(&e) => Ok(false),
            r => r.map(|()| true),
        },
        None => Ok(false),
    }
}

/// kwire's routes among `routes`: those it marked with its routing protocol.
pub fn kwire_routes(routes: &[Route]) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| r.protocol == RTPROT_KWIRE)
        .copied()
        .collect()
}

fn remove_file(path: &Path, done: &mut Vec<String>, failed: &mut Vec<String>) {
    match std::fs::remove_file(path) {
        Ok(()) => done.push(format!("removed {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => failed.push(format!("removing {}: {e}", path.display())),
    }
}

/// Removes everything; the lines of what it did, or an error listing what it could not do.
pub fn cleanup(plan: &CleanupPlan) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let mut failed = Vec::new();

    let pods: Vec<PodRecord> = std::fs::read(plan.state_dir.join(PODS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for p in &pods {
        let Ok(ns) = crate::cni::netns::open_netns(&p.netns) else {
            continue; // the pod's namespace is gone, and its tun with it
        };
        let tun = p.tun_name.clone();
        let r = crate::io::netns::run_in(std::os::fd::AsFd::as_fd(&ns), || delete_link(&tun))
            .and_then(|r| r);
        match r {
            Ok(true) => done.push(format!("deleted {tun} in {}", p.netns)),
            Ok(false) => {}
            Err(e) => failed.push(format!("deleting {tun} in {}: {e}", p.netns)),
        }
    }

    match delete_link(&plan.interface) {
        Ok(true) => done.push(format!("deleted {} (and its routes)", plan.interface)),
        Ok(false) => {}
        Err(e) => failed.push(format!("deleting {}: {e}", plan.interface)),
    }
    match Netlink::open().and_then(|mut nl| {
        let routes = kwire_routes(&nl.routes()?);
        let requests: Vec<Request> = routes.iter().map(|r| Request::RouteDel(*r)).collect();
        Ok((routes, nl.execute(&requests)))
    }) {
        Ok((routes, results)) => {
            for (r, res) in routes.iter().zip(results) {
                match res {
                    Ok(()) => done.push(format!("deleted route {r}")),
                    Err(e) if netlink::is_gone(&e) => {}
                    Err(e) => failed.push(format!("deleting route {r}: {e}")),
                }
            }
        }
        Err(e) => failed.push(format!("listing routes: {e}")),
    }
    match run(Command::new("nft").args(["delete", "table", "inet", "kwire"])) {
        Ok(_) => done.push("deleted nftables table inet kwire".into()),
        Err(e) if e.contains("No such file") => {}
        Err(e) => failed.push(format!("deleting nftables table inet kwire: {e}")),
    }

    remove_file(
        &plan.cni_bin_dir.join(crate::cni::install::PLUGIN_NAME),
        &mut done,
        &mut failed,
    );
    remove_file(
        &plan.cni_conf_dir.join("10-kwire.conflist"),
        &mut done,
        &mut failed,
    );
    remove_file(
        &plan.uapi_dir.join(format!("{}.sock", plan.interface)),
        &mut done,
        &mut failed,
    );
    for sock in [crate::status::STATUS_SOCKET, "cni.sock"] {
        remove_file(&plan.run_dir.join(sock), &mut done, &mut failed);
    }
    for f in STATE_FILES {
        remove_file(&plan.state_dir.join(f), &mut done, &mut failed);
    }
    let queue = plan.state_dir.join("cni-del-queue");
    if queue.is_dir() {
        match std::fs::remove_dir_all(&queue) {
            Ok(()) => done.push(format!("removed {}", queue.display())),
            Err(e) => failed.push(format!("removing {}: {e}", queue.display())),
        }
    }
    for dir in [&plan.state_dir, &plan.run_dir] {
        let _ = std::fs::remove_dir(dir); // only when empty
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        anyhow::bail!(
            "cleanup left {} thing(s) in place (run it as root on the node, after `kubectl delete -f deploy/`):\n  {}",
            failed.len(),
            failed.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kwires_routes_are_picked() {
        use crate::io::netlink::RouteKind;
        let r = |dst: &str, kind, protocol| Route {
            dst: dst.parse().unwrap(),
            kind,
            metric: super::super::routes::BLACKHOLE_METRIC,
            src: None,
            protocol,
        };
        let ours = r("10.244.1.0/24", RouteKind::Blackhole, RTPROT_KWIRE);
        let ours6 = r("fd00:10:244::/56", RouteKind::Unreachable, RTPROT_KWIRE);
        let boot = r("192.0.2.0/24", RouteKind::Blackhole, 3);
        assert_eq!(kwire_routes(&[ours, boot, ours6]), [ours, ours6]);
    }
}
