//! `deploy/` as the lab reads it, compiled in: the objects `up` applies to the API stand-in
//! (ServiceAccount, ClusterRole, ClusterRoleBinding, the ValidatingAdmissionPolicy and its
//! binding), the DaemonSet's pod spec the lab runs on every node as the kubelet would, the CNI
//! configuration list and the image's file list. Nothing here is a copy of a value from
//! `deploy/`: change the manifest and the lab runs what it says (or refuses, saying what it
//! cannot honour).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize as _;
use serde_json::Value;

/// `deploy/kwire.yaml`.
pub const KWIRE_YAML: &str = include_str!("../../deploy/kwire.yaml");
/// `deploy/peer-crd.yaml`.
pub const PEER_CRD_YAML: &str = include_str!("../../deploy/peer-crd.yaml");
/// `deploy/admission.yaml`.
pub const ADMISSION_YAML: &str = include_str!("../../deploy/admission.yaml");
/// `deploy/10-kwire.conflist`.
pub const CONFLIST: &str = include_str!("../../deploy/10-kwire.conflist");
/// `deploy/image.txt`.
pub const IMAGE_FILES: &str = include_str!("../../deploy/image.txt");
/// Name of the DaemonSet's agent container.
pub const AGENT_CONTAINER: &str = "kwire";

/// The capabilities a container runtime (containerd, CRI-O) grants a container by default,
/// before the securityContext's `drop` and `add`.
pub const RUNTIME_DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every document of a YAML (or JSON) text, as JSON values (empty documents skipped).
pub fn documents(text: &str, source: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .map_err(|e| format!("{source}: document {} is not valid YAML: {e}", i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The objects of `deploy/` that the API stores (all but the DaemonSet, which the lab runs).
pub fn api_objects() -> Result<Vec<Value>, String> {
    let mut out = documents(PEER_CRD_YAML, "deploy/peer-crd.yaml")?;
    out.extend(documents(KWIRE_YAML, "deploy/kwire.yaml")?);
    out.extend(documents(ADMISSION_YAML, "deploy/admission.yaml")?);
    out.retain(|o| o["kind"] != "DaemonSet");
    Ok(out)
}

/// The DaemonSet of `deploy/kwire.yaml`.
pub fn daemonset() -> Result<PodSpec, String> {
    let docs = documents(KWIRE_YAML, "deploy/kwire.yaml")?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .ok_or("deploy/kwire.yaml has no DaemonSet")?;
    PodSpec::parse(&ds["spec"]["template"]["spec"]).map_err(|e| {
        format!(
            "deploy/kwire.yaml, DaemonSet {}: {e}",
            ds["metadata"]["name"]
        )
    })
}

/// A hostPath volume (the only kind the DaemonSet uses and the lab supports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    pub path: String,
    /// `DirectoryOrCreate`, `Directory`, `CharDevice`, `File`, `FileOrCreate`, "".
    pub kind: String,
}

/// `mountPropagation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// `None` (the default): private; nothing propagates.
    Private,
    /// `HostToContainer`: mounts made on the host later appear in the container (rslave).
    HostToContainer,
    /// `Bidirectional`: both ways (rshared; needs a privileged container).
    Bidirectional,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub volume: String,
    pub mount_path: String,
    pub read_only: bool,
    pub propagation: Propagation,
}

/// One `env` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    Value(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, EnvSource)>,
    /// The capability set the runtime gives it (without the `CAP_` prefix).
    pub capabilities: BTreeSet<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    pub mounts: Vec<VolumeMount>,
    /// Ports it declares (`containerPort`/protocol), as documentation.
    pub ports: Vec<(u16, String)>,
}

/// What the lab needs of a pod spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub service_account: String,
    pub automount_token: bool,
    pub host_network: bool,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    pub volumes: BTreeMap<String, HostPath>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// The capability set of a securityContext, as the kubelet asks the runtime for it: the
