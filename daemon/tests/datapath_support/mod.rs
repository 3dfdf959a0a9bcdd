//! Two kwire devices wired back to back in memory for the data-path tests, benches and fuzz
//! targets: configured through the userspace API, exchanging datagrams through ring-buffer
//! [`Io`] doubles that never allocate once built. Included with `#[path]`; not a test itself.
#![allow(dead_code)]

use kwire::datapath::local::Port;
use kwire::datapath::stats::Counters;
use kwire::datapath::Ctx;
use kwire::dataplane::{Io, RxPath, TxPath};
use kwire::offload::checksum::{fold, pseudo_header, set_ipv4_header, sum};
use kwire::offload::gso::TxBatch;
use kwire::offload::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4, VNET_HDR_LEN};
use kwire::wg::device::NetworkControl;
use kwire::wg::key::PrivateKey;
use kwire::wg::uapi::{parse_request, Request};
use kwire::wg::Device;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

/// Outer (underlay) addresses of the two nodes.
pub const ADDR_A: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51820);
pub const ADDR_B: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 51820);
/// Inner (pod) addresses: each is the other's only allowed IP.
pub const INNER_A: [u8; 4] = [10, 99, 0, 1];
pub const INNER_B: [u8; 4] = [10, 99, 0, 2];

/// Fixed private keys, so captured handshake messages stay valid for the fuzz targets.
pub const KEY_A: [u8; 32] = [0x11; 32];
pub const KEY_B: [u8; 32] = [0x22; 32];

/// The MSS the TSO frames are cut to: a 1420-byte tunnel MTU less 40 bytes of headers.
pub const MSS: u16 = 1380;

/// A `NetworkControl` that binds nothing.
pub struct NoNet;

