//! Restart without a gap across many peers (issue 16): 50 WireGuard peers (boringtun sessions
//! in this process, one UDP socket each, in their own namespace) send 20 numbered datagrams a
//! second each (1,000 a second in all) through a `kwire tunnel` device in another namespace,
//! one way. The device is stopped and a new one started with the same key and peers (the test
//! plays the agent's part: restore the configuration). Before issue 16 the new device knew no
//! session and every peer kept encrypting with its old one until its own timers gave up
//! (15 s); now the device greets every peer as soon as it is configured and an unknown session
//! from a peer triggers a handshake at once. The largest hole over all 50 peers is printed in
//! ms; the part after the new device was configured must stay under a second.
//!
//! Needs root; skips (with a message) without it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use kwire_tests::{require_root, wait_until, Impl, Keypair, Netns, Scratch, Veth, WgDevice};

const PEERS: usize = 50;
/// Datagrams per second per peer (1,000 a second in all).
const PER_PEER: u64 = 20;
/// The device's underlay address and port; the peers' port (each peer has an address of its
/// own, [`peer_addr`], as nodes do: the device limits initiations per source address).
const HUB: &str = "198.51.100.1";
const WG_PORT: u16 = 51820;
const PEER_PORT: u16 = 40000;
/// The receiver behind the device, and the device's tunnel address.
const SINK: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
const SINK_PORT: u16 = 9100;
const MAX_HOLE: Duration = Duration::from_secs(1);

/// Peer `i`'s underlay address.
fn peer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + i as u8)
}

/// Peer `i`'s inner address (its allowed IP).
fn inner(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, i as u8 + 1)
}

