//! The host side of the tunnel: the tun's MTU and addresses (the first address of each of
//! this node's pod CIDRs), the cluster's ranges, and the routes of the peers' pod CIDRs.
//!
//! Fail closed, in this order: every cluster range (`--cluster-cidr`) first gets an
//! `unreachable` route, before any other route is made, so that nothing in it can ever follow
//! the default route out of the node; then a route into the tun (the loop answers a
//! destination without a live peer with an ICMP unreachable and counts a `no_peer` drop);
//! each peer's pod CIDR gets a route into the tun with a blackhole behind it. The tun's
//! routes are ignored while the tun has no reader (`ignore_routes_with_linkdown`), so with
//! the daemon dead the blackholes and unreachable routes answer. When a peer goes, its route
//! and its blackhole go (the cluster range's unreachable route covers its range).
//!
//! What to do is planned by a pure function ([`plan`]) and done over rtnetlink
//! ([`crate::io::netlink`]) in batches; only the steps that succeeded are remembered, so a
//! failed one is retried at the next sync. The routes are marked with kwire's routing protocol
//! number, so that after a restart the agent finds the ones it made before and removes those
//! no longer wanted (a Node deleted while the agent was down leaves nothing behind).

use crate::io::netlink::{self, Netlink, Request, Route, RouteKind, RTPROT_KWIRE};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Metric of a route into the tun: below the blackhole's.
pub const PEER_ROUTE_METRIC: u32 = 100;
/// Metric of the blackhole behind every pod CIDR route and of the unreachable route of every
/// cluster range: used when the tun's route is gone or ignored (the daemon died, the peer was
/// removed).
pub const BLACKHOLE_METRIC: u32 = 4096;
/// WireGuard's overhead on the underlay: IPv6 header 40 + UDP 8 + WireGuard 32
/// (wg-quick subtracts the same 80).
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// Underlay MTU assumed when it cannot be found.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// `iproute2`'s protocol number of routes made by `ip route` (kwire before rtnetlink): such
/// routes of ours are adopted after an upgrade.
const RTPROT_BOOT: u8 = 3;

/// The first address of `cidr`, with its prefix: the node's gateway address for the range.
pub fn gateway(cidr: &IpNetwork) -> IpNetwork {
    match cidr {
        IpNetwork::V4(n) => {
            let a = std::net::Ipv4Addr::from(u32::from(n.network()).wrapping_add(1));
            IpNetwork::new(IpAddr::V4(a), n.prefix()).expect("same prefix")
        }
        IpNetwork::V6(n) => {
            let a = std::net::Ipv6Addr::from(u128::from(n.network()).wrapping_add(1));
            IpNetwork::new(IpAddr::V6(a), n.prefix()).expect("same prefix")
        }
    }
}

/// What the host should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub mtu: u32,
    /// This node's pod CIDRs.
    pub own: Vec<IpNetwork>,
    /// The accepted peers' pod CIDRs.
    pub peers: Vec<IpNetwork>,
    /// The cluster's ranges: pods (`--cluster-cidr`) and Services (`--service-cidr`). Each
    /// gets an unreachable route, then a route into the tun.
    pub cluster: Vec<IpNetwork>,
}

/// What has been programmed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub mtu: Option<u32>,
    pub addresses: BTreeSet<IpNetwork>,
    /// Routes into the tun (peers' pod CIDRs and the cluster ranges) → preferred source.
    pub routes: BTreeMap<IpNetwork, Option<IpAddr>>,
    /// Blackholes behind pod CIDR routes.
    pub blackholes: BTreeSet<IpNetwork>,
    /// Unreachable routes of the cluster ranges.
    pub unreachable: BTreeSet<IpNetwork>,
}

/// One change and the state it establishes once it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Mtu(u32),
    AddAddress(IpNetwork),
    DelAddress(IpNetwork),
    Unreachable(IpNetwork),
    DelUnreachable(IpNetwork),
    Blackhole(IpNetwork),
    DelBlackhole(IpNetwork),
    AddRoute(IpNetwork, Option<IpAddr>),
    DelRoute(IpNetwork),
}

impl Step {
    fn is_delete(&self) -> bool {
        matches!(
            self,
            Step::DelAddress(_)
                | Step::DelUnreachable(_)
                | Step::DelBlackhole(_)
                | Step::DelRoute(_)
        )
    }

