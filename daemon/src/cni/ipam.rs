//! IPAM: one address per family for each pod attachment, taken from this node's `spec.podCIDRs`
//! and kept in a JSON file in the state directory, so an address is never handed out twice,
//! across restarts included.
//!
//! [`Ipam`] is the pure table; [`IpamStore`] puts it behind one mutex and writes the file
//! (temp + rename, 0600) before any change is answered.

use super::write_atomic;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What an allocation belongs to: the CNI (CNI_CONTAINERID, CNI_IFNAME) pair, as the spec
/// keys attachments (and as `cni.dev/valid-attachments` lists them).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> AttachmentKey {
        AttachmentKey {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "container {} interface {}",
            self.container_id, self.ifname
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "this node has no podCIDRs (Node spec.podCIDRs is empty): no pod address can be allocated"
    )]
    NoPodCidrs,
    #[error("podCIDR {cidr} has no free address left; delete unused pods or give the node a larger podCIDR")]
    Exhausted { cidr: IpNetwork },
    #[error("{key} already has addresses {ips:?}")]
    AlreadyAllocated {
        key: AttachmentKey,
        ips: Vec<IpAddr>,
    },
    #[error("writing IPAM state {}: {source}", path.display())]
    Persist {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading IPAM state {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("IPAM state {} is not valid JSON ({source}); move it aside to start afresh (pods keep their tuns, GC reconciles)", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl IpamError {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            IpamError::NoPodCidrs => "no_pod_cidrs",
            IpamError::Exhausted { .. } => "exhausted",
            IpamError::AlreadyAllocated { .. } => "already_allocated",
            IpamError::Persist { .. } => "persist",
            IpamError::Load { .. } => "load",
            IpamError::Corrupt { .. } => "corrupt",
        }
    }
}

/// The on-disk form.
#[derive(Serialize, Deserialize, Default)]
struct IpamFile {
    #[serde(default)]
    allocations: Vec<Allocation>,
    /// Last address handed out per pool, so a released address is reused as late as possible.
    #[serde(default)]
    last: Vec<IpAddr>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Allocation {
    #[serde(flatten)]
    key: AttachmentKey,
    ips: Vec<IpAddr>,
}

/// The allocation table: pure logic, no I/O.
#[derive(Clone, Debug, PartialEq)]
pub struct Ipam {
    /// One pool per family (the first podCIDR of each family), network address normalised.
    pools: Vec<IpNetwork>,
    allocations: BTreeMap<AttachmentKey, Vec<IpAddr>>,
    /// Per pool, the offset last handed out.
    last: Vec<u128>,
}

/// Offsets of the usable host addresses of `net`: not the network address, not the first
/// address (the node's gateway on kwire0), not the IPv4 broadcast. `None` when empty.
fn usable(net: &IpNetwork) -> Option<(u128, u128)> {
    let host_bits = u32::from(
        match net {
            IpNetwork::V4(_) => 32u8,
            IpNetwork::V6(_) => 128u8,
        } - net.prefix(),
    );
    let last = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let hi = if net.is_ipv4() {
        last.checked_sub(1)?
    } else {
        last
    };
    (hi >= 2).then_some((2, hi))
}

fn base(net: &IpNetwork) -> u128 {
    match net.network() {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn at(net: &IpNetwork, off: u128) -> IpAddr {
    match net {
        IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from((base(net) + off) as u32)),
        IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(base(net) + off)),
    }
}

impl Ipam {
    /// A table over `pod_cidrs` (the node's `spec.podCIDRs`): the first CIDR of each family.
    pub fn new(pod_cidrs: &[IpNetwork]) -> Ipam {
        let mut pools: Vec<IpNetwork> = Vec::new();
        for c in pod_cidrs {
            if pools.iter().all(|p| p.is_ipv4() != c.is_ipv4()) {
                pools.push(
                    IpNetwork::new(c.network(), c.prefix()).expect("prefix of a valid network"),
                );
            }
        }
        let last = vec![0; pools.len()];
        Ipam {
            pools,
            allocations: BTreeMap::new(),
            last,
        }
    }

    pub fn pools(&self) -> &[IpNetwork] {
        &self.pools
    }

    /// The node's gateway address in each pool (the first host address), the one kwire0 holds.
    pub fn gateways(&self) -> Vec<IpAddr> {
        self.pools.iter().map(|p| at(p, 1)).collect()
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&[IpAddr]> {
        self.allocations.get(key).map(Vec::as_slice)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&AttachmentKey, &[IpAddr])> {
        self.allocations.iter().map(|(k, v)| (k, v.as_slice()))
    }

    /// Allocates one address per pool for `key`.
    pub fn allocate(&mut self, key: &AttachmentKey) -> Result<Vec<IpAddr>, IpamError> {
        if let Some(ips) = self.allocations.get(key) {
            return Err(IpamError::AlreadyAllocated {
                key: key.clone(),
                ips: ips.clone(),
            });
        }
        if self.pools.is_empty() {
            return Err(IpamError::NoPodCidrs);
        }
        let used: HashSet<IpAddr> = self.allocations.values().flatten().copied().collect();
        let mut ips = Vec::with_capacity(self.pools.len());
        let mut offs = Vec::with_capacity(self.pools.len());
        for (i, pool) in self.pools.iter().enumerate() {
            let (lo, hi) = usable(pool).ok_or(IpamError::Exhausted { cidr: *pool })?;
            let span = hi - lo + 1;
            let in_pool = used.iter().filter(|a| pool.contains(**a)).count() as u128;
            // Among `in_pool + 1` consecutive candidates at least one is free (if the pool has them).
            let tries = span.min(in_pool + 1);
            let start = if (lo..=hi).contains(&self.last[i]) {
                self.last[i] - lo + 1
            } else {
                0
            };
            let found = (0..tries)
                .map(|t| lo + (start + t) % span)
                .find(|off| !used.contains(&at(pool, *off)))
                .ok_or(IpamError::Exhausted { cidr: *pool })?;
            ips.push(at(pool, found));
            offs.push(found);
        }
        for (i, off) in offs.into_iter().enumerate() {
            self.last[i] = off;
        }
        self.allocations.insert(key.clone(), ips.clone());
        Ok(ips)
    }

    /// Releases what `key` holds; `None` if it held nothing (DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Vec<IpAddr>> {
        self.allocations.remove(key)
    }

    /// Releases every allocation `keep` refuses (GC); returns what was released.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&AttachmentKey) -> bool,
    ) -> Vec<(AttachmentKey, Vec<IpAddr>)> {
        let gone: Vec<AttachmentKey> = self
            .allocations
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|k| self.allocations.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// The file form.
    pub fn to_json(&self) -> Vec<u8> {
        let f = IpamFile {
            allocations: self
                .allocations
                .iter()
                .map(|(k, v)| Allocation {
                    key: k.clone(),
                    ips: v.clone(),
                })
                .collect(),
            last: self
                .pools
                .iter()
                .zip(&self.last)
                .map(|(p, off)| at(p, *off))
                .collect(),
        };
        serde_json::to_vec_pretty(&f).expect("IPAM state serialises")
    }

    /// Reads the file form over `pod_cidrs`. Allocations outside today's pools are kept (they
    /// are released by DEL or GC, never handed out again meanwhile).
    pub fn from_json(pod_cidrs: &[IpNetwork], bytes: &[u8]) -> Result<Ipam, serde_json::Error> {
        let f: IpamFile = serde_json::from_slice(bytes)?;
        let mut ipam = Ipam::new(pod_cidrs);
        for a in f.allocations {
            ipam.allocations.insert(a.key, a.ips);
        }
        for (i, pool) in ipam.pools.iter().enumerate() {
            if let Some(a) = f.last.iter().find(|a| pool.contains(**a)) {
                ipam.last[i] = match a {
                    IpAddr::V4(a) => u32::from(*a) as u128,
                    IpAddr::V6(a) => u128::from(*a),
                } - base(pool);
            }
        }
        Ok(ipam)
    }
}

/// [`Ipam`] behind one mutex, written to `path` before any change is answered.
#[derive(Debug)]
pub struct IpamStore {
    path: PathBuf,
    inner: Mutex<Ipam>,
}

impl IpamStore {
    /// Loads `path` (a missing file is an empty table) over the node's podCIDRs.
    pub fn open(path: &Path, pod_cidrs: &[IpNetwork]) -> Result<IpamStore, IpamError> {
        let ipam = match std::fs::read(path) {
            Ok(b) => Ipam::from_json(pod_cidrs, &b).map_err(|source| IpamError::Corrupt {
                path: path.into(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ipam::new(pod_cidrs),
            Err(source) => {
                return Err(IpamError::Load {
                    path: path.into(),
                    source,
                })
            }
        };
        Ok(IpamStore {
            path: path.into(),
            inner: Mutex::new(ipam),
        })
    }

    /// Runs `f` on a copy of the table, writes the copy, then makes it current: a failed write
    /// changes nothing.
    fn update<R>(&self, f: impl FnOnce(&mut Ipam) -> Result<R, IpamError>) -> Result<R, IpamError> {
        let mut cur = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = cur.clone();
        let r = f(&mut next)?;
        if next != *cur {
            write_atomic(&self.path, &next.to_json()).map_err(|source| IpamError::Persist {
                path: self.path.clone(),
                source,
            })?;
            *cur = next;
        }
        Ok(r)
    }

    pub fn allocate(&self, key: &AttachmentKey) -> Result<Vec<IpAddr>, IpamError> {
        self.update(|t| t.allocate(key))
    }

    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Vec<IpAddr>>, IpamError> {
        self.update(|t| Ok(t.release(key)))
    }

    pub fn retain(
        &self,
        keep: impl FnMut(&AttachmentKey) -> bool,
    ) -> Result<Vec<(AttachmentKey, Vec<IpAddr>)>, IpamError> {
        self.update(|t| Ok(t.retain(keep)))
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<Vec<IpAddr>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(<[IpAddr]>::to_vec)
    }

    /// A copy of the table.
    pub fn snapshot(&self) -> Ipam {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidrs(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn k(c: &str) -> AttachmentKey {
        AttachmentKey::new(c, "eth0")
    }

    #[test]
    fn dual_stack_skips_network_gateway_and_broadcast() {
        let mut t = Ipam::new(&cidrs(&[
            "10.244.7.0/30",
            "fd00:10:244:7::/126",
            "10.9.0.0/16",
        ]));
        assert_eq!(t.pools().len(), 2, "one pool per family");
        assert_eq!(
            t.gateways(),
            vec![
                "10.244.7.1".parse::<IpAddr>().unwrap(),
                "fd00:10:244:7::1".parse().unwrap()
            ]
        );
        let a = t.allocate(&k("a")).unwrap();
        assert_eq!(
            a,
            vec![
                "10.244.7.2".parse::<IpAddr>().unwrap(),
                "fd00:10:244:7::2".parse().unwrap()
            ]
        );
        // /30: .0 network, .1 gateway, .3 broadcast: nothing left for IPv4.
        assert!(matches!(
            t.allocate(&k("b")),
            Err(IpamError::Exhausted { .. })
        ));
        assert!(matches!(
            t.allocate(&k("a")),
            Err(IpamError::AlreadyAllocated { .. })
        ));
        assert_eq!(t.release(&k("a")), Some(a.clone()));
        assert_eq!(t.release(&k("a")), None);
        let b = t.allocate(&k("b")).unwrap();
        assert_eq!(b[0], a[0], "the only IPv4 address, free again");
        assert_ne!(b[1], a[1], "the IPv6 cursor moved on");
    }

    #[test]
    fn released_addresses_are_reused_last_and_gc_retains_listed() {
        let mut t = Ipam::new(&cidrs(&["10.0.0.0/29"]));
        let a = t.allocate(&k("a")).unwrap();
        t.release(&k("a"));
        let b = t.allocate(&k("b")).unwrap();
        assert_ne!(a, b, "the cursor moves on");
        t.allocate(&k("c")).unwrap();
        let gone = t.retain(|key| key.container_id == "c");
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, k("b"));
        assert!(t.get(&k("c")).is_some());
        assert!(matches!(
            Ipam::new(&[]).allocate(&k("x")),
            Err(IpamError::NoPodCidrs)
        ));
        assert!(matches!(
            Ipam::new(&cidrs(&["10.0.0.0/31"])).allocate(&k("x")),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn json_round_trip_keeps_allocations_and_cursor() {
        let pools = cidrs(&["10.244.7.0/24", "fd00:10:244:7::/64"]);
        let mut t = Ipam::new(&pools);
        t.allocate(&k("a")).unwrap();
        t.allocate(&AttachmentKey::new("a", "net1")).unwrap();
        let j = t.to_json();
        let s = String::from_utf8(j.clone()).unwrap();
        assert!(s.contains("\"containerID\": \"a\""), "{s}");
        assert_eq!(Ipam::from_json(&pools, &j).unwrap(), t);
    }

    #[test]
    fn store_persists_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipam.json");
        let pools = cidrs(&["10.244.7.0/24"]);
        let s = IpamStore::open(&p, &pools).unwrap();
        let a = s.allocate(&k("a")).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let s2 = IpamStore::open(&p, &pools).unwrap();
        assert_eq!(s2.get(&k("a")), Some(a.clone()));
        assert_ne!(s2.allocate(&k("b")).unwrap(), a);
        std::fs::write(&p, b"{oops").unwrap();
        assert!(matches!(
            IpamStore::open(&p, &pools),
            Err(IpamError::Corrupt { .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8),
        Del(u8),
        Gc(Vec<u8>),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12).prop_map(Op::Add),
            3 => (0u8..12).prop_map(Op::Del),
            1 => proptest::collection::vec(0u8..12, 0..6).prop_map(Op::Gc),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        // Each step writes (and fsyncs) the file: keep the case count modest.
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a model (the set of live keys): no address is ever held by two live
        /// attachments, none is a reserved one, and restarts lose nothing.
        #[test]
        fn never_twice(ops in proptest::collection::vec(op(), 1..80)) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("ipam.json");
            // Small pools so exhaustion and reuse happen: 5 usable v4, 6 usable v6.
            let pools = cidrs(&["10.1.2.0/29", "fd00::/125"]);
            let mut store = IpamStore::open(&p, &pools).unwrap();
            let mut live: BTreeMap<AttachmentKey, Vec<IpAddr>> = BTreeMap::new();
            let reserved: HashSet<IpAddr> = ["10.1.2.0", "10.1.2.1", "10.1.2.7", "fd00::", "fd00::1"].iter().map(|a| a.parse().unwrap()).collect();
            for op in ops {
                match op {
                    Op::Add(n) => {
                        let key = k(&format!("c{n}"));
                        match store.allocate(&key) {
                            Ok(ips) => {
                                prop_assert!(!live.contains_key(&key));
                                prop_assert_eq!(ips.len(), 2);
                                for ip in &ips {
                                    prop_assert!(!reserved.contains(ip), "reserved {} handed out", ip);
                                    prop_assert!(live.values().flatten().all(|x| x != ip), "{} handed out twice", ip);
                                }
                                live.insert(key, ips);
                            }
                            Err(IpamError::AlreadyAllocated { .. }) => prop_assert!(live.contains_key(&key)),
                            Err(IpamError::Exhausted { .. }) => prop_assert!(live.len() >= 5),
                            Err(e) => prop_assert!(false, "{}", e),
                        }
                    }
                    Op::Del(n) => {
                        let key = k(&format!("c{n}"));
                        prop_assert_eq!(store.release(&key).unwrap(), live.remove(&key));
                    }
                    Op::Gc(keep) => {
                        let keep: HashSet<AttachmentKey> = keep.iter().map(|n| k(&format!("c{n}"))).collect();
                        store.retain(|key| keep.contains(key)).unwrap();
                        live.retain(|key, _| keep.contains(key));
                    }
                    Op::Restart => store = IpamStore::open(&p, &pools).unwrap(),
                }
                let snap = store.snapshot();
                let got: BTreeMap<AttachmentKey, Vec<IpAddr>> = snap.allocations().map(|(k, v)| (k.clone(), v.to_vec())).collect();
                prop_assert_eq!(&got, &live);
            }
        }
    }
}
