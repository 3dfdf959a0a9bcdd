//! `kwire-lab matrix --port N/PROTO [PODS...]`: probes every ordered pair of pods in parallel
//! and prints the reachability table in the upstream netpol e2e format (rows from, columns
//! to, `.` reachable, `X` blocked; loopback is not probed and printed `.`).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::probe;
use super::serve::{PodPort, Protocol};
use super::{list_pods, running_lab, PodStatus};
use crate::cluster::LabError;

/// How long one probe waits: the lab is local, so an answer takes milliseconds and a blocked
/// TCP connect or UDP request ends after this.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Probes in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// UDP source ports the matrix binds: one per source pod and run, handed out in turn from
/// this range by a counter file in the lab's directory (see [`reserve_udp_ports`]).
const UDP_PORT_BASE: u16 = 10_000;
/// Size of that range: a 9-pod matrix reuses a source port after some 5,500 runs, long
/// after the agents forget an idle UDP flow (180 s), so every probe is a new flow.
const UDP_PORT_RANGE: u16 = 50_000;
/// The counter file, in the lab's directory.
const UDP_PORT_FILE: &str = "matrix-udp-port";

/// What `matrix` was asked.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    pub port: PodPort,
    /// `NS/NAME` (or `NAME` in `default`); empty: every Running pod.
    pub pods: Vec<String>,
    pub timeout: Duration,
    pub concurrency: usize,
}

/// One probed cell: `from` to `to`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cell {
    pub from: String,
    pub to: String,
    /// None for loopback (not probed).
    pub reachable: Option<bool>,
    pub detail: String,
}

/// What `matrix --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MatrixReport {
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Row and column names, `NS/NAME`, in order.
    pub pods: Vec<String>,
    /// `reachable[from][to]`; None on the diagonal (loopback is not probed).
    pub reachable: Vec<Vec<Option<bool>>>,
    /// Every probed pair that was blocked.
    pub blocked: Vec<Cell>,
    pub elapsed_ms: u64,
}

impl MatrixReport {
    /// The upstream `TruthTable.PrettyPrint` layout: a header `-` and the `to` names, one row
    /// per `from`, cells `.` (reachable or loopback) or `X`, tab-separated.
    pub fn pretty_print(&self) -> String {
        let mut out = format!("-\t\t{}\n", self.pods.join("\t"));
        for (from, row) in self.pods.iter().zip(&self.reachable) {
            let cells: Vec<&str> = row
                .iter()
                .map(|r| if *r == Some(false) { "X\t" } else { ".\t" })
                .collect();
            out.push_str(&format!("{from}\t{}\n", cells.join("\t")));
        }
        out
    }
}

/// The `i`th port of the range after `start`.
fn udp_port(start: u16, i: usize) -> u16 {
    let off = (usize::from(start.saturating_sub(UDP_PORT_BASE)) + i) % usize::from(UDP_PORT_RANGE);
    UDP_PORT_BASE + off as u16
}

/// Reserves `count` UDP source ports for this run from the counter file in `dir` (locked, so
/// runs in parallel get different ports); the first is returned. Without the file (no lab
/// directory) the ports start from the clock.
fn reserve_udp_ports(dir: &Path, count: usize) -> u16 {
    use std::io::{Read as _, Seek as _, Write as _};
    let clock = || {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        udp_port(UDP_PORT_BASE, (ms % u128::from(UDP_PORT_RANGE)) as usize)
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(UDP_PORT_FILE));
    let Ok(file) = file else { return clock() };
    let Ok(mut file) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) else {
        return clock();
    };
    let mut text = String::new();
    let start = match file
        .read_to_string(&mut text)
        .ok()
        .and_then(|_| text.trim().parse::<u16>().ok())
    {
        Some(p) if (UDP_PORT_BASE..UDP_PORT_BASE + UDP_PORT_RANGE).contains(&p) => p,
        _ => clock(),
    };
    let next = udp_port(start, count);
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{next}");
    start
}

