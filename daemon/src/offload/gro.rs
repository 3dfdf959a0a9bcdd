//! Merging decrypted packets of one TCP flow into one segment before it goes to the tun (the
//! kernel then takes one 64 KB segment instead of 45 packets). Only plain, in-order data
//! segments with identical headers merge, as the kernel's own GRO requires; anything else is
//! written as it came. Where the tun takes UDP segmentation offload (USO, Linux 6.2), the
//! datagrams of one UDP flow merge alike into one super-packet (equal sizes, the last may be
//! shorter), which the kernel splits back into the same datagrams for the receiving socket.

use super::checksum::{fold, pseudo_header, set_ipv4_header};
use super::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN};

/// Largest IP packet a merged segment may become.
const MAX_MERGED: usize = 65535;

/// How many recent frames are searched for a flow to extend; older ones are left alone.
const SEARCH_DEPTH: usize = 8;

/// Datagrams one UDP super-packet may carry (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
const MAX_UDP_SEGMENTS: usize = 64;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Frames waiting to be written to the tun, each with room for its virtio-net header.
pub struct Coalescer {
    buf: Vec<u8>,
    frames: Vec<Frame>,
    capacity: usize,
    /// Merge TCP segments (needs a tun opened with virtio-net headers).
    enabled: bool,
    /// Merge UDP datagrams too (the tun takes USO).
    udp: bool,
    hdr_room: usize,
}

#[derive(Clone, Copy, Default)]
struct Frame {
    /// Packet bytes (without the header room).
    len: usize,
    /// The flow may still be extended.
    open: bool,
    /// The caller's label for where the frame goes; frames merge only within one tag.
    tag: u32,
    v6: bool,
    udp: bool,
    l4: usize,
    hlen: usize,
    /// Payload size of the first segment; all but the last must have it.
    mss: usize,
    count: usize,
    next_seq: u32,
}

/// Room past a slot's largest packet: a packet decrypted in place ([`Coalescer::landing`]) needs
/// room for its ciphertext, up to 31 bytes longer (padding to 16 bytes, the 16-byte tag).
const TAIL_ROOM: usize = 64;

/// Slot size: header room, the largest packet, the tail room.
const SLOT: usize = VNET_HDR_LEN + MAX_MERGED + TAIL_ROOM;

/// Bytes of a frame's tail a landing may cover (and keeps to put back): the longest header
/// that merges (IPv6 and a TCP header with 40 bytes of options: 100).
const MAX_COVERED: usize = 128;

/// Where a packet is decrypted straight into the coalescer ([`Coalescer::landing`]), and the
/// bytes of the frame it covers until it is landed or abandoned.
pub struct Landing {
    at: usize,
    /// The frame whose continuation the packet would be, its payload decrypted right where
    /// that frame goes on; `None`: at the start of the next free slot.
    onto: Option<usize>,
    covered: [u8; MAX_COVERED],
    covered_len: usize,
}

/// Where a pushed packet goes, besides a frame of its own.
enum Found {
    /// It continues frame `i`.
    Append(usize),
    /// Frame `i` is the same flow but the packet does not continue it: the frame is closed.
    Close(usize),
    Nothing,
}

impl Coalescer {
    /// `capacity` frames; `vnet_hdr` says whether frames carry a virtio-net header (and so
    /// whether merging is possible at all).
    pub fn new(capacity: usize, vnet_hdr: bool) -> Coalescer {
        Coalescer {
            buf: vec![0; capacity * SLOT],
            frames: Vec::with_capacity(capacity),
            capacity,
            enabled: vnet_hdr,
            udp: false,
            hdr_room: if vnet_hdr { VNET_HDR_LEN } else { 0 },
        }
    }

    /// Merges UDP datagrams as well when `uso` (the tuns written to take UDP segmentation
    /// offload; needs virtio-net headers).
    pub fn with_udp(mut self, uso: bool) -> Coalescer {
        self.udp = uso && self.enabled;
        self
    }

