//! Encryption to a peer: the packets of one tun frame (a TSO segment is cut to the tunnel's
//! size first) become WireGuard data messages in the caller's [`TxBatch`], all under one lock
//! of the peer's session. When the batch fills up mid-frame, sealing stops and resumes after
//! the runtime has sent it, so a frame of any size needs no buffer of its own.

use super::handshake::MSG_INIT;
use super::route::max_packet;
use super::stats::DropReason;
use super::{Ctx, DATA_OVERHEAD, MIN_OUT};
use crate::offload::gso::TxBatch;
use crate::offload::tso::{whole_packet, Segments};
use crate::wg::device::{Peer, PeerState};
use boringtun::noise::{Tunn, TunnResult};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// How sealing one frame ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// Every packet of the frame is in the batch (or queued in the session until its
    /// handshake completes). `failed`: packets boringtun refused (counted as `handshake`).
    Done { datagrams: u64, failed: u64 },
    /// The batch is full: send it, then call [`Sealer::seal`] again with the same frame.
    BatchFull,
    /// Nothing (more) of the frame is sent.
    Drop(DropReason),
}

/// Per-worker state of encryption: the buffer TSO segments are built in and how far the
/// current frame got.
pub struct Sealer {
    scratch: Vec<u8>,
    progress: Option<Progress>,
}

/// Where a frame stopped when the batch filled up.
#[derive(Debug, Clone, Copy)]
struct Progress {
    peer: u32,
    packet: usize,
    tally: Tally,
}

/// What sealing a frame has done so far.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    datagrams: u64,
    failed: u64,
    /// Bytes not yet added to the peer's counter.
    bytes: u64,
    /// boringtun wrote a handshake initiation (no session yet) instead of data.
    initiated: bool,
}

impl Tally {
    /// Encrypts one packet into `batch` (which has room for it) for `endpoint`.
    #[inline]
    fn encrypt(&mut self, tunn: &mut Tunn, pkt: &[u8], endpoint: SocketAddr, batch: &mut TxBatch) {
        match tunn.encapsulate(pkt, batch.slot()) {
            TunnResult::WriteToNetwork(d) => {
                let n = d.len();
                self.initiated |= d[0] == MSG_INIT as u8;
                batch.commit(n, endpoint);
                self.datagrams += 1;
                self.bytes += n as u64;
            }
            TunnResult::Err(_) => self.failed += 1,
            // Queued inside boringtun until the handshake completes.
            _ => {}
        }
    }

    /// Records an initiation written for `peer` (whose state `st` is) on its attempts.
    #[inline]
    fn note_initiation(&mut self, peer: &Peer, st: &mut PeerState) {
        if std::mem::take(&mut self.initiated) {
            peer.initiation_sent(st);
        }
    }

    /// Adds the bytes to `peer`'s counter.
    #[inline]
    fn settle(&mut self, peer: &Peer) {
        peer.tx_bytes
            .fetch_add(std::mem::take(&mut self.bytes), Ordering::Relaxed);
    }

    fn done(self) -> Sealed {
        Sealed::Done {
            datagrams: self.datagrams,
            failed: self.failed,
        }
    }
}

/// Room a datagram carrying a packet of `len` bytes needs (boringtun may write a handshake
/// initiation instead, which is longer than a small packet).
#[inline]
fn room_for(len: usize) -> usize {
    (len + DATA_OVERHEAD).max(MIN_OUT)
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sealer {
    pub fn new() -> Sealer {
        Sealer {
            scratch: vec![0; 65536],
            progress: None,
        }
    }

    /// Encrypts the packets of `frame` for peer `peer` (a snapshot slot) into `batch`, to the
    /// peer's endpoint. After [`Sealed::BatchFull`] the caller sends the batch and calls again
    /// with the same frame and peer; the frame goes on where it stopped.
    #[inline(always)]
    pub fn seal<T>(
        &mut self,
        ctx: &Ctx<'_, T>,
        peer: u32,
        frame: &mut [u8],
        batch: &mut TxBatch,
    ) -> Sealed {
        let Some(p) = ctx.snap.peers.get(peer as usize) else {
            return Sealed::Drop(DropReason::NoPeer);
        };
        if let Some(pkt) = whole_packet(frame, ctx.vnet) {
            // One packet: nothing to cut, nothing to resume.
            if !batch.has_room(room_for(pkt.len()), 1) {
                return Sealed::BatchFull;
            }
            let mut st = p.lock();
            let Some(endpoint) = st.endpoint else {
                return no_endpoint(p);
            };
            let mut tally = Tally::default();
            tally.encrypt(&mut st.tunn, pkt, endpoint, batch);
            tally.note_initiation(p, &mut st);
            drop(st);
            tally.settle(p);
            return tally.done();
        }
        self.seal_segments(ctx, p, peer, frame, batch)
    }

    /// [`Sealer::seal`] for a frame that needs cutting or a checksum: its packets one by one,
    /// resumable after [`Sealed::BatchFull`]. Out of line, so that the one-packet path stays
    /// small where it is inlined.
    #[inline(never)]
    fn seal_segments<T>(
        &mut self,
        ctx: &Ctx<'_, T>,
        p: &Peer,
        peer: u32,
        frame: &mut [u8],
        batch: &mut TxBatch,
    ) -> Sealed {
        let mut at = match self.progress.take() {
            Some(at) if at.peer == peer => at,
            _ => Progress {
                peer,
                packet: 0,
                tally: Tally::default(),
            },
        };
        let mut st = p.lock();
        let Some(endpoint) = st.endpoint else {
            return no_endpoint(p);
        };
        let mut packets = match Segments::new(frame, &mut self.scratch, max_packet(ctx.local)) {
            Ok(s) => s,
            Err(_) => return Sealed::Drop(DropReason::Offload),
        };
        packets.skip(at.packet);
        let need = room_for(packets.max_len());
        let out = loop {
            if !batch.has_room(need, 1) && packets.position() < packets.count() {
                at.packet = packets.position();
                break Sealed::BatchFull;
            }
            match packets.next_packet() {
                Some(Ok(pkt)) => at.tally.encrypt(&mut st.tunn, pkt, endpoint, batch),
                Some(Err(_)) => break Sealed::Drop(DropReason::Offload),
                None => break at.tally.done(),
            }
        };
        at.tally.note_initiation(p, &mut st);
        drop(st);
        at.tally.settle(p);
        if out == Sealed::BatchFull {
            self.progress = Some(at);
        }
        out
    }
}

/// A peer without an endpoint cannot be sent to (yet): counted on the peer too.
fn no_endpoint(p: &Peer) -> Sealed {
    p.tx_dropped.fetch_add(1, Ordering::Relaxed);
    Sealed::Drop(DropReason::NoEndpoint)
}
