//! Route programming for N peers (5,000 by default), the agent's way before and after netlink,
//! side by side in fresh namespaces: each peer's pod CIDR gets a blackhole and a route into a
//! tun, plus the tun's MTU and address.
//! - before: `ip -4 -batch -` fed the plan's commands (how the agent ran iproute2 until it
//!   spoke netlink itself);
//! - after: `kwire::agent::routes::HostNetwork::sync` (rtnetlink, batched), the agent's code.
//!
//! Needs root. `cargo run --release -p kwire-tests --example route_programming [-- N ROUNDS]`
//! (scripts/bench-agent-scale.sh runs it after the whole-agent figures).

use ipnetwork::IpNetwork;
use kwire::agent::routes::{Desired, HostNetwork};
use kwire_tests::Netns;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn peers(n: usize) -> Vec<IpNetwork> {
    (0..n)
        .map(|i| {
            format!("10.{}.{}.0/24", 1 + i / 256, i % 256)
                .parse()
                .unwrap()
        })
        .collect()
}

/// A namespace with a tun `rb0` (no reader: as after a daemon restart, before it attaches).
fn fresh() -> Netns {
    let ns = Netns::new("rb");
    ns.run(&["ip", "tuntap", "add", "dev", "rb0", "mode", "tun"]);
    ns
}

fn count_routes(ns: &Netns) -> usize {
    ns.run(&["ip", "-4", "route", "show"]).lines().count()
}

/// The commands the agent fed `ip -4 -batch -` for these peers (link, address, blackholes,
/// then routes).
fn before(ns: &Netns, peers: &[IpNetwork]) -> Duration {
    let mut script =
        String::from("link set dev rb0 mtu 1420 up\naddr replace 10.0.0.1/24 dev rb0\n");
    script.push_str("route replace blackhole 10.0.0.0/24 metric 4096\n");
    for p in peers {
        script.push_str(&format!("route replace blackhole {p} metric 4096\n"));
    }
    for p in peers {
        script.push_str(&format!(
            "route replace {p} dev rb0 metric 100 src 10.0.0.1\n"
        ));
    }
    let t = Instant::now();
    let mut child = ns
        .command(&["ip", "-4", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch failed");
    t.elapsed()
}

fn after(ns: &Netns, peers: &[IpNetwork]) -> Duration {
    ns.run_in(|| {
        let mut host = HostNetwork::new("rb0");
        let want = Desired {
            mtu: 1420,
            own: vec!["10.0.0.0/24".parse().unwrap()],
            peers: peers.to_vec(),
            cluster: vec![],
        };
        let t = Instant::now();
        let errors = host.sync(&want);
        let took = t.elapsed();
        assert!(errors.is_empty(), "{errors:?}");
        took
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let n: usize = args.next().map_or(5000, |a| a.parse().expect("N"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));
    assert!(kwire_tests::is_root(), "route_programming needs root");
    let _ = Command::new("true").status();
    let p = peers(n);
    let (mut b, mut a) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so that drift on a shared machine cancels.
        for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let ns = fresh();
            let took = if which == 0 {
                before(&ns, &p)
            } else {
                after(&ns, &p)
            };
            let routes = count_routes(&ns);
            assert!(routes >= 2 * n, "only {routes} routes");
            if which == 0 {
                b.push(took)
            } else {
                a.push(took)
            }
        }
    }
    let (mb, ma) = (median(b.clone()), median(a.clone()));
    println!(
        "route programming, {n} peers ({} routes), {rounds} rounds: ip -batch median {:.1} ms {:?}; netlink median {:.1} ms {:?}; netlink / ip = {:.2}",
        2 * n + 1,
        mb.as_secs_f64() * 1e3,
        b.iter().map(|d| (d.as_secs_f64() * 1e3).round()).collect::<Vec<_>>(),
        ma.as_secs_f64() * 1e3,
        a.iter().map(|d| (d.as_secs_f64() * 1e3).round()).collect::<Vec<_>>(),
        ma.as_secs_f64() / mb.as_secs_f64()
    );
}
