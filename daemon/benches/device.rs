//! What one peer's change costs the device at cluster size: a device with 5,000 peers (a
//! pod range and a node address each, an endpoint, our key set), then one peer's endpoint
//! changed, one peer's allowed IPs replaced, and one peer added and removed again. Each is a
//! whole `apply_peer_changes` call: the configuration change and the new snapshot the packet
//! loop reads.

use criterion::{criterion_group, criterion_main, Criterion};
use ipnetwork::IpNetwork;
use kwire::wg::key::PrivateKey;
use kwire::wg::uapi::PeerChange;
use kwire::wg::Device;
use kwire_proto::key::PublicKey;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

const PEERS: u32 = 5_000;

fn key(i: u32) -> PublicKey {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    b[31] = 0x40;
    PublicKey(b)
}

fn endpoint(i: u32, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0xc000_0000 | i), port))
}

fn nets(i: u32, moved: bool) -> Vec<IpNetwork> {
    let pods = Ipv4Addr::from(0x0a00_0000 | (i << 8) | u32::from(moved) << 28);
    vec![
        IpNetwork::new(pods.into(), 24).unwrap(),
        IpNetwork::new(Ipv4Addr::from(0xc000_0000 | i).into(), 32).unwrap(),
    ]
}

fn add(i: u32) -> PeerChange {
    PeerChange {
        endpoint: Some(endpoint(i, 51820)),
        persistent_keepalive: Some(0),
        replace_allowed_ips: true,
        allowed_ips: nets(i, false),
        ..PeerChange::new(key(i))
    }
}

fn device() -> Device {
    let dev = Device::new();
    dev.set_private_key(PrivateKey::from_bytes([9; 32]));
    dev.apply_peer_changes((1..=PEERS).map(add).collect());
    dev
}

fn one_peer(c: &mut Criterion) {
    let dev = device();
    let mut g = c.benchmark_group("device_5000_peers");
    let mut flip = false;
    g.bench_function("endpoint_changed", |b| {
        b.iter(|| {
            flip = !flip;
            let port = if flip { 51821 } else { 51820 };
            dev.apply_peer_changes(vec![PeerChange {
                endpoint: Some(endpoint(PEERS / 2, port)),
                ..PeerChange::new(key(PEERS / 2))
            }]);
            black_box(dev.snapshot().peers.len())
        })
    });
    g.bench_function("allowed_ips_replaced", |b| {
        b.iter(|| {
            flip = !flip;
            dev.apply_peer_changes(vec![PeerChange {
                replace_allowed_ips: true,
                allowed_ips: nets(PEERS / 3, flip),
                ..PeerChange::new(key(PEERS / 3))
            }]);
            black_box(dev.snapshot().peers.len())
        })
    });
    g.bench_function("peer_added_and_removed", |b| {
        b.iter(|| {
            dev.apply_peer_changes(vec![add(PEERS + 1)]);
            dev.apply_peer_changes(vec![PeerChange {
                remove: true,
                ..PeerChange::new(key(PEERS + 1))
            }]);
            black_box(dev.snapshot().peers.len())
        })
    });
    g.finish();
}

criterion_group!(benches, one_peer);
criterion_main!(benches);
