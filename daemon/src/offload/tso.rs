//! Splitting what the tun hands us into wire-sized packets: a TCP segment of up to 64 KB with
//! `gso_size` becomes MSS-sized packets with their own headers and checksums, a UDP
//! super-packet (an application's `UDP_SEGMENT` send, USO) its `gso_size` datagrams; a single
//! packet whose checksum the kernel left partial gets it completed.

use super::checksum::{fold, pseudo_header, set_ipv4_header, sum};
use super::{
    OffloadError, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
    VNET_HDR_LEN,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;

/// Calls `emit` with each packet carried by `frame` (virtio-net header + packet). `scratch`
/// must hold one packet of the largest segment (64 KiB is always enough).
pub fn split<F: FnMut(&[u8])>(
    frame: &mut [u8],
    scratch: &mut [u8],
    emit: F,
) -> Result<(), OffloadError> {
    split_capped(frame, scratch, usize::MAX, emit)
}

/// Like [`split`], with TCP segments cut so that no packet exceeds `max_packet` bytes (a
/// smaller MSS is always valid TCP), for a path narrower than the sender's MTU.
pub fn split_capped<F: FnMut(&[u8])>(
    frame: &mut [u8],
    scratch: &mut [u8],
    max_packet: usize,
    mut emit: F,
) -> Result<(), OffloadError> {
    let mut s = Segments::new(frame, scratch, max_packet)?;
    if let Shape::Tcp(t) = &s.shape {
        // All at once: one loop over the cuts, no per-packet dispatch on the shape.
        for i in 0..t.count {
            emit(t.segment(&mut *s.pkt, &mut *s.scratch, i));
        }
        return Ok(());
    }
    while let Some(p) = s.next_packet() {
        emit(p?);
    }
    Ok(())
}

/// The packet of a frame that is one complete packet as it stands: the whole frame when the
/// tun has no virtio-net header, else what follows a header that asks for neither
/// segmentation nor a checksum. `None`: the frame needs [`Segments`].
#[inline]
pub fn whole_packet(frame: &mut [u8], vnet: bool) -> Option<&mut [u8]> {
    if !vnet {
        return Some(frame);
    }
    let whole = frame.len() >= VNET_HDR_LEN
        && frame[0] & F_NEEDS_CSUM == 0
        && frame[1] & !GSO_ECN == GSO_NONE;
    whole.then(|| &mut frame[VNET_HDR_LEN..])
}

/// The packets one tun frame carries, produced one at a time, in order: a TSO segment (or UDP
/// super-packet) becomes MSS-sized packets, each but the first built where its payload lies in
/// the frame, with a copy of the headers written over the end of the previous packet's payload
/// (already taken), so no payload is copied; the first is built in `scratch`, so the frame's
/// own headers stay as they came. A single packet is handed out in place (its partial checksum
/// completed first). The caller may stop after any packet and, with a new `Segments` over
/// the same frame, [`Segments::skip`] what it already took: the packets still to come and the
/// frame's headers are unchanged until the packet that needs them is produced.
pub struct Segments<'f, 's> {
    pkt: &'f mut [u8],
    scratch: &'s mut [u8],
    shape: Shape,
    next: usize,
}

enum Shape {
    /// One packet; `csum`: where its partial checksum starts and where the field is.
    Single {
        csum: Option<(usize, usize)>,
    },
    Tcp(Tcp),
    Udp(Udp),
}

/// A UDP super-packet's layout: `count` datagrams of `size` payload bytes (the last may be
/// shorter), each with a copy of the headers.
struct Udp {
    v6: bool,
    l4: usize,
    size: usize,
    count: usize,
    id0: u16,
}

/// A TCP segment's layout and how it is cut.
struct Tcp {
    v6: bool,
    l4: usize,
    hlen: usize,
    mss: usize,
    count: usize,
    seq0: u32,
    id0: u16,
}

impl<'f, 's> Segments<'f, 's> {
    /// The packets of `frame` (virtio-net header + packet), TCP segments no larger than
    /// `max_packet`. Checks the header against the packet; `scratch` must hold the largest
    /// segment.
    pub fn new(
        frame: &'f mut [u8],
        scratch: &'s mut [u8],
        max_packet: usize,
    ) -> Result<Segments<'f, 's>, OffloadError> {
        if frame.len() < VNET_HDR_LEN {
            return Err(OffloadError::Malformed);
        }
        let (h, pkt) = frame.split_at_mut(VNET_HDR_LEN);
        let hdr = VnetHdr::decode(&(&*h).try_into().expect("split at header length"));
        let shape = match hdr.gso_type & !GSO_ECN {
            GSO_NONE => Shape::Single {
                csum: (hdr.flags & F_NEEDS_CSUM != 0)
                    .then_some((hdr.csum_start as usize, hdr.csum_offset as usize)),
            },
            GSO_TCPV4 | GSO_TCPV6 => Shape::Tcp(Tcp::layout(pkt, &hdr, scratch.len(), max_packet)?),
            GSO_UDP_L4 => Shape::Udp(Udp::layout(pkt, &hdr, scratch.len(), max_packet)?),
            _ => return Err(OffloadError::Unsupported),
        };
        Ok(Segments {
            pkt,
            scratch,
            shape,
            next: 0,
        })
    }

    /// How many packets the frame carries.
    #[inline]
    pub fn count(&self) -> usize {
        match &self.shape {
            Shape::Single { .. } => 1,
            Shape::Tcp(t) => t.count,
            Shape::Udp(u) => u.count,
        }
    }

    /// The largest packet any of them is (the room to ask for before taking the next).
    #[inline]
    pub fn max_len(&self) -> usize {
        match &self.shape {
            Shape::Single { .. } => self.pkt.len(),
            Shape::Tcp(t) => (t.hlen + t.mss).min(self.pkt.len()),
            Shape::Udp(u) => (u.l4 + UDP_HLEN + u.size).min(self.pkt.len()),
        }
    }

    /// Index of the packet [`Segments::next_packet`] produces next.
    #[inline]
    pub fn position(&self) -> usize {
        self.next
    }

    /// Passes over the first `n` packets without producing them.
    #[inline]
    pub fn skip(&mut self, n: usize) {
        self.next = n.min(self.count());
    }

    /// The next packet, or `None` after the last.
    #[inline]
    pub fn next_packet(&mut self) -> Option<Result<&[u8], OffloadError>> {
        let i = self.next;
        if i >= self.count() {
            return None;
        }
        self.next += 1;
        match &self.shape {
            Shape::Single { csum: None } => Some(Ok(&*self.pkt)),
            Shape::Single {
                csum: Some((start, offset)),
            } => Some(complete_checksum(self.pkt, *start, *offset).map(|()| &*self.pkt)),
            Shape::Tcp(t) => Some(Ok(t.segment(&mut *self.pkt, &mut *self.scratch, i))),
            Shape::Udp(u) => Some(Ok(u.datagram(&mut *self.pkt, &mut *self.scratch, i))),
        }
    }
}

/// Completes a partial checksum: the field already holds the pseudo-header sum.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start.checked_add(offset).ok_or(OffloadError::Malformed)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return Err(OffloadError::Malformed);
    }
    let mut c = !fold(sum(0, &pkt[start..]));
    if c == 0 && offset == 6 {
        c = 0xffff; // UDP sends a zero checksum as all ones (RFC 768).
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

impl Tcp {
    /// Checks the headers the virtio-net header describes and works out the cut.
    fn layout(
        pkt: &[u8],
        hdr: &VnetHdr,
        scratch_len: usize,
        max_packet: usize,
    ) -> Result<Tcp, OffloadError> {
        let v6 = match pkt.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Err(OffloadError::Malformed),
        };
        let l4 = hdr.csum_start as usize;
        let min_l3 = if v6 { 40 } else { 20 };
        if l4 < min_l3 || l4 + 20 > pkt.len() {
            return Err(OffloadError::Malformed);
        }
        if !v6 && (pkt[0] & 0x0f) as usize * 4 != l4 {
            return Err(OffloadError::Malformed);
        }
        let thl = (pkt[l4 + 12] >> 4) as usize * 4;
        let hlen = l4 + thl;
        if thl < 20 || hlen > pkt.len() {
            return Err(OffloadError::Malformed);
        }
        let mss = (hdr.gso_size as usize).min(max_packet.saturating_sub(hlen));
        if mss == 0 || hlen + mss > scratch_len {
            return Err(OffloadError::Malformed);
        }
        Ok(Tcp {
            v6,
            l4,
            hlen,
            mss,
            count: (pkt.len() - hlen).div_ceil(mss).max(1),
            seq0: u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]),
            id0: u16::from_be_bytes([pkt[4], pkt[5]]),
        })
    }

    /// Builds packet `i` ([`cut`]: in the frame, or in `scratch`): the headers, the `i`th MSS
    /// of payload, lengths, sequence number, flags and checksums fixed.
    #[inline(always)]
    fn segment<'a>(&self, pkt: &'a mut [u8], scratch: &'a mut [u8], i: usize) -> &'a [u8] {
        let Tcp {
            v6,
            l4,
            hlen,
            mss,
            count,
            ..
        } = *self;
        let seg = cut(pkt, scratch, hlen, mss, i, l4, self.id0);
        let len = seg.len();
        let seq = self.seq0.wrapping_add((i * mss) as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let flags = &mut seg[l4 + 13];
        if i + 1 < count {
            *flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            *flags &= !TCP_CWR;
        }
        seg[l4 + 16] = 0;
        seg[l4 + 17] = 0;
        let (src, dst) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let ph = pseudo_header(&seg[src], &seg[dst], PROTO_TCP, (len - l4) as u32);
        let c = !fold(sum(ph, &seg[l4..]));
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        seg
    }
}

