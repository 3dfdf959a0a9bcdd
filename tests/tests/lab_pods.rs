//! `kwire-lab` pods with the real `kwire agent` and the real `kwire-cni` (run by the lab's
//! kubelet role as a container runtime runs a CNI configuration list): pods on one node and on
//! different nodes talk TCP, UDP and ICMP over IPv4 and IPv6; a node reaches its pods; pod
//! status carries podIPs; a deleted pod loses its namespace and its IP; the underlay carries
//! only WireGuard UDP while pods talk across nodes. Needs root; skips (with a message) when the
//! kwire binary has no `agent`, or when the agent does not serve the CNI socket yet.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kwire_tests::lab::{lab_pod as pod, parse_json, BridgeCapture, Json, JsonExt, Lab};
use kwire_tests::require_agent;
use kwire_tests::{require_tool, run_host, wait_until, Scratch};

/// WireGuard port of every agent in a lab.
const WG_PORT: &str = "51820";
/// `up` (mesh and pods) must finish within this (the test's budget is 60 s).
const UP_TIMEOUT_SECS: &str = "40";
/// A fresh pod on a converged lab: namespace, CNI ADD, server.
const POD_READY: Duration = Duration::from_secs(15);
/// How long the agent may take to serve its CNI socket once the lab is up.
const CNI_SOCKET_WAIT: Duration = Duration::from_secs(10);

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

fn skip_no_cni(lab: &Lab) -> bool {
    if cni_sockets_served(lab) {
        return false;
    }
    kwire_tests::skip(
        module_path!(),
        "the agent serves no CNI socket at <run-dir>/cni.sock (kwire agent without the CNI server)",
    );
    true
}

fn out_text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

fn pods(st: &Json) -> Vec<Json> {
    st["pods"].array().to_vec()
}

/// `kwire-lab probe --json FROM TO [-6]`: (reachable, exit code, report).
fn probe(lab: &Lab, from: &str, to: &str, v6: bool) -> (bool, i32, Json) {
    let mut args = vec![from, to, "--json", "--timeout", "3"];
    if v6 {
        args.push("-6");
    }
    let o = lab.cmd("probe", &args);
    let report = parse_json(String::from_utf8_lossy(&o.stdout).trim())
        .unwrap_or_else(|e| panic!("probe {from} {to}: not JSON ({e}): {}", out_text(&o)));
    (
        report["reachable"].as_bool() == Some(true),
        o.status.code().unwrap_or(-1),
        report,
    )
}

fn assert_reachable(lab: &Lab, from: &str, to: &str, v6: bool) {
    let (ok, code, report) = probe(lab, from, to, v6);
    assert!(
        ok && code == 0,
        "{from} -> {to} ({}) not reachable (exit {code}): {report:?}",
        if v6 { "IPv6" } else { "IPv4" }
    );
}

