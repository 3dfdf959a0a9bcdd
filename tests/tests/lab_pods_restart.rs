//! `kwire-lab` pods while the agent dies: a `kwire agent` killed with SIGKILL (the lab's
//! supervisor restarts it) leaks nothing in plaintext on the underlay, and once it is back the
//! pods keep their addresses and a TCP connection opened before the kill goes on exchanging
//! lines (pod tuns are persistent and re-attached from the CNI server's state). Also: a pod
//! that sends from an address that is not its own is dropped and counted
//! (`kwire_drops_total{reason="spoofed_source"}`).
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`, or when the agent
//! does not serve the CNI socket.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kwire_tests::echo::{echo_once, EchoServer, Ticker, ECHO_PORT};
use kwire_tests::lab::{Json, JsonExt, Lab};
use kwire_tests::require_agent;
use kwire_tests::{
    prometheus_value, require_tool, run_host, try_wait_until, wait_until, Proc, Scratch,
};
use nix::sys::signal::Signal;

/// WireGuard port of every agent in a lab.
const WG_PORT: &str = "51820";
/// `up` (mesh and pods) must finish within this.
const UP_TIMEOUT_SECS: &str = "40";
/// How long the agent may take to serve its CNI socket once the lab is up.
const CNI_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// The supervisor restarts a dead agent and the new one re-attaches its pods within this
/// (a debug build on two shared cores).
const RESTART: Duration = Duration::from_secs(25);
/// What the underlay may carry besides WireGuard: link control (ARP, ND, MLD) and the agents'
/// calls to the API stand-in; everything else is captured (as tests/tests/lab_mesh.rs does).
const UNDERLAY_FILTER: &str = "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))";
/// Drop reasons that must not rise across a restart: each means forged, corrupted or
/// misrouted traffic, never the transient of a restart (the new agent knowing no session yet
/// is `unknown_session`, a pod not re-attached yet is `no_route`).
const ALARMING_DROPS: &[&str] = &[
    "not_allowed_ip",
    "decrypt",
    "replay",
    "malformed",
    "handshake",
    "spoofed_source",
    "offload",
    "policy_egress",
    "policy_ingress",
];
/// `handshake` drops do happen when two agents start together (crossing initiations; seen as
/// 3 on a fresh two-node lab): on an agent that just started they are not alarming.
const STARTUP_DROPS: &[&str] = &["handshake"];
/// The agent's metrics inside each node's namespace.
const METRICS_URL: &str = "http://127.0.0.1:9742/metrics";

fn out_text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

/// True when every node's agent serves its CNI socket (status `cni_socket`).
fn cni_sockets_served(lab: &Lab) -> bool {
    let st = lab.status();
    let nodes = st["nodes"].array();
    !nodes.is_empty()
        && nodes.iter().all(|n| {
            n["cni_socket"]
                .as_str()
                .is_some_and(|p| Path::new(p).exists())
        })
}

/// `up --nodes 2 --pods 2`; None (after printing why) when the agent serves no CNI.
fn up_with_pods(kwire: &Path) -> Option<Lab> {
    let lab = Lab::named();
    let up = lab.cmd(
        "up",
        &[
            "--nodes",
            "2",
            "--pods",
            "2",
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    if !up.status.success() {
        if !try_wait_until(CNI_SOCKET_WAIT, || cni_sockets_served(&lab)) {
            kwire_tests::skip(
                module_path!(),
                "the agent serves no CNI socket at <run-dir>/cni.sock",
            );
            return None;
        }
        panic!("kwire-lab up --pods 2 failed: {}", out_text(&up));
    }
    Some(lab)
}

fn pod<'a>(st: &'a Json, ns: &str, name: &str) -> &'a Json {
    kwire_tests::lab::lab_pod(st, ns, name)
        .unwrap_or_else(|| panic!("no pod {ns}/{name} in status: {:?}", st["pods"]))
}

/// Every pod's `ns/name` and IPs, from status.
fn pod_ips(st: &Json) -> BTreeMap<String, Vec<String>> {
    st["pods"]
        .array()
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ),
                p["ips"].strings(),
            )
        })
        .collect()
}

/// The `inet`/`inet6` global addresses on a pod's eth0.
fn eth0_addrs(lab: &Lab, pod: &str) -> Vec<String> {
    let o = lab.exec(
        pod,
        &["ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
    );
    assert!(o.status.success(), "ip addr in {pod}: {}", out_text(&o));
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|t| *t == "inet" || *t == "inet6")?;
            Some(w.next()?.split('/').next()?.to_string())
        })
        .collect();
    v.sort();
    v
}

/// A node's `/metrics`, scraped inside its namespace.
fn metrics(lab: &Lab, node: &str) -> String {
    let o = lab.exec(node, &["curl", "-sf", "--max-time", "5", METRICS_URL]);
    assert!(
        o.status.success(),
        "GET {METRICS_URL} on {node}: {}",
        out_text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn drops(text: &str, reason: &str) -> f64 {
    prometheus_value(text, &format!("kwire_drops_total{{reason=\"{reason}\"}}"))
        .unwrap_or_else(|| panic!("no kwire_drops_total{{reason=\"{reason}\"}} in the exposition"))
}

/// The non-zero drop counters, for messages.
fn nonzero_drops(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("kwire_drops_total{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

/// Every `kwire_drops_total` reason of a node with its count.
fn drop_counts(lab: &Lab, node: &str) -> BTreeMap<String, f64> {
    let m = metrics(lab, node);
    ALARMING_DROPS
        .iter()
        .map(|r| (r.to_string(), drops(&m, r)))
        .collect()
}

/// No alarming reason rose on `node` since `before` (its counters from the same agent process;
/// None when the agent started since: then counted from zero, minus [`STARTUP_DROPS`]).
fn assert_no_alarming_drops(lab: &Lab, node: &str, before: Option<&BTreeMap<String, f64>>) {
    let m = metrics(lab, node);
    let bad: Vec<(&str, f64)> = ALARMING_DROPS
        .iter()
        .filter(|r| before.is_some() || !STARTUP_DROPS.contains(r))
        .map(|r| {
            let was = before.and_then(|b| b.get(*r)).copied().unwrap_or(0.0);
            (*r, drops(&m, r) - was)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    assert!(
        bad.is_empty(),
        "{node}: alarming drops rose {bad:?}; all non-zero: {:#?}",
        nonzero_drops(&m)
    );
    eprintln!("{node} drops: {:?}", nonzero_drops(&m));
}

/// SIGKILLs the agents of `nodes` at once; returns when each was restarted by the supervisor
/// (a new pid, one more restart) and serves CNI again.
fn kill_agents(lab: &Lab, nodes: &[&str]) {
    lab.signal_agents(nodes, Signal::SIGKILL, RESTART);
}

/// tcpdump on an interface of a namespace; the packets as `tcpdump -r -nn` lines.
struct NsCapture {
    proc: Proc,
    pcap: PathBuf,
}

impl NsCapture {
    fn start(netns: &str, ifname: &str, scratch: &Scratch, tag: &str, filter: &str) -> NsCapture {
        require_tool("tcpdump");
        let pcap = scratch.file(&format!("{tag}.pcap"));
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            netns,
            "tcpdump",
            "--immediate-mode",
            "-i",
            ifname,
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "256",
            "-w",
        ])
        .arg(&pcap)
        .arg(filter);
        let mut proc = Proc::spawn(
            cmd,
            format!("tcpdump {tag}"),
            scratch.file(&format!("{tag}.log")),
        )
        .with_stop_signal(Signal::SIGINT);
        wait_until(
            Duration::from_secs(10),
            format!("tcpdump {tag} listening"),
            || {
                assert!(proc.is_running(), "tcpdump exited: {}", proc.log());
                proc.log().contains("listening on")
            },
        );
        NsCapture { proc, pcap }
    }

    /// The underlay bridge of a lab.
    fn underlay(lab: &Lab, scratch: &Scratch, tag: &str) -> NsCapture {
        let st = lab.status();
        NsCapture::start(
            st["underlay_netns"].as_str().expect("underlay_netns"),
            st["bridge"].as_str().expect("bridge"),
            scratch,
            tag,
            UNDERLAY_FILTER,
        )
    }

    fn stop(mut self) -> Vec<String> {
        self.proc.stop();
        let text = run_host(&["tcpdump", "-r", self.pcap.to_str().unwrap(), "-nn"]);
        text.lines().map(str::to_string).collect()
    }
}

/// Only WireGuard UDP, and no pod address in any header tcpdump shows. While an agent is dead
/// its node's kernel answers the peers' WireGuard datagrams with ICMP port unreachable (node to
/// node, quoting the encrypted datagram): allowed, and counted in the returned number.
fn assert_only_wireguard(lines: &[String]) -> usize {
    assert!(
        !lines.is_empty(),
        "no pod traffic seen on the underlay bridge"
    );
    let port = format!(".{WG_PORT}");
    let unreachable = format!(" udp port {WG_PORT} unreachable");
    let (icmp, other): (Vec<&String>, Vec<&String>) = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && l.contains(&port)))
        .partition(|l| l.contains(": ICMP ") && l.contains(&unreachable));
    assert!(
        other.is_empty(),
        "besides WireGuard UDP on the underlay: {other:#?}"
    );
    let pods: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("10.244.") || l.contains("fd00:10:244"))
        .collect();
    assert!(pods.is_empty(), "pod addresses on the underlay: {pods:#?}");
    icmp.len()
}

#[test]
fn sigkilled_agent_leaks_nothing_and_pods_keep_addresses_and_connections() {
    let kwire = require_agent!();
    require_tool("curl");
    let started = Instant::now();
    let scratch = Scratch::new("lab-restart");
    let Some(lab) = up_with_pods(&kwire) else {
        return;
    };
    let n1 = format!("{}-n1", lab.name());
    let n2 = format!("{}-n2", lab.name());
    let st = lab.status();
    let ips_before = pod_ips(&st);
    let netns = |p: &str| {
        pod(&st, "default", p)["netns"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ip = |p: &str, i: usize| pod(&st, "default", p)["ips"].strings()[i].clone();
    let eth0_before: BTreeMap<String, Vec<String>> = ips_before
        .keys()
        .map(|p| (p.clone(), eth0_addrs(&lab, p)))
        .collect();

    // Two long-lived connections, one each way across the nodes: pod-1-1 (n1) to pod-2-1 (n2)
    // over IPv4, pod-2-2 (n2) to pod-1-2 (n1) over IPv6.
    let server_21 = EchoServer::start(&netns("pod-2-1"));
    let server_12 = EchoServer::start(&netns("pod-1-2"));
    let to_21: SocketAddr = format!("{}:{ECHO_PORT}", ip("pod-2-1", 0)).parse().unwrap();
    let to_12: SocketAddr = format!("[{}]:{ECHO_PORT}", ip("pod-1-2", 1))
        .parse()
        .unwrap();
    let a = Ticker::start(&netns("pod-1-1"), to_21, "n1->n2 v4");
    let b = Ticker::start(&netns("pod-2-2"), to_12, "n2->n1 v6");
    a.wait_more(5, Duration::from_secs(10));
    b.wait_more(5, Duration::from_secs(10));

    // SIGKILL node 1's agent; the supervisor restarts it. Everything on the underlay from
    // before the kill to well after the restart is WireGuard.
    let capture = NsCapture::underlay(&lab, &scratch, "underlay");
    let n2_drops = drop_counts(&lab, &n2);
    kill_agents(&lab, &[&n1]);
    a.wait_more(20, RESTART);
    b.wait_more(20, RESTART);
    // n2 was not restarted: its counters cover the whole outage.
    assert_no_alarming_drops(&lab, &n2, Some(&n2_drops));

    // Now both agents at once, while both connections carry lines.
    kill_agents(&lab, &[&n1, &n2]);
    a.wait_more(20, RESTART);
    b.wait_more(20, RESTART);
    let unreachable = assert_only_wireguard(&capture.stop());
    eprintln!("ICMP port unreachable for {WG_PORT} while agents were down: {unreachable}");

    // The same connections: never a new one, never a reset.
    a.check();
    b.check();
    assert_eq!(
        server_21.accepted(),
        1,
        "pod-2-1's server saw a new connection"
    );
    assert_eq!(
        server_12.accepted(),
        1,
        "pod-1-2's server saw a new connection"
    );

    // Same addresses, in the API and on each pod's eth0.
    let st = lab.status();
    assert_eq!(
        pod_ips(&st),
        ips_before,
        "pod IPs changed across the restarts"
    );
    for (p, addrs) in &eth0_before {
        assert_eq!(&eth0_addrs(&lab, p), addrs, "{p}: eth0 addresses changed");
    }

    // New connections work, both ways and on one node.
    echo_once(&netns("pod-1-1"), to_21).unwrap_or_else(|e| panic!("new n1->n2 connection: {e}"));
    echo_once(&netns("pod-2-2"), to_12).unwrap_or_else(|e| panic!("new n2->n1 connection: {e}"));
    echo_once(&netns("pod-1-1"), to_12).unwrap_or_else(|e| panic!("new n1->n1 connection: {e}"));
    assert_eq!(server_21.accepted(), 2);
    assert_eq!(server_12.accepted(), 3);
    for (from, to) in [
        ("default/pod-1-1", "default/pod-2-1:80"),
        ("default/pod-2-2", "default/pod-1-2"),
    ] {
        let o = lab.cmd("probe", &[from, to, "--timeout", "3"]);
        assert!(o.status.success(), "probe {from} {to}: {}", out_text(&o));
    }
    assert_no_alarming_drops(&lab, &n1, None);
    assert_no_alarming_drops(&lab, &n2, None);
    drop((a, b));

    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_pod_sending_from_an_address_not_its_own_is_dropped_and_counted() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("socat");
    let started = Instant::now();
    let scratch = Scratch::new("lab-spoof");
    let Some(lab) = up_with_pods(&kwire) else {
        return;
    };
    let n1 = format!("{}-n1", lab.name());
    let st = lab.status();
    let ip = |p: &str, i: usize| pod(&st, "default", p)["ips"].strings()[i].clone();
    let netns = |p: &str| {
        pod(&st, "default", p)["netns"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let spoofer = "default/pod-1-1";
    let (own4, own6) = (ip("pod-1-1", 0), ip("pod-1-1", 1));

    // Forged sources: an unused address of the pod's own node, one of the other node's pod
    // CIDR, and an unused IPv6 address of its node. Targets: a pod on the other node and one
    // on the same node.
    let forged: Vec<String> = vec![
        "10.244.0.99".into(),
        "10.244.1.99".into(),
        "fd00:10:244::99".into(),
    ];
    for f in &forged {
        let (cidr, extra) = if f.contains(':') {
            (format!("{f}/128"), vec!["nodad"])
        } else {
            (format!("{f}/32"), vec![])
        };
        let mut argv = vec!["ip", "addr", "add", cidr.as_str(), "dev", "eth0"];
        argv.extend(extra);
        let o = lab.exec(spoofer, &argv);
        assert!(o.status.success(), "{argv:?}: {}", out_text(&o));
    }
    let targets = [("pod-2-1", netns("pod-2-1")), ("pod-1-2", netns("pod-1-2"))];
    let captures: Vec<NsCapture> = targets
        .iter()
        .map(|(name, ns)| {
            NsCapture::start(
                ns,
                "eth0",
                &scratch,
                name,
                &forged
                    .iter()
                    .map(|f| format!("host {f}"))
                    .collect::<Vec<_>>()
                    .join(" or "),
            )
        })
        .collect();

    let before = drops(&metrics(&lab, &n1), "spoofed_source");
    let mut sent = 0.0;
    for (target, _) in &targets {
        for f in &forged {
            let v6 = f.contains(':');
            let dst = ip(target, usize::from(v6));
            let o = lab.exec(
                spoofer,
                &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", f, &dst],
            );
            assert!(
                !o.status.success(),
                "a ping from forged {f} to {target} {dst} got a reply: {}",
                out_text(&o)
            );
            sent += 3.0;
        }
        // UDP too, from a bound forged source.
        let dst = ip(target, 0);
        let o = Command::new(kwire_tests::lab::kwire_lab_bin())
            .args([
                "exec",
                "--name",
                lab.name(),
                spoofer,
                "--",
                "socat",
                "-u",
                "-",
            ])
            .arg(format!("UDP4:{dst}:80,bind=10.244.0.99:5555"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(b"forged\n")?;
                c.wait_with_output()
            })
            .expect("socat");
        assert!(
            o.status.success(),
            "socat from a forged source: {}",
            out_text(&o)
        );
        sent += 1.0;
    }
    let mut after = before;
    let counted = try_wait_until(Duration::from_secs(5), || {
        after = drops(&metrics(&lab, &n1), "spoofed_source");
        after - before >= sent
    });
    assert!(
        counted,
        "spoofed_source on {n1} rose by {} for {sent} forged packets",
        after - before
    );
    for ((name, _), c) in targets.iter().zip(captures) {
        let seen = c.stop();
        assert!(seen.is_empty(), "{name} received forged packets: {seen:#?}");
    }

    // Correctly sourced traffic from the same pod still flows, to both targets, both families.
    for (target, _) in &targets {
        for (src, i) in [(&own4, 0), (&own6, 1)] {
            let dst = ip(target, i);
            let o = lab.exec(spoofer, &["ping", "-c", "1", "-W", "3", "-I", src, &dst]);
            assert!(o.status.success(), "ping {src} -> {dst}: {}", out_text(&o));
        }
    }
    let o = lab.cmd("probe", &[spoofer, "default/pod-2-1:80", "--timeout", "3"]);
    assert!(o.status.success(), "probe after forging: {}", out_text(&o));
    // Nothing besides the forged packets was counted as spoofed.
    let m = metrics(&lab, &n1);
    assert_eq!(
        drops(&m, "spoofed_source") - before,
        sent,
        "{:#?}",
        nonzero_drops(&m)
    );

    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}
