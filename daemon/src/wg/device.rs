//! The device: its configuration (written by the control plane under one lock) and the
//! [`Snapshot`] the packet loop reads without waiting (rebuilt and swapped on every change).

use crate::wg::allowed_ips::{AllowedIps, IntMap};
use crate::wg::handshakes::{HandshakeStats, Initiations, Pacer, HANDSHAKE_RATE_LIMIT};
use crate::wg::key::{PresharedKey, PrivateKey};
use crate::wg::ratelimit::SourceLimiter;
pub use crate::wg::sessions::PeerState;
use crate::wg::sessions::{Pair, Standby, MAX_PAIRS};
use crate::wg::uapi::{DeviceInfo, Errno, PeerChange, PeerInfo, SetRequest, UapiError};
use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use ipnetwork::IpNetwork;
use kwire_proto::key::PublicKey;
use rand_core::RngCore;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// Largest session index boringtun accepts (it shifts the index left by 8 bits).
const MAX_INDEX: u32 = (1 << 24) - 1;

/// A peer as the packet loop sees it.
pub struct Peer {
    pub public_key: PublicKey,
    /// The 24-bit session index the peer's first `Tunn` got (incoming packets name a `Tunn`'s
    /// index in `receiver_idx`; while keys rotate a peer has several, see [`PeerState`]).
    pub index: u32,
    pub preshared_key: Option<PresharedKey>,
    pub persistent_keepalive: u16,
    /// Shared with the peer's successor when its public key is renamed (it rotated).
    state: Arc<Mutex<PeerState>>,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets to this peer that no session could carry yet, or that had no endpoint.
    pub tx_dropped: AtomicU64,
    /// The outcome of every handshake attempt with the peer.
    pub handshakes: HandshakeStats,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &self.public_key)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Peer {
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while holding the lock aborts the process (release profile), so poison
        // can only be seen in tests; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An initiation of ours went out (`st` is this peer's locked state): one that was never
    /// answered timed out.
    pub fn initiation_sent(&self, st: &mut PeerState) {
        if st.initiations.sent() {
            self.handshakes.timeout.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.lock().endpoint
    }

    /// Wall-clock time of the last completed handshake.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let d = self.lock().tunn.time_since_last_handshake()?;
        SystemTime::now().checked_sub(d)
    }
}

/// The device's keys as the packet loop needs them for incoming handshakes.
pub struct Identity {
    pub secret: x25519_dalek::StaticSecret,
    pub public: x25519_dalek::PublicKey,
    /// MAC checks and cookies under load, shared by every peer (reset once a second).
    pub rate_limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(k: &PrivateKey) -> Arc<Identity> {
        let secret = k.secret();
        let public = x25519_dalek::PublicKey::from(&secret);
        Arc::new(Identity {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
        })
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }
}

/// What the packet loop reads: immutable, swapped whole on every configuration change.
#[derive(Default)]
pub struct Snapshot {
    pub peers: Vec<Arc<Peer>>,
    /// Destination address to peer slot (index into `peers`).
    pub routes: AllowedIps<u32>,
    /// Session index (`receiver_idx >> 8`) to peer slot (every `Tunn` of every peer).
    pub by_index: IntMap<u32, u32>,
    /// Public key to peer slot, for handshake initiations: each peer's current key and, while
    /// it rotates, its next key. Revoked keys are never here.
    pub by_key: HashMap<[u8; 32], u32>,
    /// Endpoint to peer slot, as configured when the snapshot was made (not as roamed since):
    /// whom to handshake with when a data message names a session we do not know.
    pub by_endpoint: HashMap<SocketAddr, u32>,
    pub identity: Option<Arc<Identity>>,
    /// The key this device rotates to, while it rotates: initiations addressed to it are
    /// answered too (MAC1 tells which of the two keys an initiation is for).
    pub next_identity: Option<Arc<Identity>>,
}

