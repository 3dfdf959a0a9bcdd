//! Services across an agent restart, with the API unreachable from the restarted node (a
//! `kwire-lab` of two nodes; a client pod on n1, the Service's only backend on n2):
//! - the client reaches the Service's ClusterIP; n1 saves its Service inputs
//!   (`service-state.bin`);
//! - n1's agent cut off from the API and killed (SIGKILL; the lab's supervisor restarts it as
//!   the kubelet would): the restarted agent translates the ClusterIP from the saved inputs at
//!   once, so the client (its DNS, in a real cluster) still reaches the backend, and `/readyz`
//!   says ready;
//! - the saved file removed and the agent killed again: no service table, `/readyz` says not
//!   ready and names it, and the client's flow to the ClusterIP goes nowhere: untranslated,
//!   it reaches the host, whose route for the Service range leads back into the tun, where
//!   the packet loop drops it (`no_peer`); the host firewall keeps the range off every other
//!   interface;
//! - the API reachable again: the lists arrive, the client reaches the Service, `/readyz`
//!   says ready and the file is written again.
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::time::Duration;

use kwire_tests::lab::{lab_service, shop_pod, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until, Scratch};
use nix::sys::signal::Signal;

/// Pods running, slices written, tables compiled; the API lists a restarted agent.
const CONVERGE: Duration = Duration::from_secs(30);
/// The supervisor restarts a dead agent (after its backoff) and the new one serves CNI.
const RESTART: Duration = Duration::from_secs(40);
/// The nftables table that cuts the node off from the API (the stand-in's port).
const BLOCK_TABLE: &str = "kwire_test_no_api_svc";
const UP_TIMEOUT_SECS: &str = "40";

fn manifest(lab: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
{}{}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
"#,
        shop_pod(lab, "client", "n1", "app: client", 8080),
        shop_pod(lab, "web-2", "n2", "app: web", 9090),
    )
}

#[test]
fn a_restarted_agent_translates_the_last_services_without_the_api() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("nft");
    let scratch = Scratch::new("lab-services-restart");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    let n1 = format!("{}-n1", lab.name());
    let saved = lab.state_dir(&n1).join("service-state.bin");
    let file = scratch.file("shop.yaml");
    std::fs::write(&file, manifest(lab.name())).unwrap();
    lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);
    let mut st = lab.status();
    wait_until(CONVERGE, "shop/web with its endpoint", || {
        st = lab.status();
        lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().len() == 1)
    });
    let vip = lab_service(&st, "shop", "web").unwrap()["cluster_ips"].strings()[0].clone();
    let to = format!("{vip}:80");
    let reaches = || lab.probe("shop/client", &to).reachable;
    wait_until(CONVERGE, "the client reaches shop/web's ClusterIP", reaches);
    wait_until(CONVERGE, "n1 saved its Service inputs", || {
        std::fs::read(&saved).is_ok_and(|b| b.windows(3).any(|w| w == b"web"))
    });

    // 1. No API, SIGKILL: the restored table translates from the start.
    lab.block_api(&n1, BLOCK_TABLE);
    lab.signal_agents(&[&n1], Signal::SIGKILL, RESTART);
    wait_until(
        CONVERGE,
        "the client reaches the ClusterIP through the restored table",
        reaches,
    );
    wait_until(CONVERGE, "n1 ready with the restored table", || {
        lab.readyz(&n1).0 == "200"
    });
    assert_eq!(lab.metric(&n1, "kwire_service_state_errors_total"), 0.0);

    // 2. No API, no saved file: no table, not ready, the ClusterIP refused on the node.
    std::fs::remove_file(&saved).expect("remove service-state.bin");
    lab.signal_agents(&[&n1], Signal::SIGKILL, RESTART);
    wait_until(
        CONVERGE,
        "n1's /readyz names the missing service table",
        || lab.readyz(&n1).1.contains("no service table"),
    );
    let refused_before = lab.drops(&n1, "no_peer");
    for i in 0..3 {
        let p = lab.probe("shop/client", &to);
        assert!(
            !p.reachable,
            "probe {i} reached the ClusterIP with no table: {}",
            p.detail
        );
    }
    assert!(
        lab.drops(&n1, "no_peer") > refused_before,
        "the loop dropped the untranslated ClusterIP flows"
    );
    let (code, body) = lab.readyz(&n1);
    assert_eq!(code, "503", "not ready without a service table: {body}");

    // 3. The API back: the lists arrive, the Service answers, the file is written again.
    lab.unblock_api(&n1, BLOCK_TABLE);
    wait_until(CONVERGE, "the client reaches the ClusterIP again", reaches);
    wait_until(CONVERGE, "n1 ready once the lists came", || {
        lab.readyz(&n1).0 == "200"
    });
    wait_until(CONVERGE, "n1 saved its Service inputs again", || {
        std::fs::read(&saved).is_ok_and(|b| b.windows(3).any(|w| w == b"web"))
    });
}
