//! Network namespaces as hosts: made with `lo` up, joined by veths and switches, removed on
//! drop (even on panic); what a crashed run left behind is swept; entering a namespace someone
//! else made (a lab's pods and nodes).

#[allow(unused_imports)]
use crate::*;
use std::ffi::OsStr;
use std::fmt::{self, Display};
use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A network namespace with `lo` up. Dropping it kills every process inside, removes the
/// WireGuard sockets of its interfaces and deletes it (with its veths).
pub struct Netns {
    name: String,
    id: String,
}

impl Netns {
    /// Creates `kwt-<id>-<role>`. `role` is a short tag for humans (a, b, c, sw).
    pub fn new(role: &str) -> Netns {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        assert!(
            role.len() <= 8 && role.chars().all(|c| c.is_ascii_alphanumeric()),
            "netns role tag must be ≤ 8 alphanumerics: {role:?}"
        );
        let id = unique_id();
        let name = format!("{NETNS_PREFIX}{id}-{role}");
        run_host(&["ip", "netns", "add", &name]);
        let ns = Netns { name, id };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id in its name, unique to this namespace; interface names are built from it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// An interface name unique on the machine: `tag` + this namespace's id (≤ 15 bytes).
    /// Use it for anything whose name is global, such as a WireGuard socket.
    pub fn ifname(&self, tag: &str) -> String {
        assert!(
            tag.len() <= MAX_IF_TAG,
            "interface tag {tag:?} longer than {MAX_IF_TAG}"
        );
        format!("{tag}{}", self.id)
    }

    /// A `Command` that runs `argv` inside this namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's own).
    pub fn command<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        cmd.args(argv.iter().map(|a| a.as_ref()));
        cmd
    }

    /// Runs `argv` inside, returns its raw output (any exit status).
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        self.command(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run in {}: {e}", self.name))
    }

    /// Runs `argv` inside; panics with its stderr unless it succeeds; returns its stdout.
    pub fn run<S: AsRef<OsStr>>(&self, argv: &[S]) -> String {
        let out = self.exec(argv);
        let args: Vec<&OsStr> = argv.iter().map(|a| a.as_ref()).collect();
        check_output(
            &format!("[{}] {}", self.name, describe(args[0], &args[1..])),
            out,
        )
    }

    /// True if `argv` exits 0 inside.
    pub fn succeeds<S: AsRef<OsStr>>(&self, argv: &[S]) -> bool {
        self.exec(argv).status.success()
    }

    /// Starts `argv` inside as a [`Proc`] logging to `log`.
    pub fn spawn<S: AsRef<OsStr>>(&self, argv: &[S], log: PathBuf) -> Proc {
        let name = format!("[{}] {}", self.name, argv[0].as_ref().to_string_lossy());
        Proc::spawn(self.command(argv), name, log)
    }

    /// Runs `f` on a scoped thread that has entered this namespace (`setns`), so sockets it
    /// opens live here. Returns `f`'s result.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Adds an address (IPv6 ones with `nodad`, usable at once).
    pub fn add_addr(&self, ifname: &str, cidr: &str) {
        if cidr.contains(':') {
            self.run(&["ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad"]);
        } else {
            self.run(&["ip", "addr", "add", cidr, "dev", ifname]);
        }
    }

    pub fn del_addr(&self, ifname: &str, cidr: &str) {
        self.run(&["ip", "addr", "del", cidr, "dev", ifname]);
    }

    /// Sets MTU and brings the link up.
    pub fn link_up(&self, ifname: &str, mtu: u32) {
        self.run(&[
            "ip",
            "link",
            "set",
            "dev",
            ifname,
            "mtu",
            &mtu.to_string(),
            "up",
        ]);
    }

    pub fn has_link(&self, ifname: &str) -> bool {
        self.succeeds(&["ip", "link", "show", "dev", ifname])
    }

    /// Pids of the processes in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.name)
    }

    /// One ICMP echo to `dst` (v4 or v6) with a 1 s timeout, optionally from `src`.
    pub fn ping_once(&self, dst: &str, src: Option<&str>) -> bool {
        let mut argv = vec!["ping", "-n", "-q", "-c", "1", "-W", "1"];
        if let Some(src) = src {
            argv.extend(["-I", src]);
        }
        argv.push(dst);
        self.succeeds(&argv)
    }

    /// Waits until `dst` answers a ping (retrying: the first packets may wait for a handshake).
    pub fn wait_ping(&self, dst: &str, deadline: Duration) {
        wait_until(
            deadline,
            format!("{} to answer ping from {}", dst, self.name),
            || self.ping_once(dst, None),
        );
    }

    /// Sends `count` pings 100 ms apart and asserts that none is answered.
    pub fn assert_no_ping(&self, dst: &str, src: Option<&str>, count: u32) {
        let c = count.to_string();
        let mut argv = vec!["ping", "-n", "-q", "-c", &c, "-i", "0.1", "-W", "1"];
        if let Some(src) = src {
            argv.extend(["-I", src]);
        }
        argv.push(dst);
        let out = self.exec(&argv);
        assert!(
            !out.status.success(),
            "{dst} answered a ping from {} (src {src:?}) but must not:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

impl Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        destroy_netns(&self.name, &self.id);
    }
}

