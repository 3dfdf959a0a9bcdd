//! ICMP errors the loop originates, sent back to the offending packet's source: "fragmentation
//! needed" (IPv4, DF set) and "packet too big" (IPv6) for a packet larger than the tunnel MTU,
//! so path MTU discovery works instead of a silent black hole (RFC 1191, RFC 8201); "port
//! unreachable" for a UDP flow to a Service without endpoints (as kube-proxy answers); "host
//! unreachable" / "no route to destination" for a cluster address without a peer, so the
//! sender fails at once instead of timing out.

use crate::offload::checksum::{checksum, fold, pseudo_header, set_ipv4_header, sum};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Most bytes of the offending packet quoted: IPv4 routers quote at least the header and 8
/// bytes (RFC 792); IPv6 quotes as much as fits in the minimum MTU (RFC 4443).
const QUOTE_V4: usize = 548;
const QUOTE_V6: usize = 1280 - 40 - 8;

/// Whether an IPv4 packet has DF set. IPv6 packets are never fragmented on the way.
pub fn dont_fragment(pkt: &[u8]) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.len() >= 20 && pkt[6] & 0x40 != 0,
        Some(6) => true,
        _ => false,
    }
}

/// Which error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// The packet is larger than this MTU.
    TooBig(u16),
    /// Nothing listens on the destination port.
    PortUnreachable,
    /// The destination cannot be reached (IPv4 host unreachable, IPv6 no route).
    HostUnreachable,
}

impl IcmpError {
    /// Type, code and the header's last four bytes, for ICMPv4 and for ICMPv6.
    fn v4(self) -> (u8, u8, [u8; 4]) {
        match self {
            IcmpError::TooBig(mtu) => {
                let m = mtu.to_be_bytes();
                (3, 4, [0, 0, m[0], m[1]])
            }
            IcmpError::PortUnreachable => (3, 3, [0; 4]),
            IcmpError::HostUnreachable => (3, 1, [0; 4]),
        }
    }

    fn v6(self) -> (u8, u8, [u8; 4]) {
        match self {
            IcmpError::TooBig(mtu) => (2, 0, (mtu as u32).to_be_bytes()),
            IcmpError::PortUnreachable => (1, 4, [0; 4]),
            IcmpError::HostUnreachable => (1, 0, [0; 4]),
        }
    }
}

/// Writes into `out` the ICMP error telling `pkt`'s sender that `mtu` is the most that fits;
/// `from4`/`from6` are this node's addresses to send it from. Returns the error's length, or
/// `None` when `pkt` must not get one (not IP, an ICMP error itself, no source address).
pub fn too_big(
    pkt: &[u8],
    mtu: u16,
    from4: Option<Ipv4Addr>,
    from6: Option<Ipv6Addr>,
    out: &mut [u8],
) -> Option<usize> {
    error(pkt, IcmpError::TooBig(mtu), from4, from6, out)
}

/// Writes into `out` the ICMP error telling `pkt`'s sender that its destination cannot be
/// reached (IPv4 host unreachable, IPv6 no route to destination); as [`too_big`] otherwise.
pub fn unreachable(
    pkt: &[u8],
    from4: Option<Ipv4Addr>,
    from6: Option<Ipv6Addr>,
    out: &mut [u8],
) -> Option<usize> {
    error(pkt, IcmpError::HostUnreachable, from4, from6, out)
}

