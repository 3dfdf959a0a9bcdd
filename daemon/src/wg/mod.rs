//! WireGuard on top of boringtun's Noise core: keys, peers, the cryptokey routing table, the
//! device's configuration and the immutable snapshot the packet loop reads, and the
//! userspace API's text protocol.

pub mod allowed_ips;
pub mod device;
pub mod handshakes;
pub mod key;
pub mod ratelimit;
pub mod sessions;
pub mod uapi;

pub use device::{Device, Peer, Snapshot};
