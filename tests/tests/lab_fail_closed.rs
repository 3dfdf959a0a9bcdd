//! Fail closed against hostile neighbours, on a `kwire-lab` whose nodes have a default route
//! through a gateway on the underlay (as real nodes do):
//! - nothing for the pod range of a Node without a kwire key leaves a node in plaintext, from
//!   a pod or from the node itself, IPv4 and IPv6, with the agent running and with it dead;
//!   the sender gets an ICMP unreachable and the drop is counted (`no_peer`);
//! - plaintext sent from the underlay toward a pod (the node's underlay address as next hop),
//!   with the sender's own or a remote pod's source address, TCP, UDP and ICMP, never reaches
//!   the pod and is counted (`underlay_plaintext`), while a hostPort still answers;
//! - Nodes deleted and added again (also while an agent is down) leave no stale route or
//!   blackhole behind.
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::time::Duration;

use kwire_tests::lab::{kwire_lab_ok, node, BridgeCapture, Json, JsonExt, Lab};
use kwire_tests::{
    require_agent, require_tool, run_host, try_wait_until, wait_until, Capture, Netns, Scratch,
};

/// Mesh, pods and routes of a fresh lab; generous for a debug build on a shared machine.
const CONVERGE: Duration = Duration::from_secs(60);
/// The agent adds the firewall's counters to its metrics every 5 s.
const COUNTERS: Duration = Duration::from_secs(20);
/// The lab's cluster ranges (kwire-lab's naming: the stand-in allocates podCIDRs from them).
/// The lab's cluster ranges and Service range, as deploy/kwire.yaml sets them.
const CLUSTER_RANGES: [&str; 3] = ["10.244.0.0/16", "fd00:10:244::/56", "10.96.0.0/12"];
const CLUSTER_FILTER: &str = "net 10.244.0.0/16 or net fd00:10:244::/56";
const HOST_PORT: u16 = 18080;

