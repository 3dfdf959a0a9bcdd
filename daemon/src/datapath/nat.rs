//! The translation half of the connection table: for every flow to a Service this node
//! translated, the backend it was given (so later packets keep it, even after the endpoint
//! left the Service, until the flow ends) and the reverse entry that turns the backend's
//! replies back into the Service's address. Shared by all workers like [`super::conntrack`];
//! both entries of a flow live in one shard, chosen by the client's port.

use super::conntrack::{idle_limit, Flow, CLOCK_START, SHARDS};
use crate::services::table::FrontendKey;
use crate::wg::allowed_ips::IntHasher;
use serde::{Deserialize, Serialize};
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
    /// Backend -> client: rewrite the source to `from` (the Service's address), and for a
    /// hairpinned flow the destination (the node-port address) back to the client `to`.
    Reverse {
        from: SocketAddr,
        to: Option<IpAddr>,
        last_seen: u32,
    },
}

/// An entry as saved across a graceful restart (`agent::flow_state`); `idle`: seconds since
/// its last packet (a sticky client's: since it last opened a flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedNat {
    Forward {
        flow: Flow,
        to: SocketAddr,
        idle: u32,
    },
    Reverse {
        flow: Flow,
        from: SocketAddr,
        to: Option<IpAddr>,
        idle: u32,
    },
    Sticky {
        frontend: FrontendKey,
        client: IpAddr,
        to: SocketAddr,
        secs: u32,
        idle: u32,
    },
}

/// A client's address on a Service, per `sessionAffinity: ClientIP`.
type AffinityKey = (FrontendKey, IpAddr);

/// A sticky client's backend, when it last opened a flow, and for how long it sticks.
#[derive(Debug, Clone, Copy)]
struct Sticky {
    to: SocketAddr,
    last_seen: u32,
    secs: u32,
}

type Shard = Mutex<HashMap<Flow, Entry, BuildHasherDefault<IntHasher>>>;
type AffinityShard = Mutex<HashMap<AffinityKey, Sticky, BuildHasherDefault<IntHasher>>>;

/// The table.
pub struct NatTable {
    shards: Vec<Shard>,
    /// `sessionAffinity: ClientIP`: each sticky client's backend, by client address.
    affinity: Vec<AffinityShard>,
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
            affinity: (0..SHARDS)
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
    /// The shard of a flow, by the client's port alone: a hairpinned flow's reply is
    /// addressed to the node-port address, not the client's, but keeps its port.
    fn shard(&self, proto: u8, port: u16) -> &Shard {
        let h = BuildHasherDefault::<IntHasher>::default().hash_one((proto, port));
        &self.shards[(h as usize) & (SHARDS - 1)]
    }

    /// The shard of a client's session-affinity entries.
    fn affinity_shard(&self, client: IpAddr) -> &AffinityShard {
        let h = BuildHasherDefault::<IntHasher>::default().hash_one(client);
        &self.affinity[(h as usize) & (SHARDS - 1)]
    }

    fn now(&self) -> u32 {
        CLOCK_START.saturating_add(self.epoch.elapsed().as_secs() as u32)
    }

    /// Every entry (each flow's two, and the sticky clients), for a restart to put back
    /// ([`NatTable::restore`]).
    pub fn save(&self) -> Vec<SavedNat> {
        let now = self.now();
        let mut out = Vec::with_capacity(2 * self.len());
        for s in &self.shards {
            let m = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(m.iter().map(|(flow, e)| match *e {
                Entry::Forward { to, last_seen } => SavedNat::Forward {
                    flow: *flow,
                    to,
                    idle: now.saturating_sub(last_seen),
                },
                Entry::Reverse {
                    from,
                    to,
                    last_seen,
                } => SavedNat::Reverse {
                    flow: *flow,
                    from,
                    to,
                    idle: now.saturating_sub(last_seen),
                },
            }));
        }
        for s in &self.affinity {
            let m = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(m.iter().map(|(&(frontend, client), st)| SavedNat::Sticky {
                frontend,
                client,
                to: st.to,
                secs: st.secs,
                idle: now.saturating_sub(st.last_seen),
            }));
        }
        out
    }