    pub fn is_full(&self) -> bool {
        self.frames.len() == self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Adds one IP packet. The caller flushes first when [`Coalescer::is_full`].
    pub fn push(&mut self, pkt: &[u8]) {
        self.push_tagged(pkt, 0)
    }

    /// Adds one IP packet bound for destination `tag` (see [`Coalescer::drain_tagged`]).
    pub fn push_tagged(&mut self, pkt: &[u8], tag: u32) {
        debug_assert!(!self.is_full());
        if pkt.len() > MAX_MERGED {
            return;
        }
        let cand = self.candidate(pkt);
        if let Some(c) = cand {
            match self.find(pkt, &c, tag) {
                Found::Append(i) => {
                    let at = self.end_of(i);
                    self.buf[at..at + c.payload].copy_from_slice(&pkt[c.hlen..]);
                    self.appended(i, &c);
                    return;
                }
                Found::Close(i) => self.frames[i].open = false,
                Found::Nothing => {}
            }
        }
        let start = self.slot_start(self.frames.len());
        self.buf[start..start + pkt.len()].copy_from_slice(pkt);
        self.new_frame(pkt.len(), tag, cand);
    }

    /// Where to decrypt a packet whose ciphertext is at most `max_len` bytes so that it needs
    /// no copy ([`Coalescer::landing_buf`]): over the tail of the newest open frame, its header
    /// on the frame's last bytes (kept aside) and its payload where the frame goes on, when
    /// there is room; else at the start of the next free slot. Call when not full, and give
    /// the landing back ([`Coalescer::land`] or [`Coalescer::abandon`]) before anything else.
    pub fn landing(&mut self, max_len: usize) -> Landing {
        debug_assert!(!self.is_full());
        let mut l = Landing {
            at: self.slot_start(self.frames.len()),
            onto: None,
            covered: [0; MAX_COVERED],
            covered_len: 0,
        };
        if let Some(i) = self.frames.len().checked_sub(1) {
            let f = self.frames[i];
            let at = self.slot_start(i) + f.len - f.hlen;
            // The covered bytes must not reach the frame's own header (compared on landing).
            if f.open
                && f.count > 0
                && f.len >= 2 * f.hlen
                && f.hlen <= MAX_COVERED
                && at + max_len <= (i + 1) * SLOT
            {
                l.covered[..f.hlen].copy_from_slice(&self.buf[at..at + f.hlen]);
                l.covered_len = f.hlen;
                l.at = at;
                l.onto = Some(i);
            }
        }
        l
    }

    /// The bytes a packet may be decrypted into at `l` (to the end of its slot: at least the
    /// `max_len` the landing was asked for, and at least 65535 bytes at a free slot's start).
    pub fn landing_buf(&mut self, l: &Landing) -> &mut [u8] {
        let end = (l.at / SLOT + 1) * SLOT;
        &mut self.buf[l.at..end]
    }

    /// The packet of `len` bytes decrypted at `l` goes to destination `tag`: where it landed
    /// if it continues that frame (nothing copied), else moved as [`Coalescer::push_tagged`]
    /// would place it, and the covered bytes put back.
    pub fn land(&mut self, l: Landing, len: usize, tag: u32) {
        let pkt = l.at..l.at + len;
        let Some(i) = l.onto else {
            return self.settle(len, tag);
        };
        if let Some(c) = self.candidate(&self.buf[pkt.clone()]) {
            let f = self.frames[i];
            let head = self.slot_start(i);
            let head = &self.buf[head..head + f.hlen];
            if f.tag == tag
                && c.hlen == f.hlen
                && same_flow(head, &self.buf[pkt.clone()], &f, &c)
                && self.can_append(i, &c)
            {
                // Its payload is where frame i goes on; its header covered the frame's tail.
                self.uncover(&l);
                self.appended(i, &c);
                return;
            }
        }
        let to = self.slot_start(self.frames.len());
        self.buf.copy_within(pkt, to);
        self.uncover(&l);
        self.settle(len, tag);
    }

    /// Gives back a landing whose packet is not delivered (dropped, or a reply).
    pub fn abandon(&mut self, l: Landing) {
        self.uncover(&l);
    }

    fn uncover(&mut self, l: &Landing) {
        self.buf[l.at..l.at + l.covered_len].copy_from_slice(&l.covered[..l.covered_len]);
    }

    /// The packet of `len` bytes at the start of the next free slot: merged into the frame it
    /// continues (its payload copied there), or a frame of its own where it is.
    fn settle(&mut self, len: usize, tag: u32) {
        if len > MAX_MERGED {
            return;
        }
        let start = self.slot_start(self.frames.len());
        let pkt = start..start + len;
        let cand = self.candidate(&self.buf[pkt.clone()]);
        if let Some(c) = cand {
            match self.find(&self.buf[pkt.clone()], &c, tag) {
                Found::Append(i) => {
                    let at = self.end_of(i);
                    self.buf.copy_within(start + c.hlen..pkt.end, at);
                    self.appended(i, &c);
                    return;
                }
                Found::Close(i) => self.frames[i].open = false,
                Found::Nothing => {}
            }
        }
        self.new_frame(len, tag, cand);
    }

    /// Start of frame `i`'s packet in `buf`.
    fn slot_start(&self, i: usize) -> usize {
        i * SLOT + self.hdr_room
    }

    /// Where frame `i` goes on.
    fn end_of(&self, i: usize) -> usize {
        self.slot_start(i) + self.frames[i].len
    }

    fn candidate(&self, pkt: &[u8]) -> Option<Candidate> {
        if self.enabled {
            candidate(pkt, self.udp)
        } else {
            None
        }
    }

    /// The recent open frame of `tag` of the same flow as `pkt`, if any, and whether `pkt`
    /// continues it.
    fn find(&self, pkt: &[u8], c: &Candidate, tag: u32) -> Found {
        let n = self.frames.len();
        for i in (n.saturating_sub(SEARCH_DEPTH)..n).rev() {
            let f = &self.frames[i];
            if !f.open || f.tag != tag {
                continue;
            }
            let start = self.slot_start(i);
            if !same_flow(&self.buf[start..start + f.hlen], pkt, f, c) {
                continue;
            }
            if self.can_append(i, c) {
                return Found::Append(i);
            }
            // Same flow but not contiguous: stop extending the old frame, keep order.
            return Found::Close(i);
        }
        Found::Nothing
    }

    /// Frame `i` took `c`'s payload at its end.
    fn appended(&mut self, i: usize, c: &Candidate) {
        let start = self.slot_start(i);
        let f = &mut self.frames[i];
        f.len += c.payload;
        f.count += 1;
        f.next_seq = c.seq.wrapping_add(c.payload as u32);
        if c.payload < f.mss || c.flags & TCP_PSH != 0 || (c.udp && f.count == MAX_UDP_SEGMENTS) {
            f.open = false;
        }
        if c.flags & TCP_PSH != 0 {
            self.buf[start + f.l4 + 13] |= TCP_PSH;
        }
    }

    /// A frame of its own for the packet of `len` bytes at the next free slot's start.
    fn new_frame(&mut self, len: usize, tag: u32, cand: Option<Candidate>) {
        let f = match cand {
            Some(c) => Frame {
                tag,
                len,
                open: c.flags & TCP_PSH == 0,
                v6: c.v6,
                udp: c.udp,
                l4: c.l4,
                hlen: c.hlen,
                mss: c.payload,
                count: 1,
                next_seq: c.seq.wrapping_add(c.payload as u32),
            },
            None => Frame {
                len,
                tag,
                ..Frame::default()
            },
        };
        self.frames.push(f);
    }

    /// Whether `pkt` continues frame `i`. The segments' own checksums are not verified: every
    /// packet pushed here was decrypted, so the AEAD tag already proved it is what the peer
    /// sent, and a checksum guards only against damage in transit (kernel WireGuard marks its
    /// decrypted packets checksum-valid for the same reason). The merged frame's checksum is
    /// left partial for the kernel to trust.
    fn can_append(&self, i: usize, c: &Candidate) -> bool {
        let f = &self.frames[i];
        (c.udp || c.seq == f.next_seq) && c.payload <= f.mss && f.len + c.payload <= MAX_MERGED
    }

    /// Finishes every frame (headers, lengths, checksums) and hands each to `write` as
    /// header + packet (or packet alone without header room). Then empties the coalescer.
    pub fn drain<F: FnMut(&[u8])>(&mut self, mut write: F) {
        self.drain_tagged(|_, f| write(f))
    }

    /// Like [`Coalescer::drain`], with each frame's tag.
    pub fn drain_tagged<F: FnMut(u32, &[u8])>(&mut self, mut write: F) {
        for (i, f) in self.frames.iter().enumerate() {
            let slot = &mut self.buf[i * SLOT..i * SLOT + self.hdr_room + f.len];
            if self.hdr_room > 0 {
                let (h, pkt) = slot.split_at_mut(VNET_HDR_LEN);
                let vh = if f.count > 1 {
                    finish_merged(pkt, f)
                } else {
                    VnetHdr::default()
                };
                vh.encode(h.try_into().expect("header room"));
            }
            write(f.tag, slot);
        }
        self.frames.clear();
    }
}

/// A TCP data segment or UDP datagram that may merge, with its parsed fields (UDP: `seq`
/// and `flags` zero).
#[derive(Clone, Copy)]
struct Candidate {
    v6: bool,
    udp: bool,
    l4: usize,
    hlen: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

fn candidate(p: &[u8], udp: bool) -> Option<Candidate> {
    let (v6, l4, proto) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            // No options, not a fragment (MF clear, offset zero), length exact.
            if p[0] != 0x45 || (u16::from_be_bytes([p[6], p[7]]) & 0x3fff) != 0 {
                return None;
            }
            if u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
                return None;
            }
            (false, 20, p[9])
        }
        6 if p.len() >= 40 => {
            if u16::from_be_bytes([p[4], p[5]]) as usize + 40 != p.len() {
                return None;
            }
            (true, 40, p[6])
        }
        _ => return None,
    };
    match proto {
        PROTO_TCP => {}
        PROTO_UDP if udp => return udp_candidate(p, v6, l4),
        _ => return None,
    }
    if p.len() < l4 + 20 {
        return None;
    }
    let thl = (p[l4 + 12] >> 4) as usize * 4;
    let hlen = l4 + thl;
    if thl < 20 || hlen >= p.len() {
        return None; // no payload: pure ACKs pass as they are
    }
    let flags = p[l4 + 13];
    if flags & !TCP_PSH != TCP_ACK {
        return None; // SYN, FIN, RST, URG, ECE, CWR end merging
    }
    let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
    Some(Candidate {
        v6,
        udp: false,
        l4,
        hlen,
        payload: p.len() - hlen,
        seq,
        flags,
    })
}

