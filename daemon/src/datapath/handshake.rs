//! Admission of handshake messages, cheapest check first: the device must have a key; an
//! initiation must carry a valid MAC1 (and, while the device is under load, a MAC2 from a
//! cookie we sent, else it gets a cookie reply); its source must be under its rate; only then
//! the Diffie-Hellman that reveals the initiator's static key, which must be a peer's. A
//! response or cookie must name a session index we gave out.
//!
//! While the device rotates its key it holds two (current and next) and answers initiations
//! addressed to either: MAC1 is keyed on the receiver's public key, so checking it against
//! both tells which key an initiation is for before any Diffie-Hellman. The peer's `Tunn`
//! for that pair of keys (ours, the initiator's) takes it ([`Via`]).

use super::stats::DropReason;
use super::Ctx;
use crate::wg::device::Identity;
use crate::wg::sessions::{Pair, Via};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};
use kwire_proto::key::PublicKey;
use std::net::SocketAddr;
use std::ops::Range;

/// WireGuard message types (the first byte; the next three are zero).
pub const MSG_INIT: u32 = 1;
pub const MSG_RESPONSE: u32 = 2;
pub const MSG_COOKIE: u32 = 3;
pub const MSG_DATA: u32 = 4;

/// The outcome of admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The message is for the peer in this snapshot slot: hand it to its `Tunn` for `Via`.
    Peer(u32, Via),
    /// Under load without a valid cookie: answer with the cookie reply written at this range
    /// of the output buffer; the initiation itself is dropped (`rate_limited`).
    Cookie(Range<usize>),
    /// Refused.
    Drop(DropReason),
}

/// Admits a handshake message of type `kind` from `src`. `out` receives a cookie reply when
/// one is due.
pub fn admit<T>(
    ctx: &Ctx<'_, T>,
    kind: u32,
    src: SocketAddr,
    d: &[u8],
    out: &mut [u8],
) -> Admission {
    let Some(current) = &ctx.snap.identity else {
        return Admission::Drop(DropReason::NoKey);
    };
    match kind {
        MSG_INIT => {
            // MAC1, and under load a cookie, before any Diffie-Hellman. A MAC1 that is not
            // for the current key may be for the next one.
            let base = out.as_ptr() as usize;
            let mut id: &Identity = current;
            let mut verified = id.rate_limiter.verify_packet(Some(src.ip()), d, out);
            if let (Err(TunnResult::Err(WireGuardError::InvalidMac)), Some(next)) =
                (&verified, &ctx.snap.next_identity)
            {
                id = next;
                verified = id.rate_limiter.verify_packet(Some(src.ip()), d, out);
            }
            let init = match verified {
                Ok(Packet::HandshakeInit(init)) => init,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let start = cookie.as_ptr() as usize - base;
                    return Admission::Cookie(start..start + cookie.len());
                }
                Err(TunnResult::Err(WireGuardError::InvalidPacket)) => {
                    return Admission::Drop(DropReason::Malformed)
                }
                Err(TunnResult::Err(_)) => return Admission::Drop(DropReason::Handshake),
                _ => return Admission::Drop(DropReason::Malformed),
            };
            if !ctx.limiter.allow(src.ip(), ctx.now) {
                return Admission::Drop(DropReason::RateLimited);
            }
            let Ok(half) = parse_handshake_anon(&id.secret, &id.public, &init) else {
                return Admission::Drop(DropReason::Handshake);
            };
            match ctx.snap.by_key.get(&half.peer_static_public) {
                Some(slot) => Admission::Peer(
                    *slot,
                    Via::Pair(Pair {
                        local: id.public_key(),
                        remote: PublicKey(half.peer_static_public),
                    }),
                ),
                None => Admission::Drop(DropReason::Handshake),
            }
        }
        MSG_RESPONSE | MSG_COOKIE if d.len() >= 12 => {
            // The receiver index follows the sender index in a response, the type in a cookie.
            let at = if kind == MSG_RESPONSE { 8 } else { 4 };
            let idx = u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
            match ctx.snap.peer_for_index(idx) {
                Some((slot, _)) => Admission::Peer(slot, Via::Index(idx >> 8)),
                None => Admission::Drop(DropReason::UnknownSession),
            }
        }
        _ => Admission::Drop(DropReason::Malformed),
    }
}
