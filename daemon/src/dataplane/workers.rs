//! The threads of the packet path: per worker one tun reader (tun -> encrypt -> UDP) and one
//! UDP reader (UDP -> decrypt -> tun); one timer thread. Blocking system calls, buffers owned
//! by each thread, nothing allocated per packet.

use super::apply::{self, Io, RxPath, TxPath};
use super::ports::{Local, PodTun, Pods, HOST_TOKEN};
use crate::datapath::local::Port;
use crate::datapath::stats::{Counters, DropReason};
use crate::datapath::timers::TIMER_TICK;
use crate::datapath::{Ctx, MAX_FRAME};
use crate::io::epoll;
use crate::io::tun::TunQueue;
use crate::io::udp::{RecvBatch, SendScratch, UdpSocket};
use crate::io::uring::{Reaped, TunRing};
use crate::offload::gso::TxBatch;
use crate::wg::device::{NetworkControl, Snapshot};
use crate::wg::Device;
use arc_swap::ArcSwap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Messages per recvmmsg.
pub const RECV_BATCH: usize = 32;
/// Bytes per received message: a whole UDP GRO train.
pub const RECV_MSG_BYTES: usize = 65536;
/// Tun frames read from one tun before the next ready one gets its turn.
pub const TUN_BATCH: usize = 32;
/// How often idle flows are swept from the connection table.
pub const CONNTRACK_SWEEP_SECONDS: u64 = 10;
/// Ready descriptors taken from one epoll wait.
pub const EPOLL_EVENTS: usize = 64;
/// How often the timer thread greets peers that wait for their first handshake.
pub const GREET_TICK: Duration = Duration::from_millis(50);
/// Least time between two log lines about the same repeated I/O error.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A bound socket and whether its reader should stop.
pub struct Bound {
    pub sock: UdpSocket,
    closed: AtomicBool,
}

/// The device's UDP sockets (one per worker, sharing the port with SO_REUSEPORT), swapped
/// whole when the port changes.
#[derive(Clone)]
pub struct Network {
    sockets: Arc<ArcSwap<Vec<Arc<Bound>>>>,
    device: Arc<Device>,
    counters: Arc<Counters>,
    tun_writers: Arc<Mutex<Vec<Arc<TunQueue>>>>,
    pub pods: Arc<Pods>,
    workers: usize,
    vnet: bool,
}

impl Network {
    pub fn new(
        device: Arc<Device>,
        counters: Arc<Counters>,
        workers: usize,
        vnet: bool,
    ) -> io::Result<Network> {
        Ok(Network {
            sockets: Arc::new(ArcSwap::from_pointee(Vec::new())),
            device,
            counters,
            tun_writers: Arc::new(Mutex::new(Vec::new())),
            pods: Arc::new(Pods::new(workers, vnet)?),
            workers,
            vnet,
        })
    }

    fn socket_for(&self, worker: usize) -> Option<Arc<Bound>> {
        let s = self.sockets.load();
        (!s.is_empty()).then(|| s[worker % s.len()].clone())
    }
}

impl NetworkControl for Network {
    fn bind(&mut self, port: u16, fwmark: u32) -> io::Result<u16> {
        let first = UdpSocket::bind(port, true, fwmark)?;
        let port = first.port();
        let mut socks = vec![Arc::new(Bound {
            sock: first,
            closed: AtomicBool::new(false),
        })];
        for _ in 1..self.workers {
            socks.push(Arc::new(Bound {
                sock: UdpSocket::bind(port, true, fwmark)?,
                closed: AtomicBool::new(false),
            }));
        }
        let old = self.sockets.swap(Arc::new(socks.clone()));
        for b in old.iter() {
            b.closed.store(true, Ordering::Relaxed);
            b.sock.shutdown();
        }
        let writers = self
            .tun_writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (i, b) in socks.into_iter().enumerate() {
            let tun = writers[i % writers.len().max(1)].clone();
            spawn_udp_reader(i, b, tun, self.clone())?;
        }
        info!(port, "listening for WireGuard");
        Ok(port)
    }

    fn set_fwmark(&mut self, fwmark: u32) -> io::Result<()> {
        for b in self.sockets.load().iter() {
            b.sock.set_fwmark(fwmark)?;
        }
        Ok(())
    }
}

