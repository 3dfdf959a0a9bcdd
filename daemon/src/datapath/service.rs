//! Services in the loop, without kube-proxy: a pod's (or the node's) packet to a Service's
//! ClusterIP and port is translated to one backend before NetworkPolicy sees it, so policy
//! decides on the backend pod exactly as for direct traffic; the backend's replies get the
//! Service's address back after policy (which saw the real addresses both ways). The backend
//! of a new flow comes from the snapshot's Maglev table (the same choice on every node and
//! after a restart), later packets keep it through [`super::nat`]. A flow to a Service
//! without a usable endpoint is answered: TCP with a reset, UDP with ICMP port unreachable,
//! from the Service's address, as kube-proxy does.
//!
//! Checksums are updated incrementally (RFC 1624); a frame whose TCP/UDP checksum the kernel
//! left partial (virtio-net `NEEDS_CSUM`) holds the pseudo-header sum, which changes with the
//! addresses only.

use super::conntrack::Flow;
use super::icmp::{self, IcmpError};
/// The service snapshot of a node's local table (defined there, so that the table does not
/// depend on this stage).
pub use super::local::ServiceNat;
use super::local::{LocalTable, Port};
use super::nat::Forward;
use super::stats::DropReason;
use super::Ctx;
use crate::offload::checksum::{fold, pseudo_header, set_ipv4_header, sum};
use crate::offload::F_NEEDS_CSUM;
use crate::services::table::FrontendKey;
use std::net::{IpAddr, SocketAddr};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The fields of a TCP or UDP packet that translation reads.
#[derive(Debug, Clone, Copy)]
struct L4 {
    proto: u8,
    v6: bool,
    /// Where the TCP/UDP header starts (the IPv4 header's length).
    l4: usize,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

impl L4 {
    fn flow(&self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
        }
    }
}

/// A TCP, UDP or SCTP packet's addresses and ports: IPv4 (a first fragment or none) or IPv6
/// with the transport header first. Anything else is not translated.
#[inline]
fn parse(pkt: &[u8]) -> Option<L4> {
    parse_l4(pkt, false)
}

/// [`parse`], or with `quoted` the TCP or UDP packet an ICMP error quotes: its IP header
/// and at least the first 8 bytes of its transport header (all RFC 792 promises).
#[inline(always)]
fn parse_l4(pkt: &[u8], quoted: bool) -> Option<L4> {
    let (proto, v6, l4, src, dst) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = (pkt[0] & 0xf) as usize * 4;
            if ihl < 20 || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0 {
                return None;
            }
            let s: [u8; 4] = pkt[12..16].try_into().ok()?;
            let d: [u8; 4] = pkt[16..20].try_into().ok()?;
            (pkt[9], false, ihl, IpAddr::from(s), IpAddr::from(d))
        }
        6 if pkt.len() >= 40 => {
            let s: [u8; 16] = pkt[8..24].try_into().ok()?;
            let d: [u8; 16] = pkt[24..40].try_into().ok()?;
            (pkt[6], true, 40, IpAddr::from(s), IpAddr::from(d))
        }
        _ => return None,
    };
    let header = match (proto, quoted) {
        (TCP | UDP, true) => 8,
        (_, true) => return None,
        (TCP, false) => 20,
        (UDP, false) => 8,
        (SCTP, false) => 12,
        _ => return None,
    };
    let t = pkt.get(l4..l4 + header)?;
    Some(L4 {
        proto,
        v6,
        l4,
        src,
        dst,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
    })
}

/// Whether the frame's L4 checksum is partial (left to the device by the kernel).
#[inline]
fn partial<T>(ctx: &Ctx<'_, T>, frame: &[u8]) -> bool {
    ctx.vnet && frame.first().is_some_and(|f| f & F_NEEDS_CSUM != 0)
}

/// What [`forward`] did to a packet, as far as policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translated {
    /// Nothing, or a ClusterIP's (or ingress IP's) translation: policy judges as usual.
    Plain,
    /// A hairpinned flow (a pod reaching itself through its Service, or its reply): the
    /// pod's traffic to itself, as over its loopback; policy does not judge it.
    Hairpin,
    /// A node port's: the kernel steered it from outside (masqueraded to the node for
    /// `externalTrafficPolicy: Cluster`); policy judges it by its source address even when
    /// that is the node's own, never as the node's own traffic. Also an external Peer's
    /// ClusterIP flow masqueraded to this node ([`from_peer`]).
    NodePort,
}

