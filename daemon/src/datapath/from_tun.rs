//! The pipeline of a frame read from a tun (a pod's or the host's): its stages in order,
//! each an early return with a [`DropReason`], ending in what to do with the frame.

use super::local::{addresses, Port};
use super::route::{self, NextHop};
use super::stats::DropReason;
use super::{antispoof, icmp, policy, service, Ctx};
use std::net::IpAddr;

/// What to do with a frame read from a tun.
#[derive(Debug, PartialEq, Eq)]
pub enum TxAction<'a> {
    /// Write the frame unchanged (virtio-net header included) to this port's tun: a pod on
    /// this node, or the host (the node itself and the outside world).
    DeliverToPort(Port),
    /// Encrypt the frame's packets for the peer in this snapshot slot ([`super::Sealer`]) and
    /// send them to its endpoint.
    EncryptToPeer(u32),
    /// Drop the frame for `reason` and write `answer` (an ICMP error for its sender, with a
    /// zeroed virtio-net header when the tun has one) back to the port it came from.
    Answer {
        reason: DropReason,
        answer: &'a [u8],
    },
    /// Drop the frame.
    Drop(DropReason),
}

/// Decides a frame read from `from`, translating it in place when it is for a Service (or a
/// backend's reply). `answer_buf` receives an ICMP error or a TCP reset when one is due (a
/// frame's worth of bytes is always enough).
#[inline(always)]
pub fn decide<'a, T>(
    ctx: &Ctx<'_, T>,
    from: Port,
    frame: &mut [u8],
    answer_buf: &'a mut [u8],
) -> TxAction<'a> {
    match next_hop(ctx, from, frame) {
        Ok(NextHop::Pod(pod)) => TxAction::DeliverToPort(Port::Pod(pod)),
        Ok(NextHop::Host) => TxAction::DeliverToPort(Port::Host),
        Ok(NextHop::Peer(peer)) => to_peer(ctx, peer, frame, answer_buf),
        Err(DropReason::ServiceNoEndpoint) => reject(ctx, frame, answer_buf),
        Err(DropReason::NoPeer) => match no_peer_answer(ctx, from, frame, answer_buf) {
            Some(n) => TxAction::Answer {
                reason: DropReason::NoPeer,
                answer: &answer_buf[..n],
            },
            None => TxAction::Drop(DropReason::NoPeer),
        },
        Err(reason) => TxAction::Drop(reason),
    }
}

/// Writes the ICMP unreachable for a frame to a cluster address without a peer into `out`
/// (the sender learns at once instead of timing out); returns its length. To a pod it comes
/// from the node's gateway; to the node itself from the destination (the kernel drops a
/// packet from the outside carrying one of its own addresses).
#[cold]
#[inline(never)]
fn no_peer_answer<T>(ctx: &Ctx<'_, T>, from: Port, frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let off = ctx.offset();
    let pkt = frame.get(off..)?;
    let (_, dst) = addresses(pkt)?;
    if !route::unreachable(ctx.local, dst) {
        return None;
    }
    let (g4, g6) = match (from, dst) {
        (Port::Host, IpAddr::V4(d)) => (Some(d), None),
        (Port::Host, IpAddr::V6(d)) => (None, Some(d)),
        _ => (ctx.local.gateway_v4(), ctx.local.gateway_v6()),
    };
    out.get_mut(..off)?.fill(0);
    let n = icmp::unreachable(pkt, g4, g6, out.get_mut(off..)?)?;
    Some(off + n)
}

/// The stages every frame passes before it has a next hop.
#[inline(always)]
fn next_hop<T>(ctx: &Ctx<'_, T>, from: Port, frame: &mut [u8]) -> Result<NextHop, DropReason> {
    let (src, dst) =
        addresses(frame.get(ctx.offset()..).unwrap_or_default()).ok_or(DropReason::Malformed)?;
    if dst.is_multicast() {
        return Err(DropReason::Multicast);
    }
    antispoof::check(ctx.local, from, src)?;
    // After the source is known to be the pod's own, before policy: policy and routing see
    // the backend a Service's address was translated to.
    // A hairpinned flow (a pod reaching itself through its Service) is the pod's traffic to
    // itself: policy does not judge it. A node port's is never the node's own traffic.
    let translated = service::forward(ctx, from, frame)?;
    let hairpin = translated == service::Translated::Hairpin;
    let pkt = &frame[ctx.offset()..];
    let (_, dst) = addresses(pkt).ok_or(DropReason::Malformed)?;
    if !hairpin {
        policy::egress(ctx.local, from, pkt)?;
    }
    let hop = route::from_tun(ctx, from, dst)?;
    match hop {
        NextHop::Pod(pod) if !hairpin => {
            let from_node = from == Port::Host
                && ctx.local.is_gateway(src)
                && translated != service::Translated::NodePort;
            policy::ingress(ctx.local, Port::Pod(pod), from_node, pkt)?;
        }
        _ => {}
    }
    // A backend's reply: policy judged the real addresses, the client sees the Service's.
    service::reverse_frame(ctx, frame);
    Ok(hop)
}

