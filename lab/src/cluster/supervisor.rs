//! `kwire-lab supervise`: the detached process that keeps a lab running. It serves the API
//! stand-in (on 127.0.0.1 for the host and on the underlay bridge for the agents), registers
//! the Nodes, runs one agent per node and restarts an agent that exits (as the kubelet
//! restarts a DaemonSet's pod), re-reads `lab.json` on SIGHUP (nodes added or removed) and
//! stops everything it started on SIGTERM.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ipnetwork::{Ipv4Network, Ipv6Network};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use super::naming::{self, LabNames};
use super::state::{self, AgentCommand, AgentRuntime, LabDescription, LabPaths, NodeSpec, Runtime};
use super::LabError;
use crate::apiserver::{kubeconfig, ApiServer, ApiServerConfig};
use crate::pods::kubelet::{Kubelet, PodDone};

/// First pause before restarting an agent that exited; doubled per quick exit.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest pause before a restart (the kubelet's CrashLoopBackOff caps at 5 min; a lab wants
/// its agents back sooner).
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An agent that ran this long before exiting is restarted after the shortest pause.
pub const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How often children are checked for exits.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the kubelet role re-reads the Pods without a change (retries of failed setups).
const KUBELET_RESYNC: Duration = Duration::from_millis(500);
/// How long agents get between SIGTERM and SIGKILL when the lab stops.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);

struct Agent {
    node: NodeSpec,
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
    restarts: u32,
    last_exit: Option<String>,
}

/// Runs the supervisor of lab `name` until SIGTERM/SIGINT.
pub async fn supervise(name: &str) -> Result<(), LabError> {
    let names = LabNames::new(name)?;
    let paths = LabPaths::new(names.name());
    let lab: LabDescription =
        state::load(&paths.description())?.ok_or_else(|| LabError::NotUp(name.to_string()))?;
    std::fs::write(paths.supervisor_pid(), format!("{}\n", std::process::id())).map_err(
        |source| {
            LabError::io(
                format!("writing {}", paths.supervisor_pid().display()),
                source,
            )
        },
    )?;

    let config = ApiServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cluster_cidr: Some(
            naming::CLUSTER_CIDR_V4
                .parse::<Ipv4Network>()
                .expect("valid"),
        ),
        cluster_cidr_v6: Some(
            naming::CLUSTER_CIDR_V6
                .parse::<Ipv6Network>()
                .expect("valid"),
        ),
        node_cidr_mask: naming::NODE_CIDR_MASK_V4,
        node_cidr_mask_v6: naming::NODE_CIDR_MASK_V6,
        service_cidr: Some(naming::SERVICE_CIDR_V4.parse().expect("valid")),
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config).await?;
    let host_addr = server.addr();
    let underlay = bind_in_netns(&lab.underlay_netns, lab.api_underlay)?;
    // SIGUSR1 takes the agents' endpoint down (connections closed, new ones closed at once) and
    // brings it back: an API outage as the nodes see it, while the host can still make changes.
    let (api_down_tx, api_down) = tokio::sync::watch::channel(false);
    tokio::spawn(proxy(underlay, host_addr, api_down));
    tracing::info!(host = %host_addr, underlay = %lab.api_underlay, "API stand-in serving");

    server.write_kubeconfig(&paths.kubeconfig())?;
    kubeconfig::write_kubeconfig(
        &paths.agent_kubeconfig(),
        &format!("http://{}", lab.api_underlay),
        None,
    )
    .map_err(|source| {
        LabError::io(
            format!("writing {}", paths.agent_kubeconfig().display()),
            source,
        )
    })?;

    let mut sup = Supervisor {
        names,
        paths,
        lab,
        server,
        agents: BTreeMap::new(),
    };
    for node in sup.lab.nodes.clone() {
        sup.add_node(node)?;
    }
    sup.write_runtime(true)?;
    tracing::info!(nodes = sup.agents.len(), "lab ready");

    let (pod_done_tx, mut pod_done) = tokio::sync::mpsc::unbounded_channel::<PodDone>();
    let mut kubelet = Kubelet::new(&sup.lab, sup.names.clone(), sup.paths.clone(), pod_done_tx);
    let mut api_changes = sup.server.store().subscribe();
    let mut pod_tick = tokio::time::interval(KUBELET_RESYNC);

    let sig =
        |k| signal(k).map_err(|source| LabError::io("installing signal handlers".into(), source));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    let mut usr1 = sig(SignalKind::user_defined1())?;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = sup.reload() {
                    tracing::error!(error = %e, "cannot apply the changed lab description");
                }
                sup.write_runtime(true)?;
            }
            _ = usr1.recv() => {
                api_down_tx.send_modify(|d| *d = !*d);
                tracing::warn!(down = *api_down_tx.borrow(), "SIGUSR1: the agents' API endpoint (underlay) toggled");
            }
            _ = tick.tick() => {
                if sup.check_agents() {
                    sup.write_runtime(true)?;
                }
            }
            changed = api_changes.changed() => {
                if changed.is_ok() {
                    kubelet.reconcile(&sup.server, &sup.lab);
                }
            }
            _ = pod_tick.tick() => kubelet.reconcile(&sup.server, &sup.lab),
            Some(done) = pod_done.recv() => {
                kubelet.finished(&sup.server, &sup.lab, done);
                kubelet.reconcile(&sup.server, &sup.lab);
            }
        }
    }
    tracing::info!("stopping: pod servers and agents get SIGTERM");
    kubelet.stop_all();
    sup.stop_all().await;
    sup.server.stop().await;
    let _ = std::fs::remove_file(sup.paths.runtime());
    let _ = std::fs::remove_file(sup.paths.supervisor_pid());
    tracing::info!("stopped");
    Ok(())
}

