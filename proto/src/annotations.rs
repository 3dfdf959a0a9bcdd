//! The Node annotation schema kwire publishes and reads.

/// The node's WireGuard public key, base64 as `wg` prints it.
pub const PUBLIC_KEY: &str = "kwire.dev/public-key";
/// The node's WireGuard endpoint, `ip:port` (`[v6]:port`).
pub const ENDPOINT: &str = "kwire.dev/endpoint";
/// Persistent keepalive for a node behind NAT, in seconds.
pub const PERSISTENT_KEEPALIVE: &str = "kwire.dev/persistent-keepalive";
/// `"true"` on a Node whose underlay address its peers cannot reach (behind NAT): its agent
/// sends keepalives to every peer so that the NAT keeps its mapping, and the peers learn the
/// address its packets come from (set by the operator; the agent's `--behind-nat` does the same).
pub const BEHIND_NAT: &str = "kwire.dev/behind-nat";
