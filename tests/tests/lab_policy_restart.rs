//! NetworkPolicy across an agent restart, with the API unreachable from the restarted node
//! (a `kwire-lab` of two nodes, one pod each):
//! - a deny-all-ingress NetworkPolicy in force, the node's agent cut off from the API and
//!   killed (SIGKILL; the lab's supervisor restarts it as the kubelet would): the restarted
//!   agent enforces the saved policy at once, the pod stays unreachable (the drops are
//!   `policy_ingress`), where it used to forward with no policy at all;
//! - the saved file removed and the agent killed again: no policy to restore, the pod's new
//!   flows are dropped (`policy_not_synced`) rather than admitted;
//! - the policy deleted and the API reachable again: the pod answers (fail closed does not
//!   cut off a cluster without policies once the lists arrive);
//! - `/readyz` says ready with the restored policy, not ready (naming the missing
//!   NetworkPolicy) while nothing is restored or listed, and ready again once the lists came,
//!   so that a DaemonSet rolling update waits for this node's pods.
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::time::Duration;

use kwire_tests::lab::{JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until, Scratch};
use nix::sys::signal::Signal;

/// Policy changes reach the agents, and the API lists a restarted one, within this.
const CONVERGE: Duration = Duration::from_secs(30);
/// The supervisor restarts a dead agent (after its backoff) and the new one serves CNI.
const RESTART: Duration = Duration::from_secs(40);
/// After a restart the pod is probed this many times (a probe waits 2 s for an answer).
const PROBES_AFTER_RESTART: usize = 3;
/// The nftables table that cuts the node off from the API (the stand-in's port).
const BLOCK_TABLE: &str = "kwire_test_no_api";

const DENY_ALL: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "deny-all", "namespace": "default"},
 "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}"#;

/// Whether the saved inputs (binary; names as UTF-8) hold `name`; `None` without a file.
fn saved_has(saved: &std::path::Path, name: &str) -> Option<bool> {
    let bytes = std::fs::read(saved).ok()?;
    Some(bytes.windows(name.len()).any(|w| w == name.as_bytes()))
}

/// Waits until node `node` reaches the other node's gateway through the tunnel (node to
/// node: no pod, no NetworkPolicy on the way), so that a probe to its pod reaches its agent's
/// policy stage.
fn tunnel_carries(lab: &Lab, node: &str) {
    let st = lab.status();
    let other = st["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() != Some(node))
        .expect("another node");
    let gw = other["gateway_ips"].strings()[0].clone();
    wait_until(
        CONVERGE,
        format!("{node} reaches {gw} through the tunnel"),
        || {
            lab.exec(node, &["ping", "-c1", "-W1", &gw])
                .status
                .success()
        },
    );
}

/// The pod on `n2` stays unreachable from the one on `n1` for every probe.
fn stays_unreachable(lab: &Lab, what: &str) {
    for i in 0..PROBES_AFTER_RESTART {
        let p = lab.probe("default/pod-1-1", "default/pod-2-1:80");
        assert!(
            !p.reachable,
            "{what}: probe {i} reached the pod: {}",
            p.detail
        );
    }
}

#[test]
fn a_restarted_agent_enforces_the_last_policy_without_the_api_and_fails_closed_without_it() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("nft");
    let scratch = Scratch::new("lab-policy-restart");
    let lab = Lab::up_real(2, 1, &kwire);
    let n2 = format!("{}-n2", lab.name());
    let saved = lab.state_dir(&n2).join("policy-state.bin");
    wait_until(CONVERGE, "pod-2-1 answers pod-1-1", || {
        lab.probe("default/pod-1-1", "default/pod-2-1:80").reachable
    });

    // Deny all ingress in `default`; n2 saves it.
    let f = scratch.file("deny-all.json");
    std::fs::write(&f, DENY_ALL).unwrap();
    lab.cmd_ok("apply", &["-f", f.to_str().unwrap()]);
    wait_until(CONVERGE, "deny-all in force on n2", || {
        !lab.probe("default/pod-1-1", "default/pod-2-1:80").reachable
    });
    wait_until(CONVERGE, "n2 saved deny-all", || {
        saved_has(&saved, "deny-all") == Some(true)
    });

    // 1. No API, SIGKILL: the restored policy holds, from the start; once the new agent
    // has its session with n1 back, the probes reach its policy stage and are counted there
    // (before, they may end at a data plane not yet up or a session n2 no longer has).
    lab.block_api(&n2, BLOCK_TABLE);
    lab.signal_agents(&[&n2], Signal::SIGKILL, RESTART);
    stays_unreachable(&lab, "restored policy, API unreachable, just restarted");
    tunnel_carries(&lab, &n2);
    let before = lab.drops(&n2, "policy_ingress");
    stays_unreachable(&lab, "restored policy, API unreachable");
    assert!(
        lab.drops(&n2, "policy_ingress") > before,
        "the restored policy dropped the probes"
    );
    assert_eq!(lab.metric(&n2, "kwire_policy_state_errors_total"), 0.0);
    wait_until(CONVERGE, "n2 ready with the restored policy", || {
        lab.readyz(&n2).0 == "200"
    });

    // 2. No API, no saved file: fail closed.
    std::fs::remove_file(&saved).expect("remove policy-state.bin");
    lab.signal_agents(&[&n2], Signal::SIGKILL, RESTART);
    // Its peers restored and its tun programmed, the agent is still not ready: no policy.
    wait_until(
        CONVERGE,
        "n2's /readyz names the missing NetworkPolicy",
        || lab.readyz(&n2).1.contains("no NetworkPolicy"),
    );
    tunnel_carries(&lab, &n2);
    stays_unreachable(&lab, "nothing saved, API unreachable");
    assert!(
        lab.drops(&n2, "policy_not_synced") >= PROBES_AFTER_RESTART as f64,
        "new flows dropped as policy_not_synced"
    );
    let (code, body) = lab.readyz(&n2);
    assert_eq!(
        code, "503",
        "still not ready while pods are cut off: {body}"
    );
    assert_eq!(lab.metric(&n2, "kwire_ready"), 0.0);

    // 3. The policy gone and the API back: the lists arrive, the pod answers again.
    lab.cmd_ok("delete", &["-f", f.to_str().unwrap()]);
    lab.unblock_api(&n2, BLOCK_TABLE);
    wait_until(CONVERGE, "pod-2-1 answers again", || {
        lab.probe("default/pod-1-1", "default/pod-2-1:80").reachable
    });
    wait_until(CONVERGE, "n2 ready once the lists came", || {
        lab.readyz(&n2).0 == "200"
    });
    wait_until(CONVERGE, "n2 saved the policy-free inputs", || {
        saved_has(&saved, "deny-all") == Some(false)
    });
}
