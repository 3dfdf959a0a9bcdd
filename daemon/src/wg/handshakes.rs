//! Handshakes this device starts on its own, and what became of every attempt. A restarted
//! daemon holds no sessions while its peers still encrypt with the ones it forgot; nothing in
//! WireGuard's timers repairs that for a peer that only sends. So the device greets every peer
//! as soon as it can send ([`Pacer`]: paced, so that thousands of peers do not burst), and a
//! data message for a session index it does not know, from a peer's endpoint, starts a
//! handshake with that peer at once ([`Initiations::trigger_due`]: at most one per
//! [`TRIGGER_INTERVAL`] per peer). The peer's `Tunn` stores the new session when the
//! initiation arrives and switches to it on our first data message (the keepalive that
//! completes every handshake we initiate), so its old session is replaced without waiting for
//! a rekey timer.
//!
//! [`HandshakeStats`] counts each attempt's outcome per peer: `success`, `timeout` (an
//! initiation never answered: retried or given up) and `rejected` (a handshake message for
//! the peer that boringtun refused).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Handshake messages per second the device takes before it asks for cookies
/// (boringtun's device uses the same figure).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Initiations per second the device starts on its own (greetings after a start, handshakes
/// triggered by unknown sessions). Every answer counts against the device's handshake budget
/// ([`HANDSHAKE_RATE_LIMIT`], 100 a second, after which boringtun answers handshakes with
/// cookie replies); half of it leaves room for the peers' own initiations. 5,000 peers are
/// greeted in 100 s; peers that send traffic trigger theirs first.
pub const INITIATIONS_PER_SECOND: u64 = HANDSHAKE_RATE_LIMIT / 2;
/// Initiations the device may start at once (a node with up to this many peers greets them
/// all in its first tick).
pub const INITIATION_BURST: u64 = 50;
/// Least time between two handshakes one peer's unknown-session messages trigger: WireGuard's
/// REKEY_TIMEOUT, after which boringtun retries an unanswered initiation anyway.
pub const TRIGGER_INTERVAL: Duration = Duration::from_secs(5);

const NANOS_PER_TOKEN: u64 = 1_000_000_000 / INITIATIONS_PER_SECOND;
const MAX_TOKENS: u64 = NANOS_PER_TOKEN * INITIATION_BURST;

/// A token bucket for the initiations the device starts on its own, shared by the timer
/// thread (greetings) and the receive workers (triggers).
#[derive(Debug)]
pub struct Pacer {
    /// (nanoseconds of credit, when last refilled)
    inner: Mutex<(u64, Option<Instant>)>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

impl Pacer {
    pub const fn new() -> Pacer {
        Pacer {
            inner: Mutex::new((MAX_TOKENS, None)),
        }
    }

    fn refill(state: &mut (u64, Option<Instant>), now: Instant) {
        if let Some(t) = state.1 {
            let elapsed = now.saturating_duration_since(t).as_nanos();
            state.0 = (state.0 as u128 + elapsed).min(MAX_TOKENS as u128) as u64;
        }
        state.1 = Some(now);
    }

    /// Takes one token at `now`, if there is one.
    pub fn take(&self, now: Instant) -> bool {
        self.take_up_to(1, now) == 1
    }

    /// Takes up to `want` tokens at `now`; returns how many it took.
    pub fn take_up_to(&self, want: u64, now: Instant) -> u64 {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::refill(&mut s, now);
        let n = (s.0 / NANOS_PER_TOKEN).min(want);
        s.0 -= n * NANOS_PER_TOKEN;
        n
    }

    /// Gives back `n` tokens taken but not used.
    pub fn give_back(&self, n: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 + n * NANOS_PER_TOKEN).min(MAX_TOKENS);
    }
}

/// The outcome of each handshake attempt with a peer (the `result` label of
/// `kwire_peer_handshakes_total`), and the handshakes unknown sessions triggered.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    pub success: AtomicU64,
    pub timeout: AtomicU64,
    pub rejected: AtomicU64,
    pub triggered: AtomicU64,
}

