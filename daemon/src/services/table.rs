//! The service table: an immutable snapshot, compiled from Service and EndpointSlice views,
//! that maps every frontend (protocol, ClusterIP, port) to its usable backends and their
//! Maglev lookup table. The control plane compiles it after a change and swaps it in whole;
//! the loop reads it for a flow's first packet.

use super::maglev;
use super::model::{ServiceView, SliceView, SCTP};
use crate::wg::allowed_ips::IntHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, SocketAddr};

/// A frontend: what a client addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub proto: u8,
    pub ip: IpAddr,
    pub port: u16,
}

/// One frontend's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// The Service, by index into [`ServiceTable::service_name`].
    pub service: u32,
    /// Sorted; the ready endpoints, or the serving terminating ones when none is ready.
    backends: Box<[SocketAddr]>,
    /// Maglev's lookup table: indexes into `backends`.
    lut: Box<[u16]>,
}

impl Frontend {
    fn new(service: u32, mut backends: Vec<SocketAddr>) -> Frontend {
        backends.sort_unstable();
        backends.dedup();
        let names: Vec<Vec<u8>> = backends.iter().map(backend_bytes).collect();
        let lut = maglev::build(&names, maglev::table_size(backends.len()));
        Frontend {
            service,
            backends: backends.into(),
            lut: lut.into(),
        }
    }

    /// The backend for a flow of hash `h` ([`flow_hash`]); `None` when the Service has no
    /// usable endpoint.
    #[inline]
    pub fn pick(&self, h: u64) -> Option<SocketAddr> {
        if self.lut.is_empty() {
            return None;
        }
        let i = self.lut[(h % self.lut.len() as u64) as usize];
        self.backends.get(i as usize).copied()
    }

    /// Whether `b` is still one of the backends (a flow pinned to a removed one is moved).
    #[inline]
    pub fn has(&self, b: SocketAddr) -> bool {
        self.backends.binary_search(&b).is_ok()
    }

    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }
}

/// A backend's name for Maglev: its address bytes, then its port.
fn backend_bytes(b: &SocketAddr) -> Vec<u8> {
    let mut v = match b.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.extend_from_slice(&b.port().to_be_bytes());
    v
}

/// The hash of a flow to a frontend, the same on every node and after a restart.
#[inline]
pub fn flow_hash(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> u64 {
    let mut b = [0u8; 37];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        b[n..n + s.len()].copy_from_slice(s);
        n += s.len();
    };
    put(&[proto]);
    for (ip, port) in [(src, sport), (dst, dport)] {
        match ip {
            IpAddr::V4(a) => put(&a.octets()),
            IpAddr::V6(a) => put(&a.octets()),
        }
        put(&port.to_be_bytes());
    }
    maglev::hash(0x6b77_6972_652d_666c, &b[..n])
}

/// The compiled table.
#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    frontends: HashMap<FrontendKey, Frontend, BuildHasherDefault<IntHasher>>,
    /// `namespace/name` of every Service with a frontend.
    names: Vec<String>,
}

