//! The Node annotation schema kwire publishes and reads.

/// The node's WireGuard public key, base64 as `wg` prints it.
pub const PUBLIC_KEY: &str = "kwire.dev/public-key";
/// The node's WireGuard endpoint, `ip:port` (`[v6]:port`).
pub const ENDPOINT: &str = "kwire.dev/endpoint";
/// Persistent keepalive for a node behind NAT, in seconds.
pub const PERSISTENT_KEEPALIVE: &str = "kwire.dev/persistent-keepalive";
