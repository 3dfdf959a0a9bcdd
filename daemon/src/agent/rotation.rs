//! Key rotation, make before break, and revocation: the decisions, free of I/O. The agent
//! ([`super::Agent`]) does the steps: the next key on disk ([`super::keyfile`]) and in the
//! device (which answers handshakes addressed to either key, see [`crate::wg::sessions`]),
//! `kwire.dev/next-public-key` on the Node, and once every peer that is up has moved to the
//! next key (or the grace period is over) the promotion: the next key becomes the current
//! one on disk, in the device and on the Node, and the old one is wiped.

use crate::node_state::PEER_UP_WITHIN;
use crate::wg::key::PrivateKey;
use crate::wg::sessions::Pair;
use kwire_proto::key::PublicKey;
use std::time::{Duration, Instant, SystemTime};

/// Longest a rotation waits for the peers that are up to move to the next key, by default;
/// then it promotes anyway (peers that had not moved handshake again to the new key).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);
/// How often the agent checks a rotation's progress.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The node's keys as the agent holds them. Both private keys are zeroized on drop.
pub struct Keys {
    pub current: PrivateKey,
    /// The key the node rotates to.
    pub next: Option<PrivateKey>,
    /// When the current key was written (its age).
    pub written: Option<SystemTime>,
    /// When this process started (or resumed) the rotation under way.
    pub started: Option<Instant>,
}

impl Keys {
    pub fn public(&self) -> PublicKey {
        self.current.public_key()
    }

    pub fn next_public(&self) -> Option<PublicKey> {
        self.next.as_ref().map(PrivateKey::public_key)
    }
}

/// What a rotation under way should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Wait: the next key is not published yet, or some peer that is up has not moved.
    Wait,
    /// Promote the next key: every peer that is up has a session made with it.
    PromoteAllMoved,
    /// Promote the next key: the grace period is over; `behind` peers that are up had not
    /// moved (they handshake again, to the new key, from what their Node watch tells them).
    PromoteGraceOver { behind: usize },
    /// Abort: the next key could not be published within the grace period (the API refused
    /// or was unreachable), so no peer could move; the current key stays.
    AbortUnpublished,
}

/// A peer's session as rotation sees it: the keys we send with, the keys its data last came
/// with, the age of its last handshake (None: none yet).
#[derive(Debug, Clone, Copy)]
pub struct PeerSession {
    pub pair: Pair,
    pub rx: Option<Pair>,
    pub handshake_age: Option<Duration>,
}

/// Decides a rotation's next step: `next` is the key rotated to, `published` whether the
/// Node shows it, `elapsed` the time since the rotation started, `peers` every peer's session.
pub fn progress(
    next: PublicKey,
    published: bool,
    elapsed: Duration,
    grace: Duration,
    peers: &[PeerSession],
) -> Progress {
    let over = elapsed >= grace;
    if !published {
        return if over {
            Progress::AbortUnpublished
        } else {
            Progress::Wait
        };
    }
    let behind = peers
        .iter()
        .filter(|p| p.handshake_age.is_some_and(|a| a < PEER_UP_WITHIN))
        .filter(|p| p.pair.local != next || p.rx.is_none_or(|r| r.local != next))
        .count();
    match (behind, over) {
        (0, _) => Progress::PromoteAllMoved,
        (behind, true) => Progress::PromoteGraceOver { behind },
        _ => Progress::Wait,
    }
}

/// Whether a rotation is due by `--key-rotation-interval`: the current key is at least that
/// old (a key of unknown age is due, so that an interval always takes effect).
pub fn due(interval: Option<Duration>, written: Option<SystemTime>, now: SystemTime) -> bool {
    let Some(interval) = interval else {
        return false;
    };
    match written {
        Some(w) => now.duration_since(w).unwrap_or_default() >= interval,
        None => true,
    }
}

/// The `kwire.dev/revoked-keys` value that lists `existing` and `add` (each once, in order).
pub fn revoked_annotation(existing: &[PublicKey], add: &[PublicKey]) -> String {
    let mut out: Vec<PublicKey> = Vec::new();
    for k in existing.iter().chain(add) {
        if !out.contains(k) {
            out.push(*k);
        }
    }
    out.iter()
        .map(PublicKey::to_base64)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn s(local: u8, age: Option<u64>) -> PeerSession {
        let pair = Pair {
            local: k(local),
            remote: k(100),
        };
        PeerSession {
            pair,
            rx: Some(pair),
            handshake_age: age.map(Duration::from_secs),
        }
    }

    #[test]
    fn promotes_when_every_peer_that_is_up_moved_or_the_grace_is_over() {
        let g = DEFAULT_GRACE;
        let t = Duration::from_secs(3);
        // Not published yet: wait, and abort once the grace is over.
        assert_eq!(progress(k(2), false, t, g, &[]), Progress::Wait);
        assert_eq!(progress(k(2), false, g, g, &[]), Progress::AbortUnpublished);
        // One peer up on the old key: wait; moved: promote. Peers that are down (no
        // handshake, or older than REJECT_AFTER_TIME) are not waited for.
        let down = [s(1, None), s(1, Some(181))];
        let mut peers = vec![s(1, Some(2)), s(2, Some(1))];
        peers.extend(down);
        assert_eq!(progress(k(2), true, t, g, &peers), Progress::Wait);
        assert_eq!(
            progress(k(2), true, g, g, &peers),
            Progress::PromoteGraceOver { behind: 1 }
        );
        // We send with the next key, but the peer's data still comes with the old one: it
        // has not moved (promoting would drop what it sends).
        peers[0] = s(2, Some(0));
        peers[0].rx = Some(s(1, None).pair);
        assert_eq!(progress(k(2), true, t, g, &peers), Progress::Wait);
        peers[0] = s(2, Some(0));
        assert_eq!(
            progress(k(2), true, t, g, &peers),
            Progress::PromoteAllMoved
        );
        assert_eq!(progress(k(2), true, t, g, &[]), Progress::PromoteAllMoved);
    }

    #[test]
    fn interval_due_and_revoked_list() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        assert!(!due(None, Some(now - day * 90), now));
        assert!(due(Some(day * 30), Some(now - day * 31), now));
        assert!(!due(Some(day * 30), Some(now - day), now));
        assert!(due(Some(day), None, now));
        assert_eq!(revoked_annotation(&[], &[]), "");
        let v = revoked_annotation(&[k(1), k(2)], &[k(2), k(3)]);
        assert_eq!(
            v,
            [k(1), k(2), k(3)]
                .iter()
                .map(PublicKey::to_base64)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}