    /// The rtnetlink request for this step on the link with `index`.
    pub fn request(&self, index: u32) -> Request {
        let route = |dst: IpNetwork, kind, metric, src| Route {
            dst,
            kind,
            metric,
            src,
            protocol: RTPROT_KWIRE,
        };
        match *self {
            Step::Mtu(m) => Request::LinkUp {
                index,
                mtu: Some(m),
            },
            Step::AddAddress(a) => Request::AddrReplace {
                index,
                addr: a,
                nodad: a.is_ipv6(),
            },
            Step::DelAddress(a) => Request::AddrDel { index, addr: a },
            Step::Unreachable(n) => {
                Request::RouteReplace(route(n, RouteKind::Unreachable, BLACKHOLE_METRIC, None))
            }
            Step::DelUnreachable(n) => {
                Request::RouteDel(route(n, RouteKind::Unreachable, BLACKHOLE_METRIC, None))
            }
            Step::Blackhole(n) => {
                Request::RouteReplace(route(n, RouteKind::Blackhole, BLACKHOLE_METRIC, None))
            }
            Step::DelBlackhole(n) => {
                Request::RouteDel(route(n, RouteKind::Blackhole, BLACKHOLE_METRIC, None))
            }
            Step::AddRoute(n, src) => {
                Request::RouteReplace(route(n, RouteKind::Dev(index), PEER_ROUTE_METRIC, src))
            }
            Step::DelRoute(n) => {
                Request::RouteDel(route(n, RouteKind::Dev(index), PEER_ROUTE_METRIC, None))
            }
        }
    }
}

/// The steps that take the host from `done` to `want`: the cluster ranges' unreachable
/// routes first; link up with the MTU; an address for each own pod CIDR; a blackhole for each
/// own and peer pod CIDR; a route into the tun for each cluster range and peer pod CIDR.
/// Then what is no longer wanted goes: routes before the blackholes behind them, the cluster
/// ranges' unreachable routes last.
pub fn plan(done: &Programmed, want: &Desired) -> Vec<Step> {
    let mut steps = Vec::new();
    let cluster: BTreeSet<IpNetwork> = want.cluster.iter().copied().collect();
    for n in &cluster {
        if !done.unreachable.contains(n) {
            steps.push(Step::Unreachable(*n));
        }
    }
    if done.mtu != Some(want.mtu) {
        steps.push(Step::Mtu(want.mtu));
    }
    let want_addrs: BTreeSet<IpNetwork> = want.own.iter().map(gateway).collect();
    for a in &want_addrs {
        if !done.addresses.contains(a) {
            steps.push(Step::AddAddress(*a));
        }
    }
    // A pod CIDR equal to a whole cluster range keeps that range's unreachable route (same
    // prefix and metric: one route).
    let want_blackholes: BTreeSet<IpNetwork> = want
        .own
        .iter()
        .chain(&want.peers)
        .filter(|n| !cluster.contains(n))
        .copied()
        .collect();
    for n in &want_blackholes {
        if !done.blackholes.contains(n) {
            steps.push(Step::Blackhole(*n));
        }
    }
    let src_v4 = want_addrs.iter().find(|a| a.is_ipv4()).map(|a| a.ip());
    let src_v6 = want_addrs.iter().find(|a| a.is_ipv6()).map(|a| a.ip());
    let own: BTreeSet<&IpNetwork> = want.own.iter().collect();
    let mut want_routes = BTreeMap::new();
    for n in cluster.iter().chain(&want.peers) {
        if own.contains(n) {
            continue;
        }
        want_routes.insert(*n, if n.is_ipv4() { src_v4 } else { src_v6 });
    }
    for (n, src) in &want_routes {
        if done.routes.get(n) != Some(src) {
            steps.push(Step::AddRoute(*n, *src));
        }
    }
    for n in done.routes.keys() {
        if !want_routes.contains_key(n) {
            steps.push(Step::DelRoute(*n));
        }
    }
    for n in &done.blackholes {
        if !want_blackholes.contains(n) {
            steps.push(Step::DelBlackhole(*n));
        }
    }
    for a in &done.addresses {
        if !want_addrs.contains(a) {
            steps.push(Step::DelAddress(*a));
        }
    }
    for n in &done.unreachable {
        if !cluster.contains(n) {
            steps.push(Step::DelUnreachable(*n));
        }
    }
    steps
}

