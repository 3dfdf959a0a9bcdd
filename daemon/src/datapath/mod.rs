//! The packet loop's decisions for a WireGuard device, free of I/O: a frame from the tun
//! becomes encrypted datagrams for one peer; datagrams from the network become handshake
//! replies or decrypted packets for the tun. Callers own the buffers and do the system calls
//! through [`Io`]; tests drive both directions in memory.

pub mod batch;
pub mod conntrack;
pub mod icmp;
pub mod local;
pub mod stats;

use crate::offload::gro::Coalescer;
use crate::offload::{tso, VNET_HDR_LEN};
use crate::wg::device::{PeerState, Snapshot};
use crate::wg::ratelimit::SourceLimiter;
use batch::TxBatch;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use conntrack::{classify, Check, Classified, Decision};
use local::{addresses, Filter, LocalTable, Port};
use stats::{Counters, DropReason};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

/// WireGuard data message overhead: 16 bytes of header, 16 of tag.
pub const DATA_OVERHEAD: usize = 32;
/// boringtun writes handshake initiations (148 bytes) into the same buffer.
const MIN_OUT: usize = 148;
/// Largest frame a tun hands over: virtio header plus a 64 KiB segment.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535;

const MSG_INIT: u32 = 1;
const MSG_RESPONSE: u32 = 2;
const MSG_COOKIE: u32 = 3;
const MSG_DATA: u32 = 4;

/// Where the loop's output goes.
pub trait Io {
    /// Writes one frame (virtio header + packet when the tun has offloads) to the host tun.
    fn tun_write(&mut self, frame: &[u8]);
    /// Writes one frame to a pod's tun or the host's. Devices without pods keep the default.
    fn tun_write_to(&mut self, port: Port, frame: &[u8]) {
        let _ = port;
        self.tun_write(frame)
    }
    /// Sends every datagram of `batch`, then clears it.
    fn udp_send(&mut self, batch: &mut TxBatch);
}

/// Per-worker state for tun -> network.
pub struct TxPath {
    scratch: Vec<u8>,
    pub batch: TxBatch,
}

/// The table of a device without pods (`kwire tunnel`): built once, shared.
fn host_only() -> &'static LocalTable<()> {
    static TABLE: std::sync::OnceLock<LocalTable<()>> = std::sync::OnceLock::new();
    TABLE.get_or_init(LocalTable::default)
}

/// Tag of the host tun in the coalescer; pods use their slot.
const HOST_TAG: u32 = u32::MAX;

fn tag(p: Port) -> u32 {
    match p {
        Port::Host => HOST_TAG,
        Port::Pod(s) => s,
    }
}

fn port(tag: u32) -> Port {
    if tag == HOST_TAG {
        Port::Host
    } else {
        Port::Pod(tag)
    }
}

impl Default for TxPath {
    fn default() -> Self {
        Self::new()
    }
}

impl TxPath {
    pub fn new() -> TxPath {
        TxPath {
            scratch: vec![0; 65536],
            batch: TxBatch::new(256 * 1024, 256),
        }
    }

    /// Encrypts the packets of one frame from the host tun for the peer that owns their
    /// destination (a device without pods).
    pub fn handle_frame(
        &mut self,
        snap: &Snapshot,
        frame: &mut [u8],
        vnet: bool,
        counters: &Counters,
        io: &mut impl Io,
    ) {
        self.handle_frame_from(snap, host_only(), Port::Host, frame, vnet, counters, io);
    }

