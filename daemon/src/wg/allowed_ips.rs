//! Cryptokey routing table: longest-prefix match from an IP address to a value (a peer slot).
//! One hash map per prefix length present, searched from the longest; a table usually holds
//! one to three lengths, so a lookup is one to three hash probes and allocates nothing.

use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

/// A small multiplicative hasher for fixed-size integer keys (addresses are not attacker
/// chosen here: the table is built from configuration, lookups only probe it).
#[derive(Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64)
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64)
    }
}

pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Prefix table of one address family, keys as integers of `BITS` bits.
#[derive(Debug, Clone)]
struct Family<K, T> {
    /// (prefix length, entries keyed by the masked address), longest first.
    levels: Vec<(u8, IntMap<K, T>)>,
}

impl<K: Eq + std::hash::Hash, T: PartialEq> PartialEq for Family<K, T> {
    fn eq(&self, other: &Self) -> bool {
        self.levels == other.levels
    }
}

impl<K, T> Default for Family<K, T> {
    fn default() -> Self {
        Family { levels: Vec::new() }
    }
}

trait Bits: Copy + Eq + std::hash::Hash + std::ops::BitAnd<Output = Self> {
    const BITS: u8;
    fn mask(len: u8) -> Self;
}

impl Bits for u32 {
    const BITS: u8 = 32;
    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len as u32)
        }
    }
}

impl Bits for u128 {
    const BITS: u8 = 128;
    fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - len as u32)
        }
    }
}

impl<K: Bits, T: Copy> Family<K, T> {
    fn insert(&mut self, addr: K, len: u8, v: T) {
        let len = len.min(K::BITS);
        let pos = match self.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                self.levels.insert(p, (len, IntMap::default()));
                p
            }
        };
        self.levels[pos].1.insert(addr & K::mask(len), v);
    }

    fn remove(&mut self, addr: K, len: u8) -> Option<T> {
        let len = len.min(K::BITS);
        let pos = self.levels.binary_search_by(|(l, _)| len.cmp(l)).ok()?;
        let v = self.levels[pos].1.remove(&(addr & K::mask(len)));
        if self.levels[pos].1.is_empty() {
            self.levels.remove(pos);
        }
        v
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<T> {
        for (len, m) in &self.levels {
            if let Some(v) = m.get(&(addr & K::mask(*len))) {
                return Some(*v);
            }
        }
        None
    }

    fn get_exact(&self, addr: K, len: u8) -> Option<T> {
        let pos = self.levels.binary_search_by(|(l, _)| len.cmp(l)).ok()?;
        self.levels[pos].1.get(&(addr & K::mask(len))).copied()
    }
}

/// Longest-prefix match over IPv4 and IPv6 networks.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedIps<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

impl<T: Copy> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits ignored); replaces what the same network mapped to.
    pub fn insert(&mut self, net: IpNetwork, v: T) {
        match net {
            IpNetwork::V4(n) => self.v4.insert(u32::from(n.ip()), n.prefix(), v),
            IpNetwork::V6(n) => self.v6.insert(u128::from(n.ip()), n.prefix(), v),
        }
    }

    pub fn remove(&mut self, net: IpNetwork) -> Option<T> {
        match net {
            IpNetwork::V4(n) => self.v4.remove(u32::from(n.ip()), n.prefix()),
            IpNetwork::V6(n) => self.v6.remove(u128::from(n.ip()), n.prefix()),
        }
    }

    /// The value of the exact network `net`, if present.
    pub fn get_exact(&self, net: IpNetwork) -> Option<T> {
        match net {
            IpNetwork::V4(n) => self.v4.get_exact(u32::from(n.ip()), n.prefix()),
            IpNetwork::V6(n) => self.v6.get_exact(u128::from(n.ip()), n.prefix()),
        }
    }

    /// The value of the longest network containing `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<T> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Looks up the address in a packet's bytes: 4 bytes for IPv4, 16 for IPv6.
    #[inline]
    pub fn lookup_bytes(&self, b: &[u8]) -> Option<T> {
        match b.len() {
            4 => self.v4.lookup(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                self.v6.lookup(u128::from_be_bytes(a))
            }
            _ => None,
        }
    }
}

/// Normalises a network: clears host bits, so `10.0.0.5/24` is stored as `10.0.0.0/24`.
pub fn canonical(net: IpNetwork) -> IpNetwork {
    match net {
        IpNetwork::V4(n) => IpNetwork::V4(
            ipnetwork::Ipv4Network::new(n.network(), n.prefix()).expect("prefix checked"),
        ),
        IpNetwork::V6(n) => IpNetwork::V6(
            ipnetwork::Ipv6Network::new(n.network(), n.prefix()).expect("prefix checked"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.1.0.0/16".parse().unwrap(), 2);
        t.insert("10.1.2.3/32".parse().unwrap(), 3);
        t.insert("0.0.0.0/0".parse().unwrap(), 4);
        t.insert("fd00::/8".parse().unwrap(), 5);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("10.1.9.9".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("10.9.9.9".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(4));
        assert_eq!(t.lookup("fd12::1".parse().unwrap()), Some(5));
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), None);
        assert_eq!(t.remove("0.0.0.0/0".parse().unwrap()), Some(4));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), None);
        assert_eq!(t.lookup_bytes(&[10, 1, 2, 3]), Some(3));
    }

    fn naive(entries: &[(IpNetwork, u32)], ip: IpAddr) -> Option<u32> {
        // Later inserts of the same network replace earlier ones, as in the table.
        let mut best: Option<(u8, u32)> = None;
        for (net, v) in entries {
            if net.contains(ip) && best.is_none_or(|(l, _)| net.prefix() >= l) {
                best = Some((net.prefix(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn net_strategy() -> impl Strategy<Value = IpNetwork> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(a, l)| canonical(IpNetwork::new(IpAddr::from(a), l).unwrap())),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(a, l)| canonical(IpNetwork::new(IpAddr::from(a), l).unwrap())),
        ]
    }

    proptest! {
        /// The table agrees with a linear scan (wireguard-go's TestTrieRandom in spirit).
        #[test]
        fn agrees_with_linear_scan(entries in proptest::collection::vec((net_strategy(), 0u32..50), 0..40),
                                   probes in proptest::collection::vec(any::<[u8; 16]>(), 1..40)) {
            let mut t = AllowedIps::new();
            for (n, v) in &entries {
                t.insert(*n, *v);
            }
            for p in probes {
                // Probe near the inserted networks as well as at random.
                let ip6 = IpAddr::from(p);
                let ip4 = IpAddr::from([p[0], p[1], p[2], p[3]]);
                prop_assert_eq!(t.lookup(ip6), naive(&entries, ip6));
                prop_assert_eq!(t.lookup(ip4), naive(&entries, ip4));
            }
            for (n, _) in &entries {
                prop_assert_eq!(t.lookup(n.ip()), naive(&entries, n.ip()));
            }
        }
    }
}
