//! Restart without a gap, for traffic that flows one way (issue 16): a pod on node 2 sends
//! 1,000 numbered UDP datagrams a second to a pod on node 1, nothing comes back. The agent of
//! the receiving node, then of the sending node, then both, are killed (SIGKILL; the lab's
//! supervisor restarts them as the kubelet would), and then stopped gracefully (SIGTERM, what
//! a DaemonSet rollout sends). Each time the largest hole in the stream (the longest time
//! between two datagrams the receiver got) is printed in ms and must stay under a second, and
//! the underlay carries nothing but WireGuard.
//!
//! Before the fix the restarted receiving agent knew no session, the sender kept encrypting
//! with the one it had, and the stream stopped until the sender's rekey timers ran (9.5 s).
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kwire_tests::lab::{assert_only_wireguard, BridgeCapture, Json, JsonExt, Lab};
use kwire_tests::{prometheus_value, require_agent, require_tool, run_in_netns, wait_until};
use kwire_tests::{try_wait_until, Scratch};
use nix::sys::signal::Signal;

/// `up` (mesh and pods) must finish within this.
const UP_TIMEOUT_SECS: &str = "40";
/// The supervisor restarts a dead agent and the new one serves CNI within this (a debug
/// build on two shared cores).
const RESTART: Duration = Duration::from_secs(25);
/// Datagrams per second, one per millisecond.
const RATE: u64 = 1000;
/// Port of the receiver inside its pod.
const PORT: u16 = 9100;
/// Every datagram starts with this, then the sequence number: if it shows up on the underlay,
/// pod traffic left in plaintext.
const MARKER: &[u8] = b"kwire-gap-probe:";
/// The largest hole allowed (the bound).
const MAX_HOLE: Duration = Duration::from_secs(1);
/// After a restart the stream must run this long again before the hole is measured.
const RESUMED_FOR: Duration = Duration::from_secs(2);
/// An agent that ran this long is restarted by the lab's supervisor after its shortest pause
/// (`kwire-lab`'s RESTART_BACKOFF_RESET, with a margin).
const BACKOFF_RESET: Duration = Duration::from_millis(10_500);
/// What the underlay may carry besides WireGuard: link control and the agents' API calls.
const UNDERLAY_FILTER: &str = "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))";
const METRICS_URL: &str = "http://127.0.0.1:9742/metrics";

/// Arrivals at the receiver: (when, sequence number).
type Arrivals = Arc<Mutex<Vec<(Instant, u64)>>>;

