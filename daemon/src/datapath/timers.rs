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
///
/// Returns whether the peer is now dormant: boringtun has given up on it (its handshake
/// expired, after REKEY_ATTEMPT_TIME unanswered or 540 s without new keys, and its sessions
/// and queue are cleared) and it has no other `Tunn`. Its timers then do nothing until a
/// handshake starts again, which sends (or counts a drop) and so moves its counters.
pub fn tick(peer: &Peer, batch: &mut TxBatch) -> bool {
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
    st.standby.is_empty() && st.tunn.is_expired()
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

/// Ticks after a peer's last activity (its rx, tx or dropped counters moved) during which it is
/// visited every tick: 20 s covers every timer that traffic arms (keepalive 10 s after a
/// receive, a new handshake 15 s after an unanswered send, the handshake retries every 5 s,
/// which are traffic themselves).
pub const QUIET_AFTER_TICKS: u64 = 80;
/// A quiet peer is visited every this many ticks (2 s): what can still fall due for it with no
/// traffic is the expiry of an old session's keys (after 540 s), which may come that late.
pub const QUIET_EVERY_TICKS: u64 = 8;

/// What the timer thread remembers of one peer between ticks.
#[derive(Clone, Copy, Debug)]
struct Visit {
    activity: u64,
    active_at: u64,
    /// Visited every tick whatever its activity (a persistent keepalive).
    always: bool,
    /// Nothing falls due for it until its activity moves ([`TimerSchedule::rest`]).
    dormant: bool,
}

/// Which peers a tick visits: every peer that was active in the last [`QUIET_AFTER_TICKS`]
/// (and every peer with a persistent keepalive, and all of them while keys rotate); the quiet
/// ones only every [`QUIET_EVERY_TICKS`], spread over the ticks. At 5,000 mostly idle peers a
/// tick visits about an eighth of them, and a peer wakes up on the first visit after its
/// counters moved (a send to a quiet peer starts its handshake on the packet path at once; the
/// timers only retry it, 5 s later). A dormant peer ([`tick`] said so, see
/// [`TimerSchedule::rest`]) is only looked at, not visited, until its counters move: a peer
/// that never answered, or whose keys have expired, costs a read of its counters. What a tick
/// reads of a peer it does not visit is the schedule's own memory, not the peer.
#[derive(Default)]
pub struct TimerSchedule {
    tick: u64,
    /// Per peer of the last snapshot (its `Arc`'s address), in snapshot order.
    keys: Vec<usize>,
    visits: Vec<Visit>,
}

impl TimerSchedule {
    /// Advances one tick and returns the indexes of the peers to visit. `key(i)` names peer
    /// `i` across snapshots, `activity(i)` is a sum of its counters (it only grows while the
    /// peer does something), `always(i)` keeps it visited every tick (read when the peer
    /// joins: a peer's `always` must not change under the same key); `all` visits every
    /// peer (while keys rotate).
    pub fn due(
        &mut self,
        n: usize,
        key: impl Fn(usize) -> usize,
        activity: impl Fn(usize) -> u64,
        always: impl Fn(usize) -> bool,
        all: bool,
    ) -> Vec<usize> {
        self.tick += 1;
        let t = self.tick;
        if self.keys.len() != n || (0..n).any(|i| self.keys[i] != key(i)) {
            // A new peer set: the activity known carries over by peer, new peers start active.
            // A peer's address may be reused by a new one, so whether it is dormant or always
            // visited is not carried over but found again.
            let old: std::collections::HashMap<usize, Visit> = self
                .keys
                .iter()
                .copied()
                .zip(self.visits.iter().copied())
                .collect();
            self.keys = (0..n).map(&key).collect();
            self.visits = self
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let (activity, active_at) = old
                        .get(k)
                        .map_or((u64::MAX, t), |v| (v.activity, v.active_at));
                    Visit {
                        activity,
                        active_at,
                        always: always(i),
                        dormant: false,
                    }
                })
                .collect();
        }
        let mut due = Vec::new();
        for (i, v) in self.visits.iter_mut().enumerate() {
            let every_tick = v.always || all;
            let quiet = t.saturating_sub(v.active_at) > QUIET_AFTER_TICKS && !every_tick;
            if quiet && !(t + i as u64).is_multiple_of(QUIET_EVERY_TICKS) {
                continue;
            }
            let a = activity(i);
            if a != v.activity {
                v.activity = a;
                v.active_at = t;
                v.dormant = false;
            } else if v.dormant && !every_tick {
                continue;
            }
            due.push(i);
        }
        due
    }

    /// Marks peer `i` of the last [`TimerSchedule::due`] dormant: it is not visited again
    /// until its activity moves (or it is visited every tick: a keepalive, a key rotation).
    pub fn rest(&mut self, i: usize) {
        if let Some(v) = self.visits.get_mut(i) {
            v.dormant = true;
        }
    }
}

