//! Two nodes behind two NATs (issue 14): n3 and n4 each sit behind their own NAT namespace
//! (nftables masquerade, nothing forwarded in), so their published addresses reach nobody.
//! All pods reach all pods: n3 and n4 through the relay the rule elects (a reachable node),
//! which forwards their WireGuard datagrams untouched; the NAT of n3 restarts with a new public
//! address (its mappings gone) and every pair heals within 25 s; meanwhile only WireGuard (and
//! the relay's WireGuard) crosses the underlay and the NATs' inside links, and the probes'
//! plaintext is in no captured byte. `kwire status` and the lab's graph name the relayed path.
//! The relay stops serving (its relay port dropped, its Node NotReady): the pair moves to the
//! other reachable node and heals through it.
//! NAT detection: a reachable node publishes the address n3's packets come from
//! (`kwire.dev/nat-observed`), and n3 says it is seen behind NAT.
//!
//! The NATs are put in front of n3 and n4 after the lab is up (the lab builds nodes on one
//! bridge): their old addresses go, so their agents' API connections die and reconnect through
//! the NAT; n3's agent is restarted for the detection check so that it reads the API at once.

use std::path::Path;
use std::time::{Duration, Instant};

use kwire_tests::lab::{agent_status, kubectl, node, parse_json, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, run_host, try_wait_until, wait_until};
use kwire_tests::{Capture, Netns, Scratch};

/// Mesh, pods, annotations seen by every agent; generous for a debug build on a shared machine.
const CONVERGE: Duration = Duration::from_secs(45);
/// The issue's bound for a NAT mapping change.
const HEAL: Duration = Duration::from_secs(25);
/// What the probes carry (`ping -p`): found in no captured byte.
const MARKER: &[u8] = b"kwire-nat-relay!";
const WG_PORTS: [&str; 2] = [".51820", ".51821"];

/// A NAT in front of one lab node: the node's bridge port moved into it (its inside link),
/// a new veth to the underlay bridge (its outside), masquerade out, nothing forwarded in.
struct Nat {
    ns: Netns,
    inside: String,
    outside: String,
    public: String,
}

/// `ip -n NS ARGS...` (words split on spaces).
fn ip(ns: &str, args: &str) {
    let mut all = vec!["ip", "-n", ns];
    all.extend(args.split(' '));
    run_host(&all);
}

impl Nat {
    /// Puts lab node `index` (namespace `node_ns`) behind a NAT with public address `public`
    /// on the underlay; the node gets 10.77.`index`.2/24 behind it.
    fn put_in_front(lab: &Lab, index: u32, node_ns: &str, public: &str) -> Nat {
        let st = lab.status();
        let ul = st["underlay_netns"].as_str().unwrap().to_string();
        let bridge = st["bridge"].as_str().unwrap().to_string();
        let tag = bridge
            .strip_prefix("kw")
            .and_then(|b| b.strip_suffix("br"))
            .unwrap()
            .to_string();
        let (port, uplink) = (format!("kw{tag}p{index}"), format!("kw{tag}u{index}"));
        let ns = Netns::new("nat");
        let n = ns.name();
        ip(&ul, &format!("link set {port} netns {n}"));
        let outside = lab.attach_to_underlay(&ns, "o");
        let inside = format!("10.77.{index}");
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ip(n, &format!("addr add {inside}.1/24 dev {port}"));
        ip(n, &format!("link set {port} up"));
        ip(n, &format!("addr add {public}/24 dev {outside}"));
        ip(n, &format!("link set {outside} up"));
        ip(n, "route add default via 192.0.2.254");
        let rules = format!(
            "table ip nat {{\n chain post {{ type nat hook postrouting priority srcnat; oifname \"{outside}\" masquerade; }}\n}}\ntable inet filter {{\n chain forwarding {{ type filter hook forward priority filter; policy drop; ct state established,related accept; iifname \"{port}\" accept; }}\n}}\n"
        );
        let mut nft = ns.command(&["nft", "-f", "-"]);
        nft.stdin(std::process::Stdio::piped());
        let mut child = nft.spawn().expect("nft");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), rules.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft rules in the NAT");
        // The node: its underlay addresses replaced by a private one behind the NAT.
        ip(node_ns, &format!("addr flush dev {uplink} scope global"));
        ip(node_ns, &format!("addr add {inside}.2/24 dev {uplink}"));
        let _ = std::process::Command::new("ip")
            .args(["-n", node_ns, "-4", "route", "del", "default"])
            .output();
        ip(node_ns, &format!("-4 route add default via {inside}.1"));
        Nat {
            ns,
            inside: port,
            outside,
            public: public.to_string(),
        }
    }

    /// The NAT restarts with another public address: Linux drops the mappings masqueraded to
    /// the old one, so every flow through it gets a new mapping.
    fn readdress(&mut self, public: &str) {
        let (n, out) = (self.ns.name(), &self.outside);
        ip(n, &format!("addr del {}/24 dev {out}", self.public));
        ip(n, &format!("addr add {public}/24 dev {out}"));
        ip(n, "route replace default via 192.0.2.254");
        self.public = public.to_string();
    }
}