/// UDP requests from `netns` (source port `sport`, or the next free one) to every address of
/// `tos`, each of which must be answered within `timeout`: (reachable, detail) per address.
fn probe_udp(
    netns: &str,
    tos: &[SocketAddr],
    sport: u16,
    timeout: Duration,
) -> std::io::Result<Vec<(bool, String)>> {
    probe::in_netns(netns, move || {
        let unspecified: IpAddr = if tos.first().is_none_or(SocketAddr::is_ipv4) {
            [0u8; 4].into()
        } else {
            [0u16; 8].into()
        };
        let mut bound = Err(std::io::Error::other("no port tried"));
        for i in 0..64 {
            bound = UdpSocket::bind(SocketAddr::new(unspecified, udp_port(sport, i)));
            if bound.is_ok() {
                break;
            }
        }
        let u = bound?;
        let mut out: Vec<(bool, String)> = tos
            .iter()
            .map(|_| (false, "no answer".to_string()))
            .collect();
        for to in tos {
            if let Err(e) = u.send_to(b"probe", to) {
                out[tos.iter().position(|t| t == to).expect("listed")].1 = format!("send: {e}");
            }
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while out.iter().any(|o| !o.0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            u.set_read_timeout(Some(left))?;
            match u.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(i) = tos.iter().position(|t| *t == from) {
                        out[i] = (
                            true,
                            format!("answer {:?}", String::from_utf8_lossy(&buf[..n])),
                        );
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(_) => {} // an ICMP error about one request; the others may still answer
            }
        }
        Ok(out)
    })?
}

/// The pods to probe: the ones named, or every Running pod ordered by namespace/name.
fn select_pods(all: Vec<PodStatus>, wanted: &[String]) -> Result<Vec<PodStatus>, String> {
    if wanted.is_empty() {
        let mut pods: Vec<PodStatus> = all.into_iter().filter(PodStatus::running).collect();
        pods.sort_by_key(|p| (p.namespace.clone(), p.name.clone()));
        return Ok(pods);
    }
    wanted
        .iter()
        .map(|w| {
            let (ns, name) = w.split_once('/').unwrap_or(("default", w));
            let p = all
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .ok_or_else(|| format!("no pod {ns}/{name}"))?;
            if !p.running() || p.netns.is_none() {
                return Err(format!(
                    "pod {ns}/{name} is not running with an IP and a namespace (phase {:?})",
                    p.phase
                ));
            }
            Ok(p.clone())
        })
        .collect()
}

/// The IP a probe to `pod` uses: its IPv4 address if it has one.
fn address_of(pod: &PodStatus) -> Option<IpAddr> {
    let ips: Vec<IpAddr> = pod.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    ips.iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .or(ips.first().copied())
}

/// Probes every ordered pair of `pods` (not loopback) on `opts.port`, `opts.concurrency` at a
/// time: TCP one connect per pair; UDP one socket per source pod (source port `udp_ports_from`
/// plus the pod's index) that asks every destination at once.
pub fn probe_all(pods: &[PodStatus], opts: &MatrixOptions, udp_ports_from: u16) -> MatrixReport {
    /// A unit of work: one source pod and the destinations it probes.
    type Job = (usize, Vec<usize>);
    let start = Instant::now();
    let n = pods.len();
    let others = |f: usize| (0..n).filter(move |t| *t != f);
    let jobs: Vec<Job> = match opts.port.protocol {
        Protocol::Tcp => (0..n)
            .flat_map(|f| others(f).map(move |t| (f, vec![t])))
            .collect(),
        Protocol::Udp => (0..n).map(|f| (f, others(f).collect())).collect(),
    };
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, usize, bool, String)>> = Mutex::new(Vec::new());
    let workers = opts.concurrency.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((f, tos)) = jobs.get(i) else { break };
                let netns = pods[*f].netns.as_deref().unwrap_or_default();
                let addrs: Vec<Option<SocketAddr>> = tos
                    .iter()
                    .map(|t| address_of(&pods[*t]).map(|a| SocketAddr::new(a, opts.port.port)))
                    .collect();
                let known: Vec<SocketAddr> = addrs.iter().flatten().copied().collect();
                let answers: Vec<std::io::Result<(bool, String)>> = match opts.port.protocol {
                    Protocol::Tcp => known
                        .iter()
                        .map(|a| {
                            probe::probe(netns, a.ip(), Some(a.port()), Protocol::Tcp, opts.timeout)
                        })
                        .collect(),
                    Protocol::Udp => {
                        match probe_udp(netns, &known, udp_port(udp_ports_from, *f), opts.timeout) {
                            Ok(v) => v.into_iter().map(Ok).collect(),
                            Err(e) => known
                                .iter()
                                .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
                                .collect(),
                        }
                    }
                };
                let mut answers = answers.into_iter();
                let mut out = results.lock().expect("no worker panics");
                for (t, addr) in tos.iter().zip(&addrs) {
                    let (ok, detail) = match addr {
                        None => (false, format!("pod {} has no IP", pods[*t].key())),
                        Some(_) => match answers.next().expect("one answer per address") {
                            Ok(a) => a,
                            Err(e) => (false, format!("probe failed: {e}")),
                        },
                    };
                    out.push((*f, *t, ok, detail));
                }
            });
        }
    });
    let names: Vec<String> = pods.iter().map(PodStatus::key).collect();
    let mut reachable = vec![vec![None; n]; n];
    let mut blocked = Vec::new();
    let mut results = results.into_inner().expect("no worker panics");
    results.sort_by_key(|r| (r.0, r.1));
    for (f, t, ok, detail) in results {
        reachable[f][t] = Some(ok);
        if !ok {
            blocked.push(Cell {
                from: names[f].clone(),
                to: names[t].clone(),
                reachable: Some(false),
                detail,
            });
        }
    }
    MatrixReport {
        port: opts.port.port,
        protocol: opts.port.protocol.to_string(),
        pods: names,
        reachable,
        blocked,
        elapsed_ms: start.elapsed().as_millis() as u64,
    }
}