impl Snapshot {
    #[inline]
    pub fn peer_for_index(&self, receiver_idx: u32) -> Option<(u32, &Arc<Peer>)> {
        let slot = *self.by_index.get(&(receiver_idx >> 8))?;
        Some((slot, &self.peers[slot as usize]))
    }
}

/// Operations on the outside world a configuration change needs (sockets); the tunnel
/// runtime implements them, tests use a double.
pub trait NetworkControl {
    /// (Re)binds the UDP sockets on `port` (0: any); returns the bound port.
    fn bind(&mut self, port: u16, fwmark: u32) -> std::io::Result<u16>;
    fn set_fwmark(&mut self, fwmark: u32) -> std::io::Result<()>;
}

struct PeerEntry {
    peer: Arc<Peer>,
    allowed_ips: Vec<IpNetwork>,
    /// The key the peer rotates to, while it does.
    next_key: Option<PublicKey>,
}

#[derive(Default)]
struct Config {
    key: Option<PrivateKey>,
    identity: Option<Arc<Identity>>,
    next_key: Option<PrivateKey>,
    next_identity: Option<Arc<Identity>>,
    /// Peer keys refused for good (revoked): never a peer, a next key or a session.
    revoked: BTreeSet<PublicKey>,
    listen_port: u16,
    bound: bool,
    fwmark: u32,
    peers: BTreeMap<PublicKey, PeerEntry>,
}

/// A WireGuard device: configuration plus the snapshot the loop reads.
pub struct Device {
    config: Mutex<Config>,
    snapshot: ArcSwap<Snapshot>,
    pub source_limiter: SourceLimiter,
    /// Initiations the device starts on its own (greetings, triggers).
    pub pacer: Pacer,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            config: Mutex::new(Config::default()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            source_limiter: SourceLimiter::default(),
            pacer: Pacer::default(),
        }
    }
}

fn new_index(used: &IntMap<u32, u32>) -> u32 {
    loop {
        let i = rand_core::OsRng.next_u32() & MAX_INDEX;
        if i != 0 && !used.contains_key(&i) {
            return i;
        }
    }
}

impl Device {
    pub fn new() -> Device {
        Device::default()
    }

    /// The current snapshot (cheap; hold it for a batch, not forever).
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    fn lock(&self) -> MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn listen_port(&self) -> u16 {
        self.lock().listen_port
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.lock().key.as_ref().map(PrivateKey::public_key)
    }

    /// Applies a `set=1` request as one change: either all of it or, on error, none of the
    /// peer changes (a failed bind leaves the old port).
    pub fn apply(&self, req: SetRequest, net: &mut dyn NetworkControl) -> Result<(), UapiError> {
        let mut cfg = self.lock();
        let fwmark = req.fwmark.unwrap_or(cfg.fwmark);
        if let Some(port) = req.listen_port {
            if !cfg.bound || port != cfg.listen_port || (port == 0) {
                let bound = net.bind(port, fwmark).map_err(|e| UapiError {
                    errno: if e.kind() == std::io::ErrorKind::AddrInUse {
                        Errno::AddrInUse
                    } else {
                        Errno::Io
                    },
                    message: format!("binding UDP port {port}: {e}"),
                })?;
                cfg.listen_port = bound;
                cfg.bound = true;
            }
        }
        if req.fwmark.is_some() && fwmark != cfg.fwmark {
            net.set_fwmark(fwmark).map_err(|e| UapiError {
                errno: Errno::Io,
                message: format!("setting fwmark {fwmark}: {e}"),
            })?;
            cfg.fwmark = fwmark;
        }
        if let Some(k) = req.private_key {
            set_private_key(&mut cfg, k);
        }
        if req.replace_peers {
            cfg.peers.clear();
        }
        let mut used = None;
        for change in req.peers {
            apply_peer(&mut cfg, change, &mut used);
        }
        self.publish(&cfg);
        Ok(())
    }

