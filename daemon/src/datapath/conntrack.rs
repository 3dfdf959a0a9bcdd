//! Connection tracking for NetworkPolicy: which flows passed the checks this node made, so
//! that their later packets and their replies pass with one hash lookup, and the policy
//! engine runs once per new flow. Shared by all workers (a flow's two directions may be seen
//! by different threads): a fixed number of shards, each a small lock held for one lookup.
//!
//! Established flows outlive a policy change until they go idle (Calico does the same);
//! new flows see the new policy as soon as its snapshot is swapped in.
//!
//! The table cannot be turned against other pods: flows are hashed with SipHash keyed by a
//! random per-process seed (std's `RandomState`), so nobody can aim many flows at one shard
//! or bucket; every flow is charged to its initiator's address, which may hold at most
//! [`DEFAULT_MAX_FLOWS_PER_POD`] (`--max-flows-per-pod`); when the initiator's budget or the
//! whole table is full, its new flow is refused ([`Decision::Full`], a `flow_limit` drop),
//! never let through unrecorded (its replies would then be judged as new flows).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Shards of the table; a power of two.
pub const SHARDS: usize = 64;
/// Most flows remembered in all; past that every new flow is refused until room frees up.
pub const MAX_FLOWS: usize = 1 << 20;
/// Default of `--max-flows-per-pod`: flows one initiating address may hold. 32,768 is 64
/// times what a busy web pod keeps open and 1/32 of the table, so 32 pods that fill theirs
/// still leave the rest of the table free.
pub const DEFAULT_MAX_FLOWS_PER_POD: usize = 32_768;
/// Idle time after which a flow is forgotten (then re-evaluated if it resumes).
pub const TCP_IDLE: Duration = Duration::from_secs(3600);
pub const UDP_IDLE: Duration = Duration::from_secs(180);
pub const OTHER_IDLE: Duration = Duration::from_secs(60);

/// Seconds a flow of protocol `proto` may stay idle before it is forgotten.
pub fn idle_limit(proto: u8) -> u32 {
    match proto {
        TCP => TCP_IDLE,
        UDP => UDP_IDLE,
        _ => OTHER_IDLE,
    }
    .as_secs() as u32
}

/// Where the tables' clocks (seconds, for `last_seen`) start: not at zero, so that a flow put
/// back after a restart ([`Conntrack::restore`], `NatTable::restore`) keeps its age, up to a
/// day (the longest session affinity; every idle limit is shorter).
pub const CLOCK_START: u32 = 86_400;

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMPV6: u8 = 58;

/// A packet's flow: protocol, addresses and ports (ICMP echo: the identifier as both ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// What a packet is, for policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    /// A packet of `Flow` in its own direction.
    Packet(Flow),
    /// An ICMP error about `Flow` (the flow of the packet quoted inside, reversed so that it
    /// is seen from the error's receiver): passes only if that flow is known.
    Error(Flow),
}

/// Reads the flow of an IP packet. Fragments after the first and unknown layouts give
/// `None` (treated as a new flow on ports 0).
pub fn classify(pkt: &[u8]) -> Option<Classified> {
    let (proto, src, dst, l4) = ip_header(pkt)?;
    let t = pkt.get(l4..)?;
    let ports = |t: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes([*t.first()?, *t.get(1)?]),
            u16::from_be_bytes([*t.get(2)?, *t.get(3)?]),
        ))
    };
    match proto {
        TCP | UDP | SCTP => {
            let (sport, dport) = ports(t)?;
            Some(Classified::Packet(Flow {
                proto,
                src,
                dst,
                sport,
                dport,
            }))
        }
        ICMP | ICMPV6 => {
            let ty = *t.first()?;
            let (echo_req, echo_rep, errors): (u8, u8, &[u8]) = if proto == ICMP {
                (8, 0, &[3, 4, 5, 11, 12])
            } else {
                (128, 129, &[1, 2, 3, 4])
            };
            if ty == echo_req || ty == echo_rep {
                let id = u16::from_be_bytes([*t.get(4)?, *t.get(5)?]);
                // Request and reply share the identifier: the reply is the reversed flow.
                let (sport, dport) = if ty == echo_req { (id, 0) } else { (0, id) };
                Some(Classified::Packet(Flow {
                    proto,
                    src,
                    dst,
                    sport,
                    dport,
                }))
            } else if errors.contains(&ty) {
                let inner = t.get(8..)?;
                let (ip, isrc, idst, il4) = ip_header_lenient(inner)?;
                let (a, b) = ports(inner.get(il4..)?).unwrap_or((0, 0));
                // The quoted packet went from `isrc` (the error's receiver) to `idst`.
                Some(Classified::Error(Flow {
                    proto: ip,
                    src: isrc,
                    dst: idst,
                    sport: a,
                    dport: b,
                }))
            } else {
                Some(Classified::Packet(Flow {
                    proto,
                    src,
                    dst,
                    sport: ty as u16,
                    dport: 0,
                }))
            }
        }
        _ => Some(Classified::Packet(Flow {
            proto,
            src,
            dst,
            sport: 0,
            dport: 0,
        })),
    }
}

