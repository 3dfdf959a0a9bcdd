//! `kwire-lab` with a stand-in agent (`--agent-cmd`): topology, API and Node registration,
//! status, exec, the supervisor's restarts, add/remove node, `down` after a crash, and two labs
//! side by side. Needs root; no kwire agent needed. Each test uses its own lab name.

use std::path::Path;
use std::time::Duration;

use kwire_tests::lab::{kwire_lab, parse_json, Json, JsonExt, Lab};
use kwire_tests::{require_root, run_host, wait_until};

/// The stand-in agent: records what it was given, then sleeps (exec: the pid is the agent's).
const FAKE_AGENT: &str = "echo \"$KWIRE_LAB_NODE $KWIRE_LAB_INTERFACE $KWIRE_LAB_KUBECONFIG\" \
     > \"$KWIRE_LAB_RUN_DIR/fake-agent\"; exec sleep 100000";

fn up_fake(nodes: u32) -> Lab {
    Lab::up(nodes, &["--agent-cmd", FAKE_AGENT])
}

fn netns_list() -> Vec<String> {
    run_host(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn node<'a>(status: &'a Json, name: &str) -> &'a Json {
    status["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no node {name} in status"))
}

fn agent_pid(lab: &Lab, node_name: &str) -> Option<u64> {
    node(&lab.status(), node_name)["agent_pid"].as_u64()
}

/// GET on the lab's API as its admin (HTTPS with the lab's CA, the admin token).
fn curl(lab: &Lab, url: &str) -> String {
    run_host(&curl_args(lab, url))
}

fn curl_args(lab: &Lab, url: &str) -> Vec<String> {
    lab.api_curl_args("GET", url)
}

