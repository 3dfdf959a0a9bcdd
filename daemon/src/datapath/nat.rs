//! The translation half of the connection table: for every flow to a Service this node
//! translated, the backend it was given (so later packets keep it, even after the endpoint
//! left the Service, until the flow ends) and the reverse entry that turns the backend's
//! replies back into the Service's address. Shared by all workers like [`super::conntrack`];
//! both entries of a flow live in one shard, chosen by the client's address and port.

use super::conntrack::{Flow, OTHER_IDLE, SHARDS, TCP_IDLE, UDP_IDLE};
use crate::wg::allowed_ips::IntHasher;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most translated flows remembered; past that, new flows are translated by Maglev alone
/// (the same backend, deterministically) but their replies are not translated back.
pub const MAX_NAT_FLOWS: usize = 1 << 19;

#[derive(Debug, Clone, Copy)]
enum Entry {
    /// Client -> Service: rewrite the destination to `to`.
    Forward { to: SocketAddr, last_seen: u32 },
    /// Backend -> client: rewrite the source to `from` (the Service's address).
    Reverse { from: SocketAddr, last_seen: u32 },
}

type Shard = Mutex<HashMap<Flow, Entry, BuildHasherDefault<IntHasher>>>;

/// The table.
pub struct NatTable {
    shards: Vec<Shard>,
    epoch: std::time::Instant,
    /// Flows remembered (both entries count as one); lets the loop skip the reverse lookup
    /// when nothing was translated.
    flows: AtomicUsize,
    /// New flows translated, ever (`kwire_service_translations_total`).
    pub translations: AtomicU64,
}

impl Default for NatTable {
    fn default() -> Self {
        NatTable {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            epoch: std::time::Instant::now(),
            flows: AtomicUsize::new(0),
            translations: AtomicU64::new(0),
        }
    }
}

/// What the table says about a client's packet to a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Translate to this backend.
    To(SocketAddr),
    /// The Service has no usable endpoint.
    NoEndpoint,
    /// The table is full: the new flow is refused, never translated unrecorded (its replies
    /// could not be translated back).
    Full,
}

impl NatTable {
    fn shard(&self, proto: u8, client: IpAddr, port: u16) -> &Shard {
        let h = BuildHasherDefault::<IntHasher>::default().hash_one((proto, client, port));
        &self.shards[(h as usize) & (SHARDS - 1)]
    }

    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// The backend for a client's packet of `flow` (to a Service's address). A known flow
    /// keeps its backend while `keep(backend)` says so; otherwise `choose` picks one and both
    /// entries are remembered.
    pub fn forward(
        &self,
        flow: Flow,
        keep: impl FnOnce(SocketAddr) -> bool,
        choose: impl FnOnce() -> Option<SocketAddr>,
    ) -> Forward {
        let now = self.now();
        let mut m = self
            .shard(flow.proto, flow.src, flow.sport)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(Entry::Forward { to, last_seen }) = m.get_mut(&flow) {
            if keep(*to) {
                *last_seen = now;
                let to = *to;
                if let Some(Entry::Reverse { last_seen, .. }) = m.get_mut(&reply_of(&flow, to)) {
                    *last_seen = now;
                }
                return Forward::To(to);
            }
            let old = *to;
            m.remove(&flow);
            m.remove(&reply_of(&flow, old));
            self.flows.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(to) = choose() else {
            return Forward::NoEndpoint;
        };
        if self.flows.load(Ordering::Relaxed) >= MAX_NAT_FLOWS {
            return Forward::Full;
        }
        m.insert(flow, Entry::Forward { to, last_seen: now });
        m.insert(
            reply_of(&flow, to),
            Entry::Reverse {
                from: SocketAddr::new(flow.dst, flow.dport),
                last_seen: now,
            },
        );
        self.flows.fetch_add(1, Ordering::Relaxed);
        self.translations.fetch_add(1, Ordering::Relaxed);
        Forward::To(to)
    }

    /// The Service address a backend's reply of `flow` (backend -> client) must come from,
    /// if it belongs to a translated flow.
    #[inline]
    pub fn reverse(&self, flow: Flow) -> Option<SocketAddr> {
        if self.flows.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let m = self
            .shard(flow.proto, flow.dst, flow.dport)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match m.get(&flow) {
            Some(Entry::Reverse { from, .. }) => Some(*from),
            _ => None,
        }
    }

    /// Forgets idle flows (call every few seconds, off the packet path).
    pub fn expire(&self) {
        let now = self.now();
        let mut gone = 0;
        for s in &self.shards {
            let mut m = s.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|f, e| {
                let idle = match f.proto {
                    6 => TCP_IDLE,
                    17 => UDP_IDLE,
                    _ => OTHER_IDLE,
                };
                let (Entry::Forward { last_seen, .. } | Entry::Reverse { last_seen, .. }) = e;
                let keep = now.saturating_sub(*last_seen) < idle.as_secs() as u32;
                if !keep && matches!(e, Entry::Forward { .. }) {
                    gone += 1;
                }
                keep
            });
        }
        self.flows.fetch_sub(gone, Ordering::Relaxed);
    }

    /// Translated flows remembered.
    pub fn len(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reply direction of a client's `flow` once translated to `to`.
fn reply_of(flow: &Flow, to: SocketAddr) -> Flow {
    Flow {
        proto: flow.proto,
        src: to.ip(),
        sport: to.port(),
        dst: flow.src,
        dport: flow.sport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(sport: u16) -> Flow {
        Flow {
            proto: 6,
            src: "10.244.1.5".parse().unwrap(),
            sport,
            dst: "10.96.0.10".parse().unwrap(),
            dport: 80,
        }
    }

    #[test]
    fn flows_keep_their_backend_and_replies_are_translated_back() {
        let t = NatTable::default();
        let a: SocketAddr = "10.244.2.5:8080".parse().unwrap();
        let b: SocketAddr = "10.244.2.6:8080".parse().unwrap();
        assert!(t.reverse(reply_of(&flow(1000), a)).is_none());
        assert_eq!(t.forward(flow(1000), |_| true, || Some(a)), Forward::To(a));
        assert_eq!(
            t.forward(flow(1000), |_| true, || panic!("known flow")),
            Forward::To(a)
        );
        assert_eq!(
            t.reverse(reply_of(&flow(1000), a)),
            Some("10.96.0.10:80".parse().unwrap())
        );
        // The backend left the Service: the flow moves, the old reverse entry goes.
        assert_eq!(t.forward(flow(1000), |_| false, || Some(b)), Forward::To(b));
        assert!(t.reverse(reply_of(&flow(1000), a)).is_none());
        assert!(t.reverse(reply_of(&flow(1000), b)).is_some());
        assert_eq!(
            t.forward(flow(2000), |_| true, || None),
            Forward::NoEndpoint
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.translations.load(Ordering::Relaxed), 2);
        t.expire();
        assert_eq!(t.len(), 1, "not idle yet");
    }
}
