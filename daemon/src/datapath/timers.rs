//! WireGuard's timers: handshake retries, keepalives and rekeys, run for every peer once per
//! [`TIMER_TICK`] by the runtime's timer thread; and the greeting, a handshake with every
//! peer as soon as it has an endpoint (paced by the caller, see [`crate::wg::handshakes`]).

use super::handshake::MSG_INIT;
use super::{DATA_OVERHEAD, MIN_OUT};
use crate::offload::gso::TxBatch;
use crate::wg::device::Peer;
use crate::wg::sessions::MAX_PAIRS;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often peer timers run. boringtun rounds its timers to whole seconds internally; a
/// quarter second keeps handshake retries within the protocol's jitter.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Room a batch needs for what one peer's timers may send: a datagram per `Tunn` (while
/// keys rotate a peer has up to [`MAX_PAIRS`]) and an initiation on the target pair.
pub const TIMER_ROOM: usize = (MAX_PAIRS + 1) * (MIN_OUT + DATA_OVERHEAD);
/// Datagrams one peer's timers may send at most.
pub const TIMER_DATAGRAMS: usize = MAX_PAIRS + 1;

/// Runs `peer`'s timers once; what they send (to its endpoint, if it has one) goes into
/// `batch`, which must have [`TIMER_ROOM`] bytes and [`TIMER_DATAGRAMS`] datagrams free.
/// While keys rotate, every `Tunn` of the peer runs its timers, and the target pair (the
/// peer's next key) gets an initiation when it has no session.
pub fn tick(peer: &Peer, batch: &mut TxBatch) {
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    for s in st.standby.iter_mut() {
        if let TunnResult::WriteToNetwork(p) = s.tunn.update_timers(batch.slot()) {
            let n = p.len();
            if let Some(ep) = endpoint {
                batch.commit(n, ep);
                peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    if let Some(tunn) = st.target_initiation(Instant::now()) {
        if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(batch.slot(), false)
        {
            let n = p.len();
            if let Some(ep) = endpoint {
                batch.commit(n, ep);
                peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    match st.tunn.update_timers(batch.slot()) {
        TunnResult::WriteToNetwork(p) => {
            let (n, init) = (p.len(), p[0] == MSG_INIT as u8);
            if let Some(ep) = endpoint {
                batch.commit(n, ep);
                peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                if init {
                    peer.initiation_sent(&mut st);
                }
            }
        }
        // boringtun gave up on the handshake (REKEY_ATTEMPT_TIME).
        TunnResult::Err(WireGuardError::ConnectionExpired) if st.initiations.expired() => {
            peer.handshakes.timeout.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Whether `peer` still waits for its greeting: the first handshake the device starts on its
/// own, as soon as the peer has an endpoint (after a restart, every restored peer).
pub fn needs_greeting(peer: &Peer) -> bool {
    let st = peer.lock();
    !st.initiations.greeted() && st.endpoint.is_some()
}

/// Greets `peer`: a handshake initiation into `batch` (which must have [`TIMER_ROOM`] bytes
/// free) unless it has a session or a handshake under way. Returns whether an initiation went
/// out (the caller's pace counts only those).
pub fn greet(peer: &Peer, batch: &mut TxBatch) -> bool {
    let mut st = peer.lock();
    let Some(ep) = st.endpoint else {
        return false;
    };
    if !st.initiations.greet() || st.tunn.time_since_last_handshake().is_some() {
        return false;
    }
    let TunnResult::WriteToNetwork(p) = st.tunn.format_handshake_initiation(batch.slot(), false)
    else {
        return false;
    };
    let n = p.len();
    batch.commit(n, ep);
    peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    peer.initiation_sent(&mut st);
    true
}