struct Supervisor {
    names: LabNames,
    paths: LabPaths,
    lab: LabDescription,
    server: ApiServer,
    agents: BTreeMap<String, Agent>,
}

impl Supervisor {
    fn add_node(&mut self, node: NodeSpec) -> Result<(), LabError> {
        register_node(&self.server, self.names.name(), &node)?;
        let mut agent = Agent {
            node,
            child: None,
            started: Instant::now(),
            restart_at: None,
            backoff: RESTART_BACKOFF_MIN,
            restarts: 0,
            last_exit: None,
        };
        self.start_agent(&mut agent);
        self.agents.insert(agent.node.name.clone(), agent);
        Ok(())
    }

    fn start_agent(&self, agent: &mut Agent) {
        agent.started = Instant::now();
        agent.restart_at = None;
        match spawn_agent(&self.lab, &self.paths, &agent.node) {
            Ok(child) => {
                tracing::info!(node = %agent.node.name, pid = child.id(), restarts = agent.restarts, "agent started");
                agent.child = Some(child);
            }
            Err(e) => {
                tracing::error!(node = %agent.node.name, error = %e, "cannot start the agent; retrying");
                agent.last_exit = Some(format!("not started: {e}"));
                agent.restart_at = Some(Instant::now() + agent.backoff);
                agent.backoff = (agent.backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
    }

    /// Reaps exited agents and restarts due ones; true if anything changed.
    fn check_agents(&mut self) -> bool {
        let mut changed = false;
        let mut to_start = Vec::new();
        for (name, agent) in self.agents.iter_mut() {
            if let Some(child) = agent.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let ran = agent.started.elapsed();
                    if ran >= RESTART_BACKOFF_RESET {
                        agent.backoff = RESTART_BACKOFF_MIN;
                    }
                    tracing::warn!(node = %name, %status, ran_secs = ran.as_secs_f64(), restart_in_ms = agent.backoff.as_millis() as u64, "agent exited; restarting");
                    agent.last_exit = Some(status.to_string());
                    agent.child = None;
                    agent.restart_at = Some(Instant::now() + agent.backoff);
                    agent.backoff = (agent.backoff * 2).min(RESTART_BACKOFF_MAX);
                    changed = true;
                }
            }
            if agent.child.is_none() && agent.restart_at.is_some_and(|t| t <= Instant::now()) {
                to_start.push(name.clone());
            }
        }
        for name in to_start {
            let mut agent = self.agents.remove(&name).expect("present");
            agent.restarts += 1;
            self.start_agent(&mut agent);
            self.agents.insert(name, agent);
            changed = true;
        }
        changed
    }

    /// Applies `lab.json` again: starts nodes that are new, stops and deregisters removed ones.
    fn reload(&mut self) -> Result<(), LabError> {
        let lab: LabDescription = state::load(&self.paths.description())?
            .ok_or_else(|| LabError::NotUp(self.names.name().to_string()))?;
        let removed: Vec<String> = self
            .agents
            .keys()
            .filter(|n| lab.node(n).is_none())
            .cloned()
            .collect();
        for name in removed {
            if let Some(mut agent) = self.agents.remove(&name) {
                tracing::info!(node = %name, "node removed from the lab: stopping its agent");
                if let Some(child) = agent.child.as_mut() {
                    terminate_blocking(child);
                }
            }
            let kind = ApiServer::kind("v1", "Node").expect("served");
            match self.server.delete(kind, None, &name) {
                Ok(_) => tracing::info!(node = %name, "Node deleted"),
                Err(e) => tracing::info!(node = %name, error = %e, "Node not deleted"),
            }
        }
        self.lab = lab;
        for node in self.lab.nodes.clone() {
            if !self.agents.contains_key(&node.name) {
                tracing::info!(node = %node.name, "node added to the lab");
                self.add_node(node)?;
            }
        }
        Ok(())
    }

    fn write_runtime(&self, ready: bool) -> Result<(), LabError> {
        let runtime = Runtime {
            supervisor_pid: std::process::id(),
            api_url: self.server.url(),
            ready,
            agents: self
                .agents
                .iter()
                .map(|(n, a)| {
                    (
                        n.clone(),
                        AgentRuntime {
                            pid: a.child.as_ref().and_then(Child::id),
                            restarts: a.restarts,
                            last_exit: a.last_exit.clone(),
                        },
                    )
                })
                .collect(),
        };
        Ok(state::save(&self.paths.runtime(), &runtime)?)
    }

    async fn stop_all(&mut self) {
        for agent in self.agents.values() {
            if let Some(pid) = agent.child.as_ref().and_then(Child::id) {
                kill_group(pid, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + AGENT_STOP_GRACE;
        for agent in self.agents.values_mut() {
            if let Some(child) = agent.child.as_mut() {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, child.wait()).await.is_err() {
                    if let Some(pid) = child.id() {
                        tracing::warn!(node = %agent.node.name, pid, "agent ignored SIGTERM; killing it");
                        kill_group(pid, Signal::SIGKILL);
                    }
                    let _ = child.wait().await;
                }
            }
        }
    }
}

/// Signals an agent's process group (each agent leads its own).
fn kill_group(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Stops one agent: SIGTERM to its group, SIGKILL after the grace period (used on reload,
/// where the loop may block briefly).
fn terminate_blocking(child: &mut Child) {
    let Some(pid) = child.id() else { return };
    kill_group(pid, Signal::SIGTERM);
    let deadline = Instant::now() + AGENT_STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_group(pid, Signal::SIGKILL);
}

/// Creates the Node object (with InternalIPs and no podCIDRs: the stand-in assigns them),
/// unless it exists.
fn register_node(server: &ApiServer, lab: &str, node: &NodeSpec) -> Result<(), LabError> {
    let kind = ApiServer::kind("v1", "Node").expect("served");
    if server.get(kind, None, &node.name).is_ok() {
        return Ok(());
    }
    let object = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kwire.dev/lab": lab,
            },
        },
        "spec": {},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.underlay_ipv4.to_string()},
                {"type": "InternalIP", "address": node.underlay_ipv6.to_string()},
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KwireLab", "message": "a kwire-lab node namespace"},
            ],
        },
    });
    server.create(object).map_err(|e| LabError::Register {
        node: node.name.clone(),
        detail: e.to_string(),
    })?;
    let pod_cidrs = server
        .get(kind, None, &node.name)
        .ok()
        .and_then(|n| n.pointer("/spec/podCIDRs").cloned())
        .unwrap_or(Value::Null);
    tracing::info!(node = %node.name, podCIDRs = %pod_cidrs, "Node registered");
    Ok(())
}

