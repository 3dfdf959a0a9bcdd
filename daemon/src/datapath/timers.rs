//! WireGuard's timers: handshake retries, keepalives and rekeys, run for every peer once per
//! [`TIMER_TICK`] by the runtime's timer thread.

use super::{DATA_OVERHEAD, MIN_OUT};
use crate::offload::gso::TxBatch;
use crate::wg::device::Peer;
use boringtun::noise::TunnResult;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often peer timers run. boringtun rounds its timers to whole seconds internally; a
/// quarter second keeps handshake retries within the protocol's jitter.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Room a batch needs for what one peer's timers may send.
pub const TIMER_ROOM: usize = MIN_OUT + DATA_OVERHEAD;

/// Runs `peer`'s timers once; what they send (to its endpoint, if it has one) goes into
/// `batch`, which must have [`TIMER_ROOM`] bytes free.
pub fn tick(peer: &Peer, batch: &mut TxBatch) {
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    if let TunnResult::WriteToNetwork(p) = st.tunn.update_timers(batch.slot()) {
        let n = p.len();
        if let Some(ep) = endpoint {
            batch.commit(n, ep);
            peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
