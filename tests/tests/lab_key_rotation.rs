//! Key rotation without dropping a packet, and revocation (issue 13), on a three-node lab.
//!
//! Between the pods of every pair of nodes a numbered UDP stream (1,000 datagrams a second)
//! and a TCP transfer (a checked byte pattern) run while node 1 rotates its key
//! (`kwire key rotate`), then while all three rotate at once. Afterwards: no datagram lost,
//! every TCP byte in order without a reset, nothing but WireGuard on the underlay, the old key
//! gone from the state directory and from every Node's annotations, and every peer's session
//! made with the new key. Then node 2's agent is killed (SIGKILL) right after its rotation
//! started: the restarted agent resumes it from disk and completes it. Last, node 3 revokes
//! its key (`kwire key revoke`): a wireguard-go process holding the revoked private key cannot
//! complete a handshake with any node within 5 s.
//!
//! Needs root; skips (with a message) when the kwire binary has no `agent`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kwire_tests::lab::{assert_only_wireguard, BridgeCapture, Json, JsonExt, Lab};
use kwire_tests::wireguard::{kwire_bin, Impl, WgDevice};
use kwire_tests::{
    require_agent, require_tool, run_host, run_in_netns, try_wait_until, wait_until,
};
use kwire_tests::{Netns, Scratch};
use nix::sys::signal::Signal;

const UP_TIMEOUT_SECS: &str = "60";
/// Datagrams per second of each UDP stream.
const RATE: u64 = 1000;
const UDP_PORT: u16 = 9200;
const TCP_PORT: u16 = 9201;
/// Every UDP datagram starts with this (then its number): seen on the underlay, it is a leak.
const MARKER: &[u8] = b"kwire-keyrot-probe:";
/// A rotation with every peer up completes by "every peer moved" long before the grace
/// period (2 minutes); this only bounds the wait.
const ROTATION: Duration = Duration::from_secs(60);
/// The supervisor restarts a killed agent within this.
const RESTART: Duration = Duration::from_secs(25);
/// What the underlay may carry besides WireGuard: link control and the agents' API calls.
const UNDERLAY_FILTER: &str = "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))";

/// A numbered UDP stream between two pods: which numbers arrived, how many were sent.
struct UdpStream {
    what: String,
    received: Arc<Mutex<BTreeSet<u64>>>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Set once the sender has stopped: `sent` is final.
    sender_done: Arc<AtomicBool>,
    /// The sender, then the receiver.
    threads: Vec<JoinHandle<()>>,
}

/// How long the receiver waits for datagrams still in flight after the sender stopped (a
/// deadline: it returns as soon as all have arrived).
const IN_FLIGHT: Duration = Duration::from_secs(10);

