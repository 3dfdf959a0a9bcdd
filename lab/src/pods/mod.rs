//! Pods in a lab: the supervisor's kubelet role ([`kubelet`]: namespaces, the real CNI plugin
//! run as a runtime runs it ([`cni`]), a built-in server per pod ([`serve`])), and the user's
//! commands `apply`/`delete -f` ([`manifest`]), `probe` ([`probe`]), `exec NS/POD` and
//! `up --pods N`.

pub mod cni;
pub mod dns;
pub mod endpoints;
pub mod kubelet;
pub mod manifest;
pub mod matrix;
pub mod probe;
pub mod serve;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::cluster::client::{self, ApiAccess, ClientError};
use crate::cluster::naming::LabNames;
use crate::cluster::state::{load_running, LabDescription, Runtime};
use crate::cluster::{topology, LabError};
use probe::{Host, ProbeReport};
use serve::Protocol;

/// A pod as `status` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub phase: Option<String>,
    /// The pod's network namespace (None until it exists).
    pub netns: Option<String>,
    pub ips: Vec<String>,
    /// Why a pod is not running (setup errors), if the lab said.
    pub message: Option<String>,
}

impl PodStatus {
    pub fn from_object(names: &LabNames, pod: &Value) -> PodStatus {
        let s = |p: &str| pod.pointer(p).and_then(Value::as_str).map(str::to_string);
        let netns = s("/metadata/uid")
            .map(|uid| names.pod_netns(&uid))
            .filter(|ns| topology::netns_exists(ns));
        PodStatus {
            name: s("/metadata/name").unwrap_or_default(),
            namespace: s("/metadata/namespace").unwrap_or_default(),
            node: s("/spec/nodeName").filter(|n| !n.is_empty()),
            phase: s("/status/phase"),
            netns,
            ips: pod
                .pointer("/status/podIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().map(str::to_string))
                .collect(),
            message: s("/status/message"),
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn running(&self) -> bool {
        self.phase.as_deref() == Some("Running") && !self.ips.is_empty()
    }
}

fn api_access(runtime: Option<&Runtime>, lab: &str) -> Result<ApiAccess, LabError> {
    let runtime = runtime.ok_or_else(|| LabError::NotUp(lab.to_string()))?;
    Ok(ApiAccess::new(
        &runtime.api_url,
        &crate::cluster::state::lab_dir(lab),
    )?)
}

/// Every pod of the lab, from the API stand-in.
pub fn list_pods(names: &LabNames, runtime: Option<&Runtime>) -> Result<Vec<PodStatus>, LabError> {
    let addr = &api_access(runtime, names.name())?;
    let list = client::get(addr, "/api/v1/pods")?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| PodStatus::from_object(names, p))
        .collect())
}

fn running_lab(name: &str) -> Result<(LabNames, LabDescription, Option<Runtime>), LabError> {
    let names = LabNames::new(name)?;
    let (lab, runtime) = load_running(&names)?;
    Ok((names, lab, runtime))
}

/// The pod `ns/name` (or `name` in `default`).
pub fn find_pod(
    names: &LabNames,
    runtime: Option<&Runtime>,
    given: &str,
) -> Result<PodStatus, LabError> {
    let (ns, name) = given.split_once('/').unwrap_or(("default", given));
    let pods = list_pods(names, runtime)?;
    pods.into_iter()
        .find(|p| p.namespace == ns && p.name == name)
        .ok_or_else(|| {
            LabError::Usage(format!(
                "lab {} has no pod {ns}/{name} (`kwire-lab status --name {}` lists them)",
                names.name(),
                names.name()
            ))
        })
}

/// `kwire-lab apply -f FILE` (or `delete -f FILE` with `delete`).
pub fn apply(
    name: &str,
    file: &Path,
    delete: bool,
    ignore_not_found: bool,
) -> Result<(), LabError> {
    let (names, _, runtime) = running_lab(name)?;
    let addr = &api_access(runtime.as_ref(), names.name())?;
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| LabError::io(format!("reading {}", file.display()), e))?;
    let objects = manifest::parse(&text, &file.display().to_string()).map_err(LabError::Usage)?;
    let mut failed = 0;
    let objects: Vec<_> = if delete {
        objects.into_iter().rev().collect()
    } else {
        objects
    };
    for o in objects {
        let outcome = if delete {
            match client::request(addr, "DELETE", &o.path(), None) {
                Ok(_) => Ok("deleted"),
                Err(ClientError::Status { status: 404, .. }) if ignore_not_found => Ok("not found"),
                Err(e) => Err(e),
            }
        } else {
            match client::request(
                addr,
                "POST",
                &o.collection_path(),
                Some(("application/json", &o.object)),
            ) {
                Ok(_) => Ok("created"),
                Err(ClientError::Status { status: 409, .. }) => client::request(
                    addr,
                    "PATCH",
                    &o.path(),
                    Some(("application/merge-patch+json", &o.object)),
                )
                .map(|_| "configured"),
                Err(e) => Err(e),
            }
        };
        match outcome {
            Ok(what) => println!("{} {what}", o.display()),
            Err(e) => {
                eprintln!("{}: {e}", o.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(LabError::Usage(format!(
            "{failed} object(s) of {} failed",
            file.display()
        )));
    }
    Ok(())
}

/// Name of pod `i` (from 1) of node `node_index` that `up --pods` creates.
pub fn lab_pod_name(node_index: u32, i: u32) -> String {
    format!("pod-{node_index}-{i}")
}

/// `up --pods N`: creates N pods per node (namespace `default`, label app=lab-pod) and waits
/// until all run with IPs.
pub fn create_lab_pods(name: &str, per_node: u32, timeout: Duration) -> Result<(), LabError> {
    let (names, lab, runtime) = running_lab(name)?;
    let addr = &api_access(runtime.as_ref(), names.name())?;
    let mut wanted = Vec::new();
    for node in &lab.nodes {
        for i in 1..=per_node {
            let pod_name = lab_pod_name(node.index, i);
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": "default", "labels": {"app": "lab-pod"}},
                "spec": {"nodeName": node.name, "containers": [{"name": "serve", "image": "kwire-lab/pod-serve"}]},
            });
            match client::request(
                addr,
                "POST",
                "/api/v1/namespaces/default/pods",
                Some(("application/json", &pod)),
            ) {
                Ok(_) | Err(ClientError::Status { status: 409, .. }) => {}
                Err(e) => return Err(e.into()),
            }
            wanted.push(format!("default/{pod_name}"));
        }
    }
    println!("created {} pods; waiting for them to run", wanted.len());
    wait_pods(&names, runtime.as_ref(), &wanted, timeout)
}

/// Waits until every pod in `wanted` (`ns/name`) is Running with IPs.
pub fn wait_pods(
    names: &LabNames,
    runtime: Option<&Runtime>,
    wanted: &[String],
    timeout: Duration,
) -> Result<(), LabError> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let pods = list_pods(names, runtime)?;
        let running: Vec<&PodStatus> = pods
            .iter()
            .filter(|p| p.running() && wanted.contains(&p.key()))
            .collect();
        if last != Some(running.len()) {
            println!("pods: {}/{} running", running.len(), wanted.len());
            last = Some(running.len());
        }
        if running.len() == wanted.len() {
            for p in running {
                println!(
                    "pod {} on {}: {}",
                    p.key(),
                    p.node.as_deref().unwrap_or("-"),
                    p.ips.join(",")
                );
            }
            return Ok(());
        }
        if start.elapsed() > timeout {
            let stuck: Vec<String> = pods
                .iter()
                .filter(|p| wanted.contains(&p.key()) && !p.running())
                .map(|p| {
                    format!(
                        "{} ({})",
                        p.key(),
                        p.message.as_deref().unwrap_or("no message")
                    )
                })
                .collect();
            return Err(LabError::Usage(format!(
                "pods not running after {} s: {}; the lab stays up (see {})",
                timeout.as_secs(),
                stuck.join("; "),
                crate::cluster::state::LabPaths::new(names.name())
                    .supervisor_log()
                    .display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kwire-lab exec NS/POD -- CMD`: the command's exit code.
pub fn exec_pod(name: &str, pod: &str, argv: &[String]) -> Result<i32, LabError> {
    let (names, _, runtime) = running_lab(name)?;
    let p = find_pod(&names, runtime.as_ref(), pod)?;
    let netns = p.netns.clone().ok_or_else(|| {
        LabError::Usage(format!(
            "pod {} has no network namespace yet (phase {:?})",
            p.key(),
            p.phase
        ))
    })?;
    let status = Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(argv)
        .status()
        .map_err(|e| LabError::io(format!("running `ip netns exec {netns}`"), e))?;
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// What `probe` was asked.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub from: String,
    pub to: String,
    pub ipv6: bool,
    pub timeout: Duration,
}

/// `kwire-lab probe`: the report (reachable or not), or an error (bad names, no such pod).
pub fn probe(name: &str, opts: &ProbeOptions) -> Result<ProbeReport, LabError> {
    let (names, lab, runtime) = running_lab(name)?;
    let netns = if opts.from.contains('/') {
        let p = find_pod(&names, runtime.as_ref(), &opts.from)?;
        p.netns.clone().ok_or_else(|| {
            LabError::Usage(format!("pod {} has no network namespace yet", p.key()))
        })?
    } else if let Some(node) = names
        .node_index(&opts.from)
        .and_then(|i| lab.nodes.iter().find(|n| n.index == i))
    {
        node.netns.clone()
    } else {
        return Err(LabError::Usage(format!(
            "FROM {:?} is neither a pod (`NAMESPACE/NAME`) nor a node of lab {} (`n1`)",
            opts.from,
            names.name()
        )));
    };
    let target = probe::parse_target(&opts.to).map_err(LabError::Usage)?;
    let addr: IpAddr = match &target.host {
        Host::Ip(ip) => *ip,
        Host::Pod {
            namespace,
            name: pod,
        } => {
            let p = find_pod(&names, runtime.as_ref(), &format!("{namespace}/{pod}"))?;
            p.ips
                .iter()
                .filter_map(|i| i.parse::<IpAddr>().ok())
                .find(|ip| ip.is_ipv6() == opts.ipv6)
                .ok_or_else(|| {
                    LabError::Usage(format!(
                        "pod {} has no {} address (podIPs {:?})",
                        p.key(),
                        if opts.ipv6 { "IPv6" } else { "IPv4" },
                        p.ips
                    ))
                })?
        }
    };
    let protocol = target.protocol.unwrap_or(Protocol::Tcp);
    let (reachable, detail) = probe::probe(&netns, addr, target.port, protocol, opts.timeout)
        .map_err(|e| LabError::io(format!("probing {addr} from {}", opts.from), e))?;
    Ok(ProbeReport {
        from: opts.from.clone(),
        to: opts.to.clone(),
        address: addr.to_string(),
        port: target.port,
        protocol: match target.port {
            Some(_) => protocol.to_string(),
            None => "ICMP".into(),
        },
        reachable,
        detail,
    })
}
