//! The host side of the tunnel: the tun's MTU and addresses (the first address of each of
//! this node's pod CIDRs) and the routes of the peers' pod CIDRs into it, each with a
//! blackhole route behind it so nothing for a pod range leaves the node unencrypted.
//!
//! Programmed with iproute2 (`ip`); what to run is planned by a pure function ([`plan`]) and
//! run as one `ip -batch` per address family (one process per command made a 5,000-node
//! start take 20 s); when a batch fails the steps are run one command each, and only the
//! commands that succeeded are remembered, so a failed one is retried at the next sync.

use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Metric of a route into the tun: below the blackhole's.
pub const PEER_ROUTE_METRIC: u32 = 100;
/// Metric of the blackhole behind every pod CIDR route: used only when the tun route is gone
/// (the daemon died, the peer was removed). Never removed by the agent: fail closed.
pub const BLACKHOLE_METRIC: u32 = 4096;
/// WireGuard's overhead on the underlay: IPv6 header 40 + UDP 8 + WireGuard 32
/// (wg-quick subtracts the same 80).
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// Underlay MTU assumed when it cannot be found.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The first address of `cidr`, with its prefix: the node's gateway address for the range.
pub fn gateway(cidr: &IpNetwork) -> IpNetwork {
    match cidr {
        IpNetwork::V4(n) => {
            let a = std::net::Ipv4Addr::from(u32::from(n.network()).wrapping_add(1));
            IpNetwork::new(IpAddr::V4(a), n.prefix()).expect("same prefix")
        }
        IpNetwork::V6(n) => {
            let a = std::net::Ipv6Addr::from(u128::from(n.network()).wrapping_add(1));
            IpNetwork::new(IpAddr::V6(a), n.prefix()).expect("same prefix")
        }
    }
}

/// What has been programmed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub mtu: Option<u32>,
    pub addresses: BTreeSet<IpNetwork>,
    /// Peer pod CIDR → preferred source.
    pub routes: BTreeMap<IpNetwork, Option<IpAddr>>,
    pub blackholes: BTreeSet<IpNetwork>,
}

/// One `ip` invocation and the state it establishes once it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub argv: Vec<String>,
    pub effect: Effect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Mtu(u32),
    AddAddress(IpNetwork),
    DelAddress(IpNetwork),
    Blackhole(IpNetwork),
    AddRoute(IpNetwork, Option<IpAddr>),
    DelRoute(IpNetwork),
}

