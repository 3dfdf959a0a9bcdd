//! The per-packet decisions of a node, free of I/O: for every frame read from a tun and every
//! datagram read from the network, what to do with it. Each pipeline returns an action
//! ([`TxAction`], [`RxAction`]) that the runtime ([`crate::dataplane`]) applies: deliver to a
//! pod or the host, encrypt to a peer, send datagrams, answer with an ICMP error or a cookie,
//! or drop with a [`DropReason`]. Decisions read a per-batch [`Ctx`] (snapshot, local table,
//! limiter, time) and write only into caller-owned buffers and the session and flow tables
//! they consult; they never count, log, or make a system call.
//!
//! One stage, one file; a pipeline is the list of its stages in order:
//!
//! ```text
//! frame from a tun (from_tun.rs)             drop reason (metric label)
//!   IP header                                malformed
//!   destination                              multicast
//!   antispoof.rs: pod source is its own      spoofed_source
//!   service.rs: to a ClusterIP: a backend    service_no_endpoint (TCP reset / ICMP back)
//!     (node port, ingress IP, hairpin)       service_no_local_endpoint
//!   policy.rs: source pod's egress           policy_egress
//!   route.rs: next hop
//!     a pod on this node: policy.rs ingress  policy_ingress      -> DeliverToPort(pod)
//!     a peer: route.rs MTU                   mtu (ICMP error back) -> EncryptToPeer
//!             private key set                no_key
//!     neither, from a pod                                        -> DeliverToPort(host)
//!     neither, from the host                 no_peer
//!   service.rs: a backend's reply gets the Service's address back (after policy)
//!   seal.rs: peer endpoint                   no_endpoint
//!            TSO split                       offload
//!            encapsulate                     handshake           -> datagrams in the batch
//!
//! datagram from the network (from_network.rs)
//!   message type and length                  malformed
//!   data: session index                      unknown_session (from a peer: + initiation)
//!         decrypt, replay window             decrypt, replay, unknown_session, malformed
//!         inner source in allowed IPs        not_allowed_ip
//!         route.rs: a pod or this node       no_route
//!         policy.rs: destination's ingress   policy_ingress
//!         service.rs: reply from a backend                       -> DeliverToPort
//!   handshake.rs: private key set            no_key
//!         MAC1, cookie when under load       malformed, handshake, rate_limited (+ cookie)
//!         per-source rate                    rate_limited
//!         initiator's key is a peer's        handshake
//!         response/cookie index known        unknown_session
//!   boringtun's handshake                    handshake, ...      -> WriteToNetwork (reply,
//!                                                                   then queued packets)
//! ```
//!
//! The runtime adds `tun_write` and `udp_send` when the kernel refuses a write.

pub mod antispoof;
pub mod conntrack;
pub mod from_network;
pub mod from_tun;
pub mod handshake;
pub mod icmp;
pub mod local;
pub mod nat;
pub mod policy;
pub mod route;
pub mod seal;
pub mod service;
pub mod stats;
pub mod timers;

use crate::offload::VNET_HDR_LEN;
use crate::wg::device::Snapshot;
use crate::wg::handshakes::Pacer;
use crate::wg::ratelimit::SourceLimiter;
use local::LocalTable;
use stats::Counters;
use std::time::Instant;

pub use from_network::{Receiver, RxAction};
pub use from_tun::TxAction;
pub use local::Port;
pub use seal::{Sealed, Sealer};
pub use stats::DropReason;

/// WireGuard data message overhead: 16 bytes of header, 16 of tag.
pub const DATA_OVERHEAD: usize = 32;
/// boringtun writes handshake initiations (148 bytes) into the same buffer as data.
pub const MIN_OUT: usize = 148;
/// Largest frame a tun hands over: virtio header plus a 64 KiB segment.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535;

/// What the per-packet code reads for one batch: built by the runtime once per batch of
/// reads (one epoll wake-up, one `recvmmsg`), never per packet.
pub struct Ctx<'a, T = ()> {
    /// Peers, allowed IPs, session indexes and keys: the device's current snapshot.
    pub snap: &'a Snapshot,
    /// Pods on this node, its gateway addresses, NetworkPolicy, the tunnel MTU.
    pub local: &'a LocalTable<T>,
    /// Where the runtime counts what it applied (the decisions never count).
    pub counters: &'a Counters,
    /// Handshake initiations per source address.
    pub limiter: &'a SourceLimiter,
    /// Initiations the device starts on its own (handshakes unknown sessions trigger).
    pub pacer: &'a Pacer,
    /// When the batch was read (rate limits).
    pub now: Instant,
    /// Frames on the tuns carry a virtio-net header.
    pub vnet: bool,
}

impl<'a, T> Ctx<'a, T> {
    /// Where the IP packet starts in a tun frame.
    #[inline]
    pub fn offset(&self) -> usize {
        if self.vnet {
            VNET_HDR_LEN
        } else {
            0
        }
    }
}

impl<'a> Ctx<'a, ()> {
    /// The context of an in-memory device without pods (tests, benches, fuzzing): every
    /// decrypted packet goes to the host tun, every frame from it to a peer. Such contexts
    /// share one pacer; the runtime's devices (`kwire tunnel`, the agent) use their own.
    pub fn host_only(
        snap: &'a Snapshot,
        counters: &'a Counters,
        limiter: &'a SourceLimiter,
        now: Instant,
        vnet: bool,
    ) -> Ctx<'a, ()> {
        Ctx {
            snap,
            local: LocalTable::host_only(),
            counters,
            limiter,
            pacer: &HOST_ONLY_PACER,
            now,
            vnet,
        }
    }
}

/// The pacer of in-memory devices (tests, benches, fuzzing).
pub static HOST_ONLY_PACER: Pacer = Pacer::new();

#[cfg(test)]
pub(crate) mod testing {
    use super::local::{LocalTable, PodPort};

    /// A node's local table: gateway `gateway`, one pod per address in `ips` (its slot and
    /// id are its index).
    pub(crate) fn pod_table(gateway: &str, ips: &[&str]) -> LocalTable<()> {
        let ports = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| PodPort {
                id: i as u64,
                ips: vec![ip.parse().unwrap()],
                io: (),
            })
            .collect();
        LocalTable::new(ports, vec![gateway.parse().unwrap()])
    }

    /// A minimal IPv4/UDP packet (ports 0, DF set, valid header checksum).
    pub(crate) fn udp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0u8; 8]);
        crate::offload::checksum::set_ipv4_header(&mut ip[..20]);
        ip
    }
}
