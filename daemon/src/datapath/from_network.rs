//! The pipeline of a message read from the network (one datagram, or a GRO train of equal
//! datagrams from one source): each datagram is a data message for a session or a handshake
//! message, and becomes one action. A data message passes the session (decrypt, replay
//! window), cryptokey routing (the inner source must be in the sending peer's allowed IPs:
//! boringtun's `noise` does not check it), local delivery and the destination pod's ingress
//! policy. A peer's session is locked once for consecutive datagrams from it, not per
//! datagram.

use super::handshake::{self, Admission, MSG_COOKIE, MSG_DATA, MSG_INIT, MSG_RESPONSE};
use super::local::{addresses, Port};
use super::stats::DropReason;
use super::{policy, route, service, Ctx, DATA_OVERHEAD, MAX_FRAME};
use crate::wg::device::{Peer, PeerState, Snapshot};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

/// The longest UDP payload (65535 bytes of UDP length, less its 8-byte header).
pub const MAX_DATAGRAM: usize = 65535 - 8;

/// The receive buffer takes any datagram's plaintext and any queued packet re-encrypted.
const RECEIVE_BUFFER: usize = MAX_FRAME + DATA_OVERHEAD;
const _: () = assert!(MAX_DATAGRAM - 16 <= RECEIVE_BUFFER);

/// What to do with one received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum RxAction<'a> {
    /// Write the decrypted packet to this port's tun (the runtime merges TCP segments first).
    DeliverToPort { to: Port, packet: &'a [u8] },
    /// Send this datagram to `to`: a handshake response, a keepalive, or a packet the session
    /// queued while its handshake was under way.
    WriteToNetwork { datagram: &'a [u8], to: SocketAddr },
    /// Drop the datagram for `reason` and answer its sender with `answer` (a cookie reply: the
    /// device is under load and the initiation carried no valid cookie).
    Answer {
        reason: DropReason,
        answer: &'a [u8],
        to: SocketAddr,
    },
    /// Taken, nothing to send or deliver (a keepalive, a cookie, a handshake in progress).
    Done,
    /// Drop the datagram.
    Drop(DropReason),
}

/// Handshake initiations decided per receive batch (up to 32 datagrams); past it they are dropped
/// (`rate_limited`) before any cryptography. A worker that keeps up sees small batches and never
/// reaches it; one that falls behind under a flood would otherwise answer cookies while data
/// waits behind them in the same socket (wireguard-go drops past a full handshake queue alike).
pub const MAX_HANDSHAKES_PER_BATCH: usize = 8;

/// Per-worker state of the receive side: the buffer messages are decrypted into, and the
/// handshake messages decided in this batch.
pub struct Receiver {
    buf: Vec<u8>,
    handshakes: usize,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    pub fn new() -> Receiver {
        Receiver {
            buf: vec![0; RECEIVE_BUFFER],
            handshakes: 0,
        }
    }

    /// A new receive batch: the handshake budget ([`MAX_HANDSHAKES_PER_BATCH`]) is whole again.
    pub fn end_batch(&mut self) {
        self.handshakes = 0;
    }

    /// Starts on one received message from `src`: a datagram, or a GRO train of
    /// `segment`-sized ones. Take its actions with [`Message::next_action`] until `None`.
    pub fn message<'r, 's, T>(
        &'r mut self,
        ctx: &'r Ctx<'s, T>,
        src: SocketAddr,
        data: &'r [u8],
        segment: Option<u16>,
    ) -> Message<'r, 's, T> {
        let seg = segment.map_or(data.len(), |s| s as usize).max(1);
        Message {
            snap: ctx.snap,
            ctx,
            buf: &mut self.buf,
            handshakes: &mut self.handshakes,
            src,
            datagrams: data.chunks(seg),
            held: None,
            queued: None,
            in_dst: false,
        }
    }
}

/// One received message being decided, datagram by datagram.
pub struct Message<'r, 's, T> {
    ctx: &'r Ctx<'s, T>,
    snap: &'s Snapshot,
    buf: &'r mut [u8],
    handshakes: &'r mut usize,
    src: SocketAddr,
    datagrams: std::slice::Chunks<'r, u8>,
    /// The session of the last data message's peer, locked until another peer's comes.
    held: Option<Held<'s>>,
    /// After a handshake message: the peer (slot, session index) whose queued packets go out next.
    queued: Option<(u32, u32)>,
    /// The last step's bytes are in the caller's buffer ([`Message::next_action_into`]), not
    /// the receive buffer.
    in_dst: bool,
}

/// A peer's session held across consecutive datagrams from it, with the bytes to add to its
/// counter on release.
struct Held<'s> {
    slot: u32,
    st: MutexGuard<'s, PeerState>,
    rx_bytes: u64,
}

