//! The service table: an immutable snapshot, compiled from Service and EndpointSlice views,
//! that maps every frontend (protocol, address, port) to its usable backends and their
//! Maglev lookup table. The control plane compiles it after a change and swaps it in whole;
//! the loop reads it for a flow's first packet.
//!
//! Frontends are a Service's ClusterIPs, its LoadBalancer ingress IPs (as its ClusterIP, for
//! pods: kube-proxy short-circuits them the same way), and its node ports. The kernel steers
//! a node port (any local address) and an ingress IP reaching the node to the node-port
//! address of the family ([`Scope::node_port_addrs`]: the network address of the Service
//! range, which kube-apiserver never allocates) with the node port as destination port; so
//! `(protocol, node-port address, nodePort)` is the node port's frontend, and node ports can
//! never collide with a ClusterIP's ports. The same address is the source a hairpinned flow
//! (a pod reaching itself through its Service) gets, so that the pod accepts it.

use super::maglev;
use super::model::{ServiceView, SliceView};
use crate::wg::allowed_ips::IntHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

/// A frontend: what a client addresses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct FrontendKey {
    pub proto: u8,
    pub ip: IpAddr,
    pub port: u16,
}

/// Which endpoints serve a frontend's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Every usable endpoint (a ClusterIP, an ingress IP from a pod, a node port with
    /// `externalTrafficPolicy: Cluster`: the kernel masqueraded it to this node).
    Cluster,
    /// This node's endpoints only (`internalTrafficPolicy: Local`); none: dropped.
    Local,
    /// A node port with `externalTrafficPolicy: Local`: a client from elsewhere (its address
    /// kept) reaches this node's endpoints only (none: dropped, the load balancer's health
    /// check steers it away); this node's own traffic (masqueraded to its gateway
    /// address) reaches every endpoint, as kube-proxy does.
    ExternalLocal,
}

/// Backends and their Maglev table. Shared: every frontend with the same backends (a
/// Service's ClusterIPs, ingress IPs and node port; the same Service in the next compile)
/// holds the same table.
///
/// The table is built at the pool's first pick, not at compile time: of a large cluster's
/// Services, a node's pods reach few, and the tables (4 KiB each up to 40 backends) would be
/// most of the service table's memory (40 MB of 10,000 Services) and most of a compile's
/// work. The first new flow to a pool waits for the build (tens of microseconds for 10
/// backends); the table depends on the backends alone, so a lazy table is the one a compile
/// would have built, on every node.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// Sorted.
    backends: Arc<[SocketAddr]>,
    /// Maglev's lookup table (indexes into `backends`), once built.
    lut: Arc<OnceLock<Lut>>,
}

/// Pools are equal when their backends are: the table follows from them.
impl PartialEq for Pool {
    fn eq(&self, other: &Pool) -> bool {
        self.backends == other.backends
    }
}

impl Eq for Pool {}

/// A Maglev lookup table, one byte per entry up to 256 backends (nearly every Service):
/// half the memory, and half the cache lines a new flow's pick can land on, of two bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lut {
    Narrow(Box<[u8]>),
    Wide(Box<[u16]>),
}

impl Lut {
    fn new(table: Vec<u16>, backends: usize) -> Lut {
        if backends <= 256 {
            Lut::Narrow(table.into_iter().map(|i| i as u8).collect())
        } else {
            Lut::Wide(table.into_boxed_slice())
        }
    }

    /// The backend index for hash `h`; `None` when empty.
    #[inline]
    fn get(&self, h: u64) -> Option<usize> {
        match self {
            Lut::Narrow(t) if !t.is_empty() => Some(t[(h % t.len() as u64) as usize] as usize),
            Lut::Wide(t) if !t.is_empty() => Some(t[(h % t.len() as u64) as usize] as usize),
            _ => None,
        }
    }
}

impl Pool {
    /// The pool of `backends` (any order, duplicates allowed), from `pools` if a compile
    /// already built it.
    fn new(mut backends: Vec<SocketAddr>, pools: &mut Pools) -> Pool {
        backends.sort_unstable();
        backends.dedup();
        pools.get(backends)
    }

    /// The Maglev table of the sorted, distinct backends: built at the first call.
    #[inline]
    fn lut(&self) -> &Lut {
        self.lut.get_or_init(|| {
            let names: Vec<Vec<u8>> = self.backends.iter().map(backend_bytes).collect();
            let lut = maglev::build(&names, maglev::table_size(self.backends.len()));
            Lut::new(lut, self.backends.len())
        })
    }

    /// The backend for a flow of hash `h` ([`flow_hash`]); `None` without backends.
    #[inline]
    pub fn pick(&self, h: u64) -> Option<SocketAddr> {
        if self.backends.is_empty() {
            return None;
        }
        let i = self.lut().get(h)?;
        self.backends.get(i).copied()
    }

