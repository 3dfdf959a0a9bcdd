//! Packet and drop counters of the loop: atomics, added once per batch where possible; read
//! by the userspace API, `kwire status` and `/metrics`.

use boringtun::noise::errors::WireGuardError;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the loop dropped a packet. `Copy`, no data: counted, never formatted per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DropReason {
    /// No peer's allowed IPs contain the destination.
    NoPeer,
    /// The peer has no endpoint to send to yet.
    NoEndpoint,
    /// A decrypted packet's source is outside the sending peer's allowed IPs.
    NotAllowedIp,
    /// AEAD authentication failed.
    Decrypt,
    /// A counter already seen or too old.
    Replay,
    /// A datagram that is not a WireGuard message, or an inner packet that is not IP.
    Malformed,
    /// A message for a session index we do not know.
    UnknownSession,
    /// A handshake message that failed verification (MAC, key, timestamp).
    Handshake,
    /// A handshake from a source over its rate, or while under load without a cookie.
    RateLimited,
    /// The device has no private key.
    NoKey,
    /// A frame from the tun our offload code could not split.
    Offload,
    /// The kernel refused a write to the tun.
    TunWrite,
    /// The kernel refused a UDP send.
    UdpSend,
    /// A pod sent a packet whose source is not one of its own addresses.
    SpoofedSource,
    /// A decrypted packet for an address that is neither a local pod nor this node.
    NoRoute,
    /// Multicast from a tun (IPv6 router solicitations, MLD): the overlay is unicast only.
    Multicast,
    /// A new flow leaving a local pod that its NetworkPolicies do not allow.
    PolicyEgress,
    /// A new flow entering a local pod that its NetworkPolicies do not allow.
    PolicyIngress,
    /// Larger than the tunnel MTU (answered with an ICMP error when DF is set or IPv6).
    Mtu,
    /// A new flow to a Service without a usable endpoint (answered with a TCP reset or ICMP
    /// port unreachable).
    ServiceNoEndpoint,
    /// A new flow to a Service whose traffic policy is `Local` and that has no endpoint on
    /// this node (dropped, as kube-proxy does: a load balancer's health check steers away).
    ServiceNoLocalEndpoint,
    /// Plaintext forwarded toward the tun from another interface (the host firewall's count).
    UnderlayPlaintext,
    /// A new flow of a pod whose connection-table budget (or the whole table) is full, or a
    /// new flow to a Service while the Service translation table is full.
    FlowLimit,
    /// A new flow of a pod before the node has any NetworkPolicy snapshot (fail closed until
    /// the first lists arrive; a restart with a readable saved policy never has this).
    PolicyNotSynced,
}

impl DropReason {
    pub const ALL: [DropReason; 24] = [
        DropReason::NoPeer,
        DropReason::NoEndpoint,
        DropReason::NotAllowedIp,
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::Malformed,
        DropReason::UnknownSession,
        DropReason::Handshake,
        DropReason::RateLimited,
        DropReason::NoKey,
        DropReason::Offload,
        DropReason::TunWrite,
        DropReason::UdpSend,
        DropReason::SpoofedSource,
        DropReason::NoRoute,
        DropReason::Multicast,
        DropReason::PolicyEgress,
        DropReason::PolicyIngress,
        DropReason::Mtu,
        DropReason::ServiceNoEndpoint,
        DropReason::ServiceNoLocalEndpoint,
        DropReason::UnderlayPlaintext,
        DropReason::FlowLimit,
        DropReason::PolicyNotSynced,
    ];

    /// The `reason` label in metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            DropReason::NoPeer => "no_peer",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NotAllowedIp => "not_allowed_ip",
            DropReason::Decrypt => "decrypt",
            DropReason::Replay => "replay",
            DropReason::Malformed => "malformed",
            DropReason::UnknownSession => "unknown_session",
            DropReason::Handshake => "handshake",
            DropReason::RateLimited => "rate_limited",
            DropReason::NoKey => "no_key",
            DropReason::Offload => "offload",
            DropReason::TunWrite => "tun_write",
            DropReason::UdpSend => "udp_send",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoRoute => "no_route",
            DropReason::Multicast => "multicast",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::Mtu => "mtu",
            DropReason::ServiceNoEndpoint => "service_no_endpoint",
            DropReason::ServiceNoLocalEndpoint => "service_no_local_endpoint",
            DropReason::UnderlayPlaintext => "underlay_plaintext",
            DropReason::FlowLimit => "flow_limit",
            DropReason::PolicyNotSynced => "policy_not_synced",
        }
    }

    /// Maps boringtun's error for an incoming message to a reason.
    pub fn from_wireguard(e: &WireGuardError) -> DropReason {
        match e {
            WireGuardError::InvalidAeadTag => DropReason::Decrypt,
            WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
            WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => {
                DropReason::UnknownSession
            }
            WireGuardError::UnderLoad => DropReason::RateLimited,
            WireGuardError::InvalidPacket
            | WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType => DropReason::Malformed,
            _ => DropReason::Handshake,
        }
    }
}

/// Counters of one device.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Packets from the tun sent encrypted to peers.
    pub packets_tx: AtomicU64,
    /// Packets decrypted and delivered to the tun.
    pub packets_rx: AtomicU64,
    /// Packets delivered on this node without the tunnel (pod to pod, pod to host).
    pub packets_local: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn drop(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn drop_n(&self, r: DropReason, n: u64) {
        if n > 0 {
            self.drops[r as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count.
    pub fn all_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r)))
    }
}
