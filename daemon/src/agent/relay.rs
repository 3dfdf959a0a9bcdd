//! The relay for two nodes both behind NAT: which reachable node relays which pair (a pure
//! function of the Nodes, the same on every agent), and the forwarder the relay runs.
//!
//! Neither node of a NATed pair can send to the other first, so both send the pair's own
//! WireGuard datagrams to the relay's `kwire.dev/relay-endpoint` instead of to each other
//! (the agent sets the peer's endpoint to it). The relay forwards each datagram untouched to
//! the other node: it never holds the pair's keys, and what crosses it stays end-to-end
//! encrypted. It finds the destination in what WireGuard leaves in the clear: a handshake's
//! mac1 is keyed with its receiver's public key (which the relay knows for every node), and
//! every later message names the session index its receiver chose (learned from the
//! handshake that chose it). It knows the sender by the address its own authenticated
//! sessions with that node come from (its device's roamed endpoint), or, for a data message
//! from a new address (the NAT changed its mapping), by the session index it names.

use super::peers::NodeInfo;
use crate::node_state::NodeState;
use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use blake2::{Blake2s256, Blake2sMac};
use kwire_proto::key::PublicKey;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default relay port: the WireGuard port plus one.
pub const DEFAULT_RELAY_PORT: u16 = 51821;

/// A peer reached through a relay: the relay node and the address its forwarder listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub relay: String,
    pub endpoint: SocketAddr,
}

/// A node that may relay: published a usable relay endpoint, has a valid key (a withdrawn or
/// broken one: its agent is gone), not behind NAT, and neither its `Ready` nor its
/// `KwireReady` condition says otherwise (the node is down, or its agent says it is not
/// serving). A relay that stops so is replaced by the next candidate of its location (the
/// next oldest), on every agent alike, and its pairs move there.
fn candidate(n: &NodeInfo) -> Option<SocketAddr> {
    if n.behind_nat || !n.has_valid_key() || n.unready {
        return None;
    }
    let ep: SocketAddr = n.relay_endpoint.as_deref()?.trim().parse().ok()?;
    super::peers::usable_endpoint(&ep).then_some(ep)
}

/// Whether two nodes behind NAT need the relay: not when both name the same location (one
/// site, one private network: their published addresses reach each other).
pub fn needs_relay(a: &NodeInfo, a_nat: bool, b: &NodeInfo) -> bool {
    let same_site =
        matches!((&a.location, &b.location), (Some(x), Some(y)) if x == y && !x.is_empty());
    a_nat && b.behind_nat && !same_site
}

/// The relays by location: per `kwire.dev/location` (none counts as one location of its own),
/// the oldest candidate (creationTimestamp, then name), as Kilo elects a leader per location.
/// Plus the oldest of all, for locations without one.
#[derive(Debug, Default)]
pub struct Relays {
    by_location: BTreeMap<String, (Option<i64>, String, SocketAddr)>,
    oldest: Option<(Option<i64>, String, SocketAddr)>,
}

impl Relays {
    pub fn elect<'a>(nodes: impl Iterator<Item = &'a NodeInfo>) -> Relays {
        let mut r = Relays::default();
        let older = |a: &(Option<i64>, String, SocketAddr),
                     b: &(Option<i64>, String, SocketAddr)| {
            (a.0.unwrap_or(i64::MAX), &a.1) < (b.0.unwrap_or(i64::MAX), &b.1)
        };
        for n in nodes {
            let Some(ep) = candidate(n) else { continue };
            let c = (n.created, n.name.clone(), ep);
            let loc = n.location.clone().unwrap_or_default();
            match r.by_location.get(&loc) {
                Some(held) if !older(&c, held) => {}
                _ => {
                    r.by_location.insert(loc, c.clone());
                }
            }
            if r.oldest.as_ref().is_none_or(|held| older(&c, held)) {
                r.oldest = Some(c);
            }
        }
        r
    }

    /// The relay of the pair `a`, `b` (both behind NAT): the relay of the location of the node
    /// whose name sorts first, else of the other's location, else the oldest relay of all. Both
    /// nodes of the pair compute the same (the relay must see both sides' packets: a NAT lets
    /// answers in only from the address its node sent to).
    pub fn for_pair(&self, a: &NodeInfo, b: &NodeInfo) -> Option<Route> {
        let (first, second) = if a.name <= b.name { (a, b) } else { (b, a) };
        let at = |n: &NodeInfo| {
            self.by_location
                .get(n.location.as_deref().unwrap_or_default())
        };
        let (_, relay, endpoint) = at(first).or_else(|| at(second)).or(self.oldest.as_ref())?;
        Some(Route {
            relay: relay.clone(),
            endpoint: *endpoint,
        })
    }
}