#[test]
fn pods_talk_tcp_udp_icmp_v4_v6_within_and_across_nodes_and_only_wireguard_crosses() {
    let kwire = require_agent!();
    let started = Instant::now();
    let scratch = Scratch::new("lab-pods");
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
        if skip_no_cni(&lab) {
            return;
        }
        panic!("kwire-lab up --pods 2 failed: {}", out_text(&up));
    }

    // Status: every node's CNI socket; four pods, each on its node, with a namespace and
    // one IPv4 and one IPv6 address from its node's pod CIDRs.
    let st = lab.status();
    let n1 = format!("{}-n1", lab.name());
    let n2 = format!("{}-n2", lab.name());
    for n in st["nodes"].array() {
        let sock = n["cni_socket"].as_str().expect("cni_socket");
        assert!(sock.ends_with("/run/kwire/cni.sock"), "{sock}");
        assert!(Path::new(sock).exists(), "{sock}");
    }
    assert_eq!(pods(&st).len(), 4, "{:?}", st["pods"]);
    for (node, idx) in [(&n1, 1), (&n2, 2)] {
        for i in 1..=2 {
            let name = format!("pod-{idx}-{i}");
            let p = pod(&st, "default", &name).unwrap_or_else(|| panic!("no pod {name}"));
            assert_eq!(p["node"].as_str(), Some(node.as_str()));
            let netns = p["netns"].as_str().expect("netns");
            assert!(Path::new("/var/run/netns").join(netns).exists(), "{netns}");
            let ips = p["ips"].strings();
            assert_eq!(ips.len(), 2, "{name}: {ips:?}");
            assert!(
                !ips[0].contains(':') && ips[1].contains(':'),
                "{name}: {ips:?}"
            );
            // The pod's eth0 carries them.
            let o = lab.exec(
                &format!("default/{name}"),
                &["ip", "-o", "addr", "show", "dev", "eth0"],
            );
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(o.status.success(), "exec in {name}: {}", out_text(&o));
            for ip in &ips {
                assert!(text.contains(ip.as_str()), "{name} eth0 lacks {ip}: {text}");
            }
        }
    }

    // The Pod objects themselves: Running, podIP and podIPs (IPv4 first) as the kubelet writes them.
    require_tool("curl");
    let api = st["api_url"].as_str().expect("api_url").to_string();
    for p in pods(&st) {
        let name = p["name"].as_str().unwrap();
        let get = lab.api_curl_args(
            "GET",
            &format!("{api}/api/v1/namespaces/default/pods/{name}"),
        );
        let obj = parse_json(&run_host(
            &get.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .expect("a Pod as JSON");
        let status = &obj["status"];
        assert_eq!(status["phase"].as_str(), Some("Running"), "{name}");
        let ips: Vec<String> = status["podIPs"]
            .array()
            .iter()
            .filter_map(|i| i["ip"].as_str().map(str::to_string))
            .collect();
        assert_eq!(ips, p["ips"].strings(), "{name}");
        assert_eq!(status["podIP"].as_str(), Some(ips[0].as_str()), "{name}");
    }

    // Everything on the bridge except link control and the agents' calls to the API.
    let capture = BridgeCapture::start(
        &lab,
        &scratch,
        "underlay",
        "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))",
    );
    for to in ["default/pod-1-2", "default/pod-2-1"] {
        for v6 in [false, true] {
            assert_reachable(&lab, "default/pod-1-1", &format!("{to}:80"), v6);
            assert_reachable(&lab, "default/pod-1-1", &format!("{to}:80/UDP"), v6);
            assert_reachable(&lab, "default/pod-1-1", to, v6);
        }
    }
    // And back, across nodes.
    assert_reachable(&lab, "default/pod-2-2", "default/pod-1-2:80", false);
    assert_reachable(&lab, "default/pod-2-2", "default/pod-1-2:80/UDP", true);
    let lines = capture.stop();
    assert!(
        !lines.is_empty(),
        "no pod traffic seen on the underlay bridge"
    );
    let port = format!(".{WG_PORT}");
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains("UDP") && l.contains(&port)))
        .collect();
    assert!(
        other.is_empty(),
        "besides WireGuard UDP on the underlay: {other:#?}"
    );

    // The server answers with the pod's name: the packet reached that very pod.
    let (_, _, r) = probe(&lab, "default/pod-1-1", "default/pod-2-1:80", false);
    assert!(
        r["detail"]
            .as_str()
            .unwrap_or("")
            .contains("default/pod-2-1"),
        "{r:?}"
    );

    // A pod reaches its node and, through it, the outside world (the underlay bridge's
    // addresses, in no node), masqueraded: no pod address shows on the underlay.
    let node1 = st["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(n1.as_str()))
        .expect("n1 in status")
        .clone();
    let n1_v4 = node1["underlay_ip"]
        .as_str()
        .expect("underlay_ip")
        .to_string();
    let n1_v6 = node1["underlay_ipv6"]
        .as_str()
        .expect("underlay_ipv6")
        .to_string();
    let outside_v6 = format!(
        "{}::fe",
        n1_v6.rsplit_once("::").expect("2001:db8:TAG::N").0
    );
    let capture = BridgeCapture::start(
        &lab,
        &scratch,
        "pod-addresses",
        "net 10.244.0.0/16 or net fd00:10:244::/56",
    );
    assert_reachable(&lab, "default/pod-1-1", &n1_v4, false);
    assert_reachable(&lab, "default/pod-1-1", &n1_v6, false);
    assert_reachable(&lab, "default/pod-1-1", "192.0.2.254:6443", false);
    assert_reachable(&lab, "default/pod-1-1", &outside_v6, false);
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "pod addresses on the underlay: {leaked:#?}"
    );

    // A node reaches its own pods (through its host tun).
    for v6 in [false, true] {
        assert_reachable(&lab, "n1", "default/pod-1-1:80", v6);
        assert_reachable(&lab, "n1", "default/pod-1-2", v6);
        assert_reachable(&lab, "n2", "default/pod-2-1:80/UDP", v6);
    }

    // Not reachable is exit 1 (nothing on port 81); a pod that does not exist is exit 2.
    let (ok, code, r) = probe(&lab, "default/pod-1-1", "default/pod-2-1:81", false);
    assert!(!ok && code == 1, "closed port: exit {code}, {r:?}");
    let o = lab.cmd("probe", &["default/pod-1-1", "default/nope:80", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", out_text(&o));

    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// The manifest `apply` gets: a namespace, a pod with no node (the lab schedules it) and
/// declared ports, and a NetworkPolicy (stored for later; the agent may or may not enforce it:
/// it allows all ingress).
fn manifest(ns: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: {ns}
  labels: {{app: web}}
spec:
  containers:
  - name: web
    image: kwire-lab/pod-serve
    ports:
    - containerPort: 8080
    - {{containerPort: 5353, protocol: UDP}}
---
{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "client", "namespace": "{ns}"}}, "spec": {{"containers": [{{"name": "c", "image": "x"}}]}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-all, namespace: {ns}}}
spec:
  podSelector: {{}}
  ingress: [{{}}]
"#
    )
}