/// Translates a client's packet to a Service frontend (destination -> one backend); packets
/// to anything else pass unchanged. `Err(ServiceNoEndpoint)`: the Service has no usable endpoint; the caller
/// answers with [`reject`]. `Err(ServiceNoLocalEndpoint)`: none on this node for a `Local`
/// traffic policy (dropped, as kube-proxy does).
#[inline]
pub fn forward<T>(
    ctx: &Ctx<'_, T>,
    from: Port,
    frame: &mut [u8],
) -> Result<Translated, DropReason> {
    let Some(s) = &ctx.local.services else {
        return Ok(Translated::Plain);
    };
    let partial = partial(ctx, frame);
    let Some(pkt) = frame.get_mut(ctx.offset()..) else {
        return Ok(Translated::Plain);
    };
    let Some(p) = parse(pkt) else {
        icmp_error(s, pkt, Toward::Backend);
        return Ok(Translated::Plain);
    };
    let hairpin = s.table.node_port_addr(p.v6);
    if from != Port::Host && hairpin == Some(p.dst) {
        return Ok(if hairpin_reply(s, pkt, &p, partial) {
            Translated::Hairpin
        } else {
            Translated::Plain
        });
    }
    let Some(fe) = s.table.lookup(p.proto, p.dst, p.dport) else {
        return Ok(Translated::Plain);
    };
    let new_syn = p.proto == TCP && pkt[p.l4 + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The client is this node (its own traffic, or masqueraded to it by the kernel).
    let from_node = from == Port::Host && ctx.local.is_gateway(p.src);
    let sel = fe.select(from_node, p.proto, (p.src, p.sport), (p.dst, p.dport));
    let keep = |b: SocketAddr| {
        // A removed endpoint keeps its open TCP connections; new flows (and UDP) move.
        sel.has(b) || (p.proto == TCP && !new_syn)
    };
    let choose = || {
        if fe.affinity_secs == 0 {
            return sel.pick();
        }
        let key = FrontendKey {
            proto: p.proto,
            ip: p.dst,
            port: p.dport,
        };
        s.nat
            .sticky(key, p.src, fe.affinity_secs, |b| sel.has(b), || sel.pick())
    };
    match s.nat.forward(p.flow(), hairpin, keep, choose) {
        Forward::To(to) => {
            rewrite(pkt, &p, true, to, partial);
            match hairpin {
                Some(h) if to.ip() == p.src => {
                    // The pod would drop a packet from its own address: it comes from the
                    // node-port address, and its reply is turned back in `hairpin_reply`.
                    rewrite(pkt, &p, false, SocketAddr::new(h, p.sport), partial);
                    Ok(Translated::Hairpin)
                }
                Some(h) if h == p.dst => Ok(Translated::NodePort),
                // An external Peer's flow, masqueraded by the kernel (see [`from_peer`]).
                _ if from_node && PEER_MASQUERADE_PORTS.contains(&p.sport) => {
                    Ok(Translated::NodePort)
                }
                _ => Ok(Translated::Plain),
            }
        }
        Forward::NoEndpoint if sel.pool == Err(false) => Err(DropReason::ServiceNoLocalEndpoint),
        Forward::NoEndpoint => Err(DropReason::ServiceNoEndpoint),
        Forward::Full => Err(DropReason::FlowLimit),
    }
}

/// A pod's reply to a hairpinned flow (to the node-port address): from the Service, to the
/// pod itself again. Whether it was one.
#[cold]
#[inline(never)]
fn hairpin_reply(s: &ServiceNat, pkt: &mut [u8], p: &L4, partial: bool) -> bool {
    let Some((from, Some(client))) = s.nat.reverse(p.flow()) else {
        return false;
    };
    rewrite(pkt, p, false, from, partial);
    rewrite(pkt, p, true, SocketAddr::new(client, p.dport), partial);
    true
}

/// Gives a backend's reply of a translated flow the Service's address as its source. Runs
/// after policy (which judges the real addresses); packets of other flows are unchanged.
#[inline]
pub fn reverse<T>(local: &LocalTable<T>, pkt: &mut [u8], partial: bool) {
    let Some(s) = &local.services else {
        return;
    };
    if s.nat.is_empty() {
        return;
    }
    let Some(p) = parse(pkt) else {
        icmp_error(s, pkt, Toward::Client);
        return;
    };
    if let Some((from, _)) = s.nat.reverse(p.flow()) {
        rewrite(pkt, &p, false, from, partial);
    }
}

/// Whether a decrypted packet from outside the cluster (an external `Peer`: cryptokey routing
/// checked that its source is the Peer's own) is for a ClusterIP's frontend, to be served
/// here as its entry node. The loop hands it to the host tun; the kernel masquerades it to
/// this node's gateway address (`postrouting`: in by the tun, out by the tun, to a Service
/// range, source ports [`PEER_MASQUERADE_PORTS`]) and routes it back into the tun, where
/// [`forward`] translates it as a Service flow of the node's, judged by its source
/// ([`Translated::NodePort`]); the backend's replies come back to this node, the kernel
/// turns them back, and the loop encrypts them to the Peer. Anything else from a Peer that
/// is for no local address stays dropped (`no_route`): in particular LoadBalancer ingress
/// IPs and the node-port address, and every packet from a pod network source.
#[cold]
#[inline(never)]
pub fn from_peer<T>(local: &LocalTable<T>, pkt: &[u8]) -> bool {
    let (Some(s), Some(p)) = (&local.services, parse(pkt)) else {
        return false;
    };
    !local.in_cluster(p.src)
        && s.table
            .cluster_ip_frontend(p.proto, p.dst, p.dport)
            .is_some()
}

/// The source ports the kernel gives a Peer's Service flow when it masquerades it to this
/// node's gateway (nftables `masquerade to :61000-65535`): above Linux's default ephemeral
/// range (32768-60999), so that the loop tells such a flow from the node's own and judges it
/// by policy ([`Translated::NodePort`]); a node whose own sockets use these ports has those
/// flows judged too (stricter, never looser).
pub const PEER_MASQUERADE_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

/// Which way an ICMP error about a translated flow travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    /// From the backend's side (the backend, or a hop on the way, e.g. this node's MTU
    /// check) to the client: it quotes the translated packet (client -> backend).
    Client,
    /// From the client about a reply (Service -> client): it must reach the backend.
    Backend,
}

/// ICMP error types that quote the packet they are about: destination unreachable (with
/// fragmentation needed), time exceeded, parameter problem; ICMPv6 also packet too big.
fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 11 | 12)
    }
}

/// Translates an ICMP error about a translated flow, so that its sender's peer recognises
/// the flow: toward the client, the quoted packet's destination (the backend) becomes the
/// Service's address again, and so does the error's source when the backend sent it
/// itself; toward the backend, the quoted source (the Service) becomes the backend and so
/// does the error's destination. Checksums (outer IPv4 header, quoted IPv4 header and
/// transport checksum when quoted, ICMP) follow. Anything else is left alone.
#[cold]
#[inline(never)]
fn icmp_error(s: &ServiceNat, pkt: &mut [u8], toward: Toward) {
    if s.nat.is_empty() {
        return;
    }
    let (v6, hl, len) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 28 => {
            let ihl = (pkt[0] & 0xf) as usize * 4;
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0;
            if pkt[9] != 1 || ihl < 20 || frag {
                return;
            }
            (false, ihl, u16::from_be_bytes([pkt[2], pkt[3]]) as usize)
        }
        Some(6) if pkt.len() >= 48 => {
            if pkt[6] != 58 {
                return;
            }
            (true, 40, 40 + u16::from_be_bytes([pkt[4], pkt[5]]) as usize)
        }
        _ => return,
    };
    let len = len.min(pkt.len());
    if len < hl + 8 || !is_icmp_error(v6, pkt[hl]) {
        return;
    }
    let at = hl + 8;
    let Some(q) = parse_quoted(&pkt[at..len]) else {
        return;
    };
    if q.v6 != v6 {
        return;
    }
    // The quoted packet is of the flow's forward direction (client -> backend) toward the
    // client, of its reply (Service -> client) toward the backend.
    let (outer_at, new) = match toward {
        Toward::Client => {
            let reply = Flow {
                proto: q.proto,
                src: q.dst,
                sport: q.dport,
                dst: q.src,
                dport: q.sport,
            };
            let Some((from, _)) = s.nat.reverse(reply) else {
                return;
            };
            // Outer source: rewritten when the backend itself sent the error.
            let (src_at, alen) = if v6 { (8, 16) } else { (12, 4) };
            let outer = (pkt[src_at..src_at + alen] == ip_bytes(q.dst)[..alen]).then_some(src_at);
            rewrite(&mut pkt[at..len], &q, true, from, false);
            (outer, from)
        }
        Toward::Backend => {
            let flow = Flow {
                proto: q.proto,
                src: q.dst,
                sport: q.dport,
                dst: q.src,
                dport: q.sport,
            };
            let Some(to) = s.nat.backend(flow) else {
                return;
            };
            rewrite(&mut pkt[at..len], &q, false, to, false);
            (Some(if v6 { 24 } else { 16 }), to)
        }
    };
    if let Some(o) = outer_at {
        let alen = if v6 { 16 } else { 4 };
        pkt[o..o + alen].copy_from_slice(&ip_bytes(new.ip())[..alen]);
    }
    if !v6 {
        set_ipv4_header(&mut pkt[..hl]);
    }
    // The ICMP checksum, over the message (and for ICMPv6 the pseudo-header).
    pkt[hl + 2] = 0;
    pkt[hl + 3] = 0;
    let acc = if v6 {
        pseudo_header(&pkt[8..24], &pkt[24..40], 58, (len - hl) as u32)
    } else {
        0
    };
    let c = !fold(sum(acc, &pkt[hl..len]));
    pkt[hl + 2..hl + 4].copy_from_slice(&c.to_be_bytes());
}

/// An address's bytes (IPv4 in the first four).
fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b.copy_from_slice(&a.octets()),
    }
    b
}

/// The packet an ICMP error quotes ([`parse_l4`]).
fn parse_quoted(pkt: &[u8]) -> Option<L4> {
    parse_l4(pkt, true)
}

/// [`reverse`] for an ICMP error this node writes itself about a client's translated packet
/// (the tunnel's MTU check quotes it after translation).
pub fn reverse_answer<T>(local: &LocalTable<T>, pkt: &mut [u8]) {
    if let Some(s) = &local.services {
        icmp_error(s, pkt, Toward::Client);
    }
}

