//! The kubelet's part in a lab, run by the supervisor: it schedules Pods without a node
//! (round-robin over the lab's nodes, by setting `spec.nodeName`), and for each Pod on a lab
//! node creates its network namespace, runs the CNI configuration list (the real `kwire-cni`,
//! then `portmap`) as a container runtime does, starts the pod's built-in server
//! (`kwire-lab pod-serve`) in it and writes `status.podIP(s)` and phase Running. A deleted Pod
//! gets CNI DEL (reverse order), its server stopped and its namespace deleted.
//!
//! Each pod's setup and teardown runs on a blocking thread; the supervisor's loop only
//! reconciles and applies results, so one slow CNI call holds up no other pod.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead as _;
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::cni::{self, ConfList, Executor, RuntimeConf};
use super::dns;
use super::serve::{self, declared_ports, format_ports};
use crate::apiserver::ApiServer;
use crate::cluster::naming::LabNames;
use crate::cluster::state::{AgentCommand, LabDescription, LabPaths, NodeSpec};
use crate::cluster::topology;

/// The pod's interface name, as every runtime passes it.
pub const POD_IFNAME: &str = "eth0";
/// The network name in the configuration list.
pub const NETWORK_NAME: &str = "kwire-lab";
/// The CNI version of the configuration list (containerd's default template).
pub const CNI_VERSION: &str = "1.0.0";
/// Reference plugins (portmap) are looked for here after the lab's own plugin directory.
pub const SYSTEM_CNI_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// How long the pod's server may take to bind its ports.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before a failed pod setup is tried again; doubled per failure.
pub const SETUP_RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest pause between setup attempts (the agent may still be starting its CNI server).
pub const SETUP_RETRY_MAX: Duration = Duration::from_secs(4);
/// How long a pod server gets between SIGTERM and SIGKILL.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(2);

/// A pod that is wired and served.
#[derive(Debug)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    pub cni_result: Value,
    pub server: Option<Child>,
    pub host_ports: Value,
}

/// A finished setup or teardown, sent back to the supervisor's loop.
pub enum PodDone {
    Up {
        uid: String,
        result: Result<Box<RunningPod>, String>,
    },
    Down {
        uid: String,
    },
}

/// What a setup or teardown thread needs.
#[derive(Debug, Clone)]
struct PodContext {
    names: LabNames,
    paths: LabPaths,
    exe: PathBuf,
    /// Run CNI DEL on teardown (false: the node left the lab with its agent).
    cni: bool,
    node: NodeSpec,
    /// Cluster DNS is on: pods get its resolv.conf.
    dns: bool,
}

pub struct Kubelet {
    names: LabNames,
    paths: LabPaths,
    exe: PathBuf,
    dns: bool,
    pods: BTreeMap<String, RunningPod>,
    busy: BTreeSet<String>,
    retry: BTreeMap<String, (Instant, Duration)>,
    next_node: usize,
    done: UnboundedSender<PodDone>,
}

/// The stable CNI container id of a pod (the runtime's sandbox id), from its uid.
pub fn container_id(uid: &str) -> String {
    format!("kwire-lab-{uid}")
}

/// The node's CNI configuration directory (`/etc/cni/net.d` on the node).
pub fn node_net_d(node: &NodeSpec) -> PathBuf {
    node.host_path("/etc/cni/net.d")
}

/// The node's CNI plugin directory (`/opt/cni/bin` on the node).
pub fn node_cni_bin(node: &NodeSpec) -> PathBuf {
    node.host_path("/opt/cni/bin")
}

/// The configuration list the node's runtime uses: the first `*.conflist` of the node's
/// `/etc/cni/net.d`, as the DaemonSet's init container installed it. The kwire plugin's host
/// paths (its `socket`, its `delQueueDir`, their defaults when absent) are the node's: the
/// lab's nodes share one machine, so each node's `/run/kwire` is a directory of its own.
pub fn conf_list(node: &NodeSpec) -> Result<ConfList, String> {
    let dir = node_net_d(node);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|e| e == "conflist"));
    files.sort();
    let file = files.first().ok_or_else(|| {
        format!(
            "no CNI configuration in {} (node {}'s /etc/cni/net.d): the DaemonSet's install-cni init container has not run there",
            dir.display(),
            node.name
        )
    })?;
    let text = std::fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut list = ConfList::parse(&v).map_err(|e| format!("{}: {e}", file.display()))?;
    for p in list.plugins.iter_mut().filter(|p| p["type"] == "kwire") {
        for (key, default) in [("socket", CNI_SOCKET), ("delQueueDir", CNI_DEL_QUEUE)] {
            let on_node = p[key].as_str().unwrap_or(default).to_string();
            p[key] = json!(node.host_path(&on_node));
        }
    }
    Ok(list)
}