fn pod_ips(st: &Json, name: &str) -> Vec<String> {
    st["pods"]
        .array()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no pod {name}: {:?}", st["pods"]))["ips"]
        .strings()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Applies one object (JSON) with `kwire-lab apply -f`.
fn apply(lab: &Lab, scratch: &Scratch, tag: &str, object: &serde_json::Value) {
    let f = scratch.file(&format!("{tag}.json"));
    std::fs::write(&f, object.to_string()).unwrap();
    lab.cmd_ok("apply", &["-f", f.to_str().unwrap()]);
}

/// A Node object from the lab's API.
fn api_node(lab: &Lab, name: &str) -> Option<Json> {
    let api = lab.status()["api_url"].as_str()?.to_string();
    let argv = lab.api_curl_args("GET", &format!("{api}/api/v1/nodes/{name}"));
    let o = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

/// Address `host` of a CIDR (`10.244.3.0/24`, 5 → `10.244.3.5`).
fn host_in(cidr: &str, host: u8) -> String {
    let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
    match net {
        ipnetwork::IpNetwork::V4(n) => {
            std::net::Ipv4Addr::from(u32::from(n.network()) + u32::from(host)).to_string()
        }
        ipnetwork::IpNetwork::V6(n) => {
            std::net::Ipv6Addr::from(u128::from(n.network()) + u128::from(host)).to_string()
        }
    }
}

/// Stops the lab's supervisor (so that it restarts no agent) until dropped.
struct SupervisorPaused(u32);

impl SupervisorPaused {
    fn new(lab: &Lab) -> SupervisorPaused {
        let pid = lab.status()["supervisor_pid"]
            .as_u64()
            .expect("supervisor pid") as u32;
        run_host(&["kill", "-STOP", &pid.to_string()]);
        SupervisorPaused(pid)
    }
}

impl Drop for SupervisorPaused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Kills node `n`'s (`n1`) agent (the supervisor must be paused) and waits until its tun has lost
/// its reader (NO-CARRIER).
fn kill_agent(lab: &Lab, n: &str) {
    let st = lab.status();
    let me = node(&st, &format!("{}-{n}", lab.name()));
    let pid = me["agent_pid"].as_u64().expect("agent pid");
    let tun = me["interface"].as_str().unwrap().to_string();
    run_host(&["kill", "-KILL", &pid.to_string()]);
    wait_until(
        Duration::from_secs(10),
        format!("{tun} loses its carrier"),
        || text(&lab.exec(n, &["ip", "link", "show", "dev", &tun])).contains("NO-CARRIER"),
    );
}

/// From a pod (`default/pod-1-1`) or a node (`n1`): ICMP echo, a TCP connection and a UDP
/// datagram to `dst`; true if anything got an answer.
fn poke(lab: &Lab, from: &str, dst: &str) -> bool {
    let v6 = dst.contains(':');
    let ping = lab.exec(
        from,
        &["ping", if v6 { "-6" } else { "-4" }, "-c1", "-W2", dst],
    );
    let target = if v6 {
        format!("[{dst}]")
    } else {
        dst.to_string()
    };
    let tcp = lab.exec(
        from,
        &[
            "socat",
            "-u",
            "/dev/null",
            &format!("TCP:{target}:80,connect-timeout=2"),
        ],
    );
    let _ = lab.exec(from, &["socat", "-u", "STDIN", &format!("UDP:{target}:80")]);
    ping.status.success() || tcp.status.success()
}

#[test]
fn a_keyless_nodes_pod_range_never_leaves_a_node_agent_alive_or_dead() {
    let kwire = require_agent!();
    require_tool("tcpdump");
    require_tool("socat");
    let scratch = Scratch::new("fc-keyless");
    let lab = Lab::up_real(2, 1, &kwire);
    wait_until(CONVERGE, "full mesh", || lab.full_mesh());
    let n1 = format!("{}-n1", lab.name());
    let st = lab.status();

    // A Node that runs no kwire (joining, or its annotations refused): pod CIDRs, no key.
    let ghost = format!("{}-ghost", lab.name());
    apply(
        &lab,
        &scratch,
        "ghost",
        &serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": ghost}}),
    );
    let mut cidrs = Vec::new();
    wait_until(CONVERGE, "the keyless Node gets pod CIDRs", || {
        cidrs = api_node(&lab, &ghost)
            .map(|n| n["spec"]["podCIDRs"].strings())
            .unwrap_or_default();
        cidrs.len() == 2
    });
    let targets: Vec<String> = cidrs.iter().map(|c| host_in(c, 5)).collect();

    // The capture sees plaintext with cluster addresses on the bridge when there is some:
    // the gateway itself sends some toward n1's own pod range.
    let control = BridgeCapture::start(&lab, &scratch, "control", CLUSTER_FILTER);
    let ul = st["underlay_netns"].as_str().unwrap().to_string();
    let n1_ip = node(&st, &n1)["underlay_ip"].as_str().unwrap().to_string();
    let n1_cidr = node(&st, &n1)["pod_cidrs"].strings()[0].clone();
    run_host(&["ip", "-n", &ul, "route", "replace", &n1_cidr, "via", &n1_ip]);
    let _ = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ul,
            "ping",
            "-c1",
            "-W1",
            &host_in(&n1_cidr, 1),
        ])
        .output();
    run_host(&["ip", "-n", &ul, "route", "del", &n1_cidr]);
    let seen = control.stop();
    assert!(!seen.is_empty(), "the control capture saw nothing");

    let no_peer_before = lab.drops("n1", "no_peer");
    let capture = BridgeCapture::start(&lab, &scratch, "keyless", CLUSTER_FILTER);
    let mut answers = Vec::new();
    for dst in &targets {
        assert!(!poke(&lab, "default/pod-1-1", dst), "pod reached {dst}");
        assert!(!poke(&lab, "n1", dst), "node reached {dst}");
        for from in ["default/pod-1-1", "n1"] {
            let o = lab.exec(from, &["ping", "-c1", "-W3", dst]);
            answers.push((from, dst, text(&o)));
        }
    }
    assert_no_leak(capture.stop(), "agent running");
    // Fast failure: an ICMP unreachable, not a timeout; and a counted drop.
    for (from, dst, t) in &answers {
        assert!(
            t.contains("nreachable"),
            "{from} -> {dst}: no ICMP unreachable:\n{t}"
        );
    }
    let counted = lab.drops("n1", "no_peer") - no_peer_before;
    assert!(
        counted >= 4.0,
        "no_peer drops on n1 went up by {counted} only"
    );

    // The agent dead: its routes and the cluster's unreachable routes stay.
    let _paused = SupervisorPaused::new(&lab);
    kill_agent(&lab, "n1");
    let capture = BridgeCapture::start(&lab, &scratch, "keyless-dead", CLUSTER_FILTER);
    let mut answers = Vec::new();
    for dst in &targets {
        assert!(!poke(&lab, "default/pod-1-1", dst), "pod reached {dst}");
        assert!(!poke(&lab, "n1", dst), "node reached {dst}");
        answers.push((dst, text(&lab.exec("n1", &["ping", "-c1", "-W3", dst]))));
    }
    assert_no_leak(capture.stop(), "agent dead");
    // The unreachable route answers at once (locally: EHOSTUNREACH).
    for (dst, t) in &answers {
        assert!(
            t.contains("nreachable") || t.contains("No route to host"),
            "n1 -> {dst} with the agent dead: no fast failure:\n{t}"
        );
    }
}