/// A lab of four nodes with a pod each (`extra`: more `kwire-lab up` arguments), once every
/// pod reaches every pod.
fn four_nodes(kwire: &Path, extra: &[&str]) -> Lab {
    let mut args = vec![
        "--kwire",
        kwire.to_str().unwrap(),
        "--pods",
        "1",
        "--timeout",
        "90",
    ];
    args.extend_from_slice(extra);
    let lab = Lab::up(4, &args);
    wait_until(CONVERGE, "every pod reaches every pod", || {
        blocked(&lab).is_empty()
    });
    lab
}

/// `kwire-lab matrix --json` over every pod: the unreachable pairs.
fn blocked(lab: &Lab) -> Vec<String> {
    let o = lab.cmd("matrix", &["--json", "--timeout", "1"]);
    let Ok(v) = parse_json(String::from_utf8_lossy(&o.stdout).trim()) else {
        return vec![format!(
            "matrix failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )];
    };
    let b = v["blocked"].array();
    if v["reachable"].array().is_empty() && b.is_empty() {
        return vec!["no pods probed".into()];
    }
    b.iter().map(|p| format!("{p:?}")).collect()
}

/// The relay `from`'s agent reaches peer `to` through, if it does.
fn relay_of(kwire: &Path, lab: &Lab, from: &str, to: &str) -> Option<String> {
    let r = agent_status(kwire, node(&lab.status(), from))?;
    let p = r["peers"]
        .array()
        .iter()
        .find(|p| p["node"].as_str() == Some(to))?
        .clone();
    p["relay"].as_str().map(str::to_string)
}

/// Every line is WireGuard to or from a kwire port (or ICMP about one), no pod address is in
/// a header and the marker is in no byte.
fn assert_only_wireguard(segment: &str, lines: &[String], pcap: &[u8]) {
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && WG_PORTS.iter().any(|p| l.contains(p))))
        .filter(|l| !(l.contains(": ICMP ") && l.contains(" udp port 5182")))
        .collect();
    assert!(other.is_empty(), "{segment}: besides WireGuard: {other:#?}");
    let pods: Vec<&String> = lines.iter().filter(|l| l.contains("10.244.")).collect();
    assert!(pods.is_empty(), "{segment}: pod addresses: {pods:#?}");
    assert!(
        !pcap.windows(MARKER.len()).any(|w| w == MARKER),
        "{segment}: the probes' plaintext was captured"
    );
}