/// An IPv4/UDP packet from peer `i` to the sink carrying `seq` (UDP checksum 0: none).
fn packet(i: usize, seq: u64) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&inner(i).octets());
    p.extend_from_slice(&SINK.octets());
    let sum = (0..20)
        .step_by(2)
        .map(|k| u32::from(u16::from_be_bytes([p[k], p[k + 1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp_len = (8 + payload.len()) as u16;
    p.extend_from_slice(&9000u16.to_be_bytes());
    p.extend_from_slice(&SINK_PORT.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    p
}

/// Arrivals at the sink per peer (by inner source).
type Arrivals = Arc<Mutex<BTreeMap<Ipv4Addr, Vec<Instant>>>>;

fn start_sink(ns: &Netns, stop: Arc<AtomicBool>, arrivals: Arrivals) -> JoinHandle<()> {
    let sock = ns
        .run_in(|| UdpSocket::bind((SINK, SINK_PORT)))
        .expect("bind the sink");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                arrivals
                    .lock()
                    .unwrap()
                    .entry(*from.ip())
                    .or_default()
                    .push(Instant::now());
            }
        }
    })
}

/// The 50 peers: each a boringtun session with the device's key and a socket of its own;
/// they send round-robin, one datagram per millisecond in all, answer handshakes and run
/// their timers.
fn start_peers(
    ns: &Netns,
    keys: Vec<x25519_dalek::StaticSecret>,
    hub: x25519_dalek::PublicKey,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let socks: Vec<UdpSocket> = (0..PEERS)
        .map(|i| {
            let s = ns
                .run_in(|| UdpSocket::bind((peer_addr(i), PEER_PORT)))
                .expect("bind a peer's socket");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    std::thread::spawn(move || {
        let to = SocketAddr::V4(SocketAddrV4::new(HUB.parse().unwrap(), WG_PORT));
        let mut tunns: Vec<Tunn> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| Tunn::new(k, hub, None, None, i as u32 + 1, None))
            .collect();
        let (mut out, mut inb) = (vec![0u8; 2048], vec![0u8; 2048]);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut timers_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            // Pacing: datagram `sent` is due at `sent` ms.
            let due = start + Duration::from_millis(sent);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let i = (sent % PEERS as u64) as usize;
            let seq = sent / PEERS as u64;
            if let TunnResult::WriteToNetwork(d) = tunns[i].encapsulate(&packet(i, seq), &mut out) {
                let _ = socks[i].send_to(d, to);
            }
            sent += 1;
            // What the device sent: handshakes to answer, keepalives, cookies.
            for (k, s) in socks.iter().enumerate() {
                while let Ok((n, from)) = s.recv_from(&mut inb) {
                    let mut r = tunns[k].decapsulate(Some(from.ip()), &inb[..n], &mut out);
                    while let TunnResult::WriteToNetwork(d) = r {
                        let _ = s.send_to(d, to);
                        r = tunns[k].decapsulate(None, &[], &mut out);
                    }
                }
            }
            if timers_at.elapsed() >= Duration::from_millis(250) {
                timers_at = Instant::now();
                for (k, t) in tunns.iter_mut().enumerate() {
                    if let TunnResult::WriteToNetwork(d) = t.update_timers(&mut out) {
                        let _ = socks[k].send_to(d, to);
                    }
                }
            }
        }
    })
}

/// Starts `kwire tunnel` with `key`, the 50 peers and the sink's address; returns it and when
/// it was configured.
fn start_device(
    ns: &Arc<Netns>,
    scratch: &Scratch,
    key: &Keypair,
    peers: &[String],
) -> (WgDevice, Instant) {
    let mut dev = WgDevice::start(ns, Impl::Kwire, "hub", scratch);
    let key_file = scratch.file("hub.key");
    key.write_private(&key_file);
    let key_path = key_file.display().to_string();
    let port = WG_PORT.to_string();
    let mut args: Vec<String> = vec!["private-key".into(), key_path, "listen-port".into(), port];
    for (i, pk) in peers.iter().enumerate() {
        args.extend([
            "peer".into(),
            pk.clone(),
            "allowed-ips".into(),
            format!("{}/32", inner(i)),
            "endpoint".into(),
            format!("{}:{PEER_PORT}", peer_addr(i)),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    dev.wg_set(&refs);
    dev.keys = key.clone();
    dev.up(&["10.77.100.1/16"], 1420);
    (dev, Instant::now())
}

/// Per peer, the largest time between two arrivals from `from` on (the arrival before
/// included); the largest over all peers and which peer had it.
fn largest_hole(arrivals: &Arrivals, from: Instant) -> (Duration, Ipv4Addr) {
    let a = arrivals.lock().unwrap();
    a.iter()
        .map(|(peer, times)| {
            let start = times.partition_point(|t| *t < from).saturating_sub(1);
            let last = times.last().copied().unwrap_or(from);
            let hole = times[start..]
                .windows(2)
                .map(|w| w[1].duration_since(w[0]))
                .max()
                .unwrap_or_default()
                // A peer that has not come back yet: its hole lasts until now.
                .max(Instant::now().duration_since(last));
            (hole, *peer)
        })
        .max()
        .unwrap_or((Duration::MAX, SINK))
}

/// Peers heard from at least `n` times since `t`.
fn peers_heard(arrivals: &Arrivals, t: Instant, n: usize) -> usize {
    let a = arrivals.lock().unwrap();
    a.values()
        .filter(|v| v.iter().rev().take_while(|x| **x >= t).count() >= n)
        .count()
}

#[test]
fn fifty_peers_resume_within_a_second_of_a_restarted_device() {
    require_root!();
    let scratch = Scratch::new("restart-peers");
    let hub_ns = Arc::new(Netns::new("hub"));
    let peers_ns = Netns::new("peers");
    let addrs: Vec<String> = (0..PEERS).map(|i| format!("{}/24", peer_addr(i))).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    Veth::new(&hub_ns, &[&format!("{HUB}/24")], &peers_ns, &addrs, 1500);
    let key = Keypair::generate();
    let b64 = base64::engine::general_purpose::STANDARD;
    let hub_public: [u8; 32] = b64.decode(&key.public).unwrap().try_into().unwrap();
    let secrets: Vec<x25519_dalek::StaticSecret> = (0..PEERS)
        .map(|_| x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng))
        .collect();
    let publics: Vec<String> = secrets
        .iter()
        .map(|s| b64.encode(x25519_dalek::PublicKey::from(s).as_bytes()))
        .collect();

    let (mut dev, _) = start_device(&hub_ns, &scratch, &key, &publics);
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals: Arrivals = Arc::default();
    let sink = start_sink(&hub_ns, stop.clone(), arrivals.clone());
    let senders = start_peers(
        &peers_ns,
        secrets,
        x25519_dalek::PublicKey::from(hub_public),
        stop.clone(),
    );
    let t = Instant::now();
    wait_until(Duration::from_secs(30), "every peer's stream flows", || {
        peers_heard(&arrivals, t, 10) == PEERS
    });

    // Stop the device; start a new one with the same key and peers.
    let from = Instant::now();
    dev.stop();
    let (dev2, configured) = start_device(&hub_ns, &scratch, &key, &publics);
    let down = configured.duration_since(from);
    wait_until(
        Duration::from_secs(60),
        "every peer's stream resumes for a second",
        || peers_heard(&arrivals, configured, PER_PEER as usize) == PEERS,
    );
    let (hole, worst) = largest_hole(&arrivals, from);
    stop.store(true, Ordering::Relaxed);
    let _ = senders.join();
    let _ = sink.join();
    let beyond = hole.saturating_sub(down);
    eprintln!(
        "{PEERS} peers: largest hole {} ms (peer {worst}); the device was down or unconfigured \
         for {} ms of it; {} ms after it was configured",
        hole.as_millis(),
        down.as_millis(),
        beyond.as_millis()
    );
    let dump = dev2.dump();
    assert!(!dump.peers.is_empty());
    assert!(
        beyond < MAX_HOLE,
        "peer {worst}: hole of {} ms, {} ms of it after the new device was configured",
        hole.as_millis(),
        beyond.as_millis()
    );
}