/// Packet `i` of a super-packet cut into `size`-byte payloads: the `hlen` bytes of headers,
/// its payload, the IP length (and IPv4 id, `id0 + i`, and header checksum) fixed; the L4
/// header is the caller's to finish. Packet 0 is built in `scratch`; packet `i > 0` in the
/// frame itself, the headers copied over the last `hlen` bytes of packet `i - 1`'s payload
/// (which the caller has taken: packets go in order), right before its own payload, which is
/// not moved. The frame's own headers (`pkt[..hlen]`) are never written, so a later packet
/// can always be built from them. A payload shorter than the headers is built in `scratch`.
#[inline(always)]
fn cut<'a>(
    pkt: &'a mut [u8],
    scratch: &'a mut [u8],
    hlen: usize,
    size: usize,
    i: usize,
    l4: usize,
    id0: u16,
) -> &'a mut [u8] {
    let payload_len = pkt.len() - hlen;
    let (from, to) = (
        (i * size).min(payload_len),
        ((i + 1) * size).min(payload_len),
    );
    let len = hlen + (to - from);
    let p = if i > 0 && size >= hlen {
        // `from` >= `size` >= `hlen`: the copy does not touch the frame's own headers.
        pkt.copy_within(..hlen, from);
        &mut pkt[from..from + len]
    } else {
        let p = &mut scratch[..len];
        p[..hlen].copy_from_slice(&pkt[..hlen]);
        p[hlen..].copy_from_slice(&pkt[hlen + from..hlen + to]);
        p
    };
    if p[0] >> 4 == 6 {
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        set_ipv4_header(&mut p[..l4]);
    }
    p
}