    /// Binds UDP port `port` on first start if no request did (0: the kernel picks, as
    /// wireguard-go does once the device is up). A later request for the same port keeps the
    /// socket.
    pub fn ensure_bound(&self, net: &mut dyn NetworkControl, port: u16) -> std::io::Result<u16> {
        let mut cfg = self.lock();
        if !cfg.bound {
            cfg.listen_port = net.bind(port, cfg.fwmark)?;
            cfg.bound = true;
        }
        Ok(cfg.listen_port)
    }

    fn publish(&self, cfg: &Config) {
        let mut s = Snapshot {
            identity: cfg.identity.clone(),
            next_identity: cfg.next_identity.clone(),
            ..Snapshot::default()
        };
        for (slot, e) in cfg.peers.values().enumerate() {
            let slot = slot as u32;
            s.peers.push(e.peer.clone());
            let st = e.peer.lock();
            for i in st.indexes() {
                s.by_index.insert(i, slot);
            }
            if let Some(ep) = st.endpoint {
                s.by_endpoint.insert(ep, slot);
            }
            drop(st);
            s.by_key.insert(e.peer.public_key.0, slot);
            if let Some(next) = e.next_key {
                s.by_key.insert(next.0, slot);
            }
            for n in &e.allowed_ips {
                s.routes.insert(*n, slot);
            }
        }
        self.snapshot.store(Arc::new(s));
    }

    /// What `get=1` reports.
    pub fn info(&self) -> DeviceInfo {
        let cfg = self.lock();
        DeviceInfo {
            private_key: cfg.key.clone(),
            listen_port: cfg.listen_port,
            fwmark: cfg.fwmark,
            peers: cfg
                .peers
                .values()
                .map(|e| PeerInfo {
                    public_key: e.peer.public_key,
                    preshared_key: e.peer.preshared_key.clone(),
                    endpoint: e.peer.endpoint(),
                    last_handshake: e.peer.last_handshake(),
                    rx_bytes: e.peer.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: e.peer.tx_bytes.load(Ordering::Relaxed),
                    persistent_keepalive: e.peer.persistent_keepalive,
                    allowed_ips: e.allowed_ips.clone(),
                })
                .collect(),
        }
    }

    /// Applies peer changes only (no key, port or socket change).
    pub fn apply_peer_changes(&self, changes: Vec<PeerChange>) {
        let mut cfg = self.lock();
        let mut used = None;
        for c in changes {
            apply_peer(&mut cfg, c, &mut used);
        }
        self.publish(&cfg);
    }

    /// The public key of the key this device rotates to, if it does.
    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.lock().next_key.as_ref().map(PrivateKey::public_key)
    }

    /// Sets (or clears) the key this device rotates to: from now on initiations addressed to
    /// it are answered as well as those addressed to the current key, each peer gets a
    /// session for it, and sessions already made with it are kept. Promote it with
    /// [`Device::set_private_key`] (the sessions made with it carry on; those made with the
    /// old key end). Clearing it (an aborted rotation) ends the sessions made with it.
    pub fn set_next_private_key(&self, key: Option<PrivateKey>) {
        let mut cfg = self.lock();
        if cfg.next_key == key || (key.is_some() && key == cfg.key) {
            return;
        }
        cfg.next_identity = key.as_ref().map(Identity::new);
        cfg.next_key = key;
        if let Some(own) = cfg.next_key.as_ref().map(PrivateKey::public_key) {
            cfg.peers.remove(&own);
        }
        sync_all(&mut cfg);
        self.publish(&cfg);
    }

    /// Sets the device's private key (as `private_key=` does): the next key promotes
    /// without dropping a session made with it.
    pub fn set_private_key(&self, key: Option<PrivateKey>) {
        let mut cfg = self.lock();
        set_private_key(&mut cfg, key);
        self.publish(&cfg);
    }

    /// Refuses `keys` for good (revoked peer keys): a peer or next key among them is
    /// removed with every session made with it, and never accepted again (until the set is
    /// replaced by one without it).
    pub fn set_revoked(&self, keys: BTreeSet<PublicKey>) {
        let mut cfg = self.lock();
        if cfg.revoked == keys {
            return;
        }
        cfg.revoked = keys;
        let revoked = cfg.revoked.clone();
        cfg.peers.retain(|pk, _| !revoked.contains(pk));
        for e in cfg.peers.values_mut() {
            if e.next_key.is_some_and(|k| revoked.contains(&k)) {
                e.next_key = None;
            }
        }
        sync_all(&mut cfg);
        self.publish(&cfg);
    }

    /// Per peer, the keys of the session we send on and of the one the peer's data last
    /// came on (ours, its), for status and rotation.
    pub fn session_keys(&self) -> BTreeMap<PublicKey, (Pair, Option<Pair>)> {
        let cfg = self.lock();
        cfg.peers
            .iter()
            .map(|(pk, e)| {
                let st = e.peer.lock();
                (*pk, (st.pair, st.rx_pair()))
            })
            .collect()
    }
}