/// A peer's activity for [`TimerSchedule`]: its counters, summed (each only grows).
pub fn activity(peer: &Peer) -> u64 {
    peer.rx_bytes
        .load(Ordering::Relaxed)
        .wrapping_add(peer.tx_bytes.load(Ordering::Relaxed))
        .wrapping_add(peer.tx_dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `ticks` ticks over `n` peers whose activity `act(i, t)` gives; returns per peer
    /// the ticks it was visited.
    fn visits(n: usize, ticks: u64, act: impl Fn(usize, u64) -> u64) -> Vec<Vec<u64>> {
        let mut s = TimerSchedule::default();
        let mut out = vec![Vec::new(); n];
        for t in 1..=ticks {
            for i in s.due(n, |i| i, |i| act(i, t), |i| i == n - 1 && n > 3, false) {
                out[i].push(t);
            }
        }
        out
    }

    #[test]
    fn quiet_peers_are_visited_an_eighth_as_often_and_wake_on_activity() {
        // Peer 0 idle throughout; peer 1 active until tick 50, then quiet, then busy again
        // from tick 300; peer 2 busy throughout; peer 3 has a persistent keepalive.
        let v = visits(4, 400, |i, t| match i {
            0 => 7,
            1 if t <= 50 => t,
            1 if t < 300 => 50,
            1 => t,
            _ => t / 3,
        });
        // Every tick while it is new (its first QUIET_AFTER_TICKS), then every eighth.
        let idle_after: Vec<u64> = v[0].iter().copied().filter(|t| *t > 100).collect();
        assert!(
            idle_after
                .windows(2)
                .all(|w| w[1] - w[0] == QUIET_EVERY_TICKS),
            "{idle_after:?}"
        );
        assert_eq!(
            v[0].iter().filter(|t| **t <= QUIET_AFTER_TICKS + 1).count() as u64,
            QUIET_AFTER_TICKS + 1
        );
        // Peer 1: every tick until 20 s after its last activity, then sparse, then every tick
        // from the first sparse visit after it moved again (at most QUIET_EVERY_TICKS late).
        assert!((1..=50 + QUIET_AFTER_TICKS).all(|t| v[1].contains(&t)));
        assert!(!(200..300).all(|t| v[1].contains(&t)));
        let woke = *v[1].iter().find(|t| **t >= 300).unwrap();
        assert!(woke < 300 + QUIET_EVERY_TICKS);
        assert!((woke..=400).all(|t| v[1].contains(&t)));
        // Busy and keepalive peers: every tick.
        assert_eq!(v[2].len(), 400);
        assert_eq!(v[3].len(), 400);
    }

    #[test]
    fn a_dormant_peer_is_not_visited_until_its_counters_move() {
        // Peer 0 rests after its first visit and moves at tick 300; peer 1 rests too but has
        // a persistent keepalive; peer 2 is quiet and never rests.
        let mut s = TimerSchedule::default();
        let mut seen = vec![Vec::new(); 3];
        for t in 1..=400u64 {
            let act = |i: usize| if i == 0 && t >= 300 { t } else { 0 };
            for i in s.due(3, |i| i, act, |i| i == 1, false) {
                seen[i].push(t);
                if i < 2 && t < 300 {
                    s.rest(i);
                }
            }
        }
        // Quiet by then: looked at every QUIET_EVERY_TICKS, visited at the first look after.
        let woke = seen[0][1];
        assert_eq!(seen[0][0], 1, "{:?}", seen[0]);
        assert!((300..300 + QUIET_EVERY_TICKS).contains(&woke), "{woke}");
        assert!((woke..=400).all(|t| seen[0].contains(&t)), "awake again");
        assert_eq!(seen[1].len(), 400, "a keepalive peer is visited every tick");
        assert!(seen[2].len() > 100 / QUIET_EVERY_TICKS as usize);
        // While keys rotate every peer is visited, dormant or not.
        s.rest(0);
        let n = (0..10).map(|_| s.due(3, |i| i, |_| 1, |_| false, true).len());
        assert_eq!(n.sum::<usize>(), 30);
        // A new peer set finds dormancy again: a reused key starts awake.
        s.rest(0);
        assert!(s.due(4, |i| i, |_| 1, |_| false, false).contains(&0));
    }

    #[test]
    fn a_new_peer_set_keeps_what_it_knew_by_peer() {
        let mut s = TimerSchedule::default();
        for _ in 0..200 {
            s.due(2, |i| 10 + i, |_| 1, |_| false, false);
        }
        // Both quiet now: one tick visits at most one of them.
        assert!(s.due(2, |i| 10 + i, |_| 1, |_| false, false).len() <= 1);
        // A third peer arrives in front: it is visited every tick, the others stay quiet.
        let mut seen_new = 0;
        let mut seen_old = 0;
        for _ in 0..QUIET_EVERY_TICKS {
            let due = s.due(3, |i| [30, 10, 11][i], |_| 1, |_| false, false);
            seen_new += due.iter().filter(|i| **i == 0).count();
            seen_old += due.iter().filter(|i| **i != 0).count();
        }
        assert_eq!(seen_new as u64, QUIET_EVERY_TICKS);
        assert_eq!(seen_old, 2);
    }
}
