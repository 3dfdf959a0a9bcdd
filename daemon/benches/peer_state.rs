//! What saving the peer set (`peers.json`) costs at issue 17's scale, 5,000 peers, and what of
//! it the planner pays since the state file has a writer of its own (`state::Writer`):
//! - `save`: one write of the file as the writer makes it (encoded, written, synced, renamed,
//!   the directory synced): what the planner paid before;
//! - `hand_over`: what the planner pays now: the copy of the set it hands to the writer (the
//!   write then runs on the writer's thread).
//!
//! Run as a test (`cargo test --bench peer_state`), the set is a tenth of the size.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use kwire::agent::peers::DesiredPeer;
use kwire::agent::state::{self, State};
use kwire_proto::key::PublicKey;

fn peers() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        5000
    } else {
        500
    }
}

/// A node's set: every peer with a key, an endpoint and a /24 and a /64 of pod addresses.
fn set(n: usize) -> State {
    let mut peers = BTreeMap::new();
    for i in 0..n {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let node = format!("node-{i}");
        peers.insert(
            node.clone(),
            DesiredPeer {
                node,
                public_key: PublicKey(key),
                next_public_key: None,
                endpoint: format!("10.{}.{}.{}:51820", i >> 16, (i >> 8) & 255, i & 255)
                    .parse()
                    .unwrap(),
                allowed_ips: vec![
                    format!("10.244.{}.0/24", i % 250).parse().unwrap(),
                    format!("fd00:{i:x}::/64").parse().unwrap(),
                ],
                keepalive: 25,
                relay: None,
                behind_nat: false,
            },
        );
    }
    State {
        pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
        mtu: Some(1420),
        peers,
        ..State::default()
    }
}

fn bench(c: &mut Criterion) {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("kwire-bench-peer-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = set(peers());
    state::save(&dir, &st).unwrap();
    assert_eq!(state::load(&dir).unwrap().as_ref(), Some(&st));
    eprintln!(
        "peer_state: {} peers, file {:.2} MiB",
        st.peers.len(),
        std::fs::metadata(dir.join(state::STATE_FILE)).map_or(0, |m| m.len()) as f64
            / (1024.0 * 1024.0)
    );
    let mut g = c.benchmark_group("peer_state");
    g.sample_size(10);
    g.bench_function("save", |b| b.iter(|| state::save(&dir, &st).unwrap()));
    g.bench_function("hand_over", |b| b.iter(|| black_box(st.clone())));
    g.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
