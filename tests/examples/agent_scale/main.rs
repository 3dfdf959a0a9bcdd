//! Whole-process scale measurement of `kwire agent` (issue 17): the API stand-in filled with a
//! synthetic cluster (5,000 Nodes, 150,000 Pods in 500 Namespaces, 5,000 NetworkPolicies by
//! default; shapes in `synth.rs`), the real release binary started in a fresh network
//! namespace with three pods of its own wired in by the real `kwire-cni`, and these figures:
//!
//! - `sync_ms`: process start to a complete data plane: every peer in the device (`get=1` on
//!   the userspace API socket), every peer route in the kernel, and policy enforced (a probe
//!   from a pod no policy admits is dropped while one from an admitted pod passes).
//! - `peak_rss_mb`: VmHWM of the agent over the whole run.
//! - `irrelevant_update_cpu_us`: agent CPU per update that changes nothing kwire uses (Pod and
//!   Node status heartbeats, annotations kwire does not read), idle CPU subtracted. The window
//!   closes only once a relevant change made after the updates has reached the data plane (a
//!   fence, see `fenced`), so an agent that fell behind its watch cannot read cheap; what the
//!   fence costs on its own (`fence_pod_cpu_ms`, `fence_node_cpu_ms`) is taken off. The Pod
//!   fence's probes are new flows through the agent, paced (`probe::PROBE_GAP`) so that one
//!   waiting out a watch turn sends tens, not hundreds (`fence_pod_probes_window`, against
//!   `fence_pod_probes_alone`).
//! - `relevant_change_p99_ms`: a change to its effect in the data plane, polled: a policy
//!   created or deleted and a local pod's labels changed (seen by probes between the pods), a
//!   Node's endpoint or key changed (seen in the device, through a `get=1` of that peer,
//!   kwire's extension; an agent without it is asked for every peer: `node_probe_get_p50_ms`
//!   is what one such get takes, and
//!   `node_change_seen_asked_p50_ms`/`_p99_ms` when the get that first saw the change was
//!   asked: the change was in by that get's answer, and not by the answer of the get before,
//!   so this is within one get's time of when it was applied, where the p99 above adds that
//!   get's whole time and more).
//! - `relevant_change_cpu_ms`: agent CPU per relevant change (remote pod labels and IPs, a
//!   policy, a Node's key, local labels), applied without polling, idle CPU subtracted.
//! - `irrelevant_service_update_cpu_us`, `service_rebuilds_irrelevant` (with `--services`):
//!   the same for Service and EndpointSlice annotations the table does not read, and how many
//!   times the service table was rebuilt meanwhile (the agent's log; none is due).
//! - `churn_cpu_cores`: agent CPU under 100 Pod events/s and 20 Node events/s (creates,
//!   deletes, IP assignments, relabels, heartbeats), idle included.
//!
//! CPU is the agent process's CPU-time clock (clock_getcpuclockid(3): every thread, ended
//! ones included, in nanoseconds), never wall time; `KWIRE_BENCH_THREADS=1` prints each
//! fenced window's CPU by live thread (/proc/PID/task/TID/schedstat). Needs root. Run it with
//! `scripts/bench-agent-scale.sh` (which builds the release binaries), or:
//!   cargo build --release -p kwire-daemon -p kwire-cni && cargo build --release -p kwire-tests --example agent_scale
//!   target/release/examples/agent_scale [--nodes N] [--pods N] [--namespaces N] [--policies N] [--json] ...
//!
//! Topology: one namespace holds the agent, an underlay (192.0.2.1/24, this node's InternalIP,
//! on a veth pair) and the stand-in on its 127.0.0.1; the three pods are namespaces of their
//! own. Peer endpoints are documentation addresses no one answers at: the device's greetings
//! (and boringtun's retries) go unanswered, and every peer ends up reported unreachable. That
//! start-up load is measured on its own (`startup_handshake_cpu_cores`) and is over before the
//! per-event figures are taken. The stand-in
//! keeps no managedFields of its own, so the synthetic objects bring theirs, as objects read
//! from a real API server have them.

mod probe;
mod synth;

use base64::Engine;
use kwire_lab::apiserver::resources::ResourceKind;
use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use kwire_tests::{kwire_bin, unique_id, Netns, Proc, Scratch};
use probe::{Server, PASS_WAIT};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the agent gets to a complete data plane before the run is declared failed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one change may take to reach the data plane before the run is declared failed.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between polls while waiting for the initial sync: every `get=1` makes the agent
/// format all N peers, so polling much faster would slow down what is measured.
const SYNC_POLL: Duration = Duration::from_millis(20);
/// Pause between `get=1` polls while waiting for one Node change.
const CHANGE_POLL: Duration = Duration::from_millis(1);
/// How often a fence (see `fenced`) looks for its Node change in the device.
const FENCE_POLL: Duration = Duration::from_millis(10);
/// Pause between two measured changes, so each is measured alone (plus [`GAP_JITTER_MS`]).
const CHANGE_GAP: Duration = Duration::from_millis(20);
/// Between two relabels timed under churn (phase g; plus [`GAP_JITTER_MS`]).
const UNDER_CHURN_GAP: Duration = Duration::from_millis(100);
/// Up to this much, drawn at random, is added to each gap between timed changes. With a fixed
/// gap, each change came at the same point of the watch thread's turn as the one before (a
/// change is seen at a turn's end, and the next one is made a fixed time after that): the
/// under-churn p50 read 35.9 ms in two runs in a row, and which point it locked on to moved
/// with anything else that changed the loop's time. Drawn over a whole default turn, the
/// changes sample every point of it.
const GAP_JITTER_MS: usize = 50;

/// `gap` plus up to [`GAP_JITTER_MS`], drawn from `rng` (xorshift: reproducible runs).
fn jittered(gap: Duration, rng: &mut u64) -> Duration {
    gap + Duration::from_micros(xorshift(rng) % (GAP_JITTER_MS as u64 * 1000))
}

/// The next number of a xorshift sequence: reproducible runs.
fn xorshift(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// Pause after the sync before anything is measured: what the sync set off (the first state
/// file write, the Node condition) is not idle work.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the device must send nothing to the synthetic peers (longer than boringtun's
/// 5 s handshake retry) before the start-up handshakes count as over.
const HANDSHAKE_QUIET: Duration = Duration::from_secs(7);
/// Window over which idle CPU is measured (the baseline subtracted from per-update costs).
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Idle windows taken, back to back; the baseline is their median. The idle agent's work comes
/// in bursts (one 5 s window read 43 ms on the timer thread where others read 15–20 ms), and
/// one window that caught a burst took 20 µs or more off every per-update figure.
const IDLE_WINDOWS: usize = 3;
/// Irrelevant updates per second.
const IRRELEVANT_RATE: f64 = 200.0;
/// Relevant changes per second in the CPU phase (no polling).
const RELEVANT_RATE: f64 = 10.0;
/// EndpointSlice changes per second in the Services phase (no polling).
const SERVICE_CHANGE_RATE: f64 = 10.0;
/// Churn rates (the goal).
const CHURN_POD_EVENTS_PER_S: f64 = 100.0;
const CHURN_NODE_EVENTS_PER_S: f64 = 20.0;
const LISTEN_PORT: u16 = 51820;
const OWN_IP: &str = "192.0.2.1";
const BENCH_NS: &str = "bench";
/// The cluster's pod range (the stand-in's --cluster-cidr and the agent's); its route into the
/// tun is not a peer's.
const CLUSTER_CIDR: &str = "10.0.0.0/11";
/// The Service range (the stand-in's default), disjoint from the pods' as the agent requires.
const SERVICE_CIDR: &str = "10.96.0.0/12";

struct Opts {
    nodes: usize,
    pods: Option<usize>,
    namespaces: usize,
    policies: usize,
    services: usize,
    changes: usize,
    irrelevant: usize,
    churn_secs: u64,
    json: bool,
    sync_only: bool,
    kwire: PathBuf,
    kwire_cni: Option<PathBuf>,
    log_level: String,
}

const USAGE: &str = "agent_scale [--nodes N] [--pods N] [--namespaces N] [--policies N] [--services N] [--changes N] [--irrelevant N] [--churn-secs S] [--json] [--sync-only] [--kwire PATH] [--kwire-cni PATH] [--log-level FILTER]";

fn opts() -> Opts {
    let mut o = Opts {
        nodes: 5000,
        pods: None,
        namespaces: 500,
        policies: 5000,
        services: 0,
        changes: 120,
        irrelevant: 4000,
        churn_secs: 20,
        json: false,
        sync_only: false,
        kwire: PathBuf::new(),
        kwire_cni: None,
        log_level: "info,kube=warn,hyper=warn".into(),
    };
    let mut kwire = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{a} needs a value\n{USAGE}"))
        };
        let num = |v: String| {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("{a}: not a number\n{USAGE}"))
        };
        match a.as_str() {
            "--nodes" => o.nodes = num(val()),
            "--pods" => o.pods = Some(num(val())),
            "--namespaces" => o.namespaces = num(val()).max(1),
            "--policies" => o.policies = num(val()),
            "--services" => o.services = num(val()),
            "--changes" => o.changes = num(val()),
            "--irrelevant" => o.irrelevant = num(val()),
            "--churn-secs" => o.churn_secs = num(val()) as u64,
            "--json" => o.json = true,
            "--sync-only" => o.sync_only = true,
            "--kwire" => kwire = Some(PathBuf::from(val())),
            "--kwire-cni" => o.kwire_cni = Some(PathBuf::from(val())),
            "--log-level" => o.log_level = val(),
            "--bench" => {} // passed by `cargo bench`
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    o.kwire = kwire.unwrap_or_else(kwire_bin);
    o
}

