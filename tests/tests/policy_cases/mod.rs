//! The upstream Kubernetes NetworkPolicy e2e cases (test/e2e/network/netpol) as 9x9 truth
//! tables over namespaces x, y, z with pods a, b, c, shared by the offline check
//! (`policy_e2e.rs`) and the live one on a kwire-lab cluster (`policy_live.rs`).
//!
//! Topology (fixtures/policy/cluster): namespaces x, y, z (labels ns=<name>), pods a, b, c in
//! each (labels pod=<name>), serving 80 and 81 over TCP, UDP and SCTP on ports named
//! serve-<port>-<protocol>. Expectations are written the way upstream writes them
//! (`NewReachability`, `ExpectPeer`, `ExpectAllIngress`, ...); loopback is ignored as upstream
//! does.
#![allow(dead_code)] // each test crate uses part of it

use std::net::IpAddr;
use std::path::PathBuf;

use kwire::policy::matrix::{PeerPattern, Reachability};
use kwire::policy::Protocol;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];

pub fn pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

pub fn pod_ip(pod: &str) -> IpAddr {
    let (ns, name) = pod.split_once('/').unwrap();
    let i = NAMESPACES.iter().position(|n| *n == ns).unwrap() + 1;
    let j = POD_NAMES.iter().position(|n| *n == name).unwrap() + 1;
    format!("10.0.{i}.{j}").parse().unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policy")
        .join(name)
}

fn ns(n: &'static str) -> PeerPattern<'static> {
    PeerPattern {
        namespace: Some(n),
        pod: None,
    }
}

fn any() -> PeerPattern<'static> {
    PeerPattern::default()
}

fn pod(ns: &'static str, p: &'static str) -> PeerPattern<'static> {
    PeerPattern {
        namespace: Some(ns),
        pod: Some(p),
    }
}

pub type Expect = fn(&mut Reachability);

pub struct Check {
    pub port: u16,
    pub protocol: Protocol,
    pub expect: Expect,
}

pub struct Step {
    pub files: Vec<&'static str>,
    pub checks: Vec<Check>,
}

