//! The device: its configuration (written by the control plane under one lock) and the
//! [`Snapshot`] the packet loop reads without waiting (swapped on every change). The
//! snapshot's tables are kept in step with the configuration change by change, and a change
//! copies only the tables it touches: one peer's change costs the same at 5,000 peers as at 5.

use crate::wg::allowed_ips::{canonical, AllowedIps, IntMap};
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
use std::hash::{BuildHasher, Hash};
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

    /// The time since the last completed handshake, and the endpoint, under one lock (the
    /// health monitor looks at every peer).
    pub fn handshake_age_and_endpoint(&self) -> (Option<std::time::Duration>, Option<SocketAddr>) {
        let st = self.lock();
        (st.tunn.time_since_last_handshake(), st.endpoint)
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

/// What the packet loop reads: immutable, swapped on every configuration change. Its tables
/// are shared with the configuration, copied on write: a change copies only the tables it
/// touches (a peer's new endpoint: `by_endpoint`), and each snapshot shares the others with
/// the one before. A peer's slot stays while the peer lives (a removal moves the last slot's
/// peer into the hole), so one peer's change touches only that peer's entries.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// The peers, by slot.
    pub peers: Arc<Vec<Arc<Peer>>>,
    /// Destination address to peer slot.
    pub routes: Arc<AllowedIps<u32>>,
    /// Session index (`receiver_idx >> 8`) to peer slot (every `Tunn` of every peer).
    pub by_index: Arc<IntMap<u32, u32>>,
    /// Public key to peer slot, for handshake initiations: each peer's current key and, while
    /// it rotates, its next key (a key that is some peer's own maps to that peer; a next key
    /// announced by several, to the one with the smallest key). Revoked keys are never here.
    pub by_key: Arc<HashMap<[u8; 32], u32>>,
    /// Endpoint to peer slot, as configured (not as roamed since): whom to handshake with
    /// when a data message names a session we do not know. An endpoint configured for several
    /// peers (relayed ones share their relay's) maps to the one with the smallest key.
    pub by_endpoint: Arc<HashMap<SocketAddr, u32>>,
    pub identity: Option<Arc<Identity>>,
    /// The key this device rotates to, while it rotates: initiations addressed to it are
    /// answered too (MAC1 tells which of the two keys an initiation is for).
    pub next_identity: Option<Arc<Identity>>,
    /// Grows when a peer may newly wait for its greeting (a peer added or rebuilt, a peer's
    /// first endpoint, a new key of ours): the timer thread looks for such peers only then,
    /// not on every snapshot.
    pub greet_epoch: u64,
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
    /// Its slot in the snapshot's tables.
    slot: u32,
    allowed_ips: Vec<IpNetwork>,
    /// The key the peer rotates to, while it does.
    next_key: Option<PublicKey>,
    /// The endpoint as configured (what `by_endpoint` maps), not as roamed since.
    endpoint: Option<SocketAddr>,
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
    /// The next snapshot's tables, kept in step with `peers` change by change (its identity
    /// fields and `greet_epoch` are set when published).
    tables: Snapshot,
    greet_epoch: u64,
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

/// A session index no `Tunn` of the device has (`used`: the snapshot's `by_index`).
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
            cfg.tables = Snapshot::default();
        }
        for change in req.peers {
            apply_peer(&mut cfg, change);
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

    /// Swaps in the configuration's tables: each an `Arc` shared with the configuration
    /// until a change copies it.
    fn publish(&self, cfg: &Config) {
        self.snapshot.store(Arc::new(Snapshot {
            identity: cfg.identity.clone(),
            next_identity: cfg.next_identity.clone(),
            greet_epoch: cfg.greet_epoch,
            ..cfg.tables.clone()
        }));
    }

    /// What `get=1` reports.
    pub fn info(&self) -> DeviceInfo {
        let cfg = self.lock();
        let peers = cfg.peers.values().map(peer_info).collect();
        device_info(&cfg, peers)
    }

    /// What `get=1` reports, with only the peers of `keys` that the device has (in the order
    /// of `keys`).
    pub fn info_of(&self, keys: &[PublicKey]) -> DeviceInfo {
        let cfg = self.lock();
        let peers = keys
            .iter()
            .filter_map(|k| cfg.peers.get(k))
            .map(peer_info)
            .collect();
        device_info(&cfg, peers)
    }

    /// Applies peer changes only (no key, port or socket change).
    pub fn apply_peer_changes(&self, changes: Vec<PeerChange>) {
        let mut cfg = self.lock();
        for c in changes {
            apply_peer(&mut cfg, c);
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
        cfg.greet_epoch += 1;
        if let Some(own) = cfg.next_key.as_ref().map(PrivateKey::public_key) {
            remove_peer(&mut cfg, own);
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
        let before = std::mem::replace(&mut cfg.revoked, keys);
        let revoked: Vec<PublicKey> = cfg.revoked.iter().copied().collect();
        for pk in &revoked {
            remove_peer(&mut cfg, *pk);
        }
        let announcing: Vec<PublicKey> = cfg
            .peers
            .iter()
            .filter(|(_, e)| e.next_key.is_some_and(|k| cfg.revoked.contains(&k)))
            .map(|(pk, _)| *pk)
            .collect();
        for pk in announcing {
            set_next_key(&mut cfg, pk, None);
        }
        // A key no longer revoked may be announced already.
        for k in before.difference(&cfg.revoked).copied().collect::<Vec<_>>() {
            settle_key(&mut cfg, k);
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
    cfg.greet_epoch += 1;
    // A peer with our own public key cannot exist (wireguard-go removes it too).
    if let Some(own) = cfg.key.as_ref().map(PrivateKey::public_key) {
        remove_peer(cfg, own);
    }
    // Sessions made with a key we no longer hold end; the peers get sessions for the new one.
    sync_all(cfg);
}

fn sync_all(cfg: &mut Config) {
    let keys: Vec<PublicKey> = cfg.peers.keys().copied().collect();
    for pk in keys {
        sync_pairs(cfg, pk);
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
/// in use), keeping the sessions of the pairs that stay; `by_index` follows.
fn sync_pairs(cfg: &mut Config, pk: PublicKey) {
    let Some(e) = cfg.peers.get(&pk) else {
        return;
    };
    let (wanted, target) = wanted_pairs(cfg, pk, e.next_key);
    let (peer, slot) = (e.peer.clone(), e.slot);
    let mut st = peer.lock();
    let keep = |p: &Pair| wanted.iter().any(|(w, _)| w == p);
    let mut gone: Vec<u32> = Vec::new();
    st.standby.retain(|s| {
        let kept = keep(&s.pair);
        if !kept {
            gone.push(s.index);
        }
        kept
    });
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
                let old = st.standby.remove(at);
                gone.push(old.index);
            }
            None => {
                let id = wanted
                    .iter()
                    .find(|(w, _)| *w == target)
                    .and_then(|(_, id)| id.clone());
                let (tunn, index) = new_tunn(
                    settings(&peer),
                    target.remote,
                    id.as_deref(),
                    &mut cfg.tables,
                    slot,
                );
                gone.push(st.index);
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
        let (tunn, index) = new_tunn(
            settings(&peer),
            pair.remote,
            id.as_deref(),
            &mut cfg.tables,
            slot,
        );
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
    drop(st);
    if !gone.is_empty() {
        move_entries(&mut cfg.tables.by_index, gone, slot, None);
    }
}

/// A `Tunn` to `remote` with identity `id` (none: a throw-away key, the device has none), the
/// peer's preshared key and keepalive, and a fresh session index, mapped to `slot` in
/// `tables.by_index`.
fn new_tunn(
    (psk, keepalive): (Option<&PresharedKey>, u16),
    remote: PublicKey,
    id: Option<&Identity>,
    tables: &mut Snapshot,
    slot: u32,
) -> (Tunn, u32) {
    let index = new_index(&tables.by_index);
    Arc::make_mut(&mut tables.by_index).insert(index, slot);
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
        psk.map(|k| *k.0),
        (keepalive > 0).then_some(keepalive),
        index,
        limiter,
    );
    (tunn, index)
}

/// Replaces a peer's `Tunn`s (new preshared key or keepalive: boringtun fixes these at
/// construction), keeping its slot, endpoint, counters and allowed IPs.
fn rebuild_peer(
    cfg: &mut Config,
    pk: PublicKey,
    psk: Option<Option<PresharedKey>>,
    keepalive: Option<u16>,
) {
    let Some((old, slot)) = cfg.peers.get(&pk).map(|e| (e.peer.clone(), e.slot)) else {
        return;
    };
    let psk = psk.unwrap_or_else(|| old.preshared_key.clone());
    let keepalive = keepalive.unwrap_or(old.persistent_keepalive);
    let peer = make_peer(cfg, pk, psk, keepalive, old.endpoint(), slot);
    peer.rx_bytes
        .store(old.rx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    peer.tx_bytes
        .store(old.tx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    peer.handshakes.add(&old.handshakes);
    unmap_indexes(&mut cfg.tables, &old, slot);
    let peer = Arc::new(peer);
    Arc::make_mut(&mut cfg.tables.peers)[slot as usize] = peer.clone();
    if let Some(e) = cfg.peers.get_mut(&pk) {
        e.peer = peer;
    }
    cfg.greet_epoch += 1;
    sync_pairs(cfg, pk);
}

/// Removes `peer`'s session indexes from `by_index` (those that map to `slot`).
fn unmap_indexes(tables: &mut Snapshot, peer: &Peer, slot: u32) {
    let indexes: Vec<u32> = peer.lock().indexes().collect();
    move_entries(&mut tables.by_index, indexes, slot, None);
}

/// The entries of `keys` that map to slot `from` in `map`: mapped to `to`, or removed (`None`).
/// Entries another slot holds are left alone; with none to change, the table (shared with the
/// last snapshot) is not copied.
fn move_entries<K: Eq + Hash + Clone, S: BuildHasher + Clone>(
    map: &mut Arc<HashMap<K, u32, S>>,
    keys: impl IntoIterator<Item = K>,
    from: u32,
    to: Option<u32>,
) {
    let keys: Vec<K> = keys
        .into_iter()
        .filter(|k| map.get(k) == Some(&from))
        .collect();
    if keys.is_empty() {
        return;
    }
    let map = Arc::make_mut(map);
    for k in keys {
        match to {
            Some(to) => map.insert(k, to),
            None => map.remove(&k),
        };
    }
}

/// A peer with one `Tunn` (our current key, its current key), its index mapped to `slot`;
/// [`sync_pairs`] adds the others.
fn make_peer(
    cfg: &mut Config,
    pk: PublicKey,
    psk: Option<PresharedKey>,
    keepalive: u16,
    endpoint: Option<SocketAddr>,
    slot: u32,
) -> Peer {
    // Without a private key a peer is kept in the configuration with a Tunn made from a
    // throw-away key: it can do nothing, and is rebuilt when a key arrives.
    let id = cfg.identity.clone();
    let pair = Pair {
        local: id.as_deref().map_or(NO_KEY, Identity::public_key),
        remote: pk,
    };
    let (tunn, index) = new_tunn(
        (psk.as_ref(), keepalive),
        pk,
        id.as_deref(),
        &mut cfg.tables,
        slot,
    );
    Peer {
        public_key: pk,
        index,
        preshared_key: psk,
        persistent_keepalive: keepalive,
        state: Arc::new(Mutex::new(PeerState {
            tunn,
            pair,
            index,
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
    }
}

/// What a peer's `Tunn`s are made with besides the keys: its preshared key and keepalive.
fn settings(peer: &Peer) -> (Option<&PresharedKey>, u16) {
    (peer.preshared_key.as_ref(), peer.persistent_keepalive)
}

/// Adds peer `pk` in the next free slot (no endpoint, allowed IPs or next key yet).
fn add_peer(cfg: &mut Config, pk: PublicKey, psk: Option<PresharedKey>, keepalive: u16) {
    let slot = cfg.tables.peers.len() as u32;
    let peer = Arc::new(make_peer(cfg, pk, psk, keepalive, None, slot));
    Arc::make_mut(&mut cfg.tables.peers).push(peer.clone());
    cfg.peers.insert(
        pk,
        PeerEntry {
            peer,
            slot,
            allowed_ips: Vec::new(),
            next_key: None,
            endpoint: None,
        },
    );
    // Its own key is its, whoever announced it as a next key.
    Arc::make_mut(&mut cfg.tables.by_key).insert(pk.0, slot);
    cfg.greet_epoch += 1;
}

/// Removes peer `pk` and every table entry of its; the last slot's peer moves into its slot.
fn remove_peer(cfg: &mut Config, pk: PublicKey) {
    let Some(e) = cfg.peers.remove(&pk) else {
        return;
    };
    let slot = e.slot;
    let t = &mut cfg.tables;
    unmap_indexes(t, &e.peer, slot);
    if !e.allowed_ips.is_empty() {
        let routes = Arc::make_mut(&mut t.routes);
        for n in &e.allowed_ips {
            if routes.get_exact(*n) == Some(slot) {
                routes.remove(*n);
            }
        }
    }
    for k in std::iter::once(pk).chain(e.next_key) {
        if cfg.tables.by_key.get(&k.0) == Some(&slot) {
            settle_key(cfg, k);
        }
    }
    if let Some(ep) = e.endpoint {
        if cfg.tables.by_endpoint.get(&ep) == Some(&slot) {
            settle_endpoint(cfg, ep);
        }
    }
    // Fill the hole with the last slot's peer: only its entries change.
    let last = cfg.tables.peers.len() as u32 - 1;
    Arc::make_mut(&mut cfg.tables.peers).swap_remove(slot as usize);
    if slot == last {
        return;
    }
    let moved = cfg.tables.peers[slot as usize].public_key;
    let Some(m) = cfg.peers.get_mut(&moved) else {
        return;
    };
    m.slot = slot;
    let t = &mut cfg.tables;
    let indexes: Vec<u32> = m.peer.lock().indexes().collect();
    move_entries(&mut t.by_index, indexes, last, Some(slot));
    if !m.allowed_ips.is_empty() {
        let routes = Arc::make_mut(&mut t.routes);
        for n in &m.allowed_ips {
            if routes.get_exact(*n) == Some(last) {
                routes.insert(*n, slot);
            }
        }
    }
    let keys = std::iter::once(moved).chain(m.next_key).map(|k| k.0);
    move_entries(&mut t.by_key, keys, last, Some(slot));
    if let Some(ep) = m.endpoint {
        move_entries(&mut t.by_endpoint, [ep], last, Some(slot));
    }
}

/// Whom `by_key` maps key `k` to: the peer whose own key it is, else the peer with the
/// smallest key among those announcing it as their next key; a revoked key, nobody.
fn key_owner(cfg: &Config, k: PublicKey) -> Option<u32> {
    if let Some(e) = cfg.peers.get(&k) {
        return Some(e.slot);
    }
    if cfg.revoked.contains(&k) {
        return None;
    }
    cfg.peers
        .values()
        .find(|e| e.next_key == Some(k))
        .map(|e| e.slot)
}

/// The device's part of a `get=1` answer, around `peers`.
fn device_info(cfg: &Config, peers: Vec<PeerInfo>) -> DeviceInfo {
    DeviceInfo {
        private_key: cfg.key.clone(),
        listen_port: cfg.listen_port,
        fwmark: cfg.fwmark,
        peers,
    }
}

/// One peer's part of a `get=1` answer.
fn peer_info(e: &PeerEntry) -> PeerInfo {
    PeerInfo {
        public_key: e.peer.public_key,
        preshared_key: e.peer.preshared_key.clone(),
        endpoint: e.peer.endpoint(),
        last_handshake: e.peer.last_handshake(),
        rx_bytes: e.peer.rx_bytes.load(Ordering::Relaxed),
        tx_bytes: e.peer.tx_bytes.load(Ordering::Relaxed),
        persistent_keepalive: e.peer.persistent_keepalive,
        allowed_ips: e.allowed_ips.clone(),
    }
}

/// Sets `by_key[k]` to its owner, looked for among all peers: after its owner let it go.
fn settle_key(cfg: &mut Config, k: PublicKey) {
    let owner = key_owner(cfg, k);
    let by_key = Arc::make_mut(&mut cfg.tables.by_key);
    match owner {
        Some(s) => by_key.insert(k.0, s),
        None => by_key.remove(&k.0),
    };
}

/// Sets `by_endpoint[ep]` to the peer with the smallest key among those configured with it.
fn settle_endpoint(cfg: &mut Config, ep: SocketAddr) {
    let owner = cfg
        .peers
        .values()
        .find(|e| e.endpoint == Some(ep))
        .map(|e| e.slot);
    let by_endpoint = Arc::make_mut(&mut cfg.tables.by_endpoint);
    match owner {
        Some(s) => by_endpoint.insert(ep, s),
        None => by_endpoint.remove(&ep),
    };
}

/// The key of the peer in `slot`.
fn key_at(cfg: &Config, slot: u32) -> PublicKey {
    cfg.tables.peers[slot as usize].public_key
}

/// Sets peer `pk`'s configured endpoint; `by_endpoint` follows.
fn set_endpoint(cfg: &mut Config, pk: PublicKey, ep: SocketAddr) {
    let Some(e) = cfg.peers.get_mut(&pk) else {
        return;
    };
    e.peer.lock().endpoint = Some(ep);
    let (old, slot) = (e.endpoint.replace(ep), e.slot);
    if old == Some(ep) {
        return;
    }
    if old.is_none() {
        cfg.greet_epoch += 1;
    }
    if let Some(old) = old {
        if cfg.tables.by_endpoint.get(&old) == Some(&slot) {
            settle_endpoint(cfg, old);
        }
    }
    let claim = match cfg.tables.by_endpoint.get(&ep) {
        None => true,
        Some(o) => key_at(cfg, *o) > pk,
    };
    if claim {
        Arc::make_mut(&mut cfg.tables.by_endpoint).insert(ep, slot);
    }
}

/// Sets (or clears) the next key peer `pk` announces; `by_key` follows.
fn set_next_key(cfg: &mut Config, pk: PublicKey, next: Option<PublicKey>) {
    let Some(e) = cfg.peers.get_mut(&pk) else {
        return;
    };
    let (old, slot) = (std::mem::replace(&mut e.next_key, next), e.slot);
    if old == next {
        return;
    }
    if let Some(old) = old {
        if cfg.tables.by_key.get(&old.0) == Some(&slot) {
            settle_key(cfg, old);
        }
    }
    if let Some(k) = next.filter(|k| !cfg.revoked.contains(k)) {
        let claim = match cfg.tables.by_key.get(&k.0) {
            None => true,
            Some(o) => {
                let owner = key_at(cfg, *o);
                owner != k && owner > pk
            }
        };
        if claim {
            Arc::make_mut(&mut cfg.tables.by_key).insert(k.0, slot);
        }
    }
}

/// Moves peer `from`'s sessions, slot, endpoint and counters to key `to` (the peer promoted
/// its next key `to`): the sessions made with `to` carry on.
fn rename_peer(cfg: &mut Config, from: PublicKey, to: PublicKey) {
    if cfg.peers.contains_key(&to) {
        return;
    }
    let Some(old) = cfg.peers.remove(&from) else {
        return;
    };
    let p = &old.peer;
    let peer = Arc::new(Peer {
        public_key: to,
        index: p.index,
        preshared_key: p.preshared_key.clone(),
        persistent_keepalive: p.persistent_keepalive,
        state: p.state.clone(),
        rx_bytes: AtomicU64::new(p.rx_bytes.load(Ordering::Relaxed)),
        tx_bytes: AtomicU64::new(p.tx_bytes.load(Ordering::Relaxed)),
        tx_dropped: AtomicU64::new(p.tx_dropped.load(Ordering::Relaxed)),
        handshakes: HandshakeStats::default(),
    });
    peer.handshakes.add(&p.handshakes);
    let slot = old.slot;
    Arc::make_mut(&mut cfg.tables.peers)[slot as usize] = peer.clone();
    cfg.peers.insert(
        to,
        PeerEntry {
            peer,
            slot,
            allowed_ips: old.allowed_ips,
            next_key: None,
            endpoint: old.endpoint,
        },
    );
    Arc::make_mut(&mut cfg.tables.by_key).insert(to.0, slot);
    settle_key(cfg, from);
    if let Some(k) = old.next_key.filter(|k| *k != to) {
        settle_key(cfg, k);
    }
    // Ties over a shared endpoint go by key, and the key changed.
    if let Some(ep) = old.endpoint {
        settle_endpoint(cfg, ep);
    }
}

fn is_own(cfg: &Config, pk: PublicKey) -> bool {
    cfg.key.as_ref().map(PrivateKey::public_key) == Some(pk)
        || cfg.next_key.as_ref().map(PrivateKey::public_key) == Some(pk)
}

fn apply_peer(cfg: &mut Config, c: PeerChange) {
    let pk = c.public_key;
    if is_own(cfg, pk) {
        return; // our own key: ignored, as wireguard-go does
    }
    if cfg.revoked.contains(&pk) {
        return; // revoked: never a peer again
    }
    if c.remove {
        remove_peer(cfg, pk);
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
        add_peer(cfg, pk, psk, c.persistent_keepalive.unwrap_or(0));
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
    if let Some(next) = c.next_public_key {
        let own_next = next.filter(|k| is_own(cfg, *k));
        set_next_key(cfg, pk, next.filter(|k| own_next != Some(*k)));
    }
    if let Some(ep) = c.endpoint {
        set_endpoint(cfg, pk, ep);
    }
    set_allowed_ips(cfg, pk, c.replace_allowed_ips, &c.allowed_ips);
    sync_pairs(cfg, pk);
}

/// Gives peer `pk` the networks `nets` (after dropping its own if `replace`). A network
/// belongs to one peer: giving it to this one takes it from the peer that had it.
fn set_allowed_ips(cfg: &mut Config, pk: PublicKey, replace: bool, nets: &[IpNetwork]) {
    if !replace && nets.is_empty() {
        return;
    }
    let Some(slot) = cfg.peers.get(&pk).map(|e| e.slot) else {
        return;
    };
    let routes = Arc::make_mut(&mut cfg.tables.routes);
    if replace {
        let e = cfg.peers.get_mut(&pk).expect("present");
        for n in e.allowed_ips.drain(..) {
            if routes.get_exact(n) == Some(slot) {
                routes.remove(n);
            }
        }
    }
    for n in nets.iter().map(|n| canonical(*n)) {
        if let Some(o) = routes.get_exact(n).filter(|o| *o != slot) {
            let other = cfg.tables.peers[o as usize].public_key;
            if let Some(oe) = cfg.peers.get_mut(&other) {
                oe.allowed_ips.retain(|x| *x != n);
            }
        }
        routes.insert(n, slot);
        let e = cfg.peers.get_mut(&pk).expect("present");
        if !e.allowed_ips.contains(&n) {
            e.allowed_ips.push(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::uapi::{parse_request, Request};
    use proptest::prelude::*;

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
        // `get=1` with `public_key=` lines: those peers the device has, in that order, with
        // the device's own lines; peer 2 as the whole answer has it.
        let Request::GetPeers(keys) =
            parse_request(&["get=1", &format!("public_key={}", hex(7)), &pk2, &pk1]).unwrap()
        else {
            panic!("not a get of peers")
        };
        let some = dev.info_of(&keys);
        let keys: Vec<[u8; 32]> = some.peers.iter().map(|p| p.public_key.0).collect();
        assert_eq!(keys, [[2; 32], [1; 32]]);
        assert_eq!(some.listen_port, 51820);
        assert!(some.private_key.is_some());
        assert_eq!(some.peers[0].allowed_ips, info.peers[1].allowed_ips);
        assert_eq!(dev.info_of(&[]).peers.len(), 0, "no key asked for, no peer");
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

    /// The tables built from scratch out of the configuration, by the rules the incremental
    /// changes keep: one slot per peer, own keys before announced next keys, ties (a next
    /// key or an endpoint claimed by several) to the smallest key.
    fn rebuilt(cfg: &Config) -> Snapshot {
        let n = cfg.peers.len();
        let mut peers: Vec<Option<Arc<Peer>>> = vec![None; n];
        let mut t = Snapshot::default();
        let (by_index, by_key, by_endpoint, routes) = (
            Arc::make_mut(&mut t.by_index),
            Arc::make_mut(&mut t.by_key),
            Arc::make_mut(&mut t.by_endpoint),
            Arc::make_mut(&mut t.routes),
        );
        for (pk, e) in &cfg.peers {
            assert_eq!(e.peer.public_key, *pk);
            let at = &mut peers[e.slot as usize];
            assert!(at.is_none(), "slot {} given twice", e.slot);
            *at = Some(e.peer.clone());
            for i in e.peer.lock().indexes() {
                assert!(by_index.insert(i, e.slot).is_none(), "index {i} twice");
            }
            by_key.insert(pk.0, e.slot);
            for net in &e.allowed_ips {
                assert!(routes.get_exact(*net).is_none(), "{net} held twice");
                routes.insert(*net, e.slot);
            }
        }
        for e in cfg.peers.values() {
            if let Some(k) = e.next_key.filter(|k| !cfg.revoked.contains(k)) {
                by_key.entry(k.0).or_insert(e.slot);
            }
            if let Some(ep) = e.endpoint {
                by_endpoint.entry(ep).or_insert(e.slot);
            }
        }
        t.peers = Arc::new(peers.into_iter().map(|p| p.expect("no hole")).collect());
        t
    }

    fn same_tables(a: &Snapshot, b: &Snapshot) -> Result<(), String> {
        let keys = |s: &Snapshot| s.peers.iter().map(|p| p.public_key).collect::<Vec<_>>();
        let ptrs = |s: &Snapshot| s.peers.iter().map(Arc::as_ptr).collect::<Vec<_>>();
        if ptrs(a) != ptrs(b) {
            return Err(format!("peers {:?} != {:?}", keys(a), keys(b)));
        }
        if a.by_index != b.by_index {
            return Err(format!("by_index {:?} != {:?}", a.by_index, b.by_index));
        }
        if a.by_key != b.by_key {
            return Err(format!("by_key {:?} != {:?}", a.by_key, b.by_key));
        }
        if a.by_endpoint != b.by_endpoint {
            return Err(format!(
                "by_endpoint {:?} != {:?}",
                a.by_endpoint, b.by_endpoint
            ));
        }
        if a.routes != b.routes {
            return Err(format!("routes {:?} != {:?}", a.routes, b.routes));
        }
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Change {
            key: u8,
            remove: bool,
            renamed_from: Option<u8>,
            next: Option<Option<u8>>,
            endpoint: Option<u8>,
            keepalive: Option<u16>,
            replace: bool,
            nets: Vec<u8>,
        },
        PrivateKey(Option<u8>),
        NextPrivateKey(Option<u8>),
        Revoked(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 1u8..7;
        prop_oneof![
            8 => (
                key.clone(),
                prop::bool::weighted(0.15),
                prop::option::weighted(0.15, key.clone()),
                prop::option::weighted(0.3, prop::option::of(key.clone())),
                prop::option::weighted(0.5, 0u8..3),
                prop::option::weighted(0.15, prop_oneof![Just(0u16), Just(25)]),
                prop::bool::ANY,
                prop::collection::vec(0u8..5, 0..3),
            )
                .prop_map(|(key, remove, renamed_from, next, endpoint, keepalive, replace, nets)| Op::Change {
                    key, remove, renamed_from, next, endpoint, keepalive, replace, nets,
                }),
            1 => prop::option::of(prop_oneof![Just(100u8), Just(101)]).prop_map(Op::PrivateKey),
            1 => prop::option::of(prop_oneof![Just(100u8), Just(101)]).prop_map(Op::NextPrivateKey),
            1 => prop::collection::vec(1u8..7, 0..2).prop_map(Op::Revoked),
        ]
    }

    fn pk(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn run(dev: &Device, op: Op) {
        match op {
            Op::Change {
                key,
                remove,
                renamed_from,
                next,
                endpoint,
                keepalive,
                replace,
                nets,
            } => {
                let all = [
                    "10.0.0.0/24",
                    "10.0.1.0/24",
                    "10.0.1.7/32",
                    "fd00::/64",
                    "0.0.0.0/0",
                ];
                dev.apply_peer_changes(vec![PeerChange {
                    remove,
                    renamed_from: renamed_from.map(pk),
                    next_public_key: next.map(|n| n.map(pk)),
                    endpoint: endpoint.map(|e| SocketAddr::from(([192, 0, 2, e], 51820))),
                    persistent_keepalive: keepalive,
                    replace_allowed_ips: replace,
                    allowed_ips: nets
                        .iter()
                        .map(|i| all[*i as usize].parse().unwrap())
                        .collect(),
                    ..PeerChange::new(pk(key))
                }]);
            }
            Op::PrivateKey(k) => {
                dev.set_private_key(k.and_then(|k| PrivateKey::from_bytes([k; 32])))
            }
            Op::NextPrivateKey(k) => {
                dev.set_next_private_key(k.and_then(|k| PrivateKey::from_bytes([k; 32])))
            }
            Op::Revoked(ks) => dev.set_revoked(ks.into_iter().map(pk).collect()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// After any history of changes the snapshot's tables, changed in place change by
        /// change, are what a build from scratch of the configuration gives.
        #[test]
        fn tables_changed_in_place_equal_a_rebuild(ops in prop::collection::vec(op(), 1..40)) {
            let dev = Device::new();
            for op in ops {
                run(&dev, op.clone());
                let cfg = dev.lock();
                let snap = dev.snapshot();
                if let Err(e) = same_tables(&snap, &rebuilt(&cfg)) {
                    return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
                }
            }
        }
    }
}