impl NetworkControl for NoNet {
    fn bind(&mut self, port: u16, _fwmark: u32) -> std::io::Result<u16> {
        Ok(if port == 0 { 51820 } else { port })
    }
    fn set_fwmark(&mut self, _fwmark: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// One stored message: bytes in the ring, the GSO segment size (0: one datagram), the address.
#[derive(Clone, Copy)]
pub struct Entry {
    pub start: usize,
    pub len: usize,
    pub segment: u32,
    pub addr: SocketAddr,
}

/// A fixed-size store of messages; pushing past its capacity counts an overflow instead of
/// growing, so the measured region of the allocation test stays allocation-free.
pub struct Ring {
    buf: Vec<u8>,
    used: usize,
    entries: Vec<Entry>,
    pub overflows: u64,
}

impl Ring {
    pub fn new(bytes: usize, entries: usize) -> Ring {
        Ring {
            buf: vec![0; bytes],
            used: 0,
            entries: Vec::with_capacity(entries),
            overflows: 0,
        }
    }

    pub fn push(&mut self, data: &[u8], segment: u32, addr: SocketAddr) {
        if self.used + data.len() > self.buf.len() || self.entries.len() == self.entries.capacity()
        {
            self.overflows += 1;
            return;
        }
        self.buf[self.used..self.used + data.len()].copy_from_slice(data);
        self.entries.push(Entry {
            start: self.used,
            len: data.len(),
            segment,
            addr,
        });
        self.used += data.len();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, i: usize) -> (Entry, &[u8]) {
        let e = self.entries[i];
        (e, &self.buf[e.start..e.start + e.len])
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.entries.clear();
    }
}

/// What a node wrote: GSO groups of datagrams for the network, frames for its tun.
pub struct RingIo {
    pub udp: Ring,
    pub tun: Ring,
}

impl RingIo {
    pub fn new() -> RingIo {
        RingIo {
            udp: Ring::new(8 << 20, 8192),
            tun: Ring::new(8 << 20, 4096),
        }
    }
}

impl Io for RingIo {
    fn write_tun(&mut self, _to: Port, frame: &[u8]) {
        self.tun.push(frame, 0, ADDR_A);
    }

    fn send_udp(&mut self, batch: &mut TxBatch) {
        for g in batch.groups() {
            let seg = if g.count > 1 { g.segment } else { 0 };
            self.udp.push(batch.group_bytes(g), seg, g.dst);
        }
        batch.clear();
    }
}

/// An `Io` that drops everything (benches).
pub struct SinkIo {
    pub datagrams: u64,
    pub frames: u64,
}

impl Io for SinkIo {
    fn write_tun(&mut self, _to: Port, frame: &[u8]) {
        std::hint::black_box(frame);
        self.frames += 1;
    }
    fn send_udp(&mut self, batch: &mut TxBatch) {
        for g in batch.groups() {
            self.datagrams += g.count as u64;
        }
        std::hint::black_box(batch.groups());
        batch.clear();
    }
}

/// One device with its per-worker paths and what it wrote.
pub struct Node {
    pub device: Device,
    pub addr: SocketAddr,
    pub inner: [u8; 4],
    pub tx: TxPath,
    pub rx: RxPath,
    pub counters: Counters,
    pub io: RingIo,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `wg set` request text that gives `own` the key `key` and `peer` as its one peer.
pub fn set_request_text(
    key: &[u8; 32],
    peer_key: &[u8; 32],
    peer_addr: SocketAddr,
    peer_inner: [u8; 4],
) -> String {
    let peer_pub = PrivateKey::from_bytes(*peer_key)
        .expect("nonzero")
        .public_key()
        .to_hex();
    let ip = Ipv4Addr::from(peer_inner);
    format!(
        "set=1\nprivate_key={}\nlisten_port=51820\nreplace_peers=true\npublic_key={peer_pub}\nendpoint={peer_addr}\n\
         replace_allowed_ips=true\nallowed_ip={ip}/32\n\n",
        hex(key)
    )
}

/// Applies a request text (lines up to the blank line) to `dev`.
pub fn apply_text(dev: &Device, text: &str) {
    let lines: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).collect();
    let Request::Set(req) = parse_request(&lines).expect("request parses") else {
        panic!("not a set")
    };
    dev.apply(req, &mut NoNet).expect("request applies");
}

impl Node {
    /// A node with key `key` whose one peer has key `peer_key`, at `peer_addr`, owning `peer_inner`.
    pub fn new(
        key: [u8; 32],
        addr: SocketAddr,
        inner: [u8; 4],
        peer_key: [u8; 32],
        peer_addr: SocketAddr,
        peer_inner: [u8; 4],
        rx_vnet: bool,
    ) -> Node {
        let device = Device::new();
        apply_text(
            &device,
            &set_request_text(&key, &peer_key, peer_addr, peer_inner),
        );
        Node {
            device,
            addr,
            inner,
            tx: TxPath::new(),
            rx: RxPath::new(rx_vnet),
            counters: Counters::default(),
            io: RingIo::new(),
        }
    }

    /// Encrypts one tun frame and sends what is pending.
    pub fn send(&mut self, frame: &mut [u8], vnet: bool) {
        self.queue(frame, vnet);
        self.tx.flush(&mut self.io);
    }

    /// Encrypts one tun frame without flushing.
    pub fn queue(&mut self, frame: &mut [u8], vnet: bool) {
        let snap = self.device.snapshot();
        let ctx = Ctx::host_only(
            &snap,
            &self.counters,
            &self.device.source_limiter,
            Instant::now(),
            vnet,
        );
        self.tx.frame(&ctx, Port::Host, frame, &mut self.io);
    }
}

/// Feeds every message `from` sent to `to`'s receive path (GSO groups as GRO trains, as the
/// kernel would hand them over), then lets `to` flush. Returns how many messages moved.
pub fn deliver(from: &mut Node, to: &mut Node, now: Instant) -> usize {
    let n = from.io.udp.len();
    if n == 0 {
        return 0;
    }
    let snap = to.device.snapshot();
    let ctx = Ctx::host_only(&snap, &to.counters, &to.device.source_limiter, now, false);
    for i in 0..n {
        let (e, data) = from.io.udp.entry(i);
        let seg = if e.segment == 0 {
            None
        } else {
            Some(e.segment as u16)
        };
        to.rx.message(&ctx, from.addr, data, seg, &mut to.io);
    }
    to.rx.finish(&to.counters, &mut to.io);
    from.io.udp.clear();
    n
}

/// A and B, each the other's peer.
pub struct Pair {
    pub a: Node,
    pub b: Node,
}

impl Pair {
    /// `rx_vnet`: both receive paths write frames with virtio-net headers (and merge TCP).
    pub fn new(rx_vnet: bool) -> Pair {
        Pair {
            a: Node::new(KEY_A, ADDR_A, INNER_A, KEY_B, ADDR_B, INNER_B, rx_vnet),
            b: Node::new(KEY_B, ADDR_B, INNER_B, KEY_A, ADDR_A, INNER_A, rx_vnet),
        }
    }

    /// Both receive paths write virtio-net headers and merge UDP datagrams too (tuns with USO).
    pub fn with_uso() -> Pair {
        let mut p = Pair::new(true);
        p.a.rx = RxPath::with_uso(true, true);
        p.b.rx = RxPath::with_uso(true, true);
        p
    }

    /// Moves datagrams both ways until neither side has anything to send.
    pub fn pump(&mut self, now: Instant) {
        for _ in 0..16 {
            let moved =
                deliver(&mut self.a, &mut self.b, now) + deliver(&mut self.b, &mut self.a, now);
            if moved == 0 {
                return;
            }
        }
        panic!("datagrams still bouncing after 16 rounds");
    }

    /// Completes the handshake with one packet each way, and checks both arrived.
    pub fn handshake(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 2048];
        let n = udp_packet(&mut buf, INNER_A, INNER_B, 0, 100);
        self.a.send(&mut buf[..n], false);
        self.pump(now);
        let n = udp_packet(&mut buf, INNER_B, INNER_A, 0, 100);
        self.b.send(&mut buf[..n], false);
        self.pump(now);
        assert_eq!(self.b.io.tun.len(), 1, "A's first packet reached B");
        assert_eq!(self.a.io.tun.len(), 1, "B's first packet reached A");
        self.a.io.tun.clear();
        self.b.io.tun.clear();
    }
}

/// Writes an IPv4/UDP packet of `len` bytes (at least 28) into `buf`, its payload a pattern
/// derived from `n`; returns `len`.
pub fn udp_packet(buf: &mut [u8], src: [u8; 4], dst: [u8; 4], n: u32, len: usize) -> usize {
    let p = &mut buf[..len];
    p[..28].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(n as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    set_ipv4_header(&mut p[..20]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    fill_pattern(&mut p[28..], n);
    len
}

fn fill_pattern(p: &mut [u8], n: u32) {
    let mut x = n.wrapping_mul(2654435761).wrapping_add(1);
    for b in p {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
}

/// Writes into `buf` what a tun with TSO hands over: a virtio-net header (`GSO_TCPV4`,
/// `NEEDS_CSUM`, `gso_size` [`MSS`]) and one IPv4/TCP segment with `payload` bytes, ACK|PSH,
/// its checksum field holding the pseudo-header sum. Returns the frame length.
pub fn tso_frame(
    buf: &mut [u8],
    src: [u8; 4],
    dst: [u8; 4],
    seq: u32,
    n: u32,
    payload: usize,
) -> usize {
    let len = 40 + payload;
    assert!(len <= 65535);
    let (h, rest) = buf.split_at_mut(VNET_HDR_LEN);
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: MSS,
        csum_start: 20,
        csum_offset: 16,
    }
    .encode(h.try_into().expect("header length"));
    let p = &mut rest[..len];
    p[..40].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(n as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    set_ipv4_header(&mut p[..20]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&77u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x18; // ACK|PSH: the last segment closes the merged frame on the other side
    p[34..36].copy_from_slice(&512u16.to_be_bytes());
    fill_pattern(&mut p[40..], n);
    let ph = fold(pseudo_header(&src, &dst, 6, (len - 20) as u32));
    p[36..38].copy_from_slice(&ph.to_be_bytes());
    VNET_HDR_LEN + len
}

/// Writes into `buf` what a tun with USO hands over for an application's `UDP_SEGMENT` send:
/// a virtio-net header (`GSO_UDP_L4`, `NEEDS_CSUM`, `gso_size` `size`) and one IPv4/UDP
/// super-packet with `payload` bytes, its checksum field holding the pseudo-header sum.
/// Returns the frame length.
pub fn uso_frame(
    buf: &mut [u8],
    src: [u8; 4],
    dst: [u8; 4],
    n: u32,
    size: u16,
    payload: usize,
) -> usize {
    let len = 28 + payload;
    assert!(len <= 65535);
    let (h, rest) = buf.split_at_mut(VNET_HDR_LEN);
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 28,
        gso_size: size,
        csum_start: 20,
        csum_offset: 6,
    }
    .encode(h.try_into().expect("header length"));
    let p = &mut rest[..len];
    udp_packet(p, src, dst, n, len);
    let ph = fold(pseudo_header(&src, &dst, 17, (len - 20) as u32));
    p[26..28].copy_from_slice(&ph.to_be_bytes());
    VNET_HDR_LEN + len
}

/// A plain IPv4/TCP packet with a full checksum (for GRO benches and seeds).
pub fn tcp_packet(
    buf: &mut [u8],
    src: [u8; 4],
    dst: [u8; 4],
    seq: u32,
    flags: u8,
    payload: &[u8],
) -> usize {
    let len = 40 + payload.len();
    let p = &mut buf[..len];
    p[..40].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    set_ipv4_header(&mut p[..20]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&77u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p[34..36].copy_from_slice(&512u16.to_be_bytes());
    p[40..].copy_from_slice(payload);
    let c = !fold(sum(
        pseudo_header(&src, &dst, 6, (len - 20) as u32),
        &p[20..],
    ));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    len
}