/// A UDP datagram with a payload, its length exact and (IPv4) a checksum: a zero one means
/// none, which a merged frame could not keep.
fn udp_candidate(p: &[u8], v6: bool, l4: usize) -> Option<Candidate> {
    let hlen = l4 + 8;
    if p.len() <= hlen || u16::from_be_bytes([p[l4 + 4], p[l4 + 5]]) as usize != p.len() - l4 {
        return None;
    }
    if !v6 && p[l4 + 6] == 0 && p[l4 + 7] == 0 {
        return None;
    }
    Some(Candidate {
        v6,
        udp: true,
        l4,
        hlen,
        payload: p.len() - hlen,
        seq: 0,
        flags: 0,
    })
}

/// Same addresses, ports, IP fields that GRO keeps, and for TCP ack, window and options.
fn same_flow(head: &[u8], p: &[u8], f: &Frame, c: &Candidate) -> bool {
    if f.v6 != c.v6 || f.udp != c.udp || f.hlen != c.hlen || head.len() < c.hlen {
        return false;
    }
    let l4 = c.l4;
    let ip_same = if c.v6 {
        // version/traffic class/flow label, next header, hop limit, addresses
        head[0..4] == p[0..4] && head[6..40] == p[6..40]
    } else {
        // TOS, DF, TTL, protocol, addresses
        head[1] == p[1] && head[6] == p[6] && head[8..10] == p[8..10] && head[12..20] == p[12..20]
    };
    if c.udp {
        return ip_same && head[l4..l4 + 4] == p[l4..l4 + 4]; // ports
    }
    ip_same
        && head[l4..l4 + 4] == p[l4..l4 + 4] // ports
        && head[l4 + 8..l4 + 13] == p[l4 + 8..l4 + 13] // ack, data offset
        && head[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16] // window
        && head[l4 + 20..c.hlen] == p[l4 + 20..c.hlen] // options
}