impl UdpStream {
    fn start(what: String, from_ns: &str, to_ns: &str, to_ip: &str, port: u16) -> UdpStream {
        let rx = run_in_netns(to_ns, || UdpSocket::bind((to_ip, port)))
            .unwrap_or_else(|e| panic!("bind {to_ip}:{port} in {to_ns}: {e}"));
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // Room for seconds of the stream: a receiving thread the shared machine pauses must
        // not be what loses datagrams.
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
            .expect("SO_RCVBUFFORCE");
        let tx = run_in_netns(from_ns, || UdpSocket::bind("0.0.0.0:0"))
            .unwrap_or_else(|e| panic!("bind in {from_ns}: {e}"));
        let to: SocketAddr = format!("{to_ip}:{port}").parse().unwrap();
        let received: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sender_done = Arc::new(AtomicBool::new(false));
        let (r, done, total) = (received.clone(), sender_done.clone(), sent.clone());
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Runs until the sender has stopped and every datagram it sent has arrived, or
            // IN_FLIGHT after it stopped: the last ones may sit in a loaded node's queues for
            // a while, and only those that never come are lost.
            let mut stopped_at: Option<Instant> = None;
            loop {
                if let Ok(n) = rx.recv(&mut buf) {
                    if let Some(seq) = buf[..n]
                        .strip_prefix(MARKER)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_be_bytes)
                    {
                        r.lock().unwrap().insert(seq);
                    }
                }
                if done.load(Ordering::Relaxed) {
                    let all = r.lock().unwrap().len() as u64 >= total.load(Ordering::Relaxed);
                    let since = *stopped_at.get_or_insert_with(Instant::now);
                    if all || since.elapsed() > IN_FLIGHT {
                        return;
                    }
                }
            }
        });
        let (n, s) = (sent.clone(), stop.clone());
        let sender = std::thread::spawn(move || {
            let start = Instant::now();
            let mut msg = MARKER.to_vec();
            msg.extend_from_slice(&[0; 8]);
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) {
                // Pacing, not waiting for a condition: datagram `seq` is due at seq ms.
                let due = start + Duration::from_micros(seq * 1_000_000 / RATE);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                msg[MARKER.len()..].copy_from_slice(&seq.to_be_bytes());
                if tx.send_to(&msg, to).is_ok() {
                    seq += 1;
                    n.store(seq, Ordering::Relaxed);
                }
            }
        });
        UdpStream {
            what,
            received,
            sent,
            stop,
            sender_done,
            threads: vec![sender, receiver],
        }
    }

    fn received(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Stops the sender, then the receiver once the sender's last datagram is in (or
    /// [`IN_FLIGHT`] passed): the count it compares with is final.
    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut threads = self.threads.drain(..);
        if let Some(sender) = threads.next() {
            let _ = sender.join();
        }
        self.sender_done.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Stops sending, waits for what is in flight; (sent, the numbers that never arrived).
    fn finish(mut self) -> (u64, Vec<u64>) {
        self.stop_threads();
        let sent = self.sent.load(Ordering::Relaxed);
        let got = self.received.lock().unwrap();
        let lost: Vec<u64> = (0..sent).filter(|s| !got.contains(s)).collect();
        (sent, lost)
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The byte at offset `i` of a TCP transfer.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

/// A TCP transfer between two pods: the client writes the pattern until stopped, the server
/// checks every byte. An error (a reset) on either side is recorded.
struct TcpTransfer {
    what: String,
    stop: Arc<AtomicBool>,
    client: Option<JoinHandle<Result<u64, String>>>,
    server: Option<JoinHandle<Result<u64, String>>>,
}

impl TcpTransfer {
    fn start(what: String, from_ns: &str, to_ns: &str, to_ip: &str, port: u16) -> TcpTransfer {
        let listener = run_in_netns(to_ns, || TcpListener::bind((to_ip, port)))
            .unwrap_or_else(|e| panic!("listen {to_ip}:{port} in {to_ns}: {e}"));
        let server = std::thread::spawn(move || -> Result<u64, String> {
            let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 65536];
            let mut at = 0u64;
            loop {
                let n = s
                    .read(&mut buf)
                    .map_err(|e| format!("read at byte {at}: {e}"))?;
                if n == 0 {
                    return Ok(at);
                }
                for b in &buf[..n] {
                    if *b != pattern(at) {
                        return Err(format!("byte {at} corrupted"));
                    }
                    at += 1;
                }
            }
        });
        let to: SocketAddr = format!("{to_ip}:{port}").parse().unwrap();
        let stream = run_in_netns(from_ns, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(10))
        })
        .unwrap_or_else(|e| panic!("connect to {to} from {from_ns}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let client = std::thread::spawn(move || -> Result<u64, String> {
            let mut stream = stream;
            let mut at = 0u64;
            let mut chunk = vec![0u8; 16384];
            while !s.load(Ordering::Relaxed) {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(at + i as u64);
                }
                stream
                    .write_all(&chunk)
                    .map_err(|e| format!("write at byte {at}: {e}"))?;
                at += chunk.len() as u64;
                // A steady transfer, not a flood: about 1.6 MB/s.
                std::thread::sleep(Duration::from_millis(10));
            }
            stream
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            Ok(at)
        });
        TcpTransfer {
            what,
            stop,
            client: Some(client),
            server: Some(server),
        }
    }

    /// Stops the client; (bytes written, bytes the server checked), or the first error.
    fn finish(mut self) -> Result<(u64, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let c = self
            .client
            .take()
            .unwrap()
            .join()
            .map_err(|_| "client panicked")??;
        let s = self
            .server
            .take()
            .unwrap()
            .join()
            .map_err(|_| "server panicked")??;
        Ok((c, s))
    }
}

