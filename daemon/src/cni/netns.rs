//! The pod's interface: a persistent tun named CNI_IFNAME, created inside the pod's network
//! namespace, with the pod's /32 and /128, a default route per family through it (unless an
//! earlier attachment of the pod holds it), the tunnel MTU, link up. The daemon keeps the tun's fd; the device outlives a daemon restart.
//!
//! The namespace switch happens on a short-lived thread ([`crate::io::netns::run_in`]);
//! addresses and routes are programmed by running iproute2's `ip` from that thread (the child
//! inherits the thread's namespace). Blocking: call from `spawn_blocking`.

use crate::io::netns::run_in;
use crate::io::tun::{if_index, TunOptions, TunQueue};
use serde_json::Value;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Command;

/// How pod tuns are opened: virtio-net headers with TSO offloads, one queue.
pub const POD_TUN: TunOptions = TunOptions {
    offload: true,
    multi_queue: false,
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    OpenNetns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("entering the pod's network namespace: {source}")]
    Enter {
        #[source]
        source: io::Error,
    },
    #[error("interface {ifname} already exists in the pod's network namespace; pick another CNI_IFNAME or DEL it first")]
    Exists { ifname: String },
    #[error("interface {ifname} is missing from the pod's network namespace")]
    Missing { ifname: String },
    #[error("opening tun {ifname} in the pod's network namespace: {source}")]
    Tun {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("configuring {ifname} in the pod's network namespace: `ip {args}` failed: {stderr}")]
    Ip {
        ifname: String,
        args: String,
        stderr: String,
    },
    #[error("interface {ifname} in the pod's network namespace: {what}")]
    Check { ifname: String, what: String },
}

/// Opens a network namespace path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open_netns(path: &str) -> Result<OwnedFd, NetnsError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| NetnsError::OpenNetns {
            path: path.into(),
            source,
        })
}

fn enter<R: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<R, NetnsError> + Send,
) -> Result<R, NetnsError> {
    run_in(netns, f).map_err(|source| NetnsError::Enter { source })?
}