// ---------- measuring the agent ----------

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds of a process so far, its ended threads included, to the nanosecond: the
/// process's CPU-time clock (clock_getcpuclockid(3)); 0 when it cannot be read.
fn cpu_seconds(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return 0.0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid place for the time.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A reading of a process's CPU time: the whole process's (ended threads included) and per
/// live thread (/proc/PID/task/TID/schedstat), both in nanoseconds; and the time its live
/// threads have waited for a CPU while runnable (the second schedstat field), to tell a slow
/// agent from a busy machine.
struct CpuReading {
    threads: std::collections::BTreeMap<u32, u64>,
    runqueue_ns: u64,
    process_s: f64,
}

impl CpuReading {
    fn take(pid: u32) -> CpuReading {
        let mut threads = std::collections::BTreeMap::new();
        let mut runqueue_ns = 0;
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(e.path().join("schedstat")) else {
                    continue;
                };
                let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
                if let (Some(Some(run)), Some(Some(wait))) = (f.next(), f.next()) {
                    threads.insert(tid, run);
                    runqueue_ns += wait;
                }
            }
        }
        CpuReading {
            threads,
            runqueue_ns,
            process_s: cpu_seconds(pid),
        }
    }

    /// The process's CPU seconds from `earlier` to this reading (threads that started or
    /// ended in between included).
    fn since(&self, earlier: &CpuReading) -> f64 {
        self.process_s - earlier.process_s
    }

    /// The threads' run time from `earlier` to this reading, most first, with their names
    /// (`KWIRE_BENCH_THREADS=1`): where a window's CPU went, threads started in it included.
    fn by_thread(&self, earlier: &CpuReading, pid: u32) -> String {
        let mut v: Vec<(u64, u32)> = self
            .threads
            .iter()
            .map(|(tid, run)| {
                (
                    run.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0)),
                    *tid,
                )
            })
            .filter(|(d, _)| *d > 0)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let ended = earlier
            .threads
            .keys()
            .filter(|t| !self.threads.contains_key(t))
            .count();
        let mut out: Vec<String> = v
            .iter()
            .map(|(d, tid)| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .unwrap_or_default();
                let new = if earlier.threads.contains_key(tid) {
                    ""
                } else {
                    " (new)"
                };
                format!("{}-{tid}{new} {:.2} ms", comm.trim(), *d as f64 / 1e6)
            })
            .collect();
        if ended > 0 {
            out.push(format!("{ended} ended"));
        }
        out.join(", ")
    }
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
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Runs `work` over a window, paced at `rate` items per second; the agent's CPU seconds used
/// meanwhile and the window's length.
fn paced(pid: u32, items: usize, rate: f64, mut work: impl FnMut(usize)) -> (f64, Duration) {
    // Let the last items be processed before reading the CPU counters.
    fenced(
        pid,
        items,
        rate,
        &mut (),
        |_, i| work(i),
        |_| std::thread::sleep(Duration::from_millis(300)),
    )
}

/// [`paced`], with the CPU counters read only once `fence` has returned: a relevant change
/// made after the items and waited for in the data plane. A watch delivers in order, so the
/// agent has then consumed every item before it; a phase's figure can never leave a backlog
/// out (an agent that lagged behind its watch would otherwise read cheap). The fence's own
/// cost is in the reading; the caller measures it alone and takes it off.
fn fenced<T: ?Sized>(
    pid: u32,
    items: usize,
    rate: f64,
    state: &mut T,
    mut work: impl FnMut(&mut T, usize),
    fence: impl FnOnce(&mut T),
) -> (f64, Duration) {
    let cpu0 = CpuReading::take(pid);
    let t0 = Instant::now();
    for i in 0..items {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        work(state, i);
    }
    fence(state);
    let cpu1 = CpuReading::take(pid);
    if std::env::var_os("KWIRE_BENCH_THREADS").is_some() {
        eprintln!("  by thread: {}", cpu1.by_thread(&cpu0, pid));
    }
    (cpu1.since(&cpu0), t0.elapsed())
}

/// A perf profile of the agent during one phase, when `KWIRE_BENCH_PERF=FILE` asks for one
/// and `KWIRE_BENCH_PERF_PHASE` (sync, idle, irrelevant_pods, irrelevant_nodes, relevant,
/// services, irrelevant_services, churn; default relevant; several separated by commas)
/// names this phase; `KWIRE_BENCH_PERF_FREQ` sets the sampling frequency (default 499 Hz),
/// `KWIRE_BENCH_PERF_CALL_GRAPH` the unwinding (fp or dwarf).
struct Perf(Option<std::process::Child>);

impl Perf {
    fn start(pid: u32, phase: &str) -> Perf {
        // Counts per thread (run time, context switches, migrations) for every phase, cheaper
        // than sampling and steadier under load than a sampled profile.
        if let Some(prefix) = std::env::var_os("KWIRE_BENCH_PERF_STAT") {
            let mut out = std::path::PathBuf::from(prefix).into_os_string();
            out.push(format!(".{phase}"));
            let events = std::env::var("KWIRE_BENCH_PERF_STAT_EVENTS")
                .unwrap_or_else(|_| "task-clock,context-switches,cpu-migrations".into());
            return Perf::spawn(&["stat", "--per-thread", "-e", &events], pid, out);
        }
        let wanted = std::env::var("KWIRE_BENCH_PERF_PHASE").unwrap_or_else(|_| "relevant".into());
        // One phase, or several separated by commas (each then to FILE.<phase>).
        let Some(mut out) =
            std::env::var_os("KWIRE_BENCH_PERF").filter(|_| wanted.split(',').any(|w| w == phase))
        else {
            return Perf(None);
        };
        if wanted.contains(',') {
            out.push(format!(".{phase}"));
        }
        let freq = std::env::var("KWIRE_BENCH_PERF_FREQ").unwrap_or_else(|_| "499".into());
        // fp (the default) costs little; dwarf unwinds through code built without frame
        // pointers (the release build's debug line tables suffice).
        let graph = std::env::var("KWIRE_BENCH_PERF_CALL_GRAPH").unwrap_or_else(|_| "fp".into());
        Perf::spawn(&["record", "-F", &freq, "--call-graph", &graph], pid, out)
    }

