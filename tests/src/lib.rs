//! Test support: network namespaces as hosts, real WireGuard peers driven through `wg`, and
//! packet captures that prove what is on the wire.
//!
//! Everything here is an RAII guard with a name unique to this process and test, so tests run in
//! parallel and clean up after themselves even when they panic:
//! - [`Netns`]: a network namespace `kwt-<id>-<role>` with `lo` up; dropping it kills every process
//!   still inside (`ip netns pids`), removes the WireGuard sockets of its interfaces and deletes it
//!   (the kernel deletes its veths with it).
//! - [`Proc`]: a process started in a namespace, stopped on drop (signal, then SIGKILL after a
//!   deadline); its stdout/stderr go to a log file that is printed when a test panics.
//! - [`WgDevice`]: a userspace WireGuard implementation (`kwire tunnel`, `wireguard-go -f`,
//!   `boringtun-cli`) running in a namespace, configured with `wg`, read with `wg show dump`.
//! - [`Capture`]: tcpdump on an interface of a namespace, read back as `tcpdump -r -nn` lines.
//! - [`sweep_stale`] removes what a crashed earlier run left behind (namespaces, sockets, links
//!   whose creating pid is dead); it runs once per process before the first namespace is made.
//!
//! Addresses: underlay only in documentation ranges (192.0.2.0/24, 198.51.100.0/24,
//! 203.0.113.0/24, 2001:db8::/32); inside tunnels 10.x and fd00::/8.
//!
//! Correctness never rests on a sleep: wait for a condition with [`wait_until`].

use std::ffi::OsStr;
use std::fmt::{self, Display};
use std::fs::{self, File};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// First part of every namespace name this crate creates (`kwt-<id>-<role>`).
pub const NETNS_PREFIX: &str = "kwt-";
/// Where wireguard-tools looks for userspace API sockets; shared by all network namespaces.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";
/// Where scratch directories (pcaps, logs, key files, payloads) live.
pub const SCRATCH_ROOT: &str = "/tmp/kwire-tests";
/// Width of the base-36 pid at the start of every id, so [`sweep_stale`] can read it back.
/// 36^5 > 2^22, the largest pid Linux hands out.
const PID_DIGITS: usize = 5;
/// A test id: pid (5) + counter (2) + random (2), all base 36.
const ID_LEN: usize = PID_DIGITS + 4;
/// Longest role tag an interface name may carry: tag + id must fit IFNAMSIZ-1 = 15 bytes.
const MAX_IF_TAG: usize = 15 - ID_LEN;

/// How long a stopped process gets between its stop signal and SIGKILL. The tunnel contract
/// (shared/bench/tunnel-bench.sh) promises an exit within 3 s of SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a WireGuard implementation gets to create its interface and UAPI socket.
pub const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Names, root, waiting

/// True when running as root. Tests that need namespaces call [`require_root!`] instead.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns from the calling test, with a printed message, when not running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIP {}: needs root (network namespaces, tun devices); CI runs it as root",
                module_path!()
            );
            return;
        }
    };
}

/// Root and a kwire binary with the `agent` subcommand, or the calling test returns with a
/// printed SKIP. Evaluates to the binary's path.
#[macro_export]
macro_rules! require_agent {
    () => {{
        $crate::require_root!();
        match $crate::lab::kwire_with("agent") {
            Some(bin) => bin,
            None => {
                eprintln!(
                    "SKIP {}: `kwire agent --help` fails (build the agent: cargo build -p kwire-daemon)",
                    module_path!()
                );
                return;
            }
        }
    }};
}

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).expect("ascii")
}

fn parse_base36(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 36).ok()
}

/// `n` random bytes from the kernel.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

/// A short id unique to this process and call: `<pid:5><counter:2><random:2>`, base 36.
pub fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u64 % (36 * 36);
    let r = random_bytes(2);
    let r = u16::from_le_bytes([r[0], r[1]]) as u64 % (36 * 36);
    format!(
        "{}{}{}",
        base36(std::process::id() as u64, PID_DIGITS),
        base36(n, 2),
        base36(r, 2)
    )
}

/// An id as a process with pid `pid` would make it; lets a test fake the leftovers of a dead
/// process for [`sweep_stale`].
pub fn id_for_pid(pid: u32) -> String {
    format!(
        "{}{}",
        base36(pid as u64, PID_DIGITS),
        &unique_id()[PID_DIGITS..]
    )
}

