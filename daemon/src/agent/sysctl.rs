//! The node's network sysctls. In a container `/proc/sys` is read-only, so the DaemonSet mounts
//! the node's `/proc/sys/net` at [`HOST_PROC_SYS_NET`] (as Cilium's does): a write goes to
//! `/proc/sys/net` when that is writable (a root agent outside a container), else there.
//! `/proc/sys/net` shows the network namespace of the process that opens a file, so the mount
//! reaches the node's namespace, the one a hostNetwork agent runs in.

use std::io;
use std::path::{Path, PathBuf};

/// Where the DaemonSet mounts the node's `/proc/sys/net`.
pub const HOST_PROC_SYS_NET: &str = "/host/proc/sys/net";

/// The file of a `net.` sysctl (`ipv4/ip_forward`) under `root`.
fn file(root: &str, key: &str) -> PathBuf {
    Path::new(root).join(key)
}

/// The sysctl's name as `sysctl -w` takes it (`ipv4/ip_forward` → `net.ipv4.ip_forward`).
pub fn name(key: &str) -> String {
    format!("net.{}", key.replace('/', "."))
}

/// Reads a `net.` sysctl (`ipv4/ip_forward`).
pub fn get(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(file("/proc/sys/net", key))?
        .trim()
        .to_string())
}

/// Sets a `net.` sysctl (`ipv4/conf/kwire0/ignore_routes_with_linkdown`) through
/// `/proc/sys/net`, or the node's mount at [`HOST_PROC_SYS_NET`] when `/proc/sys` is read-only.
/// The error names both and says how to grant the mount.
pub fn set(key: &str, value: &str) -> io::Result<()> {
    let direct = file("/proc/sys/net", key);
    let first = match std::fs::write(&direct, value) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let host = file(HOST_PROC_SYS_NET, key);
    let second = if Path::new(HOST_PROC_SYS_NET).is_dir() {
        match std::fs::write(&host, value) {
            Ok(()) => return Ok(()),
            Err(e) => e.to_string(),
        }
    } else {
        "not mounted".to_string()
    };
    Err(io::Error::new(
        first.kind(),
        format!(
            "cannot set {} = {value}: {} ({first}), {} ({second}); mount the node's /proc/sys/net \
             at {HOST_PROC_SYS_NET} (deploy/kwire.yaml does) or set it on the node",
            name(key),
            direct.display(),
            host.display(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_sysctl_takes_them() {
        assert_eq!(name("ipv4/ip_forward"), "net.ipv4.ip_forward");
        assert_eq!(
            name("ipv6/conf/kw0/ignore_routes_with_linkdown"),
            "net.ipv6.conf.kw0.ignore_routes_with_linkdown"
        );
    }

    #[test]
    fn a_sysctl_that_does_not_exist_says_what_to_do() {
        let e = set("ipv4/conf/no-such-if-kw/forwarding", "1").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("net.ipv4.conf.no-such-if-kw.forwarding"),
            "{msg}"
        );
        assert!(msg.contains(HOST_PROC_SYS_NET), "{msg}");
    }
}
