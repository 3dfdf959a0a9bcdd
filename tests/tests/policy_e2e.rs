//! The upstream Kubernetes NetworkPolicy e2e cases (test/e2e/network/netpol) as 9x9 truth tables, checked offline through the engine and through `kwire policy trace`.
//!
//! Topology (fixtures/policy/cluster): namespaces x, y, z (labels ns=<name>), pods a, b, c in
//! each (labels pod=<name>), serving 80 and 81 over TCP, UDP and SCTP on ports named
//! serve-<port>-<protocol>. Expectations are written the way upstream writes them
//! (`NewReachability`, `ExpectPeer`, `ExpectAllIngress`, ...); loopback is ignored as upstream
//! does.

mod policy_cases;

use std::path::PathBuf;

use kwire::policy::matrix::{Reachability, TruthTable};
use kwire::policy::trace::{self, Manifests, OutputFormat, TraceArgs};
use kwire::policy::Protocol;
use policy_cases::{cases, fixture, pod_ip, pods, NS, PODS};

fn trace_allows(files: &[PathBuf], from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let args = TraceArgs {
        filename: files.to_vec(),
        from: from.to_string(),
        to: to.to_string(),
        port: Some(format!("{port}/{protocol}")),
        source_port: trace::DEFAULT_SOURCE_PORT,
        output: OutputFormat::Json,
    };
    let mut out = Vec::new();
    let result = trace::run(&args, &mut out);
    let code = trace::exit_code(&result);
    assert!(result.is_ok(), "trace {from} -> {to}: {:?}", result.err());
    let v: serde_json::Value = serde_json::from_slice(&out).expect("trace JSON");
    let allowed = v["verdict"] == "allow";
    assert_eq!(
        code,
        if allowed { 0 } else { 1 },
        "exit code vs verdict for {from} -> {to}"
    );
    allowed
}

#[test]
fn upstream_truth_tables() {
    let pods = pods();
    let mut checks = 0;
    let mut failures = Vec::new();
    let all = cases();
    for case in &all {
        for (si, step) in case.steps.iter().enumerate() {
            let files: Vec<PathBuf> = step.files.iter().map(|f| fixture(f)).collect();
            let set = Manifests::load(&files)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name))
                .compile();
            for check in &step.checks {
                checks += 1;
                let mut expected = Reachability::new(&pods, true);
                (check.expect)(&mut expected);
                let engine = TruthTable::from_fn(pods.clone(), pods.clone(), |f, t| {
                    set.verdict(pod_ip(f), pod_ip(t), check.protocol, check.port)
                        .is_allowed()
                });
                let traced = TruthTable::from_fn(pods.clone(), pods.clone(), |f, t| {
                    trace_allows(&files, f, t, check.port, check.protocol)
                });
                let (_, engine_wrong) = expected.expected.compare(&engine, true);
                let (cmp, trace_vs_engine) = engine.compare(&traced, false);
                if engine_wrong > 0 || trace_vs_engine > 0 {
                    failures.push(format!(
                        "{} (step {}, {}/{}):\nexpected:\n{}\nengine:\n{}\ntrace vs engine:\n{}",
                        case.name,
                        si + 1,
                        check.port,
                        check.protocol,
                        expected.expected.pretty_print("  "),
                        engine.pretty_print("  "),
                        cmp.pretty_print("  ")
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        all.len() >= 25 && checks >= 25,
        "{} cases, {checks} checks",
        all.len()
    );
    eprintln!(
        "{} upstream cases, {checks} truth tables of 81 cells, engine and trace agree",
        all.len()
    );
}

#[test]
fn trace_explains_the_deciding_rule() {
    let files: Vec<PathBuf> = [NS, PODS, "e2e/podselector-or-namespaceselector.yaml"]
        .iter()
        .map(|f| fixture(f))
        .collect();
    let args = TraceArgs {
        filename: files,
        from: "y/c".into(),
        to: "x/a".into(),
        port: Some("80".into()),
        source_port: trace::DEFAULT_SOURCE_PORT,
        output: OutputFormat::Json,
    };
    let mut out = Vec::new();
    let outcome = trace::run(&args, &mut out).unwrap();
    assert!(outcome.allowed());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["verdict"], "allow");
    assert_eq!(
        v["ingress"]["selected_by"],
        serde_json::json!(["x/allow-ns-y-match-selector"])
    );
    assert_eq!(
        v["ingress"]["decided_by"]["policy"],
        "x/allow-ns-y-match-selector"
    );
    assert_eq!(v["ingress"]["decided_by"]["rule"], 0);
    assert_eq!(v["ingress"]["decided_by"]["peer"], 0);
    assert_eq!(v["egress"]["reason"], "not-selected");

    let args = TraceArgs {
        from: "x/c".into(),
        output: OutputFormat::Text,
        ..args
    };
    let mut out = Vec::new();
    let result = trace::run(&args, &mut out);
    assert_eq!(trace::exit_code(&result), 1);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("DENIED") && text.contains("selected by x/allow-ns-y-match-selector"),
        "{text}"
    );
}

#[test]
fn trace_errors_exit_2() {
    let args = TraceArgs {
        filename: vec![fixture(NS), fixture(PODS)],
        from: "x/nope".into(),
        to: "x/a".into(),
        port: Some("80".into()),
        source_port: trace::DEFAULT_SOURCE_PORT,
        output: OutputFormat::Json,
    };
    let result = trace::run(&args, &mut Vec::new());
    assert_eq!(trace::exit_code(&result), 2);
    assert!(result.unwrap_err().to_string().contains("x/nope"));
}
