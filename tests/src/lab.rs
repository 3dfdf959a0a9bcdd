//! Driving `kwire-lab` from tests: a [`Lab`] guard (unique `--name`, `down` on drop) and
//! `kwire-lab status --json` as a `serde_json::Value`.

/// tcpdump on the underlay bridge; the packets as `tcpdump -r -nn` lines.
pub struct BridgeCapture {
    proc: crate::Proc,
    pcap: std::path::PathBuf,
}

impl BridgeCapture {
    pub fn start(lab: &Lab, scratch: &crate::Scratch, tag: &str, filter: &str) -> BridgeCapture {
        crate::require_tool("tcpdump");
        let st = lab.status();
        let bridge = st["bridge"].as_str().expect("bridge").to_string();
        let pcap = scratch.file(&format!("{tag}.pcap"));
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            st["underlay_netns"].as_str().expect("underlay_netns"),
            "tcpdump",
            "--immediate-mode",
            "-i",
            &bridge,
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "256",
            "-w",
        ])
        .arg(&pcap)
        .arg(filter);
        let mut proc = crate::Proc::spawn(cmd, "tcpdump", scratch.file(&format!("{tag}.log")))
            .with_stop_signal(nix::sys::signal::Signal::SIGINT);
        crate::wait_until(
            std::time::Duration::from_secs(10),
            "tcpdump listening on the bridge",
            || {
                assert!(proc.is_running(), "tcpdump exited: {}", proc.log());
                proc.log().contains("listening on")
            },
        );
        BridgeCapture { proc, pcap }
    }

    pub fn stop(mut self) -> Vec<String> {
        self.proc.stop();
        let text = crate::run_host(&["tcpdump", "-r", self.pcap.to_str().unwrap(), "-nn"]);
        text.lines().map(str::to_string).collect()
    }
}

/// What a capture of the underlay ([`BridgeCapture::stop`]'s lines, the pcap's bytes) may
/// hold while pods talk: WireGuard (UDP port 51820), and ICMP port unreachable for it while
/// an agent is down; no pod address (10.244.x) in any header, and `marker` (the plaintext the
/// test's probes carry) in no captured byte.
pub fn assert_only_wireguard(lines: &[String], pcap: &[u8], marker: &[u8]) {
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && l.contains(".51820")))
        .filter(|l| !(l.contains(": ICMP ") && l.contains(" udp port 51820 unreachable")))
        .collect();
    assert!(
        other.is_empty(),
        "besides WireGuard on the underlay: {other:#?}"
    );
    let pods: Vec<&String> = lines.iter().filter(|l| l.contains("10.244.")).collect();
    assert!(pods.is_empty(), "pod addresses on the underlay: {pods:#?}");
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker),
        "the probe's plaintext was captured on the underlay"
    );
}

/// `kwire status --json` of a lab node's agent (`node`: an entry of `status --json`'s `nodes`).
pub fn agent_status(kwire: &Path, node: &Json) -> Option<Json> {
    let run_dir = node["run_dir"].as_str()?;
    let out = std::process::Command::new(kwire)
        .args(["status", "--json", "--run-dir", run_dir])
        .output()
        .ok()?;
    parse_json(&String::from_utf8_lossy(&out.stdout)).ok()
}

/// `kubectl --kubeconfig KUBECONFIG ARGS...`: (succeeded, stdout and stderr).
pub fn kubectl(kubeconfig: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The kwire binary (env KWIRE_BIN, else target/debug/kwire) if `kwire SUBCOMMAND --help`
/// works, i.e. this build has that subcommand; None otherwise (the caller skips).
pub fn kwire_with(subcommand: &str) -> Option<std::path::PathBuf> {
    let workspace = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    let bin = std::env::var_os("KWIRE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/debug/kwire"));
    let ok = std::process::Command::new(&bin)
        .args([subcommand, "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{pid_alive, pid_of_id, unique_id, ID_LEN};

/// First part of every lab name tests make: `kl<id>`, so stale labs can be swept.
pub const LAB_PREFIX: &str = "kl";
/// Where kwire-lab keeps each lab's state.
pub const LAB_STATE_ROOT: &str = "/run/kwire-lab";

/// Path of the `kwire-lab` binary: `$KWIRE_LAB_BIN`, else `<workspace>/target/debug/kwire-lab`
/// (or release, the newer). Panics saying how to build it.
pub fn kwire_lab_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KWIRE_LAB_BIN") {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace.join(t))
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = [
        target.join("debug/kwire-lab"),
        target.join("release/kwire-lab"),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no kwire-lab binary at {}: run `cargo build -p kwire-lab` first, or set KWIRE_LAB_BIN",
                candidates[0].display()
            )
        })
}

