//! Delivery on this node: which pod owns an address, and where a packet goes when no peer
//! owns it. Immutable, rebuilt and swapped when a pod comes or goes; the loop reads it per
//! batch. `T` is what the runtime keeps per pod (its tun); tests use `()`.

use crate::datapath::conntrack::Conntrack;
use crate::datapath::nat::NatTable;
use crate::policy::PolicySet;
use crate::services::ServiceTable;
use crate::wg::allowed_ips::IntMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Where a frame came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The node's own tun (`kwire0`, or the device of `kwire tunnel`).
    Host,
    /// A pod's tun, by its slot in the current [`LocalTable`].
    Pod(u32),
}

/// A pod's interface.
#[derive(Debug)]
pub struct PodPort<T> {
    /// Stable id (survives table rebuilds; the runtime's epoll token).
    pub id: u64,
    /// The pod's own addresses: the only sources its frames may carry.
    pub ips: Vec<IpAddr>,
    pub io: T,
}

/// The local delivery table.
#[derive(Debug)]
pub struct LocalTable<T> {
    pub pods: Vec<PodPort<T>>,
    by_ip: IntMap<IpAddr, u32>,
    by_id: IntMap<u64, u32>,
    /// The node's own tunnel addresses: decrypted packets for them go to the host tun.
    gateways: Vec<IpAddr>,
    /// Deliver every decrypted packet to the host tun (plain WireGuard, as `kwire tunnel`
    /// does); off on a node, where only pods and the gateways receive.
    pub host_accepts_all: bool,
    /// NetworkPolicy, when the cluster has any: checked for pods' new flows, with the
    /// connection table remembering what passed.
    pub filter: Option<Filter>,
    /// No NetworkPolicy snapshot yet on a node that enforces it (a fresh start, or an
    /// unreadable saved policy, before the API lists arrive): pods' new flows are dropped
    /// (`policy_not_synced`) instead of admitted unfiltered. Off for `kwire tunnel`.
    pub policy_pending: bool,
    /// Largest packet the tunnel carries; bigger ones get an ICMP error (DF, IPv6) or their
    /// TCP segments cut smaller. `None`: the tun's own MTU is trusted (`kwire tunnel`).
    pub mtu: Option<u16>,
    /// Services (ClusterIP), when the control plane has compiled a table: new flows to a
    /// frontend are translated, replies translated back.
    pub services: Option<ServiceNat>,
    /// The cluster's pod ranges: a destination in one without a peer is unreachable (never
    /// handed to the host to route). Empty for `kwire tunnel`.
    pub cluster: Vec<ipnetwork::IpNetwork>,
}

/// The policy snapshot and the (long-lived, shared) connection table.
#[derive(Clone)]
pub struct Filter {
    pub policy: Arc<PolicySet>,
    pub conntrack: Arc<Conntrack>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter").finish_non_exhaustive()
    }
}

impl<T> Default for LocalTable<T> {
    fn default() -> Self {
        LocalTable {
            pods: Vec::new(),
            by_ip: IntMap::default(),
            by_id: IntMap::default(),
            gateways: Vec::new(),
            host_accepts_all: true,
            filter: None,
            policy_pending: false,
            mtu: None,
            services: None,
            cluster: Vec::new(),
        }
    }
}

impl LocalTable<()> {
    /// The table of a device without pods (`kwire tunnel`): built once, shared.
    pub fn host_only() -> &'static LocalTable<()> {
        static TABLE: std::sync::OnceLock<LocalTable<()>> = std::sync::OnceLock::new();
        TABLE.get_or_init(LocalTable::default)
    }
}

