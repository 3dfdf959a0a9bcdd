//! The lab's container runtime: runs one container of a pod the way runc does for the kubelet,
//! as far as kwire can tell the difference. `kwire-lab container-run SPEC` (started by the
//! supervisor) does, in this order:
//!
//! 1. enters the pod's network namespace (the node's, for `hostNetwork: true`);
//! 2. new mount, PID and IPC namespaces (the container is PID 1 of its own PID namespace; the
//!    `container-run` process stays outside as its parent, writes its pid to the pid file and
//!    exits with its status);
//! 3. a root filesystem of its own on a tmpfs: the image's files (read-only binds, see
//!    [`crate::manifests::image_files`]), `/proc` (with `/proc/sys`, `/proc/sysrq-trigger`,
//!    `/proc/irq`, `/proc/bus`, `/proc/fs` read-only and `/proc/kcore`, `/proc/keys`,
//!    `/proc/timer_list` masked, as runc's defaults), `/sys` read-only, a minimal `/dev`, the
//!    node's `/etc/hosts` and `/etc/resolv.conf`, the service account volume at
//!    `/var/run/secrets/kubernetes.io/serviceaccount`, and the declared volume mounts with their
//!    propagation (`None`: rprivate, `HostToContainer`: rslave, `Bidirectional`: rshared) and
//!    `readOnly`; then `pivot_root` into it, so nothing else of the host is visible, and the root
//!    made read-only if `readOnlyRootFilesystem`;
//! 4. the capability sets: the bounding set cut to the container's set, inheritable and ambient
//!    empty, permitted and effective the container's set (so after `execve` as uid 0 the process
//!    has exactly that set in bounding, permitted and effective), `no_new_privs` when
//!    `allowPrivilegeEscalation: false`;
//! 5. `execve` of the container's command with only the environment the kubelet gives.
//!
//! Not done (no effect on kwire's behaviour that a test could observe): cgroups and resource
//! limits, seccomp and AppArmor profiles, the device cgroup (runc's default list allows
//! `/dev/net/tun` anyway), user namespaces.

pub mod run;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// On the host.
    pub source: PathBuf,
    /// In the container.
    pub target: String,
    pub read_only: bool,
    pub propagation: Propagation,
}

/// Mount propagation inside the container (`mountPropagation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    Private,
    Slave,
    Shared,
}

/// Everything `container-run` needs, written by the supervisor as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// For messages: `kwire-n1/kwire`.
    pub name: String,
    /// The network namespace to enter (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// An empty directory the root filesystem is built on (a tmpfs is mounted there, in the
    /// container's mount namespace only).
    pub rootfs: PathBuf,
    /// The image's files: (path in the container, file on the host).
    pub image: Vec<(String, PathBuf)>,
    pub mounts: Vec<Mount>,
    pub read_only_root: bool,
    /// Capabilities, without `CAP_` (`NET_ADMIN`).
    pub capabilities: Vec<String>,
    pub no_new_privileges: bool,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where `container-run` writes the container's pid (as the host sees it).
    pub pid_file: PathBuf,
}
