//! `kwire-lab` with the real `kwire agent`: the mesh comes up, pods' gateways are reachable
//! across nodes over IPv4 and IPv6 through the tunnels, the underlay carries only WireGuard
//! UDP, nodes join and leave, and a node's new key is picked up. Skips (with a message) when
//! the kwire binary has no working `agent` subcommand yet. Needs root.

use std::time::Duration;

use kwire_tests::lab::{BridgeCapture, Json, JsonExt, Lab};
use kwire_tests::require_agent;
use kwire_tests::{run_host, try_wait_until, wait_until, Scratch};

/// WireGuard port of every agent in a lab.
const WG_PORT: &str = "51820";
/// Handshakes and routes of a fresh peer; generous for a debug build on a shared machine.
const CONVERGE: Duration = Duration::from_secs(30);

fn up_real(nodes: u32, kwire: &std::path::Path) -> Lab {
    Lab::up(
        nodes,
        &["--kwire", kwire.to_str().unwrap(), "--timeout", "45"],
    )
}

fn node<'a>(status: &'a Json, name: &str) -> &'a Json {
    status["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no node {name} in status"))
}

fn ping(lab: &Lab, from: &str, dst: &str) -> bool {
    lab.exec(from, &["ping", "-c1", "-W1", dst])
        .status
        .success()
}

fn wait_ping(lab: &Lab, from: &str, dst: &str) {
    wait_until(
        CONVERGE,
        format!("{from} reaches {dst} through the tunnel"),
        || ping(lab, from, dst),
    );
}

fn gateways(status: &Json, node_name: &str) -> Vec<String> {
    node(status, node_name)["gateway_ips"].strings()
}

fn public_key(lab: &Lab, node_name: &str) -> Option<String> {
    node(&lab.status(), node_name)["public_key"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn three_nodes_mesh_and_only_wireguard_crosses_the_underlay() {
    let kwire = require_agent!();
    let scratch = Scratch::new("lab-mesh");
    let lab = up_real(3, &kwire);
    wait_until(CONVERGE, "full mesh of 3 nodes", || lab.full_mesh());
    let st = lab.status();
    let names: Vec<String> = (1..=3).map(|i| format!("{}-n{i}", lab.name())).collect();

    // Everything on the bridge except link control (ARP, neighbour discovery, MLD and other
    // link-local multicast) and the agents' calls to the API stand-in.
    let capture = BridgeCapture::start(&lab, &scratch, "underlay",
        "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))",
    );
    for from in &names {
        for to in names.iter().filter(|t| *t != from) {
            let gw = gateways(&st, to);
            assert_eq!(gw.len(), 2, "{to}: {gw:?}");
            for addr in &gw {
                wait_ping(&lab, from, addr);
            }
        }
    }
    let lines = capture.stop();
    assert!(
        !lines.is_empty(),
        "no tunnel traffic seen on the underlay bridge"
    );
    let port = format!(".{WG_PORT}");
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains("UDP") && l.contains(&port)))
        .collect();
    assert!(
        other.is_empty(),
        "non-WireGuard packets on the underlay:\n{other:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("ICMP")),
        "plaintext ICMP on the underlay"
    );
}

#[test]
fn added_node_joins_and_deleted_node_is_dropped() {
    let kwire = require_agent!();
    let lab = up_real(2, &kwire);
    let name = lab.name().to_string();
    let added = lab.cmd_ok("add-node", &[]);
    let n3 = format!("{name}-n3");
    assert!(added.contains(&n3), "{added}");
    wait_until(CONVERGE, "full mesh with the added node", || {
        lab.full_mesh()
    });
    let st = lab.status();
    for addr in gateways(&st, &n3) {
        wait_ping(&lab, "n1", &addr);
    }
    for addr in gateways(&st, &format!("{name}-n1")) {
        wait_ping(&lab, "n3", &addr);
    }

    // Delete n3's Node from the API: n1 and n2 drop it as a peer and stop routing to it.
    let key = public_key(&lab, &n3).expect("n3 published its key");
    let api = st["api_url"].as_str().unwrap().to_string();
    let delete = lab.api_curl_args("DELETE", &format!("{api}/api/v1/nodes/{n3}"));
    run_host(&delete.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until(CONVERGE, "n1 and n2 drop the deleted node's peer", || {
        let st = lab.status();
        ["n1", "n2"].iter().all(|n| {
            node(&st, &format!("{name}-{n}"))["peers"]
                .array()
                .iter()
                .all(|p| {
                    p["public_key"].as_str() != Some(key.as_str())
                        || p["configured"].as_bool() == Some(false)
                })
        })
    });
    let gw = gateways(&st, &n3);
    assert!(
        !ping(&lab, "n1", &gw[0]),
        "n1 still reaches the deleted node's pods"
    );
}

#[test]
fn a_new_key_is_picked_up_and_traffic_resumes() {
    let kwire = require_agent!();
    let lab = up_real(2, &kwire);
    let name = lab.name().to_string();
    let n2 = format!("{name}-n2");
    wait_until(CONVERGE, "mesh", || lab.full_mesh());
    let st = lab.status();
    let gw = gateways(&st, &n2);
    wait_ping(&lab, "n1", &gw[0]);
    let old_key = public_key(&lab, &n2).expect("key");

    // A new key for n2: its state goes, its agent dies, the supervisor starts a fresh one.
    let state_dir = node(&st, &n2)["state_dir"].as_str().unwrap().to_string();
    let pid = node(&st, &n2)["agent_pid"].as_u64().expect("agent pid");
    std::fs::remove_dir_all(&state_dir).unwrap();
    run_host(&["kill", "-9", &pid.to_string()]);
    wait_until(CONVERGE, "n2 publishes a new key", || {
        public_key(&lab, &n2).is_some_and(|k| k != old_key)
    });
    // Traffic (the first ping) makes the handshake with the new key.
    for addr in &gw {
        wait_ping(&lab, "n1", addr);
    }
    wait_until(
        CONVERGE,
        "n1 and n2 have a handshake with n2's new key",
        || lab.full_mesh(),
    );
    let n1 = node(&lab.status(), &format!("{name}-n1")).clone();
    let new_key = public_key(&lab, &n2).unwrap();
    assert!(
        n1["peers"]
            .array()
            .iter()
            .all(|p| p["public_key"].as_str() != Some(old_key.as_str())),
        "n1 still has n2's old key as a peer: {n1:?}"
    );
    assert!(n1["peers"]
        .array()
        .iter()
        .any(|p| p["public_key"].as_str() == Some(new_key.as_str())));
    let n1_gw = gateways(&st, &format!("{name}-n1"));
    assert!(
        try_wait_until(CONVERGE, || ping(&lab, "n2", &n1_gw[1])),
        "n2 reaches n1 over IPv6 again"
    );
}
