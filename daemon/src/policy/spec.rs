//! A NetworkPolicy read to the letter of networking.k8s.io/v1: defaults applied, selectors, ports and ipBlocks validated.

use std::fmt;

use k8s_openapi::api::networking::v1 as netv1;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ipset::{Cidr, CidrError};
use super::model::ObjectRef;
use super::selector::{LabelSelector, SelectorError};
use super::{Direction, Protocol};

/// A NetworkPolicy with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// Selects the pods of `namespace` the policy applies to; `{}` selects all of them.
    pub pod_selector: LabelSelector,
    /// `None` when policyTypes does not contain `Ingress`; `Some(empty)` isolates for ingress and
    /// allows nothing.
    pub ingress: Option<Vec<Rule>>,
    /// `None` when policyTypes does not contain `Egress`.
    pub egress: Option<Vec<Rule>>,
}

/// One ingress or egress rule: a flow matches when it matches a peer AND a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `from` / `to`. `None` when missing or empty: every address, in or out of the cluster.
    pub peers: Option<Vec<Peer>>,
    /// Empty when missing or empty: every port of every protocol.
    pub ports: Vec<PortSpec>,
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces matching `namespaces` (both must hold).
    /// `namespaces: None` means the policy's own namespace.
    Pods {
        namespaces: Option<LabelSelector>,
        pods: LabelSelector,
    },
    IpBlock(IpBlock),
    /// An entry that failed validation (kept in lenient parsing, see [`Policy::from_k8s_lenient`]):
    /// matches nothing.
    Invalid,
}

/// `ipBlock`: the addresses of `cidr` that are in none of `except`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

/// One entry of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// Which destination ports a [`PortSpec`] admits (for its protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// `port` omitted: all ports.
    All,
    /// `port` (and `endPort`), inclusive.
    Range(u16, u16),
    /// A named port, resolved against the destination pod's container ports.
    Named(String),
    /// An entry that failed validation (lenient parsing): matches nothing.
    Invalid,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::All => write!(f, "all {} ports", self.protocol),
            PortMatch::Range(lo, hi) if lo == hi => write!(f, "{lo}/{}", self.protocol),
            PortMatch::Range(lo, hi) => write!(f, "{lo}-{hi}/{}", self.protocol),
            PortMatch::Named(n) => write!(f, "{n}/{}", self.protocol),
            PortMatch::Invalid => f.write_str("(invalid port entry)"),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pods {
                namespaces: None,
                pods,
            } => write!(f, "podSelector {pods}"),
            Peer::Pods {
                namespaces: Some(ns),
                pods,
            } if pods.is_everything() => {
                write!(f, "namespaceSelector {ns}")
            }
            Peer::Pods {
                namespaces: Some(ns),
                pods,
            } => {
                write!(f, "namespaceSelector {ns} and podSelector {pods}")
            }
            Peer::IpBlock(b) if b.except.is_empty() => write!(f, "ipBlock {}", b.cidr),
            Peer::IpBlock(b) => {
                let except: Vec<String> = b.except.iter().map(Cidr::to_string).collect();
                write!(f, "ipBlock {} except {}", b.cidr, except.join(","))
            }
            Peer::Invalid => f.write_str("(invalid peer)"),
        }
    }
}

impl Policy {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The rules of one direction, `None` if the policy does not apply to it.
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Strict reading: any invalid part is an error naming the policy and the field.
    pub fn from_k8s(np: &netv1::NetworkPolicy) -> Result<Self, PolicyError> {
        let (policy, mut errors) = Self::from_k8s_lenient(np)?;
        match errors.is_empty() {
            true => Ok(policy),
            false => Err(errors.swap_remove(0)),
        }
    }