/// `kwire-lab matrix`: the table of lab `name`.
pub fn matrix(name: &str, opts: &MatrixOptions) -> Result<MatrixReport, LabError> {
    let (names, _, runtime) = running_lab(name)?;
    let all = list_pods(&names, runtime.as_ref())?;
    let pods = select_pods(all, &opts.pods).map_err(|e| {
        LabError::Usage(format!(
            "lab {name}: {e} (`kwire-lab status --name {name}` lists pods)"
        ))
    })?;
    if pods.len() < 2 {
        return Err(LabError::Usage(format!(
            "lab {name} has {} running pod(s) to probe; a matrix needs two",
            pods.len()
        )));
    }
    let udp_ports_from = match opts.port.protocol {
        Protocol::Udp => reserve_udp_ports(&crate::cluster::state::lab_dir(name), pods.len()),
        Protocol::Tcp => UDP_PORT_BASE,
    };
    Ok(probe_all(&pods, opts, udp_ports_from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_upstream_layout() {
        let r = MatrixReport {
            port: 80,
            protocol: "TCP".into(),
            pods: vec!["x/a".into(), "x/b".into()],
            reachable: vec![vec![None, Some(false)], vec![Some(true), None]],
            blocked: vec![],
            elapsed_ms: 0,
        };
        assert_eq!(
            r.pretty_print(),
            "-\t\tx/a\tx/b\nx/a\t.\t\tX\t\nx/b\t.\t\t.\t\n"
        );
    }

    #[test]
    fn udp_ports_are_handed_out_in_turn_and_wrap() {
        let dir = std::env::temp_dir().join(format!("kwire-matrix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = reserve_udp_ports(&dir, 9);
        let b = reserve_udp_ports(&dir, 9);
        assert_eq!(b, udp_port(a, 9));
        assert_eq!(
            udp_port(UDP_PORT_BASE + UDP_PORT_RANGE - 1, 2),
            UDP_PORT_BASE + 1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