    /// One frame read from `from`: a pod's frame must carry one of the pod's addresses as
    /// source; it then goes to a local pod, to the peer that owns the destination (encrypted),
    /// or, from a pod, to the host tun (the node and the outside world).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_frame_from<T>(
        &mut self,
        snap: &Snapshot,
        local: &LocalTable<T>,
        from: Port,
        frame: &mut [u8],
        vnet: bool,
        counters: &Counters,
        io: &mut impl Io,
    ) {
        let off = if vnet { VNET_HDR_LEN } else { 0 };
        let Some((src, dst)) = frame.get(off..).and_then(addresses) else {
            counters.drop(DropReason::Malformed);
            return;
        };
        if dst.is_multicast() {
            counters.drop(DropReason::Multicast);
            return;
        }
        if let Port::Pod(s) = from {
            if !local.owns(s, src) {
                counters.drop(DropReason::SpoofedSource);
                return;
            }
        }
        if let (Some(f), Port::Pod(_)) = (&local.filter, from) {
            if let Err(r) = policy_allows(f, Check::Egress, &frame[off..]) {
                counters.drop(r);
                return;
            }
        }
        if let Some(t) = local.pod_for_ip(dst) {
            // The node's own traffic to its pods is allowed (kubelet probes); all else is
            // checked against the destination pod's ingress rules.
            if let Some(f) = &local.filter {
                let from_node = from == Port::Host && local.is_gateway(src);
                if !from_node {
                    if let Err(r) = policy_allows(f, Check::Ingress, &frame[off..]) {
                        counters.drop(r);
                        return;
                    }
                }
            }
            // Same node: the frame (offload header included) goes to the other pod as is.
            io.tun_write_to(Port::Pod(t), frame);
            counters.packets_local.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(slot) = snap.routes.lookup(dst) else {
            if local.in_cluster(dst) && !local.is_gateway(dst) {
                // A pod range of a Node without a live peer: never the host's default route;
                // the sender learns at once. (This node's own gateway addresses are the
                // host's: they go to it below.)
                counters.drop(DropReason::NoPeer);
                let out = &mut self.scratch;
                out[..off].fill(0);
                // To a pod from the node's gateway; to the node itself from the destination
                // (the kernel drops a packet from the outside with one of its own addresses).
                let (g4, g6) = match (from, dst) {
                    (Port::Host, IpAddr::V4(d)) => (Some(d), None),
                    (Port::Host, IpAddr::V6(d)) => (None, Some(d)),
                    _ => (local.gateway_v4(), local.gateway_v6()),
                };
                if let Some(n) = icmp::unreachable(&frame[off..], g4, g6, &mut out[off..]) {
                    io.tun_write_to(from, &out[..off + n]);
                }
            } else if from == Port::Host {
                counters.drop(DropReason::NoPeer);
            } else {
                io.tun_write_to(Port::Host, frame);
                counters.packets_local.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        // Too big for the tunnel: tell the sender (path MTU discovery), never drop silently.
        let max_packet = local.mtu.map_or(usize::MAX, usize::from);
        if frame.len() - off > max_packet && !is_gso(frame, vnet) {
            counters.drop(DropReason::Mtu);
            let pkt = &frame[off..];
            if icmp::dont_fragment(pkt) {
                let out = &mut self.scratch;
                out[..off].fill(0);
                if let Some(n) = icmp::too_big(
                    pkt,
                    max_packet as u16,
                    local.gateway_v4(),
                    local.gateway_v6(),
                    &mut out[off..],
                ) {
                    io.tun_write_to(from, &out[..off + n]);
                }
            }
            return;
        }
        if snap.identity.is_none() {
            counters.drop(DropReason::NoKey);
            return;
        }
        let peer = &snap.peers[slot as usize];
        let mut st = peer.lock();
        let Some(endpoint) = st.endpoint else {
            peer.tx_dropped.fetch_add(1, Ordering::Relaxed);
            counters.drop(DropReason::NoEndpoint);
            return;
        };
        let TxPath { scratch, batch, .. } = self;
        let mut sent = 0u64;
        let mut bytes = 0u64;
        let mut emit = |p: &[u8]| {
            let need = (p.len() + DATA_OVERHEAD).max(MIN_OUT);
            if !batch.has_room(need, 1) {
                io.udp_send(batch);
            }
            match st.tunn.encapsulate(p, batch.slot()) {
                TunnResult::WriteToNetwork(out) => {
                    let n = out.len();
                    batch.commit(n, endpoint);
                    sent += 1;
                    bytes += n as u64;
                }
                TunnResult::Err(_) => counters.drop(DropReason::Handshake),
                // Queued inside boringtun until the handshake completes.
                _ => {}
            }
        };
        let r = if vnet {
            tso::split_capped(frame, scratch, max_packet, &mut emit)
        } else {
            emit(&frame[..]);
            Ok(())
        };
        if r.is_err() {
            counters.drop(DropReason::Offload);
        }
        drop(st);
        peer.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        counters.packets_tx.fetch_add(sent, Ordering::Relaxed);
    }

    /// Sends what is pending.
    pub fn flush(&mut self, io: &mut impl Io) {
        if !self.batch.is_empty() {
            io.udp_send(&mut self.batch);
        }
    }
}

/// Per-worker state for network -> tun.
pub struct RxPath {
    dec: Vec<u8>,
    coalescer: Coalescer,
    pub replies: TxBatch,
    delivered: u64,
    /// Handshake messages handled since the last [`RxPath::finish`].
    handshakes: usize,
}

/// Handshake messages handled per receive batch (up to 32 datagrams); past it they are dropped
/// (`rate_limited`) before any cryptography. A worker that keeps up sees small batches and never
/// reaches it; one that falls behind under a flood would otherwise answer cookies while data
/// waits behind them in the same socket (wireguard-go drops past a full handshake queue alike).
pub const MAX_HANDSHAKES_PER_BATCH: usize = 8;

/// A peer's lock held across consecutive datagrams from it, with counts to add on release.
struct Held<'a> {
    slot: u32,
    st: MutexGuard<'a, PeerState>,
    rx_bytes: u64,
}

impl RxPath {
    /// `vnet`: the tun takes virtio-net headers, so TCP segments can be merged.
    pub fn new(vnet: bool) -> RxPath {
        // Replies hold a packet boringtun queued during the handshake: up to a whole tun frame.
        RxPath {
            dec: vec![0; 65536],
            coalescer: Coalescer::new(64, vnet),
            replies: TxBatch::new(128 * 1024, 64),
            delivered: 0,
            handshakes: 0,
        }
    }

    /// Handles one received message for a device without pods: everything the cryptokey
    /// routing admits goes to the host tun.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_message(
        &mut self,
        snap: &Snapshot,
        limiter: &SourceLimiter,
        src: SocketAddr,
        data: &[u8],
        segment: Option<u16>,
        now: Instant,
        counters: &Counters,
        io: &mut impl Io,
    ) {
        self.handle_message_local(
            snap,
            host_only(),
            limiter,
            src,
            data,
            segment,
            now,
            counters,
            io,
        );
    }

    /// Handles one received message: a datagram, or a GRO train of `segment`-sized ones.
    /// Decrypted packets go to the local pod or host port `local` names for their destination.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_message_local<T>(
        &mut self,
        snap: &Snapshot,
        local: &LocalTable<T>,
        limiter: &SourceLimiter,
        src: SocketAddr,
        data: &[u8],
        segment: Option<u16>,
        now: Instant,
        counters: &Counters,
        io: &mut impl Io,
    ) {
        let seg = segment.map_or(data.len(), |s| s as usize).max(1);
        let mut held: Option<Held<'_>> = None;
        for d in data.chunks(seg) {
            let kind = if d.len() >= 4 {
                u32::from_le_bytes([d[0], d[1], d[2], d[3]])
            } else {
                0
            };
            if kind == MSG_DATA && d.len() >= DATA_OVERHEAD {
                let idx = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                let Some((slot, peer)) = snap.peer_for_index(idx) else {
                    counters.drop(DropReason::UnknownSession);
                    continue;
                };
                if held.as_ref().map(|h| h.slot) != Some(slot) {
                    release(snap, held.take());
                    held = Some(Held {
                        slot,
                        st: peer.lock(),
                        rx_bytes: 0,
                    });
                }
                let h = held.as_mut().expect("just set");
                self.data(snap, local, h, src, d, counters, io);
            } else {
                release(snap, held.take());
                if self.handshakes >= MAX_HANDSHAKES_PER_BATCH {
                    counters.drop(DropReason::RateLimited);
                    continue;
                }
                self.handshakes += 1;
                self.handshake(snap, limiter, kind, src, d, now, counters, io);
            }
        }
        release(snap, held);
    }

    #[allow(clippy::too_many_arguments)]
    fn data<T>(
        &mut self,
        snap: &Snapshot,
        local: &LocalTable<T>,
        h: &mut Held<'_>,
        src: SocketAddr,
        d: &[u8],
        counters: &Counters,
        io: &mut impl Io,
    ) {
        // boringtun panics if the ciphertext (all but the 16-byte header) exceeds the output
        // buffer; no UDP datagram is that long, but this function takes any bytes.
        if d.len() - 16 > self.dec.len() {
            counters.drop(DropReason::Malformed);
            return;
        }
        let (pkt, inner_src) = match h.st.tunn.decapsulate(Some(src.ip()), d, &mut self.dec) {
            TunnResult::WriteToTunnelV4(p, a) => (p, IpAddr::V4(a)),
            TunnResult::WriteToTunnelV6(p, a) => (p, IpAddr::V6(a)),
            TunnResult::Done => {
                // An authenticated keepalive.
                h.rx_bytes += d.len() as u64;
                roam(&mut h.st, src);
                return;
            }
            TunnResult::WriteToNetwork(p) => {
                let _ = self.replies.push(p, src);
                return;
            }
            TunnResult::Err(e) => {
                counters.drop(DropReason::from_wireguard(&e));
                return;
            }
        };
        h.rx_bytes += d.len() as u64;
        roam(&mut h.st, src);
        // boringtun does not check the inner source against allowed IPs; we must.
        if snap.routes.lookup(inner_src) != Some(h.slot) {
            counters.drop(DropReason::NotAllowedIp);
            return;
        }
        let Some(to) = addresses(pkt).and_then(|(_, dst)| local.deliver(dst)) else {
            counters.drop(DropReason::NoRoute);
            return;
        };
        if let (Some(f), Port::Pod(_)) = (&local.filter, to) {
            if let Err(r) = policy_allows(f, Check::Ingress, pkt) {
                counters.drop(r);
                return;
            }
        }
        if self.coalescer.is_full() {
            self.coalescer
                .drain_tagged(|t, f| io.tun_write_to(port(t), f));
        }
        self.coalescer.push_tagged(pkt, tag(to));
        self.delivered += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn handshake(
        &mut self,
        snap: &Snapshot,
        limiter: &SourceLimiter,
        kind: u32,
        src: SocketAddr,
        d: &[u8],
        now: Instant,
        counters: &Counters,
        io: &mut impl Io,
    ) {
        let Some(id) = &snap.identity else {
            counters.drop(DropReason::NoKey);
            return;
        };
        let peer = match kind {
            MSG_INIT => {
                // MAC1, and under load a cookie, before any Diffie-Hellman.
                let init = match id
                    .rate_limiter
                    .verify_packet(Some(src.ip()), d, &mut self.dec)
                {
                    Ok(Packet::HandshakeInit(init)) => init,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let _ = self.replies.push(cookie, src);
                        counters.drop(DropReason::RateLimited);
                        return;
                    }
                    Err(TunnResult::Err(e)) => {
                        counters.drop(match e {
                            boringtun::noise::errors::WireGuardError::InvalidPacket => {
                                DropReason::Malformed
                            }
                            _ => DropReason::Handshake,
                        });
                        return;
                    }
                    _ => {
                        counters.drop(DropReason::Malformed);
                        return;
                    }
                };
                if !limiter.allow(src.ip(), now) {
                    counters.drop(DropReason::RateLimited);
                    return;
                }
                let Ok(half) = parse_handshake_anon(&id.secret, &id.public, &init) else {
                    counters.drop(DropReason::Handshake);
                    return;
                };
                match snap.by_key.get(&half.peer_static_public) {
                    Some(slot) => &snap.peers[*slot as usize],
                    None => {
                        counters.drop(DropReason::Handshake);
                        return;
                    }
                }
            }
            MSG_RESPONSE | MSG_COOKIE if d.len() >= 12 => {
                // The receiver index follows the sender index in a response, the type in a cookie.
                let at = if kind == MSG_RESPONSE { 8 } else { 4 };
                let idx = u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
                match snap.peer_for_index(idx) {
                    Some((_, p)) => p,
                    None => {
                        counters.drop(DropReason::UnknownSession);
                        return;
                    }
                }
            }
            _ => {
                counters.drop(DropReason::Malformed);
                return;
            }
        };
        let mut st = peer.lock();
        match st.tunn.decapsulate(Some(src.ip()), d, &mut self.dec) {
            TunnResult::Err(e) => {
                counters.drop(DropReason::from_wireguard(&e));
                return;
            }
            TunnResult::WriteToNetwork(p) if !self.replies.push(p, src) => {
                io.udp_send(&mut self.replies);
                let _ = self.replies.push(p, src);
            }
            _ => {}
        }
        if kind != MSG_COOKIE {
            peer.rx_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            roam(&mut st, src);
        }
        // Packets boringtun queued while the handshake was under way.
        let mut sent = 0u64;
        loop {
            if !self.replies.has_room(MAX_FRAME + DATA_OVERHEAD, 1) {
                io.udp_send(&mut self.replies);
            }
            match st.tunn.decapsulate(None, &[], self.replies.slot()) {
                TunnResult::WriteToNetwork(p) => {
                    let n = p.len();
                    let dst = st.endpoint.unwrap_or(src);
                    self.replies.commit(n, dst);
                    sent += n as u64;
                }
                _ => break,
            }
        }
        peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
    }

    /// Writes what is pending to the tun and the network.
    pub fn finish(&mut self, counters: &Counters, io: &mut impl Io) {
        self.handshakes = 0;
        if !self.coalescer.is_empty() {
            self.coalescer
                .drain_tagged(|t, f| io.tun_write_to(port(t), f));
        }
        if !self.replies.is_empty() {
            io.udp_send(&mut self.replies);
        }
        counters
            .packets_rx
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
    }
}

