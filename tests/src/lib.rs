//! Test support: network namespaces as hosts, real WireGuard peers driven through `wg`, and
//! packet captures that prove what is on the wire.
//!
//! Everything here is an RAII guard with a name unique to this process and test, so tests run in
//! parallel and clean up after themselves even when they panic:
//! - [`Netns`]: a network namespace `kwt-<id>-<role>` with `lo` up; dropping it kills every process
//!   still inside (`ip netns pids`), removes the WireGuard sockets of its interfaces and deletes it
//!   (the kernel deletes its veths with it).
//! - [`Proc`]: a process started in a namespace, stopped on drop (signal, then SIGKILL after a
//!   deadline); its stdout/stderr go to a log file that is printed when a test panics.
//! - [`WgDevice`]: a userspace WireGuard implementation (`kwire tunnel`, `wireguard-go -f`,
//!   `boringtun-cli`) running in a namespace, configured with `wg`, read with `wg show dump`.
//! - [`Capture`]: tcpdump on an interface of a namespace, read back as `tcpdump -r -nn` lines.
//! - [`sweep_stale`] removes what a crashed earlier run left behind (namespaces, sockets, links
//!   whose creating pid is dead); it runs once per process before the first namespace is made.
//!
//! Addresses: underlay only in documentation ranges (192.0.2.0/24, 198.51.100.0/24,
//! 203.0.113.0/24, 2001:db8::/32); inside tunnels 10.x and fd00::/8.
//!
//! Correctness never rests on a sleep: wait for a condition with [`wait_until`].

//!
//! One module per concern: [`common`] (ids, root, waiting), [`scratch`], [`process`],
//! [`netns`], [`wireguard`], [`capture`], [`lab`], [`echo`] (long-lived connections from
//! lab pods); everything but `lab` is re-exported at the root.

pub mod capture;
pub mod common;
pub mod echo;
pub mod impair;
pub mod lab;
pub mod netns;
pub mod process;
pub mod scratch;
pub mod wireguard;

pub use capture::*;
pub use common::*;
pub use netns::*;
pub use process::*;
pub use scratch::*;
pub use wireguard::*;

use std::time::Duration;

/// First part of every namespace name this crate creates (`kwt-<id>-<role>`).
pub const NETNS_PREFIX: &str = "kwt-";
/// Where wireguard-tools looks for userspace API sockets; shared by all network namespaces.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";
/// Where scratch directories (pcaps, logs, key files, payloads) live.
pub const SCRATCH_ROOT: &str = "/tmp/kwire-tests";
/// Width of the base-36 pid at the start of every id, so [`sweep_stale`] can read it back.
/// 36^5 > 2^22, the largest pid Linux hands out.
const PID_DIGITS: usize = 5;
/// A test id: pid (5) + counter (2) + random (2), all base 36.
const ID_LEN: usize = PID_DIGITS + 4;
/// Longest role tag an interface name may carry: tag + id must fit IFNAMSIZ-1 = 15 bytes.
const MAX_IF_TAG: usize = 15 - ID_LEN;

/// How long a stopped process gets between its stop signal and SIGKILL. The tunnel contract
/// (shared/bench/tunnel-bench.sh) promises an exit within 3 s of SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a WireGuard implementation gets to create its interface and UAPI socket.
pub const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_unique_and_carry_the_pid() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), ID_LEN);
        assert_eq!(pid_of_id(&a), Some(std::process::id()));
        const { assert!(MAX_IF_TAG + ID_LEN <= 15) };
    }

    #[test]
    fn base36_round_trip() {
        for n in [0u64, 1, 35, 36, 4_194_304] {
            assert_eq!(parse_base36(&base36(n, PID_DIGITS)), Some(n));
        }
    }

    #[test]
    fn wait_until_polls_until_true() {
        let mut n = 0;
        assert!(try_wait_until(Duration::from_secs(2), || {
            n += 1;
            n >= 3
        }));
        assert!(!try_wait_until(Duration::from_millis(30), || false));
    }

    #[test]
    #[should_panic(expected = "waiting for: the impossible")]
    fn wait_until_says_what_timed_out() {
        wait_until(Duration::from_millis(20), "the impossible", || false);
    }

    const DUMP: &str = "\
yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\tHIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\t51820\toff
xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\t(none)\t192.0.2.2:51820\t10.99.0.2/32,fd00:99::2/128\t1732633200\t12345\t67890\toff
TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\t(none)\t[2001:db8:1::2]:51820\t(none)\t0\t0\t0\t25
";

    #[test]
    fn parses_wg_show_dump() {
        let d = WgDump::parse(DUMP).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, None);
        assert_eq!(
            d.public_key.as_deref(),
            Some("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")
        );
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[0];
        assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips, vec!["10.99.0.2/32", "fd00:99::2/128"]);
        assert_eq!(
            (p.latest_handshake, p.rx_bytes, p.tx_bytes),
            (1732633200, 12345, 67890)
        );
        assert_eq!(p.persistent_keepalive, None);
        let q = d
            .peer("TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=")
            .unwrap();
        assert_eq!(q.endpoint, Some("[2001:db8:1::2]:51820".parse().unwrap()));
        assert!(q.allowed_ips.is_empty());
        assert_eq!(q.persistent_keepalive, Some(25));
        assert_eq!(q.preshared_key, None);
    }

    #[test]
    fn rejects_malformed_dump() {
        assert!(WgDump::parse("").is_err());
        assert!(WgDump::parse("a\tb\n").is_err());
        assert!(
            WgDump::parse("a\tb\t1\toff\npk\t(none)\tnot-an-endpoint\t(none)\t0\t0\t0\toff\n")
                .is_err()
        );
    }
}
