//! Pod wiring: the daemon side of `kwire-cni`. Owns pod address allocation ([`ipam`]), the pod's
//! tun inside its network namespace ([`netns`]), the CNI result ([`result`]) and the local
//! socket the plugin talks to ([`cni_server`]). The packet loop learns about pods only through
//! [`PodDataPlane`].

pub mod cni_server;
pub mod install;
pub mod ipam;
pub mod netns;
pub mod result;

use crate::io::tun::TunQueue;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cni_server::{CniServer, CniServerConfig, ServerError};
pub use ipam::{AttachmentKey, Ipam, IpamError, IpamStore};

/// A pod interface handed to the data plane: the daemon's end of the pod's tun.
#[derive(Debug)]
pub struct PodAttachment {
    pub container_id: String,
    pub ifname: String,
    /// The netns path the runtime gave (CNI_NETNS).
    pub netns: String,
    /// The pod's addresses, one per family; anything else the pod sends is spoofed.
    pub ips: Vec<IpAddr>,
    /// The pod's tun (IFF_VNET_HDR with TSO offloads, single queue, persistent).
    pub tun: TunQueue,
    pub mtu: u32,
    /// From CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME when the runtime passes them.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// What the packet loop implements so that pods come and go. Called from the CNI server's
/// tasks; implementations must not block for long (swap a snapshot, send on a channel).
pub trait PodDataPlane: Send + Sync {
    /// A pod interface is ready: read its tun, deliver to its addresses.
    fn attach(&self, pod: PodAttachment);
    /// The pod interface is going away: drop its tun (the device vanishes with the last fd).
    fn detach(&self, container_id: &str, ifname: &str);
}

/// What the daemon remembers of a pod attachment across restarts (`pods.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    /// The tun's name inside the pod's netns (today always `ifname`).
    pub tun_name: String,
    pub mtu: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

impl PodRecord {
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.ifname)
    }
}

/// Writes `bytes` to `path` atomically: a 0600 temp file in the same directory, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
