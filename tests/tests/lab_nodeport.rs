//! NodePort, LoadBalancer node ports and the traffic policies, in a `kwire-lab` with the real
//! agents: a client in its own namespace on the underlay reaches a Service through a node
//! port on each node (the kernel steers the port into the packet loop, which translates it
//! like a ClusterIP). `externalTrafficPolicy: Cluster` masquerades (every endpoint answers,
//! and sees the node, not the client); `Local` keeps the client's address, serves only the
//! node's own endpoints, and the node's `healthCheckNodePort` says 200 or 503 as kube-proxy
//! does. A LoadBalancer's ingress IP reaching a node is served like its node port, and
//! like its ClusterIP from a pod. Also: `sessionAffinity: ClientIP`, `internalTrafficPolicy: Local`, and a pod
//! reaching itself through its Service (hairpin). The underlay carries only WireGuard
//! between the nodes meanwhile.

use std::process::{Command, Stdio};
use std::time::Duration;

use kwire_tests::lab::{
    lab_service, node, out_text, parse_json, shop_pod, BridgeCapture, Json, JsonExt, Lab,
};
use kwire_tests::{
    require_agent, require_tool, run_host, try_wait_until, wait_until, Netns, Scratch,
};

const UP_TIMEOUT_SECS: &str = "40";
/// Pods running, slices written, tables compiled, node ports steered on both nodes.
const CONVERGE: Duration = Duration::from_secs(30);
/// The NodePort Service's requested node ports.
const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
/// The outside client's address on the underlay.
const CLIENT: &str = "192.0.2.201";
/// web-local's load balancer ingress IP.
const LB_IP: &str = "203.0.113.10";
/// Where the kernel steers node ports (the lab's Service range's network address).
const NODE_PORT_ADDR: &str = "10.96.0.0";

fn manifest(lab: &str) -> String {
    let pod = |name: &str, node: &str, labels: &str| shop_pod(lab, name, node, labels, 8080);
    let svc = |name: &str, selector: &str, spec: &str| {
        format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{{selector}}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
{spec}"#
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{}{}{}{}{}{}{}{}",
        pod("client", "n1", "app: client"),
        pod("web-1", "n1", "app: web, one: \"yes\""),
        pod("web-2", "n2", "app: web"),
        node_port_service(),
        svc(
            "web-local",
            "one: \"yes\"",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n"
        ),
        svc("web-sticky", "app: web", "  sessionAffinity: ClientIP\n"),
        svc("web-itp", "app: web", "  internalTrafficPolicy: Local\n"),
        svc("web-hair", "one: \"yes\"", ""),
    )
}

/// `web-np`: NodePort, `externalTrafficPolicy: Cluster`, with requested node ports.
fn node_port_service() -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: web-np, namespace: shop}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: {NODE_PORT_HTTP}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns, nodePort: {NODE_PORT_DNS}}}
"#
    )
}

fn service<'a>(st: &'a Json, name: &str) -> &'a Json {
    lab_service(st, "shop", name).unwrap_or_else(|| panic!("no service shop/{name} in {st:?}"))
}

/// One TCP connection from `ns` to `addr` (`IP:PORT`): the line the pod answered.
fn fetch(ns: &Netns, addr: &str) -> Option<String> {
    let o = Command::new("ip")
        .args(["netns", "exec", ns.name(), "socat", "-T", "2", "-"])
        .arg(format!("TCP:{addr},connect-timeout=2"))
        .stdin(Stdio::null())
        .output()
        .expect("socat");
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !text.is_empty()).then_some(text)
}

