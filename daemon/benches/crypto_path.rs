//! Per-packet cost of the data path with an established session: a tun frame decided and
//! encrypted through the runtime's `TxPath`, a datagram decided and decrypted through its
//! `RxPath` (64, 512, 1420-byte packets), TSO split of a 64 KB frame and GRO merge of 45
//! segments. Throughput is reported in packet bytes. The `aead` group is the ceiling under
//! all of it: ring's ChaCha20-Poly1305 (the AEAD boringtun calls) sealing and opening 64 and
//! 1420 bytes in place, to set beside `openssl speed -evp chacha20-poly1305 -bytes N`.

#[path = "../tests/datapath_support/mod.rs"]
mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kwire::datapath::{Ctx, Port};
use kwire::offload::gro::Coalescer;
use kwire::offload::tso;
use std::hint::black_box;
use std::time::{Duration, Instant};
use support::{tcp_packet, udp_packet, Pair, SinkIo, INNER_A, INNER_B};

const SIZES: [usize; 3] = [64, 512, 1420];

/// Datagrams sealed ahead of each timed decapsulation run (untimed); bounded so a long
/// measurement does not hold millions of datagrams.
const DECAP_CHUNK: u64 = 2048;

/// Two devices with a session between them, a `size`-byte UDP packet from A to B (in a
/// 2 KiB frame buffer, with its length) and a sink that counts what leaves.
fn established(size: usize) -> (Pair, Vec<u8>, usize, SinkIo) {
    let mut p = Pair::new(false);
    p.handshake();
    let mut frame = vec![0u8; 2048];
    let n = udp_packet(&mut frame, INNER_A, INNER_B, 1, size);
    let sink = SinkIo {
        datagrams: 0,
        frames: 0,
    };
    (p, frame, n, sink)
}

fn encapsulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("encapsulate");
    for size in SIZES {
        let (mut p, mut frame, n, mut sink) = established(size);
        let snap = p.a.device.snapshot();
        let ctx = Ctx::host_only(
            &snap,
            &p.a.counters,
            &p.a.device.source_limiter,
            Instant::now(),
            false,
        );
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                p.a.tx
                    .frame(&ctx, Port::Host, black_box(&mut frame[..n]), &mut sink)
            });
        });
        p.a.tx.flush(&mut sink);
    }
    g.finish();
}

fn decapsulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("decapsulate");
    for size in SIZES {
        let (mut p, mut frame, n, mut sink) = established(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(DECAP_CHUNK);
                    for _ in 0..k {
                        p.a.queue(&mut frame[..n], false);
                    }
                    p.a.tx.flush(&mut p.a.io);
                    let from = p.a.addr;
                    let b_node = &mut p.b;
                    let snap = b_node.device.snapshot();
                    let ctx = Ctx::host_only(
                        &snap,
                        &b_node.counters,
                        &b_node.device.source_limiter,
                        Instant::now(),
                        false,
                    );
                    let t = Instant::now();
                    // One datagram per call, as without UDP GRO.
                    for i in 0..p.a.io.udp.len() {
                        let (e, group) = p.a.io.udp.entry(i);
                        let seg = if e.segment == 0 {
                            group.len()
                        } else {
                            e.segment as usize
                        };
                        for d in group.chunks(seg) {
                            b_node.rx.message(&ctx, from, d, None, &mut sink);
                        }
                    }
                    b_node.rx.finish(&b_node.counters, &mut sink);
                    timed += t.elapsed();
                    p.a.io.udp.clear();
                    left -= k;
                }
                timed
            });
        });
        let delivered =
            p.b.counters
                .packets_rx
                .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            delivered > 0 && p.b.counters.all_drops().all(|(_, c)| c == 0),
            "decapsulation bench dropped packets"
        );
    }
    g.finish();
}

/// 45 segments of 1448 bytes: a 64 KB TSO segment as Linux builds it for a 1500-byte MTU.
const SEGMENTS: usize = 45;
const BENCH_MSS: usize = 1448;

