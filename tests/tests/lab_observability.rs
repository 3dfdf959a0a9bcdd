//! Observability in a `kwire-lab` with the real agent: every node's `kwire status --json`
//! agrees with its `/metrics` (peers, pods), `promtool check metrics` accepts each node's
//! exposition, and `kwire-lab graph` draws the whole mesh (DOT that `dot -Tsvg` renders).
//! Set KWIRE_WRITE_MESH_SVG=PATH to keep the SVG (docs/mesh.svg is made this way). Needs root;
//! skips with a message when the kwire binary has no `status` subcommand.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use kwire_tests::lab::{parse_json, Json, JsonExt, Lab};
use kwire_tests::{require_root, try_wait_until};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn pipe(cmd: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn lab_status_metrics_and_graph() {
    require_root!();
    let Some(kwire) = kwire_tests::lab::kwire_with("status") else {
        kwire_tests::skip(
            module_path!(),
            "`kwire status --help` fails (cargo build -p kwire-daemon)",
        );
        return;
    };
    let lab = Lab::up(
        3,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            "45",
            "--pods",
            "1",
        ],
    );
    let st = lab.status();
    let nodes: Vec<Json> = st["nodes"].array().to_vec();
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        let name = n["name"].as_str().unwrap().to_string();
        let run_dir = PathBuf::from(n["run_dir"].as_str().unwrap());
        // The status socket is a path: reachable from the host namespace too.
        let mut report = None;
        let ok = try_wait_until(Duration::from_secs(30), || {
            let out = Command::new(&kwire)
                .args(["status", "--json", "--run-dir", run_dir.to_str().unwrap()])
                .output()
                .unwrap();
            if !out.status.success() {
                return false;
            }
            let v =
                parse_json(&String::from_utf8_lossy(&out.stdout)).expect("status --json is JSON");
            let done = v["peers_connected"].as_u64() == Some(2) && !v["pods"].array().is_empty();
            report = Some(v);
            done
        });
        let report = report.unwrap_or_else(|| panic!("no status from {name}"));
        assert!(
            ok,
            "{name}: not every peer up or no pod attached: {report:?}"
        );
        assert_eq!(report["node"].as_str(), Some(name.as_str()));
        let out = lab.exec(
            &name,
            &[
                "curl",
                "-s",
                "-f",
                "-m",
                "2",
                "http://127.0.0.1:9742/metrics",
            ],
        );
        assert!(out.status.success(), "GET /metrics on {name}");
        let m = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            sample(&m, "kwire_peers_expected"),
            report["peers_expected"].as_u64().map(|v| v as f64),
            "{name}"
        );
        assert_eq!(sample(&m, "kwire_peers_connected"), Some(2.0), "{name}");
        let pods = report["pods"].array();
        assert_eq!(sample(&m, "kwire_pods"), Some(pods.len() as f64), "{name}");
        let pod = &pods[0];
        assert!(
            pod["name"].as_str().is_some() && pod["namespace"].as_str() == Some("default"),
            "pod names come from the CNI records: {pod:?}"
        );
        if have("promtool") {
            let out = pipe(&["promtool", "check", "metrics"], &m);
            assert!(
                out.status.success(),
                "promtool on {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            kwire_tests::skip(
                "promtool check",
                "promtool not installed (apt install prometheus)",
            );
        }
    }

    let dot = lab.cmd_ok("graph", &["--kwire", kwire.to_str().unwrap()]);
    for n in &nodes {
        assert!(
            dot.contains(&format!("\"{}\" [label=", n["name"].as_str().unwrap())),
            "{dot}"
        );
    }
    assert_eq!(
        dot.matches(" -> ").count(),
        6,
        "one edge per node and peer:\n{dot}"
    );
    if have("dot")
        || Command::new("dot")
            .arg("-V")
            .stderr(Stdio::null())
            .status()
            .is_ok()
    {
        let out = pipe(&["dot", "-Tsvg"], &dot);
        assert!(
            out.status.success(),
            "dot -Tsvg: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let svg = lab.cmd_ok(
            "graph",
            &["--kwire", kwire.to_str().unwrap(), "--format", "svg"],
        );
        assert!(svg.contains("<svg"));
        if let Some(p) = std::env::var_os("KWIRE_WRITE_MESH_SVG") {
            std::fs::write(p, svg).unwrap();
        }
    } else {
        kwire_tests::skip("dot -Tsvg", "graphviz not installed (apt install graphviz)");
    }
}
