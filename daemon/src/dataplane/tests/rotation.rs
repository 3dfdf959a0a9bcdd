//! Key rotation in the data path: a device that holds a current and a next key answers
//! initiations addressed to either and keeps every session across the promotion; a device
//! whose peer rotates handshakes to the peer's next key while the old session carries the
//! traffic; a revoked key is refused.

use super::*;
use crate::datapath::timers;
use crate::wg::sessions::Pair;
use crate::wg::uapi::PeerChange;
use kwire_proto::key::PublicKey;
use std::collections::BTreeSet;

/// A packet from the peer at 10.99.0.1 encrypted by `a` (which has a session) arrives at the
/// device: whether it reached the host tun.
fn delivered<T>(a: &mut Tunn, from: SocketAddr, ctx: &Ctx<'_, T>, rx: &mut RxPath) -> bool {
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(d) =
        a.encapsulate(&udp4([10, 99, 0, 1], [10, 99, 0, 2]), &mut buf)
    else {
        panic!("the sender has a session")
    };
    let d = d.to_vec();
    let mut io = Capture::default();
    rx.message(ctx, from, &d, None, &mut io);
    rx.finish(ctx.counters, &mut io);
    io.tun.len() == 1
}

fn pair(local: &PrivateKey, remote: &PrivateKey) -> Pair {
    Pair {
        local: local.public_key(),
        remote: remote.public_key(),
    }
}

/// Node B rotates from kb0 to kb1 while peer A keeps sending: A's session to kb0 carries on,
/// A's initiation to kb1 is answered (MAC1 tells which key it is for), B switches to the new
/// session on A's keepalive, packets still in flight on the old one are delivered; after the
/// promotion only the session made with kb1 is left, and it carries traffic without a new
/// handshake. An initiation to a key B does not hold is dropped before any Diffie-Hellman.
#[test]
fn rotating_device_answers_both_keys_and_promotes_without_a_new_handshake() {
    let (ka, kb0, kb1) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let b = device(&kb0, &ka, "10.99.0.1/32", "192.0.2.1:51820");
    let (counters, limiter, mut rx, mut io) = receiver();
    let mut old = initiator(&ka, &kb0, 10);
    {
        let snap = b.snapshot();
        let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
        handshake(&mut old, a_addr, &ctx, &mut rx, &mut io);
        assert!(delivered(&mut old, a_addr, &ctx, &mut rx));
    }

    b.set_next_private_key(Some(kb1.clone()));
    assert_eq!(b.next_public_key(), Some(kb1.public_key()));
    let snap = b.snapshot();
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    {
        let st = snap.peers[0].lock();
        assert_eq!(st.pair, pair(&kb0, &ka), "the old session still sends");
        let mut pairs: Vec<Pair> = st.pairs().collect();
        pairs.sort();
        let mut want = vec![pair(&kb0, &ka), pair(&kb1, &ka)];
        want.sort();
        assert_eq!(pairs, want);
    }
    assert!(
        delivered(&mut old, a_addr, &ctx, &mut rx),
        "old key, same session"
    );

    let mut new = initiator(&ka, &kb1, 20);
    io.udp.clear();
    handshake(&mut new, a_addr, &ctx, &mut rx, &mut io);
    assert_eq!(
        snap.peers[0].lock().pair,
        pair(&kb1, &ka),
        "the keepalive on the new session made it the one B sends on"
    );
    assert!(delivered(&mut new, a_addr, &ctx, &mut rx));
    assert!(
        delivered(&mut old, a_addr, &ctx, &mut rx),
        "in flight on the old session"
    );
    assert_eq!(
        snap.peers[0].lock().pair,
        pair(&kb1, &ka),
        "an older session taking data does not take over"
    );

    // Addressed to a key B does not hold: refused at MAC1.
    let before = counters.drops(DropReason::Handshake);
    let mut stranger = initiator(&ka, &PrivateKey::generate(), 30);
    let init = initiation(&mut stranger, false);
    rx.message(&ctx, a_addr, &init, None, &mut io);
    rx.finish(&counters, &mut io);
    assert_eq!(counters.drops(DropReason::Handshake), before + 1);

    b.set_private_key(Some(kb1.clone()));
    assert_eq!(b.public_key(), Some(kb1.public_key()));
    assert_eq!(b.next_public_key(), None);
    let snap = b.snapshot();
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    assert!(snap.next_identity.is_none());
    {
        let st = snap.peers[0].lock();
        assert_eq!(st.pairs().collect::<Vec<_>>(), vec![pair(&kb1, &ka)]);
    }
    assert!(
        delivered(&mut new, a_addr, &ctx, &mut rx),
        "the session made with the next key outlives the promotion"
    );
    let unknown = counters.drops(DropReason::UnknownSession);
    assert!(!delivered(&mut old, a_addr, &ctx, &mut rx));
    assert_eq!(counters.drops(DropReason::UnknownSession), unknown + 1);
}