    /// Whether `b` is one of the backends (a flow pinned to a removed one is moved).
    #[inline]
    pub fn has(&self, b: SocketAddr) -> bool {
        self.backends.binary_search(&b).is_ok()
    }

    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

/// The Maglev tables of the compiled Services, shared: every Service's frontends with the
/// same backends hold one table, and a Service recompiled with backends some Service already
/// has (the same Service after a change elsewhere in it, two Services over the same pods)
/// gets that table instead of building one. A pool is keyed by its sorted backends, and its
/// table depends on nothing else, so a shared pool is exactly the one a build would make. A
/// pool goes when the last Service holding it does.
#[derive(Debug, Default)]
struct Pools {
    /// Each pool, with how many frontends of the compiled Services hold it.
    pools: HashMap<Arc<[SocketAddr]>, (Pool, usize)>,
    /// Pools made (not shared) since the last [`Pools::take_built`].
    built: usize,
}

impl Pools {
    fn get(&mut self, backends: Vec<SocketAddr>) -> Pool {
        if let Some((p, users)) = self.pools.get_mut(backends.as_slice()) {
            *users += 1;
            return p.clone();
        }
        self.built += 1;
        let pool = Pool {
            backends: backends.into(),
            lut: Arc::default(),
        };
        self.pools.insert(pool.backends.clone(), (pool.clone(), 1));
        pool
    }

    /// A frontend no longer holds `pool` (one [`Pools::get`] undone).
    fn release(&mut self, pool: &Pool) {
        if let Some((_, users)) = self.pools.get_mut(&pool.backends) {
            *users -= 1;
            if *users == 0 {
                self.pools.remove(&pool.backends);
            }
        }
    }

    fn take_built(&mut self) -> usize {
        std::mem::take(&mut self.built)
    }

    /// Distinct pools held.
    fn len(&self) -> usize {
        self.pools.len()
    }
}

/// One frontend's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// The Service's `namespace/name`.
    service: Arc<str>,
    /// The ready endpoints, or the serving terminating ones when none is ready.
    all: Pool,
    /// Those of `all` on this node (only for `Local` and `ExternalLocal`).
    local: Pool,
    pub serve: Serve,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend; 0: no affinity.
    pub affinity_secs: u32,
}

impl Frontend {
    fn new(
        service: Arc<str>,
        backends: Vec<(SocketAddr, bool)>,
        serve: Serve,
        affinity_secs: u32,
        pools: &mut Pools,
    ) -> Frontend {
        let local = if serve == Serve::Cluster {
            Pool::default()
        } else {
            Pool::new(
                backends.iter().filter(|b| b.1).map(|b| b.0).collect(),
                pools,
            )
        };
        Frontend {
            service,
            all: Pool::new(backends.into_iter().map(|b| b.0).collect(), pools),
            local,
            serve,
            affinity_secs,
        }
    }

    /// The Service's `namespace/name`.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Gives back the pools [`Frontend::new`] took.
    fn release(&self, pools: &mut Pools) {
        pools.release(&self.all);
        if self.serve != Serve::Cluster {
            pools.release(&self.local);
        }
    }

    /// The pool that serves a new flow (`from_node`: the client is this node itself, or was
    /// masqueraded to it); `Err(true)`: the Service has no usable endpoint at all (the
    /// client is refused), `Err(false)`: none on this node (dropped, as kube-proxy does).
    #[inline]
    pub fn pool(&self, from_node: bool) -> Result<&Pool, bool> {
        let p = match self.serve {
            Serve::Cluster => &self.all,
            Serve::ExternalLocal if from_node => &self.all,
            Serve::Local | Serve::ExternalLocal => &self.local,
        };
        if p.is_empty() {
            return Err(self.all.is_empty());
        }
        Ok(p)
    }

    /// The backend for a flow of hash `h` among all usable endpoints; `None` without one.
    #[inline]
    pub fn pick(&self, h: u64) -> Option<SocketAddr> {
        self.all.pick(h)
    }

    /// How this frontend serves a new flow `src:sport -> dst:dport` (`from_node`: the client
    /// is this node, as for [`Frontend::pool`]): the one selection the packet loop and
    /// `kwire policy trace` both make. Cheap: the flow's hash is computed only by
    /// [`Selection::pick`].
    #[inline]
    pub fn select(
        &self,
        from_node: bool,
        proto: u8,
        (src, sport): (IpAddr, u16),
        (dst, dport): (IpAddr, u16),
    ) -> Selection<'_> {
        Selection {
            pool: self.pool(from_node),
            proto,
            src,
            // `sessionAffinity: ClientIP`: the client address alone decides, so that all its
            // flows pick one backend, on every node and after a restart, before the loop
            // remembers it (which keeps it while the backends change).
            sport: if self.affinity_secs == 0 { sport } else { 0 },
            dst,
            dport,
        }
    }

    /// Whether `b` is still one of the usable endpoints.
    #[inline]
    pub fn has(&self, b: SocketAddr) -> bool {
        self.all.has(b)
    }

    pub fn backends(&self) -> &[SocketAddr] {
        self.all.backends()
    }

    /// This node's endpoints (`Local` policies only).
    pub fn local_backends(&self) -> &[SocketAddr] {
        self.local.backends()
    }
}

