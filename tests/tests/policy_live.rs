//! The upstream NetworkPolicy e2e cases on a live 2-node kwire-lab cluster: the real
//! `kwire agent` enforcing policy in its packet loop, the real `kwire-cni`, and the truth
//! tables of the offline check (`policy_cases`), probed with `kwire-lab matrix` over TCP and
//! UDP. Per case: apply its policies, poll the matrix until the expected table holds (or
//! [`CHECK_DEADLINE`] passes), delete them, poll until everything is reachable again.
//!
//! Cases that change pod or namespace labels, use ipBlocks (written for the offline pod IPs)
//! or check SCTP (the lab's pods do not serve it) run offline only. Needs root; skips with a
//! message without it or without the `kwire agent`, `kwire-lab` and `kwire-cni` binaries.

mod policy_cases;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kwire::policy::matrix::{Reachability, TruthTable};
use kwire::policy::Protocol;
use kwire_tests::lab::Lab;
use kwire_tests::{require_root, Scratch};
use policy_cases::{cases, fixture, pods, Case, NAMESPACES, NS, PODS};

/// How long a check may take to hold after its policies were applied: the agents compile a
/// change within 100 ms of the watch event; a blocked probe takes 0.5 s.
const CHECK_DEADLINE: Duration = Duration::from_secs(5);
/// A table seen on a poll that started sooner than this after a change could be the old
/// policy's; it counts only from then on (a few of the agents' 100 ms rebuild delays).
const SETTLE: Duration = Duration::from_millis(300);
/// Pods running after `apply` (namespaces, CNI ADD, servers).
const PODS_READY: Duration = Duration::from_secs(30);
/// The agents serve their CNI sockets this long after `up` at the latest.
const CNI_SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Policy files whose ipBlocks name the offline fixture's pod IPs (10.0.x.y).
const IP_BLOCK_FILES: [&str; 5] = [
    "e2e/egress-cidr.yaml",
    "e2e/egress-cidr-except.yaml",
    "e2e/egress-cidr-except-updated.yaml",
    "e2e/egress-cidr-except-second-policy.yaml",
    "e2e/egress-ipblock-external.yaml",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `kwire`, `kwire-lab` and `kwire-cni`, or why not.
fn binaries() -> Result<PathBuf, String> {
    let kwire = std::env::var_os("KWIRE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/kwire"));
    let agent = Command::new(&kwire)
        .args(["agent", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !agent {
        return Err(format!(
            "`{} agent --help` fails (cargo build -p kwire-daemon)",
            kwire.display()
        ));
    }
    let cni = kwire.with_file_name("kwire-cni");
    if !cni.is_file() && std::env::var_os("KWIRE_CNI_BIN").is_none() {
        return Err(format!("no {} (cargo build -p kwire-cni)", cni.display()));
    }
    if std::env::var_os("KWIRE_LAB_BIN").is_none() {
        // The Lab guard looks next to its own crate; this test uses the workspace's newest.
        let newest = ["debug", "release"]
            .iter()
            .map(|p| workspace().join("target").join(p).join("kwire-lab"))
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .max();
        match newest {
            Some((_, p)) => std::env::set_var("KWIRE_LAB_BIN", p),
            None => return Err("no kwire-lab binary (cargo build -p kwire-lab)".into()),
        }
    }
    Ok(kwire)
}

/// Namespaces x, y, z and pods a, b, c in each, alternating between `nodes`, as JSON
/// documents (a manifest `kwire-lab apply -f` reads).
fn cluster_manifest(nodes: &[String]) -> String {
    let mut docs = Vec::new();
    for ns in NAMESPACES {
        docs.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns}},
        }));
    }
    let ports: Vec<serde_json::Value> = [80, 81]
        .iter()
        .flat_map(|port| {
            ["TCP", "UDP"].iter().map(move |proto| {
                serde_json::json!({
                    "name": format!("serve-{port}-{}", proto.to_lowercase()),
                    "containerPort": port, "protocol": proto,
                })
            })
        })
        .collect();
    for (i, pod) in pods().iter().enumerate() {
        let (ns, name) = pod.split_once('/').expect("ns/name");
        docs.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {
                "nodeName": nodes[i % nodes.len()],
                "containers": [{"name": format!("cont-{name}"), "image": "kwire-lab/pod-serve", "ports": ports}],
            },
        }));
    }
    docs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = lab.cmd_ok("status", &["--json"]);
    serde_json::from_str(&out).expect("status --json is JSON")
}