impl Drop for TcpTransfer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Node {
    name: String,
    run_dir: PathBuf,
    state_dir: PathBuf,
    underlay_ip: String,
    pod_ns: String,
    pod_ip: String,
}

fn nodes(lab: &Lab) -> Vec<Node> {
    let st = lab.status();
    let pod = |name: &str| -> (String, String) {
        let p = st["pods"]
            .array()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no pod {name}"))
            .clone();
        (
            p["netns"].as_str().unwrap().to_string(),
            p["ips"].strings()[0].clone(),
        )
    };
    st["nodes"]
        .array()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (pod_ns, pod_ip) = pod(&format!("pod-{}-1", i + 1));
            Node {
                name: n["name"].as_str().unwrap().to_string(),
                run_dir: n["run_dir"].as_str().unwrap().into(),
                state_dir: n["state_dir"].as_str().unwrap().into(),
                underlay_ip: n["underlay_ip"].as_str().unwrap().to_string(),
                pod_ns,
                pod_ip,
            }
        })
        .collect()
}

/// `kwire ARGS... --run-dir RUN_DIR` against a node's agent.
fn kwire_at(n: &Node, args: &[&str]) -> std::process::Output {
    std::process::Command::new(kwire_bin())
        .args(args)
        .arg("--run-dir")
        .arg(&n.run_dir)
        .output()
        .expect("run kwire")
}

/// `kwire status --json` of a node's agent.
fn agent_status(n: &Node) -> Json {
    let out = kwire_at(n, &["status", "--json"]);
    kwire_tests::lab::parse_json(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Json::Null)
}

