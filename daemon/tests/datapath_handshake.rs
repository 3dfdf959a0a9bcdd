//! The data path around the handshake and at its trust boundary, between two in-memory
//! devices: packets queued while the handshake runs, and what a peer's datagrams must not get
//! past (tampering, replay, inner sources outside its allowed IPs, strangers without the key).

#[path = "datapath_support/mod.rs"]
mod support;

use kwire::datapath::stats::DropReason;
use kwire::datapath::{Ctx, DATA_OVERHEAD, MAX_FRAME};
use kwire::offload::checksum::{fold, pseudo_header, sum};
use kwire::offload::gso::TxBatch;
use kwire::offload::{VnetHdr, F_NEEDS_CSUM, VNET_HDR_LEN};
use std::time::Instant;
use support::{
    deliver, tso_frame, udp_packet, Node, Pair, ADDR_A, ADDR_B, INNER_A, INNER_B, KEY_A, MSS,
};

#[test]
fn packets_queued_during_the_handshake_arrive_in_order() {
    let mut p = Pair::new(false);
    let mut buf = vec![0u8; 2048];
    for i in 0..5 {
        let n = udp_packet(&mut buf, INNER_A, INNER_B, i, 100 + i as usize);
        p.a.send(&mut buf[..n], false);
    }
    p.pump(Instant::now());
    assert_eq!(p.b.io.tun.len(), 5);
    for i in 0..5 {
        let n = udp_packet(&mut buf, INNER_A, INNER_B, i, 100 + i as usize);
        assert_eq!(p.b.io.tun.entry(i as usize).1, &buf[..n], "packet {i}");
    }
}

/// The largest packet a tun can hand over, queued by boringtun before the session exists, is
/// flushed from the receive path's reply batch when the response arrives: the batch must have
/// room for it (boringtun panics on a short buffer, and release builds abort on panic). Its
/// datagram is longer than UDP can carry; the receiver drops it as malformed, without panic.
#[test]
fn the_largest_queued_packet_is_flushed_without_panic() {
    let mut p = Pair::new(false);
    let mut buf = vec![0u8; MAX_FRAME];
    let n = udp_packet(&mut buf, INNER_A, INNER_B, 7, 65535);
    p.a.send(&mut buf[..n], false);
    p.pump(Instant::now());
    assert_eq!(p.b.io.tun.len(), 0);
    assert_eq!(p.b.counters.drops(DropReason::Malformed), 1);
    // The largest that fits a UDP datagram over IPv4 (65507 bytes) arrives intact.
    let n = udp_packet(&mut buf, INNER_A, INNER_B, 8, 65507 - DATA_OVERHEAD);
    p.a.send(&mut buf[..n], false);
    p.pump(Instant::now());
    assert_eq!(p.b.io.tun.len(), 1);
    assert_eq!(p.b.io.tun.entry(0).1, &buf[..n]);
}

/// A TSO frame whose datagrams do not fit the send batch is sealed in parts, the batch sent
/// in between; the receiver gets the whole segment back.
#[test]
fn a_frame_larger_than_the_send_batch_goes_out_in_parts() {
    let mut p = Pair::new(true);
    p.handshake();
    p.a.tx.batch = TxBatch::new(8 * 1024, 4);
    let mut frame = vec![0u8; 65536 + 16];
    let n = tso_frame(&mut frame, INNER_A, INNER_B, 1000, 1, 40 * MSS as usize);
    let sent = frame[..n].to_vec();
    p.a.queue(&mut frame[..n], true);
    assert!(p.a.io.udp.len() > 1, "the batch was sent mid-frame");
    p.a.tx.flush(&mut p.a.io);
    p.pump(Instant::now());
    assert_eq!(p.b.io.tun.len(), 1);
    assert_eq!(p.b.io.tun.entry(0).1, &sent[..]);
    assert!(p.a.counters.all_drops().all(|(_, c)| c == 0));
}

/// A tun with offloads hands single packets behind a virtio-net header: one whose checksum is
/// complete goes out as it is, one whose checksum the kernel left partial has it completed
/// first; the receiver gets the packet alone, its UDP checksum valid.
#[test]
fn single_packets_behind_a_virtio_net_header_arrive_whole() {
    let mut p = Pair::new(false);
    p.handshake();
    let mut buf = vec![0u8; 2048];
    let n = VNET_HDR_LEN + udp_packet(&mut buf[VNET_HDR_LEN..], INNER_A, INNER_B, 1, 300);
    let whole = buf[VNET_HDR_LEN..n].to_vec();
    p.a.send(&mut buf[..n], true);
    // The same packet with a partial checksum: the pseudo-header sum in the UDP field.
    let pkt = &mut buf[VNET_HDR_LEN..n];
    let ph = pseudo_header(&pkt[12..16], &pkt[16..20], 17, (pkt.len() - 20) as u32);
    pkt[26..28].copy_from_slice(&fold(ph).to_be_bytes());
    VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 6,
        ..VnetHdr::default()
    }
    .encode((&mut buf[..VNET_HDR_LEN]).try_into().unwrap());
    p.a.send(&mut buf[..n], true);
    p.pump(Instant::now());
    assert!(p.a.counters.all_drops().all(|(_, c)| c == 0));
    assert_eq!(p.b.io.tun.len(), 2);
    assert_eq!(p.b.io.tun.entry(0).1, &whole[..]);
    let got = p.b.io.tun.entry(1).1;
    assert_eq!(got[..26], whole[..26]);
    assert_eq!(got[28..], whole[28..]);
    let ph = pseudo_header(&got[12..16], &got[16..20], 17, (got.len() - 20) as u32);
    assert_eq!(fold(sum(ph, &got[20..])), 0xffff, "UDP checksum completed");
}