fn offload(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload");
    let payload: Vec<u8> = (0..SEGMENTS * BENCH_MSS).map(|i| (i * 31) as u8).collect();

    // A TSO frame: virtio-net header + one 65200-byte IPv4/TCP segment.
    let mut frame = vec![0u8; 65536 + 16];
    let len = support::tso_frame(&mut frame, INNER_A, INNER_B, 1000, 1, payload.len());
    frame[4..6].copy_from_slice(&(BENCH_MSS as u16).to_le_bytes()); // gso_size
    let frame = &mut frame[..len];
    let mut scratch = vec![0u8; 65536];
    g.throughput(Throughput::Bytes(
        (len - kwire::offload::VNET_HDR_LEN) as u64,
    ));
    g.bench_function("tso_split_64k", |b| {
        b.iter(|| {
            let mut n = 0;
            tso::split(black_box(&mut *frame), &mut scratch, |p| {
                black_box(p);
                n += 1;
            })
            .expect("valid frame");
            assert_eq!(n, SEGMENTS);
        })
    });

    // The same stream as 45 separate packets, merged back into one frame.
    let mut packets = Vec::new();
    let mut buf = vec![0u8; 2048];
    for (i, chunk) in payload.chunks(BENCH_MSS).enumerate() {
        let flags = if i + 1 == SEGMENTS { 0x18 } else { 0x10 };
        let n = tcp_packet(
            &mut buf,
            INNER_A,
            INNER_B,
            1000 + (i * BENCH_MSS) as u32,
            flags,
            chunk,
        );
        packets.push(buf[..n].to_vec());
    }
    let mut coalescer = Coalescer::new(64, true);
    g.throughput(Throughput::Bytes(
        packets.iter().map(|p| p.len() as u64).sum(),
    ));
    g.bench_function("gro_merge_45", |b| {
        b.iter(|| {
            for p in &packets {
                coalescer.push(black_box(p));
            }
            let mut frames = 0;
            coalescer.drain(|f| {
                black_box(f);
                frames += 1;
            });
            assert_eq!(frames, 1);
        })
    });
    g.finish();
}

/// ring's ChaCha20-Poly1305 alone, in place, at the sizes of the tunnel's small and full
/// packets: what every other group here pays per byte before kwire's own code.
fn aead(c: &mut Criterion) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"));
    let mut g = c.benchmark_group("aead");
    for size in [64usize, 1420] {
        let mut buf = vec![0x5au8; size + 16];
        g.throughput(Throughput::Bytes(size as u64));
        let mut counter = 0u64;
        let nonce = |n: u64| {
            let mut b = [0u8; 12];
            b[4..].copy_from_slice(&n.to_le_bytes());
            Nonce::assume_unique_for_key(b)
        };
        g.bench_with_input(BenchmarkId::new("seal", size), &size, |b, _| {
            b.iter(|| {
                counter += 1;
                let (data, tag) = buf.split_at_mut(size);
                let t = key
                    .seal_in_place_separate_tag(nonce(counter), Aad::empty(), black_box(data))
                    .expect("seal");
                tag.copy_from_slice(t.as_ref());
            })
        });
        // A sealed packet, opened again and again (opening decrypts in place, so each
        // iteration starts from a fresh copy, as decapsulation's buffer does).
        let sealed = {
            let mut b = vec![0x5au8; size];
            key.seal_in_place_append_tag(nonce(0), Aad::empty(), &mut b)
                .expect("seal");
            b
        };
        g.bench_with_input(BenchmarkId::new("open", size), &size, |b, _| {
            b.iter(|| {
                buf.copy_from_slice(&sealed);
                let plain = key
                    .open_in_place(nonce(0), Aad::empty(), black_box(&mut buf))
                    .expect("open");
                black_box(plain.len());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encapsulate, decapsulate, offload, aead);
criterion_main!(benches);
