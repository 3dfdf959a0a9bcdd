//! The NetworkPolicy connection table cannot be turned against other pods, on a `kwire-lab`
//! whose agents run with `--max-flows-per-pod 40` (`kwire-lab up --agent-arg`): one pod
//! opens UDP flows until its budget is spent, its next new flows are refused and counted
//! (`flow_limit`), while another pod on the same node keeps its established flow and opens
//! new ones. Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::time::Duration;

use kwire_tests::lab::{kwire_lab_bin, Json, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until, Scratch};

const LIMIT: usize = 40;

fn ip_of(st: &Json, pod: &str) -> String {
    st["pods"]
        .array()
        .iter()
        .find(|p| p["name"].as_str() == Some(pod))
        .unwrap_or_else(|| panic!("no pod {pod}"))["ips"]
        .strings()[0]
        .clone()
}

/// One UDP datagram from `pod` (source port `sport`) to `dst`:80; true if the pod's server
/// answered.
fn udp(lab: &Lab, pod: &str, dst: &str, sport: u16) -> bool {
    let o = lab.exec(
        &format!("default/{pod}"),
        &[
            "sh",
            "-c",
            &format!("echo hi | socat -T1 - UDP:{dst}:80,sourceport={sport},reuseaddr"),
        ],
    );
    !o.stdout.is_empty()
}

#[test]
fn a_pod_at_its_flow_limit_cannot_starve_another() {
    let kwire = require_agent!();
    require_tool("socat");
    let scratch = Scratch::new("flow-limit");
    let lab = Lab::named();
    let up = std::process::Command::new(kwire_lab_bin())
        .args(["up", "--name", lab.name(), "--nodes", "2", "--pods", "2"])
        .arg(format!("--agent-arg=--max-flows-per-pod={LIMIT}"))
        .args(["--kwire", kwire.to_str().unwrap(), "--timeout", "90"])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // Any policy turns the connection table on; this one lets everything in.
    let f = scratch.file("allow-all.json");
    std::fs::write(
        &f,
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-all", "namespace": "default"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}})
        .to_string(),
    )
    .unwrap();
    lab.cmd_ok("apply", &["-f", f.to_str().unwrap()]);
    let st = lab.status();
    let server = ip_of(&st, "pod-2-1");
    wait_until(
        Duration::from_secs(30),
        "pod-1-1 reaches pod-2-1 over UDP",
        || udp(&lab, "pod-1-1", &server, 7000),
    );

    // pod-1-2 opens new flows until its budget is spent.
    let refused_before = lab.metric("n1", r#"kwire_drops_total{reason="flow_limit"}"#);
    let answered: Vec<bool> = (0..LIMIT as u16 + 15)
        .map(|i| udp(&lab, "pod-1-2", &server, 20_000 + i))
        .collect();
    let ok = answered.iter().filter(|a| **a).count();
    let refused = lab.metric("n1", r#"kwire_drops_total{reason="flow_limit"}"#) - refused_before;
    println!(
        "pod-1-2: {ok} of {} new flows answered; n1 flow_limit drops +{refused}; table {} flows",
        answered.len(),
        lab.metric("n1", "kwire_conntrack_flows")
    );
    assert!(
        ok <= LIMIT && answered[LIMIT..].iter().all(|a| !a),
        "flows past the budget were admitted: {answered:?}"
    );
    assert!(refused >= 15.0, "refused flows not counted: {refused}");

    // pod-1-1: its established flow and new flows are unaffected.
    assert!(
        udp(&lab, "pod-1-1", &server, 7000),
        "established flow broken"
    );
    for sport in 7001..7011 {
        assert!(
            udp(&lab, "pod-1-1", &server, sport),
            "new flow {sport} refused"
        );
    }
    assert_eq!(
        lab.metric("n1", "kwire_conntrack_flows_per_pod_max"),
        LIMIT as f64
    );
}