/// Logs a repeated error at most once per [`ERROR_LOG_INTERVAL`].
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            last: None,
            suppressed: 0,
        }
    }
    fn log(&mut self, what: &str, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_INTERVAL)
        {
            warn!(error = %e, suppressed = self.suppressed, "{what}");
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// The system calls a worker makes for the runtime.
struct WorkerIo<'a> {
    tun: &'a TunQueue,
    local: &'a Local,
    sock: Option<Arc<Bound>>,
    scratch: &'a mut SendScratch,
    counters: &'a Counters,
    tun_err: &'a mut Throttle,
    udp_err: &'a mut Throttle,
}

impl Io for WorkerIo<'_> {
    fn write_tun(&mut self, port: Port, frame: &[u8]) {
        let tun = match port {
            Port::Host => self.tun,
            Port::Pod(s) => match self.local.io(s) {
                Some(t) => t,
                None => return,
            },
        };
        if let Err(e) = tun.write(frame) {
            self.counters.drop(DropReason::TunWrite);
            self.tun_err.log("writing to a tun", &e);
        }
    }

    fn send_udp(&mut self, batch: &mut TxBatch) {
        match &self.sock {
            Some(b) => {
                if let Err(e) = b.sock.send_batch(batch, self.scratch) {
                    self.counters.drop(DropReason::UdpSend);
                    self.udp_err.log("sending WireGuard datagrams", &e);
                }
            }
            None => self.counters.drop_n(
                DropReason::UdpSend,
                batch.groups().iter().map(|g| g.count as u64).sum(),
            ),
        }
        batch.clear();
    }
}

/// The context of one batch of reads.
fn batch_ctx<'a>(
    snap: &'a Snapshot,
    local: &'a Local,
    counters: &'a Counters,
    device: &'a Device,
    vnet: bool,
) -> Ctx<'a, PodTun> {
    Ctx {
        snap,
        local,
        counters,
        limiter: &device.source_limiter,
        pacer: &device.pacer,
        now: Instant::now(),
        vnet,
    }
}

/// How a worker reads its queue of the host tun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TunIo {
    /// One `read(2)` per frame after epoll reports the queue readable (the default).
    Read,
    /// io_uring: one multishot read per queue fills up to [`URING_BUFFERS`] frames per
    /// system call; falls back to `read` where the kernel (before 6.7) or a seccomp profile
    /// refuses it. Opt-in: the tunnel harness has not shown it faster here (README).
    Uring,
}

impl TunIo {
    /// The environment variable that chooses it (`read` or `uring`) for `kwire agent`;
    /// `kwire tunnel --tun-io` reads it too.
    pub const ENV: &'static str = "KWIRE_TUN_IO";

    /// The mode [`TunIo::ENV`] names; the default ([`TunIo::Read`]) when unset or unknown.
    pub fn from_env() -> TunIo {
        match std::env::var(Self::ENV).as_deref() {
            Ok("uring") => TunIo::Uring,
            Ok("read") | Err(_) => TunIo::Read,
            Ok(other) => {
                warn!(
                    value = other,
                    "{} takes `read` or `uring`; using read",
                    Self::ENV
                );
                TunIo::Read
            }
        }
    }
}

/// Buffers of one worker's io_uring (each [`MAX_FRAME`] bytes): at most this many frames
/// are read per system call.
pub const URING_BUFFERS: u16 = 32;

/// Starts worker `i`'s tun reader: its queue of the host tun and the pods assigned to it.
pub fn spawn_tun_reader(
    i: usize,
    q: TunQueue,
    device: Arc<Device>,
    counters: Arc<Counters>,
    net: Network,
    tun_io: TunIo,
) -> io::Result<()> {
    let q = Arc::new(q);
    net.tun_writers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(q.clone());
    let ep = net.pods.epolls[i % net.pods.epolls.len()].clone();
    if tun_io == TunIo::Read {
        read_host_with_epoll(&q, &ep)?;
    }
    std::thread::Builder::new()
        .name(format!("kwire-tun-{i}"))
        .spawn(move || {
            // The ring is made on the thread that uses it (it is single-issuer).
            let ring = (tun_io == TunIo::Uring)
                .then(|| open_ring(i, &q, &ep))
                .flatten();
            tun_reader(i, q, ep, ring, device, counters, net)
        })?;
    Ok(())
}

/// Serves the host queue from the worker's epoll, with non-blocking reads.
fn read_host_with_epoll(q: &TunQueue, ep: &epoll::Epoll) -> io::Result<()> {
    q.set_nonblocking(true)?;
    ep.add(q.as_raw_fd(), HOST_TOKEN)
}

