//! The lab's network: an underlay namespace with a bridge, and one namespace per node joined to
//! it by a veth, made and unmade with iproute2. As on a real network, every node has a default
//! route (IPv4 and IPv6) through a gateway on the underlay: the underlay namespace, which
//! forwards like a router (and has nowhere to send what is not for the lab's own addresses),
//! so anything a node sends outside the tunnel is on the underlay for a capture to see.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::naming::{LabNames, UNDERLAY_V4_LEN, UNDERLAY_V6_LEN};
use super::state::{LabDescription, NodeSpec};

/// Underlay MTU: a plain Ethernet link.
pub const UNDERLAY_MTU: u32 = 1500;

/// Where wireguard-tools finds userspace API sockets, shared by all namespaces.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// How long processes in a namespace get between SIGTERM and SIGKILL in `down`.
pub const KILL_GRACE: Duration = Duration::from_secs(3);

/// A command of the network setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot run `{command}` (is iproute2 installed and are you root?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

fn describe(argv: &[&OsStr]) -> String {
    argv.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion; its stdout on success.
pub fn run<S: AsRef<OsStr>>(argv: &[S]) -> Result<String, TopologyError> {
    let argv: Vec<&OsStr> = argv.iter().map(AsRef::as_ref).collect();
    let command = describe(&argv);
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TopologyError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all network namespaces (`ip netns list`).
pub fn netns_list() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

/// Pids of processes in a namespace (`ip netns pids`).
pub fn netns_pids(name: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state line says Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// SIGTERM to every process in `netns`, SIGKILL to what is left after [`KILL_GRACE`].
pub fn kill_netns_processes(netns: &str) -> usize {
    use nix::sys::signal::Signal;
    let pids = netns_pids(netns);
    for &p in &pids {
        signal(p, Signal::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < KILL_GRACE && netns_pids(netns).iter().any(|&p| pid_alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in netns_pids(netns) {
        signal(p, Signal::SIGKILL);
    }
    pids.len()
}

/// Creates the underlay namespace with its bridge and the API's addresses.
pub fn create_underlay(
    lab: &LabDescription,
    api_v4: &str,
    api_v6: &str,
) -> Result<(), TopologyError> {
    let ns = lab.underlay_netns.as_str();
    run(&["ip", "netns", "add", ns])?;
    run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    run(&[
        "ip",
        "-n",
        ns,
        "link",
        "add",
        &lab.bridge,
        "type",
        "bridge",
        "stp_state",
        "0",
    ])?;
    let mtu = UNDERLAY_MTU.to_string();
    run(&[
        "ip",
        "-n",
        ns,
        "link",
        "set",
        &lab.bridge,
        "mtu",
        &mtu,
        "up",
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{api_v4}/{UNDERLAY_V4_LEN}"),
        "dev",
        &lab.bridge,
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{api_v6}/{UNDERLAY_V6_LEN}"),
        "dev",
        &lab.bridge,
        "nodad",
    ])?;
    // The nodes' gateway: a router, as a real node's is.
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    Ok(())
}

/// Creates a node's namespace and joins it to the underlay bridge.
pub fn create_node(lab: &LabDescription, node: &NodeSpec) -> Result<(), TopologyError> {
    let ns = node.netns.as_str();
    let ul = lab.underlay_netns.as_str();
    let mtu = UNDERLAY_MTU.to_string();
    run(&["ip", "netns", "add", ns])?;
    run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    // Both ends are created directly in their namespaces: no name ever lands in the root one.
    run(&[
        "ip",
        "-n",
        ul,
        "link",
        "add",
        &node.bridge_port,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        &node.underlay_if,
        "netns",
        ns,
    ])?;
    run(&[
        "ip",
        "-n",
        ul,
        "link",
        "set",
        &node.bridge_port,
        "master",
        &lab.bridge,
        "up",
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{UNDERLAY_V4_LEN}", node.underlay_ipv4),
        "dev",
        &node.underlay_if,
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{UNDERLAY_V6_LEN}", node.underlay_ipv6),
        "dev",
        &node.underlay_if,
        "nodad",
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "link",
        "set",
        &node.underlay_if,
        "mtu",
        &mtu,
        "up",
    ])?;
    // A default route through the underlay's gateway, as a real node has: traffic that does
    // not go through the tunnel has somewhere to go (and shows on the underlay).
    if let Ok(names) = LabNames::new(&lab.name) {
        let gateways = [
            ("-4", names.api_underlay_v4().to_string()),
            ("-6", names.api_underlay_v6().to_string()),
        ];
        for (family, via) in &gateways {
            run(&[
                "ip",
                "-n",
                ns,
                family,
                "route",
                "add",
                "default",
                "via",
                via,
                "dev",
                &node.underlay_if,
            ])?;
        }
    }
    std::fs::create_dir_all(&node.run_dir).map_err(|source| TopologyError::Spawn {
        command: format!("mkdir -p {}", node.run_dir.display()),
        source,
    })?;
    Ok(())
}

/// Kills what runs in a namespace and deletes it; true if it existed.
pub fn delete_netns(netns: &str) -> Result<bool, TopologyError> {
    if !netns_exists(netns) {
        return Ok(false);
    }
    kill_netns_processes(netns);
    run(&["ip", "netns", "del", netns])?;
    Ok(true)
}