impl HandshakeStats {
    /// Adds `other`'s counts (a peer rebuilt with a new `Tunn` keeps its history).
    pub fn add(&self, other: &HandshakeStats) {
        for (a, b) in [
            (&self.success, &other.success),
            (&self.timeout, &other.timeout),
            (&self.rejected, &other.rejected),
            (&self.triggered, &other.triggered),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// The mutable half, kept with the peer's session (under its lock): whether an initiation of
/// ours waits for an answer, whether the peer was greeted, when a handshake was last triggered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Initiations {
    in_flight: bool,
    greeted: bool,
    last_trigger: Option<Instant>,
}

impl Initiations {
    /// An initiation of ours went out. True when it replaces one that was never answered
    /// (boringtun retries after REKEY_TIMEOUT): that attempt timed out.
    pub fn sent(&mut self) -> bool {
        std::mem::replace(&mut self.in_flight, true)
    }

    /// A response to our initiation was taken (true) or refused (false); returns whether one
    /// was awaited (a late or stray response is no attempt's outcome).
    pub fn answered(&mut self) -> bool {
        std::mem::replace(&mut self.in_flight, false)
    }

    /// boringtun gave up (REKEY_ATTEMPT_TIME): true when an initiation was still unanswered.
    pub fn expired(&mut self) -> bool {
        std::mem::replace(&mut self.in_flight, false)
    }

    /// Whether the peer still needs its greeting; marks it greeted.
    pub fn greet(&mut self) -> bool {
        !std::mem::replace(&mut self.greeted, true)
    }

    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// Whether an unknown-session message may trigger a handshake at `now`: at most one per
    /// [`TRIGGER_INTERVAL`] (record it with [`Initiations::triggered`]).
    pub fn trigger_due(&self, now: Instant) -> bool {
        self.last_trigger
            .is_none_or(|t| now.saturating_duration_since(t) >= TRIGGER_INTERVAL)
    }

    /// A handshake was triggered at `now`.
    pub fn triggered(&mut self, now: Instant) {
        self.last_trigger = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_bursts_then_holds_the_rate() {
        let p = Pacer::default();
        let t0 = Instant::now();
        assert_eq!(
            p.take_up_to(10_000, t0),
            INITIATION_BURST,
            "the burst, no more"
        );
        assert!(!p.take(t0), "empty");
        // One token per 1/rate seconds.
        let step = Duration::from_nanos(NANOS_PER_TOKEN);
        assert!(!p.take(t0 + step / 2));
        assert!(p.take(t0 + step));
        // Over 10 s: rate x 10 tokens, not more (5,000 peers need 100 s).
        let later = t0 + step + Duration::from_secs(10);
        let mut n = 0;
        let mut t = t0 + step;
        while t <= later {
            n += p.take_up_to(u64::MAX, t);
            t += Duration::from_millis(50);
        }
        assert_eq!(n, INITIATIONS_PER_SECOND * 10);
        // A long pause refills only the burst.
        assert_eq!(
            p.take_up_to(u64::MAX, later + Duration::from_secs(3600)),
            INITIATION_BURST
        );
        p.give_back(3);
        assert_eq!(p.take_up_to(u64::MAX, later + Duration::from_secs(3600)), 3);
    }

    #[test]
    fn pacer_paces_five_thousand_peers() {
        let p = Pacer::default();
        let t0 = Instant::now();
        let (mut greeted, mut t) = (0u64, t0);
        let mut first_second = 0;
        while greeted < 5000 {
            greeted += p.take_up_to(5000 - greeted, t);
            if t < t0 + Duration::from_secs(1) {
                first_second = greeted;
            }
            t += Duration::from_millis(50);
        }
        assert!(
            first_second <= INITIATION_BURST + INITIATIONS_PER_SECOND,
            "{first_second}"
        );
        let took = t.duration_since(t0).as_secs();
        assert!((95..=100).contains(&took), "{took} s");
    }

    #[test]
    fn triggers_are_limited_per_peer() {
        let (mut a, b) = (Initiations::default(), Initiations::default());
        let t0 = Instant::now();
        assert!(a.trigger_due(t0));
        assert!(a.trigger_due(t0), "only a recorded trigger counts");
        a.triggered(t0);
        assert!(!a.trigger_due(t0 + Duration::from_millis(10)));
        assert!(
            b.trigger_due(t0),
            "another peer is not limited by the first"
        );
        assert!(!a.trigger_due(t0 + TRIGGER_INTERVAL - Duration::from_millis(1)));
        assert!(a.trigger_due(t0 + TRIGGER_INTERVAL));
    }

    #[test]
    fn attempts_end_answered_or_timed_out() {
        let mut i = Initiations::default();
        assert!(!i.sent(), "the first attempt replaces nothing");
        assert!(i.sent(), "a retry: the first timed out");
        assert!(i.answered());
        assert!(!i.answered(), "a stray response is no attempt's outcome");
        assert!(!i.expired());
        i.sent();
        assert!(i.expired());
        assert!(i.greet());
        assert!(!i.greet());
    }
}