    /// Lenient reading for the control plane, failing closed: an invalid peer or port entry
    /// matches nothing, an invalid podSelector selects no pod, an unknown policyTypes value is
    /// ignored. Every problem is returned for logging. Fails only without a name.
    pub fn from_k8s_lenient(
        np: &netv1::NetworkPolicy,
    ) -> Result<(Self, Vec<PolicyError>), PolicyError> {
        let name = np
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(PolicyError::MissingName)?;
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let at = ObjectRef {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let mut errors = Vec::new();
        let mut err = |field: String, problem: Problem| {
            errors.push(PolicyError::Invalid {
                policy: Box::new(at.clone()),
                field,
                problem: Box::new(problem),
            });
        };

        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = match spec.pod_selector.as_ref().map(LabelSelector::from_k8s) {
            None => LabelSelector::everything(),
            Some(Ok(sel)) => sel,
            Some(Err(e)) => {
                err("spec.podSelector".into(), Problem::Selector(e));
                // Selects no pod: `pod` never exists with both values of one key.
                LabelSelector {
                    requirements: vec![
                        super::Requirement::Exists {
                            key: "kwire.dev/invalid-selector".into(),
                        },
                        super::Requirement::DoesNotExist {
                            key: "kwire.dev/invalid-selector".into(),
                        },
                    ],
                }
            }
        };

        // policyTypes default (API reference): Ingress always; Egress iff there are egress rules.
        let (mut has_ingress, mut has_egress) =
            (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
        if let Some(types) = spec.policy_types.as_ref() {
            has_ingress = false;
            has_egress = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => err(
                        format!("spec.policyTypes[{i}]"),
                        Problem::PolicyType(other.to_string()),
                    ),
                }
            }
        }

        let ingress = has_ingress.then(|| {
            let rules = spec.ingress.as_deref().unwrap_or_default();
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let path = format!("spec.ingress[{i}]");
                    parse_rule(
                        &path,
                        "from",
                        r.from.as_deref(),
                        r.ports.as_deref(),
                        &mut err,
                    )
                })
                .collect()
        });
        let egress = has_egress.then(|| {
            let rules = spec.egress.as_deref().unwrap_or_default();
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let path = format!("spec.egress[{i}]");
                    parse_rule(&path, "to", r.to.as_deref(), r.ports.as_deref(), &mut err)
                })
                .collect()
        });

        Ok((
            Policy {
                namespace,
                name,
                pod_selector,
                ingress,
                egress,
            },
            errors,
        ))
    }
}

fn parse_rule(
    path: &str,
    peers_field: &str,
    peers: Option<&[netv1::NetworkPolicyPeer]>,
    ports: Option<&[netv1::NetworkPolicyPort]>,
    err: &mut impl FnMut(String, Problem),
) -> Rule {
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                parse_peer(p).unwrap_or_else(|problem| {
                    err(format!("{path}.{peers_field}[{i}]"), problem);
                    Peer::Invalid
                })
            })
            .collect()
    });
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            parse_port(p).unwrap_or_else(|(protocol, problem)| {
                err(format!("{path}.ports[{i}]"), problem);
                PortSpec {
                    protocol,
                    port: PortMatch::Invalid,
                }
            })
        })
        .collect();
    Rule { peers, ports }
}

