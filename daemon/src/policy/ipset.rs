//! CIDRs and sorted, merged IP range sets: the compiled form of a rule's peers (pod IPs and ipBlocks minus excepts).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP prefix, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A prefix of `addr`; host bits are cleared. `None` if `prefix` is longer than the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let (lo, _) = range_of(addr, prefix)?;
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(lo as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(lo)),
        };
        Some(Cidr { addr, prefix })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (lo, hi) = self.range();
        ip.is_ipv4() == self.addr.is_ipv4() && (lo..=hi).contains(&to_u128(ip))
    }

    /// First and last address, as integers of the family.
    fn range(&self) -> (u128, u128) {
        // Constructed only through `new`/`host`/`from_str`, so the prefix fits the family.
        range_of(self.addr, self.prefix).unwrap_or((1, 0))
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn range_of(addr: IpAddr, prefix: u8) -> Option<(u128, u128)> {
    let bits: u32 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = u32::from(prefix);
    if prefix > bits {
        return None;
    }
    let host_bits = bits - prefix;
    let host_mask: u128 = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let lo = to_u128(addr) & !host_mask;
    Some((lo, lo | host_mask))
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `address/prefix`, as an ipBlock's cidr and except are written (the prefix is required).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError {
            value: s.to_string(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A string that is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a CIDR (address/prefix-length, e.g. 10.0.0.0/8 or fd00::/64)")]
pub struct CidrError {
    pub value: String,
}

/// A set of IP addresses as sorted, disjoint, non-adjacent inclusive ranges per family.
/// Lookup is a binary search; it never allocates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpRangeSet {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl IpRangeSet {
    pub fn new() -> Self {
        IpRangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ranges = if ip.is_ipv4() { &self.v4 } else { &self.v6 };
        let x = to_u128(ip);
        // First range whose end is >= x; it contains x iff its start is <= x.
        let i = ranges.partition_point(|&(_, hi)| hi < x);
        ranges.get(i).is_some_and(|&(lo, _)| lo <= x)
    }

    /// Adds one address.
    pub fn insert_ip(&mut self, ip: IpAddr) {
        let x = to_u128(ip);
        self.family_mut(ip).push((x, x));
    }

    /// Adds `cidr` minus every `except` prefix.
    pub fn insert_block(&mut self, cidr: Cidr, except: &[Cidr]) {
        let (lo, hi) = cidr.range();
        let mut holes: Vec<(u128, u128)> = except
            .iter()
            .filter(|e| e.addr.is_ipv4() == cidr.addr.is_ipv4())
            .map(|e| e.range())
            .collect();
        holes.sort_unstable();
        let out = self.family_mut(cidr.addr);
        let mut next = Some(lo);
        for (hlo, hhi) in holes {
            let Some(start) = next else { break };
            if hhi < start || hlo > hi {
                continue;
            }
            if hlo > start {
                out.push((start, hlo - 1));
            }
            next = if hhi >= hi { None } else { Some(hhi + 1) };
        }
        if let Some(start) = next {
            out.push((start, hi));
        }
    }

    /// Sorts and merges; call once after the inserts, before `contains`.
    pub fn normalize(&mut self) {
        for ranges in [&mut self.v4, &mut self.v6] {
            ranges.sort_unstable();
            let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
            for &(lo, hi) in ranges.iter() {
                match merged.last_mut() {
                    Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            merged.shrink_to_fit();
            *ranges = merged;
        }
    }

    fn family_mut(&mut self, ip: IpAddr) -> &mut Vec<(u128, u128)> {
        if ip.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_cidr() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("fd00::1/64").to_string(), "fd00::/64");
        for bad in [
            "10.0.0.1",
            "10.0.0.0/33",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
            "::/129",
            "10.0.0.0/255.0.0.0",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(cidr("::/0").contains(ip("fd00::1")));
        assert!(!cidr("::/0").contains(ip("10.0.0.1")));
    }

    #[test]
    fn block_with_except() {
        let mut s = IpRangeSet::new();
        s.insert_block(
            cidr("10.0.0.0/16"),
            &[
                cidr("10.0.1.2/32"),
                cidr("10.0.2.0/24"),
                cidr("192.168.0.0/16"),
            ],
        );
        s.normalize();
        assert!(s.contains(ip("10.0.0.0")));
        assert!(s.contains(ip("10.0.1.1")));
        assert!(!s.contains(ip("10.0.1.2")));
        assert!(s.contains(ip("10.0.1.3")));
        assert!(!s.contains(ip("10.0.2.200")));
        assert!(s.contains(ip("10.0.3.0")));
        assert!(s.contains(ip("10.0.255.255")));
        assert!(!s.contains(ip("10.1.0.0")));
        assert!(!s.contains(ip("::a00:1")), "families do not mix");
    }

    #[test]
    fn except_next_to_the_edges() {
        let mut s = IpRangeSet::new();
        s.insert_block(
            cidr("10.0.0.0/24"),
            &[cidr("10.0.0.1/32"), cidr("10.0.0.254/32")],
        );
        s.normalize();
        assert!(s.contains(ip("10.0.0.0")));
        assert!(!s.contains(ip("10.0.0.1")));
        assert!(s.contains(ip("10.0.0.2")));
        assert!(s.contains(ip("10.0.0.253")));
        assert!(!s.contains(ip("10.0.0.254")));
        assert!(s.contains(ip("10.0.0.255")));
    }

    #[test]
    fn except_covering_everything_and_edges() {
        let mut s = IpRangeSet::new();
        s.insert_block(cidr("10.0.0.0/24"), &[cidr("10.0.0.0/8")]);
        s.normalize();
        assert!(s.is_empty());
        let mut s = IpRangeSet::new();
        s.insert_block(
            cidr("0.0.0.0/0"),
            &[cidr("0.0.0.0/32"), cidr("255.255.255.255/32")],
        );
        s.insert_block(cidr("::/0"), &[]);
        s.normalize();
        assert!(!s.contains(ip("0.0.0.0")));
        assert!(!s.contains(ip("255.255.255.255")));
        assert!(s.contains(ip("1.2.3.4")));
        assert!(s.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
    }

    #[test]
    fn merge_ips() {
        let mut s = IpRangeSet::new();
        for a in ["10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.9", "fd00::1"] {
            s.insert_ip(ip(a));
        }
        s.normalize();
        assert_eq!(s.v4.len(), 2);
        assert!(
            s.contains(ip("10.0.0.2")) && s.contains(ip("10.0.0.9")) && !s.contains(ip("10.0.0.4"))
        );
        assert!(s.contains(ip("fd00::1")));
    }
}