impl Udp {
    /// Checks the headers the virtio-net header describes. Datagram boundaries belong to the
    /// application: a size the path cannot carry is refused, never cut smaller.
    fn layout(
        pkt: &[u8],
        hdr: &VnetHdr,
        scratch_len: usize,
        max_packet: usize,
    ) -> Result<Udp, OffloadError> {
        let (v6, proto) = match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 => (false, pkt[9]),
            Some(6) if pkt.len() >= 40 => (true, pkt[6]),
            _ => return Err(OffloadError::Malformed),
        };
        let l4 = hdr.csum_start as usize;
        let hlen = l4 + UDP_HLEN;
        let l3_ok = if v6 {
            l4 == 40
        } else {
            (pkt[0] & 0x0f) as usize * 4 == l4
        };
        if proto != PROTO_UDP || !l3_ok || hlen > pkt.len() || hdr.csum_offset != 6 {
            return Err(OffloadError::Malformed);
        }
        let size = hdr.gso_size as usize;
        if size == 0 || hlen + size > scratch_len || hlen + size > max_packet {
            return Err(OffloadError::Malformed);
        }
        Ok(Udp {
            v6,
            l4,
            size,
            count: (pkt.len() - hlen).div_ceil(size).max(1),
            id0: u16::from_be_bytes([pkt[4], pkt[5]]),
        })
    }

    /// Builds datagram `i` ([`cut`]: in the frame, or in `scratch`): the headers, the `i`th
    /// `size` bytes of payload, lengths, IPv4 id and checksums.
    #[inline(always)]
    fn datagram<'a>(&self, pkt: &'a mut [u8], scratch: &'a mut [u8], i: usize) -> &'a [u8] {
        let Udp { v6, l4, size, .. } = *self;
        let d = cut(pkt, scratch, l4 + UDP_HLEN, size, i, l4, self.id0);
        let len = d.len();
        d[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
        d[l4 + 6] = 0;
        d[l4 + 7] = 0;
        let (src, dst) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let ph = pseudo_header(&d[src], &d[dst], PROTO_UDP, (len - l4) as u32);
        let mut c = !fold(sum(ph, &d[l4..]));
        if c == 0 {
            c = 0xffff; // RFC 768: a computed zero is sent as all ones
        }
        d[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        d
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::offload::checksum::ipv4_header_valid;

    /// Builds an IPv4 or IPv6 TCP packet with a valid checksum.
    pub fn tcp_packet(v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let l4 = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; l4 + 20 + payload.len()];
        let len = p.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 99, 0, 1]);
            p[16..20].copy_from_slice(&[10, 99, 0, 2]);
            set_ipv4_header(&mut p[..20]);
        }
        p[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[l4 + 2..l4 + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        p[l4 + 8..l4 + 12].copy_from_slice(&77u32.to_be_bytes());
        p[l4 + 12] = 5 << 4;
        p[l4 + 13] = flags;
        p[l4 + 14..l4 + 16].copy_from_slice(&512u16.to_be_bytes());
        p[l4 + 20..].copy_from_slice(payload);
        let (s, d) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let ph = pseudo_header(&p[s], &p[d], 6, (len - l4) as u32);
        let c = !fold(sum(ph, &p[l4..]));
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    pub fn tcp_checksum_valid(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let l4 = if v6 { 40 } else { (p[0] & 0xf) as usize * 4 };
        let (s, d) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let ph = pseudo_header(&p[s], &p[d], 6, (p.len() - l4) as u32);
        fold(sum(ph, &p[l4..])) == 0xffff
    }

    /// Builds an IPv4 or IPv6 UDP packet (10.99.0.1:40000 -> 10.99.0.2:5201, or the fd00:0:99::
    /// equivalents) with a valid checksum.
    pub fn udp_packet(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut p = tcp_packet(v6, 0, 0, &[]);
        let l4 = if v6 { 40 } else { 20 };
        p.truncate(l4 + UDP_HLEN);
        p.extend_from_slice(payload);
        let len = p.len();
        if v6 {
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = PROTO_UDP;
        } else {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[9] = PROTO_UDP;
            set_ipv4_header(&mut p[..20]);
        }
        p[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
        p[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
        let c = !fold(sum(udp_pseudo(&p, l4), &p[l4..]));
        p[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn udp_pseudo(p: &[u8], l4: usize) -> u64 {
        let (s, d) = if l4 == 40 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        pseudo_header(&p[s], &p[d], PROTO_UDP, (p.len() - l4) as u32)
    }

    pub fn udp_checksum_valid(p: &[u8]) -> bool {
        let l4 = if p[0] >> 4 == 6 { 40 } else { 20 };
        fold(sum(udp_pseudo(p, l4), &p[l4..])) == 0xffff
    }

    /// What the kernel hands over for an application's `UDP_SEGMENT` send (USO): one
    /// super-packet, `size` bytes of payload per datagram, UDP length and checksum partial.
    pub fn as_uso_frame(p: &[u8], size: u16) -> Vec<u8> {
        let l4 = if p[0] >> 4 == 6 { 40 } else { 20 };
        let mut f = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: (l4 + UDP_HLEN) as u16,
            gso_size: size,
            csum_start: l4 as u16,
            csum_offset: 6,
        }
        .encode((&mut f[..]).try_into().unwrap());
        f.extend_from_slice(p);
        let ph = fold(udp_pseudo(p, l4));
        f[VNET_HDR_LEN + l4 + 6..VNET_HDR_LEN + l4 + 8].copy_from_slice(&ph.to_be_bytes());
        f
    }

    #[test]
    fn splits_a_uso_super_packet_into_its_datagrams() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
            let mut frame = as_uso_frame(&udp_packet(v6, &payload), 1200);
            let mut scratch = vec![0u8; 65536];
            let mut out: Vec<Vec<u8>> = Vec::new();
            split(&mut frame, &mut scratch, |p| out.push(p.to_vec())).unwrap();
            let expected: Vec<Vec<u8>> = payload.chunks(1200).map(|c| udp_packet(v6, c)).collect();
            assert_eq!(out.len(), 3);
            for (i, (d, e)) in out.iter().zip(&expected).enumerate() {
                assert!(udp_checksum_valid(d), "datagram {i} checksum");
                if v6 {
                    assert_eq!(d, e);
                } else {
                    assert!(ipv4_header_valid(&d[..20]));
                    assert_eq!(u16::from_be_bytes([d[4], d[5]]), 0x1234 + i as u16);
                    assert_eq!(d[20..], e[20..]);
                }
            }
        }
    }

    #[test]
    fn refuses_uso_datagrams_the_path_cannot_carry() {
        let mut frame = as_uso_frame(&udp_packet(false, &[9; 3000]), 1400);
        let mut scratch = vec![0u8; 65536];
        // 1400 + 28 > 1420: datagram boundaries are the application's, never cut smaller.
        assert_eq!(
            split_capped(&mut frame, &mut scratch, 1420, |_| {}).unwrap_err(),
            OffloadError::Malformed
        );
        let mut out = 0;
        split_capped(&mut frame, &mut scratch, 1428, |_| out += 1).unwrap();
        assert_eq!(out, 3);
    }

    /// Turns a valid packet into what the kernel hands over with TSO: one super-packet whose
    /// checksum field holds only the pseudo-header sum.
    fn as_gso_frame(p: &[u8], mss: u16) -> Vec<u8> {
        let v6 = p[0] >> 4 == 6;
        let l4 = if v6 { 40 } else { 20 };
        let mut f = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (l4 + 20) as u16,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: 16,
        }
        .encode((&mut f[..]).try_into().unwrap());
        f.extend_from_slice(p);
        let (s, d) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let ph = fold(pseudo_header(&p[s], &p[d], 6, (p.len() - l4) as u32));
        f[VNET_HDR_LEN + l4 + 16..VNET_HDR_LEN + l4 + 18].copy_from_slice(&ph.to_be_bytes());
        f
    }

    #[test]
    fn splits_a_tso_segment_into_valid_packets() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            let big = tcp_packet(v6, 1000, 0x18 | TCP_FIN, &payload);
            let mut frame = as_gso_frame(&big, 1400);
            let mut scratch = vec![0u8; 65536];
            let mut out: Vec<Vec<u8>> = Vec::new();
            split(&mut frame, &mut scratch, |p| out.push(p.to_vec())).unwrap();
            assert_eq!(out.len(), 4);
            let mut joined = Vec::new();
            for (i, p) in out.iter().enumerate() {
                let l4 = if v6 { 40 } else { 20 };
                assert!(tcp_checksum_valid(p), "segment {i} checksum");
                if !v6 {
                    assert!(ipv4_header_valid(&p[..20]));
                    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
                    assert_eq!(u16::from_be_bytes([p[4], p[5]]), 0x1234 + i as u16);
                } else {
                    assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len() - 40);
                }
                let seq = u32::from_be_bytes(p[l4 + 4..l4 + 8].try_into().unwrap());
                assert_eq!(seq, 1000 + 1400 * i as u32);
                let last = i == 3;
                assert_eq!(
                    p[l4 + 13] & (TCP_FIN | TCP_PSH) != 0,
                    last,
                    "FIN/PSH only on the last"
                );
                joined.extend_from_slice(&p[l4 + 20..]);
            }
            assert_eq!(joined, payload);
        }
    }

    /// The packets of `frame`: the first `stop` from one `Segments`, the rest from a new one
    /// over the same frame that skips them.
    fn in_two_passes(frame: &mut [u8], scratch: &mut [u8], stop: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut s = Segments::new(frame, scratch, usize::MAX).unwrap();
        while s.position() < stop {
            got.push(s.next_packet().unwrap().unwrap().to_vec());
        }
        let mut s = Segments::new(frame, scratch, usize::MAX).unwrap();
        s.skip(stop);
        while let Some(p) = s.next_packet() {
            got.push(p.unwrap().to_vec());
        }
        got
    }

    /// Stopping after any packet and going on with a new `Segments` over the same frame
    /// yields the same packets as one pass.
    #[test]
    fn resumes_where_it_stopped() {
        let payload: Vec<u8> = (0..7000u32).map(|i| (i * 7) as u8).collect();
        let big = tcp_packet(false, 1, 0x18, &payload);
        let mut scratch = vec![0u8; 65536];
        let mut whole: Vec<Vec<u8>> = Vec::new();
        split(&mut as_gso_frame(&big, 1000), &mut scratch, |p| {
            whole.push(p.to_vec())
        })
        .unwrap();
        assert_eq!(whole.len(), 7);
        for stop in 0..=7 {
            let got = in_two_passes(&mut as_gso_frame(&big, 1000), &mut scratch, stop);
            assert_eq!(got, whole, "stopped after {stop}");
        }
        // A single packet's checksum is completed once, when it is taken.
        let p = tcp_packet(false, 1, 0x10, b"hello");
        let mut frame = as_gso_frame(&p, 1400);
        frame[1] = GSO_NONE;
        let untouched = frame.clone();
        let _ = Segments::new(&mut frame, &mut scratch, usize::MAX).unwrap();
        assert_eq!(frame, untouched);
    }

    /// Packets after the first are built in the frame, over the end of the previous one's
    /// payload; the frame's own headers stay as they came. A payload shorter than the headers
    /// (a tiny MSS) cannot take them and is built in scratch: the same packets either way.
    #[test]
    fn builds_in_the_frame_without_touching_its_headers() {
        for (v6, mss) in [(false, 1400), (true, 1400), (false, 16), (true, 24)] {
            let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
            let big = tcp_packet(v6, 7, 0x18, &payload);
            let mut frame = as_gso_frame(&big, mss);
            let hlen = VNET_HDR_LEN + if v6 { 60 } else { 40 };
            let headers = frame[..hlen].to_vec();
            let mut scratch = vec![0u8; 65536];
            let mut out: Vec<Vec<u8>> = Vec::new();
            split(&mut frame, &mut scratch, |p| out.push(p.to_vec())).unwrap();
            assert_eq!(frame[..hlen], headers[..], "v6 {v6} mss {mss}");
            assert_eq!(out.len(), payload.len().div_ceil(mss as usize));
            let l4 = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for (i, p) in out.iter().enumerate() {
                assert!(tcp_checksum_valid(p), "v6 {v6} mss {mss} segment {i}");
                let seq = u32::from_be_bytes(p[l4 + 4..l4 + 8].try_into().unwrap());
                assert_eq!(seq, 7 + mss as u32 * i as u32);
                joined.extend_from_slice(&p[l4 + 20..]);
            }
            assert_eq!(joined, payload);
        }
        // UDP super-packets alike, also resumed after each datagram.
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 3) as u8).collect();
        let expected: Vec<Vec<u8>> = payload.chunks(1000).map(|c| udp_packet(true, c)).collect();
        let mut scratch = vec![0u8; 65536];
        for stop in 0..=expected.len() {
            let mut frame = as_uso_frame(&udp_packet(true, &payload), 1000);
            let got = in_two_passes(&mut frame, &mut scratch, stop);
            assert_eq!(got, expected, "stopped after {stop}");
        }
    }

    #[test]
    fn completes_a_partial_checksum() {
        let p = tcp_packet(false, 1, 0x10, b"hello");
        let mut frame = as_gso_frame(&p, 1400);
        frame[1] = GSO_NONE;
        let mut scratch = vec![0u8; 2048];
        let mut got = None;
        split(&mut frame, &mut scratch, |q| got = Some(q.to_vec())).unwrap();
        assert_eq!(got.unwrap(), p);
    }

    /// Only a frame that is one finished packet skips the segment machinery.
    #[test]
    fn whole_packet_only_when_nothing_is_left_to_do() {
        let p = tcp_packet(false, 1, 0x10, b"hello");
        let mut plain = p.clone();
        assert_eq!(whole_packet(&mut plain, false).as_deref(), Some(&p[..]));
        let mut frame = as_gso_frame(&p, 1400);
        assert_eq!(whole_packet(&mut frame, true), None, "a TSO segment");
        frame[1] = GSO_NONE;
        assert_eq!(whole_packet(&mut frame, true), None, "a partial checksum");
        frame[0] = 0;
        let rest = frame[VNET_HDR_LEN..].to_vec();
        assert_eq!(whole_packet(&mut frame, true).as_deref(), Some(&rest[..]));
        frame[1] = GSO_NONE | GSO_ECN;
        assert_eq!(whole_packet(&mut frame, true).as_deref(), Some(&rest[..]));
        assert_eq!(
            whole_packet(&mut [0u8; 3], true),
            None,
            "shorter than the header"
        );
    }

    #[test]
    fn refuses_lies_without_panicking() {
        let mut scratch = vec![0u8; 2048];
        for bad in [
            vec![0u8; 3],
            vec![1, GSO_TCPV4, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x45],
            vec![0, GSO_TCPV4, 0, 0, 0, 0, 20, 0, 16, 0, 0x45, 0, 0, 0],
            vec![1, GSO_NONE, 0, 0, 0, 0, 0xff, 0xff, 1, 0, 0x45],
            vec![0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0x45],
        ] {
            let mut f = bad.clone();
            assert!(split(&mut f, &mut scratch, |_| {}).is_err(), "{bad:?}");
        }
        // A gso_size larger than the scratch buffer is refused, not a panic.
        let p = tcp_packet(false, 1, 0x10, &[0u8; 3000]);
        let mut frame = as_gso_frame(&p, 4000);
        assert_eq!(
            split(&mut frame, &mut scratch, |_| {}),
            Err(OffloadError::Malformed)
        );
    }
}