fn pid_of_id(id: &str) -> Option<u32> {
    if id.len() < ID_LEN || !id.is_char_boundary(PID_DIGITS) {
        return None;
    }
    parse_base36(&id[..PID_DIGITS]).map(|p| p as u32)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `cond` until it holds, for at most `deadline`; panics saying what was awaited.
pub fn wait_until(deadline: Duration, what: impl Display, cond: impl FnMut() -> bool) {
    if !try_wait_until(deadline, cond) {
        panic!(
            "timed out after {:.1} s waiting for: {what}",
            deadline.as_secs_f64()
        );
    }
}

/// Polls `cond` until it holds (true) or `deadline` passes (false). Starts at 10 ms between
/// polls and backs off to 200 ms.
pub fn try_wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

fn describe(program: &OsStr, args: &[&OsStr]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command in the current namespace; panics with its stderr unless it succeeds.
pub fn run_host<S: AsRef<OsStr>>(argv: &[S]) -> String {
    let (prog, args) = argv.split_first().expect("empty command");
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = Command::new(prog.as_ref())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(prog.as_ref(), &args)));
    check_output(&describe(prog.as_ref(), &args), out)
}

fn check_output(what: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics with a clear message if a program the tests need is not installed.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` not found in PATH: run scripts/install-deps.sh as root first"
    );
}

// ---------------------------------------------------------------------------------------------
// Scratch directories

/// A directory under /tmp/kwire-tests for one test's files, removed on drop unless the test
/// panicked (then its path is printed, for the logs and pcaps inside).
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path = Path::new(SCRATCH_ROOT).join(format!("{}-{tag}", unique_id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kept scratch directory of the failed test: {}",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A process started by a test; stopped on drop (its stop signal, then SIGKILL after
/// [`STOP_GRACE`]). Output goes to `log`, printed (tail) when the test panics.
pub struct Proc {
    child: Option<Child>,
    name: String,
    log: PathBuf,
    stop_signal: Signal,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, name: impl Into<String>, log: PathBuf) -> Proc {
        let name = name.into();
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            child: Some(child),
            name,
            log,
            stop_signal: Signal::SIGTERM,
            status: None,
        }
    }

    /// Uses `sig` instead of SIGTERM to stop it (tcpdump: SIGINT).
    pub fn with_stop_signal(mut self, sig: Signal) -> Proc {
        self.stop_signal = sig;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status if it has exited (reaps it), None while it runs.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("waitpid");
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `deadline` for it to exit by itself.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<ExitStatus> {
        try_wait_until(deadline, || self.try_status().is_some());
        self.status
    }

    /// Sends `sig` (if it still runs).
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// Stops it: stop signal, then SIGKILL if it has not exited after [`STOP_GRACE`].
    /// Returns how it exited, and whether it needed SIGKILL.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        if let Some(st) = self.try_status() {
            return (st, false);
        }
        self.signal(self.stop_signal);
        if let Some(st) = self.wait_timeout(STOP_GRACE) {
            return (st, false);
        }
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        let st = self
            .child
            .as_mut()
            .expect("child")
            .wait()
            .expect("waitpid after SIGKILL");
        self.status = Some(st);
        (st, true)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let running = self.is_running();
        self.stop();
        if panicking {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- {} (pid {}, {}) log {} (last {} lines) ----",
                self.name,
                self.pid(),
                if running { "was running" } else { "had exited" },
                self.log.display(),
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

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

// ---------------------------------------------------------------------------------------------
// WireGuard

/// Path of the `kwire` binary: `$KWIRE_BIN`, else `<workspace>/target/{debug,release}/kwire`
/// (respecting `$CARGO_TARGET_DIR`), the newer if both exist. Panics saying how to build it.
pub fn kwire_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KWIRE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KWIRE_BIN={} is not a file", p.display());
        return p;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace.join(t))
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = [target.join("debug/kwire"), target.join("release/kwire")];
    candidates
        .iter()
        .filter_map(|p| Some((fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no kwire binary: looked at {} and {}; run `cargo build -p kwire-daemon` \
                 (or `--release`) first, or set KWIRE_BIN",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// A WireGuard implementation that speaks the userspace API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// `kwire tunnel IFNAME`
    Kwire,
    /// Debian's `wireguard-go -f IFNAME`
    WireguardGo,
    /// `boringtun-cli --foreground --disable-drop-privileges IFNAME`
    Boringtun,
}

impl Impl {
    pub fn from_name(name: &str) -> Option<Impl> {
        match name.trim() {
            "kwire" => Some(Impl::Kwire),
            "wireguard-go" | "wggo" => Some(Impl::WireguardGo),
            "boringtun" | "boringtun-cli" => Some(Impl::Boringtun),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Impl::Kwire => "kwire",
            Impl::WireguardGo => "wireguard-go",
            Impl::Boringtun => "boringtun-cli",
        }
    }

    /// The command line that runs it in the foreground for `ifname`.
    pub fn argv(self, ifname: &str) -> Vec<String> {
        match self {
            Impl::Kwire => vec![
                kwire_bin().display().to_string(),
                "tunnel".into(),
                ifname.into(),
            ],
            Impl::WireguardGo => vec!["wireguard-go".into(), "-f".into(), ifname.into()],
            Impl::Boringtun => vec![
                "boringtun-cli".into(),
                "--foreground".into(),
                "--disable-drop-privileges".into(),
                ifname.into(),
            ],
        }
    }
}

impl Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A WireGuard key pair made by `wg genkey` / `wg pubkey`. `Debug` shows only the public key.
#[derive(Clone)]
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair {{ public: {} }}", self.public)
    }
}

impl Keypair {
    pub fn generate() -> Keypair {
        let private = run_host(&["wg", "genkey"]).trim().to_string();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run wg pubkey");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{private}\n").as_bytes())
            .expect("write key");
        let out = child.wait_with_output().expect("wg pubkey");
        let public = check_output("wg pubkey", out).trim().to_string();
        Keypair { private, public }
    }

    /// Writes the private key to `path` (0600), for `wg set IF private-key PATH`.
    pub fn write_private(&self, path: &Path) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        writeln!(f, "{}", self.private).expect("write key");
    }
}

/// One peer as `wg show IF dump` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDump {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds; 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds; None = off.
    pub persistent_keepalive: Option<u16>,
}

/// The interface line and peers of `wg show IF dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgDump {
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerDump>,
}

impl WgDump {
    /// Parses `wg show IF dump` (tab-separated; first line the interface: private-key public-key
    /// listen-port fwmark; then per peer: public-key preshared-key endpoint allowed-ips
    /// latest-handshake transfer-rx transfer-tx persistent-keepalive). The private key is not kept.
    pub fn parse(text: &str) -> Result<WgDump, String> {
        let none = |s: &str| (s != "(none)" && s != "off" && !s.is_empty()).then(|| s.to_string());
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|e| format!("{what} {s:?}: {e}"));
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines.next().ok_or("empty dump")?;
        let f: Vec<&str> = first.split('\t').collect();
        if f.len() != 4 {
            return Err(format!(
                "interface line has {} fields, want 4: {first:?}",
                f.len()
            ));
        }
        let listen_port = num(f[2], "listen-port")? as u16;
        let fwmark = match none(f[3]) {
            None => None,
            Some(m) => Some(
                u32::from_str_radix(
                    m.trim_start_matches("0x"),
                    if m.starts_with("0x") { 16 } else { 10 },
                )
                .map_err(|e| format!("fwmark {m:?}: {e}"))?,
            ),
        };
        let mut peers = Vec::new();
        for line in lines {
            let p: Vec<&str> = line.split('\t').collect();
            if p.len() != 8 {
                return Err(format!(
                    "peer line has {} fields, want 8: {line:?}",
                    p.len()
                ));
            }
            let endpoint = match none(p[2]) {
                None => None,
                Some(e) => Some(
                    e.parse::<SocketAddr>()
                        .map_err(|err| format!("endpoint {e:?}: {err}"))?,
                ),
            };
            let allowed_ips = none(p[3])
                .map(|a| a.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default();
            peers.push(PeerDump {
                public_key: p[0].to_string(),
                preshared_key: none(p[1]),
                endpoint,
                allowed_ips,
                latest_handshake: num(p[4], "latest-handshake")?,
                rx_bytes: num(p[5], "transfer-rx")?,
                tx_bytes: num(p[6], "transfer-tx")?,
                persistent_keepalive: match none(p[7]) {
                    None => None,
                    Some(k) => Some(num(&k, "persistent-keepalive")? as u16),
                },
            });
        }
        Ok(WgDump {
            public_key: none(f[1]),
            listen_port,
            fwmark,
            peers,
        })
    }

    pub fn peer(&self, public_key: &str) -> Option<&PeerDump> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// A running WireGuard implementation with its tun interface in a namespace. Stopped on drop.
pub struct WgDevice {
    pub ns: Arc<Netns>,
    pub ifname: String,
    pub imp: Impl,
    pub keys: Keypair,
    pub proc: Proc,
    key_file: PathBuf,
}

impl WgDevice {
    /// Starts `imp` for interface `ns.ifname(tag)` and waits for its UAPI socket and interface;
    /// then sets a new private key. Panics with the process log if it exits or times out.
    pub fn start(ns: &Arc<Netns>, imp: Impl, tag: &str, scratch: &Scratch) -> WgDevice {
        require_tool("wg");
        let ifname = ns.ifname(tag);
        let argv = imp.argv(&ifname);
        let mut cmd = ns.command(&argv);
        // wireguard-go: no "use the kernel module" banner; harmless elsewhere.
        cmd.env("WG_PROCESS_FOREGROUND", "1");
        // Plain logs in the files printed on failure.
        cmd.env("NO_COLOR", "1");
        let proc = Proc::spawn(
            cmd,
            format!("{imp} {ifname} in {ns}"),
            scratch.file(&format!("{ifname}.log")),
        );
        let mut dev = WgDevice {
            ns: Arc::clone(ns),
            ifname: ifname.clone(),
            imp,
            keys: Keypair::generate(),
            proc,
            key_file: scratch.file(&format!("{ifname}.key")),
        };
        let sock = dev.socket_path();
        let ok = try_wait_until(DEVICE_START_TIMEOUT, || {
            !dev.proc.is_running() || (sock.exists() && ns.has_link(&ifname))
        });
        if !ok || !dev.proc.is_running() {
            panic!(
                "{imp} did not come up as {ifname} in {ns} within {:?} (exit: {:?}, socket {} exists: {}, \
                 link exists: {}); its log:\n{}",
                DEVICE_START_TIMEOUT,
                dev.proc.try_status(),
                sock.display(),
                sock.exists(),
                ns.has_link(&ifname),
                dev.proc.log()
            );
        }
        dev.keys.write_private(&dev.key_file);
        let key = dev.key_file.display().to_string();
        dev.wg_set(&["private-key", &key]);
        dev
    }

    pub fn socket_path(&self) -> PathBuf {
        Path::new(WG_SOCKET_DIR).join(format!("{}.sock", self.ifname))
    }

    /// `wg ARGS...` inside the namespace; panics unless it succeeds; stdout.
    pub fn wg(&self, args: &[&str]) -> String {
        let mut argv = vec!["wg"];
        argv.extend_from_slice(args);
        self.ns.run(&argv)
    }

    /// `wg set IF ARGS...`
    pub fn wg_set(&self, args: &[&str]) {
        let mut argv = vec!["set", self.ifname.as_str()];
        argv.extend_from_slice(args);
        self.wg(&argv);
    }

    pub fn set_listen_port(&self, port: u16) {
        self.wg_set(&["listen-port", &port.to_string()]);
    }

    /// Adds (or updates) a peer: `allowed_ips` comma-separated, `endpoint` ip:port or [ip6]:port.
    pub fn set_peer(&self, public_key: &str, endpoint: Option<&str>, allowed_ips: &str) {
        let mut args = vec!["peer", public_key, "allowed-ips", allowed_ips];
        if let Some(ep) = endpoint {
            args.extend(["endpoint", ep]);
        }
        self.wg_set(&args);
    }

    pub fn remove_peer(&self, public_key: &str) {
        self.wg_set(&["peer", public_key, "remove"]);
    }

    /// Adds the tunnel addresses (IPv6 nodad), sets the MTU, brings the interface up.
    pub fn up(&self, addrs: &[&str], mtu: u32) {
        for a in addrs {
            self.ns.add_addr(&self.ifname, a);
        }
        self.ns.link_up(&self.ifname, mtu);
    }

    /// `wg show IF dump`, parsed.
    pub fn dump(&self) -> WgDump {
        let text = self.wg(&["show", &self.ifname, "dump"]);
        WgDump::parse(&text)
            .unwrap_or_else(|e| panic!("cannot parse `wg show {} dump`: {e}\n{text}", self.ifname))
    }

    /// `wg showconf IF`
    pub fn showconf(&self) -> String {
        self.wg(&["showconf", &self.ifname])
    }

    /// True while the implementation's process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]): exit status and whether SIGKILL was
    /// needed.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        self.proc.stop()
    }
}

// ---------------------------------------------------------------------------------------------
// Packet capture

/// tcpdump on an interface of a namespace, writing a pcap; [`Capture::stop`] returns the packets
/// as `tcpdump -r FILE -nn` lines.
pub struct Capture {
    proc: Proc,
    pcap: PathBuf,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns` with BPF `filter` (may be empty) and waits until
    /// tcpdump is listening.
    pub fn start(ns: &Netns, ifname: &str, filter: &str, scratch: &Scratch) -> Capture {
        require_tool("tcpdump");
        let pcap = scratch.file(&format!("{}-{ifname}.pcap", ns.id()));
        let log = scratch.file(&format!("{}-{ifname}.tcpdump.log", ns.id()));
        let pcap_s = pcap.display().to_string();
        // --immediate-mode: hand each packet over at once (TPACKET_V3 otherwise holds a block
        // back for up to a second, and a capture stopped early loses it); -U: write each packet
        // at once; -Z root: Debian's tcpdump would otherwise switch to the tcpdump user and lose
        // write access to the scratch directory.
        let mut argv = vec![
            "tcpdump",
            "--immediate-mode",
            "-i",
            ifname,
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "256",
            "-w",
            &pcap_s,
        ];
        if !filter.is_empty() {
            argv.push(filter);
        }
        let mut proc = ns.spawn(&argv, log).with_stop_signal(Signal::SIGINT);
        wait_until(
            Duration::from_secs(10),
            format!("tcpdump listening on {ifname} in {ns}"),
            || {
                assert!(
                    proc.is_running(),
                    "tcpdump on {ifname} in {ns} exited:\n{}",
                    proc.log()
                );
                proc.log().contains("listening on")
            },
        );
        Capture { proc, pcap }
    }

    /// Stops tcpdump and returns the captured packets, one `tcpdump -r -nn` line each.
    pub fn stop(mut self) -> Vec<String> {
        self.proc.stop();
        let pcap = self.pcap.display().to_string();
        let text = run_host(&["tcpdump", "-r", &pcap, "-nn"]);
        text.lines().map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_unique_and_carry_the_pid() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), ID_LEN);
        assert_eq!(pid_of_id(&a), Some(std::process::id()));
        const { assert!(MAX_IF_TAG + ID_LEN <= 15) };
    }

    #[test]
    fn base36_round_trip() {
        for n in [0u64, 1, 35, 36, 4_194_304] {
            assert_eq!(parse_base36(&base36(n, PID_DIGITS)), Some(n));
        }
    }

    #[test]
    fn wait_until_polls_until_true() {
        let mut n = 0;
        assert!(try_wait_until(Duration::from_secs(2), || {
            n += 1;
            n >= 3
        }));
        assert!(!try_wait_until(Duration::from_millis(30), || false));
    }

    #[test]
    #[should_panic(expected = "waiting for: the impossible")]
    fn wait_until_says_what_timed_out() {
        wait_until(Duration::from_millis(20), "the impossible", || false);
    }

    const DUMP: &str = "\
yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\tHIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\t51820\toff
xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\t(none)\t192.0.2.2:51820\t10.99.0.2/32,fd00:99::2/128\t1732633200\t12345\t67890\toff
TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\t(none)\t[2001:db8:1::2]:51820\t(none)\t0\t0\t0\t25
";

    #[test]
    fn parses_wg_show_dump() {
        let d = WgDump::parse(DUMP).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, None);
        assert_eq!(
            d.public_key.as_deref(),
            Some("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")
        );
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[0];
        assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips, vec!["10.99.0.2/32", "fd00:99::2/128"]);
        assert_eq!(
            (p.latest_handshake, p.rx_bytes, p.tx_bytes),
            (1732633200, 12345, 67890)
        );
        assert_eq!(p.persistent_keepalive, None);
        let q = d
            .peer("TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=")
            .unwrap();
        assert_eq!(q.endpoint, Some("[2001:db8:1::2]:51820".parse().unwrap()));
        assert!(q.allowed_ips.is_empty());
        assert_eq!(q.persistent_keepalive, Some(25));
        assert_eq!(q.preshared_key, None);
    }

    #[test]
    fn rejects_malformed_dump() {
        assert!(WgDump::parse("").is_err());
        assert!(WgDump::parse("a\tb\n").is_err());
        assert!(
            WgDump::parse("a\tb\t1\toff\npk\t(none)\tnot-an-endpoint\t(none)\t0\t0\t0\toff\n")
                .is_err()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// kwire-lab

/// Driving `kwire-lab` from tests: a [`lab::Lab`] guard (unique `--name`, `down` on drop) and a
/// small JSON reader for `kwire-lab status --json` (this crate keeps its dependencies few).
pub mod lab {
    /// tcpdump on the underlay bridge; the packets as `tcpdump -r -nn` lines.
    pub struct BridgeCapture {
        proc: crate::Proc,
        pcap: std::path::PathBuf,
    }

    impl BridgeCapture {
        pub fn start(
            lab: &Lab,
            scratch: &crate::Scratch,
            tag: &str,
            filter: &str,
        ) -> BridgeCapture {
            crate::require_tool("tcpdump");
            let st = lab.status();
            let bridge = st.get("bridge").as_str().expect("bridge").to_string();
            let pcap = scratch.file(&format!("{tag}.pcap"));
            let mut cmd = std::process::Command::new("ip");
            cmd.args([
                "netns",
                "exec",
                st.get("underlay_netns").as_str().expect("underlay_netns"),
                "tcpdump",
                "--immediate-mode",
                "-i",
                &bridge,
                "-n",
                "-U",
                "-Z",
                "root",
                "-s",
                "256",
                "-w",
            ])
            .arg(&pcap)
            .arg(filter);
            let mut proc = crate::Proc::spawn(cmd, "tcpdump", scratch.file(&format!("{tag}.log")))
                .with_stop_signal(nix::sys::signal::Signal::SIGINT);
            crate::wait_until(
                std::time::Duration::from_secs(10),
                "tcpdump listening on the bridge",
                || {
                    assert!(proc.is_running(), "tcpdump exited: {}", proc.log());
                    proc.log().contains("listening on")
                },
            );
            BridgeCapture { proc, pcap }
        }

        pub fn stop(mut self) -> Vec<String> {
            self.proc.stop();
            let text = crate::run_host(&["tcpdump", "-r", self.pcap.to_str().unwrap(), "-nn"]);
            text.lines().map(str::to_string).collect()
        }
    }

    /// The kwire binary (env KWIRE_BIN, else target/debug/kwire) if `kwire SUBCOMMAND --help`
    /// works, i.e. this build has that subcommand; None otherwise (the caller skips).
    pub fn kwire_with(subcommand: &str) -> Option<std::path::PathBuf> {
        let workspace = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()?
            .to_path_buf();
        let bin = std::env::var_os("KWIRE_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| workspace.join("target/debug/kwire"));
        let ok = std::process::Command::new(&bin)
            .args([subcommand, "--help"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(bin)
    }

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    use super::{pid_alive, pid_of_id, unique_id, ID_LEN};

    /// First part of every lab name tests make: `kl<id>`, so stale labs can be swept.
    pub const LAB_PREFIX: &str = "kl";
    /// Where kwire-lab keeps each lab's state.
    pub const LAB_STATE_ROOT: &str = "/run/kwire-lab";

    /// Path of the `kwire-lab` binary: `$KWIRE_LAB_BIN`, else `<workspace>/target/debug/kwire-lab`
    /// (or release, the newer). Panics saying how to build it.
    pub fn kwire_lab_bin() -> PathBuf {
        if let Some(p) = std::env::var_os("KWIRE_LAB_BIN") {
            return PathBuf::from(p);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(|t| workspace.join(t))
            .unwrap_or_else(|| workspace.join("target"));
        let candidates = [
            target.join("debug/kwire-lab"),
            target.join("release/kwire-lab"),
        ];
        candidates
            .iter()
            .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
            .max()
            .map(|(_, p)| p)
            .unwrap_or_else(|| {
                panic!(
                    "no kwire-lab binary at {}: run `cargo build -p kwire-lab` first, or set KWIRE_LAB_BIN",
                    candidates[0].display()
                )
            })
    }

    /// Runs `kwire-lab ARGS`.
    pub fn kwire_lab(args: &[&str]) -> Output {
        Command::new(kwire_lab_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running kwire-lab")
    }

    /// Runs `kwire-lab ARGS`; its stdout, or a panic with its output.
    pub fn kwire_lab_ok(args: &[&str]) -> String {
        let out = kwire_lab(args);
        assert!(
            out.status.success(),
            "`kwire-lab {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Removes labs of earlier test processes that died without `down` (their name carries
    /// the pid, as [`unique_id`] does).
    pub fn sweep_stale_labs() {
        let Ok(dir) = std::fs::read_dir(LAB_STATE_ROOT) else {
            return;
        };
        for name in dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
        {
            let Some(id) = name.strip_prefix(LAB_PREFIX) else {
                continue;
            };
            if id.len() == ID_LEN && pid_of_id(id).is_some_and(|p| !pid_alive(p)) {
                let _ = kwire_lab(&["down", "--name", &name]);
            }
        }
    }

    /// A lab made by a test; `kwire-lab down` on drop (printing the supervisor log's tail when
    /// the test failed).
    pub struct Lab {
        name: String,
        down_on_drop: bool,
    }

    impl Lab {
        /// A fresh, unique lab name (not yet up).
        pub fn named() -> Lab {
            sweep_stale_labs();
            Lab {
                name: format!("{LAB_PREFIX}{}", unique_id()),
                down_on_drop: true,
            }
        }

        /// `kwire-lab up --name <unique> --nodes N EXTRA...`.
        pub fn up(nodes: u32, extra: &[&str]) -> Lab {
            let lab = Lab::named();
            let n = nodes.to_string();
            let mut args = vec!["up", "--name", &lab.name, "--nodes", &n];
            args.extend_from_slice(extra);
            lab.run_ok(&args);
            lab
        }

        pub fn name(&self) -> &str {
            &self.name
        }

        pub fn dir(&self) -> PathBuf {
            Path::new(LAB_STATE_ROOT).join(&self.name)
        }

        /// `kwire-lab ARGS` (the caller passes `--name`).
        pub fn run_ok(&self, args: &[&str]) -> String {
            kwire_lab_ok(args)
        }

        /// `kwire-lab SUBCOMMAND --name NAME ARGS...`.
        pub fn cmd(&self, sub: &str, args: &[&str]) -> Output {
            let mut all = vec![sub, "--name", &self.name];
            all.extend_from_slice(args);
            kwire_lab(&all)
        }

        pub fn cmd_ok(&self, sub: &str, args: &[&str]) -> String {
            let mut all = vec![sub, "--name", &self.name];
            all.extend_from_slice(args);
            kwire_lab_ok(&all)
        }

        /// `kwire-lab status --json`, parsed.
        pub fn status(&self) -> Json {
            Json::parse(&self.cmd_ok("status", &["--json"])).expect("status --json is JSON")
        }

        /// `kwire-lab exec NODE -- ARGV...`.
        pub fn exec(&self, node: &str, argv: &[&str]) -> Output {
            let mut all = vec!["exec", "--name", &self.name, node, "--"];
            all.extend_from_slice(argv);
            kwire_lab(&all)
        }

        /// Do not run `down` on drop (the test did it).
        pub fn forget(mut self) {
            self.down_on_drop = false;
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            if !self.down_on_drop {
                return;
            }
            if std::thread::panicking() {
                let log = self.dir().join("supervisor.log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!(
                        "--- {} (tail) ---\n{}",
                        log.display(),
                        lines[lines.len().saturating_sub(30)..].join("\n")
                    );
                }
            }
            let _ = kwire_lab(&["down", "--name", &self.name]);
        }
    }

    /// A JSON value, as read by [`Json::parse`].
    #[derive(Clone, Debug, PartialEq)]
    pub enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    static NULL: Json = Json::Null;

    impl Json {
        pub fn parse(text: &str) -> Result<Json, String> {
            let mut p = Parser {
                s: text.as_bytes(),
                i: 0,
            };
            let v = p.value()?;
            p.ws();
            if p.i != p.s.len() {
                return Err(format!("trailing data at byte {}", p.i));
            }
            Ok(v)
        }

        /// The member `key` of an object (Null if absent or not an object).
        pub fn get(&self, key: &str) -> &Json {
            match self {
                Json::Obj(m) => m
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
                    .unwrap_or(&NULL),
                _ => &NULL,
            }
        }

        pub fn has(&self, key: &str) -> bool {
            matches!(self, Json::Obj(m) if m.iter().any(|(k, _)| k == key))
        }

        pub fn as_array(&self) -> &[Json] {
            match self {
                Json::Arr(a) => a,
                _ => &[],
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Json::Str(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_u64(&self) -> Option<u64> {
            match self {
                Json::Num(n) if *n >= 0.0 => Some(*n as u64),
                _ => None,
            }
        }

        pub fn as_bool(&self) -> Option<bool> {
            match self {
                Json::Bool(b) => Some(*b),
                _ => None,
            }
        }

        pub fn is_null(&self) -> bool {
            matches!(self, Json::Null)
        }

        /// The strings of an array of strings.
        pub fn strings(&self) -> Vec<String> {
            self.as_array()
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }

        fn eat(&mut self, lit: &str) -> bool {
            if self.s[self.i..].starts_with(lit.as_bytes()) {
                self.i += lit.len();
                true
            } else {
                false
            }
        }

        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            let c = *self.s.get(self.i).ok_or("unexpected end")?;
            match c {
                b'{' => {
                    self.i += 1;
                    let mut m = Vec::new();
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Obj(m));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.ws();
                        if !self.eat(":") {
                            return Err(format!("expected ':' at byte {}", self.i));
                        }
                        m.push((k, self.value()?));
                        self.ws();
                        if self.eat("}") {
                            return Ok(Json::Obj(m));
                        }
                        if !self.eat(",") {
                            return Err(format!("expected ',' at byte {}", self.i));
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Arr(a));
                    }
                    loop {
                        a.push(self.value()?);
                        self.ws();
                        if self.eat("]") {
                            return Ok(Json::Arr(a));
                        }
                        if !self.eat(",") {
                            return Err(format!("expected ',' at byte {}", self.i));
                        }
                    }
                }
                b'"' => Ok(Json::Str(self.string()?)),
                b't' if self.eat("true") => Ok(Json::Bool(true)),
                b'f' if self.eat("false") => Ok(Json::Bool(false)),
                b'n' if self.eat("null") => Ok(Json::Null),
                _ => {
                    let start = self.i;
                    while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                        self.i += 1;
                    }
                    std::str::from_utf8(&self.s[start..self.i])
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .map(Json::Num)
                        .ok_or_else(|| format!("bad value at byte {start}"))
                }
            }
        }

        fn string(&mut self) -> Result<String, String> {
            if !self.eat("\"") {
                return Err(format!("expected a string at byte {}", self.i));
            }
            let mut out = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        let ch = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = std::str::from_utf8(
                                    self.s.get(self.i..self.i + 4).ok_or("short \\u")?,
                                )
                                .map_err(|e| e.to_string())?;
                                self.i += 4;
                                char::from_u32(
                                    u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?,
                                )
                                .unwrap_or('\u{fffd}')
                            }
                            other => other as char,
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => out.push(c),
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::Json;

        #[test]
        fn json_reader() {
            let j =
                Json::parse(r#"{"a": [1, "x\"y", true, null], "b": {"c": -2.5e0}, "d": "\u00e9"}"#)
                    .unwrap();
            assert_eq!(j.get("a").as_array().len(), 4);
            assert_eq!(j.get("a").as_array()[1].as_str(), Some("x\"y"));
            assert_eq!(j.get("b").get("c"), &Json::Num(-2.5));
            assert_eq!(j.get("d").as_str(), Some("é"));
            assert!(j.get("zz").is_null());
            assert!(Json::parse("{").is_err());
            assert!(Json::parse("[1] x").is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces made by others (a lab's pods and nodes)

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

/// One counter of a Prometheus text exposition: the value of the sample named exactly
/// `series` (`kwire_drops_total{reason="spoofed_source"}`), None when absent.
pub fn prometheus_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name.trim() == series).then(|| value.trim().parse().ok())?
    })
}