/// One UDP datagram from `ns` to `addr`: the answer.
fn ask_udp(ns: &Netns, addr: &str) -> Option<String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns.name(), "socat", "-T", "2", "-"])
        .arg(format!("UDP:{addr}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("socat");
    use std::io::Write;
    let _ = c.stdin.take().unwrap().write_all(b"hi\n");
    let o = c.wait_with_output().expect("socat");
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// `curl` from `ns`: (HTTP status, body).
fn http_get(ns: &Netns, url: &str) -> (u16, String) {
    let o = ns.exec(&["curl", "-s", "-m", "2", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The pod named in an answer (`shop/web-1 from ...`).
fn backend(answer: &str) -> &str {
    let a = answer
        .trim_start_matches("connected; answer ")
        .trim_matches('"');
    a.split_whitespace().next().unwrap_or("")
}

#[test]
fn node_ports_traffic_policies_affinity_and_hairpin() {
    let kwire = require_agent!();
    require_tool("socat");
    require_tool("curl");
    require_tool("tcpdump");
    let scratch = Scratch::new("lab-nodeport");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    let file = scratch.file("shop.yaml");
    std::fs::write(&file, manifest(lab.name())).unwrap();
    lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);

    let mut st = lab.status();
    wait_until(
        CONVERGE,
        "pods running and web-np with two endpoints",
        || {
            st = lab.status();
            st["services"]
                .array()
                .iter()
                .any(|s| s["name"].as_str() == Some("web-np") && s["endpoints"].array().len() == 2)
                && ["client", "web-1", "web-2"].iter().all(|n| {
                    st["pods"].array().iter().any(|p| {
                        p["name"].as_str() == Some(n) && p["phase"].as_str() == Some("Running")
                    })
                })
        },
    );
    // The stand-in honoured the requested node ports and allocated the others (and the
    // health check port) from the range, as kube-apiserver does.
    let np = service(&st, "web-np");
    assert_eq!(np["type"].as_str(), Some("NodePort"));
    let mut ports: Vec<u64> = np["node_ports"]
        .array()
        .iter()
        .filter_map(|p| p.as_u64())
        .collect();
    ports.sort();
    assert_eq!(ports, vec![NODE_PORT_DNS as u64, NODE_PORT_HTTP as u64]);
    let local_port = service(&st, "web-local")["node_ports"].array()[0]
        .as_u64()
        .expect("web-local's node port") as u16;
    assert!((30000..=32767).contains(&local_port));
    let api = st["api_url"].as_str().expect("api_url").to_string();
    let argv = lab.api_curl_args(
        "GET",
        &format!("{api}/api/v1/namespaces/shop/services/web-local"),
    );
    let web_local = parse_json(&run_host(&argv)).expect("service JSON");
    let hc_port = web_local["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("healthCheckNodePort allocated") as u16;
    // A node port already taken is refused with kube-apiserver's error.
    let dup = scratch.file("dup.yaml");
    std::fs::write(
        &dup,
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: dup, namespace: shop}}\nspec:\n  type: NodePort\n  ports:\n  - {{port: 81, nodePort: {NODE_PORT_HTTP}}}\n"),
    )
    .unwrap();
    let o = lab.cmd("apply", &["-f", dup.to_str().unwrap()]);
    let text = out_text(&o);
    assert!(
        !o.status.success() && text.contains("provided port is already allocated"),
        "{text}"
    );

    // A client on the underlay, in its own namespace.
    let outside = Netns::new("npc");
    let inner = lab.attach_to_underlay(&outside, "c");
    outside.run(&["ip", "addr", "add", &format!("{CLIENT}/24"), "dev", &inner]);
    outside.run(&["ip", "link", "set", &inner, "up"]);
    // A load balancer in front of nodes follows its own routes, never ICMP redirects.
    outside.run(&["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"]);
    outside.run(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{inner}.accept_redirects=0"),
    ]);
    let nodes: Vec<(String, String)> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let full = format!("{}-{n}", lab.name());
            (
                n.to_string(),
                node(&st, &full)["underlay_ip"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();

    // Only WireGuard between the nodes, whatever the client's traffic does.
    let capture = BridgeCapture::start(
        &lab,
        &scratch,
        "underlay",
        &format!("not arp and not (tcp port 6443) and not host {CLIENT} and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))"),
    );

    // externalTrafficPolicy: Cluster: through each node, both backends answer (one across
    // the tunnel), and they see the node (masqueraded), not the client.
    for (n, ip) in &nodes {
        let mut seen = std::collections::BTreeSet::new();
        let mut last = None;
        let ok = try_wait_until(CONVERGE, || {
            last = fetch(&outside, &format!("{ip}:{NODE_PORT_HTTP}"));
            if let Some(a) = &last {
                assert!(
                    !a.contains(CLIENT),
                    "{n}: Cluster kept the client's address: {a}"
                );
                seen.insert(backend(a).to_string());
            }
            seen.len() == 2
        });
        assert!(
            ok,
            "{n} {ip}:{NODE_PORT_HTTP}: answered by {seen:?}; last {last:?}"
        );
        let mut last = None;
        let ok = try_wait_until(CONVERGE, || {
            last = ask_udp(&outside, &format!("{ip}:{NODE_PORT_DNS}"));
            last.as_deref().is_some_and(|a| a.starts_with("shop/web-"))
        });
        assert!(ok, "{n} {ip}:{NODE_PORT_DNS}/UDP: {last:?}");
    }

    // externalTrafficPolicy: Local (web-local's only endpoint is web-1 on n1): n1 serves it
    // with the client's address kept and says 200; n2 has no local endpoint: it says 503 and
    // drops the flow (the load balancer's health check keeps traffic away from it).
    let (n1_ip, n2_ip) = (&nodes[0].1, &nodes[1].1);
    let mut last = None;
    let ok = try_wait_until(CONVERGE, || {
        last = fetch(&outside, &format!("{n1_ip}:{local_port}"));
        last.is_some()
    });
    assert!(ok, "n1:{local_port} (Local): {last:?}");
    for _ in 0..4 {
        let a = fetch(&outside, &format!("{n1_ip}:{local_port}")).expect("n1 Local answers");
        assert_eq!(
            a,
            format!("shop/web-1 from {CLIENT}"),
            "Local keeps the client's address"
        );
    }
    let (code, body) = http_get(&outside, &format!("http://{n1_ip}:{hc_port}/healthz"));
    assert_eq!(code, 200, "n1 health check: {body}");
    let v = parse_json(&body).expect("health check JSON");
    assert_eq!(v["localEndpoints"].as_u64(), Some(1), "{body}");
    assert_eq!(v["service"]["name"].as_str(), Some("web-local"), "{body}");
    // n1 answering says nothing of n2's table: n2 serves web-local's health check once its
    // own Service watch delivered web-local (before, nothing listens there).
    let mut last = (0, String::new());
    let ok = try_wait_until(CONVERGE, || {
        last = http_get(&outside, &format!("http://{n2_ip}:{hc_port}/healthz"));
        last.0 == 503
    });
    assert!(ok, "n2 health check: {last:?}");
    assert_eq!(
        fetch(&outside, &format!("{n2_ip}:{local_port}")),
        None,
        "n2 has no local endpoint for a Local Service"
    );
    assert!(lab.drops("n2", "service_no_local_endpoint") >= 1.0);

    // A load balancer's ingress IP (status written as a cloud controller would): reaching
    // a node for it is served like the node port, with web-local's Local policy; from a pod
    // it is served like the ClusterIP (kube-proxy short-circuits it the same way).
    let patch = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.10"}]}}}"#;
    let mut argv = lab.api_curl_args(
        "PATCH",
        &format!("{api}/api/v1/namespaces/shop/services/web-local/status"),
    );
    let url = argv.pop().unwrap();
    argv.extend([
        "-H".to_string(),
        "Content-Type: application/merge-patch+json".to_string(),
        "-d".to_string(),
        patch.to_string(),
        url,
    ]);
    run_host(&argv);
    // The route to the ingress IP only once n1 steers it: a SYN that n1 forwarded before (to
    // its default route, out of the interface it came in by) would earn the client an ICMP
    // redirect around n1, as from any router, and the later SYNs would never reach n1. A
    // real load balancer ignores redirects; so does this client, below.
    let steered = try_wait_until(CONVERGE, || {
        let o = lab.exec("n1", &["nft", "list", "map", "inet", "kwire", "ingress4"]);
        String::from_utf8_lossy(&o.stdout).contains(LB_IP)
    });
    assert!(steered, "n1 never steered {LB_IP} into the loop");
    outside.run(&["ip", "route", "add", &format!("{LB_IP}/32"), "via", n1_ip]);
    let mut last = None;
    let ok = try_wait_until(CONVERGE, || {
        last = fetch(&outside, &format!("{LB_IP}:80"));
        last.is_some()
    });
    assert!(ok, "{LB_IP}:80 through n1: {last:?}");
    assert_eq!(last.unwrap(), format!("shop/web-1 from {CLIENT}"));
    let mut last = None;
    let ok = try_wait_until(CONVERGE, || {
        last = lab.probe("shop/client", &format!("{LB_IP}:80")).answer();
        last.is_some()
    });
    assert!(ok, "{LB_IP}:80 from a pod: {last:?}");
    assert_eq!(backend(&last.unwrap()), "shop/web-1");
    outside.run(&[
        "ip",
        "route",
        "replace",
        &format!("{LB_IP}/32"),
        "via",
        n2_ip,
    ]);
    assert_eq!(
        fetch(&outside, &format!("{LB_IP}:80")),
        None,
        "n2 has no local endpoint for the Local Service's ingress IP"
    );

    let lines = capture.stop();
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains("UDP") && l.contains(".51820")))
        .collect();
    assert!(
        other.is_empty(),
        "besides WireGuard between the nodes: {other:#?}"
    );

    let vip = |name: &str| service(&st, name)["cluster_ips"].strings()[0].clone();

    // sessionAffinity: ClientIP: every new connection of the client lands on one backend.
    let sticky = format!("{}:80", vip("web-sticky"));
    let answers: Vec<String> = (0..8)
        .map(|_| {
            let mut a = None;
            wait_until(CONVERGE, "web-sticky answers", || {
                a = lab.probe("shop/client", &sticky).answer();
                a.is_some()
            });
            backend(&a.unwrap()).to_string()
        })
        .collect();
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "affinity: {answers:?}"
    );

    // internalTrafficPolicy: Local: the client (on n1) reaches web-1 only; node n2 web-2 only.
    let itp = format!("{}:80", vip("web-itp"));
    for (from, want) in [("shop/client", "shop/web-1"), ("n2", "shop/web-2")] {
        for _ in 0..6 {
            let mut a = None;
            wait_until(CONVERGE, format!("web-itp from {from}"), || {
                a = lab.probe(from, &itp).answer();
                a.is_some()
            });
            assert_eq!(backend(&a.unwrap()), want, "from {from}");
        }
    }

    // Hairpin: web-1 reaches itself through web-hair; it sees the node-port address as the
    // client (its own would be dropped as a martian), and the reply finds its way back.
    let hair = format!("{}:80", vip("web-hair"));
    let mut a = None;
    let ok = try_wait_until(CONVERGE, || {
        a = lab.probe("shop/web-1", &hair).answer();
        a.is_some()
    });
    assert!(ok, "hairpin to {hair}: {a:?}");
    let a = a.unwrap();
    assert_eq!(backend(&a), "shop/web-1");
    assert!(a.contains(NODE_PORT_ADDR), "{a}");
}