/// [`reverse`] for a frame read from a tun.
#[inline]
pub fn reverse_frame<T>(ctx: &Ctx<'_, T>, frame: &mut [u8]) {
    let partial = partial(ctx, frame);
    if let Some(pkt) = frame.get_mut(ctx.offset()..) {
        reverse(ctx.local, pkt, partial);
    }
}

/// Adds the one's complement of `bytes` (16-bit words, at most 16 bytes) to a sum.
fn sum_negated(acc: u64, bytes: &[u8]) -> u64 {
    let mut inv = [0u8; 16];
    for (i, b) in bytes.iter().enumerate() {
        inv[i] = !b;
    }
    sum(acc, &inv[..bytes.len()])
}

/// Rewrites the destination (`dst`) or source address and port to `to`, with the IPv4 header
/// checksum and the TCP/UDP checksum updated.
fn rewrite(pkt: &mut [u8], p: &L4, dst: bool, to: SocketAddr, partial: bool) {
    let (at, len) = match (p.v6, dst) {
        (false, false) => (12, 4),
        (false, true) => (16, 4),
        (true, false) => (8, 16),
        (true, true) => (24, 16),
    };
    let mut new = [0u8; 16];
    match to.ip() {
        IpAddr::V4(a) if !p.v6 => new[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) if p.v6 => new.copy_from_slice(&a.octets()),
        _ => return, // never across families: frontends are per family
    }
    let port_at = p.l4 + if dst { 2 } else { 0 };
    if p.proto == SCTP {
        pkt[at..at + len].copy_from_slice(&new[..len]);
        pkt[port_at..port_at + 2].copy_from_slice(&to.port().to_be_bytes());
        if !p.v6 {
            set_ipv4_header(&mut pkt[..p.l4]);
        }
        set_sctp_checksum(pkt, p);
        return;
    }
    let csum_at = p.l4 + if p.proto == TCP { 16 } else { 6 };
    let addr_delta = sum(sum_negated(0, &pkt[at..at + len]), &new[..len]);
    let port_delta = sum(
        sum_negated(0, &pkt[port_at..port_at + 2]),
        &to.port().to_be_bytes(),
    );
    pkt[at..at + len].copy_from_slice(&new[..len]);
    pkt[port_at..port_at + 2].copy_from_slice(&to.port().to_be_bytes());
    if !p.v6 {
        set_ipv4_header(&mut pkt[..p.l4]);
    }
    let Some(field) = pkt.get_mut(csum_at..csum_at + 2) else {
        return;
    };
    let old = u16::from_be_bytes([field[0], field[1]]);
    let c = if partial {
        // The pseudo-header sum, not complemented; the ports are summed later by the device.
        fold(old as u64 + addr_delta)
    } else if p.proto == UDP && !p.v6 && old == 0 {
        return; // IPv4 UDP without a checksum stays without one
    } else {
        let c = !fold(addr_delta + port_delta + (!old) as u64);
        if p.proto == UDP && c == 0 {
            0xffff
        } else {
            c
        }
    };
    field.copy_from_slice(&c.to_be_bytes());
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), SCTP's checksum (RFC 9260
/// appendix A): its lookup table, built at compile time.
const CRC32C: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc = CRC32C[((crc ^ *b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Recomputes an SCTP packet's checksum over its common header and chunks (the addresses
/// do not enter it; its ports do). SCTP has no partial checksum here: tun devices do not
/// offer CRC32c offload, so the kernel hands over complete packets. Not per-packet for
/// TCP/UDP: SCTP flows only.
#[cold]
fn set_sctp_checksum(pkt: &mut [u8], p: &L4) {
    let end = if p.v6 {
        40 + u16::from_be_bytes([pkt[4], pkt[5]]) as usize
    } else {
        u16::from_be_bytes([pkt[2], pkt[3]]) as usize
    };
    let Some(sctp) = pkt.get_mut(p.l4..end.min(pkt.len())) else {
        return;
    };
    if sctp.len() < 12 {
        return;
    }
    sctp[8..12].fill(0);
    // Sent least significant byte first (RFC 9260 appendix A; Linux stores it as __le32).
    let c = crc32c(sctp);
    sctp[8..12].copy_from_slice(&c.to_le_bytes());
}

/// Writes into `out` the answer to a client's packet for a Service without endpoints (a TCP
/// reset, or ICMP port unreachable for UDP and SCTP), from the Service's address; returns
/// its length, or `None` when the packet gets none (a reset itself, not TCP/UDP/SCTP).
pub fn reject(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    let p = parse(pkt)?;
    if p.proto != TCP {
        let (from4, from6) = match p.dst {
            IpAddr::V4(a) => (Some(a), None),
            IpAddr::V6(a) => (None, Some(a)),
        };
        return icmp::error(pkt, IcmpError::PortUnreachable, from4, from6, out);
    }
    let t = &pkt[p.l4..];
    let flags = t[13];
    if flags & TCP_RST != 0 {
        return None;
    }
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let data_off = ((t[12] >> 4) as usize * 4).max(20);
    let ip_len = if p.v6 {
        40 + u16::from_be_bytes([pkt[4], pkt[5]]) as usize
    } else {
        u16::from_be_bytes([pkt[2], pkt[3]]) as usize
    };
    let payload = ip_len.min(pkt.len()).saturating_sub(p.l4 + data_off) as u32;
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let consumed = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
    };
    let hl = if p.v6 { 40 } else { 20 };
    let len = hl + 20;
    let o = out.get_mut(..len)?;
    o.fill(0);
    let (src, dst) = if p.v6 {
        o[0] = 0x60;
        o[4..6].copy_from_slice(&20u16.to_be_bytes());
        o[6] = TCP;
        o[7] = 64;
        o[8..24].copy_from_slice(&pkt[24..40]);
        o[24..40].copy_from_slice(&pkt[8..24]);
        (8..24, 24..40)
    } else {
        o[..10].copy_from_slice(&[0x45, 0, 0, len as u8, 0, 0, 0x40, 0, 64, TCP]);
        o[12..16].copy_from_slice(&pkt[16..20]);
        o[16..20].copy_from_slice(&pkt[12..16]);
        set_ipv4_header(&mut o[..20]);
        (12..16, 16..20)
    };
    let tcp = hl;
    o[tcp..tcp + 2].copy_from_slice(&p.dport.to_be_bytes());
    o[tcp + 2..tcp + 4].copy_from_slice(&p.sport.to_be_bytes());
    o[tcp + 4..tcp + 8].copy_from_slice(&rseq.to_be_bytes());
    o[tcp + 8..tcp + 12].copy_from_slice(&rack.to_be_bytes());
    o[tcp + 12] = 5 << 4;
    o[tcp + 13] = rflags;
    let ph = pseudo_header(&o[src], &o[dst], TCP, 20);
    let c = !fold(sum(ph, &o[tcp..]));
    o[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::datapath::nat::NatTable;
    use crate::offload::tso::complete_checksum;
    use crate::services::model::{EndpointView, ServicePortView, SlicePortView};
    use crate::services::ServiceTable;
    use crate::services::{ServiceView, SliceView};
    use std::sync::Arc;

    /// A TCP (`proto` 6, 20-byte header) or UDP packet with `payload`, valid checksums.
    pub(crate) fn packet(
        proto: u8,
        src: SocketAddr,
        dst: SocketAddr,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let th = if proto == TCP { 20 } else { 8 };
        let l4_len = th + payload.len();
        let mut p = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                let n = (20 + l4_len) as u16;
                p[2..4].copy_from_slice(&n.to_be_bytes());
                set_ipv4_header(&mut p);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
                p[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p
            }
            _ => panic!("mixed families"),
        };
        let l4 = p.len();
        p.extend_from_slice(&src.port().to_be_bytes());
        p.extend_from_slice(&dst.port().to_be_bytes());
        if proto == TCP {
            p.extend_from_slice(&[
                0,
                0,
                0x10,
                0,
                0,
                0,
                0,
                0,
                5 << 4,
                flags,
                0xff,
                0xff,
                0,
                0,
                0,
                0,
            ]);
            p[l4 + 4..l4 + 8].copy_from_slice(&1000u32.to_be_bytes());
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(payload);
        let at = l4 + if proto == TCP { 16 } else { 6 };
        let c = !fold(l4_sum(&p, l4));
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn l4_sum(p: &[u8], l4: usize) -> u64 {
        let (s, d) = if p[0] >> 4 == 4 {
            (&p[12..16], &p[16..20])
        } else {
            (&p[8..24], &p[24..40])
        };
        let proto = if p[0] >> 4 == 4 { p[9] } else { p[6] };
        sum(pseudo_header(s, d, proto, (p.len() - l4) as u32), &p[l4..])
    }

    /// Whether the IPv4 header (if any) and the TCP/UDP checksum are right.
    pub(crate) fn checksums_valid(p: &[u8]) -> bool {
        let l4 = if p[0] >> 4 == 4 {
            (p[0] & 0xf) as usize * 4
        } else {
            40
        };
        let ip_ok = p[0] >> 4 == 6 || fold(sum(0, &p[..l4])) == 0xffff;
        ip_ok && fold(l4_sum(p, l4)) == 0xffff
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A table with `web` (TCP 80 and UDP 53 on a dual-stack ClusterIP) backed by the given
    /// endpoints on 8080/5353, and `empty` without any.
    pub(crate) fn services(backends: &[&str]) -> ServiceNat {
        let eps: Vec<(&str, &str)> = backends.iter().map(|b| (*b, "elsewhere")).collect();
        services_on(&eps, |_| {})
    }

    /// The node the tables of [`services_on`] are compiled for, and its gateway.
    const NODE: &str = "n1";
    const GATEWAY: &str = "10.244.1.1";

    /// [`services`] with endpoints `(address, nodeName)`, for node [`NODE`] with node-port
    /// addresses 10.96.0.0 and fd00:96::, `web` changed by `tweak` (its http port has node
    /// port 30080, its dns port 30053, when `tweak` makes it a NodePort Service).
    pub(crate) fn services_on(
        backends: &[(&str, &str)],
        tweak: impl Fn(&mut ServiceView),
    ) -> ServiceNat {
        let svc = |name: &str, ips: &[&str]| ServiceView {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports: vec![
                ServicePortView {
                    name: "http".into(),
                    proto: TCP,
                    port: 80,
                    ..Default::default()
                },
                ServicePortView {
                    name: "dns".into(),
                    proto: UDP,
                    port: 53,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut web = svc("web", &["10.96.0.10", "fd00:96::10"]);
        tweak(&mut web);
        let slice = SliceView {
            namespace: "shop".into(),
            service: "web".into(),
            ports: vec![
                SlicePortView {
                    name: "http".into(),
                    proto: TCP,
                    port: 8080,
                },
                SlicePortView {
                    name: "dns".into(),
                    proto: UDP,
                    port: 5353,
                },
            ],
            endpoints: backends
                .iter()
                .map(|(b, node)| EndpointView {
                    addresses: vec![b.parse().unwrap()],
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some(node.to_string()),
                })
                .collect(),
        };
        let scope = crate::services::table::Scope {
            node: Some(NODE.into()),
            node_port_addrs: vec!["10.96.0.0".parse().unwrap(), "fd00:96::".parse().unwrap()],
            ranges: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:96::/108".parse().unwrap(),
            ],
        };
        ServiceNat {
            table: Arc::new(ServiceTable::compile_for(
                &[web, svc("empty", &["10.96.0.11", "fd00:96::11"])],
                &[slice],
                &scope,
            )),
            nat: Arc::new(NatTable::default()),
        }
    }

    fn translate(s: &ServiceNat, pkt: &mut [u8]) -> Result<(), DropReason> {
        translate_from(s, Port::Pod(0), pkt).map(drop)
    }

    /// [`forward`] of a packet from `from` on node [`NODE`].
    pub(crate) fn translate_from(
        s: &ServiceNat,
        from: Port,
        pkt: &mut [u8],
    ) -> Result<Translated, DropReason> {
        let mut local = LocalTable::<()>::new(Vec::new(), vec![GATEWAY.parse().unwrap()]);
        local.services = Some(s.clone());
        let snap = crate::wg::device::Snapshot::default();
        let (counters, limiter) = (
            super::super::stats::Counters::default(),
            crate::wg::ratelimit::SourceLimiter::default(),
        );
        let ctx = Ctx {
            snap: &snap,
            local: &local,
            counters: &counters,
            limiter: &limiter,
            pacer: &crate::datapath::HOST_ONLY_PACER,
            now: std::time::Instant::now(),
            vnet: false,
        };
        forward(&ctx, from, pkt)
    }

    fn back(s: &ServiceNat, pkt: &mut [u8]) {
        let mut local = LocalTable::<()>::default();
        local.services = Some(s.clone());
        reverse(&local, pkt, false);
    }

    #[test]
    fn tcp_and_udp_both_families_translated_and_back_with_valid_checksums() {
        let s = services(&["10.244.2.5", "fd00:244:2::5"]);
        for (proto, client, vip, backend) in [
            (TCP, "10.244.1.5:40000", "10.96.0.10:80", "10.244.2.5:8080"),
            (UDP, "10.244.1.5:40001", "10.96.0.10:53", "10.244.2.5:5353"),
            (
                TCP,
                "[fd00:244:1::5]:40000",
                "[fd00:96::10]:80",
                "[fd00:244:2::5]:8080",
            ),
            (
                UDP,
                "[fd00:244:1::5]:40001",
                "[fd00:96::10]:53",
                "[fd00:244:2::5]:5353",
            ),
        ] {
            let mut p = packet(proto, sa(client), sa(vip), TCP_SYN, b"hello");
            translate(&s, &mut p).unwrap();
            let q = parse(&p).unwrap();
            assert_eq!(SocketAddr::new(q.dst, q.dport), sa(backend), "{vip}");
            assert_eq!(SocketAddr::new(q.src, q.sport), sa(client));
            assert!(checksums_valid(&p), "{vip} forward");
            let mut r = packet(proto, sa(backend), sa(client), TCP_ACK, b"world!");
            back(&s, &mut r);
            let q = parse(&r).unwrap();
            assert_eq!(SocketAddr::new(q.src, q.sport), sa(vip), "{vip} reply");
            assert!(checksums_valid(&r), "{vip} reverse");
        }
        // A reply-looking packet of no translated flow is left alone.
        let mut r = packet(TCP, sa("10.244.2.5:8080"), sa("10.244.1.5:1"), TCP_ACK, b"");
        let before = r.clone();
        back(&s, &mut r);
        assert_eq!(r, before);
        // Not a frontend: unchanged.
        let mut p = packet(TCP, sa("10.244.1.5:1"), sa("10.96.0.10:81"), TCP_SYN, b"");
        let before = p.clone();
        translate(&s, &mut p).unwrap();
        assert_eq!(p, before);
    }

    #[test]
    fn partial_checksums_stay_partial_and_complete_right() {
        for (client, vip, backend) in [
            ("10.244.1.5:40000", "10.96.0.10:80", "10.244.2.5:8080"),
            (
                "[fd00:244:1::5]:40000",
                "[fd00:96::10]:80",
                "[fd00:244:2::5]:8080",
            ),
        ] {
            let mut p = packet(TCP, sa(client), sa(vip), TCP_ACK, &[7u8; 300]);
            let l4 = if p[0] >> 4 == 4 { 20 } else { 40 };
            // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field.
            let (s, d) = if l4 == 20 {
                (12..16, 16..20)
            } else {
                (8..24, 24..40)
            };
            let ph = fold(pseudo_header(&p[s], &p[d], TCP, (p.len() - l4) as u32));
            p[l4 + 16..l4 + 18].copy_from_slice(&ph.to_be_bytes());
            let q = parse(&p).unwrap();
            rewrite(&mut p, &q, true, sa(backend), true);
            complete_checksum(&mut p, l4, 16).unwrap();
            assert!(checksums_valid(&p), "{vip}");
        }
    }

    #[test]
    fn a_flow_keeps_its_backend_and_every_node_picks_the_same() {
        let backends = ["10.244.1.7", "10.244.2.5", "10.244.3.5"];
        let (one, two) = (services(&backends), services(&backends));
        let mut seen = std::collections::BTreeSet::new();
        for port in 40000..40064 {
            let p = packet(
                TCP,
                sa(&format!("10.244.1.5:{port}")),
                sa("10.96.0.10:80"),
                TCP_SYN,
                b"",
            );
            let (mut a, mut b) = (p.clone(), p.clone());
            translate(&one, &mut a).unwrap();
            translate(&two, &mut b).unwrap();
            assert_eq!(a, b, "two nodes, one choice");
            let mut again = p.clone();
            again[20 + 13] = TCP_ACK;
            translate(&one, &mut again).unwrap();
            assert_eq!(&again[16..20], &a[16..20], "later packets keep the backend");
            seen.insert(a[16..20].to_vec());
        }
        assert_eq!(seen.len(), 3, "64 flows spread over the three backends");
    }

    #[test]
    fn open_flows_to_a_removed_endpoint_keep_it_until_they_end() {
        let all = ["10.244.1.7", "10.244.2.5", "10.244.3.5"];
        let before = services(&all);
        let leaving = sa("10.244.2.5:8080");
        let to = |proto: u8, port: u16, flags: u8| {
            let vip = if proto == TCP {
                "10.96.0.10:80"
            } else {
                "10.96.0.10:53"
            };
            packet(
                proto,
                sa(&format!("10.244.1.9:{port}")),
                sa(vip),
                flags,
                b"x",
            )
        };
        // A TCP connection and a UDP flow that Maglev sends to the endpoint about to leave.
        let opened = |proto: u8| {
            (40000..41000)
                .find(|port| {
                    let mut p = to(proto, *port, TCP_SYN);
                    translate(&before, &mut p).unwrap();
                    ends(&p).1.ip() == leaving.ip()
                })
                .unwrap()
        };
        let (tcp, udp) = (opened(TCP), opened(UDP));
        // The endpoint leaves the slice: the next table has the other two, the connection
        // table stays (the agent swaps only the table).
        let after = ServiceNat {
            table: services(&[all[0], all[2]]).table,
            nat: before.nat.clone(),
        };
        // The open connection's later segments still reach it, and its replies still come
        // back from the ClusterIP.
        for _ in 0..3 {
            let mut seg = to(TCP, tcp, TCP_ACK);
            translate(&after, &mut seg).unwrap();
            assert_eq!(ends(&seg).1, leaving);
            assert!(checksums_valid(&seg));
            let mut reply = packet(
                TCP,
                leaving,
                sa(&format!("10.244.1.9:{tcp}")),
                TCP_ACK,
                b"ok",
            );
            back(&after, &mut reply);
            assert_eq!(ends(&reply).0, sa("10.96.0.10:80"));
        }
        // No new flow goes to it: fresh connections, a new connection on the old one's
        // ports once that one has ended, and the UDP flow's next datagram (UDP has no
        // connection to finish).
        for port in 41000..41064 {
            let mut syn = to(TCP, port, TCP_SYN);
            translate(&after, &mut syn).unwrap();
            assert_ne!(ends(&syn).1.ip(), leaving.ip(), "new flow from port {port}");
        }
        let mut again = to(TCP, tcp, TCP_SYN);
        translate(&after, &mut again).unwrap();
        assert_ne!(ends(&again).1.ip(), leaving.ip());
        let mut dgram = to(UDP, udp, 0);
        translate(&after, &mut dgram).unwrap();
        assert_ne!(ends(&dgram).1.ip(), leaving.ip());
    }

    #[test]
    fn no_endpoint_answers_tcp_with_a_reset_and_udp_with_port_unreachable() {
        let s = services(&[]);
        let mut out = [0u8; 2048];
        for (client, vip) in [
            ("10.244.1.5:40000", "10.96.0.10:80"),
            ("[fd00:244:1::5]:40000", "[fd00:96::10]:80"),
        ] {
            let mut syn = packet(TCP, sa(client), sa(vip), TCP_SYN, b"");
            assert_eq!(translate(&s, &mut syn), Err(DropReason::ServiceNoEndpoint));
            let n = reject(&syn, &mut out).unwrap();
            let rst = &out[..n];
            assert!(checksums_valid(rst), "{vip}");
            let q = parse(rst).unwrap();
            assert_eq!(SocketAddr::new(q.src, q.sport), sa(vip), "from the Service");
            assert_eq!(SocketAddr::new(q.dst, q.dport), sa(client));
            let t = &rst[q.l4..];
            assert_eq!(t[13], TCP_RST | TCP_ACK);
            assert_eq!(
                u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
                1001,
                "acks the SYN"
            );
            let rst_in = packet(TCP, sa(client), sa(vip), TCP_RST, b"");
            assert!(reject(&rst_in, &mut out).is_none(), "no reset for a reset");
        }
        let mut dgram = packet(UDP, sa("10.244.1.5:40001"), sa("10.96.0.11:53"), 0, b"q");
        assert_eq!(
            translate(&s, &mut dgram),
            Err(DropReason::ServiceNoEndpoint)
        );
        let n = reject(&dgram, &mut out).unwrap();
        assert_eq!((out[20], out[21]), (3, 3), "port unreachable");
        assert_eq!(&out[12..16], &[10, 96, 0, 11], "from the ClusterIP");
        assert_eq!(
            &out[28..28 + dgram.len()],
            &dgram[..],
            "quotes the datagram"
        );
        assert_eq!(fold(sum(0, &out[20..n])), 0xffff);
        let mut d6 = packet(
            UDP,
            sa("[fd00:244:1::5]:1"),
            sa("[fd00:96::11]:53"),
            0,
            b"q",
        );
        assert!(translate(&s, &mut d6).is_err());
        let n = reject(&d6, &mut out).unwrap();
        assert_eq!((out[40], out[41]), (1, 4), "ICMPv6 port unreachable");
        assert!(n > 48);
    }

    /// Where a translated packet goes: (source, destination).
    pub(crate) fn ends(p: &[u8]) -> (SocketAddr, SocketAddr) {
        let q = parse(p).unwrap();
        (
            SocketAddr::new(q.src, q.sport),
            SocketAddr::new(q.dst, q.dport),
        )
    }

    /// An external Peer's packet to a ClusterIP (TCP or UDP, either family) is served by its
    /// entry node; to anything else (a node port's address, an ingress IP, a port the
    /// Service lacks) it is not, nor is a packet from the pod network. Masqueraded back by the
    /// kernel to the gateway with the Peer ports, it is judged by policy like a node port's;
    /// the node's own flows from the gateway are not.
    #[test]
    fn a_peers_cluster_ip_flow_is_served_and_judged_by_its_source() {
        let s = services_on(&[("10.244.2.5", "n2")], |v| {
            v.lb_ips = vec!["203.0.113.10".parse().unwrap()];
            v.ports[0].node_port = Some(30080);
        });
        let mut local = LocalTable::<()>::new(Vec::new(), vec![GATEWAY.parse().unwrap()]);
        local.cluster = vec!["10.244.0.0/16".parse().unwrap()];
        local.services = Some(s.clone());
        let peer =
            |dst: &str, proto: u8| packet(proto, sa("198.51.100.7:40000"), sa(dst), TCP_SYN, b"");
        assert!(from_peer(&local, &peer("10.96.0.10:80", TCP)));
        assert!(from_peer(&local, &peer("10.96.0.10:53", UDP)));
        assert!(from_peer(
            &local,
            &packet(
                TCP,
                sa("[2001:db8::7]:40000"),
                sa("[fd00:96::10]:80"),
                TCP_SYN,
                b""
            )
        ));
        for (dst, proto) in [
            ("10.96.0.10:81", TCP),
            ("10.96.0.10:80", UDP),
            ("10.96.0.0:30080", TCP),
            ("203.0.113.10:80", TCP),
            ("10.96.0.99:80", TCP),
        ] {
            assert!(!from_peer(&local, &peer(dst, proto)), "{dst}");
        }
        let pod = packet(
            TCP,
            sa("10.244.3.5:40000"),
            sa("10.96.0.10:80"),
            TCP_SYN,
            b"",
        );
        assert!(!from_peer(&local, &pod));
        local.services = None;
        assert!(!from_peer(&local, &peer("10.96.0.10:80", TCP)));
        // Back from the kernel, masqueraded: judged like a node port's; the node's own
        // flows (ephemeral ports below the Peer range) stay the node's.
        for (port, want) in [
            (61000, Translated::NodePort),
            (65535, Translated::NodePort),
            (60999, Translated::Plain),
            (40000, Translated::Plain),
        ] {
            let mut p = packet(
                TCP,
                sa(&format!("{GATEWAY}:{port}")),
                sa("10.96.0.10:80"),
                TCP_SYN,
                b"",
            );
            assert_eq!(translate_from(&s, Port::Host, &mut p), Ok(want), "{port}");
            assert_eq!(ends(&p).1, sa("10.244.2.5:8080"));
        }
    }

    fn node_port(local: bool) -> impl Fn(&mut ServiceView) {
        move |v: &mut ServiceView| {
            v.ports[0].node_port = Some(30080);
            v.ports[1].node_port = Some(30053);
            v.external_local = local;
        }
    }

    #[test]
    fn node_ports_external_traffic_policy_cluster_and_local() {
        let eps = [("10.244.1.7", NODE), ("10.244.2.5", "n2")];
        let outside = |port: u16| sa(&format!("192.0.2.201:{port}"));
        let node = |port: u16| sa(&format!("{GATEWAY}:{port}"));
        let backends_seen = |s: &ServiceNat, client: &dyn Fn(u16) -> SocketAddr| {
            let mut seen = std::collections::BTreeSet::new();
            for port in 40000..40064 {
                let mut p = packet(TCP, client(port), sa("10.96.0.0:30080"), TCP_SYN, b"");
                translate_from(s, Port::Host, &mut p).unwrap();
                assert!(checksums_valid(&p));
                let (src, dst) = ends(&p);
                assert_eq!(src, client(port), "the source is the kernel's business");
                seen.insert(dst);
            }
            seen
        };
        let both: std::collections::BTreeSet<SocketAddr> =
            [sa("10.244.1.7:8080"), sa("10.244.2.5:8080")].into();
        let local_only: std::collections::BTreeSet<SocketAddr> = [sa("10.244.1.7:8080")].into();
        // Cluster: every endpoint, whoever the client.
        let s = services_on(&eps, node_port(false));
        assert_eq!(backends_seen(&s, &outside), both);
        // Local: a client from elsewhere reaches this node's endpoint only; the node's own
        // (masqueraded) traffic every endpoint.
        let s = services_on(&eps, node_port(true));
        assert_eq!(backends_seen(&s, &outside), local_only);
        assert_eq!(backends_seen(&s, &node), both);
        // The ClusterIP is not subject to externalTrafficPolicy.
        let mut seen = std::collections::BTreeSet::new();
        for port in 40000..40064 {
            let mut p = client_syn(port);
            translate(&s, &mut p).unwrap();
            seen.insert(ends(&p).1);
        }
        assert_eq!(seen, both);
        // UDP, IPv6 node-port address.
        let s = services_on(&[("fd00:244:1::7", NODE)], node_port(true));
        let mut p = packet(
            UDP,
            sa("[2001:db8::9]:5000"),
            sa("[fd00:96::]:30053"),
            0,
            b"q",
        );
        translate_from(&s, Port::Host, &mut p).unwrap();
        assert_eq!(ends(&p).1, sa("[fd00:244:1::7]:5353"));
        // Local without a local endpoint: dropped for clients from elsewhere (the health
        // check fails), served for the node itself.
        let s = services_on(&[("10.244.2.5", "n2")], node_port(true));
        let mut p = packet(TCP, outside(1), sa("10.96.0.0:30080"), TCP_SYN, b"");
        assert_eq!(
            translate_from(&s, Port::Host, &mut p),
            Err(DropReason::ServiceNoLocalEndpoint)
        );
        let mut p = packet(TCP, node(1), sa("10.96.0.0:30080"), TCP_SYN, b"");
        assert_eq!(
            translate_from(&s, Port::Host, &mut p),
            Ok(Translated::NodePort)
        );
        // No endpoint at all: refused.
        let s = services_on(&[], node_port(true));
        let mut p = packet(TCP, outside(1), sa("10.96.0.0:30080"), TCP_SYN, b"");
        assert_eq!(
            translate_from(&s, Port::Host, &mut p),
            Err(DropReason::ServiceNoEndpoint)
        );
        // Not a node port: unchanged.
        let mut p = packet(TCP, outside(1), sa("10.96.0.0:30081"), TCP_SYN, b"");
        let before = p.clone();
        assert_eq!(
            translate_from(&s, Port::Host, &mut p),
            Ok(Translated::Plain)
        );
        assert_eq!(p, before);
    }

    /// A new TCP flow from the client pod 10.244.1.9 (source port `port`) to the ClusterIP.
    fn client_syn(port: u16) -> Vec<u8> {
        packet(
            TCP,
            sa(&format!("10.244.1.9:{port}")),
            sa("10.96.0.10:80"),
            TCP_SYN,
            b"",
        )
    }

    #[test]
    fn internal_traffic_policy_local_uses_this_nodes_endpoints() {
        let itp = |v: &mut ServiceView| v.internal_local = true;
        let s = services_on(&[("10.244.1.7", NODE), ("10.244.2.5", "n2")], itp);
        for port in 40000..40064 {
            let mut p = client_syn(port);
            translate(&s, &mut p).unwrap();
            assert_eq!(ends(&p).1, sa("10.244.1.7:8080"));
        }
        let s = services_on(&[("10.244.2.5", "n2")], itp);
        let mut p = packet(TCP, sa("10.244.1.9:1"), sa("10.96.0.10:80"), TCP_SYN, b"");
        assert_eq!(
            translate(&s, &mut p),
            Err(DropReason::ServiceNoLocalEndpoint)
        );
    }

    #[test]
    fn session_affinity_sends_a_client_to_one_backend() {
        let eps = [
            ("10.244.1.7", NODE),
            ("10.244.2.5", "n2"),
            ("10.244.3.5", "n3"),
        ];
        let plain = services_on(&eps, |_| {});
        let sticky = services_on(&eps, |v| v.affinity_secs = 10800);
        let spread = |s: &ServiceNat, client: &str| {
            let mut seen = std::collections::BTreeSet::new();
            for port in 40000..40032 {
                let mut p = packet(
                    TCP,
                    sa(&format!("{client}:{port}")),
                    sa("10.96.0.10:80"),
                    TCP_SYN,
                    b"",
                );
                translate(s, &mut p).unwrap();
                seen.insert(ends(&p).1);
            }
            seen.len()
        };
        assert_eq!(spread(&plain, "10.244.1.9"), 3);
        assert_eq!(spread(&sticky, "10.244.1.9"), 1);
        assert_eq!(spread(&sticky, "10.244.1.10"), 1);
    }

    #[test]
    fn hairpin_a_pod_reaches_itself_through_its_service() {
        let s = services_on(&[("10.244.1.7", NODE), ("fd00:244:1::7", NODE)], |_| {});
        for (me, vip, h) in [
            ("10.244.1.7", "10.96.0.10:80", "10.96.0.0"),
            ("fd00:244:1::7", "[fd00:96::10]:80", "fd00:96::"),
        ] {
            let ip: IpAddr = me.parse().unwrap();
            let client = SocketAddr::new(ip, 40000);
            let backend = SocketAddr::new(ip, 8080);
            let mut p = packet(TCP, client, sa(vip), TCP_SYN, b"hi");
            assert_eq!(
                translate_from(&s, Port::Pod(0), &mut p),
                Ok(Translated::Hairpin),
                "a hairpin"
            );
            assert_eq!(
                ends(&p),
                (SocketAddr::new(h.parse().unwrap(), 40000), backend)
            );
            assert!(checksums_valid(&p));
            // The pod's reply, to the node-port address, comes back from the Service.
            let mut r = packet(
                TCP,
                backend,
                SocketAddr::new(h.parse().unwrap(), 40000),
                TCP_ACK,
                b"yo",
            );
            assert_eq!(
                translate_from(&s, Port::Pod(0), &mut r),
                Ok(Translated::Hairpin)
            );
            assert_eq!(ends(&r), (sa(vip), client));
            assert!(checksums_valid(&r));
            // Later packets of the flow keep both rewrites.
            let mut again = packet(TCP, client, sa(vip), TCP_ACK, b"more");
            assert_eq!(
                translate_from(&s, Port::Pod(0), &mut again),
                Ok(Translated::Hairpin)
            );
            assert_eq!(ends(&again).0.ip(), h.parse::<IpAddr>().unwrap());
        }
    }

    /// Whether an ICMP(v6) error's checksum and its quoted IPv4 header are right.
    fn icmp_valid(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let hl = if v6 { 40 } else { 20 };
        let acc = if v6 {
            pseudo_header(&p[8..24], &p[24..40], 58, (p.len() - hl) as u32)
        } else {
            0
        };
        let quoted_ok = v6 || fold(sum(0, &p[hl + 8..hl + 28])) == 0xffff;
        let outer_ok = v6 || fold(sum(0, &p[..20])) == 0xffff;
        fold(sum(acc, &p[hl..])) == 0xffff && quoted_ok && outer_ok
    }

    #[test]
    fn icmp_errors_about_a_translated_flow_are_translated_both_ways() {
        let s = services(&["10.244.2.5", "fd00:244:2::5"]);
        let mut out = [0u8; 2048];
        for (client, vip, backend, gw) in [
            (
                "10.244.1.5:40001",
                "10.96.0.10:53",
                "10.244.2.5:5353",
                "10.244.1.1",
            ),
            (
                "[fd00:244:1::5]:40001",
                "[fd00:96::10]:53",
                "[fd00:244:2::5]:5353",
                "fd00:244:1::1",
            ),
        ] {
            let v6 = vip.starts_with('[');
            let hl = if v6 { 40 } else { 20 };
            let mut q = packet(UDP, sa(client), sa(vip), 0, b"query");
            translate(&s, &mut q).unwrap();
            // The backend answers port unreachable: the client sees it from the Service,
            // about its own datagram to the Service.
            let (f4, f6) = match sa(backend).ip() {
                IpAddr::V4(a) => (Some(a), None),
                IpAddr::V6(a) => (None, Some(a)),
            };
            let n = icmp::error(&q, IcmpError::PortUnreachable, f4, f6, &mut out).unwrap();
            let mut e = out[..n].to_vec();
            back(&s, &mut e);
            let (src, _) = crate::datapath::local::addresses(&e).unwrap();
            assert_eq!(src, sa(vip).ip(), "{vip}: from the Service");
            let inner = parse_quoted(&e[hl + 8..]).unwrap();
            assert_eq!(SocketAddr::new(inner.dst, inner.dport), sa(vip));
            assert_eq!(SocketAddr::new(inner.src, inner.sport), sa(client));
            assert!(icmp_valid(&e), "{vip}: checksums");
            assert!(
                checksums_valid(&e[hl + 8..]),
                "{vip}: the quoted datagram's checksum"
            );
            // This node's own error (fragmentation needed) quotes the translated packet: its
            // quote is translated, its source (the gateway) kept.
            let (g4, g6) = match gw.parse::<IpAddr>().unwrap() {
                IpAddr::V4(a) => (Some(a), None),
                IpAddr::V6(a) => (None, Some(a)),
            };
            let mut big = packet(UDP, sa(client), sa(vip), 0, &[0u8; 1400]);
            translate(&s, &mut big).unwrap();
            let n = icmp::too_big(&big, 1280, g4, g6, &mut out).unwrap();
            let mut local = LocalTable::<()>::default();
            local.services = Some(s.clone());
            reverse_answer(&local, &mut out[..n]);
            let e = &out[..n];
            assert_eq!(
                crate::datapath::local::addresses(e).unwrap().0,
                gw.parse::<IpAddr>().unwrap()
            );
            let inner = parse_quoted(&e[hl + 8..]).unwrap();
            assert_eq!(
                SocketAddr::new(inner.dst, inner.dport),
                sa(vip),
                "{vip}: frag needed"
            );
            assert!(icmp_valid(e));
            // The client answers a reply (from the Service) with port unreachable: it reaches
            // the backend, about the backend's own datagram.
            let mut r = packet(UDP, sa(backend), sa(client), 0, b"answer");
            back(&s, &mut r);
            let (c4, c6) = match sa(client).ip() {
                IpAddr::V4(a) => (Some(a), None),
                IpAddr::V6(a) => (None, Some(a)),
            };
            let n = icmp::error(&r, IcmpError::PortUnreachable, c4, c6, &mut out).unwrap();
            let mut e = out[..n].to_vec();
            assert_eq!(translate(&s, &mut e), Ok(()));
            assert_eq!(
                crate::datapath::local::addresses(&e).unwrap().1,
                sa(backend).ip()
            );
            let inner = parse_quoted(&e[hl + 8..]).unwrap();
            assert_eq!(SocketAddr::new(inner.src, inner.sport), sa(backend));
            assert!(icmp_valid(&e), "{vip}: toward the backend");
        }
        // An error about no translated flow is left alone.
        let q = packet(UDP, sa("10.244.1.5:1"), sa("10.244.2.9:2"), 0, b"x");
        let n = icmp::error(
            &q,
            IcmpError::PortUnreachable,
            Some("10.244.2.9".parse().unwrap()),
            None,
            &mut out,
        )
        .unwrap();
        let mut e = out[..n].to_vec();
        let before = e.clone();
        back(&s, &mut e);
        assert_eq!(e, before);
    }

    #[test]
    fn crc32c_matches_the_rfc_3720_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// An SCTP packet (common header and one DATA-like chunk), valid CRC32c.
    fn sctp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut p = packet(UDP, src, dst, 0, &[0u8; 12]);
        let l4 = if p[0] >> 4 == 4 { 20 } else { 40 };
        if l4 == 20 {
            p[9] = SCTP;
            set_ipv4_header(&mut p[..20]);
        } else {
            p[6] = SCTP;
        }
        // Verification tag, then a chunk: type 0, flags 3, length 16, payload.
        p[l4 + 4..l4 + 8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        p[l4 + 12..l4 + 16].copy_from_slice(&[0, 3, 0, 8]);
        let q = parse(&p).unwrap();
        set_sctp_checksum(&mut p, &q);
        p
    }

    fn sctp_valid(p: &[u8]) -> bool {
        let l4 = if p[0] >> 4 == 4 { 20 } else { 40 };
        let mut c = p[l4..].to_vec();
        let want = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
        c[8..12].fill(0);
        crc32c(&c) == want && (l4 == 40 || fold(sum(0, &p[..20])) == 0xffff)
    }

    #[test]
    fn sctp_is_translated_and_back_with_its_crc32c() {
        let web = |v: &mut ServiceView| {
            v.ports.push(ServicePortView {
                name: "sctp".into(),
                proto: SCTP,
                port: 9,
                ..Default::default()
            })
        };
        // SCTP 9 on both ClusterIPs, to 9999 on one backend per family.
        let slice = SliceView {
            namespace: "shop".into(),
            service: "web".into(),
            ports: vec![SlicePortView {
                name: "sctp".into(),
                proto: SCTP,
                port: 9999,
            }],
            endpoints: vec![EndpointView {
                addresses: vec!["10.244.2.5".parse().unwrap()],
                ready: true,
                serving: true,
                ..Default::default()
            }],
        };
        let mut v = ServiceView {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            ..Default::default()
        };
        web(&mut v);
        let v6 = SliceView {
            endpoints: vec![EndpointView {
                addresses: vec!["fd00:244:2::5".parse().unwrap()],
                ready: true,
                serving: true,
                ..Default::default()
            }],
            ..slice.clone()
        };
        let mut s = ServiceNat {
            table: Arc::new(ServiceTable::compile(&[v.clone()], &[slice, v6])),
            nat: Arc::new(NatTable::default()),
        };
        for (client, vip, backend) in [
            ("10.244.1.5:5000", "10.96.0.10:9", "10.244.2.5:9999"),
            (
                "[fd00:244:1::5]:5000",
                "[fd00:96::10]:9",
                "[fd00:244:2::5]:9999",
            ),
        ] {
            let mut p = sctp(sa(client), sa(vip));
            assert!(sctp_valid(&p));
            translate(&s, &mut p).unwrap();
            assert_eq!(ends(&p), (sa(client), sa(backend)), "{vip}");
            assert!(sctp_valid(&p), "{vip}: CRC32c after translation");
            let mut r = sctp(sa(backend), sa(client));
            back(&s, &mut r);
            assert_eq!(ends(&r), (sa(vip), sa(client)), "{vip} reply");
            assert!(sctp_valid(&r), "{vip}: CRC32c of the reply");
        }
        // Without endpoints: ICMP port unreachable, as for UDP.
        let empty = ServiceTable::compile(&[v], &[]);
        s.table = Arc::new(empty);
        let mut p = sctp(sa("10.244.1.5:5001"), sa("10.96.0.10:9"));
        assert_eq!(translate(&s, &mut p), Err(DropReason::ServiceNoEndpoint));
        let mut out = [0u8; 512];
        let n = reject(&p, &mut out).unwrap();
        assert_eq!((out[20], out[21]), (3, 3));
        assert!(n > 28);
    }

    /// `kwire policy trace --to svc/...` names the backend this loop picks, for the
    /// selections that depend on the client's node and address: `internalTrafficPolicy:
    /// Local` (only the client node's endpoints) and `sessionAffinity: ClientIP` (one backend
    /// for every flow of a client). The loop runs on the table the client's node compiles
    /// from the trace's own manifests.
    #[test]
    fn trace_names_the_backend_the_loop_picks_for_local_and_affinity() {
        use crate::policy::trace::tests::{svc_json, SERVICES};
        use crate::policy::trace::Manifests;
        let mut m = Manifests::default();
        m.add_text(std::path::Path::new("s.yaml"), SERVICES)
            .unwrap();
        let on = |node: &str| ServiceNat {
            table: Arc::new(m.services.table(Some(node))),
            nat: Arc::new(NatTable::default()),
        };
        let sa = |s: String| s.parse::<SocketAddr>().unwrap();
        let n1 = on("n1");
        for (svc, vip, want) in [
            // Local: only web-1 is on the client's node n1.
            ("near", "10.96.0.12", Some("10.0.2.1:8080")),
            // ClientIP: one backend for all the client's flows (whichever it is).
            ("sticky", "10.96.0.13", None),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for sport in 40000..40040 {
                let mut syn = packet(
                    6,
                    sa(format!("10.0.1.1:{sport}")),
                    sa(format!("{vip}:80")),
                    0x02,
                    b"",
                );
                translate_from(&n1, Port::Pod(0), &mut syn).unwrap();
                let chosen = ends(&syn).1;
                let (_, v) = svc_json(&format!("svc/shop/{svc}:http"), None, sport);
                assert_eq!(v["service"]["backend"], chosen.to_string(), "{svc} {sport}");
                seen.insert(chosen);
            }
            assert_eq!(seen.len(), 1, "{svc}: {seen:?}");
            if let Some(w) = want {
                assert_eq!(seen.first().unwrap().to_string(), w);
            }
        }
        // A client on n3, which has no endpoint of `near`: the loop drops the flow (the
        // trace's DROPPED is checked in policy::trace's tests).
        let mut syn = packet(
            6,
            sa("10.0.3.1:40000".into()),
            sa("10.96.0.12:80".into()),
            0x02,
            b"",
        );
        assert_eq!(
            translate_from(&on("n3"), Port::Pod(0), &mut syn),
            Err(DropReason::ServiceNoLocalEndpoint)
        );
    }
}
