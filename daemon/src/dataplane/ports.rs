//! Pods attached to the node's packet loop: each pod's tun (created by the CNI server inside
//! the pod's namespace), its addresses, and the table the loop reads to deliver to it.

use crate::datapath::conntrack::Conntrack;
use crate::datapath::local::{Filter, LocalTable, PodPort};
use crate::datapath::nat::NatTable;
use crate::datapath::service::ServiceNat;
use crate::io::epoll::Epoll;
use crate::io::tun::TunQueue;
use crate::policy::PolicySet;
use crate::services::ServiceTable;
use arc_swap::ArcSwap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tracing::info;

/// What the loop keeps per pod: its tun.
pub type PodTun = Arc<TunQueue>;
/// The table the loop reads.
pub type Local = LocalTable<PodTun>;

/// epoll token of a worker's host queue; pods use their ids.
pub const HOST_TOKEN: u64 = u64::MAX;

/// A pod's name as the CNI runtime gave it (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`; absent when
/// the runtime passes no such arguments, as `cnitool` does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodName {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// An attached pod as the status reports see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedPod {
    pub id: u64,
    pub name: PodName,
    pub ips: Vec<IpAddr>,
}

struct Entry {
    id: u64,
    name: PodName,
    ips: Vec<IpAddr>,
    tun: PodTun,
}

#[derive(Default)]
struct Inner {
    pods: Vec<Entry>,
    gateways: Option<Vec<IpAddr>>,
    next_id: u64,
    policy: Option<Arc<PolicySet>>,
    /// Pods' flows wait for a policy snapshot (see [`Pods::require_policy`]).
    policy_required: bool,
    services: Option<Arc<ServiceTable>>,
    /// Readiness waits for a service table (see [`Pods::require_services`]).
    services_required: bool,
    mtu: Option<u16>,
    cluster: Vec<ipnetwork::IpNetwork>,
}

/// The pods of this node. One writer (the control plane), many readers (the workers).
pub struct Pods {
    table: ArcSwap<Local>,
    inner: Mutex<Inner>,
    /// One per tun reader; a pod's tun is read by worker `id % len`.
    pub(crate) epolls: Vec<Arc<Epoll>>,
    vnet: bool,
    /// Flows admitted under NetworkPolicy; survives policy and pod changes.
    pub conntrack: Arc<Conntrack>,
    /// Flows translated to a Service's backend; survives service table swaps.
    pub nat: Arc<NatTable>,
}

impl Pods {
    pub fn new(workers: usize, vnet: bool) -> io::Result<Pods> {
        let epolls = (0..workers.max(1))
            .map(|_| Epoll::new().map(Arc::new))
            .collect::<io::Result<_>>()?;
        Ok(Pods {
            table: ArcSwap::from_pointee(Local::default()),
            inner: Mutex::new(Inner::default()),
            epolls,
            vnet,
            conntrack: Arc::new(Conntrack::default()),
            nat: Arc::new(NatTable::default()),
        })
    }