#[test]
fn up_builds_namespaces_bridge_api_nodes_and_status() {
    require_root!();
    let lab = up_fake(3);
    let name = lab.name().to_string();
    let ul = format!("{name}-ul");
    let namespaces = netns_list();
    for ns in [
        ul.clone(),
        format!("{name}-n1"),
        format!("{name}-n2"),
        format!("{name}-n3"),
    ] {
        assert!(
            namespaces.contains(&ns),
            "namespace {ns} missing: {namespaces:?}"
        );
    }
    // Three ports on the underlay bridge.
    let status = lab.status();
    let ports = run_host(&["ip", "-n", &ul, "-o", "link", "show", "type", "veth"]);
    assert_eq!(ports.lines().count(), 3, "{ports}");

    // The API: Nodes registered with InternalIPs, dual-stack podCIDRs assigned by the stand-in.
    let api = status["api_url"].as_str().expect("api_url").to_string();
    let nodes = parse_json(&curl(&lab, &format!("{api}/api/v1/nodes"))).unwrap();
    let items = nodes["items"].array();
    assert_eq!(items.len(), 3);
    let mut all_cidrs = Vec::new();
    for item in items {
        let cidrs = item["spec"]["podCIDRs"].strings();
        assert_eq!(cidrs.len(), 2, "{item:?}");
        assert!(
            cidrs[0].starts_with("10.244.") && cidrs[0].ends_with("/24"),
            "{cidrs:?}"
        );
        assert!(
            cidrs[1].starts_with("fd00:10:244:") && cidrs[1].ends_with("/64"),
            "{cidrs:?}"
        );
        let addrs = item["status"]["addresses"].array();
        let internal: Vec<&str> = addrs
            .iter()
            .filter(|a| a["type"].as_str() == Some("InternalIP"))
            .filter_map(|a| a["address"].as_str())
            .collect();
        assert_eq!(internal.len(), 2, "v4 and v6 InternalIP: {addrs:?}");
        all_cidrs.extend(cidrs);
    }
    let mut unique = all_cidrs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        all_cidrs.len(),
        "podCIDRs overlap: {all_cidrs:?}"
    );

    // status --json: the promised fields per node.
    for (i, n) in status["nodes"].array().iter().enumerate() {
        for field in [
            "name",
            "netns",
            "underlay_ip",
            "pod_cidrs",
            "gateway_ips",
            "metrics_url",
            "state_dir",
            "peers",
        ] {
            assert!(n.has(field), "node {i} lacks {field}: {n:?}");
        }
        assert_eq!(
            n["underlay_ip"].as_str(),
            Some(format!("192.0.2.{}", i + 1).as_str())
        );
        assert_eq!(n["pod_cidrs"].strings().len(), 2);
        let gw = n["gateway_ips"].strings();
        assert!(gw[0].ends_with(".1") && gw[1].ends_with("::1"), "{gw:?}");
        assert!(Path::new(n["state_dir"].as_str().unwrap()).is_dir());
        // Without a real agent: the other two nodes, no handshake.
        let peers = n["peers"].array();
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert!(peers
            .iter()
            .all(|p| p["handshake"].as_bool() == Some(false)));
    }
    let human = lab.cmd_ok("status", &[]);
    assert!(
        human.contains(&format!("{name}-n3")) && human.contains("0/6 handshakes"),
        "{human}"
    );

    // The fake agent ran in its namespace with the lab's settings.
    let n1 = node(&status, &format!("{name}-n1"));
    let out = lab.exec(
        "n1",
        &[
            "cat",
            &format!("{}/fake-agent", n1["run_dir"].as_str().unwrap()),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{name}-n1")) && text.contains("kubeconfig-agents"),
        "{text}"
    );
    assert!(n1["agent_pid"].as_u64().is_some());

    // exec: runs in the node's namespace, exit code passed through.
    let out = lab.exec("2", &["ip", "-o", "addr", "show"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("192.0.2.2/24"));
    assert_eq!(
        lab.exec(&format!("{name}-n2"), &["sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );
    let bad = lab.exec("n9", &["true"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("has no node"),
        "{bad:?}"
    );

    // Underlay: nodes reach each other and the API on the bridge (v4 and v6).
    assert!(lab
        .exec("n1", &["ping", "-c1", "-W2", "192.0.2.3"])
        .status
        .success());
    let v6_n3 = node(&status, &format!("{name}-n3"))["underlay_ipv6"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(lab
        .exec("n1", &["ping", "-c1", "-W2", &v6_n3])
        .status
        .success());
    let in_node = curl_args(&lab, "https://192.0.2.254:6443/api/v1/nodes");
    let in_node: Vec<&str> = in_node.iter().map(String::as_str).collect();
    let out = lab.exec("n3", &in_node);
    assert!(out.status.success(), "API from a node namespace: {out:?}");
    // A node's kubeconfig carries its agent's token.
    let node_cfg = lab.cmd_ok("kubeconfig", &["--node", "n3"]);
    let node_cfg = std::fs::read_to_string(node_cfg.trim()).unwrap();
    assert!(
        node_cfg.contains("token: ") && node_cfg.contains("https://127.0.0.1:"),
        "{node_cfg}"
    );
    assert!(!lab.cmd("kubeconfig", &["--node", "n9"]).status.success());
    let host_cfg = lab.cmd_ok("kubeconfig", &[]);
    assert!(std::fs::read_to_string(host_cfg.trim())
        .unwrap()
        .contains(&api));

    // A second `up` of the same lab is refused with a hint.
    let again = lab.cmd("up", &["--agent-cmd", FAKE_AGENT]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already up"),
        "{again:?}"
    );
}

#[test]
fn supervisor_restarts_an_agent_that_exits() {
    require_root!();
    let lab = up_fake(2);
    let n1 = format!("{}-n1", lab.name());
    let first = agent_pid(&lab, &n1).expect("agent pid");
    run_host(&["kill", "-9", &first.to_string()]);
    wait_until(
        Duration::from_secs(15),
        "the agent restarted with a new pid",
        || agent_pid(&lab, &n1).is_some_and(|p| p != first),
    );
    let st = lab.status();
    assert_eq!(node(&st, &n1)["agent_restarts"].as_u64(), Some(1));
    assert!(!Path::new(&format!("/proc/{first}")).exists());
    let log = std::fs::read_to_string(lab.dir().join("supervisor.log")).unwrap();
    assert!(log.contains("agent exited; restarting"), "{log}");
    // The other agent was left alone.
    assert_eq!(
        node(&st, &format!("{}-n2", lab.name()))["agent_restarts"].as_u64(),
        Some(0)
    );
}

#[test]
fn down_after_kill_9_of_the_supervisor_removes_everything() {
    require_root!();
    let lab = up_fake(2);
    let name = lab.name().to_string();
    let st = lab.status();
    let sup = st["supervisor_pid"].as_u64().unwrap();
    let agents: Vec<u64> = st["nodes"]
        .array()
        .iter()
        .filter_map(|n| n["agent_pid"].as_u64())
        .collect();
    assert_eq!(agents.len(), 2);
    // A UAPI socket as an agent would leave it (in the node's /var/run/wireguard).
    let sock = node(&st, &format!("{name}-n1"))["uapi_socket"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::create_dir_all(Path::new(&sock).parent().unwrap()).unwrap();
    std::fs::write(&sock, b"").unwrap();

    run_host(&["kill", "-9", &sup.to_string()]);
    wait_until(Duration::from_secs(5), "supervisor gone", || {
        !Path::new(&format!("/proc/{sup}")).exists()
    });
    // Also lose the description, as after a crash mid-write.
    std::fs::remove_file(lab.dir().join("lab.json")).unwrap();
    let human = kwire_lab(&["status", "--name", &name]);
    assert!(!human.status.success());
    assert!(
        String::from_utf8_lossy(&human.stderr).contains("kwire-lab up"),
        "{human:?}"
    );

    let out = lab.cmd_ok("down", &[]);
    assert!(out.contains("is down"), "{out}");
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{name}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!lab.dir().exists());
    assert!(!Path::new(&sock).exists());
    for pid in agents {
        wait_until(Duration::from_secs(5), format!("agent {pid} gone"), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
        });
    }
    // Idempotent.
    assert!(lab.cmd_ok("down", &[]).contains("nothing to remove"));
    lab.forget();
}

#[test]
fn up_refuses_leftovers_of_a_crashed_run() {
    require_root!();
    let lab = Lab::named();
    let ns = format!("{}-n2", lab.name());
    run_host(&["ip", "netns", "add", &ns]);
    let out = lab.cmd("up", &["--agent-cmd", FAKE_AGENT]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("namespace {ns} exists")) && err.contains("kwire-lab down --name"),
        "{err}"
    );
    lab.cmd_ok("down", &[]);
    assert!(!netns_list().contains(&ns));
}

#[test]
fn two_labs_coexist() {
    require_root!();
    let a = up_fake(2);
    let b = up_fake(2);
    let (sa, sb) = (a.status(), b.status());
    assert_ne!(sa["api_url"], sb["api_url"]);
    // Each node has its own /var/run/wireguard (and every other hostPath but the shared ones).
    let sock = |st: &Json, lab: &Lab| {
        node(st, &format!("{}-n1", lab.name()))["uapi_socket"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(
        sock(&sa, &a),
        sock(&sb, &b),
        "UAPI sockets must differ across labs"
    );
    // Same underlay addresses, separate namespaces: each lab's nodes reach only their own API.
    assert!(a
        .exec("n1", &["ping", "-c1", "-W2", "192.0.2.2"])
        .status
        .success());
    assert!(b
        .exec("n1", &["ping", "-c1", "-W2", "192.0.2.2"])
        .status
        .success());
    let in_node = curl_args(&a, "https://192.0.2.254:6443/api/v1/nodes");
    let in_node: Vec<&str> = in_node.iter().map(String::as_str).collect();
    let a_nodes = parse_json(&String::from_utf8_lossy(&a.exec("n1", &in_node).stdout)).unwrap();
    let names: Vec<String> = a_nodes["items"]
        .array()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    assert!(names.iter().all(|n| n.starts_with(a.name())), "{names:?}");
    // Taking one down leaves the other up.
    a.cmd_ok("down", &[]);
    assert!(!netns_list()
        .iter()
        .any(|n| n.starts_with(&format!("{}-", a.name()))));
    let sb2 = b.status();
    assert_eq!(sb2["supervisor_running"].as_bool(), Some(true));
    assert!(b
        .exec("n2", &["ping", "-c1", "-W2", "192.0.2.1"])
        .status
        .success());
    a.forget();
}

#[test]
fn add_node_and_remove_node() {
    require_root!();
    let lab = up_fake(2);
    let name = lab.name().to_string();
    let out = lab.cmd_ok("add-node", &[]);
    assert!(out.contains(&format!("{name}-n3")), "{out}");
    let st = lab.status();
    let n3 = node(&st, &format!("{name}-n3"));
    assert_eq!(n3["pod_cidrs"].strings().len(), 2);
    assert!(n3["agent_pid"].as_u64().is_some());
    assert!(lab
        .exec("n3", &["ping", "-c1", "-W2", "192.0.2.1"])
        .status
        .success());

    lab.cmd_ok("remove-node", &["n1"]);
    let st = lab.status();
    assert_eq!(st["nodes"].array().len(), 2);
    assert!(!netns_list().contains(&format!("{name}-n1")));
    let api = st["api_url"].as_str().unwrap().to_string();
    let nodes = parse_json(&curl(&lab, &format!("{api}/api/v1/nodes"))).unwrap();
    assert_eq!(nodes["items"].array().len(), 2);
}
