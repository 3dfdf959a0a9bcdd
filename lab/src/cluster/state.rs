//! What a lab writes down about itself under /run/kwire-lab/<name>/: `lab.json` (topology and
//! how to run agents; written by `up`, `add-node`, `remove-node`) and `runtime.json` (API
//! address, agent pids and restarts; written only by the supervisor).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::naming::{self, LabNames};

/// Where labs keep their state; tmpfs, so a reboot (which also drops the namespaces) clears it.
pub const STATE_ROOT: &str = "/run/kwire-lab";

/// The directory of lab `name`.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// Files of one lab.
#[derive(Debug, Clone)]
pub struct LabPaths {
    pub dir: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str) -> LabPaths {
        LabPaths { dir: lab_dir(name) }
    }
    pub fn description(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    pub fn runtime(&self) -> PathBuf {
        self.dir.join("runtime.json")
    }
    pub fn supervisor_pid(&self) -> PathBuf {
        self.dir.join("supervisor.pid")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }
    /// kubeconfig for tools on the host: `http://127.0.0.1:PORT`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// kubeconfig for the agents in node namespaces: the API on the underlay bridge.
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig-agents")
    }
    /// kubeconfig with node `node`'s agent token (`kwire-lab kubeconfig --node`).
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("kubeconfig")
    }
    /// Every distinct (user, verb, resource) the API stand-in saw, written by the supervisor.
    pub fn audit(&self) -> PathBuf {
        self.dir.join("audit.json")
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
}

/// How the supervisor runs each node's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentCommand {
    /// `ip netns exec NS KWIRE agent --kubeconfig ... --node-name ...` (the real agent).
    Kwire {
        bin: PathBuf,
        /// Appended to the DaemonSet agent container's args (`kwire-lab up --agent-arg`), as
        /// a `kubectl patch` of the DaemonSet would.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        args: Vec<String>,
    },
    /// `ip netns exec NS sh -c SCRIPT`, with the node's settings in `KWIRE_LAB_*` variables
    /// (tests use it to run a stand-in for the agent).
    Shell { script: String },
}

/// One node of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub index: u32,
    /// Node object name, also the namespace name.
    pub name: String,
    pub netns: String,
    pub underlay_if: String,
    pub bridge_port: String,
    pub tun_if: String,
    pub underlay_ipv4: Ipv4Addr,
    pub underlay_ipv6: Ipv6Addr,
    /// The node's own host filesystem: every hostPath but [`naming::SHARED_HOST_PATHS`] is
    /// this directory plus the path (the lab's nodes share one machine).
    pub root: PathBuf,
    /// The agent's `/var/lib/kwire` (its hostPath).
    pub state_dir: PathBuf,
    /// The agent's `/run/kwire` (its hostPath).
    pub run_dir: PathBuf,
    pub log: PathBuf,
    pub metrics_url: String,
}

impl NodeSpec {
    pub fn new(names: &LabNames, paths: &LabPaths, index: u32) -> NodeSpec {
        let name = names.node_name(index);
        let dir = paths.node_dir(&name);
        let root = dir.join("root");
        NodeSpec {
            index,
            netns: names.node_netns(index),
            underlay_if: names.node_underlay_if(index),
            bridge_port: names.bridge_port(index),
            tun_if: naming::AGENT_INTERFACE.to_string(),
            underlay_ipv4: names.node_underlay_v4(index),
            underlay_ipv6: names.node_underlay_v6(index),
            state_dir: root.join("var/lib/kwire"),
            run_dir: root.join("run/kwire"),
            root,
            log: dir.join("agent.log"),
            metrics_url: format!("http://{}/metrics", naming::METRICS_ADDR),
            name,
        }
    }

    /// Where hostPath `path` of this node is on the lab's machine (`/var/run` is `/run`).
    pub fn host_path(&self, path: &str) -> PathBuf {
        let path = match path.strip_prefix("/var/run") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("/run{rest}"),
            _ => path.to_string(),
        };
        let shared = naming::SHARED_HOST_PATHS
            .iter()
            .any(|s| path == *s || path.strip_prefix(s).is_some_and(|r| r.starts_with('/')));
        if shared {
            PathBuf::from(path)
        } else {
            self.root.join(path.trim_start_matches('/'))
        }
    }

    /// The node's WireGuard userspace API socket (`/var/run/wireguard/IF.sock` on the node).
    pub fn uapi_socket(&self) -> PathBuf {
        self.host_path(&format!("/var/run/wireguard/{}.sock", self.tun_if))
    }
}

