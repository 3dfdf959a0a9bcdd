//! The pod's interface: a persistent tun named CNI_IFNAME, created inside the pod's network
//! namespace, with the pod's /32 and /128, a default route per family through it (unless an
//! earlier attachment of the pod holds it), the tunnel MTU, link up. The daemon keeps the tun's fd; the device outlives a daemon restart.
//!
//! The namespace switch happens on a short-lived thread ([`crate::io::netns::run_in`]);
//! the link, addresses and routes are programmed over a netlink socket opened on that thread
//! (so it lives in the pod's namespace; [`crate::io::netlink`]), no `ip` process. Blocking:
//! call from `spawn_blocking`.

use crate::io::netlink::{self, Netlink, Request, Route, RouteKind};
use crate::io::netns::run_in;
use crate::io::tun::{if_index, TunOptions, TunQueue};
use ipnetwork::IpNetwork;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Frames a pod's tun holds until the daemon reads them (the kernel's default for a tun is
/// 500; Ethernet and veth devices get 1000). The tun drops what does not fit, so this is how
/// long the daemon's reader may be descheduled before a pod loses packets: at 500, two
/// 1,000 packets/s streams from one pod overflowed it in a quarter second on a loaded node.
pub const POD_TXQUEUELEN: u32 = 1000;

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
    #[error("configuring {ifname} in the pod's network namespace: {step}: {source}")]
    Netlink {
        ifname: String,
        step: String,
        #[source]
        source: io::Error,
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

/// Routing protocol of the pod's default routes: `boot`, as `ip route add` marks them.
const RTPROT_BOOT: u8 = 3;
/// Metric of the pod's default routes: what `ip route add` gives each family.
const DEFAULT_METRIC_V4: u32 = 0;
const DEFAULT_METRIC_V6: u32 = 1024;

/// A netlink socket in the current thread's namespace, and the index of `ifname` there.
fn open(ifname: &str) -> Result<(Netlink, u32), NetnsError> {
    let fail = |step: &str, source| NetnsError::Netlink {
        ifname: ifname.into(),
        step: step.into(),
        source,
    };
    let nl = Netlink::open().map_err(|e| fail("opening a netlink socket", e))?;
    let index = if_index(ifname).ok_or_else(|| NetnsError::Missing {
        ifname: ifname.into(),
    })?;
    Ok((nl, index))
}

/// The pod's default route of a family through `index`.
fn default_route(index: u32, v6: bool) -> Route {
    let (dst, metric) = if v6 {
        (
            IpNetwork::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("/0"),
            DEFAULT_METRIC_V6,
        )
    } else {
        (
            IpNetwork::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("/0"),
            DEFAULT_METRIC_V4,
        )
    };
    Route {
        dst,
        kind: RouteKind::Dev(index),
        metric,
        src: None,
        protocol: RTPROT_BOOT,
    }
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
                if let Ok((mut nl, index)) = open(ifname) {
                    let _ = nl.run(Request::LinkDel { index });
                }
                Err(e)
            }
        }
    })
}

fn configure(ifname: &str, ips: &[IpAddr], mtu: u32) -> Result<(), NetnsError> {
    let (mut nl, index) = open(ifname)?;
    let mut steps = vec![
        Request::LinkTxQueueLen {
            index,
            len: POD_TXQUEUELEN,
        },
        Request::LinkUp {
            index,
            mtu: Some(mtu),
        },
    ];
    for a in ips {
        let prefix = if a.is_ipv4() { 32 } else { 128 };
        steps.push(Request::AddrReplace {
            index,
            addr: IpNetwork::new(*a, prefix).expect("host prefix"),
            nodad: a.is_ipv6(),
        });
    }
    // The default route goes to the first interface that asks; a second attachment in the
    // same pod (`net1`) does not take it over (deleting it would leave the pod without one).
    for v6 in [false, true] {
        if ips.iter().any(|a| a.is_ipv6() == v6) {
            steps.push(Request::RouteAdd(default_route(index, v6)));
        }
    }
    for (step, r) in steps.iter().zip(nl.execute(&steps)) {
        match r {
            Err(e) if matches!(step, Request::RouteAdd(_)) && netlink::is_exists(&e) => {}
            Err(source) => {
                return Err(NetnsError::Netlink {
                    ifname: ifname.into(),
                    step: step.to_string(),
                    source,
                })
            }
            Ok(()) => {}
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
        let (mut nl, index) = match open(ifname) {
            Ok(x) => x,
            Err(NetnsError::Missing { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match nl.run(Request::LinkDel { index }) {
            Err(e) if netlink::is_gone(&e) || if_index(ifname).is_none() => Ok(()),
            Err(source) => Err(NetnsError::Netlink {
                ifname: ifname.into(),
                step: format!("link del {ifname}"),
                source,
            }),
            Ok(()) => Ok(()),
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
        let (mut nl, index) = open(ifname)?;
        let read = |step: &str| {
            let step = step.to_string();
            move |source| NetnsError::Netlink {
                ifname: ifname.into(),
                step,
                source,
            }
        };
        let link = nl
            .link_by_index(index)
            .map_err(read("reading the link"))?
            .ok_or_else(|| NetnsError::Missing {
                ifname: ifname.into(),
            })?;
        if !link.layer3 {
            return Err(bad("is not a tun (it has a link-layer header)".into()));
        }
        if !link.up {
            return Err(bad("is down".into()));
        }
        if link.mtu != mtu {
            return Err(bad(format!("has MTU {}, want {mtu}", link.mtu)));
        }
        let have: Vec<IpNetwork> = nl
            .addresses()
            .map_err(read("listing addresses"))?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| a.addr)
            .collect();
        for a in ips {
            let want = IpNetwork::new(*a, if a.is_ipv4() { 32 } else { 128 }).expect("host prefix");
            if !have.contains(&want) {
                return Err(bad(format!("lacks address {want}")));
            }
        }
        let routes = nl.routes().map_err(read("listing routes"))?;
        for v6 in [false, true] {
            if !ips.iter().any(|a| a.is_ipv6() == v6) {
                continue;
            }
            // Through this interface, or through an earlier one of the same pod (see `configure`).
            if !routes
                .iter()
                .any(|r| r.dst.prefix() == 0 && r.dst.is_ipv6() == v6)
            {
                return Err(bad(format!(
                    "the pod has no {} default route",
                    if v6 { "IPv6" } else { "IPv4" }
                )));
            }
        }
        Ok(())
    })
}
