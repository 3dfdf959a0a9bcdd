//! Pods on the measured node, wired by the real `kwire-cni` into the agent's packet loop, and
//! the probe that tells whether policy lets one reach another: a UDP datagram from a fresh
//! socket (a new flow, so the policy verdict is asked, not the connection table), received or
//! not by a socket in the server pod.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kwire_lab::pods::cni::{install_plugin_link, result_ips, ConfList, Executor, RuntimeConf};
use kwire_tests::Netns;
use serde_json::json;

/// The port the server pod listens on.
pub const PROBE_PORT: u16 = 7777;
/// A probe not received within this is taken as dropped. Same-node delivery takes tens of
/// microseconds; the margin is for a loaded machine.
pub const DROP_WAIT: Duration = Duration::from_millis(5);
/// How long an allowed probe may take before it counts as lost.
pub const PASS_WAIT: Duration = Duration::from_millis(200);
/// The least time from one probe of [`Server::until`] to the next. Waiting for a drop, each
/// probe that still passes returns within tens of microseconds; unpaced, the loop sent
/// hundreds of new flows through the agent while a change waited for its watch turn, agent
/// CPU that the phase's figure then charged to the updates it measured (and, under churn, CPU
/// taken from the agent on a 2-core machine). At one per millisecond a latency reads at most
/// a millisecond late.
pub const PROBE_GAP: Duration = Duration::from_millis(1);

/// Probes sent so far (each a new flow through the agent), for the phases to report theirs;
/// the count is also each probe's token.
pub static PROBES: AtomicU64 = AtomicU64::new(0);

/// A pod of the measured node: its namespace and its address.
pub struct LocalPod {
    pub ns: Netns,
    pub ip: IpAddr,
}

/// Runs CNI ADD for a new pod namespace through `kwire-cni` against the agent's socket.
pub fn add_pod(kwire_cni: &Path, run_dir: &Path, plugin_dir: &Path, name: &str) -> LocalPod {
    install_plugin_link(plugin_dir, kwire_cni).expect("CNI plugin link");
    let ns = Netns::new(name);
    let list = ConfList::parse(&json!({
        "cniVersion": "1.1.0", "name": "kwire",
        "plugins": [{"type": "kwire", "socket": run_dir.join("cni.sock")}],
    }))
    .expect("conflist");
    let exec = Executor {
        cni_path: vec![plugin_dir.to_path_buf()],
        netns: None,
        timeout: Duration::from_secs(30),
    };
    let rt = RuntimeConf {
        container_id: format!("bench-{}", ns.id()),
        netns: format!("/var/run/netns/{}", ns.name()),
        ifname: "eth0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "bench".into()),
            ("K8S_POD_NAME".into(), name.into()),
        ],
        capability_args: Default::default(),
    };
    let result = exec
        .add(&list, &rt)
        .unwrap_or_else(|e| panic!("CNI ADD {name}: {e}"));
    let ip = *result_ips(&result)
        .iter()
        .find(|ip| ip.is_ipv4())
        .unwrap_or_else(|| panic!("CNI ADD {name}: no IPv4 address in {result}"));
    LocalPod { ns, ip }
}

/// The server side: a socket in the server pod.
pub struct Server {
    sock: UdpSocket,
}

impl Server {
    pub fn new(pod: &LocalPod) -> Server {
        let sock = pod
            .ns
            .run_in(|| UdpSocket::bind(("0.0.0.0", PROBE_PORT)).expect("bind"));
        Server { sock }
    }

    /// Sends one datagram from a fresh socket of `client` to `to`; whether it arrives within
    /// `wait`.
    pub fn probe(&mut self, client: &LocalPod, to: IpAddr, wait: Duration) -> bool {
        let token = (PROBES.fetch_add(1, Ordering::Relaxed) + 1).to_be_bytes();
        let sender = client
            .ns
            .run_in(|| UdpSocket::bind(("0.0.0.0", 0)).expect("bind client"));
        let _ = sender.send_to(&token, SocketAddr::new(to, PROBE_PORT));
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 16];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.sock
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.sock.recv(&mut buf) {
                Ok(8) if buf[..8] == token => return true,
                Ok(_) => continue, // a late earlier probe
                Err(_) => return false,
            }
        }
    }

    /// Probes until the answer is `want` (a drop counts only when the next probe drops too);
    /// the time from `since` to the first probe that showed it.
    pub fn until(
        &mut self,
        client: &LocalPod,
        to: IpAddr,
        want: bool,
        since: Instant,
        timeout: Duration,
    ) -> Option<Duration> {
        loop {
            let sent = since.elapsed();
            let next = Instant::now() + PROBE_GAP;
            let got = if want {
                self.probe(client, to, DROP_WAIT)
            } else {
                !self.probe(client, to, DROP_WAIT) && !self.probe(client, to, DROP_WAIT)
            };
            if got {
                return Some(sent);
            }
            if since.elapsed() > timeout {
                return None;
            }
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}