fn parse_peer(p: &netv1::NetworkPolicyPeer) -> Result<Peer, Problem> {
    let has_selector = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match (&p.ip_block, has_selector) {
        (Some(_), true) => Err(Problem::PeerBothKinds),
        (None, false) => Err(Problem::PeerEmpty),
        (Some(block), false) => {
            let cidr: Cidr = block.cidr.parse().map_err(Problem::Cidr)?;
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                let e: Cidr = e.parse().map_err(Problem::Cidr)?;
                // The API server rejects an except outside the cidr.
                let inside = e.addr().is_ipv4() == cidr.addr().is_ipv4()
                    && e.prefix() >= cidr.prefix()
                    && cidr.contains(e.addr());
                if !inside {
                    return Err(Problem::ExceptOutside {
                        cidr: cidr.to_string(),
                        except: e.to_string(),
                    });
                }
                except.push(e);
            }
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (None, true) => {
            let namespaces = p
                .namespace_selector
                .as_ref()
                .map(LabelSelector::from_k8s)
                .transpose()
                .map_err(Problem::Selector)?;
            let pods = p
                .pod_selector
                .as_ref()
                .map(LabelSelector::from_k8s)
                .transpose()
                .map_err(Problem::Selector)?
                .unwrap_or_default();
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn parse_port(p: &netv1::NetworkPolicyPort) -> Result<PortSpec, (Protocol, Problem)> {
    let proto_name = p.protocol.as_deref().unwrap_or("TCP");
    let protocol = Protocol::from_k8s(proto_name)
        .ok_or_else(|| (Protocol::Tcp, Problem::Protocol(proto_name.to_string())))?;
    let fail = |problem| (protocol, problem);
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => return Err(fail(Problem::EndPortWithoutPort)),
        (Some(IntOrString::String(name)), None) if !name.is_empty() => {
            PortMatch::Named(name.clone())
        }
        (Some(IntOrString::String(_)), None) => return Err(fail(Problem::Port("\"\"".into()))),
        (Some(IntOrString::String(_)), Some(_)) => return Err(fail(Problem::EndPortWithNamedPort)),
        (Some(IntOrString::Int(n)), end) => {
            let lo = valid_port(*n).ok_or_else(|| fail(Problem::Port(n.to_string())))?;
            let hi = match end {
                None => lo,
                Some(e) => valid_port(e).filter(|&hi| hi >= lo).ok_or_else(|| {
                    fail(Problem::EndPort {
                        port: lo,
                        end_port: e,
                    })
                })?,
            };
            PortMatch::Range(lo, hi)
        }
    };
    Ok(PortSpec { protocol, port })
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// What is wrong with one field of a NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Selector(SelectorError),
    #[error(transparent)]
    Cidr(CidrError),
    #[error("except {except} is not inside cidr {cidr}")]
    ExceptOutside { cidr: String, except: String },
    #[error("a peer must set ipBlock, or podSelector and/or namespaceSelector, not both kinds")]
    PeerBothKinds,
    #[error("a peer must set ipBlock, podSelector or namespaceSelector")]
    PeerEmpty,
    #[error("protocol {0:?} is not one of TCP, UDP, SCTP")]
    Protocol(String),
    #[error("port {0} is not a port number 1-65535 or a port name")]
    Port(String),
    #[error("endPort {end_port} must be a port number >= port {port}")]
    EndPort { port: u16, end_port: i32 },
    #[error("endPort is set without port")]
    EndPortWithoutPort,
    #[error("endPort cannot be used with a named port")]
    EndPortWithNamedPort,
    #[error("policyTypes value {0:?} is not Ingress or Egress")]
    PolicyType(String),
}

/// A NetworkPolicy that the engine cannot take as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("NetworkPolicy has no metadata.name")]
    MissingName,
    #[error("NetworkPolicy {policy}: {field}: {problem}")]
    Invalid {
        policy: Box<ObjectRef>,
        field: String,
        problem: Box<Problem>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> Result<Policy, PolicyError> {
        let np: netv1::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"}, "spec": spec
        }))
        .unwrap();
        Policy::from_k8s(&np)
    }

    #[test]
    fn policy_types_default() {
        let p = policy(serde_json::json!({"podSelector": {}})).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let p = policy(serde_json::json!({"podSelector": {}, "egress": [{}]})).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress.map(|e| e.len()), Some(1));
        // `egress: []` is not "having egress rules".
        let p = policy(serde_json::json!({"podSelector": {}, "egress": []})).unwrap();
        assert_eq!(p.egress, None);
        let p = policy(
            serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
        )
        .unwrap();
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
    }

    #[test]
    fn empty_peer_and_port_lists_mean_all() {
        let p = policy(
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [], "ports": []}, {}]}),
        )
        .unwrap();
        let rules = p.ingress.unwrap();
        assert_eq!(
            rules[0],
            Rule {
                peers: None,
                ports: vec![]
            }
        );
        assert_eq!(
            rules[1],
            Rule {
                peers: None,
                ports: vec![]
            }
        );
    }

    #[test]
    fn ports() {
        let p = policy(serde_json::json!({"podSelector": {}, "ingress": [{"ports": [
            {}, {"port": 80}, {"port": 80, "endPort": 90, "protocol": "UDP"}, {"port": "http", "protocol": "SCTP"}, {"protocol": "UDP"}
        ]}]}))
        .unwrap();
        let ports = &p.ingress.unwrap()[0].ports;
        assert_eq!(
            ports[0],
            PortSpec {
                protocol: Protocol::Tcp,
                port: PortMatch::All
            }
        );
        assert_eq!(
            ports[1],
            PortSpec {
                protocol: Protocol::Tcp,
                port: PortMatch::Range(80, 80)
            }
        );
        assert_eq!(
            ports[2],
            PortSpec {
                protocol: Protocol::Udp,
                port: PortMatch::Range(80, 90)
            }
        );
        assert_eq!(
            ports[3],
            PortSpec {
                protocol: Protocol::Sctp,
                port: PortMatch::Named("http".into())
            }
        );
        assert_eq!(
            ports[4],
            PortSpec {
                protocol: Protocol::Udp,
                port: PortMatch::All
            }
        );
    }

    #[test]
    fn invalid_parts_are_named() {
        let cases = [
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
                "spec.ingress[0].ports[0]",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
                "spec.ingress[0].ports[0]",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 0}]}]}),
                "spec.ingress[0].ports[0]",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"protocol": "tcp"}]}]}),
                "spec.ingress[0].ports[0]",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/24"]}}]}]}),
                "spec.egress[0].to[0]",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "spec.egress[0].to[0]",
            ),
            (
                serde_json::json!({"egress": [{}, {"to": [{}]}]}),
                "spec.egress[1].to[0]",
            ),
            (
                serde_json::json!({"policyTypes": ["ingress"]}),
                "spec.policyTypes[0]",
            ),
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
                "spec.podSelector",
            ),
        ];
        for (spec, field) in cases {
            let e = policy(spec.clone()).unwrap_err().to_string();
            assert!(e.contains("x/p") && e.contains(field), "{spec}: {e}");
        }
    }

    #[test]
    fn lenient_fails_closed() {
        let np: netv1::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{}], "ports": [{"port": 99999}]}]}
        }))
        .unwrap();
        let (p, errors) = Policy::from_k8s_lenient(&np).unwrap();
        assert_eq!(errors.len(), 2);
        let rule = &p.ingress.unwrap()[0];
        assert_eq!(rule.peers, Some(vec![Peer::Invalid]));
        assert_eq!(rule.ports[0].port, PortMatch::Invalid);
    }
}