/// An action with its bytes as a range of the receive buffer.
enum Step {
    Deliver {
        to: Port,
        at: Range<usize>,
    },
    Write {
        at: Range<usize>,
        to: SocketAddr,
    },
    Answer {
        reason: DropReason,
        at: Range<usize>,
        to: SocketAddr,
    },
    Done,
    Drop(DropReason),
}

impl From<DropReason> for Step {
    fn from(r: DropReason) -> Step {
        Step::Drop(r)
    }
}

/// A step as an action, its bytes in `buf`.
#[inline(always)]
fn action(step: Step, buf: &[u8]) -> RxAction<'_> {
    match step {
        Step::Deliver { to, at } => RxAction::DeliverToPort {
            to,
            packet: &buf[at],
        },
        Step::Write { at, to } => RxAction::WriteToNetwork {
            datagram: &buf[at],
            to,
        },
        Step::Answer { reason, at, to } => RxAction::Answer {
            reason,
            answer: &buf[at],
            to,
        },
        Step::Done => RxAction::Done,
        Step::Drop(r) => RxAction::Drop(r),
    }
}

/// Where `part` (returned by boringtun from the buffer that started at `base`) lies in it.
fn range_in(base: usize, part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base;
    start..start + part.len()
}

impl<T> Message<'_, '_, T> {
    /// The next action, or `None` when every datagram of the message is decided. (Not an
    /// `Iterator`: each action borrows the receive buffer until the next call.)
    #[inline(always)]
    pub fn next_action(&mut self) -> Option<RxAction<'_>> {
        let step = self.step(None)?;
        Some(action(step, self.buf))
    }

    /// Like [`Message::next_action`], with a data message decrypted into `dst` instead of the
    /// receive buffer: a packet to deliver then starts at `dst[0]` (the runtime passes where
    /// its coalescer would copy the packet to, so the packet needs no copy). `dst` takes any
    /// datagram no longer than [`Message::next_len`] (shorter: it is dropped as malformed).
    #[inline(always)]
    pub fn next_action_into<'x>(&'x mut self, dst: &'x mut [u8]) -> Option<RxAction<'x>> {
        let step = self.step(Some(&mut *dst))?;
        let buf: &[u8] = if self.in_dst { dst } else { self.buf };
        Some(action(step, buf))
    }

    /// The length of the datagram the next action decides (0 when the next action is a packet
    /// queued during a handshake, or there is none).
    #[inline]
    pub fn next_len(&self) -> usize {
        if self.queued.is_some() {
            return 0;
        }
        self.datagrams.clone().next().map_or(0, <[u8]>::len)
    }

    #[inline(always)]
    fn step(&mut self, dst: Option<&mut [u8]>) -> Option<Step> {
        self.in_dst = false;
        if let Some(slot) = self.queued {
            match self.queued_packet(slot) {
                Some(s) => return Some(s),
                None => self.queued = None,
            }
        }
        let d = self.datagrams.next()?;
        let kind = match d {
            [a, b, c, e, ..] => u32::from_le_bytes([*a, *b, *c, *e]),
            _ => 0,
        };
        if kind == MSG_DATA && d.len() >= DATA_OVERHEAD {
            let idx = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
            let Some((slot, peer)) = self.snap.peer_for_index(idx) else {
                release(self.snap, self.held.take());
                return Some(self.unknown_session());
            };
            if self.held.as_ref().map(|h| h.slot) != Some(slot) {
                release(self.snap, self.held.take());
                self.held = Some(Held {
                    slot,
                    st: peer.lock(),
                    rx_bytes: 0,
                });
            }
            let step = match dst {
                Some(out) => {
                    self.in_dst = true;
                    self.data(d, idx >> 8, out)
                }
                None => {
                    let out = std::mem::take(&mut self.buf);
                    let step = self.data(d, idx >> 8, out);
                    self.buf = out;
                    step
                }
            };
            Some(step.unwrap_or_else(Step::from))
        } else {
            release(self.snap, self.held.take());
            // Initiations are what a flood sends (anyone may, and each costs a Diffie-Hellman);
            // responses and cookies must name a session index we gave out, checked first.
            if kind == MSG_INIT {
                if *self.handshakes >= MAX_HANDSHAKES_PER_BATCH {
                    return Some(Step::Drop(DropReason::RateLimited));
                }
                *self.handshakes += 1;
            }
            Some(self.handshake(kind, d))
        }
    }

    /// A data message for the held session, decrypted into `out`; the step's ranges are in it.
    #[inline(always)]
    fn data(&mut self, d: &[u8], index: u32, out: &mut [u8]) -> Result<Step, DropReason> {
        // No UDP datagram is longer, but this function takes any bytes; the check also keeps
        // boringtun, which panics when the ciphertext exceeds the output buffer, safe.
        if d.len() > MAX_DATAGRAM || d.len() > out.len() {
            return Err(DropReason::Malformed);
        }
        let h = self.held.as_mut().expect("held by step()");
        let base = out.as_ptr() as usize;
        // The peer's `Tunn` for this index (while keys rotate, a peer has several).
        let tunn = h.st.session(index).ok_or(DropReason::UnknownSession)?;
        let (at, inner_src) = match tunn.decapsulate(Some(self.src.ip()), d, out) {
            TunnResult::WriteToTunnelV4(p, a) => (range_in(base, p), IpAddr::V4(a)),
            TunnResult::WriteToTunnelV6(p, a) => (range_in(base, p), IpAddr::V6(a)),
            TunnResult::Done => {
                // An authenticated keepalive.
                h.rx_bytes += d.len() as u64;
                roam(&mut h.st, self.src);
                h.st.received(index);
                return Ok(Step::Done);
            }
            TunnResult::WriteToNetwork(p) => {
                return Ok(Step::Write {
                    at: range_in(base, p),
                    to: self.src,
                })
            }
            TunnResult::Err(e) => return Err(DropReason::from_wireguard(&e)),
        };
        h.rx_bytes += d.len() as u64;
        roam(&mut h.st, self.src);
        h.st.received(index);
        // Cryptokey routing: boringtun does not check the inner source against allowed IPs.
        if self.snap.routes.lookup(inner_src) != Some(h.slot) {
            return Err(DropReason::NotAllowedIp);
        }
        let pkt = &out[at.clone()];
        let (_, dst) = addresses(pkt).ok_or(DropReason::NoRoute)?;
        let to = match route::decrypted(self.ctx.local, dst) {
            Ok(to) => to,
            // An external Peer's flow to a ClusterIP: served here, through the host's
            // masquerade (`service::from_peer`).
            Err(_) if service::from_peer(self.ctx.local, pkt) => Port::Host,
            Err(e) => return Err(e),
        };
        policy::ingress(self.ctx.local, to, false, pkt)?;
        // A reply from a Service's backend on another node: policy judged the real
        // addresses, the client sees the Service's. (Decrypted packets carry full checksums.)
        service::reverse(self.ctx.local, &mut out[at.clone()], false);
        Ok(Step::Deliver { to, at })
    }

    /// A data message for a session we do not know (we restarted, or the peer kept a session
    /// we dropped): dropped, and if it comes from a peer's endpoint, answered with a handshake
    /// initiation to that peer (at most one per peer per `TRIGGER_INTERVAL`, within the
    /// device's pace). The peer switches to the new session on our keepalive that completes it.
    #[inline(never)]
    fn unknown_session(&mut self) -> Step {
        let drop = Step::Drop(DropReason::UnknownSession);
        let Some(&slot) = self.snap.by_endpoint.get(&self.src) else {
            return drop;
        };
        if self.snap.identity.is_none() {
            return drop;
        }
        let peer = &self.snap.peers[slot as usize];
        let mut st = peer.lock();
        // The pace is asked only when the peer's own limit allows: a token is never taken for
        // nothing, and a refused pace does not hold the peer back for the whole interval.
        if !st.initiations.trigger_due(self.ctx.now) || !self.ctx.pacer.take(self.ctx.now) {
            return drop;
        }
        st.initiations.triggered(self.ctx.now);
        let base = self.buf.as_ptr() as usize;
        let at = match st.tunn.format_handshake_initiation(self.buf, false) {
            TunnResult::WriteToNetwork(p) => range_in(base, p),
            // One is under way already: its retries do the rest.
            _ => {
                self.ctx.pacer.give_back(1);
                return drop;
            }
        };
        peer.initiation_sent(&mut st);
        peer.handshakes.triggered.fetch_add(1, Ordering::Relaxed);
        peer.tx_bytes.fetch_add(at.len() as u64, Ordering::Relaxed);
        Step::Answer {
            reason: DropReason::UnknownSession,
            at,
            to: st.endpoint.unwrap_or(self.src),
        }
    }

    /// A handshake message (initiation, response, cookie) or something that is not WireGuard.
    #[inline(never)]
    fn handshake(&mut self, kind: u32, d: &[u8]) -> Step {
        let (slot, via) = match handshake::admit(self.ctx, kind, self.src, d, self.buf) {
            Admission::Peer(slot, via) => (slot, via),
            Admission::Cookie(at) => {
                return Step::Answer {
                    reason: DropReason::RateLimited,
                    at,
                    to: self.src,
                }
            }
            Admission::Drop(r) => return Step::Drop(r),
        };
        let peer = &self.snap.peers[slot as usize];
        let mut st = peer.lock();
        let Some(index) = st.resolve(via) else {
            // No session for that pair of keys (the configuration changed meanwhile).
            return Step::Drop(DropReason::Handshake);
        };
        let base = self.buf.as_ptr() as usize;
        let tunn = st.session(index).expect("resolved");
        let step = match tunn.decapsulate(Some(self.src.ip()), d, self.buf) {
            TunnResult::Err(e) => {
                outcome(peer, &mut st, kind, Some(&e));
                return Step::Drop(DropReason::from_wireguard(&e));
            }
            TunnResult::WriteToNetwork(p) => Step::Write {
                at: range_in(base, p),
                to: self.src,
            },
            _ => Step::Done,
        };
        // What boringtun wrote: a response or a keepalive completes a handshake; a cookie
        // reply (we are under load) does not.
        if let Step::Write { at, .. } = &step {
            if self.buf[at.start] != MSG_COOKIE as u8 {
                outcome(peer, &mut st, kind, None);
            }
        }
        if kind != MSG_COOKIE {
            peer.rx_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            roam(&mut st, self.src);
            st.prefer(index);
        }
        // Packets boringtun queued while the handshake was under way go out next.
        self.queued = Some((slot, index));
        step
    }

    /// The next packet peer `slot`'s session queued during its handshake, encrypted.
    #[inline(never)]
    fn queued_packet(&mut self, (slot, index): (u32, u32)) -> Option<Step> {
        let peer = &self.snap.peers[slot as usize];
        let mut st = peer.lock();
        let base = self.buf.as_ptr() as usize;
        match st.session(index)?.decapsulate(None, &[], self.buf) {
            TunnResult::WriteToNetwork(p) => {
                peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                let at = range_in(base, p);
                if self.buf[at.start] == MSG_INIT as u8 {
                    peer.initiation_sent(&mut st);
                }
                Some(Step::Write {
                    at,
                    to: st.endpoint.unwrap_or(self.src),
                })
            }
            _ => None,
        }
    }
}

