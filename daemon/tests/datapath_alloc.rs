//! Proves the steady-state packet path allocates nothing: a counting global allocator around
//! encrypt -> datagrams -> decrypt -> tun between two in-memory devices, both directions,
//! plain packets and TSO frames (split, encrypted, merged again by GRO), bytes compared; and the
//! io_uring tun reads that feed it.

#[path = "datapath_support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;
use support::{tso_frame, udp_packet, uso_frame, Node, Pair, INNER_A, INNER_B, MSS};

/// Counts allocations made by the current thread while it is measuring.
struct Counting;

thread_local! {
    // `const` initialisers with no destructor: reading them never allocates.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static ALLOCATED_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            ALLOCATIONS.with(|c| c.set(c.get() + 1));
            ALLOCATED_BYTES.with(|c| c.set(c.get() + size as u64));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches only `Cell`s.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with counting on; returns (allocations, bytes) it made on this thread.
fn measure(f: impl FnOnce()) -> (u64, u64) {
    ALLOCATIONS.with(|c| c.set(0));
    ALLOCATED_BYTES.with(|c| c.set(0));
    MEASURING.with(|m| m.set(true));
    f();
    MEASURING.with(|m| m.set(false));
    (ALLOCATIONS.with(Cell::get), ALLOCATED_BYTES.with(Cell::get))
}

/// Packets per direction in the measured region.
const N: u32 = 1000;
/// Frames sent before the receiver is pumped (one tun read batch).
const BATCH: u32 = 8;

/// Sizes of the plain packets, cycling from a bare header to a full 1420-byte MTU.
fn plain_len(i: u32) -> usize {
    28 + (i as usize * 37) % (1420 - 28 + 1)
}

/// TSO payloads: from just over two segments to a full 64 KB segment.
fn tso_payload(i: u32) -> usize {
    let min = 2 * MSS as usize + 1;
    let max = 65535 - 40;
    min + (i as usize * 7919) % (max - min + 1)
}

/// Sends `N` frames `from` -> `to` in batches and checks every one arrived unchanged.
/// `make` writes frame `i` into the buffer and returns its length.
fn run(
    from: &mut Node,
    to: &mut Node,
    vnet: bool,
    frame: &mut [u8],
    expect: &mut [u8],
    make: &dyn Fn(&mut [u8], u32) -> usize,
) -> Result<(), String> {
    let now = Instant::now();
    let mut i = 0;
    while i < N {
        let end = (i + BATCH).min(N);
        for k in i..end {
            let n = make(frame, k);
            from.queue(&mut frame[..n], vnet);
        }
        from.tx.flush(&mut from.io);
        support::deliver(from, to, now);
        if to.io.tun.len() != (end - i) as usize {
            return Err(format!("frames {i}..{end}: {} arrived", to.io.tun.len()));
        }
        for (j, k) in (i..end).enumerate() {
            let n = make(expect, k);
            let (_, got) = to.io.tun.entry(j);
            if got != &expect[..n] {
                return Err(format!(
                    "frame {k} ({n} bytes) arrived changed ({} bytes)",
                    got.len()
                ));
            }
        }
        to.io.tun.clear();
        i = end;
    }
    Ok(())
}

fn check_clean(p: &Pair) {
    for (name, n) in [("A", &p.a), ("B", &p.b)] {
        let drops: Vec<_> = n.counters.all_drops().filter(|(_, c)| *c > 0).collect();
        assert!(drops.is_empty(), "{name} dropped packets: {drops:?}");
        assert_eq!(
            n.io.udp.overflows + n.io.tun.overflows,
            0,
            "{name}'s ring overflowed"
        );
    }
}

/// Moves `N` frames each way once to warm up (the first batch may allocate: thread-locals,
/// the first snapshot guard), then again while counting allocations: there must be none.
fn assert_steady_state_allocates_nothing(
    p: &mut Pair,
    vnet: bool,
    a_to_b: &dyn Fn(&mut [u8], u32) -> usize,
    b_to_a: &dyn Fn(&mut [u8], u32) -> usize,
    what: &str,
) {
    let mut frame = vec![0u8; 65536 + 16];
    let mut expect = vec![0u8; 65536 + 16];
    let Pair { a, b } = p;
    run(a, b, vnet, &mut frame, &mut expect, a_to_b).unwrap();
    run(b, a, vnet, &mut frame, &mut expect, b_to_a).unwrap();
    let mut r = Ok(());
    let (count, bytes) = measure(|| {
        r = run(a, b, vnet, &mut frame, &mut expect, a_to_b)
            .and_then(|_| run(b, a, vnet, &mut frame, &mut expect, b_to_a));
    });
    r.unwrap();
    assert_eq!(
        (count, bytes),
        (0, 0),
        "allocations (count, bytes) while moving {N} {what} each way"
    );
    check_clean(p);
}

#[test]
fn plain_packets_allocate_nothing_in_steady_state() {
    let mut p = Pair::new(false);
    p.handshake();
    let a_to_b = |b: &mut [u8], i: u32| udp_packet(b, INNER_A, INNER_B, i, plain_len(i));
    let b_to_a = |b: &mut [u8], i: u32| udp_packet(b, INNER_B, INNER_A, i, plain_len(i));
    assert_steady_state_allocates_nothing(&mut p, false, &a_to_b, &b_to_a, "plain packets");
}

#[test]
fn tso_frames_allocate_nothing_in_steady_state() {
    let mut p = Pair::new(true);
    p.handshake();
    // Consecutive sequence numbers, as one TCP stream would send them.
    let seq = |i: u32| {
        (0..i)
            .map(|k| tso_payload(k) as u32)
            .fold(1000u32, u32::wrapping_add)
    };
    let a_to_b = |b: &mut [u8], i: u32| tso_frame(b, INNER_A, INNER_B, seq(i), i, tso_payload(i));
    let b_to_a = |b: &mut [u8], i: u32| tso_frame(b, INNER_B, INNER_A, seq(i), i, tso_payload(i));
    assert_steady_state_allocates_nothing(&mut p, true, &a_to_b, &b_to_a, "TSO frames");
}

/// Payload of UDP super-packet `i`: 2 to 50 datagrams of [`USO_SIZE`], the last one shorter
/// (so that consecutive super-packets stay apart when merged again).
fn uso_payload(i: u32) -> usize {
    let n = 2 + (i as usize * 7) % 49;
    n * USO_SIZE as usize - 1 - (i as usize * 31) % 500
}
const USO_SIZE: u16 = 1200;

/// An application's UDP GSO sends: split to encrypt, merged again after decryption (tuns
/// with USO), each arriving as the super-packet it left as.
#[test]
fn uso_super_packets_allocate_nothing_in_steady_state() {
    let mut p = Pair::with_uso();
    p.handshake();
    let a_to_b = |b: &mut [u8], i: u32| uso_frame(b, INNER_A, INNER_B, i, USO_SIZE, uso_payload(i));
    let b_to_a = |b: &mut [u8], i: u32| uso_frame(b, INNER_B, INNER_A, i, USO_SIZE, uso_payload(i));
    assert_steady_state_allocates_nothing(&mut p, true, &a_to_b, &b_to_a, "UDP super-packets");
}

#[test]
fn the_counter_sees_allocations() {
    let (count, bytes) = measure(|| {
        std::hint::black_box(Box::new([0u8; 100]));
    });
    assert_eq!((count, bytes), (1, 100));
}

/// The io_uring tun reader's waits and reaps (the system-call side of a worker's batch): after
/// the first batches, reading frames through it allocates nothing either. A Unix datagram
/// socket stands in for the tun queue (one read, one whole frame).
#[test]
fn uring_reads_allocate_nothing_in_steady_state() {
    use kwire::io::uring::{Reaped, TunRing};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made and are owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut ring = match TunRing::new(b.as_raw_fd(), None, 8, 2048) {
        Ok(r) => r,
        Err(e) if std::env::var("KWIRE_TESTS_STRICT").is_ok_and(|v| v == "1") => {
            panic!("io_uring unavailable: {e} (KWIRE_TESTS_STRICT=1 makes a skip a failure)")
        }
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here: {e}");
            return;
        }
    };
    let frame = [0x42u8; 1420];
    let mut pump = |rounds: u32| {
        let mut got = 0u32;
        for _ in 0..rounds {
            for _ in 0..BATCH {
                // SAFETY: `frame` is valid for reads of its length.
                let n = unsafe { libc::send(a.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                assert_eq!(n, frame.len() as isize);
            }
            let mut left = BATCH;
            while left > 0 {
                ring.wait().expect("io_uring wait");
                ring.reap(|x| match x {
                    Reaped::Frame(f) => {
                        assert_eq!(f.len(), frame.len());
                        left -= 1;
                        got += 1;
                    }
                    Reaped::Ready => {}
                    Reaped::Error(e) => panic!("read failed: {e}"),
                });
            }
        }
        got
    };
    assert_eq!(pump(4), 4 * BATCH);
    let mut got = 0;
    let (allocs, bytes) = measure(|| got = pump(N / BATCH));
    assert_eq!(got, N / BATCH * BATCH);
    assert_eq!(
        (allocs, bytes),
        (0, 0),
        "io_uring tun reads allocated {allocs} times ({bytes} bytes) for {got} frames"
    );
}
