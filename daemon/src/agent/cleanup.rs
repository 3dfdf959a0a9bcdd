//! `kwire agent --cleanup`: removes what kwire put on a node, for uninstalling (after
//! `kubectl delete -f deploy/`, so that no agent puts it back): every pod's tun (in the pod's
//! network namespace, from the saved pod records), the host tun (its addresses and routes go
//! with it), the blackhole routes behind the pod ranges (kwire's have metric
//! [`super::routes::BLACKHOLE_METRIC`]), the `inet kwire` nftables table, the CNI plugin and
//! configuration list, the local sockets and the state directory's files (the private key
//! included). Each step is tried; the ones that fail are reported together.
//!
//! Until links and routes are programmed over netlink, this runs iproute2's `ip` like the rest
//! of the agent.

use crate::cni::cni_server::{IPAM_FILE, PODS_FILE};
use crate::cni::PodRecord;
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

/// The prefixes of kwire's blackhole routes in `ip route show type blackhole` output.
pub fn kwire_blackholes(text: &str) -> Vec<String> {
    let metric = format!("metric {}", super::routes::BLACKHOLE_METRIC);
    text.lines()
        .filter(|l| l.contains(&metric))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("blackhole"), Some(prefix)) => Some(prefix.to_string()),
                _ => None,
            }
        })
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
        let r = crate::io::netns::run_in(std::os::fd::AsFd::as_fd(&ns), || {
            run(Command::new("ip").args(["link", "del", &tun]))
        })
        .unwrap_or_else(|e| Err(e.to_string()));
        match r {
            Ok(_) => done.push(format!("deleted {tun} in {}", p.netns)),
            Err(e) if e.contains("Cannot find device") => {}
            Err(e) => failed.push(format!("deleting {tun} in {}: {e}", p.netns)),
        }
    }

    match run(Command::new("ip").args(["link", "del", &plan.interface])) {
        Ok(_) => done.push(format!("deleted {} (and its routes)", plan.interface)),
        Err(e) if e.contains("Cannot find device") => {}
        Err(e) => failed.push(format!("deleting {}: {e}", plan.interface)),
    }
    for fam in ["-4", "-6"] {
        match run(Command::new("ip").args([fam, "route", "show", "type", "blackhole"])) {
            Ok(text) => {
                for prefix in kwire_blackholes(&text) {
                    let metric = super::routes::BLACKHOLE_METRIC.to_string();
                    match run(Command::new("ip").args([
                        fam,
                        "route",
                        "del",
                        "blackhole",
                        &prefix,
                        "metric",
                        &metric,
                    ])) {
                        Ok(_) => done.push(format!("deleted blackhole {prefix}")),
                        Err(e) => failed.push(format!("deleting blackhole {prefix}: {e}")),
                    }
                }
            }
            Err(e) => failed.push(format!("listing blackhole routes: {e}")),
        }
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
    fn only_kwires_blackholes_are_picked() {
        let text = "blackhole 10.244.1.0/24 metric 4096 \nblackhole 192.0.2.0/24 \nblackhole fd00:10:244:1::/64 dev lo metric 4096 pref medium\n";
        assert_eq!(
            kwire_blackholes(text),
            ["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
    }
}