    /// `perf ARGS -p PID -o OUT`, quiet.
    fn spawn(args: &[&str], pid: u32, out: std::ffi::OsString) -> Perf {
        let child = std::process::Command::new("perf")
            .args(args)
            .args(["-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("perf {}: {e}", args[0]));
        Perf(Some(child))
    }

    fn stop(self) {
        if let Some(mut p) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = p.wait();
        }
    }
}

/// Counts the agent's writes of its state file: the file is replaced by a rename each time, so
/// a new inode is a write. Polled every [`STATE_POLL`], far below the agent's minimum interval
/// between writes, so no write is missed unless two land within one poll.
struct StateWrites {
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const STATE_POLL: Duration = Duration::from_millis(10);
/// How long the irrelevant Service window waits for the state files to hold the changes made
/// before it (a writer pauses up to a minute between writes).
const SAVED_WAIT: Duration = Duration::from_secs(75);
/// A write that ends this long after a change holds it (the change is folded within a watch
/// turn; the first change after a pause is written at once).
const SAVED_AFTER: Duration = Duration::from_millis(200);

/// Waits until the state file `file` in `dir` was modified at or after `since`, for at most
/// `wait`; says so when it was not (the window about to start may then hold the write).
fn wait_written(dir: &Path, file: &str, since: std::time::SystemTime, wait: Duration) {
    let t = Instant::now();
    let written = || {
        std::fs::metadata(dir.join(file))
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= since)
    };
    while !written() {
        if t.elapsed() >= wait {
            eprintln!("  ({file} not written within {wait:?}: the window may hold the write)");
            return;
        }
        std::thread::sleep(STATE_POLL);
    }
}

/// How long the irrelevant-update phase waits for the policy-state write the first Pod fence
/// causes (the writer saves the first change after a pause at once).
const POLICY_WRITE_WAIT: Duration = Duration::from_secs(10);

impl StateWrites {
    fn watch(file: PathBuf) -> StateWrites {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let ino = || {
                std::fs::metadata(&file)
                    .ok()
                    .map(|m| (m.ino(), m.mtime_nsec()))
            };
            let mut last = ino();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(STATE_POLL);
                let now = ino();
                if now.is_some() && now != last {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                last = now;
            }
        });
        StateWrites {
            count,
            stop,
            thread: Some(thread),
        }
    }

    fn get(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for StateWrites {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------- the device ----------

/// The agent's `kwire_service_frontends` gauge (its metrics listen on the namespace's loopback).
fn service_frontends(ns: &Netns) -> Option<usize> {
    let out = ns.exec(&[
        "curl",
        "-sf",
        "--max-time",
        "2",
        "http://127.0.0.1:9742/metrics",
    ]);
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("kwire_service_frontends "))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as usize)
}

/// `get=1` on the userspace API socket; the whole reply.
fn uapi_get(sock: &Path) -> Option<String> {
    uapi_ask(sock, "get=1\n\n")
}

/// `get=1` for one peer (kwire's extension, `public_key=` lines after `get=1`): the device's
/// lines and that peer's, where a whole `get=1` formats every peer (5,000) and holds the
/// device's lock while it gathers them. An agent without the extension refuses it
/// (`errno=-22`): then the whole `get=1`.
fn uapi_get_peer(sock: &Path, key_hex: &str) -> Option<String> {
    let reply = uapi_ask(sock, &format!("get=1\npublic_key={key_hex}\n\n"))?;
    if reply.starts_with("errno=") {
        return uapi_get(sock);
    }
    Some(reply)
}