pub struct Case {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

pub const NS: &str = "cluster/namespaces.yaml";
pub const PODS: &str = "cluster/pods.yaml";

fn step(policy_files: &[&'static str], checks: Vec<Check>) -> Step {
    let mut files = vec![NS, PODS];
    files.extend(policy_files.iter().copied());
    Step { files, checks }
}

fn step_with(files: &[&'static str], checks: Vec<Check>) -> Step {
    Step {
        files: files.to_vec(),
        checks,
    }
}

fn tcp(port: u16, expect: Expect) -> Check {
    Check {
        port,
        protocol: Protocol::Tcp,
        expect,
    }
}

fn udp(port: u16, expect: Expect) -> Check {
    Check {
        port,
        protocol: Protocol::Udp,
        expect,
    }
}

fn sctp(port: u16, expect: Expect) -> Check {
    Check {
        port,
        protocol: Protocol::Sctp,
        expect,
    }
}

fn all_open(_: &mut Reachability) {}

fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case { name, steps }
}

pub fn cases() -> Vec<Case> {
    vec![
        case("should support a 'default-deny-ingress' policy", vec![step(&["e2e/default-deny-ingress.yaml"], vec![
            tcp(80, |r| r.expect_peer(any(), ns("x"), false)),
        ])]),
        case("should support a 'default-deny-all' policy", vec![step(&["e2e/default-deny-all.yaml"], vec![tcp(80, |r| {
            r.expect_peer(any(), ns("x"), false);
            r.expect_peer(ns("x"), any(), false);
        })])]),
        case("should enforce policy to allow traffic from pods within server namespace based on PodSelector", vec![step(&["e2e/allow-from-podselector.yaml"], vec![tcp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("x/b", "x/a", true);
        })])]),
        case("should enforce policy to allow ingress traffic for a target", vec![step(&["e2e/allow-ingress-for-target.yaml"], vec![tcp(80, |r| {
            r.expect_peer(any(), ns("x"), false);
            r.expect_all_ingress("x/a", true);
        })])]),
        case("should enforce policy to allow ingress traffic from pods in all namespaces", vec![step(&["e2e/allow-from-all-namespaces.yaml"], vec![tcp(80, all_open)])]),
        case("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", vec![step(&["e2e/allow-from-namespaceselector.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("should enforce policy based on PodSelector with MatchExpressions", vec![step(&["e2e/podselector-matchexpressions.yaml"], vec![tcp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("x/b", "x/a", true);
        })])]),
        case("should enforce policy based on NamespaceSelector with MatchExpressions", vec![step(&["e2e/namespaceselector-matchexpressions.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("should enforce policy based on PodSelector or NamespaceSelector", vec![step(&["e2e/podselector-or-namespaceselector.yaml"], vec![tcp(80, |r| {
            r.expect("x/a", "x/a", false);
            r.expect("x/c", "x/a", false);
        })])]),
        case("should enforce policy based on PodSelector and NamespaceSelector", vec![step(&["e2e/podselector-and-namespaceselector.yaml"], vec![tcp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("y/b", "x/a", true);
            r.expect("z/b", "x/a", true);
        })])]),
        case("should enforce policy based on Multiple PodSelectors and NamespaceSelectors", vec![step(&["e2e/multiple-podselectors-and-namespaceselectors.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect("y/a", "x/a", false);
            r.expect("z/a", "x/a", false);
        })])]),
        case("should enforce policy based on any PodSelectors", vec![step(&["e2e/any-podselectors.yaml"], vec![tcp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("x/b", "x/a", true);
            r.expect("x/c", "x/a", true);
        })])]),
        case("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", vec![step(&["e2e/pod-in-other-namespace.yaml"], vec![tcp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("y/a", "x/a", true);
        })])]),
        case("should enforce policy based on Ports", vec![step(&["e2e/ports.yaml"], vec![tcp(81, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("y"), pod("x", "a"), true);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("should enforce multiple, stacked policies with overlapping podSelectors", vec![
            step(&["e2e/ports.yaml"], vec![
                tcp(81, |r| {
                    r.expect_peer(ns("x"), pod("x", "a"), false);
                    r.expect_peer(ns("y"), pod("x", "a"), true);
                    r.expect_peer(ns("z"), pod("x", "a"), false);
                }),
                tcp(80, |r| r.expect_all_ingress("x/a", false)),
            ]),
            step(&["e2e/ports.yaml", "e2e/stacked-port-80.yaml"], vec![tcp(80, |r| {
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("y"), pod("x", "a"), true);
                r.expect_peer(ns("z"), pod("x", "a"), false);
            })]),
        ]),
        case("should support allow-all policy", vec![step(&["e2e/allow-all.yaml"], vec![tcp(80, all_open), tcp(81, all_open)])]),
        case("should allow ingress access on one named port", vec![step(&["e2e/ingress-named-port.yaml"], vec![
            tcp(81, all_open),
            tcp(80, |r| r.expect_peer(any(), ns("x"), false)),
        ])]),
        case("should allow ingress access from namespace on one named port", vec![step(&["e2e/ingress-named-port-from-namespace.yaml"], vec![
            tcp(80, |r| {
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
            }),
            tcp(81, |r| r.expect_all_ingress("x/a", false)),
        ])]),
        case("should allow egress access on one named port", vec![step(&["e2e/egress-named-port.yaml"], vec![
            tcp(80, all_open),
            tcp(81, |r| r.expect_peer(ns("x"), any(), false)),
        ])]),
        case("should enforce updated policy", vec![
            step(&["e2e/updated-policy-1.yaml"], vec![tcp(81, all_open)]),
            step(&["e2e/updated-policy-2.yaml"], vec![tcp(81, |r| r.expect_peer(any(), ns("x"), false))]),
        ]),
        case("should allow ingress access from updated namespace", vec![
            step(&["e2e/updated-namespace.yaml"], vec![tcp(80, |r| r.expect_all_ingress("x/a", false))]),
            step_with(&["cluster/namespaces-y-ns2-updated.yaml", PODS, "e2e/updated-namespace.yaml"], vec![tcp(80, |r| {
                r.expect_all_ingress("x/a", false);
                r.expect_peer(ns("y"), any(), true);
            })]),
        ]),
        case("should allow ingress access from updated pod", vec![
            step(&["e2e/updated-pod.yaml"], vec![tcp(80, |r| r.expect_all_ingress("x/a", false))]),
            step_with(&[NS, "cluster/pods-xb-pod2-updated.yaml", "e2e/updated-pod.yaml"], vec![tcp(80, |r| {
                r.expect_all_ingress("x/a", false);
                r.expect("x/b", "x/a", true);
            })]),
        ]),
        case("should deny ingress from pods on other namespaces", vec![step(&["e2e/deny-from-other-namespaces.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("y"), ns("x"), false);
            r.expect_peer(ns("z"), ns("x"), false);
        })])]),
        case("should deny ingress access to updated pod", vec![
            step(&["e2e/deny-to-updated-pod.yaml"], vec![tcp(80, all_open)]),
            step_with(&[NS, "cluster/pods-xa-target-isolated.yaml", "e2e/deny-to-updated-pod.yaml"], vec![tcp(80, |r| {
                r.expect_all_ingress("x/a", false)
            })]),
        ]),
        case("should deny egress from pods based on PodSelector", vec![step(&["e2e/deny-egress-podselector.yaml"], vec![tcp(80, |r| {
            r.expect_all_egress("x/a", false)
        })])]),
        case("should deny egress from all pods in a namespace", vec![step(&["e2e/deny-egress-namespace.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("x"), any(), false)
        })])]),
        case("should work with Ingress, Egress specified together", vec![step(&["e2e/ingress-and-egress.yaml"], vec![
            tcp(80, |r| {
                r.expect_all_ingress("x/a", false);
                r.expect("x/b", "x/a", true);
            }),
            tcp(81, |r| {
                r.expect_all_ingress("x/a", false);
                r.expect_all_egress("x/a", false);
                r.expect("x/b", "x/a", true);
            }),
        ])]),
        case("should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", vec![step(&["e2e/egress-client-side-deny.yaml"], vec![tcp(80, |r| {
            r.expect_peer(pod("x", "a"), any(), false);
            r.expect_peer(any(), pod("y", "a"), false);
            r.expect_peer(pod("x", "a"), pod("y", "a"), true);
            r.expect_peer(any(), pod("y", "b"), false);
        })])]),
        case("should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", vec![step(&["e2e/egress-podselector-and-namespaceselector.yaml"], vec![tcp(80, |r| {
            r.expect_all_egress("x/a", false);
            r.expect("x/a", "y/a", true);
        })])]),
        case("should enforce ingress policy allowing any port traffic to a server on a specific protocol", vec![step(&["e2e/ingress-any-port-one-protocol.yaml"], vec![
            tcp(80, all_open),
            udp(80, |r| r.expect_peer(any(), pod("x", "a"), false)),
        ])]),
        case("should enforce multiple ingress policies with ingress allow-all policy taking precedence", vec![
            step(&["e2e/ingress-port-80.yaml"], vec![tcp(81, |r| r.expect_peer(any(), ns("x"), false))]),
            step(&["e2e/ingress-port-80.yaml", "e2e/ingress-allow-all.yaml"], vec![tcp(81, all_open)]),
        ]),
        case("should enforce multiple egress policies with egress allow-all policy taking precedence", vec![
            step(&["e2e/egress-port-80.yaml"], vec![tcp(81, |r| r.expect_peer(ns("x"), any(), false))]),
            step(&["e2e/egress-port-80.yaml", "e2e/egress-allow-all.yaml"], vec![tcp(81, all_open)]),
        ]),
        case("should stop enforcing policies after they are deleted", vec![
            step(&["e2e/default-deny-all.yaml"], vec![tcp(80, |r| {
                r.expect_peer(ns("x"), any(), false);
                r.expect_peer(any(), ns("x"), false);
            })]),
            step(&[], vec![tcp(80, all_open)]),
        ]),
        case("should allow egress access to server in CIDR block", vec![step(&["e2e/egress-cidr.yaml"], vec![tcp(80, |r| {
            r.expect_all_egress("x/a", false);
            r.expect("x/a", "y/b", true);
        })])]),
        case("should enforce except clause while egress access to server in CIDR block", vec![step(&["e2e/egress-cidr-except.yaml"], vec![tcp(80, |r| {
            r.expect("x/a", "x/b", false)
        })])]),
        case("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", vec![
            step(&["e2e/egress-cidr-except.yaml"], vec![tcp(80, |r| r.expect("x/a", "x/b", false))]),
            step(&["e2e/egress-cidr-except-updated.yaml"], vec![tcp(80, |r| {
                r.expect_all_egress("x/a", false);
                r.expect("x/a", "x/b", true);
            })]),
            step(&["e2e/egress-cidr-except.yaml", "e2e/egress-cidr-except-second-policy.yaml"], vec![tcp(80, all_open)]),
        ]),
        case("should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", vec![
            step(&["e2e/egress-allow-for-target.yaml"], vec![tcp(80, all_open)]),
            step(&["e2e/egress-allow-for-target.yaml", "e2e/deny-ingress-for-target.yaml"], vec![tcp(80, |r| {
                r.expect_all_ingress("x/a", false)
            })]),
        ]),
        case("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", vec![step(&["e2e/sctp-not-tcp.yaml"], vec![
            tcp(81, |r| r.expect_peer(any(), ns("x"), false)),
            sctp(81, |r| {
                r.expect_peer(any(), ns("x"), false);
                r.expect_all_ingress("x/a", true);
            }),
        ])]),
        case("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", vec![step(&["e2e/sctp-isolates.yaml"], vec![
            tcp(81, |r| r.expect_all_ingress("x/a", false)),
        ])]),
        case("should not allow access by TCP when a policy specifies only UDP", vec![step(&["e2e/udp-not-tcp.yaml"], vec![
            tcp(81, |r| r.expect_all_ingress("x/a", false)),
            udp(81, all_open),
        ])]),
        case("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", vec![step(&["e2e/allow-from-namespaceselector.yaml"], vec![tcp(80, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", vec![step(&["e2e/egress-namespace-notin.yaml"], vec![tcp(80, |r| {
            r.expect_peer(pod("x", "a"), ns("y"), false)
        })])]),
        case("UDP: should support a 'default-deny-ingress' policy", vec![step(&["e2e/default-deny-ingress.yaml"], vec![
            udp(80, |r| r.expect_peer(any(), ns("x"), false)),
        ])]),
        case("UDP: should enforce policy based on Ports", vec![step(&["e2e/ports-udp.yaml"], vec![udp(81, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", vec![step(&["e2e/pod-in-other-namespace.yaml"], vec![udp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("y/a", "x/a", true);
        })])]),
        case("SCTP: should support a 'default-deny-ingress' policy", vec![step(&["e2e/default-deny-ingress.yaml"], vec![
            sctp(80, |r| r.expect_peer(any(), ns("x"), false)),
        ])]),
        case("SCTP: should enforce policy based on Ports", vec![step(&["e2e/ports-sctp.yaml"], vec![sctp(81, |r| {
            r.expect_peer(ns("x"), pod("x", "a"), false);
            r.expect_peer(ns("z"), pod("x", "a"), false);
        })])]),
        case("SCTP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", vec![step(&["e2e/pod-in-other-namespace.yaml"], vec![sctp(80, |r| {
            r.expect_all_ingress("x/a", false);
            r.expect("y/a", "x/a", true);
        })])]),
        case("kwire: endPort admits the range only", vec![step(&["e2e/endport.yaml"], vec![
            tcp(80, |r| r.expect_all_ingress("x/a", false)),
            tcp(81, |r| {
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
            }),
            udp(81, |r| r.expect_all_ingress("x/a", false)),
        ])]),
        case("kwire: omitted policyTypes with egress rules isolates both directions; ipBlock except, Exists, NotIn, DoesNotExist", vec![step(&["e2e/egress-ipblock-external.yaml"], vec![
            tcp(80, |r| {
                r.expect_peer(any(), ns("x"), false);
                r.expect_peer(ns("x"), pod("z", "a"), false);
                r.expect_peer(ns("x"), pod("z", "b"), false);
            }),
            tcp(81, |r| {
                r.expect_peer(any(), ns("x"), false);
                r.expect_peer(ns("x"), any(), false);
                r.expect_peer(ns("x"), pod("y", "c"), true);
                r.expect_peer(ns("x"), pod("z", "c"), true);
            }),
            udp(81, |r| {
                r.expect_peer(any(), ns("x"), false);
                r.expect_peer(ns("x"), pod("y", "a"), false);
                r.expect_peer(ns("x"), pod("z", "a"), false);
            }),
        ])]),
    ]
}
