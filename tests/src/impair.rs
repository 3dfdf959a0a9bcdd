//! Faults on a namespace's outgoing UDP, in userspace: `tc netem` where the kernel has no
//! `sch_netem` (this machine's has not). Packets to a UDP port leave through an NFQUEUE
//! (`iptables -j NFQUEUE`, nft's compat layer); a thread inside the namespace drops, corrupts
//! and delays them (which reorders: the rest overtakes), then lets them go. Duplicates are
//! made by nftables' `dup` (NFQUEUE cannot make a second packet), `numgen random` choosing.
//!
//! Corruption flips one byte of the UDP payload and clears the UDP checksum (IPv4: "none"),
//! so the damaged datagram reaches the receiver's application, as a bit flip that a checksum
//! missed would (what the receiver must catch itself).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do to the packets, as netem's options say it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Share of packets dropped (0..1).
    pub loss: f64,
    /// Share of packets sent twice.
    pub duplicate: f64,
    /// Share of packets corrupted (one byte of payload).
    pub corrupt: f64,
    /// Delay of the packets that are not let through at once.
    pub delay: Duration,
    /// Share of packets let through at once while the others wait `delay` (netem's `reorder`).
    pub reorder: f64,
}

/// Counts of what was done.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub seen: AtomicU64,
    pub dropped: AtomicU64,
    pub corrupted: AtomicU64,
    pub delayed: AtomicU64,
}

/// Faults on a namespace's UDP to `port`, until dropped (the rule and the thread go).
pub struct Impairment {
    netns: String,
    rule: Vec<String>,
    dup_table: Option<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counts: Arc<FaultCounts>,
}

/// A small xorshift generator (the faults need no more).
struct Rng(u64);

impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

fn iptables(netns: &str, op: &str, rule: &[String]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", netns, "iptables", "-w", op])
        .args(rule)
        .output()
        .expect("running iptables")
}

impl Impairment {
    /// Starts faults on UDP to `port` leaving namespace `netns`, on NFQUEUE `queue`;
    /// duplicates go to `peer` (the one node this namespace sends that UDP to).
    pub fn start(
        netns: &str,
        port: u16,
        queue: u16,
        faults: Faults,
        peer: std::net::Ipv4Addr,
    ) -> Impairment {
        let rule: Vec<String> = [
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            &port.to_string(),
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FaultCounts::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = netns.to_string();
        let (stop2, counts2) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            crate::run_in_netns(&ns, || {
                let mut q = nfq::Queue::open().expect("NFQUEUE socket");
                q.bind(queue).expect("binding the NFQUEUE");
                let _ = q.set_queue_max_len(queue, 16384);
                q.set_nonblocking(true);
                ready_tx.send(()).expect("ready");
                run_queue(&mut q, faults, &stop2, &counts2);
                let _ = q.unbind(queue);
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the NFQUEUE thread started");
        let o = iptables(netns, "-A", &rule);
        assert!(
            o.status.success(),
            "iptables NFQUEUE in {netns}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let dup_table = (faults.duplicate > 0.0).then(|| {
            let table = format!("kwire_impair_{queue}");
            let per_mille = (faults.duplicate * 1000.0).round() as u32;
            let script = format!(
                "table ip {table} {{\n  chain out {{\n    type filter hook output priority -50; policy accept;\n    udp dport {port} numgen random mod 1000 < {per_mille} dup to {peer}\n  }}\n}}\n"
            );
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", netns, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("nft");
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())
                .expect("nft script");
            assert!(child.wait().expect("nft").success(), "nft dup table in {netns}");
            table
        });
        Impairment {
            netns: netns.to_string(),
            rule,
            dup_table,
            stop,
            thread: Some(thread),
            counts,
        }
    }
}

fn run_queue(q: &mut nfq::Queue, f: Faults, stop: &AtomicBool, c: &FaultCounts) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut waiting: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let now = Instant::now();
        while waiting
            .front()
            .is_some_and(|(due, _)| *due <= now || stopping)
        {
            let (_, m) = waiting.pop_front().expect("checked");
            let _ = q.verdict(m);
        }
        if stopping && waiting.is_empty() {
            // Let what is still queued go unharmed.
            while let Ok(mut m) = q.recv() {
                m.set_verdict(nfq::Verdict::Accept);
                let _ = q.verdict(m);
            }
            return;
        }
        match q.recv() {
            Ok(mut m) => {
                c.seen.fetch_add(1, Ordering::Relaxed);
                if rng.chance(f.loss) {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    m.set_verdict(nfq::Verdict::Drop);
                    let _ = q.verdict(m);
                    continue;
                }
                if rng.chance(f.corrupt) {
                    corrupt(&mut m, &mut rng);
                    c.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                m.set_verdict(nfq::Verdict::Accept);
                if f.delay > Duration::ZERO && !rng.chance(f.reorder) {
                    c.delayed.fetch_add(1, Ordering::Relaxed);
                    waiting.push_back((Instant::now() + f.delay, m));
                } else {
                    let _ = q.verdict(m);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Flips a byte of the UDP payload and clears the UDP checksum (IPv4) so that the datagram
/// is still delivered.
fn corrupt(m: &mut nfq::Message, rng: &mut Rng) {
    let mut p = m.get_payload().to_vec();
    if p.len() < 29 || p[0] >> 4 != 4 {
        return;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let payload = ihl + 8;
    if p.len() <= payload {
        return;
    }
    let at = payload + (rng.0 as usize) % (p.len() - payload);
    p[at] ^= 0x5a;
    p[ihl + 6] = 0;
    p[ihl + 7] = 0;
    m.set_payload(p);
}

impl Drop for Impairment {
    fn drop(&mut self) {
        let _ = iptables(&self.netns, "-D", &self.rule);
        if let Some(t) = &self.dup_table {
            let _ = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.netns,
                    "nft",
                    "delete",
                    "table",
                    "ip",
                    t,
                ])
                .output();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