fn netns_pids(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the processes inside (SIGTERM, SIGKILL after [`STOP_GRACE`]), removes WireGuard sockets
/// named after `id`, deletes the namespace.
fn destroy_netns(name: &str, id: &str) {
    let pids = netns_pids(name);
    for &p in &pids {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
    }
    if !pids.is_empty() && !try_wait_until(STOP_GRACE, || netns_pids(name).is_empty()) {
        for p in netns_pids(name) {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        try_wait_until(Duration::from_secs(2), || netns_pids(name).is_empty());
    }
    if let Ok(dir) = fs::read_dir(WG_SOCKET_DIR) {
        for e in dir.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.ends_with(".sock") && f.contains(id) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes leftovers of earlier runs that crashed: namespaces `kwt-<id>-*`, WireGuard sockets
/// and host links whose name ends in an id, when the pid encoded in the id is dead. Runs
/// automatically before the first [`Netns`] of a process; safe to call any time.
pub fn sweep_stale() {
    let stale = |id: &str| {
        pid_of_id(id)
            .map(|p| p != std::process::id() && !pid_alive(p))
            .unwrap_or(false)
    };
    if let Ok(dir) = fs::read_dir("/var/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(NETNS_PREFIX) {
                let id = rest.split('-').next().unwrap_or("");
                if id.len() == ID_LEN && stale(id) {
                    eprintln!("sweep_stale: removing namespace {name} of dead pid");
                    destroy_netns(&name, id);
                }
            }
        }
    }
    let id_suffix = |name: &str| -> Option<String> {
        (name.len() > ID_LEN && name.is_char_boundary(name.len() - ID_LEN))
            .then(|| name[name.len() - ID_LEN..].to_string())
    };
    if let Ok(dir) = fs::read_dir(WG_SOCKET_DIR) {
        for e in dir.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = f.strip_suffix(".sock") {
                if stem.starts_with("kw") && id_suffix(stem).is_some_and(|id| stale(&id)) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    // Links in the host namespace (a veth end made there by a test that then crashed).
    if let Ok(dir) = fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("kv") && id_suffix(&n).is_some_and(|id| stale(&id)) {
                let _ = Command::new("ip")
                    .args(["link", "del", &n])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(dir) = fs::read_dir(SCRATCH_ROOT) {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() >= ID_LEN && stale(&n[..ID_LEN.min(n.len())]) {
                // Failed tests keep their scratch directory; keep those of the last day.
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(86_400))
                    .unwrap_or(false);
                if old {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// A veth pair between two namespaces, created directly inside them (no name in the host
/// namespace). Its end in `a` is [`Veth::a`], named after `b`'s id, and vice versa; the kernel
/// deletes it with either namespace.
pub struct Veth {
    pub a: String,
    pub b: String,
}

impl Veth {
    /// Creates the pair, adds `a_addrs` / `b_addrs` (IPv6 with nodad), sets `mtu` and brings both
    /// ends up.
    pub fn new(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str], mtu: u32) -> Veth {
        let a_if = format!("v{}", b.id());
        let b_if = format!("v{}", a.id());
        run_host(&[
            "ip",
            "link",
            "add",
            &a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            b.name(),
        ]);
        for (ns, ifname, addrs) in [(a, &a_if, a_addrs), (b, &b_if, b_addrs)] {
            for addr in addrs {
                ns.add_addr(ifname, addr);
            }
            ns.link_up(ifname, mtu);
        }
        Veth { a: a_if, b: b_if }
    }
}

/// An L2 segment: a bridge in its own namespace; [`Switch::attach`] plugs a namespace into it
/// with a veth. For topologies where more than two hosts share one underlay subnet.
pub struct Switch {
    pub ns: Netns,
    bridge: String,
}

impl Switch {
    pub fn new() -> Switch {
        let ns = Netns::new("sw");
        let bridge = "br0".to_string();
        ns.run(&["ip", "link", "add", &bridge, "type", "bridge"]);
        ns.run(&["ip", "link", "set", &bridge, "up"]);
        Switch { ns, bridge }
    }

    /// Connects `host` to the bridge; returns the name of its interface in `host` (addresses
    /// added, MTU set, up).
    pub fn attach(&self, host: &Netns, addrs: &[&str], mtu: u32) -> String {
        let veth = Veth::new(host, addrs, &self.ns, &[], mtu);
        self.ns
            .run(&["ip", "link", "set", &veth.b, "master", &self.bridge]);
        veth.a
    }
}

impl Default for Switch {
    fn default() -> Self {
        Switch::new()
    }
}

/// Runs `f` on a scoped thread that has entered the named network namespace
/// `/var/run/netns/NAME` (one this crate did not make, such as a lab pod's), so sockets it opens
/// live there and keep working from any thread afterwards. Returns `f`'s result.
pub fn run_in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
