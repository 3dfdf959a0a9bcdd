//! Observability end to end: three real agents in network namespaces, the API stand-in.
//! `/metrics` matches the traffic, passes `promtool check metrics`, agrees with
//! `kwire status --json`; drops by reason rise when provoked; `kwire graph` output parses with
//! `dot`; the `KwireReady` condition is set; a stopped peer gets kwire_peer_up 0, a growing
//! handshake age and a `PeerUnreachable` Event (then `PeerRecovered`). Needs root; skipped
//! with a message otherwise (the topology of agent_mesh.rs: `mesh_support`).

mod mesh_support;

use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use kwire_tests::{require_root, wait_until, Netns, Proc, Scratch};
use mesh_support::{gateway, http_get, nodes_kind, Cluster, Node, PORT, TUN};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// ICMP payload of the measured pings; the IP packet is 28 bytes more.
/// What the agents converge within (Events, conditions, counters, handshakes): generous for
/// a debug build on two loaded cores, free when things are on time.
const CONVERGE: Duration = Duration::from_secs(30);
const PING_PAYLOAD: u64 = 1000;
const PINGS: u64 = 20;
/// WireGuard data message overhead per packet: header 16, tag 16, padding up to 15.
const WG_OVERHEAD: u64 = 16 + 16 + 15;
/// Handshake and keepalive messages that may ride along in the measured window.
const WG_SLACK: u64 = 1024;

fn first_cidr(api: &ApiServer, name: &str) -> String {
    let n = api.get(nodes_kind(), None, name).unwrap();
    n.pointer("/spec/podCIDRs/0")
        .and_then(Value::as_str)
        .unwrap()
        .to_string()
}

/// The agent as the DaemonSet runs it (kwire-lab's container runtime), with the flags this test
/// patches in: JSON logs, and peers unreachable after 3 s instead of 2 min.
const AGENT_ARGS: &[&str] = &["--log-format=json", "--peer-unreachable-after=3s"];

fn metrics(ns: &Netns) -> String {
    let (ok, text) = http_get(ns, "/metrics");
    assert!(ok, "GET /metrics failed in {ns}");
    text
}

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn peer(text: &str, metric: &str, node: &str) -> Option<f64> {
    sample(text, &format!("{metric}{{node=\"{node}\"}}"))
}