/// A new flow's selection ([`Frontend::select`]): the pool that serves it and the backend
/// Maglev picks there for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection<'a> {
    /// As [`Frontend::pool`]: `Err(true)` refused (no usable endpoint), `Err(false)` dropped
    /// (none on this node for a `Local` policy).
    pub pool: Result<&'a Pool, bool>,
    proto: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
}

impl Selection<'_> {
    /// Maglev's backend for the flow among the pool's; `None` when the pool is unusable.
    #[inline]
    pub fn pick(&self) -> Option<SocketAddr> {
        let pool = self.pool.ok()?;
        pool.pick(flow_hash(
            self.proto, self.src, self.sport, self.dst, self.dport,
        ))
    }

    /// Whether `b` may keep serving flows of this selection (a flow pinned to a removed
    /// endpoint, or to one off this node for a `Local` policy, is moved).
    #[inline]
    pub fn has(&self, b: SocketAddr) -> bool {
        self.pool.is_ok_and(|p| p.has(b))
    }

    /// The backends the choice is among (none when the pool is unusable).
    pub fn backends(&self) -> &[SocketAddr] {
        self.pool.map(Pool::backends).unwrap_or_default()
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

/// What a node's table depends on besides the objects.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node: Option<String>,
    /// Per family, the address the kernel steers node-port traffic to (the network address
    /// of `--service-cidr`); none: no node ports in that family.
    pub node_port_addrs: Vec<IpAddr>,
    /// The Service ranges (`--service-cidr`): a ClusterIP lies in one, a LoadBalancer
    /// ingress IP does not. Only ClusterIPs are served to external peers.
    pub ranges: Vec<ipnetwork::IpNetwork>,
}

impl Scope {
    /// The scope of a node named `node` with Service ranges `ranges` (the first of each
    /// family gives the node-port address).
    pub fn new(node: &str, ranges: &[ipnetwork::IpNetwork]) -> Scope {
        let mut node_port_addrs: Vec<IpAddr> = Vec::new();
        for r in ranges {
            if !node_port_addrs.iter().any(|a| a.is_ipv4() == r.is_ipv4()) {
                node_port_addrs.push(r.network());
            }
        }
        Scope {
            node: Some(node.to_string()),
            node_port_addrs,
            ranges: ranges.to_vec(),
        }
    }
}

/// A node port (or an ingress IP's port) the kernel must steer into the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePort {
    pub proto: u8,
    pub port: u16,
    /// `externalTrafficPolicy: Cluster`: masqueraded to this node's gateway address.
    pub masquerade: bool,
}

/// A LoadBalancer ingress IP's port, steered to the Service's node port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressPort {
    pub ip: IpAddr,
    pub proto: u8,
    pub port: u16,
    pub node_port: u16,
}

/// What the kernel steers into the loop (the host firewall's sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Steering {
    pub node_ports: BTreeSet<NodePort>,
    pub ingress: BTreeSet<IngressPort>,
}

/// A `healthCheckNodePort` this node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// Shards of the frontends: a compile after a change copies the shards of the changed
/// Service's frontends and shares the others with the table before (ClusterIPs are allocated
/// spread over their range, so its Services spread over the shards).
const SHARDS: usize = 64;

/// One shard of the frontends.
type Shard = HashMap<FrontendKey, Frontend, BuildHasherDefault<IntHasher>>;

/// The shard of a frontend: the address's last byte and the port.
#[inline]
fn shard_of(ip: IpAddr, port: u16) -> usize {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    (usize::from(last) + usize::from(port)) % SHARDS
}

/// The compiled table.
#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    /// [`SHARDS`] shards (none in an empty table), by [`shard_of`].
    frontends: Vec<Arc<Shard>>,
    /// Frontends over all shards.
    len: usize,
    /// Services with at least one frontend.
    services: usize,
    /// The node-port (and hairpin) address per family: `[IPv4, IPv6]`.
    node_port_addrs: [Option<IpAddr>; 2],
    /// The Service ranges of the scope (ClusterIPs lie in them).
    ranges: Vec<ipnetwork::IpNetwork>,
    steering: Steering,
    health: Vec<HealthCheck>,
}

impl ServiceTable {
    /// Compiles Services and their EndpointSlices without node context (no node ports, no
    /// local endpoints): tests and benches.
    pub fn compile(services: &[ServiceView], slices: &[SliceView]) -> ServiceTable {
        Self::compile_for(services, slices, &Scope::default())
    }

