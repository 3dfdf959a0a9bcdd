//! Open connections across agent restarts (a `kwire-lab` of two nodes whose agents write
//! their connection tables every second, `--flow-save-interval 1s`; a client pod on n1, a
//! server pod on n2 that speaks first: it pushes a line every 100 ms and reads nothing), under
//! NetworkPolicy that denies the client any new ingress:
//! - two connections, one to the server's pod IP (admitted by the policy's connection table)
//!   and one to its Service's ClusterIP (translated as well), carry lines;
//! - n1's agent stopped with SIGTERM (what a DaemonSet rollout sends; the lab's supervisor
//!   starts a new one): it saves its connection tables, the new agent puts them back, and both
//!   connections go on with no new line lost, though the client sends nothing that could
//!   re-open them;
//! - n1's agent killed (SIGKILL) once its periodic write has run: the new agent puts back
//!   what that write held, and both connections go on;
//! - n1's agent frozen (SIGSTOP), its file removed, then killed: nothing to put back, so the
//!   server's lines meet an empty table, are judged as new flows into the client and dropped
//!   (`policy_ingress`), and both connections stall: what every restart did before the tables
//!   were saved, and what a crash before the first write still does.
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::net::SocketAddr;
use std::time::Duration;

use kwire_tests::echo::{Listener, PushServer, PUSH_PORT};
use kwire_tests::lab::{lab_pod, lab_service, shop_pod, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until, Scratch};
use nix::sys::signal::Signal;

/// Pods running, slices written, tables compiled, policy in force.
const CONVERGE: Duration = Duration::from_secs(30);
/// The supervisor restarts a stopped agent and the new one serves CNI.
const RESTART: Duration = Duration::from_secs(40);
const UP_TIMEOUT_SECS: &str = "40";

fn manifest(lab: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
{}{}---
apiVersion: v1
kind: Service
metadata: {{name: push, namespace: shop}}
spec:
  selector: {{app: push}}
  ports:
  - {{name: push, port: {PUSH_PORT}, targetPort: {PUSH_PORT}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: deny-all, namespace: shop}}
spec: {{podSelector: {{}}, policyTypes: [Ingress]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-push, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: push}}}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: {PUSH_PORT}}}]
"#,
        shop_pod(lab, "client", "n1", "app: client", 8080),
        shop_pod(lab, "server", "n2", "app: push", 9090),
    )
}

#[test]
fn open_connections_survive_a_restart_or_a_crash_and_stall_without_the_file() {
    let kwire = require_agent!();
    require_tool("curl");
    let scratch = Scratch::new("lab-flows-restart");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
            "--agent-arg=--flow-save-interval=1s",
        ],
    );
    let n1 = format!("{}-n1", lab.name());
    let saved = lab.state_dir(&n1).join("flow-state.bin");
    let file = scratch.file("shop.yaml");
    std::fs::write(&file, manifest(lab.name())).unwrap();
    lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);
    let mut st = lab.status();
    // Both pods' addresses in the lab's status: the Service's endpoint can be there first.
    wait_until(CONVERGE, "shop/push with its endpoint", || {
        st = lab.status();
        let addressed =
            |name: &str| lab_pod(&st, "shop", name).is_some_and(|p| !p["ips"].strings().is_empty());
        lab_service(&st, "shop", "push").is_some_and(|s| s["endpoints"].array().len() == 1)
            && addressed("client")
            && addressed("server")
    });
    let field = |name: &str, key: &str| lab_pod(&st, "shop", name).unwrap()[key].clone();
    let server_ip = field("server", "ips").strings()[0].clone();
    let client_ip = field("client", "ips").strings()[0].clone();
    let client_ns = field("client", "netns").as_str().unwrap().to_string();
    let server_ns = field("server", "netns").as_str().unwrap().to_string();
    let vip = lab_service(&st, "shop", "push").unwrap()["cluster_ips"].strings()[0].clone();
    // The policy in force on n1: the server's node can no longer open a flow to the client.
    wait_until(CONVERGE, "deny-all in force for shop/client", || {
        !lab.probe("shop/server", &format!("{client_ip}:8080"))
            .reachable
    });

    let _server = PushServer::start(&server_ns);
    let to_pod: SocketAddr = format!("{server_ip}:{PUSH_PORT}").parse().unwrap();
    let to_vip: SocketAddr = format!("{vip}:{PUSH_PORT}").parse().unwrap();
    let direct = Listener::start(&client_ns, to_pod, "client -> server pod");
    let service = Listener::start(&client_ns, to_vip, "client -> ClusterIP");
    direct.wait_more(5, CONVERGE);
    service.wait_more(5, CONVERGE);

    // 1. SIGTERM: the tables saved and put back; both connections go on.
    lab.signal_agents(&[&n1], Signal::SIGTERM, RESTART);
    direct.wait_more(20, RESTART);
    service.wait_more(20, RESTART);

    // 2. SIGKILL once the new agent's periodic write has run: its tables put back.
    wait_until(RESTART, "n1's agent writes its tables", || saved.exists());
    lab.signal_agents(&[&n1], Signal::SIGKILL, RESTART);
    direct.wait_more(20, RESTART);
    service.wait_more(20, RESTART);

    // 3. A crash with no file: frozen so that it writes nothing more, the file removed, then
    // killed. The server's lines are new flows into the client, denied. (The new agent's
    // counters start from zero.)
    wait_until(RESTART, "n1's agent writes its tables", || saved.exists());
    let (pid, _) = lab.agent(&n1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    std::fs::remove_file(&saved).unwrap();
    lab.signal_agents(&[&n1], Signal::SIGKILL, RESTART);
    wait_until(
        CONVERGE,
        "n1 drops the server's lines as new ingress",
        || lab.drops(&n1, "policy_ingress") >= 2.0,
    );
    let (a, b) = (direct.read(), service.read());
    let more = lab.drops(&n1, "policy_ingress");
    wait_until(CONVERGE, "n1 drops the server's retransmissions", || {
        lab.drops(&n1, "policy_ingress") >= more + 2.0
    });
    assert_eq!(
        direct.read(),
        a,
        "a line reached the client past the policy"
    );
    assert_eq!(
        service.read(),
        b,
        "a line reached the client past the policy"
    );
}