/// `kwire-lab matrix --port PORT/PROTO --json` over the nine pods, as a truth table.
fn matrix(lab: &Lab, port: u16, protocol: Protocol) -> TruthTable {
    let names = pods();
    let port = format!("{port}/{protocol}");
    let mut args = vec!["--port", &port, "--json"];
    args.extend(names.iter().map(String::as_str));
    let out = lab.cmd_ok("matrix", &args);
    let v: serde_json::Value = serde_json::from_str(&out).expect("matrix --json is JSON");
    let order: Vec<&str> = v["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| p.as_str().expect("pod name"))
        .collect();
    TruthTable::from_fn(names.clone(), names.clone(), |f, t| {
        let fi = order.iter().position(|p| *p == f).expect("from in matrix");
        let ti = order.iter().position(|p| *p == t).expect("to in matrix");
        v["reachable"][fi][ti].as_bool().unwrap_or(true) // loopback: not probed
    })
}

/// Polls the matrix until it agrees with `expected` (loopback ignored) on a poll started at
/// least [`SETTLE`] after `changed`, or [`CHECK_DEADLINE`] passes: Ok, or the last table.
fn wait_table(
    lab: &Lab,
    port: u16,
    protocol: Protocol,
    expected: &TruthTable,
    changed: Instant,
) -> Result<Duration, TruthTable> {
    loop {
        let polled = Instant::now();
        let actual = matrix(lab, port, protocol);
        let (_, wrong) = expected.compare(&actual, true);
        if wrong == 0 && polled.duration_since(changed) >= SETTLE {
            return Ok(changed.elapsed());
        }
        if changed.elapsed() > CHECK_DEADLINE {
            return Err(actual);
        }
        if wrong == 0 {
            std::thread::sleep(SETTLE.saturating_sub(polled.duration_since(changed)));
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether a case can run live, and its checks over TCP and UDP.
fn live(case: &Case) -> bool {
    case.steps.iter().all(|s| {
        s.files.len() >= 2
            && s.files[..2] == [NS, PODS]
            && s.files[2..].iter().all(|f| !IP_BLOCK_FILES.contains(f))
    }) && case
        .steps
        .iter()
        .flat_map(|s| &s.checks)
        .any(|c| c.protocol != Protocol::Sctp)
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

fn protocol_index(p: Protocol) -> usize {
    usize::from(p == Protocol::Udp)
}

#[test]
fn upstream_cases_on_a_live_lab() {
    require_root!();
    let kwire = match binaries() {
        Ok(b) => b,
        Err(why) => {
            kwire_tests::skip(module_path!(), &why);
            return;
        }
    };
    let started = Instant::now();
    let kwire_arg = kwire.display().to_string();
    let lab = Lab::up(2, &["--kwire", &kwire_arg, "--timeout", "40"]);
    let served = kwire_tests::try_wait_until(CNI_SOCKET_WAIT, || {
        status(&lab)["nodes"].as_array().is_some_and(|n| {
            !n.is_empty()
                && n.iter().all(|n| {
                    n["cni_socket"]
                        .as_str()
                        .is_some_and(|p| Path::new(p).exists())
                })
        })
    });
    assert!(
        served,
        "the agents serve no CNI socket at <run-dir>/cni.sock"
    );
    let nodes: Vec<String> = status(&lab)["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().expect("node name").to_string())
        .collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    let scratch = Scratch::new("policy-live");
    let manifest = scratch.file("cluster.json");
    std::fs::write(&manifest, cluster_manifest(&nodes)).expect("writing the cluster manifest");
    lab.cmd_ok("apply", &["-f", manifest.to_str().expect("utf-8 path")]);
    let names = pods();
    let running = kwire_tests::try_wait_until(PODS_READY, || {
        let st = status(&lab);
        let empty = vec![];
        let pods = st["pods"].as_array().unwrap_or(&empty);
        names.iter().all(|want| {
            pods.iter().any(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == *want
                    && p["phase"] == "Running"
                    && p["netns"].is_string()
            })
        })
    });
    assert!(
        running,
        "the 9 pods did not run within {PODS_READY:?}: {}",
        status(&lab)["pods"]
    );
    eprintln!(
        "lab {} up with 9 pods on {nodes:?} after {:.1?}",
        lab.name(),
        started.elapsed()
    );

    let all_open = Reachability::new(&names, true).expected;
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in [80, 81] {
            if let Err(actual) =
                wait_table(&lab, port, protocol, &all_open, Instant::now() - SETTLE)
            {
                panic!("without policies {port}/{protocol} is not all-reachable:\n{actual}");
            }
        }
    }

    let policy = |f: &str| fixture(f).display().to_string();
    let mut tally = [Tally::default(), Tally::default()];
    let mut cases_run = 0;
    let mut cases_failed = Vec::new();
    let mut skipped = 0;
    for case in cases() {
        if !live(&case) {
            skipped += 1;
            continue;
        }
        cases_run += 1;
        let case_started = Instant::now();
        let mut applied: Vec<&str> = Vec::new();
        let mut probed = BTreeSet::new();
        let mut report = Vec::new();
        let mut ok = true;
        for (si, step) in case.steps.iter().enumerate() {
            let files = &step.files[2..];
            for gone in applied.iter().filter(|f| !files.contains(f)) {
                lab.cmd_ok("delete", &["--ignore-not-found", "-f", &policy(gone)]);
            }
            for f in files {
                lab.cmd_ok("apply", &["-f", &policy(f)]);
            }
            let changed = Instant::now();
            applied = files.to_vec();
            for check in step.checks.iter().filter(|c| c.protocol != Protocol::Sctp) {
                probed.insert((check.port, protocol_index(check.protocol)));
                let mut expected = Reachability::new(&names, true);
                (check.expect)(&mut expected);
                let what = format!("step {} {}/{}", si + 1, check.port, check.protocol);
                match wait_table(
                    &lab,
                    check.port,
                    check.protocol,
                    &expected.expected,
                    changed,
                ) {
                    Ok(took) => {
                        tally[protocol_index(check.protocol)].passed += 1;
                        report.push(format!("{what} ok ({took:.1?})"));
                    }
                    Err(actual) => {
                        ok = false;
                        tally[protocol_index(check.protocol)].failed += 1;
                        let (cmp, wrong) = expected.expected.compare(&actual, true);
                        report.push(format!(
                            "{what} FAILED ({wrong} cells wrong after {CHECK_DEADLINE:?}):\nexpected:\n{}\nactual:\n{}\ncomparison:\n{}",
                            expected.expected.pretty_print("  "),
                            actual.pretty_print("  "),
                            cmp.pretty_print("  ")
                        ));
                    }
                }
            }
        }
        for f in &applied {
            lab.cmd_ok("delete", &["--ignore-not-found", "-f", &policy(f)]);
        }
        let changed = Instant::now();
        for (port, p) in &probed {
            let protocol = [Protocol::Tcp, Protocol::Udp][*p];
            if let Err(actual) = wait_table(&lab, *port, protocol, &all_open, changed) {
                ok = false;
                report.push(format!(
                    "after deleting the policies {port}/{protocol} is not all-reachable:\n{}",
                    actual.pretty_print("  ")
                ));
            }
        }
        eprintln!(
            "{} {} ({:.1?}): {}",
            if ok { "PASS" } else { "FAIL" },
            case.name,
            case_started.elapsed(),
            report.join("; ")
        );
        if !ok {
            cases_failed.push(case.name);
        }
    }
    eprintln!(
        "{cases_run} cases live ({skipped} offline only), {} failed; TCP checks {} passed {} failed, UDP checks {} passed {} failed; {:.1?} in all",
        cases_failed.len(),
        tally[0].passed,
        tally[0].failed,
        tally[1].passed,
        tally[1].failed,
        started.elapsed()
    );
    assert!(cases_failed.is_empty(), "failed live: {cases_failed:#?}");
    assert!(cases_run >= 25, "only {cases_run} cases ran live");
}