    /// Compiles Services and their EndpointSlices for one node. Every frontend of a Service
    /// with a ClusterIP is present (TCP, UDP and SCTP ports), with no backend when no
    /// endpoint is usable (the loop rejects its flows).
    pub fn compile_for(
        services: &[ServiceView],
        slices: &[SliceView],
        scope: &Scope,
    ) -> ServiceTable {
        let mut c = ServiceCompiler::new(scope.clone());
        for s in services {
            c.put_service((s.namespace.clone(), s.name.clone()), Some(s.clone()));
        }
        for (i, s) in slices.iter().enumerate() {
            c.put_slice((s.namespace.clone(), i.to_string()), Some(s.clone()));
        }
        c.compile().0
    }

    /// The frontend a packet addresses, if it is one.
    #[inline]
    pub fn lookup(&self, proto: u8, ip: IpAddr, port: u16) -> Option<&Frontend> {
        if self.len == 0 {
            return None;
        }
        self.frontends[shard_of(ip, port)].get(&FrontendKey { proto, ip, port })
    }

    /// The node-port address of a family: where the kernel steers node ports, and the
    /// source of hairpinned flows.
    #[inline]
    pub fn node_port_addr(&self, v6: bool) -> Option<IpAddr> {
        self.node_port_addrs[usize::from(v6)]
    }

    /// The ClusterIP frontend a packet from an external peer addresses: one in the Service
    /// ranges, not the node-port address (node ports are for the node's own addresses).
    pub fn cluster_ip_frontend(&self, proto: u8, ip: IpAddr, port: u16) -> Option<&Frontend> {
        if !self.ranges.iter().any(|r| r.contains(ip)) || self.node_port_addrs.contains(&Some(ip)) {
            return None;
        }
        self.lookup(proto, ip, port)
    }

    /// Services with at least one frontend.
    pub fn services(&self) -> usize {
        self.services
    }

    /// Frontends (protocol, address, port).
    pub fn frontends(&self) -> usize {
        self.len
    }

    fn all_frontends(&self) -> impl Iterator<Item = (&FrontendKey, &Frontend)> {
        self.frontends.iter().flat_map(|s| s.iter())
    }

    /// Backends summed over every frontend (an endpoint behind two ports counts twice).
    pub fn backends(&self) -> usize {
        self.all_frontends().map(|(_, f)| f.backends().len()).sum()
    }

    /// Frontends with no usable endpoint.
    pub fn without_endpoints(&self) -> usize {
        self.all_frontends()
            .filter(|(_, f)| f.all.is_empty())
            .count()
    }