/// `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabDescription {
    pub name: String,
    /// The 16-bit tag in interface names and the underlay IPv6 prefix, as 4 hex digits.
    pub tag: String,
    pub underlay_netns: String,
    pub bridge: String,
    /// The API stand-in as the agents reach it (on the underlay bridge).
    pub api_underlay: SocketAddr,
    pub agent: AgentCommand,
    pub nodes: Vec<NodeSpec>,
    /// Cluster DNS (`up --dns`): the `kube-dns` pod and Service, pods resolving through it.
    #[serde(default)]
    pub dns: bool,
}

impl LabDescription {
    pub fn new(names: &LabNames, nodes: u32, agent: AgentCommand) -> LabDescription {
        let paths = LabPaths::new(names.name());
        LabDescription {
            name: names.name().to_string(),
            tag: names.tag_hex(),
            underlay_netns: names.underlay_netns(),
            bridge: names.bridge(),
            api_underlay: SocketAddr::from((names.api_underlay_v4(), naming::API_UNDERLAY_PORT)),
            agent,
            nodes: (1..=nodes)
                .map(|i| NodeSpec::new(names, &paths, i))
                .collect(),
            dns: false,
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The next free node index.
    pub fn next_index(&self) -> u32 {
        self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1
    }
}

/// One agent as the supervisor sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRuntime {
    /// None while waiting to be restarted.
    pub pid: Option<u32>,
    pub restarts: u32,
    /// How the last run ended (`exit status: 1`, `signal: 9`).
    pub last_exit: Option<String>,
}

/// `runtime.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub supervisor_pid: u32,
    /// The API stand-in for host tools (`http://127.0.0.1:PORT`).
    pub api_url: String,
    /// True once the API serves, the Nodes are registered and every agent was started.
    pub ready: bool,
    pub agents: BTreeMap<String, AgentRuntime>,
}

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid lab state file (remove the lab with `kwire-lab down`)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a JSON state file; Ok(None) when it does not exist.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a JSON state file atomically (temporary file, then rename).
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_vec_pretty(value).expect("state serializes");
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&text).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// The running lab's description and runtime, or "not up".
pub fn load_running(
    names: &LabNames,
) -> Result<(LabDescription, Option<Runtime>), super::LabError> {
    let paths = LabPaths::new(names.name());
    let lab: LabDescription = load(&paths.description())?
        .ok_or_else(|| super::LabError::NotUp(names.name().to_string()))?;
    let runtime = load(&paths.runtime())?;
    Ok((lab, runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_round_trips_and_names_nodes() {
        let names = LabNames::new("t1").unwrap();
        let d = LabDescription::new(
            &names,
            3,
            AgentCommand::Shell {
                script: "exec sleep 100".into(),
            },
        );
        assert_eq!(d.nodes.len(), 3);
        assert_eq!(d.nodes[2].name, "t1-n3");
        assert_eq!(d.nodes[2].underlay_ipv4.to_string(), "192.0.2.3");
        assert_eq!(d.api_underlay.to_string(), "192.0.2.254:6443");
        assert_eq!(
            d.nodes[0].state_dir,
            Path::new("/run/kwire-lab/t1/nodes/t1-n1/root/var/lib/kwire")
        );
        assert_eq!(d.nodes[0].host_path("/var/lib/kwire"), d.nodes[0].state_dir);
        assert_eq!(
            d.nodes[0].uapi_socket(),
            Path::new("/run/kwire-lab/t1/nodes/t1-n1/root/run/wireguard/kwire0.sock")
        );
        assert_eq!(
            d.nodes[0].host_path("/var/run/netns"),
            Path::new("/run/netns")
        );
        assert_eq!(
            d.nodes[0].host_path("/dev/net/tun"),
            Path::new("/dev/net/tun")
        );
        assert_eq!(d.next_index(), 4);
        let dir = std::env::temp_dir().join(format!("kwire-lab-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lab.json");
        save(&p, &d).unwrap();
        let back: LabDescription = load(&p).unwrap().unwrap();
        assert_eq!(back, d);
        assert!(load::<LabDescription>(&dir.join("missing.json"))
            .unwrap()
            .is_none());
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            load::<LabDescription>(&p),
            Err(StateError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
