//! What writing and putting back the connection tables costs (`agent/flow_state.rs`): the
//! running agent writes them every `--flow-save-interval` and at SIGTERM, and a starting agent
//! puts them back before it re-attaches its pods, so the restore is part of the restart gap.
//! - `save/N`: one write of N admitted flows (copied shard by shard under each shard's lock,
//!   encoded, written and synced);
//! - `restore/N`: one start's restore of that file into empty tables (read, checksum,
//!   decode, put back, remove the file).
//!
//! Each flow's initiator is one of N/8,192 addresses, under the default per-pod budget.
//! Run as a test (`cargo test --bench flow_state`), only the smallest size runs.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kwire::agent::flow_state::{restore, save, Restored, FLOW_STATE_FILE};
use kwire::datapath::conntrack::{Check, Decision, Flow};
use kwire::dataplane::ports::Pods;

fn pods() -> Pods {
    Pods::new(1, false).expect("pods")
}

/// Tables holding `n` admitted flows.
fn filled(n: usize) -> Pods {
    let p = pods();
    for i in 0..n {
        let flow = Flow {
            proto: 6,
            src: std::net::Ipv4Addr::new(10, 244, (i >> 21) as u8, (i >> 13) as u8).into(),
            sport: (i & 0x1fff) as u16 + 20_000,
            dst: std::net::Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8).into(),
            dport: 443,
        };
        assert_eq!(
            p.conntrack.check(flow, Check::Egress, || true),
            Decision::Admitted
        );
    }
    p
}

fn bench(c: &mut Criterion) {
    let sizes: &[usize] = if std::env::args().any(|a| a == "--bench") {
        &[10_000, 100_000, 1_000_000]
    } else {
        &[10_000]
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("flow_state");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for &n in sizes {
        let live = filled(n);
        g.bench_function(format!("save/{n}"), |b| {
            b.iter(|| save(dir.path(), &live).expect("save"))
        });
        let file = std::fs::read(dir.path().join(FLOW_STATE_FILE)).expect("the file");
        eprintln!("flow_state: {n} flows, a {} KB file", file.len() / 1024);
        g.bench_function(format!("restore/{n}"), |b| {
            b.iter_batched(
                || {
                    std::fs::write(dir.path().join(FLOW_STATE_FILE), &file).expect("write");
                    pods()
                },
                |fresh| {
                    let r = restore(dir.path(), &fresh).expect("restore");
                    assert_eq!(r, Restored { policy: n, nat: 0 });
                    fresh
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