    /// `namespace/name` of every Service with a frontend, sorted (reports, tests).
    pub fn service_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.all_frontends().map(|(_, f)| f.service()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// What the kernel must steer into the loop.
    pub fn steering(&self) -> &Steering {
        &self.steering
    }

    /// The health check ports this node serves.
    pub fn health_checks(&self) -> &[HealthCheck] {
        &self.health
    }

    /// Every frontend, sorted (reports, tests).
    pub fn entries(&self) -> Vec<(FrontendKey, &Frontend)> {
        let mut v: Vec<_> = self.all_frontends().map(|(k, f)| (*k, f)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

/// An object's namespace and name.
pub type ObjectKey = (String, String);
/// What [`ServiceCompiler::views`] gives: the Services and the EndpointSlices, by key.
pub type ViewsRef<'a> = (
    Vec<(&'a ObjectKey, &'a ServiceView)>,
    Vec<(&'a ObjectKey, &'a SliceView)>,
);

/// One Service's part of the table, kept between compiles.
#[derive(Debug)]
struct Fragment {
    /// `namespace/name`.
    name: Arc<str>,
    /// Its frontends, in the order a Service claims them (the first Service by name keeps an
    /// address two claim; its own duplicates are left out).
    frontends: Vec<(FrontendKey, Frontend)>,
    node_ports: Vec<NodePort>,
    ingress: Vec<IngressPort>,
    health: Option<HealthCheck>,
}

impl Fragment {
    fn compile(
        svc: &ServiceView,
        slices: &[&SliceView],
        scope: &Scope,
        node_port_addrs: [Option<IpAddr>; 2],
        pools: &mut Pools,
    ) -> Fragment {
        let node = scope.node.as_deref();
        let mut f = Fragment {
            name: format!("{}/{}", svc.namespace, svc.name).into(),
            frontends: Vec::new(),
            node_ports: Vec::new(),
            ingress: Vec::new(),
            health: None,
        };
        let internal = if svc.internal_local {
            Serve::Local
        } else {
            Serve::Cluster
        };
        let external = if svc.external_local {
            Serve::ExternalLocal
        } else {
            Serve::Cluster
        };
        for ip in &svc.cluster_ips {
            let v4 = ip.is_ipv4();
            let node_port_addr = node_port_addrs[usize::from(!v4)];
            for p in &svc.ports {
                let backends = usable(slices, v4, &p.name, p.proto, node);
                let mut add = |ip: IpAddr, port: u16, serve: Serve| {
                    let key = FrontendKey {
                        proto: p.proto,
                        ip,
                        port,
                    };
                    if f.frontends.iter().any(|(k, _)| *k == key) {
                        return;
                    }
                    let fe = Frontend::new(
                        f.name.clone(),
                        backends.clone(),
                        serve,
                        svc.affinity_secs,
                        pools,
                    );
                    f.frontends.push((key, fe));
                };
                add(*ip, p.port, internal);
                for lb in svc.lb_ips.iter().filter(|a| a.is_ipv4() == v4) {
                    add(*lb, p.port, Serve::Cluster);
                }
                if let (Some(np), Some(at)) = (p.node_port, node_port_addr) {
                    add(at, np, external);
                    f.node_ports.push(NodePort {
                        proto: p.proto,
                        port: np,
                        masquerade: !svc.external_local,
                    });
                    for lb in svc.lb_ips.iter().filter(|a| a.is_ipv4() == v4) {
                        f.ingress.push(IngressPort {
                            ip: *lb,
                            proto: p.proto,
                            port: p.port,
                            node_port: np,
                        });
                    }
                }
            }
        }
        if let (Some(port), true) = (svc.health_check_node_port, svc.external_local) {
            f.health = Some(HealthCheck {
                port,
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                local_endpoints: local_ready(slices, node),
            });
        }
        f
    }

    fn release(&self, pools: &mut Pools) {
        for (_, fe) in &self.frontends {
            fe.release(pools);
        }
    }
}

/// Compiles the service table of one node, incrementally: it holds the views of every
/// Service and EndpointSlice, each Service's compiled part and the table's frontends in
/// 64 shards. A compile after changes recompiles only the Services whose Service or
/// slices changed, settles the frontends they claimed or claim, copying only those
/// frontends' shards (the others, the pools and their Maglev tables are shared with the
/// table before), and gathers the node-port steering and health checks from the few parts
/// that have any. The work is proportional to the change, not to the Services held. The
/// result is the table a compile from scratch would give; the caller swaps it in whole.
#[derive(Debug)]
pub struct ServiceCompiler {
    scope: Scope,
    node_port_addrs: [Option<IpAddr>; 2],
    services: HashMap<ObjectKey, ServiceView>,
    /// By EndpointSlice (namespace, name).
    slices: HashMap<ObjectKey, SliceView>,
    /// The slices of each Service (namespace, Service name): a slice's label ties it to
    /// its Service, whether or not that Service exists.
    owned: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Each Service's compiled part.
    fragments: HashMap<ObjectKey, Fragment>,
    /// The Services whose parts claim each frontend, sorted: the first keeps it.
    claims: HashMap<FrontendKey, BTreeSet<ObjectKey>>,
    /// The frontends of the table: each claimed one, as its first claimant compiled it.
    shards: Vec<Arc<Shard>>,
    /// Frontends kept per Service (by `namespace/name`), for those that keep any.
    kept: HashMap<Arc<str>, usize>,
    /// Services whose parts steer node ports or ingress IPs, or serve a health check.
    steered: BTreeSet<ObjectKey>,
    /// Services to recompile.
    dirty: BTreeSet<ObjectKey>,
    pools: Pools,
}

impl ServiceCompiler {
    pub fn new(scope: Scope) -> ServiceCompiler {
        let mut node_port_addrs = [None; 2];
        for a in &scope.node_port_addrs {
            node_port_addrs[usize::from(a.is_ipv6())].get_or_insert(*a);
        }
        ServiceCompiler {
            scope,
            node_port_addrs,
            services: HashMap::new(),
            slices: HashMap::new(),
            owned: HashMap::new(),
            fragments: HashMap::new(),
            claims: HashMap::new(),
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
            kept: HashMap::new(),
            steered: BTreeSet::new(),
            dirty: BTreeSet::new(),
            pools: Pools::default(),
        }
    }

    /// Sets (`None`: removes) the Service `key`; a view equal to the one held changes nothing.
    pub fn put_service(&mut self, key: ObjectKey, view: Option<ServiceView>) {
        if view.as_ref() == self.services.get(&key) {
            return;
        }
        match view {
            Some(v) => self.services.insert(key.clone(), v),
            None => self.services.remove(&key),
        };
        self.dirty.insert(key);
    }

    /// Sets (`None`: removes) the EndpointSlice `key` (its namespace and its own name).
    pub fn put_slice(&mut self, key: ObjectKey, view: Option<SliceView>) {
        if view.as_ref() == self.slices.get(&key) {
            return;
        }
        let owner = |v: &SliceView| (v.namespace.clone(), v.service.clone());
        if let Some(old) = self.slices.remove(&key) {
            let o = owner(&old);
            if let Some(set) = self.owned.get_mut(&o) {
                set.remove(&key);
                if set.is_empty() {
                    self.owned.remove(&o);
                }
            }
            self.dirty.insert(o);
        }
        if let Some(v) = view {
            let o = owner(&v);
            self.owned.entry(o.clone()).or_default().insert(key.clone());
            self.slices.insert(key, v);
            self.dirty.insert(o);
        }
    }

    /// Replaces every Service with `all` (a fresh list): only those that differ change.
    pub fn replace_services(&mut self, all: BTreeMap<ObjectKey, ServiceView>) {
        let gone = absent(self.services.keys(), &all);
        self.replace(gone, all, Self::put_service);
    }

    /// Replaces every EndpointSlice with `all` (a fresh list): only those that differ change.
    pub fn replace_slices(&mut self, all: BTreeMap<ObjectKey, SliceView>) {
        let gone = absent(self.slices.keys(), &all);
        self.replace(gone, all, Self::put_slice);
    }

    fn replace<V>(
        &mut self,
        gone: Vec<ObjectKey>,
        mut all: BTreeMap<ObjectKey, V>,
        put: fn(&mut Self, ObjectKey, Option<V>),
    ) {
        for k in gone {
            put(self, k, None);
        }
        while let Some((k, v)) = all.pop_first() {
            put(self, k, Some(v));
        }
    }

    /// The table of the views held: recompiles the Services changed since the last compile,
    /// settles the frontends they claimed or claim (the first claimant by Service keeps an
    /// address two claim), and says how many backend sets that made (each a Maglev table
    /// once a flow needs it). Only the shards of those frontends are copied.
    pub fn compile(&mut self) -> (ServiceTable, usize) {
        let mut touched: Vec<FrontendKey> = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let old = self.fragments.remove(&key);
            if let Some(old) = &old {
                for (k, _) in &old.frontends {
                    if let Some(set) = self.claims.get_mut(k) {
                        set.remove(&key);
                        if set.is_empty() {
                            self.claims.remove(k);
                        }
                    }
                    touched.push(*k);
                }
                self.steered.remove(&key);
            }
            if let Some(svc) = self.services.get(&key) {
                let slices: Vec<&SliceView> = (self.owned.get(&key).into_iter().flatten())
                    .filter_map(|k| self.slices.get(k))
                    .collect();
                let f = Fragment::compile(
                    svc,
                    &slices,
                    &self.scope,
                    self.node_port_addrs,
                    &mut self.pools,
                );
                for (k, _) in &f.frontends {
                    self.claims.entry(*k).or_default().insert(key.clone());
                    touched.push(*k);
                }
                if !f.node_ports.is_empty() || !f.ingress.is_empty() || f.health.is_some() {
                    self.steered.insert(key.clone());
                }
                self.fragments.insert(key, f);
            }
            // After the new part took its pools: what it shares with the old is kept.
            if let Some(old) = old {
                old.release(&mut self.pools);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for k in touched {
            self.settle(k);
        }
        (self.assemble(), self.pools.take_built())
    }

    /// Puts frontend `k` of its first claimant into its shard (or takes it out, unclaimed).
    fn settle(&mut self, k: FrontendKey) {
        let first = self.claims.get(&k).and_then(|set| set.first());
        let fe = first
            .and_then(|svc| self.fragments.get(svc))
            .and_then(|f| f.frontends.iter().find(|(fk, _)| *fk == k))
            .map(|(_, fe)| fe.clone());
        let shard = Arc::make_mut(&mut self.shards[shard_of(k.ip, k.port)]);
        let before = match fe {
            Some(fe) => {
                *self.kept.entry(fe.service.clone()).or_default() += 1;
                shard.insert(k, fe)
            }
            None => shard.remove(&k),
        };
        if let Some(b) = before {
            if let Some(n) = self.kept.get_mut(&b.service) {
                *n -= 1;
                if *n == 0 {
                    self.kept.remove(&b.service);
                }
            }
        }
    }

    /// The table: the shards (shared), the steering and health checks of the parts that have
    /// any, in Service order.
    fn assemble(&self) -> ServiceTable {
        let mut t = ServiceTable {
            frontends: self.shards.clone(),
            len: self.shards.iter().map(|s| s.len()).sum(),
            services: self.kept.len(),
            node_port_addrs: self.node_port_addrs,
            ranges: self.scope.ranges.clone(),
            ..Default::default()
        };
        for f in self.steered.iter().filter_map(|k| self.fragments.get(k)) {
            t.steering.node_ports.extend(f.node_ports.iter().copied());
            t.steering.ingress.extend(f.ingress.iter().copied());
            t.health.extend(f.health.iter().cloned());
        }
        t
    }

    /// Whether a view changed since the last compile.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The views held (Services, then EndpointSlices, each by key), sorted by key.
    pub fn views(&self) -> ViewsRef<'_> {
        fn sorted<V>(m: &HashMap<ObjectKey, V>) -> Vec<(&ObjectKey, &V)> {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_unstable_by(|a, b| a.0.cmp(b.0));
            v
        }
        (sorted(&self.services), sorted(&self.slices))
    }

    /// Maglev tables held (distinct backend sets).
    pub fn pools(&self) -> usize {
        self.pools.len()
    }
}

/// The keys of `held` that `all` lacks.
fn absent<'a, V>(
    held: impl Iterator<Item = &'a ObjectKey>,
    all: &BTreeMap<ObjectKey, V>,
) -> Vec<ObjectKey> {
    held.filter(|k| !all.contains_key(*k)).cloned().collect()
}

/// The backends of one Service port in one family, each with whether it is on `node`: the
/// ready endpoints of its slices; when none is ready, the serving ones that are terminating
/// (as kube-proxy does).
fn usable(
    slices: &[&SliceView],
    v4: bool,
    port_name: &str,
    proto: u8,
    node: Option<&str>,
) -> Vec<(SocketAddr, bool)> {
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
            let local = node.is_some() && e.node_name.as_deref() == node;
            into.extend(
                e.addresses
                    .iter()
                    .filter(|a| a.is_ipv4() == v4)
                    .map(|a| (SocketAddr::new(*a, port), local)),
            );
        }
    }
    if ready.is_empty() {
        terminating
    } else {
        ready
    }
}

