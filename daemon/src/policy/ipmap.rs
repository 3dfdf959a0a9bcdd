//! A map from IP address to a value, split into shards that are copied on write: taking a
//! snapshot clones the list of shard pointers, and a change after it copies one shard only.
//!
//! The policy snapshot holds every pod address of the cluster (150,000 at the scale kwire is
//! built for); one pod changing must not copy all of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Number of shards. At 150,000 addresses a shard holds about 600 entries, so the copy a change
/// makes after a snapshot is a few kilobytes, and a snapshot copies 256 pointers.
pub const SHARDS: usize = 256;

/// The shard of an address: the top bits of a multiplicative hash, so that the low octets of
/// per-node pod ranges (.1 to .30 on every node) spread over all shards.
fn shard_of(ip: &IpAddr) -> usize {
    let x: u64 = match ip {
        IpAddr::V4(v4) => u64::from(u32::from(*v4)),
        IpAddr::V6(v6) => {
            let n = u128::from(*v6);
            (n as u64) ^ ((n >> 64) as u64)
        }
    };
    // Fibonacci hashing (Knuth): the top 8 bits of x * 2^64/phi.
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize
}

/// See the module documentation. Cloning is cheap (one `Arc`).
#[derive(Clone, Debug)]
pub struct IpMap<V> {
    shards: Arc<Vec<Arc<HashMap<IpAddr, V>>>>,
}

impl<V> Default for IpMap<V> {
    fn default() -> Self {
        IpMap {
            shards: Arc::new((0..SHARDS).map(|_| Arc::new(HashMap::new())).collect()),
        }
    }
}

impl<V: Clone> IpMap<V> {
    pub fn get(&self, ip: &IpAddr) -> Option<&V> {
        self.shards[shard_of(ip)].get(ip)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.shards[shard_of(ip)].contains_key(ip)
    }

    fn shard_mut(&mut self, ip: &IpAddr) -> &mut HashMap<IpAddr, V> {
        let shards = Arc::make_mut(&mut self.shards);
        Arc::make_mut(&mut shards[shard_of(ip)])
    }

    /// Inserts or replaces; copies the shard (and the shard list) if a snapshot shares them.
    pub fn insert(&mut self, ip: IpAddr, value: V) -> Option<V> {
        self.shard_mut(&ip).insert(ip, value)
    }

    pub fn remove(&mut self, ip: &IpAddr) -> Option<V> {
        if !self.contains(ip) {
            return None;
        }
        self.shard_mut(ip).remove(ip)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_on_write_keeps_snapshots() {
        let mut m: IpMap<u32> = IpMap::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::1".parse().unwrap();
        m.insert(a, 1);
        let snap = m.clone();
        m.insert(a, 2);
        m.insert(b, 3);
        assert_eq!(snap.get(&a), Some(&1));
        assert_eq!(snap.get(&b), None);
        assert_eq!(m.get(&a), Some(&2));
        assert_eq!(m.remove(&b), Some(3));
        assert_eq!(m.remove(&b), None);
        assert_eq!((m.len(), snap.len()), (1, 1));
        // Only the changed shard was copied.
        let shared = m
            .shards
            .iter()
            .zip(snap.shards.iter())
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        let touched = if shard_of(&a) == shard_of(&b) { 1 } else { 2 };
        assert_eq!(shared, SHARDS - touched);
    }

    #[test]
    fn node_ranges_spread_over_shards() {
        let mut used = std::collections::HashSet::new();
        for node in 0..64u32 {
            for pod in 1..=30u32 {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (node << 8) | pod));
                used.insert(shard_of(&ip));
            }
        }
        assert!(used.len() > SHARDS * 3 / 4, "{} shards used", used.len());
    }
}
