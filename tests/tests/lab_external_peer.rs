//! A peer outside the cluster (issue 14): a wireguard-go "laptop" in its own namespace on the
//! lab's underlay, configured from `kwire peer config` (the private key filled in, as a user
//! would), reaches a pod on every node over ICMP and TCP; a NetworkPolicy `ipBlock` refusing
//! it and then admitting it is honoured; only WireGuard crosses the underlay meanwhile; a Peer
//! whose allowed IPs lie in the cluster's pod range is refused with `Accepted=False`, counted,
//! and left out of the device; `kwire status` and `/metrics` name the external peer apart.
//! A Peer whose endpoint is a host name resolving to loopback is refused with the resolver's
//! answer. Services from the laptop: the config gives the Service range to its entry node (n1, the
//! first by name), and the laptop reaches a ClusterIP whose only backend is on n2 over TCP
//! and UDP, the backend seeing n1's gateway (masqueraded there); NetworkPolicy judges that
//! flow by n1's address, not the laptop's: an ipBlock refusing the laptop refuses it, one
//! naming only the laptop does too, one naming n1's gateway admits it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kwire_tests::lab::{agent_status, kubectl, node, parse_json, BridgeCapture, JsonExt, Lab};
use kwire_tests::wireguard::{Impl, WgDevice};
use kwire_tests::{require_agent, require_tool, try_wait_until, wait_until, Netns, Scratch};

/// Pods running, Peers accepted by every agent, handshakes, policy compiled.
const CONVERGE: Duration = Duration::from_secs(30);
/// The laptop's address on the underlay (the lab's nodes are 192.0.2.1.., the API .254).
const LAPTOP_UNDERLAY: &str = "192.0.2.200/24";
/// The laptop's own address inside the tunnel: outside every cluster range.
const LAPTOP_IP: &str = "198.51.100.7";
const POD_PORT: &str = "8080";

fn manifest(lab: &str) -> String {
    let pod = |name: &str, node: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: edge, labels: {{app: web, at: {node}}}}}\nspec:\n  nodeName: {lab}-{node}\n  containers:\n  - name: c\n    image: kwire-lab/pod-serve\n    ports:\n    - {{containerPort: {POD_PORT}}}\n    - {{containerPort: 5353, protocol: UDP}}\n"
        )
    };
    // A Service whose only backend is on n2 (the laptop's entry node is n1).
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: on-n2, namespace: edge}\nspec:\n  selector: {at: n2}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n";
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: edge}}\n{}{}{service}",
        pod("web-1", "n1"),
        pod("web-2", "n2")
    )
}

fn peer_manifest(name: &str, key: &str, ip: &str) -> String {
    format!(
        "apiVersion: kwire.dev/v1alpha1\nkind: Peer\nmetadata: {{name: {name}}}\nspec:\n  publicKey: {key}\n  allowedIPs: [{ip}]\n  persistentKeepalive: 25\n"
    )
}

/// A NetworkPolicy admitting the web pods' port from `cidr` except `except`.
fn policy(cidr: &str, except: &[&str]) -> String {
    policy_from(&[(cidr, except)])
}

/// A NetworkPolicy admitting the web pods from each `(cidr, except)` ipBlock.
fn policy_from(blocks: &[(&str, &[&str])]) -> String {
    let mut p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-edge, namespace: edge}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n".to_string();
    for (cidr, except) in blocks {
        p.push_str(&format!(
            "    - ipBlock: {{cidr: {cidr}, except: {except:?}}}\n"
        ));
    }
    p
}