/// The io_uring for worker `i`'s host queue, or None (after switching the queue to epoll and
/// `read`) where it cannot be had.
fn open_ring(i: usize, q: &TunQueue, ep: &epoll::Epoll) -> Option<TunRing> {
    use std::os::fd::AsRawFd;
    // The multishot read must block in the kernel (a non-blocking file ends it with EAGAIN).
    let ring = q.set_nonblocking(false).and_then(|()| {
        TunRing::new(
            q.as_raw_fd(),
            Some(ep.as_raw_fd()),
            URING_BUFFERS,
            MAX_FRAME,
        )
    });
    match ring {
        Ok(r) => {
            info!(
                worker = i,
                buffers = URING_BUFFERS,
                "tun reads through io_uring"
            );
            Some(r)
        }
        Err(e) => {
            info!(worker = i, error = %e, "io_uring refused (kernel before 6.7 or a seccomp profile); tun reads with read(2)");
            fall_back(i, q, ep);
            None
        }
    }
}

/// Worker `i` stops using its io_uring after an error and reads with `read(2)` from now on.
fn give_up_ring(
    i: usize,
    ring: &mut Option<TunRing>,
    q: &TunQueue,
    ep: &epoll::Epoll,
    doing: &str,
    e: &io::Error,
) {
    warn!(worker = i, error = %e, "{doing} io_uring failed; tun reads with read(2) from now on");
    *ring = None;
    fall_back(i, q, ep);
}

fn fall_back(i: usize, q: &TunQueue, ep: &epoll::Epoll) {
    if let Err(e) = read_host_with_epoll(q, ep) {
        warn!(worker = i, error = %e, "cannot watch the tun queue; this worker reads no frames from the host");
    }
}

/// Appends the ready `tokens` to `ready` after its first `n`; returns the new count.
fn take(tokens: impl Iterator<Item = u64>, ready: &mut [u64], mut n: usize) -> usize {
    for t in tokens {
        ready[n] = t;
        n += 1;
    }
    n
}