/// The agent's argv after `ip netns exec NS`.
pub fn agent_argv(lab: &LabDescription, paths: &LabPaths, node: &NodeSpec) -> Vec<String> {
    match &lab.agent {
        AgentCommand::Kwire { bin } => vec![
            bin.display().to_string(),
            "agent".into(),
            "--kubeconfig".into(),
            paths.agent_kubeconfig().display().to_string(),
            "--node-name".into(),
            node.name.clone(),
            "--state-dir".into(),
            node.state_dir.display().to_string(),
            "--run-dir".into(),
            node.run_dir.display().to_string(),
            "--interface".into(),
            node.tun_if.clone(),
            "--listen-port".into(),
            naming::WIREGUARD_PORT.to_string(),
            "--metrics-addr".into(),
            naming::METRICS_ADDR.into(),
            "--cluster-cidr".into(),
            naming::CLUSTER_CIDR_V4.into(),
            "--cluster-cidr".into(),
            naming::CLUSTER_CIDR_V6.into(),
            "--service-cidr".into(),
            naming::SERVICE_CIDR_V4.into(),
        ],
        AgentCommand::Shell { script } => vec!["/bin/sh".into(), "-c".into(), script.clone()],
    }
}

fn spawn_agent(lab: &LabDescription, paths: &LabPaths, node: &NodeSpec) -> std::io::Result<Child> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&node.state_dir)?;
    std::fs::create_dir_all(&node.run_dir)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&node.log)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns])
        .args(agent_argv(lab, paths, node))
        .env("KWIRE_LAB_NAME", &lab.name)
        .env("KWIRE_LAB_NODE", &node.name)
        .env("KWIRE_LAB_NETNS", &node.netns)
        .env("KWIRE_LAB_INTERFACE", &node.tun_if)
        .env("KWIRE_LAB_STATE_DIR", &node.state_dir)
        .env("KWIRE_LAB_RUN_DIR", &node.run_dir)
        .env("KWIRE_LAB_KUBECONFIG", paths.agent_kubeconfig())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
}

/// Binds a TCP listener inside network namespace `netns` (from a thread that enters it; the
/// socket stays in that namespace).
fn bind_in_netns(netns: &str, addr: SocketAddr) -> Result<TcpListener, LabError> {
    let path = Path::new("/var/run/netns").join(netns);
    let listener = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<std::net::TcpListener> {
            let ns = File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .expect("bind thread does not panic")
    })
    .map_err(|source| LabError::io(format!("listening on {addr} in namespace {netns}"), source))?;
    TcpListener::from_std(listener)
        .map_err(|source| LabError::io(format!("listening on {addr} in namespace {netns}"), source))
}

/// Forwards connections from the underlay listener to the API stand-in on loopback.
async fn proxy(listener: TcpListener, to: SocketAddr, down: tokio::sync::watch::Receiver<bool>) {
    loop {
        match listener.accept().await {
            Ok((mut inbound, _)) => {
                if *down.borrow() {
                    continue; // closed at once: the API is "down"
                }
                let mut down = down.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = down.wait_for(|d| *d) => {}
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the underlay API listener");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