/// The routes of this node's peers that go through a relay, by peer name. Empty unless this
/// node is behind NAT.
pub fn plan<'a>(
    own: &NodeInfo,
    own_nat: bool,
    nodes: impl Iterator<Item = &'a NodeInfo>,
) -> BTreeMap<String, Route> {
    if !own_nat {
        return BTreeMap::new();
    }
    let nodes: Vec<&NodeInfo> = nodes.collect();
    let relays = Relays::elect(nodes.iter().copied());
    nodes
        .into_iter()
        .filter(|n| n.name != own.name && needs_relay(own, own_nat, n))
        .filter_map(|n| Some((n.name.clone(), relays.for_pair(own, n)?)))
        .collect()
}

/// At most this many peers are listed in `kwire.dev/nat-observed`.
pub const MAX_NAT_OBSERVED: usize = 64;

/// The peers (by name) whose authenticated packets come from an address other than the
/// endpoint they publish: `seen` is the device's roamed endpoint per key. Relayed peers are
/// left out (their packets come from the relay).
pub fn nat_observations(
    applied: &BTreeMap<String, super::peers::DesiredPeer>,
    seen: &HashMap<PublicKey, SocketAddr>,
) -> BTreeMap<String, SocketAddr> {
    applied
        .values()
        .filter(|p| p.relay.is_none())
        .filter_map(|p| {
            let at = *seen.get(&p.public_key)?;
            (at != p.endpoint).then(|| (p.node.clone(), at))
        })
        .take(MAX_NAT_OBSERVED)
        .collect()
}