impl Programmed {
    fn record(&mut self, s: &Step) {
        match *s {
            Step::Mtu(m) => self.mtu = Some(m),
            Step::AddAddress(a) => {
                self.addresses.insert(a);
            }
            Step::DelAddress(a) => {
                self.addresses.remove(&a);
            }
            Step::Unreachable(n) => {
                self.unreachable.insert(n);
            }
            Step::DelUnreachable(n) => {
                self.unreachable.remove(&n);
            }
            Step::Blackhole(n) => {
                self.blackholes.insert(n);
            }
            Step::DelBlackhole(n) => {
                self.blackholes.remove(&n);
            }
            Step::AddRoute(n, s) => {
                self.routes.insert(n, s);
            }
            Step::DelRoute(n) => {
                self.routes.remove(&n);
            }
        }
    }

    /// What of the host's current state is ours: routes marked with kwire's protocol (or made
    /// by `ip` with kwire's metrics), and the tun's addresses.
    pub fn adopt(index: u32, routes: &[Route], addresses: &[netlink::Address]) -> Programmed {
        let mut p = Programmed::default();
        for r in routes {
            let ours = r.protocol == RTPROT_KWIRE || r.protocol == RTPROT_BOOT;
            match r.kind {
                RouteKind::Dev(i) if ours && i == index && r.metric == PEER_ROUTE_METRIC => {
                    p.routes.insert(r.dst, r.src);
                }
                RouteKind::Blackhole if ours && r.metric == BLACKHOLE_METRIC => {
                    p.blackholes.insert(r.dst);
                }
                RouteKind::Unreachable if r.protocol == RTPROT_KWIRE => {
                    p.unreachable.insert(r.dst);
                }
                _ => {}
            }
        }
        for a in addresses {
            let link_local =
                matches!(a.addr.ip(), IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            if a.index == index && !link_local {
                p.addresses.insert(a.addr);
            }
        }
        p
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{step} on {ifname}: {source}")]
    Failed {
        step: String,
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{ifname}: {what}: {source}")]
    Netlink {
        ifname: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {ifname} does not exist")]
    NoLink { ifname: String },
}

/// The host network of the tun: remembers what it programmed.
pub struct HostNetwork {
    pub ifname: String,
    pub done: Programmed,
    nl: Option<Netlink>,
    index: Option<u32>,
    adopted: bool,
}

impl std::fmt::Debug for HostNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNetwork")
            .field("ifname", &self.ifname)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl HostNetwork {
    pub fn new(ifname: &str) -> HostNetwork {
        HostNetwork {
            ifname: ifname.to_string(),
            done: Programmed::default(),
            nl: None,
            index: None,
            adopted: false,
        }
    }

    fn netlink_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> RouteError + '_ {
        move |source| RouteError::Netlink {
            ifname: self.ifname.clone(),
            what,
            source,
        }
    }

    /// The netlink socket, the tun's index, and (once) what of the host is already ours.
    fn prepare(&mut self) -> Result<(), RouteError> {
        if self.nl.is_none() {
            let nl = Netlink::open().map_err(self.netlink_err("opening a netlink socket"))?;
            self.nl = Some(nl);
        }
        if self.index.is_none() {
            let nl = self.nl.as_mut().expect("opened above");
            let link = nl.link_by_name(&self.ifname);
            let link = link.map_err(|source| RouteError::Netlink {
                ifname: self.ifname.clone(),
                what: "listing links",
                source,
            })?;
            let link = link.ok_or_else(|| RouteError::NoLink {
                ifname: self.ifname.clone(),
            })?;
            self.index = Some(link.index);
            // Routes through a tun without a reader (the daemon died) are skipped, so the
            // blackholes and unreachable routes behind them answer.
            ignore_routes_with_linkdown(&self.ifname);
        }
        if !self.adopted {
            let index = self.index.expect("set above");
            let nl = self.nl.as_mut().expect("opened above");
            let routes = nl.routes();
            let addresses = nl.addresses();
            let (routes, addresses) = match (routes, addresses) {
                (Ok(r), Ok(a)) => (r, a),
                (Err(source), _) | (_, Err(source)) => {
                    return Err(RouteError::Netlink {
                        ifname: self.ifname.clone(),
                        what: "listing routes and addresses",
                        source,
                    })
                }
            };
            self.done = Programmed::adopt(index, &routes, &addresses);
            self.adopted = true;
        }
        Ok(())
    }

    /// Does what [`plan`] says; returns every failure (the rest is still done). A missing
    /// route or address on delete counts as done.
    pub fn sync(&mut self, want: &Desired) -> Vec<RouteError> {
        if let Err(e) = self.prepare() {
            if matches!(e, RouteError::Netlink { .. }) {
                self.nl = None;
            }
            return vec![e];
        }
        let index = self.index.expect("prepared");
        let steps = plan(&self.done, want);
        if steps.is_empty() {
            return Vec::new();
        }
        let requests: Vec<Request> = steps.iter().map(|s| s.request(index)).collect();
        let results = self.nl.as_mut().expect("prepared").execute(&requests);
        let mut errors = Vec::new();
        for ((step, req), r) in steps.iter().zip(&requests).zip(results) {
            match r {
                Ok(()) => self.done.record(step),
                Err(e) if step.is_delete() && netlink::is_gone(&e) => self.done.record(step),
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ENODEV) {
                        self.index = None;
                    }
                    errors.push(RouteError::Failed {
                        step: req.to_string(),
                        ifname: self.ifname.clone(),
                        source: e,
                    })
                }
            }
        }
        errors
    }
}

/// Sets `net.ipv{4,6}.conf.IFNAME.ignore_routes_with_linkdown`: a persistent tun whose reader
/// is gone loses its carrier, and then its routes are skipped.
fn ignore_routes_with_linkdown(ifname: &str) {
    for fam in ["ipv4", "ipv6"] {
        let key = format!("{fam}/conf/{ifname}/ignore_routes_with_linkdown");
        if let Err(e) = super::sysctl::set(&key, "1") {
            tracing::warn!(error = %e, "cannot make routes through a tun without a reader be ignored; with the daemon dead its routes stay in use (packets then drop at the tun, no ICMP unreachable)");
        }
    }
}

/// The MTU of the interface that carries traffic for `ip` (the one holding that address, else
/// the one the route to it leaves by).
pub fn underlay_mtu(ip: IpAddr) -> Option<u32> {
    let mut nl = Netlink::open().ok()?;
    let index = match nl.addresses().ok()?.into_iter().find(|a| a.addr.ip() == ip) {
        Some(a) => a.index,
        None => nl.route_get(ip).ok()??,
    };
    nl.link_by_index(index).ok()?.map(|l| l.mtu)
}

/// The tun MTU for an underlay MTU.
pub fn tunnel_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(WIREGUARD_OVERHEAD).max(1280)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_is_the_first_address() {
        assert_eq!(gateway(&n("10.244.3.0/24")), n("10.244.3.1/24"));
        assert_eq!(gateway(&n("fd00:10:244:3::/64")), n("fd00:10:244:3::1/64"));
    }