#[test]
fn applied_pods_are_scheduled_served_on_their_ports_and_deleted_with_their_namespace_and_ip() {
    let kwire = require_agent!();
    let started = Instant::now();
    let scratch = Scratch::new("lab-pods-apply");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    if !kwire_tests::try_wait_until(CNI_SOCKET_WAIT, || cni_sockets_served(&lab))
        && skip_no_cni(&lab)
    {
        return;
    }
    let file = scratch.file("shop.yaml");
    std::fs::write(&file, manifest("shop")).unwrap();
    let out = lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);
    assert!(out.contains("pod/shop/web created"), "{out}");
    assert!(
        out.contains("networkpolicy/shop/allow-all created"),
        "{out}"
    );

    let mut st = lab.status();
    wait_until(
        POD_READY,
        "shop/web and shop/client running with IPs",
        || {
            st = lab.status();
            ["web", "client"].iter().all(|n| {
                pod(&st, "shop", n).is_some_and(|p| {
                    p["phase"].as_str() == Some("Running") && p["ips"].strings().len() == 2
                })
            })
        },
    );
    // Scheduled round-robin: one pod per node.
    let web = pod(&st, "shop", "web").unwrap().clone();
    let client = pod(&st, "shop", "client").unwrap().clone();
    let web_node = web["node"].as_str().expect("web scheduled").to_string();
    let client_node = client["node"]
        .as_str()
        .expect("client scheduled")
        .to_string();
    assert_ne!(web_node, client_node, "round-robin over two nodes");

    // The declared ports answer, the undeclared default does not.
    for v6 in [false, true] {
        assert_reachable(&lab, "shop/client", "shop/web:8080", v6);
        assert_reachable(&lab, "shop/client", "shop/web:5353/UDP", v6);
    }
    let (ok, code, _) = probe(&lab, "shop/client", "shop/web:80", false);
    assert!(!ok && code == 1);
    // By IP as well.
    let web_v4 = web["ips"].strings()[0].clone();
    assert_reachable(&lab, "shop/client", &format!("{web_v4}:8080"), false);
    let web_v6 = web["ips"].strings()[1].clone();
    assert_reachable(&lab, "shop/client", &format!("[{web_v6}]:5353/udp"), false);

    // Applying again updates in place.
    let out = lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);
    assert!(out.contains("pod/shop/web configured"), "{out}");

    // Delete: the namespace goes, the agent releases the IP (ipam.json of web's node).
    let web_netns = web["netns"].as_str().expect("netns").to_string();
    let node_state = lab.status()["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(web_node.as_str()))
        .and_then(|n| n["state_dir"].as_str().map(PathBuf::from))
        .expect("web's node state_dir");
    let ipam = node_state.join("ipam.json");
    let allocated = |ip: &str| {
        std::fs::read_to_string(&ipam)
            .map(|t| {
                t.split("\"last\"")
                    .next()
                    .unwrap_or("")
                    .contains(&format!("\"{ip}\""))
            })
            .unwrap_or(false)
    };
    assert!(allocated(&web_v4), "{} lacks {web_v4}", ipam.display());
    let out = lab.cmd_ok("delete", &["-f", file.to_str().unwrap()]);
    assert!(out.contains("pod/shop/web deleted"), "{out}");
    wait_until(POD_READY, "web's namespace deleted", || {
        !Path::new("/var/run/netns").join(&web_netns).exists()
    });
    wait_until(POD_READY, "web's IPs released", || {
        !allocated(&web_v4) && !allocated(&web_v6)
    });
    assert!(pod(&lab.status(), "shop", "web").is_none());
    let o = lab.cmd("delete", &["-f", file.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "deleting again fails: {}",
        out_text(&o)
    );
    lab.cmd_ok(
        "delete",
        &["-f", file.to_str().unwrap(), "--ignore-not-found"],
    );

    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