/// The Peer's `Accepted` condition: (status, reason, message).
fn accepted(kubeconfig: &str, name: &str) -> Option<(String, String, String)> {
    let (ok, out) = kubectl(kubeconfig, &["get", "peers.kwire.dev", name, "-o", "json"]);
    if !ok {
        return None;
    }
    let v = parse_json(&out).ok()?;
    let c = v["status"]["conditions"]
        .array()
        .iter()
        .find(|c| c["type"].as_str() == Some("Accepted"))?
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// The wg-quick file as `wg setconf` takes it: the private key filled in, `Address` taken out
/// (returned apart), comments dropped.
fn to_setconf(conf: &str, private_key: &str, psk: &str) -> (String, Vec<String>, Vec<String>) {
    let mut out = String::new();
    let mut addresses = Vec::new();
    let mut routes = Vec::new();
    for line in conf.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.split_once(" = ") {
            Some(("Address", v)) => addresses.extend(v.split(", ").map(str::to_string)),
            Some(("PrivateKey", v)) => {
                assert!(v.starts_with("<fill in"), "a placeholder, never a key: {v}");
                out.push_str(&format!("PrivateKey = {private_key}\n"));
            }
            Some(("PresharedKey", v)) => {
                assert!(v.starts_with("<fill in"), "a placeholder, never a key: {v}");
                out.push_str(&format!("PresharedKey = {psk}\n"));
            }
            Some(("AllowedIPs", v)) => {
                routes.extend(v.split(", ").map(str::to_string));
                out.push_str(line);
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, addresses, routes)
}

/// One TCP connection from the laptop: the line the pod's server sends (its name).
fn tcp_line(ns: &Netns, ip: &str) -> Option<String> {
    tcp_line_at(ns, ip, POD_PORT)
}

/// One TCP connection from the laptop to `ip:port`: the line the server sends (`NAME from
/// CLIENT`).
fn tcp_line_at(ns: &Netns, ip: &str, port: &str) -> Option<String> {
    let o = ns.exec(&[
        "socat",
        "-T",
        "2",
        "-u",
        &format!("TCP:{ip}:{port},connect-timeout=2"),
        "STDOUT",
    ]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// One UDP datagram from the laptop to `ip:port`: the echo (the pod's name first), if any
/// came back within 2 s.
fn udp_echo(ns: &Netns, ip: &str, port: &str) -> Option<String> {
    let o = ns.exec(&[
        "sh",
        "-c",
        &format!("echo kwire-peer-probe | socat -T 2 - UDP:{ip}:{port}"),
    ]);
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

#[test]
fn a_laptop_from_kwire_peer_config_reaches_pods_on_every_node_under_policy() {
    let kwire = require_agent!();
    require_tool("wireguard-go");
    require_tool("kubectl");
    require_tool("socat");
    let scratch = Scratch::new("lab-external-peer");
    // Two nodes, no pods of the lab's own (the test makes its two).
    let lab = Lab::up_real(2, 0, &kwire);
    let admin = lab.cmd_ok("kubeconfig", &[]);
    let admin = admin.trim().to_string();
    let file = scratch.file("edge.yaml");
    std::fs::write(&file, manifest(lab.name())).unwrap();
    lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);

    // The laptop: wireguard-go in a namespace on the underlay, with a fresh key pair.
    let ns = Arc::new(Netns::new("lap"));
    let ul = lab.attach_to_underlay(&ns, "u");
    ns.add_addr(&ul, LAPTOP_UNDERLAY);
    ns.link_up(&ul, 1500);
    let dev = WgDevice::start(&ns, Impl::WireguardGo, "wg", &scratch);

    // Its Peer with a preshared key from a Secret in kwire-peer-keys, and a bad one (allowed
    // IPs inside the pod range) that must be refused.
    let psk = kwire_tests::run_host(&["wg", "genpsk"]).trim().to_string();
    let peers = scratch.file("peers.yaml");
    std::fs::write(
        &peers,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: laptop-psk, namespace: kwire-peer-keys}}\nstringData: {{presharedKey: \"{psk}\"}}\n---\n{}  presharedKeySecretRef: {{name: laptop-psk}}\n---\n{}",
            peer_manifest("laptop", &dev.keys.public, &format!("{LAPTOP_IP}/32")),
            peer_manifest(
                "in-pods",
                &kwire_tests::wireguard::Keypair::generate().public,
                "10.244.200.1/32"
            )
        ),
    )
    .unwrap();
    // A Peer whose endpoint is a host name that resolves to no usable address (loopback):
    // the agents resolve it and refuse it with the resolver's answer.
    let by_name = scratch.file("by-name.yaml");
    std::fs::write(
        &by_name,
        format!(
            "{}  endpoint: localhost:51820\n",
            peer_manifest(
                "by-name",
                &kwire_tests::wireguard::Keypair::generate().public,
                "198.51.100.99/32"
            )
        ),
    )
    .unwrap();
    lab.cmd_ok("apply", &["-f", peers.to_str().unwrap()]);
    lab.cmd_ok("apply", &["-f", by_name.to_str().unwrap()]);
    let mut last = None;
    let judged = try_wait_until(CONVERGE, || {
        last = Some((accepted(&admin, "laptop"), accepted(&admin, "in-pods")));
        matches!(&last, Some((Some(a), Some(b))) if a.0 == "True" && b.0 == "False")
    });
    assert!(judged, "the agents' conditions: {last:?}");
    let (_, reason, message) = accepted(&admin, "in-pods").unwrap();
    assert_eq!(reason, "AllowedIPsOverlapCluster", "{message}");
    assert!(message.contains("10.244.0.0/16"), "{message}");
    let mut named = None;
    let judged = try_wait_until(CONVERGE, || {
        named = accepted(&admin, "by-name");
        named.as_ref().is_some_and(|c| c.0 == "False")
    });
    assert!(judged, "Peer by-name: {named:?}");
    let (_, reason, message) = named.unwrap();
    assert_eq!(reason, "BadEndpoint", "{message}");
    assert!(
        message.starts_with("spec.endpoint \"localhost:51820\": ")
            && (message.contains("not a usable endpoint") || message.contains("resolve")),
        "{message}"
    );

    // kwire peer config: one [Peer] per node, the placeholder filled in here.
    let out = Command::new(&kwire)
        .args(["peer", "config", "laptop", "--kubeconfig", &admin])
        .output()
        .unwrap();
    let conf = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kwire peer config: {conf}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(conf.matches("[Peer]").count(), 2, "{conf}");
    let qr = Command::new(&kwire)
        .args([
            "peer",
            "config",
            "laptop",
            "--kubeconfig",
            &admin,
            "--output",
            "qr",
        ])
        .output()
        .unwrap();
    assert!(qr.status.success() && String::from_utf8_lossy(&qr.stdout).contains('█'));
    let refused = Command::new(&kwire)
        .args(["peer", "config", "in-pods", "--kubeconfig", &admin])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("AllowedIPsOverlapCluster"),
        "{err}"
    );
    assert_eq!(conf.matches("PresharedKey = <fill in").count(), 2, "{conf}");
    let (setconf, addresses, routes) = to_setconf(&conf, &dev.keys.private, &psk);
    assert_eq!(addresses, [format!("{LAPTOP_IP}/32")]);
    let conf_file = scratch.file("laptop.conf");
    std::fs::write(&conf_file, &setconf).unwrap();
    dev.wg(&["setconf", &dev.ifname, conf_file.to_str().unwrap()]);
    dev.up(&[&addresses[0]], 1420);
    for r in &routes {
        ns.run(&["ip", "route", "add", r, "dev", &dev.ifname]);
    }

    // Pods running with their addresses.
    let mut st = lab.status();
    wait_until(CONVERGE, "edge/web-1 and edge/web-2 running", || {
        st = lab.status();
        ["web-1", "web-2"].iter().all(|n| {
            st["pods"].array().iter().any(|p| {
                p["name"].as_str() == Some(n)
                    && p["phase"].as_str() == Some("Running")
                    && !p["ips"].array().is_empty()
            })
        })
    });
    let pod_ip = |name: &str| -> String {
        let p = st["pods"]
            .array()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap();
        p["ips"]
            .strings()
            .into_iter()
            .find(|ip| !ip.contains(':'))
            .unwrap()
    };
    let targets = [("web-1", pod_ip("web-1")), ("web-2", pod_ip("web-2"))];

    // Reached on every node over ICMP and TCP; only WireGuard on the underlay meanwhile.
    let capture = BridgeCapture::start(
        &lab,
        &scratch,
        "underlay",
        "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))",
    );
    for (name, ip) in &targets {
        ns.wait_ping(ip, CONVERGE);
        let mut line = None;
        let ok = try_wait_until(CONVERGE, || {
            line = tcp_line(&ns, ip);
            line.as_deref().is_some_and(|l| l.contains(name))
        });
        assert!(ok, "TCP to {name} ({ip}) from the laptop: {line:?}");
    }

    // Services: the ranges ride on the entry node's [Peer] only (n1, the first by name), and
    // the laptop reaches a ClusterIP whose backend is on n2, over TCP and UDP; the backend
    // sees n1's gateway (masqueraded there, so that its replies return through n1).
    let n1_name = format!("{}-n1", lab.name());
    assert!(
        conf.contains(&format!("# Services (ClusterIPs) through node {n1_name}")),
        "{conf}"
    );
    assert_eq!(conf.matches("10.96.0.0/12").count(), 1, "{conf}");
    let n1_section = conf.split(&format!("# node {n1_name}\n")).nth(1).unwrap();
    let n1_allowed = n1_section
        .lines()
        .find(|l| l.starts_with("AllowedIPs"))
        .unwrap();
    assert!(n1_allowed.contains("10.96.0.0/12"), "{conf}");
    let mut vip = None;
    wait_until(CONVERGE, "edge/on-n2 with its endpoint", || {
        let st = lab.status();
        let svc = kwire_tests::lab::lab_service(&st, "edge", "on-n2").cloned();
        vip = svc
            .as_ref()
            .filter(|s| !s["endpoints"].array().is_empty())
            .and_then(|s| s["cluster_ips"].strings().into_iter().next());
        vip.is_some()
    });
    let vip = vip.unwrap();
    let n1_gw = node(&lab.status(), &n1_name)["gateway_ips"]
        .strings()
        .into_iter()
        .find(|ip| !ip.contains(':'))
        .unwrap();
    let mut line = None;
    let ok = try_wait_until(CONVERGE, || {
        line = tcp_line_at(&ns, &vip, "80");
        line.is_some()
    });
    assert!(ok, "TCP to ClusterIP {vip}:80 from the laptop: nothing");
    let line = line.unwrap();
    assert!(
        line.contains("web-2 from ") && line.ends_with(&format!(" {n1_gw}")),
        "the backend on n2 sees the entry node's gateway: {line}"
    );
    let mut echo = None;
    let ok = try_wait_until(CONVERGE, || {
        echo = udp_echo(&ns, &vip, "53");
        echo.as_deref().is_some_and(|e| e.contains("web-2"))
    });
    assert!(ok, "UDP to ClusterIP {vip}:53 from the laptop: {echo:?}");

    // An ipBlock that excepts the laptop refuses it on both nodes; one that names it admits it.
    let pol = scratch.file("policy.yaml");
    std::fs::write(
        &pol,
        policy("198.51.100.0/24", &[&format!("{LAPTOP_IP}/32")]),
    )
    .unwrap();
    lab.cmd_ok("apply", &["-f", pol.to_str().unwrap()]);
    for (name, ip) in &targets {
        let refused = try_wait_until(CONVERGE, || tcp_line(&ns, ip).is_none());
        assert!(
            refused,
            "{name} still reachable past an ipBlock excepting the laptop"
        );
        ns.assert_no_ping(ip, None, 2);
    }
    // The Service flow is refused too (it comes from n1's gateway, which the policy does not
    // admit either), over TCP and UDP.
    let refused = try_wait_until(CONVERGE, || {
        tcp_line_at(&ns, &vip, "80").is_none() && udp_echo(&ns, &vip, "53").is_none()
    });
    assert!(
        refused,
        "ClusterIP {vip} reachable past an ipBlock excepting the laptop"
    );
    std::fs::write(&pol, policy(&format!("{LAPTOP_IP}/32"), &[])).unwrap();
    lab.cmd_ok("apply", &["-f", pol.to_str().unwrap()]);
    for (name, ip) in &targets {
        let ok = try_wait_until(CONVERGE, || {
            tcp_line(&ns, ip).is_some_and(|l| l.contains(name))
        });
        assert!(ok, "{name} not reachable with an ipBlock naming the laptop");
    }
    // A Peer's Service flow is judged by its entry node's address, as a node port's with
    // externalTrafficPolicy: Cluster: naming the laptop does not admit it, naming n1's
    // gateway does.
    let refused = try_wait_until(CONVERGE, || {
        tcp_line_at(&ns, &vip, "80").is_none() && udp_echo(&ns, &vip, "53").is_none()
    });
    assert!(
        refused,
        "ClusterIP {vip} admitted by an ipBlock naming only the laptop"
    );
    let laptop_block = format!("{LAPTOP_IP}/32");
    let n1_block = format!("{n1_gw}/32");
    let none: &[&str] = &[];
    std::fs::write(
        &pol,
        policy_from(&[(laptop_block.as_str(), none), (n1_block.as_str(), none)]),
    )
    .unwrap();
    lab.cmd_ok("apply", &["-f", pol.to_str().unwrap()]);
    let ok = try_wait_until(CONVERGE, || {
        tcp_line_at(&ns, &vip, "80").is_some_and(|l| l.contains("web-2"))
            && udp_echo(&ns, &vip, "53").is_some_and(|e| e.contains("web-2"))
    });
    assert!(
        ok,
        "ClusterIP {vip} not admitted by an ipBlock naming n1's gateway"
    );
    let lines = capture.stop();
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains("UDP") && l.contains(".51820")))
        .collect();
    assert!(
        other.is_empty(),
        "besides WireGuard UDP on the underlay: {other:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("192.0.2.200")),
        "the laptop's WireGuard traffic was not seen"
    );

    // Every agent names the laptop apart (not a node) and counts the refused Peer.
    for node in lab.status()["nodes"].array() {
        let r = agent_status(&kwire, node).expect("kwire status --json");
        let ext = r["external_peers"].array();
        assert!(
            ext.len() == 1 && ext[0]["node"].as_str() == Some("laptop"),
            "{}: external peers {ext:?}",
            node["name"]
        );
        assert!(
            !r["peers"]
                .array()
                .iter()
                .any(|p| p["public_key"].as_str() == Some(&dev.keys.public)),
            "the laptop is listed as a node peer"
        );
        assert!(
            r["invalid_peers"]["peer_overlaps_cluster"].as_u64() >= Some(1),
            "{:?}",
            r["invalid_peers"]
        );
        assert!(
            ext[0]["allowed_ips"].strings() == [format!("{LAPTOP_IP}/32")],
            "the refused Peer's range is not in the device: {ext:?}"
        );
    }
    let short = |n: &str| format!("{}-{n}", lab.name());
    let up = lab.metric(&short("n1"), "kwire_peer_up{peer=\"laptop\"}");
    assert_eq!(up, 1.0, "kwire_peer_up{{peer=\"laptop\"}} on n1");

    // A restarted agent reinstates the Peer from its state file before the API answers: n1's
    // agent is killed while n1 cannot reach the API, and the laptop reaches n1 again.
    let n1 = node(&lab.status(), &short("n1")).clone();
    let n1_ns = n1["netns"].as_str().unwrap().to_string();
    let nft = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &n1_ns, "nft"];
        all.extend_from_slice(args);
        kwire_tests::run_host(&all);
    };
    let n1_gateway = n1["gateway_ips"]
        .strings()
        .into_iter()
        .find(|ip| !ip.contains(':'))
        .unwrap();
    ns.wait_ping(&n1_gateway, CONVERGE);
    let state_file = PathBuf::from(n1["state_dir"].as_str().unwrap()).join("peers.json");
    wait_until(CONVERGE, "n1's state file holds the laptop", || {
        std::fs::read_to_string(&state_file).is_ok_and(|t| t.contains(&dev.keys.public))
    });
    nft(&["add", "table", "inet", "kwtest_block"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "kwtest_block",
        "out",
        "{ type filter hook output priority 0; }",
    ]);
    nft(&[
        "add",
        "rule",
        "inet",
        "kwtest_block",
        "out",
        "tcp",
        "dport",
        "6443",
        "drop",
    ]);
    lab.signal_agents(&[&short("n1")], nix::sys::signal::Signal::SIGKILL, CONVERGE);
    let back = try_wait_until(CONVERGE, || ns.ping_once(&n1_gateway, None));
    let node1 = node(&lab.status(), &short("n1")).clone();
    let r = agent_status(&kwire, &node1).expect("kwire status --json on n1");
    if !back {
        let log = std::fs::read_to_string(node1["log"].as_str().unwrap()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the laptop does not reach n1 after its restart: {r:?}\nagent log (last lines first):\n{}",
            tail.join("\n")
        );
    }
    assert_eq!(
        r["api_synced"].as_bool(),
        Some(false),
        "n1 reached the API: {r:?}"
    );
    assert_eq!(
        r["external_peers"]
            .array()
            .first()
            .and_then(|p| p["node"].as_str()),
        Some("laptop"),
        "the restored Peer is named"
    );
    kwire_tests::run_host(&[
        "ip",
        "netns",
        "exec",
        &n1_ns,
        "nft",
        "delete",
        "table",
        "inet",
        "kwtest_block",
    ]);

    // A node marked behind NAT keeps its mapping open: a keepalive to every peer (25 s), with
    // no --persistent-keepalive set. (Only the setting: the lab has no NAT between nodes.)
    let st = lab.status();
    let n2 = st["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(short("n2").as_str()))
        .unwrap()
        .clone();
    let socket = PathBuf::from(n2["uapi_socket"].as_str().unwrap());
    let keepalive_to_n1 = || -> Option<u64> {
        let n1_key = lab.status()["nodes"]
            .array()
            .iter()
            .find(|n| n["name"].as_str() == Some(short("n1").as_str()))?["public_key"]
            .as_str()?
            .to_string();
        let peers = kwire_lab::commands::status::uapi_get(&socket).ok()?;
        Some(
            peers
                .iter()
                .find(|p| p.public_key == n1_key)?
                .persistent_keepalive,
        )
    };
    assert_eq!(keepalive_to_n1(), Some(0));
    let (ok, out) = kubectl(
        &admin,
        &[
            "annotate",
            "node",
            &short("n2"),
            "kwire.dev/behind-nat=true",
        ],
    );
    assert!(ok, "{out}");
    let mut last = None;
    let ok = try_wait_until(CONVERGE, || {
        last = keepalive_to_n1();
        last == Some(25)
    });
    assert!(ok, "n2 behind NAT: keepalive to n1 {last:?}");
}
