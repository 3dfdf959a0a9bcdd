//! Per-source limit on handshake initiations, applied after the MAC and cookie checks and
//! before the Diffie-Hellman work (wireguard-go `ratelimiter/`: 20 per second, burst 5). An
//! IPv6 source is its /64 (as wireguard-go keys it): one host holds a whole /64, so counting
//! its addresses apart would give it 2^64 buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Initiations per second one source address may send.
pub const INITIATIONS_PER_SECOND: u64 = 20;
/// Initiations a source may send at once before the rate applies.
pub const BURST: u64 = 5;
/// Sources remembered at most; past that the oldest idle ones are forgotten.
pub const MAX_SOURCES: usize = 4096;

const NANOS_PER_TOKEN: u64 = 1_000_000_000 / INITIATIONS_PER_SECOND;
const MAX_TOKENS: u64 = NANOS_PER_TOKEN * BURST;

/// A token bucket per source address. Only handshake initiations pass here, never data.
#[derive(Debug)]
pub struct SourceLimiter {
    inner: Mutex<HashMap<IpAddr, (u64, Instant)>>,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        SourceLimiter {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

impl SourceLimiter {
    /// Whether one more initiation from `src` may be processed at `now`.
    pub fn allow(&self, src: IpAddr, now: Instant) -> bool {
        let src = source_key(src);
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_SOURCES && !m.contains_key(&src) {
            m.retain(|_, (_, t)| now.saturating_duration_since(*t).as_secs() < 1);
            if m.len() >= MAX_SOURCES {
                return false;
            }
        }
        let e = m.entry(src).or_insert((MAX_TOKENS, now));
        let elapsed = now.saturating_duration_since(e.1).as_nanos() as u64;
        e.0 = (e.0 + elapsed).min(MAX_TOKENS);
        e.1 = now;
        if e.0 >= NANOS_PER_TOKEN {
            e.0 -= NANOS_PER_TOKEN;
            true
        } else {
            false
        }
    }

    /// Forgets sources idle for a second or more (call about once a second).
    pub fn prune(&self, now: Instant) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (tokens, t)| {
            *tokens < MAX_TOKENS || now.saturating_duration_since(*t).as_secs() < 1
        });
    }
}

/// The bucket of a source: an IPv4 address, or the /64 of an IPv6 one (an IPv4-mapped IPv6
/// address counts as its IPv4 address).
pub fn source_key(src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => src,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let l = SourceLimiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..BURST {
            assert!(l.allow(a, t0));
        }
        assert!(!l.allow(a, t0), "burst exhausted");
        assert!(l.allow(b, t0), "other sources unaffected");
        assert!(
            l.allow(a, t0 + Duration::from_millis(50)),
            "one token per 50 ms"
        );
        assert!(!l.allow(a, t0 + Duration::from_millis(60)));
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let l = SourceLimiter::default();
        let t0 = Instant::now();
        for i in 0..BURST {
            let a: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            assert!(l.allow(a, t0));
        }
        let other_host_same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        assert!(!l.allow(other_host_same_64, t0), "one bucket per /64");
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.allow(next_64, t0));
        assert_eq!(
            source_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