/// The plugin's socket when its configuration names none (kwire-cni's default).
pub const CNI_SOCKET: &str = "/run/kwire/cni.sock";
/// The plugin's DEL queue when its configuration names none (kwire-cni's default).
pub const CNI_DEL_QUEUE: &str = "/var/lib/kwire/cni-del-queue";

/// Where node `node`'s agent serves the CNI socket (its `/run/kwire/cni.sock`).
pub fn cni_socket(node: &NodeSpec) -> PathBuf {
    node.host_path(CNI_SOCKET)
}

/// Finds kwire-cni: $KWIRE_CNI_BIN, next to this executable, next to the lab's kwire binary.
pub fn find_kwire_cni(lab: &LabDescription) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("KWIRE_CNI_BIN") {
        candidates.push(p.into());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("kwire-cni"));
    }
    if let AgentCommand::Kwire { bin, .. } = &lab.agent {
        if let Some(dir) = bin.parent() {
            candidates.push(dir.join("kwire-cni"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "no kwire-cni binary at {}: build it with `cargo build -p kwire-cni` or set KWIRE_CNI_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// CNI_ARGS as the kubelet's runtime passes them.
fn cni_args(namespace: &str, name: &str, uid: &str) -> Vec<(String, String)> {
    vec![
        ("IgnoreUnknown".into(), "1".into()),
        ("K8S_POD_NAMESPACE".into(), namespace.into()),
        ("K8S_POD_NAME".into(), name.into()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id(uid)),
        ("K8S_POD_UID".into(), uid.into()),
    ]
}

/// The `portMappings` capability from the containers' hostPorts.
fn host_ports(pod: &Value) -> Value {
    let maps: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            let host = p["hostPort"].as_u64().filter(|h| *h != 0)?;
            Some(json!({
                "hostPort": host,
                "containerPort": p["containerPort"],
                "protocol": p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase(),
                "hostIP": p["hostIP"].as_str().unwrap_or(""),
            }))
        })
        .collect();
    Value::Array(maps)
}

fn runtime_conf(
    names: &LabNames,
    namespace: &str,
    name: &str,
    uid: &str,
    ports: &Value,
) -> RuntimeConf {
    let mut capability_args = Map::new();
    if ports.as_array().is_some_and(|p| !p.is_empty()) {
        capability_args.insert("portMappings".into(), ports.clone());
    }
    RuntimeConf {
        container_id: container_id(uid),
        netns: format!("/var/run/netns/{}", names.pod_netns(uid)),
        ifname: POD_IFNAME.into(),
        args: cni_args(namespace, name, uid),
        capability_args,
    }
}

impl PodContext {
    fn executor(&self) -> Executor {
        let mut cni_path = vec![node_cni_bin(&self.node)];
        cni_path.extend(SYSTEM_CNI_DIRS.iter().map(PathBuf::from));
        Executor {
            cni_path,
            netns: Some(self.node.netns.clone()),
            timeout: cni::PLUGIN_TIMEOUT,
        }
    }

    /// Namespace, CNI ADD, server. Undoes what it did when a step fails.
    fn setup(&self, pod: &Value) -> Result<RunningPod, String> {
        let meta = |f: &str| {
            pod.pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (namespace, name, uid) = (meta("namespace"), meta("name"), meta("uid"));
        let netns = self.names.pod_netns(&uid);
        let list = conf_list(&self.node)?;
        write_netconf(&self.paths, &self.node, &list);
        if !topology::netns_exists(&netns) {
            topology::run(&["ip", "netns", "add", &netns]).map_err(|e| e.to_string())?;
        }
        let undo_netns = |e: String| {
            let _ = topology::delete_netns(&netns);
            e
        };
        topology::run(&["ip", "-n", &netns, "link", "set", "lo", "up"])
            .map_err(|e| undo_netns(e.to_string()))?;
        let ports = host_ports(pod);
        let rt = runtime_conf(&self.names, &namespace, &name, &uid, &ports);
        let ex = self.executor();
        let result = ex
            .add(&list, &rt)
            .map_err(|e| undo_netns(format!("CNI ADD: {e}")))?;
        let ips = cni::result_ips(&result);
        if self.dns && !dns::is_dns_pod(pod) {
            let etc = dns::etc_dir(&netns);
            let written = std::fs::create_dir_all(&etc).and_then(|()| {
                std::fs::write(etc.join("resolv.conf"), dns::resolv_conf(&namespace))
            });
            if let Err(e) = written {
                let _ = ex.del(&list, &rt, Some(&result));
                return Err(undo_netns(format!(
                    "writing {}/resolv.conf: {e}",
                    etc.display()
                )));
            }
        }
        let server = if dns::is_dns_pod(pod) {
            self.start_dns(&netns)
        } else {
            self.start_server(&netns, &format!("{namespace}/{name}"), pod)
        };
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                let _ = ex.del(&list, &rt, Some(&result));
                return Err(undo_netns(e));
            }
        };
        Ok(RunningPod {
            namespace,
            name,
            uid,
            node: self.node.name.clone(),
            netns,
            ips,
            cni_result: result,
            server: Some(server),
            host_ports: ports,
        })
    }

    /// dnsmasq for the cluster DNS pod; ready once it listens on port 53 (UDP and TCP).
    fn start_dns(&self, netns: &str) -> Result<Child, String> {
        std::fs::create_dir_all(dns::records_dir(&self.paths.dir))
            .map_err(|e| format!("creating the DNS directory: {e}"))?;
        let (log, log_path) = self.pod_log(netns)?;
        let mut child = dns::dnsmasq(netns, &self.paths.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting dnsmasq (install dnsmasq-base): {e}"))?;
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            let listening = Command::new("ip")
                .args(["netns", "exec", netns, "ss", "-Hln", "sport", "=", ":53"])
                .output()
                .map(|o| {
                    let t = String::from_utf8_lossy(&o.stdout).into_owned();
                    t.contains("udp") && t.contains("tcp")
                })
                .unwrap_or(false);
            if listening {
                return Ok(child);
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                stop_server(&mut child);
                return Err(format!(
                    "dnsmasq did not listen on port 53; see {}",
                    log_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pod's log file (appended to), and its path.
    fn pod_log(&self, netns: &str) -> Result<(std::fs::File, PathBuf), String> {
        let log_dir = self.paths.dir.join("pods");
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("creating {}: {e}", log_dir.display()))?;
        let log_path = log_dir.join(format!("{netns}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        Ok((log, log_path))
    }

    fn start_server(&self, netns: &str, pod_name: &str, pod: &Value) -> Result<Child, String> {
        let (log, log_path) = self.pod_log(netns)?;
        let ports = format_ports(&declared_ports(pod));
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&self.exe)
            .args(["pod-serve", "--pod", pod_name, "--ports", &ports])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the pod server: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(SERVER_READY_TIMEOUT) {
            Ok(l) if l.trim() == serve::READY_LINE => Ok(child),
            other => {
                stop_server(&mut child);
                Err(format!(
                    "the pod server on {ports} did not start ({other:?}); see {}",
                    log_path.display()
                ))
            }
        }
    }

    /// CNI DEL (reverse order), server stopped, namespace deleted. Errors are logged: a
    /// deleted pod's resources go regardless.
    fn teardown(&self, mut pod: RunningPod) {
        if self.cni {
            let rt = runtime_conf(
                &self.names,
                &pod.namespace,
                &pod.name,
                &pod.uid,
                &pod.host_ports,
            );
            let del = conf_list(&self.node).and_then(|list| {
                self.executor()
                    .del(&list, &rt, Some(&pod.cni_result))
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = del {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "CNI DEL failed");
            }
        }
        if let Some(child) = pod.server.as_mut() {
            stop_server(child);
        }
        let _ = std::fs::remove_dir_all(dns::etc_dir(&pod.netns));
        if let Err(e) = topology::delete_netns(&pod.netns) {
            tracing::warn!(netns = %pod.netns, error = %e, "cannot delete the pod's namespace");
        }
    }
}

fn stop_server(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + SERVER_STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
    let _ = child.wait();
}

fn pod_key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        pod.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )
}

impl Kubelet {
    pub fn new(
        lab: &LabDescription,
        names: LabNames,
        paths: LabPaths,
        done: UnboundedSender<PodDone>,
    ) -> Kubelet {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kwire-lab"));
        Kubelet {
            names,
            paths,
            exe,
            dns: lab.dns,
            pods: BTreeMap::new(),
            busy: BTreeSet::new(),
            retry: BTreeMap::new(),
            next_node: 0,
            done,
        }
    }

    fn context(&self, node: &NodeSpec) -> PodContext {
        PodContext {
            names: self.names.clone(),
            paths: self.paths.clone(),
            exe: self.exe.clone(),
            cni: true,
            node: node.clone(),
            dns: self.dns,
        }
    }

    /// Brings the pods in line with the API: schedule, set up new ones, tear down gone ones.
    pub fn reconcile(&mut self, server: &ApiServer, lab: &LabDescription) {
        let kind = ApiServer::kind("v1", "Pod").expect("served");
        let Ok(pods) = server.list(kind, None) else {
            return;
        };
        let mut wanted = BTreeSet::new();
        let now = Instant::now();
        for pod in pods {
            let uid = pod
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if uid.is_empty()
                || pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true)
            {
                continue;
            }
            let ns = pod
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            let name = pod
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let node_name = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or("");
            if node_name.is_empty() {
                if lab.nodes.is_empty() {
                    continue;
                }
                let node = &lab.nodes[self.next_node % lab.nodes.len()];
                self.next_node += 1;
                match server.merge_patch(
                    kind,
                    Some(&ns),
                    &name,
                    &json!({"spec": {"nodeName": node.name}}),
                    false,
                ) {
                    Ok(_) => {
                        tracing::info!(pod = %format!("{ns}/{name}"), node = %node.name, "scheduled")
                    }
                    Err(e) => {
                        tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot bind to a node")
                    }
                }
                // The write wakes the next reconcile, which sets the pod up.
                continue;
            }
            let Some(node) = lab.node(node_name) else {
                continue;
            };
            wanted.insert(uid.clone());
            if self.pods.contains_key(&uid) || self.busy.contains(&uid) {
                continue;
            }
            if self.retry.get(&uid).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            self.busy.insert(uid.clone());
            let ctx = self.context(node);
            let done = self.done.clone();
            tracing::info!(pod = %format!("{ns}/{name}"), node = %node.name, netns = %self.names.pod_netns(&uid), "setting up");
            tokio::task::spawn_blocking(move || {
                let result = ctx.setup(&pod).map(Box::new);
                let _ = done.send(PodDone::Up { uid, result });
            });
        }
        self.retry.retain(|uid, _| wanted.contains(uid));
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, p)| !wanted.contains(*uid) || lab.node(&p.node).is_none())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            let pod = self.pods.remove(&uid).expect("present");
            let ctx = match lab.node(&pod.node) {
                Some(node) => self.context(node),
                None => {
                    // The node left the lab with its agent and namespace: no CNI DEL to run
                    // (the agent's state went with the node); the pod's namespace still goes.
                    let mut ctx = self.context(&NodeSpec::new(&self.names, &self.paths, 0));
                    ctx.cni = false;
                    ctx
                }
            };
            self.busy.insert(uid.clone());
            let done = self.done.clone();
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), netns = %pod.netns, "tearing down");
            tokio::task::spawn_blocking(move || {
                ctx.teardown(pod);
                let _ = done.send(PodDone::Down { uid });
            });
        }
    }

    /// Applies a finished setup or teardown (status writes, retries).
    pub fn finished(&mut self, server: &ApiServer, lab: &LabDescription, done: PodDone) {
        let kind = ApiServer::kind("v1", "Pod").expect("served");
        match done {
            PodDone::Down { uid } => {
                self.busy.remove(&uid);
            }
            PodDone::Up {
                uid,
                result: Ok(pod),
            } => {
                self.busy.remove(&uid);
                self.retry.remove(&uid);
                let host_ips: Vec<String> = lab
                    .node(&pod.node)
                    .map(|n| vec![n.underlay_ipv4.to_string(), n.underlay_ipv6.to_string()])
                    .unwrap_or_default();
                let status = json!({"status": {
                    "phase": "Running",
                    "podIP": pod.ips.first().map(ToString::to_string),
                    "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                    "hostIP": host_ips.first(),
                    "hostIPs": host_ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                    "message": null,
                    "reason": null,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Initialized", "status": "True"},
                        {"type": "ContainersReady", "status": "True"},
                        {"type": "Ready", "status": "True"},
                    ],
                }});
                let key = format!("{}/{}", pod.namespace, pod.name);
                tracing::info!(pod = %key, ips = ?pod.ips, netns = %pod.netns, "running");
                if let Err(e) =
                    server.merge_patch(kind, Some(&pod.namespace), &pod.name, &status, true)
                {
                    tracing::info!(pod = %key, error = %e, "pod gone before its status was written");
                }
                self.pods.insert(uid, *pod);
                // A pod deleted during setup is torn down on the next reconcile.
            }
            PodDone::Up {
                uid,
                result: Err(e),
            } => {
                self.busy.remove(&uid);
                let backoff = self
                    .retry
                    .get(&uid)
                    .map(|(_, b)| (*b * 2).min(SETUP_RETRY_MAX))
                    .unwrap_or(SETUP_RETRY_MIN);
                self.retry
                    .insert(uid.clone(), (Instant::now() + backoff, backoff));
                let message = e;
                let pods = server.list(kind, None).unwrap_or_default();
                if let Some(p) = pods.iter().find(|p| {
                    p.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid.as_str())
                }) {
                    let key = pod_key(p);
                    tracing::warn!(pod = %key, error = %message, retry_ms = backoff.as_millis() as u64, "pod setup failed");
                    let ns = p
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    let name = p
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let status = json!({"status": {"phase": "Pending", "reason": "KwireLabSetupFailed", "message": message}});
                    let _ = server.merge_patch(kind, Some(ns), name, &status, true);
                }
            }
        }
    }

    /// When nothing more is due: the earliest retry.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry.values().map(|(at, _)| *at).min()
    }

    /// Stops every pod server (the lab is going down; `down` deletes the namespaces).
    pub fn stop_all(&mut self) {
        for pod in self.pods.values_mut() {
            if let Some(child) = pod.server.as_mut() {
                stop_server(child);
            }
        }
    }
}