/// `kwire.dev/nat-observed`'s value for `obs` (None: remove it).
pub fn nat_annotation(obs: &BTreeMap<String, SocketAddr>) -> Option<String> {
    (!obs.is_empty()).then(|| {
        obs.iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// Whether another node sees this one behind NAT: the first (by observer name) whose
/// `kwire.dev/nat-observed` names `own`, with the address it sees. Entries that do not parse
/// are ignored.
pub fn seen_behind_nat<'a>(
    nodes: impl Iterator<Item = &'a NodeInfo>,
    own: &str,
) -> Option<(String, SocketAddr)> {
    nodes
        .filter(|n| n.name != own)
        .filter_map(|n| {
            let text = n.nat_observed.as_deref()?;
            let at = text.split(',').find_map(|e| {
                let (name, addr) = e.trim().split_once('=')?;
                (name == own)
                    .then(|| addr.parse::<SocketAddr>().ok())
                    .flatten()
            })?;
            Some((n.name.clone(), at))
        })
        .min()
}

/// mac1's key for messages to `key`: HASH("mac1----" || key).
fn mac1_key(key: &PublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"mac1----");
    h.update(key.0);
    h.finalize().into()
}

/// Whether `mac` is MAC(key, msg) (keyed BLAKE2s, 16 bytes).
fn mac_matches(key: &[u8; 32], msg: &[u8], mac: &[u8]) -> bool {
    let Ok(mut m) = <Blake2sMac<U16> as Mac>::new_from_slice(key) else {
        return false;
    };
    m.update(msg);
    m.verify_slice(mac).is_ok()
}

/// A node the relay forwards for (a peer of this node, behind NAT).
#[derive(Debug, Clone)]
pub struct Served {
    pub name: String,
    /// Its current key, and its next one while it rotates.
    pub keys: Vec<PublicKey>,
    mac1_keys: Vec<[u8; 32]>,
}

impl Served {
    pub fn new(name: String, keys: Vec<PublicKey>) -> Served {
        let mac1_keys = keys.iter().map(mac1_key).collect();
        Served {
            name,
            keys,
            mac1_keys,
        }
    }
}

/// WireGuard message types and sizes (the protocol's, as boringtun parses them).
const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const COOKIE: u8 = 3;
const DATA: u8 = 4;
const INITIATION_LEN: usize = 148;
const RESPONSE_LEN: usize = 92;
const COOKIE_LEN: usize = 64;
const DATA_MIN_LEN: usize = 32;

/// How long a learned session index is kept after its last use (sessions live 3 minutes).
const INDEX_TTL: Duration = Duration::from_secs(300);
/// At most this many learned indices (oldest pruned first).
const MAX_INDICES: usize = 16_384;
/// The served nodes' endpoints are re-read from the device at most this often.
const ENDPOINT_REFRESH: Duration = Duration::from_millis(250);

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The forwarding state: pure (no socket), so that tests drive it with datagrams.
#[derive(Default)]
pub struct Table {
    served: Vec<Served>,
    /// Served node → its endpoint as this node's device last saw it (authenticated).
    endpoints: HashMap<SocketAddr, usize>,
    by_ip: HashMap<IpAddr, Vec<usize>>,
    endpoints_read: Option<Instant>,
    /// Where each served node's relayed datagrams last came from (where to send it its
    /// answers: its NAT lets them in only from the address it sent to).
    relay_addr: HashMap<String, SocketAddr>,
    /// (sender, receiver index it names) → receiver, with the last use.
    sessions: HashMap<(String, u32), (String, Instant)>,
    /// Receiver index → the nodes with a session it names (a data message from a new address
    /// is looked up here, not by a scan of every session).
    by_index: HashMap<u32, Vec<String>>,
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward(SocketAddr),
    Drop,
}

impl Table {
    pub fn set_served(&mut self, served: Vec<Served>) {
        self.served = served;
        // The endpoints name served nodes by position: read again before the next use.
        self.endpoints.clear();
        self.by_ip.clear();
        self.endpoints_read = None;
        let names: Vec<&str> = self.served.iter().map(|s| s.name.as_str()).collect();
        self.relay_addr.retain(|n, _| names.contains(&n.as_str()));
        self.sessions.retain(|(from, _), (to, _)| {
            names.contains(&from.as_str()) && names.contains(&to.as_str())
        });
        self.index_sessions();
    }

    fn index_sessions(&mut self) {
        self.by_index.clear();
        for (name, index) in self.sessions.keys() {
            self.by_index.entry(*index).or_default().push(name.clone());
        }
    }

    /// Takes the served nodes' endpoints (from the device: the address each one's
    /// authenticated packets last came from).
    pub fn set_endpoints(&mut self, endpoints: &HashMap<PublicKey, SocketAddr>, now: Instant) {
        self.endpoints.clear();
        self.by_ip.clear();
        for (i, s) in self.served.iter().enumerate() {
            for ep in s.keys.iter().filter_map(|k| endpoints.get(k)) {
                self.endpoints.insert(*ep, i);
                let at = self.by_ip.entry(ep.ip()).or_default();
                if !at.contains(&i) {
                    at.push(i);
                }
            }
        }
        self.endpoints_read = Some(now);
    }

    fn endpoints_stale(&self, now: Instant) -> bool {
        self.endpoints_read
            .is_none_or(|t| now.duration_since(t) >= ENDPOINT_REFRESH)
    }

    /// The served node that sent from `from`: the one whose session comes from that address,
    /// else the only one whose sessions come from that IP (the NAT gave this flow another port).
    fn sender(&self, from: SocketAddr) -> Option<usize> {
        if let Some(i) = self.endpoints.get(&from) {
            return Some(*i);
        }
        match self.by_ip.get(&from.ip()).map(Vec::as_slice) {
            Some([i]) => Some(*i),
            _ => None,
        }
    }

    /// The served node (other than `sender`) a handshake's mac1 is keyed for.
    fn mac1_receiver(&self, sender: Option<usize>, msg: &[u8], mac_at: usize) -> Option<usize> {
        let (body, mac) = (&msg[..mac_at], &msg[mac_at..mac_at + 16]);
        self.served.iter().enumerate().find_map(|(i, s)| {
            (Some(i) != sender && s.mac1_keys.iter().any(|k| mac_matches(k, body, mac)))
                .then_some(i)
        })
    }

    fn learn(&mut self, receiver: usize, index: u32, sender: usize, now: Instant) {
        if self.sessions.len() >= MAX_INDICES {
            self.sessions
                .retain(|_, (_, used)| now.duration_since(*used) < INDEX_TTL);
            if self.sessions.len() >= MAX_INDICES {
                let oldest = self
                    .sessions
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.sessions.remove(&k);
                }
            }
            self.index_sessions();
        }
        let (r, s) = (
            self.served[receiver].name.clone(),
            self.served[sender].name.clone(),
        );
        let named = self.by_index.entry(index).or_default();
        if !named.contains(&r) {
            named.push(r.clone());
        }
        self.sessions.insert((r, index), (s, now));
    }

    /// Where a datagram from `from` goes; learns what it teaches.
    pub fn route(&mut self, from: SocketAddr, msg: &[u8], now: Instant) -> Verdict {
        let (Some(&kind), true) = (msg.first(), msg.len() >= DATA_MIN_LEN.min(COOKIE_LEN)) else {
            return Verdict::Drop;
        };
        if msg[1..4] != [0, 0, 0] {
            return Verdict::Drop;
        }
        let sender = self.sender(from);
        let to = match (kind, msg.len()) {
            (INITIATION, INITIATION_LEN) | (RESPONSE, RESPONSE_LEN) => {
                // A handshake from an unknown address is not forwarded: the sender's
                // authenticated packets to this node name its address first.
                let Some(s) = sender else {
                    return Verdict::Drop;
                };
                let mac_at = if kind == INITIATION { 116 } else { 60 };
                let Some(r) = self.mac1_receiver(Some(s), msg, mac_at) else {
                    return Verdict::Drop;
                };
                // The index the sender chose: the receiver's messages of this session name it.
                self.learn(r, le32(&msg[4..8]), s, now);
                self.relay_addr.insert(self.served[s].name.clone(), from);
                r
            }
            (COOKIE, COOKIE_LEN) | (DATA, DATA_MIN_LEN..) => {
                let index = le32(&msg[4..8]);
                let s = match sender {
                    Some(s) => s,
                    // A new address: the sender is the only served node with a session the index
                    // names (the NAT restarted or changed its mapping).
                    None if kind == DATA => match self.by_index.get(&index).map(Vec::as_slice) {
                        Some([name]) => match self.served.iter().position(|x| &x.name == name) {
                            Some(s) => s,
                            None => return Verdict::Drop,
                        },
                        _ => return Verdict::Drop,
                    },
                    None => return Verdict::Drop,
                };
                let key = (self.served[s].name.clone(), index);
                let Some((to, used)) = self.sessions.get_mut(&key) else {
                    return Verdict::Drop;
                };
                *used = now;
                // Per datagram: no copy of the receiver's name, and the sender's return
                // address is updated in place (inserted only the first time).
                let Some(r) = self.served.iter().position(|x| x.name == *to) else {
                    return Verdict::Drop;
                };
                match self.relay_addr.get_mut(&key.0) {
                    Some(a) => *a = from,
                    None => {
                        self.relay_addr.insert(key.0, from);
                    }
                }
                r
            }
            _ => return Verdict::Drop,
        };
        let name = &self.served[to].name;
        match self.relay_addr.get(name).copied().or_else(|| {
            self.endpoints
                .iter()
                .find_map(|(ep, i)| (*i == to).then_some(*ep))
        }) {
            Some(a) => Verdict::Forward(a),
            None => Verdict::Drop,
        }
    }
}