/// Writes into `out` the ICMP error `kind` about `pkt`, from `from4` or `from6` (by the
/// packet's family) to its source; returns its length, or `None` when `pkt` must not get one.
pub fn error(
    pkt: &[u8],
    kind: IcmpError,
    from4: Option<Ipv4Addr>,
    from6: Option<Ipv6Addr>,
    out: &mut [u8],
) -> Option<usize> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = (pkt[0] & 0xf) as usize * 4;
            // Never answer an ICMP error with one (RFC 1122 3.2.2).
            if pkt[9] == 1
                && pkt
                    .get(ihl)
                    .is_some_and(|t| ![0, 8, 13, 14, 15, 16, 17, 18].contains(t))
            {
                return None;
            }
            let from = from4?;
            let q = pkt.len().min(QUOTE_V4).min(out.len().checked_sub(28)?);
            let len = 28 + q;
            let o = &mut out[..len];
            o[..20].copy_from_slice(&[
                0x45, 0xc0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            o[12..16].copy_from_slice(&from.octets());
            o[16..20].copy_from_slice(&pkt[12..16]);
            set_ipv4_header(&mut o[..20]);
            let (ty, code, rest) = kind.v4();
            o[20..24].copy_from_slice(&[ty, code, 0, 0]);
            o[24..28].copy_from_slice(&rest);
            o[28..].copy_from_slice(&pkt[..q]);
            let c = checksum(&o[20..]);
            o[22..24].copy_from_slice(&c.to_be_bytes());
            Some(len)
        }
        6 if pkt.len() >= 40 => {
            if pkt[6] == 58 && pkt.get(40).is_some_and(|t| *t < 128) {
                return None;
            }
            let from = from6?;
            let q = pkt.len().min(QUOTE_V6).min(out.len().checked_sub(48)?);
            let len = 48 + q;
            let o = &mut out[..len];
            o[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 58, 64]);
            o[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            o[8..24].copy_from_slice(&from.octets());
            o[24..40].copy_from_slice(&pkt[8..24]);
            let (ty, code, rest) = kind.v6();
            o[40..44].copy_from_slice(&[ty, code, 0, 0]);
            o[44..48].copy_from_slice(&rest);
            o[48..].copy_from_slice(&pkt[..q]);
            let ph = pseudo_header(&o[8..24], &o[24..40], 58, (len - 40) as u32);
            let c = !fold(sum(ph, &o[40..]));
            o[42..44].copy_from_slice(&c.to_be_bytes());
            Some(len)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::checksum::ipv4_header_valid;

    #[test]
    fn fragmentation_needed_for_ipv4_with_df() {
        let mut p = vec![0u8; 1500];
        p[..20].copy_from_slice(&[
            0x45, 0, 0x05, 0xdc, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 244, 1, 5, 10, 244, 2, 5,
        ]);
        assert!(dont_fragment(&p));
        let mut out = vec![0u8; 1500];
        let n = too_big(
            &p,
            1420,
            Some("10.244.1.1".parse().unwrap()),
            None,
            &mut out,
        )
        .unwrap();
        let o = &out[..n];
        assert!(ipv4_header_valid(&o[..20]));
        assert_eq!(&o[16..20], &[10, 244, 1, 5], "back to the sender");
        assert_eq!((o[20], o[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([o[26], o[27]]), 1420);
        assert_eq!(fold(sum(0, &o[20..])), 0xffff, "ICMP checksum");
        assert_eq!(&o[28..48], &p[..20], "quotes the header");
        // No error about an error.
        let mut e = o.to_vec();
        e[20] = 3;
        assert!(too_big(
            &e,
            1420,
            Some("10.244.1.1".parse().unwrap()),
            None,
            &mut out
        )
        .is_none());
    }

    #[test]
    fn packet_too_big_for_ipv6() {
        let mut p = vec![0u8; 1500];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&1460u16.to_be_bytes());
        p[6] = 17;
        p[8..24].copy_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        let mut out = vec![0u8; 2000];
        let n = too_big(&p, 1420, None, Some("fd00::1".parse().unwrap()), &mut out).unwrap();
        assert_eq!(n, 1280);
        let o = &out[..n];
        assert_eq!(o[40], 2);
        assert_eq!(u32::from_be_bytes([o[44], o[45], o[46], o[47]]), 1420);
        let ph = pseudo_header(&o[8..24], &o[24..40], 58, (n - 40) as u32);
        assert_eq!(fold(sum(ph, &o[40..])), 0xffff);
        assert!(
            too_big(&p, 1420, Some("10.0.0.1".parse().unwrap()), None, &mut out).is_none(),
            "no IPv6 source address"
        );
    }
}