/// Writes the configuration list the lab's runtime uses for `node` (node paths made host
/// paths) to `nodes/<node>/net.d/10-kwire.conflist`, so that `cnitool` (with NETCONFPATH) can
/// be run by hand the way the lab's kubelet runs it.
pub fn write_netconf(paths: &LabPaths, node: &NodeSpec, list: &ConfList) {
    let dir = paths.node_dir(&node.name).join("net.d");
    let text = serde_json::to_string_pretty(&list.to_value()).expect("serializes");
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("10-kwire.conflist"), text))
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the CNI configuration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_list_and_runtime_conf_are_what_a_runtime_passes() {
        let names = LabNames::new("t1").unwrap();
        let paths = LabPaths::new("t1");
        let mut node = NodeSpec::new(&names, &paths, 2);
        let root = tempfile::tempdir().unwrap();
        node.root = root.path().to_path_buf();
        assert!(conf_list(&node).unwrap_err().contains("install-cni"));
        let net_d = root.path().join("etc/cni/net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        std::fs::write(net_d.join("10-kwire.conflist"), crate::manifests::CONFLIST).unwrap();
        let l = conf_list(&node).unwrap();
        let v = l.to_value();
        assert_eq!(v["plugins"][0]["type"], "kwire");
        assert_eq!(
            v["plugins"][0]["socket"],
            json!(root.path().join("run/kwire/cni.sock"))
        );
        assert_eq!(
            v["plugins"][0]["delQueueDir"],
            json!(root.path().join("var/lib/kwire/cni-del-queue"))
        );
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(ConfList::parse(&v).unwrap(), l);
        let pod = json!({"spec": {"containers": [{"name": "c", "ports": [
            {"containerPort": 80, "hostPort": 8080, "protocol": "TCP"}, {"containerPort": 53, "protocol": "UDP"}]}]}});
        let ports = host_ports(&pod);
        assert_eq!(
            ports,
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );
        let rt = runtime_conf(&names, "default", "web", "u-1", &ports);
        assert_eq!(
            rt.netns,
            format!("/var/run/netns/{}", names.pod_netns("u-1"))
        );
        assert_eq!(rt.container_id, "kwire-lab-u-1");
        assert!(rt.args.contains(&("K8S_POD_UID".into(), "u-1".into())));
        let c = cni::plugin_config(&l, &l.plugins[1], None, &rt);
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        let none = runtime_conf(&names, "default", "web", "u-1", &host_ports(&json!({})));
        assert!(none.capability_args.is_empty());
    }
}