/// The placeholder "our key" of a peer's `Tunn` while the device has none.
const NO_KEY: PublicKey = PublicKey([0; 32]);

fn set_private_key(cfg: &mut Config, key: Option<PrivateKey>) {
    if cfg.key == key {
        return;
    }
    if key.is_some() && key == cfg.next_key {
        // Promotion: the next key's identity (and the sessions made with it) carry on.
        cfg.identity = cfg.next_identity.take();
        cfg.key = cfg.next_key.take();
    } else {
        cfg.identity = key.as_ref().map(Identity::new);
        cfg.key = key;
    }
    // A peer with our own public key cannot exist (wireguard-go removes it too).
    if let Some(own) = cfg.key.as_ref().map(PrivateKey::public_key) {
        cfg.peers.remove(&own);
    }
    // Sessions made with a key we no longer hold end; the peers get sessions for the new one.
    sync_all(cfg);
}

/// The session indexes in use on the device, gathered (every peer locked once) only when a
/// `Tunn` is made, and once per configuration change: a change that makes none (an
/// endpoint, allowed IPs) costs nothing per peer. Indexes freed meanwhile stay reserved.
type Used = Option<IntMap<u32, u32>>;

fn used_indexes<'a>(cfg: &Config, used: &'a mut Used) -> &'a mut IntMap<u32, u32> {
    used.get_or_insert_with(|| {
        let mut m = IntMap::default();
        for e in cfg.peers.values() {
            for i in e.peer.lock().indexes() {
                m.insert(i, 0);
            }
        }
        m
    })
}

fn sync_all(cfg: &mut Config) {
    let mut used = None;
    let keys: Vec<PublicKey> = cfg.peers.keys().copied().collect();
    for pk in keys {
        sync_pairs(cfg, pk, &mut used);
    }
}

/// A pair of keys a peer should have a `Tunn` for, with our identity for it.
type WantedPair = (Pair, Option<Arc<Identity>>);

/// The pairs of keys peer `pk` (next key `next`) should have a `Tunn` for, each with our
/// identity for it, and the target pair (our newest key, its newest).
fn wanted_pairs(cfg: &Config, pk: PublicKey, next: Option<PublicKey>) -> (Vec<WantedPair>, Pair) {
    let locals: Vec<(PublicKey, Option<Arc<Identity>>)> = match (&cfg.identity, &cfg.next_identity)
    {
        (None, None) => vec![(NO_KEY, None)],
        (a, b) => a
            .iter()
            .chain(b.iter())
            .map(|id| (id.public_key(), Some(id.clone())))
            .collect(),
    };
    let next = next.filter(|k| *k != pk && !cfg.revoked.contains(k));
    let remotes: Vec<PublicKey> = std::iter::once(pk).chain(next).collect();
    let mut out = Vec::with_capacity(MAX_PAIRS);
    for (local, id) in &locals {
        for remote in &remotes {
            out.push((
                Pair {
                    local: *local,
                    remote: *remote,
                },
                id.clone(),
            ));
        }
    }
    // Both ends aim at the newest keys: the same pair seen from either side, so that their
    // initiations agree instead of taking turns.
    let target = Pair {
        local: locals[locals.len() - 1].0,
        remote: next.unwrap_or(pk),
    };
    (out, target)
}

