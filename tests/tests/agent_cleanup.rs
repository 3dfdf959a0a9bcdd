//! `kwire agent --cleanup` removes what kwire puts on a node and nothing else: a node (network
//! namespace) with kwire's host tun, a pod's tun (recorded in `pods.json`), kwire's blackhole
//! routes (metric 4096) beside someone else's, the `inet kwire` nftables table beside another
//! table, the CNI plugin and configuration, the sockets and the state files. Needs root.

use kwire_tests::{require_agent, Netns, Scratch};

/// The state directory's files (besides `pods.json`, written with content) that cleanup removes.
const STATE_FILES: [&str; 7] = [
    "private.key",
    "peers.json",
    "policy-state.bin",
    "policy-state.json",
    "service-state.bin",
    "flow-state.bin",
    "ipam.json",
];

#[test]
fn cleanup_removes_kwires_things_and_leaves_the_rest() {
    let kwire = require_agent!();
    let scratch = Scratch::new("cleanup");
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let (state, run, uapi, bin, conf) = (
        scratch.file("state"),
        scratch.file("run"),
        scratch.file("wg"),
        scratch.file("cni-bin"),
        scratch.file("net.d"),
    );
    for d in [&state, &run, &uapi, &bin, &conf] {
        std::fs::create_dir_all(d).unwrap();
    }
    let tun = node.ifname("kw");
    node.run(&["ip", "tuntap", "add", "mode", "tun", "name", &tun]);
    node.run(&["ip", "link", "set", &tun, "up"]);
    node.run(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/24",
        "dev",
        &tun,
        "metric",
        "100",
    ]);
    node.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        "10.244.1.0/24",
        "metric",
        "4096",
        "proto",
        "107",
    ]);
    node.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "blackhole",
        "fd00:10:244:1::/64",
        "metric",
        "4096",
        "proto",
        "107",
    ]);
    // Someone else's, even with kwire's metric: only routing protocol 107 marks kwire's.
    node.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        "198.51.100.0/24",
        "metric",
        "4096",
    ]);
    node.run(&["nft", "add", "table", "inet", "kwire"]);
    node.run(&["nft", "add", "table", "inet", "other"]);
    pod.run(&["ip", "tuntap", "add", "mode", "tun", "name", "eth0"]);
    let pods = serde_json::json!([{"containerID": "c1", "ifname": "eth0", "netns": format!("/var/run/netns/{}", pod.name()),
        "ips": ["10.244.0.2"], "tun_name": "eth0", "mtu": 1420}]);
    std::fs::write(state.join("pods.json"), pods.to_string()).unwrap();
    for f in STATE_FILES {
        std::fs::write(state.join(f), b"x").unwrap();
    }
    std::fs::write(run.join("cni.sock"), b"").unwrap();
    std::fs::write(uapi.join(format!("{tun}.sock")), b"").unwrap();
    std::fs::write(bin.join("kwire"), b"plugin").unwrap();
    std::fs::write(bin.join("portmap"), b"someone else's").unwrap();
    std::fs::write(conf.join("10-kwire.conflist"), b"{}").unwrap();

    let d = |p: &std::path::Path| p.display().to_string();
    let cleanup = || {
        node.exec(&[
            d(&kwire),
            "agent".into(),
            "--cleanup".into(),
            "--interface".into(),
            tun.clone(),
            "--state-dir".into(),
            d(&state),
            "--run-dir".into(),
            d(&run),
            "--uapi-dir".into(),
            d(&uapi),
            "--cni-bin-dir".into(),
            d(&bin),
            "--cni-conf-dir".into(),
            d(&conf),
        ])
    };
    let out = cleanup();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kwire cleanup: done"), "{text}");

    assert!(!node.has_link(&tun), "the host tun is gone");
    assert!(!pod.has_link("eth0"), "the pod's tun is gone");
    let v4 = node.run(&["ip", "route", "show", "type", "blackhole"]);
    assert!(
        !v4.contains("10.244.1.0/24") && v4.contains("198.51.100.0/24"),
        "{v4}"
    );
    assert!(!node
        .run(&["ip", "-6", "route", "show", "type", "blackhole"])
        .contains("fd00:10:244:1::/64"));
    let tables = node.run(&["nft", "list", "tables"]);
    assert!(
        !tables.contains("inet kwire") && tables.contains("inet other"),
        "{tables}"
    );
    assert!(!bin.join("kwire").exists() && bin.join("portmap").exists());
    assert!(!conf.join("10-kwire.conflist").exists());
    assert!(!uapi.join(format!("{tun}.sock")).exists() && !run.join("cni.sock").exists());
    for f in STATE_FILES.iter().chain(&["pods.json"]) {
        assert!(!state.join(f).exists(), "{f} left");
    }
    // Again: nothing to do, still success.
    let again = cleanup();
    assert!(again.status.success(), "{again:?}");
}