/// Writes lengths and the partial checksum of a merged segment; returns its header.
fn finish_merged(pkt: &mut [u8], f: &Frame) -> VnetHdr {
    let len = f.len;
    let l4 = f.l4;
    let (s, d) = if f.v6 {
        (8..24, 24..40)
    } else {
        (12..16, 16..20)
    };
    if f.v6 {
        pkt[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        set_ipv4_header(&mut pkt[..20]);
    }
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not complemented. For
    // UDP the kernel derives each datagram's length and checksum from the whole's.
    let (proto, field, gso_type) = match (f.udp, f.v6) {
        (true, _) => (PROTO_UDP, 6, GSO_UDP_L4),
        (false, false) => (PROTO_TCP, 16, GSO_TCPV4),
        (false, true) => (PROTO_TCP, 16, GSO_TCPV6),
    };
    if f.udp {
        pkt[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
    }
    let ph = fold(pseudo_header(&pkt[s], &pkt[d], proto, (len - l4) as u32));
    pkt[l4 + field..l4 + field + 2].copy_from_slice(&ph.to_be_bytes());
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: f.hlen as u16,
        gso_size: f.mss as u16,
        csum_start: l4 as u16,
        csum_offset: field as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::checksum::sum;
    use crate::offload::tso::{self, tests::tcp_packet, tests::udp_packet};

    fn frames(c: &mut Coalescer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        c.drain(|f| out.push(f.to_vec()));
        out
    }

    #[test]
    fn merges_contiguous_segments_and_tso_splits_them_back() {
        for v6 in [false, true] {
            let mut c = Coalescer::new(8, true);
            let data: Vec<u8> = (0..4000u32).map(|i| (i * 13) as u8).collect();
            let mut seq = 5000u32;
            let mut originals = Vec::new();
            for (i, chunk) in data.chunks(1400).enumerate() {
                let flags = if i == 2 { TCP_ACK | TCP_PSH } else { TCP_ACK };
                let p = tcp_packet(v6, seq, flags, chunk);
                seq += chunk.len() as u32;
                c.push(&p);
                originals.push(p);
            }
            let mut out = frames(&mut c);
            assert_eq!(out.len(), 1, "one merged frame");
            let h = VnetHdr::decode(out[0][..VNET_HDR_LEN].try_into().unwrap());
            assert_eq!(h.gso_size, 1400);
            assert_eq!(h.flags, F_NEEDS_CSUM);
            // What the kernel would do with it: split again; the packets must equal the originals
            // (IPv4 ids aside, which the merged frame does not keep).
            let mut scratch = vec![0u8; 65536];
            let mut again = Vec::new();
            tso::split(&mut out[0], &mut scratch, |p| again.push(p.to_vec())).unwrap();
            assert_eq!(again.len(), originals.len());
            for (a, o) in again.iter().zip(&originals) {
                if v6 {
                    assert_eq!(a, o);
                } else {
                    assert_eq!(a[20..], o[20..]);
                    assert!(tso::tests::tcp_checksum_valid(a));
                }
            }
        }
    }

    #[test]
    fn keeps_apart_what_must_not_merge() {
        let mut c = Coalescer::new(16, true);
        let a = tcp_packet(false, 100, TCP_ACK, &[1; 100]);
        let gap = tcp_packet(false, 300, TCP_ACK, &[2; 100]); // not contiguous
        let syn = tcp_packet(false, 400, 0x02, &[3; 10]);
        let pure_ack = tcp_packet(false, 400, TCP_ACK, &[]);
        for p in [&a, &gap, &syn, &pure_ack] {
            c.push(p);
        }
        let out = frames(&mut c);
        assert_eq!(out.len(), 4);
        for (f, p) in out.iter().zip([&a, &gap, &syn, &pure_ack]) {
            assert_eq!(&f[VNET_HDR_LEN..], &p[..]);
            assert_eq!(&f[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        }
    }

    /// Decrypted segments are what the peer sent (the AEAD proved it): their checksums are
    /// not verified again, and the merged frame carries a partial checksum the kernel trusts,
    /// as kernel WireGuard marks its decrypted packets checksum-valid.
    #[test]
    fn trusts_the_checksums_of_decrypted_segments() {
        let mut c = Coalescer::new(4, true);
        let a = tcp_packet(false, 100, TCP_ACK, &[1; 100]);
        let mut b = tcp_packet(false, 200, TCP_ACK, &[2; 100]);
        b[45] ^= 0xff; // checksum no longer matches
        c.push(&a);
        c.push(&b);
        let out = frames(&mut c);
        assert_eq!(out.len(), 1, "merged without re-verifying");
        let h = VnetHdr::decode(out[0][..VNET_HDR_LEN].try_into().unwrap());
        assert_eq!((h.flags, h.gso_type), (F_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!(&out[0][VNET_HDR_LEN + 40 + 100..], &b[40..]);
    }

    #[test]
    fn merges_udp_datagrams_where_the_tun_takes_uso() {
        use crate::offload::tso::tests::{udp_checksum_valid, udp_packet};
        for v6 in [false, true] {
            let mut c = Coalescer::new(8, true).with_udp(true);
            let sizes = [1200, 1200, 1200, 700, 1200];
            let originals: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| udp_packet(v6, &vec![i as u8; n]))
                .collect();
            for p in &originals {
                c.push(p);
            }
            let mut out = frames(&mut c);
            // The shorter datagram ends the first super-packet; the next starts another.
            assert_eq!(out.len(), 2);
            let h = VnetHdr::decode(out[0][..VNET_HDR_LEN].try_into().unwrap());
            assert_eq!(
                (h.flags, h.gso_type, h.gso_size, h.csum_offset),
                (F_NEEDS_CSUM, GSO_UDP_L4, 1200, 6)
            );
            assert_eq!(
                &out[1][VNET_HDR_LEN..],
                &originals[4][..],
                "alone: as it came"
            );
            // What the kernel does with it: the same datagrams again.
            let mut scratch = vec![0u8; 65536];
            let mut again = Vec::new();
            tso::split(&mut out[0], &mut scratch, |p| again.push(p.to_vec())).unwrap();
            assert_eq!(again.len(), 4);
            for (a, o) in again.iter().zip(&originals) {
                assert!(udp_checksum_valid(a));
                let from = if v6 { 0 } else { 20 }; // IPv4 ids aside
                assert_eq!(a[from..], o[from..]);
            }
        }
    }

    #[test]
    fn udp_datagrams_stay_apart_without_uso_or_a_checksum() {
        use crate::offload::tso::tests::udp_packet;
        let a = udp_packet(false, &[1; 500]);
        let mut c = Coalescer::new(4, true);
        c.push(&a);
        c.push(&a);
        assert_eq!(frames(&mut c).len(), 2, "the tun does not take USO");
        let mut no_sum = a.clone();
        no_sum[26..28].copy_from_slice(&[0, 0]);
        let mut c = Coalescer::new(4, true).with_udp(true);
        c.push(&no_sum);
        c.push(&no_sum);
        let out = frames(&mut c);
        assert_eq!(out.len(), 2, "IPv4 without a checksum");
        assert_eq!(&out[0][VNET_HDR_LEN..], &no_sum[..]);
    }

    #[test]
    fn without_vnet_header_frames_are_plain_packets() {
        let mut c = Coalescer::new(4, false);
        let a = tcp_packet(false, 100, TCP_ACK, &[1; 100]);
        let b = tcp_packet(false, 200, TCP_ACK, &[1; 100]);
        c.push(&a);
        c.push(&b);
        assert_eq!(frames(&mut c), vec![a, b]);
    }

    #[test]
    fn interleaved_flows_keep_per_flow_order() {
        let mut c = Coalescer::new(8, true);
        let a1 = tcp_packet(false, 0, TCP_ACK, &[1; 500]);
        let mut b1 = tcp_packet(false, 0, TCP_ACK, &[2; 500]);
        // another flow: different source port
        b1[20] = 1;
        let b1 = {
            let mut p = b1;
            p[36] = 0;
            p[37] = 0;
            let ph = pseudo_header(&p[12..16], &p[16..20], 6, (p.len() - 20) as u32);
            let cs = !fold(sum(ph, &p[20..]));
            p[36..38].copy_from_slice(&cs.to_be_bytes());
            p
        };
        let a2 = tcp_packet(false, 500, TCP_ACK, &[1; 500]);
        for p in [&a1, &b1, &a2] {
            c.push(p);
        }
        let out = frames(&mut c);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), VNET_HDR_LEN + 40 + 1000);
        assert_eq!(&out[1][VNET_HDR_LEN..], &b1[..]);
    }

    /// Packets decrypted straight into the coalescer ([`Coalescer::landing`], then `land` or
    /// `abandon`) come out exactly as the same packets pushed ([`Coalescer::push_tagged`]):
    /// several flows interleaved (some with a gap), other tags, packets that do not merge,
    /// replies abandoned in between, frames filled up to the largest merge, with and without
    /// virtio-net headers and UDP merging.
    #[test]
    fn packets_landed_in_place_come_out_as_packets_pushed() {
        let mut next = crate::testing::xorshift(0x2545_f491_4f6c_dd1d);
        for (vnet, uso) in [(true, false), (true, true), (false, false)] {
            for _ in 0..40 {
                let mut pushed = Coalescer::new(16, vnet).with_udp(uso);
                let mut landed = Coalescer::new(16, vnet).with_udp(uso);
                let mut seqs = [1000u32; 3];
                let (mut out_p, mut out_l) = (Vec::new(), Vec::new());
                for _ in 0..400 {
                    let flow = next(3) as usize;
                    let len = [1368, 1368, 1368, 700, 0][next(5) as usize];
                    let payload: Vec<u8> = (0..len).map(|_| next(256) as u8).collect();
                    let mut p = match next(12) {
                        0 => udp_packet(flow == 1, &payload),
                        1 => tcp_packet(false, seqs[flow] + 7, TCP_ACK, &payload), // a gap
                        2 => tcp_packet(false, seqs[flow], TCP_ACK | TCP_PSH, &payload),
                        _ => tcp_packet(flow == 2, seqs[flow], TCP_ACK, &payload),
                    };
                    if p[0] >> 4 == 4 && p[9] == PROTO_TCP {
                        p[21] = flow as u8; // source port: the flow (checksums are not checked)
                    }
                    seqs[flow] = seqs[flow].wrapping_add(len as u32);
                    let tag = if next(10) == 0 { 7 } else { HOST };
                    if pushed.is_full() {
                        pushed.drain_tagged(|t, f| out_p.push((t, f.to_vec())));
                        landed.drain_tagged(|t, f| out_l.push((t, f.to_vec())));
                    }
                    let l = landed.landing(p.len() + 32);
                    let room = landed.landing_buf(&l);
                    assert!(room.len() >= p.len() + 32);
                    room[..p.len()].copy_from_slice(&p);
                    if next(8) == 0 {
                        landed.abandon(l); // a reply, a drop: nothing delivered
                        continue;
                    }
                    landed.land(l, p.len(), tag);
                    pushed.push_tagged(&p, tag);
                }
                pushed.drain_tagged(|t, f| out_p.push((t, f.to_vec())));
                landed.drain_tagged(|t, f| out_l.push((t, f.to_vec())));
                assert!(out_p.len() < 400 || !vnet, "some packets merged");
                assert_eq!(out_p.len(), out_l.len());
                for (a, b) in out_p.iter().zip(&out_l) {
                    assert!(a == b, "frames differ");
                }
            }
        }
    }

    /// A packet that continues the newest frame is decrypted where that frame goes on (its
    /// header over the frame's last bytes), so landing it copies nothing; one that starts a
    /// frame is decrypted at the next free slot, where it stays.
    #[test]
    fn a_continuation_lands_where_its_frame_goes_on() {
        let mut c = Coalescer::new(4, true);
        let a = tcp_packet(false, 100, TCP_ACK, &[1; 1000]);
        let b = tcp_packet(false, 1100, TCP_ACK, &[2; 1000]);
        let l = c.landing(a.len() + 32);
        assert_eq!((l.onto, l.at), (None, c.slot_start(0)));
        c.landing_buf(&l)[..a.len()].copy_from_slice(&a);
        c.land(l, a.len(), 0);
        let l = c.landing(b.len() + 32);
        assert_eq!((l.onto, l.at), (Some(0), c.end_of(0) - 40));
        c.landing_buf(&l)[..b.len()].copy_from_slice(&b);
        c.land(l, b.len(), 0);
        assert_eq!((c.frames.len(), c.frames[0].count), (1, 2));
        // Ciphertext longer than the slot has room for past the frame: the next free slot.
        let l = c.landing(SLOT);
        assert_eq!((l.onto, l.at), (None, c.slot_start(1)));
        c.abandon(l);
        let out = frames(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), VNET_HDR_LEN + 40 + 2000);
        assert_eq!(&out[0][VNET_HDR_LEN + 40..VNET_HDR_LEN + 1040], &[1; 1000]);
        assert_eq!(&out[0][VNET_HDR_LEN + 1040..], &[2; 1000]);
    }

    const HOST: u32 = u32::MAX;
}
