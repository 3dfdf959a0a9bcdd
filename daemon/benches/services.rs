//! Service translation cost per new flow with 10 and with 10,000 Services (10 endpoints
//! each) in the node's table, and the time to compile a 10,000 x 10 table, whole and again
//! after one EndpointSlice changed.
//!
//! A new flow is a client's first packet to a ClusterIP: the frontend lookup, Maglev's pick,
//! the connection-table insert (both directions) and the in-place rewrite with checksums. The
//! goal is that 10,000 Services cost no more than 1.5x of 10. Each measured run starts from an
//! empty connection table (refilled every 100,000 flows), so every packet is a new flow.

mod service_support;

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kwire::datapath::local::{LocalTable, Port};
use kwire::datapath::service;
use kwire::datapath::stats::Counters;
use kwire::services::model::{EndpointView, ServicePortView, SlicePortView, TCP};
use kwire::services::table::{Scope, ServiceCompiler};
use kwire::services::{ServiceTable, ServiceView, SliceView};
use kwire::wg::device::Snapshot;
use kwire::wg::ratelimit::SourceLimiter;

const ENDPOINTS: usize = 10;

fn vip(i: usize) -> [u8; 4] {
    [10, 96, (i >> 8) as u8, i as u8]
}

fn input(services: usize) -> (Vec<ServiceView>, Vec<SliceView>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..services {
        svcs.push(ServiceView {
            namespace: format!("ns-{}", i % 100),
            name: format!("svc-{i}"),
            cluster_ips: vec![IpAddr::from(vip(i))],
            ports: vec![ServicePortView {
                name: "http".into(),
                proto: TCP,
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        });
        slices.push(SliceView {
            namespace: format!("ns-{}", i % 100),
            service: format!("svc-{i}"),
            ports: vec![SlicePortView {
                name: "http".into(),
                proto: TCP,
                port: 8080,
            }],
            endpoints: (0..ENDPOINTS)
                .map(|e| EndpointView {
                    addresses: vec![IpAddr::from([
                        10,
                        244,
                        (i % 250) as u8,
                        (e * 20 + i / 250 % 20) as u8,
                    ])],
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                })
                .collect(),
        });
    }
    (svcs, slices)
}

/// A TCP SYN from 10.244.200.5 to `dst`:80, valid checksums.
fn syn(dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 244, 200, 5];
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    kwire::offload::checksum::set_ipv4_header(&mut p[..20]);
    p
}

fn new_flows(c: &mut Criterion) {
    let mut g = c.benchmark_group("service_new_flow");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 10_000] {
        let (svcs, slices) = input(n);
        let table = Arc::new(ServiceTable::compile(&svcs, &slices));
        // Packets to 64 different Services (all of them when there are fewer).
        let templates: Vec<Vec<u8>> = (0..64).map(|k| syn(vip(k * n / 64))).collect();
        let snap = Snapshot::default();
        let (counters, limiter) = (Counters::default(), SourceLimiter::default());
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                let mut pkt = templates[0].clone();
                while done < iters {
                    let batch = (iters - done).min(100_000);
                    let mut local = LocalTable::<()>::default();
                    service_support::serve(&mut local, &table);
                    let ctx = service_support::ctx(&snap, &local, &counters, &limiter);
                    let start = Instant::now();
                    for i in 0..batch {
                        pkt.copy_from_slice(&templates[(i % 64) as usize]);
                        // A new source port (and address) per flow.
                        pkt[14] = (i >> 16) as u8;
                        pkt[20..22].copy_from_slice(&(i as u16).to_be_bytes());
                        black_box(service::forward(&ctx, Port::Pod(0), black_box(&mut pkt))).ok();
                    }
                    total += start.elapsed();
                    done += batch;
                }
                total
            })
        });
    }
    g.finish();
}

/// Resident memory of this process, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("service_table_compile");
    g.sample_size(10);
    let (svcs, slices) = input(10_000);
    // The table's own memory: resident size before and after building one (printed, not a
    // criterion measurement; goal under 200 MB).
    let before = rss();
    let table = ServiceTable::compile(&svcs, &slices);
    eprintln!(
        "service table 10000x10: {} frontends, resident +{} MB",
        table.frontends(),
        rss().saturating_sub(before) / 1_000_000
    );
    drop(table);
    g.bench_function("10000x10", |b| {
        b.iter(|| black_box(ServiceTable::compile(&svcs, &slices)))
    });
    // What the agent does after one EndpointSlice changed: the compiler that holds every
    // view takes the changed slice and compiles (recompiling that Service, assembling the
    // table), alternating between two versions of one slice so that every iteration has
    // exactly one changed Service.
    let mut compiler = ServiceCompiler::new(Scope::default());
    for s in &svcs {
        compiler.put_service((s.namespace.clone(), s.name.clone()), Some(s.clone()));
    }
    let slice_key = |i: usize| {
        (
            slices[i].namespace.clone(),
            format!("{}-x1", slices[i].service),
        )
    };
    for (i, s) in slices.iter().enumerate() {
        compiler.put_slice(slice_key(i), Some(s.clone()));
    }
    compiler.compile();
    let mut changed = slices[4321].clone();
    changed.endpoints[0].addresses[0] = IpAddr::from([10, 255, 0, 1]);
    let mut flip = false;
    g.bench_function("10000x10_one_slice_changed", |b| {
        b.iter(|| {
            flip = !flip;
            let slice = if flip { &changed } else { &slices[4321] };
            compiler.put_slice(slice_key(4321), Some(slice.clone()));
            black_box(compiler.compile())
        })
    });
    g.finish();
}

criterion_group!(benches, compile, new_flows);
criterion_main!(benches);