/// The answering side of a rotation, as the peer: device A learns that its peer B rotates
/// (B's next key), and its timers start a handshake to that key at once while the session to
/// B's current key goes on carrying traffic; once the handshake completes A sends on it, and
/// when B promotes (the peer is renamed to its next key) that session is kept.
#[test]
fn peer_rotation_handshakes_to_the_next_key_and_survives_the_rename() {
    let (ka, kb0, kb1) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let b_addr: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let a = device(&ka, &kb0, "10.99.0.1/32", "192.0.2.2:51820");
    let (counters, limiter, mut rx, mut io) = receiver();
    // B's old end has a session with A (B initiated).
    let mut b_old = initiator(&kb0, &ka, 40);
    {
        let snap = a.snapshot();
        let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
        handshake(&mut b_old, b_addr, &ctx, &mut rx, &mut io);
    }
    let mut change = PeerChange::new(kb0.public_key());
    change.next_public_key = Some(Some(kb1.public_key()));
    a.apply_peer_changes(vec![change]);
    let snap = a.snapshot();
    assert_eq!(snap.by_key.get(&kb1.public_key().0), Some(&0));
    let peer = snap.peers[0].clone();
    assert_eq!(peer.lock().target, pair(&ka, &kb1));

    // The timers initiate to kb1; B's new end (holding kb1) answers.
    let mut out = TxBatch::new(64 * 1024, 64);
    timers::tick(&peer, &mut out);
    let inits: Vec<Vec<u8>> = out
        .datagrams()
        .filter(|(_, d)| d[0] == 1)
        .map(|(_, d)| d.to_vec())
        .collect();
    assert_eq!(inits.len(), 1, "one initiation, to the next key");
    out.clear();
    timers::tick(&peer, &mut out);
    assert_eq!(
        out.datagrams().filter(|(_, d)| d[0] == 1).count(),
        0,
        "paced"
    );
    let mut b_new = Tunn::new(
        kb1.secret(),
        x25519_dalek::PublicKey::from(&ka.secret()),
        None,
        None,
        50,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(resp) = b_new.decapsulate(None, &inits[0], &mut buf) else {
        panic!("B's next key takes A's initiation")
    };
    let resp = resp.to_vec();
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    // Until the response, A sends on the old session.
    assert_eq!(peer.lock().pair, pair(&ka, &kb0));
    assert!(delivered(&mut b_old, b_addr, &ctx, &mut rx));
    io.udp.clear();
    rx.message(&ctx, b_addr, &resp, None, &mut io);
    rx.finish(&counters, &mut io);
    assert_eq!(
        peer.lock().pair,
        pair(&ka, &kb1),
        "switched on the response"
    );
    // A's keepalive completes B's side; both sessions decrypt.
    let keepalive = io
        .udp
        .iter()
        .find(|(_, d)| d[0] == 4)
        .expect("keepalive")
        .1
        .clone();
    assert!(matches!(
        b_new.decapsulate(None, &keepalive, &mut buf),
        TunnResult::Done
    ));
    assert!(delivered(&mut b_new, b_addr, &ctx, &mut rx));
    assert!(delivered(&mut b_old, b_addr, &ctx, &mut rx), "in flight");

    // B promotes kb1: A renames the peer; the session made with kb1 carries on.
    let mut change = PeerChange::new(kb1.public_key());
    change.renamed_from = Some(kb0.public_key());
    change.next_public_key = Some(None);
    a.apply_peer_changes(vec![change]);
    let snap = a.snapshot();
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].public_key, kb1.public_key());
    assert!(!snap.by_key.contains_key(&kb0.public_key().0));
    assert_eq!(
        snap.peers[0].lock().pairs().collect::<Vec<_>>(),
        vec![pair(&ka, &kb1)]
    );
    assert_eq!(snap.routes.lookup("10.99.0.1".parse().unwrap()), Some(0));
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    assert!(delivered(&mut b_new, b_addr, &ctx, &mut rx));
}