    /// The current table (hold it for a batch).
    #[inline]
    pub fn table(&self) -> arc_swap::Guard<Arc<Local>> {
        self.table.load()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this a node: decrypted packets reach the host tun only for these addresses (the
    /// node's own tunnel addresses), pods for theirs.
    pub fn set_gateways(&self, gateways: Vec<IpAddr>) {
        let mut g = self.lock();
        g.gateways = Some(gateways);
        self.publish(&g);
    }

    /// Makes NetworkPolicy fail closed: until the first [`Pods::set_policy`], pods' new flows
    /// are dropped (`policy_not_synced`) instead of admitted unfiltered. The agent calls it
    /// at start; `kwire tunnel` and bare data planes never do.
    pub fn require_policy(&self) {
        let mut g = self.lock();
        g.policy_required = true;
        self.publish(&g);
    }

    /// Swaps in a new NetworkPolicy snapshot: new flows see it at once; admitted flows go on
    /// until idle.
    pub fn set_policy(&self, policy: Arc<PolicySet>) {
        let mut g = self.lock();
        g.policy = Some(policy);
        self.publish(&g);
    }

    /// Swaps in a new service table: new flows to a ClusterIP see it at once; translated
    /// flows keep their backend while it stays (TCP: until the connection ends).
    pub fn set_services(&self, table: Arc<ServiceTable>) {
        let mut g = self.lock();
        g.services = Some(table);
        self.publish(&g);
    }

    /// Makes readiness wait for a service table (restored or compiled from the API's lists;
    /// until then pods' flows to the Service ranges are dropped). The agent
    /// calls it at start; `kwire tunnel` and bare data planes never do.
    pub fn require_services(&self) {
        self.lock().services_required = true;
    }

    /// Whether a service table is required and none is in force yet.
    pub fn services_pending(&self) -> bool {
        let g = self.lock();
        g.services_required && g.services.is_none()
    }

    /// The service table in force, if one was compiled.
    pub fn services(&self) -> Option<Arc<ServiceTable>> {
        self.lock().services.clone()
    }

    /// The cluster's pod ranges: a packet for one of them without a peer is dropped
    /// (`no_peer`) and answered with an ICMP unreachable, never handed to the host to route.
    pub fn set_cluster_ranges(&self, ranges: Vec<ipnetwork::IpNetwork>) {
        let mut g = self.lock();
        g.cluster = ranges;
        self.publish(&g);
    }

    /// The tunnel MTU: larger packets from pods and the host get an ICMP error.
    pub fn set_mtu(&self, mtu: u32) {
        let mut g = self.lock();
        g.mtu = u16::try_from(mtu).ok();
        self.publish(&g);
    }

    /// How many pods are attached.
    pub fn len(&self) -> usize {
        self.lock().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The attached pods with their names, in attach order (off the packet path: takes the
    /// control plane's lock).
    pub fn attached(&self) -> Vec<AttachedPod> {
        self.lock()
            .pods
            .iter()
            .map(|e| AttachedPod {
                id: e.id,
                name: e.name.clone(),
                ips: e.ips.clone(),
            })
            .collect()
    }

    /// Attaches pod `name`'s tun; returns the pod's id for [`Pods::detach`]. The tun must use
    /// the same offload mode as the host tun (frames pass between them unchanged).
    pub fn attach(&self, name: PodName, ips: Vec<IpAddr>, tun: TunQueue) -> io::Result<u64> {
        if tun.offload() != self.vnet {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pod tun offload mode differs from the host tun's",
            ));
        }
        tun.set_nonblocking(true)?;
        let tun = Arc::new(tun);
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        self.epolls[(id as usize) % self.epolls.len()].add(tun.as_raw_fd(), id)?;
        info!(pod = id, ips = ?ips, "pod attached to the packet loop");
        g.pods.push(Entry { id, name, ips, tun });
        self.publish(&g);
        Ok(id)
    }

    /// Detaches a pod; its tun closes when the last batch that used it ends.
    pub fn detach(&self, id: u64) {
        let mut g = self.lock();
        if let Some(i) = g.pods.iter().position(|e| e.id == id) {
            let e = g.pods.remove(i);
            let _ = self.epolls[(id as usize) % self.epolls.len()].remove(e.tun.as_raw_fd());
            info!(pod = id, "pod detached from the packet loop");
        }
        self.publish(&g);
    }

    fn publish(&self, g: &Inner) {
        let pods = g
            .pods
            .iter()
            .map(|e| PodPort {
                id: e.id,
                ips: e.ips.clone(),
                io: e.tun.clone(),
            })
            .collect();
        let t = match &g.gateways {
            Some(gw) => Local::new(pods, gw.clone()),
            None => {
                let mut t = Local::new(pods, Vec::new());
                t.host_accepts_all = true;
                t
            }
        };
        let mut t = t;
        t.mtu = g.mtu;
        t.cluster = g.cluster.clone();
        t.filter = g
            .policy
            .as_ref()
            .filter(|p| p.has_policies())
            .map(|p| Filter {
                policy: p.clone(),
                conntrack: self.conntrack.clone(),
            });
        t.policy_pending = g.policy_required && g.policy.is_none();
        t.services = g
            .services
            .as_ref()
            .filter(|s| s.frontends() > 0)
            .map(|s| ServiceNat {
                table: s.clone(),
                nat: self.nat.clone(),
            });
        self.table.store(Arc::new(t));
    }
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods")
            .field("pods", &self.len())
            .finish_non_exhaustive()
    }
}