/// Whether a frame is a TSO segment (cut to size on the way, never too big as a whole).
#[inline]
fn is_gso(frame: &[u8], vnet: bool) -> bool {
    vnet && frame.len() > 1 && frame[1] & !crate::offload::GSO_ECN != crate::offload::GSO_NONE
}

/// Whether a pod's packet passes NetworkPolicy at `check`: replies and later packets of an
/// admitted flow by one connection-table lookup; a new flow by the policy engine, once. The
/// drop reason when not: the policy's, or `flow_limit` when the flow cannot be remembered.
#[inline]
fn policy_allows(f: &Filter, check: Check, pkt: &[u8]) -> Result<(), DropReason> {
    use crate::policy::Protocol;
    let denied = match check {
        Check::Egress => DropReason::PolicyEgress,
        Check::Ingress => DropReason::PolicyIngress,
    };
    let flow = match classify(pkt) {
        Some(Classified::Packet(flow)) => flow,
        // ICMP errors pass only for a flow admitted here.
        Some(Classified::Error(about)) => {
            return f.conntrack.knows(about).then_some(()).ok_or(denied)
        }
        None => match addresses(pkt) {
            // A later fragment or an odd header: judged on addresses alone, port 0.
            Some((src, dst)) => conntrack::Flow {
                proto: 0,
                src,
                dst,
                sport: 0,
                dport: 0,
            },
            None => return Err(denied),
        },
    };
    let d = f.conntrack.check(flow, check, || {
        let proto = Protocol::from_ip_protocol(flow.proto);
        let port = match flow.proto {
            6 | 17 | 132 => flow.dport,
            _ => 0,
        };
        match check {
            Check::Egress => f
                .policy
                .egress_verdict(flow.src, flow.dst, proto, port)
                .is_allowed(),
            Check::Ingress => f
                .policy
                .ingress_verdict(flow.src, flow.dst, proto, port)
                .is_allowed(),
        }
    });
    match d {
        Decision::Established | Decision::Admitted => Ok(()),
        Decision::Denied => Err(denied),
        Decision::Full => Err(DropReason::FlowLimit),
    }
}

