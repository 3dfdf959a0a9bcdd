//! The runtime's half of every packet: it asks the data path ([`crate::datapath`]) what to
//! do with a frame or datagram and does it through [`Io`]: writes to tuns, encryption into
//! UDP GSO batches, GRO coalescing before the tun, and the counters. The worker threads
//! ([`super::workers`]) implement [`Io`] with system calls; tests, benches and fuzz targets
//! with memory.

use crate::datapath::from_tun::{self, TxAction};
use crate::datapath::local::Port;
use crate::datapath::stats::{Counters, DropReason};
use crate::datapath::timers::{self, TIMER_DATAGRAMS, TIMER_ROOM};
use crate::datapath::{Ctx, Receiver, RxAction, Sealed, Sealer};
use crate::offload::gro::Coalescer;
use crate::offload::gso::TxBatch;
use crate::wg::device::Snapshot;
use crate::wg::handshakes::{Pacer, INITIATION_BURST};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Where the runtime's output goes.
pub trait Io {
    /// Writes one frame (virtio-net header + packet when the tuns have offloads) to a port's
    /// tun: a pod's, or the host's.
    fn write_tun(&mut self, to: Port, frame: &[u8]);
    /// Sends every datagram of `batch`, then clears it.
    fn send_udp(&mut self, batch: &mut TxBatch);
}

/// Tag of the host tun in the coalescer; pods use their slot.
const HOST_TAG: u32 = u32::MAX;

fn tag(p: Port) -> u32 {
    match p {
        Port::Host => HOST_TAG,
        Port::Pod(s) => s,
    }
}

fn port(tag: u32) -> Port {
    if tag == HOST_TAG {
        Port::Host
    } else {
        Port::Pod(tag)
    }
}

/// Per-worker state for tun -> network: encrypted datagrams wait in `batch` until it is full
/// or the read batch ends.
pub struct TxPath {
    sealer: Sealer,
    answer: Vec<u8>,
    pub batch: TxBatch,
}

impl Default for TxPath {
    fn default() -> Self {
        Self::new()
    }
}

impl TxPath {
    pub fn new() -> TxPath {
        TxPath {
            sealer: Sealer::new(),
            // An ICMP error quotes at most 1232 bytes; a header and headroom on top.
            answer: vec![0; 2048],
            batch: TxBatch::new(256 * 1024, 256),
        }
    }

    /// One frame read from `from`'s tun: decided, then delivered, encrypted or answered.
    #[inline(always)]
    pub fn frame<T>(&mut self, ctx: &Ctx<'_, T>, from: Port, frame: &mut [u8], io: &mut impl Io) {
        let c = ctx.counters;
        match from_tun::decide(ctx, from, frame, &mut self.answer) {
            TxAction::DeliverToPort(to) => {
                io.write_tun(to, frame);
                c.packets_local.fetch_add(1, Ordering::Relaxed);
            }
            TxAction::EncryptToPeer(peer) => loop {
                match self.sealer.seal(ctx, peer, frame, &mut self.batch) {
                    Sealed::BatchFull => io.send_udp(&mut self.batch),
                    Sealed::Done { datagrams, failed } => {
                        c.packets_tx.fetch_add(datagrams, Ordering::Relaxed);
                        c.drop_n(DropReason::Handshake, failed);
                        break;
                    }
                    Sealed::Drop(r) => {
                        c.drop(r);
                        break;
                    }
                }
            },
            TxAction::Answer { reason, answer } => {
                c.drop(reason);
                io.write_tun(from, answer);
            }
            TxAction::Drop(r) => c.drop(r),
        }
    }

    /// Sends what is pending.
    pub fn flush(&mut self, io: &mut impl Io) {
        if !self.batch.is_empty() {
            io.send_udp(&mut self.batch);
        }
    }
}

/// Per-worker state for network -> tun: decrypted packets wait in the coalescer (TCP
/// segments merged; each is decrypted straight into it) and replies in `replies` until
/// [`RxPath::finish`].
pub struct RxPath {
    receiver: Receiver,
    coalescer: Coalescer,
    pub replies: TxBatch,
    delivered: u64,
}

impl RxPath {
    /// `vnet`: the tun takes virtio-net headers, so TCP segments can be merged.
    pub fn new(vnet: bool) -> RxPath {
        RxPath::with_uso(vnet, false)
    }

    /// [`RxPath::new`], merging the datagrams of a UDP flow too when the tuns take USO.
    pub fn with_uso(vnet: bool, uso: bool) -> RxPath {
        RxPath {
            receiver: Receiver::new(),
            coalescer: Coalescer::new(64, vnet).with_udp(uso),
            // Replies hold a packet boringtun queued during the handshake: up to a whole frame.
            replies: TxBatch::new(128 * 1024, 64),
            delivered: 0,
        }
    }

