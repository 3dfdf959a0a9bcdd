//! The Node annotation schema kwire publishes and reads.

/// The node's WireGuard public key, base64 as `wg` prints it.
pub const PUBLIC_KEY: &str = "kwire.dev/public-key";
/// The node's WireGuard endpoint, `ip:port` (`[v6]:port`).
pub const ENDPOINT: &str = "kwire.dev/endpoint";
/// Persistent keepalive for a node behind NAT, in seconds.
pub const PERSISTENT_KEEPALIVE: &str = "kwire.dev/persistent-keepalive";
/// The key the node rotates to, while it rotates (base64): its peers handshake to it, and the
/// node answers handshakes addressed to either key until it promotes this one to
/// `kwire.dev/public-key` and removes this annotation.
pub const NEXT_PUBLIC_KEY: &str = "kwire.dev/next-public-key";
/// Public keys that must never be accepted again (base64, separated by commas or
/// whitespace): every kwire node drops sessions made with them and refuses them as a peer's
/// key. The node whose key is listed generates a fresh one. Set by `kwire key revoke` on the
/// node's own Node, or by an administrator on any Node.
pub const REVOKED_KEYS: &str = "kwire.dev/revoked-keys";
/// `"true"` on a Node whose underlay address its peers cannot reach (behind NAT): its agent
/// sends keepalives to every peer so that the NAT keeps its mapping, and the peers learn the
/// address its packets come from (set by the operator; the agent's `--behind-nat` does the same).
pub const BEHIND_NAT: &str = "kwire.dev/behind-nat";
/// Label naming a Node's site (a cloud region, an edge location): two nodes behind NAT in
/// the same location reach each other directly (one private network); per location, one
/// reachable node relays for NATed pairs (see `kwire.dev/relay-endpoint`).
pub const LOCATION: &str = "kwire.dev/location";
/// `ip:port` where a reachable node's agent relays the WireGuard datagrams of two nodes both
/// behind NAT (published by the agent unless it is behind NAT or `--relay-port 0`).
pub const RELAY_ENDPOINT: &str = "kwire.dev/relay-endpoint";
/// Peers whose authenticated WireGuard packets reach this node from an address other than
/// their published endpoint, as `node=ip:port` separated by commas (published by the agent;
/// absent when there are none). A node named here is behind NAT (or publishes a wrong
/// endpoint): its agent reads it and says so.
pub const NAT_OBSERVED: &str = "kwire.dev/nat-observed";
/// The Service ranges (`--service-cidr`) this node's agent serves to external peers
/// (`Peer`s), comma separated: `kwire peer config` gives them to the peer's entry node
/// (published by the agent; absent from agents that do not serve them).
pub const SERVICE_CIDR: &str = "kwire.dev/service-cidr";