/// The running forwarder: a thread on the relay port; its counters are the node's
/// ([`NodeState::relay`]).
pub struct Forwarder {
    table: Arc<std::sync::Mutex<Table>>,
    status: Arc<NodeState>,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Binds `[::]:port` (IPv4 too) and starts forwarding for the nodes `set_served` names.
    pub fn start(port: u16, status: Arc<NodeState>) -> std::io::Result<Forwarder> {
        let socket = UdpSocket::bind(SocketAddr::new(IpAddr::from([0u16; 8]), port))
            .or_else(|_| UdpSocket::bind(SocketAddr::new(IpAddr::from([0u8; 4]), port)))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let table = Arc::new(std::sync::Mutex::new(Table::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, st, s) = (table.clone(), status.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kwire-relay".into())
            .spawn(move || forward(&socket, &st, &t, &s))?;
        status.relay.listening.store(true, Ordering::Relaxed);
        Ok(Forwarder {
            table,
            status,
            stop,
        })
    }

    pub fn set_served(&self, served: Vec<Served>) {
        let names = served.iter().map(|s| s.name.clone()).collect();
        self.status.relay.serving.store(Arc::new(names));
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_served(served);
    }
}

impl Drop for Forwarder {
    /// Tells the thread to stop and does not wait for it: it notices within its socket's
    /// read timeout (500 ms), and the agent drops the forwarder only on its way out, where
    /// waiting would hold the process (and a rollout's restart) up to half a second.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.status.relay.listening.store(false, Ordering::Relaxed);
    }
}

/// An IPv4 peer seen on the dual-stack socket as `::ffff:a.b.c.d`: as the device names it.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

fn forward(
    socket: &UdpSocket,
    status: &NodeState,
    table: &std::sync::Mutex<Table>,
    stop: &AtomicBool,
) {
    let counters = &status.relay;
    let mut buf = vec![0u8; 65_536];
    let v6_socket = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay socket receive failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let from = unmapped(from);
        let now = Instant::now();
        let verdict = {
            let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
            if t.endpoints_stale(now) && !t.served.is_empty() {
                let eps: HashMap<PublicKey, SocketAddr> = status
                    .device
                    .info()
                    .peers
                    .iter()
                    .filter_map(|p| Some((p.public_key, unmapped(p.endpoint?))))
                    .collect();
                t.set_endpoints(&eps, now);
            }
            t.route(from, &buf[..n], now)
        };
        match verdict {
            Verdict::Forward(to) => {
                let to = match (v6_socket, to) {
                    (true, SocketAddr::V4(v4)) => {
                        SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                    }
                    (_, to) => to,
                };
                match socket.send_to(&buf[..n], to) {
                    Ok(_) => counters.forwarded.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.dropped.fetch_add(1, Ordering::Relaxed),
                };
            }
            Verdict::Drop => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::key::PrivateKey;
    use boringtun::noise::{Tunn, TunnResult};

    fn node(
        name: &str,
        created: i64,
        nat: bool,
        loc: Option<&str>,
        relay: Option<&str>,
    ) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            created: Some(created),
            public_key: Some(PublicKey([created as u8 + 1; 32]).to_base64()),
            behind_nat: nat,
            location: loc.map(Into::into),
            relay_endpoint: relay.map(Into::into),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn one_relay_per_location_the_oldest_reachable_and_the_same_on_both_sides() {
        let nodes = [
            node("r-old", 1, false, Some("eu"), Some("192.0.2.1:51821")),
            node("r-new", 2, false, Some("eu"), Some("192.0.2.2:51821")),
            node("r-us", 3, false, Some("us"), Some("198.51.100.3:51821")),
            // Behind NAT: never a relay even when it publishes an endpoint.
            node("natted", 0, true, Some("us"), Some("198.51.100.9:51821")),
            node("a", 5, true, Some("us"), None),
            node("b", 6, true, Some("eu"), None),
            node("c", 7, true, Some("us"), None),
            node("d", 8, false, Some("asia"), None),
            node("e", 9, true, Some("asia"), None),
        ];
        let plan_of = |n: &str| {
            let own = nodes.iter().find(|x| x.name == n).unwrap();
            plan(own, own.behind_nat, nodes.iter())
        };
        let a = plan_of("a");
        // a–b: a sorts first, a's location (us) has r-us.
        assert_eq!(a["b"].relay, "r-us");
        assert_eq!(a["b"].endpoint, "198.51.100.3:51821".parse().unwrap());
        assert_eq!(plan_of("b")["a"], a["b"]);
        // a and c share a location: direct. d is reachable: direct.
        assert!(!a.contains_key("c") && !a.contains_key("d") && !a.contains_key("natted"));
        // b–e: b's location (eu): the oldest there.
        assert_eq!(plan_of("b")["e"].relay, "r-old");
        assert_eq!(plan_of("e")["b"].relay, "r-old");
        // A reachable node relays nothing of its own.
        assert!(plan_of("d").is_empty());
        // No relay at all: no route (the peer keeps its published endpoint).
        let lonely = [
            node("x", 1, true, None, None),
            node("y", 2, true, None, None),
        ];
        assert!(plan(&lonely[0], true, lonely.iter()).is_empty());
        // A location without a relay falls back to the other's, then to the oldest of all.
        let far = node("f", 10, true, Some("mars"), None);
        let g = node("g", 11, true, Some("venus"), None);
        let all: Vec<NodeInfo> = nodes.iter().cloned().chain([far.clone(), g]).collect();
        assert_eq!(plan(&far, true, all.iter())["g"].relay, "r-old");
        assert_eq!(plan(&far, true, all.iter())["b"].relay, "r-old");
    }

    /// The relay of a location stops serving (its Node not Ready, its agent not KwireReady,
    /// its key withdrawn or broken): both sides of every pair it served move to the next
    /// candidate of that location by the same rule, and back when it serves again.
    #[test]
    fn a_relay_that_stops_serving_is_replaced_by_the_next_candidate_on_both_sides() {
        let mut nodes = vec![
            node("r-old", 1, false, Some("eu"), Some("192.0.2.1:51821")),
            node("r-new", 2, false, Some("eu"), Some("192.0.2.2:51821")),
            node("r-us", 3, false, Some("us"), Some("198.51.100.3:51821")),
            node("a", 5, true, Some("eu"), None),
            node("b", 6, true, Some("asia"), None),
        ];
        let route = |nodes: &[NodeInfo], from: &str, to: &str| {
            let own = nodes.iter().find(|x| x.name == from).unwrap();
            plan(own, true, nodes.iter()).get(to).cloned()
        };
        let both = |nodes: &[NodeInfo]| {
            let (ab, ba) = (route(nodes, "a", "b"), route(nodes, "b", "a"));
            assert_eq!(ab, ba, "both sides of the pair agree");
            ab.map(|r| r.relay)
        };
        assert_eq!(both(&nodes).as_deref(), Some("r-old"));
        let downs: [fn(&mut NodeInfo); 4] = [
            |n| n.unready = true,
            |n| n.public_key = None,
            |n| n.public_key = Some("not a key".into()),
            |n| n.public_key = Some(PublicKey([0; 32]).to_base64()),
        ];
        for down in downs {
            let mut broken = nodes.clone();
            down(&mut broken[0]);
            assert_eq!(both(&broken).as_deref(), Some("r-new"), "{:?}", broken[0]);
            // The location's last relay down too: the oldest relay of all.
            down(&mut broken[1]);
            assert_eq!(both(&broken).as_deref(), Some("r-us"));
        }
        // It serves again: the pair goes back (the oldest of its location).
        nodes[0].unready = false;
        assert_eq!(both(&nodes).as_deref(), Some("r-old"));
    }

    /// Node conditions as the relay election reads them: `Ready` or `KwireReady` False or
    /// Unknown is down; True, other types or none is not.
    #[test]
    fn unready_reads_ready_and_kwire_ready() {
        use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
        let with = |conds: &[(&str, &str)]| {
            NodeInfo::from_node(&Node {
                status: Some(NodeStatus {
                    conditions: Some(
                        conds
                            .iter()
                            .map(|(t, s)| NodeCondition {
                                type_: (*t).into(),
                                status: (*s).into(),
                                ..NodeCondition::default()
                            })
                            .collect(),
                    ),
                    ..NodeStatus::default()
                }),
                ..Node::default()
            })
            .unready
        };
        assert!(!with(&[]));
        assert!(!with(&[("Ready", "True"), ("KwireReady", "True")]));
        assert!(!with(&[("MemoryPressure", "False"), ("Ready", "True")]));
        assert!(with(&[("Ready", "Unknown")]));
        assert!(with(&[("Ready", "False")]));
        assert!(with(&[("Ready", "True"), ("KwireReady", "False")]));
        assert!(!NodeInfo::from_node(&Node::default()).unready);
    }

    #[test]
    fn nat_is_observed_by_peers_and_detected_by_the_node_itself() {
        let peer =
            |name: &str, k: u8, ep: &str, relay: Option<&str>| super::super::peers::DesiredPeer {
                node: name.into(),
                public_key: PublicKey([k; 32]),
                next_public_key: None,
                endpoint: ep.parse().unwrap(),
                allowed_ips: vec![],
                keepalive: 0,
                relay: relay.map(Into::into),
                behind_nat: false,
            };
        let applied: BTreeMap<String, super::super::peers::DesiredPeer> = [
            peer("a", 1, "192.0.2.1:51820", None),
            peer("b", 2, "10.77.3.2:51820", None),
            peer("c", 3, "192.0.2.9:51821", Some("r")),
            peer("d", 4, "192.0.2.4:51820", None),
        ]
        .into_iter()
        .map(|p| (p.node.clone(), p))
        .collect();
        let seen = HashMap::from([
            (PublicKey([1; 32]), "192.0.2.1:51820".parse().unwrap()),
            (PublicKey([2; 32]), "192.0.2.213:51820".parse().unwrap()),
            (PublicKey([3; 32]), "203.0.113.3:51820".parse().unwrap()),
        ]);
        let obs = nat_observations(&applied, &seen);
        assert_eq!(obs.keys().collect::<Vec<_>>(), ["b"]);
        let text = nat_annotation(&obs).unwrap();
        assert_eq!(text, "b=192.0.2.213:51820");
        assert_eq!(nat_annotation(&BTreeMap::new()), None);
        let observer = |name: &str, text: &str| NodeInfo {
            name: name.into(),
            nat_observed: Some(text.into()),
            ..NodeInfo::default()
        };
        let nodes = [
            observer("z", "b=198.51.100.1:1"),
            observer("m", &text),
            observer("x", "garbage,=,b=not-an-address"),
            observer("b", "b=203.0.113.1:2"),
        ];
        assert_eq!(
            seen_behind_nat(nodes.iter(), "b"),
            Some(("m".to_string(), "192.0.2.213:51820".parse().unwrap()))
        );
        assert_eq!(seen_behind_nat(nodes.iter(), "a"), None);
    }

    fn tunn(own: &PrivateKey, peer: &PrivateKey, index: u32) -> Tunn {
        Tunn::new(
            own.secret(),
            x25519_dalek::PublicKey::from(&peer.secret()),
            None,
            None,
            index,
            None,
        )
    }

    fn out(r: TunnResult<'_>) -> Vec<u8> {
        match r {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a datagram, got {other:?}"),
        }
    }

    /// Two nodes behind NAT handshake and exchange data through the table alone: every
    /// datagram goes to the other node's relayed address, untouched (the relay holds no key);
    /// strangers and unknown sessions are dropped; a new NAT mapping is followed.
    #[test]
    fn forwards_a_real_handshake_and_data_between_two_natted_nodes() {
        let (ka, kb, kc) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let (mut a, mut b) = (tunn(&ka, &kb, 7 << 8), tunn(&kb, &ka, 9 << 8));
        let (a_at, b_at): (SocketAddr, SocketAddr) = (
            "203.0.113.1:51820".parse().unwrap(),
            "198.51.100.2:51820".parse().unwrap(),
        );
        let now = Instant::now();
        let mut t = Table::default();
        t.set_served(vec![
            Served::new("a".into(), vec![ka.public_key()]),
            Served::new("b".into(), vec![kb.public_key()]),
            Served::new("c".into(), vec![kc.public_key()]),
        ]);
        t.set_endpoints(
            &HashMap::from([(ka.public_key(), a_at), (kb.public_key(), b_at)]),
            now,
        );
        let mut buf = vec![0u8; 2048];
        let init = out(a.format_handshake_initiation(&mut buf, false));
        // From a stranger: dropped, even though it is a valid initiation for b.
        let stranger: SocketAddr = "192.0.2.66:4444".parse().unwrap();
        assert_eq!(t.route(stranger, &init, now), Verdict::Drop);
        assert_eq!(t.route(a_at, &init, now), Verdict::Forward(b_at));
        let resp = out(b.decapsulate(None, &init, &mut buf));
        assert_eq!(t.route(b_at, &resp, now), Verdict::Forward(a_at));
        // a's first data (a keepalive) completes b's side.
        let mut buf2 = vec![0u8; 2048];
        let _ = a.decapsulate(None, &resp, &mut buf);
        let data = out(a.encapsulate(&[], &mut buf2));
        assert_eq!(t.route(a_at, &data, now), Verdict::Forward(b_at));
        assert!(matches!(
            b.decapsulate(None, &data, &mut buf),
            TunnResult::Done
        ));
        let back = out(b.encapsulate(&[], &mut buf2));
        assert_eq!(t.route(b_at, &back, now), Verdict::Forward(a_at));
        // A session index nobody learned: dropped.
        let mut bogus = back.clone();
        bogus[4..8].copy_from_slice(&0x00ab_cdefu32.to_le_bytes());
        assert_eq!(t.route(b_at, &bogus, now), Verdict::Drop);
        // Not WireGuard: dropped.
        assert_eq!(t.route(a_at, b"hello, relay", now), Verdict::Drop);
        // a's NAT restarts with another address: its data, naming the session b chose, is
        // still a's; b's answers follow a to the new address.
        let a_new: SocketAddr = "203.0.113.77:40001".parse().unwrap();
        let data = out(a.encapsulate(&[], &mut buf2));
        assert_eq!(t.route(a_new, &data, now), Verdict::Forward(b_at));
        let back = out(b.encapsulate(&[], &mut buf2));
        assert_eq!(t.route(b_at, &back, now), Verdict::Forward(a_new));
        // A handshake from the new address waits for a's authenticated packets to this node.
        let init = out(a.format_handshake_initiation(&mut buf, true));
        assert_eq!(t.route(a_new, &init, now), Verdict::Drop);
        // No longer served: nothing is forwarded for it.
        t.set_served(vec![Served::new("a".into(), vec![ka.public_key()])]);
        assert_eq!(t.route(b_at, &back, now), Verdict::Drop);
    }
}