fn ip_header(p: &[u8]) -> Option<(u8, IpAddr, IpAddr, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = (p[0] & 0xf) as usize * 4;
            let frag = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            if ihl < 20 || frag != 0 {
                return None;
            }
            Some((
                p[9],
                IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?),
                IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?),
                ihl,
            ))
        }
        6 if p.len() >= 40 => Some((
            p[6],
            IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?),
            40,
        )),
        _ => None,
    }
}

/// The quoted header inside an ICMP error may be cut short; only the addresses and ports
/// are needed.
fn ip_header_lenient(p: &[u8]) -> Option<(u8, IpAddr, IpAddr, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = (p[0] & 0xf) as usize * 4;
            Some((
                p[9],
                IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?),
                IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?),
                ihl.max(20),
            ))
        }
        6 if p.len() >= 40 => Some((
            p[6],
            IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?),
            40,
        )),
        _ => None,
    }
}

/// Where on this node a packet is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Leaving a local pod: that pod's egress rules.
    Egress,
    /// Entering a local pod: that pod's ingress rules.
    Ingress,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Checks passed by the flow's initiator direction on this node.
    egress: bool,
    ingress: bool,
    /// Seconds since the table's epoch.
    last_seen: u32,
}

type FlowMap = HashMap<Flow, Entry, RandomState>;

/// A remembered flow as saved across a graceful restart (`agent::flow_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFlow {
    /// In the initiator's direction.
    pub flow: Flow,
    /// Checks its initiator's direction passed on this node.
    pub egress: bool,
    pub ingress: bool,
    /// Seconds since its last packet.
    pub idle: u32,
}

/// The table. Keys are flows in the initiator's direction.
pub struct Conntrack {
    shards: Vec<Mutex<FlowMap>>,
    /// Flows held per initiating address (sharded like the flows, by the address's hash).
    owners: Vec<Mutex<HashMap<IpAddr, usize, RandomState>>>,
    hasher: RandomState,
    epoch: std::time::Instant,
    len: AtomicUsize,
    max_flows: usize,
    per_owner: AtomicUsize,
}

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack::with_limits(MAX_FLOWS, DEFAULT_MAX_FLOWS_PER_POD)
    }
}

/// The answer for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Part of a flow this node already admitted (either direction).
    Established,
    /// A new flow (or direction not yet checked here): `evaluate` said yes, now remembered.
    Admitted,
    /// `evaluate` said no.
    Denied,
    /// A new flow whose initiator holds its whole budget, or the table is full: refused
    /// without asking the policy (it could not be remembered).
    Full,
}

impl Conntrack {
    /// A table of at most `max_flows` flows, `per_owner` per initiating address.
    pub fn with_limits(max_flows: usize, per_owner: usize) -> Conntrack {
        let hasher = RandomState::new();
        Conntrack {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            owners: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            hasher,
            epoch: std::time::Instant::now(),
            len: AtomicUsize::new(0),
            max_flows,
            per_owner: AtomicUsize::new(per_owner.max(1)),
        }
    }

    /// Sets the flows one initiating address may hold (`--max-flows-per-pod`); flows already
    /// held stay.
    pub fn set_max_flows_per_pod(&self, n: usize) {
        self.per_owner.store(n.max(1), Ordering::Relaxed);
    }

    pub fn max_flows_per_pod(&self) -> usize {
        self.per_owner.load(Ordering::Relaxed)
    }

    pub fn max_flows(&self) -> usize {
        self.max_flows
    }

    fn shard(&self, f: &Flow) -> &Mutex<FlowMap> {
        &self.shards[self.shard_index(f)]
    }

    fn shard_index(&self, f: &Flow) -> usize {
        // Both directions of a flow land in the same shard.
        let (a, b) = if (f.src, f.sport) <= (f.dst, f.dport) {
            ((f.src, f.sport), (f.dst, f.dport))
        } else {
            ((f.dst, f.dport), (f.src, f.sport))
        };
        let h = self.hasher.hash_one((f.proto, a, b));
        (h as usize) & (SHARDS - 1)
    }