/// runtime's defaults, minus `drop` (`ALL` drops every one), plus `add`.
pub fn capability_set(security_context: &Value) -> BTreeSet<String> {
    let norm = |c: String| {
        c.trim_start_matches("CAP_")
            .to_ascii_uppercase()
            .to_string()
    };
    let drop: Vec<String> = strings(&security_context["capabilities"]["drop"])
        .into_iter()
        .map(norm)
        .collect();
    let add = strings(&security_context["capabilities"]["add"])
        .into_iter()
        .map(norm);
    let mut set: BTreeSet<String> = if drop.iter().any(|d| d == "ALL") {
        BTreeSet::new()
    } else {
        RUNTIME_DEFAULT_CAPABILITIES
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    set.extend(add);
    set
}

impl Container {
    fn parse(c: &Value, volumes: &BTreeMap<String, HostPath>) -> Result<Container, String> {
        let name = c["name"].as_str().unwrap_or("").to_string();
        let at = |what: String| format!("container {name:?}: {what}");
        let sc = &c["securityContext"];
        if sc["privileged"].as_bool() == Some(true) {
            return Err(at(
                "privileged containers are not run by kwire-lab (and kwire needs none)".into(),
            ));
        }
        for unsupported in [
            "runAsUser",
            "runAsGroup",
            "seccompProfile",
            "appArmorProfile",
            "seLinuxOptions",
            "procMount",
        ] {
            if !sc[unsupported].is_null() {
                return Err(at(format!(
                    "securityContext.{unsupported} is not supported by kwire-lab's kubelet role"
                )));
            }
        }
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap_or("").to_string();
            let src = if let Some(v) = e["value"].as_str() {
                EnvSource::Value(v.to_string())
            } else if let Some(f) = e
                .pointer("/valueFrom/fieldRef/fieldPath")
                .and_then(Value::as_str)
            {
                EnvSource::Field(f.to_string())
            } else if e["valueFrom"].is_null() {
                EnvSource::Value(String::new())
            } else {
                return Err(at(format!(
                    "env {key}: only `value` and `valueFrom.fieldRef` are supported by kwire-lab"
                )));
            };
            env.push((key, src));
        }
        if c["envFrom"].is_array() {
            return Err(at("envFrom is not supported by kwire-lab".into()));
        }
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let volume = m["name"].as_str().unwrap_or("").to_string();
            if !volumes.contains_key(&volume) {
                return Err(at(format!(
                    "volumeMount {volume:?} names no hostPath volume of the pod"
                )));
            }
            if m.get("subPath").is_some() || m.get("subPathExpr").is_some() {
                return Err(at(format!(
                    "volumeMount {volume:?}: subPath is not supported by kwire-lab"
                )));
            }
            let propagation = match m["mountPropagation"].as_str().unwrap_or("None") {
                "None" => Propagation::Private,
                "HostToContainer" => Propagation::HostToContainer,
                "Bidirectional" => Propagation::Bidirectional,
                other => {
                    return Err(at(format!(
                        "volumeMount {volume:?}: unknown mountPropagation {other:?}"
                    )))
                }
            };
            mounts.push(VolumeMount {
                volume,
                mount_path: m["mountPath"].as_str().unwrap_or("").to_string(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
                propagation,
            });
        }
        Ok(Container {
            image: c["image"].as_str().unwrap_or("").to_string(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env,
            capabilities: capability_set(sc),
            read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privileges: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            mounts,
            ports: c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["containerPort"].as_u64()? as u16,
                        p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    ))
                })
                .collect(),
            name,
        })
    }

    /// The environment the kubelet gives it on `node` (declared env, field refs resolved).
    pub fn environment(&self, pod: &PodContext) -> Result<Vec<(String, String)>, String> {
        self.env
            .iter()
            .map(|(k, src)| {
                let v = match src {
                    EnvSource::Value(v) => v.clone(),
                    EnvSource::Field(f) => match f.as_str() {
                        "spec.nodeName" => pod.node_name.clone(),
                        "spec.serviceAccountName" => pod.service_account.clone(),
                        "metadata.name" => pod.pod_name.clone(),
                        "metadata.namespace" => pod.namespace.clone(),
                        "status.hostIP" | "status.podIP" => pod.host_ip.clone(),
                        other => {
                            return Err(format!(
                                "container {:?}: env {k}: fieldRef {other} is not supported by kwire-lab",
                                self.name
                            ))
                        }
                    },
                };
                Ok((k.clone(), v))
            })
            .collect()
    }

    /// `command` + `args` (the image's entrypoint is not consulted: the manifest names it).
    pub fn argv(&self) -> Result<Vec<String>, String> {
        if self.command.is_empty() {
            return Err(format!(
                "container {:?}: no `command`; kwire-lab runs the command the manifest names",
                self.name
            ));
        }
        Ok(self.command.iter().chain(&self.args).cloned().collect())
    }
}

/// What the kubelet knows of the pod it starts, for field refs.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub node_name: String,
    pub host_ip: String,
    pub pod_name: String,
    pub namespace: String,
    pub service_account: String,
}