/// Gives peer `pk` a `Tunn` for every pair of keys in use (and none for a pair no longer
/// in use), keeping the sessions of the pairs that stay. `used`: the session indexes in use.
fn sync_pairs(cfg: &mut Config, pk: PublicKey, used: &mut Used) {
    let Some(e) = cfg.peers.get(&pk) else {
        return;
    };
    let (wanted, target) = wanted_pairs(cfg, pk, e.next_key);
    let peer = e.peer.clone();
    let missing = {
        let st = peer.lock();
        wanted.iter().any(|(w, _)| !st.pairs().any(|p| p == *w))
    };
    if missing {
        used_indexes(cfg, used);
    }
    let mut st = peer.lock();
    let keep = |p: &Pair| wanted.iter().any(|(w, _)| w == p);
    st.standby.retain(|s| keep(&s.pair));
    if !keep(&st.pair) {
        // The standby with the newest session takes over, else the target's, else a new one.
        let best = (0..st.standby.len())
            .filter_map(|i| Some((st.standby[i].tunn.time_since_last_handshake()?, i)))
            .min()
            .map(|(_, i)| i)
            .or_else(|| st.standby.iter().position(|s| s.pair == target));
        match best {
            Some(at) => {
                st.swap_active(at);
                st.standby.remove(at);
            }
            None => {
                let id = wanted
                    .iter()
                    .find(|(w, _)| *w == target)
                    .and_then(|(_, id)| id.clone());
                let used = used.as_mut().expect("gathered: the target is missing");
                let (tunn, index) = new_tunn(&peer, target.remote, id.as_deref(), used);
                st.tunn = tunn;
                st.pair = target;
                st.index = index;
            }
        }
    }
    for (pair, id) in &wanted {
        if st.pairs().any(|p| p == *pair) {
            continue;
        }
        let used = used.as_mut().expect("gathered: a pair is missing");
        let (tunn, index) = new_tunn(&peer, pair.remote, id.as_deref(), used);
        st.standby.push(Standby {
            tunn,
            pair: *pair,
            index,
        });
    }
    if st.target != target {
        st.last_target_attempt = None;
    }
    st.target = target;
}

/// A `Tunn` to `remote` with identity `id` (none: a throw-away key, the device has none) and
/// a fresh session index, recorded in `used`.
fn new_tunn(
    peer: &Peer,
    remote: PublicKey,
    id: Option<&Identity>,
    used: &mut IntMap<u32, u32>,
) -> (Tunn, u32) {
    let index = new_index(used);
    used.insert(index, 0);
    let (secret, limiter) = match id {
        Some(id) => (id.secret.clone(), Some(id.rate_limiter.clone())),
        None => (
            x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng),
            None,
        ),
    };
    let tunn = Tunn::new(
        secret,
        x25519_dalek::PublicKey::from(remote.0),
        peer.preshared_key.as_ref().map(|k| *k.0),
        (peer.persistent_keepalive > 0).then_some(peer.persistent_keepalive),
        index,
        limiter,
    );
    (tunn, index)
}

