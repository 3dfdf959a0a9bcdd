//! Names, root, waiting: unique ids that carry the pid, the root check, polling with a deadline,
//! running host commands, and reading a Prometheus exposition.

#[allow(unused_imports)]
use crate::*;
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// True when running as root. Tests that need namespaces call [`require_root!`] instead.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Environment variable that turns every skip into a failure. `make test` sets it (CI runs as
/// root with every tool installed, so a skip there would hide a broken suite).
pub const STRICT_ENV: &str = "KWIRE_TESTS_STRICT";

/// Whether skips are failures ([`STRICT_ENV`] is `1`).
pub fn strict() -> bool {
    std::env::var(STRICT_ENV).is_ok_and(|v| v == "1")
}

/// Says why `test` cannot run here: a printed SKIP, or a panic under [`STRICT_ENV`]=1. The
/// caller returns afterwards.
pub fn skip(test: &str, why: &str) {
    if strict() {
        panic!("{test} cannot run: {why} ({STRICT_ENV}=1 makes a skip a failure)");
    }
    eprintln!("SKIP {test}: {why}");
}

/// Returns from the calling test when not running as root (printed SKIP; a failure under
/// [`STRICT_ENV`]=1).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::skip(
                module_path!(),
                "needs root (network namespaces, tun devices); CI runs it as root",
            );
            return;
        }
    };
}

/// Root and a kwire binary with the `agent` subcommand, or the calling test returns (printed
/// SKIP; a failure under [`STRICT_ENV`]=1). Evaluates to the binary's path.
#[macro_export]
macro_rules! require_agent {
    () => {{
        $crate::require_root!();
        match $crate::lab::kwire_with("agent") {
            Some(bin) => bin,
            None => {
                $crate::skip(
                    module_path!(),
                    "`kwire agent --help` fails (build the agent: cargo build -p kwire-daemon)",
                );
                return;
            }
        }
    }};
}

pub(crate) fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).expect("ascii")
}

pub(crate) fn parse_base36(s: &str) -> Option<u64> {
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

pub(crate) fn pid_of_id(id: &str) -> Option<u32> {
    if id.len() < ID_LEN || !id.is_char_boundary(PID_DIGITS) {
        return None;
    }
    parse_base36(&id[..PID_DIGITS]).map(|p| p as u32)
}

pub(crate) fn pid_alive(pid: u32) -> bool {
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

pub(crate) fn describe(program: &OsStr, args: &[&OsStr]) -> String {
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

pub(crate) fn check_output(what: &str, out: Output) -> String {
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

/// One counter of a Prometheus text exposition: the value of the sample named exactly
/// `series` (`kwire_drops_total{reason="spoofed_source"}`), None when absent.
pub fn prometheus_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name.trim() == series).then(|| value.trim().parse().ok())?
    })
}