fn established() -> Pair {
    let mut p = Pair::new(false);
    p.handshake();
    p
}

/// One A -> B packet, encrypted but not delivered: the datagram bytes.
fn sealed(p: &mut Pair, src: [u8; 4], n: u32) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let len = udp_packet(&mut buf, src, INNER_B, n, 200);
    p.a.send(&mut buf[..len], false);
    assert_eq!(p.a.io.udp.len(), 1);
    let d = p.a.io.udp.entry(0).1.to_vec();
    p.a.io.udp.clear();
    d
}

fn receive(b: &mut Node, from: std::net::SocketAddr, d: &[u8]) {
    let snap = b.device.snapshot();
    let ctx = Ctx::host_only(
        &snap,
        &b.counters,
        &b.device.source_limiter,
        Instant::now(),
        false,
    );
    b.rx.message(&ctx, from, d, None, &mut b.io);
    b.rx.finish(&b.counters, &mut b.io);
}

#[test]
fn tampered_and_replayed_datagrams_are_dropped() {
    let mut p = established();
    let d = sealed(&mut p, INNER_A, 1);
    let mut bad = d.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    receive(&mut p.b, ADDR_A, &bad);
    assert_eq!(p.b.io.tun.len(), 0);
    assert_eq!(p.b.counters.drops(DropReason::Decrypt), 1);
    receive(&mut p.b, ADDR_A, &d);
    assert_eq!(p.b.io.tun.len(), 1, "the untampered one passes");
    receive(&mut p.b, ADDR_A, &d);
    assert_eq!(p.b.io.tun.len(), 1);
    assert_eq!(p.b.counters.drops(DropReason::Replay), 1);
}

#[test]
fn inner_sources_outside_the_peers_allowed_ips_are_dropped() {
    let mut p = established();
    let d = sealed(&mut p, [10, 99, 0, 77], 1);
    receive(&mut p.b, ADDR_A, &d);
    assert_eq!(p.b.io.tun.len(), 0);
    assert_eq!(p.b.counters.drops(DropReason::NotAllowedIp), 1);
}

#[test]
fn authenticated_packets_roam_the_endpoint() {
    let mut p = established();
    let moved: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let d = sealed(&mut p, INNER_A, 1);
    receive(&mut p.b, moved, &d);
    assert_eq!(p.b.io.tun.len(), 1);
    assert_eq!(p.b.device.snapshot().peers[0].endpoint(), Some(moved));
    // A forged datagram from elsewhere does not move it back.
    let mut bad = sealed(&mut p, INNER_A, 2);
    bad[20] ^= 1;
    receive(&mut p.b, ADDR_A, &bad);
    assert_eq!(p.b.device.snapshot().peers[0].endpoint(), Some(moved));
}

/// A stranger that knows B's public key but not a key B trusts: its handshake is refused and
/// nothing it sends reaches the tun.
#[test]
fn a_stranger_gets_nothing_through() {
    let mut p = established();
    let stranger_addr: std::net::SocketAddr = "203.0.113.9:51820".parse().unwrap();
    let mut stranger = Node::new(
        [0x33; 32],
        stranger_addr,
        [10, 99, 0, 9],
        support::KEY_B,
        ADDR_B,
        INNER_B,
        false,
    );
    let mut buf = vec![0u8; 2048];
    let n = udp_packet(&mut buf, [10, 99, 0, 9], INNER_B, 0, 100);
    stranger.send(&mut buf[..n], false);
    assert_eq!(stranger.io.udp.len(), 1, "a handshake initiation");
    let now = Instant::now();
    deliver(&mut stranger, &mut p.b, now);
    assert_eq!(p.b.io.udp.len(), 0, "no response");
    assert_eq!(p.b.io.tun.len(), 0);
    assert_eq!(p.b.counters.drops(DropReason::Handshake), 1);
    // A node with A's key but a different address is A (keys, not addresses, are identities).
    let mut a2 = Node::new(
        KEY_A,
        stranger_addr,
        INNER_A,
        support::KEY_B,
        ADDR_B,
        INNER_B,
        false,
    );
    let n = udp_packet(&mut buf, INNER_A, INNER_B, 1, 100);
    a2.send(&mut buf[..n], false);
    deliver(&mut a2, &mut p.b, now);
    assert_eq!(p.b.io.udp.len(), 1, "a response to the key B trusts");
}