    /// One received message from `src` (a datagram, or a GRO train of `segment`-sized ones):
    /// every datagram decided, then coalesced for a tun, answered, or counted as dropped.
    pub fn message<T>(
        &mut self,
        ctx: &Ctx<'_, T>,
        src: SocketAddr,
        data: &[u8],
        segment: Option<u16>,
        io: &mut impl Io,
    ) {
        let RxPath {
            receiver,
            coalescer,
            replies,
            delivered,
        } = self;
        let mut m = receiver.message(ctx, src, data, segment);
        loop {
            if coalescer.is_full() {
                coalescer.drain_tagged(|t, f| io.write_tun(port(t), f));
            }
            // Decrypted where the coalescer would copy the packet to: no copy when it continues
            // the frame it landed on (or starts one), one as before otherwise.
            let landing = coalescer.landing(m.next_len());
            let Some(a) = m.next_action_into(coalescer.landing_buf(&landing)) else {
                coalescer.abandon(landing);
                break;
            };
            match a {
                RxAction::DeliverToPort { to, packet } => {
                    let len = packet.len();
                    coalescer.land(landing, len, tag(to));
                    *delivered += 1;
                    continue;
                }
                RxAction::WriteToNetwork { datagram, to } => reply(replies, datagram, to, io),
                RxAction::Answer { reason, answer, to } => {
                    ctx.counters.drop(reason);
                    reply(replies, answer, to, io);
                }
                RxAction::Done => {}
                RxAction::Drop(r) => ctx.counters.drop(r),
            }
            coalescer.abandon(landing);
        }
    }

    /// Writes what is pending to the tuns and the network (once per receive batch).
    pub fn finish(&mut self, counters: &Counters, io: &mut impl Io) {
        self.receiver.end_batch();
        if !self.coalescer.is_empty() {
            self.coalescer.drain_tagged(|t, f| io.write_tun(port(t), f));
        }
        if !self.replies.is_empty() {
            io.send_udp(&mut self.replies);
        }
        counters
            .packets_rx
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
    }
}

/// Queues one datagram for `to`, sending the queue first when it has no room.
fn reply(replies: &mut TxBatch, datagram: &[u8], to: SocketAddr, io: &mut impl Io) {
    if !replies.push(datagram, to) {
        io.send_udp(replies);
        let _ = replies.push(datagram, to);
    }
}

/// Runs the timers of the peers `schedule` says are due (every [`timers::TIMER_TICK`]: the
/// active ones, and a share of the quiet ones); handshake retries, keepalives and rekeys go
/// out through `out`.
pub fn tick_timers(
    snap: &Snapshot,
    schedule: &mut timers::TimerSchedule,
    out: &mut TxBatch,
    io: &mut impl Io,
) {
    let rotating = snap.next_identity.is_some();
    let due = schedule.due(
        snap.peers.len(),
        |i| Arc::as_ptr(&snap.peers[i]) as usize,
        |i| timers::activity(&snap.peers[i]),
        |i| snap.peers[i].persistent_keepalive > 0,
        rotating,
    );
    for i in due {
        if !out.has_room(TIMER_ROOM, TIMER_DATAGRAMS) {
            io.send_udp(out);
        }
        if timers::tick(&snap.peers[i], out) {
            schedule.rest(i);
        }
    }
    if !out.is_empty() {
        io.send_udp(out);
    }
}

/// Greets the peers that still wait for it (a handshake with each as soon as it has an
/// endpoint: after a restart, every restored peer), as many as `pacer` allows at `now`, in
/// snapshot order. Returns whether some peer still waits (call again on the next tick).
pub fn greet_peers(
    snap: &Snapshot,
    pacer: &Pacer,
    now: Instant,
    out: &mut TxBatch,
    io: &mut impl Io,
) -> bool {
    if snap.identity.is_none() {
        // Without a key the peers' sessions are placeholders: nothing to greet with yet.
        return false;
    }
    let mut budget = pacer.take_up_to(INITIATION_BURST, now);
    let mut waiting = false;
    for peer in snap.peers.iter() {
        if !timers::needs_greeting(peer) {
            continue;
        }
        if budget == 0 {
            waiting = true;
            break;
        }
        if !out.has_room(TIMER_ROOM, 1) {
            io.send_udp(out);
        }
        if timers::greet(peer, out) {
            budget -= 1;
        }
    }
    pacer.give_back(budget);
    if !out.is_empty() {
        io.send_udp(out);
    }
    waiting
}
