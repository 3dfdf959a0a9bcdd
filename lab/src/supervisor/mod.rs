//! `kwire-lab supervise`: the detached process that keeps a lab running. It serves the API
//! stand-in (on 127.0.0.1 for the host and on the underlay bridge for the agents) with
//! `deploy/`'s ServiceAccount, RBAC and admission policy applied, registers the Nodes, runs
//! `deploy/kwire.yaml`'s DaemonSet pod on every node as the kubelet would ([`daemonset`]: the
//! init container to completion, then the agent, each confined by
//! [`crate::container`] with a service account token bound to its node) and restarts an agent
//! that exits, re-reads `lab.json` on SIGHUP (nodes added or removed) and stops everything it
//! started on SIGTERM.

pub mod daemonset;

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

use crate::apiserver::{kubeconfig, ApiServer, ApiServerConfig};
use crate::cluster::naming::{self, LabNames};
use crate::cluster::state::{
    self, AgentCommand, AgentRuntime, LabDescription, LabPaths, NodeSpec, Runtime,
};
use crate::cluster::LabError;
use crate::manifests::{self, PodSpec};
use crate::pods::kubelet::{Kubelet, PodDone};
use daemonset::ImageFiles;

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

/// How long an init container may run.
pub const INIT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(30);

struct Agent {
    node: NodeSpec,
    /// The DaemonSet pod's init containers ran to completion.
    initialized: bool,
    /// Where `container-run` writes the agent container's pid.
    pid_file: Option<std::path::PathBuf>,
    /// The container pid last written to `runtime.json`.
    last_pid: Option<u32>,
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
        service_cidr_v6: Some(naming::SERVICE_CIDR_V6.parse().expect("valid")),
        tls_names: vec![
            lab.api_underlay.ip().to_string(),
            names.api_underlay_v6().to_string(),
        ],
        // Pods reach the API through `default/kubernetes` at the agents' address of it.
        advertise: Some(lab.api_underlay),
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config).await?;
    for object in manifests::api_objects().map_err(LabError::Usage)? {
        let what = format!("{} {}", object["kind"], object["metadata"]["name"]);
        server
            .create(object)
            .map_err(|e| LabError::Usage(format!("applying deploy/'s {what}: {e}")))?;
    }
    if lab.dns {
        // Before any Service is created: kube-dns takes its fixed ClusterIP.
        for object in crate::pods::dns::objects() {
            let what = format!("{} {}", object["kind"], object["metadata"]["name"]);
            server
                .create(object)
                .map_err(|e| LabError::Usage(format!("creating the cluster DNS {what}: {e}")))?;
        }
        crate::pods::dns::reconcile(&server, &paths.dir);
    }
    let (pod, image) = match &lab.agent {
        AgentCommand::Kwire { bin, args } => {
            let mut pod = manifests::daemonset().map_err(LabError::Usage)?;
            for c in pod
                .containers
                .iter_mut()
                .filter(|c| c.name == manifests::AGENT_CONTAINER)
            {
                c.args.extend(args.iter().cloned());
            }
            let cni = crate::pods::kubelet::find_kwire_cni(&lab).map_err(LabError::Usage)?;
            let image = daemonset::image_files(&paths.dir, bin, &cni).map_err(LabError::Usage)?;
            (Some(pod), image)
        }
        AgentCommand::Shell { .. } => (None, Vec::new()),
    };
    let host_addr = server.addr();
    let underlay = bind_in_netns(&lab.underlay_netns, lab.api_underlay)?;
    // SIGUSR1 takes the agents' endpoint down (connections closed, new ones closed at once) and
    // brings it back: an API outage as the nodes see it, while the host can still make changes.
    let (api_down_tx, api_down) = tokio::sync::watch::channel(false);
    tokio::spawn(proxy(underlay, host_addr, api_down));
    tracing::info!(host = %host_addr, underlay = %lab.api_underlay, "API stand-in serving");

    server.write_kubeconfig(&paths.kubeconfig())?;
    for (file, text) in [
        (crate::cluster::client::CA_FILE, server.ca_pem()),
        (
            crate::cluster::client::ADMIN_TOKEN_FILE,
            server.admin_token(),
        ),
    ] {
        let path = paths.dir.join(file);
        kubeconfig::write_private(&path, text.as_bytes())
            .map_err(|source| LabError::io(format!("writing {}", path.display()), source))?;
    }
    kubeconfig::write_kubeconfig(
        &paths.agent_kubeconfig(),
        &format!("https://{}", lab.api_underlay),
        server.ca_pem(),
        Some(server.admin_token()),
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
        pod,
        image,
        audited: 0,
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
                if sup.check_agents() || sup.container_pids_changed() {
                    sup.write_runtime(true)?;
                }
                sup.write_audit();
            }
            changed = api_changes.changed() => {
                if changed.is_ok() {
                    kubelet.reconcile(&sup.server, &sup.lab);
                    crate::pods::endpoints::reconcile(&sup.server);
                    if let Err(e) = sup.server.reconcile_kubernetes_service() {
                        tracing::warn!(error = %e, "cannot repair the default/kubernetes Service");
                    }
                    if sup.lab.dns {
                        crate::pods::dns::reconcile(&sup.server, &sup.paths.dir);
                    }
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
    /// The DaemonSet's pod (None with `--agent-cmd`).
    pod: Option<PodSpec>,
    image: ImageFiles,
    /// Audit entries already written to `audit.json`.
    audited: usize,
}

impl Supervisor {
    fn add_node(&mut self, node: NodeSpec) -> Result<(), LabError> {
        register_node(&self.server, self.names.name(), &node)?;
        let io = |what: String| move |source| LabError::io(what, source);
        std::fs::create_dir_all(&node.root)
            .map_err(io(format!("creating {}", node.root.display())))?;
        // A token bound to this node, as the kubelet projects one into the pod; the same token
        // in a kubeconfig for `kwire-lab kubeconfig --node`.
        let sa = self
            .pod
            .as_ref()
            .map_or("kwire", |p| p.service_account.as_str())
            .to_string();
        let token =
            self.server
                .issue_service_account_token(daemonset::NAMESPACE, &sa, Some(&node.name));
        daemonset::write_service_account(
            &self.paths.node_dir(&node.name),
            &token,
            self.server.ca_pem(),
        )
        .map_err(io(format!(
            "writing the service account volume of {}",
            node.name
        )))?;
        let kc = self.paths.node_kubeconfig(&node.name);
        kubeconfig::write_private(
            &kc,
            daemonset::node_kubeconfig(&self.server, &token).as_bytes(),
        )
        .map_err(io(format!("writing {}", kc.display())))?;
        let mut agent = Agent {
            node,
            initialized: false,
            pid_file: None,
            last_pid: None,
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

    /// Runs the pod's init containers on `node`, each to completion.
    fn run_init_containers(&self, node: &NodeSpec) -> Result<(), String> {
        let Some(pod) = &self.pod else { return Ok(()) };
        for c in &pod.init_containers {
            let (mut cmd, _) = self.container_command(pod, c, node)?;
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting init container {}: {e}", c.name))?;
            let deadline = Instant::now() + INIT_CONTAINER_TIMEOUT;
            let status = loop {
                if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                    break s;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(format!(
                        "init container {} did not finish within {} s",
                        c.name,
                        INIT_CONTAINER_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !status.success() {
                return Err(format!(
                    "init container {} failed ({status}); see {}",
                    c.name,
                    node.log.display()
                ));
            }
            tracing::info!(node = %node.name, container = %c.name, "init container done");
        }
        Ok(())
    }

    fn start_agent(&self, agent: &mut Agent) {
        agent.started = Instant::now();
        agent.restart_at = None;
        if !agent.initialized {
            match self.run_init_containers(&agent.node) {
                Ok(()) => agent.initialized = true,
                Err(e) => {
                    tracing::error!(node = %agent.node.name, error = %e, "the DaemonSet pod's init containers failed; retrying");
                    agent.last_exit = Some(format!("init: {e}"));
                    agent.restart_at = Some(Instant::now() + agent.backoff);
                    agent.backoff = (agent.backoff * 2).min(RESTART_BACKOFF_MAX);
                    return;
                }
            }
        }
        let spawned = match &self.pod {
            Some(pod) => self.spawn_agent_container(pod, agent),
            None => spawn_agent(&self.lab, &self.paths, &agent.node).map_err(|e| e.to_string()),
        };
        match spawned {
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

    /// `container-run` for container `c` of the pod on `node`, its output to the node's log;
    /// and where it will write the container's pid.
    fn container_command(
        &self,
        pod: &PodSpec,
        c: &manifests::Container,
        node: &NodeSpec,
    ) -> Result<(std::process::Command, std::path::PathBuf), String> {
        let node_dir = self.paths.node_dir(&node.name);
        let sa = daemonset::service_account_dir(&node_dir);
        let spec = daemonset::container_spec(
            self.lab.api_underlay,
            &node_dir,
            node,
            pod,
            c,
            &self.image,
            &sa,
        )?;
        let mut cmd = daemonset::command(&spec, &kwire_lab_exe()?)?;
        let log = agent_log(node).map_err(|e| e.to_string())?;
        cmd.stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        Ok((cmd, spec.pid_file))
    }

    fn spawn_agent_container(&self, pod: &PodSpec, agent: &mut Agent) -> Result<Child, String> {
        let node = &agent.node;
        let (std_cmd, pid_file) = self.container_command(pod, pod.agent()?, node)?;
        let mut cmd = Command::from(std_cmd);
        cmd.process_group(0).kill_on_drop(false);
        agent.pid_file = Some(pid_file);
        cmd.spawn()
            .map_err(|e| format!("starting the agent container: {e}"))
    }

    /// True when an agent container's pid became known (or changed) since the last look.
    fn container_pids_changed(&mut self) -> bool {
        let mut changed = false;
        for a in self.agents.values_mut() {
            let pid = a.pid_file.as_deref().and_then(daemonset::container_pid);
            if a.child.is_some() && pid != a.last_pid {
                a.last_pid = pid;
                changed = true;
            }
        }
        changed
    }

    /// Writes `audit.json` (every distinct user, verb, resource the API saw) when it grew.
    fn write_audit(&mut self) {
        let audit = self.server.audit();
        if audit.len() == self.audited {
            return;
        }
        self.audited = audit.len();
        let entries: Vec<Value> = audit
            .iter()
            .map(|e| json!({"user": e.username, "verb": e.verb, "apiGroup": e.api_group, "resource": e.resource, "allowed": e.allowed}))
            .collect();
        if let Err(e) = state::save(&self.paths.audit(), &entries) {
            tracing::warn!(error = %e, "cannot write the API audit");
        }
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
                            pid: a.child.as_ref().and_then(Child::id).and_then(|pid| {
                                match &a.pid_file {
                                    Some(f) => daemonset::container_pid(f),
                                    None => Some(pid),
                                }
                            }),
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

/// The `--agent-cmd` stand-in's argv after `ip netns exec NS`.
fn agent_argv(lab: &LabDescription) -> Vec<String> {
    match &lab.agent {
        AgentCommand::Shell { script } => vec!["/bin/sh".into(), "-c".into(), script.clone()],
        AgentCommand::Kwire { bin, .. } => vec![bin.display().to_string(), "agent".into()],
    }
}

fn kwire_lab_exe() -> Result<std::path::PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("finding the kwire-lab executable: {e}"))
}

fn agent_log(node: &NodeSpec) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&node.log)
}

/// Starts an `--agent-cmd` stand-in agent (not confined: it is not the DaemonSet's agent).
fn spawn_agent(lab: &LabDescription, paths: &LabPaths, node: &NodeSpec) -> std::io::Result<Child> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&node.state_dir)?;
    std::fs::create_dir_all(&node.run_dir)?;
    let log = agent_log(node)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns])
        .args(agent_argv(lab))
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