impl ServiceTable {
    /// Compiles Services and their EndpointSlices. Every frontend of a Service with a
    /// ClusterIP is present, with no backend when no endpoint is usable (the loop rejects its
    /// flows). SCTP ports are left out: their checksum (CRC32c) is not translated yet.
    pub fn compile(services: &[ServiceView], slices: &[SliceView]) -> ServiceTable {
        let mut by_service: BTreeMap<(&str, &str), Vec<&SliceView>> = BTreeMap::new();
        for s in slices {
            by_service
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        let mut sorted: Vec<&ServiceView> = services.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut t = ServiceTable::default();
        for svc in sorted {
            let slices = by_service
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let index = t.names.len() as u32;
            let mut any = false;
            for ip in &svc.cluster_ips {
                for p in svc.ports.iter().filter(|p| p.proto != SCTP) {
                    let key = FrontendKey {
                        proto: p.proto,
                        ip: *ip,
                        port: p.port,
                    };
                    if t.frontends.contains_key(&key) {
                        continue; // two Services claim one address: the first by name keeps it
                    }
                    let backends = usable(slices, ip.is_ipv4(), &p.name, p.proto);
                    t.frontends.insert(key, Frontend::new(index, backends));
                    any = true;
                }
            }
            if any {
                t.names.push(format!("{}/{}", svc.namespace, svc.name));
            }
        }
        t
    }

    /// The frontend a packet addresses, if it is one.
    #[inline]
    pub fn lookup(&self, proto: u8, ip: IpAddr, port: u16) -> Option<&Frontend> {
        if self.frontends.is_empty() {
            return None;
        }
        self.frontends.get(&FrontendKey { proto, ip, port })
    }

    /// Services with at least one frontend.
    pub fn services(&self) -> usize {
        self.names.len()
    }

    /// Frontends (protocol, ClusterIP, port).
    pub fn frontends(&self) -> usize {
        self.frontends.len()
    }

    /// Backends summed over every frontend (an endpoint behind two ports counts twice).
    pub fn backends(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }

    /// Frontends with no usable endpoint.
    pub fn without_endpoints(&self) -> usize {
        self.frontends
            .values()
            .filter(|f| f.backends.is_empty())
            .count()
    }

    pub fn service_name(&self, index: u32) -> Option<&str> {
        self.names.get(index as usize).map(String::as_str)
    }

    /// Every frontend, sorted (reports, tests).
    pub fn entries(&self) -> Vec<(FrontendKey, &Frontend)> {
        let mut v: Vec<_> = self.frontends.iter().map(|(k, f)| (*k, f)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

/// The backends of one Service port in one family: the ready endpoints of its slices; when
/// none is ready, the serving ones that are terminating (as kube-proxy does).
fn usable(slices: &[&SliceView], v4: bool, port_name: &str, proto: u8) -> Vec<SocketAddr> {
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .find(|p| p.name == port_name && p.proto == proto)
            .map(|p| p.port)
        else {
            continue;
        };
        for e in &s.endpoints {
            let into = if e.ready {
                &mut ready
            } else if e.serving && e.terminating {
                &mut terminating
            } else {
                continue;
            };
            into.extend(
                e.addresses
                    .iter()
                    .filter(|a| a.is_ipv4() == v4)
                    .map(|a| SocketAddr::new(*a, port)),
            );
        }
    }
    if ready.is_empty() {
        terminating
    } else {
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::model::{EndpointView, ServicePortView, SlicePortView, TCP, UDP};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(name: &str, ips: &[&str], ports: &[(&str, u8, u16)]) -> ServiceView {
        ServiceView {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: ips.iter().map(|i| ip(i)).collect(),
            ports: ports
                .iter()
                .map(|(n, proto, port)| ServicePortView {
                    name: n.to_string(),
                    proto: *proto,
                    port: *port,
                })
                .collect(),
        }
    }

    fn ep(addrs: &[&str], ready: bool, terminating: bool) -> EndpointView {
        EndpointView {
            addresses: addrs.iter().map(|a| ip(a)).collect(),
            ready,
            serving: ready || terminating,
            terminating,
        }
    }

    fn slice(service: &str, ports: &[(&str, u8, u16)], eps: Vec<EndpointView>) -> SliceView {
        SliceView {
            namespace: "shop".into(),
            service: service.into(),
            ports: ports
                .iter()
                .map(|(n, proto, port)| SlicePortView {
                    name: n.to_string(),
                    proto: *proto,
                    port: *port,
                })
                .collect(),
            endpoints: eps,
        }
    }

    #[test]
    fn frontends_per_family_and_port_with_resolved_target_ports() {
        let services = [svc(
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &[("http", TCP, 80), ("dns", UDP, 53), ("x", SCTP, 9)],
        )];
        let slices = [
            // The slice names the Service port and the number the pods listen on: a named
            // targetPort ("http" -> 8080 on these pods) was resolved by the slice controller.
            slice(
                "web",
                &[("http", TCP, 8080), ("dns", UDP, 5353)],
                vec![
                    ep(&["10.244.1.5"], true, false),
                    ep(&["10.244.2.5"], true, false),
                ],
            ),
            slice(
                "web",
                &[("http", TCP, 8080)],
                vec![ep(&["fd00:244:1::5"], true, false)],
            ),
        ];
        let t = ServiceTable::compile(&services, &slices);
        assert_eq!((t.services(), t.frontends()), (1, 4), "SCTP left out");
        let f = t.lookup(TCP, ip("10.96.0.10"), 80).unwrap();
        assert_eq!(
            f.backends(),
            &[
                "10.244.1.5:8080".parse().unwrap(),
                "10.244.2.5:8080".parse().unwrap()
            ]
        );
        let d = t.lookup(UDP, ip("10.96.0.10"), 53).unwrap();
        assert_eq!(d.backends()[0].port(), 5353);
        let v6 = t.lookup(TCP, ip("fd00:96::10"), 80).unwrap();
        assert_eq!(v6.backends(), &["[fd00:244:1::5]:8080".parse().unwrap()]);
        assert!(
            t.lookup(UDP, ip("fd00:96::10"), 53)
                .unwrap()
                .pick(1)
                .is_none(),
            "no IPv6 endpoint for dns: present, rejecting"
        );
        assert!(t.lookup(TCP, ip("10.96.0.10"), 81).is_none());
        assert_eq!(t.service_name(f.service), Some("shop/web"));
    }

    #[test]
    fn terminating_endpoints_only_when_none_is_ready() {
        let services = [svc("web", &["10.96.0.10"], &[("", TCP, 80)])];
        let both = [slice(
            "web",
            &[("", TCP, 80)],
            vec![
                ep(&["10.244.1.5"], true, false),
                ep(&["10.244.1.6"], false, true),
                ep(&["10.244.1.7"], false, false),
            ],
        )];
        let t = ServiceTable::compile(&services, &both);
        let f = t.lookup(TCP, ip("10.96.0.10"), 80).unwrap();
        assert_eq!(f.backends(), &["10.244.1.5:80".parse().unwrap()]);
        let only_terminating = [slice(
            "web",
            &[("", TCP, 80)],
            vec![
                ep(&["10.244.1.6"], false, true),
                ep(&["10.244.1.7"], false, false),
            ],
        )];
        let t = ServiceTable::compile(&services, &only_terminating);
        let f = t.lookup(TCP, ip("10.96.0.10"), 80).unwrap();
        assert_eq!(f.backends(), &["10.244.1.6:80".parse().unwrap()]);
        let t = ServiceTable::compile(&services, &[]);
        assert_eq!(t.without_endpoints(), 1);
    }

    #[test]
    fn same_choice_on_every_node_whatever_the_input_order() {
        let services = [
            svc("a", &["10.96.0.10"], &[("", TCP, 80)]),
            svc("b", &["10.96.0.11"], &[("", TCP, 80)]),
        ];
        let eps = |order: &[usize]| {
            let all = ["10.244.1.5", "10.244.2.5", "10.244.3.5", "10.244.1.9"];
            order
                .iter()
                .map(|i| ep(&[all[*i]], true, false))
                .collect::<Vec<_>>()
        };
        let one = ServiceTable::compile(
            &services,
            &[
                slice("a", &[("", TCP, 80)], eps(&[0, 1, 2, 3])),
                slice("b", &[("", TCP, 80)], eps(&[0])),
            ],
        );
        let rev: Vec<ServiceView> = services.iter().rev().cloned().collect();
        let two = ServiceTable::compile(
            &rev,
            &[
                slice("b", &[("", TCP, 80)], eps(&[0])),
                slice("a", &[("", TCP, 80)], eps(&[3, 1])),
                slice("a", &[("", TCP, 80)], eps(&[2, 0])),
            ],
        );
        let (fa, fb) = (
            one.lookup(TCP, ip("10.96.0.10"), 80).unwrap(),
            two.lookup(TCP, ip("10.96.0.10"), 80).unwrap(),
        );
        assert_eq!(fa, fb);
        for sport in 1000..1200 {
            let h = flow_hash(TCP, ip("10.244.1.5"), sport, ip("10.96.0.10"), 80);
            assert_eq!(fa.pick(h), fb.pick(h));
        }
    }
}