/// `kwire key COMMAND` against a node's agent; its output.
fn key_command(n: &Node, command: &str) -> String {
    let out = kwire_at(n, &["key", command]);
    assert!(
        out.status.success(),
        "kwire key {command} on {}: {}",
        n.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn public_key(n: &Node) -> String {
    agent_status(n)["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every Node's kwire.dev annotations, as the API serves them.
fn annotations(lab: &Lab) -> String {
    let api = lab.status()["api_url"].as_str().unwrap().to_string();
    run_host(&lab.api_curl_args("GET", &format!("{api}/api/v1/nodes")))
}

/// Starts the streams and transfers between every pair of nodes; `tag` keeps ports apart.
fn start_traffic(ns: &[Node], round: u16) -> (Vec<UdpStream>, Vec<TcpTransfer>) {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for i in 0..ns.len() {
        for j in 0..ns.len() {
            if i == j {
                continue;
            }
            let (a, b) = (&ns[i], &ns[j]);
            let port = 10 * round + (i * ns.len() + j) as u16;
            udp.push(UdpStream::start(
                format!("UDP {} -> {}", a.name, b.name),
                &a.pod_ns,
                &b.pod_ns,
                &b.pod_ip,
                UDP_PORT + port,
            ));
            if i < j {
                tcp.push(TcpTransfer::start(
                    format!("TCP {} -> {}", a.name, b.name),
                    &a.pod_ns,
                    &b.pod_ns,
                    &b.pod_ip,
                    TCP_PORT + port,
                ));
            }
        }
    }
    (udp, tcp)
}

/// Stops the traffic: every UDP datagram arrived (streams to or from the node named
/// `killed`, whose agent was killed, may lose what its restart costs) and every TCP transfer
/// is intact.
fn finish_traffic(
    lab: &Lab,
    ns: &[Node],
    phase: &str,
    udp: Vec<UdpStream>,
    tcp: Vec<TcpTransfer>,
    killed: Option<&str>,
) {
    for s in udp {
        let what = s.what.clone();
        let (sent, lost) = s.finish();
        eprintln!("{phase}: {what}: {sent} sent, {} lost", lost.len());
        assert!(sent > RATE, "{phase}: {what}: only {sent} sent");
        let touches_killed =
            killed.is_some_and(|k| what.contains(&format!("{k} ")) || what.ends_with(k));
        let allowed_loss = if touches_killed {
            10 * RATE as usize
        } else {
            0
        };
        assert!(
            lost.len() <= allowed_loss,
            "{phase}: {what}: {} of {sent} datagrams lost (first: {:?})\n{}",
            lost.len(),
            &lost[..lost.len().min(10)],
            drop_counters(lab, ns)
        );
    }
    for t in tcp {
        let what = t.what.clone();
        let r = t.finish();
        eprintln!("{phase}: {what}: {r:?}");
        let (written, checked) = r.unwrap_or_else(|e| panic!("{phase}: {what}: {e}"));
        assert_eq!(
            written, checked,
            "{phase}: {what}: bytes written vs received intact"
        );
    }
}

/// Every node's drop and handshake counters (`/metrics`), for a failure message: where the
/// lost datagrams went.
fn drop_counters(lab: &Lab, ns: &[Node]) -> String {
    let mut out = String::new();
    for n in ns {
        let m = lab.exec(&n.name, &["curl", "-sf", "http://127.0.0.1:9742/metrics"]);
        let text = String::from_utf8_lossy(&m.stdout);
        out.push_str(&format!("{} counters:\n", n.name));
        for l in text.lines().filter(|l| {
            (l.starts_with("kwire_drops_total") || l.starts_with("kwire_peer_handshakes_total"))
                && !l.ends_with(" 0")
        }) {
            out.push_str(&format!("  {l}\n"));
        }
        // The pod's link: packets the kernel dropped before the agent read them.
        if let Ok(o) = std::process::Command::new("ip")
            .args(["-n", &n.pod_ns, "-s", "link"])
            .output()
        {
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    out
}

/// Waits until every stream carried a second of traffic (after a start or a restart).
fn wait_flowing(udp: &[UdpStream]) {
    let base: Vec<usize> = udp.iter().map(UdpStream::received).collect();
    let flowing = try_wait_until(Duration::from_secs(30), || {
        udp.iter()
            .zip(&base)
            .all(|(s, b)| s.received() >= b + RATE as usize)
    });
    let stalled: Vec<String> = udp
        .iter()
        .zip(&base)
        .filter(|(s, b)| s.received() < *b + RATE as usize)
        .map(|(s, b)| format!("{}: {} received in 30 s", s.what, s.received() - b))
        .collect();
    assert!(flowing, "UDP streams that did not flow: {stalled:#?}");
}

/// Rotates the keys of `rotating` (already started by the caller) to completion: each ends
/// idle with a new key, its old key gone from disk and from every Node, and every peer of
/// every node sends on sessions made with the current keys.
fn assert_rotated(lab: &Lab, all: &[Node], rotating: &[&Node], old: &[(String, String)]) {
    let t = Instant::now();
    for (n, (old_pub, _)) in rotating.iter().zip(old) {
        wait_until(
            ROTATION,
            format!("{} completes its rotation", n.name),
            || {
                let st = agent_status(n);
                st["key"]["rotation"].as_str() == Some("idle")
                    && st["public_key"].as_str().is_some_and(|k| k != old_pub)
            },
        );
        let st = agent_status(n);
        let outcome = st["key"]["last_outcome"].as_str().unwrap_or("").to_string();
        eprintln!(
            "{}: {outcome} ({} ms after the check began)",
            n.name,
            t.elapsed().as_millis()
        );
    }
    for (n, (old_pub, old_private)) in rotating.iter().zip(old) {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&n.state_dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with("private.key."),
                "{}: {name} left in the state directory",
                n.name
            );
            let text = std::fs::read(e.path()).unwrap_or_default();
            assert!(
                !text
                    .windows(old_private.len())
                    .any(|w| w == old_private.as_bytes()),
                "{}: the old private key is still in {name}",
                n.name
            );
            files.push(name);
        }
        let nodes = annotations(lab);
        assert!(
            !nodes.contains(old_pub.as_str()),
            "{}: the old public key is still on a Node",
            n.name
        );
        assert!(!nodes.contains("kwire.dev/next-public-key"));
    }
    // Every session uses the current keys: each node's own (no "next" left) and the peers'
    // (renamed to the promoted key).
    for n in all {
        wait_until(
            Duration::from_secs(30),
            format!("{}'s sessions use current keys", n.name),
            || {
                let st = agent_status(n);
                let peers = st["peers"].array();
                peers.len() == all.len() - 1
                    && peers.iter().all(|p| {
                        p["up"].as_bool() == Some(true)
                            && p["session_local_key"].as_str() == Some("current")
                            && p["session_peer_key"].as_str() == Some("current")
                    })
                    && peers.iter().all(|p| {
                        let name = p["node"].as_str().unwrap_or("");
                        let k = p["public_key"].as_str().unwrap_or("");
                        all.iter()
                            .find(|o| o.name == name)
                            .is_some_and(|o| public_key(o) == k)
                    })
            },
        );
    }
}

fn old_keys(ns: &[&Node]) -> Vec<(String, String)> {
    ns.iter()
        .map(|n| {
            let private = std::fs::read_to_string(n.state_dir.join("private.key"))
                .unwrap()
                .trim()
                .to_string();
            (public_key(n), private)
        })
        .collect()
}

#[test]
fn rotation_loses_nothing_resumes_after_sigkill_and_revocation_locks_the_old_key_out() {
    let kwire = require_agent!();
    require_tool("curl");
    require_tool("tcpdump");
    require_tool("wireguard-go");
    let scratch = Scratch::new("lab-keyrot");
    let lab = Lab::named();
    lab.cmd_ok(
        "up",
        &[
            "--nodes",
            "3",
            "--pods",
            "1",
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    wait_until(Duration::from_secs(60), "a full mesh", || lab.full_mesh());
    let ns = nodes(&lab);
    // A pod's tun holds half a second of its two streams while the loaded machine deschedules
    // the agent (the kernel's default of 500 frames overflowed in a quarter second).
    for n in &ns {
        let link = std::process::Command::new("ip")
            .args(["-n", &n.pod_ns, "link", "show", "dev", "eth0"])
            .output()
            .expect("ip link");
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(link.contains("qlen 1000"), "{}: pod link {link}", n.name);
    }
    let capture = BridgeCapture::start(&lab, &scratch, "underlay", UNDERLAY_FILTER);

    // 1. Node 1 rotates; then all three at once. Not a datagram lost.
    for (round, rotating) in [(0u16, vec![&ns[0]]), (1, ns.iter().collect::<Vec<_>>())] {
        let phase = format!(
            "rotation of {}",
            rotating
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (udp, tcp) = start_traffic(&ns, round);
        wait_flowing(&udp);
        let old = old_keys(&rotating);
        for n in &rotating {
            let said = key_command(n, "rotate");
            eprintln!("{}: {}", n.name, said.trim());
        }
        assert_rotated(&lab, &ns, &rotating, &old);
        wait_flowing(&udp);
        finish_traffic(&lab, &ns, &phase, udp, tcp, None);
    }

    // 2. SIGKILL of node 2's agent right after its rotation started: the next key is on
    // disk; the restarted agent resumes and completes the rotation. (The agent's own death
    // costs what a restart costs; the rotation adds nothing to it.)
    let (udp, tcp) = start_traffic(&ns, 2);
    wait_flowing(&udp);
    let old = old_keys(&[&ns[1]]);
    key_command(&ns[1], "rotate");
    assert!(ns[1].state_dir.join("private.key.next").exists());
    lab.signal_agents(&[ns[1].name.as_str()], Signal::SIGKILL, RESTART);
    assert_rotated(&lab, &ns, &[&ns[1]], &old);
    wait_flowing(&udp);
    finish_traffic(
        &lab,
        &ns,
        "SIGKILL during a rotation",
        udp,
        tcp,
        Some(&ns[1].name),
    );

    // 3. Node 3 revokes its key. A wireguard-go process on the underlay holding the revoked
    // private key cannot complete a handshake with any node.
    let (revoked_pub, revoked_private) = old_keys(&[&ns[2]]).remove(0);
    let said = key_command(&ns[2], "revoke");
    eprintln!("{}: {}", ns[2].name, said.trim());
    // Nodes 1 and 2 learn of it through their Node watch; until then node 3's old key is
    // still their peer, and a handshake with it would complete. The thief tries once their
    // own peer lists no longer hold it.
    for n in &ns[..2] {
        wait_until(
            Duration::from_secs(30),
            format!("{} drops node 3's revoked key", n.name),
            || {
                let peers = agent_status(n)["peers"].array().to_vec();
                peers.len() == ns.len() - 1
                    && peers
                        .iter()
                        .all(|p| p["public_key"].as_str() != Some(revoked_pub.as_str()))
            },
        );
    }
    let thief = Arc::new(Netns::new("thief"));
    let inner = lab.attach_to_underlay(&thief, "t");
    thief.run(&["ip", "addr", "add", "192.0.2.211/24", "dev", &inner]);
    thief.run(&["ip", "link", "set", &inner, "up"]);
    let wg = WgDevice::start(&thief, Impl::WireguardGo, "wg", &scratch);
    let key_file = scratch.file("revoked.key");
    std::fs::write(&key_file, format!("{revoked_private}\n")).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    wg.wg_set(&["private-key", key_file.to_str().unwrap()]);
    wg.up(&["10.250.0.1/32"], 1420);
    let targets: Vec<(String, String)> = ns[..2]
        .iter()
        .map(|n| (public_key(n), format!("{}:51820", n.underlay_ip)))
        .collect();
    for (k, ep) in &targets {
        wg.wg_set(&[
            "peer",
            k,
            "endpoint",
            ep,
            "allowed-ips",
            "10.250.1.0/32",
            "persistent-keepalive",
            "1",
        ]);
    }
    let revoked_at = Instant::now();
    let rejected_before: Vec<f64> = ns[..2]
        .iter()
        .map(|n| lab.drops(&n.name, "handshake"))
        .collect();
    // wireguard-go initiates at once (keepalive 1 s) and retries every 5 s: the 5 s after its
    // peers were set hold its first attempts; none may complete, and the nodes refused them.
    let window = Duration::from_secs(5) + Duration::from_secs(2);
    while revoked_at.elapsed() < window {
        let dump = wg.dump();
        for (k, _) in &targets {
            let p = dump.peer(k).expect("peer configured");
            assert_eq!(
                p.latest_handshake, 0,
                "a handshake with the revoked key {revoked_pub} completed with {k}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (n, before) in ns[..2].iter().zip(rejected_before) {
        wait_until(
            Duration::from_secs(10),
            format!("{} refuses the revoked key", n.name),
            || lab.drops(&n.name, "handshake") > before,
        );
    }
    assert!(
        annotations(&lab).contains(&revoked_pub),
        "the revoked key is listed in kwire.dev/revoked-keys"
    );
    // The mesh works with node 3's new key.
    wait_until(
        Duration::from_secs(30),
        "a full mesh after the revocation",
        || lab.full_mesh(),
    );
    let (udp, tcp) = start_traffic(&ns, 3);
    wait_flowing(&udp);
    finish_traffic(&lab, &ns, "after the revocation", udp, tcp, None);

    drop(wg);
    let lines = capture.stop();
    let pcap = std::fs::read(scratch.file("underlay.pcap")).expect("the capture file");
    // The thief's own attempts are WireGuard too.
    assert_only_wireguard(&lines, &pcap, MARKER);
}