impl<T> LocalTable<T> {
    /// A node's table: pods and the node's gateway addresses.
    pub fn new(pods: Vec<PodPort<T>>, gateways: Vec<IpAddr>) -> LocalTable<T> {
        let mut by_ip = IntMap::default();
        let mut by_id = IntMap::default();
        for (slot, p) in pods.iter().enumerate() {
            by_id.insert(p.id, slot as u32);
            for ip in &p.ips {
                by_ip.insert(*ip, slot as u32);
            }
        }
        LocalTable {
            pods,
            by_ip,
            by_id,
            gateways,
            host_accepts_all: false,
            filter: None,
            policy_pending: false,
            mtu: None,
            services: None,
            cluster: Vec::new(),
        }
    }

    #[inline]
    pub fn pod_for_ip(&self, ip: IpAddr) -> Option<u32> {
        if self.by_ip.is_empty() {
            return None;
        }
        self.by_ip.get(&ip).copied()
    }

    #[inline]
    pub fn slot_for_id(&self, id: u64) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    /// Where a decrypted packet for `dst` goes, if anywhere.
    #[inline]
    pub fn deliver(&self, dst: IpAddr) -> Option<Port> {
        if let Some(s) = self.pod_for_ip(dst) {
            return Some(Port::Pod(s));
        }
        (self.host_accepts_all || self.gateways.contains(&dst)).then_some(Port::Host)
    }

    /// This node's first IPv4 and IPv6 tunnel addresses (sources of ICMP errors).
    pub fn gateway_v4(&self) -> Option<std::net::Ipv4Addr> {
        self.gateways.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        })
    }

    pub fn gateway_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.gateways.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            _ => None,
        })
    }

    /// Whether `ip` lies in one of the cluster's pod ranges.
    #[inline]
    pub fn in_cluster(&self, ip: IpAddr) -> bool {
        self.cluster.iter().any(|r| r.contains(ip))
    }

    /// Whether `ip` is one of this node's own tunnel addresses.
    #[inline]
    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        self.gateways.contains(&ip)
    }

    /// Whether `src` is one of pod `slot`'s addresses.
    #[inline]
    pub fn owns(&self, slot: u32, src: IpAddr) -> bool {
        self.pods
            .get(slot as usize)
            .is_some_and(|p| p.ips.contains(&src))
    }

    pub fn io(&self, slot: u32) -> Option<&T> {
        self.pods.get(slot as usize).map(|p| &p.io)
    }
}

/// Reads an IP packet's source and destination addresses.
#[inline]
pub fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let s: [u8; 4] = pkt[12..16].try_into().ok()?;
            let d: [u8; 4] = pkt[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if pkt.len() >= 40 => {
            let s: [u8; 16] = pkt[8..24].try_into().ok()?;
            let d: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// The service snapshot (swapped whole) and the long-lived translation table.
#[derive(Clone)]
pub struct ServiceNat {
    pub table: Arc<ServiceTable>,
    pub nat: Arc<NatTable>,
}

impl std::fmt::Debug for ServiceNat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceNat")
            .field("frontends", &self.table.frontends())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_to_pods_and_gateways_only_on_a_node() {
        let pods = vec![PodPort {
            id: 7,
            ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            io: (),
        }];
        let t = LocalTable::new(pods, vec!["10.244.1.1".parse().unwrap()]);
        assert_eq!(t.deliver("10.244.1.5".parse().unwrap()), Some(Port::Pod(0)));
        assert_eq!(t.deliver("fd00::5".parse().unwrap()), Some(Port::Pod(0)));
        assert_eq!(t.deliver("10.244.1.1".parse().unwrap()), Some(Port::Host));
        assert_eq!(t.deliver("10.244.1.9".parse().unwrap()), None);
        assert!(t.owns(0, "10.244.1.5".parse().unwrap()));
        assert!(!t.owns(0, "10.244.1.6".parse().unwrap()));
        assert_eq!(t.slot_for_id(7), Some(0));
        let plain: LocalTable<()> = LocalTable::default();
        assert_eq!(
            plain.deliver("192.0.2.1".parse().unwrap()),
            Some(Port::Host)
        );
    }
}