    /// Puts back entries an earlier process saved `gap` seconds ago, as if that process had
    /// gone on: one idle past its limit by now is left out, one this table already holds is
    /// kept as it is, and flows past [`MAX_NAT_FLOWS`] are left out. Returns how many flows
    /// were put back.
    pub fn restore(&self, saved: &[SavedNat], gap: u32) -> usize {
        let now = self.now();
        let mut restored = 0;
        for s in saved {
            match *s {
                SavedNat::Forward { flow, to, idle } => {
                    if self.flows.load(Ordering::Relaxed) < MAX_NAT_FLOWS
                        && self.put_back(flow, flow.sport, idle.saturating_add(gap), |last_seen| {
                            Entry::Forward { to, last_seen }
                        })
                    {
                        self.flows.fetch_add(1, Ordering::Relaxed);
                        restored += 1;
                    }
                }
                SavedNat::Reverse {
                    flow,
                    from,
                    to,
                    idle,
                } => {
                    // Keyed by the reply, whose destination port is the client's.
                    self.put_back(flow, flow.dport, idle.saturating_add(gap), |last_seen| {
                        Entry::Reverse {
                            from,
                            to,
                            last_seen,
                        }
                    });
                }
                SavedNat::Sticky {
                    frontend,
                    client,
                    to,
                    secs,
                    idle,
                } => {
                    let idle = idle.saturating_add(gap);
                    if idle >= secs {
                        continue;
                    }
                    let mut m = self
                        .affinity_shard(client)
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    m.entry((frontend, client)).or_insert(Sticky {
                        to,
                        last_seen: now.saturating_sub(idle),
                        secs,
                    });
                }
            }
        }
        restored
    }