impl PodSpec {
    pub fn parse(spec: &Value) -> Result<PodSpec, String> {
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or("").to_string();
            let Some(path) = v.pointer("/hostPath/path").and_then(Value::as_str) else {
                return Err(format!(
                    "volume {name:?}: only hostPath volumes are supported by kwire-lab"
                ));
            };
            volumes.insert(
                name,
                HostPath {
                    path: path.to_string(),
                    kind: v
                        .pointer("/hostPath/type")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                },
            );
        }
        let containers = |key: &str| -> Result<Vec<Container>, String> {
            spec[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| Container::parse(c, &volumes))
                .collect()
        };
        Ok(PodSpec {
            service_account: spec["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            automount_token: spec["automountServiceAccountToken"]
                .as_bool()
                .unwrap_or(true),
            host_network: spec["hostNetwork"].as_bool().unwrap_or(false),
            init_containers: containers("initContainers")?,
            containers: containers("containers")?,
            volumes,
        })
    }

    /// The agent container.
    pub fn agent(&self) -> Result<&Container, String> {
        self.containers
            .iter()
            .find(|c| c.name == AGENT_CONTAINER)
            .ok_or_else(|| format!("the DaemonSet has no container named {AGENT_CONTAINER:?}"))
    }
}

/// One line of `deploy/image.txt`: where a file goes in the image and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub path: String,
    pub source: ImageSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `kwire` or `kwire-cni`: a binary of this workspace.
    Binary(String),
    /// A file of this repository (`deploy/...`).
    Repository(String),
    /// A file of the build host, with its shared libraries.
    Host(String),
}

/// The image's files, from `deploy/image.txt`.
pub fn image_files() -> Vec<ImageFile> {
    IMAGE_FILES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (path, source) = l.split_once(char::is_whitespace)?;
            let source = source.trim();
            let source = if source.starts_with('/') {
                ImageSource::Host(source.to_string())
            } else if source.contains('/') {
                ImageSource::Repository(source.to_string())
            } else {
                ImageSource::Binary(source.to_string())
            };
            Some(ImageFile {
                path: path.to_string(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_daemonset_parses_and_names_its_least_capabilities() {
        let ds = daemonset().unwrap();
        assert!(ds.host_network);
        assert_eq!(ds.service_account, "kwire");
        let agent = ds.agent().unwrap();
        assert_eq!(
            agent.capabilities,
            ["NET_ADMIN", "SYS_ADMIN"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        assert!(agent.read_only_root);
        assert_eq!(
            agent.argv().unwrap()[..2],
            ["/usr/local/bin/kwire".to_string(), "agent".into()]
        );
        let pod = PodContext {
            node_name: "n1".into(),
            host_ip: "192.0.2.1".into(),
            pod_name: "kwire-x".into(),
            namespace: "kube-system".into(),
            service_account: "kwire".into(),
        };
        assert!(agent
            .environment(&pod)
            .unwrap()
            .contains(&("NODE_NAME".into(), "n1".into())));
        let netns = agent
            .mounts
            .iter()
            .find(|m| m.mount_path == "/var/run/netns")
            .unwrap();
        assert_eq!(netns.propagation, Propagation::HostToContainer);
        let init = &ds.init_containers[0];
        assert!(init.capabilities.is_empty());
        assert!(init.no_new_privileges);
        let objects = api_objects().unwrap();
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Namespace",
                "Role",
                "RoleBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"
            ]
        );
    }

    #[test]
    fn capability_sets_follow_the_kubelet() {
        let none = capability_set(&json!({}));
        assert_eq!(none.len(), RUNTIME_DEFAULT_CAPABILITIES.len());
        let some = capability_set(
            &json!({"capabilities": {"drop": ["NET_RAW", "CAP_KILL"], "add": ["net_admin"]}}),
        );
        assert!(!some.contains("NET_RAW") && !some.contains("KILL") && some.contains("NET_ADMIN"));
        let bad = PodSpec::parse(
            &json!({"containers": [{"name": "c", "securityContext": {"privileged": true}}]}),
        );
        assert!(bad.unwrap_err().contains("privileged"));
    }

    #[test]
    fn the_image_list_has_the_binaries() {
        let files = image_files();
        assert!(files
            .iter()
            .any(|f| f.path == "/usr/local/bin/kwire"
                && f.source == ImageSource::Binary("kwire".into())));
        assert!(files.iter().any(
            |f| matches!(&f.source, ImageSource::Repository(p) if p == "deploy/10-kwire.conflist")
        ));
    }
}