/// A thread that receives the stream in a pod's namespace and records each arrival.
struct Receiver {
    arrivals: Arrivals,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(netns: &str, ip: &str) -> Receiver {
        let sock = run_in_netns(netns, || UdpSocket::bind((ip, PORT)))
            .unwrap_or_else(|e| panic!("bind {ip}:{PORT} in {netns}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let arrivals: Arrivals = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let Some(seq) = buf[..n]
                    .strip_prefix(MARKER)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                else {
                    continue;
                };
                a.lock().unwrap().push((Instant::now(), seq));
            }
        });
        Receiver {
            arrivals,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received since `t`.
    fn count_since(&self, t: Instant) -> usize {
        let a = self.arrivals.lock().unwrap();
        a.iter().rev().take_while(|(at, _)| *at >= t).count()
    }

    /// The largest hole among arrivals from `from` on (the arrival before `from` included,
    /// so that a stream that stops right at `from` counts): the longest time between two
    /// consecutive arrivals, and the sequence numbers missing across it.
    fn largest_hole(&self, from: Instant) -> (Duration, u64) {
        let a = self.arrivals.lock().unwrap();
        let start = a.partition_point(|(at, _)| *at < from).saturating_sub(1);
        a[start..]
            .windows(2)
            .map(|w| {
                (
                    w[1].0.duration_since(w[0].0),
                    w[1].1.saturating_sub(w[0].1 + 1),
                )
            })
            .max_by_key(|(d, _)| *d)
            .unwrap_or_default()
    }

    /// When the first datagram after the largest hole since `from` arrived.
    fn resumed_after(&self, from: Instant, hole: Duration) -> Option<Instant> {
        let a = self.arrivals.lock().unwrap();
        let start = a.partition_point(|(at, _)| *at < from).saturating_sub(1);
        a[start..]
            .windows(2)
            .find(|w| w[1].0.duration_since(w[0].0) == hole)
            .map(|w| w[1].0)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread that sends [`RATE`] numbered datagrams a second from a pod's namespace.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Sender {
    fn start(netns: &str, to: SocketAddr) -> Sender {
        let sock = run_in_netns(netns, || UdpSocket::bind("0.0.0.0:0"))
            .unwrap_or_else(|e| panic!("bind in {netns}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            let mut msg = MARKER.to_vec();
            msg.extend_from_slice(&[0; 8]);
            while !s.load(Ordering::Relaxed) {
                // Pacing, not waiting for a condition: datagram `seq` is due at seq ms.
                let due = start + Duration::from_micros(seq * 1_000_000 / RATE);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                msg[MARKER.len()..].copy_from_slice(&seq.to_be_bytes());
                // While the sending node's agent is down its tun refuses nothing: the
                // datagram waits or drops there. An error is not the test's concern.
                let _ = sock.send_to(&msg, to);
                seq += 1;
            }
            seq
        });
        Sender {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pod<'a>(st: &'a Json, name: &str) -> &'a Json {
    st["pods"]
        .array()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no pod {name} in status: {:?}", st["pods"]))
}

/// A node's `/metrics`, scraped inside its namespace.
fn metrics(lab: &Lab, node: &str) -> String {
    let o = lab.exec(node, &["curl", "-sf", "--max-time", "5", METRICS_URL]);
    assert!(o.status.success(), "GET {METRICS_URL} on {node}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// When process `pid` started, in seconds since boot (`/proc`, clock ticks of 10 ms).
fn started(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces), from the 3rd on; starttime is
    // the 22nd.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    after
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse::<f64>().ok())
        .map_or(f64::MAX, |t| t / 100.0)
}

/// Seconds since boot at `at` (the clock of `/proc`'s start times).
fn uptime_at(at: Instant) -> f64 {
    let now = Instant::now();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    uptime - now.saturating_duration_since(at).as_secs_f64()
}

/// `at` in seconds since the Unix epoch: the clock of the agents' and the supervisor's log
/// lines, to find the hole in them.
fn unix_secs(at: Instant) -> f64 {
    let back = Instant::now().saturating_duration_since(at);
    (std::time::SystemTime::now() - back)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Copies the agents' logs and the supervisor's into `scratch` (the lab's directory goes with
/// `down`; the scratch directory stays when the test fails or KWIRE_KEEP_SCRATCH is set).
fn keep_logs(lab: &Lab, scratch: &Scratch) {
    let nodes = std::fs::read_dir(lab.dir().join("nodes"))
        .into_iter()
        .flatten();
    for n in nodes.flatten() {
        let name = format!("agent-{}.log", n.file_name().to_string_lossy());
        let _ = std::fs::copy(n.path().join("agent.log"), scratch.file(&name));
    }
    let _ = std::fs::copy(
        lab.dir().join("supervisor.log"),
        scratch.file("supervisor.log"),
    );
}

/// How long process `pid` has run.
fn age(pid: i32) -> Duration {
    Duration::from_secs_f64((uptime_at(Instant::now()) - started(pid)).max(0.0))
}

/// Signals the agents of `nodes`, waits until the stream ran [`RESUMED_FOR`] again, and
/// returns the largest hole since just before the signal.
fn hole_across(
    lab: &Lab,
    scratch: &Scratch,
    rx: &Receiver,
    nodes: &[&str],
    signal: Signal,
    what: &str,
) -> Duration {
    // The supervisor, like the kubelet, restarts an agent that exits soon after its start
    // later and later; one that ran RESTART_BACKOFF_RESET is restarted after the shortest
    // pause (500 ms), which is what each phase measures.
    for n in nodes {
        let (pid, _) = lab.agent(n);
        wait_until(
            BACKOFF_RESET + Duration::from_secs(5),
            format!("agent {pid} of {n} ran {BACKOFF_RESET:?}"),
            || age(pid) >= BACKOFF_RESET,
        );
    }
    // The stream flows before the signal.
    let t = Instant::now();
    wait_until(Duration::from_secs(10), "the stream flows", || {
        rx.count_since(t) >= 200
    });
    let from = Instant::now();
    lab.signal_agents(nodes, signal, RESTART);
    let want = (RESUMED_FOR.as_millis() as u64 * RATE / 1000) as usize;
    let resumed = try_wait_until(Duration::from_secs(60), || {
        let (hole, _) = rx.largest_hole(from);
        // Resumed: the datagrams of RESUMED_FOR arrived after the largest hole.
        rx.count_since(from + hole) >= want && hole > Duration::ZERO
    });
    let (hole, missing) = rx.largest_hole(from);
    // The part kwire answers for: from the start of the last new agent to the first datagram
    // after the hole (the rest is the supervisor's pause and the old agent's exit).
    let last_start = nodes
        .iter()
        .map(|n| started(lab.agent(n).0))
        .fold(0.0, f64::max);
    let back = rx.resumed_after(from, hole);
    let own = back.map(|b| ((uptime_at(b) - last_start) * 1000.0).round() as i64);
    eprintln!(
        "{what}: largest hole {} ms ({missing} datagrams missing across it); back {} ms after \
         the new agent started; signal at {:.3}, hole {} (Unix time, as in the logs){}",
        hole.as_millis(),
        own.map_or("?".to_string(), |m| m.to_string()),
        unix_secs(from),
        back.map_or("?".to_string(), |b| format!(
            "{:.3} to {:.3}",
            unix_secs(b - hole),
            unix_secs(b)
        )),
        if resumed {
            ""
        } else {
            "; the stream did not resume"
        }
    );
    keep_logs(lab, scratch);
    assert!(resumed, "{what}: the stream did not resume within 60 s");
    hole
}

#[test]
fn one_way_udp_survives_agent_restarts_with_a_hole_under_a_second() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("tcpdump");
    let scratch = Scratch::new("lab-gap");
    // The agents run from a copy, so that the binary can be swapped under them.
    let agent_bin = scratch.file("kwire");
    std::fs::copy(&kwire, &agent_bin).expect("copy the kwire binary");
    let lab = Lab::named();
    lab.cmd_ok(
        "up",
        &[
            "--nodes",
            "2",
            "--pods",
            "1",
            "--kwire",
            agent_bin.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    let n1 = format!("{}-n1", lab.name());
    let n2 = format!("{}-n2", lab.name());
    let st = lab.status();
    let netns = |p: &str| pod(&st, p)["netns"].as_str().unwrap().to_string();
    let ip1 = pod(&st, "pod-1-1")["ips"].strings()[0].clone();
    let rx = Receiver::start(&netns("pod-1-1"), &ip1);
    let tx = Sender::start(&netns("pod-2-1"), format!("{ip1}:{PORT}").parse().unwrap());
    let capture = BridgeCapture::start(&lab, &scratch, "underlay", UNDERLAY_FILTER);

    let mut holes = Vec::new();
    for (signal, how) in [
        (Signal::SIGKILL, "SIGKILL"),
        (Signal::SIGTERM, "SIGTERM and a new binary"),
    ] {
        if signal == Signal::SIGTERM {
            // An upgrade: a new file at the agents' path (a new inode, as an image update
            // brings), then SIGTERM as a DaemonSet rollout sends.
            let next = scratch.file("kwire.next");
            std::fs::copy(&kwire, &next).expect("copy the kwire binary");
            std::fs::rename(&next, &agent_bin).expect("swap the kwire binary");
        }
        for (nodes, whose) in [
            (vec![n1.as_str()], "the receiving node's agent"),
            (vec![n2.as_str()], "the sending node's agent"),
            (vec![n1.as_str(), n2.as_str()], "both agents"),
        ] {
            let what = format!("{how} of {whose}");
            holes.push((
                what.clone(),
                hole_across(&lab, &scratch, &rx, &nodes, signal, &what),
            ));
        }
    }
    let sent = tx.stop();
    let lines = capture.stop();
    let pcap = std::fs::read(scratch.file("underlay.pcap")).expect("the capture file");
    assert_only_wireguard(&lines, &pcap, MARKER);

    eprintln!("sent {sent} datagrams; largest holes:");
    for (what, hole) in &holes {
        eprintln!("  {what}: {} ms", hole.as_millis());
    }
    // The restarted agents said why they handshook: the receiving side's greeting or its
    // trigger, counted per peer.
    for node in [&n1, &n2] {
        let m = metrics(&lab, node);
        let other = if node == &n1 { &n2 } else { &n1 };
        for result in ["success", "timeout", "rejected"] {
            let series =
                format!("kwire_peer_handshakes_total{{node=\"{other}\",result=\"{result}\"}}");
            let v = prometheus_value(&m, &series);
            eprintln!("{node}: {series} = {v:?}");
            assert!(v.is_some(), "{node}: no {series}");
        }
    }
    let too_long: Vec<&(String, Duration)> = holes.iter().filter(|(_, h)| *h >= MAX_HOLE).collect();
    assert!(
        too_long.is_empty(),
        "holes of a second or more: {too_long:?}"
    );
}