/// The answer to a flow for a Service without endpoints (a TCP reset, ICMP port unreachable
/// for UDP), back to the port the frame came from.
#[cold]
#[inline(never)]
fn reject<'a, T>(ctx: &Ctx<'_, T>, frame: &[u8], answer_buf: &'a mut [u8]) -> TxAction<'a> {
    let off = ctx.offset();
    let n = match answer_buf.get_mut(..off) {
        Some(h) => {
            h.fill(0);
            answer_buf
                .get_mut(off..)
                .and_then(|out| service::reject(&frame[off..], out))
        }
        None => None,
    };
    match n {
        Some(n) => TxAction::Answer {
            reason: DropReason::ServiceNoEndpoint,
            answer: &answer_buf[..off + n],
        },
        None => TxAction::Drop(DropReason::ServiceNoEndpoint),
    }
}

/// The checks of a frame for a peer: it must fit the tunnel (else the sender learns the
/// MTU), and the device must have a key.
#[inline(always)]
fn to_peer<'a, T>(
    ctx: &Ctx<'_, T>,
    peer: u32,
    frame: &[u8],
    answer_buf: &'a mut [u8],
) -> TxAction<'a> {
    if route::too_big(ctx, frame) {
        // Too big for the tunnel: tell the sender (path MTU discovery), never drop silently.
        return match too_big_answer(ctx, frame, answer_buf) {
            Some(n) => TxAction::Answer {
                reason: DropReason::Mtu,
                answer: &answer_buf[..n],
            },
            None => TxAction::Drop(DropReason::Mtu),
        };
    }
    if ctx.snap.identity.is_none() {
        return TxAction::Drop(DropReason::NoKey);
    }
    TxAction::EncryptToPeer(peer)
}

/// Writes the ICMP error for a too-big frame into `out` (from this node's gateway address),
/// unless the packet may be fragmented or must not get one; returns its length.
#[cold]
#[inline(never)]
fn too_big_answer<T>(ctx: &Ctx<'_, T>, frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let off = ctx.offset();
    let pkt = &frame[off..];
    if !icmp::dont_fragment(pkt) {
        return None;
    }
    let mtu = u16::try_from(route::max_packet(ctx.local)).unwrap_or(u16::MAX);
    out.get_mut(..off)?.fill(0);
    let n = icmp::too_big(
        pkt,
        mtu,
        ctx.local.gateway_v4(),
        ctx.local.gateway_v6(),
        out.get_mut(off..)?,
    )?;
    // It quotes the packet as translated: the client must see its own flow, to the Service.
    service::reverse_answer(ctx.local, out.get_mut(off..off + n)?);
    Some(off + n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::stats::Counters;
    use crate::datapath::testing::{pod_table, udp4};
    use crate::wg::device::Snapshot;
    use crate::wg::ratelimit::SourceLimiter;
    use std::sync::Arc;
    use std::time::Instant;

    /// Every decision of the pipeline without a peer session: the stages in order.
    #[test]
    fn each_stage_decides_in_order() {
        let mut snap = Snapshot::default();
        Arc::make_mut(&mut snap.routes).insert("10.244.2.0/24".parse().unwrap(), 0);
        let mut local = pod_table("10.244.1.1", &["10.244.1.5"]);
        local.mtu = Some(1420);
        let (counters, limiter) = (Counters::default(), SourceLimiter::default());
        let ctx = Ctx {
            snap: &snap,
            local: &local,
            counters: &counters,
            limiter: &limiter,
            pacer: &crate::datapath::HOST_ONLY_PACER,
            now: Instant::now(),
            vnet: false,
        };
        let mut buf = vec![0u8; 2048];
        let mut decide_one = |from, p: &[u8]| match decide(&ctx, from, &mut p.to_vec(), &mut buf) {
            TxAction::Answer { reason, .. } => Err(reason),
            TxAction::Drop(r) => Err(r),
            TxAction::DeliverToPort(p) => Ok(Some(p)),
            TxAction::EncryptToPeer(_) => Ok(None),
        };
        let pod = Port::Pod(0);
        assert_eq!(decide_one(pod, &[0x45, 0]), Err(DropReason::Malformed));
        assert_eq!(
            decide_one(pod, &udp4([10, 244, 1, 5], [224, 0, 0, 1])),
            Err(DropReason::Multicast)
        );
        assert_eq!(
            decide_one(pod, &udp4([10, 244, 1, 9], [10, 244, 2, 9])),
            Err(DropReason::SpoofedSource)
        );
        assert_eq!(
            decide_one(Port::Host, &udp4([10, 244, 1, 1], [10, 244, 1, 5])),
            Ok(Some(pod))
        );
        assert_eq!(
            decide_one(pod, &udp4([10, 244, 1, 5], [198, 51, 100, 7])),
            Ok(Some(Port::Host))
        );
        assert_eq!(
            decide_one(Port::Host, &udp4([10, 244, 1, 1], [198, 51, 100, 7])),
            Err(DropReason::NoPeer)
        );
        // A peer's address, but no private key yet.
        assert_eq!(
            decide_one(pod, &udp4([10, 244, 1, 5], [10, 244, 2, 9])),
            Err(DropReason::NoKey)
        );
        let mut big = udp4([10, 244, 1, 5], [10, 244, 2, 9]);
        big.resize(1500, 0);
        assert_eq!(decide_one(pod, &big), Err(DropReason::Mtu));
    }
}