/// Runs `kwire-lab ARGS`.
pub fn kwire_lab(args: &[&str]) -> Output {
    Command::new(kwire_lab_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running kwire-lab")
}

/// Runs `kwire-lab ARGS`; its stdout, or a panic with its output.
pub fn kwire_lab_ok(args: &[&str]) -> String {
    let out = kwire_lab(args);
    assert!(
        out.status.success(),
        "`kwire-lab {}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes labs of earlier test processes that died without `down` (their name carries
/// the pid, as [`unique_id`] does).
pub fn sweep_stale_labs() {
    let Ok(dir) = std::fs::read_dir(LAB_STATE_ROOT) else {
        return;
    };
    for name in dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(id) = name.strip_prefix(LAB_PREFIX) else {
            continue;
        };
        if id.len() == ID_LEN && pid_of_id(id).is_some_and(|p| !pid_alive(p)) {
            let _ = kwire_lab(&["down", "--name", &name]);
        }
    }
}

/// A lab made by a test; `kwire-lab down` on drop (printing the supervisor log's tail when
/// the test failed).
pub struct Lab {
    name: String,
    down_on_drop: bool,
}

impl Lab {
    /// A fresh, unique lab name (not yet up).
    pub fn named() -> Lab {
        sweep_stale_labs();
        Lab {
            name: format!("{LAB_PREFIX}{}", unique_id()),
            down_on_drop: true,
        }
    }

    /// `kwire-lab up --name <unique> --nodes N EXTRA...`.
    pub fn up(nodes: u32, extra: &[&str]) -> Lab {
        let lab = Lab::named();
        let n = nodes.to_string();
        let mut args = vec!["up", "--name", &lab.name, "--nodes", &n];
        args.extend_from_slice(extra);
        lab.run_ok(&args);
        lab
    }

    /// `kwire-lab up` with the real agent `kwire` and `pods` pods per node.
    pub fn up_real(nodes: u32, pods: u32, kwire: &Path) -> Lab {
        let pods = pods.to_string();
        let kwire = kwire.to_str().expect("UTF-8 path");
        Lab::up(
            nodes,
            &["--kwire", kwire, "--pods", &pods, "--timeout", "90"],
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> PathBuf {
        Path::new(LAB_STATE_ROOT).join(&self.name)
    }

    /// `kwire-lab ARGS` (the caller passes `--name`).
    pub fn run_ok(&self, args: &[&str]) -> String {
        kwire_lab_ok(args)
    }

    /// `kwire-lab SUBCOMMAND --name NAME ARGS...`.
    pub fn cmd(&self, sub: &str, args: &[&str]) -> Output {
        let mut all = vec![sub, "--name", &self.name];
        all.extend_from_slice(args);
        kwire_lab(&all)
    }

    pub fn cmd_ok(&self, sub: &str, args: &[&str]) -> String {
        let mut all = vec![sub, "--name", &self.name];
        all.extend_from_slice(args);
        kwire_lab_ok(&all)
    }

    /// `kwire-lab status --json`, parsed.
    pub fn status(&self) -> Json {
        parse_json(&self.cmd_ok("status", &["--json"])).expect("status --json is JSON")
    }

    /// `kwire-lab probe --json FROM TO --timeout 2` (FROM a pod or node, TO `IP:PORT`), read.
    pub fn probe(&self, from: &str, to: &str) -> Probe {
        let o = self.cmd("probe", &[from, to, "--json", "--timeout", "2"]);
        let report = parse_json(String::from_utf8_lossy(&o.stdout).trim())
            .unwrap_or_else(|e| panic!("probe {from} {to}: not JSON ({e}): {}", out_text(&o)));
        Probe {
            reachable: report["reachable"].as_bool() == Some(true),
            detail: report["detail"].as_str().unwrap_or_default().to_string(),
            report,
        }
    }

    /// `kwire-lab exec NODE -- ARGV...`.
    pub fn exec(&self, node: &str, argv: &[&str]) -> Output {
        let mut all = vec!["exec", "--name", &self.name, node, "--"];
        all.extend_from_slice(argv);
        kwire_lab(&all)
    }

    /// `curl` arguments for a call to the lab's API as its admin (HTTPS with the lab's CA, the
    /// admin token the supervisor wrote).
    pub fn api_curl_args(&self, method: &str, url: &str) -> Vec<String> {
        let token = std::fs::read_to_string(self.dir().join("admin.token")).expect("admin.token");
        vec![
            "curl".into(),
            "-sS".into(),
            "--fail".into(),
            "-m".into(),
            "5".into(),
            "-X".into(),
            method.into(),
            "--cacert".into(),
            self.dir().join("ca.crt").display().to_string(),
            "-H".into(),
            format!("Authorization: Bearer {}", token.trim()),
            url.into(),
        ]
    }

    /// True when every node has a handshake with every other node of the lab.
    pub fn full_mesh(&self) -> bool {
        let st = self.status();
        let nodes = st["nodes"].array();
        let names: Vec<&str> = nodes.iter().filter_map(|n| n["name"].as_str()).collect();
        nodes.iter().all(|n| {
            let me = n["name"].as_str().unwrap_or("");
            names.iter().filter(|o| **o != me).all(|o| {
                n["peers"].array().iter().any(|p| {
                    p["node"].as_str() == Some(o) && p["handshake"].as_bool() == Some(true)
                })
            })
        })
    }

    /// One series of node `n`'s (`n1`) `/metrics` (0 when absent).
    pub fn metric(&self, n: &str, series: &str) -> f64 {
        let o = self.exec(
            n,
            &["curl", "-sS", "-m", "3", "http://127.0.0.1:9742/metrics"],
        );
        crate::prometheus_value(&String::from_utf8_lossy(&o.stdout), series).unwrap_or(0.0)
    }

    /// Node `node`'s state directory (`kwire-lab status`).
    pub fn state_dir(&self, node: &str) -> std::path::PathBuf {
        self.status()["nodes"]
            .array()
            .iter()
            .find(|n| n["name"].as_str() == Some(node))
            .and_then(|n| n["state_dir"].as_str().map(std::path::PathBuf::from))
            .unwrap_or_else(|| panic!("no state_dir of {node}"))
    }

    /// Node `node` can no longer reach the API (connections to the stand-in's port refused at
    /// once), through nftables table `table` in its namespace; [`Lab::unblock_api`] undoes it.
    pub fn block_api(&self, node: &str, table: &str) {
        let rules = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0; }}\n\
             add rule inet {table} out tcp dport 6443 reject with tcp reset\n"
        );
        // `exec` passes no stdin: the rules go through a file.
        let f = self.dir().join(format!("{node}-{table}.nft"));
        std::fs::write(&f, rules).unwrap();
        let o = self.exec(node, &["nft", "-f", f.to_str().unwrap()]);
        assert!(o.status.success(), "block the API on {node}: {o:?}");
    }

    pub fn unblock_api(&self, node: &str, table: &str) {
        let o = self.exec(node, &["nft", "delete", "table", "inet", table]);
        assert!(o.status.success(), "unblock the API on {node}: {o:?}");
    }

    /// Node `node`'s `/readyz`: (HTTP status, body).
    pub fn readyz(&self, node: &str) -> (String, String) {
        let o = self.exec(
            node,
            &[
                "curl",
                "-sS",
                "-m",
                "3",
                "-w",
                "\n%{http_code}",
                "http://127.0.0.1:9742/readyz",
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_string(), body.to_string())
    }

    /// `kwire_drops_total{reason=REASON}` of node `n`.
    pub fn drops(&self, n: &str, reason: &str) -> f64 {
        self.metric(n, &format!("kwire_drops_total{{reason=\"{reason}\"}}"))
    }

    /// Joins namespace `ns` to the lab's underlay bridge by a veth; the name of its end in `ns`
    /// (down, no address).
    pub fn attach_to_underlay(&self, ns: &crate::Netns, tag: &str) -> String {
        let st = self.status();
        let ul = st["underlay_netns"].as_str().expect("underlay_netns");
        let bridge = st["bridge"].as_str().expect("bridge");
        let (outer, inner) = (ns.ifname(&format!("{tag}o")), ns.ifname(&format!("{tag}i")));
        crate::run_host(&[
            "ip",
            "-n",
            ul,
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            ns.name(),
        ]);
        crate::run_host(&[
            "ip", "-n", ul, "link", "set", &outer, "master", bridge, "up",
        ]);
        inner
    }

    /// The agent of node `name`: (pid, restarts so far), from `status --json`.
    pub fn agent(&self, name: &str) -> (i32, u64) {
        let st = self.status();
        let n = st["nodes"]
            .array()
            .iter()
            .find(|n| n["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no node {name} in status"))
            .clone();
        (
            n["agent_pid"].as_u64().expect("agent_pid") as i32,
            n["agent_restarts"].as_u64().unwrap_or(0),
        )
    }

    /// Sends `signal` to the agents of `nodes` at once (SIGKILL: a crash; SIGTERM: what a
    /// DaemonSet rollout sends), then waits until the supervisor restarted each (a new pid,
    /// one more restart) and it serves CNI again (its socket bound anew: the old agent's file
    /// outlives a SIGKILL), within `restart`. Returns when the signals were sent. Whatever
    /// else the new agents must have (sessions, tables) the caller waits for.
    pub fn signal_agents(
        &self,
        nodes: &[&str],
        signal: nix::sys::signal::Signal,
        restart: std::time::Duration,
    ) -> std::time::Instant {
        let before: Vec<(i32, u64)> = nodes.iter().map(|n| self.agent(n)).collect();
        let signalled = std::time::SystemTime::now();
        let bound_since_signal = |socket: &str| {
            std::fs::metadata(socket)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= signalled)
        };
        for (n, (pid, _)) in nodes.iter().zip(&before) {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal)
                .unwrap_or_else(|e| panic!("{signal} to agent {pid} of {n}: {e}"));
        }
        let sent = std::time::Instant::now();
        crate::wait_until(restart, format!("agents of {nodes:?} restarted"), || {
            let st = self.status();
            nodes.iter().zip(&before).all(|(name, (pid, restarts))| {
                st["nodes"]
                    .array()
                    .iter()
                    .find(|n| n["name"].as_str() == Some(name))
                    .is_some_and(|n| {
                        n["agent_pid"].as_u64().is_some_and(|p| p as i32 != *pid)
                            && n["agent_restarts"].as_u64().unwrap_or(0) > *restarts
                            && n["cni_socket"].as_str().is_some_and(bound_since_signal)
                    })
            })
        });
        eprintln!(
            "agents of {nodes:?}: {signal}, restarted in {:.1} s",
            sent.elapsed().as_secs_f64()
        );
        sent
    }

    /// Do not run `down` on drop (the test did it).
    pub fn forget(mut self) {
        self.down_on_drop = false;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down_on_drop {
            return;
        }
        if std::thread::panicking() {
            let log = self.dir().join("supervisor.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- {} (tail) ---\n{}",
                    log.display(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        let _ = kwire_lab(&["down", "--name", &self.name]);
    }
}

/// What `kwire-lab probe --json` found.
#[derive(Debug, Clone)]
pub struct Probe {
    pub reachable: bool,
    /// The answer when reachable (`connected; answer "shop/web-1 ..."`), else why not.
    pub detail: String,
    /// The whole report.
    pub report: Json,
}

impl Probe {
    /// The detail when reachable.
    pub fn answer(self) -> Option<String> {
        self.reachable.then_some(self.detail)
    }
}

/// A command's exit status and output, for a failure message.
pub fn out_text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

/// A lab Pod manifest (one YAML document, `---` first) in namespace `shop` on node `node`
/// (`n1`, `n2`...) of lab `lab`, with `labels` (a YAML flow mapping's body: `app: web, one:
/// "yes"`), running the lab's `pod-serve` image: HTTP on container port `http` (named
/// `http`), DNS on UDP 5353 (named `dns`).
pub fn shop_pod(lab: &str, name: &str, node: &str, labels: &str, http: u16) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}
spec:
  nodeName: {lab}-{node}
  containers:
  - name: c
    image: kwire-lab/pod-serve
    ports:
    - {{name: http, containerPort: {http}}}
    - {{name: dns, containerPort: 5353, protocol: UDP}}
"#
    )
}

