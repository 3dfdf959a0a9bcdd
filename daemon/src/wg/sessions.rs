//! A peer's sessions across key rotations. boringtun's `Tunn` is made for one pair of static
//! keys (ours, the peer's) and `set_static_private` drops every session; so while either end
//! rotates, a peer holds one `Tunn` per pair of keys in use: our current and next key, times
//! the peer's current and next key (at most [`MAX_PAIRS`]). Each has its own session index,
//! so a data message names the `Tunn` it belongs to, and old sessions keep decrypting what
//! was in flight while the new ones take over.
//!
//! - The **active** `Tunn` ([`PeerState::tunn`]) is the one we encrypt with: the one whose
//!   current session was established last. A handshake completed on another pair, or the
//!   first data on a session the peer made with it, makes that pair active ([`PeerState::prefer`]).
//! - The **target** pair is the one our own initiations aim at: our newest key (the next one
//!   while we rotate) and the peer's newest (its next key once it publishes one): the same
//!   pair seen from both ends. The timer thread starts a handshake on it while it is not the
//!   active one ([`PeerState::target_initiation`]), so a rotation moves without waiting for
//!   a rekey; until that handshake completes, traffic goes on over the old pair. Once the
//!   target is active, no other pair takes over (an old session's rekey cannot pull the
//!   traffic back).

use crate::wg::handshakes::Initiations;
use boringtun::noise::Tunn;
use kwire_proto::key::PublicKey;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Pairs of static keys a peer holds at most (our 2 keys times its 2 keys).
pub const MAX_PAIRS: usize = 4;

/// Least time between two initiations on a target pair that is not active: WireGuard's
/// REKEY_TIMEOUT (boringtun retries a pending handshake itself within that time).
pub const TARGET_RETRY: Duration = Duration::from_secs(5);

/// The static keys of one session: ours and the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    pub local: PublicKey,
    pub remote: PublicKey,
}

/// A `Tunn` besides the active one, with its keys and 24-bit session index.
pub struct Standby {
    pub tunn: Tunn,
    pub pair: Pair,
    pub index: u32,
}

/// The mutable half of a peer: boringtun's `Tunn`s (their methods take `&mut self`) and the
/// endpoint, which roams with authenticated packets. Locked once per batch, not per packet.
/// While keys rotate a peer has a `Tunn` per pair of keys (see the module documentation).
pub struct PeerState {
    /// The active `Tunn`: what we encrypt with.
    pub tunn: Tunn,
    /// The keys of `tunn`.
    pub pair: Pair,
    /// `tunn`'s 24-bit session index.
    pub index: u32,
    /// The peer's other `Tunn`s (other pairs of keys), during a rotation.
    pub standby: Vec<Standby>,
    /// The pair our own initiations aim at: our newest key (the next one while we rotate),
    /// the peer's newest.
    pub target: Pair,
    /// When the timers last initiated on `target` while it was not active.
    pub last_target_attempt: Option<Instant>,
    /// The session index of the `Tunn` that last decrypted data from the peer.
    pub rx_index: u32,
    pub endpoint: Option<SocketAddr>,
    /// Our initiations: awaited, greeted, last triggered.
    pub initiations: Initiations,
}

/// Which of a peer's `Tunn`s a handshake message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A response or cookie: the session index it names (`receiver_idx >> 8`).
    Index(u32),
    /// An initiation: the keys it was made with.
    Pair(Pair),
}

impl PeerState {
    /// The session indexes of every `Tunn` of the peer, the active one first.
    pub fn indexes(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.index).chain(self.standby.iter().map(|s| s.index))
    }

    /// The pairs of every `Tunn` of the peer, the active one first.
    pub fn pairs(&self) -> impl Iterator<Item = Pair> + '_ {
        std::iter::once(self.pair).chain(self.standby.iter().map(|s| s.pair))
    }

    /// The `Tunn` with session index `index` (`receiver_idx >> 8`).
    #[inline(always)]
    pub fn session(&mut self, index: u32) -> Option<&mut Tunn> {
        if index == self.index {
            return Some(&mut self.tunn);
        }
        self.standby_session(index)
    }

    #[inline(never)]
    fn standby_session(&mut self, index: u32) -> Option<&mut Tunn> {
        self.standby
            .iter_mut()
            .find(|s| s.index == index)
            .map(|s| &mut s.tunn)
    }

    /// The session index of the `Tunn` a handshake message is for.
    pub fn resolve(&self, via: Via) -> Option<u32> {
        match via {
            Via::Index(i) => self.indexes().find(|x| *x == i),
            Via::Pair(p) => {
                if p == self.pair {
                    Some(self.index)
                } else {
                    self.standby.iter().find(|s| s.pair == p).map(|s| s.index)
                }
            }
        }
    }

    /// `index`'s `Tunn` decrypted data from the peer: remembered (the peer sends with that
    /// pair of keys), and it becomes the active one if its session is newer.
    #[inline(always)]
    pub fn received(&mut self, index: u32) {
        self.rx_index = index;
        self.prefer(index);
    }

    /// The keys of the `Tunn` that last decrypted data from the peer, if it is still there.
    pub fn rx_pair(&self) -> Option<Pair> {
        if self.rx_index == self.index {
            return Some(self.pair);
        }
        self.standby
            .iter()
            .find(|s| s.index == self.rx_index)
            .map(|s| s.pair)
    }

    /// After `index`'s `Tunn` completed a handshake or took data: it becomes the active one
    /// if its current session is newer than the active one's. Cheap when it is active.
    #[inline(always)]
    pub fn prefer(&mut self, index: u32) {
        if index != self.index {
            self.prefer_standby(index);
        }
    }

    #[inline(never)]
    fn prefer_standby(&mut self, index: u32) {
        if self.pair == self.target {
            return;
        }
        let Some(at) = self.standby.iter().position(|s| s.index == index) else {
            return;
        };
        let Some(theirs) = self.standby[at].tunn.time_since_last_handshake() else {
            return;
        };
        if let Some(ours) = self.tunn.time_since_last_handshake() {
            if ours <= theirs {
                return;
            }
        }
        self.swap_active(at);
    }

    /// Makes standby `at` the active `Tunn` (the active one becomes standby `at`).
    pub(crate) fn swap_active(&mut self, at: usize) {
        let s = &mut self.standby[at];
        std::mem::swap(&mut self.tunn, &mut s.tunn);
        std::mem::swap(&mut self.pair, &mut s.pair);
        std::mem::swap(&mut self.index, &mut s.index);
    }

    /// The target pair while it is not the active one: an initiation due at most once per
    /// [`TARGET_RETRY`]. Returns the `Tunn` to initiate on.
    pub fn target_initiation(&mut self, now: Instant) -> Option<&mut Tunn> {
        if self.target == self.pair {
            return None;
        }
        if self
            .last_target_attempt
            .is_some_and(|t| now.saturating_duration_since(t) < TARGET_RETRY)
        {
            return None;
        }
        let target = self.target;
        let s = self.standby.iter_mut().find(|s| s.pair == target)?;
        self.last_target_attempt = Some(now);
        Some(&mut s.tunn)
    }
}