/// The ready endpoints of a Service on `node` (what kube-proxy's health check counts): per
/// family, the larger count (a dual-stack pod is one endpoint in each family's slices).
fn local_ready(slices: &[&SliceView], node: Option<&str>) -> usize {
    let Some(node) = node else {
        return 0;
    };
    let count = |v4: bool| {
        slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.ready && e.node_name.as_deref() == Some(node))
            .filter(|e| e.addresses.iter().any(|a| a.is_ipv4() == v4))
            .count()
    };
    count(true).max(count(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::model::{EndpointView, ServicePortView, SlicePortView, SCTP, TCP, UDP};

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
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn ep(addrs: &[&str], ready: bool, terminating: bool) -> EndpointView {
        EndpointView {
            addresses: addrs.iter().map(|a| ip(a)).collect(),
            ready,
            serving: ready || terminating,
            terminating,
            node_name: None,
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
        assert_eq!(
            (t.services(), t.frontends()),
            (1, 6),
            "SCTP too, in both families"
        );
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
        assert_eq!(f.service(), "shop/web");
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

    fn key(s: &str) -> ObjectKey {
        ("shop".into(), s.into())
    }

    #[test]
    fn a_recompile_builds_only_the_changed_service_and_equals_a_fresh_compile() {
        let ports = [("http", TCP, 80)];
        let sports = [("http", TCP, 8080)];
        let services: Vec<ServiceView> = (0..20)
            .map(|i| svc(&format!("s{i}"), &[&format!("10.96.0.{}", 10 + i)], &ports))
            .collect();
        let slices = |moved: usize| -> Vec<SliceView> {
            (0..20)
                .map(|i| {
                    // Service `moved` gets one endpoint replaced; s19 shares s18's backends.
                    let base = if i == 19 { 18 } else { i };
                    let last = if i == moved { 99 } else { 3 };
                    let eps = vec![
                        ep(&[&format!("10.244.{base}.1")], true, false),
                        ep(&[&format!("10.244.{base}.2")], true, false),
                        ep(&[&format!("10.244.{base}.{last}")], true, false),
                    ];
                    slice(&format!("s{i}"), &sports, eps)
                })
                .collect()
        };
        let scope = Scope::default();
        let mut c = ServiceCompiler::new(scope.clone());
        let put_all = |c: &mut ServiceCompiler, moved: usize| {
            for (i, s) in slices(moved).into_iter().enumerate() {
                c.put_slice(key(&format!("s{i}-x1")), Some(s));
            }
        };
        for s in &services {
            c.put_service(key(&s.name), Some(s.clone()));
        }
        put_all(&mut c, usize::MAX);
        let (first, built) = c.compile();
        assert_eq!(built, 19, "s18 and s19 share one table");
        assert_eq!(c.pools(), 19);
        assert_eq!(
            first.entries(),
            ServiceTable::compile_for(&services, &slices(usize::MAX), &scope).entries()
        );
        // Every slice given again, one changed: one Service recompiled, one table built, the
        // others shared with `first`.
        put_all(&mut c, 4);
        assert_eq!(c.dirty.iter().collect::<Vec<_>>(), [&key("s4")]);
        let (second, built) = c.compile();
        assert_eq!(built, 1);
        assert_eq!(
            second.entries(),
            ServiceTable::compile_for(&services, &slices(4), &scope).entries()
        );
        let vip = |i: u8| ip(&format!("10.96.0.{}", 10 + i));
        let (a, b) = (
            first.lookup(TCP, vip(7), 80).unwrap(),
            second.lookup(TCP, vip(7), 80).unwrap(),
        );
        assert!(a.all.pick(7).is_some());
        assert!(
            Arc::ptr_eq(&a.all.lut, &b.all.lut) && b.all.lut.get().is_some(),
            "an unchanged Service keeps its table, built once"
        );
        // The old pool of s4 went with it; going back builds it again.
        put_all(&mut c, usize::MAX);
        let (third, built) = c.compile();
        assert_eq!((built, c.pools()), (1, 19));
        assert_eq!(third.entries(), first.entries());
        // s18 goes: s19 still holds their table.
        c.put_service(key("s18"), None);
        let (fourth, built) = c.compile();
        assert_eq!((built, c.pools(), fourth.services()), (0, 19, 19));
        assert!(fourth.lookup(TCP, vip(18), 80).is_none());
    }

    /// One step of a random history of a node's Services and slices.
    #[derive(Debug, Clone)]
    enum Op {
        /// Service `0` with ClusterIP `1` (two Services may claim one), ports `2`, or gone.
        Service(usize, Option<(u8, bool)>),
        /// Slice `0` of Service `1` with endpoints `2`, or gone.
        Slice(usize, Option<(usize, Vec<Endpoint>)>),
    }

    /// An endpoint: its index (address and node), ready, terminating.
    type Endpoint = (u8, bool, bool);

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..4usize, proptest::option::of((0..3u8, any::<bool>())))
                .prop_map(|(i, v)| Op::Service(i, v)),
            (
                0..5usize,
                proptest::option::of((
                    0..4usize,
                    proptest::collection::vec((0..6u8, any::<bool>(), any::<bool>()), 0..4)
                ))
            )
                .prop_map(|(i, v)| Op::Slice(i, v)),
        ]
    }

    proptest::proptest! {
        /// After any history of changes, the incremental compile equals a compile from
        /// scratch of the same views (frontends, names, steering, health checks).
        #[test]
        fn incremental_equals_from_scratch(ops in proptest::collection::vec(op(), 1..40)) {
            let scope = Scope {
                node: Some("n1".into()),
                node_port_addrs: vec![ip("10.96.0.0")],
                ranges: vec!["10.96.0.0/12".parse().unwrap()],
            };
            let mut c = ServiceCompiler::new(scope.clone());
            let mut services: BTreeMap<usize, ServiceView> = BTreeMap::new();
            let mut slices: BTreeMap<usize, SliceView> = BTreeMap::new();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Service(i, v) => {
                        let v = v.map(|(vip, two_ports)| {
                            let mut s = svc(
                                &format!("s{i}"),
                                &[&format!("10.96.0.{}", 10 + vip)],
                                &[("http", TCP, 80), ("dns", UDP, 53)][..1 + usize::from(two_ports)],
                            );
                            s.internal_local = two_ports;
                            s.external_local = i % 2 == 0;
                            s.health_check_node_port = Some(32000 + i as u16);
                            s.ports[0].node_port = Some(30080 + i as u16);
                            s
                        });
                        match &v {
                            Some(v) => services.insert(i, v.clone()),
                            None => services.remove(&i),
                        };
                        c.put_service(key(&format!("s{i}")), v);
                    }
                    Op::Slice(i, v) => {
                        let v = v.map(|(owner, eps)| {
                            let mut sl = slice(
                                &format!("s{owner}"),
                                &[("http", TCP, 8080), ("dns", UDP, 5353)],
                                eps.iter()
                                    .map(|(e, ready, term)| ep(&[&format!("10.244.1.{e}")], *ready, *term))
                                    .collect(),
                            );
                            for (e, (n, _, _)) in sl.endpoints.iter_mut().zip(&eps) {
                                e.node_name = Some(format!("n{}", n % 2 + 1));
                            }
                            sl
                        });
                        match &v {
                            Some(v) => slices.insert(i, v.clone()),
                            None => slices.remove(&i),
                        };
                        c.put_slice(key(&format!("slice-{i}")), v);
                    }
                }
                if step % 3 == 0 {
                    continue; // several changes per compile, too
                }
                let (t, _) = c.compile();
                let svcs: Vec<ServiceView> = services.values().cloned().collect();
                let sls: Vec<SliceView> = slices.values().cloned().collect();
                let fresh = ServiceTable::compile_for(&svcs, &sls, &scope);
                let names = |t: &ServiceTable| (t.services(), t.service_names().into_iter().map(str::to_string).collect::<Vec<_>>());
                proptest::prop_assert_eq!(t.entries(), fresh.entries());
                proptest::prop_assert_eq!(names(&t), names(&fresh));
                proptest::prop_assert_eq!(t.steering(), fresh.steering());
                proptest::prop_assert_eq!(t.health_checks(), fresh.health_checks());
                // Only the pools the compiled Services hold are kept.
                let held: BTreeSet<_> = c.fragments.values().flat_map(|f| &f.frontends).flat_map(|(_, f)| {
                    let mut v = vec![f.backends().to_vec()];
                    if f.serve != Serve::Cluster { v.push(f.local_backends().to_vec()) }
                    v
                }).collect();
                proptest::prop_assert_eq!(c.pools(), held.len());
            }
        }
    }
}