/// The Service `namespace/name` in `kwire-lab status --json`.
pub fn lab_service<'a>(status: &'a Json, namespace: &str, name: &str) -> Option<&'a Json> {
    status["services"]
        .array()
        .iter()
        .find(|s| s["namespace"].as_str() == Some(namespace) && s["name"].as_str() == Some(name))
}

/// Pod `namespace/name` in `kwire-lab status --json` (its `netns`, `ips`, `node`...).
pub fn lab_pod<'a>(status: &'a Json, namespace: &str, name: &str) -> Option<&'a Json> {
    status["pods"]
        .array()
        .iter()
        .find(|p| p["namespace"].as_str() == Some(namespace) && p["name"].as_str() == Some(name))
}

/// The node named `name` in `kwire-lab status --json`.
pub fn node<'a>(status: &'a Json, name: &str) -> &'a Json {
    status["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no node {name} in status"))
}

/// `kwire-lab status --json` and other JSON the tests read: a `serde_json::Value`.
pub use serde_json::Value as Json;

/// Parses JSON text (the lab's, a plugin's, the API's).
pub fn parse_json(text: &str) -> Result<Json, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// What the tests ask of JSON beyond `serde_json::Value`'s own accessors (`v["key"]` gives
/// Null for an absent member).
pub trait JsonExt {
    /// The elements of an array (none if not an array).
    fn array(&self) -> &[Json];
    /// The strings of an array of strings.
    fn strings(&self) -> Vec<String>;
    /// Whether an object has member `key`.
    fn has(&self, key: &str) -> bool;
}

impl JsonExt for Json {
    fn array(&self) -> &[Json] {
        self.as_array().map_or(&[], Vec::as_slice)
    }

    fn strings(&self) -> Vec<String> {
        self.array()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    fn has(&self, key: &str) -> bool {
        self.as_object().is_some_and(|m| m.contains_key(key))
    }
}
