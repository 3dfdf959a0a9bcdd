//! The kubelet's part for `deploy/kwire.yaml`'s DaemonSet on one lab node: the pod's service
//! account volume (a token the API stand-in issued for this node, the CA, the namespace), the
//! hostPath volumes (per node, see [`NodeSpec::host_path`]), the image's files, and a
//! [`ContainerSpec`] per container that `kwire-lab container-run` runs confined.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::apiserver::ApiServer;
use crate::cluster::state::NodeSpec;
use crate::container::{ContainerSpec, Mount, Propagation};
use crate::manifests::{self, Container, ImageSource, PodContext, PodSpec};
use std::net::{Ipv4Addr, SocketAddr};

/// Where a pod's service account volume is mounted (the in-cluster configuration's path).
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The namespace of the DaemonSet (and its service account).
pub const NAMESPACE: &str = "kube-system";
/// PATH of a container whose image sets none (containerd's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The image as files on this machine: (path in the image, file here).
pub type ImageFiles = Vec<(String, PathBuf)>;

/// The shared libraries `ldd` lists for an executable (none for a static one), as the paths
/// the dynamic loader opens.
pub fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(exe).stderr(Stdio::null()).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The image's files (`deploy/image.txt`) with the lab's binaries, the repository's files as
/// compiled in, and the shared libraries of every executable.
pub fn image_files(dir: &Path, kwire: &Path, kwire_cni: &Path) -> Result<ImageFiles, String> {
    let mut out: ImageFiles = Vec::new();
    for f in manifests::image_files() {
        let source = match &f.source {
            ImageSource::Binary(b) if b == "kwire" => kwire.to_path_buf(),
            ImageSource::Binary(b) if b == "kwire-cni" => kwire_cni.to_path_buf(),
            ImageSource::Binary(b) => {
                return Err(format!("deploy/image.txt names an unknown binary {b:?}"))
            }
            ImageSource::Repository(p) if p == "deploy/10-kwire.conflist" => {
                let file = dir.join("image").join("10-kwire.conflist");
                std::fs::create_dir_all(file.parent().expect("has a parent"))
                    .and_then(|()| std::fs::write(&file, manifests::CONFLIST))
                    .map_err(|e| format!("writing {}: {e}", file.display()))?;
                file
            }
            ImageSource::Repository(p) => {
                return Err(format!(
                    "deploy/image.txt names {p}, which kwire-lab does not carry"
                ))
            }
            ImageSource::Host(p) => PathBuf::from(p),
        };
        if !source.is_file() {
            return Err(format!(
                "{} (for {} in the image) does not exist",
                source.display(),
                f.path
            ));
        }
        let executable =
            std::fs::metadata(&source).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
        if executable {
            for lib in shared_libraries(&source) {
                let p = lib.display().to_string();
                if !out.iter().any(|(q, _)| *q == p) {
                    out.push((p, lib));
                }
            }
        }
        out.push((f.path, source));
    }
    Ok(out)
}

/// The node's service account volume (on the lab's machine), under the node's directory.
pub fn service_account_dir(node_dir: &Path) -> PathBuf {
    node_dir.join("serviceaccount")
}

/// Writes the node's service account volume (token, ca.crt, namespace) and returns its path.
pub fn write_service_account(
    node_dir: &Path,
    token: &str,
    ca_pem: &str,
) -> std::io::Result<PathBuf> {
    let dir = service_account_dir(node_dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), token)?;
    std::fs::write(dir.join("ca.crt"), ca_pem)?;
    std::fs::write(dir.join("namespace"), NAMESPACE)?;
    Ok(dir)
}

/// Prepares hostPath volumes as the kubelet does (`DirectoryOrCreate` makes the directory).
fn host_volume(node: &NodeSpec, path: &str, kind: &str) -> Result<PathBuf, String> {
    let on_host = node.host_path(path);
    match kind {
        "DirectoryOrCreate" => std::fs::create_dir_all(&on_host)
            .map_err(|e| format!("hostPath {path}: creating {}: {e}", on_host.display()))?,
        "" => {}
        _ if on_host.exists() => {}
        other => {
            return Err(format!(
                "hostPath {path} ({other}): {} does not exist",
                on_host.display()
            ))
        }
    }
    Ok(on_host)
}

/// The `KUBERNETES_*` variables the kubelet sets from the `kubernetes` Service; in the lab the
/// API is reached on the underlay (as a kube-proxy-less cluster configures it).
fn service_env(api: SocketAddr) -> Vec<(String, String)> {
    let (host, port) = (api.ip().to_string(), api.port().to_string());
    let addr = format!("tcp://{host}:{port}");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
        ("KUBERNETES_PORT".into(), addr.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), addr),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host),
    ]
}