/// A revoked key loses its sessions at once and is refused afterwards, even when it is
/// configured again.
#[test]
fn revoked_key_loses_its_session_and_cannot_handshake_again() {
    let (a_addr, b, mut a) = responder(60);
    let (counters, limiter, mut rx, mut io) = receiver();
    let snap = b.snapshot();
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    handshake(&mut a, a_addr, &ctx, &mut rx, &mut io);
    assert!(delivered(&mut a, a_addr, &ctx, &mut rx));
    let revoked: PublicKey = snap.peers[0].public_key;
    b.set_revoked(BTreeSet::from([revoked]));
    let snap = b.snapshot();
    assert!(snap.peers.is_empty());
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    assert!(!delivered(&mut a, a_addr, &ctx, &mut rx), "session gone");
    // Configured again (it reappeared on its Node): still refused.
    let mut change = PeerChange::new(revoked);
    change.allowed_ips = vec!["10.99.0.1/32".parse().unwrap()];
    b.apply_peer_changes(vec![change]);
    let snap = b.snapshot();
    assert!(snap.peers.is_empty());
    let ctx = Ctx::host_only(&snap, &counters, &limiter, Instant::now(), false);
    let before = counters.drops(DropReason::Handshake);
    let init = initiation(&mut a, true);
    rx.message(&ctx, a_addr, &init, None, &mut io);
    rx.finish(&counters, &mut io);
    assert_eq!(counters.drops(DropReason::Handshake), before + 1);
}

/// One node of a two-node simulation: its device and receive side.
struct Node {
    dev: Device,
    addr: SocketAddr,
    counters: Counters,
    limiter: SourceLimiter,
    rx: RxPath,
}

impl Node {
    fn new(
        own: &PrivateKey,
        peer: &PrivateKey,
        peer_allowed: &str,
        addr: &str,
        peer_addr: &str,
    ) -> Node {
        Node {
            dev: device(own, peer, peer_allowed, peer_addr),
            addr: addr.parse().unwrap(),
            counters: Counters::default(),
            limiter: SourceLimiter::default(),
            rx: RxPath::new(false),
        }
    }

    /// Takes `datagrams` from `from`: (packets delivered to the host, datagrams sent back).
    fn take(&mut self, from: SocketAddr, datagrams: &[Vec<u8>]) -> (usize, Vec<Vec<u8>>) {
        let snap = self.dev.snapshot();
        let ctx = Ctx::host_only(&snap, &self.counters, &self.limiter, Instant::now(), false);
        let mut io = Capture::default();
        for d in datagrams {
            self.rx.message(&ctx, from, d, None, &mut io);
        }
        self.rx.finish(&self.counters, &mut io);
        (io.tun.len(), io.udp.into_iter().map(|(_, d)| d).collect())
    }

    /// A packet from `src` encrypted on the session the node sends on (None: queued).
    fn send(&self, src: [u8; 4], dst: [u8; 4]) -> Option<Vec<u8>> {
        let snap = self.dev.snapshot();
        let mut st = snap.peers[0].lock();
        let mut buf = vec![0u8; 2048];
        match st.tunn.encapsulate(&udp4(src, dst), &mut buf) {
            TunnResult::WriteToNetwork(d) if d[0] == 4 => Some(d.to_vec()),
            _ => None,
        }
    }

    /// The node's timers, once: what they send.
    fn tick(&self) -> Vec<Vec<u8>> {
        let snap = self.dev.snapshot();
        let mut out = TxBatch::new(64 * 1024, 64);
        timers::tick(&snap.peers[0], &mut out);
        out.datagrams().map(|(_, d)| d.to_vec()).collect()
    }
}