    fn owner_shard(&self, owner: &IpAddr) -> &Mutex<HashMap<IpAddr, usize, RandomState>> {
        let h = self.hasher.hash_one(owner);
        &self.owners[(h as usize) & (SHARDS - 1)]
    }

    /// Takes one unit of `owner`'s budget and of the table; false when either is spent.
    fn charge(&self, owner: IpAddr) -> bool {
        let per_owner = self.per_owner.load(Ordering::Relaxed);
        let mut o = self
            .owner_shard(&owner)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let held = o.entry(owner).or_insert(0);
        if *held >= per_owner {
            return false;
        }
        if self
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_flows).then_some(n + 1)
            })
            .is_err()
        {
            if *held == 0 {
                o.remove(&owner);
            }
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back the units of flows forgotten.
    fn release(&self, owner: IpAddr) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        let mut o = self
            .owner_shard(&owner)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(held) = o.get_mut(&owner) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                o.remove(&owner);
            }
        }
    }

    fn now(&self) -> u32 {
        CLOCK_START.saturating_add(self.epoch.elapsed().as_secs() as u32)
    }

    /// Every flow remembered, for a restart to put back ([`Conntrack::restore`]).
    pub fn save(&self) -> Vec<SavedFlow> {
        let now = self.now();
        let mut out = Vec::with_capacity(self.len());
        for s in &self.shards {
            let m = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(m.iter().map(|(flow, e)| SavedFlow {
                flow: *flow,
                egress: e.egress,
                ingress: e.ingress,
                idle: now.saturating_sub(e.last_seen),
            }));
        }
        out
    }

    /// Puts back flows an earlier process saved `gap` seconds ago, as if that process had
    /// gone on: a flow idle for longer than its limit by now is left out, and so is one this
    /// table already holds (in either direction); each is charged to its initiator as a new
    /// one would be, so the budgets and the table's bound hold. Returns how many were put back.
    pub fn restore(&self, saved: &[SavedFlow], gap: u32) -> usize {
        let now = self.now();
        // Grouped by shard, so that each shard is locked and grown once.
        let mut groups: Vec<Vec<(&SavedFlow, u32)>> = vec![Vec::new(); SHARDS];
        for s in saved {
            let idle = s.idle.saturating_add(gap);
            if idle < idle_limit(s.flow.proto) && (s.egress || s.ingress) {
                groups[self.shard_index(&s.flow)].push((s, idle));
            }
        }
        let mut restored = 0;
        for (shard, group) in self.shards.iter().zip(groups) {
            let mut m = shard.lock().unwrap_or_else(|p| p.into_inner());
            m.reserve(group.len());
            for (s, idle) in group {
                if m.contains_key(&s.flow) || m.contains_key(&s.flow.reversed()) {
                    continue;
                }
                if !self.charge(s.flow.src) {
                    continue;
                }
                m.insert(
                    s.flow,
                    Entry {
                        egress: s.egress,
                        ingress: s.ingress,
                        last_seen: now.saturating_sub(idle),
                    },
                );
                restored += 1;
            }
        }
        restored
    }

    /// Decides a packet of `flow` at `check`; `evaluate` runs the policy engine for a new
    /// flow (or a direction not yet checked on this node).
    pub fn check(&self, flow: Flow, check: Check, evaluate: impl FnOnce() -> bool) -> Decision {
        let now = self.now();
        let mut m = self.shard(&flow).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = m.get_mut(&flow.reversed()) {
            // A reply: the initiator's direction passed every check made here.
            e.last_seen = now;
            return Decision::Established;
        }
        let known = match m.get_mut(&flow) {
            Some(e) => {
                let passed = match check {
                    Check::Egress => e.egress,
                    Check::Ingress => e.ingress,
                };
                if passed {
                    e.last_seen = now;
                    return Decision::Established;
                }
                true
            }
            None => false,
        };
        if !known && !self.charge(flow.src) {
            return Decision::Full;
        }
        if !evaluate() {
            if known {
                m.remove(&flow);
            }
            self.release(flow.src);
            return Decision::Denied;
        }
        let e = m.entry(flow).or_insert(Entry {
            egress: false,
            ingress: false,
            last_seen: now,
        });
        match check {
            Check::Egress => e.egress = true,
            Check::Ingress => e.ingress = true,
        }
        e.last_seen = now;
        Decision::Admitted
    }

    /// Whether an ICMP error about `flow` (seen from the error's receiver) belongs to a flow
    /// admitted here.
    pub fn knows(&self, flow: Flow) -> bool {
        let m = self.shard(&flow).lock().unwrap_or_else(|p| p.into_inner());
        m.contains_key(&flow) || m.contains_key(&flow.reversed())
    }

    /// Forgets idle flows (call every few seconds, off the packet path).
    pub fn expire(&self) {
        let now = self.now();
        let mut gone = Vec::new();
        for s in &self.shards {
            let mut m = s.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|f, e| {
                let keep = now.saturating_sub(e.last_seen) < idle_limit(f.proto);
                if !keep {
                    gone.push(f.src);
                }
                keep
            });
            drop(m);
            for owner in gone.drain(..) {
                self.release(owner);
            }
        }
    }

    /// Flows remembered (the occupancy metric).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows `owner` holds.
    pub fn held_by(&self, owner: IpAddr) -> usize {
        let o = self
            .owner_shard(&owner)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        o.get(&owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0u8; 16]);
        p
    }

    fn flow(p: &[u8]) -> Flow {
        match classify(p).unwrap() {
            Classified::Packet(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_pass_once_the_initiator_was_admitted() {
        let ct = Conntrack::default();
        let out = flow(&tcp([10, 0, 0, 1], 40000, [10, 0, 0, 2], 80));
        assert_eq!(ct.check(out, Check::Egress, || true), Decision::Admitted);
        assert_eq!(
            ct.check(out, Check::Egress, || panic!("not evaluated again")),
            Decision::Established
        );
        // Same node: the destination's ingress is its own check.
        assert_eq!(ct.check(out, Check::Ingress, || true), Decision::Admitted);
        let back = flow(&tcp([10, 0, 0, 2], 80, [10, 0, 0, 1], 40000));
        assert_eq!(
            ct.check(back, Check::Egress, || panic!("replies are not evaluated")),
            Decision::Established
        );
        assert_eq!(
            ct.check(back, Check::Ingress, || panic!()),
            Decision::Established
        );
        // A denied flow is not remembered, and its "replies" do not pass.
        let other = flow(&tcp([10, 0, 0, 3], 1, [10, 0, 0, 2], 80));
        assert_eq!(ct.check(other, Check::Ingress, || false), Decision::Denied);
        assert_eq!(
            ct.check(other.reversed(), Check::Egress, || false),
            Decision::Denied
        );
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn icmp_echo_and_errors() {
        let mut req = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 8, 0, 0, 0, 0x12,
            0x34, 0, 1,
        ];
        let f = flow(&req);
        req[20] = 0; // echo reply, addresses swapped
        req[12..16].copy_from_slice(&[10, 0, 0, 2]);
        req[16..20].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(flow(&req), f.reversed());
        // An ICMP error (port unreachable) quoting 10.0.0.1:40000 -> 10.0.0.2:53/udp, sent back
        // to 10.0.0.1.
        let mut quoted = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        quoted.extend_from_slice(&40000u16.to_be_bytes());
        quoted.extend_from_slice(&53u16.to_be_bytes());
        quoted.extend_from_slice(&[0, 8, 0, 0]);
        let mut err = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1, 3, 3, 0, 0, 0, 0, 0,
            0,
        ];
        err.extend_from_slice(&quoted);
        let Some(Classified::Error(q)) = classify(&err) else {
            panic!()
        };
        assert_eq!(
            (q.src, q.sport, q.dport, q.proto),
            ("10.0.0.1".parse().unwrap(), 40000, 53, 17)
        );
        let ct = Conntrack::default();
        assert!(!ct.knows(q));
        ct.check(q, Check::Egress, || true);
        assert!(ct.knows(q));
        assert!(classify(&[0x45, 0, 0]).is_none());
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Flow {
        Flow {
            proto: UDP,
            src: IpAddr::from(src),
            dst: IpAddr::from(dst),
            sport,
            dport,
        }
    }

    /// One pod opens flows until its budget is spent: its next new flow is refused (never
    /// admitted unrecorded), while another pod's established flows and new flows go on.
    #[test]
    fn a_pod_at_its_limit_cannot_starve_another() {
        let ct = Conntrack::with_limits(1000, 50);
        let victim = udp([10, 0, 0, 2], 5000, [10, 0, 1, 9], 53);
        assert_eq!(ct.check(victim, Check::Egress, || true), Decision::Admitted);
        for port in 0..50 {
            let f = udp([10, 0, 0, 66], 10_000 + port, [10, 0, 1, 9], 53);
            assert_eq!(ct.check(f, Check::Egress, || true), Decision::Admitted);
        }
        let over = udp([10, 0, 0, 66], 20_000, [10, 0, 1, 9], 53);
        assert_eq!(
            ct.check(over, Check::Egress, || panic!(
                "not evaluated: it could not be remembered"
            )),
            Decision::Full
        );
        assert!(!ct.knows(over), "refused, not remembered");
        assert_eq!(ct.held_by("10.0.0.66".parse().unwrap()), 50);
        // The other pod: its established flow and its reply, and new flows.
        assert_eq!(
            ct.check(victim, Check::Egress, || panic!()),
            Decision::Established
        );
        assert_eq!(
            ct.check(victim.reversed(), Check::Ingress, || panic!()),
            Decision::Established
        );
        let fresh = udp([10, 0, 0, 2], 5001, [10, 0, 1, 9], 53);
        assert_eq!(ct.check(fresh, Check::Egress, || true), Decision::Admitted);
        // The full pod's established flows still pass; a denied flow gives its unit back.
        let first = udp([10, 0, 0, 66], 10_000, [10, 0, 1, 9], 53);
        assert_eq!(
            ct.check(first, Check::Egress, || panic!()),
            Decision::Established
        );
        assert_eq!(ct.len(), 52);
        let denied = udp([10, 0, 0, 2], 6000, [10, 0, 1, 9], 80);
        assert_eq!(ct.check(denied, Check::Egress, || false), Decision::Denied);
        assert_eq!(ct.len(), 52);
        assert_eq!(ct.held_by("10.0.0.2".parse().unwrap()), 2);
    }

    #[test]
    fn a_full_table_refuses_new_flows_and_expiry_gives_room_back() {
        let ct = Conntrack::with_limits(10, 100);
        for port in 0..10 {
            let f = udp([10, 0, 0, port as u8 + 1], port, [10, 0, 1, 9], 53);
            assert_eq!(ct.check(f, Check::Egress, || true), Decision::Admitted);
        }
        let f = udp([10, 0, 0, 99], 1, [10, 0, 1, 9], 53);
        assert_eq!(ct.check(f, Check::Egress, || true), Decision::Full);
        assert_eq!(ct.len(), 10);
        // Nothing is idle yet: expiry keeps everything and the counts stay exact.
        ct.expire();
        assert_eq!(ct.len(), 10);
        assert_eq!(ct.held_by("10.0.0.1".parse().unwrap()), 1);
    }

    /// Two tables hash the same flow differently: the seed is random, so the shard a flow
    /// lands in cannot be computed from outside.
    #[test]
    fn hashing_is_keyed() {
        let f = udp([10, 0, 0, 1], 1, [10, 0, 0, 2], 2);
        let a = Conntrack::default();
        let b = Conntrack::default();
        assert_ne!(a.hasher.hash_one(f), b.hasher.hash_one(f));
    }

    #[test]
    fn restored_flows_keep_their_age_their_checks_and_the_budgets() {
        let old = Conntrack::default();
        let a = flow(&tcp([10, 0, 0, 1], 40000, [10, 0, 0, 2], 80));
        let b = flow(&tcp([10, 0, 0, 1], 40001, [10, 0, 0, 2], 80));
        let c = flow(&tcp([10, 0, 0, 3], 40000, [10, 0, 0, 1], 22));
        old.check(a, Check::Egress, || true);
        old.check(b, Check::Egress, || true);
        old.check(c, Check::Ingress, || true);
        let mut saved = old.save();
        saved.sort_by_key(|s| (s.flow.src, s.flow.sport));
        assert_eq!(saved.len(), 3);
        assert!(saved.iter().all(|s| s.idle == 0));

        // Initiator 10.0.0.1 may hold one flow: one of its two is left out.
        let new = Conntrack::with_limits(100, 1);
        assert_eq!(new.restore(&saved, 5), 2);
        assert_eq!(new.held_by(a.src), 1);
        assert_eq!(new.len(), 2);
        // Put back twice: nothing doubles.
        assert_eq!(new.restore(&saved, 5), 0);
        assert_eq!(new.len(), 2);
        // What was checked is what passes: c's ingress, not its egress.
        assert_eq!(
            new.check(c, Check::Ingress, || panic!("restored")),
            Decision::Established
        );
        assert_eq!(new.check(c, Check::Egress, || false), Decision::Denied);
        // (A direction denied forgets the flow, as for any flow.) The age carried over: the
        // saved idle time plus the time down, from which expiry counts.
        let ages: Vec<(Flow, u32)> = new.save().iter().map(|s| (s.flow, s.idle)).collect();
        assert!(
            ages == vec![(a, 5)] || ages == vec![(b, 5)],
            "one of 10.0.0.1's flows, aged: {ages:?}"
        );
        // Past the limit: left out.
        assert_eq!(Conntrack::default().restore(&saved, idle_limit(6)), 0);
    }
}
