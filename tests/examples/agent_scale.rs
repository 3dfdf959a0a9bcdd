//! Whole-process scale measurement of `kwire agent`: the API stand-in filled with N Nodes
//! (5,000 by default), the real release binary started in a fresh network namespace, and
//! three figures: time from process start to every peer in the device (and every route in
//! the kernel), peak RSS (VmHWM), and the latency from a Node change to its effect in the
//! data plane (the new endpoint visible through `get=1` on the userspace API socket).
//!
//! Needs root (namespace, tun). Run it with `scripts/bench-agent-scale.sh`, or:
//!   cargo build --release -p kwire-daemon --bin kwire --example agent_scale
//!   target/release/examples/agent_scale [--nodes N] [--changes M] [--kwire PATH]
//!
//! Topology: one namespace holds the agent, a underlay (192.0.2.1/24, this node's
//! InternalIP, on a veth pair) and the stand-in, which listens on its 127.0.0.1 (the driver thread enters the
//! namespace first, as `daemon/tests/agent_mesh.rs` does). Peer endpoints are documentation
//! addresses (198.51.100.0/24, 203.0.113.0/24); nothing is ever sent to them.

use base64::Engine;
use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use kwire_tests::{kwire_bin, unique_id, Netns, Proc, Scratch};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the agent gets to program every peer before the run is declared failed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one Node change may take to reach the device before the run is declared failed.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between polls of the device while waiting for the initial sync: every poll makes the
/// agent format all N peers, so polling much faster would slow down what is measured.
const SYNC_POLL: Duration = Duration::from_millis(10);
/// Pause between polls while waiting for one change (the brief's 1 ms).
const CHANGE_POLL: Duration = Duration::from_millis(1);
/// Pause between two changes, so each is measured alone.
const CHANGE_GAP: Duration = Duration::from_millis(20);
const LISTEN_PORT: u16 = 51820;
const OWN_IP: &str = "192.0.2.1";

struct Opts {
    nodes: usize,
    changes: usize,
    kwire: PathBuf,
    log_level: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        nodes: 5000,
        changes: 200,
        kwire: PathBuf::new(),
        log_level: "info,kube=warn,hyper=warn".into(),
    };
    let mut kwire = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => o.nodes = val().parse().expect("--nodes N"),
            "--changes" => o.changes = val().parse().expect("--changes N"),
            "--kwire" => kwire = Some(PathBuf::from(val())),
            "--log-level" => o.log_level = val(),
            "--bench" => {} // passed by `cargo bench`
            other => panic!(
                "unknown argument {other:?} (--nodes N --changes N --kwire PATH --log-level F)"
            ),
        }
    }
    o.kwire = kwire.unwrap_or_else(kwire_bin);
    o
}

/// A fresh x25519 public key, base64.
fn random_public_key() -> String {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = x25519_dalek::PublicKey::from(&secret);
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

/// A distinct documentation-range endpoint for `i` and a generation `g` (the port carries both).
fn endpoint(i: usize, g: usize) -> String {
    let net = if (i / 254).is_multiple_of(2) {
        "198.51.100"
    } else {
        "203.0.113"
    };
    format!("{net}.{}:{}", i % 254 + 1, 10000 + (i + g * 7919) % 50000)
}

/// `get=1` on the userspace API socket; the whole reply.
fn uapi_get(sock: &Path) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.write_all(b"get=1\n\n").ok()?;
    let mut out = Vec::with_capacity(1 << 20);
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"errno=0\n\n") {
            break;
        }
    }
    String::from_utf8(out).ok()
}

/// The endpoint the device has for the peer with this key (hex, as the UAPI writes keys).
fn endpoint_of(reply: &str, key_hex: &str) -> Option<String> {
    let mut in_peer = false;
    for line in reply.lines() {
        if let Some(k) = line.strip_prefix("public_key=") {
            in_peer = k == key_hex;
        } else if in_peer {
            if let Some(e) = line.strip_prefix("endpoint=") {
                return Some(e.to_string());
            }
        }
    }
    None
}