    fn want(peers: &[&str]) -> Desired {
        Desired {
            mtu: 1420,
            own: vec![n("10.244.0.0/24"), n("fd00::/64")],
            peers: peers.iter().map(|p| n(p)).collect(),
            cluster: vec![n("10.244.0.0/16"), n("fd00::/56")],
        }
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.request(7).to_string()).collect()
    }

    #[test]
    fn plans_cluster_ranges_first_then_addresses_blackholes_and_routes() {
        let w = want(&["10.244.1.0/24", "fd00:0:0:1::/64"]);
        let steps = plan(&Programmed::default(), &w);
        assert_eq!(
            lines(&steps),
            vec![
                "route replace unreachable 10.244.0.0/16 metric 4096",
                "route replace unreachable fd00::/56 metric 4096",
                "link set #7 up mtu 1420",
                "addr replace 10.244.0.1/24 dev #7",
                "addr replace fd00::1/64 dev #7",
                "route replace blackhole 10.244.0.0/24 metric 4096",
                "route replace blackhole 10.244.1.0/24 metric 4096",
                "route replace blackhole fd00::/64 metric 4096",
                "route replace blackhole fd00:0:0:1::/64 metric 4096",
                "route replace 10.244.0.0/16 dev #7 metric 100 src 10.244.0.1",
                "route replace 10.244.1.0/24 dev #7 metric 100 src 10.244.0.1",
                "route replace fd00::/56 dev #7 metric 100 src fd00::1",
                "route replace fd00:0:0:1::/64 dev #7 metric 100 src fd00::1",
            ]
        );
        let mut done = Programmed::default();
        for s in &steps {
            done.record(s);
        }
        assert!(plan(&done, &w).is_empty(), "idempotent");
        // A peer goes: its route, then its blackhole (the cluster range covers it).
        let steps = plan(&done, &want(&["10.244.1.0/24"]));
        assert_eq!(
            lines(&steps),
            vec![
                "route del fd00:0:0:1::/64 dev #7 metric 100",
                "route del blackhole fd00:0:0:1::/64 metric 4096"
            ]
        );
        // MTU change only.
        let mut w2 = w.clone();
        w2.mtu = 1400;
        assert_eq!(plan(&done, &w2), vec![Step::Mtu(1400)]);
    }

    #[test]
    fn the_cluster_ranges_come_before_anything_even_without_pod_cidrs() {
        let w = Desired {
            mtu: 1420,
            cluster: vec![n("10.244.0.0/16")],
            ..Desired::default()
        };
        let steps = plan(&Programmed::default(), &w);
        assert_eq!(steps[0], Step::Unreachable(n("10.244.0.0/16")));
        // Without an address there is no source: the route into the tun has none.
        assert!(steps.contains(&Step::AddRoute(n("10.244.0.0/16"), None)));
    }

    #[test]
    fn adopts_what_an_earlier_run_left_and_removes_what_is_stale() {
        let r = |dst: &str, kind, metric, protocol| Route {
            dst: n(dst),
            kind,
            metric,
            src: None,
            protocol,
        };
        let host = vec![
            r("10.244.0.0/16", RouteKind::Unreachable, 4096, RTPROT_KWIRE),
            r("10.244.0.0/16", RouteKind::Dev(7), 100, RTPROT_KWIRE),
            r("10.244.9.0/24", RouteKind::Dev(7), 100, RTPROT_KWIRE),
            r("10.244.9.0/24", RouteKind::Blackhole, 4096, RTPROT_KWIRE),
            // Made by `ip` in an older version.
            r("10.244.8.0/24", RouteKind::Dev(7), 100, RTPROT_BOOT),
            // Not ours: another link, another protocol.
            r("10.244.7.0/24", RouteKind::Dev(3), 100, RTPROT_KWIRE),
            r("0.0.0.0/0", RouteKind::Dev(3), 0, RTPROT_BOOT),
            r("192.0.2.0/24", RouteKind::Blackhole, 4096, 4),
        ];
        let addrs = vec![
            netlink::Address {
                index: 7,
                addr: n("10.244.0.1/24"),
            },
            netlink::Address {
                index: 7,
                addr: n("fe80::1/64"),
            },
            netlink::Address {
                index: 3,
                addr: n("192.0.2.1/24"),
            },
        ];
        let done = Programmed::adopt(7, &host, &addrs);
        assert_eq!(
            done.routes
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["10.244.0.0/16", "10.244.8.0/24", "10.244.9.0/24"]
        );
        assert_eq!(done.blackholes.len(), 1);
        assert_eq!(done.addresses.len(), 1);
        let w = Desired {
            mtu: 1420,
            own: vec![n("10.244.0.0/24")],
            peers: vec![],
            cluster: vec![n("10.244.0.0/16")],
        };
        let steps = plan(&done, &w);
        for stale in ["10.244.8.0/24", "10.244.9.0/24"] {
            assert!(
                steps.contains(&Step::DelRoute(n(stale))),
                "{stale}: {steps:?}"
            );
        }
        assert!(steps.contains(&Step::DelBlackhole(n("10.244.9.0/24"))));
        assert!(!steps.iter().any(|s| matches!(s, Step::DelUnreachable(_))));
    }

    #[test]
    fn mtu_arithmetic() {
        assert_eq!(tunnel_mtu(1500), 1420);
        assert_eq!(tunnel_mtu(9001), 8921);
        assert_eq!(tunnel_mtu(1000), 1280, "never below the IPv6 minimum");
    }
}
