//! The user-facing lab commands (`up`, `down`, `status`, `exec`, `add-node`, `remove-node`,
//! `kubeconfig`, `graph`). Progress goes to stdout, one line per step.

pub mod graph;
pub mod status;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::cluster::naming::{LabNames, MAX_NODES};
use crate::cluster::state::{
    self, load_running, AgentCommand, LabDescription, LabPaths, NodeSpec, Runtime, STATE_ROOT,
};
use crate::cluster::topology::{self, WG_SOCKET_DIR};
use crate::cluster::LabError;
use status::LabStatus;

/// How long `down` waits for the supervisor to stop its agents after SIGTERM.
pub const SUPERVISOR_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `add-node`/`remove-node` wait for the supervisor to act on the change.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `add-node` waits for the new node's handshakes (real agents only).
pub const ADD_NODE_MESH_TIMEOUT: Duration = Duration::from_secs(45);

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: u32,
    pub agent: AgentCommand,
    /// Wait for every node to have a handshake with every other (false: only for the
    /// supervisor to be ready).
    pub wait_mesh: bool,
    pub timeout: Duration,
    /// Pods to create per node (and wait for) once the lab is up.
    pub pods_per_node: u32,
    /// Cluster DNS: the `kube-dns` pod and Service (see `pods::dns`).
    pub dns: bool,
}

fn require_root() -> Result<(), LabError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Usage(
            "kwire-lab needs root (network namespaces, veths, tun devices): run it with sudo"
                .into(),
        ));
    }
    Ok(())
}

/// The supervisor's pid if it is running (checked against its command line, so a recycled pid
/// is not mistaken for it).
pub fn supervisor_pid(names: &LabNames) -> Option<u32> {
    let paths = LabPaths::new(names.name());
    let from_file = std::fs::read_to_string(paths.supervisor_pid())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let from_runtime = state::load::<Runtime>(&paths.runtime())
        .ok()
        .flatten()
        .map(|r| r.supervisor_pid);
    [from_file, from_runtime]
        .into_iter()
        .flatten()
        .find(|&pid| is_supervisor_of(pid, names.name()))
}

fn is_supervisor_of(pid: u32, name: &str) -> bool {
    if !topology::pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.iter().any(|a| *a == b"supervise")
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
}