fn key_hex(b64: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 key")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// (user + system) CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let o = opts();
    assert!(
        kwire_tests::is_root(),
        "agent_scale needs root (network namespace, tun)"
    );
    eprintln!(
        "agent_scale: {} Nodes, {} changes, agent {}, load {}",
        o.nodes,
        o.changes,
        o.kwire.display(),
        loadavg()
    );
    let scratch = Scratch::new("scale");
    let ns = Netns::new("scale");
    // The underlay: a veth pair inside the namespace (no dummy module everywhere).
    ns.run(&[
        "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    ns.run(&["ip", "addr", "add", &format!("{OWN_IP}/24"), "dev", "ul0"]);
    ns.run(&["ip", "link", "set", "ul1", "up"]);
    ns.run(&["ip", "link", "set", "ul0", "up"]);
    let ifname = ns.ifname("kw");
    let sock = PathBuf::from(kwire_tests::WG_SOCKET_DIR).join(format!("{ifname}.sock"));
    let own = format!("self-{}", unique_id());
    let kinds = ApiServer::kind("v1", "Node").expect("Node kind");

    ns.run_in(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = ApiServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cluster_cidr: Some("10.0.0.0/8".parse().expect("cidr")),
            node_cidr_mask: 24,
            history_size: 4 * (o.nodes + o.changes) + 1000,
            ..ApiServerConfig::default()
        };
        let api = rt.block_on(ApiServer::start(config)).expect("API stand-in");
        let kubeconfig = scratch.file("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");

        let t = Instant::now();
        api.create(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": own},
            "status": {"addresses": [{"type": "InternalIP", "address": OWN_IP}]},
        }))
        .expect("own Node");
        let mut keys = Vec::with_capacity(o.nodes);
        for i in 0..o.nodes {
            let key = random_public_key();
            api.create(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": format!("node-{i:05}"), "annotations": {
                    "kwire.dev/public-key": key,
                    "kwire.dev/endpoint": endpoint(i, 0),
                }},
            }))
            .unwrap_or_else(|e| panic!("creating Node {i}: {e:?}"));
            keys.push(key);
        }
        eprintln!("  stand-in filled with {} Nodes in {}", o.nodes + 1, ms(t.elapsed()));

        let state = scratch.file("state");
        let run = scratch.file("run");
        let argv: Vec<String> = vec![
            o.kwire.display().to_string(),
            "--log-level".into(),
            o.log_level.clone(),
            "agent".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            own.clone(),
            "--state-dir".into(),
            state.display().to_string(),
            "--run-dir".into(),
            run.display().to_string(),
            "--interface".into(),
            ifname.clone(),
            "--metrics-addr".into(),
            "127.0.0.1:9742".into(),
            "--listen-port".into(),
            LISTEN_PORT.to_string(),
            "--workers".into(),
            "1".into(),
            "--cluster-cidr".into(),
            "10.0.0.0/8".into(),
        ];
        let log = scratch.file("agent.log");
        let t0 = Instant::now();
        let mut agent: Proc = ns.spawn(&argv, log.clone());
        let pid = agent.pid();

        // (a) start → every peer in the device, every peer route in the kernel.
        let mut peers_at = None;
        let mut routes_at = None;
        let mut last = (0usize, 0usize);
        while peers_at.is_none() || routes_at.is_none() {
            assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
            if t0.elapsed() > SYNC_TIMEOUT {
                panic!(
                    "after {:?}: {} peers in the device, {} routes (want {}); log {}",
                    SYNC_TIMEOUT,
                    last.0,
                    last.1,
                    o.nodes,
                    log.display()
                );
            }
            if peers_at.is_none() {
                if let Some(r) = uapi_get(&sock) {
                    last.0 = r.lines().filter(|l| l.starts_with("public_key=")).count();
                    if last.0 >= o.nodes {
                        peers_at = Some(t0.elapsed());
                    }
                }
            }
            if routes_at.is_none() {
                let out = ns.exec(&["ip", "-4", "route", "show", "dev", &ifname]);
                last.1 = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("metric 100"))
                    .count();
                if last.1 >= o.nodes {
                    routes_at = Some(t0.elapsed());
                }
            }
            std::thread::sleep(SYNC_POLL);
        }
        let peers_at = peers_at.expect("set");
        let routes_at = routes_at.expect("set");
        let hwm_sync = status_kb(pid, "VmHWM:").unwrap_or(0);
        let cpu_sync = cpu_seconds(pid).unwrap_or(0.0);
        let blackholes = ns.run(&["ip", "-4", "route", "show", "type", "blackhole"]).lines().count();
        eprintln!(
            "  synced: peers {} routes {} (blackholes {blackholes}), VmHWM {} kB, agent CPU {:.2} s, load {}",
            ms(peers_at),
            ms(routes_at),
            hwm_sync,
            cpu_sync,
            loadavg()
        );

        // Cost of one poll, for the resolution of (c).
        let t = Instant::now();
        let polls = 20;
        for _ in 0..polls {
            uapi_get(&sock).expect("get=1");
        }
        let poll_cost = t.elapsed() / polls;

        // KWIRE_BENCH_PERF=FILE: record a CPU profile of the agent during the changes.
        let perf = std::env::var_os("KWIRE_BENCH_PERF").map(|out| {
            std::process::Command::new("perf")
                .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
                .arg(out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf record")
        });
        let cpu_before = cpu_seconds(pid).unwrap_or(0.0);

        // (c) Node change → new endpoint in the device.
        let mut lat = Vec::with_capacity(o.changes);
        for c in 0..o.changes {
            let i = (c * 37 + 11) % o.nodes;
            let want = endpoint(i, c + 1);
            let hex = key_hex(&keys[i]);
            let patch = json!({"metadata": {"annotations": {"kwire.dev/endpoint": want}}});
            let t = Instant::now();
            api.merge_patch(kinds, None, &format!("node-{i:05}"), &patch, false)
                .expect("merge patch");
            loop {
                if uapi_get(&sock).and_then(|r| endpoint_of(&r, &hex)).as_deref() == Some(want.as_str()) {
                    break;
                }
                assert!(t.elapsed() < CHANGE_TIMEOUT, "change {c} (node-{i:05} → {want}) not applied after {CHANGE_TIMEOUT:?}");
                std::thread::sleep(CHANGE_POLL);
            }
            lat.push(t.elapsed());
            std::thread::sleep(CHANGE_GAP);
        }
        lat.sort();
        let cpu_changes = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
        if let Some(mut p) = perf {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::Signal::SIGINT);
            let _ = p.wait();
        }
        let hwm = status_kb(pid, "VmHWM:").unwrap_or(0);
        let rss = status_kb(pid, "VmRSS:").unwrap_or(0);
        let cpu = cpu_seconds(pid).unwrap_or(0.0);
        assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
        let (st, killed) = agent.stop();
        let load = loadavg();

        let goal = |ok: bool| if ok { "met" } else { "MISSED" };
        println!("kwire agent scale: {} peer Nodes (+ own), {} changes; load average {load}", o.nodes, o.changes);
        println!(
            "  start → all peers in device   {:>10}   (goal < 3 s: {})",
            ms(peers_at),
            goal(peers_at < Duration::from_secs(3))
        );
        println!("  start → all routes programmed {:>10}", ms(routes_at));
        println!(
            "  peak RSS (VmHWM)              {:>7.1} MB   (goal < 150 MB: {}); after sync {:.1} MB, now {:.1} MB",
            hwm as f64 / 1024.0,
            goal(hwm < 150 * 1024),
            hwm_sync as f64 / 1024.0,
            rss as f64 / 1024.0
        );
        if !lat.is_empty() {
            let p99 = percentile(&lat, 0.99);
            println!(
                "  Node change → device endpoint p50 {}  p99 {}  max {}   (goal p99 < 50 ms: {}); one get=1 poll costs {}",
                ms(percentile(&lat, 0.50)),
                ms(p99),
                ms(*lat.last().expect("non-empty")),
                goal(p99 < Duration::from_millis(50)),
                ms(poll_cost)
            );
            println!(
                "  agent CPU per change (polls included): {}",
                ms(Duration::from_secs_f64(cpu_changes / lat.len() as f64))
            );
        }
        println!(
            "  agent CPU: {:.2} s to sync, {:.2} s total; exit {st:?}{}",
            cpu_sync,
            cpu,
            if killed { " (SIGKILLed)" } else { "" }
        );
        if std::env::var_os("KWIRE_BENCH_KEEP_LOG").is_some() {
            let keep = std::env::temp_dir().join("kwire-agent-scale.log");
            let _ = std::fs::copy(&log, &keep);
            println!("  agent log kept at {}", keep.display());
        }
        rt.block_on(api.stop());
    });
}
