//! Encryption to a peer: the packets of one tun frame (a TSO segment is cut to the tunnel's
//! size first) become WireGuard data messages in the caller's [`TxBatch`], all under one lock
//! of the peer's session. When the batch fills up mid-frame, sealing stops and resumes after
//! the runtime has sent it, so a frame of any size needs no buffer of its own.

use super::route::max_packet;
use super::stats::DropReason;
use super::{Ctx, DATA_OVERHEAD, MIN_OUT};
use crate::offload::gso::TxBatch;
use crate::offload::tso::Segments;
use boringtun::noise::TunnResult;
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
    datagrams: u64,
    failed: u64,
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
    pub fn seal<T>(
        &mut self,
        ctx: &Ctx<'_, T>,
        peer: u32,
        frame: &mut [u8],
        batch: &mut TxBatch,
    ) -> Sealed {
        let mut at = match self.progress.take() {
            Some(p) if p.peer == peer => p,
            _ => Progress {
                peer,
                packet: 0,
                datagrams: 0,
                failed: 0,
            },
        };
        let Some(p) = ctx.snap.peers.get(peer as usize) else {
            return Sealed::Drop(DropReason::NoPeer);
        };
        let mut st = p.lock();
        let Some(endpoint) = st.endpoint else {
            p.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return Sealed::Drop(DropReason::NoEndpoint);
        };
        let mut packets = if ctx.vnet {
            match Segments::new(frame, &mut self.scratch, max_packet(ctx.local)) {
                Ok(s) => s,
                Err(_) => return Sealed::Drop(DropReason::Offload),
            }
        } else {
            Segments::plain(frame, &mut self.scratch)
        };
        packets.skip(at.packet);
        let need = (packets.max_len() + DATA_OVERHEAD).max(MIN_OUT);
        let mut bytes = 0u64;
        let out = loop {
            if packets.position() >= packets.count() {
                break Sealed::Done {
                    datagrams: at.datagrams,
                    failed: at.failed,
                };
            }
            if !batch.has_room(need, 1) {
                at.packet = packets.position();
                self.progress = Some(at);
                break Sealed::BatchFull;
            }
            let pkt = match packets.next_packet() {
                Some(Ok(pkt)) => pkt,
                Some(Err(_)) => break Sealed::Drop(DropReason::Offload),
                None => continue,
            };
            match st.tunn.encapsulate(pkt, batch.slot()) {
                TunnResult::WriteToNetwork(d) => {
                    let n = d.len();
                    batch.commit(n, endpoint);
                    at.datagrams += 1;
                    bytes += n as u64;
                }
                TunnResult::Err(_) => at.failed += 1,
                // Queued inside boringtun until the handshake completes.
                _ => {}
            }
        };
        drop(st);
        p.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        out
    }
}