/// The kwire binary: `given`, else $KWIRE_BIN, else next to this executable, else
/// target/{debug,release}/kwire under the current directory.
pub fn find_kwire(given: Option<PathBuf>) -> Result<PathBuf, LabError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = given {
        candidates.push(p);
    } else if let Some(p) = std::env::var_os("KWIRE_BIN") {
        candidates.push(p.into());
    } else {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.push(dir.join("kwire"));
        }
        candidates.push("target/debug/kwire".into());
        candidates.push("target/release/kwire".into());
    }
    let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        LabError::Usage(format!(
            "no kwire binary at {}: build it with `cargo build -p kwire-daemon`, or give `--kwire PATH` or KWIRE_BIN",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    let found = std::fs::canonicalize(found).unwrap_or_else(|_| found.clone());
    let ok = Command::new(&found)
        .args(["agent", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(LabError::Usage(format!(
            "{} has no working `agent` subcommand (`{} agent --help` failed): rebuild it with \
             `cargo build -p kwire-daemon`, or run a stand-in with `--agent-cmd`",
            found.display(),
            found.display()
        )));
    }
    Ok(found)
}

/// `kwire-lab up`.
pub fn up(opts: &UpOptions) -> Result<(), LabError> {
    require_root()?;
    let names = LabNames::new(&opts.name)?;
    let name = names.name();
    if opts.nodes == 0 || opts.nodes > MAX_NODES {
        return Err(LabError::Usage(format!(
            "--nodes must be between 1 and {MAX_NODES}"
        )));
    }
    let paths = LabPaths::new(name);
    if let Some(pid) = supervisor_pid(&names) {
        return Err(LabError::Usage(format!(
            "lab {name} is already up (supervisor pid {pid}): `kwire-lab status --name {name}`, or `kwire-lab down --name {name}` first"
        )));
    }
    let mut lab = LabDescription::new(&names, opts.nodes, opts.agent.clone());
    lab.dns = opts.dns;
    let mut wanted = vec![lab.underlay_netns.clone()];
    wanted.extend(lab.nodes.iter().map(|n| n.netns.clone()));
    if let Some(ns) = topology::netns_list()
        .into_iter()
        .find(|ns| names.owns_netns(ns) || wanted.contains(ns))
    {
        return Err(LabError::Usage(format!(
            "namespace {ns} exists from an earlier run: run `kwire-lab down --name {name}` first"
        )));
    }
    if paths.dir.exists() {
        return Err(LabError::Usage(format!(
            "{} exists from an earlier run: run `kwire-lab down --name {name}` first",
            paths.dir.display()
        )));
    }
    if let Some(other) = lab_with_same_tag(&names) {
        return Err(LabError::Usage(format!(
            "lab {other} uses the same interface tag kw{} as {name}: choose another `--name`",
            names.tag_hex()
        )));
    }
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| LabError::io(format!("creating {}", paths.dir.display()), e))?;
    state::save(&paths.description(), &lab)?;

    let built = build_network(&names, &lab);
    if let Err(e) = built {
        println!("setup failed; removing what was made");
        let _ = down(name, true);
        return Err(e);
    }
    let started = Instant::now();
    let pid = spawn_supervisor(&paths, name)?;
    println!(
        "started the supervisor (pid {pid}, log {})",
        paths.supervisor_log().display()
    );
    let runtime = wait_ready(
        &names,
        &paths,
        pid,
        opts.timeout.saturating_sub(started.elapsed()),
    )?;
    println!(
        "API stand-in at {} (kubeconfig {})",
        runtime.api_url,
        paths.kubeconfig().display()
    );
    let st = status::collect(&lab, Some(&runtime));
    for n in &st.nodes {
        println!(
            "node {}: registered, podCIDRs {}, agent pid {}",
            n.name,
            n.pod_cidrs.join(","),
            n.agent_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    if opts.wait_mesh && lab.nodes.len() > 1 {
        wait_mesh(&names, opts.timeout.saturating_sub(started.elapsed()))?;
    }
    if opts.pods_per_node > 0 {
        crate::pods::create_lab_pods(
            name,
            opts.pods_per_node,
            opts.timeout.saturating_sub(started.elapsed()),
        )?;
    }
    println!(
        "lab {name} is up: `kwire-lab status --name {name}`, `kwire-lab exec --name {name} {}-n1 -- CMD`, `kwire-lab down --name {name}`",
        name
    );
    Ok(())
}

fn lab_with_same_tag(names: &LabNames) -> Option<String> {
    let dir = std::fs::read_dir(STATE_ROOT).ok()?;
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|other| other != names.name())
        .find(|other| LabNames::new(other).is_ok_and(|o| o.tag() == names.tag()))
}

fn build_network(names: &LabNames, lab: &LabDescription) -> Result<(), LabError> {
    println!(
        "creating underlay namespace {} (bridge {}, API on {} and [{}]:{})",
        lab.underlay_netns,
        lab.bridge,
        lab.api_underlay,
        names.api_underlay_v6(),
        lab.api_underlay.port()
    );
    topology::create_underlay(
        lab,
        &names.api_underlay_v4().to_string(),
        &names.api_underlay_v6().to_string(),
    )?;
    for node in &lab.nodes {
        println!(
            "creating node namespace {} ({} {} / {})",
            node.netns, node.underlay_if, node.underlay_ipv4, node.underlay_ipv6
        );
        topology::create_node(lab, node)?;
        node_prerequisites(node)?;
    }
    Ok(())
}

/// What a node must have before kwire is installed (README, prerequisites): forwarding on, as
/// kubeadm's preflight checks. The agent, confined, cannot set it (`/proc/sys` is read-only).
fn node_prerequisites(node: &NodeSpec) -> Result<(), LabError> {
    topology::run(&[
        "ip",
        "netns",
        "exec",
        &node.netns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    Ok(())
}

fn spawn_supervisor(paths: &LabPaths, name: &str) -> Result<u32, LabError> {
    let exe = std::env::current_exe()
        .map_err(|e| LabError::io("finding the kwire-lab executable".into(), e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.supervisor_log())
        .map_err(|e| LabError::io(format!("opening {}", paths.supervisor_log().display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LabError::io("duplicating the log file".into(), e))?;
    let mut cmd = Command::new(exe);
    cmd.args(["supervise", "--name", name])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Safety: setsid is async-signal-safe and touches no memory of the parent; it detaches the
    // supervisor from the terminal's session so it outlives `up` and ignores the shell's ^C.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| LabError::io("starting the supervisor".into(), e))?;
    Ok(child.id())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn wait_ready(
    names: &LabNames,
    paths: &LabPaths,
    pid: u32,
    timeout: Duration,
) -> Result<Runtime, LabError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(rt)) = state::load::<Runtime>(&paths.runtime()) {
            if rt.ready && rt.supervisor_pid == pid {
                return Ok(rt);
            }
        }
        if !topology::pid_alive(pid) {
            return Err(LabError::Usage(format!(
                "the supervisor of lab {} exited during start-up; its log ({}) ends with:\n{}\n\
                 remove the lab with `kwire-lab down --name {}`",
                names.name(),
                paths.supervisor_log().display(),
                log_tail(&paths.supervisor_log(), 15),
                names.name()
            )));
        }
        if start.elapsed() > timeout {
            return Err(LabError::Usage(format!(
                "the supervisor of lab {} was not ready after {} s; see {}; remove the lab with `kwire-lab down --name {}`",
                names.name(),
                timeout.as_secs(),
                paths.supervisor_log().display(),
                names.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_mesh(names: &LabNames, timeout: Duration) -> Result<(), LabError> {
    let start = Instant::now();
    let mut last = None;
    let mut last_probe = None;
    loop {
        let (lab, runtime) = load_running(names)?;
        let st = status::collect(&lab, runtime.as_ref());
        let (done, wanted) = st.handshakes();
        if last != Some(done) {
            println!("mesh: {done}/{wanted} handshakes");
            last = Some(done);
        }
        if done >= wanted {
            return Ok(());
        }
        if last_probe.is_none_or(|t: Instant| t.elapsed() >= MESH_PROBE_INTERVAL) {
            probe_missing_handshakes(&st);
            last_probe = Some(Instant::now());
        }
        if start.elapsed() > timeout {
            return Err(LabError::Usage(format!(
                "the mesh of lab {name} has {done}/{wanted} handshakes after {} s; the lab stays up: \
                 see `kwire-lab status --name {name}` and the agent logs under {}/nodes/, or `kwire-lab down --name {name}`",
                timeout.as_secs(),
                LabPaths::new(names.name()).dir.display(),
                name = names.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// WireGuard handshakes only on traffic: `up` pings each peer's gateway, one packet per pair
/// still without a handshake, this often.
pub const MESH_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// One ping from each node to the IPv4 gateway of each peer it has no handshake with yet.
fn probe_missing_handshakes(st: &LabStatus) {
    let mut pings = Vec::new();
    for n in st.nodes.iter().filter(|n| n.registered) {
        for other in st.nodes.iter().filter(|o| o.registered && o.name != n.name) {
            let has = n
                .peers
                .iter()
                .any(|p| p.handshake && p.node.as_deref() == Some(other.name.as_str()));
            let Some(gw) = other.gateway_ips.first() else {
                continue;
            };
            if !has {
                let child = Command::new("ip")
                    .args(["netns", "exec", &n.netns, "ping", "-c1", "-W1", gw])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                pings.extend(child.ok());
            }
        }
    }
    for mut p in pings {
        let _ = p.wait();
    }
}

/// `kwire-lab down`: removes everything lab `name` made, with or without its description.
pub fn down(name: &str, quiet_if_nothing: bool) -> Result<(), LabError> {
    require_root()?;
    let names = LabNames::new(name)?;
    let paths = LabPaths::new(name);
    let lab: Option<LabDescription> = state::load(&paths.description()).ok().flatten();
    let mut did_something = false;

    if let Some(pid) = supervisor_pid(&names) {
        println!("stopping the supervisor (pid {pid})");
        topology::signal(pid, Signal::SIGTERM);
        let start = Instant::now();
        while topology::pid_alive(pid) && start.elapsed() < SUPERVISOR_STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(50));
        }
        if topology::pid_alive(pid) {
            println!("the supervisor did not stop: killing it");
            topology::signal(pid, Signal::SIGKILL);
        }
        did_something = true;
    }

    let mut namespaces: Vec<String> = Vec::new();
    if let Some(lab) = &lab {
        namespaces.extend(lab.nodes.iter().map(|n| n.netns.clone()));
    }
    namespaces.extend(
        topology::netns_list()
            .into_iter()
            .filter(|ns| names.owns_netns(ns)),
    );
    namespaces.push(names.underlay_netns());
    namespaces.sort();
    namespaces.dedup();
    // Nodes first, the underlay (with the bridge) last.
    namespaces.sort_by_key(|ns| *ns == names.underlay_netns());
    for ns in &namespaces {
        let pids = topology::netns_pids(ns).len();
        if topology::delete_netns(ns)? {
            if pids > 0 {
                println!("deleted namespace {ns} (killed {pids} processes left in it)");
            } else {
                println!("deleted namespace {ns}");
            }
            did_something = true;
        }
    }

    // Cluster DNS: the pods' /etc/netns/<netns> (resolv.conf), also those a crash left.
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for entry in dir.filter_map(Result::ok) {
            if names.owns_netns(&entry.file_name().to_string_lossy())
                && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                did_something = true;
            }
        }
    }

    if let Ok(dir) = std::fs::read_dir(WG_SOCKET_DIR) {
        for entry in dir.filter_map(Result::ok) {
            let file = entry.file_name();
            if names.owns_uapi_socket(&file.to_string_lossy())
                && std::fs::remove_file(entry.path()).is_ok()
            {
                println!("removed {}", entry.path().display());
                did_something = true;
            }
        }
    }

    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir)
            .map_err(|e| LabError::io(format!("removing {}", paths.dir.display()), e))?;
        println!("removed {}", paths.dir.display());
        did_something = true;
    }
    if did_something {
        println!("lab {name} is down");
    } else if !quiet_if_nothing {
        println!("lab {name}: nothing to remove");
    }
    Ok(())
}

/// `kwire-lab status`.
pub fn status(name: &str, json: bool) -> Result<(), LabError> {
    let names = LabNames::new(name)?;
    let (lab, runtime) = load_running(&names)?;
    let st = status::collect(&lab, runtime.as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&st).expect("serializes"));
    } else {
        print!("{}", st.render());
    }
    Ok(())
}

/// The lab's status, for callers in-process.
pub fn lab_status(name: &str) -> Result<LabStatus, LabError> {
    let names = LabNames::new(name)?;
    let (lab, runtime) = load_running(&names)?;
    Ok(status::collect(&lab, runtime.as_ref()))
}

fn resolve_node<'a>(
    names: &LabNames,
    lab: &'a LabDescription,
    given: &str,
) -> Result<&'a NodeSpec, LabError> {
    names
        .node_index(given)
        .and_then(|i| lab.nodes.iter().find(|n| n.index == i))
        .ok_or_else(|| {
            LabError::Usage(format!(
                "lab {} has no node {given:?}; its nodes are {} (`kwire-lab status --name {}`)",
                names.name(),
                lab.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                names.name()
            ))
        })
}

/// `kwire-lab exec NODE -- CMD...`: the command's exit code (128+N when killed by signal N).
pub fn exec(name: &str, node: &str, argv: &[String]) -> Result<i32, LabError> {
    require_root()?;
    let names = LabNames::new(name)?;
    let (lab, _) = load_running(&names)?;
    let node = resolve_node(&names, &lab, node)?;
    if argv.is_empty() {
        return Err(LabError::Usage(
            "give the command after `--`: `kwire-lab exec NODE -- ip addr`".into(),
        ));
    }
    // As on the node: its network namespace, and its /var/run/wireguard (so `wg show` finds
    // the agent's userspace API socket), in a mount namespace of the command's own.
    let wg = node.host_path("/var/run/wireguard");
    for dir in [wg.as_path(), Path::new(WG_SOCKET_DIR)] {
        std::fs::create_dir_all(dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$0\" {WG_SOCKET_DIR} && exec \"$@\""
        ))
        .arg(&wg)
        .args(argv)
        .status()
        .map_err(|e| LabError::io(format!("running `ip netns exec {}`", node.netns), e))?;
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn notify_supervisor(names: &LabNames) -> Result<u32, LabError> {
    let pid = supervisor_pid(names).ok_or_else(|| {
        LabError::Usage(format!(
            "the supervisor of lab {name} is not running: run `kwire-lab down --name {name}` and `kwire-lab up --name {name}`",
            name = names.name()
        ))
    })?;
    topology::signal(pid, Signal::SIGHUP);
    Ok(pid)
}

fn wait_runtime(
    names: &LabNames,
    what: &str,
    cond: impl Fn(&Runtime) -> bool,
) -> Result<(), LabError> {
    let paths = LabPaths::new(names.name());
    let start = Instant::now();
    while start.elapsed() < RELOAD_TIMEOUT {
        if state::load::<Runtime>(&paths.runtime())
            .ok()
            .flatten()
            .is_some_and(|r| cond(&r))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(LabError::Usage(format!(
        "the supervisor of lab {} did not {what} within {} s; see {}",
        names.name(),
        RELOAD_TIMEOUT.as_secs(),
        paths.supervisor_log().display()
    )))
}

/// `kwire-lab add-node`: a new node namespace on the underlay, registered and with an agent.
pub fn add_node(name: &str) -> Result<String, LabError> {
    require_root()?;
    let names = LabNames::new(name)?;
    let paths = LabPaths::new(name);
    let (mut lab, _) = load_running(&names)?;
    supervisor_pid(&names).ok_or_else(|| LabError::NotUp(name.to_string()))?;
    let index = lab.next_index();
    if index > MAX_NODES {
        return Err(LabError::Usage(format!(
            "lab {name} has no room for more nodes (at most {MAX_NODES})"
        )));
    }
    let node = NodeSpec::new(&names, &paths, index);
    println!(
        "creating node namespace {} ({} {} / {})",
        node.netns, node.underlay_if, node.underlay_ipv4, node.underlay_ipv6
    );
    if let Err(e) = topology::create_node(&lab, &node)
        .map_err(LabError::from)
        .and_then(|()| node_prerequisites(&node))
    {
        let _ = topology::delete_netns(&node.netns);
        return Err(e);
    }
    lab.nodes.push(node.clone());
    state::save(&paths.description(), &lab)?;
    notify_supervisor(&names)?;
    wait_runtime(&names, &format!("start an agent for {}", node.name), |r| {
        r.agents.get(&node.name).is_some_and(|a| a.pid.is_some())
    })?;
    println!("node {} registered and its agent started", node.name);
    if matches!(lab.agent, AgentCommand::Kwire { .. }) {
        wait_mesh(&names, ADD_NODE_MESH_TIMEOUT)?;
    }
    Ok(node.name)
}

/// `kwire-lab remove-node NODE`: stops its agent, deletes its Node and its namespace.
pub fn remove_node(name: &str, node: &str) -> Result<(), LabError> {
    require_root()?;
    let names = LabNames::new(name)?;
    let paths = LabPaths::new(name);
    let (mut lab, _) = load_running(&names)?;
    let node = resolve_node(&names, &lab, node)?.clone();
    lab.nodes.retain(|n| n.name != node.name);
    state::save(&paths.description(), &lab)?;
    notify_supervisor(&names)?;
    wait_runtime(&names, &format!("stop the agent of {}", node.name), |r| {
        !r.agents.contains_key(&node.name)
    })?;
    topology::delete_netns(&node.netns)?;
    let _ = std::fs::remove_file(Path::new(WG_SOCKET_DIR).join(format!("{}.sock", node.tun_if)));
    let _ = std::fs::remove_dir_all(paths.node_dir(&node.name));
    println!(
        "node {} removed (agent stopped, Node deleted, namespace {} deleted)",
        node.name, node.netns
    );
    Ok(())
}

/// `kwire-lab kubeconfig`: the path of the admin kubeconfig, or of node `node`'s agent's.
pub fn kubeconfig(name: &str, node: Option<&str>) -> Result<PathBuf, LabError> {
    let names = LabNames::new(name)?;
    let paths = LabPaths::new(name);
    if supervisor_pid(&names).is_none() {
        return Err(LabError::NotUp(name.to_string()));
    }
    let path = match node {
        None => paths.kubeconfig(),
        Some(given) => {
            let (lab, _) = load_running(&names)?;
            let node = resolve_node(&names, &lab, given)?;
            paths.node_kubeconfig(&node.name)
        }
    };
    if !path.exists() {
        return Err(LabError::NotUp(name.to_string()));
    }
    Ok(path)
}
