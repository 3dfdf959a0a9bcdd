//! The data plane's runtime: a WireGuard device on a tun interface and the threads that move
//! its packets. Worker threads ([`workers`]) own the packet path (one tun queue and one UDP
//! socket each, blocking system calls, no async) and apply ([`apply`]) what the per-packet
//! code in [`crate::datapath`] decides; [`ports`] is the table of pods attached to the loop;
//! [`uapi_server`] serves the WireGuard userspace API socket. Used by `kwire tunnel` and by
//! `kwire agent`.

pub mod apply;
pub mod ports;
pub mod uapi_server;
pub mod workers;

#[cfg(test)]
mod tests;

pub use apply::{Io, RxPath, TxPath};

use crate::datapath::stats::Counters;
use crate::io::tun::{TunOptions, TunQueue};
use crate::wg::Device;
use anyhow::Context;
use std::sync::Arc;
use tracing::{info, warn};

/// Most worker threads pairs (tun queue + UDP socket) a device runs.
pub const MAX_WORKERS: usize = 8;

/// A running WireGuard device on a tun interface: what both `kwire tunnel` and the agent use.
pub struct TunnelDevice {
    pub device: Arc<Device>,
    pub counters: Arc<Counters>,
    pub net: workers::Network,
    pub ifname: String,
}

/// How [`TunnelDevice::start`] sets up the device.
#[derive(Debug, Clone, Copy)]
pub struct TunnelOptions {
    /// Worker threads (tun queue + UDP socket pairs), clamped to 1..=[`MAX_WORKERS`].
    pub workers: usize,
    /// Ask the tun for TSO/USO/GRO offloads.
    pub offload: bool,
    /// The device outlives the process (a node's `kwire0`): a restarted daemon re-attaches
    /// to it, its addresses and routes stay, and while no daemon reads it packets drop at the
    /// device instead of leaving another way. Without it the device goes away with the
    /// process, as wireguard-go's does.
    pub persist: bool,
    /// The UDP port bound at start (0: the kernel picks one until a request sets it).
    pub listen_port: u16,
    /// How tun queues are read.
    pub tun_io: workers::TunIo,
}

impl TunnelDevice {
    /// Creates (or re-attaches to) tun `ifname` and starts the packet path.
    pub fn start(ifname: &str, opts: TunnelOptions) -> anyhow::Result<TunnelDevice> {
        let TunnelOptions {
            workers,
            offload,
            persist,
            listen_port,
            tun_io,
        } = opts;
        let workers = workers.clamp(1, MAX_WORKERS);
        let existed = crate::io::tun::if_index(ifname).is_some();
        let queues = open_queues(ifname, workers, offload)?;
        if persist {
            queues[0]
                .set_persist(true)
                .with_context(|| format!("making tun {ifname} persistent"))?;
            if existed {
                info!(ifname, "re-attached to the existing tun");
            }
        }
        let vnet = queues[0].offload();
        info!(
            ifname,
            queues = queues.len(),
            offload = vnet,
            tun_io = ?tun_io,
            "tun device ready"
        );
        let device = Arc::new(Device::new());
        let counters = Arc::new(Counters::default());
        let net = workers::Network::new(device.clone(), counters.clone(), queues.len(), vnet)?;
        for (i, q) in queues.into_iter().enumerate() {
            workers::spawn_tun_reader(i, q, device.clone(), counters.clone(), net.clone(), tun_io)?;
        }
        // Bind the port now, as wireguard-go does on start: the agent's, else a random one.
        device
            .ensure_bound(&mut net.clone(), listen_port)
            .with_context(|| match listen_port {
                0 => "binding a WireGuard UDP port".to_string(),
                p => format!("binding WireGuard UDP port {p}"),
            })?;
        workers::spawn_timers(device.clone(), net.clone())?;
        Ok(TunnelDevice {
            device,
            counters,
            net,
            ifname: ifname.to_string(),
        })
    }
}

fn open_queues(ifname: &str, workers: usize, offload: bool) -> anyhow::Result<Vec<TunQueue>> {
    let mut opts = TunOptions {
        offload,
        multi_queue: workers > 1,
    };
    let first = match TunQueue::open(ifname, opts) {
        Ok(q) => q,
        Err(e) if opts.offload || opts.multi_queue => {
            warn!(ifname, error = %e, "tun offloads or multi-queue refused; falling back to one plain queue");
            opts = TunOptions {
                offload: false,
                multi_queue: false,
            };
            TunQueue::open(ifname, opts).with_context(|| format!("creating tun {ifname}"))?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("creating tun {ifname} (needs CAP_NET_ADMIN and /dev/net/tun)")
            })
        }
    };
    let mut queues = vec![first];
    if opts.multi_queue {
        for _ in 1..workers {
            queues.push(
                TunQueue::open(ifname, opts)
                    .with_context(|| format!("opening another queue of tun {ifname}"))?,
            );
        }
    }
    Ok(queues)
}