    /// Inserts a restored entry of `flow` (in the shard of the client's `port`) unless it is
    /// idle past its limit or already held; true when inserted.
    fn put_back(&self, flow: Flow, port: u16, idle: u32, entry: impl FnOnce(u32) -> Entry) -> bool {
        if idle >= idle_limit(flow.proto) {
            return false;
        }
        let now = self.now();
        let mut m = self
            .shard(flow.proto, port)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&flow) {
            return false;
        }
        m.insert(flow, entry(now.saturating_sub(idle)));
        true
    }

    /// The backend for a client's packet of `flow` (to a Service's address). A known flow
    /// keeps its backend while `keep(backend)` says so; otherwise `choose` picks one and both
    /// entries are remembered. A flow whose backend is the client itself (hairpin) gets the
    /// source `hairpin` (the caller rewrites it): its reverse entry is keyed by that address.
    pub fn forward(
        &self,
        flow: Flow,
        hairpin: Option<IpAddr>,
        keep: impl FnOnce(SocketAddr) -> bool,
        choose: impl FnOnce() -> Option<SocketAddr>,
    ) -> Forward {
        let now = self.now();
        let mut m = self
            .shard(flow.proto, flow.sport)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(Entry::Forward { to, last_seen }) = m.get_mut(&flow) {
            if keep(*to) {
                *last_seen = now;
                let to = *to;
                if let Some(Entry::Reverse { last_seen, .. }) =
                    m.get_mut(&reply_of(&flow, to, hairpin))
                {
                    *last_seen = now;
                }
                return Forward::To(to);
            }
            let old = *to;
            m.remove(&flow);
            m.remove(&reply_of(&flow, old, hairpin));
            self.flows.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(to) = choose() else {
            return Forward::NoEndpoint;
        };
        if self.flows.load(Ordering::Relaxed) >= MAX_NAT_FLOWS {
            return Forward::Full;
        }
        m.insert(flow, Entry::Forward { to, last_seen: now });
        let pinned = hairpin.filter(|_| to.ip() == flow.src);
        m.insert(
            reply_of(&flow, to, hairpin),
            Entry::Reverse {
                from: SocketAddr::new(flow.dst, flow.dport),
                to: pinned.map(|_| flow.src),
                last_seen: now,
            },
        );
        self.flows.fetch_add(1, Ordering::Relaxed);
        self.translations.fetch_add(1, Ordering::Relaxed);
        Forward::To(to)
    }

    /// The Service address a backend's reply of `flow` (backend -> client) must come from,
    /// if it belongs to a translated flow, and for a hairpinned one the client's address
    /// its destination becomes.
    #[inline]
    pub fn reverse(&self, flow: Flow) -> Option<(SocketAddr, Option<IpAddr>)> {
        if self.flows.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let m = self
            .shard(flow.proto, flow.dport)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match m.get(&flow) {
            Some(Entry::Reverse { from, to, .. }) => Some((*from, *to)),
            _ => None,
        }
    }

    /// The backend of a translated flow (client -> Service), if it is one; nothing changes.
    pub fn backend(&self, flow: Flow) -> Option<SocketAddr> {
        if self.flows.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let m = self
            .shard(flow.proto, flow.sport)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match m.get(&flow) {
            Some(Entry::Forward { to, .. }) => Some(*to),
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
                let (Entry::Forward { last_seen, .. } | Entry::Reverse { last_seen, .. }) = e;
                let keep = now.saturating_sub(*last_seen) < idle_limit(f.proto);
                if !keep && matches!(e, Entry::Forward { .. }) {
                    gone += 1;
                }
                keep
            });
        }
        self.flows.fetch_sub(gone, Ordering::Relaxed);
        for s in &self.affinity {
            let mut m = s.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|_, e| now.saturating_sub(e.last_seen) < e.secs);
        }
    }

    /// The backend of a new flow of `client` to a frontend with `sessionAffinity: ClientIP`
    /// (`secs`: its timeout): the client's last backend while it opened a flow within the
    /// timeout and `usable(backend)`; otherwise `choose`'s, remembered.
    pub fn sticky(
        &self,
        frontend: FrontendKey,
        client: IpAddr,
        secs: u32,
        usable: impl FnOnce(SocketAddr) -> bool,
        choose: impl FnOnce() -> Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        self.sticky_at(self.now(), frontend, client, secs, usable, choose)
    }

    fn sticky_at(
        &self,
        now: u32,
        frontend: FrontendKey,
        client: IpAddr,
        secs: u32,
        usable: impl FnOnce(SocketAddr) -> bool,
        choose: impl FnOnce() -> Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        let mut m = self
            .affinity_shard(client)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (frontend, client);
        if let Some(s) = m.get_mut(&key) {
            if now.saturating_sub(s.last_seen) < s.secs && usable(s.to) {
                s.last_seen = now;
                s.secs = secs;
                return Some(s.to);
            }
        }
        let to = choose()?;
        m.insert(
            key,
            Sticky {
                to,
                last_seen: now,
                secs,
            },
        );
        Some(to)
    }

    /// Translated flows remembered.
    pub fn len(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reply direction of a client's `flow` once translated to `to` (to the `hairpin`
/// address when the backend is the client itself).
fn reply_of(flow: &Flow, to: SocketAddr, hairpin: Option<IpAddr>) -> Flow {
    let dst = match hairpin {
        Some(h) if to.ip() == flow.src => h,
        _ => flow.src,
    };
    Flow {
        proto: flow.proto,
        src: to.ip(),
        sport: to.port(),
        dst,
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
        assert!(t.reverse(reply_of(&flow(1000), a, None)).is_none());
        assert_eq!(
            t.forward(flow(1000), None, |_| true, || Some(a)),
            Forward::To(a)
        );
        assert_eq!(
            t.forward(flow(1000), None, |_| true, || panic!("known flow")),
            Forward::To(a)
        );
        assert_eq!(
            t.reverse(reply_of(&flow(1000), a, None)),
            Some(("10.96.0.10:80".parse().unwrap(), None))
        );
        // The backend left the Service: the flow moves, the old reverse entry goes.
        assert_eq!(
            t.forward(flow(1000), None, |_| false, || Some(b)),
            Forward::To(b)
        );
        assert!(t.reverse(reply_of(&flow(1000), a, None)).is_none());
        assert!(t.reverse(reply_of(&flow(1000), b, None)).is_some());
        assert_eq!(
            t.forward(flow(2000), None, |_| true, || None),
            Forward::NoEndpoint
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.translations.load(Ordering::Relaxed), 2);
        t.expire();
        assert_eq!(t.len(), 1, "not idle yet");
    }

    #[test]
    fn a_hairpinned_flow_is_answered_from_the_service_to_the_client() {
        let t = NatTable::default();
        let me: SocketAddr = "10.244.1.5:8080".parse().unwrap();
        let h: IpAddr = "10.96.0.0".parse().unwrap();
        assert_eq!(
            t.forward(flow(1000), Some(h), |_| true, || Some(me)),
            Forward::To(me)
        );
        let reply = Flow {
            proto: 6,
            src: me.ip(),
            sport: 8080,
            dst: h,
            dport: 1000,
        };
        assert_eq!(
            t.reverse(reply),
            Some(("10.96.0.10:80".parse().unwrap(), Some(me.ip())))
        );
        // Another backend: no hairpin, the reply goes to the client as usual.
        let other: SocketAddr = "10.244.2.5:8080".parse().unwrap();
        t.forward(flow(1001), Some(h), |_| true, || Some(other));
        assert!(t.reverse(reply_of(&flow(1001), other, Some(h))).is_some());
        assert_eq!(reply_of(&flow(1001), other, Some(h)).dst, flow(1001).src);
    }

    #[test]
    fn affinity_keeps_a_client_on_its_backend_until_the_timeout() {
        let t = NatTable::default();
        let fe = FrontendKey {
            proto: 6,
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
        };
        let client: IpAddr = "10.244.1.5".parse().unwrap();
        let a: SocketAddr = "10.244.2.5:8080".parse().unwrap();
        let b: SocketAddr = "10.244.2.6:8080".parse().unwrap();
        let other: IpAddr = "10.244.1.6".parse().unwrap();
        // (now, client, whether b is still usable, what Maglev would choose, the answer)
        for (now, who, b_usable, choice, want) in [
            (100, client, true, Some(a), Some(a)),
            // Within the timeout (counted from the last new flow), whatever the hash says.
            (109, client, true, Some(b), Some(a)),
            (118, client, true, Some(b), Some(a)),
            // Another client: its own choice.
            (118, other, true, Some(b), Some(b)),
            // Timed out: chosen again.
            (128, client, true, Some(b), Some(b)),
            // The backend left the Service: chosen again at once.
            (129, client, false, Some(a), Some(a)),
            (130, client, true, None, Some(a)),
        ] {
            let got = t.sticky_at(now, fe, who, 10, |x| b_usable || x != b, || choice);
            assert_eq!(got, want, "at {now} for {who}");
        }
    }

    #[test]
    fn restored_entries_translate_as_before_and_respect_the_limits() {
        let old = NatTable::default();
        let backend: SocketAddr = "10.244.2.5:8080".parse().unwrap();
        assert_eq!(
            old.forward(flow(1000), None, |_| true, || Some(backend)),
            Forward::To(backend)
        );
        let fe = FrontendKey {
            proto: 6,
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
        };
        let client: IpAddr = "10.244.1.5".parse().unwrap();
        old.sticky(fe, client, 60, |_| true, || Some(backend));
        let saved = old.save();
        assert_eq!(saved.len(), 3);

        let new = NatTable::default();
        assert_eq!(new.restore(&saved, 10), 1);
        assert_eq!(new.len(), 1);
        assert_eq!(new.backend(flow(1000)), Some(backend));
        let reply = reply_of(&flow(1000), backend, None);
        assert_eq!(new.reverse(reply), Some((SocketAddr::new(fe.ip, 80), None)));
        // The sticky client keeps its backend whatever Maglev says now.
        let other: SocketAddr = "10.244.2.6:8080".parse().unwrap();
        assert_eq!(
            new.sticky(fe, client, 60, |_| true, || Some(other)),
            Some(backend)
        );
        // Again: nothing doubles. Past the affinity's timeout and the flow's idle limit:
        // nothing is put back.
        assert_eq!(new.restore(&saved, 10), 0);
        assert_eq!(new.len(), 1);
        let late = NatTable::default();
        assert_eq!(late.restore(&saved, idle_limit(6)), 0);
        assert!(late.is_empty());
        assert_eq!(
            late.sticky(fe, client, 60, |_| true, || Some(other)),
            Some(other)
        );
    }
}