/// Carries datagrams between `a` and `b` (starting with `a_out`, sent by `a`) until neither
/// answers; packets delivered to each side's host.
fn exchange(a: &mut Node, b: &mut Node, a_out: Vec<Vec<u8>>) -> (usize, usize) {
    let (mut to_b, mut to_a) = (a_out, Vec::new());
    let (mut at_a, mut at_b) = (0, 0);
    for _ in 0..8 {
        let (n, back) = b.take(a.addr, &to_b);
        at_b += n;
        to_a = [to_a, back].concat();
        let (n, back) = a.take(b.addr, &to_a);
        at_a += n;
        to_b = back;
        to_a = Vec::new();
        if to_b.is_empty() {
            break;
        }
    }
    (at_a, at_b)
}

/// The whole rotation between two devices, data flowing both ways at every step: node B
/// rotates (kb0 -> kb1) while node A learns B's next key, handshakes to it, both switch, B
/// promotes and A renames the peer. Not a packet is lost at any step.
#[test]
fn data_both_ways_survives_every_step_of_a_peer_rotation() {
    let (ka, kb0, kb1) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let mut a = Node::new(
        &ka,
        &kb0,
        "10.99.0.2/32",
        "192.0.2.1:51820",
        "192.0.2.2:51820",
    );
    let mut b = Node::new(
        &kb0,
        &ka,
        "10.99.0.1/32",
        "192.0.2.2:51820",
        "192.0.2.1:51820",
    );
    let flows = |a: &mut Node, b: &mut Node, step: &str| {
        for _ in 0..3 {
            one_way(
                b,
                a,
                [10, 99, 0, 2],
                [10, 99, 0, 1],
                &format!("{step}: B -> A"),
            );
            one_way(
                a,
                b,
                [10, 99, 0, 1],
                [10, 99, 0, 2],
                &format!("{step}: A -> B"),
            );
        }
    };
    // A session, A initiating.
    let mut buf = vec![0u8; 256];
    let init = {
        let snap = a.dev.snapshot();
        let mut st = snap.peers[0].lock();
        let TunnResult::WriteToNetwork(i) = st.tunn.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        i.to_vec()
    };
    exchange(&mut a, &mut b, vec![init]);
    flows(&mut a, &mut b, "before");

    b.dev.set_next_private_key(Some(kb1.clone()));
    flows(&mut a, &mut b, "B holds its next key");
    let out = b.tick();
    exchange(&mut b, &mut a, out);
    flows(&mut a, &mut b, "B initiated to A's key with its next one");

    let mut change = PeerChange::new(kb0.public_key());
    change.next_public_key = Some(Some(kb1.public_key()));
    a.dev.apply_peer_changes(vec![change]);
    flows(&mut a, &mut b, "A learned B's next key");
    let out = a.tick();
    assert!(out.iter().any(|d| d[0] == 1), "A initiates to kb1");
    // The initiation reaches B, B's response reaches A; A's keepalive not yet.
    let (_, resp) = b.take(a.addr, &out);
    flows(&mut a, &mut b, "B answered A's initiation");
    let (_, ka_out) = a.take(b.addr, &resp);
    flows(&mut a, &mut b, "A took B's response");
    exchange(&mut a, &mut b, ka_out);
    flows(&mut a, &mut b, "B took A's keepalive");
    assert_eq!(a.dev.snapshot().peers[0].lock().pair, pair(&ka, &kb1));
    assert_eq!(b.dev.snapshot().peers[0].lock().pair, pair(&kb1, &ka));

    b.dev.set_private_key(Some(kb1.clone()));
    flows(&mut a, &mut b, "B promoted");
    let mut change = PeerChange::new(kb1.public_key());
    change.renamed_from = Some(kb0.public_key());
    change.next_public_key = Some(None);
    a.dev.apply_peer_changes(vec![change]);
    flows(&mut a, &mut b, "A renamed B");
}

/// A packet from `from` (inner source `src`) reaches `to`'s host.
fn one_way(from: &mut Node, to: &mut Node, src: [u8; 4], dst: [u8; 4], what: &str) {
    let d = from.send(src, dst);
    let d = d.unwrap_or_else(|| panic!("{what}: no session to send on"));
    let (_, delivered) = exchange(from, to, vec![d]);
    assert_eq!(
        delivered,
        1,
        "{what}: lost; drops: {:?}",
        drops(&to.counters)
    );
}

fn drops(c: &Counters) -> Vec<(DropReason, u64)> {
    DropReason::ALL
        .iter()
        .map(|r| (*r, c.drops(*r)))
        .filter(|(_, n)| *n > 0)
        .collect()
}
