//! Where a packet goes next: a pod on this node, a peer (by the allowed IPs of the device's
//! snapshot: cryptokey routing), or the node itself. Also whether a packet fits the tunnel.

use super::local::{LocalTable, Port};
use super::stats::DropReason;
use super::Ctx;
use std::net::IpAddr;

/// The next hop of a frame read from a tun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// A pod on this node, by slot.
    Pod(u32),
    /// A peer, by slot in the snapshot: the packet is encrypted to it.
    Peer(u32),
    /// The host tun: a pod's packet for the node or the outside world (the kernel routes and
    /// masquerades it).
    Host,
}

/// The next hop for `dst` of a frame read from `from`. Local pods first, then the peers; an
/// address of the cluster's ranges that no peer owns goes nowhere (a Node without a live
/// peer: never the host's default route; see [`unreachable`]); what else neither owns goes to
/// the host from a pod and nowhere from the host (it would loop back).
#[inline(always)]
pub fn from_tun<T>(ctx: &Ctx<'_, T>, from: Port, dst: IpAddr) -> Result<NextHop, DropReason> {
    if let Some(pod) = ctx.local.pod_for_ip(dst) {
        return Ok(NextHop::Pod(pod));
    }
    match (ctx.snap.routes.lookup(dst), from) {
        (Some(peer), _) => Ok(NextHop::Peer(peer)),
        (None, _) if unreachable(ctx.local, dst) => Err(DropReason::NoPeer),
        (None, Port::Pod(_)) => Ok(NextHop::Host),
        (None, Port::Host) => Err(DropReason::NoPeer),
    }
}

/// Whether `dst`, owned by no pod here and no peer, is a cluster address the sender must be
/// told is unreachable. This node's own gateway addresses are the host's, inside the cluster
/// range too.
#[inline]
pub fn unreachable<T>(local: &LocalTable<T>, dst: IpAddr) -> bool {
    local.in_cluster(dst) && !local.is_gateway(dst)
}

/// Where a decrypted packet for `dst` goes: a local pod, or the host for this node's own
/// addresses (every address on a device without pods).
#[inline]
pub fn decrypted<T>(local: &LocalTable<T>, dst: IpAddr) -> Result<Port, DropReason> {
    local.deliver(dst).ok_or(DropReason::NoRoute)
}

/// The largest packet the tunnel takes, if a limit is set (`None`: the tun's MTU is trusted).
#[inline]
pub fn max_packet<T>(local: &LocalTable<T>) -> usize {
    local.mtu.map_or(usize::MAX, usize::from)
}

/// Whether the frame's packet is larger than the tunnel takes. A TSO segment never is: it is
/// cut to size on the way ([`super::seal`]).
#[inline]
pub fn too_big<T>(ctx: &Ctx<'_, T>, frame: &[u8]) -> bool {
    frame.len() - ctx.offset() > max_packet(ctx.local) && !is_gso(frame, ctx.vnet)
}

/// Whether a frame is a TSO segment.
#[inline]
fn is_gso(frame: &[u8], vnet: bool) -> bool {
    vnet && frame.len() > 1 && frame[1] & !crate::offload::GSO_ECN != crate::offload::GSO_NONE
}