fn uapi_ask(sock: &Path, request: &str) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    // The server keeps the connection open for the next request: a reply ends with its
    // `errno=` line (0, or the refusal's) and a blank line, or not at all.
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = Vec::with_capacity(1 << 20);
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let ended = out.ends_with(b"\n\n")
            && out[..out.len() - 2]
                .rsplit(|b| *b == b'\n')
                .next()
                .is_some_and(|last| last.starts_with(b"errno="));
        if ended {
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

fn random_public_key() -> String {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = x25519_dalek::PublicKey::from(&secret);
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

/// A distinct documentation-range endpoint for Node `i` at generation `g`.
fn endpoint(i: usize, g: usize) -> String {
    let net = if (i / 254).is_multiple_of(2) {
        "198.51.100"
    } else {
        "203.0.113"
    };
    format!("{net}.{}:{}", i % 254 + 1, 10000 + (i + g * 7919) % 50000)
}

// ---------- the synthetic cluster ----------

struct NodeRec {
    name: String,
    key: String,
    endpoint_gen: usize,
    internal_ip: String,
    /// First address of its podCIDR, and the next free host number in it.
    base: u32,
    next_host: u32,
}

struct PodRec {
    /// False once deleted (indexes stay valid).
    alive: bool,
    ns: usize,
    name: String,
    node: usize,
    deployment: usize,
    version: usize,
    ip: String,
}

struct Kinds {
    slice: &'static ResourceKind,
    node: &'static ResourceKind,
    pod: &'static ResourceKind,
    policy: &'static ResourceKind,
}

struct Cluster<'a> {
    api: &'a ApiServer,
    kinds: Kinds,
    /// Index 0 is this node; peers follow.
    nodes: Vec<NodeRec>,
    pods: Vec<PodRec>,
    deployments: Vec<Vec<synth::Deployment>>,
    next_pod: usize,
    beat: u64,
    rng: u64,
}

/// What the churn mix carries from one event to the next.
#[derive(Default)]
struct Churn {
    /// Pods created and not yet given their IP.
    created: Vec<usize>,
    node_events: usize,
}

fn ip_of(n: u32) -> String {
    Ipv4Addr::from(n).to_string()
}

impl Cluster<'_> {
    fn rand(&mut self, n: usize) -> usize {
        (xorshift(&mut self.rng) % n.max(1) as u64) as usize
    }

    fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// A new address on node `i`'s podCIDR (this node's synthetic pods use the upper half;
    /// its CNI allocates from the bottom).
    fn next_ip(&mut self, i: usize) -> String {
        let n = &mut self.nodes[i];
        n.next_host += 1;
        if n.next_host > 250 {
            n.next_host = if i == 0 { 129 } else { 2 };
        }
        ip_of(n.base + n.next_host)
    }

    fn create_pod(
        &mut self,
        ns: usize,
        deployment: usize,
        version: usize,
        node: usize,
        with_status: bool,
    ) -> usize {
        let d = &self.deployments[ns][deployment];
        let labels = synth::pod_labels(ns, d, version);
        let hash = labels["pod-template-hash"].as_str().unwrap_or("0")[..5].to_string();
        let name = format!("{}-{hash}-{:06x}", d.app, self.next_pod);
        self.next_pod += 1;
        let ns_name = synth::ns_name(ns);
        let node_name = self.node_name(node).to_string();
        self.api
            .create(synth::pod(&ns_name, &name, &node_name, labels))
            .unwrap_or_else(|e| panic!("creating Pod {ns_name}/{name}: {e:?}"));
        let ip = self.next_ip(node);
        let rec = PodRec {
            alive: true,
            ns,
            name,
            node,
            deployment,
            version,
            ip,
        };
        self.pods.push(rec);
        let i = self.pods.len() - 1;
        if with_status {
            self.pod_status(i);
        }
        i
    }

    fn pod_status(&mut self, i: usize) {
        self.beat += 1;
        let p = &self.pods[i];
        let status = synth::pod_status(&p.ip, &self.nodes[p.node].internal_ip, self.beat);
        self.api
            .merge_patch(
                self.kinds.pod,
                Some(&synth::ns_name(p.ns)),
                &p.name,
                &status,
                true,
            )
            .unwrap_or_else(|e| panic!("status of Pod {}: {e:?}", p.name));
    }

    fn patch_pod(&self, i: usize, patch: &Value) {
        let p = &self.pods[i];
        self.api
            .merge_patch(
                self.kinds.pod,
                Some(&synth::ns_name(p.ns)),
                &p.name,
                patch,
                false,
            )
            .unwrap_or_else(|e| panic!("patching Pod {}: {e:?}", p.name));
    }

    fn delete_pod(&mut self, i: usize) {
        let p = &mut self.pods[i];
        p.alive = false;
        let _ = self
            .api
            .delete(self.kinds.pod, Some(&synth::ns_name(p.ns)), &p.name);
    }

    fn relabel_pod(&mut self, i: usize) {
        let p = &mut self.pods[i];
        p.version = p.version % 3 + 1;
        let labels = synth::pod_labels(p.ns, &self.deployments[p.ns][p.deployment], p.version);
        self.patch_pod(i, &json!({"metadata": {"labels": labels}}));
    }

    fn readdress_pod(&mut self, i: usize) {
        let node = self.pods[i].node;
        self.pods[i].ip = self.next_ip(node);
        self.pod_status(i);
    }

    fn pod_heartbeat(&mut self, i: usize) {
        self.pod_status(i);
    }

    fn pod_annotation(&mut self, i: usize) {
        self.beat += 1;
        let patch = json!({"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": format!("2025-01-02T00:00:{:02}Z", self.beat % 60)}}});
        self.patch_pod(i, &patch);
    }

    fn node_heartbeat(&mut self, i: usize) {
        self.beat += 1;
        let n = &self.nodes[i];
        let body = synth::node_status_body(&n.internal_ip, &n.name, self.beat);
        self.api
            .merge_patch(self.kinds.node, None, &n.name, &body, true)
            .unwrap_or_else(|e| panic!("status of Node {}: {e:?}", n.name));
    }

    fn node_patch(&self, i: usize, patch: &Value) {
        let n = &self.nodes[i];
        self.api
            .merge_patch(self.kinds.node, None, &n.name, patch, false)
            .unwrap_or_else(|e| panic!("patching Node {}: {e:?}", n.name));
    }

    fn node_annotation(&mut self, i: usize) {
        self.beat += 1;
        self.node_patch(i, &json!({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": (self.beat % 30).to_string()}}}));
    }

    fn node_new_endpoint(&mut self, i: usize) -> String {
        self.nodes[i].endpoint_gen += 1;
        let ep = endpoint(i, self.nodes[i].endpoint_gen);
        self.node_patch(
            i,
            &json!({"metadata": {"annotations": {"kwire.dev/endpoint": ep}}}),
        );
        ep
    }

    fn node_new_key(&mut self, i: usize) -> String {
        let key = random_public_key();
        self.nodes[i].key = key.clone();
        self.node_patch(
            i,
            &json!({"metadata": {"annotations": {"kwire.dev/public-key": key}}}),
        );
        key
    }

    fn change_policy(&mut self, ns: usize, k: usize) {
        self.beat += 1;
        let patch = json!({"spec": {"ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 8000 + (self.beat % 1000) as i32}]}]}});
        let _ = self.api.merge_patch(
            self.kinds.policy,
            Some(&synth::ns_name(ns)),
            &format!("np-{k:03}"),
            &patch,
            false,
        );
    }

    /// Event `i` of the churn mix (phases f and g), at 100 Pod events/s: of ten Pod events,
    /// two pods created, their two IPs assigned, two pods deleted, one relabeled (a rollout's
    /// new version), three status heartbeats; every `node_every`-th also a Node event, mostly
    /// a heartbeat, sometimes an annotation or a new endpoint.
    fn churn_event(&mut self, i: usize, node_every: usize, churn: &mut Churn) {
        match i % 10 {
            0 | 5 => {
                let ns = self.rand(self.deployments.len());
                let d = self.rand(self.deployments[ns].len());
                let node = self.rand(self.nodes.len());
                churn.created.push(self.create_pod(ns, d, 2, node, false));
            }
            1 | 6 => {
                if let Some(p) = churn.created.pop() {
                    self.pod_status(p);
                }
            }
            2 | 7 => {
                let p = self.remote_pod();
                churn.created.retain(|c| *c != p);
                self.delete_pod(p);
            }
            3 => {
                let p = self.remote_pod();
                self.relabel_pod(p)
            }
            _ => {
                let p = self.remote_pod();
                self.pod_heartbeat(p)
            }
        }
        if i.is_multiple_of(node_every) {
            let n = 1 + self.rand(self.nodes.len() - 1);
            match churn.node_events % 20 {
                0 => {
                    self.node_new_endpoint(n);
                }
                1 => self.node_annotation(n),
                _ => self.node_heartbeat(n),
            }
            churn.node_events += 1;
        }
    }

    fn remote_pod(&mut self) -> usize {
        loop {
            let i = self.rand(self.pods.len());
            if self.pods[i].alive && self.pods[i].node != 0 {
                return i;
            }
        }
    }
}

fn pod_cidr_base(node: &Value) -> u32 {
    let cidr = node
        .pointer("/spec/podCIDRs/0")
        .and_then(Value::as_str)
        .expect("the stand-in assigns podCIDRs");
    let ip: Ipv4Addr = cidr.split('/').next().unwrap().parse().expect("podCIDR");
    u32::from(ip)
}

// ---------- the run ----------

struct Report {
    out: serde_json::Map<String, Value>,
}

impl Report {
    fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.out.insert(k.into(), v.into());
    }
}

fn main() {
    let o = opts();
    assert!(
        kwire_tests::is_root(),
        "agent_scale needs root (network namespaces, tun)"
    );
    let pods_total = o.pods.unwrap_or(30 * (o.nodes + 1));
    let kwire_cni = o
        .kwire_cni
        .clone()
        .unwrap_or_else(|| o.kwire.with_file_name("kwire-cni"));
    let kwire_cni = std::fs::canonicalize(&kwire_cni).unwrap_or_else(|e| {
        panic!(
            "no kwire-cni at {}: {e} (--kwire-cni PATH)",
            kwire_cni.display()
        )
    });
    eprintln!(
        "agent_scale: {} Nodes, {} Pods, {} Namespaces, {} NetworkPolicies, {} Services; agent {}; load {}",
        o.nodes, pods_total, o.namespaces, o.policies, o.services, o.kwire.display(), loadavg()
    );
    let scratch = Scratch::new("scale");
    let ns = Netns::new("scale");
    ns.run(&[
        "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    ns.run(&["ip", "addr", "add", &format!("{OWN_IP}/24"), "dev", "ul0"]);
    ns.run(&["ip", "link", "set", "ul1", "up"]);
    ns.run(&["ip", "link", "set", "ul0", "up"]);
    let ifname = ns.ifname("kw");
    let sock = PathBuf::from(kwire_tests::WG_SOCKET_DIR).join(format!("{ifname}.sock"));
    let own = format!("self-{}", unique_id());
    let mut report = Report {
        out: serde_json::Map::new(),
    };

    ns.run_in(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = ApiServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cluster_cidr: Some(CLUSTER_CIDR.parse().expect("cidr")),
            node_cidr_mask: 24,
            // Covers the writes of the run after the agent's lists (the fill may be compacted).
            history_size: 200_000,
            ..ApiServerConfig::default()
        };
        let api = rt.block_on(ApiServer::start(config)).expect("API stand-in");
        let kubeconfig = scratch.file("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let kinds = Kinds {
            slice: ApiServer::kind("discovery.k8s.io/v1", "EndpointSlice").expect("EndpointSlice"),
            node: ApiServer::kind("v1", "Node").expect("Node"),
            pod: ApiServer::kind("v1", "Pod").expect("Pod"),
            policy: ApiServer::kind("networking.k8s.io/v1", "NetworkPolicy").expect("NetworkPolicy"),
        };

        // ---- fill ----
        let t = Instant::now();
        for i in 0..o.namespaces {
            api.create(synth::namespace(i)).expect("Namespace");
        }
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": BENCH_NS}})).expect("bench Namespace");
        let mut nodes = Vec::with_capacity(o.nodes + 1);
        // This node: no kwire annotations until its agent writes them.
        let mut own_obj = synth::node(&own, OWN_IP, "", "");
        if let Some(a) = own_obj["metadata"]["annotations"].as_object_mut() {
            a.retain(|k, _| !k.starts_with("kwire.dev/"));
        }
        api.create(own_obj).expect("own Node");
        let own_node = api.get(kinds.node, None, &own).expect("own Node");
        nodes.push(NodeRec {
            name: own.clone(),
            key: String::new(),
            endpoint_gen: 0,
            internal_ip: OWN_IP.into(),
            base: pod_cidr_base(&own_node),
            next_host: 128,
        });
        for i in 1..=o.nodes {
            let key = random_public_key();
            let name = format!("node-{i:05}");
            let internal_ip = ip_of(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32);
            let created = api
                .create(synth::node(&name, &internal_ip, &key, &endpoint(i, 0)))
                .unwrap_or_else(|e| panic!("creating Node {i}: {e:?}"));
            let created = api.get(kinds.node, None, &name).unwrap_or(created);
            nodes.push(NodeRec {
                name,
                key,
                endpoint_gen: 0,
                internal_ip,
                base: pod_cidr_base(&created),
                next_host: 1,
            });
        }
        let nodes_filled = t.elapsed();
        let per_ns = pods_total / o.namespaces;
        let mut cluster = Cluster {
            api: &api,
            kinds,
            nodes,
            pods: Vec::with_capacity(pods_total),
            deployments: (0..o.namespaces).map(|n| synth::deployments(n, per_ns)).collect(),
            next_pod: 0,
            beat: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        };
        let node_count = cluster.nodes.len();
        let mut g = 0usize;
        for n in 0..o.namespaces {
            for d in 0..cluster.deployments[n].len() {
                for _ in 0..cluster.deployments[n][d].replicas {
                    cluster.create_pod(n, d, 1, g % node_count, true);
                    g += 1;
                }
            }
        }
        let pods_filled = t.elapsed();
        for k in 0..o.policies {
            let n = k % o.namespaces;
            let obj = synth::policy(n, k / o.namespaces, &cluster.deployments[n]);
            api.create(obj).unwrap_or_else(|e| panic!("creating policy {k}: {e:?}"));
        }
        for s in 0..o.services {
            let n = s % o.namespaces;
            let eps: Vec<String> = (0..10).map(|e| cluster.pods[(s * 10 + e) % cluster.pods.len()].ip.clone()).collect();
            let (svc, slice) = synth::service(n, s, &eps);
            api.create(svc).unwrap_or_else(|e| panic!("creating Service {s}: {e:?}"));
            api.create(slice).unwrap_or_else(|e| panic!("creating EndpointSlice {s}: {e:?}"));
        }
        // The bench pods' policies: b admits only role=client, on the probe port.
        let bench_policy = |name: &str, ingress: Value| {
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": BENCH_NS},
                "spec": {"podSelector": {"matchLabels": {"role": "server"}}, "policyTypes": ["Ingress"], "ingress": ingress}})
        };
        let allow = bench_policy("allow-clients", json!([{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": probe::PROBE_PORT, "protocol": "UDP"}]}]));
        api.create(bench_policy("deny", json!([]))).expect("bench policy");
        api.create(allow.clone()).expect("bench policy");
        let filled = t.elapsed();
        eprintln!(
            "  stand-in filled in {:.1} s (nodes {:.1} s, pods {:.1} s); {} pods; load {}",
            filled.as_secs_f64(), nodes_filled.as_secs_f64(), (pods_filled - nodes_filled).as_secs_f64(), cluster.pods.len(), loadavg()
        );
        report.set("nodes", o.nodes);
        report.set("pods", cluster.pods.len());
        report.set("namespaces", o.namespaces);
        report.set("policies", o.policies);
        report.set("services", o.services);
        report.set("fill_s", (filled.as_secs_f64() * 10.0).round() / 10.0);

        // ---- start ----
        let state = scratch.file("state");
        let run = scratch.file("run");
        let argv: Vec<String> = vec![
            o.kwire.display().to_string(), "--log-level".into(), o.log_level.clone(), "agent".into(),
            "--kubeconfig".into(), kubeconfig.display().to_string(), "--node-name".into(), own.clone(),
            "--state-dir".into(), state.display().to_string(), "--run-dir".into(), run.display().to_string(),
            "--interface".into(), ifname.clone(), "--metrics-addr".into(), "127.0.0.1:9742".into(),
            "--listen-port".into(), LISTEN_PORT.to_string(), "--workers".into(), "1".into(),
            "--cluster-cidr".into(), CLUSTER_CIDR.into(), "--service-cidr".into(), SERVICE_CIDR.into(),
        ];
        let log = scratch.file("agent.log");
        let t0 = Instant::now();
        let mut agent: Proc = ns.spawn(&argv, log.clone());
        let pid = agent.pid();
        let perf = Perf::start(pid, "sync");
        // The stand-in serves the lists from this process (its runtime's one worker thread).
        let standin_cpu0 = cpu_seconds(std::process::id());

        // This node's pods, wired in by kwire-cni as soon as the agent serves CNI.
        let cni_sock = run.join("cni.sock");
        while !cni_sock.exists() {
            assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
            assert!(t0.elapsed() < SYNC_TIMEOUT, "no CNI socket at {}", cni_sock.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        let plugins = scratch.file("cni-bin");
        let pod_a = probe::add_pod(&kwire_cni, &run, &plugins, "a");
        let pod_b = probe::add_pod(&kwire_cni, &run, &plugins, "b");
        let pod_c = probe::add_pod(&kwire_cni, &run, &plugins, "c");
        for (name, pod, role) in [("a", &pod_a, "client"), ("b", &pod_b, "server"), ("c", &pod_c, "other")] {
            let mut obj = synth::pod(BENCH_NS, name, &own, json!({"role": role}));
            obj["spec"]["containers"][0]["ports"] = json!([{"name": "probe", "containerPort": probe::PROBE_PORT, "protocol": "UDP"}]);
            api.create(obj).expect("bench Pod");
            let status = synth::pod_status(&pod.ip.to_string(), OWN_IP, 0);
            api.merge_patch(cluster.kinds.pod, Some(BENCH_NS), name, &status, true).expect("bench Pod status");
        }
        let mut server = Server::new(&pod_b);

        // (a) start → complete data plane.
        let (mut peers_at, mut routes_at, mut policy_at) = (None, None, None);
        let mut last = (0usize, 0usize);
        let mut services_at = (o.services == 0).then_some(Duration::ZERO);
        let mut polls = 0u64;
        while peers_at.is_none() || routes_at.is_none() || policy_at.is_none() || services_at.is_none() {
            assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
            if t0.elapsed() > SYNC_TIMEOUT {
                panic!("after {SYNC_TIMEOUT:?}: {} peers, {} routes (want {}), policy {}; log {}",
                    last.0, last.1, o.nodes, policy_at.is_some(), log.display());
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
                last.1 = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("metric 100") && !l.starts_with(CLUSTER_CIDR) && !l.starts_with(SERVICE_CIDR)).count();
                if last.1 >= o.nodes {
                    routes_at = Some(t0.elapsed());
                }
            }
            polls += 1;
            if services_at.is_none() && polls.is_multiple_of(10) && service_frontends(&ns).is_some_and(|n| n >= o.services) {
                services_at = Some(t0.elapsed());
            }
            if policy_at.is_none()
                && !server.probe(&pod_c, pod_b.ip, probe::DROP_WAIT)
                && !server.probe(&pod_c, pod_b.ip, probe::DROP_WAIT)
                && server.probe(&pod_a, pod_b.ip, PASS_WAIT)
            {
                policy_at = Some(t0.elapsed());
            }
            std::thread::sleep(SYNC_POLL);
        }
        perf.stop();
        let (peers_at, routes_at, policy_at) = (peers_at.unwrap(), routes_at.unwrap(), policy_at.unwrap());
        let services_at = services_at.unwrap();
        let sync = peers_at.max(routes_at).max(policy_at).max(services_at);
        let hwm_sync = status_kb(pid, "VmHWM:").unwrap_or(0);
        let cpu_sync = cpu_seconds(pid);
        let waited_sync = CpuReading::take(pid).runqueue_ns as f64 / 1e9;
        let standin_cpu = cpu_seconds(std::process::id()) - standin_cpu0;
        eprintln!("  synced in {:.0} ms (peers {:.0}, routes {:.0}, policy {:.0}, services {:.0}); VmHWM {:.1} MB; agent CPU {:.2} s, waiting for a CPU {:.2} s; load {}",
            ms(sync), ms(peers_at), ms(routes_at), ms(policy_at), ms(services_at), hwm_sync as f64 / 1024.0, cpu_sync, waited_sync, loadavg());
        report.set("sync_ms", ms(sync));
        report.set("peers_ms", ms(peers_at));
        report.set("routes_ms", ms(routes_at));
        report.set("policy_ms", ms(policy_at));
        report.set("services_ms", ms(services_at));
        report.set("sync_cpu_s", (cpu_sync * 100.0).round() / 100.0);
        // Runnable but waiting for a CPU (threads still alive at the end of the sync): the
        // rest of sync_ms, beyond this and sync_cpu_s, the agent waited on the API.
        report.set("sync_runqueue_wait_s", (waited_sync * 100.0).round() / 100.0);
        report.set("rss_after_sync_mb", (hwm_sync as f64 / 102.4).round() / 10.0);
        // This process during the sync: the stand-in serving the lists, and the polls above.
        report.set("driver_sync_cpu_s", (standin_cpu * 100.0).round() / 100.0);
        eprintln!("  this process (the stand-in, the polls) during the sync: CPU {standin_cpu:.2} s");
        if o.sync_only {
            report.set("peak_rss_mb", (hwm_sync as f64 / 102.4).round() / 10.0);
            report.set("load_average_end", loadavg());
            report.set("agent", o.kwire.display().to_string());
            let _ = agent.stop();
            drop((pod_a, pod_b, pod_c));
            rt.block_on(api.stop());
            return;
        }

        // State-file writes from here on (the figures below say per phase).
        let writes = StateWrites::watch(state.join(kwire::agent::state::STATE_FILE));

        // (a2) start-up handshakes. The device greets every peer (paced: INITIATIONS_PER_SECOND)
        // and boringtun retries each unanswered greeting every 5 s for 90 s. The synthetic
        // peers never answer, so for minutes after the sync the agent computes ~18 initiations
        // per peer: load no watch event causes (in a real cluster a peer answers the first one).
        // It is measured here, and the per-event figures below start once it is over (no
        // initiation bytes sent for HANDSHAKE_QUIET), so that the idle baseline they subtract
        // is steady.
        let cpu_hs = CpuReading::take(pid);
        let hs0 = Instant::now();
        let deadline = Duration::from_secs(o.nodes as u64 / 50 + 90 + 60);
        let (mut last_tx, mut quiet_since) = (u64::MAX, Instant::now());
        loop {
            let tx: u64 = uapi_get(&sock)
                .map(|r| r.lines().filter_map(|l| l.strip_prefix("tx_bytes=")?.parse::<u64>().ok()).sum())
                .unwrap_or(0);
            if tx != last_tx {
                (last_tx, quiet_since) = (tx, Instant::now());
            } else if quiet_since.elapsed() >= HANDSHAKE_QUIET {
                break;
            }
            assert!(hs0.elapsed() < deadline, "the device still sends to the synthetic peers after {deadline:?}; log {}", log.display());
            std::thread::sleep(Duration::from_secs(1));
        }
        // The health monitor then reports each unanswering peer once (`--peer-unreachable-after`,
        // 120 s after its first unanswered initiation): a PeerUnreachable Event on its Node,
        // one Node get and one Event create per peer, also load no watch event causes.
        let events = ApiServer::kind("events.k8s.io/v1", "Event").expect("the Event kind");
        let unreachable = || {
            api.list(events, None).map_or(0, |l| l.iter().filter(|e| e["reason"] == "PeerUnreachable").count())
        };
        loop {
            let n = unreachable();
            if n >= o.nodes {
                break;
            }
            if hs0.elapsed() > deadline + Duration::from_secs(120) {
                eprintln!("  warning: {n} PeerUnreachable Events of {} expected; measuring anyway", o.nodes);
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let hs_wall = hs0.elapsed();
        let hs_cpu = CpuReading::take(pid).since(&cpu_hs) / hs0.elapsed().as_secs_f64();
        eprintln!("  start-up handshakes with {} unanswering peers and their PeerUnreachable Events: over after {:.0} s, {:.4} cores meanwhile", o.nodes, hs_wall.as_secs_f64(), hs_cpu);
        report.set("startup_handshakes_s", hs_wall.as_secs_f64().round());
        report.set("startup_handshake_cpu_cores", (hs_cpu * 1e4).round() / 1e4);

        // (b) idle baseline.
        std::thread::sleep(SETTLE);
        let perf = Perf::start(pid, "idle");
        let mut idle_rates: Vec<f64> = (0..IDLE_WINDOWS)
            .map(|_| {
                let (cpu0, w0) = (CpuReading::take(pid), Instant::now());
                std::thread::sleep(IDLE_WINDOW);
                CpuReading::take(pid).since(&cpu0) / w0.elapsed().as_secs_f64()
            })
            .collect();
        perf.stop();
        eprintln!("  idle, {IDLE_WINDOWS} windows of {IDLE_WINDOW:?}: {:?} cores; the median is the baseline",
            idle_rates.iter().map(|r| (r * 1e4).round() / 1e4).collect::<Vec<_>>());
        idle_rates.sort_by(f64::total_cmp);
        let idle_rate = idle_rates[IDLE_WINDOWS / 2];
        report.set("idle_cpu_cores", (idle_rate * 1e4).round() / 1e4);
        let writes_before = writes.get();
        let net_us = |cpu: f64, wall: Duration, n: usize| ((cpu - idle_rate * wall.as_secs_f64()).max(0.0) / n.max(1) as f64 * 1e6 * 10.0).round() / 10.0;

        // (c) irrelevant updates: heartbeats and annotations kwire does not read.
        // Fences (see `fenced`): pod a relabeled and back, each waited for in its traffic to
        // pod b; a Node's new endpoint, waited for in the device.
        let pod_kind = cluster.kinds.pod;
        let mut pod_fence = |_: &mut Cluster| {
            for role in ["paused", "client"] {
                let t = Instant::now();
                api.merge_patch(pod_kind, Some(BENCH_NS), "a", &json!({"metadata": {"labels": {"role": role}}}), false).expect("relabel");
                assert!(server.until(&pod_a, pod_b.ip, role == "client", t, CHANGE_TIMEOUT).is_some(), "the Pod fence ({role}) not in the data plane after {CHANGE_TIMEOUT:?}; log {}", log.display());
            }
        };
        let mut node_fence = |cluster: &mut Cluster| {
            let i = 1 + cluster.rand(o.nodes);
            let ep = cluster.node_new_endpoint(i);
            let hex = key_hex(&cluster.nodes[i].key);
            let t = Instant::now();
            // Polled slowly: each look is agent CPU the fence costs.
            while uapi_get_peer(&sock, &hex).and_then(|r| endpoint_of(&r, &hex)).as_deref() != Some(ep.as_str()) {
                assert!(t.elapsed() < CHANGE_TIMEOUT, "the Node fence not in the data plane after {CHANGE_TIMEOUT:?}; log {}", log.display());
                std::thread::sleep(FENCE_POLL);
            }
        };
        // One Pod fence first, outside the window: it saves the policy inputs at once and puts
        // their writer into its pause (~40 s at the goal size), so the write the fences cause
        // falls after the windows. (The Node fence's peer-state write waits on its own.)
        let fence_at = std::time::SystemTime::now();
        pod_fence(&mut cluster);
        // That write runs for tens of milliseconds after the fence (54 ms at the goal size) on
        // the agent's blocking pool; the window starts once it is over, not during it.
        wait_written(&state, kwire::agent::policy_state::POLICY_STATE_FILE, fence_at, POLICY_WRITE_WAIT);
        let half = o.irrelevant / 2;
        // State-file writes while the updates are made (the fences' own changes excluded: the
        // Node fence's new endpoint is written at once, being the first change in a while).
        let (mut pod_writes, mut node_writes) = (0, 0);
        let probes = || probe::PROBES.load(std::sync::atomic::Ordering::Relaxed);
        let probes0 = probes();
        let perf = Perf::start(pid, "irrelevant_pods");
        let (cpu, wall) = fenced(pid, half, IRRELEVANT_RATE, &mut cluster, |cluster, i| {
            let p = cluster.remote_pod();
            if i % 2 == 0 { cluster.pod_heartbeat(p) } else { cluster.pod_annotation(p) }
        }, |c| {
            pod_writes = writes.get() - writes_before;
            pod_fence(c)
        });
        perf.stop();
        let window_probes = probes() - probes0;
        let perf = Perf::start(pid, "irrelevant_nodes");
        let node_writes_before = writes.get();
        let (cpu2, wall2) = fenced(pid, half, IRRELEVANT_RATE, &mut cluster, |cluster, i| {
            let n = 1 + cluster.rand(o.nodes);
            if i % 2 == 0 { cluster.node_heartbeat(n) } else { cluster.node_annotation(n) }
        }, |c| {
            node_writes = writes.get() - node_writes_before;
            node_fence(c)
        });
        perf.stop();
        // Nothing the state file holds changed: no write is due (one may still be pending from
        // the sync, at most STATE_SAVE_INTERVAL after it).
        let irrelevant_writes = pod_writes + node_writes;
        report.set("state_writes_irrelevant", irrelevant_writes);
        // What a fence costs on its own (median of three, idle subtracted), taken off its phase.
        // Each alone as in its window: after more than STATE_SAVE_INTERVAL without a change, so
        // that the Node fence's state-file write happens at once, inside it, as it did there.
        let fence_cost = |fence: &mut dyn FnMut(&mut Cluster), cluster: &mut Cluster| {
            let mut v: Vec<f64> = (0..3)
                .map(|_| {
                    std::thread::sleep(kwire::agent::STATE_SAVE_INTERVAL + SETTLE);
                    let (c0, t0) = (CpuReading::take(pid), Instant::now());
                    fence(cluster);
                    (CpuReading::take(pid).since(&c0) - idle_rate * t0.elapsed().as_secs_f64()).max(0.0)
                })
                .collect();
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let probes0 = probes();
        let pod_fence_cpu = fence_cost(&mut pod_fence, &mut cluster);
        let alone_probes = (probes() - probes0) / 3;
        let node_fence_cpu = fence_cost(&mut node_fence, &mut cluster);
        report.set("fence_pod_cpu_ms", (pod_fence_cpu * 1e4).round() / 10.0);
        report.set("fence_node_cpu_ms", (node_fence_cpu * 1e4).round() / 10.0);
        eprintln!("  fences alone: Pod {:.2} ms, Node {:.2} ms agent CPU (measured after the phases, taken off them)", pod_fence_cpu * 1e3, node_fence_cpu * 1e3);
        // The Pod fence's probes are new flows through the agent. In the window it waits out a
        // watch turn and sends more than alone; what the extra probes cost is not taken off
        // (paced, tens of them: about a microsecond per update).
        eprintln!("  Pod fence probes: {window_probes} in its window, {alone_probes} alone");
        report.set("fence_pod_probes_window", window_probes);
        report.set("fence_pod_probes_alone", alone_probes);
        let (cpu, cpu2) = (cpu - pod_fence_cpu, cpu2 - node_fence_cpu);
        let pod_us = net_us(cpu, wall, half);
        let node_us = net_us(cpu2, wall2, half);
        let all_us = net_us(cpu + cpu2, wall + wall2, 2 * half);
        eprintln!("  irrelevant updates: {all_us} µs agent CPU each (pods {pod_us}, nodes {node_us}); idle {:.4} cores", idle_rate);
        report.set("irrelevant_update_cpu_us", all_us);
        report.set("irrelevant_pod_update_cpu_us", pod_us);
        report.set("irrelevant_node_update_cpu_us", node_us);

        // (d) relevant changes to the data plane, polled.
        let mut lat: Vec<(&str, Duration)> = Vec::new();
        // Node changes are seen through a `get=1` of that peer (`uapi_get_peer`): each get's
        // own time, and when the first get that saw the change was asked (the change was in
        // by that get's answer and not by the one before's: within a get's time of this).
        let mut node_gets: Vec<Duration> = Vec::new();
        let mut node_asked: Vec<Duration> = Vec::new();
        let probe_kinds = ["policy_deleted", "policy_created", "pod_relabeled", "pod_labels_restored", "node_endpoint", "node_key"];
        for c in 0..o.changes {
            let kind = probe_kinds[c % probe_kinds.len()];
            let t = Instant::now();
            let took = match kind {
                "policy_deleted" => {
                    api.delete(cluster.kinds.policy, Some(BENCH_NS), "allow-clients").expect("delete policy");
                    server.until(&pod_a, pod_b.ip, false, t, CHANGE_TIMEOUT)
                }
                "policy_created" => {
                    api.create(allow.clone()).expect("create policy");
                    server.until(&pod_a, pod_b.ip, true, t, CHANGE_TIMEOUT)
                }
                "pod_relabeled" | "pod_labels_restored" => {
                    let role = if kind == "pod_relabeled" { "paused" } else { "client" };
                    api.merge_patch(cluster.kinds.pod, Some(BENCH_NS), "a", &json!({"metadata": {"labels": {"role": role}}}), false).expect("relabel");
                    server.until(&pod_a, pod_b.ip, role == "client", t, CHANGE_TIMEOUT)
                }
                "node_endpoint" | "node_key" => {
                    let i = 1 + (c * 37 + 11) % o.nodes;
                    let t = Instant::now();
                    let (hex, want) = if kind == "node_endpoint" {
                        let ep = cluster.node_new_endpoint(i);
                        (key_hex(&cluster.nodes[i].key), Some(ep))
                    } else {
                        (key_hex(&cluster.node_new_key(i)), None)
                    };
                    loop {
                        let asked = Instant::now();
                        let seen = uapi_get_peer(&sock, &hex).and_then(|r| endpoint_of(&r, &hex));
                        node_gets.push(asked.elapsed());
                        let done = match &want { Some(ep) => seen.as_deref() == Some(ep.as_str()), None => seen.is_some() };
                        if done {
                            node_asked.push(asked - t);
                            break Some(t.elapsed());
                        }
                        if t.elapsed() > CHANGE_TIMEOUT { break None; }
                        std::thread::sleep(CHANGE_POLL);
                    }
                }
                _ => unreachable!(),
            };
            let took = took.unwrap_or_else(|| panic!("change {c} ({kind}) not in the data plane after {CHANGE_TIMEOUT:?}; log {}", log.display()));
            lat.push((kind, took));
            std::thread::sleep(jittered(CHANGE_GAP, &mut cluster.rng));
        }
        let mut all: Vec<Duration> = lat.iter().map(|(_, d)| *d).collect();
        all.sort();
        let mut by_kind = serde_json::Map::new();
        for k in probe_kinds {
            let mut v: Vec<Duration> = lat.iter().filter(|(n, _)| *n == k).map(|(_, d)| *d).collect();
            v.sort();
            by_kind.insert(k.into(), json!({"p50_ms": ms(percentile(&v, 0.5)), "p99_ms": ms(percentile(&v, 0.99)), "n": v.len()}));
        }
        eprintln!("  relevant change → data plane: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes)",
            ms(percentile(&all, 0.5)), ms(percentile(&all, 0.99)), ms(all.last().copied().unwrap_or_default()), all.len());
        report.set("relevant_change_p50_ms", ms(percentile(&all, 0.5)));
        report.set("relevant_change_p99_ms", ms(percentile(&all, 0.99)));
        report.set("relevant_change_max_ms", ms(all.last().copied().unwrap_or_default()));
        report.set("relevant_change_by_kind", Value::Object(by_kind));
        node_gets.sort();
        node_asked.sort();
        eprintln!("  Node changes: the get that saw each asked after p50 {:.1} ms, p99 {:.1} ms; a get takes p50 {:.1} ms, p99 {:.1} ms",
            ms(percentile(&node_asked, 0.5)), ms(percentile(&node_asked, 0.99)), ms(percentile(&node_gets, 0.5)), ms(percentile(&node_gets, 0.99)));
        report.set("node_change_seen_asked_p50_ms", ms(percentile(&node_asked, 0.5)));
        report.set("node_change_seen_asked_p99_ms", ms(percentile(&node_asked, 0.99)));
        report.set("node_probe_get_p50_ms", ms(percentile(&node_gets, 0.5)));
        report.set("node_probe_get_p99_ms", ms(percentile(&node_gets, 0.99)));

        // (e) relevant changes, CPU only (no polling).
        let perf = Perf::start(pid, "relevant");
        let mut local_paused = false;
        let (cpu, wall) = paced(pid, o.changes, RELEVANT_RATE, |i| match i % 6 {
            0 => { let p = cluster.remote_pod(); cluster.relabel_pod(p) }
            1 => { let p = cluster.remote_pod(); cluster.readdress_pod(p) }
            2 => { let n = cluster.rand(o.namespaces); let k = cluster.rand(o.policies / o.namespaces.max(1)); cluster.change_policy(n, k) }
            3 => { let n = 1 + cluster.rand(o.nodes); cluster.node_new_key(n); }
            4 => { let n = 1 + cluster.rand(o.nodes); cluster.node_new_endpoint(n); }
            _ => {
                local_paused = !local_paused;
                let role = if local_paused { "paused" } else { "client" };
                api.merge_patch(cluster.kinds.pod, Some(BENCH_NS), "a", &json!({"metadata": {"labels": {"role": role}}}), false).expect("relabel");
            }
        });
        perf.stop();
        let relevant_end = std::time::SystemTime::now();
        let mut services_end = relevant_end;
        let relevant_ms = net_us(cpu, wall, o.changes) / 1000.0;
        eprintln!("  relevant change: {:.3} ms agent CPU each", relevant_ms);
        report.set("relevant_change_cpu_ms", (relevant_ms * 1000.0).round() / 1000.0);

        // (e2) Service endpoint changes, CPU only: one endpoint of one EndpointSlice replaced by
        // another pod's address (a rollout's step), as the EndpointSlice controller writes it.
        if o.services > 0 {
            let perf = Perf::start(pid, "services");
            let (cpu, wall) = paced(pid, o.changes, SERVICE_CHANGE_RATE, |i| {
                let s = cluster.rand(o.services);
                let eps: Vec<String> = (0..10).map(|e| cluster.pods[(s * 10 + e + i + 1) % cluster.pods.len()].ip.clone()).collect();
                let (_, slice) = synth::service(s % o.namespaces, s, &eps);
                let name = slice["metadata"]["name"].as_str().expect("slice name").to_string();
                let ns_name = slice["metadata"]["namespace"].as_str().expect("slice namespace").to_string();
                api.merge_patch(cluster.kinds.slice, Some(&ns_name), &name, &json!({"endpoints": slice["endpoints"]}), false).expect("EndpointSlice patch");
            });
            perf.stop();
            services_end = std::time::SystemTime::now();
            let per = net_us(cpu, wall, o.changes) / 1000.0;
            eprintln!("  EndpointSlice change: {per:.3} ms agent CPU each ({} Services)", o.services);
            report.set("service_change_cpu_ms", (per * 1000.0).round() / 1000.0);
        }

        // (e3) Service and EndpointSlice updates the table does not read: another controller's
        // annotation on a Service, the EndpointSlice controller's trigger time on a slice. No
        // rebuild is due; the agent logs each one it makes.
        if o.services > 0 {
            // The changes of (d) and (e2) are saved after their writers' pauses (up to a minute
            // at the goal size): the window starts once the files hold them, not while one is
            // written. A file last written well after the last change to it holds it already.
            let files = [
                (kwire::agent::state::STATE_FILE, relevant_end),
                (kwire::agent::policy_state::POLICY_STATE_FILE, relevant_end),
                (kwire::agent::service_state::SERVICE_STATE_FILE, services_end),
            ];
            for (file, changed) in files {
                wait_written(&state, file, changed + SAVED_AFTER, SAVED_WAIT);
            }
            let service_kind = ApiServer::kind("v1", "Service").expect("the Service kind");
            let rebuilds = || std::fs::read_to_string(&log).map_or(0, |l| l.matches("service table swapped in").count());
            let before = rebuilds();
            let perf = Perf::start(pid, "irrelevant_services");
            let half = o.irrelevant / 2;
            let (cpu, wall) = paced(pid, half, IRRELEVANT_RATE, |i| {
                let s = cluster.rand(o.services);
                let (svc, slice) = synth::service(s % o.namespaces, s, &[]);
                let stamp = format!("2025-01-02T00:{:02}:{:02}Z", i / 60 % 60, i % 60);
                let (kind, obj, key) = if i % 2 == 0 {
                    (service_kind, &svc, "example.com/deployed-at")
                } else {
                    (cluster.kinds.slice, &slice, "endpoints.kubernetes.io/last-change-trigger-time")
                };
                let (ns_name, name) = (obj["metadata"]["namespace"].as_str().expect("namespace"), obj["metadata"]["name"].as_str().expect("name"));
                api.merge_patch(kind, Some(ns_name), name, &json!({"metadata": {"annotations": {key: stamp}}}), false)
                    .unwrap_or_else(|e| panic!("annotating {ns_name}/{name}: {e:?}"));
            });
            perf.stop();
            let n = rebuilds() - before;
            let per = net_us(cpu, wall, half);
            eprintln!("  irrelevant Service/EndpointSlice updates: {per} µs agent CPU each, {n} service table rebuilds");
            report.set("irrelevant_service_update_cpu_us", per);
            report.set("service_rebuilds_irrelevant", n);
        }

        // (f) churn: 100 Pod events/s and 20 Node events/s.
        let secs = o.churn_secs as f64;
        let pod_events = (CHURN_POD_EVENTS_PER_S * secs) as usize;
        let node_every = (CHURN_POD_EVENTS_PER_S / CHURN_NODE_EVENTS_PER_S) as usize;
        let mut churn = Churn::default();
        let perf = Perf::start(pid, "churn");
        let writes_before = writes.get();
        let (cpu, wall) = paced(pid, pod_events, CHURN_POD_EVENTS_PER_S, |i| cluster.churn_event(i, node_every, &mut churn));
        perf.stop();
        let churn_writes = writes.get() - writes_before;
        let churn_cores = cpu / wall.as_secs_f64();
        let node_events = churn.node_events;
        eprintln!("  churn ({:.0} Pod + {:.0} Node events/s for {:.0} s): {:.4} cores", pod_events as f64 / wall.as_secs_f64(), node_events as f64 / wall.as_secs_f64(), wall.as_secs_f64(), churn_cores);
        report.set("churn_cpu_cores", (churn_cores * 1e4).round() / 1e4);
        report.set("churn_pod_events_per_s", (pod_events as f64 / wall.as_secs_f64()).round());
        report.set("churn_node_events_per_s", (node_events as f64 / wall.as_secs_f64()).round());
        report.set("state_writes_churn", churn_writes);
        report.set("state_writes_churn_events", pod_events + node_events);
        report.set("state_writes_churn_s", (wall.as_secs_f64() * 10.0).round() / 10.0);
        eprintln!("  state file: {irrelevant_writes} writes during the irrelevant updates, {churn_writes} during churn ({} events, {:.0} s)", pod_events + node_events, wall.as_secs_f64());

        // (g) relevant changes under churn: the same mix again while another thread relabels
        // local pod a back and forth and times each relabel to its effect in the data plane,
        // as (d) does on a quiet cluster. Here the watch threads are busy: a change that
        // comes while one sleeps its turn (`--watch-turn`) waits for the turn's end.
        let pod_kind = cluster.kinds.pod;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let under = std::thread::scope(|s| {
            let prober = s.spawn(|| {
                let mut lat = Vec::new();
                let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || lat.len() % 2 == 1 {
                    let role = if lat.len() % 2 == 0 { "paused" } else { "client" };
                    let t = Instant::now();
                    api.merge_patch(pod_kind, Some(BENCH_NS), "a", &json!({"metadata": {"labels": {"role": role}}}), false).expect("relabel");
                    let took = server.until(&pod_a, pod_b.ip, role == "client", t, CHANGE_TIMEOUT);
                    lat.push(took.unwrap_or_else(|| panic!("a relabel under churn ({role}) not in the data plane after {CHANGE_TIMEOUT:?}; log {}", log.display())));
                    std::thread::sleep(jittered(UNDER_CHURN_GAP, &mut rng));
                }
                lat
            });
            paced(pid, pod_events, CHURN_POD_EVENTS_PER_S, |i| cluster.churn_event(i, node_every, &mut churn));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            prober.join().expect("the prober thread")
        });
        let mut under = under;
        under.sort();
        eprintln!("  relevant change under churn → data plane: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} relabels)",
            ms(percentile(&under, 0.5)), ms(percentile(&under, 0.99)), ms(under.last().copied().unwrap_or_default()), under.len());
        report.set("relevant_change_under_churn_p50_ms", ms(percentile(&under, 0.5)));
        report.set("relevant_change_under_churn_p99_ms", ms(percentile(&under, 0.99)));
        report.set("relevant_change_under_churn_n", under.len());

        let hwm = status_kb(pid, "VmHWM:").unwrap_or(0);
        let rss = status_kb(pid, "VmRSS:").unwrap_or(0);
        let cpu_total = cpu_seconds(pid);
        assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
        let (st, killed) = agent.stop();
        report.set("peak_rss_mb", (hwm as f64 / 102.4).round() / 10.0);
        report.set("rss_end_mb", (rss as f64 / 102.4).round() / 10.0);
        report.set("agent_cpu_total_s", (cpu_total * 100.0).round() / 100.0);
        report.set("load_average_end", loadavg());
        report.set("agent", o.kwire.display().to_string());
        eprintln!("  peak RSS {:.1} MB; agent CPU {:.2} s in all; exit {st:?}{}", hwm as f64 / 1024.0, cpu_total, if killed { " (SIGKILLed)" } else { "" });
        if std::env::var_os("KWIRE_BENCH_KEEP_LOG").is_some() {
            let keep = std::env::temp_dir().join("kwire-agent-scale.log");
            let _ = std::fs::copy(&log, &keep);
            eprintln!("  agent log kept at {}", keep.display());
        }
        drop((pod_a, pod_b, pod_c));
        rt.block_on(api.stop());
    });

    let r = &report.out;
    if o.json || o.sync_only {
        println!("{}", Value::Object(report.out.clone()));
        return;
    }
    let num = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let goal = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "kwire agent scale: {} Nodes, {} Pods, {} Namespaces, {} NetworkPolicies",
        r["nodes"], r["pods"], r["namespaces"], r["policies"]
    );
    println!(
        "  start → complete data plane     {:>9.1} ms   (goal < 10 s: {})",
        num("sync_ms"),
        goal(num("sync_ms") < 10_000.0)
    );
    println!(
        "  peak RSS                        {:>9.1} MB   (goal < 300 MB: {})",
        num("peak_rss_mb"),
        goal(num("peak_rss_mb") < 300.0)
    );
    println!("  irrelevant update, agent CPU    {:>9.1} µs   (goal < 50 µs: {}); pods {} µs, nodes {} µs",
        num("irrelevant_update_cpu_us"), goal(num("irrelevant_update_cpu_us") < 50.0), r["irrelevant_pod_update_cpu_us"], r["irrelevant_node_update_cpu_us"]);
    println!(
        "  relevant change → data plane p99 {:>8.1} ms   (goal < 100 ms: {})",
        num("relevant_change_p99_ms"),
        goal(num("relevant_change_p99_ms") < 100.0)
    );
    println!(
        "  relevant change, agent CPU      {:>9.3} ms   (goal < 5 ms: {})",
        num("relevant_change_cpu_ms"),
        goal(num("relevant_change_cpu_ms") < 5.0)
    );
    println!(
        "  churn, agent CPU                {:>9.4} cores (goal < 0.05: {}); idle {} cores",
        num("churn_cpu_cores"),
        goal(num("churn_cpu_cores") < 0.05),
        r["idle_cpu_cores"]
    );
}