fn release(snap: &Snapshot, h: Option<Held<'_>>) {
    if let Some(h) = h {
        snap.peers[h.slot as usize]
            .rx_bytes
            .fetch_add(h.rx_bytes, Ordering::Relaxed);
    }
}

/// Endpoint roaming: authenticated packets tell where the peer is now.
#[inline]
fn roam(st: &mut PeerState, src: SocketAddr) {
    if st.endpoint != Some(src) {
        st.endpoint = Some(src);
    }
}

/// Runs every peer's timers once (call every [`TIMER_TICK`]); handshake retries,
/// keepalives and rekeys go into `out`.
pub fn tick_timers(snap: &Snapshot, out: &mut TxBatch, io: &mut impl Io) {
    for peer in &snap.peers {
        let mut st = peer.lock();
        if !out.has_room(MIN_OUT + DATA_OVERHEAD, 1) {
            io.udp_send(out);
        }
        let endpoint = st.endpoint;
        if let TunnResult::WriteToNetwork(p) = st.tunn.update_timers(out.slot()) {
            let n = p.len();
            if let Some(ep) = endpoint {
                out.commit(n, ep);
                peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    if !out.is_empty() {
        io.udp_send(out);
    }
}

/// How often peer timers run. boringtun rounds its timers to whole seconds internally; a
/// quarter second keeps handshake retries within the protocol's jitter.
pub const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Parses just enough of a datagram to say whether it is a WireGuard message at all.
pub fn is_wireguard_message(d: &[u8]) -> bool {
    Tunn::parse_incoming_packet(d).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::device::{Device, NetworkControl, HANDSHAKE_RATE_LIMIT};
    use crate::wg::key::PrivateKey;
    use crate::wg::uapi::{parse_request, Request};
    use std::time::Duration;

    struct NoNet;
    impl NetworkControl for NoNet {
        fn bind(&mut self, p: u16, _: u32) -> std::io::Result<u16> {
            Ok(p)
        }
        fn set_fwmark(&mut self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Collects what the loop would write.
    #[derive(Default)]
    struct Capture {
        tun: Vec<Vec<u8>>,
        to: Vec<Port>,
        udp: Vec<(SocketAddr, Vec<u8>)>,
    }
    impl Io for Capture {
        fn tun_write(&mut self, f: &[u8]) {
            self.tun_write_to(Port::Host, f)
        }
        fn tun_write_to(&mut self, p: Port, f: &[u8]) {
            self.to.push(p);
            self.tun.push(f.to_vec());
        }
        fn udp_send(&mut self, b: &mut TxBatch) {
            self.udp.extend(b.datagrams().map(|(a, d)| (a, d.to_vec())));
            b.clear();
        }
    }

    fn device(own: &PrivateKey, peer: &PrivateKey, allowed: &str, endpoint: &str) -> Device {
        let d = Device::new();
        let lines = [
            "set=1".to_string(),
            format!("private_key={}", own.expose_hex().as_str()),
            format!("public_key={}", peer.public_key().to_hex()),
            format!("allowed_ip={allowed}"),
            format!("endpoint={endpoint}"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let Request::Set(r) = parse_request(&refs).unwrap() else {
            panic!()
        };
        d.apply(r, &mut NoNet).unwrap();
        d
    }

    /// Under load the responder answers initiations with a cookie; an initiator that took the
    /// cookie gets through. The source address decides the cookie, so it must be the real one.
    #[test]
    fn cookie_reply_under_load_then_handshake_completes() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b = device(&kb, &ka, "10.99.0.1/32", "192.0.2.1:51820");
        let mut a = Tunn::new(
            ka.secret(),
            x25519_dalek::PublicKey::from(&kb.secret()),
            None,
            None,
            7,
            None,
        );
        let counters = Counters::default();
        let limiter = SourceLimiter::default();
        let mut rx = RxPath::new(false);
        let mut io = Capture::default();
        let snap = b.snapshot();
        let mut buf = vec![0u8; 2048];
        let t0 = Instant::now();
        // Flood past the device's limit: every initiation counts, whatever happens to it.
        for _ in 0..HANDSHAKE_RATE_LIMIT + 5 {
            let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, true)
            else {
                panic!()
            };
            let init = init.to_vec();
            rx.handle_message(&snap, &limiter, a_addr, &init, None, t0, &counters, &mut io);
            rx.finish(&counters, &mut io);
        }
        let cookie = io
            .udp
            .iter()
            .rev()
            .find(|(_, d)| d.len() == 64 && d[0] == 3)
            .expect("a cookie reply under load")
            .1
            .clone();
        assert!(counters.drops(DropReason::RateLimited) > 0);
        // The initiator takes the cookie; its next initiation carries a valid mac2.
        assert!(matches!(
            a.decapsulate(Some(a_addr.ip()), &cookie, &mut buf),
            TunnResult::Done
        ));
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, true) else {
            panic!()
        };
        let init = init.to_vec();
        io.udp.clear();
        // A second later, so the per-source bucket has a token again.
        rx.handle_message(
            &snap,
            &limiter,
            a_addr,
            &init,
            None,
            t0 + Duration::from_secs(1),
            &counters,
            &mut io,
        );
        rx.finish(&counters, &mut io);
        let (to, resp) = io
            .udp
            .iter()
            .find(|(_, d)| d[0] == 2)
            .expect("a handshake response")
            .clone();
        assert_eq!(to, a_addr);
        assert!(
            matches!(
                a.decapsulate(Some(to.ip()), &resp, &mut buf),
                TunnResult::WriteToNetwork(_)
            ),
            "initiator accepts the response"
        );
    }

    /// A batch full of initiations gets at most MAX_HANDSHAKES_PER_BATCH of them handled; the
    /// rest are dropped before any cryptography, and the next batch starts afresh.
    #[test]
    fn handshakes_per_batch_are_capped() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b = device(&kb, &ka, "10.99.0.1/32", "192.0.2.1:51820");
        let mut a = Tunn::new(
            ka.secret(),
            x25519_dalek::PublicKey::from(&kb.secret()),
            None,
            None,
            7,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let counters = Counters::default();
        let limiter = SourceLimiter::default();
        let mut rx = RxPath::new(false);
        let mut io = Capture::default();
        let snap = b.snapshot();
        let t0 = Instant::now();
        // Fresh initiations from distinct sources (no per-source limit, no replay).
        let mut send = |rx: &mut RxPath, io: &mut Capture, n: u8| {
            let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, true)
            else {
                panic!()
            };
            let src = SocketAddr::new([192, 0, 2, n].into(), 51820);
            rx.handle_message(&snap, &limiter, src, init, None, t0, &counters, io);
        };
        for n in 0..(MAX_HANDSHAKES_PER_BATCH as u8 + 12) {
            send(&mut rx, &mut io, n + 1);
        }
        rx.finish(&counters, &mut io);
        assert_eq!(
            io.udp.len(),
            MAX_HANDSHAKES_PER_BATCH,
            "one answer per handled initiation"
        );
        assert_eq!(counters.drops(DropReason::RateLimited), 12);
        io.udp.clear();
        send(&mut rx, &mut io, 200);
        rx.finish(&counters, &mut io);
        assert_eq!(io.udp.len(), 1, "the next batch is handled");
        let _ = a_addr;
    }

    /// A decrypted packet whose source is outside the peer's allowed IPs never reaches the tun.
    #[test]
    fn inner_source_must_be_in_allowed_ips() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b = device(&kb, &ka, "10.99.0.1/32", "192.0.2.1:51820");
        let mut a = Tunn::new(
            ka.secret(),
            x25519_dalek::PublicKey::from(&kb.secret()),
            None,
            None,
            9,
            None,
        );
        let (counters, limiter, mut rx, mut io) = (
            Counters::default(),
            SourceLimiter::default(),
            RxPath::new(false),
            Capture::default(),
        );
        let snap = b.snapshot();
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        let init = init.to_vec();
        rx.handle_message(
            &snap,
            &limiter,
            a_addr,
            &init,
            None,
            Instant::now(),
            &counters,
            &mut io,
        );
        rx.finish(&counters, &mut io);
        let resp = io.udp.iter().find(|(_, d)| d[0] == 2).unwrap().1.clone();
        let TunnResult::WriteToNetwork(ka_pkt) = a.decapsulate(None, &resp, &mut buf) else {
            panic!()
        };
        let ka_pkt = ka_pkt.to_vec();
        rx.handle_message(
            &snap,
            &limiter,
            a_addr,
            &ka_pkt,
            None,
            Instant::now(),
            &counters,
            &mut io,
        );
        for (src, want) in [([10, 99, 0, 1], true), ([10, 99, 0, 66], false)] {
            let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&[10, 99, 0, 2]);
            ip.extend_from_slice(&[0u8; 8]);
            crate::offload::checksum::set_ipv4_header(&mut ip[..20]);
            let TunnResult::WriteToNetwork(d) = a.encapsulate(&ip, &mut buf) else {
                panic!()
            };
            let d = d.to_vec();
            io.tun.clear();
            rx.handle_message(
                &snap,
                &limiter,
                a_addr,
                &d,
                None,
                Instant::now(),
                &counters,
                &mut io,
            );
            rx.finish(&counters, &mut io);
            assert_eq!(io.tun.len() == 1, want, "source {src:?}");
        }
        assert_eq!(counters.drops(DropReason::NotAllowedIp), 1);
    }

    fn udp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0u8; 8]);
        crate::offload::checksum::set_ipv4_header(&mut ip[..20]);
        ip
    }

    /// Frames from pods: spoofed sources dropped; local pods, peers and the host reached.
    #[test]
    fn pod_frames_are_checked_and_routed() {
        use local::PodPort;
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dev = device(&ka, &kb, "10.244.2.0/24", "192.0.2.2:51820");
        let snap = dev.snapshot();
        let pods = vec![
            PodPort {
                id: 1,
                ips: vec!["10.244.1.5".parse().unwrap()],
                io: (),
            },
            PodPort {
                id: 2,
                ips: vec!["10.244.1.6".parse().unwrap()],
                io: (),
            },
        ];
        let local = LocalTable::new(pods, vec!["10.244.1.1".parse().unwrap()]);
        let counters = Counters::default();
        let mut tx = TxPath::new();
        let mut io = Capture::default();
        let from = Port::Pod(0);
        // Spoofed: pod 0 claims pod 1's address.
        tx.handle_frame_from(
            &snap,
            &local,
            from,
            &mut udp4([10, 244, 1, 6], [10, 244, 1, 5]),
            false,
            &counters,
            &mut io,
        );
        assert_eq!(counters.drops(DropReason::SpoofedSource), 1);
        assert!(io.tun.is_empty() && io.udp.is_empty());
        // Same node: straight to pod 1's tun.
        tx.handle_frame_from(
            &snap,
            &local,
            from,
            &mut udp4([10, 244, 1, 5], [10, 244, 1, 6]),
            false,
            &counters,
            &mut io,
        );
        assert_eq!(io.to, vec![Port::Pod(1)]);
        // Outside world: to the host tun (the kernel masquerades).
        tx.handle_frame_from(
            &snap,
            &local,
            from,
            &mut udp4([10, 244, 1, 5], [198, 51, 100, 7]),
            false,
            &counters,
            &mut io,
        );
        assert_eq!(io.to.last(), Some(&Port::Host));
        // Another node's pod: encrypted to that peer (a handshake initiation first).
        tx.handle_frame_from(
            &snap,
            &local,
            from,
            &mut udp4([10, 244, 1, 5], [10, 244, 2, 9]),
            false,
            &counters,
            &mut io,
        );
        tx.flush(&mut io);
        assert_eq!(io.udp.len(), 1);
        assert_eq!(
            io.udp[0].0,
            "192.0.2.2:51820".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(io.udp[0].1[0], 1, "handshake initiation");
        // From the host, an address nobody owns is dropped, not looped back.
        let before = io.tun.len();
        tx.handle_frame_from(
            &snap,
            &local,
            Port::Host,
            &mut udp4([10, 244, 1, 1], [198, 51, 100, 7]),
            false,
            &counters,
            &mut io,
        );
        assert_eq!(io.tun.len(), before);
        assert_eq!(counters.drops(DropReason::NoPeer), 1);
    }

    /// Decrypted packets reach local pods and the node's gateway; nothing else on a node.
    #[test]
    fn decrypted_packets_go_to_pods_or_the_gateway_only() {
        use local::PodPort;
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b = device(&kb, &ka, "10.244.1.0/24", "192.0.2.1:51820");
        let snap = b.snapshot();
        let local = LocalTable::new(
            vec![PodPort {
                id: 9,
                ips: vec!["10.244.2.5".parse().unwrap()],
                io: (),
            }],
            vec!["10.244.2.1".parse().unwrap()],
        );
        let mut a = Tunn::new(
            ka.secret(),
            x25519_dalek::PublicKey::from(&kb.secret()),
            None,
            None,
            3,
            None,
        );
        let (counters, limiter, mut rx, mut io) = (
            Counters::default(),
            SourceLimiter::default(),
            RxPath::new(false),
            Capture::default(),
        );
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        let init = init.to_vec();
        rx.handle_message_local(
            &snap,
            &local,
            &limiter,
            a_addr,
            &init,
            None,
            Instant::now(),
            &counters,
            &mut io,
        );
        rx.finish(&counters, &mut io);
        let resp = io.udp.iter().find(|(_, d)| d[0] == 2).unwrap().1.clone();
        let TunnResult::WriteToNetwork(k) = a.decapsulate(None, &resp, &mut buf) else {
            panic!()
        };
        let k = k.to_vec();
        rx.handle_message_local(
            &snap,
            &local,
            &limiter,
            a_addr,
            &k,
            None,
            Instant::now(),
            &counters,
            &mut io,
        );
        for (dst, want) in [
            ([10, 244, 2, 5], Some(Port::Pod(0))),
            ([10, 244, 2, 1], Some(Port::Host)),
            ([10, 244, 2, 77], None),
        ] {
            let TunnResult::WriteToNetwork(d) =
                a.encapsulate(&udp4([10, 244, 1, 5], dst), &mut buf)
            else {
                panic!()
            };
            let d = d.to_vec();
            io.to.clear();
            rx.handle_message_local(
                &snap,
                &local,
                &limiter,
                a_addr,
                &d,
                None,
                Instant::now(),
                &counters,
                &mut io,
            );
            rx.finish(&counters, &mut io);
            assert_eq!(io.to.first().copied(), want, "{dst:?}");
        }
        assert_eq!(counters.drops(DropReason::NoRoute), 1);
    }

    /// NetworkPolicy in the loop: a default-deny-ingress pod admits only the allowed source;
    /// its replies pass back through the connection table; the node itself always reaches it.
    /// A cluster address without a peer: the packet is dropped (`no_peer`) and an ICMP
    /// unreachable goes back to its sender (a pod: from the node's gateway; the node: from the
    /// destination), never to the host to route; the node's own gateway still gets its packets.
    #[test]
    fn cluster_addresses_without_a_peer_are_unreachable() {
        use local::PodPort;
        let ports = vec![PodPort {
            id: 0,
            ips: vec!["10.244.1.5".parse().unwrap()],
            io: (),
        }];
        let mut local = LocalTable::new(ports, vec!["10.244.1.1".parse().unwrap()]);
        local.cluster = vec!["10.244.0.0/16".parse().unwrap()];
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dev = device(&ka, &kb, "10.244.2.0/24", "192.0.2.2:51820");
        let snap = dev.snapshot();
        let counters = Counters::default();
        let mut tx = TxPath::new();
        let mut io = Capture::default();
        let mut send = |from: Port, src: [u8; 4], dst: [u8; 4], io: &mut Capture| {
            io.to.clear();
            io.tun.clear();
            tx.handle_frame_from(
                &snap,
                &local,
                from,
                &mut udp4(src, dst),
                false,
                &counters,
                io,
            );
        };
        // Pod -> a keyless Node's range: dropped, ICMP host unreachable back to the pod.
        send(Port::Pod(0), [10, 244, 1, 5], [10, 244, 9, 7], &mut io);
        assert_eq!(counters.drops(DropReason::NoPeer), 1);
        assert_eq!(io.to, vec![Port::Pod(0)]);
        let icmp = &io.tun[0];
        assert_eq!(
            (icmp[9], icmp[20], icmp[21]),
            (1, 3, 1),
            "ICMP host unreachable"
        );
        assert_eq!(&icmp[12..16], &[10, 244, 1, 1], "from the gateway");
        assert_eq!(&icmp[16..20], &[10, 244, 1, 5], "to the pod");
        // The node itself: from the destination (the kernel drops its own address as source).
        send(Port::Host, [10, 244, 1, 1], [10, 244, 9, 7], &mut io);
        assert_eq!(counters.drops(DropReason::NoPeer), 2);
        assert_eq!(&io.tun[0][12..16], &[10, 244, 9, 7]);
        // Pod -> its node's gateway, and -> the world: to the host.
        send(Port::Pod(0), [10, 244, 1, 5], [10, 244, 1, 1], &mut io);
        assert_eq!(io.to, vec![Port::Host]);
        send(Port::Pod(0), [10, 244, 1, 5], [192, 0, 2, 9], &mut io);
        assert_eq!(io.to, vec![Port::Host]);
        assert_eq!(counters.drops(DropReason::NoPeer), 2);
    }

    #[test]
    fn policy_admits_new_flows_once_and_lets_replies_back() {
        use crate::datapath::conntrack::Conntrack;
        use crate::policy::{Namespace, Pod, PolicySet};
        use local::{Filter, PodPort};
        use std::collections::BTreeMap;
        use std::sync::Arc;
        let pod = |name: &str, ip: &str, app: &str| Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            ips: vec![ip.parse().unwrap()],
            container_ports: vec![],
            node_name: "n1".into(),
            host_network: false,
        };
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": "x", "name": "only-a"},
                "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}
            }))
            .unwrap();
        let policy = PolicySet::compile(
            vec![Namespace::new("x", BTreeMap::new())],
            vec![
                pod("server", "10.244.1.5", "server"),
                pod("a", "10.244.1.6", "a"),
                pod("b", "10.244.1.7", "b"),
            ],
            vec![crate::policy::Policy::from_k8s(&np).unwrap()],
        );
        let ports = ["10.244.1.5", "10.244.1.6", "10.244.1.7"]
            .iter()
            .enumerate()
            .map(|(i, ip)| PodPort {
                id: i as u64,
                ips: vec![ip.parse().unwrap()],
                io: (),
            })
            .collect();
        let mut local = LocalTable::new(ports, vec!["10.244.1.1".parse().unwrap()]);
        local.filter = Some(Filter {
            policy: Arc::new(policy),
            conntrack: Arc::new(Conntrack::default()),
        });
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dev = device(&ka, &kb, "10.244.2.0/24", "192.0.2.2:51820");
        let snap = dev.snapshot();
        let counters = Counters::default();
        let mut tx = TxPath::new();
        let mut io = Capture::default();
        let mut send = |from: u32, src: [u8; 4], dst: [u8; 4], io: &mut Capture| {
            io.to.clear();
            let port = if from == u32::MAX {
                Port::Host
            } else {
                Port::Pod(from)
            };
            tx.handle_frame_from(
                &snap,
                &local,
                port,
                &mut udp4(src, dst),
                false,
                &counters,
                io,
            );
            io.to.first().copied()
        };
        // b -> server: denied at the server's ingress.
        assert_eq!(send(2, [10, 244, 1, 7], [10, 244, 1, 5], &mut io), None);
        assert_eq!(counters.drops(DropReason::PolicyIngress), 1);
        // a -> server: admitted; the server's reply passes (ports reversed in udp4: 0 -> 0).
        assert_eq!(
            send(1, [10, 244, 1, 6], [10, 244, 1, 5], &mut io),
            Some(Port::Pod(0))
        );
        assert_eq!(
            send(0, [10, 244, 1, 5], [10, 244, 1, 6], &mut io),
            Some(Port::Pod(1))
        );
        // The node (its gateway address) reaches the server: kubelet probes.
        assert_eq!(
            send(u32::MAX, [10, 244, 1, 1], [10, 244, 1, 5], &mut io),
            Some(Port::Pod(0))
        );
        // An unselected pod is open both ways.
        assert_eq!(
            send(0, [10, 244, 1, 5], [10, 244, 1, 7], &mut io),
            Some(Port::Pod(2))
        );
        assert_eq!(counters.drops(DropReason::PolicyIngress), 1);
    }

    /// A packet larger than the tunnel MTU with DF set is answered with "fragmentation
    /// needed" to its sender, from the node's gateway address.
    #[test]
    fn too_big_for_the_tunnel_gets_an_icmp_error_back() {
        use local::PodPort;
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dev = device(&ka, &kb, "10.244.2.0/24", "192.0.2.2:51820");
        let snap = dev.snapshot();
        let mut local = LocalTable::new(
            vec![PodPort {
                id: 1,
                ips: vec!["10.244.1.5".parse().unwrap()],
                io: (),
            }],
            vec!["10.244.1.1".parse().unwrap()],
        );
        local.mtu = Some(1420);
        let (counters, mut tx, mut io) = (Counters::default(), TxPath::new(), Capture::default());
        let mut big = udp4([10, 244, 1, 5], [10, 244, 2, 9]);
        big.resize(1500, 0);
        big[2..4].copy_from_slice(&1500u16.to_be_bytes());
        crate::offload::checksum::set_ipv4_header(&mut big[..20]);
        tx.handle_frame_from(
            &snap,
            &local,
            Port::Pod(0),
            &mut big,
            false,
            &counters,
            &mut io,
        );
        tx.flush(&mut io);
        assert!(io.udp.is_empty(), "nothing encrypted");
        assert_eq!(
            io.to,
            vec![Port::Pod(0)],
            "the error goes back to the sender"
        );
        let e = &io.tun[0];
        assert_eq!((e[20], e[21]), (3, 4));
        assert_eq!(&e[12..16], &[10, 244, 1, 1]);
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1420);
        assert_eq!(counters.drops(DropReason::Mtu), 1);
    }

    /// A policy change applies to new flows at once; a flow admitted before it goes on until
    /// idle (Calico's choice), because the connection table outlives policy snapshots.
    #[test]
    fn established_flows_outlive_a_policy_change_new_flows_see_it() {
        use crate::datapath::conntrack::Conntrack;
        use crate::policy::{Namespace, Pod, Policy, PolicySet};
        use local::{Filter, PodPort};
        use std::collections::BTreeMap;
        use std::sync::Arc;
        let pods = || {
            ["10.244.1.5", "10.244.1.6"]
                .iter()
                .enumerate()
                .map(|(i, ip)| Pod {
                    namespace: "x".into(),
                    name: format!("p{i}"),
                    labels: BTreeMap::from([("app".to_string(), format!("p{i}"))]),
                    ips: vec![ip.parse().unwrap()],
                    container_ports: vec![],
                    node_name: "n1".into(),
                    host_network: false,
                })
                .collect::<Vec<_>>()
        };
        let table = |policies: Vec<Policy>, ct: &Arc<Conntrack>| {
            let set =
                PolicySet::compile(vec![Namespace::new("x", BTreeMap::new())], pods(), policies);
            let ports = ["10.244.1.5", "10.244.1.6"]
                .iter()
                .enumerate()
                .map(|(i, ip)| PodPort {
                    id: i as u64,
                    ips: vec![ip.parse().unwrap()],
                    io: (),
                })
                .collect();
            let mut t = LocalTable::new(ports, vec!["10.244.1.1".parse().unwrap()]);
            t.filter = Some(Filter {
                policy: Arc::new(set),
                conntrack: ct.clone(),
            });
            t
        };
        let allow_all = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "open"}, "spec": {"podSelector": {}, "ingress": [{}]}});
        let deny_all = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "closed"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        let np =
            |v: serde_json::Value| Policy::from_k8s(&serde_json::from_value(v).unwrap()).unwrap();
        let ct = Arc::new(Conntrack::default());
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dev = device(&ka, &kb, "10.244.2.0/24", "192.0.2.2:51820");
        let snap = dev.snapshot();
        let counters = Counters::default();
        let mut tx = TxPath::new();
        let mut io = Capture::default();
        let mut send = |local: &LocalTable<()>, sport: u8, io: &mut Capture| {
            io.to.clear();
            let mut p = udp4([10, 244, 1, 5], [10, 244, 1, 6]);
            p[21] = sport; // source port: one flow per value
            tx.handle_frame_from(&snap, local, Port::Pod(0), &mut p, false, &counters, io);
            !io.to.is_empty()
        };
        let open = table(vec![np(allow_all)], &ct);
        assert!(send(&open, 1, &mut io), "admitted under the open policy");
        let closed = table(vec![np(deny_all)], &ct);
        assert!(
            send(&closed, 1, &mut io),
            "the established flow goes on after the change"
        );
        assert!(!send(&closed, 2, &mut io), "a new flow sees the new policy");
        assert_eq!(counters.drops(DropReason::PolicyIngress), 1);
    }
}