impl<T> Drop for Message<'_, '_, T> {
    fn drop(&mut self) {
        release(self.snap, self.held.take());
    }
}

fn release(snap: &Snapshot, h: Option<Held<'_>>) {
    if let Some(h) = h {
        snap.peers[h.slot as usize]
            .rx_bytes
            .fetch_add(h.rx_bytes, Ordering::Relaxed);
    }
}

/// Counts what became of a handshake with `peer` after boringtun took a message of type
/// `kind` (`err`: it refused it). A completed handshake is a response taken (we initiated) or
/// an initiation answered (the peer did); an initiation refused, or a response refused while
/// ours waited (not a late one for an index already replaced), is a rejection. Cookie replies
/// and WireGuard data are no outcome.
fn outcome(peer: &Peer, st: &mut PeerState, kind: u32, err: Option<&WireGuardError>) {
    let stats = &peer.handshakes;
    match (kind, err) {
        (MSG_INIT, None) => stats.success.fetch_add(1, Ordering::Relaxed),
        (MSG_INIT, Some(_)) => stats.rejected.fetch_add(1, Ordering::Relaxed),
        (MSG_RESPONSE, None) => {
            st.initiations.answered();
            stats.success.fetch_add(1, Ordering::Relaxed)
        }
        (MSG_RESPONSE, Some(WireGuardError::WrongIndex)) => return,
        (MSG_RESPONSE, Some(_)) if st.initiations.answered() => {
            stats.rejected.fetch_add(1, Ordering::Relaxed)
        }
        _ => return,
    };
}

/// Endpoint roaming: authenticated packets tell where the peer is now.
#[inline]
fn roam(st: &mut PeerState, src: SocketAddr) {
    if st.endpoint != Some(src) {
        st.endpoint = Some(src);
    }
}