/// Runs `ip ARGS` in the current thread's namespace.
fn ip(ifname: &str, args: &[&str]) -> Result<String, NetnsError> {
    let fail = |stderr: String| NetnsError::Ip {
        ifname: ifname.into(),
        args: args.join(" "),
        stderr,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(format!("running ip (iproute2): {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the pod's tun `ifname` in `netns` and configures it. On failure nothing is left
/// behind in the namespace.
pub fn create(
    netns: BorrowedFd<'_>,
    ifname: &str,
    ips: &[IpAddr],
    mtu: u32,
) -> Result<TunQueue, NetnsError> {
    enter(netns, || {
        if if_index(ifname).is_some() {
            return Err(NetnsError::Exists {
                ifname: ifname.into(),
            });
        }
        let tun = TunQueue::open(ifname, POD_TUN).map_err(|source| NetnsError::Tun {
            ifname: ifname.into(),
            source,
        })?;
        let r = tun
            .set_persist(true)
            .map_err(|source| NetnsError::Tun {
                ifname: ifname.into(),
                source,
            })
            .and_then(|()| configure(ifname, ips, mtu));
        match r {
            Ok(()) => Ok(tun),
            Err(e) => {
                let _ = tun.set_persist(false);
                drop(tun);
                let _ = ip(ifname, &["link", "del", "dev", ifname]);
                Err(e)
            }
        }
    })
}

fn configure(ifname: &str, ips: &[IpAddr], mtu: u32) -> Result<(), NetnsError> {
    let mtu = mtu.to_string();
    ip(ifname, &["link", "set", "dev", ifname, "mtu", &mtu, "up"])?;
    for a in ips {
        match a {
            IpAddr::V4(_) => ip(
                ifname,
                &["-4", "addr", "add", &format!("{a}/32"), "dev", ifname],
            )?,
            IpAddr::V6(_) => ip(
                ifname,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/128"),
                    "dev",
                    ifname,
                    "nodad",
                ],
            )?,
        };
    }
    // The default route goes to the first interface that asks; a second attachment in the
    // same pod (`net1`) does not take it over (deleting it would leave the pod without one).
    for (fam, present) in [
        ("-4", ips.iter().any(IpAddr::is_ipv4)),
        ("-6", ips.iter().any(IpAddr::is_ipv6)),
    ] {
        if !present {
            continue;
        }
        match ip(ifname, &[fam, "route", "add", "default", "dev", ifname]) {
            Err(NetnsError::Ip { stderr, .. }) if stderr.contains("File exists") => {}
            r => r.map(drop)?,
        }
    }
    Ok(())
}

/// After a daemon restart: opens the existing persistent tun `ifname` in the netns at
/// `netns_path` (opening the same name attaches to it). Fails with [`NetnsError::Missing`]
/// rather than creating a blank device.
pub fn reattach(netns_path: &str, ifname: &str) -> Result<TunQueue, NetnsError> {
    let ns = open_netns(netns_path)?;
    enter(ns.as_fd(), || {
        if if_index(ifname).is_none() {
            return Err(NetnsError::Missing {
                ifname: ifname.into(),
            });
        }
        TunQueue::open(ifname, POD_TUN).map_err(|source| NetnsError::Tun {
            ifname: ifname.into(),
            source,
        })
    })
}

/// Deletes `ifname` in `netns`; succeeds if it is already gone.
pub fn remove(netns: BorrowedFd<'_>, ifname: &str) -> Result<(), NetnsError> {
    enter(netns, || {
        if if_index(ifname).is_none() {
            return Ok(());
        }
        match ip(ifname, &["link", "del", "dev", ifname]) {
            Err(_) if if_index(ifname).is_none() => Ok(()),
            r => r.map(drop),
        }
    })
}

/// [`remove`] by path; succeeds if the namespace is gone (or the path is empty).
pub fn remove_at(netns_path: &str, ifname: &str) -> Result<(), NetnsError> {
    if netns_path.is_empty() {
        return Ok(());
    }
    let ns = match open_netns(netns_path) {
        Ok(ns) => ns,
        Err(NetnsError::OpenNetns { source, .. })
            if matches!(source.kind(), io::ErrorKind::NotFound) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    match remove(ns.as_fd(), ifname) {
        // A path that no longer names a namespace (unmounted bind mount): nothing to remove.
        Err(NetnsError::Enter { source }) if source.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// CNI CHECK: `ifname` exists in `netns`, is a tun, is up, has the MTU and the addresses, and
/// the pod has a default route per family.
pub fn check(
    netns: BorrowedFd<'_>,
    ifname: &str,
    ips: &[IpAddr],
    mtu: u32,
) -> Result<(), NetnsError> {
    let bad = |what: String| NetnsError::Check {
        ifname: ifname.into(),
        what,
    };
    enter(netns, || {
        if if_index(ifname).is_none() {
            return Err(NetnsError::Missing {
                ifname: ifname.into(),
            });
        }
        let parse = |s: String| {
            serde_json::from_str::<Value>(&s)
                .map_err(|e| bad(format!("unreadable `ip -j` output: {e}")))
        };
        let link = parse(ip(ifname, &["-j", "addr", "show", "dev", ifname])?)?;
        let link = &link[0];
        if link["link_type"] != "none" {
            return Err(bad(format!(
                "is not a tun (link type {})",
                link["link_type"]
            )));
        }
        if !link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP"))
        {
            return Err(bad("is down".into()));
        }
        if link["mtu"].as_u64() != Some(mtu.into()) {
            return Err(bad(format!("has MTU {}, want {mtu}", link["mtu"])));
        }
        let have: Vec<(String, u64)> = link["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|a| {
                        Some((a["local"].as_str()?.to_string(), a["prefixlen"].as_u64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for a in ips {
            let want = (a.to_string(), if a.is_ipv4() { 32 } else { 128 });
            if !have.contains(&want) {
                return Err(bad(format!("lacks address {}/{}", want.0, want.1)));
            }
        }
        for (fam, present) in [
            ("-4", ips.iter().any(IpAddr::is_ipv4)),
            ("-6", ips.iter().any(IpAddr::is_ipv6)),
        ] {
            if !present {
                continue;
            }
            // Through this interface, or through an earlier one of the same pod (see `configure`).
            let routes = parse(ip(ifname, &["-j", fam, "route", "show", "default"])?)?;
            if routes.as_array().is_none_or(Vec::is_empty) {
                return Err(bad(format!(
                    "the pod has no {} default route",
                    if fam == "-4" { "IPv4" } else { "IPv6" }
                )));
            }
        }
        Ok(())
    })
}