#[test]
fn two_nodes_behind_two_nats_reach_each_other_through_the_relay_and_heal() {
    let kwire = require_agent!();
    require_tool("nft");
    require_tool("tcpdump");
    let scratch = Scratch::new("lab-nat-relay");
    let lab = four_nodes(&kwire, &[]);
    let name = |i: u32| format!("{}-n{i}", lab.name());

    // n3 and n4 are behind NAT: they say so, and so learn that they need a relay for each
    // other (their peers learn to wait for their packets).
    let admin = lab.cmd_ok("kubeconfig", &[]).trim().to_string();
    for i in [3, 4] {
        let (ok, out) = kubectl(
            &admin,
            &["annotate", "node", &name(i), "kwire.dev/behind-nat=true"],
        );
        assert!(ok, "{out}");
    }
    let mut relay = None;
    wait_until(
        CONVERGE,
        "n3 and n4 reach each other through one relay",
        || {
            let (a, b) = (
                relay_of(&kwire, &lab, &name(3), &name(4)),
                relay_of(&kwire, &lab, &name(4), &name(3)),
            );
            relay = a.clone();
            a.is_some() && a == b
        },
    );
    let relay = relay.unwrap();
    assert!(
        relay == name(1) || relay == name(2),
        "the relay {relay} is a reachable node"
    );
    // Reachable pairs stay direct.
    assert_eq!(relay_of(&kwire, &lab, &name(3), &name(1)), None);
    assert_eq!(relay_of(&kwire, &lab, &name(1), &name(3)), None);

    // Now the NATs: n3's and n4's published addresses reach nobody any more.
    let st = lab.status();
    let mut nat3 = Nat::put_in_front(
        &lab,
        3,
        node(&st, &name(3))["netns"].as_str().unwrap(),
        "192.0.2.213",
    );
    let nat4 = Nat::put_in_front(
        &lab,
        4,
        node(&st, &name(4))["netns"].as_str().unwrap(),
        "192.0.2.214",
    );
    let n3_published = node(&st, &name(3))["underlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !lab.exec(&name(1), &["ping", "-c1", "-W1", &n3_published])
            .status
            .success(),
        "n3's published address {n3_published} still answers"
    );

    let filter = "not arp and not (tcp port 6443) and not ip6 and not ip multicast";
    let ul = st["underlay_netns"].as_str().unwrap().to_string();
    let bridge = st["bridge"].as_str().unwrap().to_string();
    let captures = vec![
        (
            "underlay",
            Capture::start_in(&ul, &bridge, filter, &scratch),
        ),
        (
            "NAT of n3, inside",
            Capture::start(&nat3.ns, &nat3.inside, filter, &scratch),
        ),
        (
            "NAT of n4, inside",
            Capture::start(&nat4.ns, &nat4.inside, filter, &scratch),
        ),
    ];

    let mut last = Vec::new();
    let ok = try_wait_until(CONVERGE, || {
        last = blocked(&lab);
        last.is_empty()
    });
    assert!(ok, "behind the NATs, pods left unreachable: {last:#?}");
    let pods = lab.status()["pods"].array().to_vec();
    let pod_on = |i: u32| {
        let p = pods
            .iter()
            .find(|p| p["node"].as_str() == Some(name(i).as_str()))
            .unwrap_or_else(|| panic!("no pod on {}", name(i)));
        (
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap()
            ),
            p["ips"]
                .strings()
                .into_iter()
                .find(|ip| !ip.contains(':'))
                .unwrap(),
        )
    };
    let ((p3, _), (_, ip4)) = (pod_on(3), pod_on(4));
    let hex: String = MARKER.iter().map(|b| format!("{b:02x}")).collect();
    let ping = lab.exec(
        &p3,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", &hex, &ip4],
    );
    assert!(
        ping.status.success(),
        "{p3} -> {ip4} through the relay: {ping:?}"
    );
    let relay_report = agent_status(&kwire, node(&lab.status(), &relay)).unwrap();
    let serving = relay_report["relay"]["serving"].strings();
    assert!(
        serving.contains(&name(3)) && serving.contains(&name(4)),
        "{relay} relays for {serving:?}"
    );
    let forwarded = relay_report["relay"]["forwarded"].as_u64().unwrap_or(0);
    assert!(forwarded > 0, "{relay} forwarded nothing");

    // The NAT of n3 restarts with a new public address: every mapping is gone (the kernel
    // drops the connections masqueraded to the old address; waited for, so that no old
    // mapping carries the healed traffic).
    let t0 = Instant::now();
    nat3.readdress("192.0.2.223");
    wait_until(
        HEAL,
        "the NAT's mappings to its old address are gone",
        || {
            let ct = nat3.ns.exec(&["cat", "/proc/net/nf_conntrack"]);
            ct.status.success() && !String::from_utf8_lossy(&ct.stdout).contains("192.0.2.213")
        },
    );
    // Healed: every pod reaches every pod, and n3's direct peer sees it at the new address.
    let ok = try_wait_until(HEAL.saturating_sub(t0.elapsed()), || {
        let seen_new = agent_status(&kwire, node(&lab.status(), &name(2))).is_some_and(|r| {
            r["peers"].array().iter().any(|p| {
                p["node"].as_str() == Some(name(3).as_str())
                    && p["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("192.0.2.223:"))
            })
        });
        last = blocked(&lab);
        seen_new && last.is_empty()
    });
    let healed = t0.elapsed();
    assert!(ok, "not healed {HEAL:?} after the NAT restarted: {last:#?}");
    eprintln!("healed {healed:?} after n3's NAT changed its address");
    let ping = lab.exec(
        &p3,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", &hex, &ip4],
    );
    assert!(
        ping.status.success(),
        "{p3} -> {ip4} after the NAT restart: {ping:?}"
    );
    let after = agent_status(&kwire, node(&lab.status(), &relay)).unwrap()["relay"]["forwarded"]
        .as_u64()
        .unwrap_or(0);
    assert!(after > forwarded, "the healed path bypasses the relay?");

    // The relay stops serving: its relay port is blocked and its Node goes NotReady (what
    // the node lifecycle controller says of a node that is down). Both sides of the pair
    // move to the other reachable node by the same rule, and the pair heals through it.
    let other = if relay == name(1) { name(2) } else { name(1) };
    let relay_ns = node(&lab.status(), &relay)["netns"]
        .as_str()
        .unwrap()
        .to_string();
    let nft = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &relay_ns, "nft"];
        all.extend_from_slice(args);
        run_host(&all);
    };
    nft(&["add", "table", "inet", "kwtest_relay_down"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "kwtest_relay_down",
        "in",
        "{ type filter hook input priority 0; }",
    ]);
    nft(&[
        "add",
        "rule",
        "inet",
        "kwtest_relay_down",
        "in",
        "udp",
        "dport",
        "51821",
        "drop",
    ]);
    let (ok, out) = kubectl(
        &admin,
        &[
            "patch",
            "node",
            &relay,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"Unknown","reason":"NodeStatusUnknown","message":"kwtest: the relay is down"}]}}"#,
        ],
    );
    assert!(ok, "marking {relay} NotReady: {out}");
    let t1 = Instant::now();
    // n3's and n4's agents lost their API connections when the NATs came (the detection
    // check below restarts n3 for the same reason): restarted, they read the API at once.
    lab.signal_agents(
        &[&name(3), &name(4)],
        nix::sys::signal::Signal::SIGTERM,
        CONVERGE,
    );
    let mut moved = (None, None);
    let ok = try_wait_until(CONVERGE, || {
        moved = (
            relay_of(&kwire, &lab, &name(3), &name(4)),
            relay_of(&kwire, &lab, &name(4), &name(3)),
        );
        moved.0.as_deref() == Some(other.as_str()) && moved.1 == moved.0
    });
    if !ok {
        let (_, conditions) = kubectl(
            &admin,
            &["get", "node", &relay, "-o", "jsonpath={.status.conditions}"],
        );
        let (_, other_node) = kubectl(&admin, &["get", "node", &other, "-o", "json"]);
        let log = std::fs::read_to_string(node(&lab.status(), &name(3))["log"].as_str().unwrap())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!("n3 and n4 did not move from {relay} to {other}: {moved:?}; {relay}'s conditions: {conditions}\n{other}: {other_node}\nn3's log, last first:\n{}", tail.join("\n"));
    }
    let ok = try_wait_until(HEAL, || {
        lab.exec(&p3, &["ping", "-c", "1", "-W", "1", &ip4])
            .status
            .success()
    });
    assert!(
        ok,
        "{p3} -> {ip4} not healed through {other} after {relay} stopped serving"
    );
    eprintln!(
        "moved to relay {other} and healed {:?} after {relay} stopped serving",
        t1.elapsed()
    );
    let forwarded_by_other = agent_status(&kwire, node(&lab.status(), &other)).unwrap()["relay"]
        ["forwarded"]
        .as_u64()
        .unwrap_or(0);
    assert!(forwarded_by_other > 0, "{other} forwarded nothing");

    for (segment, c) in captures {
        let (lines, pcap) = c.stop_with_pcap();
        assert!(!lines.is_empty(), "{segment}: nothing captured");
        assert_only_wireguard(segment, &lines, &pcap);
    }

    // Status and graph name the relayed path.
    let run_dir = node(&lab.status(), &name(3))["run_dir"]
        .as_str()
        .unwrap()
        .to_string();
    let text = run_host(&[
        kwire.to_str().unwrap(),
        "status",
        "--run-dir",
        &run_dir,
        "--color",
        "never",
    ]);
    assert!(
        text.contains(&format!("relayed through relay {other}")),
        "kwire status on n3:\n{text}"
    );
    let graph = lab.cmd_ok("graph", &[]);
    assert!(
        graph.contains(&format!("relayed via {other}")),
        "kwire-lab graph:\n{graph}"
    );

    // NAT detection: the reachable nodes publish where n3's authenticated packets come from
    // (its NAT's new address), and n3, once its agent reconnects to the API through the NAT
    // (its old connections died with its old address), says it is seen behind NAT.
    let observed = |node: &str| -> Option<String> {
        let (ok, out) = kubectl(&admin, &["get", "node", node, "-o", "json"]);
        let v = parse_json(&out).ok().filter(|_| ok)?;
        v["metadata"]["annotations"]["kwire.dev/nat-observed"]
            .as_str()
            .map(str::to_string)
    };
    let mut seen = None;
    let ok = try_wait_until(CONVERGE, || {
        seen = observed(&name(2));
        seen.as_deref()
            .is_some_and(|t| t.contains(&format!("{}=192.0.2.223:", name(3))))
    });
    assert!(ok, "n2's kwire.dev/nat-observed: {seen:?}");
    lab.signal_agents(&[&name(3)], nix::sys::signal::Signal::SIGTERM, CONVERGE);
    let mut said = None;
    let ok = try_wait_until(CONVERGE, || {
        said = agent_status(&kwire, node(&lab.status(), &name(3)))
            .and_then(|r| r["nat_detected"].as_str().map(str::to_string));
        said.as_deref().is_some_and(|s| s.contains("192.0.2.223"))
    });
    assert!(ok, "n3 does not say it is seen behind NAT: {said:?}");
    drop(nat4);
    drop(nat3);
}

