//! NetworkPolicy in the loop: a pod's new flows are checked against its egress rules when
//! they leave it and against the destination pod's ingress rules when they enter it, by the
//! compiled [`crate::policy::PolicySet`] of the current snapshot. The connection table
//! ([`super::conntrack`]) remembers what passed, so later packets and replies cost one lookup
//! and the engine runs once per new flow. Without any NetworkPolicy in the cluster the table
//! has no filter and nothing is looked up. Before a node's first snapshot (no saved policy to
//! restore, API lists not read yet) pods' new flows are dropped (`policy_not_synced`): fail
//! closed, the node's own traffic to its pods excepted.

use super::conntrack::{classify, Check, Classified, Decision, Flow};
use super::local::{addresses, Filter, LocalTable, Port};
use super::stats::DropReason;
use crate::policy::Protocol;

/// A packet leaving a pod (`from`) passes that pod's egress rules.
#[inline]
pub fn egress<T>(local: &LocalTable<T>, from: Port, pkt: &[u8]) -> Result<(), DropReason> {
    match (&local.filter, from) {
        (Some(f), Port::Pod(_)) => allows(f, Check::Egress, pkt),
        (None, Port::Pod(_)) if local.policy_pending => Err(DropReason::PolicyNotSynced),
        _ => Ok(()),
    }
}

/// A packet entering a pod (`to`) passes that pod's ingress rules. `from_node`: the node's
/// own traffic (its gateway address, from the host tun) is always allowed, as kubelet's
/// probes must be (the NetworkPolicy spec leaves the node's traffic to the plugin).
#[inline]
pub fn ingress<T>(
    local: &LocalTable<T>,
    to: Port,
    from_node: bool,
    pkt: &[u8],
) -> Result<(), DropReason> {
    match (&local.filter, to) {
        (Some(f), Port::Pod(_)) if !from_node => allows(f, Check::Ingress, pkt),
        (None, Port::Pod(_)) if !from_node && local.policy_pending => {
            Err(DropReason::PolicyNotSynced)
        }
        _ => Ok(()),
    }
}

/// Whether a pod's packet passes NetworkPolicy at `check`: replies and later packets of an
/// admitted flow by one connection-table lookup; a new flow by the policy engine, once. The
/// drop reason when not: the policy's, or `flow_limit` when the flow cannot be remembered.
#[inline]
fn allows(f: &Filter, check: Check, pkt: &[u8]) -> Result<(), DropReason> {
    let denied = match check {
        Check::Egress => DropReason::PolicyEgress,
        Check::Ingress => DropReason::PolicyIngress,
    };
    let flow = match classify(pkt) {
        Some(Classified::Packet(flow)) => flow,
        // ICMP errors pass only for a flow admitted here.
        Some(Classified::Error(about)) => {
            return f.conntrack.knows(about).then_some(()).ok_or(denied)
        }
        None => match addresses(pkt) {
            // A later fragment or an odd header: judged on addresses alone, port 0.
            Some((src, dst)) => Flow {
                proto: 0,
                src,
                dst,
                sport: 0,
                dport: 0,
            },
            None => return Err(denied),
        },
    };
    let d = f.conntrack.check(flow, check, || {
        let proto = Protocol::from_ip_protocol(flow.proto);
        let port = match flow.proto {
            6 | 17 | 132 => flow.dport,
            _ => 0,
        };
        match check {
            Check::Egress => f
                .policy
                .egress_verdict(flow.src, flow.dst, proto, port)
                .is_allowed(),
            Check::Ingress => f
                .policy
                .ingress_verdict(flow.src, flow.dst, proto, port)
                .is_allowed(),
        }
    });
    match d {
        Decision::Established | Decision::Admitted => Ok(()),
        Decision::Denied => Err(denied),
        Decision::Full => Err(DropReason::FlowLimit),
    }
}