/// A worker's tun reader: waits on its io_uring (host queue, then the pods' epoll when that
/// is ready) or on the epoll alone (everything), and puts what it reads through the runtime.
fn tun_reader(
    i: usize,
    q: Arc<TunQueue>,
    ep: Arc<epoll::Epoll>,
    mut ring: Option<TunRing>,
    device: Arc<Device>,
    counters: Arc<Counters>,
    net: Network,
) {
    let vnet = q.offload();
    let mut frame = vec![0u8; MAX_FRAME];
    let mut tx = TxPath::new();
    let mut scratch = SendScratch::new();
    let mut events = epoll::events(EPOLL_EVENTS);
    let mut ready = [0u64; EPOLL_EVENTS];
    let (mut tun_err, mut udp_err, mut read_err) =
        (Throttle::new(), Throttle::new(), Throttle::new());
    loop {
        if let Some(Err(e)) = ring.as_mut().map(TunRing::wait) {
            give_up_ring(i, &mut ring, &q, &ep, "waiting on", &e);
            continue;
        }
        let mut n = 0;
        if ring.is_none() {
            match ep.wait(&mut events, -1) {
                Ok(tokens) => n = take(tokens, &mut ready, n),
                Err(e) => {
                    read_err.log("waiting for tun frames", &e);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let snap = device.snapshot();
        let local = net.pods.table();
        let ctx = batch_ctx(&snap, &local, &counters, &device, vnet);
        let mut wio = WorkerIo {
            tun: &q,
            local: &local,
            sock: net.socket_for(i),
            scratch: &mut scratch,
            counters: &counters,
            tun_err: &mut tun_err,
            udp_err: &mut udp_err,
        };
        if let Some(r) = ring.as_mut() {
            let (mut pods, mut failed) = (false, None);
            r.reap(|got| match got {
                Reaped::Frame(f) => tx.frame(&ctx, Port::Host, f, &mut wio),
                Reaped::Ready => pods = true,
                Reaped::Error(e) => failed = Some(e),
            });
            if let Some(e) = failed {
                give_up_ring(i, &mut ring, &q, &ep, "reading the tun through", &e);
            }
            if pods {
                if let Ok(tokens) = ep.wait(&mut events, 0) {
                    n = take(tokens, &mut ready, n);
                }
            }
        }
        for &token in &ready[..n] {
            let (port, src): (Port, &TunQueue) = if token == HOST_TOKEN {
                (Port::Host, &q)
            } else {
                match local.slot_for_id(token) {
                    Some(s) => (Port::Pod(s), &local.pods[s as usize].io),
                    None => continue, // detached since the wait
                }
            };
            for _ in 0..TUN_BATCH {
                match src.read(&mut frame) {
                    Ok(len) => tx.frame(&ctx, port, &mut frame[..len], &mut wio),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        read_err.log("reading from a tun", &e);
                        break;
                    }
                }
            }
        }
        tx.flush(&mut wio);
    }
}

/// Starts the thread that reads one UDP socket until it is replaced.
fn spawn_udp_reader(i: usize, b: Arc<Bound>, tun: Arc<TunQueue>, net: Network) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("kwire-udp-{i}"))
        .spawn(move || {
            let vnet = net.vnet && tun.offload();
            let mut rx = RxPath::with_uso(vnet, tun.uso());
            let mut batch = RecvBatch::new(RECV_BATCH, RECV_MSG_BYTES);
            let mut scratch = SendScratch::new();
            let (mut tun_err, mut udp_err, mut recv_err) =
                (Throttle::new(), Throttle::new(), Throttle::new());
            let counters = net.counters.clone();
            let device = net.device.clone();
            loop {
                let n = match b.sock.recv_batch(&mut batch) {
                    Ok(n) => n,
                    Err(e) => {
                        if b.closed.load(Ordering::Relaxed) {
                            return;
                        }
                        recv_err.log("receiving WireGuard datagrams", &e);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if b.closed.load(Ordering::Relaxed) {
                    return;
                }
                let snap = device.snapshot();
                let local = net.pods.table();
                let ctx = batch_ctx(&snap, &local, &counters, &device, vnet);
                let mut wio = WorkerIo {
                    tun: &tun,
                    local: &local,
                    sock: Some(b.clone()),
                    scratch: &mut scratch,
                    counters: &counters,
                    tun_err: &mut tun_err,
                    udp_err: &mut udp_err,
                };
                for k in 0..n {
                    let m = batch.get(k);
                    let Some(src) = m.src else { continue };
                    rx.message(&ctx, src, m.data, m.segment, &mut wio);
                }
                rx.finish(&counters, &mut wio);
            }
        })?;
    Ok(())
}

/// Starts the timer thread: greetings every [`GREET_TICK`] while peers wait for them, peer
/// timers every tick, rate limiter reset every second.
pub fn spawn_timers(device: Arc<Device>, net: Network) -> io::Result<()> {
    std::thread::Builder::new()
        .name("kwire-timers".into())
        .spawn(move || {
            let mut out = TxBatch::new(64 * 1024, 64);
            let mut scratch = SendScratch::new();
            let (mut a, mut b) = (Throttle::new(), Throttle::new());
            let tun = net.tun_writers.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
            let ticks_per_second = (1000 / TIMER_TICK.as_millis()).max(1) as u64;
            let wakes_per_tick = (TIMER_TICK.as_millis() / GREET_TICK.as_millis()).max(1) as u64;
            let (mut wakes, mut ticks) = (0u64, 0u64);
            // The greeting epoch whose peers were all greeted, if any.
            let mut greeted: Option<u64> = None;
            let mut schedule = crate::datapath::timers::TimerSchedule::default();
            loop {
                // Greetings every GREET_TICK (a restarted device handshakes within one),
                // peer timers every TIMER_TICK.
                std::thread::sleep(GREET_TICK);
                wakes += 1;
                let timers_due = wakes.is_multiple_of(wakes_per_tick);
                let snap = device.snapshot();
                let greet = greeted != Some(snap.greet_epoch);
                if !greet && !timers_due {
                    continue;
                }
                let local = net.pods.table();
                let mut wio = WorkerIo {
                    tun: &tun,
                    local: &local,
                    sock: net.socket_for(0),
                    scratch: &mut scratch,
                    counters: &net.counters,
                    tun_err: &mut a,
                    udp_err: &mut b,
                };
                if greet {
                    let waiting = apply::greet_peers(
                        &snap,
                        &device.pacer,
                        Instant::now(),
                        &mut out,
                        &mut wio,
                    );
                    greeted = (!waiting).then_some(snap.greet_epoch);
                }
                if !timers_due {
                    continue;
                }
                apply::tick_timers(&snap, &mut schedule, &mut out, &mut wio);
                ticks += 1;
                if ticks.is_multiple_of(ticks_per_second) {
                    for id in snap.identity.iter().chain(&snap.next_identity) {
                        id.rate_limiter.reset_count();
                    }
                    device.source_limiter.prune(Instant::now());
                }
                if ticks.is_multiple_of(ticks_per_second * CONNTRACK_SWEEP_SECONDS) {
                    net.pods.conntrack.expire();
                    net.pods.nat.expire();
                }
            }
        })?;
    Ok(())
}
