//! Node podCIDR allocation, as kube-controller-manager's range allocator does it: each new Node
//! without `spec.podCIDRs` gets one subnet per cluster CIDR (IPv4 first, then IPv6), and a
//! subnet is never handed out while a Node holds it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// At most 2^16 subnets per cluster CIDR, the limit kube-controller-manager's `cidrset` enforces.
pub const MAX_SUBNET_BITS: u8 = 16;

/// Why a cluster CIDR and node mask do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrConfigError {
    #[error("node CIDR mask /{mask} is shorter than cluster CIDR {cluster}; use a mask of at least /{}", cluster.prefix())]
    MaskTooShort { cluster: IpNetwork, mask: u8 },
    #[error("node CIDR mask /{mask} is longer than the address ({cluster})")]
    MaskTooLong { cluster: IpNetwork, mask: u8 },
    #[error("cluster CIDR {cluster} with node mask /{mask} gives more than 2^{MAX_SUBNET_BITS} subnets; use a mask of at most /{}", cluster.prefix() + MAX_SUBNET_BITS)]
    TooManySubnets { cluster: IpNetwork, mask: u8 },
}

/// The subnets of one cluster CIDR and which are taken.
#[derive(Debug, Clone)]
pub struct CidrSet {
    cluster: IpNetwork,
    mask: u8,
    count: u128,
    used: BTreeSet<u128>,
    /// Next index to try: allocation goes round the range, so a released subnet is reused only
    /// after all others were tried (kube-controller-manager's `nextCandidate`).
    next: u128,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl CidrSet {
    pub fn new(cluster: IpNetwork, mask: u8) -> Result<Self, CidrConfigError> {
        let bits = if cluster.is_ipv4() { 32 } else { 128 };
        if mask < cluster.prefix() {
            return Err(CidrConfigError::MaskTooShort { cluster, mask });
        }
        if mask > bits {
            return Err(CidrConfigError::MaskTooLong { cluster, mask });
        }
        if mask - cluster.prefix() > MAX_SUBNET_BITS {
            return Err(CidrConfigError::TooManySubnets { cluster, mask });
        }
        let cluster = IpNetwork::new(cluster.network(), cluster.prefix()).expect("prefix checked");
        Ok(CidrSet {
            cluster,
            mask,
            count: 1u128 << (mask - cluster.prefix()),
            used: BTreeSet::new(),
            next: 0,
        })
    }

    pub fn cluster(&self) -> IpNetwork {
        self.cluster
    }

    fn subnet(&self, index: u128) -> IpNetwork {
        let bits = if self.cluster.is_ipv4() { 32 } else { 128 };
        let base = to_u128(self.cluster.network()) + (index << (bits - self.mask as u32));
        let ip = if self.cluster.is_ipv4() {
            IpAddr::V4(Ipv4Addr::from(base as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(base))
        };
        IpNetwork::new(ip, self.mask).expect("mask checked")
    }

    /// The index of `net` in this set, if it is exactly one of its subnets.
    fn index_of(&self, net: IpNetwork) -> Option<u128> {
        if net.prefix() != self.mask
            || net.is_ipv4() != self.cluster.is_ipv4()
            || !self.cluster.contains(net.network())
        {
            return None;
        }
        let bits = if self.cluster.is_ipv4() { 32 } else { 128 };
        let offset = to_u128(net.network()) - to_u128(self.cluster.network());
        Some(offset >> (bits - self.mask as u32))
    }

    /// Takes the next free subnet, or None when all are held.
    pub fn allocate(&mut self) -> Option<IpNetwork> {
        for step in 0..self.count {
            let i = (self.next + step) % self.count;
            if self.used.insert(i) {
                self.next = (i + 1) % self.count;
                return Some(self.subnet(i));
            }
        }
        None
    }

    /// Marks a subnet a Node came with as held; false if it is not one of ours or already held.
    pub fn occupy(&mut self, net: IpNetwork) -> bool {
        self.index_of(net).is_some_and(|i| self.used.insert(i))
    }

    pub fn release(&mut self, net: IpNetwork) {
        if let Some(i) = self.index_of(net) {
            self.used.remove(&i);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// Dual-stack podCIDR allocator: one [`CidrSet`] per configured family.
#[derive(Debug, Clone, Default)]
pub struct PodCidrAllocator {
    sets: Vec<CidrSet>,
}

impl PodCidrAllocator {
    /// `v4`/`v6`: cluster CIDR and node mask for each family served.
    pub fn new(
        v4: Option<(IpNetwork, u8)>,
        v6: Option<(IpNetwork, u8)>,
    ) -> Result<Self, CidrConfigError> {
        let mut sets = Vec::new();
        for (net, mask) in v4.into_iter().chain(v6) {
            sets.push(CidrSet::new(net, mask)?);
        }
        Ok(PodCidrAllocator { sets })
    }

    pub fn is_enabled(&self) -> bool {
        !self.sets.is_empty()
    }

    /// One subnet per family, in family order, or None (and nothing held) when any family is full.
    pub fn allocate(&mut self) -> Option<Vec<IpNetwork>> {
        let mut got = Vec::new();
        for i in 0..self.sets.len() {
            match self.sets[i].allocate() {
                Some(net) => got.push(net),
                None => {
                    for (set, net) in self.sets.iter_mut().zip(&got) {
                        set.release(*net);
                    }
                    return None;
                }
            }
        }
        Some(got)
    }

    /// Marks the podCIDRs of an existing Node as held; returns those that were already held by
    /// another Node (a conflict the real allocator reports as an event).
    pub fn occupy(&mut self, nets: &[IpNetwork]) -> Vec<IpNetwork> {
        let mut conflicts = Vec::new();
        for net in nets {
            for set in &mut self.sets {
                if set.cluster().is_ipv4() == net.is_ipv4()
                    && set.cluster().contains(net.network())
                    && !set.occupy(*net)
                {
                    conflicts.push(*net);
                }
            }
        }
        conflicts
    }

    pub fn release(&mut self, nets: &[IpNetwork]) {
        for net in nets {
            for set in &mut self.sets {
                set.release(*net);
            }
        }
    }
}

/// ClusterIP allocation for Services out of the service CIDRs (`--service-cluster-ip-range`,
/// one per family: IPv4 first when both); the network address and the first host address (the
/// real server's `kubernetes` Service) of each are never handed out.
#[derive(Debug, Clone)]
pub struct ServiceIpAllocator {
    v4: Option<CidrSet>,
    v6: Option<CidrSet>,
}

impl ServiceIpAllocator {
    /// One allocator per given CIDR (its family decides which).
    pub fn new(service_cidrs: &[IpNetwork]) -> Result<Self, CidrConfigError> {
        let mut a = ServiceIpAllocator { v4: None, v6: None };
        for net in service_cidrs {
            let set = Self::set(Some(*net))?;
            if net.is_ipv4() {
                a.v4 = set;
            } else {
                a.v6 = set;
            }
        }
        Ok(a)
    }

    /// The families this cluster allocates, primary first (`IPv4`, `IPv6`).
    pub fn families(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.v4.is_some() {
            f.push("IPv4");
        }
        if self.v6.is_some() {
            f.push("IPv6");
        }
        f
    }

    fn set(service_cidr: Option<IpNetwork>) -> Result<Option<CidrSet>, CidrConfigError> {
        Ok(match service_cidr {
            Some(net) => {
                let bits = if net.is_ipv4() { 32 } else { 128 };
                // Cap the range like CidrSet does; a /12 keeps its first 2^16 addresses.
                let usable =
                    IpNetwork::new(net.network(), net.prefix().max(bits - MAX_SUBNET_BITS))
                        .expect("prefix in range");
                let mut set = CidrSet::new(usable, bits)?;
                set.allocate(); // the network address
                set.allocate(); // the `kubernetes` Service's address
                Some(set)
            }
            None => None,
        })
    }

    fn family(&mut self, ip: IpAddr) -> Option<&mut CidrSet> {
        if ip.is_ipv4() {
            self.v4.as_mut()
        } else {
            self.v6.as_mut()
        }
    }

    /// A free address of `family` (`IPv4` or `IPv6`).
    pub fn allocate(&mut self, family: &str) -> Option<IpAddr> {
        let set = if family == "IPv6" {
            self.v6.as_mut()
        } else {
            self.v4.as_mut()
        };
        set?.allocate().map(|n| n.ip())
    }

    pub fn occupy(&mut self, ip: IpAddr) {
        if let Some(set) = self.family(ip) {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            set.occupy(IpNetwork::new(ip, bits).expect("host prefix"));
        }
    }

    pub fn release(&mut self, ip: IpAddr) {
        if let Some(set) = self.family(ip) {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            set.release(IpNetwork::new(ip, bits).expect("host prefix"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_in_order_and_never_hands_out_a_held_subnet() {
        let mut set = CidrSet::new(net("10.244.0.0/22"), 24).unwrap();
        let a = set.allocate().unwrap();
        let b = set.allocate().unwrap();
        assert_eq!((a, b), (net("10.244.0.0/24"), net("10.244.1.0/24")));
        set.release(a);
        // Next-fit: the released subnet comes back only after the rest of the range.
        assert_eq!(set.allocate(), Some(net("10.244.2.0/24")));
        assert_eq!(set.allocate(), Some(net("10.244.3.0/24")));
        assert_eq!(set.allocate(), Some(net("10.244.0.0/24")));
        assert_eq!(set.allocate(), None, "all four held");
        set.release(b);
        assert_eq!(set.allocate(), Some(b));
    }

    #[test]
    fn occupied_subnets_are_skipped() {
        let mut set = CidrSet::new(net("10.244.0.0/23"), 24).unwrap();
        assert!(set.occupy(net("10.244.0.0/24")));
        assert!(!set.occupy(net("10.244.0.0/24")), "already held");
        assert!(
            !set.occupy(net("10.245.0.0/24")),
            "outside the cluster CIDR"
        );
        assert!(!set.occupy(net("10.244.1.0/25")), "wrong mask");
        assert_eq!(set.allocate(), Some(net("10.244.1.0/24")));
        assert_eq!(set.allocate(), None);
        assert_eq!(set.in_use(), 2);
    }

    #[test]
    fn dual_stack_allocates_both_families_or_neither() {
        let mut alloc = PodCidrAllocator::new(
            Some((net("10.244.0.0/24"), 25)),
            Some((net("fd00:10:244::/56"), 64)),
        )
        .unwrap();
        assert_eq!(
            alloc.allocate().unwrap(),
            vec![net("10.244.0.0/25"), net("fd00:10:244::/64")]
        );
        assert_eq!(
            alloc.allocate().unwrap(),
            vec![net("10.244.0.128/25"), net("fd00:10:244:1::/64")]
        );
        // IPv4 is exhausted: nothing is taken from IPv6 either.
        assert_eq!(alloc.allocate(), None);
        alloc.release(&[net("10.244.0.0/25"), net("fd00:10:244::/64")]);
        assert_eq!(
            alloc.allocate().unwrap(),
            vec![net("10.244.0.0/25"), net("fd00:10:244:2::/64")]
        );
        assert_eq!(
            alloc.occupy(&[net("10.244.0.128/25")]),
            vec![net("10.244.0.128/25")]
        );
    }

    #[test]
    fn rejects_bad_masks() {
        assert!(matches!(
            CidrSet::new(net("10.244.0.0/16"), 8),
            Err(CidrConfigError::MaskTooShort { .. })
        ));
        assert!(matches!(
            CidrSet::new(net("10.244.0.0/16"), 33),
            Err(CidrConfigError::MaskTooLong { .. })
        ));
        assert!(matches!(
            CidrSet::new(net("fd00::/48"), 120),
            Err(CidrConfigError::TooManySubnets { .. })
        ));
        assert!(CidrSet::new(net("fd00:10:244::/56"), 64).is_ok());
    }

    #[test]
    fn service_ips_skip_the_reserved_addresses() {
        let mut s =
            ServiceIpAllocator::new(&[net("10.96.0.0/12"), net("fd00:10:96::/112")]).unwrap();
        assert_eq!(s.families(), ["IPv4", "IPv6"]);
        assert_eq!(s.allocate("IPv4"), Some("10.96.0.2".parse().unwrap()));
        s.occupy("10.96.0.3".parse().unwrap());
        assert_eq!(s.allocate("IPv4"), Some("10.96.0.4".parse().unwrap()));
        assert_eq!(s.allocate("IPv6"), Some("fd00:10:96::2".parse().unwrap()));
        let v4_only = ServiceIpAllocator::new(&[net("10.96.0.0/12")]).unwrap();
        assert_eq!(v4_only.families(), ["IPv4"]);
    }
}
