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

/// Slot size: header room plus the largest packet.
const SLOT: usize = VNET_HDR_LEN + MAX_MERGED;

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
        let cand = if self.enabled {
            candidate(pkt, self.udp)
        } else {
            None
        };
        if let Some(c) = cand {
            let n = self.frames.len();
            for i in (n.saturating_sub(SEARCH_DEPTH)..n).rev() {
                if !self.frames[i].open || self.frames[i].tag != tag {
                    continue;
                }
                let start = i * SLOT + self.hdr_room;
                let f = self.frames[i];
                let head = &self.buf[start..start + f.hlen];
                if !same_flow(head, pkt, &f, &c) {
                    continue;
                }
                if self.can_append(i, &c) {
                    let at = start + f.len;
                    self.buf[at..at + c.payload].copy_from_slice(&pkt[c.hlen..]);
                    let f = &mut self.frames[i];
                    f.len += c.payload;
                    f.count += 1;
                    f.next_seq = c.seq.wrapping_add(c.payload as u32);
                    if c.payload < f.mss
                        || c.flags & TCP_PSH != 0
                        || (c.udp && f.count == MAX_UDP_SEGMENTS)
                    {
                        f.open = false;
                    }
                    if c.flags & TCP_PSH != 0 {
                        self.buf[start + f.l4 + 13] |= TCP_PSH;
                    }
                    return;
                }
                // Same flow but not contiguous: stop extending the old frame, keep order.
                self.frames[i].open = false;
                break;
            }
        }
        let i = self.frames.len();
        let start = i * SLOT + self.hdr_room;
        self.buf[start..start + pkt.len()].copy_from_slice(pkt);
        let mut f = Frame {
            len: pkt.len(),
            tag,
            ..Frame::default()
        };
        if let Some(c) = cand {
            f = Frame {
                tag,
                len: pkt.len(),
                open: c.flags & TCP_PSH == 0,
                v6: c.v6,
                udp: c.udp,
                l4: c.l4,
                hlen: c.hlen,
                mss: c.payload,
                count: 1,
                next_seq: c.seq.wrapping_add(c.payload as u32),
            };
        }
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
    use crate::offload::tso::{self, tests::tcp_packet};

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
}