/// Replaces a peer's `Tunn`s (new preshared key or keepalive: boringtun fixes these at
/// construction), keeping its endpoint, counters and allowed IPs.
fn rebuild_peer(
    cfg: &mut Config,
    pk: PublicKey,
    psk: Option<Option<PresharedKey>>,
    keepalive: Option<u16>,
) {
    let Some(old) = cfg.peers.get(&pk).map(|e| e.peer.clone()) else {
        return;
    };
    let psk = psk.unwrap_or_else(|| old.preshared_key.clone());
    let keepalive = keepalive.unwrap_or(old.persistent_keepalive);
    let mut used = None;
    let peer = make_peer(cfg, pk, psk, keepalive, old.endpoint(), &mut used);
    peer.rx_bytes
        .store(old.rx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    peer.tx_bytes
        .store(old.tx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    peer.handshakes.add(&old.handshakes);
    if let Some(e) = cfg.peers.get_mut(&pk) {
        e.peer = Arc::new(peer);
    }
    sync_pairs(cfg, pk, &mut used);
}

/// A peer with one `Tunn` (our current key, its current key); [`sync_pairs`] adds the others.
fn make_peer(
    cfg: &Config,
    pk: PublicKey,
    psk: Option<PresharedKey>,
    keepalive: u16,
    endpoint: Option<SocketAddr>,
    used: &mut Used,
) -> Peer {
    // Without a private key a peer is kept in the configuration with a Tunn made from a
    // throw-away key: it can do nothing, and is rebuilt when a key arrives.
    let id = cfg.identity.as_deref();
    let pair = Pair {
        local: id.map_or(NO_KEY, Identity::public_key),
        remote: pk,
    };
    let mut peer = Peer {
        public_key: pk,
        index: 0,
        preshared_key: psk,
        persistent_keepalive: keepalive,
        state: Arc::new(Mutex::new(PeerState {
            tunn: placeholder_tunn(),
            pair,
            index: 0,
            standby: Vec::new(),
            target: pair,
            last_target_attempt: None,
            rx_index: 0,
            endpoint,
            initiations: Initiations::default(),
        })),
        rx_bytes: AtomicU64::new(0),
        tx_bytes: AtomicU64::new(0),
        tx_dropped: AtomicU64::new(0),
        handshakes: HandshakeStats::default(),
    };
    let (tunn, index) = new_tunn(&peer, pk, id, used_indexes(cfg, used));
    peer.index = index;
    {
        let mut st = peer.lock();
        st.tunn = tunn;
        st.index = index;
    }
    peer
}

/// A `Tunn` that is replaced before use (construction needs one).
fn placeholder_tunn() -> Tunn {
    let s = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let p = x25519_dalek::PublicKey::from(&s);
    Tunn::new(s, p, None, None, 0, None)
}

/// Moves peer `from`'s sessions, endpoint and counters to key `to` (the peer promoted its
/// next key `to`): the sessions made with `to` carry on.
fn rename_peer(cfg: &mut Config, from: PublicKey, to: PublicKey) {
    if cfg.peers.contains_key(&to) {
        return;
    }
    let Some(old) = cfg.peers.remove(&from) else {
        return;
    };
    let p = &old.peer;
    let peer = Peer {
        public_key: to,
        index: p.index,
        preshared_key: p.preshared_key.clone(),
        persistent_keepalive: p.persistent_keepalive,
        state: p.state.clone(),
        rx_bytes: AtomicU64::new(p.rx_bytes.load(Ordering::Relaxed)),
        tx_bytes: AtomicU64::new(p.tx_bytes.load(Ordering::Relaxed)),
        tx_dropped: AtomicU64::new(p.tx_dropped.load(Ordering::Relaxed)),
        handshakes: HandshakeStats::default(),
    };
    peer.handshakes.add(&p.handshakes);
    cfg.peers.insert(
        to,
        PeerEntry {
            peer: Arc::new(peer),
            allowed_ips: old.allowed_ips,
            next_key: None,
        },
    );
}

fn is_own(cfg: &Config, pk: PublicKey) -> bool {
    cfg.key.as_ref().map(PrivateKey::public_key) == Some(pk)
        || cfg.next_key.as_ref().map(PrivateKey::public_key) == Some(pk)
}

fn apply_peer(cfg: &mut Config, c: PeerChange, used: &mut Used) {
    let pk = c.public_key;
    if is_own(cfg, pk) {
        return; // our own key: ignored, as wireguard-go does
    }
    if cfg.revoked.contains(&pk) {
        return; // revoked: never a peer again
    }
    if c.remove {
        cfg.peers.remove(&pk);
        return;
    }
    if let Some(from) = c.renamed_from {
        rename_peer(cfg, from, pk);
    }
    if !cfg.peers.contains_key(&pk) {
        if c.update_only {
            return;
        }
        let psk = c.preshared_key.clone().flatten();
        let ka = c.persistent_keepalive.unwrap_or(0);
        let peer = make_peer(cfg, pk, psk, ka, None, used);
        cfg.peers.insert(
            pk,
            PeerEntry {
                peer: Arc::new(peer),
                allowed_ips: Vec::new(),
                next_key: None,
            },
        );
    } else {
        let e = &cfg.peers[&pk];
        let psk_changed = c
            .preshared_key
            .as_ref()
            .is_some_and(|k| *k != e.peer.preshared_key);
        let ka_changed = c
            .persistent_keepalive
            .is_some_and(|k| k != e.peer.persistent_keepalive);
        if psk_changed || ka_changed {
            rebuild_peer(cfg, pk, c.preshared_key.clone(), c.persistent_keepalive);
        }
    }
    let own_next = c.next_public_key.flatten().filter(|k| is_own(cfg, *k));
    let Some(e) = cfg.peers.get_mut(&pk) else {
        return;
    };
    if let Some(next) = c.next_public_key {
        e.next_key = next.filter(|k| own_next != Some(*k));
    }
    if let Some(ep) = c.endpoint {
        e.peer.lock().endpoint = Some(ep);
    }
    if c.replace_allowed_ips {
        e.allowed_ips.clear();
    }
    // An allowed IP belongs to one peer: giving it to this one takes it from the others.
    for n in &c.allowed_ips {
        for (other, oe) in cfg.peers.iter_mut() {
            if *other != pk {
                oe.allowed_ips.retain(|x| x != n);
            }
        }
        let e = cfg.peers.get_mut(&pk).expect("present");
        if !e.allowed_ips.contains(n) {
            e.allowed_ips.push(*n);
        }
    }
    sync_pairs(cfg, pk, used);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::uapi::{parse_request, Request};

    #[derive(Default)]
    struct FakeNet {
        binds: Vec<(u16, u32)>,
        fail: bool,
    }
    impl NetworkControl for FakeNet {
        fn bind(&mut self, port: u16, fwmark: u32) -> std::io::Result<u16> {
            if self.fail {
                return Err(std::io::ErrorKind::AddrInUse.into());
            }
            self.binds.push((port, fwmark));
            Ok(if port == 0 { 40000 } else { port })
        }
        fn set_fwmark(&mut self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn set(dev: &Device, net: &mut FakeNet, lines: &[&str]) -> Result<(), UapiError> {
        let mut all = vec!["set=1"];
        all.extend_from_slice(lines);
        let Request::Set(r) = parse_request(&all).unwrap() else {
            panic!()
        };
        dev.apply(r, net)
    }

    fn hex(b: u8) -> String {
        format!("{:02x}", b).repeat(32)
    }

    #[test]
    fn a_port_bound_at_start_is_kept_by_the_same_port_in_a_request() {
        let dev = Device::new();
        let mut net = FakeNet::default();
        assert_eq!(dev.ensure_bound(&mut net, 51820).unwrap(), 51820);
        set(
            &dev,
            &mut net,
            &[&format!("private_key={}", hex(9)), "listen_port=51820"],
        )
        .unwrap();
        assert_eq!(
            net.binds,
            vec![(51820, 0)],
            "bound once, at the port asked for"
        );
        assert_eq!(dev.ensure_bound(&mut net, 0).unwrap(), 51820);
        // `kwire tunnel` with no port: the kernel picks one, a request moves it.
        let dev = Device::new();
        let mut net = FakeNet::default();
        assert_eq!(dev.ensure_bound(&mut net, 0).unwrap(), 40000);
        set(&dev, &mut net, &["listen_port=51820"]).unwrap();
        assert_eq!(net.binds, vec![(0, 0), (51820, 0)]);
    }

    #[test]
    fn peers_routes_and_allowed_ip_moves() {
        let dev = Device::new();
        let mut net = FakeNet::default();
        let pk1 = format!("public_key={}", hex(1));
        let pk2 = format!("public_key={}", hex(2));
        let sk = format!("private_key={}", hex(9));
        set(
            &dev,
            &mut net,
            &[
                &sk,
                "listen_port=51820",
                &pk1,
                "allowed_ip=10.0.0.0/24",
                &pk2,
                "allowed_ip=10.0.1.0/24",
            ],
        )
        .unwrap();
        let s = dev.snapshot();
        assert_eq!(s.peers.len(), 2);
        let slot = s.routes.lookup("10.0.1.7".parse().unwrap()).unwrap();
        assert_eq!(s.peers[slot as usize].public_key.0, [2; 32]);
        assert_eq!(net.binds, vec![(51820, 0)]);
        // Moving 10.0.0.0/24 to peer 2 takes it from peer 1.
        set(&dev, &mut net, &[&pk2, "allowed_ip=10.0.0.0/24"]).unwrap();
        let info = dev.info();
        assert!(info.peers[0].allowed_ips.is_empty());
        assert_eq!(info.peers[1].allowed_ips.len(), 2);
        // Same port again: no rebind.
        set(&dev, &mut net, &["listen_port=51820"]).unwrap();
        assert_eq!(net.binds.len(), 1);
        // update_only does not create; remove removes.
        set(
            &dev,
            &mut net,
            &[&format!("public_key={}", hex(3)), "update_only=true"],
        )
        .unwrap();
        assert_eq!(dev.snapshot().peers.len(), 2);
        set(&dev, &mut net, &[&pk1, "remove=true"]).unwrap();
        assert_eq!(dev.snapshot().peers.len(), 1);
        set(&dev, &mut net, &["replace_peers=true"]).unwrap();
        assert!(dev.snapshot().peers.is_empty());
        assert!(dev
            .snapshot()
            .routes
            .lookup("10.0.0.1".parse().unwrap())
            .is_none());
    }

    #[test]
    fn keepalive_or_psk_change_rebuilds_but_keeps_counters_and_endpoint() {
        let dev = Device::new();
        let mut net = FakeNet::default();
        let pk = format!("public_key={}", hex(1));
        set(
            &dev,
            &mut net,
            &[
                &format!("private_key={}", hex(9)),
                &pk,
                "endpoint=192.0.2.2:51820",
            ],
        )
        .unwrap();
        let before = dev.snapshot().peers[0].clone();
        before.rx_bytes.store(77, Ordering::Relaxed);
        set(&dev, &mut net, &[&pk, "persistent_keepalive_interval=25"]).unwrap();
        let after = dev.snapshot().peers[0].clone();
        assert_ne!(before.index, after.index);
        assert_eq!(after.rx_bytes.load(Ordering::Relaxed), 77);
        assert_eq!(after.endpoint(), Some("192.0.2.2:51820".parse().unwrap()));
        // Same value again: untouched.
        set(&dev, &mut net, &[&pk, "persistent_keepalive_interval=25"]).unwrap();
        assert_eq!(dev.snapshot().peers[0].index, after.index);
    }

    #[test]
    fn own_key_is_never_a_peer_and_bind_failure_is_reported() {
        let dev = Device::new();
        let mut net = FakeNet::default();
        let sk = PrivateKey::from_bytes([9; 32]).unwrap();
        let own = sk.public_key().to_hex();
        set(
            &dev,
            &mut net,
            &[
                &format!("private_key={}", hex(9)),
                &format!("public_key={own}"),
            ],
        )
        .unwrap();
        assert!(dev.snapshot().peers.is_empty());
        net.fail = true;
        let e = set(&dev, &mut net, &["listen_port=1"]).unwrap_err();
        assert_eq!(e.errno, Errno::AddrInUse);
        assert_eq!(dev.listen_port(), 0);
    }
}