/// NAT detection flags nodes by themselves (`--behind-nat-detect` on every agent): n3 and n4
/// are put behind NATs without any flag; their peers see their packets come from the NATs'
/// addresses and publish it, they flag their own Nodes `kwire.dev/behind-nat`, and the pair
/// reaches each other through a relay. The reachable nodes are not flagged.
#[test]
fn detected_nats_flag_their_nodes_and_the_pair_goes_through_a_relay() {
    let kwire = require_agent!();
    require_tool("nft");
    let lab = four_nodes(&kwire, &["--agent-arg=--behind-nat-detect"]);
    let name = |i: u32| format!("{}-n{i}", lab.name());
    let admin = lab.cmd_ok("kubeconfig", &[]).trim().to_string();
    let flagged = |i: u32| {
        let (ok, out) = kubectl(&admin, &["get", "node", &name(i), "-o", "json"]);
        ok && parse_json(&out).is_ok_and(|v| {
            v["metadata"]["annotations"]["kwire.dev/behind-nat"].as_str() == Some("true")
        })
    };
    assert!(
        (1..=4).all(|i| !flagged(i)),
        "a node flagged before any NAT"
    );
    let st = lab.status();
    let ns = |i: u32| node(&st, &name(i))["netns"].as_str().unwrap().to_string();
    let nat3 = Nat::put_in_front(&lab, 3, &ns(3), "192.0.2.213");
    let nat4 = Nat::put_in_front(&lab, 4, &ns(4), "192.0.2.214");
    // Their agents' API connections died with their addresses (see the test above):
    // restarted, as agents on nodes behind NAT start.
    lab.signal_agents(
        &[&name(3), &name(4)],
        nix::sys::signal::Signal::SIGTERM,
        CONVERGE,
    );
    let mut last = Vec::new();
    let ok = try_wait_until(CONVERGE, || {
        // Pods probing each other keep traffic flowing, so that peers see where it comes from.
        last = blocked(&lab);
        flagged(3) && flagged(4)
    });
    assert!(
        ok,
        "n3 {} and n4 {} flagged behind NAT; unreachable: {last:#?}",
        flagged(3),
        flagged(4)
    );
    assert!(
        !flagged(1) && !flagged(2),
        "a reachable node flagged itself"
    );
    let mut relay = None;
    wait_until(
        CONVERGE,
        "n3 and n4 reach each other through one relay",
        || {
            relay = relay_of(&kwire, &lab, &name(3), &name(4));
            relay.is_some() && relay == relay_of(&kwire, &lab, &name(4), &name(3))
        },
    );
    let ok = try_wait_until(CONVERGE, || {
        last = blocked(&lab);
        last.is_empty()
    });
    assert!(
        ok,
        "pods left unreachable through relay {relay:?}: {last:#?}"
    );
    drop(nat4);
    drop(nat3);
}
