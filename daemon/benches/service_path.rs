//! What Services cost traffic that is not a Service's: one frame through the whole tun-side
//! pipeline (`from_tun::decide`: anti-spoofing, the service stage, policy, routing), from a
//! pod to a pod on another node, with no service table, with a 10,000-Service table and no
//! translated flow, and with that table and 1,000 translated flows (the reverse lookup then
//! runs for every frame). Built only from APIs that predate node ports, so the same file
//! measures an older tree for a ratio taken in one run (with `service_support/`).

mod service_support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kwire::datapath::from_tun::decide;
use kwire::datapath::local::{LocalTable, PodPort, Port};
use kwire::datapath::stats::Counters;
use kwire::services::{ServiceTable, ServiceView, SliceView};
use kwire::wg::device::Snapshot;
use kwire::wg::ratelimit::SourceLimiter;

const SERVICES: usize = 10_000;

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

/// 10,000 ClusterIP Services (TCP 80 -> 8080), 10 endpoints each.
fn table() -> ServiceTable {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..SERVICES {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": format!("svc-{i}")},
            "spec": {"clusterIPs": [vip(i)], "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        svcs.push(ServiceView::from_k8s(&s).unwrap());
        let eps: Vec<_> = (0..10)
            .map(
                |e| serde_json::json!({"addresses": [format!("10.244.{}.{}", 2 + e, 1 + i % 250)]}),
            )
            .collect();
        let sl: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": format!("svc-{i}-x"),
                         "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }))
        .unwrap();
        slices.push(SliceView::from_k8s(&sl).unwrap());
    }
    ServiceTable::compile(&svcs, &slices)
}

/// A UDP datagram with 64 bytes of payload, valid header checksum (ports 1000 -> 2000).
fn udp(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 92, 0, 0, 0x40, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&[0, 80, 0, 72, 0, 0]);
    p.resize(92, 7);
    if proto == 6 {
        p[20 + 12] = 0x50;
        p[20 + 13] = 0x02;
    }
    kwire::offload::checksum::set_ipv4_header(&mut p[..20]);
    p
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_not_a_service");
    g.throughput(Throughput::Elements(1));
    let table = Arc::new(table());
    let mut snap = Snapshot::default();
    Arc::make_mut(&mut snap.routes).insert("10.244.2.0/24".parse().unwrap(), 0);
    let (counters, limiter) = (Counters::default(), SourceLimiter::default());
    let frame = udp([10, 244, 1, 5], [10, 244, 2, 9], 17, 1000);
    for case in ["no_table", "10000_services", "10000_services_1000_flows"] {
        let mut local = LocalTable::new(
            vec![PodPort {
                id: 0,
                ips: vec!["10.244.1.5".parse().unwrap()],
                io: (),
            }],
            vec!["10.244.1.1".parse().unwrap()],
        );
        local.mtu = Some(1420);
        if case != "no_table" {
            service_support::serve(&mut local, &table);
        }
        let ctx = service_support::ctx(&snap, &local, &counters, &limiter);
        let mut answer = vec![0u8; 2048];
        if case == "10000_services_1000_flows" {
            // 1,000 flows to ClusterIPs, translated through the same pipeline.
            for k in 0..1000u16 {
                let ip: std::net::Ipv4Addr = vip(k as usize).parse().unwrap();
                let mut syn = udp([10, 244, 1, 5], ip.octets(), 6, 10_000 + k);
                black_box(decide(&ctx, Port::Pod(0), &mut syn, &mut answer));
            }
        }
        let mut f = frame.clone();
        g.bench_function(case, |b| {
            b.iter(|| {
                f.copy_from_slice(&frame);
                let a = decide(&ctx, Port::Pod(0), black_box(&mut f), &mut answer);
                black_box(matches!(a, kwire::datapath::TxAction::Drop(_)));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
