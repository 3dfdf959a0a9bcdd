//! An agent whose API connections die silently (a NAT that dropped its mappings, a black-holed
//! path) notices it and watches again, rather than waiting for the watch's own timeout (kube's
//! watcher gives a silent watch up after 295 s; the stand-in, like kube-apiserver, sends a
//! bookmark only about once a minute):
//! - a `kwire-lab` of two nodes, one pod each, agents run with `--api-keepalive=2s` (a dead
//!   connection is given up 5 s after its last packet);
//! - every TCP connection n2 has to the API is black-holed in n2's namespace (packets of those
//!   connections dropped both ways, silently; new connections pass, as behind a NAT whose
//!   old mappings are gone);
//! - the Node watch (its own thread and client) reports the dead connection, a deny-all
//!   NetworkPolicy applied after the loss is enforced on n2, and an annotation put on n1's
//!   Node after it (`kwire.dev/persistent-keepalive`) reaches n2's device, all within a bound
//!   set by the keepalive, far below the watch timeout.
//!
//! With `--api-keepalive=0s` (no keepalive: the agent before this test) neither happens
//! within the bound. Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::time::{Duration, Instant};

use std::path::PathBuf;

use kwire_tests::lab::{kubectl, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until, Scratch};

/// Every agent's API keepalive; the dead connection is given up 2 + 3 × 1 s after its last
/// packet.
const KEEPALIVE: &str = "--agent-arg=--api-keepalive=2s";
/// The keepalive's 5 s, the watch's first retry (≤ 0.5 s), the re-watch and the policy reaching
/// the loop, with room for a loaded machine; kube's watch idle limit alone would take 295 s.
const NOTICED: Duration = Duration::from_secs(25);
/// The mesh comes up and a first policy-free probe answers.
const CONVERGE: Duration = Duration::from_secs(30);
/// The nftables table that black-holes n2's API connections.
const LOSS_TABLE: &str = "kwire_test_api_loss";

const DENY_ALL: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "deny-all", "namespace": "default"},
 "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}"#;

/// Local ports of node `node`'s established TCP connections to the API (port 6443).
fn api_connections(lab: &Lab, node: &str) -> Vec<u16> {
    let o = lab.exec(
        node,
        &["ss", "-Htn", "state", "established", "( dport = :6443 )"],
    );
    assert!(o.status.success(), "ss on {node}: {o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|local| local.rsplit_once(':')?.1.parse().ok())
        .collect()
}

/// Drops every packet of the connections from `ports` to the API, both ways, without a
/// reset: to the agent the path just goes silent.
fn black_hole(lab: &Lab, node: &str, ports: &[u16]) {
    let set = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let rules = format!(
        "add table inet {LOSS_TABLE}\n\
         add chain inet {LOSS_TABLE} out {{ type filter hook output priority 0; }}\n\
         add chain inet {LOSS_TABLE} in {{ type filter hook input priority 0; }}\n\
         add rule inet {LOSS_TABLE} out tcp dport 6443 tcp sport {{ {set} }} drop\n\
         add rule inet {LOSS_TABLE} in tcp sport 6443 tcp dport {{ {set} }} drop\n"
    );
    // `exec` passes no stdin: the rules go through a file.
    let f = lab.dir().join(format!("{node}-api-loss.nft"));
    std::fs::write(&f, rules).unwrap();
    let o = lab.exec(node, &["nft", "-f", f.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "black-hole the API connections of {node}: {o:?}"
    );
}

/// The persistent keepalive node `node`'s device has for its peer `peer` (from its UAPI).
fn keepalive_to(lab: &Lab, node: &str, peer: &str) -> Option<u64> {
    let st = lab.status();
    let find = |name: &str| {
        st["nodes"]
            .array()
            .iter()
            .find(|n| n["name"].as_str() == Some(name))
            .cloned()
    };
    let socket = PathBuf::from(find(node)?["uapi_socket"].as_str()?);
    let key = find(peer)?["public_key"].as_str()?.to_string();
    let peers = kwire_lab::commands::status::uapi_get(&socket).ok()?;
    Some(
        peers
            .iter()
            .find(|p| p.public_key == key)?
            .persistent_keepalive,
    )
}

#[test]
fn an_agent_whose_api_connections_went_silent_watches_again_within_its_keepalive() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("nft");
    require_tool("ss");
    require_tool("kubectl");
    let scratch = Scratch::new("lab-api-path-loss");
    let kwire = kwire.to_str().expect("UTF-8 path");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire,
            "--pods",
            "1",
            "--timeout",
            "90",
            KEEPALIVE,
        ],
    );
    let (n1, n2) = (format!("{}-n1", lab.name()), format!("{}-n2", lab.name()));
    let admin = lab.cmd_ok("kubeconfig", &[]);
    wait_until(CONVERGE, "pod-2-1 answers pod-1-1", || {
        lab.probe("default/pod-1-1", "default/pod-2-1:80").reachable
    });

    // The agent's watches (Nodes on their own thread; Pods, Namespaces, NetworkPolicies,
    // Services, EndpointSlices, Peers on the main client) each hold a connection.
    let mut ports = Vec::new();
    wait_until(CONVERGE, "n2's watches connected to the API", || {
        ports = api_connections(&lab, &n2);
        ports.len() >= 2
    });
    let errors_before = lab.metric(&n2, "kwire_watch_errors_total");
    black_hole(&lab, &n2, &ports);
    let lost = Instant::now();
    let since = |what: &str| {
        eprintln!(
            "{what}: {:.1} s after the loss",
            lost.elapsed().as_secs_f64()
        )
    };

    // Changes made after the loss: only the watches can bring them.
    let f = scratch.file("deny-all.json");
    std::fs::write(&f, DENY_ALL).unwrap();
    lab.cmd_ok("apply", &["-f", f.to_str().unwrap()]);
    assert_eq!(keepalive_to(&lab, &n2, &n1), Some(0));
    let (ok, out) = kubectl(
        admin.trim(),
        &["annotate", "node", &n1, "kwire.dev/persistent-keepalive=7"],
    );
    assert!(ok, "annotate n1: {out}");

    wait_until(
        NOTICED,
        "n2's Node watch gave its dead connection up",
        || lab.metric(&n2, "kwire_watch_errors_total") > errors_before,
    );
    since("Node watch error");
    wait_until(NOTICED, "deny-all in force on n2", || {
        !lab.probe("default/pod-1-1", "default/pod-2-1:80").reachable
    });
    since("deny-all in force");
    assert!(
        lab.drops(&n2, "policy_ingress") > 0.0,
        "n2 dropped the probes by the new policy"
    );
    wait_until(NOTICED, "n2 keeps n1's session alive every 7 s", || {
        keepalive_to(&lab, &n2, &n1) == Some(7)
    });
    since("n1's keepalive on n2");
    // The old connections are still black-holed: the watches came back on new ones.
    let now = api_connections(&lab, &n2);
    assert!(
        now.iter().any(|p| !ports.contains(p)),
        "n2 has new API connections (old {ports:?}, now {now:?})"
    );
}