fn family(n: &IpNetwork) -> &'static str {
    if n.is_ipv4() {
        "-4"
    } else {
        "-6"
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The commands that take the host from `done` to: link up with `mtu`, an address for each
/// of `own` (and a blackhole behind it), a route and a blackhole for each of `peers`.
/// Blackholes come before the routes they back; stale routes go last.
pub fn plan(
    ifname: &str,
    done: &Programmed,
    mtu: u32,
    own: &[IpNetwork],
    peers: &[IpNetwork],
) -> Vec<Step> {
    let mut steps = Vec::new();
    if done.mtu != Some(mtu) {
        steps.push(Step {
            argv: argv(&["link", "set", "dev", ifname, "mtu", &mtu.to_string(), "up"]),
            effect: Effect::Mtu(mtu),
        });
    }
    let want_addrs: BTreeSet<IpNetwork> = own.iter().map(gateway).collect();
    for a in &want_addrs {
        if !done.addresses.contains(a) {
            let s = a.to_string();
            let mut v = argv(&[family(a), "addr", "replace", &s, "dev", ifname]);
            if a.is_ipv6() {
                v.push("nodad".into());
            }
            steps.push(Step {
                argv: v,
                effect: Effect::AddAddress(*a),
            });
        }
    }
    for n in own.iter().chain(peers) {
        if !done.blackholes.contains(n) {
            let s = n.to_string();
            steps.push(Step {
                argv: argv(&[
                    family(n),
                    "route",
                    "replace",
                    "blackhole",
                    &s,
                    "metric",
                    &BLACKHOLE_METRIC.to_string(),
                ]),
                effect: Effect::Blackhole(*n),
            });
        }
    }
    let src_v4 = want_addrs.iter().find(|a| a.is_ipv4()).map(|a| a.ip());
    let src_v6 = want_addrs.iter().find(|a| a.is_ipv6()).map(|a| a.ip());
    let mut want_routes = BTreeMap::new();
    for n in peers {
        if own.contains(n) {
            continue;
        }
        want_routes.insert(*n, if n.is_ipv4() { src_v4 } else { src_v6 });
    }
    for (n, src) in &want_routes {
        if done.routes.get(n) != Some(src) {
            let s = n.to_string();
            let mut v = argv(&[
                family(n),
                "route",
                "replace",
                &s,
                "dev",
                ifname,
                "metric",
                &PEER_ROUTE_METRIC.to_string(),
            ]);
            if let Some(src) = src {
                v.extend(["src".to_string(), src.to_string()]);
            }
            steps.push(Step {
                argv: v,
                effect: Effect::AddRoute(*n, *src),
            });
        }
    }
    for n in done.routes.keys() {
        if !want_routes.contains_key(n) {
            let s = n.to_string();
            steps.push(Step {
                argv: argv(&[
                    family(n),
                    "route",
                    "del",
                    &s,
                    "dev",
                    ifname,
                    "metric",
                    &PEER_ROUTE_METRIC.to_string(),
                ]),
                effect: Effect::DelRoute(*n),
            });
        }
    }
    for a in &done.addresses {
        if !want_addrs.contains(a) {
            let s = a.to_string();
            steps.push(Step {
                argv: argv(&[family(a), "addr", "del", &s, "dev", ifname]),
                effect: Effect::DelAddress(*a),
            });
        }
    }
    steps
}

impl Programmed {
    fn record(&mut self, e: &Effect) {
        match e {
            Effect::Mtu(m) => self.mtu = Some(*m),
            Effect::AddAddress(a) => {
                self.addresses.insert(*a);
            }
            Effect::DelAddress(a) => {
                self.addresses.remove(a);
            }
            Effect::Blackhole(n) => {
                self.blackholes.insert(*n);
            }
            Effect::AddRoute(n, s) => {
                self.routes.insert(*n, *s);
            }
            Effect::DelRoute(n) => {
                self.routes.remove(n);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("`ip {cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("cannot run `ip` (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
}

/// Runs one `ip` command.
pub fn ip(args: &[String]) -> Result<String, RouteError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(RouteError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RouteError::Failed {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `steps` as `ip -batch -` invocations: those without a family option first, then the
/// `-4` ones, then the `-6` ones, each group in plan order (the families do not depend on
/// each other). Stops at the first failing command.
pub fn ip_batches(steps: &[Step]) -> Result<(), RouteError> {
    for fam in [None, Some("-4"), Some("-6")] {
        let mut input = String::new();
        for s in steps {
            let (f, rest) = match s.argv.first().map(String::as_str) {
                Some(f @ ("-4" | "-6")) => (Some(f), &s.argv[1..]),
                _ => (None, &s.argv[..]),
            };
            if f == fam {
                input.push_str(&rest.join(" "));
                input.push('\n');
            }
        }
        if input.is_empty() {
            continue;
        }
        let mut args: Vec<&str> = fam.into_iter().collect();
        args.extend(["-batch", "-"]);
        let failed = |stderr: String| RouteError::Failed {
            cmd: args.join(" "),
            stderr,
        };
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RouteError::Spawn)?;
        let wrote = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes());
        let out = child.wait_with_output().map_err(RouteError::Spawn)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() {
            return Err(failed(stderr));
        }
        if let Err(e) = wrote {
            return Err(failed(e.to_string()));
        }
    }
    Ok(())
}

/// The host network of the tun: remembers what it programmed.
#[derive(Debug)]
pub struct HostNetwork {
    pub ifname: String,
    pub done: Programmed,
}

impl HostNetwork {
    pub fn new(ifname: &str) -> HostNetwork {
        HostNetwork {
            ifname: ifname.to_string(),
            done: Programmed::default(),
        }
    }

    /// Runs what [`plan`] says; returns every failure (the rest is still done). A missing
    /// route on delete counts as done.
    pub fn sync(&mut self, mtu: u32, own: &[IpNetwork], peers: &[IpNetwork]) -> Vec<RouteError> {
        let steps = plan(&self.ifname, &self.done, mtu, own, peers);
        if steps.len() > 1 && ip_batches(&steps).is_ok() {
            for step in &steps {
                self.done.record(&step.effect);
            }
            return Vec::new();
        }
        // One at a time, to learn which failed (every step is idempotent: replace, or a
        // delete whose "already gone" counts as done).
        let mut errors = Vec::new();
        for step in steps {
            match ip(&step.argv) {
                Ok(_) => self.done.record(&step.effect),
                Err(RouteError::Failed { stderr, .. })
                    if matches!(step.effect, Effect::DelRoute(_) | Effect::DelAddress(_))
                        && (stderr.contains("No such process")
                            || stderr.contains("Cannot assign")) =>
                {
                    self.done.record(&step.effect)
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

/// The MTU of the interface that carries traffic for `ip` (the one holding that address, else
/// the one the route to it leaves by).
pub fn underlay_mtu(ip_addr: IpAddr) -> Option<u32> {
    let a = ip_addr.to_string();
    let dev = ip(&argv(&["-o", "addr", "show", "to", &a]))
        .ok()
        .and_then(|out| {
            out.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_string)
        })
        .or_else(|| {
            let out = ip(&argv(&["-o", "route", "get", &a])).ok()?;
            let mut it = out.split_whitespace();
            it.by_ref().find(|w| *w == "dev")?;
            it.next().map(str::to_string)
        })?;
    let out = ip(&argv(&["-o", "link", "show", "dev", &dev])).ok()?;
    let mut it = out.split_whitespace();
    it.by_ref().find(|w| *w == "mtu")?;
    it.next()?.parse().ok()
}

/// The tun MTU for an underlay MTU.
pub fn tunnel_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(WIREGUARD_OVERHEAD).max(1280)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_is_the_first_address() {
        assert_eq!(gateway(&n("10.244.3.0/24")), n("10.244.3.1/24"));
        assert_eq!(gateway(&n("fd00:10:244:3::/64")), n("fd00:10:244:3::1/64"));
    }

    #[test]
    fn plans_addresses_blackholes_then_routes_and_forgets_nothing_it_did() {
        let own = [n("10.244.0.0/24"), n("fd00::/64")];
        let peers = [n("10.244.1.0/24"), n("fd00:0:0:1::/64")];
        let steps = plan("kw0", &Programmed::default(), 1420, &own, &peers);
        let lines: Vec<String> = steps.iter().map(|s| s.argv.join(" ")).collect();
        assert_eq!(
            lines,
            vec![
                "link set dev kw0 mtu 1420 up",
                "-4 addr replace 10.244.0.1/24 dev kw0",
                "-6 addr replace fd00::1/64 dev kw0 nodad",
                "-4 route replace blackhole 10.244.0.0/24 metric 4096",
                "-6 route replace blackhole fd00::/64 metric 4096",
                "-4 route replace blackhole 10.244.1.0/24 metric 4096",
                "-6 route replace blackhole fd00:0:0:1::/64 metric 4096",
                "-4 route replace 10.244.1.0/24 dev kw0 metric 100 src 10.244.0.1",
                "-6 route replace fd00:0:0:1::/64 dev kw0 metric 100 src fd00::1",
            ]
        );
        let mut done = Programmed::default();
        for s in &steps {
            done.record(&s.effect);
        }
        assert!(
            plan("kw0", &done, 1420, &own, &peers).is_empty(),
            "idempotent"
        );
        // A peer goes: its route is deleted, its blackhole stays.
        let steps = plan("kw0", &done, 1420, &own, &peers[..1]);
        let lines: Vec<String> = steps.iter().map(|s| s.argv.join(" ")).collect();
        assert_eq!(
            lines,
            vec!["-6 route del fd00:0:0:1::/64 dev kw0 metric 100"]
        );
        // MTU change only.
        let steps = plan("kw0", &done, 1400, &own, &peers);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].effect, Effect::Mtu(1400));
    }

    #[test]
    fn mtu_arithmetic() {
        assert_eq!(tunnel_mtu(1500), 1420);
        assert_eq!(tunnel_mtu(9001), 8921);
        assert_eq!(tunnel_mtu(1000), 1280, "never below the IPv6 minimum");
    }
}