fn assert_no_leak(lines: Vec<String>, when: &str) {
    assert!(
        lines.is_empty(),
        "{when}: packets with cluster addresses on the underlay (plaintext outside the tunnel):\n{}",
        lines.join("\n")
    );
}

/// The lab's IPv6 underlay address of a node.
fn underlay_v6(lab: &Lab, n: &str) -> String {
    let out = text(&lab.exec(n, &["ip", "-6", "-o", "addr", "show", "scope", "global"]));
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no global IPv6 address on {n}: {out}"))
        .to_string()
}

#[test]
fn plaintext_from_the_underlay_never_reaches_a_pod_and_host_ports_still_work() {
    let kwire = require_agent!();
    require_tool("tcpdump");
    require_tool("socat");
    let scratch = Scratch::new("fc-underlay");
    let lab = Lab::up_real(2, 1, &kwire);
    wait_until(CONVERGE, "full mesh", || lab.full_mesh());
    let n1 = format!("{}-n1", lab.name());
    // A pod with a hostPort on n1 (portmap DNATs the node's port to it).
    apply(
        &lab,
        &scratch,
        "hostport",
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "hostport", "namespace": "default"},
            "spec": {"nodeName": n1, "containers": [{"name": "serve", "image": "kwire-lab/pod-serve",
                "ports": [{"containerPort": 80, "hostPort": HOST_PORT, "protocol": "TCP"}]}]}}),
    );
    let mut st = lab.status();
    wait_until(CONVERGE, "the hostPort pod runs", || {
        st = lab.status();
        st["pods"]
            .array()
            .iter()
            .any(|p| p["name"].as_str() == Some("hostport") && p["ips"].strings().len() == 2)
    });
    let victim = pod_ips(&st, "pod-1-1");
    let remote = pod_ips(&st, "pod-2-1");
    let n1_v4 = node(&st, &n1)["underlay_ip"].as_str().unwrap().to_string();
    let n1_v6 = underlay_v6(&lab, "n1");
    let cidrs = node(&st, &n1)["pod_cidrs"].strings();

    // An attacker on the underlay: its own addresses, and a remote pod's as spoofed sources.
    let atk = Netns::new("atk");
    let inner = lab.attach_to_underlay(&atk, "a");
    let prefix6 = n1_v6.rsplit_once(':').unwrap().0.to_string();
    let (atk_v4, atk_v6) = ("192.0.2.201".to_string(), format!("{prefix6}:c9"));
    atk.run(&["ip", "addr", "add", &format!("{atk_v4}/24"), "dev", &inner]);
    atk.run(&[
        "ip",
        "addr",
        "add",
        &format!("{atk_v6}/64"),
        "dev",
        &inner,
        "nodad",
    ]);
    atk.run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/32", remote[0]),
        "dev",
        &inner,
    ]);
    atk.run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/128", remote[1]),
        "dev",
        &inner,
        "nodad",
    ]);
    atk.run(&["ip", "link", "set", &inner, "up"]);
    for c in &cidrs {
        let via = if c.contains(':') { &n1_v6 } else { &n1_v4 };
        atk.run(&["ip", "route", "add", c, "via", via]);
    }
    atk.wait_ping(&n1_v4, Duration::from_secs(10));

    // Watch the pod's interface, and n1's underlay interface (where the injection arrives).
    let pod_ns = st["pods"]
        .array()
        .iter()
        .find(|p| p["name"].as_str() == Some("pod-1-1"))
        .and_then(|p| p["netns"].as_str())
        .unwrap()
        .to_string();
    let sources = [&atk_v4, &atk_v6, &remote[0], &remote[1]];
    let filter = sources
        .iter()
        .map(|s| format!("src host {s}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let at_pod = Capture::start_in(&pod_ns, "eth0", &filter, &scratch);
    let n1_netns = node(&st, &n1)["netns"].as_str().unwrap().to_string();
    let at_node = Capture::start_in(
        &n1_netns,
        "any",
        &format!("dst host {} or dst host {}", victim[0], victim[1]),
        &scratch,
    );
    let plaintext_before = lab.drops("n1", "underlay_plaintext");
    for (src, dst) in [
        (&atk_v4, &victim[0]),
        (&remote[0], &victim[0]),
        (&atk_v6, &victim[1]),
        (&remote[1], &victim[1]),
    ] {
        let v6 = dst.contains(':');
        let bracket = |a: &str| if v6 { format!("[{a}]") } else { a.to_string() };
        let ping = atk.exec(&["ping", "-c2", "-i0.2", "-W1", "-I", src, dst]);
        let tcp = atk.exec(&[
            "socat",
            "-u",
            "/dev/null",
            &format!(
                "TCP:{}:80,bind={},connect-timeout=2",
                bracket(dst),
                bracket(src)
            ),
        ]);
        let _ = atk.exec(&[
            "sh",
            "-c",
            &format!(
                "echo x | socat -u STDIN UDP:{}:80,bind={}",
                bracket(dst),
                bracket(src)
            ),
        ]);
        assert!(
            !ping.status.success() && !tcp.status.success(),
            "{src} reached pod {dst} from the underlay:\n{}\n{}",
            text(&ping),
            text(&tcp)
        );
    }
    let arrived = at_node.stop();
    let delivered = at_pod.stop();
    assert!(
        arrived
            .iter()
            .any(|l| l.contains("ICMP") || l.contains("echo")),
        "the injected packets never reached n1 (the test proves nothing):\n{}",
        arrived.join("\n")
    );
    assert!(
        delivered.is_empty(),
        "plaintext from the underlay reached the pod:\n{}",
        delivered.join("\n")
    );
    wait_until(COUNTERS, "underlay_plaintext drops counted on n1", || {
        lab.drops("n1", "underlay_plaintext") - plaintext_before >= 8.0
    });

    // A hostPort is the node's own translation: it still answers from the underlay.
    for host in [&n1_v4, &n1_v6] {
        let target = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let mut got = String::new();
        let ok = try_wait_until(Duration::from_secs(20), || {
            let o = atk.exec(&[
                "socat",
                "-T2",
                "STDIO",
                &format!("TCP:{target}:{HOST_PORT},connect-timeout=2"),
            ]);
            got = text(&o);
            o.status.success() && got.contains("hostport")
        });
        assert!(ok, "hostPort {target}:{HOST_PORT} from the underlay: {got}");
    }
}

/// n1's routes (all kinds) whose destination is exactly `cidr`.
fn routes_for(lab: &Lab, cidr: &str) -> String {
    let fam = if cidr.contains(':') { "-6" } else { "-4" };
    text(&lab.exec("n1", &["ip", fam, "route", "show", "exact", cidr]))
}

fn lab_node_cidrs(lab: &Lab, name: &str) -> Vec<String> {
    node(&lab.status(), name)["pod_cidrs"].strings()
}

#[test]
fn nodes_deleted_and_added_again_leave_no_stale_route() {
    let kwire = require_agent!();
    let lab = Lab::up_real(2, 0, &kwire);
    let name = lab.name().to_string();
    for _ in 0..2 {
        kwire_lab_ok(&["add-node", "--name", &name]);
    }
    wait_until(CONVERGE, "full mesh of 4", || lab.full_mesh());
    let (n3, n4) = (format!("{name}-n3"), format!("{name}-n4"));
    let n3_cidrs = lab_node_cidrs(&lab, &n3);
    let n4_cidrs = lab_node_cidrs(&lab, &n4);
    for c in n3_cidrs.iter().chain(&n4_cidrs) {
        let r = routes_for(&lab, c);
        assert!(
            r.contains("blackhole") && r.contains("metric 100"),
            "{c} on n1: {r}"
        );
    }

    // Gone while n1 runs: its routes and blackholes go.
    kwire_lab_ok(&["remove-node", "--name", &name, &n3]);
    wait_until(CONVERGE, "n1 forgets n3's routes and blackholes", || {
        n3_cidrs
            .iter()
            .all(|c| routes_for(&lab, c).trim().is_empty())
    });

    // Gone while n1's agent is down (frozen, so that it never sees the deletion, then
    // killed): the restarted agent finds and removes what is stale.
    let st = lab.status();
    let pid = node(&st, &format!("{name}-n1"))["agent_pid"]
        .as_u64()
        .expect("agent pid")
        .to_string();
    let api = st["api_url"].as_str().unwrap().to_string();
    // (No `kwire-lab status` while the agent is frozen: it asks the agent's socket.)
    run_host(&["kill", "-STOP", &pid]);
    run_host(&lab.api_curl_args("DELETE", &format!("{api}/api/v1/nodes/{n4}")));
    // Down: everything stays (fail closed).
    for c in &n4_cidrs {
        assert!(routes_for(&lab, c).contains("blackhole"), "{c}");
    }
    run_host(&["kill", "-KILL", &pid]);
    wait_until(CONVERGE, "the restarted n1 removes n4's routes", || {
        n4_cidrs
            .iter()
            .all(|c| routes_for(&lab, c).trim().is_empty())
    });
    // n4's namespace and agent go too (its Node is gone already).
    let _ = kwire_tests::lab::kwire_lab(&["remove-node", "--name", &name, &n4]);

    // Added again: a new node comes up with routes; the cluster range stays covered.
    let added = kwire_lab_ok(&["add-node", "--name", &name]);
    let n5 = added
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{name}-n")))
        .unwrap_or_else(|| panic!("add-node printed {added}"))
        .to_string();
    wait_until(CONVERGE, "n5 in the mesh", || lab.full_mesh());
    for c in lab_node_cidrs(&lab, &n5) {
        let r = routes_for(&lab, &c);
        assert!(
            r.contains("blackhole") && r.contains("metric 100"),
            "{c}: {r}"
        );
    }
    // The cluster ranges and the Service range (deploy/kwire.yaml's KWIRE_SERVICE_CIDR).
    for c in CLUSTER_RANGES {
        let r = routes_for(&lab, c);
        assert!(r.contains("unreachable"), "{c}: {r}");
    }
    // Every kwire route on n1 belongs to a live peer, n1 itself or a cluster range.
    let live: Vec<String> = lab.status()["nodes"]
        .array()
        .iter()
        .flat_map(|n| n["pod_cidrs"].strings())
        .chain(CLUSTER_RANGES.iter().map(|c| c.to_string()))
        .collect();
    for fam in ["-4", "-6"] {
        let all = text(&lab.exec("n1", &["ip", fam, "route", "show", "proto", "107"]));
        for line in all.lines() {
            let dst = line
                .split_whitespace()
                .find(|w| w.contains('/'))
                .unwrap_or_default();
            assert!(
                live.iter().any(|c| c == dst),
                "stale route on n1: {line}\n(live: {live:?})"
            );
        }
    }
}