fn kwire(args: &[&str]) -> std::process::Output {
    Command::new(kwire_tests::kwire_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn status_json(n: &Node) -> Value {
    let out = kwire(&[
        "status",
        "--json",
        "--run-dir",
        n.spec().run_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "kwire status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ping(ns: &Netns, dst: &str, count: u64, size: u64) {
    let out = ns.exec(&[
        "ping",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.05",
        "-s",
        &size.to_string(),
        "-W",
        "2",
        dst,
    ]);
    assert!(
        out.status.success(),
        "ping {dst} from {ns}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn events(api: &ApiServer) -> Vec<Value> {
    api.list(ApiServer::kind("events.k8s.io/v1", "Event").unwrap(), None)
        .unwrap()
}

fn has_event(api: &ApiServer, regarding: &str, reason: &str) -> bool {
    events(api).iter().any(|e| {
        e.pointer("/regarding/name").and_then(Value::as_str) == Some(regarding)
            && e.get("reason").and_then(Value::as_str) == Some(reason)
    })
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || Command::new(name)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

#[test]
fn metrics_status_graph_and_peer_health() {
    require_root!();
    kwire_tests::require_tool("curl");
    kwire_tests::require_tool("ping");
    let scratch = Scratch::new("obs");
    let (sw, mut nodes) = mesh_support::nodes("o", 3);

    sw.ns.run_in(|| {
        let cluster = Cluster::start(ApiServerConfig::default(), &scratch, &mut nodes, AGENT_ARGS, |n| {
            json!({
                "addresses": [{"type": "InternalIP", "address": n.ip}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "stand-in"}],
            })
        });
        let api = &cluster.api;
        let kubeconfig = scratch.file("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let cidrs: Vec<String> = nodes.iter().map(|n| first_cidr(api, &n.name)).collect();
        let mut agents: Vec<Proc> = nodes.iter().map(|n| cluster.spawn_agent(n, &scratch, "1")).collect();
        for (i, n) in nodes.iter().enumerate() {
            for (j, c) in cidrs.iter().enumerate() {
                if i != j {
                    n.ns.wait_ping(&gateway(c), Duration::from_secs(20));
                }
            }
        }
        let (a, b) = (&nodes[0], &nodes[1]);

        // 1. Bytes after traffic: within the WireGuard overhead of what was sent.
        let before = metrics(&a.ns);
        let before_b = metrics(&b.ns);
        ping(&a.ns, &gateway(&cidrs[1]), PINGS, PING_PAYLOAD);
        let after = metrics(&a.ns);
        let after_b = metrics(&b.ns);
        let ip_bytes = PINGS * (PING_PAYLOAD + 28);
        let (lo, hi) = (ip_bytes as f64, (PINGS * (PING_PAYLOAD + 28 + WG_OVERHEAD) + WG_SLACK) as f64);
        for (what, d) in [
            ("tx of node 1 to node 2", peer(&after, "kwire_peer_tx_bytes_total", &b.name).unwrap() - peer(&before, "kwire_peer_tx_bytes_total", &b.name).unwrap()),
            ("rx of node 1 from node 2", peer(&after, "kwire_peer_rx_bytes_total", &b.name).unwrap() - peer(&before, "kwire_peer_rx_bytes_total", &b.name).unwrap()),
            ("rx of node 2 from node 1", peer(&after_b, "kwire_peer_rx_bytes_total", &a.name).unwrap() - peer(&before_b, "kwire_peer_rx_bytes_total", &a.name).unwrap()),
        ] {
            assert!(d >= lo && d <= hi, "{what}: {d} bytes for {PINGS} pings of {ip_bytes} IP bytes (expected {lo}..={hi})");
        }
        let tx_pk = |m: &str| sample(m, "kwire_packets_total{direction=\"tx\"}").unwrap();
        assert!(tx_pk(&after) - tx_pk(&before) >= PINGS as f64, "packets tx grew by the pings");
        assert_eq!(peer(&after, "kwire_peer_up", &b.name), Some(1.0));
        assert!(sample(&after, &format!("kwire_peer_handshakes_total{{node=\"{}\",result=\"success\"}}", b.name)).unwrap() >= 1.0, "{after}");
        assert!(after.contains(&format!("kwire_peer_endpoint_info{{node=\"{}\",endpoint=\"{}:{PORT}\"}} 1", b.name, b.ip)), "{after}");
        // The Node filter counted the list it passed on (both Nodes at least).
        assert!(sample(&after, "kwire_watch_items_total{kind=\"Node\",outcome=\"passed\"}").unwrap() >= 2.0, "{after}");
        for want in ["kwire_peers_expected 2", "kwire_peers_connected 2", "kwire_api_synced 1", "kwire_pods 0", "kwire_build_info{version=", "kwire_watch_errors_total 0", "kwire_watch_resyncs_total "] {
            assert!(after.contains(want), "missing {want:?} in:\n{after}");
        }

        // 2. promtool accepts the exposition.
        if tool("promtool") {
            let mut child = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(after.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "promtool check metrics: {}{}\n{after}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        } else {
            kwire_tests::skip("promtool check", "promtool not installed (apt install prometheus)");
        }

        // 3. Drops by reason: a packet for an address in no peer's range.
        a.ns.run(&["ip", "route", "add", "198.18.0.0/24", "dev", TUN]);
        let no_peer = |m: &str| sample(m, "kwire_drops_total{reason=\"no_peer\"}").unwrap();
        let d0 = no_peer(&metrics(&a.ns));
        let _ = a.ns.exec(&["ping", "-q", "-c", "3", "-i", "0.05", "-W", "1", "198.18.0.1"]);
        wait_until(CONVERGE, "no_peer drops to rise by 3", || no_peer(&metrics(&a.ns)) >= d0 + 3.0);

        // 4. `kwire status --json` agrees with /metrics. A keepalive may pass at any moment (10 s
        //    after the last data received, and the pings above were data), so the status is
        //    read between two scrapes whose counters agree: counters only grow, so a status
        //    that differs from both is wrong, not late.
        let counters = |m: &str| -> Vec<String> {
            m.lines()
                .filter(|l| ["kwire_peer_rx_bytes_total", "kwire_peer_tx_bytes_total", "kwire_peer_up", "kwire_drops_total"].iter().any(|c| l.starts_with(c)))
                .map(str::to_string)
                .collect()
        };
        let mut read = None;
        wait_until(CONVERGE, "two scrapes of node 1's counters around its status that agree", || {
            let m0 = metrics(&a.ns);
            let st = status_json(a);
            let m = metrics(&a.ns);
            let quiet = counters(&m0) == counters(&m);
            read = Some((st, m));
            quiet
        });
        let (st, m) = read.expect("read");
        assert_eq!(st["node"], a.name.as_str());
        assert_eq!(st["peers_expected"].as_u64().unwrap() as f64, sample(&m, "kwire_peers_expected").unwrap());
        assert_eq!(st["pod_cidrs"][0], cidrs[0].as_str());
        for p in st["peers"].as_array().unwrap() {
            let node = p["node"].as_str().unwrap();
            assert_eq!(p["rx_bytes"].as_f64(), peer(&m, "kwire_peer_rx_bytes_total", node), "rx of {node}");
            assert_eq!(p["tx_bytes"].as_f64(), peer(&m, "kwire_peer_tx_bytes_total", node), "tx of {node}");
            assert_eq!(p["up"].as_bool().map(|u| if u { 1.0 } else { 0.0 }), peer(&m, "kwire_peer_up", node));
        }
        assert_eq!(st["drops"]["no_peer"].as_f64(), sample(&m, "kwire_drops_total{reason=\"no_peer\"}"));
        let text = kwire(&["status", "--run-dir", a.spec().run_dir.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains(&format!("peer: {} (up)", b.name)) && !text.contains('\x1b'), "{text}");
        let missing = kwire(&["status", "--run-dir", scratch.file("nowhere").to_str().unwrap()]);
        assert!(!missing.status.success());
        assert!(String::from_utf8_lossy(&missing.stderr).contains("is the DaemonSet running on this node?"));
        let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
        assert_eq!(mode(&a.spec().run_dir.join("status.sock")), 0o600);
        assert_eq!(mode(&a.spec().run_dir), 0o700);

        // 5. The graph of all three views parses.
        let mut argv = vec!["graph".to_string(), "--kubeconfig".into(), kubeconfig.display().to_string()];
        for n in &nodes {
            argv.extend(["--run-dir".to_string(), n.spec().run_dir.display().to_string()]);
        }
        let out = Command::new(kwire_tests::kwire_bin()).args(&argv).output().unwrap();
        assert!(out.status.success(), "kwire graph: {}", String::from_utf8_lossy(&out.stderr));
        let dot = String::from_utf8(out.stdout).unwrap();
        for n in &nodes {
            assert!(dot.contains(&format!("\"{}\" [label=\"{}\\n{}", n.name, n.name, cidrs[nodes.iter().position(|x| x.name == n.name).unwrap()])), "{dot}");
        }
        if tool("dot") {
            let mut child = Command::new("dot").arg("-Tsvg").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("<svg"), "dot -Tsvg: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            kwire_tests::skip("dot -Tsvg", "graphviz not installed (apt install graphviz)");
        }

        // 6. KwireReady on every Node; the stand-in's other condition kept.
        wait_until(CONVERGE, "KwireReady=True on every Node, Ready kept", || {
            nodes.iter().all(|n| {
                let node = api.get(nodes_kind(), None, &n.name).unwrap();
                let conds = node.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
                let get = |t: &str| conds.iter().find(|c| c["type"] == t).map(|c| c["status"].clone());
                get("KwireReady") == Some(json!("True")) && get("Ready") == Some(json!("True"))
            })
        });

        // 7. Node 3's agent stops while node 1 pings its gateway: unreachable, up 0, age grows.
        let c = &nodes[2];
        let (st3, _) = agents[2].stop();
        assert!(st3.success());
        let pinger = a.ns.spawn(&["ping", "-i", "0.2", "-W", "1", &gateway(&cidrs[2])], scratch.file("pinger.log"));
        wait_until(Duration::from_secs(30), format!("a PeerUnreachable Event on {}", c.name), || has_event(api, &c.name, "PeerUnreachable"));
        let m1 = metrics(&a.ns);
        assert_eq!(peer(&m1, "kwire_peer_up", &c.name), Some(0.0), "{m1}");
        assert!(m1.contains("kwire_peers_connected 1"), "{m1}");
        let age1 = peer(&m1, "kwire_peer_last_handshake_age_seconds", &c.name).unwrap();
        wait_until(CONVERGE, "the handshake age of the stopped peer to grow", || {
            peer(&metrics(&a.ns), "kwire_peer_last_handshake_age_seconds", &c.name).is_some_and(|x| x > age1 + 0.5)
        });
        let st = status_json(a);
        let p3 = st["peers"].as_array().unwrap().iter().find(|p| p["node"] == c.name.as_str()).unwrap().clone();
        assert_eq!(p3["unreachable"], true);
        assert_eq!(p3["up"], false);
        // The other peer is not blamed.
        assert!(!has_event(api, &b.name, "PeerUnreachable"));

        // 8. Node 3 comes back: PeerRecovered.
        agents[2] = cluster.spawn_agent(c, &scratch, "2");
        wait_until(Duration::from_secs(30), format!("a PeerRecovered Event on {}", c.name), || has_event(api, &c.name, "PeerRecovered"));
        wait_until(CONVERGE, "node 3 up again on node 1", || peer(&metrics(&a.ns), "kwire_peer_up", &c.name) == Some(1.0));
        drop(pinger);

        for ag in agents.iter_mut() {
            assert!(ag.is_running(), "{} died:\n{}", ag.name(), ag.log());
        }
        // JSON logs: one object per line, the state changes among them.
        let log = agents[0].log();
        assert!(log.lines().filter(|l| !l.trim().is_empty()).all(|l| serde_json::from_str::<Value>(l).is_ok()), "non-JSON log line:\n{log}");
        for want in ["peer added", "peer connected: first handshake", "peer unreachable", "peer recovered"] {
            assert!(log.contains(want), "missing log {want:?}:\n{log}");
        }
        if let Some(path) = std::env::var_os("KWIRE_WRITE_MESH_DOT") {
            std::fs::write(path, &dot).unwrap();
        }
    });
}