/// The container `c` of the DaemonSet's pod on `node`, ready for `container-run`.
pub fn container_spec(
    api: SocketAddr,
    node_dir: &Path,
    node: &NodeSpec,
    pod: &PodSpec,
    c: &Container,
    image: &ImageFiles,
    service_account: &Path,
) -> Result<ContainerSpec, String> {
    let at = |e: String| format!("DaemonSet container {:?} on {}: {e}", c.name, node.name);
    if !pod.host_network {
        return Err(at(
            "kwire-lab runs only hostNetwork pods (the agent's)".into()
        ));
    }
    let ctx = PodContext {
        node_name: node.name.clone(),
        host_ip: node.underlay_ipv4.to_string(),
        pod_name: format!("kwire-{}", node.name),
        namespace: NAMESPACE.into(),
        service_account: pod.service_account.clone(),
    };
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), node.name.clone()),
    ];
    env.extend(service_env(api));
    env.extend(c.environment(&ctx).map_err(at)?);
    let mut mounts = Vec::new();
    for m in &c.mounts {
        let volume = &pod.volumes[&m.volume];
        mounts.push(Mount {
            source: host_volume(node, &volume.path, &volume.kind).map_err(at)?,
            target: m.mount_path.clone(),
            read_only: m.read_only,
            propagation: match m.propagation {
                manifests::Propagation::Private => Propagation::Private,
                manifests::Propagation::HostToContainer => Propagation::Slave,
                manifests::Propagation::Bidirectional => Propagation::Shared,
            },
        });
    }
    if pod.automount_token {
        mounts.push(Mount {
            source: service_account.to_path_buf(),
            target: SERVICE_ACCOUNT_MOUNT.into(),
            read_only: true,
            propagation: Propagation::Private,
        });
    }
    let dir = node_dir.join("containers").join(&c.name);
    Ok(ContainerSpec {
        name: format!("{}/{}", node.name, c.name),
        netns: Some(Path::new("/var/run/netns").join(&node.netns)),
        rootfs: dir.join("rootfs"),
        image: image.clone(),
        mounts,
        read_only_root: c.read_only_root,
        capabilities: c.capabilities.iter().cloned().collect(),
        no_new_privileges: c.no_new_privileges,
        argv: c.argv().map_err(at)?,
        env,
        pid_file: dir.join("pid"),
    })
}

/// Writes `spec` next to its rootfs and returns the command that runs it.
pub fn command(spec: &ContainerSpec, kwire_lab: &Path) -> Result<Command, String> {
    let dir = spec.rootfs.parent().expect("rootfs has a parent");
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let file = dir.join("spec.json");
    std::fs::write(&file, serde_json::to_vec_pretty(spec).expect("serializes"))
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    let _ = std::fs::remove_file(&spec.pid_file);
    let mut cmd = Command::new(kwire_lab);
    cmd.arg("container-run").arg(&file).stdin(Stdio::null());
    Ok(cmd)
}

/// The pid `container-run` wrote for a running container.
pub fn container_pid(spec_pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(spec_pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The service account token kubeconfig of a node's agent, for `kwire-lab kubeconfig --node`:
/// the API as the host reaches it, the node's token.
pub fn node_kubeconfig(server: &ApiServer, token: &str) -> String {
    server.kubeconfig(Some(token))
}

/// The DaemonSet's pod on nodes outside a lab: for test suites that build their own network
/// namespaces and API stand-in and still want agents exactly as the DaemonSet runs them.
pub struct Standalone {
    pub pod: PodSpec,
    image: ImageFiles,
    kwire_lab: PathBuf,
    dir: PathBuf,
    api: SocketAddr,
}

impl Standalone {
    /// Applies deploy/'s objects to `server` (reached by agents at `api`), and prepares the
    /// image from the given binaries; `extra_agent_args` are appended to the agent container's
    /// args (as a `kubectl patch` of the DaemonSet would).
    pub fn new(
        server: &ApiServer,
        api: SocketAddr,
        binaries: (&Path, &Path, &Path),
        dir: &Path,
        extra_agent_args: &[&str],
    ) -> Result<Standalone, String> {
        let (kwire, kwire_cni, kwire_lab) = binaries;
        for object in manifests::api_objects()? {
            match server.create(object) {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut pod = manifests::daemonset()?;
        for c in pod
            .containers
            .iter_mut()
            .filter(|c| c.name == manifests::AGENT_CONTAINER)
        {
            c.args
                .extend(extra_agent_args.iter().map(|a| a.to_string()));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(Standalone {
            image: image_files(dir, kwire, kwire_cni)?,
            pod,
            kwire_lab: kwire_lab.to_path_buf(),
            dir: dir.to_path_buf(),
            api,
        })
    }

    /// A node `name` in network namespace `netns` with InternalIP `ip`; its host paths under
    /// this runner's directory.
    pub fn node(&self, name: &str, netns: &str, ip: Ipv4Addr) -> NodeSpec {
        let root = self.dir.join(name).join("root");
        NodeSpec {
            index: 0,
            name: name.into(),
            netns: netns.into(),
            underlay_if: String::new(),
            bridge_port: String::new(),
            tun_if: crate::cluster::naming::AGENT_INTERFACE.into(),
            underlay_ipv4: ip,
            underlay_ipv6: std::net::Ipv6Addr::UNSPECIFIED,
            state_dir: root.join("var/lib/kwire"),
            run_dir: root.join("run/kwire"),
            root,
            log: self.dir.join(name).join("agent.log"),
            metrics_url: String::new(),
        }
    }

    /// Issues the node's token, runs the init containers (when `init`) and returns the agent
    /// container's command (`kwire-lab container-run`), whose output the caller directs.
    pub fn agent(
        &self,
        server: &ApiServer,
        node: &NodeSpec,
        init: bool,
    ) -> Result<Command, String> {
        let node_dir = self.dir.join(&node.name);
        let token = server.issue_service_account_token(
            NAMESPACE,
            &self.pod.service_account,
            Some(&node.name),
        );
        let sa =
            write_service_account(&node_dir, &token, server.ca_pem()).map_err(|e| e.to_string())?;
        if init {
            for c in &self.pod.init_containers {
                let spec =
                    container_spec(self.api, &node_dir, node, &self.pod, c, &self.image, &sa)?;
                let out = command(&spec, &self.kwire_lab)?
                    .output()
                    .map_err(|e| e.to_string())?;
                if !out.status.success() {
                    return Err(format!(
                        "init container {} failed: {}",
                        c.name,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
        let agent = self.pod.agent()?;
        let spec = container_spec(
            self.api,
            &node_dir,
            node,
            &self.pod,
            agent,
            &self.image,
            &sa,
        )?;
        command(&spec, &self.kwire_lab)
    }
}
